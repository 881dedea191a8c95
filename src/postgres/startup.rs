//! The app's first messages, parsed without I/O: what [`super::io::read_startup`] does with
//! each 8-byte head, and [`scan`], the same over a buffer (for the fuzz target and tests).
//!
//! Every message before authentication starts with an int32 length (counting itself) and an
//! int32 code (a protocol version, or a special request code). The length is bounded as
//! PostgreSQL bounds it (`MAX_STARTUP_PACKET_LENGTH`: at most 10000 bytes after the length
//! word, at least the code), so no app can make us buffer more than 10 KB.

use std::ops::Range;

/// `SSLRequest`'s code, 1234.5679.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `GSSENCRequest`'s code, 1234.5680.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CancelRequest`'s code, 1234.5678.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`: the most a message may hold after its length word.
pub const MAX_STARTUP_PACKET_LENGTH: u32 = 10_000;
/// The bytes every message starts with: length and code.
pub const HEAD: usize = 8;

/// What kind of message the app sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Asks for TLS; answered `N`.
    SslRequest,
    /// Asks for GSSAPI encryption; answered `N`.
    GssEncRequest,
    /// Cancels a query on another connection; passed on.
    CancelRequest,
    /// A `StartupMessage` or any other code: passed on, the server judges it.
    Startup,
}

impl Kind {
    /// The message's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::SslRequest => "SSLRequest",
            Kind::GssEncRequest => "GSSENCRequest",
            Kind::CancelRequest => "CancelRequest",
            Kind::Startup => "startup message",
        }
    }
}

/// What to do after a message's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Answer `N` and read the next message (an `SSLRequest` or `GSSENCRequest`).
    Decline(Kind),
    /// The message to pass on: `len` bytes in all, its head included.
    Forward { kind: Kind, len: usize },
}

/// Why the app's opening is refused (`reason=protocol`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// The length word is out of PostgreSQL's bounds.
    #[error("invalid startup packet length {0}")]
    Length(i32),
    /// An `SSLRequest` or `GSSENCRequest` whose length is not 8.
    #[error("malformed {}: length {len}, expected 8", kind.name())]
    Malformed { kind: Kind, len: i32 },
    /// A second `SSLRequest` (or `GSSENCRequest`): PostgreSQL accepts each once.
    #[error("the app sent a second {} (PostgreSQL accepts one)", .0.name())]
    Repeated(Kind),
}

/// The app side's state: which requests were already answered.
#[derive(Debug, Default, Clone)]
pub struct AppOpening {
    ssl: bool,
    gss: bool,
}

impl AppOpening {
    /// Judge one message's head.
    pub fn next(&mut self, head: [u8; HEAD]) -> Result<Step, StartupError> {
        let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let body = i64::from(len) - 4;
        if body < 4 || body > i64::from(MAX_STARTUP_PACKET_LENGTH) {
            return Err(StartupError::Length(len));
        }
        let (kind, seen) = match code {
            SSL_REQUEST_CODE => (Kind::SslRequest, &mut self.ssl),
            GSSENC_REQUEST_CODE => (Kind::GssEncRequest, &mut self.gss),
            CANCEL_REQUEST_CODE => {
                return Ok(Step::Forward {
                    kind: Kind::CancelRequest,
                    len: len as usize,
                });
            }
            _ => {
                return Ok(Step::Forward {
                    kind: Kind::Startup,
                    len: len as usize,
                });
            }
        };
        if len != HEAD as i32 {
            return Err(StartupError::Malformed { kind, len });
        }
        if *seen {
            return Err(StartupError::Repeated(kind));
        }
        *seen = true;
        Ok(Step::Decline(kind))
    }
}

/// What [`scan`] found in a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// The requests answered `N`, in order.
    pub declined: Vec<Kind>,
    /// The message to pass on and where it is in the buffer; `None` if the buffer ends first.
    pub message: Option<(Kind, Range<usize>)>,
}

/// Run the app side over `buf` as if it were everything the app sent so far.
pub fn scan(buf: &[u8]) -> Result<Scanned, StartupError> {
    let mut opening = AppOpening::default();
    let mut out = Scanned {
        declined: Vec::new(),
        message: None,
    };
    let mut at = 0;
    while let Some(head) = buf.get(at..at + HEAD) {
        let head: [u8; HEAD] = head.try_into().unwrap_or_default();
        match opening.next(head)? {
            Step::Decline(kind) => {
                out.declined.push(kind);
                at += HEAD;
            }
            Step::Forward { kind, len } => {
                if buf.len() - at >= len {
                    out.message = Some((kind, at..at + len));
                }
                return Ok(out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(len: i32, code: u32) -> Vec<u8> {
        let mut v = len.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v
    }

    fn startup() -> Vec<u8> {
        let body = b"user\0alice\0database\0db\0\0";
        let mut v = head((HEAD + body.len()) as i32, 196_608);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn startup_message_is_passed_on_whole() {
        let mut buf = startup();
        buf.extend_from_slice(b"pipelined");
        let s = scan(&buf).unwrap();
        assert!(s.declined.is_empty());
        assert_eq!(s.message, Some((Kind::Startup, 0..startup().len())));
    }

    #[test]
    fn ssl_then_gssenc_then_startup_are_declined_in_order() {
        let mut buf = head(8, SSL_REQUEST_CODE);
        buf.extend(head(8, GSSENC_REQUEST_CODE));
        buf.extend(startup());
        let s = scan(&buf).unwrap();
        assert_eq!(s.declined, vec![Kind::SslRequest, Kind::GssEncRequest]);
        assert_eq!(s.message, Some((Kind::Startup, 16..16 + startup().len())));
        assert_eq!(&buf[..8], &super::super::SSL_REQUEST);
    }

    #[test]
    fn a_repeated_request_is_refused() {
        let mut buf = head(8, SSL_REQUEST_CODE);
        buf.extend(head(8, SSL_REQUEST_CODE));
        assert_eq!(scan(&buf), Err(StartupError::Repeated(Kind::SslRequest)));
        let mut buf = head(8, GSSENC_REQUEST_CODE);
        buf.extend(head(8, SSL_REQUEST_CODE));
        buf.extend(head(8, GSSENC_REQUEST_CODE));
        assert_eq!(scan(&buf), Err(StartupError::Repeated(Kind::GssEncRequest)));
    }

    #[test]
    fn lengths_outside_postgresql_bounds_are_refused() {
        for len in [i32::MIN, -1, 0, 4, 7, 10_005, 20_000, i32::MAX] {
            let e = scan(&head(len, 196_608)).unwrap_err();
            assert_eq!(e, StartupError::Length(len));
            assert_eq!(
                e.to_string(),
                format!("invalid startup packet length {len}")
            );
        }
        for len in [8, 10_004] {
            assert!(scan(&head(len, 196_608)).is_ok(), "{len}");
        }
    }

    #[test]
    fn cancel_request_is_passed_on() {
        let mut buf = head(16, CANCEL_REQUEST_CODE);
        buf.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let s = scan(&buf).unwrap();
        assert_eq!(s.message, Some((Kind::CancelRequest, 0..16)));
    }

    #[test]
    fn a_long_ssl_request_is_malformed_and_a_short_buffer_waits() {
        assert_eq!(
            scan(&head(12, SSL_REQUEST_CODE)),
            Err(StartupError::Malformed {
                kind: Kind::SslRequest,
                len: 12
            })
        );
        let s = scan(&startup()[..10]).unwrap();
        assert_eq!(s.message, None);
        assert_eq!(scan(&[0, 0]).unwrap().message, None);
    }
}
