//! `--access-log request`: one line per request, written when its response ended (the body
//! finished, or the exchange was cut), and the request-duration histogram of every http-mode
//! route.
//!
//! The record is made only in `request` mode: otherwise a request costs a branch here and one
//! clock read for the histogram. In `request` mode it is one boxed record and one shared byte
//! counter per request; the pooled connection that served it is told by the pool's connector
//! (hyper-util copies it into every response it reads on that connection).
//!
//! Strings from the network (method, authority, path) are capped and escaped before they reach
//! the log; the query string and header values are never logged.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use tracing::info;

use crate::failure::escape;
use crate::logjson;
use crate::logwriter::{self, ACCESS_TARGET};
use crate::proxy::RouteCtx;

/// At most this many bytes of each network string are logged; a longer one is cut and ends
/// in `…`.
const MAX_METHOD: usize = 32;
const MAX_AUTHORITY: usize = 256;
const MAX_PATH: usize = 512;

/// The pooled upstream (inbound: target) connection a response came on: the route's dial
/// number, so one id on many lines means one reused connection. Set on the connection by the
/// pool's connector in `request` mode.
#[derive(Clone, Copy, Debug)]
pub(super) struct UpstreamConn(pub(super) u64);

/// The request body's byte count for its record, carried from the app connection to
/// `HttpRoute::forward` in the request's extensions.
#[derive(Clone, Debug)]
pub(super) struct BytesIn(pub(super) Counter);

/// Who answered a request, as far as its record knows.
enum Answer {
    /// No response head yet: the app went away (or the exchange was cut) before it.
    None,
    /// The proxy's own answer, with its reason.
    Own(&'static str),
    /// The upstream or target; `conn` is its pooled connection's id (none for an upgrade's
    /// dedicated connection), `h2` whether it spoke h2.
    Dest { conn: Option<u64>, h2: bool },
}

/// One request's record; logs itself when dropped, which the response body's wrapper does
/// when hyper is done with the response.
pub(super) struct RequestLog {
    /// The route: its name, for the line.
    ctx: Arc<RouteCtx>,
    /// The app's (inbound: the client's) address.
    peer: Arc<str>,
    /// When the request head was received.
    started: Instant,
    method: Method,
    /// The app's request target (path logged, query never).
    uri: Uri,
    /// The app's `Host`, when its target carries no authority (HTTP/1.1 origin form).
    host: Option<header::HeaderValue>,
    /// The app (inbound: the client) spoke h2.
    app_h2: bool,
    /// Request body bytes from the app, counted by the request body as it is forwarded.
    bytes_in: Counter,
    /// Response body bytes handed to the app.
    pub(super) bytes_out: u64,
    /// The response status; 0 while there is none.
    status: u16,
    answer: Answer,
}

impl RequestLog {
    /// The record of a request whose head arrived at `started`; puts the body's counter
    /// into the request's extensions.
    pub(super) fn start(
        ctx: &Arc<RouteCtx>,
        peer: Arc<str>,
        req: &mut Request<Incoming>,
        started: Instant,
    ) -> Box<RequestLog> {
        let bytes_in = Counter::default();
        req.extensions_mut().insert(BytesIn(bytes_in.clone()));
        let host = match req.uri().authority() {
            Some(_) => None,
            None => req.headers().get(header::HOST).cloned(),
        };
        Box::new(RequestLog {
            ctx: ctx.clone(),
            peer,
            started,
            method: req.method().clone(),
            uri: req.uri().clone(),
            host,
            app_h2: req.version() == Version::HTTP_2,
            bytes_in,
            bytes_out: 0,
            status: 0,
            answer: Answer::None,
        })
    }

    /// The response head is about to go to the app.
    fn answered<B>(&mut self, resp: &Response<B>) {
        self.status = resp.status().as_u16();
        let ext = resp.extensions();
        self.answer = match ext.get::<crate::failure::OwnAnswer>() {
            Some(own) => Answer::Own(own.0),
            None => Answer::Dest {
                conn: ext.get::<UpstreamConn>().map(|c| c.0),
                h2: resp.version() == Version::HTTP_2,
            },
        };
    }

    /// `app>upstream`: `h1` or `h2` each side, `-` for no upstream exchange.
    fn protocol(&self) -> &'static str {
        match (self.app_h2, &self.answer) {
            (false, Answer::Dest { h2: false, .. }) => "h1>h1",
            (false, Answer::Dest { h2: true, .. }) => "h1>h2",
            (true, Answer::Dest { h2: false, .. }) => "h2>h1",
            (true, Answer::Dest { h2: true, .. }) => "h2>h2",
            (false, _) => "h1>-",
            (true, _) => "h2>-",
        }
    }

