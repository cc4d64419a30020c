//! The store behaviour suite (`suite.rs`) on SQLite, plus what only SQLite has: a file with a
//! private mode, and `PRAGMA user_version`.

use super::*;
use crate::store::suite::{self, Fresh, t, version};

/// Two connections on one new database file.
async fn fresh() -> Option<Fresh> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    Some((Box::new(dir), Arc::new(a), Arc::new(b)))
}

suite::store_suite!(fresh);

#[tokio::test]
async fn data_survives_reopen_and_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let s = SqliteStore::open(&path).unwrap();
    s.create_tenant(&t("keep"), 7, &version(1, &[("keyfile:aa", 3)]))
        .await
        .unwrap();
    drop(s);
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(
        again.tenant(&t("keep")).await.unwrap().unwrap().created_at,
        7
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn concurrent_creators_on_one_connection_end_with_one_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.create_tenant(&t("race"), i64::from(i), &version(1, &[("keyfile:aa", i)]))
                .await
                .unwrap()
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(s.key_versions(&t("race")).await.unwrap().len(), 1);
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = Connection::open(&path).unwrap();
    c.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(c);
    match SqliteStore::open(&path) {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}
