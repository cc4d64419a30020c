//! The key ring proper: resolves (tenant, version) to an unwrapped data key through bounded TTL
//! caches, creates tenants on first use, seals/opens through `crypto`, and carries out the key
//! lifecycle (rotate, retire, rewrap, four-eyes shred, moving a tenant to its own root). Caches
//! are dropped per tenant on every change, whether made here or by another process (the store's
//! change feed). The cache TTL is the revocation bound; the optional stale window extends it
//! only while roots are unreachable, never after a root has refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cache::{TenantCache, TenantView};
use super::{
    Approval, ApprovalState, KeyState, KeyVersionRecord, KeyringError, KeyringStore, RotateOutcome,
    ShredTarget, StoreChange, TenantRecord, Wrapping,
};
use crate::crypto::envelope::{self, Envelope, Purpose, SealBuffer, SealContext};
use crate::crypto::{DataKey, SecretBytes, SecretVec};
use crate::metrics::{CacheKind, Metrics};
use crate::providers::metered::Metered;
use crate::providers::{
    ProviderError, RootFactory, RootId, RootProvider, WrapContext, WrapPurpose,
};
use crate::tenant::TenantId;

/// Runs a seal or open of a `len`-byte message under its context: inline, or on the blocking
/// pool above `BLOCKING_THRESHOLD`. `None` if the blocking task died.
async fn in_context<T: Send + 'static>(
    tenant: &TenantId,
    purpose: Purpose,
    aad: &[u8],
    len: usize,
    f: impl FnOnce(&SealContext<'_>) -> T + Send + 'static,
) -> Option<T> {
    if len <= BLOCKING_THRESHOLD {
        return Some(f(&SealContext {
            tenant,
            purpose,
            aad,
        }));
    }
    let tenant = tenant.clone();
    let aad = aad.to_vec();
    tokio::task::spawn_blocking(move || {
        f(&SealContext {
            tenant: &tenant,
            purpose,
            aad: &aad,
        })
    })
    .await
    .ok()
}

/// Tries of a rotation that keeps losing to concurrent ones (each loss is another rotation's
/// success, so this bounds a crowd of this size, not a livelock).
const ROTATE_ATTEMPTS: u32 = 32;

/// Above this size, sealing and opening move off the async reactor. At ring's AES-GCM speed
/// (about 8 GiB/s here with VAES) 2 MiB takes about 250 µs. Handing a 1 MiB message to the
/// blocking pool instead doubled the server's CPU per request in the load bench (410 → 808 µs:
/// the buffer changes cores). On a CPU without AES instructions 2 MiB can take milliseconds;
/// the worker's other tasks are then taken over by the other workers.
const BLOCKING_THRESHOLD: usize = 2 * 1024 * 1024;

/// How a key ring behaves.
#[derive(Debug, Clone)]
pub struct KeyringOptions {
    /// Create a tenant (version 1) the first time it is used to seal or make a data key.
    pub auto_create_tenants: bool,
    /// Upper bound on cached unwrapped keys (and on cached tenant records).
    pub cache_max_entries: u64,
    /// How long an unwrapped key may be used before it is unwrapped again by its root: the
    /// bound on how long a revoked root keeps working.
    pub cache_ttl: Duration,
    /// How long past `cache_ttl` a key may still be used while every root holding it is
    /// unreachable (not when one refuses). Zero: never.
    pub stale_if_error: Duration,
}

impl Default for KeyringOptions {
    fn default() -> Self {
        KeyringOptions {
            auto_create_tenants: false,
            cache_max_entries: 100_000,
            cache_ttl: Duration::from_secs(300),
            stale_if_error: Duration::ZERO,
        }
    }
}

/// What moving a tenant to its own root did.
#[derive(Debug, Clone)]
pub struct RootMove {
    pub tenant: TenantRecord,
    /// Live versions of the tenant, all now wrapped under the new root alone.
    pub versions: u64,
    /// Versions changed by this call (0 when an earlier call finished the move).
    pub rewrapped: u64,
}

/// A tenant's keys as shown to operators.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    pub tenant: TenantRecord,
    pub versions: Vec<KeyVersionRecord>,
}

