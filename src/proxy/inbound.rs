//! Inbound tcp mode: a client's mTLS connection (handshake bounded by `--handshake-timeout`,
//! chain and authorization checked by the route's server configuration) relayed to the
//! route's plaintext target. A refused client never causes a dial to the target.
//!
//! The [`Relay`]'s near side is the target socket (driven by readiness, so its back-pressure
//! stays in the kernel) and its far side the client's TLS stream, exactly as outbound has the
//! app near and the upstream TLS far: the same code path and the same memory bound.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::counting::Counts;
use super::cut::CutWait;
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::RouteCtx;
use super::client::Client;
use super::relay::{self, Moved, Relay};
use crate::cli::{Mode, ProxyProtocol};
use crate::config::{Inbound, Target};
use crate::failure::Class;
use crate::inbound::proxy_protocol::{self, TlsFacts};
use crate::listen::LogLimit;
use crate::otel::{ConnSpan, Direction};
use crate::resolve::{self, Resolver};
use crate::transport::ReadySocket;

/// Why an inbound connection was refused before any byte was relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoClientCert,
    UnknownCa,
    Expired,
    Revoked,
    NotAllowed,
    HandshakeTimeout,
    Protocol,
    TargetRefused,
    TargetTimeout,
    /// A `--spiffe` route with no identity in force, none within `--connect-timeout`.
    NoIdentity,
}

impl Refusal {
    /// The access line's `reason` and the `connection_failures_total` label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoClientCert => "no_client_cert",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::NotAllowed => "not_allowed",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::Protocol => "protocol",
            Refusal::TargetRefused => "target_refused",
            Refusal::TargetTimeout => "target_timeout",
            Refusal::NoIdentity => "no_identity",
        }
    }

    /// The `connections_total` outcome.
    pub fn outcome(self) -> &'static str {
        match self {
            Refusal::HandshakeTimeout | Refusal::TargetTimeout => "timeout",
            Refusal::TargetRefused => "connect_error",
            Refusal::NoIdentity => "error",
            _ => "tls_error",
        }
    }

    /// A failed server handshake, by the rustls error inside the I/O error.
    pub fn of_handshake(e: &io::Error) -> Refusal {
        use rustls::CertificateError as C;
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return Refusal::Protocol;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Refusal::NoClientCert,
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer | C::BadSignature => Refusal::UnknownCa,
                C::Expired | C::ExpiredContext { .. } => Refusal::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Refusal::Expired,
                C::Revoked => Refusal::Revoked,
                C::ApplicationVerificationFailure => Refusal::NotAllowed,
                // A SPIFFE peer whose trust domain has no bundle (or no SPIFFE ID): no CA of
                // ours can vouch for it.
                C::Other(rustls::OtherError(inner))
                    if inner
                        .downcast_ref::<crate::spiffe::verify::SpiffeError>()
                        .is_some() =>
                {
                    Refusal::UnknownCa
                }
                _ => Refusal::Protocol,
            },
            _ => Refusal::Protocol,
        }
    }
}

/// How the connection ended, for the access line and the metrics.
pub(super) enum End {
    Ok,
    Refused(Refusal, String),
    Failed(Class, String),
}

impl End {
    /// The outcome, and the reason of a failure.
    fn outcome(&self) -> (&'static str, Option<&'static str>) {
        match self {
            End::Ok => ("ok", None),
            End::Refused(r, _) => (r.outcome(), Some(r.reason())),
            End::Failed(c, _) => (c.outcome(), Some(c.reason())),
        }
    }
}

/// The inbound access-log record of one connection; logs itself when dropped.
pub(super) struct InboundLog<'a> {
    ctx: &'a RouteCtx,
    peer: String,
    target: String,
    started: Instant,
    client: Client,
    /// Near = target, far = client: `near_to_far` is bytes to the client.
    moved: Moved,
    pub(super) end: End,
    /// The route's refusal-line limiter.
    limit: &'a Mutex<LogLimit>,
    /// tcp mode: the connection's OpenTelemetry span (nothing when traces are off).
    span: ConnSpan,
}

