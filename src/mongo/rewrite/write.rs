//! Writes: whole documents (insert, replacement) are bound to the scope's owner and encrypted;
//! update documents have their values encrypted through the same engine (with blind indexes
//! alongside) and their operators checked; update pipelines may not touch encrypted fields or
//! the owner field at all.

use bson::{doc, Bson, Document, RawBson, RawDocument, RawDocumentBuf};

use super::filter::{is_logical, Base, Conjunction};
use super::{
    equality_in, is_flag, is_inside, is_operator_doc, refuse, sibling, Kind, QueryRewriter, State,
};
use crate::error::{CommandError, Error, Result};
use crate::rawbson::Element;
use crate::schema::walk::{self, Visitor};
use crate::schema::{FieldRule, Node};

/// An encrypted update value (none for an index-only field) and the blind index to write
/// next to it (its path and value).
type EncryptedAt = (Option<Bson>, Option<(String, Bson)>);

impl<'a> QueryRewriter<'a> {
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
    /// [`Error::InvalidCommand`] for a replacement document (use `replace_one`); key errors.
    pub fn update(&self, update: &Document, filter: &Document) -> Result<Document> {
        let id = equality_in(filter, "_id");
        let owner = self.owner_for(filter);
        let mut out = Document::new();
        for (op, fields) in update {
            if !op.starts_with('$') {
                return Err(Error::from(CommandError::NotAnUpdate));
            }
            let Bson::Document(fields) = fields else {
                return Err(Error::from(CommandError::Operand {
                    operator: op.clone(),
                    expected: "a document",
                }));
            };
            let mut rewritten: Vec<(String, Bson)> = Vec::with_capacity(fields.len());
            for (path, value) in fields {
                self.update_field(op, path, value, id.as_ref(), owner.as_ref(), &mut rewritten)?;
            }
            // Each operator appears once in `update`: its rewritten fields go in whole.
            out.insert(op.clone(), rewritten.into_iter().collect::<Document>());
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
    /// [`Error::UnsupportedQuery`]; [`Error::InvalidCommand`] for a malformed stage.
    pub fn update_pipeline(&self, pipeline: &[Document]) -> Result<()> {
        let guarded = self.has_rules() || self.owner_field().is_some();
        for stage in pipeline {
            let mut it = stage.iter();
            let (Some((name, body)), None) = (it.next(), it.next()) else {
                return Err(Error::from(CommandError::Stage));
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
                return Err(Error::from(CommandError::Operand {
                    operator: name.to_string(),
                    expected: "a field name or an array of field names",
                }));
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
    pub fn insert_document(&self, doc: &RawDocument) -> Result<RawDocumentBuf> {
        self.check_literal_dots(doc, self.schema().tree(), "")?;
        match self.bind_owner(doc)? {
            Some(bound) => self.cryptor.encrypt_raw(&bound, self.ctx),
            None => self.cryptor.encrypt_raw(doc, self.ctx),
        }
    }

    /// Prepares a replacement document: as [`QueryRewriter::insert_document`], and with `_id`-bound
    /// fields it takes the `_id` from `filter` when the replacement has none.
    ///
    /// # Errors
    /// As [`QueryRewriter::insert_document`]; [`Error::UnsupportedQuery`] when `_id`-bound fields
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
    /// ([`Error::Schema`] from [`Cryptor::encrypt_raw`](crate::transform::Cryptor::encrypt_raw)); this check runs first so that the
    /// collection layer reports them like its other refusals, naming the field. Only levels
    /// that can contain encrypted fields are walked, through arrays at any depth.
    fn check_literal_dots(&self, doc: &RawDocument, node: &Node, prefix: &str) -> Result<()> {
        let mut dots = LiteralDots {
            rewriter: *self,
            path: prefix.to_owned(),
        };
        // The top document is level 0 (its nested levels count up to MAX_DEPTH).
        walk::walk(&mut dots, self.schema(), doc, node, 0)
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

/// The write pre-check's side of the schema walk: refuses the first dotted field name at a
/// level that holds encrypted fields, naming the field.
struct LiteralDots<'a> {
    rewriter: QueryRewriter<'a>,
    path: String,
}

impl<'d, 's> Visitor<'d, 's> for LiteralDots<'_> {
    type Level = ();

    fn path(&mut self) -> &mut String {
        &mut self.path
    }

    fn rule(&mut self, _: usize, _: Element<'d>) -> Result<()> {
        Ok(()) // an encrypted field: the engine seals it whole
    }

    fn dotted(&mut self, node: &'s Node, dot: usize, e: Element<'d>) -> Result<()> {
        let mut path = self.path.clone();
        walk::push(&mut path, e.key());
        let field = match self.rewriter.classify_normalized(&path).rule() {
            Some(rule) => rule.normalized.clone(),
            None if node.child(&e.name[..dot]).is_some() => path,
            None => return Ok(()),
        };
        Err(refuse(
            "write",
            field,
            "a field name containing '.' is stored as that literal name, outside the encrypted path; write nested documents",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mongo::rewrite::fixture::*;

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
            Err(Error::InvalidCommand(CommandError::NotAnUpdate))
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
            let (op, _) = refused(q.insert_document(&raw));
            assert_eq!(op, "write");
        }
        let (op, field) =
            refused(q.update(&doc! { "$set": { "profile": { "phone.x": 1 } } }, &doc! {}));
        assert_eq!((op.as_str(), field.as_str()), ("write", "profile.phone"));
        let fine =
            RawDocumentBuf::from_document(&doc! { "a.b": 1, "profile": { "c.d": 1 } }).unwrap();
        assert!(q.insert_document(&fine).is_ok());
        let other = RawDocumentBuf::from_document(&doc! { "tenant": "evil", "x": 1 }).unwrap();
        let (op, field) = refused(q.insert_document(&other));
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
            match q.insert_document(&raw) {
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
        assert!(matches!(
            q.insert_document(&raw),
            Err(Error::MalformedBson(_))
        ));
    }

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
}
