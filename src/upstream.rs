//! Reaching the upstream: resolve (at every dial), connect to each address in turn (to the
//! upstream, or to the route's proxy and then through its tunnel), TLS handshake. Every phase
//! ends by one deadline, `--connect-timeout` from the start of the dial, and a phase that does
//! not is named in the failure. How each way can fail is classified in [`crate::failure`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio::time::timeout_at;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::cli::Protocol;
use crate::config::Route;
use crate::egress::{Proxy, tunnel};
use crate::failure::{Class, Failure, classify_io};
use crate::otel;
use crate::postgres;
use crate::resolve::{self, ConnectEnd, Resolver};
use crate::transport::Transport;

type Deadline = tokio::time::Instant;

/// The phases of `--connect-timeout`, as failures and `check` name them. Through a proxy, the
/// CONNECT tunnel adds its own ([`tunnel::PROXY_TLS_PHASE`], [`tunnel::CONNECT_PHASE`]).
pub const RESOLVE_PHASE: &str = "resolve";
pub const CONNECT_PHASE: &str = "connect";
pub const HANDSHAKE_PHASE: &str = "tls handshake";
const RESOLVE_PROXY_PHASE: &str = "resolve the proxy";
const CONNECT_PROXY_PHASE: &str = "connect to the proxy";

/// The upstream TLS stream a connection relays into.
pub type Upstream = TlsStream<Transport>;

/// Display form of a server name for messages.
pub fn server_name_str(route: &Route) -> String {
    match &route.server_name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// An established upstream connection.
pub struct Connected {
    /// What the connection relays into.
    pub stream: Upstream,
    /// How long the TLS handshake took, for the handshake-duration metric.
    pub handshake: Duration,
}

/// What `check` reports of a dial, recorded on the way; connections record nothing.
#[derive(Debug, Default)]
pub struct Trace {
    /// The upstream's addresses as resolved, each once. Direct routes only: through a proxy,
    /// the proxy resolves the upstream's name.
    pub dns: Vec<IpAddr>,
    /// Upstream addresses that could not be connected, and why, in the order tried.
    pub attempts: Vec<(SocketAddr, io::Error)>,
    /// The upstream address connected to (direct routes).
    pub connected: Option<SocketAddr>,
    /// Through a proxy: how the tunnel was reached ([`path_to_upstream`]) and the proxy's
    /// answer to CONNECT (`200 Connection established`).
    pub tunnel: Option<(String, String)>,
    /// `--protocol postgres`: the upstream's answer to `SSLRequest`, as shown (`S`, `N`, ...).
    pub postgres: Option<String>,
}

/// Why no byte stream to the upstream was opened.
#[derive(Debug)]
pub enum Unreached {
    /// The upstream's name did not resolve: `reason` as the resolver gave it, `failure` as a
    /// connection reports it.
    Dns { reason: String, failure: Failure },
    /// Every upstream address failed (the trace's attempts say how): the last one's failure.
    NoConnection(Failure),
    /// `--connect-timeout` ran out in `phase`, while connecting to `at` if it says so.
    Timeout {
        phase: &'static str,
        at: Option<SocketAddr>,
    },
    /// The proxy hop failed: unreachable, TLS, refused CONNECT, 407, not HTTP, or timed out.
    Proxy(Failure),
    /// The in-band TLS start (`--protocol`) failed: the upstream declined TLS, answered
    /// something else, closed, or injected bytes.
    Opening(Failure),
}

impl Unreached {
    /// The failure's reason, as a connection would report it.
    pub fn reason(&self) -> &'static str {
        match self {
            Unreached::Dns { failure, .. }
            | Unreached::NoConnection(failure)
            | Unreached::Proxy(failure)
            | Unreached::Opening(failure) => failure.class.reason(),
            Unreached::Timeout { .. } => Class::Timeout.reason(),
        }
    }

    /// The failure a connection reports.
    pub fn into_failure(self, route: &Route, proxy: Option<&Proxy>) -> Failure {
        match self {
            Unreached::Dns { failure, .. }
            | Unreached::NoConnection(failure)
            | Unreached::Proxy(failure)
            | Unreached::Opening(failure) => failure,
            Unreached::Timeout { phase, .. } => timed_out(route, proxy, phase),
        }
    }
}

