//! The life of a SPIFFE route against the scripted Workload API: listeners bind at once and
//! `/readyz` says why it is 503 until the first SVID; early connections wait for it, or fail
//! with `reason=no_identity` after `--connect-timeout`; rotation every second under load with no
//! failed connection; the API going away (last SVID keeps serving, one warn per outage) and
//! coming back; withdrawal (PermissionDenied).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::spiffe_routes::{SERVER_ID, TD, outbound_cmd, spiffe_upstream, start, try_echo};
use crate::support::admin::{admin_addr, get, scrape, wait_for_answer};
use crate::support::workload_api::{SpiffeCa, WorkloadApi};
use crate::support::*;

fn with_admin(cmd: Cmd) -> Cmd {
    cmd.args(["--admin", "127.0.0.1:0"])
}

/// One echo through `proxy` that must work.
async fn echo_ok(addr: std::net::SocketAddr, seed: u64) -> bool {
    let data = pattern(seed, 2000);
    try_echo(addr, &data).await == Some(data)
}

#[tokio::test(flavor = "multi_thread")]
async fn waits_for_the_first_svid_then_serves_and_turns_ready() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = with_admin(outbound_cmd(&api, up.addr, SERVER_ID)).args(["--connect-timeout", "10s"]);
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready
            .body
            .contains("waiting for the first SVID from the Workload API"),
        "{ready:?}"
    );
    assert!(
        api.wait_until(WAIT, |a| a.svid_requests() >= 1).await,
        "the API was asked"
    );
    // A connection made now waits for the identity instead of failing.
    let addr = proxy.addr();
    let early = tokio::spawn(async move { echo_ok(addr, 1).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!early.is_finished(), "the early connection did not wait");
    let me = ca.svid("/ns/shop/sa/web");
    api.issue(&[&me], &[&ca]);
    let ok = tokio::time::timeout(WAIT, early)
        .await
        .expect("in time")
        .expect("task");
    assert!(ok, "the early connection succeeded once the SVID came");
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let conn = up.stats.conns().last().cloned().expect("a connection");
    assert_eq!(conn.client_der.as_deref(), Some(me.der.as_ref()));
}

#[tokio::test(flavor = "multi_thread")]
async fn no_svid_within_connect_timeout_is_no_identity() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = outbound_cmd(&api, up.addr, SERVER_ID).args(["--connect-timeout", "1s"]);
    let mut proxy = start(&cmd);
    let started = Instant::now();
    let got = try_echo(proxy.addr(), b"hello").await;
    assert!(got.unwrap_or_default().is_empty());
    let line = proxy.wait_for_line("the failed connection", WAIT, is_conn_line);
    assert_eq!(field(&line, "reason"), Some("no_identity"), "{line}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "failed before --connect-timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(up.stats.tls_accepted(), 0, "no dial without an identity");
}

/// The API is slow to answer (1.5 s): a connection made meanwhile waits and succeeds, well
/// inside `--connect-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_first_answer_is_waited_for() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.delay_first_answer(Duration::from_millis(1500));
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = outbound_cmd(&api, up.addr, SERVER_ID).args(["--connect-timeout", "10s"]);
    let proxy = start(&cmd);
    let started = Instant::now();
    assert!(
        echo_ok(proxy.addr(), 5).await,
        "the early connection failed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "served before the API answered: {:?}",
        started.elapsed()
    );
}

/// A new SVID every second for six seconds while connections run back to back: every one
/// succeeds, each rotation is one reload, and the upstream sees the new identities.
#[tokio::test(flavor = "multi_thread")]
async fn rotation_every_second_under_load_fails_no_connection() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let mut proxy = start(&with_admin(outbound_cmd(&api, up.addr, SERVER_ID)));
    let admin = admin_addr(&mut proxy);
    assert!(echo_ok(proxy.addr(), 0).await, "first connection");
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let (stop, done, failed, addr) = (stop.clone(), done.clone(), failed.clone(), proxy.addr());
        workers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                if echo_ok(addr, w * 1000 + i).await {
                    done.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let mut issued = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let svid = ca.svid("/ns/shop/sa/web");
        api.set_svids(&[&svid]);
        issued.push(svid);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(WAIT, w)
            .await
            .expect("worker ends")
            .expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed connections during rotation"
    );
    assert!(
        done.load(Ordering::SeqCst) >= 20,
        "too little load: {done:?}"
    );
    let m = scrape(admin).await;
    let reloads = m.value("mtls_sidecar_reloads_total", &[("result", "success")]);
    assert!(reloads >= 6.0, "one reload per rotation, got {reloads}");
    let reloaded = proxy.count_lines(|l| l.contains("identity reloaded"));
    assert!(
        reloaded >= 6,
        "an `identity reloaded` line per rotation, got {reloaded}"
    );
    let seen: Vec<Vec<u8>> = up
        .stats
        .conns()
        .into_iter()
        .filter_map(|c| c.client_der)
        .collect();
    let last = issued.last().expect("issued");
    assert!(
        echo_ok(proxy.addr(), 99).await && !seen.is_empty(),
        "after the last rotation"
    );
    let newest = up.stats.conns().last().cloned().and_then(|c| c.client_der);
    assert_eq!(
        newest.as_deref(),
        Some(last.der.as_ref()),
        "the newest SVID in use"
    );
    let used = issued
        .iter()
        .filter(|s| seen.iter().any(|d| d == s.der.as_ref()))
        .count();
    assert!(used >= 3, "the upstream saw only {used} of 6 rotated SVIDs");
}

