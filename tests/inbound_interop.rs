//! Inbound routes against real clients: Python's `ssl` module and `openssl s_client` (tcp
//! mode: relayed bytes, and each refusal's alert), `curl --cert` over HTTP/1.1 and h2 and
//! Python's `http.client` (http mode: the target sees Envoy's `X-Forwarded-Client-Cert`, never
//! the client's own), and a whole mesh hop in one process: app → outbound http route (client
//! certificate A) → inbound http route (`--verify-uri-san` for A) → target.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::inbound::{EchoTarget, inbound_cmd, openssl_s_client, output_text, run_client};
use crate::support::pki::{CLIENT_CN, Identity, LeafSpec};
use crate::support::*;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------------------------
// tcp mode: Python's ssl module

/// Connects with Python's `ssl` (default context trusting `ca`, the client certificate if
/// given), sends `hello from python`, reads the echo; prints `OK <echo>` or
/// `SSLERR <reason> <text>`.
const PY_TLS_CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
if len(sys.argv) > 5:
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
msg = b"hello from python"
try:
    with socket.create_connection((host, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            print("OK", got.decode(errors="replace"))
except ssl.SSLError as e:
    print("SSLERR", e.reason, e)
except OSError as e:
    print("OSERR", e)
"#;

fn python_tls(addr: SocketAddr, ca: &Path, id: Option<&Identity>) -> String {
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_TLS_CLIENT, "127.0.0.1"])
        .arg(addr.port().to_string())
        .arg(ca);
    if let Some(id) = id {
        cmd.arg(&id.cert).arg(&id.key);
    }
    let out = run_client(cmd, Duration::ZERO, WAIT);
    output_text(&out)
}

/// An allowed Python client gets its bytes echoed through the route; one with no certificate
/// sees `CERTIFICATE_REQUIRED` and one with a name not on the list `ACCESS_DENIED`, each with
/// one access line giving the reason, and the target sees only the allowed one.
#[tokio::test(flavor = "multi_thread")]
async fn python_ssl_client_is_relayed_or_refused_with_its_alert() {
    let pki = Pki::new();
    let target = EchoTarget::start().await;
    let wrong = pki.leaf(&pki.ca, "wrong", LeafSpec::client("intruder"));
    let cases: [(&str, Option<&Identity>, &str, Option<&str>); 3] = [
        ("allowed", Some(&pki.client), "OK hello from python", None),
        (
            "no certificate",
            None,
            "CERTIFICATE_REQUIRED",
            Some("no_client_cert"),
        ),
        (
            "name not listed",
            Some(&wrong),
            "ACCESS_DENIED",
            Some("not_allowed"),
        ),
    ];
    for (what, id, want, reason) in cases {
        let mut proxy = inbound_cmd(&pki, target.addr)
            .args(["--verify-cn", CLIENT_CN])
            .start();
        let text = blocking(|| python_tls(proxy.addr(), &pki.ca.pem, id));
        assert!(text.contains(want), "{what}: python printed {text}");
        let line = blocking(|| proxy.wait_conn_lines(1)).remove(0);
        match reason {
            Some(reason) => {
                assert_eq!(field(&line, "reason"), Some(reason), "{what}: {line}");
                assert_eq!(field(&line, "outcome"), Some("tls_error"), "{what}: {line}");
            }
            None => {
                assert_eq!(field(&line, "outcome"), Some("ok"), "{what}: {line}");
                assert_eq!(num_field(&line, "bytes_from_client"), 17, "{line}");
            }
        }
    }
    assert_eq!(
        target.accepted(),
        1,
        "only the allowed client reaches the target"
    );
}

// ---------------------------------------------------------------------------------------------
// tcp mode: openssl s_client refusals (access denied is in inbound_tcp)

/// `openssl s_client` without a certificate, with one from another CA and with an expired one
/// reports the alert the interface names for each; the target sees no connection.
#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_client_sees_each_refusal_alert() {
    let pki = Pki::new();
    let target = EchoTarget::start().await;
    let other = pki.other_ca();
    let stranger = pki.leaf(&other, "stranger", LeafSpec::client(CLIENT_CN));
    let expired = pki.client_expired();
    let cases: [(&str, Option<&Identity>, &str, &str); 3] = [
        (
            "no certificate",
            None,
            "certificate required",
            "no_client_cert",
        ),
        ("another CA", Some(&stranger), "unknown ca", "unknown_ca"),
        ("expired", Some(&expired), "certificate expired", "expired"),
    ];
    for (what, id, alert, reason) in cases {
        let mut proxy = inbound_cmd(&pki, target.addr)
            .args(["--verify-cn", CLIENT_CN])
            .start();
        let text = blocking(|| openssl_s_client(proxy.addr(), id, &pki.ca.pem));
        assert!(
            text.to_lowercase().contains(alert),
            "{what}: openssl did not report {alert:?}:\n{text}"
        );
        let line = blocking(|| proxy.wait_conn_lines(1)).remove(0);
        assert_eq!(field(&line, "reason"), Some(reason), "{what}: {line}");
    }
    assert_eq!(target.accepted(), 0, "a refused client caused a dial");
}
