//! The re-encryption engine (feature `mongodb`): key rotation, and migration of plaintext or
//! MongoDB CSFLE fields to fieldcrypt, over whole collections, online.
//!
//! A [`Rotator`] walks each [`Target`] collection in `_id` order, a batch at a time, and for
//! every document decides from the raw bytes alone whether it is current: every encrypted field
//! holds a fieldcrypt envelope under the *primary* key of the field's alias, in the schema's
//! suite and bindings, and every blind index is computed with its alias's primary. Documents
//! that are not current are decrypted and re-encrypted ([`Cryptor::decrypt_raw`] then
//! [`Cryptor::encrypt_raw`]) and written back with a compare-and-set update.
//!
//! ```text
//!  _id scan (sorted, after checkpoint) ──▶ partition filter ──▶ fetch batch (raw BSON)
//!    ──▶ inspect: current? ──no──▶ decrypt_raw ─▶ encrypt_raw ─▶ diff old/new
//!    ──▶ update {_id, <changed path>: <old value>, …} $set <new values>   (one command per batch)
//!    ──▶ conflicts re-read and retried ──▶ checkpoint {last _id, totals} ──▶ progress callback
//! ```
//!
//! Where each step lives: `rotation/pass.rs` is one pass over one target (its state and its
//! steps, in order); `scan.rs` the `_id` scan, `partition.rs` the partition filters,
//! `inspect.rs` the look at one stored document (through the core's schema walk,
//! `schema/walk.rs`), `cas.rs` the compare-and-set update, `checkpoint.rs` the checkpoints;
//! deciding and writing one batch stay here.
//!
//! - **Concurrency-safe.** The update's filter pins `_id` and the old value of every path it
//!   changes, and it `$set`s only those paths; an application write that lands between the read
//!   and the write makes it match nothing, so that write is never lost. Such documents are
//!   re-read and retried ([`Stats::conflicts`]).
//! - **Resumable, idempotent.** After each batch the last `_id` scanned is saved in a checkpoint
//!   collection (default `fieldcrypt.checkpoints` on the target's cluster), one per
//!   (job, collection, partition). With [`RotationOptions::resume`] a run continues after it.
//!   Documents are rewritten only when they are not current, so repeating any part of the work
//!   — after a crash between a write and its checkpoint, or a whole second run — changes nothing.
//! - **Scale-out.** [`Partition`] splits a collection between workers by a hash of `_id`, or
//!   by `_id` ranges; each partition has its own checkpoint, so workers run at once.
//! - **Bounded memory.** A batch at a time; nothing grows with the collection.
//!
//! See `docs/ROTATION.md` for the design and what happens when a run is killed.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use bson::RawDocumentBuf;
//! use fieldcrypt::rotation::{Flow, RotationOptions, Rotator, Target};
//! use fieldcrypt::{Field, InMemoryKeyring, Schema};
//!
//! # async fn demo(client: mongodb::Client) -> fieldcrypt::Result<()> {
//! let keys = Arc::new(InMemoryKeyring::load("keyset.json")?);
//! keys.rotate("pii"); // new primary; documents still reference the old key
//! let schema = Schema::builder().field("ssn", Field::randomized("pii")).build()?;
//! let users = client.database("app").collection::<RawDocumentBuf>("users");
//! let report = Rotator::new(keys)
//!     .options(RotationOptions::default().batch_size(500).resume(true))
//!     .run(&[Target::new(&users, schema)], |p| {
//!         eprintln!("{}: {} scanned, {} rewritten", p.namespace, p.stats.scanned, p.stats.rewritten);
//!         Flow::Continue
//!     })
//!     .await?;
//! assert_eq!(report.stats().failed, 0);
//! # Ok(()) }
//! ```

