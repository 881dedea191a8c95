//! An inbound http-mode route against hostile or broken clients, over TLS: every sentence of
//! the interface's "Hostile input and limits" that applies to an HTTP listener. Clients that
//! complete TLS and then send no head, or drip one; idle keep-alive connections; stalled
//! request bodies; the h2 bounds (100 streams, 64 KiB header lists, reset floods, a client that
//! never reads); `--max-connections`; the refusal log's rate limit; a client that does not
//! speak TLS; a target whose answer has both `Transfer-Encoding` and `Content-Length`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::support::bounds::{around, frames_until, h1_get, rss};
use crate::support::h2raw;
use crate::support::http::{
    APP_HOST, HttpUpstream, assert_sidecar_error, empty, find, read_raw_reply,
};
use crate::support::inbound::{
    client_config, client_config_alpn, inbound_http_cmd, read_until_end, tls_connect,
};
use crate::support::pki::{CLIENT_CN, LeafSpec};
use crate::support::*;

type Tls = TlsStream<TcpStream>;

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// An inbound http-mode route open to every client of the test CA, in front of `target`.
fn proxy(pki: &Pki, target: SocketAddr, args: &[&str]) -> Sidecar {
    inbound_http_cmd(pki, target)
        .arg("--allow-any-client")
        .args(args)
        .start()
}

/// A TLS connection presenting the test client certificate that agreed on `alpn`.
async fn open(pki: &Pki, addr: SocketAddr, alpn: &[u8]) -> Tls {
    let config = client_config_alpn(pki, Some(&pki.client), &[alpn]);
    let s = tls_connect(addr, config).await.expect("handshake");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(alpn), "ALPN not agreed");
    s
}

/// An h2 connection (ALPN `h2`) that has sent the preface and its SETTINGS.
async fn open_h2(pki: &Pki, addr: SocketAddr) -> Tls {
    let mut s = open(pki, addr, b"h2").await;
    s.write_all(&h2raw::hello()).await.expect("write preface");
    s
}

// ---------------------------------------------------------------------------------------------
// Heads and idle connections

/// `--header-timeout 2s`: after a complete TLS handshake, an HTTP/1.1 client that sends
/// nothing, one that drips a request head a byte a second (slow loris) and an h2 client that
/// sends only the preface are all closed after about 2 s, unanswered; nothing reaches the target.
#[tokio::test(flavor = "multi_thread")]
async fn silent_and_slow_loris_clients_are_closed_at_header_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &["--header-timeout", "2s"]);
    let started = Instant::now();
    let mut silent = open(&pki, proxy.addr(), b"http/1.1").await;
    let loris = open(&pki, proxy.addr(), b"http/1.1").await;
    let mut preface_only = open_h2(&pki, proxy.addr()).await;
    let (mut loris_rd, mut loris_wr) = tokio::io::split(loris);
    let dripper = tokio::spawn(async move {
        let head = format!("GET / HTTP/1.1\r\nHost: {APP_HOST}\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa");
        for b in head.as_bytes() {
            if loris_wr.write_all(&[*b]).await.is_err() || loris_wr.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tokio::time::sleep(WAIT).await;
    });
    let got = read_until_end(&mut silent, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "the silent client got {got:?}");
    around(
        "the silent client was closed",
        started.elapsed(),
        Duration::from_secs(2),
        Duration::from_secs(3),
    );
    let got = read_until_end(&mut loris_rd, Duration::from_secs(10)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200"),
        "the slow-loris client was answered: {got:?}"
    );
    around(
        "the slow-loris client was closed",
        started.elapsed(),
        Duration::from_secs(2),
        Duration::from_secs(3),
    );
    dripper.abort();
    let answer = frames_until(&mut preface_only, Duration::from_secs(10), |f| {
        f.kind == h2raw::HEADERS
    })
    .await;
    assert!(answer.is_none(), "the preface-only client got {answer:?}");
    around(
        "the preface-only h2 client was closed",
        started.elapsed(),
        Duration::from_secs(2),
        Duration::from_secs(3),
    );
    assert_eq!(target.stats.request_count(), 0);
}

/// `--header-timeout 1s --idle-timeout 3s`: a keep-alive connection idle for 2 s between
/// requests still serves the next one, and is closed about 3 s after its last answer.
#[tokio::test(flavor = "multi_thread")]
async fn idle_keepalive_is_closed_at_idle_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(
        &pki,
        target.addr,
        &["--header-timeout", "1s", "--idle-timeout", "3s"],
    );
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    assert_eq!(h1_get(&mut c, "/first").await, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h1_get(&mut c, "/second").await,
        200,
        "a keep-alive connection idle for 2 s (over --header-timeout) must still serve"
    );
    let idle = Instant::now();
    let got = read_until_end(&mut c, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "the idle connection got {got:?}");
    around(
        "the idle keep-alive connection was closed",
        idle.elapsed(),
        Duration::from_secs(3),
        Duration::from_secs(3),
    );
}

