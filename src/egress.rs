//! Egress through an HTTP CONNECT proxy: the proxy URL, its credentials and the `--no-proxy`
//! bypass list (validated once, at startup), the CONNECT exchange, and [`Transport`], the byte
//! stream the upstream TLS session runs over (a TCP socket, or a tunnel through the proxy).
//!
//! The CONNECT request carries the upstream *name*: DNS happens at the proxy, which in many
//! companies is the only host that can resolve outside names at all.

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use base64::Engine as _;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_rustls::client::TlsStream;

use crate::bufio::{LazyBufTcp, Pending};
use crate::failure::{Class, Failure, escape};

/// Longest CONNECT answer header accepted; more is not a proxy talking.
pub const MAX_ANSWER: usize = 16 * 1024;

/// `http://` (plain TCP to the proxy) or `https://` (TLS to the proxy itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A proxy URL taken apart. `user:pass` stays out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub scheme: Scheme,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Percent-decoded `user:pass` from the URL.
    credentials: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

impl std::fmt::Display for ProxyUrl {
    /// The URL without credentials: safe for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl ProxyUrl {
    /// `http://[user:pass@]HOST[:PORT][/]` or `https://…`; a URL without a scheme is `http://`
    /// (as curl and most `HTTPS_PROXY` users write it). Default ports: 80 and 443.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        let (scheme, rest) = match value.split_once("://") {
            Some((s, rest)) => match s.to_ascii_lowercase().as_str() {
                "http" => (Scheme::Http, rest),
                "https" => (Scheme::Https, rest),
                // Named only when it looks like a scheme: text before a misplaced `://` may be
                // credentials (`http:/user:secret@proxy://…`, found by fuzzing).
                other if is_scheme(other) => {
                    return Err(format!(
                        "unsupported proxy scheme {other}://: only http:// and https:// \
                         (HTTP CONNECT) proxies are supported"
                    ));
                }
                _ => {
                    return Err("not a proxy URL: only http://[user:pass@]HOST[:PORT] and \
                                https://… (HTTP CONNECT) proxies are supported"
                        .to_string());
                }
            },
            None => (Scheme::Http, value),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err("a proxy URL has no path, query or fragment".into());
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let decoded = percent_decode(userinfo)?;
                if !decoded.contains(':') {
                    return Err("credentials in a proxy URL are written user:password@".into());
                }
                (Some(decoded), hostport)
            }
            None => (None, rest),
        };
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
            let (host, tail) = after
                .split_once(']')
                .ok_or("an IPv6 proxy address needs its closing bracket")?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{host:?} is not an IPv6 address"))?;
            let port = match tail {
                "" => default_port,
                t => parse_port(t.strip_prefix(':').ok_or("expected :PORT after ]")?)?,
            };
            (host.to_string(), port)
        } else {
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (hostport.to_string(), default_port),
            };
            // Only a bracketed host may hold a colon: `http://a:b:80` is not a host `a:b`.
            if host.contains(':') {
                return Err(
                    "an IPv6 proxy address is written in brackets: http://[::1]:3128".into(),
                );
            }
            (host, port)
        };
        if host.is_empty() {
            return Err("the proxy URL has no host".into());
        }
        if !host.contains(':') && ServerName::try_from(host.as_str()).is_err() {
            return Err(format!("{host:?} is not a valid host name"));
        }
        Ok(ProxyUrl {
            scheme,
            host,
            port,
            credentials,
        })
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }
}

/// An RFC 3986 scheme of a sane length: a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    s.len() <= 16
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        // Quoted only when it is digits: in `http://user:password` (the `@HOST` forgotten)
        // the "port" is the password.
        Ok(0) | Err(_) if p.bytes().all(|b| b.is_ascii_digit()) => {
            Err(format!("{p:?} is not a port number (1-65535)"))
        }
        Ok(0) | Err(_) => Err(
            "what follows the last ':' is not a port number (1-65535); credentials are written \
             user:password@HOST"
                .into(),
        ),
        Ok(n) => Ok(n),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a bad %-escape in the proxy credentials")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy credentials are not UTF-8".to_string())
}

