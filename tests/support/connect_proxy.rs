//! An in-process HTTP CONNECT egress proxy on 127.0.0.1:0 (tokio), optionally behind TLS with a
//! certificate of its own CA, for `--proxy`.
//!
//! It records every request it was asked (request line, target, headers with
//! `Proxy-Authorization`), resolves targets through a name map of its own (so an `.invalid`
//! name, which never resolves on the test machine, proves that the name reached the proxy
//! unresolved) and tunnels bytes both ways. What it does with connection `i` follows
//! `script[i]`, the last entry repeating (see [`ProxyBehavior`]). With
//! [`ConnectProxyBuilder::credentials`] it requires Basic credentials first and answers `407`
//! with `Proxy-Authenticate` otherwise. Answers other than a tunnel keep the connection open,
//! as a keep-alive proxy (squid) does, until the client closes it: a client that waits for the
//! end of the stream instead of reading the answer's length would hang. It stops when dropped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use super::pki::{Identity, LeafSpec, Pki};
use super::upstream::{Behavior, Upstream, server_config};
use super::{WAIT, base64, init_crypto};

/// A name that never resolves on the test machine (RFC 6761 `.invalid`); only the proxy's name
/// map knows it.
pub const UPSTREAM_NAME: &str = "upstream.mtls-test.invalid";

/// A server certificate valid for [`UPSTREAM_NAME`] only, from the test CA.
pub fn named_server(pki: &Pki) -> Identity {
    pki.leaf(
        &pki.ca,
        "server-named",
        LeafSpec {
            cn: UPSTREAM_NAME,
            names: &[UPSTREAM_NAME],
            uris: &[],
            client: false,
            validity: None,
        },
    )
}

/// An echo upstream presenting [`named_server`] and requiring the test client CA.
pub async fn named_upstream(pki: &Pki) -> Upstream {
    let config = server_config(&named_server(pki), &[&pki.ca.der]);
    Upstream::start(config, vec![Behavior::Echo]).await
}

/// Largest request head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;

/// What the proxy does with one accepted connection, once it has read the request's head
/// (and checked credentials, if it requires them).
#[derive(Clone, Debug)]
pub enum ProxyBehavior {
    /// Resolve the target through the name map, connect, answer `200 Connection established`
    /// and relay bytes both ways. An unknown target gets `502`.
    Tunnel,
    /// Like [`ProxyBehavior::Tunnel`], but the target is dialled and the `200` sent only after
    /// this delay (a slow proxy).
    TunnelAfter(Duration),
    /// Like [`ProxyBehavior::Tunnel`], but the `200` head goes out one byte per write (with
    /// `TCP_NODELAY` and a short pause between bytes, so they travel as separate segments).
    TunnelSplitHeader,
    /// Answer this status with a short `text/plain` body and a `Content-Length`, then keep the
    /// connection open until the client closes it.
    Status(u16),
    /// Send these bytes as the answer; then close at once (`close`), or keep the connection open
    /// until the client closes it.
    Raw { bytes: Vec<u8>, close: bool },
    /// Close the connection without a byte of answer.
    CloseWithoutAnswer,
    /// Never answer; keep the connection until the client closes it.
    Hang,
}

/// One request head the proxy read.
#[derive(Clone, Debug)]
pub struct ProxyRequest {
    /// the whole first line, e.g. `CONNECT upstream.mtls-test.invalid:443 HTTP/1.1`
    pub request_line: String,
    pub method: String,
    pub target: String,
    pub version: String,
    /// (lowercase name, value), in order
    pub headers: Vec<(String, String)>,
}

impl ProxyRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn proxy_authorization(&self) -> Option<&str> {
        self.header("proxy-authorization")
    }
}

/// The `Proxy-Authorization` value for `user:pass`.
pub fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

#[derive(Default)]
pub struct ProxyStats {
    /// TCP connections accepted
    pub accepted: AtomicUsize,
    /// TLS handshakes (https proxy) that failed
    pub tls_failures: AtomicUsize,
    /// `407` answers sent
    pub auth_refused: AtomicUsize,
    /// tunnels opened: target connected and `200` sent
    pub tunnels: AtomicUsize,
    /// tunnels whose relay has ended (both directions)
    pub tunnels_closed: AtomicUsize,
    /// connections that were held open (answer sent, or never answered) and that the client
    /// then closed
    pub closed_by_client: AtomicUsize,
    requests: Mutex<Vec<ProxyRequest>>,
    tls_errors: Mutex<Vec<String>>,
}