/// `--idle-timeout 1s`: a request body that stops after 10 of 100000 announced bytes is
/// aborted: the client's connection is closed unanswered with 200 and the target sees its
/// request cut off (its connection closes mid-body), never completed.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_request_body_is_aborted_at_idle_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &["--idle-timeout", "1s"]);
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    let stalled = Instant::now();
    c.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: {APP_HOST}\r\nContent-Length: 100000\r\n\r\n0123456789"
        )
        .as_bytes(),
    )
    .await
    .expect("write request");
    let seen = target.stats.wait_requests(1).await;
    let got = read_until_end(&mut c, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.starts_with("HTTP/1.1 200"),
        "a stalled upload was answered as complete: {text:?}"
    );
    around(
        "the stalled upload was aborted",
        stalled.elapsed(),
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    target.stats.wait_closed(seen[0].conn, WAIT).await;
    assert_eq!(target.stats.upload_bytes.load(Ordering::SeqCst), 10);
}

/// HTTP/1.1 request headers over 64 KiB get `431` and never reach the target; 32 KiB pass.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_h1_request_headers_get_431() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    for (size, want) in [(100 * 1024, 431), (32 * 1024, 200)] {
        let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
        let big = "a".repeat(size);
        let req = format!("GET /big HTTP/1.1\r\nHost: {APP_HOST}\r\nx-big: {big}\r\n\r\n");
        // The sidecar may answer before reading it all.
        let _ = c.write_all(req.as_bytes()).await;
        let mut buf = Vec::new();
        let status = read_raw_reply(&mut c, &mut buf, WAIT).await.status;
        assert_eq!(status, want, "{size} bytes of request headers");
    }
    assert_eq!(target.stats.request_count(), 1);
}

/// `--header-timeout 1s --idle-timeout 30s`: on a keep-alive connection, a later request head
/// that starts and stalls is closed at `--header-timeout`, not left to the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn later_head_that_stalls_is_closed_at_header_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(
        &pki,
        target.addr,
        &["--header-timeout", "1s", "--idle-timeout", "30s"],
    );
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    assert_eq!(h1_get(&mut c, "/first").await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    c.write_all(b"GET /second HT").await.expect("write");
    let got = read_until_end(&mut c, Duration::from_secs(10)).await;
    assert!(got.is_empty(), "the stalled head got {got:?}");
    around(
        "the stalled second head was closed",
        started.elapsed(),
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    assert_eq!(target.stats.request_count(), 1);
}

/// `--header-timeout 1s --idle-timeout 2s`: an h2 connection with no stream open gets GOAWAY
/// and is closed at the idle timeout (not at the header timeout).
#[tokio::test(flavor = "multi_thread")]
async fn idle_h2_connection_gets_goaway_at_idle_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(
        &pki,
        target.addr,
        &["--header-timeout", "1s", "--idle-timeout", "2s"],
    );
    let mut c = open_h2(&pki, proxy.addr()).await;
    c.write_all(&h2raw::get(1, "/", &[]))
        .await
        .expect("write request");
    let end = frames_until(&mut c, WAIT, |f| {
        f.stream == 1 && f.flags & h2raw::END_STREAM != 0
    })
    .await;
    assert!(end.is_some(), "no complete response");
    let idle = Instant::now();
    let goaway = frames_until(&mut c, Duration::from_secs(10), |f| f.kind == h2raw::GOAWAY).await;
    assert!(goaway.is_some(), "closed without GOAWAY");
    around(
        "GOAWAY on the idle h2 connection",
        idle.elapsed(),
        Duration::from_secs(2),
        Duration::from_secs(2),
    );
    let _ = read_until_end(&mut c, Duration::from_secs(5)).await;
}

/// h2: a request body that stalls is aborted at `--idle-timeout` even while the connection as
/// a whole stays busy (a PING every 200 ms): the stream ends without a 200 and the target's
/// connection is cut mid-body.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_h2_request_body_is_aborted_while_the_connection_is_busy() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &["--idle-timeout", "1s"]);
    let c = open_h2(&pki, proxy.addr()).await;
    let (mut rd, mut wr) = tokio::io::split(c);
    let mut block = h2raw::get_block("/upload", &[("content-length", b"100000")]);
    block[0] = 0x83; // :method POST (static table)
    let mut bytes = h2raw::frame(h2raw::HEADERS, h2raw::END_HEADERS, 1, &block);
    bytes.extend(h2raw::frame(0 /* DATA */, 0, 1, b"0123456789"));
    wr.write_all(&bytes).await.expect("write request");
    let stalled = Instant::now();
    let pinger = tokio::spawn(async move {
        for i in 0u64..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let ping = h2raw::frame(6 /* PING */, 0, 0, &i.to_be_bytes());
            if wr.write_all(&ping).await.is_err() {
                break;
            }
        }
    });
    let seen = target.stats.wait_requests(1).await;
    let end = frames_until(&mut rd, Duration::from_secs(8), |f| {
        f.stream == 1 && (f.kind == h2raw::RST_STREAM || f.kind == h2raw::HEADERS)
    })
    .await
    .expect("the connection ended instead of the stream");
    if end.kind == h2raw::HEADERS {
        // An indexed `:status 200` is 0x88; anything else is an error answer.
        assert_ne!(
            end.payload.first(),
            Some(&0x88),
            "a stalled upload was answered 200"
        );
    }
    around(
        "the stalled h2 upload was aborted",
        stalled.elapsed(),
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    target.stats.wait_closed(seen[0].conn, WAIT).await;
    assert_eq!(target.stats.upload_bytes.load(Ordering::SeqCst), 10);
    pinger.abort();
}

