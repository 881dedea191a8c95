//! Identity rotation without restarts: by atomic rename, by a Kubernetes `..data` symlink
//! swap and by SIGHUP; CA rotation; broken rotations that keep the old identity serving; a
//! writer that replaces certificate and key in two steps; rotation under load; expiry warnings.
//!
//! Every rotation is shown by what the upstream sees on the next connection (the new
//! certificate, also where the upstream would resume a session made with the old one), while a
//! connection opened before keeps carrying data both ways.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::HandshakeKind;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::files::*;
use crate::support::pki::{Identity, LeafSpec, serial_of};
use crate::support::refused::{accepted, assert_failed, refused};
use crate::support::upstream::server_config;
use crate::support::*;

/// Lets other tasks run on this worker while a blocking wait on the proxy's log goes on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Checks a successful reload's line against the identity it should have loaded.
fn check_reloaded_line(line: &str, id: &Identity, cn: &str) {
    assert!(line.contains("INFO"), "a reload logs at INFO: {line}");
    assert_eq!(field(line, "route"), Some("default"), "{line}");
    assert_eq!(
        field(line, "serial"),
        Some(&*id.serial_hex()),
        "serial= of the new certificate: {line}"
    );
    let subject = field(line, "subject").unwrap_or_else(|| panic!("no subject= in: {line}"));
    assert!(
        subject.contains(&format!("CN={cn}")),
        "subject= names no CN={cn}: {line}"
    );
    let not_after = field(line, "not_after").unwrap_or_else(|| panic!("no not_after= in: {line}"));
    let parsed = OffsetDateTime::parse(not_after, &Rfc3339)
        .unwrap_or_else(|e| panic!("not_after={not_after} is not RFC 3339 ({e}): {line}"));
    assert_eq!(
        parsed.unix_timestamp(),
        id.not_after_unix(),
        "not_after= is not the new certificate's: {line}"
    );
}

/// Waits for the `identity reloaded` line carrying `id`'s serial and checks it.
fn wait_reloaded_to(proxy: &mut Sidecar, id: &Identity, cn: &str) -> String {
    let serial = id.serial_hex();
    let line = blocking(|| {
        proxy.wait_for_line(
            &format!("an `identity reloaded` line with serial={serial}"),
            WAIT,
            |l| is_reloaded(l) && field(l, "serial") == Some(&*serial),
        )
    });
    check_reloaded_line(&line, id, cn);
    line
}

fn assert_no_reload_failure(proxy: &Sidecar) {
    let failed: Vec<String> = proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_reload_failed(l) || (l.contains("WARN") && l.contains("reload")))
        .collect();
    if !failed.is_empty() {
        proxy.fail(&format!("unexpected reload failure lines: {failed:#?}"));
    }
}

/// Asserts that the upstream saw `id` as the client certificate of `conn`.
fn assert_presented(conn: &upstream::Conn, id: &Identity, when: &str) {
    let seen = conn.client_der.as_deref().map(serial_of);
    assert!(
        conn.client_der.as_deref() == Some(id.der.as_ref()),
        "{when}: the upstream saw client certificate serial {seen:?}, expected {} \
         (handshake {:?})",
        id.serial_hex(),
        conn.kind
    );
}

/// A connection opened through the proxy and proven open end to end.
async fn open_held(proxy: &Sidecar) -> TcpStream {
    let mut stream = connect(proxy.addr()).await;
    stream.write_all(b"before").await.expect("write");
    assert_eq!(read_exact(&mut stream, 6).await, b"before");
    stream
}

/// A connection opened before a reload still carries data both ways, then ends cleanly.
async fn still_carries(mut stream: TcpStream, seed: u64) {
    let data = pattern(seed, 200_000);
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(&data)
            .await
            .expect("write on the held connection");
    };
    let read = async {
        let mut got = vec![0u8; data.len()];
        tokio::time::timeout(WAIT, rd.read_exact(&mut got))
            .await
            .expect("the held connection stalled after the reload")
            .expect("the held connection broke after the reload");
        got
    };
    let ((), got) = tokio::join!(write, read);
    assert!(got == data, "bytes on the held connection altered");
    let tail = exchange_on(stream, b"after".to_vec()).await;
    assert_eq!(tail, b"after", "the held connection did not end cleanly");
}

