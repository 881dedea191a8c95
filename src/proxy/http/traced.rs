//! A request's OpenTelemetry span around [`HttpRoute::forward_request`]: started from the
//! request head (child of its `traceparent`, which is replaced by ours), current while the
//! request is forwarded (so the dial it causes is its child), ended at the response head.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use futures::future::Either;

use hyper::body::Incoming;
use hyper::{Request, Response};

use super::pool::Lane;
use super::{Body, ClientId, Dest, HttpRoute};
use crate::otel::{self, RequestSpan};

impl HttpRoute {
    /// Forward one request, in its span when traces are on (one check when they are off).
    /// Not an `async fn`: the untraced future is returned as it is, not nested in a wrapper
    /// future that would hold it (and copy it once more).
    pub(super) fn forward<'a>(
        &'a self,
        mut req: Request<Incoming>,
        lane: Arc<Lane>,
        client: Option<Arc<ClientId>>,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'a {
        let names = otel::Names {
            route: &self.ctx.route.name,
            server: match &self.dest {
                Dest::Upstream(_) => &self.ctx.server_name,
                Dest::Target(_) => &self.ctx.upstream,
            },
            peer_id: client.as_ref().and_then(|c| c.id.as_deref()),
        };
        match RequestSpan::start(names, &mut req) {
            None => Either::Left(self.forward_request(req, lane, client)),
            // Boxed: the untraced path's future does not grow by the span's state.
            Some(span) => Either::Right(Box::pin(traced(self, req, lane, client, span))),
        }
    }
}

async fn traced(
    route: &HttpRoute,
    req: Request<Incoming>,
    lane: Arc<Lane>,
    client: Option<Arc<ClientId>>,
    span: RequestSpan,
) -> Result<Response<Body>, Infallible> {
    let resp = span.run(route.forward_request(req, lane, client)).await;
    if let Ok(r) = &resp {
        span.finish(r);
    }
    resp
}
