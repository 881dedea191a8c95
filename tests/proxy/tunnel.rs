//! Connections that go through: tcp mode via http:// and https:// proxies to a name only the
//! proxy resolves, the exact CONNECT, bytes after the `200` head, an untrusted, misnamed or
//! client-cert-wanting https proxy, a `200` head in pieces, IPv6 targets, a scheme-less proxy.

use super::*;

/// tcp mode through an http:// proxy to a name only the proxy can resolve: bytes intact both
/// ways, exactly one `CONNECT name:port` with a matching Host and no credentials, our SNI and
/// client certificate at the upstream, `outcome=ok`.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_through_an_http_proxy_to_a_name_only_it_resolves() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();

    let data = pattern(11, 300_000);
    let got = exchange(sidecar.addr(), data.clone()).await;
    assert!(
        got == data,
        "echo through the proxy altered or cut ({} of {} bytes back)",
        got.len(),
        data.len()
    );
    let line = sidecar.wait_conn_lines(1)[0].clone();
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(num_field(&line, "bytes_to_upstream"), 300_000, "{line}");
    assert_eq!(num_field(&line, "bytes_from_upstream"), 300_000, "{line}");

    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_connect(&requests[0], &target(up.port()));
    assert_eq!(
        requests[0].proxy_authorization(),
        None,
        "credentials sent though none were configured"
    );
    assert!(
        requests[0]
            .header("user-agent")
            .is_some_and(|ua| ua.starts_with("mtls-sidecar/")),
        "User-Agent of the CONNECT: {:#?}",
        requests[0]
    );
    assert_eq!(proxy.stats().tunnels(), 1);
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_named_conn(&conns[0]);
    let finished = up.stats.wait_finished(1).await;
    assert_eq!(finished[0].received, 300_000);
    assert_eq!(finished[0].sha256, sha256(&data));
}

/// An https:// proxy verified with `--proxy-ca` (a CA of its own, not the upstream's), or
/// `MTLS_SIDECAR_PROXY_CA`: the upstream handshake runs inside the proxy's TLS.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_through_an_https_proxy_verified_with_proxy_ca() {
    let pki = Pki::new();
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .start()
        .await;
    assert!(proxy.url().starts_with("https://127.0.0.1:"));
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);

    let mut by_env = via(&pki, &up, &proxy.url())
        .env("MTLS_SIDECAR_PROXY_CA", &proxy_ca.pem)
        .start();
    let conn = accepted(&mut by_env, &up).await;
    assert_named_conn(&conn);
    let requests = proxy.requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    for req in &requests {
        assert_connect(req, &target(up.port()));
    }
    assert_eq!(proxy.stats().tls_failures.load(Ordering::SeqCst), 0);
}

/// Bytes that arrive in the same segment as the proxy's `200` head belong to the tunnel: here
/// they are a TLS alert record, which the upstream handshake must see at once (`reason=protocol`
/// naming the alert). Were they dropped, the handshake would wait for a ServerHello the silent
/// proxy never sends and end in `reason=timeout`. Through an http:// proxy (socket buffer) and
/// an https:// one (bytes read past the head out of the proxy's TLS stream).
#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_the_200_head_reach_the_upstream_handshake() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let (proxy_ca, proxy_id) = proxy_pki(&pki);
    let mut answer = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
    // alert(21), TLS 1.2 record, length 2: fatal(2) handshake_failure(40)
    answer.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    let behavior = ProxyBehavior::Raw {
        bytes: answer,
        close: false,
    };
    for tls in [false, true] {
        let mut builder = ConnectProxy::builder().behavior(behavior.clone());
        if tls {
            builder = builder.tls_identity(&proxy_id);
        }
        let proxy = builder.start().await;
        let mut sidecar = via(&pki, &up, &proxy.url())
            .arg("--proxy-ca")
            .arg(&proxy_ca.pem)
            .args(["--connect-timeout", "10s"])
            .start();
        let started = Instant::now();
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "tls_error", "protocol");
        assert!(line.contains("HandshakeFailure"), "tls={tls}: {line}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "tls={tls}: the alert was not seen at once ({:?}): {line}",
            started.elapsed()
        );
        assert_eq!(proxy.connects(), 1, "tls={tls}");
    }
}

