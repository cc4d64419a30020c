//! The store behaviour suite, run here on SQLite. Written against `KeyringStore` only, so
//! other engines run the same checks.

use super::*;
use crate::keyring::KeyState;

fn version(v: u32, roots: &[(&str, u8)]) -> KeyVersionRecord {
    KeyVersionRecord {
        version: v,
        state: KeyState::Active,
        created_at: 1_700_000_000,
        wrappings: roots
            .iter()
            .map(|(r, b)| Wrapping {
                root: RootId::new(*r),
                blob: vec![*b; 61],
            })
            .collect(),
    }
}

fn t(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

async fn suite_create_then_read(store: &dyn KeyringStore) {
    assert_eq!(store.tenant(&t("acme")).await.unwrap(), None);
    let rec = store
        .create_tenant(
            &t("acme"),
            42,
            &version(1, &[("keyfile:aa", 1), ("keyfile:bb", 2)]),
        )
        .await
        .unwrap();
    assert_eq!(rec.tenant, t("acme"));
    assert_eq!(rec.active_version, 1);
    assert_eq!(rec.created_at, 42);
    let v = store.key_version(&t("acme"), 1).await.unwrap().unwrap();
    assert_eq!(v, version(1, &[("keyfile:aa", 1), ("keyfile:bb", 2)]));
    assert_eq!(store.key_version(&t("acme"), 2).await.unwrap(), None);
    assert_eq!(store.key_versions(&t("acme")).await.unwrap(), vec![v]);
    assert_eq!(store.key_versions(&t("other")).await.unwrap(), vec![]);
}

async fn suite_create_is_idempotent(store: &dyn KeyringStore) {
    let a = store
        .create_tenant(&t("dup"), 1, &version(1, &[("keyfile:aa", 1)]))
        .await
        .unwrap();
    let b = store
        .create_tenant(&t("dup"), 2, &version(1, &[("keyfile:aa", 9)]))
        .await
        .unwrap();
    assert_eq!(a, b, "the second creator gets the first one's tenant");
    let stored = store.key_version(&t("dup"), 1).await.unwrap().unwrap();
    assert_eq!(
        stored.wrappings[0].blob,
        vec![1; 61],
        "the first wrap is kept"
    );
}

async fn suite_lists_tenants_in_order(store: &dyn KeyringStore) {
    for name in ["zeta", "alpha", "mid"] {
        store
            .create_tenant(&t(name), 1, &version(1, &[("keyfile:aa", 1)]))
            .await
            .unwrap();
    }
    let names: Vec<String> = store
        .tenants()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.tenant.to_string())
        .collect();
    assert_eq!(names, ["alpha", "mid", "zeta"]);
    store.health().await.unwrap();
}

fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    (dir, store)
}

#[tokio::test]
async fn create_then_read() {
    let (_d, s) = fresh();
    suite_create_then_read(&s).await;
}

#[tokio::test]
async fn create_is_idempotent() {
    let (_d, s) = fresh();
    suite_create_is_idempotent(&s).await;
}

#[tokio::test]
async fn lists_tenants_in_order() {
    let (_d, s) = fresh();
    suite_lists_tenants_in_order(&s).await;
}

#[tokio::test]
async fn data_survives_reopen_and_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, s) = fresh();
    s.create_tenant(&t("keep"), 7, &version(1, &[("keyfile:aa", 3)]))
        .await
        .unwrap();
    drop(s);
    let path = dir.path().join("store.db");
    let again = SqliteStore::open(&path).unwrap();
    assert_eq!(
        again.tenant(&t("keep")).await.unwrap().unwrap().created_at,
        7
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn concurrent_creators_end_with_one_tenant() {
    let (_d, s) = fresh();
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
