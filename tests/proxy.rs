//! Egress through an HTTP CONNECT proxy (`--proxy`, `--proxy-ca`, `--proxy-auth-file`,
//! `--no-proxy`, `--proxy-from-env`), against the in-test proxy of `support::connect_proxy`.
//!
//! The upstream is addressed as `upstream.mtls-test.invalid`, a name that never resolves on the
//! test machine: only the proxy's own name map knows it, so a working connection proves that
//! the name went to the proxy unresolved. Its certificate is valid for that name only.
//!
//! - success: tcp mode through http:// and https:// proxies, byte integrity both ways, the exact
//!   CONNECT request, SNI and client certificate at the upstream; a `200` head in tiny pieces;
//!   IPv6 targets in brackets; a scheme-less proxy address
//! - credentials: from the URL (percent-decoded), `--proxy-auth-file`, the environment; `407`
//!   without and with wrong credentials; rotation of the file after a `407`; never logged
//! - bypass: `--no-proxy` with CIDRs, names, subdomains, leading and trailing dots, `*`;
//!   non-matching lists still use the proxy; `--proxy-from-env` with `HTTPS_PROXY` / `NO_PROXY`
//!   (never `HTTP_PROXY` / `ALL_PROXY`), explicit flags winning, ignored without the flag
//! - failures: unreachable proxy (also on the default ports 80/443), `403`/`502`, non-HTTP
//!   answers, early close, oversized heads, an untrusted, misnamed, client-cert-wanting or
//!   silent https proxy, a proxy that never answers, one `--connect-timeout` over every step;
//!   each with its `reason=`, outcome and metrics, and later connections unaffected
//! - `--mode http` through the proxy (few tunnels for many requests, `502`/`504` answers),
//!   config files (proxied, bypassing, https and from-env routes; a bad `proxy` key), startup
//!   errors (exit 2, never echoing a password)

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::admin::{Metrics, admin_addr, scrape_until};
use crate::support::connect_proxy::*;
use crate::support::files::atomic_write;
use crate::support::http::*;
use crate::support::pki::{CLIENT_CN, Identity, LeafSpec};
use crate::support::refused::{accepted, assert_failed, refused};
use crate::support::upstream::{Conn, server_config};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers

const CONNS: &str = "mtls_sidecar_connections_total";
/// Failed connections by `reason` (README, "Metrics").
const FAILURES: &str = "mtls_sidecar_connection_failures_total";

/// `upstream.mtls-test.invalid:PORT`.
fn target(port: u16) -> String {
    format!("{UPSTREAM_NAME}:{port}")
}

/// `run` towards `upstream.mtls-test.invalid:PORT` through `proxy_url`.
fn via(pki: &Pki, up: &Upstream, proxy_url: &str) -> Cmd {
    run_cmd(pki, target(up.port())).args(["--proxy", proxy_url])
}

/// A separate CA for the https proxy and a certificate (`localhost`, 127.0.0.1) from it.
fn proxy_pki(pki: &Pki) -> (crate::support::pki::Ca, Identity) {
    let ca = pki.new_ca("proxy-ca", "mtls-sidecar test proxy CA");
    let id = pki.leaf(&ca, "proxy", LeafSpec::server());
    (ca, id)
}

/// Checks that `req` is exactly the CONNECT for `target`.
fn assert_connect(req: &ProxyRequest, target: &str) {
    assert_eq!(
        req.request_line,
        format!("CONNECT {target} HTTP/1.1"),
        "the request line the proxy got: {req:#?}"
    );
    assert_eq!(
        req.header("host"),
        Some(target),
        "the Host header of the CONNECT: {req:#?}"
    );
    assert_eq!(req.version, "HTTP/1.1", "{req:#?}");
    assert_eq!(
        req.all("host").len(),
        1,
        "one Host header in the CONNECT: {req:#?}"
    );
}

/// What the upstream saw of a connection that came through: our SNI and client certificate.
fn assert_named_conn(conn: &Conn) {
    assert_eq!(conn.sni.as_deref(), Some(UPSTREAM_NAME), "{conn:?}");
    assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN), "{conn:?}");
}

fn conn_count(sidecar: &Sidecar) -> usize {
    sidecar.count_lines(is_conn_line)
}

/// One connection that may work or be refused: writes `data` and half-closes (write errors are
/// fine), reads until closed. Returns what came back and the connection's log line.
async fn attempt(sidecar: &mut Sidecar, data: &[u8]) -> (Vec<u8>, String) {
    let before = conn_count(sidecar);
    let (mut rd, mut wr) = connect(sidecar.addr()).await.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&data).await;
        let _ = wr.shutdown().await;
        wr
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was neither served nor closed within {WAIT:?}"),
        }
    }
    writer.abort();
    let line = sidecar.wait_conn_lines(before + 1)[before].clone();
    (got, line)
}

/// Whether the log line's text (message or `error=`) contains `needle`, case-insensitively.
fn says(line: &str, needle: &str) -> bool {
    line.to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}

/// `--admin 127.0.0.1:0` metrics: waits until `connections_total{outcome}` reaches `n`.
async fn wait_outcome(admin: std::net::SocketAddr, outcome: &str, n: f64) -> Metrics {
    let m = scrape_until(admin, |m| {
        m.count(CONNS, &[("route", "default"), ("outcome", outcome)]) >= n
    })
    .await;
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", outcome)]),
        n,
        "{CONNS}{{outcome=\"{outcome}\"}}:\n{}",
        m.text
    );
    m
}

/// Writes `user:pass\n` to a file in the PKI directory.
fn auth_file(pki: &Pki, name: &str, user: &str, pass: &str) -> PathBuf {
    pki.write(name, format!("{user}:{pass}\n"))
}

