//! `--protocol postgres` against scripted upstreams over raw TCP (real PostgreSQL is in the
//! `pg_*` tests): the app's SSLRequest answered `N`, the upstream's `S` required, the startup
//! message and pipelined bytes passed on over TLS, `N`/other answers/injected bytes refused with
//! an `ErrorResponse` the app can read, bounds on the app's opening, refusals, `check`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::pg::{
    Answer, GSSENC_REQUEST, PgUpstream, SSL_REQUEST, cancel_request, error_field, read_to_end,
    startup,
};
use crate::support::upstream::server_config;
use crate::support::*;

async fn upstream(pki: &Pki, answer: Answer) -> PgUpstream {
    PgUpstream::start(server_config(&pki.server, &[&pki.ca.der]), answer).await
}

fn pg_proxy(pki: &Pki, up: &PgUpstream) -> Sidecar {
    run_cmd(pki, up.addr)
        .args(["--protocol", "postgres"])
        .start()
}

/// Read exactly `n` bytes, bounded.
async fn read_n(s: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("timed out reading from the proxy")
        .expect("read from the proxy");
    buf
}

/// The one connection line, which must say `reason`.
fn conn_line_with_reason(proxy: &mut Sidecar, reason: &str) -> String {
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "reason"), Some(reason), "{line}");
    line
}

#[tokio::test(flavor = "multi_thread")]
async fn s_answer_passes_the_startup_message_and_pipelined_bytes_over_tls() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let mut proxy = pg_proxy(&pki, &up);

    let mut app = connect(proxy.addr()).await;
    app.write_all(&SSL_REQUEST).await.unwrap();
    assert_eq!(
        read_n(&mut app, 1).await,
        b"N",
        "the app's SSLRequest is answered N"
    );
    let mut sent = startup("alice");
    sent.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
    app.write_all(&sent).await.unwrap();
    let echoed = read_n(&mut app, sent.len()).await;
    assert_eq!(
        echoed, sent,
        "the startup message and the pipelined query arrive intact"
    );
    app.shutdown().await.unwrap();
    let _ = read_to_end(&mut app).await;

    let seen = up.wait_done(1).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].first, SSL_REQUEST,
        "the upstream got our SSLRequest first"
    );
    assert!(seen[0].tls, "TLS after S");
    assert_eq!(seen[0].data, sent, "inside TLS: exactly the app's bytes");
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    assert_eq!(
        num_field(&line, "bytes_to_upstream"),
        sent.len() as u64,
        "{line}"
    );
    assert_eq!(
        num_field(&line, "bytes_from_upstream"),
        sent.len() as u64,
        "{line}"
    );
}

/// The upstream's answer `answer` fails the connection: the app reads one well-formed
/// `ErrorResponse` (08001, FATAL) whose message contains `says`, then the end of the stream;
/// the access line says `reason=protocol`.
async fn refused_with(answer: Answer, says: &str) {
    let pki = Pki::new();
    let up = upstream(&pki, answer).await;
    let mut proxy = pg_proxy(&pki, &up);
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("alice")).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert_eq!(error_field(&got, 'C'), "08001");
    assert_eq!(error_field(&got, 'S'), "FATAL");
    assert_eq!(error_field(&got, 'V'), "FATAL");
    let m = error_field(&got, 'M');
    assert!(m.starts_with("mtls-sidecar: "), "{m}");
    assert!(m.contains(says), "{m:?} does not say {says:?}");
    let line = conn_line_with_reason(&mut proxy, "protocol");
    assert_eq!(num_field(&line, "bytes_from_upstream"), 0, "{line}");
    assert!(up.conns().iter().all(|c| !c.tls), "no TLS session was made");
}