impl ProxyStats {
    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    /// How many `CONNECT` requests arrived.
    pub fn connects(&self) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == "CONNECT")
            .count()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }

    pub fn tls_errors(&self) -> Vec<String> {
        self.tls_errors.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` held connections were closed by the client.
    pub async fn wait_closed_by_client(&self, n: usize) {
        wait_count(&self.closed_by_client, n, || {
            "held proxy connections closed by the client".to_string()
        })
        .await;
    }

    /// Waits (bounded) until `n` TLS handshakes with the proxy have failed.
    pub async fn wait_tls_failures(&self, n: usize) {
        wait_count(&self.tls_failures, n, || {
            format!(
                "failed TLS handshakes at the proxy (errors: {:?})",
                self.tls_errors()
            )
        })
        .await;
    }
}

async fn wait_count(counter: &AtomicUsize, n: usize, what: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = counter.load(Ordering::SeqCst);
        if now >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} {} expected within {WAIT:?}; {now} so far",
            what()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Builds a [`ConnectProxy`].
pub struct ConnectProxyBuilder {
    tls: Option<ServerConfig>,
    credentials: Option<(String, String)>,
    script: Vec<ProxyBehavior>,
    names: HashMap<String, IpAddr>,
}

impl ConnectProxyBuilder {
    /// Serve TLS with this config (an `https://` proxy).
    pub fn tls(mut self, config: ServerConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Serve TLS presenting `id` (no client certificate asked).
    pub fn tls_identity(self, id: &Identity) -> Self {
        self.tls(proxy_tls_config(id))
    }

    /// Require `Proxy-Authorization: Basic base64(user:pass)`.
    pub fn credentials(mut self, user: &str, pass: &str) -> Self {
        self.credentials = Some((user.to_string(), pass.to_string()));
        self
    }

    /// Connection `i` follows `script[i]`, the last entry repeating.
    pub fn script(mut self, script: Vec<ProxyBehavior>) -> Self {
        assert!(!script.is_empty(), "empty proxy script");
        self.script = script;
        self
    }

    pub fn behavior(self, behavior: ProxyBehavior) -> Self {
        self.script(vec![behavior])
    }

    /// The proxy resolves `name` (case-insensitive, IPv6 without brackets) to `ip`; the port
    /// is the target's.
    pub fn resolve(mut self, name: &str, ip: IpAddr) -> Self {
        self.names.insert(name.to_ascii_lowercase(), ip);
        self
    }

    pub async fn start(self) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            stats: ProxyStats::default(),
            credentials: Mutex::new(self.credentials),
            names: self.names,
        });
        let tls = self.tls.is_some();
        let acceptor = self.tls.map(|c| TlsAcceptor::from(Arc::new(c)));
        let script = self.script;
        let task_shared = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting this task ends them all.
            let mut conns = JoinSet::new();
            let mut index = 0;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let _ = tcp.set_nodelay(true);
                let behavior = script[index.min(script.len() - 1)].clone();
                index += 1;
                task_shared.stats.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&task_shared);
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    match acceptor {
                        None => serve(tcp, behavior, &shared).await,
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(tls) => serve(tls, behavior, &shared).await,
                            Err(e) => {
                                shared.stats.tls_errors.lock().unwrap().push(e.to_string());
                                shared.stats.tls_failures.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                });
            }
        });
        ConnectProxy {
            addr,
            tls,
            shared,
            task,
        }
    }
}

struct Shared {
    stats: ProxyStats,
    credentials: Mutex<Option<(String, String)>>,
    names: HashMap<String, IpAddr>,
}

/// A running CONNECT proxy; stops (with every connection it holds) when dropped.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    /// A plain `http://` proxy that tunnels, knowing [`UPSTREAM_NAME`] as 127.0.0.1.
    pub fn builder() -> ConnectProxyBuilder {
        ConnectProxyBuilder {
            tls: None,
            credentials: None,
            script: vec![ProxyBehavior::Tunnel],
            names: HashMap::from([(UPSTREAM_NAME.to_string(), IpAddr::V4(Ipv4Addr::LOCALHOST))]),
        }
    }

    /// [`ConnectProxy::builder`] started as is.
    pub async fn start() -> ConnectProxy {
        ConnectProxy::builder().start().await
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// `http://127.0.0.1:PORT` (or `https://`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The URL with `userinfo@` (written as given: percent-encode it yourself).
    pub fn url_with_userinfo(&self, userinfo: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{userinfo}@{}", self.addr)
    }

    /// Changes the credentials the proxy requires from now on.
    pub fn set_credentials(&self, user: &str, pass: &str) {
        *self.shared.credentials.lock().unwrap() = Some((user.to_string(), pass.to_string()));
    }

    pub fn requests(&self) -> Vec<ProxyRequest> {
        self.stats().requests()
    }

    pub fn connects(&self) -> usize {
        self.stats().connects()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server config presenting `id`, without client authentication: what an https proxy uses.
pub fn proxy_tls_config(id: &Identity) -> ServerConfig {
    init_crypto();
    ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(id.chain(), id.key_der())
        .expect("proxy TLS config")
}

/// Reads one request head; returns it and the bytes read after it. `None` if the client closed
/// or sent garbage first.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Some((head, buf[end + 4..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match timeout(WAIT, io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn parse_head(head: &str) -> Option<ProxyRequest> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let version = parts.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(ProxyRequest {
        request_line,
        method,
        target,
        version,
        headers,
    })
}

