//! OpenTelemetry traces (`OTEL_EXPORTER_OTLP_ENDPOINT`) against the test collector of
//! `support::otlp_collector`: one span per request in http mode, child of the app's
//! `traceparent` and propagated upstream as ours; dial phases as children of the request that
//! dialled; one span per connection in tcp mode; the resource's `service.name`; the flush at
//! shutdown; gRPC; and with no endpoint (or `OTEL_SDK_DISABLED`), nothing added or exported.

use std::time::Duration;

use crate::support::http::*;
use crate::support::otlp_collector::{Collector, Got};
use crate::support::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// `mtls-sidecar run --mode http` exporting to `collector` every 50 ms.
fn traced(cmd: Cmd, collector: &Collector) -> Cmd {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|g| g.name() == name).collect()
}

fn children<'a>(spans: &'a [Got], parent: &Got) -> Vec<&'a Got> {
    spans
        .iter()
        .filter(|g| g.parent_id() == parent.span_id())
        .collect()
}

/// The span of the request the upstream saw with `x-request-id: id`, found by the
/// `traceparent` it carried (whose parent-id must be our span's id).
fn span_of<'a>(spans: &'a [Got], up: &HttpUpstream, id: &str) -> &'a Got {
    let seen = up.stats.request(id);
    let tp = seen
        .get("traceparent")
        .unwrap_or_else(|| panic!("request {id} reached the upstream without traceparent"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    spans
        .iter()
        .find(|g| g.span_id() == parts[2] && g.trace_id() == parts[1])
        .unwrap_or_else(|| panic!("no exported span is the parent named by {tp:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn http_request_spans_follow_traceparent_and_name_the_dial() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let collector = Collector::http().await;
    let proxy = traced(
        http_cmd(&pki, format!("localhost:{}", up.port())),
        &collector,
    )
    .start();
    let mut app = H1Client::connect(proxy.addr()).await;
    let first = h1_req("GET", "/first?token=secret")
        .header("x-request-id", "r1")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("tracestate", "vendor=abc")
        .body(empty())
        .expect("request");
    assert_eq!(app.call(first).await.status, 200);
    // Same app connection, a warm pooled upstream connection: no dial.
    let second = h1_req("POST", "/second")
        .header("x-request-id", "r2")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(full("body"))
        .expect("request");
    assert_eq!(app.call(second).await.status, 200);
    // An invalid traceparent is dropped, never echoed: ours replaces it, in a new trace.
    let bogus = "00-zzzz2f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let third = h1_req("GET", "/third")
        .header("x-request-id", "r3")
        .header("traceparent", bogus)
        .body(empty())
        .expect("request");
    assert_eq!(app.call(third).await.status, 200);

    let spans = collector
        .wait_for("3 request spans and the first one's dial", |s| {
            named(s, "GET").len() == 2
                && named(s, "POST").len() == 1
                && !named(s, "tls handshake").is_empty()
        })
        .await;
    let s1 = span_of(&spans, &up, "r1");
    assert_eq!(s1.trace_id(), TRACE, "the app's trace goes on");
    assert_eq!(s1.parent_id(), PARENT, "child of the app's span");
    assert_eq!(s1.span.kind, 2, "kind server");
    assert_eq!(s1.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(s1.attr("url.path").as_deref(), Some("/first"), "no query");
    assert_eq!(s1.attr("server.address").as_deref(), Some("localhost"));
    assert_eq!(s1.attr("http.response.status_code").as_deref(), Some("200"));
    assert_eq!(s1.attr("network.protocol.version").as_deref(), Some("1.1"));
    assert!(s1.attr("mtls_sidecar.route").is_some(), "{s1:?}");
    assert_eq!(s1.status(), 0, "a 200 is not an error");
    assert_eq!(
        up.stats.request("r1").get("tracestate"),
        Some("vendor=abc"),
        "tracestate goes on with the trace"
    );
    let dial: Vec<&str> = children(&spans, s1).iter().map(|g| g.name()).collect();
    assert!(
        dial.contains(&"connect") && dial.contains(&"tls handshake"),
        "the first request dialled: {dial:?}"
    );
    for g in children(&spans, s1) {
        assert_eq!(g.trace_id(), TRACE);
        assert!(g.span.start_time_unix_nano >= s1.span.start_time_unix_nano);
        assert!(g.span.end_time_unix_nano <= s1.span.end_time_unix_nano);
    }

    let s2 = span_of(&spans, &up, "r2");
    assert_eq!(s2.parent_id(), PARENT);
    assert_ne!(s2.span_id(), s1.span_id());
    assert!(
        children(&spans, s2).is_empty(),
        "a request on a pooled connection has no dial spans"
    );

    let s3 = span_of(&spans, &up, "r3");
    assert_ne!(s3.trace_id(), TRACE);
    assert!(s3.parent_id().is_empty(), "a root span: {s3:?}");
    let tp3 = up
        .stats
        .request("r3")
        .get("traceparent")
        .map(str::to_string);
    assert_ne!(tp3.as_deref(), Some(bogus));
    for g in &spans {
        assert_eq!(
            g.resource_attr("service.name").as_deref(),
            Some("mtls-sidecar")
        );
    }
}

/// Without a `traceparent`, the span is a root and the upstream still gets ours; our own 502
/// is an error span with the failure class, and the failed dial says so too.
#[tokio::test(flavor = "multi_thread")]
async fn own_502_is_an_error_span_with_the_failure_class() {
    let pki = Pki::new();
    let collector = Collector::http().await;
    let dead = free_port();
    let proxy = traced(http_cmd(&pki, format!("localhost:{dead}")), &collector).start();
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/x").body(empty()).expect("req"),
    )
    .await;
    assert_eq!(reply.status, 502);
    let spans = collector
        .wait_for("the request span", |s| !named(s, "GET").is_empty())
        .await;
    let s = named(&spans, "GET")[0];
    assert!(s.parent_id().is_empty());
    assert_eq!(s.status(), 2, "error status: {s:?}");
    assert_eq!(s.attr("http.response.status_code").as_deref(), Some("502"));
    assert_eq!(s.attr("error.type").as_deref(), Some("refused"));
    let spans = collector
        .wait_for("the failed connect span", |s| {
            !named(s, "connect").is_empty()
        })
        .await;
    let c = named(&spans, "connect")[0];
    assert_eq!(c.status(), 2);
    assert_eq!(c.attr("error.type").as_deref(), Some("refused"));
}

/// tcp mode: one span per connection, kind client, with bytes each way and the outcome; its
/// handshake is a child. `OTEL_SERVICE_NAME` names the service.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_mode_one_span_per_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let collector = Collector::http().await;
    let proxy = traced(run_cmd(&pki, up.addr), &collector)
        .env("OTEL_SERVICE_NAME", "billing-sidecar")
        .start();
    for n in [3usize, 5] {
        let mut s = connect(proxy.addr()).await;
        s.write_all(&vec![b'x'; n]).await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut back))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back.len(), n);
    }
    let spans = collector
        .wait_for("2 connection spans", |s| named(s, "connection").len() == 2)
        .await;
    let mut sent: Vec<String> = Vec::new();
    for c in named(&spans, "connection") {
        assert_eq!(c.span.kind, 3, "kind client: {c:?}");
        assert!(c.parent_id().is_empty());
        assert_eq!(c.attr("mtls_sidecar.outcome").as_deref(), Some("ok"));
        assert!(c.attr("mtls_sidecar.route").is_some());
        assert!(c.attr("client.address").is_some());
        assert_eq!(
            c.attr("mtls_sidecar.bytes_sent"),
            c.attr("mtls_sidecar.bytes_received")
        );
        sent.push(c.attr("mtls_sidecar.bytes_sent").unwrap_or_default());
        let kids: Vec<&str> = children(&spans, c).iter().map(|g| g.name()).collect();
        assert!(kids.contains(&"tls handshake"), "{kids:?}");
        assert_eq!(
            c.resource_attr("service.name").as_deref(),
            Some("billing-sidecar")
        );
    }
    sent.sort();
    assert_eq!(sent, ["3", "5"]);
}

