//! Where log lines go: stderr, with the request lines of `--access-log request` batched.
//!
//! A write to stderr is a system call per line, which at thousands of requests a second costs
//! more CPU than formatting the line. Request lines (target [`ACCESS_TARGET`]) are therefore
//! collected in a buffer that is written when it holds [`FLUSH_BYTES`], after at most
//! [`FLUSH_EVERY`] (a thread started with the first request line), before any other line (so
//! the order of lines is kept), and at exit. Every other line is written at once, as before.
//! What a crash (or SIGKILL) loses is at most [`FLUSH_EVERY`] of request lines.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// The target of request lines: batched. (Under `mtls_sidecar`, so the level filter that
/// keeps our crate's lines keeps them too.)
pub const ACCESS_TARGET: &str = "mtls_sidecar::access";

/// `--log-format json`: the request line is formatted as a JSON object by `logjson` (in text,
/// it formats its fields itself and hands them to tracing).
static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the log is JSON (set once at startup by `telemetry::init`).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// Batched lines are written once they hold this many bytes ...
const FLUSH_BYTES: usize = 32 * 1024;
/// ... or after this long at the latest.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// Request lines not yet written. A line is at most a few KiB (its network strings are
/// capped), so this stays under `FLUSH_BYTES` plus one line.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Whether the flusher thread runs (started with the first request line); without it,
/// request lines are written at once like the others.
static FLUSHER: OnceLock<bool> = OnceLock::new();

fn pending() -> MutexGuard<'static, Vec<u8>> {
    PENDING.lock().unwrap_or_else(PoisonError::into_inner)
}

fn write_out(buf: &mut Vec<u8>) {
    // A log line that cannot be written has nowhere to be reported.
    let _ = io::stderr().write_all(buf);
    buf.clear();
}

/// Write the batched request lines now (at exit, before a final message).
pub fn flush() {
    let mut p = pending();
    if !p.is_empty() {
        write_out(&mut p);
    }
}

/// The log's writer: [`tracing_subscriber::fmt`] asks it for one [`Line`] per event.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { batched: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            batched: meta.target() == ACCESS_TARGET,
        }
    }
}

/// One formatted event, written in one call.
#[derive(Debug)]
pub struct Line {
    /// A request line: batched.
    batched: bool,
}

/// Write a request line formatted elsewhere (the JSON request line): batched like the
/// request lines tracing formats, in order with every other line.
pub fn write_request_line(line: &[u8]) {
    // A log line that cannot be written has nowhere to be reported.
    let _ = write_line(true, line);
}

/// Write one line; `batched`: a request line.
fn write_line(batched: bool, buf: &[u8]) -> io::Result<()> {
    let mut p = pending();
    if batched && *FLUSHER.get_or_init(start_flusher) {
        p.extend_from_slice(buf);
        if p.len() >= FLUSH_BYTES {
            write_out(&mut p);
        }
    } else if p.is_empty() {
        // Written under the lock, so a batched line cannot slip in front of it.
        io::stderr().write_all(buf)?;
    } else {
        p.extend_from_slice(buf);
        write_out(&mut p);
    }
    Ok(())
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_line(self.batched, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The thread that writes batched lines at least every [`FLUSH_EVERY`]; whether it started.
fn start_flusher() -> bool {
    std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        })
        .is_ok()
}
