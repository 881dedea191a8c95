//! `X-Forwarded-Client-Cert` in Envoy's format, and the other headers an inbound http-mode route
//! sets on every request it forwards (`strip_and_set`).
//!
//! Envoy (`forward_client_cert_details: SANITIZE_SET` with subject, URI and DNS) writes
//! `Hash=<hex>;Subject="<subject>";URI=<uri>;DNS=<dns>`: `Hash` is the lowercase hex SHA-256 of
//! the leaf's DER; `Subject` is always quoted and printed as OpenSSL's `X509_NAME_print_ex`
//! with `XN_FLAG_RFC2253` prints it (last RDN first, short attribute names, `,` between RDNs and
//! `+` inside one, `\` before `,+"\<>;`, a leading `#` or space and a trailing space, `\XX` for
//! control and non-ASCII bytes, `#<DER hex>` for attributes without a short name); one `URI=`
//! per URI SAN (a bare `URI=` when there is none, as Envoy does); one `DNS=` per DNS SAN (none
//! when there is none). A SAN value holding `,`, `;`, `=`, `"` or `\` is double-quoted with `"`
//! and `\` escaped by a backslash, as Envoy's documentation of the header asks, so a name can
//! never be read as another field.

use std::fmt::Write as _;
use std::net::IpAddr;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// `X-Forwarded-Client-Cert`.
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The header value for a verified client leaf; `None` if the certificate does not parse or a
/// SAN holds a byte a header value cannot carry (a control character).
pub fn header(leaf_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der).ok()?;
    let mut out = String::with_capacity(256);
    out.push_str("Hash=");
    for b in Sha256::digest(leaf_der) {
        let _ = write!(out, "{b:02x}");
    }
    out.push_str(";Subject=\"");
    out.push_str(&rfc2253(cert.subject()));
    out.push('"');
    let names: Vec<&GeneralName<'_>> = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext.value.general_names.iter().collect(),
        Ok(None) => Vec::new(),
        Err(_) => return None,
    };
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    if uris.is_empty() {
        out.push_str(";URI=");
    }
    for uri in uris {
        push_field(&mut out, "URI", uri)?;
    }
    for name in &names {
        if let GeneralName::DNSName(dns) = name {
            push_field(&mut out, "DNS", dns)?;
        }
    }
    Some(out)
}

/// Removes every `X-Forwarded-Client-Cert` the client sent and sets `xfcc` instead, sets
/// `X-Forwarded-Proto: https`, and appends `client_ip` to `X-Forwarded-For` (several
/// `X-Forwarded-For` lines from the client are joined into one, in order, first). A client on a
/// unix listener has no IP: `unix:` is appended instead, as nginx does, so the last hop is never
/// one the client wrote. An `xfcc` that is not a valid header value leaves the request without
/// the header, never with the client's.
pub fn strip_and_set(headers: &mut HeaderMap, xfcc: &str, client_ip: Option<IpAddr>) {
    strip_underscore_variants(headers);
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Ok(value) = HeaderValue::from_str(xfcc) {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    let mut chain: Vec<&[u8]> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(|v| trim(v.as_bytes()))
        .filter(|v| !v.is_empty())
        .collect();
    let ip = client_ip.map_or_else(|| "unix:".to_string(), |ip| ip.to_canonical().to_string());
    chain.push(ip.as_bytes());
    let joined = chain.join(&b", "[..]);
    // Every part came from a valid header value or is an IP address, so this cannot fail;
    // should it, the client's list is dropped and only our address is sent.
    let value = HeaderValue::from_bytes(&joined)
        .unwrap_or_else(|_| HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("")));
    headers.insert(X_FORWARDED_FOR.clone(), value);
}

