//! `--proxy` / `HTTPS_PROXY` URLs taken apart, credentials kept out of what is shown.

use rustls::pki_types::ServerName;

use super::Error;

/// `http://` (plain TCP to the proxy) or `https://` (TLS to the proxy itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A proxy URL taken apart. `user:pass` stays out of `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Whether the hop to the proxy itself is TLS.
    pub scheme: Scheme,
    /// Where to connect, and the name an `https://` proxy's certificate must hold. Without
    /// brackets for IPv6.
    pub host: String,
    /// Where to connect (80 or 443 when the URL names none).
    pub port: u16,
    /// Percent-decoded `user:pass` from the URL.
    pub(super) credentials: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

impl std::fmt::Display for ProxyUrl {
    /// The URL without credentials: safe for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl ProxyUrl {
    /// `http://[user:pass@]HOST[:PORT][/]` or `https://…`; a URL without a scheme is `http://`
    /// (as curl and most `HTTPS_PROXY` users write it). Default ports: 80 and 443.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let value = value.trim();
        let (scheme, rest) = match value.split_once("://") {
            Some((s, rest)) => match s.to_ascii_lowercase().as_str() {
                "http" => (Scheme::Http, rest),
                "https" => (Scheme::Https, rest),
                // Named only when it looks like a scheme: text before a misplaced `://` may be
                // credentials (`http:/user:secret@proxy://…`, found by fuzzing).
                other if is_scheme(other) => {
                    return Err(Error::UnsupportedScheme(other.to_string()));
                }
                _ => {
                    return Err(Error::NotAProxyUrl);
                }
            },
            None => (Scheme::Http, value),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(Error::PathInUrl);
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let decoded = percent_decode(userinfo)?;
                if !decoded.contains(':') {
                    return Err(Error::CredentialsWithoutColon);
                }
                (Some(decoded), hostport)
            }
            None => (None, rest),
        };
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
            let (host, tail) = after.split_once(']').ok_or(Error::UnclosedBracket)?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|_| Error::NotIpv6(host.to_string()))?;
            let port = match tail {
                "" => default_port,
                t => parse_port(t.strip_prefix(':').ok_or(Error::PortAfterBracket)?)?,
            };
            (host.to_string(), port)
        } else {
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), parse_port(p)?),
                None => (hostport.to_string(), default_port),
            };
            // Only a bracketed host may hold a colon: `http://a:b:80` is not a host `a:b`.
            if host.contains(':') {
                return Err(Error::UnbracketedIpv6);
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(Error::NoHost);
        }
        if !host.contains(':') && ServerName::try_from(host.as_str()).is_err() {
            return Err(Error::BadHostName(host));
        }
        Ok(ProxyUrl {
            scheme,
            host,
            port,
            credentials,
        })
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }
}

/// An RFC 3986 scheme of a sane length: a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    s.len() <= 16
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
}

fn parse_port(p: &str) -> Result<u16, Error> {
    match p.parse::<u16>() {
        // Quoted only when it is digits: in `http://user:password` (the `@HOST` forgotten)
        // the "port" is the password.
        Ok(0) | Err(_) if p.bytes().all(|b| b.is_ascii_digit()) => {
            Err(Error::BadPort(p.to_string()))
        }
        Ok(0) | Err(_) => Err(Error::NotAPort),
        Ok(n) => Ok(n),
    }
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(Error::BadEscape)?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::CredentialsNotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `proxy_url` fuzz target: the text before a misplaced `://` was echoed as
    /// the scheme, credentials included.
    #[test]
    fn a_misplaced_scheme_separator_never_echoes_credentials() {
        for url in [
            "http:/user:secret@proxy.example://",
            "htp:\u{10}\0//pr!secret@@@@\0ttp://x",
        ] {
            let err = ProxyUrl::parse(url).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{err}");
        }
        let err = ProxyUrl::parse("socks5://proxy:1080")
            .unwrap_err()
            .to_string();
        assert!(err.contains("socks5://"), "{err}");
    }

    #[test]
    fn proxy_urls() {
        let u = ProxyUrl::parse("http://alice:p%40ss@proxy.corp:3128").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Http, "proxy.corp", 3128)
        );
        assert_eq!(u.credentials.as_deref(), Some("alice:p@ss"));
        assert_eq!(u.to_string(), "http://proxy.corp:3128");
        assert!(!format!("{u:?}").contains("p@ss"));
        let u = ProxyUrl::parse("proxy.corp:8080").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Http, 8080));
        let u = ProxyUrl::parse("https://proxy.corp/").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Https, 443));
        let u = ProxyUrl::parse("http://[::1]:3128").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3128));
        assert_eq!(u.to_string(), "http://[::1]:3128");
        for bad in [
            "socks5://h:1080",
            "http://h:0",
            "http://h:x",
            "http://:3128",
            "http://h:1/path",
            "http://user@h:1",
            "http://[::1:1",
            "http://a%zz:b@h:1",
        ] {
            assert!(ProxyUrl::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    /// The texts `egress::Error` replaced, word for word (they reach startup errors).
    #[test]
    fn messages_read_as_before() {
        let cases = [
            (
                "socks5://h:1080",
                "unsupported proxy scheme socks5://: only http:// and https:// (HTTP CONNECT) \
                 proxies are supported",
            ),
            (
                "a%b://h",
                "not a proxy URL: only http://[user:pass@]HOST[:PORT] and https://… (HTTP \
                 CONNECT) proxies are supported",
            ),
            ("http://h:1/p", "a proxy URL has no path, query or fragment"),
            (
                "http://u@h",
                "credentials in a proxy URL are written user:password@",
            ),
            (
                "http://[::1",
                "an IPv6 proxy address needs its closing bracket",
            ),
            ("http://[zz]", "\"zz\" is not an IPv6 address"),
            ("http://[::1]x", "expected :PORT after ]"),
            (
                "http://a:b:80",
                "an IPv6 proxy address is written in brackets: http://[::1]:3128",
            ),
            ("http://:80", "the proxy URL has no host"),
            ("http://a_b c", "\"a_b c\" is not a valid host name"),
            ("http://h:0", "\"0\" is not a port number (1-65535)"),
            (
                "http://user:secret",
                "what follows the last ':' is not a port number (1-65535); credentials are \
                 written user:password@HOST",
            ),
            ("http://a%zz:b@h", "a bad %-escape in the proxy credentials"),
            ("http://a%ff:b@h", "the proxy credentials are not UTF-8"),
        ];
        for (url, message) in cases {
            assert_eq!(
                ProxyUrl::parse(url).unwrap_err().to_string(),
                message,
                "{url}"
            );
        }
    }
}
