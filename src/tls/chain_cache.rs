//! Upstream chains already verified, remembered briefly so that the next full handshake with the
//! same upstream skips path building and the chain's signature checks (about a fifth of the
//! proxy's CPU per full handshake). Under the rules of issue 18, all of which a hit must meet:
//!
//! - keyed by the exact bytes: the end-entity certificate, every intermediate the upstream sent
//!   (in order) and the server name; a hit compares the bytes themselves, not a digest of them;
//! - bounded: at most [`CAPACITY`] chains per verifier, and a chain larger than [`MAX_CHAIN`]
//!   bytes is never kept (verified every time), so a verifier's cache holds at most 512 KiB;
//! - never older than [`MAX_AGE`], and never past the `notAfter` of any certificate in the
//!   chain (a clock that went backwards misses too);
//! - flushed on every reload: each verifier has its own cache, and every build of a route's
//!   identity (a reload, SIGHUP, a CA or CRL change) makes a new verifier, so the chains
//!   verified under the old trust are dropped with it.
//!
//! Only successes are kept, and only `verify_server_cert` consults the cache: the handshake
//! signature (`CertificateVerify`, which proves the upstream holds the leaf's key) is checked
//! by the inner verifier on every handshake, hit or miss.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Chains remembered per verifier.
pub const CAPACITY: usize = 64;
/// How long a verified chain may be used without verifying it again, in seconds.
pub const MAX_AGE: u64 = 60;
/// The largest chain (end entity and intermediates, bytes) that is remembered.
pub const MAX_CHAIN: usize = 8 * 1024;

/// One verified chain.
#[derive(Debug)]
struct Entry {
    /// The name the chain was verified for.
    server_name: ServerName<'static>,
    /// The end-entity certificate, as sent.
    end_entity: CertificateDer<'static>,
    /// The intermediates, as sent and in the order sent.
    intermediates: Vec<CertificateDer<'static>>,
    /// When it was verified (Unix seconds, the handshake's clock).
    verified_at: u64,
    /// The first second it may no longer be used: `verified_at + MAX_AGE`, or the earliest
    /// `notAfter` of the chain if that comes first.
    expires: u64,
}

impl Entry {
    /// Whether this entry is for exactly these bytes and this name.
    fn is_for(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
    ) -> bool {
        self.end_entity.as_ref() == end_entity.as_ref()
            && self.intermediates.len() == intermediates.len()
            && self
                .intermediates
                .iter()
                .zip(intermediates)
                .all(|(a, b)| a.as_ref() == b.as_ref())
            && self.server_name == *server_name
    }

    /// Whether it may be used at `now` (Unix seconds).
    fn usable_at(&self, now: u64) -> bool {
        self.verified_at <= now && now < self.expires
    }
}

/// The verified chains of one verifier.
#[derive(Debug, Default)]
pub struct VerifiedChains {
    /// Few entries (one per upstream certificate, at most [`CAPACITY`]): a linear scan
    /// comparing lengths first costs less than hashing a chain.
    entries: Mutex<Vec<Entry>>,
}

impl VerifiedChains {
    /// Whether exactly this chain was verified for this name, recently enough, and is still
    /// within every certificate's validity at `now`.
    pub fn hit(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        let now = now.as_secs();
        // A poisoned lock only means a panic elsewhere: verify (a miss), never fail open.
        let Ok(mut entries) = self.entries.lock() else {
            return false;
        };
        let Some(i) = entries
            .iter()
            .position(|e| e.is_for(end_entity, intermediates, server_name))
        else {
            return false;
        };
        if entries[i].usable_at(now) {
            return true;
        }
        entries.swap_remove(i);
        false
    }

