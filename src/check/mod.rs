//! `check`: load and validate every route, handshake once with each upstream, and explain in
//! plain words anything that fails.
//!
//! - `canary`: `--reload-canary`'s dial of a new client identity (the real dial path), judged
//!   by the upstream's alert; the CA names it accepts come from its certificate request
//! - `cert`: certificate facts (names, validity in days, key type, where a chain ends)
//! - `dial`: resolve, connect, a hand-driven handshake that records what the upstream showed
//! - `explain`: failures in words: which side rejected what, and what to do
//! - `probe`: one dial of a running route with its identity in force, for `/upstreamz`
//! - `report`: the report's types, as `--format json` prints them
//! - `spiffe`: `--spiffe` routes: one Workload API fetch (SVID, bundles), its report, and why
//!   nothing came ("waiting for the Workload API") or a peer's domain has no bundle, in words
//! - `spiffe_route`: a `--spiffe` route checked with that SVID and a verifier by the peer's own
//!   trust domain bundle, then `--verify-uri-san`
//! - `text`: the human-readable report

pub mod canary;
mod cert;
mod dial;
mod explain;
mod inbound;
pub mod probe;
mod report;
mod spiffe;
mod spiffe_route;
mod text;

use crate::cli::CheckFormat;
use crate::config::{Config, Route};
use crate::egress::Proxy;
use crate::failure::{Class, Failure, classify_io};
use crate::tls::IdentitySource;
use crate::tls::cert::{CertInfo, now_unix};
use crate::tls::identity;
use crate::tls::load;
use cert::{Hint, Names, Summary};
use dial::Outcome;
use explain::{Context, Trust};
pub use report::{
    CaSummary, ChainLink, ClientCertificate, CrlSummary, InboundReport, ProxyReport, Report,
    RouteReport, TlsInfo,
};

/// A client certificate expiring sooner than this gets a note.
const EXPIRY_NOTE_DAYS: i64 = 7;

/// Check every route and print the report; `true` only if every route passed.
/// `proxies` are the routes' opened proxies, in route order (`Config::open_proxies`).
pub async fn run(
    config: &Config,
    proxies: &[Option<std::sync::Arc<Proxy>>],
    format: CheckFormat,
) -> bool {
    // Every route is dialled at once, so the whole check ends within the longest
    // --connect-timeout (+ the verdict wait), however many routes there are; reports are
    // still printed in route order, each as soon as it and those before it are done.
    let handles: Vec<_> = config
        .routes
        .iter()
        .zip(proxies)
        .map(|(route, proxy)| {
            let route = route.clone();
            let proxy = proxy.clone();
            tokio::spawn(async move { check_route(&route, proxy.as_deref()).await })
        })
        .collect();
    let mut routes = Vec::new();
    for ((route, proxy), handle) in config.routes.iter().zip(proxies).zip(handles) {
        let report = match handle.await {
            Ok(report) => report,
            Err(e) => RouteReport::new(route, proxy.as_deref())
                .fail(format!("internal error while checking: {e}")),
        };
        if format == CheckFormat::Text {
            out(&text::render(&report));
        }
        routes.push(report);
    }
    let ok = routes.iter().all(|r| r.ok);
    if format == CheckFormat::Json {
        match serde_json::to_string_pretty(&Report { routes, ok }) {
            Ok(json) => out(&format!("{json}\n")),
            Err(e) => {
                eprintln!("mtls-sidecar: cannot write the JSON report: {e}");
                return false;
            }
        }
    }
    ok
}

fn identity_file(route: &Route) -> String {
    match &route.tls.files.identity {
        IdentitySource::Pem { cert, .. } => format!("--cert {}", cert.display()),
        IdentitySource::Pkcs12 { file, .. } => format!("--pkcs12 {}", file.display()),
        IdentitySource::Spiffe(s) => format!("--spiffe-socket {}", s.socket.display()),
    }
}

