//! The embedded SQLite engine: one file under the data dir (mode 0600), WAL journal, full fsync,
//! schema migrations by `PRAGMA user_version`. Blocking calls run on tokio's blocking pool,
//! never on the reactor.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::keyring::{
    Approval, ApprovalState, KeyEvent, KeyEventKind, KeyVersionRecord, KeyringStore, RotateOutcome,
    ShredTarget, StoreError, TenantRecord, Wrapping,
};
use crate::providers::RootId;
use crate::tenant::TenantId;
use crate::vault::{InsertOutcome, StoredToken, TokenRow, VaultStore};

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    tenant          TEXT    PRIMARY KEY NOT NULL,
    active_version  INTEGER NOT NULL CHECK (active_version >= 1),
    created_at      INTEGER NOT NULL
) STRICT;
CREATE TABLE key_versions (
    tenant      TEXT    NOT NULL REFERENCES tenants (tenant),
    version     INTEGER NOT NULL CHECK (version >= 1),
    state       TEXT    NOT NULL CHECK (state IN ('active', 'decrypt-only', 'destroyed')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, version)
) STRICT;
-- A tenant has at most one active version, whatever the code above does.
CREATE UNIQUE INDEX key_versions_one_active ON key_versions (tenant) WHERE state = 'active';
CREATE TABLE key_wrappings (
    tenant   TEXT    NOT NULL,
    version  INTEGER NOT NULL,
    root_id  TEXT    NOT NULL,
    blob     BLOB    NOT NULL,
    PRIMARY KEY (tenant, version, root_id),
    FOREIGN KEY (tenant, version) REFERENCES key_versions (tenant, version)
) STRICT;
"#,
    r#"
ALTER TABLE tenants ADD COLUMN min_decrypt_version INTEGER NOT NULL DEFAULT 1 CHECK (min_decrypt_version >= 1);
ALTER TABLE tenants ADD COLUMN destroyed_at INTEGER;
-- The change feed other sidecars on this store poll to drop stale cache entries.
CREATE TABLE key_events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant  TEXT    NOT NULL,
    kind    TEXT    NOT NULL,
    at      INTEGER NOT NULL
) STRICT;
CREATE TABLE approvals (
    id            TEXT    PRIMARY KEY NOT NULL,
    tenant        TEXT    NOT NULL,
    version       INTEGER,
    requested_by  TEXT    NOT NULL,
    requested_at  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    approved_by   TEXT,
    executed_at   INTEGER,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'executed')),
    CHECK (approved_by IS NULL OR approved_by <> requested_by)
) STRICT;
"#,
    r#"
CREATE TABLE tokens (
    tenant       TEXT    NOT NULL,
    token        TEXT    NOT NULL,
    format       TEXT    NOT NULL,
    det_index    BLOB,
    sealed       BLOB    NOT NULL,
    key_version  INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    PRIMARY KEY (tenant, token)
) STRICT, WITHOUT ROWID;
-- One deterministic token per (tenant, format, value): the index is an HMAC, never the value.
CREATE UNIQUE INDEX tokens_deterministic ON tokens (tenant, format, det_index) WHERE det_index IS NOT NULL;
CREATE INDEX tokens_expiry ON tokens (expires_at) WHERE expires_at IS NOT NULL;
"#,
    // The tenant's own root (BYOK customer-managed key); NULL = the configured roots.
    r#"
ALTER TABLE tenants ADD COLUMN root_id TEXT CHECK (root_id IS NULL OR length(root_id) > 0);
"#,
];

const TENANT_COLUMNS: &str =
    "tenant, active_version, created_at, min_decrypt_version, destroyed_at, root_id";

/// The SQLite engine.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        let mut conn = Connection::open(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db)?;
        conn.execute_batch(
            // secure_delete: shredded key material is overwritten in the file, not just unlinked.
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA secure_delete = ON;",
        )
        .map_err(db)?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| unavailable("sqlite connection poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|_| unavailable("sqlite task failed".into()))?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let current: usize = tx
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db)?
        .try_into()
        .map_err(|_| StoreError::Corrupt("negative schema version".into()))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this binary ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.execute_batch(sql).map_err(db)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db)?;
    }
    tx.commit().map_err(db)
}

