//! SPIFFE IDs as the SPIFFE specification writes them: `spiffe://TRUST-DOMAIN/PATH`, the trust
//! domain in lowercase letters, digits, `.`, `-`, `_`; each path segment non-empty, not `.` or
//! `..`, in letters, digits, `.`, `-`, `_`. No port, user, query or fragment.

/// The trust domain of a workload SPIFFE ID (one with a path), or why it is not one.
pub fn trust_domain(id: &str) -> Result<&str, &'static str> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or("a SPIFFE ID starts with spiffe:// (lowercase)")?;
    let (domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if domain.is_empty() {
        return Err("the trust domain is empty");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
    {
        return Err("the trust domain may hold only lowercase letters, digits, '.', '-' and '_'");
    }
    if path.is_empty() || path == "/" {
        return Err("a workload's SPIFFE ID has a path: spiffe://trust-domain/path");
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err("the path has an empty segment (// or a trailing /)");
        }
        if segment == "." || segment == ".." {
            return Err("the path may not hold . or .. segments");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err("the path may hold only letters, digits, '.', '-', '_' and '/'");
        }
    }
    Ok(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_ids() {
        assert_eq!(
            trust_domain("spiffe://example.org/ns/a/sa/b"),
            Ok("example.org")
        );
        assert_eq!(trust_domain("spiffe://td_1-x/w"), Ok("td_1-x"));
        for bad in [
            "",
            "https://example.org/a",
            "SPIFFE://example.org/a",
            "spiffe://",
            "spiffe:///a",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/a",
            "spiffe://example.org:443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/./a",
            "spiffe://example.org/a/..",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://example.org/a b",
        ] {
            assert!(trust_domain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
