//! A fleet of sidecars on one PostgreSQL database: changes made through one reach the others'
//! caches at once (LISTEN/NOTIFY), concurrent writers on different sidecars end with one key
//! ring, and a database outage leaves cached operations running while writes fail fast with
//! 503 `store_unavailable`, until the database returns (no restart of the sidecars). The store
//! talks TLS to a server that has it, verifying the certificate chain and the host name.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

async fn seal_p(s: &SidecarProcess, tenant: &str, pt: &[u8]) -> Reply {
    s.post(
        &format!("/v1/tenants/{tenant}/seal"),
        None,
        json!({ "plaintext": b64(pt) }),
    )
    .await
}

fn version_of(r: &Reply) -> u64 {
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.json()["key_version"].as_u64().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_and_a_shred_through_one_sidecar_process_reach_another_at_once() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let root = keys.path().join("root.key");
    kms_sidecar::providers::keyfile::create_keyfile(&root, None, Default::default()).unwrap();
    let a = SidecarProcess::spawn(&root, &db.toml()).await;
    let b = SidecarProcess::spawn(&root, &db.toml()).await;

    assert_eq!(version_of(&seal_p(&a, "fleet", b"x").await), 1);
    let ct = seal_p(&b, "fleet", b"kept").await;
    assert_eq!(version_of(&ct), 1, "b has version 1 cached");
    let ct = ct.str("ciphertext");

    // Each rotation through A; B seals in a tight loop until it uses the new version.
    let mut latencies = Vec::new();
    let mut first_request_saw_it = 0;
    for round in 0..20u64 {
        let r = a
            .post("/v1/tenants/fleet/keys:rotate", None, json!({}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let started = Instant::now();
        let want = round + 2;
        let mut tries = 0;
        loop {
            tries += 1;
            if version_of(&seal_p(&b, "fleet", b"y").await) == want {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "b still seals under an old version after 1 s (round {round})"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if tries == 1 {
            first_request_saw_it += 1;
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "rotation through A seen by B (separate processes): {first_request_saw_it}/20 on B's very next request; \
         median {:?}, p95 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        latencies[latencies.len() - 1]
    );

    // B has the tenant and version 1 cached; a shred through A (two admins) ends that at once.
    let opened = b
        .post("/v1/tenants/fleet/open", None, json!({ "ciphertext": ct }))
        .await;
    assert_eq!(opened.status, 200, "{:?}", opened.body);
    let req = a.post("/v1/tenants/fleet:shred", None, json!({})).await;
    assert_eq!(req.status, 202, "{:?}", req.body);
    let id = req.str("approval_id");
    let ok = a
        .post(
            &format!("/v1/approvals/{id}:approve"),
            Some(TOKEN_ADMIN2),
            json!({}),
        )
        .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let started = Instant::now();
    loop {
        let r = b
            .post("/v1/tenants/fleet/open", None, json!({ "ciphertext": ct }))
            .await;
        if r.status == 410 {
            assert_eq!(r.code(), "tenant_destroyed");
            break;
        }
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "b still opens a shredded tenant's data after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("shred through A seen by B after {:?}", started.elapsed());
    assert_eq!(seal_p(&b, "fleet", b"z").await.code(), "tenant_destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_racing_on_first_use_and_rotation_end_with_one_key_ring() {
    let Some(db) = PgDatabase::create().await else {
        return;
    };
    let a = Arc::new(
        Sidecar::start_with(Options {
            extra_toml: db.toml(),
            ..Options::default()
        })
        .await,
    );
    let b = Arc::new(
        Sidecar::start_with(Options {
            share: Some(a.data_dir()),
            extra_toml: db.toml(),
            ..Options::default()
        })
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let r = s
                .post("/v1/tenants/race/seal", json!({ "plaintext": b64(b"x") }))
                .await;
            version_of(&r)
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1);
    }
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let r = s.post("/v1/tenants/race/keys:rotate", json!({})).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let keys = b.unix("GET", "/v1/tenants/race/keys", &[], "").await.json();
    assert_eq!(keys["active_version"], 11, "one new version per rotation");
    let states: Vec<&str> = keys["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 11);
    assert_eq!(states.iter().filter(|s| **s == "active").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_postgres_outage_keeps_cached_operations_and_fails_writes_fast() {
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let toml = store_toml(&cluster.url);
    let a = Arc::new(
        Sidecar::start_with(Options {
            extra_toml: toml.clone(),
            ..Options::default()
        })
        .await,
    );
    let b = Arc::new(
        Sidecar::start_with(Options {
            share: Some(a.data_dir()),
            extra_toml: toml,
            ..Options::default()
        })
        .await,
    );
    for s in [&a, &b] {
        let r = s
            .post("/v1/tenants/hot/seal", json!({ "plaintext": b64(b"warm") }))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }

    // Load: seal + open of a cached tenant on both sidecars, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for s in [a.clone(), b.clone()] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = s
                    .post("/v1/tenants/hot/seal", json!({ "plaintext": b64(b"load") }))
                    .await;
                let good = r.status == 200 && {
                    let o = s
                        .post(
                            "/v1/tenants/hot/open",
                            json!({ "ciphertext": r.str("ciphertext") }),
                        )
                        .await;
                    o.status == 200
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("cached operation failed: {} {:?}", r.status, r.body);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.stop();
    let down = Instant::now();
    let mut slowest_write = Duration::ZERO;
    let mut writes = 0;
    while down.elapsed() < Duration::from_secs(10) {
        for (path, body) in [
            ("/v1/tenants/hot/keys:rotate", json!({})),
            (
                "/v1/tenants/cold/seal",
                json!({ "plaintext": b64(b"new tenant") }),
            ),
            (
                "/v1/tenants/hot/tokens",
                json!({ "value": "4111111111111111" }),
            ),
        ] {
            let started = Instant::now();
            let r = a.post(path, body).await;
            slowest_write = slowest_write.max(started.elapsed());
            writes += 1;
            assert_eq!(
                (r.status, r.code().as_str()),
                (503, "store_unavailable"),
                "{path} during the outage"
            );
        }
        let r = b.unix("GET", "/readyz", &[], "").await;
        assert_eq!(r.status, 503);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let served_while_down = ok.load(Ordering::Relaxed);
    cluster.resume();
    let up = Instant::now();
    loop {
        let r = a.post("/v1/tenants/hot/keys:rotate", json!({})).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.code(), "store_unavailable");
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "writes did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = up.elapsed();
    // B's listener reconnects within its back-off (at most 5 s between attempts); after that a
    // rotation through A reaches B's cache at once again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let before = b
        .post("/v1/tenants/hot/seal", json!({ "plaintext": b64(b"v") }))
        .await;
    let v = before.json()["key_version"].as_u64().unwrap();
    let r = a.post("/v1/tenants/hot/keys:rotate", json!({})).await;
    assert_eq!(r.status, 200);
    let started = Instant::now();
    loop {
        let r = b
            .post("/v1/tenants/hot/seal", json!({ "plaintext": b64(b"v") }))
            .await;
        if r.json()["key_version"].as_u64().unwrap() == v + 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "b's notifications did not come back"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let renotified = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "outage: {ok} cached seal+open pairs ok ({served_while_down} by the end of the outage), {failed} failed; \
         {writes} writes refused with 503, slowest {slowest_write:?}; writes back {recovered:?} after restart; \
         rotation seen by the other sidecar {renotified:?} after it"
    );
    assert_eq!(failed, 0, "cached operations failed during the outage");
    assert!(served_while_down > 100, "load ran: {served_while_down}");
    assert!(
        slowest_write < Duration::from_secs(5),
        "a write took {slowest_write:?} to fail"
    );
    assert_eq!(
        a.post("/v1/tenants/cold/seal", json!({ "plaintext": b64(b"now") }))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_uses_tls_and_verifies_the_server_certificate_and_name() {
    use kms_sidecar::store::{PostgresOptions, PostgresStore};
    let Some((cluster, ca)) = PgCluster::start_tls() else {
        return;
    };
    let options = |host: &str, ca: &std::path::Path, mode: &str| {
        PostgresOptions::new(
            &format!(
                "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}&application_name=kms-tls-{mode}",
                cluster.port,
                ca.display()
            ),
            2,
            Duration::from_secs(3),
            Duration::from_secs(3),
        )
        .unwrap()
    };
    let store = PostgresStore::connect(&options("localhost", &ca, "verify-full"))
        .await
        .expect("verify-full against the right CA and name");
    kms_sidecar::keyring::KeyringStore::health(&store)
        .await
        .unwrap();
    // Another session checks that the store's own sessions are encrypted.
    let (client, conn) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'kms-tls-verify-full' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the store's sessions use TLS");

    // Another CA, or a name the certificate does not carry: refused, even with `require`.
    let (_other, other_ca) = PgCluster::start_tls().unwrap();
    for (host, ca, mode) in [
        ("localhost", other_ca.as_path(), "require"),
        ("127.0.0.1", ca.as_path(), "verify-ca"),
    ] {
        match PostgresStore::connect(&options(host, ca, mode)).await {
            Err(kms_sidecar::keyring::StoreError::Unavailable(m)) => {
                assert!(m.contains("invalid peer certificate"), "{m}");
                println!("refused as expected: {m}");
            }
            other => panic!(
                "{host} {mode}: expected a refusal, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