/// Describe our client certificate; problems and notes go to `r`.
fn describe_ours(
    route: &Route,
    chain: &[rustls::pki_types::CertificateDer<'static>],
    names: &[Names],
    now: i64,
    r: &mut RouteReport,
) -> Option<Summary> {
    let leaf = &chain[0];
    let file = identity_file(route);
    let inbound = route.inbound().is_some();
    let role = if inbound { "server" } else { "client" };
    let (Some(summary), Some(info)) = (Summary::parse(leaf, now), CertInfo::parse(leaf)) else {
        r.problems
            .push(format!("{file}: the leaf certificate cannot be parsed"));
        return None;
    };
    if summary.expired(now) {
        r.problems.push(format!(
            "our {role} certificate {} (not after {}): renew {file}",
            summary.validity, summary.not_after
        ));
    } else if summary.not_yet_valid(now) {
        r.problems.push(format!(
            "our {role} certificate is {}: check this machine's clock, or wait",
            summary.validity
        ));
    } else if summary.not_after_unix - now < EXPIRY_NOTE_DAYS * 86_400 {
        r.notes.push(format!(
            "our {role} certificate {}: renew {file} soon",
            summary.validity
        ));
    }
    if inbound {
        if let Some(allowed) = cert::not_for_servers(leaf) {
            r.problems.push(format!(
                "our server certificate's extended key usage allows {allowed} but not TLS \
                 server authentication (serverAuth): clients refuse it; have it issued with \
                 serverAuth"
            ));
        }
    } else if let Some(allowed) = cert::not_for_clients(leaf) {
        r.problems.push(format!(
            "our client certificate's extended key usage allows {allowed} but not TLS client \
             authentication (clientAuth): upstreams refuse it; have it issued with clientAuth"
        ));
    }
    let (ends_at_root, mut chain_note, mut notes) = cert::describe_our_chain(names);
    if inbound {
        chain_note = as_server(&chain_note);
        notes = notes.iter().map(|n| as_server(n)).collect();
    }
    r.notes.extend(notes);
    let described = Some(ClientCertificate {
        file,
        cert: summary.clone(),
        serial: info.serial,
        sha256_fingerprint: info.sha256_fingerprint,
        key_type: cert::key_type(leaf),
        chain: names
            .iter()
            .map(|n| ChainLink {
                subject: n.subject.clone(),
                issuer: n.issuer.clone(),
            })
            .collect(),
        chain_ends_at_root: ends_at_root,
        chain_note,
    });
    if inbound {
        r.server_certificate = described;
    } else {
        r.client_certificate = described;
    }
    Some(summary)
}

/// The chain sentences, written for a client certificate, reworded for a server's: the ones
/// who must trust it are the clients.
fn as_server(text: &str) -> String {
    text.replace("the upstream must trust", "clients must trust")
        .replace("the upstream trusts", "clients trust")
        .replace("client certificate file", "server certificate file")
        .replace("some upstreams", "some clients")
}

fn trust_of(material: &load::Material) -> Trust {
    match &material.ca {
        Some(ca) => Trust {
            ca: Some(ca.path.display().to_string()),
            subjects: load::certificates(ca)
                .map(|c| c.iter().filter_map(Names::of).map(|n| n.subject).collect())
                .unwrap_or_default(),
        },
        None => Trust {
            ca: None,
            subjects: Vec::new(),
        },
    }
}

/// `--ca FILE (2 certificates: CN=a, CN=b)`; a long bundle is cut short.
fn trust_line(trust: &Trust) -> String {
    const SHOWN: usize = 4;
    let n = trust.subjects.len();
    if trust.ca.is_none() || n == 0 {
        return trust.label();
    }
    let mut names = trust.subjects[..n.min(SHOWN)].join(", ");
    if n > SHOWN {
        names.push_str(&format!(" and {} more", n - SHOWN));
    }
    let count = if n == 1 {
        "1 certificate".to_string()
    } else {
        format!("{n} certificates")
    };
    format!("{} ({count}: {names})", trust.label())
}

async fn check_route(route: &Route, proxy: Option<&Proxy>) -> RouteReport {
    let now = now_unix();
    let mut r = RouteReport::new(route, proxy);
    if let IdentitySource::Spiffe(source) = &route.tls.files.identity {
        return spiffe_route::check(route, proxy, source, r).await;
    }
    let material = match load::Material::read(&route.tls.files) {
        Ok(m) => m,
        Err(e) => return r.fail(e.to_string()),
    };
    // The key is dropped here: the report never shows key material.
    let ours = match material.identity() {
        Ok((chain, _key)) => chain,
        Err(e) => return r.fail(e.to_string()),
    };
    let our_names: Vec<Names> = ours.iter().filter_map(Names::of).collect();
    let our_leaf = describe_ours(route, &ours, &our_names, now, &mut r);
    let loaded = match identity::build_from(&route.tls, &material) {
        Ok(l) => l,
        Err(e) => return r.fail(e.to_string()),
    };
    if route.inbound().is_some() {
        inbound::check(route, &material, &ours, now, &mut r).await;
        return r.finish();
    }
    let trust = trust_of(&material);
    r.trust = Some(trust_line(&trust));
    let seen = dial::new_seen();
    let config = match dial::client_config(route, &material, &loaded, &seen) {
        Ok(c) => c,
        Err(e) => return r.fail(e),
    };
    let ours = Ours {
        trust: &trust,
        names: &our_names,
        leaf: our_leaf.as_ref(),
    };
    dial_and_judge(route, proxy, config, seen, &ours, r, |_, _| None).await
}

/// What we present and trust, for the explanations.
struct Ours<'a> {
    trust: &'a Trust,
    names: &'a [Names],
    leaf: Option<&'a Summary>,
}

