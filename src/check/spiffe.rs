//! `check` on a route with `--spiffe`: ask the Workload API once, within `--connect-timeout`, for
//! the workload's X.509-SVIDs and trust bundles; describe the SVID the route would use and every
//! trust domain held; and say in plain words why nothing came ("waiting for the Workload API")
//! or why a peer cannot be verified ("no bundle for trust domain X").
//!
//! Written against the `spiffe` crate's one-shot client: `check` needs one answer, not the
//! streaming, reconnecting source `run` keeps.

use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use spiffe::{TrustDomain, WorkloadApiClient, WorkloadApiError, X509BundleSet, X509Svid};

use super::cert::Summary;
use crate::failure::escape;
use crate::tls::cert::{CertInfo, rfc3339};

/// What the Workload API sent, reduced to what `check` shows and dials with.
pub struct Fetched {
    /// The SVID the route uses: `--spiffe-id`'s, or the first one sent.
    pub svid: Arc<X509Svid>,
    /// Every SPIFFE ID the API offered this workload, in the order sent.
    pub offered: Vec<String>,
    /// Every trust domain's bundle, federated ones included.
    pub bundles: Arc<X509BundleSet>,
}

/// Why no SVID came: each is "waiting for the Workload API" to `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// The socket's path cannot be used as a Workload API address.
    BadPath(String),
    /// No file at the socket's path.
    Missing(PathBuf),
    /// Something other than a socket at that path.
    NotSocket(PathBuf),
    /// A socket file, but nothing listens on it.
    Refused(PathBuf),
    /// This process may not open the socket.
    NoAccess(PathBuf),
    /// Any other error connecting to the socket.
    Connect { path: PathBuf, why: String },
    /// No answer within `--connect-timeout`.
    Timeout,
    /// The API answered PermissionDenied: no identity for this workload (or it was withdrawn).
    Denied(String),
    /// `--spiffe-id` names an SVID the API did not offer.
    NotOffered {
        wanted: String,
        offered: Vec<String>,
    },
    /// Any other answer of the API (an error status, an empty or malformed answer).
    Api(String),
}

/// The socket as the `spiffe` crate's address (`unix:/abs/path`), and its absolute path (a
/// relative one is taken from the working directory).
fn endpoint(path: &Path) -> Result<(String, PathBuf), Wait> {
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| Wait::BadPath(format!("cannot resolve a relative path: {e}")))?
            .join(path)
    };
    let text = path
        .to_str()
        .ok_or_else(|| Wait::BadPath("the path is not valid UTF-8".into()))?;
    Ok((format!("unix:{text}"), path))
}

/// Open the socket once ourselves, so that a missing file, a refused connection or a permission
/// problem is told apart (the gRPC layer folds them into one transport error).
async fn probe(path: &Path) -> Result<(), Wait> {
    match tokio::fs::metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Wait::Missing(path.to_owned()));
        }
        Ok(m) if !m.file_type().is_socket() => return Err(Wait::NotSocket(path.to_owned())),
        _ => {}
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::NotFound => Wait::Missing(path.to_owned()),
            std::io::ErrorKind::ConnectionRefused => Wait::Refused(path.to_owned()),
            std::io::ErrorKind::PermissionDenied => Wait::NoAccess(path.to_owned()),
            _ => Wait::Connect {
                path: path.to_owned(),
                why: e.to_string(),
            },
        }),
    }
}

/// Ask the Workload API at `socket` for the SVIDs and bundles, all within `limit`.
pub async fn fetch(socket: &Path, id: Option<&str>, limit: Duration) -> Result<Fetched, Wait> {
    let (address, path) = endpoint(socket)?;
    let ask = async {
        probe(&path).await?;
        let client = WorkloadApiClient::connect_to(&address)
            .await
            .map_err(|e| api_wait(e, &path))?;
        client
            .fetch_x509_context()
            .await
            .map_err(|e| api_wait(e, &path))
    };
    let context = tokio::time::timeout(limit, ask)
        .await
        .map_err(|_| Wait::Timeout)??;
    let offered: Vec<String> = context
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    let svid = match id {
        Some(wanted) => context
            .svids()
            .iter()
            .find(|s| s.spiffe_id().to_string() == wanted)
            .cloned()
            .ok_or_else(|| Wait::NotOffered {
                wanted: wanted.to_owned(),
                offered: offered.clone(),
            })?,
        None => context
            .default_svid()
            .cloned()
            .ok_or_else(|| Wait::Api("the answer holds no SVID".into()))?,
    };
    Ok(Fetched {
        svid,
        offered,
        bundles: context.bundle_set().clone(),
    })
}

