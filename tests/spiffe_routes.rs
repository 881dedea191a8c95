//! SPIFFE routes (`--spiffe`) with identities from the scripted Workload API of
//! `support::workload_api`, no certificate file anywhere: both directions, trust by the peer's
//! own trust domain (unknown refused, federated accepted), `--spiffe-id` selection,
//! `--verify-uri-san`, and two sidecars authenticating each other by SPIFFE IDs alone.
//!
//! The helpers here are shared with `spiffe_lifecycle`.

use std::fmt::Display;

use crate::support::admin::{Metrics, admin_addr, scrape_until};
use crate::support::inbound::{EchoTarget, read_until_end};
use crate::support::refused::{accepted, refused};
use crate::support::upstream::Behavior;
use crate::support::workload_api::{SpiffeCa, Svid, WorkloadApi};
use crate::support::*;

pub const TD: &str = "example.org";
pub const CLIENT_ID: &str = "spiffe://example.org/ns/shop/sa/web";
pub const SERVER_ID: &str = "spiffe://example.org/ns/shop/sa/api";

/// `run` of one outbound SPIFFE route on 127.0.0.1:0 towards `upstream`, requiring the upstream
/// to be `uri_san`.
pub fn outbound_cmd(api: &WorkloadApi, upstream: impl Display, uri_san: &str) -> Cmd {
    Cmd::new()
        .args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string())
        .args([
            "--server-name",
            "api.shop.internal",
            "--spiffe",
            "--spiffe-socket",
        ])
        .arg(api.endpoint())
        .args(["--verify-uri-san", uri_san])
}

/// `run --inbound` of one SPIFFE route on 127.0.0.1:0 towards `target`, admitting `uri_san`.
pub fn inbound_cmd(api: &WorkloadApi, target: impl Display, uri_san: &str) -> Cmd {
    Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.to_string())
        .args(["--spiffe", "--spiffe-socket"])
        .arg(api.endpoint())
        .args(["--verify-uri-san", uri_san])
}

/// An in-process echo upstream presenting `svid`, admitting clients of `client_cas`.
pub async fn spiffe_upstream(svid: &Svid, client_cas: &[&SpiffeCa]) -> Upstream {
    Upstream::start(svid.server_config(client_cas), vec![Behavior::Echo]).await
}

/// One echo through an inbound route as `client`, trusting `server_cas`; the bytes back.
pub async fn inbound_echo(
    addr: std::net::SocketAddr,
    client: &Svid,
    server_cas: &[&SpiffeCa],
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncWriteExt;
    let config = std::sync::Arc::new(client.client_config(server_cas));
    let tcp = connect(addr).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake within the wait")?;
    tls.write_all(b"hello through spiffe\n").await?;
    tls.shutdown().await?;
    Ok(read_until_end(&mut tls, WAIT).await)
}

