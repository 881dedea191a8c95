//! Flag-shaped values to a [`Route`]: the `run` flags themselves, or a config file's route
//! merged with its `[defaults]` (see `load`), so a key means exactly what its flag means.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::{Error, HttpSettings, ListenAddr, ProxySettings, Route, Upstream, Via, invalid};
use crate::cli::{MAX_CONNECTIONS, Mode, POOL_MAX_CONNECTIONS, POOL_MAX_IDLE, RunArgs};
use crate::egress::{NoProxy, ProxyUrl, Scheme};
use crate::tls::{Checks, IdentitySource, Settings, TlsFiles};

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

/// Split `HOST:PORT` or `[V6]:PORT`.
pub(super) fn split_host_port(flag: &'static str, value: &str) -> Result<(String, u16), Error> {
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
pub(super) fn resolve_host_port(
    flag: &'static str,
    value: &str,
) -> Result<(SocketAddr, bool), Error> {
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

/// Build one outbound route from flag-shaped values (the flags themselves, or a config file's route
/// merged with its defaults). The checks run in a fixed order, so a route with several wrong
/// values always reports the same one.
pub(super) fn outbound_route(name: String, args: &RunArgs) -> Result<Route, Error> {
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
    check_counts(args)?;
    let alpn = parse_alpn(args)?;
    let files = tls_files(args)?;
    let checks = parse_checks(args)?;
    if matches!(files.identity, IdentitySource::Spiffe(_)) && checks.uri_sans.is_empty() {
        return Err(invalid(
            "--verify-uri-san",
            "",
            "missing: a --spiffe outbound route checks the upstream's SPIFFE ID instead of its \
             hostname, so it needs at least one --verify-uri-san (spiffe://domain/path)",
        ));
    }
    check_allow_uid(args, &listen)?;
    let reload = parse_duration("--reload-interval", &args.reload_interval)?;
    let listen_mode = parse_mode(&args.listen_mode)?;
    let tls = Settings {
        files,
        checks,
        tls_min: args.tls_min,
        alpn: match args.mode {
            Mode::Tcp => alpn,
            // The pool speaks whichever the upstream picks.
            Mode::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        },
        reload_interval: (!reload.is_zero()).then_some(reload),
        inbound: None,
    };
    let http = http_settings(args)?;
    Ok(Route {
        name,
        listen,
        listen_mode,
        allow_uids: args.allow_uid.clone(),
        allow_non_loopback: args.allow_non_loopback,
        via: parse_via(args, &upstream)?,
        upstream,
        server_name,
        tls,
        mode: args.mode,
        http,
        connect_timeout,
        idle_timeout: idle_timeout(args.mode, idle),
        max_connections: args.max_connections,
        direction: super::Direction::Outbound,
        ops: super::ops::parse(args)?,
        protocol: super::protocol::parse(args)?,
    })
}

/// HTTP mode's bounds (both directions).
pub(super) fn http_settings(args: &RunArgs) -> Result<HttpSettings, Error> {
    Ok(HttpSettings {
        header_timeout: parse_duration("--header-timeout", &args.header_timeout)?,
        pool_idle_timeout: parse_duration("--pool-idle-timeout", &args.pool_idle_timeout)?,
        pool_max_idle: args.pool_max_idle,
        pool_max_connections: args.pool_max_connections,
        pool_max_lifetime: super::ops::pool_max_lifetime(args)?,
    })
}

/// The numeric flags' ranges, checked again here (clap already did) because routes are also
/// built from code (`demo`), and a value past the semaphore's limit would panic in the accept
/// loop after READY.
pub(super) fn check_counts(args: &RunArgs) -> Result<(), Error> {
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
    Ok(())
}

/// `--alpn`, each protocol as the bytes sent.
pub(super) fn parse_alpn(args: &RunArgs) -> Result<Vec<Vec<u8>>, Error> {
    let mut alpn = Vec::new();
    for p in &args.alpn {
        if p.is_empty() || p.len() > 255 {
            return Err(invalid("--alpn", p, "must be 1 to 255 bytes"));
        }
        alpn.push(p.as_bytes().to_vec());
    }
    Ok(alpn)
}

/// The client identity (`--pkcs12`, or `--cert` and `--key`) and the upstream trust files.
pub(super) fn tls_files(args: &RunArgs) -> Result<TlsFiles, Error> {
    if let Some(source) = super::spiffe::source(args)? {
        return Ok(TlsFiles {
            identity: IdentitySource::Spiffe(source),
            ca: None,
            crls: Vec::new(),
        });
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
    Ok(TlsFiles {
        identity,
        ca: args.ca.clone(),
        crls: args.crl.clone(),
    })
}

/// `--pin-sha256` and `--verify-uri-san`.
fn parse_checks(args: &RunArgs) -> Result<Checks, Error> {
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
    Ok(Checks {
        uri_sans: args.verify_uri_san.clone(),
        pins,
    })
}

/// `--allow-uid` only with a unix listener: SO_PEERCRED exists only on unix sockets, so with
/// TCP the list could never be checked, and ignoring it would let every peer in.
pub(super) fn check_allow_uid(args: &RunArgs, listen: &ListenAddr) -> Result<(), Error> {
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
    Ok(())
}

/// HTTP mode's idle bound when `--idle-timeout` is not given: an app connection with no request
/// open, or a request silent both ways, is closed after this (Envoy's stream idle timeout), so a
/// silent peer cannot hold a `--max-connections` slot forever unless the operator asks for it
/// with an explicit `0`.
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// `--idle-timeout` as given (`0` = never, in either mode), else the mode's default.
pub(super) fn idle_timeout(mode: Mode, idle: Option<Duration>) -> Option<Duration> {
    match (idle, mode) {
        (Some(d), _) if d.is_zero() => None,
        (Some(d), _) => Some(d),
        (None, Mode::Http) => Some(HTTP_IDLE_TIMEOUT),
        (None, Mode::Tcp) => None,
    }
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
    let ca = match url.scheme {
        Scheme::Https => args.proxy_ca.clone(),
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
    let proxy = ProxySettings {
        url,
        ca,
        auth_file: args.proxy_auth_file.clone(),
        auth_file_set_at: None,
    };
    let (list, list_flag) = match (&args.no_proxy, args.proxy_from_env) {
        (Some(l), _) => (l.clone(), "--no-proxy"),
        (None, true) => (env("NO_PROXY").unwrap_or_default(), "NO_PROXY"),
        (None, false) => (String::new(), "--no-proxy"),
    };
    let no_proxy = NoProxy::parse(&list).map_err(|r| invalid(list_flag, &list, r.to_string()))?;
    Ok(match no_proxy.matching(&upstream.host) {
        Some(entry) => Via::Bypass {
            proxy,
            entry: entry.to_string(),
        },
        None => Via::Proxy(proxy),
    })
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
