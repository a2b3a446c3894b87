//! `insert_one` and `insert_many`: documents bound to the handle's owner and encrypted
//! (batches in parallel) before the driver sends them.

use std::borrow::Borrow;

use bson::RawDocumentBuf;
use mongodb::options::{InsertManyOptions, InsertOneOptions};
use mongodb::results::{InsertManyResult, InsertOneResult};
use serde::Serialize;

use crate::error::Result;
use crate::mongo::collection::{to_raw, EncryptedCollection};

impl<T: Serialize + Send + Sync + 'static> EncryptedCollection<T> {
    /// Encrypts and inserts one document (binding it to the handle's owner, if scoped).
    ///
    /// `await` returns `Result<InsertOneResult>`.
    pub fn insert_one(&self, doc: impl Borrow<T>) -> InsertOne<'_, T> {
        InsertOne::new(self, to_raw(doc.borrow()))
    }

    /// Encrypts (in parallel for large batches) and inserts documents; the driver sends them
    /// in as few `insert` commands as the server's batch limits allow.
    ///
    /// `await` returns `Result<InsertManyResult>`.
    pub fn insert_many(&self, docs: impl IntoIterator<Item = impl Borrow<T>>) -> InsertMany<'_, T> {
        InsertMany::new(self, docs.into_iter().map(|d| to_raw(d.borrow())).collect())
    }
}

action! {
    /// Inserts one document. Construct with [`EncryptedCollection::insert_one`].
    InsertOne {
        doc: Result<RawDocumentBuf>,
    }
    options InsertOneOptions => InsertOneResult
}

impl<'a, T: 'a> InsertOne<'a, T> {
    async fn run(self) -> Result<InsertOneResult> {
        let coll = self.coll;
        coll.begin("insert_one").await?;
        let encrypted = coll.rewriter().insert_document(&self.doc?)?;
        let action = coll.coll.insert_one(encrypted).with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}

action! {
    /// Inserts documents. Construct with [`EncryptedCollection::insert_many`].
    InsertMany {
        docs: Result<Vec<RawDocumentBuf>>,
    }
    options InsertManyOptions => InsertManyResult
}

impl<'a, T: 'a> InsertMany<'a, T> {
    async fn run(self) -> Result<InsertManyResult> {
        let coll = self.coll;
        coll.begin("insert_many").await?;
        let encrypted = coll.encrypt_all(self.docs?).await?;
        let action = coll.coll.insert_many(encrypted).with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
