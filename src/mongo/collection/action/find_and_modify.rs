//! `find_one_and_update`, `find_one_and_replace` and `find_one_and_delete`: prepared like a
//! find and like the write they make; the document returned is decrypted.

use std::borrow::Borrow;

use bson::{Document, RawDocumentBuf};
use mongodb::options::{
    FindOneAndDeleteOptions, FindOneAndReplaceOptions, FindOneAndUpdateOptions, UpdateModifications,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::prepare::decrypt_found;
use crate::error::Result;
use crate::mongo::collection::{to_raw, EncryptedCollection};

impl<T: Serialize + Send + Sync + 'static> EncryptedCollection<T> {
    /// Replaces one document with `replacement` (encrypted, and bound to the handle's owner if
    /// scoped) and returns the document before or after, per the options, decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_replace(
        &self,
        filter: Document,
        replacement: impl Borrow<T>,
    ) -> FindOneAndReplace<'_, T> {
        FindOneAndReplace::new(self, filter, to_raw(replacement.borrow()))
    }
}

impl<T> EncryptedCollection<T> {
    /// Updates one document and returns it (before or after, per the options), decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_update(
        &self,
        filter: Document,
        update: impl Into<UpdateModifications>,
    ) -> FindOneAndUpdate<'_, T> {
        FindOneAndUpdate::new(self, filter, update.into())
    }

    /// Deletes one matching document and returns it, decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_delete(&self, filter: Document) -> FindOneAndDelete<'_, T> {
        FindOneAndDelete::new(self, filter)
    }
}

action! {
    /// Updates one document and returns it. Construct with
    /// [`EncryptedCollection::find_one_and_update`].
    FindOneAndUpdate {
        filter: Document,
        update: UpdateModifications,
    }
    options FindOneAndUpdateOptions => Option<T> where T: DeserializeOwned + 'static
}

impl<'a, T: DeserializeOwned + 'static> FindOneAndUpdate<'a, T> {
    async fn run(self) -> Result<Option<T>> {
        let coll = self.coll;
        let mut options = self.options;
        let (filter, update) = coll
            .prepare_update(
                "find_one_and_update",
                &self.filter,
                self.update,
                update_checks!(options),
            )
            .await?;
        if let Some(p) = options.as_mut().and_then(|o| o.projection.as_mut()) {
            *p = coll.rewriter().projection(p)?;
        }
        let action = coll
            .coll
            .find_one_and_update(filter, update)
            .with_options(options);
        decrypt_found(coll, run!(action, self.session)?).await
    }
}

action! {
    /// Replaces one document and returns it. Construct with
    /// [`EncryptedCollection::find_one_and_replace`].
    FindOneAndReplace {
        filter: Document,
        replacement: Result<RawDocumentBuf>,
    }
    options FindOneAndReplaceOptions => Option<T> where T: DeserializeOwned + 'static
}

impl<'a, T: DeserializeOwned + 'static> FindOneAndReplace<'a, T> {
    async fn run(self) -> Result<Option<T>> {
        let coll = self.coll;
        let mut options = self.options;
        let checks = find_checks!(options, no_bounds);
        let filter = coll
            .prepare_find("find_one_and_replace", &self.filter, checks)
            .await?;
        let replacement = coll
            .rewriter()
            .replacement(&self.replacement?, &self.filter)?;
        let action = coll
            .coll
            .find_one_and_replace(filter, replacement)
            .with_options(options);
        decrypt_found(coll, run!(action, self.session)?).await
    }
}

action! {
    /// Deletes one document and returns it. Construct with
    /// [`EncryptedCollection::find_one_and_delete`].
    FindOneAndDelete {
        filter: Document,
    }
    options FindOneAndDeleteOptions => Option<T> where T: DeserializeOwned + 'static
}

impl<'a, T: DeserializeOwned + 'static> FindOneAndDelete<'a, T> {
    async fn run(self) -> Result<Option<T>> {
        let coll = self.coll;
        let mut options = self.options;
        let checks = find_checks!(options, no_bounds);
        let filter = coll
            .prepare_find("find_one_and_delete", &self.filter, checks)
            .await?;
        let action = coll.coll.find_one_and_delete(filter).with_options(options);
        decrypt_found(coll, run!(action, self.session)?).await
    }
}
