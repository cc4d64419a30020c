//! The key ring's cache: one compact entry per tenant, holding what the key ring needs of its
//! record and its unwrapped key versions, in sharded tables with clock (second-chance)
//! eviction and a TTL.
//!
//! Two bounds hold, each to within one entry per shard: at most `max_entries` tenant records
//! and at most `max_entries` unwrapped keys. Loads are single-flight: concurrent misses of one
//! tenant record or one key version share one store read and one root unwrap. A load that
//! raced with an invalidation is handed to the callers that waited for it but is not kept, so a
//! change seen through `invalidate` is never undone by a read that started before it.
//!
//! Unwrapped keys past the TTL are kept for the stale window (when there is one) and handed out
//! only by `stale_key`, and only if their load started after their root's last refusal.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use tokio::sync::OnceCell;

use super::{KeyringError, TenantRecord};
use crate::crypto::DataKey;
use crate::metrics::{CacheKind, Eviction, Metrics};
use crate::providers::RootId;
use crate::tenant::TenantId;

/// What the key ring keeps of a tenant record: enough to seal and to check an open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TenantView {
    pub active_version: u32,
    pub min_decrypt_version: u32,
    pub destroyed: bool,
    pub root: Option<Arc<RootId>>,
}

impl From<&TenantRecord> for TenantView {
    fn from(r: &TenantRecord) -> Self {
        TenantView {
            active_version: r.active_version,
            min_decrypt_version: r.min_decrypt_version,
            destroyed: r.destroyed_at.is_some(),
            root: r.root.clone().map(Arc::new),
        }
    }
}

/// Root index of a key that may not be used past the TTL: the stale window is off, or this
/// process has seen more distinct roots than it indexes.
const NO_STALE: u16 = u16::MAX;

/// Slots a put looks at for expired parts, so that entries nobody asks for again still leave.
const SWEEP_PER_PUT: usize = 2;

struct KeyEntry {
    key: Arc<DataKey>,
    /// When its load started (before the root was asked), in milliseconds since the cache's
    /// epoch: the TTL runs from there, and a refusal after it rules out stale use.
    loaded: u64,
    version: u32,
    /// Index in `TenantCache::roots` of the root that unwrapped it, or `NO_STALE`.
    root: u16,
}

struct Slot {
    tenant: TenantId,
    record: Option<(TenantView, u64)>,
    keys: Vec<KeyEntry>,
    /// The clock's second-chance bit: set on every use, cleared as the hand passes.
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    /// Indexes into `slots`, hashed by the slot's tenant.
    index: HashTable<u32>,
    slots: Vec<Slot>,
    hand: usize,
    sweep: usize,
    /// Bumped by every invalidation of one of the shard's tenants; a load that started under
    /// another value is not kept.
    generation: u64,
}

/// Which bound a put must make room under.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Record,
    Keys,
}

impl Shard {
    fn find(&self, hash: u64, tenant: &TenantId) -> Option<usize> {
        let slots = &self.slots;
        self.index
            .find(hash, |&i| slots[i as usize].tenant == *tenant)
            .map(|&i| i as usize)
    }

    fn push(&mut self, hash: u64, hasher: &RandomState, tenant: TenantId) -> usize {
        let i = self.slots.len();
        self.slots.push(Slot {
            tenant,
            record: None,
            keys: Vec::new(),
            referenced: true,
        });
        let slots = &self.slots;
        self.index.insert_unique(hash, i as u32, |&j| {
            hasher.hash_one(&slots[j as usize].tenant)
        });
        i
    }

    /// Takes slot `i` out; the last slot moves into its place.
    fn remove(&mut self, hasher: &RandomState, i: usize) -> Slot {
        let hash = hasher.hash_one(&self.slots[i].tenant);
        if let Ok(e) = self.index.find_entry(hash, |&j| j as usize == i) {
            e.remove();
        }
        let last = self.slots.len() - 1;
        if i != last {
            let hash = hasher.hash_one(&self.slots[last].tenant);
            if let Some(j) = self.index.find_mut(hash, |&j| j as usize == last) {
                *j = i as u32;
            }
        }
        self.slots.swap_remove(i)
    }
}