impl Drop for InboundLog<'_> {
    fn drop(&mut self) {
        let m = &self.ctx.metrics;
        m.active.dec();
        let (route, peer, target) = (&self.ctx.route.name, &self.peer, &self.target);
        let (client, client_id) = (&self.client.subject, &self.client.id);
        let (to_client, from_client) = (self.moved.near_to_far, self.moved.far_to_near);
        let duration_ms = self.started.elapsed().as_millis() as u64;
        m.connection_ended(self.started);
        let (outcome, reason) = self.end.outcome();
        self.span
            .end(client_id, (to_client, from_client), outcome, reason);
        match &self.end {
            End::Ok => {
                m.connection_finished(None);
                // `--access-log off`: no info line (refusals and failures still warn).
                if self.ctx.route.ops.connection_lines() {
                    info!(
                        route = %route, peer = %peer, client = ?client, client_id = ?client_id,
                        target = %target, bytes_from_client = from_client,
                        bytes_to_client = to_client, duration_ms, outcome = %"ok", "connection"
                    );
                }
            }
            End::Refused(r, error) => {
                m.refused(r.outcome(), r.reason());
                let allowed = self.limit.lock().ok().and_then(|mut l| l.allow());
                if let Some(suppressed) = allowed {
                    warn!(
                        route = %route, peer = %peer, client = ?client,
                        client_id = ?client_id, target = %target, bytes_from_client = from_client,
                        bytes_to_client = to_client, duration_ms, outcome = %r.outcome(),
                        reason = %r.reason(), error = ?error, suppressed, "connection"
                    );
                }
            }
            End::Failed(class, error) => {
                m.connection_finished(Some(*class));
                warn!(
                    route = %route, peer = %peer, client = ?client, client_id = ?client_id,
                    target = %target, bytes_from_client = from_client,
                    bytes_to_client = to_client, duration_ms, outcome = %class.outcome(),
                    reason = %class.reason(), error = ?error, "connection"
                );
            }
        }
    }
}

/// The target socket, TCP or unix.
pub(crate) enum TargetConn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Dial the target under `--connect-timeout` (`limit`), resolving a name afresh on the
/// resolver's own bounded threads; `check` dials the target through this too.
pub(crate) async fn dial(
    target: &Target,
    limit: std::time::Duration,
) -> Result<TargetConn, (Refusal, String)> {
    let deadline = resolve::deadline_after(limit);
    let timeout = || {
        let t = humantime::format_duration(limit);
        (
            Refusal::TargetTimeout,
            format!("no answer from the target within --connect-timeout {t}"),
        )
    };
    match target {
        Target::Unix(path) => {
            match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
                Err(_) => Err(timeout()),
                Ok(Err(e)) => Err((
                    Refusal::TargetRefused,
                    format!("cannot connect to the target: {e}"),
                )),
                Ok(Ok(s)) => Ok(TargetConn::Unix(s)),
            }
        }
        Target::Tcp(u) => {
            let addrs = Resolver::global()
                .lookup(&u.host, u.port, deadline)
                .await
                .map_err(|e| {
                    (
                        Refusal::TargetRefused,
                        format!("cannot resolve the target: {e:?}"),
                    )
                })?;
            let mut attempts = Vec::new();
            match resolve::connect_each(&addrs, deadline, &mut attempts).await {
                Ok((s, _)) => Ok(TargetConn::Tcp(s)),
                Err(resolve::ConnectEnd::Deadline { .. }) => Err(timeout()),
                Err(resolve::ConnectEnd::AllFailed) => {
                    let what: Vec<String> =
                        attempts.iter().map(|(a, e)| format!("{a}: {e}")).collect();
                    Err((
                        Refusal::TargetRefused,
                        format!("cannot connect to the target: {}", what.join("; ")),
                    ))
                }
            }
        }
    }
}

/// The client's TLS handshake under `--handshake-timeout`, or how it ended.
async fn accept<S>(
    config: Arc<rustls::ServerConfig>,
    inbound: &Inbound,
    conn: S,
    cut: &CancellationToken,
) -> Result<tokio_rustls::server::TlsStream<S>, End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = tokio::time::timeout(
        inbound.handshake_timeout,
        TlsAcceptor::from(config).accept(conn).into_fallible(),
    );
    tokio::select! {
        r = accept => match r {
            Err(_) => {
                let t = humantime::format_duration(inbound.handshake_timeout);
                Err(End::Refused(Refusal::HandshakeTimeout, format!("no complete TLS handshake within --handshake-timeout {t}")))
            }
            Ok(Err((e, io))) => {
                linger(io).await;
                let why = crate::spiffe::verify::explain(&e).unwrap_or_else(|| e.to_string());
                Err(End::Refused(Refusal::of_handshake(&e), format!("client handshake failed: {why}")))
            }
            Ok(Ok(s)) => Ok(s),
        },
        _ = cut.cancelled() => Err(End::Failed(Class::Drain, "cut at shutdown during the client's handshake".into())),
    }
}

