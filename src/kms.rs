//! Master keys in key management services: MongoDB's `kmsProviders` configuration, and one
//! [`KekProvider`] per configured master key.
//!
//! ```text
//!  kmsProviders document ──▶ KmsProviders ──┬─ kek_for(masterKey) ──▶ KEK that wraps new keys
//!  (JSON/TOML file, env)      one provider   └─ unwrapper() ─────────▶ KEK that unwraps any key
//!                             per name:                                 of a configured provider
//!                             local, aws, vault, kmip, azure, gcp (+ "name:label")
//! ```
//!
//! The configuration takes the shapes MongoDB's drivers take, so settings are copied over from
//! libmongocrypt unchanged: a `kmsProviders` document whose keys are provider names (`"aws"`,
//! or named providers such as `"aws:prod"`, `"local:old"`) and whose values are each provider's
//! credentials; an **empty** entry means "credentials from that provider's standard
//! environment" (the AWS credential chain, `VAULT_TOKEN`, a cloud's metadata server). Keys are
//! created under a `masterKey` document of the same shape as libmongocrypt writes into key
//! documents, and key documents keep it, so MongoDB's drivers read keys fieldcrypt wrapped and
//! the other way round (see `docs/KEY_VAULT.md`).
//!
//! Every remote provider is behind its own cargo feature (`aws`, `vault`, `kmip`, `azure`,
//! `gcp`); `local` is always there. Network calls go through one HTTPS client per provider
//! (rustls, bounded retries with backoff: [`RetryPolicy`]); credentials are held in `secrecy`
//! types and no error, log line or `Debug` output prints them.

use core::fmt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document};
use zeroize::{Zeroize, Zeroizing};

use crate::csfle::LocalMasterKey;
use crate::error::{ArgumentError, Error, Result};
use crate::key::KeyMaterial;
use crate::mongo::{KekProvider, LocalKek};

#[cfg(feature = "_kms-http")]
pub(crate) mod http;
#[cfg_attr(not(any(feature = "_kms-http", feature = "kmip")), allow(dead_code))]
pub(crate) mod tls;

// The providers, one module and one cargo feature each (`#[cfg(feature = "aws")] mod aws;`
// …), dispatched by `remote` below.
#[cfg(feature = "aws")]
mod aws;
#[cfg(feature = "azure")]
mod azure;
#[cfg(feature = "gcp")]
mod gcp;
#[cfg(feature = "kmip")]
mod kmip;
#[cfg(any(feature = "azure", feature = "gcp"))]
mod oauth;
#[cfg(feature = "vault")]
mod vault;
#[cfg(feature = "kmip")]
#[doc(hidden)]
pub use kmip::fuzz_response as __fuzz_kmip_response;

/// How KMS requests are retried and bounded in time.
///
/// Timeouts, connection failures, throttling and server errors (HTTP 408, 429, 5xx) are tried
/// again, up to `attempts` in all, with exponential backoff from `initial_backoff` to
/// `max_backoff` and jitter; every attempt is bounded by `timeout`. Permanent failures (access
/// denied, an unknown or disabled key, a malformed response) are not retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// The pause after the first failure.
    pub initial_backoff: Duration,
    /// The longest pause between attempts.
    pub max_backoff: Duration,
    /// The longest one attempt (connect, send, read) may take.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, 200 ms doubling to at most 3 s between them, 10 s per attempt: a KMS that
    /// stays down fails a call in about 15 s (or 40 s if every attempt times out).
    fn default() -> Self {
        Self {
            attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(3),
            timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The pause after failed attempt `attempt` (1-based): `initial_backoff · 2^(attempt-1)`,
    /// capped at `max_backoff`, then a random point in its upper half ("equal jitter"), so
    /// that clients that failed together do not retry together.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let cap = exp.min(self.max_backoff);
        let half = cap / 2;
        half + rand::Rng::gen_range(&mut rand::thread_rng(), Duration::ZERO..=half)
    }
}

