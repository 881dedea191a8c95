//! What an operator is told about a certificate (subject, issuer, serial, validity, names,
//! fingerprint) and the time helpers that go with it. `/status`, `check`, the startup line and
//! the reload warnings all read the same [`CertInfo`], so they describe a certificate alike.

use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use sha2::Digest as _;

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

/// Lowercase hex without separators, as serials and fingerprints are shown.
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

/// The subject alternative names, each prefixed with its kind (`DNS:…`, `IP:…`, `URI:…`, `email:…`).
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

/// The wall clock in Unix seconds, as certificate validity is written (0 before 1970).
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
