//! Reaching the upstream: resolve (at every dial), connect to each address in turn, TLS
//! handshake, all under `--connect-timeout`. How each way can fail is classified in
//! [`crate::failure`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::bufio::LazyBufTcp;
use crate::config::Route;
use crate::egress::{Prefixed, Proxy, Transport};
use crate::failure::{Class, Failure, classify_io};
use crate::resolve::{self, Resolver};

type Deadline = tokio::time::Instant;

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
    pub stream: Upstream,
    pub handshake: Duration,
}

/// Resolve `host` and connect to each address in turn (see [`crate::resolve`]), all before
/// `deadline`. For the proxy (`proxy` set) every failure is `ProxyUnreachable`.
async fn dial(
    host: &str,
    port: u16,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    phase: &mut &'static str,
) -> Result<(TcpStream, SocketAddr), Failure> {
    // Messages are made only when something failed: nothing here allocates on success.
    let what = || match proxy {
        Some(p) => format!("the proxy {}", p.url),
        None => "the upstream".to_string(),
    };
    let fail = |class: Class, message: String| match proxy {
        Some(_) => Failure::new(Class::ProxyUnreachable, message),
        None => Failure::new(class, message),
    };
    let addrs = match Resolver::global().lookup(host, port, deadline).await {
        Ok(a) => a,
        // Out of time: the caller's timeout names the phase.
        Err(resolve::Error::Timeout) => return std::future::pending().await,
        Err(e) => {
            return Err(fail(
                Class::Dns,
                format!("cannot resolve {} host {host}: {e}", what()),
            ));
        }
    };
    if addrs.is_empty() {
        return Err(fail(
            Class::Dns,
            format!("{} host {host} resolved to no address", what()),
        ));
    }
    *phase = if proxy.is_some() {
        "connect to the proxy"
    } else {
        "connect"
    };
    let mut attempts = Vec::new();
    match resolve::connect_each(&addrs, deadline, &mut attempts).await {
        Ok(found) => return Ok(found),
        // Out of time: the caller's timeout names the phase.
        Err(resolve::ConnectEnd::Deadline { .. }) => return std::future::pending().await,
        Err(resolve::ConnectEnd::AllFailed) => {}
    }
    // Every address failed: report the last one, and how many others.
    let Some((e, addr)) = attempts.pop().map(|(a, e)| (e, a)) else {
        return std::future::pending().await;
    };
    let others = match attempts.len() {
        0 => String::new(),
        n => format!("; {n} other address(es) failed too"),
    };
    let f = classify_io(&e, "");
    let message = match proxy {
        Some(_) => format!("cannot connect to {}: {e} ({addr}){others}", what()),
        None => format!("{} ({addr}){others}", f.message),
    };
    Err(fail(f.class, message))
}

/// A byte stream to the upstream, ready for its TLS handshake.
pub struct Opened {
    pub transport: Transport,
    /// The address connected to: the upstream's, or the proxy's.
    pub addr: SocketAddr,
    /// The proxy's answer to CONNECT (`200 Connection established`), if through one.
    pub proxy_answer: Option<String>,
}

/// How a stream connected to `addr` reached the upstream, for messages: `ADDR`, or
/// `via proxy URL at ADDR`.
pub fn hop(proxy: Option<&Proxy>, addr: SocketAddr) -> String {
    match proxy {
        Some(p) => format!("via proxy {} at {addr}", p.url),
        None => addr.to_string(),
    }
}

/// The byte stream the upstream TLS session runs over: TCP to the upstream, or a tunnel
/// through the route's proxy, `proxy` (CONNECT with the upstream's name, resolved by the
/// proxy).
///
/// Callers bound it by `deadline` (`--connect-timeout` from the start of the dial): the
/// lookup and each connect are sized from it, and when it passes this future stays pending
/// so that the caller's own timeout reports the phase.
pub async fn open(
    route: &Route,
    proxy: Option<&Proxy>,
    deadline: Deadline,
    phase: &mut &'static str,
) -> Result<Opened, Failure> {
    let Some(proxy) = proxy else {
        *phase = "resolve";
        let (tcp, addr) = dial(
            &route.upstream.host,
            route.upstream.port,
            None,
            deadline,
            phase,
        )
        .await?;
        return Ok(Opened {
            transport: Transport::Tcp(LazyBufTcp::new(tcp)),
            addr,
            proxy_answer: None,
        });
    };
    *phase = "resolve the proxy";
    let (tcp, addr) = dial(
        &proxy.url.host,
        proxy.url.port,
        Some(proxy),
        deadline,
        phase,
    )
    .await?;
    let target = route.upstream.to_string();
    let mut tcp = LazyBufTcp::new(tcp);
    let (transport, answer) = match proxy.tls() {
        Some(config) => {
            *phase = "TLS handshake with the proxy";
            let mut tls = proxy.tls_to_proxy(config, tcp).await?;
            *phase = "CONNECT exchange with the proxy";
            let (answer, rest) = proxy.connect_tunnel(&mut tls, &target).await?;
            (Transport::Tls(Box::new(Prefixed::new(tls, rest))), answer)
        }
        None => {
            *phase = "CONNECT exchange with the proxy";
            let (answer, rest) = proxy.connect_tunnel(&mut tcp, &target).await?;
            tcp.unread(rest);
            (Transport::Tcp(tcp), answer)
        }
    };
    Ok(Opened {
        transport,
        addr,
        proxy_answer: Some(answer),
    })
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
    let mut phase = "resolve";
    let attempt = async {
        let opened = open(route, proxy, deadline, &mut phase).await?;
        phase = "tls handshake";
        let started = Instant::now();
        let addr = opened.addr;
        let stream = TlsConnector::from(config)
            .connect(route.server_name.clone(), opened.transport)
            .await
            .map_err(|e| {
                let mut f = classify_io(&e, &server_name_str(route));
                if f.class == Class::Reset || f.class == Class::Io {
                    f = Failure::new(
                        Class::Protocol,
                        format!("the upstream closed the connection during the TLS handshake: {e}"),
                    );
                }
                f.message = format!("{} ({})", f.message, hop(proxy, addr));
                f
            })?;
        Ok(Connected {
            stream,
            handshake: started.elapsed(),
        })
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(route, proxy, phase)),
    }
}
