//! Body wrappers: byte counting, the h2 app connection's response budget, the request-body
//! stall bound, and the watch's hold on a request until its response ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::Request;
use hyper::body::{Buf, Bytes, Frame, Incoming};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;
use tracing::warn;

use super::reqlog::RequestLog;
use super::{BoxError, HttpRoute, OutBody, Outgoing, reqlog};
use crate::proxy::RouteCtx;
use crate::proxy::watch::InFlight;

impl HttpRoute {
    /// The app's request as sent: its body counted and bounded by [`HttpRoute::out_body`].
    pub(super) fn outgoing(&self, mut req: Request<Incoming>) -> Outgoing {
        let per_request = match self.ctx.route.ops.request_lines() {
            true => req
                .extensions_mut()
                .remove::<reqlog::BytesIn>()
                .map(|b| b.0),
            false => None,
        };
        req.map(|inner| self.out_body(AppBody::App(inner), per_request))
    }

    /// A request body as sent: counted into `bytes_total` (and its access line's `bytes_in`)
    /// and bounded by `--idle-timeout`.
    pub(super) fn out_body(&self, inner: AppBody, per_request: Option<Counter>) -> OutBody {
        let counted = Counted {
            inner,
            counter: self.ctx.metrics.bytes_to_upstream.clone(),
            per_request,
            upstream_of: None,
            _exchange: None,
            budget: None,
        };
        Moving::new(counted, self.ctx.route.idle_timeout)
    }
}

/// A body that adds the size of every data frame passing through to a counter
/// (`bytes_total`): one atomic add per frame.
pub(super) struct Counted<B> {
    /// The body being counted.
    pub(super) inner: B,
    /// The route's byte counter for this direction.
    pub(super) counter: Counter,
    /// For a request body with `--access-log request`: its record's `bytes_in`.
    pub(super) per_request: Option<Counter>,
    /// For a response body: the route whose upstream failed mid-body, logged at warn (the app
    /// only sees its connection or stream cut).
    pub(super) upstream_of: Option<Arc<RouteCtx>>,
    /// For a response body of an h2 app connection's request to an HTTP/1.1 upstream: its
    /// turn among the connection's `LANE_H1_EXCHANGES` (see `pool`), given back when the body
    /// is dropped.
    pub(super) _exchange: Option<OwnedSemaphorePermit>,
    /// For a response body to an h2 app: the app connection's [`Budget`], which every data
    /// frame passing through is charged to until hyper has written or dropped it.
    pub(super) budget: Option<Arc<Budget>>,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(budget) = &this.budget {
            std::task::ready!(budget.poll_room(cx));
        }
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        match &mut r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_mut() {
                    this.counter.inc_by(data.len() as u64);
                    if let Some(c) = &this.per_request {
                        c.inc_by(data.len() as u64);
                    }
                    if let Some(budget) = &this.budget {
                        *data = budget.charge(std::mem::take(data));
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(ctx) = &this.upstream_of {
                    warn!(route = %ctx.route.name, error = ?e.to_string(), "upstream response body failed");
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Response data one h2 app connection may hold in memory at once: taken from the upstream but
/// not yet written to the app's socket (hyper's per-stream queues, h2's send buffers). With the
/// lane's connection window on the other side, an app that never reads costs about 1 MiB
/// however many streams it opens; an app that reads is never held back by it.
const H2_APP_HELD: usize = 512 * 1024;

/// The bytes of [`H2_APP_HELD`] in use on one app connection, and the streams waiting for room.
#[derive(Default)]
pub(super) struct Budget {
    /// Bytes handed on and not yet written or dropped.
    live: AtomicUsize,
    /// Streams held back for room, woken when the connection drops under the budget.
    waiting: std::sync::Mutex<Vec<Waker>>,
}

impl Budget {
    /// Ready when the connection holds less than [`H2_APP_HELD`]; otherwise the stream is
    /// woken when data it or another stream handed on has been written or dropped.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.live.load(Ordering::SeqCst) < H2_APP_HELD {
            return Poll::Ready(());
        }
        let Ok(mut waiting) = self.waiting.lock() else {
            return Poll::Ready(());
        };
        // Checked again under the lock: a release in between has already woken the list.
        if self.live.load(Ordering::SeqCst) < H2_APP_HELD {
            return Poll::Ready(());
        }
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// `data`, charged to the budget until the last copy of it is dropped.
    fn charge(self: &Arc<Self>, data: Bytes) -> Bytes {
        self.live.fetch_add(data.len(), Ordering::SeqCst);
        Bytes::from_owner(Charged {
            data,
            budget: self.clone(),
        })
    }

    fn release(&self, n: usize) {
        let left = self.live.fetch_sub(n, Ordering::SeqCst) - n;
        if left < H2_APP_HELD
            && let Ok(mut waiting) = self.waiting.lock()
        {
            for w in waiting.drain(..) {
                w.wake();
            }
        }
    }
}

/// Response data in hyper's hands, charged to its connection's [`Budget`].
struct Charged {
    /// The frame's data as the upstream sent it.
    data: Bytes,
    /// Released by the data's length when the last copy is dropped.
    budget: Arc<Budget>,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.data.len());
    }
}

/// A request body that must keep moving: no frame for `--idle-timeout` ends it with an error, so
/// the upstream sees the request cut off rather than waiting for the rest forever. The
/// connection watch already bounds a silent connection, but an h2 connection stays busy while
/// one of its streams stalls, so the bound must also be per request.
pub(super) struct Moving<B> {
    /// The request body being forwarded.
    inner: B,
    /// `--idle-timeout`: how long it may go without a frame; `None` when disabled.
    idle: Option<Duration>,
    /// Armed at the first wait, pushed back after every frame (one allocation per body).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame passed since the timer was last armed.
    moved: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body stalled for --idle-timeout")]
struct BodyStalled;

impl<B> Moving<B> {
    pub(super) fn new(inner: B, idle: Option<Duration>) -> Self {
        Moving {
            inner,
            idle,
            timer: None,
            moved: false,
        }
    }
}

impl<B> hyper::body::Body for Moving<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.moved = true;
            return Poll::Ready(r.map(|r| r.map_err(Into::into)));
        }
        let Some(idle) = this.idle else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::now() + idle;
        let timer = match &mut this.timer {
            Some(t) => {
                if std::mem::take(&mut this.moved) {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body as sent upstream: the app's own, or none for a bodiless request sent a
/// second time (see `HttpRoute::forward`'s retry).
pub(super) enum AppBody {
    App(hyper::body::Incoming),
    Empty,
}

impl hyper::body::Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            AppBody::App(b) => Pin::new(b).poll_frame(cx),
            AppBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AppBody::App(b) => b.is_end_stream(),
            AppBody::Empty => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            AppBody::App(b) => b.size_hint(),
            AppBody::Empty => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// A response body that keeps its request open in the connection's watch until it ends.
pub(super) struct Tracked<B> {
    /// The response body as forwarded.
    pub(super) inner: B,
    /// The request counts as open in the connection's watch until this is dropped.
    pub(super) _open: InFlight,
    /// `--access-log request`: the request's record, told the body bytes passing through and
    /// written when this is dropped (the response ended or was cut).
    pub(super) log: Option<Box<RequestLog>>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Some(log), Poll::Ready(Some(Ok(frame)))) = (&mut this.log, &r)
            && let Some(data) = frame.data_ref()
        {
            log.bytes_out += data.remaining() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
