//! An inbound route from flag-shaped values: accept mTLS on `--listen` (any address), authorize
//! the client, forward plaintext to `--target`. The outbound-only flags are refused here, and
//! the inbound-only ones on an outbound route (`refuse_inbound_flags`), so no flag is ever
//! silently ignored.

use std::path::PathBuf;
use std::time::Duration;

use super::flags::{
    check_allow_uid, check_counts, idle_timeout, parse_alpn, parse_duration, parse_listen,
    parse_mode, parse_pin, resolve_host_port, split_host_port, tls_files,
};
use super::{Error, Route, Upstream, Via, invalid};
use crate::cli::{Mode, ProxyProtocol, RunArgs};
use crate::tls::{Checks, Rule, Settings};

/// Which way a route carries traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Plaintext from the app, mTLS to `upstream` (every field of [`Route`] applies).
    Outbound,
    /// mTLS from clients, plaintext to the target; `upstream`, `server_name` and `via` are
    /// unused (placeholders).
    Inbound(Box<Inbound>),
}

/// What an inbound route adds to a [`Route`] (its authorization rule is in `tls.inbound`,
/// because the server configuration is built from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Where verified plaintext goes; resolved at every dial.
    pub target: Target,
    /// Bound on a client's TLS handshake, from accept.
    pub handshake_timeout: Duration,
    /// `--proxy-protocol`: the header to send the target first, if any. Parsed and kept; the
    /// header itself is written by the PROXY protocol module.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// The host of a `HOST:PORT` `--listen` as written (a name or an IP literal), before it
    /// was resolved: `check` tests the server certificate's names against it.
    pub listen_host: Option<String>,
}

/// An inbound route's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `HOST:PORT`, kept as a name so DNS changes are followed at every dial.
    Tcp(Upstream),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(u) => write!(f, "{u}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `--target`: `unix:PATH`, or `HOST:PORT` whose every address is loopback unless
/// `--allow-non-loopback` (plaintext would leave the machine).
pub fn parse_target(value: &str, allow_non_loopback: bool) -> Result<Target, Error> {
    if let Some(path) = value.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid("--target", value, "unix: needs a path"));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let (host, port) = split_host_port("--target", value)?;
    if port == 0 {
        return Err(invalid("--target", value, "port 0 cannot be dialled"));
    }
    if !allow_non_loopback && !resolve_host_port("--target", value)?.1 {
        return Err(invalid(
            "--target",
            value,
            "not a loopback address: verified plaintext would leave the machine; pass \
             --allow-non-loopback if that is meant",
        ));
    }
    Ok(Target::Tcp(Upstream { host, port }))
}

