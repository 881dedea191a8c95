//! JSON log lines formatted by our own code, in one pass into the caller's buffer, for lines
//! too frequent for tracing's JSON formatter (the request line of `--access-log request`:
//! about 45k instructions a line there, which serializes every span's fields anew from a
//! string it parses back).
//!
//! A line written here reads like tracing's (`--log-format json`, events flattened): the same
//! `timestamp` (RFC 3339 UTC, microseconds), `level` and `message` first, then the caller's
//! fields, then the current span (`span`) and every span from the root (`spans`), each with
//! its fields and `name`, taken from what tracing's JSON layer already stored for the span.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::Registry;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::registry::LookupSpan;

/// A JSON object's braces (named, so that no brace in a literal upsets a brace count).
const OPEN: char = '{';
const CLOSE: char = '}';

/// Start a line: `{"timestamp":…,"level":…,"message":…` (no closing brace).
pub fn start(out: &mut String, level: &str, message: &str) {
    out.push(OPEN);
    out.push_str("\"timestamp\":\"");
    timestamp(out, SystemTime::now());
    out.push_str("\",\"level\":");
    string(out, level);
    out.push_str(",\"message\":");
    string(out, message);
}

/// A string field: `,"key":"value"`, the value escaped for JSON.
pub fn str_field(out: &mut String, key: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":");
    string(out, value);
}

/// A number field: `,"key":value`; `value` must display as a JSON number.
pub fn num_field(out: &mut String, key: &str, value: impl std::fmt::Display) {
    // Writing into a String cannot fail.
    let _ = write!(out, ",\"{key}\":{value}");
}

/// End the line: the current span and the span list (when there is a current span and the
/// subscriber is tracing's registry with JSON fields), `}` and a newline.
pub fn end(out: &mut String) {
    spans(out);
    out.push(CLOSE);
    out.push('\n');
}

/// `,"span":{…},"spans":[…]` for the current span, as tracing's JSON formatter writes them.
fn spans(out: &mut String) {
    let current = tracing::Span::current();
    let Some(id) = current.id() else {
        return;
    };
    tracing::dispatcher::get_default(|d| {
        let Some(registry) = d.downcast_ref::<Registry>() else {
            return;
        };
        let Some(leaf) = registry.span(&id) else {
            return;
        };
        out.push_str(",\"span\":");
        span_object(out, leaf.name(), &leaf.extensions());
        out.push_str(",\"spans\":[");
        for (i, span) in leaf.scope().from_root().enumerate() {
            if i > 0 {
                out.push(',');
            }
            span_object(out, span.name(), &span.extensions());
        }
        out.push(']');
    });
}

/// One span: its stored fields (a JSON object already) with `"name"` added at the end.
fn span_object(out: &mut String, name: &str, ext: &tracing_subscriber::registry::Extensions<'_>) {
    let fields = ext
        .get::<FormattedFields<JsonFields>>()
        .map(|f| f.fields.as_str())
        .unwrap_or("");
    match fields
        .strip_prefix(OPEN)
        .and_then(|f| f.strip_suffix(CLOSE))
    {
        Some(inner) if !inner.trim().is_empty() => {
            out.push(OPEN);
            out.push_str(inner);
            out.push(',');
        }
        _ => out.push(OPEN),
    }
    out.push_str("\"name\":");
    string(out, name);
    out.push(CLOSE);
}

/// `t` as tracing writes it: `2026-12-03T05:19:50.232434Z` (UTC, microseconds).
fn timestamp(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil(secs / 86_400);
    let s = secs % 86_400;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    );
}

/// Year, month, day of a day number since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// `s` as a JSON string: quotes around, `"` and `\` escaped, control characters as `\u00XX`.
/// (Network strings reach here escaped already, bidirectional overrides included; this
/// only makes the text valid JSON.)
pub fn string(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    while let Some(i) = rest
        .bytes()
        .position(|b| b == b'"' || b == b'\\' || b < 0x20)
    {
        out.push_str(&rest[..i]);
        match rest.as_bytes()[i] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    fn json(s: &str) -> String {
        let mut out = String::new();
        super::string(&mut out, s);
        out
    }

    #[test]
    fn strings_are_valid_json() {
        for s in ["plain", "q\"b\\s\u{1}\n\t\u{1f}é\u{202e}", "", "\\u{202e}"] {
            let out = json(s);
            let back: String = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(back, s);
        }
        assert_eq!(json("a\"b\u{7}"), r#""a\"b\u0007""#);
    }

    #[test]
    fn timestamps_match_tracing() {
        for secs in [0u64, 951_782_400, 1_796_275_190, 4_107_542_400] {
            let t = UNIX_EPOCH + Duration::new(secs, 232_434_999);
            let mut ours = String::new();
            super::timestamp(&mut ours, t);
            let dt = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
            let want = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.232434Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            );
            assert_eq!(ours, want);
        }
    }
}
