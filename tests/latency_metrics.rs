//! `http_request_duration_seconds` (http mode, both directions) and
//! `connection_duration_seconds` (tcp mode): counts that match the requests and connections
//! made, a slow answer or connection in a bucket above 250 ms, both families listed whatever
//! the mode. Also the request lines of an inbound http route (h1 and h2 clients).

use std::time::Duration;

use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::access_log_request::{is_request_line, request_lines};
use crate::support::admin::{Metrics, admin_addr, scrape_until};
use crate::support::http::*;
use crate::support::inbound::{client_config_alpn, inbound_http_cmd, tls_connect};
use crate::support::*;

const REQ: &str = "mtls_sidecar_http_request_duration_seconds";
const CONN: &str = "mtls_sidecar_connection_duration_seconds";

fn count(m: &Metrics, family: &str) -> f64 {
    m.count(&format!("{family}_count"), &[("route", "default")])
}

fn bucket(m: &Metrics, family: &str, le: &str) -> f64 {
    m.value(
        &format!("{family}_bucket"),
        &[("route", "default"), ("le", le)],
    )
}

/// Three quick requests and one answered after at least 300 ms: four observations, the slow
/// one above the 0.25 bucket (the quick ones below it, the first of them, which dials, aside).
#[tokio::test(flavor = "multi_thread")]
async fn request_durations_count_every_answer_and_a_slow_one_lands_high() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let m = scrape_until(admin, |m| m.type_of(REQ).is_some()).await;
    assert_eq!(m.type_of(REQ), Some("histogram"), "{}", m.text);
    assert_eq!(m.type_of(CONN), Some("histogram"), "{}", m.text);
    assert_eq!(count(&m, REQ), 0.0, "{}", m.text);
    assert_eq!(
        m.get(&format!("{CONN}_count"), &[("route", "default")]),
        None
    );

    let mut app = H1Client::connect(proxy.addr()).await;
    for _ in 0..3 {
        let reply = app.call(h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status, 200);
    }
    let addr = proxy.addr();
    let slow =
        tokio::spawn(
            async move { h1_call(addr, h1_req("GET", "/hold").body(empty()).unwrap()).await },
        );
    up.stats.wait_requests(4).await;
    // Held long enough to land above 2.5 s, where no fast request lands even when its dial
    // (a debug build's handshake on a loaded machine) took half a second.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    up.release();
    assert_eq!(slow.await.expect("slow request").status, 200);

    let m = scrape_until(admin, |m| count(m, REQ) >= 4.0).await;
    assert_eq!(count(&m, REQ), 4.0, "{}", m.text);
    assert_eq!(bucket(&m, REQ, "+Inf"), 4.0, "{}", m.text);
    assert_eq!(
        bucket(&m, REQ, "2.5"),
        3.0,
        "the slow one is above: {}",
        m.text
    );
    assert_eq!(bucket(&m, REQ, "60.0"), 4.0, "{}", m.text);
    assert!(bucket(&m, REQ, "0.001") <= 3.0);
    assert!(m.value(&format!("{REQ}_sum"), &[("route", "default")]) >= 2.6);
}