// ---------------------------------------------------------------------------------------------
// Identity cannot be forged or mixed up

/// The identity header the target must see for `leaf` (`CN=cn`, no SANs).
fn xfcc_of(leaf: &crate::support::pki::Identity, cn: &str) -> String {
    format!("Hash={};Subject=\"CN={cn}\";URI=", hex(&sha256(&leaf.der)))
}

/// Two clients with different certificates take turns on one route whose target connections
/// are pooled and shared (`--pool-max-connections 1`): every request the target sees carries
/// exactly one `X-Forwarded-Client-Cert`, its own sender's, never the other's or a forged one.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_target_connections_never_mix_up_identities() {
    let pki = Pki::new();
    let other = pki.leaf(&pki.ca, "other", LeafSpec::client("other-client"));
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &["--pool-max-connections", "1"]);
    let ids = [(&pki.client, CLIENT_CN), (&other, "other-client")];
    let mut conns = Vec::new();
    for (id, _) in ids {
        let config = client_config_alpn(&pki, Some(id), &[b"http/1.1"]);
        conns.push(tls_connect(proxy.addr(), config).await.expect("handshake"));
    }
    for round in 0..3 {
        for (n, c) in conns.iter_mut().enumerate() {
            let req = format!(
                "GET /r HTTP/1.1\r\nHost: {APP_HOST}\r\nx-request-id: c{n}-{round}\r\n\
                 X-Forwarded-Client-Cert: Hash=00;URI=spiffe://example.org/forged\r\n\r\n"
            );
            c.write_all(req.as_bytes()).await.expect("write");
            let mut buf = Vec::new();
            let reply = read_raw_reply(c, &mut buf, WAIT).await;
            assert_eq!(reply.status, 200, "{reply:?}");
        }
    }
    let seen = target.stats.requests();
    assert_eq!(seen.len(), 6, "{seen:#?}");
    for s in &seen {
        let n: usize = s.id().expect("request id")[1..2]
            .parse()
            .expect("client number");
        let (leaf, cn) = ids[n];
        assert_eq!(
            s.all("x-forwarded-client-cert"),
            vec![xfcc_of(leaf, cn)],
            "{s:#?}"
        );
    }
    let shared = (0..target.stats.conns().len()).any(|conn| {
        let on: Vec<&str> = seen
            .iter()
            .filter(|s| s.conn == conn)
            .filter_map(|s| s.id())
            .collect();
        on.iter().any(|i| i.starts_with("c0")) && on.iter().any(|i| i.starts_with("c1"))
    });
    assert!(
        shared,
        "no target connection carried both clients' requests: {seen:#?}"
    );
}

/// A client that resumes its TLS session (a 1.3 ticket, a 1.2 session id) is still named on
/// every request: the resumed connection's requests carry the same identity header as the
/// full handshake's.
#[tokio::test(flavor = "multi_thread")]
async fn resumed_sessions_carry_the_same_identity() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let want = xfcc_of(&pki.client, CLIENT_CN);
    for (name, version) in [
        ("1.3", &rustls::version::TLS13),
        ("1.2", &rustls::version::TLS12),
    ] {
        init_crypto();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.der.clone()).expect("add CA");
        let mut config = rustls::ClientConfig::builder_with_protocol_versions(&[version])
            .with_root_certificates(roots)
            .with_client_auth_cert(pki.client.chain(), pki.client.key_der())
            .expect("client cert");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = std::sync::Arc::new(config);
        let mut kinds = Vec::new();
        for n in 0..2 {
            let mut c = tls_connect(proxy.addr(), config.clone())
                .await
                .expect("handshake");
            let req = format!(
                "GET /resume HTTP/1.1\r\nHost: {APP_HOST}\r\nx-request-id: {name}-{n}\r\n\r\n"
            );
            c.write_all(req.as_bytes()).await.expect("write");
            let mut buf = Vec::new();
            assert_eq!(read_raw_reply(&mut c, &mut buf, WAIT).await.status, 200);
            kinds.push(c.get_ref().1.handshake_kind());
        }
        assert_eq!(
            kinds[1],
            Some(rustls::HandshakeKind::Resumed),
            "TLS {name}: the second connection did not resume ({kinds:?})"
        );
        for (n, kind) in kinds.iter().enumerate() {
            let seen = target.stats.request(&format!("{name}-{n}"));
            assert_eq!(
                seen.all("x-forwarded-client-cert"),
                vec![want.as_str()],
                "TLS {name}, connection {n} ({kind:?})"
            );
        }
    }
}

