//! The one walk of schema paths over raw BSON: which elements of a document the schema's path
//! tree reaches, and what each one is. Every user says what it does at a match (the core
//! encrypts, the rotation inspector looks, a write's pre-check refuses dotted names); the rule
//! itself lives only here.
//!
//! ```text
//!  walk(doc, node)
//!   ├─ each child of `node` with a blind index ─▶ Visitor::blind_index (before the elements)
//!   └─ each element e of doc (Visitor::skip may drop it)
//!       ├─ e.name names a child: rule ─▶ Visitor::rule
//!       │                        document ─▶ open, walk(e, child), close
//!       │                        array ─▶ open, every item at any array depth:
//!       │                                  document ─▶ open, walk(item, child), close
//!       │                                  array ─▶ open, (the same again), close
//!       │                                  anything else ─▶ Visitor::other
//!       │                        anything else ─▶ Visitor::other
//!       ├─ e.name holds a '.' ─▶ Visitor::dotted (a literal name that may spell a schema path)
//!       └─ otherwise ─▶ Visitor::other
//! ```
//!
//! Paths go through arrays, nested ones included (MongoDB's own path semantics): the same node
//! applies to every embedded document at any array depth, and array positions are left out of
//! the path. The walk is generic over its visitor, so each user gets its own compiled copy with
//! the hooks inlined: no dynamic call and no allocation per element.

use bson::RawDocument;

use super::{Node, Schema};
use crate::error::{Error, Result};
use crate::rawbson::{self, ty, Element};

/// The deepest nesting fieldcrypt walks (MongoDB's own limit is 100 levels).
pub(crate) const MAX_DEPTH: u32 = 128;

