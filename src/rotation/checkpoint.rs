//! Checkpoints: how far each (job, collection, partition) has got, kept in MongoDB.
//!
//! One document per (job, namespace, partition), written after every batch:
//!
//! ```text
//! { _id: "<job>|<db.coll>|<partition>", job, namespace, partition,
//!   last_id: <the last _id scanned>, done: bool,
//!   primaries: { <alias>: <key id>, … },      // the keys the run re-encrypted to
//!   totals: { scanned, rewritten, … },        // summed over every run of the job
//!   failed_ids: [ <_id>, … ],                 // failed in this pass, not yet retried
//!   unrecorded: <failures beyond failed_ids>, // then the next run scans everything again
//!   started: date, updated: date }
//! ```
//!
//! `done` is set only when a pass over the partition ends with no unresolved failure, so a
//! resumed run never skips a document that could not be processed.

use bson::{doc, Bson, Document};
use mongodb::Collection;

use super::Stats;
use crate::error::Result;
use crate::key::KeyId;

/// The saved state of one partition of one job.
#[derive(Clone, Debug, Default)]
pub(crate) struct Checkpoint {
    pub last_id: Option<Bson>,
    pub done: bool,
    pub primaries: Vec<(String, KeyId)>,
    pub totals: Stats,
    /// `_id`s of documents that failed in this pass and have not been processed since.
    pub failed_ids: Vec<Bson>,
    /// Failures of this pass beyond those in `failed_ids` (too many to keep).
    pub unrecorded: u64,
    pub started: Option<bson::DateTime>,
}

/// Where checkpoints live.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    coll: Collection<Document>,
}

impl Store {
    pub(crate) fn new(coll: Collection<Document>) -> Self {
        Store { coll }
    }

    pub(crate) fn key(job: &str, namespace: &str, partition: &str) -> String {
        format!("{job}|{namespace}|{partition}")
    }

    pub(crate) async fn load(&self, key: &str) -> Result<Option<Checkpoint>> {
        let Some(d) = self.coll.find_one(doc! { "_id": key }).await? else {
            return Ok(None);
        };
        let primaries = d
            .get_document("primaries")
            .map(|p| {
                p.iter()
                    .filter_map(|(alias, v)| match v {
                        Bson::Binary(b) => KeyId::from_slice(&b.bytes)
                            .ok()
                            .map(|id| (alias.clone(), id)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Checkpoint {
            last_id: d.get("last_id").cloned(),
            done: d.get_bool("done").unwrap_or(false),
            primaries,
            totals: d
                .get_document("totals")
                .map(Stats::from_document)
                .unwrap_or_default(),
            failed_ids: d
                .get_array("failed_ids")
                .map(|a| a.to_vec())
                .unwrap_or_default(),
            unrecorded: match d.get("unrecorded") {
                Some(Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
                Some(Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            },
            started: d.get_datetime("started").ok().copied(),
        }))
    }

    pub(crate) async fn save(
        &self,
        key: &str,
        job: &str,
        namespace: &str,
        partition: &str,
        cp: &Checkpoint,
    ) -> Result<()> {
        let mut primaries = Document::new();
        for (alias, id) in &cp.primaries {
            primaries.insert(alias.clone(), id.to_binary());
        }
        let now = bson::DateTime::now();
        let mut d = doc! {
            "_id": key,
            "job": job,
            "namespace": namespace,
            "partition": partition,
            "done": cp.done,
            "primaries": primaries,
            "totals": cp.totals.to_document(),
            "failed_ids": cp.failed_ids.clone(),
            "unrecorded": i64::try_from(cp.unrecorded).unwrap_or(i64::MAX),
            "started": cp.started.unwrap_or(now),
            "updated": now,
        };
        if let Some(id) = &cp.last_id {
            d.insert("last_id", id.clone());
        }
        self.coll
            .replace_one(doc! { "_id": key }, d)
            .upsert(true)
            .await?;
        Ok(())
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        self.coll.delete_one(doc! { "_id": key }).await?;
        Ok(())
    }
}
