//! What `check` found, one struct per part of the report: the text renderer and
//! `--format json` both read these, so a field added here shows up in both.

use serde::Serialize;

use super::cert::Summary;
use super::spiffe::SpiffeReport;
use crate::config::{Route, Via};
use crate::egress::Proxy;
use crate::upstream::server_name_str;

/// The whole report, as `--format json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Every route, in the order the configuration lists them.
    pub routes: Vec<RouteReport>,
    /// Whether every route passed: what the exit code says, for a script reading the JSON.
    pub ok: bool,
}

/// One route's findings.
#[derive(Debug, Serialize)]
pub struct RouteReport {
    /// The route's name, so a report of many routes says which one this is.
    pub name: String,
    /// `outbound` (plaintext from the app, mTLS to `upstream`) or `inbound` (mTLS from
    /// clients, plaintext to `target`).
    pub direction: &'static str,
    /// The route's listener as bound: `HOST:PORT` (resolved), `unix:PATH` or `systemd:NAME`.
    pub listen: String,
    /// Outbound: `HOST:PORT` as configured, before any resolution; `null` on an inbound route.
    pub upstream: Option<String>,
    /// Outbound: the name sent in SNI and checked against the upstream's certificate; `null`
    /// on an inbound route.
    pub server_name: Option<String>,
    /// Inbound: where verified plaintext goes (`HOST:PORT` or `unix:PATH`); `null` outbound.
    pub target: Option<String>,
    /// Whether the route passed: `problems` is empty.
    pub ok: bool,
    /// Outbound: what we present to the upstream; `None` when the identity files could not be
    /// read, and always on an inbound route (see `server_certificate`).
    pub client_certificate: Option<ClientCertificate>,
    /// Inbound: what we present to clients; `None` on an outbound route.
    pub server_certificate: Option<ClientCertificate>,
    /// Outbound: where the upstream's chain must lead: `--ca FILE (...)` or the system trust
    /// store; `null` on an inbound route (see `inbound.client_cas`).
    pub trust: Option<String>,
    /// Inbound: who is let in, the client CAs and CRLs, the listen names; `null` outbound.
    pub inbound: Option<InboundReport>,
    /// `--spiffe` routes: the Workload API socket, the SVID and the trust bundles held;
    /// `null` on a route with files.
    pub spiffe: Option<SpiffeReport>,
    /// The egress proxy hop, when `--proxy` (or `HTTPS_PROXY`) is set for this route.
    pub proxy: Option<ProxyReport>,
    /// Every address the upstream's name resolved to (empty through a proxy: it resolves).
    pub dns: Vec<String>,
    /// The address the TCP connection was made to.
    pub connected: Option<String>,
    /// `--protocol postgres`: the opening as sent and answered, `SSLRequest: S`; absent on
    /// other routes or when the dial never got that far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<String>,
    /// Addresses tried before (or instead of) that one, and why they failed.
    pub connect_errors: Vec<String>,
    /// What the handshake negotiated; `None` when it never got that far.
    pub tls: Option<TlsInfo>,
    /// As the upstream sent it, leaf first; recorded even when verification failed.
    pub upstream_chain: Vec<Summary>,
    /// `null` when the handshake ended before that could be known.
    pub client_cert_requested: Option<bool>,
    /// CA names from the upstream's certificate request.
    pub accepted_cas: Vec<String>,
    /// Observations that do not fail the route.
    pub notes: Vec<String>,
    /// Why the route fails; empty when it passes.
    pub problems: Vec<String>,
}

/// What an inbound route checks its clients against, and whether its certificate fits its
/// listener.
#[derive(Debug, Serialize)]
pub struct InboundReport {
    /// The authorization rule in words, e.g. `a client leaf with URI SAN spiffe://a/*`.
    pub authorization: String,
    /// `--ca`: the CAs a client's chain must lead to.
    pub client_cas: Option<CaSummary>,
    /// Every `--crl`, in the order given.
    pub crls: Vec<CrlSummary>,
    /// Whether the server certificate's names cover the listen host, in words.
    pub listen_names: String,
}

/// The client CA bundle of an inbound route.
#[derive(Debug, Serialize)]
pub struct CaSummary {
    /// `--ca FILE`.
    pub file: String,
    /// How many certificates the file holds.
    pub count: usize,
    /// Their subjects, in file order.
    pub subjects: Vec<String>,
    /// The earliest not-after among them, RFC 3339, UTC.
    pub earliest_not_after: Option<String>,
    /// That date in words: `expires in 364 days` or `expired 3 days ago`.
    pub earliest_validity: Option<String>,
}

