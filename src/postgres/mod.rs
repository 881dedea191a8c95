//! `--protocol postgres`: PostgreSQL's in-band TLS start, spoken for the app.
//!
//! PostgreSQL up to 16 does not start TLS at the first byte: the client sends an `SSLRequest`,
//! the server answers one byte, `S` (TLS follows) or `N`, and only after `S` does the TLS
//! handshake begin. The app side of a route stays plaintext: an `SSLRequest` or
//! `GSSENCRequest` from the app is answered `N` and its next message is read; its first real
//! message (a `StartupMessage`, a `CancelRequest`, anything else) is passed on untouched once
//! the upstream TLS session is up. The upstream side sends `SSLRequest` and requires exactly
//! `S`, with nothing after it (CVE-2021-23222: bytes sent before the handshake would not be
//! protected by it). When the dial fails, the app gets an `ErrorResponse` (SQLSTATE `08001`)
//! so that `psql` prints a sentence rather than "server closed the connection unexpectedly".
//!
//! - `startup`: the app's first messages, parsed without I/O (fuzzed)
//! - `answer`: the upstream's answer to `SSLRequest`, classified without I/O (fuzzed)
//! - `error`: the `ErrorResponse` the app is given
//! - `io`: both openings over real streams, each read bounded in size and by a deadline

pub mod answer;
pub mod error;
pub mod io;
pub mod startup;

pub use answer::Answer;
pub use error::error_response;
pub use startup::{AppOpening, Kind, StartupError, Step};

/// The `--connect-timeout` phase of the upstream opening, as timeouts and `check` name it.
pub const SSL_REQUEST_PHASE: &str = "postgres SSLRequest";

/// `SSLRequest`: length 8, code 1234.5679.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
