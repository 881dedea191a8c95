//! HTTP mode: the app speaks HTTP/1.1 or h2c (prior knowledge) to the listener; each request
//! goes upstream over a pool of long-lived mTLS connections (hyper-util's pooled client), h2 or
//! http/1.1 as the upstream picks by ALPN, so apps that open a connection per request no longer
//! pay a handshake each.
//!
//! The pool belongs to one identity: when a reload publishes a new client configuration, the
//! next request builds a new pool and the old one is dropped with its idle connections (busy
//! ones finish their requests first).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use rustls::ClientConfig;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::RouteCtx;
use super::framing;
use super::watch::{ConnWatch, Expired, InFlight, Watched};
use crate::failure::{self, Class, Failure};
use crate::upstream;

type Body = BoxBody<Bytes, hyper::Error>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body that adds the size of every data frame passing through to a counter
/// (`bytes_total`): one atomic add per frame.
struct Counted<B> {
    inner: B,
    counter: Counter,
    /// For a response body: the route whose upstream failed mid-body, logged at warn (the app
    /// only sees its connection or stream cut).
    upstream_of: Option<Arc<RouteCtx>>,
    /// For a response body of an h2 app connection's request to an HTTP/1.1 upstream: its
    /// turn among the connection's [`LANE_H1_EXCHANGES`], given back when the body is dropped.
    _exchange: Option<OwnedSemaphorePermit>,
    /// For a response body to an h2 app: the app connection's [`Budget`], which every data
    /// frame passing through is charged to until hyper has written or dropped it.
    budget: Option<Arc<Budget>>,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(budget) = &this.budget {
            std::task::ready!(budget.poll_room(cx));
        }
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        match &mut r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_mut() {
                    this.counter.inc_by(data.len() as u64);
                    if let Some(budget) = &this.budget {
                        *data = budget.charge(std::mem::take(data));
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(ctx) = &this.upstream_of {
                    warn!(route = %ctx.route.name, error = ?e.to_string(), "upstream response body failed");
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Response data one h2 app connection may hold in memory at once: taken from the upstream but
/// not yet written to the app's socket (hyper's per-stream queues, h2's send buffers). With the
/// lane's connection window on the other side, an app that never reads costs about 1 MiB
/// however many streams it opens; an app that reads is never held back by it.
const H2_APP_HELD: usize = 512 * 1024;

/// The bytes of [`H2_APP_HELD`] in use on one app connection, and the streams waiting for room.
#[derive(Default)]
struct Budget {
    live: AtomicUsize,
    waiting: std::sync::Mutex<Vec<Waker>>,
}

impl Budget {
    /// Ready when the connection holds less than [`H2_APP_HELD`]; otherwise the stream is
    /// woken when data it or another stream handed on has been written or dropped.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.live.load(Ordering::SeqCst) < H2_APP_HELD {
            return Poll::Ready(());
        }
        let Ok(mut waiting) = self.waiting.lock() else {
            return Poll::Ready(());
        };
        // Checked again under the lock: a release in between has already woken the list.
        if self.live.load(Ordering::SeqCst) < H2_APP_HELD {
            return Poll::Ready(());
        }
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// `data`, charged to the budget until the last copy of it is dropped.
    fn charge(self: &Arc<Self>, data: Bytes) -> Bytes {
        self.live.fetch_add(data.len(), Ordering::SeqCst);
        Bytes::from_owner(Charged {
            data,
            budget: self.clone(),
        })
    }

    fn release(&self, n: usize) {
        let left = self.live.fetch_sub(n, Ordering::SeqCst) - n;
        if left < H2_APP_HELD
            && let Ok(mut waiting) = self.waiting.lock()
        {
            for w in waiting.drain(..) {
                w.wake();
            }
        }
    }
}

/// Response data in hyper's hands, charged to its connection's [`Budget`].
struct Charged {
    data: Bytes,
    budget: Arc<Budget>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.data.len());
    }
}

/// A request body that must keep moving: no frame for `--idle-timeout` ends it with an error, so
/// the upstream sees the request cut off rather than waiting for the rest forever. The
/// connection watch already bounds a silent connection, but an h2 connection stays busy while
/// one of its streams stalls, so the bound must also be per request.
struct Moving<B> {
    inner: B,
    idle: Option<Duration>,
    /// Armed at the first wait, pushed back after every frame (one allocation per body).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame passed since the timer was last armed.
    moved: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for --idle-timeout")]
struct BodyStalled;

impl<B> Moving<B> {
    fn new(inner: B, idle: Option<Duration>) -> Self {
        Moving {
            inner,
            idle,
            timer: None,
            moved: false,
        }
    }
}

impl<B> hyper::body::Body for Moving<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(r.map(|r| r.map_err(Into::into)));
        }
        let Some(idle) = this.idle else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::now() + idle;
        let timer = match &mut this.timer {
            Some(t) => {
                if std::mem::take(&mut this.moved) {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Request headers larger than this get `431`.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Receive window of one upstream h2 stream. A stream whose app stops reading holds at most this
/// much, and the connection window below is [`H2_STALLED_STREAMS`] times it, so that many
/// never-reading apps fill only their own streams and the rest of the connection flows on.
/// 256 KiB still moves about 5 MB/s per stream at 50 ms round trip.
const UPSTREAM_H2_STREAM_WINDOW: u32 = 256 * 1024;

/// Stalled streams one upstream h2 connection absorbs before its shared window is used up.
const H2_STALLED_STREAMS: u32 = 128;

/// Receive window of one upstream h2 connection (32 MiB): memory is only spent on it while apps
/// do not read, and then at most [`UPSTREAM_H2_STREAM_WINDOW`] per stream.
const UPSTREAM_H2_CONN_WINDOW: u32 = UPSTREAM_H2_STREAM_WINDOW * H2_STALLED_STREAMS;

/// A pooled h2 connection that received nothing for this long is sent a PING ...
const H2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// ... and closed if the answer takes longer than this: a peer that vanished without a FIN is
/// noticed within 50 s, even while the connection sits idle in the pool.
const H2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// An h2 app connection's own upstream h2 connection (its lane, see [`Lane`]): what all its
/// streams together may hold unread (the connection window) and each one alone (the stream
/// window). 512 KiB still moves about 10 MB/s per app connection at 50 ms round trip.
const LANE_CONN_WINDOW: u32 = 512 * 1024;
const LANE_STREAM_WINDOW: u32 = 128 * 1024;

/// Requests of one h2 app connection that may be at an HTTP/1.1 upstream at once; the others
/// wait their turn, as a browser's seventh request to one host does. Each holds an upstream
/// connection (about 180 KiB while the app does not read its answer).
const LANE_H1_EXCHANGES: usize = 6;

/// What the route last learned the upstream speaks (from ALPN at each dial); 0 before the
/// first dial.
const SPEAKS_H1: u8 = 1;
const SPEAKS_H2: u8 = 2;

/// The route's HTTP side: the pool in force and what requests are rewritten with.
pub struct HttpRoute {
    ctx: Arc<RouteCtx>,
    /// `Host` / `:authority` sent upstream: the server name, with `:PORT` unless 443.
    authority: HeaderValue,
    /// The authority of every upstream URI.
    uri_authority: hyper::http::uri::Authority,
    pool: ArcSwap<Pool>,
    /// `--pool-max-connections` permits, shared by the pools of every identity: a connection
    /// holds one until it closes, so a reload does not double the bound.
    slots: Arc<Semaphore>,
    /// `SPEAKS_*`: what the last dial's ALPN agreed.
    speaks: Arc<Speaks>,
}

/// What the upstream speaks, as the last dial's ALPN agreed (`SPEAKS_*`), and a signal for
/// requests that wait for a turn while it is not known yet.
#[derive(Default)]
struct Speaks {
    alpn: AtomicU8,
    learned: Notify,
}

impl Speaks {
    fn get(&self) -> u8 {
        self.alpn.load(Ordering::Relaxed)
    }

    fn set(&self, h2: bool) {
        let now = if h2 { SPEAKS_H2 } else { SPEAKS_H1 };
        if self.alpn.swap(now, Ordering::Relaxed) != now {
            self.learned.notify_waiters();
        }
    }
}

/// Receive windows of a pool's upstream h2 connections.
#[derive(Clone, Copy)]
struct Windows {
    stream: u32,
    conn: u32,
    h2_only: bool,
}

/// The shared pool's windows.
const SHARED: Windows = Windows {
    stream: UPSTREAM_H2_STREAM_WINDOW,
    conn: UPSTREAM_H2_CONN_WINDOW,
    h2_only: false,
};

/// A lane's windows.
const LANE: Windows = Windows {
    stream: LANE_STREAM_WINDOW,
    conn: LANE_CONN_WINDOW,
    h2_only: true,
};

/// What one h2 app connection may hold upstream. On the shared pool each of its up to 100
/// streams would pin an upstream stream window (h2 upstream: 256 KiB each) or a whole upstream
/// connection (HTTP/1.1 upstream) while the app does not read, about 20 MiB in all. So an h2
/// app connection gets, towards an h2 upstream, an upstream connection of its own whose
/// connection window bounds all its streams together, and towards an HTTP/1.1 upstream at most
/// [`LANE_H1_EXCHANGES`] requests at once on the shared pool. HTTP/1.1 app connections carry
/// one request at a time and use the shared pool directly.
/// On the app side, what its streams hold is bounded by its [`Budget`].
struct Lane {
    h1_exchanges: Arc<Semaphore>,
    pool: std::sync::Mutex<Option<Arc<Pool>>>,
    budget: Arc<Budget>,
}

impl Lane {
    fn new() -> Self {
        Lane {
            h1_exchanges: Arc::new(Semaphore::new(LANE_H1_EXCHANGES)),
            pool: std::sync::Mutex::new(None),
            budget: Arc::default(),
        }
    }

    /// After a reload: drop the pool made with the old identity, so its idle connection closes
    /// now (busy ones finish their requests first) instead of lingering with a replaced
    /// certificate.
    fn retire(&self) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.take();
        }
    }
}

struct Pool {
    /// The identity the pool's connections were made with.
    config: Arc<ClientConfig>,
    client: Client<Connector, Moving<Counted<Incoming>>>,
}

impl HttpRoute {
    pub fn new(ctx: Arc<RouteCtx>) -> Self {
        let port = ctx.route.upstream.port;
        let name = &ctx.server_name;
        let host = if name.contains(':') {
            format!("[{name}]")
        } else {
            name.clone()
        };
        let authority = if port == 443 {
            host
        } else {
            format!("{host}:{port}")
        };
        let config = ctx.identity.current();
        let slots = Arc::new(Semaphore::new(ctx.route.http.pool_max_connections));
        let speaks = Arc::new(Speaks::default());
        let pool = Pool::new(&ctx, config, &slots, &speaks, SHARED);
        HttpRoute {
            slots,
            speaks,
            authority: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            // The server name was validated at startup; the fallback only keeps this total.
            uri_authority: authority
                .parse()
                .unwrap_or(hyper::http::uri::Authority::from_static("localhost")),
            pool: ArcSwap::from_pointee(pool),
            ctx,
        }
    }

    /// Watch for reloads: at each new identity, replace the pool at once, so the idle
    /// connections made with the old identity close without waiting for the next request.
    pub fn watch_reloads(self: &Arc<Self>) {
        let mut generations = self.ctx.identity.subscribe();
        let route = Arc::downgrade(self);
        tokio::spawn(async move {
            while generations.changed().await.is_ok() {
                let Some(route) = route.upgrade() else { return };
                let _ = route.client();
            }
        });
    }

    /// The pool for the identity in force, rebuilt after a reload.
    fn client(&self) -> Client<Connector, Moving<Counted<Incoming>>> {
        let config = self.ctx.identity.current();
        let current = self.pool.load();
        if Arc::ptr_eq(&current.config, &config) {
            return current.client.clone();
        }
        let fresh = Arc::new(Pool::new(
            &self.ctx,
            config,
            &self.slots,
            &self.speaks,
            SHARED,
        ));
        let client = fresh.client.clone();
        debug!(route = %self.ctx.route.name, "new identity: new upstream pool; idle connections of the old one close");
        self.pool.store(fresh);
        client
    }

    /// The client for one request of an h2 app connection, with the permit it must hold until
    /// its response ends (HTTP/1.1 upstream; see [`Lane`]). The lane's own pool is made at its
    /// first request and again after a reload.
    async fn lane_client(
        &self,
        lane: &Lane,
    ) -> (
        Client<Connector, Moving<Counted<Incoming>>>,
        Option<OwnedSemaphorePermit>,
    ) {
        while self.speaks.get() != SPEAKS_H2 {
            // Unknown counts as HTTP/1.1 until a dial has told (no lane is opened for nothing),
            // but a request waiting for its turn goes on in the lane as soon as it is known.
            let learned = self.speaks.learned.notified();
            tokio::pin!(learned);
            learned.as_mut().enable();
            if self.speaks.get() == SPEAKS_H2 {
                break;
            }
            tokio::select! {
                // The semaphore is never closed.
                permit = lane.h1_exchanges.clone().acquire_owned() => {
                    return (self.client(), permit.ok());
                }
                () = &mut learned => {}
            }
        }
        let config = self.ctx.identity.current();
        let Ok(mut pool) = lane.pool.lock() else {
            return (self.client(), None);
        };
        if let Some(p) = pool.as_ref().filter(|p| Arc::ptr_eq(&p.config, &config)) {
            return (p.client.clone(), None);
        }
        let fresh = Pool::new(&self.ctx, config, &self.slots, &self.speaks, LANE);
        let client = fresh.client.clone();
        *pool = Some(Arc::new(fresh));
        (client, None)
    }
}

impl Pool {
    fn new(
        ctx: &Arc<RouteCtx>,
        config: Arc<ClientConfig>,
        slots: &Arc<Semaphore>,
        speaks: &Arc<Speaks>,
        windows: Windows,
    ) -> Self {
        let http = &ctx.route.http;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(http.pool_idle_timeout)
            .pool_max_idle_per_host(http.pool_max_idle)
            // A request on a pooled connection that closed before the request was written is
            // sent again on a fresh one (the upstream never saw it).
            .retry_canceled_requests(true)
            .http2_initial_stream_window_size(windows.stream)
            .http2_initial_connection_window_size(windows.conn)
            .http2_keep_alive_interval(H2_PING_INTERVAL)
            .http2_keep_alive_timeout(H2_PING_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            // A lane is only opened to an upstream known to speak h2. Saying so makes
            // concurrent first requests wait for one connection instead of each dialing its own.
            .http2_only(windows.h2_only)
            .build(Connector {
                ctx: ctx.clone(),
                config: config.clone(),
                slots: slots.clone(),
                speaks: speaks.clone(),
            });
        Pool { config, client }
    }
}

/// Dials the upstream for the pool: our resolve/connect/handshake, with one more try when the
/// upstream refused the connection (the request has not been sent anywhere yet).
#[derive(Clone)]
struct Connector {
    ctx: Arc<RouteCtx>,
    config: Arc<ClientConfig>,
    slots: Arc<Semaphore>,
    speaks: Arc<Speaks>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let ctx = self.ctx.clone();
        let config = self.config.clone();
        let slots = self.slots.clone();
        let speaks = self.speaks.clone();
        Box::pin(async move {
            // Waiting for a slot is bounded like a dial; meanwhile the pool hands this request
            // any connection that falls idle.
            let wait = ctx.route.connect_timeout;
            let permit = match tokio::time::timeout(wait, slots.acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    let max = ctx.route.http.pool_max_connections;
                    return Err(Box::new(PoolFull { wait, max }) as BoxError);
                }
            };
            let mut attempt =
                upstream::connect(&ctx.route, ctx.proxy.as_deref(), config.clone()).await;
            if matches!(&attempt, Err(f) if f.class == Class::Refused) {
                attempt = upstream::connect(&ctx.route, ctx.proxy.as_deref(), config).await;
            }
            let m = &ctx.metrics;
            match attempt {
                Ok(c) => {
                    m.handshake.observe(c.handshake.as_secs_f64());
                    let conn = c.stream.get_ref().1;
                    if let Some(leaf) = conn.peer_certificates().and_then(|p| p.first()) {
                        m.upstream_leaf(leaf);
                    }
                    let h2 = conn.alpn_protocol() == Some(b"h2");
                    speaks.set(h2);
                    m.connection_finished(None);
                    Ok(UpstreamIo {
                        io: TokioIo::new(c.stream),
                        h2,
                        _slot: permit,
                    })
                }
                Err(f) => {
                    m.connection_finished(Some(f.class));
                    Err(Box::new(f) as BoxError)
                }
            }
        })
    }
}

/// A pooled upstream connection, telling the pool which protocol ALPN agreed.
struct UpstreamIo {
    io: TokioIo<upstream::Upstream>,
    h2: bool,
    /// This connection's `--pool-max-connections` slot, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in [
        header::TE,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(n);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// What the app is told about a class of upstream failure: a fixed sentence, so no resolved
/// address, file path or text from the peer or a proxy reaches the app (the warn line has them).
fn sentence(class: Class) -> &'static str {
    match class {
        Class::Dns => "the upstream name could not be resolved",
        Class::Refused => "the upstream refused the connection",
        Class::Unreachable => "the upstream address is unreachable",
        Class::Timeout => "the upstream did not answer within --connect-timeout",
        Class::UnknownIssuer => "the upstream certificate does not lead to a trusted CA",
        Class::NameMismatch => "the upstream certificate does not name the expected server",
        Class::Expired => "the upstream certificate has expired",
        Class::NotYetValid => "the upstream certificate is not valid yet",
        Class::ClientCertRejected => "the upstream rejected this proxy's client certificate",
        Class::Revoked => "the upstream certificate is revoked",
        Class::UriSanMismatch => "the upstream certificate lacks every required URI SAN",
        Class::PinMismatch => "the upstream certificate matches no pinned key",
        Class::Protocol => "the upstream broke the TLS or HTTP protocol",
        Class::Reset => "the upstream closed or reset the connection",
        Class::Io => "the connection to the upstream failed",
        Class::Idle => "the upstream connection was idle too long",
        Class::Drain => "the proxy is shutting down",
        Class::ProxyUnreachable => "the egress proxy cannot be reached",
        Class::ProxyAuth => "the egress proxy refused the credentials",
        Class::ProxyRefused => "the egress proxy refused the tunnel",
        Class::ProxyProtocol => "the egress proxy did not answer in HTTP",
        Class::ProxyTls => "the TLS handshake with the egress proxy failed",
    }
}

/// The proxy's own answer: `mtls-sidecar: <reason>: <sentence>`, one line of plain text.
fn own_response(code: StatusCode, reason: &str, sentence: &str) -> Response<Body> {
    let body = format!("mtls-sidecar: {reason}: {sentence}\n");
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to the app when the upstream could not serve: 504 for a connect timeout, 502
/// otherwise.
fn failure_response(f: &Failure) -> Response<Body> {
    let code = if f.class == Class::Timeout {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    own_response(code, f.class.reason(), sentence(f.class))
}

/// Every `--pool-max-connections` slot stayed taken for `--connect-timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "no upstream connection free within --connect-timeout {wait:?}: \
     all --pool-max-connections {max} are busy"
)]
struct PoolFull {
    wait: std::time::Duration,
    max: usize,
}

/// Why a request got no upstream answer.
enum Unserved {
    Failed(Failure),
    PoolFull(String),
}

/// Find our classified failure (from the connector) or an I/O cause in a client error.
fn classify(e: &(dyn std::error::Error + 'static), server_name: &str) -> Unserved {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(f) = err.downcast_ref::<Failure>() {
            return Unserved::Failed(f.clone());
        }
        if let Some(p) = err.downcast_ref::<PoolFull>() {
            return Unserved::PoolFull(p.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Unserved::Failed(failure::classify_io(io, server_name));
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return Unserved::Failed(Failure::new(
                Class::Reset,
                format!("the upstream closed the connection: {h}"),
            ));
        }
        cur = err.source();
    }
    Unserved::Failed(Failure::new(
        Class::Protocol,
        format!("upstream HTTP error: {e}"),
    ))
}

impl HttpRoute {
    /// Forward one request.
    async fn forward(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        lane: Arc<Lane>,
    ) -> Result<Response<Body>, Infallible> {
        if is_upgrade(&req) {
            return Ok(self.upgrade(req).await);
        }
        if let Err(refusal) = framing::check_request(req.headers()) {
            warn!(
                route = %self.ctx.route.name,
                method = %req.method(),
                "app request refused: unsupported transfer coding"
            );
            return Ok(self.answer(own_response(
                StatusCode::NOT_IMPLEMENTED,
                "transfer_coding",
                refusal.sentence(),
            )));
        }
        // Built from parts, not by pasting strings: `OPTIONS *` must stay `*`.
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(hyper::http::uri::Scheme::HTTPS);
        parts.authority = Some(self.uri_authority.clone());
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        let uri = match Uri::from_parts(parts) {
            Ok(u) => u,
            Err(e) => {
                return Ok(self.fail(Failure::new(
                    Class::Protocol,
                    format!("bad request target: {e}"),
                )));
            }
        };
        // hyper sends a GET, HEAD or CONNECT whose body has no known length with an empty
        // body (`Content-Length: 0` semantics), and an h2 app's body without `content-length`
        // has none: say `chunked` so every byte reaches an HTTP/1.1 upstream (hyper drops the
        // header again on h2).
        let unknown_length = {
            use hyper::body::Body as _;
            !req.body().is_end_stream() && req.body().size_hint().exact().is_none()
        };
        let app_h2 = req.version() == Version::HTTP_2;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        strip_hop_by_hop(req.headers_mut(), false);
        // The pool derives Host (http/1.1) or :authority (h2) from the URI; a Host header next
        // to :authority is a duplicate that nginx refuses with 400.
        req.headers_mut().remove(header::HOST);
        if unknown_length {
            req.headers_mut().remove(header::CONTENT_LENGTH);
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let m = &self.ctx.metrics;
        let idle = self.ctx.route.idle_timeout;
        let req = req.map(|inner| {
            let counted = Counted {
                inner,
                counter: m.bytes_to_upstream.clone(),
                upstream_of: None,
                _exchange: None,
                budget: None,
            };
            Moving::new(counted, idle)
        });
        let (client, exchange) = if app_h2 {
            self.lane_client(&lane).await
        } else {
            (self.client(), None)
        };
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => return Ok(self.unserved(classify(&e, &self.ctx.server_name))),
        };
        let (mut parts, body) = resp.into_parts();
        if let Err(refusal) = framing::check_response(&parts.headers) {
            let te = parts.headers.get(header::TRANSFER_ENCODING);
            let cl = parts.headers.get(header::CONTENT_LENGTH);
            warn!(
                route = %self.ctx.route.name,
                reason = Class::Protocol.reason(),
                transfer_encoding = ?te,
                content_length = ?cl,
                "upstream answer refused: ambiguous framing"
            );
            // Dropping the body closes that upstream connection: its framing is not trusted.
            drop(body);
            return Ok(self.answer(own_response(
                StatusCode::BAD_GATEWAY,
                Class::Protocol.reason(),
                refusal.sentence(),
            )));
        }
        strip_hop_by_hop(&mut parts.headers, false);
        let body = Counted {
            inner: body,
            counter: m.bytes_from_upstream.clone(),
            upstream_of: Some(self.ctx.clone()),
            _exchange: exchange,
            budget: app_h2.then(|| lane.budget.clone()),
        };
        Ok(self.answer(Response::from_parts(parts, body.boxed())))
    }