/// One `--crl` file of an inbound route.
#[derive(Debug, Serialize)]
pub struct CrlSummary {
    /// `--crl FILE`.
    pub file: String,
    /// How many CRLs the file holds.
    pub count: usize,
    /// The earliest `nextUpdate` among them, RFC 3339, UTC; `None` when none states one.
    pub next_update: Option<String>,
}

/// The proxy hop of a route.
#[derive(Debug, Serialize)]
pub struct ProxyReport {
    /// Without credentials.
    pub url: String,
    /// `none`, `in the proxy URL` or `from FILE`; never the credentials.
    pub credentials: Option<String>,
    /// The `--no-proxy` entry that makes this upstream bypass the proxy.
    pub bypassed_by: Option<String>,
    /// The request sent: `CONNECT HOST:PORT`.
    pub request: Option<String>,
    /// Where the proxy was reached.
    pub connected: Option<String>,
    /// Its answer to CONNECT, e.g. `200 Connection established`.
    pub answer: Option<String>,
}

/// What the TLS handshake settled on, so a mismatch with the upstream's settings shows.
#[derive(Debug, Serialize)]
pub struct TlsInfo {
    /// `TLS 1.2` or `TLS 1.3`.
    pub version: String,
    /// The cipher suite, in rustls's name for it.
    pub cipher: Option<String>,
    /// The protocol ALPN agreed on; `None` when the upstream chose none.
    pub alpn: Option<String>,
    /// The key exchange group, e.g. `X25519`.
    pub key_exchange: Option<String>,
}

/// Our client certificate, as the upstream will see it.
#[derive(Debug, Serialize)]
pub struct ClientCertificate {
    /// `--cert FILE` or `--pkcs12 FILE`.
    pub file: String,
    /// The leaf's subject, issuer, SANs and validity, flattened into this object.
    #[serde(flatten)]
    pub cert: Summary,
    /// The leaf's serial number, to match it against the issuing CA's records.
    pub serial: String,
    /// The leaf's SHA-256 fingerprint, as `/status` shows it, to compare the two.
    pub sha256_fingerprint: String,
    /// The leaf's key type (e.g. `EC P-256`): some upstreams refuse some types.
    pub key_type: String,
    /// The certificates the file holds, in file order.
    pub chain: Vec<ChainLink>,
    /// Whether the chain we send ends at a self-signed root.
    pub chain_ends_at_root: bool,
    /// Where that chain ends, in words: a root, or an intermediate the upstream must hold.
    pub chain_note: String,
}

/// One certificate of the chain we send: who it names and who signed it, enough to see a gap.
#[derive(Debug, Serialize)]
pub struct ChainLink {
    /// The certificate's subject.
    pub subject: String,
    /// The subject of the certificate that signed it.
    pub issuer: String,
}

impl RouteReport {
    pub(super) fn new(route: &Route, proxy: Option<&Proxy>) -> RouteReport {
        let inbound = route.inbound();
        RouteReport {
            name: route.name.clone(),
            direction: if inbound.is_some() {
                "inbound"
            } else {
                "outbound"
            },
            listen: route.listen.to_string(),
            upstream: inbound.is_none().then(|| route.upstream.to_string()),
            server_name: inbound.is_none().then(|| server_name_str(route)),
            target: inbound.map(|i| i.target.to_string()),
            ok: false,
            client_certificate: None,
            server_certificate: None,
            trust: None,
            inbound: None,
            spiffe: None,
            proxy: match (&route.via, proxy) {
                (Via::Bypass { proxy, entry }, _) => Some(ProxyReport {
                    url: proxy.url.to_string(),
                    credentials: None,
                    bypassed_by: Some(entry.clone()),
                    request: None,
                    connected: None,
                    answer: None,
                }),
                (Via::Proxy(_), Some(p)) => Some(ProxyReport {
                    url: p.url.to_string(),
                    credentials: Some(p.credentials_source()),
                    bypassed_by: None,
                    request: Some(format!("CONNECT {}", route.upstream)),
                    connected: None,
                    answer: None,
                }),
                _ => None,
            },
            dns: Vec::new(),
            connected: None,
            postgres: None,
            connect_errors: Vec::new(),
            tls: None,
            upstream_chain: Vec::new(),
            client_cert_requested: None,
            accepted_cas: Vec::new(),
            notes: Vec::new(),
            problems: Vec::new(),
        }
    }

    pub(super) fn finish(mut self) -> RouteReport {
        self.ok = self.problems.is_empty();
        self
    }

    pub(super) fn fail(mut self, problem: String) -> RouteReport {
        self.problems.push(problem);
        self.finish()
    }
}
