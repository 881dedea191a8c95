//! Accepting plaintext connections: the per-route accept loop, the connection limit, and what
//! every connection of a route shares ([`RouteCtx`], which also dials the upstream for both
//! modes).

mod client;
mod counting;
mod cut;
mod framing;
pub mod http;
pub(crate) mod inbound;
mod log;
mod postgres;
pub mod relay;
mod tcp;
mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, warn};

use crate::cli::Mode;
use crate::config::{self, Route};
use crate::egress::Proxy;
use crate::failure::Failure;
use crate::listen::{self, Conn, Listener, LogLimit};
use crate::metrics::RouteMetrics;
use crate::tls::identity::Identity;
use crate::upstream;

/// Everything a connection of one route needs, shared by all of them.
#[derive(Debug)]
pub struct RouteCtx {
    /// The route's settings: upstream, timeouts, mode and limits.
    pub route: Route,
    /// The route's opened proxy when it tunnels (`route.via` is only its settings).
    pub proxy: Option<Arc<Proxy>>,
    /// The client identity in force; each connection takes a snapshot when it dials.
    pub identity: Arc<Identity>,
    /// `server_name` rendered once for messages.
    pub server_name: String,
    /// `upstream` rendered once for the access log.
    pub upstream: String,
    /// The route's metric handles.
    pub metrics: RouteMetrics,
    /// The bound address as shown in logs and `/status`.
    pub listen: String,
    /// Inbound refusal lines: at most one a second for the route, with a count of the rest.
    pub refusals: std::sync::Mutex<LogLimit>,
    /// HTTP mode: dials the route's pools have begun. A request that saw none begin while it
    /// was out went on a connection that already existed (see the retry in `http::forward`).
    pub pool_dials: std::sync::atomic::AtomicU64,
    /// HTTP mode: the last TLS error a pooled upstream connection read (a TLS 1.3 server
    /// refuses our certificate after our handshake ended, so the alert reaches the pool's
    /// connection task, not the request), and when.
    pub pool_tls_error: std::sync::Mutex<Option<(std::time::Instant, rustls::Error)>>,
}

impl RouteCtx {
    pub fn new(
        route: Route,
        proxy: Option<Arc<Proxy>>,
        identity: Arc<Identity>,
        metrics: RouteMetrics,
        listen: String,
    ) -> Self {
        RouteCtx {
            server_name: upstream::server_name_str(&route),
            upstream: match route.inbound() {
                Some(i) => i.target.to_string(),
                None => route.upstream.to_string(),
            },
            route,
            proxy,
            identity,
            metrics,
            listen,
            refusals: std::sync::Mutex::new(LogLimit::per_second()),
            pool_dials: std::sync::atomic::AtomicU64::new(0),
            pool_tls_error: std::sync::Mutex::new(None),
        }
    }

    /// Record a TLS error read on a pooled upstream connection.
    pub fn note_pool_tls_error(&self, e: &rustls::Error) {
        if let Ok(mut slot) = self.pool_tls_error.lock() {
            *slot = Some((std::time::Instant::now(), e.clone()));
        }
    }

    /// The TLS error a pooled upstream connection read at or after `since`, if any.
    pub fn pool_tls_error_since(&self, since: std::time::Instant) -> Option<rustls::Error> {
        let slot = self.pool_tls_error.lock().ok()?;
        slot.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }

    /// Dial the upstream with `config` (resolve, connect, TLS handshake) and record what a
    /// completed handshake tells: its duration and the upstream leaf's expiry. The outcome of
    /// the connection is counted by its owner when it ends (the access log in byte-stream
    /// mode, the pool's connector in HTTP mode), which also sees failures that come after.
    /// A config taken while the route had no identity (a `--spiffe` route before its first
    /// SVID or after a withdrawal) is replaced by the one published within `--connect-timeout`.
    pub async fn connect(&self, config: Arc<ClientConfig>) -> Result<upstream::Connected, Failure> {
        let config = if crate::tls::identity::is_placeholder(&config) {
            self.identity_within_timeout().await?.config.clone()
        } else {
            config
        };
        let c = upstream::connect(&self.route, self.proxy.as_deref(), config).await?;
        self.metrics.handshake.observe(c.handshake.as_secs_f64());
        if let Some(leaf) = c
            .stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|p| p.first())
        {
            self.metrics.upstream_leaf(leaf);
        }
        Ok(c)
    }
}

impl RouteCtx {
    /// The identity in force, waiting up to `--connect-timeout` for one when there is none;
    /// else a `no_identity` failure.
    pub async fn identity_within_timeout(
        &self,
    ) -> Result<Arc<crate::tls::identity::Loaded>, Failure> {
        let limit = self.route.connect_timeout;
        self.identity.present(limit).await.map_err(|why| {
            Failure::new(
                crate::failure::Class::NoIdentity,
                format!(
                    "{why}; none arrived within --connect-timeout {}",
                    humantime::format_duration(limit)
                ),
            )
        })
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
                        log_refusal(&ctx, uid, &peer, suppressed);
                    }
                    continue;
                }
                let accepted = Accepted { conn, peer, permit };
                spawn_conn(&ctx, http.as_ref(), accepted, &life);
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

