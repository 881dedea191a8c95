//! Inputs the fuzz targets in `fuzz/` found (a panic, a hang or a wrong answer), replayed
//! through the real binary so they stay fixed. `fuzz/README.md` says which target found each.

use crate::support::*;

/// `fuzz/regressions/proxy_url/unbracketed-colon-host`: `http://a:b:80` was taken as the host
/// `a:b` on port 80, which the logs then printed as `http://[a:b]:80`, not an address at all.
/// Only a bracketed IPv6 address may hold a colon; anything else is refused at startup.
#[test]
fn proxy_url_host_with_colon_is_refused() {
    let pki = Pki::new();
    for url in [
        "http://a:b:80",
        "http://::1:3128",
        "https://user:pw@x:y:443",
    ] {
        let err = run_cmd(&pki, "127.0.0.1:9")
            .args(["--proxy", url])
            .startup_error();
        assert!(
            err.contains("--proxy") && err.contains("written in brackets"),
            "{url}: {err}"
        );
        assert!(
            !err.contains("user:pw"),
            "{url}: the credentials leaked: {err}"
        );
    }
}

/// `fuzz/regressions/listen_addr/nested-brackets`: `--upstream '[[[[]]:5'` was taken as the
/// host `[[[]` (shown as `[[[]:5`, which parses as another host), and with `--server-name` the
/// sidecar started and dialled it. Brackets surround an IPv6 address and nothing else.
#[test]
fn upstream_with_stray_brackets_is_refused() {
    let pki = Pki::new();
    for upstream in ["[[[[]]:5", "[a]:443", "a]:443", "[x:443"] {
        let err = run_cmd(&pki, upstream)
            .args(["--server-name", "upstream.test"])
            .startup_error();
        assert!(
            err.contains("--upstream") && err.contains("brackets"),
            "{upstream}: {err}"
        );
    }
}
