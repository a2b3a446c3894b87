//! `find` and `find_one`: the filter rewritten, sort, projection, index bounds and hint checked;
//! what comes back is decrypted (a cursor batch by batch, or the one document).

use std::future::IntoFuture;
use std::time::Duration;

use bson::{Bson, Document};
use mongodb::options::{FindOneOptions, FindOptions, Hint};
use mongodb::{BoxFuture, ClientSession};
use serde::de::DeserializeOwned;

use super::prepare::decrypt_found;
use super::session::{ActionSession, NoSession, WithSession};
use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// Finds the documents matching `filter`, rewritten for encrypted fields.
    ///
    /// `await` returns `Result<EncryptedCursor<T>>`, a stream that decrypts as it goes.
    pub fn find(&self, filter: Document) -> Find<'_, T> {
        Find {
            coll: self,
            filter,
            options: None,
            session: NoSession,
        }
    }

    /// Finds one document matching `filter`.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one(&self, filter: Document) -> FindOne<'_, T> {
        FindOne::new(self, filter)
    }
}

/// Finds documents. Construct with [`EncryptedCollection::find`].
#[must_use = "actions do nothing unless awaited"]
pub struct Find<'a, T, S = NoSession> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    options: Option<FindOptions>,
    session: S,
}

impl<'a, T, S> Find<'a, T, S> {
    /// Sets the driver's find options (sort, projection and index bounds are checked).
    pub fn with_options(mut self, options: impl Into<Option<FindOptions>>) -> Self {
        self.options = options.into();
        self
    }

    fn opts(&mut self) -> &mut FindOptions {
        self.options.get_or_insert_with(FindOptions::default)
    }

    /// Sorts the results; sorting by an encrypted field is refused.
    pub fn sort(mut self, sort: Document) -> Self {
        self.opts().sort = Some(sort);
        self
    }

    /// Limits the fields returned (the owner field is added when decryption needs it).
    pub fn projection(mut self, projection: Document) -> Self {
        self.opts().projection = Some(projection);
        self
    }

    /// Returns at most this many documents.
    pub fn limit(mut self, limit: i64) -> Self {
        self.opts().limit = Some(limit);
        self
    }

    /// Skips this many documents.
    pub fn skip(mut self, skip: u64) -> Self {
        self.opts().skip = Some(skip);
        self
    }

    /// Asks the server for batches of this many documents.
    pub fn batch_size(mut self, size: u32) -> Self {
        self.opts().batch_size = Some(size);
        self
    }

    /// Names the index to use, by name or by keys; keys are rewritten as
    /// [`create_index`](EncryptedCollection::create_index) rewrites them (a blind-indexed
    /// field's key becomes its index's), and refused where no such index can exist.
    pub fn hint(mut self, hint: Hint) -> Self {
        self.opts().hint = Some(hint);
        self
    }

    /// Stops the query on the server after this long.
    pub fn max_time(mut self, max_time: Duration) -> Self {
        self.opts().max_time = Some(max_time);
        self
    }

    /// Tags the query for the server's logs and profiler. Sent as it is: it is not encrypted,
    /// so it must not hold a secret.
    pub fn comment(mut self, comment: impl Into<Bson>) -> Self {
        self.opts().comment = Some(comment.into());
        self
    }
}

impl<'a, T> Find<'a, T, NoSession> {
    /// Runs the query in `session` (and its transaction); the cursor reads through it.
    pub fn session<'s>(self, session: &'s mut ClientSession) -> Find<'a, T, WithSession<'s>> {
        Find {
            coll: self.coll,
            filter: self.filter,
            options: self.options,
            session: WithSession(session),
        }
    }
}

impl<'a, T, S> IntoFuture for Find<'a, T, S>
where
    T: DeserializeOwned + Send + 'static,
    S: ActionSession<'a>,
{
    type Output = Result<S::Cursor<T>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let mut options = self.options;
            let filter = coll
                .prepare_find("find", &self.filter, find_checks!(options))
                .await?;
            self.session.find(coll, filter, options).await
        })
    }
}

action! {
    /// Finds one document. Construct with [`EncryptedCollection::find_one`].
    FindOne {
        filter: Document,
    }
    options FindOneOptions => Option<T> where T: DeserializeOwned + 'static
}

impl<'a, T: DeserializeOwned + 'static> FindOne<'a, T> {
    async fn run(self) -> Result<Option<T>> {
        let coll = self.coll;
        let mut options = self.options;
        let filter = coll
            .prepare_find("find_one", &self.filter, find_checks!(options))
            .await?;
        let action = coll.coll.find_one(filter).with_options(options);
        decrypt_found(coll, run!(action, self.session)?).await
    }
}
