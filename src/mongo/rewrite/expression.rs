//! Expressions and stage bodies: wherever the server would evaluate an aggregation expression
//! (`$expr`, computed projections, pipeline stages, update pipelines), no `$` reference, key,
//! field-name parameter or computed name may reach an encrypted field, since the server only
//! sees its ciphertext. Nothing is rewritten here; it is checked, or refused.

use bson::Bson;

use super::{is_operator_doc, refuse, QueryRewriter};
use crate::error::Result;

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

impl QueryRewriter<'_> {
    /// Refuses expressions that reference encrypted fields (`"$ssn"`, `$$ROOT`, `$getField`),
    /// and, when the schema has rules, expressions that name fields by a computed value
    /// (`$arrayToObject`, `$getField`/`$setField`/`$unsetField` with a non-constant `field`):
    /// fieldcrypt cannot tell which field they reach. `$literal` is looked into too.
    pub(super) fn check_refs(&self, v: &Bson, operator: &str) -> Result<()> {
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

    /// Any stage without a specific rule: no key, field-name parameter or `$` reference may
    /// name an encrypted field (or a document containing one).
    pub(super) fn generic_stage(&self, name: &str, body: &Bson) -> Result<()> {
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
}
