//! Byte-stream mode: copy both ways between the app's plaintext socket and the upstream TLS
//! stream, with half-close in both directions.
//!
//! Memory matters here (one relay per connection, thousands idle), and so do syscalls. Both
//! directions copy through one [`READ_CHUNK`] (32 KiB) scratch buffer per worker thread, used
//! only inside a single `poll` (never across an await), so an idle relay holds no buffer at
//! all. Only bytes that the receiving side could not take at once are kept per connection, in
//! `pending`, and no more is read from that side until they are gone. Before reading a side,
//! the relay waits until the other side can take data, so back-pressure stays in the kernel
//! and in rustls instead of in our memory. What an app that stopped reading can pin is
//! therefore bounded: this direction's `pending` (under one chunk), the upstream socket
//! reader's leftover (under one chunk, `bufio`) and rustls' own bounded buffers; measured in
//! `tests/hostile_conn.rs` (`stalled_apps_cost_bounded_memory`).
//!
//! A unix-socket app connection cannot be reset (there is no RST on `AF_UNIX`): when the
//! upstream side fails mid-stream, the app sees a plain end of stream, like a clean close. The
//! access-log line (`outcome=error`) is where the difference shows.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::failure::{Class, Failure, classify_io};
use crate::metrics::RouteMetrics;
use crate::transport::{AppStream, READ_CHUNK, read_clearing};
use crate::upstream::Upstream;

/// Bytes moved per read. With one chunk at most pending per direction, this bounds what a
/// connection whose app stopped reading pins (see the module doc).
const CHUNK: usize = READ_CHUNK;

thread_local! {
    /// The per-worker scratch buffer (see the module doc).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
}

/// Application bytes moved, for the access log.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub to_upstream: u64,
    pub from_upstream: u64,
}

/// Which side an I/O error came from decides how it is explained.
enum Side {
    App,
    Upstream,
}

fn fail(side: Side, e: io::Error, server_name: &str) -> Failure {
    match side {
        Side::Upstream => classify_io(&e, server_name),
        Side::App => match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Failure::new(Class::Reset, format!("the app reset its connection: {e}"))
            }
            _ => Failure::new(Class::Io, format!("app connection i/o error: {e}")),
        },
    }
}

/// One direction's state.
#[derive(Default)]
struct Dir {
    /// Bytes read from the source that the sink has not taken yet; usually `None`.
    pending: Option<(Vec<u8>, usize)>,
    /// The source ended (FIN from the app, close_notify or FIN from the upstream).
    eof: bool,
    /// The end was passed on to the sink.
    done: bool,
}

impl Dir {
    /// Write out what the sink could not take earlier; `Ready(Ok)` once nothing is pending.
    fn poll_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        sink: &mut W,
        counter: &mut u64,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        if let Some((buf, pos)) = &mut self.pending {
            while *pos < buf.len() {
                let n = ready!(Pin::new(&mut *sink).poll_write(cx, &buf[*pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *pos += n;
                *counter += n as u64;
                *moved = true;
            }
            self.pending = None;
        }
        Poll::Ready(Ok(()))
    }
}

/// The relay future: resolves when both directions have ended, or with the first error.
pub struct Relay<'a, A: AppStream> {
    app: &'a mut A,
    upstream: &'a mut Upstream,
    counters: &'a mut Counters,
    /// The route's byte counters, brought up to date once per poll.
    metrics: &'a RouteMetrics,
    server_name: &'a str,
    up: Dir,
    down: Dir,
    /// `--idle-timeout`: the timer and its length; `None` when disabled.
    idle: Option<(Pin<Box<Sleep>>, Duration)>,
    last_activity: Instant,
}

impl<'a, A: AppStream> Relay<'a, A> {
    pub fn new(
        app: &'a mut A,
        upstream: &'a mut Upstream,
        counters: &'a mut Counters,
        metrics: &'a RouteMetrics,
        server_name: &'a str,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Relay {
            app,
            upstream,
            counters,
            metrics,
            server_name,
            up: Dir::default(),
            down: Dir::default(),
            idle: idle_timeout.map(|d| (Box::pin(tokio::time::sleep_until(now + d)), d)),
            last_activity: now,
        }
    }

