//! `delete_one` and `delete_many`: the filter rewritten (and scoped), nothing decrypted.

use bson::Document;
use mongodb::options::DeleteOptions;
use mongodb::results::DeleteResult;

use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// Deletes one matching document.
    ///
    /// `await` returns `Result<DeleteResult>`.
    pub fn delete_one(&self, filter: Document) -> Delete<'_, T> {
        Delete::new(self, filter, false)
    }

    /// Deletes every matching document.
    ///
    /// `await` returns `Result<DeleteResult>`.
    pub fn delete_many(&self, filter: Document) -> Delete<'_, T> {
        Delete {
            many: true,
            ..self.delete_one(filter)
        }
    }
}

action! {
    /// Deletes one or many documents. Construct with [`EncryptedCollection::delete_one`] or
    /// [`EncryptedCollection::delete_many`].
    Delete {
        filter: Document,
        many: bool,
    }
    options DeleteOptions => DeleteResult
}

impl<'a, T: 'a> Delete<'a, T> {
    async fn run(self) -> Result<DeleteResult> {
        let coll = self.coll;
        let operation = if self.many {
            "delete_many"
        } else {
            "delete_one"
        };
        let mut options = self.options;
        let filter = coll
            .prepare_filter(operation, &self.filter, filter_checks!(options))
            .await?;
        let action = if self.many {
            coll.coll.delete_many(filter)
        } else {
            coll.coll.delete_one(filter)
        }
        .with_options(options);
        Ok(run!(action, self.session)?)
    }
}