fn api_wait(e: WorkloadApiError, path: &Path) -> Wait {
    match e {
        WorkloadApiError::NoIdentityIssued => Wait::Denied("no identity issued".into()),
        WorkloadApiError::PermissionDenied(m) => Wait::Denied(escape(&m).into_owned()),
        WorkloadApiError::Transport(t) => Wait::Connect {
            path: path.to_owned(),
            why: escape(&t.to_string()).into_owned(),
        },
        other => Wait::Api(escape(&other.to_string()).into_owned()),
    }
}

/// The problem line for a route whose Workload API gave no SVID: what `run` would be doing
/// (waiting, with `/readyz` 503) and what to look at.
pub fn explain_wait(wait: &Wait, socket: &str, limit: Duration) -> String {
    let limit = humantime::format_duration(limit);
    let head = "waiting for the Workload API";
    let mount = "is the SPIRE agent (or another Workload API server) running on this node, and \
                 is its socket directory mounted into this container (the SPIFFE CSI driver or \
                 a hostPath)?";
    match wait {
        Wait::BadPath(why) => format!(
            "the Workload API socket {} cannot be used: {why}",
            escape(socket)
        ),
        Wait::Missing(p) => format!("{head}: the socket {} does not exist: {mount}", p.display()),
        Wait::NotSocket(p) => format!(
            "{head}: {} is not a socket: check --spiffe-socket or SPIFFE_ENDPOINT_SOCKET",
            p.display()
        ),
        Wait::Refused(p) => format!(
            "{head}: nothing listens on the socket {} (connection refused): the agent has \
             stopped or is restarting, and left its socket file behind",
            p.display()
        ),
        Wait::NoAccess(p) => format!(
            "{head}: this process may not open the socket {} (permission denied): the socket \
             or its directory must be accessible to this user",
            p.display()
        ),
        Wait::Connect { path, why } => format!(
            "{head}: cannot talk to the Workload API at {}: {why}",
            path.display()
        ),
        Wait::Timeout => format!(
            "{head}: no answer from {} within --connect-timeout {limit}: the agent may still \
             be starting or attesting this workload; run would keep /readyz at 503 and retry",
            escape(socket)
        ),
        Wait::Denied(why) => format!(
            "{head}: it issues no identity to this workload (PermissionDenied: {why}): no \
             registration entry matches this workload's selectors (for SPIRE on Kubernetes: a \
             ClusterSPIFFEID or entry for this pod's namespace, service account or labels), \
             or its entry was deleted; run would stay not ready and refuse new connections \
             until an SVID is issued"
        ),
        Wait::NotOffered { wanted, offered } => format!(
            "the Workload API offers this workload {} but not --spiffe-id {}: fix --spiffe-id, \
             or register that ID for this workload",
            if offered.is_empty() {
                "no SVID".into()
            } else {
                offered.join(", ")
            },
            escape(wanted)
        ),
        Wait::Api(why) => format!("{head}: it answered with an error: {why}"),
    }
}

/// The SPIFFE ID and trust domain named by a certificate's URI SAN, if it carries one.
pub fn peer_id(der: &CertificateDer<'_>) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => {
            let id = spiffe::SpiffeId::new(u).ok()?;
            Some((id.to_string(), id.trust_domain_name().to_owned()))
        }
        _ => None,
    })
}

/// The problem line for a peer whose trust domain has no bundle: its chain cannot be verified
/// by any bundle (never by another domain's), so it is refused.
pub fn no_bundle(peer: &str, id: &str, domain: &str, held: &[String]) -> String {
    format!(
        "no bundle for trust domain {}: the {peer} presented {} but the Workload API holds \
         bundles only for {}; a peer is verified only against its own trust domain's bundle, \
         so it is refused: federate the two trust domains in SPIRE and list {} in this \
         workload's federatesWith, or check that this is the peer you meant",
        escape(domain),
        escape(id),
        if held.is_empty() {
            "no trust domain".into()
        } else {
            held.join(", ")
        },
        escape(domain)
    )
}

