//! `--mode http` when things go wrong: the proxy's own `502`/`504` answers (refused, connect
//! timeout, untrusted certificate, reset by the upstream) and which of them are retried;
//! oversized request headers (`431`); clients too slow to send their headers.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::http::*;
use crate::support::upstream::server_config;
use crate::support::*;

fn get(id: &str) -> hyper::Request<Body> {
    h1_req("GET", "/")
        .header("x-request-id", id)
        .body(empty())
        .unwrap()
}

/// Nothing listens: `502 mtls-sidecar: refused ...`, to HTTP/1.1 and h2c apps alike; the
/// proxy goes on answering.
#[tokio::test(flavor = "multi_thread")]
async fn refused_upstream_gets_502_refused() {
    let pki = Pki::new();
    let proxy = http_cmd(&pki, format!("127.0.0.1:{}", free_port())).start();
    let reply = h1_call(proxy.addr(), get("refused-1")).await;
    assert_reply_is_sidecar_error(&reply, 502, "refused");
    let mut h2 = H2Client::connect(proxy.addr()).await;
    let reply = h2
        .call(h2_req("POST", "/upload").body(full("x")).unwrap())
        .await;
    assert_reply_is_sidecar_error(&reply, 502, "refused");
    let reply = h1_call(proxy.addr(), get("refused-2")).await;
    assert_reply_is_sidecar_error(&reply, 502, "refused");
}

/// An upstream that accepts TCP and never answers the handshake: `504 mtls-sidecar: timeout`
/// after `--connect-timeout`, without a second attempt.
#[tokio::test(flavor = "multi_thread")]
async fn silent_upstream_gets_504_after_the_connect_timeout() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let proxy = http_cmd(&pki, silent.addr)
        .args(["--connect-timeout", "500ms", "--server-name", "localhost"])
        .start();
    let started = Instant::now();
    let reply = h1_call(proxy.addr(), get("timeout")).await;
    let took = started.elapsed();
    assert_reply_is_sidecar_error(&reply, 504, "timeout");
    assert!(
        took >= Duration::from_millis(450),
        "504 after {took:?}, before --connect-timeout 500ms"
    );
    assert!(
        took < Duration::from_secs(4),
        "504 only after {took:?} with --connect-timeout 500ms"
    );
    assert_eq!(
        silent.accepted.load(Ordering::SeqCst),
        1,
        "a connect timeout is not retried"
    );
}

/// The upstream's certificate comes from a CA we do not trust: `502 mtls-sidecar:
/// unknown_issuer`, one attempt only, no request reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn untrusted_upstream_gets_502_unknown_issuer() {
    let pki = Pki::new();
    let id = pki.server_unknown_ca();
    let up = HttpUpstream::with_config(server_config(&id, &[&pki.ca.der]), Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let reply = h1_call(proxy.addr(), get("untrusted")).await;
    assert_reply_is_sidecar_error(&reply, 502, "unknown_issuer");
    assert_eq!(up.stats.tls_accepted(), 0);
    assert_eq!(up.stats.request_count(), 0);
    assert_eq!(
        up.stats.tcp_accepted.load(Ordering::SeqCst),
        1,
        "a TLS failure is not retried"
    );
}

/// The upstream reads the request and resets the connection: `502 mtls-sidecar: reset`, and
/// no second attempt (the request was written; it may have had effects).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_gets_502_reset_and_no_retry() {
    let pki = Pki::new();
    let up = RawUpstream::start(&pki, RawBehavior::ResetAfterHead).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let reply = h1_call(proxy.addr(), get("reset")).await;
    assert_reply_is_sidecar_error(&reply, 502, "reset");
    assert_eq!(
        up.stats.request_count(),
        1,
        "a request reset after the upstream read it was sent again: {:#?}",
        up.stats.requests()
    );
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 1);
}