    /// Remember a chain the inner verifier accepted at `now`. A chain too large, or one whose
    /// validity cannot be read, is not remembered.
    pub fn insert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) {
        let size: usize = end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>();
        if size > MAX_CHAIN {
            return;
        }
        let now = now.as_secs();
        let mut expires = now.saturating_add(MAX_AGE);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            match not_after(cert) {
                Some(t) => expires = expires.min(t),
                None => return,
            }
        }
        if expires <= now {
            return;
        }
        let entry = Entry {
            server_name: server_name.to_owned(),
            end_entity: end_entity.clone().into_owned(),
            intermediates: intermediates
                .iter()
                .map(|c| c.clone().into_owned())
                .collect(),
            verified_at: now,
            expires,
        };
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        entries.retain(|e| e.usable_at(now) && !e.is_for(end_entity, intermediates, server_name));
        if entries.len() >= CAPACITY {
            // Full of live entries: the oldest goes.
            if let Some(oldest) = (0..entries.len()).min_by_key(|&i| entries[i].verified_at) {
                entries.swap_remove(oldest);
            }
        }
        entries.push(entry);
    }

    /// How many chains are remembered (expired ones included until they are next looked at).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A certificate's `notAfter` as Unix seconds; `None` when it cannot be read or is before 1970.
fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    u64::try_from(parsed.validity().not_after.timestamp()).ok()
}

/// A server verifier that answers `verify_server_cert` from [`VerifiedChains`] when it can and
/// asks `inner` (and remembers its success) when it cannot; everything else is `inner`'s.
#[derive(Debug)]
pub struct CachingVerifier {
    /// The real verifier: chain, name, CRLs and the route's extra checks.
    inner: Arc<dyn ServerCertVerifier>,
    /// What `inner` accepted lately; new and empty with every verifier.
    chains: VerifiedChains,
}

impl CachingVerifier {
    /// `inner` with an empty cache in front.
    pub fn new(inner: Arc<dyn ServerCertVerifier>) -> Self {
        CachingVerifier {
            inner,
            chains: VerifiedChains::default(),
        }
    }

    /// The chains remembered, for tests.
    pub fn chains(&self) -> &VerifiedChains {
        &self.chains
    }
}