/// Every connection line so far says outcome=ok.
fn assert_all_conns_ok(proxy: &mut Sidecar, n: usize) {
    let lines = blocking(|| proxy.wait_conn_lines(n));
    for line in &lines {
        assert_eq!(field(line, "outcome"), Some("ok"), "{line}");
        assert!(!line.contains("WARN"), "{line}");
    }
}

fn client(pki: &Pki, name: &str) -> Identity {
    pki.leaf(&pki.ca, name, LeafSpec::client(name))
}

/// An upstream that resumes sessions both ways (stateful cache and stateless tickets) and
/// echoes.
async fn resuming_upstream(pki: &Pki) -> Upstream {
    let mut cfg = server_config(&pki.server, &[&pki.ca.der]);
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().expect("ticketer");
    cfg.send_tls13_tickets = 4;
    Upstream::start(cfg, vec![Behavior::Echo]).await
}

/// Atomic rename of cert and key, against an upstream that would resume the old session.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn atomic_rename_rotation_beats_session_resumption() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "rename-a"), client(&pki, "rename-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = resuming_upstream(&pki).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "200ms"])
        .start();

    let held = open_held(&proxy).await;
    assert_presented(&up.stats.conns()[0], &a, "first connection");
    let c1 = accepted(&mut proxy, &up).await;
    let c2 = accepted(&mut proxy, &up).await;
    assert_presented(&c1, &a, "before the rotation");
    assert_presented(&c2, &a, "before the rotation");
    assert_eq!(
        c2.kind,
        Some(HandshakeKind::Resumed),
        "the upstream does not resume sessions, so this test would prove nothing"
    );

    live.install(&b);
    wait_reloaded_to(&mut proxy, &b, "rename-b");
    let c3 = accepted(&mut proxy, &up).await;
    assert_presented(&c3, &b, "first connection after the reload");
    let c4 = accepted(&mut proxy, &up).await;
    assert_presented(&c4, &b, "second connection after the reload");

    still_carries(held, 1).await;
    assert_all_conns_ok(&mut proxy, 5);
    assert_no_reload_failure(&proxy);
}

/// kubelet's update of a Secret volume: only the `..data` symlink changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn kubernetes_data_symlink_swap() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "k8s-a"), client(&pki, "k8s-b"));
    let files = |id: &Identity| {
        vec![
            ("tls.crt", std::fs::read(&id.cert).unwrap()),
            ("tls.key", std::fs::read(&id.key).unwrap()),
            ("ca.crt", std::fs::read(&pki.ca.pem).unwrap()),
        ]
    };
    let mut vol = SecretVolume::new(&pki.path("secret"), &files(&a));
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(
        up.addr,
        &vol.path("tls.crt"),
        &vol.path("tls.key"),
        &vol.path("ca.crt"),
    )
    .args(["--reload-interval", "200ms"])
    .start();

    let held = open_held(&proxy).await;
    assert_presented(&accepted(&mut proxy, &up).await, &a, "before the swap");

    vol.swap(&files(&b));
    wait_reloaded_to(&mut proxy, &b, "k8s-b");
    assert_presented(&accepted(&mut proxy, &up).await, &b, "after the swap");

    still_carries(held, 2).await;
    assert_all_conns_ok(&mut proxy, 3);
    assert_no_reload_failure(&proxy);
}

/// `--reload-interval 0`: files are not polled, SIGHUP reloads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn sighup_reloads_when_polling_is_off() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "hup-a"), client(&pki, "hup-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = resuming_upstream(&pki).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--server-name", "localhost", "--reload-interval", "0"])
        .start();

    let held = open_held(&proxy).await;
    assert_presented(&accepted(&mut proxy, &up).await, &a, "before the rotation");

    // Files changed, no signal: nothing happens (a 0 interval means no polling at all).
    live.install(&b);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        proxy.count_lines(is_reloaded),
        0,
        "reloaded without SIGHUP under --reload-interval 0"
    );
    assert_presented(
        &accepted(&mut proxy, &up).await,
        &a,
        "files changed but no SIGHUP yet",
    );

    proxy.signal("HUP");
    wait_reloaded_to(&mut proxy, &b, "hup-b");
    assert_presented(&accepted(&mut proxy, &up).await, &b, "after SIGHUP");

    still_carries(held, 3).await;
    assert_all_conns_ok(&mut proxy, 4);
    assert_no_reload_failure(&proxy);
}

