//! Wiring: load every identity, bind every listener (both fatal at startup, exit 2), serve
//! until shutdown, then drain with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::proxy::{self, Lifecycle, RouteCtx};
use crate::tls::identity::{self, Identity};
use crate::tls::reload::{Reloader, Stats};

/// A startup failure: bad material or an address that cannot be bound. Exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error("route {route}: {source}")]
    Tls {
        route: String,
        source: identity::Error,
    },
    #[error("cannot listen on {addr} (route {route}): {source}")]
    Bind {
        addr: SocketAddr,
        route: String,
        source: std::io::Error,
    },
}

/// A bound, loaded program, ready to serve.
pub struct App {
    config: Config,
    routes: Vec<(Arc<RouteCtx>, TcpListener)>,
    /// One reload loop per route, started by `run`.
    reloaders: Vec<Reloader>,
    /// Reload outcomes of every route.
    pub reload_stats: Arc<Stats>,
}

impl App {
    /// Load every route's identity, then bind every listener. Nothing is served yet.
    pub async fn bind(config: Config) -> Result<App, StartupError> {
        let mut loaded = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let l = identity::build(route).map_err(|source| StartupError::Tls {
                route: route.name.clone(),
                source,
            })?;
            let leaf = &l.leaf;
            info!(
                route = %route.name, subject = ?leaf.subject, issuer = ?leaf.issuer,
                serial = %leaf.serial, not_after = %identity::rfc3339(leaf.not_after),
                "client identity loaded"
            );
            loaded.push(l);
        }
        let reload_stats = Arc::new(Stats::default());
        let mut routes = Vec::with_capacity(config.routes.len());
        let mut reloaders = Vec::with_capacity(config.routes.len());
        for (route, l) in config.routes.iter().zip(loaded) {
            let listener =
                TcpListener::bind(route.listen)
                    .await
                    .map_err(|source| StartupError::Bind {
                        addr: route.listen,
                        route: route.name.clone(),
                        source,
                    })?;
            let identity = Arc::new(Identity::new(&l));
            reloaders.push(Reloader::new(
                route.clone(),
                identity.clone(),
                reload_stats.clone(),
                &l,
            ));
            let ctx = RouteCtx::new(route.clone(), identity);
            routes.push((Arc::new(ctx), listener));
        }
        Ok(App {
            config,
            routes,
            reloaders,
            reload_stats,
        })
    }

    /// The real bound addresses, by route name (port 0 becomes the chosen port).
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.routes
            .iter()
            .filter_map(|(ctx, l)| Some((ctx.route.name.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// Serve until `shutdown` is cancelled, then: keep accepting for `--shutdown-delay`, close
    /// the listeners, give in-flight connections `--drain-timeout`, and cut the rest.
    pub async fn run(self, shutdown: CancellationToken, hup: watch::Receiver<u64>) {
        let stop_reloading = CancellationToken::new();
        for r in self.reloaders {
            tokio::spawn(r.run(hup.clone(), stop_reloading.clone()));
        }
        let _stop_reloading = stop_reloading.drop_guard();
        let life = Lifecycle {
            stop_accepting: CancellationToken::new(),
            cut: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let mut accept_loops = Vec::new();
        for (ctx, listener) in self.routes {
            if let Ok(addr) = listener.local_addr() {
                info!(route = %ctx.route.name, addr = %addr, upstream = %ctx.upstream, "listening");
            }
            accept_loops.push(tokio::spawn(proxy::serve(ctx, listener, life.clone())));
        }

        shutdown.cancelled().await;
        let delay = self.config.shutdown_delay;
        if !delay.is_zero() {
            info!(delay = %humantime::format_duration(delay), "shutdown: still accepting during --shutdown-delay");
            tokio::time::sleep(delay).await;
        }
        life.stop_accepting.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        life.tracker.close();
        let open = life.tracker.len();
        let drain = self.config.drain_timeout;
        info!(open_connections = open, drain_timeout = %humantime::format_duration(drain), "listeners closed; draining");
        if tokio::time::timeout(drain, life.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open_connections = life.tracker.len(),
                "--drain-timeout ran out; cutting what is still open"
            );
            life.cut.cancel();
            // Cut connections finish at once; the bound only guards against a stuck task.
            let _ = tokio::time::timeout(Duration::from_secs(2), life.tracker.wait()).await;
        }
        info!("shutdown complete");
    }
}
