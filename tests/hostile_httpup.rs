//! `--mode http`, the upstream side under hostile or broken peers: framing that must never be
//! guessed (`Transfer-Encoding` with `Content-Length`, transfer codings other than `chunked`,
//! request bodies of unknown length, `OPTIONS *`), the per-route cap on upstream connections,
//! apps that never read, PINGs on pooled h2 connections, and what the proxy's own 502/504
//! bodies may say.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{HeaderMap, Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::support::connect_proxy::ConnectProxy;
use crate::support::http::*;
use crate::support::raw_h1::{Relay, ScriptedUpstream};
use crate::support::*;

/// What the app got: status, headers, and the body or the error that ended it.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Got {
    async fn read(resp: Response<Incoming>) -> Got {
        let (parts, body) = resp.into_parts();
        let body = match timeout(WAIT, body.collect()).await {
            Ok(Ok(b)) => Ok(b.to_bytes()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("body did not end within {WAIT:?}")),
        };
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Either the proxy's own `502 protocol` or the upstream's whole body, read to a clean
    /// end: never a shorter body presented as complete.
    fn assert_whole_or_502(&self, whole: &[u8], what: &str) {
        if self.status == StatusCode::BAD_GATEWAY {
            let text = self
                .body
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            assert_sidecar_error(502, self.header("content-type"), &text, 502, "protocol");
            return;
        }
        assert_eq!(self.status, StatusCode::OK, "{what}");
        match &self.body {
            Ok(b) => assert_eq!(
                &b[..],
                whole,
                "{what}: the app got a different body as complete (content-length {:?})",
                self.header("content-length")
            ),
            // An aborted body is not presented as complete: acceptable, but not what we do.
            Err(e) => panic!("{what}: body ended with an error: {e}"),
        }
    }
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// `chunked` and `Content-Length: 5` together, the chunked body being 26 bytes.
const TE_AND_CL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
transfer-encoding: chunked\r\ncontent-length: 5\r\nconnection: close\r\n\r\n\
1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";

/// An upstream answer with both `Transfer-Encoding` and `Content-Length` reaches neither an
/// HTTP/1.1 nor an h2c app truncated to the `Content-Length` as if complete; the refusal is
/// logged at warn with both values.
#[tokio::test(flavor = "multi_thread")]
async fn te_and_content_length_answer_is_never_truncated() {
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, TE_AND_CL).await;
    let mut sidecar = http_cmd(&pki, up.addr).start();
    let mut h1 = H1Client::connect(sidecar.addr()).await;
    let got = Got::read(
        h1.send(h1_req("GET", "/te-cl").body(empty()).unwrap())
            .await,
    )
    .await;
    got.assert_whole_or_502(ALPHABET, "HTTP/1.1 app");
    let mut h2 = H2Client::connect(sidecar.addr()).await;
    let got = Got::read(
        h2.send(h2_req("GET", "/te-cl").body(empty()).unwrap())
            .await,
    )
    .await;
    got.assert_whole_or_502(ALPHABET, "h2c app");
    let line = sidecar.wait_for_line("the framing warn line", WAIT, |l| {
        l.contains("WARN") && l.contains("ambiguous framing")
    });
    assert!(line.contains("chunked") && line.contains('5'), "{line}");
}

/// A `gzip, chunked` answer is neither decoded nor passed on with its coding dropped (which
/// would hand the app gzip bytes labelled as plain): it is refused with 502.
#[tokio::test(flavor = "multi_thread")]
async fn gzip_chunked_answer_is_not_relabelled() {
    const GZ: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
transfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n\
4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n";
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, GZ).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    let mut h1 = H1Client::connect(sidecar.addr()).await;
    let got = Got::read(h1.send(h1_req("GET", "/gz").body(empty()).unwrap()).await).await;
    if got.status == StatusCode::OK {
        // Passed through: then the coding must still be announced and the bytes untouched.
        assert!(
            got.header("transfer-encoding")
                .is_some_and(|v| v.contains("gzip")),
            "gzip bytes delivered without their transfer coding: {:?}",
            got.headers
        );
        assert_eq!(got.body.as_deref().ok(), Some(&b"\x1f\x8b\x08\x00"[..]));
    } else {
        got.assert_whole_or_502(b"", "HTTP/1.1 app");
    }
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\
connection: close\r\n\r\nok\n";

