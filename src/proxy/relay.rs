//! The byte relay: copy both ways between two connected streams, with half-close in both
//! directions, until both directions ended, one side failed, or nothing moved for the idle
//! limit. It knows nothing of routes or upstreams: its sides are the *near* one (a plaintext
//! socket we can poll for readiness, such as the app's) and the *far* one (any byte stream,
//! such as a TLS session), and it reports which side failed; the caller explains the failure.
//!
//! Memory matters here (one relay per connection, thousands idle), and so do syscalls. Both
//! directions copy through one [`READ_CHUNK`] (32 KiB) scratch buffer per worker thread, used
//! only inside a single `poll` (never across an await), so an idle relay holds no buffer at
//! all. Only bytes that the receiving side could not take at once are kept per connection, in
//! `pending`, and no more is read from that side until they are gone. Before reading a side,
//! the relay waits until the other side can take data, so back-pressure stays in the kernel
//! and in rustls instead of in our memory. What a near side that stopped reading can pin is
//! therefore bounded: this direction's `pending` (under one chunk), the far socket reader's
//! leftover (under one chunk, `transport`) and rustls' own bounded buffers; measured in
//! `tests/hostile_conn.rs` (`stalled_apps_cost_bounded_memory`).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::transport::{READ_CHUNK, ReadySocket, read_clearing};

thread_local! {
    /// The per-worker scratch buffer (see the module doc): [`READ_CHUNK`] bytes moved per read.
    /// With one chunk at most pending per direction, this bounds what a connection whose near
    /// side stopped reading pins.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// Bytes moved each way, for the caller's log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Read from the near side and taken by the far side.
    pub near_to_far: u64,
    /// Read from the far side and taken by the near side.
    pub far_to_near: u64,
}

/// Why a relay stopped before both directions ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("near side: {0}")]
    Near(io::Error),
    #[error("far side: {0}")]
    Far(io::Error),
    /// Nothing moved either way for this long.
    #[error("no traffic for {0:?}")]
    Idle(Duration),
}

/// One direction's state.
#[derive(Default)]
struct Dir {
    /// Bytes read from the source that the sink has not taken yet; usually `None`.
    pending: Option<(Vec<u8>, usize)>,
    /// The source ended (FIN, or close_notify or FIN from a TLS peer).
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
pub struct Relay<'a, N: ReadySocket, F> {
    /// The near side: read when readable and written when writable without an extra buffer,
    /// so its back-pressure stays in the kernel.
    near: &'a mut N,
    /// The far side, read and written through its own `AsyncRead`/`AsyncWrite`.
    far: &'a mut F,
    /// The caller's byte counts, kept up to date as bytes move (the caller logs them even
    /// when the relay is dropped mid-way, e.g. cut at shutdown).
    moved: &'a mut Moved,
    /// The running totals (metrics) for near -> far and far -> near, brought up to date once
    /// per poll.
    totals: (&'a Counter, &'a Counter),
    /// Near -> far.
    out: Dir,
    /// Far -> near.
    back: Dir,
    /// The idle limit: the timer and its length; `None` when disabled.
    idle: Option<(Pin<Box<Sleep>>, Duration)>,
    /// When a byte last moved either way, which the idle timer counts from.
    last_activity: Instant,
}

impl<'a, N: ReadySocket, F: AsyncRead + AsyncWrite + Unpin> Relay<'a, N, F> {
    pub fn new(
        near: &'a mut N,
        far: &'a mut F,
        moved: &'a mut Moved,
        totals: (&'a Counter, &'a Counter),
        idle_timeout: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Relay {
            near,
            far,
            moved,
            totals,
            out: Dir::default(),
            back: Dir::default(),
            idle: idle_timeout.map(|d| (Box::pin(tokio::time::sleep_until(now + d)), d)),
            last_activity: now,
        }
    }

