//! `check` on `--spiffe` routes against the scripted Workload API of `support::workload_api`:
//! the SVID (SPIFFE ID, subject, expiry) and every trust domain's bundle in text and JSON; the
//! upstream verified against its own trust domain's bundle (federated ones included) and
//! `--verify-uri-san`; "no bundle for trust domain X" and "waiting for the Workload API"
//! (socket missing, no answer in time, PermissionDenied) in plain words, within
//! `--connect-timeout` + 5 s; `--spiffe-id` selection; an inbound route's rule and target.

use std::time::{Duration, Instant};

use crate::spiffe_routes::{CLIENT_ID, SERVER_ID, TD, spiffe_upstream};
use crate::support::workload_api::{SpiffeCa, WorkloadApi};
use crate::support::*;

/// `check` with `args` (after `check`), run off the runtime so the in-process Workload API and
/// upstream keep serving; the exit code, stdout and how long it took.
async fn check(args: Vec<String>) -> (i32, String, Duration) {
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut child = Cmd::new().arg("check").args(args).spawn();
        let status = child.wait_exit(Duration::from_secs(20));
        child.wait_output_closed();
        (status.code().unwrap_or(-1), child.stdout(), start.elapsed())
    })
    .await
    .expect("check task")
}

/// The flags of one outbound SPIFFE route to `upstream`, requiring `uri_san`.
fn outbound(socket: &str, upstream: impl ToString, uri_san: &str) -> Vec<String> {
    [
        "--upstream",
        &upstream.to_string(),
        "--spiffe",
        "--spiffe-socket",
        socket,
        "--verify-uri-san",
        uri_san,
        "--connect-timeout",
        "2s",
    ]
    .map(String::from)
    .to_vec()
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_shows_the_svid_and_each_trust_domain_and_passes() {
    let ca = SpiffeCa::new(TD);
    let partner = SpiffeCa::new("partner.test");
    let api = WorkloadApi::start().await;
    let me = ca.svid("/ns/shop/sa/web");
    api.issue(&[&me], &[&ca, &partner]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let (code, out, _) = check(outbound(&api.endpoint(), up.addr, SERVER_ID)).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("  SVID             {CLIENT_ID}")),
        "{out}"
    );
    assert!(out.contains("expires in"), "{out}");
    assert!(
        out.contains("  trust bundle     example.org: 1 authority, earliest expiry"),
        "{out}"
    );
    assert!(
        out.contains("  trust bundle     partner.test: 1 authority"),
        "{out}"
    );
    assert!(out.contains("route default: PASS"), "{out}");
    // The upstream saw our SVID, as `run` would present it.
    let deadline = Instant::now() + WAIT;
    while up.stats.conns().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        up.stats
            .conns()
            .first()
            .and_then(|c| c.client_der.clone())
            .as_deref(),
        Some(me.der.as_ref()),
        "the upstream saw the SVID"
    );

    let (code, json, _) = check(with(
        outbound(&api.endpoint(), up.addr, SERVER_ID),
        &["--format", "json"],
    ))
    .await;
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let s = &v["routes"][0]["spiffe"];
    assert_eq!(
        s["socket"],
        api.path().display().to_string().as_str(),
        "{json}"
    );
    assert_eq!(s["svid"]["spiffe_id"], CLIENT_ID, "{json}");
    assert!(s["svid"]["not_after"].is_string(), "{json}");
    assert!(s["svid"]["subject"].is_string(), "{json}");
    let domains: Vec<&str> = s["bundles"]
        .as_array()
        .expect("bundles")
        .iter()
        .map(|b| b["trust_domain"].as_str().expect("domain"))
        .collect();
    assert_eq!(domains, ["example.org", "partner.test"], "{json}");
    assert!(s["bundles"][0]["earliest_not_after"].is_string(), "{json}");
    assert_eq!(v["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_of_a_domain_without_a_bundle_is_explained_and_federation_fixes_it() {
    let ca = SpiffeCa::new(TD);
    let partner = SpiffeCa::new("partner.test");
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let their_id = "spiffe://partner.test/ns/pay/sa/api";
    let up = spiffe_upstream(&partner.svid("/ns/pay/sa/api"), &[&ca]).await;
    let (code, out, _) = check(outbound(&api.endpoint(), up.addr, their_id)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "FAIL: no bundle for trust domain partner.test: the upstream presented \
                      spiffe://partner.test/ns/pay/sa/api"
        ),
        "{out}"
    );
    assert!(out.contains("holds bundles only for example.org"), "{out}");

    // Federated: the API now hands out partner.test's bundle too.
    api.set_bundles(&[&ca, &partner]);
    let (code, out, _) = check(outbound(&api.endpoint(), up.addr, their_id)).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_verify_uri_san_and_an_unoffered_spiffe_id_are_explained() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(
        &[&ca.svid("/ns/shop/sa/web"), &ca.svid("/ns/shop/sa/web2")],
        &[&ca],
    );
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let want = "spiffe://example.org/ns/shop/sa/other";
    let (code, out, _) = check(outbound(&api.endpoint(), up.addr, want)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL: the upstream's SPIFFE ID {SERVER_ID} is not one of --verify-uri-san ({want})"
        )),
        "{out}"
    );

    // --spiffe-id picks the second SVID...
    let second = "spiffe://example.org/ns/shop/sa/web2";
    let (code, out, _) = check(with(
        outbound(&api.endpoint(), up.addr, SERVER_ID),
        &["--spiffe-id", second],
    ))
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("  SVID             {second}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("  SVIDs offered    {CLIENT_ID}, {second}")),
        "{out}"
    );
    // ...and one it does not offer is named, with the ones it does.
    let (code, out, _) = check(with(
        outbound(&api.endpoint(), up.addr, SERVER_ID),
        &["--spiffe-id", "spiffe://example.org/ns/shop/sa/nobody"],
    ))
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "offers this workload {CLIENT_ID}, {second} but not --spiffe-id \
             spiffe://example.org/ns/shop/sa/nobody"
        )),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_the_workload_api_is_explained_within_the_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("agent.sock");
    let missing = missing.to_str().expect("utf-8");
    let (code, out, _) = check(outbound(missing, "127.0.0.1:9", SERVER_ID)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAIL: waiting for the Workload API: the socket {missing} does not exist"
        )),
        "{out}"
    );

    // An API that never answers: the check ends after --connect-timeout (2s), not later.
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.delay_first_answer(Duration::from_secs(60));
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let (code, out, took) = check(outbound(&api.endpoint(), "127.0.0.1:9", SERVER_ID)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("waiting for the Workload API: no answer from")
            && out.contains("within --connect-timeout 2s"),
        "{out}"
    );
    assert!(took < Duration::from_secs(2 + 5), "took {took:?}");

    // Identity withdrawn: PermissionDenied, in words.
    api.delay_first_answer(Duration::ZERO);
    api.deny();
    let (code, out, _) = check(outbound(&api.endpoint(), "127.0.0.1:9", SERVER_ID)).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "waiting for the Workload API: it issues no identity to this workload \
                      (PermissionDenied"
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbound_spiffe_route_reports_its_rule_and_dials_the_target() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let to = target.local_addr().expect("addr").to_string();
    let args = [
        "--inbound",
        "--listen",
        "127.0.0.1:0",
        "--target",
        &to,
        "--spiffe",
        "--spiffe-socket",
        &api.endpoint(),
        "--verify-uri-san",
        "spiffe://example.org/ns/shop/sa/*",
    ]
    .map(String::from)
    .to_vec();
    let (code, out, _) = check(args.clone()).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("  SVID             {SERVER_ID}")),
        "{out}"
    );
    assert!(
        out.contains("route default: inbound, listen 127.0.0.1:0"),
        "{out}"
    );
    assert!(out.contains("spiffe://example.org/ns/shop/sa/*"), "{out}");
    assert!(out.contains("PASS"), "{out}");
    drop(target);
    let (code, out, _) = check(args).await;
    assert_eq!(code, 1, "the target is gone: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_api_and_a_silent_upstream_share_one_connect_timeout() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    // The API answers late but inside --connect-timeout 4s; the upstream never answers TLS.
    api.delay_first_answer(Duration::from_millis(3_500));
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let silent = crate::support::upstream::Silent::start().await;
    let mut args = outbound(&api.endpoint(), silent.addr, SERVER_ID);
    let at = args.len() - 1;
    args[at] = "4s".into();
    let (code, out, took) = check(args).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  SVID             "), "the SVID came: {out}");
    assert!(out.contains("did not finish within"), "{out}");
    // The dial got what the API left of the 4 s, not 4 s more.
    assert!(took < Duration::from_secs(6), "took {took:?}: {out}");
}
