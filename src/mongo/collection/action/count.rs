//! `count_documents`: the filter rewritten (and scoped).

use bson::Document;
use mongodb::options::CountOptions;

use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// Counts the matching documents.
    ///
    /// `await` returns `Result<u64>`.
    pub fn count_documents(&self, filter: Document) -> CountDocuments<'_, T> {
        CountDocuments::new(self, filter)
    }
}

action! {
    /// Counts documents. Construct with [`EncryptedCollection::count_documents`].
    CountDocuments {
        filter: Document,
    }
    options CountOptions => u64
}

impl<'a, T: 'a> CountDocuments<'a, T> {
    async fn run(self) -> Result<u64> {
        let coll = self.coll;
        let collation = self.options.as_ref().and_then(|o| o.collation.as_ref());
        let filter = coll
            .prepare_filter("count_documents", &self.filter, collation)
            .await?;
        let action = coll.coll.count_documents(filter).with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
