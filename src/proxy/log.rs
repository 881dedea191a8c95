//! The one log line per app connection, written from `Drop` so that no path (an error, a cut,
//! a panic in the connection task) can forget it; both records also keep `active_connections`.

use std::time::Instant;

use tracing::{info, warn};

use super::RouteCtx;
use super::http;
use super::relay::Moved;
use crate::failure::Failure;
use crate::otel::{ConnSpan, Direction};

/// Byte-stream mode's access-log record of one connection; logs itself when dropped.
pub(super) struct AccessLog<'a> {
    /// The route, for the line's fields and the metrics updated at the end.
    ctx: &'a RouteCtx,
    /// The app's address, as the line shows it.
    peer: String,
    /// When the connection was accepted, for `duration_ms`.
    started: Instant,
    /// Bytes relayed each way (the app is the near side), kept up to date by the relay.
    pub(super) moved: Moved,
    /// Why it ended early, if it did: decides the outcome, the level and the failure metrics.
    pub(super) failure: Option<Failure>,
    /// The connection's OpenTelemetry span (nothing when traces are off).
    pub(super) span: ConnSpan,
}

impl<'a> AccessLog<'a> {
    pub(super) fn new(ctx: &'a RouteCtx, peer: String) -> Self {
        ctx.metrics.active.inc();
        AccessLog {
            span: ConnSpan::start_if(true, &ctx.route.name, &peer, Direction::Outbound),
            ctx,
            peer,
            started: Instant::now(),
            moved: Moved::default(),
            failure: None,
        }
    }
}

impl Drop for AccessLog<'_> {
    fn drop(&mut self) {
        let m = &self.ctx.metrics;
        m.active.dec();
        m.connection_finished(self.failure.as_ref().map(|f| f.class));
        m.connection_ended(self.started);
        let c = &self.moved;
        // `--access-log off` silences the info lines; a failure's warn line stays.
        let info = self.ctx.route.ops.connection_lines();
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let route = &self.ctx.route.name;
        let upstream = &self.ctx.upstream;
        let why = self
            .failure
            .as_ref()
            .map(|f| (f.class.outcome(), f.class.reason()));
        let (outcome, reason) = why.map_or(("ok", None), |(o, r)| (o, Some(r)));
        self.span
            .end("-", (c.near_to_far, c.far_to_near), outcome, reason);
        match &self.failure {
            None if !info => {}
            Some(f) if !info && !f.class.is_fault() => {}
            None => info!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.near_to_far, bytes_from_upstream = c.far_to_near,
                duration_ms, outcome = %"ok", "connection"
            ),
            Some(f) if !f.class.is_fault() => info!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.near_to_far, bytes_from_upstream = c.far_to_near,
                duration_ms, outcome = %f.class.outcome(), reason = %f.class.reason(),
                error = ?f.message, "connection"
            ),
            Some(f) => warn!(
                route = %route, peer = %self.peer, upstream = %upstream,
                bytes_to_upstream = c.near_to_far, bytes_from_upstream = c.far_to_near,
                duration_ms, outcome = %f.class.outcome(), reason = %f.class.reason(),
                error = ?f.message, "connection"
            ),
        }
    }
}

/// HTTP mode's record of one app connection (requests are counted in `http_requests_total`);
/// logs itself when dropped.
pub(super) struct HttpConnLog<'a> {
    /// The route, for the line's fields and `active_connections`.
    ctx: &'a RouteCtx,
    /// The app's address, as the line shows it.
    peer: String,
    /// When the connection was accepted, for `duration_ms`.
    started: Instant,
    /// How it ended: closed, error, cut, or which timeout closed it.
    pub(super) end: http::End,
}

impl<'a> HttpConnLog<'a> {
    pub(super) fn new(ctx: &'a RouteCtx, peer: String) -> Self {
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
        if !self.ctx.route.ops.connection_lines() {
            return;
        }
        info!(
            route = %self.ctx.route.name, peer = %self.peer, upstream = %self.ctx.upstream,
            duration_ms = self.started.elapsed().as_millis() as u64, mode = "http",
            end = self.end.as_str(), "app connection closed"
        );
    }
}