/// The SPIFFE part of a route's report: where the API is, the SVID, the bundles.
#[derive(Debug, Serialize)]
pub struct SpiffeReport {
    /// The Workload API socket used (`--spiffe-socket` or `SPIFFE_ENDPOINT_SOCKET`).
    pub socket: String,
    /// The SVID the route presents; `null` when none came.
    pub svid: Option<SvidReport>,
    /// Every SPIFFE ID the API offered this workload (`--spiffe-id` picks among them).
    pub offered: Vec<String>,
    /// One entry per trust domain whose bundle the API sent, federated ones included.
    pub bundles: Vec<BundleReport>,
}

impl SpiffeReport {
    /// The report of a route whose Workload API sent nothing.
    pub fn socket_only(socket: &str) -> SpiffeReport {
        SpiffeReport {
            socket: escape(socket).into_owned(),
            svid: None,
            offered: Vec::new(),
            bundles: Vec::new(),
        }
    }
}

/// The SVID a route presents.
#[derive(Debug, Serialize)]
pub struct SvidReport {
    /// Its SPIFFE ID (the leaf's URI SAN).
    pub spiffe_id: String,
    /// The leaf's subject, issuer, SANs and validity, flattened into this object.
    #[serde(flatten)]
    pub cert: Summary,
    /// How long until it expires, in hours and minutes (SVIDs live about an hour).
    pub expires_in: String,
    /// How many certificates the chain holds, leaf first.
    pub chain_length: usize,
}

/// One trust domain's bundle.
#[derive(Debug, Serialize)]
pub struct BundleReport {
    /// The trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// How many CA certificates (authorities) it holds.
    pub authorities: usize,
    /// The earliest not-after among them, RFC 3339, UTC.
    pub earliest_not_after: Option<String>,
    /// That date in words: `expires in 3 h 12 min` or `expired 2 days ago`.
    pub earliest_validity: Option<String>,
}

/// `59 min`, `3 h 12 min`, `6 days`: the time left, at the scale an SVID lives.
pub fn short_duration(secs: i64) -> String {
    let secs = secs.max(0);
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3_600 => format!("{} min", s / 60),
        s if s < 2 * 86_400 => format!("{} h {} min", s / 3_600, s % 3_600 / 60),
        s => format!("{} days", s / 86_400),
    }
}

/// `expires in 59 min`, `expired 3 min ago`, `not valid until ...`.
pub fn validity(not_before: i64, not_after: i64, now: i64) -> String {
    if now > not_after {
        format!("expired {} ago", short_duration(now - not_after))
    } else if now < not_before {
        format!(
            "not valid until {} (in {})",
            rfc3339(not_before),
            short_duration(not_before - now)
        )
    } else {
        format!("expires in {}", short_duration(not_after - now))
    }
}

/// Describe what the API sent; problems (an expired SVID or bundle) go to `problems`.
pub fn describe(socket: &str, f: &Fetched, now: i64, problems: &mut Vec<String>) -> SpiffeReport {
    let chain = f.svid.cert_chain();
    let leaf = CertificateDer::from(chain[0].as_bytes());
    let svid = Summary::parse(&leaf, now).map(|mut cert| {
        cert.validity = validity(cert.not_before_unix, cert.not_after_unix, now);
        if cert.expired(now) || cert.not_yet_valid(now) {
            problems.push(format!(
                "the Workload API's SVID {} {}: check this machine's clock and the agent's",
                f.svid.spiffe_id(),
                cert.validity
            ));
        }
        SvidReport {
            spiffe_id: f.svid.spiffe_id().to_string(),
            expires_in: short_duration(cert.not_after_unix - now),
            cert,
            chain_length: chain.len(),
        }
    });
    let mut bundles: Vec<BundleReport> = f
        .bundles
        .iter()
        .map(|(td, b)| bundle_report(td, b.authorities(), now))
        .collect();
    bundles.sort_by(|a, b| a.trust_domain.cmp(&b.trust_domain));
    SpiffeReport {
        socket: escape(socket).into_owned(),
        svid,
        offered: f.offered.clone(),
        bundles,
    }
}

fn bundle_report(td: &TrustDomain, authorities: &[spiffe::Certificate], now: i64) -> BundleReport {
    let earliest = authorities
        .iter()
        .filter_map(|c| CertInfo::parse(&CertificateDer::from(c.as_bytes())))
        .map(|i| (i.not_before, i.not_after))
        .min_by_key(|(_, after)| *after);
    BundleReport {
        trust_domain: td.to_string(),
        authorities: authorities.len(),
        earliest_not_after: earliest.map(|(_, after)| rfc3339(after)),
        earliest_validity: earliest.map(|(before, after)| validity(before, after, now)),
    }
}