/// A provider's TLS options: MongoDB's drivers' `tlsOptions` per KMS provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// `tlsCAFile`: PEM certificates trusted besides the Mozilla roots (a private KMS's CA).
    pub ca_file: Option<PathBuf>,
    /// `tlsCertificateKeyFile`: a PEM file with the client certificate chain and its private
    /// key, for mutual TLS (KMIP servers require it).
    pub certificate_key_file: Option<PathBuf>,
}

/// Options of a [`KmsProviders`] configuration beyond the providers' credentials.
#[derive(Debug, Clone, Default)]
pub struct KmsOptions {
    /// Retries and timeouts of every provider.
    pub retry: RetryPolicy,
    /// TLS options by provider name (`"kmip"`, `"aws:prod"`).
    pub tls: BTreeMap<String, TlsOptions>,
}

/// What each provider's constructor is given.
#[allow(dead_code)] // read by the providers behind features
pub(crate) struct ProviderContext<'a> {
    /// The provider's name: `"aws"` or a named provider such as `"aws:prod"`.
    pub name: &'a str,
    /// Its TLS options.
    pub tls: &'a TlsOptions,
    /// The retry policy.
    pub retry: &'a RetryPolicy,
}

/// One configured remote KMS provider. [`KmsKek`] makes a [`KekProvider`] of it.
#[async_trait::async_trait]
pub(crate) trait Kms: Send + Sync + fmt::Debug {
    /// `"aws"`, `"aws:prod"`, …
    fn name(&self) -> &str;

    /// Checks a masterKey document for this provider (required fields, types; unknown fields
    /// refused) and returns it as it is stored: `provider` first, then libmongocrypt's fields
    /// in its order.
    fn master_key(&self, master_key: &Document) -> Result<Document>;

