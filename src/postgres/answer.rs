//! The upstream's answer to our `SSLRequest`, classified without I/O.

use crate::failure::escape;

/// The most of an unexpected answer a message quotes.
pub const QUOTED: usize = 32;

/// What the upstream answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Exactly `S`: the TLS handshake may start.
    Tls,
    /// `N`: the server does not offer TLS on this port.
    NoTls,
    /// It closed the connection without answering.
    Closed,
    /// `S` followed by this many bytes before our ClientHello (the CVE-2021-23222 class):
    /// refused, the bytes are dropped unread by anyone.
    Injected(usize),
    /// Something else: at most [`QUOTED`] bytes of it, escaped, for the message.
    Other(String),
}

impl Answer {
    /// Judge what one read brought (`read` is empty at end of stream) and whether more bytes
    /// were already waiting after it (`more`, counted).
    pub fn of(read: &[u8], more: usize) -> Answer {
        match read {
            [] => Answer::Closed,
            [b'S'] if more == 0 => Answer::Tls,
            [b'S', rest @ ..] => Answer::Injected(rest.len() + more),
            [b'N'] if more == 0 => Answer::NoTls,
            other if more > 0 => Answer::Other(format!("{} (+{more} bytes)", quote(other))),
            other => Answer::Other(quote(other)),
        }
    }

    /// As `check` shows it: `S`, `N`, `closed`, or the bytes.
    pub fn shown(&self) -> String {
        match self {
            Answer::Tls => "S".into(),
            Answer::NoTls => "N".into(),
            Answer::Closed => "the connection closed".into(),
            Answer::Injected(n) => format!("S and {n} more bytes"),
            Answer::Other(q) => format!("\"{q}\""),
        }
    }
}

/// At most [`QUOTED`] bytes, lossily decoded and escaped, `...` when cut.
fn quote(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(QUOTED)];
    let mut s = escape(&String::from_utf8_lossy(cut)).into_owned();
    if bytes.len() > QUOTED {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(Answer::of(b"S", 0), Answer::Tls);
        assert_eq!(Answer::of(b"N", 0), Answer::NoTls);
        assert_eq!(Answer::of(b"", 0), Answer::Closed);
        assert_eq!(Answer::of(b"S", 3), Answer::Injected(3));
        assert_eq!(Answer::of(b"Sxyz", 0), Answer::Injected(3));
        assert_eq!(Answer::of(b"Sxyz", 10), Answer::Injected(13));
        assert!(matches!(Answer::of(b"N", 1), Answer::Other(_)));
        assert_eq!(Answer::of(b"X", 0), Answer::Other("X".into()));
        assert_eq!(
            Answer::of(b"E\0\x1b[31m", 0),
            Answer::Other("E\\0\\u{1b}[31m".into())
        );
        let long = Answer::of(&[b'E'; 100], 0);
        assert_eq!(long, Answer::Other(format!("{}...", "E".repeat(QUOTED))));
    }
}
