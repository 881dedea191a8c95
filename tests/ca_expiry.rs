//! Trust-bundle expiry: `ca_cert_expiry_timestamp_seconds` is the earliest not-after in `--ca`
//! (and follows a reload of the CA file), absent for the system trust store, from the SPIFFE
//! bundles on a `--spiffe` route; `/status` shows the intermediates of our chain and the CA
//! bundle's summary; a CA or an intermediate inside the warning window logs a warning naming
//! the file, the subject and the date, while `/readyz` stays 200.

use std::path::{Path, PathBuf};

use serde_json::Value;
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::spiffe_routes::{SERVER_ID, TD, outbound_cmd, spiffe_upstream};
use crate::support::admin::*;
use crate::support::files::atomic_write;
use crate::support::pki::{Ca, Identity, LeafSpec};
use crate::support::workload_api::{SpiffeCa, WorkloadApi};
use crate::support::*;

const CA_EXPIRY: &str = "mtls_sidecar_ca_cert_expiry_timestamp_seconds";

fn not_after(der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse");
    cert.validity().not_after.timestamp()
}

fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn in_days(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + TimeDuration::days(days)
}

/// A PEM file holding each of `pems` in order.
fn bundle(dir: &Path, name: &str, pems: &[&Path]) -> PathBuf {
    let text: String = pems
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read PEM"))
        .collect();
    let path = dir.join(name);
    atomic_write(&path, text);
    path
}

fn start(cmd: &Cmd) -> (Sidecar, std::net::SocketAddr) {
    let mut proxy = cmd.start();
    let admin = admin_addr(&mut proxy);
    (proxy, admin)
}

async fn status(admin: std::net::SocketAddr) -> Value {
    let resp = get(admin, "/status").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    serde_json::from_str(&resp.body).expect("JSON")
}

