//! Process metrics in Prometheus/OpenMetrics text: requests and their latency per operation and
//! outcome, key-cache hits, misses, evictions and size, root-provider calls, errors and latency
//! per root id and operation, store latency per operation, the audit queue, open connections,
//! fallback unwraps and stale keys served. Owns the metrics and their encoding only; every
//! layer may count into it, and it imports none of them. Values that only matter when scraped
//! (cache sizes, the audit queue) are handed in by whoever serves the scrape. Labels never
//! carry tenants, paths (unbounded) or key material.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of `Metrics::encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets: 25 µs (a cached seal) doubling up to 13.1 s (a root or store timing out).
const LATENCY_BUCKETS: (f64, f64, u16) = (0.000_025, 2.0, 20);

fn latency_histogram() -> Histogram {
    let (start, factor, count) = LATENCY_BUCKETS;
    Histogram::new(exponential_buckets(start, factor, count))
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

fn latencies<L: Clone + std::hash::Hash + Eq>() -> Latencies<L> {
    Family::new_with_constructor(latency_histogram)
}

/// The data-plane operations, whose successful requests are the bulk of the traffic: their
/// series are made up front and found without hashing labels or locking a family.
const HOT_OPERATIONS: [&str; 8] = [
    "seal",
    "open",
    "datakey",
    "datakey.unwrap",
    "rewrap",
    "tokenize",
    "reveal",
    "reveal.masked",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    cache: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootLabels {
    root: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RootErrorLabels {
    root: String,
    op: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FallbackLabels {
    root: String,
}

/// Which cache a lookup went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Unwrapped data keys, per (tenant, version).
    Keys,
    /// Tenant records (active version, retirement, own root).
    Tenants,
}

impl CacheKind {
    const ALL: [CacheKind; 2] = [CacheKind::Keys, CacheKind::Tenants];

    /// The position in `ALL`, which lists every variant in declaration order: arrays sized by
    /// `ALL` are indexed by it without a bounds failure.
    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            CacheKind::Keys => "keys",
            CacheKind::Tenants => "tenants",
        }
    }
}

/// Why an entry left a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The cache was full.
    Size,
    /// Past the TTL.
    Expired,
    /// Dropped on purpose: a change to the tenant, here or in another process.
    Invalidated,
}

impl Eviction {
    fn label(self) -> &'static str {
        match self {
            Eviction::Size => "size",
            Eviction::Expired => "expired",
            Eviction::Invalidated => "invalidated",
        }
    }
}

/// A call of a root key provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootOp {
    Generate,
    Wrap,
    Unwrap,
    Health,
}

impl RootOp {
    const ALL: [RootOp; 4] = [
        RootOp::Generate,
        RootOp::Wrap,
        RootOp::Unwrap,
        RootOp::Health,
    ];

    fn label(self) -> &'static str {
        match self {
            RootOp::Generate => "generate",
            RootOp::Wrap => "wrap",
            RootOp::Unwrap => "unwrap",
            RootOp::Health => "health",
        }
    }

    /// The position in `ALL`, which lists every variant in declaration order: arrays sized by
    /// `ALL` are indexed by it without a bounds failure.
    fn index(self) -> usize {
        self as usize
    }
}

/// One root's call counters and latency histograms, looked up once when the root is set up, so
/// that metering a call neither allocates nor locks a family (errors, rare, still do).
pub struct RootMeter {
    root: String,
    calls: [Counter; 4],
    latency: [Histogram; 4],
    errors: Family<RootErrorLabels, Counter>,
}

impl fmt::Debug for RootMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootMeter({})", self.root)
    }
}

impl RootMeter {
    /// Counts one call of `op` that took `elapsed`, and its failure of kind `error` if it failed.
    pub fn observe(&self, op: RootOp, elapsed: Duration, error: Option<&'static str>) {
        let i = op.index();
        self.calls[i].inc();
        self.latency[i].observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&RootErrorLabels {
                    root: self.root.clone(),
                    op: op.label(),
                    kind,
                })
                .inc();
        }
    }
}

/// An open connection, counted until this is dropped (however its task ends).
#[must_use = "the connection counts as open only while this lives"]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The count and latency series of one (operation, outcome).
struct RequestSeries {
    count: Counter,
    latency: Histogram,
}

