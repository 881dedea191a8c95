//! One dial for `check`: [`upstream::open`] (resolve, connect to each address in turn, or the
//! proxy's tunnel) with a [`Trace`] of what it saw, and a TLS handshake driven by hand, so that
//! everything seen on the way survives a failure: the upstream's chain (recorded by a verifier
//! wrapped around the route's real one, so verdicts are identical), whether it asked for a
//! client certificate and which CA names it gave, and the negotiated parameters.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, ProtocolVersion};
use rustls::{SignatureScheme, SupportedCipherSuite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};

use crate::config::Route;
use crate::egress::Proxy;
use crate::failure::Failure;
use crate::resolve;
use crate::tls::identity::{self, Loaded};
use crate::tls::load::Material;
use crate::transport::Transport;
use crate::upstream::{self, Trace, Unreached};

/// How long to wait after a TLS 1.3 handshake for the upstream's verdict on our certificate,
/// which arrives only after our side is done. A session ticket or data ends the wait early.
const VERDICT_WAIT: Duration = Duration::from_secs(2);

/// What the handshake revealed, whatever its outcome.
#[derive(Debug, Default)]
pub struct Seen {
    /// The upstream's chain as sent, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The upstream sent a certificate request.
    pub requested: bool,
    /// CA names (DER) in that request.
    pub hints: Vec<Vec<u8>>,
}

/// What the recording verifier and certificate resolver saw, shared by both and read after the
/// handshake.
pub type SeenDuringHandshake = Arc<Mutex<Seen>>;

fn lock(seen: &SeenDuringHandshake) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The route's verifier, recording what it was shown.
#[derive(Debug)]
struct RecordingVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    seen: SeenDuringHandshake,
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        lock(&self.seen).chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// The route's client certificate resolver, recording that it was asked and with which hints.
#[derive(Debug)]
struct RecordingResolver {
    inner: Arc<dyn ResolvesClientCert>,
    seen: SeenDuringHandshake,
}

impl ResolvesClientCert for RecordingResolver {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        {
            let mut seen = lock(&self.seen);
            seen.requested = true;
            seen.hints = root_hint_subjects.iter().map(|h| h.to_vec()).collect();
        }
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// The route's own client configuration (provider, versions, ALPN, identity) with recorders
/// around its certificate resolver and a verifier rebuilt the way `identity::build_from`
/// builds it (rustls gives no access to the one inside a config).
pub fn client_config(
    route: &Route,
    material: &Material,
    loaded: &Loaded,
    seen: &SeenDuringHandshake,
) -> Result<Arc<ClientConfig>, String> {
    let verifier = identity::upstream_verifier(&route.tls, material).map_err(|e| e.to_string())?;
    Ok(recording((*loaded.config).clone(), verifier, seen))
}

/// `config` with `verifier` (the one it was built with) and its certificate resolver wrapped in
/// recorders that fill `seen`.
pub fn recording(
    mut config: ClientConfig,
    verifier: Arc<dyn ServerCertVerifier>,
    seen: &SeenDuringHandshake,
) -> Arc<ClientConfig> {
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(RecordingVerifier {
            inner: verifier,
            seen: seen.clone(),
        }));
    config.client_auth_cert_resolver = Arc::new(RecordingResolver {
        inner: config.client_auth_cert_resolver.clone(),
        seen: seen.clone(),
    });
    Arc::new(config)
}

/// `config` with only its certificate resolver wrapped in a recorder (the verifier it was built
/// with stays): what `--reload-canary` dials with, to learn the CA names the upstream accepts.
pub fn recording_request(
    mut config: ClientConfig,
    seen: &SeenDuringHandshake,
) -> Arc<ClientConfig> {
    config.client_auth_cert_resolver = Arc::new(RecordingResolver {
        inner: config.client_auth_cert_resolver.clone(),
        seen: seen.clone(),
    });
    Arc::new(config)
}

pub fn new_seen() -> SeenDuringHandshake {
    Arc::default()
}

/// What was negotiated, as far as the handshake got.
#[derive(Debug, Clone, Default)]
pub struct Negotiated {
    pub version: Option<ProtocolVersion>,
    pub cipher: Option<SupportedCipherSuite>,
    pub alpn: Option<Vec<u8>>,
    pub key_exchange: Option<String>,
}

