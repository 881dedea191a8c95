//! `Config::from_run_args`, and `run --config FILE`: TOML with `[admin]`, `[defaults]` and
//! `[[route]]`. Route keys are the flag names with `_` for `-`; a route inherits every key it
//! does not set from `[defaults]`. Each merged route is turned back into flag-shaped values and
//! built by the same code as the flags (`route_from_args`), so a key means exactly what
//! its flag means. Every error names the file, the line and the key.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;
use toml::Spanned;

use super::{Admin, Config, Error, Route, Via, parse_admin, parse_duration, route_from_args};
use crate::cli::RunArgs;

impl Config {
    /// Build the configuration: one route named `default` from the flags, or every route of
    /// `--config FILE`.
    pub fn from_run_args(args: &RunArgs) -> Result<Self, Error> {
        let (routes, file_admin) = match &args.config {
            Some(path) => {
                let file = load(path, args.proxy_auth_file.as_deref())?;
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

/// What a config file yields.
pub struct FileConfig {
    /// Every `[[route]]`, merged with `[defaults]` and validated, in file order.
    routes: Vec<Route>,
    /// `[admin]`, unless `--admin` overrides it.
    admin: Option<Admin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    admin: Option<AdminToml>,
    defaults: Option<RouteToml>,
    #[serde(default)]
    route: Vec<RouteToml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminToml {
    listen: Spanned<String>,
    #[serde(default)]
    allow_shutdown: bool,
}

/// A key a route may set, with where in the file it was set (for error lines).
type Setting<T> = Option<Spanned<T>>;

/// Every key a route (or `[defaults]`) may set. Numbers are read as any TOML integer (`i64`) so
/// that an out-of-range one reaches the flag's own range check and its message.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteToml {
    name: Setting<String>,
    listen: Setting<String>,
    listen_mode: Setting<String>,
    allow_uid: Setting<Vec<i64>>,
    allow_non_loopback: Setting<bool>,
    upstream: Setting<String>,
    server_name: Setting<String>,
    cert: Setting<String>,
    key: Setting<String>,
    key_password_file: Setting<String>,
    pkcs12: Setting<String>,
    pkcs12_password_file: Setting<String>,
    ca: Setting<String>,
    crl: Setting<Vec<String>>,
    verify_uri_san: Setting<Vec<String>>,
    pin_sha256: Setting<Vec<String>>,
    alpn: Setting<Vec<String>>,
    tls_min: Setting<String>,
    mode: Setting<String>,
    connect_timeout: Setting<String>,
    idle_timeout: Setting<String>,
    max_connections: Setting<i64>,
    reload_interval: Setting<String>,
    header_timeout: Setting<String>,
    pool_idle_timeout: Setting<String>,
    pool_max_idle: Setting<i64>,
    pool_max_connections: Setting<i64>,
    proxy: Setting<String>,
    proxy_ca: Setting<String>,
    proxy_auth_file: Setting<String>,
    no_proxy: Setting<String>,
    proxy_from_env: Setting<bool>,
    inbound: Setting<bool>,
    target: Setting<String>,
    verify_dns_san: Setting<Vec<String>>,
    verify_cn: Setting<Vec<String>>,
    allow_any_client: Setting<bool>,
    handshake_timeout: Setting<String>,
    proxy_protocol: Setting<String>,
    spiffe: Setting<bool>,
    spiffe_socket: Setting<String>,
    spiffe_id: Setting<String>,
    access_log: Setting<String>,
    reload_canary: Setting<bool>,
    pool_max_lifetime: Setting<String>,
    protocol: Setting<String>,
}

/// A value ready to become command-line words.
enum Val {
    One(String),
    Many(Vec<String>),
    Flag(bool),
}

impl RouteToml {
    /// `(key, value, span)` for every key set here.
    fn entries(&self) -> Vec<(&'static str, Val, Range<usize>)> {
        let mut out = Vec::new();
        macro_rules! one {
            ($($k:ident),*) => {$(
                if let Some(v) = &self.$k {
                    out.push((stringify!($k), Val::One(v.get_ref().to_string()), v.span()));
                }
            )*};
        }
        macro_rules! many {
            ($($k:ident),*) => {$(
                if let Some(v) = &self.$k {
                    let items = v.get_ref().iter().map(|x| x.to_string()).collect();
                    out.push((stringify!($k), Val::Many(items), v.span()));
                }
            )*};
        }
        one!(
            listen,
            listen_mode,
            upstream,
            server_name,
            cert,
            key,
            key_password_file,
            pkcs12,
            pkcs12_password_file,
            ca,
            tls_min,
            mode,
            connect_timeout,
            idle_timeout,
            max_connections,
            reload_interval,
            header_timeout,
            pool_idle_timeout,
            pool_max_idle,
            pool_max_connections,
            proxy,
            proxy_ca,
            proxy_auth_file,
            no_proxy,
            target,
            handshake_timeout,
            proxy_protocol,
            spiffe_socket,
            spiffe_id,
            access_log,
            pool_max_lifetime,
            protocol
        );
        many!(
            allow_uid,
            crl,
            verify_uri_san,
            pin_sha256,
            alpn,
            verify_dns_san,
            verify_cn
        );
        for (key, v) in [
            ("inbound", &self.inbound),
            ("allow_any_client", &self.allow_any_client),
            ("spiffe", &self.spiffe),
            ("reload_canary", &self.reload_canary),
        ] {
            if let Some(v) = v {
                out.push((key, Val::Flag(*v.get_ref()), v.span()));
            }
        }
        if let Some(v) = &self.allow_non_loopback {
            out.push(("allow_non_loopback", Val::Flag(*v.get_ref()), v.span()));
        }
        if let Some(v) = &self.proxy_from_env {
            out.push(("proxy_from_env", Val::Flag(*v.get_ref()), v.span()));
        }
        out
    }
}

/// The file being loaded: its path and text, to turn a byte offset into a line and to name
/// both in every error.
struct Source<'a> {
    /// As given to `--config`.
    path: &'a Path,
    /// The whole file, already checked to be UTF-8.
    text: &'a str,
}

impl Source<'_> {
    /// Line (1-based) of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    fn error(&self, line: usize, key: &str, message: impl Into<String>) -> Error {
        Error::File {
            path: self.path.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        }
    }

    /// Line of the `n`-th `[[route]]` header.
    fn route_header_line(&self, n: usize) -> usize {
        self.text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[route]]"))
            .nth(n)
            .map_or(1, |(i, _)| i + 1)
    }
}

