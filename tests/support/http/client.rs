//! The app side through hyper: HTTP/1.1 and h2c clients over plain TCP, replies read whole.

use super::*;

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a response's whole body and trailers (within `limit`).
pub async fn read_reply_within(resp: Response<Incoming>, limit: Duration) -> Reply {
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| {
                panic!(
                    "reading a {} response body (after {} bytes): {e}",
                    parts.status,
                    data.len()
                )
            });
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
    };
    if timeout(limit, read).await.is_err() {
        panic!(
            "a {} response body did not end within {limit:?} ({} bytes so far)",
            parts.status,
            data.len()
        );
    }
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    }
}

pub async fn read_reply(resp: Response<Incoming>) -> Reply {
    read_reply_within(resp, WAIT).await
}

/// A request for an HTTP/1.1 app connection: origin-form target, `Host: app.invalid`.
pub fn h1_req(method: &str, target: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, APP_HOST)
}

/// A request for an h2c app connection: `:authority` app.invalid.
pub fn h2_req(method: &str, target: &str) -> hyper::http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{APP_HOST}{target}"))
}

/// An HTTP/1.1 keep-alive connection to the proxy (upgrades enabled).
pub struct H1Client {
    pub sender: hyper::client::conn::http1::SendRequest<Body>,
    pub conn: JoinHandle<hyper::Result<()>>,
}

impl H1Client {
    pub async fn connect(addr: SocketAddr) -> H1Client {
        let tcp = connect(addr).await;
        let (sender, conn) = timeout(
            WAIT,
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
        )
        .await
        .expect("HTTP/1.1 handshake timed out")
        .expect("HTTP/1.1 handshake");
        let conn = tokio::spawn(conn.with_upgrades());
        H1Client { sender, conn }
    }

    /// Sends and waits for the response head.
    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        self.try_send(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Sends and waits for the response head, or the connection's end before it.
    pub async fn try_send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        timeout(WAIT, self.sender.ready())
            .await
            .expect("HTTP/1.1 connection not ready in time")
            .expect("HTTP/1.1 connection closed");
        let what = format!("{} {}", req.method(), req.uri());
        timeout(WAIT, self.sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head within {WAIT:?}"))
    }

    pub async fn call(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }
}

/// One request on a connection of its own.
pub async fn h1_call(addr: SocketAddr, req: Request<Body>) -> Reply {
    H1Client::connect(addr).await.call(req).await
}

/// An h2c (prior knowledge) connection to the proxy; clones share it.
#[derive(Clone)]
pub struct H2Client {
    pub sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl H2Client {
    pub async fn connect(addr: SocketAddr) -> H2Client {
        let tcp = connect(addr).await;
        let (sender, conn) = timeout(
            WAIT,
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)),
        )
        .await
        .expect("h2c handshake timed out")
        .expect("h2c handshake");
        tokio::spawn(conn);
        H2Client { sender }
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        timeout(WAIT, self.sender.ready())
            .await
            .expect("h2c connection not ready in time")
            .expect("h2c connection closed");
        let what = format!("{} {}", req.method(), req.uri());
        timeout(WAIT, self.sender.send_request(req))
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head within {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    pub async fn call(&mut self, req: Request<Body>) -> Reply {
        let resp = self.send(req).await;
        read_reply(resp).await
    }
}
