//! The session states of the actions that return a cursor ([`Find`](super::Find),
//! [`Aggregate`](super::Aggregate)): the cursor owns everything, or borrows the session it
//! reads its later batches through. The one place that differs between the two.

use bson::Document;
use mongodb::options::{AggregateOptions, FindOptions};
use mongodb::{BoxFuture, ClientSession};
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::mongo::collection::{cursor, EncryptedCollection, EncryptedCursor};

/// Type state of [`Find`](super::Find) and [`Aggregate`](super::Aggregate) without an
/// explicit session: the cursor they return owns everything it needs.
#[derive(Debug)]
pub struct NoSession;

/// Type state of [`Find`](super::Find) and [`Aggregate`](super::Aggregate) run in a session:
/// the cursor they return reads its later batches through that session, so it borrows it.
#[derive(Debug)]
pub struct WithSession<'s>(pub(super) &'s mut ClientSession);

/// How an action that returns a cursor meets the driver: without a session ([`NoSession`])
/// or in one ([`WithSession`]). Sealed: these two are all there is.
pub trait ActionSession<'a>: sealed::Open<'a> {}

impl<'a, S: sealed::Open<'a>> ActionSession<'a> for S {}

mod sealed {
    use super::{
        AggregateOptions, BoxFuture, DeserializeOwned, Document, EncryptedCollection, FindOptions,
        Result,
    };

    /// The session-dependent half of running [`Find`](super::super::Find) and
    /// [`Aggregate`](super::super::Aggregate): which driver call, and what the cursor borrows.
    pub trait Open<'a>: Send + 'a {
        /// The decrypting cursor an action run this way returns.
        type Cursor<R>
        where
            R: 'a;

        /// Runs the (already rewritten) find.
        fn find<T, R>(
            self,
            coll: &'a EncryptedCollection<T>,
            filter: Document,
            options: Option<FindOptions>,
        ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
        where
            R: DeserializeOwned + Send + 'static;

        /// Runs the (already rewritten) pipeline.
        fn aggregate<T, R>(
            self,
            coll: &'a EncryptedCollection<T>,
            pipeline: Vec<Document>,
            options: Option<AggregateOptions>,
        ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
        where
            R: DeserializeOwned + Send + 'static;
    }
}

impl<'a> sealed::Open<'a> for NoSession {
    type Cursor<R>
        = EncryptedCursor<'static, R>
    where
        R: 'a;

    fn find<T, R>(
        self,
        coll: &'a EncryptedCollection<T>,
        filter: Document,
        options: Option<FindOptions>,
    ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let (driver, dec) = (&coll.coll, coll.decryptor());
        Box::pin(async move {
            let batches = driver.find(filter).with_options(options).batch().await?;
            Ok(cursor::from_cursor(batches, dec))
        })
    }

    fn aggregate<T, R>(
        self,
        coll: &'a EncryptedCollection<T>,
        pipeline: Vec<Document>,
        options: Option<AggregateOptions>,
    ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let (driver, dec) = (&coll.coll, coll.decryptor());
        Box::pin(async move {
            let batches = driver
                .aggregate(pipeline)
                .with_options(options)
                .batch()
                .await?;
            Ok(cursor::from_cursor(batches, dec))
        })
    }
}

impl<'a, 's: 'a> sealed::Open<'a> for WithSession<'s> {
    type Cursor<R>
        = EncryptedCursor<'s, R>
    where
        R: 'a;

    fn find<T, R>(
        self,
        coll: &'a EncryptedCollection<T>,
        filter: Document,
        options: Option<FindOptions>,
    ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let (driver, dec, session) = (&coll.coll, coll.decryptor(), self.0);
        Box::pin(async move {
            let batches = driver
                .find(filter)
                .with_options(options)
                .session(&mut *session)
                .batch()
                .await?;
            Ok(cursor::from_session_cursor(batches, session, dec))
        })
    }

    fn aggregate<T, R>(
        self,
        coll: &'a EncryptedCollection<T>,
        pipeline: Vec<Document>,
        options: Option<AggregateOptions>,
    ) -> BoxFuture<'a, Result<Self::Cursor<R>>>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let (driver, dec, session) = (&coll.coll, coll.decryptor(), self.0);
        Box::pin(async move {
            let batches = driver
                .aggregate(pipeline)
                .with_options(options)
                .session(&mut *session)
                .batch()
                .await?;
            Ok(cursor::from_session_cursor(batches, session, dec))
        })
    }
}
