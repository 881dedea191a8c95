//! The typed, validated configuration. Raw CLI values and the TOML file are turned into
//! [`Config`] here and nowhere else, so the rest of the program never sees an unchecked
//! string. The program is modelled as a list of routes from the start: flags make one route
//! named `default`.
//!
//! - `flags`: one outbound route from flag-shaped values and the `parse_*` of each value;
//!   [`route_from_args`] picks the direction.
//! - `inbound`: one inbound route (`--inbound`), its `Direction`, `Inbound` and `Target`.
//! - `load`: `Config::from_run_args`, and `--config FILE` (TOML) turned into flag-shaped values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::cli::Mode;
use crate::egress::{Proxy, ProxyUrl, Scheme};
use crate::tls::Settings;

mod flags;
mod inbound;
pub mod load;
mod ops;
mod protocol;
pub mod spiffe;

pub use flags::{
    HTTP_IDLE_TIMEOUT, MAX_DURATION, parse_admin, parse_duration, parse_listen, parse_mode,
    parse_pin, parse_server_name, parse_upstream,
};
pub use inbound::{Direction, Inbound, Target, parse_target};
pub use ops::Ops;

/// Everything `run` needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// One entry per listener; flags make exactly one, named `default`.
    pub routes: Vec<Route>,
    /// How long to keep accepting after SIGTERM (for apps that still call out while stopping).
    pub shutdown_delay: Duration,
    /// How long in-flight connections may run after the listeners close.
    pub drain_timeout: Duration,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`, `/status`), if any.
    pub admin: Option<Admin>,
}

/// The admin listener's settings.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Any address (it lends no identity), or a systemd socket.
    pub listen: ListenAddr,
    /// Whether `POST /shutdown` may begin a graceful shutdown.
    pub allow_shutdown: bool,
}

/// Where a listener comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// A unix socket file created (and removed) by us.
    Unix(PathBuf),
    /// A socket passed by systemd, by its `FileDescriptorName`.
    Systemd(String),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Systemd(n) => write!(f, "systemd:{n}"),
        }
    }
}

/// One plaintext listener and the upstream it forwards to.
#[derive(Debug, Clone)]
pub struct Route {
    /// Label in logs (and later metrics); unique.
    pub name: String,
    /// Where to accept plaintext; already checked against the loopback rule.
    pub listen: ListenAddr,
    /// Permissions of a `unix:` listener's socket file.
    pub listen_mode: u32,
    /// Local users allowed on a `unix:` listener (SO_PEERCRED); empty = anyone who can open it.
    pub allow_uids: Vec<u32>,
    /// `--allow-non-loopback`, kept for a systemd socket whose address is known only once it
    /// has been taken (`listen::Listener::check_rules`).
    pub allow_non_loopback: bool,
    /// Upstream `HOST:PORT` as the user wrote it; resolved at every dial.
    pub upstream: Upstream,
    /// SNI and verification name; an IP address sends no SNI and is matched against IP SANs.
    pub server_name: ServerName<'static>,
    /// Client identity, upstream trust and protocol settings: what `tls::identity` builds
    /// the client configuration from.
    pub tls: Settings,
    /// Byte stream or HTTP.
    pub mode: Mode,
    /// HTTP mode's bounds.
    pub http: HttpSettings,
    /// Bound on resolve + TCP connect (+ proxy CONNECT) + TLS handshake.
    pub connect_timeout: Duration,
    /// Straight to the upstream, or through an HTTP CONNECT proxy.
    pub via: Via,
    /// Close a connection silent both ways for this long; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Concurrent plaintext connections; extra ones wait in the kernel backlog.
    pub max_connections: usize,
    /// Outbound (the fields above) or inbound (its target, handshake bound, PROXY header).
    pub direction: Direction,
    /// Access log, reload canary.
    pub ops: Ops,
    /// `--protocol`: an in-band TLS start spoken before the handshake (outbound tcp mode).
    pub protocol: crate::cli::Protocol,
}

/// Build one route from flag-shaped values (the flags themselves, or a config file's route
/// merged with its defaults): inbound with `--inbound`, else outbound, whose code refuses the
/// inbound-only flags first.
pub fn route_from_args(name: String, args: &crate::cli::RunArgs) -> Result<Route, Error> {
    if args.inbound_args.inbound {
        return inbound::route(name, args);
    }
    inbound::refuse_inbound_flags(args)?;
    flags::outbound_route(name, args)
}

impl Route {
    /// The inbound part of an inbound route.
    pub fn inbound(&self) -> Option<&Inbound> {
        match &self.direction {
            Direction::Inbound(i) => Some(i),
            Direction::Outbound => None,
        }
    }
}

/// Bounds of HTTP mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Time an app connection may take to send a request's headers.
    pub header_timeout: Duration,
    /// Pooled upstream connections idle this long are closed.
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept.
    pub pool_max_idle: usize,
    /// Upstream connections open at once (a semaphore in the pool's connector), so one app
    /// opening many streams cannot make as many upstream connections.
    pub pool_max_connections: usize,
    /// Pooled connections older than this take no new requests (`None` = forever), so DNS
    /// changes and new backends are picked up.
    pub pool_max_lifetime: Option<Duration>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 64,
            pool_max_connections: 1024,
            pool_max_lifetime: Some(Duration::from_secs(600)),
        }
    }
}

/// An upstream address kept as a name so DNS changes are followed at every dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {flag} {value:?}: {reason}")]
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "refusing to listen on {addr} (route {route}): it is not a loopback address, and anyone \
         who can reach it borrows this client identity; pass --allow-non-loopback if that is meant"
    )]
    NonLoopback { addr: String, route: String },
    #[error(transparent)]
    Load(#[from] crate::tls::load::Error),
    #[error("{}:{line}: key `{key}`: {message}", path.display())]
    File {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// How a route reaches its upstream.
#[derive(Debug, Clone)]
pub enum Via {
    /// Straight to the upstream: no proxy is configured.
    Direct,
    /// A proxy is configured, but the upstream's host matches `--no-proxy`.
    Bypass {
        /// The proxy not taken, still opened at startup so its settings are checked as for
        /// any other route.
        proxy: ProxySettings,
        /// The `--no-proxy` entry that matched.
        entry: String,
    },
    /// Through the proxy: CONNECT with the upstream's name, which the proxy resolves.
    Proxy(ProxySettings),
}

/// A route's HTTP CONNECT proxy as configured; [`ProxySettings::open`] reads its files and
/// makes the `egress::Proxy` that tunnels.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `--proxy` (or `HTTPS_PROXY`), parsed; credentials in it are kept out of `Display`.
    pub url: ProxyUrl,
    /// `--proxy-ca` of an `https://` proxy; `None` = the system trust store (and always for
    /// a plain `http://` proxy, which has no certificate).
    pub ca: Option<PathBuf>,
    /// `--proxy-auth-file`, read when the proxy is opened.
    pub auth_file: Option<PathBuf>,
    /// Where a config file set the auth file (file, line), so that a problem with it names
    /// them as every other config file error does.
    pub auth_file_set_at: Option<(PathBuf, usize)>,
}

