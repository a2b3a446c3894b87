//! `fieldcrypt decrypt`: decrypts Extended JSON documents — fieldcrypt envelopes and MongoDB
//! CSFLE values alike — offline.

use std::path::PathBuf;

use fieldcrypt::{Cryptor, Schema};

use crate::common::{context, document_error, load_schema, referenced, BATCH};
use crate::error::Result;
use crate::jsonl::{wipe, wipe_results, IoArgs, Reader, Writer};
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
    /// Print nothing but the documents and errors (this command prints nothing else anyway;
    /// accepted, as by every command).
    #[arg(long, short)]
    quiet: bool,
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
    let mut writer = Writer::create(&a.io.output, true, Some(&a.io.input))?;
    loop {
        let batch = reader.batch(BATCH)?;
        if batch.is_empty() {
            break;
        }
        keys.source.prefetch_ids(&referenced(&batch)?).await?;
        let mut results = cryptor.decrypt_many(&batch, &ctx).into_iter().enumerate();
        while let Some((i, r)) = results.next() {
            let written = r
                .map_err(|e| {
                    document_error(
                        &format!("line {}", reader.line_of(i)),
                        e,
                        "decrypt it without --namespace",
                    )
                })
                .and_then(|doc| {
                    let w = writer.write(&doc);
                    // Decrypted: wiped once written.
                    wipe(vec![doc]);
                    w
                });
            if let Err(e) = written {
                // The batch's other plaintexts, not just freed.
                wipe_results(results.map(|(_, r)| r));
                return Err(e);
            }
        }
    }
    writer.finish()?;
    Ok(Exit::Ok)
}
