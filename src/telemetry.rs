//! Logging to stderr, text or JSON, with a level filter; `RUST_LOG` directives add to it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::{LogArgs, LogFormat};

#[derive(Debug, thiserror::Error)]
#[error("invalid --log-level {value:?}: {reason} (use error, warn, info, debug or trace)")]
pub struct Error {
    value: String,
    reason: String,
}

/// The filter: our own crate at `--log-level`, dependencies at warn unless `RUST_LOG` says more.
fn filter(level: &str) -> Result<EnvFilter, Error> {
    let lvl = level.trim().to_ascii_lowercase();
    if !matches!(lvl.as_str(), "error" | "warn" | "info" | "debug" | "trace") {
        return Err(Error {
            value: level.to_string(),
            reason: "unknown level".into(),
        });
    }
    let mut directives = format!("warn,mtls_sidecar={lvl}");
    if let Ok(extra) = std::env::var("RUST_LOG")
        && !extra.trim().is_empty()
    {
        directives.push(',');
        directives.push_str(&extra);
    }
    EnvFilter::try_new(&directives).map_err(|e| Error {
        value: level.to_string(),
        reason: format!("with RUST_LOG: {e}"),
    })
}

pub fn init(args: &LogArgs) -> Result<(), Error> {
    let filter = filter(&args.log_level)?;
    crate::logwriter::set_json(matches!(args.log_format, LogFormat::Json));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::logwriter::LogWriter)
        .with_target(false);
    // try_init: a second init (tests, demo) keeps the first subscriber.
    let _ = match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn levels() {
        assert!(super::filter("debug").is_ok());
        assert!(super::filter("INFO").is_ok());
        assert!(super::filter("loud").is_err());
    }
}