/// `--no-proxy`: hosts, domains and CIDRs that bypass the proxy, matched as curl does: `*`
/// matches everything; a name matches itself and every name below it (`example.com` and
/// `.example.com` both match `example.com` and `a.example.com`, never `notexample.com`),
/// case-insensitively; addresses and CIDRs match an upstream written as an IP address (names
/// are never resolved to decide).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<(String, Entry)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Any,
    Name(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    /// Parse a comma-separated list. `Err` names the first entry that cannot be a CIDR.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry = if raw == "*" {
                Entry::Any
            } else if let Some((addr, bits)) = raw.split_once('/') {
                let addr: IpAddr = unbracket(addr)
                    .parse()
                    .map_err(|_| format!("{raw:?} is not a CIDR (address/bits)"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits
                    .parse()
                    .ok()
                    .filter(|b| *b <= max)
                    .ok_or_else(|| format!("{raw:?}: the prefix length must be 0 to {max}"))?;
                Entry::Net(addr, bits)
            } else if let Ok(ip) = unbracket(raw).parse::<IpAddr>() {
                Entry::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
            } else {
                let name = raw.trim_start_matches('.').trim_end_matches('.');
                Entry::Name(name.to_ascii_lowercase())
            };
            entries.push((raw.to_string(), entry));
        }
        Ok(NoProxy { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry (as written) that makes `host` bypass the proxy, if any.
    pub fn matching(&self, host: &str) -> Option<&str> {
        let host = unbracket(host).trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries
            .iter()
            .find(|(_, e)| match (e, ip) {
                (Entry::Any, _) => true,
                (Entry::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
                (Entry::Name(name), None) => {
                    host == *name
                        || (host.len() > name.len()
                            && host.ends_with(name.as_str())
                            && host.as_bytes()[host.len() - name.len() - 1] == b'.')
                }
                // An IP written as text also matches the same text in the list (curl).
                (Entry::Name(name), Some(_)) => host == *name,
                (Entry::Net(..), None) => false,
            })
            .map(|(raw, _)| raw.as_str())
    }
}

fn unbracket(s: &str) -> &str {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s)
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    let mask = if shift >= 128 {
        0
    } else {
        (u128::MAX << shift) & (u128::MAX >> (128 - width))
    };
    ip & mask == net & mask
}

/// The TLS configuration for an `https://` proxy, trusting `ca` (`--proxy-ca`) or the system
/// store, and a description of that trust for messages. No client certificate is sent to the
/// proxy: the identity is for the upstream.
pub fn proxy_tls(
    ca: Option<&std::path::Path>,
) -> Result<(Arc<ClientConfig>, String), crate::tls::load::Error> {
    use crate::tls::load;
    let (roots, trust) = match ca {
        Some(path) => {
            let f = load::FileBytes::read("--proxy-ca", path)?;
            (
                load::ca_bundle(&f)?,
                format!("--proxy-ca {}", path.display()),
            )
        }
        None => (
            load::system_roots("--proxy-ca")?,
            "the system trust store".to_string(),
        ),
    };
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| load::Error::BadCa {
            flag: "--proxy-ca",
            path: ca.map(std::path::Path::to_path_buf).unwrap_or_default(),
            index: 0,
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), trust))
}

/// Where the proxy's credentials come from.
enum Auth {
    None,
    /// In the URL: fixed for the life of the process.
    Url(Arc<str>),
    /// `--proxy-auth-file` / `MTLS_SIDECAR_PROXY_AUTH_FILE`: read at startup and again after
    /// a `407`, so rotated credentials are picked up without a restart.
    File {
        path: PathBuf,
        header: Mutex<Arc<str>>,
    },
}

/// A route's proxy, ready to dial through.
pub struct Proxy {
    pub url: ProxyUrl,
    auth: Auth,
    /// TLS to an `https://` proxy: the system roots or `--proxy-ca`.
    tls: Option<Arc<ClientConfig>>,
    /// Where the proxy's trust comes from, for messages.
    pub trust: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("url", &self.url)
            .field("credentials", &self.credentials_source())
            .finish()
    }
}

