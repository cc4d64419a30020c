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

use crate::keyring::{KeyVersionRecord, KeyringStore, StoreError, TenantRecord, Wrapping};
use crate::providers::RootId;
use crate::tenant::TenantId;

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

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
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
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

fn read_tenant(conn: &Connection, tenant: &str) -> Result<Option<TenantRecord>, StoreError> {
    conn.query_row(
        "SELECT tenant, active_version, created_at FROM tenants WHERE tenant = ?1",
        params![tenant],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )
    .optional()
    .map_err(db)?
    .map(|(t, v, c)| {
        Ok(TenantRecord {
            tenant: tenant_of(t)?,
            active_version: version_of(v)?,
            created_at: c,
        })
    })
    .transpose()
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
            tx.execute(
                "INSERT INTO key_versions (tenant, version, state, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![t, first.version, first.state.as_str(), first.created_at],
            )
            .map_err(db)?;
            for w in &first.wrappings {
                tx.execute(
                    "INSERT INTO key_wrappings (tenant, version, root_id, blob) VALUES (?1, ?2, ?3, ?4)",
                    params![t, first.version, w.root.as_str(), w.blob],
                )
                .map_err(db)?;
            }
            let record = read_tenant(&tx, &t)?
                .ok_or_else(|| StoreError::Corrupt("tenant vanished inside its transaction".into()))?;
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
                .prepare_cached(
                    "SELECT tenant, active_version, created_at FROM tenants ORDER BY tenant",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            rows.into_iter()
                .map(|(t, v, c)| {
                    Ok(TenantRecord {
                        tenant: tenant_of(t)?,
                        active_version: version_of(v)?,
                        created_at: c,
                    })
                })
                .collect()
        })
        .await
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db))
            .await
    }
}

#[cfg(test)]
#[path = "sqlite_tests.rs"]
mod tests;
