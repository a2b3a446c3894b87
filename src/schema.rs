//! Which fields are encrypted, and how: paths, suites, key aliases, bindings, padding, blind
//! indexes. Built in code with [`Schema::builder`] or loaded from TOML/JSON (docs/SCHEMA.md).
//!
//! Paths are dotted (`profile.email`). A path walks into nested documents and through arrays:
//! `addresses.street` means the `street` of every document in `addresses`. A trailing `$[]`
//! (MongoDB's all-elements operator) encrypts each element of an array separately, so that
//! `$push` can add encrypted elements; without it an array field is encrypted as one value.
//!
//! The rules compile into a path tree ([`Node`]); `schema/walk.rs` walks a raw document along
//! it, once for every user: the core's encryption, the rotation inspector, a write's check of
//! dotted names.

mod derived;
pub(crate) mod walk;

#[doc(hidden)]
pub use derived::__derive;
pub use derived::{Encrypted, SchemaFields};

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{ArgumentError, Error, Result};
use crate::keyring::Keyring;
use crate::suite::Suite;

/// The segment that means "each element of the array".
pub const EACH: &str = "$[]";

/// Default suite for randomized fields.
pub const DEFAULT_SUITE: Suite = Suite::Aes256Gcm;

/// How a field's value is encrypted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    /// Alias of the key that encrypts it.
    pub key: String,
    /// The suite.
    pub suite: Suite,
}

/// A keyed blind index: HMAC-SHA-256 of the value, stored in a sibling field, so the value can
/// be found by equality without being stored (or without being decryptable by the querier).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlindIndex {
    /// Alias of the key that computes the index (use a different alias from the encryption key).
    pub key: String,
    /// Name of the sibling field holding the index; default `<field>_bidx`.
    pub name: Option<String>,
    /// Keep only this many bytes (8 to 32) of the 32-byte HMAC; default 32.
    pub truncate: Option<usize>,
}

impl BlindIndex {
    /// A blind index computed with the key of `alias`.
    #[must_use]
    pub fn new(alias: impl Into<String>) -> Self {
        BlindIndex {
            key: alias.into(),
            name: None,
            truncate: None,
        }
    }

    /// Stores the index under `name` instead of `<field>_bidx`.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Keeps only the first `bytes` bytes of the HMAC (more collisions, fewer bytes stored).
    #[must_use]
    pub fn truncate(mut self, bytes: usize) -> Self {
        self.truncate = Some(bytes);
        self
    }

    /// The number of index bytes stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.truncate.unwrap_or(32)
    }

    /// Never true; present for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The rules for one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Encryption of the value itself; `None` for an index-only field (the value is dropped).
    pub encrypt: Option<Encryption>,
    /// Bind ciphertexts to the document's `_id` (randomized suites only).
    pub bind_id: bool,
    /// Pad plaintexts to a multiple of this many bytes (hides lengths within a bucket).
    pub pad_to: Option<u32>,
    /// A blind index stored next to the field.
    pub blind_index: Option<BlindIndex>,
}

impl Field {
    /// Randomized encryption with the default suite (AES-256-GCM) under `alias`.
    #[must_use]
    pub fn randomized(alias: impl Into<String>) -> Self {
        Field {
            encrypt: Some(Encryption {
                key: alias.into(),
                suite: DEFAULT_SUITE,
            }),
            bind_id: false,
            pad_to: None,
            blind_index: None,
        }
    }

    /// Deterministic encryption (AES-256-SIV) under `alias`: allows equality queries, and leaks
    /// which documents hold equal values (and so their frequency). An explicit choice.
    #[must_use]
    pub fn deterministic(alias: impl Into<String>) -> Self {
        let mut f = Field::randomized(alias);
        if let Some(e) = f.encrypt.as_mut() {
            e.suite = Suite::Aes256SivDeterministic;
        }
        f
    }

    /// No stored value, only a blind index (the token-hash pattern).
    #[must_use]
    pub fn blind_index_only(index: BlindIndex) -> Self {
        Field {
            encrypt: None,
            bind_id: false,
            pad_to: None,
            blind_index: Some(index),
        }
    }

