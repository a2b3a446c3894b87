//! Helpers the data commands share: schema loading, the context for a namespace option,
//! namespaces, batch size, and the errors that name a document. Subcommand files import from
//! here, never from each other.

use std::path::Path;

use bson::RawDocumentBuf;
use fieldcrypt::rotation::{references, Target};
use fieldcrypt::{Context, Cryptor, Error, KeyId, Schema};
use mongodb::{Client, Collection};

use crate::error::{CliError, Result};
use crate::jsonl::{wipe, wipe_results, Writer};
use crate::keysource::{in_file, KeyArgs, Keys, NonceArgs};

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

/// The collection `db.collection` of `client`, as raw documents.
pub(crate) fn raw_collection(client: &Client, ns: &str) -> Result<Collection<RawDocumentBuf>> {
    let (db, coll) = split_namespace(ns)?;
    Ok(client.database(db).collection::<RawDocumentBuf>(coll))
}

/// A rotation or audit target for `c`; with `no_namespace_binding`, values are read and
/// written without binding them to the namespace.
pub(crate) fn target(
    c: &Collection<RawDocumentBuf>,
    schema: &std::sync::Arc<Schema>,
    no_namespace_binding: bool,
) -> Target {
    let t = Target::new(c, schema.clone());
    if no_namespace_binding {
        t.context(Context::none())
    } else {
        t
    }
}

/// The keys an encrypting command uses: opened, with its nonce options, every alias of the
/// schema loaded and checked, and watched for keys destroyed while it runs; the cryptor; and
/// the aliases (prefetched again before each batch).
pub(crate) async fn encrypting(
    keys: &KeyArgs,
    nonces: &NonceArgs,
    schema: Schema,
) -> Result<(Keys, Cryptor, Vec<String>)> {
    let keys = Keys::open(keys).await?.with_nonce_args(nonces);
    let aliases: Vec<String> = schema.aliases().into_iter().map(str::to_owned).collect();
    keys.source.prefetch_aliases(&aliases).await?;
    schema.check_keys(keys.source.as_ref())?;
    keys.watch_aliases(&aliases);
    let cryptor = Cryptor::new(keys.source.clone(), schema);
    Ok((keys, cryptor, aliases))
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

/// Writes a batch's decrypted documents in order, wiping each once written. At the first
/// failure (a document that does not decrypt, named by `place(i)`, or a write error) the rest of
/// the batch's plaintexts are wiped too, not just freed.
pub(crate) fn write_decrypted(
    writer: &mut Writer,
    results: Vec<fieldcrypt::Result<RawDocumentBuf>>,
    place: impl Fn(usize) -> String,
    namespace_hint: &str,
) -> Result<()> {
    let mut results = results.into_iter().enumerate();
    while let Some((i, r)) = results.next() {
        let written = r
            .map_err(|e| document_error(&place(i), e, namespace_hint))
            .and_then(|doc| {
                let w = writer.write(&doc);
                wipe(vec![doc]);
                w
            });
        if let Err(e) = written {
            wipe_results(results.map(|(_, r)| r));
            return Err(e);
        }
    }
    Ok(())
}

/// Loads the keys a batch of documents to decrypt needs from the key source: the ids its values
/// name, then the inner keys of its indexed Queryable Encryption values, which only the outer
/// keys reveal. Read leniently: a malformed value is reported by decryption, naming its
/// document.
pub(crate) async fn prefetch(
    keys: &Keys,
    cryptor: &Cryptor,
    batch: &[RawDocumentBuf],
) -> Result<()> {
    let mut ids = Vec::new();
    let mut qe_indexed = false;
    for d in batch {
        let r = references(d);
        ids.extend(r.keys);
        qe_indexed |= r.qe_indexed;
    }
    ids.sort_unstable();
    ids.dedup();
    keys.source.prefetch_ids(&ids).await?;
    if qe_indexed {
        let mut inner: Vec<KeyId> = batch
            .iter()
            .flat_map(|d| cryptor.qe_client_keys(d).unwrap_or_default())
            .filter(|id| ids.binary_search(id).is_err())
            .collect();
        if !inner.is_empty() {
            inner.sort_unstable();
            inner.dedup();
            keys.source.prefetch_ids(&inner).await?;
        }
    }
    Ok(())
}
