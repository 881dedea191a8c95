//! `--protocol` of a route (issue 17): an in-band TLS start, valid on outbound tcp-mode routes
//! only, with the app-side deadline it needs.

use super::{Error, invalid, parse_duration};
use crate::cli::{Mode, RunArgs};

/// `--protocol`: an in-band TLS start belongs to a byte stream; an http-mode route's pool
/// speaks HTTP over TLS from the first byte.
pub(super) fn parse(args: &RunArgs) -> Result<crate::cli::Protocol, Error> {
    if args.mode == Mode::Http && args.protocol != crate::cli::Protocol::None {
        return Err(invalid(
            "--protocol",
            args.protocol.as_str(),
            "applies only to tcp mode: an in-band TLS start (such as PostgreSQL's SSLRequest) \
             belongs to a byte stream, and http mode speaks HTTP over TLS from the first byte",
        ));
    }
    if args.protocol == crate::cli::Protocol::Postgres
        && parse_duration("--header-timeout", &args.header_timeout)?.is_zero()
    {
        return Err(invalid(
            "--header-timeout",
            "0",
            "must be above 0 with --protocol postgres: it bounds the wait for the app's first \
             message",
        ));
    }
    Ok(args.protocol)
}