#[tokio::test(flavor = "multi_thread")]
async fn n_answer_gives_the_app_an_error_response_saying_no_tls() {
    refused_with(Answer::Raw(b"N".to_vec()), "the server does not offer TLS").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_s_in_the_same_write_are_refused() {
    refused_with(
        Answer::Raw(b"Sinjected".to_vec()),
        "the server sent 8 bytes of unencrypted data after its SSL answer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn other_answers_and_a_close_are_protocol_failures() {
    refused_with(Answer::Raw(b"X".to_vec()), "answered SSLRequest with \"X\"").await;
    refused_with(Answer::Raw(b"E\x1b[31m".to_vec()), "\\u{1b}[31m").await;
    refused_with(Answer::Close, "closed the connection instead of answering").await;
}

/// Bytes after `S` that arrive after our check reach rustls as a handshake record and fail it:
/// nothing reaches the app but the error.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_after_s_sent_later_never_reach_the_app() {
    let pki = Pki::new();
    let up = upstream(
        &pki,
        Answer::TlsLate(Duration::from_millis(100), b"Z\0\0\0\x05I".to_vec()),
    )
    .await;
    let mut proxy = pg_proxy(&pki, &up);
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("alice")).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert_eq!(error_field(&got, 'C'), "08001");
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_ne!(field(&line, "outcome"), Some("ok"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ssl_and_gssenc_requests_are_each_answered_n() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let proxy = pg_proxy(&pki, &up);
    let mut app = connect(proxy.addr()).await;
    app.write_all(&SSL_REQUEST).await.unwrap();
    assert_eq!(read_n(&mut app, 1).await, b"N");
    app.write_all(&GSSENC_REQUEST).await.unwrap();
    assert_eq!(read_n(&mut app, 1).await, b"N");
    let sent = startup("bob");
    app.write_all(&sent).await.unwrap();
    assert_eq!(read_n(&mut app, sent.len()).await, sent);
    drop(app);
    let seen = up.wait_done(1).await;
    assert_eq!(seen[0].data, sent, "the requests were not passed on");
}

/// The app's opening breaks a rule: the app is told why, and no upstream connection is made.
async fn app_refused(sent: &[u8], ns: usize, says: &str) {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let mut proxy = pg_proxy(&pki, &up);
    let mut app = connect(proxy.addr()).await;
    app.write_all(sent).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert_eq!(&got[..ns], &b"NN"[..ns], "{got:?}");
    let m = error_field(&got[ns..], 'M');
    assert!(m.contains(says), "{m:?} does not say {says:?}");
    conn_line_with_reason(&mut proxy, "protocol");
    assert!(up.conns().is_empty(), "the upstream was dialled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_ssl_request_is_refused() {
    let mut sent = SSL_REQUEST.to_vec();
    sent.extend_from_slice(&SSL_REQUEST);
    app_refused(&sent, 1, "second SSLRequest").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_lengths_out_of_bounds_are_refused_without_a_dial() {
    let mut short = 4u32.to_be_bytes().to_vec();
    short.extend_from_slice(&196_608u32.to_be_bytes());
    app_refused(&short, 0, "invalid startup packet length 4").await;
    let mut long = 20_000u32.to_be_bytes().to_vec();
    long.extend_from_slice(&196_608u32.to_be_bytes());
    app_refused(&long, 0, "invalid startup packet length 20000").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_app_is_closed_at_header_timeout_without_a_dial() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--protocol", "postgres", "--header-timeout", "700ms"])
        .start();
    let started = Instant::now();
    let mut app = connect(proxy.addr()).await;
    app.write_all(&SSL_REQUEST[..4]).await.unwrap();
    let got = read_to_end(&mut app).await;
    let took = started.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    let line = conn_line_with_reason(&mut proxy, "timeout");
    assert!(line.contains("header-timeout"), "{line}");
    assert!(up.conns().is_empty(), "the upstream was dialled");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_is_passed_on() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let proxy = pg_proxy(&pki, &up);
    let mut app = connect(proxy.addr()).await;
    let cancel = cancel_request(4242, 0xdead_beef);
    app.write_all(&cancel).await.unwrap();
    app.shutdown().await.unwrap();
    let echoed = read_to_end(&mut app).await;
    assert_eq!(echoed, cancel);
    let seen = up.wait_done(1).await;
    assert_eq!(seen[0].first, SSL_REQUEST);
    assert_eq!(seen[0].data, cancel);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_upstream_connection_is_told_to_the_app() {
    let pki = Pki::new();
    // Port 1 (tcpmux): nothing listens there, and no other test's listener can take it (a
    // port freed by binding and closing could be).
    let mut proxy = run_cmd(&pki, "127.0.0.1:1")
        .args(["--protocol", "postgres"])
        .start();
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("alice")).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert_eq!(error_field(&got, 'C'), "08001");
    assert!(error_field(&got, 'M').contains("refused"), "{got:?}");
    conn_line_with_reason(&mut proxy, "refused");
}

#[test]
fn protocol_is_refused_on_http_mode_and_inbound_routes() {
    let pki = Pki::new();
    let err = run_cmd(&pki, "127.0.0.1:1")
        .args(["--protocol", "postgres", "--mode", "http"])
        .startup_error();
    assert!(err.contains("--protocol"), "{err}");
    assert!(err.contains("tcp mode"), "{err}");
    let err = Cmd::new()
        .args([
            "run",
            "--inbound",
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:1",
        ])
        .args(["--allow-any-client", "--protocol", "postgres", "--cert"])
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .startup_error();
    assert!(err.contains("--protocol"), "{err}");
    assert!(err.contains("outbound"), "{err}");
}

/// `--header-timeout 0` would close every postgres connection at once: refused at startup.
#[test]
fn a_zero_header_timeout_is_refused_with_postgres() {
    let pki = Pki::new();
    let err = run_cmd(&pki, "127.0.0.1:1")
        .args(["--protocol", "postgres", "--header-timeout", "0"])
        .startup_error();
    assert!(err.contains("--header-timeout"), "{err}");
    assert!(err.contains("--protocol postgres"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_variable_and_the_config_key_select_postgres() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Raw(b"N".to_vec())).await;
    let proxy = run_cmd(&pki, up.addr)
        .env("MTLS_SIDECAR_PROTOCOL", "postgres")
        .start();
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("alice")).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert_eq!(error_field(&got, 'C'), "08001");
    drop(proxy);

    let file = pki.write(
        "pg.toml",
        format!(
            "[defaults]\nprotocol = \"postgres\"\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n\
             [[route]]\nname = \"default\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            pki.client.cert, pki.client.key, pki.ca.pem, up.addr
        ),
    );
    let proxy = Cmd::new().args(["run", "--config"]).arg(&file).start();
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("alice")).await.unwrap();
    let got = read_to_end(&mut app).await;
    assert!(
        error_field(&got, 'M').contains("does not offer TLS"),
        "{got:?}"
    );

    let bad = pki.write(
        "bad.toml",
        format!(
            "[[route]]\nname = \"default\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
             cert = {:?}\nkey = {:?}\nca = {:?}\nmode = \"http\"\nprotocol = \"postgres\"\n",
            up.addr, pki.client.cert, pki.client.key, pki.ca.pem
        ),
    );
    let err = Cmd::new()
        .args(["run", "--config"])
        .arg(&bad)
        .startup_error();
    assert!(err.contains("bad.toml:9: key `protocol`"), "{err}");
}

/// Runs `check` to completion off the runtime's threads: (exit code, stdout).
async fn check(pki: &Pki, up: std::net::SocketAddr, extra: &[&str]) -> (Option<i32>, String) {
    let cmd = Cmd::new()
        .args(["check", "--protocol", "postgres", "--upstream"])
        .arg(up.to_string())
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(extra);
    tokio::task::spawn_blocking(move || {
        let mut p = cmd.spawn();
        let status = p.wait_exit(WAIT);
        p.wait_output_closed();
        (status.code(), p.stdout())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_the_opening_and_explains_n() {
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let (code, out) = check(&pki, up.addr, &[]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("postgres         SSLRequest: S"), "{out}");
    let (code, out) = check(&pki, up.addr, &["--format", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let route = &v["routes"][0];
    assert_eq!(route["postgres"], "SSLRequest: S", "{out}");

    let no = upstream(&pki, Answer::Raw(b"N".to_vec())).await;
    let (code, out) = check(&pki, no.addr, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("postgres         SSLRequest: N"), "{out}");
    assert!(out.contains("ssl = off in postgresql.conf"), "{out}");
    assert!(out.contains("--alpn postgresql"), "{out}");
}

/// `/upstreamz` probes a postgres route with the same opening: `S` is ok, `N` is a 503 whose
/// line says the server does not offer TLS.
#[tokio::test(flavor = "multi_thread")]
async fn upstreamz_probes_with_the_opening() {
    use crate::support::admin::{admin_addr, get};
    let pki = Pki::new();
    let up = upstream(&pki, Answer::Tls).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args(["--protocol", "postgres", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let seen = up.wait_done(1).await;
    assert_eq!(
        seen[0].first, SSL_REQUEST,
        "the probe sent SSLRequest first"
    );
    assert!(seen[0].tls, "the probe's handshake ran after S");
    drop(proxy);

    let no = upstream(&pki, Answer::Raw(b"N".to_vec())).await;
    let mut proxy = run_cmd(&pki, no.addr)
        .args(["--protocol", "postgres", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let resp = get(admin, "/upstreamz").await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(resp.body.contains("does not offer TLS"), "{resp:?}");
}

/// Through an egress proxy the opening runs inside the CONNECT tunnel: `S` then TLS works, `N`
/// is refused the same way.
#[tokio::test(flavor = "multi_thread")]
async fn the_opening_runs_inside_a_proxy_tunnel() {
    use crate::support::connect_proxy::{ConnectProxy, UPSTREAM_NAME, named_server};
    let pki = Pki::new();
    let config = server_config(&named_server(&pki), &[&pki.ca.der]);
    let up = PgUpstream::start(config, Answer::Tls).await;
    let egress = ConnectProxy::start().await;
    let target = format!("{UPSTREAM_NAME}:{}", up.addr.port());
    let proxy = run_cmd(&pki, &target)
        .args(["--protocol", "postgres", "--proxy", &egress.url()])
        .start();
    let mut app = connect(proxy.addr()).await;
    let sent = startup("carol");
    app.write_all(&sent).await.unwrap();
    assert_eq!(read_n(&mut app, sent.len()).await, sent);
    drop(app);
    let seen = up.wait_done(1).await;
    assert_eq!(seen[0].first, SSL_REQUEST);
    assert_eq!(seen[0].data, sent);
    assert_eq!(egress.connects(), 1, "through the tunnel");
}

/// libpq sends no SSLRequest over a unix socket: on a `unix:` listener (a socket named
/// `.s.PGSQL.5432` in a directory `psql host=DIR` points at) the startup message comes first.
/// An `N` upstream's `ErrorResponse` reaches a unix-socket app too.
#[tokio::test(flavor = "multi_thread")]
async fn a_unix_socket_app_sends_its_startup_message_first() {
    let pki = Pki::new();
    let dir = tempfile::Builder::new()
        .prefix("mtls-pg")
        .tempdir_in("/tmp")
        .unwrap();
    let path = dir.path().join(".s.PGSQL.5432");
    for (answer, ok) in [(Answer::Tls, true), (Answer::Raw(b"N".to_vec()), false)] {
        let up = upstream(&pki, answer).await;
        let mut proxy = Cmd::new()
            .args(["run", "--protocol", "postgres", "--listen"])
            .arg(format!("unix:{}", path.display()))
            .arg("--upstream")
            .arg(up.addr.to_string())
            .arg("--cert")
            .arg(&pki.client.cert)
            .arg("--key")
            .arg(&pki.client.key)
            .arg("--ca")
            .arg(&pki.ca.pem)
            .spawn();
        tokio::task::block_in_place(|| {
            proxy.wait_for_line("the listening line", WAIT, |l| l.contains("listening"))
        });
        let mut app = tokio::net::UnixStream::connect(&path).await.unwrap();
        let sent = startup("dave");
        app.write_all(&sent).await.unwrap();
        if ok {
            let mut echoed = vec![0u8; sent.len()];
            tokio::time::timeout(WAIT, app.read_exact(&mut echoed))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(echoed, sent);
        } else {
            let mut got = Vec::new();
            let _ = tokio::time::timeout(WAIT, app.read_to_end(&mut got))
                .await
                .unwrap();
            assert_eq!(error_field(&got, 'C'), "08001");
        }
        drop(app);
        drop(proxy);
        let _ = std::fs::remove_file(&path);
    }
}

/// An upstream that accepts and never answers the SSLRequest: `--connect-timeout` ends it, the
/// failure names the phase, and `check` says the server did not answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_times_out_in_the_ssl_request_phase() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let mut proxy = run_cmd(&pki, silent.addr)
        .args(["--protocol", "postgres", "--connect-timeout", "500ms"])
        .start();
    let mut app = connect(proxy.addr()).await;
    app.write_all(&startup("erin")).await.unwrap();
    let got = read_to_end(&mut app).await;
    let m = error_field(&got, 'M');
    assert!(m.contains("stuck in postgres SSLRequest"), "{m}");
    conn_line_with_reason(&mut proxy, "timeout");

    let (code, out) = check(&pki, silent.addr, &["--connect-timeout", "500ms"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("did not answer our PostgreSQL SSLRequest"),
        "{out}"
    );
}
