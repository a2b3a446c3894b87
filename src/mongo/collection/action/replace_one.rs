//! `replace_one`: the replacement bound to the owner and encrypted (`_id`-bound fields take
//! the `_id` of the filter when it has none); the filter rewritten.

use std::borrow::Borrow;

use bson::{Document, RawDocumentBuf};
use mongodb::options::ReplaceOptions;
use mongodb::results::UpdateResult;
use serde::Serialize;

use crate::error::Result;
use crate::mongo::collection::{to_raw, EncryptedCollection};

impl<T: Serialize + Send + Sync + 'static> EncryptedCollection<T> {
    /// Replaces the document matching `filter` with `replacement`, encrypted. `_id`-bound
    /// fields take the `_id` of the replacement, or of an `_id` equality in `filter`.
    ///
    /// `await` returns `Result<UpdateResult>`.
    pub fn replace_one(&self, filter: Document, replacement: impl Borrow<T>) -> ReplaceOne<'_, T> {
        ReplaceOne::new(self, filter, to_raw(replacement.borrow()))
    }
}

action! {
    /// Replaces one document. Construct with [`EncryptedCollection::replace_one`].
    ReplaceOne {
        filter: Document,
        replacement: Result<RawDocumentBuf>,
    }
    options ReplaceOptions => UpdateResult
}

impl<'a, T: 'a> ReplaceOne<'a, T> {
    async fn run(self) -> Result<UpdateResult> {
        let coll = self.coll;
        let mut options = self.options;
        let (filter, replacement) = coll
            .prepare_replace(&self.filter, self.replacement, options.as_mut())
            .await?;
        let action = coll
            .coll
            .replace_one(filter, replacement)
            .with_options(options);
        Ok(run!(action, self.session)?)
    }
}
