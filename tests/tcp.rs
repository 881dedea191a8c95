//! Byte-stream mode when everything is right: the bytes, both directions, half-close, many
//! connections at once, what the upstream sees of us, and session resumption.

use std::sync::Arc;
use std::time::Duration;

use rustls::HandshakeKind;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::support::pki::CLIENT_CN;
use crate::support::upstream::{Conn, server_config};
use crate::support::*;

/// Finds the access log line of the connection that sent `to_upstream` bytes.
fn line_with_bytes_to_upstream(lines: &[String], to_upstream: usize) -> &String {
    lines
        .iter()
        .find(|l| field(l, "bytes_to_upstream") == Some(&to_upstream.to_string()))
        .unwrap_or_else(|| panic!("no connection line with bytes_to_upstream={to_upstream}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_arrive_intact_from_1_byte_to_16_mib() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr).start();

    let sizes = [1, 2, 1000, 16_384, 16_385, 65_537, (1 << 20) + 7, 16 << 20];
    let mut sent = vec![];
    for (i, &size) in sizes.iter().enumerate() {
        let data = pattern(i as u64, size);
        let got = exchange(proxy.addr(), data.clone()).await;
        assert_eq!(
            got.len(),
            size,
            "echo of {size} bytes came back with the wrong length"
        );
        assert!(got == data, "echo of {size} bytes came back altered");
        sent.push(sha256(&data));
    }

    // The upstream's application layer read exactly what we sent, each on its own connection.
    let finished = up.stats.wait_finished(sizes.len()).await;
    for (size, sha) in sizes.iter().zip(&sent) {
        let f = finished
            .iter()
            .find(|f| f.received == *size as u64)
            .unwrap_or_else(|| panic!("upstream read no connection of {size} bytes: {finished:?}"));
        assert_eq!(
            &f.sha256, sha,
            "upstream received altered bytes ({size} bytes)"
        );
        assert_eq!(
            f.error, None,
            "the proxy did not end the TLS stream with close_notify"
        );
    }

    let lines = proxy.wait_conn_lines(sizes.len());
    assert_eq!(
        lines.len(),
        sizes.len(),
        "one line per connection: {lines:#?}"
    );
    for &size in &sizes {
        let line = line_with_bytes_to_upstream(&lines, size);
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
        assert_eq!(
            num_field(line, "bytes_from_upstream"),
            size as u64,
            "{line}"
        );
        assert_eq!(field(line, "route"), Some("default"), "{line}");
        assert_eq!(
            field(line, "upstream"),
            Some(&*up.addr.to_string()),
            "{line}"
        );
        assert!(
            field(line, "peer").is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{line}"
        );
        num_field(line, "duration_ms");
    }
}

/// Both directions move at the same time: the app keeps its sending side open until it has
/// received everything, so a proxy that copies one direction to its end before starting the
/// other one cannot pass.
#[tokio::test(flavor = "multi_thread")]
async fn full_duplex_both_directions_at_once() {
    const LEN: usize = 4 << 20;
    let pki = Pki::new();
    let cfg = server_config(&pki.server, &[&pki.ca.der]);
    let up = Upstream::start(cfg, vec![Behavior::Duplex { len: LEN, seed: 99 }]).await;
    let mut proxy = run_cmd(&pki, up.addr).start();

    let stream = connect(proxy.addr()).await;
    let (mut rd, mut wr) = stream.into_split();
    let ours = pattern(7, LEN);
    let ours_sha = sha256(&ours);
    let write = async move {
        wr.write_all(&ours).await.expect("write");
        wr
    };
    let read = async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; LEN];
        rd.read_exact(&mut buf)
            .await
            .expect("read the upstream's bytes");
        (rd, buf)
    };
    let (mut wr, (mut rd, theirs)) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
            .await
            .expect("full-duplex transfer stalled: is one direction waiting for the other?");
    assert!(
        theirs == pattern(99, LEN),
        "bytes from the upstream altered"
    );

    wr.shutdown().await.expect("shutdown");
    let mut rest = vec![];
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest),
    )
    .await
    .expect("no end of stream after both sides finished")
    .expect("read");
    assert!(rest.is_empty(), "extra bytes after the upstream's data");

    let finished = up.stats.wait_finished(1).await;
    assert_eq!(finished[0].received, LEN as u64);
    assert_eq!(
        finished[0].sha256, ours_sha,
        "bytes to the upstream altered"
    );
    let line = &proxy.wait_conn_lines(1)[0];
    assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    assert_eq!(num_field(line, "bytes_to_upstream"), LEN as u64, "{line}");
    assert_eq!(num_field(line, "bytes_from_upstream"), LEN as u64, "{line}");
}

