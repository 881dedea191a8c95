//! A route's TLS client configuration: the client identity, upstream trust and protocol
//! settings, built whole and published behind an [`ArcSwap`] so a later reload can replace it
//! in one step (a resumed TLS 1.3 session keeps the identity it was made with, so a reload must
//! bring a fresh config and with it a fresh session cache).

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};

use super::Settings;
use super::cert::CertInfo;
use super::chain_cache::CachingVerifier;
use super::load::{self, IdentitySource};
use super::provider;
use super::trust::TrustFacts;
use super::verify::UpstreamVerifier;
use crate::cli::TlsMin;

/// Why a route's client configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] load::Error),
    #[error("cannot build the TLS client configuration: {0}")]
    Build(String),
    #[error(transparent)]
    Server(#[from] super::server::Error),
}

/// Always presents the one loaded client certificate and key. A resolver of our own (rather than
/// `with_client_auth_cert`) is where the CA names the upstream asks for become visible.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A fully built client configuration and what it was built from: one generation of a
/// route's identity, published whole and never changed afterwards.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// What every new upstream connection is made with.
    pub config: Arc<ClientConfig>,
    /// An inbound route's server configuration, built from the same snapshot.
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// The client certificate inside `config`, described for `/status`, metrics and logs.
    pub leaf: Arc<CertInfo>,
    /// Digest of every file's content, to tell a later change from none.
    pub digest: [u8; 32],
    /// Secret files readable by group or others (flag, path, mode), warned about by reload.
    pub loose_permissions: Vec<(&'static str, std::path::PathBuf, u32)>,
    /// Each CRL's file and nextUpdate, for the stale-CRL warning in reload.
    pub crl_next_updates: Vec<(std::path::PathBuf, i64)>,
    /// A `--spiffe` route's SPIFFE ID (of the SVID in force), for `/status`.
    pub spiffe_id: Option<String>,
    /// `Some(why)` when no identity is in force (a `--spiffe` route before its first SVID, or
    /// after the Workload API withdrew it): `config` then is a placeholder nothing dials with;
    /// connections wait for a publish (up to `--connect-timeout`) or fail with `no_identity`.
    pub absent: Option<String>,
    /// The CAs trusted and the intermediates sent, for `/status`, the CA expiry gauge and the
    /// CA expiry warnings.
    pub trust: Arc<TrustFacts>,
    /// The upstream verifier inside `config` (rustls gives no access to it there), so that
    /// `/upstreamz` can record the upstream's chain with the very verifier in force; `None`
    /// while absent.
    pub verifier: Option<Arc<dyn ServerCertVerifier>>,
}