/// How the dial ended.
#[derive(Debug)]
pub enum Outcome {
    /// The name did not resolve.
    Dns(String),
    /// Every address refused or failed; `Dial::attempts` says how.
    NoConnection,
    /// `--connect-timeout` ran out in this phase (`at` is the address being tried, if any).
    Timeout {
        phase: &'static str,
        at: Option<SocketAddr>,
    },
    /// A TLS error during the handshake: our verdict on the upstream, or its alert.
    Handshake(rustls::Error),
    /// The upstream closed or reset the connection during the handshake.
    HandshakeIo(String),
    /// An alert after our side finished (TLS 1.3: the upstream's verdict on our certificate).
    Rejected(rustls::Error),
    /// Closed or reset right after the handshake, without an alert; `accepted` when a session
    /// ticket came first (so it did take our certificate).
    ClosedAfter { why: String, accepted: bool },
    /// Handshake done and nothing refused within the wait.
    Accepted { spoke_first: usize },
    /// The `--proxy` hop failed (unreachable, TLS, refused CONNECT, 407, not HTTP, timeout).
    Proxy(Failure),
    /// `--protocol`'s in-band TLS start failed (the upstream declined TLS, or answered
    /// something else).
    Opening(Failure),
}

/// Everything `check` reports of one dial: the [`Trace`] of reaching the upstream, then the
/// handshake.
#[derive(Debug)]
pub struct Dial {
    /// The upstream's addresses as resolved (direct routes).
    pub dns: Vec<IpAddr>,
    /// Addresses that could not be connected, and why.
    pub attempts: Vec<(SocketAddr, io::Error)>,
    /// The upstream address connected to (direct routes): where the handshake ran.
    pub connected: Option<SocketAddr>,
    /// Through a proxy: how the tunnel was reached and the proxy's answer to CONNECT.
    pub tunnel: Option<(String, String)>,
    /// `--protocol postgres`: the upstream's answer to `SSLRequest` (`S`, `N`, ...).
    pub postgres: Option<String>,
    /// What the handshake agreed on, as far as it got.
    pub negotiated: Negotiated,
    /// How the dial ended: the route's verdict comes from it.
    pub outcome: Outcome,
}

/// Resolve, connect and handshake within `--connect-timeout`, then wait briefly for a late
/// verdict on our certificate.
pub async fn dial(route: &Route, proxy: Option<&Proxy>, config: Arc<ClientConfig>) -> Dial {
    let deadline = resolve::deadline_after(route.connect_timeout);
    let mut d = Dial {
        dns: Vec::new(),
        attempts: Vec::new(),
        connected: None,
        tunnel: None,
        postgres: None,
        negotiated: Negotiated::default(),
        outcome: Outcome::NoConnection,
    };
    let mut trace = Trace::default();
    let opened = upstream::open(route, proxy, deadline, Some(&mut trace)).await;
    d.dns = trace.dns;
    d.attempts = trace.attempts;
    d.connected = trace.connected;
    d.tunnel = trace.tunnel;
    d.postgres = trace.postgres;
    let transport = match opened {
        Ok(o) => o.transport,
        Err(Unreached::Dns { reason, .. }) => return d.ends(Outcome::Dns(reason)),
        Err(Unreached::NoConnection(_)) => return d.ends(Outcome::NoConnection),
        Err(Unreached::Timeout { phase, at }) => return d.ends(Outcome::Timeout { phase, at }),
        Err(Unreached::Proxy(f)) => return d.ends(Outcome::Proxy(f)),
        Err(Unreached::Opening(f)) => return d.ends(Outcome::Opening(f)),
    };
    let conn = match ClientConnection::new(config, route.server_name.clone()) {
        Ok(c) => c,
        Err(e) => return d.ends(Outcome::Handshake(e)),
    };
    let mut s = Session {
        conn,
        io: transport,
        buf: vec![0; 16 * 1024],
        peer_closed: false,
    };
    let handshake = timeout_at(deadline, s.handshake()).await;
    d.negotiated = s.negotiated();
    let outcome = match handshake {
        Err(_) => Outcome::Timeout {
            phase: upstream::HANDSHAKE_PHASE,
            at: d.connected,
        },
        Ok(Err(Fail::Tls(e))) => Outcome::Handshake(e),
        Ok(Err(Fail::Io(e))) => Outcome::HandshakeIo(e.to_string()),
        Ok(Err(Fail::Eof)) => Outcome::HandshakeIo("it closed the connection".into()),
        Ok(Ok(())) if d.negotiated.version == Some(ProtocolVersion::TLSv1_2) => {
            // The upstream's Finished came after it had judged our certificate.
            Outcome::Accepted { spoke_first: 0 }
        }
        Ok(Ok(())) => s.verdict().await,
    };
    s.close().await;
    d.ends(outcome)
}

