//! Key-encryption keys (KEKs): what wraps the data keys stored in the key vault.
//!
//! A [`KekProvider`] turns a data key's material into a wrapped blob plus the `masterKey`
//! document that says how it was wrapped, and back. The key vault stores both in the key
//! document (`keyMaterial`, `masterKey`), exactly where MongoDB's CSFLE keeps them, and never
//! looks inside either: adding a KMS means adding one type that implements this trait.
//!
//! Every wrap and unwrap ([`KekProvider::wrap_with_ad`], [`KekProvider::unwrap_with_ad`])
//! takes **associated data**: bytes the wrapped key is bound to, which
//! must be given again, unchanged, to unwrap it. The key vault passes the key's identity (a
//! fixed label, its id, alias and kind: see
//! [`KeyVault::associated_data`](super::KeyVault::associated_data)) for fieldcrypt's own
//! 32-byte keys, so `keyMaterial` copied to another key document does not unwrap there; and
//! nothing (empty) for MongoDB's 96-byte CSFLE keys, which must stay in libmongocrypt's format.
//!
//! fieldcrypt ships [`LocalKek`], MongoDB's `local` KMS provider: a 96-byte master key that
//! wraps with AEAD_AES_256_CBC_HMAC_SHA_512 (random IV; the associated data as the AEAD's), as
//! libmongocrypt does, so CSFLE key documents wrapped here (empty associated data) are read by
//! every MongoDB driver and the other way round.
//!
//! How to plug in a cloud KMS is shown on [`KekProvider`].

use core::fmt;
use std::path::Path;

use bson::{doc, Bson, Document};
use zeroize::Zeroizing;

use crate::csfle::{CsfleKey, LocalMasterKey};
use crate::error::{ArgumentError, Error, Result};
use crate::key::{KeyMaterial, CSFLE_KEY_LEN};

/// The environment variable [`LocalKek::from_env`] reads: the 96-byte local master key in
/// standard base64 (128 characters), as `mongosh` and the drivers print it.
pub const MASTER_KEY_ENV: &str = "FIELDCRYPT_MASTER_KEY";

