//! The key vault: data keys in a MongoDB collection, wrapped by a key-encryption key, unwrapped
//! into a cache that the synchronous [`Keyring`] reads.
//!
//! ```text
//!  create_key / rotate ──▶ KeyMaterial::generate ──▶ KekProvider::wrap_with_ad ──▶ insert key document
//!  prefetch_ids / prefetch_aliases ──▶ find ──▶ KekProvider::unwrap_with_ad ──▶ cache (TTL, capacity)
//!  Keyring::key / primary / readable_keys ◀── cache (memory only, never waits)
//! ```
//!
//! Layout of the files:
//! - `key_vault/document.rs`: the key document (MongoDB's layout plus `fieldcrypt`), the
//!   associated data that binds a wrapped key to its document, primary election.
//! - `key_vault/lease.rs`: a key's usage lease in memory (no I/O), shared by its cache entries.
//! - `key_vault/cache.rs`: the cache of unwrapped keys and its counters.
//! - `key_vault/usage.rs`: usage leases for random-nonce suites: the reservations in the vault.
//! - `key_vault/lifecycle.rs`: managing keys: create, rotate, states, destroy, list, rewrap,
//!   import.
//!
//! Imports point one way: `usage → cache → lease`.
//!
//! See `docs/KEY_VAULT.md` for the document layout, the concurrency design and operations.

mod cache;
mod document;
mod lease;
mod lifecycle;
mod usage;

use core::fmt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use futures_util::TryStreamExt;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, IndexModel};
use subtle::ConstantTimeEq;

use self::cache::{KeyCache, KeyEntry};
use self::document::{
    alias_filter, elect, status_of, NewKey, StoredKey, ALIAS, FIELDCRYPT, GENERATION, ID,
    KEY_ALT_NAMES, KEY_MATERIAL, MASTER_KEY, STATE, STATUS, UPDATE_DATE,
};
use self::lease::LeaseCell;
use super::kek::KekProvider;
use super::KeySource;
use crate::csfle::CsfleKeyDocument;
use crate::error::{ArgumentError, Error, KeyVaultError, Result};
use crate::key::{Key, KeyId, KeyKind, KeyMaterial, KeyState, CSFLE_KEY_LEN, FIELDCRYPT_KEY_LEN};
use crate::keyring::Keyring;

pub use self::cache::CacheStats;
pub use self::document::KeyInfo;
pub use self::lifecycle::{RewrapFailure, RewrapOutcome, RewrapReport, RewrappedKey};

/// Where key documents live unless told otherwise: MongoDB's default key vault namespace.
pub const DEFAULT_KEY_VAULT_NAMESPACE: &str = "keyvault.datakeys";

/// How long an unwrapped key stays usable without a reload: 60 s, as in MongoDB's drivers.
/// A state change made by another process is seen within this time.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// How many unwrapped keys the cache holds at most.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// The largest block of random-nonce encryptions a process reserves at once (leases start at
/// 4096 and double up to this).
pub const DEFAULT_USAGE_LEASE: u64 = 1 << 20;

/// How many times an operation that loses a race on a unique index tries again.
const MAX_ATTEMPTS: usize = 16;

/// Key documents re-wrapped per round trip by [`KeyVault::rewrap`].
const REWRAP_BATCH: i64 = 500;

/// MongoDB's error codes.
const DUPLICATE_KEY: i32 = 11000;
const INDEX_OPTIONS_CONFLICT: i32 = 85;
const INDEX_KEY_SPECS_CONFLICT: i32 = 86;

const ALT_NAMES_INDEX: &str = "keyAltNames_1";
const GENERATION_INDEX: &str = "fieldcrypt_alias_generation";

/// The KEKs of a vault: one wraps new keys; all of them (that accept a key's `masterKey`) are
/// tried to unwrap.
#[derive(Clone)]
struct Keks {
    wrap: Arc<dyn KekProvider>,
    unwrap_also: Vec<Arc<dyn KekProvider>>,
}