/// `run`'s flags without environment fallbacks, to parse one file route's flag-shaped words:
/// the file alone describes the routes.
#[derive(Parser)]
struct RouteCommandLine {
    #[command(flatten)]
    run: RunArgs,
}

/// Load and validate a config file. `proxy_auth_file` (`--proxy-auth-file` or
/// `MTLS_SIDECAR_PROXY_AUTH_FILE`) applies to every route that does not name its own.
pub fn load(path: &Path, proxy_auth_file: Option<&Path>) -> Result<FileConfig, Error> {
    let text = read_text(path)?;
    let src = Source { path, text: &text };
    let file = parse_toml(&src)?;
    let defaults = file.defaults.clone().unwrap_or_default();
    refuse_route_keys_in_defaults(&src, &defaults)?;
    if file.route.is_empty() {
        return Err(src.error(1, "route", "no [[route]] table: nothing to serve"));
    }
    let mut seen = Seen::default();
    let mut routes = Vec::with_capacity(file.route.len());
    for (i, r) in file.route.iter().enumerate() {
        let header = src.route_header_line(i);
        let name = seen.check(&src, header, r)?;
        routes.push(file_route(
            &src,
            header,
            name,
            r,
            &defaults,
            proxy_auth_file,
        )?);
    }
    let admin = match file.admin {
        Some(a) => Some(Admin {
            listen: parse_admin(a.listen.get_ref()).map_err(|e| {
                src.error(src.line_of(a.listen.span().start), "listen", e.to_string())
            })?,
            allow_shutdown: a.allow_shutdown,
        }),
        None => None,
    };
    Ok(FileConfig { routes, admin })
}

