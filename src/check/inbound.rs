//! `check` on an inbound route: the server certificate, `--ca` and CRLs were loaded (and the
//! server configuration built) by the caller; here the authorization rule is put in words and
//! the target is dialled once, in plaintext, within `--connect-timeout`.

use tokio::net::{TcpStream, UnixStream};

use super::RouteReport;
use crate::config::{Route, Target};

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
    let dialled = match &inbound.target {
        Target::Unix(path) => tokio::time::timeout(limit, UnixStream::connect(path))
            .await
            .map(|r| r.map(|_| path.display().to_string())),
        Target::Tcp(u) => {
            let addr = (u.host.clone(), u.port);
            tokio::time::timeout(limit, TcpStream::connect(addr))
                .await
                .map(|r| r.and_then(|s| s.peer_addr()).map(|a| a.to_string()))
        }
    };
    match dialled {
        Ok(Ok(at)) => r.connected = Some(at),
        Ok(Err(e)) => r.problems.push(format!(
            "cannot connect to the target {}: {e}: is the app running?",
            inbound.target
        )),
        Err(_) => r.problems.push(format!(
            "the target {} did not answer within --connect-timeout {}",
            inbound.target,
            humantime::format_duration(limit)
        )),
    }
}
