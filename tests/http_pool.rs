//! `--mode http` across requests: the upstream connection pool (reuse, h2 multiplexing, the
//! stale-connection retry, idle timeout and cap), identity reloads, `http_requests_total`,
//! draining on SIGTERM, and nginx as a real upstream.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::admin::{admin_addr, scrape_until};
use crate::support::files::{LiveIdentity, is_reloaded};
use crate::support::http::*;
use crate::support::pki::{CLIENT_CN, LeafSpec};
use crate::support::*;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn get_close(target: &str, id: &str) -> Vec<u8> {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {APP_HOST}\r\nConnection: close\r\nx-request-id: {id}\r\n\r\n"
    )
    .into_bytes()
}

/// Apps that open a connection per request (`Connection: close`) still get a warm upstream
/// connection: the upstream sees at most 2 TLS handshakes for all of them.
async fn close_per_request_case(alpn: Alpn, n: usize) {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    // The first app honours `Connection: close` itself: the proxy must close.
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(&get_close("/seq", "seq-first"))
        .await
        .expect("write");
    let mut buf = Vec::new();
    let reply = read_raw_reply(&mut stream, &mut buf, WAIT).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (rest, _) = read_until_closed(&mut stream, WAIT).await;
    assert!(
        buf.is_empty() && rest.is_empty(),
        "bytes after the response"
    );
    for i in 1..n {
        let reply = raw_call(proxy.addr(), &get_close("/seq", &format!("seq-{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
        assert_eq!(reply.text(), "ok\n", "request {i}");
    }
    assert_eq!(up.stats.request_count(), n, "requests at the upstream");
    let conns = up.stats.conns();
    assert!(
        conns.len() <= 2,
        "{alpn:?}: {n} sequential requests made {} upstream TLS connections: {conns:#?}",
        conns.len()
    );
    for seen in up.stats.requests() {
        assert_eq!(seen.version, alpn.version(), "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn close_per_request_apps_reuse_at_most_2_upstream_connections() {
    close_per_request_case(Alpn::H2AndHttp11, 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn close_per_request_apps_reuse_http11_upstream_connections() {
    close_per_request_case(Alpn::Http11, 100).await;
}

/// With h2, 32 app connections with a request in flight each share the warm upstream
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn h2_multiplexes_many_app_connections_on_few_upstream_ones() {
    const N: usize = 32;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let warm = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(warm.status, 200, "{warm:?}");

    let mut tasks = JoinSet::new();
    for i in 0..N {
        let addr = proxy.addr();
        tasks.spawn(async move {
            let req = h1_req("GET", "/hold")
                .header("x-request-id", format!("mux-{i}"))
                .body(empty())
                .unwrap();
            h1_call(addr, req).await
        });
    }
    up.stats.wait_requests(N + 1).await;
    let conns = up.stats.conns();
    assert!(
        conns.len() <= 2,
        "{N} concurrent requests over h2 used {} upstream connections",
        conns.len()
    );
    up.release();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.expect("request task");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.text(), "released\n");
    }
}

/// An h2c app connection to an h2 upstream gets an upstream connection of its own (its lane:
/// the windows of that connection bound what a never-reading app makes the proxy hold), used
/// for all its requests and closed when the app connection closes. HTTP/1.1 app connections
/// share the route's pool.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_app_connections_get_an_upstream_connection_each() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let get = |id: String| {
        h1_req("GET", "/")
            .header("x-request-id", id)
            .body(empty())
            .unwrap()
    };
    assert_eq!(h1_call(proxy.addr(), get("h1-a".into())).await.status, 200);
    assert_eq!(h1_call(proxy.addr(), get("h1-b".into())).await.status, 200);
    let shared = up.stats.request("h1-a").conn;
    assert_eq!(up.stats.request("h1-b").conn, shared, "HTTP/1.1 apps share");

    let mut lanes = Vec::new();
    let mut apps = Vec::new();
    for a in 0..2 {
        let app = H2Client::connect(proxy.addr()).await;
        let mut tasks = JoinSet::new();
        for i in 0..3 {
            let mut app = app.clone();
            tasks.spawn(async move {
                let req = h2_req("GET", "/hold")
                    .header("x-request-id", format!("lane-{a}-{i}"))
                    .body(empty())
                    .unwrap();
                app.call(req).await
            });
        }
        up.stats.wait_requests(2 + 3 * (a + 1)).await;
        let conns: BTreeSet<usize> = (0..3)
            .map(|i| up.stats.request(&format!("lane-{a}-{i}")).conn)
            .collect();
        assert_eq!(conns.len(), 1, "app {a}'s streams used {conns:?}");
        let lane = *conns.first().unwrap();
        assert_ne!(lane, shared, "app {a} used the shared connection");
        lanes.push(lane);
        apps.push((app, tasks));
    }
    assert_ne!(
        lanes[0], lanes[1],
        "two h2c apps shared an upstream connection"
    );
    up.release();
    for (_, tasks) in &mut apps {
        while let Some(reply) = tasks.join_next().await {
            assert_eq!(reply.expect("request task").status, 200);
        }
    }
    drop(apps.remove(0));
    up.stats.wait_closed(lanes[0], WAIT).await;
    assert!(
        !up.stats.conn(lanes[1]).closed,
        "the other app's lane closed"
    );
    assert!(
        !up.stats.conn(shared).closed,
        "the shared connection closed"
    );
}

/// Towards an HTTP/1.1 upstream, one h2c app connection has at most six requests there at
/// once (each holds an upstream connection); the others wait their turn and all complete.
#[tokio::test(flavor = "multi_thread")]
async fn h2c_app_has_six_requests_at_once_at_an_http11_upstream() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let app = H2Client::connect(proxy.addr()).await;
    let mut tasks = JoinSet::new();
    for i in 0..10 {
        let mut app = app.clone();
        tasks.spawn(async move {
            let req = h2_req("GET", "/hold")
                .header("x-request-id", format!("turn-{i}"))
                .body(empty())
                .unwrap();
            app.call(req).await
        });
    }
    up.stats.wait_requests(6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.stats.request_count(),
        6,
        "requests at the upstream at once"
    );
    up.release();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.expect("request task");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.text(), "released\n");
    }
    assert_eq!(up.stats.request_count(), 10);
}

