//! The upstream side: pools of mTLS connections (one shared per identity, one lane per h2 app
//! connection), the connector that dials for them, and what each pooled connection reports.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use arc_swap::ArcSwap;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::Budget;
use super::lifetime::Expiry;
use super::reqlog::UpstreamConn;
use super::{BoxError, Dest, HttpRoute, OutBody};
use crate::config::HttpSettings;
use crate::failure::Class;
use crate::proxy::RouteCtx;
use crate::upstream;

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

/// What the upstream speaks, as the last dial's ALPN agreed (`SPEAKS_*`), and a signal for
/// requests that wait for a turn while it is not known yet.
#[derive(Default)]
pub(super) struct Speaks {
    /// `SPEAKS_*`, or 0 before the first dial.
    alpn: AtomicU8,
    /// Wakes requests waiting for their HTTP/1.1 turn when ALPN is first learned or changes.
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
pub(super) struct Windows {
    /// Receive window of one stream: what a stream whose app does not read can pin.
    stream: u32,
    /// Receive window of the connection: what all its streams together can pin.
    conn: u32,
    /// Dial only for h2 (a lane), so concurrent first requests share one connection.
    h2_only: bool,
}

/// The shared pool's windows.
pub(super) const SHARED: Windows = Windows {
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
pub(super) struct Lane {
    /// Turns of [`LANE_H1_EXCHANGES`] for requests to an HTTP/1.1 upstream.
    h1_exchanges: Arc<Semaphore>,
    /// The lane's own pool (h2 upstream), made at its first request and again after a reload
    /// or when its `--pool-max-lifetime` passed (its expiry drops it from here).
    pool: Arc<std::sync::Mutex<Option<Arc<Pool>>>>,
    /// What the connection's response data may hold in hyper's hands.
    pub(super) budget: Arc<Budget>,
}

impl Lane {
    pub(super) fn new() -> Self {
        Lane {
            h1_exchanges: Arc::new(Semaphore::new(LANE_H1_EXCHANGES)),
            pool: Arc::default(),
            budget: Arc::default(),
        }
    }

    /// A turn among the connection's [`LANE_H1_EXCHANGES`] requests at an HTTP/1.1 server,
    /// held until the response ends.
    pub(super) async fn h1_turn(&self) -> Option<OwnedSemaphorePermit> {
        // The semaphore is never closed.
        self.h1_exchanges.clone().acquire_owned().await.ok()
    }

    /// After a reload: drop the pool made with the old identity, so its idle connection closes
    /// now (busy ones finish their requests first) instead of lingering with a replaced
    /// certificate.
    pub(super) fn retire(&self) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.take();
        }
    }
}

pub(super) struct Pool {
    /// The identity the pool's connections were made with.
    config: Arc<ClientConfig>,
    /// hyper-util's pooled client; clones share the pool.
    client: Client<Connector, OutBody>,
    /// `--pool-max-lifetime`: once passed, the pool takes no new requests.
    expiry: Expiry,
}

/// Where an outbound route's requests go: the upstream over pooled mTLS connections, with
/// `Host` / `:authority` rewritten to its name.
pub(super) struct UpstreamSide {
    /// `Host` / `:authority` sent upstream: the server name, with `:PORT` unless 443.
    pub(super) authority: HeaderValue,
    /// The authority of every upstream URI.
    pub(super) uri_authority: Authority,
    /// The shared pool of the identity in force; swapped for a new one after a reload.
    pool: ArcSwap<Pool>,
    /// `--pool-max-connections` permits, shared by the pools of every identity: a connection
    /// holds one until it closes, so a reload does not double the bound.
    slots: Arc<Semaphore>,
    /// `SPEAKS_*`: what the last dial's ALPN agreed.
    speaks: Arc<Speaks>,
    /// Told when the shared pool's `--pool-max-lifetime` passed, so that it is replaced (and
    /// its idle connections closed) without waiting for a request.
    expired: Arc<Notify>,
}

impl UpstreamSide {
    pub(super) fn new(ctx: &Arc<RouteCtx>) -> Self {
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
        let expired = Arc::new(Notify::new());
        let pool = Pool::new(ctx, config, &slots, &speaks, SHARED, tell(&expired));
        UpstreamSide {
            slots,
            speaks,
            expired,
            authority: HeaderValue::from_str(&authority)
                .unwrap_or(HeaderValue::from_static("localhost")),
            // The server name was validated at startup; the fallback only keeps this total.
            uri_authority: authority
                .parse()
                .unwrap_or(Authority::from_static("localhost")),
            pool: ArcSwap::from_pointee(pool),
        }
    }

