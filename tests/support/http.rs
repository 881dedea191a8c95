//! Both sides of the proxy in http mode.
//!
//! Upstream side: [`HttpUpstream`], an mTLS server built from tokio-rustls and hyper that speaks
//! h2 or HTTP/1.1 as ALPN decides and records what reached it: each TLS connection (the ALPN
//! protocols offered and agreed, SNI, the client certificate's serial, whether it has closed)
//! and each request (method, target, version, `:authority`, every header). Paths select what
//! it answers (see [`HttpUpstream`]). [`RawUpstream`] is a hand-written HTTP/1.1 server for the
//! cases hyper will not produce: closing an idle connection without a word, resetting after a
//! request's head.
//!
//! App side: hyper clients over plain TCP (HTTP/1.1 and h2c with prior knowledge), raw request
//! helpers for what a well-behaved client never sends, and checks of the proxy's own error
//! answers. Every wait is bounded.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls::server::Acceptor;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::pki::{common_name, serial_of};
use super::upstream::server_config;
use super::{Cmd, Pki, WAIT, connect, hex, pattern, run_cmd};

/// The `Host` the app sends; the upstream must never see it.
pub const APP_HOST: &str = "app.invalid";

/// Transfers of many MiB get longer than [`WAIT`]: a debug build on 2 loaded cores is slow.
pub const BIG_WAIT: Duration = Duration::from_secs(90);

/// `mtls-sidecar run --mode http` towards `upstream` with the test identity and CA.
pub fn http_cmd(pki: &Pki, upstream: impl std::fmt::Display) -> Cmd {
    run_cmd(pki, upstream).args(["--mode", "http"])
}

/// Polls `pred` until it holds; fails with `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// The one body type of both sides.
pub type Body = BoxBody<Bytes, io::Error>;

pub type FrameTx = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body fed frame by frame through a channel; it ends when the sender is dropped. It has no
/// known length, so HTTP/1.1 sends it chunked.
pub fn channel_body() -> (FrameTx, Body) {
    let (tx, rx) = mpsc::channel(2);
    (tx, ChanBody(rx).boxed())
}

struct ChanBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl HttpBody for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

fn incoming(body: Incoming) -> Body {
    body.map_err(io::Error::other).boxed()
}

fn text(status: u16, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(body.into()))
        .expect("response")
}

// ---------------------------------------------------------------------------------------------
// Upstream records

/// Which ALPN protocols an upstream agrees to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` and `http/1.1`: the proxy should get h2.
    H2AndHttp11,
    /// `http/1.1` only.
    Http11,
    /// No ALPN at all (a server that ignores the extension): HTTP/1.1.
    None,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2AndHttp11 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::None => vec![],
        }
    }

    /// The protocol version requests should arrive in.
    pub fn version(self) -> Version {
        match self {
            Alpn::H2AndHttp11 => Version::HTTP_2,
            _ => Version::HTTP_11,
        }
    }
}

/// One TLS connection the upstream completed.
#[derive(Clone, Debug)]
pub struct UpConn {
    pub id: usize,
    /// what the client offered in its ClientHello, in order
    pub offered_alpn: Vec<String>,
    pub alpn: Option<String>,
    pub sni: Option<String>,
    pub client_serial: Option<String>,
    pub client_cn: Option<String>,
    /// the connection has ended (either side closed it)
    pub closed: bool,
}

/// One request as the upstream's application saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// [`UpConn::id`] of the connection it came on
    pub conn: usize,
    pub method: String,
    /// path and query
    pub target: String,
    pub version: Version,
    /// the URI's authority: `:authority` in h2; none in HTTP/1.1 origin form
    pub authority: Option<String>,
    /// (lowercase name, value), in order
    pub headers: Vec<(String, String)>,
}