/// Wraps and unwraps data keys (envelope encryption). Implement it to add a KMS.
///
/// Implementations must never put key bytes in errors, logs or `Debug` output.
///
/// # Associated data
///
/// [`wrap_with_ad`](KekProvider::wrap_with_ad) and [`unwrap_with_ad`](KekProvider::unwrap_with_ad)
/// take `associated_data`: the wrapped key must be bound to it, and `unwrap_with_ad` must fail
/// (with [`Error::Decrypt`]) when it is given other bytes than `wrap_with_ad` was. That is what stops someone who can write the key vault
/// from copying one key's `keyMaterial` into another key's document (another alias, another
/// tenant, a destroyed key). The key vault passes:
///
/// - for fieldcrypt's 32-byte keys, [`KeyVault::associated_data`](super::KeyVault::associated_data)
///   (a fixed label, the key id, the alias and the kind; at most a few hundred bytes);
/// - for MongoDB's 96-byte CSFLE keys, **empty** associated data — and then the provider must
///   wrap exactly as libmongocrypt does (no encryption context, no AAD), or MongoDB's drivers
///   cannot read the key.
///
/// Map non-empty associated data to the KMS's own binding, as Google Tink's KMS AEADs do:
///
/// | KMS | associated data goes to |
/// |---|---|
/// | AWS KMS `Encrypt`/`Decrypt` | `EncryptionContext = {"associatedData": hex(ad)}` |
/// | GCP Cloud KMS `encrypt`/`decrypt` | `additionalAuthenticatedData` |
/// | HashiCorp Vault transit (AEAD key types) | `associated_data` (base64) |
/// | Azure Key Vault `wrapKey` (RSA-OAEP: no AAD) | wrap `SHA-256(ad) ‖ dek` and compare the digest in constant time on unwrap |
///
/// A KMS with no binding at all must do as the Azure row does (include a digest of the
/// associated data in what it encrypts and check it), never ignore it.
///
/// # Plugging in a cloud KMS
///
/// A cloud provider calls its KMS's encrypt and decrypt operations and describes the KMS key in
/// the `masterKey` document. Use the field names libmongocrypt uses (`provider: "aws"`,
/// `region`, `key`; `"gcp"`: `projectId`, `location`, `keyRing`, `keyName`; `"azure"`:
/// `keyVaultEndpoint`, `keyName`; `"kmip"`: `keyId`) and store the KMS's ciphertext as-is in
/// `keyMaterial`: CSFLE key documents wrapped that way stay readable by MongoDB's drivers.
///
/// ```text
/// use bson::{doc, Document};
/// use fieldcrypt::{mongo::KekProvider, KeyMaterial, Result};
///
/// /// AWS KMS (sketch: `aws_sdk_kms` is not a fieldcrypt dependency).
/// #[derive(Debug)]
/// struct AwsKek { client: aws_sdk_kms::Client, region: String, key_arn: String }
///
/// #[async_trait::async_trait]
/// impl KekProvider for AwsKek {
///     fn provider(&self) -> &str { "aws" }
///
///     // Unwrap only keys wrapped under this KMS key (several KEKs may share a provider).
///     fn can_unwrap(&self, master_key: &Document) -> bool {
///         master_key.get_str("provider") == Ok("aws") && master_key.get_str("key") == Ok(&self.key_arn)
///     }
///
///     async fn wrap_with_ad(&self, dek: &KeyMaterial, ad: &[u8]) -> Result<(Document, Vec<u8>)> {
///         let mut req = self.client.encrypt().key_id(&self.key_arn)
///             .plaintext(dek.expose_secret().to_vec().into()); // the SDK owns this copy
///         if !ad.is_empty() {
///             req = req.encryption_context("associatedData", hex::encode(ad));
///         }
///         let out = req.send().await.map_err(|e| fieldcrypt::Error::Kms { provider: "aws".into(), reason: e.to_string() })?;
///         let blob = out.ciphertext_blob().map(|b| b.as_ref().to_vec()).unwrap_or_default();
///         Ok((doc! { "provider": "aws", "region": &self.region, "key": &self.key_arn }, blob))
///     }
///
///     async fn unwrap_with_ad(&self, _master_key: &Document, wrapped: &[u8], ad: &[u8]) -> Result<KeyMaterial> {
///         let mut req = self.client.decrypt().key_id(&self.key_arn)
///             .ciphertext_blob(wrapped.to_vec().into());
///         if !ad.is_empty() {
///             req = req.encryption_context("associatedData", hex::encode(ad));
///         }
///         // A wrong context is InvalidCiphertextException: report it as Error::Decrypt.
///         let out = req.send().await.map_err(|_| fieldcrypt::Error::Decrypt)?;
///         let plain = out.plaintext().ok_or(fieldcrypt::Error::Decrypt)?;
///         Ok(KeyMaterial::from_slice(plain.as_ref()))
///     }
/// }
/// ```
///
/// Then [`KeyVault::builder`](super::KeyVault::builder)`(&client, Arc::new(aws_kek))`. To move
/// keys from one KEK to another, configure the new one as the vault's KEK, keep the old one with
/// [`KeyVaultBuilder::unwrap_also_with`](super::KeyVaultBuilder::unwrap_also_with), and run
/// [`KeyVault::rewrap`](super::KeyVault::rewrap) (see `docs/KEY_VAULT.md`).
/// GCP, Azure and HashiCorp Vault (transit `encrypt`/`decrypt`, `masterKey: {provider:
/// "vault", …}` — a fieldcrypt-only provider name that MongoDB's drivers do not know) plug in the
/// same way.
#[async_trait::async_trait]
pub trait KekProvider: Send + Sync {
    /// The `masterKey.provider` this KEK writes, e.g. `"local"`, `"aws"`.
    fn provider(&self) -> &str;

    /// Whether this KEK should try to unwrap a key whose `masterKey` document is `master_key`.
    /// The default accepts every document naming [`KekProvider::provider`]; the key vault tries
    /// each KEK that accepts, in order, until one unwraps.
    fn can_unwrap(&self, master_key: &Document) -> bool {
        master_key.get_str("provider") == Ok(self.provider())
    }

