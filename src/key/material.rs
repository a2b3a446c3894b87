//! Secret key material and the per-key state built from it.

use core::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};

use super::{KeyKind, CSFLE_KEY_LEN};
use crate::csfle::CsfleKey;
use crate::suite::SuiteKeys;

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

/// A key's secret plus everything expanded from it: the cipher states of each suite (built
/// once, on first use, and wiped on drop by the RustCrypto types), and the counter of
/// random-nonce encryptions.
pub(crate) struct KeySecret {
    material: KeyMaterial,
    kind: KeyKind,
    encryptions: AtomicU64,
    suites: SuiteKeys,
    csfle: OnceLock<Option<CsfleKey>>,
}

impl KeySecret {
    pub(crate) fn new(material: KeyMaterial, kind: KeyKind, encryptions: u64) -> Self {
        KeySecret {
            material,
            kind,
            encryptions: AtomicU64::new(encryptions),
            suites: SuiteKeys::default(),
            csfle: OnceLock::new(),
        }
    }

    pub(crate) fn material(&self) -> &KeyMaterial {
        &self.material
    }

    pub(crate) fn kind(&self) -> KeyKind {
        self.kind
    }

    pub(crate) fn suites(&self) -> &SuiteKeys {
        &self.suites
    }

    /// The precomputed CSFLE cipher state of a 96-byte CSFLE key (`None` for other kinds).
    pub(crate) fn csfle(&self) -> Option<&CsfleKey> {
        self.csfle
            .get_or_init(|| {
                let bytes: &[u8; CSFLE_KEY_LEN] = self.material.expose_secret().try_into().ok()?;
                (self.kind == KeyKind::Csfle).then(|| CsfleKey::new(bytes))
            })
            .as_ref()
    }

    pub(crate) fn encryptions(&self) -> u64 {
        self.encryptions.load(Ordering::Relaxed)
    }

    /// Counts `n` random-nonce encryptions against `limit`, refusing (and not counting) when
    /// they would exceed it.
    pub(crate) fn reserve(&self, n: u64, limit: u64) -> Result<(), u64> {
        self.encryptions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(n).filter(|&next| next <= limit)
            })
            .map(|_| ())
            .map_err(|_| limit)
    }

    /// Gives back `n` encryptions reserved with [`KeySecret::reserve`] and not made.
    pub(crate) fn release(&self, n: u64) {
        self.encryptions.fetch_sub(n, Ordering::Relaxed);
    }
}
