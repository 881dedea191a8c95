//! Integration tests: every test runs the real `mtls-sidecar` binary against peers it starts
//! itself (in-process rustls upstreams, nginx, `openssl s_server`) on 127.0.0.1 port 0.
//!
//! # Layout
//!
//! - `support`: test PKI, in-process mTLS upstreams (`support::http` for http mode: the hyper and
//!   hand-written upstreams, app-side clients), an HTTP CONNECT proxy, the handle that runs the
//!   binary (`run_cmd`, `run_cmd_files`, `Cmd::startup_error`), socket helpers
//! - `tcp`: byte integrity, full duplex, half-close, concurrency, SNI and client identity, resumption
//! - `refusal`: failed upstream connections and the `reason=` each one logs
//! - `spiffe_config`: `--spiffe` routes' refusals (files, socket, rule, `--spiffe-id`), variables, keys
//! - `startup`: startup errors (exit 2), key formats, environment variables, `dev-pki`, `demo`
//! - `lifecycle`: signals, draining, `--max-connections`, `--idle-timeout`
//! - `listen_backlog`: a burst beyond `--max-connections` waits in a deep accept queue
//! - `interop`: nginx and `openssl s_server` as the upstream
//! - `rotation`: reloading identity and CA files (rename, `..data` swap, SIGHUP), broken
//!   rotations, two-step writers, rotation under load, expiry warnings
//! - `reload_canary`: `--reload-canary`: a rotation the upstream refuses is kept back until it
//!   trusts the new CA; unreachable upstream, expired identity, no canary publish at once
//! - `relay_cut`: the drain cut reaches busy tcp-mode relays, outbound and inbound
//! - `formats`: encrypted PKCS#8 keys and PKCS#12 identities with password files
//! - `config_file`: `run --config FILE`: errors naming file, line and key; many routes, each with
//!   its own identity, trust and timeouts or `[defaults]`; shared identities; `[admin]`
//! - `check_cmd`: the `check` command against good and failing upstreams, text and JSON, nginx
//! - `check_spiffe`: `check` on `--spiffe` routes: SVID, bundles, federation, waiting for the
//!   Workload API, no bundle for a trust domain, `--spiffe-id`, inbound
//! - `check_inbound`: `check` on inbound routes: direction, rule, client CAs, CRLs, listen names
//! - `checks`: `--crl`, `--verify-uri-san` and `--pin-sha256` on top of chain and name checks
//! - `demo`: `demo` both ways: outbound -> mTLS -> inbound (http mode) -> plain app, identity via XFCC
//! - `access_log_request`: `--access-log request|off` (request lines for h1/h2c apps, pool reuse in
//!   `upstream_conn`, no query or header values, own 502 `reason`, JSON, escaping, `off`, tcp mode)
//! - `latency_metrics`: `http_request_duration_seconds` and `connection_duration_seconds`; inbound
//!   http request lines
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, `/status`, `POST /shutdown` and `wait`
//! - `ca_expiry`: `ca_cert_expiry_timestamp_seconds` (files, reloads, SPIFFE bundles), the
//!   intermediates and CA bundle in `/status`, CA and intermediate expiry warnings
//! - `verified_chains`: the cache of verified upstream chains is flushed by every reload (file
//!   change, SIGHUP) and never stands in for the upstream's handshake signature
//! - `upstreamz`: `GET /upstreamz`: real handshakes per outbound route, failures in `check`'s
//!   words, the 5 s cache and single flight, no effect on connection metrics
//! - `systemd`: the notify protocol against a fake `NOTIFY_SOCKET`; socket activation
//! - `unix`: `--listen unix:PATH`, `--listen-mode`, stale and live socket files, `--allow-uid`
//! - `http`: `--mode http`: Host rewrite, ALPN upstream, h2c from the app, bodies and streaming,
//!   trailers, `Expect: 100-continue`, upgrades, hop-by-hop headers, the mode's flags
//! - `pool_lifetime`: `--pool-max-lifetime` on the shared pool, lanes and the inbound target pool
//! - `http_pool`: the upstream pool (reuse, h2 multiplexing, stale retry, idle timeout and cap),
//!   reloads, `http_requests_total`, draining, nginx as the upstream
//! - `inbound_tcp`, `inbound_config`, `inbound_state`: inbound routes (mTLS in, plaintext to `--target`)
//! - `http_errors`: the proxy's own 502/504 answers and retries, 431, slow-header clients
//! - `hostile_admin`: `POST /shutdown` only local and without `Origin`, the admin connection cap
//!   and head timeout, rate-limited accept errors
//! - `hostile_httpsrv`: http mode's app side: silent, dribbling and preface-only connections, idle
//!   and stalled ones, upgrade tunnels under `--max-connections` and drain, h2 stream, header and
//!   reset bounds, memory of an app that never reads
//! - `hostile_identity`: systemd sockets and the loopback rule, `--allow-uid` with TCP, refusal
//!   log rate limit
//! - `hostile_values`: extreme numbers and durations as flags, variables and config keys
//! - `hostile_secrets`: canaries in keys, passwords, PKCS#12, proxy URLs and auth files never
//!   reach logs at trace, `--help`, `/status`, `/metrics`, `check`, exit messages or 502 bodies
//! - `hostile_files`: FIFOs, devices, oversized files and expensive KDF parameters at startup and
//!   at reload; permission and stale-CRL warnings; `dev-pki --force`
//! - `hostile_fuzz_regressions`: inputs the fuzz targets found, through the binary
//! - `hostile_conn`: `check` after close_notify and against silent peers, memory of stalled tcp
//!   connections, TCP keepalive, escaped peer certificate text
//! - `hostile_httpup`: http mode's upstream side: ambiguous framing, bodies of unknown length,
//!   `OPTIONS *`, the pool cap, never-reading apps, PINGs, content-free 502 bodies
//! - `spiffe_wapi_server`: the scripted SPIFFE Workload API of `support::workload_api`, checked
//!   with the `spiffe` crate's client
//! - `spiffe_routes`, `spiffe_lifecycle`, `spiffe_http`: `--spiffe` routes against it: both directions with no
//!   files, trust domains and federation, `--spiffe-id`, startup wait, rotation, outage, withdrawal
//! - `proxy`: egress through an HTTP CONNECT proxy (`--proxy`, `--proxy-ca`, `--proxy-auth-file`,
//!   `--no-proxy`, `--proxy-from-env`), one file per subtopic: `tunnel` (names only the proxy
//!   resolves), `credentials`, `bypass`, `failures` (every failure class), `http_mode`,
//!   `config_file`, `startup`
//! - `postgres_opening`: `--protocol postgres` against scripted upstreams: the app's and the
//!   upstream's openings, `N`, injected bytes, the app's `ErrorResponse`, bounds, `check`
//! - `postgres_real`: `--protocol postgres` against a real PostgreSQL (a cluster per test from
//!   `support::postgres`) with `psql` and `pgbench`: queries, COPY, `pg_stat_ssl`, `sslmode`s,
//!   both ways to cancel, `ssl = off`, injected bytes after `S`, refused client certificates