    fn authority(&self) -> Cow<'_, str> {
        if let Some(a) = self.uri.authority() {
            return Cow::Borrowed(a.as_str());
        }
        match &self.host {
            Some(h) => match h.to_str() {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => String::from_utf8_lossy(h.as_bytes()),
            },
            None => Cow::Borrowed("-"),
        }
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        let micros = self.started.elapsed().as_micros() as u64;
        let (conn, reason) = match &self.answer {
            Answer::None => (None, Some("cancelled")),
            Answer::Own(reason) => (None, Some(*reason)),
            Answer::Dest { conn, .. } => (*conn, None),
        };
        let authority = self.authority();
        let line = Line {
            method: shown(self.method.as_str(), MAX_METHOD),
            authority: shown(&authority, MAX_AUTHORITY),
            path: shown(self.uri.path(), MAX_PATH),
            conn: ConnId(conn),
            micros,
            reason,
        };
        // Formatted here in one pass into the thread's buffer. Text: in the form the text
        // log gives fields, handed to tracing as the value of the first one (`route`), so the
        // line reads the same as with separate fields for a fraction of the CPU (not as the
        // message: tracing copies a message character by character to escape it). JSON: the
        // whole line, as tracing's JSON formatter would write it, straight to the batched
        // writer (tracing's JSON formatter costs more than three times as much).
        let written = LINE.try_with(|buf| {
            let Ok(mut buf) = buf.try_borrow_mut() else {
                return self.log_fields(&line);
            };
            buf.clear();
            if logwriter::is_json() {
                self.write_json(&line, &mut buf);
                logwriter::write_request_line(buf.as_bytes());
            } else {
                self.write_text(&line, &mut buf);
                info!(target: ACCESS_TARGET, route = %buf.as_str(), "request");
            }
        });
        // The thread is being torn down (its buffer is gone): the tracing path still works.
        if written.is_err() {
            self.log_fields(&line);
        }
    }
}

thread_local! {
    /// The request line being formatted (text: its fields), reused by the thread's next one.
    static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The values of a request line, escaped and capped.
struct Line<'a> {
    method: Cow<'a, str>,
    authority: Cow<'a, str>,
    path: Cow<'a, str>,
    conn: ConnId,
    /// `duration_ms`, in microseconds.
    micros: u64,
    reason: Option<&'static str>,
}

impl RequestLog {
    /// The line as separate fields (when the thread's buffer is in use).
    fn log_fields(&self, l: &Line<'_>) {
        let duration_ms = l.micros as f64 / 1000.0;
        info!(
            target: ACCESS_TARGET,
            route = %self.ctx.route.name, peer = %self.peer, method = %l.method,
            authority = &*l.authority, path = &*l.path, status = self.status,
            bytes_in = self.bytes_in.get(), bytes_out = self.bytes_out, duration_ms,
            upstream_conn = %l.conn, protocol = %self.protocol(),
            reason = l.reason.map(display), "request"
        );
    }

    /// The whole line as one JSON object, with the keys and value types tracing's JSON
    /// formatter gives the fields of [`Self::log_fields`], and a newline.
    fn write_json(&self, l: &Line<'_>, out: &mut String) {
        use crate::logjson::{num_field, str_field};
        use std::fmt::Write as _;
        logjson::start(out, "INFO", "request");
        str_field(out, "route", &self.ctx.route.name);
        str_field(out, "peer", &self.peer);
        str_field(out, "method", &l.method);
        str_field(out, "authority", &l.authority);
        str_field(out, "path", &l.path);
        num_field(out, "status", self.status);
        num_field(out, "bytes_in", self.bytes_in.get());
        num_field(out, "bytes_out", self.bytes_out);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            ",\"duration_ms\":{}.{:03}",
            l.micros / 1000,
            l.micros % 1000
        );
        match l.conn.0 {
            Some(id) => {
                let _ = write!(out, ",\"upstream_conn\":\"{id}\"");
            }
            None => str_field(out, "upstream_conn", "-"),
        }
        str_field(out, "protocol", self.protocol());
        if let Some(reason) = l.reason {
            str_field(out, "reason", reason);
        }
        logjson::end(out);
    }

    /// The line's fields as the text log writes fields, `name=value`, strings from the
    /// network quoted and escaped (`{:?}`), without the first field's `route=`.
    fn write_text(&self, l: &Line<'_>, out: &mut String) {
        use std::fmt::Write as _;
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "{} peer={} method={} authority={:?} path={:?} status={} bytes_in={} \
             bytes_out={} duration_ms={}.{:03} upstream_conn={} protocol={}",
            self.ctx.route.name,
            self.peer,
            l.method,
            l.authority,
            l.path,
            self.status,
            self.bytes_in.get(),
            self.bytes_out,
            l.micros / 1000,
            l.micros % 1000,
            l.conn,
            self.protocol(),
        );
        if let Some(reason) = l.reason {
            let _ = write!(out, " reason={reason}");
        }
    }
}

/// A request answered at its head: `started` is when its head arrived. Observes
/// `http_request_duration_seconds` and completes the record, if any.
pub(super) fn answered<B>(
    ctx: &RouteCtx,
    started: Instant,
    resp: &Response<B>,
    log: Option<&mut RequestLog>,
) {
    if let Some(h) = &ctx.metrics.request_duration {
        h.observe(started.elapsed().as_secs_f64());
    }
    if let Some(log) = log {
        log.answered(resp);
    }
}

/// `upstream_conn`: the id, or `-`.
struct ConnId(Option<u64>);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("-"),
        }
    }
}

/// A string from the network as logged: at most `max` bytes (cut at a character boundary,
/// then `…`), control and bidirectional-override characters escaped. Borrows when nothing
/// needs changing.
fn shown(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return escape(s);
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = escape(&s[..cut]).into_owned();
    out.push('…');
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn shown_caps_and_escapes() {
        assert_eq!(shown("/plain", 16), "/plain");
        assert_eq!(shown("/a\u{7}b\u{202e}", 16), "/a\\u{7}b\\u{202e}");
        assert_eq!(shown("/abcdef", 4), "/abc…");
        // A cut inside a multi-byte character moves back to its start.
        assert_eq!(shown("/éé", 2), "/…");
    }
}
