//! Rotation without restarts. Every `--reload-interval` (and at once on SIGHUP) each route's
//! files are read and compared with what is in force BY CONTENT: Kubernetes updates a Secret by
//! swapping the `..data` symlink of the mounted folder, so a watcher keyed on file names or
//! inotify events on the files themselves never fires; reading through the paths sees both that
//! swap and an atomic rename.
//!
//! A reload is all or nothing (as linkerd's credential store does it): read every file, parse,
//! check the key belongs to the certificate and the certificate's validity period, build a
//! complete new client configuration (with a fresh session cache), and only then publish it.
//! On any failure the old identity stays, one warn line names the file and the problem, and the
//! failure is counted in [`ReloadOutcomes`]. All of this runs on the blocking pool, off the connection
//! path: connections only ever load the published `Arc`.
//!
//! With `--reload-canary`, a built identity whose certificate changed is first tried on the
//! upstream (see [`super::canary`]); one the upstream refuses is not published while the one in
//! force is valid, and nothing marks its content as seen, so every poll tries it again; a poll
//! also comes just after the kept identity expires (even under `--reload-interval 0`).

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::Settings;
use super::canary::{self, Canary, Verdict};
use super::cert::{now_unix, rfc3339};
use super::identity::{self, Identity, Loaded};
use super::load::Material;

/// How far ahead an expiring certificate (ours, a CA's, an intermediate's) is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the expiry warning (or error) repeats.
pub const EXPIRY_REPEAT: Duration = Duration::from_secs(24 * 3600);
/// Without periodic reloads, how often the expiry is still looked at.
const EXPIRY_CHECK: Duration = Duration::from_secs(3600);
/// How often the same canary refusal is logged as an error (it is retried at every poll).
const CANARY_REPEAT: Duration = Duration::from_secs(600);

/// Reload outcomes of every route, in one place: the counters are the `reloads_total` series,
/// and `/status` shows the last one.
#[derive(Debug)]
pub struct ReloadOutcomes {
    /// Reloads that published new material (`reloads_total{result="success"}`).
    pub successes: Counter,
    /// Reloads that kept the old identity (`reloads_total{result="failure"}`).
    pub failures: Counter,
    /// New identities the upstream refused at the canary dial
    /// (`reloads_total{result="rejected_by_upstream"}`).
    pub rejected: Counter,
    /// The latest of either, for `/status`.
    pub last: Mutex<Option<LastReload>>,
}

/// The most recent reload attempt that did something.
#[derive(Debug, Clone)]
pub struct LastReload {
    pub at: SystemTime,
    /// `None` on success; the warn line's message on failure.
    pub error: Option<String>,
}

impl ReloadOutcomes {
    pub fn new(successes: Counter, failures: Counter) -> Self {
        ReloadOutcomes {
            successes,
            failures,
            rejected: Counter::default(),
            last: Mutex::new(None),
        }
    }

    /// Count canary refusals in `rejected` (the `reloads_total` series of that result).
    pub fn with_rejected(mut self, rejected: Counter) -> Self {
        self.rejected = rejected;
        self
    }

    /// Count one canary refusal and keep it (as the last reload's error) for `/status`.
    pub fn record_rejected(&self, error: String) {
        self.rejected.inc();
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastReload {
                at: SystemTime::now(),
                error: Some(error),
            });
        }
    }

    /// Count one reload attempt (`None` = published) and keep it for `/status`.
    pub fn record(&self, error: Option<String>) {
        let counter = if error.is_some() {
            &self.failures
        } else {
            &self.successes
        };
        counter.inc();
        if let Ok(mut last) = self.last.lock() {
            *last = Some(LastReload {
                at: SystemTime::now(),
                error,
            });
        }
    }
}