mod support;

mod access_log_json;
mod access_log_request;
mod admin;
mod ca_expiry;
mod check_cmd;
mod check_inbound;
mod check_spiffe;
mod checks;
mod config_file;
mod demo;
mod formats;
mod hostile_admin;
mod hostile_conn;
mod hostile_files;
mod hostile_fuzz_regressions;
mod hostile_httpsrv;
mod hostile_httpup;
mod hostile_identity;
mod hostile_secrets;
mod hostile_values;
mod http;
mod http_errors;
mod http_pool;
mod http_retry;
mod inbound_config;
mod inbound_http;
mod inbound_http_hostile;
mod inbound_interop;
mod inbound_state;
mod inbound_tcp;
mod inbound_tls_choice;
mod interop;
mod latency_metrics;
mod lifecycle;
mod listen_backlog;
#[cfg(feature = "otel")]
mod otel_routes;
#[cfg(feature = "otel")]
mod otel_traces;
mod pool_lifetime;
mod postgres_opening;
mod postgres_real;
mod proxy;
mod proxy_protocol_interop;
mod refusal;
mod relay_cut;
mod reload_canary;
mod rotation;
mod spiffe_config;
mod spiffe_http;
mod spiffe_lifecycle;
mod spiffe_routes;
mod spiffe_wapi_server;
mod startup;
mod systemd;
mod tcp;
mod unix;
mod upstreamz;
mod verified_chains;