async fn ca_expiry_is(admin: std::net::SocketAddr, want: i64) -> Metrics {
    scrape_until(admin, |m| {
        m.get(CA_EXPIRY, &[("route", "default")]) == Some(want as f64)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn gauge_is_the_earliest_ca_and_follows_a_reload_of_the_ca_file() {
    let pki = Pki::new();
    let soon = pki.new_ca_until("ca-soon", "CA expiring in 200 days", in_days(200));
    let later = pki.new_ca_until("ca-later", "CA expiring in 300 days", in_days(300));
    let ca_file = bundle(
        pki.dir.path(),
        "bundle.pem",
        &[&later.pem, &soon.pem, &pki.ca.pem],
    );
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let cmd = run_cmd_files(up.addr, &pki.client.cert, &pki.client.key, &ca_file).args([
        "--admin",
        "127.0.0.1:0",
        "--reload-interval",
        "200ms",
    ]);
    let (_proxy, admin) = start(&cmd);

    let first = not_after(&soon.der);
    let m = ca_expiry_is(admin, first).await;
    assert_eq!(m.type_of(CA_EXPIRY), Some("gauge"));
    let st = status(admin).await;
    let b = &st["identities"][0]["ca_bundle"];
    assert_eq!(b["count"], 3, "{st}");
    assert_eq!(b["earliest_subject"], "CN=CA expiring in 200 days", "{st}");
    assert_eq!(b["earliest_not_after"], rfc3339(first), "{st}");
    assert_eq!(b["source"], format!("--ca {}", ca_file.display()), "{st}");

    // A new CA file whose earliest CA is another one: the gauge follows the reload.
    let newer = pki.new_ca_until("ca-newer", "CA expiring in 250 days", in_days(250));
    bundle(
        pki.dir.path(),
        "bundle.pem",
        &[&later.pem, &newer.pem, &pki.ca.pem],
    );
    ca_expiry_is(admin, not_after(&newer.der)).await;
    let st = status(admin).await;
    let b = &st["identities"][0]["ca_bundle"];
    assert_eq!(b["earliest_subject"], "CN=CA expiring in 250 days", "{st}");
    // Our own chain has no intermediate.
    assert_eq!(st["identities"][0]["intermediates"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_system_trust_store_has_no_series() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    // No --ca: the system store, which SSL_CERT_FILE points at the test CA.
    let cmd = Cmd::new()
        .args(["run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--upstream")
        .arg(format!("localhost:{}", up.port()))
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .env("SSL_CERT_FILE", &pki.ca.pem);
    let (_proxy, admin) = start(&cmd);
    let m = scrape_until(admin, |m| {
        m.get(
            "mtls_sidecar_client_cert_expiry_timestamp_seconds",
            &[("route", "default")],
        )
        .is_some()
    })
    .await;
    assert_eq!(
        m.get(CA_EXPIRY, &[("route", "default")]),
        None,
        "{}",
        m.text
    );
    let st = status(admin).await;
    assert!(st["identities"][0]["ca_bundle"].is_null(), "{st}");
}

/// A client leaf signed by an intermediate of the test CA, and the chain file (leaf, then the
/// intermediate).
fn chained_client(pki: &Pki, inter_until: OffsetDateTime) -> (Identity, Ca, PathBuf) {
    let inter = pki.intermediate(&pki.ca, "inter", "test intermediate", inter_until);
    let leaf = pki.leaf(&inter, "chained-client", LeafSpec::client("chained"));
    let chain = bundle(pki.dir.path(), "chain.pem", &[&leaf.cert, &inter.pem]);
    (leaf, inter, chain)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_the_intermediates_of_our_chain() {
    let pki = Pki::new();
    let (leaf, inter, chain) = chained_client(&pki, in_days(400));
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let cmd =
        run_cmd_files(up.addr, &chain, &leaf.key, &pki.ca.pem).args(["--admin", "127.0.0.1:0"]);
    let (_proxy, admin) = start(&cmd);
    let st = status(admin).await;
    let id = &st["identities"][0];
    // The leaf's keys are unchanged.
    assert_eq!(id["subject"], "CN=chained", "{st}");
    assert_eq!(id["issuer"], "CN=test intermediate", "{st}");
    let ints = id["intermediates"].as_array().expect("intermediates");
    assert_eq!(ints.len(), 1, "{st}");
    let i = &ints[0];
    assert_eq!(i["subject"], "CN=test intermediate", "{st}");
    assert_eq!(i["issuer"], "CN=mtls-sidecar test CA", "{st}");
    assert_eq!(
        i["serial"],
        crate::support::pki::serial_of(&inter.der),
        "{st}"
    );
    assert_eq!(i["not_after"], rfc3339(not_after(&inter.der)), "{st}");
    assert_eq!(i["sha256_fingerprint"], hex(&sha256(&inter.der)), "{st}");
    let body = get(admin, "/status").await.body;
    assert!(!body.contains("PRIVATE KEY"), "{body}");
}

fn is_warn(line: &str, what: &str) -> bool {
    line.contains("WARN") && line.contains(what)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_and_an_intermediate_inside_the_window_warn_and_readyz_stays_200() {
    let pki = Pki::new();
    let (leaf, inter, chain) = chained_client(&pki, in_days(2));
    let expiring = pki.new_ca_until("ca-expiring", "CA expiring in 3 days", in_days(3));
    let ca_file = bundle(pki.dir.path(), "bundle.pem", &[&pki.ca.pem, &expiring.pem]);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let cmd = run_cmd_files(up.addr, &chain, &leaf.key, &ca_file).args(["--admin", "127.0.0.1:0"]);
    let (mut proxy, admin) = start(&cmd);

    let line = proxy.wait_for_line("a CA expiry warning", WAIT, |l| {
        is_warn(l, "ca certificate expires soon")
    });
    assert_eq!(
        field(&line, "file"),
        Some(ca_file.to_str().unwrap()),
        "{line}"
    );
    assert!(line.contains("CA expiring in 3 days"), "{line}");
    let date = rfc3339(not_after(&expiring.der));
    assert_eq!(field(&line, "not_after"), Some(date.as_str()), "{line}");

    let line = proxy.wait_for_line("an intermediate expiry warning", WAIT, |l| {
        is_warn(l, "intermediate certificate of our chain expires soon")
    });
    assert_eq!(
        field(&line, "file"),
        Some(chain.to_str().unwrap()),
        "{line}"
    );
    assert!(line.contains("test intermediate"), "{line}");
    let date = rfc3339(not_after(&inter.der));
    assert_eq!(field(&line, "not_after"), Some(date.as_str()), "{line}");

    // Local readiness ignores CA expiry.
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    // The long-lived test CA in the same bundle is not warned about.
    assert_eq!(
        proxy.count_lines(|l| l.contains("mtls-sidecar test CA") && l.contains("expires")),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn far_expiries_do_not_warn() {
    let pki = Pki::new();
    let (leaf, _inter, chain) = chained_client(&pki, in_days(30));
    let ca30 = pki.new_ca_until("ca-30", "CA expiring in 30 days", in_days(30));
    let ca_file = bundle(pki.dir.path(), "bundle.pem", &[&pki.ca.pem, &ca30.pem]);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let cmd = run_cmd_files(up.addr, &chain, &leaf.key, &ca_file).args(["--admin", "127.0.0.1:0"]);
    let (proxy, admin) = start(&cmd);
    // The gauge is set by the same pass that would warn: once it shows, the pass has run.
    ca_expiry_is(admin, not_after(&ca30.der)).await;
    assert_eq!(
        proxy.count_lines(|l| l.contains("expires soon")),
        0,
        "{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spiffe_route_reports_its_bundles() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = outbound_cmd(&api, up.addr, SERVER_ID).args(["--admin", "127.0.0.1:0"]);
    let mut proxy = crate::spiffe_routes::start(&cmd);
    let admin = admin_addr(&mut proxy);
    // No series while waiting for the first SVID.
    let m = scrape(admin).await;
    assert_eq!(
        m.get(CA_EXPIRY, &[("route", "default")]),
        None,
        "{}",
        m.text
    );
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    ca_expiry_is(admin, not_after(&ca.der)).await;
    let st = status(admin).await;
    let b = &st["identities"][0]["ca_bundle"];
    assert_eq!(b["count"], 1, "{st}");
    assert!(
        b["source"].as_str().unwrap_or_default().contains(TD),
        "{st}"
    );
}