/// An https:// proxy whose certificate `--proxy-ca` does not lead to (nor the system store):
/// `reason=proxy_tls`, `outcome=tls_error`, no CONNECT sent.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_with_an_untrusted_certificate_is_proxy_tls() {
    let pki = Pki::new();
    let (_proxy_ca, proxy_id) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .tls_identity(&proxy_id)
        .start()
        .await;
    // The upstream's CA is trusted for the upstream, not for the proxy.
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-ca")
        .arg(&pki.ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    proxy.stats().wait_tls_failures(1).await;
    let errors = proxy.stats().tls_errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("UnknownCA") || e.contains("unknown")),
        "the proxy's handshake did not fail for our distrust of its certificate: {errors:?}"
    );

    let mut system = via(&pki, &up, &proxy.url()).start();
    let line = refused(&mut system, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    proxy.stats().wait_tls_failures(2).await;
    assert_eq!(proxy.stats().request_count(), 0, "{:#?}", proxy.requests());
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// An https proxy whose certificate comes from `--proxy-ca` but is for another name than the
/// URL's host, and one that insists on a client certificate (none is offered to a proxy):
/// `reason=proxy_tls` both.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_with_the_wrong_name_or_wanting_a_client_cert_is_proxy_tls() {
    let pki = Pki::new();
    let (proxy_ca, _) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let other_name = pki.leaf(
        &proxy_ca,
        "proxy-other-name",
        LeafSpec {
            cn: "proxy.other.example",
            names: &["proxy.other.example"],
            uris: &[],
            client: false,
            validity: None,
        },
    );
    let wrong_name = ConnectProxy::builder()
        .tls_identity(&other_name)
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &wrong_name.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    wrong_name.stats().wait_tls_failures(1).await;
    assert_eq!(wrong_name.stats().request_count(), 0);

    // Wants a client certificate from our test CA; TLS 1.3 tells the client after its side of
    // the handshake is done, when it reads the answer to its CONNECT.
    let proxy_id = pki.leaf(&proxy_ca, "proxy-mtls", LeafSpec::server());
    let wants_cert = ConnectProxy::builder()
        .tls(server_config(&proxy_id, &[&pki.ca.der]))
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &wants_cert.url())
        .arg("--proxy-ca")
        .arg(&proxy_ca.pem)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "tls_error", "proxy_tls");
    wants_cert.stats().wait_tls_failures(1).await;
    assert_eq!(wants_cert.stats().request_count(), 0);
    assert_eq!(up.stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

/// The `200` head arrives one byte per segment: still one tunnel that works.
#[tokio::test(flavor = "multi_thread")]
async fn a_200_head_in_tiny_pieces_still_opens_the_tunnel() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::TunnelSplitHeader)
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    assert_eq!(proxy.stats().tunnels(), 1);
}

/// `--upstream [::1]:PORT` is asked for in brackets, as written (the proxy resolves it; here
/// to 127.0.0.1); `--server-name` still decides SNI and verification.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_upstream_is_asked_for_in_brackets() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .resolve("::1", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, format!("[::1]:{}", up.port()))
        .args(["--server-name", UPSTREAM_NAME, "--proxy", &proxy.url()])
        .start();
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    assert_connect(&proxy.requests()[0], &format!("[::1]:{}", up.port()));
}

/// `--proxy 127.0.0.1:PORT` without a scheme means http://.
#[tokio::test(flavor = "multi_thread")]
async fn scheme_less_proxy_means_http() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::start().await;
    let mut sidecar = via(&pki, &up, &proxy.addr.to_string()).start();
    accepted(&mut sidecar, &up).await;
    assert_connect(&proxy.requests()[0], &target(up.port()));
}