/// A request smuggling attempt (`Transfer-Encoding: chunked` with `Content-Length`, a second
/// request with a forged identity header hidden after the chunked body's end): whatever the
/// route makes of the framing, every request that reaches the target carries the sender's own
/// identity and no forged one.
#[tokio::test(flavor = "multi_thread")]
async fn smuggled_request_never_reaches_the_target_with_a_forged_identity() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    let smuggle = format!(
        "POST /upload HTTP/1.1\r\nHost: {APP_HOST}\r\nTransfer-Encoding: chunked\r\n\
         Content-Length: 4\r\n\r\n0\r\n\r\n\
         GET /smuggled HTTP/1.1\r\nHost: {APP_HOST}\r\n\
         X-Forwarded-Client-Cert: Hash=00;URI=spiffe://example.org/admin\r\n\r\n"
    );
    let _ = c.write_all(smuggle.as_bytes()).await;
    // Read whatever comes back for a while; the connection may stay open (keep-alive).
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = c.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while target.stats.request_count() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let want = xfcc_of(&pki.client, CLIENT_CN);
    for s in target.stats.requests() {
        assert_eq!(
            s.all("x-forwarded-client-cert"),
            vec![want.as_str()],
            "{s:#?}"
        );
    }
}

/// A client that names the identity headers in `Connection` (asking a proxy to drop them as
/// hop-by-hop) does not make the target lose them: the target still sees the route's own
/// `X-Forwarded-Client-Cert`, `X-Forwarded-Proto` and `X-Forwarded-For`.
#[tokio::test(flavor = "multi_thread")]
async fn connection_header_cannot_strip_the_identity_headers() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    c.write_all(
        format!(
            "GET /hop HTTP/1.1\r\nHost: {APP_HOST}\r\nConnection: keep-alive, \
             X-Forwarded-Client-Cert, X-Forwarded-For, X-Forwarded-Proto\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    assert_eq!(read_raw_reply(&mut c, &mut buf, WAIT).await.status, 200);
    let seen = target.stats.wait_requests(1).await;
    let want = xfcc_of(&pki.client, CLIENT_CN);
    assert_eq!(
        seen[0].all("x-forwarded-client-cert"),
        vec![want.as_str()],
        "{seen:#?}"
    );
    assert_eq!(seen[0].all("x-forwarded-proto"), vec!["https"], "{seen:#?}");
    assert_eq!(
        seen[0].all("x-forwarded-for"),
        vec!["127.0.0.1"],
        "{seen:#?}"
    );
}

/// A forged identity under a name with underscores (`X_Forwarded_Client_Cert`), which CGI,
/// WSGI, Rack and PHP turn into the same variable as the real header
/// (`HTTP_X_FORWARDED_CLIENT_CERT`), never reaches the target: the interface is silent, nginx
/// drops headers with underscores by default, and the safer choice is to drop them (at least
/// those that collide with the identity headers).
#[tokio::test(flavor = "multi_thread")]
async fn underscore_variant_of_the_identity_header_never_reaches_the_target() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut c = open(&pki, proxy.addr(), b"http/1.1").await;
    c.write_all(
        format!(
            "GET /underscore HTTP/1.1\r\nHost: {APP_HOST}\r\n\
             X_Forwarded_Client_Cert: Hash=00;URI=spiffe://example.org/admin\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let status = read_raw_reply(&mut c, &mut buf, WAIT).await.status;
    if status == 400 {
        return;
    }
    assert_eq!(status, 200);
    let seen = target.stats.wait_requests(1).await;
    assert!(
        seen[0].all("x_forwarded_client_cert").is_empty(),
        "the forged underscore header reached the target: {seen:#?}"
    );
}

/// A client certificate whose names try to inject fields into the identity header: a subject
/// `CN` holding `"`, `,` and `;`, and a URI SAN holding `;URI=...`. The target sees one
/// `Subject` with those characters escaped as OpenSSL's RFC 2253 printer does and the URI
/// double-quoted (Envoy's rule for a value holding `,;="\\`), so no extra `URI=` appears.
#[tokio::test(flavor = "multi_thread")]
async fn certificate_names_cannot_inject_fields_into_xfcc() {
    let pki = Pki::new();
    let uri = "spiffe://example.org/ns/a;URI=spiffe://example.org/admin";
    let spec = LeafSpec {
        uris: &[uri],
        ..LeafSpec::client("evil\",URI=spiffe://x;DNS=y")
    };
    let evil = pki.leaf(&pki.ca, "evil", spec);
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let config = client_config_alpn(&pki, Some(&evil), &[b"http/1.1"]);
    let mut c = tls_connect(proxy.addr(), config).await.expect("handshake");
    assert_eq!(h1_get(&mut c, "/evil").await, 200);
    let want = format!(
        "Hash={};Subject=\"CN=evil\\\"\\,URI=spiffe://x\\;DNS=y\";URI=\"{uri}\"",
        hex(&sha256(&evil.der))
    );
    let seen = target.stats.wait_requests(1).await;
    assert_eq!(seen[0].all("x-forwarded-client-cert"), vec![want.as_str()]);
}

/// A client certificate whose URI SAN holds a newline and a fake header line: no header is
/// injected at the target (the request is refused, or forwarded with an identity header that
/// carries no raw control character), and the access line escapes the name, so no log line
/// starts with the injected text.
#[tokio::test(flavor = "multi_thread")]
async fn control_characters_in_certificate_names_inject_neither_headers_nor_log_lines() {
    let pki = Pki::new();
    let uri = "spiffe://example.org/a\r\nInjected: yes";
    let spec = LeafSpec {
        uris: &[uri],
        ..LeafSpec::client("ctl")
    };
    let ctl = pki.leaf(&pki.ca, "ctl", spec);
    let target = HttpUpstream::plain().await;
    let mut proxy = proxy(&pki, target.addr, &[]);
    let config = client_config_alpn(&pki, Some(&ctl), &[b"http/1.1"]);
    if let Ok(mut c) = tls_connect(proxy.addr(), config).await {
        let _ = c
            .write_all(format!("GET /ctl HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n").as_bytes())
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf).await;
        })
        .await;
        drop(c);
    }
    let line = blocking(|| proxy.wait_conn_lines(1)).remove(0);
    assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
    assert!(
        !proxy
            .stderr_lines()
            .iter()
            .any(|l| l.starts_with("Injected")),
        "{}",
        proxy.stderr()
    );
    for s in target.stats.requests() {
        assert!(s.get("injected").is_none(), "a header was injected: {s:#?}");
        for v in s.all("x-forwarded-client-cert") {
            assert!(!v.chars().any(char::is_control), "{s:#?}");
        }
    }
}

