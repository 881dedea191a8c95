//! Reaching the upstream: resolve (at every dial), connect to each address in turn, TLS
//! handshake, all under `--connect-timeout`; and the classification of every way that can fail,
//! in words an operator understands.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{AlertDescription, CertificateError, ClientConfig};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::bufio::LazyBufTcp;
use crate::config::{Route, Via};
use crate::egress::{Prefixed, Proxy, Transport};
use crate::resolve::{self, Resolver};
use crate::tls::verify::CheckError;

type Deadline = tokio::time::Instant;

/// The upstream TLS stream a connection relays into.
pub type Upstream = TlsStream<Transport>;

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
            | Class::ProxyTls => "tls_error",
            Class::Idle => "ok",
            Class::Reset | Class::Io | Class::Drain | Class::ProxyProtocol => "error",
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

/// Display form of a server name for messages.
pub fn server_name_str(route: &Route) -> String {
    match &route.server_name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// An established upstream connection.
pub struct Connected {
    pub stream: Upstream,
    pub handshake: Duration,
}

/// Resolve `host` and connect to each address in turn (see [`crate::resolve`]), all before
/// `deadline`. For the proxy (`proxy` set) every failure is `ProxyUnreachable`.
async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    phase: &mut &'static str,
) -> Result<(TcpStream, SocketAddr), Failure> {
    // Messages are made only when something failed: nothing here allocates on success.
    let what = || match proxy {
        Some(p) => format!("the proxy {}", p.url),
        None => "the upstream".to_string(),
    };
    let fail = |class: Class, message: String| match proxy {
        Some(_) => Failure::new(Class::ProxyUnreachable, message),
        None => Failure::new(class, message),
    };
    let addrs = match Resolver::global().lookup(host, port, deadline).await {
        Ok(a) => a,
        // Out of time: the caller's timeout names the phase.
        Err(resolve::Error::Timeout) => return std::future::pending().await,
        Err(e) => {
            return Err(fail(
                Class::Dns,
                format!("cannot resolve {} host {host}: {e}", what()),
            ));
        }
    };
    if addrs.is_empty() {
        return Err(fail(
            Class::Dns,
            format!("{} host {host} resolved to no address", what()),
        ));
    }
    *phase = if proxy.is_some() {
        "connect to the proxy"
    } else {
        "connect"
    };
    let mut attempts = Vec::new();
    match resolve::connect_each(&addrs, deadline, &mut attempts).await {
        Ok(found) => return Ok(found),
        // Out of time: the caller's timeout names the phase.
        Err(resolve::ConnectEnd::Deadline { .. }) => return std::future::pending().await,
        Err(resolve::ConnectEnd::AllFailed) => {}
    }
    // Every address failed: report the last one, and how many others.
    let Some((e, addr)) = attempts.pop().map(|(a, e)| (e, a)) else {
        return std::future::pending().await;
    };
    let others = match attempts.len() {
        0 => String::new(),
        n => format!("; {n} other address(es) failed too"),
    };
    let f = classify_io(&e, "");
    let message = match proxy {
        Some(_) => format!("cannot connect to {}: {e} ({addr}){others}", what()),
        None => format!("{} ({addr}){others}", f.message),
    };
    Err(fail(f.class, message))
}

/// A byte stream to the upstream, ready for its TLS handshake.
pub struct Opened {
    pub transport: Transport,
    /// The address connected to: the upstream's, or the proxy's.
    pub addr: SocketAddr,
    /// The proxy's answer to CONNECT (`200 Connection established`), if through one.
    pub proxy_answer: Option<String>,
}

/// How a stream connected to `addr` reached the upstream, for messages: `ADDR`, or
/// `via proxy URL at ADDR`.
pub fn hop(route: &Route, addr: SocketAddr) -> String {
    match &route.via {
        Via::Proxy(p) => format!("via proxy {} at {addr}", p.url),
        _ => addr.to_string(),
    }
}

/// The byte stream the upstream TLS session runs over: TCP to the upstream, or a tunnel
/// through the route's proxy (CONNECT with the upstream's name, resolved by the proxy).
///
/// Callers bound it by `deadline` (`--connect-timeout` from the start of the dial): the
/// lookup and each connect are sized from it, and when it passes this future stays pending
/// so that the caller's own timeout reports the phase.
pub async fn open(
    route: &Route,
    deadline: Deadline,
    phase: &mut &'static str,
) -> Result<Opened, Failure> {
    let Via::Proxy(proxy) = &route.via else {
        *phase = "resolve";
        let (tcp, addr) = dial(
            &route.upstream.host,
            route.upstream.port,
            None,
            deadline,
            phase,
        )
        .await?;
        return Ok(Opened {
            transport: Transport::Tcp(LazyBufTcp::new(tcp)),
            addr,
            proxy_answer: None,
        });
    };
    *phase = "resolve the proxy";
    let (tcp, addr) = dial(
        &proxy.url.host,
        proxy.url.port,
        Some(proxy),
        deadline,
        phase,
    )
    .await?;
    let target = route.upstream.to_string();
    let mut tcp = LazyBufTcp::new(tcp);
    let (transport, answer) = match proxy.tls() {
        Some(config) => {
            *phase = "TLS handshake with the proxy";
            let mut tls = proxy.tls_to_proxy(config, tcp).await?;
            *phase = "CONNECT exchange with the proxy";
            let (answer, rest) = proxy.connect_tunnel(&mut tls, &target).await?;
            (Transport::Tls(Box::new(Prefixed::new(tls, rest))), answer)
        }
        None => {
            *phase = "CONNECT exchange with the proxy";
            let (answer, rest) = proxy.connect_tunnel(&mut tcp, &target).await?;
            tcp.unread(rest);
            (Transport::Tcp(tcp), answer)
        }
    };
    Ok(Opened {
        transport,
        addr,
        proxy_answer: Some(answer),
    })
}

/// `--connect-timeout` ran out while in `phase`.
pub fn timed_out(route: &Route, phase: &str) -> Failure {
    let via = match &route.via {
        Via::Proxy(p) => format!(", via proxy {}", p.url),
        _ => String::new(),
    };
    Failure::new(
        Class::Timeout,
        format!(
            "no TLS session with the upstream within --connect-timeout {} (stuck in {phase}{via})",
            humantime::format_duration(route.connect_timeout)
        ),
    )
}

/// Resolve, connect (each address in turn; through the proxy if any) and handshake, all within
/// `--connect-timeout`.
pub async fn connect(route: &Route, config: Arc<ClientConfig>) -> Result<Connected, Failure> {
    let deadline = resolve::deadline_after(route.connect_timeout);
    let mut phase = "resolve";
    let attempt = async {
        let opened = open(route, deadline, &mut phase).await?;
        phase = "tls handshake";
        let started = Instant::now();
        let addr = opened.addr;
        let stream = TlsConnector::from(config)
            .connect(route.server_name.clone(), opened.transport)
            .await
            .map_err(|e| {
                let mut f = classify_io(&e, &server_name_str(route));
                if f.class == Class::Reset || f.class == Class::Io {
                    f = Failure::new(
                        Class::Protocol,
                        format!("the upstream closed the connection during the TLS handshake: {e}"),
                    );
                }
                f.message = format!("{} ({})", f.message, hop(route, addr));
                f
            })?;
        Ok(Connected {
            stream,
            handshake: started.elapsed(),
        })
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(route, phase)),
    }
}