/// A data key handed to a caller for its own local encryption, and its sealed form.
pub struct IssuedDataKey {
    pub plaintext: DataKey,
    pub sealed: Vec<u8>,
    pub key_version: u32,
}

/// Per-tenant key rings over a store and an ordered list of roots.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyringStore>,
    /// In unwrap-preference order; new versions are wrapped under every one of them.
    roots: Vec<Arc<dyn RootProvider>>,
    /// Makes the roots tenants are bound to (BYOK) that are not configured.
    factory: Option<Arc<dyn RootFactory>>,
    options: KeyringOptions,
    /// Tenant records and unwrapped keys; keys are kept `stale_if_error` past the TTL, for use
    /// only while every root holding them is unreachable.
    cache: TenantCache,
    metrics: Arc<Metrics>,
    /// Serialises moves between roots in this process, so two concurrent set-root calls do not
    /// interleave their drops (sidecars sharing a store can still race; rerunning settles it).
    moves: tokio::sync::Mutex<()>,
}

impl Keyring {
    /// `roots` must not be empty: the first generates new keys, and all wrap them.
    pub fn new(
        store: Arc<dyn KeyringStore>,
        roots: Vec<Arc<dyn RootProvider>>,
        options: KeyringOptions,
    ) -> Result<Self, KeyringError> {
        Self::with_parts(store, roots, None, options, Arc::new(Metrics::default()))
    }

