//! Inbound authorization: which verified clients an inbound route lets in. webpki's chain,
//! validity and CRL checks always run first ([`AuthorizingVerifier`] wraps them); the rule is
//! applied only to a leaf that passed, and a refusal is sent as `access_denied`.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

/// Who may connect to an inbound route, on top of a chain to `--ca`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// `--verify-uri-san` patterns: `*` is one path segment, a trailing `/**` one or more.
    pub uri_sans: Vec<String>,
    /// `--verify-dns-san`, matched without regard to ASCII case.
    pub dns_sans: Vec<String>,
    /// `--verify-cn`, matched exactly against each subject common name.
    pub cns: Vec<String>,
    /// `--pin-sha256`: when not empty, the leaf's SPKI SHA-256 must be one of these too.
    pub pins: Vec<[u8; 32]>,
    /// `--allow-any-client`: no name rule (config refuses a route with neither).
    pub allow_any: bool,
}

impl Rule {
    /// Whether any name is listed: then one of them must be on the leaf.
    fn has_names(&self) -> bool {
        !(self.uri_sans.is_empty() && self.dns_sans.is_empty() && self.cns.is_empty())
    }

    /// Whether a route with this rule would let every verified client in without saying so.
    pub fn is_open(&self) -> bool {
        !self.has_names() && self.pins.is_empty() && !self.allow_any
    }

    /// Whether the leaf `der` is allowed in.
    pub fn allows(&self, der: &[u8]) -> bool {
        if !self.has_names() && self.pins.is_empty() {
            return self.allow_any;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return false;
        };
        if !self.pins.is_empty() {
            let pin: [u8; 32] = Sha256::digest(cert.tbs_certificate.subject_pki.raw).into();
            if !self.pins.contains(&pin) {
                return false;
            }
        }
        !self.has_names() || self.names_match(&cert)
    }

    fn names_match(&self, cert: &x509_parser::certificate::X509Certificate<'_>) -> bool {
        use x509_parser::extensions::GeneralName;
        let san_hit = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|ext| {
                ext.value.general_names.iter().any(|n| match n {
                    GeneralName::URI(u) => self.uri_sans.iter().any(|p| uri_matches(p, u)),
                    GeneralName::DNSName(d) => {
                        self.dns_sans.iter().any(|w| w.eq_ignore_ascii_case(d))
                    }
                    _ => false,
                })
            });
        san_hit
            || cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .any(|cn| self.cns.iter().any(|w| w == cn))
    }

    /// The rule in words, for `check` and the startup line.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (kind, list) in [
            ("URI SAN", &self.uri_sans),
            ("DNS SAN", &self.dns_sans),
            ("CN", &self.cns),
        ] {
            if !list.is_empty() {
                parts.push(format!("{kind} {}", list.join(" or ")));
            }
        }
        let mut out = if parts.is_empty() {
            "any client whose chain leads to --ca".to_string()
        } else {
            format!("a client leaf with {}", parts.join(", or "))
        };
        if !self.pins.is_empty() {
            out.push_str(&format!(
                ", whose public key matches one of {} pin(s)",
                self.pins.len()
            ));
        }
        out
    }
}

/// Whether the URI SAN `uri` matches the `--verify-uri-san` pattern `pattern`. Everything up to
/// the path (scheme and authority) is compared exactly; in the path, a segment `*` matches one
/// non-empty segment and a final segment `**` one or more. No byte is decoded or folded, and a
/// wildcard never matches a `.`/`..` segment, a query or a fragment, so a match is never wider
/// than it reads.
pub fn uri_matches(pattern: &str, uri: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == uri;
    }
    let (Some((p_root, p_path)), Some((u_root, u_path))) = (split_root(pattern), split_root(uri))
    else {
        return false;
    };
    if p_root != u_root {
        return false;
    }
    let pats: Vec<&str> = p_path.split('/').collect();
    let segs: Vec<&str> = u_path.split('/').collect();
    let wild_ok = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['?', '#']);
    for (i, p) in pats.iter().enumerate() {
        if *p == "**" && i == pats.len() - 1 {
            return segs.len() > i && segs[i..].iter().all(|s| wild_ok(s));
        }
        let Some(s) = segs.get(i) else {
            return false;
        };
        let ok = if *p == "*" { wild_ok(s) } else { p == s };
        if !ok {
            return false;
        }
    }
    pats.len() == segs.len()
}

