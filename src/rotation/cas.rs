//! Compare-and-set writes: what changed in a document, the filter that only matches the
//! document as it was read, and the update that writes only what changed.
//!
//! Changes are found by comparing the stored bytes with the re-encrypted bytes, descending into
//! embedded documents (not arrays), so an update `$set`s only the values that differ and leaves
//! every other field — including ones an application changes meanwhile — alone. The filter pins
//! `_id` and the old value of every changed path (`$eq`, or `$exists: false` for a path that is
//! new), so a concurrent write to any of them makes the update match nothing.
//!
//! A query's `$eq` alone is looser than "the same value": it matches an array that merely
//! contains the value (or, for an old array, an array holding it as an element), it compares
//! numbers across types (`1` equals `1.0`), and it compares strings with the collection's
//! default collation (maybe case-insensitive). So a statement that pins a string (plaintext
//! being migrated; ciphertexts and blind indexes are binary, which no collation affects)
//! carries `collation: {locale: "simple"}` (binary string comparison), and each old value is pinned
//! exactly: a scalar by `{$eq: v, $type: <its type>, $not: {$type: "array"}}`; an array by
//! `{$eq: a, $not: {$elemMatch: {$type: "array"}}}` (the old array holds no array, so a value
//! holding it as an element is refused), or, for an old array that holds arrays itself, by
//! `$eq` and `{$expr: {$eq: ["$path", {$literal: a}]}}` (aggregation `$eq` compares arrays
//! whole). `$expr` and the collation are kept to the cases that need them because either can
//! keep a server from looking the document up by `_id` alone (the dev server then scans the
//! collection for every statement: 40 updates a second instead of 900).

use bson::{RawDocument, RawDocumentBuf};

use crate::error::{Error, Result};
use crate::rawbson::{self, ty, Element};

/// One changed path: its old and new value (type byte and value bytes), `None` when absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change {
    pub path: String,
    pub old: Option<(u8, Vec<u8>)>,
    pub new: Option<(u8, Vec<u8>)>,
    /// Whether the last path segment can be named in a dotted path (no `.`, no leading `$`).
    pub addressable: bool,
}

/// The paths that differ between `old` and `new`.
pub(crate) fn diff(old: &RawDocument, new: &RawDocument) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    diff_into(old, new, "", &mut out)?;
    Ok(out)
}

fn diff_into(
    old: &RawDocument,
    new: &RawDocument,
    prefix: &str,
    out: &mut Vec<Change>,
) -> Result<()> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    for n in rawbson::elements(new) {
        let n = n?;
        let key = n.key();
        match rawbson::find(old, n.name)? {
            Some(o) if o.ty == n.ty && o.value == n.value => {}
            Some(o)
                if o.ty == ty::DOCUMENT
                    && n.ty == ty::DOCUMENT
                    && addressable(o.document()?)?
                    && addressable(n.document()?)? =>
            {
                diff_into(o.document()?, n.document()?, &join(key), out)?;
            }
            o => out.push(Change {
                path: join(key),
                old: o.map(|o| (o.ty, o.value.to_vec())),
                new: Some((n.ty, n.value.to_vec())),
                addressable: is_plain_key(key),
            }),
        }
    }
    for o in rawbson::elements(old) {
        let o = o?;
        if rawbson::find(new, o.name)?.is_none() {
            let key = o.key();
            out.push(Change {
                path: join(key),
                old: Some((o.ty, o.value.to_vec())),
                new: None,
                addressable: is_plain_key(key),
            });
        }
    }
    Ok(())
}

fn is_plain_key(k: &str) -> bool {
    !(k.is_empty() || k.contains('.') || k.starts_with('$'))
}

