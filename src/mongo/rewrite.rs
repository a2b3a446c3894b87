//! Rewriting what a collection operation sends for encrypted fields, and refusing what cannot
//! work on ciphertext — pure functions over [`bson::Document`], no I/O.
//!
//! ```text
//!  filter, $match ──────────────▶ filter.rs      equality → ciphertexts / blind indexes, owner
//!  insert, replace, update ─────▶ write.rs       values encrypted through the engine, owner bound
//!  pipeline, projection, sort ──▶ pipeline.rs    stages checked, $match through filter.rs
//!  expressions in any of them ──▶ expression.rs  no reference to an encrypted field
//!  index keys, hints ───────────▶ index.rs       equality-comparable values only
//!                 all of them ──▶ this file: paths classified against the schema, refusals
//! ```
//!
//! Imports point down only: write and pipeline use filter, all three use expression, and
//! everything uses this file's classification of paths.
//!
//! The rules, in short (docs/QUERIES.md has the full table):
//!
//! - Equality on a deterministic field becomes `{field: {$in: [ct under each readable key]}}`;
//!   on a blind-indexed field it becomes `{<index path>: {$in: [index under each readable key]}}`.
//!   `$eq`, `$ne`, `$in` and `$nin` are rewritten the same way; `$exists` is kept.
//! - Anything the server would have to evaluate on the plaintext (order, patterns, arithmetic,
//!   types, sizes of encrypted values, expressions, sorting, grouping) is refused with
//!   [`Error::UnsupportedQuery`] naming the operator and the field, before anything is sent.
//! - Paths are matched after removing positional segments (`$`, `$[]`, `$[id]`) and, when the
//!   path as written matches nothing encrypted, array indexes (`addresses.0.street`).
//!
//! Nothing passes through unchanged if it names an encrypted field (or a document containing
//! one) in a way these rules do not cover: the default is to refuse.

use bson::{Bson, Document};

use crate::error::Error;
use crate::schema::{FieldRule, Schema};
use crate::transform::{Context, Cryptor};

mod expression;
mod filter;
mod index;
mod pipeline;
mod write;

#[cfg(test)]
mod fixture;

fn refuse(operator: impl Into<String>, field: impl Into<String>, reason: &'static str) -> Error {
    Error::UnsupportedQuery {
        operator: operator.into(),
        field: field.into(),
        reason,
    }
}

/// What a (normalized) path is, relative to the schema.
#[derive(Clone, Copy, Debug)]
enum Kind<'s> {
    /// Not encrypted and contains nothing encrypted.
    Plain,
    /// Exactly an encrypted (or index-only) field.
    Field(&'s FieldRule),
    /// Exactly the blind index of a field.
    Index(&'s FieldRule),
    /// A document or array that contains this field (or its index).
    Parent(&'s FieldRule),
    /// A path inside this field's encrypted value (or inside its index).
    Inside(&'s FieldRule),
}

impl Kind<'_> {
    fn is_plain(&self) -> bool {
        matches!(self, Kind::Plain)
    }

    fn rule(&self) -> Option<&FieldRule> {
        match self {
            Kind::Plain => None,
            Kind::Field(r) | Kind::Index(r) | Kind::Parent(r) | Kind::Inside(r) => Some(r),
        }
    }
}

/// A path classified against the schema, with the normalized form used to match it.
struct Resolved<'s> {
    kind: Kind<'s>,
    normalized: String,
}

/// `inner` lies strictly inside `outer` (`a.b.c` inside `a.b`).
fn is_inside(inner: &str, outer: &str) -> bool {
    inner.len() > outer.len()
        && inner.starts_with(outer)
        && inner.as_bytes().get(outer.len()) == Some(&b'.')
}

fn is_positional(seg: &str) -> bool {
    seg == "$" || (seg.starts_with("$[") && seg.ends_with(']'))
}

fn is_array_index(seg: &str) -> bool {
    !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit())
}

fn normalize(path: &str, drop_indexes: bool) -> String {
    path.split('.')
        .filter(|s| !(is_positional(s) || (drop_indexes && is_array_index(s))))
        .collect::<Vec<_>>()
        .join(".")
}

/// `path` with its last segment replaced by `name` (where a blind index lives).
fn sibling(path: &str, name: &str) -> String {
    match path.rsplit_once('.') {
        Some((parent, _)) => format!("{parent}.{name}"),
        None => name.to_owned(),
    }
}

/// A document of operators (`{$gt: 1}`), as opposed to a literal embedded document.
fn is_operator_doc(v: &Bson) -> bool {
    match v {
        Bson::Document(d) => d.keys().next().is_some_and(|k| k.starts_with('$')),
        _ => false,
    }
}

fn is_flag(v: &Bson) -> Option<bool> {
    match *v {
        Bson::Int32(n) => Some(n != 0),
        Bson::Int64(n) => Some(n != 0),
        Bson::Double(d) => Some(d != 0.0),
        Bson::Boolean(b) => Some(b),
        _ => None,
    }
}

