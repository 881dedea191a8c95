//! The admin listener (`--admin`): `/healthz`, `/readyz` (also at SIGTERM and with an expired
//! certificate), `/metrics` (every family, counters moving by the right amount, expiry gauges,
//! reload counters), `/status` (JSON, no key material), `POST /shutdown`, and `wait`.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::admin::*;
use crate::support::files::{LiveIdentity, atomic_write, is_reload_failed, is_reloaded};
use crate::support::pki::{Identity, LeafSpec};
use crate::support::upstream::server_config;
use crate::support::*;

const P: &str = "mtls_sidecar_";

/// Every family of the interface with its type.
const FAMILIES: [(&str, &str); 8] = [
    ("connections_total", "counter"),
    ("active_connections", "gauge"),
    ("bytes_total", "counter"),
    ("upstream_handshake_seconds", "histogram"),
    ("client_cert_expiry_timestamp_seconds", "gauge"),
    ("upstream_cert_expiry_timestamp_seconds", "gauge"),
    ("reloads_total", "counter"),
    ("http_requests_total", "counter"),
];

fn m(name: &str) -> String {
    format!("{P}{name}")
}

/// A `run` command on 127.0.0.1:0 with these identity files, the test CA and an admin
/// listener on 127.0.0.1:0.
fn cmd_with(upstream: impl std::fmt::Display, cert: &Path, key: &Path, ca: &Path) -> Cmd {
    run_cmd_files(upstream, cert, key, ca).args(["--admin", "127.0.0.1:0"])
}

fn admin_cmd(pki: &Pki, upstream: impl std::fmt::Display) -> Cmd {
    run_cmd(pki, upstream).args(["--admin", "127.0.0.1:0"])
}

/// Starts the command and returns it with its admin address.
fn start(cmd: &Cmd) -> (Sidecar, std::net::SocketAddr) {
    let mut proxy = cmd.start();
    let admin = admin_addr(&mut proxy);
    (proxy, admin)
}

/// An upstream echo whose certificate has a realistic validity (a year from now).
async fn dated_upstream(pki: &Pki) -> (Upstream, Identity) {
    let id = pki.leaf(&pki.ca, "server-dated", LeafSpec::server());
    let up = Upstream::start(server_config(&id, &[&pki.ca.der]), vec![Behavior::Echo]).await;
    (up, id)
}

async fn status(admin: std::net::SocketAddr) -> Value {
    let resp = get(admin, "/status").await;
    assert_eq!(resp.status, 200, "GET /status: {resp:?}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/json"),
        "GET /status: content-type {ct:?}"
    );
    serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("GET /status is not JSON ({e}): {}", resp.body))
}

fn rfc3339_utc(v: &Value, what: &str) -> i64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    assert!(s.ends_with('Z'), "{what}={s} is not written in UTC (…Z)");
    OffsetDateTime::parse(s, &Rfc3339)
        .unwrap_or_else(|e| panic!("{what}={s} is not RFC 3339: {e}"))
        .unix_timestamp()
}

/// A connection through the proxy, proven open end to end.
async fn open_held(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = connect(addr).await;
    stream.write_all(b"held").await.expect("write");
    assert_eq!(read_exact(&mut stream, 4).await, b"held");
    stream
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_and_readyz_answer_on_the_logged_address() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (proxy, admin) = start(&admin_cmd(&pki, up.addr));
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{admin}");
    assert_ne!(admin, proxy.addr(), "the admin address is the proxy's");

    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.body.trim_end(), "ok", "{health:?}");

    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");

    let missing = get(admin, "/no-such-endpoint").await;
    assert_eq!(missing.status, 404, "{missing:?}");

    // Readiness is local: probing it never dials the upstream.
    for _ in 0..3 {
        assert_eq!(get(admin, "/readyz").await.status, 200);
    }
    assert_eq!(
        up.stats
            .tcp_accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a readiness probe dialled the upstream"
    );
    assert_eq!(exchange(proxy.addr(), b"ping".to_vec()).await, b"ping");
}

