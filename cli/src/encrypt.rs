//! `fieldcrypt encrypt`: encrypts Extended JSON documents per a schema, offline.

use std::path::PathBuf;

use crate::common::{context, encrypting, load_schema, BATCH};
use crate::error::{CliError, Result};
use crate::jsonl::{check_size, wipe, IoArgs};
use crate::keysource::{KeyArgs, NonceArgs};
use crate::report::Exit;

#[derive(clap::Args, Debug)]
pub(crate) struct EncryptArgs {
    /// The schema: which fields to encrypt, how (docs/SCHEMA.md; .toml or .json).
    #[arg(long, value_name = "FILE")]
    schema: PathBuf,
    /// Bind the ciphertexts to this collection (`db.collection`), as the collection layer and
    /// `import` do; they then decrypt only with the same --namespace.
    #[arg(long, value_name = "DB.COLL")]
    namespace: Option<String>,
    #[command(flatten)]
    io: IoArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    nonces: NonceArgs,
    /// Print nothing but the documents and errors (this command prints nothing else anyway;
    /// accepted, as by every command).
    #[arg(long, short)]
    quiet: bool,
}

pub(crate) async fn run(a: EncryptArgs) -> Result<Exit> {
    let schema = load_schema(&a.schema)?;
    let (keys, cryptor, aliases) = encrypting(&a.keys, &a.nonces, schema).await?;
    let ctx = context(a.namespace.as_deref());
    let (mut reader, mut writer) = a.io.open(false)?;
    loop {
        let batch = reader.batch(BATCH)?;
        if batch.is_empty() {
            break;
        }
        // Refreshes a key vault's cache and usage lease (no-op for files).
        keys.source.prefetch_aliases(&aliases).await?;
        let results = cryptor.encrypt_many(&batch, &ctx);
        // The input's plaintext: wiped, not just freed (before any error returns).
        wipe(batch);
        let mut sealed = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            let line = reader.line_of(i);
            let doc = r.map_err(|e| CliError::input(line, format!("{e}")))?;
            check_size(&doc, line, "the encrypted document")?;
            sealed.push(doc);
        }
        // Nothing leaves the process before its random nonces are recorded.
        keys.reserve_used()?;
        for doc in &sealed {
            writer.write(doc)?;
        }
    }
    // The last batch may have been written while a key was destroyed: the --out file then
    // never appears. (A destroy after this check still fails the run, in persist_counters.)
    keys.check_not_destroyed()?;
    writer.finish()?;
    keys.persist_counters()?;
    Ok(Exit::Ok)
}
