//! `--reload-canary`: before a reload publishes a new client certificate, the upstream is dialled
//! once with it. This file is the reloader's side of it: what a canary answers ([`Verdict`]) and
//! when one is asked for ([`identity_changed`]). The dial itself lives above `tls` (in
//! `check::canary`, the real dial path with the recorders `check` uses), behind [`Canary`], so
//! `tls` stays below `upstream` and `check`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rustls::ClientConfig;

use super::identity::Loaded;

/// What the upstream made of a candidate identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The handshake completed and the upstream kept the connection: publish.
    Accepted,
    /// The upstream refused our certificate with an alert: keep the old identity (while valid).
    Rejected {
        /// The route whose upstream refused it.
        route: String,
        /// The alert, as rustls names it (`UnknownCA`, `BadCertificate`, ...).
        alert: String,
        /// The CA names (distinguished names, escaped) in the upstream's certificate request.
        accepted_cas: Vec<String>,
    },
    /// The upstream could not be reached (DNS, connect, proxy, timeout), or the dial failed for
    /// a reason that is not about our certificate: publish (a canary never blocks a rotation
    /// during an outage).
    Inconclusive {
        /// The route dialled.
        route: String,
        /// What happened, in plain words (peer text escaped).
        why: String,
    },
}

/// A future a canary dial returns.
pub type Dialling<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// Dials the upstream(s) of the routes sharing an identity with a candidate client
/// configuration. Implemented by `check::canary`.
pub trait Canary: Send + Sync {
    /// One dial per route (bounded by its `--connect-timeout`, plus the short wait for a TLS 1.3
    /// verdict): the first refusal, else the first inconclusive dial, else `Accepted`.
    fn try_identity(&self, config: Arc<ClientConfig>) -> Dialling<'_>;
}

/// Whether `new` presents another certificate chain than `old` (a CA- or CRL-only change does
/// not). The key need not be compared: it matches the leaf, so a new key comes with a new leaf.
pub fn identity_changed(old: &Loaded, new: &Loaded) -> bool {
    let chain = |l: &Loaded| {
        if l.absent.is_some() {
            return None;
        }
        l.config
            .client_auth_cert_resolver
            .resolve(&[], &[])
            .map(|c| c.cert.clone())
    };
    chain(old) != chain(new)
}
