//! Both openings over real streams. Every read is bounded in size here; the callers bound them
//! in time (`--header-timeout` for the app, `--connect-timeout` for the upstream).

use std::io;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::startup::{AppOpening, HEAD, Kind, StartupError, Step};
use super::{Answer, SSL_REQUEST};
use crate::failure::{Class, Failure};

/// Why the app's opening failed.
#[derive(Debug)]
pub enum AppError {
    /// Its message broke PostgreSQL's rules: the app is told why (`reason=protocol`).
    Refused(StartupError),
    /// It closed the connection before its first real message.
    Closed,
    /// Reading or answering it failed.
    Io(io::Error),
}

impl AppError {
    fn from_read(e: io::Error) -> AppError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            AppError::Closed
        } else {
            AppError::Io(e)
        }
    }

    /// The connection's failure.
    pub fn into_failure(self) -> Failure {
        match self {
            AppError::Refused(e) => Failure::new(
                Class::Protocol,
                format!("refused the app's PostgreSQL opening: {e}"),
            ),
            AppError::Closed => Failure::new(
                Class::Io,
                "the app closed the connection before its PostgreSQL startup message (an app \
                 that requires TLS, such as sslmode=require, closes after our N: the local leg \
                 is plaintext, use sslmode=disable or prefer)",
            ),
            AppError::Io(e) => Failure::new(
                Class::Io,
                format!("app connection i/o error before the startup message: {e}"),
            ),
        }
    }
}

/// Read the app's first real message, answering each `SSLRequest` and `GSSENCRequest` with
/// `N` on the way. Exactly the message is read (at most [`super::startup`]'s bound): bytes
/// the app pipelined after it stay in the socket for the relay. Returns its kind and bytes.
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    app: &mut S,
) -> Result<(Kind, Vec<u8>), AppError> {
    let mut opening = AppOpening::default();
    loop {
        let mut head = [0u8; HEAD];
        app.read_exact(&mut head)
            .await
            .map_err(AppError::from_read)?;
        match opening.next(head).map_err(AppError::Refused)? {
            Step::Decline(_) => {
                app.write_all(b"N").await.map_err(AppError::Io)?;
            }
            Step::Forward { kind, len } => {
                let mut message = vec![0u8; len];
                message[..HEAD].copy_from_slice(&head);
                app.read_exact(&mut message[HEAD..])
                    .await
                    .map_err(AppError::from_read)?;
                return Ok((kind, message));
            }
        }
    }
}

/// The most one read of the upstream's answer takes: more than the one byte expected, so that
/// bytes sent after it in the same segment are seen.
const ANSWER_READ: usize = 64;

/// Send `SSLRequest` and read the answer: one read, then one more poll that does not wait, to
/// see bytes already there after it (an `S` followed by anything is refused by
/// [`Answer::of`]). Bytes that arrive later still reach nobody but rustls, which refuses them
/// as a malformed handshake.
pub async fn request_tls<S: AsyncRead + AsyncWrite + Unpin>(up: &mut S) -> io::Result<Answer> {
    up.write_all(&SSL_REQUEST).await?;
    up.flush().await?;
    let mut buf = [0u8; ANSWER_READ];
    let n = up.read(&mut buf).await?;
    let mut more = 0;
    if n > 0 {
        let mut extra = [0u8; ANSWER_READ];
        // `Some` only when bytes (or the end) were already there.
        if let Some(Ok(m)) = up.read(&mut extra).now_or_never() {
            more = m;
        }
    }
    Ok(Answer::of(&buf[..n], more))
}

/// The failure an answer other than `S` is, `upstream` naming the server (`HOST:PORT (ADDR)`).
pub fn refusal(answer: &Answer, upstream: &str) -> Option<Failure> {
    let message = match answer {
        Answer::Tls => return None,
        Answer::NoTls => format!(
            "the server does not offer TLS: {upstream} answered N to SSLRequest (ssl = off, or \
             a pooler without TLS)"
        ),
        Answer::Closed => {
            format!("{upstream} closed the connection instead of answering SSLRequest")
        }
        Answer::Injected(n) => format!(
            "the server sent {n} bytes of unencrypted data after its SSL answer ({upstream}); \
             refused: they would bypass TLS (CVE-2021-23222)"
        ),
        Answer::Other(q) => format!(
            "{upstream} answered SSLRequest with \"{q}\", not a single S or N: is it a PostgreSQL server?"
        ),
    };
    Some(Failure::new(Class::Protocol, message))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;
    use crate::postgres::startup::{GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};

    fn request(code: u32) -> Vec<u8> {
        let mut v = 8u32.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v
    }

    #[tokio::test]
    async fn read_startup_answers_n_and_leaves_pipelined_bytes() {
        let (mut app, mut ours) = duplex(4096);
        let mut sent = request(SSL_REQUEST_CODE);
        sent.extend(request(GSSENC_REQUEST_CODE));
        let startup = [0, 0, 0, 9, 0, 3, 0, 0, 0];
        sent.extend_from_slice(&startup);
        sent.extend_from_slice(b"more");
        app.write_all(&sent).await.unwrap();
        let (kind, message) = read_startup(&mut ours).await.unwrap();
        assert_eq!(kind, Kind::Startup);
        assert_eq!(message, startup);
        let mut answers = [0u8; 2];
        app.read_exact(&mut answers).await.unwrap();
        assert_eq!(&answers, b"NN");
        let mut rest = [0u8; 4];
        ours.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"more");
    }

    #[tokio::test]
    async fn read_startup_says_closed_at_end_of_stream() {
        let (mut app, mut ours) = duplex(64);
        app.write_all(&[0, 0, 0, 9, 0]).await.unwrap();
        drop(app);
        assert!(matches!(
            read_startup(&mut ours).await,
            Err(AppError::Closed)
        ));
    }

    /// The upstream's side of [`request_tls`]: read the SSLRequest, then write `answer`.
    async fn answered(answer: &[u8]) -> Answer {
        let (mut up, mut ours) = duplex(4096);
        let answer = answer.to_vec();
        let server = tokio::spawn(async move {
            let mut first = [0u8; 8];
            up.read_exact(&mut first).await.unwrap();
            assert_eq!(first, SSL_REQUEST);
            up.write_all(&answer).await.unwrap();
            up
        });
        let a = request_tls(&mut ours).await.unwrap();
        drop(server.await.unwrap());
        a
    }

    #[tokio::test]
    async fn request_tls_sees_bytes_sent_with_the_answer() {
        assert_eq!(answered(b"S").await, Answer::Tls);
        assert_eq!(answered(b"N").await, Answer::NoTls);
        assert_eq!(answered(b"Sinjected").await, Answer::Injected(8));
        // More than one read's worth after S: counted from both reads.
        assert_eq!(answered(&[b'S'; 100]).await, Answer::Injected(99));
    }

    #[test]
    fn refusals_say_what_happened() {
        let up = "db:5432 (127.0.0.1:5432)";
        assert!(refusal(&Answer::Tls, up).is_none());
        let f = refusal(&Answer::NoTls, up).unwrap();
        assert_eq!(f.class, Class::Protocol);
        assert!(
            f.message
                .starts_with("the server does not offer TLS: db:5432")
        );
        let f = refusal(&Answer::Injected(3), up).unwrap();
        assert!(
            f.message
                .starts_with("the server sent 3 bytes of unencrypted data")
        );
    }
}
