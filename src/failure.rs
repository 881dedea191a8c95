//! Why a connection failed: a stable [`Class`] (the access-log `reason`, the metric's
//! `outcome`) and a [`Failure`] with an operator-readable message, from TLS and I/O errors on
//! either side. Peer text in messages is escaped here, once for every path.

use std::io;

use rustls::{AlertDescription, CertificateError};

use crate::spiffe::verify::SpiffeError;
use crate::tls::verify::CheckError;

/// On the proxy's own answer to an HTTP request (502, 503, 504, 501): its `reason` word, a
/// response extension read by the request's access line and its span (`error.type`).
#[derive(Debug, Clone, Copy)]
pub struct OwnAnswer(pub &'static str);

/// Why a connection failed, as a stable class. `reason()` is the access-log `reason` field and
/// `outcome()` the coarser metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Dns,
    Refused,
    Unreachable,
    Timeout,
    UnknownIssuer,
    NameMismatch,
    Expired,
    NotYetValid,
    ClientCertRejected,
    /// A `--crl` lists the upstream certificate (or one of its CAs).
    Revoked,
    /// `--verify-uri-san` found none of the required URI SANs.
    UriSanMismatch,
    /// `--pin-sha256` matched no pin.
    PinMismatch,
    Protocol,
    /// The upstream reset or aborted the connection after the handshake.
    Reset,
    /// Anything else on the wire, on either side.
    Io,
    /// No traffic either way for `--idle-timeout`: a policy close, not a fault.
    Idle,
    /// Still running when `--drain-timeout` ran out at shutdown.
    Drain,
    /// The `--proxy` cannot be resolved or connected to.
    ProxyUnreachable,
    /// The proxy answered `407`: credentials missing or refused.
    ProxyAuth,
    /// The proxy answered CONNECT with another non-2xx status.
    ProxyRefused,
    /// The proxy closed before answering, or did not answer in HTTP.
    ProxyProtocol,
    /// The TLS handshake with an `https://` proxy failed.
    ProxyTls,
    /// A `--spiffe` route has no identity (none yet from the Workload API, or withdrawn) and
    /// none came within `--connect-timeout`.
    NoIdentity,
    /// `--spiffe`: the upstream's trust domain has no bundle, or its leaf no SPIFFE ID.
    NoTrustBundle,
}

impl Class {
    pub fn reason(self) -> &'static str {
        match self {
            Class::Dns => "dns",
            Class::Refused => "refused",
            Class::Unreachable => "unreachable",
            Class::Timeout => "timeout",
            Class::UnknownIssuer => "unknown_issuer",
            Class::NameMismatch => "name_mismatch",
            Class::Expired => "expired",
            Class::NotYetValid => "not_yet_valid",
            Class::ClientCertRejected => "client_cert_rejected",
            Class::Revoked => "revoked",
            Class::UriSanMismatch => "uri_san_mismatch",
            Class::PinMismatch => "pin_mismatch",
            Class::Protocol => "protocol",
            Class::Reset => "reset",
            Class::Io => "io",
            Class::Idle => "idle_timeout",
            Class::Drain => "drain_timeout",
            Class::ProxyUnreachable => "proxy_unreachable",
            Class::ProxyAuth => "proxy_auth",
            Class::ProxyRefused => "proxy_refused",
            Class::ProxyProtocol => "proxy_protocol",
            Class::ProxyTls => "proxy_tls",
            Class::NoIdentity => "no_identity",
            Class::NoTrustBundle => "no_trust_bundle",
        }
    }

    /// The `outcome` label: `ok`, `connect_error`, `tls_error`, `timeout` or `error`.
    pub fn outcome(self) -> &'static str {
        match self {
            Class::Dns
            | Class::Refused
            | Class::Unreachable
            | Class::ProxyUnreachable
            | Class::ProxyAuth
            | Class::ProxyRefused => "connect_error",
            Class::Timeout => "timeout",
            Class::UnknownIssuer
            | Class::NameMismatch
            | Class::Expired
            | Class::NotYetValid
            | Class::ClientCertRejected
            | Class::Revoked
            | Class::UriSanMismatch
            | Class::PinMismatch
            | Class::Protocol
            | Class::ProxyTls
            | Class::NoTrustBundle => "tls_error",
            Class::Idle => "ok",
            Class::Reset | Class::Io | Class::Drain | Class::ProxyProtocol | Class::NoIdentity => {
                "error"
            }
        }
    }

    /// The idle timeout is a policy close, not a failure, and is not logged as a warning. A
    /// connection cut at the end of the drain is: its app saw it end abruptly.
    pub fn is_fault(self) -> bool {
        self != Class::Idle
    }
}

