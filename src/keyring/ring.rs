//! The key ring proper: resolves (tenant, version) to an unwrapped data key through bounded TTL
//! caches, creates tenants on first use, seals/opens through `crypto`, and carries out the key
//! lifecycle (rotate, retire, rewrap, four-eyes shred). Caches are dropped per tenant on every
//! change, whether made here or by another process (the store's change feed).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::future::Cache;

use super::{
    Approval, ApprovalState, KeyState, KeyVersionRecord, KeyringError, KeyringStore, RotateOutcome,
    ShredTarget, StoreChange, TenantRecord, Wrapping,
};
use crate::crypto::envelope::{self, Envelope, Purpose, SealContext};
use crate::crypto::{DataKey, SecretBytes};
use crate::providers::{ProviderError, RootProvider, WrapContext, WrapPurpose};
use crate::tenant::TenantId;

/// Tries of a rotation that keeps losing to concurrent ones (each loss is another rotation's
/// success, so this bounds a crowd of this size, not a livelock).
const ROTATE_ATTEMPTS: u32 = 32;

/// Above this size, sealing and opening move off the async reactor.
const BLOCKING_THRESHOLD: usize = 64 * 1024;

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
}

impl Default for KeyringOptions {
    fn default() -> Self {
        KeyringOptions {
            auto_create_tenants: false,
            cache_max_entries: 100_000,
            cache_ttl: Duration::from_secs(300),
        }
    }
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
    options: KeyringOptions,
    keys: Cache<(TenantId, u32), Arc<DataKey>>,
    tenants: Cache<TenantId, Arc<TenantRecord>>,
}

impl Keyring {
    /// `roots` must not be empty: the first generates new keys, and all wrap them.
    pub fn new(
        store: Arc<dyn KeyringStore>,
        roots: Vec<Arc<dyn RootProvider>>,
        options: KeyringOptions,
    ) -> Result<Self, KeyringError> {
        if roots.is_empty() {
            return Err(ProviderError::Setup("at least one root key is required".into()).into());
        }
        let keys = Cache::builder()
            .max_capacity(options.cache_max_entries)
            .time_to_live(options.cache_ttl)
            .support_invalidation_closures()
            .build();
        let tenants = Cache::builder()
            .max_capacity(options.cache_max_entries)
            .time_to_live(options.cache_ttl)
            .build();
        Ok(Keyring {
            inner: Arc::new(Inner {
                store,
                roots,
                options,
                keys,
                tenants,
            }),
        })
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
        let record = self
            .tenant(tenant, self.inner.options.auto_create_tenants)
            .await?;
        let version = record.active_version;
        let key = self.version_key(tenant, version).await?;
        let ct = if plaintext.len() > BLOCKING_THRESHOLD {
            let tenant = tenant.clone();
            let aad = aad.to_vec();
            tokio::task::spawn_blocking(move || {
                let ctx = SealContext {
                    tenant: &tenant,
                    purpose,
                    aad: &aad,
                };
                envelope::seal(&key, version, &ctx, plaintext.expose())
            })
            .await
            .map_err(|_| KeyringError::Internal("sealing task failed"))??
        } else {
            let ctx = SealContext {
                tenant,
                purpose,
                aad,
            };
            envelope::seal(&key, version, &ctx, plaintext.expose())?
        };
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
        let record = self.tenant(tenant, false).await?;
        let version = env.key_version();
        if version > record.active_version {
            return Err(KeyringError::DecryptFailed);
        }
        if version < record.min_decrypt_version {
            return Err(KeyringError::KeyVersionRetired);
        }
        let key = match self.version_key(tenant, version).await {
            Ok(k) => k,
            Err(KeyringError::KeyUnwrapFailed { .. })
            | Err(KeyringError::Provider(ProviderError::UnwrapFailed { .. })) => {
                return Err(KeyringError::DecryptFailed);
            }
            Err(e) => return Err(e),
        };
        let ctx = SealContext {
            tenant,
            purpose,
            aad,
        };
        if env.plaintext_len() > BLOCKING_THRESHOLD {
            let owned = ciphertext.to_vec();
            let tenant = tenant.clone();
            let aad = aad.to_vec();
            return tokio::task::spawn_blocking(move || {
                let ctx = SealContext {
                    tenant: &tenant,
                    purpose,
                    aad: &aad,
                };
                Envelope::parse(&owned).and_then(|e| e.open(&key, &ctx))
            })
            .await
            .map_err(|_| KeyringError::DecryptFailed)?
            .map_err(|_| KeyringError::DecryptFailed);
        }
        env.open(&key, &ctx)
            .map_err(|_| KeyringError::DecryptFailed)
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
        self.tenant(tenant, self.inner.options.auto_create_tenants)
            .await?;
        let first = self.version_key(tenant, 1).await?;
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
        let record = store
            .tenant(tenant)
            .await?
            .ok_or(KeyringError::TenantNotFound)?;
        let versions = store.key_versions(tenant).await?;
        Ok(TenantKeys {
            tenant: record,
            versions,
        })
    }

