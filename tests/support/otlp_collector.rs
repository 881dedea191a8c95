//! An OTLP trace collector for the tests, on 127.0.0.1 port 0: OTLP/HTTP (`POST /v1/traces`,
//! protobuf) or OTLP/gRPC (`TraceService/Export`). It decodes every `ExportTraceServiceRequest`
//! and keeps each span with its resource's attributes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::WAIT;

/// One span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct Got {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

impl Got {
    pub fn name(&self) -> &str {
        &self.span.name
    }

    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// Empty for a root span.
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A span attribute as text (ints as decimal).
    pub fn attr(&self, key: &str) -> Option<String> {
        find(&self.span.attributes, key)
    }

    pub fn resource_attr(&self, key: &str) -> Option<String> {
        find(&self.resource, key)
    }

    /// The status code: 0 unset, 1 ok, 2 error.
    pub fn status(&self) -> i32 {
        self.span.status.as_ref().map_or(0, |s| s.code)
    }
}

fn find(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    text(v)
}

fn text(v: &AnyValue) -> Option<String> {
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the collector received.
#[derive(Default)]
struct Received {
    spans: Vec<Got>,
    /// Export requests, including empty ones.
    requests: usize,
}

type Shared = Arc<Mutex<Received>>;

fn record(shared: &Shared, req: ExportTraceServiceRequest) {
    let mut r = shared.lock().expect("collector lock");
    r.requests += 1;
    for rs in req.resource_spans {
        let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                r.spans.push(Got {
                    resource: resource.clone(),
                    span,
                });
            }
        }
    }
}

pub struct Collector {
    pub addr: SocketAddr,
    shared: Shared,
    task: JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// OTLP/HTTP with protobuf bodies.
    pub async fn http() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let shared: Shared = Arc::default();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(export(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Collector { addr, shared, task }
    }

    /// OTLP/gRPC (tonic's TraceService server).
    pub async fn grpc() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("collector addr");
        let shared: Shared = Arc::default();
        let svc = TraceServiceServer::new(Grpc(shared.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .serve_with_incoming(svc, incoming)
                .await;
        });
        Collector { addr, shared, task }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Got> {
        self.shared.lock().expect("collector lock").spans.clone()
    }

    pub fn requests(&self) -> usize {
        self.shared.lock().expect("collector lock").requests
    }

    /// Polls until `pred` holds for the spans received; fails with `what` after [`WAIT`].
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "collector: not within {WAIT:?}: {what}; got {:#?}",
                spans
                    .iter()
                    .map(|g| (g.name(), g.span_id(), g.parent_id()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn export(state: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path_ok = req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
    let Ok(body) = Limited::new(req.into_body(), 16 << 20).collect().await else {
        return reply(StatusCode::BAD_REQUEST, Bytes::new());
    };
    if !path_ok {
        return reply(StatusCode::NOT_FOUND, Bytes::new());
    }
    match ExportTraceServiceRequest::decode(body.to_bytes()) {
        Ok(decoded) => {
            record(state, decoded);
            let answer = ExportTraceServiceResponse::default().encode_to_vec();
            reply(StatusCode::OK, Bytes::from(answer))
        }
        Err(_) => reply(StatusCode::BAD_REQUEST, Bytes::new()),
    }
}

fn reply(code: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    r
}

struct Grpc(Shared);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}