/// The upstream closes each connection right after answering, with no `Connection: close` and
/// no close_notify. The next request, which the proxy may try on that dead pooled
/// connection, still gets its 200, and the upstream sees it exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn stale_pooled_connection_is_retried_once() {
    const ROUNDS: usize = 6;
    let pki = Pki::new();
    let up = RawUpstream::start(&pki, RawBehavior::CloseAfterResponse).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;
    for round in 0..ROUNDS {
        let id = format!("stale-{round}");
        let reply = client
            .call(
                h1_req("GET", "/")
                    .header("x-request-id", &id)
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(
            reply.status, 200,
            "round {round}: a request after the upstream silently closed the pooled \
             connection: {reply:?}"
        );
        assert_eq!(reply.text(), "ok\n");
        // Only once the upstream has closed does the next request go out, so that it meets a
        // connection already dead.
        let seen = up.stats.request(&id);
        up.stats.wait_closed(seen.conn, WAIT).await;
    }
    for round in 0..ROUNDS {
        // Exactly once each (request() fails otherwise).
        up.stats.request(&format!("stale-{round}"));
    }
    assert_eq!(
        up.stats.request_count(),
        ROUNDS,
        "{:#?}",
        up.stats.requests()
    );
    assert_eq!(up.stats.tls_accepted(), ROUNDS);
}