    /// Wraps `dek` under `master_key` (checked by [`Kms::master_key`]), bound to `ad` (empty
    /// for MongoDB's CSFLE keys: then exactly as libmongocrypt wraps). Returns the masterKey
    /// document to store and the `keyMaterial` bytes.
    async fn encrypt(
        &self,
        master_key: &Document,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> Result<(Document, Vec<u8>)>;

    /// Unwraps `keyMaterial` stored with `master_key`: [`Error::Decrypt`] when the KMS says the
    /// blob is not its ciphertext under this associated data, [`Error::Kms`] for anything else
    /// it refuses.
    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial>;

    /// Whether every key wrapped under `master_key` is under the same key of the KMS, so that
    /// a key document with this masterKey needs no rewrap to it ([`KekProvider::wraps_under`]).
    /// The default, true, fits a masterKey that names one KMS key (AWS, Azure, GCP). Not for
    /// a masterKey that names a key whose versions move on (a Vault Transit key), or that makes a
    /// new KMS key at every wrap (a KMIP masterKey without `keyId`).
    fn fixed_master_key(&self, _master_key: &Document) -> bool {
        true
    }

    /// Moves a wrapped key from `from` to `to` inside the KMS, without the plaintext leaving
    /// it, where the KMS can (Vault Transit's `rewrap`). `Ok(None)`: it cannot, and the caller
    /// unwraps and wraps.
    async fn rewrap(
        &self,
        _from: &Document,
        _wrapped: &[u8],
        _to: &Document,
        _ad: &[u8],
    ) -> Result<Option<(Document, Vec<u8>)>> {
        Ok(None)
    }
}

/// An [`Error::Kms`] naming the provider and the master key: `KMS aws: key arn:…: what`.
/// `what` must hold no credential, token, signature or key byte.
#[cfg_attr(not(any(feature = "_kms-http", feature = "kmip")), allow(dead_code))]
pub(crate) fn kms_error(provider: &str, key_id: &str, what: impl fmt::Display) -> Error {
    Error::Kms {
        provider: provider.to_owned(),
        reason: format!("key {key_id}: {what}"),
    }
}

/// A short, printable id of the master key a `masterKey` document names: the AWS key ARN or
/// alias, the Vault mount and key name, the KMIP key id, the Azure key URL, the GCP key's
/// resource name; `local` for local master keys. Never a secret: `masterKey` documents hold
/// none.
#[must_use]
pub fn master_key_id(master_key: &Document) -> String {
    let s = |k: &str| master_key.get_str(k).unwrap_or("");
    let provider = s("provider");
    match provider_type(provider) {
        "aws" => s("key").to_owned(),
        "vault" => format!(
            "{}/{}",
            master_key.get_str("mount").unwrap_or("transit"),
            s("keyName")
        ),
        "kmip" => match master_key.get_str("keyId") {
            Ok(id) => id.to_owned(),
            Err(_) => "(a new KMIP secret)".to_owned(),
        },
        "azure" => {
            let mut id = format!("{}/keys/{}", s("keyVaultEndpoint"), s("keyName"));
            if let Ok(v) = master_key.get_str("keyVersion") {
                id.push('/');
                id.push_str(v);
            }
            id
        }
        "gcp" => {
            let mut id = format!(
                "projects/{}/locations/{}/keyRings/{}/cryptoKeys/{}",
                s("projectId"),
                s("location"),
                s("keyRing"),
                s("keyName")
            );
            if let Ok(v) = master_key.get_str("keyVersion") {
                id.push_str("/cryptoKeyVersions/");
                id.push_str(v);
            }
            id
        }
        _ => provider.to_owned(),
    }
}

/// `"aws"` of `"aws"` and `"aws:prod"`.
fn provider_type(name: &str) -> &str {
    name.split_once(':').map_or(name, |(t, _)| t)
}

/// Checks a provider name: a known type, optionally `:` and a label of ASCII letters, digits
/// and `_` (MongoDB's rule for named KMS providers).
fn check_name(name: &str) -> Result<&str> {
    let (ty, label) = match name.split_once(':') {
        Some((t, l)) => (t, Some(l)),
        None => (name, None),
    };
    let label_ok = label
        .is_none_or(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    if !label_ok {
        return Err(Error::from(ArgumentError::KmsProviderName(name.to_owned())));
    }
    match ty {
        "local" | "aws" | "vault" | "kmip" | "azure" | "gcp" => Ok(ty),
        _ => Err(Error::KeyFormat(format!(
            "unknown KMS provider {name:?} (expected local, aws, vault, kmip, azure or gcp, \
             optionally followed by \":label\")"
        ))),
    }
}

enum Provider {
    Local(Arc<LocalKek>),
    Remote(Arc<dyn Kms>),
}

/// The configured KMS providers: MongoDB's `kmsProviders`, with their TLS options.
///
/// `Debug` prints the providers' names only.
pub struct KmsProviders {
    providers: BTreeMap<String, Provider>,
}

impl KmsProviders {
    /// The providers of a `kmsProviders` document, with default options.
    ///
    /// # Errors
    /// As [`KmsProviders::from_document_with`].
    pub fn from_document(doc: &Document) -> Result<Self> {
        Self::from_document_with(doc, &KmsOptions::default())
    }

    /// The providers of a `kmsProviders` document (`{"aws": {…}, "local:old": {"key": …}}`).
    ///
    /// `local` takes `key`: the 96-byte master key as base64 text or BSON binary; an empty
    /// `local` entry reads it from `FIELDCRYPT_MASTER_KEY`. The remote providers' entries are
    /// described in `docs/KEY_VAULT.md`.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for an unknown provider, a provider this build has no feature for,
    /// or an entry that is not a document or holds wrong fields; the providers' own
    /// configuration errors. None of them prints a credential.
    pub fn from_document_with(doc: &Document, options: &KmsOptions) -> Result<Self> {
        let no_tls = TlsOptions::default();
        let mut providers = BTreeMap::new();
        for (name, entry) in doc {
            let ty = check_name(name)?;
            let Bson::Document(credentials) = entry else {
                return Err(Error::KeyFormat(format!(
                    "kmsProviders.{name} must be a document"
                )));
            };
            let ctx = ProviderContext {
                name,
                tls: options.tls.get(name).unwrap_or(&no_tls),
                retry: &options.retry,
            };
            let provider = match ty {
                "local" => Provider::Local(Arc::new(local(name, credentials)?)),
                _ => Provider::Remote(remote(ty, &ctx, credentials)?),
            };
            providers.insert(name.clone(), provider);
        }
        if let Some(name) = options.tls.keys().find(|n| !providers.contains_key(*n)) {
            return Err(Error::KeyFormat(format!(
                "tlsOptions.{name}: no such KMS provider in kmsProviders"
            )));
        }
        Ok(Self { providers })
    }

    /// Reads a configuration file: JSON or TOML, holding either the `kmsProviders` document
    /// itself or `{kmsProviders, tlsOptions, retry}` — `tlsOptions` by provider name with
    /// `tlsCAFile` and `tlsCertificateKeyFile` (relative paths are relative to the file), and
    /// `retry` with `attempts`, `initialBackoffMs`, `maxBackoffMs`, `timeoutMs`.
    ///
    /// The file's text and the parsed credentials are wiped from memory once the providers
    /// hold them (in `secrecy` types).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file; [`Error::KeyFormat`] when it is neither JSON nor TOML
    /// (with the line, never the text), and as [`KmsProviders::from_document_with`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            ))
        })?);
        let mut doc = parse_config(&text).map_err(|why| {
            Error::KeyFormat(format!("KMS providers file {}: {why}", path.display()))
        })?;
        let result = Self::from_config(&doc, path.parent().unwrap_or(Path::new(".")));
        wipe(&mut doc);
        result
    }

    /// Reads the configuration from the environment variable `var` (the CLI's is
    /// `FIELDCRYPT_KMS_PROVIDERS`): inline JSON when its value starts with `{` (relative
    /// `tlsOptions` paths are then relative to the working directory), else the path of a
    /// configuration file as [`KmsProviders::from_file`] reads it. `Ok(None)` when it is not
    /// set or empty.
    ///
    /// # Errors
    /// As [`KmsProviders::from_file`]; the errors name the variable, never its value.
    pub fn from_env_var(var: &str) -> Result<Option<Self>> {
        let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let value = Zeroizing::new(
            value
                .into_string()
                .map_err(|_| Error::KeyFormat(format!("{var} is not UTF-8")))?,
        );
        if !value.trim_start().starts_with('{') {
            return Self::from_file(value.trim()).map(Some);
        }
        let mut doc =
            parse_config(&value).map_err(|why| Error::KeyFormat(format!("{var}: {why}")))?;
        let result = Self::from_config(&doc, Path::new("."));
        wipe(&mut doc);
        result.map(Some)
    }

    fn from_config(doc: &Document, base: &Path) -> Result<Self> {
        let Some(Bson::Document(providers)) = doc.get("kmsProviders") else {
            if doc.contains_key("tlsOptions") || doc.contains_key("retry") {
                return Err(Error::KeyFormat(
                    "a KMS configuration with tlsOptions or retry needs kmsProviders".to_owned(),
                ));
            }
            return Self::from_document(doc);
        };
        let mut options = KmsOptions::default();
        for (key, value) in doc {
            match (key.as_str(), value) {
                ("kmsProviders", _) => {}
                ("tlsOptions", Bson::Document(tls)) => {
                    for (name, v) in tls {
                        let Bson::Document(t) = v else {
                            return Err(Error::KeyFormat(format!(
                                "tlsOptions.{name} must be a document"
                            )));
                        };
                        options
                            .tls
                            .insert(name.clone(), tls_options(name, t, base)?);
                    }
                }
                ("retry", Bson::Document(r)) => options.retry = retry_policy(r)?,
                (other, _) => {
                    return Err(Error::KeyFormat(format!(
                        "unknown or malformed KMS configuration field {other:?} (expected \
                         kmsProviders, tlsOptions, retry)"
                    )))
                }
            }
        }
        Self::from_document_with(providers, &options)
    }

    /// The configured providers' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// Whether a provider of this name is configured.
    #[must_use]
    pub fn contains(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// A KEK that wraps new data keys under `master_key` (`{provider: "aws", region, key}`,
    /// `{provider: "local"}`, …), and unwraps keys wrapped by the same provider.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when `master_key` names no configured provider or is not a valid
    /// masterKey document for it.
    pub fn kek_for(&self, master_key: &Document) -> Result<Arc<dyn KekProvider>> {
        let name = master_key.get_str("provider").map_err(|_| {
            Error::KeyFormat("a masterKey document needs a provider (a string)".to_owned())
        })?;
        match self.providers.get(name) {
            None => Err(Error::KeyFormat(format!(
                "masterKey names KMS provider {name:?}, which kmsProviders does not configure \
                 (configured: {})",
                self.names().collect::<Vec<_>>().join(", ")
            ))),
            Some(Provider::Local(kek)) => {
                if let Some(extra) = master_key.keys().find(|k| *k != "provider") {
                    return Err(Error::KeyFormat(format!(
                        "masterKey for local provider {name:?} takes no field {extra:?}"
                    )));
                }
                Ok(kek.clone())
            }
            Some(Provider::Remote(kms)) => Ok(Arc::new(KmsKek {
                master_key: kms.master_key(master_key)?,
                kms: kms.clone(),
            })),
        }
    }

    /// A KEK that unwraps any key whose `masterKey.provider` is configured here (each with its
    /// own master key), for [`KeyVaultBuilder::kms_providers`](crate::mongo::KeyVaultBuilder::kms_providers).
    /// It wraps nothing: new keys are wrapped by [`KmsProviders::kek_for`]'s KEK.
    #[must_use]
    pub fn unwrapper(self: &Arc<Self>) -> Arc<dyn KekProvider> {
        Arc::new(Unwrapper(self.clone()))
    }
}

