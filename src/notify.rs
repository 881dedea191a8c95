//! systemd's notify protocol (`NOTIFY_SOCKET`): READY once every listener is bound, RELOADING
//! (with MONOTONIC_USEC) then READY around a reload, STOPPING at shutdown, and WATCHDOG at half
//! of `WATCHDOG_USEC`. Without `NOTIFY_SOCKET` every call does nothing.

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "systemd notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Ping the watchdog at half its interval while the returned guard lives.
pub fn spawn_watchdog() -> Option<tokio_util::sync::DropGuard> {
    let interval = sd_notify::watchdog_enabled()? / 2;
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
                _ = stop.cancelled() => return,
            }
        }
    });
    Some(guard)
}
