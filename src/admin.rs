//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status` and, when allowed,
//! `POST /shutdown`. It runs on its own thread with its own single-threaded runtime, so a
//! proxy under load never delays a probe. Readiness is local: it never dials the upstream.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::listen::LogLimit;
use crate::metrics::Metrics;
use crate::proxy::RouteCtx;
use crate::tls::cert::{now_unix, rfc3339};
use crate::tls::reload::ReloadOutcomes;

/// What the endpoints read.
pub struct AdminState {
    routes: Vec<Arc<RouteCtx>>,
    metrics: Arc<Metrics>,
    reload: Arc<ReloadOutcomes>,
    /// Set at the first moment of shutdown: `/readyz` answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// Cancelling it begins the same graceful shutdown as SIGTERM.
    shutdown: CancellationToken,
    allow_shutdown: bool,
    /// `GET /upstreamz`: probe rounds, one at a time, answers cached.
    upstreamz: Arc<crate::upstreamz::Upstreamz>,
}

impl AdminState {
    pub fn new(
        routes: Vec<Arc<RouteCtx>>,
        metrics: Arc<Metrics>,
        reload: Arc<ReloadOutcomes>,
        shutdown: CancellationToken,
        allow_shutdown: bool,
    ) -> Self {
        AdminState {
            upstreamz: crate::upstreamz::Upstreamz::new(routes.clone()),
            routes,
            metrics,
            reload,
            shutting_down: AtomicBool::new(false),
            shutdown,
            allow_shutdown,
        }
    }

    /// `None` when ready; otherwise the one-line reason. Every listener is bound before
    /// serving starts and stays bound until shutdown, so what can change is the identities'
    /// validity and shutdown itself.
    pub fn not_ready(&self) -> Option<String> {
        if self.shutting_down.load(Ordering::SeqCst) || self.shutdown.is_cancelled() {
            return Some("shutting down".into());
        }
        let now = now_unix();
        self.routes.iter().find_map(|r| {
            let loaded = r.identity.loaded();
            if let Some(why) = &loaded.absent {
                return Some(format!("route {}: {why}", r.route.name));
            }
            let leaf = &loaded.leaf;
            leaf.check_validity(now).err().map(|why| {
                let kind = match r.route.inbound() {
                    Some(_) => "server",
                    None => "client",
                };
                format!(
                    "route {}: {kind} certificate {} is {why}",
                    r.route.name, leaf.subject
                )
            })
        })
    }

    fn status(&self) -> serde_json::Value {
        let routes: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let inbound = r.route.inbound().is_some();
                json!({
                    "name": r.route.name,
                    "listen": r.listen,
                    "direction": if inbound { "inbound" } else { "outbound" },
                    "upstream": (!inbound).then_some(&r.upstream),
                    "target": inbound.then_some(&r.upstream),
                    "mode": match r.route.mode { crate::cli::Mode::Tcp => "tcp", crate::cli::Mode::Http => "http" },
                    "active_connections": r.metrics.active.get(),
                })
            })
            .collect();
        let identities: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let loaded = r.identity.loaded();
                let l = &loaded.leaf;
                json!({
                    "route": r.route.name,
                    "spiffe_id": loaded.spiffe_id,
                    "subject": l.subject,
                    "sans": l.sans,
                    "issuer": l.issuer,
                    "serial": l.serial,
                    "not_before": rfc3339(l.not_before),
                    "not_after": rfc3339(l.not_after),
                    "sha256_fingerprint": l.sha256_fingerprint,
                    "intermediates": loaded.trust.intermediates_json(),
                    "ca_bundle": loaded.trust.ca_bundle_json(),
                })
            })
            .collect();
        let last = self.reload.last.lock().ok().and_then(|l| l.clone());
        let last_reload = last.map(|l| {
            json!({
                "at": humantime::format_rfc3339_seconds(l.at).to_string(),
                "result": if l.error.is_some() { "failure" } else { "success" },
                "error": l.error,
            })
        });
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "routes": routes,
            "identities": identities,
            "last_reload": last_reload,
        })
    }
}

/// At most this many admin connections are served at once; more wait in the kernel's backlog.
/// Probes and scrapes need a handful; the cap keeps a flood of idle connections from costing
/// unbounded memory and file descriptors on a listener that may face the pod network.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a complete request head, counted from accept (and again between
/// requests on a kept-alive connection); then the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `POST /shutdown` is refused, or `None` when it may proceed. Only a local process may
/// stop the sidecar: the admin listener may face the pod network, and a browser's simple
/// cross-site POST carries an `Origin` header (no preflight is needed for one), so any
/// `Origin` means a web page is asking.
pub fn shutdown_refusal(peer: IpAddr, has_origin: bool) -> Option<&'static str> {
    if !peer.to_canonical().is_loopback() {
        return Some("POST /shutdown is accepted only from a loopback address");
    }
    if has_origin {
        return Some("POST /shutdown is refused with an Origin header (a web page sent it)");
    }
    None
}

