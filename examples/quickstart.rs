//! fieldcrypt's main job on the embedded default: a local master key (generated into a file on
//! first run), a key vault in MongoDB, and an encrypting collection — against `MONGODB_URI` when
//! set, else a locally started MongoDB wire-protocol server.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! The encrypted fields are marked on the type the application writes (`#[derive(Encrypted)]`),
//! so the schema is described once. It inserts users, queries by a deterministic field and by a
//! blind-indexed one, and prints what the server stores next to what the application reads.

use std::path::PathBuf;
use std::sync::Arc;

use bson::{doc, Document};
use fieldcrypt::mongo::{EncryptedCollection, KeyVault, LocalKek};
use fieldcrypt::{Encrypted, LocalMasterKey};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

/// What the application writes, and how each field is protected: the marks are the schema.
#[derive(Debug, Serialize, Encrypted)]
struct NewUser {
    #[serde(rename = "_id")]
    id: i32,
    #[fieldcrypt(key = "pii")]
    name: String,
    /// Equality-queryable (equal emails give equal ciphertexts).
    #[fieldcrypt(key = "lookup", deterministic)]
    email: String,
    /// Bound to the document's `_id`: copied into another document, it does not decrypt.
    #[fieldcrypt(key = "pii", bind_id)]
    ssn: String,
    /// Stored only as a blind index: found by value, never readable back.
    #[fieldcrypt(blind_index(key = "tokens"), index_only)]
    api_token: String,
    plan: String,
}

/// What the application reads back (the token itself is never stored).
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // fields are shown through Debug
struct User {
    #[serde(rename = "_id")]
    id: i32,
    name: String,
    email: String,
    ssn: String,
    plan: String,
}

/// The master key file: `$FIELDCRYPT_MASTER_KEY_FILE`, else under `target/`.
fn master_key_file() -> PathBuf {
    std::env::var_os("FIELDCRYPT_MASTER_KEY_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/fieldcrypt-quickstart/master-key.b64"))
}

fn load_or_create_master_key() -> fieldcrypt::Result<LocalKek> {
    let path = master_key_file();
    if path.exists() {
        println!("master key: {} (existing)", path.display());
        return LocalKek::from_file(&path);
    }
    let key = LocalMasterKey::generate();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&path)?, key.expose_base64().as_bytes())?;
    println!("master key: {} (generated; keep it safe)", path.display());
    Ok(LocalKek::new(key))
}

fn users() -> Vec<NewUser> {
    let u = |id, name: &str, email: &str, ssn: &str, token: &str, plan: &str| NewUser {
        id,
        name: name.into(),
        email: email.into(),
        ssn: ssn.into(),
        api_token: token.into(),
        plan: plan.into(),
    };
    vec![
        u(
            1,
            "Ada Lovelace",
            "ada@example.com",
            "123-45-6789",
            "tok_live_4f9a1c2e8b7d",
            "pro",
        ),
        u(
            2,
            "Alan Turing",
            "alan@example.com",
            "987-65-4321",
            "tok_live_0b3e5d7f9a1c",
            "free",
        ),
        u(
            3,
            "Grace Hopper",
            "grace@example.com",
            "555-12-3456",
            "tok_live_7c8d9e0f1a2b",
            "pro",
        ),
    ]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = DevServer::start()?;
    println!("server: {} ({:?})", server.uri(), server.kind());
    let client = mongodb::Client::with_uri_str(server.uri()).await?;

    // Keys: data keys in the key vault, wrapped by the local master key.
    let vault = Arc::new(KeyVault::new(
        &client,
        Arc::new(load_or_create_master_key()?),
    )?);
    vault.ensure_indexes().await?;
    for alias in ["pii", "lookup", "tokens"] {
        vault.ensure_alias(alias).await?;
    }

    // The schema comes from the type's marks; the same in the file format the CLI reads:
    println!(
        "\nschema of NewUser:\n{}",
        NewUser::schema().to_toml_string().trim_end()
    );

    let db = client.database(&unique_db_name("quickstart"));
    let new_users =
        EncryptedCollection::<NewUser>::typed(db.collection::<Document>("users"), vault.clone())?;
    new_users.insert_many(users()).await?;
    let users_coll = new_users.clone_with_type::<User>();

    // Query by a deterministic field (the filter is encrypted before it is sent), and by a
    // secret that is stored only as a blind index.
    println!();
    for (filter, shown) in [
        (
            doc! { "email": "grace@example.com" },
            r#"{email: "grace@example.com"}"#,
        ),
        (
            doc! { "api_token": "tok_live_0b3e5d7f9a1c" },
            r#"{api_token: "tok_live_…"}"#,
        ),
    ] {
        let found = users_coll.find_one(filter).await?;
        println!("find_one({shown}) -> {:?}", found.map(|u| u.name));
    }

    // What cannot work on ciphertext is refused before anything is sent.
    match users_coll.find(doc! { "ssn": { "$regex": "^123" } }).await {
        Err(e) => println!("find({{ssn: {{$regex: …}}}}) refused: {e}"),
        Ok(_) => println!("unexpected: a regex on an encrypted field was accepted"),
    }

    // What the server stores, next to what the application reads.
    let raw: Vec<Document> = db
        .collection::<Document>("users")
        .find(doc! { "_id": 1 })
        .await?
        .try_collect()
        .await?;
    let read: Vec<User> = users_coll
        .find(doc! { "_id": 1 })
        .await?
        .try_collect()
        .await?;
    println!("\nstored by the server:\n{}", pretty(&raw[0]));
    println!("read by the application:\n{:#?}", read[0]);

    let stats = vault.cache_stats();
    println!("\nkey cache: {} hits, {} misses", stats.hits, stats.misses);
    db.drop().await?;
    Ok(())
}

/// One line per field; binaries shown as subtype and length (they are ciphertext).
fn pretty(d: &Document) -> String {
    d.iter()
        .map(|(k, v)| match v {
            bson::Bson::Binary(b) => format!(
                "  {k}: Binary(subtype 0x{:02x}, {} bytes: {}…)",
                u8::from(b.subtype),
                b.bytes.len(),
                b.bytes
                    .iter()
                    .take(12)
                    .map(|x| format!("{x:02x}"))
                    .collect::<String>()
            ),
            other => format!("  {k}: {other}"),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