/// Every family with its type; counters, the histogram and both expiry gauges after three
/// connections of known sizes; the active gauge while one is held.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_connections_bytes_and_handshakes() {
    let pki = Pki::new();
    let (up, server) = dated_upstream(&pki).await;
    let client = pki.leaf(&pki.ca, "client-dated", LeafSpec::client("metrics-client"));
    let (mut proxy, admin) = start(&cmd_with(up.addr, &client.cert, &client.key, &pki.ca.pem));

    let sizes = [100usize, 2000, 30_000];
    for (i, &size) in sizes.iter().enumerate() {
        let data = pattern(i as u64 + 40, size);
        assert!(exchange(proxy.addr(), data.clone()).await == data, "echo");
    }
    blocking(|| proxy.wait_conn_lines(sizes.len()));
    let total: usize = sizes.iter().sum();
    let route = ("route", "default");

    let conns = m("connections_total");
    let bytes = m("bytes_total");
    let active = m("active_connections");
    let hs_count = m("upstream_handshake_seconds_count");
    let metrics = scrape_until(admin, |mm| {
        mm.count(&conns, &[route, ("outcome", "ok")]) >= 3.0
            && mm.count(&hs_count, &[route]) >= 3.0
            && mm.count(&bytes, &[route, ("direction", "from_upstream")]) >= total as f64
            && mm.get(&active, &[route]) == Some(0.0)
    })
    .await;

    for (family, kind) in FAMILIES {
        assert_eq!(
            metrics.type_of(&m(family)),
            Some(kind),
            "no `# TYPE` line for {P}{family} saying {kind}:\n{}",
            metrics.text
        );
    }

    assert_eq!(
        metrics.value(&conns, &[route, ("outcome", "ok")]),
        3.0,
        "three ok connections"
    );
    for outcome in ["connect_error", "tls_error", "timeout", "error"] {
        assert_eq!(
            metrics.count(&conns, &[route, ("outcome", outcome)]),
            0.0,
            "outcome={outcome} after three good connections:\n{}",
            metrics.text
        );
    }
    assert_eq!(
        metrics.value(&bytes, &[route, ("direction", "to_upstream")]),
        total as f64,
        "application bytes sent"
    );
    assert_eq!(
        metrics.value(&bytes, &[route, ("direction", "from_upstream")]),
        total as f64,
        "application bytes echoed"
    );
    assert_eq!(metrics.value(&active, &[route]), 0.0, "nothing open");

    // The histogram: one observation per successful handshake, buckets from 1 ms to 10 s.
    assert_eq!(
        metrics.value(&hs_count, &[route]),
        3.0,
        "handshakes observed"
    );
    let sum = metrics.value(&m("upstream_handshake_seconds_sum"), &[route]);
    assert!(
        sum > 0.0 && sum < 30.0,
        "handshake seconds sum {sum} for 3 local handshakes"
    );
    let bucket = m("upstream_handshake_seconds_bucket");
    let mut buckets: Vec<(f64, f64)> = metrics
        .matching(&bucket, &[route])
        .iter()
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()
                    .unwrap_or_else(|_| panic!("le={le:?} is no number"))
            };
            (le, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        buckets.len() >= 4,
        "too few buckets for 1 ms .. 10 s: {buckets:?}"
    );
    let finite: Vec<f64> = buckets
        .iter()
        .map(|b| b.0)
        .filter(|le| le.is_finite())
        .collect();
    assert!(
        (finite[0] - 0.001).abs() < 1e-9,
        "lowest bucket {} is not 1 ms: {buckets:?}",
        finite[0]
    );
    assert!(
        (finite[finite.len() - 1] - 10.0).abs() < 1e-9,
        "highest finite bucket {} is not 10 s: {buckets:?}",
        finite[finite.len() - 1]
    );
    assert_eq!(
        buckets.last().copied(),
        Some((f64::INFINITY, 3.0)),
        "the +Inf bucket holds every handshake"
    );
    for w in buckets.windows(2) {
        assert!(w[0].1 <= w[1].1, "buckets are not cumulative: {buckets:?}");
    }

    // The expiry gauges, in Unix seconds.
    assert_eq!(
        metrics.value(&m("client_cert_expiry_timestamp_seconds"), &[route]),
        client.not_after_unix() as f64,
        "client certificate not_after"
    );
    assert_eq!(
        metrics.value(&m("upstream_cert_expiry_timestamp_seconds"), &[route]),
        server.not_after_unix() as f64,
        "upstream leaf not_after"
    );

    // The active gauge follows a held connection, in /metrics and /status alike.
    let held = open_held(proxy.addr()).await;
    let metrics = scrape_until(admin, |mm| mm.get(&active, &[route]) == Some(1.0)).await;
    assert_eq!(metrics.value(&active, &[route]), 1.0, "one connection held");
    let st = status(admin).await;
    assert_eq!(
        st["routes"][0]["active_connections"], 1,
        "/status while one connection is held: {st}"
    );
    drop(held);
    let metrics = scrape_until(admin, |mm| mm.get(&active, &[route]) == Some(0.0)).await;
    assert_eq!(metrics.value(&active, &[route]), 0.0, "the held one closed");
    assert_eq!(metrics.value(&conns, &[route, ("outcome", "ok")]), 4.0);
}

