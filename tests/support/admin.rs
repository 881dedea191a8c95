//! The admin listener from the outside: its address from the log, a minimal HTTP/1.1 client
//! (one request per connection, every wait bounded) and a Prometheus / OpenMetrics text parser.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Sidecar, WAIT, field};

/// Whether a stderr line is the admin listener's `admin listening addr=...` line.
pub fn is_admin_line(line: &str) -> bool {
    line.contains("admin listening") && field(line, "addr").is_some()
}

/// Waits for the `admin listening addr=HOST:PORT` line and returns that address.
pub fn admin_addr(proxy: &mut Sidecar) -> SocketAddr {
    let line = tokio::task::block_in_place(|| {
        proxy.wait_for_line("the `admin listening addr=` line", WAIT, is_admin_line)
    });
    let addr = field(&line, "addr").expect("addr field");
    addr.parse()
        .unwrap_or_else(|e| proxy.fail(&format!("admin addr={addr} is no socket address: {e}")))
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// (lowercased name, value)
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (with `Connection: close`) and reads the whole answer.
pub async fn try_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<Response> {
    let io = async {
        let mut stream = TcpStream::connect(addr).await?;
        let body_len = if method == "POST" || method == "PUT" {
            "Content-Length: 0\r\n"
        } else {
            ""
        };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mtls-sidecar-tests\r\n\
             Accept: */*\r\n{body_len}Connection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match timeout(WAIT, io).await {
        Ok(res) => res?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{method} http://{addr}{path}: no complete answer within {WAIT:?}"),
            ));
        }
    };
    parse_response(&raw).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{method} http://{addr}{path}: {e}: {:?}",
                String::from_utf8_lossy(&raw)
            ),
        )
    })
}

/// [`try_request`] that panics on any I/O or parse error.
pub async fn request(addr: SocketAddr, method: &str, path: &str) -> Response {
    try_request(addr, method, path)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path).await
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1.x status line: {status_line}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status code in: {status_line}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line: {line}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = &raw[head_end + 4..];
    let header = |n: &str| {
        headers
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        if rest.len() < len {
            return Err(format!("body cut: {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "body is not UTF-8")?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut")?;
        let size_line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err("chunk cut".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Polls `GET path` until `pred` holds for an answer; returns that answer. Fails after `limit`
/// with the last answer (or error).
pub async fn wait_for_answer(
    addr: SocketAddr,
    path: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(&Response) -> bool,
) -> Response {
    let deadline = Instant::now() + limit;
    loop {
        let last = try_request(addr, "GET", path).await;
        if let Ok(resp) = &last
            && pred(resp)
        {
            return resp.clone();
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: no answer that is {what} within {limit:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One sample line of the exposition format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub text: String,
    /// `# TYPE` lines: family name as written -> type
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut types = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            samples.push(
                parse_sample(line).unwrap_or_else(|e| panic!("bad sample line {line:?}: {e}")),
            );
        }
        Metrics {
            text: text.to_string(),
            types,
            samples,
        }
    }

    /// The type of a family; a counter's `# TYPE` line may name it with or without `_total`.
    pub fn type_of(&self, family: &str) -> Option<&str> {
        if let Some(t) = self.types.get(family) {
            return Some(t);
        }
        family
            .strip_suffix("_total")
            .and_then(|base| self.types.get(base))
            .map(String::as_str)
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample named `name` whose label set is exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(
            found.len() <= 1,
            "{} samples {name}{labels:?}:\n{}",
            found.len(),
            self.text
        );
        found.first().map(|s| s.value)
    }

    /// [`Metrics::get`] that fails (with the whole exposition) when the sample is missing.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics:\n{}", self.text))
    }

    /// A counter's value where no sample yet means 0.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => {
                    end = Some(i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(other) => value.push(other),
                        None => return Err("escape at end".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {key} value not closed"));
            }
            labels.insert(key.trim().to_string(), value);
        }
        let end = end.ok_or("labels not closed")?;
        rest = &after[end + 1..];
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().map_err(|_| format!("value {v:?} is no number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Scrapes `/metrics` (which must answer 200 with a Prometheus or OpenMetrics content type).
pub async fn scrape(admin: SocketAddr) -> Metrics {
    let resp = get(admin, "/metrics").await;
    assert_eq!(resp.status, 200, "GET /metrics: {resp:?}");
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "GET /metrics: content-type {ct:?} is neither OpenMetrics nor Prometheus text"
    );
    Metrics::parse(&resp.body)
}

/// Scrapes until `pred` holds (metrics are updated by other tasks than the one that logs);
/// returns the last scrape either way, so that the caller's assertions explain a failure.
pub async fn scrape_until(admin: SocketAddr, pred: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(admin).await;
        if pred(&m) || Instant::now() >= deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn metrics_parser_reads_labels_values_and_types() {
    let text = "# HELP x_connections Connections.\n\
                # TYPE x_connections counter\n\
                x_connections_total{route=\"a\\\"b\",outcome=\"ok\"} 3\n\
                x_h_bucket{le=\"+Inf\",route=\"default\"} 2 # {trace_id=\"1\"} 0.1\n\
                x_g 1.7e9\n\
                # EOF\n";
    let m = Metrics::parse(text);
    assert_eq!(m.type_of("x_connections_total"), Some("counter"));
    assert_eq!(
        m.get(
            "x_connections_total",
            &[("outcome", "ok"), ("route", "a\"b")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.get("x_h_bucket", &[("route", "default"), ("le", "+Inf")]),
        Some(2.0)
    );
    assert_eq!(m.get("x_g", &[]), Some(1.7e9));
    assert_eq!(m.get("x_g", &[("route", "a")]), None);
}

#[test]
fn response_parser_handles_chunked_bodies() {
    let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
                3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    let r = parse_response(raw).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "abcde");
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
}
