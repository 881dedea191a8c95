//! A throwaway PKI made with rcgen at test time, written as PEM files into a temp dir.
//!
//! The good material is made up front; the bad variants (expired, unknown CA, wrong name, ...)
//! are made on demand, because most tests need none of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber, date_time_ymd,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use time::{Duration as TimeDuration, OffsetDateTime};

/// Common name of the good client certificate.
pub const CLIENT_CN: &str = "test-client";

/// A certificate authority: its PEM file and the key that signs leaves.
pub struct Ca {
    pub pem: PathBuf,
    pub der: CertificateDer<'static>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, on disk (PEM, PKCS#8) and in memory.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl Identity {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pkcs8.clone()).into()
    }
}

/// Validity period as (year, month, day) pairs; `None` keeps rcgen's 1975..4096 default.
type Validity = Option<((i32, u8, u8), (i32, u8, u8))>;

const EXPIRED: Validity = Some(((2000, 1, 1), (2001, 1, 1)));
const NOT_YET_VALID: Validity = Some(((2100, 1, 1), (2101, 1, 1)));

/// Private key encodings the proxy must accept besides PKCS#8.
#[derive(Clone, Copy, Debug)]
pub enum KeyFormat {
    /// `BEGIN EC PRIVATE KEY` (RFC 5915)
    Sec1,
    /// `BEGIN RSA PRIVATE KEY` (RFC 8017)
    Pkcs1,
}

