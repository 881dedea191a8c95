//! The application side: plain TCP clients of the proxy's listener. Every wait is bounded.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::WAIT;

pub async fn connect(addr: SocketAddr) -> TcpStream {
    match timeout(WAIT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => panic!("connect to {addr}: {e}"),
        Err(_) => panic!("connect to {addr}: timed out"),
    }
}

/// Writes `data` and half-closes while reading until end of stream, both at once (a client that
/// wrote everything first would deadlock an echo as soon as the socket buffers fill).
pub async fn exchange_on(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    let (mut rd, mut wr) = stream.into_split();
    let write = async move {
        wr.write_all(&data).await.expect("write to proxy");
        wr.shutdown().await.expect("shutdown(Write) to proxy");
    };
    let read = async move {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("read from proxy");
        got
    };
    let both = async { tokio::join!(write, read).1 };
    timeout(Duration::from_secs(60), both)
        .await
        .expect("exchange through the proxy timed out")
}

pub async fn exchange(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    exchange_on(connect(addr).await, data).await
}

pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    match timeout(WAIT, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf,
        Ok(Err(e)) => panic!("reading {n} bytes from the proxy: {e}"),
        Err(_) => panic!("reading {n} bytes from the proxy: timed out"),
    }
}

pub async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    match timeout(WAIT, stream.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf,
        Ok(Err(e)) => panic!(
            "reading to end from the proxy: {e} (got {} bytes)",
            buf.len()
        ),
        Err(_) => panic!(
            "reading to end from the proxy: timed out (got {} bytes)",
            buf.len()
        ),
    }
}

/// How the proxy ended a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// FIN
    Eof,
    /// RST (e.g. because the proxy closed with our unread bytes in its buffer)
    Reset,
}

/// Reads until the proxy closes the connection (within `limit`); panics if any byte arrives.
pub async fn expect_closed_without_data(stream: &mut TcpStream, limit: Duration) -> Closed {
    let mut buf = [0u8; 4096];
    match timeout(limit, stream.read(&mut buf)).await {
        Ok(Ok(0)) => Closed::Eof,
        Ok(Ok(n)) => panic!(
            "the app got {n} bytes from a connection that should have been refused: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => Closed::Reset,
        Ok(Err(e)) => panic!("unexpected read error: {e}"),
        Err(_) => panic!("the proxy did not close the connection within {limit:?}"),
    }
}

/// Reads until end of stream or reset; returns the bytes read before that.
pub async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Closed) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return (got, Closed::Eof),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => return (got, Closed::Reset),
            Ok(Err(e)) => panic!("unexpected read error: {e}"),
            Err(_) => panic!("the connection was not closed within {limit:?}"),
        }
    }
}

/// Asserts that nothing arrives (and the connection is not closed) for `dur`.
pub async fn expect_silence(stream: &mut TcpStream, dur: Duration) {
    let mut buf = [0u8; 1024];
    if let Ok(res) = timeout(dur, stream.read(&mut buf)).await {
        match res {
            Ok(0) => panic!("connection closed while it should have stayed quiet"),
            Ok(n) => panic!(
                "{n} bytes arrived while the connection should have stayed quiet: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => panic!("read error while the connection should have stayed quiet: {e}"),
        }
    }
}

/// Polls until a TCP connect to `addr` is refused (the listener is closed). Connections that
/// still succeed are dropped at once. Returns how long it took.
pub async fn wait_refused(addr: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return start.elapsed(),
            // Caught in the backlog as the listener closed: the next attempt will tell.
            Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(Err(e)) => panic!("connect to {addr}: unexpected error {e}"),
            Ok(Ok(stream)) => drop(stream),
            Err(_) => {}
        }
        assert!(
            start.elapsed() < limit,
            "{addr} still accepted connections after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0 and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
