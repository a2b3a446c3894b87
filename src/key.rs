//! Keys: ids, secret material, states, and the one place where key-state rules are enforced.
//!
//! A [`Key`] is an immutable snapshot of a key's metadata (id, alias, state) plus a shared handle
//! to its secret. Changing a key's state makes a new snapshot that shares the same secret, so the
//! expanded cipher states and the encryption counter survive a demotion from primary to active.
//!
//! Imports point down only:
//!
//! ```text
//!  key ──▶ key/secret (KeySecret) ──▶ suite, csfle ──▶ suite/material (KeyMaterial, a leaf)
//!   │                                   └─ csfle ──▶ key/id
//!   └──▶ key/id (KeyId) ◀── error
//! ```

// `id` is a leaf that the layers below keys (errors, CSFLE payloads) import directly, so
// nothing under this module points back up at it.
pub(crate) mod id;
mod secret;

use core::fmt;
use std::sync::Arc;

pub use id::KeyId;
pub(crate) use secret::KeySecret;

use crate::error::{ArgumentError, Error, Result};
pub use crate::suite::KeyMaterial;

/// Length of a fieldcrypt root key, in bytes. Suite keys are derived from it with HKDF.
pub const FIELDCRYPT_KEY_LEN: usize = 32;

/// Length of a MongoDB CSFLE data key, in bytes (MAC key, encryption key, IV key).
pub const CSFLE_KEY_LEN: usize = 96;

/// The lifecycle state of a key.
///
/// ```text
/// primary ──rotate──▶ active ──disable──▶ disabled ──destroy──▶ destroyed
///    ▲                  │  ▲                │
///    └──── promote ─────┘  └──── enable ────┘
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KeyState {
    /// Encrypts new values for its alias, and decrypts. At most one per alias.
    Primary,
    /// Decrypts only (a former primary, kept so existing data stays readable).
    Active,
    /// Refuses to encrypt and decrypt; reversible with `enable`.
    Disabled,
    /// The material is gone; irreversible. Data under this key is unreadable (crypto-shredding).
    Destroyed,
}

impl KeyState {
    /// The state's lowercase name, as used in files and the key vault.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyState::Primary => "primary",
            KeyState::Active => "active",
            KeyState::Disabled => "disabled",
            KeyState::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl core::str::FromStr for KeyState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "primary" => KeyState::Primary,
            "active" => KeyState::Active,
            "disabled" => KeyState::Disabled,
            "destroyed" => KeyState::Destroyed,
            other => return Err(Error::KeyFormat(format!("unknown key state {other:?}"))),
        })
    }
}

/// What a key's material is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KeyKind {
    /// A 32-byte fieldcrypt root key: every fieldcrypt suite and blind indexes derive from it.
    Fieldcrypt,
    /// A 96-byte MongoDB data key, as MongoDB's key vault holds it: it decrypts (and writes)
    /// both CSFLE values (`AEAD_AES_256_CBC_HMAC_SHA_512`) and Queryable Encryption values,
    /// as in MongoDB, where one key document serves both.
    Csfle,
}

impl KeyKind {
    /// The length of this kind's material.
    #[must_use]
    pub const fn material_len(self) -> usize {
        match self {
            KeyKind::Fieldcrypt => FIELDCRYPT_KEY_LEN,
            KeyKind::Csfle => CSFLE_KEY_LEN,
        }
    }
}

/// A data key: metadata plus (unless destroyed) a handle to its secret material and the cipher
/// states expanded from it. Cheap to clone behind an [`Arc`]; prints no secret.
#[derive(Clone)]
pub struct Key {
    id: KeyId,
    alias: String,
    kind: KeyKind,
    state: KeyState,
    created: bson::DateTime,
    secret: Option<Arc<KeySecret>>,
}

impl Key {
    /// Generates a new key of `kind` from the OS-seeded CSPRNG.
    #[must_use]
    pub fn generate(alias: impl Into<String>, kind: KeyKind, state: KeyState) -> Self {
        Key::from_material(
            KeyId::random(),
            alias,
            kind,
            state,
            KeyMaterial::generate(kind.material_len()),
            0,
        )
        .expect("generated material has the right length") // allowed: length is ours
    }

    /// Builds a key from existing material.
    ///
    /// `encryptions` is the number of random-nonce encryptions already made with it (its
    /// persisted usage counter), so nonce limits hold across restarts.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] if the material's length does not fit the kind.
    pub fn from_material(
        id: KeyId,
        alias: impl Into<String>,
        kind: KeyKind,
        state: KeyState,
        material: KeyMaterial,
        encryptions: u64,
    ) -> Result<Self> {
        if material.len() != kind.material_len() {
            return Err(Error::KeyFormat(format!(
                "key {id}: a {kind:?} key must be {} bytes, got {}",
                kind.material_len(),
                material.len()
            )));
        }
        let secret = (state != KeyState::Destroyed)
            .then(|| Arc::new(KeySecret::new(material, kind, encryptions)));
        Ok(Key {
            id,
            alias: alias.into(),
            kind,
            state,
            created: bson::DateTime::now(),
            secret,
        })
    }

