//! Facts about certificates, in the words the report uses: names, validity counted in days, key
//! type, how a chain ends, and whether the CA names an upstream asked for cover a chain.

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use crate::failure::escape;
use crate::tls::cert::{CertInfo, rfc3339};

const DAY: i64 = 86_400;

/// One certificate as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub subject: String,
    pub issuer: String,
    pub sans: Vec<String>,
    /// RFC 3339, UTC.
    pub not_before: String,
    /// RFC 3339, UTC.
    pub not_after: String,
    /// `expires in 364 days`, `expired 3 days ago` or `not valid until ... (in 2 days)`.
    pub validity: String,
    #[serde(skip)]
    pub not_before_unix: i64,
    #[serde(skip)]
    pub not_after_unix: i64,
}

impl Summary {
    pub fn parse(der: &CertificateDer<'_>, now: i64) -> Option<Summary> {
        let info = CertInfo::parse(der)?;
        Some(Summary {
            validity: validity_words(info.not_before, info.not_after, now),
            not_before: rfc3339(info.not_before),
            not_after: rfc3339(info.not_after),
            not_before_unix: info.not_before,
            not_after_unix: info.not_after,
            // Names come from the peer: printed escaped (see `failure::escape`).
            subject: escape(&info.subject).into_owned(),
            issuer: escape(&info.issuer).into_owned(),
            sans: info.sans.iter().map(|n| escape(n).into_owned()).collect(),
        })
    }

    pub fn expired(&self, now: i64) -> bool {
        now > self.not_after_unix
    }

    pub fn not_yet_valid(&self, now: i64) -> bool {
        now < self.not_before_unix
    }
}

/// `1 day`, `12 days`, `less than a day`.
pub fn days(secs: i64) -> String {
    match secs.max(0) / DAY {
        0 => "less than a day".into(),
        1 => "1 day".into(),
        n => format!("{n} days"),
    }
}

pub fn validity_words(not_before: i64, not_after: i64, now: i64) -> String {
    if now > not_after {
        format!("expired {} ago", days(now - not_after))
    } else if now < not_before {
        format!(
            "not valid until {} (in {})",
            rfc3339(not_before),
            days(not_before - now)
        )
    } else {
        format!("expires in {}", days(not_after - now))
    }
}

/// Subject and issuer of one certificate, as text and as DER for exact comparison.
#[derive(Debug, Clone)]
pub struct Names {
    pub subject: String,
    pub issuer: String,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
}

impl Names {
    pub fn of(der: &CertificateDer<'_>) -> Option<Names> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(Names::from_cert(&cert))
    }

    fn from_cert(cert: &X509Certificate<'_>) -> Names {
        Names {
            subject: escape(&cert.subject().to_string()).into_owned(),
            issuer: escape(&cert.issuer().to_string()).into_owned(),
            subject_der: cert.subject().as_raw().to_vec(),
            issuer_der: cert.issuer().as_raw().to_vec(),
        }
    }

    pub fn self_signed(&self) -> bool {
        self.subject_der == self.issuer_der
    }

    fn issued(&self, child: &Names) -> bool {
        self.subject_der == child.issuer_der
    }
}

/// Indices of `chain` from the leaf (index 0) up, following issuer links between the
/// certificates given, in whatever order they were given.
pub fn follow(chain: &[Names]) -> Vec<usize> {
    let mut path = Vec::new();
    if chain.is_empty() {
        return path;
    }
    path.push(0);
    loop {
        let cur = &chain[path[path.len() - 1]];
        if cur.self_signed() {
            return path;
        }
        match (0..chain.len()).find(|i| !path.contains(i) && chain[*i].issued(cur)) {
            Some(next) => path.push(next),
            None => return path,
        }
    }
}

/// The CA an upstream must trust for `chain` to be accepted: the issuer of the last certificate
/// reached from the leaf, or that certificate itself when it is a root.
pub fn anchor_name(chain: &[Names]) -> Option<String> {
    let top = &chain[*follow(chain).last()?];
    Some(if top.self_signed() {
        top.subject.clone()
    } else {
        top.issuer.clone()
    })
}

