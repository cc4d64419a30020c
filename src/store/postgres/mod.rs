//! The PostgreSQL engine, for a fleet of sidecars sharing one database: a bounded connection
//! pool (deadpool), TLS through rustls, migrations under an advisory lock, row locks
//! (`SELECT … FOR UPDATE`) and unique indexes for concurrent writers on other machines, and
//! LISTEN/NOTIFY so a change made through one sidecar reaches the others' caches at once.
//! Every wait is bounded (connect, pool, statement, lock), so an outage fails fast with
//! `StoreError::Unavailable`. Knows nothing about HTTP or key unwrapping.

mod connect;
mod listen;
mod schema;

pub use connect::PostgresOptions;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Pool};
use tokio::sync::mpsc;
use tokio_postgres::Row;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::keyring::{
    Approval, ApprovalState, KeyEvent, KeyEventKind, KeyVersionRecord, KeyringStore, RotateOutcome,
    ShredTarget, StoreChange, StoreError, TenantRecord, Wrapping,
};
use crate::providers::RootId;
use crate::tenant::TenantId;
use crate::vault::{InsertOutcome, StoredToken, TokenRow, VaultStore};

/// Held from the change-feed insert to commit, so feed entries commit in sequence order and a
/// reader of `events_since` never skips one committed late ("kms-evt" in ASCII).
const FEED_LOCK: i64 = 0x006b_6d73_2d65_7674;

const TENANT_COLUMNS: &str =
    "tenant, active_version, created_at, min_decrypt_version, destroyed_at, root_id";
const APPROVAL_COLUMNS: &str =
    "id, tenant, version, requested_by, requested_at, expires_at, approved_by, executed_at, state";

/// The PostgreSQL engine.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    options: Arc<PostgresOptions>,
    tls: MakeRustlsConnect,
}

impl PostgresStore {
    /// Connects, checks the server answers, and migrates the schema.
    pub async fn connect(options: &PostgresOptions) -> Result<Self, StoreError> {
        // Reads the CA file or the system's certificate directory: off the reactor.
        let tls = {
            let options = options.clone();
            tokio::task::spawn_blocking(move || options.tls())
                .await
                .map_err(|_| unavailable("TLS setup task failed"))?
                .map_err(StoreError::Unavailable)?
        };
        if options.tls_strippable() {
            tracing::warn!(store = %options.describe(),
                "store.url has no sslmode=verify-full (or require): a network attacker can downgrade to plaintext");
        }
        let pool = options.pool(tls.clone()).map_err(StoreError::Unavailable)?;
        let store = PostgresStore {
            pool,
            options: Arc::new(options.clone()),
            tls,
        };
        let mut client = store.client().await?;
        schema::migrate(&mut client).await?;
        Ok(store)
    }

    /// Host, port and database, for messages.
    pub fn describe(&self) -> String {
        self.options.describe()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| unavailable(&format!("postgres connection: {}", with_causes(&e))))
    }

    /// Runs one operation under an overall bound, whatever its statements do.
    async fn bounded<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let limit = self.options.connect_timeout + self.options.statement_timeout * 2;
        tokio::time::timeout(limit, op)
            .await
            .unwrap_or_else(|_| Err(unavailable("postgres operation timed out")))
    }
}

pub(super) fn unavailable(msg: &str) -> StoreError {
    StoreError::Unavailable(msg.to_owned())
}

/// Every database error is an outage as far as callers go: constraint violations the engine
/// expects are handled where they can happen.
pub(super) fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("postgres: {}", with_causes(&e)))
}

/// An error and its sources ("error performing TLS handshake: invalid peer certificate: …"):
/// the outermost message alone rarely says what to fix.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn tenant_of(s: String) -> Result<TenantId, StoreError> {
    TenantId::parse(&s).map_err(|_| StoreError::Corrupt("stored tenant id is invalid".into()))
}

fn version_of(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("stored key version {v} out of range")))
}

fn now() -> i64 {
    crate::keyring::unix_now()
}

