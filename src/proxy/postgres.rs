//! Byte-stream mode with `--protocol postgres`, the app's side: its first real message is read
//! (its `SSLRequest` or `GSSENCRequest` answered `N`) before the upstream is dialled, under a
//! deadline of its own (`--header-timeout` from accept), so a silent app never holds an
//! upstream handshake; once the upstream TLS session is up the message is passed on; a dial
//! that fails is told to the app as a PostgreSQL `ErrorResponse` before the close.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::RouteCtx;
use super::relay::Moved;
use crate::failure::{Class, Failure};
use crate::postgres::error_response;
use crate::postgres::io::{AppError, read_startup};
use crate::upstream::Upstream;

/// How long telling the app why may take: the error is a few hundred bytes, which a live
/// socket takes at once; an app that stopped reading is not waited for.
const TELL_APP: Duration = Duration::from_secs(1);

/// What is read of the app after the error, for its close (bounded in time by [`TELL_APP`]).
const DRAIN: usize = 64 * 1024;

/// Read the app's first real message within `--header-timeout` of `accepted`; on a malformed
/// one the app is told why. Returns the message's bytes, to pass on after the handshake.
pub(super) async fn read_first<A: AsyncRead + AsyncWrite + Unpin>(
    ctx: &RouteCtx,
    app: &mut A,
    accepted: Instant,
    cut: &CancellationToken,
) -> Result<Vec<u8>, Failure> {
    let limit = ctx.route.http.header_timeout;
    let read = timeout_at(accepted + limit, read_startup(app));
    let result = tokio::select! {
        r = read => r,
        _ = cut.cancelled() => {
            return Err(Failure::new(Class::Drain, "cut at shutdown before the app's startup message"));
        }
    };
    match result {
        Ok(Ok((_, message))) => Ok(message),
        Ok(Err(AppError::Refused(e))) => {
            tell_app(app, &e.to_string()).await;
            Err(AppError::Refused(e).into_failure())
        }
        Ok(Err(e)) => Err(e.into_failure()),
        Err(_) => Err(Failure::new(
            Class::Timeout,
            format!(
                "no PostgreSQL startup message from the app within --header-timeout {}",
                humantime::format_duration(limit)
            ),
        )),
    }
}

/// Pass the app's first message on to the upstream (within `--connect-timeout`, the bytes
/// counted as relayed app bytes).
pub(super) async fn pass_on(
    ctx: &RouteCtx,
    up: &mut Upstream,
    message: &[u8],
    moved: &mut Moved,
) -> Result<(), Failure> {
    let write = async {
        up.write_all(message).await?;
        up.flush().await
    };
    match timeout(ctx.route.connect_timeout, write).await {
        Ok(Ok(())) => {
            moved.near_to_far += message.len() as u64;
            ctx.metrics.bytes_to_upstream.inc_by(message.len() as u64);
            Ok(())
        }
        Ok(Err(e)) => Err(crate::failure::classify_io(&e, &ctx.server_name)),
        Err(_) => Err(Failure::new(
            Class::Timeout,
            format!(
                "the upstream did not take the app's startup message within --connect-timeout {}",
                humantime::format_duration(ctx.route.connect_timeout)
            ),
        )),
    }
}

/// Tell the app why its connection ends, as a PostgreSQL `ErrorResponse` (`08001`), then end
/// it with a FIN: what the app still sends is read and dropped until it closes (bounded), so
/// the close is not a reset that could destroy the error before the app reads it.
pub(super) async fn tell_app<A: AsyncRead + AsyncWrite + Unpin>(app: &mut A, message: &str) {
    let error = error_response(message);
    let _ = timeout(TELL_APP, async {
        app.write_all(&error).await?;
        app.flush().await?;
        app.shutdown().await?;
        // On the heap: on the stack it would be part of every tcp connection's task.
        let mut scratch = vec![0u8; 4096];
        let mut read = 0;
        while read < DRAIN {
            match app.read(&mut scratch).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}