/// A classified failure with an operator-readable explanation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub class: Class,
    pub message: String,
}

impl Failure {
    /// Messages often carry text from the peer (names from its certificate, a proxy's reason
    /// phrase, an error text), so control characters are escaped here, once for every path.
    pub fn new(class: Class, message: impl Into<String>) -> Self {
        let message = message.into();
        let message = match escape(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(escaped) => escaped,
        };
        Failure { class, message }
    }
}

/// Text from a peer (certificate names, alert texts, a proxy's answer) made safe to print:
/// control characters (terminal escapes, newlines that would forge log lines) and the Unicode
/// bidirectional overrides are written as Rust escapes (`\u{1b}`, `\n`), the form `{:?}`
/// uses, so text and JSON output and logs agree.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Classify a TLS error, during the handshake or after it (in TLS 1.3 the upstream's verdict on
/// our certificate arrives after our side considers the handshake done).
pub fn classify_tls(e: &rustls::Error, server_name: &str) -> Failure {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(ce) => match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Failure::new(
                Class::UnknownIssuer,
                "the upstream certificate is not trusted: its chain does not lead to a CA in \
                 --ca (unknown issuer)",
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Failure::new(
                    Class::NameMismatch,
                    format!(
                        "the upstream certificate is not valid for {server_name:?} (name \
                         mismatch): set --server-name to a name in its SANs"
                    ),
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Failure::new(
                Class::Expired,
                format!("the upstream certificate has expired ({ce:?})"),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Failure::new(
                    Class::NotYetValid,
                    format!("the upstream certificate is not valid yet ({ce:?})"),
                )
            }
            CertificateError::Revoked => Failure::new(
                Class::Revoked,
                "the upstream certificate is revoked: a --crl lists it (or one of its CAs)",
            ),
            CertificateError::Other(rustls::OtherError(inner)) => {
                match inner.downcast_ref::<CheckError>() {
                    Some(c @ CheckError::UriSan { .. }) => {
                        Failure::new(Class::UriSanMismatch, c.to_string())
                    }
                    Some(c @ CheckError::Pin { .. }) => {
                        Failure::new(Class::PinMismatch, c.to_string())
                    }
                    None if inner.downcast_ref::<SpiffeError>().is_some() => Failure::new(
                        Class::NoTrustBundle,
                        format!("the upstream certificate was refused: {inner}"),
                    ),
                    _ => Failure::new(
                        Class::Protocol,
                        format!("the upstream certificate was refused: {inner}"),
                    ),
                }
            }
            other => Failure::new(
                Class::Protocol,
                format!("the upstream certificate was refused: {other:?}"),
            ),
        },
        E::AlertReceived(alert) => match alert {
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired => Failure::new(
                Class::ClientCertRejected,
                format!(
                    "the upstream rejected our client certificate (alert {alert:?}): check that \
                     it trusts the CA that issued --cert and that the certificate is valid"
                ),
            ),
            other => Failure::new(
                Class::Protocol,
                format!("the upstream ended the handshake with alert {other:?}"),
            ),
        },
        other => Failure::new(Class::Protocol, format!("TLS protocol error: {other}")),
    }
}

/// Classify an I/O error on the upstream side, looking through to a rustls error inside.
pub fn classify_io(e: &io::Error, server_name: &str) -> Failure {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return classify_tls(tls, server_name);
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            Failure::new(Class::Refused, "the upstream refused the connection")
        }
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Failure::new(
            Class::Unreachable,
            format!("the upstream is unreachable: {e}"),
        ),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Failure::new(
            Class::Reset,
            format!("the upstream reset the connection: {e}"),
        ),
        _ => Failure::new(Class::Io, format!("upstream i/o error: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_spiffe_peer_without_a_bundle_is_named() {
        let e = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
            Arc::new(SpiffeError::NoBundle("b.test".into())),
        )));
        let f = classify_tls(&e, "x");
        assert_eq!(f.class, Class::NoTrustBundle);
        assert_eq!(f.class.reason(), "no_trust_bundle");
        assert!(
            f.message.contains("no bundle for trust domain b.test"),
            "{}",
            f.message
        );
    }
}
