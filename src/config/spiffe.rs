//! A `--spiffe` route's identity source from flag-shaped values, and the refusals that keep a
//! SPIFFE route from mixing in files or running without a rule on the peer's SPIFFE ID.

use std::path::PathBuf;

use super::{Error, invalid};
use crate::cli::RunArgs;
use crate::tls::SpiffeSource;

/// The standard variable naming the Workload API socket (SPIRE, ghostunnel, Envoy examples).
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// `--spiffe-socket`'s value as a path: `unix:PATH`, `unix://PATH` or a bare path.
pub fn parse_socket(value: &str) -> Result<PathBuf, Error> {
    let v = value.trim();
    let path = if let Some(rest) = v.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = v.strip_prefix("unix:") {
        rest
    } else if v.starts_with("tcp:") {
        return Err(invalid(
            "--spiffe-socket",
            value,
            "only a unix socket is supported: unix:PATH or a path",
        ));
    } else {
        v
    };
    if path.is_empty() {
        return Err(invalid(
            "--spiffe-socket",
            value,
            "the socket path is empty",
        ));
    }
    // The Workload API client takes absolute paths; a relative one is from the working
    // directory at startup.
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return Ok(path);
    }
    std::env::current_dir().map(|d| d.join(&path)).map_err(|e| {
        invalid(
            "--spiffe-socket",
            value,
            format!("cannot make it absolute: {e}"),
        )
    })
}

/// The identity files and trust flags a `--spiffe` route may not have (the API gives both).
fn refuse_files(args: &RunArgs) -> Result<(), Error> {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let set: [(&'static str, Option<String>); 7] = [
        ("--cert", path(&args.cert)),
        ("--key", path(&args.key)),
        ("--key-password-file", path(&args.key_password_file)),
        ("--pkcs12", path(&args.pkcs12)),
        ("--pkcs12-password-file", path(&args.pkcs12_password_file)),
        ("--ca", path(&args.ca)),
        (
            "--crl",
            (!args.crl.is_empty()).then(|| format!("{:?}", args.crl)),
        ),
    ];
    for (flag, value) in set {
        if let Some(v) = value {
            return Err(invalid(
                flag,
                &v,
                "cannot be used with --spiffe: the identity and trust bundles come from the \
                 Workload API",
            ));
        }
    }
    Ok(())
}

/// The route's SPIFFE source, `None` without `--spiffe`; `--spiffe-socket` and `--spiffe-id`
/// without `--spiffe` are refused, as they would be ignored.
pub fn source(args: &RunArgs) -> Result<Option<SpiffeSource>, Error> {
    let s = &args.spiffe_args;
    if !s.spiffe {
        if let Some(v) = &s.spiffe_socket {
            return Err(invalid("--spiffe-socket", v, "applies only with --spiffe"));
        }
        if let Some(v) = &s.spiffe_id {
            return Err(invalid("--spiffe-id", v, "applies only with --spiffe"));
        }
        return Ok(None);
    }
    refuse_files(args)?;
    let socket = match &s.spiffe_socket {
        Some(v) => parse_socket(v)?,
        None => match std::env::var(ENDPOINT_ENV) {
            Ok(v) if !v.trim().is_empty() => parse_socket(&v).map_err(|_| {
                invalid(
                    "--spiffe-socket",
                    &v,
                    "SPIFFE_ENDPOINT_SOCKET is not a unix socket path",
                )
            })?,
            _ => {
                return Err(invalid(
                    "--spiffe-socket",
                    "",
                    "missing: --spiffe needs the Workload API socket (--spiffe-socket, or \
                     SPIFFE_ENDPOINT_SOCKET in the environment)",
                ));
            }
        },
    };
    if let Some(id) = &s.spiffe_id {
        crate::spiffe::id::trust_domain(id).map_err(|why| invalid("--spiffe-id", id, why))?;
    }
    Ok(Some(SpiffeSource {
        socket,
        id: s.spiffe_id.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(
            parse_socket("unix:/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket("unix:///run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert_eq!(
            parse_socket("/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
        assert!(parse_socket("unix:").is_err());
        assert!(parse_socket("tcp:127.0.0.1:8081").is_err());
    }
}
