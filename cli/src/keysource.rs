//! Where keys come from, and the MongoDB connection.
//!
//! In order of precedence:
//! 1. `--keyset FILE`: fieldcrypt's keyset file (keys in clear, docs/KEYSET.md);
//! 2. `--key-vault-file FILE`: key documents as Extended JSON, one per line (a `mongoexport` of a
//!    key vault: fieldcrypt's keys and MongoDB CSFLE keys alike), unwrapped with the master key;
//!    (1 and 2 may be combined: both go into one in-memory keyring)
//! 3. `FIELDCRYPT_KEYSET`: a keyset in base64, from the environment;
//! 4. the key vault at `--key-vault-uri` (default: `--uri`), collection
//!    `--key-vault-namespace` (default `keyvault.datakeys`), unwrapped with the master key.
//!
//! The master keys that wrap the key vault's keys: the local one (MongoDB's `local` KMS
//! provider: 96 bytes) from `--master-key-file` or `FIELDCRYPT_MASTER_KEY` (base64), and the KMS
//! providers of `--kms-providers FILE` (MongoDB's `kmsProviders`, docs/KEY_VAULT.md). Every
//! command that unwraps keys reaches all of them; new keys are wrapped under
//! `--master-key-doc` (default: the local master key).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bson::{doc, Bson, Document};
use fieldcrypt::kms::KmsProviders;
use fieldcrypt::mongo::{
    KekProvider, KeySource, KeyVault, LocalKek, DEFAULT_KEY_VAULT_NAMESPACE, MASTER_KEY_ENV,
};
use fieldcrypt::{
    ArgumentError, Error, InMemoryKeyring, Key, KeyId, KeyMaterial, KeyState, Keyring,
    RANDOM_NONCE_LIMIT,
};
use mongodb::Client;

use crate::error::{CliError, Result};
use crate::uri::ConnectionString;

/// The environment variable holding a keyset (base64 of its JSON).
pub(crate) const KEYSET_ENV: &str = "FIELDCRYPT_KEYSET";

/// The environment variable holding the KMS configuration (`--kms-providers`): a path, or
/// the JSON itself.
pub(crate) const KMS_PROVIDERS_ENV: &str = "FIELDCRYPT_KMS_PROVIDERS";

/// The environment variable holding the key vault's connection string (`--key-vault-uri`).
pub(crate) const KEY_VAULT_URI_ENV: &str = "FIELDCRYPT_KEY_VAULT_URI";

/// Key and connection options, shared by every command that needs keys or a server.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct KeyArgs {
    /// The data cluster's connection string. Refused on the command line when it holds a
    /// password (every user of the machine can read a command line): give such a URI in the
    /// environment variable MONGODB_URI or with --uri-file.
    #[arg(long, env = "MONGODB_URI", hide_env_values = true)]
    pub uri: Option<ConnectionString>,
    /// Read the data cluster's connection string from this file (its first line), instead of
    /// --uri / MONGODB_URI.
    #[arg(long, value_name = "FILE")]
    pub uri_file: Option<PathBuf>,
    /// The key vault's cluster, when not the data cluster. Refused on the command line when it
    /// holds a password: give such a URI in the environment variable FIELDCRYPT_KEY_VAULT_URI
    /// or with --key-vault-uri-file.
    #[arg(long, env = KEY_VAULT_URI_ENV, hide_env_values = true)]
    pub key_vault_uri: Option<ConnectionString>,
    /// Read the key vault's connection string from this file (its first line), instead of
    /// --key-vault-uri / FIELDCRYPT_KEY_VAULT_URI.
    #[arg(long, value_name = "FILE")]
    pub key_vault_uri_file: Option<PathBuf>,
    /// The key vault collection, `database.collection`.
    #[arg(long, default_value = DEFAULT_KEY_VAULT_NAMESPACE)]
    pub key_vault_namespace: String,
    /// The local master key (96 bytes, raw or base64) that wraps the key vault's keys; default
    /// from the environment variable FIELDCRYPT_MASTER_KEY (base64).
    #[arg(long, value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// KMS providers that wrap key vault keys: a file of MongoDB's `kmsProviders` as JSON or
    /// TOML (optionally with `tlsOptions` and `retry`; docs/KEY_VAULT.md). Default from the
    /// environment variable FIELDCRYPT_KMS_PROVIDERS: a path, or the JSON itself.
    #[arg(long, value_name = "FILE")]
    pub kms_providers: Option<PathBuf>,
    /// The masterKey document new keys are wrapped under, as JSON, e.g.
    /// '{"provider":"aws","region":"us-east-1","key":"arn:aws:kms:…"}' (its provider must be in
    /// --kms-providers). Default: {"provider":"local"}, the local master key.
    #[arg(long, value_name = "JSON", env = "FIELDCRYPT_MASTER_KEY_DOC")]
    pub master_key_doc: Option<String>,
    /// Key documents offline: Extended JSON, one per line (mongoexport of a key vault).
    #[arg(long, value_name = "FILE")]
    pub key_vault_file: Option<PathBuf>,
    /// A fieldcrypt keyset file (keys in clear; docs/KEYSET.md). Default from the environment
    /// variable FIELDCRYPT_KEYSET (base64), if set.
    #[arg(long, value_name = "FILE")]
    pub keyset: Option<PathBuf>,
}

