//! `fieldcrypt keys`: create, list, rotate, disable, enable, destroy, rewrap.
//!
//! Works on the key vault (`--uri` / `--key-vault-uri` with a master key) or a keyset file
//! (`--keyset FILE`). `disable` and `destroy` first count the documents that still reference
//! the key and refuse while there are any, unless `--force`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bson::{doc, RawDocumentBuf};
use fieldcrypt::mongo::LocalKek;
use fieldcrypt::rotation::references;
use fieldcrypt::{Error, InMemoryKeyring, KeyId, KeyKind, KeyState, Keyring};
use futures_util::TryStreamExt;
use serde_json::json;

use crate::common::split_namespace;
use crate::error::{CliError, Result};
use crate::keysource::{change_keyset, connect, with_keyset, KeyArgs, Store};
use crate::report::{self, Exit, OutputOpts, Progress};

#[derive(clap::Subcommand, Debug)]
pub(crate) enum KeysCommand {
    /// Create the first key of an alias (it becomes the alias's primary). Prints its id.
    Create {
        /// The alias (key name) that schema fields refer to, e.g. `pii`.
        alias: String,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        out: OutputOpts,
    },
    /// List every key: id, alias, kind, state, random-nonce encryptions, creation date.
    List {
        /// Only keys of this alias.
        #[arg(long)]
        alias: Option<String>,
        /// Only keys in this state (primary, active, disabled, destroyed).
        #[arg(long)]
        state: Option<KeyState>,
        /// Print only the ids, one per line (for scripts).
        #[arg(long, conflicts_with = "json")]
        ids: bool,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        out: OutputOpts,
    },
    /// Make a new primary key for an alias; the previous primary stays readable (active).
    /// Then run `reencrypt` to move existing data to the new key.
    Rotate {
        /// The alias.
        alias: String,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        out: OutputOpts,
    },
    /// Disable a key: it no longer decrypts (reversible with `enable`). Refused while
    /// documents still reference it, unless --force.
    Disable(StateArgs),
    /// Enable a disabled key again (as active).
    Enable {
        /// The key id (UUID).
        id: KeyId,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        out: OutputOpts,
    },
    /// Destroy a key: its material is deleted and data under it is unreadable forever
    /// (crypto-shredding). Refused while documents still reference it, unless --force.
    Destroy(StateArgs),
    /// Re-wrap every key in the key vault under another master key: a new local master key
    /// (--new-master-key-file) or a KMS master key (--to-master-key-doc, its provider in
    /// --kms-providers). Data is not touched. Prints what happened to each key; if a key
    /// cannot be re-wrapped (a KMS outage) it stops there, and running it again resumes.
    Rewrap {
        /// The new local master key (96 bytes, raw or base64).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "to_master_key_doc"
        )]
        new_master_key_file: Option<PathBuf>,
        /// The masterKey document to move every key to, as JSON, e.g.
        /// '{"provider":"aws","region":"us-east-1","key":"arn:aws:kms:…"}'.
        #[arg(long, value_name = "JSON", conflicts_with_all = ["new_master_key_file", "new_provider_name"])]
        to_master_key_doc: Option<String>,
        /// Name the new master key's provider `local:<NAME>` (to tell two local master keys
        /// apart while keys move between them).
        #[arg(long, value_name = "NAME")]
        new_provider_name: Option<String>,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        out: OutputOpts,
    },
}

/// Arguments of `disable` and `destroy`.
#[derive(clap::Args, Debug)]
pub(crate) struct StateArgs {
    /// The key id (UUID).
    id: KeyId,
    /// Collections (`db.collection`) to check for references; default: every collection of
    /// every database on --uri (except admin, config, local and the key vault).
    #[arg(long = "namespace", value_name = "DB.COLL")]
    namespaces: Vec<String>,
    /// Go ahead even though documents still reference the key (they become unreadable).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    out: OutputOpts,
}