    /// Uses another suite. Choosing [`Suite::Aes256SivDeterministic`] here is the same as
    /// [`Field::deterministic`].
    #[must_use]
    pub fn suite(mut self, suite: Suite) -> Self {
        if let Some(e) = self.encrypt.as_mut() {
            e.suite = suite;
        }
        self
    }

    /// Binds ciphertexts to the document's `_id`: copied into another document they fail to
    /// decrypt. An `_id` is generated (ObjectId) when a document has none.
    #[must_use]
    pub fn bind_id(mut self) -> Self {
        self.bind_id = true;
        self
    }

    /// Pads plaintexts to a multiple of `bytes`.
    #[must_use]
    pub fn pad_to(mut self, bytes: u32) -> Self {
        self.pad_to = Some(bytes);
        self
    }

    /// Adds a blind index next to the encrypted field.
    #[must_use]
    pub fn with_blind_index(mut self, index: BlindIndex) -> Self {
        self.blind_index = Some(index);
        self
    }

    /// Whether the field is encrypted deterministically.
    #[must_use]
    pub fn is_deterministic(&self) -> bool {
        self.encrypt
            .as_ref()
            .is_some_and(|e| e.suite.is_deterministic())
    }
}

/// One field rule with its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRule {
    /// The path as written (`tags.$[]`, `profile.email`).
    pub path: String,
    /// The path without `$[]` segments: what is bound into the associated data and matched
    /// against queries.
    pub normalized: String,
    /// Each element of an array is encrypted separately (path ends in `$[]`).
    pub each_element: bool,
    /// The rules.
    pub field: Field,
}

impl FieldRule {
    /// The key aliases this field uses: its encryption key's, then its blind index's.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.field
            .encrypt
            .as_ref()
            .map(|e| e.key.as_str())
            .into_iter()
            .chain(self.field.blind_index.as_ref().map(|b| b.key.as_str()))
    }

    /// The full path of this field's blind index, if it has one.
    #[must_use]
    pub fn blind_index_path(&self) -> Option<String> {
        let bi = self.field.blind_index.as_ref()?;
        let (parent, leaf) = match self.normalized.rsplit_once('.') {
            Some((p, l)) => (Some(p), l),
            None => (None, self.normalized.as_str()),
        };
        let name = bi.name.clone().unwrap_or_else(|| format!("{leaf}_bidx"));
        Some(match parent {
            Some(p) => format!("{p}.{name}"),
            None => name,
        })
    }

    /// The blind index's field name (last segment).
    pub(crate) fn blind_index_name(&self) -> Option<String> {
        self.blind_index_path()
            .map(|p| p.rsplit('.').next().unwrap_or_default().to_owned())
    }
}

/// A node of the compiled path tree.
#[derive(Clone, Debug, Default)]
pub(crate) struct Node {
    pub children: Vec<(String, Node)>,
    pub rule: Option<usize>,
}

impl Node {
    /// The child for `key`. Children are kept sorted: a binary search for wide nodes (W1 has
    /// 1500 fields at the top), a scan for the usual handful, which is cheaper.
    pub(crate) fn child(&self, key: impl AsRef<[u8]>) -> Option<&Node> {
        let mut from_start = usize::MAX; // no hint
        self.child_after(key.as_ref(), &mut from_start)
            .map(|(_, n)| n)
    }

    /// [`Node::child`] for the elements of one document in turn, by the element's name as
    /// stored: `next` is where the search starts, and is moved past each match. Documents tend
    /// to hold their fields in the order of the schema's (sorted) names — always when written
    /// from the same code — so that a match usually costs one comparison instead of a search.
    /// Gives the child's name too (the same bytes, as a `str`).
    pub(crate) fn child_after(&self, key: &[u8], next: &mut usize) -> Option<(&str, &Node)> {
        if let Some((k, n)) = self.children.get(*next) {
            if k.as_bytes() == key {
                *next += 1;
                return Some((k, n));
            }
        }
        // Byte order is `str` order, in which the children are sorted.
        let i = if self.children.len() <= 8 {
            self.children.iter().position(|(k, _)| k.as_bytes() == key)
        } else {
            self.children
                .binary_search_by(|(k, _)| k.as_bytes().cmp(key))
                .ok()
        }?;
        *next = i + 1;
        let (k, n) = &self.children[i];
        Some((k, n))
    }
}

