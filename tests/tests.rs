//! Integration tests: every test runs the real `mtls-sidecar` binary against peers it starts
//! itself (in-process rustls upstreams, nginx, `openssl s_server`) on 127.0.0.1 port 0.
//!
//! # Layout
//!
//! - `support`: test PKI, in-process mTLS upstreams, an HTTP CONNECT proxy, the handle that runs
//!   the binary, socket helpers
//! - `tcp`: byte integrity, full duplex, half-close, concurrency, SNI and client identity, resumption
//! - `refusal`: failed upstream connections and the `reason=` each one logs
//! - `startup`: startup errors (exit 2), key formats, environment variables, `dev-pki`, `demo`
//! - `lifecycle`: signals, draining, `--max-connections`, `--idle-timeout`
//! - `interop`: nginx and `openssl s_server` as the upstream
//! - `rotation`: reloading identity and CA files (rename, `..data` swap, SIGHUP), broken
//!   rotations, two-step writers, rotation under load, expiry warnings
//! - `formats`: encrypted PKCS#8 keys and PKCS#12 identities with password files
//! - `config_file`: `run --config FILE`: errors naming file, line and key; many routes, each with
//!   its own identity, trust and timeouts or `[defaults]`; shared identities; `[admin]`
//! - `check_cmd`: the `check` command against good and failing upstreams, text and JSON, nginx
//! - `checks`: `--crl`, `--verify-uri-san` and `--pin-sha256` on top of chain and name checks
//! - `admin`: `/healthz`, `/readyz`, `/metrics`, `/status`, `POST /shutdown` and `wait`
//! - `systemd`: the notify protocol against a fake `NOTIFY_SOCKET`; socket activation
//! - `unix`: `--listen unix:PATH`, `--listen-mode`, stale and live socket files, `--allow-uid`
//! - `http`: `--mode http`: Host rewrite, ALPN upstream, h2c from the app, bodies and streaming,
//!   trailers, `Expect: 100-continue`, upgrades, hop-by-hop headers, the mode's flags
//! - `http_pool`: the upstream pool (reuse, h2 multiplexing, stale retry, idle timeout and cap),
//!   reloads, `http_requests_total`, draining, nginx as the upstream
//! - `http_errors`: the proxy's own 502/504 answers and retries, 431, slow-header clients
//! - `proxy`: egress through an HTTP CONNECT proxy (`--proxy`, `--proxy-ca`, `--proxy-auth-file`,
//!   `--no-proxy`, `--proxy-from-env`): tunnels to names only the proxy resolves, credentials,
//!   bypass lists, every failure class, http mode, config files, startup errors

mod support;

mod admin;
mod check_cmd;
mod checks;
mod config_file;
mod formats;
mod hostile_fuzz_regressions;
mod http;
mod http_errors;
mod http_pool;
mod interop;
mod lifecycle;
mod proxy;
mod refusal;
mod rotation;
mod startup;
mod systemd;
mod tcp;
mod unix;