/// What the client sends and where its chain ends: (ends at a root, sentence, extra notes).
pub fn describe_our_chain(chain: &[Names]) -> (bool, String, Vec<String>) {
    let path = follow(chain);
    let Some(&top_index) = path.last() else {
        return (false, "the file holds no certificate".into(), Vec::new());
    };
    let top = &chain[top_index];
    let sentence = match (top.self_signed(), path.len()) {
        (true, 1) => format!(
            "the certificate is self-signed ({}): the upstream must trust this very certificate",
            top.subject
        ),
        (true, _) => format!("complete: it ends at the root {}", top.subject),
        (false, 1) => format!(
            "the leaf alone, issued by {}, which is not included: fine if the upstream trusts {}",
            top.issuer, top.issuer
        ),
        (false, _) => format!(
            "the chain ends at {}, issued by {}, which is not included: fine if the upstream \
             trusts {} or {}",
            top.subject, top.issuer, top.issuer, top.subject
        ),
    };
    let mut notes = Vec::new();
    if path.len() < chain.len() {
        notes.push(format!(
            "{} of the {} certificates in the client certificate file are not part of the \
             leaf's chain: they are sent anyway, and some upstreams refuse a chain with \
             strangers in it",
            chain.len() - path.len(),
            chain.len()
        ));
    } else if path.iter().enumerate().any(|(i, &p)| i != p) {
        notes.push(
            "the certificates in the client certificate file are out of order: list the leaf \
             first, then each issuer in turn (some upstreams insist)"
                .into(),
        );
    }
    (top.self_signed(), sentence, notes)
}

/// A CA name from an upstream's certificate request, decoded for display.
#[derive(Debug, Clone)]
pub struct Hint {
    pub text: String,
    der: Vec<u8>,
}

impl Hint {
    /// Hints are DER DistinguishedNames with their SEQUENCE header; tolerate servers that send
    /// the contents alone.
    pub fn decode(raw: &[u8]) -> Hint {
        let wrapped = der_sequence(raw);
        for der in [raw.to_vec(), wrapped] {
            // Every byte must belong to the name: x509-parser stops quietly at junk inside.
            if let Ok((rest, name)) = X509Name::from_der(&der)
                && rest.is_empty()
                && name.as_raw().len() == der.len()
            {
                return Hint {
                    text: escape(&name.to_string()).into_owned(),
                    der,
                };
            }
        }
        Hint {
            text: format!("(a name that cannot be decoded, {} bytes)", raw.len()),
            der: raw.to_vec(),
        }
    }
}

fn der_sequence(content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![0x30];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// Whether one of the CA names an upstream accepts is a CA of `chain` (the issuer of any of its
/// certificates, or any certificate above the leaf).
pub fn hints_cover(chain: &[Names], hints: &[Hint]) -> bool {
    hints.iter().any(|h| {
        chain.iter().enumerate().any(|(i, c)| {
            let issuer = c.issuer_der == h.der || c.issuer == h.text;
            let subject = i > 0 && (c.subject_der == h.der || c.subject == h.text);
            issuer || subject
        })
    })
}

/// `EC P-256`, `RSA 2048`, `Ed25519`, ...
pub fn key_type(der: &CertificateDer<'_>) -> String {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return "unknown (the certificate cannot be parsed)".into();
    };
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let rsa_bits = || match spki.parsed() {
        Ok(PublicKey::RSA(k)) => format!(" {}", k.key_size()),
        _ => String::new(),
    };
    match alg.as_str() {
        "1.2.840.113549.1.1.1" => format!("RSA{}", rsa_bits()),
        "1.2.840.113549.1.1.10" => format!("RSA-PSS{}", rsa_bits()),
        "1.3.101.112" => "Ed25519".into(),
        "1.3.101.113" => "Ed448".into(),
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => "EC P-256".into(),
                Some("1.3.132.0.34") => "EC P-384".into(),
                Some("1.3.132.0.35") => "EC P-521".into(),
                Some(other) => format!("EC (curve {other})"),
                None => "EC (curve not named)".into(),
            }
        }
        other => format!("unknown (algorithm {other})"),
    }
}

/// `Some(what it allows)` when the certificate's extended key usage rules out TLS client
/// authentication, which both webpki and OpenSSL upstreams enforce.
pub fn not_for_clients(der: &CertificateDer<'_>) -> Option<String> {
    eku_lacks(der, false)
}

/// `Some(what it allows)` when the certificate's extended key usage rules out TLS server
/// authentication, which webpki, OpenSSL and browsers enforce on the client side.
pub fn not_for_servers(der: &CertificateDer<'_>) -> Option<String> {
    eku_lacks(der, true)
}