/// The API goes away: the last SVID keeps serving, one warn line for the whole outage; it comes
/// back on the same path: the sidecar reconnects and the next rotation is applied.
#[tokio::test(flavor = "multi_thread")]
async fn api_down_keeps_serving_and_back_resumes_rotation() {
    let ca = SpiffeCa::new(TD);
    let mut api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let mut proxy = start(&with_admin(outbound_cmd(&api, up.addr, SERVER_ID)));
    let admin = admin_addr(&mut proxy);
    assert!(echo_ok(proxy.addr(), 0).await);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let warns_before = proxy.count_lines(|l| l.contains("WARN") && !is_conn_line(l));
    api.stop().await;
    // Several seconds of outage: reconnect attempts with backoff, traffic still flows.
    for i in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            echo_ok(proxy.addr(), 10 + i).await,
            "served during the outage ({i}s)"
        );
    }
    assert_eq!(
        get(admin, "/readyz").await.status,
        200,
        "still ready on a valid SVID"
    );
    let warns = proxy.count_lines(|l| l.contains("WARN") && !is_conn_line(l)) - warns_before;
    assert_eq!(warns, 1, "one warn per outage:\n{}", proxy.stderr());
    let requests = api.svid_requests();
    api.start_again();
    assert!(
        api.wait_until(Duration::from_secs(30), |a| a.svid_requests() > requests)
            .await,
        "the sidecar never came back to the API"
    );
    let fresh = ca.svid("/ns/shop/sa/web");
    api.set_svids(&[&fresh]);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(echo_ok(proxy.addr(), 50).await);
        let newest = up.stats.conns().last().cloned().and_then(|c| c.client_der);
        if newest.as_deref() == Some(fresh.der.as_ref()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotation did not resume after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PermissionDenied: the route turns not ready and refuses new connections until a new SVID.
#[tokio::test(flavor = "multi_thread")]
async fn withdrawal_refuses_until_a_new_svid() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = with_admin(outbound_cmd(&api, up.addr, SERVER_ID)).args(["--connect-timeout", "1s"]);
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    assert!(echo_ok(proxy.addr(), 0).await);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let accepted_before = up.stats.tls_accepted();
    api.deny();
    wait_for_answer(admin, "/readyz", "503", WAIT, |r| r.status == 503).await;
    assert!(
        !echo_ok(proxy.addr(), 1).await,
        "a new connection after withdrawal got through"
    );
    assert_eq!(
        up.stats.tls_accepted(),
        accepted_before,
        "dialled with a withdrawn identity"
    );
    let fresh = ca.svid("/ns/shop/sa/web");
    api.set_svids(&[&fresh]);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    assert!(
        echo_ok(proxy.addr(), 2).await,
        "served again with the new SVID"
    );
    let newest = up.stats.conns().last().cloned().and_then(|c| c.client_der);
    assert_eq!(newest.as_deref(), Some(fresh.der.as_ref()));
}

/// A bundle-only update (same SVID, CA added) is applied without a new SVID.
#[tokio::test(flavor = "multi_thread")]
async fn bundle_only_update_is_one_reload() {
    let ca = SpiffeCa::new(TD);
    let partner = SpiffeCa::new("partner.test");
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let mut proxy = start(&with_admin(outbound_cmd(&api, up.addr, SERVER_ID)));
    let admin = admin_addr(&mut proxy);
    assert!(echo_ok(proxy.addr(), 0).await);
    let before = proxy.count_lines(|l| l.contains("identity reloaded"));
    api.set_bundles(&[&ca, &partner]);
    proxy.wait_for_lines("a reload for the bundle", before + 1, WAIT, |l| {
        l.contains("identity reloaded")
    });
    // The same answer sent again changes nothing worth a reload: it is still served.
    api.push();
    assert!(echo_ok(proxy.addr(), 1).await);
    let m = scrape(admin).await;
    assert!(m.value("mtls_sidecar_reloads_total", &[("result", "success")]) >= 1.0);
}

/// The serial `/status` shows for the route's identity, and its `spiffe_id`.
async fn status_identity(admin: std::net::SocketAddr) -> (String, String) {
    let status = get(admin, "/status").await;
    let json: serde_json::Value = serde_json::from_str(&status.body).expect("status JSON");
    let id = &json["identities"][0];
    let text = |k: &str| id[k].as_str().unwrap_or_default().to_owned();
    (text("serial"), text("spiffe_id"))
}