/// `host:port` or `[v6]:port` → (host without brackets, port).
pub fn split_target(target: &str) -> Option<(String, u16)> {
    if let Some(rest) = target.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host.to_string(), port.parse().ok()?));
    }
    let (host, port) = target.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Whatever",
    }
}

/// Writes a complete answer with a body and a length (the connection stays open).
async fn answer<S: AsyncWrite + Unpin>(io: &mut S, code: u16, extra: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {code} {}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        status_text(code),
        body.len()
    );
    let _ = io.write_all(head.as_bytes()).await;
    let _ = io.flush().await;
}

/// Keeps the connection until the client closes it (bounded by [`WAIT`]); counts the close.
async fn hold<S: AsyncRead + Unpin>(io: &mut S, shared: &Shared) {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                shared.stats.closed_by_client.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(Ok(_)) => {}
            Err(_) => return,
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    behavior: ProxyBehavior,
    shared: &Shared,
) {
    let Some((head, early)) = read_head(&mut io).await else {
        return;
    };
    let Some(request) = parse_head(&head) else {
        answer(&mut io, 400, "", "bad request\n").await;
        return;
    };
    shared.stats.requests.lock().unwrap().push(request.clone());

    let wanted = shared.credentials.lock().unwrap().clone();
    if let Some((user, pass)) = wanted {
        let expected = basic(&user, &pass);
        let given = request.proxy_authorization().unwrap_or_default();
        // The scheme is case-insensitive, the credentials are not.
        let ok = given
            .split_once(' ')
            .zip(expected.split_once(' '))
            .is_some_and(|((gs, gc), (es, ec))| gs.eq_ignore_ascii_case(es) && gc.trim() == ec);
        if !ok {
            shared.stats.auth_refused.fetch_add(1, Ordering::SeqCst);
            answer(
                &mut io,
                407,
                "Proxy-Authenticate: Basic realm=\"mtls-test\"\r\n",
                "proxy authentication required by the test proxy\n",
            )
            .await;
            hold(&mut io, shared).await;
            return;
        }
    }

    match behavior {
        ProxyBehavior::Tunnel
        | ProxyBehavior::TunnelSplitHeader
        | ProxyBehavior::TunnelAfter(_) => {
            if let ProxyBehavior::TunnelAfter(delay) = behavior {
                tokio::time::sleep(delay).await;
            }
            if request.method != "CONNECT" {
                answer(&mut io, 405, "", "only CONNECT here\n").await;
                hold(&mut io, shared).await;
                return;
            }
            let target = split_target(&request.target).and_then(|(host, port)| {
                let ip = shared
                    .names
                    .get(&host.to_ascii_lowercase())
                    .copied()
                    .or_else(|| host.parse::<IpAddr>().ok().filter(IpAddr::is_loopback))?;
                Some(SocketAddr::new(ip, port))
            });
            let Some(target) = target else {
                answer(&mut io, 502, "", "unknown host at the test proxy\n").await;
                hold(&mut io, shared).await;
                return;
            };
            let Ok(Ok(mut up)) = timeout(WAIT, TcpStream::connect(target)).await else {
                answer(&mut io, 502, "", "the test proxy cannot connect\n").await;
                hold(&mut io, shared).await;
                return;
            };
            let _ = up.set_nodelay(true);
            let ok = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: mtls-test-proxy\r\n\r\n";
            if matches!(behavior, ProxyBehavior::TunnelSplitHeader) {
                for b in ok {
                    if io.write_all(&[*b]).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            } else if io.write_all(ok).await.is_err() || io.flush().await.is_err() {
                return;
            }
            shared.stats.tunnels.fetch_add(1, Ordering::SeqCst);
            if !early.is_empty() && up.write_all(&early).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
            shared.stats.tunnels_closed.fetch_add(1, Ordering::SeqCst);
        }
        ProxyBehavior::Status(code) => {
            answer(&mut io, code, "", &format!("the test proxy says {code}\n")).await;
            hold(&mut io, shared).await;
        }
        ProxyBehavior::Raw { bytes, close } => {
            let _ = io.write_all(&bytes).await;
            let _ = io.flush().await;
            if close {
                let _ = io.shutdown().await;
            } else {
                hold(&mut io, shared).await;
            }
        }
        ProxyBehavior::CloseWithoutAnswer => {
            let _ = io.shutdown().await;
        }
        ProxyBehavior::Hang => hold(&mut io, shared).await,
    }
}

#[test]
fn split_target_reads_names_and_brackets() {
    assert_eq!(
        split_target("upstream.mtls-test.invalid:8443"),
        Some(("upstream.mtls-test.invalid".into(), 8443))
    );
    assert_eq!(split_target("[::1]:443"), Some(("::1".into(), 443)));
    assert_eq!(split_target("::1:443"), None);
    assert_eq!(split_target("nohost"), None);
    assert_eq!(
        basic("Aladdin", "open sesame"),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
}