impl Seen {
    fn of<B>(req: &Request<B>, conn: usize) -> Seen {
        Seen {
            conn,
            method: req.method().to_string(),
            target: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            version: req.version(),
            authority: req.uri().authority().map(|a| a.to_string()),
            headers: header_pairs(req.headers()),
        }
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
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

    /// What names the upstream's virtual host: `:authority` in h2 (a `host` header there must
    /// agree), `Host` in HTTP/1.1.
    pub fn host(&self) -> Option<&str> {
        if self.version == Version::HTTP_2 {
            if let (Some(host), Some(authority)) = (self.get("host"), self.authority.as_deref()) {
                assert_eq!(
                    host, authority,
                    "h2 request with a host header that disagrees with :authority: {self:?}"
                );
            }
            self.authority.as_deref().or(self.get("host"))
        } else {
            self.get("host")
        }
    }

    pub fn id(&self) -> Option<&str> {
        self.get("x-request-id")
    }
}

pub fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[derive(Default)]
pub struct HttpStats {
    pub tcp_accepted: AtomicUsize,
    pub handshake_failures: AtomicUsize,
    /// request body bytes read by `/upload`, over all requests
    pub upload_bytes: AtomicU64,
    conns: Mutex<Vec<UpConn>>,
    requests: Mutex<Vec<Seen>>,
}

impl HttpStats {
    pub fn conns(&self) -> Vec<UpConn> {
        self.conns.lock().unwrap().clone()
    }

    pub fn tls_accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn closed(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.closed)
            .count()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn conn(&self, id: usize) -> UpConn {
        self.conns.lock().unwrap()[id].clone()
    }

    /// The only request carrying `x-request-id: id` (fails if there are none or several).
    pub fn request(&self, id: &str) -> Seen {
        let found: Vec<Seen> = self
            .requests()
            .into_iter()
            .filter(|s| s.id() == Some(id))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "the upstream saw request {id} {} times: {found:#?}",
            found.len()
        );
        found.into_iter().next().unwrap()
    }

    /// Waits until at least `n` requests have reached the upstream's application.
    pub async fn wait_requests(&self, n: usize) -> Vec<Seen> {
        eventually(&format!("{n} requests at the upstream"), WAIT, || {
            self.request_count() >= n
        })
        .await;
        self.requests()
    }

    /// Waits until connection `id` has closed.
    pub async fn wait_closed(&self, id: usize, limit: Duration) {
        eventually(&format!("upstream connection {id} closed"), limit, || {
            self.conn(id).closed
        })
        .await;
    }

    fn add_conn(&self, mut conn: UpConn) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conn.id = conns.len();
        conns.push(conn);
        conns.len() - 1
    }

    fn set_closed(&self, id: usize) {
        self.conns.lock().unwrap()[id].closed = true;
    }
}