/// A chunked request of `method` written by hand, `data` in three chunks.
fn chunked_request(method: &str, target: &str, data: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "{method} {target} HTTP/1.1\r\nhost: {APP_HOST}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for part in data.chunks(data.len().div_ceil(3)) {
        raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        raw.extend_from_slice(part);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

/// An h2c request whose body has no `content-length`: two DATA frames from a channel.
async fn h2_streamed(h2: &mut H2Client, method: &str, target: &str, data: &[u8]) -> Got {
    let (tx, body) = channel_body();
    let half = data.len() / 2;
    let (a, b) = (
        Bytes::copy_from_slice(&data[..half]),
        Bytes::copy_from_slice(&data[half..]),
    );
    let feeder = tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(a))).await;
        let _ = tx.send(Ok(Frame::data(b))).await;
    });
    let resp = h2.send(h2_req(method, target).body(body).unwrap()).await;
    let got = Got::read(resp).await;
    let _ = timeout(WAIT, feeder).await;
    got
}

/// Bodies of unknown length reach an HTTP/1.1 upstream byte for byte whatever the method:
/// chunked GET and DELETE from an HTTP/1.1 app, POST and GET from an h2c app without
/// `content-length`.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_of_unknown_length_reach_the_upstream_intact() {
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, OK).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    let data = pattern(12, 100_000);
    for method in ["GET", "DELETE"] {
        let target = format!("/h1-chunked-{method}");
        let reply = raw_call(sidecar.addr(), &chunked_request(method, &target, &data)).await;
        assert_eq!(reply.status, 200, "{method}: {reply:?}");
    }
    let mut h2 = H2Client::connect(sidecar.addr()).await;
    for method in ["POST", "GET"] {
        let target = format!("/h2-streamed-{method}");
        let got = h2_streamed(&mut h2, method, &target, &data).await;
        assert_eq!(got.status, 200, "h2c {method}: {:?}", got.body);
    }
    let seen = up.wait_requests(4).await;
    for target in [
        "/h1-chunked-GET",
        "/h1-chunked-DELETE",
        "/h2-streamed-POST",
        "/h2-streamed-GET",
    ] {
        let req = seen
            .iter()
            .find(|r| r.target == target)
            .unwrap_or_else(|| panic!("{target} never reached the upstream: {seen:#?}"));
        assert_eq!(
            (req.body.len(), hex(&sha256(&req.body))),
            (data.len(), hex(&sha256(&data))),
            "{target}: the upstream got other bytes (headers {:?})",
            req.headers
        );
        assert_eq!(
            req.header("content-length"),
            None,
            "{target}: {:?}",
            req.headers
        );
    }
}

/// A request with a transfer coding other than `chunked` is refused with `501`, as nginx
/// does, instead of reaching the upstream with its coding label stripped.
#[tokio::test(flavor = "multi_thread")]
async fn gzip_chunked_request_is_refused_with_501() {
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, OK).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    let mut raw = format!(
        "POST /gz HTTP/1.1\r\nhost: {APP_HOST}\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n");
    let reply = raw_call(sidecar.addr(), &raw).await;
    assert_sidecar_error(
        reply.status,
        reply.header("content-type"),
        &reply.text(),
        501,
        "transfer_coding",
    );
    // A plain request afterwards reaches it: the refusal was about that request only.
    let reply = raw_call(
        sidecar.addr(),
        chunked_request("POST", "/after", b"fine").as_slice(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.wait_requests(1).await;
    assert_eq!(
        seen.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
        ["/after"]
    );
}

/// `OPTIONS * HTTP/1.1` reaches the upstream as `OPTIONS *`.
#[tokio::test(flavor = "multi_thread")]
async fn options_star_reaches_the_upstream_as_star() {
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, OK).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    let raw = format!("OPTIONS * HTTP/1.1\r\nhost: {APP_HOST}\r\n\r\n");
    let reply = raw_call(sidecar.addr(), raw.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.wait_requests(1).await;
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("OPTIONS", "*")
    );
}

