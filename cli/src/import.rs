//! `fieldcrypt import`: inserts Extended JSON documents into a collection, encrypting per the
//! schema on the way in (ciphertexts bound to the collection, as the collection layer binds
//! them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use bson::RawDocumentBuf;
use fieldcrypt::Context;
use serde_json::json;

use crate::common::{encrypting, load_schema, split_namespace};
use crate::error::{CliError, Result};
use crate::jsonl::{check_size, wipe, InArgs, Reader};
use crate::keysource::{connect, KeyArgs, NonceArgs};
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
    let (keys, cryptor, aliases) = encrypting(&a.keys, &a.nonces, schema).await?;
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
            let done = a.skip + inserted;
            return Err(match inserted_before(&e) {
                Some(partial) => stopped(e.into(), done + partial),
                None => stopped_uncertain(e.into(), done, n),
            });
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

/// How many documents of a failed ordered `insert_many` are in the collection, when the
/// error says: the index of its first write error (the driver numbers them across the
/// batches it splits the call into, and an ordered insert stops at the first). `None` for
/// any other error — a write-concern error, a network error, an error after the driver sent
/// part of the documents — where some, all or none of them may be in.
fn inserted_before(e: &mongodb::error::Error) -> Option<u64> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
            .write_errors
            .as_deref()
            .and_then(|w| w.iter().map(|w| w.index).min())
            .map(|i| i as u64),
        _ => None,
    }
}

/// An error that stopped an import in the middle of inserting `batch` documents, after the
/// first `done` of the input (counting `--skip`): how many of the batch are in is not known.
fn stopped_uncertain(e: CliError, done: u64, batch: u64) -> CliError {
    let text = e.to_string();
    let most = done + batch;
    CliError::Usage(format!(
        "{text}; at least the first {done} and at most the first {most} document(s) of the input are in the collection (the server did not say how many of the last {batch}): documents with an `_id` can be resumed safely with --skip {done} (those already in are refused as duplicates; resume past them with the --skip that error prints); documents without one would be inserted twice, so check the collection first"
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncertain_count_gives_both_bounds_and_no_plain_resume_point() {
        let m = stopped_uncertain(CliError::Usage("write concern error".into()), 3000, 1000)
            .to_string();
        assert!(m.starts_with("write concern error; at least the first 3000 and at most the first 4000 document(s)"), "{m}");
        assert!(
            m.contains("with an `_id` can be resumed safely with --skip 3000"),
            "{m}"
        );
        assert!(m.contains("without one would be inserted twice"), "{m}");
        assert!(!m.contains("resume with --skip"), "{m}");
        // Nothing in before the batch: still says the batch may be.
        let m = stopped_uncertain(CliError::Usage("network".into()), 0, 2).to_string();
        assert!(
            m.contains("at least the first 0 and at most the first 2"),
            "{m}"
        );
    }

    fn insert_many_error(fields: bson::Document) -> mongodb::error::Error {
        let e: mongodb::error::InsertManyError = bson::from_document(fields).unwrap();
        mongodb::error::ErrorKind::InsertMany(e).into()
    }

    #[test]
    fn only_write_errors_without_a_write_concern_error_give_an_exact_count() {
        let dup = bson::doc! { "index": 1500_i64, "code": 11000, "errmsg": "E11000" };
        let e = insert_many_error(bson::doc! { "writeErrors": [dup.clone()] });
        assert_eq!(inserted_before(&e), Some(1500));
        let wc = bson::doc! { "code": 64, "errmsg": "waiting for replication timed out" };
        let e =
            insert_many_error(bson::doc! { "writeErrors": [dup], "writeConcernError": wc.clone() });
        assert_eq!(inserted_before(&e), None);
        let e = insert_many_error(bson::doc! { "writeConcernError": wc });
        assert_eq!(inserted_before(&e), None);
        let e = mongodb::error::Error::custom("a network error");
        assert_eq!(inserted_before(&e), None);
    }
}
