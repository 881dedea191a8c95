//! systemd integration: the notify protocol (`READY=1`, `RELOADING=1` + `MONOTONIC_USEC` then
//! `READY=1`, `STOPPING=1`, `WATCHDOG=1`) against a fake `NOTIFY_SOCKET`, and socket
//! activation (`--listen systemd:NAME`, `--admin systemd:NAME`) with sockets passed as fd 3, 4.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::admin::{admin_addr, get, is_admin_line};
use crate::support::files::{LiveIdentity, atomic_write, is_reload_failed, is_reloaded};
use crate::support::pki::LeafSpec;
use crate::support::*;

/// A fake service manager's notify socket: a unix datagram socket in a temp dir.
struct NotifySocket {
    _dir: TempDir,
    path: PathBuf,
    sock: UnixDatagram,
    /// Every datagram so far, in order of arrival.
    got: Vec<String>,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::Builder::new()
            .prefix("mtls-notify")
            .tempdir()
            .expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket {
            _dir: dir,
            path,
            sock,
            got: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `pred` (returns it) or `limit` passes (panics with
    /// everything received).
    fn wait_for(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "no {what} datagram on NOTIFY_SOCKET within {limit:?}; got {:#?}",
                    self.got
                );
            }
            if let Some(msg) = self.recv(deadline - now)
                && pred(&msg)
            {
                return msg;
            }
        }
    }

    /// One datagram within `limit`, or `None`.
    fn recv(&mut self, limit: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(limit.max(Duration::from_millis(1))))
            .expect("set_read_timeout");
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.got.push(msg.clone());
                Some(msg)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Everything that arrives within `dur`.
    fn collect_for(&mut self, dur: Duration) -> Vec<String> {
        let deadline = Instant::now() + dur;
        let mut out = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return out;
            }
            if let Some(msg) = self.recv(deadline - now) {
                out.push(msg);
            }
        }
    }
}

/// Whether a datagram carries the assignment `line` (e.g. `READY=1`) on a line of its own.
fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

fn is_watchdog(msg: &str) -> bool {
    has(msg, "WATCHDOG=1")
}

fn monotonic_usec(msg: &str) -> Option<u64> {
    msg.lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
}

/// `run` with the live identity files, `--reload-interval 0` (reloads only on SIGHUP) and the
/// fake notify socket.
fn notify_cmd(pki: &Pki, up: SocketAddr, live: &LiveIdentity, notify: &NotifySocket) -> Cmd {
    Cmd::new()
        .args(["run", "--upstream", &up.to_string(), "--cert"])
        .arg(&live.cert)
        .arg("--key")
        .arg(&live.key)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--reload-interval", "0"])
        .env("NOTIFY_SOCKET", &notify.path)
}

/// The READY / RELOADING / STOPPING datagrams in order of arrival.
fn kinds(notify: &NotifySocket) -> Vec<&'static str> {
    notify
        .got
        .iter()
        .filter_map(|m| {
            ["RELOADING=1", "READY=1", "STOPPING=1"]
                .into_iter()
                .find(|k| has(m, k))
        })
        .collect()
}

/// READY=1 once the proxy listener and the admin listener are bound (both on ports chosen
/// beforehand, so a connect right after READY shows they were); STOPPING=1 at SIGTERM; no
/// WATCHDOG=1 without WATCHDOG_USEC.
#[tokio::test(flavor = "multi_thread")]
async fn notify_ready_once_bound_and_stopping_at_sigterm() {
    let pki = Pki::new();
    let live = LiveIdentity::new(pki.dir.path(), &pki.client);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut notify = NotifySocket::new();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = notify_cmd(&pki, up.addr, &live, &notify)
        .args(["--listen", &listen.to_string()])
        .args(["--admin", &admin.to_string()])
        .spawn();

    let ready =
        tokio::task::block_in_place(|| notify.wait_for("READY=1", WAIT, |m| has(m, "READY=1")));
    // Bound before READY: these connect at once.
    std::net::TcpStream::connect_timeout(&listen, WAIT).unwrap_or_else(|e| {
        proxy.fail(&format!(
            "READY=1 ({ready:?}) before {listen} listened: {e}"
        ))
    });
    std::net::TcpStream::connect_timeout(&admin, WAIT)
        .unwrap_or_else(|e| proxy.fail(&format!("READY=1 before the admin {admin} listened: {e}")));
    let mut proxy = proxy.listening();
    assert_eq!(proxy.addr(), listen);
    assert_eq!(exchange(listen, b"one".to_vec()).await, b"one");
    assert_eq!(get(admin, "/readyz").await.status, 200);

    proxy.signal("TERM");
    tokio::task::block_in_place(|| notify.wait_for("STOPPING=1", WAIT, |m| has(m, "STOPPING=1")));
    let status = tokio::task::block_in_place(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        kinds(&notify),
        ["READY=1", "STOPPING=1"],
        "{:#?}",
        notify.got
    );
    assert!(
        !notify.got.iter().any(|m| is_watchdog(m)),
        "WATCHDOG=1 without WATCHDOG_USEC: {:#?}",
        notify.got
    );
}

