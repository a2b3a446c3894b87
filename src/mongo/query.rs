//! Rewriting filters, updates, pipelines, sorts and projections for encrypted fields, and
//! refusing what cannot work on ciphertext — pure functions over [`bson::Document`], no I/O.
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

use bson::{doc, Bson, Document, RawBson, RawBsonRef, RawDocument, RawDocumentBuf};

use crate::blind_index::BLIND_INDEX_SUBTYPE;
use crate::envelope::ENVELOPE_SUBTYPE;
use crate::error::{Error, Result};
use crate::schema::{FieldRule, Node, Schema};
use crate::transform::{Context, Cryptor, CSFLE_SUBTYPE, MAX_DEPTH};

/// Stages that MongoDB only accepts first in a pipeline, so an owner filter cannot precede them.
const FIRST_STAGES: &[&str] = &[
    "$geoNear",
    "$search",
    "$searchMeta",
    "$vectorSearch",
    "$collStats",
    "$indexStats",
    "$changeStream",
    "$changeStreamSplitLargeEvent",
    "$documents",
    "$currentOp",
    "$listSessions",
    "$listLocalSessions",
    "$listSearchIndexes",
    "$listSampledQueries",
    "$planCacheStats",
    "$querySettings",
    "$shardedDataDistribution",
];

/// Stage parameters whose string value names a field (not a `$` expression).
const FIELD_NAME_PARAMS: &[&str] = &[
    "localField",
    "foreignField",
    "connectFromField",
    "connectToField",
    "as",
    "includeArrayIndex",
    "depthField",
    "field",
];

fn refuse(operator: impl Into<String>, field: impl Into<String>, reason: &'static str) -> Error {
    Error::UnsupportedQuery {
        operator: operator.into(),
        field: field.into(),
        reason,
    }
}