/// Resolve `host` and connect to each address in turn (see [`crate::resolve`]), both bounded by
/// `deadline`. For the proxy (`proxy` set) every failure is `ProxyUnreachable`. What happened
/// is recorded in `trace`, if any.
async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    mut trace: Option<&mut Trace>,
) -> Result<(TcpStream, SocketAddr), Unreached> {
    let (resolve_phase, connect_phase) = match proxy {
        Some(_) => (RESOLVE_PROXY_PHASE, CONNECT_PROXY_PHASE),
        None => (RESOLVE_PHASE, CONNECT_PHASE),
    };
    // Messages are made only when something failed: nothing here allocates on success.
    let what = || match proxy {
        Some(p) => format!("the proxy {}", p.url),
        None => "the upstream".to_string(),
    };
    let fail = |class: Class, message: String| match proxy {
        Some(_) => Failure::new(Class::ProxyUnreachable, message),
        None => Failure::new(class, message),
    };
    // The lookup ends by `deadline` on its own.
    let addrs = match Resolver::global().lookup(host, port, deadline).await {
        Ok(a) => a,
        Err(resolve::Error::Timeout) => {
            return Err(Unreached::Timeout {
                phase: resolve_phase,
                at: None,
            });
        }
        Err(e) => {
            return Err(Unreached::Dns {
                failure: fail(
                    Class::Dns,
                    format!("cannot resolve {} host {host}: {e}", what()),
                ),
                reason: e.to_string(),
            });
        }
    };
    if let Some(t) = trace.as_deref_mut() {
        for a in &addrs {
            if !t.dns.contains(&a.ip()) {
                t.dns.push(a.ip());
            }
        }
    }
    if addrs.is_empty() {
        return Err(Unreached::Dns {
            failure: fail(
                Class::Dns,
                format!("{} host {host} resolved to no address", what()),
            ),
            reason: "no address".into(),
        });
    }
    let mut untraced = Vec::new();
    let attempts = match trace {
        Some(t) => &mut t.attempts,
        None => &mut untraced,
    };
    // Each connect ends by `deadline` on its own.
    match resolve::connect_each(&addrs, deadline, attempts).await {
        Ok(found) => Ok(found),
        Err(ConnectEnd::Deadline { at }) => Err(Unreached::Timeout {
            phase: connect_phase,
            at: Some(at),
        }),
        Err(ConnectEnd::AllFailed) => Err(all_failed(attempts, proxy, connect_phase)),
    }
}

/// Every address failed: the last one's failure, and how many others.
fn all_failed(
    attempts: &[(SocketAddr, io::Error)],
    proxy: Option<&Proxy>,
    connect_phase: &'static str,
) -> Unreached {
    // `connect_each` records every address that failed, and there was at least one.
    let Some((addr, e)) = attempts.last() else {
        return Unreached::Timeout {
            phase: connect_phase,
            at: None,
        };
    };
    let others = match attempts.len() - 1 {
        0 => String::new(),
        n => format!("; {n} other address(es) failed too"),
    };
    let f = classify_io(e, "");
    Unreached::NoConnection(match proxy {
        Some(p) => Failure::new(
            Class::ProxyUnreachable,
            format!(
                "cannot connect to the proxy {}: {e} ({addr}){others}",
                p.url
            ),
        ),
        None => Failure::new(f.class, format!("{} ({addr}){others}", f.message)),
    })
}

/// A byte stream to the upstream, ready for its TLS handshake.
pub struct Opened {
    /// What the TLS session runs over.
    pub transport: Transport,
    /// The address connected to: the upstream's, or the proxy's.
    pub addr: SocketAddr,
}

/// How a stream connected to `addr` reached the upstream, for messages: `ADDR`, or
/// `via proxy URL at ADDR`.
pub fn path_to_upstream(proxy: Option<&Proxy>, addr: SocketAddr) -> String {
    match proxy {
        Some(p) => format!("via proxy {} at {addr}", p.url),
        None => addr.to_string(),
    }
}

/// The byte stream the upstream TLS session runs over: TCP to the upstream, or a tunnel
/// through the route's opened proxy, `proxy` (CONNECT with the upstream's name, resolved by
/// the proxy), after the route's in-band TLS start (`--protocol`), if any. Every phase ends by
/// `deadline`; what happened is recorded in `trace`, if any. Every dial goes through here:
/// connections, `check`, `/upstreamz` probes and reload canaries.
pub async fn open(
    route: &Route,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    mut trace: Option<&mut Trace>,
) -> Result<Opened, Unreached> {
    let mut opened = open_stream(route, proxy, deadline, trace.as_deref_mut()).await?;
    if route.protocol == Protocol::Postgres {
        postgres_opening(route, proxy, &mut opened, deadline, trace).await?;
    }
    Ok(opened)
}

