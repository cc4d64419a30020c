//! Tenant key rings: which data-key versions a tenant has, which one seals, and the bounded,
//! zeroizing cache of unwrapped keys. Defines the storage port it needs (`KeyringStore`), which
//! the `store` engines implement; knows nothing about SQL or HTTP.

mod cache;
mod rewrap;
mod ring;

pub use rewrap::{RewrapPlan, RewrapSummary, rewrap_roots};
pub(crate) use ring::unix_now;
pub use ring::{IssuedDataKey, Keyring, KeyringOptions, RootMove, TenantKeys};

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

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
    /// Opens of versions below this fail with `key_version_retired`.
    pub min_decrypt_version: u32,
    /// Unix seconds at which the tenant was shredded; a shredded tenant is a tombstone that
    /// auto-creation never brings back.
    pub destroyed_at: Option<i64>,
    /// The tenant's own root (a customer-managed key, BYOK): its new versions are wrapped under
    /// this root alone. `None`: under every configured root.
    pub root: Option<RootId>,
}

/// What a key-ring mutation did, as recorded for other sidecars sharing the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEventKind {
    Rotated,
    Retired,
    Shredded,
    Rewrapped,
    /// The tenant was bound to another root.
    RootChanged,
}

impl KeyEventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyEventKind::Rotated => "rotated",
            KeyEventKind::Retired => "retired",
            KeyEventKind::Shredded => "shredded",
            KeyEventKind::Rewrapped => "rewrapped",
            KeyEventKind::RootChanged => "root-changed",
        }
    }
}

/// One entry of the store's change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEvent {
    pub seq: i64,
    pub tenant: TenantId,
    pub kind: String,
}

/// What a store's change subscription tells the key ring: which cached state to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChange {
    /// Another process (or this one) changed this tenant's keys: drop its cache entries.
    Tenant(TenantId),
    /// Changes may have been missed (the subscription was (re)established): drop everything.
    All,
}

/// How many changes may wait in a subscription before the store waits for the key ring.
const CHANGE_BACKLOG: usize = 1024;

/// Outcome of a conditional rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The new version is active; the old one is decrypt-only.
    Rotated(TenantRecord),
    /// Another rotation won: the active version was no longer the expected one.
    Conflict(TenantRecord),
}

/// What a pending four-eyes approval would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShredTarget {
    Tenant,
    Version(u32),
}

/// State of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    Pending,
    Executed,
}

impl ApprovalState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Executed => "executed",
        }
    }
}

/// A request to destroy key material, waiting for a second admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub id: String,
    pub tenant: TenantId,
    pub target: ShredTarget,
    pub requested_by: String,
    pub requested_at: i64,
    pub expires_at: i64,
    pub approved_by: Option<String>,
    pub executed_at: Option<i64>,
    pub state: ApprovalState,
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
    /// The change is not allowed in the current state (e.g. shredding the active version).
    #[error("{0}")]
    Refused(String),
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

    /// Atomically makes `new` the active version if `expected_active` still is; the old active
    /// version becomes decrypt-only. A crash leaves either the old or the new active version.
    async fn rotate(
        &self,
        tenant: &TenantId,
        expected_active: u32,
        new: &KeyVersionRecord,
    ) -> Result<RotateOutcome, StoreError>;

    /// Sets the lowest version that may still open (at most the active version).
    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        min: u32,
    ) -> Result<TenantRecord, StoreError>;

    /// Erases the wrapped key material of the tenant (or of one non-active version) and marks
    /// it destroyed. Engines must overwrite the erased bytes, not only unlink them.
    async fn shred(
        &self,
        tenant: &TenantId,
        target: ShredTarget,
        at: i64,
    ) -> Result<(), StoreError>;

    /// Adds `wrapping` to a version unless it has one under that root, and in the same
    /// transaction removes the wrap under `drop_root` if given (and distinct). Idempotent.
    /// Returns whether anything changed.
    async fn put_wrapping(
        &self,
        tenant: &TenantId,
        version: u32,
        wrapping: &Wrapping,
        drop_root: Option<&RootId>,
    ) -> Result<bool, StoreError>;

    /// Binds a live tenant to its own root (BYOK), recording the change in the feed.
    async fn set_tenant_root(
        &self,
        tenant: &TenantId,
        root: &RootId,
    ) -> Result<TenantRecord, StoreError>;

    /// Change-feed entries after `seq`, oldest first.
    async fn events_since(&self, seq: i64) -> Result<Vec<KeyEvent>, StoreError>;

    /// The newest change-feed sequence number (0 when empty).
    async fn last_event(&self) -> Result<i64, StoreError>;

    /// Changes made by any process sharing the store, as they become known, until the
    /// receiver is dropped. The default polls `events_since` every `poll_every`; an engine
    /// that can push (PostgreSQL's LISTEN/NOTIFY) overrides it. An engine that may have
    /// missed changes (a lost connection) sends `StoreChange::All`.
    fn subscribe(self: Arc<Self>, poll_every: Duration) -> mpsc::Receiver<StoreChange> {
        let (tx, rx) = mpsc::channel(CHANGE_BACKLOG);
        tokio::spawn(poll_change_feed(self, tx, poll_every));
        rx
    }

    async fn create_approval(&self, approval: &Approval) -> Result<(), StoreError>;

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError>;

    async fn pending_approvals(&self, now: i64) -> Result<Vec<Approval>, StoreError>;

    /// Marks a pending approval executed by `approver`; false if it was no longer pending.
    async fn complete_approval(
        &self,
        id: &str,
        approver: &str,
        at: i64,
    ) -> Result<bool, StoreError>;
}

/// The default subscription: polls the change feed, which keeps its place across outages (a
/// failed poll is retried from the same sequence number, so nothing is missed).
async fn poll_change_feed<S: KeyringStore + ?Sized>(
    store: Arc<S>,
    tx: mpsc::Sender<StoreChange>,
    every: Duration,
) {
    let pause = async |tx: &mpsc::Sender<StoreChange>| {
        tokio::select! {
            _ = tx.closed() => false,
            _ = tokio::time::sleep(every) => true,
        }
    };
    let mut last = loop {
        match store.last_event().await {
            Ok(seq) => break seq,
            Err(e) => tracing::warn!(error = %e, "change feed unavailable"),
        }
        if !pause(&tx).await {
            return;
        }
    };
    while pause(&tx).await {
        match store.events_since(last).await {
            Ok(events) => {
                for e in events {
                    tracing::debug!(tenant = %e.tenant, kind = %e.kind, "change seen in the feed");
                    last = e.seq;
                    if tx.send(StoreChange::Tenant(e.tenant)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "change feed unavailable"),
        }
    }
}

/// Errors of key-ring operations.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("tenant not found")]
    TenantNotFound,
    /// An open failed; deliberately says nothing about which check.
    #[error("decryption failed")]
    DecryptFailed,
    /// The tenant was shredded.
    #[error("tenant destroyed")]
    TenantDestroyed,
    /// The version was shredded.
    #[error("key version destroyed")]
    KeyVersionDestroyed,
    /// The version is below the tenant's `min_decrypt_version`.
    #[error("key version retired")]
    KeyVersionRetired,
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
    /// The store refused the change in its current state.
    #[error("{0}")]
    Refused(String),
    #[error("approval not found")]
    ApprovalNotFound,
    #[error("approval expired")]
    ApprovalExpired,
    #[error("the principal that requested a shred cannot approve it")]
    ApprovalSamePrincipal,
    #[error("approval is no longer pending")]
    ApprovalNotPending,
}
