//! Identity stays where it belongs: a systemd TCP socket on a non-loopback address needs
//! `--allow-non-loopback`; `--allow-uid` with a TCP listener (flag, variable, config key or a
//! systemd TCP socket) is exit 2; refused unix peers are logged at most once a second per
//! route, with the count of those not logged.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// `run` with the test identity and no `--listen`: each test passes its own.
fn run_cmd(pki: &Pki) -> Cmd {
    run_cmd_files_on(
        None,
        "127.0.0.1:9",
        &pki.client.cert,
        &pki.client.key,
        &pki.ca.pem,
    )
}

/// A TCP listener bound by the test as systemd would have, on `addr` (nothing connects to it).
fn passed_socket(addr: &str) -> OwnedFd {
    OwnedFd::from(std::net::TcpListener::bind(addr).expect("bind"))
}

#[test]
fn systemd_tcp_socket_on_a_non_loopback_address_needs_allow_non_loopback() {
    let pki = Pki::new();
    let proxy = run_cmd(&pki)
        .args(["--listen", "systemd:app"])
        .spawn_activated(vec![("app", passed_socket("0.0.0.0:0"))]);
    let stderr = proxy.startup_error();
    assert!(
        stderr.contains("--allow-non-loopback") && stderr.contains("systemd:app"),
        "{stderr}"
    );
    // With the flag it is taken and served.
    let proxy = run_cmd(&pki)
        .args(["--listen", "systemd:app", "--allow-non-loopback"])
        .spawn_activated(vec![("app", passed_socket("0.0.0.0:0"))])
        .listening();
    assert!(proxy.addr().ip().is_unspecified(), "{}", proxy.stderr());
    // A loopback one needs nothing.
    let proxy = run_cmd(&pki)
        .args(["--listen", "systemd:app"])
        .spawn_activated(vec![("app", passed_socket("127.0.0.1:0"))])
        .listening();
    assert!(proxy.addr().ip().is_loopback());
}

#[test]
fn allow_uid_with_a_tcp_listener_is_a_usage_error() {
    let pki = Pki::new();
    // The flag.
    let err = run_cmd(&pki)
        .args(["--listen", "127.0.0.1:0", "--allow-uid", "0"])
        .startup_error();
    assert!(
        err.contains("--allow-uid") && err.contains("unix:"),
        "{err}"
    );
    // The variable.
    let err = run_cmd(&pki)
        .args(["--listen", "127.0.0.1:0"])
        .env("MTLS_SIDECAR_ALLOW_UID", "0")
        .startup_error();
    assert!(err.contains("--allow-uid"), "{err}");
    // A config-file key: file, line and key.
    let text = format!(
        "[defaults]\ncert = {:?}\nkey = {:?}\n\n[[route]]\nname = \"r\"\n\
         listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nallow_uid = [0]\n",
        pki.client.cert.display().to_string(),
        pki.client.key.display().to_string(),
    );
    let file = pki.write("uid.toml", text);
    let err = Cmd::new()
        .arg("run")
        .arg("--config")
        .arg(&file)
        .startup_error();
    assert!(
        err.contains(&format!("{}:9:", file.display())) && err.contains("allow_uid"),
        "{err}"
    );
    // A TCP socket passed by systemd.
    let proxy = run_cmd(&pki)
        .args(["--listen", "systemd:app", "--allow-uid", "0"])
        .spawn_activated(vec![("app", passed_socket("127.0.0.1:0"))]);
    let stderr = proxy.startup_error();
    assert!(
        stderr.contains("--allow-uid") && stderr.contains("systemd:app"),
        "{stderr}"
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

const NOBODY: u32 = 65534;
/// A system python, reachable by any user (a pyenv shim under /root is not).
const PYTHON: &str = "/usr/bin/python3";

/// Connects and closes for `argv[2]` seconds, then waits 1.3 s and connects once more (so the
/// count of lines left out is logged); prints how many connections it made.
const FLOOD: &str = r#"
import socket, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
n = 0
end = time.monotonic() + secs
def once():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.close()
while time.monotonic() < end:
    once()
    n += 1
    time.sleep(0.005)
time.sleep(1.3)
once()
n += 1
print(n)
"#;

/// A flood of connections from a refused uid for 3 s: at most about one refusal line a
/// second, and the lines plus their `suppressed=` counts add up to every refused connection.
#[tokio::test(flavor = "multi_thread")]
async fn refused_unix_peers_are_logged_at_most_once_a_second_with_a_count() {
    let skip = if own_uid() != 0 {
        Some(format!("not root (uid {})", own_uid()))
    } else if !Path::new(PYTHON).exists() {
        Some(format!("no {PYTHON}"))
    } else if Command::new("setpriv").arg("--version").output().is_err() {
        Some("no setpriv".to_string())
    } else {
        None
    };
    if let Some(why) = skip {
        println!("skipped refused_unix_peers_are_logged_at_most_once_a_second_with_a_count: {why}");
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("app.sock");
    // The directory must be reachable by uid 65534.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod dir");
    let mut proxy = run_cmd(&pki)
        .arg("--listen")
        .arg(format!("unix:{}", path.display()))
        .args(["--listen-mode", "0666", "--allow-uid", "0"])
        .spawn();
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("the listening line", WAIT, |l| {
            l.contains("listening") && l.contains("route=default")
        })
    });
    let out = tokio::task::block_in_place(|| {
        let mut child = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                PYTHON,
                "-c",
                FLOOD,
            ])
            .arg(&path)
            .arg("3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the flood client");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break child.wait_with_output().expect("output");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the flood client still ran after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    assert!(
        out.status.success(),
        "flood client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("count of connections");
    assert!(made > 50, "the flood made only {made} connections");
    let is_refusal = |l: &str| l.contains("refused") && field(l, "uid") == Some("65534");
    // Every connection is refused and counted: logged ones plus the suppressed counts.
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
    // 3 s of flood, a pause, one more: lines at 0, ~1, ~2, (~3) s and the last one.
    assert!(
        (2..=6).contains(&lines.len()),
        "{} refusal lines for {made} refused connections:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(proxy.try_exit().is_none(), "{}", proxy.stderr());
}
