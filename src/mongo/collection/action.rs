//! The operations of [`EncryptedCollection`], as action builders shaped like the driver's:
//! each is configured with `.with_options(...)` / `.session(...)` and run by `.await`.

use std::borrow::Borrow;
use std::future::IntoFuture;
use std::marker::PhantomData;

use bson::{Bson, Document, RawDocumentBuf};
use mongodb::options::{
    AggregateOptions, Collation, CountOptions, DeleteOptions, DistinctOptions,
    FindOneAndDeleteOptions, FindOneAndReplaceOptions, FindOneAndUpdateOptions, FindOneOptions,
    FindOptions, InsertManyOptions, InsertOneOptions, ReplaceOptions, UpdateModifications,
    UpdateOptions,
};
use mongodb::results::{DeleteResult, InsertManyResult, InsertOneResult, UpdateResult};
use mongodb::{BoxFuture, ClientSession};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{check_collation, cursor, to_raw, EncryptedCollection, EncryptedCursor};
use crate::error::{Error, Result};

/// Type state of [`Find`] and [`Aggregate`] without an explicit session: the cursor they
/// return owns everything it needs.
#[derive(Debug)]
pub struct NoSession;

/// Type state of [`Find`] and [`Aggregate`] run in a session: the cursor they return reads
/// its later batches through that session, so it borrows it.
#[derive(Debug)]
pub struct WithSession<'s>(&'s mut ClientSession);

/// Runs a driver action with the session, if one was given.
macro_rules! run {
    ($action:expr, $session:expr) => {
        match $session {
            Some(s) => $action.session(s).await,
            None => $action.await,
        }
    };
}

/// `with_options` and `session` setters of the actions that return no cursor.
macro_rules! options_and_session {
    ($action:ident, $options:ty) => {
        impl<'a, T> $action<'a, T> {
            /// Sets the driver options of this operation. Options that could compare or
            /// order encrypted values (sort, projection, collation, array filters, index
            /// bounds) are checked like the filter.
            pub fn with_options(mut self, options: impl Into<Option<$options>>) -> Self {
                self.options = options.into();
                self
            }

            /// Runs the operation in `session`, and in its transaction if one is started.
            pub fn session(mut self, session: &'a mut ClientSession) -> Self {
                self.session = Some(session);
                self
            }
        }
    };
}

/// `IntoFuture` of an action that returns no cursor: awaiting it runs its `run` method.
macro_rules! into_future {
    ($action:ident -> $output:ty $(where T: $($bound:tt)+)?) => {
        impl<'a, T: 'a $(+ $($bound)+)?> IntoFuture for $action<'a, T> {
            type Output = Result<$output>;
            type IntoFuture = BoxFuture<'a, Self::Output>;

            fn into_future(self) -> Self::IntoFuture {
                Box::pin(self.run())
            }
        }
    };
}

/// The parts of find-like options (`FindOptions`, `FindOneOptions`: same field names) that
/// [`EncryptedCollection::prepare_find`] checks or rewrites.
struct FindChecks<'o> {
    sort: Option<&'o Document>,
    projection: &'o mut Option<Document>,
    min: Option<&'o Document>,
    max: Option<&'o Document>,
    collation: Option<&'o Collation>,
}

/// The [`FindChecks`] of `Option<FindOptions>` or `Option<FindOneOptions>`, borrowed; with
/// `no_bounds`, of the find-and-modify options, which have no `min`/`max`.
macro_rules! find_checks {
    ($options:expr) => {
        $options.as_mut().map(|o| FindChecks {
            sort: o.sort.as_ref(),
            projection: &mut o.projection,
            min: o.min.as_ref(),
            max: o.max.as_ref(),
            collation: o.collation.as_ref(),
        })
    };
    ($options:expr, no_bounds) => {
        $options.as_mut().map(|o| FindChecks {
            sort: o.sort.as_ref(),
            projection: &mut o.projection,
            min: None,
            max: None,
            collation: o.collation.as_ref(),
        })
    };
}

/// The parts of update-like options (`UpdateOptions`, `FindOneAndUpdateOptions`: same field
/// names) that [`EncryptedCollection::prepare_update`] checks or rewrites.
struct UpdateChecks<'o> {
    array_filters: &'o mut Option<Vec<Document>>,
    sort: Option<&'o Document>,
    collation: Option<&'o Collation>,
}

