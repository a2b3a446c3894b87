//! `fieldcrypt audit`: what is really stored in collections, against their schema and keys.
//! Exit code 3 when anything is found, so it can gate a CI job.

use std::path::PathBuf;
use std::sync::Arc;

use fieldcrypt::rotation::{Audit, AuditOptions, AuditReport};
use serde_json::json;

use crate::common::{load_schema, raw_collection, target};
use crate::error::Result;
use crate::keysource::{connect, KeyArgs, Keys};
use crate::report::{Exit, OutputOpts, Progress};

#[derive(clap::Args, Debug)]
pub(crate) struct AuditArgs {
    /// The schema the collections should follow (docs/SCHEMA.md).
    #[arg(long, value_name = "FILE")]
    schema: PathBuf,
    /// A collection to audit, `db.collection`; repeat for several (same schema).
    #[arg(long = "namespace", value_name = "DB.COLL", required = true)]
    namespaces: Vec<String>,
    /// Do not count values under active (non-primary) keys as findings.
    #[arg(long)]
    allow_stale: bool,
    /// Do not look for token-like secrets in unencrypted fields.
    #[arg(long)]
    no_tokens: bool,
    /// Report random-nonce keys once they have used this fraction of their limit.
    #[arg(long, default_value_t = 0.5, value_name = "FRACTION")]
    nonce_warning: f64,
    /// Check only that no document references this key (exit 3 if any does), e.g. before
    /// disabling it; other findings are not reported.
    #[arg(long, value_name = "KEY_ID")]
    key: Option<fieldcrypt::KeyId>,
    /// Read at most this many documents per collection.
    #[arg(long)]
    limit: Option<u64>,
    /// The ciphertexts are not bound to their collection's namespace.
    #[arg(long)]
    no_namespace_binding: bool,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    out: OutputOpts,
}

pub(crate) async fn run(a: AuditArgs) -> Result<Exit> {
    let schema = Arc::new(load_schema(&a.schema)?);
    let keys = Keys::open(&a.keys).await?;
    let client = connect(&a.keys.data_uri()?).await?;
    let mut options = AuditOptions::default()
        .allow_stale(a.allow_stale)
        .tokens(!a.no_tokens)
        .limit(a.limit);
    options.nonce_warning = a.nonce_warning;
    let audit = Audit::new(keys.source.clone()).options(options);
    let mut reports = Vec::new();
    for ns in &a.namespaces {
        let c = raw_collection(&client, ns)?;
        let target = target(&c, &schema, a.no_namespace_binding);
        let total = c
            .estimated_document_count()
            .await
            .ok()
            .map(|n| a.limit.map_or(n, |l| l.min(n)));
        let mut progress = Progress::new(&a.out, &format!("audit {ns}"), total);
        let rep = audit
            .run(&target, |n| {
                progress.update(n, total, "documents", json!({ "namespace": ns }))
            })
            .await?;
        progress.finish();
        reports.push(rep);
    }
    if let Some(id) = a.key {
        return only_key(&reports, &id, &a.out);
    }
    let findings: usize = reports.iter().map(|r| r.findings.len()).sum();
    if a.out.json {
        println!(
            "{}",
            json!({ "clean": findings == 0, "findings": findings, "collections": reports })
        );
    } else {
        for r in &reports {
            print_report(r);
        }
        if findings == 0 {
            println!("audit: clean");
        } else {
            println!("audit: {findings} finding(s)");
        }
    }
    Ok(if findings == 0 {
        Exit::Ok
    } else {
        Exit::Findings
    })
}

fn print_report(r: &AuditReport) {
    println!(
        "{}: {} document(s), {} current",
        r.namespace, r.documents, r.current
    );
    if !r.suites.is_empty() {
        let s: Vec<String> = r.suites.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  suites: {}", s.join(", "));
    }
    if r.csfle_values > 0 {
        println!(
            "  CSFLE values in schema fields: {} (run `fieldcrypt migrate --from csfle`)",
            r.csfle_values
        );
    }
    if !r.qe_values.is_empty() {
        let kinds: Vec<String> = r
            .qe_values
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "  Queryable Encryption values in schema fields: {} (run `fieldcrypt migrate --from qe`)",
            kinds.join(", ")
        );
    }
    if r.safe_content_documents > 0 {
        println!(
            "  documents with __safeContent__: {} (removed by `fieldcrypt migrate --from qe`)",
            r.safe_content_documents
        );
    }
    for k in &r.keys {
        let mut parts = Vec::new();
        if k.envelopes > 0 {
            parts.push(format!("{} value(s)", k.envelopes));
        }
        if k.csfle > 0 {
            parts.push(format!("{} CSFLE value(s)", k.csfle));
        }
        if k.qe > 0 {
            parts.push(format!("{} Queryable Encryption value(s)", k.qe));
        }
        if k.blind_indexes > 0 {
            parts.push(format!("{} blind index(es)", k.blind_indexes));
        }
        println!(
            "  key {} ({}, {}): {} in {} document(s){}",
            k.key,
            k.alias.as_deref().unwrap_or("?"),
            k.state,
            parts.join(", "),
            k.documents,
            k.encryptions
                .map_or_else(String::new, |n| format!("; {n} random-nonce encryptions"))
        );
    }
    for f in &r.findings {
        println!("  FINDING: {}", f.describe());
    }
}

/// `--key`: how many documents of each collection still reference one key, and how many may
/// (a malformed ciphertext, whose key cannot be read).
fn only_key(reports: &[AuditReport], id: &fieldcrypt::KeyId, out: &OutputOpts) -> Result<Exit> {
    let counts: Vec<(&str, u64, u64, u64)> = reports
        .iter()
        .map(|r| {
            let k = r.keys.iter().find(|k| k.key == *id);
            (
                r.namespace.as_str(),
                k.map_or(0, |k| k.documents),
                k.map_or(0, |k| k.envelopes + k.csfle + k.qe + k.blind_indexes),
                r.unreadable,
            )
        })
        .collect();
    let documents: u64 = counts.iter().map(|c| c.1).sum();
    let unknown: u64 = counts.iter().map(|c| c.3).sum();
    let clean = documents == 0 && unknown == 0;
    if out.json {
        println!(
            "{}",
            json!({
                "key": id,
                "clean": clean,
                "documents": documents,
                "unknown": unknown,
                "collections": counts.iter().map(|(ns, d, v, u)| json!({ "namespace": ns, "documents": d, "values": v, "unknown": u })).collect::<Vec<_>>(),
            })
        );
    } else {
        for (ns, d, v, u) in &counts {
            println!("{ns}: {d} document(s), {v} value(s) reference key {id}");
            if *u > 0 {
                println!("{ns}: {u} document(s) hold a malformed ciphertext whose key cannot be read (they may reference key {id})");
            }
        }
        if documents > 0 {
            println!("audit: {documents} document(s) still reference key {id}");
        } else if unknown > 0 {
            println!("audit: {unknown} document(s) may reference key {id} (malformed ciphertexts: repair or remove them)");
        } else {
            println!("audit: no document references key {id}");
        }
    }
    Ok(if clean { Exit::Ok } else { Exit::Findings })
}