/// The reload loop of one route's identity.
pub struct Reloader {
    /// The names of the routes sharing this identity, joined by `,`, for every log line.
    name: String,
    /// What the identity is built from: the files polled and the settings of every rebuild.
    settings: Settings,
    /// Where a successful reload is published, and the leaf in force for the expiry warning.
    identity: Arc<Identity>,
    /// Where every attempt's outcome is counted, for `/metrics` and `/status`.
    outcomes: Arc<ReloadOutcomes>,
    /// `client_cert_expiry_timestamp_seconds` of every route sharing this identity.
    expiry_gauges: Vec<Gauge>,
    /// Digest of the files in force.
    in_force: [u8; 32],
    /// Content (or read error) already reported as broken: not reported again until it changes.
    reported_broken: Option<Result<[u8; 32], String>>,
    /// Content whose certificate and key did not match at the last poll: a writer may be
    /// between its two steps. A second poll that sees the same content makes it a failure.
    key_mismatch_seen: Option<[u8; 32]>,
    /// When the expiry warning was last logged, and for which serial.
    expiry_logged: Option<(Instant, String)>,
    /// Each CRL in force with its nextUpdate, for the stale-CRL warning.
    crl_next_updates: Vec<(std::path::PathBuf, i64)>,
    /// When the stale-CRL warning was last logged; `None` after new CRLs are published, so
    /// it comes at once.
    crl_logged: Option<Instant>,
    /// `--reload-canary`: tries a changed certificate on the upstream before it is published.
    canary: Option<Box<dyn Canary>>,
    /// The content last refused by the upstream, and when that error was logged: the same
    /// refusal is logged as an error again only after [`CANARY_REPEAT`] (it is retried, and
    /// counted, at every poll).
    canary_logged: Option<([u8; 32], Instant)>,
    /// While a refused candidate waits: the not_after (Unix seconds) of the identity kept in
    /// force. The loop polls just after it even without periodic reloads, so the waiting
    /// identity is published once the kept one expires.
    canary_pending: Option<i64>,
}

impl Reloader {
    pub fn new(
        name: String,
        settings: Settings,
        identity: Arc<Identity>,
        outcomes: Arc<ReloadOutcomes>,
        expiry_gauges: Vec<Gauge>,
        loaded: &Loaded,
    ) -> Self {
        let r = Reloader {
            name,
            settings,
            identity,
            outcomes,
            expiry_gauges,
            in_force: loaded.digest,
            reported_broken: None,
            key_mismatch_seen: None,
            expiry_logged: None,
            crl_next_updates: loaded.crl_next_updates.clone(),
            crl_logged: None,
            canary: None,
            canary_logged: None,
            canary_pending: None,
        };
        r.warn_loose_permissions(loaded);
        r
    }

    /// Try every changed certificate on the upstream before publishing it (`--reload-canary`).
    pub fn with_canary(mut self, canary: Box<dyn Canary>) -> Self {
        self.canary = Some(canary);
        self
    }

    /// Warn about secret files others can read: once per content in force (at startup and
    /// after each reload that publishes new content), like the other reload warnings.
    fn warn_loose_permissions(&self, loaded: &Loaded) {
        for (flag, path, mode) in &loaded.loose_permissions {
            warn!(
                route = %self.name, flag = %flag, file = %path.display(),
                mode = %format!("{mode:04o}"),
                "secret file is readable by group or others; chmod 600 it"
            );
        }
    }

    /// Warn (daily, and at once for newly loaded CRLs) when a CRL in force is past its
    /// nextUpdate: revocations issued since are not known. webpki still uses it, as nginx and
    /// HAProxy do; the warning is the operator's cue to refresh it.
    fn check_crls(&mut self) {
        let now = now_unix();
        let stale: Vec<_> = self
            .crl_next_updates
            .iter()
            .filter(|(_, next)| *next < now)
            .collect();
        if stale.is_empty() {
            return;
        }
        if let Some(at) = self.crl_logged
            && at.elapsed() < EXPIRY_REPEAT
        {
            return;
        }
        self.crl_logged = Some(Instant::now());
        for (path, next) in stale {
            warn!(
                route = %self.name, file = %path.display(), next_update = %rfc3339(*next),
                "crl is past its nextUpdate (stale); refresh it: revocations since are unknown"
            );
        }
    }