/// The client above (a URI SAN with control characters, which the header cannot carry): its
/// request must not reach the target without any identity header, as if no certificate had
/// been checked. Refusing it (an error answer or a closed connection) is the safe choice.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_identity_cannot_be_written_is_not_forwarded_without_one() {
    let pki = Pki::new();
    let spec = LeafSpec {
        uris: &["spiffe://example.org/a\r\nInjected: yes"],
        ..LeafSpec::client("ctl")
    };
    let ctl = pki.leaf(&pki.ca, "ctl", spec);
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let config = client_config_alpn(&pki, Some(&ctl), &[b"http/1.1"]);
    if let Ok(mut c) = tls_connect(proxy.addr(), config).await {
        let _ = c
            .write_all(format!("GET /ctl HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n").as_bytes())
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
    for s in target.stats.requests() {
        assert_eq!(s.all("x-forwarded-client-cert").len(), 1, "{s:#?}");
    }
}

// ---------------------------------------------------------------------------------------------
// h2 bounds

/// 150 streams opened at once on one h2 connection (ignoring the server's SETTINGS): 50 are
/// refused with `REFUSED_STREAM`, and no more than 100 reach the target.
#[tokio::test(flavor = "multi_thread")]
async fn h2_streams_beyond_100_are_refused() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut c = open_h2(&pki, proxy.addr()).await;
    let mut bytes = Vec::new();
    for i in 0..150u32 {
        bytes.extend(h2raw::get(2 * i + 1, "/hold", &[]));
    }
    c.write_all(&bytes).await.expect("write requests");
    let mut refused = 0;
    let end = frames_until(&mut c, WAIT, |f| {
        if f.kind == h2raw::RST_STREAM && f.error_code() == Some(h2raw::REFUSED_STREAM) {
            refused += 1;
        }
        refused == 50 || f.kind == h2raw::GOAWAY
    })
    .await;
    assert_eq!(refused, 50, "ended with {end:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = target.stats.request_count();
    assert!(reached <= 100, "{reached} requests reached the target");
    target.release();
}

/// A 100 KiB header list on h2 is refused (an error answer, a stream reset or GOAWAY) and never
/// reaches the target; a normal request on a new connection still works.
#[tokio::test(flavor = "multi_thread")]
async fn h2_header_list_over_64k_is_refused() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut c = open_h2(&pki, proxy.addr()).await;
    let big = vec![b'a'; 100 * 1024];
    c.write_all(&h2raw::get(1, "/big", &[("x-big", &big)]))
        .await
        .expect("write request");
    let answer = frames_until(&mut c, WAIT, |f| {
        f.kind == h2raw::GOAWAY
            || (f.stream == 1 && matches!(f.kind, h2raw::HEADERS | h2raw::RST_STREAM))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.stats.request_count(), 0, "answer {answer:?}");
    let mut ok = open_h2(&pki, proxy.addr()).await;
    ok.write_all(&h2raw::get(1, "/small", &[("x-small", b"1")]))
        .await
        .expect("write request");
    let end = frames_until(&mut ok, WAIT, |f| {
        f.stream == 1 && f.flags & h2raw::END_STREAM != 0
    })
    .await;
    assert!(end.is_some(), "the normal request was not answered");
    assert_eq!(target.stats.request_count(), 1);
}

