//! The typed, validated configuration. Raw CLI values (and, later, the TOML file) are turned
//! into [`Config`] here and nowhere else, so the rest of the program never sees an unchecked
//! string. The program is modelled as a list of routes from the start: flags make one route
//! named `default`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use crate::cli::{Mode, RunArgs, TlsMin};
use crate::egress::{NoProxy, Proxy, ProxyUrl, Scheme};

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
    /// Client identity and upstream trust, loaded by `tls::load`.
    pub tls: TlsFiles,
    /// Checks on the upstream leaf on top of chain and name verification.
    pub checks: Checks,
    /// How often the TLS files are compared for change; `None` = only on SIGHUP.
    pub reload_interval: Option<Duration>,
    /// ALPN protocols offered upstream (tcp mode; http mode offers h2 and http/1.1).
    pub alpn: Vec<Vec<u8>>,
    /// Byte stream or HTTP.
    pub mode: Mode,
    /// HTTP mode's bounds.
    pub http: HttpSettings,
    /// Lowest TLS version offered.
    pub tls_min: TlsMin,
    /// Bound on resolve + TCP connect (+ proxy CONNECT) + TLS handshake.
    pub connect_timeout: Duration,
    /// Straight to the upstream, or through an HTTP CONNECT proxy.
    pub via: Via,
    /// Close a connection silent both ways for this long; `None` = never.
    pub idle_timeout: Option<Duration>,
    /// Concurrent plaintext connections; extra ones wait in the kernel backlog.
    pub max_connections: usize,
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
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            header_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 64,
            pool_max_connections: 1024,
        }
    }
}

/// Files that make a route's TLS client configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsFiles {
    pub identity: IdentitySource,
    /// `None` = the system trust store (honours `SSL_CERT_FILE`).
    pub ca: Option<PathBuf>,
    /// CRLs applied to the upstream chain.
    pub crls: Vec<PathBuf>,
}

/// Where the client certificate and key come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    Pem {
        cert: PathBuf,
        key: PathBuf,
        key_password: Option<PathBuf>,
    },
    Pkcs12 {
        file: PathBuf,
        password: Option<PathBuf>,
    },
}

impl IdentitySource {
    /// The file an operator knows the identity by (for logs).
    pub fn main_file(&self) -> &std::path::Path {
        match self {
            IdentitySource::Pem { cert, .. } => cert,
            IdentitySource::Pkcs12 { file, .. } => file,
        }
    }
}

/// Extra requirements on the upstream leaf, never instead of chain and name verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    /// The leaf must carry one of these URI SANs (when not empty).
    pub uri_sans: Vec<String>,
    /// SHA-256 of the leaf's SubjectPublicKeyInfo must be one of these (when not empty).
    pub pins: Vec<[u8; 32]>,
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

/// The longest duration any flag takes. A year is beyond every sensible timeout, and it keeps
/// `Instant + duration` (and tokio's timer wheel) far from overflow, so no deadline computed
/// from a flag can panic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How a duration's range reads in messages and the README.
const DURATION_RANGE: &str = "durations range from 0 to 365d; write e.g. 500ms, 10s, 5m";

/// Parse a duration written like `500ms`, `10s`, `5m`; a bare `0` means zero. Anything above
/// [`MAX_DURATION`] is refused, so every flag, variable and config key gets the same range.
pub fn parse_duration(flag: &'static str, value: &str) -> Result<Duration, Error> {
    let v = value.trim();
    if v == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(v)
        .map_err(|e| invalid(flag, value, format!("{e} ({DURATION_RANGE})")))?;
    if d > MAX_DURATION {
        return Err(invalid(flag, value, format!("too long ({DURATION_RANGE})")));
    }
    Ok(d)
}

/// The range of `--max-connections`: each connection costs a task and two sockets, so a
/// million is already past what one process serves; the upper bound also keeps the value far
/// below what tokio's semaphore accepts (it panics above `usize::MAX >> 3`).
pub const MAX_CONNECTIONS: std::ops::RangeInclusive<u64> = 1..=1_000_000;

