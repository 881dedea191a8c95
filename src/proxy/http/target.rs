//! An inbound http-mode route's target side: HTTP/1.1 over pooled plaintext connections to
//! `--target` (`HOST:PORT` resolved at every dial by the route's own dial, or `unix:PATH`),
//! bounded like the outbound pool (`--pool-max-connections`, `--pool-max-idle`,
//! `--pool-idle-timeout`). The target is the app on this machine: requests keep their `Host`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::Uri;
use hyper::http::uri::Authority;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;

use super::lifetime::Expiry;
use super::pool::{PooledIo, client_builder, pool_slot};
use super::{BoxError, OutBody};
use crate::config::HttpSettings;
use crate::config::Target;
use crate::proxy::RouteCtx;
use crate::proxy::inbound::{Refusal, TargetConn, dial};
use arc_swap::ArcSwapOption;

/// Where an inbound route's requests go.
pub(super) struct TargetSide {
    /// The pool in force, replaced at its `--pool-max-lifetime`.
    pool: Arc<TargetPools>,
    /// The authority of every target URI (the pool's key), and the `Host` of a request that
    /// came without one: the target's `HOST:PORT`, `localhost` for a unix socket.
    pub(super) uri_authority: Authority,
    /// The connector, for an upgraded request's dedicated connection.
    connector: TargetConnector,
}

impl TargetSide {
    pub(super) fn new(ctx: &Arc<RouteCtx>, target: &Target) -> Self {
        let authority = match target {
            Target::Tcp(u) if u.host.contains(':') => format!("[{}]:{}", u.host, u.port),
            Target::Tcp(u) => format!("{}:{}", u.host, u.port),
            Target::Unix(_) => "localhost".into(),
        };
        let http = &ctx.route.http;
        let connector = TargetConnector {
            ctx: ctx.clone(),
            target: target.clone(),
            slots: Arc::new(Semaphore::new(http.pool_max_connections)),
        };
        let pool = Arc::new(TargetPools {
            current: ArcSwapOption::empty(),
            connector: connector.clone(),
            http: http.clone(),
        });
        pool.renew();
        TargetSide {
            pool,
            // Validated at startup; the fallback only keeps this total.
            uri_authority: authority
                .parse()
                .unwrap_or(Authority::from_static("localhost")),
            connector,
        }
    }

    /// Send a request on the pooled client in force (hyper-util's, HTTP/1.1 only), replacing
    /// the pool first if its `--pool-max-lifetime` passed.
    pub(super) fn request(
        &self,
        req: hyper::Request<OutBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        match self.pool.current.load().as_ref() {
            Some(p) if !p.expiry.passed() => p.client.request(req),
            _ => self.pool.renew().request(req),
        }
    }

    /// A connection of its own for an upgraded request (not pooled, not under the pool's
    /// bound: it holds the client connection's slot under `--max-connections`).
    pub(super) async fn dial(&self) -> Result<TargetConn, TargetFailure> {
        self.connector.dial().await
    }
}

/// The target pool in force and what a new one is built from. At its `--pool-max-lifetime`
/// a pool replaces itself (see `lifetime`): its idle connections close, busy ones finish.
struct TargetPools {
    /// hyper-util's pooled client with its expiry; `None` only while being built.
    current: ArcSwapOption<TargetPool>,
    /// Dials for every pool (and shares their `--pool-max-connections` permits).
    connector: TargetConnector,
    /// The pool bounds.
    http: HttpSettings,
}

/// One generation of the target pool.
struct TargetPool {
    /// Clones share the pool.
    client: Client<TargetConnector, OutBody>,
    /// Once passed, the pool takes no new requests.
    expiry: Expiry,
}

impl TargetPools {
    /// Put a fresh pool in force (dropping the old one) if the one in force has expired, and
    /// return the client in force. Requests and the pool's own timer may both find it
    /// expired: only the first replaces it, so a fresh pool is never replaced at once.
    fn renew(self: &Arc<Self>) -> Client<TargetConnector, OutBody> {
        let current = self.current.load_full();
        if let Some(p) = &current
            && !p.expiry.passed()
        {
            return p.client.clone();
        }
        let client = client_builder(&self.http).build(self.connector.clone());
        let me = Arc::downgrade(self);
        let retire = Box::new(move || {
            if let Some(pools) = me.upgrade() {
                pools.renew();
            }
        });
        let expiry = Expiry::start(self.http.pool_max_lifetime, retire);
        let fresh = Arc::new(TargetPool {
            client: client.clone(),
            expiry,
        });
        let prev = self.current.compare_and_swap(&current, Some(fresh));
        match (&*prev, &current) {
            (Some(p), Some(c)) if !Arc::ptr_eq(p, c) => p.client.clone(),
            (Some(p), None) => p.client.clone(),
            _ => client,
        }
    }
}

/// The target could not be reached: refused (or unresolvable) or not within
/// `--connect-timeout`. Told to the client as `502 target_refused` / `504 target_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct TargetFailure {
    /// `TargetRefused` or `TargetTimeout`.
    pub(super) refusal: Refusal,
    /// What happened, for the warn line.
    pub(super) message: String,
}

/// Dials the target for the pool, holding one of `--pool-max-connections` per connection.
#[derive(Clone)]
pub(super) struct TargetConnector {
    /// The route: `--connect-timeout` and where failed dials are counted.
    ctx: Arc<RouteCtx>,
    /// Where to dial.
    target: Target,
    /// `--pool-max-connections` permits.
    slots: Arc<Semaphore>,
}

impl TargetConnector {
    /// One dial; a failure is counted in `connection_failures_total` with its reason.
    async fn dial(&self) -> Result<TargetConn, TargetFailure> {
        let mut phase = crate::otel::Phase::start(crate::otel::CONNECT);
        dial(&self.target, self.ctx.route.connect_timeout)
            .await
            .map_err(|(refusal, message)| {
                phase.fail(refusal.reason());
                self.ctx
                    .metrics
                    .refused(refusal.outcome(), refusal.reason());
                TargetFailure { refusal, message }
            })
    }
}

impl tower_service::Service<Uri> for TargetConnector {
    type Response = PooledIo<TargetConn>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        crate::otel::in_current(Box::pin(async move {
            let (permit, dial) = pool_slot(&this.ctx, this.slots.clone()).await?;
            let conn = this.dial().await.map_err(|f| Box::new(f) as BoxError)?;
            if let TargetConn::Tcp(s) = &conn {
                let _ = s.set_nodelay(true);
            }
            Ok(PooledIo {
                io: TokioIo::new(conn),
                h2: false,
                _slot: permit,
                tls_errors_to: None,
                id: this.ctx.route.ops.request_lines().then_some(dial),
            })
        }))
    }
}

/// A target socket as one byte stream (http mode's pooled target connections).
impl AsyncRead for TargetConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TargetConn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            TargetConn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TargetConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TargetConn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            TargetConn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TargetConn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            TargetConn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TargetConn::Tcp(s) => Pin::new(s).poll_flush(cx),
            TargetConn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TargetConn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            TargetConn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
