//! The [`Keyring`] trait, the in-memory keyring, its keyset file, and the rotation rules.
//!
//! Encryption uses the primary key of a field's alias; decryption finds the key by the id
//! written in the ciphertext. Key-state rules live in one place ([`Key`]'s `for_encrypt` /
//! `for_decrypt`), so every keyring enforces them alike.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::error::{ArgumentError, Error, Result};
use crate::key::{Key, KeyId, KeyKind, KeyMaterial, KeyState};

/// Where keys come from. Implemented by [`InMemoryKeyring`] and by the MongoDB key vault.
///
/// Lookups are synchronous: they sit on the per-field hot path. A keyring backed by a remote
/// store resolves keys ahead of time (see the `mongodb` feature's key vault).
pub trait Keyring: Send + Sync {
    /// The key with this id, in whatever state it is (state rules are applied by the caller
    /// through the key itself).
    ///
    /// # Errors
    /// [`Error::UnknownKey`] when the keyring has no such key.
    fn key(&self, id: &KeyId) -> Result<Arc<Key>>;

    /// The primary key of `alias`, which encrypts new values.
    ///
    /// # Errors
    /// [`Error::UnknownAlias`] or [`Error::NoPrimaryKey`].
    fn primary(&self, alias: &str) -> Result<Arc<Key>>;

    /// Every key of `alias` that can still decrypt (primary first, then active keys, newest
    /// first). Used for queries that must match values written before a rotation.
    ///
    /// # Errors
    /// [`Error::UnknownAlias`].
    fn readable_keys(&self, alias: &str) -> Result<Vec<Arc<Key>>>;

    /// A number that changes whenever a lookup could answer differently (a key added,
    /// replaced, promoted or destroyed), or `None` when the keyring cannot say. While it stays
    /// the same, a [`Cryptor`](crate::Cryptor) reuses the keys its walks on a thread looked up
    /// instead of asking again per document; with `None` (the default) it asks every time.
    fn generation(&self) -> Option<u64> {
        None
    }
}

/// A keyring behind a pointer is that keyring.
macro_rules! forward_keyring {
    ($($ptr:ty),*) => {$(
        impl<K: Keyring + ?Sized> Keyring for $ptr {
            fn key(&self, id: &KeyId) -> Result<Arc<Key>> {
                (**self).key(id)
            }
            fn primary(&self, alias: &str) -> Result<Arc<Key>> {
                (**self).primary(alias)
            }
            fn readable_keys(&self, alias: &str) -> Result<Vec<Arc<Key>>> {
                (**self).readable_keys(alias)
            }
            fn generation(&self) -> Option<u64> {
                (**self).generation()
            }
        }
    )*};
}

forward_keyring!(Arc<K>, &K);

/// The keyring's maps hash with foldhash (seeded per process) rather than SipHash: a lookup
/// runs once per document encrypted or decrypted, and SipHash was most of its cost (see
/// docs/BENCHMARKS.md, "Round two (Zen 5): what was cut, and what each cut bought").
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Inner {
    keys: FastMap<KeyId, Arc<Key>>,
    primary: FastMap<String, KeyId>,
}

impl Inner {
    fn alias_keys(&self, alias: &str) -> Vec<Arc<Key>> {
        let mut v: Vec<_> = self
            .keys
            .values()
            .filter(|k| k.alias() == alias)
            .cloned()
            .collect();
        v.sort_by_key(|k| {
            (
                k.state() != KeyState::Primary,
                std::cmp::Reverse(k.created()),
            )
        });
        v
    }

    fn put(&mut self, key: Key) {
        if key.state() == KeyState::Primary {
            if let Some(old) = self.primary.insert(key.alias().to_owned(), key.id()) {
                if old != key.id() {
                    if let Some(k) = self.keys.get(&old).map(|k| k.with_state(KeyState::Active)) {
                        self.keys.insert(old, Arc::new(k));
                    }
                }
            }
        } else if self.primary.get(key.alias()) == Some(&key.id()) {
            self.primary.remove(key.alias());
        }
        self.keys.insert(key.id(), Arc::new(key));
    }
}

