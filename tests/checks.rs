//! Extra checks on the upstream, always on top of chain and name verification: `--crl`,
//! `--verify-uri-san`, `--pin-sha256`. Each refusal is a classified `reason=` and lets no app
//! byte reach the upstream's application; each acceptance carries bytes end to end.

use crate::support::files::{atomic_copy, is_reloaded};
use crate::support::pki::{Identity, LeafSpec};
use crate::support::refused::{accepted, assert_failed, refused};
use crate::support::*;

const SPIFFE_API: &str = "spiffe://example.org/ns/default/sa/api";
const SPIFFE_WEB: &str = "spiffe://example.org/ns/default/sa/web";

/// A proxy towards an echo upstream presenting `server`, with the extra flags.
async fn proxy_to(pki: &Pki, server: &Identity, extra: &[&str]) -> (Sidecar, Upstream) {
    let up = Upstream::echo(server, &pki.ca.der).await;
    let proxy = run_cmd(pki, up.addr).args(extra).start();
    (proxy, up)
}

async fn expect_refused(pki: &Pki, server: &Identity, extra: &[&str], reason: &str) -> String {
    let (mut proxy, up) = proxy_to(pki, server, extra).await;
    let line = refused(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", reason);
    line
}

async fn expect_accepted(pki: &Pki, server: &Identity, extra: &[&str]) {
    let (mut proxy, up) = proxy_to(pki, server, extra).await;
    accepted(&mut proxy, &up).await;
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

// --- CRL ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn crl_revoking_the_upstream_cert_refuses_it() {
    let pki = Pki::new();
    let crl = pki
        .ca
        .crl(&pki.path("revokes-server.crl.pem"), &[&pki.server.der]);
    let line = expect_refused(&pki, &pki.server, &["--crl", path(&crl)], "revoked").await;
    // The connection line's error= may be unquoted: read it to the end of the line.
    let error = &line[line.find("error=").expect("error=")..];
    assert!(
        error.to_lowercase().contains("revoked"),
        "error= does not say revoked: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crl_revoking_another_serial_lets_the_upstream_through() {
    let pki = Pki::new();
    let crl = pki
        .ca
        .crl(&pki.path("revokes-client.crl.pem"), &[&pki.client.der]);
    let empty = pki.ca.crl(&pki.path("empty.crl.pem"), &[]);
    expect_accepted(
        &pki,
        &pki.server,
        &["--crl", path(&crl), "--crl", path(&empty)],
    )
    .await;
}

/// `--crl` is repeatable: a revocation in the second file counts as much as in the first.
/// Both files come from the same CA and the second is the newer one (higher CRL number), so
/// whether the proxy merges CRLs or prefers the newest, the upstream is revoked; only a proxy
/// that consults the first CRL it finds for an issuer lets it through.
#[tokio::test(flavor = "multi_thread")]
async fn crl_every_file_applies() {
    let pki = Pki::new();
    let other = pki
        .ca
        .crl(&pki.path("revokes-client.crl.pem"), &[&pki.client.der]);
    let revoking = pki
        .ca
        .crl(&pki.path("revokes-server.crl.pem"), &[&pki.server.der]);
    expect_refused(
        &pki,
        &pki.server,
        &["--crl", path(&other), "--crl", path(&revoking)],
        "revoked",
    )
    .await;
}

/// A CRL is reloaded like the rest: once it lists the upstream, new connections are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn crl_rotation_revokes_from_the_next_connection() {
    let pki = Pki::new();
    let live = pki.path("live.crl.pem");
    let before = pki.ca.crl(&pki.path("before.crl.pem"), &[&pki.client.der]);
    let after = pki.ca.crl(&pki.path("after.crl.pem"), &[&pki.server.der]);
    atomic_copy(&before, &live);
    let (mut proxy, up) = proxy_to(
        &pki,
        &pki.server,
        &["--crl", path(&live), "--reload-interval", "200ms"],
    )
    .await;
    accepted(&mut proxy, &up).await;

    atomic_copy(&after, &live);
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("an `identity reloaded` line", WAIT, is_reloaded)
    });
    let line = refused(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "revoked");
}

// --- URI SAN -----------------------------------------------------------------------------