/// Builder setters for plain option fields: `name(value)` sets `name`, documented as such.
macro_rules! setters {
    ($options:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        impl $options {
            $(
                #[doc = concat!("Sets [`", stringify!($options), "::", stringify!($field), "`].")]
                #[must_use]
                pub fn $field(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

mod audit;
mod cas;
mod checkpoint;
mod inspect;
mod partition;
mod pass;
mod scan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document, RawArrayBuf, RawDocument, RawDocumentBuf};
use futures_util::TryStreamExt;
use mongodb::{Collection, Database};
use rayon::prelude::*;
use zeroize::Zeroizing;

pub use audit::{Audit, AuditFinding, AuditOptions, AuditReport, KeyUsage, TokenKind};
pub use inspect::{references, References};
pub use partition::Partition;

use self::cas::Change;
use self::checkpoint::{Checkpoint, Store};
use self::inspect::{Inspector, Primaries};
use self::pass::Pass;
use crate::error::{ArgumentError, Error, Result};
use crate::key::KeyId;
use crate::mongo::KeySource;
use crate::rawbson;
use crate::schema::Schema;
use crate::transform::{Context, Cryptor, PARALLEL_THRESHOLD};

/// The default checkpoint database and collection.
pub const DEFAULT_CHECKPOINT_NAMESPACE: (&str, &str) = ("fieldcrypt", "checkpoints");

/// Largest `update` command sent at once (the server takes 16 MiB; leave room).
const MAX_COMMAND_BYTES: usize = 8 << 20;

/// At most this many failed `_id`s are kept in a checkpoint for retrying (beyond that, the
/// next run of the job scans the whole partition again)…
const MAX_RECORDED_FAILURES: usize = 10_000;
/// … and at most this many bytes of them (a checkpoint is one document, under 16 MiB).
const MAX_RECORDED_FAILURE_BYTES: usize = 4 << 20;

/// One collection to process, with its schema.
#[derive(Clone, Debug)]
pub struct Target {
    collection: Collection<RawDocumentBuf>,
    schema: Arc<Schema>,
    context: Context,
}

impl Target {
    /// The collection and the schema its documents should follow. Ciphertexts are taken to be
    /// bound to the collection's namespace (`db.collection`), as
    /// `mongo::EncryptedCollection` binds them; see [`Target::context`] otherwise.
    pub fn new<T: Send + Sync>(collection: &Collection<T>, schema: impl Into<Arc<Schema>>) -> Self {
        let ns = collection.namespace().to_string();
        Target {
            collection: collection.clone_with_type(),
            schema: schema.into(),
            context: Context::namespace(ns),
        }
    }

    /// Uses another context for decryption and re-encryption (e.g. [`Context::none`] for
    /// documents written without a namespace binding).
    #[must_use]
    pub fn context(mut self, context: Context) -> Self {
        self.context = context;
        self
    }

    /// `db.collection`.
    #[must_use]
    pub fn namespace(&self) -> String {
        self.collection.namespace().to_string()
    }
}

/// Options of a run. Start from [`RotationOptions::default`] and chain the setters.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RotationOptions {
    /// Names the job in checkpoints, so that different jobs over one collection keep separate
    /// positions. Default `"reencrypt"`.
    pub job: String,
    /// Documents per batch (one read, one write command, one checkpoint). Default 500.
    pub batch_size: usize,
    /// The share of each collection this worker processes. Default: all of it.
    pub partition: Partition,
    /// Continue after the saved checkpoint (and skip finished collections) instead of starting
    /// over. Default `false`.
    pub resume: bool,
    /// Inspect and re-encrypt in memory, but write nothing (neither documents nor checkpoints);
    /// [`Stats::rewritten`] counts what would be written. Default `false`.
    pub dry_run: bool,
    /// At most this many documents scanned per second. Default: no limit.
    pub rate_limit: Option<f64>,
    /// Encrypt schema fields that hold plaintext (adopting fieldcrypt on an existing
    /// collection). Default `false`: such documents are counted as skipped.
    pub migrate_plaintext: bool,
    /// Re-encrypt MongoDB CSFLE values in schema fields with fieldcrypt (their 96-byte keys
    /// must be in the keyring as [`KeyKind::Csfle`](crate::KeyKind::Csfle) keys). Default
    /// `false`: such documents are counted as skipped.
    pub migrate_csfle: bool,
    /// Re-encrypt MongoDB Queryable Encryption values (all four stored forms) in schema fields
    /// with fieldcrypt, and remove the top-level `__safeContent__` (their keys must be in the
    /// keyring as [`KeyKind::Csfle`](crate::KeyKind::Csfle) keys: the same 96-byte key-vault
    /// keys). Default `false`: such documents are counted as skipped, and `__safeContent__`
    /// is left alone.
    pub migrate_qe: bool,
    /// How many times a document that keeps changing under the engine is re-read and retried
    /// before it is counted as failed. Default 10.
    pub max_retries: u32,
    /// How many failures are listed in the report (all are counted). Default 100.
    pub max_failures_listed: usize,
}

impl Default for RotationOptions {
    fn default() -> Self {
        RotationOptions {
            job: "reencrypt".into(),
            batch_size: 500,
            partition: Partition::All,
            resume: false,
            dry_run: false,
            rate_limit: None,
            migrate_plaintext: false,
            migrate_csfle: false,
            migrate_qe: false,
            max_retries: 10,
            max_failures_listed: 100,
        }
    }
}

setters!(RotationOptions {
    batch_size: usize,
    partition: Partition,
    resume: bool,
    dry_run: bool,
    rate_limit: Option<f64>,
    migrate_plaintext: bool,
    migrate_csfle: bool,
    migrate_qe: bool,
    max_retries: u32,
});

impl RotationOptions {
    /// Sets [`RotationOptions::job`].
    #[must_use]
    pub fn job(mut self, job: impl Into<String>) -> Self {
        self.job = job.into();
        self
    }
    fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(Error::from(ArgumentError::BatchSize));
        }
        if self.rate_limit.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(Error::from(ArgumentError::RateLimit));
        }
        if self.job.is_empty() || self.job.contains('|') {
            return Err(Error::from(ArgumentError::JobName));
        }
        Ok(())
    }
}

