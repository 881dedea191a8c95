//! `demo`: a fresh dev PKI in a temp folder, a built-in mTLS HTTP upstream on a free loopback
//! port that insists on a client certificate, and the proxy in front of it, so that
//! `curl http://127.0.0.1:8080/` shows the whole path working with no certificates of one's own.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::app::{App, StartupError};
use crate::cli::{DemoArgs, TlsMin};
use crate::config::{self, Config, Route, Upstream};
use crate::pki::{self, DevPki};
use crate::tls::cert::CertInfo;
use crate::tls::load;
use crate::tls::{Checks, IdentitySource, Settings, TlsFiles, provider};

/// Why the demo did not start or stopped early. `Config` and `Startup` are the same
/// mistakes `run` reports with exit code 2 (a bad `--listen`, a port in use); the rest are
/// this machine failing the demo at run time. Messages are the operator's: each variant reads
/// like its cause, and the ones with a `source` are printed with it after a colon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag the demo passes on to the proxy's config is unusable.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// The proxy in front of the demo upstream could not bind or load its identity.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// No temp folder for the dev PKI.
    #[error(transparent)]
    TempDir(std::io::Error),
    #[error("generating the demo PKI")]
    GeneratePki(#[source] rcgen::Error),
    #[error("writing the demo PKI")]
    WritePki(#[source] pki::WriteError),
    /// The demo upstream's loopback port.
    #[error(transparent)]
    UpstreamBind(std::io::Error),
    /// The dev PKI just written could not be read back for the demo upstream.
    #[error(transparent)]
    UpstreamFiles(#[from] load::Error),
    #[error("client verifier")]
    ClientVerifier(#[source] VerifierBuilderError),
    /// rustls refused the demo upstream's certificate or protocol versions.
    #[error(transparent)]
    UpstreamTls(#[from] rustls::Error),
    /// `App::bind` returned without the listener it was given, which it never does.
    #[error("the demo proxy has no listener")]
    NoListener,
}

/// Build the upstream's TLS config: the dev server certificate, client certificates required
/// and verified against the dev CA.
fn upstream_tls(dir: &std::path::Path) -> Result<ServerConfig, Error> {
    let provider = provider();
    let read = |flag, name: &str| load::FileBytes::read(flag, &dir.join(name));
    let roots = load::ca_bundle(&read("--ca", "ca.pem")?)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(Error::ClientVerifier)?;
    let chain = load::certificates(&read("--cert", "server.pem")?)?;
    let key = load::private_key(&read("--key", "server-key.pem")?, None)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Serve HTTP/1.1 over mTLS; each response says which client certificate was verified.
async fn serve_upstream(listener: TcpListener, tls: Arc<ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(error = %e, "demo upstream: handshake refused");
                    return;
                }
            };
            let (_, conn) = tls.get_ref();
            let client = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(CertInfo::parse)
                .map(|i| {
                    format!(
                        "{} (serial {}, issued by {})",
                        i.subject, i.serial, i.issuer
                    )
                })
                .unwrap_or_else(|| "none".into());
            let version = conn
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = format!(
                    "hello from the mtls-sidecar demo upstream\n\
                     verified client certificate: {client}\n\
                     tls: {version}\n\
                     request: {} {}\n",
                    req.method(),
                    req.uri()
                );
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

/// Start the demo upstream and the proxy in front of it, print how to try them, and serve until
/// `shutdown`; the dev PKI is removed on the way out.
pub async fn run(
    args: DemoArgs,
    shutdown: tokio_util::sync::CancellationToken,
    hup: tokio::sync::watch::Receiver<u64>,
) -> Result<(), Error> {
    let dir = tempfile::Builder::new()
        .prefix("mtls-sidecar-demo-")
        .tempdir()
        .map_err(Error::TempDir)?;
    DevPki::generate()
        .map_err(Error::GeneratePki)?
        .write(dir.path(), false)
        .map_err(Error::WritePki)?;

    let up_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(Error::UpstreamBind)?;
    let up_addr = up_listener.local_addr().map_err(Error::UpstreamBind)?;
    tokio::spawn(serve_upstream(
        up_listener,
        Arc::new(upstream_tls(dir.path())?),
    ));

    let route = proxy_route(&args, dir.path(), up_addr.port())?;
    let app = App::bind(Config {
        routes: vec![route],
        shutdown_delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(5),
        admin: None,
    })
    .await?;
    let listen = app
        .bound()
        .first()
        .map(|(_, a)| *a)
        .ok_or(Error::NoListener)?;
    println!(
        "mtls-sidecar demo\n\
         \n  upstream  https://127.0.0.1:{up} (mTLS: refuses clients without a certificate from the dev CA)\
         \n  proxy     http://{listen} (plaintext in, presents {d}/client.pem upstream)\
         \n  dev PKI   {d} (removed on exit)\n\
         \ntry:\
         \n  curl http://{listen}/\
         \n  curl --cacert {d}/ca.pem https://localhost:{up}/   # refused: no client certificate\n\
         \nCtrl-C stops the demo.",
        up = up_addr.port(),
        d = dir.path().display(),
    );
    app.run(shutdown, hup).await;
    drop(dir);
    Ok(())
}

/// The proxy's one route: `--listen` in front, the demo upstream behind, the dev client
/// certificate presented and the dev CA trusted.
fn proxy_route(args: &DemoArgs, dir: &std::path::Path, upstream_port: u16) -> Result<Route, Error> {
    Ok(Route {
        name: "default".into(),
        listen: config::parse_listen(&args.listen, args.allow_non_loopback, "default")?,
        listen_mode: 0o600,
        allow_uids: vec![],
        allow_non_loopback: args.allow_non_loopback,
        upstream: Upstream {
            host: "127.0.0.1".into(),
            port: upstream_port,
        },
        server_name: config::parse_server_name("--server-name", "localhost")?,
        tls: demo_tls(dir),
        mode: crate::cli::Mode::Tcp,
        http: crate::config::HttpSettings::default(),
        via: crate::config::Via::Direct,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: None,
        max_connections: 10_000,
        direction: crate::config::Direction::Outbound,
    })
}

/// The demo route's TLS settings: the client identity and CA of the throwaway PKI in `dir`,
/// reloaded every 5 s like a real deployment's.
fn demo_tls(dir: &std::path::Path) -> Settings {
    Settings {
        files: TlsFiles {
            identity: IdentitySource::Pem {
                cert: dir.join("client.pem"),
                key: dir.join("client-key.pem"),
                key_password: None,
            },
            ca: Some(dir.join("ca.pem")),
            crls: vec![],
        },
        checks: Checks::default(),
        tls_min: TlsMin::V12,
        alpn: vec![],
        reload_interval: Some(Duration::from_secs(5)),
        inbound: None,
    }
}
