//! The `local` KMS provider: a 96-byte master key that wraps data keys' `keyMaterial`.
//!
//! libmongocrypt wraps and unwraps with the same AEAD_AES_256_CBC_HMAC_SHA_512 as values, with
//! a random IV and no associated data (`_mongocrypt_wrap_key` / `_mongocrypt_unwrap_key` in
//! `src/mongocrypt-crypto.c`, called with the local key by the key broker). A wrapped 96-byte
//! key is therefore 16 (IV) + 112 (96 bytes + one padding block) + 32 (tag) = 160 bytes.

use core::fmt;
use std::path::Path;

use base64::Engine as _;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use zeroize::Zeroizing;

use super::aead::{CsfleKey, KEY_LEN};
use crate::error::{Error, Result};

/// The master key of MongoDB's `local` KMS provider (96 bytes), which wraps CSFLE data keys.
///
/// It is the same key other MongoDB drivers take as `kmsProviders.local.key`. It lives in a
/// [`SecretBox`]; `Debug` prints nothing of it.
pub struct LocalMasterKey {
    material: SecretBox<[u8; KEY_LEN]>,
    key: CsfleKey,
}

impl LocalMasterKey {
    /// A fresh random master key from the operating system's CSPRNG.
    #[must_use]
    pub fn generate() -> Self {
        let mut material = zeroed_key();
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, material.expose_secret_mut());
        Self::from_secret(material)
    }

    /// The master key with these 96 bytes.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when `bytes` is not 96 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Ok(Self::from_secret(secret_from_slice(bytes).ok_or_else(
            || {
                Error::KeyFormat(format!(
                    "a local master key is {KEY_LEN} bytes, not {}",
                    bytes.len()
                ))
            },
        )?))
    }

    /// Reads the master key from standard base64 (surrounding whitespace is ignored), as drivers
    /// and `mongosh` print it.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when the text is not base64 of 96 bytes.
    pub fn from_base64(text: &str) -> Result<Self> {
        let text = text.trim();
        // Decode straight into a buffer that is wiped on drop and never reallocated.
        let mut bytes = Zeroizing::new(Vec::with_capacity(text.len() / 4 * 3 + 3));
        base64::engine::general_purpose::STANDARD
            .decode_vec(text, &mut bytes)
            .map_err(|_| Error::KeyFormat("local master key is not valid base64".into()))?;
        Self::from_bytes(&bytes)
    }

    /// Reads the master key from a file holding either the raw 96 bytes or their base64 text.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::KeyFormat`] when it holds neither
    /// form.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let bytes = Zeroizing::new(std::fs::read(path)?);
        if bytes.len() == KEY_LEN {
            return Self::from_bytes(&bytes);
        }
        let text = core::str::from_utf8(&bytes).map_err(|_| {
            Error::KeyFormat(format!(
                "a local master key file holds {KEY_LEN} raw bytes or their base64 text"
            ))
        })?;
        Self::from_base64(text)
    }

    /// The key as standard base64, for saving a generated key or handing it to another driver's
    /// `kmsProviders.local.key`. Named `expose_` so that every use is easy to find.
    #[must_use]
    pub fn expose_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(self.material.expose_secret()),
        )
    }

    /// Wraps (encrypts) 96 bytes of data key material, as libmongocrypt stores it in a key
    /// document's `keyMaterial`: AEAD_AES_256_CBC_HMAC_SHA_512 with a random IV and no
    /// associated data (160 bytes).
    #[must_use]
    pub fn wrap(&self, material: &SecretBox<[u8; KEY_LEN]>) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.key.seal(
            &CsfleKey::random_iv(),
            &[],
            material.expose_secret(),
            &mut out,
        );
        out
    }

    /// Unwraps a key document's `keyMaterial`.
    ///
    /// # Errors
    /// [`Error::Decrypt`] when it does not authenticate under this master key (wrong master
    /// key, corrupted document), [`Error::MalformedCiphertext`] for an impossible length,
    /// [`Error::KeyFormat`] when it authenticates but does not hold 96 bytes.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<SecretBox<[u8; KEY_LEN]>> {
        let mut plain = Zeroizing::new(Vec::with_capacity(wrapped.len()));
        self.key.open(&[], wrapped, &mut plain)?;
        secret_from_slice(&plain).ok_or_else(|| {
            Error::KeyFormat(format!(
                "unwrapped key material is {} bytes, not {KEY_LEN}",
                plain.len()
            ))
        })
    }

    fn from_secret(material: SecretBox<[u8; KEY_LEN]>) -> Self {
        let key = CsfleKey::new(material.expose_secret());
        LocalMasterKey { material, key }
    }
}

