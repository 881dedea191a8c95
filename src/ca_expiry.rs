//! CA expiry: keeps `ca_cert_expiry_timestamp_seconds` equal to the earliest not-after among
//! each route's trusted CAs, and logs the daily expiry warnings for CA certificates (in `--ca`
//! or a SPIFFE trust bundle) and for the intermediates of our own chain, as `tls::reload` does
//! for our own certificate. One task per shared identity follows every publish (file reloads
//! and Workload API updates alike), so nothing on the reload paths has to know about it.
//! `/readyz` never reads any of this: CA expiry is a warning, not a local fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::proxy::RouteCtx;
use crate::tls::cert::{now_unix, rfc3339};
use crate::tls::identity::{Identity, Loaded};
use crate::tls::reload::{EXPIRY_REPEAT, EXPIRY_WARNING};
use crate::tls::trust::Described;

/// Without a publish, how often the expiry is looked at again.
const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// Start one follower per shared identity; each stops with `stop`.
pub fn spawn_all(routes: &[Arc<RouteCtx>], stop: &CancellationToken) {
    let mut groups: Vec<Vec<Arc<RouteCtx>>> = Vec::new();
    for r in routes {
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g[0].identity, &r.identity))
        {
            Some(g) => g.push(r.clone()),
            None => groups.push(vec![r.clone()]),
        }
    }
    for g in groups {
        tokio::spawn(Follower::new(g).run(stop.clone()));
    }
}

/// Follows one identity shared by `routes`.
struct Follower {
    /// The routes sharing the identity: each has its own gauge.
    routes: Vec<Arc<RouteCtx>>,
    /// Their names joined by `,`, as the reload lines name them.
    name: String,
    /// When the warnings were last logged, and for which certificates (fingerprints): a new
    /// set is logged at once, the same set once a day.
    logged: Option<(Instant, Vec<String>)>,
}

impl Follower {
    fn new(routes: Vec<Arc<RouteCtx>>) -> Self {
        let name = routes
            .iter()
            .map(|r| r.route.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Follower {
            routes,
            name,
            logged: None,
        }
    }

    fn identity(&self) -> &Arc<Identity> {
        &self.routes[0].identity
    }

    async fn run(mut self, stop: CancellationToken) {
        let mut ticks = self.identity().subscribe();
        loop {
            let loaded = self.identity().loaded();
            self.apply(&loaded);
            tokio::select! {
                changed = ticks.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(CHECK_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Set the gauges from `loaded` and warn about what expires soon. An absent identity
    /// (a `--spiffe` route waiting or withdrawn) changes nothing: the last bundle's value stays.
    fn apply(&mut self, loaded: &Loaded) {
        if loaded.absent.is_some() {
            return;
        }
        let earliest = loaded.trust.earliest_ca_expiry();
        for r in &self.routes {
            r.metrics.set_ca_expiry(earliest);
        }
        self.warn(loaded, now_unix());
    }

    fn warn(&mut self, loaded: &Loaded, now: i64) {
        let window = EXPIRY_WARNING.as_secs() as i64;
        let soon = |d: &&Described| d.info.not_after - now <= window;
        let cas: Vec<&Described> = loaded
            .trust
            .bundle
            .iter()
            .flat_map(|b| b.cas.iter())
            .filter(soon)
            .collect();
        let ours: Vec<&Described> = loaded.trust.intermediates.iter().filter(soon).collect();
        let mut key: Vec<String> = cas
            .iter()
            .chain(&ours)
            .map(|d| d.info.sha256_fingerprint.clone())
            .collect();
        key.sort();
        if key.is_empty() {
            self.logged = None;
            return;
        }
        if let Some((at, logged)) = &self.logged
            && *logged == key
            && at.elapsed() < EXPIRY_REPEAT
        {
            return;
        }
        self.logged = Some((Instant::now(), key));
        for d in cas {
            self.line(d, now, "ca");
        }
        for d in ours {
            self.line(d, now, "intermediate");
        }
    }

    /// One warning (or, once expired, error) line naming the file, the subject and the date.
    fn line(&self, d: &Described, now: i64, kind: &str) {
        let (file, subject) = (&d.origin, &d.info.subject);
        let not_after = rfc3339(d.info.not_after);
        match (kind, d.info.not_after < now) {
            ("ca", true) => error!(
                route = %self.name, file = %file, subject = ?subject, not_after = %not_after,
                "ca certificate has expired; peers whose chains lead only to it are refused"
            ),
            ("ca", false) => warn!(
                route = %self.name, file = %file, subject = ?subject, not_after = %not_after,
                hours_left = (d.info.not_after - now) / 3600,
                "ca certificate expires soon"
            ),
            (_, true) => error!(
                route = %self.name, file = %file, subject = ?subject, not_after = %not_after,
                "intermediate certificate of our chain has expired; peers will likely refuse \
                 our certificate"
            ),
            _ => warn!(
                route = %self.name, file = %file, subject = ?subject, not_after = %not_after,
                hours_left = (d.info.not_after - now) / 3600,
                "intermediate certificate of our chain expires soon"
            ),
        }
    }
}
