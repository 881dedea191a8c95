//! Byte-stream mode: one app connection relayed to the upstream TLS stream by the [`relay`],
//! the app's socket being the relay's near side and the upstream its far side.
//!
//! A unix-socket app connection cannot be reset (there is no RST on `AF_UNIX`): when the
//! upstream side fails mid-stream, the app sees a plain end of stream, like a clean close. The
//! access-log line (`outcome=error`) is where the difference shows.

use std::io;
use std::time::Duration;

use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::RouteCtx;
use super::cut::CutWait;
use super::log::AccessLog;
use super::postgres;
use super::relay::{self, Relay};
use crate::cli::Protocol;
use crate::failure::{Class, Failure, classify_io};
use crate::transport::ReadySocket;

/// What a connection needs from the app's socket beyond relaying.
pub(super) trait AppSocket: ReadySocket {
    fn set_nodelay(&self);
    /// End with a reset where the transport has one.
    fn abort(&self);
}

impl AppSocket for TcpStream {
    fn set_nodelay(&self) {
        let _ = TcpStream::set_nodelay(self, true);
    }
    /// A reset rather than a FIN, so a mid-stream failure upstream is not mistaken by the app
    /// for a clean end of data.
    fn abort(&self) {
        let _ = socket2::SockRef::from(self).set_linger(Some(Duration::ZERO));
    }
}

impl AppSocket for tokio::net::UnixStream {
    fn set_nodelay(&self) {}
    fn abort(&self) {}
}

/// Serve one app connection in byte-stream mode; its access-log line is written when it ends.
pub(super) async fn handle<A: AppSocket + AsyncRead>(
    ctx: &RouteCtx,
    mut app: A,
    peer: String,
    cut: CancellationToken,
) {
    let mut log = AccessLog::new(ctx, peer);
    app.set_nodelay();
    // `--protocol postgres`: the app's first message comes before the dial. The postgres
    // steps are boxed so that their state is no part of a plain route's connection task.
    let mut first = match ctx.route.protocol {
        Protocol::None => None,
        Protocol::Postgres => {
            let accepted = tokio::time::Instant::now();
            match Box::pin(postgres::read_first(ctx, &mut app, accepted, &cut)).await {
                Ok(m) => Some(m),
                Err(f) => {
                    log.failure = Some(f);
                    return;
                }
            }
        }
    };
    let config = ctx.identity.current();
    let connected = tokio::select! {
        // Boxed: the dial's state (resolve, connect, handshake) is most of this task's size and
        // is needed only until the session is up; inline it would stay allocated for the whole
        // life of the connection (10 KiB of every idle one, measured by bench/memory.sh).
        c = log.span.within(Box::pin(ctx.connect(config))) => c,
        _ = cut.cancelled() => Err(Failure::new(Class::Drain, "cut at shutdown before the upstream answered")),
    };
    let mut up = match connected {
        Ok(c) => c.stream,
        Err(f) => {
            // Nothing was sent to the app; dropping it closes the connection at once. A
            // PostgreSQL app is told why first.
            if first.is_some() {
                Box::pin(postgres::tell_app(&mut app, &f.message)).await;
            }
            log.failure = Some(f);
            return;
        }
    };
    // The message is passed on and not kept: only whether there was one matters after.
    let postgres_app = first.is_some();
    if let Some(message) = first.take()
        && let Err(f) = Box::pin(postgres::pass_on(ctx, &mut up, &message, &mut log.moved)).await
    {
        Box::pin(postgres::tell_app(&mut app, &f.message)).await;
        log.failure = Some(f);
        return;
    }
    let m = &ctx.metrics;
    let relay = Relay::new(
        &mut app,
        &mut up,
        &mut log.moved,
        (&m.bytes_to_upstream, &m.bytes_from_upstream),
        ctx.route.idle_timeout,
    );
    let result = tokio::select! {
        biased;
        r = relay => r.map_err(|e| (matches!(e, relay::Error::Far(_)), explain(e, &ctx.server_name))),
        () = CutWait::new(cut.cancelled()) => Err((false, Failure::new(Class::Drain, "cut: still open when --drain-timeout ran out"))),
    };
    if let Err((upstream_failed, f)) = result {
        // The upstream failed before its first byte reached the app (TLS 1.3: the alert that
        // refuses our client certificate comes after the handshake): a PostgreSQL app still
        // waits for the answer to its startup message, so it is told why, as for a failed dial.
        if upstream_failed && postgres_app && log.moved.far_to_near == 0 {
            Box::pin(postgres::tell_app(&mut app, &f.message)).await;
        } else if f.class.is_fault() {
            app.abort();
        }
        log.failure = Some(f);
    }
}

/// A relay error as a failure of this route: the near side is the app, the far side the
/// upstream named `server_name`.
fn explain(e: relay::Error, server_name: &str) -> Failure {
    match e {
        relay::Error::Far(e) => classify_io(&e, server_name),
        relay::Error::Near(e) => match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Failure::new(Class::Reset, format!("the app reset its connection: {e}"))
            }
            _ => Failure::new(Class::Io, format!("app connection i/o error: {e}")),
        },
        relay::Error::Idle(limit) => Failure::new(
            Class::Idle,
            format!(
                "no traffic for --idle-timeout {}",
                humantime::format_duration(limit)
            ),
        ),
    }
}
