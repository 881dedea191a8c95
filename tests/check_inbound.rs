//! `check` on an inbound route: the report says which way the route carries traffic (text and
//! JSON), the rule in words, the client CAs and CRLs, and whether the server certificate's names
//! cover the listen host (a name: FAIL; an IP: a warning; `0.0.0.0`: not checked).

use std::time::Duration;

use crate::support::pki::Identity;
use crate::support::*;

/// `check --inbound` with `server` as the server identity, the test CA for clients and the
/// given extra flags; returns the exit code and stdout.
fn check(
    pki: &Pki,
    server: &Identity,
    listen: &str,
    target: &str,
    extra: &[&str],
) -> (i32, String) {
    check_files(pki, &server.cert, &server.key, listen, target, extra)
}

/// [`check`] with the certificate and key files given by path.
fn check_files(
    pki: &Pki,
    cert: &std::path::Path,
    key: &std::path::Path,
    listen: &str,
    target: &str,
    extra: &[&str],
) -> (i32, String) {
    let mut child = Cmd::new()
        .args(["check", "--inbound", "--listen", listen, "--target", target])
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(extra)
        .spawn();
    let status = child.wait_exit(Duration::from_secs(15));
    child.wait_output_closed();
    (status.code().unwrap_or(-1), child.stdout())
}

/// A target that accepts (the check dials it once); kept open for the test's length.
fn target() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = l.local_addr().expect("addr").to_string();
    (l, addr)
}

