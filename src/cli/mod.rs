//! Command-line surface: clap derive structs, env fallbacks and help text. The only logic here is
//! the range-checked value parsers clap calls;
//! `config` turns these raw values into a validated `config::Config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
mod inbound;
mod ops;
mod protocol;
mod ranges;
mod spiffe;
pub use inbound::{InboundArgs, ProxyProtocol};
pub use ops::{AccessLog, OpsArgs};
pub use protocol::Protocol;
pub use ranges::*;
pub use spiffe::SpiffeArgs;

/// Plaintext-to-mTLS sidecar: apps speak plain TCP on localhost, mtls-sidecar presents their
/// client certificate to the upstream and verifies it.
#[derive(Debug, Parser)]
#[command(name = "mtls-sidecar", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parse the process's arguments. Environment values are hidden in every `--help`: an
    /// `MTLS_SIDECAR_PROXY=http://user:password@host` must not be printed back.
    pub fn parse_hiding_env() -> Self {
        use clap::FromArgMatches;
        let matches = Self::command_hiding_env().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// The clap command with `hide_env_values` set on every argument of every subcommand.
    pub fn command_hiding_env() -> clap::Command {
        fn hide(cmd: clap::Command) -> clap::Command {
            cmd.mut_args(|a| a.hide_env_values(true))
                .mut_subcommands(hide)
        }
        hide(<Self as clap::CommandFactory>::command())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Proxy traffic: each plaintext connection is forwarded over mutual TLS
    Run(Box<RunArgs>),
    /// Write a throwaway CA, an upstream server certificate and a client certificate
    DevPki(DevPkiArgs),
    /// Run a built-in mTLS upstream and the proxy in front of it, so curl works at once
    Demo(DemoArgs),
    /// Block until an admin listener's /readyz answers 200 (exit 0), or the timeout passes (exit 1)
    Wait(WaitArgs),
    /// Load and validate everything, handshake once with each upstream, and explain in plain
    /// words anything that fails; exit 0 only if every route passes
    Check(Box<CheckArgs>),
}

/// Options of `run`. Every option can also be set by `MTLS_SIDECAR_<FLAG>`; the flag wins.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("route_flags").multiple(true)))]
pub struct RunArgs {
    /// TOML file with many routes ([admin], [defaults], [[route]]); route flags cannot be mixed
    /// with it
    #[arg(
        long,
        env = "MTLS_SIDECAR_CONFIG",
        value_name = "FILE",
        conflicts_with = "route_flags"
    )]
    pub config: Option<PathBuf>,

    /// Plaintext listener: HOST:PORT (loopback unless --allow-non-loopback), unix:PATH or
    /// systemd:NAME (socket activation)
    #[arg(
        long,
        env = "MTLS_SIDECAR_LISTEN",
        group = "route_flags",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: String,

    /// Permissions of a unix: listener's socket file, octal
    #[arg(
        long,
        env = "MTLS_SIDECAR_LISTEN_MODE",
        group = "route_flags",
        default_value = "0600",
        value_name = "OCTAL"
    )]
    pub listen_mode: String,

    /// Accept unix: connections only from these local users (SO_PEERCRED); repeatable
    #[arg(
        long = "allow-uid",
        env = "MTLS_SIDECAR_ALLOW_UID",
        group = "route_flags",
        value_name = "UID",
        value_delimiter = ',',
        allow_negative_numbers = true,
        value_parser = parse_uid
    )]
    pub allow_uid: Vec<u32>,

    /// Allow a listen address other than loopback: anyone who can reach it borrows this identity
    #[arg(long, env = "MTLS_SIDECAR_ALLOW_NON_LOOPBACK", group = "route_flags")]
    pub allow_non_loopback: bool,

    /// Where traffic goes over mTLS, HOST:PORT; resolved at every dial
    #[arg(
        long,
        env = "MTLS_SIDECAR_UPSTREAM",
        group = "route_flags",
        value_name = "HOST:PORT",
        required_unless_present_any = ["config", "inbound"]
    )]
    pub upstream: Option<String>,

    /// SNI and the name the upstream certificate must match [default: the host of --upstream]
    #[arg(
        long,
        env = "MTLS_SIDECAR_SERVER_NAME",
        group = "route_flags",
        value_name = "NAME"
    )]
    pub server_name: Option<String>,

    /// Client certificate chain, PEM, leaf first
    #[arg(
        long,
        env = "MTLS_SIDECAR_CERT", group = "route_flags",
        value_name = "FILE",
        required_unless_present_any = ["pkcs12", "config", "spiffe"],
        conflicts_with = "pkcs12"
    )]
    pub cert: Option<PathBuf>,

    /// Private key, PEM: PKCS#8, PKCS#1 or SEC1; encrypted PKCS#8 with --key-password-file
    #[arg(
        long,
        env = "MTLS_SIDECAR_KEY", group = "route_flags",
        value_name = "FILE",
        required_unless_present_any = ["pkcs12", "config", "spiffe"],
        conflicts_with = "pkcs12"
    )]
    pub key: Option<PathBuf>,

    /// File holding the password of an encrypted PKCS#8 --key (one trailing newline ignored)
    #[arg(
        long,
        env = "MTLS_SIDECAR_KEY_PASSWORD_FILE",
        group = "route_flags",
        value_name = "FILE"
    )]
    pub key_password_file: Option<PathBuf>,

    /// Client identity as PKCS#12 (key and chain), instead of --cert/--key
    #[arg(
        long,
        env = "MTLS_SIDECAR_PKCS12",
        group = "route_flags",
        value_name = "FILE"
    )]
    pub pkcs12: Option<PathBuf>,

    /// File holding the password of --pkcs12 (one trailing newline ignored)
    #[arg(
        long,
        env = "MTLS_SIDECAR_PKCS12_PASSWORD_FILE",
        group = "route_flags",
        value_name = "FILE",
        requires = "pkcs12"
    )]
    pub pkcs12_password_file: Option<PathBuf>,

    /// PEM bundle the upstream's chain must lead to [default: system trust store, honours
    /// SSL_CERT_FILE]
    #[arg(
        long,
        env = "MTLS_SIDECAR_CA",
        group = "route_flags",
        value_name = "FILE"
    )]
    pub ca: Option<PathBuf>,

    /// Certificate revocation list(s), PEM, applied to the upstream chain; repeatable
    #[arg(
        long = "crl",
        env = "MTLS_SIDECAR_CRL",
        group = "route_flags",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub crl: Vec<PathBuf>,

    /// Also require one of these URI SANs (e.g. a SPIFFE ID) on the upstream leaf; repeatable
    #[arg(
        long = "verify-uri-san",
        env = "MTLS_SIDECAR_VERIFY_URI_SAN",
        group = "route_flags",
        value_name = "URI",
        value_delimiter = ','
    )]
    pub verify_uri_san: Vec<String>,

    /// Also require the upstream leaf's SubjectPublicKeyInfo SHA-256 (base64) to be one of
    /// these; repeatable
    #[arg(
        long = "pin-sha256",
        env = "MTLS_SIDECAR_PIN_SHA256",
        group = "route_flags",
        value_name = "BASE64",
        value_delimiter = ','
    )]
    pub pin_sha256: Vec<String>,

    /// How often certificate, key, CA and CRL files are checked for change; 0 = only on SIGHUP
    #[arg(
        long,
        env = "MTLS_SIDECAR_RELOAD_INTERVAL",
        group = "route_flags",
        default_value = "5s",
        value_name = "DUR"
    )]
    pub reload_interval: String,

    /// ALPN protocol offered upstream; repeatable (env: comma-separated)
    #[arg(
        long = "alpn",
        env = "MTLS_SIDECAR_ALPN",
        group = "route_flags",
        value_name = "PROTO",
        value_delimiter = ','
    )]
    pub alpn: Vec<String>,

    /// In-band TLS start spoken for the app (outbound tcp mode): `postgres` answers the app's
    /// SSLRequest with N, sends SSLRequest upstream and requires S before the handshake
    #[arg(
        long,
        env = "MTLS_SIDECAR_PROTOCOL",
        group = "route_flags",
        value_enum,
        default_value = "none"
    )]
    pub protocol: Protocol,

    /// Lowest TLS version offered
    #[arg(
        long,
        env = "MTLS_SIDECAR_TLS_MIN",
        group = "route_flags",
        value_enum,
        default_value = "1.2"
    )]
    pub tls_min: TlsMin,

    /// tcp: each connection is relayed byte for byte. http: requests go over pooled
    /// connections (outbound: HTTP/1.1 and h2c in, mTLS h2 or http/1.1 out by ALPN; inbound:
    /// HTTP/1.1 and h2 by ALPN in, plaintext HTTP/1.1 to --target)
    #[arg(
        long,
        env = "MTLS_SIDECAR_MODE",
        group = "route_flags",
        value_enum,
        default_value = "tcp"
    )]
    pub mode: Mode,

    /// HTTP mode: how long an app connection may take to send a request's headers; with
    /// --protocol postgres: to send its startup message
    #[arg(
        long,
        env = "MTLS_SIDECAR_HEADER_TIMEOUT",
        group = "route_flags",
        default_value = "10s",
        value_name = "DUR"
    )]
    pub header_timeout: String,

    /// HTTP mode: close pooled upstream (inbound: target) connections idle for this long
    #[arg(
        long,
        env = "MTLS_SIDECAR_POOL_IDLE_TIMEOUT",
        group = "route_flags",
        default_value = "90s",
        value_name = "DUR"
    )]
    pub pool_idle_timeout: String,

    /// HTTP mode: idle upstream (inbound: target) connections kept per route, 0 to 10000
    #[arg(
        long,
        env = "MTLS_SIDECAR_POOL_MAX_IDLE",
        group = "route_flags",
        default_value_t = 64,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = parse_pool_max_idle
    )]
    pub pool_max_idle: usize,

    /// HTTP mode: upstream (inbound: target) connections open at once per route (1..=100000); a request beyond
    /// it waits up to --connect-timeout for a free one, then gets 503
    #[arg(
        long,
        env = "MTLS_SIDECAR_POOL_MAX_CONNECTIONS",
        group = "route_flags",
        default_value_t = 1024,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = parse_pool_max_connections
    )]
    pub pool_max_connections: usize,

    /// TCP connect plus TLS handshake to the upstream
    #[arg(
        long,
        env = "MTLS_SIDECAR_CONNECT_TIMEOUT",
        group = "route_flags",
        default_value = "10s",
        value_name = "DUR"
    )]
    pub connect_timeout: String,

    /// Close a connection with no traffic either way for this long; 0 = never [default: 0, in
    /// http mode 300s]
    #[arg(
        long,
        env = "MTLS_SIDECAR_IDLE_TIMEOUT",
        group = "route_flags",
        value_name = "DUR"
    )]
    pub idle_timeout: Option<String>,

    /// Concurrent plaintext connections, 1 to 1000000; beyond it new ones wait in the backlog
    #[arg(
        long,
        env = "MTLS_SIDECAR_MAX_CONNECTIONS",
        group = "route_flags",
        default_value_t = 10_000,
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = parse_max_connections
    )]
    pub max_connections: usize,

    /// Reach the upstream through an HTTP CONNECT proxy: http://[user:pass@]HOST[:PORT] or
    /// https://... (TLS to the proxy itself)
    #[arg(
        long,
        env = "MTLS_SIDECAR_PROXY",
        group = "route_flags",
        value_name = "URL"
    )]
    pub proxy: Option<String>,

    /// CA bundle (PEM) that an https:// proxy's certificate must lead to [default: the system
    /// trust store]
    #[arg(
        long,
        env = "MTLS_SIDECAR_PROXY_CA",
        group = "route_flags",
        value_name = "FILE"
    )]
    pub proxy_ca: Option<PathBuf>,

    /// Comma-separated hosts, .domains and CIDRs that bypass the proxy (curl's no_proxy rules)
    #[arg(
        long,
        env = "MTLS_SIDECAR_NO_PROXY",
        group = "route_flags",
        value_name = "LIST"
    )]
    pub no_proxy: Option<String>,

    /// Take the proxy from HTTPS_PROXY and the bypass list from NO_PROXY (explicit --proxy and
    /// --no-proxy win)
    #[arg(long, env = "MTLS_SIDECAR_PROXY_FROM_ENV", group = "route_flags")]
    pub proxy_from_env: bool,

    /// File holding the proxy's user:password (one trailing newline ignored); read again when
    /// the proxy answers 407. Applies to every route without its own proxy_auth_file
    #[arg(long, env = "MTLS_SIDECAR_PROXY_AUTH_FILE", value_name = "FILE")]
    pub proxy_auth_file: Option<PathBuf>,

    /// On SIGTERM, keep accepting this long before draining
    #[arg(
        long,
        env = "MTLS_SIDECAR_SHUTDOWN_DELAY",
        default_value = "0s",
        value_name = "DUR"
    )]
    pub shutdown_delay: String,

    /// After the delay, how long in-flight connections may finish before they are cut
    #[arg(
        long,
        env = "MTLS_SIDECAR_DRAIN_TIMEOUT",
        default_value = "25s",
        value_name = "DUR"
    )]
    pub drain_timeout: String,

    /// Admin listener for /healthz, /readyz, /metrics, /status: HOST:PORT or systemd:NAME
    #[arg(long, env = "MTLS_SIDECAR_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,

    #[command(flatten)]
    pub inbound_args: InboundArgs,
    #[command(flatten)]
    pub spiffe_args: SpiffeArgs,
    #[command(flatten)]
    pub ops_args: OpsArgs,

    /// Enable POST /shutdown on the admin listener (lets a Job's main container stop the sidecar)
    #[arg(long, env = "MTLS_SIDECAR_ADMIN_ALLOW_SHUTDOWN")]
    pub admin_allow_shutdown: bool,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Options of `check`: the same as `run`, plus the report format.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub run: RunArgs,

    /// Report format
    #[arg(long, value_enum, default_value = "text")]
    pub format: CheckFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
}

