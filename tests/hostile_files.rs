//! Files that would cost unbounded memory or time, and file hygiene (issue 12): a FIFO, a
//! device or a file over 64 MiB is refused (exit 2 at startup, a failed reload later, never a
//! hang); an encrypted key whose KDF asks for too much memory or too many iterations is refused
//! before deriving; secret files readable by others and stale CRLs are warned about; `dev-pki`
//! never overwrites without `--force`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pkcs8::der::Encode;
use pkcs8::pkcs5::{EncryptionScheme, pbes2};

use crate::support::files::{atomic_copy, atomic_write, is_reload_failed, is_reloaded};
use crate::support::pki::LeafSpec;
use crate::support::refused::accepted;
use crate::support::*;

/// The startup error must come quickly: a refused file is never read or derived.
const FAST: Duration = Duration::from_secs(5);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// `run_cmd` with `--ca` replaced by `ca`.
fn with_ca(pki: &Pki, ca: &Path) -> Cmd {
    run_cmd_files("127.0.0.1:9", &pki.client.cert, &pki.client.key, ca)
}

/// Runs `cmd` expecting exit 2 within [`FAST`]; returns stderr.
fn refused_fast(cmd: &Cmd) -> String {
    let started = Instant::now();
    let err = cmd.startup_error();
    assert!(
        started.elapsed() < FAST,
        "the refusal took {:?}: {err}",
        started.elapsed()
    );
    err
}

#[test]
fn a_fifo_as_ca_is_refused_without_hanging() {
    let pki = Pki::new();
    let fifo = pki.path("ca-fifo.pem");
    mkfifo(&fifo);
    let err = refused_fast(&with_ca(&pki, &fifo));
    assert!(
        err.contains("--ca") && err.contains(&*fifo.display().to_string()) && err.contains("FIFO"),
        "the error names neither the flag, the file nor the problem: {err}"
    );
}

