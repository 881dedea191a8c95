//! Inbound routes in http mode: HTTP/1.1 and h2 clients (by ALPN) over mTLS, requests to the
//! plaintext target over pooled HTTP/1.1 connections carrying `X-Forwarded-Client-Cert` (the
//! exact Envoy value of the client's leaf, a forged one removed), `X-Forwarded-Proto` and
//! `X-Forwarded-For`; `Host` kept; a chunked request body and an 8 MiB response intact; 502 and
//! 504 when the target is down or does not answer the dial; a refused client never reaches the
//! target; `--proxy-protocol` refused in http mode.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{HeaderMap, Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::support::http::{
    Body, Reply, assert_reply_is_sidecar_error, channel_body, empty, full, read_reply_within,
};
use crate::support::inbound::inbound_http_cmd;
use crate::support::pki::{CLIENT_CN, Identity, LeafSpec};
use crate::support::*;

/// The response body of `GET /big`.
const BIG: usize = 8 * 1024 * 1024;

/// What the target saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A plaintext HTTP/1.1 target on 127.0.0.1 that records every request and answers it with its
/// own body (`/big`: [`BIG`] pattern bytes), counting the TCP connections it accepted.
struct Target {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Target {
    async fn start() -> Target {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let addr = l.local_addr().expect("target addr");
        let l = Arc::new(l);
        Target::serve(addr, move || {
            let l = l.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        })
        .await
    }

    /// A target on a unix socket at `path`.
    async fn start_unix(path: &std::path::Path) -> Target {
        let l = Arc::new(tokio::net::UnixListener::bind(path).expect("bind unix target"));
        let unused: SocketAddr = "0.0.0.0:0".parse().expect("addr");
        Target::serve(unused, move || {
            let l = l.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        })
        .await
    }