pub(crate) async fn run(c: KeysCommand) -> Result<Exit> {
    match c {
        KeysCommand::Create { alias, keys, out } => {
            create_or_rotate(&alias, &keys, &out, true).await
        }
        KeysCommand::Rotate { alias, keys, out } => {
            create_or_rotate(&alias, &keys, &out, false).await
        }
        KeysCommand::List {
            alias,
            state,
            ids,
            keys,
            out,
        } => list(&keys, &out, alias.as_deref(), state, ids).await,
        KeysCommand::Disable(a) => change_state(a, KeyState::Disabled).await,
        KeysCommand::Destroy(a) => change_state(a, KeyState::Destroyed).await,
        KeysCommand::Enable { id, keys, out } => {
            let store = Store::open(&keys).await?;
            store.writable()?;
            set_state(&store, &id, KeyState::Active, false).await?;
            print_done(&out, "enabled", &id);
            Ok(Exit::Ok)
        }
        KeysCommand::Rewrap {
            new_master_key_file,
            to_master_key_doc,
            new_provider_name,
            keys,
            out,
        } => {
            let Store::Vault(vault) = Store::open(&keys).await? else {
                return Err(CliError::Usage(
                    "rewrap works on the key vault (--uri / --key-vault-uri); a keyset file holds keys in clear"
                        .into(),
                ));
            };
            let kek: Arc<dyn fieldcrypt::mongo::KekProvider> =
                match (new_master_key_file, to_master_key_doc) {
                    (Some(file), _) => {
                        let master = fieldcrypt::LocalMasterKey::from_file(&file)
                            .map_err(|e| crate::keysource::in_file(&file, e))?;
                        Arc::new(match new_provider_name {
                            Some(n) => LocalKek::named(&n, master)?,
                            None => LocalKek::new(master),
                        })
                    }
                    (None, Some(json)) => {
                        crate::keysource::master_key_kek(&json, keys.kms()?.as_ref(), None)?
                    }
                    (None, None) => unreachable!("clap requires one of them"),
                };
            let report = vault.rewrap(kek).await?;
            print_rewrap(&report, &out);
            match report.failed {
                Some(failed) => Err(failed.error.into()),
                None => Ok(Exit::Ok),
            }
        }
    }
}

async fn create_or_rotate(
    alias: &str,
    args: &KeyArgs,
    out: &OutputOpts,
    create: bool,
) -> Result<Exit> {
    let store = Store::open_keyset_or(args, create).await?;
    store.writable()?;
    let (new, old) = match &store {
        Store::Keyset { ring, file } => {
            let rotate = |ring: &InMemoryKeyring| -> Result<((KeyId, Option<KeyId>), bool)> {
                let old = ring
                    .keys()
                    .iter()
                    .find(|k| k.alias() == alias)
                    .map(|_| ring.primary(alias).ok().map(|k| k.id()));
                if create && old.is_some() {
                    return Err(exists(alias));
                }
                if !create && old.is_none() {
                    return Err(Error::UnknownAlias(alias.to_owned()).into());
                }
                Ok(((ring.rotate(alias), old.flatten()), true))
            };
            match file {
                // Re-read under the file's lock: a concurrent rotation is kept, not overwritten.
                Some(f) => change_keyset(f, create, rotate)?,
                None => rotate(ring)?.0,
            }
        }
        Store::Vault(v) => {
            let infos = v.list().await?;
            let of_alias: Vec<_> = infos.iter().filter(|k| k.alias == alias).collect();
            if create && !of_alias.is_empty() {
                return Err(exists(alias));
            }
            if !create && of_alias.is_empty() {
                return Err(Error::UnknownAlias(alias.to_owned()).into());
            }
            let old = of_alias
                .iter()
                .find(|k| k.state == KeyState::Primary)
                .map(|k| k.id);
            (v.create_key(alias).await?, old)
        }
        Store::VaultFile(_) => unreachable!("refused by writable()"),
    };
    if out.json {
        println!(
            "{}",
            json!({ "alias": alias, "id": new, "previous_primary": old })
        );
    } else {
        println!("{new}");
        if !out.quiet {
            match old {
                Some(o) => eprintln!("new primary of {alias:?}; the previous primary {o} stays readable: run `fieldcrypt reencrypt` to move data to the new key"),
                None if !create => eprintln!("new primary of {alias:?}"),
                None => eprintln!("created the first key of {alias:?}"),
            }
        }
    }
    Ok(Exit::Ok)
}

