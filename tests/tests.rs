//! Integration tests: every test runs the real `mtls-sidecar` binary against peers it starts
//! itself (in-process rustls upstreams, nginx, `openssl s_server`) on 127.0.0.1 port 0.
//!
//! # Layout
//!
//! - `support`: test PKI, in-process mTLS upstreams, the handle that runs the binary, socket helpers
//! - `tcp`: byte integrity, full duplex, half-close, concurrency, SNI and client identity, resumption
//! - `refusal`: failed upstream connections and the `reason=` each one logs
//! - `startup`: startup errors (exit 2), key formats, environment variables, `dev-pki`, `demo`
//! - `lifecycle`: signals, draining, `--max-connections`, `--idle-timeout`
//! - `interop`: nginx and `openssl s_server` as the upstream

mod support;

mod interop;
mod lifecycle;
mod refusal;
mod startup;
mod tcp;