fn tenant_record(r: &Row) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        tenant: tenant_of(r.try_get(0).map_err(pg)?)?,
        active_version: version_of(r.try_get(1).map_err(pg)?)?,
        created_at: r.try_get(2).map_err(pg)?,
        min_decrypt_version: version_of(r.try_get(3).map_err(pg)?)?,
        destroyed_at: r.try_get(4).map_err(pg)?,
        root: r
            .try_get::<_, Option<String>>(5)
            .map_err(pg)?
            .map(RootId::new),
    })
}

/// The tenant row; `lock` takes its row lock until the transaction ends, which is how
/// writers on different sidecars serialise per tenant.
async fn read_tenant(
    c: &impl GenericClient,
    tenant: &str,
    lock: bool,
) -> Result<Option<TenantRecord>, StoreError> {
    let sql = format!(
        "SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let stmt = c.prepare_cached(&sql).await.map_err(pg)?;
    c.query_opt(&stmt, &[&tenant])
        .await
        .map_err(pg)?
        .as_ref()
        .map(tenant_record)
        .transpose()
}

fn vanished() -> StoreError {
    StoreError::Corrupt("tenant vanished inside its transaction".into())
}

/// Appends to the change feed and notifies every listening sidecar; both take effect only
/// if the surrounding transaction commits.
async fn record_event(
    c: &impl GenericClient,
    tenant: &str,
    kind: KeyEventKind,
) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK])
        .await
        .map_err(pg)?;
    let stmt = c
        .prepare_cached("INSERT INTO key_events (tenant, kind, at) VALUES ($1, $2, $3)")
        .await
        .map_err(pg)?;
    c.execute(&stmt, &[&tenant, &kind.as_str(), &now()])
        .await
        .map_err(pg)?;
    c.execute("SELECT pg_notify($1, $2)", &[&listen::CHANNEL, &tenant])
        .await
        .map_err(pg)?;
    Ok(())
}

async fn insert_version(
    c: &impl GenericClient,
    tenant: &str,
    v: &KeyVersionRecord,
) -> Result<(), StoreError> {
    let stmt = c
        .prepare_cached(
            "INSERT INTO key_versions (tenant, version, state, created_at) VALUES ($1, $2, $3, $4)",
        )
        .await
        .map_err(pg)?;
    c.execute(
        &stmt,
        &[
            &tenant,
            &i64::from(v.version),
            &v.state.as_str(),
            &v.created_at,
        ],
    )
    .await
    .map_err(pg)?;
    let stmt = c
        .prepare_cached(
            "INSERT INTO key_wrappings (tenant, version, root_id, blob) VALUES ($1, $2, $3, $4)",
        )
        .await
        .map_err(pg)?;
    for w in &v.wrappings {
        c.execute(
            &stmt,
            &[&tenant, &i64::from(v.version), &w.root.as_str(), &w.blob],
        )
        .await
        .map_err(pg)?;
    }
    Ok(())
}

/// Versions with their wraps, in one statement (one snapshot), oldest first.
async fn read_versions(
    c: &impl GenericClient,
    tenant: &str,
    only: Option<u32>,
) -> Result<Vec<KeyVersionRecord>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT v.version, v.state, v.created_at, w.root_id, w.blob
             FROM key_versions v LEFT JOIN key_wrappings w USING (tenant, version)
             WHERE v.tenant = $1 AND ($2::BIGINT IS NULL OR v.version = $2)
             ORDER BY v.version, w.added",
        )
        .await
        .map_err(pg)?;
    let only = only.map(i64::from);
    let rows = c.query(&stmt, &[&tenant, &only]).await.map_err(pg)?;
    let mut out: Vec<KeyVersionRecord> = Vec::new();
    for r in rows {
        let version = version_of(r.try_get(0).map_err(pg)?)?;
        if out.last().is_none_or(|v| v.version != version) {
            let state: String = r.try_get(1).map_err(pg)?;
            out.push(KeyVersionRecord {
                version,
                state: state.parse().map_err(StoreError::Corrupt)?,
                created_at: r.try_get(2).map_err(pg)?,
                wrappings: Vec::new(),
            });
        }
        let root: Option<String> = r.try_get(3).map_err(pg)?;
        let blob: Option<Vec<u8>> = r.try_get(4).map_err(pg)?;
        if let (Some(root), Some(blob), Some(v)) = (root, blob, out.last_mut()) {
            v.wrappings.push(Wrapping {
                root: RootId::new(root),
                blob,
            });
        }
    }
    Ok(out)
}

