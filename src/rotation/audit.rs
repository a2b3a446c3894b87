//! The audit: what is really stored in a collection, measured against its schema and keyring.
//!
//! Reads every document (raw, nothing decrypted) and reports:
//! - **leaks**: values in encrypted fields that are not ciphertext;
//! - **keys**: every key id referenced, with its alias, state and counts, and the suites in
//!   use; references to keys that are not their alias's primary (stale: the job of
//!   re-encryption), disabled, destroyed, or unknown to the keyring;
//! - **nonce limits**: random-nonce keys (AES-GCM, ChaCha20-Poly1305) whose usage counter is near
//!   [`RANDOM_NONCE_LIMIT`](crate::RANDOM_NONCE_LIMIT);
//! - **format drift**: values in another suite or binding than the schema says, missing blind
//!   indexes, ciphertexts in fields the schema does not encrypt, malformed ciphertexts;
//! - **token-like secrets** in fields the schema leaves in clear: JWTs, private keys, well-known
//!   API-key prefixes (AWS, GitHub, Slack, Stripe, Google, OpenAI) and high-entropy strings.
//!
//! Findings name field paths, key ids and `_id`s — never a value.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bson::{doc, Bson, RawDocument, RawDocumentBuf};
use futures_util::TryStreamExt;

use super::inspect::{FoundKind, Inspector, Primaries, Scan};
use super::Target;
use crate::error::Result;
use crate::key::KeyId;
use crate::keyring::Keyring;
use crate::mongo::KeySource;
use crate::rawbson::{self, ty};
use crate::schema::Schema;
use crate::suite::Suite;

/// The path reported for a document that cannot be walked at all (nested deeper than the
/// core walks, or malformed BSON).
const UNREADABLE: &str = "(the whole document: nested too deep or malformed)";

/// Options of an audit.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AuditOptions {
    /// Look at no more than this many documents (in `_id` order). Default: all.
    pub limit: Option<u64>,
    /// Do not report references to active (non-primary) keys as findings; they are still
    /// listed under the keys. Default `false`.
    pub allow_stale: bool,
    /// Look for token-like secrets in fields the schema does not encrypt. Default `true`.
    pub tokens: bool,
    /// Report a random-nonce key once its usage counter passes this fraction of its limit.
    /// Default 0.5.
    pub nonce_warning: f64,
    /// How many documents to read per batch. Default 1000.
    pub batch_size: u32,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            limit: None,
            allow_stale: false,
            tokens: true,
            nonce_warning: 0.5,
            batch_size: 1000,
        }
    }
}

setters!(AuditOptions {
    limit: Option<u64>,
    allow_stale: bool,
    tokens: bool,
});

/// What kind of secret a string looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum TokenKind {
    /// A JSON Web Token (`eyJ….eyJ….…`).
    Jwt,
    /// A PEM private key.
    PrivateKey,
    /// An AWS access key id (`AKIA…`, `ASIA…`).
    AwsAccessKey,
    /// A GitHub token (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`).
    GithubToken,
    /// A Slack token (`xoxb-`, `xoxp-`, …).
    SlackToken,
    /// A Stripe secret or restricted key (`sk_live_`, `rk_live_`, `sk_test_`).
    StripeKey,
    /// A Google API key (`AIza…`).
    GoogleApiKey,
    /// An OpenAI or Anthropic style key (`sk-proj-…`, `sk-ant-…`).
    AiApiKey,
    /// A long random-looking string (high Shannon entropy).
    HighEntropy,
}

impl TokenKind {
    /// A short name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Jwt => "JWT",
            TokenKind::PrivateKey => "private key",
            TokenKind::AwsAccessKey => "AWS access key id",
            TokenKind::GithubToken => "GitHub token",
            TokenKind::SlackToken => "Slack token",
            TokenKind::StripeKey => "Stripe key",
            TokenKind::GoogleApiKey => "Google API key",
            TokenKind::AiApiKey => "AI API key",
            TokenKind::HighEntropy => "high-entropy string",
        }
    }
}