fn text(code: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer, and whether it accepted `POST /shutdown` (the shutdown begins once this answer
/// has been written; see `serve`).
fn respond(
    state: &AdminState,
    req: &Request<hyper::body::Incoming>,
    peer: IpAddr,
) -> (Response<Full<Bytes>>, bool) {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    let answer = match (req.uri().path(), get) {
        ("/healthz", true) => text(StatusCode::OK, "ok\n"),
        ("/readyz", true) => match state.not_ready() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        ("/metrics", true) => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        ("/status", true) => {
            let mut body = state.status().to_string();
            body.push('\n');
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        ("/shutdown", _) if state.allow_shutdown => {
            let refusal = shutdown_refusal(peer, req.headers().contains_key(ORIGIN));
            if let (true, Some(why)) = (req.method() == Method::POST, refusal) {
                warn!(peer = %peer, reason = why, "POST /shutdown refused");
                text(StatusCode::FORBIDDEN, format!("{why}\n"))
            } else if req.method() == Method::POST {
                info!(peer = %peer, "POST /shutdown: shutting down");
                // Not ready from this moment; the shutdown itself begins once this answer is
                // written, or the process could exit before the caller hears it.
                state.shutting_down.store(true, Ordering::SeqCst);
                let mut r = text(StatusCode::OK, "shutting down\n");
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return (r, true);
            } else {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
                r.headers_mut()
                    .insert("allow", HeaderValue::from_static("POST"));
                r
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    (answer, false)
}

/// `200` when every probed route passed, else `503`; one line per route either way.
fn upstreamz_response(a: &crate::upstreamz::Answer) -> Response<Full<Bytes>> {
    let code = if a.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    text(code, a.body.clone())
}

/// Serve the admin endpoints on a thread of their own.
pub fn spawn(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let spawned = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    warn!(error = %e, "admin listener: cannot start its runtime");
                    return;
                }
            };
            rt.block_on(serve(listener, state));
        });
    if let Err(e) = spawned {
        warn!(error = %e, "admin listener: cannot start its thread");
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "admin listener unusable");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut accept_log = LogLimit::per_second();
    let mut backoff = Duration::from_millis(5);
    loop {
        // A slot first, then accept: connection 65 waits in the backlog until one closes.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return; // never closed
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning, and log at
                // most once a second with how many failures were not logged.
                if let Some(suppressed) = accept_log.allow() {
                    warn!(error = %e, suppressed, "admin accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        let peer = peer.ip();
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let shutdown_asked = Arc::new(AtomicBool::new(false));
            let service = {
                let (state, asked) = (state.clone(), shutdown_asked.clone());
                hyper::service::service_fn(move |req| {
                    let get = req.method() == Method::GET || req.method() == Method::HEAD;
                    let probe =
                        (get && req.uri().path() == "/upstreamz").then(|| state.upstreamz.clone());
                    let (r, shutdown) = match probe {
                        Some(_) => (text(StatusCode::OK, ""), false),
                        None => respond(&state, &req, peer),
                    };
                    if shutdown {
                        asked.store(true, Ordering::SeqCst);
                        // The bound for a caller that never reads its answer.
                        let token = state.shutdown.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            token.cancel();
                        });
                    }
                    async move {
                        let r = match probe {
                            Some(u) => upstreamz_response(&*u.answer().await),
                            None => r,
                        };
                        Ok::<_, Infallible>(r)
                    }
                })
            };
            // After `POST /shutdown` the answer carries `Connection: close`, so this ends once
            // the answer is written; only then does the shutdown begin.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if shutdown_asked.load(Ordering::SeqCst) {
                state.shutdown.cancel();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_only_from_loopback_without_origin() {
        let v4: IpAddr = "127.0.0.1".parse().unwrap();
        let v4b: IpAddr = "127.8.9.10".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        for ip in [v4, v4b, v6, mapped] {
            assert_eq!(shutdown_refusal(ip, false), None, "{ip}");
            assert!(
                shutdown_refusal(ip, true).unwrap().contains("Origin"),
                "{ip}"
            );
        }
        for ip in [
            "10.0.0.1",
            "0.0.0.0",
            "192.168.1.1",
            "::",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(
                shutdown_refusal(ip, false).unwrap().contains("loopback"),
                "{ip}"
            );
        }
    }
}
