//! Inbound routes in tcp mode: an authorized client's bytes relayed to the plaintext target
//! both ways (half-close too); each kind of refused client gets its TLS alert and one access
//! line with its `reason`, and the target never sees a connection; a silent client is cut at
//! `--handshake-timeout`; a target that is down; a server certificate reloaded by SIGHUP;
//! `openssl s_client` sees the refusal alert.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::inbound::{
    EchoTarget as Target, client_config, inbound_cmd, openssl_s_client, tls_connect,
};
use crate::support::pki::{CLIENT_CN, Identity, LeafSpec};
use crate::support::*;

/// The alert a refused client receives: TLS 1.3 finishes the client's side of the handshake
/// before the server judges the certificate, so the alert comes with the first read.
async fn alert_seen(addr: SocketAddr, config: Arc<ClientConfig>) -> Option<AlertDescription> {
    let err = match tls_connect(addr, config).await {
        Err(e) => e,
        Ok(mut s) => {
            let _ = s.write_all(b"hello").await;
            let mut buf = [0u8; 16];
            match tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .expect("read")
            {
                Err(e) => e,
                Ok(n) => panic!("a refused client read {n} bytes instead of an alert"),
            }
        }
    };
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_client_is_relayed_both_ways_with_half_close() {
    let pki = Pki::new();
    let target = Target::start().await;
    let mut proxy = inbound_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let mut s = tls_connect(proxy.addr(), client_config(&pki, Some(&pki.client)))
        .await
        .expect("handshake");
    let data = pattern(7, 300_000);
    s.write_all(&data).await.expect("write");
    // Half-close: our end of stream reaches the target, whose echo still comes back whole.
    s.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("echo within the wait")
        .expect("read");
    assert!(got == data, "echo came back altered ({} bytes)", got.len());
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(
        num_field(&line, "bytes_from_client"),
        data.len() as u64,
        "{line}"
    );
    assert_eq!(
        num_field(&line, "bytes_to_client"),
        data.len() as u64,
        "{line}"
    );
    assert_eq!(field(&line, "client_id"), Some("-"), "{line}");
    assert!(line.contains(CLIENT_CN), "client subject missing: {line}");
    assert_eq!(
        field(&line, "target"),
        Some(target.addr.to_string().as_str()),
        "{line}"
    );
    assert_eq!(target.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_clients_get_their_alert_and_reason_and_the_target_sees_nothing() {
    let pki = Pki::new();
    let other = pki.other_ca();
    let stranger = pki.leaf(&other, "stranger", LeafSpec::client(CLIENT_CN));
    let revoked = pki.leaf(&pki.ca, "revoked", LeafSpec::client(CLIENT_CN));
    let crl = pki.ca.crl(&pki.path("ca.crl"), &[&revoked.der]);
    let wrong_name = pki.leaf(&pki.ca, "wrong", LeafSpec::client("intruder"));
    let web = LeafSpec {
        uris: &["spiffe://example.org/ns/shop/sa/web"],
        ..LeafSpec::client("web")
    };
    let web = pki.leaf(&pki.ca, "web", web);
    let deep = LeafSpec {
        uris: &["spiffe://example.org/ns/shop/sa/web/extra"],
        ..LeafSpec::client("deep")
    };
    let deep = pki.leaf(&pki.ca, "deep", deep);
    let expired = pki.client_expired();
    let cases: [(&str, Option<&Identity>, AlertDescription, &str); 6] = [
        (
            "no certificate",
            None,
            AlertDescription::CertificateRequired,
            "no_client_cert",
        ),
        (
            "another CA",
            Some(&stranger),
            AlertDescription::UnknownCA,
            "unknown_ca",
        ),
        (
            "expired",
            Some(&expired),
            AlertDescription::CertificateExpired,
            "expired",
        ),
        (
            "revoked",
            Some(&revoked),
            AlertDescription::CertificateRevoked,
            "revoked",
        ),
        (
            "name not listed",
            Some(&wrong_name),
            AlertDescription::AccessDenied,
            "not_allowed",
        ),
        (
            "two segments for *",
            Some(&deep),
            AlertDescription::AccessDenied,
            "not_allowed",
        ),
    ];
    let target = Target::start().await;
    for (what, id, alert, reason) in cases {
        let mut proxy = inbound_cmd(&pki, target.addr)
            .args(["--verify-cn", CLIENT_CN, "--crl"])
            .arg(&crl)
            .args(["--verify-uri-san", "spiffe://example.org/ns/shop/sa/*"])
            .start();
        let seen = alert_seen(proxy.addr(), client_config(&pki, id)).await;
        assert_eq!(seen, Some(alert), "{what}: wrong alert");
        let lines = proxy.wait_conn_lines(1);
        assert_eq!(lines.len(), 1, "{what}: {lines:?}");
        assert_eq!(
            field(&lines[0], "reason"),
            Some(reason),
            "{what}: {}",
            lines[0]
        );
        assert_eq!(
            field(&lines[0], "outcome"),
            Some("tls_error"),
            "{what}: {}",
            lines[0]
        );
    }
    assert_eq!(target.accepted(), 0, "a refused client caused a dial");
    // The same route lets the URI SAN that matches `*` in.
    let mut proxy = inbound_cmd(&pki, target.addr)
        .args(["--verify-uri-san", "spiffe://example.org/ns/shop/sa/*"])
        .start();
    let mut s = tls_connect(proxy.addr(), client_config(&pki, Some(&web)))
        .await
        .expect("handshake");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("echo")
        .expect("read");
    assert_eq!(&buf, b"ping");
    drop(s);
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(
        field(&line, "client_id"),
        Some("spiffe://example.org/ns/shop/sa/web"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_client_is_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let target = Target::start().await;
    let mut proxy = inbound_cmd(&pki, target.addr)
        .args(["--allow-any-client", "--handshake-timeout", "500ms"])
        .start();
    let mut s = connect(proxy.addr()).await;
    let started = Instant::now();
    let closed = expect_closed_without_data(&mut s, WAIT).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "cut after {took:?} ({closed:?})"
    );
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some("handshake_timeout"), "{line}");
    assert_eq!(field(&line, "outcome"), Some("timeout"), "{line}");
    assert_eq!(target.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_that_is_down_is_target_refused() {
    let pki = Pki::new();
    let port = free_port();
    let mut proxy = inbound_cmd(&pki, format!("127.0.0.1:{port}"))
        .arg("--allow-any-client")
        .start();
    let mut s = tls_connect(proxy.addr(), client_config(&pki, Some(&pki.client)))
        .await
        .expect("handshake");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("closed within the wait");
    assert!(buf.is_empty());
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some("target_refused"), "{line}");
    assert_eq!(field(&line, "outcome"), Some("connect_error"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_server_certificate_for_new_handshakes() {
    let pki = Pki::new();
    let target = Target::start().await;
    let cert = pki.path("live.pem");
    let key = pki.path("live-key.pem");
    std::fs::copy(&pki.server.cert, &cert).expect("copy");
    std::fs::copy(&pki.server.key, &key).expect("copy");
    let mut proxy = Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.addr.to_string())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--allow-any-client", "--reload-interval", "0"])
        .start();
    let serial = |s: &TlsStream<TcpStream>| {
        let der = s.get_ref().1.peer_certificates().expect("server chain")[0].clone();
        crate::support::pki::serial_of(&der)
    };
    let config = client_config(&pki, Some(&pki.client));
    let first = tls_connect(proxy.addr(), config.clone())
        .await
        .expect("handshake");
    assert_eq!(serial(&first), pki.server.serial_hex());
    let next = pki.leaf(&pki.ca, "next", LeafSpec::server());
    crate::support::files::atomic_copy(&next.cert, &cert);
    crate::support::files::atomic_copy(&next.key, &key);
    proxy.signal("HUP");
    proxy.wait_for_line("the reload line", WAIT, |l| l.contains("identity reloaded"));
    // A fresh client config, so no resumption hides the new certificate.
    let config = client_config(&pki, Some(&pki.client));
    let second = tls_connect(proxy.addr(), config).await.expect("handshake");
    assert_eq!(serial(&second), next.serial_hex());
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn openssl_s_client_sees_access_denied() {
    let pki = Pki::new();
    let target = Target::start().await;
    let wrong = pki.leaf(&pki.ca, "wrong", LeafSpec::client("intruder"));
    let proxy = inbound_cmd(&pki, target.addr)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let text =
        tokio::task::block_in_place(|| openssl_s_client(proxy.addr(), Some(&wrong), &pki.ca.pem));
    assert!(
        text.to_lowercase().contains("access denied"),
        "openssl did not report access denied:\n{text}"
    );
    assert_eq!(target.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_unix_target_gets_the_bytes_and_idle_clients_are_cut() {
    let pki = Pki::new();
    let path = pki.path("app.sock");
    let l = tokio::net::UnixListener::bind(&path).expect("bind unix target");
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let mut proxy = inbound_cmd(&pki, format!("unix:{}", path.display()))
        .args(["--allow-any-client", "--idle-timeout", "400ms"])
        .start();
    let mut s = tls_connect(proxy.addr(), client_config(&pki, Some(&pki.client)))
        .await
        .expect("handshake");
    s.write_all(b"over unix").await.expect("write");
    let mut buf = [0u8; 9];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("echo")
        .expect("read");
    assert_eq!(&buf, b"over unix");
    // Now silent both ways: cut at --idle-timeout.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("cut within the wait");
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some("idle_timeout"), "{line}");
    assert_eq!(num_field(&line, "bytes_from_client"), 9, "{line}");
    echo.abort();
}

/// `--proxy-protocol v1` and `v2`: HAProxy (`accept-proxy`) as the target reads the client's
/// address and port from our header, as the app behind an inbound route would.
#[tokio::test(flavor = "multi_thread")]
async fn haproxy_behind_the_route_reads_the_clients_address_from_the_proxy_header() {
    use crate::proxy_protocol_interop::{HAPROXY, body, haproxy, installed};
    if !installed(HAPROXY) {
        return;
    }
    let target = tokio::task::block_in_place(haproxy);
    for version in ["v1", "v2"] {
        let pki = Pki::new();
        let proxy = inbound_cmd(&pki, format!("127.0.0.1:{}", target.port))
            .args(["--allow-any-client", "--proxy-protocol", version])
            .start();
        let mut s = tls_connect(proxy.addr(), client_config(&pki, Some(&pki.client)))
            .await
            .expect("handshake");
        let client = s.get_ref().0.local_addr().expect("client address");
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut answer = Vec::new();
        // HAProxy closes after its answer; the route passes the close on.
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("answer within the wait");
        let answer = String::from_utf8_lossy(&answer);
        let seen = body(&answer);
        let want = format!(
            "src={} src_port={} dst=127.0.0.1 dst_port={}",
            client.ip(),
            client.port(),
            proxy.addr().port()
        );
        assert_eq!(seen, want, "{version}");
    }
}