/// Removes `X_Forwarded_Client_Cert` and the like: names that differ from our three headers
/// only by `_` for `-`. CGI, WSGI, Rack and PHP read both spellings as one variable
/// (`HTTP_X_FORWARDED_CLIENT_CERT`), so a client could forge the identity there; nginx drops
/// every underscore header by default, we drop only these.
fn strip_underscore_variants(headers: &mut HeaderMap) {
    let ours = [
        &X_FORWARDED_CLIENT_CERT,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_FOR,
    ];
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .filter(|n| {
            let dashed = n.as_str().replace('_', "-");
            ours.iter().any(|o| o.as_str() == dashed)
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(&name);
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// Appends `;KEY=value`, quoting the value when it holds a separator; `None` for a control byte.
fn push_field(out: &mut String, key: &str, value: &str) -> Option<()> {
    if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return None;
    }
    let _ = write!(out, ";{key}=");
    if value.contains([',', ';', '=', '"', '\\']) {
        out.push('"');
        for c in value.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(value);
    }
    Some(())
}

/// The subject as `X509_NAME_print_ex(.., XN_FLAG_RFC2253)` prints it.
fn rfc2253(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        let avas: Vec<_> = rdn.iter().collect();
        for (j, ava) in avas.iter().rev().enumerate() {
            if j > 0 {
                out.push('+');
            } else if i > 0 {
                out.push(',');
            }
            push_ava(&mut out, ava);
        }
    }
    out
}

/// `TYPE=value` for one attribute.
fn push_ava(out: &mut String, ava: &AttributeTypeAndValue<'_>) {
    let oid = ava.attr_type().to_id_string();
    let value = ava.attr_value();
    match short_name(&oid) {
        Some(sn) => {
            out.push_str(sn);
            out.push('=');
            match chars(value.header.tag().0, value.data) {
                Some(text) => escape_value(out, &text),
                None => dump(out, value),
            }
        }
        None => {
            out.push_str(&oid);
            out.push('=');
            dump(out, value);
        }
    }
}

/// The characters of a string value, decoded by its ASN.1 type as OpenSSL does (UTF8String as
/// bytes, the one-byte types as Latin-1, BMPString as UCS-2, UniversalString as UCS-4); `None`
/// for a type OpenSSL dumps as hex.
fn chars(tag: u32, data: &[u8]) -> Option<Vec<u8>> {
    let utf8 = |cs: &mut dyn Iterator<Item = u32>| -> Vec<u8> {
        let mut s = String::new();
        for c in cs {
            s.push(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER));
        }
        s.into_bytes()
    };
    match tag {
        12 => Some(data.to_vec()),
        18 | 19 | 20 | 22 | 23 | 24 | 26 => Some(utf8(&mut data.iter().map(|b| u32::from(*b)))),
        30 => Some(utf8(&mut data.chunks(2).map(|c| {
            u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))
        }))),
        28 => {
            Some(utf8(&mut data.chunks(4).map(|c| {
                c.iter().fold(0u32, |acc, b| acc << 8 | u32::from(*b))
            })))
        }
        _ => None,
    }
}

/// RFC 2253 escaping as OpenSSL's `ASN1_STRFLGS_RFC2253` does it, byte by byte.
fn escape_value(out: &mut String, bytes: &[u8]) {
    let last = bytes.len().saturating_sub(1);
    for (i, &b) in bytes.iter().enumerate() {
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i == last && b == b' ');
        if special {
            out.push('\\');
            out.push(b as char);
        } else if !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

/// `#` and the uppercase hex of the value's whole DER encoding (tag, length, content).
fn dump(out: &mut String, value: &x509_parser::der_parser::asn1_rs::Any<'_>) {
    let h = &value.header;
    let class = h.class() as u8;
    let mut der = Vec::with_capacity(value.data.len() + 8);
    let first = (class << 6) | if h.constructed() { 0x20 } else { 0 };
    let tag = h.tag().0;
    if tag < 31 {
        der.push(first | tag as u8);
    } else {
        der.push(first | 0x1f);
        let mut groups = Vec::new();
        let mut t = tag;
        loop {
            groups.push((t & 0x7f) as u8);
            t >>= 7;
            if t == 0 {
                break;
            }
        }
        for (k, g) in groups.iter().rev().enumerate() {
            der.push(if k + 1 < groups.len() { g | 0x80 } else { *g });
        }
    }
    let len = value.data.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        der.push(0x80 | bytes.len() as u8);
        der.extend_from_slice(&bytes);
    }
    der.extend_from_slice(value.data);
    out.push('#');
    for b in der {
        let _ = write!(out, "{b:02X}");
    }
}

