//! Reading a collection (or one partition of it) in `_id` order, a batch at a time, from a
//! single server cursor.
//!
//! The cursor walks the `_id` index, so a document the engine rewrites never comes back (its
//! `_id` does not change) and memory holds one batch. Whole partitions and `_id` ranges read
//! full documents; hash partitions read only `_id`s (a covered index scan on MongoDB), keep
//! their own, and fetch those documents by `_id`. A cursor the server has dropped (idle
//! timeout) is reopened after the last `_id` read.

use bson::{doc, Bson, Document, RawDocumentBuf};
use futures_util::TryStreamExt;
use mongodb::{Collection, Cursor};

use super::partition::{self, Partition};
use super::{fetch, id_value};
use crate::error::{Error, Result};
use crate::rawbson;

/// MongoDB's error code for a cursor the server no longer has.
const CURSOR_NOT_FOUND: i32 = 43;

/// One batch: the documents to process and the last `_id` read (the next checkpoint).
pub(crate) struct Batch {
    pub docs: Vec<RawDocumentBuf>,
    pub last_id: Bson,
}

pub(crate) struct Scanner {
    coll: Collection<RawDocumentBuf>,
    partition: Partition,
    batch: usize,
    cursor: Option<Cursor<RawDocumentBuf>>,
    last: Option<Bson>,
    done: bool,
}

impl Scanner {
    pub(crate) fn new(
        coll: Collection<RawDocumentBuf>,
        partition: Partition,
        after: Option<Bson>,
        batch: usize,
    ) -> Self {
        Scanner {
            coll,
            partition,
            batch,
            cursor: None,
            last: after,
            done: false,
        }
    }

    fn ids_only(&self) -> bool {
        matches!(self.partition, Partition::Hash { .. })
    }

    /// How many `_id`s to read for one batch of a hash partition.
    fn scan_len(&self) -> usize {
        self.batch
            .saturating_mul(self.partition.spread())
            .clamp(self.batch, 100_000)
    }

    async fn open(&mut self) -> Result<()> {
        let range = self.partition.filter();
        let filter: Document = match (&self.last, range.is_empty()) {
            (None, _) => range,
            (Some(l), true) => partition::after(l),
            (Some(l), false) => doc! { "$and": [range, partition::after(l)] },
        };
        let size = if self.ids_only() {
            self.scan_len()
        } else {
            self.batch
        };
        let mut find = self
            .coll
            .find(filter)
            .sort(doc! { "_id": 1 })
            .batch_size(u32::try_from(size.min(100_000)).unwrap_or(100_000));
        if self.ids_only() {
            find = find.projection(doc! { "_id": 1 });
        }
        self.cursor = Some(find.await?);
        Ok(())
    }

    /// The next document (or `_id`-only document) from the cursor.
    async fn next(&mut self) -> Result<Option<RawDocumentBuf>> {
        if self.cursor.is_none() {
            self.open().await?;
        }
        let mut reopened = false;
        loop {
            let Some(cursor) = self.cursor.as_mut() else {
                return Ok(None);
            };
            match cursor.try_next().await {
                Ok(Some(d)) => {
                    self.last = Some(id_value(&d)?);
                    return Ok(Some(d));
                }
                Ok(None) => return Ok(None),
                Err(e) if !reopened && is_cursor_gone(&e) => {
                    reopened = true;
                    self.open().await?;
                }
                Err(e) => return Err(Error::from(e)),
            }
        }
    }

    /// The next batch, or `None` when the partition is exhausted.
    pub(crate) async fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.done {
            return Ok(None);
        }
        let mut docs = Vec::with_capacity(self.batch);
        if self.ids_only() {
            let mut own = Vec::with_capacity(self.batch);
            let mut read = 0;
            while own.len() < self.batch && read < self.scan_len() {
                let Some(d) = self.next().await? else {
                    self.done = true;
                    break;
                };
                read += 1;
                let e = rawbson::find(&d, "_id")?
                    .ok_or_else(|| Error::MalformedBson("a document has no _id".into()))?;
                if self.partition.owns(e.ty, e.value) {
                    own.push(id_value(&d)?);
                }
            }
            if read == 0 {
                return Ok(None);
            }
            docs = fetch(&self.coll, &own).await?;
        } else {
            while docs.len() < self.batch {
                let Some(d) = self.next().await? else {
                    self.done = true;
                    break;
                };
                docs.push(d);
            }
            if docs.is_empty() {
                return Ok(None);
            }
        }
        let last_id = self
            .last
            .clone()
            .ok_or_else(|| Error::MalformedBson("a document has no _id".into()))?;
        Ok(Some(Batch { docs, last_id }))
    }

    /// Whether the last batch was the final one.
    pub(crate) fn exhausted(&self) -> bool {
        self.done
    }
}

fn is_cursor_gone(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, mongodb::error::ErrorKind::Command(c) if c.code == CURSOR_NOT_FOUND)
}