    async fn serve<S, F, A>(addr: SocketAddr, mut accept: A) -> Target
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: std::future::Future<Output = std::io::Result<S>> + Send,
        A: FnMut() -> F + Send + 'static,
    {
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (accepted.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok(s) = accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move { Ok::<_, std::io::Error>(answer(req, &log).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), service)
                        .with_upgrades(),
                );
            }
        });
        Target {
            addr,
            accepted,
            seen,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn answer(mut req: Request<Incoming>, log: &Mutex<Vec<Seen>>) -> Response<Body> {
    if req.uri().path() == "/ws" {
        // An upgrade: 101, then echo on the upgraded connection.
        let upgraded = hyper::upgrade::on(&mut req);
        log.lock().expect("seen").push(Seen {
            version: req.version(),
            path: "/ws".into(),
            headers: req.headers().clone(),
            body: Bytes::new(),
        });
        tokio::spawn(async move {
            if let Ok(u) = upgraded.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(u));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(empty());
        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("upgrade", "echo".parse().expect("value"));
        resp.headers_mut()
            .insert("connection", "upgrade".parse().expect("value"));
        return resp;
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    log.lock().expect("seen").push(Seen {
        version: parts.version,
        path: path.clone(),
        headers: parts.headers,
        body: body.clone(),
    });
    if path == "/big" {
        return Response::new(full(pattern(8, BIG)));
    }
    Response::new(full(body))
}

/// A client presenting `id` with ALPN `alpn`, over TLS to `addr`.
async fn tls(
    pki: &Pki,
    addr: SocketAddr,
    id: &Identity,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_after(pki, addr, id, alpn, Duration::ZERO).await
}

/// [`tls`], the handshake begun `delay` after the TCP connection.
async fn tls_after(
    pki: &Pki,
    addr: SocketAddr,
    id: &Identity,
    alpn: &[u8],
    delay: Duration,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    init_crypto();
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der.clone()).expect("add CA");
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(id.chain(), id.key_der())
        .expect("client cert");
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = connect(addr).await;
    tokio::time::sleep(delay).await;
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        WAIT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("handshake within the wait")
}

/// An HTTP/1.1 connection over mTLS.
async fn h1(
    pki: &Pki,
    addr: SocketAddr,
    id: &Identity,
) -> hyper::client::conn::http1::SendRequest<Body> {
    let s = tls(pki, addr, id, b"http/1.1").await.expect("handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An h2 connection over mTLS (ALPN `h2`).
async fn h2(
    pki: &Pki,
    addr: SocketAddr,
    id: &Identity,
) -> hyper::client::conn::http2::SendRequest<Body> {
    let s = tls(pki, addr, id, b"h2").await.expect("handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

async fn call1(
    sender: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: Request<Body>,
) -> Reply {
    let ready = tokio::time::timeout(WAIT, sender.ready()).await;
    assert!(
        matches!(ready, Ok(Ok(()))),
        "connection not ready: {ready:?}"
    );
    reply_of(sender.send_request(req)).await
}

async fn call2(
    mut sender: hyper::client::conn::http2::SendRequest<Body>,
    req: Request<Body>,
) -> Reply {
    let ready = tokio::time::timeout(WAIT, sender.ready()).await;
    assert!(
        matches!(ready, Ok(Ok(()))),
        "connection not ready: {ready:?}"
    );
    reply_of(sender.send_request(req)).await
}

/// The whole reply to a request sent, its head within [`WAIT`].
async fn reply_of(
    sent: impl std::future::Future<Output = hyper::Result<Response<Incoming>>>,
) -> Reply {
    let resp = tokio::time::timeout(WAIT, sent)
        .await
        .expect("a response head within the wait")
        .expect("response");
    read_reply_within(resp, http::BIG_WAIT).await
}

/// A request for `path` with `Host: host`.
fn get(path: &str, host: &str, body: Body) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("host", host)
        .body(body)
        .expect("request")
}

/// A client leaf with a URI and a DNS SAN.
fn web_client(pki: &Pki) -> Identity {
    let spec = LeafSpec {
        uris: &["spiffe://example.org/ns/shop/sa/web"],
        names: &["web.example"],
        ..LeafSpec::client("web")
    };
    pki.leaf(&pki.ca, "web", spec)
}

/// Envoy's value for [`web_client`]'s leaf.
fn web_xfcc(id: &Identity) -> String {
    format!(
        "Hash={};Subject=\"CN=web\";URI=spiffe://example.org/ns/shop/sa/web;DNS=web.example",
        hex(&sha256(&id.der))
    )
}

fn all<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_h1_request_carries_the_clients_identity_and_never_a_forged_one() {
    let pki = Pki::new();
    let target = Target::start().await;
    let web = web_client(&pki);
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-uri-san", "spiffe://example.org/ns/shop/*/web"])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &web).await;
    for i in 0..2 {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/app/{i}?q=1"))
            .header("host", "shop.internal:8080")
            .header("x-forwarded-client-cert", "Hash=forged;URI=spiffe://admin")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-forwarded-proto", "http")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "dropped")
            .body(full(format!("body {i}")))
            .expect("request");
        let reply = call1(&mut sender, req).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), format!("body {i}"));
    }
    drop(sender);
    let seen = target.seen();
    assert_eq!(seen.len(), 2);
    for (i, s) in seen.iter().enumerate() {
        let h = &s.headers;
        assert_eq!(all(h, "x-forwarded-client-cert"), [web_xfcc(&web)], "{h:?}");
        assert_eq!(all(h, "x-forwarded-proto"), ["https"], "{h:?}");
        assert_eq!(
            all(h, "x-forwarded-for"),
            ["203.0.113.9, 127.0.0.1"],
            "{h:?}"
        );
        assert_eq!(
            all(h, "host"),
            ["shop.internal:8080"],
            "Host is kept: {h:?}"
        );
        assert!(
            h.get("x-hop").is_none(),
            "a hop-by-hop header passed: {h:?}"
        );
        assert_eq!(s.path, format!("/app/{i}"));
        assert_eq!(s.body, format!("body {i}"));
    }
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(
        field(&line, "client_id"),
        Some("spiffe://example.org/ns/shop/sa/web"),
        "{line}"
    );
    assert_eq!(field(&line, "client"), Some("CN=web"), "{line}");
    assert_eq!(
        field(&line, "target"),
        Some(target.addr.to_string().as_str()),
        "{line}"
    );
    assert!(num_field(&line, "bytes_from_client") > 0, "{line}");
    assert!(num_field(&line, "bytes_to_client") > 0, "{line}");
    assert_eq!(target.accepted(), 1, "two requests, one pooled connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_streams_become_http1_requests_on_pooled_target_connections() {
    let pki = Pki::new();
    let target = Target::start().await;
    let web = web_client(&pki);
    let proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-dns-san", "web.example"])
        .start();
    let sender = h2(&pki, proxy.addr(), &web).await;
    // Concurrent streams of one connection: concurrent requests at the target.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..4 {
        let req = Request::builder()
            .method("PUT")
            .uri(format!("https://shop.internal/s/{i}"))
            .header("x-forwarded-client-cert", "forged")
            .body(full(format!("stream {i}")))
            .expect("request");
        calls.spawn(call2(sender.clone(), req));
    }
    while let Some(reply) = calls.join_next().await {
        let reply = reply.expect("call");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.version, Version::HTTP_2);
        assert!(reply.text().starts_with("stream "), "{reply:?}");
    }
    let seen = target.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        let h = &s.headers;
        assert_eq!(s.version, Version::HTTP_11);
        assert_eq!(
            all(h, "host"),
            ["shop.internal"],
            ":authority becomes Host: {h:?}"
        );
        assert_eq!(all(h, "x-forwarded-client-cert"), [web_xfcc(&web)], "{h:?}");
        assert_eq!(all(h, "x-forwarded-for"), ["127.0.0.1"], "{h:?}");
        assert_eq!(s.body, format!("stream {}", &s.path[3..]));
    }
    let after_streams = target.accepted();
    assert!(
        (1..=4).contains(&after_streams),
        "{after_streams} target connections for 4 streams"
    );
    // Later clients, each on a connection of its own, reuse the pooled target connections.
    for _ in 0..5 {
        let mut sender = h1(&pki, proxy.addr(), &web).await;
        let req = get("/again", "shop.internal", empty());
        assert_eq!(call1(&mut sender, req).await.status, 200);
    }
    assert_eq!(
        target.accepted(),
        after_streams,
        "sequential requests must reuse pooled target connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_request_body_and_a_large_response_arrive_intact() {
    let pki = Pki::new();
    let target = Target::start().await;
    let proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &pki.client).await;
    let (tx, body) = channel_body();
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "app")
        .body(body)
        .expect("request");
    let parts: Vec<Vec<u8>> = (0..20).map(|i| pattern(i, 10_000 + i as usize)).collect();
    let feed = {
        let parts = parts.clone();
        tokio::spawn(async move {
            for p in parts {
                tx.send(Ok(Frame::data(Bytes::from(p))))
                    .await
                    .expect("send a chunk");
            }
        })
    };
    let reply = call1(&mut sender, req).await;
    feed.await.expect("feed");
    assert_eq!(reply.status, 200);
    assert!(reply.body == parts.concat(), "the echoed body differs");
    let seen = target.seen();
    assert_eq!(seen[0].body, parts.concat(), "the target got another body");
    let req = get("/big", "app", empty());
    let reply = call1(&mut sender, req).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), BIG);
    assert!(reply.body == pattern(8, BIG), "the 8 MiB body differs");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_is_down_gets_502_and_one_that_does_not_answer_504() {
    let pki = Pki::new();
    // Down: a port nobody listens on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut proxy = inbound_http_cmd(&pki, down)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &pki.client).await;
    let req = get("/", "app", empty());
    let reply = call1(&mut sender, req).await;
    assert_reply_is_sidecar_error(&reply, 502, "target_refused");
    proxy.wait_for_line("a warn line with reason=target_refused", WAIT, |l| {
        l.contains("target request failed") && field(l, "reason") == Some("target_refused")
    });
    // Not answering: a listener whose backlog is full, so a dial's SYN gets no answer.
    let full_backlog = TcpSocket::new_v4().expect("socket");
    full_backlog
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = full_backlog.local_addr().expect("addr");
    let _l = full_backlog.listen(1).expect("listen");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = TcpSocket::new_v4().expect("socket");
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(300), s.connect(addr)).await {
            fillers.push(c);
        }
    }
    let mut proxy = inbound_http_cmd(&pki, addr)
        .args(["--verify-cn", CLIENT_CN, "--connect-timeout", "500ms"])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &pki.client).await;
    let req = get("/", "app", empty());
    let reply = call1(&mut sender, req).await;
    assert_reply_is_sidecar_error(&reply, 504, "target_timeout");
    proxy.wait_for_line("a warn line with reason=target_timeout", WAIT, |l| {
        l.contains("target request failed") && field(l, "reason") == Some("target_timeout")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_client_never_reaches_the_target() {
    let pki = Pki::new();
    let target = Target::start().await;
    let intruder = pki.leaf(&pki.ca, "intruder", LeafSpec::client("intruder"));
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    // TLS 1.3: the client's handshake completes before the server judges its certificate.
    if let Ok(s) = tls(&pki, proxy.addr(), &intruder, b"http/1.1").await
        && let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(s)).await
    {
        tokio::spawn(conn);
        let req = get("/", "app", empty());
        let r = tokio::time::timeout(WAIT, sender.send_request(req)).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "a refused client got an answer: {r:?}"
        );
    }
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some("not_allowed"), "{line}");
    assert_eq!(target.accepted(), 0, "the target saw a refused client");
}