/// One failed connection of each kind moves its own outcome by one and observes no handshake.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_failed_connections_by_outcome() {
    let pki = Pki::new();
    let route = ("route", "default");
    let conns = m("connections_total");
    let wrong_name = pki.server_wrong_name();
    let wrong = Upstream::start(
        server_config(&wrong_name, &[&pki.ca.der]),
        vec![Behavior::Echo],
    )
    .await;
    let silent = Silent::start().await;
    let cases = [
        (
            "connect_error",
            format!("127.0.0.1:{}", free_port()),
            vec![],
        ),
        ("tls_error", wrong.addr.to_string(), vec![]),
        (
            "timeout",
            silent.addr.to_string(),
            vec!["--connect-timeout", "300ms"],
        ),
    ];
    for (outcome, upstream, extra) in cases {
        let (mut proxy, admin) = start(&admin_cmd(&pki, &upstream).args(extra));
        let mut stream = connect(proxy.addr()).await;
        let _ = stream.write_all(b"hello").await;
        expect_closed_without_data(&mut stream, WAIT).await;
        blocking(|| proxy.wait_conn_lines(1));
        let metrics = scrape_until(admin, |mm| {
            mm.count(&conns, &[route, ("outcome", outcome)]) >= 1.0
        })
        .await;
        assert_eq!(
            metrics.value(&conns, &[route, ("outcome", outcome)]),
            1.0,
            "{outcome}: one failed connection to {upstream}"
        );
        let all: f64 = metrics
            .matching(&conns, &[route])
            .iter()
            .map(|s| s.value)
            .sum();
        assert_eq!(
            all, 1.0,
            "{outcome}: other outcomes moved:\n{}",
            metrics.text
        );
        assert_eq!(
            metrics.count(&m("upstream_handshake_seconds_count"), &[route]),
            0.0,
            "{outcome}: a failed handshake observed as a handshake time"
        );
        assert_eq!(
            metrics.count(&m("bytes_total"), &[route, ("direction", "to_upstream")]),
            0.0,
            "{outcome}: bytes counted for a connection that never reached the upstream"
        );
    }
}

