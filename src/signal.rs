//! Process signals: SIGTERM or SIGINT begins a graceful shutdown; a second one exits at once
//! with code 1 (an operator who signals twice wants out now). SIGHUP reloads certificate files.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Install the handlers; the returned token is cancelled at the first SIGTERM/SIGINT.
pub fn shutdown_on_signals() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let first = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(signal = name, "shutdown requested");
        first.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(signal = name, "second signal: exiting now without draining");
        std::process::exit(1);
    });
    Ok(token)
}

/// SIGHUP: the returned receiver ticks once per signal (bursts may coalesce into one tick).
pub fn reload_on_sighup() -> std::io::Result<watch::Receiver<u64>> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("SIGHUP: reloading certificates now");
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}
