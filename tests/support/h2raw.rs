//! Hand-written h2c frames, for what no well-behaved client sends: streams beyond the server's
//! limit, a header block that never ends, a reset flood, a window that never closes while the
//! socket is never read. HPACK is written without the dynamic table or Huffman coding
//! (literal fields are always valid); answers are read as frames, never decoded.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const CANCEL: u32 = 0x8;
pub const REFUSED_STREAM: u32 = 0x7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;

/// One frame: 9-byte header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// The preface and an empty SETTINGS frame.
pub fn hello() -> Vec<u8> {
    let mut v = PREFACE.to_vec();
    v.extend(settings(&[]));
    v
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// The header block of `GET http://app.invalid{path}` plus `extra` fields.
pub fn get_block(path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http (static table)
    hpack_int(&mut b, 0, 4, 4); // :path, literal without indexing
    hpack_str(&mut b, path.as_bytes());
    hpack_int(&mut b, 0, 4, 1); // :authority
    hpack_str(&mut b, b"app.invalid");
    for (name, value) in extra {
        b.push(0);
        hpack_str(&mut b, name.as_bytes());
        hpack_str(&mut b, value);
    }
    b
}

/// A complete GET request (HEADERS with END_HEADERS and END_STREAM) on `stream`; split into
/// HEADERS + CONTINUATION frames of at most 16 KiB when the block is larger.
pub fn get(stream: u32, path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let block = get_block(path, extra);
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, mut flags) = if i == 0 {
            (HEADERS, END_STREAM)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        out.extend(frame(kind, flags, stream, c));
    }
    out
}

/// A frame read back.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The next frame, `Ok(None)` at end of stream or reset, `Err` when `limit` passed first.
pub async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
    limit: Duration,
) -> Result<Option<Frame>, tokio::time::error::Elapsed> {
    tokio::time::timeout(limit, async {
        let mut head = [0u8; 9];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if is_end(&e) => return None,
            Err(e) => panic!("reading an h2 frame: {e}"),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        match r.read_exact(&mut payload).await {
            Ok(_) => {}
            Err(e) if is_end(&e) => return None,
            Err(e) => panic!("reading an h2 frame: {e}"),
        }
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    })
    .await
}

fn is_end(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    )
}
