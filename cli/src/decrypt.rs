//! `fieldcrypt decrypt`: decrypts Extended JSON documents — fieldcrypt envelopes and MongoDB
//! CSFLE values alike — offline.

use std::path::PathBuf;

use bson::RawDocumentBuf;
use fieldcrypt::rotation::references;
use fieldcrypt::{Cryptor, Error, KeyId, Result, Schema};

use crate::encrypt::{context, load_schema, BATCH};
use crate::jsonl::{IoArgs, Reader, Writer};
use crate::keysource::{KeyArgs, Keys};
use crate::report::Exit;

#[derive(clap::Args, Debug)]
pub(crate) struct DecryptArgs {
    /// The collection (`db.collection`) the ciphertexts are bound to, if they are.
    #[arg(long, value_name = "DB.COLL")]
    namespace: Option<String>,
    /// The schema, for its owner field (owner-scoped collections); not needed otherwise.
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// The owner field of owner-scoped documents (instead of --schema).
    #[arg(long, value_name = "FIELD")]
    owner_field: Option<String>,
    #[command(flatten)]
    io: IoArgs,
    #[command(flatten)]
    keys: KeyArgs,
}

/// An error decrypting document `n`, with what to do about a binding the ciphertext lacks:
/// since the core refuses ciphertexts bound more loosely than the context they are read in, a
/// value written without a namespace does not decrypt with one. `namespace_hint` says how to
/// read without a namespace in this command.
pub(crate) fn document_error(n: u64, e: Error, namespace_hint: &str) -> Error {
    match e {
        Error::UnboundCiphertext {
            path,
            missing: "namespace",
        } => Error::Config(format!(
            "document {n}: the ciphertext at {path:?} is not bound to a namespace (it was encrypted without one, e.g. by `fieldcrypt encrypt` without --namespace, or moved here from elsewhere) and is refused when a namespace is given; if it was encrypted without one, {namespace_hint}"
        )),
        Error::UnboundCiphertext { path, missing } => Error::Config(format!(
            "document {n}: the ciphertext at {path:?} is not bound to the {missing} its schema requires (written without that binding, or moved here from elsewhere): refused"
        )),
        other => Error::Config(format!("document {n}: {other}")),
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

pub(crate) async fn run(a: DecryptArgs) -> Result<Exit> {
    let schema = match &a.schema {
        Some(p) => load_schema(p)?,
        None => Schema::empty(),
    };
    let keys = Keys::open(&a.keys).await?;
    let mut ctx = context(a.namespace.as_deref());
    if let Some(f) = &a.owner_field {
        ctx = ctx.with_owner_field(f.clone());
    }
    let cryptor = Cryptor::new(keys.source.clone(), schema);
    let mut reader = Reader::open(a.io.input.input.as_deref())?;
    let mut writer = Writer::create(&a.io.output, true)?;
    let mut first_line = 1;
    loop {
        let batch = reader.batch(BATCH)?;
        if batch.is_empty() {
            break;
        }
        keys.source.prefetch_ids(&referenced(&batch)?).await?;
        for (i, r) in cryptor.decrypt_many(&batch, &ctx).into_iter().enumerate() {
            let doc = r.map_err(|e| {
                document_error((first_line + i) as u64, e, "decrypt it without --namespace")
            })?;
            writer.write(&doc)?;
        }
        first_line += batch.len();
    }
    writer.finish()?;
    Ok(Exit::Ok)
}
