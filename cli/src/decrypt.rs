//! `fieldcrypt decrypt`: decrypts Extended JSON documents — fieldcrypt envelopes, MongoDB CSFLE
//! values and MongoDB Queryable Encryption values alike — offline.

use std::path::PathBuf;

use fieldcrypt::{Cryptor, Schema};

use crate::common::{context, load_schema, prefetch, write_decrypted, BATCH};
use crate::error::Result;
use crate::jsonl::IoArgs;
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
    /// Keep a top-level `__safeContent__` field (MongoDB Queryable Encryption's tags for its
    /// indexed fields), which is dropped by default.
    #[arg(long)]
    keep_safe_content: bool,
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
    let mut ctx = context(a.namespace.as_deref()).with_safe_content(a.keep_safe_content);
    if let Some(f) = &a.owner_field {
        ctx = ctx.with_owner_field(f.clone());
    }
    let cryptor = Cryptor::new(keys.source.clone(), schema);
    let (mut reader, mut writer) = a.io.open(true)?;
    loop {
        let batch = reader.batch(BATCH)?;
        if batch.is_empty() {
            break;
        }
        prefetch(&keys, &cryptor, &batch).await?;
        write_decrypted(
            &mut writer,
            cryptor.decrypt_many(&batch, &ctx),
            |i| format!("line {}", reader.line_of(i)),
            "decrypt it without --namespace",
        )?;
    }
    writer.finish()?;
    Ok(Exit::Ok)
}
