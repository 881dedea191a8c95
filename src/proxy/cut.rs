//! [`CutWait`]: wait for a shared [`CancellationToken`] (the drain cut) next to a relay without
//! locking the token's shared mutexes on every wake-up of the connection.
//!
//! `select!`ing on `token.cancelled()` polls it whenever the task wakes, and each such poll
//! locks two mutexes that every connection of the process shares (the token's state, then its
//! waiter list): for a keep-alive relay that is two lock/unlocks per request, contended across
//! the worker threads. Here the token's future is polled with a waker of our own, which sets a
//! flag and wakes the task; in between, a poll costs one atomic load and a `will_wake`
//! comparison. The token's future is polled again only once the flag says it woke, or when the
//! task's waker changed, so no cancellation is missed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// What the token's future wakes: a flag, and the task waiting on it.
#[derive(Default)]
struct Signal {
    /// Set when the token's future woke us; cleared before it is polled again.
    fired: AtomicBool,
    /// The task to wake; replaced when the task's waker changes (rare).
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

/// A future that resolves when `wait` (a token's `cancelled()`) does, polling `wait` only
/// when it woke or the task's waker changed.
pub struct CutWait<F> {
    /// The token's future.
    wait: Pin<Box<F>>,
    /// What `wait` wakes.
    signal: Arc<Signal>,
    /// `signal` as a waker, the one `wait` is always polled with.
    waker: Waker,
    /// The task waker last stored in `signal`; `None` before the first poll.
    task: Option<Waker>,
}

impl<F: Future<Output = ()>> CutWait<F> {
    pub fn new(wait: F) -> Self {
        let signal = Arc::new(Signal::default());
        CutWait {
            wait: Box::pin(wait),
            waker: Waker::from(signal.clone()),
            signal,
            task: None,
        }
    }
}

impl<F: Future<Output = ()>> Future for CutWait<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let first = this.task.is_none();
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            // Stored before `fired` is read: a wake-up after this reaches the new waker.
            let mut task = this
                .signal
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            *task = Some(cx.waker().clone());
            this.task = task.clone();
        }
        if !first && !this.signal.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.wait
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::CutWait;

    /// A cut before the first poll, and one while waiting, both end the wait; nothing else does.
    #[tokio::test]
    async fn resolves_on_cancel_only() {
        let token = CancellationToken::new();
        let mut wait = std::pin::pin!(CutWait::new(token.cancelled()));
        let early = tokio::time::timeout(Duration::from_millis(50), wait.as_mut()).await;
        assert!(early.is_err(), "resolved before the cut");
        // Polled again (as select! does on every wake-up) without a cut: still waiting.
        let again = tokio::time::timeout(Duration::from_millis(20), wait.as_mut()).await;
        assert!(again.is_err(), "resolved before the cut");
        let t = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.cancel();
        });
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the cut was missed");

        let cancelled = CancellationToken::new();
        cancelled.cancel();
        tokio::time::timeout(Duration::from_secs(10), CutWait::new(cancelled.cancelled()))
            .await
            .expect("an earlier cut was missed");
    }
}
