//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status` and, when allowed,
//! `POST /shutdown`. It runs on its own thread with its own single-threaded runtime, so a
//! proxy under load never delays a probe. Readiness is local: it never dials the upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::proxy::RouteCtx;
use crate::tls::identity::{now_unix, rfc3339};
use crate::tls::reload::Stats;

/// What the endpoints read.
pub struct AdminState {
    routes: Vec<Arc<RouteCtx>>,
    metrics: Arc<Metrics>,
    reload: Arc<Stats>,
    /// Set at the first moment of shutdown: `/readyz` answers 503 from then on.
    pub shutting_down: AtomicBool,
    /// Cancelling it begins the same graceful shutdown as SIGTERM.
    shutdown: CancellationToken,
    allow_shutdown: bool,
}

impl AdminState {
    pub fn new(
        routes: Vec<Arc<RouteCtx>>,
        metrics: Arc<Metrics>,
        reload: Arc<Stats>,
        shutdown: CancellationToken,
        allow_shutdown: bool,
    ) -> Self {
        AdminState {
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
            let leaf = r.identity.leaf();
            leaf.check_validity(now).err().map(|why| {
                format!(
                    "route {}: client certificate {} is {why}",
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
                json!({
                    "name": r.route.name,
                    "listen": r.listen,
                    "upstream": r.upstream,
                    "mode": match r.route.mode { crate::cli::Mode::Tcp => "tcp", crate::cli::Mode::Http => "http" },
                    "active_connections": r.metrics.active.get(),
                })
            })
            .collect();
        let identities: Vec<_> = self
            .routes
            .iter()
            .map(|r| {
                let l = r.identity.leaf();
                json!({
                    "route": r.route.name,
                    "subject": l.subject,
                    "sans": l.sans,
                    "issuer": l.issuer,
                    "serial": l.serial,
                    "not_before": rfc3339(l.not_before),
                    "not_after": rfc3339(l.not_after),
                    "sha256_fingerprint": l.sha256_fingerprint,
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
            if req.method() == Method::POST {
                info!("POST /shutdown: shutting down");
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
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let shutdown_asked = Arc::new(AtomicBool::new(false));
            let service = {
                let (state, asked) = (state.clone(), shutdown_asked.clone());
                hyper::service::service_fn(move |req| {
                    let (r, shutdown) = respond(&state, &req);
                    if shutdown {
                        asked.store(true, Ordering::SeqCst);
                        // The bound for a caller that never reads its answer.
                        let token = state.shutdown.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            token.cancel();
                        });
                    }
                    async move { Ok::<_, Infallible>(r) }
                })
            };
            // After `POST /shutdown` the answer carries `Connection: close`, so this ends once
            // the answer is written; only then does the shutdown begin.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
            if shutdown_asked.load(Ordering::SeqCst) {
                state.shutdown.cancel();
            }
        });
    }
}