/// A peer whose uid is not allowed was dropped unserved.
fn log_refusal(ctx: &RouteCtx, uid: Option<u32>, peer: &str, suppressed: u64) {
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

/// An accepted app connection and the `--max-connections` slot it holds until it ends.
struct Accepted {
    /// The app's socket.
    conn: Conn,
    /// The app's address, as logs show it.
    peer: String,
    /// Given back when the connection's task ends, so the next one can be accepted.
    permit: OwnedSemaphorePermit,
}

/// The next app connection's id, unique in this process, so that all the lines one connection
/// causes can be picked out of interleaved logs.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// The span an app connection's task runs in: every line it causes (from egress, tls and
/// upstream too) carries the route, the peer and the connection's id. Its fields come first
/// so that a line's own fields, which tests and log collectors read, keep their values. At
/// error level so that it is enabled whatever `--log-level` keeps (it is not a line itself).
fn conn_span(ctx: &RouteCtx, peer: &str) -> Span {
    let id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    tracing::error_span!("conn", route = %ctx.route.name, peer = %peer, conn_id = id)
}

/// Serve one accepted connection in its own task, in the route's mode.
fn spawn_conn(
    ctx: &Arc<RouteCtx>,
    http: Option<&Arc<http::HttpRoute>>,
    accepted: Accepted,
    life: &Lifecycle,
) {
    if let (Some(route), Some(_)) = (http, ctx.route.inbound()) {
        spawn_inbound_http(ctx, route, accepted, life);
        return;
    }
    let Accepted { conn, peer, permit } = accepted;
    let span = conn_span(ctx, &peer);
    let ctx = ctx.clone();
    let cut = life.cut.clone();
    if let Some(route) = http {
        let (route, stop) = (route.clone(), life.stop_accepting.clone());
        let accepted = http::Accepted::now(&route, &peer);
        life.tracker.spawn(
            async move {
                // Dropped (and logged) after the connection and any upgraded tunnel of it ended;
                // the permit goes with it.
                let mut open = log::HttpConnLog::new(&ctx, peer);
                open.end = match conn {
                    Conn::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        http::serve_conn(route, s, accepted, stop, cut).await
                    }
                    Conn::Unix(s) => http::serve_conn(route, s, accepted, stop, cut).await,
                };
                drop(open);
                drop(permit);
            }
            .instrument(span),
        );
        return;
    }
    if let Some(i) = ctx.route.inbound() {
        let inbound = i.clone();
        life.tracker.spawn(
            async move {
                match conn {
                    Conn::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        let addrs = s.peer_addr().ok().zip(s.local_addr().ok());
                        inbound::handle(&ctx, &inbound, s, peer, addrs, cut).await
                    }
                    Conn::Unix(s) => inbound::handle(&ctx, &inbound, s, peer, None, cut).await,
                }
                drop(permit);
            }
            .instrument(span),
        );
        return;
    }
    life.tracker.spawn(
        async move {
            match conn {
                Conn::Tcp(s) => tcp::handle(&ctx, s, peer, cut).await,
                Conn::Unix(s) => tcp::handle(&ctx, s, peer, cut).await,
            }
            drop(permit);
        }
        .instrument(span),
    );
}

/// [`spawn_conn`] for an inbound route in http mode.
fn spawn_inbound_http(
    ctx: &Arc<RouteCtx>,
    route: &Arc<http::HttpRoute>,
    accepted: Accepted,
    life: &Lifecycle,
) {
    let Accepted { conn, peer, permit } = accepted;
    let span = conn_span(ctx, &peer);
    let Some(inbound) = ctx.route.inbound().cloned() else {
        return;
    };
    let (ctx, route) = (ctx.clone(), route.clone());
    let ends = (
        http::Accepted::now(&route, &peer),
        life.stop_accepting.clone(),
        life.cut.clone(),
    );
    life.tracker.spawn(
        async move {
            match conn {
                Conn::Tcp(s) => {
                    let _ = s.set_nodelay(true);
                    let ip = s.peer_addr().ok().map(|a| a.ip());
                    inbound_http(&ctx, &inbound, route, s, peer, ip, ends).await
                }
                Conn::Unix(s) => inbound_http(&ctx, &inbound, route, s, peer, None, ends).await,
            }
            drop(permit);
        }
        .instrument(span),
    );
}

/// Serve one inbound http-mode connection: the client's handshake as in tcp mode (a refused
/// client is logged and never causes a dial), then its requests to the target, each carrying
/// the identity read once from the verified leaf. `ends`: the connection's clock, started at
/// accept, and the stop and cut signals.
async fn inbound_http<S>(
    ctx: &RouteCtx,
    inbound: &config::Inbound,
    route: Arc<http::HttpRoute>,
    conn: S,
    peer: String,
    ip: Option<std::net::IpAddr>,
    ends: (http::Accepted, CancellationToken, CancellationToken),
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (accepted, stop, cut) = ends;
    let Some((tls, mut log)) = Box::pin(inbound::handshake(ctx, inbound, conn, peer, &cut)).await
    else {
        return;
    };
    let client = http::ClientId::of(inbound::leaf_of(tls.get_ref().1), ip);
    if !client.has_identity() {
        // Never a request without the header the target relies on: closed before any.
        let why = "the client certificate's names cannot be carried in X-Forwarded-Client-Cert";
        log.refuse(inbound::Refusal::NotAllowed, why.into());
        return;
    }
    let (io, counts) = counting::Counting::new(tls);
    let end = http::serve_conn(route, io, accepted.with_client(client), stop, cut).await;
    log.http_ended(end.failure(), &counts);
}
