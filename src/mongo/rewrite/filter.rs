//! Filters: equality on encrypted fields becomes ciphertext or blind-index matching, the owner
//! filter is added for a scoped rewriter, and every other condition on an encrypted field is
//! refused. Also used for `$match` stages, `$pull` conditions and array filters.

use bson::{doc, Bson, Document};

use super::{is_operator_doc, refuse, sibling, Kind, QueryRewriter, State};
use crate::blind_index::BLIND_INDEX_SUBTYPE;
use crate::envelope::ENVELOPE_SUBTYPE;
use crate::error::{CommandError, Error, Result};
use crate::schema::FieldRule;
use crate::transform::CSFLE_SUBTYPE;

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

/// The operator to name when refusing a condition: its first operator, or "equality".
fn first_operator(v: &Bson) -> String {
    match v {
        Bson::Document(d) if is_operator_doc(v) => d.keys().next().cloned().unwrap_or_default(),
        Bson::RegularExpression(_) => "$regex".into(),
        _ => "equality".into(),
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

/// Builds a filter document from conditions that all hold together; a key met twice goes
/// into `$and` (MongoDB documents cannot repeat a key).
#[derive(Default)]
pub(super) struct Conjunction {
    pub(super) entries: Vec<(String, Bson)>,
}

impl Conjunction {
    pub(super) fn push(&mut self, key: impl Into<String>, value: Bson) {
        self.entries.push((key.into(), value));
    }

    pub(super) fn finish(self) -> Document {
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

/// How keys of a filter map to document paths.
pub(super) enum Base<'b> {
    /// Keys are document paths.
    Root,
    /// Keys are relative to an array's elements (`$elemMatch`, `$pull`).
    Prefix(&'b str),
    /// Keys start with an array-filter identifier (`elem.street`), bound to a path prefix.
    Idents(&'b [(String, String)]),
}

/// A query document made of logical operators only (`{$or: [...]}`), as `$elemMatch` and
/// `$pull` accept on documents.
pub(super) fn is_logical(d: &Document) -> bool {
    d.keys()
        .all(|k| matches!(k.as_str(), "$and" | "$or" | "$nor"))
}

impl QueryRewriter<'_> {
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

    pub(super) fn filter_doc(
        &self,
        doc: &Document,
        base: &Base<'_>,
        st: &mut State,
    ) -> Result<Document> {
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
                    return Err(Error::from(CommandError::Operand {
                        operator: k.to_owned(),
                        expected: "an array of filters",
                    }));
                };
                let mut rewritten = Vec::with_capacity(items.len());
                for item in items {
                    let Bson::Document(d) = item else {
                        return Err(Error::from(CommandError::Operand {
                            operator: k.to_owned(),
                            expected: "an array of filters",
                        }));
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

    pub(super) fn field_condition(
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

    pub(super) fn index_target(key: &str, rule: &FieldRule) -> Option<String> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mongo::rewrite::fixture::*;

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
}
