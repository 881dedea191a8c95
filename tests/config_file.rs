//! `run --config FILE` (and `MTLS_SIDECAR_CONFIG`): many routes in one process.
//!
//! - errors: every kind the interface names (unknown key in each table, wrong type, missing
//!   required key, duplicate name or listen address, bad duration, no identity) exits 2 naming
//!   the file, the line computed from the file the test wrote, and the key; route flags mixed
//!   with `--config` are a usage error
//! - behaviour: each route presents its own identity and applies its own trust, pins and
//!   timeouts or inherits them from `[defaults]`; a refused or silent upstream on one route does
//!   not disturb another; a shared identity rotated by SIGHUP shows on every route using it;
//!   `[admin]` serves metrics and status for every route; http and tcp routes side by side.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::admin::{admin_addr, get, request, scrape_until};
use crate::support::files::{LiveIdentity, is_reload_failed, is_reloaded};
use crate::support::http::{Alpn, HttpUpstream, empty, h1_call, h1_req};
use crate::support::pki::{Identity, LeafSpec, serial_of};
use crate::support::upstream::Conn;
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A TOML basic string holding `s`.
fn q(s: impl AsRef<str>) -> String {
    let mut out = String::from("\"");
    for c in s.as_ref().chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML basic string holding a path.
fn qp(p: &Path) -> String {
    q(p.to_str().expect("UTF-8 temp path"))
}

/// `[defaults]` with the test client identity and CA.
fn defaults(pki: &Pki) -> String {
    format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\n",
        qp(&pki.client.cert),
        qp(&pki.client.key),
        qp(&pki.ca.pem)
    )
}

/// One `[[route]]` table on 127.0.0.1:0 with `extra` lines after name, listen and upstream.
fn route(name: &str, upstream: impl std::fmt::Display, extra: &str) -> String {
    let mut s = format!(
        "\n[[route]]\nname = {}\nlisten = \"127.0.0.1:0\"\nupstream = {}\n",
        q(name),
        q(upstream.to_string())
    );
    s.push_str(extra);
    if !extra.is_empty() && !extra.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// Writes `text` to `config.toml` (or another name) in the PKI's directory.
fn write_config(pki: &Pki, name: &str, text: &str) -> PathBuf {
    pki.write(name, text)
}

/// `mtls-sidecar run --config PATH`.
fn config_cmd(path: &Path) -> Cmd {
    Cmd::new().args(["run", "--config"]).arg(path)
}

/// The 1-based number of the `nth` (from 1) line of `text` that is exactly `wanted` once
/// trimmed; panics when there is none.
fn line_of(text: &str, wanted: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == wanted)
        .nth(nth - 1)
        .map(|(i, _)| i + 1)
        .unwrap_or_else(|| panic!("test bug: no {nth}. line {wanted:?} in:\n{text}"))
}