impl KeyArgs {
    /// The data cluster's URI.
    pub(crate) fn data_uri(&self) -> Result<String> {
        self.uri_value()?
            .ok_or_else(|| CliError::Usage("no server: give --uri or set MONGODB_URI".into()))
    }

    /// The data cluster's URI, if any: from `--uri-file`, else `--uri` / `MONGODB_URI`.
    fn uri_value(&self) -> Result<Option<String>> {
        match &self.uri_file {
            Some(f) => uri_from_file(f).map(Some),
            None => Ok(self.uri.as_ref().map(|u| u.expose().to_owned())),
        }
    }

    fn master(&self) -> Result<LocalKek> {
        match &self.master_key_file {
            Some(f) => LocalKek::from_file(f).map_err(|e| in_file(f, e)),
            None => LocalKek::from_env().map_err(|e| match e {
                Error::InvalidArgument(ArgumentError::MissingEnvVar(_)) => CliError::Usage(
                    format!("no master key: give --master-key-file or set {MASTER_KEY_ENV}"),
                ),
                other => other.into(),
            }),
        }
    }

    /// The KMS providers of `--kms-providers`, if given.
    pub(crate) fn kms(&self) -> Result<Option<Arc<KmsProviders>>> {
        match &self.kms_providers {
            Some(f) => KmsProviders::from_file(f)
                .map(|p| Some(Arc::new(p)))
                .map_err(|e| in_file(f, e)),
            // Inline JSON, or a path.
            None => Ok(KmsProviders::from_env_var(KMS_PROVIDERS_ENV)?.map(Arc::new)),
        }
    }

    /// Every configured master key: the KEK that wraps new keys and those that unwrap.
    pub(crate) fn keks(&self) -> Result<Keks> {
        let providers = self.kms()?;
        let local = match self.master() {
            Ok(k) => Some(Arc::new(k)),
            // No local master key is fine when KMS providers are configured.
            Err(CliError::Usage(_)) if providers.is_some() && self.master_key_file.is_none() => {
                None
            }
            Err(e) => return Err(e),
        };
        let wrap: Option<Arc<dyn KekProvider>> = match &self.master_key_doc {
            Some(json) => Some(master_key_kek(json, providers.as_ref(), local.as_ref())?),
            None => local.clone().map(|k| k as Arc<dyn KekProvider>),
        };
        let mut unwrap: Vec<Arc<dyn KekProvider>> = Vec::new();
        if let Some(p) = &providers {
            unwrap.push(p.unwrapper());
        }
        if let Some(l) = local {
            if !providers.as_ref().is_some_and(|p| p.contains("local")) {
                unwrap.push(Arc::new(AnyLocal(l)));
            }
        }
        Ok(Keks { wrap, unwrap })
    }

    fn vault_uri(&self) -> Result<Option<String>> {
        if let Some(f) = &self.key_vault_uri_file {
            return uri_from_file(f).map(Some);
        }
        match &self.key_vault_uri {
            Some(u) => Ok(Some(u.expose().to_owned())),
            None => self.uri_value(),
        }
    }

    fn keyset_env() -> Option<String> {
        std::env::var(KEYSET_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty())
    }
}

/// A connection string from the first line of a file.
fn uri_from_file(f: &Path) -> Result<String> {
    let text =
        zeroize::Zeroizing::new(std::fs::read_to_string(f).map_err(|e| in_file(f, Error::Io(e)))?);
    let uri = text.lines().next().unwrap_or_default().trim();
    if uri.is_empty() {
        return Err(CliError::file(f, "no connection string in the file"));
    }
    Ok(uri.to_owned())
}

/// Refuses a connection string with a password on the command line (`--uri`,
/// `--key-vault-uri`, any command): other users of the machine can read it (`ps`,
/// `/proc/<pid>/cmdline`). The environment and `--uri-file` / `--key-vault-uri-file` are the
/// places for one.
pub(crate) fn refuse_password_in_args() -> Result<()> {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for (i, a) in args.iter().enumerate() {
        for flag in ["--uri", "--key-vault-uri"] {
            let value = if a == flag {
                args.get(i + 1).map(String::as_str)
            } else {
                a.strip_prefix(flag).and_then(|v| v.strip_prefix('='))
            };
            if value.is_some_and(has_password) {
                return Err(CliError::Refused(format!(
                    "{flag} holds a password, which every user of this machine can read on the command line: give connection strings in the environment (MONGODB_URI, {KEY_VAULT_URI_ENV}) or in files (--uri-file FILE, --key-vault-uri-file FILE)"
                )));
            }
        }
    }
    Ok(())
}

