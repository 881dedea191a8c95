//! `run --config FILE`: TOML with `[admin]`, `[defaults]` and `[[route]]`. Route keys are the
//! flag names with `_` for `-`; a route inherits every key it does not set from `[defaults]`.
//! Each merged route is turned back into flag-shaped values and built by the same code as the
//! flags (`config::route_from_args`), so a key means exactly what its flag means. Every error
//! names the file, the line and the key.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::RunArgs;
use crate::config::{self, Admin, Error, Route};

/// What a config file yields.
pub struct FileConfig {
    pub routes: Vec<Route>,
    pub admin: Option<Admin>,
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

type S<T> = Option<Spanned<T>>;

/// Every key a route (or `[defaults]`) may set. Numbers are read as any TOML integer (`i64`) so
/// that an out-of-range one reaches the flag's own range check and its message.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteToml {
    name: S<String>,
    listen: S<String>,
    listen_mode: S<String>,
    allow_uid: S<Vec<i64>>,
    allow_non_loopback: S<bool>,
    upstream: S<String>,
    server_name: S<String>,
    cert: S<String>,
    key: S<String>,
    key_password_file: S<String>,
    pkcs12: S<String>,
    pkcs12_password_file: S<String>,
    ca: S<String>,
    crl: S<Vec<String>>,
    verify_uri_san: S<Vec<String>>,
    pin_sha256: S<Vec<String>>,
    alpn: S<Vec<String>>,
    tls_min: S<String>,
    mode: S<String>,
    connect_timeout: S<String>,
    idle_timeout: S<String>,
    max_connections: S<i64>,
    reload_interval: S<String>,
    header_timeout: S<String>,
    pool_idle_timeout: S<String>,
    pool_max_idle: S<i64>,
    proxy: S<String>,
    proxy_ca: S<String>,
    proxy_auth_file: S<String>,
    no_proxy: S<String>,
    proxy_from_env: S<bool>,
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
            proxy,
            proxy_ca,
            proxy_auth_file,
            no_proxy
        );
        many!(allow_uid, crl, verify_uri_san, pin_sha256, alpn);
        if let Some(v) = &self.allow_non_loopback {
            out.push(("allow_non_loopback", Val::Flag(*v.get_ref()), v.span()));
        }
        if let Some(v) = &self.proxy_from_env {
            out.push(("proxy_from_env", Val::Flag(*v.get_ref()), v.span()));
        }
        out
    }
}

/// Line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn file_error(path: &Path, line: usize, key: &str, message: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        line,
        key: key.to_string(),
        message: message.into(),
    }
}

/// Line of the `n`-th `[[route]]` header.
fn route_header_line(text: &str, n: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("[[route]]"))
        .nth(n)
        .map_or(1, |(i, _)| i + 1)
}

/// `run`'s flags without environment fallbacks: the file alone describes the routes.
#[derive(Parser)]
struct Words {
    #[command(flatten)]
    run: RunArgs,
}