/// Whether `n` occurs in `s` right after `prefix`, not followed by another digit.
fn number_after(s: &str, prefix: &str, n: usize) -> bool {
    let pat = format!("{prefix}{n}");
    s.match_indices(&pat)
        .any(|(i, _)| !s[i + pat.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Whether `word` occurs in `s` as a whole key name (not inside a longer name; `--word` counts).
fn has_word(s: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    s.match_indices(word).any(|(i, _)| {
        let before = &s[..i];
        (!before.ends_with(is_name) || (before.ends_with("--") && !before.ends_with("---")))
            && !s[i + word.len()..].starts_with(is_name)
    })
}

/// Whether an error line names `path` and line `line` (`PATH:LINE`, or `line LINE`).
fn names_line(err_line: &str, path: &str, line: usize) -> bool {
    number_after(err_line, &format!("{path}:"), line)
        || number_after(&err_line.to_ascii_lowercase(), "line ", line)
}

/// `run --config PATH` must exit 2 without listening, with one stderr line that names the file,
/// line `line` of it and `key`. Returns stderr.
fn config_error(path: &Path, line: usize, key: &str) -> String {
    let err = config_cmd(path).startup_error();
    let p = path.to_str().unwrap();
    let found = err
        .lines()
        .any(|l| l.contains(p) && names_line(l, p, line) && has_word(&l.replace(p, ""), key));
    assert!(
        found,
        "no stderr line names the file {p}, line {line} and the key `{key}`:\n{err}\n\
         --- the file ---\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
    err
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Whether a log line is the `listening` line of route `name`.
fn is_listening(line: &str, name: &str) -> bool {
    line.contains("listening")
        && !line.contains("admin listening")
        && field(line, "route") == Some(name)
        && field(line, "addr").is_some()
}

/// Starts `cmd` and waits for the listening line of every route in `names`; returns their
/// addresses by name.
fn start_routes(cmd: &Cmd, names: &[&str]) -> (Sidecar, HashMap<String, SocketAddr>) {
    let mut proxy = cmd.spawn();
    let mut addrs = HashMap::new();
    for name in names {
        let line = proxy.wait_for_line(&format!("the listening line of route {name}"), WAIT, |l| {
            is_listening(l, name)
        });
        let addr = field(&line, "addr").unwrap();
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| proxy.fail(&format!("addr={addr} is no socket address: {e}")));
        assert!(
            addr.ip().is_loopback() && addr.port() != 0,
            "route {name} listens on {addr}: {line}"
        );
        addrs.insert(name.to_string(), addr);
    }
    let distinct: std::collections::HashSet<_> = addrs.values().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "two routes on one address: {addrs:?}"
    );
    (proxy, addrs)
}

/// Connection lines of route `name` so far.
fn conn_lines_of(proxy: &Sidecar, name: &str) -> Vec<String> {
    proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_conn_line(l) && field(l, "route") == Some(name))
        .collect()
}

/// Waits for `n` connection lines of route `name`.
fn wait_conn_lines_of(proxy: &mut Sidecar, name: &str, n: usize) -> Vec<String> {
    blocking(|| {
        proxy.wait_for_lines(&format!("connection line of route {name}"), n, WAIT, |l| {
            is_conn_line(l) && field(l, "route") == Some(name)
        })
    })
}

/// One echo of a few bytes through `addr`, which must come back whole.
async fn echo(addr: SocketAddr, seed: u64) {
    let data = pattern(seed, 1000 + seed as usize);
    let got = exchange(addr, data.clone()).await;
    assert!(
        got == data,
        "echo through {addr} altered or cut ({} of {} bytes back)",
        got.len(),
        data.len()
    );
}

/// One echo through `addr` towards `up`; returns what `up` saw of it (one connection at a time
/// per upstream).
async fn echo_seen(addr: SocketAddr, up: &Upstream, seed: u64) -> Conn {
    let before = up.stats.tls_accepted();
    echo(addr, seed).await;
    let conns = up.stats.conns();
    assert_eq!(
        conns.len(),
        before + 1,
        "the upstream saw {} new TLS connections for one app connection",
        conns.len() - before
    );
    conns.last().cloned().unwrap()
}

fn assert_presented(conn: &Conn, id: &Identity, when: &str) {
    let seen = conn.client_der.as_deref().map(serial_of);
    assert!(
        conn.client_der.as_deref() == Some(id.der.as_ref()),
        "{when}: the upstream saw client certificate serial {seen:?} (CN {:?}), expected {}",
        conn.client_cn,
        id.serial_hex()
    );
}

/// Opens a connection through `addr` that the app cannot use: it must be closed without a byte.
async fn closed_without_data(addr: SocketAddr) {
    let mut stream = connect(addr).await;
    let _ = stream.write_all(b"hello").await;
    expect_closed_without_data(&mut stream, WAIT).await;
}

// ---------------------------------------------------------------------------------------------
// Errors: exit 2 naming the file, the line and the key

/// Two good routes; `third` is appended as the third route's extra lines (or replaces it).
fn base_config(pki: &Pki) -> String {
    let mut text = defaults(pki);
    text.push_str("connect_timeout = \"5s\"\n");
    text.push_str(&route("a", "127.0.0.1:9", "server_name = \"localhost\""));
    text.push_str(&route("b", "127.0.0.1:9", "mode = \"tcp\""));
    text
}

/// The base configuration itself starts: the error tests below fail for the reason they test.
#[test]
fn the_base_configuration_of_the_error_tests_is_valid() {
    let pki = Pki::new();
    let path = write_config(&pki, "config.toml", &base_config(&pki));
    let (proxy, _) = start_routes(&config_cmd(&path), &["a", "b"]);
    drop(proxy);
}

#[test]
fn unknown_key_in_a_route() {
    let pki = Pki::new();
    // The flag's spelling instead of the key's: a likely mistake.
    let text = base_config(&pki) + "server-name = \"localhost\"\n";
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "server-name = \"localhost\"", 1);
    config_error(&path, line, "server-name");
}

#[test]
fn unknown_key_in_defaults() {
    let pki = Pki::new();
    let text = base_config(&pki).replacen(
        "connect_timeout = \"5s\"\n",
        "connect_timeout = \"5s\"\nverify_hostname = false\n",
        1,
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "verify_hostname = false", 1);
    config_error(&path, line, "verify_hostname");
}

#[test]
fn unknown_key_in_admin() {
    let pki = Pki::new();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallow_shutdwon = true\n\n{}",
        base_config(&pki)
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "allow_shutdwon = true", 1);
    config_error(&path, line, "allow_shutdwon");
}

