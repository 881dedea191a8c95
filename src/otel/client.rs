//! The OTLP/HTTP exporter's client: hyper-util's pooled client on our tokio runtime (the
//! batch processor's own thread only waits for it), plain `http://` only, every export bounded
//! by the export timeout and every answer's body by [`MAX_ANSWER_BYTES`].

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};

/// A collector's answer is a small protobuf (partial success at most); more is not read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The exporter's HTTP client.
#[derive(Debug, Clone)]
pub(super) struct HyperClient {
    /// Pooled plaintext HTTP/1.1 client.
    client: Client<HttpConnector, Full<Bytes>>,
    /// The runtime the requests run on (made at startup, inside it).
    runtime: tokio::runtime::Handle,
    /// Bound on one export, connect included.
    timeout: Duration,
}

impl HyperClient {
    /// Call inside the runtime.
    pub(super) fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        HyperClient {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(2)
                .build(connector),
            runtime: tokio::runtime::Handle::current(),
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for HyperClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (client, timeout) = (self.client.clone(), self.timeout);
        let request = request.map(Full::new);
        let exchange = async move {
            let resp = client.request(request).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await?;
            Ok::<_, HttpError>(Response::from_parts(parts, body.to_bytes()))
        };
        // Spawned on the runtime: the caller is the batch processor's thread, outside it.
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await });
        match task.await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("no answer from the collector within {timeout:?}").into()),
            Err(e) => Err(Box::new(e)),
        }
    }
}
