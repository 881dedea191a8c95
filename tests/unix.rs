//! `--listen unix:PATH`: the socket file's mode (`--listen-mode`), traffic, a stale file
//! replaced, a live one refused, removal at exit, and `--allow-uid` (SO_PEERCRED) with a client
//! running under another uid (`setpriv` + `python3`; skipped with a reason when not root).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::support::*;

/// The uid the client runs as in the `--allow-uid` tests.
const NOBODY: u32 = 65534;

/// A temp dir under /tmp that every user may traverse, and `app.sock` in it.
fn socket_dir() -> (TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("mtls-unix")
        .tempdir_in("/tmp")
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod 0755");
    let path = dir.path().join("app.sock");
    (dir, path)
}

fn unix_cmd(pki: &Pki, upstream: impl std::fmt::Display, path: &Path) -> Cmd {
    run_cmd_files_on(
        Some(&format!("unix:{}", path.display())),
        upstream,
        &pki.client.cert,
        &pki.client.key,
        &pki.ca.pem,
    )
}

/// Spawns and waits for `listening route=default addr=unix:PATH`.
fn start_unix(cmd: &Cmd, path: &Path) -> Sidecar {
    let mut proxy = cmd.spawn();
    let want = format!("unix:{}", path.display());
    let line = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the listening line", WAIT, |l| {
            l.contains("listening") && l.contains("route=default") && field(l, "addr").is_some()
        })
    });
    if field(&line, "addr") != Some(&*want) {
        proxy.fail(&format!(
            "the listening line does not say addr={want}: {line}"
        ));
    }
    proxy
}

async fn unix_exchange(path: &Path, data: Vec<u8>) -> Vec<u8> {
    let stream = tokio::time::timeout(WAIT, UnixStream::connect(path))
        .await
        .expect("connect timed out")
        .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    let (mut rd, mut wr) = stream.into_split();
    let write = async move {
        wr.write_all(&data).await.expect("write");
        wr.shutdown().await.expect("shutdown");
    };
    let read = async move {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("read");
        got
    };
    tokio::time::timeout(WAIT, async { tokio::join!(write, read).1 })
        .await
        .expect("exchange over the unix socket timed out")
}

fn mode_of(path: &Path) -> u32 {
    let meta =
        std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is no socket",
        path.display()
    );
    meta.permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread")]
async fn unix_listener_is_0600_serves_and_is_removed_at_exit() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_dir, path) = socket_dir();
    let mut proxy = start_unix(&unix_cmd(&pki, up.addr, &path), &path);
    assert_eq!(mode_of(&path), 0o600, "default mode of the socket file");

    let data = pattern(77, 100_000);
    assert!(unix_exchange(&path, data.clone()).await == data, "echo");
    let line = &tokio::task::block_in_place(|| proxy.wait_conn_lines(1))[0];
    assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    assert_eq!(num_field(line, "bytes_to_upstream"), 100_000, "{line}");

    proxy.signal("TERM");
    let status = tokio::task::block_in_place(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0));
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{} left behind at exit",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_mode_sets_the_socket_file_mode() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_dir, path) = socket_dir();
    let _proxy = start_unix(
        &unix_cmd(&pki, up.addr, &path).args(["--listen-mode", "0660"]),
        &path,
    );
    assert_eq!(mode_of(&path), 0o660, "--listen-mode 0660");
    assert_eq!(unix_exchange(&path, b"660".to_vec()).await, b"660");
}

/// A socket file left by a dead process (nobody listens) is replaced.
#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_file_is_replaced() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_dir, path) = socket_dir();
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists(), "the stale file is there to begin with");
    assert!(
        std::os::unix::net::UnixStream::connect(&path).is_err(),
        "nobody listens on the stale file"
    );

    let _proxy = start_unix(&unix_cmd(&pki, up.addr, &path), &path);
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(unix_exchange(&path, b"fresh".to_vec()).await, b"fresh");
    assert_eq!(up.stats.tls_accepted(), 1);
}

/// A socket somebody still listens on is a startup error, and is left alone.
#[test]
fn live_socket_is_a_startup_error() {
    let pki = Pki::new();
    let (_dir, path) = socket_dir();
    let live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let stderr = unix_cmd(&pki, "127.0.0.1:9", &path).startup_error();
    assert!(
        stderr.contains(&*path.display().to_string()),
        "the error does not name {}: {stderr}",
        path.display()
    );
    // Still the live process's socket.
    std::os::unix::net::UnixStream::connect(&path)
        .unwrap_or_else(|e| panic!("the live socket was taken away ({e}): {stderr}"));
    live.set_nonblocking(true).unwrap();
    assert!(
        live.accept().is_ok(),
        "the connection did not reach the live listener"
    );
}

/// Our own uid, from /proc/self/status (real uid).
fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("Uid: in /proc/self/status")
}

/// Why a client cannot be run as another uid here, if it cannot.
fn cannot_switch_uid() -> Option<String> {
    if own_uid() != 0 {
        return Some(format!(
            "not root (uid {}): cannot run a client as uid {NOBODY}",
            own_uid()
        ));
    }
    if !Path::new(PYTHON).exists() {
        return Some(format!("no {PYTHON} for the client"));
    }
    match Command::new("setpriv").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("setpriv --version failed: {}", out.status)),
        Err(e) => Some(format!("no setpriv: {e}")),
    }
}

/// A system python, reachable by any user (a pyenv shim under /root is not).
const PYTHON: &str = "/usr/bin/python3";

/// Connects to the socket, sends argv[2], half-closes and prints what came back as hex; the
/// socket's own timeout bounds every step.
const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
print("connected", file=sys.stderr)
got = b""
try:
    s.sendall(sys.argv[2].encode())
    s.shutdown(socket.SHUT_WR)
    while True:
        d = s.recv(65536)
        if not d:
            break
        got += d
