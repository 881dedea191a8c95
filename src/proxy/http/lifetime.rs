//! `--pool-max-lifetime`: pooled connections older than this take no new requests and close
//! once idle, so a changed DNS answer or a new backend behind the name is picked up.
//!
//! hyper-util's pool has no such bound, and the one hook it offers for a single connection
//! (`Connected::poison`) is reachable only through a per-request `capture_connection`. So the
//! bound is kept per pool instead, the way a reload already retires one: every pool (the
//! shared one, each h2 lane, the inbound target pool) has an [`Expiry`], and when it passes the
//! pool is replaced by a fresh one. Dropping the old pool closes its idle connections at once;
//! a busy one finishes its request (HTTP/1.1) or its open streams (h2: hyper sends GOAWAY once
//! the pool's last handle is gone) and is then closed, as it can no longer go back to a pool.
//! New requests dial anew, resolving the name again.
//!
//! No connection is ever used past the lifetime (it is never older than its pool); one dialled
//! late in a pool's life is retired early. Each pool's deadline is moved earlier by up to a
//! tenth of the lifetime, at random, so the pools of one route (and of a burst of h2 app
//! connections) do not all expire in the same instant. One timer task per pool does it; a
//! request pays one relaxed atomic load.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};

/// The most a pool's deadline is moved earlier, as a fraction of the lifetime (1/10).
const JITTER_DIVISOR: u32 = 10;

/// A pool's end of life.
pub(super) struct Expiry {
    /// Set once the pool's lifetime has passed: it takes no new requests.
    passed: Arc<AtomicBool>,
    /// Ends the timer when the pool is dropped first.
    _timer: Option<DropGuard>,
}

impl Expiry {
    /// A pool's expiry `max` from now (less the jitter): at the deadline `passed` is set and
    /// `retire` is called (it replaces or drops the pool). `None` = never.
    pub(super) fn start(max: Option<Duration>, retire: Box<dyn FnOnce() + Send>) -> Expiry {
        let passed = Arc::new(AtomicBool::new(false));
        let Some(max) = max else {
            return Expiry {
                passed,
                _timer: None,
            };
        };
        let deadline = tokio::time::Instant::now() + max - jitter(max);
        let dropped = CancellationToken::new();
        let (flag, done) = (passed.clone(), dropped.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    flag.store(true, Ordering::Relaxed);
                    retire();
                }
                () = done.cancelled() => {}
            }
        });
        Expiry {
            passed,
            _timer: Some(dropped.drop_guard()),
        }
    }

    /// The pool's lifetime has passed: build a new one for the next request.
    pub(super) fn passed(&self) -> bool {
        self.passed.load(Ordering::Relaxed)
    }
}

/// Up to a tenth of `max`, at random.
fn jitter(max: Duration) -> Duration {
    let spread = max / JITTER_DIVISOR;
    let nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    // std's random hash keys (fresh for each `RandomState`): no dependency for a jitter.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    Duration::from_nanos(h.finish() % nanos)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn jitter_stays_within_a_tenth_and_varies() {
        let max = Duration::from_secs(600);
        let draws: Vec<_> = (0..200).map(|_| jitter(max)).collect();
        assert!(draws.iter().all(|j| *j < Duration::from_secs(60)));
        assert!(draws.iter().any(|j| *j != draws[0]), "no spread");
        assert_eq!(jitter(Duration::from_nanos(5)), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_pool_expires_within_its_lifetime_and_is_retired_once() {
        let retired = Arc::new(AtomicUsize::new(0));
        let r = retired.clone();
        let e = Expiry::start(
            Some(Duration::from_millis(1000)),
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        tokio::time::sleep(Duration::from_millis(850)).await;
        assert!(!e.passed());
        assert_eq!(retired.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(e.passed());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(retired.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_pool_is_not_retired_and_forever_never_expires() {
        let retired = Arc::new(AtomicBool::new(false));
        let r = retired.clone();
        let e = Expiry::start(
            Some(Duration::from_millis(100)),
            Box::new(move || r.store(true, Ordering::SeqCst)),
        );
        drop(e);
        let forever = Expiry::start(None, Box::new(|| panic!("never")));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!retired.load(Ordering::SeqCst));
        assert!(!forever.passed());
    }
}