/// The proxy's own 502 is observed too (request head to our answer's head).
#[tokio::test(flavor = "multi_thread")]
async fn own_answers_are_observed() {
    let pki = Pki::new();
    let mut proxy = http_cmd(&pki, format!("localhost:{}", free_port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for _ in 0..2 {
        let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status, 502);
    }
    let m = scrape_until(admin, |m| count(m, REQ) >= 2.0).await;
    assert_eq!(count(&m, REQ), 2.0, "{}", m.text);
}

/// tcp mode: one observation per connection when it ends; one held 300 ms lands above the
/// 0.25 bucket (quick ones below it, the first, which warms up the process, aside). The http
/// family is listed, with no series.
#[tokio::test(flavor = "multi_thread")]
async fn connection_durations_in_tcp_mode() {
    let pki = Pki::new();
    let echo = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, format!("localhost:{}", echo.port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for _ in 0..3 {
        assert_eq!(exchange(proxy.addr(), b"ping".to_vec()).await, b"ping");
    }
    let mut held = connect(proxy.addr()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    use tokio::io::AsyncWriteExt;
    held.shutdown().await.expect("half-close");
    let _ = read_until_closed(&mut held, WAIT).await;

    let m = scrape_until(admin, |m| count(m, CONN) >= 4.0).await;
    assert_eq!(count(&m, CONN), 4.0, "{}", m.text);
    let (quick, all) = (bucket(&m, CONN, "0.25"), bucket(&m, CONN, "+Inf"));
    assert_eq!(all, 4.0, "{}", m.text);
    assert!(
        quick >= 2.0 && all - quick >= 1.0,
        "the held one is above: {}",
        m.text
    );
    assert_eq!(m.type_of(REQ), Some("histogram"), "{}", m.text);
    assert_eq!(
        m.get(&format!("{REQ}_count"), &[("route", "default")]),
        None
    );
}

/// An inbound http route: a request line per request of an h1 and an h2 client (`h1>h1`,
/// `h2>h1`), reuse of the pooled target connection, and the histogram.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_http_request_lines_and_durations() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--allow-any-client", "--access-log", "request"])
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);

    let s = tls_connect(
        proxy.addr(),
        client_config_alpn(&pki, Some(&pki.client), &[b"http/1.1"]),
    )
    .await
    .expect("h1 handshake");
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    for path in ["/one?q=hidden", "/two"] {
        let req = Request::get(path)
            .header("host", "svc.local")
            .body(empty())
            .unwrap();
        let ready = tokio::time::timeout(WAIT, h1.ready()).await;
        assert!(matches!(ready, Ok(Ok(()))), "not ready: {ready:?}");
        let resp = tokio::time::timeout(WAIT, h1.send_request(req))
            .await
            .expect("head")
            .expect("response");
        assert_eq!(read_reply(resp).await.status, 200);
    }
    let s = tls_connect(
        proxy.addr(),
        client_config_alpn(&pki, Some(&pki.client), &[b"h2"]),
    )
    .await
    .expect("h2 handshake");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get("https://svc.local/three")
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, h2.send_request(req))
        .await
        .expect("head")
        .expect("response");
    assert_eq!(read_reply(resp).await.status, 200);

    let lines = request_lines(&mut proxy, 3);
    assert_eq!(field(&lines[0], "path"), Some("/one"), "{lines:#?}");
    assert_eq!(field(&lines[1], "path"), Some("/two"));
    assert_eq!(field(&lines[2], "path"), Some("/three"));
    for l in &lines {
        assert_eq!(field(l, "authority"), Some("svc.local"), "{l}");
        assert_eq!(num_field(l, "status"), 200, "{l}");
        assert_eq!(field(l, "reason"), None, "{l}");
    }
    assert_eq!(field(&lines[0], "protocol"), Some("h1>h1"));
    assert_eq!(field(&lines[2], "protocol"), Some("h2>h1"));
    assert_eq!(
        field(&lines[0], "upstream_conn"),
        field(&lines[1], "upstream_conn")
    );
    assert!(!proxy.stderr().contains("hidden"));
    assert_eq!(proxy.count_lines(is_request_line), 3);

    let m = scrape_until(admin, |m| count(m, REQ) >= 3.0).await;
    assert_eq!(count(&m, REQ), 3.0, "{}", m.text);
}

/// An inbound tcp-mode route observes its client connections too.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_tcp_connections_are_observed() {
    use crate::support::inbound::{EchoTarget, inbound_cmd};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let target = EchoTarget::start().await;
    let mut proxy = inbound_cmd(&pki, target.addr)
        .args(["--allow-any-client", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for _ in 0..2 {
        let config = client_config_alpn(&pki, Some(&pki.client), &[]);
        let mut s = tls_connect(proxy.addr(), config).await.expect("handshake");
        s.write_all(b"ping").await.expect("write");
        s.shutdown().await.expect("close_notify");
        let mut got = Vec::new();
        let read = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
        assert!(matches!(read, Ok(Ok(_))), "{read:?}");
        assert_eq!(got, b"ping");
    }
    let m = scrape_until(admin, |m| count(m, CONN) >= 2.0).await;
    assert_eq!(count(&m, CONN), 2.0, "{}", m.text);
    assert_eq!(
        m.get(&format!("{REQ}_count"), &[("route", "default")]),
        None
    );
}