/// `scheme://authority` and the path after its `/` (`None` without a path).
fn split_root(uri: &str) -> Option<(&str, &str)> {
    let after = uri.find("://").map_or(0, |i| i + 3);
    let slash = after + uri[after..].find('/')?;
    Some((&uri[..slash], &uri[slash + 1..]))
}

/// webpki's client verification (chain to `--ca`, validity, CRLs), then the route's [`Rule`];
/// a client the rule refuses gets `access_denied`.
#[derive(Debug)]
pub struct AuthorizingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rule: Rule,
}

impl AuthorizingVerifier {
    pub fn new(inner: Arc<dyn ClientCertVerifier>, rule: Rule) -> Self {
        AuthorizingVerifier { inner, rule }
    }
}

impl ClientCertVerifier for AuthorizingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.rule.allows(end_entity) {
            // Sent as `access_denied`.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "spiffe://example.org/ns/shop/sa/*";

    #[test]
    fn star_is_one_segment() {
        assert!(uri_matches(P, "spiffe://example.org/ns/shop/sa/web"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/web/x"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/.."));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/."));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/a?b"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/shop/sa/a#b"));
        assert!(!uri_matches(P, "spiffe://evil.org/ns/shop/sa/web"));
        assert!(!uri_matches(P, "spiffe://example.org.evil/ns/shop/sa/web"));
        assert!(!uri_matches(P, "spiffe://example.org/ns/other/sa/web"));
        assert!(!uri_matches(P, "SPIFFE://example.org/ns/shop/sa/web"));
        let mid = "spiffe://example.org/ns/*/sa/web";
        assert!(uri_matches(mid, "spiffe://example.org/ns/shop/sa/web"));
        assert!(!uri_matches(mid, "spiffe://example.org/ns//sa/web"));
        assert!(!uri_matches(mid, "spiffe://example.org/ns/a/b/sa/web"));
    }

    #[test]
    fn double_star_is_one_or_more_trailing_segments() {
        let p = "spiffe://example.org/ns/shop/**";
        assert!(uri_matches(p, "spiffe://example.org/ns/shop/sa"));
        assert!(uri_matches(p, "spiffe://example.org/ns/shop/sa/web/x"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/shop"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/shop/"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/shop/sa//x"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/shop/../admin"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/shopping/sa"));
        // `**` anywhere but last is a literal segment.
        let lit = "spiffe://example.org/**/x";
        assert!(!uri_matches(lit, "spiffe://example.org/a/x"));
        assert!(uri_matches(lit, "spiffe://example.org/**/x"));
    }

    #[test]
    fn exact_without_wildcards_and_partial_stars_are_literal() {
        let e = "spiffe://example.org/ns/shop/sa/web";
        assert!(uri_matches(e, e));
        assert!(!uri_matches(e, "spiffe://example.org/ns/shop/sa/web2"));
        let partial = "spiffe://example.org/sa/web-*";
        assert!(!uri_matches(partial, "spiffe://example.org/sa/web-1"));
        assert!(uri_matches(partial, "spiffe://example.org/sa/web-*"));
        assert!(!uri_matches("spiffe://*/x", "spiffe://example.org/x"));
        assert!(!uri_matches("urn:*", "urn:x"));
    }

    #[test]
    fn open_rule_is_detected() {
        assert!(Rule::default().is_open());
        let any = Rule {
            allow_any: true,
            ..Rule::default()
        };
        assert!(!any.is_open());
        assert!(any.allows(b"not even a certificate"));
        let named = Rule {
            cns: vec!["web".into()],
            ..Rule::default()
        };
        assert!(!named.allows(b"garbage"));
    }
}