impl fmt::Debug for KmsProviders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsProviders")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn local(name: &str, credentials: &Document) -> Result<LocalKek> {
    let master = match credentials.get("key") {
        None if credentials.is_empty() => return from_env_as(name),
        Some(Bson::String(b64)) => LocalMasterKey::from_base64(b64),
        Some(Bson::Binary(b)) => LocalMasterKey::from_bytes(&b.bytes),
        Some(_) => Err(Error::KeyFormat(String::new())),
        None => Err(Error::KeyFormat(String::new())),
    }
    .map_err(|_| {
        Error::KeyFormat(format!(
            "kmsProviders.{name}.key must be the 96-byte local master key, as base64 or binary"
        ))
    })?;
    if let Some(extra) = credentials.keys().find(|k| *k != "key") {
        return Err(Error::KeyFormat(format!(
            "kmsProviders.{name} takes no field {extra:?} (only key)"
        )));
    }
    named_local(name, master)
}

fn from_env_as(name: &str) -> Result<LocalKek> {
    let kek = LocalKek::from_env()?;
    let master = LocalMasterKey::from_base64(&kek.master_key().expose_base64())?;
    named_local(name, master)
}

fn named_local(name: &str, master: LocalMasterKey) -> Result<LocalKek> {
    match name.split_once(':') {
        Some((_, label)) => LocalKek::named(label, master),
        None => Ok(LocalKek::new(master)),
    }
}

