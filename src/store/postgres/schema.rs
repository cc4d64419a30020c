//! The PostgreSQL schema, as an append-only list of migrations, and the one function that
//! applies them: inside a transaction holding an advisory lock, so any number of sidecars may
//! start at once against a new or older database. Knows nothing about the store's queries.
//!
//! To change the schema, append a migration; never edit or reorder one that has shipped. The
//! SQLite engine keeps its own list (`sqlite.rs`): the two are numbered independently.

use tokio_postgres::Client;

use super::{pg, unavailable};
use crate::keyring::StoreError;

/// Each entry moves the schema from version `index` to `index + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tenants (
    tenant               TEXT   PRIMARY KEY,
    active_version       BIGINT NOT NULL CHECK (active_version >= 1),
    created_at           BIGINT NOT NULL,
    min_decrypt_version  BIGINT NOT NULL DEFAULT 1 CHECK (min_decrypt_version >= 1),
    destroyed_at         BIGINT
);
CREATE TABLE key_versions (
    tenant      TEXT   NOT NULL REFERENCES tenants (tenant),
    version     BIGINT NOT NULL CHECK (version >= 1),
    state       TEXT   NOT NULL CHECK (state IN ('active', 'decrypt-only', 'destroyed')),
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, version)
);
-- A tenant has at most one active version, whatever the code above does.
CREATE UNIQUE INDEX key_versions_one_active ON key_versions (tenant) WHERE state = 'active';
CREATE TABLE key_wrappings (
    tenant   TEXT   NOT NULL,
    version  BIGINT NOT NULL,
    root_id  TEXT   NOT NULL,
    blob     BYTEA  NOT NULL,
    -- Wraps are listed in the order they were added, as SQLite's rowid gives them.
    added    BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (tenant, version, root_id),
    FOREIGN KEY (tenant, version) REFERENCES key_versions (tenant, version)
);
-- The change feed; sidecars on this database are also told of each entry by NOTIFY.
CREATE TABLE key_events (
    seq     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant  TEXT   NOT NULL,
    kind    TEXT   NOT NULL,
    at      BIGINT NOT NULL
);
CREATE TABLE approvals (
    id            TEXT   PRIMARY KEY,
    tenant        TEXT   NOT NULL,
    version       BIGINT,
    requested_by  TEXT   NOT NULL,
    requested_at  BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    approved_by   TEXT,
    executed_at   BIGINT,
    state         TEXT   NOT NULL CHECK (state IN ('pending', 'executed')),
    CHECK (approved_by IS NULL OR approved_by <> requested_by)
);
CREATE TABLE tokens (
    tenant       TEXT   NOT NULL,
    token        TEXT   NOT NULL,
    format       TEXT   NOT NULL,
    det_index    BYTEA,
    sealed       BYTEA  NOT NULL,
    key_version  BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    PRIMARY KEY (tenant, token)
);
-- One deterministic token per (tenant, format, value): the index is an HMAC, never the value.
CREATE UNIQUE INDEX tokens_deterministic ON tokens (tenant, format, det_index) WHERE det_index IS NOT NULL;
CREATE INDEX tokens_expiry ON tokens (expires_at) WHERE expires_at IS NOT NULL;
"#,
    // The tenant's own root (BYOK customer-managed key); NULL = the configured roots.
    r#"
ALTER TABLE tenants ADD COLUMN root_id TEXT CHECK (root_id IS NULL OR length(root_id) > 0);
"#,
];

/// Advisory lock key held while migrating ("kms-mig" in ASCII). Advisory locks are per
/// database, so sidecars on other databases of the same server do not wait for each other.
const MIGRATION_LOCK: i64 = 0x006b_6d73_2d6d_6967;

/// Brings the schema up to date. Concurrent callers serialise on the advisory lock; the later
/// ones find nothing left to do. A database newer than this binary is refused.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg)?;
    // Another sidecar may hold the lock for as long as its migrations take.
    tx.batch_execute("SET LOCAL lock_timeout = '120s'; SET LOCAL statement_timeout = '120s'")
        .await
        .map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kms_sidecar_schema (
             version     INTEGER NOT NULL,
             applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(pg)?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM kms_sidecar_schema",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    let current = usize::try_from(current)
        .map_err(|_| StoreError::Corrupt("negative schema version".into()))?;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "database schema version {current} is newer than this binary ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(pg)?;
        let version = i32::try_from(i + 1).map_err(|_| unavailable("too many migrations"))?;
        tx.execute(
            "INSERT INTO kms_sidecar_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}
