//! Key identifiers: 16-byte UUIDs, as MongoDB uses for data keys.
//!
//! A leaf: the error type names key ids, so the parsing that can fail (`from_slice`,
//! `FromStr`) lives in `key.rs`, above both.

use core::fmt;

use rand::RngCore;

/// The id of a data key: a 16-byte UUID (version 4 when fieldcrypt makes it), written into
/// every ciphertext so that readers find the key without a schema.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; 16]);

impl KeyId {
    /// A fresh random (version 4) UUID from the OS-seeded CSPRNG.
    #[must_use]
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        KeyId(b)
    }

    /// The id with these bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        KeyId(bytes)
    }

    /// The id's bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The id as a BSON UUID.
    #[must_use]
    pub fn to_uuid(&self) -> bson::Uuid {
        bson::Uuid::from_bytes(self.0)
    }

    /// The id as a BSON Binary of subtype 4 (UUID), as stored in key documents.
    #[must_use]
    pub fn to_binary(&self) -> bson::Binary {
        bson::Binary {
            subtype: bson::spec::BinarySubtype::Uuid,
            bytes: self.0.to_vec(),
        }
    }
}

impl From<bson::Uuid> for KeyId {
    fn from(u: bson::Uuid) -> Self {
        KeyId(u.bytes())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_uuid(), f)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let id = KeyId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(s.parse::<KeyId>().unwrap(), id);
    }

    #[test]
    fn fail_parse_garbage() {
        assert!("not-a-uuid".parse::<KeyId>().is_err());
        assert!("zz345678-1234-1234-1234-123456789012"
            .parse::<KeyId>()
            .is_err());
    }
}
