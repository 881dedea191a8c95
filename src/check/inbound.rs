//! `check` on an inbound route: the server certificate, `--ca` and CRLs were loaded (and the
//! server configuration built) by the caller; here the client CAs and CRLs are summed up, the
//! authorization rule is put in words, the server certificate's names are held against the
//! listen host, and the target is dialled once, in plaintext, within `--connect-timeout`, the
//! way the route dials it.

use std::net::IpAddr;

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};

use super::cert::{Names, follow, validity_words};
use super::report::{CaSummary, CrlSummary, InboundReport};
use super::{EXPIRY_NOTE_DAYS, RouteReport};
use crate::config::{Inbound, Route};
use crate::failure::escape;
use crate::proxy::inbound::{Refusal, TargetConn, dial};
use crate::tls::cert::{CertInfo, rfc3339};
use crate::tls::load::{self, FileBytes, Material};

/// Fill `r` for an inbound route: CAs, CRLs, rule, listen names, one dial of the target.
pub(super) async fn check(
    route: &Route,
    material: &Material,
    chain: &[CertificateDer<'static>],
    now: i64,
    r: &mut RouteReport,
) {
    let (Some(inbound), Some(leaf)) = (route.inbound(), chain.first()) else {
        return;
    };
    own_chain(chain, r);
    let client_cas = material.ca.as_ref().map(|f| ca_summary(f, now, r));
    let crls = material
        .crls
        .iter()
        .map(|f| crl_summary(f, now, r))
        .collect();
    let listen_names = listen_names(inbound, leaf, r);
    r.inbound = Some(InboundReport {
        authorization: route.tls.inbound.as_ref().map_or_else(
            || "nobody (no rule)".into(),
            |rule| format!("lets in {}", rule.describe()),
        ),
        client_cas,
        crls,
        listen_names,
    });
    dial_target(route, inbound, r).await;
}

/// `--ca`: how many CAs, who they are, and the earliest of their expiries (a note when it is
/// near, a problem when one has passed: clients chaining to it are refused).
fn ca_summary(f: &FileBytes, now: i64, r: &mut RouteReport) -> CaSummary {
    let file = format!("--ca {}", f.path.display());
    let infos: Vec<CertInfo> = load::certificates(f)
        .map(|c| c.iter().filter_map(CertInfo::parse).collect())
        .unwrap_or_default();
    let earliest = infos.iter().min_by_key(|i| i.not_after);
    if let Some(e) = earliest {
        let subject = escape(&e.subject).into_owned();
        if now > e.not_after {
            r.problems.push(format!(
                "the client CA {subject} in {file} expired at {}: clients whose chain leads to it \
                 are refused; replace it",
                rfc3339(e.not_after)
            ));
        } else if e.not_after - now < EXPIRY_NOTE_DAYS * 86_400 {
            r.notes.push(format!(
                "the client CA {subject} in {file} {}: replace it soon",
                validity_words(e.not_before, e.not_after, now)
            ));
        }
    }
    CaSummary {
        file,
        count: infos.len(),
        subjects: infos
            .iter()
            .map(|i| escape(&i.subject).into_owned())
            .collect(),
        earliest_not_after: earliest.map(|e| rfc3339(e.not_after)),
        earliest_validity: earliest.map(|e| validity_words(e.not_before, e.not_after, now)),
    }
}

/// One `--crl` file: how many lists and the earliest next update (a note when it has passed:
/// the issuer should have published a newer one).
fn crl_summary(f: &FileBytes, now: i64, r: &mut RouteReport) -> CrlSummary {
    let file = format!("--crl {}", f.path.display());
    let ders = load::crls(f).unwrap_or_default();
    let next = ders
        .iter()
        .filter_map(|d| {
            let (_, crl) = x509_parser::parse_x509_crl(d).ok()?;
            Some(crl.next_update()?.timestamp())
        })
        .min();
    if let Some(n) = next
        && n < now
    {
        r.notes.push(format!(
            "{file}: its next update was due at {}: fetch a fresh CRL (the old one still applies)",
            rfc3339(n)
        ));
    }
    CrlSummary {
        file,
        count: ders.len(),
        next_update: next.map(rfc3339),
    }
}

/// Whether the server certificate's names cover the listen host. A name must be among the DNS
/// SANs (a problem otherwise: clients that verify the name refuse the certificate); an IP
/// address should be among the IP SANs (a note only: clients usually reach a server by name);
/// an unspecified address (`0.0.0.0`, `[::]`) and `systemd:`/`unix:` listeners say nothing of
/// the name clients use, so they are not checked.
fn listen_names(inbound: &Inbound, leaf: &CertificateDer<'_>, r: &mut RouteReport) -> String {
    let Some(host) = inbound.listen_host.as_deref() else {
        return "not checked: the listener is a systemd or unix socket, whose address does not \
                say which name clients use"
            .into();
    };
    let sans = CertInfo::parse(leaf).map(|i| i.sans).unwrap_or_default();
    let shown = escape(&sans.join(", ")).into_owned();
    let shown = if shown.is_empty() {
        "none".to_string()
    } else {
        shown
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return format!(
                "not checked: {host} accepts on every address of this machine, so clients \
                 reach it by names this check cannot know (the certificate has: {shown})"
            );
        }
        if sans.iter().any(|s| ip_san_is(s, ip)) {
            return format!("the certificate has IP SAN {ip}");
        }
        r.notes.push(format!(
            "the server certificate has no IP SAN {ip} (it has: {shown}): clients that connect \
             to {ip} and verify the address will refuse it; clients that connect by a name it \
             carries are fine"
        ));
        return format!("no IP SAN {ip} (warning only)");
    }
    let name = host.trim_end_matches('.');
    if let Some(san) = sans.iter().find(|s| dns_san_covers(s, name)) {
        return format!("{san} covers {name}");
    }
    r.problems.push(format!(
        "the server certificate's names do not cover the listen host {name} (it has: {shown}): \
         clients that connect to {name} and verify the name will refuse it; have the certificate \
         issued with DNS SAN {name}, or listen on a name it carries"
    ));
    format!("{name} is not covered")
}

