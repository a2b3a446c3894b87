//! `bulk_write`: inserts, updates, replacements and deletes of one collection in as few round
//! trips as the server allows (the driver's `Client::bulk_write`, MongoDB 8.0's `bulkWrite`
//! command). Every model is encrypted, rewritten or refused first; one refusal sends nothing.

use std::borrow::Borrow;

use bson::{Bson, Document, RawDocumentBuf};
use mongodb::options::{
    BulkWriteOptions, DeleteManyModel, DeleteOneModel, InsertOneModel, ReplaceOneModel,
    UpdateManyModel, UpdateModifications, UpdateOneModel,
};
use mongodb::results::SummaryBulkWriteResult;
use serde::Serialize;

use super::prepare::{rewrite_update, UpdateChecks};
use crate::error::Result;
use crate::mongo::collection::{to_raw, EncryptedCollection};

/// One write of a [`bulk_write`](EncryptedCollection::bulk_write), shaped like the driver's
/// `WriteModel` without its namespace (it is the collection's). Documents are `T`, encrypted
/// like [`insert_one`](EncryptedCollection::insert_one)'s and
/// [`replace_one`](EncryptedCollection::replace_one)'s; filters and updates are rewritten like
/// [`update_one`](EncryptedCollection::update_one)'s and
/// [`delete_one`](EncryptedCollection::delete_one)'s.
///
/// Its `Debug` prints which write it is, never its documents, filters or updates: they hold the
/// plaintext it is about to encrypt.
#[derive(Clone)]
#[non_exhaustive]
pub enum WriteModel<T> {
    /// Inserts a document.
    InsertOne {
        /// The document.
        document: T,
    },
    /// Updates the first matching document.
    UpdateOne {
        /// Which document.
        filter: Document,
        /// The update (operators or a pipeline).
        update: UpdateModifications,
        /// Array filters of the update's `$[<id>]` operators.
        array_filters: Option<Vec<Document>>,
        /// Insert when nothing matches.
        upsert: Option<bool>,
    },
    /// Updates every matching document.
    UpdateMany {
        /// Which documents.
        filter: Document,
        /// The update (operators or a pipeline).
        update: UpdateModifications,
        /// Array filters of the update's `$[<id>]` operators.
        array_filters: Option<Vec<Document>>,
        /// Insert when nothing matches.
        upsert: Option<bool>,
    },
    /// Replaces the first matching document.
    ReplaceOne {
        /// Which document.
        filter: Document,
        /// The new document.
        replacement: T,
        /// Insert when nothing matches.
        upsert: Option<bool>,
    },
    /// Deletes the first matching document.
    DeleteOne {
        /// Which document.
        filter: Document,
    },
    /// Deletes every matching document.
    DeleteMany {
        /// Which documents.
        filter: Document,
    },
}

impl<T> core::fmt::Debug for WriteModel<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self {
            WriteModel::InsertOne { .. } => "InsertOne",
            WriteModel::UpdateOne { .. } => "UpdateOne",
            WriteModel::UpdateMany { .. } => "UpdateMany",
            WriteModel::ReplaceOne { .. } => "ReplaceOne",
            WriteModel::DeleteOne { .. } => "DeleteOne",
            WriteModel::DeleteMany { .. } => "DeleteMany",
        };
        f.debug_struct(name).finish_non_exhaustive()
    }
}

impl<T> WriteModel<T> {
    /// Inserts `document`.
    pub fn insert_one(document: T) -> Self {
        WriteModel::InsertOne { document }
    }

    /// Updates the first document matching `filter`.
    pub fn update_one(filter: Document, update: impl Into<UpdateModifications>) -> Self {
        WriteModel::UpdateOne {
            filter,
            update: update.into(),
            array_filters: None,
            upsert: None,
        }
    }

    /// Updates every document matching `filter`.
    pub fn update_many(filter: Document, update: impl Into<UpdateModifications>) -> Self {
        WriteModel::UpdateMany {
            filter,
            update: update.into(),
            array_filters: None,
            upsert: None,
        }
    }

    /// Replaces the first document matching `filter`.
    pub fn replace_one(filter: Document, replacement: T) -> Self {
        WriteModel::ReplaceOne {
            filter,
            replacement,
            upsert: None,
        }
    }

    /// Deletes the first document matching `filter`.
    pub fn delete_one(filter: Document) -> Self {
        WriteModel::DeleteOne { filter }
    }

    /// Deletes every document matching `filter`.
    pub fn delete_many(filter: Document) -> Self {
        WriteModel::DeleteMany { filter }
    }

    /// Inserts when nothing matches (updates and replacements; other models are unchanged).
    #[must_use]
    pub fn upsert(mut self, value: bool) -> Self {
        match &mut self {
            WriteModel::UpdateOne { upsert, .. }
            | WriteModel::UpdateMany { upsert, .. }
            | WriteModel::ReplaceOne { upsert, .. } => *upsert = Some(value),
            WriteModel::InsertOne { .. }
            | WriteModel::DeleteOne { .. }
            | WriteModel::DeleteMany { .. } => {}
        }
        self
    }

    /// Sets the array filters of an update (other models are unchanged).
    #[must_use]
    pub fn array_filters(mut self, filters: Vec<Document>) -> Self {
        match &mut self {
            WriteModel::UpdateOne { array_filters, .. }
            | WriteModel::UpdateMany { array_filters, .. } => *array_filters = Some(filters),
            WriteModel::InsertOne { .. }
            | WriteModel::ReplaceOne { .. }
            | WriteModel::DeleteOne { .. }
            | WriteModel::DeleteMany { .. } => {}
        }
        self
    }
}