    /// Near -> far until the near side would block; `Ready(Ok)` once this direction ended.
    fn poll_out(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Error>> {
        let far = &mut *self.far;
        loop {
            ready!(
                self.out
                    .poll_pending(cx, far, &mut self.moved.near_to_far, moved)
            )
            .map_err(Error::Far)?;
            if self.out.eof {
                // close_notify, flush, then FIN; the other direction goes on.
                ready!(Pin::new(&mut *far).poll_shutdown(cx)).map_err(Error::Far)?;
                self.out.done = true;
                return Poll::Ready(Ok(()));
            }
            // Records rustls could not send yet go out before more is read from the near side.
            ready!(Pin::new(&mut *far).poll_flush(cx)).map_err(Error::Far)?;
            ready!(self.near.poll_read_ready(cx)).map_err(Error::Near)?;
            let near = &*self.near;
            let before = self.moved.near_to_far;
            let step = SCRATCH.with_borrow_mut(|scratch| -> Result<Option<Vec<u8>>, Error> {
                let n = match read_clearing(near, scratch.len(), || near.try_read(scratch)) {
                    Ok(0) => return Ok(None),
                    Ok(n) => n,
                    // Stale readiness: poll_read_ready now registers for the next edge.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Vec::new())),
                    Err(e) => return Err(Error::Near(e)),
                };
                let taken = match Pin::new(&mut *far).poll_write(cx, &scratch[..n]) {
                    Poll::Ready(Ok(m)) => m,
                    Poll::Ready(Err(e)) => return Err(Error::Far(e)),
                    Poll::Pending => 0,
                };
                self.moved.near_to_far += taken as u64;
                Ok(Some(scratch[taken..n].to_vec()))
            });
            match step {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => self.out.eof = true,
                Ok(Some(rest)) => {
                    *moved |= self.moved.near_to_far != before;
                    if !rest.is_empty() {
                        self.out.pending = Some((rest, 0));
                    }
                }
            }
        }
    }

    /// Far -> near until the far side would block; `Ready(Ok)` once this direction ended.
    fn poll_back(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Error>> {
        let near = &mut *self.near;
        loop {
            ready!(
                self.back
                    .poll_pending(cx, &mut *near, &mut self.moved.far_to_near, moved)
            )
            .map_err(Error::Near)?;
            if self.back.eof {
                ready!(Pin::new(&mut *near).poll_shutdown(cx)).map_err(Error::Near)?;
                self.back.done = true;
                return Poll::Ready(Ok(()));
            }
            // Only decrypt what the near side can take now; the rest waits in the kernel.
            ready!(near.poll_write_ready(cx)).map_err(Error::Near)?;
            let far = &mut *self.far;
            let step = SCRATCH.with_borrow_mut(|scratch| -> Poll<Result<Option<Vec<u8>>, Error>> {
                let mut rb = ReadBuf::new(scratch);
                match Pin::new(&mut *far).poll_read(cx, &mut rb) {
                    Poll::Pending => return Poll::Pending,
                    // FIN without close_notify: many servers do this; pass it on as a FIN.
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Poll::Ready(Ok(None));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Far(e))),
                    Poll::Ready(Ok(())) => {}
                }
                let data = rb.filled();
                if data.is_empty() {
                    return Poll::Ready(Ok(None));
                }
                let taken = match near.try_write(data) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Poll::Ready(Err(Error::Near(e))),
                };
                self.moved.far_to_near += taken as u64;
                Poll::Ready(Ok(Some(data[taken..].to_vec())))
            });
            match ready!(step) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => self.back.eof = true,
                Ok(Some(rest)) => {
                    *moved = true;
                    if !rest.is_empty() {
                        self.back.pending = Some((rest, 0));
                    }
                }
            }
        }
    }

    fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let mut moved = false;
        if !self.out.done
            && let Poll::Ready(Err(e)) = self.poll_out(cx, &mut moved)
        {
            return Poll::Ready(Err(e));
        }
        if !self.back.done
            && let Poll::Ready(Err(e)) = self.poll_back(cx, &mut moved)
        {
            return Poll::Ready(Err(e));
        }
        if self.out.done && self.back.done {
            return Poll::Ready(Ok(()));
        }
        if let Some((sleep, limit)) = &mut self.idle {
            if moved {
                self.last_activity = Instant::now();
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let deadline = self.last_activity + *limit;
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(Error::Idle(*limit)));
                }
                sleep.as_mut().reset(deadline);
            }
        }
        Poll::Pending
    }
}

impl<N: ReadySocket, F: AsyncRead + AsyncWrite + Unpin> Future for Relay<'_, N, F> {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let before = *this.moved;
        let r = this.poll_relay(cx);
        let out = this.moved.near_to_far - before.near_to_far;
        let back = this.moved.far_to_near - before.far_to_near;
        if out > 0 {
            this.totals.0.inc_by(out);
        }
        if back > 0 {
            this.totals.1.inc_by(back);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::{Error, Moved, Relay};

    /// Bytes go both ways, each side's end is passed on as a half-close, and the counts and
    /// totals agree.
    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        let (mut near, mut app) = UnixStream::pair().unwrap();
        let (mut far, mut peer) = tokio::io::duplex(64 * 1024);
        let (out, back) = (Counter::default(), Counter::default());
        let mut moved = Moved::default();
        let relay = Relay::new(&mut near, &mut far, &mut moved, (&out, &back), None);
        let ends = async {
            app.write_all(b"ping").await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping");
            peer.write_all(b"pong!").await.unwrap();
            peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"pong!");
        };
        let (r, ()) = tokio::join!(relay, ends);
        r.unwrap();
        assert_eq!((moved.near_to_far, moved.far_to_near), (4, 5));
        assert_eq!((out.get(), back.get()), (4, 5));
    }

    /// An app that reads slowly takes the far side's bytes a bit at a time: what it did not take
    /// at once is kept and goes out later, every byte once and in order.
    #[tokio::test]
    async fn slow_near_side_gets_every_byte_in_order() {
        let (mut near, mut app) = UnixStream::pair().unwrap();
        let (mut far, mut peer) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (out, back) = (Counter::default(), Counter::default());
        let mut moved = Moved::default();
        let relay = Relay::new(&mut near, &mut far, &mut moved, (&out, &back), None);
        let ends = async {
            app.shutdown().await.unwrap();
            let send = async {
                peer.write_all(&data).await.unwrap();
                peer.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::new();
                let mut chunk = [0u8; 3000];
                loop {
                    let n = app.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&chunk[..n]);
                    tokio::task::yield_now().await;
                }
            };
            let ((), got) = tokio::join!(send, recv);
            assert!(got == data, "the app got {} bytes, not the same", got.len());
        };
        let (r, ()) = tokio::join!(relay, ends);
        r.unwrap();
        assert_eq!(moved.far_to_near, data.len() as u64);
        assert_eq!(back.get(), data.len() as u64);
    }

    /// Nothing moving for the idle limit ends the relay with `Idle`.
    #[tokio::test]
    async fn silence_ends_it_at_the_idle_limit() {
        let (mut near, _app) = UnixStream::pair().unwrap();
        let (mut far, _peer) = tokio::io::duplex(1024);
        let (out, back) = (Counter::default(), Counter::default());
        let mut moved = Moved::default();
        let limit = Duration::from_millis(50);
        let relay = Relay::new(&mut near, &mut far, &mut moved, (&out, &back), Some(limit));
        assert!(matches!(relay.await, Err(Error::Idle(d)) if d == limit));
    }
}
