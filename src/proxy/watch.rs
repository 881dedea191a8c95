//! HTTP mode's clock on one app connection: how long it may take to send a request head, how
//! long it may sit idle between requests, how long an open request may stay silent.
//!
//! hyper's own HTTP/1.1 header timeout starts only once the auto builder has decided on a
//! protocol (a silent connection never gets that far), h2 has no header timeout at all, and the
//! HTTP/1.1 one also runs between keep-alive requests, so it would close idle connections after
//! `--header-timeout` instead of `--idle-timeout`. One watch per connection, fed by the socket
//! wrapper [`Watched`] and by the service (request start and end), replaces them all.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::Version;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Why the watch wants the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete request head within `--header-timeout` (from accept, or for HTTP/1.1 from
    /// the first byte of a later request).
    Header,
    /// No request open for `--idle-timeout`.
    Idle,
    /// Requests open, but not a byte either way for `--idle-timeout`: a stalled request body,
    /// a stalled reader, or an upgraded tunnel nobody uses.
    Stalled,
}

impl Expired {
    /// The `end=` value of the connection's log line.
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::Header => "header_timeout",
            Expired::Idle => "idle_timeout",
            Expired::Stalled => "stalled",
        }
    }
}

/// The connection's timers, shared by the socket wrapper, the service and the serving task.
#[derive(Debug)]
pub struct ConnWatch {
    header_timeout: Duration,
    /// `None`: no idle or stall bound (`--idle-timeout 0` given explicitly; left out, HTTP mode
    /// gets its 300 s default when the config is built).
    idle_timeout: Option<Duration>,
    state: Mutex<State>,
    /// Woken when a deadline moved earlier (a head clock started), so the serving task
    /// re-reads [`ConnWatch::deadline`] instead of sleeping to the old one.
    earlier: Notify,
}

#[derive(Debug)]
struct State {
    /// Last byte read from or written to the app.
    last_io: Instant,
    /// Requests whose response has not been fully sent, plus an upgraded tunnel.
    in_flight: usize,
    /// Since when no request has been open (meaningful while `in_flight == 0`).
    idle_since: Instant,
    /// When the head now awaited started: accept for the first request; for HTTP/1.1, the first
    /// byte read while no request was open. `None` while nothing is awaited.
    head_since: Option<Instant>,
    /// The connection speaks HTTP/1.x (known from its first request). Only there does a byte
    /// between requests start a head; an h2 app sends PINGs and SETTINGS when idle.
    h1: bool,
}

impl ConnWatch {
    pub fn new(header_timeout: Duration, idle_timeout: Option<Duration>) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(ConnWatch {
            header_timeout,
            idle_timeout,
            state: Mutex::new(State {
                last_io: now,
                in_flight: 0,
                idle_since: now,
                head_since: Some(now),
                h1: false,
            }),
            earlier: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain
        // assignments), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io(&self, read: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        s.last_io = now;
        if read && s.h1 && s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(now);
            drop(s);
            self.earlier.notify_one();
        }
    }

    /// Resolves when a deadline moved earlier than the last [`ConnWatch::deadline`] said.
    pub async fn moved_earlier(&self) {
        self.earlier.notified().await
    }

    /// A request head is complete: the head clock stops and the request counts as open until
    /// the returned guard is dropped (its response body ended or was abandoned).
    pub fn request(self: &Arc<Self>, version: Version) -> InFlight {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_since = None;
        s.h1 = version != Version::HTTP_2;
        drop(s);
        InFlight(self.clone())
    }

    /// An upgraded tunnel is open; it counts as an open request until the guard is dropped.
    pub fn tunnel(self: &Arc<Self>) -> InFlight {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_since = None;
        drop(s);
        InFlight(self.clone())
    }

    /// When the connection must be closed if nothing happens before: the earliest deadline
    /// in force, or `Err` with the one that has passed.
    pub fn deadline(&self, now: Instant) -> Result<Option<Instant>, Expired> {
        let s = self.lock();
        let mut next: Option<Instant> = None;
        let mut check = |at: Instant, why: Expired| {
            if at <= now {
                return Err(why);
            }
            next = Some(next.map_or(at, |n| n.min(at)));
            Ok(())
        };
        if let Some(since) = s.head_since {
            check(since + self.header_timeout, Expired::Header)?;
        }
        if let Some(idle) = self.idle_timeout {
            if s.in_flight == 0 {
                check(s.idle_since + idle, Expired::Idle)?;
            } else {
                check(s.last_io + idle, Expired::Stalled)?;
            }
        }
        Ok(next)
    }
}

/// One open request or tunnel; dropping it closes it in the watch's books.
#[derive(Debug)]
pub struct InFlight(Arc<ConnWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
        }
    }
}

/// The app's socket, telling the watch about every byte read or written.
pub struct Watched<I> {
    inner: I,
    watch: Arc<ConnWatch>,
}

impl<I> Watched<I> {
    pub fn new(inner: I, watch: Arc<ConnWatch>) -> Self {
        Watched { inner, watch }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.io(true);
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.io(false);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.watch.io(false);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn next(w: &ConnWatch) -> Duration {
        let now = Instant::now();
        match w.deadline(now) {
            Ok(Some(at)) => at - now,
            other => panic!("expected a deadline, got {other:?}"),
        }
    }

    #[test]
    fn head_then_stall_then_idle_then_h1_head_again() {
        let w = ConnWatch::new(S, Some(5 * S));
        assert!(next(&w) <= S);
        assert_eq!(w.deadline(Instant::now() + S), Err(Expired::Header));
        let req = w.request(Version::HTTP_11);
        // Open request: only the stall bound.
        assert!(next(&w) > 4 * S);
        assert_eq!(w.deadline(Instant::now() + 5 * S), Err(Expired::Stalled));
        drop(req);
        assert!(next(&w) > 4 * S);
        assert_eq!(w.deadline(Instant::now() + 5 * S), Err(Expired::Idle));
        // A byte of the next HTTP/1.1 request starts its head clock.
        w.io(true);
        assert!(next(&w) <= S);
    }

    #[test]
    fn h2_bytes_between_requests_start_no_head_clock() {
        let w = ConnWatch::new(S, Some(5 * S));
        drop(w.request(Version::HTTP_2));
        w.io(true);
        assert!(next(&w) > 4 * S);
    }
}
