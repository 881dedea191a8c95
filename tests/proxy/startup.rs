//! Bad proxy settings exit 2 and never echo a password.

use super::*;

/// Bad proxy settings exit 2 naming what is wrong (another scheme, bad URLs, a missing or
/// empty `--proxy-ca`, credentials twice, a bad CIDR, a missing auth file), and never print a
/// password.
#[test]
fn bad_proxy_settings_exit_2() {
    let pki = Pki::new();
    let up = target(8443);
    let base = || run_cmd(&pki, &up);

    let err = base()
        .args(["--proxy", "socks5://127.0.0.1:1080"])
        .startup_error();
    assert!(
        err.contains("--proxy"),
        "socks5:// does not name --proxy:\n{err}"
    );

    // Bad URLs that carry a password: the error must not echo it.
    for url in [
        "socks5://kim:Sec-In-Url-1@127.0.0.1:1080",
        "http://kim:Sec-In-Url-1@127.0.0.1:99999",
        "http://kim:Sec-In-Url-1@127.0.0.1:3128/path",
        "http://kim:Sec-In-Url-1%zz@127.0.0.1:3128",
    ] {
        let err = base().args(["--proxy", url]).startup_error();
        assert!(
            err.contains("--proxy"),
            "{url} does not name --proxy:\n{err}"
        );
        assert!(
            !err.contains("Sec-In-Url-1"),
            "the password of a bad --proxy URL is printed:\n{err}"
        );
    }

    let missing = pki.path("no-such-proxy-ca.pem");
    let err = base()
        .args(["--proxy", "https://127.0.0.1:3128", "--proxy-ca"])
        .arg(&missing)
        .startup_error();
    assert!(
        err.contains(missing.to_str().unwrap()),
        "a missing --proxy-ca file is not named:\n{err}"
    );

    let garbage = pki.write("garbage-proxy-ca.pem", "not a certificate\n");
    let err = base()
        .args(["--proxy", "https://127.0.0.1:3128", "--proxy-ca"])
        .arg(&garbage)
        .startup_error();
    assert!(
        err.contains(garbage.to_str().unwrap()),
        "a --proxy-ca file without certificates is not named:\n{err}"
    );

    let file = auth_file(&pki, "proxy-auth", "judy", "F1le-Pw-Both");
    let err = base()
        .args([
            "--proxy",
            "http://judy:Url-Pw-Both@127.0.0.1:3128",
            "--proxy-auth-file",
        ])
        .arg(&file)
        .startup_error();
    assert!(
        err.contains("proxy-auth-file") || err.contains("proxy_auth_file"),
        "credentials in the URL and a --proxy-auth-file: the error does not name the file flag:\n{err}"
    );
    for secret in ["Url-Pw-Both", "F1le-Pw-Both"] {
        assert!(!err.contains(secret), "a password in the error:\n{err}");
    }

    let err = base()
        .args([
            "--proxy",
            "http://127.0.0.1:3128",
            "--no-proxy",
            "10.0.0.0/33",
        ])
        .startup_error();
    assert!(
        err.contains("--no-proxy") && err.contains("10.0.0.0/33"),
        "a bad CIDR does not name --no-proxy and the entry:\n{err}"
    );

    let missing = pki.path("no-such-auth-file");
    let err = base()
        .args(["--proxy", "http://127.0.0.1:3128", "--proxy-auth-file"])
        .arg(&missing)
        .startup_error();
    assert!(
        err.contains(missing.to_str().unwrap()),
        "a missing --proxy-auth-file is not named:\n{err}"
    );
}