/// The key vault: data keys stored in a MongoDB collection (default
/// [`DEFAULT_KEY_VAULT_NAMESPACE`]) in the layout of MongoDB's CSFLE key documents, wrapped by a
/// [`KekProvider`], unwrapped on demand into a cache with a TTL and a capacity.
///
/// It is a [`Keyring`] (synchronous, from the cache: call the [`KeySource`] prefetch methods
/// first, as `EncryptedCollection` does) and manages keys: creation and rotation per alias,
/// state changes (seen by other processes within the cache TTL), destruction
/// (crypto-shredding), and re-wrapping every key under a new KEK. Share it behind an [`Arc`].
///
/// ```no_run
/// # async fn demo(client: mongodb::Client) -> fieldcrypt::Result<()> {
/// use std::sync::Arc;
/// use fieldcrypt::mongo::{KeySource, KeyVault, LocalKek};
/// use fieldcrypt::{Context, Cryptor, Field, Schema};
///
/// let vault = Arc::new(KeyVault::new(&client, Arc::new(LocalKek::from_env()?))?);
/// vault.ensure_alias("pii").await?;
/// let schema = Schema::builder().field("ssn", Field::randomized("pii")).build()?;
/// let cryptor = Cryptor::new(vault.clone(), schema);
/// vault.prefetch_aliases(&["pii".to_owned()]).await?;
/// let sealed = cryptor.encrypt_document(&bson::doc! { "ssn": "123" }, &Context::none())?;
/// # Ok(()) }
/// ```
pub struct KeyVault {
    coll: Collection<Document>,
    namespace: String,
    keks: RwLock<Keks>,
    cache: Arc<KeyCache>,
    usage_lease: u64,
    indexes: tokio::sync::OnceCell<()>,
    /// Calls to the KEKs (each a KMS request for a remote provider), for [`CacheStats`].
    kek_calls: AtomicU64,
    /// After `cache` (fields drop in order): wakes the background task once the cache is
    /// gone, so that it stops at once and lets go of the client.
    _stop: StopOnDrop,
}

/// Wakes the background task when dropped.
struct StopOnDrop(Arc<tokio::sync::Notify>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// Options for a [`KeyVault`]; start with [`KeyVault::builder`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct KeyVaultBuilder {
    client: Client,
    keks: Keks,
    namespace: String,
    cache_ttl: Duration,
    cache_capacity: usize,
    usage_lease: u64,
}

impl KeyVaultBuilder {
    /// The key vault collection as `database.collection` (default
    /// [`DEFAULT_KEY_VAULT_NAMESPACE`]).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long an unwrapped key is used before it is fetched and unwrapped again (default
    /// [`DEFAULT_CACHE_TTL`]). Bounds how long another process's state change goes unseen, how
    /// long a revoked KEK keeps working here, and how long an unused key stays in memory.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// How many unwrapped keys are kept at most (default [`DEFAULT_CACHE_CAPACITY`]); the
    /// least recently loaded go first.
    pub fn cache_capacity(mut self, keys: usize) -> Self {
        self.cache_capacity = keys;
        self
    }

    /// The largest usage lease (default [`DEFAULT_USAGE_LEASE`]); see `docs/KEY_VAULT.md`.
    pub fn usage_lease(mut self, encryptions: u64) -> Self {
        self.usage_lease = encryptions;
        self
    }

    /// Another KEK to try when unwrapping (never to wrap): the old KEK while keys move to a new
    /// one with [`KeyVault::rewrap`], or a second KMS.
    pub fn unwrap_also_with(mut self, kek: Arc<dyn KekProvider>) -> Self {
        self.keks.unwrap_also.push(kek);
        self
    }

    /// Unwraps keys of every provider that `providers` configures (each key under the master
    /// key its `masterKey` document names), besides this vault's KEK: what a vault built from a
    /// `kmsProviders` configuration needs to read keys wrapped by any of them.
    #[cfg(feature = "kms")]
    pub fn kms_providers(self, providers: &Arc<crate::kms::KmsProviders>) -> Self {
        self.unwrap_also_with(providers.unwrapper())
    }