/// Dial the upstream once with `config` (its recorders share `seen`), record what was seen and
/// judge the outcome. `first_say` may explain a handshake error better than the generic
/// explanations (it gets the error and the upstream's chain as sent).
async fn dial_and_judge(
    route: &Route,
    proxy: Option<&Proxy>,
    config: std::sync::Arc<rustls::ClientConfig>,
    seen: dial::SeenDuringHandshake,
    ours: &Ours<'_>,
    r: RouteReport,
    first_say: impl Fn(&rustls::Error, &[rustls::pki_types::CertificateDer<'static>]) -> Option<String>,
) -> RouteReport {
    let (r, _) = dial_judge_seen(route, proxy, config, seen, ours, r, first_say).await;
    r
}

/// [`dial_and_judge`], also handing back the upstream's chain as sent (leaf first).
async fn dial_judge_seen(
    route: &Route,
    proxy: Option<&Proxy>,
    config: std::sync::Arc<rustls::ClientConfig>,
    seen: dial::SeenDuringHandshake,
    ours: &Ours<'_>,
    mut r: RouteReport,
    first_say: impl Fn(&rustls::Error, &[rustls::pki_types::CertificateDer<'static>]) -> Option<String>,
) -> (RouteReport, Vec<rustls::pki_types::CertificateDer<'static>>) {
    let now = now_unix();
    let d = dial::dial(route, proxy, config).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));

    record_dial(&mut r, &d);
    r.upstream_chain = seen
        .chain
        .iter()
        .filter_map(|c| Summary::parse(c, now))
        .collect();
    let their_names: Vec<Names> = seen.chain.iter().filter_map(Names::of).collect();
    let hints: Vec<Hint> = seen.hints.iter().map(|h| Hint::decode(h)).collect();
    r.accepted_cas = hints.iter().map(|h| h.text.clone()).collect();
    let handshake_done = matches!(
        d.outcome,
        Outcome::Accepted { .. } | Outcome::Rejected(_) | Outcome::ClosedAfter { .. }
    );
    r.client_cert_requested = (seen.requested || handshake_done).then_some(seen.requested);

    if let Outcome::Handshake(e) = &d.outcome
        && let Some(problem) = first_say(e, &seen.chain)
    {
        return (r.fail(problem), seen.chain);
    }
    let server_name = r.server_name.clone().unwrap_or_default();
    let cx = Context {
        server_name: &server_name,
        trust: ours.trust,
        ours: ours.names,
        our_leaf: ours.leaf,
        theirs: &their_names,
        their_summaries: &r.upstream_chain,
        hints: &r.accepted_cas,
        now,
    };
    let problem = judge(route, proxy, &d, seen.requested, &hints, &cx, &mut r.notes);
    r.problems.extend(problem);
    (r.finish(), seen.chain)
}

/// What the dial saw on its way to the handshake: addresses, the proxy's answer, what TLS
/// negotiated.
fn record_dial(r: &mut RouteReport, d: &dial::Dial) {
    r.dns = d.dns.iter().map(ToString::to_string).collect();
    if let (Some(p), Some((hop, answer))) = (&mut r.proxy, &d.tunnel) {
        p.connected = Some(hop.clone());
        p.answer = Some(answer.clone());
    }
    r.connected = d.connected.map(|a| a.to_string());
    r.postgres = d.postgres.as_ref().map(|a| format!("SSLRequest: {a}"));
    r.connect_errors = d
        .attempts
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect();
    r.tls = tls_info(&d.negotiated);
}

/// The negotiated parameters in words; `None` before a version was agreed.
fn tls_info(negotiated: &dial::Negotiated) -> Option<TlsInfo> {
    let version = negotiated.version?;
    Some(TlsInfo {
        version: match version {
            rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2".into(),
            rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3".into(),
            other => format!("{other:?}"),
        },
        cipher: negotiated.cipher.map(|c| format!("{:?}", c.suite())),
        alpn: negotiated
            .alpn
            .as_deref()
            .map(|a| String::from_utf8_lossy(a).into_owned()),
        key_exchange: negotiated.key_exchange.clone(),
    })
}

/// The dial's outcome as the route's problem, if any; observations that do not fail the route
/// go to `notes`.
fn judge(
    route: &Route,
    proxy: Option<&Proxy>,
    d: &dial::Dial,
    requested: bool,
    hints: &[Hint],
    cx: &Context<'_>,
    notes: &mut Vec<String>,
) -> Option<String> {
    let host = &route.upstream.host;
    let limit = humantime::format_duration(route.connect_timeout);
    let at = d
        .connected
        .map_or_else(|| route.upstream.to_string(), |a| a.to_string());
    match &d.outcome {
        Outcome::Dns(e) => Some(format!(
            "cannot resolve the upstream host {host}: {e}: check --upstream and this machine's \
             DNS"
        )),
        Outcome::NoConnection => Some(no_connection(&d.attempts)),
        Outcome::Timeout {
            phase: "resolve", ..
        } => Some(format!(
            "resolving {host} took longer than --connect-timeout {limit}: check this machine's \
             DNS"
        )),
        Outcome::Timeout {
            phase: "connect",
            at,
        } => Some(format!(
            "nothing accepted a connection at {} within --connect-timeout {limit} (no answer at \
             all: a firewall dropping packets, or a wrong address)",
            at.map_or_else(|| route.upstream.to_string(), |a| a.to_string())
        )),
        Outcome::Timeout {
            phase: crate::postgres::SSL_REQUEST_PHASE,
            ..
        } => Some(format!(
            "{at} accepted the connection, but did not answer our PostgreSQL SSLRequest within \
             --connect-timeout {limit}: is it a PostgreSQL server? (--protocol postgres)"
        )),
        Outcome::Timeout { .. } => Some(format!(
            "{at} accepted the connection, but the TLS handshake did not finish within \
             --connect-timeout {limit}: is it a TLS port? (a plaintext server waits for a \
             request and never answers a TLS hello)"
        )),
        Outcome::Proxy(f) => Some(proxy_problem(proxy, f)),
        Outcome::Opening(f) => Some(opening_problem(route, d, f)),
        Outcome::Handshake(e) | Outcome::Rejected(e) => Some(explain::tls_failure(e, cx)),
        Outcome::HandshakeIo(why) => Some(format!(
            "the upstream at {at} ended the connection during the TLS handshake ({why}) without \
             a TLS alert: is it a TLS port? it may also refuse our TLS versions, cipher suites{}",
            if requested {
                " or our client certificate"
            } else {
                ""
            }
        )),
        Outcome::ClosedAfter {
            why,
            accepted: true,
        } => Some(format!(
            "the upstream accepted our certificate (it sent a session ticket), then {why} before \
             we sent anything: it serves no connection this way; check its logs"
        )),
        Outcome::ClosedAfter { why, .. } => Some(format!(
            "the upstream completed the handshake, then {why} without a TLS alert: it may refuse \
             our client certificate after the handshake; check its logs"
        )),
        Outcome::Accepted { spoke_first } => {
            accepted_problem(*spoke_first, requested, hints, cx, notes)
        }
    }
}

/// `--protocol postgres` failed before the handshake: the failure, and for `N` what it means.
fn opening_problem(route: &Route, d: &dial::Dial, f: &Failure) -> String {
    if d.postgres.as_deref() != Some("N") {
        return f.message.clone();
    }
    let at = d
        .connected
        .map_or_else(|| route.upstream.to_string(), |a| a.to_string());
    format!(
        "{at} answered N to our SSLRequest: the server does not offer TLS on this port: ssl = \
         off in postgresql.conf, or a pooler without TLS; a PostgreSQL 17 server with direct \
         TLS needs --alpn postgresql instead of --protocol postgres"
    )
}

/// A completed handshake fails the route only when the upstream will most likely refuse our
/// certificate anyway; the rest are notes.
fn accepted_problem(
    spoke_first: usize,
    requested: bool,
    hints: &[Hint],
    cx: &Context<'_>,
    notes: &mut Vec<String>,
) -> Option<String> {
    if spoke_first > 0 {
        notes.push(format!(
            "the upstream sent {spoke_first} bytes before we sent anything (a protocol \
             where the server speaks first)"
        ));
    }
    if !requested {
        notes.push(
            "the upstream did not ask for a client certificate: it does not \
             authenticate us (no mutual TLS)"
                .into(),
        );
        None
    } else if !hints.is_empty() && !cert::hints_cover(cx.ours, hints) {
        let anchor = cert::anchor_name(cx.ours).unwrap_or_else(|| "(unknown)".into());
        Some(format!(
            "the upstream accepts client certificates issued by: {}; ours comes from \
             {anchor}, which is not among them: the handshake completed, but it will \
             most likely refuse our certificate (nginx, for one, answers every request \
             with 400): add {anchor} to the CAs it trusts for clients, or get our \
             certificate from one of those",
            cx.hints.join(", ")
        ))
    } else {
        None
    }
}

/// Print to stdout; a reader that went away (`| head`) is not our failure and no panic.
fn out(text: &str) {
    use std::io::Write as _;
    // Peer text is escaped where it enters the report; this catches any path that was missed
    // (an error text that quotes the peer), line by line so the report keeps its newlines.
    let text: String = text
        .split_inclusive('\n')
        .map(|line| match line.strip_suffix('\n') {
            Some(l) => format!("{}\n", crate::failure::escape(l)),
            None => crate::failure::escape(line).into_owned(),
        })
        .collect();
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// The proxy hop's failure, with what to do about it.
fn proxy_problem(proxy: Option<&Proxy>, f: &Failure) -> String {
    let hint = match f.class {
        Class::ProxyUnreachable => {
            ": is the proxy running, and are the host and port of --proxy right?"
        }
        Class::ProxyTls => match proxy {
            Some(p) if f.message.contains("unknown issuer") => {
                if p.trust.starts_with("--proxy-ca") {
                    ": is --proxy-ca the CA that issued the proxy's certificate?"
                } else {
                    ": pass the CA that issued the proxy's certificate with --proxy-ca FILE"
                }
            }
            _ => "",
        },
        Class::ProxyProtocol => ": is --proxy an HTTP proxy that supports CONNECT?",
        _ => "",
    };
    format!("{}{hint}", f.message)
}

/// Every address failed to connect.
fn no_connection(attempts: &[(std::net::SocketAddr, std::io::Error)]) -> String {
    let refused = attempts
        .iter()
        .all(|(_, e)| e.kind() == std::io::ErrorKind::ConnectionRefused);
    let addrs: Vec<String> = attempts.iter().map(|(a, _)| a.to_string()).collect();
    if refused {
        return format!(
            "nothing accepted a connection at {} (connection refused): is the upstream running, \
             and is the port right?",
            addrs.join(", ")
        );
    }
    let each: Vec<String> = attempts
        .iter()
        .map(|(a, e)| format!("{a}: {}", classify_io(e, "").message))
        .collect();
    format!("cannot connect to the upstream: {}", each.join("; "))
}
