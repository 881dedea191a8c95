//! A scripted SPIFFE Workload API server for the tests: tonic on a Unix socket in a temp dir,
//! serving the two streaming X.509 methods of the SPIFFE `workload.proto` (service
//! `SpiffeWorkloadAPI`: `FetchX509SVID`, `FetchX509Bundles`).
//!
//! There is no `protoc` on the build machines, so the messages below are written by hand as
//! `prost::Message` structs (field numbers and types copied from `workload.proto` as shipped in
//! the `spiffe` crate 0.19, `src/proto/workload.proto`), and the service is tonic's generic
//! `Grpc::server_streaming` behind a `tower::service_fn` that routes by path.
//!
//! A test scripts it: the SVIDs it issues ([`WorkloadApi::set_svids`]), the trust bundles it
//! hands out, own and federated ([`WorkloadApi::set_bundles`]), a delay before each stream's
//! first answer, withdrawal ([`WorkloadApi::deny`]: PermissionDenied, as SPIRE answers when the
//! workload has no identity any more), stopping (API down) and starting again on the same path.
//! Every change is pushed at once to every open stream. Like SPIRE, a request without the
//! metadata header `workload.spiffe.io: true` is refused with InvalidArgument.
//!
//! [`SpiffeCa`] is a small SPIFFE PKI: one CA per trust domain, X.509-SVIDs with one URI SAN.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::codegen::http;

use super::init_crypto;

/// The metadata header every Workload API request must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

// ---- wire messages (workload.proto) ----

/// `X509SVIDRequest` and `X509BundlesRequest`: no fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EmptyRequest {}

/// `X509SVIDResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    pub svids: Vec<X509Svid>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub crl: Vec<Vec<u8>>,
    /// Keyed by the trust domain's SPIFFE ID (`spiffe://TD`); DER certificates concatenated.
    #[prost(map = "string, bytes", tag = "3")]
    pub federated_bundles: std::collections::HashMap<String, Vec<u8>>,
}

/// `X509SVID`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509Svid {
    #[prost(string, tag = "1")]
    pub spiffe_id: String,
    /// DER chain, leaf first, concatenated.
    #[prost(bytes = "vec", tag = "2")]
    pub x509_svid: Vec<u8>,
    /// DER PKCS#8.
    #[prost(bytes = "vec", tag = "3")]
    pub x509_svid_key: Vec<u8>,
    /// DER bundle of the SVID's own trust domain.
    #[prost(bytes = "vec", tag = "4")]
    pub bundle: Vec<u8>,
    #[prost(string, tag = "5")]
    pub hint: String,
}

/// `X509BundlesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct X509BundlesResponse {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub crl: Vec<Vec<u8>>,
    /// Keyed by the trust domain's SPIFFE ID; own and federated.
    #[prost(map = "string, bytes", tag = "2")]
    pub bundles: std::collections::HashMap<String, Vec<u8>>,
}

// ---- a SPIFFE PKI ----

/// The CA of one trust domain (its certificate carries the URI SAN `spiffe://TD`, as SPIRE's do).
pub struct SpiffeCa {
    pub trust_domain: String,
    pub der: CertificateDer<'static>,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// One X.509-SVID: a leaf with the single URI SAN `id`, serverAuth and clientAuth.
#[derive(Clone)]
pub struct Svid {
    pub id: String,
    pub trust_domain: String,
    pub der: CertificateDer<'static>,
    pkcs8: Vec<u8>,
}

impl SpiffeCa {
    /// A fresh CA for `trust_domain` (e.g. `example.org`).
    pub fn new(trust_domain: &str) -> SpiffeCa {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("SPIFFE CA {trust_domain}"));
        let uri = Ia5String::try_from(format!("spiffe://{trust_domain}")).expect("IA5 URI");
        params.subject_alt_names.push(SanType::URI(uri));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = now();
        params.not_before = now - TimeDuration::days(1);
        params.not_after = now + TimeDuration::days(30);
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        SpiffeCa {
            trust_domain: trust_domain.to_owned(),
            der: issuer.der().clone(),
            issuer,
        }
    }

