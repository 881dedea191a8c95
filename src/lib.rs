//! mtls-sidecar: listens in plaintext on localhost and forwards each connection over mutual TLS,
//! presenting the app's client certificate and verifying the upstream.
//!
//! # Layout: layers, each importing only from the ones below it
//!
//! ```text
//!  main, demo ............ the binary; demo = a built-in mTLS upstream with the proxy in front
//!  app ................... open proxies, load identities, bind listeners, serve, drain; exit 2
//!  admin, check .......... /healthz /readyz /metrics /status POST /shutdown; the `check` command
//!  upstreamz, ca_expiry .. GET /upstreamz (probe rounds, cached); CA expiry gauge and warnings
//!  proxy ................. accept loop, limits, access log; tcp mode (relay), http mode (pool)
//!  upstream, listen ...... dial: resolve, connect, tunnel, handshake; TCP/unix/systemd listeners
//!  config ................ routes from flags and TOML files: plain values, no live objects
//!  egress, metrics ....... HTTP CONNECT proxies (URL, --no-proxy, tunnel); prometheus families
//!  postgres .............. --protocol postgres: SSLRequest openings (app, upstream), ErrorResponse
//!  failure ............... Class and Failure: every way a connection fails, classified
//!  spiffe ................ the Workload API client: SVIDs and bundles published as identities
//!  tls ................... Settings, files, keys, verify, identity (one snapshot), reload
//!  cli, transport, resolve, notify, signal, telemetry, pki, wait ... values and I/O helpers
//!  otel .................. OpenTelemetry spans and their exporter (cargo feature `otel`)
//! ```
//!
//! `python3 ../shared/tools/module-cycles.py src` (run by `.ci/run`) keeps it one-way.
//!
//! - `cli`: clap structs, env fallbacks, help text and the value parsers with their ranges
//! - `transport`: the upstream byte stream (TCP or a proxy's TLS) read in 32 KiB syscalls with a
//!   buffer only while data waits; `ReadySocket`, the app sockets the relay drives by readiness
//! - `resolve`: lookups on their own bounded threads; connects with a per-address share; keepalive
//! - `tls`: `Settings` (files, checks, versions, ALPN, reload interval) and the crypto provider;
//!   `tls::file` bounded reads, `tls::load` PEM chains, CAs, CRLs and the `Material` snapshot,
//!   `tls::keys` private keys, KDF bounds and PKCS#12, `tls::cert` certificate facts,
//!   `tls::verify` CRL/URI SAN/pin checks on top of webpki, `tls::chain_cache` verified upstream
//!   chains remembered (exact bytes, <= 60 s, new per build), `tls::hkdf` TLS 1.3's HKDF on
//!   HMAC keys set up once, `tls::identity` the client config
//!   published as one `Arc<Loaded>`, `tls::reload` polling, SIGHUP, all-or-nothing reloads,
//!   `tls::trust` the CAs trusted and the intermediates sent, described per generation,
//!   `tls::canary` what `--reload-canary` answers (the dial is `check::canary`)
//! - `spiffe`: `spiffe::id` SPIFFE ID syntax; the Workload API stream, published through `tls`
//! - `failure`: `Class`, `Failure`, TLS and I/O error classification, escaping of peer text
//! - `egress`: `egress::url`, `egress::no_proxy`, `egress::tunnel` (CONNECT, auth, proxy TLS)
//! - `metrics`: prometheus-client families and per-route handles
//! - `postgres`: `--protocol postgres`: the app's first messages (`startup`, pure, fuzzed), the
//!   upstream's answer to `SSLRequest` (`answer`), the app's `ErrorResponse` (`error`), and both
//!   openings over streams (`io`); used by `upstream` (every dial) and `proxy::postgres`
//! - `config`: `config` types and errors, `config::flags` (`run` flags to a route),
//!   `config::load` (`--config FILE`, TOML routes with `[defaults]`, errors with file and line)
//! - `upstream`: resolve, connect each address in turn or tunnel, handshake, each phase bounded
//!   by `--connect-timeout`; a `Trace` of it for `check`
//! - `listen`: TCP, unix-socket (mode, stale file, peer uid) and systemd-passed listeners
//! - `proxy`: `RouteCtx` (one dial path for both modes), the accept loop, `proxy::log` (access
//!   lines), `proxy::relay` (the byte relay, generic over both sides), `proxy::tcp` (tcp mode),
//!   `proxy::http` (pool, lanes, bodies, serving), `proxy::watch` (HTTP timeouts),
//!   `proxy::framing`
//! - `check`: validate, dial once through `upstream`, explain failures (text or JSON)
//! - `admin`: the admin endpoints, on their own thread
//! - `upstreamz`: `GET /upstreamz`: one `check::probe` per outbound route, single flight, 5 s cache
//! - `ca_expiry`: follows each identity's publishes: `ca_cert_expiry_timestamp_seconds` and the
//!   daily warnings for CAs and intermediates (`tls::trust` describes them)
//! - `app`: startup and the serve/drain lifecycle; `notify` systemd READY/RELOADING/STOPPING;
//!   `signal` SIGTERM/SIGINT; `wait` the `wait` command; `pki` `dev-pki`; `telemetry` logging;
//!   `logwriter` stderr with request lines batched; `logjson` the JSON request line
//! - `otel`: OpenTelemetry traces from the `OTEL_*` variables: request, dial and connection spans
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod ca_expiry;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod egress;
pub mod failure;
pub mod inbound;
pub mod listen;
pub mod logjson;
pub mod logwriter;
pub mod metrics;
pub mod notify;
pub mod otel;
pub mod pki;
pub mod postgres;
pub mod proxy;
pub mod resolve;
pub mod signal;
pub mod spiffe;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod upstream;
pub mod upstreamz;
pub mod wait;