/// Waits for RELOADING=1 (with MONOTONIC_USEC in the same datagram) and then READY=1; returns
/// the MONOTONIC_USEC value.
fn reloading_then_ready(notify: &mut NotifySocket, which: &str) -> u64 {
    let reloading = notify.wait_for(&format!("RELOADING=1 ({which})"), WAIT, |m| {
        has(m, "RELOADING=1")
    });
    let usec = monotonic_usec(&reloading).unwrap_or_else(|| {
        panic!("RELOADING=1 without MONOTONIC_USEC=<number> in the same datagram: {reloading:?}")
    });
    assert!(usec > 0, "{reloading:?}");
    let after = notify.wait_for(&format!("READY=1 after RELOADING=1 ({which})"), WAIT, |m| {
        has(m, "READY=1")
    });
    assert!(!has(&after, "RELOADING=1"), "{after:?}");
    usec
}

/// RELOADING=1 with MONOTONIC_USEC, then READY=1, around every SIGHUP reload attempt: a good
/// one, a second good one (MONOTONIC_USEC does not go back) and a failed one (systemd must
/// still hear READY=1, or the unit stays "reloading").
#[tokio::test(flavor = "multi_thread")]
async fn notify_reloading_then_ready_around_each_reload() {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "notify-a", LeafSpec::client("notify-a"));
    let b = pki.leaf(&pki.ca, "notify-b", LeafSpec::client("notify-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut notify = NotifySocket::new();
    let mut proxy = notify_cmd(&pki, up.addr, &live, &notify)
        .args(["--listen", "127.0.0.1:0"])
        .start();
    tokio::task::block_in_place(|| notify.wait_for("READY=1", WAIT, |m| has(m, "READY=1")));

    live.install(&b);
    proxy.signal("HUP");
    let usec = tokio::task::block_in_place(|| reloading_then_ready(&mut notify, "first"));
    let serial = b.serial_hex();
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the reload line", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });

    live.install(&a);
    proxy.signal("HUP");
    let usec2 = tokio::task::block_in_place(|| reloading_then_ready(&mut notify, "second"));
    assert!(
        usec2 >= usec,
        "MONOTONIC_USEC went back: {usec} then {usec2}"
    );

    atomic_write(&live.cert, "not a certificate\n");
    proxy.signal("HUP");
    tokio::task::block_in_place(|| reloading_then_ready(&mut notify, "failed attempt"));
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the reload failure line", WAIT, is_reload_failed)
    });
    assert_eq!(
        kinds(&notify),
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1"
        ],
        "{:#?}",
        notify.got
    );
}

/// With WATCHDOG_USEC=400000, WATCHDOG=1 comes at least every 200 ms: 6 or more in 2 s (a ping
/// only every 400 ms would give 5).
#[test]
fn watchdog_pings_at_half_the_interval() {
    let pki = Pki::new();
    let mut notify = NotifySocket::new();
    let _proxy = run_cmd(&pki, "127.0.0.1:9")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "400000")
        .start();
    notify.wait_for("READY=1", WAIT, |m| has(m, "READY=1"));
    notify.wait_for("the first WATCHDOG=1", WAIT, is_watchdog);
    let pings = notify
        .collect_for(Duration::from_secs(2))
        .iter()
        .filter(|m| is_watchdog(m))
        .count();
    assert!(
        pings >= 6,
        "{pings} WATCHDOG=1 in 2 s with WATCHDOG_USEC=400000; datagrams: {:#?}",
        notify.got
    );
}

