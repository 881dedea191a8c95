//! `--mode http` when the upstream is there: the Host rewrite, ALPN towards the upstream, h2c
//! from the app, bodies (20 MiB both ways, streaming without buffering), trailers,
//! `Expect: 100-continue`, WebSocket-style upgrades, hop-by-hop headers, and the mode's flags.
//!
//! Pooling, reloads, metrics, draining and nginx are in `http_pool`; failures and limits in
//! `http_errors`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::{Bytes, Frame};
use hyper::{HeaderMap, Version, header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::http::*;
use crate::support::pki::CLIENT_CN;
use crate::support::*;

const BOTH: [Alpn; 2] = [Alpn::H2AndHttp11, Alpn::Http11];

/// One GET through an HTTP/1.1 app connection and one through h2c; returns what the upstream
/// saw of each (method, target, host...).
async fn seen_from_both_app_protocols(proxy: SocketAddr, up: &HttpUpstream) -> [Seen; 2] {
    let target = "/a/b%20c?x=1&y=%2F";
    let r1 = h1_call(
        proxy,
        h1_req("PATCH", target)
            .header("x-request-id", "from-h1")
            .body(full("patch body"))
            .unwrap(),
    )
    .await;
    assert_eq!(r1.status, 200, "HTTP/1.1 app: {r1:?}");
    assert_eq!(r1.text(), "ok\n");
    let mut h2 = H2Client::connect(proxy).await;
    let r2 = h2
        .call(
            h2_req("PATCH", target)
                .header("x-request-id", "from-h2c")
                .body(full("patch body"))
                .unwrap(),
        )
        .await;
    assert_eq!(r2.status, 200, "h2c app: {r2:?}");
    assert_eq!(r2.version, Version::HTTP_2);
    let seen = [up.stats.request("from-h1"), up.stats.request("from-h2c")];
    for s in &seen {
        assert_eq!(s.method, "PATCH", "{s:?}");
        assert_eq!(
            s.target, target,
            "path and query must pass unchanged: {s:?}"
        );
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn host_is_the_upstream_name_and_port() {
    let pki = Pki::new();
    for alpn in BOTH {
        let up = HttpUpstream::start(&pki, alpn).await;
        let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
        let want = format!("localhost:{}", up.port());
        for seen in seen_from_both_app_protocols(proxy.addr(), &up).await {
            assert_eq!(seen.version, alpn.version(), "{alpn:?}: {seen:?}");
            assert_eq!(
                seen.host(),
                Some(&*want),
                "{alpn:?}: Host/:authority at the upstream: {seen:?}"
            );
            assert!(
                seen.headers.iter().all(|(_, v)| !v.contains(APP_HOST)),
                "{alpn:?}: the app's host reached the upstream: {seen:?}"
            );
        }
        assert_eq!(up.stats.conns()[0].sni.as_deref(), Some("localhost"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_is_the_server_name_flag_when_given() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, up.addr)
        .args(["--server-name", "localhost"])
        .start();
    let want = format!("localhost:{}", up.port());
    for seen in seen_from_both_app_protocols(proxy.addr(), &up).await {
        assert_eq!(seen.host(), Some(&*want), "{seen:?}");
    }
}

/// Port 443 is the default for https: no `:443` in the Host. Needs to bind 127.0.0.1:443.
#[tokio::test(flavor = "multi_thread")]
async fn host_has_no_port_for_443() {
    let pki = Pki::new();
    let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
    for alpn in BOTH {
        let up = match HttpUpstream::start_on(&pki, alpn, addr).await {
            Ok(up) => up,
            Err(e) => {
                eprintln!("SKIPPED: cannot bind 127.0.0.1:443 ({e})");
                return;
            }
        };
        let proxy = http_cmd(&pki, "localhost:443").start();
        for seen in seen_from_both_app_protocols(proxy.addr(), &up).await {
            assert_eq!(seen.version, alpn.version(), "{seen:?}");
            assert_eq!(seen.host(), Some("localhost"), "{alpn:?}: {seen:?}");
        }
    }
}

/// The proxy offers `h2` and `http/1.1`, speaks what the upstream picked, presents the client
/// certificate, and speaks HTTP/1.1 to an upstream that ignores ALPN.
async fn alpn_case(alpn: Alpn) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    for i in 0..3 {
        let id = format!("alpn-{i}");
        let reply = h1_call(
            proxy.addr(),
            h1_req("GET", "/")
                .header("x-request-id", &id)
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 200, "{alpn:?}: {reply:?}");
        assert_eq!(up.stats.request(&id).version, alpn.version(), "{alpn:?}");
    }
    let conns = up.stats.conns();
    let conn = &conns[0];
    assert!(
        conn.offered_alpn.iter().any(|p| p == "h2")
            && conn.offered_alpn.iter().any(|p| p == "http/1.1"),
        "the proxy must offer h2 and http/1.1; it offered {:?}",
        conn.offered_alpn
    );
    let agreed = match alpn {
        Alpn::H2AndHttp11 => Some("h2"),
        Alpn::Http11 => Some("http/1.1"),
        Alpn::None => None,
    };
    assert_eq!(conn.alpn.as_deref(), agreed, "{alpn:?}");
    assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN));
    assert_eq!(
        conn.client_serial.as_deref(),
        Some(&*pki.client.serial_hex())
    );
    assert_eq!(
        conns.len(),
        1,
        "{alpn:?}: three sequential requests, {} upstream connections",
        conns.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_upstream_is_spoken_to_in_h2() {
    alpn_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http11_only_upstream_is_spoken_to_in_http11() {
    alpn_case(Alpn::Http11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_without_alpn_is_spoken_to_in_http11() {
    alpn_case(Alpn::None).await;
}

/// An app speaking h2c with prior knowledge: several streams at once on one connection, bodies
/// both ways, towards either kind of upstream.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_prior_knowledge_from_the_app() {
    let pki = Pki::new();
    for alpn in BOTH {
        let up = HttpUpstream::start(&pki, alpn).await;
        let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
        let client = H2Client::connect(proxy.addr()).await;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..10u64 {
            let mut sender = client.sender.clone();
            tasks.spawn(async move {
                let data = pattern(300 + i, 50_000 + i as usize);
                let req = h2_req("POST", "/echo")
                    .header("x-request-id", format!("h2c-{i}"))
                    .body(full(data.clone()))
                    .unwrap();
                let resp = tokio::time::timeout(WAIT, sender.send_request(req))
                    .await
                    .expect("h2c response head in time")
                    .expect("h2c request");
                let reply = read_reply(resp).await;
                assert_eq!(reply.status, 200, "{reply:?}");
                assert_eq!(reply.version, Version::HTTP_2);
                assert!(reply.body == data, "stream {i}: echo altered");
            });
        }
        while let Some(res) = tasks.join_next().await {
            res.expect("h2c stream task");
        }
        for i in 0..10 {
            let seen = up.stats.request(&format!("h2c-{i}"));
            assert_eq!(seen.version, alpn.version(), "{alpn:?}: {seen:?}");
            assert_eq!(seen.method, "POST");
        }
    }
}

/// 20 MiB up (with a Content-Length) and 20 MiB down (chunked, streamed), SHA-256 intact.
async fn big_bodies_case(alpn: Alpn) {
    const LEN: usize = 20 << 20;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;

    let data = pattern(20, LEN);
    let want = format!("{LEN} {}\n", hex(&sha256(&data)));
    let resp = client
        .send(
            h1_req("POST", "/upload")
                .header(header::CONTENT_LENGTH, LEN)
                .body(full(data))
                .unwrap(),
        )
        .await;
    let reply = read_reply_within(resp, BIG_WAIT).await;
    assert_eq!(reply.status, 200, "{alpn:?}: {reply:?}");
    assert_eq!(reply.text(), want, "{alpn:?}: what the upstream received");

    let resp = client
        .send(
            h1_req("GET", &format!("/download?len={LEN}&seed=21"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get(header::TRANSFER_ENCODING)
            .and_then(|v| v.to_str().ok()),
        Some("chunked"),
        "{alpn:?}: a download of unknown length must reach the app chunked: {:?}",
        resp.headers()
    );
    let reply = read_reply_within(resp, BIG_WAIT).await;
    assert_eq!(reply.body.len(), LEN, "{alpn:?}: download length");
    assert_eq!(
        hex(&sha256(&reply.body)),
        hex(&sha256(&pattern(21, LEN))),
        "{alpn:?}: download altered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn big_bodies_keep_their_sha256_over_h2() {
    big_bodies_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn big_bodies_keep_their_sha256_over_http11() {
    big_bodies_case(Alpn::Http11).await;
}

/// h2 on both sides: flow control windows must be handed on, not just the first 64 KiB.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_app_bodies_keep_their_sha256() {
    const LEN: usize = 4 << 20;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H2Client::connect(proxy.addr()).await;
    let data = pattern(40, LEN);
    let resp = client
        .send(h2_req("POST", "/upload").body(full(data.clone())).unwrap())
        .await;
    let reply = read_reply_within(resp, BIG_WAIT).await;
    assert_eq!(reply.text(), format!("{LEN} {}\n", hex(&sha256(&data))));
    let resp = client
        .send(
            h2_req("GET", &format!("/download?len={LEN}&seed=41"))
                .body(empty())
                .unwrap(),
        )
        .await;
    let reply = read_reply_within(resp, BIG_WAIT).await;
    assert!(reply.body == pattern(41, LEN), "h2c download altered");
}

/// 24 concurrent 1 MiB downloads on one h2c app connection, read by the app: the bound on
/// what one app connection may hold (512 KiB, far less than the 24 MiB in flight) only paces
/// them; every byte arrives, towards an h2 and an HTTP/1.1 upstream.
async fn many_downloads_case(alpn: Alpn) {
    const LEN: usize = 1 << 20;
    const STREAMS: u64 = 24;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let client = H2Client::connect(proxy.addr()).await;
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..STREAMS {
        let mut client = client.clone();
        tasks.spawn(async move {
            let req = h2_req("GET", &format!("/download?len={LEN}&seed={seed}"))
                .body(empty())
                .unwrap();
            let resp = client.send(req).await;
            (seed, read_reply_within(resp, BIG_WAIT).await)
        });
    }
    while let Some(done) = tasks.join_next().await {
        let (seed, reply) = done.expect("download task");
        assert_eq!(reply.status, 200, "{alpn:?} stream {seed}");
        assert!(
            reply.body == pattern(seed, LEN),
            "{alpn:?} stream {seed}: download altered ({} bytes)",
            reply.body.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_h2c_downloads_at_once_complete_from_an_h2_upstream() {
    many_downloads_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_h2c_downloads_at_once_complete_from_an_http11_upstream() {
    many_downloads_case(Alpn::Http11).await;
}

/// An h2c app that abandons 16 large downloads after their heads (each stream reset with data
/// queued for it) can still download on the same connection: data dropped with a reset stream
/// gives its share of the connection's bound back.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_h2c_downloads_give_their_room_back() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H2Client::connect(proxy.addr()).await;
    for round in 0..2 {
        let mut heads = Vec::new();
        for i in 0..16 {
            let req = h2_req("GET", &format!("/download?len=4194304&seed={i}"))
                .body(empty())
                .unwrap();
            heads.push(client.send(req).await);
        }
        // Let data pile up for them, then reset them all.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(heads);
        let req = h2_req("GET", "/download?len=1048576&seed=7")
            .body(empty())
            .unwrap();
        let resp = client.send(req).await;
        let reply = read_reply_within(resp, BIG_WAIT).await;
        assert!(
            reply.body == pattern(7, 1 << 20),
            "round {round}: download after abandoned ones altered ({} bytes)",
            reply.body.len()
        );
    }
}

/// The first 64 KiB of a response reach the app while the upstream still holds the rest.
async fn response_streams_case(alpn: Alpn) {
    const LEN: usize = 1 << 20;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;
    let resp = client
        .send(
            h1_req("GET", &format!("/download?len={LEN}&seed=7&gate=1"))
                .body(empty())
                .unwrap(),
        )
        .await;
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < 64 * 1024 {
        let frame = tokio::time::timeout(WAIT, http_body_util::BodyExt::frame(&mut body))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{alpn:?}: only {} bytes of the response reached the app while the upstream \
                     held the rest: the proxy buffers responses",
                    got.len()
                )
            })
            .expect("a frame before the end")
            .expect("body frame");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    up.release();
    let rest = read_reply(hyper::Response::new(body)).await;
    got.extend_from_slice(&rest.body);
    assert!(
        got == pattern(7, LEN),
        "{alpn:?}: streamed response altered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn response_streams_to_the_app_over_h2() {
    response_streams_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn response_streams_to_the_app_over_http11() {
    response_streams_case(Alpn::Http11).await;
}

/// The first part of a chunked upload reaches the upstream before the app sends the rest.
async fn request_streams_case(alpn: Alpn) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;
    let (tx, body) = channel_body();
    let send = tokio::spawn({
        let req = h1_req("POST", "/upload").body(body).unwrap();
        async move { client.send(req).await }
    });
    let first = pattern(8, 100_000);
    let second = pattern(9, 100_000);
    tx.send(Ok(Frame::data(Bytes::from(first.clone()))))
        .await
        .expect("send the first part");
    eventually(
        &format!(
            "{alpn:?}: the first 100000 bytes of a chunked upload at the upstream while the app \
             holds the rest (the proxy buffers requests?)"
        ),
        WAIT,
        || up.stats.upload_bytes.load(Ordering::SeqCst) >= 100_000,
    )
    .await;
    tx.send(Ok(Frame::data(Bytes::from(second.clone()))))
        .await
        .expect("send the second part");
    drop(tx);
    let resp = send.await.expect("request task");
    let reply = read_reply(resp).await;
    let mut all = first;
    all.extend_from_slice(&second);
    assert_eq!(
        reply.text(),
        format!("200000 {}\n", hex(&sha256(&all))),
        "{alpn:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn request_streams_to_the_upstream_over_h2() {
    request_streams_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_streams_to_the_upstream_over_http11() {
    request_streams_case(Alpn::Http11).await;
}

fn assert_response_trailers(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {reply:?}");
    assert_eq!(reply.text(), TRAILERS_BODY, "{what}");
    let trailers = reply
        .trailers
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no trailers reached the app: {reply:?}"));
    assert_eq!(
        trailers.get("x-checksum").and_then(|v| v.to_str().ok()),
        Some(&*hex(&sha256(TRAILERS_BODY.as_bytes()))),
        "{what}: {trailers:?}"
    );
    assert_eq!(
        trailers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0"),
        "{what}: {trailers:?}"
    );
}

/// A request body with trailers, for `/upload`.
fn body_with_trailers(data: &'static [u8]) -> Body {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(data)))).await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-req-trailer", "from-the-app".parse().unwrap());
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    body
}

/// gRPC's shape: h2 upstream, h2c app, trailers both ways.
#[tokio::test(flavor = "multi_thread")]
async fn trailers_pass_between_h2_upstream_and_h2c_app() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H2Client::connect(proxy.addr()).await;

    let reply = client
        .call(
            h2_req("GET", "/trailers")
                .header(header::TE, "trailers")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_response_trailers(&reply, "h2 -> h2c response");

    let reply = client
        .call(
            h2_req("POST", "/upload")
                .header(header::TE, "trailers")
                .body(body_with_trailers(b"abc"))
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.text(),
        format!(
            "3 {}\ntrailer x-req-trailer=from-the-app\n",
            hex(&sha256(b"abc"))
        ),
        "request trailers at the h2 upstream"
    );
}

/// Chunked HTTP/1.1 on both sides: trailers declared with `Trailer`, asked for with
/// `TE: trailers` (which is end to end and must reach the upstream).
#[tokio::test(flavor = "multi_thread")]
async fn chunked_trailers_pass_over_http11() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;

    let reply = client
        .call(
            h1_req("GET", "/trailers")
                .header(header::TE, "trailers")
                .header("x-request-id", "trailers-get")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_response_trailers(&reply, "http/1.1 chunked response");
    let seen = up.stats.request("trailers-get");
    assert_eq!(seen.get("te"), Some("trailers"), "{seen:?}");

    let reply = client
        .call(
            h1_req("POST", "/upload")
                .header(header::TRAILER, "x-req-trailer")
                .body(body_with_trailers(b"abcdef"))
                .unwrap(),
        )
        .await;
    assert_eq!(
        reply.text(),
        format!(
            "6 {}\ntrailer x-req-trailer=from-the-app\n",
            hex(&sha256(b"abcdef"))
        ),
        "chunked request trailers at the http/1.1 upstream"
    );
}

/// The app waits for `100 Continue` before sending its body, as curl does.
async fn expect_continue_case(alpn: Alpn) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let body = pattern(50, 100_000);
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: {APP_HOST}\r\nContent-Length: {}\r\n\
                 Expect: 100-continue\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write head");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{alpn:?}: no `100 Continue` within {WAIT:?} (got {:?})",
                    String::from_utf8_lossy(&buf)
                )
            })
            .expect("read");
        assert!(n > 0, "{alpn:?}: closed before `100 Continue`");
        buf.extend_from_slice(&chunk[..n]);
    };
    let interim = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "{alpn:?}: expected `100 Continue` first, got {interim:?}"
    );
    buf.drain(..head_end + 4);
    stream.write_all(&body).await.expect("write body");
    let reply = read_raw_reply(&mut stream, &mut buf, WAIT).await;
    assert_eq!(reply.status, 200, "{alpn:?}: {reply:?}");
    assert_eq!(
        reply.text(),
        format!("100000 {}\n", hex(&sha256(&body))),
        "{alpn:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_over_h2() {
    expect_continue_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_over_http11() {
    expect_continue_case(Alpn::Http11).await;
}

/// A WebSocket-style upgrade: `101`, then bytes both ways (the upstream speaks first, then
/// echoes 256 KiB), then a clean end. Must go over an http/1.1 upstream connection even when
/// the upstream would speak h2.
async fn upgrade_case(alpn: Alpn) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {APP_HOST}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-request-id: ws\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write upgrade request");
    let mut buf = Vec::new();
    let reply = read_raw_reply(&mut stream, &mut buf, WAIT).await;
    assert_eq!(reply.status, 101, "{alpn:?}: {reply:?}");
    assert!(
        reply
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{alpn:?}: {reply:?}"
    );
    let seen = up.stats.request("ws");
    assert_eq!(seen.version, Version::HTTP_11, "{seen:?}");
    assert_eq!(
        seen.host(),
        Some(&*format!("localhost:{}", up.port())),
        "{alpn:?}: Host of the upgrade request: {seen:?}"
    );
    assert_eq!(
        up.stats.conn(seen.conn).alpn.as_deref(),
        if alpn == Alpn::None {
            None
        } else {
            Some("http/1.1")
        },
        "{alpn:?}: the upgrade must use an http/1.1 upstream connection"
    );

    // The upstream speaks first.
    while buf.len() < WS_WELCOME.len() {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the upstream's first bytes after 101")
            .expect("read");
        assert!(n > 0, "{alpn:?}: closed right after 101");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(&buf[..], WS_WELCOME, "{alpn:?}");
    let data = pattern(60, 256 * 1024);
    let echoed = exchange_on(stream, data.clone()).await;
    assert!(
        echoed == data,
        "{alpn:?}: tunnelled echo altered ({} of {} bytes back)",
        echoed.len(),
        data.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_echo_over_http11_upstream() {
    upgrade_case(Alpn::Http11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_uses_http11_to_an_h2_upstream() {
    upgrade_case(Alpn::H2AndHttp11).await;
}

/// Hop-by-hop headers stay on their hop, both ways; end-to-end ones pass, repeated ones in
/// order.
async fn hop_by_hop_case(alpn: Alpn) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: {APP_HOST}\r\n\
         Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: secret\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         TE: deflate\r\nX-Custom: one\r\nX-Custom: two\r\nAuthorization: Bearer end-to-end\r\n\
         User-Agent: hop-test/1\r\nCookie: a=b\r\nx-request-id: hop-1\r\n\
         Content-Length: 5\r\n\r\nhello"
    );
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: {APP_HOST}\r\nTransfer-Encoding: chunked\r\n\
         x-request-id: hop-2\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    );
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(format!("{request}{chunked}").as_bytes())
        .await
        .expect("write two pipelined requests");
    let mut buf = Vec::new();
    let first = read_raw_reply(&mut stream, &mut buf, WAIT).await;
    assert_eq!(first.status, 200, "{alpn:?}: {first:?}");
    assert_eq!(
        first.text(),
        format!("5 {}\n", hex(&sha256(b"hello"))),
        "{alpn:?}"
    );
    let second = read_raw_reply(&mut stream, &mut buf, WAIT).await;
    assert_eq!(second.status, 200, "{alpn:?}: {second:?}");
    assert_eq!(
        second.text(),
        format!("11 {}\n", hex(&sha256(b"hello world"))),
        "{alpn:?}: a chunked request body"
    );

    let seen = up.stats.request("hop-1");
    for name in [
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
    ] {
        assert!(
            seen.get(name).is_none(),
            "{alpn:?}: hop-by-hop {name} reached the upstream: {seen:?}"
        );
    }
    for value in seen.all("connection") {
        assert!(
            !value.to_ascii_lowercase().contains("x-drop-me"),
            "{alpn:?}: the app's Connection header reached the upstream: {seen:?}"
        );
    }
    for value in seen.all("te") {
        assert_eq!(
            value, "trailers",
            "{alpn:?}: TE other than trailers: {seen:?}"
        );
    }
    assert_eq!(seen.all("x-custom"), ["one", "two"], "{alpn:?}: {seen:?}");
    assert_eq!(
        seen.get("authorization"),
        Some("Bearer end-to-end"),
        "{seen:?}"
    );
    assert_eq!(seen.get("user-agent"), Some("hop-test/1"), "{seen:?}");
    assert_eq!(seen.get("cookie"), Some("a=b"), "{seen:?}");
    if alpn == Alpn::H2AndHttp11 {
        for id in ["hop-1", "hop-2"] {
            let seen = up.stats.request(id);
            assert!(
                seen.get("transfer-encoding").is_none(),
                "transfer-encoding over h2: {seen:?}"
            );
        }
    }

    // And the upstream's hop-by-hop response headers stay upstream.
    let reply = raw_call(
        proxy.addr(),
        format!("GET /resp-hop HTTP/1.1\r\nHost: {APP_HOST}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{alpn:?}: {reply:?}");
    assert_eq!(reply.header("x-resp-custom"), Some("kept"), "{reply:?}");
    for name in ["x-resp-drop", "keep-alive", "proxy-authenticate"] {
        assert!(
            reply.header(name).is_none(),
            "{alpn:?}: hop-by-hop response header {name} reached the app: {reply:?}"
        );
    }
    for value in reply.all("connection") {
        assert!(
            !value.to_ascii_lowercase().contains("x-resp-drop"),
            "{alpn:?}: the upstream's Connection header reached the app: {reply:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_stay_on_their_hop_over_h2() {
    hop_by_hop_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_stay_on_their_hop_over_http11() {
    hop_by_hop_case(Alpn::Http11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mode_from_the_environment() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = run_cmd(&pki, format!("localhost:{}", up.port()))
        .env("MTLS_SIDECAR_MODE", "http")
        .start();
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/")
            .header("x-request-id", "env")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = up.stats.request("env");
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(
        seen.host(),
        Some(&*format!("localhost:{}", up.port())),
        "{seen:?}"
    );
}

#[test]
fn bad_http_mode_flags_are_startup_errors() {
    let pki = Pki::new();
    let cases: [&[&str]; 5] = [
        &["--mode", "ftp"],
        &["--mode", "http", "--header-timeout", "soonish"],
        &["--mode", "http", "--pool-idle-timeout", "10 parsecs"],
        &["--mode", "http", "--pool-max-idle", "-1"],
        &["--mode", "http", "--pool-max-idle", "many"],
    ];
    for args in cases {
        let err = run_cmd(&pki, "127.0.0.1:9").args(args).startup_error();
        assert!(!err.trim().is_empty(), "{args:?}: no error message");
    }
    let err = run_cmd(&pki, "127.0.0.1:9")
        .env("MTLS_SIDECAR_MODE", "gopher")
        .startup_error();
    assert!(
        err.contains("gopher") || err.to_lowercase().contains("mode"),
        "MTLS_SIDECAR_MODE=gopher: {err}"
    );
}

/// The new flags take values in the same forms as the other ones.
#[tokio::test(flavor = "multi_thread")]
async fn http_mode_flags_are_accepted() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args([
            "--header-timeout",
            "3s",
            "--pool-idle-timeout",
            "1m",
            "--pool-max-idle",
            "8",
        ])
        .start();
    let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}
