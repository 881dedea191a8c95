//! SPIFFE routes' startup refusals: `--spiffe` with identity or trust files, without a socket,
//! without a rule on the peer's SPIFFE ID, a malformed `--spiffe-id`; the same through the
//! `MTLS_SIDECAR_SPIFFE*` variables and the config keys (`spiffe`, `spiffe_socket`,
//! `spiffe_id`, also in `[defaults]`). Each is exit 2 naming the flag (or file, line and key).

use crate::support::admin::{admin_addr, get};
use crate::support::*;

const ID: &str = "spiffe://example.org/ns/shop/sa/web";

/// `run` with an outbound SPIFFE route on a socket path in the test's directory.
fn outbound(pki: &Pki) -> Cmd {
    Cmd::new()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--spiffe", "--spiffe-socket"])
        .arg(pki.path("agent.sock"))
}

/// `run --inbound` with a SPIFFE identity on a socket path in the test's directory.
fn inbound(pki: &Pki) -> Cmd {
    Cmd::new()
        .args([
            "run",
            "--inbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
        ])
        .args(["--spiffe", "--spiffe-socket"])
        .arg(pki.path("agent.sock"))
}

/// The process exits 2 without listening, with an error line that names `flag`.
fn refused(cmd: &Cmd, flag: &str) -> String {
    let err = cmd.startup_error();
    assert!(
        err.lines()
            .any(|l| l.contains("error") && l.contains(&format!("{flag} "))),
        "no error line names {flag}:\n{err}"
    );
    err
}

#[test]
fn spiffe_with_identity_or_trust_files_is_refused() {
    let pki = Pki::new();
    for base in [
        outbound(&pki).args(["--verify-uri-san", ID]),
        inbound(&pki).args(["--verify-uri-san", ID]),
    ] {
        for (flag, file) in [
            ("--cert", &pki.client.cert),
            ("--key", &pki.client.key),
            ("--pkcs12", &pki.client.cert),
            ("--ca", &pki.ca.pem),
        ] {
            let err = refused(&base.clone().arg(flag).arg(file), flag);
            assert!(err.contains("--spiffe"), "{err}");
        }
    }
}

#[test]
fn spiffe_without_a_socket_is_refused() {
    let pki = Pki::new();
    let cmd = Cmd::new()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--spiffe", "--verify-uri-san", ID])
        .env("SPIFFE_ENDPOINT_SOCKET", "");
    let err = refused(&cmd, "--spiffe-socket");
    assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
    let cmd = Cmd::new()
        .args([
            "run",
            "--inbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:9",
        ])
        .args(["--spiffe", "--allow-any-client"])
        .env("SPIFFE_ENDPOINT_SOCKET", "");
    refused(&cmd, "--spiffe-socket");
    // A TCP Workload API endpoint is not supported: only a unix socket.
    let cmd = outbound(&pki).args(["--verify-uri-san", ID, "--spiffe-socket", "tcp:127.0.0.1:1"]);
    refused(&cmd, "--spiffe-socket");
}

#[test]
fn spiffe_routes_need_a_rule_on_the_peer_id() {
    let pki = Pki::new();
    let err = refused(&outbound(&pki), "--verify-uri-san");
    assert!(err.contains("hostname"), "{err}");
    refused(&outbound(&pki).args(["--mode", "http"]), "--verify-uri-san");
    refused(&inbound(&pki), "--allow-any-client");
    refused(
        &inbound(&pki).args(["--mode", "http"]),
        "--allow-any-client",
    );
}

#[test]
fn malformed_spiffe_ids_are_refused() {
    let pki = Pki::new();
    for bad in [
        "example.org/web",
        "https://example.org/web",
        "spiffe://example.org",
        "spiffe://Example.org/web",
        "spiffe://example.org:8443/web",
        "spiffe://example.org/a//b",
        "spiffe://example.org/../web",
    ] {
        let cmd = outbound(&pki).args(["--verify-uri-san", ID, "--spiffe-id", bad]);
        refused(&cmd, "--spiffe-id");
        let cmd = inbound(&pki).args(["--allow-any-client", "--spiffe-id", bad]);
        refused(&cmd, "--spiffe-id");
    }
}

#[test]
fn socket_and_id_without_spiffe_are_refused() {
    let pki = Pki::new();
    let files = |cmd: Cmd| {
        cmd.arg("--cert")
            .arg(&pki.client.cert)
            .arg("--key")
            .arg(&pki.client.key)
            .arg("--ca")
            .arg(&pki.ca.pem)
    };
    let base = || {
        Cmd::new().args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
    };
    refused(
        &files(base().args(["--spiffe-socket", "/x.sock"])),
        "--spiffe-socket",
    );
    refused(&files(base().args(["--spiffe-id", ID])), "--spiffe-id");
}

