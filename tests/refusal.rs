//! Upstream connections that fail: the app's connection is closed without a byte, nothing
//! reaches the upstream's application, and the access log line says why (`reason=`).

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::pki::Identity;
use crate::support::refused::assert_failed;
use crate::support::upstream::{server_config, server_config_tls12};
use crate::support::*;

/// Sends a request through a proxy towards `up`, expects the connection refused without data,
/// and returns the access log line.
async fn refused_through(proxy: &mut Sidecar, up: &Upstream) -> String {
    let mut stream = connect(proxy.addr()).await;
    // The proxy may already have closed: a failed write is fine, a byte back is not.
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let line = proxy.wait_conn_lines(1)[0].clone();

    let deadline = Instant::now() + WAIT;
    while up
        .stats
        .tcp_accepted
        .load(std::sync::atomic::Ordering::SeqCst)
        > 0
        && up
            .stats
            .handshake_failures
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        && up.stats.tls_accepted() == 0
    {
        assert!(
            Instant::now() < deadline,
            "the upstream's handshake never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.stats.tls_accepted(),
        0,
        "the upstream completed a handshake"
    );
    assert_eq!(
        up.stats.app_bytes(),
        0,
        "app bytes reached the upstream's application"
    );
    line
}

/// An echo upstream presenting `server` and trusting our client CA, and a proxy in front of it.
async fn bad_server(pki: &Pki, server: &Identity, extra: &[&str]) -> String {
    let up = Upstream::echo(server, &pki.ca.der).await;
    let mut proxy = run_cmd(pki, up.addr).args(extra).start();
    let line = refused_through(&mut proxy, &up).await;
    assert_eq!(num_field(&line, "bytes_to_upstream"), 0, "{line}");
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_cert_from_an_unknown_ca() {
    let pki = Pki::new();
    let line = bad_server(&pki, &pki.server_unknown_ca(), &[]).await;
    assert_failed(&line, "tls_error", "unknown_issuer");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_cert_for_another_name() {
    let pki = Pki::new();
    let line = bad_server(
        &pki,
        &pki.server_wrong_name(),
        &["--server-name", "localhost"],
    )
    .await;
    assert_failed(&line, "tls_error", "name_mismatch");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_cert_expired() {
    let pki = Pki::new();
    let line = bad_server(&pki, &pki.server_expired(), &[]).await;
    assert_failed(&line, "tls_error", "expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_cert_not_yet_valid() {
    let pki = Pki::new();
    let line = bad_server(&pki, &pki.server_not_yet_valid(), &[]).await;
    assert_failed(&line, "tls_error", "not_yet_valid");
}

/// In TLS 1.3 the client finishes its handshake before the server judges the client
/// certificate, so the rejection arrives as an alert on the first read.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_rejects_our_client_cert_tls13() {
    let pki = Pki::new();
    let other = pki.other_ca();
    let up = Upstream::start(
        server_config(&pki.server, &[&other.der]),
        vec![Behavior::Echo],
    )
    .await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    let line = refused_through(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "client_cert_rejected");
    assert_upstream_refused_our_cert(&up);
}

/// In TLS 1.2 the rejection arrives during the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_rejects_our_client_cert_tls12() {
    let pki = Pki::new();
    let other = pki.other_ca();
    let up = Upstream::start(
        server_config_tls12(&pki.server, &[&other.der]),
        vec![Behavior::Echo],
    )
    .await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    let line = refused_through(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "client_cert_rejected");
    assert_eq!(num_field(&line, "bytes_to_upstream"), 0, "{line}");
    assert_upstream_refused_our_cert(&up);
}

/// The upstream's own handshake error shows it was our certificate it refused.
fn assert_upstream_refused_our_cert(up: &Upstream) {
    let errors = up.stats.handshake_errors.lock().unwrap().clone();
    assert!(
        errors.iter().any(|e| e.contains("UnknownIssuer")),
        "upstream handshake errors: {errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_min_1_3_refuses_a_tls12_only_upstream() {
    let pki = Pki::new();
    let up = Upstream::start(
        server_config_tls12(&pki.server, &[&pki.ca.der]),
        vec![Behavior::Echo],
    )
    .await;
    let mut proxy = run_cmd(&pki, up.addr).args(["--tls-min", "1.3"]).start();
    let line = refused_through(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "protocol");
}

/// Nothing listens at first (refused); then an upstream comes up on that port and the next
/// connection works, with no restart.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_then_up() {
    let pki = Pki::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut proxy = run_cmd(&pki, addr).start();

    let mut stream = connect(proxy.addr()).await;
    let _ = stream.write_all(b"early").await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let line = proxy.wait_conn_lines(1)[0].clone();
    assert_failed(&line, "connect_error", "refused");
    assert_eq!(field(&line, "upstream"), Some(&*addr.to_string()), "{line}");

    let cfg = server_config(&pki.server, &[&pki.ca.der]);
    let up = Upstream::start_on(addr, cfg, vec![Behavior::Echo])
        .await
        .unwrap_or_else(|e| panic!("{addr} was taken meanwhile ({e}); rerun the test"));
    assert_eq!(exchange(proxy.addr(), b"later".to_vec()).await, b"later");
    assert_eq!(up.stats.tls_accepted(), 1);
    let lines = proxy.wait_conn_lines(2);
    assert_eq!(field(&lines[1], "outcome"), Some("ok"), "{}", lines[1]);
}

/// An upstream that accepts TCP and then says nothing: `--connect-timeout` ends the attempt.
#[tokio::test(flavor = "multi_thread")]
async fn handshake_that_never_finishes_times_out() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let mut proxy = run_cmd(&pki, silent.addr)
        .args(["--connect-timeout", "1s"])
        .start();

    let started = Instant::now();
    let mut stream = connect(proxy.addr()).await;
    expect_closed_without_data(&mut stream, Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?}, before the 1s connect timeout"
    );
    assert!(
        took < Duration::from_millis(3000),
        "closed only after {took:?} with a 1s connect timeout"
    );
    assert_eq!(silent.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    let line = proxy.wait_conn_lines(1)[0].clone();
    assert_failed(&line, "timeout", "timeout");
    let ms = num_field(&line, "duration_ms");
    assert!(
        (900..3000).contains(&ms),
        "duration_ms={ms} with a 1s connect timeout"
    );
}