/// The encryption schema: a validated set of field rules.
#[derive(Clone, Debug)]
pub struct Schema {
    rules: Vec<FieldRule>,
    owner_field: Option<String>,
    tree: Node,
    needs_id: bool,
    /// Each rule's blind-index field name, computed once (the transform needs it per document).
    blind_index_names: Vec<Option<String>>,
    /// Per key alias, how many fields it encrypts with a random-nonce suite: what a document
    /// walk reserves against the key's usage limit at once.
    random_nonce_fields: Vec<(String, u64)>,
}

/// Builds a [`Schema`].
#[derive(Debug, Default)]
#[must_use]
pub struct SchemaBuilder {
    fields: Vec<(String, Field)>,
    owner_field: Option<String>,
}

impl SchemaBuilder {
    /// Adds a field rule.
    pub fn field(mut self, path: impl Into<String>, field: Field) -> Self {
        self.fields.push((path.into(), field));
        self
    }

    /// Scopes documents to an owner: the value of this top-level field is bound into every
    /// ciphertext of the document, and owner-scoped collections filter on it.
    pub fn owner_field(mut self, name: impl Into<String>) -> Self {
        self.owner_field = Some(name.into());
        self
    }

    /// Validates and compiles the schema.
    ///
    /// # Errors
    /// [`Error::Schema`] naming the offending path.
    pub fn build(self) -> Result<Schema> {
        let mut rules = Vec::with_capacity(self.fields.len());
        for (path, field) in self.fields {
            rules.push(check_field(path, field)?);
        }
        // Overlaps: one encrypted path (or blind index) inside or equal to another. Checked by
        // looking up every path and each of its ancestors in a map: O(paths × depth).
        let mut occupied: Vec<(String, &str)> = Vec::new();
        for r in &rules {
            occupied.push((r.normalized.clone(), &r.path));
            if let Some(bi) = r.blind_index_path() {
                occupied.push((bi, &r.path));
            }
        }
        let mut seen: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        for (p, src) in &occupied {
            if let Some(other) = seen.insert(p, src) {
                return Err(overlap_error(other, src, p));
            }
        }
        for (p, src) in &occupied {
            let mut prefix = p.as_str();
            while let Some((parent, _)) = prefix.rsplit_once('.') {
                if let Some(other) = seen.get(parent) {
                    return Err(overlap_error(other, src, p));
                }
                prefix = parent;
            }
        }
        if let Some(owner) = &self.owner_field {
            if owner.is_empty() || owner.contains('.') || owner.starts_with('$') || owner == "_id" {
                return Err(Error::schema(
                    owner.clone(),
                    "the owner field must be a top-level field name other than _id",
                ));
            }
            if let Some((_, p)) = occupied.iter().find(|(o, _)| overlaps(o, owner)) {
                return Err(Error::schema(
                    p.to_string(),
                    "the owner field cannot be encrypted or indexed (it is bound and filtered in clear)",
                ));
            }
        }
        let mut tree = Node::default();
        for (i, r) in rules.iter().enumerate() {
            let mut node = &mut tree;
            for seg in r.normalized.split('.') {
                let pos = match node.children.binary_search_by(|(k, _)| k.as_str().cmp(seg)) {
                    Ok(p) => p,
                    Err(p) => {
                        node.children.insert(p, (seg.to_owned(), Node::default()));
                        p
                    }
                };
                node = &mut node.children[pos].1;
            }
            node.rule = Some(i);
        }
        let needs_id = rules.iter().any(|r| r.field.bind_id);
        let blind_index_names = rules.iter().map(FieldRule::blind_index_name).collect();
        let mut random_nonce_fields: Vec<(String, u64)> = Vec::new();
        for enc in rules.iter().filter_map(|r| r.field.encrypt.as_ref()) {
            if enc.suite.usage_limit().is_none() {
                continue;
            }
            match random_nonce_fields.iter_mut().find(|(a, _)| *a == enc.key) {
                Some((_, n)) => *n += 1,
                None => random_nonce_fields.push((enc.key.clone(), 1)),
            }
        }
        Ok(Schema {
            blind_index_names,
            random_nonce_fields,
            rules,
            owner_field: self.owner_field,
            tree,
            needs_id,
        })
    }
}

