//! In-process mTLS upstreams on 127.0.0.1:0 built on tokio-rustls. Each one requires a client
//! certificate, records what it saw (SNI, client certificate, handshake kind) and counts what
//! reached its application layer. It stops when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::{HandshakeKind, ProtocolVersion, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::pki::{Identity, common_name};
use super::{WAIT, init_crypto, pattern};

/// A server config presenting `id` and requiring a client certificate issued by one of
/// `client_cas`.
pub fn server_config(id: &Identity, client_cas: &[&CertificateDer<'static>]) -> ServerConfig {
    build_config(id, client_cas, rustls::DEFAULT_VERSIONS)
}

/// Like [`server_config`] but TLS 1.2 only, where the client learns of a rejected client
/// certificate during the handshake instead of after it.
pub fn server_config_tls12(id: &Identity, client_cas: &[&CertificateDer<'static>]) -> ServerConfig {
    build_config(id, client_cas, &[&rustls::version::TLS12])
}

fn build_config(
    id: &Identity,
    client_cas: &[&CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ServerConfig {
    init_crypto();
    let mut roots = RootCertStore::empty();
    for ca in client_cas {
        roots.add((*ca).clone()).expect("add client CA");
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .expect("client verifier");
    ServerConfig::builder_with_protocol_versions(versions)
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain(), id.key_der())
        .expect("server config")
}

/// What an upstream does with one accepted TLS connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Echo every byte back until end of stream, then close (close_notify + FIN).
    Echo,
    /// Read until end of stream, wait `delay`, then answer `received N sha256 HEX\n` and close.
    /// Needs the client's half-close to arrive while our direction stays open.
    ReplyAfterEof { delay: Duration },
    /// Send `greeting` and close our sending side at once, then keep reading until end of stream.
    CloseFirst { greeting: Vec<u8> },
    /// Send `len` pseudo-random bytes (seed `seed`) while reading everything the client sends.
    Duplex { len: usize, seed: u64 },
    /// Echo the first `n` bytes, wait for any further byte, then reset the TCP connection.
    EchoThenReset { n: usize },
}

/// One accepted TLS connection, recorded when its handshake completed.
#[derive(Clone, Debug)]
pub struct Conn {
    pub sni: Option<String>,
    pub client_der: Option<Vec<u8>>,
    pub client_cn: Option<String>,
    pub kind: Option<HandshakeKind>,
    pub version: Option<ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
}

/// One connection's end: what the application layer read, and how reading ended.
#[derive(Clone, Debug)]
pub struct Finished {
    pub received: u64,
    pub sha256: [u8; 32],
    /// `None` for a clean end of stream
    pub error: Option<String>,
}

#[derive(Default)]
pub struct Stats {
    pub tcp_accepted: AtomicUsize,
    pub handshake_failures: AtomicUsize,
    /// Bytes read by the application layer, over all connections.
    pub app_bytes: AtomicU64,
    pub conns: Mutex<Vec<Conn>>,
    pub finished: Mutex<Vec<Finished>>,
    pub handshake_errors: Mutex<Vec<String>>,
}

impl Stats {
    pub fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }

    pub fn tls_accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn app_bytes(&self) -> u64 {
        self.app_bytes.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have finished; polls because the connections run on other
    /// tasks.
    pub async fn wait_finished(&self, n: usize) -> Vec<Finished> {
        let deadline = Instant::now() + WAIT;
        loop {
            let finished = self.finished.lock().unwrap().clone();
            if finished.len() >= n {
                return finished;
            }
            assert!(
                Instant::now() < deadline,
                "upstream: {n} connections did not finish within {WAIT:?}; finished: {finished:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// A plain echo server with the good server identity, trusting `client_ca`.
    pub async fn echo(id: &Identity, client_ca: &CertificateDer<'static>) -> Upstream {
        Upstream::start(server_config(id, &[client_ca]), vec![Behavior::Echo]).await
    }

    /// Binds 127.0.0.1:0. Connection `i` follows `script[i]`, the last entry repeating.
    pub async fn start(config: ServerConfig, script: Vec<Behavior>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        Upstream::serve(listener, config, script)
    }

    /// Binds a given address (to bring an upstream up where the proxy already points).
    pub async fn start_on(
        addr: SocketAddr,
        config: ServerConfig,
        script: Vec<Behavior>,
    ) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Upstream::serve(listener, config, script))
    }

    fn serve(listener: TcpListener, config: ServerConfig, script: Vec<Behavior>) -> Upstream {
        assert!(!script.is_empty(), "empty upstream script");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(Stats::default());
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting this task ends them all.
            let mut conns = JoinSet::new();
            let mut index = 0;
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let behavior = script[index.min(script.len() - 1)].clone();
                index += 1;
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(handle(
                    acceptor.clone(),
                    tcp,
                    behavior,
                    Arc::clone(&task_stats),
                ));
            }
        });
        Upstream { addr, stats, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(acceptor: TlsAcceptor, tcp: TcpStream, behavior: Behavior, stats: Arc<Stats>) {
    let mut tls = match acceptor.accept(tcp).await {
        Ok(tls) => tls,
        Err(e) => {
            // The error first: a waiter on the counter then finds it.
            stats.handshake_errors.lock().unwrap().push(e.to_string());
            stats.handshake_failures.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    {
        let conn = tls.get_ref().1;
        let client_der = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec());
        stats.conns.lock().unwrap().push(Conn {
            sni: conn.server_name().map(str::to_owned),
            client_cn: client_der.as_deref().and_then(common_name),
            client_der,
            kind: conn.handshake_kind(),
            version: conn.protocol_version(),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        });
    }
    let mut reader = Reader::default();
    match behavior {
        Behavior::Echo => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = reader.read(&mut tls, &mut buf, &stats).await;
                if n == 0 {
                    break;
                }
                if tls.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = tls.shutdown().await;
        }
        Behavior::ReplyAfterEof { delay } => {
            reader.drain(&mut tls, &stats).await;
            tokio::time::sleep(delay).await;
            let reply = format!(
                "received {} sha256 {}\n",
                reader.received,
                super::hex(&reader.hasher.clone().finalize())
            );
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
        Behavior::CloseFirst { greeting } => {
            let _ = tls.write_all(&greeting).await;
            let _ = tls.shutdown().await;
            reader.drain(&mut tls, &stats).await;
        }
        Behavior::Duplex { len, seed } => {
            let (mut rd, mut wr) = tokio::io::split(tls);
            let data = pattern(seed, len);
            let write = async move {
                let _ = wr.write_all(&data).await;
                let _ = wr.shutdown().await;
            };
            let read = reader.drain(&mut rd, &stats);
            tokio::join!(write, read);
        }
        Behavior::EchoThenReset { n } => {
            let mut echoed = vec![];
            let mut buf = vec![0u8; 64 * 1024];
            while echoed.len() < n {
                let got = reader.read(&mut tls, &mut buf, &stats).await;
                if got == 0 {
                    break;
                }
                echoed.extend_from_slice(&buf[..got]);
                let _ = tls.write_all(&buf[..got]).await;
                let _ = tls.flush().await;
            }
            reader.read(&mut tls, &mut buf, &stats).await;
            reset(tls);
        }
    }
    stats.finished.lock().unwrap().push(Finished {
        received: reader.received,
        sha256: reader.hasher.finalize().into(),
        error: reader.error,
    });
}

/// Closes with SO_LINGER 0, so the peer gets an RST instead of a FIN.
fn reset(tls: TlsStream<TcpStream>) {
    let (tcp, _) = tls.into_inner();
    tcp.set_zero_linger().expect("SO_LINGER 0");
    drop(tcp);
}

/// Counts and hashes what the application layer reads.
#[derive(Default)]
struct Reader {
    received: u64,
    hasher: Sha256,
    error: Option<String>,
}

impl Reader {
    /// One read; 0 at end of stream or on error (recorded).
    async fn read(
        &mut self,
        io: &mut (impl AsyncRead + Unpin),
        buf: &mut [u8],
        stats: &Stats,
    ) -> usize {
        match io.read(buf).await {
            Ok(n) => {
                self.received += n as u64;
                self.hasher.update(&buf[..n]);
                stats.app_bytes.fetch_add(n as u64, Ordering::SeqCst);
                n
            }
            Err(e) => {
                self.error = Some(e.to_string());
                0
            }
        }
    }

    async fn drain(&mut self, io: &mut (impl AsyncRead + Unpin), stats: &Stats) {
        let mut buf = vec![0u8; 64 * 1024];
        while self.read(io, &mut buf, stats).await > 0 {}
    }
}

/// Accepts TCP connections and never says a word: for handshake timeouts.
pub struct Silent {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind silent");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(tcp);
            }
        });
        Silent {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server config from PEM files (e.g. what `mtls-sidecar dev-pki` wrote).
pub fn server_config_from_pem(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
) -> ServerConfig {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    init_crypto();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
    let key =
        PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca).expect("read client CA") {
        roots
            .add(ca.expect("parse client CA"))
            .expect("add client CA");
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .expect("client verifier");
    ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config from PEM files")
}