    /// Wraps a data key, bound to `associated_data` (see the trait's documentation; empty for
    /// MongoDB's CSFLE keys, which must then be wrapped exactly as libmongocrypt does): returns
    /// the `masterKey` document and the wrapped bytes to store in `keyMaterial`.
    ///
    /// # Errors
    /// KMS errors ([`Error::Kms`] for a KMS that refuses or cannot be reached).
    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        associated_data: &[u8],
    ) -> Result<(Document, Vec<u8>)>;

    /// Unwraps `keyMaterial` that [`KekProvider::wrap_with_ad`] (or the matching MongoDB KMS
    /// provider) produced, given its `masterKey` document and the same `associated_data`.
    ///
    /// # Errors
    /// [`Error::Decrypt`] when the blob does not authenticate under this KEK and this
    /// associated data; KMS errors.
    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<KeyMaterial>;

    /// Unwraps the `keyMaterial` of a **MongoDB CSFLE** key document: with empty associated
    /// data, as libmongocrypt wraps. fieldcrypt's own keys are bound to their key document and
    /// do not unwrap this way: use [`KekProvider::unwrap_with_ad`] with
    /// [`KeyVault::associated_data`](super::KeyVault::associated_data), or
    /// [`KeyVault::keys_from_documents`](super::KeyVault::keys_from_documents).
    ///
    /// # Errors
    /// As [`KekProvider::unwrap_with_ad`].
    async fn unwrap(&self, master_key: &Document, wrapped: &[u8]) -> Result<KeyMaterial> {
        self.unwrap_with_ad(master_key, wrapped, &[]).await
    }

    /// The `masterKey` document every key this KEK wraps gets, when that document tells its
    /// master key apart from every other (a KMS key's ARN or name); `None` (the default) when
    /// it does not — two local master keys both write `{provider: "local"}`.
    /// [`KeyVault::rewrap`](super::KeyVault::rewrap) leaves keys whose masterKey already
    /// equals it alone, so a rewrap that was interrupted continues where it stopped, without
    /// a KMS call for the keys already moved.
    fn wraps_under(&self) -> Option<&Document> {
        None
    }

    /// Re-wraps a key wrapped under `master_key` with this KEK inside the KMS, without the
    /// plaintext leaving it, where the KMS can (Vault Transit's `rewrap`, to the newest version
    /// of the same Transit key). `Ok(None)`, the default: it cannot, and the key vault unwraps
    /// and wraps.
    ///
    /// # Errors
    /// KMS errors.
    async fn rewrap_in_kms(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<Option<(Document, Vec<u8>)>> {
        let _ = (master_key, wrapped, associated_data);
        Ok(None)
    }
}

/// MongoDB's `local` KMS provider: a 96-byte master key held in memory (from a file or the
/// environment variable [`MASTER_KEY_ENV`]) that wraps data keys with
/// AEAD_AES_256_CBC_HMAC_SHA_512, as libmongocrypt does.
///
/// Key documents get `masterKey: { provider: "local" }` (or `"local:<name>"` for a named
/// provider, see [`LocalKek::named`]). Prints no key bytes.
pub struct LocalKek {
    provider: String,
    master: LocalMasterKey,
    /// The same AEAD keyed with the same 96 bytes: [`LocalMasterKey`] wraps only 96-byte CSFLE
    /// keys with no associated data, and fieldcrypt's data keys are 32 bytes, bound to their
    /// identity. libmongocrypt's wrap is this AEAD over whatever the material is with empty
    /// associated data, so a CSFLE key wrapped here is exactly what it would write.
    any_len: CsfleKey,
}

impl LocalKek {
    /// A `local` KEK with this master key.
    #[must_use]
    pub fn new(master: LocalMasterKey) -> Self {
        Self::with_provider("local".to_owned(), master)
    }