    /// Builds the vault. No I/O happens here; [`KeyVault::ensure_indexes`] runs before the
    /// first key is created. Call it inside a Tokio runtime: it starts the task that drops
    /// expired keys from memory (without a runtime they are dropped only when the vault next
    /// loads keys, or by [`KeyVault::clear_cache`]).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a namespace that is not `database.collection`, a zero TTL or
    /// capacity, or a zero usage lease.
    pub fn build(self) -> Result<KeyVault> {
        let (db, coll) = self
            .namespace
            .split_once('.')
            .filter(|(d, c)| !d.is_empty() && !c.is_empty())
            .ok_or_else(|| Error::from(ArgumentError::KeyVaultNamespace(self.namespace.clone())))?;
        if self.cache_ttl.is_zero() || self.cache_capacity == 0 || self.usage_lease == 0 {
            return Err(Error::from(ArgumentError::KeyVaultLimits));
        }
        let cache = Arc::new(KeyCache::new(self.cache_ttl, self.cache_capacity));
        let coll = self.client.database(db).collection(coll);
        spawn_background(&cache, &coll, self.cache_ttl);
        Ok(KeyVault {
            coll,
            namespace: self.namespace,
            keks: RwLock::new(self.keks),
            _stop: StopOnDrop(cache.wake_signal()),
            cache,
            usage_lease: self.usage_lease,
            indexes: tokio::sync::OnceCell::new(),
            kek_calls: AtomicU64::new(0),
        })
    }
}

impl fmt::Debug for KeyVaultBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyVaultBuilder")
            .field("namespace", &self.namespace)
            .field("kek", &self.keks.wrap.provider())
            .field("cache_ttl", &self.cache_ttl)
            .field("cache_capacity", &self.cache_capacity)
            .finish_non_exhaustive()
    }
}