    /// Like `new`, with a factory for the roots tenants are bound to (BYOK) and the metrics to
    /// count into. Every root, configured or made, is counted in `metrics`.
    pub fn with_parts(
        store: Arc<dyn KeyringStore>,
        roots: Vec<Arc<dyn RootProvider>>,
        factory: Option<Arc<dyn RootFactory>>,
        options: KeyringOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, KeyringError> {
        if roots.is_empty() {
            return Err(ProviderError::Setup("at least one root key is required".into()).into());
        }
        let roots = roots
            .into_iter()
            .map(|r| Metered::counting(r, &metrics))
            .collect();
        let cache = TenantCache::new(
            options.cache_max_entries,
            options.cache_ttl,
            options.stale_if_error,
            metrics.clone(),
        );
        Ok(Keyring {
            inner: Arc::new(Inner {
                store,
                roots,
                factory,
                options,
                cache,
                metrics,
                moves: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    pub fn store(&self) -> &Arc<dyn KeyringStore> {
        &self.inner.store
    }

    /// Seals under the tenant's active version; returns the envelope and that version.
    pub async fn seal(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        plaintext: SecretBytes,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        let buf = SealBuffer::from_plaintext(plaintext.expose());
        drop(plaintext);
        self.seal_buffer(tenant, purpose, aad, buf).await
    }

    /// Like `seal`, sealing in place in a buffer the caller filled (no copy of the plaintext).
    pub async fn seal_buffer(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        plaintext: SealBuffer,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        let record = self
            .tenant(tenant, self.inner.options.auto_create_tenants)
            .await?;
        let version = record.active_version;
        let key = self
            .version_key(tenant, record.root.as_deref(), version)
            .await?;
        let len = plaintext.plaintext_len();
        let ct = in_context(tenant, purpose, aad, len, move |ctx| {
            envelope::seal_buffer(&key, version, ctx, plaintext)
        })
        .await
        .ok_or(KeyringError::Internal("sealing task failed"))??;
        Ok((ct, version))
    }

    /// Opens an envelope of this tenant. Every failure that depends on the ciphertext is
    /// `DecryptFailed`; a missing, destroyed or retired key says so (the header names the
    /// version in clear anyway); root and store outages keep their own errors.
    pub async fn open(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, KeyringError> {
        let env = Envelope::parse(ciphertext).map_err(|_| KeyringError::DecryptFailed)?;
        if env.plaintext_len() > BLOCKING_THRESHOLD {
            return self
                .open_owned(tenant, purpose, aad, SecretVec::from(ciphertext.to_vec()))
                .await;
        }
        let key = self.opening_key(tenant, env.key_version()).await?;
        let ctx = SealContext {
            tenant,
            purpose,
            aad,
        };
        env.open(&key, &ctx)
            .map_err(|_| KeyringError::DecryptFailed)
    }

    /// Like `open`, decrypting in place in the caller's buffer (no copy of the ciphertext); the
    /// plaintext comes back in the same allocation.
    pub async fn open_owned(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        ciphertext: SecretVec,
    ) -> Result<SecretBytes, KeyringError> {
        let (version, len) = {
            let env = Envelope::parse(&ciphertext).map_err(|_| KeyringError::DecryptFailed)?;
            (env.key_version(), env.plaintext_len())
        };
        let key = self.opening_key(tenant, version).await?;
        in_context(tenant, purpose, aad, len, move |ctx| {
            envelope::open_owned(&key, ctx, ciphertext)
        })
        .await
        .ok_or(KeyringError::DecryptFailed)?
        .map_err(|_| KeyringError::DecryptFailed)
    }

    /// The key that opens `version` of `tenant`, with the checks every open makes first.
    async fn opening_key(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Arc<DataKey>, KeyringError> {
        let record = self.tenant(tenant, false).await?;
        if version > record.active_version {
            return Err(KeyringError::DecryptFailed);
        }
        if version < record.min_decrypt_version {
            return Err(KeyringError::KeyVersionRetired);
        }
        match self
            .version_key(tenant, record.root.as_deref(), version)
            .await
        {
            Ok(k) => Ok(k),
            Err(KeyringError::KeyUnwrapFailed { .. })
            | Err(KeyringError::Provider(ProviderError::UnwrapFailed { .. })) => {
                Err(KeyringError::DecryptFailed)
            }
            Err(e) => Err(e),
        }
    }

    /// Re-seals a ciphertext under the active version; the plaintext never leaves the sidecar.
    pub async fn rewrap(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        let plaintext = self.open(tenant, purpose, aad, ciphertext).await?;
        self.seal(tenant, purpose, aad, plaintext).await
    }

    /// A fresh 256-bit data key for the caller's own use, with its envelope under the tenant's
    /// active version (purpose `DataKey`, so it opens only through `unwrap_datakey`).
    pub async fn issue_datakey(
        &self,
        tenant: &TenantId,
        aad: &[u8],
    ) -> Result<IssuedDataKey, KeyringError> {
        let plaintext = DataKey::generate()?;
        let (sealed, key_version) = self
            .seal(
                tenant,
                Purpose::DataKey,
                aad,
                SecretBytes::new(plaintext.expose().to_vec()),
            )
            .await?;
        Ok(IssuedDataKey {
            plaintext,
            sealed,
            key_version,
        })
    }

    /// The tenant's key for deterministic token indexes: HKDF of key version 1, which every
    /// tenant has and rotation never changes (shredding version 1 ends deterministic lookups).
    pub async fn token_index_key(
        &self,
        tenant: &TenantId,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, KeyringError> {
        let record = self
            .tenant(tenant, self.inner.options.auto_create_tenants)
            .await?;
        let first = self.version_key(tenant, record.root.as_deref(), 1).await?;
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, first.expose());
        let mut out = zeroize::Zeroizing::new([0u8; 32]);
        hk.expand(b"kms-sidecar/token-index/v1", out.as_mut_slice())
            .map_err(|_| KeyringError::Internal("token index key derivation"))?;
        Ok(out)
    }

    /// Opens a data key made by `issue_datakey`.
    pub async fn unwrap_datakey(
        &self,
        tenant: &TenantId,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<DataKey, KeyringError> {
        let raw = self.open(tenant, Purpose::DataKey, aad, sealed).await?;
        DataKey::from_slice(raw.expose()).map_err(|_| KeyringError::DecryptFailed)
    }

    /// The tenant and its versions (never key bytes).
    pub async fn describe(&self, tenant: &TenantId) -> Result<TenantKeys, KeyringError> {
        let store = &self.inner.store;
        let record = self
            .timed("tenant", store.tenant(tenant))
            .await?
            .ok_or(KeyringError::TenantNotFound)?;
        let versions = self
            .timed("key_versions", store.key_versions(tenant))
            .await?;
        Ok(TenantKeys {
            tenant: record,
            versions,
        })
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRecord>, KeyringError> {
        Ok(self.timed("tenants", self.inner.store.tenants()).await?)
    }

    /// Makes a new version active; the old one stays openable (decrypt-only). Atomic: a
    /// concurrent rotation elsewhere makes this one retry on the new state, so exactly one
    /// version is added per call.
    pub async fn rotate(&self, tenant: &TenantId) -> Result<TenantRecord, KeyringError> {
        let store = &self.inner.store;
        for attempt in 0..ROTATE_ATTEMPTS {
            if attempt > 0 {
                // Each conflict means another rotation won; a short random pause keeps a crowd
                // of rotators (several sidecars on one store) from colliding again in step.
                let mut jitter = [0u8; 1];
                crate::crypto::fill_random(&mut jitter)?;
                tokio::time::sleep(Duration::from_millis(1 + u64::from(jitter[0] % 16))).await;
            }
            let current = self
                .timed("tenant", store.tenant(tenant))
                .await?
                .ok_or(KeyringError::TenantNotFound)?;
            if current.destroyed_at.is_some() {
                return Err(KeyringError::TenantDestroyed);
            }
            let next = current
                .active_version
                .checked_add(1)
                .ok_or(KeyringError::Internal("key version space exhausted"))?;
            let roots = self.wrapping_roots(&current)?;
            let record = self.new_version(tenant, next, unix_now(), &roots).await?;
            match self
                .timed(
                    "rotate",
                    store.rotate(tenant, current.active_version, &record),
                )
                .await?
            {
                RotateOutcome::Rotated(r) => {
                    self.invalidate(tenant).await;
                    tracing::info!(tenant = %tenant, active_version = r.active_version, "key rotated");
                    return Ok(r);
                }
                RotateOutcome::Conflict(_) => continue,
            }
        }
        Err(KeyringError::Refused(
            "the tenant kept being rotated concurrently; retry".into(),
        ))
    }

    /// Rotates every live tenant whose active version is older than `period_for(tenant)`.
    /// Returns the tenants rotated. Safe to run on several sidecars at once.
    pub async fn rotate_due(
        &self,
        period_for: impl Fn(&TenantId) -> Option<Duration>,
    ) -> Result<Vec<TenantId>, KeyringError> {
        let now = unix_now();
        let mut rotated = Vec::new();
        let store = &self.inner.store;
        for t in self.timed("tenants", store.tenants()).await? {
            let Some(period) = period_for(&t.tenant) else {
                continue;
            };
            if t.destroyed_at.is_some() {
                continue;
            }
            let Some(active) = self
                .timed(
                    "key_version",
                    store.key_version(&t.tenant, t.active_version),
                )
                .await?
            else {
                continue;
            };
            if active.created_at.saturating_add(period.as_secs() as i64) <= now {
                self.rotate(&t.tenant).await?;
                rotated.push(t.tenant);
            }
        }
        Ok(rotated)
    }

    /// Sets the lowest key version that may still open.
    pub async fn retire(&self, tenant: &TenantId, min: u32) -> Result<TenantRecord, KeyringError> {
        let r = self
            .timed(
                "set_min_decrypt_version",
                self.inner.store.set_min_decrypt_version(tenant, min),
            )
            .await?;
        self.invalidate(tenant).await;
        Ok(r)
    }

    /// Records a request to shred; it runs only when a different principal approves it.
    pub async fn request_shred(
        &self,
        tenant: &TenantId,
        target: ShredTarget,
        requested_by: &str,
        window: Duration,
    ) -> Result<Approval, KeyringError> {
        let record = self
            .timed("tenant", self.inner.store.tenant(tenant))
            .await?
            .ok_or(KeyringError::TenantNotFound)?;
        if record.destroyed_at.is_some() {
            return Err(KeyringError::TenantDestroyed);
        }
        if let ShredTarget::Version(v) = target {
            if v == record.active_version {
                return Err(KeyringError::Refused(
                    "the active version cannot be shredded; rotate first".into(),
                ));
            }
            if v == 0 || v > record.active_version {
                return Err(KeyringError::Refused(format!("key version {v} not found")));
            }
        }
        let mut raw = [0u8; 16];
        crate::crypto::fill_random(&mut raw)?;
        let now = unix_now();
        let approval = Approval {
            id: format!("apr_{}", hex::encode(raw)),
            tenant: tenant.clone(),
            target,
            requested_by: requested_by.to_owned(),
            requested_at: now,
            expires_at: now.saturating_add(window.as_secs() as i64),
            approved_by: None,
            executed_at: None,
            state: ApprovalState::Pending,
        };
        self.timed(
            "create_approval",
            self.inner.store.create_approval(&approval),
        )
        .await?;
        Ok(approval)
    }

    /// Approves and executes a pending shred. The approver must differ from the requester, the
    /// window must still be open, and an approval executes once.
    pub async fn approve_shred(&self, id: &str, approver: &str) -> Result<Approval, KeyringError> {
        let store = &self.inner.store;
        let approval = self
            .timed("approval", store.approval(id))
            .await?
            .ok_or(KeyringError::ApprovalNotFound)?;
        let now = unix_now();
        if approval.state != ApprovalState::Pending {
            return Err(KeyringError::ApprovalNotPending);
        }
        if approval.requested_by == approver {
            return Err(KeyringError::ApprovalSamePrincipal);
        }
        if now >= approval.expires_at {
            return Err(KeyringError::ApprovalExpired);
        }
        if !self
            .timed(
                "complete_approval",
                store.complete_approval(id, approver, now),
            )
            .await?
        {
            return Err(KeyringError::ApprovalNotPending);
        }
        self.timed("shred", store.shred(&approval.tenant, approval.target, now))
            .await?;
        self.invalidate(&approval.tenant).await;
        tracing::warn!(tenant = %approval.tenant, approval = %approval.id, "key material shredded");
        Ok(Approval {
            approved_by: Some(approver.to_owned()),
            executed_at: Some(now),
            state: ApprovalState::Executed,
            ..approval
        })
    }

    pub async fn pending_approvals(&self) -> Result<Vec<Approval>, KeyringError> {
        let store = &self.inner.store;
        Ok(self
            .timed("pending_approvals", store.pending_approvals(unix_now()))
            .await?)
    }

    /// Binds a tenant to its own root (a customer-managed key, BYOK) and moves its existing
    /// versions there: each is rewrapped under the new root and its other wraps are dropped in
    /// the same transaction. No data is re-encrypted. New versions are wrapped under that root
    /// alone. A tenant that does not exist yet is created with its first version under the new
    /// root. Idempotent and resumable: a failed call leaves every version openable, and calling
    /// again finishes the move.
    pub async fn set_root(
        &self,
        tenant: &TenantId,
        root: &RootId,
    ) -> Result<RootMove, KeyringError> {
        let _one_move_at_a_time = self.inner.moves.lock().await;
        let store = &self.inner.store;
        let target = self.tenant_root(root)?;
        // A key we cannot use is refused before anything changes.
        target.health().await?;
        let existing = match self.timed("tenant", store.tenant(tenant)).await? {
            Some(r) => r,
            None => {
                let now = unix_now();
                let first = self
                    .new_version(tenant, 1, now, std::slice::from_ref(&target))
                    .await?;
                self.timed("create_tenant", store.create_tenant(tenant, now, &first))
                    .await?
            }
        };
        if existing.destroyed_at.is_some() {
            return Err(KeyringError::TenantDestroyed);
        }
        let previous = existing.root.clone();
        let record = self
            .timed("set_tenant_root", store.set_tenant_root(tenant, root))
            .await?;
        self.invalidate(tenant).await;
        let mut rewrapped = 0;
        let mut versions = 0;
        // A rotation that raced the binding may have added a version under the old roots:
        // a second pass moves it; later versions are made under the new root.
        for _ in 0..3 {
            let mut changed = 0;
            versions = 0;
            for v in self
                .timed("key_versions", store.key_versions(tenant))
                .await?
            {
                if v.state == KeyState::Destroyed {
                    continue;
                }
                versions += 1;
                if self
                    .move_version(tenant, &v, &target, previous.as_ref())
                    .await?
                {
                    changed += 1;
                }
            }
            rewrapped += changed;
            if changed == 0 {
                break;
            }
        }
        self.invalidate(tenant).await;
        tracing::info!(tenant = %tenant, root = %root, rewrapped, "tenant moved to its own root");
        Ok(RootMove {
            tenant: record,
            versions,
            rewrapped,
        })
    }

    /// Leaves `v` wrapped under `target` alone; true if anything changed.
    async fn move_version(
        &self,
        tenant: &TenantId,
        v: &KeyVersionRecord,
        target: &Arc<dyn RootProvider>,
        previous: Option<&RootId>,
    ) -> Result<bool, KeyringError> {
        let store = &self.inner.store;
        let others: Vec<&RootId> = v
            .wrappings
            .iter()
            .map(|w| &w.root)
            .filter(|r| *r != target.id())
            .collect();
        let (wrapping, mut changed) = match v.wrappings.iter().find(|w| &w.root == target.id()) {
            Some(w) => (w.clone(), false),
            None => {
                let candidates = self.unwrap_roots(previous, v);
                let (dek, _) =
                    unwrap_with(&candidates, tenant, v, Some(&self.inner.metrics)).await?;
                let ctx = WrapContext {
                    tenant,
                    key_version: v.version,
                    purpose: WrapPurpose::TenantDek,
                };
                let w = Wrapping {
                    root: target.id().clone(),
                    blob: target.wrap(&dek, &ctx).await?,
                };
                let added = self
                    .timed(
                        "put_wrapping",
                        store.put_wrapping(tenant, v.version, &w, others.first().copied()),
                    )
                    .await?;
                (w, added)
            }
        };
        let skip = usize::from(changed);
        for other in others.into_iter().skip(skip) {
            changed |= self
                .timed(
                    "put_wrapping",
                    store.put_wrapping(tenant, v.version, &wrapping, Some(other)),
                )
                .await?;
        }
        Ok(changed)
    }

    /// Drops everything cached for a tenant, including stale keys.
    pub async fn invalidate(&self, tenant: &TenantId) {
        self.inner.cache.invalidate(tenant);
    }

    /// Drops every cached key and tenant record.
    pub fn invalidate_all(&self) {
        self.inner.cache.invalidate_all();
    }

    /// Follows the store's changes (pushed by the engine, or polled every `poll_every`),
    /// dropping the caches of tenants changed by any process sharing the store, until the
    /// returned task is aborted.
    pub fn follow_changes(&self, poll_every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let mut changes = self.inner.store.clone().subscribe(poll_every);
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                match change {
                    StoreChange::Tenant(t) => {
                        this.invalidate(&t).await;
                        tracing::debug!(tenant = %t, "cache dropped after a change");
                    }
                    StoreChange::All => {
                        this.invalidate_all();
                        tracing::info!("all caches dropped: store changes may have been missed");
                    }
                }
            }
        })
    }

    /// Ready when the store answers and at least the first root is healthy.
    pub async fn ready(&self) -> Result<(), KeyringError> {
        self.timed("health", self.inner.store.health()).await?;
        self.inner.roots[0].health().await?;
        Ok(())
    }

    /// Number of unwrapped keys held right now (including those kept for the stale window).
    pub fn cached_keys(&self) -> u64 {
        self.inner.cache.keys()
    }

    /// Brings the caches' sizes in `metrics` up to date, for a scrape: drops expired entries
    /// first (counted as evictions), so the sizes are of what can still be used.
    pub async fn sample_caches(&self) {
        let inner = &self.inner;
        inner.cache.purge_expired();
        inner
            .metrics
            .cache_entries(CacheKind::Keys, inner.cache.keys());
        inner
            .metrics
            .cache_entries(CacheKind::Tenants, inner.cache.records());
    }

    /// Awaits one store call, observing its latency under `op` (the store method's name).
    async fn timed<T>(&self, op: &'static str, call: impl Future<Output = T>) -> T {
        self.inner.metrics.store_call(op, call).await
    }

    /// What the sealing and opening paths need of a tenant's record: from the cache, or read
    /// (and created, if `create` and it does not exist) once for all concurrent callers.
    async fn tenant(&self, tenant: &TenantId, create: bool) -> Result<TenantView, KeyringError> {
        let cache = &self.inner.cache;
        let view = match cache.record(tenant) {
            Some(view) => view,
            None => {
                let load = async {
                    match self
                        .timed("tenant", self.inner.store.tenant(tenant))
                        .await?
                    {
                        Some(r) => Ok(TenantView::from(&r)),
                        None if create => Ok(TenantView::from(&self.create(tenant).await?)),
                        None => Err(KeyringError::TenantNotFound),
                    }
                };
                // Boxed: the load (store, roots, single flight) is a large future, and unboxed it
                // would size every future above this one, so that each request on the cached
                // path would copy kilobytes as its futures are built and moved.
                Box::pin(cache.load_record(tenant, create, load)).await?
            }
        };
        if view.destroyed {
            return Err(KeyringError::TenantDestroyed);
        }
        Ok(view)
    }

    /// The unwrapped key of a version: from the cache, or read and unwrapped once for all
    /// concurrent callers; past the TTL while every root is unreachable, a stale key if allowed.
    async fn version_key(
        &self,
        tenant: &TenantId,
        own_root: Option<&RootId>,
        version: u32,
    ) -> Result<Arc<DataKey>, KeyringError> {
        let cache = &self.inner.cache;
        if let Some(key) = cache.key(tenant, version) {
            return Ok(key);
        }
        let load = async {
            let store = &self.inner.store;
            let Some(record) = self
                .timed("key_version", store.key_version(tenant, version))
                .await?
            else {
                return Err(KeyringError::DecryptFailed);
            };
            if record.state == KeyState::Destroyed {
                return Err(KeyringError::KeyVersionDestroyed);
            }
            let roots = self.unwrap_roots(own_root, &record);
            let (key, root) =
                unwrap_with(&roots, tenant, &record, Some(&self.inner.metrics)).await?;
            Ok((Arc::new(key), root))
        };
        // Boxed for the same reason as the record load in `tenant`.
        match Box::pin(cache.load_key(tenant, version, load)).await {
            Ok(key) => Ok(key),
            Err(err) => self.stale_fallback(tenant, version, err),
        }
    }

    /// After a failed unwrap: an unreachable root may be bridged by a stale key; a refusing root
    /// drops every stale key it unwrapped, so a revocation is never extended once it is seen.
    fn stale_fallback(
        &self,
        tenant: &TenantId,
        version: u32,
        err: KeyringError,
    ) -> Result<Arc<DataKey>, KeyringError> {
        match &err {
            KeyringError::Provider(ProviderError::Unavailable { .. }) => {
                if let Some((key, root)) = self.inner.cache.stale_key(tenant, version) {
                    self.inner.metrics.stale_key_served();
                    tracing::warn!(tenant = %tenant, version, root = %root,
                        "root unreachable; using a key past the cache TTL (stale_if_error)");
                    return Ok(key);
                }
            }
            KeyringError::Provider(ProviderError::AccessDenied { root }) => {
                self.inner.cache.deny_stale(root);
            }
            _ => {}
        }
        Err(err)
    }

    /// The roots that wrap new versions of a tenant: its own root alone, or every configured one.
    fn wrapping_roots(
        &self,
        tenant: &TenantRecord,
    ) -> Result<Vec<Arc<dyn RootProvider>>, KeyringError> {
        match &tenant.root {
            Some(id) => Ok(vec![self.tenant_root(id)?]),
            None => Ok(self.inner.roots.clone()),
        }
    }

    /// A tenant's own root; one this sidecar cannot make is a refusal (409), not a bug.
    fn tenant_root(&self, id: &RootId) -> Result<Arc<dyn RootProvider>, KeyringError> {
        self.root_by_id(id).map_err(|e| match e {
            ProviderError::Setup(m) => KeyringError::Refused(m),
            other => other.into(),
        })
    }

    /// A configured root by id, or one made by the factory (counted like the configured ones).
    fn root_by_id(&self, id: &RootId) -> Result<Arc<dyn RootProvider>, ProviderError> {
        if let Some(r) = self.inner.roots.iter().find(|r| r.id() == id) {
            return Ok(r.clone());
        }
        match &self.inner.factory {
            Some(f) => Ok(Metered::counting(f.root(id)?, &self.inner.metrics)),
            None => Err(ProviderError::Setup(format!(
                "root {id} is not configured, and no [aws] connection is configured to reach it"
            ))),
        }
    }

    /// The roots to try on a stored version, in order: the tenant's own root, the configured
    /// roots, then any other root holding a wrap of it (a tenant in the middle of a move).
    fn unwrap_roots(
        &self,
        own: Option<&RootId>,
        record: &KeyVersionRecord,
    ) -> Vec<Arc<dyn RootProvider>> {
        let mut roots: Vec<Arc<dyn RootProvider>> = Vec::new();
        if let Some(r) = own.and_then(|id| self.root_by_id(id).ok()) {
            roots.push(r);
        }
        for r in &self.inner.roots {
            if !roots.iter().any(|x| x.id() == r.id()) {
                roots.push(r.clone());
            }
        }
        for w in &record.wrappings {
            if !roots.iter().any(|x| x.id() == &w.root)
                && let Ok(r) = self.root_by_id(&w.root)
            {
                roots.push(r);
            }
        }
        roots
    }

    /// A new version's key, generated by the first of `roots` and wrapped under every one.
    async fn new_version(
        &self,
        tenant: &TenantId,
        version: u32,
        created_at: i64,
        roots: &[Arc<dyn RootProvider>],
    ) -> Result<KeyVersionRecord, KeyringError> {
        let ctx = WrapContext {
            tenant,
            key_version: version,
            purpose: WrapPurpose::TenantDek,
        };
        let Some(first) = roots.first() else {
            return Err(KeyringError::Internal("no root to wrap a new key version"));
        };
        let (dek, first_blob) = first.generate(&ctx).await?;
        let mut wrappings = vec![Wrapping {
            root: first.id().clone(),
            blob: first_blob,
        }];
        for root in &roots[1..] {
            wrappings.push(Wrapping {
                root: root.id().clone(),
                blob: root.wrap(&dek, &ctx).await?,
            });
        }
        Ok(KeyVersionRecord {
            version,
            state: KeyState::Active,
            created_at,
            wrappings,
        })
    }

    async fn create(&self, tenant: &TenantId) -> Result<TenantRecord, KeyringError> {
        let now = unix_now();
        let first = self.new_version(tenant, 1, now, &self.inner.roots).await?;
        let store = &self.inner.store;
        let record = self
            .timed("create_tenant", store.create_tenant(tenant, now, &first))
            .await?;
        tracing::info!(tenant = %tenant, active_version = record.active_version, "tenant ready");
        Ok(record)
    }
}

/// Tries a version's wraps in `roots` order; shared by the key ring and the root rewrap job.
/// An outage of one root falls through to the next; the error reported is the most actionable
/// one seen. Returns the key and the root that unwrapped it.
pub(crate) async fn unwrap_with(
    roots: &[Arc<dyn RootProvider>],
    tenant: &TenantId,
    record: &KeyVersionRecord,
    metrics: Option<&Metrics>,
) -> Result<(DataKey, RootId), KeyringError> {
    let ctx = WrapContext {
        tenant,
        key_version: record.version,
        purpose: WrapPurpose::TenantDek,
    };
    let mut worst: Option<ProviderError> = None;
    for root in roots {
        let Some(w) = record.wrappings.iter().find(|w| &w.root == root.id()) else {
            continue;
        };
        match root.unwrap(&w.blob, &ctx).await {
            Ok(k) => {
                if worst.is_some() {
                    tracing::warn!(tenant = %tenant, version = record.version, root = %root.id(),
                        "unwrapped through a fallback root");
                    if let Some(m) = metrics {
                        m.fallback_unwrap(root.id().as_str());
                    }
                }
                return Ok((k, root.id().clone()));
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant, version = record.version, root = %root.id(),
                    error = %e, "root could not unwrap key version");
                worst = Some(match (worst, e) {
                    (Some(a @ ProviderError::AccessDenied { .. }), _) => a,
                    (_, e @ ProviderError::AccessDenied { .. }) => e,
                    (Some(a @ ProviderError::Unavailable { .. }), _) => a,
                    (_, e) => e,
                });
            }
        }
    }
    match worst {
        Some(ProviderError::UnwrapFailed { .. }) => Err(KeyringError::KeyUnwrapFailed {
            version: record.version,
        }),
        Some(e) => Err(e.into()),
        None => Err(ProviderError::Unavailable {
            root: record
                .wrappings
                .iter()
                .map(|w| w.root.to_string())
                .collect::<Vec<_>>()
                .join(","),
            reason: "no configured root holds a wrap of this key version".into(),
        }
        .into()),
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
