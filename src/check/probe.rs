//! One probe of a running outbound route, for `/upstreamz`: the same dial and the same
//! judgement as `check` (resolve, connect or tunnel, a hand-driven handshake, the wait for a
//! TLS 1.3 verdict on our certificate, the plain-words explanation), but with the identity and
//! verifier in force instead of the files read anew. Nothing here touches the route's
//! connection metrics: a probe is not app traffic.

use rustls::pki_types::CertificateDer;

use super::cert::{Names, Summary};
use super::explain::Trust;
use super::report::RouteReport;
use super::{Ours, dial};
use crate::config::Route;
use crate::egress::Proxy;
use crate::tls::cert::now_unix;
use crate::tls::identity::Loaded;

/// What one probe found.
#[derive(Debug)]
pub struct Probed {
    /// `None` when the route passed; otherwise why not, in `check`'s words.
    pub problem: Option<String>,
    /// The upstream's leaf after a passing handshake, for its expiry gauge.
    pub upstream_leaf: Option<CertificateDer<'static>>,
}

impl Probed {
    fn failed(problem: String) -> Self {
        Probed {
            problem: Some(problem),
            upstream_leaf: None,
        }
    }
}

/// Dial `route`'s upstream once with `loaded` (the identity in force) and judge it as `check`
/// does. Ends within `--connect-timeout` plus the verdict wait and a bounded close.
pub async fn probe(route: &Route, proxy: Option<&Proxy>, loaded: &Loaded) -> Probed {
    if let Some(why) = &loaded.absent {
        return Probed::failed(why.clone());
    }
    let Some(verifier) = loaded.verifier.clone() else {
        return Probed::failed("no upstream verifier is loaded for this route".into());
    };
    let now = now_unix();
    // Our chain as the config presents it (the resolver ignores the hints).
    let chain: Vec<CertificateDer<'static>> = loaded
        .config
        .client_auth_cert_resolver
        .resolve(&[], &[])
        .map(|c| c.cert.clone())
        .unwrap_or_default();
    let names: Vec<Names> = chain.iter().filter_map(Names::of).collect();
    let leaf = chain.first().and_then(|c| Summary::parse(c, now));
    let trust = Trust {
        ca: route.tls.files.ca.as_ref().map(|p| p.display().to_string()),
        subjects: loaded
            .trust
            .bundle
            .iter()
            .flat_map(|b| b.cas.iter())
            .map(|c| crate::failure::escape(&c.info.subject).into_owned())
            .collect(),
    };
    let ours = Ours {
        trust: &trust,
        names: &names,
        leaf: leaf.as_ref(),
    };
    let seen = dial::new_seen();
    let mut config = (*loaded.config).clone();
    // A full handshake every time: a resumed session would skip the upstream's verdict on
    // our certificate, which is what the probe is for. (rustls already refuses to resume a
    // session made under another verifier or resolver, and the recorders are new ones; this
    // says so outright.)
    config.resumption = rustls::client::Resumption::disabled();
    let config = dial::recording(config, verifier, &seen);
    let report = RouteReport::new(route, proxy);
    let (r, theirs) =
        super::dial_judge_seen(route, proxy, config, seen, &ours, report, |_, _| None).await;
    match r.problems.into_iter().next() {
        Some(problem) => Probed::failed(problem),
        None => Probed {
            problem: None,
            upstream_leaf: theirs.into_iter().next(),
        },
    }
}
