//! OpenTelemetry spans on the other kinds of route: an http-mode route through an egress proxy
//! (the dial's `connect`, `proxy connect` and `tls handshake`), an inbound http-mode route (the
//! request span names the verified client), an inbound tcp-mode route (kind server, the client
//! and its handshake), and an h2 app (`network.protocol.version` 2).

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::connect_proxy::{ConnectProxy, UPSTREAM_NAME, named_server};
use crate::support::http::*;
use crate::support::inbound::{
    EchoTarget, client_config_alpn, inbound_cmd, inbound_http_cmd, tls_connect,
};
use crate::support::otlp_collector::{Collector, Got};
use crate::support::pki::{Identity, LeafSpec};
use crate::support::upstream::server_config;
use crate::support::*;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const PARENT: &str = "b7ad6b7169203331";
const WEB_ID: &str = "spiffe://example.org/ns/shop/sa/web";

fn traced(cmd: Cmd, collector: &Collector) -> Cmd {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|g| g.name() == name).collect()
}

/// A client leaf with a URI SAN.
fn web_client(pki: &Pki) -> Identity {
    let spec = LeafSpec {
        uris: &[WEB_ID],
        ..LeafSpec::client("web")
    };
    pki.leaf(&pki.ca, "web", spec)
}

#[tokio::test(flavor = "multi_thread")]
async fn through_an_egress_proxy_the_dial_has_three_phases() {
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = HttpUpstream::with_config(config, Alpn::Http11).await;
    let proxy = ConnectProxy::start().await;
    let collector = Collector::http().await;
    let upstream = format!("{UPSTREAM_NAME}:{}", up.port());
    let sidecar = traced(http_cmd(&pki, upstream), &collector)
        .args(["--proxy", &proxy.url()])
        .start();
    let req = h1_req("GET", "/p")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(empty())
        .expect("req");
    let reply = h1_call(sidecar.addr(), req).await;
    assert_eq!(reply.status, 200, "{}", sidecar.stderr());
    assert_eq!(proxy.connects(), 1);
    let spans = collector
        .wait_for("the request and its 3 dial phases", |s| s.len() >= 4)
        .await;
    let request = named(&spans, "GET")[0];
    assert_eq!(request.parent_id(), PARENT);
    let mut phases: Vec<&Got> = spans
        .iter()
        .filter(|g| g.parent_id() == request.span_id())
        .collect();
    phases.sort_by_key(|g| g.span.start_time_unix_nano);
    let names: Vec<&str> = phases.iter().map(|g| g.name()).collect();
    assert_eq!(names, ["connect", "proxy connect", "tls handshake"]);
    for p in &phases {
        assert_eq!(p.trace_id(), TRACE);
        assert_eq!(p.status(), 0, "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_http_request_span_names_the_client() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let collector = Collector::http().await;
    let sidecar = traced(inbound_http_cmd(&pki, target.addr), &collector)
        .args(["--verify-uri-san", WEB_ID])
        .start();
    let web = web_client(&pki);
    let config = client_config_alpn(&pki, Some(&web), &[b"http/1.1"]);
    let tls = tls_connect(sidecar.addr(), config).await.expect("mTLS");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let req = h1_req("GET", "/in?q=1")
        .header("x-request-id", "in-1")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(empty())
        .expect("req");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let spans = collector
        .wait_for("the request span", |s| !named(s, "GET").is_empty())
        .await;
    let s = named(&spans, "GET")[0];
    assert_eq!(s.parent_id(), PARENT);
    assert_eq!(s.span.kind, 2, "kind server");
    assert_eq!(s.attr("mtls_sidecar.client.id").as_deref(), Some(WEB_ID));
    assert_eq!(s.attr("url.path").as_deref(), Some("/in"));
    let target_addr = target.addr.to_string();
    assert_eq!(
        s.attr("server.address").as_deref(),
        Some(target_addr.as_str())
    );
    let tp = target
        .stats
        .request("in-1")
        .get("traceparent")
        .map(str::to_string);
    let want = format!("00-{TRACE}-{}-01", s.span_id());
    assert_eq!(
        tp.as_deref(),
        Some(want.as_str()),
        "the target sees our span"
    );
    assert!(
        named(&spans, "connection").is_empty(),
        "http mode traces requests, not connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_tcp_connection_span_is_kind_server_with_the_client() {
    let pki = Pki::new();
    let target = EchoTarget::start().await;
    let collector = Collector::http().await;
    let sidecar = traced(inbound_cmd(&pki, target.addr), &collector)
        .args(["--verify-uri-san", WEB_ID])
        .start();
    let web = web_client(&pki);
    let mut tls = tls_connect(sidecar.addr(), client_config_alpn(&pki, Some(&web), &[]))
        .await
        .expect("mTLS");
    tls.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, tls.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    tls.shutdown().await.expect("close");
    drop(tls);
    let spans = collector
        .wait_for("the connection span", |s| {
            !named(s, "connection").is_empty()
        })
        .await;
    let c = named(&spans, "connection")[0];
    assert_eq!(c.span.kind, 2, "kind server");
    assert_eq!(c.attr("mtls_sidecar.client.id").as_deref(), Some(WEB_ID));
    assert_eq!(c.attr("mtls_sidecar.bytes_received").as_deref(), Some("4"));
    let spans = collector
        .wait_for("its handshake", |s| !named(s, "tls handshake").is_empty())
        .await;
    let h = named(&spans, "tls handshake")[0];
    assert_eq!(h.parent_id(), c.span_id());
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_app_requests_are_traced_too() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let collector = Collector::http().await;
    let sidecar = traced(
        http_cmd(&pki, format!("localhost:{}", up.port())),
        &collector,
    )
    .start();
    let mut app = H2Client::connect(sidecar.addr()).await;
    let req = h2_req("GET", "/h2")
        .header("x-request-id", "h2-1")
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(empty())
        .expect("req");
    assert_eq!(app.call(req).await.status, 200);
    let spans = collector
        .wait_for("the request span and its dial", |s| {
            !named(s, "GET").is_empty() && !named(s, "tls handshake").is_empty()
        })
        .await;
    let s = named(&spans, "GET")[0];
    assert_eq!(s.attr("network.protocol.version").as_deref(), Some("2"));
    assert_eq!(named(&spans, "tls handshake")[0].parent_id(), s.span_id());
    let tp = up
        .stats
        .request("h2-1")
        .get("traceparent")
        .map(str::to_string);
    assert_eq!(tp, Some(format!("00-{TRACE}-{}-01", s.span_id())));
}
