//! Client-side field-level encryption for MongoDB.
//!
//! Mark fields in a [`Schema`]; a [`Cryptor`] encrypts them with an AEAD under the primary key
//! of a named alias from a [`Keyring`], writes the key id into every ciphertext, and decrypts
//! any document with the keyring alone.
//!
//! # Which API for which job
//!
//! | job | API |
//! |---|---|
//! | encrypt/decrypt documents in memory | [`Cryptor`] with a [`Schema`] and a [`Keyring`] |
//! | a schema marked on the serde type itself (feature `derive`) | `#[derive(Encrypted)]`, [`Encrypted::schema`], `mongo::EncryptedCollection::typed` |
//! | keys in memory, from a keyset file or an environment variable | [`InMemoryKeyring`] |
//! | keys in MongoDB, wrapped by a master key (feature `mongodb`) | `mongo::KeyVault` |
//! | a collection that encrypts, decrypts and rewrites queries (feature `mongodb`) | `mongo::EncryptedCollection` |
//! | bulk work, the hot path | [`Cryptor::encrypt_raw`], [`Cryptor::decrypt_raw`], [`Cryptor::encrypt_many`], [`Cryptor::decrypt_many`] |
//! | equality queries | [`Field::deterministic`] + [`Cryptor::query_ciphertexts`], or [`BlindIndex`] + [`Cryptor::blind_index_values`] |
//! | MongoDB CSFLE data | 96-byte keys ([`KeyKind::Csfle`]) in any keyring; [`CsfleKeySet`], [`LocalMasterKey`] |
//! | MongoDB Queryable Encryption data | the same keys; [`QeValueKind`], [`CsfleDataKey::encrypt_qe_unindexed`] (docs/QE.md) |
//! | online rotation, migration, audit (feature `mongodb`) | `rotation::Rotator`, `rotation::Audit` |
//!
//! # Data path
//!
//! ```text
//!  document ──▶ Schema (which paths, which suite, which alias)
//!           ──▶ Keyring::primary(alias) ──▶ Key (cached cipher states, usage counter)
//!           ──▶ envelope: header ‖ nonce ‖ AEAD(value bytes, AD = header ‖ path ‖ ns ‖ _id ‖ owner)
//!           ──▶ BSON Binary subtype 0x8F ──▶ MongoDB
//!  reading: every subtype-0x8F (and CSFLE / QE subtype-6) value ──▶ Keyring::key(id in header) ──▶ value
//! ```
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use bson::doc;
//! use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Schema};
//!
//! let keys = Arc::new(InMemoryKeyring::new());
//! keys.generate("pii");
//! let schema = Schema::builder()
//!     .field("ssn", Field::randomized("pii"))
//!     .field("email", Field::deterministic("pii"))
//!     .build()?;
//! let cryptor = Cryptor::new(keys.clone(), schema);
//! let ctx = Context::namespace("app.users");
//!
//! let stored = cryptor.encrypt_document(&doc! { "ssn": "123-45-6789", "email": "a@b.c" }, &ctx)?;
//! assert!(stored.get_binary_generic("ssn").is_err()); // a Binary of subtype 0x8F, not the string
//! keys.rotate("pii"); // new writes use a new key; existing data still decrypts
//! assert_eq!(cryptor.decrypt_document(&stored, &ctx)?.get_str("ssn").unwrap(), "123-45-6789");
//! # Ok::<(), fieldcrypt::Error>(())
//! ```
//!
//! See `SECURITY.md` for the threat model, `docs/FORMAT.md` for the ciphertext format and
//! `docs/ARCHITECTURE.md` for the layout of the code (this crate, the CLI in `cli/`, the test
//! kit in `testkit/`).
#![forbid(unsafe_code)]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]
// Errors are built lazily (`ok_or_else`) wherever a lookup runs per value: `ok_or(Error::…)`
// builds and drops an `Error` on every success (its drop glue is not optimized away), which
// measured +3% instructions on bulk decryption. The lint asks for the eager form.
#![allow(clippy::unnecessary_lazy_evaluations)]

mod blind_index;
mod cache_line;
mod csfle;
mod envelope;
mod error;
mod key;
mod keyring;
#[cfg(feature = "kms")]
pub mod kms;
#[cfg(feature = "mongodb")]
pub mod mongo;
mod qe;
mod rawbson;
#[cfg(feature = "mongodb")]
pub mod rotation;
mod schema;
mod suite;
mod transform;

pub use blind_index::BLIND_INDEX_SUBTYPE;
pub use csfle::{CsfleAlgorithm, CsfleDataKey, CsfleKeyDocument, CsfleKeySet, LocalMasterKey};
pub use envelope::{ENVELOPE_SUBTYPE, FORMAT_VERSION};
pub use error::{ArgumentError, CommandError, Error, Result};
#[cfg(feature = "mongodb")]
pub use error::{KeyVaultError, MongoError};
/// `#[derive(Encrypted)]`: a schema from a serde type's field marks (docs/SCHEMA.md).
#[cfg(feature = "derive")]
pub use fieldcrypt_derive::Encrypted;
pub use key::{Key, KeyId, KeyKind, KeyMaterial, KeyState, CSFLE_KEY_LEN, FIELDCRYPT_KEY_LEN};
pub use keyring::{InMemoryKeyring, Keyring};
pub use qe::{QeValueKind, SAFE_CONTENT_FIELD};
#[doc(hidden)]
pub use schema::__derive;
pub use schema::{
    BlindIndex, Encrypted, Encryption, Field, FieldRule, Schema, SchemaBuilder, SchemaFields,
};
pub use suite::{Suite, RANDOM_NONCE_LIMIT};
pub use transform::{Context, Cryptor, CSFLE_SUBTYPE, PARALLEL_THRESHOLD};
