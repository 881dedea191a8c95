//! `--access-log request|connection|off`: one line per finished request in http mode (h1 and
//! h2c apps, h1 and h2 upstreams), pooled-connection reuse seen through `upstream_conn`, no
//! query string and no header value in the log, the proxy's own 502 with its `reason`, JSON
//! lines, escaped network strings, `off`, and `request` on a tcp-mode route.

use serde_json::Value;

use crate::support::http::*;
use crate::support::*;

/// Whether a text stderr line is a request line (`--access-log request`).
pub fn is_request_line(line: &str) -> bool {
    line.contains(" request ")
        && field(line, "upstream_conn").is_some()
        && field(line, "protocol").is_some()
}

/// Waits (bounded) until `n` request lines were written; returns them in order.
pub fn request_lines(proxy: &mut Sidecar, n: usize) -> Vec<String> {
    tokio::task::block_in_place(|| proxy.wait_for_lines("request lines", n, WAIT, is_request_line))
}

fn request_cmd(pki: &Pki, port: u16) -> Cmd {
    http_cmd(pki, format!("localhost:{port}")).args(["--access-log", "request"])
}

const SECRETS: [&str; 3] = [
    "s3cr3t-authz-canary",
    "s3cr3t-custom-canary",
    "s3cr3t-query-canary",
];

/// A request carrying a secret in `Authorization`, in a custom header and in its query.
fn secret_get(path: &str) -> hyper::Request<Body> {
    h1_req("GET", &format!("{path}?token={}", SECRETS[2]))
        .header("authorization", format!("Bearer {}", SECRETS[0]))
        .header("x-api-key", SECRETS[1])
        .body(empty())
        .unwrap()
}

fn assert_no_secret(proxy: &Sidecar) {
    let text = proxy.stderr();
    for s in SECRETS {
        assert!(!text.contains(s), "{s} reached the log:\n{text}");
    }
}

/// HTTP/1.1 app, HTTP/1.1 upstream: one line per request with every field; two keep-alive
/// requests share the pooled connection's id, and after the upstream closed it the next
/// request names a new one. No query string and no header value reaches the log.
#[tokio::test(flavor = "multi_thread")]
async fn h1_request_lines_show_fields_and_pool_reuse() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = request_cmd(&pki, up.port())
        .args(["--log-level", "debug"])
        .start();
    let mut app = H1Client::connect(proxy.addr()).await;
    assert_eq!(app.call(secret_get("/first")).await.status, 200);
    let body = vec![b'x'; 1000];
    let upload = h1_req("POST", "/upload").body(full(body)).unwrap();
    let reply = app.call(upload).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let lines = request_lines(&mut proxy, 2);
    let (first, second) = (&lines[0], &lines[1]);
    assert_eq!(field(first, "route"), Some("default"), "{first}");
    assert!(field(first, "peer").is_some_and(|p| p.starts_with("127.0.0.1:")));
    assert_eq!(field(first, "method"), Some("GET"), "{first}");
    assert_eq!(field(first, "authority"), Some(APP_HOST), "{first}");
    assert_eq!(field(first, "path"), Some("/first"), "{first}");
    assert_eq!(num_field(first, "status"), 200);
    assert_eq!(num_field(first, "bytes_in"), 0);
    assert_eq!(num_field(first, "bytes_out"), 3, "`ok\\n`: {first}");
    assert!(field(first, "duration_ms").is_some_and(|d| d.parse::<f64>().is_ok()));
    assert_eq!(field(first, "protocol"), Some("h1>h1"), "{first}");
    assert_eq!(field(first, "reason"), None, "{first}");
    assert_eq!(field(second, "method"), Some("POST"), "{second}");
    assert_eq!(num_field(second, "bytes_in"), 1000, "{second}");
    assert_eq!(num_field(second, "bytes_out"), reply.body.len() as u64);
    let id = field(first, "upstream_conn").unwrap().to_string();
    assert!(id.parse::<u64>().is_ok(), "{first}");
    assert_eq!(field(second, "upstream_conn"), Some(id.as_str()), "reuse");
    assert_eq!(up.stats.tls_accepted(), 1);

    // The upstream closes its connection: the next request goes on a new one, with a new id.
    up.drop_connections();
    up.stats.wait_closed(0, WAIT).await;
    assert_eq!(app.call(secret_get("/third")).await.status, 200);
    let third = request_lines(&mut proxy, 3)[2].clone();
    assert_eq!(field(&third, "path"), Some("/third"));
    let new_id = field(&third, "upstream_conn").unwrap();
    assert!(new_id != id && new_id != "-", "{third}");
    // The connection line is still written in request mode.
    drop(app);
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the app connection's line", WAIT, |l| {
            l.contains("app connection closed")
        })
    });
    assert_no_secret(&proxy);
}

