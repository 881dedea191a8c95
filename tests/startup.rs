//! Starting up: bad material and bad flags exit 2 naming what is wrong; key encodings,
//! environment variables, and the `dev-pki` and `demo` commands.

use std::io::{Read, Write};
use std::path::Path;

use crate::support::pki::{CLIENT_CN, KeyFormat};
use crate::support::upstream::server_config_from_pem;
use crate::support::*;

/// Upstream for proxies that never dial it.
const NOWHERE: &str = "127.0.0.1:9";

fn assert_mentions(stderr: &str, what: impl AsRef<str>) {
    let what = what.as_ref();
    assert!(
        stderr.contains(what),
        "stderr does not mention {what:?}:\n{stderr}"
    );
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A `run` command towards nowhere whose cert, key and CA files can be swapped one at a time.
fn run_with(cert: &Path, key: &Path, ca: &Path) -> Cmd {
    run_cmd_files(NOWHERE, cert, key, ca)
}

#[test]
fn missing_cert_file() {
    let pki = Pki::new();
    let cert = pki.path("no-such-cert.pem");
    let err = run_with(&cert, &pki.client.key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&cert));
}

#[test]
fn missing_key_file() {
    let pki = Pki::new();
    let key = pki.path("no-such-key.pem");
    let err = run_with(&pki.client.cert, &key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&key));
}

#[test]
fn missing_ca_file() {
    let pki = Pki::new();
    let ca = pki.path("no-such-ca.pem");
    let err = run_with(&pki.client.cert, &pki.client.key, &ca).startup_error();
    assert_mentions(&err, path_str(&ca));
}

/// A path that exists but cannot be read as a file (works as root too, unlike chmod 000).
#[test]
fn unreadable_key_file() {
    let pki = Pki::new();
    let key = pki.path("key-is-a-directory.pem");
    std::fs::create_dir(&key).unwrap();
    let err = run_with(&pki.client.cert, &key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&key));
}

#[test]
fn cert_file_without_a_certificate() {
    let pki = Pki::new();
    let cert = pki.write(
        "cert-holds-a-key.pem",
        std::fs::read(&pki.client.key).unwrap(),
    );
    let err = run_with(&cert, &pki.client.key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&cert));
}

#[test]
fn key_file_without_a_key() {
    let pki = Pki::new();
    let key = pki.write(
        "key-holds-a-cert.pem",
        std::fs::read(&pki.client.cert).unwrap(),
    );
    let err = run_with(&pki.client.cert, &key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&key));
}

#[test]
fn cert_file_with_garbage() {
    let pki = Pki::new();
    let cert = pki.write(
        "garbage-cert.pem",
        "this is not a certificate\n\x00\x01\x02",
    );
    let err = run_with(&cert, &pki.client.key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&cert));
}

/// PEM armour around bytes that are not base64 / not DER.
#[test]
fn cert_file_with_broken_pem() {
    let pki = Pki::new();
    let body = "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n";
    let cert = pki.write("broken-cert.pem", body);
    let err = run_with(&cert, &pki.client.key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&cert));
}

#[test]
fn key_file_with_garbage() {
    let pki = Pki::new();
    let body = "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n";
    let key = pki.write("garbage-key.pem", body);
    let err = run_with(&pki.client.cert, &key, &pki.ca.pem).startup_error();
    assert_mentions(&err, path_str(&key));
}

#[test]
fn key_that_does_not_belong_to_the_cert() {
    let pki = Pki::new();
    let err = run_with(&pki.client.cert, &pki.server.key, &pki.ca.pem).startup_error();
    let key = path_str(&pki.server.key);
    let cert = path_str(&pki.client.cert);
    assert!(
        err.contains(&key) || err.contains(&cert),
        "stderr names neither {key} nor {cert}:\n{err}"
    );
}

#[test]
fn ca_file_without_certificates() {
    let pki = Pki::new();
    let ca = pki.write("empty-ca.pem", "");
    let err = run_with(&pki.client.cert, &pki.client.key, &ca).startup_error();
    assert_mentions(&err, path_str(&ca));
}

#[test]
fn ca_file_with_garbage() {
    let pki = Pki::new();
    let body = "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n";
    let ca = pki.write("garbage-ca.pem", body);
    let err = run_with(&pki.client.cert, &pki.client.key, &ca).startup_error();
    assert_mentions(&err, path_str(&ca));
}

#[test]
fn non_loopback_listen_needs_allow_non_loopback() {
    let pki = Pki::new();
    let (cert, key, ca) = (&pki.client.cert, &pki.client.key, &pki.ca.pem);
    let err = run_cmd_files_on(Some("0.0.0.0:0"), NOWHERE, cert, key, ca).startup_error();
    assert_mentions(&err, "--allow-non-loopback");
}

#[test]
fn listen_port_in_use() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (cert, key, ca) = (&pki.client.cert, &pki.client.key, &pki.ca.pem);
    let err = run_cmd_files_on(Some(&addr), NOWHERE, cert, key, ca).startup_error();
    assert_mentions(&err, &addr);
}

#[test]
fn missing_upstream_is_a_usage_error() {
    let pki = Pki::new();
    let cmd = Cmd::new()
        .args(["run", "--listen", "127.0.0.1:0", "--cert"])
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--ca")
        .arg(&pki.ca.pem);
    let err = cmd.startup_error();
    assert_mentions(&err, "--upstream");
}

