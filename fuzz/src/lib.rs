//! Helpers shared by the fuzz targets.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Move this process into a network namespace of its own, with no interface up.
///
/// The config loader and the listen-address parsers resolve host names (`getaddrinfo`), and a
/// fuzzer writes millions of them: without this each one would become a DNS query to the
/// machine's resolver. In an empty namespace resolution fails at once and nothing leaves the
/// process. Root may unshare a network namespace directly; anyone else needs a user namespace
/// first (which only works while the process has one thread, as it has in libFuzzer's
/// initialiser). If neither works the target refuses to run rather than send traffic.
pub fn isolate_network() {
    // SAFETY: unshare(2) takes flags only and changes no memory of this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return;
    }
    // SAFETY: as above.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0 {
        return;
    }
    eprintln!(
        "fuzz: cannot enter a network namespace of its own ({}); this target resolves fuzzed \
         host names and will not send them to a real resolver: run it as root or where user \
         namespaces are allowed",
        std::io::Error::last_os_error()
    );
    std::process::exit(1);
}

/// Run a future that never waits on anything outside itself (every I/O it does is in memory
/// and always ready) to completion, polling it at most `max_polls` times.
pub fn block_on<F: std::future::Future>(fut: F, max_polls: usize) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for _ in 0..max_polls {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("future still pending after {max_polls} polls over in-memory I/O: a hang");
}

/// A peer that has already sent `data`, in reads of at most `step` bytes, then closes; what is
/// written to it is kept in `written`. Every read and write is ready at once.
pub struct Scripted<'a> {
    /// What the peer has yet to send.
    pub data: &'a [u8],
    /// The most bytes one read returns.
    pub step: usize,
    /// Everything written to the peer.
    pub written: Vec<u8>,
}

impl<'a> Scripted<'a> {
    /// A peer sending `data`, cut into reads by the fuzzer's `cut` byte: 1..=255 bytes per read,
    /// or everything at once for 0.
    pub fn new(data: &'a [u8], cut: u8) -> Self {
        let step = if cut == 0 {
            usize::MAX
        } else {
            usize::from(cut)
        };
        Scripted {
            data,
            step,
            written: Vec::new(),
        }
    }
}

impl AsyncRead for Scripted<'_> {
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

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