    /// A named local KEK (`masterKey.provider` is `"local:<name>"`, as with MongoDB's named KMS
    /// providers), so that two local master keys can be told apart during a rewrap.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `name` is empty or holds characters other than ASCII letters,
    /// digits and `_` (MongoDB's rule for KMS provider names).
    pub fn named(name: &str, master: LocalMasterKey) -> Result<Self> {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(Error::from(ArgumentError::KmsProviderName(name.to_owned())));
        }
        Ok(Self::with_provider(format!("local:{name}"), master))
    }

    /// A KEK with a fresh random master key (for tests and first-time set-up: save it with
    /// [`LocalMasterKey::expose_base64`] through [`LocalKek::master_key`]).
    #[must_use]
    pub fn generate() -> Self {
        Self::new(LocalMasterKey::generate())
    }

    /// Reads the master key from a file holding the 96 raw bytes or their base64 text.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::KeyFormat`], as [`LocalMasterKey::from_file`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        LocalMasterKey::from_file(path).map(Self::new)
    }

    /// Reads the master key (base64) from the environment variable [`MASTER_KEY_ENV`]
    /// (`FIELDCRYPT_MASTER_KEY`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the variable is not set, [`Error::KeyFormat`] when it does not
    /// hold base64 of 96 bytes.
    pub fn from_env() -> Result<Self> {
        Self::from_env_var(MASTER_KEY_ENV)
    }

    /// Reads the master key (base64) from the environment variable `var`.
    ///
    /// # Errors
    /// As [`LocalKek::from_env`].
    pub fn from_env_var(var: &str) -> Result<Self> {
        let text = Zeroizing::new(
            std::env::var(var)
                .map_err(|_| Error::from(ArgumentError::MissingEnvVar(var.to_owned())))?,
        );
        LocalMasterKey::from_base64(&text)
            .map(Self::new)
            .map_err(|_| {
                Error::KeyFormat(format!(
                    "{var} does not hold a local master key ({CSFLE_KEY_LEN} bytes in base64)"
                ))
            })
    }

    /// The master key, e.g. to save a generated one or to hand it to another driver's
    /// `kmsProviders.local.key`.
    #[must_use]
    pub fn master_key(&self) -> &LocalMasterKey {
        &self.master
    }

    fn with_provider(provider: String, master: LocalMasterKey) -> Self {
        let any_len = {
            // Wiped on drop: the base64 text and the decoded bytes.
            let b64 = master.expose_base64();
            let bytes = Zeroizing::new(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.as_bytes())
                    .expect("LocalMasterKey prints valid base64"), // allowed: its own output
            );
            let key: &[u8; CSFLE_KEY_LEN] =
                bytes[..].try_into().expect("a LocalMasterKey is 96 bytes"); // allowed: its invariant
            CsfleKey::new(key)
        };
        LocalKek {
            provider,
            master,
            any_len,
        }
    }

    fn check_provider(&self, master_key: &Document) -> Result<()> {
        match master_key.get("provider") {
            Some(Bson::String(p)) if *p == self.provider => Ok(()),
            Some(Bson::String(p)) => Err(Error::KeyFormat(format!(
                "key is wrapped by KMS provider {p:?}, not {:?}",
                self.provider
            ))),
            _ => Err(Error::KeyFormat(
                "masterKey has no provider name".to_owned(),
            )),
        }
    }
}

/// Length of a wrapped 96-byte key: IV (16) + 96 bytes and a padding block (112) + tag (32).
const WRAPPED_CSFLE_LEN: usize = 160;

