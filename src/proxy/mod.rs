//! Accepting plaintext connections: the per-route accept loop, the connection limit, and the
//! one access-log line per connection (written from `Drop`, so no path can forget it).

mod framing;
pub mod http;
pub mod tcp;
mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cli::Mode;
use crate::config::Route;
use crate::failure::{Class, Failure};
use crate::listen::{self, Conn, Listener, LogLimit};
use crate::metrics::RouteMetrics;
use crate::tls::identity::Identity;
use crate::transport::AppStream;
use crate::upstream;

/// Everything a connection of one route needs, shared by all of them.
#[derive(Debug)]
pub struct RouteCtx {
    pub route: Route,
    pub identity: Arc<Identity>,
    /// `server_name` rendered once for messages.
    pub server_name: String,
    /// `upstream` rendered once for the access log.
    pub upstream: String,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
    /// The bound address as shown in logs and `/status`.
    pub listen: String,
}

impl RouteCtx {
    pub fn new(
        route: Route,
        identity: Arc<Identity>,
        metrics: RouteMetrics,
        listen: String,
    ) -> Self {
        RouteCtx {
            server_name: upstream::server_name_str(&route),
            upstream: route.upstream.to_string(),
            route,
            identity,
            metrics,
            listen,
        }
    }
}

/// Stop signals a connection and an accept loop watch.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Cancelled when listeners must close (after `--shutdown-delay`).
    pub stop_accepting: CancellationToken,
    /// Cancelled when `--drain-timeout` ran out: cut what is still open.
    pub cut: CancellationToken,
    /// Tracks every connection task so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// Accept until told to stop, at most `--max-connections` at a time: extra connections stay in
/// the kernel's backlog until a slot frees. The listener is dropped on return, so new
/// connections are refused from then on.
pub async fn serve(ctx: Arc<RouteCtx>, listener: Listener, life: Lifecycle) {
    let slots = Arc::new(Semaphore::new(ctx.route.max_connections));
    let http = (ctx.route.mode == Mode::Http).then(|| {
        let route = Arc::new(http::HttpRoute::new(ctx.clone()));
        route.watch_reloads();
        route
    });
    let mut backoff = Duration::from_millis(5);
    // A flood of refused peers or failing accepts must not become a flood of log lines.
    let mut refusal_log = LogLimit::per_second();
    let mut accept_log = LogLimit::per_second();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // never closed; a closed semaphore would mean shutdown
            },
            _ = life.stop_accepting.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = life.stop_accepting.cancelled() => break,
        };
        match accepted {
            Ok((conn, peer, uid)) => {
                backoff = Duration::from_millis(5);
                if !listen::uid_allowed(&ctx.route.allow_uids, uid) {
                    if let Some(suppressed) = refusal_log.allow() {
                        match uid {
                            Some(uid) => warn!(
                                route = %ctx.route.name, uid, suppressed,
                                "refused a unix connection: uid not in --allow-uid"
                            ),
                            None => warn!(
                                route = %ctx.route.name, peer = %peer, suppressed,
                                "refused a connection: its uid cannot be read, and --allow-uid is set"
                            ),
                        }
                    }
                    continue;
                }
                let ctx = ctx.clone();
                let cut = life.cut.clone();
                if let Some(route) = &http {
                    let (route, stop) = (route.clone(), life.stop_accepting.clone());
                    life.tracker.spawn(async move {
                        // Dropped (and logged) after the connection and any upgraded tunnel of
                        // it ended; the permit goes with it.
                        let mut open = HttpConnLog::new(&ctx, peer);
                        open.end = match conn {
                            Conn::Tcp(s) => {
                                let _ = s.set_nodelay(true);
                                http::serve_conn(route, s, stop, cut).await
                            }
                            Conn::Unix(s) => http::serve_conn(route, s, stop, cut).await,
                        };
                        drop(open);
                        drop(permit);
                    });
                    continue;
                }
                life.tracker.spawn(async move {
                    match conn {
                        Conn::Tcp(s) => handle(&ctx, s, peer, cut).await,
                        Conn::Unix(s) => handle(&ctx, s, peer, cut).await,
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning, and keep going.
                if let Some(suppressed) = accept_log.allow() {
                    warn!(route = %ctx.route.name, error = %e, suppressed, "accept failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = life.stop_accepting.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// HTTP mode's record of one app connection (requests are counted in `http_requests_total`);
/// logs itself when dropped.
struct HttpConnLog<'a> {
    ctx: &'a RouteCtx,
    peer: String,
    started: Instant,
    /// How it ended: closed, error, cut, or which timeout closed it.
    end: http::End,
}

impl<'a> HttpConnLog<'a> {
    fn new(ctx: &'a RouteCtx, peer: String) -> Self {
        ctx.metrics.active.inc();
        HttpConnLog {
            ctx,
            peer,
            started: Instant::now(),
            // Only a panic in the connection task leaves this in place.
            end: http::End::Error,
        }
    }
}

impl Drop for HttpConnLog<'_> {
    fn drop(&mut self) {
        self.ctx.metrics.active.dec();
        info!(
            route = %self.ctx.route.name, peer = %self.peer, upstream = %self.ctx.upstream,
            duration_ms = self.started.elapsed().as_millis() as u64, mode = "http",
            end = self.end.as_str(), "app connection closed"
        );
    }
}

/// The access-log record of one connection; logs itself when dropped.
struct AccessLog<'a> {
    ctx: &'a RouteCtx,
    peer: String,
    started: Instant,
    counters: tcp::Counters,
    failure: Option<Failure>,
}

impl Drop for AccessLog<'_> {
    fn drop(&mut self) {
        let m = &self.ctx.metrics;
        m.active.dec();
        m.connection_finished(self.failure.as_ref().map(|f| f.class));
        let c = &self.counters;
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let route = &self.ctx.route.name;
        let upstream = &self.ctx.upstream;
        match &self.failure {
            None => info!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.to_upstream, bytes_from_upstream = c.from_upstream,
                duration_ms, outcome = %"ok", "connection"
            ),
            Some(f) if !f.class.is_fault() => info!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.to_upstream, bytes_from_upstream = c.from_upstream,
                duration_ms, outcome = %f.class.outcome(), reason = %f.class.reason(),
                error = ?f.message, "connection"
            ),
            Some(f) => warn!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.to_upstream, bytes_from_upstream = c.from_upstream,
                duration_ms, outcome = %f.class.outcome(), reason = %f.class.reason(),
                error = ?f.message, "connection"
            ),
        }
    }
}