#[test]
fn proxy_protocol_and_alpn_are_refused_in_http_mode() {
    let pki = Pki::new();
    for (extra, flag) in [
        (["--proxy-protocol", "v2"], "--proxy-protocol"),
        (["--alpn", "h2"], "--alpn"),
    ] {
        let err = inbound_http_cmd(&pki, "127.0.0.1:9")
            .args(["--verify-cn", CLIENT_CN])
            .args(extra)
            .startup_error();
        assert!(err.contains(flag), "{extra:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_reaches_the_target_with_the_identity_and_bytes_flow_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let target = Target::start().await;
    let web = web_client(&pki);
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-uri-san", "spiffe://example.org/ns/shop/sa/web"])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &web).await;
    let req = Request::builder()
        .uri("/ws")
        .header("host", "shop.internal")
        .header("upgrade", "echo")
        .header("connection", "upgrade")
        .header("x-forwarded-client-cert", "forged")
        .body(empty())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("a 101 within the wait")
        .expect("response");
    assert_eq!(resp.status(), 101);
    let upgraded = tokio::time::timeout(WAIT, hyper::upgrade::on(resp))
        .await
        .expect("upgrade within the wait")
        .expect("upgraded");
    let mut io = TokioIo::new(upgraded);
    let data = pattern(3, 100_000);
    io.write_all(&data).await.expect("write");
    let mut got = vec![0u8; data.len()];
    tokio::time::timeout(WAIT, io.read_exact(&mut got))
        .await
        .expect("echo within the wait")
        .expect("read");
    assert!(got == data, "the tunnel altered the bytes");
    let seen = target.seen();
    let h = &seen[0].headers;
    assert_eq!(all(h, "x-forwarded-client-cert"), [web_xfcc(&web)], "{h:?}");
    assert_eq!(all(h, "host"), ["shop.internal"], "{h:?}");
    assert_eq!(all(h, "upgrade"), ["echo"], "{h:?}");
    drop(io);
    let line = proxy.wait_conn_lines(1).remove(0);
    assert!(
        num_field(&line, "bytes_from_client") >= data.len() as u64,
        "tunnel bytes are the client's: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unix_target_gets_the_requests() {
    let pki = Pki::new();
    let sock = pki.path("app.sock");
    let target = Target::start_unix(&sock).await;
    let proxy = inbound_http_cmd(&pki, format!("unix:{}", sock.display()))
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let mut sender = h1(&pki, proxy.addr(), &pki.client).await;
    for _ in 0..3 {
        let req = get("/unix", "app.local", full("hello"));
        let reply = call1(&mut sender, req).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "hello");
    }
    let seen = target.seen();
    assert_eq!(all(&seen[0].headers, "host"), ["app.local"]);
    assert_eq!(target.accepted(), 1, "one pooled unix connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_header_timeout_counts_from_accept() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let target = Target::start().await;
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN, "--header-timeout", "2s"])
        .start();
    let started = std::time::Instant::now();
    // A slow handshake (within --handshake-timeout) uses up part of the head's time.
    let slow = Duration::from_millis(1500);
    let mut s = tls_after(&pki, proxy.addr(), &pki.client, b"http/1.1", slow)
        .await
        .expect("handshake");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
    let took = started.elapsed();
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client was not closed: {n:?}"
    );
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    // Counted from the handshake's end it would be 3.5 s.
    assert!(
        took < Duration::from_millis(3200),
        "closed only after {took:?}: --header-timeout 2s counts from accept"
    );
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some("timeout"), "{line}");
    assert_eq!(target.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_new_handshakes_and_leaves_open_connections_serving() {
    let pki = Pki::new();
    let target = Target::start().await;
    let ca = pki.path("live-ca.pem");
    std::fs::copy(&pki.ca.pem, &ca).expect("copy");
    let mut proxy = Cmd::new()
        .args([
            "run",
            "--inbound",
            "--mode",
            "http",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--target")
        .arg(target.addr.to_string())
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&ca)
        .args(["--allow-any-client", "--reload-interval", "0"])
        .start();
    let open = h2(&pki, proxy.addr(), &pki.client).await;
    let before = call2(open.clone(), get("https://app/one", "app", empty())).await;
    assert_eq!(before.status, 200);
    // The client's CA is no longer trusted for new handshakes.
    let other = pki.other_ca();
    crate::support::files::atomic_copy(&other.pem, &ca);
    proxy.signal("HUP");
    proxy.wait_for_line("the reload line", WAIT, |l| l.contains("identity reloaded"));
    let refused = async {
        let mut s = tls(&pki, proxy.addr(), &pki.client, b"h2").await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        s.read(&mut buf).await
    };
    let r = tokio::time::timeout(WAIT, refused).await.expect("in time");
    assert!(
        r.is_err(),
        "a client of the old CA got in after the reload: {r:?}"
    );
    proxy.wait_for_line("the refusal", WAIT, |l| {
        field(l, "reason") == Some("unknown_ca")
    });
    let after = call2(open.clone(), get("https://app/two", "app", empty())).await;
    assert_eq!(after.status, 200, "the open connection still serves");
    assert_eq!(target.seen().len(), 2);
}