/// `Basic base64(user:pass)`.
fn basic(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// Read `user:pass` from an auth file: a password file (one trailing newline ignored), read as
/// `--key-password-file` is.
/// The result is wiped from memory when dropped, like the file's bytes.
fn read_auth_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, String> {
    let f =
        crate::tls::load::FileBytes::read("--proxy-auth-file", path).map_err(|e| e.to_string())?;
    match std::str::from_utf8(f.password()) {
        Ok(text) if text.contains(':') => Ok(zeroize::Zeroizing::new(text.to_string())),
        _ => Err(format!(
            "proxy auth file {} must hold user:password (UTF-8)",
            path.display()
        )),
    }
}

impl Proxy {
    /// Build a route's proxy: credentials from the URL or from `auth_file` (not both), and for
    /// an `https://` proxy the TLS configuration, trusting `ca` or the system store.
    pub fn new(
        mut url: ProxyUrl,
        auth_file: Option<PathBuf>,
        tls: Option<(Arc<ClientConfig>, String)>,
    ) -> Result<Self, String> {
        let auth = match (url.credentials.take(), auth_file) {
            (Some(_), Some(path)) => {
                return Err(format!(
                    "proxy credentials are given twice: in the proxy URL and in {}; keep one",
                    path.display()
                ));
            }
            (Some(c), None) => Auth::Url(basic(&c).into()),
            (None, Some(path)) => {
                let header = basic(&read_auth_file(&path)?);
                Auth::File {
                    path,
                    header: Mutex::new(header.into()),
                }
            }
            (None, None) => Auth::None,
        };
        let (tls, trust) = match tls {
            Some((c, t)) => (Some(c), t),
            None => (None, String::new()),
        };
        Ok(Proxy {
            url,
            auth,
            tls,
            trust,
        })
    }

    /// Where credentials come from, for logs and `check` (never the credentials).
    pub fn credentials_source(&self) -> String {
        match &self.auth {
            Auth::None => "none".into(),
            Auth::Url(_) => "in the proxy URL".into(),
            Auth::File { path, .. } => format!("from {}", path.display()),
        }
    }

    fn auth_header(&self) -> Option<Arc<str>> {
        match &self.auth {
            Auth::None => None,
            Auth::Url(h) => Some(h.clone()),
            Auth::File { header, .. } => Some(
                header
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            ),
        }
    }

    /// After a 407: read the auth file again so the next connection uses what is there now.
    /// Returns whether the credentials changed.
    fn reread_auth(&self) -> bool {
        let Auth::File { path, header } = &self.auth else {
            return false;
        };
        match read_auth_file(path) {
            Ok(c) => {
                let new = basic(&c);
                let mut h = header.lock().unwrap_or_else(PoisonError::into_inner);
                let changed = **h != *new;
                *h = new.into();
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "proxy auth file unreadable; keeping the credentials in use");
                false
            }
        }
    }

    /// The TLS configuration of an `https://` proxy; `None` for `http://`.
    pub fn tls(&self) -> Option<Arc<ClientConfig>> {
        self.tls.clone()
    }

    /// TLS to the proxy itself (with [`Proxy::tls`]); the caller then runs
    /// [`Proxy::connect_tunnel`] over it.
    pub async fn tls_to_proxy(
        &self,
        config: Arc<ClientConfig>,
        tcp: LazyBufTcp,
    ) -> Result<TlsStream<LazyBufTcp>, Failure> {
        let name = ServerName::try_from(self.url.host.clone())
            .map_err(|e| Failure::new(Class::ProxyTls, format!("proxy host name: {e}")))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| self.tls_failure(&e))
    }

    fn tls_failure(&self, e: &io::Error) -> Failure {
        let detail = match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(ce)) => match ce {
                rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature => format!(
                    "its certificate is not trusted: the chain does not lead to a CA in {} \
                     (unknown issuer)",
                    self.trust
                ),
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                    "its certificate is not valid for the name {:?} in the proxy URL",
                    self.url.host
                ),
                other => format!("its certificate was refused: {other:?}"),
            },
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)) => {
                "it requires a client certificate, and mtls-sidecar presents its identity only \
                 to the upstream, never to the proxy"
                    .to_string()
            }
            Some(other) => format!("TLS error: {other}"),
            None => format!("the connection ended during the TLS handshake: {e}"),
        };
        Failure::new(
            Class::ProxyTls,
            format!("TLS with the proxy {} failed: {detail}", self.url),
        )
    }

    /// Send `CONNECT target` and read the answer. On a 2xx, returns the status line (`200
    /// Connection established`) and the bytes the proxy sent after its header (they already
    /// belong to the tunnel).
    pub async fn connect_tunnel<S>(
        &self,
        io: &mut S,
        target: &str,
    ) -> Result<(String, Vec<u8>), Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let auth = self.auth_header();
        let mut req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: mtls-sidecar/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(a) = &auth {
            req.push_str("Proxy-Authorization: ");
            req.push_str(a);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        let io_fail = |e: io::Error, when: &str| {
            // Through an https:// proxy, a TLS alert can arrive only now (TLS 1.3: the proxy
            // judges the client side after our handshake is done, e.g. it wants a certificate).
            if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                return self.tls_failure(&e);
            }
            Failure::new(
                Class::ProxyProtocol,
                format!("the proxy {} failed {when}: {e}", self.url),
            )
        };
        io.write_all(req.as_bytes())
            .await
            .map_err(|e| io_fail(e, "while we sent CONNECT"))?;
        io.flush()
            .await
            .map_err(|e| io_fail(e, "while we sent CONNECT"))?;
        drop(req);

        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = io
                .read(&mut chunk)
                .await
                .map_err(|e| io_fail(e, "while answering CONNECT"))?;
            if n == 0 {
                let what = if buf.is_empty() {
                    "closed the connection without answering CONNECT".to_string()
                } else {
                    format!(
                        "closed the connection in the middle of its answer to CONNECT ({} bytes: \
                         {})",
                        buf.len(),
                        printable(&buf)
                    )
                };
                return Err(Failure::new(
                    Class::ProxyProtocol,
                    format!("the proxy {} {what}", self.url),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut answer = httparse::Response::new(&mut headers);
            match answer.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = answer.code.unwrap_or(0);
                    // The reason phrase is the proxy's text (obs-text lets C1 controls in):
                    // escaped before it reaches a log or `check`'s report.
                    // It may be as long as the whole head (16 KiB): a short prefix is kept.
                    let reason = answer.reason.unwrap_or("");
                    let reason = match reason.char_indices().nth(MAX_REASON_CHARS) {
                        Some((cut, _)) => &reason[..cut],
                        None => reason,
                    };
                    let reason = escape(reason).into_owned();
                    if (200..300).contains(&code) {
                        return Ok((format!("{code} {reason}"), buf.split_off(len)));
                    }
                    return Err(self.refusal(code, &reason, auth.is_some(), target));
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_ANSWER => {}
                Ok(httparse::Status::Partial) => {
                    return Err(Failure::new(
                        Class::ProxyProtocol,
                        format!(
                            "the proxy {} sent a CONNECT answer header over {} KiB",
                            self.url,
                            MAX_ANSWER / 1024
                        ),
                    ));
                }
                Err(e) => {
                    return Err(Failure::new(
                        Class::ProxyProtocol,
                        format!(
                            "the proxy {} did not answer CONNECT in HTTP ({e}): {}",
                            self.url,
                            printable(&buf)
                        ),
                    ));
                }
            }
        }
    }

    fn refusal(&self, code: u16, reason: &str, sent_auth: bool, target: &str) -> Failure {
        let url = &self.url;
        if code == 407 {
            let message = if sent_auth {
                let rotated = self.reread_auth();
                let next = if rotated {
                    "; the auth file has changed since, the next connection uses its new content"
                } else {
                    ""
                };
                format!(
                    "proxy authentication failed: the proxy {url} refused the credentials {} \
                     (407 {reason}){next}",
                    self.credentials_source()
                )
            } else {
                format!(
                    "proxy authentication required: the proxy {url} answered 407 {reason} and no \
                     credentials are configured (user:pass@ in the proxy URL, or \
                     MTLS_SIDECAR_PROXY_AUTH_FILE)"
                )
            };
            return Failure::new(Class::ProxyAuth, message);
        }
        let hint = match code {
            403 => ": its policy does not allow this destination",
            502..=504 => {
                ": it could not reach the upstream (the proxy resolves and dials the name itself)"
            }
            _ => "",
        };
        Failure::new(
            Class::ProxyRefused,
            format!("the proxy {url} refused CONNECT {target}: {code} {reason}{hint}"),
        )
    }
}

