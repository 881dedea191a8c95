//! Checks shared by the hostile-input tests of every HTTP listener (the outbound app side and
//! the inbound TLS side): timing windows, reading h2 frames until one matches, one HTTP/1.1
//! GET on an open connection, and a process's resident memory.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::WAIT;
use super::h2raw::{self, Frame};
use super::http::{APP_HOST, read_raw_reply};

/// Asserts that `took` lies in `[at - 0.1 s, at + slack]`.
pub fn around(what: &str, took: Duration, at: Duration, slack: Duration) {
    assert!(
        took + Duration::from_millis(100) >= at && took <= at + slack,
        "{what}: after {took:?}, expected about {at:?} (at most {slack:?} late)"
    );
}

/// One HTTP/1.1 GET on an open connection; returns the status.
pub async fn h1_get(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str) -> u16 {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {APP_HOST}\r\n\r\n").as_bytes())
        .await
        .expect("write request");
    let mut buf = Vec::new();
    read_raw_reply(stream, &mut buf, WAIT).await.status
}

/// Reads frames until `pred` matches one (returned) or the connection ends (`None`).
pub async fn frames_until(
    stream: &mut (impl AsyncRead + Unpin),
    limit: Duration,
    mut pred: impl FnMut(&Frame) -> bool,
) -> Option<Frame> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match h2raw::read_frame(stream, left).await {
            Ok(Some(f)) if pred(&f) => return Some(f),
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(_) => panic!("no matching h2 frame and no close within {limit:?}"),
        }
    }
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}
