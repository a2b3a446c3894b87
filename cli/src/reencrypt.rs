//! `fieldcrypt reencrypt` (key rotation) and `fieldcrypt migrate` (plaintext, CSFLE or Queryable
//! Encryption fields to fieldcrypt): the rotation engine over live collections. See docs/ROTATION.md.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bson::Bson;
use fieldcrypt::rotation::{
    Flow, Partition, Phase, Report, RotationOptions, Rotator, Stats, TargetReport,
};
use serde_json::json;

use crate::common::{load_schema, raw_collection, split_namespace, target};
use crate::error::{CliError, Result};
use crate::keysource::{connect, KeyArgs, Keys};
use crate::report::{self, Exit, OutputOpts, Progress};

/// Options shared by `reencrypt` and `migrate`.
#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The schema the collections follow (docs/SCHEMA.md).
    #[arg(long, value_name = "FILE")]
    schema: PathBuf,
    /// A collection to process, `db.collection`; repeat for several (same schema).
    #[arg(long = "namespace", value_name = "DB.COLL", required = true)]
    namespaces: Vec<String>,
    /// Documents per batch: one read, one write command and one checkpoint each.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Count and check what would be rewritten, but write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Continue an interrupted run from its checkpoint (finished collections are skipped).
    #[arg(long)]
    resume: bool,
    /// Process only share i of N (0-based), by a hash of `_id`: run N workers, i = 0..N-1, at
    /// the same time, each with its own checkpoint. In a Kubernetes Indexed Job use
    /// --partitions N instead.
    #[arg(long, value_name = "i/N", conflicts_with_all = ["id_from", "id_to"])]
    partition: Option<Partition>,
    /// The number of hash partitions N, with this worker's index i taken from
    /// `JOB_COMPLETION_INDEX` (set in each pod of a Kubernetes Indexed Job): the same as
    /// `--partition $JOB_COMPLETION_INDEX/N`. Give the Job's `completions`.
    #[arg(long, value_name = "N", env = "FIELDCRYPT_PARTITIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    partitions: Option<u32>,
    /// Process only `_id` >= this value (Extended JSON, e.g. '{"$oid":"…"}'): range
    /// partitions, e.g. along a sharded cluster's chunks.
    #[arg(long, value_name = "EXTJSON")]
    id_from: Option<String>,
    /// Process only `_id` < this value (Extended JSON).
    #[arg(long, value_name = "EXTJSON")]
    id_to: Option<String>,
    /// At most this many documents per second.
    #[arg(long, value_name = "DOCS_PER_SEC")]
    rate: Option<f64>,
    /// Name of the job in checkpoints (default: the command name).
    #[arg(long)]
    job: Option<String>,
    /// Where checkpoints are kept, `db.collection` on the data cluster.
    #[arg(long, value_name = "DB.COLL", default_value = "fieldcrypt.checkpoints")]
    checkpoint_namespace: String,
    /// The ciphertexts are not bound to their collection's namespace (they were written
    /// without one, e.g. by `encrypt` without --namespace).
    #[arg(long)]
    no_namespace_binding: bool,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    out: OutputOpts,
}

#[derive(clap::Args, Debug)]
pub(crate) struct ReencryptArgs {
    #[command(flatten)]
    run: RunArgs,
}

/// What `migrate` converts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum From {
    /// Plaintext values in schema fields.
    Plaintext,
    /// MongoDB CSFLE values in schema fields (their keys must be available: key vault or
    /// --key-vault-file).
    Csfle,
    /// MongoDB Queryable Encryption values in schema fields (all four stored forms; keys as for
    /// csfle); removes each document's `__safeContent__`.
    Qe,
    /// All three.
    All,
}

#[derive(clap::Args, Debug)]
pub(crate) struct MigrateArgs {
    /// What to convert.
    #[arg(long, value_enum, default_value_t = From::All)]
    from: From,
    #[command(flatten)]
    run: RunArgs,
}

