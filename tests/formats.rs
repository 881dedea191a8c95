//! Password-protected client identities: an encrypted PKCS#8 key with `--key-password-file`
//! and PKCS#12 with `--pkcs12` / `--pkcs12-password-file`, made by the `openssl` CLI with
//! OpenSSL 3's defaults (AES-256-CBC, PBKDF2, SHA-256 MAC). Each must really be presented
//! upstream; a wrong password is a startup error that says so and never shows a password.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::files::{atomic_copy, is_reloaded};
use crate::support::pki::{Identity, LeafSpec};
use crate::support::refused::accepted;
use crate::support::*;

const PASSWORD: &str = "Tr0ub4dor&3-correct-horse";
const WRONG_PASSWORD: &str = "n0t-the-passw0rd-at-all";

/// Runs `openssl ARGS`; `Err` (skip) when there is no openssl, panic when it fails.
fn openssl(args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

macro_rules! or_skip {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(why) => {
                eprintln!("SKIPPED: {why}");
                return;
            }
        }
    };
}

/// A password file holding `password` and one trailing newline (which must be ignored).
fn password_file(pki: &Pki, name: &str, password: &str) -> PathBuf {
    pki.write(name, format!("{password}\n"))
}

/// `id`'s key as encrypted PKCS#8 (PBES2, AES-256-CBC) under the password in `pw`.
fn encrypted_key(pki: &Pki, id: &Identity, pw: &Path) -> Result<PathBuf, String> {
    let out = pki.path(&format!(
        "{}-encrypted.pem",
        id.cert.file_stem().unwrap().to_string_lossy()
    ));
    let passout = format!("file:{}", pw.display());
    openssl(os![
        "pkcs8",
        "-topk8",
        "-v2",
        "aes-256-cbc",
        "-in",
        &id.key,
        "-out",
        &out,
        "-passout",
        &passout,
    ])?;
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "openssl wrote no encrypted PKCS#8 key:\n{text}"
    );
    Ok(out)
}

/// `id` with its key (and the CA as an extra certificate) as PKCS#12 under the password in
/// `pw`.
fn pkcs12(pki: &Pki, id: &Identity, pw: &Path) -> Result<PathBuf, String> {
    let out = pki.path(&format!(
        "{}.p12",
        id.cert.file_stem().unwrap().to_string_lossy()
    ));
    let passout = format!("file:{}", pw.display());
    openssl(os![
        "pkcs12",
        "-export",
        "-inkey",
        &id.key,
        "-in",
        &id.cert,
        "-certfile",
        &pki.ca.pem,
        "-name",
        "client",
        "-out",
        &out,
        "-passout",
        &passout,
    ])?;
    Ok(out)
}

fn base(upstream: impl std::fmt::Display, ca: &Path) -> Cmd {
    Cmd::new()
        .args(["run", "--listen", "127.0.0.1:0", "--log-level", "debug"])
        .arg("--upstream")
        .arg(upstream.to_string())
        .arg("--ca")
        .arg(ca)
}

fn assert_no_password(stderr: &str) {
    for pw in [PASSWORD, WRONG_PASSWORD] {
        assert!(!stderr.contains(pw), "a password is on stderr:\n{stderr}");
    }
}

/// Exit 2, the file named, the word password, and no password shown.
fn assert_wrong_password_error(err: &str, files: &[&Path]) {
    assert!(
        files
            .iter()
            .any(|f| err.contains(&*f.display().to_string())),
        "stderr names none of {files:?}:\n{err}"
    );
    assert!(
        err.to_lowercase().contains("password"),
        "stderr does not say it is about the password:\n{err}"
    );
    assert_no_password(err);
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_pkcs8_key_is_presented() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "enc", LeafSpec::client("encrypted-pkcs8-client"));
    let pw = password_file(&pki, "key-password", PASSWORD);
    let key = or_skip!(encrypted_key(&pki, &id, &pw));
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = base(up.addr, &pki.ca.pem)
        .arg("--cert")
        .arg(&id.cert)
        .arg("--key")
        .arg(&key)
        .arg("--key-password-file")
        .arg(&pw)
        .start();
    let conn = accepted(&mut proxy, &up).await;
    assert_eq!(conn.client_cn.as_deref(), Some("encrypted-pkcs8-client"));
    assert!(conn.client_der.as_deref() == Some(id.der.as_ref()));
    assert_no_password(&proxy.stderr());
}