/// `MTLS_SIDECAR_RELOAD_INTERVAL` is read: a bad value is a usage error.
#[test]
fn reload_interval_from_the_environment_is_validated() {
    let pki = Pki::new();
    let err = run_cmd(&pki, "127.0.0.1:9")
        .env("MTLS_SIDECAR_RELOAD_INTERVAL", "soonish")
        .startup_error();
    assert!(
        err.contains("soonish") || err.to_lowercase().contains("reload"),
        "the error names neither the value nor the setting:\n{err}"
    );
}

/// Replacing the `--ca` bundle: an upstream from the new CA becomes trusted, one from the old
/// CA no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn ca_rotation_trusts_the_new_ca_only() {
    let pki = Pki::new();
    let new_ca = pki.new_ca("new-ca", "rotated test CA");
    let new_server = pki.leaf(&new_ca, "server-new-ca", LeafSpec::server());
    let ca_file = pki.path("live-ca.pem");
    atomic_copy(&pki.ca.pem, &ca_file);

    // Both upstreams trust our client certificate; they differ in what they present.
    let old_up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let new_up = Upstream::echo(&new_server, &pki.ca.der).await;
    let interval = ["--reload-interval", "200ms"];
    let (cert, key) = (&pki.client.cert, &pki.client.key);
    let mut to_old = run_cmd_files(old_up.addr, cert, key, &ca_file)
        .args(interval)
        .start();
    let mut to_new = run_cmd_files(new_up.addr, cert, key, &ca_file)
        .args(interval)
        .start();

    accepted(&mut to_old, &old_up).await;
    let line = refused(&mut to_new, &new_up).await;
    assert_failed(&line, "tls_error", "unknown_issuer");

    atomic_write(&ca_file, std::fs::read(&new_ca.pem).unwrap());
    for proxy in [&mut to_old, &mut to_new] {
        blocking(|| proxy.wait_for_line("an `identity reloaded` line", WAIT, is_reloaded));
        assert_no_reload_failure(proxy);
    }

    accepted(&mut to_new, &new_up).await;
    let line = refused(&mut to_old, &old_up).await;
    assert_failed(&line, "tls_error", "unknown_issuer");
}

/// Ways a rotation goes wrong.
#[derive(Clone, Copy, Debug)]
enum Break {
    GarbageCert,
    GarbageKey,
    /// A new certificate whose key never arrives.
    KeyMismatch,
    ExpiredCert,
    NotYetValidCert,
    /// The certificate path becomes a directory (as root, chmod would not stop a read).
    CertIsDirectory,
    /// The key path becomes a symlink to nowhere.
    KeyDanglingSymlink,
    GarbageCa,
}