/// Fails if `secret` (or the Basic credentials built from it) appears anywhere in stderr.
fn assert_not_logged(sidecar: &Sidecar, user: &str, pass: &str) {
    let stderr = sidecar.stderr();
    let b64 = base64(format!("{user}:{pass}").as_bytes());
    for (what, needle) in [
        ("the password", pass.to_string()),
        ("the base64 credentials", b64),
        ("the base64 password", base64(pass.as_bytes())),
    ] {
        if stderr.contains(&needle) {
            sidecar.fail(&format!("{what} ({needle}) appears in stderr"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Through the proxy

/// tcp mode through an http:// proxy to a name only the proxy can resolve: bytes intact both
/// ways, exactly one `CONNECT name:port` with a matching Host and no credentials, our SNI and
/// client certificate at the upstream, `outcome=ok`.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_through_an_http_proxy_to_a_name_only_it_resolves() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();

    let data = pattern(11, 300_000);
    let got = exchange(sidecar.addr(), data.clone()).await;
    assert!(
        got == data,
        "echo through the proxy altered or cut ({} of {} bytes back)",
        got.len(),
        data.len()
    );
    let line = sidecar.wait_conn_lines(1)[0].clone();
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(num_field(&line, "bytes_to_upstream"), 300_000, "{line}");
    assert_eq!(num_field(&line, "bytes_from_upstream"), 300_000, "{line}");

    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_connect(&requests[0], &target(up.port()));
    assert_eq!(
        requests[0].proxy_authorization(),
        None,
        "credentials sent though none were configured"
    );
    assert!(
        requests[0]
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("mtls-sidecar/")),
        "User-Agent of the CONNECT: {:#?}",
        requests[0]
    );
    assert_eq!(proxy.stats().tunnels(), 1);
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_named_conn(&conns[0]);
    let finished = up.stats.wait_finished(1).await;
    assert_eq!(finished[0].received, 300_000);
    assert_eq!(finished[0].sha256, sha256(&data));
}

/// An https:// proxy verified with `--proxy-ca` (a CA of its own, not the upstream's), or
/// `MTLS_SIDECAR_PROXY_CA`: the upstream handshake runs inside the proxy's TLS.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_through_an_https_proxy_verified_with_proxy_ca() {
    let pki = Pki::new();
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .start()
        .await;
    assert!(proxy.url().starts_with("https://127.0.0.1:"));
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);

    let mut by_env = via(&pki, &up, &proxy.url())
        .env("MTLS_SIDECAR_PROXY_CA", &proxy_ca.pem)
        .start();
    let conn = accepted(&mut by_env, &up).await;
    assert_named_conn(&conn);
    let requests = proxy.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for req in &requests {
        assert_connect(req, &target(up.port()));
    }
    assert_eq!(proxy.stats().tls_failures.load(Ordering::SeqCst), 0);
}

/// Bytes that arrive in the same segment as the proxy's `200` head belong to the tunnel: here
/// they are a TLS alert record, which the upstream handshake must see at once (`reason=protocol`
/// naming the alert). Were they dropped, the handshake would wait for a ServerHello the silent
/// proxy never sends and end in `reason=timeout`. Through an http:// proxy (socket buffer) and
/// an https:// one (bytes read past the head out of the proxy's TLS stream).
#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_the_200_head_reach_the_upstream_handshake() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let mut answer = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
    // alert(21), TLS 1.2 record, length 2: fatal(2) handshake_failure(40)
    answer.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    let behavior = ProxyBehavior::Raw {
        bytes: answer,
        close: false,
    };
    for tls in [false, true] {
        let mut builder = ConnectProxy::builder().behavior(behavior.clone());
        if tls {
            builder = builder.tls_identity(&proxy_id);
        }
        let proxy = builder.start().await;
        let mut sidecar = via(&pki, &up, &proxy.url())
            .arg("--proxy-ca")
            .arg(&proxy_ca.pem)
            .args(["--connect-timeout", "10s"])
            .start();
        let started = Instant::now();
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "tls_error", "protocol");
        assert!(line.contains("HandshakeFailure"), "tls={tls}: {line}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "tls={tls}: the alert was not seen at once ({:?}): {line}",
            started.elapsed()
        );
        assert_eq!(proxy.connects(), 1, "tls={tls}");
    }
}