fn overlap_error(a: &str, b: &str, at: &str) -> Error {
    if a == b {
        Error::schema(a, format!("its blind index {at:?} overlaps another field"))
    } else {
        Error::schema(a, format!("overlaps {b:?} (one path is inside the other)"))
    }
}

/// Whether one path is the other or lies inside it.
pub(crate) fn overlaps(a: &str, b: &str) -> bool {
    let inside =
        |x: &str, y: &str| x == y || (x.starts_with(y) && x.as_bytes().get(y.len()) == Some(&b'.'));
    inside(a, b) || inside(b, a)
}

fn check_field(path: String, field: Field) -> Result<FieldRule> {
    let bad = |why: &str| Err(Error::schema(path.clone(), why));
    if path.is_empty() {
        return bad("empty path");
    }
    let segs: Vec<&str> = path.split('.').collect();
    let mut normal = Vec::with_capacity(segs.len());
    let mut each_element = false;
    for (i, s) in segs.iter().enumerate() {
        if s.is_empty() {
            return bad("empty path segment");
        }
        if *s == EACH {
            if i == 0 {
                return bad("a path cannot start with $[]");
            }
            if i == segs.len() - 1 {
                each_element = true;
            }
            continue;
        }
        if s.starts_with('$') {
            return bad("path segments cannot start with '$' (only a trailing $[] is allowed)");
        }
        if s.contains('\0') {
            return bad("path segments cannot contain NUL");
        }
        normal.push(*s);
    }
    if normal.first() == Some(&"_id") {
        return bad("_id cannot be encrypted: it identifies and binds the document");
    }
    let normalized = normal.join(".");
    match &field.encrypt {
        None if field.blind_index.is_none() => {
            return bad("a field needs a key (encryption), a blind index, or both")
        }
        None if field.bind_id || field.pad_to.is_some() => {
            return bad("bind_id and pad_to need encryption (an index-only field stores no ciphertext)")
        }
        Some(e) if e.key.is_empty() => return bad("empty key alias"),
        Some(e) if e.suite.is_deterministic() && field.bind_id => {
            return bad("deterministic encryption cannot be bound to _id: equal values would no longer give equal ciphertexts, defeating equality queries")
        }
        _ => {}
    }
    if field.pad_to == Some(0) || field.pad_to.is_some_and(|p| p > 1 << 16) {
        return bad("pad_to must be between 1 and 65536 bytes");
    }
    if let Some(bi) = &field.blind_index {
        if bi.key.is_empty() {
            return bad("empty blind-index key alias");
        }
        if !(8..=32).contains(&bi.len()) {
            return bad("blind-index truncation must be between 8 and 32 bytes");
        }
        if each_element {
            return bad("blind indexes on each element of an array ($[]) are not supported");
        }
        if let Some(n) = &bi.name {
            if n.is_empty() || n.contains('.') || n.starts_with('$') {
                return bad("blind-index name must be a plain field name");
            }
        }
        if field.encrypt.as_ref().is_some_and(|e| e.key == bi.key) {
            return bad("use a different key alias for the blind index than for encryption");
        }
    }
    Ok(FieldRule {
        path,
        normalized,
        each_element,
        field,
    })
}

impl Schema {
    /// Starts building a schema.
    pub fn builder() -> SchemaBuilder {
        SchemaBuilder::default()
    }

    /// The schema of `T`'s documents, from its `#[derive(Encrypted)]` marks
    /// ([`Encrypted::try_schema`]).
    ///
    /// # Errors
    /// As [`Encrypted::try_schema`].
    pub fn of<T: Encrypted + ?Sized>() -> Result<Self> {
        T::try_schema()
    }

    /// A schema with no encrypted fields (decrypt-only use).
    #[must_use]
    pub fn empty() -> Self {
        SchemaBuilder::default()
            .build()
            .unwrap_or_else(|_| unreachable!("an empty schema is valid"))
    }

    /// The field rules.
    #[must_use]
    pub fn rules(&self) -> &[FieldRule] {
        &self.rules
    }

    /// The owner field, when documents are owner-scoped.
    #[must_use]
    pub fn owner_field(&self) -> Option<&str> {
        self.owner_field.as_deref()
    }