#[allow(unused_variables)] // every provider may be compiled out
fn remote(ty: &str, ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Arc<dyn Kms>> {
    match ty {
        #[cfg(feature = "aws")]
        "aws" => return Ok(Arc::new(aws::AwsKms::new(ctx, credentials)?)),
        #[cfg(feature = "vault")]
        "vault" => return Ok(Arc::new(vault::VaultKms::new(ctx, credentials)?)),
        #[cfg(feature = "kmip")]
        "kmip" => return Ok(Arc::new(kmip::KmipKms::new(ctx, credentials)?)),
        #[cfg(feature = "azure")]
        "azure" => return Ok(Arc::new(azure::AzureKms::new(ctx, credentials)?)),
        #[cfg(feature = "gcp")]
        "gcp" => return Ok(Arc::new(gcp::GcpKms::new(ctx, credentials)?)),
        _ => {}
    }
    Err(Error::KeyFormat(format!(
        "KMS provider {:?}: this build of fieldcrypt has no `{ty}` cargo feature",
        ctx.name
    )))
}

fn tls_options(name: &str, t: &Document, base: &Path) -> Result<TlsOptions> {
    let mut out = TlsOptions::default();
    for (k, v) in t {
        let Bson::String(p) = v else {
            return Err(Error::KeyFormat(format!(
                "tlsOptions.{name}.{k} must be a path"
            )));
        };
        let path = base.join(p);
        match k.as_str() {
            "tlsCAFile" => out.ca_file = Some(path),
            "tlsCertificateKeyFile" => out.certificate_key_file = Some(path),
            other => {
                return Err(Error::KeyFormat(format!(
                    "tlsOptions.{name}: unsupported option {other:?} (supported: tlsCAFile, \
                     tlsCertificateKeyFile; an encrypted key file is not supported)"
                )))
            }
        }
    }
    Ok(out)
}

fn retry_policy(r: &Document) -> Result<RetryPolicy> {
    let mut p = RetryPolicy::default();
    for (k, v) in r {
        let n = match v {
            Bson::Int32(n) => u64::try_from(*n).ok(),
            Bson::Int64(n) => u64::try_from(*n).ok(),
            _ => None,
        }
        .ok_or_else(|| Error::KeyFormat(format!("retry.{k} must be a non-negative integer")))?;
        let ms = Duration::from_millis(n);
        match k.as_str() {
            "attempts" => {
                p.attempts = u32::try_from(n)
                    .ok()
                    .filter(|a| *a >= 1)
                    .ok_or_else(|| Error::KeyFormat("retry.attempts must be 1 or more".into()))?;
            }
            "initialBackoffMs" => p.initial_backoff = ms,
            "maxBackoffMs" => p.max_backoff = ms,
            "timeoutMs" => p.timeout = ms,
            other => {
                return Err(Error::KeyFormat(format!(
                    "unknown retry option {other:?} (attempts, initialBackoffMs, maxBackoffMs, \
                     timeoutMs)"
                )))
            }
        }
    }
    Ok(p)
}

/// JSON (also MongoDB Extended JSON) if it parses as such, else TOML. Errors give the line and
/// column only: parser messages may quote the text, which holds credentials.
fn parse_config(text: &str) -> std::result::Result<Document, String> {
    if text.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
        let bson = Bson::try_from(value).map_err(|_| "not a JSON document".to_owned())?;
        match bson {
            Bson::Document(d) => Ok(d),
            _ => Err("not a JSON document".to_owned()),
        }
    } else {
        let table: toml::Table = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => format!(
                "not valid TOML (line {})",
                text[..span.start.min(text.len())].lines().count().max(1)
            ),
            None => "not valid TOML".to_owned(),
        })?;
        bson::to_document(&table).map_err(|_| "TOML that is not a document".to_owned())
    }
}

