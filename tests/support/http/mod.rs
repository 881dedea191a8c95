//! Both sides of the proxy in http mode.
//!
//! Upstream side: [`HttpUpstream`], an mTLS server built from tokio-rustls and hyper that speaks
//! h2 or HTTP/1.1 as ALPN decides and records what reached it: each TLS connection (the ALPN
//! protocols offered and agreed, SNI, the client certificate's serial, whether it has closed)
//! and each request (method, target, version, `:authority`, every header). Paths select what
//! it answers (see [`HttpUpstream`]). [`RawUpstream`] is a hand-written HTTP/1.1 server for the
//! cases hyper will not produce: closing an idle connection without a word, resetting after a
//! request's head.
//!
//! App side: hyper clients over plain TCP (HTTP/1.1 and h2c with prior knowledge), raw request
//! helpers for what a well-behaved client never sends, and checks of the proxy's own error
//! answers. Every wait is bounded.

mod answers;
mod client;
mod hyper_upstream;
mod raw_client;
mod raw_upstream;
mod records;

pub use answers::*;
pub use client::*;
pub use hyper_upstream::*;
pub use raw_client::*;
pub use raw_upstream::*;
pub use records::*;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls::server::Acceptor;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use super::pki::{common_name, serial_of};
use super::upstream::server_config;
use super::{Cmd, Pki, WAIT, connect, hex, pattern, run_cmd};

/// The `Host` the app sends; the upstream must never see it.
pub const APP_HOST: &str = "app.invalid";

/// Transfers of many MiB get longer than [`WAIT`]: a debug build on 2 loaded cores is slow.
pub const BIG_WAIT: Duration = Duration::from_secs(90);

/// `mtls-sidecar run --mode http` towards `upstream` with the test identity and CA.
pub fn http_cmd(pki: &Pki, upstream: impl std::fmt::Display) -> Cmd {
    run_cmd(pki, upstream).args(["--mode", "http"])
}

/// Polls `pred` until it holds; fails with `what` after `limit`.
pub async fn eventually(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// The one body type of both sides.
pub type Body = BoxBody<Bytes, io::Error>;

pub type FrameTx = mpsc::Sender<Result<Frame<Bytes>, io::Error>>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body fed frame by frame through a channel; it ends when the sender is dropped. It has no
/// known length, so HTTP/1.1 sends it chunked.
pub fn channel_body() -> (FrameTx, Body) {
    let (tx, rx) = mpsc::channel(2);
    (tx, ChanBody(rx).boxed())
}

struct ChanBody(mpsc::Receiver<Result<Frame<Bytes>, io::Error>>);

impl HttpBody for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx)
    }
}

fn incoming(body: Incoming) -> Body {
    body.map_err(io::Error::other).boxed()
}

fn text(status: u16, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full(body.into()))
        .expect("response")
}