/// A broken rotation counts one failure (once, not at every poll) and shows in /status; the
/// good rotation after it counts one success and moves the expiry gauge and /status.
#[tokio::test(flavor = "multi_thread")]
async fn reloads_are_counted_and_shown_in_status() {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "reload-a", LeafSpec::client("reload-a"));
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let b = pki.leaf(
        &pki.ca,
        "reload-b",
        LeafSpec {
            validity: Some((now - TimeDuration::days(2), now + TimeDuration::days(100))),
            ..LeafSpec::client("reload-b")
        },
    );
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (mut proxy, admin) = start(
        &cmd_with(up.addr, &live.cert, &live.key, &pki.ca.pem).args(["--reload-interval", "200ms"]),
    );
    let reloads = m("reloads_total");
    let expiry = m("client_cert_expiry_timestamp_seconds");
    let route = ("route", "default");

    let before = scrape(admin).await;
    assert_eq!(before.count(&reloads, &[("result", "failure")]), 0.0);
    let successes = before.count(&reloads, &[("result", "success")]);
    assert_eq!(before.value(&expiry, &[route]), a.not_after_unix() as f64);
    let st = status(admin).await;
    assert_eq!(st["identities"][0]["serial"], a.serial_hex(), "{st}");

    atomic_write(&live.cert, "this is not a certificate\n");
    blocking(|| proxy.wait_for_line("the reload failure line", WAIT, is_reload_failed));
    let metrics = scrape_until(admin, |mm| {
        mm.count(&reloads, &[("result", "failure")]) >= 1.0
    })
    .await;
    assert_eq!(
        metrics.value(&reloads, &[("result", "failure")]),
        1.0,
        "one broken rotation"
    );
    assert_eq!(metrics.count(&reloads, &[("result", "success")]), successes);
    assert_eq!(
        metrics.value(&expiry, &[route]),
        a.not_after_unix() as f64,
        "the identity in force did not change"
    );
    let st = status(admin).await;
    let last = &st["last_reload"];
    assert_eq!(last["result"], "failure", "{st}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "last_reload.error says nothing: {st}");
    rfc3339_utc(&last["at"], "last_reload.at");
    assert_eq!(st["identities"][0]["serial"], a.serial_hex(), "{st}");
    let ready = get(admin, "/readyz").await;
    assert_eq!(
        ready.status, 200,
        "a broken rotation keeps a valid identity: {ready:?}"
    );

    // Further polls of the same broken content are not further failures (3 intervals).
    let quiet_until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < quiet_until {
        let mm = scrape(admin).await;
        assert_eq!(
            mm.value(&reloads, &[("result", "failure")]),
            1.0,
            "the same broken content counted again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    live.install(&b);
    let serial = b.serial_hex();
    blocking(|| {
        proxy.wait_for_line("the reload line of b", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });
    let metrics = scrape_until(admin, |mm| {
        mm.count(&reloads, &[("result", "success")]) > successes
    })
    .await;
    assert_eq!(
        metrics.value(&reloads, &[("result", "success")]),
        successes + 1.0,
        "one good rotation"
    );
    assert_eq!(metrics.value(&reloads, &[("result", "failure")]), 1.0);
    assert_eq!(
        metrics.value(&expiry, &[route]),
        b.not_after_unix() as f64,
        "the expiry gauge follows the new certificate"
    );
    let st = status(admin).await;
    assert_eq!(st["identities"][0]["serial"], b.serial_hex(), "{st}");
    assert_eq!(st["last_reload"]["result"], "success", "{st}");
    assert!(st["last_reload"]["error"].is_null(), "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_describes_routes_and_identities_without_key_material() {
    let pki = Pki::new();
    let id = pki.leaf(
        &pki.ca,
        "status-client",
        LeafSpec {
            names: &["app.example.com"],
            ..LeafSpec::client("status-app")
        },
    );
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let upstream = format!("localhost:{}", up.port());
    let (proxy, admin) = start(&cmd_with(&upstream, &id.cert, &id.key, &pki.ca.pem));

    let resp = get(admin, "/status").await;
    let st = status(admin).await;
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");

    let routes = st["routes"].as_array().expect("routes is an array");
    assert_eq!(routes.len(), 1, "{st}");
    let r = &routes[0];
    assert_eq!(r["name"], "default", "{st}");
    assert_eq!(r["listen"], proxy.addr().to_string(), "{st}");
    assert_eq!(r["upstream"], upstream, "{st}");
    assert_eq!(r["mode"], "tcp", "{st}");
    assert_eq!(r["active_connections"], 0, "{st}");

    let ids = st["identities"].as_array().expect("identities is an array");
    assert_eq!(ids.len(), 1, "{st}");
    let i = &ids[0];
    assert_eq!(i["route"], "default", "{st}");
    assert_eq!(i["subject"], "CN=status-app", "{st}");
    assert_eq!(i["issuer"], "CN=mtls-sidecar test CA", "{st}");
    assert_eq!(
        i["sans"],
        serde_json::json!(["DNS:app.example.com"]),
        "{st}"
    );
    assert_eq!(i["serial"], id.serial_hex(), "{st}");
    assert_eq!(i["sha256_fingerprint"], hex(&sha256(&id.der)), "{st}");
    let (_, cert) = x509_parser::parse_x509_certificate(&id.der).unwrap();
    assert_eq!(
        rfc3339_utc(&i["not_before"], "not_before"),
        cert.validity().not_before.timestamp()
    );
    assert_eq!(
        rfc3339_utc(&i["not_after"], "not_after"),
        id.not_after_unix()
    );

    let last = &st["last_reload"];
    assert!(
        last.is_null() || last["result"] == "success",
        "last_reload before any rotation: {st}"
    );

    // No key material, in any form.
    let key_pem = std::fs::read_to_string(&id.key).unwrap();
    for body_line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !resp.body.contains(body_line),
            "/status contains a line of the private key: {}",
            resp.body
        );
    }
    assert!(!resp.body.contains("PRIVATE KEY"), "{}", resp.body);
    let metrics = scrape(admin).await;
    assert!(!metrics.text.contains("PRIVATE KEY"));
}

/// With `--shutdown-delay 3s`, SIGTERM turns /readyz 503 at once while the proxy still serves;
/// /healthz stays 200 until the end; the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_turns_503_at_sigterm_while_the_proxy_still_serves() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (mut proxy, admin) = start(&admin_cmd(&pki, up.addr).args(["--shutdown-delay", "3s"]));
    assert_eq!(get(admin, "/readyz").await.status, 200);

    let sent = Instant::now();
    proxy.signal("TERM");
    let ready = wait_for_answer(admin, "/readyz", "503", Duration::from_millis(1500), |r| {
        r.status == 503
    })
    .await;
    assert!(
        ready.body.starts_with("not ready:"),
        "the 503 body does not start with `not ready:`: {:?}",
        ready.body
    );
    assert_eq!(
        ready.body.trim_end().lines().count(),
        1,
        "the reason is one line: {:?}",
        ready.body
    );
    assert_eq!(get(admin, "/healthz").await.status, 200, "liveness");
    // Still within the delay: new connections are served.
    assert_eq!(exchange(proxy.addr(), b"late".to_vec()).await, b"late");
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "too slow to tell: {:?} since SIGTERM",
        sent.elapsed()
    );
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "exit after SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_with_an_expired_client_certificate() {
    let pki = Pki::new();
    let expired = pki.client_expired();
    // The admin address from the environment, as every option can be given.
    let (mut proxy, admin) = start(
        &run_cmd_files("127.0.0.1:9", &expired.cert, &expired.key, &pki.ca.pem)
            .env("MTLS_SIDECAR_ADMIN", "127.0.0.1:0"),
    );
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.starts_with("not ready:"), "{:?}", ready.body);
    assert_eq!(ready.body.trim_end().lines().count(), 1, "{:?}", ready.body);
    assert!(
        ready.body.contains("default") && ready.body.to_lowercase().contains("expired"),
        "the reason names neither the route nor the expiry: {:?}",
        ready.body
    );
    assert_eq!(
        get(admin, "/healthz").await.status,
        200,
        "alive all the same"
    );
    assert!(proxy.try_exit().is_none(), "the process exited");
}

