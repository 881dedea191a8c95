//! Wiring: load every identity, bind every listener and the admin listener (all fatal at
//! startup, exit 2), serve until shutdown, then drain with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::check::canary::RouteCanary;
use crate::config::{Config, Via};
use crate::egress::Proxy;
use crate::listen::{self, Listener, SystemdFds};
use crate::metrics::Metrics;
use crate::notify;
use crate::proxy::{self, Lifecycle, RouteCtx};
use crate::spiffe::client::{WAITING, Watcher};
use crate::tls::IdentitySource;
use crate::tls::identity::{self, Identity};
use crate::tls::reload::{ReloadOutcomes, Reloader};

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
    #[error("route {route}: {source}")]
    Bind {
        route: String,
        source: listen::Error,
    },
    #[error("admin listener: {0}")]
    Admin(listen::Error),
}

/// A bound, loaded program, ready to serve.
pub struct App {
    /// Kept for what `run` still needs: the shutdown delay, the drain timeout and whether the
    /// admin listener may shut the program down.
    config: Config,
    /// Each route's shared state with its bound listener, served by `run` in config order.
    routes: Vec<(Arc<RouteCtx>, Listener)>,
    /// One reload loop per shared identity (files or the Workload API), started by `run`.
    reloaders: Vec<IdentityLoop>,
    /// The admin listener, bound but not yet served.
    admin: Option<std::net::TcpListener>,
    /// Every metric family, registered once, served at `/metrics`.
    metrics: Arc<Metrics>,
    /// Reload outcomes of every route.
    pub reload_stats: Arc<ReloadOutcomes>,
}

/// What keeps one shared identity current.
enum IdentityLoop {
    /// Polls the files (and SIGHUP).
    Files(Reloader),
    /// Streams the Workload API (`--spiffe`).
    Spiffe(Watcher),
}

/// Routes whose TLS settings are equal share one loaded identity and one reload loop.
struct IdentityGroup {
    /// The group's first route, whose settings (equal to the others') the reloader keeps.
    first: usize,
    /// The identity every route of the group serves with.
    identity: Arc<Identity>,
    /// What the identity was first loaded from, the reloader's starting point.
    loaded: identity::Loaded,
    /// Indexes (into `config.routes`) of the routes sharing it.
    members: Vec<usize>,
}

impl App {
    /// Open every route's proxy and load its identity, then bind every listener. Nothing is
    /// served yet.
    pub async fn bind(config: Config) -> Result<App, StartupError> {
        crate::otel::init();
        let metrics = Arc::new(Metrics::new());
        let (ok, failed) = metrics.reload_counters();
        let rejected = metrics.reload_counter("rejected_by_upstream");
        let reload_stats = Arc::new(ReloadOutcomes::new(ok, failed).with_rejected(rejected));
        let proxies = config.open_proxies()?;
        let (identities, groups) = load_identities(&config)?;
        let mut systemd = SystemdFds::from_env();
        let routes = bind_routes(&config, proxies, identities, &metrics, &mut systemd).await?;
        let reloaders = groups
            .into_iter()
            .map(|g| reloader(&config, &routes, &reload_stats, g))
            .collect();
        let admin = bind_admin(&config, &mut systemd).await?;
        Ok(App {
            config,
            routes,
            reloaders,
            admin,
            metrics,
            reload_stats,
        })
    }

