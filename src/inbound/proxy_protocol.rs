//! The PROXY protocol header an inbound tcp-mode route sends to its target before the client's
//! bytes (`--proxy-protocol v1|v2`), built to HAProxy's `doc/proxy-protocol.txt`.
//!
//! - v1: one text line, `PROXY TCP4|TCP6 <client ip> <local ip> <client port> <local port>\r\n`;
//!   `PROXY UNKNOWN\r\n` when the two addresses are of different families (v1 has no way to
//!   write them).
//! - v2: the binary header (signature, `PROXY` command, `TCP over IPv4|IPv6`, addresses, ports)
//!   and, given `TlsFacts`, one `PP2_TYPE_SSL` TLV: the `client` bits, `verify`, and the
//!   `PP2_SUBTYPE_SSL_VERSION`, `_CN` and `_CIPHER` sub-TLVs. Mixed families are written as
//!   IPv6 with the IPv4 address mapped (`::ffff:a.b.c.d`), as HAProxy does.
//!
//! Both first turn an IPv4-mapped IPv6 address (what a dual-stack `[::]` listener reports for an
//! IPv4 client) back into IPv4, so such a client reaches the app as `TCP4`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 (high nibble), command `PROXY` (low nibble).
const V2_PROXY: u8 = 0x21;
/// `AF_INET` (high nibble), `STREAM` (low nibble).
const V2_TCP4: u8 = 0x11;
/// `AF_INET6` (high nibble), `STREAM` (low nibble).
const V2_TCP6: u8 = 0x21;

const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CN: u8 = 0x22;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `client` bit: the client connected over SSL/TLS.
const PP2_CLIENT_SSL: u8 = 0x01;
/// `client` bit: the client sent a certificate on this connection.
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// `client` bit: the client sent a certificate in this TLS session (this one or a resumed one).
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// What the v2 `PP2_TYPE_SSL` TLV says about the client's TLS connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFacts {
    /// `PP2_SUBTYPE_SSL_VERSION`, in OpenSSL's spelling: `TLSv1.2`, `TLSv1.3`.
    pub version: String,
    /// `PP2_SUBTYPE_SSL_CIPHER`, in OpenSSL's spelling (`TLS_AES_128_GCM_SHA256`,
    /// `ECDHE-RSA-AES128-GCM-SHA256`), which is what HAProxy sends and its readers compare with.
    pub cipher: String,
    /// `PP2_SUBTYPE_SSL_CN`: the first common name of the client leaf's subject; no sub-TLV
    /// when the subject has none.
    pub cn: Option<String>,
    /// The client presented a certificate and it was verified: sets `PP2_CLIENT_CERT_SESS` and
    /// `verify = 0` (else `verify = 1`).
    pub cert_verified: bool,
    /// The session was resumed, so the certificate was verified on an earlier connection:
    /// `PP2_CLIENT_CERT_CONN` is set only when this is false.
    pub resumed: bool,
}