except OSError as e:
    print("closed:", e, file=sys.stderr)
sys.stdout.write(got.hex())
"#;

/// Runs a command, killing it after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the client");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("client output");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("client output");
            panic!(
                "the client under uid {NOBODY} still ran after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `payload` over the unix socket as uid/gid 65534 without supplementary groups;
/// returns what came back. Connecting must work (the socket is 0666): only the proxy may
/// refuse.
async fn exchange_as_nobody(path: &Path, payload: &str) -> Vec<u8> {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        PYTHON,
        "-c",
        CLIENT,
    ])
    .arg(path)
    .arg(payload);
    let out = tokio::task::spawn_blocking(move || run_bounded(cmd, Duration::from_secs(20)))
        .await
        .expect("client task");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success() && stderr.contains("connected"),
        "the client under uid {NOBODY} failed ({}): {stderr}",
        out.status
    );
    let hex_out = String::from_utf8_lossy(&out.stdout).into_owned();
    (0..hex_out.len() / 2)
        .map(|i| u8::from_str_radix(&hex_out[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn refused_uid_line(proxy: &mut Sidecar, uid: u32) -> String {
    let uid = uid.to_string();
    tokio::task::block_in_place(|| {
        proxy.wait_for_line(&format!("a line with uid={uid}"), WAIT, |l| {
            field(l, "uid") == Some(&*uid)
        })
    })
}

/// `--allow-uid 0 --allow-uid 1234`: uid 65534 is refused (closed, nothing forwarded, its uid
/// logged); uid 0 gets through.
#[tokio::test(flavor = "multi_thread")]
async fn allow_uid_refuses_other_users() {
    if let Some(why) = cannot_switch_uid() {
        println!("skipped allow_uid_refuses_other_users: {why}");
        return;
    }
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_dir, path) = socket_dir();
    let mut proxy = start_unix(
        &unix_cmd(&pki, up.addr, &path).args([
            "--listen-mode",
            "0666",
            "--allow-uid",
            "0",
            "--allow-uid",
            "1234",
        ]),
        &path,
    );
    assert_eq!(mode_of(&path), 0o666);

    let got = exchange_as_nobody(&path, "from nobody").await;
    assert!(
        got.is_empty(),
        "uid {NOBODY} got {:?} back",
        String::from_utf8_lossy(&got)
    );
    let line = refused_uid_line(&mut proxy, NOBODY);
    assert_eq!(
        up.stats
            .tcp_accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the upstream was dialled for a refused uid: {line}"
    );

    assert_eq!(
        unix_exchange(&path, b"from root".to_vec()).await,
        b"from root"
    );
    assert_eq!(up.stats.tls_accepted(), 1);
    let finished = up.stats.wait_finished(1).await;
    assert_eq!(
        finished[0].received, 9,
        "only root's bytes reached the upstream"
    );
}

/// `--allow-uid 65534`: that other user gets through, and we (uid 0) are refused.
#[tokio::test(flavor = "multi_thread")]
async fn allow_uid_lets_the_listed_user_in() {
    if let Some(why) = cannot_switch_uid() {
        println!("skipped allow_uid_lets_the_listed_user_in: {why}");
        return;
    }
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let (_dir, path) = socket_dir();
    let mut proxy = start_unix(
        &unix_cmd(&pki, up.addr, &path).args([
            "--listen-mode",
            "0666",
            "--allow-uid",
            &NOBODY.to_string(),
        ]),
        &path,
    );
    let got = exchange_as_nobody(&path, "from nobody").await;
    assert_eq!(String::from_utf8_lossy(&got), "from nobody");
    assert_eq!(up.stats.tls_accepted(), 1);

    let mut stream = UnixStream::connect(&path).await.expect("connect as root");
    let _ = stream.write_all(b"from root").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("uid 0 got {:?} back", String::from_utf8_lossy(&buf[..n])),
        Err(_) => panic!("the connection from uid 0 was not closed"),
    }
    refused_uid_line(&mut proxy, 0);
    assert_eq!(
        up.stats.tls_accepted(),
        1,
        "the upstream was dialled for uid 0"
    );
}

/// Runs for any user: our own uid, unlisted, is refused (and logged, and nothing dialled);
/// listed among others, it gets through.
#[tokio::test(flavor = "multi_thread")]
async fn allow_uid_checks_our_own_uid() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let me = own_uid();
    let other = if me == NOBODY { NOBODY - 1 } else { NOBODY };
    let (_dir, path) = socket_dir();

    let mut proxy = start_unix(
        &unix_cmd(&pki, up.addr, &path).args(["--allow-uid", &other.to_string()]),
        &path,
    );
    let mut stream = UnixStream::connect(&path).await.expect("connect");
    let _ = stream.write_all(b"not listed").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("uid {me} got {:?} back", String::from_utf8_lossy(&buf[..n])),
        Err(_) => panic!("the connection from uid {me} was not closed"),
    }
    let line = refused_uid_line(&mut proxy, me);
    assert_eq!(
        up.stats
            .tcp_accepted
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the upstream was dialled for a refused uid: {line}"
    );
    proxy.signal("TERM");
    tokio::task::block_in_place(|| proxy.wait_exit(WAIT));

    let _proxy = start_unix(
        &unix_cmd(&pki, up.addr, &path).args([
            "--allow-uid",
            &other.to_string(),
            "--allow-uid",
            &me.to_string(),
        ]),
        &path,
    );
    assert_eq!(unix_exchange(&path, b"listed".to_vec()).await, b"listed");
    assert_eq!(up.stats.tls_accepted(), 1);
}
