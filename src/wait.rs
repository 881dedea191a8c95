//! `wait --admin ADDR --timeout DUR`: poll `/readyz` until it answers 200 (for a Kubernetes
//! postStart hook or a script that must not start before the sidecar is ready).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pause between two probes.
const PROBE_EVERY: Duration = Duration::from_millis(100);

/// One probe: `Some(status)` of `GET /readyz`, `None` if nothing answered.
async fn probe(admin: &str) -> Option<u16> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `true` as soon as `/readyz` answers 200; `false` once `timeout` has passed.
pub async fn until_ready(admin: &str, timeout: Duration) -> bool {
    // `--timeout` is at most 365 days, but a deadline that cannot be represented must still
    // not panic: it means "wait as long as it takes".
    let Some(deadline) = Instant::now().checked_add(timeout) else {
        loop {
            if let Some(200) = probe(admin).await {
                return true;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        if let Ok(Some(200)) = tokio::time::timeout(left, probe(admin)).await {
            return true;
        }
        tokio::time::sleep_until((Instant::now() + PROBE_EVERY).min(deadline)).await;
    }
}