fn ip_san_is(san: &str, ip: IpAddr) -> bool {
    san.strip_prefix("IP:")
        .and_then(|a| a.parse::<IpAddr>().ok())
        .is_some_and(|a| a == ip)
}

/// `DNS:name` matches `name` case-insensitively; `DNS:*.rest` matches one extra left-most label,
/// as RFC 6125 and webpki allow.
fn dns_san_covers(san: &str, name: &str) -> bool {
    let Some(dns) = san.strip_prefix("DNS:") else {
        return false;
    };
    let dns = dns.trim_end_matches('.');
    if dns.eq_ignore_ascii_case(name) {
        return true;
    }
    match (dns.strip_prefix("*."), name.split_once('.')) {
        (Some(rest), Some((first, tail))) => !first.is_empty() && rest.eq_ignore_ascii_case(tail),
        _ => false,
    }
}

/// When the certificate file also holds the leaf's issuer, the leaf (and the intermediates on
/// the way) must verify against it with webpki, as clients will: a wrong CA certificate in the
/// file is a problem. Validity, names and key usage are reported on their own, so those errors
/// are not repeated here; nothing is checked when the issuer is not in the file.
fn own_chain(chain: &[CertificateDer<'static>], r: &mut RouteReport) {
    let names: Vec<Names> = chain.iter().filter_map(Names::of).collect();
    if names.len() != chain.len() {
        return;
    }
    let path = follow(&names);
    let (Some(&top), true) = (path.last(), path.len() > 1) else {
        return;
    };
    let mut roots = RootCertStore::empty();
    if roots.add(chain[top].clone()).is_err() {
        return;
    }
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
            .build()
    else {
        return;
    };
    let between: Vec<CertificateDer<'static>> = path[1..path.len() - 1]
        .iter()
        .map(|&i| chain[i].clone())
        .collect();
    let sans = CertInfo::parse(&chain[0])
        .map(|i| i.sans)
        .unwrap_or_default();
    let name = sans
        .iter()
        .find_map(|s| s.strip_prefix("DNS:").or_else(|| s.strip_prefix("IP:")))
        .and_then(|n| ServerName::try_from(n.to_string()).ok())
        .unwrap_or_else(|| ServerName::try_from("localhost").expect("a valid name"));
    let result = verifier.verify_server_cert(&chain[0], &between, &name, &[], UnixTime::now());
    let Err(rustls::Error::InvalidCertificate(e)) = result else {
        return;
    };
    let reported_elsewhere = matches!(
        e,
        CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }
            | CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. }
            | CertificateError::InvalidPurpose
            | CertificateError::InvalidPurposeContext { .. }
    );
    if !reported_elsewhere {
        r.problems.push(format!(
            "the server certificate does not verify against its issuer {} in the same file ({e:?}): \
             the file holds the wrong CA certificate, or the leaf was not issued by it; clients \
             will refuse this chain",
            names[top].subject
        ));
    }
}

/// Dial the target once, the way the route does.
pub(super) async fn dial_target(route: &Route, inbound: &Inbound, r: &mut RouteReport) {
    let limit = route.connect_timeout;
    match dial(&inbound.target, limit).await {
        Ok(TargetConn::Tcp(s)) => {
            r.connected = Some(s.peer_addr().map_or_else(|_| "-".into(), |a| a.to_string()))
        }
        Ok(TargetConn::Unix(_)) => r.connected = Some(inbound.target.to_string()),
        Err((Refusal::TargetTimeout, _)) => r.problems.push(format!(
            "the target {} did not answer within --connect-timeout {}",
            inbound.target,
            humantime::format_duration(limit)
        )),
        Err((_, why)) => r.problems.push(format!(
            "{why} (target {}): is the app running?",
            inbound.target
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_and_wildcards() {
        assert!(dns_san_covers(
            "DNS:api.example.internal",
            "API.example.internal"
        ));
        assert!(dns_san_covers(
            "DNS:*.example.internal",
            "api.example.internal"
        ));
        assert!(!dns_san_covers(
            "DNS:*.example.internal",
            "a.b.example.internal"
        ));
        assert!(!dns_san_covers(
            "DNS:*.example.internal",
            "example.internal"
        ));
        assert!(!dns_san_covers("IP:127.0.0.1", "localhost"));
        assert!(!dns_san_covers("DNS:other.example", "api.example.internal"));
    }

    #[test]
    fn ip_sans() {
        assert!(ip_san_is("IP:127.0.0.1", "127.0.0.1".parse().unwrap()));
        assert!(ip_san_is("IP:::1", "::1".parse().unwrap()));
        assert!(!ip_san_is("DNS:127.0.0.1", "127.0.0.1".parse().unwrap()));
    }
}
