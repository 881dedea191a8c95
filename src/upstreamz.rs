//! `GET /upstreamz`: one real handshake per outbound route, with the identity and verification
//! in force (through the route's egress proxy if it has one), judged in `check`'s words.
//!
//! Bounded whatever admin clients do: one probe round at a time (a request that arrives while
//! one runs waits for its answer instead of starting another), its answer reused for
//! [`FRESH`], at most [`PARALLEL`] routes dialled at once, each route's probe ended at its
//! `--connect-timeout` plus [`SLACK`]. The round runs in a task of its own, so a client that
//! hangs up does not cancel it for the others. Inbound routes are listed as skipped: their
//! peers dial us. A probe never counts in `connections_total` or `active_connections`, but a
//! passing one refreshes `upstream_cert_expiry_timestamp_seconds`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::debug;

use crate::check::probe;
use crate::failure::escape;
use crate::proxy::RouteCtx;

/// How long an answer is reused.
pub const FRESH: Duration = Duration::from_secs(5);
/// Routes probed at once.
pub const PARALLEL: usize = 8;
/// On top of `--connect-timeout`: the TLS 1.3 verdict wait (2 s) and a bounded close.
pub const SLACK: Duration = Duration::from_secs(5);

/// One round's answer.
#[derive(Debug)]
pub struct Answer {
    /// Every probed route passed (skipped ones do not count).
    pub ok: bool,
    /// One line per route, in config order.
    pub body: String,
    /// When the round ended, for [`FRESH`].
    done: Instant,
}

/// The last answer and the round in flight, if any.
#[derive(Default)]
struct Slot {
    last: Option<Arc<Answer>>,
    /// Receives the answer of the round in flight.
    inflight: Option<watch::Receiver<Option<Arc<Answer>>>>,
}

/// The routes to probe and the shared state of their rounds.
pub struct Upstreamz {
    routes: Vec<Arc<RouteCtx>>,
    slot: Mutex<Slot>,
}

impl Upstreamz {
    pub fn new(routes: Vec<Arc<RouteCtx>>) -> Arc<Self> {
        Arc::new(Upstreamz {
            routes,
            slot: Mutex::new(Slot::default()),
        })
    }

    /// A fresh answer: the last one if younger than [`FRESH`], the one in flight, or a new
    /// round's (started here, on the caller's runtime).
    pub async fn answer(self: &Arc<Self>) -> Arc<Answer> {
        let mut rx = {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(last) = &slot.last
                && last.done.elapsed() < FRESH
            {
                return last.clone();
            }
            match &slot.inflight {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    slot.inflight = Some(rx.clone());
                    tokio::spawn(self.clone().round(tx));
                    rx
                }
            }
        };
        // The round always sends (each route is bounded); a dropped sender means it panicked:
        // the slot is freed so the next request starts a new round instead of finding a dead one.
        let got = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|a| a.clone());
        if got.is_none() {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            if slot
                .inflight
                .as_ref()
                .is_some_and(|r| r.has_changed().is_err())
            {
                slot.inflight = None;
            }
        }
        got.unwrap_or_else(|| {
            Arc::new(Answer {
                ok: false,
                body: "the probe round failed; see the sidecar's log\n".into(),
                done: Instant::now(),
            })
        })
    }

    /// Probe every route, store the answer, then wake the waiters.
    async fn round(self: Arc<Self>, tx: watch::Sender<Option<Arc<Answer>>>) {
        let lines: Vec<(String, Option<bool>)> = futures::stream::iter(self.routes.clone())
            .map(|ctx| async move { probe_route(&ctx).await })
            .buffered(PARALLEL)
            .collect()
            .await;
        let ok = lines.iter().all(|(_, passed)| *passed != Some(false));
        let mut body = String::new();
        for (line, _) in &lines {
            body.push_str(&escape(line));
            body.push('\n');
        }
        let answer = Arc::new(Answer {
            ok,
            body,
            done: Instant::now(),
        });
        debug!(ok, "upstream probe round done");
        {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            slot.last = Some(answer.clone());
            slot.inflight = None;
        }
        tx.send_replace(Some(answer));
    }
}

/// One route's line, and whether it passed (`None`: skipped).
async fn probe_route(ctx: &RouteCtx) -> (String, Option<bool>) {
    let name = &ctx.route.name;
    if ctx.route.inbound().is_some() {
        return (
            format!("{name} skipped: inbound route (its clients dial us; nothing to probe)"),
            None,
        );
    }
    let loaded = ctx.identity.loaded();
    let limit = ctx.route.connect_timeout + SLACK;
    let probed = tokio::time::timeout(
        limit,
        probe::probe(&ctx.route, ctx.proxy.as_deref(), &loaded),
    )
    .await;
    match probed {
        Ok(p) => match p.problem {
            None => {
                if let Some(leaf) = &p.upstream_leaf {
                    ctx.metrics.upstream_leaf(leaf);
                }
                (format!("{name} ok"), Some(true))
            }
            Some(why) => (format!("{name}: {why}"), Some(false)),
        },
        Err(_) => (
            format!(
                "{name}: the probe did not finish within --connect-timeout {} + {}s",
                humantime::format_duration(ctx.route.connect_timeout),
                SLACK.as_secs()
            ),
            Some(false),
        ),
    }
}