    /// An SVID for `spiffe://TD{path}` (`path` starts with `/`), valid from a minute ago for an
    /// hour, like SPIRE's.
    pub fn svid(&self, path: &str) -> Svid {
        let now = now();
        self.svid_valid(
            path,
            now - TimeDuration::minutes(1),
            now + TimeDuration::hours(1),
        )
    }

    /// An SVID for `spiffe://TD{path}` with the given validity.
    pub fn svid_valid(&self, path: &str, from: OffsetDateTime, until: OffsetDateTime) -> Svid {
        let id = format!("spiffe://{}{path}", self.trust_domain);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "SVID");
        let uri = Ia5String::try_from(id.clone()).expect("IA5 URI");
        params.subject_alt_names.push(SanType::URI(uri));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(fresh_serial());
        params.not_before = from;
        params.not_after = until;
        let key = KeyPair::generate().expect("SVID key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign SVID");
        Svid {
            id,
            trust_domain: self.trust_domain.clone(),
            der: cert.der().clone(),
            pkcs8: key.serialize_der(),
        }
    }
}

impl Svid {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.der.clone()]
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.pkcs8.clone()).into()
    }

    /// A server config presenting this SVID and requiring a client chain to one of `client_cas`
    /// (an in-process SPIFFE upstream).
    pub fn server_config(&self, client_cas: &[&SpiffeCa]) -> ServerConfig {
        init_crypto();
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots(client_cas)))
            .build()
            .expect("client verifier");
        ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain(), self.key_der())
            .expect("server config")
    }

    /// A client config presenting this SVID. SPIFFE servers carry no DNS name, so the server is
    /// checked only for its chain to one of `server_cas` (names are the test's business).
    pub fn client_config(&self, server_cas: &[&SpiffeCa]) -> ClientConfig {
        init_crypto();
        let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots(server_cas)))
            .build()
            .expect("server verifier");
        ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
            .with_client_auth_cert(self.chain(), self.key_der())
            .expect("client config")
    }

    fn proto(&self, bundle: Vec<u8>) -> X509Svid {
        X509Svid {
            spiffe_id: self.id.clone(),
            x509_svid: self.der.to_vec(),
            x509_svid_key: self.pkcs8.clone(),
            bundle,
            hint: String::new(),
        }
    }
}

fn roots(cas: &[&SpiffeCa]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der.clone()).expect("add CA");
    }
    roots
}

/// A server verifier that accepts a name mismatch (SVIDs have no DNS SAN) but nothing else.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 ns")
}

fn fresh_serial() -> rcgen::SerialNumber {
    static COUNTER: AtomicUsize = AtomicUsize::new(1);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst) as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut serial = super::pattern(nanos ^ (n << 40) ^ u64::from(std::process::id()), 16);
    serial[0] = 0x10 + serial[0] % 0x70;
    rcgen::SerialNumber::from(serial)
}

// ---- the server ----

/// What the server answers; every change bumps `generation`, which every open stream watches.
#[derive(Default)]
struct Script {
    /// Empty: no answer yet (a stream waits silently).
    svids: Vec<Svid>,
    /// Trust domain -> DER CA certificates concatenated (own and federated).
    bundles: BTreeMap<String, Vec<u8>>,
    first_delay: Duration,
    /// Withdrawn: every stream gets PermissionDenied and ends; new ones too.
    denied: bool,
}