/// Whether a MongoDB connection string carries a password (`scheme://user:password@…`).
fn has_password(uri: &str) -> bool {
    let Some((_, rest)) = uri.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// Every client the command made, shut down by [`shutdown_clients`] before the runtime stops.
static CLIENTS: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

/// Connects to a cluster.
pub(crate) async fn connect(uri: &str) -> Result<Client> {
    let client = Client::with_uri_str(uri).await?;
    CLIENTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(client.clone());
    Ok(client)
}

/// Shuts down the clients [`connect`] made, on the runtime that still runs them. Left to their
/// `Drop`, the driver ends their sessions in a task spawned while the runtime shuts down, which
/// can find the connection pool gone and print a panic on stderr after a successful command.
pub(crate) async fn shutdown_clients() {
    let clients = std::mem::take(
        &mut *CLIENTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for client in clients {
        client.shutdown().immediate(true).await;
    }
}

/// How a command that encrypts may use keys whose random-nonce count cannot be recorded.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct NonceArgs {
    /// Encrypt with random nonces under keys from FIELDCRYPT_KEYSET or --key-vault-file,
    /// which cannot record how many encryptions were made: runs then cannot see each
    /// other's, and a key's 2^32 limit can be exceeded unnoticed. Refused without this flag.
    #[arg(long)]
    pub allow_unrecorded_nonces: bool,
}

/// Keys for reading and writing documents.
///
/// A keyset file's keys share their budget of random-nonce encryptions
/// ([`RANDOM_NONCE_LIMIT`]) with every process using the file: before a command lets a batch
/// of ciphertexts out ([`Keys::reserve_used`]), what the batch used is reserved in the file,
/// under its lock, with a block to spare, and refused if the stored count would pass the
/// limit. What is reserved and not used is given back when the `Keys` is dropped (or by
/// [`Keys::persist_counters`]); a process that dies keeps it reserved (safe: the count only
/// runs ahead). Keys from read-only sources (`FIELDCRYPT_KEYSET`, `--key-vault-file`) cannot
/// record their counts: random-nonce encryption under them is refused unless
/// [`NonceArgs::allow_unrecorded_nonces`].
pub(crate) struct Keys {
    /// What the engine and the cryptors use.
    pub source: Arc<dyn KeySource>,
    /// The in-memory keyring, when keys came from files or the environment.
    ring: Option<Arc<InMemoryKeyring>>,
    /// The keyset file to reserve and record encryptions in.
    keyset_file: Option<PathBuf>,
    /// The keyset file's keys: what this process used and reserved of each.
    budget: Mutex<HashMap<KeyId, Budget>>,
    /// Keys from read-only sources, with their counters when loaded.
    unrecorded: HashMap<KeyId, u64>,
    /// Where the read-only keys came from, for messages.
    unrecorded_source: &'static str,
    /// The user accepted random nonces under read-only keys.
    allow_unrecorded: bool,
    /// The keyset file's keys this command encrypts under, checked before each batch leaves.
    watch: Mutex<Watch>,
}

/// The keyset keys a command encrypts under (random, deterministic or blind index alike), and
/// the keyset file as last checked, so that an unchanged file is not read again.
#[derive(Default)]
struct Watch {
    ids: Vec<KeyId>,
    seen: Option<Stamp>,
}

/// What tells a keyset file's versions apart: saves replace the file (a new inode), and any
/// change moves its length or modification time.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            inode,
        })
    }
}

/// One keyset key's share of the file's random-nonce count.
struct Budget {
    /// The key's counter when loaded: what is above it was used by this process.
    loaded: u64,
    /// Encryptions this process added to the file's count (used, or reserved ahead).
    reserved: u64,
}

/// The first block reserved ahead of use; later blocks double, up to [`MAX_BLOCK`].
const MIN_BLOCK: u64 = 4096;
/// The largest block reserved ahead (what a killed process can waste at most, per key).
const MAX_BLOCK: u64 = 1 << 24;

impl Drop for Keys {
    fn drop(&mut self) {
        // A destroyed key was reported by the command itself (or is not its concern).
        if let Err(e) = self.settle_counters() {
            crate::report::warn(&format!(
                "could not write the keys' usage counters back to the keyset file: {}",
                e
            ));
        }
    }
}

