//! TLS material: loading from disk, building the client configuration, upstream checks,
//! reloading, and the one crypto provider all of them use.

pub mod cert;
pub mod file;
pub mod identity;
pub mod keys;
pub mod load;
pub mod reload;
pub mod verify;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The crypto provider every TLS object of the program uses: aws-lc-rs with its default
/// suites and key exchange (X25519MLKEM768 first), but AES-128-GCM offered before AES-256-GCM,
/// as browsers and Go's crypto/tls do. AES-128 is not a weak choice, and it decrypts about 15%
/// faster, which shows directly in CPU per byte of a bulk transfer (see README, "Performance").
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
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
    Arc::new(p)
}

#[cfg(test)]
mod tests {
    use super::*;

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
