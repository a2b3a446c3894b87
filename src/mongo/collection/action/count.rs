//! `count_documents`: the filter rewritten (and scoped); `estimated_document_count`, which
//! has no filter, refused on a scoped handle.

use bson::Document;
use mongodb::options::{CountOptions, EstimatedDocumentCountOptions};

use crate::error::{Error, Result};
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
        let mut options = self.options;
        let filter = coll
            .prepare_filter("count_documents", &self.filter, filter_checks!(options))
            .await?;
        let action = coll.coll.count_documents(filter).with_options(options);
        Ok(run!(action, self.session)?)
    }
}

impl<T> EncryptedCollection<T> {
    /// The number of documents in the whole collection, from its metadata (fast, no filter).
    /// Refused on a scoped handle: the count would include every owner's documents; use
    /// [`count_documents`](EncryptedCollection::count_documents) there.
    ///
    /// `await` returns `Result<u64>`.
    pub fn estimated_document_count(&self) -> EstimatedDocumentCount<'_, T> {
        EstimatedDocumentCount {
            coll: self,
            options: None,
        }
    }
}

/// Estimates the number of documents. Construct with
/// [`EncryptedCollection::estimated_document_count`].
#[must_use = "actions do nothing unless awaited"]
pub struct EstimatedDocumentCount<'a, T> {
    coll: &'a EncryptedCollection<T>,
    options: Option<EstimatedDocumentCountOptions>,
}

impl<T> EstimatedDocumentCount<'_, T> {
    /// Sets the driver options of this operation.
    pub fn with_options(
        mut self,
        options: impl Into<Option<EstimatedDocumentCountOptions>>,
    ) -> Self {
        self.options = options.into();
        self
    }
}

impl<'a, T: 'a> EstimatedDocumentCount<'a, T> {
    async fn run(self) -> Result<u64> {
        let coll = self.coll;
        if let (Some(_), Some(field)) = (&coll.owner, coll.schema.owner_field()) {
            return Err(Error::UnsupportedQuery {
                operator: "estimated_document_count".into(),
                field: field.to_owned(),
                reason: "it counts every owner's documents: use count_documents on a scoped handle",
            });
        }
        coll.check_usable()?;
        coll.trace("estimated_document_count");
        Ok(coll
            .coll
            .estimated_document_count()
            .with_options(self.options)
            .await?)
    }
}

into_future!(EstimatedDocumentCount -> u64);
