//! The human-readable report of one route.

use std::fmt::Write as _;

use super::cert::Summary;
use super::report::{ClientCertificate, InboundReport, ProxyReport, RouteReport, TlsInfo};
use super::spiffe::SpiffeReport;

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn cert_lines(out: &mut String, indent: &str, c: &Summary) {
    let _ = writeln!(out, "{indent}issuer     {}", c.issuer);
    let _ = writeln!(out, "{indent}SANs       {}", or_none(&c.sans));
    let _ = writeln!(
        out,
        "{indent}validity   {} to {} ({})",
        c.not_before, c.not_after, c.validity
    );
}

/// One route's report as text, sections in the order an operator reads them: what we send,
/// what we trust, how we got there, what the upstream showed, then the verdict.
pub fn render(r: &RouteReport) -> String {
    let mut out = String::new();
    match (&r.inbound, &r.target) {
        (Some(i), Some(target)) => inbound(&mut out, r, i, target),
        _ => {
            let _ = writeln!(
                out,
                "route {}: upstream {}, server name {}",
                r.name,
                r.upstream.as_deref().unwrap_or("-"),
                r.server_name.as_deref().unwrap_or("-")
            );
        }
    }
    if let Some(s) = &r.spiffe {
        spiffe(&mut out, s);
    }
    if let Some(c) = &r.client_certificate {
        client_certificate(&mut out, "client certificate", c);
    }
    if let Some(t) = &r.trust {
        let _ = writeln!(out, "  upstream trust   {t}");
    }
    if let Some(p) = &r.proxy {
        proxy(&mut out, p);
    }
    if !r.dns.is_empty() {
        let _ = writeln!(out, "  dns              {}", r.dns.join(", "));
    }
    for e in &r.connect_errors {
        let _ = writeln!(out, "  connect failed   {e}");
    }
    if let Some(a) = &r.connected {
        let _ = writeln!(out, "  connected        {a}");
    }
    if let Some(p) = &r.postgres {
        let _ = writeln!(out, "  postgres         {p}");
    }
    if let Some(t) = &r.tls {
        let _ = writeln!(out, "  tls              {}", tls_line(t));
    }
    if !r.upstream_chain.is_empty() {
        let _ = writeln!(out, "  upstream certificate chain (as sent)");
        for (i, c) in r.upstream_chain.iter().enumerate() {
            let _ = writeln!(out, "    [{i}] {}", c.subject);
            cert_lines(&mut out, "        ", c);
        }
    }
    client_cert_request(&mut out, r);
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    for p in &r.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
    match r.problems.first() {
        None => {
            let _ = writeln!(out, "route {}: PASS", r.name);
        }
        Some(first) => {
            let _ = writeln!(out, "route {}: FAIL: {first}", r.name);
        }
    }
    out
}

