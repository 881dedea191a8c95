//! The operations settings of a route (issue 16): `--access-log`, `--reload-canary` and
//! `--pool-max-lifetime`, validated for the route's direction and mode.

use std::time::Duration;

use super::{Error, invalid, parse_duration};
use crate::cli::{AccessLog, RunArgs};

/// What a route does for operators beyond proxying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ops {
    /// `--access-log`: connection lines, request lines as well (http mode), or none. In tcp
    /// mode `request` is the same as `connection`: a connection is the unit there.
    pub access_log: AccessLog,
    /// `--reload-canary`: dial the upstream with a changed identity before publishing it.
    pub reload_canary: bool,
}

impl Ops {
    /// Whether the info-level connection lines are written (not `--access-log off`; failed
    /// connections are logged at warn whatever it says).
    pub fn connection_lines(&self) -> bool {
        self.access_log != AccessLog::Off
    }

    /// Whether http mode writes a line per request (`--access-log request`).
    pub fn request_lines(&self) -> bool {
        self.access_log == AccessLog::Request
    }
}

/// The route's `Ops`; `--reload-canary` is refused on an inbound route (it has no upstream to
/// try an identity on).
pub(super) fn parse(args: &RunArgs) -> Result<Ops, Error> {
    let o = &args.ops_args;
    if o.reload_canary && args.inbound_args.inbound {
        return Err(invalid(
            "--reload-canary",
            "true",
            "applies only to an outbound route: an inbound route has no upstream to try a \
             new identity on",
        ));
    }
    Ok(Ops {
        access_log: o.access_log,
        reload_canary: o.reload_canary,
    })
}

/// `--pool-max-lifetime`: `None` = forever (`0`).
pub(super) fn pool_max_lifetime(args: &RunArgs) -> Result<Option<Duration>, Error> {
    let value = &args.ops_args.pool_max_lifetime;
    let d = parse_duration("--pool-max-lifetime", value)?;
    // Below a second a pool would be rebuilt (a timer task each) many times a second, idle
    // or not, and hardly a request would find a pooled connection.
    if !d.is_zero() && d < Duration::from_secs(1) {
        return Err(invalid(
            "--pool-max-lifetime",
            value,
            "must be 0 (forever) or at least 1s",
        ));
    }
    Ok((!d.is_zero()).then_some(d))
}