impl RequestSeries {
    fn observe(&self, elapsed: Duration) {
        self.count.inc();
        self.latency.observe(elapsed.as_secs_f64());
    }
}

/// Every metric of the process, shared behind an `Arc`. The series every request touches
/// (data-plane successes, cache lookups, root calls) are held directly; the others are found
/// through their family's read lock. A histogram observation takes a short mutex.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Latencies<RequestLabels>,
    /// (op, "ok") of each of `HOT_OPERATIONS`, in that order.
    hot_requests: [RequestSeries; HOT_OPERATIONS.len()],
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    /// Per `CacheKind`, made up front: every seal and open looks up two caches.
    hits: [Counter; CacheKind::ALL.len()],
    misses: [Counter; CacheKind::ALL.len()],
    cache_evictions: Family<EvictionLabels, Counter>,
    cache_entries: Family<CacheLabels, Gauge>,
    root_calls: Family<RootLabels, Counter>,
    root_errors: Family<RootErrorLabels, Counter>,
    root_call_duration: Latencies<RootLabels>,
    store_duration: Latencies<StoreLabels>,
    fallback_unwraps: Family<FallbackLabels, Counter>,
    stale_keys_served: Counter<u64, AtomicU64>,
    audit_backlog: Gauge<i64, AtomicI64>,
    audit_dropped: Counter<u64, AtomicU64>,
    open_connections: Gauge<i64, AtomicI64>,
    connections_refused: Counter<u64, AtomicU64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = latencies::<RequestLabels>();
        let hot_requests = HOT_OPERATIONS.map(|op| {
            let labels = RequestLabels { op, outcome: "ok" };
            RequestSeries {
                count: requests.get_or_create(&labels).clone(),
                latency: request_duration.get_or_create(&labels).clone(),
            }
        });
        let per_cache = |family: &Family<CacheLabels, Counter>| {
            CacheKind::ALL.map(|c| {
                let labels = CacheLabels { cache: c.label() };
                family.get_or_create(&labels).clone()
            })
        };
        let cache_hits = Family::default();
        let cache_misses = Family::default();
        let m = Metrics {
            registry: Registry::with_prefix("kms_sidecar"),
            requests,
            request_duration,
            hot_requests,
            hits: per_cache(&cache_hits),
            misses: per_cache(&cache_misses),
            cache_hits,
            cache_misses,
            cache_evictions: Family::default(),
            cache_entries: Family::default(),
            root_calls: Family::default(),
            root_errors: Family::default(),
            root_call_duration: latencies(),
            store_duration: latencies(),
            fallback_unwraps: Family::default(),
            stale_keys_served: Counter::default(),
            audit_backlog: Gauge::default(),
            audit_dropped: Counter::default(),
            open_connections: Gauge::default(),
            connections_refused: Counter::default(),
        };
        m.registered()
    }
}

