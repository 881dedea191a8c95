//! An inbound route's TLS server configuration: the route's certificate and key, client
//! certificates required and verified against `--ca` with the CRLs (webpki), then the route's
//! authorization [`Rule`]. Built whole from one snapshot of the files, with a fresh ticket key
//! and session cache, so a reload (new certificate, CA or CRL) never lets a client resume a
//! session made under the old material.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, server::danger::ClientCertVerifier};

use super::authorize::{AuthorizingVerifier, Rule};
use super::load::{self, Material};
use super::{Settings, provider};
use crate::cli::TlsMin;

/// Why an inbound route's server configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] load::Error),
    #[error("cannot build the TLS server configuration: {0}")]
    Build(String),
}

/// TLS 1.2 sessions remembered per route (the cache is in memory and dropped at each reload).
const SESSION_CACHE: usize = 1024;

/// Always presents the route's one certificate, whatever SNI the client sent.
#[derive(Debug)]
struct FixedServerCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The client verifier: webpki (chain to `--ca`, validity, CRLs) wrapped by the rule.
fn client_verifier(material: &Material, rule: &Rule) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let ca = material
        .ca
        .as_ref()
        .ok_or_else(|| Error::Build("an inbound route needs --ca".into()))?;
    let roots = load::ca_bundle(ca)?;
    let mut crls = Vec::new();
    for f in &material.crls {
        crls.extend(load::crls(f)?);
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(load::newest_crl_per_issuer(crls))
        .build()
        .map_err(|e| Error::Build(format!("client verifier: {e}")))?;
    Ok(Arc::new(AuthorizingVerifier::new(webpki, rule.clone())))
}

/// The whole server configuration of an inbound route from one snapshot.
pub fn build(
    settings: &Settings,
    rule: &Rule,
    material: &Material,
    certified: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = client_verifier(material, rule)?;
    build_with(settings, verifier, certified)
}

/// The whole server configuration from a client verifier already made (a SPIFFE route's
/// verifier by trust domain, wrapped by its rule).
pub fn build_with(
    settings: &Settings,
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, Error> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.tls_min {
        TlsMin::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMin::V13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Error::Build(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(FixedServerCert(certified)));
    config.alpn_protocols = settings.alpn.clone();
    // The cipher suite by our order (AES-128-GCM, AES-256-GCM, ChaCha20; see `provider`), not
    // the client's, as Go's crypto/tls (ghostunnel) and BoringSSL (Envoy) servers do with AES
    // hardware: OpenSSL and curl clients list AES-256 first (a 256 MiB download through the
    // route cost 1,429 M user-space instructions under callgrind with AES-256, 1,343 M with
    // AES-128). The key exchange group still follows the client's order, so the key share it
    // sent is used.
    config.ignore_client_order = true;
    // Fresh at every build: a new ticket key (TLS 1.3 tickets, TLS 1.2 tickets) and a new
    // session cache (TLS 1.2 session IDs), so nothing resumes across a reload.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| Error::Build(format!("session ticket key: {e}")))?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(Arc::new(config))
}
