//! Failures in plain words: which side rejected what, and what to do about it.

use rustls::{AlertDescription, CertificateError};

use super::cert::{self, Names, Summary};
use crate::failure::{Class, classify_tls};

/// Where the upstream's chain must lead.
#[derive(Debug, Clone)]
pub struct Trust {
    /// `--ca FILE`, or `None` for the system trust store.
    pub ca: Option<String>,
    /// Subjects in the `--ca` bundle (empty for the system store).
    pub subjects: Vec<String>,
}

impl Trust {
    pub fn label(&self) -> String {
        match &self.ca {
            Some(path) => format!("--ca {path}"),
            None => "the system trust store".into(),
        }
    }

    fn add(&self, what: &str) -> String {
        match &self.ca {
            Some(_) => format!("add {what} to that bundle"),
            None => format!("pass --ca with a bundle that holds {what}"),
        }
    }
}

/// What the explanations may draw on.
pub struct Context<'a> {
    /// The name we dialled (SNI and verification name).
    pub server_name: &'a str,
    pub trust: &'a Trust,
    /// Our chain, leaf first.
    pub ours: &'a [Names],
    /// Our leaf, for its validity.
    pub our_leaf: Option<&'a Summary>,
    /// The upstream's chain as sent, leaf first.
    pub theirs: &'a [Names],
    pub their_summaries: &'a [Summary],
    /// Decoded CA names from the upstream's certificate request.
    pub hints: &'a [String],
    pub now: i64,
}

/// The TLS alert's name as the RFCs spell it.
pub fn alert_name(a: AlertDescription) -> String {
    use AlertDescription as A;
    let name = match a {
        A::CloseNotify => "close_notify",
        A::UnexpectedMessage => "unexpected_message",
        A::BadRecordMac => "bad_record_mac",
        A::HandshakeFailure => "handshake_failure",
        A::BadCertificate => "bad_certificate",
        A::UnsupportedCertificate => "unsupported_certificate",
        A::CertificateRevoked => "certificate_revoked",
        A::CertificateExpired => "certificate_expired",
        A::CertificateUnknown => "certificate_unknown",
        A::IllegalParameter => "illegal_parameter",
        A::UnknownCA => "unknown_ca",
        A::AccessDenied => "access_denied",
        A::DecodeError => "decode_error",
        A::DecryptError => "decrypt_error",
        A::ProtocolVersion => "protocol_version",
        A::InsufficientSecurity => "insufficient_security",
        A::InternalError => "internal_error",
        A::InappropriateFallback => "inappropriate_fallback",
        A::MissingExtension => "missing_extension",
        A::UnsupportedExtension => "unsupported_extension",
        A::UnrecognisedName => "unrecognized_name",
        A::NoApplicationProtocol => "no_application_protocol",
        A::CertificateRequired => "certificate_required",
        other => return format!("{other:?}"),
    };
    name.into()
}

/// A TLS error during or right after the handshake, explained.
pub fn tls_failure(e: &rustls::Error, cx: &Context<'_>) -> String {
    match e {
        rustls::Error::InvalidCertificate(ce) => their_certificate(ce, e, cx),
        rustls::Error::AlertReceived(a) => alert(*a, e, cx),
        rustls::Error::PeerIncompatible(p) => format!(
            "the upstream and we share no usable TLS parameters ({p:?}): check --tls-min and \
             the TLS versions and cipher suites it allows"
        ),
        _ => classify_tls(e, cx.server_name).message,
    }
}

