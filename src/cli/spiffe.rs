//! The flags of a SPIFFE route: the identity and trust bundles come from the Workload API
//! instead of files. Flattened into `RunArgs`; valid on outbound and inbound routes.

use clap::Args;

/// SPIFFE Workload API flags, flattened into `run` (and `check`).
#[derive(Debug, Clone, Default, Args)]
pub struct SpiffeArgs {
    /// This route's identity (X.509-SVID) and trust bundles come from the SPIFFE Workload API;
    /// not with --cert, --key, --pkcs12 or --ca
    #[arg(long, env = "MTLS_SIDECAR_SPIFFE", group = "route_flags")]
    pub spiffe: bool,

    /// The Workload API socket, unix:PATH or a path [default: SPIFFE_ENDPOINT_SOCKET]
    #[arg(
        long,
        env = "MTLS_SIDECAR_SPIFFE_SOCKET",
        group = "route_flags",
        value_name = "PATH"
    )]
    pub spiffe_socket: Option<String>,

    /// Which SVID to use when the workload is issued several (spiffe://trust-domain/path)
    /// [default: the first one the API sends]
    #[arg(
        long,
        env = "MTLS_SIDECAR_SPIFFE_ID",
        group = "route_flags",
        value_name = "ID"
    )]
    pub spiffe_id: Option<String>,
}