/// Options of `wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The admin listener to poll, HOST:PORT
    #[arg(long, env = "MTLS_SIDECAR_ADMIN", value_name = "ADDR")]
    pub admin: String,

    /// Give up after this long (exit 1)
    #[arg(long, default_value = "30s", value_name = "DUR")]
    pub timeout: String,
}

/// Logging options shared by every long-running command.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format, to stderr
    #[arg(
        long,
        env = "MTLS_SIDECAR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// error, warn, info, debug, trace; RUST_LOG directives also work
    #[arg(
        long,
        env = "MTLS_SIDECAR_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMin {
    #[value(name = "1.2")]
    V12,
    #[value(name = "1.3")]
    V13,
}

#[derive(Debug, Args)]
pub struct DevPkiArgs {
    /// Folder to write ca.pem, server.pem, server-key.pem, client.pem, client-key.pem into
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Replace ca.pem, server.pem, ... if they already exist in --out (refused without it)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Plaintext listener of the demo proxy
    #[arg(
        long,
        env = "MTLS_SIDECAR_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: String,

    /// Allow a non-loopback --listen (in a container, to publish the demo with -p)
    #[arg(long)]
    pub allow_non_loopback: bool,

    #[command(flatten)]
    pub log: LogArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        Cli::command_hiding_env().debug_assert();
    }
}