/// Document counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Documents read (in this worker's partition).
    pub scanned: u64,
    /// Documents written back re-encrypted (in a dry run: that would be).
    pub rewritten: u64,
    /// Documents already current: nothing to do.
    pub current: u64,
    /// Compare-and-set writes that found the document changed since it was read; each is
    /// re-read and retried.
    pub conflicts: u64,
    /// Documents that could not be processed (see [`TargetReport::failures`]).
    pub failed: u64,
    /// Documents that need work this run was not asked to do (plaintext or CSFLE values
    /// without [`RotationOptions::migrate_plaintext`] / [`RotationOptions::migrate_csfle`] /
    /// [`RotationOptions::migrate_qe`]).
    pub skipped: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.scanned += o.scanned;
        self.rewritten += o.rewritten;
        self.current += o.current;
        self.conflicts += o.conflicts;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }

    fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("scanned", self.scanned),
            ("rewritten", self.rewritten),
            ("current", self.current),
            ("conflicts", self.conflicts),
            ("failed", self.failed),
            ("skipped", self.skipped),
        ]
    }

    pub(crate) fn to_document(self) -> Document {
        let mut d = Document::new();
        for (k, v) in self.fields() {
            d.insert(k, i64::try_from(v).unwrap_or(i64::MAX));
        }
        d
    }

    pub(crate) fn from_document(d: &Document) -> Self {
        let get = |k: &str| {
            d.get(k)
                .and_then(|v| match v {
                    Bson::Int64(n) => u64::try_from(*n).ok(),
                    Bson::Int32(n) => u64::try_from(*n).ok(),
                    _ => None,
                })
                .unwrap_or(0)
        };
        Stats {
            scanned: get("scanned"),
            rewritten: get("rewritten"),
            current: get("current"),
            conflicts: get("conflicts"),
            failed: get("failed"),
            skipped: get("skipped"),
        }
    }
}

/// Where a run is, for a progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// A target is about to be processed.
    Started,
    /// A batch has been read; nothing of it is written yet.
    BatchRead,
    /// A batch's writes are done; its checkpoint is not saved yet.
    BatchWritten,
    /// The batch's checkpoint is saved.
    Checkpointed,
    /// The target is finished (or was already, on a resumed run).
    Finished,
}

/// What the progress callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Stop now, as a killed process would (without saving anything further); the run returns
    /// its report with [`Report::stopped`] set. A later run with
    /// [`RotationOptions::resume`] continues.
    Stop,
}

/// A progress report, given to the callback at every [`Phase`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Progress<'a> {
    /// `db.collection`.
    pub namespace: &'a str,
    /// The partition's label ([`Partition::label`]).
    pub partition: &'a str,
    /// Where the run is.
    pub phase: Phase,
    /// Counts for this target in this run.
    pub stats: Stats,
    /// Counts for this target over every run of the job (from the checkpoint, plus this run).
    pub totals: Stats,
    /// The estimated number of documents in this partition of the collection.
    pub estimated_total: Option<u64>,
    /// Time since this target started in this run.
    pub elapsed: Duration,
}

