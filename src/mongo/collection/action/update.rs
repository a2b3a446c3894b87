//! `update_one` and `update_many`: values written to encrypted fields are encrypted, array
//! filters rewritten, and operators that cannot work on ciphertext refused.

use bson::Document;
use mongodb::options::{UpdateModifications, UpdateOptions};
use mongodb::results::UpdateResult;

use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// Updates one document: values written to encrypted fields are encrypted.
    ///
    /// `await` returns `Result<UpdateResult>`.
    pub fn update_one(
        &self,
        filter: Document,
        update: impl Into<UpdateModifications>,
    ) -> Update<'_, T> {
        Update::new(self, filter, update.into(), false)
    }

    /// Updates every matching document: values written to encrypted fields are encrypted.
    ///
    /// `await` returns `Result<UpdateResult>`.
    pub fn update_many(
        &self,
        filter: Document,
        update: impl Into<UpdateModifications>,
    ) -> Update<'_, T> {
        Update {
            many: true,
            ..self.update_one(filter, update)
        }
    }
}

action! {
    /// Updates one or many documents. Construct with [`EncryptedCollection::update_one`] or
    /// [`EncryptedCollection::update_many`].
    Update {
        filter: Document,
        update: UpdateModifications,
        many: bool,
    }
    options UpdateOptions => UpdateResult
}

impl<'a, T: 'a> Update<'a, T> {
    async fn run(self) -> Result<UpdateResult> {
        let coll = self.coll;
        let operation = if self.many {
            "update_many"
        } else {
            "update_one"
        };
        let mut options = self.options;
        let (filter, update) = coll
            .prepare_update(
                operation,
                &self.filter,
                self.update,
                update_checks!(options),
            )
            .await?;
        let action = if self.many {
            coll.coll.update_many(filter, update)
        } else {
            coll.coll.update_one(filter, update)
        }
        .with_options(options);
        Ok(run!(action, self.session)?)
    }
}