fn approval_record(r: &Row) -> Result<Approval, StoreError> {
    let version: Option<i64> = r.try_get(2).map_err(pg)?;
    let state: String = r.try_get(8).map_err(pg)?;
    Ok(Approval {
        id: r.try_get(0).map_err(pg)?,
        tenant: tenant_of(r.try_get(1).map_err(pg)?)?,
        target: match version {
            None => ShredTarget::Tenant,
            Some(v) => ShredTarget::Version(version_of(v)?),
        },
        requested_by: r.try_get(3).map_err(pg)?,
        requested_at: r.try_get(4).map_err(pg)?,
        expires_at: r.try_get(5).map_err(pg)?,
        approved_by: r.try_get(6).map_err(pg)?,
        executed_at: r.try_get(7).map_err(pg)?,
        state: match state.as_str() {
            "pending" => ApprovalState::Pending,
            "executed" => ApprovalState::Executed,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown approval state {other:?}"
                )));
            }
        },
    })
}

#[async_trait]
impl KeyringStore for PostgresStore {
    async fn tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            read_tenant(&c, tenant.as_str(), false).await
        })
        .await
    }

    async fn create_tenant(
        &self,
        tenant: &TenantId,
        created_at: i64,
        first: &KeyVersionRecord,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str();
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            // A concurrent creator's uncommitted row makes this wait for it, then do nothing.
            let created = tx
                .execute(
                    "INSERT INTO tenants (tenant, active_version, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (tenant) DO NOTHING",
                    &[&t, &i64::from(first.version), &created_at],
                )
                .await
                .map_err(pg)?;
            if created == 1 {
                insert_version(&tx, t, first).await?;
            }
            let record = read_tenant(&tx, t, false).await?.ok_or_else(vanished)?;
            tx.commit().await.map_err(pg)?;
            Ok(record)
        })
        .await
    }

    async fn key_version(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Option<KeyVersionRecord>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            Ok(read_versions(&c, tenant.as_str(), Some(version))
                .await?
                .pop())
        })
        .await
    }

    async fn key_versions(&self, tenant: &TenantId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            read_versions(&c, tenant.as_str(), None).await
        })
        .await
    }

    async fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY tenant COLLATE \"C\""
                ))
                .await
                .map_err(pg)?;
            c.query(&stmt, &[])
                .await
                .map_err(pg)?
                .iter()
                .map(tenant_record)
                .collect()
        })
        .await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            c.simple_query("SELECT 1").await.map_err(pg)?;
            Ok(())
        })
        .await
    }

    async fn rotate(
        &self,
        tenant: &TenantId,
        expected_active: u32,
        new: &KeyVersionRecord,
    ) -> Result<RotateOutcome, StoreError> {
        let t = tenant.as_str();
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let current = read_tenant(&tx, t, true)
                .await?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            if current.destroyed_at.is_some() {
                return Err(StoreError::Refused("tenant destroyed".into()));
            }
            if current.active_version != expected_active
                || new.version != expected_active.saturating_add(1)
            {
                return Ok(RotateOutcome::Conflict(current));
            }
            tx.execute(
                "UPDATE key_versions SET state = 'decrypt-only' WHERE tenant = $1 AND version = $2",
                &[&t, &i64::from(expected_active)],
            )
            .await
            .map_err(pg)?;
            insert_version(&tx, t, new).await?;
            tx.execute(
                "UPDATE tenants SET active_version = $2 WHERE tenant = $1",
                &[&t, &i64::from(new.version)],
            )
            .await
            .map_err(pg)?;
            record_event(&tx, t, KeyEventKind::Rotated).await?;
            let record = read_tenant(&tx, t, false).await?.ok_or_else(vanished)?;
            tx.commit().await.map_err(pg)?;
            Ok(RotateOutcome::Rotated(record))
        })
        .await
    }

    async fn set_tenant_root(
        &self,
        tenant: &TenantId,
        root: &RootId,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str();
        let root = root.as_str();
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let current = read_tenant(&tx, t, true)
                .await?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            if current.destroyed_at.is_some() {
                return Err(StoreError::Refused("tenant destroyed".into()));
            }
            tx.execute(
                "UPDATE tenants SET root_id = $2 WHERE tenant = $1",
                &[&t, &root],
            )
            .await
            .map_err(pg)?;
            record_event(&tx, t, KeyEventKind::RootChanged).await?;
            let record = read_tenant(&tx, t, false).await?.ok_or_else(vanished)?;
            tx.commit().await.map_err(pg)?;
            Ok(record)
        })
        .await
    }

    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        min: u32,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str();
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let current = read_tenant(&tx, t, true)
                .await?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            if current.destroyed_at.is_some() {
                return Err(StoreError::Refused("tenant destroyed".into()));
            }
            if min < 1 || min > current.active_version {
                return Err(StoreError::Refused(format!(
                    "min_decrypt_version must be between 1 and the active version {}",
                    current.active_version
                )));
            }
            tx.execute(
                "UPDATE tenants SET min_decrypt_version = $2 WHERE tenant = $1",
                &[&t, &i64::from(min)],
            )
            .await
            .map_err(pg)?;
            record_event(&tx, t, KeyEventKind::Retired).await?;
            let record = read_tenant(&tx, t, false).await?.ok_or_else(vanished)?;
            tx.commit().await.map_err(pg)?;
            Ok(record)
        })
        .await
    }

    async fn shred(
        &self,
        tenant: &TenantId,
        target: ShredTarget,
        at: i64,
    ) -> Result<(), StoreError> {
        let t = tenant.as_str();
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let current = read_tenant(&tx, t, true)
                .await?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            match target {
                ShredTarget::Tenant => {
                    tx.execute("DELETE FROM key_wrappings WHERE tenant = $1", &[&t])
                        .await
                        .map_err(pg)?;
                    // Unreadable already without the keys; deleted too, so nothing lingers.
                    tx.execute("DELETE FROM tokens WHERE tenant = $1", &[&t])
                        .await
                        .map_err(pg)?;
                    tx.execute(
                        "UPDATE key_versions SET state = 'destroyed' WHERE tenant = $1",
                        &[&t],
                    )
                    .await
                    .map_err(pg)?;
                    tx.execute(
                        "UPDATE tenants SET destroyed_at = COALESCE(destroyed_at, $2) WHERE tenant = $1",
                        &[&t, &at],
                    )
                    .await
                    .map_err(pg)?;
                }
                ShredTarget::Version(v) => {
                    if current.destroyed_at.is_none() && v == current.active_version {
                        return Err(StoreError::Refused(
                            "the active version cannot be shredded; rotate first".into(),
                        ));
                    }
                    let n = tx
                        .execute(
                            "UPDATE key_versions SET state = 'destroyed' WHERE tenant = $1 AND version = $2",
                            &[&t, &i64::from(v)],
                        )
                        .await
                        .map_err(pg)?;
                    if n == 0 {
                        return Err(StoreError::Refused(format!("key version {v} not found")));
                    }
                    tx.execute(
                        "DELETE FROM key_wrappings WHERE tenant = $1 AND version = $2",
                        &[&t, &i64::from(v)],
                    )
                    .await
                    .map_err(pg)?;
                }
            }
            record_event(&tx, t, KeyEventKind::Shredded).await?;
            tx.commit().await.map_err(pg)?;
            // The deleted rows stay in the heap as dead tuples until vacuumed; reclaim them now
            // rather than whenever autovacuum gets to it. Best effort: the shred has committed,
            // and PostgreSQL never overwrites freed space on purpose (see the README).
            if let Err(e) = c.batch_execute("VACUUM key_wrappings").await {
                tracing::warn!(error = %e, "VACUUM after shred failed; autovacuum will reclaim the rows");
            }
            Ok(())
        })
        .await
    }

    async fn put_wrapping(
        &self,
        tenant: &TenantId,
        version: u32,
        wrapping: &Wrapping,
        drop_root: Option<&RootId>,
    ) -> Result<bool, StoreError> {
        let t = tenant.as_str();
        let drop_root = drop_root.filter(|r| **r != wrapping.root);
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            read_tenant(&tx, t, true).await?;
            let state: Option<String> = tx
                .query_opt(
                    "SELECT state FROM key_versions WHERE tenant = $1 AND version = $2",
                    &[&t, &i64::from(version)],
                )
                .await
                .map_err(pg)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(pg)?;
            match state.as_deref() {
                None => return Err(StoreError::Refused(format!("key version {version} not found"))),
                Some("destroyed") => return Ok(false),
                Some(_) => {}
            }
            let added = tx
                .execute(
                    "INSERT INTO key_wrappings (tenant, version, root_id, blob) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant, version, root_id) DO NOTHING",
                    &[&t, &i64::from(version), &wrapping.root.as_str(), &wrapping.blob],
                )
                .await
                .map_err(pg)?;
            let dropped = match drop_root {
                Some(r) => tx
                    .execute(
                        "DELETE FROM key_wrappings WHERE tenant = $1 AND version = $2 AND root_id = $3",
                        &[&t, &i64::from(version), &r.as_str()],
                    )
                    .await
                    .map_err(pg)?,
                None => 0,
            };
            if added + dropped > 0 {
                record_event(&tx, t, KeyEventKind::Rewrapped).await?;
            }
            tx.commit().await.map_err(pg)?;
            Ok(added + dropped > 0)
        })
        .await
    }

    async fn events_since(&self, seq: i64) -> Result<Vec<KeyEvent>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached(
                    "SELECT seq, tenant, kind FROM key_events WHERE seq > $1 ORDER BY seq LIMIT 10000",
                )
                .await
                .map_err(pg)?;
            c.query(&stmt, &[&seq])
                .await
                .map_err(pg)?
                .iter()
                .map(|r| {
                    Ok(KeyEvent {
                        seq: r.try_get(0).map_err(pg)?,
                        tenant: tenant_of(r.try_get(1).map_err(pg)?)?,
                        kind: r.try_get(2).map_err(pg)?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn last_event(&self) -> Result<i64, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            c.query_one("SELECT COALESCE(MAX(seq), 0) FROM key_events", &[])
                .await
                .map_err(pg)?
                .try_get(0)
                .map_err(pg)
        })
        .await
    }

    /// Pushed by LISTEN/NOTIFY rather than polled; `poll_every` is not used.
    fn subscribe(self: Arc<Self>, _poll_every: Duration) -> mpsc::Receiver<StoreChange> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(listen::listen(self.options.clone(), self.tls.clone(), tx));
        rx
    }

    async fn create_approval(&self, a: &Approval) -> Result<(), StoreError> {
        let version = match a.target {
            ShredTarget::Tenant => None,
            ShredTarget::Version(v) => Some(i64::from(v)),
        };
        self.bounded(async {
            let c = self.client().await?;
            c.execute(
                &format!(
                    "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ),
                &[
                    &a.id,
                    &a.tenant.as_str(),
                    &version,
                    &a.requested_by,
                    &a.requested_at,
                    &a.expires_at,
                    &a.approved_by,
                    &a.executed_at,
                    &a.state.as_str(),
                ],
            )
            .await
            .map_err(pg)?;
            Ok(())
        })
        .await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            c.query_opt(
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg)?
            .as_ref()
            .map(approval_record)
            .transpose()
        })
        .await
    }

    async fn pending_approvals(&self, now: i64) -> Result<Vec<Approval>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            c.query(
                &format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE state = 'pending' AND expires_at > $1 ORDER BY requested_at"
                ),
                &[&now],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(approval_record)
            .collect()
        })
        .await
    }

    async fn complete_approval(
        &self,
        id: &str,
        approver: &str,
        at: i64,
    ) -> Result<bool, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "UPDATE approvals SET state = 'executed', approved_by = $2, executed_at = $3
                     WHERE id = $1 AND state = 'pending' AND requested_by <> $2",
                    &[&id, &approver, &at],
                )
                .await
                .map_err(pg)?;
            Ok(n == 1)
        })
        .await
    }
}

