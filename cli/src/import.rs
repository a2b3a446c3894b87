//! `fieldcrypt import`: inserts Extended JSON documents into a collection, encrypting per the
//! schema on the way in (ciphertexts bound to the collection, as the collection layer binds
//! them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use bson::RawDocumentBuf;
use fieldcrypt::{Context, Cryptor};
use serde_json::json;

use crate::common::{load_schema, split_namespace};
use crate::error::{CliError, Result};
use crate::jsonl::{check_size, wipe, InArgs, Reader};
use crate::keysource::{connect, KeyArgs, Keys, NonceArgs};
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
    /// Skip the first N documents of the input (blank lines do not count): to resume an
    /// import that stopped, with the number it printed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    skip: u64,
    #[command(flatten)]
    io: InArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    nonces: NonceArgs,
    #[command(flatten)]
    out: OutputOpts,
}

pub(crate) async fn run(a: ImportArgs) -> Result<Exit> {
    if a.batch == 0 {
        return Err(CliError::Usage("--batch must be at least 1".into()));
    }
    let schema = load_schema(&a.schema)?;
    let (db, coll) = split_namespace(&a.namespace)?;
    let keys = Keys::open(&a.keys).await?.with_nonce_args(&a.nonces);
    let aliases: Vec<String> = schema.aliases().into_iter().map(str::to_owned).collect();
    keys.source.prefetch_aliases(&aliases).await?;
    schema.check_keys(keys.source.as_ref())?;
    keys.watch_aliases(&aliases);
    let cryptor = Cryptor::new(keys.source.clone(), schema);
    let ctx = Context::namespace(a.namespace.clone());
    let client = connect(&a.keys.data_uri()?).await?;
    let collection = client.database(db).collection::<RawDocumentBuf>(coll);
    let stop = report::interrupt_flag();
    let mut reader = Reader::open(a.io.input.as_deref())?;
    let mut progress = Progress::new(&a.out, &format!("import {}", a.namespace), None);
    let mut inserted = 0u64;
    let mut skipped = 0u64;
    let started = std::time::Instant::now();
    let mut interrupted = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let mut batch = reader
            .batch(a.batch)
            .map_err(|e| stopped(e, a.skip + inserted))?;
        if batch.is_empty() {
            break;
        }
        let first = usize::try_from(a.skip - skipped)
            .unwrap_or(usize::MAX)
            .min(batch.len());
        if first > 0 {
            wipe(batch.drain(..first).collect());
            skipped += first as u64;
            if batch.is_empty() {
                continue;
            }
        }
        // Refreshes a key vault's cache and usage lease (no-op for files).
        keys.source.prefetch_aliases(&aliases).await?;
        let results = cryptor.encrypt_many(&batch, &ctx);
        let n = batch.len() as u64;
        // The input's plaintext: wiped, not just freed.
        wipe(batch);
        let mut sealed = Vec::with_capacity(results.len());
        for (i, r) in results.into_iter().enumerate() {
            let line = reader.line_of(first + i);
            let doc = r
                .map_err(|e| CliError::input(line, format!("{e}")))
                .and_then(|d| check_size(&d, line, "the encrypted document").map(|()| d));
            match doc {
                Ok(d) => sealed.push(d),
                Err(e) => return Err(stopped(e, a.skip + inserted)),
            }
        }
        // Nothing leaves the process before its random nonces are recorded.
        keys.reserve_used()
            .map_err(|e| stopped(e, a.skip + inserted))?;
        if let Err(e) = collection.insert_many(sealed).await {
            // Ordered inserts stop at the first failure: what came before it is in.
            let partial = match e.kind.as_ref() {
                mongodb::error::ErrorKind::InsertMany(m) => m
                    .write_errors
                    .as_deref()
                    .and_then(|w| w.iter().map(|w| w.index).min())
                    .map_or(0, |i| i as u64),
                _ => 0,
            };
            return Err(stopped(e.into(), a.skip + inserted + partial));
        }
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
            "interrupted after {inserted} document(s); the rest of the input was not imported: resume with --skip {}",
            a.skip + inserted
        ));
        return Ok(Exit::Interrupted);
    }
    Ok(Exit::Ok)
}

/// An error that stopped an import, saying how many documents of the input are in the
/// collection (`done`, counting `--skip`) and how to go on without inserting them twice.
fn stopped(e: CliError, done: u64) -> CliError {
    if done == 0 {
        return e; // nothing in the collection from this input
    }
    let text = e.to_string();
    CliError::Usage(format!(
        "{text}; the first {done} document(s) of the input are in the collection: fix the input and resume with --skip {done}"
    ))
}
