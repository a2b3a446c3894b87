//! The cache of unwrapped data keys: by id, with a time to live and a capacity, plus the key
//! lists of aliases.
//!
//! An entry is *fresh* for `ttl` after it was loaded; the prefetch methods reload it once it is
//! older than half the TTL (so that a key in steady use never goes missing), and the lookups of
//! the [`Keyring`](crate::Keyring) refuse it once it is older than the TTL. Expired and evicted
//! entries are removed from the maps; a key's material is wiped when the last `Arc<Key>` to it
//! drops (the material lives in a `secrecy::SecretSlice`).
//!
//! An alias entry is never fresher than its keys: it is stamped with the oldest load time of
//! the keys it lists, and [`KeyCache::readable_keys`] refuses (rather than shortens) a list
//! that names a key which is no longer cached and fresh.
//!
//! Besides the entries, the cache remembers two facts per key that outlive them (no secrets;
//! [`KeyCache::clear`] keeps them too), so that a reload never takes this process backwards on
//! the word of the key vault, whose metadata is not authenticated: the highest usage counts
//! seen ([`Floor`]), and which keys it knows to be destroyed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::lease::LeaseCell;
use crate::error::{Error, Result};
use crate::key::{Key, KeyId, KeyState};

/// Counters of the key vault's cache, readable with
/// [`KeyVault::cache_stats`](super::KeyVault::cache_stats).
///
/// `hits` and `misses` count the keys and aliases the prefetch methods were asked for (found
/// fresh in the cache, or fetched from the vault), plus the synchronous lookups that found
/// nothing (also misses). Lookups that succeed are not counted: they are the hot path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Keys or aliases found fresh in the cache.
    pub hits: u64,
    /// Keys or aliases that had to be fetched, or that a lookup did not find.
    pub misses: u64,
    /// Key documents fetched and unwrapped.
    pub loads: u64,
    /// Keys dropped because they expired or the cache was full.
    pub evictions: u64,
    /// Keys in the cache now.
    pub entries: usize,
    /// Calls to the key vault's KEKs: wraps (new keys, rotation, rewrap) and unwraps, each one
    /// request to the KMS for a remote provider. A bulk operation makes one per data key it
    /// needs, not one per document; a cached key makes none until it expires.
    pub kms_calls: u64,
}

/// One cached key. `lease` is shared by every snapshot of one unwrapped secret (a state change
/// keeps the secret and its usage counter, and so the lease).
#[derive(Clone)]
pub(super) struct KeyEntry {
    pub(super) key: Arc<Key>,
    pub(super) lease: Arc<LeaseCell>,
    loaded: Instant,
}

/// The usage counts this process has known for a key, kept after its cache entry is gone.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub(super) struct Floor {
    /// The highest `fieldcrypt.encryptions` seen in the vault: read there, returned by this
    /// process's own reservations, or restored by it. The vault's count never goes down when
    /// only fieldcrypt writes it.
    pub(super) stored: u64,
    /// The highest in-memory counter the key had here (every random-nonce encryption made or
    /// counted by this process, reserved or not).
    pub(super) used: u64,
}

impl KeyEntry {
    pub(super) fn new(key: Key, lease: Arc<LeaseCell>) -> Self {
        KeyEntry {
            key: Arc::new(key),
            lease,
            loaded: Instant::now(),
        }
    }
}

/// The keys of an alias: the primary (if any) and all keys, primary first, then newest first.
/// `loaded` is the oldest load time of those keys.
struct AliasEntry {
    primary: Option<KeyId>,
    keys: Vec<KeyId>,
    loaded: Instant,
}

#[derive(Default)]
struct Inner {
    keys: HashMap<KeyId, KeyEntry>,
    aliases: HashMap<String, AliasEntry>,
    /// Usage counts of keys no longer (or not yet) cached; only nonzero ones.
    floors: HashMap<KeyId, Floor>,
    /// Keys this process has seen destroyed (or destroyed itself).
    destroyed: HashSet<KeyId>,
}

impl Inner {
    /// Removes a key's entry, remembering its usage counter.
    fn remove_key(&mut self, id: &KeyId) -> Option<KeyEntry> {
        let e = self.keys.remove(id)?;
        self.remember_use(&e);
        Some(e)
    }

