//! OpenTelemetry traces, on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-only variable) is
//! set and the binary was built with the `otel` feature. Spans are made by calling the
//! OpenTelemetry API directly, not through `tracing`: with no endpoint, every hook below is one
//! load of a `OnceLock` that finds nothing, so requests and connections allocate nothing.
//!
//! - http mode: one span per request ([`RequestSpan`]), child of a valid incoming W3C
//!   `traceparent`; the request sent on carries a `traceparent` naming our span.
//! - a dial made for a traced request or connection: `connect`, `proxy connect` and
//!   `tls handshake` child spans ([`Phase`]).
//! - tcp mode: one span per connection ([`ConnSpan`]).
//!
//! Without the feature the same names exist as no-ops (`off.rs`), so callers need no `cfg`.

#[cfg(feature = "otel")]
mod client;
#[cfg(feature = "otel")]
mod on;
#[cfg(feature = "otel")]
mod setup;

#[cfg(feature = "otel")]
pub use self::on::{ConnSpan, Phase, RequestSpan, in_current};
#[cfg(feature = "otel")]
pub use self::setup::{enabled, init, shutdown};

#[cfg(not(feature = "otel"))]
mod off;
#[cfg(not(feature = "otel"))]
pub use self::off::{ConnSpan, Phase, RequestSpan, enabled, in_current, init, shutdown};

/// The dial phases, as span names.
pub const CONNECT: &str = "connect";
pub const PROXY_CONNECT: &str = "proxy connect";
pub const TLS_HANDSHAKE: &str = "tls handshake";

/// What a traced connection is, for its span's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// An outbound route: the app's connection, relayed to the upstream (kind client).
    Outbound,
    /// An inbound route: a verified client's connection, relayed to the target (kind server).
    Inbound,
}

/// The names a request span carries: the route, and where its requests go.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// `mtls_sidecar.route`.
    pub route: &'a str,
    /// `server.address`: the upstream's server name (outbound) or the target (inbound).
    pub server: &'a str,
    /// The verified client's URI SAN (else DNS SAN) on an inbound route.
    pub peer_id: Option<&'a str>,
}
