//! What a route trusts and what it sends above its leaf, described once per identity
//! generation: the CA certificates of `--ca` (or of the SPIFFE trust bundles) and the
//! intermediates of our own chain. `/status`, the `ca_cert_expiry_timestamp_seconds` gauge and
//! the CA expiry warnings all read the same [`TrustFacts`], so they agree.

use std::collections::BTreeMap;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::cert::{CertInfo, rfc3339};
use super::load::FileBytes;

/// One certificate and where it came from, for messages (`/etc/mtls/ca.crt`, `trust bundle
/// of example.org`).
#[derive(Debug, Clone)]
pub struct Described {
    /// The file (or bundle) an operator would replace to renew it.
    pub origin: String,
    /// Subject, issuer, serial, validity, fingerprint.
    pub info: CertInfo,
}

/// The CA certificates a route verifies its peer against.
#[derive(Debug, Clone)]
pub struct CaBundle {
    /// `--ca FILE` or `SPIFFE trust bundles (a.test, b.test)`, for `/status`.
    pub source: String,
    /// Every CA certificate that parses, in the order given.
    pub cas: Vec<Described>,
}

impl CaBundle {
    /// The CA that expires first, if any parsed.
    pub fn earliest(&self) -> Option<&Described> {
        self.cas.iter().min_by_key(|c| c.info.not_after)
    }
}

/// The trust and chain facts of one identity generation.
#[derive(Debug, Clone, Default)]
pub struct TrustFacts {
    /// Every certificate after the leaf in the chain we send (intermediates, and a root if the
    /// chain file holds one).
    pub intermediates: Vec<Described>,
    /// The CAs we verify the peer against; `None` for the system trust store, whose earliest
    /// expiry says nothing about this route's peer (it holds ~150 public roots).
    pub bundle: Option<CaBundle>,
}

impl TrustFacts {
    /// From files: our `chain` (leaf first), read from `chain_file`, and the `--ca` bundle.
    pub fn from_files(
        chain: &[CertificateDer<'_>],
        chain_file: &str,
        ca: Option<&FileBytes>,
    ) -> Self {
        let bundle = ca.map(|f| {
            let origin = f.path.display().to_string();
            CaBundle {
                source: format!("--ca {origin}"),
                cas: CertificateDer::pem_slice_iter(&f.bytes)
                    .flatten()
                    .filter_map(|der| describe(&der, &origin))
                    .collect(),
            }
        });
        TrustFacts {
            intermediates: intermediates(chain, chain_file),
            bundle,
        }
    }

    /// From a Workload API update: the SVID's chain and every trust bundle, by domain.
    pub fn from_spiffe(
        chain: &[CertificateDer<'_>],
        socket: &str,
        bundles: &BTreeMap<String, Vec<CertificateDer<'static>>>,
    ) -> Self {
        let domains: Vec<&str> = bundles.keys().map(String::as_str).collect();
        let cas = bundles
            .iter()
            .flat_map(|(domain, cas)| {
                let origin = format!("trust bundle of {domain} (Workload API {socket})");
                cas.iter()
                    .filter_map(move |der| describe(der, &origin))
                    .collect::<Vec<_>>()
            })
            .collect();
        TrustFacts {
            intermediates: intermediates(chain, &format!("SVID from the Workload API {socket}")),
            bundle: Some(CaBundle {
                source: format!("SPIFFE trust bundles ({})", domains.join(", ")),
                cas,
            }),
        }
    }

    /// `/status`: each certificate above our leaf, described like the leaf (no key material).
    pub fn intermediates_json(&self) -> serde_json::Value {
        self.intermediates
            .iter()
            .map(|d| {
                let c = &d.info;
                serde_json::json!({
                    "subject": c.subject,
                    "issuer": c.issuer,
                    "serial": c.serial,
                    "not_after": rfc3339(c.not_after),
                    "sha256_fingerprint": c.sha256_fingerprint,
                })
            })
            .collect()
    }

    /// `/status`: the trusted CAs summed up (how many, which expires first, when); `null` for
    /// the system trust store.
    pub fn ca_bundle_json(&self) -> serde_json::Value {
        let Some(b) = &self.bundle else {
            return serde_json::Value::Null;
        };
        let first = b.earliest();
        serde_json::json!({
            "source": b.source,
            "count": b.cas.len(),
            "earliest_not_after": first.map(|c| rfc3339(c.info.not_after)),
            "earliest_subject": first.map(|c| &c.info.subject),
        })
    }

    /// The earliest not-after among the trusted CAs: `None` for the system trust store or a
    /// bundle none of whose certificates parse.
    pub fn earliest_ca_expiry(&self) -> Option<i64> {
        self.bundle
            .as_ref()
            .and_then(CaBundle::earliest)
            .map(|c| c.info.not_after)
    }
}

fn describe(der: &CertificateDer<'_>, origin: &str) -> Option<Described> {
    Some(Described {
        origin: origin.to_string(),
        info: CertInfo::parse(der)?,
    })
}

fn intermediates(chain: &[CertificateDer<'_>], origin: &str) -> Vec<Described> {
    chain
        .iter()
        .skip(1)
        .filter_map(|der| describe(der, origin))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::file::test_file as file;

    #[test]
    fn bundle_earliest_and_chain() {
        let a = crate::pki::DevPki::generate().unwrap();
        let b = crate::pki::DevPki::generate().unwrap();
        let pem = format!("{}{}", a.ca, b.ca);
        let ca = file("--ca", "ca.pem", pem.as_bytes());
        let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let facts = TrustFacts::from_files(&ders, "chain.pem", Some(&ca));
        let bundle = facts.bundle.as_ref().unwrap();
        assert_eq!(bundle.cas.len(), 2);
        assert!(bundle.source.starts_with("--ca ") && bundle.source.ends_with("ca.pem"));
        let min = bundle.cas.iter().map(|c| c.info.not_after).min();
        assert_eq!(facts.earliest_ca_expiry(), min);
        assert_eq!(facts.intermediates.len(), 1, "all but the leaf");
        assert_eq!(facts.intermediates[0].origin, "chain.pem");
        assert_eq!(
            TrustFacts::from_files(&ders, "x", None).earliest_ca_expiry(),
            None
        );
    }
}