impl TlsFacts {
    /// The facts of a finished server-side handshake (pass the `ServerConnection`, which derefs
    /// to `CommonState`). A certificate is reported verified when the handshake completed with
    /// one: an inbound route's verifier refuses every client without a good one.
    pub fn of(tls: &rustls::CommonState) -> TlsFacts {
        let leaf = tls.peer_certificates().and_then(|chain| chain.first());
        TlsFacts {
            version: version_name(tls.protocol_version()),
            cipher: tls
                .negotiated_cipher_suite()
                .map(|s| cipher_name(s.suite()))
                .unwrap_or_default(),
            cn: leaf.and_then(|der| common_name(der)),
            cert_verified: leaf.is_some(),
            resumed: tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

/// The v1 line for a connection from `client` accepted on `local`.
pub fn v1(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (c, l) = (client.ip().to_canonical(), local.ip().to_canonical());
    let proto = match (c, l) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    let (cp, lp) = (client.port(), local.port());
    format!("PROXY {proto} {c} {l} {cp} {lp}\r\n").into_bytes()
}

/// The v2 header for a connection from `client` accepted on `local`, with the SSL TLV when
/// `tls` is given.
pub fn v2(client: SocketAddr, local: SocketAddr, tls: Option<&TlsFacts>) -> Vec<u8> {
    let (c, l) = (client.ip().to_canonical(), local.ip().to_canonical());
    let mut body = Vec::with_capacity(36 + 64);
    let family = match (c, l) {
        (IpAddr::V4(c4), IpAddr::V4(l4)) => {
            body.extend_from_slice(&c4.octets());
            body.extend_from_slice(&l4.octets());
            V2_TCP4
        }
        _ => {
            body.extend_from_slice(&as_v6(c).octets());
            body.extend_from_slice(&as_v6(l).octets());
            V2_TCP6
        }
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&local.port().to_be_bytes());
    if let Some(facts) = tls {
        ssl_tlv(&mut body, facts);
    }
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_PROXY);
    out.push(family);
    // The SSL TLV is capped below, so the body always fits the 16-bit length.
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Longest sub-TLV value written; a longer one (only a hostile certificate has a CN this long)
/// is left out rather than cut, so the header stays far below its 64 KiB limit.
const MAX_SUB_VALUE: usize = 1024;

/// Appends the `PP2_TYPE_SSL` TLV: type, 16-bit length, `client`, 32-bit `verify`, sub-TLVs.
fn ssl_tlv(out: &mut Vec<u8>, facts: &TlsFacts) {
    let mut client = PP2_CLIENT_SSL;
    if facts.cert_verified {
        client |= PP2_CLIENT_CERT_SESS;
        if !facts.resumed {
            client |= PP2_CLIENT_CERT_CONN;
        }
    }
    let verify: u32 = if facts.cert_verified { 0 } else { 1 };
    let mut value = vec![client];
    value.extend_from_slice(&verify.to_be_bytes());
    sub_tlv(
        &mut value,
        PP2_SUBTYPE_SSL_VERSION,
        facts.version.as_bytes(),
    );
    if let Some(cn) = &facts.cn {
        sub_tlv(&mut value, PP2_SUBTYPE_SSL_CN, cn.as_bytes());
    }
    sub_tlv(&mut value, PP2_SUBTYPE_SSL_CIPHER, facts.cipher.as_bytes());
    out.push(PP2_TYPE_SSL);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
}

/// Appends one sub-TLV; empty or over-long values are left out.
fn sub_tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    if value.is_empty() || value.len() > MAX_SUB_VALUE {
        return;
    }
    out.push(kind);
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// OpenSSL's name of a protocol version (`SSL_get_version`).
fn version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// OpenSSL's name of a cipher suite (`SSL_CIPHER_get_name`) for every suite rustls offers;
/// the IANA name otherwise.
fn cipher_name(suite: rustls::CipherSuite) -> String {
    use rustls::CipherSuite as S;
    let name = match suite {
        S::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        S::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        S::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        other => return format!("{other:?}"),
    };
    name.to_owned()
}

/// The first common name of the leaf's subject, as HAProxy's `ssl-cn` option sends it.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn facts(cn: Option<&str>) -> TlsFacts {
        TlsFacts {
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_128_GCM_SHA256".into(),
            cn: cn.map(str::to_owned),
            cert_verified: true,
            resumed: false,
        }
    }

    #[test]
    fn v1_ipv4() {
        let line = v1(addr("192.0.2.10:51234"), addr("10.0.0.5:8443"));
        assert_eq!(line, b"PROXY TCP4 192.0.2.10 10.0.0.5 51234 8443\r\n");
    }

    #[test]
    fn v1_ipv6() {
        let line = v1(addr("[2001:db8::1]:40000"), addr("[::1]:443"));
        assert_eq!(line, b"PROXY TCP6 2001:db8::1 ::1 40000 443\r\n");
    }

    #[test]
    fn v1_mapped_ipv4_is_tcp4() {
        let line = v1(addr("[::ffff:192.0.2.10]:1"), addr("[::ffff:10.0.0.5]:2"));
        assert_eq!(line, b"PROXY TCP4 192.0.2.10 10.0.0.5 1 2\r\n");
    }

    #[test]
    fn v1_mixed_families_are_unknown() {
        assert_eq!(
            v1(addr("192.0.2.10:1"), addr("[2001:db8::2]:2")),
            b"PROXY UNKNOWN\r\n"
        );
        assert_eq!(
            v1(addr("[2001:db8::2]:2"), addr("192.0.2.10:1")),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v1_longest_line_fits_the_spec_limit() {
        let full = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let line = v1(addr(full), addr(full));
        assert!(line.len() <= 107, "{} bytes", line.len());
    }

    const SIG: [u8; 12] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
    ];

    #[test]
    fn v2_ipv4_without_tls() {
        let h = v2(addr("192.0.2.10:51234"), addr("10.0.0.5:8443"), None);
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]);
        want.extend_from_slice(&[192, 0, 2, 10, 10, 0, 0, 5]);
        want.extend_from_slice(&[0xC8, 0x22, 0x20, 0xFB]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_without_tls() {
        let h = v2(addr("[2001:db8::1]:1"), addr("[::1]:443"), None);
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0x00, 0x01, 0x01, 0xBB]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_mixed_families_map_ipv4_into_ipv6() {
        let h = v2(addr("192.0.2.10:1"), addr("[::1]:2"), None);
        let mut want = SIG.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x02]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_mapped_ipv4_is_tcp4() {
        let h = v2(
            addr("[::ffff:192.0.2.10]:1"),
            addr("[::ffff:10.0.0.5]:2"),
            None,
        );
        assert_eq!(&h[12..16], &[0x21, 0x11, 0x00, 0x0C]);
        assert_eq!(&h[16..24], &[192, 0, 2, 10, 10, 0, 0, 5]);
    }

    #[test]
    fn v2_ipv4_with_ssl_tlv() {
        let h = v2(
            addr("127.0.0.1:40000"),
            addr("127.0.0.1:8443"),
            Some(&facts(Some("client-a"))),
        );
        let mut want = SIG.to_vec();
        // 12 address bytes + SSL TLV (3 + 5 + 10 + 11 + 25) = 66 = 0x42
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x42]);
        want.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1, 0x9C, 0x40, 0x20, 0xFB]);
        want.extend_from_slice(&[0x20, 0x00, 0x33]); // PP2_TYPE_SSL, 51 bytes
        want.extend_from_slice(&[0x07, 0, 0, 0, 0]); // SSL | CERT_CONN | CERT_SESS, verify 0
        want.extend_from_slice(&[0x21, 0x00, 0x07]);
        want.extend_from_slice(b"TLSv1.3");
        want.extend_from_slice(&[0x22, 0x00, 0x08]);
        want.extend_from_slice(b"client-a");
        want.extend_from_slice(&[0x23, 0x00, 0x16]);
        want.extend_from_slice(b"TLS_AES_128_GCM_SHA256");
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_with_ssl_tlv_resumed_without_cn() {
        let mut f = facts(None);
        f.resumed = true;
        f.version = "TLSv1.2".into();
        f.cipher = "ECDHE-RSA-AES128-GCM-SHA256".into();
        let h = v2(addr("[::1]:1"), addr("[::1]:2"), Some(&f));
        let mut want = SIG.to_vec();
        // 36 address bytes + SSL TLV (3 + 5 + 10 + 30) = 84 = 0x54
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x54]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        want.extend_from_slice(&[0, 1, 0, 2]);
        want.extend_from_slice(&[0x20, 0x00, 0x2D]);
        want.extend_from_slice(&[0x05, 0, 0, 0, 0]); // SSL | CERT_SESS: resumed
        want.extend_from_slice(&[0x21, 0x00, 0x07]);
        want.extend_from_slice(b"TLSv1.2");
        want.extend_from_slice(&[0x23, 0x00, 0x1B]);
        want.extend_from_slice(b"ECDHE-RSA-AES128-GCM-SHA256");
        assert_eq!(h, want);
    }

    #[test]
    fn v2_unverified_client_has_nonzero_verify() {
        let mut f = facts(None);
        f.cert_verified = false;
        let h = v2(addr("127.0.0.1:1"), addr("127.0.0.1:2"), Some(&f));
        let tlv = &h[28..];
        assert_eq!(tlv[0], 0x20);
        assert_eq!(&tlv[3..8], &[0x01, 0, 0, 0, 1]);
    }

    #[test]
    fn v2_overlong_cn_is_left_out() {
        let long = "a".repeat(70_000);
        let h = v2(
            addr("127.0.0.1:1"),
            addr("127.0.0.1:2"),
            Some(&facts(Some(&long))),
        );
        let len = u16::from_be_bytes([h[14], h[15]]) as usize;
        assert_eq!(h.len(), 16 + len);
        assert!(!h.windows(3).any(|w| w[0] == 0x22 && w[1] == 0x11));
        assert!(h.len() < 100);
    }

    #[test]
    fn cipher_names_are_openssl_names() {
        assert_eq!(
            cipher_name(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            "TLS_AES_256_GCM_SHA384"
        );
        assert_eq!(
            cipher_name(rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256),
            "ECDHE-ECDSA-CHACHA20-POLY1305"
        );
        assert_eq!(
            version_name(Some(rustls::ProtocolVersion::TLSv1_2)),
            "TLSv1.2"
        );
    }

    #[test]
    fn common_name_of_an_rcgen_leaf() {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "client-a");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("client-a"));
    }

    /// A real in-memory mTLS handshake, then `TlsFacts::of` on the server's side.
    #[test]
    fn facts_of_a_finished_handshake() {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = |names: Vec<String>, cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(names).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let cert = p.signed_by(&key, &issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            (vec![cert.der().clone()], key)
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let (server_chain, server_key) = leaf(vec!["localhost".into()], "server");
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_chain, server_key)
            .unwrap();
        let (client_chain, client_key) = leaf(vec!["client.example".into()], "client-a");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(client_chain, client_key)
            .unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
            if !s.is_handshaking() && !c.is_handshaking() {
                break;
            }
        }
        assert!(!s.is_handshaking());
        let facts = TlsFacts::of(&s);
        assert_eq!(facts.version, "TLSv1.3");
        assert!(facts.cipher.starts_with("TLS_AES_") || facts.cipher.starts_with("TLS_CHACHA20"));
        assert_eq!(facts.cn.as_deref(), Some("client-a"));
        assert!(facts.cert_verified);
        assert!(!facts.resumed);
    }
}