fn eku_lacks(der: &CertificateDer<'_>, server: bool) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let eku = cert.extended_key_usage().ok()??;
    let eku = eku.value;
    let wanted = if server {
        eku.server_auth
    } else {
        eku.client_auth
    };
    if wanted || eku.any {
        return None;
    }
    let mut allowed: Vec<String> = [
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| n.to_string())
    .collect();
    allowed.extend(eku.other.iter().map(|o| o.to_id_string()));
    Some(if allowed.is_empty() {
        "nothing".into()
    } else {
        allowed.join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair,
    };

    fn name(cn: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = name(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    }

    /// Root -> Intermediate -> leaf, DER, leaf first.
    fn three() -> Vec<CertificateDer<'static>> {
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("Root").self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params("Root"), root_key);
        let int_key = KeyPair::generate().unwrap();
        let int = ca_params("Intermediate")
            .signed_by(&int_key, &root_issuer)
            .unwrap();
        let int_issuer = Issuer::new(ca_params("Intermediate"), int_key);
        let mut leaf = CertificateParams::new(vec!["app.example".to_string()]).unwrap();
        leaf.distinguished_name = name("app");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = leaf.signed_by(&leaf_key, &int_issuer).unwrap();
        vec![leaf.der().clone(), int.der().clone(), root.der().clone()]
    }

    fn names(ders: &[CertificateDer<'static>]) -> Vec<Names> {
        ders.iter().map(|d| Names::of(d).unwrap()).collect()
    }

    #[test]
    fn chain_descriptions() {
        let all = names(&three());
        let (root, s, notes) = describe_our_chain(&all);
        assert!(
            root && s.contains("complete") && s.contains("CN=Root"),
            "{s}"
        );
        assert!(notes.is_empty(), "{notes:?}");

        let (root, s, _) = describe_our_chain(&all[..2]);
        assert!(!root);
        assert_eq!(
            s,
            "the chain ends at CN=Intermediate, issued by CN=Root, which is not included: fine \
             if the upstream trusts CN=Root or CN=Intermediate"
        );
        assert_eq!(anchor_name(&all[..2]).as_deref(), Some("CN=Root"));

        let (_, s, _) = describe_our_chain(&all[..1]);
        assert!(
            s.starts_with("the leaf alone, issued by CN=Intermediate"),
            "{s}"
        );
        assert_eq!(anchor_name(&all[..1]).as_deref(), Some("CN=Intermediate"));

        let (_, s, _) = describe_our_chain(&all[2..]);
        assert!(s.contains("self-signed"), "{s}");

        let shuffled = vec![all[0].clone(), all[2].clone(), all[1].clone()];
        let (root, _, notes) = describe_our_chain(&shuffled);
        assert!(root);
        assert!(notes[0].contains("out of order"), "{notes:?}");

        let stranger = vec![all[0].clone(), all[2].clone()];
        let (_, _, notes) = describe_our_chain(&stranger);
        assert!(notes[0].contains("not part of"), "{notes:?}");
    }

    #[test]
    fn hints_match_by_der_or_text() {
        let ders = three();
        let all = names(&ders);
        let (_, root) = x509_parser::parse_x509_certificate(&ders[2]).unwrap();
        let root_dn = root.subject().as_raw().to_vec();
        let hint = Hint::decode(&root_dn);
        assert_eq!(hint.text, "CN=Root");
        // The contents alone, without the SEQUENCE header, decode too.
        assert_eq!(Hint::decode(&root_dn[2..]).text, "CN=Root");
        assert!(hints_cover(&all[..2], std::slice::from_ref(&hint)));
        assert!(!hints_cover(&all[..1], std::slice::from_ref(&hint)));
        assert!(Hint::decode(b"\x01\x02").text.contains("cannot be decoded"));
    }

    #[test]
    fn key_types_and_usage() {
        let ders = three();
        assert_eq!(key_type(&ders[0]), "EC P-256");
        let rsa =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let c = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rsa)
            .unwrap();
        assert_eq!(key_type(c.der()), "RSA 2048");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let c = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&ed)
            .unwrap();
        assert_eq!(key_type(c.der()), "Ed25519");
        assert_eq!(not_for_clients(&ders[0]).as_deref(), Some("serverAuth"));
        assert_eq!(not_for_clients(&ders[1]), None);
    }

    #[test]
    fn validity_in_days() {
        assert_eq!(
            validity_words(0, 100, 100 + 3 * DAY + 5),
            "expired 3 days ago"
        );
        assert_eq!(validity_words(0, 10 * DAY, DAY), "expires in 9 days");
        assert_eq!(validity_words(0, 10, 5), "expires in less than a day");
        assert!(validity_words(2 * DAY, 3 * DAY, 0).ends_with("(in 2 days)"));
    }
}