/// A keyring held in memory; loadable from and savable to a keyset file or an environment
/// variable. Thread-safe; lookups take a read lock.
#[derive(Default)]
pub struct InMemoryKeyring {
    inner: RwLock<Inner>,
    /// [`Keyring::generation`]: counted up under the write lock, before each change.
    generation: AtomicU64,
}

impl core::fmt::Debug for InMemoryKeyring {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InMemoryKeyring")
            .field("keys", &self.read().keys.len())
            .finish_non_exhaustive()
    }
}

impl InMemoryKeyring {
    /// An empty keyring.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated (each update is a
        // single map operation), so a poisoned lock is still consistent.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        let inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        // Before the change and under the lock: a reader that still sees the old number may
        // have looked up old or new keys, and drops them at its next look (see
        // `Keyring::generation`); one that sees the new number looks up after the change.
        self.generation.fetch_add(1, Ordering::AcqRel);
        inner
    }

    /// Adds (or replaces) a key. A primary key demotes the alias's previous primary to active.
    pub fn insert(&self, key: Key) {
        self.write().put(key);
    }

    /// Creates a new fieldcrypt key for `alias` and makes it the primary; the previous primary
    /// stays readable as an active key. Returns the new key's id.
    pub fn rotate(&self, alias: &str) -> KeyId {
        let key = Key::generate(alias, KeyKind::Fieldcrypt, KeyState::Primary);
        let id = key.id();
        self.insert(key);
        id
    }

    /// Same as [`InMemoryKeyring::rotate`]: the first key of an alias is made the same way.
    pub fn generate(&self, alias: &str) -> KeyId {
        self.rotate(alias)
    }

    /// Changes a key's state, following the lifecycle rules: a destroyed key stays destroyed;
    /// promoting to primary demotes the alias's current primary.
    ///
    /// # Errors
    /// [`Error::UnknownKey`], or [`Error::KeyDestroyed`] when reviving a destroyed key.
    pub fn set_state(&self, id: &KeyId, state: KeyState) -> Result<()> {
        let mut inner = self.write();
        let key = inner.keys.get(id).ok_or(Error::UnknownKey(*id))?;
        if key.state() == KeyState::Destroyed && state != KeyState::Destroyed {
            return Err(Error::KeyDestroyed(*id));
        }
        let next = key.with_state(state);
        inner.put(next);
        Ok(())
    }

    /// Destroys a key: its material is dropped (and wiped once no operation in flight holds
    /// it). Irreversible.
    ///
    /// # Errors
    /// [`Error::UnknownKey`].
    pub fn destroy(&self, id: &KeyId) -> Result<()> {
        self.set_state(id, KeyState::Destroyed)
    }

    /// Every key, oldest first.
    #[must_use]
    pub fn keys(&self) -> Vec<Arc<Key>> {
        let mut v: Vec<_> = self.read().keys.values().cloned().collect();
        v.sort_by_key(|k| (k.created(), k.id()));
        v
    }

    /// Loads a keyset file (see docs/KEYSET.md).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::KeyFormat`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let text = Zeroizing::new(std::fs::read_to_string(path)?);
        Self::from_keyset_json(&text)
    }

    /// Loads a keyset from an environment variable holding the keyset JSON in base64.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the variable is unset, [`Error::KeyFormat`] when malformed.
    pub fn from_env(var: &str) -> Result<Self> {
        let b64 = Zeroizing::new(
            std::env::var(var)
                .map_err(|_| Error::from(ArgumentError::MissingEnvVar(var.to_owned())))?,
        );
        let json = Zeroizing::new(
            B64.decode(b64.trim())
                .map_err(|_| Error::KeyFormat(format!("{var} is not valid base64")))?,
        );
        let text = std::str::from_utf8(&json)
            .map_err(|_| Error::KeyFormat(format!("{var} does not hold a keyset")))?;
        Self::from_keyset_json(text)
    }

    /// The keyset as base64, for an environment variable.
    #[must_use]
    pub fn to_env_value(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(self.to_keyset_json().as_bytes()))
    }

    /// Saves the keyset to `path` atomically (write to a temporary file, then rename), readable
    /// by the owner only.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = self.to_keyset_json();
        // A fresh, unpredictable temporary name created exclusively: an existing file (or a
        // planted symlink) is never written through.
        let mut suffix = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
        let name = format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("keyset"),
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let tmp = path.with_file_name(name);
        let written = (|| -> Result<()> {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            std::io::Write::write_all(&mut f, json.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename durable; not every platform can open a directory.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Parses keyset JSON.
    ///
    /// # Errors
    /// [`Error::KeyFormat`], naming what is wrong but never a key's bytes.
    pub fn from_keyset_json(text: &str) -> Result<Self> {
        let file: KeysetFile = serde_json::from_str(text)
            .map_err(|e| Error::KeyFormat(format!("keyset: {}", redact_serde(&e))))?;
        if file.fieldcrypt_keyset != 1 {
            return Err(Error::KeyFormat(format!(
                "unsupported keyset version {}",
                file.fieldcrypt_keyset
            )));
        }
        let ring = InMemoryKeyring::new();
        // Insert primaries last so that a file listing two primaries for one alias is refused
        // rather than silently resolved.
        let mut seen_primary: HashMap<&str, KeyId> = HashMap::new();
        for rec in &file.keys {
            if rec.state == KeyState::Primary {
                if let Some(other) = seen_primary.insert(&rec.alias, rec.id) {
                    return Err(Error::KeyFormat(format!(
                        "alias {:?} has two primary keys ({other} and {})",
                        rec.alias, rec.id
                    )));
                }
            }
            let created = bson::DateTime::parse_rfc3339_str(&rec.created)
                .map_err(|_| Error::KeyFormat(format!("key {}: bad creation date", rec.id)))?;
            let key = match (&rec.material, rec.state) {
                (_, KeyState::Destroyed) => Key::destroyed(rec.id, rec.alias.clone(), rec.kind),
                (Some(m), _) => {
                    let bytes = B64.decode(m.as_bytes()).map_err(|_| {
                        Error::KeyFormat(format!("key {}: material is not valid base64", rec.id))
                    })?;
                    Key::from_material(
                        rec.id,
                        rec.alias.clone(),
                        rec.kind,
                        rec.state,
                        KeyMaterial::from_vec(bytes),
                        rec.encryptions,
                    )?
                }
                (None, _) => {
                    return Err(Error::KeyFormat(format!("key {} has no material", rec.id)))
                }
            };
            ring.write().put(key.with_created(created));
        }
        Ok(ring)
    }

    /// The keyset as JSON (holds key material: keep it secret).
    #[must_use]
    pub fn to_keyset_json(&self) -> Zeroizing<String> {
        let keys = self.keys();
        let file = KeysetFile {
            fieldcrypt_keyset: 1,
            keys: keys
                .iter()
                .map(|k| KeyRecord {
                    id: k.id(),
                    alias: k.alias().to_owned(),
                    kind: k.kind(),
                    state: k.state(),
                    created: k
                        .created()
                        .try_to_rfc3339_string()
                        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into()),
                    encryptions: k.encryptions(),
                    material: k
                        .material()
                        .ok()
                        .map(|m| Zeroizing::new(B64.encode(m.expose_secret()))),
                })
                .collect(),
        };
        Zeroizing::new(serde_json::to_string_pretty(&file).unwrap_or_default())
    }
}

/// serde_json's messages can quote input; keep only the position.
fn redact_serde(e: &serde_json::Error) -> String {
    format!(
        "invalid JSON structure at line {} column {}",
        e.line(),
        e.column()
    )
}

impl Keyring for InMemoryKeyring {
    fn key(&self, id: &KeyId) -> Result<Arc<Key>> {
        self.read()
            .keys
            .get(id)
            .cloned()
            .ok_or(Error::UnknownKey(*id))
    }

    fn primary(&self, alias: &str) -> Result<Arc<Key>> {
        let inner = self.read();
        match inner.primary.get(alias) {
            Some(id) => inner.keys.get(id).cloned().ok_or(Error::UnknownKey(*id)),
            None if inner.keys.values().any(|k| k.alias() == alias) => {
                Err(Error::NoPrimaryKey(alias.to_owned()))
            }
            None => Err(Error::UnknownAlias(alias.to_owned())),
        }
    }

    fn generation(&self) -> Option<u64> {
        Some(self.generation.load(Ordering::Acquire))
    }

    fn readable_keys(&self, alias: &str) -> Result<Vec<Arc<Key>>> {
        let all = self.read().alias_keys(alias);
        if all.is_empty() {
            return Err(Error::UnknownAlias(alias.to_owned()));
        }
        Ok(all
            .into_iter()
            .filter(|k| matches!(k.state(), KeyState::Primary | KeyState::Active))
            .collect())
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysetFile {
    fieldcrypt_keyset: u32,
    keys: Vec<KeyRecord>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    id: KeyId,
    alias: String,
    kind: KeyKind,
    state: KeyState,
    created: String,
    #[serde(default)]
    encryptions: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    material: Option<Zeroizing<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_demotes_previous_primary() {
        let ring = InMemoryKeyring::new();
        let k1 = ring.generate("pii");
        assert_eq!(ring.primary("pii").unwrap().id(), k1);
        let k2 = ring.rotate("pii");
        assert_eq!(ring.primary("pii").unwrap().id(), k2);
        assert_eq!(ring.key(&k1).unwrap().state(), KeyState::Active);
        let readable: Vec<_> = ring
            .readable_keys("pii")
            .unwrap()
            .iter()
            .map(|k| k.id())
            .collect();
        assert_eq!(readable, vec![k2, k1]);
    }

    #[test]
    fn lifecycle_rules() {
        let ring = InMemoryKeyring::new();
        let k1 = ring.generate("a");
        ring.set_state(&k1, KeyState::Disabled).unwrap();
        assert!(matches!(ring.primary("a"), Err(Error::NoPrimaryKey(_))));
        assert!(matches!(
            ring.key(&k1).unwrap().for_decrypt(),
            Err(Error::KeyDisabled(_))
        ));
        ring.set_state(&k1, KeyState::Active).unwrap();
        assert!(ring.key(&k1).unwrap().for_decrypt().is_ok());
        ring.destroy(&k1).unwrap();
        assert!(matches!(
            ring.key(&k1).unwrap().for_decrypt(),
            Err(Error::KeyDestroyed(_))
        ));
        assert!(matches!(
            ring.set_state(&k1, KeyState::Active),
            Err(Error::KeyDestroyed(_))
        ));
        assert!(matches!(ring.primary("nope"), Err(Error::UnknownAlias(_))));
    }

    #[test]
    fn keyset_round_trip_keeps_state_material_and_counts() {
        let ring = InMemoryKeyring::new();
        let a1 = ring.generate("a");
        let a2 = ring.rotate("a");
        let b = ring.generate("b");
        ring.destroy(&b).unwrap();
        let json = ring.to_keyset_json();
        let back = InMemoryKeyring::from_keyset_json(&json).unwrap();
        assert_eq!(back.primary("a").unwrap().id(), a2);
        assert_eq!(back.key(&a1).unwrap().state(), KeyState::Active);
        assert_eq!(back.key(&b).unwrap().state(), KeyState::Destroyed);
        assert_eq!(
            back.key(&a1).unwrap().material().unwrap().expose_secret(),
            ring.key(&a1).unwrap().material().unwrap().expose_secret()
        );
        let env = ring.to_env_value();
        std::env::set_var("FIELDCRYPT_TEST_KEYSET_RT", env.as_str());
        let from_env = InMemoryKeyring::from_env("FIELDCRYPT_TEST_KEYSET_RT").unwrap();
        assert_eq!(from_env.keys().len(), 3);
    }

    #[test]
    fn fail_keyset_errors_do_not_echo_material() {
        let bad = r#"{"fieldcrypt_keyset":1,"keys":[{"id":"00000000-0000-4000-8000-000000000000","alias":"a","kind":"fieldcrypt","state":"primary","created":"2026-01-01T00:00:00Z","material":"c2VjcmV0LXNlY3JldC1zZWNyZXQ="}]}"#;
        let e = InMemoryKeyring::from_keyset_json(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 bytes"), "{e}");
        assert!(!e.contains("c2VjcmV0"), "{e}");
        let e = InMemoryKeyring::from_keyset_json(r#"{"fieldcrypt_keyset":1,"keys":[{"material":"c2VjcmV0LXNlY3JldC1zZWNyZXQ=", "x": 1}]}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }
}
