//! W4: re-encrypting a collection (key rotation with [`Rotator`]) against plain read + write
//! passes over the same collection on the same server, with the peak memory of each.
//!
//! Per collection size and trial, on a fresh collection of W2 user documents (three fields
//! encrypted under alias `pii`):
//!
//! - **copy** — read the collection in `_id` order, a batch at a time, and `insert_many` each
//!   batch into a new collection: the plain copy the issue compares against.
//! - **rewrite** — the same read, then one `update` command per batch that writes every document
//!   in place exactly as a rotation does (`_id` and the old values in the filter, `$set` of the
//!   three values), but with no cryptography: each document gets its neighbour's ciphertexts.
//!   It separates what the server's in-place updates cost from what fieldcrypt adds.
//! - **rotate** — a new primary for `pii`, then [`Rotator::run`] over the collection with the
//!   same batch size: scan, inspect, decrypt, encrypt, compare-and-set write, checkpoint.
//!
//! Phases run back to back in each trial (in reverse order every other trial), so their ratios
//! compare passes taken under the same load. Peak memory is the process's peak resident set
//! (`VmHWM`, reset through `/proc/self/clear_refs` before each phase; Linux only), reported with
//! what the pass added to the resident set it started from: the allocator keeps memory that
//! earlier passes freed, so a peak alone includes them.
//!
//! The scratch database is dropped at the end and on errors; an interrupted run (Ctrl-C) leaves
//! it behind (`fieldcrypt_bench_w4_*`, synthetic data only).

use std::sync::Arc;
use std::time::Instant;

use bson::{doc, Bson, Document, RawDocument, RawDocumentBuf};
use fieldcrypt::rotation::{Flow, Partition, RotationOptions, Rotator, Target};
use fieldcrypt::{Cryptor, Error, InMemoryKeyring, Schema, Suite};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::workloads;
use futures_util::TryStreamExt;
use mongodb::{Collection, Database};
use serde_json::{json, Value};

use super::{machine, stats, Stats};
use crate::error::CliError;

/// Options of `fieldcrypt bench w4`.
#[derive(clap::Args, Debug)]
pub(super) struct W4Args {
    /// The server to run against (a scratch database is created and dropped). Default:
    /// `MONGODB_URI`, else a local server started for the run (as the tests do).
    #[arg(long)]
    uri: Option<crate::uri::ConnectionString>,
    /// Collection sizes to measure, comma-separated. With one batch size for all, the peak
    /// memory should not follow the collection size.
    #[arg(long, value_delimiter = ',', default_values_t = [2_000u32, 8_000],
          value_parser = clap::value_parser!(u32).range(1..))]
    documents: Vec<u32>,
    /// Documents per batch (read, re-encrypt and write), for all three passes.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Trials per size; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    trials: u16,
    /// The suite of the three encrypted fields.
    #[arg(long, default_value_t = Suite::Aes256Gcm)]
    suite: Suite,
    /// Also rotate with N hash-partitioned workers at once (what `reencrypt --partition i/N`
    /// runs, i = 0..N-1, here in one process), for each N given, comma-separated (e.g. `2,4`):
    /// documents per partition and wall time against the one-worker rotation.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(2..=64))]
    partitions: Vec<u32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(super) json: bool,
}

/// One partitioned rotation: wall time, and per partition its documents and time.
struct Split {
    seconds: f64,
    documents: Vec<u64>,
    partition_seconds: Vec<f64>,
}

/// The three passes, in their order within an even trial.
const PHASES: [&str; 3] = ["copy", "rewrite", "rotate"];

/// One pass: how long it took, and the resident memory when it started and at its peak.
struct Pass {
    seconds: f64,
    start_rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
}

impl Pass {
    /// What the pass added to the resident set it started with, at its peak.
    fn growth_kib(&self) -> Option<u64> {
        Some(self.peak_rss_kib?.saturating_sub(self.start_rss_kib?))
    }
}

