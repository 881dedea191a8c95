//! What an inbound route negotiates with its clients: the cipher suite by the server's order
//! (AES-128-GCM first, as Go's crypto/tls and BoringSSL servers choose with AES hardware), even
//! for a client that lists AES-256-GCM first, while a client offering only one suite still gets
//! it; the key exchange group by the client's order, so the key share it sent is used and the
//! handshake needs no HelloRetryRequest.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::aws_lc_rs::{cipher_suite, default_provider, kx_group};
use rustls::pki_types::ServerName;
use rustls::{
    CipherSuite, ClientConfig, HandshakeKind, NamedGroup, RootCertStore, SupportedCipherSuite,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// A client with the test identity that offers these suites and groups, in this order.
fn client(
    pki: &Pki,
    suites: &[SupportedCipherSuite],
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Arc<ClientConfig> {
    let mut provider = default_provider();
    provider.cipher_suites = suites.to_vec();
    provider.kx_groups = groups.to_vec();
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der.clone()).expect("add CA");
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_client_auth_cert(pki.client.chain(), pki.client.key_der())
        .expect("client cert");
    Arc::new(config)
}

/// Handshake, one byte through the route and back; what was negotiated.
async fn negotiate(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> (CipherSuite, NamedGroup, HandshakeKind) {
    let tcp = connect(addr).await;
    let name = ServerName::try_from("localhost").expect("name");
    let mut s = tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake within the wait")
        .expect("handshake");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .expect("echo within the wait")
        .expect("echo");
    let c = s.get_ref().1;
    (
        c.negotiated_cipher_suite().expect("suite").suite(),
        c.negotiated_key_exchange_group().expect("group").name(),
        c.handshake_kind().expect("kind"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_route_picks_the_suite_and_the_client_picks_the_group() {
    init_crypto();
    let pki = Pki::new();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let target = l.local_addr().expect("target addr");
    let echo = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.to_string())
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .arg("--allow-any-client")
        .start();
    let (aes256, aes128) = (
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    );
    let chacha = cipher_suite::TLS13_CHACHA20_POLY1305_SHA256;
    let (x25519, p256) = (kx_group::X25519, kx_group::SECP256R1);

    // An OpenSSL-like client: AES-256 first. The route chooses AES-128.
    let got = negotiate(proxy.addr(), client(&pki, &[aes256, aes128], &[x25519])).await;
    assert_eq!(got.0, CipherSuite::TLS13_AES_128_GCM_SHA256, "{got:?}");
    // A client offering one suite gets it.
    let got = negotiate(proxy.addr(), client(&pki, &[aes256], &[x25519])).await;
    assert_eq!(got.0, CipherSuite::TLS13_AES_256_GCM_SHA384, "{got:?}");
    let got = negotiate(proxy.addr(), client(&pki, &[chacha], &[x25519])).await;
    assert_eq!(
        got.0,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        "{got:?}"
    );
    // The group is the client's first choice, with the share it sent: no HelloRetryRequest.
    let got = negotiate(proxy.addr(), client(&pki, &[aes128], &[p256, x25519])).await;
    assert_eq!(
        (got.1, got.2),
        (NamedGroup::secp256r1, HandshakeKind::Full),
        "{got:?}"
    );
    let got = negotiate(proxy.addr(), client(&pki, &[aes128], &[x25519, p256])).await;
    assert_eq!(
        (got.1, got.2),
        (NamedGroup::X25519, HandshakeKind::Full),
        "{got:?}"
    );
    drop(proxy);
    echo.abort();
}