/// The file's text, through the shared bounded read: a FIFO, a device or a huge file is
/// refused, not read forever.
fn read_text(path: &Path) -> Result<String, Error> {
    let bytes = crate::tls::load::read_bounded("--config", path).map_err(|e| Error::Invalid {
        flag: "--config",
        value: path.display().to_string(),
        reason: format!("cannot use it: {e}"),
    })?;
    String::from_utf8(bytes.to_vec()).map_err(|_| Error::Invalid {
        flag: "--config",
        value: path.display().to_string(),
        reason: "it is not UTF-8 text".into(),
    })
}

/// The TOML, with a syntax or type error turned into file, line and key.
fn parse_toml(src: &Source<'_>) -> Result<FileToml, Error> {
    toml::from_str(src.text).map_err(|e| {
        let line = e.span().map_or(1, |s| src.line_of(s.start));
        // The key is what stands before `=` on the error's line (the span may cover only the
        // value, or the whole table).
        let key = src
            .text
            .lines()
            .nth(line.saturating_sub(1))
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim().to_string())
            .or_else(|| {
                // An unknown table or key names itself in the message.
                let m = e.message();
                let rest = m.split_once("unknown field `")?.1;
                Some(rest.split('`').next()?.to_string())
            })
            .unwrap_or_default();
        src.error(line, &key, e.message().trim().to_string())
    })
}

/// `name`, `listen` and `upstream` say which route a table is: a default would make every
/// route the same one.
fn refuse_route_keys_in_defaults(src: &Source<'_>, defaults: &RouteToml) -> Result<(), Error> {
    for (key, span) in [
        ("name", defaults.name.as_ref().map(|s| s.span())),
        ("listen", defaults.listen.as_ref().map(|s| s.span())),
        ("upstream", defaults.upstream.as_ref().map(|s| s.span())),
        ("target", defaults.target.as_ref().map(|s| s.span())),
    ] {
        if let Some(span) = span {
            return Err(src.error(
                src.line_of(span.start),
                key,
                "belongs in each [[route]], not in [defaults]",
            ));
        }
    }
    Ok(())
}

/// Route names and listen addresses seen so far, with their lines, so a duplicate names the
/// first one.
#[derive(Default)]
struct Seen {
    /// Route name -> line of its `name` key.
    names: HashMap<String, usize>,
    /// Listen address -> line of its `listen` key.
    listens: HashMap<String, usize>,
}

impl Seen {
    /// Check a route's required keys and that its name and listen address are new; returns
    /// its name.
    fn check(&mut self, src: &Source<'_>, header: usize, r: &RouteToml) -> Result<String, Error> {
        let required = |v: &Setting<String>, key: &str| -> Result<(String, usize), Error> {
            match v {
                Some(s) => Ok((s.get_ref().clone(), src.line_of(s.span().start))),
                None => Err(src.error(header, key, "missing: every [[route]] needs it")),
            }
        };
        let (name, name_line) = required(&r.name, "name")?;
        let (listen, listen_line) = required(&r.listen, "listen")?;
        if r.inbound.as_ref().is_some_and(|i| *i.get_ref()) {
            required(&r.target, "target")?;
        } else {
            required(&r.upstream, "upstream")?;
        }
        if let Some(first) = self.names.insert(name.clone(), name_line) {
            return Err(src.error(
                name_line,
                "name",
                format!("duplicate route name {name:?} (first on line {first})"),
            ));
        }
        // Port 0 asks for any free port: many routes may.
        let ephemeral = listen.ends_with(":0") && !listen.starts_with("unix:");
        if let Some(first) = (!ephemeral)
            .then(|| self.listens.insert(listen.clone(), listen_line))
            .flatten()
        {
            return Err(src.error(
                listen_line,
                "listen",
                format!("duplicate listen address {listen:?} (first on line {first})"),
            ));
        }
        Ok(name)
    }
}