/// One echo of `data` through a tcp-mode listener; `None` on any refusal (close, reset) instead
/// of a panic.
pub async fn try_echo(addr: std::net::SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = connect(addr).await.into_split();
    let write = async move {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let read = async move {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.map(|_| got)
    };
    let both = async { tokio::join!(write, read) };
    match tokio::time::timeout(WAIT, both)
        .await
        .expect("echo within the wait")
    {
        (Ok(()), Ok(got)) => Some(got),
        (Err(_), Ok(got)) if got.is_empty() => None,
        (_, Err(_)) => None,
        (Err(_), Ok(got)) => Some(got),
    }
}

/// A sidecar whose listening line came (listeners bind before any SVID arrives).
pub fn start(cmd: &Cmd) -> Sidecar {
    cmd.spawn().listening()
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_with_svids_only() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let me = ca.svid("/ns/shop/sa/web");
    api.issue(&[&me], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let mut proxy = start(&outbound_cmd(&api, up.addr, SERVER_ID));
    let conn = accepted(&mut proxy, &up).await;
    assert_eq!(
        conn.client_der.as_deref(),
        Some(me.der.as_ref()),
        "the upstream saw the SVID from the Workload API"
    );
    assert_eq!(
        conn.sni.as_deref(),
        Some("api.shop.internal"),
        "SNI still goes out"
    );
    assert!(api.svid_requests() >= 1);
    assert_eq!(
        api.refused_requests(),
        0,
        "every request carried workload.spiffe.io: true"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_with_svids_only() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let target = EchoTarget::start().await;
    let mut proxy = start(&inbound_cmd(&api, target.addr, CLIENT_ID));
    let client = ca.svid("/ns/shop/sa/web");
    let got = inbound_echo(proxy.addr(), &client, &[&ca])
        .await
        .expect("accepted");
    assert_eq!(got, b"hello through spiffe\n");
    let line = proxy.wait_for_line("the access line", WAIT, |l| {
        is_conn_line(l) && field(l, "client_id").is_some()
    });
    assert_eq!(field(&line, "client_id"), Some(CLIENT_ID), "{line}");
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_refuses_other_ids_and_unknown_trust_domains() {
    let ca = SpiffeCa::new(TD);
    let stranger = SpiffeCa::new("stranger.test");
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let target = EchoTarget::start().await;
    let cmd = inbound_cmd(&api, target.addr, CLIENT_ID).args(["--admin", "127.0.0.1:0"]);
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    let failures = |reason: &'static str| {
        move |m: &Metrics| {
            let labels = [("route", "default"), ("reason", reason)];
            m.count("mtls_sidecar_connection_failures_total", &labels) >= 1.0
        }
    };
    // A client of a trust domain with no bundle, even with the admitted path.
    let foreign = stranger.svid("/ns/shop/sa/web");
    let got = inbound_echo(proxy.addr(), &foreign, &[&ca]).await;
    assert!(
        !matches!(&got, Ok(b) if !b.is_empty()),
        "foreign client got through: {got:?}"
    );
    let m = scrape_until(admin, failures("unknown_ca")).await;
    assert!(
        failures("unknown_ca")(&m),
        "no unknown_ca refusal:\n{}",
        m.text
    );
    // The first refusal's line (later ones may be rate-limited).
    let line = proxy.wait_for_line("the refusal", WAIT, |l| field(l, "reason").is_some());
    assert_eq!(field(&line, "reason"), Some("unknown_ca"), "{line}");
    assert!(
        line.contains("stranger.test"),
        "the refusal names the trust domain: {line}"
    );
    // Right trust domain, wrong workload.
    let other = ca.svid("/ns/shop/sa/batch");
    let got = inbound_echo(proxy.addr(), &other, &[&ca]).await;
    assert!(
        !matches!(&got, Ok(b) if !b.is_empty()),
        "other client got through: {got:?}"
    );
    let m = scrape_until(admin, failures("not_allowed")).await;
    assert!(
        failures("not_allowed")(&m),
        "no not_allowed refusal:\n{}",
        m.text
    );
    assert_eq!(
        target.accepted(),
        0,
        "a refused client never causes a dial to the target"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_refuses_unknown_trust_domain_then_accepts_it_federated() {
    let ca = SpiffeCa::new(TD);
    let partner = SpiffeCa::new("partner.test");
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let partner_id = "spiffe://partner.test/payments";
    let up = spiffe_upstream(&partner.svid("/payments"), &[&ca]).await;
    let mut proxy = start(&outbound_cmd(&api, up.addr, partner_id));
    let line = refused(&mut proxy, &up).await;
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");
    assert!(
        line.contains("partner.test"),
        "the refusal names the trust domain with no bundle: {line}"
    );
    // The API now hands out partner.test's bundle as a federated one: accepted, no restart.
    api.set_bundles(&[&ca, &partner]);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let before = up.stats.tls_accepted();
        let data = pattern(7, 100);
        if try_echo(proxy.addr(), &data).await == Some(data) {
            assert!(up.stats.tls_accepted() > before);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "federated bundle never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_wrong_verify_uri_san_is_refused() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/impostor"), &[&ca]).await;
    let mut proxy = start(&outbound_cmd(&api, up.addr, SERVER_ID));
    let line = refused(&mut proxy, &up).await;
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");
    assert_eq!(field(&line, "reason"), Some("uri_san_mismatch"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn spiffe_id_selects_one_of_several_svids() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let first = ca.svid("/ns/shop/sa/web");
    let second = ca.svid("/ns/shop/sa/web-admin");
    api.issue(&[&first, &second], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let mut default = start(&outbound_cmd(&api, up.addr, SERVER_ID));
    let conn = accepted(&mut default, &up).await;
    assert_eq!(
        conn.client_der.as_deref(),
        Some(first.der.as_ref()),
        "default: the first"
    );
    let cmd = outbound_cmd(&api, up.addr, SERVER_ID).args(["--spiffe-id", &second.id]);
    let mut chosen = start(&cmd);
    let conn = accepted(&mut chosen, &up).await;
    assert_eq!(
        conn.client_der.as_deref(),
        Some(second.der.as_ref()),
        "--spiffe-id"
    );
}

/// app -> outbound sidecar -> inbound sidecar -> app, each sidecar with its own Workload API,
/// neither given a file or a hostname to check: only SPIFFE IDs.
#[tokio::test(flavor = "multi_thread")]
async fn two_sidecars_authenticate_each_other_by_spiffe_ids() {
    let ca = SpiffeCa::new(TD);
    let web_api = WorkloadApi::start().await;
    web_api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let api_api = WorkloadApi::start().await;
    api_api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let target = EchoTarget::start().await;
    let mut inbound = start(&inbound_cmd(&api_api, target.addr, CLIENT_ID));
    let mut outbound = start(&outbound_cmd(&web_api, inbound.addr(), SERVER_ID));
    let data = pattern(3, 64 * 1024);
    assert!(
        exchange(outbound.addr(), data.clone()).await == data,
        "echo end to end"
    );
    let line = inbound.wait_for_line("the inbound access line", WAIT, |l| {
        is_conn_line(l) && field(l, "client_id").is_some()
    });
    assert_eq!(field(&line, "client_id"), Some(CLIENT_ID), "{line}");
    let line = outbound.wait_for_line("the outbound line", WAIT, is_conn_line);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    // An outbound sidecar expecting another server ID refuses the same inbound one.
    let cmd = outbound_cmd(
        &web_api,
        inbound.addr(),
        "spiffe://example.org/ns/shop/sa/db",
    );
    let mut wrong = start(&cmd);
    let got = try_echo(wrong.addr(), b"x").await;
    assert!(got.unwrap_or_default().is_empty());
    let line = wrong.wait_for_line("the refusal", WAIT, is_conn_line);
    assert_eq!(field(&line, "reason"), Some("uri_san_mismatch"), "{line}");
}

/// Without `--spiffe-socket` the socket comes from `SPIFFE_ENDPOINT_SOCKET`, as for every
/// SPIFFE workload.
#[tokio::test(flavor = "multi_thread")]
async fn socket_from_spiffe_endpoint_socket() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let me = ca.svid("/ns/shop/sa/web");
    api.issue(&[&me], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = Cmd::new()
        .args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(up.addr.to_string())
        .args(["--spiffe", "--verify-uri-san", SERVER_ID])
        .env("SPIFFE_ENDPOINT_SOCKET", api.endpoint());
    let mut proxy = start(&cmd);
    let conn = accepted(&mut proxy, &up).await;
    assert_eq!(conn.client_der.as_deref(), Some(me.der.as_ref()));
}

/// The SVID's private key, handed over by the Workload API, never reaches a log line at trace,
/// `/status` or `/metrics`, in any of the forms bytes get printed in (base64, hex, Debug).
#[tokio::test(flavor = "multi_thread")]
async fn svid_key_never_printed() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let me = ca.svid("/ns/shop/sa/web");
    api.issue(&[&me], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = outbound_cmd(&api, up.addr, SERVER_ID).args([
        "--log-level",
        "trace",
        "--admin",
        "127.0.0.1:0",
    ]);
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    accepted(&mut proxy, &up).await;
    api.set_svids(&[&ca.svid("/ns/shop/sa/web")]);
    proxy.wait_for_lines("a reload", 2, WAIT, |l| l.contains("identity reloaded"));
    let key = me.pkcs8();
    // The private scalar of the PKCS#8 EC key: the 32 bytes after ECPrivateKey's
    // `version 1, OCTET STRING (32)` (02 01 01 04 20).
    let at = key
        .windows(5)
        .position(|w| w == [2, 1, 1, 4, 32])
        .expect("an EC private key")
        + 5;
    let tail = &key[at..at + 32];
    let debug = format!("{tail:?}");
    let debug = &debug[1..debug.len() - 1];
    let forms = [
        base64(key),
        base64(tail)[..24].to_owned(),
        hex(tail),
        debug.to_owned(),
    ];
    let status = crate::support::admin::get(admin, "/status").await.body;
    let metrics = crate::support::admin::get(admin, "/metrics").await.body;
    for (what, text) in [
        ("stderr", proxy.stderr()),
        ("/status", status),
        ("/metrics", metrics),
    ] {
        for form in &forms {
            assert!(
                !text.contains(form.as_str()),
                "{what} holds the SVID key ({form})"
            );
        }
    }
}
