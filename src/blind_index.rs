//! Keyed blind indexes: HMAC-SHA-256 of a value, for finding secrets that are never read back.
//!
//! ```text
//! BSON Binary, subtype 0x8E (user-defined):
//!   0   u8    version (1)
//!   1   [16]  id of the key that computed it
//!   17  [n]   HMAC-SHA-256(index key, u32le(len(path)) ‖ path ‖ type ‖ value bytes)[..n], 8 ≤ n ≤ 32
//! ```
//! The index key is derived from the alias's root key with its own HKDF label, so it never
//! doubles as an encryption key. The key id lets queries match indexes written before a
//! rotation (one candidate per readable key) and lets audits find stale keys.

use hmac::Mac;

use crate::error::{Error, Result};
use crate::key::{Key, KeyId};
use crate::rawbson::RawValue;

/// The BSON Binary subtype of a blind index.
pub const BLIND_INDEX_SUBTYPE: u8 = 0x8E;

const VERSION: u8 = 1;

/// Appends the index bytes (the Binary's payload) for `value` at `path` to `out`.
pub(crate) fn compute_into(
    key: &Key,
    path: &str,
    value: RawValue<'_>,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let secret = key.for_query()?;
    if secret.kind() != crate::key::KeyKind::Fieldcrypt {
        return Err(Error::KeyMisuse {
            id: key.id(),
            reason: "blind indexes need a fieldcrypt key",
        });
    }
    let mut mac = secret.suites().blind_index(secret.material()).clone();
    let path_len = u32::try_from(path.len()).map_err(|_| Error::TooLong("field path"))?;
    mac.update(&path_len.to_le_bytes());
    mac.update(path.as_bytes());
    mac.update(&[value.ty]);
    mac.update(value.bytes);
    let tag = mac.finalize().into_bytes();
    out.push(VERSION);
    out.extend_from_slice(key.id().as_bytes());
    out.extend_from_slice(&tag[..len.min(tag.len())]);
    Ok(())
}

/// The key id recorded in a blind index payload.
///
/// # Errors
/// [`Error::MalformedCiphertext`] when the payload is not a blind index.
pub(crate) fn key_id(payload: &[u8]) -> Result<KeyId> {
    if payload.len() < 1 + 16 + 8 || payload[0] != VERSION {
        return Err(Error::MalformedCiphertext("not a blind index"));
    }
    KeyId::from_slice(&payload[1..17])
}
