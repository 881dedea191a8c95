//! Addresses: `--listen` (TCP, `unix:`, `systemd:`, and the loopback rule), `--admin` and
//! `--upstream`. Host names are resolved, so the process runs in an empty network namespace.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::config;

fuzz_target!(
    init: mtls_sidecar_fuzz::isolate_network(),
    |data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(u) = config::parse_upstream(text) {
            // What logs and `check` print parses back to the same upstream.
            let again = config::parse_upstream(&u.to_string())
                .unwrap_or_else(|e| panic!("{u} does not parse again: {e}"));
            assert_eq!(again, u);
        }
        for allow in [false, true] {
            let _ = config::parse_listen(text, allow, "fuzz").map_err(|e| e.to_string());
        }
        let _ = config::parse_admin(text).map_err(|e| e.to_string());
    }
);