fn server_with(pki: &Pki, name: &str, names: &[&str], uris: &[&str]) -> Identity {
    let spec = LeafSpec {
        names,
        uris,
        ..LeafSpec::server()
    };
    pki.leaf(&pki.ca, name, spec)
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_san_present_passes() {
    let pki = Pki::new();
    let server = server_with(
        &pki,
        "spiffe-api",
        &["localhost", "127.0.0.1"],
        &[SPIFFE_API],
    );
    expect_accepted(&pki, &server, &["--verify-uri-san", SPIFFE_API]).await;
}

/// Repeatable: one of them is enough.
#[tokio::test(flavor = "multi_thread")]
async fn uri_san_any_of_several_passes() {
    let pki = Pki::new();
    let server = server_with(
        &pki,
        "spiffe-api",
        &["localhost", "127.0.0.1"],
        &[SPIFFE_API],
    );
    let extra = [
        "--verify-uri-san",
        SPIFFE_WEB,
        "--verify-uri-san",
        SPIFFE_API,
    ];
    expect_accepted(&pki, &server, &extra).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_san_missing_is_refused() {
    let pki = Pki::new();
    expect_refused(
        &pki,
        &pki.server,
        &["--verify-uri-san", SPIFFE_API],
        "uri_san_mismatch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_san_other_identity_is_refused() {
    let pki = Pki::new();
    let server = server_with(
        &pki,
        "spiffe-web",
        &["localhost", "127.0.0.1"],
        &[SPIFFE_WEB],
    );
    expect_refused(
        &pki,
        &server,
        &["--verify-uri-san", SPIFFE_API],
        "uri_san_mismatch",
    )
    .await;
}

/// The URI SAN check comes on top of the name check, never instead of it.
#[tokio::test(flavor = "multi_thread")]
async fn uri_san_right_but_dns_name_wrong_is_refused() {
    let pki = Pki::new();
    let server = server_with(&pki, "spiffe-other-dns", &["other.example"], &[SPIFFE_API]);
    expect_refused(
        &pki,
        &server,
        &["--server-name", "localhost", "--verify-uri-san", SPIFFE_API],
        "name_mismatch",
    )
    .await;
}

// --- SPKI pins ---------------------------------------------------------------------------

/// A well-formed pin of nothing we use.
fn unrelated_pin() -> String {
    base64(&sha256(b"no such public key"))
}

#[tokio::test(flavor = "multi_thread")]
async fn pin_mismatch_is_refused() {
    let pki = Pki::new();
    let pin = unrelated_pin();
    expect_refused(&pki, &pki.server, &["--pin-sha256", &pin], "pin_mismatch").await;
}

/// The pin is the leaf's, not the CA's.
#[tokio::test(flavor = "multi_thread")]
async fn pin_of_the_ca_is_not_the_leaf() {
    let pki = Pki::new();
    let pin = pki.ca.spki_pin();
    expect_refused(&pki, &pki.server, &["--pin-sha256", &pin], "pin_mismatch").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn right_pin_among_others_passes() {
    let pki = Pki::new();
    let (wrong, right) = (unrelated_pin(), pki.server.spki_pin());
    expect_accepted(
        &pki,
        &pki.server,
        &["--pin-sha256", &wrong, "--pin-sha256", &right],
    )
    .await;
}

/// A pinned key does not excuse an untrusted chain or a wrong name.
#[tokio::test(flavor = "multi_thread")]
async fn right_pin_does_not_replace_chain_or_name_checks() {
    let pki = Pki::new();
    let unknown = pki.server_unknown_ca();
    let pin = unknown.spki_pin();
    expect_refused(&pki, &unknown, &["--pin-sha256", &pin], "unknown_issuer").await;

    let wrong_name = pki.server_wrong_name();
    let pin = wrong_name.spki_pin();
    let extra = ["--server-name", "localhost", "--pin-sha256", &pin];
    expect_refused(&pki, &wrong_name, &extra, "name_mismatch").await;
}

/// `MTLS_SIDECAR_PIN_SHA256` is comma-separated.
#[tokio::test(flavor = "multi_thread")]
async fn pins_from_the_environment_are_comma_separated() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let right = pki.server.spki_pin();
    let wrong = unrelated_pin();
    let other_wrong = pki.ca.spki_pin();

    let mut proxy = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_PIN_SHA256", format!("{wrong},{right}"))
        .start();
    accepted(&mut proxy, &up).await;

    let mut proxy = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_PIN_SHA256", format!("{wrong},{other_wrong}"))
        .start();
    let line = refused(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "pin_mismatch");
}

/// All three checks at once, all satisfied.
#[tokio::test(flavor = "multi_thread")]
async fn crl_uri_san_and_pin_together_pass() {
    let pki = Pki::new();
    let server = server_with(
        &pki,
        "all-checks",
        &["localhost", "127.0.0.1"],
        &[SPIFFE_API],
    );
    let crl = pki
        .ca
        .crl(&pki.path("revokes-client.crl.pem"), &[&pki.client.der]);
    let pin = server.spki_pin();
    let extra = [
        "--crl",
        path(&crl),
        "--verify-uri-san",
        SPIFFE_API,
        "--pin-sha256",
        &pin,
    ];
    expect_accepted(&pki, &server, &extra).await;
}