    /// The real bound TCP addresses, by route name (port 0 becomes the chosen port).
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        self.routes
            .iter()
            .filter_map(|(ctx, l)| Some((ctx.route.name.clone(), l.tcp_addr()?)))
            .collect()
    }

    /// Serve until `shutdown` is cancelled (a signal, or `POST /shutdown`), then: keep accepting
    /// for `--shutdown-delay`, close the listeners, give in-flight connections
    /// `--drain-timeout`, and cut the rest. `hup` ticks on SIGHUP.
    pub async fn run(self, shutdown: CancellationToken, hup: watch::Receiver<u64>) {
        let stop_reloading = CancellationToken::new();
        for r in self.reloaders {
            match r {
                IdentityLoop::Files(r) => tokio::spawn(r.run(hup.clone(), stop_reloading.clone())),
                IdentityLoop::Spiffe(w) => tokio::spawn(w.run(stop_reloading.clone())),
            };
        }
        let ctxs: Vec<_> = self.routes.iter().map(|(ctx, _)| ctx.clone()).collect();
        crate::ca_expiry::spawn_all(&ctxs, &stop_reloading);
        let _stop_reloading = stop_reloading.drop_guard();
        let life = Lifecycle {
            stop_accepting: CancellationToken::new(),
            cut: CancellationToken::new(),
            tracker: TaskTracker::new(),
        };
        let state = Arc::new(AdminState::new(
            self.routes.iter().map(|(ctx, _)| ctx.clone()).collect(),
            self.metrics.clone(),
            self.reload_stats.clone(),
            shutdown.clone(),
            self.config.admin.as_ref().is_some_and(|a| a.allow_shutdown),
        ));
        if let Some(l) = self.admin {
            if let Ok(addr) = l.local_addr() {
                info!(addr = %addr, "admin listening");
            }
            admin::spawn(l, state.clone());
        }
        let mut accept_loops = Vec::new();
        for (ctx, listener) in self.routes {
            log_listening(&ctx);
            accept_loops.push(tokio::spawn(proxy::serve(ctx, listener, life.clone())));
        }
        notify::ready();
        let _watchdog = notify::spawn_watchdog();

        shutdown.cancelled().await;
        state.shutting_down.store(true, Ordering::SeqCst);
        notify::stopping();
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
        crate::otel::shutdown().await;
        info!("shutdown complete");
    }
}

/// The `listening` line of a route, and how its upstream is reached.
fn log_listening(ctx: &RouteCtx) {
    match ctx.route.inbound() {
        Some(_) => info!(
            route = %ctx.route.name, addr = %ctx.listen, direction = "inbound",
            target = %ctx.upstream,
            authorize = %ctx.route.tls.inbound.as_ref().map(|r| r.describe()).unwrap_or_default(),
            "listening"
        ),
        None => {
            info!(route = %ctx.route.name, addr = %ctx.listen, upstream = %ctx.upstream, "listening")
        }
    }
    match (&ctx.route.via, &ctx.proxy) {
        (Via::Proxy(_), Some(p)) => info!(
            route = %ctx.route.name,
            proxy = %p.url,
            credentials = %p.credentials_source(),
            "upstream reached through the proxy (CONNECT)"
        ),
        (Via::Bypass { proxy, entry }, _) => info!(
            route = %ctx.route.name,
            proxy = %proxy.url,
            no_proxy = %entry,
            "upstream bypasses the proxy (no-proxy match)"
        ),
        _ => {}
    }
}

/// Load every route's identity, once per distinct TLS settings: the identity of each route
/// (in config order) and the groups sharing one.
fn load_identities(
    config: &Config,
) -> Result<(Vec<Arc<Identity>>, Vec<IdentityGroup>), StartupError> {
    let mut groups: Vec<IdentityGroup> = Vec::new();
    let mut identities = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        if let Some(g) = groups
            .iter_mut()
            .find(|g| config.routes[g.first].tls == route.tls)
        {
            g.members.push(i);
            identities.push(g.identity.clone());
            continue;
        }
        // A SPIFFE identity arrives from the Workload API once serving: none until then.
        let loaded = match &route.tls.files.identity {
            IdentitySource::Spiffe(_) => identity::Loaded::absent(WAITING),
            _ => identity::build(&route.tls).map_err(|source| StartupError::Tls {
                route: route.name.clone(),
                source,
            })?,
        };
        let id = Arc::new(Identity::new(&loaded));
        identities.push(id.clone());
        groups.push(IdentityGroup {
            first: i,
            identity: id,
            loaded,
            members: vec![i],
        });
    }
    Ok((identities, groups))
}