/// Concurrent loads of one key, run once: every caller waiting on a key gets the result of the
/// one load running for it. A caller that gives up (its request was dropped) hands the load to
/// the next waiter.
struct Flights<K, V> {
    running: Mutex<HashMap<K, Flight<V>>>,
}

/// One load: the first caller to reach it runs it; the others wait for its result.
type Flight<V> = Arc<OnceCell<Result<V, KeyringError>>>;

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    fn new() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<K, Flight<V>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(
        &self,
        key: K,
        load: impl Future<Output = Result<V, KeyringError>>,
    ) -> Result<V, KeyringError> {
        let cell = self.running().entry(key.clone()).or_default().clone();
        let mut guard = FlightGuard {
            flights: self,
            key,
            cell,
            done: false,
        };
        let out = guard.cell.get_or_init(|| load).await.clone();
        guard.done = true;
        out
    }

    /// New callers of the keys `drop` picks start their own loads.
    fn forget(&self, drop: impl Fn(&K) -> bool) {
        self.running().retain(|k, _| !drop(k));
    }
}

/// Takes a load out of `Flights` when it is done, or when its last caller gives up (its request
/// was dropped), so abandoned loads do not pile up in the map.
struct FlightGuard<'a, K: Hash + Eq + Clone, V: Clone> {
    flights: &'a Flights<K, V>,
    key: K,
    cell: Flight<V>,
    done: bool,
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for FlightGuard<'_, K, V> {
    fn drop(&mut self) {
        let mut running = self.flights.running();
        let ours = running
            .get(&self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Two references when no one else waits: the map's and this guard's. Callers clone
        // under the same lock, so the count cannot rise behind this check.
        if ours && (self.done || Arc::strong_count(&self.cell) <= 2) {
            running.remove(&self.key);
        }
    }
}

pub(crate) struct TenantCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    max_entries: usize,
    records: AtomicUsize,
    keys: AtomicUsize,
    /// Milliseconds.
    ttl: u64,
    /// Milliseconds a key is kept (TTL plus the stale window).
    keep: u64,
    stale: bool,
    epoch: Instant,
    /// The roots that unwrapped keys, indexed by `KeyEntry::root` (only with a stale window).
    roots: Mutex<Roots>,
    record_loads: Flights<(TenantId, bool), TenantView>,
    key_loads: Flights<(TenantId, u32), Arc<DataKey>>,
    metrics: Arc<Metrics>,
}

/// The roots keys were unwrapped by, and when each last refused.
#[derive(Default)]
struct Roots {
    index: HashMap<RootId, u16>,
    /// By index: the id, and the time of its last refusal (ms since the epoch).
    roots: Vec<(RootId, Option<u64>)>,
}

