//! `--mode http` through the proxy: few tunnels for many requests, `502`/`504` answers.

use super::*;

fn get_req(id: &str) -> hyper::Request<Body> {
    h1_req("GET", "/")
        .header("x-request-id", id)
        .body(empty())
        .unwrap()
}

/// `--mode http` through an authenticating proxy: requests succeed, six of them reuse one or
/// two tunnels, the upstream sees its own name as Host and never the proxy credentials.
#[tokio::test(flavor = "multi_thread")]
async fn http_mode_through_the_proxy_reuses_tunnels() {
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = HttpUpstream::with_config(config, Alpn::H2AndHttp11).await;
    let proxy = ConnectProxy::builder()
        .credentials("grace", "http-mode-pw")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "grace", "http-mode-pw");
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &proxy.url(), "--proxy-auth-file"])
        .arg(&file)
        .start();
    for i in 0..6 {
        let reply = h1_call(sidecar.addr(), get_req(&format!("through-{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    let connects = proxy.connects();
    assert!(
        (1..=2).contains(&connects),
        "{connects} CONNECTs for 6 requests: {:#?}",
        proxy.requests()
    );
    assert_eq!(
        up.stats.tls_accepted(),
        proxy.stats().tunnels(),
        "every upstream connection came through a tunnel"
    );
    for req in proxy.requests() {
        assert_connect(&req, &target(up.port()));
        assert_eq!(
            req.proxy_authorization(),
            Some(&*basic("grace", "http-mode-pw"))
        );
    }
    for seen in up.stats.requests() {
        assert_eq!(seen.host(), Some(&*target(up.port())), "{seen:#?}");
        assert_eq!(seen.get("proxy-authorization"), None, "{seen:#?}");
    }
    for conn in up.stats.conns() {
        assert_eq!(conn.sni.as_deref(), Some(UPSTREAM_NAME));
        assert_eq!(conn.client_cn.as_deref(), Some(CLIENT_CN));
    }
    assert_not_logged(&sidecar, "grace", "http-mode-pw");
}

/// In `--mode http` a `407` is a `502` whose body names `proxy_auth`; a proxy that never
/// answers is a `504` (`timeout`).
#[tokio::test(flavor = "multi_thread")]
async fn http_mode_proxy_failures_are_502_and_504() {
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = HttpUpstream::with_config(config, Alpn::H2AndHttp11).await;
    let auth = ConnectProxy::builder()
        .credentials("heidi", "not-given")
        .start()
        .await;
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &auth.url()])
        .start();
    let reply = h1_call(sidecar.addr(), get_req("auth")).await;
    assert_reply_is_sidecar_error(&reply, 502, "proxy_auth");
    assert!(
        says(&reply.text(), "refused the credentials"),
        "{:?}",
        reply.text()
    );
    let mut h2 = H2Client::connect(sidecar.addr()).await;
    let reply = h2.call(h2_req("GET", "/").body(empty()).unwrap()).await;
    assert_reply_is_sidecar_error(&reply, 502, "proxy_auth");
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
    assert!(
        auth.connects() <= 4,
        "{} CONNECTs for two requests (one retry each at most): {:#?}",
        auth.connects(),
        auth.requests()
    );

    let hang = ConnectProxy::builder()
        .behavior(ProxyBehavior::Hang)
        .start()
        .await;
    let sidecar = http_cmd(&pki, target(up.port()))
        .args(["--proxy", &hang.url(), "--connect-timeout", "500ms"])
        .start();
    let started = Instant::now();
    let reply = h1_call(sidecar.addr(), get_req("hang")).await;
    assert_reply_is_sidecar_error(&reply, 504, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "504 after {:?}",
        started.elapsed()
    );
    assert_eq!(up.stats.request_count(), 0);
}
