//! Prints the schema of a type marked with `#[derive(Encrypted)]` in the schema file format,
//! for the tools that read files (the CLI's `--schema`, reviews, diffs), so the type stays the
//! one description of its fields.
//!
//! ```sh
//! cargo run --example schema_file                  # TOML on stdout
//! cargo run --example schema_file -- users.json    # written to a file, TOML or JSON by extension
//! fieldcrypt import --schema users.json …
//! ```

use bson::oid::ObjectId;
use fieldcrypt::{Encrypted, Schema};
use serde::{Deserialize, Serialize};

/// A nested document: its marks are prefixed with the field that holds it (`profile.phone`).
#[derive(Serialize, Deserialize, Encrypted)]
#[allow(dead_code)] // only the type's schema is used
struct Profile {
    #[fieldcrypt(key = "pii", deterministic)]
    phone: String,
    city: String,
    #[fieldcrypt(key = "pii", pad_to = 16, algorithm = "XChaCha20-Poly1305")]
    notes: Option<String>,
}

/// The application's user document.
#[derive(Serialize, Deserialize, Encrypted)]
#[fieldcrypt(owner = "tenant_id")]
#[allow(dead_code)] // only the type's schema is used
struct User {
    #[serde(rename = "_id")]
    id: ObjectId,
    tenant_id: String,
    #[fieldcrypt(key = "pii", bind_id)]
    ssn: String,
    #[fieldcrypt(key = "lookup", deterministic)]
    email: String,
    #[fieldcrypt(blind_index(key = "tokens"), index_only)]
    api_token: Option<String>,
    #[fieldcrypt(key = "pii", each)]
    tags: Vec<String>,
    profile: Profile,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let schema: Schema = User::try_schema()?;
    match std::env::args_os().nth(1) {
        None => print!("{}", schema.to_toml_string()),
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            let text = match path.extension().and_then(|e| e.to_str()) {
                Some("json") => schema.to_json_string(),
                Some("toml") => schema.to_toml_string(),
                _ => return Err("the file name must end in .toml or .json".into()),
            };
            std::fs::write(&path, text)?;
            // Read back as the CLI would: the file must describe the same schema.
            let sorted = |s: &Schema| {
                let mut r = s.rules().to_vec();
                r.sort_by(|x, y| x.path.cmp(&y.path));
                r
            };
            if sorted(&Schema::load(&path)?) != sorted(&schema) {
                return Err("the written file does not read back as the same schema".into());
            }
            println!("wrote {} ({} fields)", path.display(), schema.rules().len());
        }
    }
    Ok(())
}
