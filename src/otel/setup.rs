//! Starting the tracer provider from the standard `OTEL_*` variables, and flushing it at
//! shutdown.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use tracing::{info, warn};

use super::client::HyperClient;

/// The service name when neither `OTEL_SERVICE_NAME` nor `service.name` in
/// `OTEL_RESOURCE_ATTRIBUTES` gives one.
const DEFAULT_SERVICE_NAME: &str = "mtls-sidecar";

/// How long shutdown waits for the last spans to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Export failures are logged at most once per this interval (with a count of the others).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Default export timeout (the OTLP exporter's default, `OTEL_EXPORTER_OTLP_TIMEOUT`).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The running tracer, set once at startup when an endpoint is configured.
pub(super) struct State {
    /// Ends (flushes) the batch processor at shutdown.
    provider: SdkTracerProvider,
    /// Makes every span.
    pub(super) tracer: SdkTracer,
}

pub(super) static STATE: OnceLock<State> = OnceLock::new();

/// Whether traces are on (an endpoint was configured at startup).
#[inline]
pub fn enabled() -> bool {
    STATE.get().is_some()
}

/// The wire protocol, from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `http/protobuf`, the specification's default.
    HttpProtobuf,
    /// `grpc`.
    Grpc,
}

fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// Start the tracer when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
/// is set (and `OTEL_SDK_DISABLED` is not `true`); else nothing is started. Call inside the
/// runtime: the exporters' I/O runs on it. A bad setting is logged and leaves traces off.
pub fn init() {
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else {
        return;
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        info!("OTEL_SDK_DISABLED=true: no traces");
        return;
    }
    let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("http/protobuf") => Protocol::HttpProtobuf,
        Some("grpc") => Protocol::Grpc,
        Some(other) => {
            warn!(protocol = ?other, "OTEL_EXPORTER_OTLP_PROTOCOL not supported (use http/protobuf or grpc): no traces");
            return;
        }
    };
    if endpoint.trim().to_ascii_lowercase().starts_with("https:") {
        // Neither exporter links a TLS client: the proxy's own TLS stack serves its routes.
        warn!(endpoint = %shown_endpoint(&endpoint), "https OTLP endpoints are not supported (use http://, e.g. a collector on the node or in the cluster): no traces");
        return;
    }
    let exporter = match build_exporter(protocol) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "cannot start the OTLP trace exporter: no traces");
            return;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Logged::new(exporter))
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("mtls-sidecar");
    let proto = match protocol {
        Protocol::HttpProtobuf => "http/protobuf",
        Protocol::Grpc => "grpc",
    };
    if STATE.set(State { provider, tracer }).is_ok() {
        // Headers are never logged, nor credentials or a query in the endpoint URL.
        info!(endpoint = %shown_endpoint(&endpoint), protocol = proto, "opentelemetry traces on");
    }
}

/// The endpoint as logged: scheme, host and port only (`user:token@` and `?query` dropped),
/// escaped.
fn shown_endpoint(endpoint: &str) -> String {
    let e = endpoint.trim();
    let (scheme, rest) = e.split_once("://").unwrap_or(("", e));
    let rest = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let shown = if scheme.is_empty() {
        host.to_string()
    } else {
        format!("{scheme}://{host}")
    };
    crate::failure::escape(&shown).into_owned()
}

fn build_exporter(
    protocol: Protocol,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    match protocol {
        Protocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(HyperClient::new(export_timeout()))
            .build(),
        Protocol::Grpc => builder.with_tonic().build(),
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or `OTEL_EXPORTER_OTLP_TIMEOUT` (milliseconds), else 10 s:
/// our HTTP client's bound on one export.
fn export_timeout() -> Duration {
    var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis)
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), with `service.name`
/// `mtls-sidecar` unless one of them names the service.
fn resource() -> Resource {
    let named = names_service(
        var("OTEL_SERVICE_NAME").as_deref(),
        var("OTEL_RESOURCE_ATTRIBUTES").as_deref(),
    );
    let builder = Resource::builder();
    if named {
        builder.build()
    } else {
        builder.with_service_name(DEFAULT_SERVICE_NAME).build()
    }
}

/// Whether `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`) names the service.
fn names_service(service_name: Option<&str>, attributes: Option<&str>) -> bool {
    service_name.is_some_and(|n| !n.trim().is_empty())
        || attributes.is_some_and(|a| {
            a.split(',').any(|kv| {
                kv.split('=')
                    .next()
                    .is_some_and(|k| k.trim() == "service.name")
            })
        })
}

/// Flush what is queued (at most [`FLUSH_TIMEOUT`]) and stop the exporter; at graceful shutdown.
pub async fn shutdown() {
    let Some(state) = STATE.get() else {
        return;
    };
    let provider = state.provider.clone();
    // The batch processor's flush blocks its caller; the export itself runs on the runtime.
    let flushed =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT)).await;
    match flushed {
        Ok(Ok(())) => info!("opentelemetry spans flushed"),
        Ok(Err(e)) => warn!(error = %e, "opentelemetry spans not all flushed at shutdown"),
        Err(_) => {}
    }
}

/// The exporter, logging failed exports at most once per [`FAILURE_LOG_INTERVAL`].
#[derive(Debug)]
struct Logged<E> {
    inner: E,
    /// Seconds since the epoch of the last failure line; 0 before any.
    last_logged: AtomicU64,
    /// Failures since that line.
    unlogged: AtomicU64,
}

impl<E> Logged<E> {
    fn new(inner: E) -> Self {
        Logged {
            inner,
            last_logged: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    fn note_failure(&self, e: &dyn std::fmt::Display) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_logged.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FAILURE_LOG_INTERVAL.as_secs()
            || self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.unlogged.swap(0, Ordering::Relaxed);
        let error = e.to_string();
        warn!(error = ?error, suppressed, "opentelemetry span export failed; spans dropped");
    }
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let r = self.inner.export(batch).await;
        if let Err(e) = &r {
            self.note_failure(e);
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::names_service;

    #[test]
    fn service_name_from_either_variable() {
        assert!(!names_service(None, None));
        assert!(!names_service(Some(" "), Some("team=payments")));
        assert!(names_service(Some("billing"), None));
        assert!(names_service(
            None,
            Some("team=payments, service.name=billing")
        ));
        assert!(!names_service(None, Some("service.namespace=shop")));
    }
}
