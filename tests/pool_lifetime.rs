//! `--pool-max-lifetime`: requests within the lifetime share one upstream connection; once it
//! passed, the idle connection is closed (long before `--pool-idle-timeout`) and the next
//! request dials a new one (which is what a changed DNS answer needs: the name is resolved at
//! every dial); a response in flight across the lifetime completes intact; `0` keeps one
//! connection. For the shared pool (HTTP/1.1 apps), an h2 app connection's lane, both upstream
//! protocols, and an inbound route's target pool.

use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;

use crate::support::http::*;
use crate::support::inbound::{client_config_alpn, inbound_http_cmd, tls_connect};
use crate::support::*;

/// The lifetime the tests run with: long enough for a debug build on 2 loaded cores to send
/// two requests well inside it.
const LIFETIME: Duration = Duration::from_secs(2);

/// The upstream connection request `n` (in arrival order) came on.
fn conn_of(up: &HttpUpstream, n: usize) -> usize {
    up.stats.requests()[n].conn
}

fn proxy(pki: &Pki, up: &HttpUpstream, lifetime: &str) -> Sidecar {
    http_cmd(pki, format!("localhost:{}", up.port()))
        .args(["--pool-max-lifetime", lifetime])
        .start()
}

/// One app connection (HTTP/1.1, or h2c: the lane) sending GETs.
enum App {
    H1(H1Client),
    H2(H2Client),
}

impl App {
    async fn connect(proxy: &Sidecar, h2: bool) -> App {
        if h2 {
            App::H2(H2Client::connect(proxy.addr()).await)
        } else {
            App::H1(H1Client::connect(proxy.addr()).await)
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let reply = match self {
            App::H1(c) => c.call(h1_req("GET", path).body(empty()).unwrap()).await,
            App::H2(c) => c.call(h2_req("GET", path).body(empty()).unwrap()).await,
        };
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        reply
    }
}

/// Two requests at once share a connection; once the lifetime passed, that connection closes
/// while idle and the next request comes on a new one.
async fn expiry_case(alpn: Alpn, h2_app: bool) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    // The lifetime is a pool's: the shared pool's starts with the route, before the proxy is
    // up; a lane's with its app connection. The earliest it can have started, for the bound.
    let mut pool_born = Instant::now();
    let proxy = proxy(&pki, &up, "2s");
    // An h2 app connection's requests go to its lane once a dial has shown the upstream
    // speaks h2: one request on the shared pool first.
    let base = if h2_app {
        App::connect(&proxy, false).await.get("/warm").await;
        1
    } else {
        0
    };
    let conns_before = up.stats.tls_accepted();
    if h2_app {
        pool_born = Instant::now();
    }
    let mut app = App::connect(&proxy, h2_app).await;
    app.get("/first").await;
    app.get("/second").await;
    let first = conn_of(&up, base);
    assert_eq!(
        conn_of(&up, base + 1),
        first,
        "{alpn:?}: requests within the lifetime"
    );

    // Idle in the pool, it is closed at its lifetime (the idle timeout is 90 s).
    let limit = LIFETIME + Duration::from_secs(5);
    eventually("the expired idle connection closes", limit, || {
        up.stats.conn(first).closed
    })
    .await;
    let lived = pool_born.elapsed();
    assert!(
        lived >= LIFETIME - LIFETIME / 10 - Duration::from_millis(50),
        "{alpn:?}: closed after {lived:?}, before its lifetime"
    );
    app.get("/third").await;
    assert_ne!(
        conn_of(&up, base + 2),
        first,
        "{alpn:?}: a request after the lifetime"
    );
    let conns = up.stats.tls_accepted();
    assert_eq!(conns, conns_before + 2, "{alpn:?}: {:#?}", up.stats.conns());
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_upstream_shared_pool_connection_expires() {
    expiry_case(Alpn::H2AndHttp11, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn http11_upstream_shared_pool_connection_expires() {
    expiry_case(Alpn::Http11, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_app_lane_connection_expires() {
    expiry_case(Alpn::H2AndHttp11, true).await;
}

/// A response still streaming when the lifetime passes completes intact on its connection,
/// which takes no new request meanwhile and closes after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_in_flight_across_the_lifetime_completes() {
    const LEN: usize = 1 << 20;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = proxy(&pki, &up, "2s");
    let mut slow = H1Client::connect(proxy.addr()).await;
    let resp = slow
        .send(
            h1_req("GET", &format!("/download?len={LEN}&seed=7&gate=1"))
                .body(empty())
                .unwrap(),
        )
        .await;
    let first = conn_of(&up, 0);
    // The lifetime must pass while the download is held: that is the case under test.
    tokio::time::sleep(LIFETIME + Duration::from_millis(500)).await;
    assert!(!up.stats.conn(first).closed, "the busy connection was cut");

    // h2 would multiplex this request onto the busy connection; it is expired: a new one.
    App::connect(&proxy, false).await.get("/other").await;
    assert_ne!(
        conn_of(&up, 1),
        first,
        "a new request on the expired connection"
    );

    up.release();
    let reply = read_reply(resp).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.body == pattern(7, LEN),
        "the response in flight was altered or cut"
    );
    eventually(
        "the expired connection closes after its stream",
        WAIT,
        || up.stats.conn(first).closed,
    )
    .await;
}

/// `0`: no lifetime; requests further apart than a lifetime would be share one connection.
#[tokio::test(flavor = "multi_thread")]
async fn zero_keeps_one_connection() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = proxy(&pki, &up, "0");
    let mut app = App::connect(&proxy, false).await;
    app.get("/first").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.get("/second").await;
    assert_eq!(conn_of(&up, 1), conn_of(&up, 0));
    assert!(!up.stats.conn(conn_of(&up, 0)).closed);
}

/// The inbound target pool expires too: its idle connection to the target closes at the
/// lifetime and the next request dials the target anew.
#[tokio::test(flavor = "multi_thread")]
async fn inbound_target_connection_expires() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = inbound_http_cmd(&pki, target.addr)
        .args(["--pool-max-lifetime", "2s", "--allow-any-client"])
        .start();
    let config = client_config_alpn(&pki, Some(&pki.client), &[b"http/1.1"]);
    let tls = tls_connect(proxy.addr(), config).await.expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let mut get = async |path: &str| {
        let req = h1_req("GET", path).body(empty()).unwrap();
        // The previous exchange's end reaches the dispatcher asynchronously: wait until it
        // takes a request, or send_request answers "connection was not ready".
        tokio::time::timeout(WAIT, sender.ready())
            .await
            .expect("ready within the wait")
            .expect("the connection to the proxy is open");
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("a response within the wait")
            .expect("a response");
        let reply = read_reply(resp).await;
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
    };
    get("/first").await;
    get("/second").await;
    let first = conn_of(&target, 0);
    assert_eq!(conn_of(&target, 1), first, "requests within the lifetime");
    let limit = LIFETIME + Duration::from_secs(5);
    eventually("the expired idle target connection closes", limit, || {
        target.stats.conn(first).closed
    })
    .await;
    get("/third").await;
    assert_ne!(conn_of(&target, 2), first, "a request after the lifetime");
}