impl Keys {
    /// Opens the keys for a data command.
    pub(crate) async fn open(args: &KeyArgs) -> Result<Keys> {
        if args.keyset.is_some() || args.key_vault_file.is_some() {
            let ring = match &args.keyset {
                Some(f) => {
                    warn_if_loose(f);
                    InMemoryKeyring::load(f).map_err(|e| in_file(f, e))?
                }
                None => InMemoryKeyring::new(),
            };
            // The keyset's own keys, counted from their loaded values (key-vault-file keys are
            // not saved to the keyset).
            let mut budget: HashMap<KeyId, Budget> = ring
                .keys()
                .iter()
                .map(|k| {
                    let b = Budget {
                        loaded: k.encryptions(),
                        reserved: 0,
                    };
                    (k.id(), b)
                })
                .collect();
            let mut unrecorded = HashMap::new();
            if let Some(f) = &args.key_vault_file {
                let keks = args.keks()?;
                for key in read_key_vault_file(f, &keks).await? {
                    budget.remove(&key.id());
                    unrecorded.insert(key.id(), key.encryptions());
                    ring.insert(key);
                }
            }
            let ring = Arc::new(ring);
            return Ok(Keys {
                source: ring.clone(),
                ring: Some(ring),
                keyset_file: args.keyset.clone(),
                budget: Mutex::new(budget),
                unrecorded,
                unrecorded_source: "--key-vault-file",
                allow_unrecorded: false,
                watch: Mutex::default(),
            });
        }
        if KeyArgs::keyset_env().is_some() {
            let ring = Arc::new(InMemoryKeyring::from_env(KEYSET_ENV)?);
            let unrecorded = ring
                .keys()
                .iter()
                .map(|k| (k.id(), k.encryptions()))
                .collect();
            return Ok(Keys {
                source: ring.clone(),
                ring: Some(ring),
                keyset_file: None,
                budget: Mutex::new(HashMap::new()),
                unrecorded,
                unrecorded_source: KEYSET_ENV,
                allow_unrecorded: false,
                watch: Mutex::default(),
            });
        }
        let vault = open_vault(args).await?;
        Ok(Keys {
            source: vault,
            ring: None,
            keyset_file: None,
            budget: Mutex::new(HashMap::new()),
            unrecorded: HashMap::new(),
            unrecorded_source: "",
            allow_unrecorded: false,
            watch: Mutex::default(),
        })
    }

    /// Applies the command's [`NonceArgs`].
    pub(crate) fn with_nonce_args(mut self, a: &NonceArgs) -> Self {
        self.allow_unrecorded = a.allow_unrecorded_nonces;
        self
    }