fn unavailable(msg: String) -> StoreError {
    StoreError::Unavailable(msg)
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

fn tenant_of(s: String) -> Result<TenantId, StoreError> {
    TenantId::parse(&s).map_err(|_| StoreError::Corrupt("stored tenant id is invalid".into()))
}

fn version_of(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("stored key version {v} out of range")))
}

type TenantRow = (String, i64, i64, i64, Option<i64>, Option<String>);

fn tenant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TenantRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn tenant_record((t, v, c, min, destroyed, root): TenantRow) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        tenant: tenant_of(t)?,
        active_version: version_of(v)?,
        created_at: c,
        min_decrypt_version: version_of(min)?,
        destroyed_at: destroyed,
        root: root.map(RootId::new),
    })
}

fn read_tenant(conn: &Connection, tenant: &str) -> Result<Option<TenantRecord>, StoreError> {
    conn.query_row(
        &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE tenant = ?1"),
        params![tenant],
        tenant_row,
    )
    .optional()
    .map_err(db)?
    .map(tenant_record)
    .transpose()
}

fn record_event(conn: &Connection, tenant: &str, kind: KeyEventKind) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO key_events (tenant, kind, at) VALUES (?1, ?2, ?3)",
        params![tenant, kind.as_str(), now()],
    )
    .map_err(db)?;
    Ok(())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn insert_version(conn: &Connection, tenant: &str, v: &KeyVersionRecord) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO key_versions (tenant, version, state, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![tenant, v.version, v.state.as_str(), v.created_at],
    )
    .map_err(db)?;
    for w in &v.wrappings {
        conn.execute(
            "INSERT INTO key_wrappings (tenant, version, root_id, blob) VALUES (?1, ?2, ?3, ?4)",
            params![tenant, v.version, w.root.as_str(), w.blob],
        )
        .map_err(db)?;
    }
    Ok(())
}

type ApprovalRow = (
    String,
    String,
    Option<i64>,
    String,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    String,
);

const APPROVAL_COLUMNS: &str =
    "id, tenant, version, requested_by, requested_at, expires_at, approved_by, executed_at, state";

