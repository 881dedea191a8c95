//! Bad values are usage errors: every number and duration has a range, and extreme values given
//! as flags, `MTLS_SIDECAR_*` variables or config-file keys exit 2 naming the flag (or file,
//! line and key) and the range; nothing panics. The largest values in range really work.

use std::time::Duration;

use crate::support::*;

/// A Rust panic or abort, in any form it reaches stderr.
fn panicked(stderr: &str) -> bool {
    stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") || stderr.contains("abort")
}

/// Numbers far outside any range: negative, zero where it is not allowed, past `usize::MAX >> 3`
/// (tokio's semaphore limit), past `u64::MAX`.
const HUGE_NUMBERS: &[&str] = &[
    "-1",
    "2305843009213693952",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999",
];

/// Durations past 365 days, including ones that overflow `Instant` arithmetic.
const HUGE_DURATIONS: &[&str] = &[
    "366d",
    "300000000000y",
    "18446744073709551615s",
    "584542046091y",
    "99999999999999999999999999999h",
];

/// (flag, config-file key or `None` when the file has no such key, values, text of the range)
fn table() -> Vec<(
    &'static str,
    Option<&'static str>,
    Vec<&'static str>,
    &'static str,
)> {
    let numbers = |extra: &[&'static str]| {
        let mut v = HUGE_NUMBERS.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let durations = || HUGE_DURATIONS.to_vec();
    vec![
        (
            "--max-connections",
            Some("max_connections"),
            numbers(&["0", "1000001"]),
            "from 1 to 1000000",
        ),
        (
            "--pool-max-idle",
            Some("pool_max_idle"),
            numbers(&["10001"]),
            "from 0 to 10000",
        ),
        (
            "--pool-max-connections",
            Some("pool_max_connections"),
            numbers(&["0", "100001"]),
            "from 1 to 100000",
        ),
        (
            "--allow-uid",
            Some("allow_uid"),
            numbers(&["4294967295"]),
            "from 0 to 4294967294",
        ),
        (
            "--listen-mode",
            Some("listen_mode"),
            vec!["-1", "1000", "7777777777777777777777", "0o777"],
            "from 0000 to 0777",
        ),
        (
            "--connect-timeout",
            Some("connect_timeout"),
            durations(),
            "0 to 365d",
        ),
        (
            "--idle-timeout",
            Some("idle_timeout"),
            durations(),
            "0 to 365d",
        ),
        (
            "--reload-interval",
            Some("reload_interval"),
            durations(),
            "0 to 365d",
        ),
        (
            "--header-timeout",
            Some("header_timeout"),
            durations(),
            "0 to 365d",
        ),
        (
            "--pool-idle-timeout",
            Some("pool_idle_timeout"),
            durations(),
            "0 to 365d",
        ),
        (
            "--pool-max-lifetime",
            Some("pool_max_lifetime"),
            durations(),
            "0 to 365d",
        ),
        (
            "--pool-max-lifetime",
            Some("pool_max_lifetime"),
            vec!["500ms", "1ns"],
            "at least 1s",
        ),
        ("--shutdown-delay", None, durations(), "0 to 365d"),
        ("--drain-timeout", None, durations(), "0 to 365d"),
    ]
}

fn base(pki: &Pki) -> Cmd {
    run_cmd(pki, "127.0.0.1:9")
}

/// Runs `cmd` to its exit and checks: code 2, no panic, every `wanted` text in stderr.
fn expect_usage_error(cmd: &Cmd, what: &str, wanted: &[&str]) {
    let (code, stderr) = cmd.run_to_exit(WAIT);
    assert_eq!(code, Some(2), "{what}: expected exit 2:\n{stderr}");
    assert!(!panicked(&stderr), "{what}: panicked:\n{stderr}");
    for w in wanted {
        assert!(stderr.contains(w), "{what}: stderr lacks {w:?}:\n{stderr}");
    }
}

#[test]
fn extreme_values_on_the_command_line_are_usage_errors() {
    let pki = Pki::new();
    for (flag, _, values, range) in table() {
        for v in values {
            // `--flag=value`, so that `-1` is the flag's value, as a user would write it too.
            let cmd = base(&pki).arg(format!("{flag}={v}"));
            expect_usage_error(&cmd, &format!("{flag}={v}"), &[flag, range]);
        }
    }
    // The negative number also as a separate word.
    expect_usage_error(
        &base(&pki).args(["--max-connections", "-1"]),
        "--max-connections -1",
        &["--max-connections", "from 1 to 1000000"],
    );
    // A listen port past 65535.
    let cmd = Cmd::new()
        .args([
            "run",
            "--listen",
            "127.0.0.1:99999",
            "--upstream",
            "127.0.0.1:9",
        ])
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key);
    expect_usage_error(&cmd, "--listen port", &["--listen", "0 to 65535"]);
}