/// Runs one echo through a proxy built from `extra` args and returns what the upstream saw.
async fn seen_by_upstream(upstream_host: &str, extra: &[&str]) -> Conn {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd(&pki, format!("{upstream_host}:{}", up.port()))
        .args(extra)
        .start();
    assert_eq!(exchange(proxy.addr(), b"ping".to_vec()).await, b"ping");
    let conns = up.stats.conns();
    assert_eq!(conns.len(), 1);
    let conn = conns[0].clone();
    assert_eq!(
        conn.client_cn.as_deref(),
        Some(CLIENT_CN),
        "client certificate CN"
    );
    assert_eq!(
        conn.client_der.as_deref(),
        Some(pki.client.der.as_ref()),
        "the upstream did not get our client certificate"
    );
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_is_the_upstream_host_by_default() {
    let conn = seen_by_upstream("localhost", &[]).await;
    assert_eq!(conn.sni.as_deref(), Some("localhost"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_is_the_server_name_flag() {
    let conn = seen_by_upstream("127.0.0.1", &["--server-name", "localhost"]).await;
    assert_eq!(conn.sni.as_deref(), Some("localhost"));
}

/// An IP address is never sent as SNI (RFC 6066); the certificate's IP SAN is what matches.
#[tokio::test(flavor = "multi_thread")]
async fn no_sni_for_an_ip_upstream() {
    let conn = seen_by_upstream("127.0.0.1", &[]).await;
    assert_eq!(conn.sni, None);
}

/// The app's FIN becomes close_notify + FIN upstream while the upstream can still answer.
#[tokio::test(flavor = "multi_thread")]
async fn half_close_from_the_app_keeps_the_reply_flowing() {
    let pki = Pki::new();
    let cfg = server_config(&pki.server, &[&pki.ca.der]);
    let delay = Duration::from_millis(300);
    let up = Upstream::start(cfg, vec![Behavior::ReplyAfterEof { delay }]).await;
    let mut proxy = run_cmd(&pki, up.addr).start();

    let data = pattern(3, 100_000);
    let reply = exchange(proxy.addr(), data.clone()).await;
    let expected = format!("received 100000 sha256 {}\n", hex(&sha256(&data)));
    assert_eq!(String::from_utf8_lossy(&reply), expected);

    let finished = up.stats.wait_finished(1).await;
    assert_eq!(
        finished[0].error, None,
        "upstream saw no close_notify before the FIN"
    );
    let line = &proxy.wait_conn_lines(1)[0];
    assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    assert_eq!(
        num_field(line, "bytes_from_upstream"),
        expected.len() as u64,
        "{line}"
    );
}

/// The upstream's close_notify + FIN becomes a FIN to the app while the app can still send.
#[tokio::test(flavor = "multi_thread")]
async fn half_close_from_the_upstream_keeps_the_app_sending() {
    let pki = Pki::new();
    let greeting = b"hello from upstream\n".to_vec();
    let cfg = server_config(&pki.server, &[&pki.ca.der]);
    let behavior = Behavior::CloseFirst {
        greeting: greeting.clone(),
    };
    let up = Upstream::start(cfg, vec![behavior]).await;
    let mut proxy = run_cmd(&pki, up.addr).start();

    let mut stream = connect(proxy.addr()).await;
    assert_eq!(read_to_end(&mut stream).await, greeting);
    // Only now, after the app has seen end of stream, does it send.
    let data = pattern(4, 200_000);
    stream
        .write_all(&data)
        .await
        .expect("write after EOF from upstream");
    stream.shutdown().await.expect("shutdown");

    let finished = up.stats.wait_finished(1).await;
    assert_eq!(
        finished[0].received,
        data.len() as u64,
        "bytes sent after the upstream's FIN"
    );
    assert_eq!(finished[0].sha256, sha256(&data));
    assert_eq!(finished[0].error, None, "upstream saw no close_notify");
    let line = &proxy.wait_conn_lines(1)[0];
    assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    assert_eq!(
        num_field(line, "bytes_to_upstream"),
        data.len() as u64,
        "{line}"
    );
    assert_eq!(
        num_field(line, "bytes_from_upstream"),
        greeting.len() as u64,
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_concurrent_connections_stay_intact() {
    const N: usize = 100;
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr).start();
    let addr = proxy.addr();

    // Every connection first proves it is open end to end, then waits for all the others, so
    // all N are open at once before any of them sends the rest.
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = JoinSet::new();
    for i in 0..N {
        let barrier = Arc::clone(&barrier);
        tasks.spawn(async move {
            let data = pattern(1000 + i as u64, 32 * 1024 + i);
            let mut stream = connect(addr).await;
            stream.write_all(&data[..100]).await.expect("write");
            assert_eq!(read_exact(&mut stream, 100).await, &data[..100]);
            barrier.wait().await;
            let (rest, _) = data.split_at(100);
            let got = exchange_on(stream, rest.to_vec()).await;
            assert!(got == rest, "connection {i}: echo altered");
        });
    }
    let all = async {
        while let Some(res) = tasks.join_next().await {
            res.expect("connection task failed");
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("100 concurrent connections did not finish");

    assert_eq!(up.stats.tls_accepted(), N);
    let lines = proxy.wait_conn_lines(N);
    assert_eq!(lines.len(), N);
    for line in &lines {
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    }
}

/// An upstream that resets mid-stream ends that one connection; the proxy goes on serving.
#[tokio::test(flavor = "multi_thread")]
async fn reset_mid_stream_closes_that_connection_only() {
    let pki = Pki::new();
    let cfg = server_config(&pki.server, &[&pki.ca.der]);
    let script = vec![Behavior::EchoThenReset { n: 5 }, Behavior::Echo];
    let up = Upstream::start(cfg, script).await;
    let mut proxy = run_cmd(&pki, up.addr).start();

    let mut stream = connect(proxy.addr()).await;
    stream.write_all(b"hello").await.expect("write");
    assert_eq!(read_exact(&mut stream, 5).await, b"hello");
    stream.write_all(b"more!").await.expect("write");
    let (rest, _how) = read_until_closed(&mut stream, WAIT).await;
    assert!(rest.is_empty(), "bytes after the reset: {rest:?}");

    let line = proxy.wait_conn_lines(1)[0].clone();
    let peer = stream.local_addr().unwrap().to_string();
    assert_eq!(
        field(&line, "peer"),
        Some(&*peer),
        "peer= is the app's address: {line}"
    );
    assert_eq!(field(&line, "outcome"), Some("error"), "{line}");
    assert_eq!(field(&line, "reason"), Some("reset"), "{line}");
    assert!(
        line.contains("WARN"),
        "a failed connection logs at WARN: {line}"
    );
    assert_eq!(num_field(&line, "bytes_from_upstream"), 5, "{line}");
    assert_eq!(num_field(&line, "bytes_to_upstream"), 10, "{line}");

    assert_eq!(exchange(proxy.addr(), b"second".to_vec()).await, b"second");
    let lines = proxy.wait_conn_lines(2);
    assert_eq!(field(&lines[1], "outcome"), Some("ok"), "{}", lines[1]);
}

/// Sequential connections share one client config, so the second resumes the TLS session.
#[tokio::test(flavor = "multi_thread")]
async fn second_connection_resumes_the_tls_session() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd(&pki, up.addr)
        .args(["--server-name", "localhost"])
        .start();

    assert_eq!(exchange(proxy.addr(), b"one".to_vec()).await, b"one");
    up.stats.wait_finished(1).await;
    assert_eq!(exchange(proxy.addr(), b"two".to_vec()).await, b"two");

    let conns = up.stats.conns();
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0].kind, Some(HandshakeKind::Full));
    assert_eq!(
        conns[1].kind,
        Some(HandshakeKind::Resumed),
        "the second connection did a full handshake"
    );
    assert_eq!(conns[1].client_cn.as_deref(), Some(CLIENT_CN));
}

/// The default `--tls-min 1.2` still reaches an upstream that speaks only TLS 1.2.
#[tokio::test(flavor = "multi_thread")]
async fn tls12_only_upstream_works() {
    let pki = Pki::new();
    let cfg = crate::support::upstream::server_config_tls12(&pki.server, &[&pki.ca.der]);
    let up = Upstream::start(cfg, vec![Behavior::Echo]).await;
    let proxy = run_cmd(&pki, up.addr).start();
    let data = pattern(12, 300_000);
    assert!(exchange(proxy.addr(), data.clone()).await == data);
    let conns = up.stats.conns();
    assert_eq!(conns[0].version, Some(rustls::ProtocolVersion::TLSv1_2));
    assert_eq!(conns[0].client_cn.as_deref(), Some(CLIENT_CN));
}

/// `--alpn` protocols are offered in order; the upstream picks one it knows.
#[tokio::test(flavor = "multi_thread")]
async fn alpn_is_offered_upstream() {
    let pki = Pki::new();
    let mut cfg = server_config(&pki.server, &[&pki.ca.der]);
    cfg.alpn_protocols = vec![b"second/1".to_vec()];
    let up = Upstream::start(cfg, vec![Behavior::Echo]).await;
    let proxy = run_cmd(&pki, up.addr)
        .args(["--alpn", "first/1", "--alpn", "second/1"])
        .start();
    assert_eq!(exchange(proxy.addr(), b"x".to_vec()).await, b"x");
    assert_eq!(up.stats.conns()[0].alpn.as_deref(), Some(&b"second/1"[..]));
}

/// Without `--ca` the system trust store is used, and `SSL_CERT_FILE` replaces it.
#[tokio::test(flavor = "multi_thread")]
async fn ssl_cert_file_replaces_the_system_trust_store() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let without_ca = |pki: &Pki| {
        Cmd::new()
            .args(["run", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(up.addr.to_string())
            .arg("--cert")
            .arg(&pki.client.cert)
            .arg("--key")
            .arg(&pki.client.key)
    };
    let with_env = without_ca(&pki).env("SSL_CERT_FILE", &pki.ca.pem).start();
    assert_eq!(
        exchange(with_env.addr(), b"trusted".to_vec()).await,
        b"trusted"
    );

    // The test CA is in no system store, so the same upstream is now unknown.
    let mut system = without_ca(&pki).start();
    let mut stream = connect(system.addr()).await;
    expect_closed_without_data(&mut stream, WAIT).await;
    let line = system.wait_conn_lines(1)[0].clone();
    assert_eq!(field(&line, "reason"), Some("unknown_issuer"), "{line}");
    assert_eq!(up.stats.tls_accepted(), 1);
}