/// Prints a rewrap's report: a line per key, then a summary (stderr); or one JSON document.
fn print_rewrap(report: &fieldcrypt::mongo::RewrapReport, out: &OutputOpts) {
    use fieldcrypt::mongo::RewrapOutcome;
    let outcome = |o: RewrapOutcome| match o {
        RewrapOutcome::Rewrapped => "rewrapped",
        RewrapOutcome::RewrappedInKms => "rewrapped-in-kms",
        RewrapOutcome::AlreadyThere => "already-there",
        RewrapOutcome::SkippedDestroyed => "skipped-destroyed",
        RewrapOutcome::ChangedMeanwhile => "changed-meanwhile",
        _ => "other",
    };
    let failed = report
        .failed
        .as_ref()
        .map(|f| json!({ "id": f.id, "alias": f.alias, "error": f.error.to_string() }));
    if out.json {
        let keys: Vec<_> = report
            .keys
            .iter()
            .map(|k| json!({ "id": k.id, "alias": k.alias, "from": k.from, "to": k.to, "outcome": outcome(k.outcome) }))
            .collect();
        println!(
            "{}",
            json!({ "rewrapped": report.rewrapped(), "keys": keys, "failed": failed, "complete": report.failed.is_none() })
        );
        return;
    }
    for k in &report.keys {
        println!(
            "{}  {:<20}  {:<17}  {} -> {}",
            k.id,
            k.alias,
            outcome(k.outcome),
            k.from,
            k.to
        );
    }
    if out.quiet {
        return;
    }
    match &report.failed {
        None => eprintln!(
            "re-wrapped {} key(s) ({} already there); use the new master key from now on",
            report.rewrapped(),
            report.keys.len() - report.rewrapped()
        ),
        Some(f) => eprintln!(
            "stopped at key {} ({:?}) after re-wrapping {} key(s): nothing is lost, every key \
             still unwraps; fix the cause and run the same command again to resume",
            f.id,
            f.alias,
            report.rewrapped()
        ),
    }
}

fn exists(alias: &str) -> CliError {
    CliError::Usage(format!(
        "alias {alias:?} already has keys; use `fieldcrypt keys rotate {alias}` for a new primary"
    ))
}

async fn list(
    args: &KeyArgs,
    out: &OutputOpts,
    alias: Option<&str>,
    state: Option<KeyState>,
    ids_only: bool,
) -> Result<Exit> {
    struct Row {
        id: KeyId,
        alias: String,
        kind: KeyKind,
        state: KeyState,
        encryptions: u64,
        created: bson::DateTime,
        version: Option<u64>,
        provider: String,
        master_key: String,
    }
    let store = Store::open_for_listing(args).await?;
    let rows: Vec<Row> = match &store {
        Store::Keyset { ring, .. } | Store::VaultFile(ring) => ring_rows(ring)
            .into_iter()
            // Keys in clear (a keyset), or already unwrapped from a --key-vault-file.
            .map(|r| (r, matches!(store, Store::Keyset { .. })))
            .map(
                |((id, alias, kind, state, encryptions, created), keyset)| Row {
                    id,
                    alias,
                    kind,
                    state,
                    encryptions,
                    created,
                    version: None,
                    provider: if keyset { "keyset" } else { "file" }.to_owned(),
                    master_key: "-".to_owned(),
                },
            )
            .collect(),
        Store::Vault(v) => v
            .list()
            .await?
            .into_iter()
            .map(|k| Row {
                provider: k.provider().to_owned(),
                master_key: fieldcrypt::kms::master_key_id(&k.master_key),
                id: k.id,
                alias: k.alias,
                kind: k.kind,
                state: k.state,
                encryptions: k.encryptions,
                created: k.created,
                version: k.version,
            })
            .collect(),
    };
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| alias.is_none_or(|a| r.alias == a) && state.is_none_or(|st| r.state == st))
        .collect();
    if ids_only {
        for r in &rows {
            println!("{}", r.id);
        }
        return Ok(Exit::Ok);
    }
    let kind_name = |k: KeyKind| {
        if k == KeyKind::Csfle {
            "csfle"
        } else {
            "fieldcrypt"
        }
    };
    let date = |d: bson::DateTime| d.try_to_rfc3339_string().unwrap_or_default();
    if out.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "id": r.id, "alias": r.alias, "kind": kind_name(r.kind), "state": r.state.as_str(),
                    "version": r.version, "encryptions": r.encryptions, "created": date(r.created),
                    "provider": r.provider, "master_key": r.master_key,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        println!(
            "{:<36}  {:<20}  {:<10}  {:<9}  {:>12}  {:<24}  {:<10}  MASTER KEY",
            "ID", "ALIAS", "KIND", "STATE", "ENCRYPTIONS", "CREATED", "PROVIDER"
        );
        for r in &rows {
            println!(
                "{:<36}  {:<20}  {:<10}  {:<9}  {:>12}  {:<24}  {:<10}  {}",
                r.id.to_string(),
                r.alias,
                kind_name(r.kind),
                r.state.as_str(),
                r.encryptions,
                date(r.created),
                r.provider,
                r.master_key
            );
        }
    }
    Ok(Exit::Ok)
}

