//! What `check` found, one struct per part of the report: the text renderer and
//! `--format json` both read these, so a field added here shows up in both.

use serde::Serialize;

use super::cert::Summary;
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
    /// `HOST:PORT` as configured, before any resolution.
    pub upstream: String,
    /// The name sent in SNI and checked against the upstream's certificate.
    pub server_name: String,
    /// Whether the route passed: `problems` is empty.
    pub ok: bool,
    /// What we present to the upstream; `None` when the identity files could not be read.
    pub client_certificate: Option<ClientCertificate>,
    /// Where the upstream's chain must lead: `--ca FILE (...)` or the system trust store.
    pub trust: Option<String>,
    /// The egress proxy hop, when `--proxy` (or `HTTPS_PROXY`) is set for this route.
    pub proxy: Option<ProxyReport>,
    /// Every address the upstream's name resolved to (empty through a proxy: it resolves).
    pub dns: Vec<String>,
    /// The address the TCP connection was made to.
    pub connected: Option<String>,
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
        RouteReport {
            name: route.name.clone(),
            upstream: route.upstream.to_string(),
            server_name: server_name_str(route),
            ok: false,
            client_certificate: None,
            trust: None,
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