/// Polls `pred` until it holds for the whole of `dur`, failing at the first miss.
async fn holds_for(what: &str, dur: Duration, mut pred: impl FnMut() -> bool) {
    let end = Instant::now() + dur;
    while Instant::now() < end {
        assert!(pred(), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 200 concurrent streams from h2c apps against an HTTP/1.1-only upstream open at most
/// `--pool-max-connections` upstream connections; the waiting requests are all served once
/// connections come free.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_capped_per_route() {
    const CAP: usize = 8;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let sidecar = http_cmd(&pki, up.addr)
        .args(["--pool-max-connections", &CAP.to_string()])
        .args(["--connect-timeout", "60s"])
        .start();
    let mut tasks = JoinSet::new();
    // Four app connections of 50 streams: within any per-connection stream limit.
    for _ in 0..4 {
        let h2 = H2Client::connect(sidecar.addr()).await;
        for _ in 0..50 {
            let mut sender = h2.sender.clone();
            tasks.spawn(async move {
                sender.ready().await.map_err(|e| e.to_string())?;
                let resp = sender
                    .send_request(h2_req("GET", "/hold").body(empty()).unwrap())
                    .await
                    .map_err(|e| e.to_string())?;
                let got = Got::read(resp).await;
                Ok::<_, String>((got.status, got.body))
            });
        }
    }
    up.stats.wait_requests(CAP).await;
    holds_for(
        &format!("more than {CAP} upstream connections"),
        Duration::from_secs(1),
        || {
            up.stats
                .tcp_accepted
                .load(std::sync::atomic::Ordering::SeqCst)
                <= CAP
        },
    )
    .await;
    up.release();
    let mut served = 0;
    while let Some(r) = timeout(BIG_WAIT, tasks.join_next())
        .await
        .expect("requests still waiting after the release")
    {
        let (status, body) = r.expect("task").expect("request");
        assert_eq!(status, 200, "{body:?}");
        assert_eq!(body.as_deref().ok(), Some(&b"released\n"[..]));
        served += 1;
    }
    assert_eq!(served, 200);
    let accepted = up
        .stats
        .tcp_accepted
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        accepted <= CAP,
        "{accepted} upstream connections, cap {CAP}"
    );
}

/// With every slot busy past `--connect-timeout`, a request gets the proxy's own `503
/// pool_full`, and the busy request still completes.
#[tokio::test(flavor = "multi_thread")]
async fn request_beyond_the_cap_gets_503_after_the_connect_timeout() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut sidecar = http_cmd(&pki, up.addr)
        .args(["--pool-max-connections", "1", "--connect-timeout", "1s"])
        .start();
    let addr = sidecar.addr();
    let held =
        tokio::spawn(
            async move { h1_call(addr, h1_req("GET", "/hold").body(empty()).unwrap()).await },
        );
    up.stats.wait_requests(1).await;
    let started = Instant::now();
    let reply = h1_call(addr, h1_req("GET", "/").body(empty()).unwrap()).await;
    let took = started.elapsed();
    assert_reply_is_sidecar_error(&reply, 503, "pool_full");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&took),
        "503 after {took:?} with --connect-timeout 1s"
    );
    up.release();
    let reply = timeout(WAIT, held)
        .await
        .expect("held request")
        .expect("task");
    assert_eq!(reply.status, 200);
    assert_eq!(up.stats.tls_accepted(), 1);
    sidecar.wait_for_line("the pool_full warn line", WAIT, |l| {
        l.contains("WARN") && l.contains("pool_full") && l.contains("--pool-max-connections 1")
    });
}

/// An HTTP/1.1 app connection with a small receive buffer that asks for `target` and then
/// never reads.
async fn stalled_app(addr: std::net::SocketAddr, target: &str) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let req = format!("GET {target} HTTP/1.1\r\nhost: {APP_HOST}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write request");
    tcp
}

