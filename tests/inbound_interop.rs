//! Inbound routes against real clients: Python's `ssl` module and `openssl s_client` (tcp
//! mode: relayed bytes, and each refusal's alert), `curl --cert` over HTTP/1.1 and h2 and
//! Python's `http.client` (http mode: the target sees Envoy's `X-Forwarded-Client-Cert`, never
//! the client's own), and a whole mesh hop (two processes): app → outbound http route (client
//! certificate A) → inbound http route (`--verify-uri-san` for A) → target.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::http::{HttpUpstream, Seen, assert_sidecar_error, raw_call};
use crate::support::inbound::{
    EchoTarget, have_tool, inbound_cmd, inbound_http_cmd, openssl_s_client, output_text, run_client,
};
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
    if !have_tool(
        "python3",
        "python_ssl_client_is_relayed_or_refused_with_its_alert",
    ) {
        return;
    }
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
    if !have_tool("openssl", "openssl_s_client_sees_each_refusal_alert") {
        return;
    }
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

// ---------------------------------------------------------------------------------------------
// http mode: the identity header as clients see it

/// The SPIFFE-like URI, the DNS name and the common name of the test's "web" client.
const WEB_URI: &str = "spiffe://example.org/ns/shop/sa/web";
const WEB_DNS: &str = "web.shop.example";

/// A client leaf with one URI SAN, one DNS SAN and `CN=web`.
fn web_client(pki: &Pki) -> Identity {
    let spec = LeafSpec {
        uris: &[WEB_URI],
        names: &[WEB_DNS],
        ..LeafSpec::client("web")
    };
    pki.leaf(&pki.ca, "web", spec)
}

/// Envoy's `X-Forwarded-Client-Cert` for a leaf, computed here from its DER and the names the
/// test PKI put in: `Hash=<hex SHA-256 of the DER>;Subject="CN=..."`, then `URI=` (bare when
/// there is none) and `DNS=` per SAN.
fn expected_xfcc(leaf: &Identity, cn: &str, uri: Option<&str>, dns: Option<&str>) -> String {
    let mut want = format!(
        "Hash={};Subject=\"CN={cn}\";URI={}",
        hex(&sha256(&leaf.der)),
        uri.unwrap_or("")
    );
    if let Some(dns) = dns {
        want.push_str(&format!(";DNS={dns}"));
    }
    want
}

/// The `X-Forwarded-*` headers a target must see from an inbound route for a client on
/// 127.0.0.1 that sent `sent_xff` (if any) and a forged `X-Forwarded-Client-Cert`.
fn assert_forwarded(seen: &Seen, xfcc: &str, sent_xff: Option<&str>, what: &str) {
    assert_eq!(
        seen.all("x-forwarded-client-cert"),
        vec![xfcc],
        "{what}: the target's X-Forwarded-Client-Cert: {seen:#?}"
    );
    assert_eq!(
        seen.all("x-forwarded-proto"),
        vec!["https"],
        "{what}: {seen:#?}"
    );
    let xff = seen.all("x-forwarded-for").join(", ");
    let want = match sent_xff {
        Some(sent) => format!("{sent}, 127.0.0.1"),
        None => "127.0.0.1".to_string(),
    };
    assert_eq!(xff, want, "{what}: X-Forwarded-For: {seen:#?}");
}

/// `curl --cert --key --cacert` over HTTP/1.1 and over h2 (ALPN): the request reaches the
/// target with Envoy's `X-Forwarded-Client-Cert` for curl's leaf (curl's own forged ones
/// removed), `X-Forwarded-Proto: https` (curl's `http` replaced) and the client's address appended to
/// `X-Forwarded-For`; curl gets the target's answer over the protocol it asked for.
#[tokio::test(flavor = "multi_thread")]
async fn curl_with_a_client_certificate_over_http1_and_h2_gets_xfcc_set() {
    if !have_tool(
        "curl",
        "curl_with_a_client_certificate_over_http1_and_h2_gets_xfcc_set",
    ) {
        return;
    }
    let pki = Pki::new();
    let web = web_client(&pki);
    let target = HttpUpstream::plain().await;
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-uri-san", "spiffe://example.org/ns/shop/sa/*"])
        .start();
    let port = proxy.addr().port();
    let want = expected_xfcc(&web, "web", Some(WEB_URI), Some(WEB_DNS));
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let id = format!("curl{flag}");
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", flag, "--resolve"])
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&pki.ca.pem)
            .arg("--cert")
            .arg(&web.cert)
            .arg("--key")
            .arg(&web.key)
            .args(["-H", "X-Forwarded-Client-Cert: forged"])
            .args([
                "-H",
                "x-forwarded-client-cert: Hash=00;URI=spiffe://example.org/admin",
            ])
            .args(["-H", "X-Forwarded-For: 203.0.113.7"])
            .args(["-H", "X-Forwarded-Proto: http"])
            .args(["-H", &format!("x-request-id: {id}")])
            .args(["-w", "\nversion=%{http_version} status=%{http_code}"])
            .arg(format!("https://localhost:{port}/hello"));
        let out = blocking(|| run_client(cmd, Duration::ZERO, WAIT));
        let text = output_text(&out);
        assert!(out.status.success(), "{flag}: curl failed:\n{text}");
        assert!(
            text.starts_with("ok\n") && text.contains(&format!("version={version} status=200")),
            "{flag}: curl printed {text:?}"
        );
        let seen = target.stats.request(&id);
        assert_forwarded(&seen, &want, Some("203.0.113.7"), flag);
        assert_eq!(seen.target, "/hello");
    }
    for line in blocking(|| proxy.wait_conn_lines(2)) {
        assert_eq!(field(&line, "client_id"), Some(WEB_URI), "{line}");
        assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    }
}