/// `--protocol postgres`: `SSLRequest`, and exactly `S` back, within `deadline`.
async fn postgres_opening(
    route: &Route,
    proxy: Option<&Proxy>,
    opened: &mut Opened,
    deadline: Deadline,
    trace: Option<&mut Trace>,
) -> Result<(), Unreached> {
    let named = || {
        format!(
            "{} ({})",
            route.upstream,
            path_to_upstream(proxy, opened.addr)
        )
    };
    let answer = match timeout_at(deadline, postgres::io::request_tls(&mut opened.transport)).await
    {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let f = classify_io(&e, &server_name_str(route));
            let f = Failure::new(
                f.class,
                format!("{} during SSLRequest ({})", f.message, named()),
            );
            return Err(Unreached::Opening(f));
        }
        Err(_) => {
            return Err(Unreached::Timeout {
                phase: postgres::SSL_REQUEST_PHASE,
                at: proxy.is_none().then_some(opened.addr),
            });
        }
    };
    if let Some(t) = trace {
        t.postgres = Some(answer.shown());
    }
    if let Some(f) = postgres::io::refusal(&answer, &named()) {
        return Err(Unreached::Opening(f));
    }
    Ok(())
}

/// [`open`] without the in-band TLS start.
async fn open_stream(
    route: &Route,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    mut trace: Option<&mut Trace>,
) -> Result<Opened, Unreached> {
    let Some(proxy) = proxy else {
        let upstream = &route.upstream;
        let mut phase = otel::Phase::start(otel::CONNECT);
        let dialled = dial(
            &upstream.host,
            upstream.port,
            None,
            deadline,
            trace.as_deref_mut(),
        );
        let (tcp, addr) = dialled.await.inspect_err(|e| phase.fail(e.reason()))?;
        phase.end();
        if let Some(t) = trace {
            t.connected = Some(addr);
        }
        return Ok(Opened {
            transport: Transport::tcp(tcp),
            addr,
        });
    };
    let mut phase = otel::Phase::start(otel::CONNECT);
    let (tcp, addr) = dial(&proxy.url.host, proxy.url.port, Some(proxy), deadline, None)
        .await
        .map_err(|e| Unreached::Proxy(e.into_failure(route, Some(proxy))))
        .inspect_err(|e| phase.fail(e.reason()))?;
    phase.end();
    let mut phase = otel::Phase::start(otel::PROXY_CONNECT);
    let target = route.upstream.to_string();
    let (transport, answer) = tunnel::open(proxy, tcp, &target, deadline, |phase| {
        timed_out(route, Some(proxy), phase)
    })
    .await
    .map_err(Unreached::Proxy)
    .inspect_err(|e| phase.fail(e.reason()))?;
    phase.end();
    if let Some(t) = trace {
        t.tunnel = Some((path_to_upstream(Some(proxy), addr), answer));
    }
    Ok(Opened { transport, addr })
}

/// `--connect-timeout` ran out while in `phase`.
pub fn timed_out(route: &Route, proxy: Option<&Proxy>, phase: &str) -> Failure {
    let via = match proxy {
        Some(p) => format!(", via proxy {}", p.url),
        None => String::new(),
    };
    Failure::new(
        Class::Timeout,
        format!(
            "no TLS session with the upstream within --connect-timeout {} (stuck in {phase}{via})",
            humantime::format_duration(route.connect_timeout)
        ),
    )
}

/// Resolve, connect (each address in turn; through the proxy if any) and handshake, all within
/// `--connect-timeout`. `proxy` is the route's opened proxy, if it tunnels.
pub async fn connect(
    route: &Route,
    proxy: Option<&Proxy>,
    config: Arc<ClientConfig>,
) -> Result<Connected, Failure> {
    let deadline = resolve::deadline_after(route.connect_timeout);
    let opened = open(route, proxy, deadline, None)
        .await
        .map_err(|e| e.into_failure(route, proxy))?;
    let started = Instant::now();
    let mut phase = otel::Phase::start(otel::TLS_HANDSHAKE);
    let addr = opened.addr;
    let handshake = TlsConnector::from(config).connect(route.server_name.clone(), opened.transport);
    let stream = timeout_at(deadline, handshake)
        .await
        .map_err(|_| timed_out(route, proxy, HANDSHAKE_PHASE))
        .inspect_err(|f| phase.fail(f.class.reason()))?
        .map_err(|e| {
            let mut f = classify_io(&e, &server_name_str(route));
            if f.class == Class::Reset || f.class == Class::Io {
                f = Failure::new(
                    Class::Protocol,
                    format!("the upstream closed the connection during the TLS handshake: {e}"),
                );
            }
            f.message = format!("{} ({})", f.message, path_to_upstream(proxy, addr));
            f
        })
        .inspect_err(|f| phase.fail(f.class.reason()))?;
    phase.end();
    Ok(Connected {
        stream,
        handshake: started.elapsed(),
    })
}