struct Shared {
    script: Mutex<Script>,
    generation: watch::Sender<u64>,
    svid_requests: AtomicUsize,
    bundle_requests: AtomicUsize,
    refused_requests: AtomicUsize,
    open_streams: AtomicUsize,
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The scripted Workload API on `DIR/agent.sock`. Stops when dropped.
pub struct WorkloadApi {
    _dir: TempDir,
    path: PathBuf,
    shared: Arc<Shared>,
    running: Option<Running>,
}

enum Answer {
    Svids(X509SvidResponse),
    Bundles(X509BundlesResponse),
    Denied,
    Nothing,
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Svid,
    Bundles,
}

impl WorkloadApi {
    /// Starts a server with nothing to hand out yet (streams wait until [`Self::set_svids`]).
    pub async fn start() -> WorkloadApi {
        let dir = tempfile::Builder::new()
            .prefix("mtls-sidecar-wapi")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("agent.sock");
        let shared = Arc::new(Shared {
            script: Mutex::new(Script::default()),
            generation: watch::channel(0).0,
            svid_requests: AtomicUsize::new(0),
            bundle_requests: AtomicUsize::new(0),
            refused_requests: AtomicUsize::new(0),
            open_streams: AtomicUsize::new(0),
        });
        let mut api = WorkloadApi {
            _dir: dir,
            path,
            shared,
            running: None,
        };
        api.start_again();
        api
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `unix:PATH`, as `--spiffe-socket` and `SPIFFE_ENDPOINT_SOCKET` take it.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// Replaces the SVID list (the first is the default one) and pushes it to every stream; a
    /// withdrawn identity is issued again.
    pub fn set_svids(&self, svids: &[&Svid]) {
        self.change(|s| {
            s.svids = svids.iter().map(|&v| v.clone()).collect();
            s.denied = false;
        });
    }

    /// Replaces the trust bundles (own trust domain and federated ones) and pushes them.
    pub fn set_bundles(&self, cas: &[&SpiffeCa]) {
        self.change(|s| {
            s.bundles.clear();
            for ca in cas {
                s.bundles
                    .entry(ca.trust_domain.clone())
                    .or_default()
                    .extend_from_slice(&ca.der);
            }
        });
    }

    /// Issues `svids` and trusts `cas` in one update.
    pub fn issue(&self, svids: &[&Svid], cas: &[&SpiffeCa]) {
        self.set_bundles(cas);
        self.set_svids(svids);
    }

    /// Each new stream waits this long before its first answer.
    pub fn delay_first_answer(&self, delay: Duration) {
        self.shared.script.lock().unwrap().first_delay = delay;
    }

    /// Withdraws the identity: every open stream and every new request gets PermissionDenied,
    /// until the next [`Self::set_svids`].
    pub fn deny(&self) {
        self.change(|s| s.denied = true);
    }

    /// Sends the current answer again on every open stream, unchanged.
    pub fn push(&self) {
        self.change(|_| {});
    }

    fn change(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.shared.script.lock().unwrap());
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// `FetchX509SVID` requests that carried the security header.
    pub fn svid_requests(&self) -> usize {
        self.shared.svid_requests.load(Ordering::SeqCst)
    }

    /// `FetchX509Bundles` requests that carried the security header.
    pub fn bundle_requests(&self) -> usize {
        self.shared.bundle_requests.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing or wrong security header.
    pub fn refused_requests(&self) -> usize {
        self.shared.refused_requests.load(Ordering::SeqCst)
    }

    /// Streams open right now.
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Waits (bounded by `limit`) until `pred` holds; false if it never did.
    pub async fn wait_until(&self, limit: Duration, pred: impl Fn(&WorkloadApi) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !pred(self) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// API down: ends every stream, closes every connection, removes the socket file.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            let mut task = running.task;
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Serves again on the same path (after [`Self::stop`]; a no-op while running).
    pub fn start_again(&mut self) {
        if self.running.is_some() {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("bind Workload API");
        let (stop, stop_rx) = watch::channel(false);
        let shared = self.shared.clone();
        let svc_stop = stop_rx.clone();
        let svc = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let shared = shared.clone();
            let stop = svc_stop.clone();
            async move { Ok::<_, std::convert::Infallible>(route(shared, stop, req).await) }
        });
        let mut shutdown = stop_rx;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(svc, UnixListenerStream::new(listener), async move {
                    let _ = shutdown.wait_for(|s| *s).await;
                })
                .await;
        });
        self.running = Some(Running { stop, task });
    }
}

impl Drop for WorkloadApi {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(true);
            running.task.abort();
        }
    }
}

async fn route(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let method = match req.uri().path() {
        "/SpiffeWorkloadAPI/FetchX509SVID" => Method::Svid,
        "/SpiffeWorkloadAPI/FetchX509Bundles" => Method::Bundles,
        _ => return tonic::Status::unimplemented("not served by the test server").into_http(),
    };
    let header_ok = req
        .headers()
        .get(SECURITY_HEADER)
        .is_some_and(|v| v.as_bytes() == b"true");
    if !header_ok {
        shared.refused_requests.fetch_add(1, Ordering::SeqCst);
        return tonic::Status::invalid_argument("security header missing from request").into_http();
    }
    match method {
        Method::Svid => shared.svid_requests.fetch_add(1, Ordering::SeqCst),
        Method::Bundles => shared.bundle_requests.fetch_add(1, Ordering::SeqCst),
    };
    if method == Method::Svid {
        serve_stream::<X509SvidResponse>(shared, stop, method, req).await
    } else {
        serve_stream::<X509BundlesResponse>(shared, stop, method, req).await
    }
}

