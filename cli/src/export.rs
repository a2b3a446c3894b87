//! `fieldcrypt export`: writes a collection's documents as canonical Extended JSON lines —
//! as stored (ciphertext), or decrypted with `--decrypt`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use bson::{doc, RawDocumentBuf};
use fieldcrypt::{Context, Cryptor, Schema};
use futures_util::TryStreamExt;
use serde_json::json;

use crate::common::{load_schema, prefetch, split_namespace, write_decrypted, BATCH};
use crate::error::Result;
use crate::jsonl::{OutArgs, Writer};
use crate::keysource::{connect, KeyArgs, Keys};
use crate::report::{self, Exit, OutputOpts, Progress};

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    /// The collection, `db.collection`.
    #[arg(long, value_name = "DB.COLL")]
    namespace: String,
    /// Decrypt every value. The output then holds plaintext: protect it.
    #[arg(long)]
    decrypt: bool,
    /// The schema, for its owner field (owner-scoped collections); not needed otherwise.
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// Stop after this many documents.
    #[arg(long)]
    limit: Option<u64>,
    /// With --decrypt: the ciphertexts are not bound to the collection's namespace (they were
    /// written without one, e.g. by `encrypt` without --namespace and then mongoimport).
    #[arg(long, requires = "decrypt")]
    no_namespace_binding: bool,
    /// With --decrypt: keep a top-level `__safeContent__` field (MongoDB Queryable
    /// Encryption's tags for its indexed fields), which is dropped by default.
    #[arg(long, requires = "decrypt")]
    keep_safe_content: bool,
    #[command(flatten)]
    dest: OutArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    out: OutputOpts,
}

pub(crate) async fn run(a: ExportArgs) -> Result<Exit> {
    let (db, coll) = split_namespace(&a.namespace)?;
    let schema = match &a.schema {
        Some(p) => load_schema(p)?,
        None => Schema::empty(),
    };
    let keys = if a.decrypt {
        report::warn(&format!(
            "--decrypt: {} holds plaintext; protect it and delete it when done",
            a.dest
                .output
                .as_ref()
                .map_or_else(|| "the output".to_owned(), |p| p.display().to_string())
        ));
        Some(Keys::open(&a.keys).await?)
    } else {
        None
    };
    let client = connect(&a.keys.data_uri()?).await?;
    let collection = client.database(db).collection::<RawDocumentBuf>(coll);
    let total = collection
        .estimated_document_count()
        .await
        .ok()
        .map(|n| a.limit.map_or(n, |l| l.min(n)));
    let mut find = collection.find(doc! {}).sort(doc! { "_id": 1 });
    if let Some(l) = a.limit {
        find = find.limit(i64::try_from(l).unwrap_or(i64::MAX));
    }
    let mut cursor = find.await?;
    let mut writer = Writer::create(&a.dest, a.decrypt, None)?;
    let ctx = if a.no_namespace_binding {
        Context::none()
    } else {
        Context::namespace(a.namespace.clone())
    }
    .with_safe_content(a.keep_safe_content);
    let cryptor = keys
        .as_ref()
        .map(|k| Cryptor::new(k.source.clone(), schema));
    let stop = report::interrupt_flag();
    let mut progress = Progress::new(&a.out, &format!("export {}", a.namespace), total);
    let mut written = 0u64;
    let mut interrupted = false;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let next = cursor.try_next().await?;
        let end = next.is_none();
        if let Some(d) = next {
            batch.push(d);
        }
        if batch.len() < BATCH && !end {
            continue;
        }
        match (&cryptor, &keys) {
            (Some(c), Some(k)) => {
                prefetch(k, c, &batch).await?;
                write_decrypted(
                    &mut writer,
                    c.decrypt_many(&batch, &ctx),
                    |i| format!("document {}", written + i as u64 + 1),
                    "use --no-namespace-binding",
                )?;
            }
            _ => {
                for d in &batch {
                    writer.write(d)?;
                }
            }
        }
        written += batch.len() as u64;
        batch.clear();
        progress.update(written, total, "written", json!({ "written": written }));
        if end {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
    }
    match (&a.dest.output, interrupted) {
        // A partial export never takes the place of the file (or of its absence).
        (Some(p), true) => {
            writer.discard();
            report::warn(&format!(
                "interrupted: the partial export was discarded and {} left as it was; run the command again to export",
                p.display()
            ));
        }
        _ => writer.finish()?,
    }
    progress.finish();
    if a.out.json {
        let summary = json!({ "event": "summary", "namespace": a.namespace, "written": written, "decrypted": a.decrypt, "complete": !interrupted });
        // Documents go to stdout unless --out: then the summary does.
        if a.dest.output.is_some() {
            println!("{summary}");
        } else {
            eprintln!("{summary}");
        }
    }
    Ok(if interrupted {
        Exit::Interrupted
    } else {
        Exit::Ok
    })
}
