//! Checks of the proxy's own error answers (502, 504, 431, ...).

use super::*;

/// Checks an answer the proxy made itself: `status`, `text/plain`, one line starting
/// `mtls-sidecar:` followed by the reason key `key` and some explanation.
pub fn assert_sidecar_error(
    status: u16,
    content_type: Option<&str>,
    body: &str,
    want: u16,
    key: &str,
) {
    let what = format!("status {status}, content-type {content_type:?}, body {body:?}");
    assert_eq!(status, want, "the proxy's answer: {what}");
    assert!(
        content_type.is_some_and(|ct| ct.starts_with("text/plain")),
        "the proxy's {want} is not text/plain: {what}"
    );
    let line = body.strip_suffix('\n').unwrap_or(body);
    let line = line.strip_suffix('\r').unwrap_or(line);
    assert!(
        !line.contains('\n') && !line.is_empty(),
        "the proxy's {want} body is not one line: {what}"
    );
    let rest = line
        .strip_prefix("mtls-sidecar:")
        .unwrap_or_else(|| panic!("the proxy's {want} body does not start `mtls-sidecar:`: {what}"))
        .trim_start();
    let reason: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    assert_eq!(reason, key, "the reason key after `mtls-sidecar:`: {what}");
    let sentence = &rest[reason.len()..];
    assert!(
        sentence.chars().filter(|c| c.is_alphabetic()).count() >= 5,
        "no explanation after the reason key: {what}"
    );
}

pub fn assert_reply_is_sidecar_error(reply: &Reply, want: u16, key: &str) {
    assert_sidecar_error(
        reply.status.as_u16(),
        reply.header("content-type"),
        &reply.text(),
        want,
        key,
    );
}
