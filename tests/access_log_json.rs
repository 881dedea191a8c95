//! `--access-log request --log-format json`: the request line our code formats itself is one
//! valid JSON object with escaped network strings, the connection's span objects as tracing
//! writes them on the other lines, its place before the connection's line, and the level
//! filter applied to it.

use serde_json::Value;

use crate::support::http::*;
use crate::support::*;

fn json_cmd(pki: &Pki, port: u16) -> Cmd {
    http_cmd(pki, format!("localhost:{port}")).args([
        "--access-log",
        "request",
        "--log-format",
        "json",
    ])
}

/// Spawns the sidecar and waits for its JSON `listening` line; returns it with the address.
fn start_json(cmd: Cmd) -> (Sidecar, std::net::SocketAddr) {
    let mut proxy = cmd.spawn();
    let listening = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the listening line", WAIT, |l| l.contains("\"listening\""))
    });
    let v: Value = serde_json::from_str(&listening).expect("listening line is JSON");
    let addr = v["addr"].as_str().unwrap().parse().unwrap();
    (proxy, addr)
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Quotes, backslashes and a bidirectional override in the path; a tab, a quote and
/// non-UTF-8 bytes in `Host`: valid JSON, escaped as in the text line, never raw. The span
/// objects are those of the connection's other lines, and the line comes before its
/// connection's line.
#[tokio::test(flavor = "multi_thread")]
async fn json_request_line_escapes_and_carries_the_span() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let (mut proxy, addr) = start_json(json_cmd(&pki, up.port()));
    let mut raw = b"GET /q\"u\\o\xe2\x80\xaete HTTP/1.1\r\nHost: ev\til\"\xff\r\n".to_vec();
    raw.extend_from_slice(b"Connection: close\r\n\r\n");
    let reply = raw_call(addr, &raw).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let closed = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the app connection's line", WAIT, |l| {
            l.contains("app connection closed")
        })
    });
    let lines = proxy.stderr_lines();
    let at = lines
        .iter()
        .position(|l| l.contains("\"message\":\"request\""))
        .unwrap_or_else(|| panic!("no request line: {lines:#?}"));
    let line = &lines[at];
    let closed_at = lines.iter().position(|l| *l == closed).unwrap();
    assert!(at < closed_at, "order: {lines:#?}");
    assert!(
        !line.contains('\u{202e}') && !line.contains('\t'),
        "{line:?}"
    );
    let v = parse(line);
    assert_eq!(v["path"], "/q\"u\\o\\u{202e}te", "{line}");
    assert_eq!(v["authority"], "ev\\til\"\u{fffd}", "{line}");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["status"], 200);
    assert!(v["duration_ms"].as_f64().is_some(), "{line}");
    let ts = v["timestamp"].as_str().unwrap();
    let c = parse(&closed);
    assert_eq!(ts.len(), c["timestamp"].as_str().unwrap().len(), "{line}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{line}");
    assert_eq!(v["span"]["name"], "conn", "{line}");
    assert!(v["span"]["conn_id"].as_u64().is_some(), "{line}");
    assert_eq!(v["span"], c["span"], "{line}\n{closed}");
    assert_eq!(v["spans"], c["spans"], "{line}\n{closed}");
    for l in proxy.stderr_lines() {
        parse(&l);
    }
}

/// With info filtered out for request lines (`RUST_LOG=mtls_sidecar::access=warn`), no
/// request line is written, while the connection's line still is.
#[tokio::test(flavor = "multi_thread")]
async fn json_request_line_obeys_the_level_filter() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let cmd = json_cmd(&pki, up.port()).env("RUST_LOG", "mtls_sidecar::access=warn");
    let (mut proxy, addr) = start_json(cmd);
    let reply = h1_call(addr, h1_req("GET", "/f").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the app connection's line", WAIT, |l| {
            l.contains("app connection closed")
        });
        proxy.signal("TERM");
        proxy.wait_exit(WAIT);
        proxy.wait_output_closed();
    });
    let text = proxy.stderr();
    assert!(!text.contains("\"message\":\"request\""), "{text}");
}
