//! A small SPIFFE PKI for the tests: one CA per trust domain (with the URI SAN `spiffe://TD`,
//! as SPIRE's), X.509-SVIDs with one URI SAN, serverAuth and clientAuth, and rustls configs that
//! present them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration as TimeDuration, OffsetDateTime};

use super::init_crypto;

/// The CA of one trust domain (its certificate carries the URI SAN `spiffe://TD`, as SPIRE's do).
pub struct SpiffeCa {
    pub trust_domain: String,
    pub der: CertificateDer<'static>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// One X.509-SVID: a leaf with the single URI SAN `id`, serverAuth and clientAuth.
#[derive(Clone)]
pub struct Svid {
    pub id: String,
    pub trust_domain: String,
    pub der: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl SpiffeCa {
    /// A fresh CA for `trust_domain` (e.g. `example.org`).
    pub fn new(trust_domain: &str) -> SpiffeCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("SPIFFE CA {trust_domain}"));
        let uri = Ia5String::try_from(format!("spiffe://{trust_domain}")).expect("IA5 URI");
        params.subject_alt_names.push(SanType::URI(uri));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = now();
        params.not_before = now - TimeDuration::days(1);
        params.not_after = now + TimeDuration::days(30);
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        SpiffeCa {
            trust_domain: trust_domain.to_owned(),
            der: issuer.der().clone(),
            issuer,
        }
    }

    /// An SVID for `spiffe://TD{path}` (`path` starts with `/`), valid from a minute ago for an
    /// hour, like SPIRE's.
    pub fn svid(&self, path: &str) -> Svid {
        let now = now();
        self.svid_valid(
            path,
            now - TimeDuration::minutes(1),
            now + TimeDuration::hours(1),
        )
    }

    /// An SVID for `spiffe://TD{path}` with the given validity.
    pub fn svid_valid(&self, path: &str, from: OffsetDateTime, until: OffsetDateTime) -> Svid {
        let id = format!("spiffe://{}{path}", self.trust_domain);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "SVID");
        let uri = Ia5String::try_from(id.clone()).expect("IA5 URI");
        params.subject_alt_names.push(SanType::URI(uri));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(fresh_serial());
        params.not_before = from;
        params.not_after = until;
        let key = KeyPair::generate().expect("SVID key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign SVID");
        Svid {
            id,
            trust_domain: self.trust_domain.clone(),
            der: cert.der().clone(),
            pkcs8: key.serialize_der(),
        }
    }
}

impl Svid {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pkcs8.clone()).into()
    }

    /// A server config presenting this SVID and requiring a client chain to one of `client_cas`
    /// (an in-process SPIFFE upstream).
    pub fn server_config(&self, client_cas: &[&SpiffeCa]) -> ServerConfig {
        init_crypto();
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots(client_cas)))
            .build()
            .expect("client verifier");
        ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.key_der())
            .expect("server config")
    }

    /// A client config presenting this SVID. SPIFFE servers carry no DNS name, so the server is
    /// checked only for its chain to one of `server_cas` (names are the test's business).
    pub fn client_config(&self, server_cas: &[&SpiffeCa]) -> ClientConfig {
        init_crypto();
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots(server_cas)))
            .build()
            .expect("server verifier");
        ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
            .with_client_auth_cert(self.chain(), self.key_der())
            .expect("client config")
    }

    /// The private key, DER PKCS#8.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }
}

fn roots(cas: &[&SpiffeCa]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der.clone()).expect("add CA");
    }
    roots
}

/// A server verifier that accepts a name mismatch (SVIDs have no DNS SAN) but nothing else.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns")
}

fn fresh_serial() -> rcgen::SerialNumber {
    static COUNTER: AtomicUsize = AtomicUsize::new(1);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut serial = super::pattern(nanos ^ (n << 40) ^ u64::from(std::process::id()), 16);
    serial[0] = 0x10 + serial[0] % 0x70;
    rcgen::SerialNumber::from(serial)
}