#[test]
fn environment_variables_mean_the_flags() {
    let pki = Pki::new();
    let sock = pki.path("agent.sock");
    let base = || {
        Cmd::new()
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
            ])
            .env("MTLS_SIDECAR_SPIFFE", "true")
            .env("MTLS_SIDECAR_SPIFFE_SOCKET", &sock)
    };
    // MTLS_SIDECAR_SPIFFE took effect: no --cert is asked for, the rule is.
    refused(&base(), "--verify-uri-san");
    let cmd = base()
        .env("MTLS_SIDECAR_VERIFY_URI_SAN", ID)
        .env("MTLS_SIDECAR_SPIFFE_ID", "spiffe://example.org/");
    refused(&cmd, "--spiffe-id");
    let cmd = base()
        .env("MTLS_SIDECAR_VERIFY_URI_SAN", ID)
        .env("MTLS_SIDECAR_SPIFFE_SOCKET", "tcp:127.0.0.1:1");
    refused(&cmd, "--spiffe-socket");
    // SPIFFE_ENDPOINT_SOCKET is read when no socket is given; a TCP one is refused by name.
    let cmd = Cmd::new()
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .args(["--spiffe", "--verify-uri-san", ID])
        .env("SPIFFE_ENDPOINT_SOCKET", "tcp:127.0.0.1:1");
    let err = refused(&cmd, "--spiffe-socket");
    assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
}

/// The 1-based line of `text` that is exactly `wanted` once trimmed.
fn line_of(text: &str, wanted: &str) -> usize {
    text.lines()
        .position(|l| l.trim() == wanted)
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no line {wanted:?} in\n{text}"))
}

/// `run --config` exits 2 naming the file, `line` and `key`.
fn config_refused(pki: &Pki, text: &str, line: usize, key: &str) {
    let path = pki.write("config.toml", text);
    let err = Cmd::new()
        .args(["run", "--config"])
        .arg(&path)
        .startup_error();
    let p = path.to_str().unwrap();
    assert!(
        err.lines()
            .any(|l| l.contains(&format!("{p}:{line}")) && l.contains(key)),
        "no line names {p}:{line} and {key}:\n{err}\n--- the file ---\n{text}"
    );
}

#[test]
fn config_keys_mean_the_flags() {
    let pki = Pki::new();
    let sock = pki.path("agent.sock");
    let sock = sock.to_str().unwrap();
    let defaults = format!("[defaults]\nspiffe = true\nspiffe_socket = \"{sock}\"\n");
    let route =
        "\n[[route]]\nname = \"out\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";
    // spiffe in [defaults] counts as the route's identity: the rule is what is missing.
    let text = format!("{defaults}{route}");
    config_refused(
        &pki,
        &text,
        line_of(&text, "name = \"out\"") - 1,
        "verify_uri_san",
    );
    let text =
        format!("{defaults}{route}verify_uri_san = [\"{ID}\"]\nspiffe_id = \"spiffe://x/\"\n");
    config_refused(
        &pki,
        &text,
        line_of(&text, "spiffe_id = \"spiffe://x/\""),
        "spiffe_id",
    );
    let ca = pki.ca.pem.to_str().unwrap();
    let text = format!("{defaults}{route}verify_uri_san = [\"{ID}\"]\nca = \"{ca}\"\n");
    config_refused(&pki, &text, line_of(&text, &format!("ca = \"{ca}\"")), "ca");
    let text = format!(
        "[defaults]\nspiffe = true\nspiffe_socket = \"tcp:127.0.0.1:1\"\n{route}verify_uri_san = [\"{ID}\"]\n"
    );
    config_refused(&pki, &text, 3, "spiffe_socket");
}

/// Without any Workload API: the route listens at once, `/readyz` says what it waits for,
/// `/status` has no SPIFFE ID yet, and a connection waits `--connect-timeout`, then fails
/// with `reason=no_identity` (outbound tcp and inbound).
#[tokio::test(flavor = "multi_thread")]
async fn without_the_api_listeners_bind_and_connections_fail_no_identity() {
    let pki = Pki::new();
    for cmd in [
        outbound(&pki).args(["--verify-uri-san", ID]),
        inbound(&pki).args(["--verify-uri-san", ID]),
    ] {
        let cmd = cmd.args(["--admin", "127.0.0.1:0", "--connect-timeout", "700ms"]);
        let mut proxy = cmd.start();
        let admin = admin_addr(&mut proxy);
        let ready = get(admin, "/readyz").await;
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert!(
            ready
                .body
                .contains("waiting for the first SVID from the Workload API"),
            "{}",
            ready.body
        );
        let status = get(admin, "/status").await;
        assert!(
            status.body.contains("\"spiffe_id\":null"),
            "{}",
            status.body
        );
        let started = std::time::Instant::now();
        let mut conn = connect(proxy.addr()).await;
        expect_closed_without_data(&mut conn, WAIT).await;
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(600),
            "closed after {waited:?}, before --connect-timeout"
        );
        let line = proxy.wait_for_line("the access line", WAIT, is_conn_line);
        assert_eq!(field(&line, "reason"), Some("no_identity"), "{line}");
    }
}
