//! Hostile and broken peers on the upstream side: `check` against an upstream that talks past
//! its close_notify or says nothing, peer certificate text with terminal escapes, memory held
//! by tcp-mode connections whose app stops reading, and TCP keepalive on upstream sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::support::pki::LeafSpec;
use crate::support::upstream::server_config;
use crate::support::*;

/// `check` towards `upstream` as the test client, trusting the test CA.
fn check_cmd(pki: &Pki, upstream: impl std::fmt::Display) -> Cmd {
    Cmd::new()
        .args(["check", "--upstream"])
        .arg(upstream.to_string())
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
}

/// User + system CPU time of a live process, from `/proc/PID/stat`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Runs `cmd` to exit (off the runtime's threads) and returns how long it took, the most CPU
/// ticks it was seen to use, its exit code and the process handle (for its output). Fails if
/// it runs longer than `limit`.
async fn run_bounded(cmd: Cmd, limit: Duration) -> (Duration, u64, Option<i32>, Sidecar) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut proc = cmd.spawn();
        let mut ticks = 0;
        loop {
            if let Some(status) = proc.try_exit() {
                proc.wait_output_closed();
                return (started.elapsed(), ticks, status.code(), proc);
            }
            if let Some(t) = cpu_ticks(proc.pid()) {
                ticks = ticks.max(t);
            }
            if started.elapsed() > limit {
                proc.fail(&format!(
                    "still running after {limit:?}, {ticks} CPU ticks used"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .expect("check runner")
}

/// An upstream that completes the handshake (TLS 1.3, no session tickets, so `check` waits
/// for a verdict), then sends close_notify and more bytes in the same segment, and keeps the
/// connection open.
async fn talks_past_close_notify(pki: &Pki) -> (SocketAddr, JoinHandle<()>) {
    let mut config = server_config(&pki.server, &[&pki.ca.der]);
    config.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (mut tcp, mut conn) = tls.into_inner();
            conn.send_close_notify();
            let mut out = Vec::new();
            while conn.wants_write() {
                if conn.write_tls(&mut out).is_err() {
                    break;
                }
            }
            // Records after the close_notify, more than rustls takes in one `read_tls` (4 KiB),
            // so some are left over once it has seen the close_notify.
            for _ in 0..10 {
                out.extend_from_slice(&[0x17, 0x03, 0x03, 0x04, 0x00]);
                out.extend_from_slice(&[0x42; 0x400]);
            }
            let _ = tcp.write_all(&out).await;
            held.push(tcp);
        }
    });
    (addr, task)
}

/// Before the fix `check` spun at 100% CPU forever once rustls refused the bytes after the
/// close_notify; now it reports the close at once.
#[tokio::test(flavor = "multi_thread")]
async fn check_does_not_spin_on_bytes_after_close_notify() {
    let pki = Pki::new();
    let (addr, task) = talks_past_close_notify(&pki).await;
    let (took, ticks, code, proc) = run_bounded(
        check_cmd(&pki, addr).args(["--connect-timeout", "3s"]),
        Duration::from_secs(8),
    )
    .await;
    task.abort();
    let out = proc.stdout();
    assert!(
        out.contains("close_notify") || out.contains("closed the connection"),
        "the report names the close:\n{out}"
    );
    assert!(code.is_some(), "check exited normally");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // Clock ticks are 1/100 s: a spinning check burns about 100 per second.
    assert!(ticks < 150, "check used {ticks} CPU ticks in {took:?}");
}

