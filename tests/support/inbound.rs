//! Inbound routes from the client's side: the `run --inbound` command, rustls clients that
//! present (or not) a client certificate, a plaintext echo target, and external clients
//! (`openssl s_client`, `python3`, `curl`) run with a bounded wait and killed when it passes.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::pki::Identity;
use super::{Cmd, Pki, WAIT, connect, init_crypto};

/// A plaintext target on 127.0.0.1 that echoes every connection (and closes its write side at
/// the client's end of stream), counting the connections it accepted.
pub struct EchoTarget {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoTarget {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoTarget {
    pub async fn start() -> EchoTarget {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let addr = l.local_addr().expect("target addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        EchoTarget {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// `run --inbound` on 127.0.0.1:0 with the test server identity and CA, towards `target`.
pub fn inbound_cmd(pki: &Pki, target: impl std::fmt::Display) -> Cmd {
    Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0", "--target"])
        .arg(target.to_string())
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
}

/// [`inbound_cmd`] with `--mode http`.
pub fn inbound_http_cmd(pki: &Pki, target: impl std::fmt::Display) -> Cmd {
    inbound_cmd(pki, target).args(["--mode", "http"])
}

/// A client config trusting the test CA and presenting `id`, if any.
pub fn client_config(pki: &Pki, id: Option<&Identity>) -> Arc<ClientConfig> {
    client_config_alpn(pki, id, &[])
}

/// [`client_config`] offering the ALPN protocols `alpn`.
pub fn client_config_alpn(pki: &Pki, id: Option<&Identity>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    init_crypto();
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der.clone()).expect("add CA");
    let b = ClientConfig::builder().with_root_certificates(roots);
    let mut config = match id {
        Some(id) => b
            .with_client_auth_cert(id.chain(), id.key_der())
            .expect("client cert"),
        None => b.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to `addr` as `localhost` (the handshake bounded by [`WAIT`]).
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = connect(addr).await;
    let name = ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(WAIT, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("handshake within the wait")
}

/// Runs an external client to its end, killing it after `limit`; its stdin stays open for
/// `hold` first (so `openssl s_client` reads the server's answer), then is closed.
pub fn run_client(mut cmd: Command, hold: Duration, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let started = Instant::now();
    while started.elapsed() < hold && child.try_wait().expect("try_wait").is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child.stdin.take());
    let deadline = started + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// stdout and stderr of a finished client, as one text.
pub fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// `openssl s_client` to `addr` as `localhost`, trusting `ca`, presenting `id` if given;
/// returns everything it printed.
pub fn openssl_s_client(addr: SocketAddr, id: Option<&Identity>, ca: &Path) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        "localhost",
    ])
    .arg("-CAfile")
    .arg(ca);
    if let Some(id) = id {
        cmd.arg("-cert").arg(&id.cert).arg("-key").arg(&id.key);
    }
    output_text(&run_client(cmd, Duration::from_millis(300), WAIT))
}

/// Reads until the server ends the connection (FIN, reset, or a TLS error such as a missing
/// close_notify all count); returns what arrived before. Fails after `limit`.
pub async fn read_until_end(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection was not closed within {limit:?} ({} bytes read)",
                got.len()
            ),
        }
    }
}

/// Whether `tool` is an executable on `PATH`; if not, prints that `test` is skipped and why
/// (a third-party client's test is skipped only when the tool is absent).
pub fn have_tool(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(tool)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    });
    if !found {
        println!("skipped {test}: no {tool} on PATH");
    }
    found
}