impl Progress<'_> {
    /// Documents scanned per second in this run.
    #[must_use]
    pub fn rate(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            lossy(self.stats.scanned) / s
        } else {
            0.0
        }
    }

    /// Estimated time left for this target.
    #[must_use]
    pub fn eta(&self) -> Option<Duration> {
        let total = self.estimated_total?;
        let rate = self.rate();
        if rate <= 0.0 {
            return None;
        }
        let left = total.saturating_sub(self.totals.scanned);
        Some(Duration::from_secs_f64(lossy(left) / rate))
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52; only used for rates
fn lossy(n: u64) -> f64 {
    n as f64
}

/// A document that could not be processed.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Failure {
    /// The document's `_id`.
    pub id: Bson,
    /// Why (never a value; names key ids and field paths only).
    pub reason: String,
}

/// The outcome for one target.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TargetReport {
    /// `db.collection`.
    pub namespace: String,
    /// The partition's label.
    pub partition: String,
    /// Counts of this run.
    pub stats: Stats,
    /// Counts over every run of the job (from the checkpoint).
    pub totals: Stats,
    /// Whether the whole partition has been processed and every document in it is done:
    /// never while [`TargetReport::unresolved`] is not zero.
    pub complete: bool,
    /// Documents that failed in this pass over the partition (in this run, or in an earlier
    /// run of the job that this one resumed) and have not been processed successfully since.
    /// A later run with [`RotationOptions::resume`] retries them first (or, when there were
    /// too many to remember, scans the partition again); the job is not complete until a run
    /// leaves none.
    pub unresolved: u64,
    /// Whether this run continued from a checkpoint.
    pub resumed: bool,
    /// Whether a checkpoint was found but not used because the primary keys changed since it was
    /// written (the job started over, so that every document reaches the new primaries).
    pub restarted: bool,
    /// The first failures ([`RotationOptions::max_failures_listed`]).
    pub failures: Vec<Failure>,
    /// Time spent on this target in this run.
    pub elapsed: Duration,
}

/// The outcome of a run.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Report {
    /// One per target processed (or started).
    pub targets: Vec<TargetReport>,
    /// Whether the progress callback stopped the run.
    pub stopped: bool,
}

impl Report {
    /// The counts of this run over all targets.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for t in &self.targets {
            s.add(&t.stats);
        }
        s
    }

    /// Whether every target is complete: processed to the end, with no failure left (this
    /// run's or an earlier run's). A run that had failures is never complete.
    #[must_use]
    pub fn complete(&self) -> bool {
        !self.stopped
            && self
                .targets
                .iter()
                .all(|t| t.complete && t.unresolved == 0 && t.stats.failed == 0)
    }
}

/// The re-encryption engine. See the [module documentation](self).
pub struct Rotator {
    keys: Arc<dyn KeySource>,
    options: RotationOptions,
    checkpoints: Option<Collection<Document>>,
}

impl core::fmt::Debug for Rotator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Rotator")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What to do with one document.
enum Outcome {
    Current,
    Skip,
    Fail(String),
    Rewrite(Plan),
}

struct Plan {
    changes: Vec<Change>,
    statement: RawDocumentBuf,
}

/// What one batch is processed with.
#[derive(Clone, Copy)]
struct Work<'a> {
    target: &'a Target,
    cryptor: &'a Cryptor,
    primaries: &'a Primaries,
    aliases: &'a [String],
    decide: Decide,
}

/// The flags the per-document decision needs, copied into the blocking task.
#[derive(Clone, Copy)]
struct Decide {
    migrate_plaintext: bool,
    migrate_csfle: bool,
    migrate_qe: bool,
}

impl Rotator {
    /// An engine that reads keys from `keys` (an [`InMemoryKeyring`](crate::InMemoryKeyring),
    /// the MongoDB key vault, …). Aliases are prefetched once per target, key ids once per batch.
    pub fn new(keys: Arc<dyn KeySource>) -> Self {
        Rotator {
            keys,
            options: RotationOptions::default(),
            checkpoints: None,
        }
    }

    /// Sets the options.
    #[must_use]
    pub fn options(mut self, options: RotationOptions) -> Self {
        self.options = options;
        self
    }

    /// Keeps checkpoints in this collection instead of `fieldcrypt.checkpoints` on each
    /// target's cluster.
    #[must_use]
    pub fn checkpoint_collection(mut self, coll: Collection<Document>) -> Self {
        self.checkpoints = Some(coll);
        self
    }