/// Bind every route's listener and check its rules, then make each route's shared state
/// with its opened proxy and its identity.
async fn bind_routes(
    config: &Config,
    proxies: Vec<Option<Arc<Proxy>>>,
    identities: Vec<Arc<Identity>>,
    metrics: &Metrics,
    systemd: &mut SystemdFds,
) -> Result<Vec<(Arc<RouteCtx>, Listener)>, StartupError> {
    let mut routes = Vec::with_capacity(config.routes.len());
    let each = config.routes.iter().zip(proxies).zip(identities);
    for ((route, proxy), identity) in each {
        let bind_err = |source| StartupError::Bind {
            route: route.name.clone(),
            source,
        };
        let listener = Listener::bind(&route.listen, route.listen_mode, systemd)
            .await
            .map_err(bind_err)?;
        listener
            .check_rules(
                &route.listen,
                // Every inbound client must present a certificate: any address will do.
                route.allow_non_loopback || route.inbound().is_some(),
                !route.allow_uids.is_empty(),
            )
            .map_err(bind_err)?;
        let route_metrics = metrics.route(&route.name, route.mode);
        route_metrics.client_expiry.set(identity.leaf().not_after);
        let ctx = RouteCtx::new(
            route.clone(),
            proxy,
            identity,
            route_metrics,
            listener.describe(),
        );
        routes.push((Arc::new(ctx), listener));
    }
    Ok(routes)
}

/// The reload loop of one identity group, named after all its routes; logs the identity
/// loaded.
fn reloader(
    config: &Config,
    routes: &[(Arc<RouteCtx>, Listener)],
    reload_stats: &Arc<ReloadOutcomes>,
    group: IdentityGroup,
) -> IdentityLoop {
    let name = group
        .members
        .iter()
        .map(|&m| config.routes[m].name.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let gauges = group
        .members
        .iter()
        .map(|&m| routes[m].0.metrics.client_expiry.clone())
        .collect();
    let settings = config.routes[group.first].tls.clone();
    let canary = RouteCanary::new(
        group
            .members
            .iter()
            .map(|&m| (routes[m].0.route.clone(), routes[m].0.proxy.clone()))
            .collect(),
    );
    if let IdentitySource::Spiffe(source) = &settings.files.identity {
        if canary.is_some() {
            // SVID rotations come from the Workload API with no poll to retry at: see README.
            warn!(route = %name, "--reload-canary does not apply to --spiffe routes; each SVID is published as it arrives");
        }
        let source = source.clone();
        let (id, stats) = (group.identity, reload_stats.clone());
        return IdentityLoop::Spiffe(Watcher::new(name, settings, source, id, stats, gauges));
    }
    let leaf = &group.loaded.leaf;
    if config.routes[group.first].inbound().is_some() {
        info!(
            route = %name, subject = ?leaf.subject, issuer = ?leaf.issuer,
            serial = %leaf.serial, not_after = %crate::tls::cert::rfc3339(leaf.not_after),
            "server identity loaded"
        );
    } else {
        info!(
            route = %name, subject = ?leaf.subject, issuer = ?leaf.issuer,
            serial = %leaf.serial, not_after = %crate::tls::cert::rfc3339(leaf.not_after),
            "client identity loaded"
        );
    }
    let reloader = Reloader::new(
        name,
        settings,
        group.identity,
        reload_stats.clone(),
        gauges,
        &group.loaded,
    );
    IdentityLoop::Files(match canary {
        Some(c) => reloader.with_canary(Box::new(c)),
        None => reloader,
    })
}

/// Bind the admin listener, if any: a TCP socket (an address, or a systemd socket).
async fn bind_admin(
    config: &Config,
    systemd: &mut SystemdFds,
) -> Result<Option<std::net::TcpListener>, StartupError> {
    let Some(a) = &config.admin else {
        return Ok(None);
    };
    let l = Listener::bind(&a.listen, 0o600, systemd)
        .await
        .map_err(StartupError::Admin)?;
    let tcp = l.into_tcp().ok_or_else(|| {
        StartupError::Admin(listen::Error::Bind {
            addr: a.listen.to_string(),
            source: std::io::Error::other("the admin listener must be a TCP socket"),
        })
    })?;
    let std = tcp.into_std().map_err(|source| {
        StartupError::Admin(listen::Error::Bind {
            addr: a.listen.to_string(),
            source,
        })
    })?;
    Ok(Some(std))
}
