//! The cache of unwrapped data keys: by id, with a time to live and a capacity, plus the key
//! lists of aliases.
//!
//! An entry is *fresh* for `ttl` after it was loaded; the prefetch methods reload it once it is
//! older than half the TTL (so that a key in steady use never goes missing), and the lookups of
//! the [`Keyring`](crate::Keyring) refuse it once it is older than the TTL. Expired and evicted
//! entries are removed from the maps; a key's material is wiped when the last `Arc<Key>` to it
//! drops (the material lives in a `secrecy::SecretSlice`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use super::usage::LeaseCell;
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
}

/// One cached key. `lease` is shared by every snapshot of one unwrapped secret (a state change
/// keeps the secret and its usage counter, and so the lease).
#[derive(Clone)]
pub(super) struct KeyEntry {
    pub(super) key: Arc<Key>,
    pub(super) lease: Arc<LeaseCell>,
    loaded: Instant,
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
pub(super) struct AliasEntry {
    primary: Option<KeyId>,
    keys: Vec<KeyId>,
    loaded: Instant,
}

impl AliasEntry {
    pub(super) fn new(primary: Option<KeyId>, keys: Vec<KeyId>) -> Self {
        AliasEntry {
            primary,
            keys,
            loaded: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Inner {
    keys: HashMap<KeyId, KeyEntry>,
    aliases: HashMap<String, AliasEntry>,
}

pub(super) struct KeyCache {
    ttl: Duration,
    capacity: usize,
    inner: RwLock<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    loads: AtomicU64,
    evictions: AtomicU64,
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
        }
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

    pub(super) fn primary(&self, alias: &str) -> Result<Arc<Key>> {
        let now = Instant::now();
        let inner = self.read();
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
        let Some(id) = a.primary else {
            return Err(Error::NoPrimaryKey(alias.to_owned()));
        };
        match inner.keys.get(&id) {
            Some(e) if self.fresh(e.loaded, now) => {
                // A reload by id may have seen a demotion the alias entry has not seen yet.
                if e.key.state() == KeyState::Primary {
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
        Ok(a.keys
            .iter()
            .filter_map(|id| inner.keys.get(id))
            .filter(|e| self.fresh(e.loaded, now))
            .filter(|e| matches!(e.key.state(), KeyState::Primary | KeyState::Active))
            .map(|e| e.key.clone())
            .collect())
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

    pub(super) fn insert_keys(&self, entries: Vec<KeyEntry>) {
        let mut inner = self.write();
        // Also here, not only in the sweeper: a vault built outside a runtime has none.
        self.purge(&mut inner, Instant::now());
        for e in entries {
            inner.keys.insert(e.key.id(), e);
        }
        self.enforce_capacity(&mut inner);
    }

    pub(super) fn insert_alias(&self, alias: String, entry: AliasEntry) {
        let mut inner = self.write();
        inner.aliases.insert(alias, entry);
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
        self.write().keys.remove(id);
    }

    /// Forgets an alias's key list.
    pub(super) fn invalidate_alias(&self, alias: &str) {
        self.write().aliases.remove(alias);
    }

    /// Drops every entry.
    pub(super) fn clear(&self) {
        let mut inner = self.write();
        let n = inner.keys.len();
        inner.keys.clear();
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
        let before = inner.keys.len();
        inner.keys.retain(|_, e| self.fresh(e.loaded, now));
        inner.aliases.retain(|_, a| self.fresh(a.loaded, now));
        let gone = before - inner.keys.len();
        self.evictions.fetch_add(gone as u64, Ordering::Relaxed);
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
            inner.keys.remove(id);
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
        }
    }
}