/// Close a refused client's socket so that the alert just written reaches it: send FIN, then
/// read and drop what the client still sends (at most 64 KiB, for at most 500 ms). Closing with
/// unread bytes (a TLS 1.3 client's first request, sent right after its Finished) would make
/// the kernel answer RST and throw the alert away (nginx's lingering close, bounded).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    use tokio::io::AsyncReadExt;
    const LINGER_BYTES: usize = 64 * 1024;
    const LINGER_TIME: std::time::Duration = std::time::Duration::from_millis(500);
    let drain = async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let mut seen = 0;
        while seen < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// The client's side of one inbound connection, both modes: counted in `active_connections`
/// from accept, TLS handshake under `--handshake-timeout`. A refused client is logged (the
/// record drops here) and `None` is returned: nothing is dialled for it.
pub(super) async fn handshake<'a, S>(
    ctx: &'a RouteCtx,
    inbound: &Inbound,
    conn: S,
    peer: String,
    cut: &CancellationToken,
) -> Option<(tokio_rustls::server::TlsStream<S>, InboundLog<'a>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ctx.metrics.active.inc();
    let mut log = InboundLog {
        ctx,
        target: inbound.target.to_string(),
        started: Instant::now(),
        client: Client::of(None),
        moved: Moved::default(),
        end: End::Refused(Refusal::Protocol, "ended before the handshake".into()),
        limit: &ctx.refusals,
        // http mode traces each request instead.
        span: ConnSpan::start_if(
            ctx.route.mode == Mode::Tcp,
            &ctx.route.name,
            &peer,
            Direction::Inbound,
        ),
        peer,
    };
    let config = match ctx.identity_within_timeout().await {
        Ok(loaded) => loaded.server.clone()?,
        Err(f) => {
            log.end = End::Refused(Refusal::NoIdentity, f.message);
            return None;
        }
    };
    let accepted = accept(config, inbound, conn, cut);
    let tls = match log.span.handshake(accepted, |e: &End| e.outcome().1).await {
        Ok(s) => s,
        Err(end) => {
            log.end = end;
            return None;
        }
    };
    log.client = Client::of(leaf_of(tls.get_ref().1));
    Some((tls, log))
}

/// The verified client's leaf certificate (DER).
pub(super) fn leaf_of(tls: &rustls::ServerConnection) -> Option<&[u8]> {
    tls.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref())
}

/// Serve one inbound tcp-mode connection; its access line is written when it ends.
/// `addrs` are the client's and our own address (a TCP listener), for the PROXY header.
pub(super) async fn handle<S>(
    ctx: &RouteCtx,
    inbound: &Inbound,
    conn: S,
    peer: String,
    addrs: Option<(SocketAddr, SocketAddr)>,
    cut: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The handshake and the dial run boxed: their futures are large and over once the relay
    // starts, and a task is as big as its largest state for as long as it lives (an idle
    // connection would carry their room for nothing).
    let Some((mut tls, mut log)) = Box::pin(handshake(ctx, inbound, conn, peer, &cut)).await else {
        return;
    };
    // The PROXY header goes to the target before any client byte (built now: the TLS facts).
    let header = inbound
        .proxy_protocol
        .map(|v| proxy_header(v, addrs, tls.get_ref().1));
    let target = tokio::select! {
        t = Box::pin(dial(&inbound.target, ctx.route.connect_timeout)) => t,
        _ = cut.cancelled() => {
            log.end = End::Failed(Class::Drain, "cut at shutdown before the target answered".into());
            return;
        }
    };
    let result = match target {
        Err((r, msg)) => {
            log.end = End::Refused(r, msg);
            return;
        }
        Ok(TargetConn::Tcp(mut t)) => match send_header(ctx, &mut t, header.as_deref()).await {
            Ok(()) => relay_to(ctx, &mut t, &mut tls, &mut log.moved, &cut).await,
            Err(e) => Err(e),
        },
        Ok(TargetConn::Unix(mut t)) => match send_header(ctx, &mut t, header.as_deref()).await {
            Ok(()) => relay_to(ctx, &mut t, &mut tls, &mut log.moved, &cut).await,
            Err(e) => Err(e),
        },
    };
    log.end = match result {
        Ok(()) => End::Ok,
        Err((class, msg)) => End::Failed(class, msg),
    };
}