    /// The rule for exactly this (normalized) path.
    #[must_use]
    pub fn rule(&self, path: &str) -> Option<&FieldRule> {
        self.rules.iter().find(|r| r.normalized == path)
    }

    /// The rule whose blind index is stored at this path.
    #[must_use]
    pub fn rule_by_blind_index(&self, path: &str) -> Option<&FieldRule> {
        self.rules
            .iter()
            .find(|r| r.blind_index_path().as_deref() == Some(path))
    }

    /// The first rule whose path is inside `path` or contains it (for refusing queries on a
    /// parent document of an encrypted field).
    #[must_use]
    pub fn overlapping(&self, path: &str) -> Option<&FieldRule> {
        self.rules.iter().find(|r| overlaps(&r.normalized, path))
    }

    /// The rule at a normalized path, found through the path tree (O(depth)).
    pub(crate) fn rule_at(&self, path: &str) -> Option<&FieldRule> {
        let mut node = &self.tree;
        for seg in path.split('.') {
            node = node.child(seg)?;
        }
        node.rule.map(|i| &self.rules[i])
    }

    /// The blind-index field name of rule `i` (an index into [`Schema::rules`]).
    pub(crate) fn blind_index_name_of(&self, i: usize) -> Option<&str> {
        self.blind_index_names.get(i).and_then(Option::as_deref)
    }

    /// How many fields `alias` encrypts with a random-nonce suite (at least 1).
    pub(crate) fn random_nonce_fields(&self, alias: &str) -> u64 {
        self.random_nonce_fields
            .iter()
            .find(|(a, _)| a == alias)
            .map_or(1, |(_, n)| *n)
    }

    pub(crate) fn tree(&self) -> &Node {
        &self.tree
    }

    pub(crate) fn needs_id(&self) -> bool {
        self.needs_id
    }

