//! HTTP mode, both directions. Outbound: the app speaks HTTP/1.1 or h2c (prior knowledge) to
//! the listener; each request goes upstream over a pool of long-lived mTLS connections
//! (hyper-util's pooled client), h2 or http/1.1 as the upstream picks by ALPN, so apps that open
//! a connection per request no longer pay a handshake each. Inbound: a verified client speaks
//! HTTP/1.1 or h2 (by ALPN) over mTLS; each request goes to the plaintext target over pooled
//! HTTP/1.1 connections, carrying the client's identity in headers.
//!
//! One connection path serves both: [`serve_conn`] with its bounds, [`HttpRoute::forward`]
//! with its framing checks, answers, budgets and watches. Only where requests go ([`Dest`])
//! and how they are decorated (`Host` rewritten to the upstream, or identity headers for the
//! target) differ.
//!
//! The outbound pool belongs to one identity: when a reload publishes a new client
//! configuration, the next request builds a new pool and the old one is dropped with its idle
//! connections (busy ones finish their requests first).

mod answer;
mod body;
mod hop;
mod lifetime;
mod pool;
mod reqlog;
mod serve;
mod target;
mod traced;

pub use self::serve::{Accepted, End, serve_conn};

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::http::uri::Scheme;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};

use self::answer::{Unserved, classify, failure_response, own_response, target_response};
use self::body::{AppBody, Counted, Moving};
use self::hop::strip_hop_by_hop;
use self::pool::{Lane, UpstreamSide};
use self::serve::{Tunnel, TunnelSlot};
use self::target::TargetSide;
use super::RouteCtx;
use super::framing;
use crate::failure::{self, Class, Failure};
use crate::inbound::xfcc;
use crate::upstream;

type Body = BoxBody<Bytes, hyper::Error>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request as the pools send it.
/// A request body on its way to the upstream or target.
type OutBody = Moving<Counted<AppBody>>;

type Outgoing = Request<OutBody>;

/// A byte stream for an upgraded request's own connection, upstream or target.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The route's HTTP side: where its requests go.
pub struct HttpRoute {
    /// The route: settings, identity and metrics.
    ctx: Arc<RouteCtx>,
    /// The upstream's mTLS pool (outbound) or the target's plaintext pool (inbound).
    dest: Dest,
}

/// Where a route's requests go, and so how they are decorated.
enum Dest {
    /// Outbound: the upstream, `Host` / `:authority` rewritten to its name.
    Upstream(UpstreamSide),
    /// Inbound: the target, `Host` kept, the client's identity in headers.
    Target(Box<TargetSide>),
}

/// Who the client of an inbound connection is, as every request of it tells the target:
/// computed once per connection from the verified leaf.
#[derive(Debug, Clone)]
pub struct ClientId {
    /// `X-Forwarded-Client-Cert` (Envoy's format); `None` if the leaf does not parse, and then
    /// the requests carry none (never the client's own).
    xfcc: Option<String>,
    /// Appended to `X-Forwarded-For`; `None` on a unix listener.
    ip: Option<IpAddr>,
    /// The client's URI SAN (else DNS SAN) for its requests' spans; only when traces are on.
    id: Option<String>,
}

impl ClientId {
    pub fn of(leaf: Option<&[u8]>, ip: Option<IpAddr>) -> Self {
        ClientId {
            xfcc: leaf.and_then(xfcc::header),
            ip,
            id: crate::otel::enabled()
                .then(|| super::client::Client::of(leaf).id)
                .filter(|id| id != "-"),
        }
    }

    /// Whether the verified leaf gave an `X-Forwarded-Client-Cert` value (a name holding a
    /// control character cannot be carried; such a client is refused, never forwarded bare).
    pub fn has_identity(&self) -> bool {
        self.xfcc.is_some()
    }

    /// Remove any identity header the client sent and set ours.
    fn decorate(&self, headers: &mut HeaderMap) {
        // An invalid value (never from `header`) removes the client's and sets none.
        xfcc::strip_and_set(headers, self.xfcc.as_deref().unwrap_or("\n"), self.ip);
    }
}

impl HttpRoute {
    pub fn new(ctx: Arc<RouteCtx>) -> Self {
        let dest = match ctx.route.inbound() {
            Some(i) => Dest::Target(Box::new(TargetSide::new(&ctx, &i.target))),
            None => Dest::Upstream(UpstreamSide::new(&ctx)),
        };
        HttpRoute { ctx, dest }
    }
}

