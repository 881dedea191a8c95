//! Inbound routes' startup refusals (exit 2, naming the flag), their config-file keys, and
//! the listener rule: an inbound `--listen` needs no `--allow-non-loopback`.

use crate::support::pki::CLIENT_CN;
use crate::support::*;

/// `run --inbound` with the test server identity, without `--ca` and rule (the cases add them).
fn base(pki: &Pki) -> Cmd {
    Cmd::new()
        .args(["run", "--inbound", "--listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
}

#[test]
fn every_refusal_is_exit_2_naming_its_flag() {
    let pki = Pki::new();
    let ca = pki.ca.pem.to_str().expect("utf-8 path").to_string();
    let ok: Vec<&str> = vec![
        "--target",
        "127.0.0.1:9",
        "--ca",
        &ca,
        "--verify-cn",
        CLIENT_CN,
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> { ok.iter().chain(extra).copied().collect() };
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--target", "127.0.0.1:9", "--verify-cn", CLIENT_CN],
            "--ca",
        ),
        (
            vec!["--target", "127.0.0.1:9", "--ca", &ca],
            "--allow-any-client",
        ),
        (vec!["--ca", &ca, "--verify-cn", CLIENT_CN], "--target"),
        (with(&["--upstream", "127.0.0.1:443"]), "--upstream"),
        (with(&["--server-name", "x"]), "--server-name"),
        (with(&["--proxy", "http://127.0.0.1:3128"]), "--proxy"),
        (with(&["--no-proxy", "example.com"]), "--no-proxy"),
        (
            with(&["--mode", "http", "--proxy-protocol", "v1"]),
            "--proxy-protocol",
        ),
        (with(&["--mode", "http", "--alpn", "h2"]), "--alpn"),
        (
            vec![
                "--target",
                "192.0.2.1:80",
                "--ca",
                &ca,
                "--allow-any-client",
            ],
            "--allow-non-loopback",
        ),
        (
            with(&["--handshake-timeout", "366d"]),
            "--handshake-timeout",
        ),
        (with(&["--handshake-timeout", "0"]), "--handshake-timeout"),
    ];
    for (args, wanted) in cases {
        let err = base(&pki).args(&args).startup_error();
        assert!(
            err.contains(wanted),
            "{args:?}: wanted {wanted:?} in: {err}"
        );
    }
}

#[test]
fn target_on_an_outbound_route_is_refused() {
    let pki = Pki::new();
    let err = run_cmd(&pki, "127.0.0.1:443")
        .args(["--target", "127.0.0.1:80"])
        .startup_error();
    assert!(err.contains("--target"), "{err}");
    let err = run_cmd(&pki, "127.0.0.1:443")
        .args(["--verify-cn", "x"])
        .startup_error();
    assert!(err.contains("--verify-cn"), "{err}");
}

#[test]
fn an_inbound_listener_may_be_any_address_and_a_config_file_can_say_inbound() {
    let pki = Pki::new();
    let proxy = Cmd::new()
        .args(["run", "--inbound", "--listen", "0.0.0.0:0", "--cert"])
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key)
        .args(["--target", "127.0.0.1:9", "--ca"])
        .arg(&pki.ca.pem)
        .arg("--allow-any-client")
        .start();
    assert!(proxy.addr().ip().is_unspecified(), "{}", proxy.addr());
    drop(proxy);
    let file = pki.write(
        "inbound.toml",
        format!(
            "[[route]]\nname = \"default\"\ninbound = true\nlisten = \"127.0.0.1:0\"\n\
             target = \"127.0.0.1:9\"\ncert = {:?}\nkey = {:?}\nca = {:?}\n\
             verify_dns_san = [\"a.example\"]\nhandshake_timeout = \"3s\"\nproxy_protocol = \"v2\"\n",
            pki.server.cert, pki.server.key, pki.ca.pem
        ),
    );
    let mut proxy = Cmd::new().arg("run").arg("--config").arg(&file).start();
    proxy.wait_for_line(
        "inbound listening",
        std::time::Duration::from_secs(5),
        |l| l.contains("direction=inbound") || l.contains("direction=\"inbound\""),
    );
    let file = pki.write(
        "bad.toml",
        format!(
            "[[route]]\nname = \"r\"\ninbound = true\nlisten = \"127.0.0.1:0\"\n\
             target = \"127.0.0.1:9\"\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            pki.server.cert, pki.server.key, pki.ca.pem
        ),
    );
    let err = Cmd::new()
        .arg("run")
        .arg("--config")
        .arg(&file)
        .startup_error();
    assert!(
        err.contains("allow_any_client") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn check_on_an_inbound_route_dials_the_target_once() {
    let pki = Pki::new();
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = target.local_addr().expect("addr").to_string();
    let check = |to: &str| {
        Cmd::new()
            .args([
                "check",
                "--inbound",
                "--listen",
                "127.0.0.1:0",
                "--target",
                to,
            ])
            .arg("--cert")
            .arg(&pki.server.cert)
            .arg("--key")
            .arg(&pki.server.key)
            .arg("--ca")
            .arg(&pki.ca.pem)
            .arg("--allow-any-client")
    };
    let mut ok = check(&addr).spawn();
    let status = ok.wait_exit(std::time::Duration::from_secs(15));
    ok.wait_output_closed();
    assert!(
        status.success(),
        "check failed: {}\n{}",
        ok.stdout(),
        ok.stderr()
    );
    assert!(ok.stdout().contains("PASS"), "{}", ok.stdout());
    drop(target);
    let mut down = check(&addr).spawn();
    let status = down.wait_exit(std::time::Duration::from_secs(15));
    down.wait_output_closed();
    assert_eq!(status.code(), Some(1), "{}", down.stdout());
    assert!(
        down.stdout().contains("cannot connect to the target"),
        "{}",
        down.stdout()
    );
}
