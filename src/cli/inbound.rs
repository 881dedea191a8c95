//! The flags of an inbound route (`run --inbound`): accept mTLS from other services, authorize
//! the client, forward plaintext to `--target`. Kept apart from the outbound flags so that each
//! list stays readable; flattened into `RunArgs`.

use clap::{Args, ValueEnum};

/// Inbound-route flags, flattened into `run` (and `check`).
#[derive(Debug, Clone, Args)]
pub struct InboundArgs {
    /// This route accepts mTLS on --listen (any address) and forwards verified plaintext to
    /// --target
    #[arg(long, env = "MTLS_SIDECAR_INBOUND", group = "route_flags")]
    pub inbound: bool,

    /// Inbound: where verified plaintext goes, HOST:PORT or unix:PATH; resolved at every dial
    #[arg(
        long,
        env = "MTLS_SIDECAR_TARGET",
        group = "route_flags",
        value_name = "ADDR"
    )]
    pub target: Option<String>,

    /// Inbound: allow a client whose leaf carries this DNS SAN; repeatable
    #[arg(
        long = "verify-dns-san",
        env = "MTLS_SIDECAR_VERIFY_DNS_SAN",
        group = "route_flags",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub verify_dns_san: Vec<String>,

    /// Inbound: allow a client whose leaf's subject common name is this; repeatable
    #[arg(
        long = "verify-cn",
        env = "MTLS_SIDECAR_VERIFY_CN",
        group = "route_flags",
        value_name = "NAME",
        value_delimiter = ','
    )]
    pub verify_cn: Vec<String>,

    /// Inbound: accept every client whose chain leads to --ca (no name or pin rule)
    #[arg(long, env = "MTLS_SIDECAR_ALLOW_ANY_CLIENT", group = "route_flags")]
    pub allow_any_client: bool,

    /// Inbound: a client must complete its TLS handshake within this
    #[arg(
        long,
        env = "MTLS_SIDECAR_HANDSHAKE_TIMEOUT",
        group = "route_flags",
        default_value = "10s",
        value_name = "DUR"
    )]
    pub handshake_timeout: String,

    /// Inbound, tcp mode: first send a PROXY protocol header with the client's address
    #[arg(
        long,
        env = "MTLS_SIDECAR_PROXY_PROTOCOL",
        group = "route_flags",
        value_enum,
        value_name = "VERSION"
    )]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// The PROXY protocol version sent to an inbound route's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProxyProtocol {
    V1,
    V2,
}