type RingRow = (KeyId, String, KeyKind, KeyState, u64, bson::DateTime);

fn ring_rows(ring: &InMemoryKeyring) -> Vec<RingRow> {
    let mut v: Vec<RingRow> = ring
        .keys()
        .iter()
        .map(|k| {
            (
                k.id(),
                k.alias().to_owned(),
                k.kind(),
                k.state(),
                k.encryptions(),
                k.created(),
            )
        })
        .collect();
    v.sort_by(|a, b| (&a.1, a.5, a.0).cmp(&(&b.1, b.5, b.0)));
    v
}

async fn set_state(store: &Store, id: &KeyId, state: KeyState, force: bool) -> Result<()> {
    match store {
        Store::Keyset { ring, file } => {
            let change = |ring: &InMemoryKeyring| -> Result<((), bool)> {
                // Checked again on what is in the file now: it may have changed since it was
                // read (a rotation that made this key the primary, say).
                if state != KeyState::Active && !force && ring.key(id)?.state() == KeyState::Primary
                {
                    return Err(CliError::Usage(format!(
                        "key {id} is the primary of its alias: rotate the alias first (`fieldcrypt keys rotate`)"
                    )));
                }
                ring.set_state(id, state)?;
                Ok(((), true))
            };
            match file {
                Some(f) => with_keyset(f, change),
                None => change(ring).map(|_| ()),
            }
        }
        Store::Vault(v) => Ok(v.set_state(id, state).await?),
        Store::VaultFile(_) => unreachable!("refused by writable()"),
    }
}

fn print_done(out: &OutputOpts, what: &str, id: &KeyId) {
    if out.json {
        println!("{}", json!({ "id": id, "state": what }));
    } else if !out.quiet {
        println!("{what} key {id}");
    }
}

async fn change_state(a: StateArgs, state: KeyState) -> Result<Exit> {
    let store = Store::open(&a.keys).await?;
    store.writable()?;
    // The key must exist (and a destroyed key cannot be disabled or destroyed again usefully).
    let current = match &store {
        Store::Keyset { ring, .. } => ring.key(&a.id)?.state(),
        Store::Vault(v) => v
            .list()
            .await?
            .into_iter()
            .find(|k| k.id == a.id)
            .map(|k| k.state)
            .ok_or(Error::UnknownKey(a.id))?,
        Store::VaultFile(_) => unreachable!("refused by writable()"),
    };
    if current == KeyState::Primary && !a.force {
        return Err(CliError::Usage(format!(
            "key {} is the primary of its alias: rotate the alias first (`fieldcrypt keys rotate`), re-encrypt, then {}",
            a.id,
            if state == KeyState::Destroyed { "destroy it" } else { "disable it" }
        )));
    }
    let verb = if state == KeyState::Destroyed {
        "destroy"
    } else {
        "disable"
    };
    if a.force {
        report::warn(&format!(
            "--force: not checking for documents that reference key {}",
            a.id
        ));
    } else {
        let counts = count_references(&a, &a.id).await?;
        let total: u64 = counts.iter().map(|c| c.referencing).sum();
        let unknown: u64 = counts.iter().map(|c| c.unknown).sum();
        if total > 0 || unknown > 0 {
            let list = |f: fn(&RefCount) -> u64| -> Vec<String> {
                counts
                    .iter()
                    .filter(|c| f(c) > 0)
                    .map(|c| format!("{}: {}", c.namespace, f(c)))
                    .collect()
            };
            if a.out.json {
                println!(
                    "{}",
                    json!({
                        "id": a.id, "refused": verb, "documents": total, "unknown": unknown,
                        "by_collection": counts.iter().filter(|c| c.referencing > 0 || c.unknown > 0).map(|c| json!({"namespace": c.namespace, "documents": c.referencing, "unknown": c.unknown})).collect::<Vec<_>>(),
                    })
                );
            }
            let mut why = Vec::new();
            if total > 0 {
                why.push(format!(
                    "{total} document(s) still reference it ({}); run `fieldcrypt reencrypt` first",
                    list(|c| c.referencing).join(", ")
                ));
            }
            if unknown > 0 {
                why.push(format!(
                    "{unknown} document(s) hold a ciphertext or blind index whose key cannot be read, so they may reference it ({}); find them with `fieldcrypt audit` (malformed ciphertext) and repair or remove them",
                    list(|c| c.unknown).join(", ")
                ));
            }
            eprintln!(
                "fieldcrypt: refusing to {verb} key {}: {}, or pass --force",
                a.id,
                why.join("; ")
            );
            return Ok(Exit::Refused);
        }
    }
    set_state(&store, &a.id, state, a.force).await?;
    print_done(
        &a.out,
        if state == KeyState::Destroyed {
            "destroyed"
        } else {
            "disabled"
        },
        &a.id,
    );
    Ok(Exit::Ok)
}

