//! The listeners' accept queue: a burst of connections beyond `--max-connections` waits in the
//! kernel, every connect completing at once, instead of having its SYNs dropped once tokio's
//! and std's default queue of 128 is full (the client would retry only after 1 s).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// Connections that wait beyond the one slot: more than a queue of 128 holds.
const WAITING: usize = 300;

/// A loopback connect answers in well under this; a dropped SYN is sent again only after 1 s.
const CONNECT_BUDGET: Duration = Duration::from_millis(500);

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_beyond_max_connections_waits_in_the_accept_queue() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd(&pki, up.addr)
        .args(["--max-connections", "1"])
        .start();
    // The one slot, held for the whole test and proven established end to end.
    let mut first = connect(proxy.addr()).await;
    first.write_all(b"x").await.expect("write");
    assert_eq!(read_exact(&mut first, 1).await, b"x");

    let mut waiting = Vec::with_capacity(WAITING);
    for i in 0..WAITING {
        match tokio::time::timeout(CONNECT_BUDGET, TcpStream::connect(proxy.addr())).await {
            Ok(Ok(s)) => waiting.push(s),
            Ok(Err(e)) => panic!("connection {i} beyond the slot failed: {e}"),
            Err(_) => panic!(
                "connection {i} beyond the slot was not answered within {CONNECT_BUDGET:?}: \
                 the listener's accept queue is full"
            ),
        }
    }
    assert_eq!(
        up.stats.tcp_accepted.load(Ordering::SeqCst),
        1,
        "the waiting connections must stay in the queue, not be served"
    );
}