/// `[default]` for `[defaults]`: silently ignoring it would drop every inherited setting.
#[test]
fn unknown_top_level_table() {
    let pki = Pki::new();
    let text = format!(
        "[default]\nconnect_timeout = \"5s\"\n\n{}",
        base_config(&pki)
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "[default]", 1);
    config_error(&path, line, "default");
}

#[test]
fn wrong_type() {
    let pki = Pki::new();
    let text = base_config(&pki) + "max_connections = \"ten\"\n";
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "max_connections = \"ten\"", 1);
    config_error(&path, line, "max_connections");
}

#[test]
fn wrong_type_in_admin() {
    let pki = Pki::new();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallow_shutdown = \"yes\"\n\n{}",
        base_config(&pki)
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "allow_shutdown = \"yes\"", 1);
    config_error(&path, line, "allow_shutdown");
}

#[test]
fn bad_duration_in_a_route() {
    let pki = Pki::new();
    let text = base_config(&pki) + "connect_timeout = \"soon\"\n";
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "connect_timeout = \"soon\"", 1);
    config_error(&path, line, "connect_timeout");
}

#[test]
fn bad_duration_in_defaults() {
    let pki = Pki::new();
    let text = base_config(&pki).replacen(
        "connect_timeout = \"5s\"\n",
        "connect_timeout = \"5s\"\nidle_timeout = \"soon\"\n",
        1,
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "idle_timeout = \"soon\"", 1);
    config_error(&path, line, "idle_timeout");
}

/// A third route without `key`: the line is that of its `[[route]]` header (the third one).
fn missing_required(key: &str) {
    let pki = Pki::new();
    let mut text = base_config(&pki);
    text.push_str("\n[[route]]\n");
    for (k, v) in [
        ("name", "\"c\""),
        ("listen", "\"127.0.0.1:0\""),
        ("upstream", "\"127.0.0.1:9\""),
    ] {
        if k != key {
            let _ = writeln!(text, "{k} = {v}");
        }
    }
    text.push_str("server_name = \"localhost\"\n");
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "[[route]]", 3);
    config_error(&path, line, key);
}

#[test]
fn missing_route_name() {
    missing_required("name");
}

#[test]
fn missing_route_listen() {
    missing_required("listen");
}

#[test]
fn missing_route_upstream() {
    missing_required("upstream");
}

#[test]
fn duplicate_route_name() {
    let pki = Pki::new();
    let text = base_config(&pki) + &route("a", "127.0.0.1:9", "");
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, "name = \"a\"", 2);
    config_error(&path, line, "name");
}

/// The same fixed port twice (two routes on port 0 are fine: see every other test here).
#[test]
fn duplicate_listen_address() {
    let pki = Pki::new();
    let port = free_port();
    let listen = format!("listen = \"127.0.0.1:{port}\"");
    let mut text = defaults(&pki);
    let _ = write!(
        text,
        "\n[[route]]\nname = \"a\"\n{listen}\nupstream = \"127.0.0.1:9\"\n\
         \n[[route]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
         \n[[route]]\nname = \"c\"\n{listen}\nupstream = \"127.0.0.1:9\"\n"
    );
    let path = write_config(&pki, "config.toml", &text);
    let line = line_of(&text, &listen, 2);
    config_error(&path, line, "listen");
}