/// A CONTINUATION flood: a HEADERS frame without END_HEADERS followed by 32 MiB of
/// CONTINUATION frames that never end the block. The connection is ended (GOAWAY or a close)
/// long before the flood is through, the sidecar's memory does not follow the flood, nothing
/// reaches the target, and other clients are served.
#[tokio::test(flavor = "multi_thread")]
async fn h2_continuation_flood_ends_the_connection_with_bounded_memory() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let mut warm = open(&pki, proxy.addr(), b"http/1.1").await;
    assert_eq!(h1_get(&mut warm, "/warm").await, 200);
    drop(warm);
    let before = rss(proxy.pid());
    let c = open_h2(&pki, proxy.addr()).await;
    let (mut rd, mut wr) = tokio::io::split(c);
    let writer = tokio::spawn(async move {
        let mut head = h2raw::get_block("/cont", &[]);
        head.extend([0x00, 0x01, b'x', 0x01, b'y']);
        if wr
            .write_all(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &head))
            .await
            .is_err()
        {
            return 0usize;
        }
        // 16 KiB of literal fields `x-NNNN: aaaa...` per frame, never END_HEADERS.
        let mut block = Vec::new();
        while block.len() < 16 * 1024 - 64 {
            block.extend([0x00, 0x06]);
            block.extend(format!("x-{:04}", block.len() % 10_000).as_bytes());
            block.extend([0x20]);
            block.extend([b'a'; 32]);
        }
        let cont = h2raw::frame(h2raw::CONTINUATION, 0, 1, &block);
        let mut sent = 0;
        for _ in 0..2048 {
            if wr.write_all(&cont).await.is_err() {
                break;
            }
            sent += cont.len();
        }
        sent
    });
    let end = frames_until(&mut rd, Duration::from_secs(30), |f| {
        f.kind == h2raw::GOAWAY || (f.stream == 1 && f.kind == h2raw::HEADERS)
    })
    .await;
    if let Some(f) = &end {
        assert_eq!(
            f.kind,
            h2raw::GOAWAY,
            "the flooded stream was answered: {f:?}"
        );
    }
    let sent = tokio::time::timeout(WAIT, writer)
        .await
        .expect("the flood writer did not stop")
        .expect("writer task");
    let growth = rss(proxy.pid()).saturating_sub(before);
    eprintln!("CONTINUATION flood: {sent} bytes written, ended by {end:?}, rss growth {growth}");
    assert!(
        sent < 32 * 1024 * 1024,
        "the whole 32 MiB flood was accepted"
    );
    assert!(
        growth < 8 * 1024 * 1024,
        "the flood grew the sidecar by {growth} bytes"
    );
    assert_eq!(target.stats.request_count(), 1);
    let mut other = open(&pki, proxy.addr(), b"http/1.1").await;
    assert_eq!(h1_get(&mut other, "/after").await, 200);
}

/// At most this many of a 5000-stream reset flood may reach the target before the connection
/// ends.
const RESET_FLOOD_REACHED_LIMIT: usize = 200;

/// A rapid-reset flood (HEADERS then RST_STREAM, 5000 times) ends the connection with GOAWAY
/// `ENHANCE_YOUR_CALM`; only a bounded number of those requests reach the target, and the
/// route keeps serving other clients.
#[tokio::test(flavor = "multi_thread")]
async fn h2_rapid_reset_flood_gets_goaway_and_the_target_sees_a_bounded_number() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let c = open_h2(&pki, proxy.addr()).await;
    let (mut rd, mut wr) = tokio::io::split(c);
    let mut bytes = Vec::new();
    for i in 0..5000u32 {
        bytes.extend(h2raw::get(2 * i + 1, "/hold", &[]));
        bytes.extend(h2raw::rst_stream(2 * i + 1, h2raw::CANCEL));
    }
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        tokio::time::sleep(WAIT).await;
    });
    let goaway = frames_until(&mut rd, WAIT, |f| f.kind == h2raw::GOAWAY).await;
    writer.abort();
    let goaway = goaway.expect("the flood ended without GOAWAY");
    assert_eq!(
        goaway.error_code(),
        Some(h2raw::ENHANCE_YOUR_CALM),
        "{goaway:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reached = target.stats.request_count();
    eprintln!("reset flood: {reached} of 5000 requests reached the target");
    assert!(
        reached <= RESET_FLOOD_REACHED_LIMIT,
        "{reached} of 5000 reset requests reached the target"
    );
    target.release();
    let mut other = open(&pki, proxy.addr(), b"http/1.1").await;
    assert_eq!(h1_get(&mut other, "/after").await, 200);
}

/// What 100 never-read streams may cost: as for the outbound app side (hostile_httpsrv, 4 MiB:
/// about 1 MiB of response data plus the bookkeeping of 100 open streams, with allocator
/// noise), plus the TLS of the hog and of the 20 other clients' handshakes meanwhile. Measured
/// 2.3 to 2.8 MiB alone, up to 4.3 MiB with the other inbound tests running beside it; without
/// the bounds the 100 streams of 4 MiB would cost hundreds of MiB.
const HUNDRED_STREAMS_LIMIT: u64 = 6 * 1024 * 1024;

