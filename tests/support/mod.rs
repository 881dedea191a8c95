//! Helpers shared by every test module.

pub mod admin;
pub mod bounds;
pub mod connect_proxy;
pub mod files;
pub mod h2raw;
pub mod http;
pub mod inbound;
pub mod net;
pub mod nginx;
#[cfg(feature = "otel")]
pub mod otlp_collector;
pub mod pg;
pub mod pki;
pub mod postgres;
pub mod postgres_client;
pub mod proc;
pub mod raw_h1;
pub mod refused;
pub mod upstream;
pub mod workload_api;
pub mod workload_api_pki;

use std::fmt::Display;
use std::path::Path;
use std::sync::Once;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use net::*;
pub use pki::Pki;
pub use proc::{Cmd, Sidecar};
pub use upstream::{Behavior, Silent, Upstream};

/// Upper bound for anything that should happen "soon". Only reached when something is broken, so
/// it is generous: a debug build on a loaded 2-core machine is slow.
pub const WAIT: Duration = Duration::from_secs(15);

/// Installs the aws-lc-rs provider for the in-process peers, once per test process.
pub fn init_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only means another provider was installed first, which is fine for a test peer.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (RFC 4648 section 4), as `--pin-sha256` takes it.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift64*), so that a shifted or repeated block in the
/// proxy cannot go unnoticed the way it could with a repeating pattern.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The value of `key=value` (or `key="value"`) in a text log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let mut from = 0;
    while let Some(found) = line[from..].find(&pat) {
        let at = from + found;
        let boundary = at == 0 || matches!(line.as_bytes()[at - 1], b' ' | b'{' | b',' | b'\t');
        if boundary {
            let rest = &line[at + pat.len()..];
            if let Some(quoted) = rest.strip_prefix('"') {
                // The closing quote is the first one not escaped by a backslash.
                let mut escaped = false;
                for (i, c) in quoted.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => return Some(&quoted[..i]),
                        _ => escaped = false,
                    }
                }
                return None;
            }
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '}' || c == ',')
                .unwrap_or(rest.len());
            return Some(&rest[..end]);
        }
        from = at + pat.len();
    }
    None
}

/// A numeric field of a log line; panics with the line when it is missing or not a number.
pub fn num_field(line: &str, key: &str) -> u64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in log line: {line}"))
}

/// Whether a stderr line is the one-per-connection access log line.
pub fn is_conn_line(line: &str) -> bool {
    line.contains("connection") && field(line, "outcome").is_some()
}

/// `mtls-sidecar run` on 127.0.0.1:0 towards `upstream` with the test client identity and CA.
pub fn run_cmd(pki: &Pki, upstream: impl Display) -> Cmd {
    run_cmd_files(upstream, &pki.client.cert, &pki.client.key, &pki.ca.pem)
}

/// [`run_cmd`] with the certificate, key and CA files given: for tests that put a broken,
/// hostile or rotating file in place of one of the test PKI's.
pub fn run_cmd_files(upstream: impl Display, cert: &Path, key: &Path, ca: &Path) -> Cmd {
    run_cmd_files_on(Some("127.0.0.1:0"), upstream, cert, key, ca)
}

/// [`run_cmd_files`] with its own `--listen`, or none: for systemd sockets, or a test that adds
/// `--listen` itself.
pub fn run_cmd_files_on(
    listen: Option<&str>,
    upstream: impl Display,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Cmd {
    let cmd = Cmd::new().arg("run");
    let cmd = match listen {
        Some(listen) => cmd.args(["--listen", listen]),
        None => cmd,
    };
    cmd.arg("--upstream")
        .arg(upstream.to_string())
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(ca)
}

#[test]
fn base64_matches_rfc4648_vectors() {
    let vectors = [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];
    for (plain, encoded) in vectors {
        assert_eq!(base64(plain.as_bytes()), encoded, "base64({plain:?})");
    }
    assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
}

#[test]
fn field_parses_plain_and_quoted_values() {
    let line = "2026-11-23T10:00:00Z  WARN conn{peer=1.2.3.4:5}: mtls_sidecar: connection \
                route=default upstream=localhost:1 outcome=tls_error reason=unknown_issuer \
                error=\"invalid peer certificate: UnknownIssuer\" duration_ms=3";
    assert_eq!(field(line, "outcome"), Some("tls_error"));
    assert_eq!(field(line, "reason"), Some("unknown_issuer"));
    assert_eq!(field(line, "peer"), Some("1.2.3.4:5"));
    assert_eq!(
        field(line, "error"),
        Some("invalid peer certificate: UnknownIssuer")
    );
    assert_eq!(num_field(line, "duration_ms"), 3);
    let escaped = r#"WARN x error="--cert a.pem (expected a \"BEGIN\" block)" route=default"#;
    assert_eq!(
        field(escaped, "error"),
        Some(r#"--cert a.pem (expected a \"BEGIN\" block)"#)
    );
    assert_eq!(field(escaped, "route"), Some("default"));
    assert_eq!(field(line, "missing"), None);
    assert!(is_conn_line(line));
}
