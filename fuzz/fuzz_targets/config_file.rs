//! The `--config FILE` loader: TOML text to validated routes (every flag-value parser behind it:
//! listen and upstream addresses, durations, modes, pins, proxy URL and `--no-proxy`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One scratch file, rewritten for each input: `config::load::load` takes a path.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir for the fuzzed config");
        let path = dir.path().join("sidecar.toml");
        (dir, path)
    })
    .1
}

fuzz_target!(
    init: {
        mtls_sidecar_fuzz::isolate_network();
        // Every route's `proxy_from_env` would otherwise depend on the shell that runs this.
        for k in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
            // SAFETY: still single-threaded in libFuzzer's initialiser.
            unsafe { std::env::remove_var(k) };
        }
    },
    |data: &[u8]| {
        // The loader reads the file as UTF-8 and stops at once otherwise.
        if std::str::from_utf8(data).is_err() {
            return;
        }
        let path = scratch();
        if std::fs::write(path, data).is_err() {
            return;
        }
        if let Err(e) = mtls_sidecar::config::load::load(path, None) {
            // Formatting the error is part of what an operator sees: it must not panic.
            let _ = e.to_string();
        }
    }
);
