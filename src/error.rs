//! The error type.
//!
//! One `#[non_exhaustive]` enum a caller can match, with typed sub-enums where one area has
//! several ways to fail (as rustls's `CertificateError`): [`ArgumentError`] for refused
//! arguments and names, [`CommandError`] for malformed queries, updates and pipelines,
//! `KeyVaultError` for a key vault fieldcrypt cannot work with. Two rules hold for every variant:
//!
//! - Failed authentication is a single opaque variant, [`Error::Decrypt`]: it never says which
//!   byte, which check or how much of the plaintext was recovered.
//! - No message carries plaintext or key bytes. Variants name key ids, aliases, field paths and
//!   operators — never values.

use crate::key::id::KeyId;

/// Result alias used throughout fieldcrypt.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in fieldcrypt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A ciphertext failed authentication: wrong key, a value moved to another field,
    /// collection, document or owner, or tampering. Deliberately says nothing more.
    #[error("decryption failed: the ciphertext did not authenticate (wrong key, moved value, or tampering)")]
    Decrypt,

    /// A ciphertext lacks a binding its context requires (e.g. a value without a namespace
    /// binding read through a collection): it may have been moved here from elsewhere.
    #[error("ciphertext at {path:?} is not bound to the {missing} it is read under (written without it, or moved here)")]
    UnboundCiphertext {
        /// Where the value was found.
        path: String,
        /// The binding it lacks: `namespace`, `owner` or `_id`.
        missing: &'static str,
    },

    /// The bytes are not a well-formed ciphertext envelope (or CSFLE payload).
    #[error("malformed ciphertext: {0}")]
    MalformedCiphertext(&'static str),

    /// A document is not well-formed BSON.
    #[error("malformed BSON: {0}")]
    MalformedBson(String),

    /// No key with this id is known to the keyring.
    #[error("unknown key id {0}")]
    UnknownKey(KeyId),

    /// No key has this alias (name).
    #[error("unknown key alias {0:?}")]
    UnknownAlias(String),

    /// The alias exists but has no primary key to encrypt with.
    #[error("key alias {0:?} has no primary key")]
    NoPrimaryKey(String),

    /// The key is disabled: it refuses encryption and decryption until enabled again.
    #[error("key {0} is disabled")]
    KeyDisabled(KeyId),

    /// The key was destroyed: its material is gone and data under it is unreadable.
    #[error("key {0} is destroyed")]
    KeyDestroyed(KeyId),

    /// The key is not of the kind this operation needs (e.g. a CSFLE data key used for a
    /// fieldcrypt suite).
    #[error("key {id} cannot be used here: {reason}")]
    KeyMisuse {
        /// The key.
        id: KeyId,
        /// Why it cannot be used.
        reason: &'static str,
    },

    /// A key has reached the safe number of encryptions for its suite's random nonces.
    #[error("key {key} has reached its limit of {limit} encryptions with random nonces; rotate it (create a new primary for its alias)")]
    KeyUsageLimit {
        /// The worn-out key.
        key: KeyId,
        /// The limit that was reached.
        limit: u64,
    },

    /// The schema is invalid; names the offending path.
    #[error("schema error at {path:?}: {reason}")]
    Schema {
        /// The field path the problem is about.
        path: String,
        /// What is wrong.
        reason: String,
    },

    /// A query or update uses an operator that cannot work on an encrypted field.
    #[error("unsupported operation {operator} on encrypted field {field:?}: {reason}")]
    UnsupportedQuery {
        /// The operator (e.g. `$gt`, `$regex`, `sort`).
        operator: String,
        /// The encrypted field it was applied to.
        field: String,
        /// Why it cannot work.
        reason: &'static str,
    },

    /// A BSON type that the chosen algorithm does not accept (CSFLE rules).
    #[error("BSON type {type_name} cannot be encrypted with {algorithm}")]
    UnsupportedType {
        /// The BSON type's name.
        type_name: &'static str,
        /// The algorithm that refuses it.
        algorithm: &'static str,
    },

    /// Decryption needs context the caller did not supply (e.g. the namespace a value is bound to).
    #[error("missing context: {0}")]
    MissingContext(&'static str),

    /// A keyset file, key document or master key is malformed. Never includes key bytes.
    #[error("invalid key data: {0}")]
    KeyFormat(String),

    /// An argument, option, name or identifier that fieldcrypt refuses. Names what was refused,
    /// never a secret.
    #[error("invalid configuration: {0}")]
    InvalidArgument(#[from] ArgumentError),

    /// A query, update or pipeline that is not well-formed (the server would refuse it too).
    #[error("invalid configuration: {0}")]
    InvalidCommand(#[from] CommandError),

    /// A schema file that does not parse (its rules are checked by [`Error::Schema`]).
    #[error("invalid configuration: schema {format}: {message}")]
    SchemaSyntax {
        /// `TOML` or `JSON`.
        format: &'static str,
        /// The parser's message (it names lines and columns, not the file's content).
        message: String,
    },

    /// A value, path or binding longer than the format can hold.
    #[error("{0} too long for the format")]
    TooLong(&'static str),

    /// A task on the blocking thread pool (bulk encryption or decryption) panicked or was
    /// cancelled.
    #[error("{0} task failed (panicked or was cancelled)")]
    TaskFailed(&'static str),

    /// The key vault is not in a state fieldcrypt can work with.
    #[cfg(feature = "mongodb")]
    #[error("{0}")]
    KeyVault(#[from] KeyVaultError),

    /// A key management service (a master key's provider) refused a request or could not be
    /// reached. Names the provider and what failed, never a key, credential or token.
    #[error("KMS {provider}: {reason}")]
    Kms {
        /// The provider (`aws`, `aws:prod`, `local`, …).
        provider: String,
        /// What failed.
        reason: String,
    },

    /// An I/O error (reading a keyset or schema file, for instance).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// An error from the MongoDB driver, shown (Display and Debug alike) without the details
    /// a server may attach; see [`MongoError`].
    #[cfg(feature = "mongodb")]
    #[error("MongoDB error: {0}")]
    Mongo(MongoError),
}

/// What [`Error::InvalidArgument`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgumentError {
    /// Not the name of a [`Suite`](crate::Suite).
    #[error("unknown suite {0:?} (expected one of AES-256-GCM, ChaCha20-Poly1305, XChaCha20-Poly1305, AES-256-SIV-deterministic)")]
    UnknownSuite(String),
    /// Not the name of a [`CsfleAlgorithm`](crate::CsfleAlgorithm).
    #[error("unknown CSFLE algorithm {0:?}")]
    UnknownCsfleAlgorithm(String),
    /// A key id that is not a UUID.
    #[error("not a UUID: {0:?}")]
    NotAUuid(String),
    /// A key alias that is empty or holds a NUL.
    #[error("invalid key alias {0:?}")]
    KeyAlias(String),
    /// A local KMS provider name with characters other than ASCII letters, digits and `_`.
    #[error("local KMS provider name {0:?} must be ASCII letters, digits and '_'")]
    KmsProviderName(String),
    /// An environment variable that must be set is not.
    #[error("environment variable {0} is not set")]
    MissingEnvVar(String),
    /// A partition `i/N` whose index is not below its count.
    #[error("partition {index}/{count}: the index must be below the count (0-based)")]
    PartitionOutOfRange {
        /// The 0-based index.
        index: u32,
        /// The number of partitions.
        count: u32,
    },
    /// A partition that is not `all` or `i/N`.
    #[error("partition {0:?}: expected i/N, e.g. 0/4")]
    PartitionSyntax(String),
    /// A tenant name that is empty or holds `/` or NUL.
    #[error("a tenant name must be non-empty and contain no '/' or NUL")]
    TenantName,
    /// Per-tenant keys with an owner value of another type than string, ObjectId or integer.
    #[error("per-tenant keys need an owner value that is a string, an ObjectId or an integer")]
    TenantOwnerType,
    /// An owner scope asked of a schema without an owner field.
    #[error("scoped() needs a schema with an owner field (SchemaBuilder::owner_field)")]
    NoOwnerField,
    /// A key vault namespace that is not `database.collection`.
    #[error("key vault namespace {0:?} is not \"database.collection\"")]
    KeyVaultNamespace(String),
    /// A zero key vault cache TTL, cache capacity or usage lease.
    #[error("key vault cache TTL, cache capacity and usage lease must be positive")]
    KeyVaultLimits,
    /// A rotation rate limit that is zero, negative or not a number.
    #[error("rate limit must be a positive number")]
    RateLimit,
    /// A rotation batch size outside 1..=100000.
    #[error("batch size must be between 1 and 100000")]
    BatchSize,
    /// A rotation job name that is empty or holds `|`.
    #[error("job name must be non-empty, without '|'")]
    JobName,
    /// A schema file whose name ends in neither `.toml` nor `.json`.
    #[error("schema file {0} must end in .toml or .json")]
    SchemaFileName(String),
}

/// What [`Error::InvalidCommand`] refused: the operator or stage, and what it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// An operator given the wrong kind of argument (`$and` without an array of filters,
    /// `$set` without a document, …).
    #[error("{operator} needs {expected}")]
    Operand {
        /// The operator or stage (`$and`, `$set`, `$facet`, …).
        operator: String,
        /// What it needs (`an array of filters`, `a document`, …).
        expected: &'static str,
    },
    /// A pipeline stage that is not a document with exactly one field.
    #[error("a pipeline stage must be a document with exactly one field")]
    Stage,
    /// An update document with a field that is not an update operator.
    #[error("an update document must consist of update operators; use replace_one to replace a document")]
    NotAnUpdate,
    /// A kind of update the driver has and fieldcrypt does not rewrite.
    #[error("unsupported kind of update")]
    UpdateKind,
}

/// What [`Error::KeyVault`] found.
#[cfg(feature = "mongodb")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyVaultError {
    /// An index on `keyAltNames` exists but is not unique, so aliases could be duplicated.
    #[error("key vault {namespace}: the index on keyAltNames is not unique")]
    IndexNotUnique {
        /// The key vault's namespace.
        namespace: String,
    },
    /// Writers kept racing on one alias or key; nothing was changed.
    #[error("could not {what}: lost {attempts} races with other writers")]
    LostRaces {
        /// What was tried (`create a key for "pii"`, `promote key …`).
        what: String,
        /// How many attempts were made.
        attempts: usize,
    },
    /// A key (or one of its alternate names) that is already in the key vault.
    #[error("key {0} or one of its keyAltNames is already in the key vault")]
    AlreadyPresent(KeyId),
}

impl Error {
    pub(crate) fn schema(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Schema {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn bson(e: impl core::fmt::Display) -> Self {
        // bson's raw errors name keys and byte offsets, never values.
        Error::MalformedBson(e.to_string())
    }
}

impl From<bson::raw::Error> for Error {
    fn from(e: bson::raw::Error) -> Self {
        // A `MalformedValue` message can quote a value (serializing a regex that holds a NUL
        // puts the pattern in it): keep the key, drop the message.
        let at = e
            .key()
            .map(|k| format!(" at key {k:?}"))
            .unwrap_or_default();
        match &e.kind {
            bson::raw::ErrorKind::Utf8EncodingError(u) => {
                Error::MalformedBson(format!("invalid UTF-8{at}: {u}"))
            }
            _ => Error::MalformedBson(format!("malformed value{at}")),
        }
    }
}

/// A driver error's message without the parts that can quote documents.
#[cfg(feature = "mongodb")]
fn redacted_mongo(e: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    let labels = e.labels();
    let labels = if labels.is_empty() {
        String::new()
    } else {
        let mut l: Vec<&str> = labels.iter().map(String::as_str).collect();
        l.sort_unstable();
        format!(" [labels: {}]", l.join(", "))
    };
    let text = match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!(
            "write error {} ({}): {}",
            w.code,
            w.code_name.as_deref().unwrap_or("?"),
            server_message(&w.message)
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!(
                "write concern error {} ({}): {}",
                w.code,
                w.code_name,
                server_message(&w.message)
            )
        }
        ErrorKind::InsertMany(m) => {
            let errs = m.write_errors.as_deref().unwrap_or_default();
            match errs.first() {
                Some(w) => format!(
                    "{} write error(s) in a bulk insert; first at index {}: {} ({}): {}",
                    errs.len(),
                    w.index,
                    w.code,
                    w.code_name.as_deref().unwrap_or("?"),
                    server_message(&w.message)
                ),
                None => "bulk insert failed (write concern)".to_owned(),
            }
        }
        ErrorKind::Command(c) => {
            format!(
                "command error {} ({}): {}",
                c.code,
                c.code_name,
                server_message(&c.message)
            )
        }
        // serde messages can quote the values they failed on.
        ErrorKind::BsonDeserialization(_) | ErrorKind::BsonSerialization(_) => {
            "BSON (de)serialization failed".to_owned()
        }
        ErrorKind::BulkWrite(_) => "bulk write failed".to_owned(),
        // Connection, selection, authentication and similar errors carry no document data.
        _ => e.to_string(),
    };
    format!("{text}{labels}")
}

/// A server's error message without the values it quotes: a duplicate-key error (E11000) ends
/// with `dup key: { _id: "alice@example.com" }`, the indexed values of the rejected document.
#[cfg(feature = "mongodb")]
fn server_message(message: &str) -> std::borrow::Cow<'_, str> {
    match message.find("dup key:") {
        Some(at) => format!("{}dup key: {{ [REDACTED] }}", &message[..at]).into(),
        None => message.into(),
    }
}

/// A MongoDB driver error that prints only what cannot quote a document: its kind, code and
/// server message, without the details a server may attach (a validation failure's `errInfo`
/// quotes the rejected document, a duplicate-key error the indexed values). The driver's
/// own `Debug` and `Display` print those, so this type is not an error source and prints
/// the redacted text in `Debug` too; [`MongoError::inner`] gives the driver's error to code
/// that inspects it (codes, labels) and is responsible for not printing it.
#[cfg(feature = "mongodb")]
pub struct MongoError(Box<mongodb::error::Error>);

#[cfg(feature = "mongodb")]
impl MongoError {
    /// The driver's error. Its `Debug` and `Display` can quote document values.
    #[must_use]
    pub fn inner(&self) -> &mongodb::error::Error {
        &self.0
    }
}

#[cfg(feature = "mongodb")]
impl core::fmt::Display for MongoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&redacted_mongo(&self.0))
    }
}

#[cfg(feature = "mongodb")]
impl core::fmt::Debug for MongoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("MongoError")
            .field(&format_args!("{}", redacted_mongo(&self.0)))
            .finish()
    }
}

#[cfg(feature = "mongodb")]
impl From<Box<mongodb::error::Error>> for Error {
    fn from(e: Box<mongodb::error::Error>) -> Self {
        Error::Mongo(MongoError(e))
    }
}

#[cfg(feature = "mongodb")]
impl From<mongodb::error::Error> for Error {
    fn from(e: mongodb::error::Error) -> Self {
        Error::Mongo(MongoError(Box::new(e)))
    }
}
