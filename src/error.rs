//! The error type.
//!
//! One `#[non_exhaustive]` enum a caller can match. Two rules hold for every variant:
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

    /// Invalid configuration or argument.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// An I/O error (reading a keyset or schema file, for instance).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// An error from the MongoDB driver. Its message keeps the error's kind, code and server
    /// message but drops the details a server may attach (a validation failure's `errInfo`
    /// quotes the rejected document); the driver's own error is kept as the source.
    #[cfg(feature = "mongodb")]
    #[error("MongoDB error: {}", redacted_mongo(.0))]
    Mongo(#[source] Box<mongodb::error::Error>),
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
            w.message
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!(
                "write concern error {} ({}): {}",
                w.code, w.code_name, w.message
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
                    w.message
                ),
                None => "bulk insert failed (write concern)".to_owned(),
            }
        }
        ErrorKind::Command(c) => {
            format!("command error {} ({}): {}", c.code, c.code_name, c.message)
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

#[cfg(feature = "mongodb")]
impl From<Box<mongodb::error::Error>> for Error {
    fn from(e: Box<mongodb::error::Error>) -> Self {
        Error::Mongo(e)
    }
}

#[cfg(feature = "mongodb")]
impl From<mongodb::error::Error> for Error {
    fn from(e: mongodb::error::Error) -> Self {
        Error::Mongo(Box::new(e))
    }
}