/// The unexpired deterministic token for this index, if any.
async fn find_deterministic(
    c: &impl GenericClient,
    r: &TokenRow,
    now: i64,
) -> Result<Option<InsertOutcome>, StoreError> {
    let stmt = c
        .prepare_cached(
            "SELECT token, expires_at FROM tokens WHERE tenant = $1 AND format = $2 AND det_index = $3
             AND (expires_at IS NULL OR expires_at > $4)",
        )
        .await
        .map_err(pg)?;
    c.query_opt(&stmt, &[&r.tenant.as_str(), &r.format, &r.det_index, &now])
        .await
        .map_err(pg)?
        .map(|row| {
            Ok(InsertOutcome::Existing {
                token: row.try_get(0).map_err(pg)?,
                expires_at: row.try_get(1).map_err(pg)?,
            })
        })
        .transpose()
}

#[async_trait]
impl VaultStore for PostgresStore {
    async fn insert_tokens(
        &self,
        rows: &[TokenRow],
        now: i64,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        self.bounded(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(pg)?;
            let drop_expired = tx
                .prepare_cached(
                    "DELETE FROM tokens WHERE tenant = $1 AND format = $2 AND det_index = $3 AND expires_at <= $4",
                )
                .await
                .map_err(pg)?;
            // Conflicts on the token or on the deterministic index both leave the row out;
            // which one it was is told apart below.
            let insert = tx
                .prepare_cached(
                    "INSERT INTO tokens (tenant, token, format, det_index, sealed, key_version, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                )
                .await
                .map_err(pg)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let t = r.tenant.as_str();
                if r.det_index.is_some() {
                    if let Some(existing) = find_deterministic(&tx, r, now).await? {
                        out.push(existing);
                        continue;
                    }
                    tx.execute(&drop_expired, &[&t, &r.format, &r.det_index, &now])
                        .await
                        .map_err(pg)?;
                }
                let n = tx
                    .execute(
                        &insert,
                        &[
                            &t,
                            &r.token,
                            &r.format,
                            &r.det_index,
                            &r.sealed,
                            &i64::from(r.key_version),
                            &r.created_at,
                            &r.expires_at,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                if n == 1 {
                    out.push(InsertOutcome::Inserted);
                    continue;
                }
                // Another sidecar may have just committed the same deterministic value.
                let existing = match r.det_index {
                    Some(_) => find_deterministic(&tx, r, now).await?,
                    None => None,
                };
                out.push(existing.unwrap_or(InsertOutcome::TokenTaken));
            }
            tx.commit().await.map_err(pg)?;
            Ok(out)
        })
        .await
    }

    async fn lookup_tokens(
        &self,
        tenant: &TenantId,
        tokens: &[String],
        now: i64,
    ) -> Result<Vec<Option<StoredToken>>, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let stmt = c
                .prepare_cached(
                    "SELECT token, format, sealed, expires_at FROM tokens
                     WHERE tenant = $1 AND token = ANY($2) AND (expires_at IS NULL OR expires_at > $3)",
                )
                .await
                .map_err(pg)?;
            let rows = c
                .query(&stmt, &[&tenant.as_str(), &tokens, &now])
                .await
                .map_err(pg)?;
            let mut found = HashMap::with_capacity(rows.len());
            for r in rows {
                let token: String = r.try_get(0).map_err(pg)?;
                found.insert(
                    token,
                    StoredToken {
                        format: r.try_get(1).map_err(pg)?,
                        sealed: r.try_get(2).map_err(pg)?,
                        expires_at: r.try_get(3).map_err(pg)?,
                    },
                );
            }
            Ok(tokens.iter().map(|t| found.get(t).cloned()).collect())
        })
        .await
    }

    async fn delete_token(
        &self,
        tenant: &TenantId,
        token: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            let n = c
                .execute(
                    "DELETE FROM tokens WHERE tenant = $1 AND token = $2 AND (expires_at IS NULL OR expires_at > $3)",
                    &[&tenant.as_str(), &token, &now],
                )
                .await
                .map_err(pg)?;
            Ok(n == 1)
        })
        .await
    }

    async fn purge_expired_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.bounded(async {
            let c = self.client().await?;
            c.execute("DELETE FROM tokens WHERE expires_at <= $1", &[&now])
                .await
                .map_err(pg)
        })
        .await
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