/// An https:// proxy whose certificate `--proxy-ca` does not lead to (nor the system store):
/// `reason=proxy_tls`, `outcome=tls_error`, no CONNECT sent.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_with_an_untrusted_certificate_is_proxy_tls() {
    let pki = Pki::new();
    let (_proxy_ca, proxy_id) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .start()
        .await;
    // The upstream's CA is trusted for the upstream, not for the proxy.
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-ca")
        .arg(&pki.ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    proxy.stats().wait_tls_failures(1).await;
    let errors = proxy.stats().tls_errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("UnknownCA") || e.contains("unknown")),
        "the proxy's handshake did not fail for our distrust of its certificate: {errors:?}"
    );

    let mut system = via(&pki, &up, &proxy.url()).start();
    let line = refused(&mut system, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    proxy.stats().wait_tls_failures(2).await;
    assert_eq!(proxy.stats().request_count(), 0, "{:#?}", proxy.requests());
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// An https proxy whose certificate comes from `--proxy-ca` but is for another name than the
/// URL's host, and one that insists on a client certificate (none is offered to a proxy):
/// `reason=proxy_tls` both.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_with_the_wrong_name_or_wanting_a_client_cert_is_proxy_tls() {
    let pki = Pki::new();
    let (proxy_ca, _) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let other_name = pki.leaf(
        &proxy_ca,
        "proxy-other-name",
        LeafSpec {
            cn: "proxy.other.example",
            names: &["proxy.other.example"],
            uris: &[],
            client: false,
            validity: None,
        },
    );
    let wrong_name = ConnectProxy::builder()
        .tls_identity(&other_name)
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &wrong_name.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    wrong_name.stats().wait_tls_failures(1).await;
    assert_eq!(wrong_name.stats().request_count(), 0);

    // Wants a client certificate from our test CA; TLS 1.3 tells the client after its side of
    // the handshake is done, when it reads the answer to its CONNECT.
    let proxy_id = pki.leaf(&proxy_ca, "proxy-mtls", LeafSpec::server());
    let wants_cert = ConnectProxy::builder()
        .tls(server_config(&proxy_id, &[&pki.ca.der]))
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &wants_cert.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    wants_cert.stats().wait_tls_failures(1).await;
    assert_eq!(wants_cert.stats().request_count(), 0);
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// The `200` head arrives one byte per segment: still one tunnel that works.
#[tokio::test(flavor = "multi_thread")]
async fn a_200_head_in_tiny_pieces_still_opens_the_tunnel() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::TunnelSplitHeader)
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    assert_eq!(proxy.stats().tunnels(), 1);
}

/// `--upstream [::1]:PORT` is asked for in brackets, as written (the proxy resolves it; here
/// to 127.0.0.1); `--server-name` still decides SNI and verification.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_upstream_is_asked_for_in_brackets() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .resolve("::1", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, format!("[::1]:{}", up.port()))
        .args(["--server-name", UPSTREAM_NAME, "--proxy", &proxy.url()])
        .start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    assert_connect(&proxy.requests()[0], &format!("[::1]:{}", up.port()));
}

/// `--proxy 127.0.0.1:PORT` without a scheme means http://.
#[tokio::test(flavor = "multi_thread")]
async fn scheme_less_proxy_means_http() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.addr.to_string()).start();
    accepted(&mut sidecar, &up).await;
    assert_connect(&proxy.requests()[0], &target(up.port()));
}

// ---------------------------------------------------------------------------------------------
// Credentials

/// Credentials in the URL, percent-encoded (`%40` is `@`, `%3A` is `:`), reach the proxy
/// decoded, as Basic.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_url_are_percent_decoded() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("alice", "p@ss:w0rd")
        .start()
        .await;
    let url = proxy.url_with_userinfo("alice:p%40ss%3Aw0rd");
    let mut sidecar = via(&pki, &up, &url).start();
    accepted(&mut sidecar, &up).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(
        requests[0].proxy_authorization(),
        Some(&*basic("alice", "p@ss:w0rd"))
    );
    assert_connect(&requests[0], &target(up.port()));
    assert_not_logged(&sidecar, "alice", "p@ss:w0rd");
}

/// `--proxy-auth-file` (one trailing newline ignored), and the same through
/// `MTLS_SIDECAR_PROXY` + `MTLS_SIDECAR_PROXY_AUTH_FILE`.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_auth_file_flag_and_environment() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("bob", "s3cret-file")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "bob", "s3cret-file");

    let mut by_flag = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .start();
    accepted(&mut by_flag, &up).await;

    let mut by_env = run_cmd(&pki, target(up.port()))
        .env("MTLS_SIDECAR_PROXY", proxy.url())
        .env("MTLS_SIDECAR_PROXY_AUTH_FILE", &file)
        .start();
    accepted(&mut by_env, &up).await;

    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for req in &requests {
        assert_eq!(
            req.proxy_authorization(),
            Some(&*basic("bob", "s3cret-file")),
            "{req:#?}"
        );
    }
    assert_eq!(proxy.stats().auth_refused.load(Ordering::SeqCst), 0);
}

/// No credentials and a proxy that wants some: `407` is `reason=proxy_auth`,
/// `outcome=connect_error`, "proxy authentication required"; the proxy's connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_407_without_credentials_is_proxy_auth_required() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("carol", "unknown-to-sidecar")
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");
    assert!(
        says(&line, "proxy authentication required"),
        "no \"proxy authentication required\" in: {line}"
    );
    assert_eq!(proxy.stats().auth_refused.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.requests()[0].proxy_authorization(), None);
    proxy.stats().wait_closed_by_client(1).await;
}

/// Credentials the proxy refuses: "proxy authentication failed", and they are not logged.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_407_with_wrong_credentials_is_proxy_auth_failed() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("dave", "right-password")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "dave", "Wr0ng-Passw0rd");
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");
    assert!(
        says(&line, "proxy authentication failed"),
        "no \"proxy authentication failed\" in: {line}"
    );
    assert_eq!(
        proxy.requests()[0].proxy_authorization(),
        Some(&*basic("dave", "Wr0ng-Passw0rd"))
    );
    proxy.stats().wait_closed_by_client(1).await;
    assert_not_logged(&sidecar, "dave", "Wr0ng-Passw0rd");
}