/// One problem found, with how many documents show it and the first one's `_id`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AuditFinding {
    /// An encrypted field holds plaintext.
    Plaintext {
        /// The field.
        path: String,
        /// Documents with plaintext there.
        documents: u64,
        /// The first such document's `_id` (relaxed Extended JSON).
        example_id: String,
    },
    /// Values under a key that is not its alias's primary (re-encryption has not reached them).
    StaleKey {
        /// The key.
        key: KeyId,
        /// Its alias.
        alias: String,
        /// Values under it.
        values: u64,
        /// The first document's `_id`.
        example_id: String,
    },
    /// Values under a key that cannot decrypt: disabled, destroyed, or not in the keyring.
    UnusableKey {
        /// The key.
        key: KeyId,
        /// `disabled`, `destroyed` or `unknown`.
        state: String,
        /// Values under it.
        values: u64,
        /// The first document's `_id`.
        example_id: String,
    },
    /// A random-nonce key near its encryption limit: rotate it.
    NonceLimit {
        /// The key.
        key: KeyId,
        /// Encryptions made with it (its usage counter).
        encryptions: u64,
        /// Values under it in this collection.
        values: u64,
        /// The limit.
        limit: u64,
    },
    /// Values in another suite or binding than the schema says, or missing blind indexes.
    Outdated {
        /// Documents concerned.
        documents: u64,
        /// The first one's `_id`.
        example_id: String,
    },
    /// A ciphertext in a field the schema does not encrypt.
    Unmanaged {
        /// The field.
        path: String,
        /// Documents concerned.
        documents: u64,
        /// The first one's `_id`.
        example_id: String,
    },
    /// A value that claims to be a ciphertext but does not parse.
    Malformed {
        /// The field.
        path: String,
        /// Documents concerned.
        documents: u64,
        /// The first one's `_id`.
        example_id: String,
    },
    /// A string that looks like a secret in a field the schema leaves in clear.
    Token {
        /// The field.
        path: String,
        /// What it looks like.
        token: TokenKind,
        /// Documents concerned.
        documents: u64,
        /// The first one's `_id`.
        example_id: String,
    },
}

impl AuditFinding {
    /// One line describing the finding (no values).
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            AuditFinding::Plaintext { path, documents, example_id } => format!(
                "plaintext in encrypted field {path:?}: {documents} document(s), e.g. _id {example_id}"
            ),
            AuditFinding::StaleKey { key, alias, values, example_id } => format!(
                "{values} value(s) under key {key} (alias {alias:?}), which is not the primary: run reencrypt (e.g. _id {example_id})"
            ),
            AuditFinding::UnusableKey { key, state, values, example_id } => format!(
                "{values} value(s) under {state} key {key}: they cannot be decrypted (e.g. _id {example_id})"
            ),
            AuditFinding::NonceLimit { key, encryptions, values, limit } => format!(
                "key {key} has made {encryptions} of its {limit} random-nonce encryptions ({values} value(s) here): rotate it"
            ),
            AuditFinding::Outdated { documents, example_id } => format!(
                "{documents} document(s) with values in another suite or binding than the schema, or missing blind indexes: run reencrypt (e.g. _id {example_id})"
            ),
            AuditFinding::Unmanaged { path, documents, example_id } => format!(
                "ciphertext in field {path:?}, which the schema does not encrypt: {documents} document(s), e.g. _id {example_id}"
            ),
            AuditFinding::Malformed { path, documents, example_id } => format!(
                "malformed ciphertext in field {path:?}: {documents} document(s), e.g. _id {example_id}"
            ),
            AuditFinding::Token { path, token, documents, example_id } => format!(
                "{} in unencrypted field {path:?}: {documents} document(s), e.g. _id {example_id}",
                token.name()
            ),
        }
    }
}

