//! Flag values parsed from text: durations (`config::parse_duration`), and the other small
//! value parsers: `--listen-mode` (octal), `--pin-sha256` (base64) and `--server-name`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = config::parse_duration("--idle-timeout", text) {
        let _ = e.to_string();
    }
    if let Ok(mode) = config::parse_mode(text) {
        assert!(mode <= 0o777);
    }
    let _ = config::parse_pin(text).map_err(|e| e.to_string());
    let _ = config::parse_server_name("--server-name", text).map_err(|e| e.to_string());
});