    fn store(&self, target: &Target) -> Store {
        Store::new(self.checkpoints.clone().unwrap_or_else(|| {
            target
                .collection
                .client()
                .database(DEFAULT_CHECKPOINT_NAMESPACE.0)
                .collection(DEFAULT_CHECKPOINT_NAMESPACE.1)
        }))
    }

    /// Deletes the checkpoints of this job (and partition) for these targets, so the next run
    /// starts from the beginning even with [`RotationOptions::resume`].
    ///
    /// # Errors
    /// MongoDB errors.
    pub async fn reset(&self, targets: &[Target]) -> Result<()> {
        for t in targets {
            let key = Store::key(
                &self.options.job,
                &t.namespace(),
                &self.options.partition.label(),
            );
            self.store(t).delete(&key).await?;
        }
        Ok(())
    }

    /// Processes every target in turn, calling `progress` at every [`Phase`].
    ///
    /// Per-document problems (a ciphertext that does not decrypt, a key that is disabled, a
    /// write the server refuses) do not stop the run: they are counted in [`Stats::failed`] and
    /// listed in [`TargetReport::failures`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for invalid options; key errors when a schema alias has no primary key;
    /// MongoDB errors (the run stops there; resume it later).
    pub async fn run<F>(&self, targets: &[Target], mut progress: F) -> Result<Report>
    where
        F: FnMut(&Progress<'_>) -> Flow + Send,
    {
        self.options.check()?;
        let mut report = Report::default();
        for target in targets {
            let pass = Pass::start(self, target, &mut progress).await?;
            let (t, flow) = pass.run().await?;
            report.targets.push(t);
            if flow == Flow::Stop {
                report.stopped = true;
                break;
            }
        }
        Ok(report)
    }

    /// Decides, re-encrypts and writes one batch, retrying conflicts; updates `rep` and adds
    /// the `_id`s of documents that failed to `failed`.
    async fn process(
        &self,
        work: &Work<'_>,
        mut docs: Vec<RawDocumentBuf>,
        rep: &mut TargetReport,
        failed: &mut Vec<Bson>,
    ) -> Result<()> {
        let Work {
            target,
            cryptor,
            primaries,
            aliases,
            decide,
        } = *work;
        let o = &self.options;
        let mut attempt = 0;
        while !docs.is_empty() {
            // Keys named by the batch's ciphertexts, for a key vault that fetches on demand (a
            // malformed value names none; its document fails on its own below).
            let mut ids: Vec<KeyId> = Vec::new();
            let mut qe_indexed = false;
            for d in &docs {
                let r = inspect::references(d);
                ids.extend(r.keys);
                qe_indexed |= r.qe_indexed;
            }
            ids.sort_unstable();
            ids.dedup();
            self.keys.prefetch_ids(&ids).await?;
            if qe_indexed {
                // Indexed QE values name their inner key inside the layer the outer one opens.
                let mut inner = Vec::new();
                for d in &docs {
                    inner.extend(cryptor.qe_client_keys(d).unwrap_or_default());
                }
                inner.retain(|id| ids.binary_search(id).is_err());
                if !inner.is_empty() {
                    inner.sort_unstable();
                    inner.dedup();
                    self.keys.prefetch_ids(&inner).await?;
                }
            }
            if attempt > 0 {
                self.keys.prefetch_aliases(aliases).await?;
            }

            let outcomes = {
                let cryptor = cryptor.clone();
                let primaries = primaries.clone();
                let ctx = target.context.clone();
                tokio::task::spawn_blocking(move || {
                    decide_all(&cryptor, &primaries, &ctx, decide, docs)
                })
                .await
                .map_err(|_| Error::TaskFailed("a re-encryption"))??
            };
            let mut plans = Vec::new();
            for (id, outcome) in outcomes {
                match outcome {
                    Outcome::Current => rep.stats.current += 1,
                    Outcome::Skip => rep.stats.skipped += 1,
                    Outcome::Fail(reason) => fail(rep, o, failed, id, reason),
                    Outcome::Rewrite(plan) => plans.push((id, plan)),
                }
            }
            if o.dry_run || plans.is_empty() {
                rep.stats.rewritten += plans.len() as u64;
                return Ok(());
            }
            let db = target
                .collection
                .client()
                .database(&target.collection.namespace().db);
            let results = write(&db, target.collection.name(), &plans).await?;
            let mut unsure = Vec::new();
            for ((id, plan), r) in plans.into_iter().zip(results) {
                match r {
                    Written::Applied => rep.stats.rewritten += 1,
                    Written::Refused(reason) => fail(rep, o, failed, id, reason),
                    Written::Unknown => unsure.push((id, plan)),
                }
            }
            // Some filters matched nothing: re-read those documents. Ours if they hold what we
            // wrote; otherwise someone wrote in between, and the document goes round again.
            docs = Vec::new();
            if !unsure.is_empty() {
                let ids: Vec<Bson> = unsure.iter().map(|(id, _)| id.clone()).collect();
                let mut now: HashMap<Vec<u8>, RawDocumentBuf> = HashMap::new();
                for d in fetch(&target.collection, &ids).await? {
                    now.insert(id_key(&d)?, d);
                }
                for (id, plan) in unsure {
                    let Some(d) = now.remove(&bson_key(&id)?) else {
                        rep.stats.conflicts += 1; // deleted meanwhile: nothing left to do
                        continue;
                    };
                    if cas::applied(&d, &plan.changes)? {
                        rep.stats.rewritten += 1;
                    } else {
                        rep.stats.conflicts += 1;
                        docs.push(d);
                    }
                }
            }
            attempt += 1;
            if attempt > o.max_retries && !docs.is_empty() {
                for d in docs.drain(..) {
                    fail(
                        rep,
                        o,
                        failed,
                        id_value(&d)?,
                        format!(
                            "the document changed during each of {} attempts to re-encrypt it",
                            attempt
                        ),
                    );
                }
            }
        }
        Ok(())
    }
}

fn fail(
    rep: &mut TargetReport,
    o: &RotationOptions,
    failed: &mut Vec<Bson>,
    id: Bson,
    reason: String,
) {
    rep.stats.failed += 1;
    failed.push(id.clone());
    if rep.failures.len() < o.max_failures_listed {
        rep.failures.push(Failure { id, reason });
    }
}

/// Adds a batch's failed `_id`s to the checkpoint, within its limits; beyond them only the
/// count is kept.
fn record_failures(cp: &mut Checkpoint, failed: Vec<Bson>) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    let mut bytes = 0;
    for id in &cp.failed_ids {
        bytes += bson_key(id)?.len();
    }
    for id in failed {
        let len = bson_key(&id)?.len();
        if cp.unrecorded == 0
            && cp.failed_ids.len() < MAX_RECORDED_FAILURES
            && bytes + len <= MAX_RECORDED_FAILURE_BYTES
        {
            bytes += len;
            cp.failed_ids.push(id);
        } else {
            cp.unrecorded += 1;
        }
    }
    Ok(())
}

