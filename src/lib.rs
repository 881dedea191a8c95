//! mtls-sidecar: listens in plaintext on localhost and forwards each connection over mutual TLS,
//! presenting the app's client certificate and verifying the upstream.
//!
//! # Layout
//!
//! - `cli`: clap structs: flags, env fallbacks, help text; no logic
//! - `config`: the typed, validated [`config::Config`] (a list of routes) built from the flags
//! - `app`: load identities, bind listeners, serve, drain; exit-code-2 startup errors
//! - `check`: the `check` command: validate, dial once, explain failures (text or JSON)
//! - `config_file`: `--config FILE`, TOML routes with `[defaults]`; errors with file and line
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, `/status`, `POST /shutdown`, on its own thread
//! - `listen`: TCP, unix-socket (mode, stale file, peer uid) and systemd-passed listeners
//! - `metrics`: prometheus-client families and per-route handles
//! - `notify`: systemd READY / RELOADING / STOPPING / WATCHDOG
//! - `wait`: the `wait` command, polling `/readyz`
//! - `signal`: SIGTERM/SIGINT to a shutdown token; a second signal exits at once
//! - `tls::load`: PEM chain, key and CA loading with errors that name the file
//! - `tls::identity`: the route's whole rustls client config, published behind an `ArcSwap`
//! - `tls::reload`: poll files by content and on SIGHUP; all-or-nothing reload; expiry warnings
//! - `tls::verify`: CRL, URI SAN and SPKI pin checks on top of webpki's chain and name checks
//! - `resolve`: lookups on their own bounded threads; connects with a per-address share; keepalive
//! - `upstream`: resolve, connect each address in turn, handshake; failure classification
//! - `egress`: HTTP CONNECT proxies (`--proxy`): URL, credentials, `--no-proxy`, the tunnel
//! - `bufio`: upstream socket reads in 32 KiB syscalls with a buffer only while data waits
//! - `proxy`: accept loop, connection limit, access-log line per connection
//! - `proxy::tcp`: byte-stream relay with half-close both ways and the idle timeout
//! - `pki`: `dev-pki`, a throwaway CA, server and client certificate (rcgen)
//! - `demo`: a built-in mTLS upstream with the proxy in front of it
//! - `telemetry`: tracing-subscriber set-up, text or JSON
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod egress;
pub mod failure;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod proxy;
pub mod resolve;
pub mod signal;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod wait;
