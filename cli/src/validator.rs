//! `fieldcrypt validator`: the collection validator (`$jsonSchema`) that refuses documents
//! whose encrypted fields are not ciphertext; printed, or applied with `--apply`.

use std::path::PathBuf;

use fieldcrypt::mongo::{apply_validator, validator};

use crate::common::{load_schema, split_namespace};
use crate::error::{CliError, Result};
use crate::keysource::connect;
use crate::report::Exit;

#[derive(clap::Args, Debug)]
pub(crate) struct ValidatorArgs {
    /// The schema (docs/SCHEMA.md).
    #[arg(long, value_name = "FILE")]
    schema: PathBuf,
    /// Set the validator on this collection (`db.collection`), replacing any it has.
    #[arg(long, requires = "namespace")]
    apply: bool,
    /// The collection, for --apply.
    #[arg(long, value_name = "DB.COLL")]
    namespace: Option<String>,
    /// The cluster, for --apply.
    #[arg(long, env = "MONGODB_URI", hide_env_values = true)]
    uri: Option<crate::uri::ConnectionString>,
}

pub(crate) async fn run(a: ValidatorArgs) -> Result<Exit> {
    let schema = load_schema(&a.schema)?;
    let v = validator(&schema);
    if a.apply {
        let ns = a.namespace.as_deref().unwrap_or_default();
        let (db, coll) = split_namespace(ns)?;
        let uri = a
            .uri
            .as_ref()
            .map(crate::uri::ConnectionString::expose)
            .ok_or_else(|| CliError::Usage("no server: give --uri or set MONGODB_URI".into()))?;
        let client = connect(uri).await?;
        apply_validator(&client.database(db), coll, &schema).await?;
        eprintln!("validator set on {ns}");
    } else {
        let json = bson::Bson::Document(v).into_relaxed_extjson();
        println!(
            "{}",
            serde_json::to_string_pretty(&json).map_err(|e| CliError::Usage(e.to_string()))?
        );
    }
    Ok(Exit::Ok)
}
