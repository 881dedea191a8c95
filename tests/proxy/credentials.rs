//! Proxy credentials: from the URL (percent-decoded), `--proxy-auth-file` and the environment;
//! `407` without and with wrong credentials; a rotated auth file; never in stderr.

use super::*;

/// Credentials in the URL, percent-encoded (`%40` is `@`, `%3A` is `:`), reach the proxy
/// decoded, as Basic.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_url_are_percent_decoded() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("alice", "p@ss:w0rd")
        .start()
        .await;
    let url = proxy.url_with_userinfo("alice:p%40ss%3Aw0rd");
    let mut sidecar = via(&pki, &up, &url).start();
    accepted(&mut sidecar, &up).await;
    let requests = proxy.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(
        requests[0].proxy_authorization(),
        Some(&*basic("alice", "p@ss:w0rd"))
    );
    assert_connect(&requests[0], &target(up.port()));
    assert_not_logged(&sidecar, "alice", "p@ss:w0rd");
}

/// `--proxy-auth-file` (one trailing newline ignored), and the same through
/// `MTLS_SIDECAR_PROXY` + `MTLS_SIDECAR_PROXY_AUTH_FILE`.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_the_auth_file_flag_and_environment() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("bob", "s3cret-file")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "bob", "s3cret-file");

    let mut by_flag = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .start();
    accepted(&mut by_flag, &up).await;

    let mut by_env = run_cmd(&pki, target(up.port()))
        .env("MTLS_SIDECAR_PROXY", proxy.url())
        .env("MTLS_SIDECAR_PROXY_AUTH_FILE", &file)
        .start();
    accepted(&mut by_env, &up).await;

    let requests = proxy.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    for req in &requests {
        assert_eq!(
            req.proxy_authorization(),
            Some(&*basic("bob", "s3cret-file")),
            "{req:#?}"
        );
    }
    assert_eq!(proxy.stats().auth_refused.load(Ordering::SeqCst), 0);
}

/// No credentials and a proxy that wants some: `407` is `reason=proxy_auth`,
/// `outcome=connect_error`, "proxy authentication required"; the proxy's connection is closed.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_407_without_credentials_is_proxy_auth_required() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("carol", "unknown-to-sidecar")
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url()).start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");
    assert!(
        says(&line, "proxy authentication required"),
        "no \"proxy authentication required\" in: {line}"
    );
    assert_eq!(proxy.stats().auth_refused.load(Ordering::SeqCst), 1);
    assert_eq!(proxy.requests()[0].proxy_authorization(), None);
    proxy.stats().wait_closed_by_client(1).await;
}

/// Credentials the proxy refuses: "proxy authentication failed", and they are not logged.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_407_with_wrong_credentials_is_proxy_auth_failed() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("dave", "right-password")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "dave", "Wr0ng-Passw0rd");
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .start();
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");
    assert!(
        says(&line, "proxy authentication failed"),
        "no \"proxy authentication failed\" in: {line}"
    );
    assert_eq!(
        proxy.requests()[0].proxy_authorization(),
        Some(&*basic("dave", "Wr0ng-Passw0rd"))
    );
    proxy.stats().wait_closed_by_client(1).await;
    assert_not_logged(&sidecar, "dave", "Wr0ng-Passw0rd");
}

/// The proxy's password is rotated and the auth file with it: after at most one `407` (the
/// file is read again then), connections use the new credentials, without a restart and with
/// `--reload-interval 0` (no polling to help).
#[tokio::test(flavor = "multi_thread")]
async fn rotated_credentials_in_the_auth_file_are_used_after_a_407() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("erin", "old-pass-1")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "erin", "old-pass-1");
    let mut sidecar = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .args(["--reload-interval", "0"])
        .start();
    accepted(&mut sidecar, &up).await;

    proxy.set_credentials("erin", "new-pass-2");
    atomic_write(&file, "erin:new-pass-2\n");

    // The first connection after the rotation may still carry the old credentials.
    let data = pattern(5, 2000);
    let (got, line) = attempt(&mut sidecar, &data).await;
    if field(&line, "outcome") == Some("ok") {
        assert!(got == data, "echo altered: {line}");
    } else {
        assert!(
            got.is_empty(),
            "bytes back from a refused connection: {line}"
        );
        assert_failed(&line, "connect_error", "proxy_auth");
        assert!(says(&line, "proxy authentication failed"), "{line}");
    }
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let requests = proxy.requests();
    assert_eq!(
        requests.last().and_then(|r| r.proxy_authorization()),
        Some(&*basic("erin", "new-pass-2")),
        "{requests:#?}"
    );
    assert!(
        proxy.stats().auth_refused.load(Ordering::SeqCst) <= 1,
        "more than one 407 after the rotation: {requests:#?}"
    );
}

/// At `--log-level trace`, through a good connection and a refused one, neither the password
/// nor its base64 forms appear in stderr: from the auth file or from the URL.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_never_appear_in_stderr_at_trace() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .credentials("frank", "Tr4ce-F1le-Secret")
        .start()
        .await;
    let file = auth_file(&pki, "proxy-auth", "frank", "Tr4ce-F1le-Secret");
    let mut from_file = via(&pki, &up, &proxy.url())
        .arg("--proxy-auth-file")
        .arg(&file)
        .args(["--log-level", "trace"])
        .env("RUST_LOG", "trace")
        .start();
    accepted(&mut from_file, &up).await;

    let url = proxy.url_with_userinfo("frank:Tr4ce-Url-Secret");
    let mut from_url = via(&pki, &up, &url).args(["--log-level", "trace"]).start();
    // Refused: the proxy wants the file's password.
    let line = refused(&mut from_url, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");

    proxy.set_credentials("frank", "Tr4ce-Url-Secret");
    accepted(&mut from_url, &up).await;
    proxy.set_credentials("frank", "something-else");
    let line = refused(&mut from_file, &up).await;
    assert_failed(&line, "connect_error", "proxy_auth");

    assert_not_logged(&from_file, "frank", "Tr4ce-F1le-Secret");
    assert_not_logged(&from_url, "frank", "Tr4ce-Url-Secret");
}