/// The literal value of an equality condition on `key` in `filter` (top level, or inside a
/// top-level `$and`): `{key: v}` or `{key: {$eq: v}}`.
fn equality_in(filter: &Document, key: &str) -> Option<Bson> {
    if let Some(v) = filter.get(key) {
        match v {
            Bson::Document(d) if is_operator_doc(v) => {
                if let Some(eq) = d.get("$eq") {
                    return Some(eq.clone());
                }
            }
            Bson::RegularExpression(_) => {}
            other => return Some(other.clone()),
        }
    }
    if let Ok(clauses) = filter.get_array("$and") {
        for c in clauses {
            if let Bson::Document(d) = c {
                if let Some(v) = equality_in(d, key) {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Per-rewrite state.
struct State {
    /// The owner value deterministic ciphertexts are bound to, when known.
    owner: Option<Bson>,
    /// The first encrypted field a condition touched.
    touched: Option<String>,
}

impl State {
    fn touch(&mut self, rule: &FieldRule) {
        if self.touched.is_none() {
            self.touched = Some(rule.normalized.clone());
        }
    }
}

/// Rewrites what an operation sends for a collection's encrypted fields — filters, writes
/// (documents to insert or replace, updates), pipelines and the options that name fields —
/// or refuses it. Pure: no I/O; the keys it needs (readable keys of the schema's aliases) must
/// be in the keyring already.
///
/// ```
/// use bson::doc;
/// use fieldcrypt::mongo::QueryRewriter;
/// use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Schema};
///
/// let keys = InMemoryKeyring::new();
/// keys.generate("pii");
/// let schema = Schema::builder().field("email", Field::deterministic("pii")).build()?;
/// let cryptor = Cryptor::new(keys, schema);
/// let ctx = Context::namespace("app.users");
/// let q = QueryRewriter::new(&cryptor, &ctx);
/// let filter = q.filter(&doc! { "email": "a@example.com" })?;
/// assert!(filter.get_document("email")?.contains_key("$in"));
/// assert!(q.filter(&doc! { "email": { "$gt": "a" } }).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct QueryRewriter<'a> {
    cryptor: &'a Cryptor,
    ctx: &'a Context,
    scope: Option<&'a Bson>,
}

impl<'a> QueryRewriter<'a> {
    /// A rewriter for documents encrypted by `cryptor` in the collection of `ctx`.
    #[must_use]
    pub fn new(cryptor: &'a Cryptor, ctx: &'a Context) -> Self {
        QueryRewriter {
            cryptor,
            ctx,
            scope: None,
        }
    }

    /// Scopes every rewritten filter and pipeline to this owner (the schema's owner field), and
    /// binds it into deterministic query ciphertexts and encrypted update values.
    #[must_use]
    pub fn scope(mut self, owner: Option<&'a Bson>) -> Self {
        self.scope = owner;
        self
    }

    fn schema(&self) -> &'a Schema {
        self.cryptor.schema()
    }

    fn owner_field(&self) -> Option<&'a str> {
        self.schema().owner_field()
    }

    fn has_rules(&self) -> bool {
        !self.schema().rules().is_empty()
    }

    /// Every encrypted path, for refusals that concern the whole document.
    fn all_paths(&self) -> String {
        self.schema()
            .rules()
            .iter()
            .map(|r| r.normalized.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn classify_normalized(&self, p: &str) -> Kind<'a> {
        let schema = self.schema();
        if let Some(r) = schema.rule(p) {
            return Kind::Field(r);
        }
        if let Some(r) = schema.rule_by_blind_index(p) {
            return Kind::Index(r);
        }
        let rules = schema.rules();
        for r in rules {
            if is_inside(&r.normalized, p) || r.blind_index_path().is_some_and(|b| is_inside(&b, p))
            {
                return Kind::Parent(r);
            }
        }
        for r in rules {
            if is_inside(p, &r.normalized) || r.blind_index_path().is_some_and(|b| is_inside(p, &b))
            {
                return Kind::Inside(r);
            }
        }
        Kind::Plain
    }

    /// Classifies a path as written (positional segments removed; array indexes removed too
    /// when the path as written matches nothing).
    fn classify(&self, path: &str) -> Resolved<'a> {
        let a = normalize(path, false);
        let kind = self.classify_normalized(&a);
        if !kind.is_plain() {
            return Resolved {
                kind,
                normalized: a,
            };
        }
        let b = normalize(path, true);
        if b != a && !b.is_empty() {
            let kind = self.classify_normalized(&b);
            if !kind.is_plain() {
                return Resolved {
                    kind,
                    normalized: b,
                };
            }
        }
        Resolved {
            kind: Kind::Plain,
            normalized: a,
        }
    }

    /// The owner field (a top-level name), or a path inside it.
    fn is_owner_path(&self, path: &str) -> bool {
        self.owner_field()
            .is_some_and(|o| path == o || is_inside(path, o))
    }

    /// The owner value for binding: the scope, else an owner equality in `filter`.
    fn owner_for(&self, filter: &Document) -> Option<Bson> {
        if let Some(o) = self.scope {
            return Some(o.clone());
        }
        self.owner_field().and_then(|f| equality_in(filter, f))
    }
}
