//! The Workload API stream of one SPIFFE identity: connect to the socket, stream X.509
//! contexts (`FetchX509SVID`: the SVIDs with their own bundles and the federated ones), and
//! publish each update as one atomic identity reload through the same path as file reloads
//! (the `identity reloaded` line, `reloads_total`, `/status`, a new generation so pooled
//! connections retire, fresh session caches). When the API goes away, the last SVID serves
//! while it is valid and the stream is reopened with backoff (1 s doubling to 30 s), with one
//! warn per outage. PermissionDenied (or an update without the route's SVID) withdraws the
//! identity: the route is not ready and refuses new connections until a new SVID arrives.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::CertificateDer;
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::build::{self, Snapshot, Svid, Unusable};
use crate::tls::cert::{now_unix, rfc3339};
use crate::tls::identity::{Identity, Loaded};
use crate::tls::reload::ReloadOutcomes;
use crate::tls::{Settings, SpiffeSource};

/// The first wait before reconnecting, doubled after each failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `/readyz` before the first SVID (the interface's words).
pub const WAITING: &str = "waiting for the first SVID from the Workload API";

/// How a stream ended.
enum Ended {
    /// The API is unreachable or the stream broke: keep the identity, back off, warn once.
    Outage(String),
    /// The API refused to issue an identity: withdraw it.
    Withdrawn(String),
}

/// The Workload API watcher of one identity group.
pub struct Watcher {
    /// The names of the routes sharing this identity, joined by `,`, for every log line.
    name: String,
    settings: Settings,
    source: SpiffeSource,
    identity: Arc<Identity>,
    outcomes: Arc<ReloadOutcomes>,
    /// `client_cert_expiry_timestamp_seconds` of every route sharing this identity.
    expiry_gauges: Vec<Gauge>,
    /// Digest of the update in force, so a repeated update publishes nothing.
    in_force: Option<[u8; 32]>,
}

impl Watcher {
    pub fn new(
        name: String,
        settings: Settings,
        source: SpiffeSource,
        identity: Arc<Identity>,
        outcomes: Arc<ReloadOutcomes>,
        expiry_gauges: Vec<Gauge>,
    ) -> Self {
        Watcher {
            name,
            settings,
            source,
            identity,
            outcomes,
            expiry_gauges,
            in_force: None,
        }
    }