/// Several apps start large downloads over one pooled h2 upstream connection and never read;
/// other apps' downloads on the same route still complete promptly, again and again.
#[tokio::test(flavor = "multi_thread")]
async fn apps_that_never_read_do_not_stall_the_route() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    // The pool's h2 connection exists before the stalled apps come.
    let reply = h1_call(sidecar.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    let mut stalled = Vec::new();
    for seed in 0..6 {
        let target = format!("/download?len={}&seed={seed}", 16 << 20);
        stalled.push(stalled_app(sidecar.addr(), &target).await);
    }
    up.stats.wait_requests(7).await;
    // Long enough for six streams to fill every buffer on their way (each at most a few MiB).
    let end = Instant::now() + Duration::from_secs(8);
    let mut rounds = 0;
    let want = pattern(99, 1 << 20);
    while Instant::now() < end || rounds < 3 {
        let started = Instant::now();
        let mut h1 = H1Client::connect(sidecar.addr()).await;
        let resp = h1
            .send(
                h1_req("GET", &format!("/download?len={}&seed=99", 1 << 20))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        let got = Got::read(resp).await;
        assert_eq!(got.status, 200);
        let body = got.body.unwrap_or_else(|e| panic!("round {rounds}: {e}"));
        assert!(body == want, "round {rounds}: other bytes");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {rounds} took {:?}",
            started.elapsed()
        );
        rounds += 1;
    }
    assert_eq!(up.stats.tls_accepted(), 1, "one pooled h2 connection");
    drop(stalled);
}

/// A pooled h2 connection whose peer stops answering without closing (a relay that swallows
/// every byte) is closed by the sidecar's PINGs within about a minute, long before
/// `--pool-idle-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn silent_h2_upstream_is_noticed_by_pings() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let relay = Relay::start(up.addr).await;
    let sidecar = http_cmd(&pki, relay.addr)
        .args(["--server-name", "localhost", "--pool-idle-timeout", "10m"])
        .start();
    let reply = h1_call(sidecar.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(relay.accepted(), 1);
    relay.pause();
    let paused = Instant::now();
    eventually(
        "the sidecar closing the silent pooled connection",
        Duration::from_secs(80),
        || relay.client_closed() >= 1,
    )
    .await;
    let took = paused.elapsed();
    assert!(
        took >= Duration::from_secs(20),
        "closed after only {took:?}: not by the PING timeout"
    );
}

