//! `demo`: both directions of a sidecar in one process, with a fresh dev PKI in a temp folder.
//! An outbound route on `--listen` (plaintext in, the dev client certificate presented) dials an
//! inbound route on a free loopback port (mTLS in, `--mode http`, the dev client's DNS SAN
//! required), which forwards to a plain built-in HTTP app on another free loopback port. The app
//! answers with the verified client identity the inbound route gave it in
//! `X-Forwarded-Client-Cert`, so `curl http://127.0.0.1:8080/` shows the whole path working with
//! no certificates of one's own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::app::{App, StartupError};
use crate::cli::{DemoArgs, Mode, TlsMin};
use crate::config::{self, Config, Direction, HttpSettings, Inbound, Route, Target, Upstream, Via};
use crate::pki::{self, DevPki};
use crate::tls::{Checks, IdentitySource, Rule, Settings, TlsFiles};

/// The dev client certificate's DNS SAN (and CN): the one name the demo's inbound route lets in.
const DEV_CLIENT: &str = "mtls-sidecar-dev-client";

/// Why the demo did not start or stopped early. `Config` and `Startup` are the same
/// mistakes `run` reports with exit code 2 (a bad `--listen`, a port in use); the rest are
/// this machine failing the demo at run time. Messages are the operator's: each variant reads
/// like its cause, and the ones with a `source` are printed with it after a colon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag the demo passes on to the proxy's config is unusable.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// A route of the demo could not bind or load its identity.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// No temp folder for the dev PKI.
    #[error(transparent)]
    TempDir(std::io::Error),
    #[error("generating the demo PKI")]
    GeneratePki(#[source] rcgen::Error),
    #[error("writing the demo PKI")]
    WritePki(#[source] pki::WriteError),
    /// The demo app's loopback port.
    #[error(transparent)]
    AppBind(std::io::Error),
    /// `App::bind` returned without the listener it was given, which it never does.
    #[error("the demo proxy has no listener")]
    NoListener,
}

/// The fields of one `X-Forwarded-Client-Cert` element (`Hash=..;Subject="..";URI=..`), in
/// order, quotes removed and `\` escapes undone. Only the first element is read: the inbound
/// route sets exactly one and removes any the client sent.
fn xfcc_fields(value: &str) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    let (mut cur, mut quoted, mut escaped) = (String::new(), false, false);
    let mut push = |cur: &mut String| {
        if let Some((k, v)) = cur.split_once('=') {
            fields.push((k.trim().to_string(), v.to_string()));
        }
        cur.clear();
    };
    for c in value.chars() {
        match c {
            _ if escaped => {
                cur.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => push(&mut cur),
            ',' if !quoted => break,
            _ => cur.push(c),
        }
    }
    push(&mut cur);
    fields
}

/// The demo app's answer: the identity the inbound route vouched for, field by field.
fn app_body(req: &Request<hyper::body::Incoming>, app: SocketAddr) -> String {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut body = format!(
        "hello from the mtls-sidecar demo app (plain HTTP on {app}, behind the inbound route)\n"
    );
    match header("x-forwarded-client-cert") {
        Some(xfcc) => {
            body.push_str("verified client certificate (X-Forwarded-Client-Cert, set by the inbound route):\n");
            for (k, v) in xfcc_fields(&xfcc) {
                let v = if v.is_empty() { "(none)".into() } else { v };
                body.push_str(&format!("  {k:<8} {v}\n"));
            }
        }
        None => body.push_str(
            "no X-Forwarded-Client-Cert: this request did not come through the inbound route\n",
        ),
    }
    body.push_str(&format!(
        "forwarded for: {}, proto {}\nrequest: {} {}\n",
        header("x-forwarded-for").unwrap_or_else(|| "-".into()),
        header("x-forwarded-proto").unwrap_or_else(|| "-".into()),
        req.method(),
        req.uri()
    ));
    body
}

/// Serve plain HTTP/1.1 on `listener`: the app behind the inbound route. It trusts
/// `X-Forwarded-Client-Cert` only because it listens on loopback, where only the sidecar
/// reaches it.
async fn serve_app(listener: TcpListener, app: SocketAddr) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = app_body(&req, app);
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// Start the demo app, the inbound route in front of it and the outbound route in front of
/// that, print the path and how to try it, and serve until `shutdown`; the dev PKI is removed
/// on the way out.
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

    let app_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(Error::AppBind)?;
    let app_addr = app_listener.local_addr().map_err(Error::AppBind)?;
    tokio::spawn(serve_app(app_listener, app_addr));

    // The outbound route must know the inbound route's port, which is only known once bound:
    // two sets of routes, the inbound one bound first, served side by side.
    let inbound = App::bind(demo_config(inbound_route(dir.path(), app_addr)?)).await?;
    let in_addr = bound_addr(&inbound)?;
    let outbound = App::bind(demo_config(proxy_route(&args, dir.path(), in_addr.port())?)).await?;
    let listen = bound_addr(&outbound)?;
    println!(
        "mtls-sidecar demo: both directions in one process\n\
         \n  path      curl -> {listen} outbound -> mTLS -> inbound {in_addr} -> plain app {app_addr}\
         \n  outbound  http://{listen} (plaintext in, presents {d}/client.pem)\
         \n  inbound   https://{in_addr} (mode http: requires a client certificate from the dev CA \
         with DNS SAN {DEV_CLIENT}; sets X-Forwarded-Client-Cert)\
         \n  app       http://{app_addr} (plain HTTP on loopback: prints the identity it was given)\
         \n  dev PKI   {d} (removed on exit)\n\
         \ntry:\
         \n  curl http://{listen}/\
         \n  curl --cacert {d}/ca.pem https://localhost:{inp}/   # refused: no client certificate\
         \n  curl --cacert {d}/ca.pem --cert {d}/client.pem --key {d}/client-key.pem https://localhost:{inp}/\n\
         \nCtrl-C stops the demo.",
        inp = in_addr.port(),
        d = dir.path().display(),
    );
    tokio::join!(
        inbound.run(shutdown.clone(), hup.clone()),
        outbound.run(shutdown, hup)
    );
    drop(dir);
    Ok(())
}