/// Decides every document of a batch, in parallel when it is large enough.
fn decide_all(
    cryptor: &Cryptor,
    primaries: &Primaries,
    ctx: &Context,
    decide: Decide,
    docs: Vec<RawDocumentBuf>,
) -> Result<Vec<(Bson, Outcome)>> {
    let one = |d: &RawDocumentBuf| -> Result<(Bson, Outcome)> {
        Ok((id_value(d)?, decide_one(cryptor, primaries, ctx, decide, d)))
    };
    if docs.len() >= PARALLEL_THRESHOLD {
        docs.par_iter().map(one).collect()
    } else {
        docs.iter().map(one).collect()
    }
}

fn decide_one(
    cryptor: &Cryptor,
    primaries: &Primaries,
    ctx: &Context,
    decide: Decide,
    doc: &RawDocument,
) -> Outcome {
    match plan(cryptor, primaries, ctx, decide, doc) {
        Ok(o) => o,
        Err(e) => Outcome::Fail(e.to_string()),
    }
}

fn plan(
    cryptor: &Cryptor,
    primaries: &Primaries,
    ctx: &Context,
    decide: Decide,
    doc: &RawDocument,
) -> Result<Outcome> {
    let insp = Inspector {
        schema: cryptor.schema(),
        primaries,
        ctx,
    };
    let scan = insp.scan(doc)?;
    if let Some(p) = scan.malformed.first() {
        return Ok(Outcome::Fail(format!("malformed ciphertext at {p:?}")));
    }
    // QE's `__safeContent__` goes only when migrating from QE.
    let drop_safe_content = decide.migrate_qe && scan.safe_content;
    if scan.is_current() && !drop_safe_content {
        return Ok(Outcome::Current);
    }
    let wanted = scan.needs_reencryption()
        || (decide.migrate_plaintext && !scan.plaintext.is_empty())
        || (decide.migrate_csfle && scan.csfle)
        || (decide.migrate_qe && scan.qe)
        || drop_safe_content;
    if !wanted {
        return Ok(Outcome::Skip);
    }
    if let Some(p) = scan.unmanaged() {
        // Decrypting would also open this value, and re-encryption would not seal it again.
        return Ok(Outcome::Fail(format!(
            "a ciphertext at {p:?} is not in the schema; add the field to the schema to re-encrypt this document"
        )));
    }
    // The plaintext document lives only here; wipe it when done. Decryption drops
    // `__safeContent__` unless kept.
    let read_ctx = ctx.clone().with_safe_content(!decide.migrate_qe);
    let plain = Zeroizing::new(cryptor.decrypt_raw(doc, &read_ctx)?.into_bytes());
    let plain = RawDocument::from_bytes(&plain)?;
    let new = cryptor.encrypt_raw(plain, ctx)?;
    let after = insp.scan(&new)?;
    if !after.is_current()
        || after.unmanaged().is_some()
        || (decide.migrate_qe && after.safe_content)
    {
        return Ok(Outcome::Fail(format!(
            "cannot be brought up to date: after re-encryption it still has {}",
            after.describe()
        )));
    }
    let changes = cas::diff(doc, &new)?;
    if changes.is_empty() {
        return Ok(Outcome::Current);
    }
    let id = rawbson::find(doc, "_id")?
        .ok_or_else(|| Error::MalformedBson("the document has no _id".into()))?;
    if !cas::writable(&id, &changes) {
        return Ok(Outcome::Fail(
            "a field to rewrite has a name that an update cannot address ('.' or a leading '$')"
                .into(),
        ));
    }
    let statement = cas::statement(&id, &changes)?;
    Ok(Outcome::Rewrite(Plan { changes, statement }))
}