/// The upstream's certificate failed our verification.
fn their_certificate(ce: &CertificateError, e: &rustls::Error, cx: &Context<'_>) -> String {
    let leaf = cx.theirs.first();
    let leaf_subject = leaf.map_or("(none)", |l| l.subject.as_str());
    match classify_tls(e, cx.server_name).class {
        Class::UnknownIssuer => unknown_issuer(cx, matches!(ce, CertificateError::BadSignature)),
        Class::NameMismatch => {
            let names: Vec<&str> = cx
                .their_summaries
                .first()
                .map(|s| {
                    s.sans
                        .iter()
                        .filter_map(|n| n.strip_prefix("DNS:").or_else(|| n.strip_prefix("IP:")))
                        .collect()
                })
                .unwrap_or_default();
            if names.is_empty() {
                format!(
                    "the upstream's certificate ({leaf_subject}) has no DNS or IP names \
                     (subject alternative names), so it is valid for no name, not even the one \
                     we dialled ({}); the common name is not used for matching: the upstream \
                     needs a certificate with a DNS or IP SAN",
                    cx.server_name
                )
            } else {
                format!(
                    "the upstream's certificate is for {}, not the name we dialled ({}): use \
                     --server-name {} if that is intended",
                    names.join(", "),
                    cx.server_name,
                    names[0]
                )
            }
        }
        Class::Expired => match cx.their_summaries.iter().find(|s| s.expired(cx.now)) {
            Some(s) => format!(
                "the upstream's certificate {} {} (not after {}): the upstream must renew it",
                whose(cx, s),
                s.validity,
                s.not_after
            ),
            None => format!(
                "the upstream's certificate has expired ({ce:?}): check this machine's clock, \
                 or renew it"
            ),
        },
        Class::NotYetValid => match cx.their_summaries.iter().find(|s| s.not_yet_valid(cx.now)) {
            Some(s) => format!(
                "the upstream's certificate {} is {}: check the clocks of both machines",
                whose(cx, s),
                s.validity
            ),
            None => format!("the upstream's certificate is not valid yet ({ce:?})"),
        },
        Class::Revoked => format!(
            "the upstream's certificate ({leaf_subject}) or one of its CAs is revoked: a --crl \
             lists it; the upstream needs a new certificate (or the CRL is wrong)"
        ),
        _ if is_purpose(ce) => format!(
            "the upstream's certificate ({leaf_subject}) is not for TLS servers: its extended \
             key usage lacks serverAuth; the upstream needs a server certificate"
        ),
        _ => classify_tls(e, cx.server_name).message,
    }
}

fn is_purpose(ce: &CertificateError) -> bool {
    format!("{ce:?}").contains("Purpose")
}

/// `(CN=x)` for the leaf, `in its chain, CN=x,` for a CA above it.
fn whose(cx: &Context<'_>, s: &Summary) -> String {
    let is_leaf = cx
        .their_summaries
        .first()
        .is_some_and(|l| l.subject == s.subject && l.not_after == s.not_after);
    if is_leaf {
        format!("({})", s.subject)
    } else {
        format!("(a CA in its chain, {})", s.subject)
    }
}

/// Our verification found no path from the upstream's chain to a CA we trust (or, with
/// `bad_signature`, a CA of the right name whose key did not sign it).
fn unknown_issuer(cx: &Context<'_>, bad_signature: bool) -> String {
    let trust = cx.trust.label();
    let path = cert::follow(cx.theirs);
    let Some(&top) = path.last() else {
        return format!(
            "the upstream's certificate is not trusted: its chain does not lead to a CA in {trust}"
        );
    };
    let top = &cx.theirs[top];
    let wanted = if top.self_signed() {
        &top.subject
    } else {
        &top.issuer
    };
    if cx.trust.subjects.iter().any(|s| s == wanted) {
        // webpki finds the anchor by name, then the signature fails: a CA re-created with a new
        // key under the same name (two dev PKIs, a rotated private CA).
        return format!(
            "the upstream's certificate chain leads to {wanted}, and {trust} holds a certificate \
             of that name, but not the one that signed the upstream's (a different key: a CA \
             re-created under the same name?): replace it in that bundle with the upstream's \
             current {wanted} certificate"
        );
    }
    if bad_signature {
        return format!(
            "the upstream's certificate chain has a bad signature: a certificate in it was not \
             signed by the key of the CA it names (the chain sent is {}); the upstream sends a \
             broken chain",
            path.iter()
                .map(|&i| cx.theirs[i].subject.as_str())
                .collect::<Vec<_>>()
                .join(" -> ")
        );
    }
    if top.self_signed() {
        let what = if path.len() == 1 {
            "the upstream's certificate is self-signed"
        } else {
            "the upstream's chain ends at a self-signed root"
        };
        format!(
            "{what}, {}, which is not in {trust}: {} if you trust it",
            top.subject,
            cx.trust.add("that certificate")
        )
    } else if path.len() == 1 {
        format!(
            "the upstream's certificate was issued by {}, which is not in {trust}: {}",
            top.issuer,
            cx.trust.add(&format!("{}'s certificate", top.issuer))
        )
    } else {
        let chain: Vec<&str> = path
            .iter()
            .map(|&i| cx.theirs[i].subject.as_str())
            .collect();
        format!(
            "the upstream's chain ({}) ends at {}, which was issued by {}, which is not in \
             {trust}: {}",
            chain.join(" -> "),
            top.subject,
            top.issuer,
            cx.trust.add(&format!("{}'s certificate", top.issuer))
        )
    }
}

