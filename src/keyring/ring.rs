//! The key ring proper: resolves (tenant, version) to an unwrapped data key through a bounded
//! TTL cache, creates tenants on first use, and seals/opens through `crypto`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::future::Cache;

use super::{KeyState, KeyVersionRecord, KeyringError, KeyringStore, TenantRecord, Wrapping};
use crate::crypto::envelope::{self, Envelope, Purpose, SealContext};
use crate::crypto::{DataKey, SecretBytes};
use crate::providers::{ProviderError, RootProvider, WrapContext, WrapPurpose};
use crate::tenant::TenantId;

/// Above this size, sealing and opening move off the async reactor.
const BLOCKING_THRESHOLD: usize = 64 * 1024;

/// How a key ring behaves.
#[derive(Debug, Clone)]
pub struct KeyringOptions {
    /// Create a tenant (version 1) the first time it is used to seal or make a data key.
    pub auto_create_tenants: bool,
    /// Upper bound on cached unwrapped keys (and on cached active versions).
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
    active: Cache<TenantId, (u32, Arc<DataKey>)>,
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
            .build();
        let active = Cache::builder()
            .max_capacity(options.cache_max_entries)
            .time_to_live(options.cache_ttl)
            .build();
        Ok(Keyring {
            inner: Arc::new(Inner {
                store,
                roots,
                options,
                keys,
                active,
            }),
        })
    }

    /// Seals under the tenant's active version; returns the envelope and that version.
    pub async fn seal(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        plaintext: SecretBytes,
    ) -> Result<(Vec<u8>, u32), KeyringError> {
        let (version, key) = self.active_key(tenant).await?;
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
    /// `DecryptFailed`; a missing tenant is `TenantNotFound`; root and store outages keep their
    /// own errors, since they say nothing about the ciphertext.
    pub async fn open(
        &self,
        tenant: &TenantId,
        purpose: Purpose,
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, KeyringError> {
        let env = Envelope::parse(ciphertext).map_err(|_| KeyringError::DecryptFailed)?;
        let key = match self.version_key(tenant, env.key_version()).await {
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

    async fn active_key(&self, tenant: &TenantId) -> Result<(u32, Arc<DataKey>), KeyringError> {
        let this = self.clone();
        let t = tenant.clone();
        self.inner
            .active
            .try_get_with(tenant.clone(), async move {
                let record = match this.inner.store.tenant(&t).await? {
                    Some(r) => r,
                    None if this.inner.options.auto_create_tenants => this.create(&t).await?,
                    None => return Err(KeyringError::TenantNotFound),
                };
                let key = this.version_key(&t, record.active_version).await?;
                Ok((record.active_version, key))
            })
            .await
            .map_err(|e: Arc<KeyringError>| (*e).clone())
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
                    return Err(if store.tenant(&t).await?.is_some() {
                        KeyringError::DecryptFailed
                    } else {
                        KeyringError::TenantNotFound
                    });
                };
                if record.state == KeyState::Destroyed {
                    return Err(KeyringError::DecryptFailed);
                }
                this.unwrap_record(&t, &record).await.map(Arc::new)
            })
            .await
            .map_err(|e: Arc<KeyringError>| (*e).clone())
    }

    /// Tries the version's wraps in root-preference order. An outage of one root falls through
    /// to the next; the error reported is the most actionable one seen.
    async fn unwrap_record(
        &self,
        tenant: &TenantId,
        record: &KeyVersionRecord,
    ) -> Result<DataKey, KeyringError> {
        let ctx = WrapContext {
            tenant,
            key_version: record.version,
            purpose: WrapPurpose::TenantDek,
        };
        let mut worst: Option<ProviderError> = None;
        for (i, root) in self.inner.roots.iter().enumerate() {
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

    async fn create(&self, tenant: &TenantId) -> Result<TenantRecord, KeyringError> {
        let ctx = WrapContext {
            tenant,
            key_version: 1,
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
        drop(dek);
        let now = unix_now();
        let first = KeyVersionRecord {
            version: 1,
            state: KeyState::Active,
            created_at: now,
            wrappings,
        };
        let record = self.inner.store.create_tenant(tenant, now, &first).await?;
        tracing::info!(tenant = %tenant, active_version = record.active_version, "tenant ready");
        Ok(record)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
