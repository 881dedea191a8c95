//! Admin abuse: `POST /shutdown` only from a loopback peer and without an `Origin` header (403
//! otherwise); at most 64 admin connections at once; 10 s to send a request head; accept
//! errors (out of file descriptors) back off and are logged at most once a second, on the
//! admin listener and on a route's listener.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::admin::{admin_addr, get};
use crate::support::*;

fn proxy_cmd(pki: &Pki, upstream: SocketAddr, admin: &str) -> Cmd {
    run_cmd(pki, upstream).args(["--admin", admin, "--admin-allow-shutdown"])
}

/// Sends a raw request and returns the status code of the answer (`None`: no answer at all).
async fn raw_status(addr: SocketAddr, request: &str) -> Option<u16> {
    let io = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw).into_owned();
        text.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(WAIT, io).await.ok().flatten()
}

fn shutdown_request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "POST /shutdown HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )
}

/// A browser's simple cross-site POST carries `Origin`: 403, and the process keeps serving;
/// the same request without `Origin` from loopback is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_an_origin_header_is_forbidden() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_cmd(&pki, up.addr, "127.0.0.1:0").start();
    let admin = admin_addr(&mut proxy);
    for origin in [
        "Origin: http://evil.example\r\n",
        "Origin: null\r\n",
        "Content-Type: text/plain\r\nOrigin: http://127.0.0.1\r\n",
    ] {
        let status = raw_status(admin, &shutdown_request(admin, origin)).await;
        assert_eq!(status, Some(403), "{origin:?}\n{}", proxy.stderr());
    }
    assert_eq!(get(admin, "/readyz").await.status, 200, "still serving");
    assert!(proxy.try_exit().is_none(), "{}", proxy.stderr());
    let status = raw_status(admin, &shutdown_request(admin, "")).await;
    assert_eq!(status, Some(200));
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(WAIT));
    assert_eq!(exit.code(), Some(0), "{}", proxy.stderr());
}

/// Why this test cannot build its own network namespace here, if it cannot.
fn cannot_make_netns() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some(format!(
            "not root (uid {uid}): cannot create a network namespace"
        ));
    }
    for tool in ["ip", "curl"] {
        match Command::new(tool).arg("-V").output() {
            Ok(_) => {}
            Err(e) => return Some(format!("no {tool}: {e}")),
        }
    }
    None
}

