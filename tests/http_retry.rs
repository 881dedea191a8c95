//! A pooled connection the peer closed just as a request was written to it: a bodiless GET is
//! sent once more on a fresh connection (the app sees 200), a POST never is (the app sees 502).
//! Driven through an inbound http-mode route, whose plaintext target can be scripted byte by
//! byte; the retry is the same code for outbound routes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::http::{Body, Reply, empty, full, read_reply_within};
use crate::support::inbound::{client_config_alpn, inbound_http_cmd, tls_connect};
use crate::support::pki::CLIENT_CN;
use crate::support::*;

/// One request as the target saw it: the connection (in accept order) and the method.
type Seen = Arc<Mutex<Vec<(usize, String)>>>;

/// A plaintext HTTP/1.1 target: on its first connection it answers the first request and, at
/// the second, reads the whole request and closes without a byte; every later connection
/// answers every request.
async fn closing_target() -> (SocketAddr, Seen, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = l.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        for conn in 0.. {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve(s, conn, log.clone()));
        }
    });
    (addr, seen, task)
}

async fn serve(mut s: TcpStream, conn: usize, seen: Seen) {
    for n in 0.. {
        let Some(method) = read_request(&mut s).await else {
            return;
        };
        seen.lock().expect("seen").push((conn, method));
        if conn == 0 && n == 1 {
            return; // closed with the request read and nothing answered
        }
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// One request head and its `content-length` body; `None` at EOF. Bounded: 64 KiB.
async fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
    let mut body = vec![0u8; len.min(64 * 1024)];
    s.read_exact(&mut body).await.ok()?;
    head.split(' ').next().map(str::to_ascii_uppercase)
}

/// An HTTP/1.1 client over mTLS with the test client identity.
async fn client(pki: &Pki, addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let config = client_config_alpn(pki, Some(&pki.client), &[b"http/1.1"]);
    let tls = tls_connect(addr, config).await.expect("handshake");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

async fn call(sender: &mut hyper::client::conn::http1::SendRequest<Body>, method: &str) -> Reply {
    let body = if method == "POST" {
        full("data")
    } else {
        empty()
    };
    let req = Request::builder()
        .method(method)
        .uri("/")
        .header("host", "app")
        .body(body)
        .expect("request");
    tokio::time::timeout(WAIT, sender.ready())
        .await
        .expect("ready within the wait")
        .expect("ready");
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("a response head within the wait")
        .expect("response");
    read_reply_within(resp, WAIT).await
}

fn cmd(pki: &Pki, target: SocketAddr) -> Cmd {
    inbound_http_cmd(pki, target).args(["--verify-cn", CLIENT_CN])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_on_a_connection_the_target_just_closed_is_sent_again_on_a_fresh_one() {
    let pki = Pki::new();
    let (target, seen, _task) = closing_target().await;
    let proxy = cmd(&pki, target).start();
    let mut app = client(&pki, proxy.addr()).await;
    assert_eq!(call(&mut app, "GET").await.status, 200);
    let reply = call(&mut app, "GET").await;
    assert_eq!(reply.status, 200, "the second GET: {reply:?}");
    let seen = seen.lock().expect("seen").clone();
    let want: Vec<(usize, String)> = [(0, "GET"), (0, "GET"), (1, "GET")]
        .map(|(c, m)| (c, m.to_string()))
        .to_vec();
    assert_eq!(
        seen, want,
        "sent on the pooled connection, then on a new one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_on_a_connection_the_target_just_closed_is_never_sent_twice() {
    let pki = Pki::new();
    let (target, seen, _task) = closing_target().await;
    let proxy = cmd(&pki, target).start();
    let mut app = client(&pki, proxy.addr()).await;
    assert_eq!(call(&mut app, "GET").await.status, 200);
    let reply = call(&mut app, "POST").await;
    assert_eq!(reply.status, 502, "the POST: {reply:?}");
    let seen = seen.lock().expect("seen").clone();
    let want: Vec<(usize, String)> = [(0, "GET"), (0, "POST")]
        .map(|(c, m)| (c, m.to_string()))
        .to_vec();
    assert_eq!(seen, want, "the POST reached the target once");
}