/// The [`UpdateChecks`] of `Option<UpdateOptions>` or `Option<FindOneAndUpdateOptions>`,
/// borrowed.
macro_rules! update_checks {
    ($options:expr) => {
        $options.as_mut().map(|o| UpdateChecks {
            array_filters: &mut o.array_filters,
            sort: o.sort.as_ref(),
            collation: o.collation.as_ref(),
        })
    };
}

/// Decrypts the document a `find_one`-like operation returned, if any.
async fn decrypt_found<T, R>(
    coll: &EncryptedCollection<T>,
    raw: Option<RawDocumentBuf>,
) -> Result<Option<R>>
where
    R: DeserializeOwned + 'static,
{
    match raw {
        Some(raw) => Ok(Some(coll.decrypt_one(raw).await?)),
        None => Ok(None),
    }
}

impl<T> EncryptedCollection<T> {
    fn trace(&self, operation: &'static str) {
        // Operation, namespace and scope only: never a filter, a document or an owner value.
        tracing::debug!(
            target: "fieldcrypt::collection",
            operation,
            namespace = self.namespace(),
            scoped = self.owner.is_some(),
        );
    }

    /// Checks the handle, traces the operation and prefetches the schema's keys.
    async fn begin(&self, operation: &'static str) -> Result<()> {
        self.check_usable()?;
        self.trace(operation);
        self.prefetch_aliases().await
    }

    /// Begins `operation` and rewrites its filter, refusing a collation that would compare
    /// an encrypted field the filter touches.
    async fn prepare_filter(
        &self,
        operation: &'static str,
        filter: &Document,
        collation: Option<&Collation>,
    ) -> Result<Document> {
        self.begin(operation).await?;
        let (filter, touched) = self.rewriter().filter_touching(filter)?;
        check_collation(collation, touched.as_ref())?;
        Ok(filter)
    }

    /// Begins `operation` and rewrites a find's filter, checking its options (sort, index
    /// bounds, collation) and rewriting its projection in place.
    async fn prepare_find(
        &self,
        operation: &'static str,
        filter: &Document,
        options: Option<FindChecks<'_>>,
    ) -> Result<Document> {
        self.begin(operation).await?;
        let q = self.rewriter();
        let (filter, touched) = q.filter_touching(filter)?;
        if let Some(o) = options {
            if let Some(s) = o.sort {
                q.sort(s)?;
            }
            if let Some(p) = o.projection {
                *p = q.projection(p)?;
            }
            for (bounds, name) in [(o.min, "min"), (o.max, "max")] {
                if let Some(b) = bounds {
                    q.bounds(b, name)?;
                }
            }
            check_collation(o.collation, touched.as_ref())?;
        }
        Ok(filter)
    }