/// The proxy's own 502/504 bodies name the reason in a fixed sentence: no resolved address,
/// no auth-file path, no text from the proxy; the warn line carries the detail.
#[tokio::test(flavor = "multi_thread")]
async fn failure_bodies_carry_no_address_path_or_peer_text() {
    let pki = Pki::new();
    let port = free_port();
    let mut sidecar = http_cmd(&pki, format!("127.0.0.1:{port}")).start();
    let reply = h1_call(sidecar.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_reply_is_sidecar_error(&reply, 502, "refused");
    let text = reply.text();
    assert!(
        !text.contains("127.0.0.1") && !text.contains(&port.to_string()),
        "{text:?}"
    );
    let line = sidecar.wait_for_line("the refused warn line", WAIT, |l| {
        l.contains("WARN") && l.contains("upstream request failed")
    });
    assert!(
        line.contains("refused") && line.contains(&format!("127.0.0.1:{port}")),
        "{line}"
    );

    let proxy = ConnectProxy::builder()
        .credentials("ivan", "right-password")
        .start()
        .await;
    let file = pki.write("proxy-auth-canary-path", "ivan:wrong-password\n");
    let mut sidecar = http_cmd(&pki, format!("upstream.invalid:{port}"))
        .args(["--proxy", &proxy.url(), "--proxy-auth-file"])
        .arg(&file)
        .start();
    let reply = h1_call(sidecar.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_reply_is_sidecar_error(&reply, 502, "proxy_auth");
    let text = reply.text();
    let proxy_port = proxy
        .url()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string();
    for leak in [
        "proxy-auth-canary-path",
        "127.0.0.1",
        proxy_port.as_str(),
        "Proxy Authentication Required",
        "wrong-password",
    ] {
        assert!(!text.contains(leak), "{leak:?} in the body {text:?}");
    }
    let line = sidecar.wait_for_line("the proxy_auth warn line", WAIT, |l| {
        l.contains("WARN") && l.contains("upstream request failed")
    });
    assert!(
        line.contains("proxy_auth") && line.contains("proxy-auth-canary-path"),
        "{line}"
    );
    assert!(!sidecar.stderr().contains("wrong-password"));
}

/// `--pool-max-connections` outside 1..=100000 is a usage error naming the flag and the range,
/// on the command line and in a config file.
#[test]
fn pool_max_connections_out_of_range_is_exit_2() {
    let pki = Pki::new();
    for bad in ["0", "100001", "-1", "lots"] {
        let err = http_cmd(&pki, "127.0.0.1:9")
            .arg(format!("--pool-max-connections={bad}"))
            .startup_error();
        assert!(err.contains("--pool-max-connections"), "{bad}: {err}");
    }
    let err = http_cmd(&pki, "127.0.0.1:9")
        .args(["--pool-max-connections", "0"])
        .startup_error();
    assert!(err.contains("1 to 100000"), "{err}");
    let file = pki.write(
        "pool.toml",
        format!(
            "[[route]]\nname = \"pool\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"127.0.0.1:9\"\nmode = \"http\"\n\
             cert = {:?}\nkey = {:?}\nca = {:?}\npool_max_connections = 0\n",
            pki.client.cert, pki.client.key, pki.ca.pem,
        ),
    );
    let err = Cmd::new()
        .args(["run", "--config"])
        .arg(&file)
        .startup_error();
    assert!(
        err.contains("pool_max_connections") || err.contains("--pool-max-connections"),
        "{err}"
    );
}

/// An upstream that dies in the middle of a response body: the app's answer is cut (never
/// complete) and the failure is logged at warn.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_failing_mid_body_is_logged_at_warn() {
    const SHORT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\
connection: close\r\n\r\nonly ten.\n";
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, SHORT).await;
    let mut sidecar = http_cmd(&pki, up.addr).start();
    let mut h1 = H1Client::connect(sidecar.addr()).await;
    let sent = h1
        .try_send(h1_req("GET", "/short").body(empty()).unwrap())
        .await;
    // Either the head came and the body is cut, or (when the upstream's end was read before
    // the head was written to the app) the connection closed before the head: never a
    // complete answer.
    match sent {
        Ok(resp) => {
            let got = Got::read(resp).await;
            assert!(
                got.body.is_err(),
                "a cut body arrived as complete: {:?}",
                got.body
            );
        }
        Err(e) => assert!(e.is_incomplete_message(), "GET /short: {e}"),
    }
    sidecar.wait_for_line("the mid-body warn line", WAIT, |l| {
        l.contains("WARN") && l.contains("upstream response body failed")
    });
}

/// A request with both `Transfer-Encoding: chunked` and `Content-Length` (the classic smuggling
/// shape) is either refused or reaches the upstream framed by its chunks alone: the whole body
/// and no `Content-Length`.
#[tokio::test(flavor = "multi_thread")]
async fn request_with_te_and_content_length_is_not_smuggled() {
    let pki = Pki::new();
    let up = ScriptedUpstream::start(&pki, OK).await;
    let sidecar = http_cmd(&pki, up.addr).start();
    let mut raw = chunked_request("POST", "/te-cl-req", ALPHABET);
    let at = find(&raw, b"\r\n\r\n").expect("head end");
    raw.splice(at..at, b"\r\ncontent-length: 3".iter().copied());
    let reply = raw_call(sidecar.addr(), &raw).await;
    if reply.status == 400 {
        return;
    }
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.wait_requests(1).await;
    assert_eq!(seen[0].body, ALPHABET, "{:?}", seen[0]);
    assert_eq!(seen[0].header("content-length"), None, "{:?}", seen[0]);
}
