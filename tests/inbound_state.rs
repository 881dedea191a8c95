//! Inbound routes seen from outside: `/metrics` (outcomes, the new reasons, byte directions,
//! the route's own certificate expiry), `/status` (`direction`, `target`), and sessions that
//! never outlive a reload: a client a new CRL revokes cannot resume.

use std::sync::Arc;

use rustls::{AlertDescription, ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::admin::{Metrics, admin_addr, get};
use crate::support::pki::{CLIENT_CN, LeafSpec};
use crate::support::*;

const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn config(pki: &Pki, id: &crate::support::pki::Identity) -> Arc<ClientConfig> {
    init_crypto();
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der.clone()).expect("add CA");
    Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(id.chain(), id.key_der())
            .expect("client cert"),
    )
}

/// One TLS connection through the proxy: send `ping`, read the echo (which also processes the
/// session tickets), or the alert that refused us. Returns how the handshake went.
async fn ping(
    addr: std::net::SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<Option<HandshakeKind>, Option<AlertDescription>> {
    let tcp = connect(addr).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut s = match tokio::time::timeout(WAIT, connector.connect(name, tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(alert(&e)),
        Err(_) => panic!("handshake hung"),
    };
    let kind = s.get_ref().1.handshake_kind();
    let _ = s.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(WAIT, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(kind),
        Ok(Err(e)) => Err(alert(&e)),
        other => panic!("unexpected read: {other:?}"),
    }
}

fn alert(e: &std::io::Error) -> Option<AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// An echo target on 127.0.0.1 (a task that lives as long as the test's runtime).
async fn echo_target() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_status_show_the_inbound_route() {
    let pki = Pki::new();
    let target = echo_target().await;
    let wrong = pki.leaf(&pki.ca, "wrong", LeafSpec::client("intruder"));
    let mut proxy = Cmd::new()
        .args([
            "run",
            "--inbound",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .arg("--target")
        .arg(target.to_string())
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--verify-cn", CLIENT_CN])
        .start();
    let admin = admin_addr(&mut proxy);
    assert_eq!(
        ping(proxy.addr(), config(&pki, &pki.client))
            .await
            .map(|_| ()),
        Ok(())
    );
    assert_eq!(
        ping(proxy.addr(), config(&pki, &wrong)).await,
        Err(Some(AlertDescription::AccessDenied))
    );
    proxy.wait_conn_lines(2);
    let m = Metrics::parse(&get(admin, "/metrics").await.body);
    let route = ("route", "default");
    let v = |name: &str, labels: &[(&str, &str)]| m.get(name, labels).unwrap_or(-1.0);
    assert_eq!(
        v(
            "mtls_sidecar_connections_total",
            &[route, ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "mtls_sidecar_connections_total",
            &[route, ("outcome", "tls_error")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "mtls_sidecar_connection_failures_total",
            &[route, ("reason", "not_allowed")]
        ),
        1.0
    );
    assert_eq!(
        v(
            "mtls_sidecar_bytes_total",
            &[route, ("direction", "to_upstream")]
        ),
        4.0
    );
    assert_eq!(
        v(
            "mtls_sidecar_bytes_total",
            &[route, ("direction", "from_upstream")]
        ),
        4.0
    );
    assert_eq!(
        v(
            "mtls_sidecar_client_cert_expiry_timestamp_seconds",
            &[route]
        ),
        pki.server.not_after_unix() as f64
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.body).expect("status JSON");
    let r = &status["routes"][0];
    assert_eq!(r["direction"], "inbound", "{status}");
    assert_eq!(r["target"], target.to_string(), "{status}");
    assert_eq!(get(admin, "/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_revoked_by_a_reloaded_crl_cannot_resume() {
    let pki = Pki::new();
    let target = echo_target().await;
    let crl = pki.ca.crl(&pki.path("live.crl"), &[]);
    let mut proxy = Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.to_string())
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .arg("--crl")
        .arg(&crl)
        .args(["--allow-any-client", "--reload-interval", "0"])
        .start();
    let cfg = config(&pki, &pki.client);
    assert_eq!(
        ping(proxy.addr(), cfg.clone()).await,
        Ok(Some(HandshakeKind::Full))
    );
    // Resumption works at all (so the check below can fail).
    assert_eq!(
        ping(proxy.addr(), cfg.clone()).await,
        Ok(Some(HandshakeKind::Resumed))
    );
    let next = pki.path("next.crl");
    pki.ca.crl(&next, &[&pki.client.der]);
    crate::support::files::atomic_copy(&next, &crl);
    proxy.signal("HUP");
    proxy.wait_for_line("the reload line", WAIT, |l| l.contains("identity reloaded"));
    assert_eq!(
        ping(proxy.addr(), cfg).await,
        Err(Some(AlertDescription::CertificateRevoked)),
        "a revoked client resumed or got in"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_server_certificate_starts_not_ready() {
    let pki = Pki::new();
    let expired = pki.server_expired();
    let mut proxy = Cmd::new()
        .args([
            "run",
            "--inbound",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(["--target", "127.0.0.1:9", "--allow-any-client"])
        .arg("--cert")
        .arg(&expired.cert)
        .arg("--key")
        .arg(&expired.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .start();
    let admin = admin_addr(&mut proxy);
    let ready = get(admin, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("server certificate"), "{}", ready.body);
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the expiry error", WAIT, |l| {
            l.contains("ERROR") && l.contains("server certificate is outside its validity period")
        })
    });
}