/// Overwrites every string of a parsed configuration (credentials included).
fn wipe(doc: &mut Document) {
    for (_, v) in doc.iter_mut() {
        match v {
            Bson::String(s) => s.zeroize(),
            Bson::Document(d) => wipe(d),
            Bson::Binary(b) => b.bytes.zeroize(),
            _ => {}
        }
    }
}

/// A [`KekProvider`] for one master key of a remote KMS provider: wraps under it, and unwraps any
/// key the same provider wrapped (its masterKey document says under which of its keys).
pub struct KmsKek {
    kms: Arc<dyn Kms>,
    master_key: Document,
}

impl KmsKek {
    /// The masterKey document new keys get.
    #[must_use]
    pub fn master_key(&self) -> &Document {
        &self.master_key
    }
}

impl fmt::Debug for KmsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKek")
            .field("kms", &self.kms)
            .field("master_key", &master_key_id(&self.master_key))
            .finish()
    }
}

#[async_trait::async_trait]
impl KekProvider for KmsKek {
    fn provider(&self) -> &str {
        self.kms.name()
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        associated_data: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        self.kms
            .encrypt(&self.master_key, dek, associated_data)
            .await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<KeyMaterial> {
        let checked = self.kms.master_key(master_key)?;
        self.kms.decrypt(&checked, wrapped, associated_data).await
    }

    fn wraps_under(&self) -> Option<&Document> {
        self.kms
            .fixed_master_key(&self.master_key)
            .then_some(&self.master_key)
    }

    async fn rewrap_in_kms(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<Option<(Document, Vec<u8>)>> {
        if master_key.get_str("provider") != Ok(self.kms.name()) {
            return Ok(None);
        }
        let from = self.kms.master_key(master_key)?;
        self.kms
            .rewrap(&from, wrapped, &self.master_key, associated_data)
            .await
    }
}

/// Unwraps keys of every configured provider.
struct Unwrapper(Arc<KmsProviders>);

impl fmt::Debug for Unwrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Unwrapper").field(&self.0).finish()
    }
}

