//! The decrypting cursor: a stream of documents decrypted batch by batch as the server sends
//! them (keys prefetched once per batch, large batches decrypted in parallel off the async
//! threads).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use bson::RawDocument;
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use mongodb::raw_batch_cursor::{RawBatch, RawBatchCursor, SessionRawBatchCursor};
use mongodb::ClientSession;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::mongo::KeySource;
use crate::transform::{Context, Cryptor, PARALLEL_THRESHOLD};

/// A stream of decrypted documents, returned by `find` and `aggregate`.
///
/// Each item is one document or the error for that document (a ciphertext that does not
/// authenticate, a destroyed key, a document that does not deserialize): one bad document
/// does not end the stream. A driver error ends it, after being yielded.
///
/// Use it with [`futures_util::StreamExt`] / [`futures_util::TryStreamExt`]
/// (`next`, `try_collect`, …). `'s` is the session it reads through, if any.
#[must_use = "a cursor does nothing unless polled"]
pub struct EncryptedCursor<'s, T> {
    inner: BoxStream<'s, Result<T>>,
}

impl<T> core::fmt::Debug for EncryptedCursor<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EncryptedCursor").finish_non_exhaustive()
    }
}

impl<T> Stream for EncryptedCursor<'_, T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// What decrypting a batch needs; owned, so batches can move to a blocking thread.
#[derive(Clone)]
pub(crate) struct Decryptor {
    pub(crate) cryptor: Cryptor,
    pub(crate) ctx: Context,
    pub(crate) keys: Arc<dyn KeySource>,
}

impl Decryptor {
    /// Decrypts one batch, in order; one result per document.
    async fn batch<R>(&self, batch: RawBatch) -> Vec<Result<R>>
    where
        R: DeserializeOwned + Send + 'static,
    {
        let mut out = Vec::new();
        let (ids, count) = match batch_keys(&batch) {
            Ok(v) => v,
            Err(e) => return vec![Err(e)],
        };
        if !ids.is_empty() {
            // Documents whose keys could not be fetched fail one by one below, naming the key.
            if let Err(e) = self.keys.prefetch_ids(&ids).await {
                out.push(Err(e));
            }
        }
        tracing::trace!(
            target: "fieldcrypt::collection",
            documents = count,
            keys = ids.len(),
            "decrypting a batch"
        );
        if count >= PARALLEL_THRESHOLD {
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.decode::<R>(&batch)).await {
                Ok(items) => out.extend(items),
                Err(_) => out.push(Err(Error::TaskFailed("a decryption"))),
            }
        } else {
            out.extend(self.decode::<R>(&batch));
        }
        out
    }

    fn decode<R: DeserializeOwned + 'static>(&self, batch: &RawBatch) -> Vec<Result<R>> {
        let slots = match docs_of(batch) {
            Ok(s) => s,
            Err(e) => return vec![Err(e)],
        };
        let docs: Vec<&RawDocument> = slots
            .iter()
            .filter_map(|s| s.as_ref().ok().copied())
            .collect();
        let mut decrypted = self.cryptor.decrypt_many(&docs, &self.ctx).into_iter();
        slots
            .into_iter()
            .map(|slot| {
                slot?;
                let plain = decrypted
                    .next()
                    .unwrap_or(Err(Error::MalformedBson("batch length changed".into())))?;
                super::from_raw::<R>(plain)
            })
            .collect()
    }
}

/// The documents of a batch, each or its error, in order.
fn docs_of(batch: &RawBatch) -> Result<Vec<Result<&RawDocument>>> {
    let array = batch.doc_slices()?;
    Ok(array
        .into_iter()
        .map(|item| {
            item.map_err(Error::from)?.as_document().ok_or_else(|| {
                Error::MalformedBson("a cursor batch holds a value that is not a document".into())
            })
        })
        .collect())
}

/// The key ids referenced in a batch, and its number of documents.
fn batch_keys(batch: &RawBatch) -> Result<(Vec<crate::key::KeyId>, usize)> {
    let slots = docs_of(batch)?;
    let mut ids = Vec::new();
    for doc in slots.iter().filter_map(|s| s.as_ref().ok()) {
        // A malformed document fails on its own when decrypted.
        if let Ok(found) = Cryptor::referenced_keys(doc) {
            ids.extend(found);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok((ids, slots.len()))
}

/// Decrypts a stream of raw batches; stops after yielding a driver error.
fn decrypting<'s, R, B>(batches: B, dec: Decryptor) -> EncryptedCursor<'s, R>
where
    R: DeserializeOwned + Send + 'static,
    B: Stream<Item = mongodb::error::Result<RawBatch>> + Send + Unpin + 's,
{
    let items = stream::unfold(Some((batches, dec)), |state| async move {
        let (mut batches, dec) = state?;
        match batches.next().await {
            None => None,
            Some(Ok(batch)) => {
                let items = dec.batch::<R>(batch).await;
                Some((items, Some((batches, dec))))
            }
            Some(Err(e)) => Some((vec![Err(Error::from(e))], None)),
        }
    })
    .flat_map(stream::iter);
    EncryptedCursor {
        inner: items.boxed(),
    }
}

/// Decrypts a cursor opened without a session.
pub(crate) fn from_cursor<R>(cursor: RawBatchCursor, dec: Decryptor) -> EncryptedCursor<'static, R>
where
    R: DeserializeOwned + Send + 'static,
{
    decrypting(cursor, dec)
}

/// Decrypts a cursor opened in `session`; its later batches are fetched in that session.
pub(crate) fn from_session_cursor<'s, R>(
    cursor: SessionRawBatchCursor,
    session: &'s mut ClientSession,
    dec: Decryptor,
) -> EncryptedCursor<'s, R>
where
    R: DeserializeOwned + Send + 'static,
{
    let batches = stream::unfold((cursor, session), |(mut cursor, session)| async move {
        let next = cursor.stream(&mut *session).next().await;
        next.map(|batch| (batch, (cursor, session)))
    });
    decrypting(Box::pin(batches), dec)
}