/// The proxy's password is rotated and the auth file with it: after at most one `407` (the
/// file is read again then), connections use the new credentials, without a restart and with
/// `--reload-interval 0` (no polling to help).
#[tokio::test(flavor = "multi_thread")]
async fn rotated_credentials_in_the_auth_file_are_used_after_a_407() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("erin", "old-pass-1")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "erin", "old-pass-1");
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .args(["--reload-interval", "0"])
        .start();
    accepted(&mut sidecar, &up).await;

    proxy.set_credentials("erin", "new-pass-2");
    atomic_write(&file, "erin:new-pass-2\n");

    // The first connection after the rotation may still carry the old credentials.
    let data = pattern(5, 2000);
    let (got, line) = attempt(&mut sidecar, &data).await;
    if field(&line, "outcome") == Some("ok") {
        assert!(got == data, "echo altered: {line}");
    } else {
        assert!(
            got.is_empty(),
            "bytes back from a refused connection: {line}"
        );
        assert_failed(&line, "connect_error", "proxy_auth");
        assert!(says(&line, "proxy authentication failed"), "{line}");
    }
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let requests = proxy.requests();
    assert_eq!(
        requests.last().and_then(|r| r.proxy_authorization()),
        Some(&*basic("erin", "new-pass-2")),
        "{requests:#?}"
    );
    assert!(
        proxy.stats().auth_refused.load(Ordering::SeqCst) <= 1,
        "more than one 407 after the rotation: {requests:#?}"
    );
}

/// At `--log-level trace`, through a good connection and a refused one, neither the password
/// nor its base64 forms appear in stderr: from the auth file or from the URL.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_appear_in_stderr_at_trace() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("frank", "Tr4ce-F1le-Secret")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "frank", "Tr4ce-F1le-Secret");
    let mut from_file = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .args(["--log-level", "trace"])
        .env("RUST_LOG", "trace")
        .start();
    accepted(&mut from_file, &up).await;

    let url = proxy.url_with_userinfo("frank:Tr4ce-Url-Secret");
    let mut from_url = via(&pki, &up, &url).args(["--log-level", "trace"]).start();
    // Refused: the proxy wants the file's password.
    let line = refused(&mut from_url, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");

    proxy.set_credentials("frank", "Tr4ce-Url-Secret");
    accepted(&mut from_url, &up).await;
    proxy.set_credentials("frank", "something-else");
    let line = refused(&mut from_file, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");

    assert_not_logged(&from_file, "frank", "Tr4ce-F1le-Secret");
    assert_not_logged(&from_url, "frank", "Tr4ce-Url-Secret");
}

// ---------------------------------------------------------------------------------------------
// Bypass

/// `--no-proxy 127.0.0.0/8` with an IP-literal upstream, `.localhost` (leading dot, any case)
/// and `localhost.` (trailing dot) with `localhost`, `*`, and a single address in `MTLS_SIDECAR_NO_PROXY`: direct
/// connections, and the proxy (which would refuse) sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_matches_go_direct() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::Status(403))
        .start()
        .await;
    let cases = [
        (up.addr.to_string(), "127.0.0.0/8"),
        (format!("localhost:{}", up.port()), "example.com,.LocalHost"),
        (format!("localhost:{}", up.port()), "localhost."),
        (format!("localhost:{}", up.port()), "*"),
    ];
    for (upstream, list) in cases {
        let mut sidecar = run_cmd(&pki, &upstream)
            .args(["--proxy", &proxy.url(), "--no-proxy", list])
            .start();
        accepted(&mut sidecar, &up).await;
        assert_eq!(
            proxy.stats().accepted(),
            0,
            "--upstream {upstream} --no-proxy {list} went to the proxy: {:#?}",
            proxy.requests()
        );
    }
    let mut by_env = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_PROXY", proxy.url())
        .env("MTLS_SIDECAR_NO_PROXY", "10.0.0.0/8,127.0.0.1")
        .start();
    accepted(&mut by_env, &up).await;
    assert_eq!(
        proxy.stats().accepted(),
        0,
        "MTLS_SIDECAR_NO_PROXY=10.0.0.0/8,127.0.0.1 went to the proxy: {:#?}",
        proxy.requests()
    );
}

/// `--no-proxy MTLS-TEST.invalid` covers its subdomain `upstream.mtls-test.invalid` (any
/// case): the sidecar dials it itself, which fails to resolve (`reason=dns`), and the proxy
/// sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_domain_covers_subdomains() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--no-proxy", "MTLS-TEST.invalid"])
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "dns");
    assert_eq!(proxy.stats().accepted(), 0, "{:#?}", proxy.requests());
}

/// Lists that do not match still use the proxy: a suffix that is not a domain boundary
/// (`test.invalid`, `notupstream.mtls-test.invalid`), other names, and IPs/CIDRs (which never
/// match a host name, even one that would resolve into them).
#[tokio::test(flavor = "multi_thread")]
async fn non_matching_no_proxy_still_uses_the_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .resolve("localhost", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args([
            "--no-proxy",
            "test.invalid,notupstream.mtls-test.invalid,example.com,127.0.0.0/8,::1",
        ])
        .start();
    accepted(&mut sidecar, &up).await;
    assert_connect(&proxy.requests()[0], &target(up.port()));

    // `localhost` is a name: 127.0.0.0/8 and ::1 do not cover it.
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut by_name = run_cmd(&pki, format!("localhost:{}", local.port()))
        .args(["--proxy", &proxy.url(), "--no-proxy", "127.0.0.0/8,::1"])
        .start();
    accepted(&mut by_name, &local).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_connect(&requests[1], &format!("localhost:{}", local.port()));
}