pub struct Pki {
    pub dir: TempDir,
    /// Signs the good server and client certificates; the proxy's `--ca` and the upstreams'
    /// client CA.
    pub ca: Ca,
    /// `localhost` + IP 127.0.0.1, serverAuth, signed by `ca`.
    pub server: Identity,
    /// CN=test-client, clientAuth, signed by `ca`.
    pub client: Identity,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("mtls-sidecar-test")
            .tempdir()
            .expect("create temp dir");
        let ca = make_ca(dir.path(), "ca", "mtls-sidecar test CA");
        let server = make_leaf(
            dir.path(),
            &ca,
            "server",
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            None,
        );
        let client = make_leaf(
            dir.path(),
            &ca,
            "client",
            CLIENT_CN,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            None,
        );
        Pki {
            dir,
            ca,
            server,
            client,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `contents` to `name` in the PKI's directory and returns the path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    /// A second CA that nobody trusts.
    pub fn other_ca(&self) -> Ca {
        make_ca(self.dir.path(), "other-ca", "untrusted test CA")
    }

    fn server_variant(&self, ca: &Ca, name: &str, sans: &[&str], validity: Validity) -> Identity {
        let cn = sans.first().copied().unwrap_or("server");
        let eku = ExtendedKeyUsagePurpose::ServerAuth;
        make_leaf(self.dir.path(), ca, name, cn, sans, eku, validity)
    }

    pub fn server_expired(&self) -> Identity {
        self.server_variant(
            &self.ca,
            "server-expired",
            &["localhost", "127.0.0.1"],
            EXPIRED,
        )
    }

    pub fn server_not_yet_valid(&self) -> Identity {
        let sans = ["localhost", "127.0.0.1"];
        self.server_variant(&self.ca, "server-future", &sans, NOT_YET_VALID)
    }

    /// Right names, but signed by a CA the proxy does not trust.
    pub fn server_unknown_ca(&self) -> Identity {
        let other = self.other_ca();
        self.server_variant(
            &other,
            "server-unknown-ca",
            &["localhost", "127.0.0.1"],
            None,
        )
    }

    /// Trusted CA, but valid only for `other.example`.
    pub fn server_wrong_name(&self) -> Identity {
        self.server_variant(&self.ca, "server-wrong-name", &["other.example"], None)
    }

    pub fn client_expired(&self) -> Identity {
        let eku = ExtendedKeyUsagePurpose::ClientAuth;
        make_leaf(
            self.dir.path(),
            &self.ca,
            "client-expired",
            CLIENT_CN,
            &[],
            eku,
            EXPIRED,
        )
    }

    /// A good client certificate with its key re-encoded as SEC1 or PKCS#1 by the `openssl` CLI.
    /// `Err` says why it could not be made (no `openssl`).
    pub fn client_with_key_format(&self, format: KeyFormat) -> Result<Identity, String> {
        let (name, key, header, tool): (_, _, _, &[&str]) = match format {
            KeyFormat::Sec1 => (
                "client-sec1",
                KeyPair::generate().expect("generate EC key"),
                "-----BEGIN EC PRIVATE KEY-----",
                &["ec"],
            ),
            KeyFormat::Pkcs1 => (
                "client-pkcs1",
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                    .expect("generate RSA key"),
                "-----BEGIN RSA PRIVATE KEY-----",
                &["rsa", "-traditional"],
            ),
        };
        let mut id = make_leaf_with_key(
            self.dir.path(),
            &self.ca,
            name,
            CLIENT_CN,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            None,
            key,
        );
        let converted = self.path(&format!("{name}-key-{format:?}.pem").to_lowercase());
        let out = Command::new("openssl")
            .args(tool)
            .arg("-in")
            .arg(&id.key)
            .arg("-out")
            .arg(&converted)
            .output()
            .map_err(|e| format!("cannot run openssl to make a {format:?} key: {e}"))?;
        assert!(
            out.status.success(),
            "openssl {tool:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&converted).expect("read converted key");
        assert!(
            text.starts_with(header),
            "openssl {tool:?} wrote no {header} file:\n{text}"
        );
        id.key = converted;
        Ok(id)
    }
}

fn make_ca(dir: &Path, name: &str, cn: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("generate CA key");
    let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, issuer.pem()).expect("write CA");
    Ca {
        pem,
        der: issuer.der().clone(),
        issuer,
    }
}

fn make_leaf(
    dir: &Path,
    ca: &Ca,
    name: &str,
    cn: &str,
    sans: &[&str],
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Identity {
    let key = KeyPair::generate().expect("generate leaf key");
    make_leaf_with_key(dir, ca, name, cn, sans, eku, validity, key)
}

#[allow(clippy::too_many_arguments)]
fn make_leaf_with_key(
    dir: &Path,
    ca: &Ca,
    name: &str,
    cn: &str,
    sans: &[&str],
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
    key: KeyPair,
) -> Identity {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![eku];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    if let Some(((y1, m1, d1), (y2, m2, d2))) = validity {
        params.not_before = date_time_ymd(y1, m1, d1);
        params.not_after = date_time_ymd(y2, m2, d2);
    }
    let cert = params.signed_by(&key, &ca.issuer).expect("sign leaf");
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write leaf");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    Identity {
        cert: cert_path,
        key: key_path,
        der: cert.der().clone(),
        pkcs8: key.serialize_der(),
    }
}

/// The subject CN of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// What a made-to-order leaf looks like; see [`Pki::leaf`].
#[derive(Clone, Copy)]
pub struct LeafSpec<'a> {
    pub cn: &'a str,
    /// DNS names and IP addresses (as rcgen's `CertificateParams::new` reads them)
    pub names: &'a [&'a str],
    /// URI SANs, e.g. SPIFFE IDs
    pub uris: &'a [&'a str],
    /// clientAuth when true, serverAuth otherwise
    pub client: bool,
    /// (not_before, not_after); `None`: from a day ago to a year from now
    pub validity: Option<(OffsetDateTime, OffsetDateTime)>,
}

impl LeafSpec<'_> {
    /// A client certificate `CN=cn` valid from a day ago to a year from now.
    pub fn client(cn: &str) -> LeafSpec<'_> {
        LeafSpec {
            cn,
            names: &[],
            uris: &[],
            client: true,
            validity: None,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server() -> LeafSpec<'static> {
        LeafSpec {
            cn: "localhost",
            names: &["localhost", "127.0.0.1"],
            uris: &[],
            client: false,
            validity: None,
        }
    }
}

/// A fresh positive serial number of 16 bytes whose first byte is 0x10..=0x7f, so that its
/// hex form has no leading zero and no sign byte to argue about.
fn fresh_serial() -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_mul(0x9E37_79B9);
    let mut serial = super::pattern(seed, 16);
    serial[0] = 0x10 + serial[0] % 0x70;
    serial
}

impl Pki {
    /// A CA of its own (with CrlSign), written to `NAME.pem`.
    pub fn new_ca(&self, name: &str, cn: &str) -> Ca {
        make_ca(self.dir.path(), name, cn)
    }

