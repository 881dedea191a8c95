//! Peer verification by SPIFFE trust domain: the peer leaf's SPIFFE ID (its one `spiffe://`
//! URI SAN) names its trust domain, and its chain must lead to THAT domain's bundle, never to
//! any bundle held (a CA of one domain cannot vouch for an ID of another). A domain without a
//! bundle is refused by name. webpki does the chain, validity and signature checks, per
//! bundle; the route's rule (outbound `--verify-uri-san`, inbound the authorization rule) runs
//! only on a chain that passed.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use crate::tls::provider;
use crate::tls::verify::{Checks, extra_checks};

/// Why a peer's SPIFFE identity was refused before any rule; carried inside `rustls::Error`
/// so the connection failure names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error(
        "no bundle for trust domain {0}: the Workload API sent none, so its peers are not trusted"
    )]
    NoBundle(String),
    #[error("the peer certificate carries no SPIFFE ID (one spiffe:// URI SAN): {0}")]
    NoSpiffeId(String),
}

impl SpiffeError {
    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The trust bundles held, by trust domain name (own and federated).
#[derive(Debug, Clone, Default)]
pub struct Bundles {
    pub by_domain: BTreeMap<String, Arc<RootCertStore>>,
}

impl Bundles {
    /// Each domain's CA certificates as a root store; unusable CAs are left out.
    pub fn new(bundles: &BTreeMap<String, Vec<CertificateDer<'static>>>) -> Self {
        let by_domain = bundles
            .iter()
            .map(|(domain, cas)| {
                let mut roots = RootCertStore::empty();
                roots.add_parsable_certificates(cas.iter().cloned());
                (domain.clone(), Arc::new(roots))
            })
            .collect();
        Bundles { by_domain }
    }

    /// The bundle of the peer's own trust domain, by its leaf's SPIFFE ID.
    fn for_peer(&self, leaf: &CertificateDer<'_>) -> Result<&Arc<RootCertStore>, SpiffeError> {
        let id = spiffe_id(leaf)?;
        let domain = crate::spiffe::id::trust_domain(&id)
            .map_err(|why| SpiffeError::NoSpiffeId(format!("{id}: {why}")))?;
        self.by_domain
            .get(domain)
            .ok_or_else(|| SpiffeError::NoBundle(domain.to_string()))
    }
}

/// The leaf's SPIFFE ID: its one `spiffe://` URI SAN (an X.509-SVID has exactly one).
pub fn spiffe_id(leaf: &CertificateDer<'_>) -> Result<String, SpiffeError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| SpiffeError::NoSpiffeId("the certificate cannot be parsed".into()))?;
    let ids: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                        Some(u.to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match ids.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(SpiffeError::NoSpiffeId("it has none".into())),
        _ => Err(SpiffeError::NoSpiffeId(format!(
            "it has {}: {}",
            ids.len(),
            ids.join(", ")
        ))),
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Outbound: the upstream's chain to its own trust domain's bundle, then `--verify-uri-san`
/// (exact) and `--pin-sha256`, instead of the hostname check.
#[derive(Debug)]
pub struct ServerVerifier {
    bundles: Bundles,
    checks: Checks,
}

impl ServerVerifier {
    pub fn new(bundles: Bundles, checks: Checks) -> Self {
        ServerVerifier { bundles, checks }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self
            .bundles
            .for_peer(end_entity)
            .map_err(SpiffeError::into_rustls)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        extra_checks(&self.checks, end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Inbound: a client's chain to its own trust domain's bundle (webpki's client verifier of
/// that bundle); the authorization rule wraps this.
#[derive(Debug)]
pub struct ClientVerifier {
    by_domain: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    bundles: Bundles,
}

impl ClientVerifier {
    pub fn new(bundles: Bundles) -> Result<Self, String> {
        let mut by_domain = BTreeMap::new();
        for (domain, roots) in &bundles.by_domain {
            if roots.is_empty() {
                continue;
            }
            let v = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("client verifier for trust domain {domain}: {e}"))?;
            by_domain.insert(domain.clone(), v);
        }
        Ok(ClientVerifier { by_domain, bundles })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundles
            .for_peer(end_entity)
            .map_err(SpiffeError::into_rustls)?;
        let domain = crate::spiffe::id::trust_domain(
            &spiffe_id(end_entity).map_err(SpiffeError::into_rustls)?,
        )
        .map(str::to_string)
        .unwrap_or_default();
        let Some(inner) = self.by_domain.get(&domain) else {
            return Err(SpiffeError::NoBundle(domain).into_rustls());
        };
        inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
