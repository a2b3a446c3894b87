//! `delete_one` and `delete_many`: the filter rewritten (and scoped), nothing decrypted.

use bson::Document;
use mongodb::options::DeleteOptions;
use mongodb::results::DeleteResult;
use mongodb::ClientSession;

use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// Deletes one matching document.
    ///
    /// `await` returns `Result<DeleteResult>`.
    pub fn delete_one(&self, filter: Document) -> Delete<'_, T> {
        Delete {
            coll: self,
            filter,
            many: false,
            options: None,
            session: None,
        }
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

/// Deletes one or many documents. Construct with [`EncryptedCollection::delete_one`] or
/// [`EncryptedCollection::delete_many`].
#[must_use = "actions do nothing unless awaited"]
pub struct Delete<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    many: bool,
    options: Option<DeleteOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(Delete, DeleteOptions);

into_future!(Delete -> DeleteResult);

impl<'a, T: 'a> Delete<'a, T> {
    async fn run(self) -> Result<DeleteResult> {
        let coll = self.coll;
        let operation = if self.many {
            "delete_many"
        } else {
            "delete_one"
        };
        let collation = self.options.as_ref().and_then(|o| o.collation.as_ref());
        let filter = coll
            .prepare_filter(operation, &self.filter, collation)
            .await?;
        let action = if self.many {
            coll.coll.delete_many(filter)
        } else {
            coll.coll.delete_one(filter)
        }
        .with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
