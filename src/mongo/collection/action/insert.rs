//! `insert_one` and `insert_many`: documents bound to the handle's owner and encrypted
//! (batches in parallel) before the driver sends them.

use std::borrow::Borrow;

use bson::RawDocumentBuf;
use mongodb::options::{InsertManyOptions, InsertOneOptions};
use mongodb::results::{InsertManyResult, InsertOneResult};
use mongodb::ClientSession;
use serde::Serialize;

use crate::error::Result;
use crate::mongo::collection::{to_raw, EncryptedCollection};

impl<T: Serialize + Send + Sync + 'static> EncryptedCollection<T> {
    /// Encrypts and inserts one document (binding it to the handle's owner, if scoped).
    ///
    /// `await` returns `Result<InsertOneResult>`.
    pub fn insert_one(&self, doc: impl Borrow<T>) -> InsertOne<'_, T> {
        InsertOne {
            coll: self,
            doc: to_raw(doc.borrow()),
            options: None,
            session: None,
        }
    }

    /// Encrypts (in parallel for large batches) and inserts documents; the driver sends them
    /// in as few `insert` commands as the server's batch limits allow.
    ///
    /// `await` returns `Result<InsertManyResult>`.
    pub fn insert_many(&self, docs: impl IntoIterator<Item = impl Borrow<T>>) -> InsertMany<'_, T> {
        InsertMany {
            coll: self,
            docs: docs.into_iter().map(|d| to_raw(d.borrow())).collect(),
            options: None,
            session: None,
        }
    }
}

/// Inserts one document. Construct with [`EncryptedCollection::insert_one`].
#[must_use = "actions do nothing unless awaited"]
pub struct InsertOne<'a, T> {
    coll: &'a EncryptedCollection<T>,
    doc: Result<RawDocumentBuf>,
    options: Option<InsertOneOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(InsertOne, InsertOneOptions);

into_future!(InsertOne -> InsertOneResult);

impl<'a, T: 'a> InsertOne<'a, T> {
    async fn run(self) -> Result<InsertOneResult> {
        let coll = self.coll;
        coll.begin("insert_one").await?;
        let encrypted = coll.rewriter().insert_document(&self.doc?)?;
        let action = coll.coll.insert_one(encrypted).with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}

/// Inserts documents. Construct with [`EncryptedCollection::insert_many`].
#[must_use = "actions do nothing unless awaited"]
pub struct InsertMany<'a, T> {
    coll: &'a EncryptedCollection<T>,
    docs: Result<Vec<RawDocumentBuf>>,
    options: Option<InsertManyOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(InsertMany, InsertManyOptions);

into_future!(InsertMany -> InsertManyResult);

impl<'a, T: 'a> InsertMany<'a, T> {
    async fn run(self) -> Result<InsertManyResult> {
        let coll = self.coll;
        coll.begin("insert_many").await?;
        let encrypted = coll.encrypt_all(self.docs?).await?;
        let action = coll.coll.insert_many(encrypted).with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