    /// Log an upstream failure in full at warn and tell the app only its class.
    fn fail(&self, f: Failure) -> Response<Body> {
        warn!(
            route = %self.ctx.route.name,
            reason = f.class.reason(),
            error = ?f.message,
            "upstream request failed"
        );
        self.answer(failure_response(&f))
    }

    fn unserved(&self, u: Unserved) -> Response<Body> {
        match u {
            Unserved::Failed(f) => self.fail(f),
            Unserved::PoolFull(detail) => {
                warn!(
                    route = %self.ctx.route.name,
                    reason = "pool_full",
                    error = ?detail,
                    "upstream request failed"
                );
                self.answer(own_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pool_full",
                    "every upstream connection of this route stayed busy for --connect-timeout",
                ))
            }
        }
    }

    fn answer(&self, r: Response<Body>) -> Response<Body> {
        self.ctx.metrics.http_request(r.status().as_u16());
        r
    }

    /// HTTP/1.1 Upgrade: a dedicated http/1.1 upstream connection; after its 101, bytes flow
    /// both ways between the two upgraded connections.
    async fn upgrade(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let mut config = (*self.ctx.identity.current()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let conn =
            match upstream::connect(&self.ctx.route, self.ctx.proxy.as_deref(), Arc::new(config))
                .await
            {
                Ok(c) => c,
                Err(f) => return self.fail(f),
            };
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(conn.stream)).await {
                Ok(x) => x,
                Err(e) => {
                    return self.unserved(classify(&e, &self.ctx.server_name));
                }
            };
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let app_side = hyper::upgrade::on(&mut req);
        let slot = req.extensions().get::<TunnelSlot>().cloned();
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        strip_hop_by_hop(&mut parts.headers, true);
        parts.headers.insert(header::HOST, self.authority.clone());
        let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => return self.unserved(classify(&e, &self.ctx.server_name)),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_side = hyper::upgrade::on(&mut resp);
            let ctx = self.ctx.clone();
            let tunnel: Tunnel = Box::pin(async move {
                let m = &ctx.metrics;
                let route = &ctx.route.name;
                let (a, u) = match (app_side.await, upstream_side.await) {
                    (Ok(a), Ok(u)) => (a, u),
                    (Err(e), _) | (_, Err(e)) => {
                        debug!(route = %route, error = %e, "upgrade did not complete");
                        return;
                    }
                };
                let (mut a, mut u) = (TokioIo::new(a), TokioIo::new(u));
                match tokio::io::copy_bidirectional(&mut a, &mut u).await {
                    Ok((to, from)) => {
                        m.bytes_to_upstream.inc_by(to);
                        m.bytes_from_upstream.inc_by(from);
                        info!(route = %route, bytes_to_upstream = to, bytes_from_upstream = from, "upgraded connection closed")
                    }
                    Err(e) => {
                        info!(route = %route, error = ?e.to_string(), "upgraded connection failed")
                    }
                }
            });
            // Run by the app connection's task (serve_conn) after hyper hands over the socket.
            match slot {
                Some(slot) => slot.put(tunnel),
                None => {
                    tokio::spawn(tunnel);
                }
            }
        }
        let (parts, body) = resp.into_parts();
        self.answer(Response::from_parts(parts, body.boxed()))
    }
}

