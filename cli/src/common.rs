//! Helpers the data commands share: schema loading, the context for a namespace option,
//! namespaces, batch size, and the errors that name a document. Subcommand files import from
//! here, never from each other.

use std::path::Path;

use bson::RawDocumentBuf;
use fieldcrypt::rotation::references;
use fieldcrypt::{Context, Error, KeyId, Schema};

use crate::error::{CliError, Result};
use crate::keysource::in_file;

/// Documents per batch (encrypted or decrypted in parallel).
pub(crate) const BATCH: usize = 1000;

/// Loads a schema file, naming the file in errors.
pub(crate) fn load_schema(path: &Path) -> Result<Schema> {
    Schema::load(path).map_err(|e| match e {
        Error::Schema { path: p, reason } => {
            CliError::Usage(format!("{}: field {p:?}: {reason}", path.display()))
        }
        other => in_file(path, other),
    })
}

/// The context for a namespace option.
pub(crate) fn context(namespace: Option<&str>) -> Context {
    namespace.map_or_else(Context::none, Context::namespace)
}

/// `db.collection` → (`db`, `collection`).
pub(crate) fn split_namespace(ns: &str) -> Result<(&str, &str)> {
    ns.split_once('.')
        .filter(|(d, c)| !d.is_empty() && !c.is_empty())
        .ok_or_else(|| CliError::Usage(format!("namespace {ns:?} is not \"database.collection\"")))
}

/// An error decrypting the document at `place` (`line N`, `document N`), with what to do about a binding the ciphertext lacks:
/// since the core refuses ciphertexts bound more loosely than the context they are read in, a
/// value written without a namespace does not decrypt with one. `namespace_hint` says how to
/// read without a namespace in this command.
pub(crate) fn document_error(place: &str, e: Error, namespace_hint: &str) -> CliError {
    match e {
        Error::UnboundCiphertext {
            path,
            missing: "namespace",
        } => CliError::Usage(format!(
            "{place}: the ciphertext at {path:?} is not bound to a namespace (it was encrypted without one, e.g. by `fieldcrypt encrypt` without --namespace, or moved here from elsewhere) and is refused when a namespace is given; if it was encrypted without one, {namespace_hint}"
        )),
        Error::UnboundCiphertext { path, missing } => CliError::Usage(format!(
            "{place}: the ciphertext at {path:?} is not bound to the {missing} its schema requires (written without that binding, or moved here from elsewhere): refused"
        )),
        other => CliError::Usage(format!("{place}: {other}")),
    }
}

/// Key ids referenced by a batch, for key-vault prefetching. Read leniently: a malformed value
/// is reported by decryption, naming its document.
pub(crate) fn referenced(batch: &[RawDocumentBuf]) -> Result<Vec<KeyId>> {
    let mut ids = Vec::new();
    for d in batch {
        ids.extend(references(d).keys);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}
