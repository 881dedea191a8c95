//! [`RawUpstream`]: a hand-written HTTP/1.1 server for what hyper will not produce.

use super::*;

/// What [`RawUpstream`] does on each connection after reading one request head.
#[derive(Clone, Copy, Debug)]
pub enum RawBehavior {
    /// Answer `200 ok\n` (keep-alive: no `Connection: close`), then close the connection
    /// without a word: no close_notify, just a FIN.
    CloseAfterResponse,
    /// Reset the TCP connection (RST) without answering.
    ResetAfterHead,
}

/// An HTTP/1.1-only mTLS upstream written by hand: one request per connection.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<HttpStats>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(pki: &Pki, behavior: RawBehavior) -> RawUpstream {
        let mut config = server_config(&pki.server, &[&pki.ca.der]);
        config.alpn_protocols = Alpn::Http11.protocols();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(HttpStats::default());
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(raw_conn(
                    Arc::clone(&config),
                    tcp,
                    Arc::clone(&task_stats),
                    behavior,
                ));
            }
        });
        RawUpstream { addr, stats, task }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_conn(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    stats: Arc<HttpStats>,
    behavior: RawBehavior,
) {
    let Some((mut tls, id)) = accept_tls(config, tcp, &stats).await else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = find(&head, b"\r\n\r\n") {
            break end;
        }
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => {
                stats.set_closed(id);
                return;
            }
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    };
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let seen = Seen {
        conn: id,
        method: first.next().unwrap_or_default().to_string(),
        target: first.next().unwrap_or_default().to_string(),
        version: Version::HTTP_11,
        authority: None,
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect(),
    };
    stats.requests.lock().unwrap().push(seen);
    match behavior {
        RawBehavior::CloseAfterResponse => {
            let answer =
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
            let _ = tls.write_all(answer).await;
            let _ = tls.flush().await;
            // Dropped without shutdown(): no close_notify, a bare FIN.
            drop(tls);
        }
        RawBehavior::ResetAfterHead => {
            let (tcp, _) = tls.into_inner();
            tcp.set_zero_linger().expect("SO_LINGER 0");
            drop(tcp);
        }
    }
    stats.set_closed(id);
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
