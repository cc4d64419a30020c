//! Who is calling and what they may do. Unix-socket callers are identified by their peer
//! uid/gid (SO_PEERCRED), TCP callers by bearer tokens of which only SHA-256 hashes are kept and
//! compared in constant time. Deny by default. Knows nothing about keys or routes.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::tenant::TenantId;

/// An action a principal may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    Seal,
    Open,
    Datakey,
    DatakeyUnwrap,
    /// Re-seal under the active version; the caller never sees the plaintext.
    Rewrap,
    KeysRead,
    AdminRotate,
    AdminRetire,
    /// Request and approve destruction of key material (two distinct principals needed).
    AdminShred,
    Tokenize,
    /// Values of tokens in full.
    Reveal,
    /// Values of tokens masked to their last four characters only.
    RevealMasked,
    TokensDelete,
    /// Bind a tenant to its own root (a customer-managed key) and move its keys there.
    AdminRoot,
}

impl Operation {
    pub const ALL: [Operation; 14] = [
        Operation::Seal,
        Operation::Open,
        Operation::Datakey,
        Operation::DatakeyUnwrap,
        Operation::Rewrap,
        Operation::KeysRead,
        Operation::AdminRotate,
        Operation::AdminRetire,
        Operation::AdminShred,
        Operation::Tokenize,
        Operation::Reveal,
        Operation::RevealMasked,
        Operation::TokensDelete,
        Operation::AdminRoot,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Operation::Seal => "seal",
            Operation::Open => "open",
            Operation::Datakey => "datakey",
            Operation::DatakeyUnwrap => "datakey.unwrap",
            Operation::Rewrap => "rewrap",
            Operation::KeysRead => "keys.read",
            Operation::AdminRotate => "admin.rotate",
            Operation::AdminRetire => "admin.retire",
            Operation::AdminShred => "admin.shred",
            Operation::Tokenize => "tokenize",
            Operation::Reveal => "reveal",
            Operation::RevealMasked => "reveal.masked",
            Operation::TokensDelete => "tokens.delete",
            Operation::AdminRoot => "admin.root",
        }
    }
}

