//! `--reload-canary`: a rotated client certificate is tried on the upstream before it is
//! published. An upstream that trusts only the old client CA keeps the old identity in force
//! (error line with the alert and the CA names it accepts, `reloads_total{result=
//! "rejected_by_upstream"}`), until it trusts the new CA too: the next poll publishes. An
//! unreachable upstream, an expired identity in force, or no `--reload-canary` publish at once.

use std::sync::{Arc, Mutex};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::support::admin::{admin_addr, get, scrape, scrape_until};
use crate::support::files::*;
use crate::support::pki::{Ca, Identity, LeafSpec};
use crate::support::refused::accepted;
use crate::support::*;

const REJECTED: [(&str, &str); 1] = [("result", "rejected_by_upstream")];
const RELOADS: &str = "mtls_sidecar_reloads_total";

/// A client-certificate verifier whose trusted CAs the test swaps while the upstream runs.
#[derive(Debug)]
struct SwapVerifier {
    inner: Mutex<Arc<dyn ClientCertVerifier>>,
    /// Leaked on each swap (a test lives briefly): `root_hint_subjects` returns a borrow.
    hints: Mutex<&'static [DistinguishedName]>,
}

impl SwapVerifier {
    fn new(cas: &[&Ca]) -> Arc<SwapVerifier> {
        let v = Arc::new(SwapVerifier {
            inner: Mutex::new(webpki(cas)),
            hints: Mutex::new(&[]),
        });
        v.trust(cas);
        v
    }

    /// Trust exactly `cas` from now on.
    fn trust(&self, cas: &[&Ca]) {
        let inner = webpki(cas);
        let hints: Vec<DistinguishedName> = inner.root_hint_subjects().to_vec();
        *self.hints.lock().unwrap() = Vec::leak(hints);
        *self.inner.lock().unwrap() = inner;
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.lock().unwrap().clone()
    }
}

fn webpki(cas: &[&Ca]) -> Arc<dyn ClientCertVerifier> {
    init_crypto();
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der.clone()).unwrap();
    }
    WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap()
}