/// A model with its documents serialized (serialization errors are reported when run).
enum Serialized {
    Insert(Result<RawDocumentBuf>),
    Update {
        many: bool,
        filter: Document,
        update: UpdateModifications,
        array_filters: Option<Vec<Document>>,
        upsert: Option<bool>,
    },
    Replace {
        filter: Document,
        replacement: Result<RawDocumentBuf>,
        upsert: Option<bool>,
    },
    Delete {
        many: bool,
        filter: Document,
    },
}

impl<T: Serialize + Send + Sync + 'static> EncryptedCollection<T> {
    /// Runs inserts, updates, replacements and deletes on this collection in as few round
    /// trips as the server allows, in order (or not: `.ordered(false)`). Every model is
    /// prepared first — documents bound to the owner and encrypted, filters and updates
    /// rewritten — so a model that cannot work on ciphertext fails the whole call before
    /// anything is sent.
    ///
    /// Uses the `bulkWrite` command: MongoDB 8.0 or later.
    ///
    /// `await` returns `Result<SummaryBulkWriteResult>`.
    pub fn bulk_write(
        &self,
        models: impl IntoIterator<Item = impl Borrow<WriteModel<T>>>,
    ) -> BulkWrite<'_, T> {
        let models = models
            .into_iter()
            .map(|m| match m.borrow() {
                WriteModel::InsertOne { document } => Serialized::Insert(to_raw(document)),
                WriteModel::UpdateOne {
                    filter,
                    update,
                    array_filters,
                    upsert,
                }
                | WriteModel::UpdateMany {
                    filter,
                    update,
                    array_filters,
                    upsert,
                } => Serialized::Update {
                    many: matches!(m.borrow(), WriteModel::UpdateMany { .. }),
                    filter: filter.clone(),
                    update: update.clone(),
                    array_filters: array_filters.clone(),
                    upsert: *upsert,
                },
                WriteModel::ReplaceOne {
                    filter,
                    replacement,
                    upsert,
                } => Serialized::Replace {
                    filter: filter.clone(),
                    replacement: to_raw(replacement),
                    upsert: *upsert,
                },
                WriteModel::DeleteOne { filter } => Serialized::Delete {
                    many: false,
                    filter: filter.clone(),
                },
                WriteModel::DeleteMany { filter } => Serialized::Delete {
                    many: true,
                    filter: filter.clone(),
                },
            })
            .collect();
        BulkWrite::new(self, models)
    }
}

action! {
    /// Runs several writes. Construct with [`EncryptedCollection::bulk_write`].
    BulkWrite {
        models: Vec<Serialized>,
    }
    options BulkWriteOptions => SummaryBulkWriteResult
}

impl<T> BulkWrite<'_, T> {
    /// Whether a failed write stops the ones after it (the default, `true`) or not.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.options
            .get_or_insert_with(BulkWriteOptions::default)
            .ordered = Some(ordered);
        self
    }
}

impl<'a, T: 'a> BulkWrite<'a, T> {
    async fn run(self) -> Result<SummaryBulkWriteResult> {
        let coll = self.coll;
        coll.begin("bulk_write").await?;
        let q = coll.rewriter();
        let ns = coll.coll.namespace();
        let mut models: Vec<mongodb::options::WriteModel> = Vec::with_capacity(self.models.len());
        for m in self.models {
            models.push(match m {
                Serialized::Insert(doc) => {
                    let encrypted = q.insert_document(&doc?)?;
                    InsertOneModel::builder()
                        .namespace(ns.clone())
                        .document(encrypted.to_document()?)
                        .build()
                        .into()
                }
                Serialized::Update {
                    many,
                    filter,
                    update,
                    mut array_filters,
                    upsert,
                } => {
                    let checks = UpdateChecks {
                        array_filters: &mut array_filters,
                        sort: None,
                        collation: None,
                        hint: None,
                    };
                    let (filter, update) = rewrite_update(&q, &filter, update, Some(checks))?;
                    let array_filters = array_filters
                        .map(|af| af.into_iter().map(Bson::Document).collect::<Vec<_>>());
                    if many {
                        UpdateManyModel::builder()
                            .namespace(ns.clone())
                            .filter(filter)
                            .update(update)
                            .array_filters(array_filters)
                            .upsert(upsert)
                            .build()
                            .into()
                    } else {
                        UpdateOneModel::builder()
                            .namespace(ns.clone())
                            .filter(filter)
                            .update(update)
                            .array_filters(array_filters)
                            .upsert(upsert)
                            .build()
                            .into()
                    }
                }
                Serialized::Replace {
                    filter,
                    replacement,
                    upsert,
                } => {
                    let replacement = q.replacement(&replacement?, &filter)?;
                    ReplaceOneModel::builder()
                        .namespace(ns.clone())
                        .filter(q.filter(&filter)?)
                        .replacement(replacement.to_document()?)
                        .upsert(upsert)
                        .build()
                        .into()
                }
                Serialized::Delete { many, filter } => {
                    let filter = q.filter(&filter)?;
                    if many {
                        DeleteManyModel::builder()
                            .namespace(ns.clone())
                            .filter(filter)
                            .build()
                            .into()
                    } else {
                        DeleteOneModel::builder()
                            .namespace(ns.clone())
                            .filter(filter)
                            .build()
                            .into()
                    }
                }
            });
        }
        let action = coll
            .coll
            .client()
            .bulk_write(models)
            .with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
