//! One Workload API update to one identity generation: the chosen SVID (`--spiffe-id`, else
//! the first), every trust bundle by domain, and from them the whole client (and inbound
//! server) configuration, built as a file reload builds one: fresh session caches included.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use super::verify::{Bundles, ClientVerifier, ServerVerifier};
use crate::tls::authorize::AuthorizingVerifier;
use crate::tls::cert::CertInfo;
use crate::tls::identity::{self, Loaded};
use crate::tls::trust::TrustFacts;
use crate::tls::{Settings, SpiffeSource, provider};

/// One X.509-SVID as the API sent it.
#[derive(Clone)]
pub struct Svid {
    pub id: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER, wiped when dropped.
    pub key: zeroize::Zeroizing<Vec<u8>>,
}

/// Never the key: a snapshot printed anywhere shows its IDs and chain lengths only.
impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Everything one Workload API update holds.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub svids: Vec<Svid>,
    /// CA certificates by trust domain name: the SVIDs' own and the federated ones.
    pub bundles: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl Snapshot {
    /// SHA-256 over every SVID and bundle, to tell a changed update from a repeated one.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for s in &self.svids {
            h.update(s.id.as_bytes());
            for c in &s.chain {
                h.update((c.len() as u64).to_le_bytes());
                h.update(c.as_ref());
            }
            h.update(Sha256::digest(s.key.as_slice()));
        }
        for (domain, cas) in &self.bundles {
            h.update(domain.as_bytes());
            for c in cas {
                h.update((c.len() as u64).to_le_bytes());
                h.update(c.as_ref());
            }
        }
        h.finalize().into()
    }

    /// The SVID a route uses: `--spiffe-id`'s, else the first.
    pub fn pick(&self, wanted: Option<&str>) -> Option<&Svid> {
        match wanted {
            Some(id) => self.svids.iter().find(|s| s.id == id),
            None => self.svids.first(),
        }
    }
}

/// Why an update cannot become an identity: withdrawn (no SVID for the route) or unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// No SVID (or not the `--spiffe-id` one): the route has no identity until a new update.
    NoSvid(String),
    /// The SVID or a bundle cannot be used; the identity in force stays.
    Bad(String),
}

/// Build the route's identity from `snap`.
pub fn build(
    settings: &Settings,
    source: &SpiffeSource,
    snap: &Snapshot,
) -> Result<Loaded, Unusable> {
    let svid = snap.pick(source.id.as_deref()).ok_or_else(|| {
        Unusable::NoSvid(match &source.id {
            Some(id) => format!(
                "the Workload API sent no SVID for --spiffe-id {id} (it sent {})",
                ids(snap)
            ),
            None => "the Workload API sent no SVID".to_string(),
        })
    })?;
    let leaf = svid
        .chain
        .first()
        .and_then(CertInfo::parse)
        .map(Arc::new)
        .ok_or_else(|| Unusable::Bad(format!("SVID {}: the leaf cannot be parsed", svid.id)))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.to_vec()));
    let certified = CertifiedKey::from_der(svid.chain.clone(), key, &provider())
        .map(Arc::new)
        .map_err(|e| Unusable::Bad(format!("SVID {}: {e}", svid.id)))?;
    let bundles = Bundles::new(&snap.bundles);
    let bad = |e: String| Unusable::Bad(format!("SVID {}: {e}", svid.id));
    let server = match &settings.inbound {
        Some(rule) => {
            let verifier = ClientVerifier::new(bundles.clone()).map_err(bad)?;
            let authorizing = Arc::new(AuthorizingVerifier::new(Arc::new(verifier), rule.clone()));
            Some(
                crate::tls::server::build_with(settings, authorizing, certified.clone())
                    .map_err(|e| bad(e.to_string()))?,
            )
        }
        None => None,
    };
    let verifier = Arc::new(ServerVerifier::new(bundles, settings.checks.clone()));
    let config = identity::client_config(settings, verifier.clone(), certified)
        .map_err(|e| bad(e.to_string()))?;
    let socket = source.socket.display().to_string();
    let trust = TrustFacts::from_spiffe(&svid.chain, &socket, &snap.bundles);
    Ok(Loaded {
        config: Arc::new(config),
        server,
        leaf,
        digest: snap.digest(),
        loose_permissions: Vec::new(),
        crl_next_updates: Vec::new(),
        spiffe_id: Some(svid.id.clone()),
        absent: None,
        trust: Arc::new(trust),
        verifier: Some(verifier),
    })
}

