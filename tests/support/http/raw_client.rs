//! The app side by hand: raw requests a well-behaved client never sends, and a parser for the
//! replies.

use super::*;

/// A response parsed from raw bytes.
#[derive(Debug, Clone)]
pub struct RawReply {
    pub status: u16,
    /// (lowercase name, value)
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses one response from the start of `raw`; `Ok(None)` if it is not complete yet.
/// Returns the response and how many bytes it took. A response without a length ends at the
/// end of `raw` only when `at_eof`.
pub fn parse_raw(raw: &[u8], at_eof: bool) -> Result<Option<(RawReply, usize)>, String> {
    let Some(head_end) = find(raw, b"\r\n\r\n") else {
        return if at_eof && !raw.is_empty() {
            Err(format!(
                "connection ended inside a response head: {:?}",
                String::from_utf8_lossy(raw)
            ))
        } else {
            Ok(None)
        };
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().unwrap_or_default().starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut at = head_end + 4;
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let Some(line_end) = find(&raw[at..], b"\r\n") else {
                return Ok(None);
            };
            let size_line = String::from_utf8_lossy(&raw[at..at + line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size line {size_line:?}"))?;
            at += line_end + 2;
            if size == 0 {
                // Trailer section up to an empty line.
                let Some(end) = find(&raw[at - 2..], b"\r\n\r\n") else {
                    return Ok(None);
                };
                at = at - 2 + end + 4;
                break body;
            }
            if raw.len() < at + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&raw[at..at + size]);
            at += size + 2;
        }
    } else if let Some(len) = get("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if raw.len() < at + len {
            return Ok(None);
        }
        at += len;
        raw[at - len..at].to_vec()
    } else if at_eof {
        let body = raw[at..].to_vec();
        at = raw.len();
        body
    } else {
        return Ok(None);
    };
    Ok(Some((
        RawReply {
            status,
            headers,
            body,
        },
        at,
    )))
}

/// Reads from `stream` until one response (after any 1xx but 101) is complete; bytes after it
/// stay in `buf`. Fails on a connection closed without one, or after `limit`.
pub async fn read_raw_reply(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    limit: Duration,
) -> RawReply {
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 64 * 1024];
    let mut eof = false;
    loop {
        match parse_raw(buf, eof) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                if (100..200).contains(&reply.status) && reply.status != 101 {
                    continue;
                }
                return reply;
            }
            Ok(None) if eof => panic!(
                "connection closed before a complete response: {:?}",
                String::from_utf8_lossy(buf)
            ),
            Ok(None) => {}
            Err(e) => panic!("{e}"),
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => eof = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => eof = true,
            Ok(Err(e)) => panic!("reading a response: {e}"),
            Err(_) => panic!(
                "no complete response within {limit:?}; got {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

/// Writes `request` on a new connection while reading one response (write errors are ignored:
/// the proxy may answer and close before reading it all).
pub async fn raw_call(addr: SocketAddr, request: &[u8]) -> RawReply {
    let (mut rd, mut wr) = connect(addr).await.into_split();
    let request = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let reply = read_raw_reply(&mut rd, &mut Vec::new(), WAIT).await;
    writer.abort();
    reply
}
