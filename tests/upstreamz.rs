//! `GET /upstreamz`: one real handshake per outbound route with the identity in force: `200`
//! with `ROUTE ok` lines for a good upstream (also through an egress proxy), `503` with a line
//! in `check`'s words when the upstream refuses our certificate, is down, or presents a
//! certificate for another name, or when a `--spiffe` route has no identity yet; answers
//! reused for 5 s, concurrent requests sharing one probe; no effect on `connections_total` or
//! `active_connections`; `upstream_cert_expiry_timestamp_seconds` refreshed; inbound routes
//! listed as skipped; `/readyz` unaffected by a failing upstream.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::admin::*;
use crate::support::connect_proxy::{ConnectProxy, UPSTREAM_NAME, named_upstream};
use crate::support::pki::LeafSpec;
use crate::support::upstream::server_config;
use crate::support::*;

fn start(cmd: &Cmd) -> (Sidecar, std::net::SocketAddr) {
    let mut proxy = cmd.start();
    let admin = admin_addr(&mut proxy);
    (proxy, admin)
}

fn admin_cmd(pki: &Pki, upstream: impl std::fmt::Display) -> Cmd {
    run_cmd(pki, upstream).args(["--admin", "127.0.0.1:0"])
}

fn accepted(up: &Upstream) -> usize {
    up.stats.tcp_accepted.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_upstream_answers_200_without_counting_a_connection() {
    let pki = Pki::new();
    let server = pki.leaf(&pki.ca, "server-dated", LeafSpec::server());
    let up = Upstream::start(server_config(&server, &[&pki.ca.der]), vec![Behavior::Echo]).await;
    let (_proxy, admin) = start(&admin_cmd(&pki, up.addr));

    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body, "default ok\n");
    assert_eq!(accepted(&up), 1, "one real handshake");
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 1, "the handshake completed: {conns:?}");
    assert_eq!(
        conns[0].client_cn.as_deref(),
        Some(crate::support::pki::CLIENT_CN),
        "with our client certificate"
    );

    let m = scrape(admin).await;
    let p = "mtls_sidecar_";
    for outcome in ["ok", "connect_error", "tls_error", "timeout", "error"] {
        let labels = [("route", "default"), ("outcome", outcome)];
        assert_eq!(
            m.value(&format!("{p}connections_total"), &labels),
            0.0,
            "{outcome}"
        );
    }
    let active = m.value(&format!("{p}active_connections"), &[("route", "default")]);
    assert_eq!(active, 0.0);
    let expiry = m.get(
        &format!("{p}upstream_cert_expiry_timestamp_seconds"),
        &[("route", "default")],
    );
    assert_eq!(expiry, Some(server.not_after_unix() as f64), "{}", m.text);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_refuses_our_client_certificate_is_named() {
    let pki = Pki::new();
    let other = pki.other_ca();
    // It requires a client certificate from a CA that did not issue ours.
    let up = Upstream::start(
        server_config(&pki.server, &[&other.der]),
        vec![Behavior::Echo],
    )
    .await;
    let (_proxy, admin) = start(&admin_cmd(&pki, up.addr));
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(resp.body.lines().count(), 1, "{resp:?}");
    let line = resp.body.lines().next().unwrap_or_default();
    assert!(
        line.starts_with(
            "default: the upstream rejected our client certificate (alert unknown_ca)"
        ),
        "{line}"
    );
    assert!(
        line.contains("untrusted test CA"),
        "names the CAs it accepts: {line}"
    );
    // Local readiness does not depend on the upstream.
    assert_eq!(get(admin, "/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_upstream_and_a_wrong_name_are_explained() {
    let pki = Pki::new();
    let port = free_port();
    let (_p1, admin) = start(&admin_cmd(&pki, format!("127.0.0.1:{port}")));
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        resp.body
            .starts_with("default: nothing accepted a connection at 127.0.0.1:")
            && resp.body.contains("connection refused"),
        "{resp:?}"
    );

    let wrong = pki.server_wrong_name();
    let up = Upstream::start(server_config(&wrong, &[&pki.ca.der]), vec![Behavior::Echo]).await;
    let (_p2, admin) = start(&admin_cmd(&pki, format!("localhost:{}", up.port())));
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        resp.body.contains("other.example") && resp.body.contains("not the name we dialled"),
        "{resp:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_reused_for_5_seconds_and_concurrent_requests_share_one_probe() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_proxy, admin) = start(&admin_cmd(&pki, up.addr));

    // Ten at once: one handshake between them.
    let asks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(admin, "/upstreamz").await }))
        .collect();
    for a in asks {
        let resp = a.await.expect("task");
        assert_eq!(resp.status, 200, "{resp:?}");
    }
    let answered = Instant::now();
    assert_eq!(
        accepted(&up),
        1,
        "concurrent requests started more than one probe"
    );
    // Within 5 s: the same answer, no new handshake.
    assert_eq!(get(admin, "/upstreamz").await.status, 200);
    assert!(
        answered.elapsed() < Duration::from_secs(4),
        "the test was too slow to tell"
    );
    assert_eq!(
        accepted(&up),
        1,
        "a second request within 5 s dialled again"
    );
    // After 5 s: a new probe.
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted(&up) < 2 {
        assert!(Instant::now() < deadline, "no new probe after 5 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(admin, "/upstreamz").await.status, 200);
    }
    assert!(
        answered.elapsed() >= Duration::from_secs(5),
        "a new probe after only {:?}",
        answered.elapsed()
    );
    assert_eq!(accepted(&up), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn through_an_egress_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let egress = ConnectProxy::start().await;
    let cmd =
        admin_cmd(&pki, format!("{UPSTREAM_NAME}:{}", up.port())).args(["--proxy", &egress.url()]);
    let (_proxy, admin) = start(&cmd);
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(egress.connects(), 1, "the probe went through the proxy");
    assert_eq!(up.stats.tls_accepted(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_routes_inbound_skipped_and_a_spiffe_route_without_identity() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let socket = pki.path("no-agent.sock");
    let down = free_port();
    let (cert, key, ca) = (&pki.client.cert, &pki.client.key, &pki.ca.pem);
    let (scert, skey) = (&pki.server.cert, &pki.server.key);
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[route]]\nname = \"good\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{good}\"\n\
         cert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\
         [[route]]\nname = \"down\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{down}\"\n\
         cert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\
         [[route]]\nname = \"in\"\ninbound = true\nlisten = \"127.0.0.1:0\"\n\
         target = \"127.0.0.1:{down}\"\ncert = {scert:?}\nkey = {skey:?}\nca = {ca:?}\n\
         allow_any_client = true\n\
         [[route]]\nname = \"waiting\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{good}\"\n\
         spiffe = true\nspiffe_socket = {socket:?}\n\
         verify_uri_san = [\"spiffe://example.org/api\"]\n",
        good = up.addr,
    );
    let file = pki.write("routes.toml", config);
    let mut proxy = Cmd::new().arg("run").arg("--config").arg(&file).spawn();
    let admin = admin_addr(&mut proxy);
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    let lines: Vec<&str> = resp.body.lines().collect();
    assert_eq!(lines.len(), 4, "{resp:?}");
    assert_eq!(lines[0], "good ok", "{resp:?}");
    assert!(
        lines[1].starts_with("down: nothing accepted a connection"),
        "{resp:?}"
    );
    assert!(lines[2].starts_with("in skipped"), "{resp:?}");
    assert!(
        lines[3].starts_with("waiting: ") && lines[3].contains("waiting for the first SVID"),
        "{resp:?}"
    );
    assert_eq!(
        accepted(&up),
        1,
        "the skipped and waiting routes dialled nothing"
    );
}

/// App traffic leaves a session ticket behind; the probe still makes a full handshake, so the
/// upstream judges our certificate again.
#[tokio::test(flavor = "multi_thread")]
async fn the_probe_never_resumes_a_session() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (proxy, admin) = start(&admin_cmd(&pki, up.addr));
    let data = pattern(3, 1000);
    assert_eq!(exchange(proxy.addr(), data.clone()).await, data);
    assert_eq!(exchange(proxy.addr(), data.clone()).await, data);
    let kinds: Vec<_> = up.stats.conns().iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds[1],
        Some(rustls::HandshakeKind::Resumed),
        "app connections resume here: {kinds:?}"
    );
    assert_eq!(get(admin, "/upstreamz").await.status, 200);
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 3, "{conns:?}");
    assert_eq!(
        conns[2].kind,
        Some(rustls::HandshakeKind::Full),
        "{conns:?}"
    );
}
