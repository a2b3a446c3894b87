//! Secret key bytes: the one type every cipher state is built from.
//!
//! A leaf (it imports nothing from the crate), kept beside the suites that take it, so the
//! suites and the key types both point down at it and never at each other.

use core::fmt;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};

/// Secret key bytes. Lives only inside a [`SecretSlice`], is wiped on drop, and prints as
/// `[REDACTED]`. Read it with [`KeyMaterial::expose_secret`], so every read is greppable.
pub struct KeyMaterial(SecretSlice<u8>);

impl KeyMaterial {
    /// `len` fresh bytes from the operating system's CSPRNG, written straight into the secret
    /// buffer.
    #[must_use]
    pub fn generate(len: usize) -> Self {
        let mut v = vec![0u8; len];
        rand::rngs::OsRng.fill_bytes(&mut v);
        KeyMaterial(SecretSlice::from(v))
    }

    /// Takes ownership of `bytes` (they are wiped when the material drops).
    #[must_use]
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        KeyMaterial(SecretSlice::from(bytes))
    }

    /// Copies `bytes` into a new secret buffer. The caller remains responsible for wiping its
    /// own copy.
    #[must_use]
    pub fn from_slice(bytes: &[u8]) -> Self {
        KeyMaterial(SecretSlice::from(bytes.to_vec()))
    }

    /// The secret bytes.
    #[must_use]
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.expose_secret().len()
    }

    /// Whether the material is empty (never true for a usable key).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Clone for KeyMaterial {
    fn clone(&self) -> Self {
        KeyMaterial::from_slice(self.expose_secret())
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([REDACTED])")
    }
}