/// `--proxy-from-env` takes `HTTPS_PROXY` (or `https_proxy`; the upper-case one first) and
/// `NO_PROXY` (or `no_proxy`), never `HTTP_PROXY` or `ALL_PROXY`;
/// `MTLS_SIDECAR_PROXY_FROM_ENV=true` is the same as the flag.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_from_env_reads_https_proxy_and_no_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;

    let mut upper = run_cmd(&pki, target(up.port()))
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "example.com")
        .start();
    accepted(&mut upper, &up).await;
    let mut lower = run_cmd(&pki, target(up.port()))
        .env("MTLS_SIDECAR_PROXY_FROM_ENV", "true")
        .env("https_proxy", proxy.url())
        .start();
    accepted(&mut lower, &up).await;
    // Both spellings: the upper-case one first.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut both = run_cmd(&pki, target(up.port()))
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", proxy.url())
        .env("https_proxy", &dead)
        .start();
    accepted(&mut both, &up).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for req in &requests {
        assert_connect(req, &target(up.port()));
    }

    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    for no_proxy in ["NO_PROXY", "no_proxy"] {
        let mut bypass = run_cmd(&pki, local.addr)
            .arg("--proxy-from-env")
            .env("HTTPS_PROXY", proxy.url())
            .env(no_proxy, "127.0.0.0/8")
            .start();
        accepted(&mut bypass, &local).await;
        assert_eq!(
            proxy.stats().accepted(),
            3,
            "{no_proxy}=127.0.0.0/8 did not bypass: {:#?}",
            proxy.requests()
        );
    }

    // HTTP_PROXY and ALL_PROXY are not for a TLS upstream: a direct connection.
    let mut plain_vars = run_cmd(&pki, local.addr)
        .arg("--proxy-from-env")
        .env("HTTP_PROXY", proxy.url())
        .env("ALL_PROXY", proxy.url())
        .env("http_proxy", proxy.url())
        .env("all_proxy", proxy.url())
        .start();
    accepted(&mut plain_vars, &local).await;
    assert_eq!(
        proxy.stats().accepted(),
        3,
        "HTTP_PROXY / ALL_PROXY were used: {:#?}",
        proxy.requests()
    );
}

/// Explicit `--proxy` and `--no-proxy` win over `HTTPS_PROXY` and `NO_PROXY`.
#[tokio::test(flavor = "multi_thread")]
async fn explicit_flags_win_over_the_environment() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", &dead)
        .start();
    accepted(&mut sidecar, &up).await;
    assert_eq!(proxy.requests().len(), 1);

    // NO_PROXY would bypass 127.0.0.1; --no-proxy example.com does not.
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut sidecar = run_cmd(&pki, local.addr)
        .args(["--proxy-from-env", "--no-proxy", "example.com"])
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "127.0.0.0/8")
        .start();
    accepted(&mut sidecar, &local).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_connect(&requests[1], &local.addr.to_string());
}

/// Without `--proxy-from-env` the proxy variables mean nothing: a direct connection.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_variables_are_ignored_without_proxy_from_env() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::Status(403))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, up.addr)
        .env("HTTPS_PROXY", proxy.url())
        .env("https_proxy", proxy.url())
        .env("HTTP_PROXY", proxy.url())
        .env("ALL_PROXY", proxy.url())
        .start();
    accepted(&mut sidecar, &up).await;
    assert_eq!(proxy.stats().accepted(), 0);
}

// ---------------------------------------------------------------------------------------------
// Failures

/// Nothing listens where the proxy should be, or its name does not resolve:
/// `reason=proxy_unreachable`, counted as `connect_error`.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_down_is_proxy_unreachable_and_counted() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut sidecar = via(&pki, &up, &dead)
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_unreachable");
    let m = wait_outcome(admin, "connect_error", 1.0).await;
    assert_eq!(
        m.count(
            FAILURES,
            &[("route", "default"), ("reason", "proxy_unreachable")]
        ),
        1.0,
        "{FAILURES}{{reason=\"proxy_unreachable\"}}:\n{}",
        m.text
    );
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        0.0
    );

    let mut unresolvable = via(&pki, &up, "http://proxy.mtls-test.invalid:3128").start();
    let line = refused(&mut unresolvable, &up).await;
    assert_failed(&line, "connect_error", "proxy_unreachable");
}

/// `403` and `502` from the proxy are `reason=proxy_refused` naming the status; the next
/// connection, which the proxy lets through, works.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_403_and_502_are_proxy_refused_and_later_connections_work() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .script(vec![
            ProxyBehavior::Status(403),
            ProxyBehavior::Status(502),
            ProxyBehavior::Tunnel,
        ])
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    for code in ["403", "502"] {
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "connect_error", "proxy_refused");
        assert!(says(&line, code), "the status {code} is not named: {line}");
    }
    proxy.stats().wait_closed_by_client(2).await;
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let m = wait_outcome(admin, "connect_error", 2.0).await;
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        1.0
    );
}

/// Answers that are not a complete HTTP head are `reason=proxy_protocol`, `outcome=error`:
/// a non-HTTP line (connection kept open), TLS bytes then close, a close before any answer, a
/// head cut by a close, a head over 16 KiB (kept open). None waits for the connect timeout;
/// the next connection works.
#[tokio::test(flavor = "multi_thread")]
async fn broken_answers_are_proxy_protocol() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let mut huge = b"HTTP/1.1 200 Connection established\r\n".to_vec();
    while huge.len() < 24 * 1024 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let script = vec![
        ProxyBehavior::Raw {
            bytes: b"SSH-2.0-OpenSSH_9.6 not an http proxy\r\n\r\n".to_vec(),
            close: false,
        },
        ProxyBehavior::Raw {
            // A TLS alert: an https proxy dialled as http://.
            bytes: vec![0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46],
            close: true,
        },
        ProxyBehavior::CloseWithoutAnswer,
        ProxyBehavior::Raw {
            bytes: b"HTTP/1.1 200 Connection estab".to_vec(),
            close: true,
        },
        ProxyBehavior::Raw {
            bytes: huge,
            close: false,
        },
        ProxyBehavior::Tunnel,
    ];
    let cases = script.len() - 1;
    let proxy = ConnectProxy::builder().script(script).start().await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--admin", "127.0.0.1:0", "--connect-timeout", "8s"])
        .start();
    let admin = admin_addr(&mut sidecar);
    for case in 0..cases {
        let started = Instant::now();
        let line = refused(&mut sidecar, &up).await;
        assert_eq!(
            field(&line, "reason"),
            Some("proxy_protocol"),
            "case {case}: {line}"
        );
        assert_failed(&line, "error", "proxy_protocol");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "case {case} took {:?}: {line}",
            started.elapsed()
        );
    }
    // The two kept open are closed by the sidecar.
    proxy.stats().wait_closed_by_client(2).await;
    accepted(&mut sidecar, &up).await;
    let m = wait_outcome(admin, "error", cases as f64).await;
    assert_eq!(
        m.count(
            FAILURES,
            &[("route", "default"), ("reason", "proxy_protocol")]
        ),
        cases as f64,
        "{FAILURES}{{reason=\"proxy_protocol\"}}:\n{}",
        m.text
    );
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(proxy.stats().tunnels(), 1);
}