/// The range of `--pool-max-idle` (idle upstream connections kept per route; 0 keeps none).
pub const POOL_MAX_IDLE: std::ops::RangeInclusive<u64> = 0..=10_000;

/// The range of `--pool-max-connections` (upstream connections per route): beyond it the cap
/// would bound nothing.
pub const POOL_MAX_CONNECTIONS: std::ops::RangeInclusive<u64> = 1..=100_000;

/// The range of `--allow-uid`: `u32::MAX` is `(uid_t)-1`, which names no user.
pub const ALLOW_UID: std::ops::RangeInclusive<u64> = 0..=(u32::MAX as u64 - 1);

/// A whole number inside `range`; the message (clap puts the flag before it) says the range.
fn ranged(value: &str, range: &std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let out_of_range = || {
        format!(
            "must be a whole number from {} to {}",
            range.start(),
            range.end()
        )
    };
    // Digits only: a sign or a huge number is out of range, not a different error.
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    v.parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(out_of_range)
}

/// clap value parser of `--max-connections`.
pub fn parse_max_connections(value: &str) -> Result<usize, String> {
    ranged(value, &MAX_CONNECTIONS).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--pool-max-idle`.
pub fn parse_pool_max_idle(value: &str) -> Result<usize, String> {
    ranged(value, &POOL_MAX_IDLE).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--pool-max-connections`.
pub fn parse_pool_max_connections(value: &str) -> Result<usize, String> {
    ranged(value, &POOL_MAX_CONNECTIONS).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--allow-uid`.
pub fn parse_uid(value: &str) -> Result<u32, String> {
    ranged(value, &ALLOW_UID).and_then(|n| u32::try_from(n).map_err(|e| e.to_string()))
}

/// Split `HOST:PORT` or `[V6]:PORT`.
fn split_host_port(flag: &'static str, value: &str) -> Result<(String, u16), Error> {
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| invalid(flag, value, "expected HOST:PORT"))?;
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let host = bracketed.unwrap_or(host);
    if host.is_empty() {
        return Err(invalid(flag, value, "the host is empty"));
    }
    // Brackets surround an IPv6 address and nothing else: `[[[[]]:5` is not the host `[[[]`.
    if host.contains(['[', ']']) || bracketed.is_some_and(|h| h.parse::<Ipv6Addr>().is_err()) {
        return Err(invalid(
            flag,
            value,
            "brackets are only for an IPv6 address, [::1]:PORT",
        ));
    }
    if host.contains(':') && (bracketed.is_none() || host.parse::<IpAddr>().is_err()) {
        return Err(invalid(
            flag,
            value,
            "an IPv6 address must be written in brackets, [::1]:PORT",
        ));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid(flag, value, "the port must be a number from 0 to 65535"))?;
    Ok((host.to_string(), port))
}

/// Parse a listen address and apply the loopback rule (`localhost` counts as loopback;
/// `unix:` and `systemd:` are local by nature).
pub fn parse_listen(
    value: &str,
    allow_non_loopback: bool,
    route: &str,
) -> Result<ListenAddr, Error> {
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid("--listen", value, "unix: needs a path"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Some(name) = value.strip_prefix("systemd:") {
        if name.is_empty() {
            return Err(invalid(
                "--listen",
                value,
                "systemd: needs the socket's FileDescriptorName",
            ));
        }
        return Ok(ListenAddr::Systemd(name.to_string()));
    }
    let addr = resolve_host_port("--listen", value)?;
    if !allow_non_loopback && !addr.1 {
        return Err(Error::NonLoopback {
            addr: value.to_string(),
            route: route.to_string(),
        });
    }
    Ok(ListenAddr::Tcp(addr.0))
}

/// The admin listener: any address, or `systemd:NAME`.
pub fn parse_admin(value: &str) -> Result<ListenAddr, Error> {
    if let Some(name) = value.strip_prefix("systemd:") {
        return Ok(ListenAddr::Systemd(name.to_string()));
    }
    if value.starts_with("unix:") {
        return Err(invalid(
            "--admin",
            value,
            "the admin listener takes HOST:PORT or systemd:NAME",
        ));
    }
    Ok(ListenAddr::Tcp(resolve_host_port("--admin", value)?.0))
}

/// Resolve `HOST:PORT` (IPv4 preferred) and say whether every address is loopback.
fn resolve_host_port(flag: &'static str, value: &str) -> Result<(SocketAddr, bool), Error> {
    let (host, port) = split_host_port(flag, value)?;
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| invalid(flag, value, format!("cannot resolve {host}: {e}")))?
            .collect(),
    };
    // Prefer IPv4 so `localhost:PORT` binds where most clients dial first.
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| invalid(flag, value, format!("{host} resolved to no address")))?;
    Ok((addr, addrs.iter().all(|a| a.ip().is_loopback())))
}

/// An octal file mode such as `0600` or `660`.
pub fn parse_mode(value: &str) -> Result<u32, Error> {
    u32::from_str_radix(value.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            invalid(
                "--listen-mode",
                value,
                "expected octal permissions from 0000 to 0777, such as 0600",
            )
        })
}

pub fn parse_upstream(value: &str) -> Result<Upstream, Error> {
    let (host, port) = split_host_port("--upstream", value)?;
    if port == 0 {
        return Err(invalid("--upstream", value, "port 0 cannot be dialled"));
    }
    Ok(Upstream { host, port })
}

pub fn parse_server_name(flag: &'static str, value: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(value.to_string())
        .map_err(|_| invalid(flag, value, "not a valid DNS name or IP address"))
}

/// A `--pin-sha256` value: standard base64 of 32 bytes.
pub fn parse_pin(value: &str) -> Result<[u8; 32], Error> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| invalid("--pin-sha256", value, format!("not base64: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        invalid(
            "--pin-sha256",
            value,
            format!("a SHA-256 is 32 bytes, this is {}", b.len()),
        )
    })
}

/// Build one route from flag-shaped values (the flags themselves, or a config file's route
/// merged with its defaults).
pub fn route_from_args(name: String, args: &RunArgs) -> Result<Route, Error> {
    let listen = parse_listen(&args.listen, args.allow_non_loopback, &name)?;
    let upstream = match &args.upstream {
        Some(u) => parse_upstream(u)?,
        None => {
            return Err(invalid(
                "--upstream",
                "",
                "missing: where should traffic go?",
            ));
        }
    };
    let server_name = match &args.server_name {
        Some(n) => parse_server_name("--server-name", n)?,
        None => parse_server_name("--upstream", &upstream.host)?,
    };
    let idle = match &args.idle_timeout {
        Some(v) => Some(parse_duration("--idle-timeout", v)?),
        None => None,
    };
    let connect_timeout = parse_duration("--connect-timeout", &args.connect_timeout)?;
    if connect_timeout.is_zero() {
        return Err(invalid(
            "--connect-timeout",
            &args.connect_timeout,
            "must be above 0",
        ));
    }
    // Checked again here (clap already did) because routes are also built from code (`demo`),
    // and a value past the semaphore's limit would panic in the accept loop after READY.
    if !MAX_CONNECTIONS.contains(&(args.max_connections as u64)) {
        return Err(invalid(
            "--max-connections",
            &args.max_connections.to_string(),
            "must be a whole number from 1 to 1000000",
        ));
    }
    if !POOL_MAX_IDLE.contains(&(args.pool_max_idle as u64)) {
        return Err(invalid(
            "--pool-max-idle",
            &args.pool_max_idle.to_string(),
            "must be a whole number from 0 to 10000",
        ));
    }
    if !POOL_MAX_CONNECTIONS.contains(&(args.pool_max_connections as u64)) {
        return Err(invalid(
            "--pool-max-connections",
            &args.pool_max_connections.to_string(),
            "must be a whole number from 1 to 100000",
        ));
    }
    let mut alpn = Vec::new();
    for p in &args.alpn {
        if p.is_empty() || p.len() > 255 {
            return Err(invalid("--alpn", p, "must be 1 to 255 bytes"));
        }
        alpn.push(p.as_bytes().to_vec());
    }
    let identity = match (&args.pkcs12, &args.cert, &args.key) {
        (Some(file), _, _) => IdentitySource::Pkcs12 {
            file: file.clone(),
            password: args.pkcs12_password_file.clone(),
        },
        (None, Some(cert), Some(key)) => IdentitySource::Pem {
            cert: cert.clone(),
            key: key.clone(),
            key_password: args.key_password_file.clone(),
        },
        _ => {
            return Err(invalid(
                "--cert",
                "",
                "--cert and --key (or --pkcs12) are required",
            ));
        }
    };
    let mut pins = Vec::new();
    for p in &args.pin_sha256 {
        pins.push(parse_pin(p)?);
    }
    for u in &args.verify_uri_san {
        if !u.contains(':') {
            return Err(invalid(
                "--verify-uri-san",
                u,
                "expected a URI such as spiffe://domain/path",
            ));
        }
    }
    // SO_PEERCRED exists only on unix sockets: with TCP the list could never be checked, and
    // ignoring it would let every peer in.
    if !args.allow_uid.is_empty() && matches!(listen, ListenAddr::Tcp(_)) {
        return Err(invalid(
            "--allow-uid",
            &args
                .allow_uid
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            format!(
                "applies only to unix: listeners, and --listen {} is TCP, whose peers have no \
                 local uid to check",
                args.listen
            ),
        ));
    }
    let reload = parse_duration("--reload-interval", &args.reload_interval)?;
    let listen_mode = parse_mode(&args.listen_mode)?;
    let route = Route {
        name,
        listen,
        listen_mode,
        allow_uids: args.allow_uid.clone(),
        allow_non_loopback: args.allow_non_loopback,
        upstream: upstream.clone(),
        server_name,
        tls: TlsFiles {
            identity,
            ca: args.ca.clone(),
            crls: args.crl.clone(),
        },
        checks: Checks {
            uri_sans: args.verify_uri_san.clone(),
            pins,
        },
        reload_interval: (!reload.is_zero()).then_some(reload),
        alpn,
        mode: args.mode,
        http: HttpSettings {
            header_timeout: parse_duration("--header-timeout", &args.header_timeout)?,
            pool_idle_timeout: parse_duration("--pool-idle-timeout", &args.pool_idle_timeout)?,
            pool_max_idle: args.pool_max_idle,
            pool_max_connections: args.pool_max_connections,
        },
        tls_min: args.tls_min,
        connect_timeout,
        via: parse_via(args, &upstream)?,
        idle_timeout: idle_timeout(args.mode, idle),
        max_connections: args.max_connections,
    };
    Ok(route)
}

/// HTTP mode's idle bound when `--idle-timeout` is not given: an app connection with no request
/// open, or a request silent both ways, is closed after this (Envoy's stream idle timeout), so a
/// silent peer cannot hold a `--max-connections` slot forever unless the operator asks for it
/// with an explicit `0`.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// `--idle-timeout` as given (`0` = never, in either mode), else the mode's default.
fn idle_timeout(mode: Mode, idle: Option<Duration>) -> Option<Duration> {
    match (idle, mode) {
        (Some(d), _) if d.is_zero() => None,
        (Some(d), _) => Some(d),
        (None, Mode::Http) => Some(HTTP_IDLE_TIMEOUT),
        (None, Mode::Tcp) => None,
    }
}

/// How a route reaches its upstream.
#[derive(Debug, Clone)]
pub enum Via {
    Direct,
    /// A proxy is configured, but the upstream's host matches `--no-proxy`.
    Bypass {
        proxy: String,
        entry: String,
    },
    Proxy(Arc<Proxy>),
}

/// A proxy URL for messages: credentials replaced by `***`.
fn redact_url(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, after)) => {
            let scheme = before.split_once("://").map_or("", |(s, _)| s);
            if scheme.is_empty() {
                format!("***@{after}")
            } else {
                format!("{scheme}://***@{after}")
            }
        }
        // No `@`: in `http://user:password` (the `@HOST` forgotten) the part after the last
        // `:` is the password, unless it is a port number.
        None => match url.rsplit_once(':') {
            Some((before, tail))
                if !tail.is_empty()
                    && !tail.starts_with("//")
                    && !tail.contains(']')
                    && !tail
                        .trim_end_matches('/')
                        .bytes()
                        .all(|b| b.is_ascii_digit()) =>
            {
                format!("{before}:***")
            }
            _ => url.to_string(),
        },
    }
}

/// `--proxy` (or `HTTPS_PROXY` with `--proxy-from-env`), its credentials and trust, and the
/// `--no-proxy` decision for this route's upstream, made once: the upstream host is fixed.
fn parse_via(args: &RunArgs, upstream: &Upstream) -> Result<Via, Error> {
    let env = |name: &str| {
        [name.to_string(), name.to_ascii_lowercase()]
            .iter()
            .find_map(|k| std::env::var(k).ok())
            .filter(|v| !v.trim().is_empty())
    };
    let (raw, flag) = match (&args.proxy, args.proxy_from_env) {
        (Some(p), _) => (Some(p.clone()), "--proxy"),
        (None, true) => (env("HTTPS_PROXY"), "HTTPS_PROXY"),
        (None, false) => (None, "--proxy"),
    };
    let Some(raw) = raw.filter(|p| !p.trim().is_empty()) else {
        return Ok(Via::Direct);
    };
    let url = ProxyUrl::parse(&raw).map_err(|r| invalid(flag, &redact_url(&raw), r.to_string()))?;
    let tls = match url.scheme {
        Scheme::Https => Some(crate::egress::proxy_tls(args.proxy_ca.as_deref())?),
        Scheme::Http => {
            if let Some(ca) = &args.proxy_ca {
                tracing::warn!(
                    proxy = %url,
                    proxy_ca = %ca.display(),
                    "--proxy-ca is ignored: the proxy is plain http://"
                );
            }
            None
        }
    };
    let display = url.to_string();
    let auth_file = args.proxy_auth_file.clone();
    let auth_shown = auth_file
        .as_ref()
        .map_or(String::new(), |p| p.display().to_string());
    let proxy = Proxy::new(url, auth_file, tls)
        .map_err(|r| invalid("--proxy-auth-file", &auth_shown, r.to_string()))?;
    let (list, list_flag) = match (&args.no_proxy, args.proxy_from_env) {
        (Some(l), _) => (l.clone(), "--no-proxy"),
        (None, true) => (env("NO_PROXY").unwrap_or_default(), "NO_PROXY"),
        (None, false) => (String::new(), "--no-proxy"),
    };
    let no_proxy = NoProxy::parse(&list).map_err(|r| invalid(list_flag, &list, r.to_string()))?;
    Ok(match no_proxy.matching(&upstream.host) {
        Some(entry) => Via::Bypass {
            proxy: display,
            entry: entry.to_string(),
        },
        None => Via::Proxy(Arc::new(proxy)),
    })
}

impl Config {
    /// Build the configuration: one route named `default` from the flags, or every route of
    /// `--config FILE`.
    pub fn from_run_args(args: &RunArgs) -> Result<Self, Error> {
        let (routes, file_admin) = match &args.config {
            Some(path) => {
                let file = crate::config_file::load(path, args.proxy_auth_file.as_deref())?;
                (file.routes, file.admin)
            }
            None => (vec![route_from_args("default".into(), args)?], None),
        };
        let admin = match &args.admin {
            Some(a) => Some(Admin {
                listen: parse_admin(a)?,
                allow_shutdown: args.admin_allow_shutdown,
            }),
            None => file_admin,
        };
        Ok(Config {
            routes,
            shutdown_delay: parse_duration("--shutdown-delay", &args.shutdown_delay)?,
            drain_timeout: parse_duration("--drain-timeout", &args.drain_timeout)?,
            admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("x", "0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_duration("x", "500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("x", "5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("x", "ten").is_err());
        assert_eq!(parse_duration("x", "365d").unwrap(), MAX_DURATION);
        for huge in [
            "366d",
            "300000000000y",
            "18446744073709551615s",
            "9999999999999999999999h",
        ] {
            let err = parse_duration("--x", huge).unwrap_err().to_string();
            assert!(err.contains("--x") && err.contains("365d"), "{err}");
        }
    }

    #[test]
    fn numbers_have_ranges() {
        assert_eq!(parse_max_connections("1"), Ok(1));
        assert_eq!(parse_max_connections("1000000"), Ok(1_000_000));
        for bad in [
            "0",
            "1000001",
            "-1",
            "+5",
            "",
            "2305843009213693952",
            "1e3",
            "99999999999999999999999",
        ] {
            let err = parse_max_connections(bad).unwrap_err();
            assert!(err.contains("from 1 to 1000000"), "{bad}: {err}");
        }
        assert_eq!(parse_pool_max_idle("0"), Ok(0));
        assert!(parse_pool_max_idle("10001").is_err());
        assert_eq!(parse_uid("4294967294"), Ok(u32::MAX - 1));
        assert!(parse_uid("4294967295").is_err());
    }

    #[test]
    fn idle_timeout_defaults_to_300s_in_http_mode_only() {
        let five = Duration::from_secs(5);
        assert_eq!(idle_timeout(Mode::Tcp, None), None);
        assert_eq!(idle_timeout(Mode::Http, None), Some(HTTP_IDLE_TIMEOUT));
        assert_eq!(idle_timeout(Mode::Tcp, Some(Duration::ZERO)), None);
        assert_eq!(idle_timeout(Mode::Http, Some(Duration::ZERO)), None);
        assert_eq!(idle_timeout(Mode::Tcp, Some(five)), Some(five));
        assert_eq!(idle_timeout(Mode::Http, Some(five)), Some(five));
    }

    #[test]
    fn listen_loopback_rule() {
        assert!(parse_listen("127.0.0.1:0", false, "r").is_ok());
        assert!(parse_listen("[::1]:0", false, "r").is_ok());
        assert!(matches!(
            parse_listen("localhost:0", false, "r").unwrap(),
            ListenAddr::Tcp(a) if a.ip().is_loopback()
        ));
        let err = parse_listen("0.0.0.0:80", false, "r")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--allow-non-loopback"), "{err}");
        assert!(parse_listen("0.0.0.0:80", true, "r").is_ok());
        assert!(parse_listen("127.0.0.1", false, "r").is_err());
        assert_eq!(
            parse_listen("unix:/tmp/x", false, "r").unwrap(),
            ListenAddr::Unix("/tmp/x".into())
        );
        assert_eq!(
            parse_listen("systemd:proxy", false, "r").unwrap(),
            ListenAddr::Systemd("proxy".into())
        );
        assert!(parse_admin("0.0.0.0:9901").is_ok());
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("660").unwrap(), 0o660);
        assert!(parse_mode("0900").is_err());
    }

    #[test]
    fn pins() {
        assert_eq!(
            parse_pin("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap(),
            [0u8; 32]
        );
        assert!(
            parse_pin("AAAA")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        assert!(parse_pin("!!").is_err());
    }

    #[test]
    fn upstream_forms() {
        let u = parse_upstream("api.example.com:443").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("api.example.com", 443));
        let u = parse_upstream("[::1]:8443").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.to_string(), "[::1]:8443");
        assert!(parse_upstream("::1:8443").is_err());
        assert!(parse_upstream("host").is_err());
        assert!(parse_upstream("host:0").is_err());
        assert!(matches!(
            parse_server_name("--upstream", "10.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
    }
}