    /// Begins `operation` and rewrites an update's filter and modifications, rewriting its
    /// array filters in place and checking its sort and collation.
    async fn prepare_update(
        &self,
        operation: &'static str,
        filter: &Document,
        update: UpdateModifications,
        options: Option<UpdateChecks<'_>>,
    ) -> Result<(Document, UpdateModifications)> {
        self.begin(operation).await?;
        let (array_filters, sort, collation) = match options {
            Some(o) => (Some(o.array_filters), o.sort, o.collation),
            None => (None, None, None),
        };
        let q = self.rewriter();
        let (new_filter, touched) = q.filter_touching(filter)?;
        let update = match update {
            UpdateModifications::Document(d) => {
                if let Some(af) = array_filters {
                    *af = af
                        .take()
                        .map(|af| q.array_filters(&af, &d, filter))
                        .transpose()?;
                }
                UpdateModifications::Document(q.update(&d, filter)?)
            }
            UpdateModifications::Pipeline(p) => {
                q.update_pipeline(&p)?;
                UpdateModifications::Pipeline(p)
            }
            _ => return Err(Error::Config("unsupported kind of update".into())),
        };
        if let Some(s) = sort {
            q.sort(s)?;
        }
        check_collation(collation, touched.as_ref())?;
        Ok((new_filter, update))
    }
}

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

    /// Replaces the document matching `filter` with `replacement`, encrypted. `_id`-bound
    /// fields take the `_id` of the replacement, or of an `_id` equality in `filter`.
    ///
    /// `await` returns `Result<UpdateResult>`.
    pub fn replace_one(&self, filter: Document, replacement: impl Borrow<T>) -> ReplaceOne<'_, T> {
        ReplaceOne {
            coll: self,
            filter,
            replacement: to_raw(replacement.borrow()),
            options: None,
            session: None,
        }
    }

    /// Replaces one document with `replacement` (encrypted, and bound to the handle's owner if
    /// scoped) and returns the document before or after, per the options, decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_replace(
        &self,
        filter: Document,
        replacement: impl Borrow<T>,
    ) -> FindOneAndReplace<'_, T> {
        FindOneAndReplace {
            coll: self,
            filter,
            replacement: to_raw(replacement.borrow()),
            options: None,
            session: None,
        }
    }
}

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
        FindOne {
            coll: self,
            filter,
            options: None,
            session: None,
        }
    }

    /// Updates one document: values written to encrypted fields are encrypted.
    ///
    /// `await` returns `Result<UpdateResult>`.
    pub fn update_one(
        &self,
        filter: Document,
        update: impl Into<UpdateModifications>,
    ) -> Update<'_, T> {
        Update {
            coll: self,
            filter,
            update: update.into(),
            many: false,
            options: None,
            session: None,
        }
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

    /// Updates one document and returns it (before or after, per the options), decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_update(
        &self,
        filter: Document,
        update: impl Into<UpdateModifications>,
    ) -> FindOneAndUpdate<'_, T> {
        FindOneAndUpdate {
            coll: self,
            filter,
            update: update.into(),
            options: None,
            session: None,
        }
    }

    /// Deletes one matching document and returns it, decrypted.
    ///
    /// `await` returns `Result<Option<T>>`.
    pub fn find_one_and_delete(&self, filter: Document) -> FindOneAndDelete<'_, T> {
        FindOneAndDelete {
            coll: self,
            filter,
            options: None,
            session: None,
        }
    }

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

    /// The distinct values of `field` among the documents matching `filter`: a plain field's
    /// as the server returns them; a deterministic field's decrypted, each value once even if
    /// it was written under several keys of its alias. Randomized, `_id`-bound and blind-index
    /// fields are refused (they have no one ciphertext per value).
    ///
    /// `await` returns `Result<Vec<Bson>>`.
    pub fn distinct(&self, field: impl Into<String>, filter: Document) -> Distinct<'_, T> {
        Distinct {
            coll: self,
            field: field.into(),
            filter,
            options: None,
            session: None,
        }
    }

    /// Counts the matching documents.
    ///
    /// `await` returns `Result<u64>`.
    pub fn count_documents(&self, filter: Document) -> CountDocuments<'_, T> {
        CountDocuments {
            coll: self,
            filter,
            options: None,
            session: None,
        }
    }

    /// Runs an aggregation pipeline (`$match` stages rewritten; stages that would evaluate,
    /// group, sort or join on encrypted fields refused). Results are decrypted.
    ///
    /// `await` returns `Result<EncryptedCursor<Document>>`; choose another result type with
    /// [`Aggregate::with_type`].
    pub fn aggregate(&self, pipeline: impl IntoIterator<Item = Document>) -> Aggregate<'_, T> {
        Aggregate {
            coll: self,
            pipeline: pipeline.into_iter().collect(),
            options: None,
            session: NoSession,
            _result: PhantomData,
        }
    }
}

// ---------------------------------------------------------------------------------------------

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

impl<'a, T> IntoFuture for Find<'a, T, NoSession>
where
    T: DeserializeOwned + Send + 'static,
{
    type Output = Result<EncryptedCursor<'static, T>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let mut options = self.options;
            let filter = coll
                .prepare_find("find", &self.filter, find_checks!(options))
                .await?;
            let batches = coll.coll.find(filter).with_options(options).batch().await?;
            Ok(cursor::from_cursor(batches, coll.decryptor()))
        })
    }
}

