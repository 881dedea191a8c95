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

/// The SPIFFE refusal inside a failed handshake's I/O error, in words (rustls prints the
/// inner error with `Debug`).
pub fn explain(e: &std::io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SpiffeError>().map(ToString::to_string)
        }
        _ => None,
    }
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
        let domain = peer_domain(leaf)?;
        self.by_domain
            .get(&domain)
            .ok_or(SpiffeError::NoBundle(domain))
    }
}

/// The trust domain of the leaf's SPIFFE ID (one parse of the certificate).
fn peer_domain(leaf: &CertificateDer<'_>) -> Result<String, SpiffeError> {
    let id = spiffe_id(leaf)?;
    crate::spiffe::id::trust_domain(&id)
        .map(str::to_string)
        .map_err(|why| SpiffeError::NoSpiffeId(format!("{id}: {why}")))
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
        Ok(ClientVerifier { by_domain })
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
        let domain = peer_domain(end_entity).map_err(SpiffeError::into_rustls)?;
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

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    use super::*;

    /// A trust domain's CA: its certificate (the bundle) and what signs its SVIDs.
    struct Domain {
        ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Domain {
        fn new() -> Domain {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = params.self_signed(&key).unwrap().der().clone();
            Domain {
                ca,
                issuer: Issuer::new(params, key),
            }
        }

        /// An X.509-SVID leaf for `id`, signed by this domain's CA.
        fn svid(&self, id: &str) -> CertificateDer<'static> {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::new()).unwrap();
            params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }

    fn bundles(list: &[(&str, &Domain)]) -> Bundles {
        let map = list
            .iter()
            .map(|(name, d)| (name.to_string(), vec![d.ca.clone()]))
            .collect();
        Bundles::new(&map)
    }

    fn outbound(b: Bundles, wanted: &str) -> ServerVerifier {
        ServerVerifier::new(
            b,
            Checks {
                uri_sans: vec![wanted.to_string()],
                pins: Vec::new(),
            },
        )
    }

    fn verify_server(v: &ServerVerifier, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        // The name is never checked: any name must do.
        let name = ServerName::try_from("not-the-peer.invalid").unwrap();
        v.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn verify_client(v: &ClientVerifier, leaf: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        v.verify_client_cert(leaf, &[], UnixTime::now()).map(|_| ())
    }

    /// The `SpiffeError` inside a refusal, if that is what refused.
    fn spiffe_error(e: &rustls::Error) -> Option<SpiffeError> {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<SpiffeError>().cloned()
            }
            _ => None,
        }
    }

    #[test]
    fn own_domain_accepted_without_a_name_check() {
        let a = Domain::new();
        let v = outbound(bundles(&[("a.test", &a)]), "spiffe://a.test/db");
        verify_server(&v, &a.svid("spiffe://a.test/db")).unwrap();
        let c = ClientVerifier::new(bundles(&[("a.test", &a)])).unwrap();
        verify_client(&c, &a.svid("spiffe://a.test/web")).unwrap();
    }

    #[test]
    fn cross_domain_impersonation_is_refused() {
        // b.test's CA issues an ID of a.test: it must be checked against a.test's bundle only.
        let (a, b) = (Domain::new(), Domain::new());
        let held = || bundles(&[("a.test", &a), ("b.test", &b)]);
        let forged = b.svid("spiffe://a.test/db");
        let e = verify_server(&outbound(held(), "spiffe://a.test/db"), &forged).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{e:?}"
        );
        let c = ClientVerifier::new(held()).unwrap();
        let e = verify_client(&c, &forged).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{e:?}"
        );
    }

    #[test]
    fn federated_domain_accepted_unknown_domain_refused_by_name() {
        let (a, b) = (Domain::new(), Domain::new());
        let peer = b.svid("spiffe://b.test/api");
        // Without b.test's bundle: refused, naming the domain, outbound and inbound.
        let only_a = || bundles(&[("a.test", &a)]);
        let e = verify_server(&outbound(only_a(), "spiffe://b.test/api"), &peer).unwrap_err();
        assert_eq!(
            spiffe_error(&e),
            Some(SpiffeError::NoBundle("b.test".into()))
        );
        let c = ClientVerifier::new(only_a()).unwrap();
        let e = verify_client(&c, &peer).unwrap_err();
        assert_eq!(
            spiffe_error(&e),
            Some(SpiffeError::NoBundle("b.test".into()))
        );
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert!(
            explain(&io).is_some_and(|m| m.starts_with("no bundle for trust domain b.test")),
            "{io}"
        );
        // With it (federated): accepted both ways.
        let both = || bundles(&[("a.test", &a), ("b.test", &b)]);
        verify_server(&outbound(both(), "spiffe://b.test/api"), &peer).unwrap();
        verify_client(&ClientVerifier::new(both()).unwrap(), &peer).unwrap();
    }

    #[test]
    fn the_uri_san_rule_runs_after_the_chain() {
        let a = Domain::new();
        let v = outbound(bundles(&[("a.test", &a)]), "spiffe://a.test/db");
        let e = verify_server(&v, &a.svid("spiffe://a.test/other")).unwrap_err();
        let refused_by_rule = match &e {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                matches!(
                    inner.downcast_ref::<crate::tls::verify::CheckError>(),
                    Some(crate::tls::verify::CheckError::UriSan { .. })
                )
            }
            _ => false,
        };
        assert!(refused_by_rule, "{e:?}");
    }

    #[test]
    fn a_leaf_without_a_spiffe_id_is_refused() {
        let a = Domain::new();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &a.issuer).unwrap().der().clone();
        let v = outbound(bundles(&[("a.test", &a)]), "spiffe://a.test/db");
        let e = verify_server(&v, &leaf).unwrap_err();
        assert!(
            matches!(spiffe_error(&e), Some(SpiffeError::NoSpiffeId(_))),
            "{e:?}"
        );
    }
}
