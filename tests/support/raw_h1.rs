//! Peers for the framing and keepalive tests of http mode.
//!
//! [`ScriptedUpstream`]: an HTTP/1.1-only mTLS upstream that answers every request with the
//! exact bytes it was given (framing no library would produce, such as `Transfer-Encoding` next
//! to `Content-Length`) and records each request with its body decoded by its own framing, so a
//! test can compare digests. [`Relay`]: a TCP relay that can stop forwarding without closing
//! anything, as a peer that vanished without a FIN looks from the sidecar.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::http::{eventually, find};
use super::upstream::server_config;
use super::{Pki, WAIT};

/// One request as the upstream read it off the wire.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub target: String,
    /// Lowercase names, in order.
    pub headers: Vec<(String, String)>,
    /// The body as its framing delimits it (chunked decoded, `Content-Length`, or none).
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 mTLS upstream answering each request with fixed bytes, then closing.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawRequest>>>,
    task: JoinHandle<()>,
}

impl ScriptedUpstream {
    pub async fn start(pki: &Pki, answer: &'static [u8]) -> ScriptedUpstream {
        let mut config = server_config(&pki.server, &[&pki.ca.der]);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task_seen = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let (acceptor, seen) = (acceptor.clone(), task_seen.clone());
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let Some(req) = read_request(&mut tls, &mut buf).await else {
                        return;
                    };
                    seen.lock().unwrap().push(req);
                    let _ = tls.write_all(answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        ScriptedUpstream { addr, seen, task }
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` requests were read completely, body included.
    pub async fn wait_requests(&self, n: usize) -> Vec<RawRequest> {
        eventually(&format!("{n} requests at the upstream"), WAIT, || {
            self.seen.lock().unwrap().len() >= n
        })
        .await;
        self.requests()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads into `buf` until it holds `n` bytes; false at EOF or error.
async fn fill(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, n: usize) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < n {
        match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads into `buf` until `needle` appears at or after `from`; its offset, or None at EOF.
async fn fill_until(
    io: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    from: usize,
    needle: &[u8],
) -> Option<usize> {
    loop {
        if let Some(at) = find(&buf[from..], needle) {
            return Some(from + at);
        }
        let want = buf.len() + 1;
        if !fill(io, buf, want).await {
            return None;
        }
    }
}

/// One request head and body, framed as RFC 9112 says (no `Content-Length` and no
/// `Transfer-Encoding`: no body).
async fn read_request(io: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> Option<RawRequest> {
    let end = fill_until(io, buf, 0, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let mut at = end + 4;
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked")) {
        loop {
            let line_end = fill_until(io, buf, at, b"\r\n").await?;
            let line = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // Trailers up to the empty line.
                fill_until(io, buf, at - 2, b"\r\n\r\n").await?;
                break;
            }
            if !fill(io, buf, at + size + 2).await {
                return None;
            }
            body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        if !fill(io, buf, at + len).await {
            return None;
        }
        body.extend_from_slice(&buf[at..at + len]);
    }
    Some(RawRequest {
        method,
        target,
        headers,
        body,
    })
}

/// A TCP relay on 127.0.0.1:0 in front of `target`. While paused it reads both ways and
/// throws the bytes away: nothing is forwarded and nothing is closed, so the peers see a
/// silent but open connection (TCP still ACKs, so keepalive at the TCP level finds nothing).
pub struct Relay {
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    /// Connections whose client side (the sidecar) has closed or reset.
    client_closed: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("local addr");
        let paused = Arc::new(AtomicBool::new(false));
        let client_closed = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (p, c, a) = (paused.clone(), client_closed.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let (p1, p2, c) = (p.clone(), p.clone(), c.clone());
                conns.spawn(async move {
                    pump(dr, uw, p1).await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
                conns.spawn(async move {
                    pump(ur, dw, p2).await;
                });
            }
        });
        Relay {
            addr,
            paused,
            client_closed,
            accepted,
            task,
        }
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn client_closed(&self) -> usize {
        self.client_closed.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies until EOF or error, dropping what it reads while `paused`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    paused: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if paused.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