/// An h2c app to an h2 upstream: `h2>h2`, one id for the app connection's requests (its lane,
/// a connection of its own); an HTTP/1.1 app to the same upstream: `h1>h2` on the shared pool.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_and_h1_apps_to_an_h2_upstream() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = request_cmd(&pki, up.port()).start();
    // The first request teaches the route that the upstream speaks h2.
    let reply = h1_call(proxy.addr(), h1_req("GET", "/h1").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    let first = request_lines(&mut proxy, 1).remove(0);
    assert_eq!(field(&first, "protocol"), Some("h1>h2"), "{first}");
    let mut app = H2Client::connect(proxy.addr()).await;
    for path in ["/a", "/b"] {
        let reply = app.call(h2_req("GET", path).body(empty()).unwrap()).await;
        assert_eq!(reply.status, 200);
    }
    let lines = request_lines(&mut proxy, 3);
    for l in &lines[1..] {
        assert_eq!(field(l, "protocol"), Some("h2>h2"), "{l}");
        assert_eq!(field(l, "authority"), Some(APP_HOST), "{l}");
        assert_eq!(num_field(l, "status"), 200);
    }
    assert_eq!(field(&lines[1], "path"), Some("/a"));
    assert_eq!(field(&lines[2], "path"), Some("/b"));
    let lane = field(&lines[1], "upstream_conn");
    assert_eq!(lane, field(&lines[2], "upstream_conn"), "{lines:#?}");
    assert_ne!(lane, field(&first, "upstream_conn"), "{lines:#?}");
}

/// The proxy's own 502 (nothing listens upstream): `reason`, no upstream connection, `h1>-`.
#[tokio::test(flavor = "multi_thread")]
async fn own_502_carries_its_reason() {
    let pki = Pki::new();
    let port = free_port();
    let mut proxy = request_cmd(&pki, port).start();
    let reply = h1_call(proxy.addr(), h1_req("GET", "/x").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let line = request_lines(&mut proxy, 1).remove(0);
    assert_eq!(num_field(&line, "status"), 502, "{line}");
    assert_eq!(field(&line, "reason"), Some("refused"), "{line}");
    assert_eq!(field(&line, "upstream_conn"), Some("-"), "{line}");
    assert_eq!(field(&line, "protocol"), Some("h1>-"), "{line}");
    assert_eq!(num_field(&line, "bytes_out"), reply.body.len() as u64);
}

/// `--log-format json`: each request line is one JSON object with every field.
#[tokio::test(flavor = "multi_thread")]
async fn json_request_lines_parse() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = request_cmd(&pki, up.port())
        .args(["--log-format", "json"])
        .spawn();
    let listening = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the listening line", WAIT, |l| l.contains("\"listening\""))
    });
    let v: Value = serde_json::from_str(&listening).expect("listening line is JSON");
    let addr: std::net::SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
    let reply = h1_call(addr, secret_get("/j\"son")).await;
    assert_eq!(reply.status, 200);
    let line = tokio::task::block_in_place(|| {
        proxy.wait_for_line("a JSON request line", WAIT, |l| {
            l.contains("\"message\":\"request\"")
        })
    });
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["route"], "default");
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(v["method"], "GET");
    assert_eq!(v["authority"], APP_HOST);
    assert_eq!(v["path"], "/j\"son", "{line}");
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes_in"], 0);
    assert_eq!(v["bytes_out"], 3);
    assert!(v["duration_ms"].as_f64().is_some(), "{line}");
    assert!(v["upstream_conn"].as_str().unwrap().parse::<u64>().is_ok());
    assert_eq!(v["protocol"], "h1>h1");
    assert!(v.get("reason").is_none(), "{line}");
    for l in proxy.stderr_lines() {
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
    assert_no_secret(&proxy);
}

