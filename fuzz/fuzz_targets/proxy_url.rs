//! `--proxy` / `HTTPS_PROXY` URLs (`egress::ProxyUrl::parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::egress::ProxyUrl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = ProxyUrl::parse(text);
    // The credentials (between `://` and the last `@`) never appear in what is shown. Only a
    // userinfo long enough not to occur by chance, and absent from the rest of the URL, is
    // checked.
    let userinfo = text
        .trim()
        .split_once("://")
        .map_or(text.trim(), |(_, r)| r)
        .rsplit_once('@');
    // A leak shows whatever the userinfo holds, so only a userinfo with a character our messages
    // never use is checked: one made of plain words may be our own message text that the fuzzer
    // copied into the URL ("%-escape in the proxy credenti@…" is not a leak).
    let odd = |u: &str| {
        u.chars()
            .any(|c| !(c.is_ascii_alphanumeric() || " ,.;:%'()/_-`\"".contains(c)))
    };
    let secret = userinfo
        .filter(|(u, rest)| u.len() >= 8 && !rest.contains(u) && odd(u))
        .map(|(u, _)| u);
    let shown = match &parsed {
        Ok(url) => format!("{url} {url:?}"),
        Err(e) => e.to_string(),
    };
    if let Some(s) = secret
        && shown.contains(s)
    {
        // It may be words of our own message that the fuzzer put in the userinfo: the same URL
        // with the userinfo masked must then show it too. A leak shows it only when it is there.
        let masked = text.replacen(s, &"Z".repeat(s.len()), 1);
        let shown_masked = match ProxyUrl::parse(&masked) {
            Ok(url) => format!("{url} {url:?}"),
            Err(e) => e.to_string(),
        };
        assert!(shown_masked.contains(s), "credentials shown: {shown:?}");
    }
    // What is shown parses back to the same proxy (it is what logs and `check` print).
    if let Ok(url) = parsed {
        let again = ProxyUrl::parse(&url.to_string())
            .unwrap_or_else(|e| panic!("{url} does not parse again: {e}"));
        assert_eq!(
            (again.scheme, &again.host, again.port),
            (url.scheme, &url.host, url.port)
        );
    }
});