/// A `--spiffe` route's identity: the socket, the SVID, every trust domain held.
fn spiffe(out: &mut String, s: &SpiffeReport) {
    let _ = writeln!(out, "  workload API     {}", s.socket);
    match &s.svid {
        Some(v) => {
            let _ = writeln!(out, "  SVID             {}", v.spiffe_id);
            let _ = writeln!(out, "    subject    {}", v.cert.subject);
            cert_lines(out, "    ", &v.cert);
            let _ = writeln!(out, "    chain      {} certificate(s)", v.chain_length);
        }
        None => {
            let _ = writeln!(out, "  SVID             none received");
        }
    }
    if s.offered.len() > 1 {
        let _ = writeln!(out, "  SVIDs offered    {}", s.offered.join(", "));
    }
    if s.svid.is_some() && s.bundles.is_empty() {
        let _ = writeln!(out, "  trust bundles    none");
    }
    for b in &s.bundles {
        let expiry = match (&b.earliest_not_after, &b.earliest_validity) {
            (Some(at), Some(words)) => format!(", earliest expiry {at} ({words})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  trust bundle     {}: {} authorit{}{expiry}",
            b.trust_domain,
            b.authorities,
            if b.authorities == 1 { "y" } else { "ies" }
        );
    }
}

/// An inbound route's head: which way it carries traffic, its server certificate, who it lets
/// in, from which CAs, and whether the certificate's names fit the listener.
fn inbound(out: &mut String, r: &RouteReport, i: &InboundReport, target: &str) {
    let _ = writeln!(
        out,
        "route {}: inbound, listen {}, target {target}",
        r.name, r.listen
    );
    let _ = writeln!(
        out,
        "  direction        inbound (mTLS from clients, plaintext to the target)"
    );
    let _ = writeln!(out, "  listen           {}", r.listen);
    let _ = writeln!(out, "  target           {target}");
    if let Some(c) = &r.server_certificate {
        client_certificate(out, "server certificate", c);
    }
    let _ = writeln!(out, "  listen names     {}", i.listen_names);
    let _ = writeln!(out, "  authorization    {}", i.authorization);
    match &i.client_cas {
        Some(ca) => {
            let expiry = match (&ca.earliest_not_after, &ca.earliest_validity) {
                (Some(at), Some(words)) => format!(", earliest expiry {at} ({words})"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  client CAs       {}: {} certificate{}{expiry}",
                ca.file,
                ca.count,
                if ca.count == 1 { "" } else { "s" }
            );
            for s in &ca.subjects {
                let _ = writeln!(out, "                   {s}");
            }
        }
        None => {
            let _ = writeln!(out, "  client CAs       none");
        }
    }
    if i.crls.is_empty() {
        let _ = writeln!(out, "  CRLs             none");
    }
    for c in &i.crls {
        let next = c
            .next_update
            .as_deref()
            .map_or_else(String::new, |n| format!(", next update {n}"));
        let _ = writeln!(
            out,
            "  CRLs             {}: {} list(s){next}",
            c.file, c.count
        );
    }
}

/// Our certificate: subject, issuer, SANs, validity, key and the chain we send.
fn client_certificate(out: &mut String, what: &str, c: &ClientCertificate) {
    let _ = writeln!(out, "  {what} ({})", c.file);
    let _ = writeln!(out, "    subject    {}", c.cert.subject);
    cert_lines(out, "    ", &c.cert);
    let _ = writeln!(out, "    key        {}", c.key_type);
    let links: Vec<&str> = c.chain.iter().map(|l| l.subject.as_str()).collect();
    let _ = writeln!(out, "    chain      {}", links.join(" -> "));
    let _ = writeln!(out, "               {}", c.chain_note);
}

/// The proxy hop: bypassed, or the CONNECT request and its answer.
fn proxy(out: &mut String, p: &ProxyReport) {
    match (&p.bypassed_by, &p.credentials) {
        (Some(entry), _) => {
            let _ = writeln!(
                out,
                "  proxy            {} bypassed: --no-proxy entry {entry:?} matches the upstream host",
                p.url
            );
        }
        (None, creds) => {
            let _ = writeln!(
                out,
                "  proxy            {} (credentials: {})",
                p.url,
                creds.as_deref().unwrap_or("none")
            );
            if let Some(req) = &p.request {
                let answer = match (&p.connected, &p.answer) {
                    (Some(c), Some(a)) => format!("{a} ({c})"),
                    _ => "no tunnel".into(),
                };
                let _ = writeln!(out, "  proxy tunnel     {req}: {answer}");
            }
        }
    }
}

/// `TLS 1.3, TLS13_AES_128_GCM_SHA256, key exchange X25519, ALPN h2`.
fn tls_line(t: &TlsInfo) -> String {
    let mut parts = vec![t.version.clone()];
    parts.extend(t.cipher.clone());
    if let Some(kx) = &t.key_exchange {
        parts.push(format!("key exchange {kx}"));
    }
    parts.push(match &t.alpn {
        Some(a) => format!("ALPN {a}"),
        None => "no ALPN".into(),
    });
    parts.join(", ")
}

/// Whether the upstream asked for a client certificate, and from which CAs; nothing when the
/// handshake ended before that was known.
fn client_cert_request(out: &mut String, r: &RouteReport) {
    match r.client_cert_requested {
        Some(true) if r.accepted_cas.is_empty() => {
            let _ = writeln!(
                out,
                "  client cert      requested, without naming the CAs it accepts"
            );
        }
        Some(true) => {
            let _ = writeln!(
                out,
                "  client cert      requested; accepted issuers: {}",
                r.accepted_cas.join(", ")
            );
        }
        Some(false) => {
            let _ = writeln!(out, "  client cert      not requested");
        }
        None => {}
    }
}