#[tokio::test(flavor = "multi_thread")]
async fn post_shutdown_stops_gracefully_only_when_allowed() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;

    // Without the flag: 404, and the process keeps running.
    let (mut proxy, admin) = start(&admin_cmd(&pki, up.addr));
    let resp = request(admin, "POST", "/shutdown").await;
    assert_eq!(
        resp.status, 404,
        "POST /shutdown without the flag: {resp:?}"
    );
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert!(proxy.try_exit().is_none(), "it stopped anyway");
    assert_eq!(exchange(proxy.addr(), b"still".to_vec()).await, b"still");
    drop(proxy);

    // With the flag: GET is 405, POST 200 and the same graceful shutdown as SIGTERM.
    let (mut proxy, admin) =
        start(&admin_cmd(&pki, up.addr).args(["--admin-allow-shutdown", "--shutdown-delay", "1s"]));
    let resp = get(admin, "/shutdown").await;
    assert_eq!(resp.status, 405, "GET /shutdown: {resp:?}");
    assert!(proxy.try_exit().is_none(), "GET /shutdown stopped it");
    assert_eq!(get(admin, "/readyz").await.status, 200);

    let resp = request(admin, "POST", "/shutdown").await;
    assert_eq!(resp.status, 200, "POST /shutdown: {resp:?}");
    let ready = wait_for_answer(admin, "/readyz", "503", Duration::from_millis(900), |r| {
        r.status == 503
    })
    .await;
    assert!(ready.body.starts_with("not ready:"), "{:?}", ready.body);
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "exit after POST /shutdown");
}