impl ClientCertVerifier for SwapVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        *self.hints.lock().unwrap()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// An echo upstream (the good server identity) whose client CAs `verifier` decides.
async fn upstream(pki: &Pki, verifier: Arc<SwapVerifier>) -> Upstream {
    let config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server.chain(), pki.server.key_der())
        .unwrap();
    Upstream::start(config, vec![Behavior::Echo]).await
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Waits for the `identity reloaded` line naming `id`'s serial.
fn wait_reloaded(proxy: &mut Sidecar, id: &Identity) -> String {
    let serial = id.serial_hex();
    blocking(|| {
        proxy.wait_for_line("identity reloaded to the new serial", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    })
}

async fn wait_upstream_handshakes(up: &Upstream, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    while up.stats.tls_accepted() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream recorded {} handshakes, not {n}",
            up.stats.tls_accepted()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn assert_presented(conn: &crate::support::upstream::Conn, id: &Identity, when: &str) {
    let der = id.chain()[0].to_vec();
    assert!(
        conn.client_der.as_deref() == Some(&der[..]),
        "{when}: the upstream saw another client certificate ({:?})",
        conn.client_cn
    );
}

/// The old client from the test CA, the new one from a CA the upstream does not trust yet.
fn identities(pki: &Pki) -> (Identity, Ca, Identity) {
    let old = pki.leaf(&pki.ca, "canary-old", LeafSpec::client("canary-old"));
    let new_ca = pki.new_ca("canary-new-ca", "canary new client CA");
    let new = pki.leaf(&new_ca, "canary-new", LeafSpec::client("canary-new"));
    (old, new_ca, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn refused_rotation_keeps_the_old_identity_until_the_upstream_trusts_the_new_ca() {
    let pki = Pki::new();
    let (old, new_ca, new) = identities(&pki);
    let live = LiveIdentity::new(pki.dir.path(), &old);
    let verifier = SwapVerifier::new(&[&pki.ca]);
    let up = upstream(&pki, verifier.clone()).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--reload-canary", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let c = accepted(&mut proxy, &up).await;
    assert_presented(&c, &old, "before the rotation");

    live.install(&new);
    let line = blocking(|| {
        proxy.wait_for_line("the canary's refusal", WAIT, |l| {
            l.contains("ERROR") && l.contains("refused the new client certificate")
        })
    });
    assert_eq!(field(&line, "alert"), Some("UnknownCA"), "{line}");
    let cas = field(&line, "accepted_cas").unwrap_or_else(|| panic!("no accepted_cas: {line}"));
    assert!(cas.contains("mtls-sidecar test CA"), "{line}");
    assert!(!cas.contains("canary new client CA"), "{line}");
    let m = scrape_until(admin, |m| m.value(RELOADS, &REJECTED) >= 2.0).await;
    assert_eq!(m.value(RELOADS, &[("result", "success")]), 0.0);

    // Still the old identity: on the wire and in /status.
    let c = accepted(&mut proxy, &up).await;
    assert_presented(&c, &old, "while the upstream refuses the new one");
    let status = get(admin, "/status").await.body;
    let serial = |id: &Identity| format!("\"serial\":\"{}\"", id.serial_hex());
    assert!(status.contains(&serial(&old)), "{status}");
    assert!(!status.contains(&serial(&new)), "{status}");
    assert!(
        status.contains("refused the new client certificate"),
        "{status}"
    );
    assert!(!proxy.stderr().contains("identity reloaded"));

    // The upstream now trusts both CAs: the next poll publishes the new identity.
    let before = up.stats.tls_accepted();
    verifier.trust(&[&pki.ca, &new_ca]);
    wait_reloaded(&mut proxy, &new);
    // The canary's accepted handshake is recorded by the upstream's task, which may finish
    // after the sidecar published; `accepted` counts connections, so wait for it first.
    wait_upstream_handshakes(&up, before + 1).await;
    let c = accepted(&mut proxy, &up).await;
    assert_presented(&c, &new, "after the upstream trusts the new CA");
    let status = get(admin, "/status").await.body;
    assert!(status.contains(&serial(&new)), "{status}");
    let m = scrape(admin).await;
    assert_eq!(m.value(RELOADS, &[("result", "success")]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn without_the_canary_a_refused_rotation_is_published_at_once() {
    let pki = Pki::new();
    let (old, _new_ca, new) = identities(&pki);
    let live = LiveIdentity::new(pki.dir.path(), &old);
    let up = upstream(&pki, SwapVerifier::new(&[&pki.ca])).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    live.install(&new);
    wait_reloaded(&mut proxy, &new);
    let m = scrape(admin).await;
    assert_eq!(m.value(RELOADS, &REJECTED), 0.0);
    assert!(
        !proxy.stderr().contains("reload canary"),
        "{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn an_unreachable_upstream_does_not_block_the_rotation() {
    let pki = Pki::new();
    let (old, _new_ca, new) = identities(&pki);
    let live = LiveIdentity::new(pki.dir.path(), &old);
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut proxy = run_cmd_files(closed, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--reload-canary", "--connect-timeout", "2s"])
        .start();
    live.install(&new);
    let line = blocking(|| {
        proxy.wait_for_line("the canary's inconclusive line", WAIT, |l| {
            l.contains("reload canary could not judge")
        })
    });
    assert!(line.contains("WARN"), "{line}");
    wait_reloaded(&mut proxy, &new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn an_expired_identity_in_force_is_replaced_even_if_refused() {
    let pki = Pki::new();
    let (_old, _new_ca, new) = identities(&pki);
    let expired = pki.client_expired();
    let live = LiveIdentity::new(pki.dir.path(), &expired);
    let up = upstream(&pki, SwapVerifier::new(&[&pki.ca])).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--reload-canary"])
        .start();
    live.install(&new);
    let line = blocking(|| {
        proxy.wait_for_line("the refusal overridden", WAIT, |l| {
            l.contains("no longer valid; publishing the new one anyway")
        })
    });
    assert_eq!(field(&line, "alert"), Some("UnknownCA"), "{line}");
    wait_reloaded(&mut proxy, &new);
}

/// Under TLS 1.2 the upstream's verdict is an alert inside the handshake: refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_tls12_upstream_refusal_keeps_the_old_identity() {
    let pki = Pki::new();
    let (old, _new_ca, new) = identities(&pki);
    let live = LiveIdentity::new(pki.dir.path(), &old);
    let config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_client_cert_verifier(SwapVerifier::new(&[&pki.ca]))
        .with_single_cert(pki.server.chain(), pki.server.key_der())
        .unwrap();
    let up = Upstream::start(config, vec![Behavior::Echo]).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--reload-canary"])
        .start();
    live.install(&new);
    let line = blocking(|| {
        proxy.wait_for_line("the canary's refusal", WAIT, |l| {
            l.contains("ERROR") && l.contains("refused the new client certificate")
        })
    });
    assert_eq!(field(&line, "alert"), Some("UnknownCA"), "{line}");
    let c = accepted(&mut proxy, &up).await;
    assert_presented(&c, &old, "while the TLS 1.2 upstream refuses the new one");
}

/// A reload that changes only `--ca` (our trust in the upstream) is not a new identity: no
/// canary dial, published at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_ca_only_change_is_published_without_a_canary() {
    let pki = Pki::new();
    let live = LiveIdentity::new(pki.dir.path(), &pki.client);
    let ca = pki.write("canary-ca.pem", std::fs::read(&pki.ca.pem).unwrap());
    let up = upstream(&pki, SwapVerifier::new(&[&pki.ca])).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &ca)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .args(["--reload-canary"])
        .start();
    let other = pki.new_ca("canary-extra-ca", "an extra upstream CA");
    let mut bundle = std::fs::read(&pki.ca.pem).unwrap();
    bundle.extend(std::fs::read(&other.pem).unwrap());
    atomic_write(&ca, bundle);
    blocking(|| proxy.wait_for_line("the CA-only reload", WAIT, is_reloaded));
    accepted(&mut proxy, &up).await;
    assert!(
        !proxy.stderr().contains("reload canary"),
        "{}",
        proxy.stderr()
    );
    assert_eq!(up.stats.tls_accepted(), 1, "a canary dial was made");
}

/// `--reload-interval 0` (SIGHUP only): a refused rotation is kept back only while the identity
/// in force is valid. Once it expires, the waiting identity is published without another SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_refused_rotation_is_published_when_the_kept_identity_expires_without_polling() {
    let pki = Pki::new();
    let (_old, _new_ca, new) = identities(&pki);
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let spec = LeafSpec {
        validity: Some((now - TimeDuration::days(1), now + TimeDuration::seconds(8))),
        ..LeafSpec::client("canary-short")
    };
    let short = pki.leaf(&pki.ca, "canary-short", spec);
    let live = LiveIdentity::new(pki.dir.path(), &short);
    let up = upstream(&pki, SwapVerifier::new(&[&pki.ca])).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "0"])
        .args(["--reload-canary", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    live.install(&new);
    proxy.signal("HUP");
    blocking(|| {
        proxy.wait_for_line("the canary's refusal after SIGHUP", WAIT, |l| {
            l.contains("ERROR") && l.contains("refused the new client certificate")
        })
    });
    let serial = |id: &Identity| format!("\"serial\":\"{}\"", id.serial_hex());
    let status = get(admin, "/status").await.body;
    assert!(status.contains(&serial(&short)), "{status}");
    assert!(!status.contains(&serial(&new)), "{status}");

    // No further SIGHUP: the expiry of the kept identity alone brings the new one in.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let status = get(admin, "/status").await.body;
        if status.contains(&serial(&new)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting identity was not published after the kept one expired: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let published_at = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        published_at > short.not_after_unix(),
        "published before the kept identity expired"
    );
    assert!(
        proxy
            .stderr()
            .contains("no longer valid; publishing the new one anyway"),
        "{}",
        proxy.stderr()
    );
    wait_reloaded(&mut proxy, &new);
}
