//! Metric families (prometheus-client), all prefixed `mtls_sidecar_`. Each route resolves its
//! label sets once, at startup, into [`RouteMetrics`]: on the connection path an update is an
//! atomic add on a handle, with no lookup, lock or allocation.

use std::sync::{Mutex, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cli::Mode;
use crate::failure::Class;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    route: String,
    code: u16,
}

/// The `outcome` label values, in the order [`RouteMetrics::connections`] holds them.
const OUTCOMES: [&str; 5] = ["ok", "connect_error", "tls_error", "timeout", "error"];

/// How many status codes a route keeps the counter of (a hostile upstream can answer with
/// any of 900, and the scan is linear); further codes take the family's lookup.
const HTTP_CODES_CACHED: usize = 16;

const HTTP_HELP: &str = "HTTP requests answered (http mode), by status code";

/// Handshake buckets: 1 ms to 10 s.
const HANDSHAKE_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

fn handshake_histogram() -> Histogram {
    Histogram::new(HANDSHAKE_BUCKETS)
}

/// Request and connection duration buckets: 1 ms to 60 s.
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

const REQUEST_DURATION_HELP: &str =
    "HTTP mode: time from a request's head received to its response head sent to the app";
const CONNECTION_DURATION_HELP: &str =
    "Byte-stream mode: lifetime of an app connection, observed when it ends";

/// Families listed even with no series yet (prometheus-client leaves such a family out), so
/// the schema is the same whatever mode the routes use: (name, type, help).
const ALWAYS_LISTED: [(&str, &str, &str); 3] = [
    ("http_requests", "counter", HTTP_HELP),
    (
        "http_request_duration_seconds",
        "histogram",
        REQUEST_DURATION_HELP,
    ),
    (
        "connection_duration_seconds",
        "histogram",
        CONNECTION_DURATION_HELP,
    ),
];

type HistogramFamily = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// The request and connection duration families, registered.
fn register_durations(registry: &mut Registry) -> (HistogramFamily, HistogramFamily) {
    let durations = || HistogramFamily::new_with_constructor(duration_histogram);
    let (request, connection) = (durations(), durations());
    registry.register(
        "http_request_duration_seconds",
        REQUEST_DURATION_HELP,
        request.clone(),
    );
    registry.register(
        "connection_duration_seconds",
        CONNECTION_DURATION_HELP,
        connection.clone(),
    );
    (request, connection)
}

/// Every family, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    connections: Family<OutcomeLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    active: Family<RouteLabel, Gauge>,
    bytes: Family<DirectionLabels, Counter>,
    handshake: HistogramFamily,
    request_duration: HistogramFamily,
    connection_duration: HistogramFamily,
    client_expiry: Family<RouteLabel, Gauge>,
    upstream_expiry: Family<RouteLabel, Gauge>,
    ca_expiry: Family<RouteLabel, Gauge>,
    reloads: Family<ResultLabel, Counter>,
    http_requests: Family<CodeLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// One route's metric handles.
#[derive(Debug)]
pub struct RouteMetrics {
    /// `connections_total` by outcome, indexed like [`OUTCOMES`].
    connections: [Counter; 5],
    /// `connection_failures_total` and the route's name for its `reason` series.
    failures: (Family<ReasonLabels, Counter>, String),
    pub active: Gauge,
    pub bytes_to_upstream: Counter,
    pub bytes_from_upstream: Counter,
    pub handshake: Histogram,
    /// `http_request_duration_seconds`: on an http-mode route only (its series is made for
    /// http-mode routes alone).
    pub request_duration: Option<Histogram>,
    /// `connection_duration_seconds`: on a byte-stream-mode route only.
    pub connection_duration: Option<Histogram>,
    pub client_expiry: Gauge,
    /// The family and label of the upstream expiry: its series is created at the first
    /// successful handshake, so no alert ever sees a 0 that means "not seen yet".
    upstream_expiry: (Family<RouteLabel, Gauge>, RouteLabel),
    /// The upstream leaf whose expiry the gauge holds, so a repeat handshake with the same
    /// certificate costs a comparison, not a parse.
    last_upstream_leaf: Mutex<Vec<u8>>,
    /// `http_requests_total` and the route's name for its `code` series.
    http_requests: (Family<CodeLabels, Counter>, String),
    /// The `http_requests_total` counters of the codes this route answered so far (at most
    /// [`HTTP_CODES_CACHED`]), so a request costs a read lock and a short scan, not a copy
    /// of the route's name and a hash lookup in the family.
    http_codes: RwLock<Vec<(u16, Counter)>>,
    /// `ca_cert_expiry_timestamp_seconds`: created once the route trusts a CA bundle of its
    /// own, absent for the system trust store (see [`RouteMetrics::set_ca_expiry`]).
    ca_expiry: (Family<RouteLabel, Gauge>, RouteLabel),
}

