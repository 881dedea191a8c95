//! What [`HttpUpstream`] records: ALPN choices, each TLS connection and each request, and the
//! counters tests wait on.

use super::*;

/// Which ALPN protocols an upstream agrees to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` and `http/1.1`: the proxy should get h2.
    H2AndHttp11,
    /// `http/1.1` only.
    Http11,
    /// No ALPN at all (a server that ignores the extension): HTTP/1.1.
    None,
}

impl Alpn {
    pub(super) fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::H2AndHttp11 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
            Alpn::None => vec![],
        }
    }

    /// The protocol version requests should arrive in.
    pub fn version(self) -> Version {
        match self {
            Alpn::H2AndHttp11 => Version::HTTP_2,
            _ => Version::HTTP_11,
        }
    }
}

/// One TLS connection the upstream completed.
#[derive(Clone, Debug)]
pub struct UpConn {
    pub id: usize,
    /// what the client offered in its ClientHello, in order
    pub offered_alpn: Vec<String>,
    pub alpn: Option<String>,
    pub sni: Option<String>,
    pub client_serial: Option<String>,
    pub client_cn: Option<String>,
    /// the connection has ended (either side closed it)
    pub closed: bool,
}

/// One request as the upstream's application saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// [`UpConn::id`] of the connection it came on
    pub conn: usize,
    pub method: String,
    /// path and query
    pub target: String,
    pub version: Version,
    /// the URI's authority: `:authority` in h2; none in HTTP/1.1 origin form
    pub authority: Option<String>,
    /// (lowercase name, value), in order
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub(super) fn of<B>(req: &Request<B>, conn: usize) -> Seen {
        Seen {
            conn,
            method: req.method().to_string(),
            target: req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            version: req.version(),
            authority: req.uri().authority().map(|a| a.to_string()),
            headers: header_pairs(req.headers()),
        }
    }

    /// The first value of a header.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// What names the upstream's virtual host: `:authority` in h2 (a `host` header there must
    /// agree), `Host` in HTTP/1.1.
    pub fn host(&self) -> Option<&str> {
        if self.version == Version::HTTP_2 {
            if let (Some(host), Some(authority)) = (self.get("host"), self.authority.as_deref()) {
                assert_eq!(
                    host, authority,
                    "h2 request with a host header that disagrees with :authority: {self:?}"
                );
            }
            self.authority.as_deref().or(self.get("host"))
        } else {
            self.get("host")
        }
    }

    pub fn id(&self) -> Option<&str> {
        self.get("x-request-id")
    }
}

pub fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[derive(Default)]
pub struct HttpStats {
    pub tcp_accepted: AtomicUsize,
    pub handshake_failures: AtomicUsize,
    /// request body bytes read by `/upload`, over all requests
    pub upload_bytes: AtomicU64,
    conns: Mutex<Vec<UpConn>>,
    pub(super) requests: Mutex<Vec<Seen>>,
}

impl HttpStats {
    pub fn conns(&self) -> Vec<UpConn> {
        self.conns.lock().unwrap().clone()
    }

    pub fn tls_accepted(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn closed(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.closed)
            .count()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn conn(&self, id: usize) -> UpConn {
        self.conns.lock().unwrap()[id].clone()
    }

    /// The only request carrying `x-request-id: id` (fails if there are none or several).
    pub fn request(&self, id: &str) -> Seen {
        let found: Vec<Seen> = self
            .requests()
            .into_iter()
            .filter(|s| s.id() == Some(id))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "the upstream saw request {id} {} times: {found:#?}",
            found.len()
        );
        found.into_iter().next().unwrap()
    }

    /// Waits until at least `n` requests have reached the upstream's application.
    pub async fn wait_requests(&self, n: usize) -> Vec<Seen> {
        eventually(&format!("{n} requests at the upstream"), WAIT, || {
            self.request_count() >= n
        })
        .await;
        self.requests()
    }

    /// Waits until connection `id` has closed.
    pub async fn wait_closed(&self, id: usize, limit: Duration) {
        eventually(&format!("upstream connection {id} closed"), limit, || {
            self.conn(id).closed
        })
        .await;
    }

    pub(super) fn add_conn(&self, mut conn: UpConn) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conn.id = conns.len();
        conns.push(conn);
        conns.len() - 1
    }

    pub(super) fn set_closed(&self, id: usize) {
        self.conns.lock().unwrap()[id].closed = true;
    }
}

/// The TLS handshake of one accepted connection, recorded; `None` if it failed.
pub(super) async fn accept_tls(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: &HttpStats,
) -> Option<(TlsStream<TcpStream>, usize)> {
    let failed = || stats.handshake_failures.fetch_add(1, Ordering::SeqCst);
    let Ok(start) = LazyConfigAcceptor::new(Acceptor::default(), tcp).await else {
        failed();
        return None;
    };
    let offered_alpn = start
        .client_hello()
        .alpn()
        .map(|protos| {
            protos
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let Ok(tls) = start.into_stream(config).await else {
        failed();
        return None;
    };
    let conn = tls.get_ref().1;
    let client_der = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let id = stats.add_conn(UpConn {
        id: 0,
        offered_alpn,
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        sni: conn.server_name().map(str::to_owned),
        client_serial: client_der.as_deref().map(serial_of),
        client_cn: client_der.as_deref().and_then(common_name),
        closed: false,
    });
    Some((tls, id))
}
