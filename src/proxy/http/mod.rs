//! HTTP mode: the app speaks HTTP/1.1 or h2c (prior knowledge) to the listener; each request
//! goes upstream over a pool of long-lived mTLS connections (hyper-util's pooled client), h2 or
//! http/1.1 as the upstream picks by ALPN, so apps that open a connection per request no longer
//! pay a handshake each.
//!
//! The pool belongs to one identity: when a reload publishes a new client configuration, the
//! next request builds a new pool and the old one is dropped with its idle connections (busy
//! ones finish their requests first).

mod answer;
mod body;
mod pool;
mod serve;

pub use self::serve::{End, serve_conn};

use std::convert::Infallible;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use self::answer::{Unserved, classify, failure_response, own_response};
use self::body::{Counted, Moving};
use self::pool::{Lane, Pool, SHARED, Speaks};
use self::serve::{Tunnel, TunnelSlot};
use super::RouteCtx;
use super::framing;
use crate::failure::{Class, Failure};
use crate::upstream;

type Body = BoxBody<Bytes, hyper::Error>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The route's HTTP side: the pool in force and what requests are rewritten with.
pub struct HttpRoute {
    /// The route: settings, identity and metrics.
    ctx: Arc<RouteCtx>,
    /// `Host` / `:authority` sent upstream: the server name, with `:PORT` unless 443.
    authority: HeaderValue,
    /// The authority of every upstream URI.
    uri_authority: hyper::http::uri::Authority,
    /// The shared pool of the identity in force; swapped for a new one after a reload.
    pool: ArcSwap<Pool>,
    /// `--pool-max-connections` permits, shared by the pools of every identity: a connection
    /// holds one until it closes, so a reload does not double the bound.
    slots: Arc<Semaphore>,
    /// `SPEAKS_*`: what the last dial's ALPN agreed.
    speaks: Arc<Speaks>,
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
        let uri = match self.upstream_uri(&req) {
            Ok(u) => u,
            Err(f) => return Ok(self.fail(f)),
        };
        let app_h2 = req.version() == Version::HTTP_2;
        rewrite_for_upstream(&mut req, uri);
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
            counter: m.bytes_from_upstream.clone(),
            upstream_of: Some(self.ctx.clone()),
            _exchange: exchange,
            budget: app_h2.then(|| lane.budget.clone()),
        };
        Ok(self.answer(Response::from_parts(parts, body.boxed())))
    }

    /// The upstream URI of an app's request: our scheme and authority, the app's path and
    /// query. Built from parts, not by pasting strings: `OPTIONS *` must stay `*`.
    fn upstream_uri(&self, req: &Request<Incoming>) -> Result<Uri, Failure> {
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(hyper::http::uri::Scheme::HTTPS);
        parts.authority = Some(self.uri_authority.clone());
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts)
            .map_err(|e| Failure::new(Class::Protocol, format!("bad request target: {e}")))
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
