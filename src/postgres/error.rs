//! The `ErrorResponse` an app is given when its connection cannot be served, so that `psql`
//! prints a sentence instead of "server closed the connection unexpectedly".

/// The most bytes of message text an `ErrorResponse` carries.
pub const MAX_MESSAGE: usize = 1024;

/// SQLSTATE `08001`, sqlclient_unable_to_establish_sqlconnection: what libpq itself reports
/// when it cannot connect.
pub const SQLSTATE: &str = "08001";

/// An `ErrorResponse`: `E`, int32 length, fields `S` and `V` `FATAL`, `C` [`SQLSTATE`], `M`
/// `mtls-sidecar: ` and `message` (NUL bytes replaced by spaces, cut at [`MAX_MESSAGE`] bytes
/// on a character boundary), then the terminating NUL.
pub fn error_response(message: &str) -> Vec<u8> {
    let mut text = format!("mtls-sidecar: {}", message.replace('\0', " "));
    if text.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    let mut body = Vec::with_capacity(text.len() + 32);
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', SQLSTATE),
        (b'M', text.as_str()),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    // At most MAX_MESSAGE plus a few dozen bytes: always fits.
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of an `ErrorResponse`, checking its framing.
    fn fields(msg: &[u8]) -> Vec<(u8, String)> {
        assert_eq!(msg[0], b'E');
        let len = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, msg.len());
        assert_eq!(*msg.last().unwrap(), 0);
        let body = &msg[5..msg.len() - 1];
        body.split_inclusive(|b| *b == 0)
            .map(|f| {
                assert_eq!(*f.last().unwrap(), 0);
                (f[0], String::from_utf8(f[1..f.len() - 1].to_vec()).unwrap())
            })
            .collect()
    }

    #[test]
    fn fields_and_framing() {
        let f = fields(&error_response("the server does not offer TLS"));
        assert_eq!(
            f,
            vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (b'C', "08001".into()),
                (b'M', "mtls-sidecar: the server does not offer TLS".into()),
            ]
        );
    }

    #[test]
    fn nul_is_replaced_and_length_bounded() {
        let f = fields(&error_response("a\0b"));
        assert_eq!(f[3].1, "mtls-sidecar: a b");
        let f = fields(&error_response(&"é".repeat(5000)));
        assert!(f[3].1.len() <= MAX_MESSAGE);
        assert!(f[3].1.len() > MAX_MESSAGE - 2);
    }
}