    fn remember_use(&mut self, e: &KeyEntry) {
        let used = e.key.encryptions();
        let stored = e.lease.reserved_to();
        if used > 0 || stored > 0 {
            let f = self.floors.entry(e.key.id()).or_default();
            f.used = f.used.max(used);
            f.stored = f.stored.max(stored);
        }
    }
}

pub(super) struct KeyCache {
    ttl: Duration,
    capacity: usize,
    inner: RwLock<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
    /// Wakes the vault's background task: a lookup saw a primary key's lease due for renewal
    /// (or the vault is being dropped).
    wake: Arc<Notify>,
}

impl KeyCache {
    pub(super) fn new(ttl: Duration, capacity: usize) -> Self {
        KeyCache {
            ttl,
            capacity: capacity.max(1),
            inner: RwLock::default(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
        }
    }

    /// What wakes the background task (see [`KeyCache::primary`]).
    pub(super) fn wake_signal(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // Every update is a handful of map operations that cannot panic half-way in a way that
        // matters: a poisoned lock still guards consistent maps.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, loaded: Instant, now: Instant) -> bool {
        now.saturating_duration_since(loaded) < self.ttl
    }

    fn due(&self, loaded: Instant, now: Instant) -> bool {
        now.saturating_duration_since(loaded) >= self.ttl / 2
    }

    pub(super) fn count_hits(&self, n: usize) {
        self.hits.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(super) fn count_misses(&self, n: usize) {
        self.misses.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(super) fn count_loads(&self, n: usize) {
        self.loads.fetch_add(n as u64, Ordering::Relaxed);
    }

    // ---- lookups (the `Keyring`) ----

    pub(super) fn key(&self, id: &KeyId) -> Result<Arc<Key>> {
        let now = Instant::now();
        match self.read().keys.get(id) {
            Some(e) if self.fresh(e.loaded, now) => Ok(e.key.clone()),
            _ => {
                self.count_misses(1);
                Err(Error::UnknownKey(*id))
            }
        }
    }

    /// The fresh entry of `alias` with at least one key; a miss otherwise.
    fn alias_entry<'i>(
        &self,
        inner: &'i Inner,
        alias: &str,
        now: Instant,
    ) -> Result<&'i AliasEntry> {
        let Some(a) = inner
            .aliases
            .get(alias)
            .filter(|a| self.fresh(a.loaded, now))
        else {
            self.count_misses(1);
            return Err(Error::UnknownAlias(alias.to_owned()));
        };
        if a.keys.is_empty() {
            return Err(Error::UnknownAlias(alias.to_owned()));
        }
        Ok(a)
    }

    pub(super) fn primary(&self, alias: &str) -> Result<Arc<Key>> {
        let now = Instant::now();
        let inner = self.read();
        let a = self.alias_entry(&inner, alias, now)?;
        let Some(id) = a.primary else {
            return Err(Error::NoPrimaryKey(alias.to_owned()));
        };
        match inner.keys.get(&id) {
            Some(e) if self.fresh(e.loaded, now) => {
                // A reload by id may have seen a demotion the alias entry has not seen yet.
                if e.key.state() == KeyState::Primary {
                    // The caller is about to encrypt: if the counter has passed the point
                    // where the next prefetch would renew the lease, renew it now, in the
                    // background (one atomic load here; the hot path never waits).
                    if e.lease.renewal_due(e.key.encryptions()) {
                        self.wake.notify_one();
                    }
                    Ok(e.key.clone())
                } else {
                    Err(Error::NoPrimaryKey(alias.to_owned()))
                }
            }
            _ => {
                self.count_misses(1);
                Err(Error::UnknownKey(id))
            }
        }
    }

    pub(super) fn readable_keys(&self, alias: &str) -> Result<Vec<Arc<Key>>> {
        let now = Instant::now();
        let inner = self.read();
        let a = self.alias_entry(&inner, alias, now)?;
        // All or nothing: an equality query over a shorter list would silently match fewer
        // documents. (The alias entry is no fresher than its keys, so this is a key reloaded
        // alone and found gone, or one dropped for capacity: the next prefetch reloads.)
        let mut keys = Vec::with_capacity(a.keys.len());
        for id in &a.keys {
            match inner.keys.get(id) {
                Some(e) if self.fresh(e.loaded, now) => {
                    if matches!(e.key.state(), KeyState::Primary | KeyState::Active) {
                        keys.push(e.key.clone());
                    }
                }
                _ => {
                    self.count_misses(1);
                    return Err(Error::UnknownKey(*id));
                }
            }
        }
        Ok(keys)
    }

    // ---- what the prefetch methods need ----

    /// Whether `id` must be (re)loaded: absent, or older than half the TTL.
    pub(super) fn key_due(&self, id: &KeyId, now: Instant) -> bool {
        self.read()
            .keys
            .get(id)
            .is_none_or(|e| self.due(e.loaded, now))
    }

    /// Whether `alias` must be (re)loaded: its entry or one of its keys is absent or due.
    pub(super) fn alias_due(&self, alias: &str, now: Instant) -> bool {
        let inner = self.read();
        inner.aliases.get(alias).is_none_or(|a| {
            self.due(a.loaded, now)
                || a.keys
                    .iter()
                    .any(|id| inner.keys.get(id).is_none_or(|e| self.due(e.loaded, now)))
        })
    }

    /// The cached entry for `id`, fresh or not: a reload reuses its unwrapped secret (after
    /// checking the material is unchanged), so usage counters and cipher states carry over.
    pub(super) fn entry(&self, id: &KeyId) -> Option<KeyEntry> {
        self.read().keys.get(id).cloned()
    }

    /// The entry of `alias`'s primary key, fresh, if any.
    pub(super) fn primary_entry(&self, alias: &str) -> Option<KeyEntry> {
        let now = Instant::now();
        let inner = self.read();
        let id = inner.aliases.get(alias)?.primary?;
        inner
            .keys
            .get(&id)
            .filter(|e| self.fresh(e.loaded, now))
            .cloned()
    }

    /// The fresh primary id of `alias` (for `ensure_alias`), if the alias is cached.
    pub(super) fn cached_primary_id(&self, alias: &str) -> Option<KeyId> {
        let now = Instant::now();
        self.read()
            .aliases
            .get(alias)
            .filter(|a| self.fresh(a.loaded, now))
            .and_then(|a| a.primary)
    }

    /// Caches loaded keys, and the lists of aliases (primary, then all key ids) whose keys
    /// are among them, in one step: each alias entry is stamped with the oldest load time of
    /// its keys, so it never outlives them.
    pub(super) fn insert_loaded(
        &self,
        entries: Vec<KeyEntry>,
        aliases: Vec<(String, Option<KeyId>, Vec<KeyId>)>,
    ) {
        let mut inner = self.write();
        let now = Instant::now();
        // Also here, not only in the sweeper: a vault built outside a runtime has none.
        self.purge(&mut inner, now);
        for e in entries {
            if let Some(old) = inner.keys.insert(e.key.id(), e) {
                inner.remember_use(&old);
            }
        }
        for (alias, primary, keys) in aliases {
            let loaded = keys
                .iter()
                .map(|id| inner.keys.get(id).map(|e| e.loaded))
                .try_fold(now, |min, l| l.map(|l| min.min(l)));
            match loaded {
                Some(loaded) => {
                    inner.aliases.insert(
                        alias,
                        AliasEntry {
                            primary,
                            keys,
                            loaded,
                        },
                    );
                }
                // Not all of its keys are here: no list rather than one with a hole.
                None => {
                    inner.aliases.remove(&alias);
                }
            }
        }
        self.enforce_alias_capacity(&mut inner);
        self.enforce_capacity(&mut inner);
    }

    fn enforce_alias_capacity(&self, inner: &mut Inner) {
        if inner.aliases.len() > self.capacity {
            let now = Instant::now();
            inner.aliases.retain(|_, a| self.fresh(a.loaded, now));
            let excess = inner.aliases.len().saturating_sub(self.capacity);
            if excess > 0 {
                let mut by_age: Vec<(Instant, String)> = inner
                    .aliases
                    .iter()
                    .map(|(k, a)| (a.loaded, k.clone()))
                    .collect();
                by_age.sort_unstable();
                for (_, k) in by_age.into_iter().take(excess) {
                    inner.aliases.remove(&k);
                }
            }
        }
    }

    /// Forgets a key (after a local change: the next prefetch reloads it).
    pub(super) fn invalidate_key(&self, id: &KeyId) {
        self.write().remove_key(id);
    }

    // ---- what this process knows beyond its entries ----

    /// What this process knows of a key's usage counts: the floor kept after its entry left,
    /// raised by the cached entry's (if any) counter and reservations.
    pub(super) fn floor(&self, id: &KeyId) -> Floor {
        let inner = self.read();
        let mut f = inner.floors.get(id).copied().unwrap_or_default();
        if let Some(e) = inner.keys.get(id) {
            f.used = f.used.max(e.key.encryptions());
            f.stored = f.stored.max(e.lease.reserved_to());
        }
        f
    }

    /// Records that the vault's stored count for `id` was seen at `stored`; returns the
    /// highest count known before (from [`KeyCache::floor`]), which `stored` should not be
    /// below.
    pub(super) fn observe_stored(&self, id: KeyId, stored: u64) -> u64 {
        let before = self.floor(&id).stored;
        if stored > 0 {
            let mut inner = self.write();
            let f = inner.floors.entry(id).or_default();
            f.stored = f.stored.max(stored);
        }
        before
    }

    /// Remembers that `id` is destroyed: its material is gone from this process for good.
    pub(super) fn mark_destroyed(&self, id: KeyId) {
        let mut inner = self.write();
        inner.destroyed.insert(id);
        inner.floors.remove(&id);
    }

    /// Whether this process has seen `id` destroyed.
    pub(super) fn known_destroyed(&self, id: &KeyId) -> bool {
        self.read().destroyed.contains(id)
    }

    /// The cached primary keys whose lease is due for renewal (for the background task).
    pub(super) fn leases_due(&self) -> Vec<KeyEntry> {
        let now = Instant::now();
        let inner = self.read();
        let mut due: Vec<KeyEntry> = inner
            .aliases
            .values()
            .filter_map(|a| a.primary)
            .filter_map(|id| inner.keys.get(&id))
            .filter(|e| self.fresh(e.loaded, now) && e.key.state() == KeyState::Primary)
            .filter(|e| e.lease.renewal_due(e.key.encryptions()))
            .cloned()
            .collect();
        due.sort_unstable_by_key(|e| e.key.id());
        due.dedup_by_key(|e| e.key.id());
        due
    }

    /// Forgets an alias's key list.
    pub(super) fn invalidate_alias(&self, alias: &str) {
        self.write().aliases.remove(alias);
    }

    /// Drops every entry (not what [`KeyCache::floor`] and [`KeyCache::known_destroyed`] keep).
    pub(super) fn clear(&self) {
        let mut inner = self.write();
        let n = inner.keys.len();
        let ids: Vec<KeyId> = inner.keys.keys().copied().collect();
        for id in &ids {
            inner.remove_key(id);
        }
        inner.aliases.clear();
        self.evictions.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Drops expired entries (the sweeper calls this; so does every insertion at capacity).
    pub(super) fn purge_expired(&self) {
        let now = Instant::now();
        let mut inner = self.write();
        self.purge(&mut inner, now);
    }

    fn purge(&self, inner: &mut Inner, now: Instant) {
        let expired: Vec<KeyId> = inner
            .keys
            .iter()
            .filter(|(_, e)| !self.fresh(e.loaded, now))
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            inner.remove_key(id);
        }
        inner.aliases.retain(|_, a| self.fresh(a.loaded, now));
        self.evictions
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
    }

    fn enforce_capacity(&self, inner: &mut Inner) {
        if inner.keys.len() <= self.capacity {
            return;
        }
        self.purge(inner, Instant::now());
        let excess = inner.keys.len().saturating_sub(self.capacity);
        if excess == 0 {
            return;
        }
        // Oldest loads first: keys in use are reloaded (and so renewed) by the prefetches.
        let mut by_age: Vec<(Instant, KeyId)> =
            inner.keys.iter().map(|(id, e)| (e.loaded, *id)).collect();
        by_age.select_nth_unstable(excess - 1);
        let evicted: HashSet<KeyId> = by_age[..excess].iter().map(|(_, id)| *id).collect();
        for id in &evicted {
            inner.remove_key(id);
        }
        // An alias list that names an evicted key would answer with a hole; drop it too.
        inner
            .aliases
            .retain(|_, a| !a.keys.iter().any(|id| evicted.contains(id)));
        self.evictions.fetch_add(excess as u64, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.read().keys.len(),
            kms_calls: 0,
        }
    }
}
