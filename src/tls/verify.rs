//! Upstream verification: webpki's chain, name and CRL checks always run first, and
//! `--verify-uri-san` / `--pin-sha256` are checked only on top of a certificate that passed
//! them, never instead.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

/// Extra requirements on the upstream leaf, never instead of chain and name verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    /// The leaf must carry one of these URI SANs (when not empty).
    pub uri_sans: Vec<String>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo must be one of these (when not empty).
    pub pins: Vec<[u8; 32]>,
}

/// Why an extra check refused the upstream; carried inside `rustls::Error` so the connection
/// failure can be classified.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "the upstream certificate carries none of the URI SANs required by --verify-uri-san \
         (wanted {wanted}; it has {found})"
    )]
    UriSan { wanted: String, found: String },
    #[error("the upstream certificate's public key matches no --pin-sha256 (its pin is {found})")]
    Pin { found: String },
    #[error("the upstream certificate cannot be parsed for the extra checks")]
    Unparsable,
}

#[derive(Debug)]
pub struct UpstreamVerifier {
    inner: Arc<WebPkiServerVerifier>,
    checks: Checks,
}

impl UpstreamVerifier {
    pub fn new(inner: Arc<WebPkiServerVerifier>, checks: Checks) -> Self {
        UpstreamVerifier { inner, checks }
    }
}

/// `--verify-uri-san` (exact) and `--pin-sha256` on a leaf whose chain already passed.
pub fn extra_checks(checks: &Checks, leaf: &CertificateDer<'_>) -> Result<(), CheckError> {
    if checks.uri_sans.is_empty() && checks.pins.is_empty() {
        return Ok(());
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| CheckError::Unparsable)?;
    if !checks.uri_sans.is_empty() {
        let found: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !found.iter().any(|f| checks.uri_sans.iter().any(|w| w == f)) {
            return Err(CheckError::UriSan {
                wanted: checks.uri_sans.join(", "),
                found: if found.is_empty() {
                    "no URI SAN".into()
                } else {
                    found.join(", ")
                },
            });
        }
    }
    if !checks.pins.is_empty() {
        let pin: [u8; 32] = Sha256::digest(cert.tbs_certificate.subject_pki.raw).into();
        if !checks.pins.contains(&pin) {
            use base64::Engine as _;
            return Err(CheckError::Pin {
                found: base64::engine::general_purpose::STANDARD.encode(pin),
            });
        }
    }
    Ok(())
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        extra_checks(&self.checks, end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