/// Answer types a stream can carry.
trait FromAnswer: prost::Message + Default + Send + Sync + 'static {
    fn from_answer(answer: Answer) -> Option<Self>;
}

impl FromAnswer for X509SvidResponse {
    fn from_answer(answer: Answer) -> Option<Self> {
        match answer {
            Answer::Svids(r) => Some(r),
            _ => None,
        }
    }
}

impl FromAnswer for X509BundlesResponse {
    fn from_answer(answer: Answer) -> Option<Self> {
        match answer {
            Answer::Bundles(r) => Some(r),
            _ => None,
        }
    }
}

async fn serve_stream<T: FromAnswer>(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    method: Method,
    req: http::Request<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let handler = tower::service_fn(move |_: tonic::Request<EmptyRequest>| {
        let shared = shared.clone();
        let stop = stop.clone();
        async move {
            if shared.script.lock().unwrap().denied {
                return Err(tonic::Status::permission_denied("no identity issued"));
            }
            let (tx, rx) = mpsc::channel::<Result<T, tonic::Status>>(4);
            tokio::spawn(feed(shared, stop, method, tx));
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        }
    });
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .server_streaming(handler, req)
        .await
}

/// One stream: after the first-answer delay, sends the current answer and then one per change,
/// until the client goes away, the identity is withdrawn or the server stops.
async fn feed<T: FromAnswer>(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    method: Method,
    tx: mpsc::Sender<Result<T, tonic::Status>>,
) {
    shared.open_streams.fetch_add(1, Ordering::SeqCst);
    let mut generation = shared.generation.subscribe();
    let delay = shared.script.lock().unwrap().first_delay;
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(|s| *s) => { shared.open_streams.fetch_sub(1, Ordering::SeqCst); return; }
    }
    loop {
        generation.borrow_and_update();
        let answer = answer(&shared.script.lock().unwrap(), method);
        let sent = match answer {
            Answer::Denied => {
                let status = tonic::Status::permission_denied("no identity issued");
                let _ = tx.send(Err(status)).await;
                break;
            }
            Answer::Nothing => true,
            other => match T::from_answer(other) {
                Some(msg) => tx.send(Ok(msg)).await.is_ok(),
                None => true,
            },
        };
        if !sent {
            break;
        }
        tokio::select! {
            changed = generation.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
            _ = tx.closed() => break,
        }
    }
    shared.open_streams.fetch_sub(1, Ordering::SeqCst);
}

fn answer(script: &Script, method: Method) -> Answer {
    if script.denied {
        return Answer::Denied;
    }
    let by_id = |td: &str| format!("spiffe://{td}");
    match method {
        Method::Svid if script.svids.is_empty() => Answer::Nothing,
        Method::Svid => {
            let svids = script
                .svids
                .iter()
                .map(|v| {
                    v.proto(
                        script
                            .bundles
                            .get(&v.trust_domain)
                            .cloned()
                            .unwrap_or_default(),
                    )
                })
                .collect();
            let own: Vec<&str> = script
                .svids
                .iter()
                .map(|v| v.trust_domain.as_str())
                .collect();
            let federated_bundles = script
                .bundles
                .iter()
                .filter(|(td, _)| !own.contains(&td.as_str()))
                .map(|(td, der)| (by_id(td), der.clone()))
                .collect();
            Answer::Svids(X509SvidResponse {
                svids,
                crl: Vec::new(),
                federated_bundles,
            })
        }
        Method::Bundles if script.bundles.is_empty() => Answer::Nothing,
        Method::Bundles => Answer::Bundles(X509BundlesResponse {
            crl: Vec::new(),
            bundles: script
                .bundles
                .iter()
                .map(|(td, der)| (by_id(td), der.clone()))
                .collect(),
        }),
    }
}