/// A peer that accepts TCP and never speaks, as the upstream: `check` ends within
/// `--connect-timeout` + 5 s.
#[tokio::test(flavor = "multi_thread")]
async fn check_ends_in_time_against_a_silent_upstream() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let (took, _, code, _proc) = run_bounded(
        check_cmd(&pki, silent.addr).args(["--connect-timeout", "1s"]),
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

/// The same with a silent `--proxy`: the CONNECT exchange is bounded too.
#[tokio::test(flavor = "multi_thread")]
async fn check_ends_in_time_against_a_silent_proxy() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let (took, _, code, proc) = run_bounded(
        check_cmd(&pki, "upstream.test:443")
            .args(["--connect-timeout", "1s", "--proxy"])
            .arg(format!("http://{}", silent.addr)),
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(code, Some(1), "{}", proc.stdout());
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

/// Four routes in a config file, each towards a silent upstream with `connect_timeout = 2s`:
/// `check` dials them all at once and still ends within 2 s + 5 s (one after another it took
/// at least 8 s).
#[tokio::test(flavor = "multi_thread")]
async fn check_of_many_routes_ends_in_time() {
    let pki = Pki::new();
    let silent = Silent::start().await;
    let path = |p: &std::path::Path| p.to_str().expect("UTF-8 temp path").to_string();
    let mut text = format!(
        "[defaults]\ncert = {:?}\nkey = {:?}\nca = {:?}\nconnect_timeout = \"2s\"\n",
        path(&pki.client.cert),
        path(&pki.client.key),
        path(&pki.ca.pem)
    );
    for i in 0..4 {
        text.push_str(&format!(
            "\n[[route]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            silent.addr
        ));
    }
    let config = pki.write("many.toml", text);
    let (took, _, code, proc) = run_bounded(
        Cmd::new().args(["check", "--config"]).arg(&config),
        Duration::from_secs(7),
    )
    .await;
    assert_eq!(code, Some(1), "{}", proc.stdout());
    let out = proc.stdout();
    let order: Vec<usize> = (0..4)
        .map(|i| {
            out.find(&format!("route r{i}:"))
                .expect("every route reported")
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "in route order:\n{out}"
    );
    assert!(took < Duration::from_secs(7), "took {took:?}");
}

const EVIL_CN: &str = "evil\u{1b}[31mred\u{7}\u{202e}";
const EVIL_URI: &str = "spiffe://evil/\u{1b}[2J";

fn evil_server(pki: &Pki) -> crate::support::pki::Identity {
    let spec = LeafSpec {
        cn: EVIL_CN,
        uris: &[EVIL_URI],
        ..LeafSpec::server()
    };
    pki.leaf(&pki.ca, "evil", spec)
}

fn assert_escaped(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}') && !text.contains('\u{202e}'),
        "{what} holds a raw control character:\n{text:?}"
    );
}

/// Certificate names with terminal escapes are printed escaped by `check`, in text and JSON.
#[tokio::test(flavor = "multi_thread")]
async fn check_escapes_peer_certificate_text() {
    let pki = Pki::new();
    let server = evil_server(&pki);
    let up = Upstream::start(server_config(&server, &[&pki.ca.der]), vec![Behavior::Echo]).await;
    let target = format!("127.0.0.1:{}", up.port());
    for format in ["text", "json"] {
        let (_, _, _, proc) = run_bounded(
            check_cmd(&pki, &target).args([
                "--verify-uri-san",
                "spiffe://good/api",
                "--format",
                format,
            ]),
            Duration::from_secs(10),
        )
        .await;
        let out = proc.stdout();
        assert_escaped(&format!("check --format {format}"), &out);
        let expected = if format == "json" {
            // JSON escapes the backslash of the escaped form once more.
            "evil\\\\u{1b}[31mred\\\\u{7}\\\\u{202e}"
        } else {
            "evil\\u{1b}[31mred\\u{7}\\u{202e}"
        };
        assert!(
            out.contains(expected),
            "check --format {format} shows the escaped name:\n{out}"
        );
    }
}

/// The warning logged for a refused upstream quotes its URI SANs escaped.
#[tokio::test(flavor = "multi_thread")]
async fn refusal_log_escapes_peer_certificate_text() {
    let pki = Pki::new();
    let server = evil_server(&pki);
    let up = Upstream::start(server_config(&server, &[&pki.ca.der]), vec![Behavior::Echo]).await;
    let mut proxy = run_cmd(&pki, format!("127.0.0.1:{}", up.port()))
        .args(["--verify-uri-san", "spiffe://good/api"])
        .start();
    let mut app = connect(proxy.addr()).await;
    let _ = app.write_all(b"x").await;
    let _ = read_until_closed(&mut app, WAIT).await;
    let line = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the refusal", WAIT, |l| l.contains("uri_san_mismatch"))
    });
    // The message field is written with `{:?}`, which doubles the escape's backslash.
    assert!(
        line.contains("spiffe://evil/\\u{1b}[2J") || line.contains("spiffe://evil/\\\\u{1b}[2J"),
        "the log shows the escaped URI: {line:?}"
    );
    assert_escaped("stderr", &proxy.stderr());
}

