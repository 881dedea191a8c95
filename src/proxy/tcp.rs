//! Byte-stream mode: copy both ways between the app's plaintext socket and the upstream TLS
//! stream, with half-close in both directions.
//!
//! Memory matters here (one relay per connection, thousands idle): the app-to-upstream buffer
//! exists only while the app is sending, and upstream-to-app data is written straight out of
//! rustls' plaintext buffer (`poll_fill_buf`), so an idle relay holds no buffer of its own.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::upstream::{Class, Failure, Upstream, classify_io};

/// Bytes read from the app per syscall.
const APP_READ_CHUNK: usize = 64 * 1024;

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

/// App -> upstream direction.
#[derive(Default)]
struct Up {
    /// Bytes read from the app and not yet accepted by rustls; `None` while the app is quiet.
    buf: Option<Vec<u8>>,
    pos: usize,
    /// The app sent FIN.
    eof: bool,
    /// close_notify + FIN sent upstream.
    done: bool,
}

/// Upstream -> app direction.
#[derive(Default)]
struct Down {
    /// The upstream sent close_notify (or FIN).
    eof: bool,
    /// FIN sent to the app.
    done: bool,
}

/// The relay future: resolves when both directions have ended, or with the first error.
pub struct Relay<'a> {
    app: &'a mut TcpStream,
    upstream: &'a mut Upstream,
    counters: &'a mut Counters,
    server_name: &'a str,
    up: Up,
    down: Down,
    /// `--idle-timeout`: the timer and its length; `None` when disabled.
    idle: Option<(Pin<Box<Sleep>>, Duration)>,
    last_activity: Instant,
}

impl<'a> Relay<'a> {
    pub fn new(
        app: &'a mut TcpStream,
        upstream: &'a mut Upstream,
        counters: &'a mut Counters,
        server_name: &'a str,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        Relay {
            app,
            upstream,
            counters,
            server_name,
            up: Up::default(),
            down: Down::default(),
            idle: idle_timeout.map(|d| (Box::pin(tokio::time::sleep_until(now + d)), d)),
            last_activity: now,
        }
    }

    /// Move app bytes upstream until the app would block; `Ready` once the direction ended.
    fn poll_up(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Failure>> {
        let up = &mut self.up;
        let sn = self.server_name;
        loop {
            if let Some(buf) = &up.buf
                && up.pos < buf.len()
            {
                let n = ready!(Pin::new(&mut *self.upstream).poll_write(cx, &buf[up.pos..]))
                    .map_err(|e| fail(Side::Upstream, e, sn))?;
                if n == 0 {
                    return Poll::Ready(Err(Failure::new(
                        Class::Io,
                        "the upstream stopped accepting data",
                    )));
                }
                up.pos += n;
                self.counters.to_upstream += n as u64;
                *moved = true;
                continue;
            }
            if up.eof {
                // close_notify, flush, then FIN.
                ready!(Pin::new(&mut *self.upstream).poll_shutdown(cx))
                    .map_err(|e| fail(Side::Upstream, e, sn))?;
                up.done = true;
                return Poll::Ready(Ok(()));
            }
            match self.app.poll_read_ready(cx) {
                Poll::Ready(r) => r.map_err(|e| fail(Side::App, e, sn))?,
                Poll::Pending => {
                    // The app is quiet: free the buffer and push out what rustls holds.
                    up.buf = None;
                    ready!(Pin::new(&mut *self.upstream).poll_flush(cx))
                        .map_err(|e| fail(Side::Upstream, e, sn))?;
                    return Poll::Pending;
                }
            }
            let buf = up
                .buf
                .get_or_insert_with(|| Vec::with_capacity(APP_READ_CHUNK));
            buf.clear();
            up.pos = 0;
            match self.app.try_read_buf(buf) {
                Ok(0) => up.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(fail(Side::App, e, sn))),
            }
        }
    }

    /// Move upstream plaintext to the app straight from rustls' buffer.
    fn poll_down(&mut self, cx: &mut Context<'_>, moved: &mut bool) -> Poll<Result<(), Failure>> {
        let sn = self.server_name;
        loop {
            if self.down.eof {
                ready!(Pin::new(&mut *self.app).poll_shutdown(cx))
                    .map_err(|e| fail(Side::App, e, sn))?;
                self.down.done = true;
                return Poll::Ready(Ok(()));
            }
            let data = match ready!(Pin::new(&mut *self.upstream).poll_fill_buf(cx)) {
                Ok(d) => d,
                // FIN without close_notify: many servers do this; pass it on as a FIN.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => &[][..],
                Err(e) => return Poll::Ready(Err(fail(Side::Upstream, e, sn))),
            };
            if data.is_empty() {
                self.down.eof = true;
                continue;
            }
            let n = ready!(Pin::new(&mut *self.app).poll_write(cx, data))
                .map_err(|e| fail(Side::App, e, sn))?;
            if n == 0 {
                return Poll::Ready(Err(Failure::new(
                    Class::Io,
                    "the app stopped accepting data",
                )));
            }
            Pin::new(&mut *self.upstream).consume(n);
            self.counters.from_upstream += n as u64;
            *moved = true;
        }
    }
}

impl Future for Relay<'_> {
    type Output = Result<(), Failure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
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