/// The first bytes of an answer, safe to log.
/// How much of a proxy's reason phrase reaches messages.
const MAX_REASON_CHARS: usize = 128;

fn printable(b: &[u8]) -> String {
    let head = &b[..b.len().min(64)];
    format!("{:?}", String::from_utf8_lossy(head))
}

/// What the upstream TLS session runs over.
pub enum Transport {
    /// TCP to the upstream, or to a plain `http://` proxy after CONNECT (bytes the proxy sent
    /// past its answer are already in the socket's buffer).
    Tcp(LazyBufTcp),
    /// TLS to an `https://` proxy after CONNECT, with the bytes read past its answer.
    Tls(Box<Prefixed<TlsStream<LazyBufTcp>>>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp(_) => f.write_str("Transport::Tcp"),
            Transport::Tls(_) => f.write_str("Transport::Tls"),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Prefixed<S> {
    pub inner: S,
    rest: Pending,
}

impl<S> Prefixed<S> {
    pub fn new(inner: S, rest: Vec<u8>) -> Self {
        Prefixed {
            inner,
            rest: Pending::new(rest),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rest.drain_into(out) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

macro_rules! delegate_write {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Transport::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Transport::Tls(t) => {
                let $s = Pin::new(&mut t.inner);
                $e
            }
        }
    };
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, out),
            Transport::Tls(t) => Pin::new(&mut **t).poll_read(cx, out),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        delegate_write!(self, s => s.poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_write!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            Transport::Tls(t) => t.inner.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_write!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_write!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    /// Found by the `proxy_url` fuzz target: the text before a misplaced `://` was echoed as
    /// the scheme, credentials included.
    #[test]
    fn a_misplaced_scheme_separator_never_echoes_credentials() {
        for url in [
            "http:/user:secret@proxy.example://",
            "htp:\u{10}\0//pr!secret@@@@\0ttp://x",
        ] {
            let err = ProxyUrl::parse(url).unwrap_err();
            assert!(!err.contains("secret"), "{err}");
        }
        let err = ProxyUrl::parse("socks5://proxy:1080").unwrap_err();
        assert!(err.contains("socks5://"), "{err}");
    }

    use super::*;

    #[test]
    fn proxy_urls() {
        let u = ProxyUrl::parse("http://alice:p%40ss@proxy.corp:3128").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Http, "proxy.corp", 3128)
        );
        assert_eq!(u.credentials.as_deref(), Some("alice:p@ss"));
        assert_eq!(u.to_string(), "http://proxy.corp:3128");
        assert!(!format!("{u:?}").contains("p@ss"));
        let u = ProxyUrl::parse("proxy.corp:8080").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Http, 8080));
        let u = ProxyUrl::parse("https://proxy.corp/").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Https, 443));
        let u = ProxyUrl::parse("http://[::1]:3128").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3128));
        assert_eq!(u.to_string(), "http://[::1]:3128");
        for bad in [
            "socks5://h:1080",
            "http://h:0",
            "http://h:x",
            "http://:3128",
            "http://h:1/path",
            "http://user@h:1",
            "http://[::1:1",
            "http://a%zz:b@h:1",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn no_proxy_matches_like_curl() {
        let np =
            NoProxy::parse(" example.com, .internal.corp ,10.0.0.0/8, ::1, fd00::/8,LOCALHOST")
                .unwrap();
        let m = |h| np.matching(h);
        assert_eq!(m("example.com"), Some("example.com"));
        assert_eq!(m("API.Example.com."), Some("example.com"));
        assert_eq!(m("notexample.com"), None);
        assert_eq!(m("example.com.evil"), None);
        assert_eq!(m("internal.corp"), Some(".internal.corp"));
        assert_eq!(m("db.internal.corp"), Some(".internal.corp"));
        assert_eq!(m("10.20.30.40"), Some("10.0.0.0/8"));
        assert_eq!(m("11.0.0.1"), None);
        assert_eq!(m("::1"), Some("::1"));
        assert_eq!(m("[::1]"), Some("::1"));
        assert_eq!(m("fd12::5"), Some("fd00::/8"));
        assert_eq!(m("fe80::1"), None);
        assert_eq!(m("localhost"), Some("LOCALHOST"));
        // Names are never resolved: 127.0.0.1 is not "localhost".
        assert_eq!(m("127.0.0.1"), None);
        assert_eq!(NoProxy::parse("*").unwrap().matching("x.y"), Some("*"));
        assert_eq!(
            NoProxy::parse("0.0.0.0/0").unwrap().matching("1.2.3.4"),
            Some("0.0.0.0/0")
        );
        assert_eq!(
            NoProxy::parse("127.0.0.1").unwrap().matching("127.0.0.2"),
            None
        );
        assert!(NoProxy::parse("10.0.0.0/33").is_err());
        assert!(NoProxy::parse("nothing/8").is_err());
        assert!(NoProxy::parse(" , ").unwrap().is_empty());
    }

    async fn answer(
        wire: &'static [u8],
        chunk: usize,
    ) -> (Result<(String, Vec<u8>), Failure>, String) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let proxy = Proxy::new(ProxyUrl::parse("http://u:pw@p:3128").unwrap(), None, None).unwrap();
        let far = tokio::spawn(async move {
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                theirs.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            for piece in wire.chunks(chunk.max(1)) {
                theirs.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            String::from_utf8(req).unwrap()
        });
        let got = proxy.connect_tunnel(&mut ours, "up.example:443").await;
        (got, far.await.unwrap())
    }

    /// Found by the `connect_answer` fuzz target: a reason phrase as long as the head limit
    /// reached the message (and the log) whole.
    #[tokio::test]
    async fn a_long_reason_phrase_is_cut_short() {
        let mut wire = b"HTTP/1.1 403 ".to_vec();
        wire.extend(std::iter::repeat_n(b'x', 8000));
        wire.extend(b"\r\n\r\n");
        let wire: &'static [u8] = wire.leak();
        let (got, _) = answer(wire, wire.len()).await;
        let f = got.unwrap_err();
        assert!(f.message.len() < 2048, "{} bytes", f.message.len());
        assert!(f.message.contains("403 xxxx"), "{}", f.message);
    }

    #[tokio::test]
    async fn connect_keeps_bytes_after_the_answer() {
        let wire = b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n\x16\x03\x03tls";
        // In one segment: the tunnel's first bytes came with the answer.
        let (got, req) = answer(wire, wire.len()).await;
        assert_eq!(
            got.unwrap(),
            (
                "200 Connection established".to_string(),
                b"\x16\x03\x03tls".to_vec()
            )
        );
        assert!(req.starts_with("CONNECT up.example:443 HTTP/1.1\r\nHost: up.example:443\r\n"));
        assert!(
            req.contains("Proxy-Authorization: Basic dTpwdw==\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn connect_answers_are_classified() {
        let cases: [(&'static [u8], Class); 5] = [
            (
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                Class::ProxyAuth,
            ),
            (
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
                Class::ProxyRefused,
            ),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Class::ProxyProtocol),
            (b"HTTP/1.1 200 OK\r\n", Class::ProxyProtocol),
            (b"", Class::ProxyProtocol),
        ];
        for (wire, class) in cases {
            let (got, _) = answer(wire, 3).await;
            let f = got.expect_err("not a 2xx");
            assert_eq!(
                f.class,
                class,
                "{:?}: {}",
                String::from_utf8_lossy(wire),
                f.message
            );
        }
        let (got, _) = answer(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", 3).await;
        assert!(
            got.unwrap_err()
                .message
                .contains("proxy authentication failed")
        );
    }
}
