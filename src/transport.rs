//! [`Transport`]: the byte stream the upstream TLS session runs over (TCP to the upstream, or a
//! tunnel through an egress proxy), and what the tcp relay needs from the app's socket.
//!
//! rustls asks for at most 4 KiB per `read_tls` call, so a 16 KiB TLS record would cost four
//! `read` syscalls. A TCP [`Transport`] reads up to [`READ_CHUNK`] bytes per syscall into a fresh
//! buffer, hands rustls what it asked for, and keeps the buffer with the rest only while it
//! holds unread bytes: an idle connection carries no buffer at all, and one whose reader
//! stalled pins at most `READ_CHUNK` bytes here. The rest is not copied (an earlier version
//! read into a per-thread scratch buffer and copied the rest out: a second copy of most bytes
//! and 25% more CPU per GB). Writes pass straight through (rustls already gathers records into
//! one vectored write).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

/// The readiness-based operations the relay needs from the app's socket, TCP or unix.
pub trait AppStream: AsyncWrite + Unpin + Send {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    fn try_io_read(&self, f: &mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize>;
}

macro_rules! app_stream {
    ($t:ty) => {
        impl AppStream for $t {
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_read_ready(self, cx)
            }
            fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$t>::poll_write_ready(self, cx)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn try_io_read(&self, f: &mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize> {
                <$t>::try_io(self, Interest::READABLE, f)
            }
        }
    };
}
app_stream!(TcpStream);
app_stream!(UnixStream);

/// Run `read` (a non-blocking read of at most `cap` bytes from `sock`) so that a short read
/// clears tokio's readiness: a TCP read that returns less than asked has emptied the receive
/// queue, so the next wait goes to epoll instead of a `read` that would only say EAGAIN. This
/// is what tokio's own `poll_read` does; it saves a syscall per burst. Data arriving meanwhile
/// raises a new edge, which tokio's readiness tick keeps from being lost.
pub fn read_clearing(
    sock: &impl AppStream,
    cap: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let mut read = Some(read);
    let r = sock.try_io_read(&mut || {
        let n = (read.take().ok_or(io::ErrorKind::WouldBlock)?)()?;
        got = Some(n);
        if n > 0 && n < cap {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}

/// Bytes asked of the kernel per read, here and in the tcp relay: two full TLS records. It is
/// also about the most each layer of a connection keeps for a reader that stalled (this
/// reader's leftover, the relay's unsent rest), which is what bounds a stalled tcp-mode
/// connection's memory (see `proxy::tcp`). Measured with 200 stalled connections
/// (`stalled_apps_cost_bounded_memory`): 256 KiB reads cost about 405 KiB of RSS each,
/// 64 KiB about 125 KiB (too close to the 128 KiB promise), 32 KiB about 100 KiB.
pub const READ_CHUNK: usize = 32 * 1024;

/// Bytes already read and not yet handed on, in front of a stream; holds no allocation when
/// empty.
#[derive(Debug, Default)]
struct Pending {
    /// `None` when drained.
    buf: Option<Vec<u8>>,
    /// How much of `buf` has been handed out.
    pos: usize,
}

impl Pending {
    /// Put bytes back in front of what is still pending.
    fn unread(&mut self, mut bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        if let Some(buf) = self.buf.take() {
            bytes.extend_from_slice(&buf[self.pos..]);
        }
        self.buf = Some(bytes);
        self.pos = 0;
    }

    /// Copy pending bytes into `out`, freeing the buffer once it is drained; `false` when
    /// nothing was pending.
    fn drain_into(&mut self, out: &mut ReadBuf<'_>) -> bool {
        let Some(buf) = &self.buf else { return false };
        let n = out.remaining().min(buf.len() - self.pos);
        out.put_slice(&buf[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == buf.len() {
            self.buf = None;
            self.pos = 0;
        }
        true
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.buf.is_none()
    }

    /// Keep `buf` from `pos` on, when nothing else is pending.
    fn keep(&mut self, buf: Vec<u8>, pos: usize) {
        debug_assert!(self.buf.is_none());
        if pos < buf.len() {
            self.buf = Some(buf);
            self.pos = pos;
        }
    }
}

/// What the upstream TLS session runs over, with the bytes already read from it and not yet
/// handed on in front.
#[derive(Debug)]
pub struct Transport {
    /// The stream itself.
    link: Link,
    /// Read and not yet handed on: the rest of a [`READ_CHUNK`] read, or what an egress proxy
    /// sent after its answer to CONNECT (it already belongs to the tunnel). Read first.
    pending: Pending,
}

#[derive(Debug)]
enum Link {
    /// TCP to the upstream, or to a plain `http://` proxy.
    Tcp(TcpStream),
    /// TLS to an `https://` proxy, over a TCP transport.
    Tls(Box<TlsStream<Transport>>),
}

impl Transport {
    pub fn tcp(tcp: TcpStream) -> Self {
        Transport {
            link: Link::Tcp(tcp),
            pending: Pending::default(),
        }
    }

    /// A TLS session with an `https://` proxy, to run CONNECT over.
    pub fn tls(tls: TlsStream<Transport>) -> Self {
        Transport {
            link: Link::Tls(Box::new(tls)),
            pending: Pending::default(),
        }
    }

    /// Put bytes back in front of whatever is still pending: an egress proxy's answer to
    /// CONNECT may arrive together with the first bytes of the tunnel.
    pub fn unread(&mut self, bytes: Vec<u8>) {
        self.pending.unread(bytes);
    }
}

/// Read up to [`READ_CHUNK`] bytes from `tcp` in one syscall; what `out` cannot take is kept in
/// `pending`.
fn poll_read_chunk(
    tcp: &TcpStream,
    pending: &mut Pending,
    cx: &mut Context<'_>,
    out: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(tcp.poll_read_ready(cx))?;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        match read_clearing(tcp, READ_CHUNK, || tcp.try_read_buf(&mut buf)) {
            Ok(n) => {
                // At the end of the stream `out` is left untouched.
                let taken = n.min(out.remaining());
                out.put_slice(&buf[..taken]);
                pending.keep(buf, taken);
                return Poll::Ready(Ok(()));
            }
            // Readiness was stale; poll_read_ready registers for the next wake-up.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.drain_into(out) {
            return Poll::Ready(Ok(()));
        }
        match &mut this.link {
            Link::Tcp(tcp) => poll_read_chunk(tcp, &mut this.pending, cx, out),
            Link::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, out),
        }
    }
}

/// Run `$e` with `$s` bound to the pinned stream under a [`Transport`].
macro_rules! delegate_write {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().link {
            Link::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Link::Tls(t) => {
                let $s = Pin::new(&mut **t);
                $e
            }
        }
    };
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        delegate_write!(self, s => s.poll_write(cx, b))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_write!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.link {
            Link::Tcp(_) => true,
            Link::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_write!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_write!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_and_eof() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
        });
        let mut r = Transport::tcp(TcpStream::connect(addr).await.unwrap());
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(r.pending.is_empty(), "a drained reader holds no buffer");
    }

    #[tokio::test]
    async fn unread_bytes_come_first() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b" world").await.unwrap();
        });
        let mut r = Transport::tcp(TcpStream::connect(addr).await.unwrap());
        r.unread(b"hello".to_vec());
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, b"hello world");
    }
}