/// A proxy that accepts and never answers: `reason=timeout` after `--connect-timeout 500ms`
/// (the message names the proxy), the held connection is closed, and the next connection
/// works.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_that_never_answers_times_out() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .script(vec![ProxyBehavior::Hang, ProxyBehavior::Tunnel])
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--connect-timeout", "500ms", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    let started = Instant::now();
    let line = refused(&mut sidecar, &up).await;
    let took = started.elapsed();
    assert_failed(&line, "timeout", "timeout");
    assert!(
        says(&line, "proxy"),
        "the timeout does not name the proxy: {line}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "refused after {took:?} with --connect-timeout 500ms"
    );
    let ms = num_field(&line, "duration_ms");
    assert!((450..3000).contains(&ms), "duration_ms={ms}: {line}");
    proxy.stats().wait_closed_by_client(1).await;
    wait_outcome(admin, "timeout", 1.0).await;
    // Not stuck: the next connection goes through.
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
}

/// A slow proxy (its `200` after 1.4 s) in front of an upstream that never answers the TLS
/// handshake: `--connect-timeout 2s` bounds the whole sequence, not each step (which would
/// take 3.4 s).
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_proxy_and_upstream_handshake_together() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::TunnelAfter(Duration::from_millis(1400)))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, target(silent.addr.port()))
        .args(["--proxy", &proxy.url(), "--connect-timeout", "2s"])
        .start();
    let started = Instant::now();
    let mut stream = connect(sidecar.addr()).await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let took = started.elapsed();
    let line = sidecar.wait_conn_lines(1)[0].clone();
    assert_failed(&line, "timeout", "timeout");
    assert_eq!(
        proxy.stats().tunnels(),
        1,
        "the tunnel was not opened: {line}"
    );
    assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "closed after {took:?}: --connect-timeout 2s must cover the 1.4 s at the proxy and the \
         upstream handshake together"
    );
}

/// Without a port, http:// means 80 and https:// 443 (where nothing listens in the test
/// environment: `proxy_unreachable`, naming the address). Skipped when something does listen.
#[tokio::test(flavor = "multi_thread")]
async fn default_proxy_ports_are_80_and_443() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    for (url, port) in [("http://127.0.0.1", 80), ("https://127.0.0.1", 443)] {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if !matches!(probe, Ok(Err(_))) {
            eprintln!("skipped {url}: something listens on 127.0.0.1:{port}");
            continue;
        }
        let mut sidecar = via(&pki, &up, url).start();
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "connect_error", "proxy_unreachable");
        assert!(
            field(&line, "error").is_some_and(|e| e.contains(&format!("127.0.0.1:{port}"))),
            "--proxy {url}: the error does not name 127.0.0.1:{port}: {line}"
        );
    }
}

/// An https proxy that accepts TCP and never answers the TLS handshake: the same timeout.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_silent_in_the_handshake_times_out() {
    let pki = Pki::new();
    let (proxy_ca, _) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let silent = Silent::start().await;
    let mut sidecar = via(&pki, &up, &format!("https://{}", silent.addr))
        .args(["--connect-timeout", "500ms", "--proxy-ca"])
        .arg(&proxy_ca.pem)
        .start();
    let started = Instant::now();
    let line = refused(&mut sidecar, &up).await;
    let took = started.elapsed();
    assert_failed(&line, "timeout", "timeout");
    assert!(
        says(&line, "proxy"),
        "the timeout does not name the proxy: {line}"
    );
    assert!(
        took < Duration::from_secs(3),
        "refused after {took:?} with --connect-timeout 500ms"
    );
    assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// HTTP mode

fn get_req(id: &str) -> hyper::Request<Body> {
    h1_req("GET", "/")
        .header("x-request-id", id)
        .body(empty())
        .unwrap()
}