    /// App -> upstream until the app would block; `Ready(Ok)` once this direction ended.
    fn poll_up(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Failure>> {
        let sn = self.server_name;
        let upstream = &mut *self.upstream;
        loop {
            ready!(
                self.up
                    .poll_pending(cx, upstream, &mut self.counters.to_upstream, moved)
            )
            .map_err(|e| fail(Side::Upstream, e, sn))?;
            if self.up.eof {
                // close_notify, flush, then FIN; the other direction goes on.
                ready!(Pin::new(&mut *upstream).poll_shutdown(cx))
                    .map_err(|e| fail(Side::Upstream, e, sn))?;
                self.up.done = true;
                return Poll::Ready(Ok(()));
            }
            // Records rustls could not send yet go out before more is read from the app.
            ready!(Pin::new(&mut *upstream).poll_flush(cx))
                .map_err(|e| fail(Side::Upstream, e, sn))?;
            ready!(self.app.poll_read_ready(cx)).map_err(|e| fail(Side::App, e, sn))?;
            let app = &*self.app;
            let before = self.counters.to_upstream;
            let step = SCRATCH.with_borrow_mut(|scratch| -> Result<Option<Vec<u8>>, Failure> {
                let n = match read_clearing(app, scratch.len(), || app.try_read(scratch)) {
                    Ok(0) => return Ok(None),
                    Ok(n) => n,
                    // Stale readiness: poll_read_ready now registers for the next edge.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Vec::new())),
                    Err(e) => return Err(fail(Side::App, e, sn)),
                };
                let taken = match Pin::new(&mut *upstream).poll_write(cx, &scratch[..n]) {
                    Poll::Ready(Ok(m)) => m,
                    Poll::Ready(Err(e)) => return Err(fail(Side::Upstream, e, sn)),
                    Poll::Pending => 0,
                };
                self.counters.to_upstream += taken as u64;
                Ok(Some(scratch[taken..n].to_vec()))
            });
            match step {
                Err(f) => return Poll::Ready(Err(f)),
                Ok(None) => self.up.eof = true,
                Ok(Some(rest)) => {
                    *moved |= self.counters.to_upstream != before;
                    if !rest.is_empty() {
                        self.up.pending = Some((rest, 0));
                    }
                }
            }
        }
    }

    /// Upstream -> app until the upstream would block; `Ready(Ok)` once this direction ended.
    fn poll_down(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Failure>> {
        let sn = self.server_name;
        let app = &mut *self.app;
        loop {
            ready!(
                self.down
                    .poll_pending(cx, &mut *app, &mut self.counters.from_upstream, moved)
            )
            .map_err(|e| fail(Side::App, e, sn))?;
            if self.down.eof {
                ready!(Pin::new(&mut *app).poll_shutdown(cx))
                    .map_err(|e| fail(Side::App, e, sn))?;
                self.down.done = true;
                return Poll::Ready(Ok(()));
            }
            // Only decrypt what the app can take now; the rest waits in the kernel.
            ready!(app.poll_write_ready(cx)).map_err(|e| fail(Side::App, e, sn))?;
            let upstream = &mut *self.upstream;
            let step =
                SCRATCH.with_borrow_mut(|scratch| -> Poll<Result<Option<Vec<u8>>, Failure>> {
                    let mut rb = ReadBuf::new(scratch);
                    match Pin::new(&mut *upstream).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        // FIN without close_notify: many servers do this; pass it on as a FIN.
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            return Poll::Ready(Ok(None));
                        }
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err(fail(Side::Upstream, e, sn)));
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    let data = rb.filled();
                    if data.is_empty() {
                        return Poll::Ready(Ok(None));
                    }
                    let taken = match app.try_write(data) {
                        Ok(m) => m,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                        Err(e) => return Poll::Ready(Err(fail(Side::App, e, sn))),
                    };
                    self.counters.from_upstream += taken as u64;
                    Poll::Ready(Ok(Some(data[taken..].to_vec())))
                });
            match ready!(step) {
                Err(f) => return Poll::Ready(Err(f)),
                Ok(None) => self.down.eof = true,
                Ok(Some(rest)) => {
                    *moved = true;
                    if !rest.is_empty() {
                        self.down.pending = Some((rest, 0));
                    }
                }
            }
        }
    }
}

impl<A: AppStream> Future for Relay<'_, A> {
    type Output = Result<(), Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let before = *this.counters;
        let r = this.poll_relay(cx);
        let (to, from) = (
            this.counters.to_upstream - before.to_upstream,
            this.counters.from_upstream - before.from_upstream,
        );
        if to > 0 {
            this.metrics.bytes_to_upstream.inc_by(to);
        }
        if from > 0 {
            this.metrics.bytes_from_upstream.inc_by(from);
        }
        r
    }
}

impl<A: AppStream> Relay<'_, A> {
    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let this = self;
        let mut moved = false;
        if !this.up.done
            && let Poll::Ready(Err(e)) = this.poll_up(cx, &mut moved)
        {
            return Poll::Ready(Err(e));
        }
        if !this.down.done
            && let Poll::Ready(Err(e)) = this.poll_down(cx, &mut moved)
        {
            return Poll::Ready(Err(e));
        }
        if this.up.done && this.down.done {
            return Poll::Ready(Ok(()));
        }
        if let Some((sleep, limit)) = &mut this.idle {
            if moved {
                this.last_activity = Instant::now();
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = this.last_activity + *limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(Failure::new(
                        Class::Idle,
                        format!(
                            "no traffic for --idle-timeout {}",
                            humantime::format_duration(*limit)
                        ),
                    )));
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}
