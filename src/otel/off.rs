//! The `otel` feature is off: every hook is a no-op, and set `OTEL_*` variables get one warning.

use std::future::Future;

use super::{Direction, Names};

/// Always false: this build has no OpenTelemetry.
#[inline]
pub fn enabled() -> bool {
    false
}

/// Warn once when an endpoint is set, since this build cannot honour it.
pub fn init() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        tracing::warn!(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but this build has no OpenTelemetry (cargo feature otel): no traces"
        );
    }
}

/// Nothing to flush.
pub async fn shutdown() {}

/// Never made in this build.
pub enum RequestSpan {}

impl RequestSpan {
    #[inline]
    pub fn start<B>(_names: Names<'_>, _req: &mut hyper::Request<B>) -> Option<RequestSpan> {
        None
    }

    pub async fn run<F: Future>(&self, fut: F) -> F::Output {
        fut.await
    }

    pub fn finish<B>(self, _resp: &hyper::Response<B>) {}
}

/// A dial phase: nothing in this build.
pub struct Phase;

impl Phase {
    #[inline]
    pub fn start(_name: &'static str) -> Phase {
        Phase
    }

    #[inline]
    pub fn fail(&mut self, _reason: &'static str) {}

    #[inline]
    pub fn end(self) {}
}

/// A connection span: nothing in this build.
pub struct ConnSpan;

impl ConnSpan {
    #[inline]
    pub fn none() -> ConnSpan {
        ConnSpan
    }

    #[inline]
    pub fn start_if(_on: bool, _route: &str, _peer: &str, _dir: Direction) -> ConnSpan {
        ConnSpan
    }

    pub async fn handshake<T, E>(
        &self,
        fut: impl Future<Output = Result<T, E>>,
        _reason: impl Fn(&E) -> Option<&'static str>,
    ) -> Result<T, E> {
        fut.await
    }

    #[inline]
    pub fn end(
        &mut self,
        _peer_id: &str,
        _bytes: (u64, u64),
        _outcome: &'static str,
        _reason: Option<&'static str>,
    ) {
    }

    pub async fn within<F: Future>(&self, fut: F) -> F::Output {
        fut.await
    }
}

/// `fut` as it is.
#[inline]
pub fn in_current<T: 'static>(
    fut: std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>> {
    fut
}
