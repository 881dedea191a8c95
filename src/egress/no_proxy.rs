//! `--no-proxy`: which upstreams bypass the proxy.

use std::net::IpAddr;

use super::Error;

/// `--no-proxy`: hosts, domains and CIDRs that bypass the proxy, matched as curl does: `*`
/// matches everything; a name matches itself and every name below it (`example.com` and
/// `.example.com` both match `example.com` and `a.example.com`, never `notexample.com`),
/// case-insensitively; addresses and CIDRs match an upstream written as an IP address (names
/// are never resolved to decide).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<(String, Entry)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Any,
    Name(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    /// Parse a comma-separated list. `Err` names the first entry that cannot be a CIDR.
    pub fn parse(list: &str) -> Result<Self, Error> {
        let mut entries = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let entry =
                if raw == "*" {
                    Entry::Any
                } else if let Some((addr, bits)) = raw.split_once('/') {
                    let addr: IpAddr = unbracket(addr)
                        .parse()
                        .map_err(|_| Error::NotCidr(raw.to_string()))?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let bits: u8 = bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| {
                        Error::PrefixLength {
                            entry: raw.to_string(),
                            max,
                        }
                    })?;
                    Entry::Net(addr, bits)
                } else if let Ok(ip) = unbracket(raw).parse::<IpAddr>() {
                    Entry::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
                } else {
                    let name = raw.trim_start_matches('.').trim_end_matches('.');
                    Entry::Name(name.to_ascii_lowercase())
                };
            entries.push((raw.to_string(), entry));
        }
        Ok(NoProxy { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry (as written) that makes `host` bypass the proxy, if any.
    pub fn matching(&self, host: &str) -> Option<&str> {
        let host = unbracket(host).trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        self.entries
            .iter()
            .find(|(_, e)| match (e, ip) {
                (Entry::Any, _) => true,
                (Entry::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
                (Entry::Name(name), None) => {
                    host == *name
                        || (host.len() > name.len()
                            && host.ends_with(name.as_str())
                            && host.as_bytes()[host.len() - name.len() - 1] == b'.')
                }
                // An IP written as text also matches the same text in the list (curl).
                (Entry::Name(name), Some(_)) => host == *name,
                (Entry::Net(..), None) => false,
            })
            .map(|(raw, _)| raw.as_str())
    }
}

fn unbracket(s: &str) -> &str {
    s.strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s)
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (ip, net, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    let mask = if shift >= 128 {
        0
    } else {
        (u128::MAX << shift) & (u128::MAX >> (128 - width))
    };
    ip & mask == net & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_like_curl() {
        let np =
            NoProxy::parse(" example.com, .internal.corp ,10.0.0.0/8, ::1, fd00::/8,LOCALHOST")
                .unwrap();
        let m = |h| np.matching(h);
        assert_eq!(m("example.com"), Some("example.com"));
        assert_eq!(m("API.Example.com."), Some("example.com"));
        assert_eq!(m("notexample.com"), None);
        assert_eq!(m("example.com.evil"), None);
        assert_eq!(m("internal.corp"), Some(".internal.corp"));
        assert_eq!(m("db.internal.corp"), Some(".internal.corp"));
        assert_eq!(m("10.20.30.40"), Some("10.0.0.0/8"));
        assert_eq!(m("11.0.0.1"), None);
        assert_eq!(m("::1"), Some("::1"));
        assert_eq!(m("[::1]"), Some("::1"));
        assert_eq!(m("fd12::5"), Some("fd00::/8"));
        assert_eq!(m("fe80::1"), None);
        assert_eq!(m("localhost"), Some("LOCALHOST"));
        // Names are never resolved: 127.0.0.1 is not "localhost".
        assert_eq!(m("127.0.0.1"), None);
        assert_eq!(NoProxy::parse("*").unwrap().matching("x.y"), Some("*"));
        assert_eq!(
            NoProxy::parse("0.0.0.0/0").unwrap().matching("1.2.3.4"),
            Some("0.0.0.0/0")
        );
        assert_eq!(
            NoProxy::parse("127.0.0.1").unwrap().matching("127.0.0.2"),
            None
        );
        assert!(NoProxy::parse("10.0.0.0/33").is_err());
        assert!(NoProxy::parse("nothing/8").is_err());
        assert!(NoProxy::parse(" , ").unwrap().is_empty());
    }
}