impl ServerCertVerifier for CachingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.chains.hit(end_entity, intermediates, server_name, now) {
            return Ok(ServerCertVerified::assertion());
        }
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.chains
            .insert(end_entity, intermediates, server_name, now);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::pki::DevPki;

    /// Counts its calls and accepts (or refuses) every chain.
    #[derive(Debug, Default)]
    struct Counting {
        chains: AtomicUsize,
        refuse: bool,
    }

    impl ServerCertVerifier for Counting {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            self.chains.fetch_add(1, Ordering::SeqCst);
            if self.refuse {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                ));
            }
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("bad signature".into()))
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.verify_tls12_signature(m, c, d)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ECDSA_NISTP256_SHA256]
        }
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn name(n: &str) -> ServerName<'static> {
        ServerName::try_from(n.to_string()).unwrap()
    }

    /// A verifier over a counting inner one, a leaf and an intermediate, and a time at which
    /// both are valid.
    fn setup(refuse: bool) -> (Arc<Counting>, CachingVerifier, DevPki, UnixTime) {
        let inner = Arc::new(Counting {
            refuse,
            ..Counting::default()
        });
        let cached = CachingVerifier::new(inner.clone());
        let pki = DevPki::generate().unwrap();
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            crate::tls::cert::now_unix() as u64,
        ));
        (inner, cached, pki, now)
    }

    fn at(t: UnixTime, plus: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(t.as_secs() + plus))
    }

    fn calls(inner: &Counting) -> usize {
        inner.chains.load(Ordering::SeqCst)
    }

    #[test]
    fn a_hit_skips_the_inner_verifier_and_a_different_chain_or_name_misses() {
        let (inner, v, pki, now) = setup(false);
        let (leaf, client) = (der(&pki.server), der(&pki.client));
        let ca = vec![der(&pki.ca)];
        let host = name("localhost");
        let verify = |ee: &CertificateDer<'_>, mids: &[CertificateDer<'_>], n: &ServerName<'_>| {
            v.verify_server_cert(ee, mids, n, &[], now).unwrap();
        };
        verify(&leaf, &ca, &host);
        assert_eq!(calls(&inner), 1);
        verify(&leaf, &ca, &host);
        assert_eq!(calls(&inner), 1, "the same chain and name must be a hit");
        verify(&leaf, &ca, &name("other.example"));
        assert_eq!(calls(&inner), 2, "another server name must miss");
        verify(&leaf, &[], &host);
        assert_eq!(calls(&inner), 3, "other intermediates must miss");
        verify(&client, &ca, &host);
        assert_eq!(calls(&inner), 4, "another end entity must miss");
        // One byte changed in the leaf: same length, different bytes.
        let mut bytes = leaf.as_ref().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        verify(&CertificateDer::from(bytes), &ca, &host);
        assert_eq!(calls(&inner), 5, "a chain differing in one byte must miss");
        verify(&leaf, &ca, &host);
        assert_eq!(calls(&inner), 5);
    }

    #[test]
    fn a_refused_chain_is_not_remembered() {
        let (inner, v, pki, now) = setup(true);
        let leaf = der(&pki.server);
        for _ in 0..2 {
            assert!(
                v.verify_server_cert(&leaf, &[], &name("localhost"), &[], now)
                    .is_err()
            );
        }
        assert_eq!(calls(&inner), 2);
        assert!(v.chains().is_empty());
    }

    #[test]
    fn an_entry_expires_after_60_seconds_and_when_the_clock_goes_back() {
        let (inner, v, pki, now) = setup(false);
        let leaf = der(&pki.server);
        let host = name("localhost");
        let verify_at = |t: UnixTime| {
            v.verify_server_cert(&leaf, &[], &host, &[], t).unwrap();
        };
        verify_at(now);
        verify_at(at(now, MAX_AGE - 1));
        assert_eq!(calls(&inner), 1, "59 s later is still a hit");
        verify_at(at(now, MAX_AGE));
        assert_eq!(calls(&inner), 2, "60 s later must verify again");
        verify_at(at(now, MAX_AGE + 1));
        assert_eq!(calls(&inner), 2, "verified afresh at +60 s");
        verify_at(now);
        assert_eq!(calls(&inner), 3, "a clock gone back must verify again");
    }

    #[test]
    fn an_entry_never_outlives_a_certificate_of_the_chain() {
        let (inner, v, pki, _) = setup(false);
        let leaf = der(&pki.server);
        let host = name("localhost");
        let end = not_after(&leaf).unwrap();
        let before = |s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(end - s));
        v.verify_server_cert(&leaf, &[], &host, &[], before(10))
            .unwrap();
        v.verify_server_cert(&leaf, &[], &host, &[], before(1))
            .unwrap();
        assert_eq!(calls(&inner), 1);
        v.verify_server_cert(&leaf, &[], &host, &[], before(0))
            .unwrap();
        assert_eq!(
            calls(&inner),
            2,
            "at notAfter the chain must be verified again"
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let (inner, v, pki, now) = setup(false);
        let leaf = der(&pki.server);
        for i in 0..CAPACITY + 10 {
            let n = name(&format!("h{i}.example"));
            v.verify_server_cert(&leaf, &[], &n, &[], now).unwrap();
        }
        assert_eq!(v.chains().len(), CAPACITY);
        assert_eq!(calls(&inner), CAPACITY + 10);
        // A chain over the size limit is verified every time and never kept.
        let big = vec![der(&pki.ca); MAX_CHAIN / der(&pki.ca).len() + 1];
        let before = calls(&inner);
        for _ in 0..2 {
            v.verify_server_cert(&leaf, &big, &name("localhost"), &[], now)
                .unwrap();
        }
        assert_eq!(calls(&inner), before + 2);
    }

    #[test]
    fn a_new_verifier_starts_empty() {
        let (inner, v, pki, now) = setup(false);
        let leaf = der(&pki.server);
        v.verify_server_cert(&leaf, &[], &name("localhost"), &[], now)
            .unwrap();
        let fresh = CachingVerifier::new(inner.clone());
        fresh
            .verify_server_cert(&leaf, &[], &name("localhost"), &[], now)
            .unwrap();
        assert_eq!(calls(&inner), 2);
    }
}
