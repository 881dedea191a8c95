//! `check`: load and validate every route, handshake once with each upstream, and explain in
//! plain words anything that fails.

use crate::cli::CheckFormat;
use crate::config::Config;

/// Check every route and print the report; `true` only if every route passed.
pub async fn run(config: &Config, format: CheckFormat) -> bool {
    let _ = (config, format);
    eprintln!("mtls-sidecar: check is not implemented yet");
    false
}
