//! A scripted PostgreSQL-like upstream over raw TCP (no real PostgreSQL: `pg_*` tests run one):
//! it reads the client's first 8 bytes, answers as told, and after `S` runs a rustls server
//! that echoes, recording what it read. Also the app side's messages and `ErrorResponse`
//! parsing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::WAIT;

/// `SSLRequest`.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// `GSSENCRequest`.
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// A `StartupMessage` (protocol 3.0) for `user`.
pub fn startup(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for s in ["user", user, "database", "db"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// A `CancelRequest` for backend `pid` with `key`.
pub fn cancel_request(pid: u32, key: u32) -> Vec<u8> {
    let mut m = 16u32.to_be_bytes().to_vec();
    m.extend_from_slice(&80_877_102u32.to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(&key.to_be_bytes());
    m
}

/// The fields of one `ErrorResponse` (framing checked: `E`, length, NUL-ended fields, final
/// NUL, nothing after it).
pub fn error_fields(msg: &[u8]) -> Vec<(char, String)> {
    assert!(msg.len() >= 6, "not an ErrorResponse: {msg:?}");
    assert_eq!(msg[0], b'E', "not an ErrorResponse: {msg:?}");
    let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
    assert_eq!(len + 1, msg.len(), "ErrorResponse length word: {msg:?}");
    assert_eq!(msg.last(), Some(&0), "no terminator: {msg:?}");
    msg[5..msg.len() - 1]
        .split_inclusive(|b| *b == 0)
        .map(|f| {
            assert_eq!(f.last(), Some(&0), "field not NUL-ended: {msg:?}");
            (
                f[0] as char,
                String::from_utf8(f[1..f.len() - 1].to_vec()).expect("UTF-8 field"),
            )
        })
        .collect()
}

/// The value of field `code` of an `ErrorResponse`.
pub fn error_field(msg: &[u8], code: char) -> String {
    error_fields(msg)
        .into_iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {code} field in {msg:?}"))
}

/// Read until end of stream (or reset), bounded by [`WAIT`].
pub async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("the proxy did not close the connection");
    got
}

/// What the upstream answers to the client's first 8 bytes.
#[derive(Clone, Debug)]
pub enum Answer {
    /// `S`, then TLS (the config given), then echo.
    Tls,
    /// These bytes, then wait for the client to close.
    Raw(Vec<u8>),
    /// `S`, then after `delay` these bytes, then TLS as [`Answer::Tls`].
    TlsLate(Duration, Vec<u8>),
    /// Close at once.
    Close,
}

/// One connection as the upstream saw it.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// The first 8 bytes the client sent.
    pub first: Vec<u8>,
    /// The TLS handshake completed.
    pub tls: bool,
    /// Plaintext read inside TLS (capped at 1 MiB).
    pub data: Vec<u8>,
    /// The connection ended (both directions done).
    pub done: bool,
}

/// The scripted upstream.
pub struct PgUpstream {
    pub addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>>,
    task: JoinHandle<()>,
}

impl PgUpstream {
    /// Listen on 127.0.0.1:0 and answer every connection as `answer` says.
    pub async fn start(config: ServerConfig, answer: Answer) -> PgUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Arc<Mutex<Seen>>>>> = Arc::default();
        let all = seen.clone();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let one = Arc::new(Mutex::new(Seen::default()));
                all.lock().unwrap().push(one.clone());
                conns.spawn(serve(tcp, acceptor.clone(), answer.clone(), one));
            }
        });
        PgUpstream { addr, seen, task }
    }

    /// Every connection so far.
    pub fn conns(&self) -> Vec<Seen> {
        let all = self.seen.lock().unwrap();
        all.iter().map(|s| s.lock().unwrap().clone()).collect()
    }

    /// Wait until `n` connections have ended; returns them all.
    pub async fn wait_done(&self, n: usize) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let c = self.conns();
            if c.iter().filter(|s| s.done).count() >= n {
                return c;
            }
            assert!(start.elapsed() < WAIT, "{n} connections did not end: {c:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PgUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut tcp: TcpStream, acceptor: TlsAcceptor, answer: Answer, seen: Arc<Mutex<Seen>>) {
    let mut first = [0u8; 8];
    let ok = timeout(WAIT, tcp.read_exact(&mut first)).await;
    seen.lock().unwrap().first = first.to_vec();
    if !matches!(ok, Ok(Ok(_))) {
        seen.lock().unwrap().done = true;
        return;
    }
    match answer {
        Answer::Close => {}
        Answer::Raw(bytes) => {
            let _ = tcp.write_all(&bytes).await;
            let mut sink = Vec::new();
            let _ = timeout(WAIT, tcp.read_to_end(&mut sink)).await;
        }
        Answer::Tls => {
            let _ = tcp.write_all(b"S").await;
            tls_echo(tcp, acceptor, &seen).await;
        }
        Answer::TlsLate(delay, bytes) => {
            let _ = tcp.write_all(b"S").await;
            tokio::time::sleep(delay).await;
            let _ = tcp.write_all(&bytes).await;
            tls_echo(tcp, acceptor, &seen).await;
        }
    }
    seen.lock().unwrap().done = true;
}

async fn tls_echo(tcp: TcpStream, acceptor: TlsAcceptor, seen: &Mutex<Seen>) {
    let Ok(Ok(mut tls)) = timeout(WAIT, acceptor.accept(tcp)).await else {
        return;
    };
    seen.lock().unwrap().tls = true;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match timeout(WAIT, tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        {
            let mut s = seen.lock().unwrap();
            if s.data.len() < 1 << 20 {
                s.data.extend_from_slice(&buf[..n]);
            }
        }
        if tls.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = tls.shutdown().await;
}
