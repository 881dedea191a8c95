//! The spans: per request, per dial phase, per tcp-mode connection.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use hyper::header::HeaderName;
use hyper::{Method, Request, Response, Version};
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::setup::STATE;
use super::{Direction, Names};

/// `url.path` longer than this is cut (the SDK bounds attribute counts, not lengths).
const MAX_PATH: usize = 1024;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// One request's span, from its head to its response head.
pub struct RequestSpan {
    /// The context holding the span: what the request's dial phases are children of.
    cx: Context,
}

/// The span name: the method, `HTTP` for one outside RFC 9110's set (semantic conventions).
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "HTTP",
    }
}

fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "0.9",
    }
}

impl RequestSpan {
    /// Start a request's span (`None` when traces are off): a child of the request's valid
    /// `traceparent`, else a root. The request's `traceparent` and `tracestate` are replaced by
    /// ours (an invalid one is dropped, never passed on).
    pub fn start<B>(names: Names<'_>, req: &mut Request<B>) -> Option<RequestSpan> {
        let state = STATE.get()?;
        let propagator = TraceContextPropagator::new();
        let parent = propagator.extract(&HeaderExtractor(req.headers()));
        let method = method_name(req.method());
        let mut path = req.uri().path();
        if path.len() > MAX_PATH {
            let mut end = MAX_PATH;
            while !path.is_char_boundary(end) {
                end -= 1;
            }
            path = &path[..end];
        }
        let mut attrs = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.path", path.to_string()),
            KeyValue::new("server.address", names.server.to_string()),
            KeyValue::new("network.protocol.version", version_name(req.version())),
            KeyValue::new("mtls_sidecar.route", names.route.to_string()),
        ];
        if let Some(id) = names.peer_id {
            attrs.push(KeyValue::new("mtls_sidecar.client.id", id.to_string()));
        }
        let span = state
            .tracer
            .span_builder(method)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&state.tracer, &parent);
        let cx = parent.with_span(span);
        let headers = req.headers_mut();
        headers.remove(TRACEPARENT);
        headers.remove(TRACESTATE);
        propagator.inject_context(&cx, &mut HeaderInjector(headers));
        Some(RequestSpan { cx })
    }

    /// Run the request's work with the span current, so a dial it causes is its child.
    pub async fn run<F: Future>(&self, fut: F) -> F::Output {
        fut.with_context(self.cx.clone()).await
    }

    /// The response head is ready: record its status and end the span. A 5xx is an error;
    /// `error.type` is the proxy's own reason when it answered itself, else the status code.
    pub fn finish<B>(self, resp: &Response<B>) {
        let span = self.cx.span();
        let code = resp.status().as_u16();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        let own = resp
            .extensions()
            .get::<crate::failure::OwnAnswer>()
            .map(|r| r.0);
        if let Some(reason) = own {
            span.set_attribute(KeyValue::new("error.type", reason));
        }
        if code >= 500 {
            if own.is_none() {
                span.set_attribute(KeyValue::new("error.type", code.to_string()));
            }
            span.set_status(Status::error(own.unwrap_or("upstream answered 5xx")));
        }
        span.end();
    }
}

/// One dial phase of a traced request or connection: a child span of the current context,
/// ended when dropped. Nothing when traces are off or nothing is traced.
pub struct Phase(Option<opentelemetry_sdk::trace::Span>);

impl Phase {
    pub fn start(name: &'static str) -> Phase {
        let Some(state) = STATE.get() else {
            return Phase(None);
        };
        let cx = Context::current();
        if !cx.has_active_span() {
            return Phase(None);
        }
        let span = state
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .start_with_context(&state.tracer, &cx);
        Phase(Some(span))
    }

    /// The phase is over (dropping it ends it too).
    pub fn end(self) {}

    /// The phase failed: `error.type` is the failure's reason.
    pub fn fail(&mut self, reason: &'static str) {
        if let Some(s) = &mut self.0 {
            s.set_attribute(KeyValue::new("error.type", reason));
            s.set_status(Status::error(reason));
        }
    }
}

/// One tcp-mode connection's span (kind client outbound, server inbound), ended with the
/// connection's access-log record.
#[derive(Default)]
pub struct ConnSpan(Option<Context>);