/// Quotes, backslashes and a bidirectional override in the path; a tab, a quote and
/// non-UTF-8 bytes in `Host`: escaped in the line, never written raw.
#[tokio::test(flavor = "multi_thread")]
async fn network_strings_are_escaped() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = request_cmd(&pki, up.port()).start();
    let mut raw = b"GET /q\"u\\o\xe2\x80\xaete HTTP/1.1\r\nHost: ev\til\"\xff\r\n".to_vec();
    raw.extend_from_slice(b"Connection: close\r\n\r\n");
    let reply = raw_call(proxy.addr(), &raw).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let line = request_lines(&mut proxy, 1).remove(0);
    assert!(
        !line.contains('\u{202e}') && !line.contains('\t'),
        "{line:?}"
    );
    assert_eq!(
        field(&line, "path"),
        Some(r#"/q\"u\\o\\u{202e}te"#),
        "{line}"
    );
    assert_eq!(field(&line, "authority"), Some(r#"ev\\til\"�"#), "{line}");
}

/// A path longer than the cap is cut and marked.
#[tokio::test(flavor = "multi_thread")]
async fn long_paths_are_capped() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = request_cmd(&pki, up.port()).start();
    let path = format!("/{}", "p".repeat(4000));
    let reply = h1_call(proxy.addr(), h1_req("GET", &path).body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    let line = request_lines(&mut proxy, 1).remove(0);
    let logged = field(&line, "path").unwrap();
    assert!(logged.len() < 600 && logged.ends_with('…'), "{line}");
}

/// Stops a sidecar with SIGTERM and waits until everything it wrote has been read.
fn stop(proxy: &mut Sidecar) {
    tokio::task::block_in_place(|| {
        proxy.signal("TERM");
        proxy.wait_exit(WAIT);
        proxy.wait_output_closed();
    });
}

/// Access lines of any kind: connection, request, http app connection.
fn access_lines(proxy: &Sidecar) -> usize {
    proxy.count_lines(|l| {
        is_conn_line(l) || is_request_line(l) || l.contains("app connection closed")
    })
}

/// `off`: no connection and no request lines in http mode; in tcp mode a good connection
/// logs nothing and a failed one still logs its warn line.
#[tokio::test(flavor = "multi_thread")]
async fn off_silences_access_lines_but_not_failures() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--access-log", "off"])
        .start();
    for _ in 0..3 {
        let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status, 200);
    }
    stop(&mut proxy);
    assert_eq!(access_lines(&proxy), 0, "{}", proxy.stderr());

    let echo = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut tcp = run_cmd(&pki, format!("localhost:{}", echo.port()))
        .args(["--access-log", "off"])
        .start();
    assert_eq!(exchange(tcp.addr(), b"ping".to_vec()).await, b"ping");
    stop(&mut tcp);
    assert_eq!(access_lines(&tcp), 0, "{}", tcp.stderr());

    let mut failing = run_cmd(&pki, format!("localhost:{}", free_port()))
        .args(["--access-log", "off"])
        .start();
    let mut s = connect(failing.addr()).await;
    let _ = read_until_closed(&mut s, WAIT).await;
    let warn = tokio::task::block_in_place(|| failing.wait_conn_lines(1).remove(0));
    assert!(warn.contains("WARN"), "{warn}");
    assert_eq!(field(&warn, "reason"), Some("refused"), "{warn}");
}

/// `request` on a tcp-mode route is `connection`: the connection line, no request line.
#[tokio::test(flavor = "multi_thread")]
async fn request_mode_in_tcp_mode_logs_connections() {
    let pki = Pki::new();
    let echo = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, format!("localhost:{}", echo.port()))
        .args(["--access-log", "request"])
        .start();
    assert_eq!(exchange(proxy.addr(), b"ping".to_vec()).await, b"ping");
    let line = tokio::task::block_in_place(|| proxy.wait_conn_lines(1).remove(0));
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    stop(&mut proxy);
    assert_eq!(proxy.count_lines(is_request_line), 0);
}

/// An app that goes away before its answer: a line with status 0 and `reason=cancelled`.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_app_abandons_is_logged_as_cancelled() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let mut proxy = request_cmd(&pki, up.port()).start();
    let mut app = connect(proxy.addr()).await;
    let head = format!("GET /hold HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut app, head.as_bytes())
        .await
        .expect("write");
    up.stats.wait_requests(1).await;
    drop(app);
    let line = request_lines(&mut proxy, 1).remove(0);
    assert_eq!(num_field(&line, "status"), 0, "{line}");
    assert_eq!(field(&line, "reason"), Some("cancelled"), "{line}");
    assert_eq!(field(&line, "path"), Some("/hold"), "{line}");
}