impl ProxySettings {
    /// Read the proxy's CA and credentials and make the proxy that tunnels.
    pub fn open(&self) -> Result<Proxy, Error> {
        let tls = match self.url.scheme {
            Scheme::Https => Some(crate::egress::proxy_tls(self.ca.as_deref())?),
            Scheme::Http => None,
        };
        let auth_shown = self
            .auth_file
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string());
        Proxy::new(self.url.clone(), self.auth_file.clone(), tls).map_err(|reason| {
            match &self.auth_file_set_at {
                Some((path, line)) => Error::File {
                    path: path.clone(),
                    line: *line,
                    key: "proxy_auth_file".into(),
                    message: format!("invalid value {auth_shown:?}: {reason}"),
                },
                None => invalid("--proxy-auth-file", &auth_shown, reason.to_string()),
            }
        })
    }
}

impl Config {
    /// Open every route's proxy, in route order: the live proxy of each route that tunnels
    /// (`None` for the others). A bypassed proxy is opened too and dropped, so its files are
    /// checked as they are for a route that uses it.
    pub fn open_proxies(&self) -> Result<Vec<Option<Arc<Proxy>>>, Error> {
        let mut proxies = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            proxies.push(match &route.via {
                Via::Direct => None,
                Via::Bypass { proxy, .. } => {
                    proxy.open()?;
                    None
                }
                Via::Proxy(settings) => Some(Arc::new(settings.open()?)),
            });
        }
        Ok(proxies)
    }
}