/// An expired client certificate is the operator's problem to fix, not a reason to refuse to
/// start: ERROR at startup, and the listener comes up anyway.
#[test]
fn expired_client_cert_is_logged_but_starts() {
    let pki = Pki::new();
    let expired = pki.client_expired();
    let mut proxy = run_with(&expired.cert, &expired.key, &pki.ca.pem).start();
    proxy.wait_for_line("an ERROR line about the expired client cert", WAIT, |l| {
        l.contains("ERROR") && l.to_lowercase().contains("expir")
    });
}

/// A proxy with a client identity in an other key encoding reaches the upstream as that client.
async fn key_format_works(format: KeyFormat) {
    let pki = Pki::new();
    let id = match pki.client_with_key_format(format) {
        Ok(id) => id,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd_files(up.addr, &id.cert, &id.key, &pki.ca.pem).start();
    assert_eq!(exchange(proxy.addr(), b"key".to_vec()).await, b"key");
    let conns = up.stats.conns();
    assert_eq!(conns[0].client_der.as_deref(), Some(id.der.as_ref()));
}

#[tokio::test(flavor = "multi_thread")]
async fn sec1_ec_key_loads() {
    key_format_works(KeyFormat::Sec1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs1_rsa_key_loads() {
    key_format_works(KeyFormat::Pkcs1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_variables_instead_of_flags() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = Cmd::new()
        .arg("run")
        .env("MTLS_SIDECAR_LISTEN", "127.0.0.1:0")
        .env("MTLS_SIDECAR_UPSTREAM", up.addr.to_string())
        .env("MTLS_SIDECAR_SERVER_NAME", "localhost")
        .env("MTLS_SIDECAR_CERT", &pki.client.cert)
        .env("MTLS_SIDECAR_KEY", &pki.client.key)
        .env("MTLS_SIDECAR_CA", &pki.ca.pem)
        .env("MTLS_SIDECAR_CONNECT_TIMEOUT", "5s")
        .env("MTLS_SIDECAR_LOG_LEVEL", "info")
        .start();
    assert_eq!(exchange(proxy.addr(), b"env".to_vec()).await, b"env");
    let conn = &up.stats.conns()[0];
    assert_eq!(
        conn.sni.as_deref(),
        Some("localhost"),
        "MTLS_SIDECAR_SERVER_NAME ignored"
    );
    assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flag_wins_over_its_environment_variable() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let wrong = format!("127.0.0.1:{}", free_port());
    let proxy = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_UPSTREAM", &wrong)
        .start();
    assert_eq!(exchange(proxy.addr(), b"flag".to_vec()).await, b"flag");
    assert_eq!(up.stats.tls_accepted(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_pki_output_is_accepted_by_run() {
    let out = tempfile::tempdir().unwrap();
    let (code, stderr) = Cmd::new()
        .args(["dev-pki", "--out"])
        .arg(out.path())
        .run_to_exit(WAIT);
    assert_eq!(code, Some(0), "dev-pki failed:\n{stderr}");
    assert!(
        !stderr.contains("PRIVATE KEY"),
        "key material on stderr:\n{stderr}"
    );
    let file = |name: &str| {
        let p = out.path().join(name);
        assert!(p.is_file(), "dev-pki wrote no {name}");
        p
    };
    let (ca, server, server_key) = (file("ca.pem"), file("server.pem"), file("server-key.pem"));
    let (client, client_key) = (file("client.pem"), file("client-key.pem"));

    let cfg = server_config_from_pem(&server, &server_key, &ca);
    let up = Upstream::start(cfg, vec![Behavior::Echo]).await;
    // By name and by IP: the server certificate is for localhost and 127.0.0.1.
    for upstream in [format!("localhost:{}", up.port()), up.addr.to_string()] {
        let proxy = run_cmd_files(&upstream, &client, &client_key, &ca).start();
        assert_eq!(exchange(proxy.addr(), b"dev".to_vec()).await, b"dev");
    }
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 2);
    assert!(conns.iter().all(|c| c.client_der.is_some()));
}

#[test]
fn demo_answers_with_the_client_certificate() {
    let proxy = Cmd::new().args(["demo", "--listen", "127.0.0.1:0"]).start();
    let mut stream = std::net::TcpStream::connect(proxy.addr()).expect("connect to demo");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the demo's answer");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 200"),
        "demo answered:\n{response}"
    );
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(
        body.contains("CN="),
        "the body names no client certificate:\n{response}"
    );
}

/// `--log-format json`: one JSON object per line, with the same fields.
#[tokio::test(flavor = "multi_thread")]
async fn json_log_format() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--log-format", "json"])
        .spawn();
    let line = proxy.wait_for_line("a JSON listening line", WAIT, |l| {
        l.starts_with('{') && l.contains("listening") && l.contains("\"addr\":\"")
    });
    let addr = line.split("\"addr\":\"").nth(1).unwrap();
    let addr: std::net::SocketAddr = addr[..addr.find('"').unwrap()].parse().unwrap();
    assert_eq!(exchange(addr, b"json".to_vec()).await, b"json");
    let line = proxy.wait_for_line("a JSON connection line", WAIT, |l| {
        l.starts_with('{') && l.contains("\"outcome\":\"ok\"")
    });
    assert!(line.contains("\"bytes_to_upstream\":4"), "{line}");
    assert!(line.ends_with('}'), "{line}");
}

/// stderr is for people and log collectors: plain text, no ANSI colour codes.
#[tokio::test(flavor = "multi_thread")]
async fn logs_carry_no_ansi_colours() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    assert_eq!(exchange(proxy.addr(), b"plain".to_vec()).await, b"plain");
    proxy.wait_conn_lines(1);
    let stderr = proxy.stderr();
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escape codes in the log:\n{stderr:?}"
    );
}