/// The result of one compare-and-set statement.
enum Written {
    Applied,
    Unknown,
    Refused(String),
}

/// Sends the statements as `update` commands (unordered, each under the size limit).
async fn write(db: &Database, coll: &str, plans: &[(Bson, Plan)]) -> Result<Vec<Written>> {
    let mut results = Vec::with_capacity(plans.len());
    let mut start = 0;
    while start < plans.len() {
        let mut end = start;
        let mut size = 0;
        while end < plans.len()
            && (end == start || size + plans[end].1.statement.as_bytes().len() < MAX_COMMAND_BYTES)
        {
            size += plans[end].1.statement.as_bytes().len();
            end += 1;
        }
        let mut updates = RawArrayBuf::new();
        for (_, p) in &plans[start..end] {
            updates.push(p.statement.clone());
        }
        let mut cmd = RawDocumentBuf::new();
        cmd.append("update", coll);
        cmd.append("updates", updates);
        cmd.append("ordered", false);
        let reply = db.run_raw_command(cmd).await?;
        let count = end - start;
        let mut chunk: Vec<Option<Written>> = (0..count).map(|_| None).collect();
        let mut refused = 0;
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors {
                let Some(e) = e.as_document() else { continue };
                let idx = e
                    .get("index")
                    .and_then(as_u64)
                    .and_then(|i| usize::try_from(i).ok());
                let code = e.get("code").and_then(as_u64).unwrap_or(0);
                let name = e.get_str("codeName").unwrap_or("");
                if let Some(slot) = idx.and_then(|i| chunk.get_mut(i)) {
                    *slot = Some(Written::Refused(if name.is_empty() {
                        format!("the server refused the write (error code {code})")
                    } else {
                        format!("the server refused the write ({name}, code {code})")
                    }));
                    refused += 1;
                }
            }
        }
        let matched = reply.get("n").and_then(as_u64).unwrap_or(0);
        let all = u64::try_from(count - refused).unwrap_or(u64::MAX) == matched;
        results.extend(chunk.into_iter().map(|w| {
            w.unwrap_or(if all {
                Written::Applied
            } else {
                Written::Unknown
            })
        }));
        start = end;
    }
    Ok(results)
}