/// A route with a certificate (from `[defaults]`) but no key anywhere: the error names the
/// file, the route and the key.
#[test]
fn identity_missing_from_route_and_defaults() {
    let pki = Pki::new();
    let text = format!(
        "[defaults]\ncert = {}\nca = {}\n{}{}",
        qp(&pki.client.cert),
        qp(&pki.ca.pem),
        route(
            "with-key",
            "127.0.0.1:9",
            &format!("key = {}", qp(&pki.client.key))
        ),
        route("keyless", "127.0.0.1:9", ""),
    );
    let path = write_config(&pki, "config.toml", &text);
    let err = config_cmd(&path).startup_error();
    let p = path.to_str().unwrap();
    assert!(
        err.lines().any(|l| {
            let rest = l.replace(p, "");
            l.contains(p) && rest.contains("keyless") && has_word(&rest, "key")
        }),
        "no stderr line names the file {p}, the route `keyless` and the key `key`:\n{err}"
    );
}

#[test]
fn missing_config_file() {
    let pki = Pki::new();
    let path = pki.path("no-such-config.toml");
    let err = config_cmd(&path).startup_error();
    assert!(
        err.contains(path.to_str().unwrap()),
        "stderr does not name {}:\n{err}",
        path.display()
    );
}

/// Route flags cannot be mixed with `--config`: a usage error naming the flag.
#[test]
fn route_flags_with_config_are_a_usage_error() {
    let pki = Pki::new();
    let path = write_config(&pki, "config.toml", &base_config(&pki));
    let cert = pki.client.cert.to_str().unwrap().to_string();
    for (flag, value) in [
        ("--upstream", "127.0.0.1:9"),
        ("--listen", "127.0.0.1:0"),
        ("--cert", cert.as_str()),
    ] {
        let err = config_cmd(&path).args([flag, value]).startup_error();
        assert!(
            err.contains(flag),
            "`run --config FILE {flag} ...`: stderr does not name {flag}:\n{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviour

fn client(pki: &Pki, name: &str) -> Identity {
    pki.leaf(&pki.ca, name, LeafSpec::client(name))
}

/// Two routes to two upstreams, each with its own client identity (the CA from `[defaults]`):
/// each upstream sees its own route's certificate, and the logs tell the routes apart.
#[tokio::test(flavor = "multi_thread")]
async fn two_routes_present_their_own_identities() {
    let pki = Pki::new();
    let (id_a, id_b) = (
        client(&pki, "route-a-client"),
        client(&pki, "route-b-client"),
    );
    let up_a = Upstream::echo(&pki.server, &pki.ca.der).await;
    let up_b = Upstream::echo(&pki.server, &pki.ca.der).await;
    let text = format!(
        "# two routes, two identities\n[defaults]\nca = {}\nconnect_timeout = \"5s\"\n{}{}",
        qp(&pki.ca.pem),
        route(
            "a",
            up_a.addr,
            &format!(
                "cert = {}\nkey = {}\nserver_name = \"localhost\"",
                qp(&id_a.cert),
                qp(&id_a.key)
            )
        ),
        route(
            "b",
            format!("localhost:{}", up_b.port()),
            &format!("cert = {}\nkey = {}", qp(&id_b.cert), qp(&id_b.key))
        ),
    );
    let path = write_config(&pki, "routes.toml", &text);
    // Process-wide flags go along with --config.
    let cmd = config_cmd(&path).args(["--drain-timeout", "5s", "--log-level", "info"]);
    let (mut proxy, addrs) = blocking(|| start_routes(&cmd, &["a", "b"]));

    for round in 0..2u64 {
        let seen_a = echo_seen(addrs["a"], &up_a, round * 2).await;
        assert_presented(&seen_a, &id_a, "route a");
        assert_eq!(seen_a.sni.as_deref(), Some("localhost"), "route a's SNI");
        let seen_b = echo_seen(addrs["b"], &up_b, round * 2 + 1).await;
        assert_presented(&seen_b, &id_b, "route b");
        assert_eq!(seen_b.sni.as_deref(), Some("localhost"), "route b's SNI");
    }
    assert_eq!(up_a.stats.tls_accepted(), 2, "route a's upstream");
    assert_eq!(up_b.stats.tls_accepted(), 2, "route b's upstream");

    for (name, up) in [
        ("a", up_a.addr.to_string()),
        ("b", format!("localhost:{}", up_b.port())),
    ] {
        let lines = wait_conn_lines_of(&mut proxy, name, 2);
        assert_eq!(lines.len(), 2, "route {name}: {lines:#?}");
        for line in &lines {
            assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
            assert_eq!(field(line, "upstream"), Some(up.as_str()), "{line}");
        }
    }
    assert_eq!(
        proxy.count_lines(|l| is_conn_line(l) && field(l, "route") == Some("default")),
        0,
        "connection lines with route=default under --config"
    );
}

/// Each route sets its own trust and checks or inherits them: a route with its own `ca` reaches
/// an upstream from another CA; a route that inherits the default CA is refused there; a route
/// with a wrong `pin_sha256` is refused by an upstream the unpinned route reaches.
#[tokio::test(flavor = "multi_thread")]
async fn routes_set_their_own_trust_and_checks_or_inherit_them() {
    let pki = Pki::new();
    let other = pki.new_ca("other-ca", "second upstream CA");
    let other_server = pki.leaf(&other, "other-server", LeafSpec::server());
    let up_main = Upstream::echo(&pki.server, &pki.ca.der).await;
    let up_other = Upstream::echo(&other_server, &pki.ca.der).await;
    let text = format!(
        "{}connect_timeout = \"5s\"\nserver_name = \"localhost\"\n{}{}{}{}{}",
        defaults(&pki),
        route("inherits", up_main.addr, ""),
        route("own-ca", up_other.addr, &format!("ca = {}", qp(&other.pem))),
        route("default-ca", up_other.addr, ""),
        route(
            "wrong-pin",
            up_main.addr,
            &format!("pin_sha256 = [{}]", q(other_server.spki_pin()))
        ),
        route(
            "right-pin",
            up_main.addr,
            &format!(
                "pin_sha256 = [{}, {}]",
                q(other_server.spki_pin()),
                q(pki.server.spki_pin())
            )
        ),
    );
    let path = write_config(&pki, "config.toml", &text);
    let names = ["inherits", "own-ca", "default-ca", "wrong-pin", "right-pin"];
    let (mut proxy, addrs) = blocking(|| start_routes(&config_cmd(&path), &names));

    echo(addrs["inherits"], 1).await;
    echo(addrs["own-ca"], 2).await;
    echo(addrs["right-pin"], 3).await;
    closed_without_data(addrs["default-ca"]).await;
    closed_without_data(addrs["wrong-pin"]).await;

    for (name, outcome) in [
        ("inherits", "ok"),
        ("own-ca", "ok"),
        ("right-pin", "ok"),
        ("default-ca", "tls_error"),
        ("wrong-pin", "tls_error"),
    ] {
        let lines = wait_conn_lines_of(&mut proxy, name, 1);
        assert_eq!(lines.len(), 1, "route {name}: {lines:#?}");
        assert_eq!(
            field(&lines[0], "outcome"),
            Some(outcome),
            "route {name}: {}",
            lines[0]
        );
    }
    assert_eq!(
        up_other.stats.tls_accepted(),
        1,
        "only route own-ca completes a handshake with the other CA's upstream"
    );
}

/// While one route's upstream refuses connections and another's accepts TCP but never answers
/// the handshake, a third route serves many connections at once. The silent route times out
/// after `[defaults]`' connect_timeout, a route that sets its own longer one is still waiting
/// then.
#[tokio::test(flavor = "multi_thread")]
async fn failing_and_slow_routes_do_not_disturb_a_healthy_one() {
    const DEFAULT_TIMEOUT_MS: u64 = 4000;
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let silent = Silent::start().await;
    let down = format!("127.0.0.1:{}", free_port());
    let text = format!(
        "{}server_name = \"localhost\"\nconnect_timeout = \"{DEFAULT_TIMEOUT_MS}ms\"\n{}{}{}{}",
        defaults(&pki),
        route("ok", up.addr, ""),
        route("down", &down, ""),
        route("slow", silent.addr, ""),
        route("patient", silent.addr, "connect_timeout = \"60s\""),
    );
    let path = write_config(&pki, "config.toml", &text);
    let (mut proxy, addrs) =
        blocking(|| start_routes(&config_cmd(&path), &["ok", "down", "slow", "patient"]));

    // Hang a few handshakes on the silent upstream first.
    let started = Instant::now();
    let mut hanging: Vec<TcpStream> = Vec::new();
    for route in ["slow", "slow", "slow", "patient"] {
        let mut s = connect(addrs[route]).await;
        s.write_all(b"waiting").await.expect("write");
        hanging.push(s);
    }
    let deadline = Instant::now() + WAIT;
    while silent.accepted.load(std::sync::atomic::Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "the proxy never dialled the silent upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Now the healthy route, many at once, while the down route is hammered too.
    let mut tasks = JoinSet::new();
    for i in 0..12u64 {
        let addr = addrs["ok"];
        tasks.spawn(async move { echo(addr, 100 + i).await });
    }
    for _ in 0..6 {
        let addr = addrs["down"];
        tasks.spawn(async move { closed_without_data(addr).await });
    }
    while let Some(res) = tasks.join_next().await {
        res.expect("a connection task failed");
    }
    let ok_lines = wait_conn_lines_of(&mut proxy, "ok", 12);
    let elapsed = started.elapsed();
    assert!(
        conn_lines_of(&proxy, "slow").is_empty(),
        "test too slow to prove anything: the silent route timed out before the healthy \
         route's connections were done ({elapsed:?})"
    );
    for line in &ok_lines {
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    }
    let down_lines = wait_conn_lines_of(&mut proxy, "down", 6);
    for line in &down_lines {
        assert_eq!(field(line, "outcome"), Some("connect_error"), "{line}");
        assert_eq!(field(line, "upstream"), Some(down.as_str()), "{line}");
    }
    assert_eq!(
        up.stats.tls_accepted(),
        12,
        "the healthy upstream's handshakes"
    );

    // The silent route times out after the inherited connect_timeout; the patient one waits on.
    let slow_lines = wait_conn_lines_of(&mut proxy, "slow", 3);
    for line in &slow_lines {
        assert_eq!(field(line, "outcome"), Some("timeout"), "{line}");
        let ms = num_field(line, "duration_ms");
        assert!(
            (DEFAULT_TIMEOUT_MS - 200..DEFAULT_TIMEOUT_MS + 5000).contains(&ms),
            "the silent route gave up after {ms} ms, [defaults] says {DEFAULT_TIMEOUT_MS} ms: \
             {line}"
        );
    }
    assert!(
        conn_lines_of(&proxy, "patient").is_empty(),
        "the route with connect_timeout = \"60s\" gave up early: {:#?}",
        conn_lines_of(&proxy, "patient")
    );
    // And the healthy route still works after all that.
    echo(addrs["ok"], 999).await;
    drop(hanging);
}

/// Two routes share the identity files of `[defaults]`, a third has its own. SIGHUP after a
/// rotation of the shared files: both sharing routes present the new certificate, the third
/// keeps its own.
#[tokio::test(flavor = "multi_thread")]
async fn shared_identity_rotates_on_every_route_that_uses_it() {
    let pki = Pki::new();
    let (first, second) = (client(&pki, "shared-1"), client(&pki, "shared-2"));
    let own = client(&pki, "own-identity");
    let live = LiveIdentity::new(pki.dir.path(), &first);
    let up_a = Upstream::echo(&pki.server, &pki.ca.der).await;
    let up_b = Upstream::echo(&pki.server, &pki.ca.der).await;
    let up_c = Upstream::echo(&pki.server, &pki.ca.der).await;
    let text = format!(
        "[defaults]\ncert = {}\nkey = {}\nca = {}\nserver_name = \"localhost\"\n\
         reload_interval = \"0\"\n{}{}{}",
        qp(&live.cert),
        qp(&live.key),
        qp(&pki.ca.pem),
        route("a", up_a.addr, ""),
        route("b", up_b.addr, ""),
        route(
            "c",
            up_c.addr,
            &format!("cert = {}\nkey = {}", qp(&own.cert), qp(&own.key))
        ),
    );
    let path = write_config(&pki, "config.toml", &text);
    let (mut proxy, addrs) = blocking(|| start_routes(&config_cmd(&path), &["a", "b", "c"]));

    assert_presented(&echo_seen(addrs["a"], &up_a, 1).await, &first, "route a");
    assert_presented(&echo_seen(addrs["b"], &up_b, 2).await, &first, "route b");
    assert_presented(&echo_seen(addrs["c"], &up_c, 3).await, &own, "route c");

    live.install(&second);
    proxy.signal("HUP");
    let serial = second.serial_hex();
    blocking(|| {
        proxy.wait_for_line(
            &format!("an `identity reloaded` line with serial={serial}"),
            WAIT,
            |l| is_reloaded(l) && field(l, "serial") == Some(&*serial),
        )
    });
    // However the reload is logged, each sharing route presents the new certificate soon.
    for (name, up) in [("a", &up_a), ("b", &up_b)] {
        let deadline = Instant::now() + WAIT;
        let mut seed = 10;
        loop {
            let conn = echo_seen(addrs[name], up, seed).await;
            if conn.client_der.as_deref() == Some(second.der.as_ref()) {
                break;
            }
            if Instant::now() >= deadline {
                assert_presented(&conn, &second, &format!("route {name} after SIGHUP"));
            }
            seed += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_presented(
        &echo_seen(addrs["c"], &up_c, 50).await,
        &own,
        "route c (own files) after SIGHUP",
    );
    let failed: Vec<String> = proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_reload_failed(l))
        .collect();
    assert!(failed.is_empty(), "reload failures: {failed:#?}");
}

/// `[admin] listen`: `/metrics` has series for both routes, `/status` lists both routes with
/// their addresses and identities, and `allow_shutdown = true` enables `POST /shutdown`.
#[tokio::test(flavor = "multi_thread")]
async fn admin_table_serves_metrics_and_status_for_every_route() {
    let pki = Pki::new();
    let id_a = client(&pki, "metrics-a");
    let id_b = client(&pki, "metrics-b");
    let up_a = Upstream::echo(&pki.server, &pki.ca.der).await;
    let up_b = Upstream::echo(&pki.server, &pki.ca.der).await;
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallow_shutdown = true\n\n\
         [defaults]\nca = {}\nserver_name = \"localhost\"\n{}{}",
        qp(&pki.ca.pem),
        route(
            "a",
            up_a.addr,
            &format!("cert = {}\nkey = {}", qp(&id_a.cert), qp(&id_a.key))
        ),
        route(
            "b",
            up_b.addr,
            &format!("cert = {}\nkey = {}", qp(&id_b.cert), qp(&id_b.key))
        ),
    );
    let path = write_config(&pki, "config.toml", &text);
    let (mut proxy, addrs) = blocking(|| start_routes(&config_cmd(&path), &["a", "b"]));
    let admin = admin_addr(&mut proxy);

    let sizes_a = [300usize, 4000];
    for (i, &n) in sizes_a.iter().enumerate() {
        let data = pattern(i as u64, n);
        assert!(exchange(addrs["a"], data.clone()).await == data, "echo a");
    }
    let data = pattern(7, 50_000);
    assert!(exchange(addrs["b"], data.clone()).await == data, "echo b");
    wait_conn_lines_of(&mut proxy, "a", 2);
    wait_conn_lines_of(&mut proxy, "b", 1);

    let conns = "mtls_sidecar_connections_total";
    let bytes = "mtls_sidecar_bytes_total";
    let metrics = scrape_until(admin, |m| {
        m.count(conns, &[("route", "a"), ("outcome", "ok")]) >= 2.0
            && m.count(conns, &[("route", "b"), ("outcome", "ok")]) >= 1.0
            && m.count(bytes, &[("route", "b"), ("direction", "from_upstream")]) >= 50_000.0
            && m.count(bytes, &[("route", "a"), ("direction", "from_upstream")]) >= 4300.0
    })
    .await;
    assert_eq!(
        metrics.value(conns, &[("route", "a"), ("outcome", "ok")]),
        2.0
    );
    assert_eq!(
        metrics.value(conns, &[("route", "b"), ("outcome", "ok")]),
        1.0
    );
    for (route, total) in [("a", 4300.0), ("b", 50_000.0)] {
        for dir in ["to_upstream", "from_upstream"] {
            assert_eq!(
                metrics.value(bytes, &[("route", route), ("direction", dir)]),
                total,
                "bytes_total route={route} direction={dir}"
            );
        }
        assert_eq!(
            metrics.value("mtls_sidecar_active_connections", &[("route", route)]),
            0.0,
            "active_connections route={route}"
        );
        assert_eq!(
            metrics.value(
                "mtls_sidecar_upstream_handshake_seconds_count",
                &[("route", route)]
            ),
            if route == "a" { 2.0 } else { 1.0 },
            "handshakes of route {route}"
        );
    }
    assert_eq!(
        metrics.value(
            "mtls_sidecar_client_cert_expiry_timestamp_seconds",
            &[("route", "a")]
        ),
        id_a.not_after_unix() as f64
    );
    assert_eq!(
        metrics.value(
            "mtls_sidecar_client_cert_expiry_timestamp_seconds",
            &[("route", "b")]
        ),
        id_b.not_after_unix() as f64
    );
    assert!(
        metrics.matching(conns, &[("route", "default")]).is_empty(),
        "a route=\"default\" series under --config:\n{}",
        metrics.text
    );

    let resp = get(admin, "/status").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let st: Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {}", resp.body));
    let routes = st["routes"].as_array().expect("routes is an array");
    assert_eq!(routes.len(), 2, "{st}");
    for (name, up) in [("a", &up_a), ("b", &up_b)] {
        let r = routes
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no route {name} in /status: {st}"));
        assert_eq!(r["listen"], addrs[name].to_string(), "{st}");
        assert_eq!(r["upstream"], up.addr.to_string(), "{st}");
        assert_eq!(r["mode"], "tcp", "{st}");
        assert_eq!(r["active_connections"], 0, "{st}");
    }
    let ids = st["identities"].as_array().expect("identities is an array");
    for (name, id) in [("a", &id_a), ("b", &id_b)] {
        let i = ids
            .iter()
            .find(|i| i["serial"] == id.serial_hex())
            .unwrap_or_else(|| panic!("route {name}'s identity is not in /status: {st}"));
        assert_eq!(i["route"], name, "{st}");
    }
    assert_eq!(get(admin, "/readyz").await.status, 200);

    // allow_shutdown = true
    let resp = request(admin, "POST", "/shutdown").await;
    assert_eq!(
        resp.status, 200,
        "POST /shutdown with allow_shutdown = true: {resp:?}"
    );
    let status = blocking(|| proxy.wait_exit(WAIT));
    assert_eq!(status.code(), Some(0), "exit after POST /shutdown");
}

/// A route in http mode and one in tcp mode in one file, read from `MTLS_SIDECAR_CONFIG`.
#[tokio::test(flavor = "multi_thread")]
async fn http_and_tcp_routes_side_by_side_from_the_environment() {
    let pki = Pki::new();
    let web_up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let raw_up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let web_upstream = format!("localhost:{}", web_up.port());
    let text = format!(
        "{}{}{}",
        defaults(&pki),
        route("web", &web_upstream, "mode = \"http\""),
        route(
            "raw",
            raw_up.addr,
            "mode = \"tcp\"\nserver_name = \"localhost\""
        ),
    );
    let path = write_config(&pki, "config.toml", &text);
    let cmd = Cmd::new().arg("run").env("MTLS_SIDECAR_CONFIG", &path);
    let (mut proxy, addrs) = blocking(|| start_routes(&cmd, &["web", "raw"]));

    let reply = h1_call(
        addrs["web"],
        h1_req("GET", "/hello?x=1")
            .header("x-request-id", "via-web")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.text(), "ok\n");
    let seen = web_up.stats.request("via-web");
    assert_eq!(seen.target, "/hello?x=1", "{seen:?}");
    assert_eq!(
        seen.host(),
        Some(web_upstream.as_str()),
        "the http route rewrites Host to its upstream: {seen:?}"
    );
    let conn = web_up.stats.conn(seen.conn);
    assert_eq!(
        conn.client_serial.as_deref(),
        Some(&*pki.client.serial_hex()),
        "{conn:?}"
    );

    // The tcp route passes bytes untouched, HTTP-looking or not.
    let req = b"GET / HTTP/1.1\r\nHost: raw\r\n\r\n".to_vec();
    assert_eq!(exchange(addrs["raw"], req.clone()).await, req, "raw echo");
    echo(addrs["raw"], 5).await;
    let lines = wait_conn_lines_of(&mut proxy, "raw", 2);
    for line in &lines {
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
    }
    assert_eq!(raw_up.stats.tls_accepted(), 2);
    // The http route's requests are its own: nothing reached the tcp route's upstream, and
    // the http route logs under its own name.
    blocking(|| {
        proxy.wait_for_line(
            "a log line of route web about the app's connection",
            WAIT,
            |l| field(l, "route") == Some("web") && field(l, "peer").is_some(),
        )
    });
    assert_eq!(web_up.stats.request_count(), 1);
}