impl InboundLog<'_> {
    /// An http-mode connection ended: `failure` is why, if it was not a normal close (the
    /// client's, a graceful shutdown or an idle keep-alive connection closed), and `counts`
    /// the plaintext bytes its TLS stream carried.
    pub(super) fn http_ended(&mut self, failure: Option<(Class, &str)>, counts: &Counts) {
        self.moved.far_to_near = counts.read.load(Ordering::Relaxed);
        self.moved.near_to_far = counts.written.load(Ordering::Relaxed);
        self.end = match failure {
            None => End::Ok,
            Some((class, msg)) => End::Failed(class, msg.into()),
        };
    }

    /// The connection is refused after the handshake (the access line says why).
    pub(super) fn refuse(&mut self, refusal: Refusal, msg: String) {
        self.end = End::Refused(refusal, msg);
    }
}

/// The `--proxy-protocol` header for this connection. Without addresses (a unix listener) v1
/// says `UNKNOWN` and v2 is a `LOCAL` header, which the spec provides for exactly that.
fn proxy_header(
    version: ProxyProtocol,
    addrs: Option<(SocketAddr, SocketAddr)>,
    tls: &rustls::ServerConnection,
) -> Vec<u8> {
    match (version, addrs) {
        (ProxyProtocol::V1, Some((client, local))) => proxy_protocol::v1(client, local),
        (ProxyProtocol::V2, Some((client, local))) => {
            proxy_protocol::v2(client, local, Some(&TlsFacts::of(tls)))
        }
        (ProxyProtocol::V1, None) => b"PROXY UNKNOWN\r\n".to_vec(),
        (ProxyProtocol::V2, None) => {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            // Version 2, command LOCAL; family unspecified; no address block.
            h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            h
        }
    }
}

/// Write the PROXY header, if any, to the fresh target connection, within `--connect-timeout`.
async fn send_header<T: AsyncWrite + Unpin>(
    ctx: &RouteCtx,
    target: &mut T,
    header: Option<&[u8]>,
) -> Result<(), (Class, String)> {
    let Some(header) = header else {
        return Ok(());
    };
    match tokio::time::timeout(ctx.route.connect_timeout, target.write_all(header)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err((
            Class::Io,
            format!("cannot send the PROXY header to the target: {e}"),
        )),
        Err(_) => Err((
            Class::Timeout,
            "the target did not take the PROXY header within --connect-timeout".into(),
        )),
    }
}

/// Relay between the target (near) and the client's TLS stream (far) until both ends close.
async fn relay_to<T, C>(
    ctx: &RouteCtx,
    target: &mut T,
    client: &mut C,
    moved: &mut Moved,
    cut: &CancellationToken,
) -> Result<(), (Class, String)>
where
    T: ReadySocket,
    C: AsyncRead + AsyncWrite + Unpin,
{
    let m = &ctx.metrics;
    // Near -> far is target -> client (`from_upstream`), far -> near client -> target.
    let totals = (&m.bytes_from_upstream, &m.bytes_to_upstream);
    let relay = Relay::new(target, client, moved, totals, ctx.route.idle_timeout);
    let r = tokio::select! {
        biased;
        r = relay => r,
        () = CutWait::new(cut.cancelled()) => return Err((Class::Drain, "cut: still open when --drain-timeout ran out".into())),
    };
    match r {
        Ok(()) => Ok(()),
        Err(relay::Error::Idle(limit)) => Err((
            Class::Idle,
            format!(
                "no traffic for --idle-timeout {}",
                humantime::format_duration(limit)
            ),
        )),
        Err(relay::Error::Near(e)) => Err((Class::Io, format!("target connection i/o error: {e}"))),
        Err(relay::Error::Far(e)) => Err((Class::Reset, format!("client connection error: {e}"))),
    }
}