/// Python's `http.client.HTTPSConnection` with a client certificate: a GET and a POST with a
/// 100 KiB body on one keep-alive connection; the target gets the whole body and every request
/// carries the identity header.
const PY_HTTP_CLIENT: &str = r#"
import hashlib, http.client, ssl, sys
port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
c.request("GET", "/py-get", headers={"x-request-id": "py-get"})
r = c.getresponse()
print("GET", r.status, r.read().decode().strip())
body = bytes(range(256)) * 400
c.request("POST", "/upload", body=body, headers={"x-request-id": "py-post"})
r = c.getresponse()
print("POST", r.status, r.read().decode().strip())
print("SENT", len(body), hashlib.sha256(body).hexdigest())
"#;

#[tokio::test(flavor = "multi_thread")]
async fn python_http_client_get_and_post_with_a_client_certificate() {
    if !have_tool(
        "python3",
        "python_http_client_get_and_post_with_a_client_certificate",
    ) {
        return;
    }
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let mut proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_HTTP_CLIENT])
        .arg(proxy.addr().port().to_string())
        .arg(&pki.ca.pem)
        .arg(&pki.client.cert)
        .arg(&pki.client.key);
    let text = output_text(&blocking(|| run_client(cmd, Duration::ZERO, WAIT)));
    let sent = text
        .lines()
        .find_map(|l| l.strip_prefix("SENT "))
        .unwrap_or_else(|| panic!("python printed {text}"));
    assert!(text.contains("GET 200 ok\n"), "python printed {text}");
    assert!(
        text.contains(&format!("POST 200 {sent}\n")),
        "the target did not get the whole body: {text}"
    );
    let want = expected_xfcc(&pki.client, CLIENT_CN, None, None);
    for id in ["py-get", "py-post"] {
        assert_forwarded(&target.stats.request(id), &want, None, id);
    }
    // One access line for the connection, naming the client as the interface says.
    let line = blocking(|| proxy.wait_conn_lines(1)).remove(0);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(field(&line, "client"), Some("CN=test-client"), "{line}");
    assert_eq!(field(&line, "client_id"), Some("-"), "{line}");
    let target_addr = target.addr.to_string();
    assert_eq!(field(&line, "target"), Some(target_addr.as_str()), "{line}");
    assert!(num_field(&line, "bytes_from_client") >= 102_400, "{line}");
    assert!(num_field(&line, "bytes_to_client") > 0, "{line}");
}

// ---------------------------------------------------------------------------------------------
// http mode: a whole mesh hop

