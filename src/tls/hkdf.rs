//! TLS 1.3's HKDF built from HMAC keys set up once per secret, for the cipher suites of
//! [`super::provider`]: the same aws-lc HMAC-SHA-256/384 and rustls' own HKDF
//! (`HkdfUsingHmac`, RFC 5869), only cheaper.
//!
//! rustls' aws-lc-rs provider derives every TLS 1.3 secret with aws-lc-rs' `hkdf`, whose PRK
//! keeps the raw secret: each HKDF-Expand sets the HMAC key up again (two SHA-256 blocks for the
//! pads), and one from an extract (`Salt::extract`) runs the whole extract again first. A TLS 1.3
//! handshake expands some twenty times, and under callgrind a quarter of an inbound resumed
//! handshake was in that (`aws_lc_rs::hkdf::Okm::fill`). Here the HMAC key of each secret is
//! made once (its pads hashed once) and every expand clones it: the output is identical (a unit
//! test compares it with aws-lc-rs' HKDF), the work is a fraction.

use aws_lc_rs::hmac as aws;
use rustls::crypto::hmac::{Hmac, Key, Tag};
use rustls::crypto::tls13::HkdfUsingHmac;

/// HMAC of one hash, keyed per secret.
struct AwsHmac(aws::Algorithm);

/// One HMAC key, its pads hashed once; each signature starts from a copy.
struct AwsKey(aws::Key);

impl Hmac for AwsHmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn Key> {
        Box::new(AwsKey(aws::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len
    }
}

impl Key for AwsKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> Tag {
        let mut ctx = aws::Context::with_key(&self.0);
        ctx.update(first);
        for m in middle {
            ctx.update(m);
        }
        ctx.update(last);
        Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len
    }
}

static HMAC_SHA256: AwsHmac = AwsHmac(aws::HMAC_SHA256);
static HMAC_SHA384: AwsHmac = AwsHmac(aws::HMAC_SHA384);
static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA256);
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&HMAC_SHA384);

/// The TLS 1.3 suites of aws-lc-rs with this HKDF (same order, AEAD and everything else);
/// TLS 1.2 suites as they are. Made once: the suites are `'static`.
pub fn with_fast_hkdf(
    suites: &[rustls::SupportedCipherSuite],
) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::hash::HashAlgorithm;
    suites
        .iter()
        .map(|s| match s {
            rustls::SupportedCipherSuite::Tls13(t) => {
                let hkdf: &'static dyn rustls::crypto::tls13::Hkdf =
                    match t.common.hash_provider.algorithm() {
                        HashAlgorithm::SHA256 => &HKDF_SHA256,
                        HashAlgorithm::SHA384 => &HKDF_SHA384,
                        // Any other hash: the provider's own HKDF.
                        _ => return *s,
                    };
                let suite = rustls::Tls13CipherSuite {
                    common: rustls::crypto::CipherSuiteCommon {
                        suite: t.common.suite,
                        hash_provider: t.common.hash_provider,
                        confidentiality_limit: t.common.confidentiality_limit,
                    },
                    hkdf_provider: hkdf,
                    aead_alg: t.aead_alg,
                    quic: t.quic,
                };
                rustls::SupportedCipherSuite::Tls13(Box::leak(Box::new(suite)))
            }
            other => *other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rustls::crypto::tls13::Hkdf;

    use super::*;

    /// aws-lc-rs' HKDF as rustls' provider uses it, for comparison.
    fn reference(sha384: bool) -> &'static dyn Hkdf {
        let p = rustls::crypto::aws_lc_rs::default_provider();
        let want = if sha384 {
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        } else {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        };
        p.cipher_suites
            .iter()
            .find_map(|s| match s {
                rustls::SupportedCipherSuite::Tls13(t) if t.common.suite == want => {
                    Some(t.hkdf_provider)
                }
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn same_output_as_aws_lc_rs() {
        for (ours, theirs) in [
            (&HKDF_SHA256 as &dyn Hkdf, reference(false)),
            (&HKDF_SHA384, reference(true)),
        ] {
            let len = ours.extract_from_zero_ikm(None).hash_len();
            for (salt, secret) in [
                (None, &b"input key material"[..]),
                (Some(&b"salt"[..]), &[7u8; 48][..]),
                (Some(&[0u8; 100][..]), &b""[..]),
            ] {
                let (a, b) = (
                    ours.extract_from_secret(salt, secret),
                    theirs.extract_from_secret(salt, secret),
                );
                let info: [&[u8]; 2] = [b"tls13 ", b"c hs traffic"];
                assert_eq!(
                    a.expand_block(&info).as_ref(),
                    b.expand_block(&info).as_ref()
                );
                let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
                a.expand_slice(&info, &mut x).unwrap();
                b.expand_slice(&info, &mut y).unwrap();
                assert_eq!(x, y);
                let okm = a.expand_block(&[b"next"]);
                let (c, d) = (ours.expander_for_okm(&okm), theirs.expander_for_okm(&okm));
                assert_eq!(
                    c.expand_block(&[b"k"]).as_ref(),
                    d.expand_block(&[b"k"]).as_ref()
                );
                assert_eq!(
                    ours.hmac_sign(&okm, b"m").as_ref(),
                    theirs.hmac_sign(&okm, b"m").as_ref()
                );
                let (z1, z2) = (
                    ours.extract_from_zero_ikm(salt),
                    theirs.extract_from_zero_ikm(salt),
                );
                assert_eq!(
                    z1.expand_block(&[b"z"]).as_ref(),
                    z2.expand_block(&[b"z"]).as_ref()
                );
                assert_eq!(a.hash_len(), len);
            }
        }
    }

    #[test]
    fn only_the_hkdf_of_tls13_suites_changes() {
        let base = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
        let fast = with_fast_hkdf(&base);
        assert_eq!(base.len(), fast.len());
        for (a, b) in base.iter().zip(&fast) {
            assert_eq!(a.suite(), b.suite());
            assert_eq!(a.tls13().is_some(), b.tls13().is_some());
        }
    }
}