/// Inbound: `/status` shows the SVID's `spiffe_id`; a rotation is published (new serial) and
/// clients keep being served; a withdrawal refuses new clients until a new SVID.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_rotation_status_and_withdrawal() {
    use crate::spiffe_routes::{CLIENT_ID, inbound_cmd, inbound_echo};
    use crate::support::inbound::EchoTarget;
    use crate::support::pki::serial_of;
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let first = ca.svid("/ns/shop/sa/api");
    api.issue(&[&first], &[&ca]);
    let target = EchoTarget::start().await;
    let cmd = with_admin(inbound_cmd(&api, target.addr, CLIENT_ID));
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let client = ca.svid("/ns/shop/sa/web");
    let said = b"hello through spiffe\n".to_vec();
    assert_eq!(
        inbound_echo(proxy.addr(), &client, &[&ca])
            .await
            .expect("served"),
        said
    );
    assert_eq!(
        status_identity(admin).await,
        (serial_of(&first.der), SERVER_ID.to_owned())
    );
    let second = ca.svid("/ns/shop/sa/api");
    api.set_svids(&[&second]);
    let deadline = Instant::now() + WAIT;
    while status_identity(admin).await.0 != serial_of(&second.der) {
        assert!(
            Instant::now() < deadline,
            "rotation not published in /status"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        inbound_echo(proxy.addr(), &client, &[&ca])
            .await
            .expect("served"),
        said
    );
    api.deny();
    wait_for_answer(admin, "/readyz", "503", WAIT, |r| r.status == 503).await;
    let accepted = target.accepted();
    let got = inbound_echo(proxy.addr(), &client, &[&ca]).await;
    assert!(
        !matches!(&got, Ok(b) if !b.is_empty()),
        "served while withdrawn: {got:?}"
    );
    assert_eq!(
        target.accepted(),
        accepted,
        "no dial to the target while withdrawn"
    );
    api.set_svids(&[&ca.svid("/ns/shop/sa/api")]);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    assert_eq!(
        inbound_echo(proxy.addr(), &client, &[&ca])
            .await
            .expect("served again"),
        said
    );
}

/// Inbound: the server SVID rotates every second while clients connect back to back; none fails.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_rotation_every_second_under_load_fails_no_client() {
    use crate::spiffe_routes::{CLIENT_ID, inbound_cmd, inbound_echo};
    use crate::support::inbound::EchoTarget;
    let ca = Arc::new(SpiffeCa::new(TD));
    let api = WorkloadApi::start().await;
    api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let target = EchoTarget::start().await;
    let mut proxy = start(&with_admin(inbound_cmd(&api, target.addr, CLIENT_ID)));
    let admin = admin_addr(&mut proxy);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (stop, done, failed, ca) = (stop.clone(), done.clone(), failed.clone(), ca.clone());
        let addr = proxy.addr();
        workers.push(tokio::spawn(async move {
            let client = ca.svid("/ns/shop/sa/web");
            while !stop.load(Ordering::SeqCst) {
                match inbound_echo(addr, &client, &[&ca]).await {
                    Ok(b) if b == b"hello through spiffe\n" => done.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        api.set_svids(&[&ca.svid("/ns/shop/sa/api")]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        tokio::time::timeout(WAIT, w)
            .await
            .expect("worker ends")
            .expect("worker");
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "clients failed during rotation"
    );
    assert!(
        done.load(Ordering::SeqCst) >= 15,
        "too little load: {done:?}"
    );
    let reloaded = proxy.count_lines(|l| l.contains("identity reloaded"));
    assert!(
        reloaded >= 6,
        "an `identity reloaded` line per rotation, got {reloaded}"
    );
}

/// The API stays connected but sends nothing more while the SVID in force expires: the route
/// turns not ready and stops dialling with it (a silent API is not an outage, and an expired
/// SVID is never kept in force).
#[tokio::test(flavor = "multi_thread")]
async fn an_svid_that_expires_while_the_api_is_silent_is_withdrawn() {
    let ca = SpiffeCa::new(TD);
    let api = WorkloadApi::start().await;
    let now = time::OffsetDateTime::now_utc();
    let short = ca.svid_valid(
        "/ns/shop/sa/web",
        now - time::Duration::minutes(1),
        now + time::Duration::seconds(3),
    );
    api.issue(&[&short], &[&ca]);
    let up = spiffe_upstream(&ca.svid("/ns/shop/sa/api"), &[&ca]).await;
    let cmd = with_admin(outbound_cmd(&api, up.addr, SERVER_ID)).args(["--connect-timeout", "1s"]);
    let mut proxy = start(&cmd);
    let admin = admin_addr(&mut proxy);
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    wait_for_answer(admin, "/readyz", "503 after the SVID expired", WAIT, |r| {
        r.status == 503 && r.body.contains("expired")
    })
    .await;
    let accepted_before = up.stats.tls_accepted();
    assert!(
        !echo_ok(proxy.addr(), 1).await,
        "a new connection got through with an expired SVID"
    );
    assert_eq!(
        up.stats.tls_accepted(),
        accepted_before,
        "dialled with an expired SVID"
    );
    assert_eq!(
        api.open_streams(),
        1,
        "the API stayed connected (not an outage)"
    );
    proxy.wait_for_line("the withdrawal line", WAIT, |l| {
        l.contains("the SVID expired and the Workload API sent no new one")
    });
}