/// One key referenced by the collection.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct KeyUsage {
    /// The key id.
    pub key: KeyId,
    /// Its alias, when the keyring knows the key.
    pub alias: Option<String>,
    /// Its state (`primary`, `active`, `disabled`, `destroyed`), or `unknown`.
    pub state: String,
    /// Fieldcrypt envelopes under it.
    pub envelopes: u64,
    /// CSFLE values under it.
    pub csfle: u64,
    /// Queryable Encryption values naming it in their header (indexed values: as `S_KeyId`).
    pub qe: u64,
    /// Blind indexes computed with it.
    pub blind_indexes: u64,
    /// Documents referencing it.
    pub documents: u64,
    /// Envelopes per suite name.
    pub suites: BTreeMap<String, u64>,
    /// Its random-nonce encryption counter, when known.
    pub encryptions: Option<u64>,
}

/// The audit of one collection.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[non_exhaustive]
pub struct AuditReport {
    /// `db.collection`.
    pub namespace: String,
    /// Documents read.
    pub documents: u64,
    /// Documents whose encrypted fields are all current (primary keys, schema's suite).
    pub current: u64,
    /// Every key referenced, by id.
    pub keys: Vec<KeyUsage>,
    /// Envelopes per suite name.
    pub suites: BTreeMap<String, u64>,
    /// CSFLE values in schema fields (to migrate).
    pub csfle_values: u64,
    /// Queryable Encryption values in schema fields (to migrate), by kind (`unindexed`,
    /// `equality`, `range`, `text`).
    pub qe_values: BTreeMap<String, u64>,
    /// Documents with a top-level `__safeContent__` (QE's tags; removed by a QE migration).
    pub safe_content_documents: u64,
    /// Documents holding a malformed ciphertext or blind index: its key cannot be read, so
    /// such a document may reference any key.
    pub unreadable: u64,
    /// The problems; empty for a clean collection.
    pub findings: Vec<AuditFinding>,
    /// Seconds spent.
    pub seconds: f64,
}

impl AuditReport {
    /// Whether the audit found nothing.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Audits collections: reads every document (raw, nothing decrypted) and reports plaintext in
/// encrypted fields, the keys and suites in use, references to stale, disabled, destroyed or
/// unknown keys, random-nonce keys near their limit, format drift, ciphertexts outside the
/// schema, and token-like secrets in unencrypted fields. Findings ([`AuditFinding`]) name
/// paths, key ids and `_id`s, never values.
pub struct Audit {
    keys: Arc<dyn KeySource>,
    options: AuditOptions,
}

impl core::fmt::Debug for Audit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Audit")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Tally {
    documents: u64,
    example: Option<String>,
}

impl Tally {
    fn hit(&mut self, id: &dyn Fn() -> String) {
        self.documents += 1;
        if self.example.is_none() {
            self.example = Some(id());
        }
    }
    fn example(&self) -> String {
        self.example.clone().unwrap_or_default()
    }
}

#[derive(Default)]
struct KeyTally {
    envelopes: u64,
    csfle: u64,
    qe: u64,
    blind: u64,
    documents: u64,
    suites: BTreeMap<String, u64>,
    example: Option<String>,
}

impl Audit {
    /// An audit reading keys from `keys`.
    pub fn new(keys: Arc<dyn KeySource>) -> Self {
        Audit {
            keys,
            options: AuditOptions::default(),
        }
    }

    /// Sets the options.
    #[must_use]
    pub fn options(mut self, options: AuditOptions) -> Self {
        self.options = options;
        self
    }