impl HttpRoute {
    /// Forward one request. `client` is the verified client of an inbound connection.
    async fn forward_request(
        &self,
        mut req: Request<Incoming>,
        lane: Arc<Lane>,
        client: Option<Arc<ClientId>>,
    ) -> Result<Response<Body>, Infallible> {
        if is_upgrade(&req) {
            // Boxed: the dedicated dial (TLS handshake, proxy tunnel, trace phases) would
            // otherwise size every request's future, which hyper moves once per request.
            return Ok(Box::pin(self.upgrade(req, client.as_deref())).await);
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
        let uri = match self.dest_uri(&req) {
            Ok(u) => u,
            Err(f) => return Ok(self.fail(f)),
        };
        let app_h2 = req.version() == Version::HTTP_2;
        let host = self.host_for(&req);
        rewrite_for_upstream(&mut req, uri);
        if let Some(host) = host {
            req.headers_mut().insert(header::HOST, host);
        }
        if let Some(client) = &client {
            client.decorate(req.headers_mut());
        }
        let replay = replayable(&req);
        let dials = self.ctx.pool_dials.load(Ordering::Relaxed);
        let sent_at = std::time::Instant::now();
        let req = self.outgoing(req);
        let (mut resp, mut exchange) = self.send(req, app_h2, &lane).await;
        // Sent on a connection that existed before (no dial began meanwhile), which the peer
        // had closed: a fresh connection would have failed for a reason worth reporting.
        let reused = self.ctx.pool_dials.load(Ordering::Relaxed) == dials;
        if let (Err(e), Some(again), true) = (&resp, replay, reused)
            && stale_connection(e)
        {
            // A pooled connection the peer had already closed: sent once more on another.
            debug!(route = %self.ctx.route.name, error = ?e.to_string(), "bodiless request retried on a fresh connection");
            drop(exchange.take());
            let again = again.map(|()| self.out_body(AppBody::Empty, None));
            (resp, exchange) = self.send(again, app_h2, &lane).await;
        }
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Ok(self.unserved(self.classify_sent(&e, sent_at))),
        };
        let (mut parts, body) = resp.into_parts();
        if let Err(refusal) = framing::check_response(&parts.headers) {
            self.log_ambiguous_framing(&parts.headers);
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
            counter: self.ctx.metrics.bytes_from_upstream.clone(),
            per_request: None,
            upstream_of: Some(self.ctx.clone()),
            _exchange: exchange,
            budget: app_h2.then(|| lane.budget.clone()),
        };
        Ok(self.answer(Response::from_parts(parts, body.boxed())))
    }

    /// Why a request sent at `sent_at` failed. A connection closed under it (`reset`, `io`)
    /// after a pooled connection read a TLS alert meanwhile is that alert: a TLS 1.3 server
    /// refuses our certificate only after our side of the handshake ended.
    fn classify_sent(&self, e: &legacy::Error, sent_at: std::time::Instant) -> Unserved {
        let u = classify(e, &self.ctx.server_name);
        match &u {
            Unserved::Failed(f) if matches!(f.class, Class::Reset | Class::Io) => {
                match self.ctx.pool_tls_error_since(sent_at) {
                    Some(tls) => {
                        Unserved::Failed(failure::classify_tls(&tls, &self.ctx.server_name))
                    }
                    None => u,
                }
            }
            _ => u,
        }
    }

    /// Send a request on the route's pool. An h2 app connection's requests go through its
    /// [`Lane`]: to an HTTP/1.1 server at most a few at once, each holding its turn (the
    /// returned permit) until its response ends.
    async fn send(
        &self,
        req: Outgoing,
        app_h2: bool,
        lane: &Lane,
    ) -> (
        Result<Response<Incoming>, legacy::Error>,
        Option<OwnedSemaphorePermit>,
    ) {
        match &self.dest {
            Dest::Upstream(u) => {
                let (client, exchange) = if app_h2 {
                    u.lane_client(&self.ctx, lane).await
                } else {
                    (u.client(&self.ctx), None)
                };
                (client.request(req).await, exchange)
            }
            Dest::Target(t) => {
                let exchange = if app_h2 { lane.h1_turn().await } else { None };
                (t.request(req).await, exchange)
            }
        }
    }