pub(crate) async fn run_reencrypt(a: ReencryptArgs) -> Result<Exit> {
    run(a.run, "reencrypt", Migrate::default()).await
}

/// What a run migrates besides re-encrypting.
#[derive(Clone, Copy, Debug, Default)]
struct Migrate {
    plaintext: bool,
    csfle: bool,
    qe: bool,
}

pub(crate) async fn run_migrate(a: MigrateArgs) -> Result<Exit> {
    let m = Migrate {
        plaintext: matches!(a.from, From::Plaintext | From::All),
        csfle: matches!(a.from, From::Csfle | From::All),
        qe: matches!(a.from, From::Qe | From::All),
    };
    run(a.run, "migrate", m).await
}

fn ext_json(flag: &str, text: &str) -> Result<Bson> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|_| CliError::Usage(format!("{flag}: not JSON")))?;
    Bson::try_from(v).map_err(|_| CliError::Usage(format!("{flag}: not valid Extended JSON")))
}

/// The variable a Kubernetes Indexed Job sets in each pod: its index, `0..completions`.
const JOB_INDEX_VAR: &str = "JOB_COMPLETION_INDEX";

/// The partition a worker runs, from `--partition`, `--id-from`/`--id-to`, or `--partitions`
/// (`FIELDCRYPT_PARTITIONS`) with the index in `job_index` (`JOB_COMPLETION_INDEX`).
///
/// An explicit `--partition` must agree with the environment when both are set, so that a
/// manifest that gives every pod the same `--partition` fails instead of running one share N
/// times and leaving the others undone.
///
/// # Errors
/// [`CliError::Usage`] for a missing total, a missing or malformed index, an index not below the
/// total, and conflicting options.
fn resolve_partition(a: &RunArgs, job_index: Option<&str>) -> Result<Partition> {
    let ranged = a.id_from.is_some() || a.id_to.is_some();
    let index = || -> Result<u32> {
        let text = job_index.ok_or_else(|| {
            CliError::Usage(format!(
                "--partitions / FIELDCRYPT_PARTITIONS gives the number of partitions; this worker's index comes from {JOB_INDEX_VAR}, which is not set (a Kubernetes Indexed Job sets it; elsewhere give --partition i/N)"
            ))
        })?;
        text.trim().parse::<u32>().map_err(|_| {
            CliError::Usage(format!(
                "{JOB_INDEX_VAR}={text:?} is not a partition index (a number from 0)"
            ))
        })
    };
    match (&a.partition, a.partitions) {
        (Some(_), _) | (None, Some(_)) if ranged => Err(CliError::Usage(
            "--partition / --partitions (hash partitions) and --id-from / --id-to (a range) \
             select documents in two ways: give one"
                .into(),
        )),
        (Some(p), total) => {
            let (index, count) = match p {
                Partition::Hash { index, count } => (*index, *count),
                _ => (0, 1),
            };
            let label = p.label();
            if let Some(n) = total.filter(|&n| n != count) {
                return Err(CliError::Usage(format!(
                    "--partition {label} conflicts with --partitions / FIELDCRYPT_PARTITIONS = {n}: give one"
                )));
            }
            if let Some(text) = job_index {
                if text.trim().parse::<u32>().ok() != Some(index) {
                    return Err(CliError::Usage(format!(
                        "--partition {label} conflicts with {JOB_INDEX_VAR}={text:?}: give every pod of an Indexed Job its own partition (--partitions N reads the index from {JOB_INDEX_VAR})"
                    )));
                }
            }
            Ok(p.clone())
        }
        (None, Some(count)) => {
            let index = index()?;
            if index >= count {
                return Err(CliError::Usage(format!(
                    "{JOB_INDEX_VAR}={index} is not below the number of partitions, {count} (--partitions / FIELDCRYPT_PARTITIONS must equal the Job's completions)"
                )));
            }
            Partition::hash(index, count).map_err(CliError::from)
        }
        (None, None) if ranged => Ok(Partition::Range {
            from: a
                .id_from
                .as_deref()
                .map(|t| ext_json("--id-from", t))
                .transpose()?,
            to: a
                .id_to
                .as_deref()
                .map(|t| ext_json("--id-to", t))
                .transpose()?,
        }),
        (None, None) => match job_index {
            Some(_) => Err(CliError::Usage(format!(
                "{JOB_INDEX_VAR} is set (a Kubernetes Indexed Job) but the number of partitions is not: give --partitions N or FIELDCRYPT_PARTITIONS=N (the Job's completions), or --partition i/N"
            ))),
            None => Ok(Partition::All),
        },
    }
}