/// The TLS handshake of one accepted connection, recorded; `None` if it failed.
async fn accept_tls(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: &HttpStats,
) -> Option<(TlsStream<TcpStream>, usize)> {
    let failed = || stats.handshake_failures.fetch_add(1, Ordering::SeqCst);
    let Ok(start) = LazyConfigAcceptor::new(Acceptor::default(), tcp).await else {
        failed();
        return None;
    };
    let offered_alpn = start
        .client_hello()
        .alpn()
        .map(|protos| {
            protos
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Ok(tls) = start.into_stream(config).await else {
        failed();
        return None;
    };
    let conn = tls.get_ref().1;
    let client_der = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let id = stats.add_conn(UpConn {
        id: 0,
        offered_alpn,
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        sni: conn.server_name().map(str::to_owned),
        client_serial: client_der.as_deref().map(serial_of),
        client_cn: client_der.as_deref().and_then(common_name),
        closed: false,
    });
    Some((tls, id))
}

// ---------------------------------------------------------------------------------------------
// The hyper upstream

/// An mTLS HTTP server on 127.0.0.1:0 that requires a client certificate from the test CA.
/// It stops when dropped. What it answers, by path:
///
/// - `/upload`: reads the whole body, answers `LEN SHA256HEX\n` and a `trailer NAME=VALUE`
///   line per request trailer
/// - `/echo`: streams the request body back
/// - `/download?len=N&seed=S[&gate=1]`: N pseudo-random bytes ([`pattern`]) in 64 KiB frames
///   with no length announced (chunked in HTTP/1.1); with `gate=1` it stops after the first
///   frame until [`HttpUpstream::release`]
/// - `/trailers`: a body, then trailers `x-checksum` (SHA-256 hex of the body) and
///   `grpc-status: 0`, announced in a `trailer` header
/// - `/hold`: answers `released\n` once [`HttpUpstream::release`] was called
/// - `/ws`: a WebSocket-style upgrade (HTTP/1.1 only): `101`, then `welcome\n`, then echo
/// - `/resp-hop`: a response carrying hop-by-hop headers and `x-resp-custom: kept`
/// - `/status/NNN`: status NNN
/// - anything else: `200 ok\n`
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<HttpStats>,
    gate: watch::Sender<bool>,
    kill: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl HttpUpstream {
    /// The good server identity (`localhost`, 127.0.0.1) agreeing to `alpn`.
    pub async fn start(pki: &Pki, alpn: Alpn) -> HttpUpstream {
        HttpUpstream::with_config(server_config(&pki.server, &[&pki.ca.der]), alpn).await
    }

    pub async fn with_config(config: ServerConfig, alpn: Alpn) -> HttpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        HttpUpstream::serve(listener, config, alpn)
    }

    /// On a given address (e.g. port 443).
    pub async fn start_on(pki: &Pki, alpn: Alpn, addr: SocketAddr) -> io::Result<HttpUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let config = server_config(&pki.server, &[&pki.ca.der]);
        Ok(HttpUpstream::serve(listener, config, alpn))
    }

    fn serve(listener: TcpListener, mut config: ServerConfig, alpn: Alpn) -> HttpUpstream {
        config.alpn_protocols = alpn.protocols();
        let config = Arc::new(config);
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(HttpStats::default());
        let (gate, gate_rx) = watch::channel(false);
        let (kill, kill_rx) = watch::channel(0);
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting this task ends them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_conn(
                    Arc::clone(&config),
                    tcp,
                    Arc::clone(&task_stats),
                    gate_rx.clone(),
                    kill_rx.clone(),
                ));
            }
        });
        HttpUpstream {
            addr,
            stats,
            gate,
            kill,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Lets every held `/hold` and gated `/download` go on, now and from now on.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Drops every open connection without a word: no GOAWAY, no `Connection: close`, no
    /// close_notify, just a FIN. Connections made later are not affected.
    pub fn drop_connections(&self) {
        self.kill.send_modify(|n| *n += 1);
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: Arc<HttpStats>,
    gate: watch::Receiver<bool>,
    mut kill: watch::Receiver<u64>,
) {
    // Only a drop_connections() from now on concerns this connection.
    kill.borrow_and_update();
    let Some((tls, id)) = accept_tls(config, tcp, &stats).await else {
        return;
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc_stats = Arc::clone(&stats);
    let svc = service_fn(move |req| handle(req, id, Arc::clone(&svc_stats), gate.clone()));
    let io = TokioIo::new(tls);
    let serve = async move {
        if h2 {
            // Large enough that the proxy's header limit, not ours, is what a test meets.
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(1 << 20)
                .serve_connection(io, svc)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        }
    };
    // Dropping `serve` drops the TLS stream: the socket closes with no TLS or HTTP goodbye.
    tokio::select! {
        () = serve => {}
        _ = kill.changed() => {}
    }
    stats.set_closed(id);
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn handle(
    req: Request<Incoming>,
    conn: usize,
    stats: Arc<HttpStats>,
    gate: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    stats.requests.lock().unwrap().push(Seen::of(&req, conn));
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    Ok(match path.as_str() {
        "/upload" => upload(req, &stats).await,
        "/echo" => Response::new(incoming(req.into_body())),
        "/download" => download(&query, gate),
        "/trailers" => with_trailers(),
        "/hold" => {
            let mut gate = gate;
            let _ = gate.wait_for(|open| *open).await;
            text(200, "released\n")
        }
        "/ws" => websocket(req),
        "/resp-hop" => Response::builder()
            .header(header::CONNECTION, "x-resp-drop")
            .header("x-resp-drop", "1")
            .header("keep-alive", "timeout=7")
            .header(header::PROXY_AUTHENTICATE, "Basic realm=\"upstream\"")
            .header("x-resp-custom", "kept")
            .body(full("ok\n"))
            .expect("response"),
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            text(code, format!("status {code}\n"))
        }
        _ => text(200, "ok\n"),
    })
}

async fn upload(req: Request<Incoming>, stats: &HttpStats) -> Response<Body> {
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut trailers = String::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return text(400, format!("request body error after {len} bytes: {e}\n")),
        };
        match frame.into_data() {
            Ok(data) => {
                len += data.len() as u64;
                hasher.update(&data);
                stats
                    .upload_bytes
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    for (name, value) in header_pairs(&t) {
                        trailers.push_str(&format!("trailer {name}={value}\n"));
                    }
                }
            }
        }
    }
    text(
        200,
        format!("{len} {}\n{trailers}", hex(&hasher.finalize())),
    )
}