    /// The URI of a request at the upstream or target: its scheme and authority, the app's
    /// path and query. Built from parts, not by pasting strings: `OPTIONS *` must stay `*`.
    fn dest_uri(&self, req: &Request<Incoming>) -> Result<Uri, Failure> {
        let (scheme, authority) = match &self.dest {
            Dest::Upstream(u) => (Scheme::HTTPS, &u.uri_authority),
            Dest::Target(t) => (Scheme::HTTP, &t.uri_authority),
        };
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(scheme);
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts)
            .map_err(|e| Failure::new(Class::Protocol, format!("bad request target: {e}")))
    }

    /// The `Host` a request carries to the target: the client's own (an h2 client's
    /// `:authority` becomes `Host`); `None` outbound, where the pool derives it from the URI.
    fn host_for(&self, req: &Request<Incoming>) -> Option<HeaderValue> {
        let Dest::Target(t) = &self.dest else {
            return None;
        };
        if let Some(h) = req.headers().get(header::HOST) {
            return Some(h.clone());
        }
        let authority = req.uri().authority().unwrap_or(&t.uri_authority);
        HeaderValue::from_str(authority.as_str()).ok()
    }

    /// A connection of its own for an upgraded request, and the `Host` it is sent with.
    async fn dial_dedicated(
        &self,
        req: &Request<Incoming>,
    ) -> Result<(Box<dyn Io>, Option<HeaderValue>), Response<Body>> {
        match &self.dest {
            Dest::Upstream(u) => {
                let loaded = match self.ctx.identity_within_timeout().await {
                    Ok(l) => l,
                    Err(f) => return Err(self.fail(f)),
                };
                let mut config = (*loaded.config).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let (route, proxy) = (&self.ctx.route, self.ctx.proxy.as_deref());
                match upstream::connect(route, proxy, Arc::new(config)).await {
                    Ok(c) => Ok((Box::new(c.stream), Some(u.authority.clone()))),
                    Err(f) => Err(self.fail(f)),
                }
            }
            Dest::Target(t) => match t.dial().await {
                Ok(c) => Ok((Box::new(c), self.host_for(req))),
                Err(f) => Err(self.unserved(Unserved::Target(f))),
            },
        }
    }

    fn log_ambiguous_framing(&self, headers: &HeaderMap) {
        let te = headers.get(header::TRANSFER_ENCODING);
        let cl = headers.get(header::CONTENT_LENGTH);
        warn!(
            route = %self.ctx.route.name,
            reason = Class::Protocol.reason(),
            transfer_encoding = ?te,
            content_length = ?cl,
            "upstream answer refused: ambiguous framing"
        );
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
            Unserved::Target(t) => {
                warn!(
                    route = %self.ctx.route.name,
                    reason = t.refusal.reason(),
                    error = ?t.message,
                    "target request failed"
                );
                self.answer(target_response(t.refusal))
            }
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

    /// HTTP/1.1 Upgrade: a dedicated http/1.1 connection to the upstream or target; after its
    /// 101, bytes flow both ways between the two upgraded connections.
    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        client: Option<&ClientId>,
    ) -> Response<Body> {
        let (io, host) = match self.dial_dedicated(&req).await {
            Ok(x) => x,
            Err(answer) => return answer,
        };
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
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
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        if let Some(client) = client {
            client.decorate(&mut parts.headers);
        }
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
                let lines = ctx.route.ops.connection_lines();
                match tokio::io::copy_bidirectional(&mut a, &mut u).await {
                    Ok((to, from)) => {
                        m.bytes_to_upstream.inc_by(to);
                        m.bytes_from_upstream.inc_by(from);
                        if lines {
                            info!(route = %route, bytes_to_upstream = to, bytes_from_upstream = from, "upgraded connection closed")
                        }
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

/// Turn an app's request head into the upstream's: the new URI, HTTP/1.1 for the pool (it
/// speaks h2 upstream where ALPN agreed), no hop-by-hop headers and no `Host`.
fn rewrite_for_upstream(req: &mut Request<Incoming>, uri: Uri) {
    // hyper sends a GET, HEAD or CONNECT whose body has no known length with an empty
    // body (`Content-Length: 0` semantics), and an h2 app's body without `content-length`
    // has none: say `chunked` so every byte reaches an HTTP/1.1 upstream (hyper drops the
    // header again on h2).
    let unknown_length = {
        use hyper::body::Body as _;
        !req.body().is_end_stream() && req.body().size_hint().exact().is_none()
    };
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

/// A copy of a request that may be sent twice: a safe method (RFC 9110 9.2.1) with no body,
/// and only when it failed on a reused connection (a fresh one failing is a real failure).
/// hyper's pool already resends a request that never left; this covers one written to a
/// pooled connection the peer closed at that moment (nginx's `proxy_next_upstream error`
/// does the same for idempotent requests). `None` for anything else: never sent twice.
fn replayable(req: &Request<Incoming>) -> Option<Request<()>> {
    use hyper::Method;
    use hyper::body::Body as _;
    let safe = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Whether a request failed because its pooled connection was already closed by the peer
/// (reset, or closed before any response byte), not because a dial or the peer's answer failed.
fn stale_connection(e: &legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return matches!(
                io.kind(),
                K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted | K::UnexpectedEof
            );
        }
        cur = err.source();
    }
    false
}
