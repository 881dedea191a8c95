//! The drain cut reaches tcp-mode relays that were busy before it: a relay waits for the cut
//! without locking the shared token on every wake-up (`proxy::cut`), and this checks that no
//! cut is missed that way, outbound and inbound.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::support::inbound::{EchoTarget, client_config, inbound_cmd, tls_connect};
use crate::support::*;

/// Many small exchanges, so the relay was woken and polled many times before the cut.
async fn exchange(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), rounds: usize) {
    let mut buf = [0u8; 5];
    for i in 0..rounds {
        let msg = format!("{:05}", i % 100_000);
        stream.write_all(msg.as_bytes()).await.expect("write");
        tokio::time::timeout(WAIT, stream.read_exact(&mut buf))
            .await
            .expect("echo within the wait")
            .expect("read");
        assert_eq!(&buf, msg.as_bytes(), "echo of round {i}");
    }
}

/// SIGTERM with `--drain-timeout 1s`, then the connection must be cut after about 1 s, and its
/// one log line must say so.
async fn expect_cut(proxy: &mut Sidecar, stream: &mut (impl AsyncRead + Unpin)) {
    let signalled = Instant::now();
    proxy.signal("TERM");
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was not cut within 10s"),
        }
    }
    let cut = signalled.elapsed();
    assert!(
        cut >= Duration::from_millis(900),
        "cut after {cut:?}, before the drain timeout"
    );
    assert!(
        cut < Duration::from_secs(3),
        "cut only after {cut:?} with a 1s drain timeout"
    );
    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after cutting: {status}"
    );
    proxy.wait_output_closed();
    let lines: Vec<String> = proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_conn_line(l))
        .collect();
    assert_eq!(lines.len(), 1, "connection lines: {lines:#?}");
    assert!(
        lines[0].contains("drain_timeout"),
        "not logged as cut: {}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_outbound_relay_is_cut_at_the_drain_timeout() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--drain-timeout", "1s"])
        .start();
    let mut stream = connect(proxy.addr()).await;
    exchange(&mut stream, 300).await;
    expect_cut(&mut proxy, &mut stream).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_inbound_relay_is_cut_at_the_drain_timeout() {
    let pki = Pki::new();
    let target = EchoTarget::start().await;
    let mut proxy = inbound_cmd(&pki, target.addr)
        .args(["--allow-any-client", "--drain-timeout", "1s"])
        .start();
    let mut stream = tls_connect(proxy.addr(), client_config(&pki, Some(&pki.client)))
        .await
        .expect("handshake");
    exchange(&mut stream, 300).await;
    expect_cut(&mut proxy, &mut stream).await;
}