/// 64 KiB frames of `pattern(seed, len)`.
fn download(query: &str, gate: watch::Receiver<bool>) -> Response<Body> {
    let len: usize = query_param(query, "len")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seed: u64 = query_param(query, "seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let gated = query_param(query, "gate") == Some("1");
    let data = Bytes::from(pattern(seed, len));
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let mut gate = gate;
        let mut at = 0;
        while at < data.len() {
            if gated && at > 0 {
                let _ = gate.wait_for(|open| *open).await;
            }
            let end = (at + 64 * 1024).min(data.len());
            if tx.send(Ok(Frame::data(data.slice(at..end)))).await.is_err() {
                return;
            }
            at = end;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .expect("response")
}

pub const TRAILERS_BODY: &str = "body before the trailers\n";

fn with_trailers() -> Response<Body> {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from(TRAILERS_BODY)))).await;
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "x-checksum",
            hex(&super::sha256(TRAILERS_BODY.as_bytes()))
                .parse()
                .unwrap(),
        );
        trailers.insert("grpc-status", "0".parse().unwrap());
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::TRAILER, "x-checksum, grpc-status")
        .body(body)
        .expect("response")
}

pub const WS_WELCOME: &[u8] = b"welcome\n";

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let connection = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok());
    if req.version() != Version::HTTP_11
        || !has_token(upgrade, "websocket")
        || !has_token(connection, "upgrade")
    {
        return text(
            400,
            format!("not an upgrade request: {:?}\n", header_pairs(headers)),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        if io.write_all(WS_WELCOME).await.is_err() || io.flush().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .body(empty())
        .expect("response")
}

// ---------------------------------------------------------------------------------------------
// The hand-written HTTP/1.1 upstream

/// What [`RawUpstream`] does on each connection after reading one request head.
#[derive(Clone, Copy, Debug)]
pub enum RawBehavior {
    /// Answer `200 ok\n` (keep-alive: no `Connection: close`), then close the connection
    /// without a word: no close_notify, just a FIN.
    CloseAfterResponse,
    /// Reset the TCP connection (RST) without answering.
    ResetAfterHead,
}

/// An HTTP/1.1-only mTLS upstream written by hand: one request per connection.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<HttpStats>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(pki: &Pki, behavior: RawBehavior) -> RawUpstream {
        let mut config = server_config(&pki.server, &[&pki.ca.der]);
        config.alpn_protocols = Alpn::Http11.protocols();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(HttpStats::default());
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(raw_conn(
                    Arc::clone(&config),
                    tcp,
                    Arc::clone(&task_stats),
                    behavior,
                ));
            }
        });
        RawUpstream { addr, stats, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_conn(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: Arc<HttpStats>,
    behavior: RawBehavior,
) {
    let Some((mut tls, id)) = accept_tls(config, tcp, &stats).await else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = find(&head, b"\r\n\r\n") {
            break end;
        }
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => {
                stats.set_closed(id);
                return;
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let seen = Seen {
        conn: id,
        method: first.next().unwrap_or_default().to_string(),
        target: first.next().unwrap_or_default().to_string(),
        version: Version::HTTP_11,
        authority: None,
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
    };
    stats.requests.lock().unwrap().push(seen);
    match behavior {
        RawBehavior::CloseAfterResponse => {
            let answer =
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
            let _ = tls.write_all(answer).await;
            let _ = tls.flush().await;
            // Dropped without shutdown(): no close_notify, a bare FIN.
            drop(tls);
        }
        RawBehavior::ResetAfterHead => {
            let (tcp, _) = tls.into_inner();
            tcp.set_zero_linger().expect("SO_LINGER 0");
            drop(tcp);
        }
    }
    stats.set_closed(id);
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// App side: hyper clients

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a response's whole body and trailers (within `limit`).
pub async fn read_reply_within(resp: Response<Incoming>, limit: Duration) -> Reply {
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| {
                panic!(
                    "reading a {} response body (after {} bytes): {e}",
                    parts.status,
                    data.len()
                )
            });
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
    };
    if timeout(limit, read).await.is_err() {
        panic!(
            "a {} response body did not end within {limit:?} ({} bytes so far)",
            parts.status,
            data.len()
        );
    }
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    }
}

