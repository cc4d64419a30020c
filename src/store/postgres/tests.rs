//! The store behaviour suite (`suite.rs`) on a real PostgreSQL, plus what only this engine has:
//! migrations raced by several sidecars, an advisory-locked schema version, bounded failure
//! when the server is unreachable. Each test gets its own database on the server named by
//! `KMS_TEST_PG` (scripts/test.sh starts one); without it the tests are skipped,
//! except under `CI=true`, where they fail.

use super::*;
use crate::store::suite::{self, Fresh, t, version};

const ENV: &str = "KMS_TEST_PG";

fn options(url: &str) -> PostgresOptions {
    PostgresOptions::new(url, 4, Duration::from_secs(3), Duration::from_secs(5)).unwrap()
}

/// The same URL with another database name.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{db}{query}", &base[..host_end])
}

/// A new empty database, dropped (connections and all) when this is dropped.
struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create() -> Option<TestDatabase> {
        let admin_url = match std::env::var(ENV) {
            Ok(u) => u,
            Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("{ENV} is not set under CI=true: the PostgreSQL tests must run")
            }
            Err(_) => {
                eprintln!("skipped: {ENV} is not set (scripts/test.sh starts a server)");
                return None;
            }
        };
        let mut raw = [0u8; 8];
        crate::crypto::fill_random(&mut raw).unwrap();
        let name = format!("kms_test_{}", hex::encode(raw));
        let (client, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{ENV}: cannot connect: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = with_database(&admin_url, &name);
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Two pools (as two sidecars would have) on one new database.
async fn fresh() -> Option<Fresh> {
    let db = TestDatabase::create().await?;
    let a = PostgresStore::connect(&options(&db.url)).await.unwrap();
    let b = PostgresStore::connect(&options(&db.url)).await.unwrap();
    Some((Box::new(db), Arc::new(a), Arc::new(b)))
}

suite::store_suite!(fresh);

#[test]
fn test_urls_keep_host_and_options() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5433/postgres", "x"),
        "postgres://postgres@127.0.0.1:5433/x"
    );
    assert_eq!(
        with_database("postgres://u@h:1?sslmode=disable", "x"),
        "postgres://u@h:1/x?sslmode=disable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_starting_together_migrate_once() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let mut starts = Vec::new();
    for _ in 0..6 {
        let o = options(&db.url);
        starts.push(tokio::spawn(
            async move { PostgresStore::connect(&o).await },
        ));
    }
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let store = PostgresStore::connect(&options(&db.url)).await.unwrap();
    let c = store.client().await.unwrap();
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM kms_sidecar_schema ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let want: Vec<i32> = (1..=schema::MIGRATIONS.len() as i32).collect();
    assert_eq!(versions, want, "each migration applied exactly once");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(&options(&db.url)).await.unwrap();
    store
        .client()
        .await
        .unwrap()
        .batch_execute("INSERT INTO kms_sidecar_schema (version) VALUES (99)")
        .await
        .unwrap();
    match PostgresStore::connect(&options(&db.url)).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn shred_leaves_no_wrapped_key_in_live_rows() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let store = PostgresStore::connect(&options(&db.url)).await.unwrap();
    store
        .create_tenant(&t("erase"), 1, &version(1, &[("keyfile:aa", 0x5A)]))
        .await
        .unwrap();
    store
        .shred(&t("erase"), ShredTarget::Tenant, 2)
        .await
        .unwrap();
    let c = store.client().await.unwrap();
    let needle = vec![0x5Au8; 61];
    let hits: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM key_wrappings WHERE position($1::bytea IN blob) > 0)
                  + (SELECT count(*) FROM key_wrappings WHERE tenant = 'erase')",
            &[&needle],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(hits, 0);
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_and_says_unavailable() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let o = PostgresOptions::new(
        &format!("postgres://kms:secret-pw@127.0.0.1:{port}/kms"),
        2,
        Duration::from_secs(2),
        Duration::from_secs(2),
    )
    .unwrap();
    match PostgresStore::connect(&o).await {
        Err(StoreError::Unavailable(m)) => assert!(!m.contains("secret-pw"), "{m}"),
        other => panic!("expected unavailable, got {:?}", other.map(|_| ())),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}