#[async_trait::async_trait]
impl KekProvider for LocalKek {
    fn provider(&self) -> &str {
        &self.provider
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        associated_data: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        let secret = dek.expose_secret();
        let mut wrapped = Vec::with_capacity(secret.len() + 64);
        self.any_len.seal(
            &CsfleKey::random_iv(),
            associated_data,
            secret,
            &mut wrapped,
        );
        Ok((doc! { "provider": self.provider.as_str() }, wrapped))
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<KeyMaterial> {
        self.check_provider(master_key)?;
        let mut plain = Zeroizing::new(Vec::with_capacity(wrapped.len()));
        self.any_len.open(associated_data, wrapped, &mut plain)?;
        Ok(KeyMaterial::from_slice(&plain))
    }

    /// As the trait's, and a clear error for anything but a wrapped 96-byte key (a fieldcrypt
    /// key's `keyMaterial` is 96 bytes long and bound to its key document).
    async fn unwrap(&self, master_key: &Document, wrapped: &[u8]) -> Result<KeyMaterial> {
        if wrapped.len() != WRAPPED_CSFLE_LEN {
            return Err(Error::KeyFormat(format!(
                "keyMaterial of {} bytes is not a wrapped {CSFLE_KEY_LEN}-byte CSFLE key; a \
                 fieldcrypt key's keyMaterial is bound to its key document (id, alias, kind) and \
                 unwraps only with it",
                wrapped.len()
            )));
        }
        self.unwrap_with_ad(master_key, wrapped, &[]).await
    }
}

impl fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalKek")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for LocalKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} KEK", self.provider)
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;
    use crate::key::FIELDCRYPT_KEY_LEN;

    fn block_on<F: core::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn wraps_both_key_lengths() {
        let kek = LocalKek::generate();
        for (len, ad) in [
            (FIELDCRYPT_KEY_LEN, &b"bound"[..]),
            (CSFLE_KEY_LEN, &[][..]),
        ] {
            let dek = KeyMaterial::generate(len);
            let (mk, wrapped) = block_on(kek.wrap_with_ad(&dek, ad)).unwrap();
            assert_eq!(mk, doc! { "provider": "local" });
            assert_eq!(wrapped.len(), 16 + (len / 16 + 1) * 16 + 32);
            let back = block_on(kek.unwrap_with_ad(&mk, &wrapped, ad)).unwrap();
            assert_eq!(back.expose_secret(), dek.expose_secret());
        }
    }

    #[test]
    fn csfle_keys_are_wrapped_as_libmongocrypt_does() {
        // Empty associated data: exactly LocalMasterKey's (libmongocrypt's) wrap, both ways.
        let kek = LocalKek::generate();
        let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
        let (mk, wrapped) = block_on(kek.wrap_with_ad(&dek, &[])).unwrap();
        let by_master = kek.master_key().unwrap(&wrapped).unwrap();
        assert_eq!(by_master.expose_secret()[..], *dek.expose_secret());
        let back = block_on(kek.unwrap(&mk, &wrapped)).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
    }

    #[test]
    fn fail_other_associated_data() {
        let kek = LocalKek::generate();
        let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
        let (mk, wrapped) = block_on(kek.wrap_with_ad(&dek, b"key A")).unwrap();
        for ad in [&b"key B"[..], b"key A\0", b"", b"key "] {
            assert!(matches!(
                block_on(kek.unwrap_with_ad(&mk, &wrapped, ad)),
                Err(Error::Decrypt)
            ));
        }
        // The CSFLE-only inherent unwrap refuses a bound 32-byte key with a clear error.
        let e = block_on(kek.unwrap(&mk, &wrapped)).unwrap_err();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains("bound to its key document")),
            "{e}"
        );
        // And a 96-byte key wrapped with associated data does not unwrap without it.
        let csfle = KeyMaterial::generate(CSFLE_KEY_LEN);
        let (mk, wrapped) = block_on(kek.wrap_with_ad(&csfle, b"ctx")).unwrap();
        assert!(matches!(
            block_on(kek.unwrap(&mk, &wrapped)),
            Err(Error::Decrypt)
        ));
    }

    #[test]
    fn fail_wrong_master_key_or_provider() {
        let kek = LocalKek::generate();
        let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
        let (mk, wrapped) = block_on(kek.wrap_with_ad(&dek, b"ad")).unwrap();
        let other = LocalKek::generate();
        assert!(matches!(
            block_on(other.unwrap_with_ad(&mk, &wrapped, b"ad")),
            Err(Error::Decrypt)
        ));
        assert!(matches!(
            block_on(kek.unwrap_with_ad(&doc! { "provider": "aws" }, &wrapped, b"ad")),
            Err(Error::KeyFormat(_))
        ));
        let named = LocalKek::named("eu", LocalMasterKey::generate()).unwrap();
        assert_eq!(named.provider(), "local:eu");
        assert!(!named.can_unwrap(&mk));
        assert!(LocalKek::named("bad name", LocalMasterKey::generate()).is_err());
    }
}