impl FromStr for Operation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Operation::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Operation::ALL.iter().map(|o| o.as_str()).collect();
                format!(
                    "unknown operation {s:?} (known: {}, or \"*\")",
                    known.join(", ")
                )
            })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant pattern: a tenant id in which `*` matches any run of characters (`acme-*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPattern(String);

impl TenantPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'*'));
        if ok {
            Ok(TenantPattern(s.to_owned()))
        } else {
            Err(format!(
                "tenant pattern {s:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ - *"
            ))
        }
    }

    pub fn matches(&self, tenant: &TenantId) -> bool {
        glob(self.0.as_bytes(), tenant.as_bytes())
    }
}

/// `*`-only glob match, iterative with one backtrack point (linear in practice, no recursion).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// A configured caller identity and its grants.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub unix_uids: Vec<u32>,
    pub unix_gids: Vec<u32>,
    /// SHA-256 of each bearer token that identifies this principal.
    pub token_hashes: Vec<[u8; 32]>,
    pub tenants: Vec<TenantPattern>,
    pub operations: BTreeSet<Operation>,
}

impl Principal {
    pub fn may(&self, op: Operation, tenant: &TenantId) -> bool {
        self.operations.contains(&op) && self.tenants.iter().any(|p| p.matches(tenant))
    }

    /// Whether the principal holds `op` on any tenant at all.
    pub fn holds(&self, op: Operation) -> bool {
        self.operations.contains(&op)
    }
}

/// Where a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Tcp(SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid, gid, pid } => match pid {
                Some(pid) => write!(f, "unix:uid={uid},gid={gid},pid={pid}"),
                None => write!(f, "unix:uid={uid},gid={gid}"),
            },
            Peer::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Resolves callers to principals.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    principals: Vec<Principal>,
}

/// Shortest bearer token accepted; `kms-sidecar token new` makes 47-character tokens.
pub const MIN_TOKEN_LEN: usize = 16;

/// A token worth hashing: long enough, and visible ASCII only (no spaces, no control bytes).
pub fn plausible_token(token: &str) -> bool {
    token.len() >= MIN_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Hex SHA-256 of a bearer token, as the config stores it.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    pub fn new(principals: Vec<Principal>) -> Self {
        Authenticator { principals }
    }

    /// A bearer token wins when present (on either transport); otherwise Unix peers are matched
    /// by uid, then gid. TCP without a token, or any unknown token, is `Unauthenticated`; a Unix
    /// peer matching no principal is `Forbidden` (it is authenticated, just not allowed).
    pub fn authenticate(
        &self,
        peer: &Peer,
        authorization: Option<&[u8]>,
    ) -> Result<&Principal, ApiError> {
        if let Some(value) = authorization {
            let token = value
                .strip_prefix(b"Bearer ")
                .ok_or(ApiError::Unauthenticated)?;
            let token =
                std::str::from_utf8(token.trim_ascii()).map_err(|_| ApiError::Unauthenticated)?;
            if !plausible_token(token) {
                return Err(ApiError::Unauthenticated);
            }
            return self.by_token(token).ok_or(ApiError::Unauthenticated);
        }
        match peer {
            Peer::Unix { uid, gid, .. } => self
                .principals
                .iter()
                .find(|p| p.unix_uids.contains(uid))
                .or_else(|| self.principals.iter().find(|p| p.unix_gids.contains(gid)))
                .ok_or(ApiError::Forbidden),
            Peer::Tcp(_) => Err(ApiError::Unauthenticated),
        }
    }

    /// Compares the token's hash with every configured hash, without stopping at a match, so the
    /// time taken does not depend on which principal (if any) it belongs to.
    fn by_token(&self, token: &str) -> Option<&Principal> {
        let presented = token_sha256(token);
        let mut found = None;
        for p in &self.principals {
            for h in &p.token_hashes {
                if bool::from(h.ct_eq(&presented)) && found.is_none() {
                    found = Some(p);
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn principal(name: &str, token: &str, tenants: &[&str], ops: &[Operation]) -> Principal {
        Principal {
            name: name.into(),
            unix_uids: vec![],
            unix_gids: vec![],
            token_hashes: vec![token_sha256(token)],
            tenants: tenants
                .iter()
                .map(|p| TenantPattern::parse(p).unwrap())
                .collect(),
            operations: ops.iter().copied().collect(),
        }
    }

    #[test]
    fn patterns_match_as_globs() {
        let p = |s: &str| TenantPattern::parse(s).unwrap();
        assert!(p("*").matches(&t("anything")));
        assert!(p("acme-*").matches(&t("acme-eu")));
        assert!(!p("acme-*").matches(&t("acme")));
        assert!(p("*-prod").matches(&t("x-prod")));
        assert!(p("a*b*c").matches(&t("aXXbYYc")));
        assert!(!p("a*b*c").matches(&t("aXXbYY")));
        assert!(p("exact").matches(&t("exact")));
        assert!(!p("exact").matches(&t("exactly")));
        assert!(TenantPattern::parse("a/b").is_err());
        assert!(TenantPattern::parse("").is_err());
    }

    #[test]
    fn tokens_resolve_to_their_principal_only() {
        let auth = Authenticator::new(vec![
            principal("a", "tok-a-0123456789abc", &["a"], &[Operation::Seal]),
            principal("b", "tok-b-0123456789abc", &["b"], &[Operation::Open]),
        ]);
        let tcp = Peer::Tcp("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            auth.authenticate(&tcp, Some(b"Bearer tok-b-0123456789abc"))
                .unwrap()
                .name,
            "b"
        );
        assert_eq!(
            auth.authenticate(&tcp, Some(b"Bearer tok-c-0123456789abc"))
                .unwrap_err(),
            ApiError::Unauthenticated
        );
        assert_eq!(
            auth.authenticate(&tcp, Some(b"Basic tok-a-0123456789abc"))
                .unwrap_err(),
            ApiError::Unauthenticated
        );
        assert_eq!(
            auth.authenticate(&tcp, None).unwrap_err(),
            ApiError::Unauthenticated
        );
        // Blank and short tokens never reach the hash comparison, even if such a hash is configured.
        let weak = Authenticator::new(vec![principal("weak", "", &["*"], &[Operation::Seal])]);
        for header in [
            &b"Bearer "[..],
            b"Bearer \xc2\xa0",
            b"Bearer    ",
            b"Bearer short",
        ] {
            assert_eq!(
                weak.authenticate(&tcp, Some(header)).unwrap_err(),
                ApiError::Unauthenticated
            );
        }
    }

    #[test]
    fn unix_peers_match_by_uid_then_gid_else_forbidden() {
        let mut by_uid = principal("uid", "x", &["*"], &[Operation::Seal]);
        by_uid.unix_uids = vec![1000];
        let mut by_gid = principal("gid", "y", &["*"], &[Operation::Seal]);
        by_gid.unix_gids = vec![50];
        let auth = Authenticator::new(vec![by_gid, by_uid]);
        let peer = |uid, gid| Peer::Unix {
            uid,
            gid,
            pid: None,
        };
        assert_eq!(
            auth.authenticate(&peer(1000, 50), None).unwrap().name,
            "uid"
        );
        assert_eq!(auth.authenticate(&peer(7, 50), None).unwrap().name, "gid");
        assert_eq!(
            auth.authenticate(&peer(7, 7), None).unwrap_err(),
            ApiError::Forbidden
        );
    }

    #[test]
    fn grants_need_both_operation_and_tenant() {
        let p = principal("p", "t", &["acme-*"], &[Operation::Seal]);
        assert!(p.may(Operation::Seal, &t("acme-1")));
        assert!(!p.may(Operation::Open, &t("acme-1")));
        assert!(!p.may(Operation::Seal, &t("other")));
    }

    #[test]
    fn operations_parse_by_name() {
        for op in Operation::ALL {
            assert_eq!(op.as_str().parse::<Operation>().unwrap(), op);
        }
        assert!("admin".parse::<Operation>().is_err());
    }

    proptest! {
        #[test]
        fn star_matches_everything_and_literal_matches_itself(s in "[A-Za-z0-9._-]{1,128}") {
            let tenant = t(&s);
            prop_assert!(TenantPattern::parse("*").unwrap().matches(&tenant));
            prop_assert!(TenantPattern::parse(&s).unwrap().matches(&tenant));
        }
    }
}
