//! MongoDB client-side field-level encryption ("CSFLE", FLE1) interop, in pure Rust.
//!
//! fieldcrypt reads and writes the ciphertexts that MongoDB's drivers make through libmongocrypt
//! with the algorithms `AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic` and `-Random`: BSON binary
//! subtype 6 holding blob subtype 1 or 2. It also reads and writes the key-vault documents that
//! hold the data keys, for the `local` KMS provider.
//!
//! ```text
//! key vault (Extended JSON or documents) ──CsfleKeyDocument──▶ unwrap (LocalMasterKey)
//!   ──▶ CsfleDataKey ──▶ CsfleKeySet ──▶ decrypt_value / decrypt_document
//! ```
//!
//! Layout of the files:
//! - `aead.rs`: AEAD_AES_256_CBC_HMAC_SHA_512 and the per-key precomputed state.
//! - `payload.rs`: the subtype-6 payload, the type rules, value encoding.
//! - `kms.rs`: the `local` master key that wraps data keys.
//! - `keys.rs`: data keys, key documents, key sets.

pub(crate) mod aead;
mod keys;
mod kms;
mod payload;

use core::fmt;
use core::str::FromStr;

use crate::error::{ArgumentError, Error};

pub use keys::{CsfleDataKey, CsfleKeyDocument, CsfleKeySet};
pub use kms::LocalMasterKey;

// The document transform's hot path uses these directly.
#[allow(unused_imports)] // re-exported for the transform, which may not use all of them yet
pub(crate) use aead::CsfleKey;
#[allow(unused_imports)] // as above
pub(crate) use payload::{
    check_type, decrypt_into, encrypt, parse_payload, type_name, CsflePayload,
};

/// The two FLE1 encryption algorithms.
///
/// Deterministic encryption gives equal ciphertexts for equal values under one key, so a
/// server can match them (equality queries, unique indexes), and so can anyone who sees them:
/// it reveals which documents share a value. Prefer [`CsfleAlgorithm::Random`] unless you need
/// to query the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CsfleAlgorithm {
    /// `AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic` (blob subtype 1): the IV is an HMAC of the
    /// value, so equal values give equal ciphertexts.
    Deterministic,
    /// `AEAD_AES_256_CBC_HMAC_SHA_512-Random` (blob subtype 2): a random IV per encryption.
    Random,
}

impl CsfleAlgorithm {
    /// The algorithm's name as MongoDB spells it (schemas, driver options).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            CsfleAlgorithm::Deterministic => "AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic",
            CsfleAlgorithm::Random => "AEAD_AES_256_CBC_HMAC_SHA_512-Random",
        }
    }

    /// The first byte of the subtype-6 payload.
    pub(crate) const fn blob_subtype(self) -> u8 {
        match self {
            CsfleAlgorithm::Deterministic => 1,
            CsfleAlgorithm::Random => 2,
        }
    }

    pub(crate) const fn from_blob_subtype(b: u8) -> Option<Self> {
        match b {
            1 => Some(CsfleAlgorithm::Deterministic),
            2 => Some(CsfleAlgorithm::Random),
            _ => None,
        }
    }
}

impl fmt::Display for CsfleAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CsfleAlgorithm {
    type Err = Error;

    /// Parses MongoDB's names (`AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic`, `…-Random`).
    fn from_str(s: &str) -> Result<Self, Error> {
        [CsfleAlgorithm::Deterministic, CsfleAlgorithm::Random]
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| Error::from(ArgumentError::UnknownCsfleAlgorithm(s.to_owned())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in [CsfleAlgorithm::Deterministic, CsfleAlgorithm::Random] {
            assert_eq!(a.to_string().parse::<CsfleAlgorithm>().unwrap(), a);
            assert_eq!(CsfleAlgorithm::from_blob_subtype(a.blob_subtype()), Some(a));
        }
        assert!("AEAD_AES_256_CBC_HMAC_SHA_512"
            .parse::<CsfleAlgorithm>()
            .is_err());
        assert_eq!(CsfleAlgorithm::from_blob_subtype(0), None);
    }
}
