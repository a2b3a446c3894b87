//! MongoDB Queryable Encryption ("QE", FLE2 protocol version 2) values, in pure Rust.
//!
//! fieldcrypt reads the four forms a QE collection stores — BSON binary subtype 6 with blob
//! subtype 16 (FLE2UnindexedEncryptedValueV2), 14 (FLE2IndexedEqualityEncryptedValueV2), 15
//! (FLE2IndexedRangeEncryptedValueV2) and 17 (FLE2IndexedTextEncryptedValue) — and writes the
//! unindexed one, which libmongocrypt's explicit encryption (`Algorithm.UNINDEXED`) makes too.
//! Indexed values cannot be written outside a server: their metadata blocks depend on the
//! server's ESC/ECOC collections.
//!
//! QE uses the same key-vault documents and 96-byte data keys as FLE1 ([`crate::CsfleKeyDocument`],
//! [`KeyKind::Csfle`](crate::KeyKind::Csfle)), split differently; one key serves both formats,
//! as in MongoDB. Layouts, key derivation and what is authenticated: `payload.rs`, `aead.rs` and
//! docs/QE.md.
//!
//! ```text
//! subtype-6 bytes ──parse_payload──▶ QePayload (kind, key id, type)
//!   unindexed: key(id) ──▶ AEAD_AES_256_CBC_HMAC_SHA_256 ──▶ value
//!   indexed:   key(S_KeyId) ──▶ AES-256-CTR (server layer) ──▶ K_KeyId ──▶ key(K_KeyId)
//!              ──▶ AEAD_AES_256_CBC_HMAC_SHA_256 (AD = K_KeyId) ──▶ value
//! ```
//!
//! Imports: `csfle/keys.rs` and `transform.rs` use this module; it uses `csfle/payload.rs`'s
//! type names (the BSON type rules are shared), nothing above.

mod aead;
mod payload;

use core::fmt;

pub(crate) use aead::QeKey;
pub(crate) use payload::{
    decrypt_into, encrypt_unindexed, open_server_layer, open_unindexed, parse_payload, QePayload,
};

/// The four stored forms of Queryable Encryption values (the first byte of a subtype-6
/// binary's payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QeValueKind {
    /// Blob subtype 16, FLE2UnindexedEncryptedValueV2: an encrypted field that is not queryable.
    Unindexed,
    /// Blob subtype 14, FLE2IndexedEqualityEncryptedValueV2: an equality-queryable field.
    Equality,
    /// Blob subtype 15, FLE2IndexedRangeEncryptedValueV2: a range-queryable field.
    Range,
    /// Blob subtype 17, FLE2IndexedTextEncryptedValue: a prefix/suffix/substring field.
    Text,
}

impl QeValueKind {
    /// Every kind, in blob-subtype order.
    pub const ALL: [QeValueKind; 4] = [
        QeValueKind::Equality,
        QeValueKind::Range,
        QeValueKind::Unindexed,
        QeValueKind::Text,
    ];

    /// The kind of a subtype-6 payload whose first byte is `blob_subtype`, if it is a stored
    /// QE value (insert and find payloads, FLE1 values and QE protocol version 1 are not).
    #[must_use]
    pub const fn from_blob_subtype(blob_subtype: u8) -> Option<Self> {
        match blob_subtype {
            14 => Some(QeValueKind::Equality),
            15 => Some(QeValueKind::Range),
            16 => Some(QeValueKind::Unindexed),
            17 => Some(QeValueKind::Text),
            _ => None,
        }
    }

    /// The kind of a subtype-6 binary's bytes, if they are a stored QE value.
    #[must_use]
    pub fn of(payload: &[u8]) -> Option<Self> {
        payload.first().copied().and_then(Self::from_blob_subtype)
    }

    /// The blob subtype (first payload byte).
    #[must_use]
    pub const fn blob_subtype(self) -> u8 {
        match self {
            QeValueKind::Equality => 14,
            QeValueKind::Range => 15,
            QeValueKind::Unindexed => 16,
            QeValueKind::Text => 17,
        }
    }

    /// MongoDB's name of the stored form.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            QeValueKind::Unindexed => "FLE2UnindexedEncryptedValueV2",
            QeValueKind::Equality => "FLE2IndexedEqualityEncryptedValueV2",
            QeValueKind::Range => "FLE2IndexedRangeEncryptedValueV2",
            QeValueKind::Text => "FLE2IndexedTextEncryptedValue",
        }
    }

    /// A short lowercase name (`unindexed`, `equality`, `range`, `text`), as reports use.
    #[must_use]
    pub const fn short_name(self) -> &'static str {
        match self {
            QeValueKind::Unindexed => "unindexed",
            QeValueKind::Equality => "equality",
            QeValueKind::Range => "range",
            QeValueKind::Text => "text",
        }
    }

    /// Whether the value carries a server layer and index metadata.
    #[must_use]
    pub const fn is_indexed(self) -> bool {
        !matches!(self, QeValueKind::Unindexed)
    }

    /// The algorithm name errors use.
    pub(crate) const fn algorithm(self) -> &'static str {
        match self {
            QeValueKind::Unindexed => "Queryable Encryption (Unindexed)",
            QeValueKind::Equality => "Queryable Encryption (Indexed)",
            QeValueKind::Range => "Queryable Encryption (Range)",
            QeValueKind::Text => "Queryable Encryption (text search)",
        }
    }
}

impl fmt::Display for QeValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The top-level field in which a QE collection keeps the server's tags for indexed fields
/// (an array of 32-byte binaries). Meaningless outside that collection: decryption drops it
/// unless asked to keep it ([`crate::Context::keep_safe_content`]), and migrating a collection
/// off QE removes it.
pub const SAFE_CONTENT_FIELD: &str = "__safeContent__";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in QeValueKind::ALL {
            assert_eq!(QeValueKind::from_blob_subtype(k.blob_subtype()), Some(k));
            assert_eq!(QeValueKind::of(&[k.blob_subtype(), 0]), Some(k));
            assert_eq!(k.is_indexed(), k != QeValueKind::Unindexed);
        }
        for b in [0u8, 1, 2, 3, 6, 7, 9, 11, 12, 13, 18, 255] {
            assert_eq!(QeValueKind::from_blob_subtype(b), None);
        }
        assert_eq!(QeValueKind::of(&[]), None);
    }
}
