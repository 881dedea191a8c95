//! A route's TLS client configuration: the client identity, upstream trust and protocol
//! settings, built whole and published behind an [`ArcSwap`] so a later reload can replace it
//! in one step (a resumed TLS 1.3 session keeps the identity it was made with, so a reload must
//! bring a fresh config and with it a fresh session cache).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use sha2::Digest as _;

use super::Settings;
use super::load::{self, IdentitySource};
use super::verify::UpstreamVerifier;
use crate::cli::TlsMin;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] load::Error),
    #[error("cannot build the TLS client configuration: {0}")]
    Build(String),
}

/// What an operator wants to know about a loaded client certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex without separators.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Subject alternative names as `DNS:…`, `IP:…`, `URI:…`, `email:…`.
    pub sans: Vec<String>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256_fingerprint: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(CertInfo {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: hex(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            sans: sans(&cert),
            sha256_fingerprint: hex(&sha2::Sha256::digest(der.as_ref())),
        })
    }

    /// `Err` with a description when `now` is outside the validity period.
    pub fn check_validity(&self, now: i64) -> Result<(), String> {
        if now > self.not_after {
            Err(format!("expired at {}", rfc3339(self.not_after)))
        } else if now < self.not_before {
            Err(format!("not valid before {}", rfc3339(self.not_before)))
        } else {
            Ok(())
        }
    }
}

fn sans(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(ext)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::URI(u) => format!("URI:{u}"),
            GeneralName::RFC822Name(e) => format!("email:{e}"),
            GeneralName::IPAddress(b) => match b.len() {
                4 => format!(
                    "IP:{}",
                    std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                ),
                16 => format!(
                    "IP:{}",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                ),
                _ => format!("IP:{}", hex(b)),
            },
            other => format!("{other}"),
        })
        .collect()
}

/// RFC 3339 in UTC for a Unix timestamp.
pub fn rfc3339(unix: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Always presents the one loaded identity. A resolver of our own (rather than
/// `with_client_auth_cert`) is where the CA names the upstream asks for become visible.
#[derive(Debug)]
struct FixedIdentity(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The crypto provider every TLS object of the program uses: aws-lc-rs with its default
/// suites and key exchange (X25519MLKEM768 first), but AES-128-GCM offered before AES-256-GCM,
/// as browsers and Go's crypto/tls do. AES-128 is not a weak choice, and it decrypts about 15%
/// faster, which shows directly in CPU per byte of a bulk transfer (see README, "Performance").
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        let aes_rank = if name.contains("AES_128") {
            0
        } else if name.contains("AES_256") {
            1
        } else {
            2
        };
        (s.tls13().is_none(), aes_rank)
    });
    Arc::new(p)
}

/// A fully built client configuration and what it was built from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<ClientConfig>,
    pub leaf: CertInfo,
    /// Digest of every file's content, to tell a later change from none.
    pub digest: [u8; 32],
    /// Secret files readable by group or others (flag, path, mode), warned about by reload.
    pub loose_permissions: Vec<(&'static str, std::path::PathBuf, u32)>,
    /// Each CRL's file and nextUpdate, for the stale-CRL warning in reload.
    pub crl_next_updates: Vec<(std::path::PathBuf, i64)>,
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
    let leaf = CertInfo::parse(&chain[0]).ok_or_else(|| {
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

    let verifier: Arc<dyn ServerCertVerifier> = upstream_verifier(settings, material)?;

    let versions: &[&rustls::SupportedProtocolVersion] = match settings.tls_min {
        TlsMin::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMin::V13 => &[&rustls::version::TLS13],
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| Error::Build(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedIdentity(Arc::new(certified))));
    config.alpn_protocols = settings.alpn.clone();
    // Resumption (tickets and TLS 1.2 session IDs) is on by default: repeat connections to the
    // upstream skip the full handshake where it allows. Each build has its own session cache,
    // so a new identity never rides on a ticket made with the old one.
    Ok(Loaded {
        config: Arc::new(config),
        leaf,
        digest: material.digest(),
        loose_permissions: material.loose_permissions(),
        crl_next_updates: material.crl_next_updates(),
    })
}

/// The identity in force for a route. Connections take a snapshot with [`Identity::current`]
/// and keep it for their lifetime; publishing a new one never touches open connections.
#[derive(Debug)]
pub struct Identity {
    current: ArcSwap<ClientConfig>,
    leaf: ArcSwap<CertInfo>,
    /// Bumped at every publish, for those who must act on a new identity at once (HTTP mode
    /// closes the idle pooled connections of the old one).
    generation: tokio::sync::watch::Sender<u64>,
}

impl Identity {
    pub fn new(loaded: &Loaded) -> Self {
        Identity {
            current: ArcSwap::new(loaded.config.clone()),
            leaf: ArcSwap::from_pointee(loaded.leaf.clone()),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn current(&self) -> Arc<ClientConfig> {
        self.current.load_full()
    }

    /// The leaf certificate of the identity in force.
    pub fn leaf(&self) -> Arc<CertInfo> {
        self.leaf.load_full()
    }

    /// Make `loaded` the identity for every new connection, in one step.
    pub fn publish(&self, loaded: &Loaded) {
        self.leaf.store(Arc::new(loaded.leaf.clone()));
        self.current.store(loaded.config.clone());
        self.generation.send_modify(|g| *g += 1);
    }

    /// Ticks after every publish.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_is_offered_first_in_each_version() {
        let names: Vec<String> = provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256", "{names:?}");
        let first12 = names.iter().position(|n| !n.starts_with("TLS13")).unwrap();
        assert!(names[first12].contains("AES_128_GCM"), "{names:?}");
        assert!(
            names[..first12].iter().all(|n| n.starts_with("TLS13")),
            "{names:?}"
        );
        assert_eq!(
            names.len(),
            rustls::crypto::aws_lc_rs::default_provider()
                .cipher_suites
                .len()
        );
    }
}