    /// A destroyed key: metadata only, no material.
    #[must_use]
    pub fn destroyed(id: KeyId, alias: impl Into<String>, kind: KeyKind) -> Self {
        Key {
            id,
            alias: alias.into(),
            kind,
            state: KeyState::Destroyed,
            created: bson::DateTime::now(),
            secret: None,
        }
    }

    /// The key's id.
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key's alias (name), e.g. `"pii"`.
    #[must_use]
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// What the key's material is for.
    #[must_use]
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The key's state.
    #[must_use]
    pub fn state(&self) -> KeyState {
        self.state
    }

    /// When the key was created.
    #[must_use]
    pub fn created(&self) -> bson::DateTime {
        self.created
    }

    /// Sets the creation time (when loading a stored key).
    #[must_use]
    pub fn with_created(mut self, created: bson::DateTime) -> Self {
        self.created = created;
        self
    }

    /// The number of random-nonce encryptions made with this key so far.
    #[must_use]
    pub fn encryptions(&self) -> u64 {
        self.secret.as_ref().map_or(0, |s| s.encryptions())
    }

    /// A copy of this key in another state, sharing the same secret (and counter).
    /// Moving to [`KeyState::Destroyed`] drops this copy's handle to the material.
    #[must_use]
    pub fn with_state(&self, state: KeyState) -> Self {
        let mut k = self.clone();
        k.state = state;
        if state == KeyState::Destroyed {
            k.secret = None;
        }
        k
    }

    /// The key's material, for wrapping or export. Every read of key bytes goes through
    /// `expose_secret` on what this returns.
    ///
    /// # Errors
    /// [`Error::KeyDestroyed`] when the material is gone.
    pub fn material(&self) -> Result<&KeyMaterial> {
        self.secret
            .as_deref()
            .map(KeySecret::material)
            .ok_or_else(|| Error::KeyDestroyed(self.id))
    }

    /// Gives back `n` random-nonce encryptions reserved on this key's secret and not made
    /// (whatever the key's state now: the count belongs to the secret).
    pub(crate) fn release_reserved(&self, n: u64) {
        if let Some(s) = &self.secret {
            s.release(n);
        }
    }

    /// The secret for decryption: the single place where state rules for reading are enforced.
    pub(crate) fn for_decrypt(&self) -> Result<&KeySecret> {
        self.secret_for::<false>()
    }

    /// The secret for encryption: only a primary key encrypts.
    pub(crate) fn for_encrypt(&self) -> Result<&KeySecret> {
        self.secret_for::<true>()
    }

    /// The one place the key states are enforced: primary keys encrypt and decrypt, active
    /// keys only decrypt, disabled and destroyed keys do neither. (`ENCRYPT` is a constant so
    /// that each caller compiles to its own check, as the two were before.)
    #[inline]
    fn secret_for<const ENCRYPT: bool>(&self) -> Result<&KeySecret> {
        match self.state {
            KeyState::Primary => {}
            KeyState::Active if !ENCRYPT => {}
            KeyState::Active => {
                return Err(Error::KeyMisuse {
                    id: self.id,
                    reason: "only the primary key of an alias encrypts",
                })
            }
            KeyState::Disabled => return Err(Error::KeyDisabled(self.id)),
            KeyState::Destroyed => return Err(Error::KeyDestroyed(self.id)),
        }
        // Lazily (see lib.rs): once per value decrypted.
        self.secret
            .as_deref()
            .ok_or_else(|| Error::KeyDestroyed(self.id))
    }

    /// The secret for computing blind indexes and deterministic query values: allowed for
    /// primary and active keys (queries must find data written before a rotation).
    pub(crate) fn for_query(&self) -> Result<&KeySecret> {
        self.for_decrypt()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("alias", &self.alias)
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

// Parsing a key id can fail, and the error type names key ids: these live here, above both
// `key/id.rs` and `error.rs`, so that neither imports the other back.
impl KeyId {
    /// Reads an id from a slice that must be exactly 16 bytes long.
    ///
    /// # Errors
    /// [`Error::MalformedCiphertext`] when the slice is not 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        <[u8; 16]>::try_from(bytes)
            .map(KeyId::from_bytes)
            .map_err(|_| Error::MalformedCiphertext("key id is not 16 bytes"))
    }
}

impl core::str::FromStr for KeyId {
    type Err = Error;

    /// Parses the canonical `8-4-4-4-12` hex form.
    fn from_str(s: &str) -> Result<Self> {
        bson::Uuid::parse_str(s)
            .map(KeyId::from)
            .map_err(|_| Error::from(ArgumentError::NotAUuid(s.to_owned())))
    }
}
