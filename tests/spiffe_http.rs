//! SPIFFE routes in http mode: app -> outbound (`--mode http`) -> inbound (`--mode http`) ->
//! plain HTTP app, each sidecar with its own Workload API and no file: the app behind the inbound
//! route learns the caller's SPIFFE ID from `X-Forwarded-Client-Cert`; a rotation of the calling
//! side is used by the next requests (the pool's old-identity connections retired).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::spiffe_routes::{CLIENT_ID, SERVER_ID, TD, inbound_cmd, outbound_cmd, start};
use crate::support::http::{Body, empty, full, h1_call, h1_req};
use crate::support::workload_api::{SpiffeCa, WorkloadApi};
use crate::support::*;

/// A plain HTTP/1.1 app answering every request with its `X-Forwarded-Client-Cert` header.
struct XfccApp {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for XfccApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl XfccApp {
    async fn start() -> XfccApp {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = l.local_addr().expect("app addr");
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let xfcc = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        Ok::<_, std::convert::Infallible>(Response::new(full(xfcc)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        XfccApp { addr, task }
    }
}

fn get() -> Request<Body> {
    h1_req("GET", "/who").body(empty()).expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn http_mode_both_ways_carries_the_spiffe_id_and_follows_rotation() {
    let ca = SpiffeCa::new(TD);
    let web_api = WorkloadApi::start().await;
    web_api.issue(&[&ca.svid("/ns/shop/sa/web")], &[&ca]);
    let api_api = WorkloadApi::start().await;
    api_api.issue(&[&ca.svid("/ns/shop/sa/api")], &[&ca]);
    let app = XfccApp::start().await;
    let inbound = start(&inbound_cmd(&api_api, app.addr, CLIENT_ID).args(["--mode", "http"]));
    let outbound =
        start(&outbound_cmd(&web_api, inbound.addr(), SERVER_ID).args(["--mode", "http"]));
    let reply = h1_call(outbound.addr(), get()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let xfcc = reply.text();
    assert!(xfcc.contains(&format!("URI={CLIENT_ID}")), "XFCC: {xfcc}");
    // The calling side rotates: the next requests are made with the new SVID.
    let fresh = ca.svid("/ns/shop/sa/web");
    web_api.set_svids(&[&fresh]);
    let want = hex(&sha256(fresh.der.as_ref()));
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = h1_call(outbound.addr(), get()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        if reply.text().contains(&format!("Hash={want}")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated SVID never used: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
