//! `--no-proxy` / `NO_PROXY` lists and matching an upstream host against them. Input: the list,
//! a newline, then hosts to match, one per line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::egress::NoProxy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (list, hosts) = text.split_once('\n').unwrap_or((text, ""));
    let Ok(np) = NoProxy::parse(list) else {
        return;
    };
    for host in hosts.lines() {
        if let Some(entry) = np.matching(host) {
            // What is reported is one of the entries as written.
            assert!(list.contains(entry), "{entry:?} is not in {list:?}");
        }
    }
});