    /// Stream, publish and reconnect until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        info!(route = %self.name, socket = %self.source.socket.display(), "{WAITING}");
        let mut backoff = BACKOFF_MIN;
        let mut in_outage = false;
        loop {
            let ended = tokio::select! {
                e = self.stream(&mut backoff, &mut in_outage) => e,
                _ = stop.cancelled() => return,
            };
            match ended {
                Ended::Withdrawn(why) => self.withdraw(why),
                Ended::Outage(why) if !in_outage => {
                    in_outage = true;
                    warn!(
                        route = %self.name, socket = %self.source.socket.display(), error = ?why,
                        "the Workload API is unreachable; keeping the current SVID while it is \
                         valid and reconnecting with backoff"
                    );
                }
                Ended::Outage(_) => {}
            }
            self.withdraw_if_expired();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream from connect to its end.
    async fn stream(&mut self, backoff: &mut Duration, in_outage: &mut bool) -> Ended {
        let endpoint = format!("unix:{}", self.source.socket.display());
        let client = match WorkloadApiClient::connect_to(&endpoint).await {
            Ok(c) => c,
            Err(e) => return ended(e),
        };
        let mut updates = match client.stream_x509_contexts().await {
            Ok(s) => s,
            Err(e) => return ended(e),
        };
        loop {
            // An API that stays connected but silent must not keep an expired SVID in force.
            let update = tokio::select! {
                u = updates.next() => u,
                () = until(self.expiry()) => {
                    self.withdraw_if_expired();
                    continue;
                }
            };
            let Some(update) = update else { break };
            if *in_outage {
                *in_outage = false;
                info!(route = %self.name, "the Workload API is reachable again");
            }
            *backoff = BACKOFF_MIN;
            match update {
                Ok(ctx) => self.apply(&snapshot(&ctx)),
                Err(e) if is_withdrawal(&e) => return Ended::Withdrawn(e.to_string()),
                Err(e @ WorkloadApiError::Transport(_)) => return Ended::Outage(e.to_string()),
                Err(e) => self.fail(format!("unusable Workload API update: {e}")),
            }
        }
        Ended::Outage("the Workload API closed the stream".into())
    }

    /// Build and publish one update, or count why not.
    fn apply(&mut self, snap: &Snapshot) {
        let digest = snap.digest();
        if self.in_force == Some(digest) {
            return;
        }
        match build::build(&self.settings, &self.source, snap) {
            Ok(loaded) => {
                if let Err(why) = loaded.leaf.check_validity(now_unix()) {
                    self.fail(format!(
                        "SVID {} is {why}; keeping the current identity",
                        loaded.spiffe_id.as_deref().unwrap_or("-")
                    ));
                    return;
                }
                self.in_force = Some(digest);
                self.publish(loaded);
            }
            Err(Unusable::NoSvid(why)) => self.withdraw(why),
            Err(Unusable::Bad(why)) => self.fail(why),
        }
    }

    fn publish(&self, loaded: Loaded) {
        let loaded = Arc::new(loaded);
        self.identity.publish(loaded.clone());
        for g in &self.expiry_gauges {
            g.set(loaded.leaf.not_after);
        }
        self.outcomes.record(None);
        let leaf = &loaded.leaf;
        info!(
            route = %self.name, spiffe_id = %loaded.spiffe_id.as_deref().unwrap_or("-"),
            subject = ?leaf.subject, serial = %leaf.serial, not_after = %rfc3339(leaf.not_after),
            "identity reloaded"
        );
    }

    /// Counted (and shown in `/status`) before the line is logged.
    fn fail(&self, msg: String) {
        self.outcomes.record(Some(msg.clone()));
        warn!(route = %self.name, error = ?msg, "identity reload failed; keeping the current identity");
    }

    /// No identity from now on: new connections wait, then fail with `no_identity`.
    fn withdraw(&mut self, why: String) {
        let reason = format!("no identity: the Workload API withdrew it ({why})");
        // Each retry hears the same answer: one line per withdrawal, not per retry.
        if self.identity.loaded().absent.as_ref() == Some(&reason) {
            return;
        }
        self.in_force = None;
        warn!(route = %self.name, error = ?why, "the Workload API withdrew the identity; refusing new connections until a new SVID");
        self.identity.publish(Arc::new(Loaded::absent(reason)));
    }

    /// When the SVID in force stops being valid (its not-after, plus a second); `None`
    /// while there is none.
    fn expiry(&self) -> Option<tokio::time::Instant> {
        let loaded = self.identity.loaded();
        if loaded.absent.is_some() {
            return None;
        }
        let left = u64::try_from(loaded.leaf.not_after - now_unix()).unwrap_or(0);
        Some(tokio::time::Instant::now() + Duration::from_secs(left.saturating_add(1)))
    }

    /// The last SVID serves only while valid (during an outage, or an API gone silent).
    fn withdraw_if_expired(&mut self) {
        let loaded = self.identity.loaded();
        if loaded.absent.is_none() && loaded.leaf.not_after < now_unix() {
            self.in_force = None;
            warn!(route = %self.name, "the SVID expired and the Workload API sent no new one; refusing new connections until a new SVID");
            self.identity.publish(Arc::new(Loaded::absent(
                "no identity: the SVID expired and the Workload API sent no new one",
            )));
        }
    }
}

/// PermissionDenied (SPIRE: "no identity issued"), or an update with no SVID at all.
fn is_withdrawal(e: &WorkloadApiError) -> bool {
    matches!(
        e,
        WorkloadApiError::NoIdentityIssued
            | WorkloadApiError::PermissionDenied(_)
            | WorkloadApiError::EmptyResponse
            | WorkloadApiError::MissingRequiredField {
                field: "X509SVIDResponse.svids"
            }
    )
}

fn ended(e: WorkloadApiError) -> Ended {
    if is_withdrawal(&e) {
        Ended::Withdrawn(e.to_string())
    } else {
        Ended::Outage(e.to_string())
    }
}

/// The crate's context as our own snapshot type.
fn snapshot(ctx: &X509Context) -> Snapshot {
    let der = |c: &spiffe::Certificate| CertificateDer::from(c.as_bytes().to_vec());
    Snapshot {
        svids: ctx
            .svids()
            .iter()
            .map(|s| Svid {
                id: s.spiffe_id().to_string(),
                chain: s.cert_chain().iter().map(der).collect(),
                key: s.private_key().as_bytes().to_vec().into(),
            })
            .collect(),
        bundles: ctx
            .bundle_set()
            .iter()
            .map(|(td, b)| {
                (
                    td.as_str().to_string(),
                    b.authorities().iter().map(der).collect(),
                )
            })
            .collect(),
    }
}

/// Sleeps until `at`; never returns without one.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