    /// Audits one collection against its schema. `progress` gets the number of documents read
    /// so far after each batch.
    ///
    /// # Errors
    /// MongoDB errors; key-vault errors while prefetching keys.
    #[allow(clippy::too_many_lines)] // one pass, then one summary
    pub async fn run(
        &self,
        target: &Target,
        mut progress: impl FnMut(u64) + Send,
    ) -> Result<AuditReport> {
        let started = Instant::now();
        let schema: &Schema = &target.schema;
        let aliases: Vec<String> = schema.aliases().into_iter().map(str::to_owned).collect();
        self.keys.prefetch_aliases(&aliases).await?;
        let keyring: &dyn Keyring = self.keys.as_ref();
        // An alias without a primary is itself worth reporting, but must not stop the audit.
        let primaries = Primaries::resolve(schema, keyring).unwrap_or_default();
        let insp = Inspector {
            schema,
            primaries: &primaries,
            ctx: &target.context,
        };

        let mut rep = AuditReport {
            namespace: target.namespace(),
            ..AuditReport::default()
        };
        let mut plaintext: BTreeMap<String, Tally> = BTreeMap::new();
        let mut unmanaged: BTreeMap<String, Tally> = BTreeMap::new();
        let mut malformed: BTreeMap<String, Tally> = BTreeMap::new();
        let mut tokens: BTreeMap<(String, TokenKind), Tally> = BTreeMap::new();
        let mut outdated = Tally::default();
        let mut keys: HashMap<KeyId, KeyTally> = HashMap::new();

        let mut find = target
            .collection
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .batch_size(self.options.batch_size.max(1));
        if let Some(n) = self.options.limit {
            find = find.limit(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut cursor = find.await?;
        let mut batch: Vec<RawDocumentBuf> = Vec::new();
        let batch_len = self.options.batch_size.max(1) as usize;
        loop {
            let next = cursor.try_next().await?;
            let end = next.is_none();
            if let Some(d) = next {
                batch.push(d);
            }
            if batch.len() < batch_len && !end {
                continue;
            }
            let mut ids: Vec<KeyId> = Vec::new();
            // Leniently: a malformed value is a finding below, not a reason to stop.
            for d in &batch {
                ids.extend(super::inspect::references(d).keys);
            }
            ids.sort_unstable();
            ids.dedup();
            self.keys.prefetch_ids(&ids).await?;
            for d in batch.drain(..) {
                rep.documents += 1;
                let id = || id_text(&d);
                let scan: Scan = match insp.scan(&d) {
                    Ok(s) => s,
                    // One unreadable document (nested too deep, bad BSON) is a finding, not
                    // the end of the report.
                    Err(crate::Error::MalformedBson(_)) => {
                        rep.unreadable += 1;
                        malformed.entry(UNREADABLE.to_owned()).or_default().hit(&id);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if scan.is_current() && scan.malformed.is_empty() {
                    rep.current += 1;
                }
                // Counted once per document, however many array elements hold one.
                for p in distinct(&scan.plaintext) {
                    plaintext.entry(p.to_owned()).or_default().hit(&id);
                }
                if scan.suite || scan.mode || scan.missing_index || scan.stale_index {
                    outdated.hit(&id);
                }
                if !scan.malformed.is_empty() {
                    rep.unreadable += 1;
                }
                if scan.safe_content {
                    rep.safe_content_documents += 1;
                }
                for p in distinct(&scan.malformed) {
                    malformed.entry(p.to_owned()).or_default().hit(&id);
                }
                let stray: Vec<String> = scan
                    .found
                    .iter()
                    .filter(|f| !f.managed && !matches!(f.kind, FoundKind::BlindIndex { .. }))
                    .map(|f| f.path.clone())
                    .collect();
                for p in distinct(&stray) {
                    unmanaged.entry(p.to_owned()).or_default().hit(&id);
                }
                let mut seen_keys: Vec<KeyId> = Vec::new();
                for f in &scan.found {
                    let (key, which) = match f.kind {
                        FoundKind::Envelope { key, suite } => {
                            *rep.suites.entry(suite.name().to_owned()).or_default() += 1;
                            (Some(key), Some(suite))
                        }
                        FoundKind::Csfle { key } => {
                            if f.managed {
                                rep.csfle_values += 1;
                            }
                            (key, None)
                        }
                        FoundKind::Qe { kind, key } => {
                            if f.managed {
                                *rep.qe_values
                                    .entry(kind.short_name().to_owned())
                                    .or_default() += 1;
                            }
                            (Some(key), None)
                        }
                        FoundKind::BlindIndex { key } => (Some(key), None),
                    };
                    let Some(key) = key else { continue };
                    let t = keys.entry(key).or_default();
                    match (f.kind, which) {
                        (FoundKind::Envelope { .. }, Some(s)) => {
                            t.envelopes += 1;
                            *t.suites.entry(s.name().to_owned()).or_default() += 1;
                        }
                        (FoundKind::Csfle { .. }, _) => t.csfle += 1,
                        (FoundKind::Qe { .. }, _) => t.qe += 1,
                        _ => t.blind += 1,
                    }
                    if t.example.is_none() {
                        t.example = Some(id());
                    }
                    if !seen_keys.contains(&key) {
                        seen_keys.push(key);
                        t.documents += 1;
                    }
                }
                if self.options.tokens {
                    let mut path = String::new();
                    scan_tokens(&d, schema, false, &mut path, &mut |p, kind| {
                        tokens.entry((p.to_owned(), kind)).or_default().hit(&id);
                    })?;
                }
            }
            progress(rep.documents);
            if end {
                break;
            }
        }

        // Summaries and findings, in a stable order.
        for (path, t) in plaintext {
            rep.findings.push(AuditFinding::Plaintext {
                path,
                documents: t.documents,
                example_id: t.example(),
            });
        }
        // By alias, then primary before older keys, then id: a stable, readable order.
        let mut key_ids: Vec<(String, u8, KeyId)> = keys
            .keys()
            .map(|id| match keyring.key(id) {
                Ok(k) => (k.alias().to_owned(), state_rank(k.state()), *id),
                Err(_) => (String::from("\u{10FFFF}"), 9, *id),
            })
            .collect();
        key_ids.sort();
        for (_, _, kid) in key_ids {
            let Some(t) = keys.remove(&kid) else { continue };
            let example_id = t.example.clone().unwrap_or_default();
            let values = t.envelopes + t.csfle + t.qe + t.blind;
            let (alias, state, encryptions) = match keyring.key(&kid) {
                Ok(k) => (
                    Some(k.alias().to_owned()),
                    k.state().as_str().to_owned(),
                    Some(k.encryptions()),
                ),
                Err(_) => (None, "unknown".to_owned(), None),
            };
            match state.as_str() {
                "active" if !self.options.allow_stale => {
                    rep.findings.push(AuditFinding::StaleKey {
                        key: kid,
                        alias: alias.clone().unwrap_or_default(),
                        values,
                        example_id: example_id.clone(),
                    })
                }
                "disabled" | "destroyed" | "unknown" => {
                    rep.findings.push(AuditFinding::UnusableKey {
                        key: kid,
                        state: state.clone(),
                        values,
                        example_id: example_id.clone(),
                    })
                }
                _ => {}
            }
            let limited = t
                .suites
                .keys()
                .filter_map(|s| s.parse::<Suite>().ok())
                .filter_map(Suite::usage_limit)
                .min();
            if let (Some(limit), Some(n)) = (limited, encryptions) {
                let used = n.max(t.envelopes);
                #[allow(clippy::cast_precision_loss)] // a ratio of counts
                let near = used as f64 >= limit as f64 * self.options.nonce_warning;
                if near {
                    rep.findings.push(AuditFinding::NonceLimit {
                        key: kid,
                        encryptions: used,
                        values: t.envelopes,
                        limit,
                    });
                }
            }
            rep.keys.push(KeyUsage {
                key: kid,
                alias,
                state,
                envelopes: t.envelopes,
                csfle: t.csfle,
                qe: t.qe,
                blind_indexes: t.blind,
                documents: t.documents,
                suites: t.suites,
                encryptions,
            });
        }
        if outdated.documents > 0 {
            rep.findings.push(AuditFinding::Outdated {
                documents: outdated.documents,
                example_id: outdated.example(),
            });
        }
        for (path, t) in unmanaged {
            rep.findings.push(AuditFinding::Unmanaged {
                path,
                documents: t.documents,
                example_id: t.example(),
            });
        }
        for (path, t) in malformed {
            rep.findings.push(AuditFinding::Malformed {
                path,
                documents: t.documents,
                example_id: t.example(),
            });
        }
        for ((path, token), t) in tokens {
            rep.findings.push(AuditFinding::Token {
                path,
                token,
                documents: t.documents,
                example_id: t.example(),
            });
        }
        rep.seconds = started.elapsed().as_secs_f64();
        Ok(rep)
    }
}

/// The paths of one document, each once.
fn distinct(paths: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = paths.iter().map(String::as_str).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn state_rank(s: crate::key::KeyState) -> u8 {
    use crate::key::KeyState as S;
    match s {
        S::Primary => 0,
        S::Active => 1,
        S::Disabled => 2,
        S::Destroyed => 3,
    }
}

/// A document's `_id` as relaxed Extended JSON.
fn id_text(d: &RawDocument) -> String {
    d.get("_id")
        .ok()
        .flatten()
        .and_then(|r| Bson::try_from(r.to_raw_bson()).ok())
        .map_or_else(|| "?".to_owned(), |b| b.into_relaxed_extjson().to_string())
}

/// Calls `hit` for every string outside the schema's fields that looks like a secret.
fn scan_tokens(
    doc: &RawDocument,
    schema: &Schema,
    is_array: bool,
    path: &mut String,
    hit: &mut dyn FnMut(&str, TokenKind),
) -> Result<()> {
    for e in rawbson::elements(doc) {
        let e = e?;
        let mark = path.len();
        if !is_array {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(e.key());
        }
        if path != "_id"
            && schema.rule(path).is_none()
            && schema.rule_by_blind_index(path).is_none()
        {
            match e.ty {
                ty::DOCUMENT | ty::ARRAY => {
                    scan_tokens(e.document()?, schema, e.ty == ty::ARRAY, path, hit)?;
                }
                ty::STRING => {
                    if let Some(s) = e.value.get(4..e.value.len().saturating_sub(1)) {
                        if let Ok(s) = std::str::from_utf8(s) {
                            if let Some(kind) = classify_token(s) {
                                hit(path, kind);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        path.truncate(mark);
    }
    Ok(())
}

/// What secret a string looks like, if any. Checks the whole string and each
/// whitespace-separated word (a token pasted into a note).
pub(crate) fn classify_token(s: &str) -> Option<TokenKind> {
    if s.contains("-----BEGIN") && s.contains("PRIVATE KEY-----") {
        return Some(TokenKind::PrivateKey);
    }
    if s.len() > 64 * 1024 {
        return None;
    }
    s.split(|c: char| {
        c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '(' | ')' | '<' | '>')
    })
    .filter(|w| w.len() >= 16)
    .find_map(classify_word)
}

fn classify_word(w: &str) -> Option<TokenKind> {
    let w = w
        .trim_start_matches("Bearer")
        .trim_start_matches(':')
        .trim_start_matches('=');
    let alnum = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    let b64url = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    // JWT: three base64url parts, the first two JSON objects ("{" encodes as "eyJ").
    let parts: Vec<&str> = w.split('.').collect();
    if parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts[1].starts_with("eyJ")
        && parts.iter().all(|p| b64url(p))
        && parts[2].len() >= 16
    {
        return Some(TokenKind::Jwt);
    }
    if w.len() == 20
        && (w.starts_with("AKIA") || w.starts_with("ASIA"))
        && w.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return Some(TokenKind::AwsAccessKey);
    }
    for p in ["ghp_", "gho_", "ghu_", "ghs_", "ghr_"] {
        if let Some(rest) = w.strip_prefix(p) {
            if rest.len() >= 30 && alnum(rest) {
                return Some(TokenKind::GithubToken);
            }
        }
    }
    if let Some(rest) = w.strip_prefix("github_pat_") {
        if rest.len() >= 30 && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Some(TokenKind::GithubToken);
        }
    }
    for p in ["xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xapp-"] {
        if let Some(rest) = w.strip_prefix(p) {
            if rest.len() >= 10 && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Some(TokenKind::SlackToken);
            }
        }
    }
    for p in ["sk_live_", "rk_live_", "sk_test_", "rk_test_"] {
        if let Some(rest) = w.strip_prefix(p) {
            if rest.len() >= 16 && alnum(rest) {
                return Some(TokenKind::StripeKey);
            }
        }
    }
    if let Some(rest) = w.strip_prefix("AIza") {
        if rest.len() == 35 && b64url(rest) {
            return Some(TokenKind::GoogleApiKey);
        }
    }
    for p in ["sk-proj-", "sk-ant-", "sk-svcacct-"] {
        if let Some(rest) = w.strip_prefix(p) {
            if rest.len() >= 20 && b64url(rest) {
                return Some(TokenKind::AiApiKey);
            }
        }
    }
    if high_entropy(w) {
        return Some(TokenKind::HighEntropy);
    }
    None
}

/// A long string of token characters with the entropy of random bytes: at least 4.2 bits per
/// character for base64-like strings of 24+ characters, 3.7 for hex strings of 40+. Identifiers
/// that are random by design but not secret (UUIDs, ObjectId hex) are not reported.
fn high_entropy(w: &str) -> bool {
    let n = w.len();
    if !(24..=1024).contains(&n) {
        return false;
    }
    if !w
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    {
        return false;
    }
    let hexish = w.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hexish && (n == 24 || n == 32 || n == 36) {
        return false; // ObjectId, UUID (with or without dashes)
    }
    let has_digit = w.bytes().any(|b| b.is_ascii_digit());
    let has_upper = w.bytes().any(|b| b.is_ascii_uppercase());
    let has_lower = w.bytes().any(|b| b.is_ascii_lowercase());
    let e = entropy(w);
    if hexish {
        return n >= 40 && has_digit && e >= 3.7;
    }
    has_digit && has_upper && has_lower && e >= 4.2
}

#[allow(clippy::cast_precision_loss)] // byte counts of a short string
fn entropy(w: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in w.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = w.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_recognised() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        assert_eq!(classify_token(jwt), Some(TokenKind::Jwt));
        assert_eq!(
            classify_token(&format!("Authorization: Bearer {jwt}")),
            Some(TokenKind::Jwt)
        );
        assert_eq!(
            classify_token("AKIAIOSFODNN7EXAMPLE"),
            Some(TokenKind::AwsAccessKey)
        );
        assert_eq!(
            classify_token("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"),
            Some(TokenKind::GithubToken)
        );
        assert_eq!(
            classify_token("xoxb-263594206564-FGqddMF8t08v8N7Oq4i57vs1"),
            Some(TokenKind::SlackToken)
        );
        assert_eq!(
            classify_token("sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            Some(TokenKind::StripeKey)
        );
        assert_eq!(
            classify_token("AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe"),
            Some(TokenKind::GoogleApiKey)
        );
        assert_eq!(
            classify_token(
                "-----BEGIN RSA PRIVATE KEY-----\nMIIE...\n-----END RSA PRIVATE KEY-----"
            ),
            Some(TokenKind::PrivateKey)
        );
        assert_eq!(
            classify_token("q8Zr4TfW2mXv9LpK3sNd7YhB6cJ1gRa5"),
            Some(TokenKind::HighEntropy)
        );
    }

    #[test]
    fn ordinary_strings_are_not_tokens() {
        for s in [
            "Hello, world! This is a perfectly ordinary sentence of text.",
            "alice@example.com",
            "6b0bde46993f52389cb720bb",
            "5b0c8f2e-6a51-4c6e-9d5e-3f1a2b3c4d5e",
            "https://example.com/a/b/c?x=1",
            "ThisIsAVeryLongCamelCaseIdentifierName",
            "2026-11-29T08:00:00.000Z",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "123 Main Street, Springfield, IL 62704",
        ] {
            assert_eq!(classify_token(s), None, "{s}");
        }
    }
}
