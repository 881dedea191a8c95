//! `demo` both ways: the outbound route on `--listen` dials the demo's inbound route (mTLS,
//! http mode), which forwards to the plain demo app; the app's answer carries the identity the
//! inbound hop verified, from `X-Forwarded-Client-Cert`, never one the client sent.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::support::*;

/// One `GET /` through the demo's outbound listener with `extra` header lines; the response.
fn get(addr: std::net::SocketAddr, extra: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to demo");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the demo's answer");
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn demo_identity_comes_through_the_inbound_hop() {
    let demo = Cmd::new().args(["demo", "--listen", "127.0.0.1:0"]).start();
    let forged = "X-Forwarded-Client-Cert: Hash=00;Subject=\"CN=forged\";URI=spiffe://evil/x\r\n";
    let response = get(demo.addr(), forged);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "demo answered:\n{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    for want in [
        "hello from the mtls-sidecar demo app",
        "verified client certificate (X-Forwarded-Client-Cert, set by the inbound route)",
        "  Subject  CN=mtls-sidecar-dev-client",
        "  DNS      mtls-sidecar-dev-client",
        "  URI      (none)",
        "proto https",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    let hash = body
        .lines()
        .find_map(|l| l.strip_prefix("  Hash     "))
        .unwrap_or_else(|| panic!("no Hash line in:\n{body}"));
    assert!(
        hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "{body}"
    );
    assert!(
        !body.contains("forged") && !body.contains("evil"),
        "the client's header reached the app:\n{body}"
    );
    // The banner shows the path, in order.
    let deadline = Instant::now() + WAIT;
    while !demo.stdout().contains("plain app") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = demo.stdout();
    let path = out
        .lines()
        .find(|l| l.trim_start().starts_with("path"))
        .unwrap_or_else(|| demo.fail("no path line in the banner"));
    assert!(
        path.contains(&format!(
            "curl -> {} outbound -> mTLS -> inbound 127.0.0.1:",
            demo.addr()
        )) && path.contains(" -> plain app 127.0.0.1:"),
        "{path}"
    );
}