/// An upstream that sends as fast as the connection takes, to every client, forever.
async fn firehose(pki: &Pki) -> (u16, Arc<AtomicU64>, JoinHandle<()>) {
    let acceptor = TlsAcceptor::from(Arc::new(server_config(&pki.server, &[&pki.ca.der])));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let sent = Arc::new(AtomicU64::new(0));
    let total = sent.clone();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let total = total.clone();
            conns.spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let chunk = pattern(7, 64 * 1024);
                while tls.write_all(&chunk).await.is_ok() {
                    total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (port, sent, task)
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}

/// Waits until `counter` stops growing for `quiet` (bounded by `limit`).
async fn until_still(counter: &AtomicU64, quiet: Duration, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = counter.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

/// 200 tcp-mode connections whose app never reads while the upstream keeps sending: once
/// everything has backed up, each costs the proxy at most 128 KiB of resident memory.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_apps_cost_bounded_memory() {
    const CONNS: u64 = 200;
    let pki = Pki::new();
    let (port, sent, task) = firehose(&pki).await;
    let proxy = run_cmd(&pki, format!("127.0.0.1:{port}")).start();
    let pid = proxy.pid();
    // Warm up: one connection through, so thread-local buffers and lazily built state exist.
    {
        let mut app = connect(proxy.addr()).await;
        let _ = read_exact(&mut app, 256 * 1024).await;
    }
    until_still(&sent, Duration::from_millis(500), WAIT).await;
    let before = vm_rss_kib(pid);
    let mut apps = Vec::new();
    for _ in 0..CONNS {
        let app = connect(proxy.addr()).await;
        apps.push(app);
    }
    // Everything backs up: the app sockets' and the upstream sockets' kernel buffers fill, and
    // the upstream stops being able to send.
    until_still(&sent, Duration::from_secs(1), Duration::from_secs(60)).await;
    let after = vm_rss_kib(pid);
    let per_conn = after.saturating_sub(before) / CONNS;
    eprintln!(
        "memory: VmRSS {before} KiB -> {after} KiB with {CONNS} stalled connections: \
         {per_conn} KiB each; upstream sent {} MiB",
        sent.load(Ordering::Relaxed) >> 20
    );
    assert!(
        per_conn <= 128,
        "each stalled connection costs {per_conn} KiB (VmRSS {before} -> {after} KiB)"
    );
    drop(apps);
    task.abort();
}

/// The `tr` (timer) field of the sidecar's socket to the upstream in `/proc/net/tcp`: 2 is
/// the keepalive timer.
fn upstream_socket_timers(upstream_port: u16) -> Vec<u8> {
    let mut timers = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(rem), Some(state), Some(timer)) = (f.get(2), f.get(3), f.get(5)) else {
                continue;
            };
            let rem_port = rem
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if rem_port == Some(upstream_port)
                && *state == "01"
                && let Some(tr) = timer.split(':').next().and_then(|t| t.parse().ok())
            {
                timers.push(tr);
            }
        }
    }
    timers
}

/// The sidecar's upstream socket has TCP keepalive on (so a vanished upstream is noticed).
#[tokio::test(flavor = "multi_thread")]
async fn upstream_sockets_use_keepalive() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let proxy = run_cmd(&pki, format!("127.0.0.1:{}", up.port())).start();
    let mut app: TcpStream = connect(proxy.addr()).await;
    app.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, app.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    // A retransmit or delayed-ACK timer may show briefly instead; poll until it settles.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut timers = upstream_socket_timers(up.port());
    while timers != [2] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        timers = upstream_socket_timers(up.port());
    }
    assert_eq!(
        timers,
        [2],
        "one socket to the upstream, with the keepalive timer (2) running"
    );
    drop(proxy);
}

/// The socket to an egress `--proxy` has keepalive on too.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_sockets_use_keepalive() {
    use crate::support::connect_proxy::{ConnectProxy, UPSTREAM_NAME, named_upstream};
    let pki = Pki::new();
    let up = named_upstream(&pki).await;
    let connect_proxy = ConnectProxy::start().await;
    let proxy = run_cmd(&pki, format!("{UPSTREAM_NAME}:{}", up.port()))
        .args(["--proxy", &connect_proxy.url()])
        .start();
    let mut app: TcpStream = connect(proxy.addr()).await;
    app.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, app.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    let port = connect_proxy.addr.port();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut timers = upstream_socket_timers(port);
    while timers != [2] && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        timers = upstream_socket_timers(port);
    }
    assert_eq!(
        timers,
        [2],
        "one socket to the proxy, with the keepalive timer (2) running"
    );
    drop(proxy);
}