/// Request headers over 64 KiB get `431` and never reach the upstream; 32 KiB ones pass; over
/// HTTP/1.1 and h2c alike.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_headers_get_431() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();

    let big = "a".repeat(100 * 1024);
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {APP_HOST}\r\nx-request-id: too-big\r\nx-big: {big}\r\n\r\n"
    );
    let reply = raw_call(proxy.addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 431, "100 KiB of request headers: {reply:?}");
    assert_eq!(
        up.stats.request_count(),
        0,
        "oversized headers reached the upstream"
    );

    let mut h2 = H2Client::connect(proxy.addr()).await;
    let reply = h2
        .call(
            h2_req("GET", "/")
                .header("x-request-id", "too-big-h2c")
                .header("x-big", &big)
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.status, 431,
        "100 KiB of request headers over h2c: {reply:?}"
    );
    assert_eq!(
        up.stats.request_count(),
        0,
        "oversized headers reached the upstream"
    );

    let fine = "b".repeat(32 * 1024);
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/")
            .header("x-request-id", "fine-h1")
            .header("x-big", &fine)
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        reply.status, 200,
        "32 KiB of request headers over HTTP/1.1: {reply:?}"
    );
    assert_eq!(up.stats.request("fine-h1").get("x-big"), Some(&*fine));

    let reply = h2
        .call(
            h2_req("GET", "/")
                .header("x-request-id", "fine-h2c")
                .header("x-big", &fine)
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.status, 200,
        "32 KiB of request headers over h2c: {reply:?}"
    );
    assert_eq!(up.stats.request("fine-h2c").get("x-big"), Some(&*fine));
}

/// Drips a request's head one byte every 100 ms (several seconds in all) while watching for
/// the proxy to close; returns when it closed (since `started`) and what came back.
async fn trickle(addr: std::net::SocketAddr, started: Instant) -> (Duration, Vec<u8>) {
    let head =
        format!("GET /trickle HTTP/1.1\r\nHost: {APP_HOST}\r\nx-request-id: trickle\r\n\r\n");
    let mut stream = connect(addr).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let mut bytes = head.bytes();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(b) = bytes.next() {
            let _ = stream.write_all(&[b]).await;
        }
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        assert!(
            Instant::now() < deadline,
            "the trickling client was never cut ({} bytes back)",
            got.len()
        );
    }
}

/// `--header-timeout 1s`: a client that sends half a request line and stalls, and one that
/// drips its head a byte at a time, are both cut after about a second; requests from other
/// clients go through meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn slow_header_clients_are_cut_while_others_proceed() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--header-timeout", "1s"])
        .start();
    let addr = proxy.addr();

    let started = Instant::now();
    let mut stalled = connect(addr).await;
    stalled.write_all(b"GET /slow HT").await.expect("write");
    let dripping = tokio::spawn(trickle(addr, started));

    for i in 0..5 {
        let reply = h1_call(addr, get(&format!("fast-{i}"))).await;
        assert_eq!(
            reply.status, 200,
            "a request while slow clients hold: {reply:?}"
        );
    }
    if started.elapsed() < Duration::from_millis(800) {
        let mut probe = [0u8; 16];
        match stalled.try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the stalled client was cut before the header timeout: {other:?}"),
        }
    }

    let (got, _) = read_until_closed(&mut stalled, Duration::from_secs(10)).await;
    let cut = started.elapsed();
    let answer = String::from_utf8_lossy(&got).into_owned();
    assert!(
        got.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "a stalled client got {answer:?}"
    );
    assert!(
        cut >= Duration::from_millis(900),
        "the stalled client was cut after {cut:?}, before --header-timeout 1s"
    );
    assert!(
        cut < Duration::from_secs(4),
        "the stalled client was cut only after {cut:?} with --header-timeout 1s"
    );

    let (cut, got) = dripping.await.expect("trickle task");
    let answer = String::from_utf8_lossy(&got).into_owned();
    assert!(
        got.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "the trickling client got {answer:?}"
    );
    assert!(
        cut >= Duration::from_millis(900) && cut < Duration::from_secs(4),
        "the trickling client (a byte every 100 ms) was cut after {cut:?} with \
         --header-timeout 1s: the timeout must bound the whole head, not each read"
    );

    let requests = up.stats.requests();
    assert_eq!(
        requests.len(),
        5,
        "only the 5 fast requests reach the upstream: {requests:#?}"
    );
    let reply = h1_call(addr, get("after")).await;
    assert_eq!(reply.status, 200);
}