/// Abort the app's connection with a reset rather than a FIN, so a mid-stream failure upstream
/// is not mistaken by the app for a clean end of data.
fn reset(app: &TcpStream) {
    let _ = socket2::SockRef::from(app).set_linger(Some(Duration::ZERO));
}

/// What a connection needs from the app's socket beyond relaying.
trait AppSocket: AppStream {
    fn set_nodelay(&self);
    /// End with a reset where the transport has one.
    fn abort(&self);
}

impl AppSocket for TcpStream {
    fn set_nodelay(&self) {
        let _ = TcpStream::set_nodelay(self, true);
    }
    fn abort(&self) {
        reset(self);
    }
}

impl AppSocket for tokio::net::UnixStream {
    fn set_nodelay(&self) {}
    fn abort(&self) {}
}

async fn handle<A: AppSocket>(ctx: &RouteCtx, mut app: A, peer: String, cut: CancellationToken) {
    ctx.metrics.active.inc();
    let mut log = AccessLog {
        ctx,
        peer,
        started: Instant::now(),
        counters: tcp::Counters::default(),
        failure: None,
    };
    app.set_nodelay();
    let config = ctx.identity.current();
    let connected = tokio::select! {
        c = upstream::connect(&ctx.route, config) => c,
        _ = cut.cancelled() => Err(Failure::new(Class::Drain, "cut at shutdown before the upstream answered")),
    };
    let mut up = match connected {
        Ok(c) => {
            ctx.metrics.handshake.observe(c.handshake.as_secs_f64());
            if let Some(leaf) = c
                .stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|p| p.first())
            {
                ctx.metrics.upstream_leaf(leaf);
            }
            c.stream
        }
        Err(f) => {
            // Nothing was sent to the app; dropping it closes the connection at once.
            log.failure = Some(f);
            return;
        }
    };
    let relay = tcp::Relay::new(
        &mut app,
        &mut up,
        &mut log.counters,
        &ctx.metrics,
        &ctx.server_name,
        ctx.route.idle_timeout,
    );
    let result = tokio::select! {
        r = relay => r,
        _ = cut.cancelled() => Err(Failure::new(Class::Drain, "cut: still open when --drain-timeout ran out")),
    };
    if let Err(f) = result {
        if f.class.is_fault() {
            app.abort();
        }
        log.failure = Some(f);
    }
}