    pub async fn tenants(&self) -> Result<Vec<TenantRecord>, KeyringError> {
        Ok(self.inner.store.tenants().await?)
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
            let current = store
                .tenant(tenant)
                .await?
                .ok_or(KeyringError::TenantNotFound)?;
            if current.destroyed_at.is_some() {
                return Err(KeyringError::TenantDestroyed);
            }
            let next = current
                .active_version
                .checked_add(1)
                .ok_or(KeyringError::Internal("key version space exhausted"))?;
            let record = self.new_version(tenant, next, unix_now()).await?;
            match store
                .rotate(tenant, current.active_version, &record)
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
        for t in self.inner.store.tenants().await? {
            let Some(period) = period_for(&t.tenant) else {
                continue;
            };
            if t.destroyed_at.is_some() {
                continue;
            }
            let Some(active) = self
                .inner
                .store
                .key_version(&t.tenant, t.active_version)
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
            .inner
            .store
            .set_min_decrypt_version(tenant, min)
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
            .inner
            .store
            .tenant(tenant)
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
        self.inner.store.create_approval(&approval).await?;
        Ok(approval)
    }

    /// Approves and executes a pending shred. The approver must differ from the requester, the
    /// window must still be open, and an approval executes once.
    pub async fn approve_shred(&self, id: &str, approver: &str) -> Result<Approval, KeyringError> {
        let store = &self.inner.store;
        let approval = store
            .approval(id)
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
        if !store.complete_approval(id, approver, now).await? {
            return Err(KeyringError::ApprovalNotPending);
        }
        store.shred(&approval.tenant, approval.target, now).await?;
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
        Ok(self.inner.store.pending_approvals(unix_now()).await?)
    }

    /// Drops everything cached for a tenant.
    pub async fn invalidate(&self, tenant: &TenantId) {
        self.inner.tenants.invalidate(tenant).await;
        let t = tenant.clone();
        // Only fails if closures were not enabled on the builder, which `new` does.
        let _ = self.inner.keys.invalidate_entries_if(move |k, _| k.0 == t);
    }

    /// Drops every cached key and tenant record.
    pub fn invalidate_all(&self) {
        self.inner.tenants.invalidate_all();
        self.inner.keys.invalidate_all();
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
        self.inner.store.health().await?;
        self.inner.roots[0].health().await?;
        Ok(())
    }

    /// Number of unwrapped keys held right now (approximate, as moka counts).
    pub fn cached_keys(&self) -> u64 {
        self.inner.keys.entry_count()
    }

    async fn tenant(
        &self,
        tenant: &TenantId,
        create: bool,
    ) -> Result<Arc<TenantRecord>, KeyringError> {
        let this = self.clone();
        let t = tenant.clone();
        let record = self
            .inner
            .tenants
            .try_get_with(tenant.clone(), async move {
                match this.inner.store.tenant(&t).await? {
                    Some(r) => Ok(Arc::new(r)),
                    None if create => Ok(Arc::new(this.create(&t).await?)),
                    None => Err(KeyringError::TenantNotFound),
                }
            })
            .await
            .map_err(|e: Arc<KeyringError>| (*e).clone())?;
        if record.destroyed_at.is_some() {
            return Err(KeyringError::TenantDestroyed);
        }
        Ok(record)
    }

    async fn version_key(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Arc<DataKey>, KeyringError> {
        let this = self.clone();
        let t = tenant.clone();
        self.inner
            .keys
            .try_get_with((tenant.clone(), version), async move {
                let store = &this.inner.store;
                let Some(record) = store.key_version(&t, version).await? else {
                    return Err(KeyringError::DecryptFailed);
                };
                if record.state == KeyState::Destroyed {
                    return Err(KeyringError::KeyVersionDestroyed);
                }
                this.unwrap_record(&t, &record).await.map(Arc::new)
            })
            .await
            .map_err(|e: Arc<KeyringError>| (*e).clone())
    }

    /// Unwraps a stored version, trying its wraps in root-preference order. An outage of one
    /// root falls through to the next; the error reported is the most actionable one seen.
    pub(crate) async fn unwrap_record(
        &self,
        tenant: &TenantId,
        record: &KeyVersionRecord,
    ) -> Result<DataKey, KeyringError> {
        unwrap_with(&self.inner.roots, tenant, record).await
    }

    /// A new version's key, generated by the first root and wrapped under every root.
    async fn new_version(
        &self,
        tenant: &TenantId,
        version: u32,
        created_at: i64,
    ) -> Result<KeyVersionRecord, KeyringError> {
        let ctx = WrapContext {
            tenant,
            key_version: version,
            purpose: WrapPurpose::TenantDek,
        };
        let roots = &self.inner.roots;
        let (dek, first_blob) = roots[0].generate(&ctx).await?;
        let mut wrappings = vec![Wrapping {
            root: roots[0].id().clone(),
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
        let first = self.new_version(tenant, 1, now).await?;
        let record = self.inner.store.create_tenant(tenant, now, &first).await?;
        tracing::info!(tenant = %tenant, active_version = record.active_version, "tenant ready");
        Ok(record)
    }
}

/// Tries a version's wraps in `roots` order; shared by the key ring and the root rewrap job.
pub(crate) async fn unwrap_with(
    roots: &[Arc<dyn RootProvider>],
    tenant: &TenantId,
    record: &KeyVersionRecord,
) -> Result<DataKey, KeyringError> {
    let ctx = WrapContext {
        tenant,
        key_version: record.version,
        purpose: WrapPurpose::TenantDek,
    };
    let mut worst: Option<ProviderError> = None;
    for (i, root) in roots.iter().enumerate() {
        let Some(w) = record.wrappings.iter().find(|w| &w.root == root.id()) else {
            continue;
        };
        match root.unwrap(&w.blob, &ctx).await {
            Ok(k) => {
                if i > 0 || worst.is_some() {
                    tracing::warn!(tenant = %tenant, version = record.version, root = %root.id(),
                        "unwrapped through a fallback root");
                }
                return Ok(k);
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