    /// The pool for the identity in force, rebuilt after a reload or when its
    /// `--pool-max-lifetime` passed.
    pub(super) fn client(&self, ctx: &Arc<RouteCtx>) -> Client<Connector, OutBody> {
        let config = ctx.identity.current();
        let current = self.pool.load();
        if Arc::ptr_eq(&current.config, &config) && !current.expiry.passed() {
            return current.client.clone();
        }
        let expired = tell(&self.expired);
        let fresh = Pool::new(ctx, config, &self.slots, &self.speaks, SHARED, expired);
        let fresh = Arc::new(fresh);
        // Only the first of several requests that found the old pool replaces it; the others
        // use the pool it put in force (theirs is dropped before it dialled anything).
        let prev = self.pool.compare_and_swap(&*current, fresh.clone());
        if !Arc::ptr_eq(&prev, &current) {
            return prev.client.clone();
        }
        debug!(route = %ctx.route.name, "new identity or --pool-max-lifetime passed: new upstream pool; idle connections of the old one close");
        fresh.client.clone()
    }

    /// The client for one request of an h2 app connection, with the permit it must hold until
    /// its response ends (HTTP/1.1 upstream; see [`Lane`]). The lane's own pool is made at its
    /// first request and again after a reload.
    pub(super) async fn lane_client(
        &self,
        ctx: &Arc<RouteCtx>,
        lane: &Lane,
    ) -> (Client<Connector, OutBody>, Option<OwnedSemaphorePermit>) {
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
                permit = lane.h1_turn() => return (self.client(ctx), permit),
                () = &mut learned => {}
            }
        }
        let config = ctx.identity.current();
        let Ok(mut pool) = lane.pool.lock() else {
            return (self.client(ctx), None);
        };
        let usable = |p: &&Arc<Pool>| Arc::ptr_eq(&p.config, &config) && !p.expiry.passed();
        if let Some(p) = pool.as_ref().filter(usable) {
            return (p.client.clone(), None);
        }
        // At its expiry the lane's pool drops itself from the lane, closing its connection
        // once idle, even if the app connection stays quiet.
        let slot = Arc::downgrade(&lane.pool);
        let retire = Box::new(move || {
            let Some(slot) = slot.upgrade() else { return };
            if let Ok(mut p) = slot.lock()
                && p.as_ref().is_some_and(|p| p.expiry.passed())
            {
                p.take();
            }
        });
        let fresh = Pool::new(ctx, config, &self.slots, &self.speaks, LANE, retire);
        let client = fresh.client.clone();
        *pool = Some(Arc::new(fresh));
        (client, None)
    }
}

impl HttpRoute {
    /// Watch for reloads and for the shared pool's `--pool-max-lifetime`: at each, replace the
    /// pool at once, so the idle connections of the old one close without waiting for the
    /// next request. (An inbound route's target connections are plaintext: no identity to
    /// retire them for; their pool retires itself at its lifetime, see `target`.)
    pub fn watch_reloads(self: &Arc<Self>) {
        let Dest::Upstream(u) = &self.dest else {
            return;
        };
        let expired = u.expired.clone();
        let mut generations = self.ctx.identity.subscribe();
        let route = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = generations.changed() => if r.is_err() { return },
                    () = expired.notified() => {}
                }
                let Some(route) = route.upgrade() else { return };
                if let Dest::Upstream(u) = &route.dest {
                    let _ = u.client(&route.ctx);
                }
            }
        });
    }
}

/// One of the route's `--pool-max-connections` slots for a new connection, and the dial's
/// number on the route (the connection's id in request lines). Waiting is bounded like a
/// dial; meanwhile the pool hands the request any connection that falls idle.
pub(super) async fn pool_slot(
    ctx: &RouteCtx,
    slots: Arc<Semaphore>,
) -> Result<(OwnedSemaphorePermit, u64), BoxError> {
    let wait = ctx.route.connect_timeout;
    let dial = ctx
        .pool_dials
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    match tokio::time::timeout(wait, slots.acquire_owned()).await {
        Ok(Ok(p)) => Ok((p, dial)),
        _ => {
            let max = ctx.route.http.pool_max_connections;
            Err(Box::new(PoolFull { wait, max }) as BoxError)
        }
    }
}

/// A pool expiry's action that tells `expired` (the shared pool's watcher replaces it).
fn tell(expired: &Arc<Notify>) -> Box<dyn FnOnce() + Send> {
    let expired = expired.clone();
    // A permit is kept if the watcher is busy: it replaces the pool when it next looks.
    Box::new(move || expired.notify_one())
}

