//! Secrets never leave (issue 12): canary tokens planted in key files (broken and valid,
//! newlines turned into spaces), password files, PKCS#8 passwords, proxy-auth files and proxy
//! URL credentials must not appear in any output: log lines at trace level, `--help` with the
//! environment set, `/status`, `/metrics`, `check` (text and JSON), exit messages and 502
//! bodies. Besides the canary itself, its base64, the key's base64 body, and any byte array
//! (`[45, 45, ...]`, how pki-types prints PEM bytes) are looked for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use pkcs8::der::Decode;
use pkcs8::pkcs5::pbes2;

use crate::support::admin::{admin_addr, get};
use crate::support::connect_proxy::*;
use crate::support::files::{atomic_copy, atomic_write, is_reload_failed};
use crate::support::http::*;
use crate::support::*;

/// A unique token per call: no output could contain it by chance.
fn canary(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "CANARY{what}{:x}{}{}Z",
        t,
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Everything that must not appear, with what it is.
#[derive(Default)]
struct Secrets(Vec<(String, String)>);

impl Secrets {
    /// A canary, its base64 and the base64 of each of its halves (a canary inside a larger
    /// base64 text is encoded at some offset; a half survives one of the three alignments).
    fn canary(&mut self, token: &str) {
        self.0.push(("a canary".into(), token.into()));
        for shift in 0..3 {
            let shifted = format!("{}{}", &"xx"[..shift], token);
            let b = base64(shifted.as_bytes());
            // Skip the first 4 chars (they hold the shift bytes) and the padded tail.
            let inner = &b[4..b.len() - 4];
            self.0
                .push((format!("base64 of a canary (shift {shift})"), inner.into()));
        }
    }

    /// Every 16-character window of the PEM body lines of `pem` (the key's base64).
    fn pem_body(&mut self, pem: &str) {
        let body: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        let chars: Vec<char> = body.chars().collect();
        for w in chars.chunks(16).filter(|c| c.len() == 16) {
            self.0.push((
                "16 characters of the key's base64".into(),
                w.iter().collect(),
            ));
        }
    }

    /// Fails naming `place` if any secret (or a printed byte array) appears in `text`.
    fn assert_absent(&self, place: &str, text: &str) {
        for (what, needle) in &self.0 {
            assert!(
                !text.contains(needle.as_str()),
                "{what} ({needle}) appears in {place}:\n{text}"
            );
        }
        assert!(
            !has_byte_array(text),
            "a byte array (raw file bytes) appears in {place}:\n{text}"
        );
    }
}

/// `[12, 34, 56` or longer: how a `Vec<u8>` prints with `{:?}`.
fn has_byte_array(text: &str) -> bool {
    text.match_indices('[').any(|(i, _)| {
        let rest = &text[i + 1..];
        let nums: Vec<&str> = rest.split(", ").take(4).collect();
        nums.len() == 4
            && nums[..3]
                .iter()
                .all(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// `check` (text or JSON) with the test CA, on `cert`/`key`: (exit code, stdout + stderr).
fn check_output(pki: &Pki, upstream: &str, key_args: &[&std::ffi::OsStr], json: bool) -> String {
    let mut cmd = Cmd::new()
        .args(["check", "--log-level", "trace", "--upstream", upstream])
        .arg("--cert")
        .arg(&pki.client.cert)
        .args(key_args)
        .arg("--ca")
        .arg(&pki.ca.pem);
    if json {
        cmd = cmd.args(["--format", "json"]);
    }
    let mut proc = cmd.spawn();
    let status = proc.wait_exit(WAIT);
    proc.wait_output_closed();
    assert_ne!(status.code(), None, "check was killed: {}", proc.stderr());
    format!("{}\n{}", proc.stdout(), proc.stderr())
}

/// The ways a key file gets broken, each carrying `token`.
fn broken_keys(key_pem: &str, token: &str) -> Vec<(&'static str, String)> {
    let lines: Vec<&str> = key_pem.lines().collect();
    let body = &lines[1..lines.len() - 1];
    let mut bad_char = body.to_vec().join("\n");
    bad_char.replace_range(10..11, "*");
    vec![
        // `echo $KEY > tls.key`: every newline became a space.
        (
            "newlines turned into spaces",
            format!("{token} {}", key_pem.replace('\n', " ")),
        ),
        (
            "no END line",
            format!("{token}\n{}\n{}\n", lines[0], body.join("\n")),
        ),
        (
            "a character outside base64",
            format!(
                "{token}\n{}\n{bad_char}\n{}\n",
                lines[0],
                lines[lines.len() - 1]
            ),
        ),
        (
            "a BEGIN line with the body glued on",
            format!(
                "{token}\n{}{}\n{}\n",
                lines[0],
                body.join(""),
                lines[lines.len() - 1]
            ),
        ),
        (
            "a well-formed block that is no key (the canary as DER)",
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                base64(format!("{token}{token}").as_bytes())
            ),
        ),
        (
            "an encrypted block that is no PKCS#8 structure",
            format!(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\n{}\n-----END ENCRYPTED PRIVATE KEY-----\n",
                base64(format!("0{token}{token}").as_bytes())
            ),
        ),
    ]
}

#[test]
fn broken_key_files_never_show_their_bytes() {
    let pki = Pki::new();
    let key_pem = std::fs::read_to_string(&pki.client.key).unwrap();
    let token = canary("KEY");
    let mut secrets = Secrets::default();
    secrets.canary(&token);
    secrets.pem_body(&key_pem);
    let pw = pki.write("pw.txt", "unused-password\n");
    for (i, (how, body)) in broken_keys(&key_pem, &token).into_iter().enumerate() {
        let key = pki.write(&format!("broken-{i}.key"), &body);
        let key_args: Vec<&std::ffi::OsStr> = vec![
            "--key".as_ref(),
            key.as_os_str(),
            "--key-password-file".as_ref(),
            pw.as_os_str(),
        ];
        let err = Cmd::new()
            .args(["run", "--log-level", "trace", "--listen", "127.0.0.1:0"])
            .args(["--upstream", "127.0.0.1:9", "--cert"])
            .arg(&pki.client.cert)
            .args(&key_args)
            .arg("--ca")
            .arg(&pki.ca.pem)
            .startup_error();
        secrets.assert_absent(&format!("the exit message ({how})"), &err);
        assert!(
            err.contains(&*key.display().to_string()),
            "{how}: the error does not name the file: {err}"
        );
        for json in [false, true] {
            let out = check_output(&pki, "127.0.0.1:9", &key_args, json);
            secrets.assert_absent(&format!("check (json: {json}, {how})"), &out);
        }
    }
}

#[test]
fn newlines_turned_into_spaces_is_explained_with_a_line_number() {
    let pki = Pki::new();
    let key_pem = std::fs::read_to_string(&pki.client.key).unwrap();
    let key = pki.write("echoed.key", key_pem.replace('\n', " "));
    let err = run_cmd_files("127.0.0.1:9", &pki.client.cert, &key, &pki.ca.pem).startup_error();
    assert!(
        err.contains("line 1") && err.contains("newlines"),
        "the error does not say where and what: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_broken_key_at_reload_stays_out_of_logs_status_and_metrics() {
    let pki = Pki::new();
    let key_pem = std::fs::read_to_string(&pki.client.key).unwrap();
    let token = canary("RELOADKEY");
    let mut secrets = Secrets::default();
    secrets.canary(&token);
    secrets.pem_body(&key_pem);
    let key = pki.path("live-key.pem");
    atomic_copy(&pki.client.key, &key);
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd_files(up.addr, &pki.client.cert, &key, &pki.ca.pem)
        .args(["--log-level", "trace"])
        .args(["--reload-interval", "200ms", "--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    for (how, body) in broken_keys(&key_pem, &token) {
        let before = proxy.count_lines(is_reload_failed);
        atomic_write(&key, &body);
        tokio::task::block_in_place(|| {
            proxy.wait_for_lines(
                "one more `identity reload failed` line",
                before + 1,
                WAIT,
                is_reload_failed,
            )
        });
        let status = get(admin, "/status").await;
        secrets.assert_absent(&format!("/status ({how})"), &status.body);
        assert!(status.body.contains("live-key.pem"), "{}", status.body);
    }
    let metrics = get(admin, "/metrics").await;
    secrets.assert_absent("/metrics", &metrics.body);
    secrets.assert_absent("the log at trace level", &proxy.stderr());
}

#[test]
fn help_hides_environment_values() {
    let token = canary("ENV");
    let mut secrets = Secrets::default();
    secrets.canary(&token);
    for sub in [
        &[][..],
        &["run"],
        &["check"],
        &["demo"],
        &["wait"],
        &["dev-pki"],
    ] {
        let mut cmd = Cmd::new().args(sub).arg("--help");
        for var in [
            "PROXY",
            "PROXY_AUTH_FILE",
            "KEY",
            "KEY_PASSWORD_FILE",
            "PKCS12_PASSWORD_FILE",
            "UPSTREAM",
            "LISTEN",
            "ADMIN",
            "CONFIG",
        ] {
            let value = if var == "PROXY" {
                format!("http://user:{token}@127.0.0.1:3128")
            } else {
                format!("/{token}")
            };
            cmd = cmd.env(format!("MTLS_SIDECAR_{var}"), value);
        }
        let mut proc = cmd.spawn();
        let status = proc.wait_exit(WAIT);
        proc.wait_output_closed();
        assert_eq!(status.code(), Some(0), "{sub:?} --help: {}", proc.stderr());
        let out = proc.stdout();
        assert!(
            out.contains("Usage"),
            "{sub:?} --help printed no usage: {out}"
        );
        secrets.assert_absent(&format!("{sub:?} --help"), &out);
    }
}

/// `id`'s key as encrypted PKCS#8 (PBES2, PBKDF2-SHA256 2048 rounds, AES-256-CBC).
fn encrypt_key(key_pem: &Path, password: &str) -> String {
    let text = std::fs::read_to_string(key_pem).unwrap();
    let (_, doc) = pkcs8::SecretDocument::from_pem(&text).expect("PKCS#8 PEM");
    let info = pkcs8::PrivateKeyInfo::from_der(doc.as_bytes()).expect("PKCS#8 DER");
    let params = pbes2::Parameters::pbkdf2_sha256_aes256cbc(2048, &[5u8; 16], &[6u8; 16])
        .expect("PBES2 parameters");
    let enc = info
        .encrypt_with_params(params, password)
        .expect("encrypt the key");
    enc.to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
        .expect("PEM")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn key_passwords_never_appear() {
    let pki = Pki::new();
    let right = canary("RIGHTPW");
    let wrong = canary("WRONGPW");
    let mut secrets = Secrets::default();
    secrets.canary(&right);
    secrets.canary(&wrong);
    let enc = encrypt_key(&pki.client.key, &right);
    secrets.pem_body(&enc);
    let key = pki.write("enc.key", &enc);
    let right_file = pki.write("right.pw", format!("{right}\n"));
    let wrong_file = pki.write("wrong.pw", format!("{wrong}\n"));

    // Wrong password: exit 2 naming both files, neither password.
    let key_args = |pw: &PathBuf| -> Vec<std::ffi::OsString> {
        vec![
            "--key".into(),
            key.clone().into(),
            "--key-password-file".into(),
            pw.clone().into(),
        ]
    };
    let err = Cmd::new()
        .args(["run", "--log-level", "trace", "--listen", "127.0.0.1:0"])
        .args(["--upstream", "127.0.0.1:9", "--cert"])
        .arg(&pki.client.cert)
        .args(key_args(&wrong_file))
        .arg("--ca")
        .arg(&pki.ca.pem)
        .startup_error();
    assert!(
        err.contains("wrong password") && err.contains("wrong.pw"),
        "{err}"
    );
    secrets.assert_absent("the wrong-password exit message", &err);

    // Right password: a working proxy whose trace log, status and metrics hold neither.
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = Cmd::new()
        .args([
            "run",
            "--log-level",
            "trace",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
        ])
        .arg(up.addr.to_string())
        .arg("--cert")
        .arg(&pki.client.cert)
        .args(key_args(&right_file))
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--admin", "127.0.0.1:0"])
        .start();
    let admin = admin_addr(&mut proxy);
    let echoed = exchange(proxy.addr(), b"hello".to_vec()).await;
    assert_eq!(echoed, b"hello");
    secrets.assert_absent("/status", &get(admin, "/status").await.body);
    secrets.assert_absent("/metrics", &get(admin, "/metrics").await.body);
    secrets.assert_absent("the log at trace level", &proxy.stderr());

    let upstream = up.addr.to_string();
    for pw in [&right_file, &wrong_file] {
        let args = key_args(pw);
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        for json in [false, true] {
            let pki = &pki;
            let out = tokio::task::block_in_place(|| check_output(pki, &upstream, &args, json));
            secrets.assert_absent(&format!("check (json: {json})"), &out);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn proxy_credentials_never_appear_in_502_logs_status_metrics_or_check() {
    let pki = Pki::new();
    let url_pw = canary("URLPW");
    let file_pw = canary("FILEPW");
    let mut secrets = Secrets::default();
    secrets.canary(&url_pw);
    secrets.canary(&file_pw);
    for user_pass in [format!("alice:{url_pw}"), format!("bob:{file_pw}")] {
        secrets
            .0
            .push(("Basic credentials".into(), base64(user_pass.as_bytes())));
    }
    let auth = ConnectProxy::builder()
        .credentials("carol", "the-right-one")
        .start()
        .await;
    let up = HttpUpstream::start(&pki, Alpn::H2AndHttp11).await;
    let target = format!("localhost:{}", up.port());
    let with_url = auth
        .url()
        .replacen("://", &format!("://alice:{url_pw}@"), 1);
    let auth_file = pki.write("proxy-auth", format!("bob:{file_pw}\n"));

    let runs: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
        (
            "credentials in the URL",
            vec!["--proxy".into(), with_url.clone().into()],
        ),
        (
            "credentials in a file",
            vec![
                "--proxy".into(),
                auth.url().into(),
                "--proxy-auth-file".into(),
                auth_file.clone().into(),
            ],
        ),
    ];
    for (how, args) in runs {
        let mut sidecar = http_cmd(&pki, &target)
            .args(["--log-level", "trace", "--admin", "127.0.0.1:0"])
            .args(&args)
            .start();
        let admin = admin_addr(&mut sidecar);
        let reply = h1_call(sidecar.addr(), h1_req("GET", "/").body(empty()).unwrap()).await;
        assert_eq!(reply.status.as_u16(), 502, "{how}: {}", reply.text());
        secrets.assert_absent(&format!("the 502 body ({how})"), &reply.text());
        secrets.assert_absent(
            &format!("/status ({how})"),
            &get(admin, "/status").await.body,
        );
        secrets.assert_absent(
            &format!("/metrics ({how})"),
            &get(admin, "/metrics").await.body,
        );
        secrets.assert_absent(&format!("the trace log ({how})"), &sidecar.stderr());

        for json in [false, true] {
            let mut cmd = Cmd::new()
                .args(["check", "--log-level", "trace", "--upstream", &target])
                .arg("--cert")
                .arg(&pki.client.cert)
                .arg("--key")
                .arg(&pki.client.key)
                .arg("--ca")
                .arg(&pki.ca.pem)
                .args(&args);
            if json {
                cmd = cmd.args(["--format", "json"]);
            }
            let out = tokio::task::block_in_place(|| {
                let mut proc = cmd.spawn();
                proc.wait_exit(WAIT);
                proc.wait_output_closed();
                format!("{}\n{}", proc.stdout(), proc.stderr())
            });
            secrets.assert_absent(&format!("check (json: {json}, {how})"), &out);
        }
    }
    // A proxy URL that cannot be used is an exit message without its password.
    for bad in [
        format!("ftp://alice:{url_pw}@127.0.0.1:1"),
        // The `@HOST` forgotten: the password stands where a port would.
        format!("http://alice:{url_pw}"),
        format!("http://alice:{url_pw}@127.0.0.1:99999"),
    ] {
        let err = http_cmd(&pki, &target)
            .args(["--proxy", &bad])
            .startup_error();
        secrets.assert_absent("the bad proxy URL exit message", &err);
    }
}

#[test]
fn broken_pkcs12_and_its_password_never_appear() {
    let pki = Pki::new();
    let token = canary("P12");
    let pw_token = canary("P12PW");
    let mut secrets = Secrets::default();
    secrets.canary(&token);
    secrets.canary(&pw_token);
    let pw = pki.write("p12.pw", format!("{pw_token}\n"));
    // A DER SEQUENCE that holds the canary, and plain text with it.
    let mut der = vec![
        0x30,
        0x80 | 1,
        (token.len() + 2) as u8,
        0x04,
        token.len() as u8,
    ];
    der.extend(token.as_bytes());
    for (i, body) in [der, format!("{token}\n").into_bytes()]
        .into_iter()
        .enumerate()
    {
        let p12 = pki.write(&format!("broken-{i}.p12"), body);
        let err = Cmd::new()
            .args(["run", "--log-level", "trace", "--listen", "127.0.0.1:0"])
            .args(["--upstream", "127.0.0.1:9", "--pkcs12"])
            .arg(&p12)
            .arg("--pkcs12-password-file")
            .arg(&pw)
            .arg("--ca")
            .arg(&pki.ca.pem)
            .startup_error();
        assert!(err.contains(&*p12.display().to_string()), "{err}");
        secrets.assert_absent("the PKCS#12 exit message", &err);
    }
}
