//! [`HttpUpstream::plain`]: the same server without TLS, speaking HTTP/1.1 only, as the
//! plaintext target behind an inbound http-mode route.

use super::*;

impl HttpUpstream {
    /// A plaintext HTTP/1.1 server on 127.0.0.1:0 answering the same paths as the mTLS one
    /// (each connection recorded with no TLS facts). It stops when dropped.
    pub async fn plain() -> HttpUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let addr = listener.local_addr().expect("local addr");
        let stats = Arc::new(HttpStats::default());
        let (gate, gate_rx) = watch::channel(false);
        let (kill, kill_rx) = watch::channel(0);
        let task_stats = Arc::clone(&stats);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                task_stats.tcp_accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve_plain(
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
}

async fn serve_plain(
    tcp: TcpStream,
    stats: Arc<HttpStats>,
    gate: watch::Receiver<bool>,
    mut kill: watch::Receiver<u64>,
) {
    kill.borrow_and_update();
    let id = stats.add_conn(UpConn {
        id: 0,
        offered_alpn: Vec::new(),
        alpn: None,
        sni: None,
        client_serial: None,
        client_cn: None,
        closed: false,
    });
    let svc_stats = Arc::clone(&stats);
    let svc = service_fn(move |req| handle(req, id, Arc::clone(&svc_stats), gate.clone()));
    let serve = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), svc)
        .with_upgrades();
    tokio::select! {
        _ = serve => {}
        _ = kill.changed() => {}
    }
    stats.set_closed(id);
}
