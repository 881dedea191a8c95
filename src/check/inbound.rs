//! `check` on an inbound route: the server certificate, `--ca` and CRLs were loaded (and the
//! server configuration built) by the caller; here the authorization rule is put in words and
//! the target is dialled once, in plaintext, within `--connect-timeout`, the way the route
//! dials it.

use super::RouteReport;
use crate::config::Route;
use crate::proxy::inbound::{Refusal, TargetConn, dial};

/// Fill `r` for an inbound route: rule, target, one dial.
pub(super) async fn check(route: &Route, r: &mut RouteReport) {
    let Some(inbound) = route.inbound() else {
        return;
    };
    r.upstream = inbound.target.to_string();
    r.server_name = "-".into();
    if let Some(rule) = &route.tls.inbound {
        r.notes
            .push(format!("inbound: lets in {}", rule.describe()));
    }
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