impl Pool {
    /// A pool with `windows`, dialling with `config`; at its `--pool-max-lifetime`, `retire`
    /// is called to replace or drop it.
    pub(super) fn new(
        ctx: &Arc<RouteCtx>,
        config: Arc<ClientConfig>,
        slots: &Arc<Semaphore>,
        speaks: &Arc<Speaks>,
        windows: Windows,
        retire: Box<dyn FnOnce() + Send>,
    ) -> Self {
        let client = client_builder(&ctx.route.http)
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
        let expiry = Expiry::start(ctx.route.http.pool_max_lifetime, retire);
        Pool {
            config,
            client,
            expiry,
        }
    }
}

/// hyper-util's pooled client with the route's pool bounds (`--pool-idle-timeout`,
/// `--pool-max-idle`), for the upstream and the target alike.
pub(super) fn client_builder(http: &HttpSettings) -> hyper_util::client::legacy::Builder {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(http.pool_idle_timeout)
        .pool_max_idle_per_host(http.pool_max_idle)
        // A request on a pooled connection that closed before the request was written is
        // sent again on a fresh one (the upstream or target never saw it).
        .retry_canceled_requests(true);
    b
}

/// Dials the upstream for the pool: our resolve/connect/handshake, with one more try when the
/// upstream refused the connection (the request has not been sent anywhere yet).
#[derive(Clone)]
pub(super) struct Connector {
    /// The route to dial, and where the handshake metrics go.
    ctx: Arc<RouteCtx>,
    /// The identity of the pool this connector dials for.
    config: Arc<ClientConfig>,
    /// The route's `--pool-max-connections` permits; a dial waits for one.
    slots: Arc<Semaphore>,
    /// Told what each dial's ALPN agreed.
    speaks: Arc<Speaks>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = PooledIo<upstream::Upstream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let ctx = self.ctx.clone();
        let config = self.config.clone();
        let slots = self.slots.clone();
        let speaks = self.speaks.clone();
        // Called while the request's future is polled: its span is current here.
        crate::otel::in_current(Box::pin(async move {
            let (permit, dial) = pool_slot(&ctx, slots).await?;
            let mut attempt = ctx.connect(config.clone()).await;
            if matches!(&attempt, Err(f) if f.class == Class::Refused) {
                attempt = ctx.connect(config).await;
            }
            let m = &ctx.metrics;
            match attempt {
                Ok(c) => {
                    let h2 = c.stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    speaks.set(h2);
                    // A pooled connection is counted when dialled: its requests are counted
                    // in `http_requests_total`.
                    m.connection_finished(None);
                    Ok(PooledIo {
                        io: TokioIo::new(c.stream),
                        h2,
                        _slot: permit,
                        tls_errors_to: Some(ctx.clone()),
                        id: ctx.route.ops.request_lines().then_some(dial),
                    })
                }
                Err(f) => {
                    m.connection_finished(Some(f.class));
                    Err(Box::new(f) as BoxError)
                }
            }
        }))
    }
}

/// A pooled connection (the TLS stream to the upstream, or a target socket), telling the pool
/// which protocol ALPN agreed.
pub(super) struct PooledIo<T> {
    /// The connection's byte stream.
    pub(super) io: TokioIo<T>,
    /// ALPN agreed h2: the pool speaks h2 on it.
    pub(super) h2: bool,
    /// This connection's `--pool-max-connections` slot, given back when it closes.
    pub(super) _slot: OwnedSemaphorePermit,
    /// Outbound: the route, told of a TLS error read on this connection (see
    /// [`RouteCtx::note_pool_tls_error`]).
    pub(super) tls_errors_to: Option<Arc<RouteCtx>>,
    /// With `--access-log request`: the connection's id, which hyper-util copies into every
    /// response read on it (one allocation per response, so only when a line will show it).
    pub(super) id: Option<u64>,
}

impl<T> Connection for PooledIo<T> {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        let c = match self.id {
            Some(id) => c.extra(UpstreamConn(id)),
            None => c,
        };
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> hyper::rt::Read for PooledIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Err(e)), Some(ctx)) = (&r, &this.tls_errors_to)
            && let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            ctx.note_pool_tls_error(tls);
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> hyper::rt::Write for PooledIo<T> {
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

/// Every `--pool-max-connections` slot stayed taken for `--connect-timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "no upstream connection free within --connect-timeout {wait:?}: \
     all --pool-max-connections {max} are busy"
)]
pub(super) struct PoolFull {
    /// `--connect-timeout`, for the message.
    wait: std::time::Duration,
    /// `--pool-max-connections`, for the message.
    max: usize,
}
