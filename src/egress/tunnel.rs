//! The CONNECT tunnel through a route's proxy: TLS to an `https://` proxy, the CONNECT
//! request with its credentials, and the proxy's answer read and classified.

use std::io;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::client::TlsStream;

use super::Proxy;
use crate::failure::{Class, Failure, escape};
use crate::transport::Transport;

/// Longest CONNECT answer header accepted; more is not a proxy talking.
pub const MAX_ANSWER: usize = 16 * 1024;

/// The phase of `--connect-timeout` spent in the TLS handshake with an `https://` proxy.
pub const PROXY_TLS_PHASE: &str = "TLS handshake with the proxy";
/// The phase of `--connect-timeout` spent in the CONNECT exchange.
pub const CONNECT_PHASE: &str = "CONNECT exchange with the proxy";

/// Open a tunnel to `target` (`host:port`, resolved by the proxy) over `tcp`, a connection to
/// `proxy`: TLS with an `https://` proxy, then CONNECT. Returns the stream the upstream TLS
/// session runs over, with the bytes the proxy sent past its answer in front, and the proxy's
/// status line. Each phase ends by `deadline`; `timed_out` is the failure of a phase that did
/// not.
pub async fn open(
    proxy: &Proxy,
    tcp: TcpStream,
    target: &str,
    deadline: Instant,
    timed_out: impl Fn(&'static str) -> Failure,
) -> Result<(Transport, String), Failure> {
    let mut transport = Transport::tcp(tcp);
    if let Some(config) = proxy.tls() {
        let tls = timeout_at(deadline, proxy.tls_to_proxy(config, transport))
            .await
            .map_err(|_| timed_out(PROXY_TLS_PHASE))??;
        transport = Transport::tls(tls);
    }
    let (answer, rest) = timeout_at(deadline, proxy.connect_tunnel(&mut transport, target))
        .await
        .map_err(|_| timed_out(CONNECT_PHASE))??;
    transport.unread(rest);
    Ok((transport, answer))
}

/// How the proxy answered CONNECT.
enum Status {
    /// A 2xx: its status line, escaped.
    Established(String),
    /// Anything else, with the reason phrase cut short and escaped.
    Refused { code: u16, reason: String },
}

/// The CONNECT request for `target`, with the `Proxy-Authorization` header value `auth`.
fn connect_request(target: &str, auth: Option<&str>) -> String {
    let mut req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: mtls-sidecar/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = auth {
        req.push_str("Proxy-Authorization: ");
        req.push_str(a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

impl Proxy {
    /// TLS to the proxy itself (with [`Proxy::tls`]); CONNECT then runs over it.
    async fn tls_to_proxy(
        &self,
        config: Arc<ClientConfig>,
        tcp: Transport,
    ) -> Result<TlsStream<Transport>, Failure> {
        let name = ServerName::try_from(self.url.host.clone())
            .map_err(|e| Failure::new(Class::ProxyTls, format!("proxy host name: {e}")))?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| self.tls_failure(&e))
    }

    fn tls_failure(&self, e: &io::Error) -> Failure {
        let detail = match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(ce)) => match ce {
                rustls::CertificateError::UnknownIssuer
                | rustls::CertificateError::BadSignature => format!(
                    "its certificate is not trusted: the chain does not lead to a CA in {} \
                     (unknown issuer)",
                    self.trust
                ),
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                    "its certificate is not valid for the name {:?} in the proxy URL",
                    self.url.host
                ),
                other => format!("its certificate was refused: {other:?}"),
            },
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired)) => {
                "it requires a client certificate, and mtls-sidecar presents its identity only \
                 to the upstream, never to the proxy"
                    .to_string()
            }
            Some(other) => format!("TLS error: {other}"),
            None => format!("the connection ended during the TLS handshake: {e}"),
        };
        Failure::new(
            Class::ProxyTls,
            format!("TLS with the proxy {} failed: {detail}", self.url),
        )
    }

    /// Send `CONNECT target` and read the answer. On a 2xx, returns the status line (`200
    /// Connection established`) and the bytes the proxy sent after its header (they already
    /// belong to the tunnel).
    pub async fn connect_tunnel<S>(
        &self,
        io: &mut S,
        target: &str,
    ) -> Result<(String, Vec<u8>), Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let auth = self.auth_header();
        let req = connect_request(target, auth.as_deref());
        io.write_all(req.as_bytes())
            .await
            .map_err(|e| self.io_failure(e, "while we sent CONNECT"))?;
        io.flush()
            .await
            .map_err(|e| self.io_failure(e, "while we sent CONNECT"))?;
        drop(req);

        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = io
                .read(&mut chunk)
                .await
                .map_err(|e| self.io_failure(e, "while answering CONNECT"))?;
            if n == 0 {
                return Err(self.closed_early(&buf));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(head) = self.answer_head(&buf)? {
                let (status, len) = head;
                return match status {
                    Status::Established(line) => Ok((line, buf.split_off(len))),
                    Status::Refused { code, reason } => {
                        Err(self.refusal(code, &reason, auth.is_some(), target))
                    }
                };
            }
        }
    }

    /// The answer's head once `buf` holds all of it, with its length; `None` while more is to
    /// come.
    fn answer_head(&self, buf: &[u8]) -> Result<Option<(Status, usize)>, Failure> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut answer = httparse::Response::new(&mut headers);
        match answer.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = answer.code.unwrap_or(0);
                // The reason phrase is the proxy's text (obs-text lets C1 controls in):
                // escaped before it reaches a log or `check`'s report.
                // It may be as long as the whole head (16 KiB): a short prefix is kept.
                let reason = answer.reason.unwrap_or("");
                let reason = match reason.char_indices().nth(MAX_REASON_CHARS) {
                    Some((cut, _)) => &reason[..cut],
                    None => reason,
                };
                let reason = escape(reason).into_owned();
                let status = if (200..300).contains(&code) {
                    Status::Established(format!("{code} {reason}"))
                } else {
                    Status::Refused { code, reason }
                };
                Ok(Some((status, len)))
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_ANSWER => Ok(None),
            Ok(httparse::Status::Partial) => Err(Failure::new(
                Class::ProxyProtocol,
                format!(
                    "the proxy {} sent a CONNECT answer header over {} KiB",
                    self.url,
                    MAX_ANSWER / 1024
                ),
            )),
            Err(e) => Err(Failure::new(
                Class::ProxyProtocol,
                format!(
                    "the proxy {} did not answer CONNECT in HTTP ({e}): {}",
                    self.url,
                    printable(buf)
                ),
            )),
        }
    }

    /// Reading or writing the CONNECT exchange failed `when`.
    fn io_failure(&self, e: io::Error, when: &str) -> Failure {
        // Through an https:// proxy, a TLS alert can arrive only now (TLS 1.3: the proxy
        // judges the client side after our handshake is done, e.g. it wants a certificate).
        if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            return self.tls_failure(&e);
        }
        Failure::new(
            Class::ProxyProtocol,
            format!("the proxy {} failed {when}: {e}", self.url),
        )
    }

    /// The proxy closed the connection after sending `buf`, short of a whole answer.
    fn closed_early(&self, buf: &[u8]) -> Failure {
        let what = if buf.is_empty() {
            "closed the connection without answering CONNECT".to_string()
        } else {
            format!(
                "closed the connection in the middle of its answer to CONNECT ({} bytes: {})",
                buf.len(),
                printable(buf)
            )
        };
        Failure::new(
            Class::ProxyProtocol,
            format!("the proxy {} {what}", self.url),
        )
    }

    fn refusal(&self, code: u16, reason: &str, sent_auth: bool, target: &str) -> Failure {
        let url = &self.url;
        if code == 407 {
            let message = if sent_auth {
                let rotated = self.reread_auth();
                let next = if rotated {
                    "; the auth file has changed since, the next connection uses its new content"
                } else {
                    ""
                };
                format!(
                    "proxy authentication failed: the proxy {url} refused the credentials {} \
                     (407 {reason}){next}",
                    self.credentials_source()
                )
            } else {
                format!(
                    "proxy authentication required: the proxy {url} answered 407 {reason} and no \
                     credentials are configured (user:pass@ in the proxy URL, or \
                     MTLS_SIDECAR_PROXY_AUTH_FILE)"
                )
            };
            return Failure::new(Class::ProxyAuth, message);
        }
        let hint = match code {
            403 => ": its policy does not allow this destination",
            502..=504 => {
                ": it could not reach the upstream (the proxy resolves and dials the name itself)"
            }
            _ => "",
        };
        Failure::new(
            Class::ProxyRefused,
            format!("the proxy {url} refused CONNECT {target}: {code} {reason}{hint}"),
        )
    }
}

