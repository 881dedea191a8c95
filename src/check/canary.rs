//! `--reload-canary`'s dial: a new client identity tried on each canary route's upstream before
//! the reload publishes it. The dial is `check`'s ([`dial::dial`]: resolve at dial time, the
//! route's proxy if any, the route's own verification, `--connect-timeout`, then the short
//! wait for a TLS 1.3 verdict on our certificate), so what the canary saw is what a connection
//! would see. Only an alert naming our certificate is a refusal; anything else publishes.

use std::sync::Arc;

use rustls::ClientConfig;

use super::cert::Hint;
use super::dial::{self, Outcome};
use crate::config::Route;
use crate::egress::Proxy;
use crate::failure::{Class, classify_tls, escape};
use crate::tls::canary::{Canary, Dialling, Verdict, cap_names};
use crate::upstream::server_name_str;

/// The routes (sharing one identity) whose upstreams a new identity is tried on.
pub struct RouteCanary {
    /// Each outbound route with `--reload-canary`, with its opened proxy.
    targets: Vec<(Route, Option<Arc<Proxy>>)>,
}

impl RouteCanary {
    /// `None` when no route asks for a canary.
    pub fn new(targets: Vec<(Route, Option<Arc<Proxy>>)>) -> Option<RouteCanary> {
        let targets: Vec<_> = targets
            .into_iter()
            .filter(|(r, _)| r.ops.reload_canary && r.inbound().is_none())
            .collect();
        (!targets.is_empty()).then_some(RouteCanary { targets })
    }
}

impl Canary for RouteCanary {
    fn try_identity(&self, config: Arc<ClientConfig>) -> Dialling<'_> {
        Box::pin(async move {
            let mut inconclusive = None;
            for (route, proxy) in &self.targets {
                match try_route(route, proxy.as_deref(), &config).await {
                    Verdict::Accepted => {}
                    rejected @ Verdict::Rejected { .. } => return rejected,
                    other => {
                        inconclusive.get_or_insert(other);
                    }
                }
            }
            inconclusive.unwrap_or(Verdict::Accepted)
        })
    }
}

/// One dial of `route`'s upstream with `config`, judged.
async fn try_route(route: &Route, proxy: Option<&Proxy>, config: &ClientConfig) -> Verdict {
    let seen = dial::new_seen();
    let recording = dial::recording_request(config.clone(), &seen);
    let d = dial::dial(route, proxy, recording).await;
    let hints: Vec<String> = seen
        .lock()
        .map(|s| s.hints.iter().map(|h| Hint::decode(h).text).collect())
        .unwrap_or_default();
    judge(route, d.outcome, cap_names(hints))
}

/// The verdict of one dial's outcome: only an alert from the upstream that names our
/// certificate (`client_cert_rejected`) refuses the identity.
fn judge(route: &Route, outcome: Outcome, accepted_cas: Vec<String>) -> Verdict {
    let inconclusive = |why: String| Verdict::Inconclusive {
        route: route.name.clone(),
        why: escape(&why).into_owned(),
    };
    match outcome {
        Outcome::Accepted { .. } | Outcome::ClosedAfter { accepted: true, .. } => Verdict::Accepted,
        Outcome::Handshake(e) | Outcome::Rejected(e) => {
            let f = classify_tls(&e, &server_name_str(route));
            match (&e, f.class) {
                (rustls::Error::AlertReceived(alert), Class::ClientCertRejected) => {
                    Verdict::Rejected {
                        route: route.name.clone(),
                        alert: format!("{alert:?}"),
                        accepted_cas,
                    }
                }
                _ => inconclusive(f.message),
            }
        }
        Outcome::ClosedAfter { why, .. } => inconclusive(format!(
            "the upstream closed right after the handshake without an alert: {why}"
        )),
        Outcome::HandshakeIo(why) => inconclusive(format!(
            "the upstream closed the connection during the handshake: {why}"
        )),
        Outcome::Dns(why) => inconclusive(format!("the upstream's name did not resolve: {why}")),
        Outcome::NoConnection => inconclusive("the upstream refused or was unreachable".into()),
        Outcome::Timeout { phase, .. } => {
            inconclusive(format!("no answer within --connect-timeout (in {phase})"))
        }
        Outcome::Proxy(f) | Outcome::Opening(f) => inconclusive(f.message),
    }
}