#[test]
fn dev_zero_as_ca_is_refused() {
    let pki = Pki::new();
    let err = refused_fast(&with_ca(&pki, Path::new("/dev/zero")));
    assert!(
        err.contains("--ca /dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
}

#[test]
fn a_file_over_64_mib_is_refused_key_and_config() {
    let pki = Pki::new();
    // Sparse: 65 MiB of size costs no disk.
    let big = pki.path("big-key.pem");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(65 << 20).unwrap();
    let cmd = run_cmd_files("127.0.0.1:9", &pki.client.cert, &big, &pki.ca.pem);
    let err = refused_fast(&cmd);
    assert!(
        err.contains("--key") && err.contains("big-key.pem") && err.contains("64 MiB"),
        "{err}"
    );

    let big_config = pki.path("big.toml");
    std::fs::File::create(&big_config)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let err = refused_fast(&Cmd::new().args(["run", "--config"]).arg(&big_config));
    assert!(
        err.contains("--config") && err.contains("big.toml") && err.contains("64 MiB"),
        "{err}"
    );
    let fifo = pki.path("config-fifo.toml");
    mkfifo(&fifo);
    let err = refused_fast(&Cmd::new().args(["run", "--config"]).arg(&fifo));
    assert!(err.contains("FIFO"), "{err}");
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo {} failed", path.display());
}

enum Kdf {
    Scrypt,
    Pbkdf2,
}

/// An `ENCRYPTED PRIVATE KEY` PEM whose KDF parameters are absurd (scrypt N=2^40, about
/// 128 TiB; or PBKDF2 with 4e9 iterations, hours of CPU). Written as DER by hand: encrypting
/// with such parameters is exactly what must never happen. The ciphertext is random bytes;
/// the key must be refused before anything is decrypted.
fn expensive_key(kdf: Kdf) -> String {
    let salt = [7u8; 16];
    let iv = [9u8; 16];
    let kdf = match kdf {
        Kdf::Scrypt => pbes2::Kdf::Scrypt(pbes2::ScryptParams {
            salt: &salt,
            cost_parameter: 1 << 40,
            block_size: 8,
            parallelization: 1,
            key_length: Some(32),
        }),
        Kdf::Pbkdf2 => pbes2::Kdf::Pbkdf2(pbes2::Pbkdf2Params {
            salt: &salt,
            iteration_count: 4_000_000_000,
            key_length: None,
            prf: pbes2::Pbkdf2Prf::HmacWithSha256,
        }),
    };
    let params = pbes2::Parameters {
        kdf,
        encryption: pbes2::EncryptionScheme::Aes256Cbc { iv: &iv },
    };
    let ciphertext = pattern(3, 144);
    let info = pkcs8::EncryptedPrivateKeyInfo {
        encryption_algorithm: EncryptionScheme::Pbes2(params),
        encrypted_data: &ciphertext,
    };
    let der = info.to_der().expect("encode EncryptedPrivateKeyInfo");
    let b64 = base64(&der);
    let mut pem = String::from("-----BEGIN ENCRYPTED PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END ENCRYPTED PRIVATE KEY-----\n");
    pem
}

fn expensive_key_at_startup(kdf: Kdf, problem: &str) {
    let pki = Pki::new();
    let key = pki.write("expensive-key.pem", expensive_key(kdf));
    let pw = pki.write("pw.txt", "canary-password\n");
    let cmd = run_cmd_files("127.0.0.1:9", &pki.client.cert, &key, &pki.ca.pem)
        .arg("--key-password-file")
        .arg(&pw);
    let err = refused_fast(&cmd);
    assert!(
        err.contains("--key") && err.contains("expensive-key.pem") && err.contains(problem),
        "the error names neither the file nor {problem:?}: {err}"
    );
    assert!(!err.contains("canary-password"), "{err}");
}

#[test]
fn scrypt_key_asking_for_terabytes_is_refused_at_startup() {
    expensive_key_at_startup(Kdf::Scrypt, "256 MiB");
}

#[test]
fn pbkdf2_key_asking_for_billions_of_iterations_is_refused_at_startup() {
    expensive_key_at_startup(Kdf::Pbkdf2, "10000000 iterations");
}

/// A reload that meets `bad` (written by `write_bad`) fails, keeps the old identity, and the
/// process still serves and exits promptly on SIGTERM.
async fn failed_reload_keeps_serving(write_bad: impl FnOnce(&Pki, &Path, &Path), problem: &str) {
    let pki = Pki::new();
    let key = pki.path("live-key.pem");
    let ca = pki.path("live-ca.pem");
    atomic_copy(&pki.client.key, &key);
    atomic_copy(&pki.ca.pem, &ca);
    let pw = pki.write("pw.txt", "pw\n");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &pki.client.cert, &key, &ca)
        .arg("--key-password-file")
        .arg(&pw)
        .args(["--reload-interval", "200ms"])
        .start();
    accepted(&mut proxy, &up).await;

    write_bad(&pki, &key, &ca);
    let line = blocking(|| {
        proxy.wait_for_line("an `identity reload failed` line", WAIT, is_reload_failed)
    });
    assert!(
        line.contains(problem),
        "the reload failure does not say {problem:?}: {line}"
    );
    // Still serving with the old identity, and reloads keep ticking without a second warning.
    let conn = accepted(&mut proxy, &up).await;
    assert_eq!(
        conn.client_der.as_deref(),
        Some(pki.client.der.as_ref()),
        "the old identity is not presented after the failed reload"
    );
    assert_eq!(proxy.count_lines(is_reloaded), 0);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        proxy.count_lines(is_reload_failed),
        1,
        "the same broken content is warned about once"
    );
    proxy.signal("TERM");
    let status = blocking(|| proxy.wait_exit(Duration::from_secs(10)));
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn expensive_scrypt_key_at_reload_is_a_failed_reload() {
    failed_reload_keeps_serving(
        |_, key, _| atomic_write(key, expensive_key(Kdf::Scrypt)),
        "256 MiB",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn expensive_pbkdf2_key_at_reload_is_a_failed_reload() {
    failed_reload_keeps_serving(
        |_, key, _| atomic_write(key, expensive_key(Kdf::Pbkdf2)),
        "10000000 iterations",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_fifo_swapped_in_as_ca_at_reload_is_a_failed_reload() {
    failed_reload_keeps_serving(
        |pki, _, ca| {
            let tmp = pki.path("fifo.tmp");
            mkfifo(&tmp);
            std::fs::rename(&tmp, ca).unwrap();
        },
        "FIFO",
    )
    .await;
}

fn is_loose_permission_warning(line: &str) -> bool {
    line.contains("WARN") && line.contains("readable by group or others")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn world_readable_key_is_warned_about_once_per_content() {
    let pki = Pki::new();
    let key = pki.path("live-key.pem");
    atomic_copy(&pki.client.key, &key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &pki.client.cert, &key, &pki.ca.pem)
        .args(["--reload-interval", "200ms"])
        .start();
    let line = blocking(|| {
        proxy.wait_for_line(
            "a warning that the key is readable by others",
            WAIT,
            is_loose_permission_warning,
        )
    });
    assert_eq!(
        field(&line, "file"),
        Some(&*key.display().to_string()),
        "{line}"
    );
    assert_eq!(field(&line, "mode"), Some("0644"), "{line}");
    // Unchanged content: no repetition at each poll.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(proxy.count_lines(is_loose_permission_warning), 1);

    // New content, mode 0600: reloaded, and no new warning.
    let next = pki.leaf(&pki.ca, "next", LeafSpec::client("next"));
    let private = pki.path("next-key-600.pem");
    std::fs::copy(&next.key, &private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    atomic_copy(&next.cert, &pki.client.cert);
    std::fs::rename(&private, &key).unwrap();
    blocking(|| proxy.wait_for_line("an `identity reloaded` line", WAIT, is_reloaded));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proxy.count_lines(is_loose_permission_warning), 1);
}

#[test]
fn stale_crl_is_warned_about_at_load() {
    let pki = Pki::new();
    let crl = stale_crl(&pki);
    let mut proxy = run_cmd(&pki, "127.0.0.1:9").arg("--crl").arg(&crl).start();
    let line = proxy.wait_for_line("a stale-CRL warning", WAIT, |l| {
        l.contains("WARN") && l.contains("crl") && l.contains("nextUpdate")
    });
    assert_eq!(
        field(&line, "file"),
        Some(&*crl.display().to_string()),
        "{line}"
    );
    assert!(field(&line, "next_update").is_some(), "{line}");
}

/// A CRL of the test CA whose nextUpdate was yesterday.
fn stale_crl(pki: &Pki) -> PathBuf {
    pki.ca
        .crl_with_next_update(&pki.path("stale.crl.pem"), &[], -time::Duration::days(1))
}

#[test]
fn dev_pki_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let run = |force: bool| {
        let mut cmd = Cmd::new().args(["dev-pki", "--out"]).arg(&out);
        if force {
            cmd = cmd.arg("--force");
        }
        cmd.run_to_exit(WAIT)
    };
    let (code, err) = run(false);
    assert_eq!(code, Some(0), "{err}");
    let before = std::fs::read(out.join("client-key.pem")).unwrap();

    let (code, err) = run(false);
    assert_eq!(code, Some(2), "a second dev-pki without --force: {err}");
    for f in ["ca.pem", "client-key.pem", "server-key.pem"] {
        assert!(
            err.contains(&*out.join(f).display().to_string()),
            "the refusal does not name {f}: {err}"
        );
    }
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(out.join("client-key.pem")).unwrap(),
        before,
        "the key was replaced anyway"
    );

    let (code, err) = run(true);
    assert_eq!(code, Some(0), "dev-pki --force: {err}");
    assert_ne!(std::fs::read(out.join("client-key.pem")).unwrap(), before);
}
