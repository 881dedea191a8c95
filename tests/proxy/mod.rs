//! Egress through an HTTP CONNECT proxy (`--proxy`, `--proxy-ca`, `--proxy-auth-file`,
//! `--no-proxy`, `--proxy-from-env`), against the in-test proxy of `support::connect_proxy`.
//!
//! The upstream is addressed as `upstream.mtls-test.invalid`, a name that never resolves on the
//! test machine: only the proxy's own name map knows it, so a working connection proves that
//! the name went to the proxy unresolved. Its certificate is valid for that name only.
//!
//! - `tunnel`: tcp mode through http:// and https:// proxies, byte integrity both ways, the
//!   exact CONNECT request, SNI and client certificate at the upstream; bytes after the `200`
//!   head; an untrusted, misnamed or client-cert-wanting https proxy (`reason=proxy_tls`); a
//!   `200` head in tiny pieces; IPv6 targets in brackets; a scheme-less proxy address
//! - `credentials`: from the URL (percent-decoded), `--proxy-auth-file`, the environment; `407`
//!   without and with wrong credentials; rotation of the file after a `407`; never logged
//! - `bypass`: `--no-proxy` with CIDRs, names, subdomains, leading and trailing dots, `*`;
//!   non-matching lists still use the proxy; `--proxy-from-env` with `HTTPS_PROXY` / `NO_PROXY`
//!   (never `HTTP_PROXY` / `ALL_PROXY`), explicit flags winning, ignored without the flag
//! - `failures`: unreachable proxy (also on the default ports 80/443), `403`/`502`, non-HTTP
//!   answers, early close, oversized heads, an https proxy silent in its handshake, a proxy
//!   that never answers, one `--connect-timeout` over every step;
//!   each with its `reason=`, outcome and metrics, and later connections unaffected
//! - `http_mode`: `--mode http` through the proxy (few tunnels for many requests, `502`/`504`
//!   answers)
//! - `config_file`: proxied, bypassing, https and from-env routes; a bad `proxy` key
//! - `startup`: startup errors (exit 2, never echoing a password)
//!
//! The helpers below are shared by all of them.

mod bypass;
mod config_file;
mod credentials;
mod failures;
mod http_mode;
mod startup;
mod tunnel;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::admin::{Metrics, admin_addr, scrape_until};
use crate::support::connect_proxy::*;
use crate::support::files::atomic_write;
use crate::support::http::*;
use crate::support::pki::{CLIENT_CN, Identity, LeafSpec};
use crate::support::refused::{accepted, assert_failed, refused};
use crate::support::upstream::{Conn, server_config};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers

const CONNS: &str = "mtls_sidecar_connections_total";
/// Failed connections by `reason` (README, "Metrics").
const FAILURES: &str = "mtls_sidecar_connection_failures_total";

/// `upstream.mtls-test.invalid:PORT`.
fn target(port: u16) -> String {
    format!("{UPSTREAM_NAME}:{port}")
}

/// `run` towards `upstream.mtls-test.invalid:PORT` through `proxy_url`.
fn via(pki: &Pki, up: &Upstream, proxy_url: &str) -> Cmd {
    run_cmd(pki, target(up.port())).args(["--proxy", proxy_url])
}

/// A separate CA for the https proxy and a certificate (`localhost`, 127.0.0.1) from it.
fn proxy_pki(pki: &Pki) -> (crate::support::pki::Ca, Identity) {
    let ca = pki.new_ca("proxy-ca", "mtls-sidecar test proxy CA");
    let id = pki.leaf(&ca, "proxy", LeafSpec::server());
    (ca, id)
}

/// Checks that `req` is exactly the CONNECT for `target`.
fn assert_connect(req: &ProxyRequest, target: &str) {
    assert_eq!(
        req.request_line,
        format!("CONNECT {target} HTTP/1.1"),
        "the request line the proxy got: {req:#?}"
    );
    assert_eq!(
        req.header("host"),
        Some(target),
        "the Host header of the CONNECT: {req:#?}"
    );
    assert_eq!(req.version, "HTTP/1.1", "{req:#?}");
    assert_eq!(
        req.all("host").len(),
        1,
        "one Host header in the CONNECT: {req:#?}"
    );
}

/// What the upstream saw of a connection that came through: our SNI and client certificate.
fn assert_named_conn(conn: &Conn) {
    assert_eq!(conn.sni.as_deref(), Some(UPSTREAM_NAME), "{conn:?}");
    assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN), "{conn:?}");
}

fn conn_count(sidecar: &Sidecar) -> usize {
    sidecar.count_lines(is_conn_line)
}

/// One connection that may work or be refused: writes `data` and half-closes (write errors are
/// fine), reads until closed. Returns what came back and the connection's log line.
async fn attempt(sidecar: &mut Sidecar, data: &[u8]) -> (Vec<u8>, String) {
    let before = conn_count(sidecar);
    let (mut rd, mut wr) = connect(sidecar.addr()).await.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&data).await;
        let _ = wr.shutdown().await;
        wr
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was neither served nor closed within {WAIT:?}"),
        }
    }
    writer.abort();
    let line = sidecar.wait_conn_lines(before + 1)[before].clone();
    (got, line)
}

/// Whether the log line's text (message or `error=`) contains `needle`, case-insensitively.
fn says(line: &str, needle: &str) -> bool {
    line.to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

/// `--admin 127.0.0.1:0` metrics: waits until `connections_total{outcome}` reaches `n`.
async fn wait_outcome(admin: std::net::SocketAddr, outcome: &str, n: f64) -> Metrics {
    let m = scrape_until(admin, |m| {
        m.count(CONNS, &[("route", "default"), ("outcome", outcome)]) >= n
    })
    .await;
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", outcome)]),
        n,
        "{CONNS}{{outcome=\"{outcome}\"}}:\n{}",
        m.text
    );
    m
}

/// Writes `user:pass\n` to a file in the PKI directory.
fn auth_file(pki: &Pki, name: &str, user: &str, pass: &str) -> PathBuf {
    pki.write(name, format!("{user}:{pass}\n"))
}

/// Fails if `secret` (or the Basic credentials built from it) appears anywhere in stderr.
fn assert_not_logged(sidecar: &Sidecar, user: &str, pass: &str) {
    let stderr = sidecar.stderr();
    let b64 = base64(format!("{user}:{pass}").as_bytes());
    for (what, needle) in [
        ("the password", pass.to_string()),
        ("the base64 credentials", b64),
        ("the base64 password", base64(pass.as_bytes())),
    ] {
        if stderr.contains(&needle) {
            sidecar.fail(&format!("{what} ({needle}) appears in stderr"));
        }
    }
}
