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

/// At most this many of the upstream's acceptable-CA names are kept (for the error line and
/// `/status`); a hostile upstream's certificate request may carry thousands.
pub const MAX_CA_NAMES: usize = 16;
/// At most this many bytes of acceptable-CA names are kept.
pub const MAX_CA_TEXT: usize = 4096;

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
        /// The CA names (distinguished names, escaped) in the upstream's certificate request,
        /// capped by [`cap_names`].
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

/// The first names that fit [`MAX_CA_NAMES`] and [`MAX_CA_TEXT`] (a first name longer than
/// that is cut at a character boundary), then `and N more` for the rest.
pub fn cap_names(names: Vec<String>) -> Vec<String> {
    let total = names.len();
    let mut kept = Vec::new();
    let mut bytes = 0;
    for name in names.into_iter().take(MAX_CA_NAMES) {
        if bytes + name.len() > MAX_CA_TEXT {
            if kept.is_empty() {
                let mut end = MAX_CA_TEXT;
                while !name.is_char_boundary(end) {
                    end -= 1;
                }
                kept.push(format!("{}...", &name[..end]));
            }
            break;
        }
        bytes += name.len();
        kept.push(name);
    }
    let more = total - kept.len();
    if more > 0 {
        kept.push(format!("and {more} more"));
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, len: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:0len$}")).collect()
    }

    #[test]
    fn few_short_names_are_kept_whole() {
        assert_eq!(cap_names(names(3, 4)), names(3, 4));
        assert!(cap_names(Vec::new()).is_empty());
    }

    #[test]
    fn thousands_of_names_are_cut_to_sixteen() {
        let capped = cap_names(names(5000, 8));
        assert_eq!(capped.len(), MAX_CA_NAMES + 1);
        assert_eq!(capped[..MAX_CA_NAMES], names(MAX_CA_NAMES, 8)[..]);
        assert_eq!(capped[MAX_CA_NAMES], "and 4984 more");
    }

    #[test]
    fn long_names_are_cut_by_bytes() {
        let capped = cap_names(names(10, 1000));
        let kept: usize = capped[..4].iter().map(String::len).sum();
        assert_eq!(capped.len(), 5, "{capped:?}");
        assert!(kept <= MAX_CA_TEXT);
        assert_eq!(capped[4], "and 6 more");
    }

    #[test]
    fn one_huge_name_is_cut_at_a_char_boundary() {
        let huge = format!("a{}", "\u{e9}".repeat(3000));
        let capped = cap_names(vec![huge, "b".into()]);
        assert_eq!(capped.len(), 2, "{capped:?}");
        assert!(capped[0].len() <= MAX_CA_TEXT + 3);
        assert!(capped[0].ends_with("..."));
        assert_eq!(capped[1], "and 1 more");
    }
}