/// Load and validate a config file. `proxy_auth_file` (`--proxy-auth-file` or
/// `MTLS_SIDECAR_PROXY_AUTH_FILE`) applies to every route that does not name its own.
pub fn load(path: &Path, proxy_auth_file: Option<&Path>) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Invalid {
        flag: "--config",
        value: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })?;
    let file: FileToml = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(&text, s.start));
        // The key is what stands before `=` on the error's line (the span may cover only the
        // value, or the whole table).
        let key = text
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
        file_error(path, line, &key, e.message().trim().to_string())
    })?;

    let defaults = file.defaults.clone().unwrap_or_default();
    for (key, span) in [
        ("name", defaults.name.as_ref().map(|s| s.span())),
        ("listen", defaults.listen.as_ref().map(|s| s.span())),
        ("upstream", defaults.upstream.as_ref().map(|s| s.span())),
    ] {
        if let Some(span) = span {
            return Err(file_error(
                path,
                line_of(&text, span.start),
                key,
                "belongs in each [[route]], not in [defaults]",
            ));
        }
    }
    if file.route.is_empty() {
        return Err(file_error(
            path,
            1,
            "route",
            "no [[route]] table: nothing to serve",
        ));
    }

    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listens: HashMap<String, usize> = HashMap::new();
    let mut routes = Vec::with_capacity(file.route.len());
    for (i, r) in file.route.iter().enumerate() {
        let header = route_header_line(&text, i);
        let required = |v: &S<String>, key: &str| -> Result<(String, usize), Error> {
            match v {
                Some(s) => Ok((s.get_ref().clone(), line_of(&text, s.span().start))),
                None => Err(file_error(
                    path,
                    header,
                    key,
                    "missing: every [[route]] needs it",
                )),
            }
        };
        let (name, name_line) = required(&r.name, "name")?;
        let (listen, listen_line) = required(&r.listen, "listen")?;
        required(&r.upstream, "upstream")?;
        if let Some(first) = names.insert(name.clone(), name_line) {
            return Err(file_error(
                path,
                name_line,
                "name",
                format!("duplicate route name {name:?} (first on line {first})"),
            ));
        }
        // Port 0 asks for any free port: many routes may.
        let ephemeral = listen.ends_with(":0") && !listen.starts_with("unix:");
        if let Some(first) = (!ephemeral)
            .then(|| listens.insert(listen.clone(), listen_line))
            .flatten()
        {
            return Err(file_error(
                path,
                listen_line,
                "listen",
                format!("duplicate listen address {listen:?} (first on line {first})"),
            ));
        }

        // The route's own keys win over [defaults]; remember where each came from.
        let mut merged: Vec<(&'static str, Val, Range<usize>)> = r.entries();
        for (k, v, span) in defaults.entries() {
            if !merged.iter().any(|(mk, _, _)| *mk == k) {
                merged.push((k, v, span));
            }
        }
        let has = |k: &str| merged.iter().any(|(mk, _, _)| *mk == k);
        if !(has("pkcs12") || (has("cert") && has("key"))) {
            return Err(file_error(
                path,
                header,
                if has("cert") { "key" } else { "cert" },
                format!(
                    "route {name:?} has no client identity: set cert and key (or pkcs12) in it or in [defaults]"
                ),
            ));
        }
        let key_line: HashMap<&'static str, usize> = merged
            .iter()
            .map(|(k, _, span)| (*k, line_of(&text, span.start)))
            .collect();
        let line_for_flag = |flag: &str| -> (usize, String) {
            let key = flag.trim_start_matches("--").replace('-', "_");
            (key_line.get(key.as_str()).copied().unwrap_or(header), key)
        };

        let mut words = vec!["route".to_string()];
        for (k, v, _) in &merged {
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
        let cmd = Words::command().mut_args(|a| a.env(None::<&str>));
        let mut args = cmd
            .try_get_matches_from(&words)
            .and_then(|m| Words::from_arg_matches(&m))
            .map_err(|e| {
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
                file_error(path, line, &key, first)
            })?
            .run;
        if args.proxy_auth_file.is_none() {
            args.proxy_auth_file = proxy_auth_file.map(Path::to_path_buf);
        }
        let route = config::route_from_args(name.clone(), &args).map_err(|e| match &e {
            Error::Invalid {
                flag,
                value,
                reason,
            } => {
                let (line, key) = line_for_flag(flag);
                file_error(
                    path,
                    line,
                    &key,
                    format!("invalid value {value:?}: {reason}"),
                )
            }
            Error::NonLoopback { .. } => {
                let (line, key) = line_for_flag("--listen");
                file_error(path, line, &key, e.to_string())
            }
            _ => e,
        })?;
        routes.push(route);
    }

    let admin = match file.admin {
        Some(a) => Some(Admin {
            listen: config::parse_admin(a.listen.get_ref()).map_err(|e| {
                file_error(
                    path,
                    line_of(&text, a.listen.span().start),
                    "listen",
                    e.to_string(),
                )
            })?,
            allow_shutdown: a.allow_shutdown,
        }),
        None => None,
    };
    Ok(FileConfig { routes, admin })
}