/// Per collection: documents that reference a key, and documents that cannot be ruled out.
struct RefCount {
    namespace: String,
    /// Documents whose ciphertexts or blind indexes name the key.
    referencing: u64,
    /// Documents holding a value that claims to be a ciphertext or blind index but whose key
    /// id cannot be read (malformed): they may reference the key.
    unknown: u64,
}

/// Counts, per collection, the documents whose ciphertexts or blind indexes name `id`, and
/// those that may (a malformed value whose key cannot be read).
async fn count_references(a: &StateArgs, id: &KeyId) -> Result<Vec<RefCount>> {
    let uri = a.keys.data_uri().map_err(|_| {
        CliError::Usage(format!(
            "cannot tell whether documents still reference key {id}: give --uri (and --namespace) to check, or --force"
        ))
    })?;
    let client = connect(&uri).await?;
    let mut namespaces = a.namespaces.clone();
    if namespaces.is_empty() {
        let skip_db = ["admin", "config", "local"];
        for db in client.list_database_names().await? {
            if skip_db.contains(&db.as_str()) {
                continue;
            }
            for coll in client.database(&db).list_collection_names().await? {
                let ns = format!("{db}.{coll}");
                if ns == a.keys.key_vault_namespace
                    || ns == "fieldcrypt.checkpoints"
                    || coll.starts_with("system.")
                {
                    continue;
                }
                namespaces.push(ns);
            }
        }
        namespaces.sort();
    }
    let stop = report::interrupt_flag();
    let mut out = Vec::new();
    for ns in namespaces {
        let (db, coll) = split_namespace(&ns)?;
        let c = client.database(db).collection::<RawDocumentBuf>(coll);
        let total = c.estimated_document_count().await.ok();
        let mut progress = Progress::new(&a.out, &format!("checking {ns}"), total);
        let mut cursor = c.find(doc! {}).await?;
        let (mut seen, mut n, mut unknown) = (0u64, 0u64, 0u64);
        while let Some(d) = cursor.try_next().await? {
            seen += 1;
            // Leniently: a malformed value elsewhere in the document must neither hide the
            // document's readable references nor be taken as "no reference".
            let refs = references(&d);
            if refs.keys.contains(id) {
                n += 1;
            } else if !refs.is_complete() {
                unknown += 1;
            }
            if seen % 1000 == 0 {
                progress.update(
                    seen,
                    total,
                    &format!("{n} referencing"),
                    json!({ "namespace": ns, "referencing": n }),
                );
                if stop.load(Ordering::SeqCst) {
                    return Err(CliError::Usage("interrupted".into()));
                }
            }
        }
        progress.finish();
        out.push(RefCount {
            namespace: ns,
            referencing: n,
            unknown,
        });
    }
    Ok(out)
}
