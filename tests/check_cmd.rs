//! `mtls-sidecar check`: the real binary against real upstreams, passing and failing in each way
//! an mTLS handshake fails, with the explanation it prints (text) and the verdicts it reports
//! (JSON).

use std::fmt::Display;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::connect_proxy::{ConnectProxy, ProxyBehavior, UPSTREAM_NAME, named_upstream};
use crate::support::pki::{CLIENT_CN, Identity};
use crate::support::upstream::{server_config, server_config_tls12};
use crate::support::*;

const CA_CN: &str = "CN=mtls-sidecar test CA";
const OTHER_CA_CN: &str = "CN=untrusted test CA";

/// `check` towards `upstream` with client identity `client` and the test CA as `--ca`.
fn check_as(pki: &Pki, client: &Identity, upstream: impl Display) -> Cmd {
    Cmd::new()
        .args(["check", "--upstream"])
        .arg(upstream.to_string())
        .arg("--cert")
        .arg(&client.cert)
        .arg("--key")
        .arg(&client.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
}

fn check_cmd(pki: &Pki, upstream: impl Display) -> Cmd {
    check_as(pki, &pki.client, upstream)
}

/// A finished `check`: its exit code and report; the process handle shows the command and
/// output when an assertion fails.
struct Checked {
    code: Option<i32>,
    out: String,
    proc: Sidecar,
}

/// Runs `check` to completion off the runtime's threads (the upstreams run on them).
async fn run_check(cmd: Cmd) -> Checked {
    tokio::task::spawn_blocking(move || run_check_blocking(&cmd))
        .await
        .expect("check runner")
}

fn run_check_blocking(cmd: &Cmd) -> Checked {
    let mut proc = cmd.spawn();
    let status = proc.wait_exit(WAIT);
    proc.wait_output_closed();
    Checked {
        code: status.code(),
        out: proc.stdout(),
        proc,
    }
}

impl Checked {
    fn passed(&self) -> &Self {
        if self.code != Some(0) {
            self.proc
                .fail(&format!("exit code {:?}, expected 0", self.code));
        }
        self
    }

    fn failed(&self) -> &Self {
        if self.code != Some(1) {
            self.proc
                .fail(&format!("exit code {:?}, expected 1", self.code));
        }
        self
    }

    fn has(&self, needle: &str) -> &Self {
        if !self.out.contains(needle) {
            self.proc
                .fail(&format!("the report does not say {needle:?}"));
        }
        self
    }

    /// The final `route default: ...` line.
    fn verdict(&self) -> &str {
        self.out
            .lines()
            .rev()
            .find(|l| l.starts_with("route default: PASS") || l.starts_with("route default: FAIL"))
            .unwrap_or_else(|| self.proc.fail("no verdict line"))
    }

    /// The verdict line must contain every needle.
    fn verdict_says(&self, needles: &[&str]) -> &Self {
        let v = self.verdict();
        for n in needles {
            if !v.contains(n) {
                self.proc
                    .fail(&format!("the verdict does not say {n:?}: {v}"));
            }
        }
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| self.proc.fail(&format!("the report is not JSON: {e}")))
    }

    /// Key material never appears.
    fn no_secrets(&self, client: &Identity) -> &Self {
        let key = std::fs::read_to_string(&client.key).expect("read key");
        let body = key.lines().nth(1).expect("a PEM body line");
        if self.out.contains("PRIVATE") || self.out.contains(body) {
            self.proc.fail("the report shows key material");
        }
        self
    }
}

/// N in "expired N days ago", if `text` says so.
fn days_ago(text: &str) -> Option<u64> {
    let (_, rest) = text.split_once("expired ")?;
    let (n, rest) = rest.split_once(' ')?;
    rest.starts_with("days ago").then(|| n.parse().ok())?
}