pub async fn read_reply(resp: Response<Incoming>) -> Reply {
    read_reply_within(resp, WAIT).await
}

/// A request for an HTTP/1.1 app connection: origin-form target, `Host: app.invalid`.
pub fn h1_req(method: &str, target: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, APP_HOST)
}

/// A request for an h2c app connection: `:authority` app.invalid.
pub fn h2_req(method: &str, target: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{APP_HOST}{target}"))
}

/// An HTTP/1.1 keep-alive connection to the proxy (upgrades enabled).
pub struct H1Client {
    pub sender: hyper::client::conn::http1::SendRequest<Body>,
    pub conn: JoinHandle<hyper::Result<()>>,
}

impl H1Client {
    pub async fn connect(addr: SocketAddr) -> H1Client {
        let tcp = connect(addr).await;
        let (sender, conn) = timeout(
            WAIT,
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
        )
        .await
        .expect("HTTP/1.1 handshake timed out")
        .expect("HTTP/1.1 handshake");
        let conn = tokio::spawn(conn.with_upgrades());
        H1Client { sender, conn }
    }

    /// Sends and waits for the response head.
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        timeout(WAIT, self.sender.ready())
            .await
            .expect("HTTP/1.1 connection not ready in time")
            .expect("HTTP/1.1 connection closed");
        let what = format!("{} {}", req.method(), req.uri());
        timeout(WAIT, self.sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    pub async fn call(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }
}

/// One request on a connection of its own.
pub async fn h1_call(addr: SocketAddr, req: Request<Body>) -> Reply {
    H1Client::connect(addr).await.call(req).await
}

/// An h2c (prior knowledge) connection to the proxy; clones share it.
#[derive(Clone)]
pub struct H2Client {
    pub sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl H2Client {
    pub async fn connect(addr: SocketAddr) -> H2Client {
        let tcp = connect(addr).await;
        let (sender, conn) = timeout(
            WAIT,
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
        )
        .await
        .expect("h2c handshake timed out")
        .expect("h2c handshake");
        tokio::spawn(conn);
        H2Client { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        timeout(WAIT, self.sender.ready())
            .await
            .expect("h2c connection not ready in time")
            .expect("h2c connection closed");
        let what = format!("{} {}", req.method(), req.uri());
        timeout(WAIT, self.sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    pub async fn call(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }
}

// ---------------------------------------------------------------------------------------------
// App side: raw HTTP/1.1

/// A response parsed from raw bytes.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    /// (lowercase name, value)
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses one response from the start of `raw`; `Ok(None)` if it is not complete yet.
/// Returns the response and how many bytes it took. A response without a length ends at the
/// end of `raw` only when `at_eof`.
pub fn parse_raw(raw: &[u8], at_eof: bool) -> Result<Option<(RawReply, usize)>, String> {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return if at_eof && !raw.is_empty() {
            Err(format!(
                "connection ended inside a response head: {:?}",
                String::from_utf8_lossy(raw)
            ))
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut at = head_end + 4;
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(line_end) = find(&raw[at..], b"\r\n") else {
                return Ok(None);
            };
            let size_line = String::from_utf8_lossy(&raw[at..at + line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
            at += line_end + 2;
            if size == 0 {
                // Trailer section up to an empty line.
                let Some(end) = find(&raw[at - 2..], b"\r\n\r\n") else {
                    return Ok(None);
                };
                at = at - 2 + end + 4;
                break body;
            }
            if raw.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&raw[at..at + size]);
            at += size + 2;
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if raw.len() < at + len {
            return Ok(None);
        }
        at += len;
        raw[at - len..at].to_vec()
    } else if at_eof {
        let body = raw[at..].to_vec();
        at = raw.len();
        body
    } else {
        return Ok(None);
    };
    Ok(Some((
        RawReply {
            status,
            headers,
            body,
        },
        at,
    )))
}

/// Reads from `stream` until one response (after any 1xx but 101) is complete; bytes after it
/// stay in `buf`. Fails on a connection closed without one, or after `limit`.
pub async fn read_raw_reply(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    limit: Duration,
) -> RawReply {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 64 * 1024];
    let mut eof = false;
    loop {
        match parse_raw(buf, eof) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                if (100..200).contains(&reply.status) && reply.status != 101 {
                    continue;
                }
                return reply;
            }
            Ok(None) if eof => panic!(
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => eof = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => eof = true,
            Ok(Err(e)) => panic!("reading a response: {e}"),
            Err(_) => panic!(
                "no complete response within {limit:?}; got {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Writes `request` on a new connection while reading one response (write errors are ignored:
/// the proxy may answer and close before reading it all).
pub async fn raw_call(addr: SocketAddr, request: &[u8]) -> RawReply {
    let (mut rd, mut wr) = connect(addr).await.into_split();
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let reply = read_raw_reply(&mut rd, &mut Vec::new(), WAIT).await;
    writer.abort();
    reply
}

// ---------------------------------------------------------------------------------------------
// The proxy's own answers

/// Checks an answer the proxy made itself: `status`, `text/plain`, one line starting
/// `mtls-sidecar:` followed by the reason key `key` and some explanation.
pub fn assert_sidecar_error(
    status: u16,
    content_type: Option<&str>,
    body: &str,
    want: u16,
    key: &str,
) {
    let what = format!("status {status}, content-type {content_type:?}, body {body:?}");
    assert_eq!(status, want, "the proxy's answer: {what}");
    assert!(
        content_type.is_some_and(|ct| ct.starts_with("text/plain")),
        "the proxy's {want} is not text/plain: {what}"
    );
    let line = body.strip_suffix('\n').unwrap_or(body);
    let line = line.strip_suffix('\r').unwrap_or(line);
    assert!(
        !line.contains('\n') && !line.is_empty(),
        "the proxy's {want} body is not one line: {what}"
    );
    let rest = line
        .strip_prefix("mtls-sidecar:")
        .unwrap_or_else(|| panic!("the proxy's {want} body does not start `mtls-sidecar:`: {what}"))
        .trim_start();
    let reason: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    assert_eq!(reason, key, "the reason key after `mtls-sidecar:`: {what}");
    let sentence = &rest[reason.len()..];
    assert!(
        sentence.chars().filter(|c| c.is_alphabetic()).count() >= 5,
        "no explanation after the reason key: {what}"
    );
}

pub fn assert_reply_is_sidecar_error(reply: &Reply, want: u16, key: &str) {
    assert_sidecar_error(
        reply.status.as_u16(),
        reply.header("content-type"),
        &reply.text(),
        want,
        key,
    );
}
