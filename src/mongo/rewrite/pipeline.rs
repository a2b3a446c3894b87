//! Aggregation pipelines, and the read options that name fields the same way: projections,
//! sorts, index bounds and `distinct`. `$match` stages go through the filter rewriter; the
//! owner `$match` goes first for a scoped rewriter; stages that would evaluate, group, sort,
//! join or write encrypted fields are refused.

use bson::{doc, Bson, Document};

use super::filter::Base;
use super::{is_flag, is_inside, is_positional, refuse, Kind, QueryRewriter, State};
use crate::error::{CommandError, Error, Result};
use crate::schema::FieldRule;

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

impl<'a> QueryRewriter<'a> {
    // ---------------------------------------------------------------------------------------
    // Projections, sorts, index bounds, distinct

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
                return Err(Error::from(CommandError::Stage));
            };
            let body = match name.as_str() {
                "$match" => {
                    let Bson::Document(f) = body else {
                        return Err(Error::from(CommandError::Operand { operator: "$match".into(), expected: "a filter document" }));
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
                        return Err(Error::from(CommandError::Operand { operator: "$facet".into(), expected: "a document" }));
                    };
                    let mut rewritten = Document::new();
                    for (k, sub) in facets {
                        self.check_output_name(k, name)?;
                        let Bson::Array(sub) = sub else {
                            return Err(Error::from(CommandError::Operand { operator: "$facet".into(), expected: "pipelines" }));
                        };
                        let sub: Vec<Document> = sub
                            .iter()
                            .map(|s| match s {
                                Bson::Document(d) => Ok(d.clone()),
                                _ => Err(Error::from(CommandError::Operand { operator: "$facet".into(), expected: "pipelines" })),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mongo::rewrite::fixture::*;

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
