//! Tenant identifiers: the one validated name every layer uses for a tenant.
//! Knows nothing about storage, keys or HTTP; it only decides what a valid tenant id is.

use std::fmt;

/// Longest tenant id accepted, in bytes.
pub const MAX_TENANT_LEN: usize = 128;

/// A tenant id: 1 to 128 bytes of `[A-Za-z0-9._-]`.
///
/// The alphabet keeps ids safe in URL paths, file names, log lines and SQL without quoting, and
/// the length fits the one-byte length prefix in envelope and wrap AADs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

/// A string that is not a valid tenant id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tenant id must be 1 to 128 characters of A-Z a-z 0-9 . _ -")]
pub struct InvalidTenantId;

impl TenantId {
    /// Validates and wraps a tenant id.
    pub fn parse(s: &str) -> Result<Self, InvalidTenantId> {
        let ok = !s.is_empty()
            && s.len() <= MAX_TENANT_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(TenantId(s.to_owned()))
        } else {
            Err(InvalidTenantId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The length as the one byte used in AAD prefixes. Infallible: ids are at most 128 bytes.
    pub fn len_byte(&self) -> u8 {
        debug_assert!(self.0.len() <= MAX_TENANT_LEN);
        self.0.len() as u8
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "acme", "acme-prod_eu.1", &"x".repeat(128), "A.B-C_9"] {
            assert_eq!(TenantId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_bytes() {
        for bad in [
            "",
            &"x".repeat(129),
            "a/b",
            "a b",
            "a%2F",
            "é",
            "a\0",
            "..\\x",
            "a:b",
        ] {
            assert_eq!(TenantId::parse(bad), Err(InvalidTenantId), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_agrees_with_the_regex(s in "\\PC{0,140}") {
            let expected = !s.is_empty() && s.len() <= 128
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            prop_assert_eq!(TenantId::parse(&s).is_ok(), expected);
        }
    }
}