/// Refuses a document or array at nesting level `depth` when that is deeper than
/// [`MAX_DEPTH`].
///
/// # Errors
/// [`Error::MalformedBson`] past the limit.
#[inline]
pub(crate) fn check_depth(depth: u32) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::MalformedBson(format!(
            "documents nested deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(())
}

/// What a user of [`walk`] does at each place the schema reaches. `'d` is the document's
/// lifetime, `'s` the schema's.
pub(crate) trait Visitor<'d, 's> {
    /// What the visitor keeps about one document while its elements are walked (the core: the
    /// blind indexes it recomputes there; read-only users: nothing).
    type Level: Default;

    /// The path of the current element, array positions left out; [`walk`] appends each
    /// matched name and takes it off again.
    fn path(&mut self) -> &mut String;

    /// A field of `doc` that the schema gives a blind index: `source` is the field's name
    /// here, `rule` its index in [`Schema::rules`], `name` the index's field name beside it.
    /// Called for every such field before the document's elements are walked.
    ///
    /// # Errors
    /// As the visitor decides; the walk stops.
    fn blind_index(
        &mut self,
        level: &mut Self::Level,
        doc: &'d RawDocument,
        source: &str,
        rule: usize,
        name: &'s str,
    ) -> Result<()> {
        let _ = (level, doc, source, rule, name);
        Ok(())
    }

    /// Whether to pass over `e` entirely (no other hook sees it).
    fn skip(&self, level: &Self::Level, e: &Element<'d>) -> bool {
        let _ = (level, e);
        false
    }

    /// An element at a rule's path (`rule` is its index in [`Schema::rules`]); the walk does
    /// not look inside it.
    ///
    /// # Errors
    /// As the visitor decides; the walk stops.
    fn rule(&mut self, rule: usize, e: Element<'d>) -> Result<()>;

    /// An element whose name holds a `.` at index `dot`, at a level of `node` (the schema names
    /// no such child): MongoDB stores `{"a.b": v}` under that literal name, outside the nested
    /// path `a.b` the schema may encrypt. The path does not include the name.
    ///
    /// # Errors
    /// As the visitor decides (typically refusing the name); the walk stops.
    fn dotted(&mut self, node: &'s Node, dot: usize, e: Element<'d>) -> Result<()>;

    /// Any other element the walk reaches: one the schema does not name, a scalar where the
    /// schema expects a document, or a scalar item of an array on a schema path.
    ///
    /// # Errors
    /// As the visitor decides; the walk stops.
    fn other(&mut self, e: Element<'d>) -> Result<()> {
        let _ = e;
        Ok(())
    }

    /// A document or array element the walk is about to go into; what this returns is given
    /// back to [`Visitor::close`] when it comes out (the core: where the length goes).
    ///
    /// # Errors
    /// As the visitor decides; the walk stops.
    fn open(&mut self, e: &Element<'d>) -> Result<usize> {
        let _ = e;
        Ok(0)
    }

    /// The walk came out of the document or array that [`Visitor::open`] returned `mark` for.
    ///
    /// # Errors
    /// As the visitor decides; the walk stops.
    fn close(&mut self, mark: usize) -> Result<()> {
        let _ = mark;
        Ok(())
    }
}

/// Walks the elements of `doc`, which the schema reaches at `node`, at nesting level `depth`.
///
/// # Errors
/// Malformed BSON, nesting deeper than [`MAX_DEPTH`], or what a hook returns.
pub(crate) fn walk<'d, 's, V: Visitor<'d, 's>>(
    v: &mut V,
    schema: &'s Schema,
    doc: &'d RawDocument,
    node: &'s Node,
    depth: u32,
) -> Result<()> {
    check_depth(depth)?;
    let mut level = V::Level::default();
    // Blind indexes sit next to their source field.
    for (key, child) in &node.children {
        let Some(ri) = child.rule else {
            continue;
        };
        if let Some(name) = schema.blind_index_name_of(ri) {
            v.blind_index(&mut level, doc, key, ri, name)?;
        }
    }
    let mut next_child = 0;
    for e in rawbson::elements(doc) {
        let e = e?;
        if v.skip(&level, &e) {
            continue;
        }
        let Some((name, child)) = node.child_after(e.name, &mut next_child) else {
            // A byte scan: `str::find` costs several times more on names this short, and a
            // '.' byte is always a char boundary.
            match e.name.iter().position(|&b| b == b'.') {
                Some(dot) => v.dotted(node, dot, e)?,
                None => v.other(e)?,
            }
            continue;
        };
        // The schema's copy of the name: already a `str`.
        let mark = push(v.path(), name);
        if let Some(ri) = child.rule {
            v.rule(ri, e)?;
        } else if e.ty == ty::DOCUMENT {
            let at = v.open(&e)?;
            walk(v, schema, e.document()?, child, depth + 1)?;
            v.close(at)?;
        } else if e.ty == ty::ARRAY {
            let at = v.open(&e)?;
            walk_array(v, schema, e.document()?, child, depth + 1)?;
            v.close(at)?;
        } else {
            v.other(e)?;
        }
        v.path().truncate(mark);
    }
    Ok(())
}

/// The items of an array the schema reaches at `node`: embedded documents are walked against
/// `node` itself, inner arrays likewise, at any depth.
fn walk_array<'d, 's, V: Visitor<'d, 's>>(
    v: &mut V,
    schema: &'s Schema,
    array: &'d RawDocument,
    node: &'s Node,
    depth: u32,
) -> Result<()> {
    check_depth(depth)?;
    for item in rawbson::elements(array) {
        let item = item?;
        match item.ty {
            ty::DOCUMENT => {
                let at = v.open(&item)?;
                walk(v, schema, item.document()?, node, depth + 1)?;
                v.close(at)?;
            }
            ty::ARRAY => {
                let at = v.open(&item)?;
                walk_array(v, schema, item.document()?, node, depth + 1)?;
                v.close(at)?;
            }
            _ => v.other(item)?,
        }
    }
    Ok(())
}

/// Appends `key` to a dotted path; returns the length to truncate back to.
pub(crate) fn push(path: &mut String, key: &str) -> usize {
    let len = path.len();
    if len > 0 {
        path.push('.');
    }
    path.push_str(key);
    len
}

#[cfg(test)]
mod tests {
    use bson::{doc, RawDocumentBuf};

    use super::*;
    use crate::schema::Field;

    /// Records what the walk shows, as `hook:path` strings.
    #[derive(Default)]
    struct Record {
        path: String,
        seen: Vec<String>,
    }

    impl<'d, 's> Visitor<'d, 's> for Record {
        type Level = ();
        fn path(&mut self) -> &mut String {
            &mut self.path
        }
        fn blind_index(
            &mut self,
            _: &mut (),
            _: &'d RawDocument,
            source: &str,
            _: usize,
            name: &'s str,
        ) -> Result<()> {
            self.seen.push(format!("index:{source}->{name}"));
            Ok(())
        }
        fn rule(&mut self, _: usize, _: Element<'d>) -> Result<()> {
            self.seen.push(format!("rule:{}", self.path));
            Ok(())
        }
        fn dotted(&mut self, _: &'s Node, dot: usize, e: Element<'d>) -> Result<()> {
            self.seen
                .push(format!("dotted:{}|{}", self.path, &e.key()[..dot]));
            Ok(())
        }
    }

    fn schema() -> Schema {
        Schema::builder()
            .field("a.b", Field::randomized("k"))
            .field(
                "c",
                Field::randomized("k").with_blind_index(crate::BlindIndex::new("i")),
            )
            .build()
            .unwrap()
    }

    fn seen(doc: &bson::Document) -> Result<Vec<String>> {
        let schema = schema();
        let raw = RawDocumentBuf::from_document(doc).unwrap();
        let mut r = Record::default();
        walk(&mut r, &schema, &raw, schema.tree(), 0)?;
        Ok(r.seen)
    }

    #[test]
    fn reaches_rules_through_arrays_at_any_depth() {
        let d = doc! { "a": [[{ "b": 1 }], { "b": 2 }, 3], "c": 4, "x": { "b": 5 } };
        assert_eq!(
            seen(&d).unwrap(),
            ["index:c->c_bidx", "rule:a.b", "rule:a.b", "rule:c"]
        );
    }

    #[test]
    fn reports_dotted_names_where_the_schema_has_children() {
        let d = doc! { "a.b": 1, "a": { "b.c": 2 }, "x.y": 3 };
        assert_eq!(
            seen(&d).unwrap(),
            ["index:c->c_bidx", "dotted:|a", "dotted:a|b", "dotted:|x"]
        );
    }

    #[test]
    fn fail_nesting_deeper_than_the_limit() {
        let nested = |levels: u32| {
            let mut v = bson::Bson::Document(doc! { "b": 1 });
            for _ in 0..levels {
                v = bson::Bson::Array(vec![v]);
            }
            doc! { "a": v }
        };
        // The top document is level 0 here; `a`'s arrays are the next levels.
        assert!(seen(&nested(MAX_DEPTH - 1)).is_ok());
        assert!(matches!(
            seen(&nested(MAX_DEPTH)),
            Err(Error::MalformedBson(_))
        ));
    }
}
