use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{TenantCache, TenantView};
use crate::crypto::DataKey;
use crate::keyring::KeyringError;
use crate::metrics::Metrics;
use crate::providers::RootId;
use crate::tenant::TenantId;

fn t(name: &str) -> TenantId {
    TenantId::parse(name).unwrap()
}

fn view(active: u32) -> TenantView {
    TenantView {
        active_version: active,
        min_decrypt_version: 1,
        destroyed: false,
        root: None,
    }
}

fn cache(max: u64, ttl: Duration, stale: Duration) -> (TenantCache, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (TenantCache::new(max, ttl, stale, metrics.clone()), metrics)
}

fn metric(m: &Metrics, series: &str) -> f64 {
    let text = m.encode();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|r| r.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

async fn put_record(c: &TenantCache, tenant: &TenantId, active: u32) {
    let got = c
        .load_record(tenant, false, async { Ok(view(active)) })
        .await
        .unwrap();
    assert_eq!(got, view(active));
}

async fn put_key(c: &TenantCache, tenant: &TenantId, version: u32, root: &str) -> Arc<DataKey> {
    let key = Arc::new(DataKey::generate().unwrap());
    let k = key.clone();
    let root = RootId::new(root);
    c.load_key(tenant, version, async { Ok((k, root)) })
        .await
        .unwrap();
    key
}

const LONG: Duration = Duration::from_secs(300);

/// Holds a load in flight until the test releases it, and tells the test when it started.
#[derive(Clone)]
struct Gate {
    started: Arc<tokio::sync::Notify>,
    open: Arc<tokio::sync::Notify>,
}

impl Gate {
    fn new() -> Self {
        Gate {
            started: Arc::new(tokio::sync::Notify::new()),
            open: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Inside the load: says it started, then waits for `release`.
    async fn hold(&self) {
        self.started.notify_one();
        self.open.notified().await;
    }

    async fn started(&self) {
        self.started.notified().await;
    }

    fn release(&self) {
        self.open.notify_one();
    }
}

#[tokio::test]
async fn records_and_keys_come_back_until_their_ttl_then_leave_as_expired() {
    let (c, m) = cache(100, Duration::from_millis(150), Duration::ZERO);
    let a = t("a");
    assert!(c.record(&a).is_none());
    put_record(&c, &a, 3).await;
    let key = put_key(&c, &a, 3, "main").await;
    assert_eq!(c.record(&a), Some(view(3)));
    assert!(Arc::ptr_eq(&c.key(&a, 3).unwrap(), &key));
    assert!(c.key(&a, 2).is_none(), "only the version that was put");
    assert!(c.key(&t("b"), 3).is_none());
    assert_eq!((c.records(), c.keys()), (1, 1));
    assert_eq!(
        metric(&m, r#"kms_sidecar_cache_hits_total{cache="keys"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"kms_sidecar_cache_misses_total{cache="keys"}"#),
        2.0
    );
    assert_eq!(
        metric(&m, r#"kms_sidecar_cache_hits_total{cache="tenants"}"#),
        1.0
    );
    assert_eq!(
        metric(&m, r#"kms_sidecar_cache_misses_total{cache="tenants"}"#),
        1.0
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.record(&a).is_none());
    assert!(c.key(&a, 3).is_none());
    assert!(c.stale_key(&a, 3).is_none(), "no stale window");
    c.purge_expired();
    assert_eq!((c.records(), c.keys()), (0, 0));
    let expired = |cache: &str| {
        metric(
            &m,
            &format!(r#"kms_sidecar_cache_evictions_total{{cache="{cache}",cause="expired"}}"#),
        )
    };
    assert_eq!((expired("tenants"), expired("keys")), (1.0, 1.0));
}

#[tokio::test]
async fn both_bounds_hold_and_what_leaves_is_counted_as_size() {
    let (c, m) = cache(8, LONG, Duration::ZERO);
    for i in 0..20 {
        let tenant = t(&format!("t{i}"));
        put_record(&c, &tenant, 1).await;
        put_key(&c, &tenant, 1, "main").await;
        put_key(&c, &tenant, 2, "main").await;
        assert!(c.records() <= 8, "records {}", c.records());
        assert!(c.keys() <= 8, "keys {}", c.keys());
    }
    assert!(c.key(&t("t19"), 2).is_some(), "the newest key stays");
    let size = |cache: &str| {
        metric(
            &m,
            &format!(r#"kms_sidecar_cache_evictions_total{{cache="{cache}",cause="size"}}"#),
        )
    };
    assert_eq!(size("keys") as u64 + c.keys(), 40);
    assert_eq!(size("tenants") as u64 + c.records(), 20);
}

#[tokio::test]
async fn the_bounds_hold_across_shards_to_within_one_entry_per_shard() {
    let (c, _) = cache(10_000, LONG, Duration::ZERO);
    for i in 0..25_000 {
        let tenant = t(&format!("tenant-{i}"));
        put_record(&c, &tenant, 1).await;
        put_key(&c, &tenant, 1, "main").await;
    }
    assert!((9_000..=10_002).contains(&c.records()), "{}", c.records());
    assert!((9_000..=10_002).contains(&c.keys()), "{}", c.keys());
}

#[tokio::test]
async fn a_tenant_used_since_the_last_turn_of_the_clock_is_not_the_one_evicted() {
    let (c, _) = cache(4, LONG, Duration::ZERO);
    for name in ["a", "b", "c", "d", "e"] {
        put_record(&c, &t(name), 1).await;
    }
    // Putting "e" took a turn of the clock, clearing every bit, and evicted "a".
    assert!(c.record(&t("a")).is_none());
    assert!(c.record(&t("b")).is_some());
    put_record(&c, &t("f"), 1).await;
    assert!(c.record(&t("b")).is_some(), "used since the last turn");
    let left = ["c", "d", "e", "f"]
        .iter()
        .filter(|n| c.record(&t(n)).is_some())
        .count();
    assert_eq!(left, 3);
}

#[tokio::test]
async fn concurrent_misses_share_one_load() {
    let (c, _) = cache(100, LONG, Duration::ZERO);
    let c = Arc::new(c);
    let loads = Arc::new(AtomicUsize::new(0));
    let tenant = t("hot");
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (c, loads, tenant) = (c.clone(), loads.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            c.load_key(&tenant, 1, async {
                loads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok((Arc::new(DataKey::generate().unwrap()), RootId::new("main")))
            })
            .await
            .unwrap()
        }));
    }
    let mut keys = Vec::new();
    for task in tasks {
        keys.push(task.await.unwrap());
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert!(keys.iter().all(|k| Arc::ptr_eq(k, &keys[0])));
    assert!(Arc::ptr_eq(&c.key(&tenant, 1).unwrap(), &keys[0]));
}

#[tokio::test]
async fn a_failed_load_is_shared_by_its_waiters_but_not_kept() {
    let (c, _) = cache(100, LONG, Duration::ZERO);
    let tenant = t("gone");
    let err = c
        .load_record(&tenant, false, async { Err(KeyringError::TenantNotFound) })
        .await
        .unwrap_err();
    assert!(matches!(err, KeyringError::TenantNotFound));
    assert!(c.record(&tenant).is_none());
    put_record(&c, &tenant, 2).await;
    assert_eq!(c.record(&tenant), Some(view(2)));
}

#[tokio::test]
async fn a_load_that_raced_an_invalidation_is_returned_but_not_kept() {
    let (c, _) = cache(100, LONG, Duration::ZERO);
    let c = Arc::new(c);
    let tenant = t("racy");
    let gate = Gate::new();
    let load = {
        let (c, tenant, gate) = (c.clone(), tenant.clone(), gate.clone());
        tokio::spawn(async move {
            c.load_record(&tenant, false, async {
                gate.hold().await;
                Ok(view(1))
            })
            .await
        })
    };
    gate.started().await;
    c.invalidate(&tenant);
    // A caller arriving after the invalidation does not join the old load.
    let fresh = c
        .load_record(&tenant, false, async { Ok(view(2)) })
        .await
        .unwrap();
    assert_eq!(fresh, view(2));
    gate.release();
    assert_eq!(load.await.unwrap().unwrap(), view(1));
    assert_eq!(
        c.record(&tenant),
        Some(view(2)),
        "the old read did not overwrite"
    );
}

#[tokio::test]
async fn a_dropped_caller_hands_its_load_to_the_next_waiter() {
    let (c, _) = cache(100, LONG, Duration::ZERO);
    let c = Arc::new(c);
    let tenant = t("handover");
    let first = {
        let (c, tenant) = (c.clone(), tenant.clone());
        tokio::spawn(async move { c.load_record(&tenant, false, std::future::pending()).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = {
        let (c, tenant) = (c.clone(), tenant.clone());
        tokio::spawn(async move { c.load_record(&tenant, false, async { Ok(view(5)) }).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    first.abort();
    let got = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiter took the load over")
        .unwrap()
        .unwrap();
    assert_eq!(got, view(5));
}

#[tokio::test]
async fn stale_keys_outlive_the_ttl_only_until_their_root_refuses() {
    let (c, m) = cache(100, Duration::from_millis(100), LONG);
    let (a, b) = (t("a"), t("b"));
    let ka = put_key(&c, &a, 1, "main").await;
    put_key(&c, &b, 1, "other").await;
    assert!(c.stale_key(&a, 1).is_some(), "a fresh key may bridge too");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(c.key(&a, 1).is_none(), "past the TTL");
    let (stale, root) = c.stale_key(&a, 1).unwrap();
    assert!(Arc::ptr_eq(&stale, &ka));
    assert_eq!(root, RootId::new("main"));
    c.purge_expired();
    assert_eq!(c.keys(), 2, "kept for the stale window");

    c.deny_stale("main");
    assert!(c.stale_key(&a, 1).is_none());
    assert!(c.stale_key(&b, 1).is_some(), "another root's keys stay");
    c.purge_expired();
    assert_eq!(c.keys(), 2, "kept (never handed out) until the window ends");
    assert_eq!(
        metric(
            &m,
            r#"kms_sidecar_cache_evictions_total{cache="keys",cause="expired"}"#
        ),
        0.0
    );

    // A key unwrapped again after the refusal may bridge again.
    tokio::time::sleep(Duration::from_millis(5)).await;
    put_key(&c, &a, 1, "main").await;
    assert!(c.stale_key(&a, 1).is_some());
}

#[tokio::test]
async fn invalidation_drops_a_tenant_or_everything_and_counts_it() {
    let (c, m) = cache(100, LONG, LONG);
    for name in ["a", "b", "c"] {
        put_record(&c, &t(name), 1).await;
        put_key(&c, &t(name), 1, "main").await;
    }
    c.invalidate(&t("a"));
    assert!(c.record(&t("a")).is_none());
    assert!(c.stale_key(&t("a"), 1).is_none(), "stale keys go too");
    assert!(c.key(&t("b"), 1).is_some());
    assert_eq!((c.records(), c.keys()), (2, 2));
    c.invalidate_all();
    assert_eq!((c.records(), c.keys()), (0, 0));
    assert!(c.key(&t("b"), 1).is_none());
    let invalidated = |cache: &str| {
        metric(
            &m,
            &format!(r#"kms_sidecar_cache_evictions_total{{cache="{cache}",cause="invalidated"}}"#),
        )
    };
    assert_eq!((invalidated("tenants"), invalidated("keys")), (3.0, 3.0));
    // Still usable afterwards.
    put_record(&c, &t("a"), 4).await;
    assert_eq!(c.record(&t("a")), Some(view(4)));
}

#[tokio::test]
async fn expired_entries_of_tenants_nobody_asks_for_again_are_swept_by_later_puts() {
    let (c, _) = cache(1_000, Duration::from_millis(50), Duration::ZERO);
    for i in 0..200 {
        put_record(&c, &t(&format!("old-{i}")), 1).await;
    }
    tokio::time::sleep(Duration::from_millis(80)).await;
    for i in 0..400 {
        put_record(&c, &t(&format!("new-{i}")), 1).await;
    }
    // Each put looks at two slots: the 200 expired ones are gone without a purge.
    assert_eq!(c.records(), 400);
}

#[tokio::test]
async fn a_refusal_during_a_load_rules_out_stale_use_of_what_it_loads() {
    let (c, _) = cache(100, Duration::from_millis(50), LONG);
    let c = Arc::new(c);
    let a = t("a");
    let gate = Gate::new();
    let load = {
        let (c, a, gate) = (c.clone(), a.clone(), gate.clone());
        tokio::spawn(async move {
            c.load_key(&a, 1, async {
                gate.hold().await;
                Ok((
                    Arc::new(DataKey::generate().unwrap()),
                    RootId::new("fresh-root"),
                ))
            })
            .await
        })
    };
    gate.started().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A root this cache has never seen refuses while the unwrap is on its way back.
    c.deny_stale("fresh-root");
    gate.release();
    load.await.unwrap().unwrap();
    assert!(c.key(&a, 1).is_some(), "still usable within the TTL");
    assert!(c.stale_key(&a, 1).is_none(), "but never past it");
}

#[tokio::test]
async fn an_abandoned_load_leaves_nothing_behind() {
    let (c, _) = cache(100, LONG, Duration::ZERO);
    let c = Arc::new(c);
    let task = {
        let c = c.clone();
        tokio::spawn(async move { c.load_key(&t("a"), 1, std::future::pending()).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(c.key_loads.running().len(), 1);
    task.abort();
    let _ = task.await;
    assert_eq!(c.key_loads.running().len(), 0);
}

#[tokio::test]
async fn an_invalidation_stops_caching_only_in_its_own_shard() {
    let (c, _) = cache(100_000, LONG, Duration::ZERO);
    let c = Arc::new(c);
    let shards = c.shards.len() as u64;
    assert!(shards > 1);
    let shard_of = |x: &TenantId| (c.hasher.hash_one(x) >> 32) & (shards - 1);
    let a = t("a");
    let b = (0..)
        .map(|i| t(&format!("b{i}")))
        .find(|b| shard_of(b) != shard_of(&a))
        .unwrap();
    let gate = Gate::new();
    let load = {
        let (c, b, gate) = (c.clone(), b.clone(), gate.clone());
        tokio::spawn(async move {
            c.load_record(&b, false, async {
                gate.hold().await;
                Ok(view(1))
            })
            .await
        })
    };
    gate.started().await;
    c.invalidate(&a);
    gate.release();
    load.await.unwrap().unwrap();
    assert_eq!(
        c.record(&b),
        Some(view(1)),
        "another shard's invalidation did not drop it"
    );
}

#[tokio::test]
async fn each_bound_evicts_only_its_own_kind() {
    let (c, _) = cache(2, LONG, Duration::ZERO);
    put_key(&c, &t("a"), 1, "main").await;
    put_key(&c, &t("b"), 1, "main").await;
    for name in ["c", "d", "e"] {
        put_record(&c, &t(name), 1).await;
    }
    assert_eq!((c.records(), c.keys()), (2, 2));
    assert!(c.key(&t("a"), 1).is_some() && c.key(&t("b"), 1).is_some());
    put_key(&c, &t("d"), 1, "main").await;
    assert_eq!((c.records(), c.keys()), (2, 2));
    assert!(
        c.record(&t("d")).is_some(),
        "a key eviction leaves records alone"
    );
}
