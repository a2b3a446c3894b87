//! `fieldcrypt import`: inserts Extended JSON documents into a collection, encrypting per the
//! schema on the way in (ciphertexts bound to the collection, as the collection layer binds
//! them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use bson::RawDocumentBuf;
use fieldcrypt::{Context, Cryptor, Error, Result};
use serde_json::json;

use crate::common::{load_schema, split_namespace};
use crate::jsonl::{InArgs, Reader};
use crate::keysource::{connect, KeyArgs, Keys};
use crate::report::{self, Exit, OutputOpts, Progress};

#[derive(clap::Args, Debug)]
pub(crate) struct ImportArgs {
    /// The schema (docs/SCHEMA.md).
    #[arg(long, value_name = "FILE")]
    schema: PathBuf,
    /// The collection, `db.collection`.
    #[arg(long, value_name = "DB.COLL")]
    namespace: String,
    /// Documents per insert.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    #[command(flatten)]
    io: InArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    out: OutputOpts,
}

pub(crate) async fn run(a: ImportArgs) -> Result<Exit> {
    if a.batch == 0 {
        return Err(Error::Config("--batch must be at least 1".into()));
    }
    let schema = load_schema(&a.schema)?;
    let (db, coll) = split_namespace(&a.namespace)?;
    let keys = Keys::open(&a.keys).await?;
    let aliases: Vec<String> = schema.aliases().into_iter().map(str::to_owned).collect();
    keys.source.prefetch_aliases(&aliases).await?;
    schema.check_keys(keys.source.as_ref())?;
    let cryptor = Cryptor::new(keys.source.clone(), schema);
    let ctx = Context::namespace(a.namespace.clone());
    let client = connect(a.keys.data_uri()?).await?;
    let collection = client.database(db).collection::<RawDocumentBuf>(coll);
    let stop = report::interrupt_flag();
    let mut reader = Reader::open(a.io.input.as_deref())?;
    let mut progress = Progress::new(&a.out, &format!("import {}", a.namespace), None);
    let mut inserted = 0u64;
    let started = std::time::Instant::now();
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let batch = reader.batch(a.batch)?;
        if batch.is_empty() {
            break;
        }
        // Refreshes a key vault's cache and usage lease (no-op for files).
        keys.source.prefetch_aliases(&aliases).await?;
        let mut sealed = Vec::with_capacity(batch.len());
        for (i, r) in cryptor.encrypt_many(&batch, &ctx).into_iter().enumerate() {
            sealed.push(r.map_err(|e| {
                Error::Config(format!("document {}: {e}", inserted + i as u64 + 1))
            })?);
        }
        drop(batch);
        let n = sealed.len() as u64;
        collection.insert_many(sealed).await?;
        inserted += n;
        progress.update(inserted, None, "inserted", json!({ "inserted": inserted }));
    }
    progress.finish();
    keys.persist_counters()?;
    let secs = started.elapsed().as_secs_f64();
    if a.out.json {
        println!(
            "{}",
            json!({ "namespace": a.namespace, "inserted": inserted, "lines": reader.line(), "seconds": report::round(secs), "complete": !interrupted })
        );
    } else if !a.out.quiet {
        println!(
            "imported {inserted} document(s) into {} in {secs:.1} s",
            a.namespace
        );
    }
    if interrupted {
        report::warn(&format!(
            "interrupted after {inserted} document(s); the rest of the input was not imported"
        ));
        return Ok(Exit::Interrupted);
    }
    Ok(Exit::Ok)
}