/// Whether every key of a document can be named in a dotted path.
fn addressable(doc: &RawDocument) -> Result<bool> {
    for e in rawbson::elements(doc) {
        if !is_plain_key(e?.key()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether every change can be written with a dotted path (and none touches `_id`).
pub(crate) fn writable(id: &Element<'_>, changes: &[Change]) -> bool {
    id.name == b"_id"
        && !changes.is_empty()
        && changes
            .iter()
            .all(|c| c.addressable && c.path != "_id" && !c.path.starts_with("_id."))
}

/// The `$type` aggregation operator's name of a BSON type.
fn type_name(t: u8) -> Result<&'static str> {
    Ok(match t {
        ty::DOUBLE => "double",
        ty::STRING => "string",
        ty::DOCUMENT => "object",
        ty::ARRAY => "array",
        ty::BINARY => "binData",
        ty::UNDEFINED => "undefined",
        ty::OBJECT_ID => "objectId",
        ty::BOOLEAN => "bool",
        ty::DATETIME => "date",
        ty::NULL => "null",
        ty::REGEX => "regex",
        ty::DB_POINTER => "dbPointer",
        ty::JAVASCRIPT => "javascript",
        ty::SYMBOL => "symbol",
        ty::CODE_WITH_SCOPE => "javascriptWithScope",
        ty::INT32 => "int",
        ty::TIMESTAMP => "timestamp",
        ty::INT64 => "long",
        ty::DECIMAL128 => "decimal",
        ty::MIN_KEY => "minKey",
        ty::MAX_KEY => "maxKey",
        _ => return Err(Error::MalformedBson("unknown BSON type".into())),
    })
}

/// One `update` command statement: `{q: filter, u: {$set, $unset}, multi: false, upsert:
/// false, collation: {locale: "simple"}}`; see the module documentation for the filter.
pub(crate) fn statement(id: &Element<'_>, changes: &[Change]) -> Result<RawDocumentBuf> {
    let mut out = Vec::with_capacity(256);
    let at = rawbson::begin_len(&mut out);
    // q
    rawbson::put_key(&mut out, ty::DOCUMENT, "q");
    let q = rawbson::begin_len(&mut out);
    rawbson::put_key(&mut out, id.ty, "_id");
    out.extend_from_slice(id.value);
    // Old arrays that hold arrays themselves: only an `$expr` compares them whole.
    let mut whole: Vec<(&str, &[u8])> = Vec::new();
    for c in changes {
        rawbson::put_key(&mut out, ty::DOCUMENT, &c.path);
        let cond = rawbson::begin_len(&mut out);
        match &c.old {
            // `{$eq: null}` also matches a missing field; pin the type instead.
            Some((t, _)) if *t == ty::NULL || *t == ty::UNDEFINED => {
                rawbson::put_key(&mut out, ty::STRING, "$type");
                put_str(&mut out, type_name(*t)?)?;
                not_type_array(&mut out)?;
            }
            Some((ty::ARRAY, v)) => {
                rawbson::put_key(&mut out, ty::ARRAY, "$eq");
                out.extend_from_slice(v);
                if holds_array(v)? {
                    whole.push((&c.path, v));
                } else {
                    // `$eq` also matches an array holding the old array as an element: refuse
                    // any array element (the old array has none).
                    rawbson::put_key(&mut out, ty::DOCUMENT, "$not");
                    let not = rawbson::begin_len(&mut out);
                    rawbson::put_key(&mut out, ty::DOCUMENT, "$elemMatch");
                    let em = rawbson::begin_len(&mut out);
                    rawbson::put_key(&mut out, ty::STRING, "$type");
                    put_str(&mut out, "array")?;
                    rawbson::end_doc(&mut out, em)?;
                    rawbson::end_doc(&mut out, not)?;
                }
            }
            Some((t, v)) => {
                // The exact type (`$eq` compares numbers across types), and not an array
                // (`$eq` and `$type` also match an array holding such a value).
                rawbson::put_key(&mut out, *t, "$eq");
                out.extend_from_slice(v);
                rawbson::put_key(&mut out, ty::STRING, "$type");
                put_str(&mut out, type_name(*t)?)?;
                not_type_array(&mut out)?;
            }
            None => {
                rawbson::put_key(&mut out, ty::BOOLEAN, "$exists");
                out.push(0);
            }
        }
        rawbson::end_doc(&mut out, cond)?;
    }
    if !whole.is_empty() {
        // $expr: {$and: [{$eq: ["$path", {$literal: <old array>}]}, …]}
        rawbson::put_key(&mut out, ty::DOCUMENT, "$expr");
        let expr = rawbson::begin_len(&mut out);
        rawbson::put_key(&mut out, ty::ARRAY, "$and");
        let and = rawbson::begin_len(&mut out);
        for (i, (path, v)) in whole.iter().enumerate() {
            rawbson::put_key(&mut out, ty::DOCUMENT, &i.to_string());
            let eq = rawbson::begin_len(&mut out);
            rawbson::put_key(&mut out, ty::ARRAY, "$eq");
            let args = rawbson::begin_len(&mut out);
            rawbson::put_key(&mut out, ty::STRING, "0");
            put_str(&mut out, &format!("${path}"))?;
            rawbson::put_key(&mut out, ty::DOCUMENT, "1");
            let lit = rawbson::begin_len(&mut out);
            rawbson::put_key(&mut out, ty::ARRAY, "$literal");
            out.extend_from_slice(v);
            rawbson::end_doc(&mut out, lit)?;
            rawbson::end_doc(&mut out, args)?;
            rawbson::end_doc(&mut out, eq)?;
        }
        rawbson::end_doc(&mut out, and)?;
        rawbson::end_doc(&mut out, expr)?;
    }
    rawbson::end_doc(&mut out, q)?;
    // u
    rawbson::put_key(&mut out, ty::DOCUMENT, "u");
    let u = rawbson::begin_len(&mut out);
    if changes.iter().any(|c| c.new.is_some()) {
        rawbson::put_key(&mut out, ty::DOCUMENT, "$set");
        let s = rawbson::begin_len(&mut out);
        for c in changes {
            if let Some((t, v)) = &c.new {
                rawbson::put_key(&mut out, *t, &c.path);
                out.extend_from_slice(v);
            }
        }
        rawbson::end_doc(&mut out, s)?;
    }
    if changes.iter().any(|c| c.new.is_none()) {
        rawbson::put_key(&mut out, ty::DOCUMENT, "$unset");
        let s = rawbson::begin_len(&mut out);
        for c in changes.iter().filter(|c| c.new.is_none()) {
            rawbson::put_key(&mut out, ty::STRING, &c.path);
            put_str(&mut out, "")?;
        }
        rawbson::end_doc(&mut out, s)?;
    }
    rawbson::end_doc(&mut out, u)?;
    rawbson::put_key(&mut out, ty::BOOLEAN, "multi");
    out.push(0);
    rawbson::put_key(&mut out, ty::BOOLEAN, "upsert");
    out.push(0);
    // Strings compare byte for byte, whatever the collection's default collation. Only
    // strings are compared by collation, so ciphertexts and blind indexes (binary) need none.
    let mut strings = false;
    for c in changes {
        if let Some((t, v)) = &c.old {
            strings |= holds_string(*t, v)?;
        }
    }
    if strings {
        rawbson::put_key(&mut out, ty::DOCUMENT, "collation");
        let coll = rawbson::begin_len(&mut out);
        rawbson::put_key(&mut out, ty::STRING, "locale");
        put_str(&mut out, "simple")?;
        rawbson::end_doc(&mut out, coll)?;
    }
    rawbson::end_doc(&mut out, at)?;
    RawDocumentBuf::from_bytes(out).map_err(Error::from)
}

/// `$not: {$type: "array"}`, inside an operator document.
fn not_type_array(out: &mut Vec<u8>) -> Result<()> {
    rawbson::put_key(out, ty::DOCUMENT, "$not");
    let not = rawbson::begin_len(out);
    rawbson::put_key(out, ty::STRING, "$type");
    put_str(out, "array")?;
    rawbson::end_doc(out, not)
}

/// Whether a value is, or holds at any depth, a string (what a collation compares).
fn holds_string(t: u8, v: &[u8]) -> Result<bool> {
    match t {
        ty::STRING | ty::SYMBOL => Ok(true),
        ty::DOCUMENT | ty::ARRAY => {
            for e in rawbson::elements(RawDocument::from_bytes(v)?) {
                let e = e?;
                if holds_string(e.ty, e.value)? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        _ => Ok(false),
    }
}

/// Whether an array's bytes (a BSON document) hold an array element.
fn holds_array(array: &[u8]) -> Result<bool> {
    let d = RawDocument::from_bytes(array)?;
    for e in rawbson::elements(d) {
        if e?.ty == ty::ARRAY {
            return Ok(true);
        }
    }
    Ok(false)
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let len =
        u32::try_from(s.len() + 1).map_err(|_| Error::MalformedBson("string too long".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(())
}

/// Whether `doc` (re-read after a write) holds exactly the new values of `changes`: then the
/// write was applied.
pub(crate) fn applied(doc: &RawDocument, changes: &[Change]) -> Result<bool> {
    for c in changes {
        let now = lookup(doc, &c.path)?;
        let same = match (&now, &c.new) {
            (None, None) => true,
            (Some((t, v)), Some((nt, nv))) => t == nt && v == nv,
            _ => false,
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The value at a dotted path through embedded documents.
fn lookup(doc: &RawDocument, path: &str) -> Result<Option<(u8, Vec<u8>)>> {
    let mut cur = doc;
    let mut segs = path.split('.').peekable();
    while let Some(seg) = segs.next() {
        let Some(e) = rawbson::find(cur, seg)? else {
            return Ok(None);
        };
        if segs.peek().is_none() {
            return Ok(Some((e.ty, e.value.to_vec())));
        }
        if e.ty != ty::DOCUMENT {
            return Ok(None);
        }
        cur = e.document()?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, rawdoc, RawDocumentBuf};

    #[test]
    fn diff_descends_into_documents_only() {
        let old =
            rawdoc! { "_id": 1, "a": { "x": 1, "y": 2 }, "arr": [1, 2], "gone": true, "same": "s" };
        let new =
            rawdoc! { "_id": 1, "a": { "x": 1, "y": 3 }, "arr": [1, 3], "same": "s", "added": 5 };
        let changes = diff(&old, &new).unwrap();
        let paths: Vec<_> = changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["a.y", "arr", "added", "gone"]);
        assert!(changes[2].old.is_none());
        assert!(changes[3].new.is_none());
        assert!(applied(&new, &changes).unwrap());
        assert!(!applied(&old, &changes).unwrap());
    }

    #[test]
    fn statement_pins_old_values() {
        let old = rawdoc! { "_id": 7, "a": { "x": 1 }, "n": null, "gone": 1 };
        let new = rawdoc! { "_id": 7, "a": { "x": 2 }, "n": 5, "added": 1 };
        let changes = diff(&old, &new).unwrap();
        let id = rawbson::find(&old, "_id").unwrap().unwrap();
        assert!(writable(&id, &changes));
        let st = statement(&id, &changes).unwrap().to_document().unwrap();
        let exact = |t: &str| doc! { "$eq": 1, "$type": t, "$not": { "$type": "array" } };
        assert_eq!(
            st,
            doc! {
                "q": {
                    "_id": 7, "a.x": exact("int"),
                    "n": { "$type": "null", "$not": { "$type": "array" } },
                    "added": { "$exists": false }, "gone": exact("int"),
                },
                "u": { "$set": { "a.x": 2, "n": 5, "added": 1 }, "$unset": { "gone": "" } },
                "multi": false, "upsert": false,
            }
        );
    }

    #[test]
    fn statement_pins_arrays_whole() {
        let id_doc = rawdoc! { "_id": 1 };
        let id = rawbson::find(&id_doc, "_id").unwrap().unwrap();
        let q = |old: RawDocumentBuf| {
            let changes = diff(&old, &rawdoc! { "_id": 1, "tags": ["x"] }).unwrap();
            let st = statement(&id, &changes).unwrap().to_document().unwrap();
            st.get_document("q").unwrap().clone()
        };
        // Strings are compared byte for byte, binary values need no collation.
        let st = |old: RawDocumentBuf| {
            let changes = diff(&old, &rawdoc! { "_id": 1, "v": 2 }).unwrap();
            statement(&id, &changes).unwrap().to_document().unwrap()
        };
        let simple = Some(&bson::Bson::Document(doc! { "locale": "simple" }));
        assert_eq!(st(rawdoc! { "_id": 1, "v": "s" }).get("collation"), simple);
        assert_eq!(
            st(rawdoc! { "_id": 1, "v": { "a": [1, "s"] } }).get("collation"),
            simple
        );
        let bin = bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: b"s".to_vec(),
        };
        assert_eq!(st(rawdoc! { "_id": 1, "v": bin }).get("collation"), None);
        // An array of scalars: no element may be an array (the old one has none).
        assert_eq!(
            q(rawdoc! { "_id": 1, "tags": ["a", "$b"] }),
            doc! {
                "_id": 1,
                "tags": { "$eq": ["a", "$b"], "$not": { "$elemMatch": { "$type": "array" } } },
            }
        );
        // An array holding an array: compared whole by an $expr (literally: "$b" is no path).
        assert_eq!(
            q(rawdoc! { "_id": 1, "tags": [["a"], "$b"] }),
            doc! {
                "_id": 1,
                "tags": { "$eq": [["a"], "$b"] },
                "$expr": { "$and": [{ "$eq": ["$tags", { "$literal": [["a"], "$b"] }] }] },
            }
        );
    }

    #[test]
    fn dotted_keys_are_replaced_whole() {
        let old = rawdoc! { "_id": 1, "a": { "x.y": 1 } };
        let new = rawdoc! { "_id": 1, "a": { "x.y": 2 } };
        let changes = diff(&old, &new).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].path, "a");
    }
}
