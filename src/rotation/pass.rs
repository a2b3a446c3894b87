//! One pass of the engine over one target: the state a run keeps for a collection (its
//! checkpoint, its report, where the next batch comes from) and the steps it takes, in order.
//!
//! ```text
//!  Pass::start   prefetch keys ─▶ primaries ─▶ checkpoint (resume, or restart on new primaries)
//!  Pass::run     Started ─▶ loop:
//!                  refresh_primaries (a new primary: start over)
//!                  next_batch (failed `_id`s to retry first, then the scan) ─▶ BatchRead
//!                  write_batch (inspect, re-encrypt, compare-and-set) ─▶ BatchWritten
//!                  checkpoint ─▶ Checkpointed ─▶ throttle
//!                ─▶ finish (done only if nothing is left unresolved) ─▶ Finished
//! ```
//!
//! The progress callback may stop the pass at every phase; it then returns what it has, as a
//! killed process would leave it, without saving anything further.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{Bson, RawDocumentBuf};

use super::checkpoint::{Checkpoint, Store};
use super::inspect::Primaries;
use super::scan::{Batch, Scanner};
use super::{
    fetch, lossy, record_failures, Decide, Flow, Partition, Phase, Progress, Rotator, Stats,
    Target, TargetReport, Work,
};
use crate::error::Result;
use crate::keyring::Keyring;
use crate::transform::Cryptor;

/// Where a batch came from, and so what the checkpoint records once it is written.
enum Source {
    /// The first `n` of the checkpoint's failed `_id`s, retried.
    Retry(usize),
    /// The scan, up to this `_id`.
    Scan(Bson),
}

/// One pass over one target.
pub(super) struct Pass<'a, F> {
    rotator: &'a Rotator,
    target: &'a Target,
    progress: &'a mut F,
    ns: String,
    label: String,
    store: Store,
    /// The checkpoint's key (job, namespace, partition).
    key: String,
    keyring: Arc<dyn Keyring>,
    cryptor: Cryptor,
    aliases: Vec<String>,
    primaries: Primaries,
    started: Instant,
    estimated_total: Option<u64>,
    /// The counts of earlier runs of the job, from the checkpoint; [`Pass::totals`] adds this
    /// run's.
    base: Stats,
    rep: TargetReport,
    cp: Checkpoint,
    /// Documents that failed earlier in this pass are retried first: they are the front
    /// `retry` entries of `cp.failed_ids`; this run's failures are appended behind them, so the
    /// checkpoint always holds every failure not yet resolved.
    retry: usize,
    scanner: Scanner,
}