/// `--mode http` through an authenticating proxy: requests succeed, six of them reuse one or
/// two tunnels, the upstream sees its own name as Host and never the proxy credentials.
#[tokio::test(flavor = "multi_thread")]
async fn http_mode_through_the_proxy_reuses_tunnels() {
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = HttpUpstream::with_config(config, Alpn::H2AndHttp11).await;
    let proxy = ConnectProxy::builder()
        .credentials("grace", "http-mode-pw")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "grace", "http-mode-pw");
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &proxy.url(), "--proxy-auth-file"])
        .arg(&file)
        .start();
    for i in 0..6 {
        let reply = h1_call(sidecar.addr(), get_req(&format!("through-{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    let connects = proxy.connects();
    assert!(
        (1..=2).contains(&connects),
        "{connects} CONNECTs for 6 requests: {:#?}",
        proxy.requests()
    );
    assert_eq!(
        up.stats.tls_accepted(),
        proxy.stats().tunnels(),
        "every upstream connection came through a tunnel"
    );
    for req in proxy.requests() {
        assert_connect(&req, &target(up.port()));
        assert_eq!(
            req.proxy_authorization(),
            Some(&*basic("grace", "http-mode-pw"))
        );
    }
    for seen in up.stats.requests() {
        assert_eq!(seen.host(), Some(&*target(up.port())), "{seen:#?}");
        assert_eq!(seen.get("proxy-authorization"), None, "{seen:#?}");
    }
    for conn in up.stats.conns() {
        assert_eq!(conn.sni.as_deref(), Some(UPSTREAM_NAME));
        assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN));
    }
    assert_not_logged(&sidecar, "grace", "http-mode-pw");
}

/// In `--mode http` a `407` is a `502` whose body names `proxy_auth`; a proxy that never
/// answers is a `504` (`timeout`).
#[tokio::test(flavor = "multi_thread")]
async fn http_mode_proxy_failures_are_502_and_504() {
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = HttpUpstream::with_config(config, Alpn::H2AndHttp11).await;
    let auth = ConnectProxy::builder()
        .credentials("heidi", "not-given")
        .start()
        .await;
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &auth.url()])
        .start();
    let reply = h1_call(sidecar.addr(), get_req("auth")).await;
    assert_reply_is_sidecar_error(&reply, 502, "proxy_auth");
    assert!(
        says(&reply.text(), "refused the credentials"),
        "{:?}",
        reply.text()
    );
    let mut h2 = H2Client::connect(sidecar.addr()).await;
    let reply = h2.call(h2_req("GET", "/").body(empty()).unwrap()).await;
    assert_reply_is_sidecar_error(&reply, 502, "proxy_auth");
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
    assert!(
        auth.connects() <= 4,
        "{} CONNECTs for two requests (one retry each at most): {:#?}",
        auth.connects(),
        auth.requests()
    );

    let hang = ConnectProxy::builder()
        .behavior(ProxyBehavior::Hang)
        .start()
        .await;
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &hang.url(), "--connect-timeout", "500ms"])
        .start();
    let started = Instant::now();
    let reply = h1_call(sidecar.addr(), get_req("hang")).await;
    assert_reply_is_sidecar_error(&reply, 504, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "504 after {:?}",
        started.elapsed()
    );
    assert_eq!(up.stats.request_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Config file

/// A TOML basic string.
fn q(s: &str) -> String {
    format!("{s:?}")
}

/// Starts `run --config PATH` and waits for the listening line of each route in `names`.
fn start_routes(
    cmd: Cmd,
    names: &[&str],
) -> (
    Sidecar,
    std::collections::HashMap<String, std::net::SocketAddr>,
) {
    let mut sidecar = cmd.spawn();
    let mut addrs = std::collections::HashMap::new();
    for name in names {
        let line = sidecar.wait_for_line(&format!("route {name} listening"), WAIT, |l| {
            l.contains("listening")
                && !l.contains("admin listening")
                && field(l, "route") == Some(name)
                && field(l, "addr").is_some()
        });
        let addr = field(&line, "addr").unwrap();
        let addr = addr
            .parse()
            .unwrap_or_else(|e| sidecar.fail(&format!("addr={addr}: {e}")));
        addrs.insert(name.to_string(), addr);
    }
    (sidecar, addrs)
}

/// A TOML basic string holding a path.
fn qp(p: &std::path::Path) -> String {
    q(p.to_str().expect("UTF-8 temp path"))
}

/// Four routes: `[defaults]` sets an authenticating http proxy and its credentials file;
/// route `via` uses them towards a name only the proxy knows, `direct` bypasses them with
/// `no_proxy`, `tls` sets its own https proxy and `proxy_ca`, `env` takes its proxy from
/// `HTTPS_PROXY` with `proxy_from_env = true`.
#[tokio::test(flavor = "multi_thread")]
async fn config_file_routes_through_and_around_the_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let proxy = ConnectProxy::builder()
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let tls_proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let env_proxy = ConnectProxy::builder()
        .credentials("ivan", "config-pw")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "ivan", "config-pw");
    let named = q(&target(up.port()));
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\nproxy = {}\nproxy_auth_file = {}\n\
         \n[[route]]\nname = \"via\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         \n[[route]]\nname = \"direct\"\nlisten = \"127.0.0.1:0\"\nupstream = {}\n\
         no_proxy = \"127.0.0.0/8\"\n\
         \n[[route]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         proxy = {}\nproxy_ca = {}\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        q(&proxy.url()),
        qp(&file),
        q(&local.addr.to_string()),
        q(&tls_proxy.url()),
        qp(&proxy_ca.pem),
    );
    // An inherited `proxy` would win over the environment: route env has a file of its own.
    let env_text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\nproxy_auth_file = {}\n\
         \n[[route]]\nname = \"env\"\nlisten = \"127.0.0.1:0\"\nupstream = {named}\n\
         proxy_from_env = true\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        qp(&file),
    );
    let config = pki.write("proxy.toml", &text);
    let env_config = pki.write("proxy-env.toml", &env_text);
    let names = ["via", "direct", "tls"];
    let (mut sidecar, addrs) =
        start_routes(Cmd::new().args(["run", "--config"]).arg(&config), &names);
    let (mut env_sidecar, env_addrs) = start_routes(
        Cmd::new()
            .args(["run", "--config"])
            .arg(&env_config)
            .env("HTTPS_PROXY", env_proxy.url()),
        &["env"],
    );

    let data = pattern(21, 5000);
    for name in names {
        let got = exchange(addrs[name], data.clone()).await;
        assert!(got == data, "route {name}: echo altered or cut");
    }
    assert!(
        exchange(env_addrs["env"], data.clone()).await == data,
        "route env"
    );
    let lines = sidecar.wait_conn_lines(3);
    for name in names {
        let line = lines
            .iter()
            .find(|l| field(l, "route") == Some(name))
            .unwrap_or_else(|| sidecar.fail(&format!("no connection line of route {name}")));
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    }
    let line = env_sidecar.wait_conn_lines(1)[0].clone();
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");

    for (name, p) in [("via", &proxy), ("tls", &tls_proxy), ("env", &env_proxy)] {
        let requests = p.requests();
        assert_eq!(requests.len(), 1, "route {name}'s proxy: {requests:#?}");
        assert_connect(&requests[0], &target(up.port()));
        assert_eq!(
            requests[0].proxy_authorization(),
            Some(&*basic("ivan", "config-pw")),
            "route {name}"
        );
    }
    assert_eq!(up.stats.tls_accepted(), 3);
    for conn in up.stats.conns() {
        assert_named_conn(&conn);
    }
    assert_eq!(local.stats.tls_accepted(), 1);
    assert_not_logged(&sidecar, "ivan", "config-pw");
    assert_not_logged(&env_sidecar, "ivan", "config-pw");
}