/// How much of a proxy's reason phrase reaches messages.
const MAX_REASON_CHARS: usize = 128;

/// The first bytes of an answer, safe to log.
fn printable(b: &[u8]) -> String {
    let head = &b[..b.len().min(64)];
    format!("{:?}", String::from_utf8_lossy(head))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::ProxyUrl;

    async fn answer(
        wire: &'static [u8],
        chunk: usize,
    ) -> (Result<(String, Vec<u8>), Failure>, String) {
        let (mut ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let proxy = Proxy::new(ProxyUrl::parse("http://u:pw@p:3128").unwrap(), None, None).unwrap();
        let far = tokio::spawn(async move {
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                theirs.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            for piece in wire.chunks(chunk.max(1)) {
                theirs.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            String::from_utf8(req).unwrap()
        });
        let got = proxy.connect_tunnel(&mut ours, "up.example:443").await;
        (got, far.await.unwrap())
    }

    /// Found by the `connect_answer` fuzz target: a reason phrase as long as the head limit
    /// reached the message (and the log) whole.
    #[tokio::test]
    async fn a_long_reason_phrase_is_cut_short() {
        let mut wire = b"HTTP/1.1 403 ".to_vec();
        wire.extend(std::iter::repeat_n(b'x', 8000));
        wire.extend(b"\r\n\r\n");
        let wire: &'static [u8] = wire.leak();
        let (got, _) = answer(wire, wire.len()).await;
        let f = got.unwrap_err();
        assert!(f.message.len() < 2048, "{} bytes", f.message.len());
        assert!(f.message.contains("403 xxxx"), "{}", f.message);
    }

    #[tokio::test]
    async fn connect_keeps_bytes_after_the_answer() {
        let wire = b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n\x16\x03\x03tls";
        // In one segment: the tunnel's first bytes came with the answer.
        let (got, req) = answer(wire, wire.len()).await;
        assert_eq!(
            got.unwrap(),
            (
                "200 Connection established".to_string(),
                b"\x16\x03\x03tls".to_vec()
            )
        );
        assert!(req.starts_with("CONNECT up.example:443 HTTP/1.1\r\nHost: up.example:443\r\n"));
        assert!(
            req.contains("Proxy-Authorization: Basic dTpwdw==\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn connect_answers_are_classified() {
        let cases: [(&'static [u8], Class); 5] = [
            (
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
                Class::ProxyAuth,
            ),
            (
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
                Class::ProxyRefused,
            ),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Class::ProxyProtocol),
            (b"HTTP/1.1 200 OK\r\n", Class::ProxyProtocol),
            (b"", Class::ProxyProtocol),
        ];
        for (wire, class) in cases {
            let (got, _) = answer(wire, 3).await;
            let f = got.expect_err("not a 2xx");
            assert_eq!(
                f.class,
                class,
                "{:?}: {}",
                String::from_utf8_lossy(wire),
                f.message
            );
        }
        let (got, _) = answer(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", 3).await;
        assert!(
            got.unwrap_err()
                .message
                .contains("proxy authentication failed")
        );
    }
}