#[async_trait::async_trait]
impl KekProvider for Unwrapper {
    fn provider(&self) -> &str {
        "kmsProviders"
    }

    fn can_unwrap(&self, master_key: &Document) -> bool {
        master_key
            .get_str("provider")
            .is_ok_and(|p| self.0.contains(p))
    }

    async fn wrap_with_ad(&self, _dek: &KeyMaterial, _ad: &[u8]) -> Result<(Document, Vec<u8>)> {
        Err(Error::KeyFormat(
            "the kmsProviders unwrapper wraps no key: choose a masterKey (KmsProviders::kek_for)"
                .to_owned(),
        ))
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        associated_data: &[u8],
    ) -> Result<KeyMaterial> {
        let name = master_key.get_str("provider").unwrap_or("");
        match self.0.providers.get(name) {
            Some(Provider::Local(kek)) => {
                kek.unwrap_with_ad(master_key, wrapped, associated_data)
                    .await
            }
            Some(Provider::Remote(kms)) => {
                let checked = kms.master_key(master_key)?;
                kms.decrypt(&checked, wrapped, associated_data).await
            }
            None => Err(Error::KeyFormat(format!(
                "key is wrapped by KMS provider {name:?}, which kmsProviders does not configure"
            ))),
        }
    }

    async fn unwrap(&self, master_key: &Document, wrapped: &[u8]) -> Result<KeyMaterial> {
        match self
            .0
            .providers
            .get(master_key.get_str("provider").unwrap_or(""))
        {
            Some(Provider::Local(kek)) => kek.unwrap(master_key, wrapped).await,
            _ => self.unwrap_with_ad(master_key, wrapped, &[]).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::*;

    #[test]
    fn names_follow_mongodb_rules() {
        for ok in ["local", "aws", "aws:prod", "local:old_1", "gcp", "kmip:x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "aws:", "aws:pr od", "foo", "aws:a:b", "AWS"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_providers_from_a_document() {
        let key = LocalMasterKey::generate();
        let b64 = key.expose_base64();
        let p = KmsProviders::from_document(&doc! {
            "local": { "key": b64.as_str() },
            "local:old": { "key": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![7; 96] } },
        })
        .unwrap();
        assert_eq!(p.names().collect::<Vec<_>>(), ["local", "local:old"]);
        assert_eq!(
            format!("{p:?}"),
            r#"KmsProviders { providers: ["local", "local:old"] }"#
        );
        let kek = p.kek_for(&doc! { "provider": "local:old" }).unwrap();
        assert_eq!(kek.provider(), "local:old");
        assert!(p
            .kek_for(&doc! { "provider": "local", "key": "x" })
            .is_err());
        let e = p
            .kek_for(&doc! { "provider": "aws" })
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("does not configure") && e.contains("local, local:old"),
            "{e}"
        );
        for bad in [
            doc! { "local": { "key": "not base64" } },
            doc! { "local": { "key": b64.as_str(), "extra": 1 } },
            doc! { "local": "x" },
            doc! { "nope": {} },
        ] {
            let e = KmsProviders::from_document(&bad).unwrap_err().to_string();
            assert!(!e.contains(b64.as_str()), "{e}");
        }
    }

    #[test]
    fn config_files_in_json_and_toml() {
        let key = LocalMasterKey::generate();
        let b64 = key.expose_base64();
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("kms.json");
        std::fs::write(
            &json,
            format!(r#"{{"local": {{"key": "{}"}}}}"#, b64.as_str()),
        )
        .unwrap();
        assert!(KmsProviders::from_file(&json).unwrap().contains("local"));
        let toml = dir.path().join("kms.toml");
        std::fs::write(
            &toml,
            format!(
                "[kmsProviders.local]\nkey = \"{}\"\n[retry]\nattempts = 2\ntimeoutMs = 500\n",
                b64.as_str()
            ),
        )
        .unwrap();
        assert!(KmsProviders::from_file(&toml).unwrap().contains("local"));
        // Syntax errors give a line, never the text (which holds credentials).
        std::fs::write(&toml, format!("[local]\nkey = \"{}\n", b64.as_str())).unwrap();
        let e = KmsProviders::from_file(&toml).unwrap_err().to_string();
        assert!(
            e.contains("not valid TOML") && !e.contains(&b64[..20]),
            "{e}"
        );
        std::fs::write(
            &json,
            format!(r#"{{"local": {{"key": "{}"}},}}"#, b64.as_str()),
        )
        .unwrap();
        let e = KmsProviders::from_file(&json).unwrap_err().to_string();
        assert!(
            e.contains("not valid JSON") && !e.contains(&b64[..20]),
            "{e}"
        );
        // tlsOptions for a provider that is not configured.
        std::fs::write(
            &json,
            format!(
                r#"{{"kmsProviders": {{"local": {{"key": "{}"}}}}, "tlsOptions": {{"kmip": {{"tlsCAFile": "ca.pem"}}}}}}"#,
                b64.as_str()
            ),
        )
        .unwrap();
        let e = KmsProviders::from_file(&json).unwrap_err().to_string();
        assert!(e.contains("tlsOptions.kmip"), "{e}");
    }

    #[test]
    fn config_from_an_environment_variable() {
        let key = LocalMasterKey::generate();
        let b64 = key.expose_base64();
        let var = "FIELDCRYPT_TEST_KMS_PROVIDERS_INLINE";
        assert!(KmsProviders::from_env_var(var).unwrap().is_none());
        std::env::set_var(
            var,
            format!(
                r#"{{"kmsProviders": {{"local:env": {{"key": "{}"}}}}}}"#,
                b64.as_str()
            ),
        );
        let p = KmsProviders::from_env_var(var).unwrap().unwrap();
        assert!(p.contains("local:env"));
        std::env::set_var(var, format!(r#"{{"local": {{"key": "{}"}}"#, b64.as_str()));
        let e = KmsProviders::from_env_var(var).err().unwrap().to_string();
        assert!(e.contains(var) && !e.contains(&b64[..20]), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kms.toml");
        std::fs::write(&file, format!("[local]\nkey = \"{}\"\n", b64.as_str())).unwrap();
        std::env::set_var(var, &file);
        assert!(KmsProviders::from_env_var(var)
            .unwrap()
            .unwrap()
            .contains("local"));
        std::env::remove_var(var);
    }

    #[test]
    fn master_key_ids() {
        assert_eq!(
            master_key_id(&doc! { "provider": "aws", "region": "us-east-1", "key": "arn:k" }),
            "arn:k"
        );
        assert_eq!(
            master_key_id(&doc! { "provider": "vault:b", "keyName": "k" }),
            "transit/k"
        );
        assert_eq!(
            master_key_id(
                &doc! { "provider": "gcp", "projectId": "p", "location": "l", "keyRing": "r", "keyName": "k", "keyVersion": "2" }
            ),
            "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/2"
        );
        assert_eq!(master_key_id(&doc! { "provider": "local:x" }), "local:x");
    }
}