/// A bad `proxy` in a config file exits 2 naming the file, the line and the key.
#[test]
fn config_file_with_a_socks_proxy_exits_2() {
    let pki = Pki::new();
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\n\
         \n[[route]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = {}\n\
         proxy = \"socks5://127.0.0.1:1080\"\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem),
        q(&target(8443)),
    );
    let config = pki.write("socks.toml", &text);
    let err = Cmd::new()
        .args(["run", "--config"])
        .arg(&config)
        .startup_error();
    let line = text
        .lines()
        .position(|l| l.starts_with("proxy = "))
        .expect("test bug: no proxy line")
        + 1;
    let at = format!("{}:{line}", config.display());
    assert!(
        err.contains(&at) && err.contains("`proxy`"),
        "the error does not name {at} and the key `proxy`:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Startup errors

/// Bad proxy settings exit 2 naming what is wrong (another scheme, bad URLs, a missing or
/// empty `--proxy-ca`, credentials twice, a bad CIDR, a missing auth file), and never print a
/// password.
#[test]
fn bad_proxy_settings_exit_2() {
    let pki = Pki::new();
    let up = target(8443);
    let base = || run_cmd(&pki, &up);

    let err = base()
        .args(["--proxy", "socks5://127.0.0.1:1080"])
        .startup_error();
    assert!(
        err.contains("--proxy"),
        "socks5:// does not name --proxy:\n{err}"
    );

    // Bad URLs that carry a password: the error must not echo it.
    for url in [
        "socks5://kim:Sec-In-Url-1@127.0.0.1:1080",
        "http://kim:Sec-In-Url-1@127.0.0.1:99999",
        "http://kim:Sec-In-Url-1@127.0.0.1:3128/path",
        "http://kim:Sec-In-Url-1%zz@127.0.0.1:3128",
    ] {
        let err = base().args(["--proxy", url]).startup_error();
        assert!(
            err.contains("--proxy"),
            "{url} does not name --proxy:\n{err}"
        );
        assert!(
            !err.contains("Sec-In-Url-1"),
            "the password of a bad --proxy URL is printed:\n{err}"
        );
    }

    let missing = pki.path("no-such-proxy-ca.pem");
    let err = base()
        .args(["--proxy", "https://127.0.0.1:3128", "--proxy-ca"])
        .arg(&missing)
        .startup_error();
    assert!(
        err.contains(missing.to_str().unwrap()),
        "a missing --proxy-ca file is not named:\n{err}"
    );

    let garbage = pki.write("garbage-proxy-ca.pem", "not a certificate\n");
    let err = base()
        .args(["--proxy", "https://127.0.0.1:3128", "--proxy-ca"])
        .arg(&garbage)
        .startup_error();
    assert!(
        err.contains(garbage.to_str().unwrap()),
        "a --proxy-ca file without certificates is not named:\n{err}"
    );

    let file = auth_file(&pki, "proxy-auth", "judy", "F1le-Pw-Both");
    let err = base()
        .args([
            "--proxy",
            "http://judy:Url-Pw-Both@127.0.0.1:3128",
            "--proxy-auth-file",
        ])
        .arg(&file)
        .startup_error();
    assert!(
        err.contains("proxy-auth-file") || err.contains("proxy_auth_file"),
        "credentials in the URL and a --proxy-auth-file: the error does not name the file flag:\n{err}"
    );
    for secret in ["Url-Pw-Both", "F1le-Pw-Both"] {
        assert!(!err.contains(secret), "a password in the error:\n{err}");
    }

    let err = base()
        .args([
            "--proxy",
            "http://127.0.0.1:3128",
            "--no-proxy",
            "10.0.0.0/33",
        ])
        .startup_error();
    assert!(
        err.contains("--no-proxy") && err.contains("10.0.0.0/33"),
        "a bad CIDR does not name --no-proxy and the entry:\n{err}"
    );

    let missing = pki.path("no-such-auth-file");
    let err = base()
        .args(["--proxy", "http://127.0.0.1:3128", "--proxy-auth-file"])
        .arg(&missing)
        .startup_error();
    assert!(
        err.contains(missing.to_str().unwrap()),
        "a missing --proxy-auth-file is not named:\n{err}"
    );
}