fn route(report: &Value) -> &Value {
    assert_eq!(
        report["routes"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    &report["routes"][0]
}

fn problems(route: &Value) -> Vec<String> {
    route["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| p.as_str().expect("a problem is a string").to_string())
        .collect()
}

/// A JSON report of one failed route whose first problem contains every needle.
fn assert_json_fails(report: &Value, needles: &[&str]) {
    assert_eq!(report["ok"], false, "{report}");
    let r = route(report);
    assert_eq!(r["ok"], false, "{report}");
    let p = problems(r);
    for n in needles {
        assert!(p[0].contains(n), "first problem lacks {n:?}: {p:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn passes_against_a_good_upstream() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let c = run_check(check_cmd(&pki, format!("localhost:{}", up.port()))).await;
    c.passed()
        .verdict_says(&["PASS"])
        .has(&format!("subject    CN={CLIENT_CN}"))
        .has("key        EC P-256")
        .has(&format!("the leaf alone, issued by {CA_CN}"))
        .has("TLS 1.3")
        .has("[0] CN=localhost")
        .has("DNS:localhost, IP:127.0.0.1")
        .has(&format!("connected        127.0.0.1:{}", up.port()))
        .has(&format!("requested; accepted issuers: {CA_CN}"))
        .no_secrets(&pki.client);

    // The one dial presented our certificate.
    let deadline = Instant::now() + WAIT;
    while up.stats.tls_accepted() == 0 {
        assert!(Instant::now() < deadline, "the upstream saw no handshake");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0].client_cn.as_deref(), Some(CLIENT_CN));
    assert_eq!(conns[0].sni.as_deref(), Some("localhost"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_report_of_a_pass() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let c =
        run_check(check_cmd(&pki, format!("localhost:{}", up.port())).args(["--format", "json"]))
            .await;
    c.passed().no_secrets(&pki.client);
    let report = c.json();
    assert_eq!(report["ok"], true, "{report}");
    let r = route(&report);
    assert_eq!(r["name"], "default");
    assert_eq!(r["ok"], true);
    assert!(problems(r).is_empty(), "{r}");
    assert_eq!(
        r["client_certificate"]["subject"],
        format!("CN={CLIENT_CN}")
    );
    assert_eq!(r["client_certificate"]["issuer"], CA_CN);
    assert_eq!(r["client_certificate"]["key_type"], "EC P-256");
    assert_eq!(r["client_certificate"]["chain_ends_at_root"], false);
    assert!(
        r["dns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "127.0.0.1"),
        "{r}"
    );
    assert_eq!(r["connected"], format!("127.0.0.1:{}", up.port()));
    assert_eq!(r["tls"]["version"], "TLS 1.3");
    assert!(r["tls"]["cipher"].as_str().unwrap().starts_with("TLS13_"));
    assert_eq!(r["tls"]["alpn"], Value::Null);
    assert_eq!(r["upstream_chain"][0]["subject"], "CN=localhost");
    assert_eq!(r["upstream_chain"][0]["issuer"], CA_CN);
    assert_eq!(r["upstream_chain"][0]["sans"][0], "DNS:localhost");
    assert!(
        r["upstream_chain"][0]["not_after"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(r["client_cert_requested"], true);
    assert_eq!(r["accepted_cas"][0], CA_CN);
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_an_upstream_cert_from_an_unknown_ca() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server_unknown_ca(), &pki.ca.der).await;
    let upstream = format!("localhost:{}", up.port());
    let ca = pki.ca.pem.display().to_string();
    let c = run_check(check_cmd(&pki, &upstream)).await;
    c.failed()
        .verdict_says(&[
            &format!("the upstream's certificate was issued by {OTHER_CA_CN}"),
            &format!("which is not in --ca {ca}"),
            "add",
        ])
        // The chain is shown although it failed verification.
        .has("[0] CN=localhost");

    let c = run_check(check_cmd(&pki, &upstream).args(["--format", "json"])).await;
    c.failed();
    let report = c.json();
    assert_json_fails(&report, &[OTHER_CA_CN, &ca]);
    assert_eq!(route(&report)["upstream_chain"][0]["issuer"], OTHER_CA_CN);
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_a_name_mismatch() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server_wrong_name(), &pki.ca.der).await;
    let c = run_check(check_cmd(&pki, format!("localhost:{}", up.port()))).await;
    c.failed().verdict_says(&[
        "the upstream's certificate is for other.example, not the name we dialled (localhost)",
        "--server-name other.example",
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_an_expired_upstream_cert() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server_expired(), &pki.ca.der).await;
    let c = run_check(check_cmd(&pki, format!("localhost:{}", up.port()))).await;
    c.failed()
        .verdict_says(&["the upstream's certificate (CN=localhost) expired", "renew"]);
    assert!(
        days_ago(c.verdict()).is_some_and(|d| d > 365),
        "{}",
        c.verdict()
    );
}

/// The upstream trusts another CA for clients. In TLS 1.3 its verdict arrives after our side of
/// the handshake is done; rustls sends the CA names it accepts with its request.
#[tokio::test(flavor = "multi_thread")]
async fn explains_an_upstream_that_rejects_our_client_ca() {
    let pki = Pki::new();
    let other = pki.other_ca();
    let up = Upstream::start(
        server_config(&pki.server, &[&other.der]),
        vec![Behavior::Echo],
    )
    .await;
    let upstream = format!("localhost:{}", up.port());
    let c = run_check(check_cmd(&pki, &upstream)).await;
    c.failed()
        .verdict_says(&[
            "the upstream rejected our client certificate (alert unknown_ca)",
            &format!("its trust store does not contain the issuer of our certificate, {CA_CN}"),
            &format!("it accepts certificates issued by: {OTHER_CA_CN}"),
        ])
        .has("TLS 1.3")
        .has("TLS 1.3")
        .has(&format!("accepted issuers: {OTHER_CA_CN}"));

    let c = run_check(check_cmd(&pki, &upstream).args(["--format", "json"])).await;
    c.failed();
    let report = c.json();
    assert_json_fails(&report, &["rejected our client certificate", OTHER_CA_CN]);
    let r = route(&report);
    assert_eq!(r["client_cert_requested"], true);
    assert_eq!(r["accepted_cas"][0], OTHER_CA_CN);
    assert_eq!(r["tls"]["version"], "TLS 1.3");
}

/// In TLS 1.2 the rejection arrives during the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn explains_an_upstream_that_rejects_our_client_ca_tls12() {
    let pki = Pki::new();
    let other = pki.other_ca();
    let up = Upstream::start(
        server_config_tls12(&pki.server, &[&other.der]),
        vec![Behavior::Echo],
    )
    .await;
    let c = run_check(check_cmd(&pki, format!("localhost:{}", up.port()))).await;
    c.failed()
        .verdict_says(&[
            "the upstream rejected our client certificate (alert unknown_ca)",
            CA_CN,
            &format!("it accepts certificates issued by: {OTHER_CA_CN}"),
        ])
        .has("TLS 1.2");
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_our_expired_client_cert() {
    let pki = Pki::new();
    let expired = pki.client_expired();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let c = run_check(check_as(&pki, &expired, format!("localhost:{}", up.port()))).await;
    c.failed()
        .verdict_says(&["our client certificate expired", "renew --cert"])
        // And what the upstream made of it.
        .has("the upstream rejected our client certificate (alert certificate_expired)");
    assert!(
        days_ago(c.verdict()).is_some_and(|d| d > 365),
        "{}",
        c.verdict()
    );

    let c = run_check(
        check_as(&pki, &expired, format!("localhost:{}", up.port())).args(["--format", "json"]),
    )
    .await;
    c.failed();
    let report = c.json();
    assert_json_fails(&report, &["our client certificate expired"]);
    let r = route(&report);
    assert!(
        r["client_certificate"]["validity"]
            .as_str()
            .is_some_and(|v| days_ago(v).is_some()),
        "{r}"
    );
    assert_eq!(problems(r).len(), 2, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_an_unreachable_upstream() {
    let pki = Pki::new();
    let port = free_port();
    let c = run_check(check_cmd(&pki, format!("127.0.0.1:{port}"))).await;
    c.failed().verdict_says(&[
        &format!("nothing accepted a connection at 127.0.0.1:{port}"),
        "connection refused",
    ]);

    let c =
        run_check(check_cmd(&pki, format!("127.0.0.1:{port}")).args(["--format", "json"])).await;
    c.failed();
    let report = c.json();
    assert_json_fails(&report, &["nothing accepted a connection"]);
    let r = route(&report);
    assert_eq!(r["connected"], Value::Null);
    assert_eq!(r["tls"], Value::Null);
    // What loaded is still reported.
    assert_eq!(
        r["client_certificate"]["subject"],
        format!("CN={CLIENT_CN}")
    );
}

/// Something accepts the connection and never answers the TLS hello: `--connect-timeout` ends
/// the check, which says where it got stuck.
#[tokio::test(flavor = "multi_thread")]
async fn explains_a_handshake_that_never_finishes() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let started = Instant::now();
    let c = run_check(check_cmd(&pki, silent.addr).args(["--connect-timeout", "1s"])).await;
    c.failed().verdict_says(&[
        &format!("{} accepted the connection", silent.addr),
        "did not finish within --connect-timeout 1s",
        "is it a TLS port?",
    ]);
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

/// Material that does not load fails the check before any dial, naming the file.
#[test]
fn explains_material_that_does_not_load() {
    let pki = Pki::new();
    let garbage = pki.write("garbage.pem", "not a certificate\n");
    let c = run_check_blocking(
        &Cmd::new()
            .args(["check", "--upstream", "127.0.0.1:1", "--cert"])
            .arg(&garbage)
            .arg("--key")
            .arg(&pki.client.key),
    );
    c.failed()
        .verdict_says(&[&garbage.display().to_string(), "no PEM certificate"]);
}

// nginx, requiring client certificates from a CA other than ours

/// nginx accepting client certificates from `client_ca`.
fn site(client_ca: &Path) -> nginx::Site<'_> {
    nginx::Site {
        client_ca,
        http2: None,
        log_format: None,
        body: "$ssl_client_verify",
    }
}

/// nginx completes the handshake whatever it thinks of our certificate (and answers 400 to each
/// request), so its CA names are all `check` has to go on: it names the CA nginx accepts.
#[test]
fn names_the_ca_nginx_accepts() {
    if !nginx::installed() {
        return;
    }
    let pki = Pki::new();
    let other = pki.other_ca();
    let nginx = nginx::start(&pki, "nginx-other-ca", &site(&other.pem));
    let c = run_check_blocking(&check_cmd(&pki, format!("localhost:{}", nginx.port)));
    c.failed()
        .has("TLS 1.3")
        .has(&format!("accepted issuers: {OTHER_CA_CN}"))
        .verdict_says(&[
            &format!("the upstream accepts client certificates issued by: {OTHER_CA_CN}"),
            &format!("ours comes from {CA_CN}"),
        ]);

    let c = run_check_blocking(
        &check_cmd(&pki, format!("localhost:{}", nginx.port)).args(["--format", "json"]),
    );
    c.failed();
    let report = c.json();
    assert_json_fails(&report, &[OTHER_CA_CN]);
    assert_eq!(route(&report)["accepted_cas"][0], OTHER_CA_CN);
}

/// The same nginx trusting our CA: `check` passes.
#[test]
fn passes_against_nginx_that_trusts_our_ca() {
    if !nginx::installed() {
        return;
    }
    let pki = Pki::new();
    let nginx = nginx::start(&pki, "nginx-our-ca", &site(&pki.ca.pem));
    let c = run_check_blocking(&check_cmd(&pki, format!("localhost:{}", nginx.port)));
    c.passed()
        .verdict_says(&["PASS"])
        .has("TLS 1.3")
        .has(&format!("accepted issuers: {CA_CN}"));
}

// Many routes from a config file

/// A TOML basic string holding a path.
fn toml_path(p: &Path) -> String {
    let s = p.to_str().expect("UTF-8 temp path");
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Every route is checked, in order, whatever happened to the one before; each has its own
/// verdict, and the exit code is 0 only if all pass.
#[tokio::test(flavor = "multi_thread")]
async fn checks_every_route_of_a_config_file() {
    let pki = Pki::new();
    let good = Upstream::echo(&pki.server, &pki.ca.der).await;
    let unknown = Upstream::echo(&pki.server_unknown_ca(), &pki.ca.der).await;
    let down = free_port();
    let route = |name: &str, upstream: String| {
        format!(
            "\n[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
        )
    };
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\n{}{}{}",
        toml_path(&pki.client.cert),
        toml_path(&pki.client.key),
        toml_path(&pki.ca.pem),
        route("down", format!("127.0.0.1:{down}")),
        route("unknown-ca", format!("localhost:{}", unknown.port())),
        route("good", format!("localhost:{}", good.port())),
    );
    let config = pki.write("check.toml", text);
    let cmd = Cmd::new().args(["check", "--config"]).arg(&config);

    let c = run_check(cmd.clone()).await;
    c.failed()
        .has("route down: FAIL: nothing accepted a connection")
        .has(&format!(
            "route unknown-ca: FAIL: the upstream's certificate was issued by {OTHER_CA_CN}"
        ))
        .has("route good: PASS");
    let order: Vec<&str> = c
        .out
        .lines()
        .filter(|l| l.starts_with("route ") && (l.contains(": PASS") || l.contains(": FAIL")))
        .map(|l| l.split(':').next().unwrap_or_default())
        .collect();
    assert_eq!(
        order,
        ["route down", "route unknown-ca", "route good"],
        "{}",
        c.out
    );

    let c = run_check(cmd.args(["--format", "json"])).await;
    c.failed();
    let report = c.json();
    assert_eq!(report["ok"], false, "{report}");
    let routes = report["routes"].as_array().expect("routes");
    let verdicts: Vec<(&str, bool)> = routes
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        verdicts,
        [("down", false), ("unknown-ca", false), ("good", true)],
        "{report}"
    );
    assert!(problems(&routes[1])[0].contains(OTHER_CA_CN), "{report}");
    assert!(problems(&routes[2]).is_empty(), "{report}");
}

// ---------------------------------------------------------------------------------------------
// The proxy hop (`--proxy`, `--no-proxy`)

#[tokio::test(flavor = "multi_thread")]
async fn reports_the_proxy_hop_of_a_pass() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let target = format!("{UPSTREAM_NAME}:{}", up.port());
    let c = run_check(check_cmd(&pki, &target).args(["--proxy", &proxy.url()])).await;
    c.passed()
        .verdict_says(&["PASS"])
        .has(&format!(
            "proxy            {} (credentials: none)",
            proxy.url()
        ))
        .has(&format!(
            "proxy tunnel     CONNECT {target}: 200 Connection established (via proxy {} at {})",
            proxy.url(),
            proxy.addr
        ))
        .has(&format!("[0] CN={UPSTREAM_NAME}"));
    assert!(
        !c.out.contains("  dns  "),
        "no local DNS through a proxy:\n{}",
        c.out
    );
    let asked: Vec<String> = proxy.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(asked, vec![target.clone()]);

    let c = run_check(check_cmd(&pki, &target).args(["--proxy", &proxy.url(), "--format", "json"]))
        .await;
    c.passed();
    let report = c.json();
    let p = &route(&report)["proxy"];
    assert_eq!(p["url"], proxy.url());
    assert_eq!(p["credentials"], "none");
    assert_eq!(p["request"], format!("CONNECT {target}"));
    assert_eq!(p["answer"], "200 Connection established");
    assert_eq!(p["bypassed_by"], Value::Null);
    assert_eq!(route(&report)["dns"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_a_proxy_that_wants_credentials() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("alice", "s3cret")
        .start()
        .await;
    let target = format!("{UPSTREAM_NAME}:{}", up.port());
    let c = run_check(check_cmd(&pki, &target).args(["--proxy", &proxy.url()])).await;
    c.failed().verdict_says(&[
        "proxy authentication required",
        "407",
        "MTLS_SIDECAR_PROXY_AUTH_FILE",
    ]);

    let wrong = proxy.url_with_userinfo("alice:wrong");
    let c = run_check(check_cmd(&pki, &target).args(["--proxy", &wrong])).await;
    c.failed()
        .verdict_says(&["proxy authentication failed", "in the proxy URL"]);
    assert!(
        !c.out.contains("wrong"),
        "the password was printed:\n{}",
        c.out
    );
    assert_eq!(up.stats.tls_accepted(), 0, "no tunnel was opened");
}

#[tokio::test(flavor = "multi_thread")]
async fn explains_an_unreachable_proxy_and_a_refusing_one() {
    let pki = Pki::new();
    let port = free_port();
    let c = run_check(
        check_cmd(&pki, format!("{UPSTREAM_NAME}:443"))
            .args(["--proxy", &format!("http://127.0.0.1:{port}")]),
    )
    .await;
    c.failed().verdict_says(&[
        &format!("cannot connect to the proxy http://127.0.0.1:{port}"),
        "is the proxy running",
    ]);

    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::Status(403))
        .start()
        .await;
    let c =
        run_check(check_cmd(&pki, format!("{UPSTREAM_NAME}:443")).args(["--proxy", &proxy.url()]))
            .await;
    c.failed()
        .verdict_says(&["refused CONNECT", "403", "does not allow this destination"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_a_no_proxy_bypass() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = ConnectProxy::start().await;
    let c = run_check(check_cmd(&pki, format!("127.0.0.1:{}", up.port())).args([
        "--server-name",
        "localhost",
        "--proxy",
        &proxy.url(),
        "--no-proxy",
        "example.com,127.0.0.0/8",
    ]))
    .await;
    c.passed()
        .verdict_says(&["PASS"])
        .has(&format!(
            "proxy            {} bypassed: --no-proxy entry \"127.0.0.0/8\" matches the upstream host",
            proxy.url()
        ))
        .has(&format!("connected        127.0.0.1:{}", up.port()));
    assert_eq!(proxy.stats().accepted(), 0, "the proxy was used");
}
