//! `check` on a `--spiffe` route: fetch the SVID and bundles (`spiffe`), report them, then do
//! what the route does with them: outbound, one handshake presenting the SVID and verifying
//! the upstream against the bundle of its own trust domain and `--verify-uri-san`; inbound,
//! the rule in words and one dial of the target.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use spiffe::{TrustDomain, X509BundleSet};

use super::cert::{Names, Summary};
use super::explain::Trust;
use super::report::{InboundReport, RouteReport};
use super::spiffe::{self as api, Fetched};
use super::{Ours, dial};
use crate::cli::TlsMin;
use crate::config::Route;
use crate::egress::Proxy;
use crate::tls::{SpiffeSource, provider};

/// Why the check-side SPIFFE verifier refused the upstream.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("the upstream certificate carries no SPIFFE ID (no spiffe:// URI SAN)")]
    NoId,
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    #[error(
        "the upstream's SPIFFE ID {found} is not one of --verify-uri-san ({wanted}): it is a \
         valid workload of its trust domain, but not the one this route may talk to"
    )]
    NotAllowed { found: String, wanted: String },
}

fn refused(e: Refused) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The peer's chain must lead to the bundle of the peer's own trust domain (its URI SAN), never
/// to another domain's; then its ID must match `--verify-uri-san`. No hostname check: SPIFFE
/// IDs replace it.
#[derive(Debug)]
struct SpiffeVerifier {
    bundles: Arc<X509BundleSet>,
    allowed: Vec<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (id, domain) = api::peer_id(end_entity).ok_or_else(|| refused(Refused::NoId))?;
        let bundle = TrustDomain::new(&domain)
            .ok()
            .and_then(|td| self.bundles.get(&td))
            .ok_or_else(|| refused(Refused::NoBundle(domain.clone())))?;
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(
            bundle
                .authorities()
                .iter()
                .map(|c| CertificateDer::from(c.as_bytes().to_vec())),
        );
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        // Exact IDs, as `run` compares an outbound route's `--verify-uri-san` (tls::verify).
        if !self.allowed.contains(&id) {
            return Err(refused(Refused::NotAllowed {
                found: id,
                wanted: self.allowed.join(", "),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The route's client configuration with the SVID as its identity and the SPIFFE verifier,
/// wrapped in `check`'s recorders.
fn client_config(
    route: &Route,
    f: &Fetched,
    seen: &dial::SeenDuringHandshake,
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let chain: Vec<CertificateDer<'static>> = f
        .svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        f.svid.private_key().as_bytes().to_vec(),
    ));
    let verifier = Arc::new(SpiffeVerifier {
        bundles: f.bundles.clone(),
        allowed: route.tls.checks.uri_sans.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let versions: &[&rustls::SupportedProtocolVersion] = match route.tls.tls_min {
        TlsMin::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMin::V13 => &[&rustls::version::TLS13],
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the Workload API's SVID cannot be used: {e}"))?;
    config.alpn_protocols = route.tls.alpn.clone();
    Ok(dial::recording(config, verifier, seen))
}

/// Check a `--spiffe` route; `r` already names it.
pub(super) async fn check(
    route: &Route,
    proxy: Option<&Proxy>,
    source: &SpiffeSource,
    mut r: RouteReport,
) -> RouteReport {
    let now = crate::tls::cert::now_unix();
    let started = std::time::Instant::now();
    let socket = source.socket.display().to_string();
    if route.inbound().is_some() {
        r.inbound = Some(InboundReport {
            authorization: route.tls.inbound.as_ref().map_or_else(
                || "nobody (no rule)".into(),
                |rule| format!("lets in {}", rule.describe()),
            ),
            client_cas: None,
            crls: Vec::new(),
            listen_names: "not checked: clients verify our SPIFFE ID, not a DNS name".into(),
        });
    }
    let fetched =
        match api::fetch(&source.socket, source.id.as_deref(), route.connect_timeout).await {
            Ok(f) => f,
            Err(wait) => {
                r.spiffe = Some(api::SpiffeReport::socket_only(&socket));
                let problem = api::explain_wait(&wait, &socket, route.connect_timeout);
                return r.fail(problem);
            }
        };
    r.spiffe = Some(api::describe(&socket, &fetched, now, &mut r.problems));
    // One --connect-timeout for the whole route, so `check` still ends within it + 5 s: the
    // dial gets what the Workload API left of it.
    let mut route = route.clone();
    route.connect_timeout = route
        .connect_timeout
        .saturating_sub(started.elapsed())
        .max(std::time::Duration::from_millis(100));
    let route = &route;
    if let Some(inbound) = route.inbound() {
        super::inbound::dial_target(route, inbound, &mut r).await;
        return r.finish();
    }
    r.trust = Some(format!(
        "the Workload API's bundle of the upstream's trust domain ({}), then \
         --verify-uri-san {}",
        api::held(&fetched.bundles).join(", "),
        route.tls.checks.uri_sans.join(", ")
    ));
    let seen = dial::new_seen();
    let config = match client_config(route, &fetched, &seen) {
        Ok(c) => c,
        Err(e) => return r.fail(e),
    };
    let chain: Vec<CertificateDer<'static>> = fetched
        .svid
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let names: Vec<Names> = chain.iter().filter_map(Names::of).collect();
    let leaf = Summary::parse(&chain[0], now);
    let trust = Trust {
        ca: None,
        subjects: Vec::new(),
    };
    let ours = Ours {
        trust: &trust,
        names: &names,
        leaf: leaf.as_ref(),
    };
    let bundles = fetched.bundles.clone();
    super::dial_and_judge(route, proxy, config, seen, &ours, r, move |e, theirs| {
        first_say(e, theirs, &bundles)
    })
    .await
}

/// A handshake error in SPIFFE terms: "no bundle for trust domain X" when the upstream's leaf
/// names a domain we hold no bundle for; our verifier's other refusals as they are; a chain
/// that does not lead to its domain's bundle.
fn first_say(
    e: &rustls::Error,
    theirs: &[CertificateDer<'static>],
    bundles: &X509BundleSet,
) -> Option<String> {
    let held = api::held(bundles);
    let peer = theirs.first().and_then(api::peer_id);
    if let Some((id, domain)) = &peer
        && !held.contains(domain)
    {
        return Some(api::no_bundle("upstream", id, domain, &held));
    }
    let rustls::Error::InvalidCertificate(ce) = e else {
        return None;
    };
    match (ce, &peer) {
        (CertificateError::Other(OtherError(inner)), _) if inner.is::<Refused>() => {
            Some(format!("{inner}"))
        }
        (CertificateError::UnknownIssuer | CertificateError::BadSignature, Some((id, domain))) => {
            Some(format!(
                "the upstream presented {id}, but its chain does not lead to the Workload \
                 API's bundle for trust domain {domain}: it was issued by another SPIRE \
                 server (or CA) than the one the bundle names, or the bundle is stale"
            ))
        }
        _ => None,
    }
}
