//! The MongoDB layer (feature `mongodb`): the key vault with envelope encryption, key-encryption
//! key (KEK) providers, and the encrypting collection.
//!
//! ```text
//!  EncryptedCollection::<op>   collection.rs; one action family per file in collection/action/
//!    │ prepare (action/prepare.rs): check the handle, prefetch keys from a KeySource
//!    │ rewrite (rewrite.rs, rewrite/): filter, write, pipeline, expression; or refuse (pure)
//!    │ encrypt what is written (the transform, keys read from memory)
//!    ▼
//!  driver ──▶ server ──▶ driver ──▶ decrypt what is read (collection/cursor.rs)
//!
//!  KeyVault (key_vault.rs): data keys in MongoDB, wrapped by a KekProvider (kek.rs)
//! ```
//!
//! The core transform is synchronous and never waits on the network. Keys that live in MongoDB
//! are resolved ahead of each operation through [`KeySource`], then used from memory.

use std::sync::Arc;

use crate::error::Result;
use crate::key::KeyId;
use crate::keyring::{InMemoryKeyring, Keyring};

mod collection;
mod rewrite;
mod validator;
pub use collection::{
    tenant_alias, tenant_aliases, tenant_schema, ActionSession, Aggregate, BulkWrite,
    CountDocuments, CreateIndex, CreateIndexes, Delete, Distinct, EncryptedChangeStream,
    EncryptedCollection, EncryptedCursor, EstimatedDocumentCount, Find, FindOne, FindOneAndDelete,
    FindOneAndReplace, FindOneAndUpdate, InsertMany, InsertOne, NoSession, ReplaceOne, Update,
    Watch, WithSession, WriteModel,
};
pub use rewrite::QueryRewriter;
pub use validator::{apply_validator, json_schema, validator};

mod kek;
mod key_vault;
pub use kek::{KekProvider, LocalKek, MASTER_KEY_ENV};
pub use key_vault::{
    CacheStats, KeyInfo, KeyVault, KeyVaultBuilder, RewrapFailure, RewrapOutcome, RewrapReport,
    RewrappedKey, DEFAULT_CACHE_CAPACITY, DEFAULT_CACHE_TTL, DEFAULT_KEY_VAULT_NAMESPACE,
    DEFAULT_USAGE_LEASE,
};

/// A keyring whose keys may have to be fetched (and unwrapped) before synchronous use.
///
/// [`EncryptedCollection`](crate::mongo) calls the prefetch methods before it encrypts or
/// decrypts a batch, so the hot path only reads memory.
#[async_trait::async_trait]
pub trait KeySource: Keyring {
    /// Makes the keys with these ids available to [`Keyring::key`].
    ///
    /// # Errors
    /// Key-vault or KEK errors. Unknown ids are not an error here; the lookup reports them.
    async fn prefetch_ids(&self, ids: &[KeyId]) -> Result<()>;

    /// Makes the readable keys (primary first) of these aliases available to
    /// [`Keyring::primary`] and [`Keyring::readable_keys`].
    ///
    /// # Errors
    /// Key-vault or KEK errors.
    async fn prefetch_aliases(&self, aliases: &[String]) -> Result<()>;
}

#[async_trait::async_trait]
impl KeySource for InMemoryKeyring {
    async fn prefetch_ids(&self, _ids: &[KeyId]) -> Result<()> {
        Ok(())
    }
    async fn prefetch_aliases(&self, _aliases: &[String]) -> Result<()> {
        Ok(())
    }
}

#[async_trait::async_trait]
impl<K: KeySource + ?Sized> KeySource for Arc<K> {
    async fn prefetch_ids(&self, ids: &[KeyId]) -> Result<()> {
        (**self).prefetch_ids(ids).await
    }
    async fn prefetch_aliases(&self, aliases: &[String]) -> Result<()> {
        (**self).prefetch_aliases(aliases).await
    }
}