/// The reason key of a `mtls-sidecar: KEY: ...` body.
fn reply_key(body: &str) -> String {
    body.strip_prefix("mtls-sidecar:")
        .unwrap_or(body)
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// An outbound http-mode route presenting `id`, towards `inbound`.
fn outbound_to(pki: &Pki, inbound: SocketAddr, id: &Identity) -> Sidecar {
    run_cmd_files(
        format!("localhost:{}", inbound.port()),
        &id.cert,
        &id.key,
        &pki.ca.pem,
    )
    .args(["--mode", "http"])
    .start()
}

/// app (plain HTTP) → outbound http route (client certificate A, SPIFFE-like URI) → inbound
/// http route (server certificate `localhost`, `--verify-uri-san` A's URI) → target: the target
/// sees Envoy's header naming A's URI and A's leaf hash, and the app the target's answer. A
/// second outbound route presenting a URI not on the inbound's list gets the app a 502 with
/// the outbound route's own failure body; the inbound logs `reason=not_allowed` and the target
/// sees nothing more.
#[tokio::test(flavor = "multi_thread")]
async fn mesh_hop_app_outbound_inbound_target_carries_the_callers_identity() {
    let pki = Pki::new();
    let a = web_client(&pki);
    let stranger = LeafSpec {
        uris: &["spiffe://example.org/ns/other/sa/batch"],
        ..LeafSpec::client("batch")
    };
    let stranger = pki.leaf(&pki.ca, "batch", stranger);
    let target = HttpUpstream::plain().await;
    let mut inbound = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-uri-san", WEB_URI])
        .start();
    let outbound = outbound_to(&pki, inbound.addr(), &a);
    let reply = raw_call(
        outbound.addr(),
        b"GET /mesh HTTP/1.1\r\nHost: app.invalid\r\nx-request-id: mesh-1\r\n\
          X-Forwarded-Client-Cert: forged-by-the-app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "ok\n");
    let seen = target.stats.request("mesh-1");
    let want = expected_xfcc(&a, "web", Some(WEB_URI), Some(WEB_DNS));
    assert_forwarded(&seen, &want, None, "mesh hop");
    assert_eq!(
        seen.host(),
        Some(format!("localhost:{}", inbound.addr().port()).as_str())
    );

    let refused = outbound_to(&pki, inbound.addr(), &stranger);
    let reply = raw_call(
        refused.addr(),
        b"GET /mesh HTTP/1.1\r\nHost: app.invalid\r\nx-request-id: mesh-2\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    // The key after `mtls-sidecar:` is the outbound route's business (see the next test).
    let key = reply_key(&reply.text());
    assert_sidecar_error(
        reply.status,
        reply.header("content-type"),
        &reply.text(),
        502,
        &key,
    );
    let line = blocking(|| {
        inbound.wait_for_line("the inbound's refusal line", WAIT, |l| {
            is_conn_line(l) && field(l, "reason") == Some("not_allowed")
        })
    });
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");
    assert_eq!(
        target.stats.request_count(),
        1,
        "the refused caller reached the target"
    );
}

/// The same hop in ONE process (a pod's sidecar): a config file with an outbound http route
/// (`default`, client certificate A) whose upstream is the same process's inbound http route
/// (`inbound`, `verify_uri_san` A's URI). The target sees A's identity; at shutdown the inbound
/// route's access line names A's URI.
#[tokio::test(flavor = "multi_thread")]
async fn mesh_hop_in_one_process_with_a_config_file() {
    let pki = Pki::new();
    let a = web_client(&pki);
    let target = HttpUpstream::plain().await;
    // The outbound route must name the inbound's port before the process binds it.
    let in_port = free_port();
    let file = pki.write(
        "mesh.toml",
        format!(
            "[[route]]\nname = \"default\"\nlisten = \"127.0.0.1:0\"\n\
             upstream = \"localhost:{in_port}\"\nmode = \"http\"\n\
             cert = {:?}\nkey = {:?}\nca = {:?}\n\n\
             [[route]]\nname = \"inbound\"\ninbound = true\n\
             listen = \"127.0.0.1:{in_port}\"\ntarget = \"{}\"\nmode = \"http\"\n\
             cert = {:?}\nkey = {:?}\nca = {:?}\nverify_uri_san = [\"{WEB_URI}\"]\n",
            a.cert, a.key, pki.ca.pem, target.addr, pki.server.cert, pki.server.key, pki.ca.pem
        ),
    );
    let mut proxy = Cmd::new().arg("run").arg("--config").arg(&file).start();
    let reply = raw_call(
        proxy.addr(),
        b"GET /one-process HTTP/1.1\r\nHost: app.invalid\r\nx-request-id: one\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let want = expected_xfcc(&a, "web", Some(WEB_URI), Some(WEB_DNS));
    assert_forwarded(&target.stats.request("one"), &want, None, "one process");
    // The outbound pool keeps its connection to the inbound route open; the access line comes
    // when it ends, here with the drain.
    proxy.signal("TERM");
    let line = blocking(|| {
        proxy.wait_for_line("the inbound route's access line", WAIT, |l| {
            is_conn_line(l) && field(l, "route") == Some("inbound")
        })
    });
    assert_eq!(field(&line, "client_id"), Some(WEB_URI), "{line}");
}

/// The caller the inbound route refuses (TLS 1.3: its `access_denied` alert arrives after the
/// outbound's handshake, on the first read) is told why: the outbound's 502 says
/// `client_cert_rejected` as its tcp mode logs it, not a bare `reset` or `io`.
#[tokio::test(flavor = "multi_thread")]

async fn mesh_hop_refused_caller_gets_client_cert_rejected() {
    let pki = Pki::new();
    let stranger = LeafSpec {
        uris: &["spiffe://example.org/ns/other/sa/batch"],
        ..LeafSpec::client("batch")
    };
    let stranger = pki.leaf(&pki.ca, "batch", stranger);
    let target = HttpUpstream::plain().await;
    let inbound = inbound_http_cmd(&pki, target.addr)
        .args(["--verify-uri-san", WEB_URI])
        .start();
    let refused = outbound_to(&pki, inbound.addr(), &stranger);
    let reply = raw_call(
        refused.addr(),
        b"GET /mesh HTTP/1.1\r\nHost: app.invalid\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_sidecar_error(
        reply.status,
        reply.header("content-type"),
        &reply.text(),
        502,
        "client_cert_rejected",
    );
    assert_eq!(target.stats.request_count(), 0);
}