#[test]
fn extreme_values_in_the_environment_are_usage_errors() {
    let pki = Pki::new();
    for (flag, _, values, range) in table() {
        let var = format!(
            "MTLS_SIDECAR_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        for v in values {
            let cmd = base(&pki).env(&var, v);
            expect_usage_error(&cmd, &format!("{var}={v}"), &[flag, range]);
        }
    }
}

#[test]
fn extreme_values_in_a_config_file_are_usage_errors_naming_file_line_and_key() {
    let pki = Pki::new();
    for (flag, key, values, range) in table() {
        let Some(key) = key else { continue };
        for v in values {
            // Integers as TOML integers where TOML can hold them (i64), the rest as strings.
            let is_int_key = matches!(
                key,
                "max_connections" | "pool_max_idle" | "pool_max_connections" | "allow_uid"
            );
            let toml_value = match (is_int_key, v.parse::<i64>()) {
                (true, Ok(n)) if key == "allow_uid" => format!("[{n}]"),
                (true, Ok(n)) => n.to_string(),
                // Past i64: no TOML integer can say it; a TOML parse error, still exit 2.
                (true, Err(_)) => v.to_string(),
                (false, _) => format!("{v:?}"),
            };
            let text = format!(
                "[defaults]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n[[route]]\nname = \"r\"\n\
                 listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{key} = {toml_value}\n",
                pki.client.cert.display().to_string(),
                pki.client.key.display().to_string(),
                pki.ca.pem.display().to_string(),
            );
            let file = pki.write("routes.toml", &text);
            let cmd = Cmd::new().arg("run").arg("--config").arg(&file);
            let where_ = format!("{}:10:", file.display());
            let mut wanted = vec![where_.as_str(), key];
            if !(is_int_key && v.parse::<i64>().is_err()) {
                wanted.push(range);
            }
            expect_usage_error(&cmd, &format!("{flag}: {key} = {toml_value}"), &wanted);
        }
    }
}

#[test]
fn wait_timeout_extremes_are_usage_errors() {
    for v in HUGE_DURATIONS {
        let cmd = Cmd::new().args(["wait", "--admin", "127.0.0.1:9", "--timeout", v]);
        expect_usage_error(&cmd, &format!("wait --timeout {v}"), &["--timeout", "365d"]);
    }
}

/// The largest values in range work: a connection is served with every duration at 365d and a
/// million connection slots, and SIGTERM still ends the process at once (nothing to drain).
#[tokio::test(flavor = "multi_thread")]
async fn the_largest_values_in_range_serve_normally() {
    let pki = Pki::new();
    let up = Upstream::echo(&pki.server, &pki.ca.der).await;
    let mut proxy = run_cmd(&pki, up.addr)
        .args([
            "--max-connections",
            "1000000",
            "--idle-timeout",
            "365d",
            "--connect-timeout",
            "365d",
            "--reload-interval",
            "365d",
            "--drain-timeout",
            "365d",
            "--header-timeout",
            "365d",
            "--pool-idle-timeout",
            "365d",
            "--pool-max-idle",
            "10000",
        ])
        .start();
    let data = pattern(9, 10_000);
    assert!(exchange(proxy.addr(), data.clone()).await == data);
    tokio::task::block_in_place(|| proxy.wait_conn_lines(1));
    proxy.signal("TERM");
    let status = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
    assert!(!panicked(&proxy.stderr()), "{}", proxy.stderr());
}