/// Runs W4 and prints its results.
///
/// # Errors
/// No server to be had; any failed database operation; a rotation that did not rewrite every
/// document.
pub(super) fn run(args: &W4Args) -> Result<(), CliError> {
    // Started before the runtime (it blocks); stopped when dropped at the end.
    let local;
    let uri = match &args.uri {
        Some(u) => u.expose().to_owned(),
        None => {
            local =
                DevServer::start().map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?;
            local.uri().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(measure_all(&uri, args))?;
    let report = json!({
        "workload": "W4",
        "params": {
            "documents": args.documents,
            "batch_size": args.batch_size,
            "trials": args.trials,
            "suite": args.suite.to_string(),
            "partitions": args.partitions,
        },
        "results": results,
        "memory": if peak_memory_available() { "peak resident set (VmHWM), KiB" } else { "unavailable on this OS" },
        "machine": machine(),
        "fieldcrypt_version": env!("CARGO_PKG_VERSION"),
        "optimized_build": !cfg!(debug_assertions),
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report)
                .map_err(|e| CliError::Usage(format!("cannot print JSON: {e}")))?
        );
    } else {
        print(args, &results);
    }
    Ok(())
}

async fn measure_all(uri: &str, args: &W4Args) -> Result<Vec<Value>, CliError> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let db = client.database(&unique_db_name("fieldcrypt_bench_w4"));
    let out = measure_sizes(&db, args).await;
    let dropped = db.drop().await;
    client.shutdown().immediate(true).await; // see keysource::shutdown_clients
    let out = out?;
    dropped?;
    Ok(out)
}

async fn measure_sizes(db: &Database, args: &W4Args) -> Result<Vec<Value>, CliError> {
    let keys = Arc::new(InMemoryKeyring::new());
    keys.generate("pii");
    let schema = Arc::new(workloads::w2_schema(args.suite)?);
    let cryptor = Cryptor::with_shared(keys.clone(), schema.clone());
    let batch = usize::try_from(args.batch_size).unwrap_or(usize::MAX);
    let mut results = Vec::new();
    for &n in &args.documents {
        let mut passes: [Vec<Pass>; 3] = Default::default();
        let mut ratios: [Vec<f64>; 2] = Default::default();
        let mut splits: Vec<Vec<(f64, Split)>> =
            args.partitions.iter().map(|_| Vec::new()).collect();
        for trial in 0..args.trials {
            let src = load(db, &cryptor, n).await?;
            let mut order = [0, 1, 2];
            if trial % 2 == 1 {
                order.reverse();
            }
            let mut this: [f64; 3] = [0.0; 3];
            for phase in order {
                let pass = match phase {
                    0 => {
                        let pass = timed(copy(db, &src, batch, n)).await?;
                        check_copy(db, n).await?;
                        pass
                    }
                    1 => timed(rewrite(db, &src, batch, n)).await?,
                    _ => timed(rotate(db, &keys, &schema, &src, args.batch_size, n)).await?,
                };
                this[phase] = pass.seconds;
                passes[phase].push(pass);
            }
            ratios[0].push(this[2] / this[0]);
            ratios[1].push(this[2] / this[1]);
            // After the passes: the collection is current again, so each split rotates it all.
            for (&workers, out) in args.partitions.iter().zip(&mut splits) {
                let split =
                    rotate_split(db, &keys, &schema, &src, args.batch_size, n, workers).await?;
                out.push((this[2], split));
            }
        }
        let mut result = size_result(n, &passes, &ratios);
        if !splits.is_empty() {
            result["partitioned"] = args
                .partitions
                .iter()
                .zip(&splits)
                .map(|(&w, s)| split_result(w, s))
                .collect();
        }
        results.push(result);
    }
    Ok(results)
}