impl<'a, 's: 'a, T> IntoFuture for Find<'a, T, WithSession<'s>>
where
    T: DeserializeOwned + Send + 'static,
{
    type Output = Result<EncryptedCursor<'s, T>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let session = self.session.0;
            let mut options = self.options;
            let filter = coll
                .prepare_find("find", &self.filter, find_checks!(options))
                .await?;
            let batches = coll
                .coll
                .find(filter)
                .with_options(options)
                .session(&mut *session)
                .batch()
                .await?;
            Ok(cursor::from_session_cursor(
                batches,
                session,
                coll.decryptor(),
            ))
        })
    }
}

/// Finds one document. Construct with [`EncryptedCollection::find_one`].
#[must_use = "actions do nothing unless awaited"]
pub struct FindOne<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    options: Option<FindOneOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(FindOne, FindOneOptions);

into_future!(FindOne -> Option<T> where T: DeserializeOwned + 'static);

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

/// Updates one or many documents. Construct with [`EncryptedCollection::update_one`] or
/// [`EncryptedCollection::update_many`].
#[must_use = "actions do nothing unless awaited"]
pub struct Update<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    update: UpdateModifications,
    many: bool,
    options: Option<UpdateOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(Update, UpdateOptions);

into_future!(Update -> UpdateResult);

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

/// Updates one document and returns it. Construct with
/// [`EncryptedCollection::find_one_and_update`].
#[must_use = "actions do nothing unless awaited"]
pub struct FindOneAndUpdate<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    update: UpdateModifications,
    options: Option<FindOneAndUpdateOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(FindOneAndUpdate, FindOneAndUpdateOptions);

into_future!(FindOneAndUpdate -> Option<T> where T: DeserializeOwned + 'static);

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

/// Replaces one document. Construct with [`EncryptedCollection::replace_one`].
#[must_use = "actions do nothing unless awaited"]
pub struct ReplaceOne<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    replacement: Result<RawDocumentBuf>,
    options: Option<ReplaceOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(ReplaceOne, ReplaceOptions);

into_future!(ReplaceOne -> UpdateResult);

impl<'a, T: 'a> ReplaceOne<'a, T> {
    async fn run(self) -> Result<UpdateResult> {
        let coll = self.coll;
        coll.begin("replace_one").await?;
        let q = coll.rewriter();
        let replacement = q.replacement(&self.replacement?, &self.filter)?;
        let (filter, touched) = q.filter_touching(&self.filter)?;
        if let Some(o) = &self.options {
            if let Some(s) = &o.sort {
                q.sort(s)?;
            }
            check_collation(o.collation.as_ref(), touched.as_ref())?;
        }
        let action = coll
            .coll
            .replace_one(filter, replacement)
            .with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}

/// Replaces one document and returns it. Construct with
/// [`EncryptedCollection::find_one_and_replace`].
#[must_use = "actions do nothing unless awaited"]
pub struct FindOneAndReplace<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    replacement: Result<RawDocumentBuf>,
    options: Option<FindOneAndReplaceOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(FindOneAndReplace, FindOneAndReplaceOptions);

into_future!(FindOneAndReplace -> Option<T> where T: DeserializeOwned + 'static);

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

/// Deletes one document and returns it. Construct with
/// [`EncryptedCollection::find_one_and_delete`].
#[must_use = "actions do nothing unless awaited"]
pub struct FindOneAndDelete<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    options: Option<FindOneAndDeleteOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(FindOneAndDelete, FindOneAndDeleteOptions);

into_future!(FindOneAndDelete -> Option<T> where T: DeserializeOwned + 'static);

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

/// Counts documents. Construct with [`EncryptedCollection::count_documents`].
#[must_use = "actions do nothing unless awaited"]
pub struct CountDocuments<'a, T> {
    coll: &'a EncryptedCollection<T>,
    filter: Document,
    options: Option<CountOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(CountDocuments, CountOptions);

into_future!(CountDocuments -> u64);

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

/// Lists distinct values. Construct with [`EncryptedCollection::distinct`].
#[must_use = "actions do nothing unless awaited"]
pub struct Distinct<'a, T> {
    coll: &'a EncryptedCollection<T>,
    field: String,
    filter: Document,
    options: Option<DistinctOptions>,
    session: Option<&'a mut ClientSession>,
}

options_and_session!(Distinct, DistinctOptions);

into_future!(Distinct -> Vec<Bson>);

impl<'a, T: 'a> Distinct<'a, T> {
    async fn run(self) -> Result<Vec<Bson>> {
        let coll = self.coll;
        coll.begin("distinct").await?;
        let q = coll.rewriter();
        let target = q.distinct_field(&self.field, &self.filter)?;
        let (filter, touched) = q.filter_touching(&self.filter)?;
        // Distinct compares the field's values: ciphertext, for an encrypted field.
        let compared = target
            .as_ref()
            .map(|(r, _)| r.normalized.clone())
            .or(touched);
        let collation = self.options.as_ref().and_then(|o| o.collation.as_ref());
        check_collation(collation, compared.as_ref())?;
        let action = coll
            .coll
            .distinct(&self.field, filter)
            .with_options(self.options);
        let values = run!(action, self.session)?;
        match target {
            None => Ok(values),
            Some((rule, owner)) => {
                coll.decrypt_distinct(&rule.normalized, values, owner.as_ref())
                    .await
            }
        }
    }
}

/// Runs an aggregation pipeline. Construct with [`EncryptedCollection::aggregate`].
#[must_use = "actions do nothing unless awaited"]
pub struct Aggregate<'a, T, R = Document, S = NoSession> {
    coll: &'a EncryptedCollection<T>,
    pipeline: Vec<Document>,
    options: Option<AggregateOptions>,
    session: S,
    _result: PhantomData<fn() -> R>,
}

impl<'a, T, R, S> Aggregate<'a, T, R, S> {
    /// Sets the driver's aggregate options.
    pub fn with_options(mut self, options: impl Into<Option<AggregateOptions>>) -> Self {
        self.options = options.into();
        self
    }

    /// Deserializes the (decrypted) results as `U`.
    pub fn with_type<U>(self) -> Aggregate<'a, T, U, S> {
        Aggregate {
            coll: self.coll,
            pipeline: self.pipeline,
            options: self.options,
            session: self.session,
            _result: PhantomData,
        }
    }
}