/// h2 bounds per app connection. Streams: at most this many open at once; the next is refused
/// with `REFUSED_STREAM` (nginx and Envoy's gateway guidance use 100 and 128).
const H2_MAX_STREAMS: u32 = 100;
/// Flow-control windows we grant the app for request bodies: what it may send before the
/// upstream has taken it, so what a connection can make us buffer (hyper's defaults: 1 MiB each).
const APP_H2_STREAM_WINDOW: u32 = 256 * 1024;
const APP_H2_CONN_WINDOW: u32 = 512 * 1024;
/// Response bytes queued per stream for an app that does not read (hyper's default: 400 KB,
/// which with 100 streams would let one app pin 40 MB).
const H2_SEND_BUF: usize = 8 * 1024;
/// Streams the app may reset before we accept them; beyond that the connection ends with
/// `GOAWAY` (the rapid-reset attack, CVE-2023-44487). h2's default, stated so it stays.
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams we may reset because the app broke the protocol before the connection ends with
/// `GOAWAY`.
const H2_MAX_LOCAL_RESETS: usize = 256;

/// After a graceful close began (GOAWAY or `Connection: close` on an idle connection), how
/// long the app gets to finish before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where [`HttpRoute::upgrade`] leaves the tunnel of an upgraded request, so that it runs in
/// the app connection's own task: it keeps the connection's slot under `--max-connections`,
/// stays in `active_connections` and the drain, and is logged when it ends.
#[derive(Clone, Default)]
struct TunnelSlot(Arc<std::sync::Mutex<Option<Tunnel>>>);