/// A broken rotation: one warn line names the file and the problem, the old identity keeps
/// serving new connections, the held one is untouched, and a good rotation afterwards works.
async fn broken_rotation(kind: Break) {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "keep-a"), client(&pki, "next-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let ca_file = pki.path("live-ca.pem");
    atomic_copy(&pki.ca.pem, &ca_file);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &ca_file)
        .args(["--reload-interval", "200ms"])
        .start();
    let held = open_held(&proxy).await;
    assert_presented(&accepted(&mut proxy, &up).await, &a, "before the rotation");

    let not_pem_cert = "-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n";
    let (named, problem): (Vec<&PathBuf>, Option<&str>) = match kind {
        Break::GarbageCert => {
            atomic_write(&live.cert, "this is not a certificate\n\x00\x01");
            (vec![&live.cert], None)
        }
        Break::GarbageKey => {
            let body = "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n";
            atomic_write(&live.key, body);
            (vec![&live.key], None)
        }
        Break::KeyMismatch => {
            atomic_copy(&b.cert, &live.cert);
            (vec![&live.cert, &live.key], None)
        }
        Break::ExpiredCert => {
            let past = OffsetDateTime::now_utc() - TimeDuration::days(30);
            let spec = LeafSpec {
                validity: Some((past - TimeDuration::days(365), past)),
                ..LeafSpec::client("expired")
            };
            live.install(&pki.leaf(&pki.ca, "expired", spec));
            (vec![&live.cert], Some("expir"))
        }
        Break::NotYetValidCert => {
            let future = OffsetDateTime::now_utc() + TimeDuration::days(30);
            let spec = LeafSpec {
                validity: Some((future, future + TimeDuration::days(365))),
                ..LeafSpec::client("future")
            };
            live.install(&pki.leaf(&pki.ca, "future", spec));
            (vec![&live.cert], Some("valid"))
        }
        Break::CertIsDirectory => {
            std::fs::remove_file(&live.cert).unwrap();
            std::fs::create_dir(&live.cert).unwrap();
            (vec![&live.cert], None)
        }
        Break::KeyDanglingSymlink => {
            atomic_dangling_symlink(&live.key);
            (vec![&live.key], None)
        }
        Break::GarbageCa => {
            atomic_write(&ca_file, not_pem_cert);
            (vec![&ca_file], None)
        }
    };

    let line = blocking(|| {
        proxy.wait_for_line("an `identity reload failed` line", WAIT, is_reload_failed)
    });
    assert!(line.contains("WARN"), "{kind:?}: not a WARN line: {line}");
    assert_eq!(field(&line, "route"), Some("default"), "{line}");
    // The message; its quoting is checked last, after everything that matters more.
    let error = match field(&line, "error") {
        Some(_) if line.contains("error=\"") => field(&line, "error").unwrap(),
        Some(_) => &line[line.find("error=").unwrap()..],
        None => panic!("no error= in: {line}"),
    };
    assert!(
        named
            .iter()
            .any(|p| error.contains(&*p.display().to_string())),
        "{kind:?}: error= names none of {named:?}: {line}"
    );
    if let Some(problem) = problem {
        assert!(
            error.to_lowercase().contains(problem),
            "{kind:?}: error= does not say {problem:?}: {line}"
        );
    }
    assert_eq!(
        proxy.count_lines(is_reloaded),
        0,
        "{kind:?}: reloaded anyway"
    );

    // The old identity keeps serving, new connections and the held one alike.
    assert_presented(
        &accepted(&mut proxy, &up).await,
        &a,
        "after a broken rotation",
    );
    still_carries(held, 4).await;

    // And the next good rotation goes through.
    if let Break::CertIsDirectory = kind {
        std::fs::remove_dir(&live.cert).unwrap();
    }
    atomic_copy(&pki.ca.pem, &ca_file);
    live.install(&b);
    wait_reloaded_to(&mut proxy, &b, "next-b");
    assert_presented(&accepted(&mut proxy, &up).await, &b, "after the repair");
    assert_all_conns_ok(&mut proxy, 4);

    // Quoted, so that a message with spaces stays one value for a logfmt reader.
    assert!(
        line.contains("error=\""),
        "{kind:?}: error= is not quoted (error=\"...\"): {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_garbage_cert_keeps_the_old_identity() {
    broken_rotation(Break::GarbageCert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_garbage_key_keeps_the_old_identity() {
    broken_rotation(Break::GarbageKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_persistent_key_mismatch_keeps_the_old_identity() {
    broken_rotation(Break::KeyMismatch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_expired_cert_keeps_the_old_identity() {
    broken_rotation(Break::ExpiredCert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_not_yet_valid_cert_keeps_the_old_identity() {
    broken_rotation(Break::NotYetValidCert).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_cert_path_is_a_directory_keeps_the_old_identity() {
    broken_rotation(Break::CertIsDirectory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_dangling_key_symlink_keeps_the_old_identity() {
    broken_rotation(Break::KeyDanglingSymlink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn broken_rotation_garbage_ca_keeps_the_old_trust() {
    broken_rotation(Break::GarbageCa).await;
}

/// A writer that renames the new certificate into place and the new key 50 ms later: with a 1s
/// interval, no poll may turn that into a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn two_step_writer_50ms_apart_logs_no_warning() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "step-a"), client(&pki, "step-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--reload-interval", "1s"])
        .start();

    atomic_copy(&b.cert, &live.cert);
    // The writer's own pace, not a wait for anything.
    tokio::time::sleep(Duration::from_millis(50)).await;
    atomic_copy(&b.key, &live.key);

    wait_reloaded_to(&mut proxy, &b, "step-b");
    assert_presented(&accepted(&mut proxy, &up).await, &b, "after the two steps");
    assert_no_reload_failure(&proxy);
}

/// A DEBUG line about a certificate/key mismatch.
fn is_debug_mismatch(line: &str) -> bool {
    let lower = line.to_lowercase();
    line.contains("DEBUG") && (lower.contains("match") || lower.contains("belong"))
}

/// The two steps straddle a poll on purpose: the key is written only once the proxy has seen
/// the mismatch (DEBUG). The next poll finds a matching pair: still no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn mismatch_resolved_by_the_next_poll_is_debug_only() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "straddle-a"), client(&pki, "straddle-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--reload-interval", "500ms", "--log-level", "debug"])
        .start();

    atomic_copy(&b.cert, &live.cert);
    blocking(|| proxy.wait_for_line("a DEBUG line about the mismatch", WAIT, is_debug_mismatch));
    atomic_copy(&b.key, &live.key);

    wait_reloaded_to(&mut proxy, &b, "straddle-b");
    assert_presented(&accepted(&mut proxy, &up).await, &b, "after the two steps");
    assert_no_reload_failure(&proxy);
}

/// A mismatch that is still there at the next poll becomes the warning, after the DEBUG line.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn persistent_mismatch_is_debug_first_then_warn() {
    let pki = Pki::new();
    let (a, b) = (client(&pki, "persist-a"), client(&pki, "persist-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--reload-interval", "300ms", "--log-level", "debug"])
        .start();

    atomic_copy(&b.cert, &live.cert);
    blocking(|| proxy.wait_for_line("the reload failure line", WAIT, is_reload_failed));
    let lines = proxy.stderr_lines();
    let warn_at = lines.iter().position(|l| is_reload_failed(l)).unwrap();
    let debug_at = lines.iter().position(|l| is_debug_mismatch(l));
    assert!(
        debug_at.is_some_and(|d| d < warn_at),
        "the first poll that saw the mismatch did not log it at DEBUG before the warning:\n{}",
        lines.join("\n")
    );
    assert!(lines[warn_at].contains("WARN"), "{}", lines[warn_at]);
    assert_presented(&accepted(&mut proxy, &up).await, &a, "mismatch persists");
}

/// One side of a long-lived connection pumping through an echo: writes seeded chunks until
/// told to stop while reading the echo; returns (sent, sha256 sent, received, sha256 received).
/// Bytes each pumping connection carries at least.
const MIN_PUMPED: u64 = 100_000;

async fn pump(
    stream: TcpStream,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<u8>, u64, Vec<u8>, u64) {
    let (mut rd, mut wr) = stream.into_split();
    let write = async move {
        let (mut sent, mut hash, mut n) = (0u64, Sha256::new(), 0u64);
        let mut during = None;
        loop {
            // Bytes sent before the rotations were over: these crossed rotations.
            if during.is_none() && stop.load(Ordering::SeqCst) {
                during = Some(sent);
            }
            let chunk = pattern(seed * 1_000_000 + n, 2048 + (n as usize * 389) % 6144);
            wr.write_all(&chunk).await.expect("write while pumping");
            hash.update(&chunk);
            sent += chunk.len() as u64;
            n += 1;
            // Keep pumping until the rotations are over and enough data crossed them, however
            // fast a loaded machine got through the rotations.
            if stop.load(Ordering::SeqCst) && sent > MIN_PUMPED {
                break;
            }
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
        wr.shutdown().await.expect("shutdown after pumping");
        (sent, hash.finalize().to_vec(), during.unwrap_or(sent))
    };
    let read = async move {
        let (mut got, mut hash) = (0u64, Sha256::new());
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = rd.read(&mut buf).await.expect("read while pumping");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
        }
        (got, hash.finalize().to_vec())
    };
    let ((sent, sent_hash, during), (got, got_hash)) = tokio::join!(write, read);
    (sent, sent_hash, got, got_hash, during)
}

/// 10 connections pump data both ways while the identity rotates 20 times; after each
/// rotation a new connection presents the new certificate. No byte lost, no connection failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_under_load_loses_no_byte() {
    const CONNS: usize = 10;
    const ROTATIONS: usize = 20;
    let pki = Pki::new();
    let (a, b) = (client(&pki, "load-a"), client(&pki, "load-b"));
    let live = LiveIdentity::new(pki.dir.path(), &a);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &live.cert, &live.key, &pki.ca.pem)
        .args(["--reload-interval", "0"])
        .start();

    let stop = Arc::new(AtomicBool::new(false));
    let mut pumps = JoinSet::new();
    for i in 0..CONNS {
        let stream = open_held(&proxy).await;
        pumps.spawn(pump(stream, i as u64 + 1, Arc::clone(&stop)));
    }

    for r in 0..ROTATIONS {
        let (id, cn) = if r % 2 == 0 {
            (&b, "load-b")
        } else {
            (&a, "load-a")
        };
        live.install(id);
        proxy.signal("HUP");
        let lines = blocking(|| {
            proxy.wait_for_lines("`identity reloaded` lines", r + 1, WAIT, is_reloaded)
        });
        check_reloaded_line(&lines[r], id, cn);
        let conn = accepted(&mut proxy, &up).await;
        assert_presented(&conn, id, &format!("after rotation {}", r + 1));
    }
    stop.store(true, Ordering::SeqCst);

    let all = async {
        let mut results = vec![];
        while let Some(res) = pumps.join_next().await {
            results.push(res.expect("pump task"));
        }
        results
    };
    let results = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("the pumping connections did not finish");
    for (i, (sent, sent_hash, got, got_hash, during)) in results.iter().enumerate() {
        assert_eq!(
            sent, got,
            "connection {i}: sent {sent} bytes, got {got} back"
        );
        assert_eq!(sent_hash, got_hash, "connection {i}: bytes altered");
        assert!(
            *during > 0,
            "connection {i} carried nothing while the rotations ran"
        );
    }

    let finished = up.stats.wait_finished(CONNS + ROTATIONS).await;
    for f in &finished {
        assert_eq!(f.error, None, "an upstream connection ended badly: {f:?}");
    }
    assert_all_conns_ok(&mut proxy, CONNS + ROTATIONS);
    assert_no_reload_failure(&proxy);
}

/// A client certificate valid for `days` more days, on a proxy with nowhere to go.
fn proxy_with_client_expiring_in(pki: &Pki, upstream: &str, days: i64) -> Sidecar {
    let now = OffsetDateTime::now_utc();
    let spec = LeafSpec {
        validity: Some((now - TimeDuration::days(60), now + TimeDuration::days(days))),
        ..LeafSpec::client("expiring")
    };
    let id = pki.leaf(&pki.ca, "expiring", spec);
    run_cmd_files(upstream, &id.cert, &id.key, &pki.ca.pem).start()
}

fn is_expiry_warning(line: &str) -> bool {
    line.contains("WARN") && line.contains("expires")
}

#[test]
fn client_cert_expiring_within_7_days_warns() {
    let pki = Pki::new();
    let mut proxy = proxy_with_client_expiring_in(&pki, "127.0.0.1:9", 3);
    proxy.wait_for_line(
        "a WARN line saying the client certificate expires",
        WAIT,
        is_expiry_warning,
    );
    assert_eq!(
        proxy.count_lines(|l| l.contains("ERROR")),
        0,
        "a certificate still valid is no error:\n{}",
        proxy.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn client_cert_valid_for_30_days_does_not_warn() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = proxy_with_client_expiring_in(&pki, &up.addr.to_string(), 30);
    accepted(&mut proxy, &up).await;
    let warned: Vec<String> = proxy
        .stderr_lines()
        .into_iter()
        .filter(|l| is_expiry_warning(l) || l.contains("ERROR"))
        .collect();
    assert!(
        warned.is_empty(),
        "30 days left is no reason to warn: {warned:#?}"
    );
}
