//! Process metrics in Prometheus/OpenMetrics text: key-cache hits and misses, root-provider calls
//! and errors per root id and operation, fallback unwraps and stale keys served. Owns the counters
//! and their encoding only; every layer may count into it, and it imports none of them. Labels
//! never carry tenants (unbounded) or key material.

use std::fmt;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// The content type of `Metrics::encode`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    cache: &'static str,
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
    fn label(self) -> &'static str {
        match self {
            CacheKind::Keys => "keys",
            CacheKind::Tenants => "tenants",
        }
    }
}

/// Every counter of the process. Cheap to share behind an `Arc`; counting is lock-free.
pub struct Metrics {
    registry: Registry,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    root_calls: Family<RootLabels, Counter>,
    root_errors: Family<RootErrorLabels, Counter>,
    fallback_unwraps: Family<FallbackLabels, Counter>,
    stale_keys_served: Counter<u64, AtomicU64>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let cache_hits = Family::<CacheLabels, Counter>::default();
        let cache_misses = Family::<CacheLabels, Counter>::default();
        let root_calls = Family::<RootLabels, Counter>::default();
        let root_errors = Family::<RootErrorLabels, Counter>::default();
        let fallback_unwraps = Family::<FallbackLabels, Counter>::default();
        let stale_keys_served = Counter::<u64, AtomicU64>::default();
        let mut registry = Registry::with_prefix("kms_sidecar");
        registry.register(
            "cache_hits",
            "Lookups answered from a cache, by cache (keys, tenants)",
            cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Lookups that went to the store or a root, by cache (keys, tenants)",
            cache_misses.clone(),
        );
        registry.register(
            "root_calls",
            "Calls to a root key provider, by root id and operation (for aws-kms roots: \
             generate = GenerateDataKey, unwrap = Decrypt, wrap = Encrypt, health = DescribeKey)",
            root_calls.clone(),
        );
        registry.register(
            "root_errors",
            "Failed calls to a root key provider, by root id, operation and error kind",
            root_errors.clone(),
        );
        registry.register(
            "fallback_unwraps",
            "Key versions unwrapped by a later root after an earlier one holding a wrap failed, \
             by the root that succeeded",
            fallback_unwraps.clone(),
        );
        registry.register(
            "stale_keys_served",
            "Keys used past the cache TTL because their root was unreachable (stale_if_error)",
            stale_keys_served.clone(),
        );
        Metrics {
            registry,
            cache_hits,
            cache_misses,
            root_calls,
            root_errors,
            fallback_unwraps,
            stale_keys_served,
        }
    }
}

impl Metrics {
    pub fn cache_hit(&self, cache: CacheKind) {
        self.cache_hits
            .get_or_create(&CacheLabels {
                cache: cache.label(),
            })
            .inc();
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
        self.cache_misses
            .get_or_create(&CacheLabels {
                cache: cache.label(),
            })
            .inc();
    }

    /// Counts one call of `op` on `root`, and its failure of kind `error` if it failed.
    pub fn root_call(&self, root: &str, op: &'static str, error: Option<&'static str>) {
        self.root_calls
            .get_or_create(&RootLabels {
                root: root.to_owned(),
                op,
            })
            .inc();
        if let Some(kind) = error {
            self.root_errors
                .get_or_create(&RootErrorLabels {
                    root: root.to_owned(),
                    op,
                    kind,
                })
                .inc();
        }
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

    /// The OpenMetrics text exposition of every counter.
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

    #[test]
    fn counters_show_in_the_exposition_with_their_labels() {
        let m = Metrics::default();
        m.cache_hit(CacheKind::Keys);
        m.cache_hit(CacheKind::Keys);
        m.cache_miss(CacheKind::Tenants);
        m.root_call("aws-kms:alias/a", "unwrap", None);
        m.root_call("aws-kms:alias/a", "unwrap", Some("unavailable"));
        m.fallback_unwrap("keyfile:00");
        let text = m.encode();
        assert!(
            text.contains(r#"kms_sidecar_cache_hits_total{cache="keys"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"kms_sidecar_cache_misses_total{cache="tenants"} 1"#));
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
}