fn wait_cmd(admin: impl std::fmt::Display, timeout: &str) -> Cmd {
    Cmd::new()
        .args(["wait", "--admin"])
        .arg(admin.to_string())
        .args(["--timeout", timeout])
}

/// `wait` gives up with exit 1 after its timeout, whether nothing listens or the sidecar is
/// not ready.
#[tokio::test(flavor = "multi_thread")]
async fn wait_exits_1_at_the_timeout() {
    let pki = Pki::new();
    let expired = pki.client_expired();
    let (_proxy, not_ready) = start(&cmd_with(
        "127.0.0.1:9",
        &expired.cert,
        &expired.key,
        &pki.ca.pem,
    ));
    assert_eq!(get(not_ready, "/readyz").await.status, 503);
    let nothing = format!("127.0.0.1:{}", free_port());

    for (what, target) in [
        ("nothing listening", nothing),
        ("a sidecar that is not ready", not_ready.to_string()),
    ] {
        let started = Instant::now();
        let (code, stderr) = blocking(|| wait_cmd(&target, "1s").run_to_exit(WAIT));
        let took = started.elapsed();
        assert_eq!(code, Some(1), "wait against {what}: {stderr}");
        assert!(
            took >= Duration::from_millis(900),
            "wait against {what} gave up after {took:?}, before its 1s timeout: {stderr}"
        );
        assert!(
            took < Duration::from_secs(5),
            "wait against {what} took {took:?} with a 1s timeout: {stderr}"
        );
    }
}

/// `wait` started before the sidecar exits 0 as soon as /readyz answers 200.
#[tokio::test(flavor = "multi_thread")]
async fn wait_exits_0_once_ready() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let port = free_port();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut waiter = wait_cmd(admin, "30s").spawn();
    // It keeps waiting while nothing listens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        waiter.try_exit().is_none(),
        "wait exited with nothing to wait for"
    );

    let _proxy = run_cmd(&pki, up.addr)
        .args(["--admin", &admin.to_string()])
        .start();
    wait_for_answer(admin, "/readyz", "200", WAIT, |r| r.status == 200).await;
    let ready_at = Instant::now();
    let status = blocking(|| waiter.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "wait once ready");
    assert!(
        ready_at.elapsed() < Duration::from_secs(3),
        "wait exited {:?} after /readyz answered 200",
        ready_at.elapsed()
    );
}
