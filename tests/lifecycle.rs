//! Signals and draining, the connection limit and the idle timeout.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// Opens a connection through the proxy and proves it is established end to end.
async fn open_connection(proxy: &Sidecar) -> TcpStream {
    let mut stream = connect(proxy.addr()).await;
    stream.write_all(b"x").await.expect("write");
    assert_eq!(read_exact(&mut stream, 1).await, b"x");
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_holds_the_next_one_back() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd(&pki, up.addr)
        .args(["--max-connections", "1"])
        .start();

    let first = open_connection(&proxy).await;
    let mut second = connect(proxy.addr()).await;
    second.write_all(b"second").await.expect("write");
    expect_silence(&mut second, Duration::from_millis(700)).await;
    assert_eq!(
        up.stats
            .tcp_accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy dialled the upstream for a connection beyond --max-connections"
    );

    drop(first);
    assert_eq!(read_exact(&mut second, 6).await, b"second");
    assert_eq!(up.stats.tls_accepted(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_closes_a_silent_connection_only() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--idle-timeout", "1s"])
        .start();

    // Traffic every 250 ms for longer than the timeout keeps the connection open.
    let mut stream = open_connection(&proxy).await;
    let busy_since = Instant::now();
    while busy_since.elapsed() < Duration::from_millis(1600) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(b"k").await.expect("write while busy");
        assert_eq!(read_exact(&mut stream, 1).await, b"k", "closed while busy");
    }

    let silent_since = Instant::now();
    let (rest, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let took = silent_since.elapsed();
    assert!(rest.is_empty());
    assert!(
        took >= Duration::from_millis(900),
        "closed after {took:?} of silence"
    );
    assert!(
        took < Duration::from_millis(3000),
        "closed only after {took:?} of silence with a 1s idle timeout"
    );
    proxy.wait_conn_lines(1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_lets_a_transfer_finish() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--drain-timeout", "20s"])
        .start();
    let addr = proxy.addr();
    let stream = open_connection(&proxy).await;

    proxy.signal("TERM");
    wait_refused(addr, WAIT).await;
    assert_eq!(proxy.try_exit(), None, "exited with a connection in flight");

    let data = pattern(21, 2 << 20);
    let got = exchange_on(stream, data.clone()).await;
    assert!(
        got == data,
        "the in-flight transfer was altered during the drain"
    );

    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after a clean drain: {status}"
    );
    proxy.wait_output_closed();
    let ok = format!("bytes_to_upstream={}", data.len() + 1);
    assert!(
        proxy
            .stderr_lines()
            .iter()
            .any(|l| is_conn_line(l) && l.contains(&ok)),
        "no connection line with {ok} for the drained transfer"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_timeout_cuts_what_is_left() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--drain-timeout", "1s"])
        .start();
    let mut stream = open_connection(&proxy).await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let cut = signalled.elapsed();
    assert!(
        cut >= Duration::from_millis(900),
        "cut after {cut:?}, before the drain timeout"
    );
    assert!(
        cut < Duration::from_millis(3000),
        "cut only after {cut:?} with a 1s drain timeout"
    );

    let status = proxy.wait_exit(WAIT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after cutting: {status}"
    );
    let exited = signalled.elapsed();
    assert!(
        exited < Duration::from_secs(5),
        "exited {exited:?} after SIGTERM"
    );
    // A cut connection still logs its one line, before the process exits.
    proxy.wait_output_closed();
    let lines: Vec<String> = proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_conn_line(l))
        .collect();
    assert_eq!(lines.len(), 1, "connection lines: {lines:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_sigterm_exits_at_once_with_code_1() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    let _stream = open_connection(&proxy).await;

    proxy.signal("TERM");
    // The first signal has been acted on once the listener is gone.
    wait_refused(proxy.addr(), WAIT).await;
    assert_eq!(proxy.try_exit(), None, "exited with a connection in flight");

    let second = Instant::now();
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(1),
        "exit status after a second SIGTERM: {status}"
    );
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} to exit after the second SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_delay_keeps_accepting_first() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--shutdown-delay", "1s", "--drain-timeout", "5s"])
        .start();
    let addr = proxy.addr();

    let signalled = Instant::now();
    proxy.signal("TERM");
    assert_eq!(
        exchange(addr, b"during the delay".to_vec()).await,
        b"during the delay"
    );
    wait_refused(addr, WAIT).await;
    let closed_after = signalled.elapsed();
    assert!(
        closed_after >= Duration::from_millis(900),
        "the listener closed {closed_after:?} after SIGTERM, before --shutdown-delay 1s"
    );
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn sigint_with_nothing_in_flight_exits_0() {
    let pki = Pki::new();
    let mut proxy = run_cmd(&pki, "127.0.0.1:9").start();
    proxy.signal("INT");
    let status = proxy.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0), "{status}");
}