#[test]
fn a_listen_name_the_certificate_lacks_fails_the_route() {
    let pki = Pki::new();
    let (_t, to) = target();
    let wrong = pki.server_wrong_name();
    let (code, out) = check(&pki, &wrong, "localhost:0", &to, &["--allow-any-client"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("route default: FAIL: the server certificate's names do not cover the listen host localhost")
            && out.contains("DNS:other.example"),
        "{out}"
    );
    // The same listen name with a certificate that carries it passes.
    let (code, out) = check(
        &pki,
        &pki.server,
        "localhost:0",
        &to,
        &["--allow-any-client"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("listen names     DNS:localhost covers localhost"),
        "{out}"
    );
    assert!(out.contains("route default: PASS"), "{out}");
}

#[test]
fn an_ip_listen_is_a_warning_and_the_unspecified_address_is_not_checked() {
    let pki = Pki::new();
    let (_t, to) = target();
    let wrong = pki.server_wrong_name();
    let (code, out) = check(&pki, &wrong, "127.0.0.1:0", &to, &["--allow-any-client"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("note: the server certificate has no IP SAN 127.0.0.1"),
        "{out}"
    );
    let (code, out) = check(&pki, &wrong, "0.0.0.0:0", &to, &["--allow-any-client"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("listen names     not checked: 0.0.0.0 accepts on every address"),
        "{out}"
    );
    assert!(!out.contains("no IP SAN"), "{out}");
}

#[test]
fn the_text_report_names_direction_target_rule_cas_and_crls() {
    let pki = Pki::new();
    let (_t, to) = target();
    let crl = pki.ca.crl(&pki.path("clients.crl"), &[]);
    let crl = crl.to_str().expect("utf-8 path");
    let rule = ["--verify-uri-san", "spiffe://example.org/ns/shop/sa/*"];
    let (code, out) = check(
        &pki,
        &pki.server,
        "127.0.0.1:0",
        &to,
        &[rule[0], rule[1], "--crl", crl],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        format!("route default: inbound, listen 127.0.0.1:0, target {to}"),
        "  direction        inbound".to_string(),
        format!("  target           {to}"),
        "  listen           127.0.0.1:0".to_string(),
        "  server certificate (--cert ".to_string(),
        "  authorization    lets in a client leaf with URI SAN spiffe://example.org/ns/shop/sa/*"
            .to_string(),
        "  client CAs       --ca ".to_string(),
        ": 1 certificate, earliest expiry ".to_string(),
        "  CRLs             --crl ".to_string(),
        ": 1 list(s), next update ".to_string(),
        format!("  connected        {to}"),
    ] {
        assert!(out.contains(&want), "missing {want:?} in:\n{out}");
    }
    // Nothing outbound-shaped is claimed for an inbound route.
    assert!(!out.contains("upstream trust"), "{out}");
    assert!(!out.contains("server name"), "{out}");
    assert!(!out.contains("client certificate ("), "{out}");
}

#[test]
fn json_has_direction_and_target_and_no_upstream_on_inbound() {
    let pki = Pki::new();
    let (_t, to) = target();
    let (code, out) = check(
        &pki,
        &pki.server,
        "127.0.0.1:0",
        &to,
        &["--verify-dns-san", "a.example", "--format", "json"],
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let r = &v["routes"][0];
    assert_eq!(r["direction"], "inbound", "{out}");
    assert_eq!(r["target"], to.as_str(), "{out}");
    assert_eq!(r["listen"], "127.0.0.1:0", "{out}");
    assert!(
        r["upstream"].is_null() && r["server_name"].is_null(),
        "{out}"
    );
    assert!(
        r["client_certificate"].is_null() && r["trust"].is_null(),
        "{out}"
    );
    assert_eq!(r["server_certificate"]["subject"], "CN=localhost", "{out}");
    assert_eq!(
        r["inbound"]["authorization"], "lets in a client leaf with DNS SAN a.example",
        "{out}"
    );
    assert_eq!(r["inbound"]["client_cas"]["count"], 1, "{out}");
    assert!(
        r["inbound"]["client_cas"]["earliest_not_after"].is_string(),
        "{out}"
    );
    assert_eq!(r["inbound"]["crls"], serde_json::json!([]), "{out}");
    assert_eq!(r["ok"], true, "{out}");

    // An outbound route keeps its keys and gains `direction` and a null `target`.
    let mut child = Cmd::new()
        .args(["check", "--upstream", "127.0.0.1:9", "--format", "json"])
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .spawn();
    child.wait_exit(Duration::from_secs(15));
    child.wait_output_closed();
    let out = child.stdout();
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let r = &v["routes"][0];
    assert_eq!(r["direction"], "outbound", "{out}");
    assert_eq!(r["upstream"], "127.0.0.1:9", "{out}");
    assert!(
        r["server_name"].is_string() && r["target"].is_null(),
        "{out}"
    );
    assert!(r["client_certificate"]["subject"].is_string(), "{out}");
    assert!(
        r["inbound"].is_null() && r["server_certificate"].is_null(),
        "{out}"
    );
}

#[test]
fn a_config_file_inbound_route_is_checked_against_its_listen_name_too() {
    let pki = Pki::new();
    let (_t, to) = target();
    let wrong = pki.server_wrong_name();
    let file = pki.write(
        "in.toml",
        format!(
            "[[route]]\nname = \"api\"\ninbound = true\nlisten = \"localhost:0\"\ntarget = {to:?}\n\
             cert = {:?}\nkey = {:?}\nca = {:?}\nverify_cn = [\"client\"]\n",
            wrong.cert, wrong.key, pki.ca.pem
        ),
    );
    let mut child = Cmd::new().arg("check").arg("--config").arg(&file).spawn();
    let status = child.wait_exit(Duration::from_secs(15));
    child.wait_output_closed();
    let out = child.stdout();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "route api: FAIL: the server certificate's names do not cover the listen host localhost"
        ),
        "{out}"
    );
    assert!(
        out.contains("  authorization    lets in a client leaf with CN client"),
        "{out}"
    );
}

#[test]
fn a_wrong_ca_certificate_in_the_server_chain_file_fails() {
    let pki = Pki::new();
    let (_t, to) = target();
    let leaf = std::fs::read_to_string(&pki.server.cert).expect("read leaf");
    // The right issuer appended: the chain verifies.
    let good = pki.write(
        "good-chain.pem",
        leaf.clone() + &std::fs::read_to_string(&pki.ca.pem).expect("read CA"),
    );
    // A CA with the same name but another key: names link up, the signature does not.
    let impostor = pki.new_ca("impostor", "mtls-sidecar test CA");
    let bad = pki.write(
        "bad-chain.pem",
        leaf + &std::fs::read_to_string(&impostor.pem).expect("read impostor"),
    );
    for (chain, ok) in [(good, true), (bad, false)] {
        let (code, out) = check_files(
            &pki,
            &chain,
            &pki.server.key,
            "127.0.0.1:0",
            &to,
            &["--allow-any-client"],
        );
        if ok {
            assert_eq!(code, 0, "{out}");
            assert!(out.contains("complete: it ends at the root"), "{out}");
        } else {
            assert_eq!(code, 1, "{out}");
            assert!(
                out.contains("FAIL: the server certificate does not verify against its issuer CN=mtls-sidecar test CA in the same file"),
                "{out}"
            );
        }
    }
}