impl<'a, F> Pass<'a, F>
where
    F: FnMut(&Progress<'_>) -> Flow + Send,
{
    /// Prepares a pass: keys fetched, primaries resolved, the checkpoint loaded when resuming
    /// (and dropped when the primaries changed since it was saved).
    pub(super) async fn start(
        rotator: &'a Rotator,
        target: &'a Target,
        progress: &'a mut F,
    ) -> Result<Self> {
        let o = &rotator.options;
        let ns = target.namespace();
        let label = o.partition.label();
        let store = rotator.store(target);
        let key = Store::key(&o.job, &ns, &label);
        let keyring: Arc<dyn Keyring> = rotator.keys.clone();
        let cryptor = Cryptor::with_shared(keyring.clone(), target.schema.clone());

        let aliases: Vec<String> = target
            .schema
            .aliases()
            .into_iter()
            .map(str::to_owned)
            .collect();
        rotator.keys.prefetch_aliases(&aliases).await?;
        let primaries = Primaries::resolve(&target.schema, keyring.as_ref())?;

        let started = Instant::now();
        let mut rep = TargetReport {
            namespace: ns.clone(),
            partition: label.clone(),
            stats: Stats::default(),
            totals: Stats::default(),
            complete: false,
            unresolved: 0,
            resumed: false,
            restarted: false,
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let mut cp = Checkpoint {
            primaries: primaries.sorted(),
            started: Some(bson::DateTime::now()),
            ..Checkpoint::default()
        };
        if o.resume {
            if let Some(saved) = store.load(&key).await? {
                if saved.primaries == cp.primaries {
                    rep.resumed = true;
                    cp = saved;
                } else {
                    rep.restarted = true;
                }
            }
        }
        let base = cp.totals;
        rep.totals = base;
        let estimated_total = match &o.partition {
            Partition::Range { .. } => None,
            p => {
                let n = target.collection.estimated_document_count().await?;
                Some(n / u64::try_from(p.spread()).unwrap_or(1).max(1))
            }
        };
        let retry = cp.failed_ids.len();
        let scanner = Scanner::new(
            target.collection.clone(),
            o.partition.clone(),
            cp.last_id.clone(),
            o.batch_size,
        );
        Ok(Pass {
            rotator,
            target,
            progress,
            ns,
            label,
            store,
            key,
            keyring,
            cryptor,
            aliases,
            primaries,
            started,
            estimated_total,
            base,
            rep,
            cp,
            retry,
            scanner,
        })
    }

    /// Runs the pass to its end, or until the progress callback says stop.
    ///
    /// # Errors
    /// Key and MongoDB errors (the pass stops there; resume it later).
    pub(super) async fn run(mut self) -> Result<(TargetReport, Flow)> {
        if self.report(Phase::Started) == Flow::Stop {
            return Ok((self.rep, Flow::Stop));
        }
        if self.cp.done {
            self.rep.complete = true;
            let flow = self.report(Phase::Finished);
            return Ok((self.rep, flow));
        }
        loop {
            self.refresh_primaries().await?;
            let Some((docs, source)) = self.next_batch().await? else {
                break;
            };
            self.rep.stats.scanned += docs.len() as u64;
            if self.report(Phase::BatchRead) == Flow::Stop {
                return Ok((self.rep, Flow::Stop));
            }
            self.write_batch(docs, source).await?;
            if self.report(Phase::BatchWritten) == Flow::Stop {
                return Ok((self.rep, Flow::Stop));
            }
            self.checkpoint().await?;
            if self.report(Phase::Checkpointed) == Flow::Stop {
                return Ok((self.rep, Flow::Stop));
            }
            if self.retry == 0 && self.scanner.exhausted() {
                break;
            }
            self.throttle().await;
        }
        self.finish().await
    }

    /// The counts over every run of the job: the checkpoint's plus this run's.
    fn totals(&self) -> Stats {
        let mut t = self.base;
        t.add(&self.rep.stats);
        t
    }

    /// Failed documents this pass has not resolved yet (remembered or only counted).
    fn unresolved(&self) -> u64 {
        self.cp.failed_ids.len() as u64 + self.cp.unrecorded
    }

    /// Brings the report up to date and tells the callback where the pass is.
    fn report(&mut self, phase: Phase) -> Flow {
        self.rep.unresolved = self.unresolved();
        self.rep.elapsed = self.started.elapsed();
        self.rep.totals = self.totals();
        let p = Progress {
            namespace: &self.ns,
            partition: &self.label,
            phase,
            stats: self.rep.stats,
            totals: self.rep.totals,
            estimated_total: self.estimated_total,
            elapsed: self.rep.elapsed,
        };
        (self.progress)(&p)
    }

    /// A key vault's cache expires and its usage leases run out: refresh per batch. If an
    /// alias got a new primary meanwhile, what was done so far is stale: start over.
    async fn refresh_primaries(&mut self) -> Result<()> {
        let o = &self.rotator.options;
        self.rotator.keys.prefetch_aliases(&self.aliases).await?;
        let now = Primaries::resolve(&self.target.schema, self.keyring.as_ref())?;
        if now.sorted() != self.primaries.sorted() {
            tracing::info!(namespace = %self.ns, "a primary key changed during the run; starting over");
            self.primaries = now;
            self.cp.primaries = self.primaries.sorted();
            self.cp.last_id = None;
            // Every document is visited again, failed ones included.
            self.cp.failed_ids.clear();
            self.cp.unrecorded = 0;
            self.retry = 0;
            self.rep.restarted = true;
            self.scanner = Scanner::new(
                self.target.collection.clone(),
                o.partition.clone(),
                None,
                o.batch_size,
            );
        }
        Ok(())
    }

    /// The next batch: documents to retry, then those after the checkpoint, in `_id` order.
    /// `None` when the scan is over.
    async fn next_batch(&mut self) -> Result<Option<(Vec<RawDocumentBuf>, Source)>> {
        if self.retry > 0 {
            let n = self.retry.min(self.rotator.options.batch_size);
            let docs = fetch(&self.target.collection, &self.cp.failed_ids[..n]).await?;
            return Ok(Some((docs, Source::Retry(n))));
        }
        Ok(self
            .scanner
            .next_batch()
            .await?
            .map(|Batch { docs, last_id }| (docs, Source::Scan(last_id))))
    }

    /// Inspects, re-encrypts and writes a batch (retrying conflicts), then records in the
    /// checkpoint how far it got and what failed.
    async fn write_batch(&mut self, docs: Vec<RawDocumentBuf>, source: Source) -> Result<()> {
        let o = &self.rotator.options;
        let work = Work {
            target: self.target,
            cryptor: &self.cryptor,
            primaries: &self.primaries,
            aliases: &self.aliases,
            decide: Decide {
                migrate_plaintext: o.migrate_plaintext,
                migrate_csfle: o.migrate_csfle,
                migrate_qe: o.migrate_qe,
            },
        };
        let mut failed = Vec::new();
        self.rotator
            .process(&work, docs, &mut self.rep, &mut failed)
            .await?;
        match source {
            Source::Scan(id) => self.cp.last_id = Some(id),
            Source::Retry(n) => {
                self.cp.failed_ids.drain(..n);
                self.retry -= n;
            }
        }
        record_failures(&mut self.cp, failed)
    }

    /// Saves the checkpoint with the totals so far (not in a dry run).
    async fn checkpoint(&mut self) -> Result<()> {
        let o = &self.rotator.options;
        self.cp.totals = self.totals();
        if !o.dry_run {
            self.store
                .save(&self.key, &o.job, &self.ns, &self.label, &self.cp)
                .await?;
        }
        Ok(())
    }

    /// Waits as long as the rate limit asks.
    async fn throttle(&self) {
        if let Some(rate) = self.rotator.options.rate_limit {
            let want = Duration::from_secs_f64(lossy(self.rep.stats.scanned) / rate);
            let spent = self.started.elapsed();
            if want > spent {
                tokio::time::sleep(want - spent).await;
            }
        }
    }

    /// The pass is over. It is done only if nothing failed; otherwise the failed documents
    /// stay in the checkpoint for the next run to retry, or, if there were too many to
    /// remember, the next run scans the partition again.
    async fn finish(mut self) -> Result<(TargetReport, Flow)> {
        let unresolved = self.unresolved();
        self.rep.complete = unresolved == 0;
        self.cp.done = self.rep.complete;
        if self.cp.unrecorded > 0 {
            self.cp.last_id = None;
            self.cp.failed_ids.clear();
            self.cp.unrecorded = 0;
        }
        self.checkpoint().await?;
        let flow = self.report(Phase::Finished);
        self.rep.unresolved = unresolved;
        Ok((self.rep, flow))
    }
}
