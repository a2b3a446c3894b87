//! The token-leakage scenario end to end: session tokens stored only as a blind index (found
//! by lookup, never readable back), API keys stored encrypted *and* indexed (recoverable),
//! owner checks on every read, a key rotation in the middle, and the raw stored documents,
//! which hold no token in clear.
//!
//! ```sh
//! cargo run --example token_store
//! ```

use std::sync::Arc;

use bson::{doc, Bson, Document};
use fieldcrypt::mongo::{EncryptedCollection, KeyVault, LocalKek};
use fieldcrypt::Encrypted;
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

/// A user's credentials; the marks are the schema. Documents are scoped to their owner.
#[derive(Debug, Serialize, Deserialize, Encrypted)]
#[fieldcrypt(owner = "user_id")]
struct Token {
    #[serde(rename = "_id")]
    id: i32,
    user_id: String,
    /// Looked up, never read back: only the HMAC is stored (so it reads back as `None`).
    #[fieldcrypt(blind_index(key = "token-index"), index_only)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session_token: Option<String>,
    /// Must be shown to its owner again: encrypted, and indexed for lookups.
    #[fieldcrypt(
        key = "secrets",
        bind_id,
        blind_index(key = "token-index", name = "api_key_hash")
    )]
    api_key: String,
    label: String,
}

fn token(id: i32, user: &str, session: &str, api_key: &str, label: &str) -> Token {
    Token {
        id,
        user_id: user.into(),
        session_token: Some(session.into()),
        api_key: api_key.into(),
        label: label.into(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = DevServer::start()?;
    let client = mongodb::Client::with_uri_str(server.uri()).await?;
    // A throwaway master key: this example keeps nothing.
    let vault = Arc::new(KeyVault::new(&client, Arc::new(LocalKek::generate()))?);
    vault.ensure_indexes().await?;
    for alias in ["secrets", "token-index"] {
        vault.ensure_alias(alias).await?;
    }

    let db = client.database(&unique_db_name("token_store"));
    let tokens =
        EncryptedCollection::<Token>::typed(db.collection::<Document>("tokens"), vault.clone())?;
    let alice = tokens.scoped("alice")?;
    let bob = tokens.scoped("bob")?;

    alice
        .insert_one(token(
            1,
            "alice",
            "sess_alice_3f8e2a91c4",
            "ak_alice_77aa01",
            "laptop",
        ))
        .await?;
    bob.insert_one(token(
        2,
        "bob",
        "sess_bob_9d0c1b2e7f",
        "ak_bob_12bc34",
        "phone",
    ))
    .await?;

    // Authenticating a request: find the session by its token, through the owner's handle.
    // Owner checks on every read: alice's handle never returns bob's document, even by token.
    for (whose, token, hers) in [
        ("her", "sess_alice_3f8e2a91c4", true),
        ("bob's", "sess_bob_9d0c1b2e7f", false),
    ] {
        let hit = alice.find_one(doc! { "session_token": token }).await?;
        println!(
            "alice looks up {whose} session token -> {:?}",
            hit.as_ref().map(|t| &t.label)
        );
        assert_eq!(hit.is_some(), hers);
    }

    // Rotate both keys in the middle of the application's life.
    let new_secret = vault.rotate("secrets").await?;
    let new_index = vault.rotate("token-index").await?;
    println!("rotated: secrets -> {new_secret}, token-index -> {new_index}");
    alice
        .insert_one(token(
            3,
            "alice",
            "sess_alice_after_rotation",
            "ak_alice_new",
            "tablet",
        ))
        .await?;

    // Old and new tokens are both found (queries try every readable index key)...
    for t in ["sess_alice_3f8e2a91c4", "sess_alice_after_rotation"] {
        let hit = alice.find_one(doc! { "session_token": t }).await?;
        println!("alice looks up {t} -> {:?}", hit.as_ref().map(|t| &t.label));
        assert!(hit.is_some());
    }
    // ...and API keys are recoverable by their owner, found by value too.
    let mine: Vec<Token> = alice.find(doc! {}).await?.try_collect().await?;
    for t in &mine {
        // The session token is not stored, so it cannot be read back.
        assert!(t.session_token.is_none());
        println!("alice's api_key for {}: {}", t.label, t.api_key);
    }
    let by_key = bob.find_one(doc! { "api_key": "ak_bob_12bc34" }).await?;
    println!(
        "bob looks up his api key -> {:?}",
        by_key.as_ref().map(|t| &t.label)
    );

    // What the database holds: no token in clear, anywhere.
    println!("\nstored documents:");
    let raw: Vec<bson::RawDocumentBuf> = db
        .collection::<bson::RawDocumentBuf>("tokens")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    for r in &raw {
        println!("  {}", summary(&r.to_document()?));
        for secret in ["sess_alice", "sess_bob", "ak_alice", "ak_bob"] {
            let leaked = r
                .as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_bytes());
            assert!(!leaked, "a token is stored in clear");
        }
    }
    println!("no token appears in clear in any stored document");
    db.drop().await?;
    Ok(())
}

fn summary(d: &Document) -> String {
    d.iter()
        .map(|(k, v)| match v {
            Bson::Binary(b) => format!(
                "{k}: <binary 0x{:02x}, {} bytes>",
                u8::from(b.subtype),
                b.bytes.len()
            ),
            other => format!("{k}: {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