#[test]
fn encrypted_pkcs8_key_with_a_wrong_password_exits_2() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "enc", LeafSpec::client("encrypted-pkcs8-client"));
    let pw = password_file(&pki, "key-password", PASSWORD);
    let key = or_skip!(encrypted_key(&pki, &id, &pw));
    let wrong = password_file(&pki, "wrong-password", WRONG_PASSWORD);
    let err = base("127.0.0.1:9", &pki.ca.pem)
        .arg("--cert")
        .arg(&id.cert)
        .arg("--key")
        .arg(&key)
        .arg("--key-password-file")
        .arg(&wrong)
        .startup_error();
    assert_wrong_password_error(&err, &[&key, &wrong]);
}

/// An encrypted key and no password: exit 2 naming the key file.
#[test]
fn encrypted_pkcs8_key_without_a_password_file_exits_2() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "enc", LeafSpec::client("encrypted-pkcs8-client"));
    let pw = password_file(&pki, "key-password", PASSWORD);
    let key = or_skip!(encrypted_key(&pki, &id, &pw));
    let err = base("127.0.0.1:9", &pki.ca.pem)
        .arg("--cert")
        .arg(&id.cert)
        .arg("--key")
        .arg(&key)
        .startup_error();
    assert!(
        err.contains(&*key.display().to_string()),
        "stderr does not name {}:\n{err}",
        key.display()
    );
    assert_no_password(&err);
}

#[tokio::test(flavor = "multi_thread")]
async fn pkcs12_identity_is_presented() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "p12", LeafSpec::client("pkcs12-client"));
    let pw = password_file(&pki, "p12-password", PASSWORD);
    let p12 = or_skip!(pkcs12(&pki, &id, &pw));
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = base(up.addr, &pki.ca.pem)
        .arg("--pkcs12")
        .arg(&p12)
        .arg("--pkcs12-password-file")
        .arg(&pw)
        .start();
    let conn = accepted(&mut proxy, &up).await;
    assert_eq!(conn.client_cn.as_deref(), Some("pkcs12-client"));
    assert!(
        conn.client_der.as_deref() == Some(id.der.as_ref()),
        "the upstream did not get the PKCS#12 file's leaf certificate"
    );
    assert_no_password(&proxy.stderr());
}

/// The same through `MTLS_SIDECAR_PKCS12` and `MTLS_SIDECAR_PKCS12_PASSWORD_FILE`.
#[tokio::test(flavor = "multi_thread")]
async fn pkcs12_from_environment_variables() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "p12env", LeafSpec::client("pkcs12-env-client"));
    let pw = password_file(&pki, "p12-password", PASSWORD);
    let p12 = or_skip!(pkcs12(&pki, &id, &pw));
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = base(up.addr, &pki.ca.pem)
        .env("MTLS_SIDECAR_PKCS12", &p12)
        .env("MTLS_SIDECAR_PKCS12_PASSWORD_FILE", &pw)
        .start();
    let conn = accepted(&mut proxy, &up).await;
    assert!(conn.client_der.as_deref() == Some(id.der.as_ref()));
}

#[test]
fn pkcs12_with_a_wrong_password_exits_2() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "p12", LeafSpec::client("pkcs12-client"));
    let pw = password_file(&pki, "p12-password", PASSWORD);
    let p12 = or_skip!(pkcs12(&pki, &id, &pw));
    let wrong = password_file(&pki, "wrong-password", WRONG_PASSWORD);
    let err = base("127.0.0.1:9", &pki.ca.pem)
        .arg("--pkcs12")
        .arg(&p12)
        .arg("--pkcs12-password-file")
        .arg(&wrong)
        .startup_error();
    assert_wrong_password_error(&err, &[&p12, &wrong]);
}