impl Metrics {
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "requests",
            "HTTP requests answered, by operation (the audit log's name for it, or the route: \
             healthz, readyz, metrics, openapi, unknown) and outcome (ok or the error code)",
            self.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its answer and audit record, by operation and outcome",
            Unit::Seconds,
            self.request_duration.clone(),
        );
        r.register(
            "cache_hits",
            "Lookups answered from a cache, by cache (keys, tenants)",
            self.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Lookups that went to the store or a root, by cache (keys, tenants)",
            self.cache_misses.clone(),
        );
        r.register(
            "cache_evictions",
            "Entries that left a cache, by cache and cause (size: the cache was full; expired: \
             past the TTL; invalidated: dropped after a change to the tenant)",
            self.cache_evictions.clone(),
        );
        r.register(
            "cache_entries",
            "Entries held by a cache when scraped, by cache (keys, tenants)",
            self.cache_entries.clone(),
        );
        r.register(
            "root_calls",
            "Calls to a root key provider, by root id and operation (for aws-kms roots: \
             generate = GenerateDataKey, unwrap = Decrypt, wrap = Encrypt, health = DescribeKey)",
            self.root_calls.clone(),
        );
        r.register(
            "root_errors",
            "Failed calls to a root key provider, by root id, operation and error kind",
            self.root_errors.clone(),
        );
        r.register_with_unit(
            "root_call_duration",
            "Latency of calls to a root key provider (failed ones included), by root id and operation",
            Unit::Seconds,
            self.root_call_duration.clone(),
        );
        r.register_with_unit(
            "store_duration",
            "Latency of calls to the store by the key ring and the token vault (failed ones \
             included), by store method",
            Unit::Seconds,
            self.store_duration.clone(),
        );
        r.register(
            "fallback_unwraps",
            "Key versions unwrapped by a later root after an earlier one holding a wrap failed, \
             by the root that succeeded",
            self.fallback_unwraps.clone(),
        );
        r.register(
            "stale_keys_served",
            "Keys used past the cache TTL because their root was unreachable (stale_if_error)",
            self.stale_keys_served.clone(),
        );
        r.register(
            "audit_backlog",
            "Audit records queued but not yet written, when scraped",
            self.audit_backlog.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit records dropped because the queue was full (events and data-plane records; \
             admin operations are refused instead)",
            self.audit_dropped.clone(),
        );
        r.register(
            "open_connections",
            "Client connections open (Unix socket and TCP)",
            self.open_connections.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at once because limits.max_connections were open",
            self.connections_refused.clone(),
        );
        self
    }

    /// Counts one answered request and its latency. `op` and `outcome` come from fixed sets
    /// (operation names, error codes), so the label sets stay bounded.
    pub fn request(&self, op: &'static str, outcome: &'static str, elapsed: Duration) {
        if outcome == "ok"
            && let Some(i) = HOT_OPERATIONS.iter().position(|hot| *hot == op)
            && let Some(series) = self.hot_requests.get(i)
        {
            series.observe(elapsed);
            return;
        }
        let labels = RequestLabels { op, outcome };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn cache_hit(&self, cache: CacheKind) {
        self.hits[cache.index()].inc();
    }

    /// A miss when this lookup filled the entry (`fresh`), otherwise a hit.
    pub fn cache_miss_or_hit(&self, cache: CacheKind, fresh: bool) {
        if fresh {
            self.cache_miss(cache);
        } else {
            self.cache_hit(cache);
        }
    }

    pub fn cache_miss(&self, cache: CacheKind) {
        self.misses[cache.index()].inc();
    }

    pub fn cache_eviction(&self, cache: CacheKind, cause: Eviction) {
        self.cache_evictions
            .get_or_create(&EvictionLabels {
                cache: cache.label(),
                cause: cause.label(),
            })
            .inc();
    }

    /// How many entries `cache` holds now; set when scraped, not on every insert.
    pub fn cache_entries(&self, cache: CacheKind, entries: u64) {
        self.cache_entries
            .get_or_create(&CacheLabels {
                cache: cache.label(),
            })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// The counters and histograms of `root`, to keep beside it (see `RootMeter`).
    pub fn root_meter(&self, root: &str) -> RootMeter {
        let labels = |op: RootOp| RootLabels {
            root: root.to_owned(),
            op: op.label(),
        };
        RootMeter {
            root: root.to_owned(),
            calls: RootOp::ALL.map(|op| self.root_calls.get_or_create(&labels(op)).clone()),
            latency: RootOp::ALL
                .map(|op| self.root_call_duration.get_or_create(&labels(op)).clone()),
            errors: self.root_errors.clone(),
        }
    }

    /// Awaits one store call, observing its latency under `op` (the store method's name).
    pub async fn store_call<T>(&self, op: &'static str, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let r = call.await;
        self.store_latency(op, started.elapsed());
        r
    }

    /// One store call of `op` took `elapsed`.
    pub fn store_latency(&self, op: &'static str, elapsed: Duration) {
        self.store_duration
            .get_or_create(&StoreLabels { op })
            .observe(elapsed.as_secs_f64());
    }

    /// A key version was unwrapped by `root` after a preferred root failed.
    pub fn fallback_unwrap(&self, root: &str) {
        self.fallback_unwraps
            .get_or_create(&FallbackLabels {
                root: root.to_owned(),
            })
            .inc();
    }

    pub fn stale_key_served(&self) {
        self.stale_keys_served.inc();
    }

    /// The audit queue as seen when scraped: records waiting for the writer, and every record
    /// dropped since start (a running total kept by the audit log).
    pub fn audit_queue(&self, backlog: u64, dropped_total: u64) {
        self.audit_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        // The total only grows; concurrent scrapes may hand it in out of order.
        self.audit_dropped
            .inner()
            .fetch_max(dropped_total, Ordering::Relaxed);
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.open_connections.clone())
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would only truncate the output.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of one series line, e.g. `kms_sidecar_open_connections`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.parse().ok())
        })
    }

    #[test]
    fn counters_show_in_the_exposition_with_their_labels() {
        let m = Metrics::default();
        m.cache_hit(CacheKind::Keys);
        m.cache_hit(CacheKind::Keys);
        m.cache_miss(CacheKind::Tenants);
        let aws = m.root_meter("aws-kms:alias/a");
        aws.observe(RootOp::Unwrap, Duration::from_millis(3), None);
        aws.observe(
            RootOp::Unwrap,
            Duration::from_millis(3),
            Some("unavailable"),
        );
        m.fallback_unwrap("keyfile:00");
        let text = m.encode();
        assert!(
            text.contains(r#"kms_sidecar_cache_hits_total{cache="keys"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"kms_sidecar_cache_misses_total{cache="tenants"} 1"#));
        assert!(text.contains(r#"kms_sidecar_cache_misses_total{cache="keys"} 0"#));
        assert!(
            text.contains(r#"kms_sidecar_root_calls_total{root="aws-kms:alias/a",op="unwrap"} 2"#)
        );
        assert!(text.contains(
            r#"kms_sidecar_root_errors_total{root="aws-kms:alias/a",op="unwrap",kind="unavailable"} 1"#
        ));
        assert!(text.contains(r#"kms_sidecar_fallback_unwraps_total{root="keyfile:00"} 1"#));
        assert!(text.contains("kms_sidecar_stale_keys_served_total 0"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn requests_are_counted_and_timed_per_operation_and_outcome() {
        let m = Metrics::default();
        m.request("seal", "ok", Duration::from_micros(30));
        m.request("seal", "ok", Duration::from_micros(120));
        m.request("open", "decrypt_failed", Duration::from_secs(20));
        let text = m.encode();
        let seal = r#"{op="seal",outcome="ok"}"#;
        assert_eq!(
            value(&text, &format!("kms_sidecar_requests_total{seal}")),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("kms_sidecar_request_duration_seconds_count{seal}")
            ),
            Some(2.0)
        );
        let sum = value(
            &text,
            &format!("kms_sidecar_request_duration_seconds_sum{seal}"),
        );
        assert!(sum.is_some_and(|s| (s - 0.000_15).abs() < 1e-9), "{sum:?}");
        assert!(text.contains("# TYPE kms_sidecar_request_duration_seconds histogram"));
        assert!(text.contains("# UNIT kms_sidecar_request_duration_seconds seconds"));
        // 25 µs doubling to 13.1 s, then +Inf; each bucket counts everything at or below it.
        let bucket = |le: &str, op: &str, outcome: &str| {
            value(
                &text,
                &format!(
                    r#"kms_sidecar_request_duration_seconds_bucket{{le="{le}",op="{op}",outcome="{outcome}"}}"#
                ),
            )
        };
        assert_eq!(bucket("0.000025", "seal", "ok"), Some(0.0));
        assert_eq!(bucket("0.00005", "seal", "ok"), Some(1.0));
        assert_eq!(bucket("0.0001", "seal", "ok"), Some(1.0));
        assert_eq!(bucket("0.0002", "seal", "ok"), Some(2.0));
        assert_eq!(bucket("13.1072", "seal", "ok"), Some(2.0));
        assert_eq!(bucket("+Inf", "seal", "ok"), Some(2.0));
        assert_eq!(bucket("13.1072", "open", "decrypt_failed"), Some(0.0));
        assert_eq!(bucket("+Inf", "open", "decrypt_failed"), Some(1.0));
        // The data-plane operations' successes show from the start, at zero.
        assert_eq!(
            value(
                &text,
                r#"kms_sidecar_requests_total{op="open",outcome="ok"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                r#"kms_sidecar_requests_total{op="tokenize",outcome="ok"}"#
            ),
            Some(0.0)
        );
        let bounds: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kms_sidecar_request_duration_seconds_bucket{"))
            .filter(|l| l.contains(r#"op="seal""#))
            .filter_map(|l| l.split('"').nth(1))
            .collect();
        assert_eq!(bounds.len(), 21, "{bounds:?}");
        assert_eq!(bounds.first(), Some(&"0.000025"));
        assert_eq!(bounds.last(), Some(&"+Inf"));
    }

    #[test]
    fn caches_show_evictions_by_cause_and_their_size() {
        let m = Metrics::default();
        m.cache_eviction(CacheKind::Keys, Eviction::Size);
        m.cache_eviction(CacheKind::Keys, Eviction::Size);
        m.cache_eviction(CacheKind::Tenants, Eviction::Expired);
        m.cache_eviction(CacheKind::Keys, Eviction::Invalidated);
        m.cache_entries(CacheKind::Keys, 7);
        m.cache_entries(CacheKind::Keys, 5);
        let text = m.encode();
        let v = |s: &str| value(&text, s);
        assert_eq!(
            v(r#"kms_sidecar_cache_evictions_total{cache="keys",cause="size"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            v(r#"kms_sidecar_cache_evictions_total{cache="tenants",cause="expired"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"kms_sidecar_cache_evictions_total{cache="keys",cause="invalidated"}"#),
            Some(1.0)
        );
        assert_eq!(v(r#"kms_sidecar_cache_entries{cache="keys"}"#), Some(5.0));
        assert!(text.contains("# TYPE kms_sidecar_cache_entries gauge"));
    }

    #[test]
    fn root_and_store_calls_are_timed_per_operation() {
        let m = Metrics::default();
        let root = m.root_meter("keyfile:00");
        root.observe(RootOp::Generate, Duration::from_micros(40), None);
        root.observe(RootOp::Unwrap, Duration::from_millis(2), None);
        root.observe(RootOp::Unwrap, Duration::from_millis(2), None);
        // A second meter of the same root counts into the same series.
        m.root_meter("keyfile:00")
            .observe(RootOp::Unwrap, Duration::from_millis(2), None);
        m.store_latency("key_version", Duration::from_micros(300));
        m.store_latency("create_tenant", Duration::from_millis(4));
        let text = m.encode();
        let v = |s: &str| value(&text, s);
        let root_count = |op: &str| {
            v(&format!(
                r#"kms_sidecar_root_call_duration_seconds_count{{root="keyfile:00",op="{op}"}}"#
            ))
        };
        assert_eq!(root_count("unwrap"), Some(3.0), "{text}");
        assert_eq!(root_count("generate"), Some(1.0));
        assert_eq!(root_count("wrap"), Some(0.0));
        assert_eq!(
            v(r#"kms_sidecar_root_calls_total{root="keyfile:00",op="unwrap"}"#),
            Some(3.0)
        );
        assert_eq!(
            v(
                r#"kms_sidecar_root_call_duration_seconds_bucket{le="0.0016",root="keyfile:00",op="unwrap"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            v(
                r#"kms_sidecar_root_call_duration_seconds_bucket{le="0.0032",root="keyfile:00",op="unwrap"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            v(r#"kms_sidecar_store_duration_seconds_count{op="key_version"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"kms_sidecar_store_duration_seconds_bucket{le="0.0064",op="create_tenant"}"#),
            Some(1.0)
        );
        assert!(text.contains("# UNIT kms_sidecar_store_duration_seconds seconds"));
    }

    #[test]
    fn fixed_label_arrays_are_indexed_in_declaration_order() {
        for (i, c) in CacheKind::ALL.into_iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        for (i, op) in RootOp::ALL.into_iter().enumerate() {
            assert_eq!(op.index(), i);
        }
    }

    #[test]
    fn open_connections_count_until_their_guard_drops() {
        let m = Metrics::default();
        let first = m.connection_opened();
        let second = m.connection_opened();
        m.connection_refused();
        let open = |m: &Metrics| value(&m.encode(), "kms_sidecar_open_connections");
        assert_eq!(open(&m), Some(2.0));
        drop(first);
        assert_eq!(open(&m), Some(1.0));
        drop(second);
        assert_eq!(open(&m), Some(0.0));
        assert_eq!(
            value(&m.encode(), "kms_sidecar_connections_refused_total"),
            Some(1.0)
        );
    }

    #[test]
    fn the_audit_queue_shows_its_backlog_and_a_dropped_total_that_never_falls() {
        let m = Metrics::default();
        m.audit_queue(12, 3);
        m.audit_queue(4, 2);
        let text = m.encode();
        assert_eq!(
            value(&text, "kms_sidecar_audit_backlog"),
            Some(4.0),
            "{text}"
        );
        assert_eq!(value(&text, "kms_sidecar_audit_dropped_total"), Some(3.0));
        assert!(text.contains("# TYPE kms_sidecar_audit_dropped counter"));
    }
}
