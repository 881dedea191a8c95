//! Every way the proxy hop fails: unreachable, `403`/`502`, broken answers, silence, one
//! `--connect-timeout` over every step; each with its `reason=`, outcome and metrics.

use super::*;

/// Nothing listens where the proxy should be, or its name does not resolve:
/// `reason=proxy_unreachable`, counted as `connect_error`.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_down_is_proxy_unreachable_and_counted() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut sidecar = via(&pki, &up, &dead)
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    let line = refused(&mut sidecar, &up).await;
    assert_failed(&line, "connect_error", "proxy_unreachable");
    let m = wait_outcome(admin, "connect_error", 1.0).await;
    assert_eq!(
        m.count(
            FAILURES,
            &[("route", "default"), ("reason", "proxy_unreachable")]
        ),
        1.0,
        "{FAILURES}{{reason=\"proxy_unreachable\"}}:\n{}",
        m.text
    );
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        0.0
    );

    let mut unresolvable = via(&pki, &up, "http://proxy.mtls-test.invalid:3128").start();
    let line = refused(&mut unresolvable, &up).await;
    assert_failed(&line, "connect_error", "proxy_unreachable");
}

/// `403` and `502` from the proxy are `reason=proxy_refused` naming the status; the next
/// connection, which the proxy lets through, works.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_403_and_502_are_proxy_refused_and_later_connections_work() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .script(vec![
            ProxyBehavior::Status(403),
            ProxyBehavior::Status(502),
            ProxyBehavior::Tunnel,
        ])
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    for code in ["403", "502"] {
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "connect_error", "proxy_refused");
        assert!(says(&line, code), "the status {code} is not named: {line}");
    }
    proxy.stats().wait_closed_by_client(2).await;
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
    let m = wait_outcome(admin, "connect_error", 2.0).await;
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        1.0
    );
}