fn size_result(n: u32, passes: &[Vec<Pass>; 3], ratios: &[Vec<f64>; 2]) -> Value {
    let phases: serde_json::Map<String, Value> = PHASES
        .iter()
        .zip(passes)
        .map(|(name, p)| {
            let secs: Vec<f64> = p.iter().map(|p| p.seconds).collect();
            let rate: Vec<f64> = secs.iter().map(|s| f64::from(n) / s).collect();
            // The worst trial: a bound is about the largest.
            let peak = p.iter().filter_map(|p| p.peak_rss_kib).max();
            let growth = p.iter().filter_map(Pass::growth_kib).max();
            (
                (*name).to_string(),
                json!({
                    "seconds": stats(secs.clone()).to_json_precise(),
                    "documents_per_second": stats(rate).to_json(),
                    "peak_rss_kib": peak,
                    "peak_growth_kib": growth,
                    "trials_seconds": secs.iter().map(|&s| round6(s)).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    json!({
        "documents": n,
        "passes": phases,
        "ratios": {
            "rotate_over_copy": stats(ratios[0].clone()).to_json_precise(),
            "rotate_over_rewrite": stats(ratios[1].clone()).to_json_precise(),
        },
    })
}

/// `workers` partitions over the trials: each trial's wall time and its ratio to that trial's
/// one-worker rotation; the documents and seconds of each partition in the median trial.
fn split_result(workers: u32, trials: &[(f64, Split)]) -> Value {
    let secs: Vec<f64> = trials.iter().map(|(_, s)| s.seconds).collect();
    let speedup: Vec<f64> = trials.iter().map(|(one, s)| one / s.seconds).collect();
    let mut order: Vec<usize> = (0..trials.len()).collect();
    order.sort_by(|&a, &b| secs[a].total_cmp(&secs[b]));
    let median = &trials[order[order.len() / 2]].1;
    json!({
        "workers": workers,
        "seconds": stats(secs.clone()).to_json_precise(),
        "speedup_over_one_worker": stats(speedup).to_json_precise(),
        "median_trial_documents_per_partition": median.documents,
        "median_trial_partition_seconds": median.partition_seconds.iter().map(|&s| round6(s)).collect::<Vec<_>>(),
        "trials_seconds": secs.iter().map(|&s| round6(s)).collect::<Vec<_>>(),
    })
}

/// Seconds and ratios to 6 decimals (microseconds): short passes on a fast server stay above 0.
fn round6(s: f64) -> f64 {
    (s * 1e6).round() / 1e6
}

impl Stats {
    fn to_json_precise(self) -> Value {
        json!({ "median": round6(self.median), "min": round6(self.min), "max": round6(self.max) })
    }
}

fn print(args: &W4Args, results: &[Value]) {
    println!(
        "W4 rotation: re-encrypting a collection vs plain passes over it ({} suite, batch {}, {} trial(s))",
        args.suite, args.batch_size, args.trials
    );
    println!(
        "copy = read + insert_many into a new collection; rewrite = read + the rotation's in-place\n\
         compare-and-set writes without cryptography; rotate = Rotator::run after a new primary.\n\
         Medians across trials; ratios are medians of per-trial ratios.\n"
    );
    println!(
        "{:>10} {:<8} {:>10} {:>12} {:>14} {:>14}",
        "documents", "pass", "seconds", "docs/s", "peak RSS MiB", "growth MiB"
    );
    for r in results {
        let n = r["documents"].as_u64().unwrap_or(0);
        for name in PHASES {
            let p = &r["passes"][name];
            let mib = |v: &Value| {
                v.as_u64()
                    .map_or_else(|| "-".to_string(), |k| format!("{:.1}", kib_to_mib(k)))
            };
            println!(
                "{:>10} {:<8} {:>10.3} {:>12.0} {:>14} {:>14}",
                n,
                name,
                p["seconds"]["median"].as_f64().unwrap_or(f64::NAN),
                p["documents_per_second"]["median"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                mib(&p["peak_rss_kib"]),
                mib(&p["peak_growth_kib"]),
            );
        }
        for p in r["partitioned"].as_array().into_iter().flatten() {
            let secs = p["seconds"]["median"].as_f64().unwrap_or(f64::NAN);
            #[allow(clippy::cast_precision_loss)] // small counts
            let rate = n as f64 / secs;
            println!(
                "{:>10} {:<8} {:>10.3} {:>12.0} {:>14} {:>14}   speedup over one worker {:.2}×; documents per partition {}",
                n,
                format!("{}×part", p["workers"]),
                secs,
                rate,
                "-",
                "-",
                p["speedup_over_one_worker"]["median"].as_f64().unwrap_or(f64::NAN),
                p["median_trial_documents_per_partition"],
            );
        }
        println!(
            "{:>10} rotate ÷ copy {:.2}×, rotate ÷ rewrite {:.2}×\n",
            "",
            r["ratios"]["rotate_over_copy"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["ratios"]["rotate_over_rewrite"]["median"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
}

#[allow(clippy::cast_precision_loss)] // memory sizes are far below 2^52
fn kib_to_mib(k: u64) -> f64 {
    k as f64 / 1024.0
}

// ---- the passes ----

/// A fresh collection `users` holding `n` W2 documents encrypted under the current primary.
async fn load(
    db: &Database,
    cryptor: &Cryptor,
    n: u32,
) -> Result<Collection<RawDocumentBuf>, CliError> {
    let coll = db.collection::<RawDocumentBuf>("users");
    coll.drop().await?;
    let ctx = workloads::w2_context();
    let mut start = 0;
    while start < n {
        let end = n.min(start.saturating_add(1000));
        let plain: Vec<RawDocumentBuf> = (start..end)
            .map(|i| RawDocumentBuf::from_document(&workloads::w2_user(i)))
            .collect::<Result<_, _>>()?;
        let sealed = cryptor
            .encrypt_many(&plain, &ctx)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        coll.insert_many(sealed).await?;
        start = end;
    }
    Ok(coll)
}

async fn timed<F: std::future::Future<Output = Result<(), CliError>>>(
    f: F,
) -> Result<Pass, CliError> {
    let measured = reset_peak_memory();
    let start_rss_kib = status_kib("VmRSS");
    let start = Instant::now();
    f.await?;
    let seconds = start.elapsed().as_secs_f64();
    let peak_rss_kib = if measured { status_kib("VmHWM") } else { None };
    Ok(Pass {
        seconds,
        start_rss_kib,
        peak_rss_kib,
    })
}

/// Reads `src` in `_id` order, `batch` documents at a time, calling `each` per batch.
async fn scan<F, Fut>(
    src: &Collection<RawDocumentBuf>,
    batch: usize,
    mut each: F,
) -> Result<u64, CliError>
where
    F: FnMut(Vec<RawDocumentBuf>) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let mut cursor = src
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .batch_size(u32::try_from(batch).unwrap_or(u32::MAX))
        .await?;
    let mut seen = 0u64;
    let mut docs = Vec::with_capacity(batch);
    while let Some(d) = cursor.try_next().await? {
        docs.push(d);
        if docs.len() == batch {
            seen += docs.len() as u64;
            each(std::mem::replace(&mut docs, Vec::with_capacity(batch))).await?;
        }
    }
    if !docs.is_empty() {
        seen += docs.len() as u64;
        each(docs).await?;
    }
    Ok(seen)
}

async fn copy(
    db: &Database,
    src: &Collection<RawDocumentBuf>,
    batch: usize,
    n: u32,
) -> Result<(), CliError> {
    let dst = db.collection::<RawDocumentBuf>("users_copy");
    dst.drop().await?;
    let seen = scan(src, batch, |docs| {
        let dst = dst.clone();
        async move {
            dst.insert_many(docs).await?;
            Ok(())
        }
    })
    .await?;
    check_count("copy", seen, n)
}

/// After the timed copy: every document arrived; the copy goes.
async fn check_copy(db: &Database, n: u32) -> Result<(), CliError> {
    let dst = db.collection::<RawDocumentBuf>("users_copy");
    let copied = dst.count_documents(doc! {}).await?;
    dst.drop().await?;
    check_count("copy (documents in the new collection)", copied, n)
}

/// Field `key` of a W4 document, owned.
fn get(doc: &RawDocument, key: &str) -> Result<Bson, CliError> {
    let v = doc
        .get(key)?
        .ok_or_else(|| CliError::Usage(format!("W4 document without `{key}`")))?;
    Ok(v.to_raw_bson().try_into()?)
}

/// The three encrypted values of a W2 document, as the filter and `$set` of the rotation name
/// them.
fn encrypted_values(d: &RawDocument) -> Result<[Bson; 3], CliError> {
    Ok([
        get(d, "email")?,
        get(d, "ssn")?,
        get(
            d.get("profile")?
                .and_then(|p| p.as_document())
                .ok_or_else(|| CliError::Usage("W4 document without `profile`".into()))?,
            "phone",
        )?,
    ])
}

async fn rewrite(
    db: &Database,
    src: &Collection<RawDocumentBuf>,
    batch: usize,
    n: u32,
) -> Result<(), CliError> {
    let name = src.name().to_owned();
    let seen = scan(src, batch, |docs| {
        let name = name.clone();
        async move {
            let values = docs
                .iter()
                .map(|d| encrypted_values(d))
                .collect::<Result<Vec<_>, _>>()?;
            let mut updates = Vec::with_capacity(docs.len());
            for (i, d) in docs.iter().enumerate() {
                let [email, ssn, phone] = &values[i];
                let [new_email, new_ssn, new_phone] = &values[(i + 1) % values.len()];
                let id = get(d, "_id")?;
                updates.push(doc! {
                    "q": { "_id": id, "email": email, "ssn": ssn, "profile.phone": phone },
                    "u": { "$set": { "email": new_email, "ssn": new_ssn, "profile.phone": new_phone } },
                });
            }
            let expected = updates.len();
            let reply = db
                .run_command(doc! { "update": name, "updates": updates, "ordered": false })
                .await?;
            let matched = reply.get_i32("n").unwrap_or(-1);
            if usize::try_from(matched).ok() != Some(expected) {
                return Err(CliError::Usage(format!(
                    "W4 rewrite: {matched} of {expected} updates matched"
                )));
            }
            Ok(())
        }
    })
    .await?;
    check_count("rewrite", seen, n)
}

async fn rotate(
    db: &Database,
    keys: &Arc<InMemoryKeyring>,
    schema: &Arc<Schema>,
    src: &Collection<RawDocumentBuf>,
    batch: u32,
    n: u32,
) -> Result<(), CliError> {
    keys.rotate("pii");
    let rotator = Rotator::new(keys.clone())
        .options(RotationOptions::default().batch_size(batch.try_into().unwrap_or(usize::MAX)))
        .checkpoint_collection(db.collection::<Document>("checkpoints"));
    let report = rotator
        .run(
            &[Target::new(src, schema.clone()).context(workloads::w2_context())],
            |_| Flow::Continue,
        )
        .await?;
    let s = report.stats();
    if s.failed != 0 || s.conflicts != 0 {
        return Err(CliError::Usage(format!(
            "W4 rotation: {} failed, {} conflicts",
            s.failed, s.conflicts
        )));
    }
    check_count("rotate (documents rewritten)", s.rewritten, n)
}

/// A new primary, then `workers` rotations at once, one per hash partition (as `workers`
/// processes of `reencrypt --partition i/N` would run, each with its own checkpoint).
async fn rotate_split(
    db: &Database,
    keys: &Arc<InMemoryKeyring>,
    schema: &Arc<Schema>,
    src: &Collection<RawDocumentBuf>,
    batch: u32,
    n: u32,
    workers: u32,
) -> Result<Split, CliError> {
    keys.rotate("pii");
    let start = Instant::now();
    let runs = (0..workers).map(|i| async move {
        let started = Instant::now();
        let rotator = Rotator::new(keys.clone())
            .options(
                RotationOptions::default()
                    .job(format!("split{workers}"))
                    .batch_size(batch.try_into().unwrap_or(usize::MAX))
                    .partition(Partition::hash(i, workers)?),
            )
            .checkpoint_collection(db.collection::<Document>("checkpoints"));
        let report = rotator
            .run(
                &[Target::new(src, schema.clone()).context(workloads::w2_context())],
                |_| Flow::Continue,
            )
            .await?;
        Ok::<_, CliError>((report.stats(), started.elapsed().as_secs_f64()))
    });
    let done = futures_util::future::try_join_all(runs).await?;
    let seconds = start.elapsed().as_secs_f64();
    let mut documents = Vec::with_capacity(done.len());
    let mut partition_seconds = Vec::with_capacity(done.len());
    for (s, secs) in &done {
        if s.failed != 0 || s.conflicts != 0 {
            return Err(CliError::Usage(format!(
                "W4 rotation in {workers} partitions: {} failed, {} conflicts",
                s.failed, s.conflicts
            )));
        }
        documents.push(s.rewritten);
        partition_seconds.push(*secs);
    }
    check_count(
        &format!("rotate in {workers} partitions (documents rewritten)"),
        documents.iter().sum(),
        n,
    )?;
    Ok(Split {
        seconds,
        documents,
        partition_seconds,
    })
}

fn check_count(what: &str, got: u64, want: u32) -> Result<(), CliError> {
    if got == u64::from(want) {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "W4 {what}: {got} documents, expected {want}"
        )))
    }
}

// ---- peak memory (Linux) ----

fn peak_memory_available() -> bool {
    status_kib("VmHWM").is_some()
}

/// Resets the peak resident set to the current one (`echo 5 > /proc/self/clear_refs`).
fn reset_peak_memory() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` line of `/proc/self/status`.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}
