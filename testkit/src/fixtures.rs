//! Small set-ups the integration tests share, so that each test says only what is its own.

use std::sync::Arc;

use bson::Document;
use fieldcrypt::InMemoryKeyring;
use serde::de::DeserializeOwned;

/// An in-memory keyring with a fresh primary key for each alias.
#[must_use]
pub fn keyring_with(aliases: &[&str]) -> Arc<InMemoryKeyring> {
    let ring = Arc::new(InMemoryKeyring::new());
    for alias in aliases {
        ring.generate(alias);
    }
    ring
}

/// The document as the server stores it (read around fieldcrypt), of type `D`
/// (`Document`, `RawDocumentBuf`, …).
///
/// # Panics
/// If the read fails or no document matches: in a test, that is the failure.
pub async fn stored<D>(db: &mongodb::Database, collection: &str, filter: Document) -> D
where
    D: DeserializeOwned + Send + Sync,
{
    #[allow(clippy::expect_used)] // test helper: a failed read is a failed test
    db.collection::<D>(collection)
        .find_one(filter)
        .await
        .expect("reading the stored document")
        .expect("no stored document matches")
}