/// OTLP/gRPC, and the batch is flushed at shutdown (the schedule delay is an hour).
#[tokio::test(flavor = "multi_thread")]
async fn grpc_export_and_flush_at_shutdown() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let collector = Collector::grpc().await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .start();
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/g")
            .header("x-request-id", "g1")
            .body(empty())
            .expect("req"),
    )
    .await;
    assert_eq!(reply.status, 200);
    proxy.signal("TERM");
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "{status:?}\n{}", proxy.stderr());
    let spans = collector
        .wait_for("the request span, flushed at shutdown", |s| {
            !named(s, "GET").is_empty()
        })
        .await;
    let s = span_of(&spans, &up, "g1");
    assert_eq!(s.attr("network.protocol.version").as_deref(), Some("1.1"));
}

/// No endpoint: the app's `traceparent` passes unchanged and none is added. With an endpoint
/// but `OTEL_SDK_DISABLED=true`: the same, and nothing reaches the collector.
#[tokio::test(flavor = "multi_thread")]
async fn without_endpoint_nothing_is_added_or_exported() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let collector = Collector::http().await;
    let plain = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let disabled = traced(
        http_cmd(&pki, format!("localhost:{}", up.port())),
        &collector,
    )
    .env("OTEL_SDK_DISABLED", "true")
    .start();
    let theirs = format!("00-{TRACE}-{PARENT}-01");
    for (i, proxy) in [&plain, &disabled].into_iter().enumerate() {
        let with = h1_req("GET", "/a")
            .header("x-request-id", format!("with-{i}"))
            .header("traceparent", &theirs)
            .body(empty())
            .expect("req");
        assert_eq!(h1_call(proxy.addr(), with).await.status, 200);
        let without = h1_req("GET", "/b")
            .header("x-request-id", format!("without-{i}"))
            .body(empty())
            .expect("req");
        assert_eq!(h1_call(proxy.addr(), without).await.status, 200);
        let seen = up.stats.request(&format!("with-{i}"));
        assert_eq!(seen.get("traceparent"), Some(theirs.as_str()));
        let seen = up.stats.request(&format!("without-{i}"));
        assert_eq!(seen.get("traceparent"), None);
    }
    // 20 schedule delays: a span would have been exported by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(collector.requests(), 0, "{:?}", collector.spans());
}

/// A collector that cannot be reached: the requests are served as ever, and the failed exports
/// give one warning line, not one per export.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_collector_warns_once() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", "300")
        .env("OTEL_BSP_SCHEDULE_DELAY", "20")
        .start();
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) || i < 5 {
        let req = h1_req("GET", "/x").body(empty()).expect("req");
        assert_eq!(h1_call(proxy.addr(), req).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        i += 1;
    }
    let line = "opentelemetry span export failed";
    eventually("the export failure line", WAIT, || {
        proxy.stderr().contains(line)
    })
    .await;
    let n = proxy.stderr().matches(line).count();
    assert_eq!(n, 1, "{}", proxy.stderr());
}