#[test]
fn pkcs12_together_with_cert_is_a_usage_error() {
    let pki = Pki::new();
    let id = pki.leaf(&pki.ca, "p12", LeafSpec::client("pkcs12-client"));
    let pw = password_file(&pki, "p12-password", PASSWORD);
    let p12 = or_skip!(pkcs12(&pki, &id, &pw));
    let err = base("127.0.0.1:9", &pki.ca.pem)
        .arg("--pkcs12")
        .arg(&p12)
        .arg("--pkcs12-password-file")
        .arg(&pw)
        .arg("--cert")
        .arg(&id.cert)
        .startup_error();
    assert!(
        err.contains("--cert") && err.contains("--pkcs12"),
        "the usage error does not name --cert and --pkcs12:\n{err}"
    );
}

/// A rotated PKCS#12 file (same password file) is picked up like a PEM pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn pkcs12_rotation_is_picked_up() {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "p12-a", LeafSpec::client("pkcs12-a"));
    let b = pki.leaf(&pki.ca, "p12-b", LeafSpec::client("pkcs12-b"));
    let pw = password_file(&pki, "p12-password", PASSWORD);
    let (p12_a, p12_b) = (
        or_skip!(pkcs12(&pki, &a, &pw)),
        or_skip!(pkcs12(&pki, &b, &pw)),
    );
    let live = pki.path("live.p12");
    atomic_copy(&p12_a, &live);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = base(up.addr, &pki.ca.pem)
        .arg("--pkcs12")
        .arg(&live)
        .arg("--pkcs12-password-file")
        .arg(&pw)
        .args(["--reload-interval", "200ms"])
        .start();
    let conn = accepted(&mut proxy, &up).await;
    assert!(conn.client_der.as_deref() == Some(a.der.as_ref()));

    atomic_copy(&p12_b, &live);
    let serial = b.serial_hex();
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("`identity reloaded` with the new serial", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });
    let conn = accepted(&mut proxy, &up).await;
    assert!(
        conn.client_der.as_deref() == Some(b.der.as_ref()),
        "after the PKCS#12 rotation the upstream still saw {:?}",
        conn.client_cn
    );
    assert_no_password(&proxy.stderr());
}

/// An encrypted key rotated together with its password file, reloaded on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn encrypted_key_and_password_rotation_on_sighup() {
    let pki = Pki::new();
    let a = pki.leaf(&pki.ca, "enc-a", LeafSpec::client("encrypted-a"));
    let b = pki.leaf(&pki.ca, "enc-b", LeafSpec::client("encrypted-b"));
    let pw_a = password_file(&pki, "pw-a", PASSWORD);
    let pw_b = password_file(&pki, "pw-b", "an0ther-Secret-for-b");
    let key_a = or_skip!(encrypted_key(&pki, &a, &pw_a));
    let key_b = or_skip!(encrypted_key(&pki, &b, &pw_b));
    let (cert, key, pw) = (
        pki.path("live-cert.pem"),
        pki.path("live-key.pem"),
        pki.path("live-pw"),
    );
    atomic_copy(&a.cert, &cert);
    atomic_copy(&key_a, &key);
    atomic_copy(&pw_a, &pw);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = base(up.addr, &pki.ca.pem)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--key-password-file")
        .arg(&pw)
        .args(["--reload-interval", "0"])
        .start();
    let conn = accepted(&mut proxy, &up).await;
    assert!(conn.client_der.as_deref() == Some(a.der.as_ref()));

    atomic_copy(&b.cert, &cert);
    atomic_copy(&key_b, &key);
    atomic_copy(&pw_b, &pw);
    proxy.signal("HUP");
    let serial = b.serial_hex();
    tokio::task::block_in_place(|| {
        proxy.wait_for_line("`identity reloaded` with the new serial", WAIT, |l| {
            is_reloaded(l) && field(l, "serial") == Some(&*serial)
        })
    });
    let conn = accepted(&mut proxy, &up).await;
    assert!(conn.client_der.as_deref() == Some(b.der.as_ref()));
    let stderr = proxy.stderr();
    assert_no_password(&stderr);
    assert!(!stderr.contains("an0ther-Secret-for-b"), "{stderr}");
}
