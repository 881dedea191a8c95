//! The cache of verified upstream chains (`src/tls/chain_cache.rs`) never widens what is
//! trusted: a reload flushes it (a chain the new `--ca` does not trust is refused on the very
//! next connection, well within the cache's 60 s), and the upstream's handshake signature is
//! checked on every connection, so a server that replays a chain verified a moment ago without
//! its key is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::support::files::*;
use crate::support::pki::{Identity, LeafSpec};
use crate::support::refused::{accepted, assert_failed, refused};
use crate::support::upstream::Behavior;
use crate::support::*;

/// Lets other tasks run on this worker while a blocking wait on the proxy's log goes on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A server config that never resumes, so every connection verifies the chain (or hits the
/// cache) afresh; `resolver` picks what is presented.
fn no_resumption(pki: &Pki, resolver: Arc<dyn ResolvesServerCert>) -> ServerConfig {
    init_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config
}

/// Presents `chain` signed by `good`'s key, or (once `impostor` is set) the same chain with
/// `bad`'s key: the chain bytes a verifier saw a moment ago, without the key that goes with it.
#[derive(Debug)]
struct Switching {
    good: Arc<CertifiedKey>,
    bad: Arc<CertifiedKey>,
    impostor: AtomicBool,
}

impl ResolvesServerCert for Switching {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(if self.impostor.load(Ordering::SeqCst) {
            self.bad.clone()
        } else {
            self.good.clone()
        })
    }
}

fn certified(chain: &Identity, key: &Identity) -> Arc<CertifiedKey> {
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key.key_der()).unwrap();
    Arc::new(CertifiedKey::new(chain.chain(), signing))
}

/// The fixed chain of `pki.server`.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// How the test rotates the CA bundle: by content (picked up by polling) or by SIGHUP alone.
#[derive(Clone, Copy)]
enum Reload {
    Poll,
    Sighup,
}

async fn reload_flushes(how: Reload) {
    let pki = Pki::new();
    let new_ca = pki.new_ca("new-ca", "rotated test CA");
    let ca_file = pki.path("live-ca.pem");
    atomic_copy(&pki.ca.pem, &ca_file);
    let resolver = Arc::new(Fixed(certified(&pki.server, &pki.server)));
    let up = Upstream::start(no_resumption(&pki, resolver), vec![Behavior::Echo]).await;
    let interval = match how {
        Reload::Poll => "200ms",
        Reload::Sighup => "0",
    };
    let (cert, key) = (&pki.client.cert, &pki.client.key);
    let mut proxy = run_cmd_files(up.addr, cert, key, &ca_file)
        .args(["--reload-interval", interval])
        .start();
    // The first connection verifies and remembers the chain, the second is answered from the
    // cache (the upstream never resumes): both work.
    accepted(&mut proxy, &up).await;
    accepted(&mut proxy, &up).await;

    atomic_write(&ca_file, std::fs::read(&new_ca.pem).unwrap());
    if let Reload::Sighup = how {
        proxy.signal("HUP");
    }
    blocking(|| proxy.wait_for_line("an `identity reloaded` line", WAIT, is_reloaded));
    // Seconds after the chain was remembered: only a flushed cache refuses it.
    let line = refused(&mut proxy, &up).await;
    assert_failed(&line, "tls_error", "unknown_issuer");
}

/// A reload that replaced the CA bundle refuses the old upstream chain on the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_reload_flushes_the_verified_chains() {
    reload_flushes(Reload::Poll).await;
}

/// The same with polling off: SIGHUP alone rebuilds the verifier and its cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sighup_flushes_the_verified_chains() {
    reload_flushes(Reload::Sighup).await;
}

/// A chain verified (and remembered) a moment ago, replayed by a server without its key, is
/// refused: the handshake signature is checked on every connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_remembered_chain_without_its_key_is_refused() {
    let pki = Pki::new();
    let other = pki.leaf(&pki.ca, "other-server", LeafSpec::server());
    let switching = Arc::new(Switching {
        good: certified(&pki.server, &pki.server),
        bad: certified(&pki.server, &other),
        impostor: AtomicBool::new(false),
    });
    let up = Upstream::start(no_resumption(&pki, switching.clone()), vec![Behavior::Echo]).await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    accepted(&mut proxy, &up).await;
    accepted(&mut proxy, &up).await;

    switching.impostor.store(true, Ordering::SeqCst);
    let line = refused(&mut proxy, &up).await;
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");

    switching.impostor.store(false, Ordering::SeqCst);
    accepted(&mut proxy, &up).await;
}