fn approval_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApprovalRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn approval_record(row: ApprovalRow) -> Result<Approval, StoreError> {
    let (
        id,
        tenant,
        version,
        requested_by,
        requested_at,
        expires_at,
        approved_by,
        executed_at,
        state,
    ) = row;
    Ok(Approval {
        id,
        tenant: tenant_of(tenant)?,
        target: match version {
            None => ShredTarget::Tenant,
            Some(v) => ShredTarget::Version(version_of(v)?),
        },
        requested_by,
        requested_at,
        expires_at,
        approved_by,
        executed_at,
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

fn read_versions(
    conn: &Connection,
    tenant: &str,
    only: Option<u32>,
) -> Result<Vec<KeyVersionRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT version, state, created_at FROM key_versions
             WHERE tenant = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map(params![tenant, only], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    let mut wstmt = conn
        .prepare_cached(
            "SELECT root_id, blob FROM key_wrappings WHERE tenant = ?1 AND version = ?2
             ORDER BY rowid",
        )
        .map_err(db)?;
    rows.into_iter()
        .map(|(v, state, created_at)| {
            let wrappings = wstmt
                .query_map(params![tenant, v], |r| {
                    Ok(Wrapping {
                        root: RootId::new(r.get::<_, String>(0)?),
                        blob: r.get::<_, Vec<u8>>(1)?,
                    })
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(KeyVersionRecord {
                version: version_of(v)?,
                state: state.parse().map_err(StoreError::Corrupt)?,
                created_at,
                wrappings,
            })
        })
        .collect()
}

#[async_trait]
impl KeyringStore for SqliteStore {
    async fn tenant(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let t = tenant.as_str().to_owned();
        self.with(move |c| read_tenant(c, &t)).await
    }

    async fn create_tenant(
        &self,
        tenant: &TenantId,
        created_at: i64,
        first: &KeyVersionRecord,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str().to_owned();
        let first = first.clone();
        self.with(move |c| {
            // IMMEDIATE takes the write lock first, so two creators serialise here even across
            // processes sharing the file.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            if let Some(existing) = read_tenant(&tx, &t)? {
                return Ok(existing);
            }
            tx.execute(
                "INSERT INTO tenants (tenant, active_version, created_at) VALUES (?1, ?2, ?3)",
                params![t, first.version, created_at],
            )
            .map_err(db)?;
            insert_version(&tx, &t, &first)?;
            let record = read_tenant(&tx, &t)?.ok_or_else(|| {
                StoreError::Corrupt("tenant vanished inside its transaction".into())
            })?;
            tx.commit().map_err(db)?;
            Ok(record)
        })
        .await
    }

    async fn key_version(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Option<KeyVersionRecord>, StoreError> {
        let t = tenant.as_str().to_owned();
        self.with(move |c| Ok(read_versions(c, &t, Some(version))?.pop()))
            .await
    }

    async fn key_versions(&self, tenant: &TenantId) -> Result<Vec<KeyVersionRecord>, StoreError> {
        let t = tenant.as_str().to_owned();
        self.with(move |c| read_versions(c, &t, None)).await
    }

    async fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY tenant"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map([], tenant_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            rows.into_iter().map(tenant_record).collect()
        })
        .await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db))
            .await
    }

    async fn rotate(
        &self,
        tenant: &TenantId,
        expected_active: u32,
        new: &KeyVersionRecord,
    ) -> Result<RotateOutcome, StoreError> {
        let t = tenant.as_str().to_owned();
        let new = new.clone();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let current = read_tenant(&tx, &t)?
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
                "UPDATE key_versions SET state = 'decrypt-only' WHERE tenant = ?1 AND version = ?2",
                params![t, expected_active],
            )
            .map_err(db)?;
            insert_version(&tx, &t, &new)?;
            tx.execute(
                "UPDATE tenants SET active_version = ?2 WHERE tenant = ?1",
                params![t, new.version],
            )
            .map_err(db)?;
            record_event(&tx, &t, KeyEventKind::Rotated)?;
            let record = read_tenant(&tx, &t)?.ok_or_else(|| {
                StoreError::Corrupt("tenant vanished inside its transaction".into())
            })?;
            tx.commit().map_err(db)?;
            Ok(RotateOutcome::Rotated(record))
        })
        .await
    }

    async fn set_min_decrypt_version(
        &self,
        tenant: &TenantId,
        min: u32,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str().to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let current = read_tenant(&tx, &t)?
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
                "UPDATE tenants SET min_decrypt_version = ?2 WHERE tenant = ?1",
                params![t, min],
            )
            .map_err(db)?;
            record_event(&tx, &t, KeyEventKind::Retired)?;
            let record = read_tenant(&tx, &t)?.ok_or_else(|| {
                StoreError::Corrupt("tenant vanished inside its transaction".into())
            })?;
            tx.commit().map_err(db)?;
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
        let t = tenant.as_str().to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let current = read_tenant(&tx, &t)?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            match target {
                ShredTarget::Tenant => {
                    tx.execute("DELETE FROM key_wrappings WHERE tenant = ?1", params![t])
                        .map_err(db)?;
                    // Unreadable already without the keys; deleted too, so nothing lingers.
                    tx.execute("DELETE FROM tokens WHERE tenant = ?1", params![t])
                        .map_err(db)?;
                    tx.execute(
                        "UPDATE key_versions SET state = 'destroyed' WHERE tenant = ?1",
                        params![t],
                    )
                    .map_err(db)?;
                    tx.execute(
                        "UPDATE tenants SET destroyed_at = COALESCE(destroyed_at, ?2) WHERE tenant = ?1",
                        params![t, at],
                    )
                    .map_err(db)?;
                }
                ShredTarget::Version(v) => {
                    if current.destroyed_at.is_none() && v == current.active_version {
                        return Err(StoreError::Refused(
                            "the active version cannot be shredded; rotate first".into(),
                        ));
                    }
                    let n = tx
                        .execute(
                            "UPDATE key_versions SET state = 'destroyed' WHERE tenant = ?1 AND version = ?2",
                            params![t, v],
                        )
                        .map_err(db)?;
                    if n == 0 {
                        return Err(StoreError::Refused(format!("key version {v} not found")));
                    }
                    tx.execute(
                        "DELETE FROM key_wrappings WHERE tenant = ?1 AND version = ?2",
                        params![t, v],
                    )
                    .map_err(db)?;
                }
            }
            record_event(&tx, &t, KeyEventKind::Shredded)?;
            tx.commit().map_err(db)?;
            // Old page images of the erased rows may sit in the WAL: fold it into the main file
            // (where secure_delete zeroed them) and truncate it.
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(db)?;
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
        let t = tenant.as_str().to_owned();
        let w = wrapping.clone();
        let drop_root = drop_root
            .filter(|r| **r != w.root)
            .map(|r| r.as_str().to_owned());
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM key_versions WHERE tenant = ?1 AND version = ?2",
                    params![t, version],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            match state.as_deref() {
                None => return Err(StoreError::Refused(format!("key version {version} not found"))),
                Some("destroyed") => return Ok(false),
                Some(_) => {}
            }
            let added = tx
                .execute(
                    "INSERT OR IGNORE INTO key_wrappings (tenant, version, root_id, blob) VALUES (?1, ?2, ?3, ?4)",
                    params![t, version, w.root.as_str(), w.blob],
                )
                .map_err(db)?;
            let dropped = match &drop_root {
                Some(r) => tx
                    .execute(
                        "DELETE FROM key_wrappings WHERE tenant = ?1 AND version = ?2 AND root_id = ?3",
                        params![t, version, r],
                    )
                    .map_err(db)?,
                None => 0,
            };
            if added + dropped > 0 {
                record_event(&tx, &t, KeyEventKind::Rewrapped)?;
            }
            tx.commit().map_err(db)?;
            Ok(added + dropped > 0)
        })
        .await
    }

    async fn set_tenant_root(
        &self,
        tenant: &TenantId,
        root: &RootId,
    ) -> Result<TenantRecord, StoreError> {
        let t = tenant.as_str().to_owned();
        let root = root.as_str().to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let current = read_tenant(&tx, &t)?
                .ok_or_else(|| StoreError::Refused("tenant not found".into()))?;
            if current.destroyed_at.is_some() {
                return Err(StoreError::Refused("tenant destroyed".into()));
            }
            tx.execute(
                "UPDATE tenants SET root_id = ?2 WHERE tenant = ?1",
                params![t, root],
            )
            .map_err(db)?;
            record_event(&tx, &t, KeyEventKind::RootChanged)?;
            let record = read_tenant(&tx, &t)?.ok_or_else(|| {
                StoreError::Corrupt("tenant vanished inside its transaction".into())
            })?;
            tx.commit().map_err(db)?;
            Ok(record)
        })
        .await
    }

    async fn events_since(&self, seq: i64) -> Result<Vec<KeyEvent>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, tenant, kind FROM key_events WHERE seq > ?1 ORDER BY seq LIMIT 10000",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map(params![seq], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            rows.into_iter()
                .map(|(seq, t, kind)| Ok(KeyEvent { seq, tenant: tenant_of(t)?, kind }))
                .collect()
        })
        .await
    }

    async fn last_event(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM key_events", [], |r| {
                r.get(0)
            })
            .map_err(db)
        })
        .await
    }

    async fn create_approval(&self, a: &Approval) -> Result<(), StoreError> {
        let a = a.clone();
        self.with(move |c| {
            let version = match a.target {
                ShredTarget::Tenant => None,
                ShredTarget::Version(v) => Some(v),
            };
            c.execute(
                &format!("INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    a.id,
                    a.tenant.as_str(),
                    version,
                    a.requested_by,
                    a.requested_at,
                    a.expires_at,
                    a.approved_by,
                    a.executed_at,
                    a.state.as_str()
                ],
            )
            .map_err(db)?;
            Ok(())
        })
        .await
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.query_row(
                &format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?1"),
                params![id],
                approval_row,
            )
            .optional()
            .map_err(db)?
            .map(approval_record)
            .transpose()
        })
        .await
    }

    async fn pending_approvals(&self, now: i64) -> Result<Vec<Approval>, StoreError> {
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE state = 'pending' AND expires_at > ?1 ORDER BY requested_at"
                ))
                .map_err(db)?;
            let rows = stmt
                .query_map(params![now], approval_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            rows.into_iter().map(approval_record).collect()
        })
        .await
    }

    async fn complete_approval(
        &self,
        id: &str,
        approver: &str,
        at: i64,
    ) -> Result<bool, StoreError> {
        let (id, approver) = (id.to_owned(), approver.to_owned());
        self.with(move |c| {
            let n = c
                .execute(
                    "UPDATE approvals SET state = 'executed', approved_by = ?2, executed_at = ?3
                     WHERE id = ?1 AND state = 'pending' AND requested_by <> ?2",
                    params![id, approver, at],
                )
                .map_err(db)?;
            Ok(n == 1)
        })
        .await
    }
}