    /// A leaf signed by `ca` with a fresh serial, written to `NAME.pem` and `NAME-key.pem`.
    pub fn leaf(&self, ca: &Ca, name: &str, spec: LeafSpec<'_>) -> Identity {
        let names: Vec<String> = spec.names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        for uri in spec.uris {
            let uri = Ia5String::try_from(*uri).expect("URI SAN is IA5");
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, spec.cn);
        params.extended_key_usages = vec![if spec.client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from(fresh_serial()));
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns");
        let (not_before, not_after) = spec
            .validity
            .unwrap_or((now - TimeDuration::days(1), now + TimeDuration::days(365)));
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &ca.issuer).expect("sign leaf");
        let cert_path = self.path(&format!("{name}.pem"));
        let key_path = self.path(&format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write leaf");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Identity {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
            pkcs8: key.serialize_der(),
        }
    }
}

impl Ca {
    /// A PEM CRL signed by this CA that revokes `revoked` (by serial), written to `path`.
    pub fn crl(&self, path: &Path, revoked: &[&CertificateDer<'_>]) -> PathBuf {
        self.crl_with_next_update(path, revoked, TimeDuration::days(7))
    }

    /// [`Ca::crl`] whose nextUpdate is `next_update` from now (negative: a stale CRL).
    pub fn crl_with_next_update(
        &self,
        path: &Path,
        revoked: &[&CertificateDer<'_>],
        next_update: TimeDuration,
    ) -> PathBuf {
        static NUMBER: AtomicU64 = AtomicU64::new(1);
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 ns");
        let revoked_certs = revoked
            .iter()
            .map(|der| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&raw_serial(der)),
                revocation_time: now - TimeDuration::hours(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - TimeDuration::days(30),
            next_update: now + next_update,
            crl_number: SerialNumber::from(NUMBER.fetch_add(1, Ordering::SeqCst)),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).expect("sign CRL");
        std::fs::write(path, crl.pem().expect("CRL PEM")).expect("write CRL");
        path.to_owned()
    }
}

impl Identity {
    /// The serial number as the proxy logs it: lowercase hex without separators.
    pub fn serial_hex(&self) -> String {
        super::hex(&raw_serial(&self.der))
    }

    /// Base64 of SHA-256 over the SubjectPublicKeyInfo DER: what `--pin-sha256` takes.
    pub fn spki_pin(&self) -> String {
        spki_pin(&self.der)
    }

    /// not_after, as Unix seconds.
    pub fn not_after_unix(&self) -> i64 {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.der).expect("parse cert");
        cert.validity().not_after.timestamp()
    }
}

impl Ca {
    pub fn spki_pin(&self) -> String {
        spki_pin(&self.der)
    }
}

fn raw_serial(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse cert");
    cert.raw_serial().to_vec()
}

fn spki_pin(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse cert");
    super::base64(&super::sha256(cert.tbs_certificate.subject_pki.raw))
}

/// The serial of a DER certificate as lowercase hex (e.g. what an upstream saw).
pub fn serial_of(der: &[u8]) -> String {
    super::hex(&raw_serial(der))
}

impl Pki {
    /// A self-signed CA valid from a day ago until `not_after`, written to `NAME.pem`.
    pub fn new_ca_until(&self, name: &str, cn: &str, not_after: OffsetDateTime) -> Ca {
        let params = ca_params(cn, not_after);
        let key = KeyPair::generate().expect("generate CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let pem = self.path(&format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).expect("write CA");
        Ca {
            pem,
            der: issuer.der().clone(),
            issuer,
        }
    }

    /// An intermediate CA signed by `parent`, valid from a day ago until `not_after`, written
    /// to `NAME.pem` (its certificate alone).
    pub fn intermediate(&self, parent: &Ca, name: &str, cn: &str, not_after: OffsetDateTime) -> Ca {
        let mut params = ca_params(cn, not_after);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate intermediate key");
        let issuer =
            CertifiedIssuer::signed_by(params, key, &parent.issuer).expect("sign intermediate");
        let pem = self.path(&format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).expect("write intermediate");
        Ca {
            pem,
            der: issuer.der().clone(),
            issuer,
        }
    }
}

fn ca_params(cn: &str, not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(SerialNumber::from(fresh_serial()));
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns");
    params.not_before = now - TimeDuration::days(1);
    params.not_after = not_after.replace_nanosecond(0).expect("0 ns");
    params
}