    /// Names the keyset file's keys the command encrypts under: the primary keys of the
    /// schema's `aliases`, as loaded. [`Keys::reserve_used`] and [`Keys::check_not_destroyed`]
    /// then refuse to let ciphertexts out once one of them is destroyed or removed from the
    /// file, whatever its mode (deterministic and blind-index keys use no nonces, so no
    /// reservation would ever notice them).
    pub(crate) fn watch_aliases(&self, aliases: &[String]) {
        let Some(ring) = &self.ring else {
            return;
        };
        let budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut ids: Vec<KeyId> = aliases
            .iter()
            .filter_map(|a| ring.primary(a).ok())
            .map(|k| k.id())
            .filter(|id| budget.contains_key(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut w = self
            .watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Not stamped: the first check reads the file (it may have changed since it was loaded).
        *w = Watch { ids, seen: None };
    }

    /// Refuses when a key named by [`Keys::watch_aliases`] was destroyed or removed from the
    /// keyset file since the command loaded it. Reads the file (under its lock) only when it
    /// changed since the last check.
    pub(crate) fn check_not_destroyed(&self) -> Result<()> {
        let Some(path) = &self.keyset_file else {
            return Ok(());
        };
        let mut w = self
            .watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.ids.is_empty() {
            return Ok(());
        }
        let _lock = KeysetLock::acquire(path)?;
        // Stamped under the lock: no save can come between the stamp and the read.
        let now = Stamp::of(path);
        if now.is_some() && now == w.seen {
            return Ok(());
        }
        let fresh = load_keyset(path, false)?;
        for id in &w.ids {
            check_alive(&fresh, id, path)?;
        }
        w.seen = now;
        Ok(())
    }

    /// Makes sure every random-nonce encryption made so far is recorded where other processes
    /// see it, before its ciphertexts leave the process: reserves what a keyset file's keys
    /// used beyond this process's reservation, plus a block ahead, under the file's lock
    /// (refused if the stored count would pass [`RANDOM_NONCE_LIMIT`], or if the key was
    /// destroyed or removed meanwhile), refuses random nonces under read-only keys unless
    /// allowed, and checks that no key the command encrypts under was destroyed
    /// ([`Keys::check_not_destroyed`]). (The key vault reserves its own leases.)
    pub(crate) fn reserve_used(&self) -> Result<()> {
        self.reserve_random()?;
        self.check_not_destroyed()
    }

    /// The nonce part of [`Keys::reserve_used`].
    fn reserve_random(&self) -> Result<()> {
        let Some(ring) = &self.ring else {
            return Ok(());
        };
        if !self.allow_unrecorded {
            for (id, loaded) in &self.unrecorded {
                if ring.key(id).is_ok_and(|k| k.encryptions() > *loaded) {
                    return Err(CliError::Refused(format!(
                        "key {id} comes from {}, where fieldcrypt cannot record its random-nonce encryptions, so runs cannot see each other's and the key's limit of 2^32 could be passed unnoticed: give --keyset FILE, or --allow-unrecorded-nonces to accept that",
                        self.unrecorded_source
                    )));
                }
            }
        }
        let Some(path) = &self.keyset_file else {
            return Ok(());
        };
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // (key, encryptions missing from the reservation, block to reserve ahead)
        let mut wanted: Vec<(KeyId, u64, u64)> = Vec::new();
        for (id, b) in budget.iter() {
            let used = ring
                .key(id)
                .map_or(0, |k| k.encryptions().saturating_sub(b.loaded));
            if used > b.reserved {
                let ahead = b.reserved.clamp(MIN_BLOCK, MAX_BLOCK);
                wanted.push((*id, used - b.reserved, ahead));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let granted = with_keyset(path, |fresh| {
            let mut granted = Vec::with_capacity(wanted.len());
            for (id, missing, ahead) in &wanted {
                let k = check_alive(fresh, id, path)?;
                let stored = k.encryptions();
                let left = RANDOM_NONCE_LIMIT.saturating_sub(stored);
                if *missing > left {
                    return Err(CliError::Refused(format!(
                        "key {id} ({}): its random-nonce budget is spent ({stored} of 2^32 encryptions recorded in {}, by this and other runs): rotate the key (keys rotate {})",
                        k.alias(),
                        path.display(),
                        k.alias()
                    )));
                }
                let grant = missing.saturating_add(*ahead).min(left);
                fresh.insert(with_count(&k, stored + grant)?);
                granted.push((*id, grant));
            }
            Ok((granted, true))
        })?;
        for (id, grant) in granted {
            if let Some(b) = budget.get_mut(&id) {
                b.reserved += grant;
            }
        }
        Ok(())
    }

    /// Settles the keyset file's counts with what this process really used: adds encryptions
    /// not reserved yet (commands whose writes are not gated by [`Keys::reserve_used`], and
    /// failed runs) and gives back what was reserved and not used. The file is re-read and
    /// saved under its lock (`<keyset>.lock`), so a key rotated meanwhile by another command
    /// is kept, and other processes' counts are added to rather than overwritten. Runs again
    /// on drop (a no-op when nothing changed).
    ///
    /// Refused when a key this process encrypted under was destroyed or removed meanwhile
    /// (after the other keys' counts are saved).
    pub(crate) fn persist_counters(&self) -> Result<()> {
        self.settle_counters()?.map_or(Ok(()), Err)
    }

    /// [`Keys::persist_counters`], returning the refusal for a destroyed key instead.
    fn settle_counters(&self) -> Result<Option<CliError>> {
        let (Some(ring), Some(path)) = (&self.ring, &self.keyset_file) else {
            return Ok(None);
        };
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // (key, used by this process, reserved by this process)
        let mut settle: Vec<(KeyId, u64, u64)> = Vec::new();
        for (id, b) in budget.iter() {
            let used = ring
                .key(id)
                .map_or(b.reserved, |k| k.encryptions().saturating_sub(b.loaded));
            if used != b.reserved {
                settle.push((*id, used, b.reserved));
            }
        }
        if settle.is_empty() {
            return Ok(None);
        }
        let mut lost = None;
        with_keyset(path, |fresh| {
            let mut changed = false;
            for (id, used, reserved) in &settle {
                // Destroyed or deleted meanwhile: no counter to keep, but what this process
                // encrypted under it cannot be decrypted.
                let k = match check_alive(fresh, id, path) {
                    Ok(k) => k,
                    Err(e) => {
                        if *used > 0 && lost.is_none() {
                            lost = Some(e);
                        }
                        continue;
                    }
                };
                // Never below what this process used on top of the others' count.
                let count = if used > reserved {
                    k.encryptions().saturating_add(used - reserved)
                } else {
                    k.encryptions().saturating_sub(reserved - used)
                };
                fresh.insert(with_count(&k, count)?);
                changed = true;
            }
            Ok(((), changed))
        })?;
        for (id, used, _) in settle {
            if let Some(b) = budget.get_mut(&id) {
                b.reserved = used;
            }
        }
        Ok(lost)
    }
}

/// Key `id` of the keyset file just read, refused when it was destroyed or removed from the
/// file while the command ran.
fn check_alive(fresh: &InMemoryKeyring, id: &KeyId, path: &Path) -> Result<Arc<Key>> {
    let k = fresh.key(id).map_err(|_| {
        CliError::Refused(format!(
            "key {id} was removed from {} while this command ran: its ciphertexts are not written",
            path.display()
        ))
    })?;
    if k.state() == KeyState::Destroyed || k.material().is_err() {
        return Err(CliError::Refused(format!(
            "key {id} was destroyed while this command ran: its ciphertexts are not written"
        )));
    }
    Ok(k)
}

/// A copy of key `k` with its random-nonce count set to `count`.
fn with_count(k: &Key, count: u64) -> Result<Key> {
    let m = k.material()?;
    Ok(Key::from_material(
        k.id(),
        k.alias(),
        k.kind(),
        k.state(),
        KeyMaterial::from_slice(m.expose_secret()),
        count,
    )?
    .with_created(k.created()))
}

/// Warns when a keyset file (keys in clear) is readable by its group or others.
pub(crate) fn warn_if_loose(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                crate::report::warn(&format!(
                    "{} holds keys in clear and is readable by {} (mode {mode:o}): restrict it (chmod 600, or 640 for a service's group)",
                    path.display(),
                    if mode & 0o007 != 0 { "others" } else { "its group" }
                ));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// An exclusive advisory lock on `<keyset>.lock`, held for one load-modify-save of a keyset
/// file, so that concurrent commands (`keys rotate`, `keys disable`, counter write-backs) do
/// not drop each other's changes. Released on drop (or when the process dies).
pub(crate) struct KeysetLock {
    file: File,
}

impl KeysetLock {
    /// Waits for the lock.
    pub(crate) fn acquire(keyset: &Path) -> Result<Self> {
        let mut name = keyset.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let file = opts.open(&path).map_err(|e| CliError::file(&path, e))?;
        file.lock().map_err(|e| CliError::file(&path, e))?;
        Ok(KeysetLock { file })
    }
}

impl Drop for KeysetLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// Loads a keyset file; with `may_be_new`, a file that does not exist is an empty keyset.
fn load_keyset(path: &Path, may_be_new: bool) -> Result<InMemoryKeyring> {
    match InMemoryKeyring::load(path) {
        Err(Error::Io(e)) if may_be_new && e.kind() == std::io::ErrorKind::NotFound => {
            Ok(InMemoryKeyring::new())
        }
        other => other.map_err(|e| in_file(path, e)),
    }
}

/// Loads the keyset file under its lock, lets `change` modify it, and saves it (atomically)
/// if `change` says it changed something, before the lock is released.
pub(crate) fn with_keyset<T>(
    path: &Path,
    change: impl FnOnce(&InMemoryKeyring) -> Result<(T, bool)>,
) -> Result<T> {
    change_keyset(path, false, change)
}

/// Loads the keyset at `path` under its lock (`may_be_new`: a file that does not exist yet
/// starts empty), applies `change` and saves the keyset when `change` says it changed.
pub(crate) fn change_keyset<T>(
    path: &Path,
    may_be_new: bool,
    change: impl FnOnce(&InMemoryKeyring) -> Result<(T, bool)>,
) -> Result<T> {
    let _lock = KeysetLock::acquire(path)?;
    let fresh = load_keyset(path, may_be_new)?;
    let (out, changed) = change(&fresh)?;
    if changed {
        let before = std::fs::metadata(path).ok();
        // Ctrl-C waits for the save: its temporary file holds every key.
        let _hold = crate::cleanup::hold();
        fresh.save(path).map_err(|e| in_file(path, e))?;
        if let Some(m) = before {
            keep_mode_and_group(path, &m)?;
        }
    }
    Ok(out)
}

/// Gives a rewritten keyset file the mode and group of the file it replaced (the library
/// writes a new file owner-only): a `0640 owner:service` keyset stays readable by the service.
/// Run as root, the owner is kept too.
fn keep_mode_and_group(path: &Path, before: &std::fs::Metadata) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let f = File::open(path).map_err(|e| in_file(path, Error::Io(e)))?;
        let mode = before.permissions().mode() & 0o777;
        crate::jsonl::keep_owner_group_mode(&f, path, before, mode)
            .map_err(|e| in_file(path, Error::Io(e)))?;
    }
    #[cfg(not(unix))]
    let _ = (path, before);
    Ok(())
}

/// Where key management happens.
pub(crate) enum Store {
    /// A keyset file (saved after every change), or the environment (read-only).
    Keyset {
        ring: InMemoryKeyring,
        file: Option<PathBuf>,
    },
    /// Key documents from a file (read-only).
    VaultFile(InMemoryKeyring),
    /// The key vault.
    Vault(Arc<KeyVault>),
}

impl Store {
    /// Opens the store for listing only: the key vault's metadata needs no master key.
    pub(crate) async fn open_for_listing(args: &KeyArgs) -> Result<Store> {
        if args.keyset.is_none()
            && args.key_vault_file.is_none()
            && KeyArgs::keyset_env().is_none()
            && args.vault_uri().is_ok_and(|u| u.is_some())
            && args.keks().is_err()
        {
            // No KEK: listing reads metadata only and never unwraps.
            return Ok(Store::Vault(
                build_vault(
                    args,
                    Keks {
                        wrap: None,
                        unwrap: Vec::new(),
                    },
                )
                .await?,
            ));
        }
        Store::open(args).await
    }

    pub(crate) async fn open(args: &KeyArgs) -> Result<Store> {
        Self::open_keyset_or(args, false).await
    }

    /// [`Store::open`], where with `may_be_new` (`keys create`) a `--keyset` file that does not
    /// exist yet is an empty keyset (created, owner-only, when the key is saved).
    pub(crate) async fn open_keyset_or(args: &KeyArgs, may_be_new: bool) -> Result<Store> {
        if let Some(f) = &args.keyset {
            warn_if_loose(f);
            return Ok(Store::Keyset {
                ring: load_keyset(f, may_be_new)?,
                file: Some(f.clone()),
            });
        }
        if let Some(f) = &args.key_vault_file {
            let ring = InMemoryKeyring::new();
            for key in read_key_vault_file(f, &args.keks()?).await? {
                ring.insert(key);
            }
            return Ok(Store::VaultFile(ring));
        }
        if KeyArgs::keyset_env().is_some() {
            return Ok(Store::Keyset {
                ring: InMemoryKeyring::from_env(KEYSET_ENV)?,
                file: None,
            });
        }
        Ok(Store::Vault(open_vault(args).await?))
    }

    /// A keyring view for reference checks.
    pub(crate) fn writable(&self) -> Result<()> {
        match self {
            Store::Keyset { file: Some(_), .. } | Store::Vault(_) => Ok(()),
            Store::Keyset { file: None, .. } => Err(CliError::Usage(format!(
                "the keyset comes from {KEYSET_ENV}, which fieldcrypt cannot change: give --keyset FILE"
            ))),
            Store::VaultFile(_) => Err(CliError::Usage(
                "--key-vault-file is read-only: manage keys in the key vault (--uri / --key-vault-uri) or a --keyset file"
                    .into(),
            )),
        }
    }
}

async fn open_vault(args: &KeyArgs) -> Result<Arc<KeyVault>> {
    if args.vault_uri()?.is_none() {
        return Err(CliError::Usage(
            "no keys: give --keyset FILE, --key-vault-file FILE, FIELDCRYPT_KEYSET, or a key vault (--uri / --key-vault-uri with a master key)"
                .into(),
        ));
    }
    let keks = args.keks()?;
    build_vault(args, keks).await
}

async fn build_vault(args: &KeyArgs, keks: Keks) -> Result<Arc<KeyVault>> {
    let uri = args
        .vault_uri()?
        .ok_or_else(|| CliError::Usage("no key vault: give --uri or --key-vault-uri".into()))?;
    let client = connect(&uri).await?;
    let wrap = keks.wrap.unwrap_or_else(|| Arc::new(NoWrap));
    let mut builder = KeyVault::builder(&client, wrap).namespace(args.key_vault_namespace.clone());
    for kek in keks.unwrap {
        builder = builder.unwrap_also_with(kek);
    }
    Ok(Arc::new(builder.build()?))
}

/// The configured master keys (see [`KeyArgs::keks`]).
pub(crate) struct Keks {
    /// Wraps new keys: `--master-key-doc`, else the local master key; `None` without either.
    pub(crate) wrap: Option<Arc<dyn KekProvider>>,
    /// Unwrap besides `wrap`: every KMS provider, and the local master key.
    pub(crate) unwrap: Vec<Arc<dyn KekProvider>>,
}

impl Keks {
    fn all(&self) -> impl Iterator<Item = &Arc<dyn KekProvider>> {
        self.wrap.iter().chain(&self.unwrap)
    }
}

/// The KEK of a `--master-key-doc` / `--to-master-key-doc` value.
pub(crate) fn master_key_kek(
    json: &str,
    providers: Option<&Arc<KmsProviders>>,
    local: Option<&Arc<LocalKek>>,
) -> Result<Arc<dyn KekProvider>> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        CliError::Usage(format!(
            "--master-key-doc is not JSON (column {}): give a document such as              '{{\"provider\":\"aws\",\"region\":\"us-east-1\",\"key\":\"arn:…\"}}'",
            e.column()
        ))
    })?;
    let Ok(Bson::Document(doc)) = Bson::try_from(value) else {
        return Err(CliError::Usage(
            "--master-key-doc must be a JSON document".into(),
        ));
    };
    match (providers, local) {
        (Some(p), _) if doc.get_str("provider").is_ok_and(|n| p.contains(n)) => {
            Ok(p.kek_for(&doc)?)
        }
        (_, Some(l)) if doc == doc! { "provider": "local" } => Ok(l.clone()),
        (None, _) => Err(CliError::Usage(format!(
            "--master-key-doc names provider {:?}: configure it with --kms-providers FILE",
            doc.get_str("provider").unwrap_or("")
        ))),
        (Some(p), _) => Ok(p.kek_for(&doc)?),
    }
}