/// The inbound-only flags, refused on an outbound route (they would be ignored there).
pub(super) fn refuse_inbound_flags(args: &RunArgs) -> Result<(), Error> {
    let a = &args.inbound_args;
    let set: [(&'static str, Option<String>); 5] = [
        ("--target", a.target.clone()),
        (
            "--verify-dns-san",
            (!a.verify_dns_san.is_empty()).then(|| a.verify_dns_san.join(",")),
        ),
        (
            "--verify-cn",
            (!a.verify_cn.is_empty()).then(|| a.verify_cn.join(",")),
        ),
        (
            "--allow-any-client",
            a.allow_any_client.then(|| "true".into()),
        ),
        (
            "--proxy-protocol",
            a.proxy_protocol.map(|p| format!("{p:?}").to_lowercase()),
        ),
    ];
    for (flag, value) in set {
        if let Some(v) = value {
            return Err(invalid(
                flag,
                &v,
                "applies only to an inbound route (--inbound)",
            ));
        }
    }
    Ok(())
}

/// The outbound-only flags, refused on an inbound route.
fn refuse_outbound_flags(args: &RunArgs) -> Result<(), Error> {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let set: [(&'static str, Option<String>); 7] = [
        ("--upstream", args.upstream.clone()),
        ("--server-name", args.server_name.clone()),
        ("--proxy", args.proxy.as_ref().map(|_| "***".to_string())),
        ("--proxy-ca", path(&args.proxy_ca)),
        ("--no-proxy", args.no_proxy.clone()),
        (
            "--proxy-from-env",
            args.proxy_from_env.then(|| "true".into()),
        ),
        (
            "--protocol",
            (args.protocol != crate::cli::Protocol::None).then(|| args.protocol.as_str().into()),
        ),
    ];
    for (flag, value) in set {
        if let Some(v) = value {
            return Err(invalid(
                flag,
                &v,
                "applies only to outbound routes; an inbound route forwards to --target",
            ));
        }
    }
    if let Some(p) = &args.proxy_auth_file {
        return Err(invalid(
            "--proxy-auth-file",
            &p.display().to_string(),
            "applies only to outbound routes",
        ));
    }
    Ok(())
}

/// What only tcp mode does, refused on an http-mode inbound route (it would be ignored there):
/// a PROXY header (the target is told the client in headers instead) and a user `--alpn` (the
/// listener offers exactly `h2` and `http/1.1`).
fn refuse_tcp_only_flags(args: &RunArgs) -> Result<(), Error> {
    if args.mode != Mode::Http {
        return Ok(());
    }
    if let Some(p) = args.inbound_args.proxy_protocol {
        return Err(invalid(
            "--proxy-protocol",
            &format!("{p:?}").to_lowercase(),
            "applies only to tcp mode; in http mode the target gets the client's identity in \
             X-Forwarded-Client-Cert and its address in X-Forwarded-For",
        ));
    }
    if !args.alpn.is_empty() {
        return Err(invalid(
            "--alpn",
            &args.alpn.join(","),
            "applies only to tcp mode; an http-mode inbound route offers exactly h2 and http/1.1",
        ));
    }
    Ok(())
}

/// The authorization rule; an open door (no name, no pin, no `--allow-any-client`) is refused.
fn parse_rule(args: &RunArgs) -> Result<Rule, Error> {
    let a = &args.inbound_args;
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
    let rule = Rule {
        uri_sans: args.verify_uri_san.clone(),
        dns_sans: a.verify_dns_san.clone(),
        cns: a.verify_cn.clone(),
        pins,
        allow_any: a.allow_any_client,
    };
    if rule.is_open() {
        return Err(invalid(
            "--allow-any-client",
            "",
            "an inbound route needs an authorization rule (--verify-uri-san, --verify-dns-san, \
             --verify-cn, --pin-sha256), or --allow-any-client to accept every client whose \
             chain leads to --ca",
        ));
    }
    Ok(rule)
}

/// `--handshake-timeout` and `--connect-timeout` (both above 0) and `--idle-timeout`.
fn timeouts(args: &RunArgs) -> Result<(Duration, Duration, Option<Duration>), Error> {
    let handshake = parse_duration("--handshake-timeout", &args.inbound_args.handshake_timeout)?;
    if handshake.is_zero() {
        let v = &args.inbound_args.handshake_timeout;
        return Err(invalid("--handshake-timeout", v, "must be above 0"));
    }
    let connect = parse_duration("--connect-timeout", &args.connect_timeout)?;
    if connect.is_zero() {
        let v = &args.connect_timeout;
        return Err(invalid("--connect-timeout", v, "must be above 0"));
    }
    let idle = match &args.idle_timeout {
        Some(v) => Some(parse_duration("--idle-timeout", v)?),
        None => None,
    };
    Ok((handshake, connect, idle))
}

/// Build an inbound route. Checks run in a fixed order, as for outbound routes.
pub(super) fn route(name: String, args: &RunArgs) -> Result<Route, Error> {
    refuse_outbound_flags(args)?;
    refuse_tcp_only_flags(args)?;
    // Every client must present a certificate: any listen address is fine.
    let listen = parse_listen(&args.listen, true, &name)?;
    let target = match &args.inbound_args.target {
        Some(t) => parse_target(t, args.allow_non_loopback)?,
        None => {
            return Err(invalid(
                "--target",
                "",
                "missing: where should verified traffic go?",
            ));
        }
    };
    if args.ca.is_none() && !args.spiffe_args.spiffe {
        return Err(invalid(
            "--ca",
            "",
            "missing: an inbound route needs the CAs client certificates must lead to (there is \
             no system-trust default on inbound)",
        ));
    }
    let (handshake_timeout, connect_timeout, idle) = timeouts(args)?;
    check_counts(args)?;
    let rule = parse_rule(args)?;
    check_allow_uid(args, &listen)?;
    let reload = parse_duration("--reload-interval", &args.reload_interval)?;
    let tls = Settings {
        files: tls_files(args)?,
        checks: Checks::default(),
        tls_min: args.tls_min,
        alpn: match args.mode {
            Mode::Tcp => parse_alpn(args)?,
            // What the server side of HTTP mode speaks, nothing else.
            Mode::Http => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        },
        reload_interval: (!reload.is_zero()).then_some(reload),
        inbound: Some(rule),
    };
    Ok(Route {
        listen_mode: parse_mode(&args.listen_mode)?,
        name,
        listen,
        allow_uids: args.allow_uid.clone(),
        allow_non_loopback: args.allow_non_loopback,
        upstream: Upstream {
            host: "-".into(),
            port: 0,
        },
        server_name: rustls::pki_types::ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        ),
        tls,
        mode: args.mode,
        http: super::flags::http_settings(args)?,
        connect_timeout,
        via: Via::Direct,
        idle_timeout: idle_timeout(args.mode, idle),
        max_connections: args.max_connections,
        direction: Direction::Inbound(Box::new(Inbound {
            target,
            handshake_timeout,
            proxy_protocol: args.inbound_args.proxy_protocol,
            listen_host: listen_host(&args.listen),
        })),
        ops: super::ops::parse(args)?,
        protocol: crate::cli::Protocol::None,
    })
}

/// The host part of a `HOST:PORT` listen address as written; `None` for `unix:`/`systemd:`.
fn listen_host(value: &str) -> Option<String> {
    if value.starts_with("unix:") || value.starts_with("systemd:") {
        return None;
    }
    split_host_port("--listen", value).ok().map(|(h, _)| h)
}