/// The SPIFFE IDs of an update, for messages.
fn ids(snap: &Snapshot) -> String {
    if snap.svids.is_empty() {
        return "none".into();
    }
    snap.svids
        .iter()
        .map(|s| s.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    use super::*;
    use crate::cli::TlsMin;
    use crate::tls::{Checks, IdentitySource, Rule, TlsFiles};

    fn settings(inbound: bool) -> (Settings, SpiffeSource) {
        let source = SpiffeSource {
            socket: "/run/agent.sock".into(),
            id: None,
        };
        let settings = Settings {
            files: TlsFiles {
                identity: IdentitySource::Spiffe(source.clone()),
                ca: None,
                crls: Vec::new(),
            },
            checks: Checks {
                uri_sans: vec!["spiffe://a.test/db".into()],
                pins: Vec::new(),
            },
            tls_min: TlsMin::V12,
            alpn: Vec::new(),
            reload_interval: None,
            inbound: inbound.then(|| Rule {
                uri_sans: vec!["spiffe://a.test/*".into()],
                dns_sans: Vec::new(),
                cns: Vec::new(),
                pins: Vec::new(),
                allow_any: false,
            }),
        };
        (settings, source)
    }

    /// An update with one SVID per ID, all from one CA of a.test, and a.test's bundle.
    fn snapshot(ids: &[&str]) -> Snapshot {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca, ca_key);
        let svids = ids
            .iter()
            .map(|id| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::new(Vec::new()).unwrap();
                p.subject_alt_names = vec![SanType::URI((*id).try_into().unwrap())];
                let cert = p.signed_by(&key, &issuer).unwrap();
                Svid {
                    id: id.to_string(),
                    chain: vec![cert.der().clone()],
                    key: key.serialize_der().into(),
                }
            })
            .collect();
        Snapshot {
            svids,
            bundles: [("a.test".to_string(), vec![ca_der])].into(),
        }
    }

    #[test]
    fn the_first_svid_unless_one_is_named() {
        let snap = snapshot(&["spiffe://a.test/web", "spiffe://a.test/batch"]);
        let (settings, mut source) = settings(true);
        let loaded = build(&settings, &source, &snap).unwrap();
        assert_eq!(loaded.spiffe_id.as_deref(), Some("spiffe://a.test/web"));
        assert!(loaded.server.is_some() && loaded.absent.is_none());
        assert!(
            loaded
                .leaf
                .sans
                .contains(&"URI:spiffe://a.test/web".to_string())
        );
        source.id = Some("spiffe://a.test/batch".into());
        let loaded = build(&settings, &source, &snap).unwrap();
        assert_eq!(loaded.spiffe_id.as_deref(), Some("spiffe://a.test/batch"));
        assert_eq!(loaded.digest, snap.digest());
        source.id = Some("spiffe://a.test/other".into());
        match build(&settings, &source, &snap) {
            Err(Unusable::NoSvid(why)) => assert!(why.contains("spiffe://a.test/other"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_key_of_another_svid_is_unusable() {
        let mut snap = snapshot(&["spiffe://a.test/web", "spiffe://a.test/batch"]);
        snap.svids[0].key = snap.svids[1].key.clone();
        let (settings, source) = settings(false);
        assert!(matches!(
            build(&settings, &source, &snap),
            Err(Unusable::Bad(_))
        ));
        assert!(matches!(
            build(&settings, &source, &Snapshot::default()),
            Err(Unusable::NoSvid(_))
        ));
    }

    #[test]
    fn digests_tell_bundle_only_changes() {
        let snap = snapshot(&["spiffe://a.test/web"]);
        let mut federated = snap.clone();
        federated
            .bundles
            .insert("b.test".into(), snap.bundles["a.test"].clone());
        assert_eq!(snap.digest(), snap.clone().digest());
        assert_ne!(snap.digest(), federated.digest());
    }
}