impl Dial {
    fn ends(mut self, outcome: Outcome) -> Dial {
        self.outcome = outcome;
        self
    }
}

enum Fail {
    Tls(rustls::Error),
    Io(io::Error),
    Eof,
}

/// A client connection driven by hand over a TCP stream or a proxy's tunnel.
struct Session {
    /// Driven by hand so that what it saw survives a failed handshake.
    conn: ClientConnection,
    /// TCP to the upstream, or the proxy's tunnel.
    io: Transport,
    /// What one read from `io` may bring (one TLS record).
    buf: Vec<u8>,
    /// rustls refused more input: the upstream's close_notify has arrived.
    peer_closed: bool,
}

impl Session {
    async fn flush(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        while self.conn.wants_write() {
            self.conn.write_tls(&mut out)?;
        }
        if !out.is_empty() {
            self.io.write_all(&out).await?;
        }
        Ok(())
    }

    /// Reads once from the socket and processes what came; `Ok(false)` at end of stream.
    async fn pump(&mut self) -> Result<bool, Fail> {
        if self.peer_closed {
            return Ok(false);
        }
        let n = self.io.read(&mut self.buf).await.map_err(Fail::Io)?;
        if n == 0 {
            return Ok(false);
        }
        let mut data = &self.buf[..n];
        let mut failed = None;
        while !data.is_empty() && failed.is_none() {
            match self.conn.read_tls(&mut data) {
                Err(e) => return Err(Fail::Io(e)),
                // rustls takes nothing more once close_notify has arrived: whatever the peer
                // sent after it is ignored. Looping here would spin forever.
                Ok(0) => {
                    self.peer_closed = true;
                    break;
                }
                Ok(_) => {}
            }
            if let Err(e) = self.conn.process_new_packets() {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            // Our alert, if any, so the upstream's log tells the same story; best effort.
            let _ = self.flush().await;
            return Err(Fail::Tls(e));
        }
        Ok(true)
    }

    async fn handshake(&mut self) -> Result<(), Fail> {
        while self.conn.is_handshaking() {
            self.flush().await.map_err(Fail::Io)?;
            if !self.pump().await? {
                return Err(Fail::Eof);
            }
        }
        self.flush().await.map_err(Fail::Io)
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            version: self.conn.protocol_version(),
            cipher: self.conn.negotiated_cipher_suite(),
            alpn: self.conn.alpn_protocol().map(<[u8]>::to_vec),
            key_exchange: self
                .conn
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
        }
    }

    /// TLS 1.3: the upstream judges our certificate after our side is done. A session ticket
    /// (sent only once it accepted our Finished, which comes after our certificate) or
    /// application data means it accepted; an alert means it did not; silence for
    /// [`VERDICT_WAIT`] counts as accepted.
    async fn verdict(&mut self) -> Outcome {
        let deadline = Instant::now() + VERDICT_WAIT;
        let mut spoke_first = 0;
        loop {
            if self.conn.tls13_tickets_received() > 0 || spoke_first > 0 {
                return Outcome::Accepted { spoke_first };
            }
            match timeout_at(deadline, self.pump()).await {
                Err(_) => return Outcome::Accepted { spoke_first },
                Ok(Err(Fail::Tls(e))) => return Outcome::Rejected(e),
                Ok(Err(Fail::Io(e))) => return self.closed(format!("the connection failed: {e}")),
                Ok(Err(Fail::Eof)) | Ok(Ok(false)) => {
                    return self.closed("it closed the connection".into());
                }
                Ok(Ok(true)) => {
                    let mut plain = [0u8; 4096];
                    loop {
                        match io::Read::read(&mut self.conn.reader(), &mut plain) {
                            Ok(0) => {
                                return self
                                    .closed("it closed the connection (close_notify)".into());
                            }
                            Ok(n) => spoke_first += n,
                            Err(_) => break,
                        }
                    }
                }
            }
        }
    }

    fn closed(&self, why: String) -> Outcome {
        Outcome::ClosedAfter {
            why,
            accepted: self.conn.tls13_tickets_received() > 0,
        }
    }

    /// A polite close_notify and FIN, bounded.
    async fn close(&mut self) {
        self.conn.send_close_notify();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            let _ = self.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }
}