async fn run(a: RunArgs, command: &str, m: Migrate) -> Result<Exit> {
    let schema = Arc::new(load_schema(&a.schema)?);
    let job_index = std::env::var(JOB_INDEX_VAR).ok().filter(|v| !v.is_empty());
    let partition = resolve_partition(&a, job_index.as_deref())?;
    let keys = Keys::open(&a.keys).await?;
    let client = connect(&a.keys.data_uri()?).await?;
    let mut targets = Vec::new();
    for ns in &a.namespaces {
        let c = raw_collection(&client, ns)?;
        targets.push(target(&c, &schema, a.no_namespace_binding));
    }
    let (cdb, ccoll) = split_namespace(&a.checkpoint_namespace)?;
    let options = RotationOptions::default()
        .job(a.job.clone().unwrap_or_else(|| command.to_owned()))
        .batch_size(a.batch)
        .partition(partition)
        .resume(a.resume)
        .dry_run(a.dry_run)
        .rate_limit(a.rate)
        .migrate_plaintext(m.plaintext)
        .migrate_csfle(m.csfle)
        .migrate_qe(m.qe);
    let rotator = Rotator::new(keys.source.clone())
        .options(options)
        .checkpoint_collection(client.database(cdb).collection(ccoll));

    let stop = report::interrupt_flag();
    let mut bar: Option<(String, Progress)> = None;
    let out = a.out.clone();
    let result = rotator
        .run(&targets, |p| {
            if matches!(
                p.phase,
                Phase::Checkpointed | Phase::Finished | Phase::Started | Phase::BatchWritten
            ) {
                let fresh = bar.as_ref().is_none_or(|(ns, _)| ns != p.namespace);
                if fresh {
                    let label = format!("{command} {}", p.namespace);
                    bar = Some((
                        p.namespace.to_owned(),
                        Progress::new(&out, &label, p.estimated_total),
                    ));
                }
                if let Some((_, bar)) = bar.as_mut() {
                    let s = p.totals;
                    let msg = format!(
                        "rewritten {} current {} conflicts {} failed {}{}",
                        s.rewritten,
                        s.current,
                        s.conflicts,
                        s.failed,
                        if s.skipped > 0 {
                            format!(" skipped {}", s.skipped)
                        } else {
                            String::new()
                        }
                    );
                    let mut fields = stats_json(&p.stats);
                    if let Some(o) = fields.as_object_mut() {
                        o.insert("namespace".into(), json!(p.namespace));
                        o.insert("partition".into(), json!(p.partition));
                        o.insert(
                            "phase".into(),
                            json!(format!("{:?}", p.phase).to_lowercase()),
                        );
                        o.insert("rate".into(), json!(report::round(p.rate())));
                        o.insert("eta_seconds".into(), json!(p.eta().map(|d| d.as_secs())));
                    }
                    if p.phase != Phase::BatchWritten {
                        bar.update(s.scanned, p.estimated_total, &msg, fields);
                    }
                    if p.phase == Phase::Finished {
                        bar.finish();
                    }
                }
            }
            if stop.load(Ordering::SeqCst) && p.phase != Phase::BatchWritten {
                // Stop after a checkpoint (or before a batch's writes): nothing is lost, and
                // --resume continues from there.
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .await;
    drop(bar);
    let report = result?;
    if !a.dry_run {
        keys.persist_counters()?;
    }
    summarize(&report, &a, command, m.plaintext || m.csfle || m.qe)
}

fn stats_json(s: &Stats) -> serde_json::Value {
    json!({
        "scanned": s.scanned, "rewritten": s.rewritten, "current": s.current,
        "conflicts": s.conflicts, "failed": s.failed, "skipped": s.skipped,
    })
}

fn target_json(t: &TargetReport) -> serde_json::Value {
    json!({
        "namespace": t.namespace,
        "partition": t.partition,
        "complete": t.complete,
        "unresolved": t.unresolved,
        "resumed": t.resumed,
        "restarted": t.restarted,
        "seconds": report::round(t.elapsed.as_secs_f64()),
        "stats": stats_json(&t.stats),
        "totals": stats_json(&t.totals),
        "failures": t.failures.iter().map(|f| json!({
            "_id": f.id.clone().into_relaxed_extjson(),
            "reason": f.reason,
        })).collect::<Vec<_>>(),
    })
}

fn summarize(report: &Report, a: &RunArgs, command: &str, migrating: bool) -> Result<Exit> {
    let s = report.stats();
    // Exit 4 until a run leaves no failure behind: failures of this run, and those of earlier
    // runs of the job that this one retried and that still fail (the job is not complete).
    let exit = if report.stopped {
        Exit::Interrupted
    } else if s.failed > 0 || !report.complete() {
        Exit::Failed
    } else {
        Exit::Ok
    };
    if a.out.json {
        println!(
            "{}",
            json!({
                "event": "summary",
                "command": command,
                "dry_run": a.dry_run,
                "complete": report.complete(),
                "interrupted": report.stopped,
                "stats": stats_json(&s),
                "targets": report.targets.iter().map(target_json).collect::<Vec<_>>(),
            })
        );
    } else {
        for t in &report.targets {
            let st = &t.stats;
            let verb = if a.dry_run {
                "would rewrite"
            } else {
                "rewrote"
            };
            println!(
                "{} [{}]: scanned {}, {verb} {}, already current {}, conflicts {} (retried), failed {}, skipped {}{}{}",
                t.namespace,
                t.partition,
                st.scanned,
                st.rewritten,
                st.current,
                st.conflicts,
                st.failed,
                st.skipped,
                if t.resumed { "; resumed from checkpoint" } else { "" },
                if t.restarted { "; checkpoint ignored (primary keys changed since), started over" } else { "" },
            );
            if t.complete && t.stats.scanned == 0 && t.resumed {
                println!("  already complete: nothing to do");
            }
            for f in &t.failures {
                println!(
                    "  failed _id {}: {}",
                    f.id.clone().into_relaxed_extjson(),
                    f.reason
                );
            }
            if st.failed > t.failures.len() as u64 {
                println!(
                    "  … and {} more failures",
                    st.failed - t.failures.len() as u64
                );
            }
            if !report.stopped && !t.complete && t.unresolved > 0 {
                println!(
                    "  not complete: {} document(s) could not be processed; fix them and run again with --resume (they are retried first)",
                    t.unresolved
                );
            }
        }
        let unbound = report.targets.iter().any(|t| {
            t.failures
                .iter()
                .any(|f| f.reason.contains("not bound to the namespace"))
        });
        if unbound && !a.no_namespace_binding {
            report::warn(
                "some values are not bound to their collection's namespace (written without one, e.g. by `fieldcrypt encrypt` without --namespace, or moved from elsewhere): if the collection was written that way, run with --no-namespace-binding",
            );
        }
        if s.skipped > 0 && !migrating {
            report::warn(&format!(
                "{} document(s) hold plaintext, CSFLE or Queryable Encryption values in encrypted fields: run `fieldcrypt migrate`",
                s.skipped
            ));
        }
        if report.stopped {
            report::warn(
                "interrupted: progress is saved; run the same command with --resume to finish",
            );
        }
        if a.dry_run {
            println!("dry run: nothing was written");
        }
    }
    Ok(exit)
}