/// Answers that are not a complete HTTP head are `reason=proxy_protocol`, `outcome=error`:
/// a non-HTTP line (connection kept open), TLS bytes then close, a close before any answer, a
/// head cut by a close, a head over 16 KiB (kept open). None waits for the connect timeout;
/// the next connection works.
#[tokio::test(flavor = "multi_thread")]
async fn broken_answers_are_proxy_protocol() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let mut huge = b"HTTP/1.1 200 Connection established\r\n".to_vec();
    while huge.len() < 24 * 1024 {
        huge.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let script = vec![
        ProxyBehavior::Raw {
            bytes: b"SSH-2.0-OpenSSH_9.6 not an http proxy\r\n\r\n".to_vec(),
            close: false,
        },
        ProxyBehavior::Raw {
            // A TLS alert: an https proxy dialled as http://.
            bytes: vec![0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46],
            close: true,
        },
        ProxyBehavior::CloseWithoutAnswer,
        ProxyBehavior::Raw {
            bytes: b"HTTP/1.1 200 Connection estab".to_vec(),
            close: true,
        },
        ProxyBehavior::Raw {
            bytes: huge,
            close: false,
        },
        ProxyBehavior::Tunnel,
    ];
    let cases = script.len() - 1;
    let proxy = ConnectProxy::builder().script(script).start().await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--admin", "127.0.0.1:0", "--connect-timeout", "8s"])
        .start();
    let admin = admin_addr(&mut sidecar);
    for case in 0..cases {
        let started = Instant::now();
        let line = refused(&mut sidecar, &up).await;
        assert_eq!(
            field(&line, "reason"),
            Some("proxy_protocol"),
            "case {case}: {line}"
        );
        assert_failed(&line, "error", "proxy_protocol");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "case {case} took {:?}: {line}",
            started.elapsed()
        );
    }
    // The two kept open are closed by the sidecar.
    proxy.stats().wait_closed_by_client(2).await;
    accepted(&mut sidecar, &up).await;
    let m = wait_outcome(admin, "error", cases as f64).await;
    assert_eq!(
        m.count(
            FAILURES,
            &[("route", "default"), ("reason", "proxy_protocol")]
        ),
        cases as f64,
        "{FAILURES}{{reason=\"proxy_protocol\"}}:\n{}",
        m.text
    );
    assert_eq!(
        m.count(CONNS, &[("route", "default"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(proxy.stats().tunnels(), 1);
}

/// A proxy that accepts and never answers: `reason=timeout` after `--connect-timeout 500ms`
/// (the message names the proxy), the held connection is closed, and the next connection
/// works.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_that_never_answers_times_out() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let proxy = ConnectProxy::builder()
        .script(vec![ProxyBehavior::Hang, ProxyBehavior::Tunnel])
        .start()
        .await;
    let mut sidecar = via(&pki, &up, &proxy.url())
        .args(["--connect-timeout", "500ms", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut sidecar);
    let started = Instant::now();
    let line = refused(&mut sidecar, &up).await;
    let took = started.elapsed();
    assert_failed(&line, "timeout", "timeout");
    assert!(
        says(&line, "proxy"),
        "the timeout does not name the proxy: {line}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "refused after {took:?} with --connect-timeout 500ms"
    );
    let ms = num_field(&line, "duration_ms");
    assert!((450..3000).contains(&ms), "duration_ms={ms}: {line}");
    proxy.stats().wait_closed_by_client(1).await;
    wait_outcome(admin, "timeout", 1.0).await;
    // Not stuck: the next connection goes through.
    let conn = accepted(&mut sidecar, &up).await;
    assert_named_conn(&conn);
}

/// A slow proxy (its `200` after 1.4 s) in front of an upstream that never answers the TLS
/// handshake: `--connect-timeout 2s` bounds the whole sequence, not each step (which would
/// take 3.4 s).
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_proxy_and_upstream_handshake_together() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let proxy = ConnectProxy::builder()
        .behavior(ProxyBehavior::TunnelAfter(Duration::from_millis(1400)))
        .start()
        .await;
    let mut sidecar = run_cmd(&pki, target(silent.addr.port()))
        .args(["--proxy", &proxy.url(), "--connect-timeout", "2s"])
        .start();
    let started = Instant::now();
    let mut stream = connect(sidecar.addr()).await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let took = started.elapsed();
    let line = sidecar.wait_conn_lines(1)[0].clone();
    assert_failed(&line, "timeout", "timeout");
    assert_eq!(
        proxy.stats().tunnels(),
        1,
        "the tunnel was not opened: {line}"
    );
    assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "closed after {took:?}: --connect-timeout 2s must cover the 1.4 s at the proxy and the \
         upstream handshake together"
    );
}

/// Without a port, http:// means 80 and https:// 443 (where nothing listens in the test
/// environment: `proxy_unreachable`, naming the address). Skipped when something does listen.
#[tokio::test(flavor = "multi_thread")]
async fn default_proxy_ports_are_80_and_443() {
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    for (url, port) in [("http://127.0.0.1", 80), ("https://127.0.0.1", 443)] {
        let probe = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        if !matches!(probe, Ok(Err(_))) {
            eprintln!("skipped {url}: something listens on 127.0.0.1:{port}");
            continue;
        }
        let mut sidecar = via(&pki, &up, url).start();
        let line = refused(&mut sidecar, &up).await;
        assert_failed(&line, "connect_error", "proxy_unreachable");
        assert!(
            field(&line, "error").is_some_and(|e| e.contains(&format!("127.0.0.1:{port}"))),
            "--proxy {url}: the error does not name 127.0.0.1:{port}: {line}"
        );
    }
}

/// An https proxy that accepts TCP and never answers the TLS handshake: the same timeout.
#[tokio::test(flavor = "multi_thread")]
async fn https_proxy_silent_in_the_handshake_times_out() {
    let pki = Pki::new();
    let (proxy_ca, _) = proxy_pki(&pki);
    let up = named_upstream(&pki).await;
    let silent = Silent::start().await;
    let mut sidecar = via(&pki, &up, &format!("https://{}", silent.addr))
        .args(["--connect-timeout", "500ms", "--proxy-ca"])
        .arg(&proxy_ca.pem)
        .start();
    let started = Instant::now();
    let line = refused(&mut sidecar, &up).await;
    let took = started.elapsed();
    assert_failed(&line, "timeout", "timeout");
    assert!(
        says(&line, "proxy"),
        "the timeout does not name the proxy: {line}"
    );
    assert!(
        took < Duration::from_secs(3),
        "refused after {took:?} with --connect-timeout 500ms"
    );
    assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
}
