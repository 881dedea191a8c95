//! [`HttpUpstream`]: the mTLS hyper server, h2 or HTTP/1.1 as ALPN decides, whose paths select
//! what it answers.

use super::*;

mod plain;

/// An mTLS HTTP server on 127.0.0.1:0 that requires a client certificate from the test CA.
/// It stops when dropped. What it answers, by path:
///
/// - `/upload`: reads the whole body, answers `LEN SHA256HEX\n` and a `trailer NAME=VALUE`
///   line per request trailer
/// - `/echo`: streams the request body back
/// - `/download?len=N&seed=S[&gate=1]`: N pseudo-random bytes ([`pattern`]) in 64 KiB frames
///   with no length announced (chunked in HTTP/1.1); with `gate=1` it stops after the first
///   frame until [`HttpUpstream::release`]
/// - `/trailers`: a body, then trailers `x-checksum` (SHA-256 hex of the body) and
///   `grpc-status: 0`, announced in a `trailer` header
/// - `/hold`: answers `released\n` once [`HttpUpstream::release`] was called
/// - `/ws`: a WebSocket-style upgrade (HTTP/1.1 only): `101`, then `welcome\n`, then echo
/// - `/resp-hop`: a response carrying hop-by-hop headers and `x-resp-custom: kept`
/// - `/status/NNN`: status NNN
/// - anything else: `200 ok\n`
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<HttpStats>,
    gate: watch::Sender<bool>,
    kill: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl HttpUpstream {
    /// The good server identity (`localhost`, 127.0.0.1) agreeing to `alpn`.
    pub async fn start(pki: &Pki, alpn: Alpn) -> HttpUpstream {
        HttpUpstream::with_config(server_config(&pki.server, &[&pki.ca.der]), alpn).await
    }

    pub async fn with_config(config: ServerConfig, alpn: Alpn) -> HttpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        HttpUpstream::serve(listener, config, alpn)
    }

    /// On a given address (e.g. port 443).
    pub async fn start_on(pki: &Pki, alpn: Alpn, addr: SocketAddr) -> io::Result<HttpUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let config = server_config(&pki.server, &[&pki.ca.der]);
        Ok(HttpUpstream::serve(listener, config, alpn))
    }

    fn serve(listener: TcpListener, mut config: ServerConfig, alpn: Alpn) -> HttpUpstream {
        config.alpn_protocols = alpn.protocols();
        let config = Arc::new(config);
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(HttpStats::default());
        let (gate, gate_rx) = watch::channel(false);
        let (kill, kill_rx) = watch::channel(0);
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            // Owning the connection tasks here means aborting this task ends them all.
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_conn(
                    Arc::clone(&config),
                    tcp,
                    Arc::clone(&task_stats),
                    gate_rx.clone(),
                    kill_rx.clone(),
                ));
            }
        });
        HttpUpstream {
            addr,
            stats,
            gate,
            kill,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Lets every held `/hold` and gated `/download` go on, now and from now on.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    /// Drops every open connection without a word: no GOAWAY, no `Connection: close`, no
    /// close_notify, just a FIN. Connections made later are not affected.
    pub fn drop_connections(&self) {
        self.kill.send_modify(|n| *n += 1);
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: Arc<HttpStats>,
    gate: watch::Receiver<bool>,
    mut kill: watch::Receiver<u64>,
) {
    // Only a drop_connections() from now on concerns this connection.
    kill.borrow_and_update();
    let Some((tls, id)) = accept_tls(config, tcp, &stats).await else {
        return;
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc_stats = Arc::clone(&stats);
    let svc = service_fn(move |req| handle(req, id, Arc::clone(&svc_stats), gate.clone()));
    let io = TokioIo::new(tls);
    let serve = async move {
        if h2 {
            // Large enough that the proxy's header limit, not ours, is what a test meets.
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_header_list_size(1 << 20)
                .serve_connection(io, svc)
                .await;
        } else {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        }
    };
    // Dropping `serve` drops the TLS stream: the socket closes with no TLS or HTTP goodbye.
    tokio::select! {
        () = serve => {}
        _ = kill.changed() => {}
    }
    stats.set_closed(id);
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn handle(
    req: Request<Incoming>,
    conn: usize,
    stats: Arc<HttpStats>,
    gate: watch::Receiver<bool>,
) -> Result<Response<Body>, Infallible> {
    stats.requests.lock().unwrap().push(Seen::of(&req, conn));
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    Ok(match path.as_str() {
        "/upload" => upload(req, &stats).await,
        "/echo" => Response::new(incoming(req.into_body())),
        "/download" => download(&query, gate),
        "/trailers" => with_trailers(),
        "/hold" => {
            let mut gate = gate;
            let _ = gate.wait_for(|open| *open).await;
            text(200, "released\n")
        }
        "/ws" => websocket(req),
        "/resp-hop" => Response::builder()
            .header(header::CONNECTION, "x-resp-drop")
            .header("x-resp-drop", "1")
            .header("keep-alive", "timeout=7")
            .header(header::PROXY_AUTHENTICATE, "Basic realm=\"upstream\"")
            .header("x-resp-custom", "kept")
            .body(full("ok\n"))
            .expect("response"),
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            text(code, format!("status {code}\n"))
        }
        _ => text(200, "ok\n"),
    })
}

async fn upload(req: Request<Incoming>, stats: &HttpStats) -> Response<Body> {
    let mut body = req.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut trailers = String::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => return text(400, format!("request body error after {len} bytes: {e}\n")),
        };
        match frame.into_data() {
            Ok(data) => {
                len += data.len() as u64;
                hasher.update(&data);
                stats
                    .upload_bytes
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    for (name, value) in header_pairs(&t) {
                        trailers.push_str(&format!("trailer {name}={value}\n"));
                    }
                }
            }
        }
    }
    text(
        200,
        format!("{len} {}\n{trailers}", hex(&hasher.finalize())),
    )
}

/// 64 KiB frames of `pattern(seed, len)`.
fn download(query: &str, gate: watch::Receiver<bool>) -> Response<Body> {
    let len: usize = query_param(query, "len")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let seed: u64 = query_param(query, "seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let gated = query_param(query, "gate") == Some("1");
    let data = Bytes::from(pattern(seed, len));
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let mut gate = gate;
        let mut at = 0;
        while at < data.len() {
            if gated && at > 0 {
                let _ = gate.wait_for(|open| *open).await;
            }
            let end = (at + 64 * 1024).min(data.len());
            if tx.send(Ok(Frame::data(data.slice(at..end)))).await.is_err() {
                return;
            }
            at = end;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .expect("response")
}

pub const TRAILERS_BODY: &str = "body before the trailers\n";

fn with_trailers() -> Response<Body> {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(Bytes::from(TRAILERS_BODY)))).await;
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "x-checksum",
            hex(&crate::support::sha256(TRAILERS_BODY.as_bytes()))
                .parse()
                .unwrap(),
        );
        trailers.insert("grpc-status", "0".parse().unwrap());
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::TRAILER, "x-checksum, grpc-status")
        .body(body)
        .expect("response")
}

pub const WS_WELCOME: &[u8] = b"welcome\n";

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let headers = req.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok());
    let connection = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok());
    if req.version() != Version::HTTP_11
        || !has_token(upgrade, "websocket")
        || !has_token(connection, "upgrade")
    {
        return text(
            400,
            format!("not an upgrade request: {:?}\n", header_pairs(headers)),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        if io.write_all(WS_WELCOME).await.is_err() || io.flush().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        .body(empty())
        .expect("response")
}