/// The vault's KEK when no master key for new keys is configured: reading works, creating
/// a key says what to give.
#[derive(Debug)]
struct NoWrap;

#[async_trait::async_trait]
impl KekProvider for NoWrap {
    fn provider(&self) -> &str {
        "(none)"
    }

    fn can_unwrap(&self, _master_key: &Document) -> bool {
        false
    }

    async fn wrap_with_ad(
        &self,
        _dek: &KeyMaterial,
        _associated_data: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        Err(Error::KeyFormat(
            "no master key for new keys: give --master-key-doc (a masterKey of a provider in              --kms-providers) or a local master key (--master-key-file / FIELDCRYPT_MASTER_KEY)"
                .into(),
        ))
    }

    async fn unwrap_with_ad(
        &self,
        _master_key: &Document,
        _wrapped: &[u8],
        _associated_data: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        Err(Error::Decrypt)
    }
}

/// Names the file in an error that does not already say where it happened.
pub(crate) fn in_file(path: &Path, e: Error) -> CliError {
    match e {
        Error::Io(io) => CliError::file(path, io),
        other => other.into(),
    }
}

/// Reads a key vault export (Extended JSON, one document per line, or a JSON array) and
/// unwraps every key with the local master key, by the key vault's own rules
/// ([`KeyVault::keys_from_documents`]): fieldcrypt's key documents (their `keyMaterial` bound
/// to the document's id, alias and kind) and MongoDB's CSFLE key documents; the newest primary
/// claim of an alias wins. Keys wrapped by a named local provider (`local:<name>`) unwrap with
/// the same master key. See docs/KEY_VAULT.md for the layout.
async fn read_key_vault_file(path: &Path, keks: &Keks) -> Result<Vec<Key>> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| in_file(path, Error::Io(e)))?,
    );
    let values: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
            Error::KeyFormat(format!(
                "{}: not a JSON array (line {})",
                path.display(),
                e.line()
            ))
        })?;
        v.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line).map_err(|_| {
                Error::KeyFormat(format!("{} line {}: not JSON", path.display(), i + 1))
            })?;
            out.push((i + 1, v));
        }
        out
    };
    let mut docs = Vec::with_capacity(values.len());
    for (line, v) in values {
        match Bson::try_from(v) {
            Ok(Bson::Document(d)) => docs.push((line, d)),
            _ => {
                return Err(Error::KeyFormat(format!(
                    "{} line {line}: not an Extended JSON document",
                    path.display()
                ))
                .into())
            }
        }
    }
    let kek = AnyOf(keks.all().cloned().collect());
    let all: Vec<Document> = docs.iter().map(|(_, d)| d.clone()).collect();
    match KeyVault::keys_from_documents(&all, &kek).await {
        Ok(keys) => Ok(keys),
        Err(Error::KeyFormat(m)) => {
            // Name the line: the first document that fails on its own.
            for (line, d) in &docs {
                if let Err(Error::KeyFormat(m)) =
                    KeyVault::keys_from_documents(std::slice::from_ref(d), &kek).await
                {
                    return Err(
                        Error::KeyFormat(format!("{} line {line}: {m}", path.display())).into(),
                    );
                }
            }
            Err(Error::KeyFormat(format!("{}: {m}", path.display())).into())
        }
        Err(other) => Err(other.into()),
    }
}

