//! One connection through the proxy that must be refused (and what that means for the
//! upstream), or must succeed (and what the upstream saw of us).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::upstream::Conn;
use super::*;

/// Checks a failed connection's log line.
pub fn assert_failed(line: &str, outcome: &str, reason: &str) {
    assert_eq!(field(line, "outcome"), Some(outcome), "outcome in: {line}");
    assert_eq!(field(line, "reason"), Some(reason), "reason in: {line}");
    assert!(
        line.contains("WARN"),
        "a failed connection logs at WARN: {line}"
    );
    assert!(field(line, "error").is_some(), "no error= in: {line}");
    assert_eq!(field(line, "route"), Some("default"), "{line}");
    assert_eq!(num_field(line, "bytes_from_upstream"), 0, "{line}");
}

fn conn_lines(proxy: &Sidecar) -> usize {
    proxy
        .stderr_lines()
        .iter()
        .filter(|l| is_conn_line(l))
        .count()
}

/// Opens one connection through `proxy` (towards `up`), which must be closed without a byte
/// back, while the upstream completes no handshake and its application reads nothing. Returns
/// the connection's log line, already checked to carry `bytes_to_upstream=0`. One connection at
/// a time per proxy.
pub async fn refused(proxy: &mut Sidecar, up: &Upstream) -> String {
    let lines_before = conn_lines(proxy);
    let tcp_before = up.stats.tcp_accepted.load(Ordering::SeqCst);
    let failed_before = up.stats.handshake_failures.load(Ordering::SeqCst);
    let tls_before = up.stats.tls_accepted();
    let bytes_before = up.stats.app_bytes();

    let mut stream = connect(proxy.addr()).await;
    // The proxy may already have closed: a failed write is fine, a byte back is not.
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let line = proxy.wait_conn_lines(lines_before + 1)[lines_before].clone();

    // The upstream's side of the handshake ends too (an alert or a closed socket).
    let deadline = Instant::now() + WAIT;
    while up.stats.tcp_accepted.load(Ordering::SeqCst) > tcp_before
        && up.stats.handshake_failures.load(Ordering::SeqCst) == failed_before
        && up.stats.tls_accepted() == tls_before
    {
        assert!(
            Instant::now() < deadline,
            "the upstream's handshake never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.stats.tls_accepted(),
        tls_before,
        "the upstream completed a handshake for a refused connection: {line}"
    );
    assert_eq!(
        up.stats.app_bytes(),
        bytes_before,
        "app bytes reached the upstream's application: {line}"
    );
    assert_eq!(num_field(&line, "bytes_to_upstream"), 0, "{line}");
    line
}

/// One short echo through `proxy`, which must work; returns what the upstream saw of that
/// connection. One connection at a time per upstream.
pub async fn accepted(proxy: &mut Sidecar, up: &Upstream) -> Conn {
    let lines_before = conn_lines(proxy);
    let conns_before = up.stats.tls_accepted();
    let data = pattern(lines_before as u64, 1000 + lines_before);
    let got = exchange(proxy.addr(), data.clone()).await;
    let line = proxy.wait_conn_lines(lines_before + 1)[lines_before].clone();
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert!(
        got == data,
        "echo altered or cut ({} bytes back): {line}",
        got.len()
    );
    let conns = up.stats.conns();
    assert_eq!(
        conns.len(),
        conns_before + 1,
        "the upstream saw {} new TLS connections for one app connection",
        conns.len() - conns_before
    );
    conns.last().cloned().expect("one connection")
}
