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
//! [`SpiffeCa`] and [`Svid`] (from `workload_api_pki`) are the SPIFFE PKI it hands out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::codegen::http;

pub use super::workload_api_pki::{SpiffeCa, Svid};

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
                    proto(
                        v,
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

fn proto(svid: &Svid, bundle: Vec<u8>) -> X509Svid {
    X509Svid {
        spiffe_id: svid.id.clone(),
        x509_svid: svid.der.to_vec(),
        x509_svid_key: svid.pkcs8().to_vec(),
        bundle,
        hint: String::new(),
    }
}
