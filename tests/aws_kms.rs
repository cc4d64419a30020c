//! The AWS KMS root against moto's real KMS server: seal/open and restarts, Decrypt calls bounded
//! by the cache, EncryptionContext binding, customer-managed keys per tenant (API and CLI),
//! escrow fallback, and — through the fault proxy, since moto's Decrypt ignores key state —
//! revocation within the cache TTL, throttling, outages and recovery without a restart.
//! scripts/test.sh starts moto and exports `TEST_MOTO_KMS_URL`; under `CI=true` these tests
//! fail without it.
#![cfg(feature = "aws")]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::kms_proxy::{Fault, KmsProxy};
use support::moto::*;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_kms-sidecar");

async fn start(extra: String) -> Sidecar {
    Sidecar::start_with(Options {
        extra_toml: extra,
        ..Options::default()
    })
    .await
}

async fn start_shared(sc: &Sidecar, extra: String) -> Sidecar {
    Sidecar::start_with(Options {
        share: Some(sc.data_dir()),
        extra_toml: extra,
        ..Options::default()
    })
    .await
}

async fn seal(sc: &Sidecar, tenant: &str, pt: &[u8]) -> String {
    let r = seal_reply(sc, tenant, pt).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.str("ciphertext")
}

async fn seal_reply(sc: &Sidecar, tenant: &str, pt: &[u8]) -> Reply {
    sc.post(
        &format!("/v1/tenants/{tenant}/seal"),
        json!({ "plaintext": b64(pt) }),
    )
    .await
}

async fn open(sc: &Sidecar, tenant: &str, ct: &str) -> Reply {
    sc.post(
        &format!("/v1/tenants/{tenant}/open"),
        json!({ "ciphertext": ct }),
    )
    .await
}

async fn opens_to(sc: &Sidecar, tenant: &str, ct: &str, pt: &[u8]) {
    let r = open(sc, tenant, ct).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(unb64(&r.str("plaintext")), pt);
}

fn calls(root: &str, op: &str) -> String {
    format!("kms_sidecar_root_calls_total{{root=\"{root}\",op=\"{op}\"}}")
}