/// A key as set for one route: its name, value and where in the file it was set.
type Entry = (&'static str, Val, Range<usize>);

/// One `[[route]]` merged with `[defaults]`, parsed as the flags would be, and built by the
/// flags' code; every error points at the key (or the route's header) it comes from.
fn file_route(
    src: &Source<'_>,
    header: usize,
    name: String,
    r: &RouteToml,
    defaults: &RouteToml,
    proxy_auth_file: Option<&Path>,
) -> Result<Route, Error> {
    // The route's own keys win over [defaults]; remember where each came from.
    let mut merged: Vec<Entry> = r.entries();
    for (k, v, span) in defaults.entries() {
        if !merged.iter().any(|(mk, _, _)| *mk == k) {
            merged.push((k, v, span));
        }
    }
    let has = |k: &str| merged.iter().any(|(mk, _, _)| *mk == k);
    if !(has("pkcs12") || (has("cert") && has("key")) || has("spiffe")) {
        return Err(src.error(
            header,
            if has("cert") { "key" } else { "cert" },
            format!(
                "route {name:?} has no client identity: set cert and key (or pkcs12, or spiffe) in it or in [defaults]"
            ),
        ));
    }
    let key_line: HashMap<&'static str, usize> = merged
        .iter()
        .map(|(k, _, span)| (*k, src.line_of(span.start)))
        .collect();
    let line_for_flag = |flag: &str| -> (usize, String) {
        let key = flag.trim_start_matches("--").replace('-', "_");
        (key_line.get(key.as_str()).copied().unwrap_or(header), key)
    };
    let mut args = parse_words(&words(&merged)).map_err(|e| {
        let flag = match e.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(s)) => {
                s.split_whitespace().next().unwrap_or("").to_string()
            }
            _ => String::new(),
        };
        let (line, key) = line_for_flag(&flag);
        let detail = e.render().to_string();
        let first = detail
            .lines()
            .next()
            .unwrap_or("invalid value")
            .trim_start_matches("error: ")
            .to_string();
        src.error(line, &key, first)
    })?;
    // The global credentials file is for the routes that may tunnel: outbound ones.
    if args.proxy_auth_file.is_none() && !args.inbound_args.inbound {
        args.proxy_auth_file = proxy_auth_file.map(Path::to_path_buf);
    }
    let mut route = route_from_args(name, &args).map_err(|e| match &e {
        Error::Invalid {
            flag,
            value,
            reason,
        } => {
            let (line, key) = line_for_flag(flag);
            src.error(line, &key, format!("invalid value {value:?}: {reason}"))
        }
        Error::NonLoopback { .. } => {
            let (line, key) = line_for_flag("--listen");
            src.error(line, &key, e.to_string())
        }
        _ => e,
    })?;
    if let Via::Proxy(proxy) | Via::Bypass { proxy, .. } = &mut route.via {
        let (line, _) = line_for_flag("--proxy-auth-file");
        proxy.auth_file_set_at = Some((src.path.to_path_buf(), line));
    }
    Ok(route)
}

/// The command line a route's merged keys stand for (after a dummy program name).
fn words(merged: &[Entry]) -> Vec<String> {
    let mut words = vec!["route".to_string()];
    for (k, v, _) in merged {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            // `--flag=value`, so a value that starts with `-` (a negative number) is read
            // as the flag's value and meets its range check, not taken for another flag.
            Val::One(s) => words.push(format!("{flag}={s}")),
            Val::Many(items) => {
                for item in items {
                    words.push(format!("{flag}={item}"));
                }
            }
            Val::Flag(true) => words.push(flag),
            Val::Flag(false) => {}
        }
    }
    words
}

/// `words` parsed by clap as `run`'s flags, without environment fallbacks.
fn parse_words(words: &[String]) -> Result<RunArgs, clap::Error> {
    let cmd = RouteCommandLine::command().mut_args(|a| a.env(None::<&str>));
    let matches = cmd.try_get_matches_from(words)?;
    Ok(RouteCommandLine::from_arg_matches(&matches)?.run)
}