impl ConnSpan {
    /// No span: a connection whose requests are traced instead.
    pub fn none() -> ConnSpan {
        ConnSpan(None)
    }

    /// A connection's span when `on` (and traces are on).
    pub fn start_if(on: bool, route: &str, peer: &str, dir: Direction) -> ConnSpan {
        let Some(state) = STATE.get().filter(|_| on) else {
            return ConnSpan(None);
        };
        let kind = match dir {
            Direction::Outbound => SpanKind::Client,
            Direction::Inbound => SpanKind::Server,
        };
        let span = state
            .tracer
            .span_builder("connection")
            .with_kind(kind)
            .with_attributes([
                KeyValue::new("mtls_sidecar.route", route.to_string()),
                KeyValue::new("client.address", peer.to_string()),
            ])
            .start_with_context(&state.tracer, &Context::new());
        ConnSpan(Some(Context::new().with_span(span)))
    }

    /// An inbound connection's TLS handshake as a child span; `reason` tells a failure's.
    pub async fn handshake<T, E>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
        reason: impl Fn(&E) -> Option<&'static str>,
    ) -> Result<T, E> {
        let (Some(state), Some(cx)) = (STATE.get(), &self.0) else {
            return fut.await;
        };
        let mut phase = Phase(Some(
            state
                .tracer
                .span_builder(super::TLS_HANDSHAKE)
                .with_kind(SpanKind::Internal)
                .start_with_context(&state.tracer, cx),
        ));
        let r = fut.await;
        if let Some(why) = r.as_ref().err().and_then(reason) {
            phase.fail(why);
        }
        r
    }

    /// Run the connection's dial with the span current, so its phases are children.
    pub async fn within<F: Future>(&self, fut: F) -> F::Output {
        match &self.0 {
            Some(cx) => fut.with_context(cx.clone()).await,
            None => fut.await,
        }
    }

    /// The connection ended: the verified client's URI SAN (else DNS SAN; `-` for none), bytes
    /// each way (sent on, and back), its outcome and, for a failure, the reason.
    pub fn end(
        &mut self,
        peer_id: &str,
        (to, from): (u64, u64),
        outcome: &'static str,
        reason: Option<&'static str>,
    ) {
        let Some(cx) = self.0.take() else {
            return;
        };
        let span = cx.span();
        if peer_id != "-" {
            span.set_attribute(KeyValue::new("mtls_sidecar.client.id", peer_id.to_string()));
        }
        span.set_attribute(KeyValue::new("mtls_sidecar.bytes_sent", to as i64));
        span.set_attribute(KeyValue::new("mtls_sidecar.bytes_received", from as i64));
        span.set_attribute(KeyValue::new("mtls_sidecar.outcome", outcome));
        if let Some(reason) = reason {
            span.set_attribute(KeyValue::new("error.type", reason));
            span.set_status(Status::error(reason));
        }
        span.end_with_timestamp(SystemTime::now());
    }
}

/// A pool's dial with the caller's context current (the connector is called while the
/// request's future is polled, but hyper-util may finish the dial in a task of its own).
pub fn in_current<T: 'static>(
    fut: Pin<Box<dyn Future<Output = T> + Send>>,
) -> Pin<Box<dyn Future<Output = T> + Send>> {
    if STATE.get().is_none() {
        return fut;
    }
    let cx = Context::current();
    if !cx.has_active_span() {
        return fut;
    }
    Box::pin(fut.with_context(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_and_versions() {
        assert_eq!(method_name(&Method::GET), "GET");
        let odd = Method::from_bytes(b"PURGE").expect("method");
        assert_eq!(method_name(&odd), "HTTP", "no unbounded span names");
        assert_eq!(version_name(Version::HTTP_2), "2");
        assert_eq!(version_name(Version::HTTP_11), "1.1");
    }

    #[test]
    fn nothing_when_off() {
        // No endpoint in unit tests: every hook is a no-op.
        let mut req = Request::new(());
        req.headers_mut()
            .insert(TRACEPARENT, "00-zz-zz-01".parse().expect("value"));
        let names = Names {
            route: "r",
            server: "s",
            peer_id: None,
        };
        assert!(RequestSpan::start(names, &mut req).is_none());
        assert_eq!(req.headers().len(), 1, "the request is left as it came");
        assert!(Phase::start(super::super::CONNECT).0.is_none());
    }
}