fn demo_config(route: Route) -> Config {
    Config {
        routes: vec![route],
        shutdown_delay: Duration::ZERO,
        drain_timeout: Duration::from_secs(5),
        admin: None,
    }
}

fn bound_addr(app: &App) -> Result<SocketAddr, Error> {
    app.bound()
        .first()
        .map(|(_, a)| *a)
        .ok_or(Error::NoListener)
}

/// The outbound route: `--listen` in front, the inbound route behind, the dev client
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
        tls: demo_tls(dir, "client", None),
        mode: Mode::Tcp,
        http: HttpSettings::default(),
        via: Via::Direct,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: None,
        max_connections: 10_000,
        direction: Direction::Outbound,
        ops: config::Ops::default(),
        protocol: crate::cli::Protocol::None,
    })
}

/// The inbound route: mTLS on a free loopback port with the dev server certificate, clients
/// from the dev CA whose leaf carries the dev client's DNS SAN, http mode to the demo app.
fn inbound_route(dir: &std::path::Path, app: SocketAddr) -> Result<Route, Error> {
    let rule = Rule {
        uri_sans: vec![],
        dns_sans: vec![DEV_CLIENT.into()],
        cns: vec![],
        pins: vec![],
        allow_any: false,
    };
    Ok(Route {
        name: "inbound".into(),
        listen: config::parse_listen("127.0.0.1:0", false, "inbound")?,
        listen_mode: 0o600,
        allow_uids: vec![],
        allow_non_loopback: false,
        upstream: Upstream {
            host: "-".into(),
            port: 0,
        },
        server_name: rustls::pki_types::ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        ),
        tls: demo_tls(dir, "server", Some(rule)),
        mode: Mode::Http,
        http: HttpSettings::default(),
        via: Via::Direct,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Some(config::HTTP_IDLE_TIMEOUT),
        max_connections: 10_000,
        direction: Direction::Inbound(Box::new(Inbound {
            target: Target::Tcp(Upstream {
                host: app.ip().to_string(),
                port: app.port(),
            }),
            handshake_timeout: Duration::from_secs(10),
            proxy_protocol: None,
            listen_host: Some("127.0.0.1".into()),
        })),
        ops: config::Ops::default(),
        protocol: crate::cli::Protocol::None,
    })
}

/// A demo route's TLS settings: `who`.pem and its key from the throwaway PKI in `dir`, the dev
/// CA trusted (for the upstream, or for clients when `inbound` is set), reloaded every 5 s like
/// a real deployment's.
fn demo_tls(dir: &std::path::Path, who: &str, inbound: Option<Rule>) -> Settings {
    Settings {
        files: TlsFiles {
            identity: IdentitySource::Pem {
                cert: dir.join(format!("{who}.pem")),
                key: dir.join(format!("{who}-key.pem")),
                key_password: None,
            },
            ca: Some(dir.join("ca.pem")),
            crls: vec![],
        },
        checks: Checks::default(),
        tls_min: TlsMin::V12,
        alpn: vec![],
        reload_interval: Some(Duration::from_secs(5)),
        inbound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_fields_unquote_and_keep_commas_inside_quotes() {
        let f = xfcc_fields(r#"Hash=ab12;Subject="CN=a\"b,O=x";URI=;DNS=mtls-sidecar-dev-client"#);
        let want = [
            ("Hash", "ab12"),
            ("Subject", "CN=a\"b,O=x"),
            ("URI", ""),
            ("DNS", "mtls-sidecar-dev-client"),
        ];
        let got: Vec<(&str, &str)> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, want);
        assert_eq!(xfcc_fields("Hash=1,Hash=2").len(), 1);
    }
}
