//! Hop-by-hop header removal (RFC 9110 7.6.1), done in one pass over the names a message
//! carries: most requests and responses carry none of them, and then nothing is looked up or
//! removed (17 `HeaderMap::remove` calls per keep-alive request before).

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `Keep-Alive` (not among `http`'s constants).
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`, the pre-standard spelling some clients still send.
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Bit of `Connection` in the mask [`present`] returns.
const CONNECTION: u8 = 1;
/// Bit of `Upgrade`.
const UPGRADE: u8 = 1 << 1;
/// Bit of `TE`.
const TE: u8 = 1 << 2;
/// Bits of the names removed whatever `keep_upgrade` says.
const ALWAYS: [(u8, &HeaderName); 5] = [
    (1 << 3, &header::TRANSFER_ENCODING),
    (1 << 4, &header::PROXY_AUTHORIZATION),
    (1 << 5, &header::PROXY_AUTHENTICATE),
    (1 << 6, &KEEP_ALIVE),
    (1 << 7, &PROXY_CONNECTION),
];

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus those the
/// `Connection` header names. `keep_upgrade` keeps `Connection` and `Upgrade` (and an
/// `upgrade` listed in `Connection`) on a 101 answer. A `TE` that accepts `trailers` is
/// forwarded as `TE: trailers` alone, unless `Connection` names `TE`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let found = present(headers);
    let relevant = if keep_upgrade { !UPGRADE } else { u8::MAX };
    if found & relevant == 0 {
        return;
    }
    if found & CONNECTION != 0 {
        for n in connection_names(headers, keep_upgrade) {
            headers.remove(n);
        }
    }
    // Read after the `Connection` names went: a `TE` listed there is not kept.
    let te_trailers = found & TE != 0 && te_accepts_trailers(headers);
    if found & TE != 0 {
        headers.remove(header::TE);
    }
    for (bit, name) in ALWAYS {
        if found & bit != 0 {
            headers.remove(name);
        }
    }
    if !keep_upgrade {
        if found & CONNECTION != 0 {
            headers.remove(header::CONNECTION);
        }
        if found & UPGRADE != 0 {
            headers.remove(header::UPGRADE);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The names the `Connection` header lists (`upgrade` left out when `keep_upgrade`).
fn connection_names(headers: &HeaderMap, keep_upgrade: bool) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect()
}

/// Whether the `TE` header accepts `trailers`.
fn te_accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// The hop-by-hop names `headers` carries, as a mask of the bits above: one walk over its
/// distinct names, no hashing.
fn present(headers: &HeaderMap) -> u8 {
    let mut found = 0;
    for name in headers.keys() {
        found |= if name == header::CONNECTION {
            CONNECTION
        } else if name == header::UPGRADE {
            UPGRADE
        } else if name == header::TE {
            TE
        } else {
            ALWAYS
                .iter()
                .find(|(_, n)| *n == name)
                .map_or(0, |(bit, _)| *bit)
        };
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The implementation before the one-pass version (every name removed unconditionally),
    /// kept as the reference; it parses `Connection` and `TE` with the same helpers.
    fn reference(headers: &mut HeaderMap, keep_upgrade: bool) {
        for n in connection_names(headers, keep_upgrade) {
            headers.remove(n);
        }
        let te_trailers = te_accepts_trailers(headers);
        for n in [
            header::TE,
            header::TRANSFER_ENCODING,
            header::PROXY_AUTHORIZATION,
            header::PROXY_AUTHENTICATE,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
        ] {
            headers.remove(n);
        }
        if !keep_upgrade {
            headers.remove(header::CONNECTION);
            headers.remove(header::UPGRADE);
        }
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }

    fn map(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    /// Every combination of the candidate headers (each absent or present), both modes: the
    /// result equals the reference's, values and order included.
    #[test]
    fn same_as_reference_for_every_combination() {
        let candidates: [(&str, &[u8]); 14] = [
            ("connection", b"keep-alive, X-Secret, te"),
            ("connection", b"Upgrade"),
            ("connection", b"close, , \xff, connection, bad name"),
            ("upgrade", b"websocket"),
            ("te", b"gzip, Trailers"),
            ("te", b"trailers"),
            ("transfer-encoding", b"chunked"),
            ("proxy-authorization", b"Basic x"),
            ("proxy-authenticate", b"Basic"),
            ("keep-alive", b"timeout=5"),
            ("proxy-connection", b"keep-alive"),
            ("x-secret", b"s"),
            ("host", b"h"),
            ("x-other", b"o"),
        ];
        for mask in 0u32..(1 << candidates.len()) {
            let pairs: Vec<_> = candidates
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, p)| *p)
                .collect();
            for keep_upgrade in [false, true] {
                let mut ours = map(&pairs);
                let mut theirs = ours.clone();
                strip_hop_by_hop(&mut ours, keep_upgrade);
                reference(&mut theirs, keep_upgrade);
                assert_eq!(ours, theirs, "mask {mask:#x} keep_upgrade {keep_upgrade}");
                let order = |h: &HeaderMap| {
                    h.iter()
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect::<Vec<_>>()
                };
                assert_eq!(order(&ours), order(&theirs), "mask {mask:#x}");
            }
        }
    }

    #[test]
    fn nothing_to_strip_leaves_the_map_alone() {
        let mut h = map(&[("host", b"h"), ("accept", b"*/*"), ("x-a", b"1")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }
}