impl<'a, T, R> Aggregate<'a, T, R, NoSession> {
    /// Runs the pipeline in `session` (and its transaction); the cursor reads through it.
    pub fn session<'s>(
        self,
        session: &'s mut ClientSession,
    ) -> Aggregate<'a, T, R, WithSession<'s>> {
        Aggregate {
            coll: self.coll,
            pipeline: self.pipeline,
            options: self.options,
            session: WithSession(session),
            _result: PhantomData,
        }
    }
}

impl<T> EncryptedCollection<T> {
    async fn prepare_aggregate(
        &self,
        pipeline: &[Document],
        options: Option<&AggregateOptions>,
    ) -> Result<Vec<Document>> {
        self.begin("aggregate").await?;
        let (pipeline, touched) = self.rewriter().pipeline(pipeline)?;
        if let Some(o) = options {
            check_collation(o.collation.as_ref(), touched.as_ref())?;
        }
        Ok(pipeline)
    }
}

impl<'a, T, R> IntoFuture for Aggregate<'a, T, R, NoSession>
where
    R: DeserializeOwned + Send + 'static,
{
    type Output = Result<EncryptedCursor<'static, R>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let pipeline = coll
                .prepare_aggregate(&self.pipeline, self.options.as_ref())
                .await?;
            let batches = coll
                .coll
                .aggregate(pipeline)
                .with_options(self.options)
                .batch()
                .await?;
            Ok(cursor::from_cursor(batches, coll.decryptor()))
        })
    }
}

impl<'a, 's: 'a, T, R> IntoFuture for Aggregate<'a, T, R, WithSession<'s>>
where
    R: DeserializeOwned + Send + 'static,
{
    type Output = Result<EncryptedCursor<'s, R>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let session = self.session.0;
            let pipeline = coll
                .prepare_aggregate(&self.pipeline, self.options.as_ref())
                .await?;
            let batches = coll
                .coll
                .aggregate(pipeline)
                .with_options(self.options)
                .session(&mut *session)
                .batch()
                .await?;
            Ok(cursor::from_session_cursor(
                batches,
                session,
                coll.decryptor(),
            ))
        })
    }
}