fn as_u64(b: &Bson) -> Option<u64> {
    match b {
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Int64(n) => u64::try_from(*n).ok(),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // counts, checked
        Bson::Double(f) if *f >= 0.0 && f.fract() == 0.0 && *f < 9.0e15 => Some(*f as u64),
        _ => None,
    }
}

/// The documents with these `_id`s, in the order of `ids` (missing ones left out).
async fn fetch(coll: &Collection<RawDocumentBuf>, ids: &[Bson]) -> Result<Vec<RawDocumentBuf>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut cursor = coll
        .find(doc! { "_id": { "$in": ids.to_vec() } })
        .batch_size(u32::try_from(ids.len().min(10_000)).unwrap_or(10_000))
        .await?;
    let mut by_id: HashMap<Vec<u8>, RawDocumentBuf> = HashMap::with_capacity(ids.len());
    while let Some(d) = cursor.try_next().await? {
        by_id.insert(id_key(&d)?, d);
    }
    let mut out = Vec::with_capacity(by_id.len());
    for id in ids {
        if let Some(d) = by_id.remove(&bson_key(id)?) {
            out.push(d);
        }
    }
    Ok(out)
}

/// A document's `_id` as a map key: type byte and value bytes.
fn id_key(d: &RawDocument) -> Result<Vec<u8>> {
    let e = rawbson::find(d, "_id")?
        .ok_or_else(|| Error::MalformedBson("a document has no _id".into()))?;
    let mut k = Vec::with_capacity(1 + e.value.len());
    k.push(e.ty);
    k.extend_from_slice(e.value);
    Ok(k)
}

/// The same key for an `_id` value.
fn bson_key(id: &Bson) -> Result<Vec<u8>> {
    let mut d = RawDocumentBuf::new();
    d.append(
        "_id",
        bson::RawBson::try_from(id.clone()).map_err(Error::bson)?,
    );
    id_key(&d)
}

/// A document's `_id` as a value.
fn id_value(d: &RawDocument) -> Result<Bson> {
    let raw = d
        .get("_id")?
        .ok_or_else(|| Error::MalformedBson("a document has no _id".into()))?;
    Bson::try_from(raw.to_raw_bson()).map_err(Error::bson)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn failed_ids_are_kept_up_to_a_limit_then_only_counted() {
        let mut cp = Checkpoint::default();
        record_failures(&mut cp, (0..10).map(Bson::Int64).collect()).unwrap();
        assert_eq!((cp.failed_ids.len(), cp.unrecorded), (10, 0));
        let more = (10..MAX_RECORDED_FAILURES as i64 + 5)
            .map(Bson::Int64)
            .collect();
        record_failures(&mut cp, more).unwrap();
        assert_eq!(cp.failed_ids.len(), MAX_RECORDED_FAILURES);
        assert_eq!(cp.unrecorded, 5);
        // Once ids are lost, none is added any more (the next run scans everything anyway).
        let mut cp = Checkpoint {
            unrecorded: 1,
            ..Checkpoint::default()
        };
        record_failures(&mut cp, vec![Bson::Int64(1)]).unwrap();
        assert_eq!((cp.failed_ids.len(), cp.unrecorded), (0, 2));
        // Large `_id`s count by size.
        let mut cp = Checkpoint::default();
        let big = |i: usize| Bson::String(format!("{i}{}", "x".repeat(100_000)));
        record_failures(&mut cp, (0..50).map(big).collect()).unwrap();
        assert!(cp.failed_ids.len() < 50 && cp.unrecorded > 0);
        let bytes: usize = cp
            .failed_ids
            .iter()
            .map(|i| bson_key(i).unwrap().len())
            .sum();
        assert!(bytes <= MAX_RECORDED_FAILURE_BYTES);
    }

    #[test]
    fn a_report_with_failures_is_not_complete() {
        let t = TargetReport {
            namespace: "a.b".into(),
            partition: "all".into(),
            stats: Stats::default(),
            totals: Stats::default(),
            complete: true,
            unresolved: 0,
            resumed: false,
            restarted: false,
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        let mut r = Report {
            targets: vec![t],
            stopped: false,
        };
        assert!(r.complete());
        r.targets[0].stats.failed = 1;
        assert!(!r.complete());
        r.targets[0].stats.failed = 0;
        r.targets[0].unresolved = 2;
        assert!(!r.complete());
    }
}