/// The trust domains held, for the "no bundle" explanation.
pub fn held(bundles: &X509BundleSet) -> Vec<String> {
    let mut held: Vec<String> = bundles.iter().map(|(td, _)| td.to_string()).collect();
    held.sort();
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_socket_path_is_made_absolute() {
        assert_eq!(
            endpoint(Path::new("/run/spire/agent.sock")).unwrap(),
            (
                "unix:/run/spire/agent.sock".into(),
                PathBuf::from("/run/spire/agent.sock")
            )
        );
        assert!(endpoint(Path::new("rel.sock")).unwrap().1.is_absolute());
    }

    #[tokio::test]
    async fn a_missing_socket_is_told_apart_from_a_refused_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("agent.sock");
        let socket = missing.display().to_string();
        let limit = Duration::from_secs(5);
        let wait = fetch(&missing, None, limit).await.err().unwrap();
        assert_eq!(wait, Wait::Missing(missing.clone()));
        let text = explain_wait(&wait, &socket, limit);
        assert!(
            text.starts_with("waiting for the Workload API: the socket"),
            "{text}"
        );
        assert!(text.contains("does not exist"), "{text}");

        // A socket file nobody listens on: bind, then drop the listener (the file stays).
        drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
        let wait = fetch(&missing, None, limit).await.err().unwrap();
        assert_eq!(wait, Wait::Refused(missing.clone()));
        assert!(explain_wait(&wait, &socket, limit).contains("connection refused"));

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let wait = fetch(&file, None, limit).await.err().unwrap();
        assert_eq!(wait, Wait::NotSocket(file));
    }

    #[tokio::test]
    async fn a_silent_socket_times_out_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // Accepts connections (the kernel's backlog) and never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let limit = Duration::from_millis(300);
        let start = std::time::Instant::now();
        let wait = fetch(&path, None, limit).await.err().unwrap();
        assert_eq!(wait, Wait::Timeout);
        assert!(start.elapsed() < Duration::from_secs(3));
        let text = explain_wait(&wait, &path.display().to_string(), limit);
        assert!(text.contains("no answer from"), "{text}");
        assert!(text.contains("within --connect-timeout 300ms"), "{text}");
    }

    #[test]
    fn permission_denied_is_explained_as_no_identity() {
        let path = Path::new("/s");
        let w = api_wait(WorkloadApiError::PermissionDenied("nope".into()), path);
        let text = explain_wait(&w, "/s", Duration::from_secs(1));
        assert!(
            text.contains("issues no identity to this workload"),
            "{text}"
        );
        assert!(text.contains("PermissionDenied: nope"), "{text}");
        assert!(matches!(
            api_wait(WorkloadApiError::NoIdentityIssued, path),
            Wait::Denied(_)
        ));
    }

    #[test]
    fn an_unoffered_spiffe_id_lists_the_offered_ones() {
        let w = Wait::NotOffered {
            wanted: "spiffe://a.test/x".into(),
            offered: vec!["spiffe://a.test/y".into(), "spiffe://a.test/z".into()],
        };
        let text = explain_wait(&w, "/s", Duration::from_secs(1));
        assert!(
            text.contains(
                "offers this workload spiffe://a.test/y, spiffe://a.test/z but not \
                 --spiffe-id spiffe://a.test/x"
            ),
            "{text}"
        );
    }

    #[test]
    fn no_bundle_names_the_domain_and_what_is_held() {
        let text = no_bundle(
            "upstream",
            "spiffe://other.test/svc",
            "other.test",
            &["a.test".into()],
        );
        assert!(
            text.starts_with("no bundle for trust domain other.test:"),
            "{text}"
        );
        assert!(text.contains("holds bundles only for a.test"), "{text}");
        assert!(text.contains("spiffe://other.test/svc"), "{text}");
        assert!(text.contains("federate"), "{text}");
    }

    #[test]
    fn durations_at_the_scale_of_an_svid() {
        assert_eq!(short_duration(59), "59 s");
        assert_eq!(short_duration(59 * 60 + 5), "59 min");
        assert_eq!(short_duration(3 * 3600 + 12 * 60), "3 h 12 min");
        assert_eq!(short_duration(6 * 86_400 + 5), "6 days");
        assert_eq!(validity(0, 100, 200), "expired 1 min ago");
        assert_eq!(validity(0, 3_600, 0), "expires in 1 h 0 min");
    }
}