/// The local master key, for key documents wrapped by `local` or by a named local provider
/// (`local:<name>`, [`LocalKek::named`]): the file holds one master key, whatever it was named.
struct AnyLocal(Arc<LocalKek>);

/// Unwraps with the first of its KEKs that accepts the key's masterKey.
struct AnyOf(Vec<Arc<dyn KekProvider>>);

#[async_trait::async_trait]
impl KekProvider for AnyOf {
    fn provider(&self) -> &str {
        "configured master keys"
    }

    fn can_unwrap(&self, master_key: &Document) -> bool {
        self.0.iter().any(|k| k.can_unwrap(master_key))
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        associated_data: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        NoWrap.wrap_with_ad(dek, associated_data).await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        let Some(kek) = self.0.iter().find(|k| k.can_unwrap(master_key)) else {
            return Err(Error::KeyFormat(format!(
                "key is wrapped by KMS provider {:?}, which neither the local master key nor \
                 --kms-providers configures",
                master_key.get_str("provider").unwrap_or("?")
            )));
        };
        kek.unwrap_with_ad(master_key, wrapped, associated_data)
            .await
    }
}

#[async_trait::async_trait]
impl KekProvider for AnyLocal {
    fn provider(&self) -> &str {
        self.0.provider()
    }

    fn can_unwrap(&self, master_key: &Document) -> bool {
        master_key
            .get_str("provider")
            .is_ok_and(|p| p == "local" || p.starts_with("local:"))
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        associated_data: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        self.0.wrap_with_ad(dek, associated_data).await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        if !self.can_unwrap(master_key) {
            return Err(Error::KeyFormat(format!(
                "key is wrapped by KMS provider {:?}, not a local master key",
                master_key.get_str("provider").unwrap_or("?")
            )));
        }
        let as_ours = doc! { "provider": self.0.provider() };
        self.0
            .unwrap_with_ad(&as_ours, wrapped, associated_data)
            .await
    }
}
