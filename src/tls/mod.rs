//! TLS material: loading from disk, building the client configuration, upstream checks,
//! reloading, and the one crypto provider all of them use.

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;

use crate::cli::TlsMin;

pub mod authorize;
pub mod canary;
pub mod cert;
pub mod chain_cache;
pub mod file;
pub mod hkdf;
pub mod identity;
pub mod keys;
pub mod load;
pub mod reload;
pub mod server;
pub mod trust;
pub mod verify;

pub use authorize::Rule;
pub use load::{IdentitySource, SpiffeSource, TlsFiles};
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
    /// An inbound route's client authorization: when set, a server configuration is built
    /// from the same files (the identity is then the server's certificate and key).
    pub inbound: Option<authorize::Rule>,
}

/// The crypto provider every TLS object of the program uses: aws-lc-rs with its default
/// suites and key exchange (X25519MLKEM768 first), but AES-128-GCM offered before AES-256-GCM,
/// as browsers and Go's crypto/tls do. AES-128 is not a weak choice, and it decrypts about 15%
/// faster, which shows directly in CPU per byte of a bulk transfer (see README, "Performance").
/// TLS 1.3 suites derive their keys with [`hkdf`]'s HKDF (same output, less hashing).
pub fn provider() -> Arc<CryptoProvider> {
    static SUITES: std::sync::OnceLock<Vec<rustls::SupportedCipherSuite>> =
        std::sync::OnceLock::new();
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = SUITES
        .get_or_init(|| hkdf::with_fast_hkdf(&ordered(p.cipher_suites.clone())))
        .clone();
    Arc::new(p)
}

/// `suites` with AES-128-GCM before AES-256-GCM before the rest, TLS 1.3 first.
fn ordered(mut suites: Vec<rustls::SupportedCipherSuite>) -> Vec<rustls::SupportedCipherSuite> {
    suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        let aes_rank = if name.contains("AES_128") {
            0
        } else if name.contains("AES_256") {
            1
        } else {
            2
        };
        (s.tls13().is_none(), aes_rank)
    });
    suites
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hybrid post-quantum group stays first (issue 18 changed the suites, not the groups).
    #[test]
    fn the_pq_hybrid_key_share_is_offered_first() {
        let groups: Vec<_> = provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(
            groups.first(),
            Some(&rustls::NamedGroup::X25519MLKEM768),
            "{groups:?}"
        );
        assert!(groups.contains(&rustls::NamedGroup::X25519), "{groups:?}");
    }

    #[test]
    fn aes_128_gcm_is_offered_first_in_each_version() {
        let names: Vec<String> = provider()
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert_eq!(names[0], "TLS13_AES_128_GCM_SHA256", "{names:?}");
        let first12 = names.iter().position(|n| !n.starts_with("TLS13")).unwrap();
        assert!(names[first12].contains("AES_128_GCM"), "{names:?}");
        assert!(
            names[..first12].iter().all(|n| n.starts_with("TLS13")),
            "{names:?}"
        );
        assert_eq!(
            names.len(),
            rustls::crypto::aws_lc_rs::default_provider()
                .cipher_suites
                .len()
        );
    }
}
