//! The operations flags (issue 16): the per-request access log, the reload canary and the
//! pooled connections' lifetime. Flattened into `RunArgs`; each is also a config-file key.

use clap::{Args, ValueEnum};

/// Operations flags, flattened into `run` (and `check`).
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// Access log: `connection` (one line per app connection), `request` (http mode: also one
    /// line per finished request) or `off`
    #[arg(
        long,
        env = "MTLS_SIDECAR_ACCESS_LOG",
        group = "route_flags",
        value_enum,
        default_value = "connection"
    )]
    pub access_log: AccessLog,

    /// Before publishing a reloaded identity whose certificate or key changed, dial the
    /// upstream once with it; keep the old one (while valid) if the upstream refuses the new one
    #[arg(long, env = "MTLS_SIDECAR_RELOAD_CANARY", group = "route_flags")]
    pub reload_canary: bool,

    /// HTTP mode: pooled upstream (inbound: target) connections older than this take no new
    /// requests and close when idle, so DNS changes are followed; 0 = forever
    #[arg(
        long,
        env = "MTLS_SIDECAR_POOL_MAX_LIFETIME",
        group = "route_flags",
        default_value = "10m",
        value_name = "DUR"
    )]
    pub pool_max_lifetime: String,
}

impl Default for OpsArgs {
    fn default() -> Self {
        OpsArgs {
            access_log: AccessLog::Connection,
            reload_canary: false,
            pool_max_lifetime: "10m".into(),
        }
    }
}

/// `--access-log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AccessLog {
    /// One line per app connection (the only kind in tcp mode).
    #[default]
    Connection,
    /// http mode: one line per finished request, plus the connection lines.
    Request,
    /// No access lines at all.
    Off,
}