/// The vault's background task:
///
/// - drops expired keys, so unused key material leaves memory within about a TTL even when
///   nothing calls the vault;
/// - renews usage leases as soon as a synchronous lookup of a primary key sees its counter past
///   the renewal point (rather than at the next prefetch), so that the stored count stays ahead
///   of real use (see `docs/KEY_VAULT.md`, "Usage leases").
///
/// Stops when the vault is dropped.
fn spawn_background(cache: &Arc<KeyCache>, coll: &Collection<Document>, ttl: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let wake = cache.wake_signal();
    let cache = Arc::downgrade(cache);
    let coll = coll.clone();
    let period = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(15));
    runtime.spawn(async move {
        let mut next_purge = tokio::time::Instant::now() + period;
        loop {
            let woken = tokio::time::timeout_at(next_purge, wake.notified())
                .await
                .is_ok();
            let Some(cache) = cache.upgrade() else {
                break;
            };
            if tokio::time::Instant::now() >= next_purge {
                cache.purge_expired();
                next_purge = tokio::time::Instant::now() + period;
            }
            if !woken {
                continue;
            }
            let mut failed = false;
            for entry in cache.leases_due() {
                if let Err(e) = usage::ensure_lease(&coll, &cache, &entry).await {
                    tracing::warn!(key = %entry.key.id(), error = %e, "could not renew a usage lease");
                    failed = true;
                }
            }
            drop(cache);
            if failed {
                // The next prefetch retries too; don't hammer a server that refuses.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
}

impl KeyVault {
    /// A vault in [`DEFAULT_KEY_VAULT_NAMESPACE`] with default options, wrapping keys with
    /// `kek`.
    ///
    /// # Errors
    /// As [`KeyVaultBuilder::build`].
    pub fn new(client: &Client, kek: Arc<dyn KekProvider>) -> Result<Self> {
        Self::builder(client, kek).build()
    }

    /// A builder for a vault that wraps new keys with `kek`.
    /// A builder for a vault configured as MongoDB's drivers are: `providers` (a
    /// `kmsProviders` document) unwraps keys of every provider it names, and new keys are
    /// wrapped under `master_key` (`{provider: "aws", region, key}`, `{provider: "local"}`, …).
    ///
    /// # Errors
    /// As [`KmsProviders::kek_for`](crate::kms::KmsProviders::kek_for).
    #[cfg(feature = "kms")]
    pub fn with_kms_providers(
        client: &Client,
        providers: &Arc<crate::kms::KmsProviders>,
        master_key: &Document,
    ) -> Result<KeyVaultBuilder> {
        Ok(Self::builder(client, providers.kek_for(master_key)?).kms_providers(providers))
    }

    /// A builder for a vault that wraps new keys with `kek`.
    pub fn builder(client: &Client, kek: Arc<dyn KekProvider>) -> KeyVaultBuilder {
        KeyVaultBuilder {
            client: client.clone(),
            keks: Keks {
                wrap: kek,
                unwrap_also: Vec::new(),
            },
            namespace: DEFAULT_KEY_VAULT_NAMESPACE.to_owned(),
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            usage_lease: DEFAULT_USAGE_LEASE,
        }
    }

    /// The key vault namespace, `database.collection`.
    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The `masterKey.provider` that new keys are wrapped with.
    #[must_use]
    pub fn kek_provider(&self) -> String {
        self.keks().wrap.provider().to_owned()
    }

    /// The associated data that the key vault binds a data key's wrapped material to, given
    /// to [`KekProvider::wrap_with_ad`] and [`KekProvider::unwrap_with_ad`]:
    ///
    /// - for a fieldcrypt key ([`KeyKind::Fieldcrypt`], 32 bytes):
    ///   `"fieldcrypt/dek-wrap/v2\0"` (23 bytes) ‖ the key id (16 bytes) ‖ the alias's length
    ///   in bytes (u32, big-endian) ‖ the alias (UTF-8) ‖ the kind (one byte, 1);
    /// - for a CSFLE key ([`KeyKind::Csfle`], 96 bytes): empty, as libmongocrypt wraps them.
    ///
    /// So a fieldcrypt key's `keyMaterial` unwraps only in a document with the same id, alias
    /// and kind: copied to another key, alias or tenant, it fails to unwrap.
    #[must_use]
    pub fn associated_data(id: &KeyId, alias: &str, kind: KeyKind) -> Vec<u8> {
        document::associated_data(id, alias, kind)
    }

    /// Unwraps key documents read some other way than from a vault (e.g. a `mongoexport` of
    /// one), with the rules of the vault: fieldcrypt's documents (format 2, material bound to
    /// the document) and MongoDB's CSFLE key documents; of several documents marked primary for
    /// one alias, the newest claim wins. Keys without material come back destroyed.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] naming the key for a malformed document, one in an unsupported
    /// format, or one whose `keyMaterial` does not unwrap under `kek` with its own associated
    /// data (wrong KEK, or material copied from another document); KEK errors.
    pub async fn keys_from_documents(docs: &[Document], kek: &dyn KekProvider) -> Result<Vec<Key>> {
        let mut stored = docs
            .iter()
            .map(StoredKey::parse)
            .collect::<Result<Vec<_>>>()?;
        elect(&mut stored);
        let mut keys = Vec::with_capacity(stored.len());
        for k in &stored {
            let key = match k
                .key_material
                .as_deref()
                .filter(|_| k.state != KeyState::Destroyed)
            {
                None => Key::destroyed(k.id, k.alias.clone(), k.kind),
                Some(wrapped) => {
                    let ad = k.wrap_ad()?;
                    let material = kek
                        .unwrap_with_ad(&k.master_key, wrapped, &ad)
                        .await
                        .map_err(|e| match e {
                            Error::Decrypt | Error::MalformedCiphertext(_) => {
                                Error::KeyFormat(format!(
                                    "keyMaterial of key {} does not unwrap under this KEK (wrong \
                                     master key, or material that belongs to another key \
                                     document)",
                                    k.id
                                ))
                            }
                            other => other,
                        })?;
                    Key::from_material(
                        k.id,
                        k.alias.clone(),
                        k.kind,
                        k.state,
                        material,
                        k.encryptions(),
                    )?
                }
            };
            keys.push(key.with_created(k.created));
        }
        Ok(keys)
    }

    /// The cache's counters.
    #[must_use]
    pub fn cache_stats(&self) -> CacheStats {
        let mut stats = self.cache.stats();
        stats.kms_calls = self.kek_calls.load(Ordering::Relaxed);
        stats
    }

    /// Wraps with `kek`, counted in [`CacheStats::kms_calls`].
    async fn wrap_with(
        &self,
        kek: &dyn KekProvider,
        material: &KeyMaterial,
        associated_data: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        self.kek_calls.fetch_add(1, Ordering::Relaxed);
        kek.wrap_with_ad(material, associated_data).await
    }

    /// Drops every cached key now (their material is wiped once no operation in flight holds
    /// it); the next prefetch fetches and unwraps again.
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    fn keks(&self) -> Keks {
        // Replaced whole under the lock; a poisoned lock still holds a complete value.
        self.keks.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    // ---- indexes ----

    /// Creates the key vault's indexes if they are missing (once per vault; creating keys does
    /// it first):
    ///
    /// - `keyAltNames_1`: unique on `keyAltNames`, partial on `{keyAltNames: {$exists: true}}`,
    ///   exactly as MongoDB's documentation asks for CSFLE key vaults;
    /// - `fieldcrypt_alias_generation`: unique on `{fieldcrypt.alias, fieldcrypt.generation}`,
    ///   partial on `fieldcrypt.generation` existing, which orders the primary claims of an
    ///   alias.
    ///
    /// # Errors
    /// [`Error::Mongo`]; [`Error::KeyVault`] when an index on `keyAltNames` exists but is not
    /// unique.
    pub async fn ensure_indexes(&self) -> Result<()> {
        self.indexes
            .get_or_try_init(|| self.create_indexes())
            .await
            .map(|_| ())
    }

    async fn create_indexes(&self) -> Result<()> {
        let alt_names = unique_where_set(doc! { KEY_ALT_NAMES: 1 }, ALT_NAMES_INDEX, KEY_ALT_NAMES);
        if let Err(e) = self.coll.create_index(alt_names).await {
            if !matches!(
                command_code(&e),
                Some(INDEX_OPTIONS_CONFLICT | INDEX_KEY_SPECS_CONFLICT)
            ) {
                return Err(e.into());
            }
            // An index made by someone else (e.g. without the partial filter): fine if unique.
            let unique = self
                .coll
                .list_indexes()
                .await?
                .try_collect::<Vec<_>>()
                .await?
                .iter()
                .any(|i| {
                    i.keys == doc! { KEY_ALT_NAMES: 1 }
                        && i.options.as_ref().and_then(|o| o.unique) == Some(true)
                });
            if !unique {
                return Err(Error::from(KeyVaultError::IndexNotUnique {
                    namespace: self.namespace.clone(),
                }));
            }
        }
        let generations = unique_where_set(
            doc! { ALIAS: 1, GENERATION: 1 },
            GENERATION_INDEX,
            GENERATION,
        );
        self.coll.create_index(generations).await?;
        Ok(())
    }

    // ---- reading and unwrapping ----

    async fn find(&self, filter: Document) -> Result<Vec<StoredKey>> {
        let docs: Vec<Document> = self.coll.find(filter).await?.try_collect().await?;
        docs.iter().map(StoredKey::parse).collect()
    }

    /// Every stored key of `alias` (managed, or a CSFLE document whose first keyAltName is
    /// `alias`).
    async fn alias_keys(&self, alias: &str) -> Result<Vec<StoredKey>> {
        let mut keys = self.find(alias_filter(&[alias.to_owned()])).await?;
        keys.retain(|k| k.alias == alias);
        Ok(keys)
    }

    async fn unwrap_material(
        &self,
        id: KeyId,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<KeyMaterial> {
        let keks = self.keks();
        let provider = master_key.get_str("provider").unwrap_or("");
        let candidates: Vec<_> = std::iter::once(&keks.wrap)
            .chain(&keks.unwrap_also)
            .filter(|k| k.can_unwrap(master_key))
            .collect();
        if candidates.is_empty() {
            return Err(Error::KeyFormat(format!(
                "key {id} is wrapped by KMS provider {provider:?}, and this key vault has no KEK for it"
            )));
        }
        for kek in candidates {
            self.kek_calls.fetch_add(1, Ordering::Relaxed);
            match kek
                .unwrap_with_ad(master_key, wrapped, associated_data)
                .await
            {
                Ok(m) => return Ok(m),
                // Not this KEK's key: try the next.
                Err(Error::Decrypt | Error::MalformedCiphertext(_) | Error::KeyFormat(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Err(Error::KeyFormat(format!(
            "keyMaterial of key {id} does not unwrap under this key vault's KEKs for provider \
             {provider:?} (wrong master key, a corrupted key document, or keyMaterial that \
             belongs to another key: it is bound to its key's id, alias and kind)"
        )))
    }

    /// Builds the cache entry for a stored key in `state`, reusing the cached secret when the
    /// material is unchanged (so usage counters, leases and cipher states carry over).
    ///
    /// The document's metadata is not authenticated, so nothing read here takes this process
    /// backwards: a key it saw destroyed stays destroyed, and a new secret's usage counter
    /// starts at no less than what this process counted or saw reserved before.
    async fn entry_for(&self, stored: &StoredKey, state: KeyState) -> Result<KeyEntry> {
        let id = stored.id;
        // The callers have run `refuse_revived`; this holds even if one forgets.
        let state = if self.cache.known_destroyed(&id) {
            KeyState::Destroyed
        } else {
            state
        };
        let Some(wrapped) = stored
            .key_material
            .as_deref()
            .filter(|_| state != KeyState::Destroyed)
        else {
            self.cache.mark_destroyed(id);
            let key =
                Key::destroyed(id, stored.alias.clone(), stored.kind).with_created(stored.created);
            return Ok(KeyEntry::new(
                key,
                Arc::new(LeaseCell::new(0, self.usage_lease)),
            ));
        };
        let ad = stored.wrap_ad()?;
        let material = self
            .unwrap_material(id, &stored.master_key, wrapped, &ad)
            .await?;
        // The stored count must not be below what this process knows was reserved.
        let count = stored.encryptions();
        let known = self.cache.observe_stored(id, count);
        if stored.managed.is_some() && count < known {
            usage::restore_count(&self.coll, id, count, known).await?;
            self.cache.observe_stored(id, known);
        }
        if let Some(old) = self.cache.entry(&id) {
            if let Ok(cached) = old.key.material() {
                if !bool::from(cached.expose_secret().ct_eq(material.expose_secret())) {
                    return Err(Error::KeyFormat(format!(
                        "key {id}: its material changed in the key vault"
                    )));
                }
                if old.key.kind() == stored.kind && old.key.alias() == stored.alias {
                    return Ok(KeyEntry::new(old.key.with_state(state), old.lease));
                }
            }
        }
        let floor = self.cache.floor(&id);
        let base = count.max(floor.stored);
        let key = Key::from_material(
            id,
            stored.alias.clone(),
            stored.kind,
            state,
            material,
            base.max(floor.used),
        )?
        .with_created(stored.created);
        Ok(KeyEntry::new(
            key,
            Arc::new(LeaseCell::new(base, self.usage_lease)),
        ))
    }

    /// A key this process saw destroyed stays destroyed, whatever the vault says now (a
    /// document put back by a key-vault writer, or by restoring a backup): destroyed is
    /// irreversible, and fieldcrypt never writes material back.
    fn refuse_revived(&self, stored: &mut StoredKey) {
        if stored.state != KeyState::Destroyed && self.cache.known_destroyed(&stored.id) {
            tracing::error!(
                key = %stored.id,
                alias = %stored.alias,
                state = %stored.state,
                "the key vault shows a key that this process saw destroyed (written by something \
                 other than fieldcrypt, or a restored backup): it stays destroyed here"
            );
            stored.state = KeyState::Destroyed;
        }
    }

    /// Loads every key of `aliases` into the cache, with their alias lists.
    async fn load_aliases(&self, aliases: &[String]) -> Result<()> {
        let wanted: HashSet<&str> = aliases.iter().map(String::as_str).collect();
        let mut stored = self.find(alias_filter(aliases)).await?;
        stored.retain(|k| wanted.contains(k.alias.as_str()));
        self.cache.count_loads(stored.len());
        // Before the election: a revived key must not win it (nor make us demote the others).
        for k in &mut stored {
            self.refuse_revived(k);
        }
        for (alias, generation) in elect(&mut stored) {
            // Another process died between claiming primary and demoting the old one, or is
            // doing it right now: finish its job (idempotent).
            if let Err(e) = self.demote_below(&alias, generation).await {
                tracing::warn!(alias = %alias, error = %e, "could not demote a superseded primary");
            }
        }
        // Primary first, then newest first.
        stored.sort_by_key(|k| {
            (
                k.state != KeyState::Primary,
                std::cmp::Reverse(k.managed.map(|m| m.version)),
                std::cmp::Reverse(k.created),
            )
        });
        let mut entries = Vec::with_capacity(stored.len());
        let mut lists: HashMap<&str, (Option<KeyId>, Vec<KeyId>)> = aliases
            .iter()
            .map(|a| (a.as_str(), (None, Vec::new())))
            .collect();
        for k in &stored {
            let entry = self.entry_for(k, k.state).await?;
            if let Some((primary, ids)) = lists.get_mut(k.alias.as_str()) {
                if entry.key.state() == KeyState::Primary {
                    *primary = Some(k.id);
                }
                ids.push(k.id);
            }
            entries.push(entry);
        }
        // Keys and lists in one step; each list is stamped with its oldest key's load time.
        self.cache.insert_loaded(
            entries,
            lists
                .into_iter()
                .map(|(alias, (primary, ids))| (alias.to_owned(), primary, ids))
                .collect(),
        );
        Ok(())
    }
}

impl Keyring for KeyVault {
    fn key(&self, id: &KeyId) -> Result<Arc<Key>> {
        self.cache.key(id)
    }

    fn primary(&self, alias: &str) -> Result<Arc<Key>> {
        self.cache.primary(alias)
    }

    fn readable_keys(&self, alias: &str) -> Result<Vec<Arc<Key>>> {
        self.cache.readable_keys(alias)
    }
}

impl KeyVault {
    /// `items` without duplicates, and those of them `due` for a (re)load; the others are
    /// counted as cache hits, the due ones as misses.
    fn due<T: Ord + Clone>(&self, items: &[T], due: impl Fn(&T) -> bool) -> (Vec<T>, Vec<T>) {
        let mut items = items.to_vec();
        items.sort_unstable();
        items.dedup();
        let due: Vec<T> = items.iter().filter(|i| due(i)).cloned().collect();
        self.cache.count_hits(items.len() - due.len());
        self.cache.count_misses(due.len());
        (items, due)
    }
}

#[async_trait::async_trait]
impl KeySource for KeyVault {
    /// Fetches and unwraps the keys with these ids that are not cached, or were loaded more
    /// than half a TTL ago.
    async fn prefetch_ids(&self, ids: &[KeyId]) -> Result<()> {
        let now = Instant::now();
        let (_, due) = self.due(ids, |id| self.cache.key_due(id, now));
        if due.is_empty() {
            return Ok(());
        }
        let filter: Vec<Bson> = due.iter().map(|id| Bson::Binary(id.to_binary())).collect();
        let mut stored = self.find(doc! { ID: { "$in": filter } }).await?;
        self.cache.count_loads(stored.len());
        let mut entries = Vec::with_capacity(stored.len());
        for k in &mut stored {
            self.refuse_revived(k);
            let k = &*k;
            // Without the alias's other keys there is no election here; trust a fresh alias
            // list that names another primary.
            let state = match self.cache.cached_primary_id(&k.alias) {
                Some(p) if k.state == KeyState::Primary && p != k.id => KeyState::Active,
                _ => k.state,
            };
            entries.push(self.entry_for(k, state).await?);
        }
        // Keys deleted from the vault leave the cache.
        let found: HashSet<KeyId> = stored.iter().map(|k| k.id).collect();
        for id in due.iter().filter(|id| !found.contains(id)) {
            self.cache.invalidate_key(id);
        }
        self.cache.insert_loaded(entries, Vec::new());
        Ok(())
    }

    /// Fetches and unwraps every key of these aliases (unless cached and loaded less than half
    /// a TTL ago), and makes sure this process holds a usage lease for each alias's primary.
    async fn prefetch_aliases(&self, aliases: &[String]) -> Result<()> {
        let now = Instant::now();
        let (aliases, due) = self.due(aliases, |a| self.cache.alias_due(a, now));
        if !due.is_empty() {
            self.load_aliases(&due).await?;
        }
        for alias in &aliases {
            if let Some(entry) = self.cache.primary_entry(alias) {
                usage::ensure_lease(&self.coll, &self.cache, &entry).await?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for KeyVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keks = self.keks();
        f.debug_struct("KeyVault")
            .field("namespace", &self.namespace)
            .field("kek", &keks.wrap.provider())
            .field(
                "unwrap_also",
                &keks
                    .unwrap_also
                    .iter()
                    .map(|k| k.provider())
                    .collect::<Vec<_>>(),
            )
            .field("cache", &self.cache.stats())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for KeyVault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key vault {}", self.namespace)
    }
}

/// The generation after `highest`: an error rather than an overflow when a key-vault writer
/// has set a generation to the largest value.
fn next_generation(highest: i64, alias: &str) -> Result<i64> {
    highest.checked_add(1).ok_or_else(|| {
        Error::KeyFormat(format!(
            "alias {alias:?}: fieldcrypt.generation is at its largest value (the key vault was \
             written by something other than fieldcrypt)"
        ))
    })
}

/// A unique index named `name` on `keys`, over the documents where `field` is set.
fn unique_where_set(keys: Document, name: &str, field: &str) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_owned())
                .unique(true)
                .partial_filter_expression(doc! { field: { "$exists": true } })
                .build(),
        )
        .build()
}

fn check_alias(alias: &str) -> Result<()> {
    if alias.is_empty() || alias.contains('\0') {
        return Err(Error::from(ArgumentError::KeyAlias(alias.to_owned())));
    }
    Ok(())
}

fn generic(bytes: &[u8]) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => command_code(e) == Some(DUPLICATE_KEY),
    }
}

fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}
