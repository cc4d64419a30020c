//! Tenant key rings: which data-key versions a tenant has, which one seals, and the bounded,
//! zeroizing cache of unwrapped keys. Defines the storage port it needs (`KeyringStore`), which
//! the `store` engines implement; knows nothing about SQL or HTTP.

mod ring;

pub use ring::{Keyring, KeyringOptions};

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;

use crate::crypto::CryptoError;
use crate::providers::{ProviderError, RootId};
use crate::tenant::TenantId;

/// The state of one data-key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// The version new seals use; exactly one per tenant.
    Active,
    /// Still opens, no longer seals.
    DecryptOnly,
    /// Key material erased; nothing under it opens again.
    Destroyed,
}

impl KeyState {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "active" => Ok(KeyState::Active),
            "decrypt-only" => Ok(KeyState::DecryptOnly),
            "destroyed" => Ok(KeyState::Destroyed),
            other => Err(format!("unknown key state {other:?}")),
        }
    }
}

/// One data key version wrapped under one root.
#[derive(Clone, PartialEq, Eq)]
pub struct Wrapping {
    pub root: RootId,
    pub blob: Vec<u8>,
}

impl fmt::Debug for Wrapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wrapping({}, {} bytes)", self.root, self.blob.len())
    }
}

/// A stored data-key version: never the key itself, only its wraps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionRecord {
    pub version: u32,
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: i64,
    pub wrappings: Vec<Wrapping>,
}

/// A stored tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    pub tenant: TenantId,
    pub active_version: u32,
    /// Unix seconds.
    pub created_at: i64,
}

/// Errors of a storage engine, as the keyring sees them.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The engine cannot serve now (I/O error, database down, busy past the timeout).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data breaks an invariant (e.g. an unknown key state).
    #[error("store data is inconsistent: {0}")]
    Corrupt(String),
}

/// What the keyring needs from storage. Engines must make `create_tenant` atomic and
/// idempotent across processes: concurrent creators end with one tenant and one version.
#[async_trait]
pub trait KeyringStore: Send + Sync + 'static {
    async fn tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// Creates `tenant` with `first` as its active version, unless it exists already; returns
    /// the tenant as stored (the existing one if another creator won).
    async fn create_tenant(
        &self,
        tenant: &TenantId,
        created_at: i64,
        first: &KeyVersionRecord,
    ) -> Result<TenantRecord, StoreError>;

    async fn key_version(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Option<KeyVersionRecord>, StoreError>;

    /// All versions of a tenant, oldest first.
    async fn key_versions(&self, tenant: &TenantId) -> Result<Vec<KeyVersionRecord>, StoreError>;

    /// All tenants, by id.
    async fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError>;

    async fn health(&self) -> Result<(), StoreError>;
}

/// Errors of key-ring operations.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("tenant not found")]
    TenantNotFound,
    /// An open failed; deliberately says nothing about which check.
    #[error("decryption failed")]
    DecryptFailed,
    /// No configured root could unwrap a stored version (and none was merely unavailable).
    #[error("no configured root could unwrap key version {version}")]
    KeyUnwrapFailed { version: u32 },
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("internal error: {0}")]
    Internal(&'static str),
}