    /// Every key alias the schema names, once each, in the order of the rules.
    #[must_use]
    pub fn aliases(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for a in self.rules.iter().flat_map(FieldRule::aliases) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// Checks that every alias the schema names exists in `keyring`.
    ///
    /// # Errors
    /// [`Error::Schema`] naming the path whose alias is unknown.
    pub fn check_keys(&self, keyring: &dyn Keyring) -> Result<()> {
        for r in &self.rules {
            for alias in r.aliases() {
                if let Err(Error::UnknownAlias(_)) = keyring.readable_keys(alias) {
                    return Err(Error::schema(
                        r.path.clone(),
                        format!("unknown key alias {alias:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Loads a schema from a `.toml` or `.json` file (docs/SCHEMA.md).
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Schema`] / [`Error::SchemaSyntax`] for invalid content, [`Error::InvalidArgument`] for another file extension.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json_str(&text),
            Some("toml") => Self::from_toml_str(&text),
            _ => Err(Error::from(ArgumentError::SchemaFileName(
                path.display().to_string(),
            ))),
        }
    }

    /// Parses a TOML schema.
    ///
    /// # Errors
    /// [`Error::SchemaSyntax`] for syntax, [`Error::Schema`] for invalid rules.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let file: SchemaFile = toml::from_str(text).map_err(|e| Error::SchemaSyntax {
            format: "TOML",
            message: e.message().to_owned(),
        })?;
        file.into_schema()
    }

    /// Parses a JSON schema.
    ///
    /// # Errors
    /// [`Error::SchemaSyntax`] for syntax, [`Error::Schema`] for invalid rules.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let file: SchemaFile = serde_json::from_str(text).map_err(|e| Error::SchemaSyntax {
            format: "JSON",
            message: e.to_string(),
        })?;
        file.into_schema()
    }

    /// The schema in its TOML file form.
    #[must_use]
    pub fn to_toml_string(&self) -> String {
        // A file form is strings, booleans and integers under string keys, the owner before the
        // field tables: always TOML. An empty string instead would read back as a schema that
        // encrypts nothing.
        toml::to_string(&self.file()).expect("a schema's file form is valid TOML")
        // allowed: see above
    }

    /// The schema in its JSON file form (pretty-printed).
    #[must_use]
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.file()).expect("a schema's file form is valid JSON")
        // allowed: string keys only
    }

    fn file(&self) -> SchemaFile {
        SchemaFile {
            owner_field: self.owner_field.clone(),
            fields: self
                .rules
                .iter()
                .map(|r| {
                    let f = &r.field;
                    let e = f.encrypt.as_ref();
                    (
                        r.path.clone(),
                        FieldFile {
                            key: e.map(|e| e.key.clone()),
                            algorithm: e
                                .filter(|e| !e.suite.is_deterministic())
                                .map(|e| e.suite.name().to_owned()),
                            deterministic: f.is_deterministic(),
                            bind_id: f.bind_id,
                            pad_to: f.pad_to,
                            blind_index: f.blind_index.as_ref().map(|b| BlindIndexFile {
                                key: b.key.clone(),
                                name: b.name.clone(),
                                truncate: b.truncate,
                            }),
                        },
                    )
                })
                .collect(),
        }
    }
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_field: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, FieldFile>,
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct FieldFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    deterministic: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    bind_id: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pad_to: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blind_index: Option<BlindIndexFile>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct BlindIndexFile {
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    truncate: Option<usize>,
}

impl SchemaFile {
    fn into_schema(self) -> Result<Schema> {
        let mut b = Schema::builder();
        if let Some(o) = self.owner_field {
            b = b.owner_field(o);
        }
        for (path, f) in self.fields {
            let suite = match &f.algorithm {
                Some(a) => Some(a.parse::<Suite>().map_err(|_| {
                    Error::schema(path.clone(), format!("unknown algorithm {a:?}"))
                })?),
                None => None,
            };
            if let Some(s) = suite.filter(|s| f.deterministic && !s.is_deterministic()) {
                return Err(Error::schema(
                    path,
                    format!("deterministic contradicts algorithm {:?}, a randomized suite: give one of the two", s.name()),
                ));
            }
            let deterministic = f.deterministic || suite.is_some_and(Suite::is_deterministic);
            let mut field = match (&f.key, deterministic) {
                (Some(k), true) => Field::deterministic(k.clone()),
                (Some(k), false) => {
                    Field::randomized(k.clone()).suite(suite.unwrap_or(DEFAULT_SUITE))
                }
                (None, _) if suite.is_some() || f.deterministic => {
                    return Err(Error::schema(path, "an algorithm needs a key"))
                }
                (None, _) => match &f.blind_index {
                    Some(_) => Field {
                        encrypt: None,
                        bind_id: false,
                        pad_to: None,
                        blind_index: None,
                    },
                    None => {
                        return Err(Error::schema(
                            path,
                            "a field needs a key (encryption), a blind index, or both",
                        ))
                    }
                },
            };
            field.bind_id = f.bind_id;
            field.pad_to = f.pad_to;
            field.blind_index = f.blind_index.map(|b| BlindIndex {
                key: b.key,
                name: b.name,
                truncate: b.truncate,
            });
            b = b.field(path, field);
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_listed_once_each() {
        let s = Schema::builder()
            .field(
                "b",
                Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
            )
            .field("a", Field::deterministic("det"))
            .field("c", Field::randomized("pii"))
            .field("t", Field::blind_index_only(BlindIndex::new("idx")))
            .build()
            .unwrap();
        let mut got = s.aliases();
        got.sort_unstable();
        assert_eq!(got, ["det", "idx", "pii"]);
        let b = s.rule("b").unwrap();
        assert_eq!(b.aliases().collect::<Vec<_>>(), ["pii", "idx"]);
        let t = s.rule("t").unwrap();
        assert_eq!(t.aliases().collect::<Vec<_>>(), ["idx"]);
    }

    fn err_path(r: Result<Schema>) -> String {
        match r {
            Err(Error::Schema { path, .. }) => path,
            other => panic!("expected a schema error, got {other:?}"),
        }
    }

    #[test]
    fn fail_invalid_schemas_name_the_path() {
        let b = || Schema::builder();
        assert_eq!(
            err_path(
                b().field("a", Field::randomized("k"))
                    .field("a.b", Field::randomized("k"))
                    .build()
            ),
            "a"
        );
        assert_eq!(
            err_path(b().field("x", Field::deterministic("k").bind_id()).build()),
            "x"
        );
        assert_eq!(
            err_path(b().field("_id", Field::randomized("k")).build()),
            "_id"
        );
        assert_eq!(
            err_path(b().field("a..b", Field::randomized("k")).build()),
            "a..b"
        );
        assert_eq!(
            err_path(b().field("a.$gt", Field::randomized("k")).build()),
            "a.$gt"
        );
        assert_eq!(
            err_path(b().field("p", Field::randomized("k").pad_to(0)).build()),
            "p"
        );
        assert_eq!(
            err_path(
                b().field(
                    "d",
                    Field::randomized("k")
                        .suite(Suite::Aes256SivDeterministic)
                        .bind_id()
                )
                .build()
            ),
            "d"
        );
        assert_eq!(
            err_path(
                b().field(
                    "t",
                    Field::blind_index_only(BlindIndex::new("i").truncate(4))
                )
                .build()
            ),
            "t"
        );
        assert_eq!(
            err_path(
                b().field("t", Field::randomized("k"))
                    .field("u", Field::blind_index_only(BlindIndex::new("i").name("t")))
                    .build()
            ),
            "t"
        );
        assert_eq!(
            err_path(
                b().field("t", Field::randomized("k"))
                    .owner_field("t")
                    .build()
            ),
            "t"
        );
    }

    #[test]
    fn unknown_alias_is_reported_with_path() {
        let ring = crate::keyring::InMemoryKeyring::new();
        ring.generate("pii");
        let s = Schema::builder()
            .field("ok", Field::randomized("pii"))
            .field("nested.bad", Field::randomized("nope"))
            .build()
            .unwrap();
        assert_eq!(
            err_path(s.check_keys(&ring).map(|()| s.clone())),
            "nested.bad"
        );
    }

    #[test]
    fn toml_and_json_files() {
        let toml = r#"
            owner_field = "tenant"
            [fields.ssn]
            key = "pii"
            bind_id = true
            pad_to = 16
            [fields."profile.email"]
            key = "pii"
            deterministic = true
            [fields."tags.$[]"]
            key = "pii"
            algorithm = "XChaCha20-Poly1305"
            [fields.token]
            blind_index = { key = "tokens", name = "token_hash", truncate = 16 }
        "#;
        let s = Schema::from_toml_str(toml).unwrap();
        assert_eq!(s.owner_field(), Some("tenant"));
        assert!(s.rule("profile.email").unwrap().field.is_deterministic());
        let tags = s.rule("tags").unwrap();
        assert!(tags.each_element);
        assert_eq!(
            tags.field.encrypt.as_ref().unwrap().suite,
            Suite::XChaCha20Poly1305
        );
        assert_eq!(
            s.rule("token").unwrap().blind_index_path().as_deref(),
            Some("token_hash")
        );
        assert!(s.rule("token").unwrap().field.encrypt.is_none());
        let again = Schema::from_toml_str(&s.to_toml_string()).unwrap();
        assert_eq!(again.rules(), s.rules());
        let json = r#"{"fields": {"a.b": {"key": "k", "algorithm": "ChaCha20-Poly1305"}}}"#;
        assert_eq!(Schema::from_json_str(json).unwrap().rules().len(), 1);
        assert!(
            Schema::from_json_str(r#"{"fields": {"a": {"key": "k", "algorithm": "ROT13"}}}"#)
                .is_err()
        );
        assert!(Schema::from_toml_str("[fields.a]\nkey = 'k'\nbogus = 1").is_err());
    }

    #[test]
    fn fail_deterministic_with_a_randomized_algorithm() {
        let toml = "[fields.a]\nkey = 'k'\ndeterministic = true\nalgorithm = 'ChaCha20-Poly1305'";
        match Schema::from_toml_str(toml) {
            Err(Error::Schema { path, reason }) => {
                assert_eq!(path, "a");
                assert!(reason.contains("contradicts"), "{reason}");
            }
            other => panic!("expected a schema error, got {other:?}"),
        }
        // Both saying deterministic is no contradiction.
        let toml =
            "[fields.a]\nkey = 'k'\ndeterministic = true\nalgorithm = 'AES-256-SIV-deterministic'";
        assert!(Schema::from_toml_str(toml).unwrap().rules()[0]
            .field
            .is_deterministic());
    }
}
