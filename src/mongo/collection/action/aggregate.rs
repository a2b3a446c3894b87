//! `aggregate`: the pipeline rewritten (`$match` stages like filters, the owner `$match`
//! first) or refused; results decrypted batch by batch.

use std::future::IntoFuture;
use std::marker::PhantomData;

use bson::Document;
use mongodb::options::AggregateOptions;
use mongodb::{BoxFuture, ClientSession};
use serde::de::DeserializeOwned;

use super::session::{ActionSession, NoSession, WithSession};
use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
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

impl<'a, T, R, S> IntoFuture for Aggregate<'a, T, R, S>
where
    R: DeserializeOwned + Send + 'static,
    S: ActionSession<'a>,
{
    type Output = Result<S::Cursor<R>>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            let mut options = self.options;
            let pipeline = coll
                .prepare_aggregate(&self.pipeline, options.as_mut())
                .await?;
            self.session.aggregate(coll, pipeline, options).await
        })
    }
}