/// An h2 client that opens its flow-control windows to the maximum, asks for 100 downloads of
/// 4 MiB each and never reads: the sidecar's resident memory grows by at most
/// [`HUNDRED_STREAMS_LIMIT`], and other clients' requests on the route still complete.
#[tokio::test(flavor = "multi_thread")]
async fn never_reading_h2_client_with_100_streams_costs_bounded_memory() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &[]);
    let addr = proxy.addr();
    // Warm up allocator arenas, TLS and the target pool with a few transfers.
    for i in 0..4 {
        let mut c = open(&pki, addr, b"http/1.1").await;
        let path = format!("/download?len=1048576&seed={i}");
        assert_eq!(h1_get(&mut c, &path).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss(proxy.pid());

    let mut hog = open(&pki, addr, b"h2").await;
    let mut bytes = h2raw::PREFACE.to_vec();
    bytes.extend(h2raw::settings(&[(
        h2raw::SETTINGS_INITIAL_WINDOW_SIZE,
        0x7fff_ffff,
    )]));
    bytes.extend(h2raw::window_update(0, 0x7fff_ffff - 65_535));
    for i in 0..100u32 {
        bytes.extend(h2raw::get(2 * i + 1, "/download?len=4194304&seed=9", &[]));
    }
    hog.write_all(&bytes).await.expect("write requests");
    target.stats.wait_requests(5).await;

    let mut peak = before;
    for i in 0..20 {
        let mut c = open(&pki, addr, b"http/1.1").await;
        assert_eq!(
            h1_get(&mut c, &format!("/download?len=65536&seed={i}")).await,
            200,
            "another client's request while one client does not read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss(proxy.pid()));
    }
    let growth = peak.saturating_sub(before);
    eprintln!(
        "inbound h2, 100 never-read streams: rss before {before} peak {peak} growth {growth}, \
         {} requests at the target",
        target.stats.request_count()
    );
    assert!(
        growth <= HUNDRED_STREAMS_LIMIT,
        "one never-reading client grew the sidecar by {growth} bytes (limit {HUNDRED_STREAMS_LIMIT})"
    );
    drop(hog);
}

// ---------------------------------------------------------------------------------------------
// Connections and refusals

/// `--max-connections 2`: while two TLS clients are connected a third is not served (its
/// handshake does not even complete); when one of the two closes, the third is served.
#[tokio::test(flavor = "multi_thread")]
async fn max_connections_holds_the_next_client_until_one_closes() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(&pki, target.addr, &["--max-connections", "2"]);
    let addr = proxy.addr();
    let mut first = open(&pki, addr, b"http/1.1").await;
    let mut second = open(&pki, addr, b"http/1.1").await;
    assert_eq!(h1_get(&mut first, "/one").await, 200);
    assert_eq!(h1_get(&mut second, "/two").await, 200);
    let config = client_config_alpn(&pki, Some(&pki.client), &[b"http/1.1"]);
    let third = tokio::spawn(async move {
        let mut s = tls_connect(addr, config).await.expect("handshake");
        h1_get(&mut s, "/three").await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !third.is_finished(),
        "a third client was served while two were connected"
    );
    assert_eq!(target.stats.request_count(), 2);
    drop(first);
    let status = tokio::time::timeout(WAIT, third)
        .await
        .expect("the third client was not served after one closed")
        .expect("third client task");
    assert_eq!(status, 200);
    assert_eq!(h1_get(&mut second, "/two-again").await, 200);
}

/// `--max-connections 2 --handshake-timeout 1s`: two TCP clients that never start TLS hold
/// both slots only until the handshake timeout; a real client waiting behind them is then
/// served, about a second later.
#[tokio::test(flavor = "multi_thread")]
async fn silent_tcp_clients_hold_slots_only_until_the_handshake_timeout() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let proxy = proxy(
        &pki,
        target.addr,
        &["--max-connections", "2", "--handshake-timeout", "1s"],
    );
    let addr = proxy.addr();
    let started = Instant::now();
    let mut silent = [connect(addr).await, connect(addr).await];
    let config = client_config_alpn(&pki, Some(&pki.client), &[b"http/1.1"]);
    let real = tokio::spawn(async move {
        let mut s = tls_connect(addr, config).await.expect("handshake");
        h1_get(&mut s, "/behind").await
    });
    let status = tokio::time::timeout(WAIT, real)
        .await
        .expect("the real client was never served")
        .expect("client task");
    assert_eq!(status, 200);
    around(
        "the real client was served",
        started.elapsed(),
        Duration::from_secs(1),
        Duration::from_secs(3),
    );
    for s in &mut silent {
        let got = read_until_end(s, WAIT).await;
        assert!(got.is_empty(), "a silent client got {got:?}");
    }
}

/// A flood of clients without a certificate for 3 s: each is refused, but refusal lines are
/// logged at most about once a second, and the lines plus their `suppressed=` counts add up to
/// every refused connection.
#[tokio::test(flavor = "multi_thread")]
async fn refused_handshake_flood_is_logged_at_most_once_a_second_with_a_count() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let mut proxy = proxy(&pki, target.addr, &[]);
    let addr = proxy.addr();
    let config = client_config(&pki, None);
    let started = Instant::now();
    let mut made = 0u64;
    while started.elapsed() < Duration::from_secs(3) {
        if let Ok(mut s) = tls_connect(addr, config.clone()).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let _ = read_until_end(&mut s, WAIT).await;
        }
        made += 1;
    }
    // One more after a pause, so the last second's count is flushed into a line.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    if let Ok(mut s) = tls_connect(addr, config.clone()).await {
        let _ = read_until_end(&mut s, WAIT).await;
    }
    made += 1;
    assert!(made > 20, "the flood made only {made} connections");
    let is_refusal = |l: &str| is_conn_line(l) && field(l, "reason") == Some("no_client_cert");
    let deadline = Instant::now() + WAIT;
    let (lines, counted) = loop {
        let lines: Vec<String> = proxy
            .stderr_lines()
            .into_iter()
            .filter(|l| is_refusal(l))
            .collect();
        let counted: u64 = lines
            .iter()
            .map(|l| {
                1 + field(l, "suppressed")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .sum();
        if counted >= made || Instant::now() >= deadline {
            break (lines, counted);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        counted,
        made,
        "lines + suppressed counts vs connections made:\n{}",
        lines.join("\n")
    );
    assert!(
        (2..=6).contains(&lines.len()),
        "{} refusal lines for {made} refused connections:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(proxy.try_exit().is_none(), "{}", proxy.stderr());
    assert_eq!(target.stats.request_count(), 0);
}

/// A client that speaks plain HTTP to the TLS listener is closed with `reason=protocol`, and
/// the target sees nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_speak_tls_is_refused_as_protocol() {
    let pki = Pki::new();
    let target = HttpUpstream::plain().await;
    let mut proxy = proxy(&pki, target.addr, &[]);
    let mut s = connect(proxy.addr()).await;
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n").as_bytes())
        .await;
    let got = read_until_end(&mut s, WAIT).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1"),
        "a plaintext client got an HTTP answer: {got:?}"
    );
    let line = blocking(|| proxy.wait_conn_lines(1)).remove(0);
    assert_eq!(field(&line, "reason"), Some("protocol"), "{line}");
    assert_eq!(field(&line, "outcome"), Some("tls_error"), "{line}");
    assert_eq!(target.stats.tcp_accepted.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Framing

/// `chunked` and `Content-Length: 5` together, the chunked body being 26 bytes.
const TE_AND_CL: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
transfer-encoding: chunked\r\ncontent-length: 5\r\nconnection: close\r\n\r\n\
1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n";

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

/// A plaintext target that answers every request head with [`TE_AND_CL`] and closes.
async fn te_and_cl_target() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
    let addr = l.local_addr().expect("target addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while find(&head, b"\r\n\r\n").is_none() {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(TE_AND_CL).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Sends one GET over `tls` with hyper (HTTP/1.1 or h2 as agreed) and checks the answer is the
/// sidecar's own `502 protocol` or the whole 26-byte body read to a clean end: never a shorter
/// body presented as complete.
async fn assert_whole_or_502(tls: Tls, what: &str) {
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let req = hyper::Request::builder()
        .uri(format!("https://{APP_HOST}/te-cl"))
        .body(empty())
        .expect("request");
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        tokio::time::timeout(WAIT, send.send_request(req)).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        let req = {
            let (mut parts, body) = req.into_parts();
            parts.uri = "/te-cl".parse().expect("uri");
            parts
                .headers
                .insert(hyper::header::HOST, APP_HOST.parse().expect("host"));
            hyper::Request::from_parts(parts, body)
        };
        tokio::time::timeout(WAIT, send.send_request(req)).await
    };
    let resp = resp
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{what}: the body did not end within {WAIT:?}"));
    match body {
        // A body cut off with an error was not presented as complete: acceptable.
        Err(_) => {}
        Ok(b) if status == 502 => {
            let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
            assert_sidecar_error(status, content_type.as_deref(), &text, 502, "protocol");
        }
        Ok(b) => {
            assert_eq!(status, 200, "{what}");
            assert_eq!(
                &b.to_bytes()[..],
                ALPHABET,
                "{what}: the client got a different body as complete"
            );
        }
    }
}

/// A target answer with both `Transfer-Encoding` and `Content-Length` reaches neither an
/// HTTP/1.1 nor an h2 client truncated to the `Content-Length` as if complete.
#[tokio::test(flavor = "multi_thread")]
async fn target_answer_with_te_and_content_length_is_never_truncated() {
    let pki = Pki::new();
    let (target, task) = te_and_cl_target().await;
    let proxy = proxy(&pki, target, &[]);
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let tls = open(&pki, proxy.addr(), alpn).await;
        assert_whole_or_502(tls, &String::from_utf8_lossy(alpn)).await;
    }
    task.abort();
}