/// Why an operator cannot work on an encrypted field.
fn reason_for(op: &str) -> &'static str {
    match op {
        "$gt" | "$gte" | "$lt" | "$lte" => "ciphertexts do not preserve the order of plaintexts",
        "$regex" | "$options" => "a pattern cannot be matched against ciphertext",
        "$mod" | "$bitsAllSet" | "$bitsAllClear" | "$bitsAnySet" | "$bitsAnyClear" => {
            "arithmetic and bit tests cannot run on ciphertext"
        }
        "$type" => "encrypted values are stored as binData; the plaintext's type is hidden",
        "$size" | "$all" | "$elemMatch" => {
            "the value is encrypted as a whole; its elements cannot be inspected by the server"
        }
        "$text" | "$where" | "$jsonSchema" | "$expr" => {
            "the server would evaluate it against stored ciphertext"
        }
        "$geoWithin" | "$geoIntersects" | "$near" | "$nearSphere" => {
            "geospatial operators cannot run on ciphertext"
        }
        _ => "the operator cannot be evaluated on ciphertext",
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

/// The operator to name when refusing a condition: its first operator, or "equality".
fn first_operator(v: &Bson) -> String {
    match v {
        Bson::Document(d) if is_operator_doc(v) => d.keys().next().cloned().unwrap_or_default(),
        Bson::RegularExpression(_) => "$regex".into(),
        _ => "equality".into(),
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

/// The BSON representations MongoDB treats as equal to a number, so that a query for `30`
/// finds a stored `30i64` or `30.0` as it would in clear. Other values are their own variant.
fn numeric_variants(v: &Bson) -> Vec<Bson> {
    const TWO_53: u64 = 1 << 53;
    match *v {
        Bson::Int32(n) => vec![
            Bson::Int32(n),
            Bson::Int64(n.into()),
            Bson::Double(n.into()),
        ],
        Bson::Int64(n) => {
            let mut out = vec![Bson::Int64(n)];
            if let Ok(small) = i32::try_from(n) {
                out.push(Bson::Int32(small));
            }
            if n.unsigned_abs() <= TWO_53 {
                #[allow(clippy::cast_precision_loss)] // |n| ≤ 2^53: exact
                out.push(Bson::Double(n as f64));
            }
            out
        }
        Bson::Double(d) => {
            let mut out = vec![Bson::Double(d)];
            if d == 0.0 {
                out.push(Bson::Double(-d)); // 0.0 and -0.0 are equal to MongoDB
            }
            // 2^63 is exactly representable; the range check keeps the casts exact.
            if d.is_finite() && d.fract() == 0.0 && d.abs() < 9_223_372_036_854_775_808.0 {
                #[allow(clippy::cast_possible_truncation)] // integral and in range: exact
                let n = d as i64;
                if let Ok(small) = i32::try_from(n) {
                    out.push(Bson::Int32(small));
                }
                out.push(Bson::Int64(n));
            }
            out
        }
        _ => vec![v.clone()],
    }
}

fn binary_subtype(v: &Bson) -> Option<u8> {
    match v {
        Bson::Binary(b) => Some(u8::from(b.subtype)),
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

/// Builds a filter document from conditions that all hold together; a key met twice goes
/// into `$and` (MongoDB documents cannot repeat a key).
#[derive(Default)]
struct Conjunction {
    entries: Vec<(String, Bson)>,
}

impl Conjunction {
    fn push(&mut self, key: impl Into<String>, value: Bson) {
        self.entries.push((key.into(), value));
    }

    fn finish(self) -> Document {
        let mut doc = Document::new();
        let mut extra = Vec::new();
        for (k, v) in self.entries {
            if doc.contains_key(&k) {
                let mut one = Document::new();
                one.insert(k, v);
                extra.push(Bson::Document(one));
            } else {
                doc.insert(k, v);
            }
        }
        if !extra.is_empty() {
            let mut all = match doc.remove("$and") {
                Some(Bson::Array(a)) => a,
                Some(other) => vec![other],
                None => Vec::new(),
            };
            all.extend(extra);
            doc.insert("$and", Bson::Array(all));
        }
        doc
    }
}

/// An encrypted update value (none for an index-only field) and the blind index to write
/// next to it (its path and value).
type EncryptedAt = (Option<Bson>, Option<(String, Bson)>);

/// How keys of a filter map to document paths.
enum Base<'b> {
    /// Keys are document paths.
    Root,
    /// Keys are relative to an array's elements (`$elemMatch`, `$pull`).
    Prefix(&'b str),
    /// Keys start with an array-filter identifier (`elem.street`), bound to a path prefix.
    Idents(&'b [(String, String)]),
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

/// Rewrites queries, updates and pipelines for a collection's encrypted fields, or refuses
/// them. Pure: no I/O; the keys it needs (readable keys of the schema's aliases) must be in
/// the keyring already.
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

    // ---------------------------------------------------------------------------------------
    // Filters

    /// Rewrites a filter: equality on encrypted fields becomes ciphertext or blind-index
    /// matching, the owner filter is added for a scoped rewriter, and everything that cannot
    /// work on ciphertext is refused.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] naming the operator and the field;
    /// [`Error::MissingContext`] when a deterministic field of an owner-scoped schema is
    /// queried with no owner known; key errors.
    pub fn filter(&self, filter: &Document) -> Result<Document> {
        Ok(self.filter_touching(filter)?.0)
    }

    /// As [`QueryRewriter::filter`], also returning the first encrypted field a condition
    /// touched (for refusing collations, which ciphertext equality cannot honour).
    pub(crate) fn filter_touching(&self, filter: &Document) -> Result<(Document, Option<String>)> {
        let mut st = State {
            owner: self.owner_for(filter),
            touched: None,
        };
        let rewritten = self.filter_doc(filter, &Base::Root, &mut st)?;
        Ok((self.scoped(rewritten), st.touched))
    }

    /// The owner value for binding: the scope, else an owner equality in `filter`.
    fn owner_for(&self, filter: &Document) -> Option<Bson> {
        if let Some(o) = self.scope {
            return Some(o.clone());
        }
        self.owner_field().and_then(|f| equality_in(filter, f))
    }

    fn scoped(&self, filter: Document) -> Document {
        let (Some(owner), Some(field)) = (self.scope, self.owner_field()) else {
            return filter;
        };
        if filter.is_empty() {
            doc! { field: owner.clone() }
        } else if !filter.contains_key(field) {
            let mut scoped = doc! { field: owner.clone() };
            scoped.extend(filter);
            scoped
        } else {
            doc! { "$and": [filter, { field: owner.clone() }] }
        }
    }

    fn full_path(base: &Base<'_>, key: &str) -> Option<String> {
        match base {
            Base::Root => Some(key.to_owned()),
            Base::Prefix(p) => Some(format!("{p}.{key}")),
            Base::Idents(idents) => {
                let (ident, rest) = match key.split_once('.') {
                    Some((i, r)) => (i, Some(r)),
                    None => (key, None),
                };
                let (_, prefix) = idents.iter().find(|(i, _)| i == ident)?;
                Some(match rest {
                    Some(r) => format!("{prefix}.{r}"),
                    None => prefix.clone(),
                })
            }
        }
    }

    fn filter_doc(&self, doc: &Document, base: &Base<'_>, st: &mut State) -> Result<Document> {
        let mut out = Conjunction::default();
        for (k, v) in doc {
            if k.starts_with('$') {
                self.top_level_operator(k, v, base, st, &mut out)?;
                continue;
            }
            let Some(path) = Self::full_path(base, k) else {
                out.push(k.clone(), v.clone());
                continue;
            };
            let resolved = self.classify(&path);
            match resolved.kind {
                Kind::Plain => out.push(k.clone(), v.clone()),
                Kind::Field(rule) => {
                    st.touch(rule);
                    self.field_condition(k, rule, v, st, &mut out)?;
                }
                Kind::Index(rule) => {
                    st.touch(rule);
                    let exists_only = matches!(v, Bson::Document(d)
                        if is_operator_doc(v) && d.keys().all(|o| o == "$exists"));
                    if exists_only || binary_subtype(v) == Some(BLIND_INDEX_SUBTYPE) {
                        out.push(k.clone(), v.clone());
                    } else {
                        return Err(refuse(
                            first_operator(v),
                            rule.normalized.clone(),
                            "this is the field's blind index, maintained by fieldcrypt: query the field itself by value",
                        ));
                    }
                }
                Kind::Parent(rule) => {
                    st.touch(rule);
                    let ops = match v {
                        Bson::Document(d) if is_operator_doc(v) => d,
                        _ => {
                            return Err(refuse(
                                "equality",
                                rule.normalized.clone(),
                                "comparing a whole document or array that contains an encrypted field compares ciphertext; query the encrypted field by its full path",
                            ))
                        }
                    };
                    let rewritten = self.parent_ops(&path, rule, ops, st)?;
                    out.push(k.clone(), Bson::Document(rewritten));
                }
                Kind::Inside(rule) => return Err(refuse(
                    first_operator(v),
                    rule.normalized.clone(),
                    "the path lies inside an encrypted value, which the server cannot look into",
                )),
            }
        }
        Ok(out.finish())
    }

    fn top_level_operator(
        &self,
        k: &str,
        v: &Bson,
        base: &Base<'_>,
        st: &mut State,
        out: &mut Conjunction,
    ) -> Result<()> {
        match k {
            "$and" | "$or" | "$nor" => {
                let Bson::Array(items) = v else {
                    return Err(Error::Config(format!("{k} needs an array of filters")));
                };
                let mut rewritten = Vec::with_capacity(items.len());
                for item in items {
                    let Bson::Document(d) = item else {
                        return Err(Error::Config(format!("{k} needs an array of filters")));
                    };
                    rewritten.push(Bson::Document(self.filter_doc(d, base, st)?));
                }
                out.push(k, Bson::Array(rewritten));
            }
            "$comment" | "$alwaysTrue" | "$alwaysFalse" => out.push(k, v.clone()),
            "$expr" => {
                self.check_refs(v, "$expr")?;
                out.push(k, v.clone());
            }
            _ if !self.has_rules() => out.push(k, v.clone()),
            "$where" | "$text" | "$jsonSchema" => {
                return Err(refuse(k, self.all_paths(), reason_for(k)));
            }
            _ => {
                return Err(refuse(
                    k,
                    self.all_paths(),
                    "unknown top-level operator: fieldcrypt refuses what it cannot check",
                ))
            }
        }
        Ok(())
    }

    /// Operators on a document or array that contains encrypted fields.
    fn parent_ops(
        &self,
        path: &str,
        rule: &FieldRule,
        ops: &Document,
        st: &mut State,
    ) -> Result<Document> {
        let mut out = Document::new();
        for (op, arg) in ops {
            match (op.as_str(), arg) {
                ("$exists" | "$type" | "$size", _) => {
                    out.insert(op.clone(), arg.clone());
                }
                ("$elemMatch", Bson::Document(inner)) if !is_operator_doc(arg) || is_logical(inner) => {
                    let rewritten = self.filter_doc(inner, &Base::Prefix(path), st)?;
                    out.insert(op.clone(), rewritten);
                }
                ("$not", Bson::Document(inner)) if is_operator_doc(arg) => {
                    out.insert(op.clone(), self.parent_ops(path, rule, inner, st)?);
                }
                _ => {
                    return Err(refuse(
                        op.clone(),
                        rule.normalized.clone(),
                        "the value is a document or array containing encrypted fields; condition the encrypted field itself",
                    ))
                }
            }
        }
        Ok(out)
    }

    fn field_condition(
        &self,
        key: &str,
        rule: &FieldRule,
        v: &Bson,
        st: &State,
        out: &mut Conjunction,
    ) -> Result<()> {
        if let Bson::Document(ops) = v {
            if is_operator_doc(v) {
                for (op, arg) in ops {
                    self.field_op(key, rule, op, arg, st, out)?;
                }
                return Ok(());
            }
        }
        let (target, values) = self.equality(key, rule, v, st, "equality")?;
        out.push(target, Bson::Document(doc! { "$in": values }));
        Ok(())
    }

    fn index_target(key: &str, rule: &FieldRule) -> Option<String> {
        rule.blind_index_name().map(|n| sibling(key, &n))
    }

    /// The key and candidate values an equality on `key` (an encrypted field) compares.
    fn equality(
        &self,
        key: &str,
        rule: &FieldRule,
        value: &Bson,
        st: &State,
        op: &str,
    ) -> Result<(String, Vec<Bson>)> {
        let index = Self::index_target(key, rule);
        match (value, binary_subtype(value)) {
            (Bson::RegularExpression(_), _) => {
                return Err(refuse(
                    "$regex",
                    rule.normalized.clone(),
                    reason_for("$regex"),
                ))
            }
            // A stored ciphertext or index, given exactly (compare-and-set by re-encryption).
            (_, Some(ENVELOPE_SUBTYPE | CSFLE_SUBTYPE)) => {
                return Ok((key.to_owned(), vec![value.clone()]))
            }
            (_, Some(BLIND_INDEX_SUBTYPE)) if index.is_some() => {
                return Ok((index.unwrap_or_default(), vec![value.clone()]))
            }
            (Bson::Array(_), _) if rule.each_element => {
                return Err(refuse(
                    op,
                    rule.normalized.clone(),
                    "the elements are encrypted one by one: match one element at a time",
                ))
            }
            _ => {}
        }
        let mut values = Vec::new();
        if matches!(value, Bson::Null) {
            values.push(Bson::Null); // {f: null} also matches documents without the field
        }
        if let Some(index) = index {
            for variant in numeric_variants(value) {
                let idx = self
                    .cryptor
                    .blind_index_values(&rule.normalized, &variant)?;
                values.extend(idx.into_iter().map(Bson::Binary));
            }
            return Ok((index, values));
        }
        if !rule.field.is_deterministic() {
            return Err(refuse(
                op,
                rule.normalized.clone(),
                "randomized encryption gives different ciphertexts for equal values; use deterministic encryption or a blind index to query by value",
            ));
        }
        let owner = match self.owner_field() {
            None => None,
            Some(_) => Some(st.owner.as_ref().ok_or(Error::MissingContext(
                "deterministic ciphertexts of an owner-scoped schema are bound to the owner: query through a scoped handle or put an owner equality in the filter",
            ))?),
        };
        for variant in numeric_variants(value) {
            let cts =
                self.cryptor
                    .query_ciphertexts(&rule.normalized, &variant, self.ctx, owner)?;
            values.extend(cts.into_iter().map(Bson::Binary));
        }
        Ok((key.to_owned(), values))
    }

    fn field_op(
        &self,
        key: &str,
        rule: &FieldRule,
        op: &str,
        arg: &Bson,
        st: &State,
        out: &mut Conjunction,
    ) -> Result<()> {
        match op {
            "$eq" | "$ne" => {
                let (target, values) = self.equality(key, rule, arg, st, op)?;
                let set_op = if op == "$eq" { "$in" } else { "$nin" };
                out.push(target, Bson::Document(doc! { set_op: values }));
            }
            "$in" | "$nin" => {
                let Bson::Array(items) = arg else {
                    return Err(refuse(op, rule.normalized.clone(), "needs an array"));
                };
                let mut target: Option<String> = None;
                let mut values = Vec::new();
                for item in items {
                    let (t, vs) = self.equality(key, rule, item, st, op)?;
                    match &target {
                        Some(prev) if *prev != t => {
                            return Err(refuse(
                                op,
                                rule.normalized.clone(),
                                "mixes stored ciphertexts (or indexes) with plaintext values",
                            ))
                        }
                        _ => target = Some(t),
                    }
                    values.extend(vs);
                }
                let target = target
                    .or_else(|| Self::index_target(key, rule))
                    .unwrap_or_else(|| key.to_owned());
                out.push(target, Bson::Document(doc! { op: values }));
            }
            "$exists" => {
                // An index-only field is never stored: its index tells whether it was set.
                let target = match (&rule.field.encrypt, Self::index_target(key, rule)) {
                    (None, Some(index)) => index,
                    _ => key.to_owned(),
                };
                out.push(target, Bson::Document(doc! { "$exists": arg.clone() }));
            }
            "$not" => {
                let inner = match arg {
                    Bson::Document(d) if is_operator_doc(arg) => d,
                    Bson::RegularExpression(_) => {
                        return Err(refuse(
                            "$regex",
                            rule.normalized.clone(),
                            reason_for("$regex"),
                        ))
                    }
                    _ => {
                        return Err(refuse(
                            "$not",
                            rule.normalized.clone(),
                            "needs a document of operators",
                        ))
                    }
                };
                let mut sub = Conjunction::default();
                for (iop, iarg) in inner {
                    self.field_op(key, rule, iop, iarg, st, &mut sub)?;
                }
                let mut target: Option<String> = None;
                let mut negated = Document::new();
                for (t, cond) in sub.entries {
                    if target.as_ref().is_some_and(|prev| *prev != t) {
                        return Err(refuse(
                            "$not",
                            rule.normalized.clone(),
                            "negates conditions on both the field and its blind index",
                        ));
                    }
                    target = Some(t);
                    if let Bson::Document(c) = cond {
                        for (cop, carg) in c {
                            if negated.contains_key(&cop) {
                                return Err(refuse(
                                    "$not",
                                    rule.normalized.clone(),
                                    "negates two conditions that rewrite to the same operator",
                                ));
                            }
                            negated.insert(cop, carg);
                        }
                    }
                }
                let target = target.unwrap_or_else(|| key.to_owned());
                out.push(target, Bson::Document(doc! { "$not": negated }));
            }
            // The number of elements of a per-element array is not hidden.
            "$size" if rule.each_element => {
                out.push(key, Bson::Document(doc! { "$size": arg.clone() }));
            }
            _ => return Err(refuse(op, rule.normalized.clone(), reason_for(op))),
        }
        Ok(())
    }

    /// Refuses expressions that reference encrypted fields (`"$ssn"`, `$$ROOT`, `$getField`),
    /// and, when the schema has rules, expressions that name fields by a computed value
    /// (`$arrayToObject`, `$getField`/`$setField`/`$unsetField` with a non-constant `field`):
    /// fieldcrypt cannot tell which field they reach. `$literal` is looked into too.
    fn check_refs(&self, v: &Bson, operator: &str) -> Result<()> {
        match v {
            Bson::String(s) => self.check_ref_string(s, operator),
            Bson::Document(d) => {
                for (k, v) in d {
                    match k.as_str() {
                        "$getField" | "$setField" | "$unsetField" => {
                            self.check_field_operand(k, v, operator)?;
                        }
                        "$arrayToObject" if self.has_rules() => {
                            return Err(refuse(
                                k.clone(),
                                self.all_paths(),
                                "it builds field names from values, so fieldcrypt cannot tell which fields it writes",
                            ))
                        }
                        _ => {}
                    }
                    self.check_refs(v, operator)?;
                }
                Ok(())
            }
            Bson::Array(items) => items.iter().try_for_each(|i| self.check_refs(i, operator)),
            _ => Ok(()),
        }
    }

    /// The operand of `$getField`, `$setField` or `$unsetField`: its `field` must be a constant
    /// (a plain string, or `{$literal: "<string>"}`) naming no encrypted field, blind index or
    /// parent of one.
    fn check_field_operand(&self, op: &str, v: &Bson, operator: &str) -> Result<()> {
        if !self.has_rules() {
            return Ok(());
        }
        let name_expr = match v {
            // `{$getField: "name"}`, `{$getField: {$literal: "name"}}`: the shorthand form.
            Bson::String(_) => Some(v),
            Bson::Document(_) if is_operator_doc(v) => Some(v),
            Bson::Document(args) => args.get("field"),
            _ => None,
        };
        let name = match name_expr {
            Some(Bson::String(s)) if !s.starts_with('$') => Some(s.as_str()),
            Some(Bson::Document(d)) if d.len() == 1 => match d.get("$literal") {
                Some(Bson::String(s)) => Some(s.as_str()),
                _ => None,
            },
            _ => None,
        };
        match name {
            Some(name) => self.check_field_name(name, operator),
            None => Err(refuse(
                op,
                self.all_paths(),
                "the field name is not a constant string, so fieldcrypt cannot tell which field it reaches",
            )),
        }
    }

    fn check_ref_string(&self, s: &str, operator: &str) -> Result<()> {
        if !s.starts_with('$') || !self.has_rules() {
            return Ok(());
        }
        let path = if s == "$$ROOT" || s == "$$CURRENT" {
            return Err(refuse(
                operator,
                self.all_paths(),
                "references the whole document, which holds ciphertext",
            ));
        } else if let Some(rest) = s
            .strip_prefix("$$ROOT.")
            .or_else(|| s.strip_prefix("$$CURRENT."))
        {
            rest
        } else if s.starts_with("$$") {
            return Ok(()); // another variable: its source is checked where it is bound
        } else {
            &s[1..]
        };
        self.check_field_name(path, operator)
    }

    fn check_field_name(&self, path: &str, operator: &str) -> Result<()> {
        match self.classify(path).kind.rule() {
            None => Ok(()),
            Some(rule) => Err(refuse(
                operator,
                rule.normalized.clone(),
                "the server cannot evaluate expressions, groupings or joins over ciphertext",
            )),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Sorts and projections

    /// How `distinct` on `field` with `filter` can be answered: `None` when the field is plain
    /// (the server's answer is the answer), or the deterministic field whose distinct
    /// ciphertexts are to be decrypted, and the owner they are bound to, if any.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] (operator `distinct`) for randomized fields (every
    /// ciphertext differs), fields bound to `_id` (a distinct value has no document), blind
    /// indexes, parents of encrypted fields and paths inside them; [`Error::MissingContext`]
    /// for an owner-scoped schema with no owner known.
    pub fn distinct_field(
        &self,
        field: &str,
        filter: &Document,
    ) -> Result<Option<(&'a FieldRule, Option<Bson>)>> {
        if field.split('.').any(is_positional) {
            return Err(refuse(
                "distinct",
                field,
                "name the array field itself: distinct lists its elements",
            ));
        }
        let resolved = self.classify(field);
        let rule = match resolved.kind {
            Kind::Plain => return Ok(None),
            Kind::Field(r) => r,
            Kind::Index(r) | Kind::Parent(r) | Kind::Inside(r) => {
                return Err(refuse(
                    "distinct",
                    r.normalized.clone(),
                    "distinct values of a blind index, or of a document holding ciphertext, are not plaintext values",
                ))
            }
        };
        match &rule.field.encrypt {
            Some(e) if e.suite.is_deterministic() => {}
            _ => {
                return Err(refuse(
                    "distinct",
                    rule.normalized.clone(),
                    "only deterministic fields have one ciphertext per value",
                ))
            }
        }
        if rule.field.bind_id {
            return Err(refuse(
                "distinct",
                rule.normalized.clone(),
                "values bound to their document's _id cannot be decrypted without it",
            ));
        }
        let owner = self.owner_for(filter);
        if self.owner_field().is_some() && owner.is_none() {
            return Err(Error::MissingContext(
                "deterministic ciphertexts of an owner-scoped schema are bound to the owner: ask through a scoped handle or put an owner equality in the filter",
            ));
        }
        Ok(Some((rule, owner)))
    }

    /// Checks a sort specification: sorting by an encrypted field (or a document containing
    /// one) is refused.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] with operator `sort`.
    pub fn sort(&self, sort: &Document) -> Result<()> {
        for (k, v) in sort {
            if matches!(v, Bson::Document(_)) {
                continue; // {$meta: ...}
            }
            if let Some(rule) = self.classify(k).kind.rule() {
                return Err(refuse(
                    "sort",
                    rule.normalized.clone(),
                    "ciphertexts do not preserve the order of plaintexts",
                ));
            }
        }
        Ok(())
    }

    /// Checks an index-bounds document (`min`/`max` options): bounds on encrypted fields are
    /// refused.
    pub(crate) fn bounds(&self, bounds: &Document, operator: &str) -> Result<()> {
        for k in bounds.keys() {
            if let Some(rule) = self.classify(k).kind.rule() {
                return Err(refuse(
                    operator,
                    rule.normalized.clone(),
                    "index bounds compare plaintext order",
                ));
            }
        }
        Ok(())
    }

    /// Checks a projection and adds what decryption needs: the owner field, for an inclusion
    /// projection of an owner-scoped schema. Including or excluding encrypted fields is fine;
    /// expressions over them are refused.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] with operator `projection`.
    pub fn projection(&self, projection: &Document) -> Result<Document> {
        self.projection_as(projection, "projection")
    }

    fn projection_as(&self, projection: &Document, operator: &str) -> Result<Document> {
        let mut inclusion = false;
        let mut excludes_id = false;
        let mut excludes_owner = false;
        // Normalized paths switched on and off, to see what `_id`-bound fields come back.
        let mut on_paths: Vec<String> = Vec::new();
        let mut off_paths: Vec<String> = Vec::new();
        for (k, v) in projection {
            let flag = is_flag(v);
            if k == "_id" {
                match flag {
                    Some(false) => excludes_id = true,
                    Some(true) => {}
                    None => self.check_refs(v, operator)?,
                }
                continue;
            }
            let resolved = self.classify(k);
            match flag {
                Some(true) => on_paths.push(resolved.normalized.clone()),
                Some(false) => off_paths.push(resolved.normalized.clone()),
                None => {}
            }
            match (resolved.kind, flag) {
                (Kind::Plain, Some(on)) => {
                    inclusion |= on;
                    excludes_owner |= !on && self.is_owner_path(k);
                }
                (Kind::Plain, None) => {
                    self.check_refs(v, operator)?;
                    inclusion = true;
                }
                (Kind::Field(_) | Kind::Parent(_) | Kind::Index(_), Some(on)) => inclusion |= on,
                (Kind::Field(rule), None)
                    if rule.each_element
                        && matches!(v, Bson::Document(d) if d.len() == 1 && d.contains_key("$slice")) =>
                {
                    on_paths.push(resolved.normalized.clone());
                }
                (kind, _) => {
                    let rule = kind
                        .rule()
                        .map(|r| r.normalized.clone())
                        .unwrap_or_default();
                    let reason = if matches!(kind, Kind::Inside(_)) {
                        "the path lies inside an encrypted value, which the server cannot look into"
                    } else {
                        "projection expressions cannot evaluate ciphertext"
                    };
                    return Err(refuse(operator, rule, reason));
                }
            }
        }
        let mut out = projection.clone();
        if !self.has_rules() {
            return Ok(out);
        }
        if let Some(owner) = self.owner_field() {
            if excludes_owner {
                return Err(refuse(
                    operator,
                    owner,
                    "the owner value is needed to decrypt the document's fields",
                ));
            }
            if inclusion && !out.contains_key(owner) {
                out.insert(owner, 1);
            }
        }
        if excludes_id {
            let covers = |paths: &[String], r: &FieldRule| {
                paths
                    .iter()
                    .any(|p| *p == r.normalized || is_inside(&r.normalized, p))
            };
            let returned = self.schema().rules().iter().find(|r| {
                r.field.bind_id
                    && if inclusion {
                        covers(&on_paths, r)
                    } else {
                        !covers(&off_paths, r)
                    }
            });
            if let Some(rule) = returned {
                return Err(refuse(
                    operator,
                    rule.normalized.clone(),
                    "the field is bound to _id, which the projection removes; it could not be decrypted",
                ));
            }
        }
        Ok(out)
    }

    // ---------------------------------------------------------------------------------------
    // Pipelines

    /// Rewrites an aggregation pipeline: `$match` stages like filters, the owner `$match`
    /// first for a scoped rewriter; stages that would evaluate, group, sort, join or write
    /// encrypted fields are refused. Also returns the first encrypted field a `$match`
    /// compares (a collation must then be refused).
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] naming the stage or operator and the field.
    pub fn pipeline(&self, pipeline: &[Document]) -> Result<(Vec<Document>, Option<String>)> {
        let mut out = Vec::with_capacity(pipeline.len() + 1);
        if let (Some(owner), Some(field)) = (self.scope, self.owner_field()) {
            if let Some(first) = pipeline.first().and_then(|s| s.keys().next()) {
                if FIRST_STAGES.contains(&first.as_str()) {
                    return Err(refuse(
                        first.clone(),
                        field,
                        "the stage must come first, so the owner filter cannot be put before it",
                    ));
                }
            }
            out.push(doc! { "$match": { field: owner.clone() } });
        }
        let mut touched = None;
        self.stages(pipeline, &mut out, &mut touched)?;
        Ok((out, touched))
    }

    fn stages(
        &self,
        stages: &[Document],
        out: &mut Vec<Document>,
        touched: &mut Option<String>,
    ) -> Result<()> {
        for stage in stages {
            let mut it = stage.iter();
            let (Some((name, body)), None) = (it.next(), it.next()) else {
                return Err(Error::Config(
                    "a pipeline stage must be a document with exactly one field".into(),
                ));
            };
            let body = match name.as_str() {
                "$match" => {
                    let Bson::Document(f) = body else {
                        return Err(Error::Config("$match needs a filter document".into()));
                    };
                    let mut st = State {
                        owner: self.owner_for(f),
                        touched: None,
                    };
                    let rewritten = self.filter_doc(f, &Base::Root, &mut st)?;
                    if touched.is_none() {
                        *touched = st.touched;
                    }
                    Bson::Document(rewritten)
                }
                "$sort" => {
                    if let Bson::Document(s) = body {
                        self.sort(s)?;
                    }
                    body.clone()
                }
                "$limit" | "$skip" | "$sample" => body.clone(),
                "$count" => {
                    if let Bson::String(n) = body {
                        self.check_output_name(n, name)?;
                    }
                    body.clone()
                }
                "$project" => match body {
                    Bson::Document(p) => Bson::Document(self.projection_as(p, name)?),
                    other => other.clone(),
                },
                "$unset" => body.clone(),
                "$unwind" => {
                    self.unwind(body)?;
                    body.clone()
                }
                "$facet" => {
                    let Bson::Document(facets) = body else {
                        return Err(Error::Config("$facet needs a document".into()));
                    };
                    let mut rewritten = Document::new();
                    for (k, sub) in facets {
                        self.check_output_name(k, name)?;
                        let Bson::Array(sub) = sub else {
                            return Err(Error::Config("$facet needs pipelines".into()));
                        };
                        let sub: Vec<Document> = sub
                            .iter()
                            .map(|s| match s {
                                Bson::Document(d) => Ok(d.clone()),
                                _ => Err(Error::Config("$facet needs pipelines".into())),
                            })
                            .collect::<Result<_>>()?;
                        let mut sub_out = Vec::with_capacity(sub.len());
                        self.stages(&sub, &mut sub_out, touched)?;
                        rewritten.insert(
                            k.clone(),
                            sub_out.into_iter().map(Bson::Document).collect::<Vec<_>>(),
                        );
                    }
                    Bson::Document(rewritten)
                }
                "$out" | "$merge" if self.has_rules() => {
                    return Err(refuse(
                        name.clone(),
                        self.all_paths(),
                        "ciphertexts are bound to this collection; written elsewhere they could not be decrypted",
                    ))
                }
                "$lookup" | "$graphLookup" | "$unionWith" if self.scope.is_some() => {
                    return Err(refuse(
                        name.clone(),
                        self.owner_field().unwrap_or_default(),
                        "the stage reads documents without the owner filter of this scoped handle",
                    ))
                }
                _ => {
                    self.generic_stage(name, body)?;
                    body.clone()
                }
            };
            let mut rewritten = Document::new();
            rewritten.insert(name.clone(), body);
            out.push(rewritten);
        }
        Ok(())
    }

    fn check_output_name(&self, name: &str, operator: &str) -> Result<()> {
        match self.classify(name).kind.rule() {
            None => Ok(()),
            Some(rule) => Err(refuse(
                operator,
                rule.normalized.clone(),
                "the stage writes a field where fieldcrypt expects an encrypted one",
            )),
        }
    }

    fn unwind(&self, body: &Bson) -> Result<()> {
        let (path, index) = match body {
            Bson::String(p) => (p.as_str(), None),
            Bson::Document(d) => (
                d.get_str("path").unwrap_or_default(),
                d.get_str("includeArrayIndex").ok(),
            ),
            _ => return Ok(()),
        };
        if let Some(i) = index {
            self.check_output_name(i, "$unwind")?;
        }
        let path = path.strip_prefix('$').unwrap_or(path);
        match self.classify(path).kind {
            Kind::Plain | Kind::Parent(_) => Ok(()),
            Kind::Field(r) if r.each_element => Ok(()),
            Kind::Field(r) | Kind::Index(r) | Kind::Inside(r) => Err(refuse(
                "$unwind",
                r.normalized.clone(),
                "the value is encrypted as a whole; its elements cannot be inspected by the server",
            )),
        }
    }

    /// Any stage without a specific rule: no key, field-name parameter or `$` reference may
    /// name an encrypted field (or a document containing one).
    fn generic_stage(&self, name: &str, body: &Bson) -> Result<()> {
        self.check_refs(body, name)?;
        self.check_keys(body, name)
    }

    fn check_keys(&self, v: &Bson, operator: &str) -> Result<()> {
        match v {
            Bson::Document(d) => {
                for (k, v) in d {
                    // Names inside `$literal` are checked too: `{$literal: {ssn: "…"}}` is a
                    // document with an `ssn` field wherever it lands.
                    if !k.starts_with('$') {
                        if let Some(rule) = self.classify(k).kind.rule() {
                            return Err(refuse(
                                operator,
                                rule.normalized.clone(),
                                "the stage names an encrypted field, which the server can only see as ciphertext",
                            ));
                        }
                    }
                    if let (true, Bson::String(s)) = (FIELD_NAME_PARAMS.contains(&k.as_str()), v) {
                        self.check_field_name(s.strip_prefix('$').unwrap_or(s), operator)?;
                    }
                    self.check_keys(v, operator)?;
                }
                Ok(())
            }
            Bson::Array(items) => items.iter().try_for_each(|i| self.check_keys(i, operator)),
            _ => Ok(()),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Updates

    /// Rewrites an update document (operators): values written to encrypted fields are
    /// encrypted (with their blind indexes alongside), `$unset` removes indexes too, and
    /// operators that cannot work on ciphertext are refused. `filter` is the update's filter
    /// as the caller wrote it: an `_id` equality there is needed for `_id`-bound fields, and
    /// an owner equality there binds the owner when the rewriter is not scoped.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`]; [`Error::MissingContext`] when the owner is unknown;
    /// [`Error::Config`] for a replacement document (use `replace_one`); key errors.
    pub fn update(&self, update: &Document, filter: &Document) -> Result<Document> {
        let id = equality_in(filter, "_id");
        let owner = self.owner_for(filter);
        let mut out = Document::new();
        for (op, fields) in update {
            if !op.starts_with('$') {
                return Err(Error::Config(
                    "an update document must consist of update operators; use replace_one to replace a document".into(),
                ));
            }
            let Bson::Document(fields) = fields else {
                return Err(Error::Config(format!("{op} needs a document")));
            };
            let mut rewritten: Vec<(String, Bson)> = Vec::with_capacity(fields.len());
            for (path, value) in fields {
                self.update_field(op, path, value, id.as_ref(), owner.as_ref(), &mut rewritten)?;
            }
            let target = match out.get_mut(op) {
                Some(Bson::Document(d)) => d,
                _ => {
                    out.insert(op.clone(), Document::new());
                    match out.get_mut(op) {
                        Some(Bson::Document(d)) => d,
                        _ => return Err(Error::Config("update rewriting failed".into())),
                    }
                }
            };
            for (k, v) in rewritten {
                target.insert(k, v);
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_lines)] // one match over the update operators reads best whole
    fn update_field(
        &self,
        op: &str,
        path: &str,
        value: &Bson,
        id: Option<&Bson>,
        owner: Option<&Bson>,
        out: &mut Vec<(String, Bson)>,
    ) -> Result<()> {
        if self.is_owner_path(path) {
            let same = owner.is_some_and(|o| o == value);
            if !(op == "$setOnInsert" && same) {
                return Err(refuse(
                    op,
                    path,
                    "the owner value is bound into every ciphertext of the document; changing it would make them undecryptable",
                ));
            }
            out.push((path.to_owned(), value.clone()));
            return Ok(());
        }
        if op == "$rename" {
            let to = value.as_str().unwrap_or_default();
            for p in [path, to] {
                if self.is_owner_path(p) {
                    return Err(refuse(
                        op,
                        p,
                        "the owner value is bound into every ciphertext",
                    ));
                }
                if let Some(rule) = self.classify(p).kind.rule() {
                    return Err(refuse(
                        op,
                        rule.normalized.clone(),
                        "ciphertexts are bound to their field path; renaming would make them undecryptable (or store plaintext in an encrypted field)",
                    ));
                }
            }
            out.push((path.to_owned(), value.clone()));
            return Ok(());
        }
        let resolved = self.classify(path);
        let normalized = resolved.normalized.as_str();
        match (op, resolved.kind) {
            (_, Kind::Plain) => out.push((path.to_owned(), value.clone())),
            (_, Kind::Inside(rule)) => {
                return Err(refuse(
                    op,
                    rule.normalized.clone(),
                    "the path lies inside an encrypted value: write the whole field",
                ))
            }
            (_, Kind::Index(rule)) => {
                return Err(refuse(
                    op,
                    rule.normalized.clone(),
                    "blind indexes are maintained by fieldcrypt: write the field itself",
                ))
            }
            ("$set" | "$setOnInsert", Kind::Field(_) | Kind::Parent(_)) => {
                let (v, index) = self.encrypt_at(op, path, normalized, value.clone(), id, owner)?;
                if let Some(v) = v {
                    out.push((path.to_owned(), v));
                }
                out.extend(index);
            }
            ("$unset", Kind::Field(rule)) => {
                out.push((path.to_owned(), Bson::String(String::new())));
                if let Some(index) = Self::index_target(path, rule) {
                    out.push((index, Bson::String(String::new())));
                }
            }
            ("$unset", Kind::Parent(_)) => out.push((path.to_owned(), value.clone())),
            ("$push" | "$addToSet", kind @ (Kind::Field(_) | Kind::Parent(_))) => {
                let v = self.push_value(op, path, normalized, kind, value, id, owner)?;
                out.push((path.to_owned(), v));
            }
            ("$pull", Kind::Field(rule)) if rule.each_element => {
                let st = State {
                    owner: owner.cloned(),
                    touched: None,
                };
                let mut sub = Conjunction::default();
                self.field_condition(path, rule, value, &st, &mut sub)?;
                let mut cond = Document::new();
                for (t, c) in sub.entries {
                    if t != path {
                        return Err(refuse(op, rule.normalized.clone(), "cannot be rewritten"));
                    }
                    if let Bson::Document(c) = c {
                        for (k, v) in c {
                            if k != "$in" || cond.contains_key(&k) {
                                return Err(refuse(
                                    op,
                                    rule.normalized.clone(),
                                    "only equality and $in can remove encrypted elements",
                                ));
                            }
                            cond.insert(k, v);
                        }
                    }
                }
                out.push((path.to_owned(), Bson::Document(cond)));
            }
            ("$pull", Kind::Parent(rule)) => {
                let cond = match value {
                    Bson::Document(d) if !is_operator_doc(value) || is_logical(d) => d,
                    _ => {
                        return Err(refuse(
                            op,
                            rule.normalized.clone(),
                            "elements containing encrypted fields can only be removed by a condition on their fields",
                        ))
                    }
                };
                let mut st = State {
                    owner: owner.cloned(),
                    touched: None,
                };
                let rewritten = self.filter_doc(cond, &Base::Prefix(path), &mut st)?;
                out.push((path.to_owned(), Bson::Document(rewritten)));
            }
            ("$pop", Kind::Parent(_)) => out.push((path.to_owned(), value.clone())),
            ("$pop", Kind::Field(rule)) if rule.each_element => {
                out.push((path.to_owned(), value.clone()));
            }
            (_, Kind::Field(rule) | Kind::Parent(rule)) => {
                let reason = match op {
                    "$inc" | "$mul" | "$min" | "$max" | "$bit" => {
                        "arithmetic and comparisons cannot run on ciphertext"
                    }
                    "$currentDate" => "the server would store a plaintext date in an encrypted field",
                    "$push" | "$addToSet" | "$pull" | "$pullAll" | "$pop" => {
                        "the array is encrypted as one value; declare the field with `.$[]` to encrypt elements one by one"
                    }
                    _ => "the operator cannot be applied to ciphertext",
                };
                return Err(refuse(op, rule.normalized.clone(), reason));
            }
        }
        Ok(())
    }

    /// Rules at or under `normalized`.
    fn rules_under<'s>(&'s self, normalized: &'s str) -> impl Iterator<Item = &'a FieldRule> + 's {
        self.schema()
            .rules()
            .iter()
            .filter(move |r| r.normalized == normalized || is_inside(&r.normalized, normalized))
    }

    /// Encrypts `value` as it would be stored at `normalized`, through the document engine (so
    /// bindings are identical to whole-document encryption). Returns the value to write at
    /// `path` (none for an index-only field) and the blind index to write next to it.
    fn encrypt_at(
        &self,
        op: &str,
        path: &str,
        normalized: &str,
        value: Bson,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<EncryptedAt> {
        if id.is_none() {
            if let Some(rule) = self.rules_under(normalized).find(|r| r.field.bind_id) {
                return Err(refuse(
                    op,
                    rule.normalized.clone(),
                    "the field is bound to _id: update one document selected by an _id equality",
                ));
            }
        }
        let binds_owner = self.owner_field().is_some()
            && self
                .rules_under(normalized)
                .any(|r| r.field.encrypt.is_some());
        if binds_owner && owner.is_none() {
            return Err(Error::MissingContext(
                "ciphertexts of an owner-scoped schema are bound to the owner: write through a scoped handle or put an owner equality in the filter",
            ));
        }
        let segs: Vec<&str> = normalized.split('.').collect();
        let mut doc = Document::new();
        if let Some(id) = id {
            doc.insert("_id", id.clone());
        }
        if let (Some(field), Some(owner)) = (self.owner_field(), owner) {
            doc.insert(field, owner.clone());
        }
        let mut nested = value;
        for seg in segs[1..].iter().rev() {
            let mut d = Document::new();
            d.insert(*seg, nested);
            nested = Bson::Document(d);
        }
        doc.insert(segs[0], nested);
        let raw = RawDocumentBuf::from_document(&doc)?;
        self.check_literal_dots(&raw, self.schema().tree(), "")?;
        let encrypted = self.cryptor.encrypt_raw(&raw, self.ctx)?.to_document()?;
        let mut parent = &encrypted;
        for seg in &segs[..segs.len() - 1] {
            parent = parent
                .get_document(seg)
                .map_err(|_| Error::MalformedBson("encrypted update value vanished".into()))?;
        }
        let leaf = segs[segs.len() - 1];
        let index = match self.schema().rule(normalized) {
            Some(rule) => match rule.blind_index_name() {
                Some(name) => parent
                    .get(&name)
                    .map(|ix| (sibling(path, &name), ix.clone())),
                None => None,
            },
            None => None,
        };
        Ok((parent.get(leaf).cloned(), index))
    }

    #[allow(clippy::too_many_arguments)] // the update context, passed down unchanged
    fn push_value(
        &self,
        op: &str,
        path: &str,
        normalized: &str,
        kind: Kind<'_>,
        value: &Bson,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<Bson> {
        let rule_path = kind
            .rule()
            .map(|r| r.normalized.clone())
            .unwrap_or_default();
        match kind {
            Kind::Field(rule) if !rule.each_element => {
                return Err(refuse(
                    op,
                    rule_path,
                    "the array is encrypted as one value; declare the field with `.$[]` to encrypt elements one by one",
                ))
            }
            _ => {}
        }
        if op == "$addToSet"
            && self
                .rules_under(normalized)
                .any(|r| r.field.encrypt.is_some() && !r.field.is_deterministic())
        {
            return Err(refuse(
                op,
                rule_path,
                "randomized ciphertexts of equal values differ, so the server cannot see duplicates; use $push, or deterministic encryption",
            ));
        }
        let (elements, modifiers) = match value {
            Bson::Document(d) if d.contains_key("$each") => {
                let Ok(each) = d.get_array("$each") else {
                    return Err(refuse(op, rule_path, "$each needs an array"));
                };
                let mut mods = d.clone();
                mods.remove("$each");
                (each.clone(), Some(mods))
            }
            other => (vec![other.clone()], None),
        };
        if let Some(sort) = modifiers.as_ref().and_then(|m| m.get("$sort")) {
            let by_encrypted = match (kind, sort) {
                (Kind::Parent(_), Bson::Document(keys)) => keys
                    .keys()
                    .any(|k| !self.classify(&format!("{normalized}.{k}")).kind.is_plain()),
                _ => true,
            };
            if by_encrypted {
                return Err(refuse(
                    "$sort",
                    rule_path,
                    "ciphertexts do not preserve the order of plaintexts",
                ));
            }
        }
        let (encrypted, _) =
            self.encrypt_at(op, path, normalized, Bson::Array(elements), id, owner)?;
        let Some(Bson::Array(encrypted)) = encrypted else {
            return Err(Error::MalformedBson("encrypted elements vanished".into()));
        };
        Ok(match modifiers {
            Some(mut mods) => {
                let mut d = doc! { "$each": encrypted };
                d.extend(std::mem::take(&mut mods));
                Bson::Document(d)
            }
            None => encrypted.into_iter().next().unwrap_or(Bson::Null),
        })
    }

    /// Rewrites the `arrayFilters` of an update: conditions on an identifier bound (in
    /// `update`'s paths, `$[id]`) to an encrypted field are rewritten like filters.
    ///
    /// # Errors
    /// As [`QueryRewriter::filter`].
    pub fn array_filters(
        &self,
        filters: &[Document],
        update: &Document,
        filter: &Document,
    ) -> Result<Vec<Document>> {
        let mut idents: Vec<(String, String)> = Vec::new();
        for fields in update.values() {
            let Bson::Document(fields) = fields else {
                continue;
            };
            for path in fields.keys() {
                let segs: Vec<&str> = path.split('.').collect();
                for (i, seg) in segs.iter().enumerate() {
                    if let Some(ident) = seg.strip_prefix("$[").and_then(|s| s.strip_suffix(']')) {
                        if !ident.is_empty() && !idents.iter().any(|(i2, _)| i2 == ident) {
                            idents.push((ident.to_owned(), segs[..i].join(".")));
                        }
                    }
                }
            }
        }
        let mut st = State {
            owner: self.owner_for(filter),
            touched: None,
        };
        filters
            .iter()
            .map(|f| self.filter_doc(f, &Base::Idents(&idents), &mut st))
            .collect()
    }

    /// Checks an update pipeline (an array of stages): it may not touch encrypted fields or
    /// the owner field at all, since its values are expressions fieldcrypt cannot encrypt.
    ///
    /// When the schema has rules or an owner field: `$replaceWith`/`$replaceRoot` are refused
    /// (the new document could hold any field, in clear, and any owner); `$unset` may not name
    /// an encrypted field, a blind index, a parent of either, or the owner field; `$project` may
    /// not drop the owner field; `$set`/`$addFields` may not name any of them, not even inside
    /// `$literal`, nor build names from values; other stages are refused.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`]; [`Error::Config`] for a malformed stage.
    pub fn update_pipeline(&self, pipeline: &[Document]) -> Result<()> {
        let guarded = self.has_rules() || self.owner_field().is_some();
        for stage in pipeline {
            let mut it = stage.iter();
            let (Some((name, body)), None) = (it.next(), it.next()) else {
                return Err(Error::Config(
                    "a pipeline stage must be a document with exactly one field".into(),
                ));
            };
            if !guarded {
                continue;
            }
            match name.as_str() {
                "$set" | "$addFields" => {
                    self.generic_stage(name, body)?;
                    if let Bson::Document(d) = body {
                        if let Some(k) = d.keys().find(|k| self.is_owner_path(k)) {
                            return Err(self.refuse_owner(name, k));
                        }
                    }
                }
                "$project" => {
                    self.generic_stage(name, body)?;
                    if let Bson::Document(d) = body {
                        self.update_projection(name, d)?;
                    }
                }
                "$unset" => self.unset_stage(name, body)?,
                "$replaceWith" | "$replaceRoot" => {
                    return Err(refuse(
                        name.clone(),
                        self.guarded_paths(),
                        "the replacement document could put plaintext into encrypted fields or change the owner; use replace_one, which encrypts it",
                    ))
                }
                _ => {
                    return Err(refuse(
                        name.clone(),
                        self.guarded_paths(),
                        "not an update-pipeline stage fieldcrypt can check",
                    ))
                }
            }
        }
        Ok(())
    }

    /// What a refusal concerning the whole document names: every encrypted path, else the
    /// owner field.
    fn guarded_paths(&self) -> String {
        if self.has_rules() {
            self.all_paths()
        } else {
            self.owner_field().unwrap_or_default().to_owned()
        }
    }

    fn refuse_owner(&self, operator: &str, path: &str) -> Error {
        refuse(
            operator,
            self.owner_field().unwrap_or(path),
            "the owner value is bound into every ciphertext of the document",
        )
    }

    /// A `$project` stage of an update pipeline may not drop or compute the owner field (an
    /// inclusion projection without it drops it).
    fn update_projection(&self, name: &str, body: &Document) -> Result<()> {
        let Some(owner) = self.owner_field() else {
            return Ok(());
        };
        let mut inclusion = false;
        let mut keeps_owner = false;
        for (k, v) in body {
            let flag = is_flag(v);
            if self.is_owner_path(k) {
                if k != owner || flag != Some(true) {
                    return Err(self.refuse_owner(name, k));
                }
                keeps_owner = true;
            }
            if k != "_id" && flag != Some(false) {
                inclusion = true;
            }
        }
        if inclusion && !keeps_owner {
            return Err(self.refuse_owner(name, owner));
        }
        Ok(())
    }

    /// `$unset` in an update pipeline (a name or an array of names).
    fn unset_stage(&self, name: &str, body: &Bson) -> Result<()> {
        let names: Vec<&Bson> = match body {
            Bson::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for n in names {
            let Bson::String(path) = n else {
                return Err(Error::Config(format!(
                    "{name} needs a field name or an array of field names"
                )));
            };
            if self.is_owner_path(path) {
                return Err(self.refuse_owner(name, path));
            }
            if let Some(rule) = self.classify(path).kind.rule() {
                return Err(refuse(
                    name,
                    rule.normalized.clone(),
                    "an update pipeline cannot remove an encrypted field, its blind index or a document containing them; use an update document with $unset, which removes the field and its index together",
                ));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Whole documents

    /// Prepares a document for insertion: binds it to the scope's owner (adding the owner
    /// field, or refusing a different owner) and encrypts it.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] for another owner's document; encryption errors.
    pub fn document(&self, doc: &RawDocument) -> Result<RawDocumentBuf> {
        self.check_literal_dots(doc, self.schema().tree(), "")?;
        match self.bind_owner(doc)? {
            Some(bound) => self.cryptor.encrypt_raw(&bound, self.ctx),
            None => self.cryptor.encrypt_raw(doc, self.ctx),
        }
    }

    /// Prepares a replacement document: as [`QueryRewriter::document`], and with `_id`-bound
    /// fields it takes the `_id` from `filter` when the replacement has none.
    ///
    /// # Errors
    /// As [`QueryRewriter::document`]; [`Error::UnsupportedQuery`] when `_id`-bound fields
    /// cannot know their `_id`.
    pub fn replacement(&self, doc: &RawDocument, filter: &Document) -> Result<RawDocumentBuf> {
        self.check_literal_dots(doc, self.schema().tree(), "")?;
        let bound = self.bind_owner(doc)?;
        let doc = bound.as_deref().unwrap_or(doc);
        if self.schema().needs_id() && doc.get("_id")?.is_none() {
            let Some(id) = equality_in(filter, "_id") else {
                let rule = self
                    .schema()
                    .rules()
                    .iter()
                    .find(|r| r.field.bind_id)
                    .map(|r| r.normalized.clone())
                    .unwrap_or_default();
                return Err(refuse(
                    "replace",
                    rule,
                    "the field is bound to _id: give the replacement an _id or select the document by _id",
                ));
            };
            let mut with_id = RawDocumentBuf::new();
            with_id.append("_id", RawBson::try_from(id).map_err(Error::bson)?);
            for e in doc {
                let (k, v) = e?;
                with_id.append(k, v.to_raw_bson());
            }
            return self.cryptor.encrypt_raw(&with_id, self.ctx);
        }
        self.cryptor.encrypt_raw(doc, self.ctx)
    }

    /// Refuses field names containing `.` at a level that holds encrypted fields
    /// (`{"profile.email": …}`, or `{"profile.city": …}` next to an encrypted `profile.email`):
    /// MongoDB stores such a name literally, outside the nested path the engine encrypts, so
    /// the value could be stored in clear. The engine refuses the same names
    /// ([`Error::Schema`] from [`Cryptor::encrypt_raw`]); this check runs first so that the
    /// collection layer reports them like its other refusals, naming the field. Only levels
    /// that can contain encrypted fields are walked, through arrays at any depth.
    fn check_literal_dots(&self, doc: &RawDocument, node: &Node, prefix: &str) -> Result<()> {
        self.dots_at(doc, node, prefix, 0)
    }

    fn dots_at(&self, doc: &RawDocument, node: &Node, prefix: &str, depth: u32) -> Result<()> {
        for e in doc {
            let (k, v) = e?;
            let path = if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            };
            if let Some((first, _)) = k.split_once('.') {
                let field = match self.classify_normalized(&path).rule() {
                    Some(rule) => rule.normalized.clone(),
                    None if node.child(first).is_some() => path,
                    None => continue,
                };
                return Err(refuse(
                    "write",
                    field,
                    "a field name containing '.' is stored as that literal name, outside the encrypted path; write nested documents",
                ));
            }
            let Some(child) = node.child(k) else {
                continue;
            };
            if child.rule.is_some() {
                continue;
            }
            self.dots_in(v, child, &path, depth + 1)?;
        }
        Ok(())
    }

    /// [`QueryRewriter::check_literal_dots`] for a value at `path`: a document, or the documents
    /// of an array (arrays of arrays included), refusing nesting deeper than the engine does.
    fn dots_in(&self, v: RawBsonRef<'_>, node: &Node, path: &str, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::MalformedBson(format!(
                "documents nested deeper than {MAX_DEPTH} levels"
            )));
        }
        match v {
            RawBsonRef::Document(d) => self.dots_at(d, node, path, depth),
            RawBsonRef::Array(items) => {
                for item in items {
                    self.dots_in(item?, node, path, depth + 1)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The document with the scope's owner added; `None` when nothing needs adding.
    fn bind_owner(&self, doc: &RawDocument) -> Result<Option<RawDocumentBuf>> {
        let (Some(owner), Some(field)) = (self.scope, self.owner_field()) else {
            return Ok(None);
        };
        let owner = RawBson::try_from(owner.clone()).map_err(Error::bson)?;
        match doc.get(field)? {
            Some(v) if v == owner.as_raw_bson_ref() => Ok(None),
            Some(_) => Err(refuse(
                "write",
                field,
                "the document belongs to another owner than this scoped handle",
            )),
            None => {
                let mut bound = doc.to_raw_document_buf();
                bound.append(field, owner);
                Ok(Some(bound))
            }
        }
    }
}

/// A query document made of logical operators only (`{$or: [...]}`), as `$elemMatch` and
/// `$pull` accept on documents.
fn is_logical(d: &Document) -> bool {
    d.keys()
        .all(|k| matches!(k.as_str(), "$and" | "$or" | "$nor"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::InMemoryKeyring;
    use crate::schema::{BlindIndex, Field};
    use bson::spec::BinarySubtype;
    use std::sync::Arc;

    fn is_envelope(v: &Bson) -> bool {
        matches!(v, Bson::Binary(b) if b.subtype == BinarySubtype::from(ENVELOPE_SUBTYPE))
    }

    struct Fixture {
        cryptor: Cryptor,
        ctx: Context,
        ring: Arc<InMemoryKeyring>,
    }

    fn fixture(owner: bool) -> Fixture {
        let ring = Arc::new(InMemoryKeyring::new());
        for a in ["pii", "det", "idx"] {
            ring.generate(a);
        }
        let mut b = Schema::builder()
            .field("ssn", Field::randomized("pii").bind_id())
            .field("email", Field::deterministic("det"))
            .field("profile.phone", Field::deterministic("det"))
            .field(
                "name",
                Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
            )
            .field("token", Field::blind_index_only(BlindIndex::new("idx")))
            .field("tags.$[]", Field::deterministic("det"))
            .field("notes.$[]", Field::randomized("pii"))
            .field("addresses.street", Field::deterministic("det"));
        if owner {
            b = b.owner_field("tenant");
        }
        let schema = b.build().unwrap();
        let keyring: Arc<dyn crate::keyring::Keyring> = ring.clone();
        let mut ctx = Context::namespace("db.c");
        if owner {
            ctx = ctx.with_owner_field("tenant");
        }
        Fixture {
            cryptor: Cryptor::with_shared(keyring, Arc::new(schema)),
            ctx,
            ring,
        }
    }

    fn refused(r: Result<impl std::fmt::Debug>) -> (String, String) {
        match r {
            Err(Error::UnsupportedQuery {
                operator, field, ..
            }) => (operator, field),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn in_list(d: &Document, key: &str, op: &str) -> Vec<Bson> {
        d.get_document(key)
            .unwrap_or_else(|_| panic!("{key} missing in {d}"))
            .get_array(op)
            .unwrap()
            .clone()
    }

    #[test]
    fn deterministic_equality_becomes_in_of_ciphertexts_under_every_readable_key() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q.filter(&doc! { "email": "a@x" }).unwrap();
        let cts = in_list(&out, "email", "$in");
        assert_eq!(cts.len(), 1);
        assert!(is_envelope(&cts[0]));
        // The same value encrypts the same way: a stored document would match.
        let stored = f
            .cryptor
            .encrypt_document(&doc! { "email": "a@x" }, &f.ctx)
            .unwrap();
        assert_eq!(stored.get("email"), Some(&cts[0]));
        // After a rotation both keys are candidates, new primary first.
        f.ring.rotate("det");
        let out = q.filter(&doc! { "email": { "$eq": "a@x" } }).unwrap();
        let cts2 = in_list(&out, "email", "$in");
        assert_eq!(cts2.len(), 2);
        assert_eq!(cts2[1], cts[0]);
    }

    #[test]
    fn numbers_match_across_numeric_types() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q.filter(&doc! { "email": 30 }).unwrap();
        let cts = in_list(&out, "email", "$in");
        assert_eq!(cts.len(), 3);
        for stored in [Bson::Int64(30), Bson::Double(30.0), Bson::Int32(30)] {
            let enc = f
                .cryptor
                .encrypt_document(&doc! { "email": stored }, &f.ctx)
                .unwrap();
            assert!(cts.contains(enc.get("email").unwrap()));
        }
    }

    #[test]
    fn blind_indexed_equality_is_rewritten_to_the_index() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q.filter(&doc! { "name": "Ada", "token": "t-1" }).unwrap();
        assert!(!out.contains_key("name") && !out.contains_key("token"));
        let stored = f
            .cryptor
            .encrypt_document(&doc! { "name": "Ada", "token": "t-1" }, &f.ctx)
            .unwrap();
        assert_eq!(
            in_list(&out, "name_bidx", "$in")[0],
            *stored.get("name_bidx").unwrap()
        );
        assert_eq!(
            in_list(&out, "token_bidx", "$in")[0],
            *stored.get("token_bidx").unwrap()
        );
        // $exists on an index-only field looks at its index.
        let out = q.filter(&doc! { "token": { "$exists": true } }).unwrap();
        assert!(out
            .get_document("token_bidx")
            .unwrap()
            .contains_key("$exists"));
        let out = q.filter(&doc! { "name": { "$exists": false } }).unwrap();
        assert!(out.contains_key("name"));
    }

    #[test]
    fn ne_in_nin_not_and_logical_operators() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q
            .filter(&doc! {
                "$or": [ { "email": { "$in": ["a", "b"] } }, { "name": { "$ne": "x" } } ],
                "profile.phone": { "$nin": ["1"] },
                "tags": { "$not": { "$eq": "t" } },
                "plain": { "$gt": 3 },
            })
            .unwrap();
        let or = out.get_array("$or").unwrap();
        let first = or[0].as_document().unwrap();
        assert_eq!(in_list(first, "email", "$in").len(), 2);
        let second = or[1].as_document().unwrap();
        assert_eq!(in_list(second, "name_bidx", "$nin").len(), 1);
        assert_eq!(in_list(&out, "profile.phone", "$nin").len(), 1);
        assert!(out
            .get_document("tags")
            .unwrap()
            .get_document("$not")
            .unwrap()
            .contains_key("$in"));
        assert_eq!(out.get_document("plain").unwrap(), &doc! { "$gt": 3 });
        // Null keeps matching missing fields.
        let out = q.filter(&doc! { "email": null }).unwrap();
        assert_eq!(in_list(&out, "email", "$in")[0], Bson::Null);
        // Two conditions on one key are combined with $and.
        let out = q
            .filter(&doc! { "email": { "$exists": true, "$ne": "a" } })
            .unwrap();
        assert!(out.contains_key("email") && out.contains_key("$and"));
    }

    #[test]
    fn fail_operators_that_cannot_work_on_ciphertext_name_operator_and_field() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let cases: Vec<(Document, &str, &str)> = vec![
            (doc! { "email": { "$gt": "a" } }, "$gt", "email"),
            (doc! { "email": { "$lte": "a" } }, "$lte", "email"),
            (doc! { "email": { "$regex": "^a" } }, "$regex", "email"),
            (
                doc! { "email": bson::Regex { pattern: "a".into(), options: String::new() } },
                "$regex",
                "email",
            ),
            (
                doc! { "email": { "$in": [bson::Regex { pattern: "a".into(), options: String::new() }] } },
                "$regex",
                "email",
            ),
            (doc! { "email": { "$mod": [2, 0] } }, "$mod", "email"),
            (doc! { "email": { "$type": "string" } }, "$type", "email"),
            (doc! { "email": { "$size": 2 } }, "$size", "email"),
            (doc! { "tags": { "$all": ["a"] } }, "$all", "tags"),
            (
                doc! { "tags": { "$elemMatch": { "$eq": "a" } } },
                "$elemMatch",
                "tags",
            ),
            (doc! { "tags": ["a", "b"] }, "equality", "tags"),
            (doc! { "ssn": "123" }, "equality", "ssn"),
            (doc! { "ssn": { "$in": ["123"] } }, "$in", "ssn"),
            (doc! { "notes": "x" }, "equality", "notes"),
            (
                doc! { "profile": { "phone": "1" } },
                "equality",
                "profile.phone",
            ),
            (
                doc! { "profile": { "$eq": { "phone": "1" } } },
                "$eq",
                "profile.phone",
            ),
            (doc! { "ssn.part": 1 }, "equality", "ssn"),
            (doc! { "name_bidx": "x" }, "equality", "name"),
            (
                doc! { "$expr": { "$eq": ["$email", "a"] } },
                "$expr",
                "email",
            ),
            (
                doc! { "$expr": { "$gt": [{ "$strLenCP": "$profile.phone" }, 3] } },
                "$expr",
                "profile.phone",
            ),
            (
                doc! { "$expr": { "$eq": [{ "$getField": "email" }, "a"] } },
                "$expr",
                "email",
            ),
            (
                doc! { "$where": "this.email == 'a'" },
                "$where",
                "ssn, email, profile.phone, name, token, tags, notes, addresses.street",
            ),
            (
                doc! { "$text": { "$search": "a" } },
                "$text",
                "ssn, email, profile.phone, name, token, tags, notes, addresses.street",
            ),
            (
                doc! { "$or": [ { "x": 1 }, { "email": { "$gte": "b" } } ] },
                "$gte",
                "email",
            ),
            (
                doc! { "addresses": { "$elemMatch": { "street": { "$regex": "x" } } } },
                "$regex",
                "addresses.street",
            ),
        ];
        for (filter, op, field) in cases {
            let (o, fl) = refused(q.filter(&filter));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {filter}");
        }
    }

    #[test]
    fn nested_paths_elem_match_and_array_indexes() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q
            .filter(&doc! {
                "addresses": { "$elemMatch": { "street": "Main", "zip": "1" } },
                "addresses.0.street": "Elm",
                "profile": { "$exists": true },
            })
            .unwrap();
        let em = out
            .get_document("addresses")
            .unwrap()
            .get_document("$elemMatch")
            .unwrap();
        assert!(is_envelope(&in_list(em, "street", "$in")[0]));
        assert_eq!(em.get_str("zip").unwrap(), "1");
        assert!(is_envelope(&in_list(&out, "addresses.0.street", "$in")[0]));
        let stored = f
            .cryptor
            .encrypt_document(&doc! { "addresses": [ { "street": "Elm" } ] }, &f.ctx)
            .unwrap();
        let street = stored.get_array("addresses").unwrap()[0]
            .as_document()
            .unwrap()
            .get("street")
            .unwrap()
            .clone();
        assert_eq!(in_list(&out, "addresses.0.street", "$in")[0], street);
    }

    #[test]
    fn owner_scope_is_added_and_bound() {
        let f = fixture(true);
        let owner = Bson::String("acme".into());
        let unscoped = QueryRewriter::new(&f.cryptor, &f.ctx);
        assert!(matches!(
            unscoped.filter(&doc! { "email": "a" }),
            Err(Error::MissingContext(_))
        ));
        let from_filter = unscoped
            .filter(&doc! { "tenant": "acme", "email": "a" })
            .unwrap();
        let q = QueryRewriter::new(&f.cryptor, &f.ctx).scope(Some(&owner));
        let out = q.filter(&doc! { "email": "a" }).unwrap();
        assert_eq!(out.get_str("tenant").unwrap(), "acme");
        assert_eq!(
            in_list(&out, "email", "$in"),
            in_list(&from_filter, "email", "$in")
        );
        let stored = f
            .cryptor
            .encrypt_document(&doc! { "tenant": "acme", "email": "a" }, &f.ctx)
            .unwrap();
        assert_eq!(
            in_list(&out, "email", "$in")[0],
            *stored.get("email").unwrap()
        );
        // Another owner's filter value cannot widen the scope.
        let out = q.filter(&doc! { "tenant": "other" }).unwrap();
        assert!(out.contains_key("$and"));
        assert_eq!(q.filter(&doc! {}).unwrap(), doc! { "tenant": "acme" });
        let (p, _) = q.pipeline(&[doc! { "$match": { "email": "a" } }]).unwrap();
        assert_eq!(p[0], doc! { "$match": { "tenant": "acme" } });
        let (op, _) = refused(q.pipeline(&[doc! { "$unionWith": "c" }]));
        assert_eq!(op, "$unionWith");
        let (op, _) = refused(q.pipeline(&[doc! { "$geoNear": { "near": [0, 0] } }]));
        assert_eq!(op, "$geoNear");
    }

    #[test]
    fn updates_encrypt_values_and_indexes() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q
            .update(
                &doc! {
                    "$set": { "email": "e", "name": "N", "token": "T", "plain": 1, "profile": { "phone": "p", "x": 1 } },
                    "$setOnInsert": { "addresses.1.street": "S" },
                    "$unset": { "name": "", "tags": "" },
                    "$inc": { "count": 1 },
                },
                &doc! {},
            )
            .unwrap();
        let set = out.get_document("$set").unwrap();
        assert!(is_envelope(set.get("email").unwrap()));
        assert!(is_envelope(set.get("name").unwrap()));
        assert!(set.contains_key("name_bidx") && set.contains_key("token_bidx"));
        assert!(!set.contains_key("token"));
        assert_eq!(set.get_i32("plain").unwrap(), 1);
        let profile = set.get_document("profile").unwrap();
        assert!(is_envelope(profile.get("phone").unwrap()));
        assert_eq!(profile.get_i32("x").unwrap(), 1);
        assert!(is_envelope(
            out.get_document("$setOnInsert")
                .unwrap()
                .get("addresses.1.street")
                .unwrap()
        ));
        let unset = out.get_document("$unset").unwrap();
        assert!(unset.contains_key("name_bidx") && unset.contains_key("tags"));
        // The deterministic value written is what an equality query looks for.
        let filter = q.filter(&doc! { "email": "e" }).unwrap();
        assert_eq!(
            in_list(&filter, "email", "$in")[0],
            *set.get("email").unwrap()
        );
    }

    #[test]
    fn push_and_add_to_set_encrypt_each_element() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let out = q
            .update(
                &doc! {
                    "$push": { "notes": { "$each": ["a", "b"], "$slice": -5 }, "addresses": { "street": "x", "n": 1 } },
                    "$addToSet": { "tags": "t" },
                },
                &doc! {},
            )
            .unwrap();
        let push = out.get_document("$push").unwrap();
        let notes = push.get_document("notes").unwrap();
        let each = notes.get_array("$each").unwrap();
        assert_eq!(each.len(), 2);
        assert!(each.iter().all(is_envelope));
        assert_eq!(notes.get_i32("$slice").unwrap(), -5);
        let addr = push.get_document("addresses").unwrap();
        assert!(is_envelope(addr.get("street").unwrap()));
        let tag = out.get_document("$addToSet").unwrap().get("tags").unwrap();
        let filter = q.filter(&doc! { "tags": "t" }).unwrap();
        assert_eq!(in_list(&filter, "tags", "$in")[0], *tag);
        let out = q
            .update(&doc! { "$pull": { "tags": "t" } }, &doc! {})
            .unwrap();
        assert!(out
            .get_document("$pull")
            .unwrap()
            .get_document("tags")
            .unwrap()
            .contains_key("$in"));
    }

    #[test]
    fn fail_updates_that_cannot_work_on_ciphertext() {
        let f = fixture(true);
        let owner = Bson::String("acme".into());
        let q = QueryRewriter::new(&f.cryptor, &f.ctx).scope(Some(&owner));
        let cases: Vec<(Document, Document, &str, &str)> = vec![
            (doc! { "$inc": { "email": 1 } }, doc! {}, "$inc", "email"),
            (
                doc! { "$mul": { "profile": 2 } },
                doc! {},
                "$mul",
                "profile.phone",
            ),
            (doc! { "$min": { "name": 2 } }, doc! {}, "$min", "name"),
            (
                doc! { "$rename": { "email": "mail" } },
                doc! {},
                "$rename",
                "email",
            ),
            (
                doc! { "$rename": { "plain": "email" } },
                doc! {},
                "$rename",
                "email",
            ),
            (
                doc! { "$currentDate": { "email": true } },
                doc! {},
                "$currentDate",
                "email",
            ),
            (
                doc! { "$bit": { "email": { "and": 1 } } },
                doc! {},
                "$bit",
                "email",
            ),
            (doc! { "$set": { "ssn": "1" } }, doc! {}, "$set", "ssn"),
            (
                doc! { "$set": { "ssn.part": "1" } },
                doc! { "_id": 1 },
                "$set",
                "ssn",
            ),
            (
                doc! { "$set": { "name_bidx": "1" } },
                doc! {},
                "$set",
                "name",
            ),
            (
                doc! { "$set": { "tenant": "other" } },
                doc! {},
                "$set",
                "tenant",
            ),
            (
                doc! { "$unset": { "tenant": "" } },
                doc! {},
                "$unset",
                "tenant",
            ),
            (
                doc! { "$push": { "email": "x" } },
                doc! {},
                "$push",
                "email",
            ),
            (
                doc! { "$addToSet": { "notes": "x" } },
                doc! {},
                "$addToSet",
                "notes",
            ),
            (
                doc! { "$push": { "tags": { "$each": ["x"], "$sort": 1 } } },
                doc! {},
                "$sort",
                "tags",
            ),
            (
                doc! { "$pullAll": { "tags": ["x"] } },
                doc! {},
                "$pullAll",
                "tags",
            ),
        ];
        for (update, filter, op, field) in cases {
            let (o, fl) = refused(q.update(&update, &filter));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {update}");
        }
        // _id-bound fields can be written when the filter selects one document by _id.
        let out = q
            .update(&doc! { "$set": { "ssn": "1" } }, &doc! { "_id": 7 })
            .unwrap();
        let enc = out
            .get_document("$set")
            .unwrap()
            .get("ssn")
            .unwrap()
            .clone();
        let stored = doc! { "_id": 7, "tenant": "acme", "ssn": enc };
        let back = f.cryptor.decrypt_document(&stored, &f.ctx).unwrap();
        assert_eq!(back.get_str("ssn").unwrap(), "1");
        assert!(matches!(
            q.update(&doc! { "email": "x" }, &doc! {}),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn array_filters_are_rewritten_through_their_identifiers() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let update = doc! { "$set": { "addresses.$[a].street": "New" } };
        let out = q
            .array_filters(&[doc! { "a.street": "Old", "a.n": 1 }], &update, &doc! {})
            .unwrap();
        assert!(is_envelope(&in_list(&out[0], "a.street", "$in")[0]));
        let (op, field) =
            refused(q.array_filters(&[doc! { "a.street": { "$gt": "x" } }], &update, &doc! {}));
        assert_eq!((op.as_str(), field.as_str()), ("$gt", "addresses.street"));
    }

    #[test]
    fn pipelines_sorts_and_projections() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let (p, touched) = q
            .pipeline(&[
                doc! { "$match": { "email": "a" } },
                doc! { "$project": { "email": 1, "plain": 1 } },
                doc! { "$group": { "_id": "$plain", "n": { "$sum": 1 } } },
                doc! { "$sort": { "n": -1 } },
            ])
            .unwrap();
        assert_eq!(touched.as_deref(), Some("email"));
        assert!(p[0]
            .get_document("$match")
            .unwrap()
            .get_document("email")
            .unwrap()
            .contains_key("$in"));
        let bad: Vec<(Document, &str, &str)> = vec![
            (doc! { "$group": { "_id": "$email" } }, "$group", "email"),
            (
                doc! { "$group": { "_id": null, "s": { "$push": "$$ROOT" } } },
                "$group",
                "ssn, email, profile.phone, name, token, tags, notes, addresses.street",
            ),
            (doc! { "$sort": { "name": 1 } }, "sort", "name"),
            (
                doc! { "$sortByCount": "$profile" },
                "$sortByCount",
                "profile.phone",
            ),
            (
                doc! { "$addFields": { "x": { "$concat": ["$email", "!"] } } },
                "$addFields",
                "email",
            ),
            (doc! { "$set": { "email": "plaintext" } }, "$set", "email"),
            (doc! { "$project": { "e": "$email" } }, "$project", "email"),
            (
                doc! { "$lookup": { "from": "o", "localField": "email", "foreignField": "e", "as": "o" } },
                "$lookup",
                "email",
            ),
            (doc! { "$unwind": "$email" }, "$unwind", "email"),
            (
                doc! { "$out": "copy" },
                "$out",
                "ssn, email, profile.phone, name, token, tags, notes, addresses.street",
            ),
            (
                doc! { "$setWindowFields": { "sortBy": { "name": 1 }, "output": {} } },
                "$setWindowFields",
                "name",
            ),
            (
                doc! { "$facet": { "a": [ { "$match": { "email": { "$gt": 1 } } } ] } },
                "$gt",
                "email",
            ),
        ];
        for (stage, op, field) in bad {
            let (o, fl) = refused(q.pipeline(std::slice::from_ref(&stage)));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {stage}");
        }
        assert!(q.pipeline(&[doc! { "$unwind": "$tags" }]).is_ok());
        assert!(q.pipeline(&[doc! { "$unwind": "$addresses" }]).is_ok());
        let (o, fl) = refused(q.sort(&doc! { "plain": 1, "email": -1 }));
        assert_eq!((o.as_str(), fl.as_str()), ("sort", "email"));
        assert!(q.sort(&doc! { "plain": 1 }).is_ok());
        // ssn is bound to _id: it cannot come back without it; other fields can.
        assert!(q.projection(&doc! { "ssn": 1, "_id": 0 }).is_err());
        assert!(q.projection(&doc! { "_id": 0 }).is_err());
        assert!(q.projection(&doc! { "email": 1, "_id": 0 }).is_ok());
        assert!(q.projection(&doc! { "ssn": 0, "_id": 0 }).is_ok());
        assert!(q.projection(&doc! { "tags": { "$slice": 2 } }).is_ok());
        let (o, _) = refused(q.projection(&doc! { "x": { "$toUpper": "$email" } }));
        assert_eq!(o, "projection");
        let owned = fixture(true);
        let q = QueryRewriter::new(&owned.cryptor, &owned.ctx);
        assert_eq!(
            q.projection(&doc! { "email": 1 }).unwrap(),
            doc! { "email": 1, "tenant": 1 }
        );
        assert!(q.projection(&doc! { "tenant": 0 }).is_err());
    }

    #[test]
    fn replacement_takes_id_from_filter_and_binds_owner() {
        let f = fixture(true);
        let owner = Bson::String("acme".into());
        let q = QueryRewriter::new(&f.cryptor, &f.ctx).scope(Some(&owner));
        let raw = RawDocumentBuf::from_document(&doc! { "ssn": "1" }).unwrap();
        assert!(q.replacement(&raw, &doc! {}).is_err());
        let out = q.replacement(&raw, &doc! { "_id": 5 }).unwrap();
        assert_eq!(out.get_i32("_id").unwrap(), 5);
        assert_eq!(out.get_str("tenant").unwrap(), "acme");
        let back = f.cryptor.decrypt_raw(&out, &f.ctx).unwrap();
        assert_eq!(back.get_str("ssn").unwrap(), "1");
        for dotted in [
            doc! { "tenant": "acme", "profile.phone": "1" },
            doc! { "tenant": "acme", "addresses": [ { "x": 1 }, { "street.x": 1, "street": 2 } ] },
        ] {
            let raw = RawDocumentBuf::from_document(&dotted).unwrap();
            let (op, _) = refused(q.document(&raw));
            assert_eq!(op, "write");
        }
        let (op, field) =
            refused(q.update(&doc! { "$set": { "profile": { "phone.x": 1 } } }, &doc! {}));
        assert_eq!((op.as_str(), field.as_str()), ("write", "profile.phone"));
        let fine =
            RawDocumentBuf::from_document(&doc! { "a.b": 1, "profile": { "c.d": 1 } }).unwrap();
        assert!(q.document(&fine).is_ok());
        let other = RawDocumentBuf::from_document(&doc! { "tenant": "evil", "x": 1 }).unwrap();
        let (op, field) = refused(q.document(&other));
        assert_eq!((op.as_str(), field.as_str()), ("write", "tenant"));
    }

    #[test]
    fn fail_dotted_names_are_refused_here_and_by_the_engine_alike() {
        let f = fixture(true);
        let owner = Bson::String("acme".into());
        let q = QueryRewriter::new(&f.cryptor, &f.ctx).scope(Some(&owner));
        let cases: Vec<(Document, &str)> = vec![
            (
                doc! { "tenant": "acme", "profile.phone": "1" },
                "profile.phone",
            ),
            // A plain path, but at a level that holds encrypted fields: the engine refuses it.
            (
                doc! { "tenant": "acme", "profile": { "x": 1 }, "profile.city": "c" },
                "profile.city",
            ),
            (
                doc! { "tenant": "acme", "addresses": [[{ "street.x": 1 }]] },
                "addresses.street",
            ),
            (
                doc! { "tenant": "acme", "addresses": [{ "a": [1] }, [[{ "zip": 2, "street.y": 1 }]]] },
                "addresses.street",
            ),
        ];
        for (d, field) in cases {
            let raw = RawDocumentBuf::from_document(&d).unwrap();
            match q.document(&raw) {
                Err(Error::UnsupportedQuery {
                    operator,
                    field: got,
                    reason,
                }) => {
                    assert_eq!((operator.as_str(), got.as_str()), ("write", field), "{d}");
                    assert!(reason.contains("containing '.'"), "{reason}");
                }
                other => panic!("{d}: expected a refusal, got {other:?}"),
            }
            assert!(q.replacement(&raw, &doc! { "_id": 1 }).is_err());
            // The engine, reached without this layer, refuses the same documents.
            let e = f.cryptor.encrypt_raw(&raw, &f.ctx).unwrap_err();
            assert!(matches!(e, Error::Schema { .. }), "{d}: {e:?}");
            assert!(e.to_string().contains("dotted field name"), "{e}");
        }
        let (op, field) = refused(q.update(
            &doc! { "$set": { "addresses": [[{ "street.x": "1" }]] } },
            &doc! {},
        ));
        assert_eq!((op.as_str(), field.as_str()), ("write", "addresses.street"));
        // Arrays nested deeper than the engine accepts are refused, not walked forever.
        let mut deep = Bson::Document(doc! { "street": "s" });
        for _ in 0..200 {
            deep = Bson::Array(vec![deep]);
        }
        let raw =
            RawDocumentBuf::from_document(&doc! { "tenant": "acme", "addresses": deep }).unwrap();
        assert!(matches!(q.document(&raw), Err(Error::MalformedBson(_))));
    }

    const ALL: &str = "ssn, email, profile.phone, name, token, tags, notes, addresses.street";

    #[test]
    fn fail_update_pipelines_that_could_write_plaintext_or_drop_the_owner() {
        let f = fixture(true);
        let owner = Bson::String("acme".into());
        let q = QueryRewriter::new(&f.cryptor, &f.ctx).scope(Some(&owner));
        let cases: Vec<(Document, &str, &str)> = vec![
            // Whole-document replacement: any name, any value, any owner.
            (
                doc! { "$replaceWith": { "$literal": { "ssn": "123-45-6789", "tenant": "B" } } },
                "$replaceWith",
                ALL,
            ),
            (
                doc! { "$replaceWith": { "$arrayToObject": [[["ssn", "123-45-6789"]]] } },
                "$replaceWith",
                ALL,
            ),
            (
                doc! { "$replaceWith": { "$mergeObjects": [{ "$literal": { "a": 1 } }, { "x": 1 }] } },
                "$replaceWith",
                ALL,
            ),
            (
                doc! { "$replaceRoot": { "newRoot": { "x": 1 } } },
                "$replaceRoot",
                ALL,
            ),
            // Names hidden in $literal, or computed.
            (
                doc! { "$set": { "x": { "$literal": { "ssn": "1" } } } },
                "$set",
                "ssn",
            ),
            (
                doc! { "$set": { "x": { "$arrayToObject": [[["k", "v"]]] } } },
                "$arrayToObject",
                ALL,
            ),
            (
                doc! { "$set": { "x": { "$setField": { "field": { "$concat": ["ss", "n"] }, "input": {}, "value": "1" } } } },
                "$setField",
                ALL,
            ),
            (
                doc! { "$set": { "x": { "$getField": { "$literal": "ssn" } } } },
                "$set",
                "ssn",
            ),
            // $unset stages (string or array form).
            (doc! { "$unset": "tenant" }, "$unset", "tenant"),
            (doc! { "$unset": ["x", "tenant"] }, "$unset", "tenant"),
            (doc! { "$unset": "tenant.x" }, "$unset", "tenant"),
            (doc! { "$unset": "email" }, "$unset", "email"),
            (doc! { "$unset": ["name_bidx"] }, "$unset", "name"),
            (doc! { "$unset": "profile" }, "$unset", "profile.phone"),
            (doc! { "$unset": "ssn.x" }, "$unset", "ssn"),
            // An inclusion projection drops the owner field.
            (doc! { "$project": { "x": 1 } }, "$project", "tenant"),
            (
                doc! { "$addFields": { "tenant": "B" } },
                "$addFields",
                "tenant",
            ),
            (doc! { "$set": { "tenant.x": 1 } }, "$set", "tenant"),
            // Not an update-pipeline stage.
            (doc! { "$group": { "_id": 1 } }, "$group", ALL),
        ];
        for (stage, op, field) in cases {
            let (o, fl) = refused(q.update_pipeline(std::slice::from_ref(&stage)));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {stage}");
        }
        q.update_pipeline(&[
            doc! { "$set": { "plan": { "$literal": { "a": "$x" } }, "n": { "$getField": "plain" } } },
            doc! { "$set": { "p": { "$getField": { "field": { "$literal": "$price" }, "input": "$y" } } } },
            doc! { "$unset": ["old", "x.y"] },
            doc! { "$project": { "old2": 0 } },
        ])
        .unwrap();
        // Without an owner field, whole-value replacement is still refused; plain $unset is fine.
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let (o, _) = refused(q.update_pipeline(&[doc! { "$replaceWith": { "a": 1 } }]));
        assert_eq!(o, "$replaceWith");
        q.update_pipeline(&[doc! { "$project": { "x": 1 } }, doc! { "$unset": "y" }])
            .unwrap();
    }

    #[test]
    fn fail_expressions_naming_encrypted_fields_through_literals_or_computed_names() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        let cases: Vec<(Document, &str, &str)> = vec![
            (
                doc! { "$expr": { "$eq": [{ "$getField": { "$literal": "ssn" } }, "123-45-6789"] } },
                "$expr",
                "ssn",
            ),
            (
                doc! { "$expr": { "$eq": [{ "$getField": { "field": { "$literal": "email" }, "input": "$x" } }, "a"] } },
                "$expr",
                "email",
            ),
            (
                doc! { "$expr": { "$eq": [{ "$getField": { "field": { "$concat": ["ss", "n"] } } }, "1"] } },
                "$getField",
                ALL,
            ),
            (
                doc! { "$expr": { "$eq": [{ "$getField": { "$toString": "$x" } }, "1"] } },
                "$getField",
                ALL,
            ),
            (
                doc! { "$expr": { "$eq": [{ "$getField": { "input": "$x" } }, "1"] } },
                "$getField",
                ALL,
            ),
            (
                doc! { "$expr": { "$eq": [{ "$unsetField": { "field": "name_bidx", "input": "$x" } }, {}] } },
                "$expr",
                "name",
            ),
            (
                doc! { "$expr": { "$eq": [{ "$arrayToObject": "$pairs" }, { "ssn": "1" }] } },
                "$arrayToObject",
                ALL,
            ),
        ];
        for (filter, op, field) in cases {
            let (o, fl) = refused(q.filter(&filter));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {filter}");
        }
        // Aggregations: names inside $literal are checked, computed names refused.
        let bad: Vec<(Document, &str, &str)> = vec![
            (
                doc! { "$replaceWith": { "$literal": { "ssn": "x" } } },
                "$replaceWith",
                "ssn",
            ),
            (
                doc! { "$project": { "x": { "$arrayToObject": [[["a", 1]]] } } },
                "$arrayToObject",
                ALL,
            ),
        ];
        for (stage, op, field) in bad {
            let (o, fl) = refused(q.pipeline(std::slice::from_ref(&stage)));
            assert_eq!((o.as_str(), fl.as_str()), (op, field), "for {stage}");
        }
        // Constant names of plain fields are fine.
        q.filter(&doc! { "$expr": { "$eq": [{ "$getField": { "$literal": "a.b" } }, 1] } })
            .unwrap();
        q.filter(
            &doc! { "$expr": { "$eq": [{ "$getField": { "field": "plain", "input": "$x" } }, 1] } },
        )
        .unwrap();
    }
}