type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

impl TunnelSlot {
    fn put(&self, t: Tunnel) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(t);
        }
    }

    fn take(&self) -> Option<Tunnel> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// A response body that keeps its request open in the connection's watch until it ends.
struct Tracked<B> {
    inner: B,
    _open: InFlight,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// How an app connection ended, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The app closed it, or it was closed gracefully at shutdown.
    Closed,
    /// Ended on a protocol or I/O error.
    Error,
    /// Cut when `--drain-timeout` ran out.
    Cut,
    /// Closed by a timeout.
    Timeout(Expired),
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Error => "error",
            End::Cut => "cut",
            End::Timeout(e) => e.as_str(),
        }
    }
}

/// Serve one app connection until it ends, shutting it down gracefully (h1 `Connection:
/// close`, h2 GOAWAY) when `stop` fires and abandoning it when `cut` does. An upgraded request's
/// tunnel runs here too, after the HTTP part of the connection is over.
pub async fn serve_conn<I>(
    route: Arc<HttpRoute>,
    io: I,
    stop: CancellationToken,
    cut: CancellationToken,
) -> End
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let settings = &route.ctx.route.http;
    let watch = ConnWatch::new(settings.header_timeout, route.ctx.route.idle_timeout);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watch times heads from accept (hyper's timer would also run between keep-alive
        // requests and close idle connections at --header-timeout).
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(APP_H2_STREAM_WINDOW)
        .initial_connection_window_size(APP_H2_CONN_WINDOW)
        .max_send_buf_size(H2_SEND_BUF)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS);
    let tunnel = TunnelSlot::default();
    let lane = Arc::new(Lane::new());
    let mut generations = route.ctx.identity.subscribe();
    let (r, w, slot) = (route.clone(), watch.clone(), tunnel.clone());
    let l = lane.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let open = w.request(req.version());
        req.extensions_mut().insert(slot.clone());
        let (r, lane) = (r.clone(), l.clone());
        async move {
            let resp = r.forward(req, lane).await?;
            Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, _open: open }))
        }
    });
    let io = TokioIo::new(Watched::new(io, watch.clone()));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // Set when a graceful close began: the socket is dropped at this instant at the latest.
    let mut closing: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    let result = loop {
        let now = tokio::time::Instant::now();
        let next = match watch.deadline(now) {
            Ok(next) => next,
            // Idle between requests: a polite close (h2 GOAWAY), then the grace.
            Err(Expired::Idle) if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(now + CLOSE_GRACE);
                continue;
            }
            Err(Expired::Idle) => None,
            Err(why) => {
                debug!(route = %route.ctx.route.name, reason = why.as_str(), "app connection timed out");
                return End::Timeout(why);
            }
        };
        let wake = match (next, closing) {
            (Some(n), Some(c)) => Some(n.min(c)),
            (n, c) => n.or(c),
        };
        if let Some(at) = wake {
            timer.as_mut().reset(at);
        }
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = cut.cancelled() => return End::Cut,
            () = watch.moved_earlier() => {}
            Ok(()) = generations.changed() => lane.retire(),
            _ = timer.as_mut(), if wake.is_some() => {
                if closing.is_some_and(|c| c <= tokio::time::Instant::now()) {
                    return End::Timeout(Expired::Idle);
                }
            }
        }
    };
    if let Err(e) = result {
        info!(route = %route.ctx.route.name, error = ?e.to_string(), "app connection ended with an error");
        return End::Error;
    }
    let Some(tunnel) = tunnel.take() else {
        // Ended by our own polite close of an idle connection, or by the app.
        return if closing.is_some() {
            End::Timeout(Expired::Idle)
        } else {
            End::Closed
        };
    };
    let _open = watch.tunnel();
    tokio::pin!(tunnel);
    loop {
        let next = match watch.deadline(tokio::time::Instant::now()) {
            Ok(next) => next,
            Err(why) => return End::Timeout(why),
        };
        if let Some(at) = next {
            timer.as_mut().reset(at);
        }
        tokio::select! {
            () = tunnel.as_mut() => return End::Closed,
            _ = cut.cancelled() => return End::Cut,
            _ = timer.as_mut(), if next.is_some() => {}
        }
    }
}