/// The upstream ended the handshake with an alert.
fn alert(a: AlertDescription, e: &rustls::Error, cx: &Context<'_>) -> String {
    use AlertDescription as A;
    let name = alert_name(a);
    let our_anchor = cert::anchor_name(cx.ours).unwrap_or_else(|| "(unknown)".into());
    let accepts = if cx.hints.is_empty() {
        String::new()
    } else {
        format!(
            " (it accepts certificates issued by: {})",
            cx.hints.join(", ")
        )
    };
    let fix = format!(
        "; add {our_anchor} to the CAs the upstream trusts for clients, or get our certificate \
         from a CA it accepts"
    );
    let why = match a {
        A::UnknownCA => unknown_ca(cx, &our_anchor, &accepts, &fix),
        A::CertificateExpired => match cx.our_leaf {
            Some(l) if l.expired(cx.now) => format!(
                "our certificate {} (not after {}): renew it",
                l.validity, l.not_after
            ),
            _ => format!(
                "it considers our certificate (or a CA in its chain) expired{accepts}: compare \
                 the clocks of both machines"
            ),
        },
        A::BadCertificate | A::CertificateUnknown => format!(
            "it found our certificate unacceptable: often the CA that issued it ({our_anchor}) \
             is unknown to it, the chain we send lacks an intermediate it needs, or it is not \
             valid for client authentication{accepts}"
        ),
        A::UnsupportedCertificate => format!(
            "it cannot use our certificate: its key type or its (extended) key usage does not \
             suit TLS client authentication{accepts}"
        ),
        A::CertificateRevoked => {
            "it considers our certificate revoked: get a new one from its CA".into()
        }
        A::AccessDenied => format!(
            "it verified our certificate but its policy refuses this identity (its subject or \
             SANs are not on its allow list){accepts}"
        ),
        A::DecryptError | A::DecodeError if cx.hints.contains(&our_anchor) => format!(
            "it could not verify the signature on our certificate: it trusts a CA named \
             {our_anchor}, but not the one that signed ours (same name, different key){fix}"
        ),
        A::CertificateRequired => {
            "it requires a client certificate and received none: check --cert".into()
        }
        A::HandshakeFailure => {
            return format!(
                "the upstream ended the handshake (alert {name}): no common TLS version or \
                 cipher suite, or it refused our client certificate{accepts}"
            );
        }
        A::ProtocolVersion => {
            return format!(
                "the upstream refused our TLS versions (alert {name}): check --tls-min and the \
                 versions it allows"
            );
        }
        A::NoApplicationProtocol => {
            return format!(
                "the upstream accepts none of the ALPN protocols we offered (alert {name}): \
                 check --alpn (http mode offers h2 and http/1.1)"
            );
        }
        A::UnrecognisedName => {
            return format!(
                "the upstream has no certificate for the name we sent in SNI, {} (alert \
                 {name}): check --server-name",
                cx.server_name
            );
        }
        _ => return classify_tls(e, cx.server_name).message,
    };
    format!("the upstream rejected our client certificate (alert {name}): {why}")
}

/// `unknown_ca`: which certificate of the chain we send the upstream lacks, named by where
/// that chain ends (a root, our self-signed leaf, or an intermediate whose issuer we omit).
fn unknown_ca(cx: &Context<'_>, our_anchor: &str, accepts: &str, fix: &str) -> String {
    let path = cert::follow(cx.ours);
    let top = path.last().map(|&i| &cx.ours[i]);
    match top {
        Some(t) if t.self_signed() && path.len() > 1 => format!(
            "its trust store does not contain our root CA, {}{accepts}{fix}",
            t.subject
        ),
        Some(t) if t.self_signed() => format!(
            "it does not trust our self-signed certificate, {}{accepts}; add it to the \
             CAs the upstream trusts for clients",
            t.subject
        ),
        Some(t) if path.len() > 1 => format!(
            "its trust store does not contain {}, the issuer at the top of the chain we \
             send (which ends at {}){accepts}{fix}",
            t.issuer, t.subject
        ),
        _ => format!(
            "its trust store does not contain the issuer of our certificate, \
             {our_anchor}{accepts}{fix}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_names() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::CertificateExpired),
            "certificate_expired"
        );
    }

    #[test]
    fn unknown_issuer_without_a_chain_names_the_trust_store() {
        let trust = Trust {
            ca: None,
            subjects: vec![],
        };
        let cx = Context {
            server_name: "x",
            trust: &trust,
            ours: &[],
            our_leaf: None,
            theirs: &[],
            their_summaries: &[],
            hints: &[],
            now: 0,
        };
        let m = tls_failure(
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            &cx,
        );
        assert!(m.contains("the system trust store"), "{m}");
    }
}