/// Roots recorded for each live version of a tenant, read from the store itself.
async fn stored_roots(sc: &Sidecar, tenant: &str) -> Vec<Vec<String>> {
    use kms_sidecar::keyring::KeyringStore;
    let store = kms_sidecar::store::SqliteStore::open(&sc.data_dir().join("store.db")).unwrap();
    let t = kms_sidecar::tenant::TenantId::parse(tenant).unwrap();
    store
        .key_versions(&t)
        .await
        .unwrap()
        .into_iter()
        .map(|v| {
            v.wrappings
                .into_iter()
                .map(|w| w.root.to_string())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_rooted_tenant_seals_opens_and_survives_a_restart() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let alias = unique("sidecar");
    create_key(&kms, Some(&alias)).await;
    let key = format!("alias/{alias}");
    let root = format!("aws-kms:{key}");
    let extra = format!("{}{}", aws_toml(&moto, ""), aws_root(&key));

    let mut first = start(extra.clone()).await;
    let ct = seal(&first, "acme", b"order 7").await;
    opens_to(&first, "acme", &ct, b"order 7").await;
    let keys = first
        .unix("GET", "/v1/tenants/acme/keys", &[], Vec::new())
        .await
        .json();
    assert_eq!(keys["versions"][0]["roots"], json!([root]));
    assert_eq!(first.metric(&calls(&root, "generate")).await, 1.0);
    let ready = first.unix("GET", "/readyz", &[], Vec::new()).await;
    assert_eq!(ready.status, 200);
    first.stop().await;

    let second = start_shared(&first, extra).await;
    opens_to(&second, "acme", &ct, b"order 7").await;
    assert_eq!(second.metric(&calls(&root, "unwrap")).await, 1.0);
    let ct2 = seal(&second, "acme", b"after restart").await;
    opens_to(&second, "acme", &ct2, b"after restart").await;
    assert_eq!(
        second.metric(&calls(&root, "unwrap")).await,
        1.0,
        "the cached key served the seal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_cache_bounds_decrypt_calls_and_cold_start_makes_one_per_version() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let root = format!("aws-kms:{arn}");
    let extra = format!("{}{}", aws_toml(&moto, ""), aws_root(&arn));
    let first = start(extra.clone()).await;

    let tenants: Vec<String> = (0..10).map(|i| format!("warm-{i}")).collect();
    let mut cts = Vec::new();
    for t in &tenants {
        cts.push((t.clone(), seal(&first, t, t.as_bytes()).await));
    }
    let started = Instant::now();
    let sc = std::sync::Arc::new(first);
    let mut tasks = Vec::new();
    for (t, ct) in cts.clone() {
        let sc = sc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..1000 {
                let r = open(&sc, &t, &ct).await;
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let decrypts = sc.metric(&calls(&root, "unwrap")).await;
    let hits = sc
        .metric(r#"kms_sidecar_cache_hits_total{cache="keys"}"#)
        .await;
    eprintln!(
        "10000 opens over 10 tenants in {elapsed:?}: {decrypts} Decrypt calls, {hits} key-cache hits"
    );
    assert!(decrypts <= 10.0, "{decrypts} Decrypt calls");
    assert!(hits >= 10_000.0, "{hits} cache hits");

    // Three tenants get a second version, so the cold start below uses 13 (tenant, version).
    let mut first = std::sync::Arc::into_inner(sc).expect("no other owner");
    for (t, _) in cts.clone().iter().take(3) {
        let r = first
            .post(&format!("/v1/tenants/{t}/keys:rotate"), json!({}))
            .await;
        assert_eq!(r.status, 200);
        cts.push((t.clone(), seal(&first, t, t.as_bytes()).await));
    }
    first.stop().await;

    let second = std::sync::Arc::new(start_shared(&first, extra).await);
    let mut tasks = Vec::new();
    for (t, ct) in cts.clone() {
        for _ in 0..5 {
            let (sc, t, ct) = (second.clone(), t.clone(), ct.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let r = open(&sc, &t, &ct).await;
                    assert_eq!(r.status, 200);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let cold = second.metric(&calls(&root, "unwrap")).await;
    eprintln!(
        "cold start: {} opens of 13 (tenant, version) made {cold} Decrypt calls",
        13 * 100
    );
    assert_eq!(cold, 13.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrapped_key_moved_to_another_tenant_does_not_unwrap() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let root = format!("aws-kms:{arn}");
    let extra = format!("{}{}", aws_toml(&moto, ""), aws_root(&arn));
    let mut first = start(extra.clone()).await;
    let ct_x = seal(&first, "tenant-x", b"x's secret").await;
    let ct_y = seal(&first, "tenant-y", b"y's secret").await;
    first.stop().await;

    let db = rusqlite::Connection::open(first.data_dir().join("store.db")).unwrap();
    let moved = db
        .execute(
            "UPDATE key_wrappings SET blob = (SELECT blob FROM key_wrappings
                 WHERE tenant = 'tenant-x' AND version = 1)
             WHERE tenant = 'tenant-y' AND version = 1",
            [],
        )
        .unwrap();
    assert_eq!(moved, 1);
    drop(db);

    let second = start_shared(&first, extra).await;
    let r = open(&second, "tenant-y", &ct_y).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), "decrypt_failed");
    let errors = format!(
        "kms_sidecar_root_errors_total{{root=\"{root}\",op=\"unwrap\",kind=\"unwrap_failed\"}}"
    );
    assert_eq!(second.metric(&errors).await, 1.0, "KMS refused the context");
    opens_to(&second, "tenant-x", &ct_x, b"x's secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_customer_key_stops_new_unwraps_at_once_and_cached_use_within_the_ttl() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let customer = create_key(&kms, None).await;
    let proxy = KmsProxy::start(&moto).await;
    // `direct` talks to moto; `s1` (TTL 2 s) goes through the proxy.
    let direct = start(aws_toml(&moto, "")).await;
    let s1 = start_shared(
        &direct,
        format!(
            "[cache]\nttl_seconds = 2\n{}",
            aws_toml(&proxy.url(), FAST_FAIL)
        ),
    )
    .await;
    for t in ["hot", "cold"] {
        let r = direct
            .post(
                &format!("/v1/tenants/{t}/root"),
                json!({ "aws_kms_key": customer }),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.str("root"), format!("aws-kms:{customer}"));
    }
    let ct_hot = seal(&s1, "hot", b"hot data").await;
    let ct_cold = seal(&direct, "cold", b"cold data").await;
    // A fresh cache entry for `hot` just before the revocation.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    opens_to(&s1, "hot", &ct_hot, b"hot data").await;

    proxy.set(Fault::kms("DisabledException"));
    let revoked = Instant::now();
    // New unwraps fail at once, whatever form the refusal takes.
    for kind in [
        "DisabledException",
        "AccessDeniedException",
        "KMSInvalidStateException",
        "NotFoundException",
    ] {
        proxy.set(Fault::kms(kind));
        let t = Instant::now();
        let r = open(&s1, "cold", &ct_cold).await;
        assert_eq!(
            r.status,
            403,
            "{kind}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), "root_key_access_denied", "{kind}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{kind}: {:?}",
            t.elapsed()
        );
    }
    // The cached key keeps working, but for at most the TTL.
    proxy.set(Fault::kms("DisabledException"));
    assert_eq!(open(&s1, "hot", &ct_hot).await.status, 200);
    let stopped = loop {
        let r = open(&s1, "hot", &ct_hot).await;
        if r.status != 200 {
            assert_eq!(r.status, 403);
            assert_eq!(r.code(), "root_key_access_denied");
            break revoked.elapsed();
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(3),
            "cached key still used {:?} after revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("revoked key: cached use stopped {stopped:?} after revocation (TTL 2 s)");
    assert!(stopped <= Duration::from_secs(3), "{stopped:?}");
    let r = seal_reply(&s1, "hot", b"more").await;
    assert_eq!(r.code(), "root_key_access_denied");

    // Access restored: works again without a restart.
    proxy.set(Fault::None);
    opens_to(&s1, "hot", &ct_hot, b"hot data").await;
    opens_to(&s1, "cold", &ct_cold, b"cold data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_are_retried_within_the_bound_then_503() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let proxy = KmsProxy::start(&moto).await;
    let direct = start(format!("{}{}", aws_toml(&moto, ""), aws_root(&arn))).await;
    let s1 = start_shared(
        &direct,
        format!("{}{}", aws_toml(&proxy.url(), FAST_FAIL), aws_root(&arn)),
    )
    .await;
    let ct = seal(&direct, "throttled", b"data").await;
    for fault in [
        Fault::kms("ThrottlingException"),
        Fault::Kms {
            status: 500,
            kind: "KMSInternalException",
        },
        Fault::Kms {
            status: 503,
            kind: "ServiceUnavailableException",
        },
    ] {
        proxy.set(fault.clone());
        proxy.reset_calls();
        let t = Instant::now();
        let r = open(&s1, "throttled", &ct).await;
        let took = t.elapsed();
        assert_eq!(
            r.status,
            503,
            "{fault:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), "root_key_unavailable");
        assert_eq!(proxy.calls("Decrypt"), 3, "{fault:?}: max_attempts = 3");
        assert!(took < Duration::from_secs(6), "{fault:?}: {took:?}");
        eprintln!("{fault:?}: 3 attempts, 503 after {took:?}");
    }
    proxy.set(Fault::None);
    opens_to(&s1, "throttled", &ct, b"data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_outage_spares_cached_tenants_and_fails_the_rest_within_the_timeout() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let proxy = KmsProxy::start(&moto).await;
    let direct = start(format!("{}{}", aws_toml(&moto, ""), aws_root(&arn))).await;
    let s1 = start_shared(
        &direct,
        format!("{}{}", aws_toml(&proxy.url(), FAST_FAIL), aws_root(&arn)),
    )
    .await;
    let ct_uncached = seal(&direct, "uncached", b"u").await;
    let mut cached = Vec::new();
    for t in ["c1", "c2", "c3"] {
        cached.push((t, seal(&s1, t, t.as_bytes()).await));
    }

    // Bound: attempts × attempt timeout, plus backoff, capped by the 4 s operation timeout.
    let bound = Duration::from_secs(3 + 2);
    for fault in [Fault::Stall, Fault::Refuse] {
        proxy.set(fault.clone());
        let mut errors = 0;
        for _ in 0..30 {
            for (t, ct) in &cached {
                if open(&s1, t, ct).await.status != 200 {
                    errors += 1;
                }
                if seal_reply(&s1, t, b"during the outage").await.status != 200 {
                    errors += 1;
                }
            }
        }
        assert_eq!(errors, 0, "{fault:?}: cached tenants must not fail");
        let t = Instant::now();
        let r = open(&s1, "uncached", &ct_uncached).await;
        let took = t.elapsed();
        assert_eq!(
            r.status,
            503,
            "{fault:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.code(), "root_key_unavailable");
        assert!(took < bound, "{fault:?}: {took:?}");
        let t = Instant::now();
        let r = seal_reply(&s1, &unique("new"), b"x").await;
        assert_eq!(r.code(), "root_key_unavailable", "{fault:?}: a new tenant");
        assert!(t.elapsed() < bound, "{fault:?}: {:?}", t.elapsed());
        eprintln!(
            "{fault:?}: 180 cached seals/opens without error; uncached open 503 after {took:?}"
        );
    }

    proxy.set(Fault::None);
    opens_to(&s1, "uncached", &ct_uncached, b"u").await;
    let ct = seal(&s1, &unique("after"), b"recovered").await;
    assert!(!ct.is_empty());

    // The endpoint goes away entirely (connections refused, pooled ones closed) and returns.
    let ct_uncached2 = seal(&direct, "uncached-2", b"u2").await;
    proxy.kill();
    for (t, ct) in &cached {
        assert_eq!(
            open(&s1, t, ct).await.status,
            200,
            "cached {t} while KMS is down"
        );
        assert_eq!(seal_reply(&s1, t, b"down").await.status, 200);
    }
    let t = Instant::now();
    let r = open(&s1, "uncached-2", &ct_uncached2).await;
    assert_eq!(r.code(), "root_key_unavailable");
    assert!(t.elapsed() < bound, "{:?}", t.elapsed());
    eprintln!("endpoint down: uncached open 503 after {:?}", t.elapsed());
    proxy.restart().await;
    opens_to(&s1, "uncached-2", &ct_uncached2, b"u2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escrow_keyfile_opens_when_the_aws_root_is_unreachable() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let aws = format!("aws-kms:{arn}");
    let proxy = KmsProxy::start(&moto).await;
    let extra = format!(
        "{}{}{KEYFILE_ROOT}",
        aws_toml(&proxy.url(), FAST_FAIL),
        aws_root(&arn)
    );
    let mut first = start(extra.clone()).await;
    let ct = seal(&first, "escrowed", b"kept twice").await;
    let roots = &stored_roots(&first, "escrowed").await[0];
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0], aws);
    let keyfile = roots[1].clone();
    assert!(keyfile.starts_with("keyfile:"), "{keyfile}");
    first.stop().await;

    let second = start_shared(&first, extra).await;
    proxy.set(Fault::Refuse);
    opens_to(&second, "escrowed", &ct, b"kept twice").await;
    let fallback = format!("kms_sidecar_fallback_unwraps_total{{root=\"{keyfile}\"}}");
    assert_eq!(second.metric(&fallback).await, 1.0);
    let aws_down = format!(
        "kms_sidecar_root_errors_total{{root=\"{aws}\",op=\"unwrap\",kind=\"unavailable\"}}"
    );
    assert_eq!(second.metric(&aws_down).await, 1.0);
    // New key versions need the primary root.
    let r = seal_reply(&second, &unique("new"), b"x").await;
    assert_eq!(r.code(), "root_key_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_root_moves_a_tenant_to_its_own_key_and_rewraps_its_versions() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let k1 = create_key(&kms, None).await;
    let k2 = create_key(&kms, None).await;
    // Configured root: the harness keyfile; AWS only as a connection for customer keys.
    let mut first = start(aws_toml(&moto, "")).await;
    let ct1 = seal(&first, "byok", b"v1 data").await;
    let r = first.post("/v1/tenants/byok/keys:rotate", json!({})).await;
    assert_eq!(r.status, 200);
    let ct2 = seal(&first, "byok", b"v2 data").await;
    let ct_other = seal(&first, "other", b"other data").await;
    let keyfile = stored_roots(&first, "other").await[0][0].clone();

    // Bad requests change nothing.
    let before = first.snapshot().await;
    let r = first
        .post(
            "/v1/tenants/byok/root",
            json!({ "aws_kms_key": "not a key" }),
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    let missing = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let r = first
        .post("/v1/tenants/byok/root", json!({ "aws_kms_key": missing }))
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "root_key_access_denied")
    );
    let r = first
        .as_token(
            TOKEN_SEAL_ONLY,
            "POST",
            "/v1/tenants/byok/root",
            json!({ "aws_kms_key": k1 }),
        )
        .await;
    assert_eq!(r.code(), "forbidden");
    assert_eq!(first.snapshot().await, before);

    let r = first
        .post("/v1/tenants/byok/root", json!({ "aws_kms_key": k1 }))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["root"], json!(format!("aws-kms:{k1}")));
    assert_eq!(
        (v["versions"].as_u64(), v["rewrapped"].as_u64()),
        (Some(2), Some(2))
    );
    let r1 = format!("aws-kms:{k1}");
    assert_eq!(
        stored_roots(&first, "byok").await,
        vec![vec![r1.clone()]; 2]
    );
    assert_eq!(
        stored_roots(&first, "other").await,
        vec![vec![keyfile.clone()]]
    );
    opens_to(&first, "byok", &ct1, b"v1 data").await;
    opens_to(&first, "byok", &ct2, b"v2 data").await;
    // Again: nothing left to do.
    let r = first
        .post("/v1/tenants/byok/root", json!({ "aws_kms_key": k1 }))
        .await;
    assert_eq!(r.json()["rewrapped"], json!(0));
    // New versions are made under the tenant's key alone.
    let r = first.post("/v1/tenants/byok/keys:rotate", json!({})).await;
    assert_eq!(r.status, 200);
    let ct3 = seal(&first, "byok", b"v3 data").await;
    assert_eq!(
        stored_roots(&first, "byok").await,
        vec![vec![r1.clone()]; 3]
    );
    let keys = first
        .unix("GET", "/v1/tenants/byok/keys", &[], Vec::new())
        .await
        .json();
    assert_eq!(keys["root"], json!(r1));
    let audit = std::fs::read_to_string(first.data_dir().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"operation\":\"admin.root\"") && audit.contains(&format!("set root {r1}")),
        "set-root is audited"
    );
    first.stop().await;

    // After a restart every version opens through KMS.
    let second = start_shared(&first, aws_toml(&moto, "")).await;
    for (ct, pt) in [
        (&ct1, &b"v1 data"[..]),
        (&ct2, b"v2 data"),
        (&ct3, b"v3 data"),
    ] {
        opens_to(&second, "byok", ct, pt).await;
    }
    opens_to(&second, "other", &ct_other, b"other data").await;
    assert_eq!(second.metric(&calls(&r1, "unwrap")).await, 3.0);

    // From one customer key to another.
    let r = second
        .post("/v1/tenants/byok/root", json!({ "aws_kms_key": k2 }))
        .await;
    assert_eq!(r.json()["rewrapped"], json!(3));
    let r2 = format!("aws-kms:{k2}");
    assert_eq!(stored_roots(&second, "byok").await, vec![vec![r2]; 3]);
    opens_to(&second, "byok", &ct1, b"v1 data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tenants_set_root_binds_a_tenant_through_the_running_sidecar() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let alias = unique("customer");
    create_key(&kms, Some(&alias)).await;
    let key = format!("alias/{alias}");
    let sc = start(aws_toml(&moto, "")).await;
    let ct = seal(&sc, "cli-tenant", b"before").await;

    let cfg = sc.config_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "tenants",
                "set-root",
                "cli-tenant",
            ])
            .args(["--aws-kms-key", &key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 rewrapped now"), "{stdout}");
    let root = format!("aws-kms:alias/{alias}");
    let cfg = sc.config_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["--config", cfg.to_str().unwrap(), "tenants", "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("cli-tenant ") && l.ends_with(&root)),
        "{listing}"
    );
    assert_eq!(stored_roots(&sc, "cli-tenant").await, vec![vec![root]]);
    opens_to(&sc, "cli-tenant", &ct, b"before").await;

    // A refusal comes back as the API's code and a failing exit status.
    let cfg = sc.config_path();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args([
                "--config",
                cfg.to_str().unwrap(),
                "tenants",
                "set-root",
                "cli-tenant",
            ])
            .args(["--aws-kms-key", "alias/does-not-exist"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root_key_access_denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_bridges_outages_but_never_a_refusal() {
    let Some(moto) = moto_url() else { return };
    let kms = kms_client(&moto);
    let arn = create_key(&kms, None).await;
    let proxy = KmsProxy::start(&moto).await;
    let s1 = start(format!(
        "[cache]\nttl_seconds = 1\nstale_if_error_seconds = 30\n{}{}",
        aws_toml(&proxy.url(), FAST_FAIL),
        aws_root(&arn)
    ))
    .await;
    let ct = seal(&s1, "stale", b"data").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    proxy.set(Fault::Refuse);
    opens_to(&s1, "stale", &ct, b"data").await;
    assert_eq!(s1.metric("kms_sidecar_stale_keys_served_total").await, 1.0);

    // A refusal drops the stale key: the revocation is not extended.
    proxy.set(Fault::kms("DisabledException"));
    assert_eq!(
        open(&s1, "stale", &ct).await.code(),
        "root_key_access_denied"
    );
    proxy.set(Fault::Refuse);
    assert_eq!(open(&s1, "stale", &ct).await.code(), "root_key_unavailable");

    proxy.set(Fault::None);
    opens_to(&s1, "stale", &ct, b"data").await;
}