/// The upstream drops its idle connections without a word (no GOAWAY, no close_notify); the
/// next request still gets its 200 over a new connection, and reaches the upstream once.
async fn dropped_idle_connection_case(alpn: Alpn) {
    const ROUNDS: usize = 4;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, alpn).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port())).start();
    let mut client = H1Client::connect(proxy.addr()).await;
    let mut h2 = H2Client::connect(proxy.addr()).await;
    for round in 0..ROUNDS {
        let id = format!("dropped-{round}");
        let req = |app: &str| {
            h1_req("GET", "/")
                .header("x-request-id", format!("{id}-{app}"))
                .body(empty())
                .unwrap()
        };
        let reply = client.call(req("h1")).await;
        assert_eq!(
            reply.status, 200,
            "{alpn:?} round {round}, HTTP/1.1 app: {reply:?}"
        );
        let reply = h2
            .call(
                h2_req("GET", "/")
                    .header("x-request-id", format!("{id}-h2c"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(
            reply.status, 200,
            "{alpn:?} round {round}, h2c app: {reply:?}"
        );
        up.drop_connections();
        let conns = up.stats.tls_accepted();
        eventually(
            &format!("{alpn:?}: the upstream dropped all its connections"),
            WAIT,
            || up.stats.closed() == conns,
        )
        .await;
    }
    for round in 0..ROUNDS {
        for app in ["h1", "h2c"] {
            up.stats.request(&format!("dropped-{round}-{app}"));
        }
    }
    assert_eq!(up.stats.request_count(), 2 * ROUNDS);
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_idle_h2_connection_is_replaced() {
    dropped_idle_connection_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropped_idle_http11_connection_is_replaced() {
    dropped_idle_connection_case(Alpn::Http11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_idle_timeout_closes_idle_upstream_connections() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--pool-idle-timeout", "500ms"])
        .start();
    let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(reply.status, 200);
    let idle_since = Instant::now();
    up.stats.wait_closed(0, Duration::from_secs(5)).await;
    let took = idle_since.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "the pooled connection closed after {took:?} idle, before --pool-idle-timeout 500ms"
    );
    let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(
        reply.status, 200,
        "a request after the idle close: {reply:?}"
    );
    assert_eq!(up.stats.tls_accepted(), 2);
}

/// Five HTTP/1.1 upstream connections in use at once become idle together; `--pool-max-idle 2`
/// keeps two of them, which later requests reuse.
#[tokio::test(flavor = "multi_thread")]
async fn pool_max_idle_caps_idle_upstream_connections() {
    const N: usize = 5;
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::Http11).await;
    let proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--pool-max-idle", "2"])
        .start();
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let addr = proxy.addr();
        tasks.spawn(async move {
            let req = h1_req("GET", "/hold")
                .header("x-request-id", format!("cap-{i}"))
                .body(empty())
                .unwrap();
            h1_call(addr, req).await
        });
    }
    up.stats.wait_requests(N).await;
    assert_eq!(
        up.stats.tls_accepted(),
        N,
        "HTTP/1.1 carries one request at a time per connection"
    );
    up.release();
    while let Some(reply) = tasks.join_next().await {
        assert_eq!(reply.expect("request task").status, 200);
    }
    eventually(
        "3 of 5 idle upstream connections closed under --pool-max-idle 2",
        WAIT,
        || up.stats.closed() >= N - 2,
    )
    .await;
    for i in 0..4 {
        let reply = h1_call(
            proxy.addr(),
            h1_req("GET", "/")
                .header("x-request-id", format!("after-{i}"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        up.stats.tls_accepted(),
        N,
        "requests after the burst did not reuse the idle connections kept"
    );
    assert_eq!(
        up.stats.closed(),
        N - 2,
        "--pool-max-idle 2 kept {} idle connections",
        N - up.stats.closed()
    );
}

/// http mode towards `localhost:port` with the rotating identity `live`, reloaded on SIGHUP only.
fn live_cmd(pki: &Pki, live: &LiveIdentity, port: u16) -> Cmd {
    run_cmd_files(
        format!("localhost:{port}"),
        &live.cert,
        &live.key,
        &pki.ca.pem,
    )
    .args(["--mode", "http", "--reload-interval", "0"])
}

/// After SIGHUP with a new client certificate, new requests go over connections made with
/// it, and the idle connection made with the old one is closed.
async fn reload_case(alpn: Alpn) {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "http-client-a", LeafSpec::client("http-a"));
    let b = pki.leaf(&pki.ca, "http-client-b", LeafSpec::client("http-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = HttpUpstream::start(&pki, alpn).await;
    let mut proxy = live_cmd(&pki, &live, up.port()).start();
    let get = |id: &str| {
        h1_req("GET", "/")
            .header("x-request-id", id)
            .body(empty())
            .unwrap()
    };
    let mut client = H1Client::connect(proxy.addr()).await;
    assert_eq!(client.call(get("before")).await.status, 200);
    let before = up.stats.request("before");
    assert_eq!(
        up.stats.conn(before.conn).client_serial.as_deref(),
        Some(&*a.serial_hex())
    );
    // An h2c app connection that stays open across the reload (towards an h2 upstream it has an
    // upstream connection of its own).
    let h2_get = |id: &str| {
        h2_req("GET", "/")
            .header("x-request-id", id)
            .body(empty())
            .unwrap()
    };
    let mut h2c = H2Client::connect(proxy.addr()).await;
    assert_eq!(h2c.call(h2_get("before-h2c")).await.status, 200);

    live.install(&b);
    proxy.signal("HUP");
    let serial = b.serial_hex();
    blocking(|| {
        proxy.wait_for_line("`identity reloaded` with the new serial", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });

    // The same app connections, and a new one.
    assert_eq!(client.call(get("after-1")).await.status, 200);
    assert_eq!(h1_call(proxy.addr(), get("after-2")).await.status, 200);
    assert_eq!(h2c.call(h2_get("after-h2c")).await.status, 200);
    for id in ["after-1", "after-2", "after-h2c"] {
        let seen = up.stats.request(id);
        let conn = up.stats.conn(seen.conn);
        assert_eq!(
            conn.client_serial.as_deref(),
            Some(&*b.serial_hex()),
            "{alpn:?}: request {id} after the reload went over a connection with the old \
             identity (a={}, b={}): {conn:?}",
            a.serial_hex(),
            b.serial_hex()
        );
    }
    up.stats.wait_closed(before.conn, WAIT).await;
}

/// A reload alone, with no request after it, closes the idle connection made with the old
/// identity: it must not linger (up to `--pool-idle-timeout`) presenting a certificate that was
/// replaced, perhaps because it was compromised.
#[tokio::test(flavor = "multi_thread")]
async fn reload_closes_idle_old_identity_connections_without_new_requests() {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "http-client-a", LeafSpec::client("http-a"));
    let b = pki.leaf(&pki.ca, "http-client-b", LeafSpec::client("http-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = live_cmd(&pki, &live, up.port()).start();
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/")
            .header("x-request-id", "before")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let before = up.stats.request("before");
    // An h2c app connection that stays open, idle: its own upstream connection (the upstream
    // speaks h2) must close too.
    let mut h2c = H2Client::connect(proxy.addr()).await;
    let reply = h2c
        .call(
            h2_req("GET", "/")
                .header("x-request-id", "before-h2c")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 200);
    let before_h2c = up.stats.request("before-h2c");
    assert_ne!(
        before_h2c.conn, before.conn,
        "the h2c app's own upstream connection"
    );

    live.install(&b);
    proxy.signal("HUP");
    let serial = b.serial_hex();
    blocking(|| {
        proxy.wait_for_line("`identity reloaded` with the new serial", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });
    eventually(
        "after the reload, with no request since, the idle upstream connection made with the \
         old identity is closed",
        WAIT,
        || up.stats.conn(before.conn).closed,
    )
    .await;
    eventually(
        "after the reload, the idle upstream connection of an open h2c app connection, made \
         with the old identity, is closed",
        WAIT,
        || up.stats.conn(before_h2c.conn).closed,
    )
    .await;
    drop(h2c);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_moves_new_requests_to_the_new_identity_over_h2() {
    reload_case(Alpn::H2AndHttp11).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_moves_new_requests_to_the_new_identity_over_http11() {
    reload_case(Alpn::Http11).await;
}

const REQUESTS: &str = "mtls_sidecar_http_requests_total";

#[tokio::test(flavor = "multi_thread")]
async fn http_requests_total_counts_by_code() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for _ in 0..3 {
        let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status, 200);
    }
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/status/404").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(reply.status, 404);
    let mut h2 = H2Client::connect(proxy.addr()).await;
    let reply = h2
        .call(h2_req("GET", "/status/503").body(empty()).unwrap())
        .await;
    assert_eq!(reply.status, 503);

    let route = ("route", "default");
    let m = scrape_until(admin, |m| {
        m.count(REQUESTS, &[route, ("code", "200")]) >= 3.0
            && m.count(REQUESTS, &[route, ("code", "404")]) >= 1.0
            && m.count(REQUESTS, &[route, ("code", "503")]) >= 1.0
    })
    .await;
    for (code, n) in [("200", 3.0), ("404", 1.0), ("503", 1.0)] {
        assert_eq!(
            m.value(REQUESTS, &[route, ("code", code)]),
            n,
            "code {code}:\n{}",
            m.text
        );
    }
}

/// In http mode the connection metrics describe upstream connections: one handshake for all
/// the requests, and the bytes that went over it (at least the bodies).
#[tokio::test(flavor = "multi_thread")]
async fn connection_metrics_cover_upstream_connections() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let mut h2 = H2Client::connect(proxy.addr()).await;
    let reply = h2
        .call(
            h2_req("POST", "/upload")
                .body(full(pattern(1, 100_000)))
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 200);
    let reply = h1_call(
        proxy.addr(),
        h1_req("GET", "/download?len=200000&seed=2")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.body.len(), 200_000);

    let route = ("route", "default");
    let bytes = "mtls_sidecar_bytes_total";
    let handshakes = "mtls_sidecar_upstream_handshake_seconds_count";
    let (to_up, from_up) = (("direction", "to_upstream"), ("direction", "from_upstream"));
    let m = scrape_until(admin, |m| {
        m.count(handshakes, &[route]) >= 1.0
            && m.count(bytes, &[route, to_up]) >= 100_000.0
            && m.count(bytes, &[route, from_up]) >= 200_000.0
    })
    .await;
    assert_eq!(
        m.value(handshakes, &[route]),
        up.stats.tls_accepted() as f64,
        "upstream_handshake_seconds_count against the upstream's TLS accepts:\n{}",
        m.text
    );
    assert!(
        m.count(bytes, &[route, to_up]) >= 100_000.0
            && m.count(bytes, &[route, from_up]) >= 200_000.0,
        "bytes_total does not count what went over the upstream connection (100 kB up, \
         200 kB down):\n{}",
        m.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_requests_total_counts_the_proxys_own_502() {
    let pki = Pki::new();
    let mut proxy = http_cmd(&pki, format!("127.0.0.1:{}", free_port()))
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for _ in 0..2 {
        let reply = h1_call(proxy.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status, 502, "{reply:?}");
    }
    let route = ("route", "default");
    let m = scrape_until(admin, |m| {
        m.count(REQUESTS, &[route, ("code", "502")]) >= 2.0
    })
    .await;
    assert_eq!(
        m.value(REQUESTS, &[route, ("code", "502")]),
        2.0,
        "{}",
        m.text
    );
}

// ---------------------------------------------------------------------------------------------
// Draining

/// SIGTERM with an HTTP/1.1 request in flight: the listener closes, the request finishes with
/// `Connection: close`, the connection ends, the process exits 0 long before the drain timeout.
#[tokio::test(flavor = "multi_thread")]
async fn drain_answers_http11_in_flight_with_connection_close() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--drain-timeout", "20s"])
        .start();
    let addr = proxy.addr();
    let mut client = H1Client::connect(addr).await;
    let first = client.call(h1_req("GET", "/").body(empty()).unwrap()).await;
    assert_eq!(first.status, 200);
    assert!(
        !first
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close")),
        "Connection: close before any SIGTERM: {first:?}"
    );
    let pending = tokio::spawn(async move {
        let resp = client
            .send(h1_req("GET", "/hold").body(empty()).unwrap())
            .await;
        let reply = read_reply(resp).await;
        (reply, client)
    });
    up.stats.wait_requests(2).await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    wait_refused(addr, WAIT).await;
    assert_eq!(proxy.try_exit(), None, "exited with a request in flight");
    up.release();
    let (reply, client) = pending.await.expect("in-flight request task");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "released\n");
    assert!(
        reply
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("close")),
        "the response after SIGTERM lacks `Connection: close`: {reply:?}"
    );
    tokio::time::timeout(WAIT, client.conn)
        .await
        .expect("the app connection stayed open after `Connection: close`")
        .expect("connection task")
        .ok();
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exit took {:?} with --drain-timeout 20s and nothing left in flight",
        signalled.elapsed()
    );
}

/// A minimal h2 frame reader/writer, to see the GOAWAY itself.
struct RawH2 {
    stream: TcpStream,
}

struct H2Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl RawH2 {
    async fn connect(addr: SocketAddr) -> RawH2 {
        let mut stream = connect(addr).await;
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        stream.write_all(&out).await.expect("write h2 preface");
        RawH2 { stream }
    }

    /// GET `path` on stream `id`, no body.
    async fn get(&mut self, id: u32, path: &str) {
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, APP_HOST.len() as u8]);
        block.extend_from_slice(APP_HOST.as_bytes());
        // END_STREAM | END_HEADERS
        let out = frame(0x1, 0x5, id, &block);
        self.stream.write_all(&out).await.expect("write HEADERS");
    }

    /// The next frame other than SETTINGS / PING (which are acknowledged); `None` at end of
    /// stream.
    async fn next(&mut self, deadline: tokio::time::Instant) -> Option<H2Frame> {
        loop {
            let mut head = [0u8; 9];
            match tokio::time::timeout_at(deadline, self.stream.read_exact(&mut head)).await {
                Err(_) => panic!("no h2 frame in time"),
                Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            match tokio::time::timeout_at(deadline, self.stream.read_exact(&mut payload)).await {
                Err(_) => panic!("h2 frame payload not in time"),
                Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
            let f = H2Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            };
            match (f.kind, f.flags & 1) {
                (0x4, 0) => {
                    let ack = frame(0x4, 0x1, 0, &[]);
                    let _ = self.stream.write_all(&ack).await;
                }
                (0x6, 0) => {
                    let ack = frame(0x6, 0x1, 0, &f.payload);
                    let _ = self.stream.write_all(&ack).await;
                }
                (0x4, _) | (0x6, _) | (0x8, _) => {}
                _ => return Some(f),
            }
        }
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// SIGTERM with an h2c stream in flight: a GOAWAY arrives while the stream is still held, the
/// stream then finishes, the connection ends, the process exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn drain_sends_h2c_apps_a_goaway_and_finishes_in_flight() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--drain-timeout", "20s"])
        .start();
    let mut h2 = RawH2::connect(proxy.addr()).await;
    h2.get(1, "/hold").await;
    up.stats.wait_requests(1).await;

    proxy.signal("TERM");
    let deadline = tokio::time::Instant::now() + WAIT;
    let goaway = loop {
        let f = h2
            .next(deadline)
            .await
            .expect("the h2c connection closed before any GOAWAY");
        assert!(
            !(f.kind == 0x0 && f.stream == 1),
            "the held stream got data before its release"
        );
        if f.kind == 0x7 {
            break f;
        }
    };
    let error = u32::from_be_bytes(goaway.payload[4..8].try_into().unwrap());
    assert_eq!(error, 0, "GOAWAY with an error code: {error}");

    up.release();
    let mut status_seen = false;
    let mut data = Vec::new();
    loop {
        let f = h2
            .next(deadline)
            .await
            .expect("the connection closed before the in-flight stream finished");
        if f.stream != 1 {
            continue;
        }
        match f.kind {
            0x1 => {
                // `:status: 200` is index 8 of the static table.
                status_seen = f.payload.first() == Some(&0x88);
                if f.flags & 1 == 1 {
                    break;
                }
            }
            0x0 => {
                data.extend_from_slice(&f.payload);
                if f.flags & 1 == 1 {
                    break;
                }
            }
            0x3 => panic!("the in-flight stream was reset during the drain"),
            _ => {}
        }
    }
    assert!(status_seen, "no `:status 200` for the in-flight stream");
    assert_eq!(data, b"released\n");
    // Then the proxy closes the connection.
    while h2.next(deadline).await.is_some() {}
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// `--drain-timeout 1s` and a request that never finishes: cut after about a second, exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn drain_timeout_cuts_a_request_that_never_finishes() {
    let pki = Pki::new();
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let mut proxy = http_cmd(&pki, format!("localhost:{}", up.port()))
        .args(["--drain-timeout", "1s"])
        .start();
    let mut stream = connect(proxy.addr()).await;
    stream
        .write_all(&get_close("/hold", "stuck"))
        .await
        .expect("write");
    up.stats.wait_requests(1).await;
    let signalled = Instant::now();
    proxy.signal("TERM");
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    let cut = signalled.elapsed();
    assert!(
        !String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "a held request was answered 200: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        cut >= Duration::from_millis(900),
        "cut after {cut:?}, before the drain timeout"
    );
    assert!(cut < Duration::from_secs(4), "cut only after {cut:?}");
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(signalled.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------------
// nginx

const NGINX_FIELDS: &str = "$ssl_client_s_dn|$ssl_client_verify|$connection|$connection_requests|$server_protocol|$http_host";

/// nginx with `ssl_verify_client on`: 20 apps' requests with `Connection: close` are verified
/// (`$ssl_client_verify`, `$ssl_client_s_dn`) and share at most 2 nginx connections
/// (`$connection`, `$connection_requests`), in the protocol ALPN agreed.
async fn nginx_case(http2: bool) {
    const N: usize = 20;
    if !nginx::installed() {
        return;
    }
    let Some(version) = nginx::version() else {
        eprintln!("SKIPPED: cannot tell the version of {}", nginx::NGINX);
        return;
    };
    let pki = Pki::new();
    let site = nginx::Site {
        client_ca: &pki.ca.pem,
        http2: http2.then_some(version),
        log_format: Some(NGINX_FIELDS),
        body: NGINX_FIELDS,
    };
    let nginx = blocking(|| nginx::start(&pki, "nginx-http", &site));
    let proxy = http_cmd(&pki, format!("localhost:{}", nginx.port)).start();
    let protocol = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
    let host = format!("localhost:{}", nginx.port);
    let mut connections = BTreeSet::new();
    let mut most_requests = 0u64;
    for i in 0..N {
        let reply = raw_call(proxy.addr(), &get_close("/", &format!("nginx-{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
        let body = reply.text();
        let fields: Vec<&str> = body.trim_end().split('|').collect();
        assert_eq!(fields.len(), 6, "nginx answered {body:?}");
        assert!(
            fields[0].contains(&format!("CN={CLIENT_CN}")),
            "client DN: {body:?}"
        );
        assert_eq!(
            fields[1], "SUCCESS",
            "nginx did not verify our certificate: {body:?}"
        );
        assert_eq!(fields[4], protocol, "{body:?}");
        assert_eq!(fields[5], host, "Host at nginx: {body:?}");
        connections.insert(fields[2].to_string());
        most_requests = most_requests.max(fields[3].parse().expect("$connection_requests"));
    }
    assert!(
        connections.len() <= 2,
        "{N} requests used nginx connections {connections:?}"
    );
    assert!(
        most_requests >= (N / 2) as u64,
        "at most {most_requests} requests on one nginx connection"
    );

    // nginx's own log says the same.
    let log_path = nginx.dir.join("access.log");
    let mut lines = Vec::new();
    eventually("20 verified lines in nginx's access log", WAIT, || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        lines = text
            .lines()
            .filter(|l| l.contains("|SUCCESS|"))
            .map(str::to_owned)
            .collect();
        lines.len() >= N
    })
    .await;
    assert_eq!(lines.len(), N, "{lines:#?}");
    for line in &lines {
        let conn = line.split('|').nth(2).unwrap_or_default();
        assert!(connections.contains(conn), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_h2_upstream_verifies_and_reuses_connections() {
    nginx_case(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_http11_upstream_verifies_and_reuses_connections() {
    nginx_case(false).await;
}