/// Not a pass/fail test: the proxy's CPU time for 1 GiB upstream -> app in tcp mode, to
/// compare read sizes (`cargo test --test tests bulk_cpu -- --ignored --nocapture`). Debug
/// builds exaggerate per-call costs, so a difference here is an upper bound.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn bulk_cpu() {
    const BYTES: usize = 1 << 30;
    let pki = Pki::new();
    let (port, _sent, task) = firehose(&pki).await;
    let proxy = run_cmd(&pki, format!("127.0.0.1:{port}")).start();
    let before = cpu_ticks(proxy.pid()).expect("cpu ticks");
    let started = Instant::now();
    let mut app = connect(proxy.addr()).await;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < BYTES {
        let n = app.read(&mut buf).await.expect("read");
        assert!(n > 0, "ended early");
        got += n;
    }
    let ticks = cpu_ticks(proxy.pid()).expect("cpu ticks") - before;
    eprintln!(
        "bulk: {} MiB in {:?}, proxy CPU {ticks} ticks (1/100 s)",
        got >> 20,
        started.elapsed()
    );
    task.abort();
}

/// A name that resolves to two addresses, the first of which drops SYNs (a listener with a full
/// backlog on 127.0.0.1), the second reaching the real upstream (a forwarder on 127.0.0.2 with
/// the same port): the silent one costs only its share of `--connect-timeout` (half of 6 s
/// here), so the connection is made in about 3 s instead of failing with a timeout. The name
/// comes from a hosts file only the sidecar sees (a private mount namespace), so nothing else on
/// the machine changes. (glibc sorts 127.0.0.1 before 127.0.0.2, so the hole must be there.)
#[tokio::test(flavor = "multi_thread")]
async fn a_black_holed_first_address_costs_only_its_share_of_the_timeout() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let Some((port, _hole)) = black_hole_at(SocketAddr::from(([127, 0, 0, 1], 0))).await else {
        eprintln!("skipped: could not make a listener that drops SYNs");
        return;
    };
    let Ok(forwarder) = TcpListener::bind(SocketAddr::from(([127, 0, 0, 2], port))).await else {
        eprintln!("skipped: 127.0.0.2:{port} is taken");
        return;
    };
    let target = SocketAddr::from(([127, 0, 0, 1], up.port()));
    let forwarding = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = forwarder.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let hosts = pki.write(
        "hosts",
        "127.0.0.1 twoaddr.mtls-test.invalid\n127.0.0.2 twoaddr.mtls-test.invalid\n",
    );
    let cmd = run_cmd(&pki, format!("twoaddr.mtls-test.invalid:{port}")).args([
        "--server-name",
        "localhost",
        "--connect-timeout",
        "6s",
    ]);
    let Some(mut proxy) = cmd.spawn_with_hosts(&hosts) else {
        eprintln!("skipped: needs root and unshare for a private /etc/hosts");
        forwarding.abort();
        return;
    };
    let started = Instant::now();
    let mut app: TcpStream = connect(proxy.addr()).await;
    app.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), app.read_exact(&mut echo))
        .await
        .expect("an answer within 10 s")
        .expect("the echo, through the second address");
    assert_eq!(&echo, b"ping");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_millis(5500),
        "the silent first address should cost about half of the 6 s, took {took:?}"
    );
    drop(app);
    let line = proxy.wait_conn_lines(1).remove(0);
    assert_eq!(field(&line, "outcome"), Some("ok"), "{line}");
    forwarding.abort();
}

/// A listener on `addr` with a backlog of 0 that never accepts, filled until a connect no longer
/// completes: SYNs to it go unanswered. Returns its port, and what must live as long as the test.
async fn black_hole_at(addr: SocketAddr) -> Option<(u16, (socket2::Socket, Vec<TcpStream>))> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    sock.bind(&addr.into()).ok()?;
    sock.listen(0).ok()?;
    let addr = sock.local_addr().ok()?.as_socket()?;
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(_)) => return None,
            Err(_) => return Some((addr.port(), (sock, held))),
        }
    }
    None
}
