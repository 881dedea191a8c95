//! HTTP/1.1 message framing checks for HTTP mode: which messages the proxy can forward without
//! guessing where their bodies end.
//!
//! hyper decodes `chunked` on both sides, so a body arrives as plain data; any other transfer
//! coding (`gzip, chunked`) would reach the far side with its label stripped, and an answer with
//! both `Transfer-Encoding` and `Content-Length` would go on with a `Content-Length` that no
//! longer describes its body. Both are refused, as nginx and Envoy do (RFC 9112 6.1 and 6.3: a
//! message with both is a request-smuggling vector; an intermediary must not pass it on as is).

use hyper::header::{self, HeaderMap};

/// Why a message cannot be forwarded as framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The app's request carries a transfer coding other than a single `chunked`.
    RequestCoding,
    /// The upstream's answer carries both `Transfer-Encoding` and `Content-Length`.
    ResponseBoth,
    /// The upstream's answer carries a transfer coding other than a single `chunked`.
    ResponseCoding,
}

impl Refusal {
    /// The sentence after `mtls-sidecar: <reason>:` in the proxy's own answer.
    pub fn sentence(self) -> &'static str {
        match self {
            Refusal::RequestCoding => {
                "the request uses a transfer coding other than chunked, which this proxy does \
                 not forward"
            }
            Refusal::ResponseBoth => {
                "the upstream answer has both Transfer-Encoding and Content-Length, so its \
                 length is ambiguous"
            }
            Refusal::ResponseCoding => {
                "the upstream answer uses a transfer coding other than chunked, which this \
                 proxy does not forward"
            }
        }
    }
}

/// True when every `Transfer-Encoding` field together names exactly one coding, `chunked`.
/// Absent is not "just chunked": callers check presence first.
fn just_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    matches!(
        (codings.next(), codings.next()),
        (Some(c), None) if c.eq_ignore_ascii_case(b"chunked")
    )
}

/// Check an app request's framing before it goes upstream.
pub fn check_request(headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.contains_key(header::TRANSFER_ENCODING) && !just_chunked(headers) {
        return Err(Refusal::RequestCoding);
    }
    Ok(())
}

/// Check an upstream answer's framing before it goes to the app.
pub fn check_response(headers: &HeaderMap) -> Result<(), Refusal> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Refusal::ResponseBoth);
    }
    if !just_chunked(headers) {
        return Err(Refusal::ResponseCoding);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn requests() {
        assert_eq!(check_request(&headers(&[])), Ok(()));
        assert_eq!(check_request(&headers(&[("content-length", "3")])), Ok(()));
        assert_eq!(
            check_request(&headers(&[("transfer-encoding", "Chunked")])),
            Ok(())
        );
        for bad in ["gzip, chunked", "chunked, chunked", "gzip", ","] {
            assert_eq!(
                check_request(&headers(&[("transfer-encoding", bad)])),
                Err(Refusal::RequestCoding),
                "{bad}"
            );
        }
        assert_eq!(
            check_request(&headers(&[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ])),
            Err(Refusal::RequestCoding)
        );
    }

    #[test]
    fn responses() {
        assert_eq!(check_response(&headers(&[("content-length", "5")])), Ok(()));
        assert_eq!(
            check_response(&headers(&[("transfer-encoding", "chunked")])),
            Ok(())
        );
        assert_eq!(
            check_response(&headers(&[
                ("transfer-encoding", "chunked"),
                ("content-length", "5")
            ])),
            Err(Refusal::ResponseBoth)
        );
        assert_eq!(
            check_response(&headers(&[("transfer-encoding", "gzip, chunked")])),
            Err(Refusal::ResponseCoding)
        );
    }
}
