//! Value parsers of the numeric flags. They live here, beside the flags, because clap calls
//! them; `config` checks the same ranges again for routes built from code.

use std::ops::RangeInclusive;

/// The range of `--max-connections`: each connection costs a task and two sockets, so a
/// million is already past what one process serves; the upper bound also keeps the value far
/// below what tokio's semaphore accepts (it panics above `usize::MAX >> 3`).
pub const MAX_CONNECTIONS: RangeInclusive<u64> = 1..=1_000_000;

/// The range of `--pool-max-idle` (idle upstream connections kept per route; 0 keeps none).
pub const POOL_MAX_IDLE: RangeInclusive<u64> = 0..=10_000;

/// The range of `--pool-max-connections` (upstream connections per route): beyond it the cap
/// would bound nothing.
pub const POOL_MAX_CONNECTIONS: RangeInclusive<u64> = 1..=100_000;

/// The range of `--allow-uid`: `u32::MAX` is `(uid_t)-1`, which names no user.
pub const ALLOW_UID: RangeInclusive<u64> = 0..=(u32::MAX as u64 - 1);

/// A whole number inside `range`; the message (clap puts the flag before it) says the range.
fn ranged(value: &str, range: &RangeInclusive<u64>) -> Result<u64, String> {
    let out_of_range = || {
        format!(
            "must be a whole number from {} to {}",
            range.start(),
            range.end()
        )
    };
    // Digits only: a sign or a huge number is out of range, not a different error.
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    v.parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(out_of_range)
}

/// clap value parser of `--max-connections`.
pub fn parse_max_connections(value: &str) -> Result<usize, String> {
    ranged(value, &MAX_CONNECTIONS).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--pool-max-idle`.
pub fn parse_pool_max_idle(value: &str) -> Result<usize, String> {
    ranged(value, &POOL_MAX_IDLE).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--pool-max-connections`.
pub fn parse_pool_max_connections(value: &str) -> Result<usize, String> {
    ranged(value, &POOL_MAX_CONNECTIONS).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// clap value parser of `--allow-uid`.
pub fn parse_uid(value: &str) -> Result<u32, String> {
    ranged(value, &ALLOW_UID).and_then(|n| u32::try_from(n).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_have_ranges() {
        assert_eq!(parse_max_connections("1"), Ok(1));
        assert_eq!(parse_max_connections("1000000"), Ok(1_000_000));
        for bad in [
            "0",
            "1000001",
            "-1",
            "+5",
            "",
            "2305843009213693952",
            "1e3",
            "99999999999999999999999",
        ] {
            let err = parse_max_connections(bad).unwrap_err();
            assert!(err.contains("from 1 to 1000000"), "{bad}: {err}");
        }
        assert_eq!(parse_pool_max_idle("0"), Ok(0));
        assert!(parse_pool_max_idle("10001").is_err());
        assert_eq!(parse_uid("4294967294"), Ok(u32::MAX - 1));
        assert!(parse_uid("4294967295").is_err());
    }
}