impl fmt::Debug for LocalMasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalMasterKey").finish_non_exhaustive()
    }
}

/// A boxed all-zero key, filled in place by the caller (`[u8; 96]` has no `Default`, so
/// `SecretBox::init_with_mut` is not available).
pub(crate) fn zeroed_key() -> SecretBox<[u8; KEY_LEN]> {
    SecretBox::new(Box::new([0u8; KEY_LEN]))
}

/// Copies exactly 96 bytes into a fresh secret box.
pub(crate) fn secret_from_slice(bytes: &[u8]) -> Option<SecretBox<[u8; KEY_LEN]>> {
    (bytes.len() == KEY_LEN).then(|| {
        let mut key = zeroed_key();
        key.expose_secret_mut().copy_from_slice(bytes);
        key
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_round_trip() {
        let master = LocalMasterKey::generate();
        let dek = secret_from_slice(&[0x5a; KEY_LEN]).unwrap();
        let wrapped = master.wrap(&dek);
        assert_eq!(wrapped.len(), 160);
        assert_ne!(wrapped, master.wrap(&dek), "random IV");
        let back = master.unwrap(&wrapped).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
    }

    #[test]
    fn fail_unwrap_wrong_master_or_tampered() {
        let master = LocalMasterKey::generate();
        let wrapped = master.wrap(&secret_from_slice(&[1; KEY_LEN]).unwrap());
        assert!(matches!(
            LocalMasterKey::generate().unwrap(&wrapped),
            Err(Error::Decrypt)
        ));
        let mut bad = wrapped.clone();
        bad[20] ^= 1;
        assert!(matches!(master.unwrap(&bad), Err(Error::Decrypt)));
        assert!(master.unwrap(&wrapped[..100]).is_err());
        assert!(master.unwrap(&[]).is_err());
    }

    #[test]
    fn base64_and_file_forms() {
        let master = LocalMasterKey::generate();
        let b64 = master.expose_base64();
        assert_eq!(b64.len(), 128);
        let again = LocalMasterKey::from_base64(&format!("  {}\n", &*b64)).unwrap();
        assert_eq!(again.expose_base64(), b64);

        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("master.txt");
        std::fs::write(&text, format!("{}\n", &*b64)).unwrap();
        assert_eq!(
            LocalMasterKey::from_file(&text).unwrap().expose_base64(),
            b64
        );
        let raw = dir.path().join("master.bin");
        std::fs::write(&raw, master.material.expose_secret()).unwrap();
        assert_eq!(
            LocalMasterKey::from_file(&raw).unwrap().expose_base64(),
            b64
        );
    }

    #[test]
    fn fail_bad_master_key_forms() {
        assert!(matches!(
            LocalMasterKey::from_bytes(&[0; 95]),
            Err(Error::KeyFormat(_))
        ));
        assert!(matches!(
            LocalMasterKey::from_base64("!!!"),
            Err(Error::KeyFormat(_))
        ));
        assert!(matches!(
            LocalMasterKey::from_base64("AAAA"),
            Err(Error::KeyFormat(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, [0xffu8; 50]).unwrap();
        assert!(matches!(
            LocalMasterKey::from_file(&p),
            Err(Error::KeyFormat(_))
        ));
        assert!(matches!(
            LocalMasterKey::from_file(dir.path().join("missing")),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let master = LocalMasterKey::from_bytes(&[0xab; KEY_LEN]).unwrap();
        let s = format!("{master:?} {master:#?}");
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("ab,"),
            "{s}"
        );
        assert_eq!(format!("{master:?}"), "LocalMasterKey { .. }");
    }
}
