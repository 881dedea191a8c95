//! Egress through an HTTP CONNECT proxy: the proxy URL, its credentials and the `--no-proxy`
//! bypass list (validated once, at startup), and the CONNECT tunnel the upstream TLS session
//! runs through.
//!
//! The CONNECT request carries the upstream *name*: DNS happens at the proxy, which in many
//! companies is the only host that can resolve outside names at all.

mod no_proxy;
pub mod tunnel;
mod url;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use rustls::ClientConfig;

pub use no_proxy::NoProxy;
pub use tunnel::MAX_ANSWER;
pub use url::{ProxyUrl, Scheme};

/// What is wrong with a proxy setting; each message names the problem, never the credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "unsupported proxy scheme {0}://: only http:// and https:// (HTTP CONNECT) proxies are \
         supported"
    )]
    UnsupportedScheme(String),
    #[error(
        "not a proxy URL: only http://[user:pass@]HOST[:PORT] and https://… (HTTP CONNECT) \
         proxies are supported"
    )]
    NotAProxyUrl,
    #[error("a proxy URL has no path, query or fragment")]
    PathInUrl,
    #[error("credentials in a proxy URL are written user:password@")]
    CredentialsWithoutColon,
    #[error("an IPv6 proxy address needs its closing bracket")]
    UnclosedBracket,
    #[error("{0:?} is not an IPv6 address")]
    NotIpv6(String),
    #[error("expected :PORT after ]")]
    PortAfterBracket,
    #[error("an IPv6 proxy address is written in brackets: http://[::1]:3128")]
    UnbracketedIpv6,
    #[error("the proxy URL has no host")]
    NoHost,
    #[error("{0:?} is not a valid host name")]
    BadHostName(String),
    /// Digits, so safe to quote.
    #[error("{0:?} is not a port number (1-65535)")]
    BadPort(String),
    /// Not digits: in `http://user:password` (the `@HOST` forgotten) the "port" is the
    /// password, so it is not quoted.
    #[error(
        "what follows the last ':' is not a port number (1-65535); credentials are written \
         user:password@HOST"
    )]
    NotAPort,
    #[error("a bad %-escape in the proxy credentials")]
    BadEscape,
    #[error("the proxy credentials are not UTF-8")]
    CredentialsNotUtf8,
    #[error("{0:?} is not a CIDR (address/bits)")]
    NotCidr(String),
    #[error("{entry:?}: the prefix length must be 0 to {max}")]
    PrefixLength { entry: String, max: u8 },
    #[error("proxy credentials are given twice: in the proxy URL and in {}; keep one", .0.display())]
    CredentialsTwice(PathBuf),
    #[error(transparent)]
    AuthFile(#[from] crate::tls::load::Error),
    #[error("proxy auth file {} must hold user:password (UTF-8)", .0.display())]
    AuthFileContent(PathBuf),
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
    /// Where the proxy is; without credentials (they moved to `auth`), so safe to show.
    pub url: ProxyUrl,
    /// The `Proxy-Authorization` sent with CONNECT, if any.
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
fn read_auth_file(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, Error> {
    let f = crate::tls::load::FileBytes::read("--proxy-auth-file", path)?;
    match std::str::from_utf8(f.password()) {
        Ok(text) if text.contains(':') => Ok(zeroize::Zeroizing::new(text.to_string())),
        _ => Err(Error::AuthFileContent(path.to_path_buf())),
    }
}

impl Proxy {
    /// Build a route's proxy: credentials from the URL or from `auth_file` (not both), and for
    /// an `https://` proxy the TLS configuration, trusting `ca` or the system store.
    pub fn new(
        mut url: ProxyUrl,
        auth_file: Option<PathBuf>,
        tls: Option<(Arc<ClientConfig>, String)>,
    ) -> Result<Self, Error> {
        let auth = match (url.credentials.take(), auth_file) {
            (Some(_), Some(path)) => return Err(Error::CredentialsTwice(path)),
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
}
