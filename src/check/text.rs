//! The human-readable report of one route.

use std::fmt::Write as _;

use super::RouteReport;
use super::cert::Summary;

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

pub fn render(r: &RouteReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "route {}: upstream {}, server name {}",
        r.name, r.upstream, r.server_name
    );
    if let Some(c) = &r.client_certificate {
        let _ = writeln!(out, "  client certificate ({})", c.file);
        let _ = writeln!(out, "    subject    {}", c.cert.subject);
        cert_lines(&mut out, "    ", &c.cert);
        let _ = writeln!(out, "    key        {}", c.key_type);
        let links: Vec<&str> = c.chain.iter().map(|l| l.subject.as_str()).collect();
        let _ = writeln!(out, "    chain      {}", links.join(" -> "));
        let _ = writeln!(out, "               {}", c.chain_note);
    }
    if let Some(t) = &r.trust {
        let _ = writeln!(out, "  upstream trust   {t}");
    }
    if let Some(p) = &r.proxy {
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
    if !r.dns.is_empty() {
        let _ = writeln!(out, "  dns              {}", r.dns.join(", "));
    }
    for e in &r.connect_errors {
        let _ = writeln!(out, "  connect failed   {e}");
    }
    if let Some(a) = &r.connected {
        let _ = writeln!(out, "  connected        {a}");
    }
    if let Some(t) = &r.tls {
        let mut parts = vec![t.version.clone()];
        parts.extend(t.cipher.clone());
        if let Some(kx) = &t.key_exchange {
            parts.push(format!("key exchange {kx}"));
        }
        parts.push(match &t.alpn {
            Some(a) => format!("ALPN {a}"),
            None => "no ALPN".into(),
        });
        let _ = writeln!(out, "  tls              {}", parts.join(", "));
    }
    if !r.upstream_chain.is_empty() {
        let _ = writeln!(out, "  upstream certificate chain (as sent)");
        for (i, c) in r.upstream_chain.iter().enumerate() {
            let _ = writeln!(out, "    [{i}] {}", c.subject);
            cert_lines(&mut out, "        ", c);
        }
    }
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