/// OpenSSL's short name (`OBJ_nid2sn`) of the attribute types certificates carry.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.13" => "description",
        "2.5.4.15" => "businessCategory",
        "2.5.4.17" => "postalCode",
        "2.5.4.41" => "name",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.97" => "organizationIdentifier",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        "1.3.6.1.4.1.311.60.2.1.1" => "jurisdictionL",
        "1.3.6.1.4.1.311.60.2.1.2" => "jurisdictionST",
        "1.3.6.1.4.1.311.60.2.1.3" => "jurisdictionC",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair, SanType};

    fn leaf(dn: &[(DnType, DnValue)], sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in dn {
            params.distinguished_name.push(kind.clone(), value.clone());
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    fn hash(der: &[u8]) -> String {
        Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn several_sans_and_a_subject_with_a_comma_and_a_quote() {
        let der = leaf(
            &[
                (
                    DnType::CountryName,
                    DnValue::PrintableString("US".try_into().unwrap()),
                ),
                (DnType::OrganizationName, utf8("Example, Inc.")),
                (DnType::CommonName, utf8("Doe \"J\"")),
            ],
            vec![
                SanType::URI("spiffe://example.org/ns/shop/sa/web".try_into().unwrap()),
                SanType::DnsName("web.shop.svc".try_into().unwrap()),
                SanType::IpAddress("10.1.2.3".parse().unwrap()),
                SanType::URI("https://web.example.org/id".try_into().unwrap()),
                SanType::DnsName("web.example.org".try_into().unwrap()),
            ],
        );
        let want = format!(
            "Hash={};Subject=\"CN=Doe \\\"J\\\",O=Example\\, Inc.,C=US\";\
             URI=spiffe://example.org/ns/shop/sa/web;URI=https://web.example.org/id;\
             DNS=web.shop.svc;DNS=web.example.org",
            hash(&der)
        );
        assert_eq!(header(&der).unwrap(), want);
    }

    #[test]
    fn no_uri_san_gives_an_empty_uri_and_no_dns_none() {
        let der = leaf(&[(DnType::CommonName, utf8("only-cn"))], vec![]);
        let want = format!("Hash={};Subject=\"CN=only-cn\";URI=", hash(&der));
        assert_eq!(header(&der).unwrap(), want);
    }

    #[test]
    fn empty_subject_is_still_quoted() {
        let der = leaf(&[], vec![SanType::DnsName("a.example".try_into().unwrap())]);
        let want = format!("Hash={};Subject=\"\";URI=;DNS=a.example", hash(&der));
        assert_eq!(header(&der).unwrap(), want);
    }

    #[test]
    fn rfc2253_escapes_like_openssl() {
        let der = leaf(
            &[
                (DnType::OrganizationalUnitName, utf8(" lead#and trail ")),
                (DnType::CommonName, utf8("#a+b<c>d;e\\f=g\u{e9}\u{1}")),
            ],
            vec![],
        );
        let got = header(&der).unwrap();
        let subject = got.split(";Subject=").nth(1).unwrap();
        assert_eq!(
            subject,
            "\"CN=\\#a\\+b\\<c\\>d\\;e\\\\f=g\\C3\\A9\\01,OU=\\ lead#and trail\\ \";URI="
        );
    }

    #[test]
    fn bmp_and_teletex_strings_print_as_utf8_bytes() {
        let der = leaf(
            &[
                (
                    DnType::CommonName,
                    DnValue::BmpString("b\u{e9}\u{4e2d}".try_into().unwrap()),
                ),
                (
                    DnType::OrganizationName,
                    DnValue::TeletexString("t".try_into().unwrap()),
                ),
            ],
            vec![],
        );
        let got = header(&der).unwrap();
        assert!(
            got.contains(";Subject=\"O=t,CN=b\\C3\\A9\\E4\\B8\\AD\";"),
            "{got}"
        );
    }

    #[test]
    fn unknown_attribute_is_dumped_as_der_hex() {
        let der = leaf(
            &[
                (DnType::CustomDnType(vec![1, 2, 3, 4]), utf8("x")),
                (DnType::CommonName, utf8("c")),
            ],
            vec![],
        );
        let got = header(&der).unwrap();
        assert!(got.contains(";Subject=\"CN=c,1.2.3.4=#0C0178\";"), "{got}");
    }

    #[test]
    fn san_values_with_separators_are_quoted() {
        let der = leaf(
            &[(DnType::CommonName, utf8("c"))],
            vec![SanType::URI("urn:x;Hash=\"1\",y".try_into().unwrap())],
        );
        let got = header(&der).unwrap();
        assert!(got.ends_with(";URI=\"urn:x;Hash=\\\"1\\\",y\""), "{got}");
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(header(b"not a certificate"), None);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strip_and_set_replaces_a_forged_xfcc() {
        let mut h = map(&[
            ("x-forwarded-client-cert", "Hash=forged;URI=spiffe://admin"),
            ("X-Forwarded-Client-Cert", "By=x"),
            ("x-forwarded-proto", "http"),
            ("accept", "*/*"),
        ]);
        strip_and_set(
            &mut h,
            "Hash=ab;Subject=\"CN=c\";URI=",
            Some("192.0.2.7".parse().unwrap()),
        );
        let xfcc: Vec<_> = h.get_all(&X_FORWARDED_CLIENT_CERT).iter().collect();
        assert_eq!(xfcc, ["Hash=ab;Subject=\"CN=c\";URI="]);
        let proto: Vec<_> = h.get_all(&X_FORWARDED_PROTO).iter().collect();
        assert_eq!(proto, ["https"]);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "192.0.2.7");
        assert_eq!(h.get("accept").unwrap(), "*/*");
    }

    #[test]
    fn strip_and_set_appends_to_x_forwarded_for() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.1, 198.51.100.2"),
            ("x-forwarded-for", " 198.51.100.3 "),
        ]);
        strip_and_set(&mut h, "Hash=ab", Some("2001:db8::7".parse().unwrap()));
        let xff: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(
            xff,
            ["203.0.113.1, 198.51.100.2, 198.51.100.3, 2001:db8::7"]
        );
    }

    #[test]
    fn strip_and_set_writes_mapped_ipv4_as_ipv4() {
        let mut h = HeaderMap::new();
        strip_and_set(&mut h, "Hash=ab", Some("::ffff:192.0.2.9".parse().unwrap()));
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "192.0.2.9");
    }

    #[test]
    fn strip_and_set_without_an_ip_appends_unix() {
        let mut h = map(&[("x-forwarded-for", "192.0.2.1")]);
        strip_and_set(&mut h, "Hash=ab", None);
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "192.0.2.1, unix:");
    }

    #[test]
    fn strip_and_set_with_an_invalid_value_sends_no_xfcc() {
        let mut h = map(&[("x-forwarded-client-cert", "forged")]);
        strip_and_set(&mut h, "bad\nvalue", Some("127.0.0.1".parse().unwrap()));
        assert!(h.get(&X_FORWARDED_CLIENT_CERT).is_none());
    }
}
