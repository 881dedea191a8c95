//! A proxy's answer to CONNECT, as `egress::Proxy::connect_tunnel` reads it. Input: one byte
//! choosing how the answer is cut into reads, then the bytes the proxy sends.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use mtls_sidecar::egress::{MAX_ANSWER, Proxy, ProxyUrl};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A proxy that has already sent everything it will send, in reads of at most `step` bytes,
/// then closes.
struct Answer<'a> {
    data: &'a [u8],
    step: usize,
    written: usize,
}

impl AsyncRead for Answer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.step).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Answer<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written += buf.len();
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, answer)) = data.split_first() else {
        return;
    };
    // 1..=256 bytes per read, or everything at once.
    let step = if cut == 0 {
        usize::MAX
    } else {
        usize::from(cut)
    };
    let url = ProxyUrl::parse("http://proxy.test:3128").expect("a fixed, valid proxy URL");
    let proxy = Proxy::new(url, None, None).expect("no credentials, no TLS");
    let mut io = Answer {
        data: answer,
        step,
        written: 0,
    };
    // Each poll reads at least one byte or ends: the answer's length bounds the polls.
    let result = mtls_sidecar_fuzz::block_on(
        proxy.connect_tunnel(&mut io, "upstream.test:443"),
        answer.len() + 16,
    );
    assert!(io.written > 0, "CONNECT was never sent");
    match result {
        Ok((status, rest)) => {
            assert!(
                status.starts_with('2'),
                "accepted a non-2xx answer: {status:?}"
            );
            // The bytes read past the head are handed on: exactly the tail of what was read
            // (the rest is still in the stream).
            let read = &answer[..answer.len() - io.data.len()];
            assert!(read.ends_with(&rest), "{} bytes handed on", rest.len());
        }
        Err(f) => {
            // The message quotes at most a short, escaped prefix of the answer.
            assert!(
                f.message.len() < 2048 + MAX_ANSWER / 1024,
                "{}",
                f.message.len()
            );
        }
    }
});