#[async_trait]
impl VaultStore for SqliteStore {
    async fn insert_tokens(
        &self,
        rows: &[TokenRow],
        now: i64,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let rows = rows.to_vec();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db)?;
            let mut out = Vec::with_capacity(rows.len());
            {
                let mut find_det = tx
                    .prepare_cached(
                        "SELECT token, expires_at FROM tokens WHERE tenant = ?1 AND format = ?2 AND det_index = ?3
                         AND (expires_at IS NULL OR expires_at > ?4)",
                    )
                    .map_err(db)?;
                let mut drop_expired_det = tx
                    .prepare_cached(
                        "DELETE FROM tokens WHERE tenant = ?1 AND format = ?2 AND det_index = ?3 AND expires_at <= ?4",
                    )
                    .map_err(db)?;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO tokens (tenant, token, format, det_index, sealed, key_version, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .map_err(db)?;
                for r in &rows {
                    let t = r.tenant.as_str();
                    if let Some(idx) = &r.det_index {
                        let existing = find_det
                            .query_row(params![t, r.format, idx, now], |row| {
                                Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?))
                            })
                            .optional()
                            .map_err(db)?;
                        if let Some((token, expires_at)) = existing {
                            out.push(InsertOutcome::Existing { token, expires_at });
                            continue;
                        }
                        drop_expired_det
                            .execute(params![t, r.format, idx, now])
                            .map_err(db)?;
                    }
                    let n = insert
                        .execute(params![
                            t,
                            r.token,
                            r.format,
                            r.det_index,
                            r.sealed,
                            r.key_version,
                            r.created_at,
                            r.expires_at
                        ])
                        .map_err(db)?;
                    out.push(if n == 1 {
                        InsertOutcome::Inserted
                    } else {
                        InsertOutcome::TokenTaken
                    });
                }
            }
            tx.commit().map_err(db)?;
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
        let t = tenant.as_str().to_owned();
        let tokens = tokens.to_vec();
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT format, sealed, expires_at FROM tokens WHERE tenant = ?1 AND token = ?2
                     AND (expires_at IS NULL OR expires_at > ?3)",
                )
                .map_err(db)?;
            tokens
                .iter()
                .map(|token| {
                    stmt.query_row(params![t, token, now], |r| {
                        Ok(StoredToken {
                            format: r.get(0)?,
                            sealed: r.get(1)?,
                            expires_at: r.get(2)?,
                        })
                    })
                    .optional()
                    .map_err(db)
                })
                .collect()
        })
        .await
    }

    async fn delete_token(
        &self,
        tenant: &TenantId,
        token: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (t, token) = (tenant.as_str().to_owned(), token.to_owned());
        self.with(move |c| {
            let n = c
                .execute(
                    "DELETE FROM tokens WHERE tenant = ?1 AND token = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                    params![t, token, now],
                )
                .map_err(db)?;
            Ok(n == 1)
        })
        .await
    }

    async fn purge_expired_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.with(move |c| {
            let n = c
                .execute("DELETE FROM tokens WHERE expires_at <= ?1", params![now])
                .map_err(db)?;
            Ok(n as u64)
        })
        .await
    }
}

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
