//! TLS material: loading from disk, building the client configuration, upstream checks and
//! reloading.

use std::time::Duration;

use crate::cli::TlsMin;

pub mod identity;
pub mod load;
pub mod reload;
pub mod verify;

pub use load::{IdentitySource, TlsFiles};
pub use verify::Checks;

/// Everything a route's TLS client configuration is built from. Routes with equal settings
/// share one loaded identity and one reload loop, so every field that changes the built
/// configuration (or how it is reloaded) belongs here and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Client identity and upstream trust, read by `tls::load`.
    pub files: TlsFiles,
    /// Checks on the upstream leaf on top of chain and name verification.
    pub checks: Checks,
    /// Lowest TLS version offered.
    pub tls_min: TlsMin,
    /// ALPN protocols offered upstream, as sent: `--alpn` in tcp mode, h2 and http/1.1 in
    /// http mode (the pool speaks whichever the upstream picks).
    pub alpn: Vec<Vec<u8>>,
    /// How often the files are compared for change; `None` = only on SIGHUP.
    pub reload_interval: Option<Duration>,
}