    /// Poll until `stop`; `hup` ticks on every SIGHUP.
    pub async fn run(mut self, mut hup: watch::Receiver<u64>, stop: CancellationToken) {
        let period = self.settings.reload_interval.unwrap_or(EXPIRY_CHECK);
        let mut hup_open = true;
        self.check_expiry();
        self.check_crls();
        loop {
            // Taken: a poll that is refused again sets it anew.
            let pending = self.canary_pending.take();
            let wait = pending.map_or(period, |not_after| period.min(until_after(not_after)));
            let forced = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                r = hup.changed(), if hup_open => {
                    hup_open = r.is_ok();
                    hup_open
                }
                _ = stop.cancelled() => return,
            };
            if forced || self.settings.reload_interval.is_some() || pending.is_some() {
                self.poll(forced).await;
            }
            self.check_expiry();
            self.check_crls();
        }
    }

    /// Every file as it is now, or why they cannot be read (the warn line's message).
    async fn read(&self) -> Result<Box<Material>, String> {
        let files = self.settings.files.clone();
        let read = tokio::task::spawn_blocking(move || Material::read(&files)).await;
        match read {
            Ok(Ok(m)) => Ok(Box::new(m)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("reload task failed: {e}")),
        }
    }

    /// One reload attempt. Unchanged content does nothing unless `forced` (SIGHUP).
    pub async fn poll(&mut self, forced: bool) {
        let material = match self.read().await {
            Err(msg) => {
                let key = Err(msg.clone());
                if forced || self.reported_broken.as_ref() != Some(&key) {
                    self.fail(msg);
                    self.reported_broken = Some(key);
                }
                return;
            }
            Ok(m) => m,
        };
        let digest = material.digest();
        let recheck = self.key_mismatch_seen == Some(digest);
        if !forced
            && !recheck
            && (digest == self.in_force || self.reported_broken == Some(Ok(digest)))
        {
            return;
        }
        // systemd (Type=notify-reload) hears of every attempt, successful or not.
        crate::notify::reloading();
        self.attempt(material, digest, forced, recheck).await;
        crate::notify::ready();
    }

    /// Build from `material` and publish it, or report why not.
    async fn attempt(
        &mut self,
        material: Box<Material>,
        digest: [u8; 32],
        forced: bool,
        recheck: bool,
    ) {
        let settings = self.settings.clone();
        let built =
            tokio::task::spawn_blocking(move || identity::build_from(&settings, &material)).await;
        let result = match built {
            Ok(r) => r.map_err(|e| {
                (
                    e.to_string(),
                    matches!(&e, identity::Error::Load(l) if l.is_key_mismatch()),
                )
            }),
            Err(e) => Err((format!("reload task failed: {e}"), false)),
        };
        match result {
            Ok(loaded) => {
                if let Err(why) = loaded.leaf.check_validity(now_unix()) {
                    self.key_mismatch_seen = None;
                    self.fail(format!(
                        "{}: the new certificate is {why}; keeping the current one",
                        self.settings.files.identity.main_file().display()
                    ));
                    self.reported_broken = Some(Ok(digest));
                    return;
                }
                let loaded = Arc::new(loaded);
                if !self.canary_allows(&loaded, digest).await {
                    self.key_mismatch_seen = None;
                    return;
                }
                self.identity.publish(loaded.clone());
                self.crl_next_updates = loaded.crl_next_updates.clone();
                self.crl_logged = None;
                for g in &self.expiry_gauges {
                    g.set(loaded.leaf.not_after);
                }
                self.in_force = digest;
                self.reported_broken = None;
                self.key_mismatch_seen = None;
                self.outcomes.record(None);
                let leaf = &loaded.leaf;
                info!(
                    route = %self.name, subject = ?leaf.subject, serial = %leaf.serial,
                    not_after = %rfc3339(leaf.not_after), "identity reloaded"
                );
                self.warn_loose_permissions(&loaded);
                self.check_crls();
            }
            // The first sighting of a mismatch may be a writer between its two steps: look
            // again at the next poll before calling it a failure.
            Err((msg, true)) if !forced && !recheck && self.settings.reload_interval.is_some() => {
                debug!(
                    route = %self.name, error = ?msg,
                    "certificate and key do not match yet; checking again at the next poll"
                );
                self.key_mismatch_seen = Some(digest);
            }
            Err((msg, _)) => {
                self.key_mismatch_seen = None;
                self.fail(msg);
                self.reported_broken = Some(Ok(digest));
            }
        }
    }

    /// `--reload-canary`: whether `loaded` may be published. Only a changed certificate is
    /// tried; `false` only when the upstream refused it and the identity in force is still
    /// valid. Nothing marks the content as seen then, so the next poll tries it again.
    async fn canary_allows(&mut self, loaded: &Loaded, digest: [u8; 32]) -> bool {
        let Some(canary) = &self.canary else {
            return true;
        };
        let old = self.identity.loaded();
        if !canary::identity_changed(&old, loaded) {
            return true;
        }
        let new_serial = &loaded.leaf.serial;
        let old_valid = old.absent.is_none() && old.leaf.check_validity(now_unix()).is_ok();
        match canary.try_identity(loaded.config.clone()).await {
            Verdict::Accepted => {
                info!(route = %self.name, serial = %new_serial, "reload canary: the upstream accepted the new client certificate");
                true
            }
            Verdict::Inconclusive { route, why } => {
                warn!(
                    route = %self.name, canary_route = %route, serial = %new_serial, why = ?why,
                    "reload canary could not judge the new client certificate; publishing it"
                );
                true
            }
            Verdict::Rejected { route, alert, .. } if !old_valid => {
                warn!(
                    route = %self.name, canary_route = %route, alert = %alert, serial = %new_serial,
                    "the upstream refused the new client certificate, but the one in force is \
                     no longer valid; publishing the new one anyway"
                );
                true
            }
            Verdict::Rejected {
                route,
                alert,
                accepted_cas,
            } => {
                self.canary_pending = Some(old.leaf.not_after);
                self.canary_refused(&route, &alert, &accepted_cas, loaded, digest);
                false
            }
        }
    }

    /// The upstream refused the new certificate: counted, shown in `/status`, and logged as an
    /// error (again after [`CANARY_REPEAT`] while the refusal lasts).
    fn canary_refused(
        &mut self,
        route: &str,
        alert: &str,
        accepted_cas: &[String],
        loaded: &Loaded,
        digest: [u8; 32],
    ) {
        let accepts = match accepted_cas {
            [] => "(the upstream named none)".to_string(),
            names => names.join("; "),
        };
        let msg = format!(
            "the upstream of route {route} refused the new client certificate (serial {}, \
             issuer {:?}) with alert {alert}; it accepts certificates from: {accepts}; keeping \
             the current one and trying again at the next poll",
            loaded.leaf.serial, loaded.leaf.issuer
        );
        self.outcomes.record_rejected(msg);
        let repeat = matches!(self.canary_logged, Some((d, at)) if d == digest && at.elapsed() < CANARY_REPEAT);
        if repeat {
            debug!(route = %self.name, canary_route = %route, alert = %alert, "reload canary: still refused");
            return;
        }
        self.canary_logged = Some((digest, Instant::now()));
        error!(
            route = %self.name, canary_route = %route, alert = %alert,
            accepted_cas = ?accepts, serial = %loaded.leaf.serial, issuer = ?loaded.leaf.issuer,
            "the upstream refused the new client certificate (reload canary); keeping the \
             current identity and trying again at the next poll"
        );
    }

    /// Counted (and shown in `/status`) before the line is logged, so whoever reads the line
    /// finds the outcome already recorded.
    fn fail(&self, msg: String) {
        self.outcomes.record(Some(msg.clone()));
        warn!(route = %self.name, error = ?msg, "identity reload failed; keeping the current identity");
    }

    /// Warn (daily) when the certificate in force expires within 7 days; error once expired or
    /// not yet valid.
    fn check_expiry(&mut self) {
        let leaf = self.identity.leaf();
        let now = now_unix();
        let left = leaf.not_after - now;
        let problem = leaf.check_validity(now).is_err();
        if !problem && left > EXPIRY_WARNING.as_secs() as i64 {
            return;
        }
        if let Some((at, serial)) = &self.expiry_logged
            && *serial == leaf.serial
            && at.elapsed() < EXPIRY_REPEAT
        {
            return;
        }
        self.expiry_logged = Some((Instant::now(), leaf.serial.clone()));
        let file = self
            .settings
            .files
            .identity
            .main_file()
            .display()
            .to_string();
        let inbound = self.settings.inbound.is_some();
        match leaf.check_validity(now) {
            Err(why) if inbound => error!(
                route = %self.name, file = %file, subject = ?leaf.subject, problem = ?why,
                "server certificate is outside its validity period (expired or not yet valid); \
                 clients will refuse it"
            ),
            Ok(()) if inbound => warn!(
                route = %self.name, file = %file, subject = ?leaf.subject,
                not_after = %rfc3339(leaf.not_after), hours_left = left / 3600,
                "server certificate expires soon"
            ),
            _ => {}
        }
        if inbound {
            return;
        }
        if let Err(why) = leaf.check_validity(now) {
            error!(
                route = %self.name, file = %file, subject = ?leaf.subject, problem = ?why,
                "client certificate is outside its validity period (expired or not yet valid); \
                 the upstream will likely refuse it"
            );
        } else {
            warn!(
                route = %self.name, file = %file, subject = ?leaf.subject,
                not_after = %rfc3339(leaf.not_after), hours_left = left / 3600,
                "client certificate expires soon"
            );
        }
    }
}

/// How long until just after `not_after` (Unix seconds): at least a second, so a clock that
/// disagrees with the certificate cannot spin the loop.
fn until_after(not_after: i64) -> Duration {
    let secs = not_after
        .saturating_add(1)
        .saturating_sub(now_unix())
        .max(1);
    Duration::from_secs(secs as u64)
}