impl Roots {
    /// The root's index, added if new; `NO_STALE` once the index space is used up.
    fn index(&mut self, root: &RootId) -> u16 {
        if let Some(&i) = self.index.get(root) {
            return i;
        }
        match u16::try_from(self.roots.len()) {
            Ok(i) if i != NO_STALE => {
                self.roots.push((root.clone(), None));
                self.index.insert(root.clone(), i);
                i
            }
            _ => NO_STALE,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TenantCache {
    pub fn new(
        max_entries: u64,
        ttl: Duration,
        stale_if_error: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX).max(1);
        // About 4,096 tenants a shard, 64 shards at most: enough to spread the locks of a
        // sidecar's workers, few enough that the bounds' per-shard slack stays small.
        let shards = (max_entries / 4096).clamp(1, 64).next_power_of_two();
        TenantCache {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            max_entries,
            records: AtomicUsize::new(0),
            keys: AtomicUsize::new(0),
            ttl: millis(ttl),
            keep: millis(ttl.saturating_add(stale_if_error)),
            stale: !stale_if_error.is_zero(),
            epoch: Instant::now(),
            roots: Mutex::new(Roots::default()),
            record_loads: Flights::new(),
            key_loads: Flights::new(),
            metrics,
        }
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn roots(&self) -> MutexGuard<'_, Roots> {
        self.roots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // The table uses the hash's low bits for buckets and its top 7 for tags: pick the
        // shard from bits in between, so a shard's tenants still spread over its buckets.
        let i = (hash >> 32) as usize & (self.shards.len() - 1);
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record_fresh(&self, loaded: u64, now: u64) -> bool {
        now.saturating_sub(loaded) < self.ttl
    }

    fn key_fresh(&self, e: &KeyEntry, now: u64) -> bool {
        now.saturating_sub(e.loaded) < self.ttl
    }

    /// Kept past the TTL for `stale_key`.
    fn key_kept(&self, e: &KeyEntry, now: u64) -> bool {
        self.key_fresh(e, now) || (e.root != NO_STALE && now.saturating_sub(e.loaded) < self.keep)
    }

    /// The tenant's record, if cached and fresh; counts a hit or a miss.
    pub fn record(&self, tenant: &TenantId) -> Option<TenantView> {
        let hash = self.hasher.hash_one(tenant);
        let now = self.now();
        let found = {
            let mut shard = self.shard(hash);
            shard.find(hash, tenant).and_then(|i| {
                let slot = &mut shard.slots[i];
                match &slot.record {
                    Some((view, loaded)) if self.record_fresh(*loaded, now) => {
                        slot.referenced = true;
                        Some(view.clone())
                    }
                    _ => None,
                }
            })
        };
        match found {
            Some(_) => self.metrics.cache_hit(CacheKind::Tenants),
            None => self.metrics.cache_miss(CacheKind::Tenants),
        }
        found
    }

    /// The key of `version`, if cached and fresh; counts a hit or a miss.
    pub fn key(&self, tenant: &TenantId, version: u32) -> Option<Arc<DataKey>> {
        let hash = self.hasher.hash_one(tenant);
        let now = self.now();
        let found = {
            let mut shard = self.shard(hash);
            shard.find(hash, tenant).and_then(|i| {
                let slot = &mut shard.slots[i];
                let e = slot.keys.iter().find(|e| e.version == version)?;
                if !self.key_fresh(e, now) {
                    return None;
                }
                slot.referenced = true;
                Some(e.key.clone())
            })
        };
        match found {
            Some(_) => self.metrics.cache_hit(CacheKind::Keys),
            None => self.metrics.cache_miss(CacheKind::Keys),
        }
        found
    }

    /// A key inside the stale window whose load started after its root's last refusal, and
    /// the root that unwrapped it.
    pub fn stale_key(&self, tenant: &TenantId, version: u32) -> Option<(Arc<DataKey>, RootId)> {
        if !self.stale {
            return None;
        }
        let hash = self.hasher.hash_one(tenant);
        let now = self.now();
        let (key, root, loaded) = {
            let shard = self.shard(hash);
            let i = shard.find(hash, tenant)?;
            let e = shard.slots[i].keys.iter().find(|e| e.version == version)?;
            if e.root == NO_STALE || !self.key_kept(e, now) {
                return None;
            }
            (e.key.clone(), e.root, e.loaded)
        };
        let roots = self.roots();
        let (root, refused) = roots.roots.get(usize::from(root))?;
        if refused.is_some_and(|at| at >= loaded) {
            return None;
        }
        Some((key, root.clone()))
    }

    /// Loads the tenant's record once for all concurrent callers (`load` runs only if no load
    /// for the same tenant and `create` is running) and keeps it.
    pub async fn load_record(
        &self,
        tenant: &TenantId,
        create: bool,
        load: impl Future<Output = Result<TenantView, KeyringError>>,
    ) -> Result<TenantView, KeyringError> {
        self.record_loads
            .run((tenant.clone(), create), async {
                let (generation, started) = self.start(tenant);
                let view = load.await?;
                self.put_record(tenant, view.clone(), generation, started);
                Ok(view)
            })
            .await
    }

    /// Loads a key version once for all concurrent callers and keeps it, with the root that
    /// unwrapped it.
    pub async fn load_key(
        &self,
        tenant: &TenantId,
        version: u32,
        load: impl Future<Output = Result<(Arc<DataKey>, RootId), KeyringError>>,
    ) -> Result<Arc<DataKey>, KeyringError> {
        self.key_loads
            .run((tenant.clone(), version), async {
                let (generation, started) = self.start(tenant);
                let (key, root) = load.await?;
                self.put_key(tenant, version, key.clone(), &root, generation, started);
                Ok(key)
            })
            .await
    }

    /// The tenant's shard generation and the time, as a load starts.
    fn start(&self, tenant: &TenantId) -> (u64, u64) {
        let generation = self.shard(self.hasher.hash_one(tenant)).generation;
        (generation, self.now())
    }

    fn put_record(&self, tenant: &TenantId, view: TenantView, generation: u64, started: u64) {
        let Some((mut shard, hash, now)) = self.lock_for_put(tenant, generation) else {
            return;
        };
        if let Some(i) = shard.find(hash, tenant) {
            let slot = &mut shard.slots[i];
            if slot.record.is_some() {
                slot.record = Some((view, started));
                slot.referenced = true;
                return;
            }
        }
        let i = self.slot_with_room(&mut shard, hash, tenant, now, Part::Record);
        let slot = &mut shard.slots[i];
        slot.record = Some((view, started));
        slot.referenced = true;
        self.records.fetch_add(1, Ordering::Relaxed);
    }

    fn put_key(
        &self,
        tenant: &TenantId,
        version: u32,
        key: Arc<DataKey>,
        root: &RootId,
        generation: u64,
        started: u64,
    ) {
        let root = if self.stale {
            self.roots().index(root)
        } else {
            NO_STALE
        };
        let Some((mut shard, hash, now)) = self.lock_for_put(tenant, generation) else {
            return;
        };
        let entry = KeyEntry {
            key,
            loaded: started,
            version,
            root,
        };
        if let Some(i) = shard.find(hash, tenant) {
            let slot = &mut shard.slots[i];
            if let Some(e) = slot.keys.iter_mut().find(|e| e.version == version) {
                *e = entry;
                slot.referenced = true;
                return;
            }
        }
        let i = self.slot_with_room(&mut shard, hash, tenant, now, Part::Keys);
        let slot = &mut shard.slots[i];
        slot.keys.push(entry);
        slot.referenced = true;
        self.keys.fetch_add(1, Ordering::Relaxed);
    }

    /// The tenant's shard, locked, with the tenant's hash and the time, for a put of a load
    /// that started under `generation`; `None` if an invalidation came since (nothing is kept).
    /// Sweeps a few slots for expired parts on the way.
    fn lock_for_put(
        &self,
        tenant: &TenantId,
        generation: u64,
    ) -> Option<(MutexGuard<'_, Shard>, u64, u64)> {
        let hash = self.hasher.hash_one(tenant);
        let mut shard = self.shard(hash);
        if shard.generation != generation {
            return None;
        }
        let now = self.now();
        self.sweep(&mut shard, now);
        Some((shard, hash, now))
    }

    /// The tenant's slot (made if missing) after evicting under `part`'s bound until one more
    /// entry of that kind fits.
    fn slot_with_room(
        &self,
        shard: &mut Shard,
        hash: u64,
        tenant: &TenantId,
        now: u64,
        part: Part,
    ) -> usize {
        let held = match part {
            Part::Record => &self.records,
            Part::Keys => &self.keys,
        };
        while held.load(Ordering::Relaxed) >= self.max_entries && self.evict_one(shard, now, part) {
        }
        match shard.find(hash, tenant) {
            Some(i) => i,
            None => shard.push(hash, &self.hasher, tenant.clone()),
        }
    }

    /// Evicts `part` (the record, or every key) of the first slot holding one that the clock
    /// hand finds unreferenced; the slot goes too if nothing is left in it. False if no slot of
    /// the shard holds such a part.
    fn evict_one(&self, shard: &mut Shard, now: u64, part: Part) -> bool {
        // Two turns at most: the first clears every bit it passes.
        for _ in 0..=2 * shard.slots.len() {
            if shard.hand >= shard.slots.len() {
                shard.hand = 0;
            }
            let at = shard.hand;
            let Some(slot) = shard.slots.get_mut(at) else {
                return false;
            };
            let holds = match part {
                Part::Record => slot.record.is_some(),
                Part::Keys => !slot.keys.is_empty(),
            };
            if !holds || slot.referenced {
                slot.referenced = false;
                shard.hand += 1;
                continue;
            }
            let evicted = Slot {
                tenant: slot.tenant.clone(),
                record: match part {
                    Part::Record => slot.record.take(),
                    Part::Keys => None,
                },
                keys: match part {
                    Part::Record => Vec::new(),
                    Part::Keys => std::mem::take(&mut slot.keys),
                },
                referenced: false,
            };
            if slot.record.is_none() && slot.keys.is_empty() {
                shard.remove(&self.hasher, at);
            } else {
                shard.hand += 1;
            }
            self.account(evicted, now, Eviction::Size);
            return true;
        }
        false
    }

    /// Counts what left with a slot: entries already expired as expired, the rest as `cause`.
    fn account(&self, slot: Slot, now: u64, cause: Eviction) {
        if let Some((_, loaded)) = slot.record {
            self.records.fetch_sub(1, Ordering::Relaxed);
            let cause = if self.record_fresh(loaded, now) {
                cause
            } else {
                Eviction::Expired
            };
            self.metrics.cache_eviction(CacheKind::Tenants, cause);
        }
        for e in &slot.keys {
            self.keys.fetch_sub(1, Ordering::Relaxed);
            let cause = if self.key_kept(e, now) {
                cause
            } else {
                Eviction::Expired
            };
            self.metrics.cache_eviction(CacheKind::Keys, cause);
        }
    }

    /// Drops slot `i`'s expired record and keys; the slot too if nothing is left. True if it
    /// was removed (another slot is now at `i`).
    fn expire(&self, shard: &mut Shard, i: usize, now: u64) -> bool {
        let slot = &mut shard.slots[i];
        if let Some((_, loaded)) = &slot.record
            && !self.record_fresh(*loaded, now)
        {
            slot.record = None;
            self.records.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .cache_eviction(CacheKind::Tenants, Eviction::Expired);
        }
        let before = slot.keys.len();
        slot.keys.retain(|e| self.key_kept(e, now));
        for _ in slot.keys.len()..before {
            self.keys.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .cache_eviction(CacheKind::Keys, Eviction::Expired);
        }
        if slot.record.is_none() && slot.keys.is_empty() {
            shard.remove(&self.hasher, i);
            return true;
        }
        false
    }

    /// Looks at a few slots past the sweep cursor for expired parts.
    fn sweep(&self, shard: &mut Shard, now: u64) {
        for _ in 0..SWEEP_PER_PUT {
            if shard.sweep >= shard.slots.len() {
                shard.sweep = 0;
                if shard.slots.is_empty() {
                    return;
                }
            }
            let at = shard.sweep;
            if !self.expire(shard, at, now) {
                shard.sweep += 1;
            }
        }
    }

    /// Drops every expired record and key now.
    pub fn purge_expired(&self) {
        let now = self.now();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let mut i = 0;
            while i < shard.slots.len() {
                if !self.expire(&mut shard, i, now) {
                    i += 1;
                }
            }
        }
    }

    /// Drops everything cached for a tenant, and lets loads running for it finish uncached.
    pub fn invalidate(&self, tenant: &TenantId) {
        self.record_loads.forget(|(t, _)| t == tenant);
        self.key_loads.forget(|(t, _)| t == tenant);
        let hash = self.hasher.hash_one(tenant);
        let now = self.now();
        let mut shard = self.shard(hash);
        shard.generation += 1;
        if let Some(i) = shard.find(hash, tenant) {
            let slot = shard.remove(&self.hasher, i);
            self.account(slot, now, Eviction::Invalidated);
        }
    }

    /// Drops everything cached.
    pub fn invalidate_all(&self) {
        self.record_loads.forget(|_| true);
        self.key_loads.forget(|_| true);
        let now = self.now();
        for shard in self.shards.iter() {
            let slots = {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.generation += 1;
                shard.index.clear();
                shard.hand = 0;
                shard.sweep = 0;
                std::mem::take(&mut shard.slots)
            };
            for slot in slots {
                self.account(slot, now, Eviction::Invalidated);
            }
        }
    }

    /// After `root` refused: no key whose load started before now is used past the TTL. Such
    /// keys stay until their stale window ends (counted as cached, never handed out stale).
    pub fn deny_stale(&self, root: &str) {
        if !self.stale {
            return;
        }
        let now = self.now();
        let mut roots = self.roots();
        let i = roots.index(&RootId::new(root));
        if let Some((_, refused)) = roots.roots.get_mut(usize::from(i)) {
            *refused = Some(now);
        }
    }

    /// Tenant records cached (some perhaps expired, until a sweep or a scrape drops them).
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed) as u64
    }

    /// Unwrapped keys held, including those kept for the stale window.
    pub fn keys(&self) -> u64 {
        self.keys.load(Ordering::Relaxed) as u64
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