impl RouteMetrics {
    pub fn connection_finished(&self, failure: Option<Class>) {
        let outcome = failure.map_or("ok", Class::outcome);
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(4);
        self.connections[i].inc();
        if let Some(class) = failure.filter(|c| c.is_fault()) {
            let (family, route) = &self.failures;
            family
                .get_or_create(&ReasonLabels {
                    route: route.clone(),
                    reason: class.reason(),
                })
                .inc();
        }
    }

    /// Count an inbound connection refused before any byte was relayed (handshake or target
    /// failure): its outcome class and its own `reason`.
    pub fn refused(&self, outcome: &'static str, reason: &'static str) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(4);
        self.connections[i].inc();
        let (family, route) = &self.failures;
        family
            .get_or_create(&ReasonLabels {
                route: route.clone(),
                reason,
            })
            .inc();
    }

    /// Count an HTTP answer: a read lock and a scan of the codes seen so far; the family is
    /// looked up (and the series created) only the first time a code is seen, or always for
    /// codes beyond the cached ones. No I/O under either lock.
    pub fn http_request(&self, code: u16) {
        if let Ok(codes) = self.http_codes.read()
            && let Some((_, counter)) = codes.iter().find(|(c, _)| *c == code)
        {
            counter.inc();
            return;
        }
        let (family, route) = &self.http_requests;
        let counter = family
            .get_or_create(&CodeLabels {
                route: route.clone(),
                code,
            })
            .clone();
        counter.inc();
        if let Ok(mut codes) = self.http_codes.write()
            && codes.len() < HTTP_CODES_CACHED
            && !codes.iter().any(|(c, _)| *c == code)
        {
            codes.push((code, counter));
        }
    }

    /// A byte-stream-mode app connection accepted at `started` ended (a no-op in http mode).
    pub fn connection_ended(&self, started: std::time::Instant) {
        if let Some(h) = &self.connection_duration {
            h.observe(started.elapsed().as_secs_f64());
        }
    }

    /// The earliest not-after among the route's trusted CAs; `None` removes the series (the
    /// system trust store, or no identity yet).
    pub fn set_ca_expiry(&self, not_after: Option<i64>) {
        let (family, label) = &self.ca_expiry;
        match not_after {
            Some(t) => {
                family.get_or_create(label).set(t);
            }
            None => {
                family.remove(label);
            }
        }
    }

    /// Record the upstream leaf of a successful handshake.
    pub fn upstream_leaf(&self, der: &[u8]) {
        let Ok(mut last) = self.last_upstream_leaf.lock() else {
            return;
        };
        if *last == der {
            return;
        }
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            let (family, label) = &self.upstream_expiry;
            family
                .get_or_create(label)
                .set(cert.validity().not_after.timestamp());
            last.clear();
            last.extend_from_slice(der);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A gauge family labelled by route, registered.
fn route_gauge(registry: &mut Registry, name: &str, help: &str) -> Family<RouteLabel, Gauge> {
    let family = Family::<RouteLabel, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mtls_sidecar");
        let connections = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "connections",
            "Plaintext connections finished, by outcome",
            connections.clone(),
        );
        let failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connection_failures",
            "Failed connections by the reason their access line gives (dns, refused, \
             unknown_issuer, client_cert_rejected, proxy_auth, ...)",
            failures.clone(),
        );
        let active = route_gauge(
            &mut registry,
            "active_connections",
            "Plaintext connections open now",
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "bytes",
            "Application bytes relayed (not TLS record bytes)",
            bytes.clone(),
        );
        let handshake =
            HistogramFamily::new_with_constructor(handshake_histogram as fn() -> Histogram);
        registry.register(
            "upstream_handshake_seconds",
            "Time of the TLS handshake with the upstream",
            handshake.clone(),
        );
        let client_expiry = route_gauge(
            &mut registry,
            "client_cert_expiry_timestamp_seconds",
            "Not-after of the client certificate in use, Unix seconds",
        );
        let upstream_expiry = route_gauge(
            &mut registry,
            "upstream_cert_expiry_timestamp_seconds",
            "Not-after of the upstream leaf seen at the last successful handshake, Unix seconds",
        );
        let ca_expiry = route_gauge(
            &mut registry,
            "ca_cert_expiry_timestamp_seconds",
            "Earliest not-after among the route's trusted CAs (--ca or SPIFFE bundles), Unix \
             seconds; absent for the system trust store",
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reloads",
            "Identity reload attempts, by result",
            reloads.clone(),
        );
        let http_requests = Family::<CodeLabels, Counter>::default();
        registry.register("http_requests", HTTP_HELP, http_requests.clone());
        let (request_duration, connection_duration) = register_durations(&mut registry);
        // Both results are listed from the start, so an alert on failures sees a zero.
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        Metrics {
            registry,
            connections,
            failures,
            active,
            bytes,
            handshake,
            request_duration,
            connection_duration,
            client_expiry,
            upstream_expiry,
            ca_expiry,
            reloads,
            http_requests,
        }
    }

    /// Resolve a route's handles (creating its series, so they show as zero from the start);
    /// `mode` decides which duration histogram the route has.
    pub fn route(&self, route: &str, mode: Mode) -> RouteMetrics {
        let r = RouteLabel {
            route: route.to_string(),
        };
        let counter = |outcome| {
            self.connections
                .get_or_create(&OutcomeLabels {
                    route: route.to_string(),
                    outcome,
                })
                .clone()
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&DirectionLabels {
                    route: route.to_string(),
                    direction,
                })
                .clone()
        };
        RouteMetrics {
            connections: OUTCOMES.map(counter),
            failures: (self.failures.clone(), route.to_string()),
            active: self.active.get_or_create(&r).clone(),
            bytes_to_upstream: bytes("to_upstream"),
            bytes_from_upstream: bytes("from_upstream"),
            handshake: self.handshake.get_or_create(&r).clone(),
            request_duration: (mode == Mode::Http)
                .then(|| self.request_duration.get_or_create(&r).clone()),
            connection_duration: (mode == Mode::Tcp)
                .then(|| self.connection_duration.get_or_create(&r).clone()),
            client_expiry: self.client_expiry.get_or_create(&r).clone(),
            upstream_expiry: (self.upstream_expiry.clone(), r.clone()),
            last_upstream_leaf: Mutex::new(Vec::new()),
            http_requests: (self.http_requests.clone(), route.to_string()),
            http_codes: RwLock::new(Vec::new()),
            ca_expiry: (self.ca_expiry.clone(), r.clone()),
        }
    }

    /// The `reloads_total` counters: (success, failure).
    pub fn reload_counters(&self) -> (Counter, Counter) {
        let get = |result| self.reloads.get_or_create(&ResultLabel { result }).clone();
        (get("success"), get("failure"))
    }

    /// The `reloads_total` counter of `result` (e.g. `rejected_by_upstream`).
    pub fn reload_counter(&self, result: &'static str) -> Counter {
        self.reloads.get_or_create(&ResultLabel { result }).clone()
    }

    /// OpenMetrics text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // prometheus-client leaves out a family with no series yet; OpenMetrics allows an empty
        // family, and listing it keeps the schema the same whatever the routes' modes.
        for (name, kind, help) in ALWAYS_LISTED {
            let head = format!("# TYPE mtls_sidecar_{name} {kind}\n");
            if !out.contains(&head)
                && let Some(eof) = out.rfind("# EOF")
            {
                out.insert_str(eof, &format!("# HELP mtls_sidecar_{name} {help}.\n{head}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_moves() {
        let m = Metrics::new();
        let r = m.route("default", Mode::Tcp);
        r.connection_finished(None);
        r.connection_finished(Some(Class::Refused));
        r.bytes_to_upstream.inc_by(10);
        r.handshake.observe(0.003);
        r.connection_ended(std::time::Instant::now());
        let text = m.encode();
        for want in [
            "mtls_sidecar_connections_total{route=\"default\",outcome=\"ok\"} 1",
            "mtls_sidecar_connections_total{route=\"default\",outcome=\"connect_error\"} 1",
            "mtls_sidecar_connection_failures_total{route=\"default\",reason=\"refused\"} 1",
            "mtls_sidecar_bytes_total{route=\"default\",direction=\"to_upstream\"} 10",
            "mtls_sidecar_upstream_handshake_seconds_count{route=\"default\"} 1",
            "mtls_sidecar_reloads_total{result=\"failure\"} 0",
            "# TYPE mtls_sidecar_http_requests counter",
            "# TYPE mtls_sidecar_client_cert_expiry_timestamp_seconds gauge",
            "mtls_sidecar_connection_duration_seconds_bucket{le=\"0.001\",route=\"default\"} 1",
            "mtls_sidecar_connection_duration_seconds_count{route=\"default\"} 1",
            "# TYPE mtls_sidecar_http_request_duration_seconds histogram",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    /// Counts are right for cached codes, for a repeat code and beyond the cache's bound.
    #[test]
    fn http_request_counts_every_code() {
        let m = Metrics::new();
        let r = m.route("web", Mode::Http);
        for _ in 0..3 {
            r.http_request(200);
        }
        r.http_request(404);
        for code in 100..(100 + HTTP_CODES_CACHED as u16 + 5) {
            r.http_request(code);
            r.http_request(code);
        }
        let text = m.encode();
        let last = 100 + HTTP_CODES_CACHED as u16 + 4;
        for want in [
            "mtls_sidecar_http_requests_total{route=\"web\",code=\"200\"} 3".to_string(),
            "mtls_sidecar_http_requests_total{route=\"web\",code=\"404\"} 1".to_string(),
            "mtls_sidecar_http_requests_total{route=\"web\",code=\"100\"} 2".to_string(),
            format!("mtls_sidecar_http_requests_total{{route=\"web\",code=\"{last}\"}} 2"),
        ] {
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
        assert_eq!(r.http_codes.read().unwrap().len(), HTTP_CODES_CACHED);
    }
}
