//! One app connection: hyper's server side with our bounds, the connection's watch and the
//! tunnel of an upgraded request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info};

use super::body::Tracked;
use super::pool::Lane;
use super::reqlog::{self, RequestLog};
use super::{Body, ClientId, HttpRoute};
use crate::failure::Class;
use crate::proxy::cut::CutWait;
use crate::proxy::watch::{ConnWatch, Expired, InFlight, Watched};

/// Request headers larger than this get `431`.
const MAX_HEADER_BYTES: usize = 64 * 1024;

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
pub(super) struct TunnelSlot(Arc<std::sync::Mutex<Option<Tunnel>>>);

pub(super) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

impl TunnelSlot {
    pub(super) fn put(&self, t: Tunnel) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(t);
        }
    }

    fn take(&self) -> Option<Tunnel> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
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
    /// Why the connection failed, for an inbound access line; `None` for a normal end (the
    /// client closed, a graceful close at shutdown, an idle keep-alive connection closed).
    pub fn failure(self) -> Option<(Class, &'static str)> {
        match self {
            End::Closed | End::Timeout(Expired::Idle) => None,
            End::Error => Some((Class::Reset, "the client connection ended with an error")),
            End::Cut => Some((Class::Drain, "cut: still open when --drain-timeout ran out")),
            End::Timeout(Expired::Header) => Some((
                Class::Timeout,
                "no complete request head within --header-timeout",
            )),
            End::Timeout(Expired::Stalled) => Some((
                Class::Idle,
                "an open request moved no byte for --idle-timeout",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Error => "error",
            End::Cut => "cut",
            End::Timeout(e) => e.as_str(),
        }
    }
}

/// One accepted connection as HTTP mode serves it: its clock, started at accept (so
/// `--header-timeout` counts from accept, the TLS handshake of an inbound client included), and
/// on an inbound route the verified client its requests are decorated with.
pub struct Accepted {
    /// The connection's watch, made at accept.
    watch: Arc<ConnWatch>,
    /// The inbound client, once its handshake is done; `None` outbound.
    client: Option<Arc<ClientId>>,
    /// The app's (inbound: the client's) address for the request lines; `None` unless
    /// `--access-log request`.
    peer: Option<Arc<str>>,
}

impl Accepted {
    /// Call at accept: the head clock starts now. `peer` is the app's address, as logs show it.
    pub fn now(route: &HttpRoute, peer: &str) -> Self {
        let (settings, idle) = (&route.ctx.route.http, route.ctx.route.idle_timeout);
        Accepted {
            watch: ConnWatch::new(settings.header_timeout, idle),
            client: None,
            peer: route.ctx.route.ops.request_lines().then(|| Arc::from(peer)),
        }
    }

    /// The verified client of an inbound connection.
    pub fn with_client(self, client: ClientId) -> Self {
        Accepted {
            client: Some(Arc::new(client)),
            ..self
        }
    }
}

/// Serve one app connection until it ends, shutting it down gracefully (h1 `Connection:
/// close`, h2 GOAWAY) when `stop` fires and abandoning it when `cut` does. An upgraded request's
/// tunnel runs here too, after the HTTP part of the connection is over.
pub async fn serve_conn<I>(
    route: Arc<HttpRoute>,
    io: I,
    accepted: Accepted,
    stop: CancellationToken,
    cut: CancellationToken,
) -> End
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (watch, client, peer) = (accepted.watch, accepted.client, accepted.peer);
    let builder = server_builder();
    let tunnel = TunnelSlot::default();
    let lane = Arc::new(Lane::new());
    let mut generations = route.ctx.identity.subscribe();
    let (r, w, slot, l) = (route.clone(), watch.clone(), tunnel.clone(), lane.clone());
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let open = w.request(req.version());
        req.extensions_mut().insert(slot.clone());
        let (r, lane, client) = (r.clone(), l.clone(), client.clone());
        one_request(r, req, lane, client, open, peer.clone())
    });
    let io = TokioIo::new(Watched::new(io, watch.clone()));
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    // Set when a graceful close began: the socket is dropped at this instant at the latest.
    let mut closing: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    // Kept across turns (see `proxy::cut`): a fresh `cancelled()` per turn locks shared tokens.
    let mut stop_wait = CutWait::new(stop.cancelled());
    let mut cut_wait = CutWait::new(cut.cancelled());
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
        let wake = earliest(next, closing);
        if let Some(at) = wake {
            timer.as_mut().reset(at);
        }
        tokio::select! {
            r = conn.as_mut() => break r,
            () = &mut stop_wait, if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut cut_wait => return End::Cut,
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
    match tunnel.take() {
        Some(tunnel) => run_tunnel(tunnel, &watch, &cut).await,
        // Ended by our own polite close of an idle connection, or by the app.
        None if closing.is_some() => End::Timeout(Expired::Idle),
        None => End::Closed,
    }
}

/// One request of an app connection, from its head to the response head; the response body
/// keeps it open in the connection's watch and carries its access-log record, if any.
/// `peer` is set only with `--access-log request`.
async fn one_request(
    route: Arc<HttpRoute>,
    mut req: Request<Incoming>,
    lane: Arc<Lane>,
    client: Option<Arc<ClientId>>,
    open: InFlight,
    peer: Option<Arc<str>>,
) -> Result<Response<Tracked<Body>>, Infallible> {
    let started = std::time::Instant::now();
    let mut log = peer.map(|p| RequestLog::start(&route.ctx, p, &mut req, started));
    let resp = route.forward(req, lane, client).await?;
    reqlog::answered(&route.ctx, started, &resp, log.as_deref_mut());
    Ok(resp.map(|inner| Tracked {
        inner,
        _open: open,
        log,
    }))
}

/// The earlier of two optional instants.
fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Runs what hyper spawns for an app connection (its h2 streams) in the connection's span, so
/// their lines carry it too.
#[derive(Clone, Copy, Debug)]
struct InConnSpan;

impl<F> hyper::rt::Executor<F> for InConnSpan
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut.in_current_span());
    }
}

/// hyper's server side with our bounds on heads, streams and buffers.
fn server_builder() -> hyper_util::server::conn::auto::Builder<InConnSpan> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(InConnSpan);
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
    builder
}

/// Run an upgraded request's tunnel to its end, under the connection's watch and `cut`.
async fn run_tunnel(tunnel: Tunnel, watch: &Arc<ConnWatch>, cut: &CancellationToken) -> End {
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let _open = watch.tunnel();
    tokio::pin!(tunnel);
    let mut cut_wait = CutWait::new(cut.cancelled());
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
            () = &mut cut_wait => return End::Cut,
            _ = timer.as_mut(), if next.is_some() => {}
        }
    }
}