/// A network namespace with a veth pair, made by the test and removed (by name) on drop.
struct Netns {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Netns {
    /// Host side `10.X.Y.1/30`, namespace side `10.X.Y.2/30`.
    fn new(host_ip: &str, ns_ip: &str) -> Result<Netns, String> {
        let tag = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("mtlsv-{tag}"),
            host_if: format!("mv{tag}h"),
        };
        let ns_if = format!("mv{tag}n");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its end of the pair, and with it the host end.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// `POST /shutdown` from a peer on another address (curl inside a network namespace the test
/// made, over a veth pair) is 403; GET endpoints still answer it; the process keeps running.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_from_a_non_loopback_peer_is_forbidden() {
    if let Some(why) = cannot_make_netns() {
        println!("skipped shutdown_from_a_non_loopback_peer_is_forbidden: {why}");
        return;
    }
    let octet = 1 + std::process::id() % 250;
    let host_ip = format!("10.213.{octet}.1");
    let ns_ip = format!("10.213.{octet}.2");
    let ns = match Netns::new(&host_ip, &ns_ip) {
        Ok(ns) => ns,
        Err(e) => {
            println!("skipped shutdown_from_a_non_loopback_peer_is_forbidden: {e}");
            return;
        }
    };
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_cmd(&pki, up.addr, &format!("{host_ip}:0")).start();
    let admin = admin_addr(&mut proxy);
    let curl = |method: &str, path: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-s", "-m", "10"])
            .args(["-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .arg(format!("http://{admin}{path}"))
            .output()
            .expect("run curl in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let health = tokio::task::block_in_place(|| curl("GET", "/healthz"));
    assert_eq!(health, "200", "the namespace reaches the admin listener");
    let code = tokio::task::block_in_place(|| curl("POST", "/shutdown"));
    assert_eq!(code, "403", "{}", proxy.stderr());
    assert_eq!(get(admin, "/readyz").await.status, 200, "still ready");
    assert!(proxy.try_exit().is_none(), "{}", proxy.stderr());
    drop(ns);
}

/// 64 idle connections fill the admin listener: the 65th is not served until one of them
/// closes, then it is.
#[tokio::test(flavor = "multi_thread")]
async fn at_most_64_admin_connections_at_once() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_cmd(&pki, up.addr, "127.0.0.1:0").start();
    let admin = admin_addr(&mut proxy);
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(connect(admin).await);
    }
    // Every one of the 64 is being served (all accepted) before the 65th comes.
    let started = Instant::now();
    let mut extra = connect(admin).await;
    extra
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(1500), extra.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "connection 65 was answered while 64 were open: {early:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "too slow to tell the cap from the 10 s head timeout"
    );
    drop(idle.pop());
    let (answer, _) = read_until_closed(&mut extra, WAIT).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// A connection that sends nothing, and one that dribbles a header a byte a second, are closed
/// about 10 s after accept (not before 9 s, well before 15 s).
#[tokio::test(flavor = "multi_thread")]
async fn admin_request_heads_have_10_seconds() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_cmd(&pki, up.addr, "127.0.0.1:0").start();
    let admin = admin_addr(&mut proxy);
    let started = Instant::now();
    let mut silent = connect(admin).await;
    let mut dribble = connect(admin).await;
    let dribbler = tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head {
            if dribble.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, dribble.read_to_end(&mut rest)).await;
        (Instant::now(), rest)
    });
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, silent.read_to_end(&mut buf)).await;
    let silent_closed = started.elapsed();
    assert!(
        read.is_ok(),
        "the silent connection was still open after {WAIT:?}"
    );
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(14)).contains(&silent_closed),
        "silent connection closed after {silent_closed:?}, expected about 10 s"
    );
    let (at, rest) = dribbler.await.expect("dribbler");
    let dribble_closed = at - started;
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(14)).contains(&dribble_closed),
        "dribbling connection closed after {dribble_closed:?}, expected about 10 s"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("200 OK"),
        "a dribbled head was served: {rest}"
    );
}

fn count_open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Out of file descriptors (`prlimit` on the running process, then a burst of connections to
/// the admin and route listeners): accepts fail for seconds, but each listener logs at most
/// about one `accept failed` line a second, with the count of failures not logged.
#[tokio::test(flavor = "multi_thread")]
async fn accept_errors_are_logged_at_most_once_a_second() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        println!("skipped accept_errors_are_logged_at_most_once_a_second: no prlimit");
        return;
    }
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_cmd(&pki, up.addr, "127.0.0.1:0").start();
    let admin = admin_addr(&mut proxy);
    let pid = proxy.pid();
    let limit = count_open_fds(pid) + 4;
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(connect(admin).await);
        held.push(connect(proxy.addr()).await);
    }
    let is_admin_err = |l: &str| l.contains("admin accept failed");
    let is_route_err = |l: &str| l.contains("accept failed") && l.contains("route=default");
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("an admin accept failure", WAIT, is_admin_err);
        proxy.wait_for_line("a route accept failure", WAIT, is_route_err);
    });
    let first = Instant::now();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let window = first.elapsed().as_secs_f64();
    let lines = proxy.stderr_lines();
    for (what, pred) in [
        ("admin", &is_admin_err as &dyn Fn(&str) -> bool),
        ("route", &is_route_err),
    ] {
        let found: Vec<&String> = lines.iter().filter(|l| pred(l)).collect();
        // One at the first failure, then at most one a second.
        let most = 2 + window.ceil() as usize;
        assert!(
            found.len() <= most,
            "{what}: {} accept-failed lines in about {window:.1} s (at most {most}):\n{}",
            found.len(),
            lines.join("\n")
        );
        assert!(
            found.iter().all(|l| field(l, "suppressed").is_some()),
            "{what}: lines carry suppressed=N: {found:?}"
        );
        assert!(
            found.iter().any(|l| num_field(l, "suppressed") > 0),
            "{what}: failures were left out and counted: {found:?}"
        );
    }
    drop(held);
}
