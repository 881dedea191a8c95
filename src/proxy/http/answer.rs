//! The proxy's own answers to the app when the upstream could not serve, and how a client
//! error is traced back to its cause.

use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};

use super::Body;
use super::pool::PoolFull;
use super::target::TargetFailure;
use crate::failure::OwnAnswer;
use crate::failure::{self, Class, Failure};
use crate::proxy::inbound::Refusal;

/// What the app is told about a class of upstream failure: a fixed sentence, so no resolved
/// address, file path or text from the peer or a proxy reaches the app (the warn line has them).
fn sentence(class: Class) -> &'static str {
    match class {
        Class::Dns => "the upstream name could not be resolved",
        Class::Refused => "the upstream refused the connection",
        Class::Unreachable => "the upstream address is unreachable",
        Class::Timeout => "the upstream did not answer within --connect-timeout",
        Class::UnknownIssuer => "the upstream certificate does not lead to a trusted CA",
        Class::NameMismatch => "the upstream certificate does not name the expected server",
        Class::Expired => "the upstream certificate has expired",
        Class::NotYetValid => "the upstream certificate is not valid yet",
        Class::ClientCertRejected => "the upstream rejected this proxy's client certificate",
        Class::Revoked => "the upstream certificate is revoked",
        Class::UriSanMismatch => "the upstream certificate lacks every required URI SAN",
        Class::PinMismatch => "the upstream certificate matches no pinned key",
        Class::Protocol => "the upstream broke the TLS or HTTP protocol",
        Class::Reset => "the upstream closed or reset the connection",
        Class::Io => "the connection to the upstream failed",
        Class::Idle => "the upstream connection was idle too long",
        Class::Drain => "the proxy is shutting down",
        Class::ProxyUnreachable => "the egress proxy cannot be reached",
        Class::ProxyAuth => "the egress proxy refused the credentials",
        Class::ProxyRefused => "the egress proxy refused the tunnel",
        Class::ProxyProtocol => "the egress proxy did not answer in HTTP",
        Class::ProxyTls => "the TLS handshake with the egress proxy failed",
        Class::NoIdentity => "this proxy has no identity from the Workload API yet",
        Class::NoTrustBundle => "the upstream's SPIFFE trust domain has no trust bundle",
    }
}

/// The proxy's own answer: `mtls-sidecar: <reason>: <sentence>`, one line of plain text.
pub(super) fn own_response(
    code: StatusCode,
    reason: &'static str,
    sentence: &str,
) -> Response<Body> {
    let body = format!("mtls-sidecar: {reason}: {sentence}\n");
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    // For the request's access line (`--access-log request`) and its span's `error.type`.
    r.extensions_mut().insert(OwnAnswer(reason));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to the app when the upstream could not serve: 504 for a connect timeout, 502
/// otherwise.
pub(super) fn failure_response(f: &Failure) -> Response<Body> {
    let code = if f.class == Class::Timeout {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    own_response(code, f.class.reason(), sentence(f.class))
}

/// The answer to the client of an inbound route when the target could not be reached: 504
/// when it did not answer within `--connect-timeout`, 502 otherwise.
pub(super) fn target_response(refusal: Refusal) -> Response<Body> {
    let (code, sentence) = match refusal {
        Refusal::TargetTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "the target did not answer within --connect-timeout",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "the target refused the connection or cannot be resolved",
        ),
    };
    own_response(code, refusal.reason(), sentence)
}

/// Why a request got no upstream answer.
pub(super) enum Unserved {
    Failed(Failure),
    PoolFull(String),
    /// An inbound route's target could not be reached.
    Target(TargetFailure),
}

/// Find our classified failure (from the connector) or an I/O cause in a client error.
pub(super) fn classify(e: &(dyn std::error::Error + 'static), server_name: &str) -> Unserved {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(f) = err.downcast_ref::<Failure>() {
            return Unserved::Failed(f.clone());
        }
        if let Some(t) = err.downcast_ref::<TargetFailure>() {
            return Unserved::Target(TargetFailure {
                refusal: t.refusal,
                message: t.message.clone(),
            });
        }
        if let Some(p) = err.downcast_ref::<PoolFull>() {
            return Unserved::PoolFull(p.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Unserved::Failed(failure::classify_io(io, server_name));
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return Unserved::Failed(Failure::new(
                Class::Reset,
                format!("the upstream closed the connection: {h}"),
            ));
        }
        cur = err.source();
    }
    Unserved::Failed(Failure::new(
        Class::Protocol,
        format!("upstream HTTP error: {e}"),
    ))
}