/// A listener bound by the test, as systemd would have bound it.
fn bound_listener() -> (SocketAddr, OwnedFd) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    (l.local_addr().unwrap(), OwnedFd::from(l))
}

/// `--listen systemd:app` serves on the passed socket (fd 3): the listening line shows its
/// address and traffic works.
#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_serves_on_the_passed_listener() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (addr, fd) = bound_listener();
    let proxy = run_cmd_files_on(
        Some("systemd:app"),
        up.addr,
        &pki.client.cert,
        &pki.client.key,
        &pki.ca.pem,
    )
    .spawn_activated(vec![("app", fd)])
    .listening();
    assert_eq!(
        proxy.addr(),
        addr,
        "the listening line shows the passed socket"
    );
    let data = pattern(31, 50_000);
    assert!(exchange(addr, data.clone()).await == data);
    assert_eq!(up.stats.tls_accepted(), 1);
}

/// Two passed sockets, picked by name: `--listen systemd:app --admin systemd:admin`, named in
/// the other order than they are passed.
#[tokio::test(flavor = "multi_thread")]
async fn socket_activation_for_the_admin_listener_too() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (admin, admin_fd) = bound_listener();
    let (addr, app_fd) = bound_listener();
    let mut proxy = run_cmd_without_listen(&pki, up.addr)
        .args(["--listen", "systemd:app", "--admin", "systemd:admin"])
        .spawn_activated(vec![("admin", admin_fd), ("app", app_fd)])
        .listening();
    assert_eq!(proxy.addr(), addr);
    assert_eq!(
        admin_addr(&mut proxy),
        admin,
        "the admin line shows its passed socket"
    );
    let health = get(admin, "/healthz").await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(exchange(addr, b"via fd 4".to_vec()).await, b"via fd 4");
    assert!(proxy.count_lines(is_admin_line) == 1);
}

/// `run` with the test identity and no `--listen`: each test passes its own.
fn run_cmd_without_listen(pki: &Pki, upstream: SocketAddr) -> Cmd {
    run_cmd_files_on(
        None,
        upstream,
        &pki.client.cert,
        &pki.client.key,
        &pki.ca.pem,
    )
}

/// A name that was not passed is a startup error that names it, not a fresh bind.
#[test]
fn socket_activation_with_an_unknown_name_is_a_startup_error() {
    let pki = Pki::new();
    let (_, fd) = bound_listener();
    let stderr = run_cmd_without_listen(&pki, "127.0.0.1:9".parse().unwrap())
        .args(["--listen", "systemd:nosuchname"])
        .spawn_activated(vec![("app", fd)])
        .startup_error();
    assert!(
        stderr.contains("nosuchname"),
        "the error does not name it: {stderr}"
    );
}

/// A passed unix socket is served, and its file is left in place at exit: it is systemd's.
#[tokio::test(flavor = "multi_thread")]
async fn socket_activated_unix_socket_is_not_removed_at_exit() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.sock");
    let listener = UnixListener::bind(&path).expect("bind unix");
    let mut proxy = run_cmd_without_listen(&pki, up.addr)
        .args(["--listen", "systemd:app"])
        .spawn_activated(vec![("app", OwnedFd::from(listener))]);
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the listening line", WAIT, |l| {
            l.contains("listening") && l.contains("route=default")
        })
    });
    let stream = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect to the passed unix socket");
    let (mut rd, mut wr) = stream.into_split();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    wr.write_all(b"unix via fd 3").await.unwrap();
    wr.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, rd.read_to_end(&mut got))
        .await
        .expect("echo timed out")
        .expect("read");
    assert_eq!(got, b"unix via fd 3");

    proxy.signal("TERM");
    let status = tokio::task::block_in_place(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0));
    assert!(
        path.exists(),
        "the socket file systemd passed was removed at exit"
    );
}