/// The one client configuration every absent identity carries: told apart by pointer.
fn placeholder_config() -> Arc<ClientConfig> {
    static PLACEHOLDER: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    PLACEHOLDER
        .get_or_init(|| {
            Arc::new(
                ClientConfig::builder_with_provider(provider())
                    // Invariant: aws-lc-rs supports the default versions (TLS 1.2 and 1.3).
                    .with_safe_default_protocol_versions()
                    .expect("the default provider supports the default versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        })
        .clone()
}

impl Loaded {
    /// No identity in force, and why (the `/readyz` text).
    pub fn absent(why: impl Into<String>) -> Self {
        Loaded {
            config: placeholder_config(),
            server: None,
            leaf: Arc::new(CertInfo {
                subject: "-".into(),
                issuer: "-".into(),
                serial: "-".into(),
                not_before: 0,
                not_after: 0,
                sans: Vec::new(),
                sha256_fingerprint: "-".into(),
            }),
            digest: [0; 32],
            loose_permissions: Vec::new(),
            crl_next_updates: Vec::new(),
            spiffe_id: None,
            absent: Some(why.into()),
            trust: Arc::default(),
            verifier: None,
        }
    }
}

/// Whether `config` is the placeholder of an absent identity (nothing may dial with it).
pub fn is_placeholder(config: &Arc<ClientConfig>) -> bool {
    Arc::ptr_eq(config, &placeholder_config())
}

/// Read every file of `settings` and build a complete client configuration from that one
/// snapshot. Nothing is published here: the caller decides.
pub fn build(settings: &Settings) -> Result<Loaded, Error> {
    let material = load::Material::read(&settings.files)?;
    build_from(settings, &material)
}

/// The upstream verifier of a route: webpki's chain, name and CRL checks with the trust of
/// `material`, then the route's extra checks.
pub fn upstream_verifier(
    settings: &Settings,
    material: &load::Material,
) -> Result<Arc<UpstreamVerifier>, Error> {
    let roots = match &material.ca {
        Some(ca) => load::ca_bundle(ca)?,
        None => load::system_roots("--ca")?,
    };
    let mut crls = Vec::new();
    for f in &material.crls {
        crls.extend(load::crls(f)?);
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(load::newest_crl_per_issuer(crls))
        .build()
        .map_err(|e| Error::Build(format!("upstream verifier: {e}")))?;
    Ok(Arc::new(UpstreamVerifier::new(
        webpki,
        settings.checks.clone(),
    )))
}

/// Parse a snapshot, check the key belongs to the certificate, and build the whole client
/// configuration (verifier with CRLs and extra checks, protocol versions, ALPN, a fresh
/// session cache).
pub fn build_from(settings: &Settings, material: &load::Material) -> Result<Loaded, Error> {
    let (chain, key) = material.identity()?;
    let main_file = settings.files.identity.main_file();
    let trust = TrustFacts::from_files(
        &chain,
        &main_file.display().to_string(),
        material.ca.as_ref(),
    );
    let leaf = CertInfo::parse(&chain[0]).map(Arc::new).ok_or_else(|| {
        Error::Build(format!(
            "{}: the leaf certificate cannot be parsed",
            main_file.display()
        ))
    })?;

    let provider = provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        let (cert, key) = match &settings.files.identity {
            IdentitySource::Pem { cert, key, .. } => (cert.clone(), key.clone()),
            IdentitySource::Pkcs12 { file, .. } => (file.clone(), file.clone()),
            IdentitySource::Spiffe(s) => (s.socket.clone(), s.socket.clone()),
        };
        match e {
            rustls::Error::InconsistentKeys(_) => {
                Error::Load(load::Error::KeyMismatch { cert, key })
            }
            other => Error::Load(load::Error::BadKey {
                flag: "--key",
                path: key,
                detail: other.to_string(),
            }),
        }
    })?;

    let certified = Arc::new(certified);
    let server = match &settings.inbound {
        Some(rule) => Some(super::server::build(
            settings,
            rule,
            material,
            certified.clone(),
        )?),
        None => None,
    };
    // A new cache with every build: a reload never reuses a chain verified under the old trust.
    let verifier: Arc<dyn ServerCertVerifier> =
        Arc::new(CachingVerifier::new(upstream_verifier(settings, material)?));
    Ok(Loaded {
        config: Arc::new(client_config(settings, verifier.clone(), certified)?),
        server,
        leaf,
        digest: material.digest(),
        loose_permissions: material.loose_permissions(),
        crl_next_updates: material.crl_next_updates(),
        spiffe_id: None,
        absent: None,
        trust: Arc::new(trust),
        verifier: Some(verifier),
    })
}

/// The client configuration: protocol versions, `verifier`, the one client certificate, ALPN
/// and (by default) a fresh session cache.
pub fn client_config(
    settings: &Settings,
    verifier: Arc<dyn ServerCertVerifier>,
    certified: Arc<CertifiedKey>,
) -> Result<ClientConfig, Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.tls_min {
        TlsMin::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMin::V13 => &[&rustls::version::TLS13],
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Build(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(certified)));
    config.alpn_protocols = settings.alpn.clone();
    // Resumption (tickets and TLS 1.2 session IDs) is on by default: repeat connections to the
    // upstream skip the full handshake where it allows. Each build has its own session cache,
    // so a new identity never rides on a ticket made with the old one.
    Ok(config)
}

/// The identity in force for a route. Connections take a snapshot with [`Identity::current`]
/// and keep it for their lifetime; publishing a new one never touches open connections.
#[derive(Debug)]
pub struct Identity {
    /// Everything one build produced, behind one pointer: a reader gets the leaf and the
    /// client config of the same generation, never the new leaf beside the old config.
    in_force: ArcSwap<Loaded>,
    /// Bumped after every publish, for those who must act on a new identity at once (HTTP mode
    /// closes the idle pooled connections of the old one).
    generation: tokio::sync::watch::Sender<u64>,
}

impl Identity {
    pub fn new(loaded: &Loaded) -> Self {
        Identity {
            in_force: ArcSwap::from_pointee(loaded.clone()),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The whole generation in force, for a reader that needs more than one part of it.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.in_force.load_full()
    }

    /// The client configuration in force.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.in_force.load().config.clone()
    }

    /// An inbound route's server configuration in force.
    pub fn server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.in_force.load().server.clone()
    }

    /// The leaf certificate of the identity in force.
    pub fn leaf(&self) -> Arc<CertInfo> {
        self.in_force.load().leaf.clone()
    }

    /// Make `loaded` the identity for every new connection, in one step. Subscribers hear of
    /// it only after the store, so one who wakes up reads the new generation.
    pub fn publish(&self, loaded: Arc<Loaded>) {
        self.in_force.store(loaded);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The identity in force once there is one: at once, or after waiting up to `limit` for
    /// a publish; else why there is none.
    pub async fn present(&self, limit: std::time::Duration) -> Result<Arc<Loaded>, String> {
        let mut ticks = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let loaded = self.loaded();
            let Some(why) = loaded.absent.clone() else {
                return Ok(loaded);
            };
            match tokio::time::timeout_at(deadline, ticks.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(why),
            }
        }
    }

    /// Ticks after every publish.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustls::RootCertStore;

    use super::*;
    use crate::pki::DevPki;
    use crate::tls::file::test_file as file;

    /// A generation of its own: a fresh client certificate, `tag` as its digest.
    fn generation(tag: u8) -> Arc<Loaded> {
        let pki = DevPki::generate().unwrap();
        let chain =
            load::certificates(&file("--cert", "client.pem", pki.client.as_bytes())).unwrap();
        let key = load::private_key(
            &file("--key", "client-key.pem", pki.client_key.as_bytes()),
            None,
        )
        .unwrap();
        let leaf = Arc::new(CertInfo::parse(&chain[0]).unwrap());
        let certified = CertifiedKey::from_der(chain, key, &provider()).unwrap();
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_client_cert_resolver(Arc::new(FixedClientCert(Arc::new(certified))));
        Arc::new(Loaded {
            config: Arc::new(config),
            server: None,
            leaf,
            digest: [tag; 32],
            loose_permissions: Vec::new(),
            crl_next_updates: Vec::new(),
            spiffe_id: None,
            absent: None,
            trust: Arc::default(),
            verifier: None,
        })
    }

    /// The serial of the certificate the config would present, and the digest and leaf serial
    /// the same snapshot names: equal when the snapshot is one generation.
    fn parts(loaded: &Loaded) -> (String, [u8; 32], String) {
        let presented = loaded
            .config
            .client_auth_cert_resolver
            .resolve(&[], &[])
            .unwrap();
        let serial = CertInfo::parse(&presented.cert[0]).unwrap().serial;
        (serial, loaded.digest, loaded.leaf.serial.clone())
    }

    #[test]
    fn readers_never_see_two_generations_mixed() {
        let (a, b) = (generation(1), generation(2));
        assert_ne!(a.leaf.serial, b.leaf.serial);
        let expected = |digest: [u8; 32]| if digest == a.digest { &a } else { &b };
        let identity = Identity::new(&a);
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..20_000 {
                    identity.publish(if i % 2 == 0 { b.clone() } else { a.clone() });
                }
                done.store(true, Ordering::Release);
            });
            let mut reads = 0;
            while !done.load(Ordering::Acquire) || reads == 0 {
                let seen = identity.loaded();
                let (presented, digest, leaf) = parts(&seen);
                let whole = expected(digest);
                assert_eq!(presented, whole.leaf.serial, "config of another generation");
                assert_eq!(leaf, whole.leaf.serial, "leaf of another generation");
                reads += 1;
            }
        });
    }

    #[test]
    fn subscribers_wake_to_the_new_generation() {
        let (a, b) = (generation(1), generation(2));
        let identity = Identity::new(&a);
        let mut ticks = identity.subscribe();
        assert!(!ticks.has_changed().unwrap());
        identity.publish(b.clone());
        assert!(ticks.has_changed().unwrap());
        assert_eq!(*ticks.borrow_and_update(), 1);
        assert!(Arc::ptr_eq(&identity.loaded(), &b));
        assert!(Arc::ptr_eq(&identity.current(), &b.config));
        assert_eq!(identity.leaf().serial, b.leaf.serial);
    }
}
