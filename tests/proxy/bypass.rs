//! `--no-proxy` (CIDRs, names, subdomains, dots, `*`), lists that do not match, and
//! `--proxy-from-env` with `HTTPS_PROXY` / `NO_PROXY` against explicit flags.

use super::*;

/// `--no-proxy 127.0.0.0/8` with an IP-literal upstream, `.localhost` (leading dot, any case)
/// and `localhost.` (trailing dot) with `localhost`, `*`, and a single address in `MTLS_SIDECAR_NO_PROXY`: direct
/// connections, and the proxy (which would refuse) sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_matches_go_direct() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::Status(403))
        .start()
        .await;
    let cases = [
        (up.addr.to_string(), "127.0.0.0/8"),
        (format!("localhost:{}", up.port()), "example.com,.LocalHost"),
        (format!("localhost:{}", up.port()), "localhost."),
        (format!("localhost:{}", up.port()), "*"),
    ];
    for (upstream, list) in cases {
        let mut sidecar = run_cmd(&pki, &upstream)
            .args(["--proxy", &proxy.url(), "--no-proxy", list])
            .start();
        accepted(&mut sidecar, &up).await;
        assert_eq!(
            proxy.stats().accepted(),
            0,
            "--upstream {upstream} --no-proxy {list} went to the proxy: {:#?}",
            proxy.requests()
        );
    }
    let mut by_env = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_PROXY", proxy.url())
        .env("MTLS_SIDECAR_NO_PROXY", "10.0.0.0/8,127.0.0.1")
        .start();
    accepted(&mut by_env, &up).await;
    assert_eq!(
        proxy.stats().accepted(),
        0,
        "MTLS_SIDECAR_NO_PROXY=10.0.0.0/8,127.0.0.1 went to the proxy: {:#?}",
        proxy.requests()
    );
}

/// `--no-proxy MTLS-TEST.invalid` covers its subdomain `upstream.mtls-test.invalid` (any
/// case): the sidecar dials it itself, which fails to resolve (`reason=dns`), and the proxy
/// sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_domain_covers_subdomains() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--no-proxy", "MTLS-TEST.invalid"])
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "dns");
    assert_eq!(proxy.stats().accepted(), 0, "{:#?}", proxy.requests());
}

/// Lists that do not match still use the proxy: a suffix that is not a domain boundary
/// (`test.invalid`, `notupstream.mtls-test.invalid`), other names, and IPs/CIDRs (which never
/// match a host name, even one that would resolve into them).
#[tokio::test(flavor = "multi_thread")]
async fn non_matching_no_proxy_still_uses_the_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .resolve("localhost", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args([
            "--no-proxy",
            "test.invalid,notupstream.mtls-test.invalid,example.com,127.0.0.0/8,::1",
        ])
        .start();
    accepted(&mut sidecar, &up).await;
    assert_connect(&proxy.requests()[0], &target(up.port()));

    // `localhost` is a name: 127.0.0.0/8 and ::1 do not cover it.
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut by_name = run_cmd(&pki, format!("localhost:{}", local.port()))
        .args(["--proxy", &proxy.url(), "--no-proxy", "127.0.0.0/8,::1"])
        .start();
    accepted(&mut by_name, &local).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_connect(&requests[1], &format!("localhost:{}", local.port()));
}

/// `--proxy-from-env` takes `HTTPS_PROXY` (or `https_proxy`; the upper-case one first) and
/// `NO_PROXY` (or `no_proxy`), never `HTTP_PROXY` or `ALL_PROXY`;
/// `MTLS_SIDECAR_PROXY_FROM_ENV=true` is the same as the flag.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_from_env_reads_https_proxy_and_no_proxy() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;

    let mut upper = run_cmd(&pki, target(up.port()))
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "example.com")
        .start();
    accepted(&mut upper, &up).await;
    let mut lower = run_cmd(&pki, target(up.port()))
        .env("MTLS_SIDECAR_PROXY_FROM_ENV", "true")
        .env("https_proxy", proxy.url())
        .start();
    accepted(&mut lower, &up).await;
    // Both spellings: the upper-case one first.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut both = run_cmd(&pki, target(up.port()))
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", proxy.url())
        .env("https_proxy", &dead)
        .start();
    accepted(&mut both, &up).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for req in &requests {
        assert_connect(req, &target(up.port()));
    }

    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    for no_proxy in ["NO_PROXY", "no_proxy"] {
        let mut bypass = run_cmd(&pki, local.addr)
            .arg("--proxy-from-env")
            .env("HTTPS_PROXY", proxy.url())
            .env(no_proxy, "127.0.0.0/8")
            .start();
        accepted(&mut bypass, &local).await;
        assert_eq!(
            proxy.stats().accepted(),
            3,
            "{no_proxy}=127.0.0.0/8 did not bypass: {:#?}",
            proxy.requests()
        );
    }

    // HTTP_PROXY and ALL_PROXY are not for a TLS upstream: a direct connection.
    let mut plain_vars = run_cmd(&pki, local.addr)
        .arg("--proxy-from-env")
        .env("HTTP_PROXY", proxy.url())
        .env("ALL_PROXY", proxy.url())
        .env("http_proxy", proxy.url())
        .env("all_proxy", proxy.url())
        .start();
    accepted(&mut plain_vars, &local).await;
    assert_eq!(
        proxy.stats().accepted(),
        3,
        "HTTP_PROXY / ALL_PROXY were used: {:#?}",
        proxy.requests()
    );
}

/// Explicit `--proxy` and `--no-proxy` win over `HTTPS_PROXY` and `NO_PROXY`.
#[tokio::test(flavor = "multi_thread")]
async fn explicit_flags_win_over_the_environment() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-from-env")
        .env("HTTPS_PROXY", &dead)
        .start();
    accepted(&mut sidecar, &up).await;
    assert_eq!(proxy.requests().len(), 1);

    // NO_PROXY would bypass 127.0.0.1; --no-proxy example.com does not.
    let local = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut sidecar = run_cmd(&pki, local.addr)
        .args(["--proxy-from-env", "--no-proxy", "example.com"])
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "127.0.0.0/8")
        .start();
    accepted(&mut sidecar, &local).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_connect(&requests[1], &local.addr.to_string());
}

/// Without `--proxy-from-env` the proxy variables mean nothing: a direct connection.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_variables_are_ignored_without_proxy_from_env() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::Status(403))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, up.addr)
        .env("HTTPS_PROXY", proxy.url())
        .env("https_proxy", proxy.url())
        .env("HTTP_PROXY", proxy.url())
        .env("ALL_PROXY", proxy.url())
        .start();
    accepted(&mut sidecar, &up).await;
    assert_eq!(proxy.stats().accepted(), 0);
}
