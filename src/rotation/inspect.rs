//! Looking at one stored document: which of its values are up to date with the schema and
//! the keyring, and which need work. Shared by the rotation engine and the audit.
//!
//! Two walks over the raw bytes, nothing decrypted:
//! - along the schema (the core's schema walk, `schema/walk.rs`): each encrypted field's value
//!   (ciphertext under which key and suite, with which bindings; or plaintext; or a CSFLE
//!   value) and each blind index (under which key);
//! - over the whole document: every ciphertext anywhere, to find ones the schema does not know
//!   (the engine never rewrites a document it could not re-encrypt completely).

use std::collections::HashMap;

use bson::RawDocument;

use crate::blind_index::{self, BLIND_INDEX_SUBTYPE};
use crate::envelope::{flags, Envelope, ENVELOPE_SUBTYPE};
use crate::error::Result;
use crate::key::KeyId;
use crate::keyring::Keyring;
use crate::qe::{self, QeValueKind, SAFE_CONTENT_FIELD};
use crate::rawbson::{self, ty, Element};
use crate::schema::walk::{self, check_depth, push, Visitor, MAX_DEPTH};
use crate::schema::{overlaps, Encryption, FieldRule, Node, Schema};
use crate::suite::Suite;
use crate::transform::{Context, CSFLE_SUBTYPE};

/// The current primary key of each alias, looked up once per batch.
#[derive(Debug, Default, Clone)]
pub(crate) struct Primaries {
    ids: HashMap<String, Option<KeyId>>,
}

impl Primaries {
    /// Looks up the primaries of every alias the schema names.
    pub(crate) fn resolve(schema: &Schema, keyring: &dyn Keyring) -> Result<Self> {
        let mut ids = HashMap::new();
        for alias in schema.aliases() {
            ids.insert(alias.to_owned(), Some(keyring.primary(alias)?.id()));
        }
        Ok(Primaries { ids })
    }

    fn is_primary(&self, alias: &str, id: KeyId) -> bool {
        self.ids.get(alias).copied().flatten() == Some(id)
    }

    /// `alias → key id`, sorted, for checkpoints.
    pub(crate) fn sorted(&self) -> Vec<(String, KeyId)> {
        let mut v: Vec<_> = self
            .ids
            .iter()
            .filter_map(|(a, id)| id.map(|id| (a.clone(), id)))
            .collect();
        v.sort();
        v
    }
}

/// A ciphertext found somewhere in a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    /// Its path, array positions left out.
    pub path: String,
    /// What it is.
    pub kind: FoundKind,
    /// Whether the schema encrypts this path (so a rewrite re-encrypts it).
    pub managed: bool,
}

/// The kinds of ciphertext.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FoundKind {
    /// A fieldcrypt envelope.
    Envelope { key: KeyId, suite: Suite },
    /// A MongoDB CSFLE (FLE1) value, or another subtype-6 payload that is no stored QE value.
    Csfle { key: Option<KeyId> },
    /// A stored MongoDB Queryable Encryption value; `key` is the id in its header (for
    /// indexed values `S_KeyId`).
    Qe { kind: QeValueKind, key: KeyId },
    /// A blind index.
    BlindIndex { key: KeyId },
}

/// What a document's encrypted fields need.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scan {
    /// A value is under a key that is not its alias's primary.
    pub stale_key: bool,
    /// A value uses another suite than the schema's.
    pub suite: bool,
    /// A value is bound differently (namespace, `_id`, owner, padding, per-element) than the
    /// schema now says.
    pub mode: bool,
    /// Paths of schema fields holding plaintext.
    pub plaintext: Vec<String>,
    /// A schema field holds a CSFLE value.
    pub csfle: bool,
    /// A schema field holds a stored Queryable Encryption value.
    pub qe: bool,
    /// The document has a top-level `__safeContent__` (QE's tags): removed when migrating
    /// from QE, left alone otherwise (filled by [`Inspector::scan_all`]).
    pub safe_content: bool,
    /// A blind index is under a non-primary key.
    pub stale_index: bool,
    /// An encrypted field lacks its blind index.
    pub missing_index: bool,
    /// Every ciphertext in the document (filled by [`Inspector::scan_all`]).
    pub found: Vec<Found>,
    /// Paths of malformed ciphertexts.
    pub malformed: Vec<String>,
}

impl Scan {
    /// Whether anything in the document differs from what the schema and keyring want.
    pub(crate) fn is_current(&self) -> bool {
        !(self.stale_key
            || self.suite
            || self.mode
            || self.csfle
            || self.qe
            || self.stale_index
            || self.missing_index
            || !self.plaintext.is_empty())
    }

    /// Whether the document needs key or format work (not counting plaintext, CSFLE or QE).
    pub(crate) fn needs_reencryption(&self) -> bool {
        self.stale_key || self.suite || self.mode || self.stale_index || self.missing_index
    }

    /// The first ciphertext outside the schema, if any.
    pub(crate) fn unmanaged(&self) -> Option<&str> {
        self.found
            .iter()
            .find(|f| !f.managed && !matches!(f.kind, FoundKind::BlindIndex { .. }))
            .map(|f| f.path.as_str())
    }

    /// A short description of what is still wrong, for a failure message (names no values).
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.stale_key {
            parts.push("a value under a non-primary key".to_owned());
        }
        if self.suite {
            parts.push("a value in another suite".to_owned());
        }
        if self.mode {
            parts.push("a value bound differently than the schema says".to_owned());
        }
        if let Some(p) = self.plaintext.first() {
            parts.push(format!("plaintext at {p:?}"));
        }
        if self.csfle {
            parts.push("a CSFLE value".to_owned());
        }
        if self.qe {
            parts.push("a Queryable Encryption value".to_owned());
        }
        if self.safe_content {
            parts.push(format!("a {SAFE_CONTENT_FIELD} field"));
        }
        if self.stale_index {
            parts.push(
                "a blind index under a non-primary key (an index-only field keeps no value to recompute it from)"
                    .to_owned(),
            );
        }
        if self.missing_index {
            parts.push("a missing blind index".to_owned());
        }
        parts.join(", ")
    }
}

/// Walks documents against one schema.
pub(crate) struct Inspector<'a> {
    pub schema: &'a Schema,
    pub primaries: &'a Primaries,
    pub ctx: &'a Context,
}

impl<'a> Inspector<'a> {
    /// The schema walk: fills the need flags and the plaintext paths.
    pub(crate) fn scan_schema(&self, doc: &RawDocument, out: &mut Scan) -> Result<()> {
        let mut v = SchemaScan {
            insp: self,
            path: String::new(),
            out,
        };
        // Levels counted from 0, as `scan_all` counts them.
        walk::walk(&mut v, self.schema, doc, self.schema.tree(), 0)
    }

    /// The whole-document walk: every ciphertext, and whether the schema manages it.
    pub(crate) fn scan_all(&self, doc: &RawDocument, out: &mut Scan) -> Result<()> {
        let mut path = String::new();
        self.walk_all(doc, false, &mut path, out, 0)
    }

    /// Both walks.
    pub(crate) fn scan(&self, doc: &RawDocument) -> Result<Scan> {
        let mut s = Scan::default();
        self.scan_schema(doc, &mut s)?;
        self.scan_all(doc, &mut s)?;
        Ok(s)
    }

    /// A blind index the schema puts beside `source` in `doc`: stale when it is not under the
    /// alias's primary key (or not an index at all), missing when the source holds a
    /// ciphertext and no index sits beside it.
    fn blind_index(
        &self,
        doc: &RawDocument,
        source: &str,
        rule: usize,
        name: &str,
        out: &mut Scan,
    ) -> Result<()> {
        let Some(bi) = &self.schema.rules()[rule].field.blind_index else {
            return Ok(());
        };
        match rawbson::find(doc, name)? {
            Some(ix) => match ix.binary() {
                Some((BLIND_INDEX_SUBTYPE, p)) => match blind_index::key_id(p) {
                    Ok(id) if self.primaries.is_primary(&bi.key, id) => {}
                    Ok(_) => out.stale_index = true,
                    Err(_) => out.stale_index = true,
                },
                // Not an index at all: recomputing it is the fix.
                _ => out.stale_index = true,
            },
            None => {
                if let Some(src) = rawbson::find(doc, source)? {
                    if is_ciphertext(&src) {
                        out.missing_index = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// A field name containing `.` that spells (part of) an encrypted path, `{"profile.email":
    /// …}`: MongoDB stores it under that literal name, outside the nested path the schema
    /// encrypts, so its value is in clear (the core refuses to write such documents; another
    /// writer may have). Reported as plaintext at that path, or as drift when it holds a
    /// ciphertext; re-encryption cannot fix it (the core refuses the name), so the document
    /// fails with the core's reason.
    fn literal_dots(&self, e: &Element<'_>, path: &str, out: &mut Scan) {
        let full = if path.is_empty() {
            e.key().to_owned()
        } else {
            format!("{path}.{}", e.key())
        };
        let encrypted = self
            .schema
            .rules()
            .iter()
            .any(|r| r.field.encrypt.is_some() && overlaps(&r.normalized, &full));
        if !encrypted {
            return;
        }
        if is_ciphertext(e) {
            out.mode = true;
        } else {
            out.plaintext.push(full);
        }
    }

    fn field(&self, rule: &FieldRule, e: Element<'_>, path: &str, out: &mut Scan) -> Result<()> {
        let Some(enc) = &rule.field.encrypt else {
            // An index-only field stores no value: whatever is there should go.
            if is_ciphertext(&e) {
                out.mode = true;
            } else {
                out.plaintext.push(path.to_owned());
            }
            return Ok(());
        };
        if rule.each_element {
            if e.ty == ty::ARRAY {
                // Each element is sealed on its own, an inner array as one element (as the
                // core seals them).
                for item in rawbson::elements(e.document()?) {
                    self.value(rule, enc, &item?, Each::Element, path, out);
                }
            } else {
                self.value(rule, enc, &e, Each::WholeField, path, out);
            }
        } else {
            self.value(rule, enc, &e, Each::No, path, out);
        }
        Ok(())
    }

    fn value(
        &self,
        rule: &FieldRule,
        enc: &Encryption,
        e: &Element<'_>,
        each: Each,
        path: &str,
        out: &mut Scan,
    ) {
        match e.binary() {
            Some((ENVELOPE_SUBTYPE, p)) => {
                let Ok(env) = Envelope::parse(p) else {
                    out.malformed.push(path.to_owned());
                    return;
                };
                if !self.primaries.is_primary(&enc.key, env.key_id) {
                    out.stale_key = true;
                }
                if env.suite != enc.suite {
                    out.suite = true;
                }
                let want = |flag: u8, on: bool| (env.flags() & flag != 0) != on;
                if want(flags::ID, rule.field.bind_id)
                    || want(flags::PADDED, rule.field.pad_to.is_some())
                    || want(flags::NAMESPACE, self.ctx.namespace.is_some())
                    || want(flags::OWNER, self.schema.owner_field().is_some())
                    // An array sealed whole where each element should be sealed alone.
                    || (each == Each::WholeField && env.bson_type() == ty::ARRAY)
                {
                    out.mode = true;
                }
            }
            Some((CSFLE_SUBTYPE, p)) if QeValueKind::of(p).is_some() => out.qe = true,
            Some((CSFLE_SUBTYPE, _)) => out.csfle = true,
            _ if each == Each::No && e.ty == ty::ARRAY && array_holds_ciphertext(e) => {
                out.mode = true;
            }
            _ => out.plaintext.push(path.to_owned()),
        }
    }

    fn walk_all(
        &self,
        doc: &RawDocument,
        is_array: bool,
        path: &mut String,
        out: &mut Scan,
        depth: u32,
    ) -> Result<()> {
        check_depth(depth)?;
        for e in rawbson::elements(doc) {
            let e = e?;
            let mark = if is_array {
                path.len()
            } else {
                push(path, e.key())
            };
            match (e.ty, e.binary()) {
                (ty::ARRAY, _) if depth == 0 && e.name == SAFE_CONTENT_FIELD.as_bytes() => {
                    out.safe_content = true;
                }
                (ty::DOCUMENT | ty::ARRAY, _) => {
                    self.walk_all(e.document()?, e.ty == ty::ARRAY, path, out, depth + 1)?;
                }
                (_, Some((ENVELOPE_SUBTYPE, p))) => match Envelope::parse(p) {
                    Ok(env) => out.found.push(Found {
                        path: path.clone(),
                        kind: FoundKind::Envelope {
                            key: env.key_id,
                            suite: env.suite,
                        },
                        managed: self.manages(path),
                    }),
                    Err(_) => out.malformed.push(path.clone()),
                },
                (_, Some((CSFLE_SUBTYPE, p))) if QeValueKind::of(p).is_some() => {
                    match qe::parse_payload(p) {
                        Ok(v) => out.found.push(Found {
                            path: path.clone(),
                            kind: FoundKind::Qe {
                                kind: v.kind,
                                key: v.key_id,
                            },
                            managed: self.manages(path),
                        }),
                        Err(_) => out.malformed.push(path.clone()),
                    }
                }
                (_, Some((CSFLE_SUBTYPE, p))) => out.found.push(Found {
                    path: path.clone(),
                    kind: FoundKind::Csfle {
                        key: csfle_key_id(p),
                    },
                    managed: self.manages(path),
                }),
                (_, Some((BLIND_INDEX_SUBTYPE, p))) => match blind_index::key_id(p) {
                    Ok(key) => out.found.push(Found {
                        path: path.clone(),
                        kind: FoundKind::BlindIndex { key },
                        managed: self.schema.rule_by_blind_index(path).is_some(),
                    }),
                    Err(_) => out.malformed.push(path.clone()),
                },
                _ => {}
            }
            path.truncate(mark);
        }
        Ok(())
    }

    fn manages(&self, path: &str) -> bool {
        self.schema
            .rule(path)
            .is_some_and(|r| r.field.encrypt.is_some())
    }
}

/// How an encrypted field's value is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Each {
    /// The field is sealed whole.
    No,
    /// An element of a per-element field's array.
    Element,
    /// A per-element field whose value is not an array (sealed as itself).
    WholeField,
}

/// The inspector's side of the schema walk: looks at each value the schema reaches, and at
/// dotted names that spell encrypted paths.
struct SchemaScan<'i, 'a> {
    insp: &'i Inspector<'a>,
    path: String,
    out: &'i mut Scan,
}

impl<'d, 'a> Visitor<'d, 'a> for SchemaScan<'_, 'a> {
    type Level = ();

    fn path(&mut self) -> &mut String {
        &mut self.path
    }

    fn blind_index(
        &mut self,
        _: &mut (),
        doc: &'d RawDocument,
        source: &str,
        rule: usize,
        name: &'a str,
    ) -> Result<()> {
        self.insp.blind_index(doc, source, rule, name, self.out)
    }

    fn rule(&mut self, rule: usize, e: Element<'d>) -> Result<()> {
        let rule = &self.insp.schema.rules()[rule];
        self.insp.field(rule, e, &self.path, self.out)
    }

    fn dotted(&mut self, _: &'a Node, _: usize, e: Element<'d>) -> Result<()> {
        self.insp.literal_dots(&e, &self.path, self.out);
        Ok(())
    }
}

/// Whether an element is a ciphertext (fieldcrypt envelope, CSFLE or QE value).
pub(crate) fn is_ciphertext(e: &Element<'_>) -> bool {
    matches!(e.binary(), Some((ENVELOPE_SUBTYPE | CSFLE_SUBTYPE, _)))
}

fn array_holds_ciphertext(e: &Element<'_>) -> bool {
    e.document()
        .is_ok_and(|d| rawbson::elements(d).any(|i| i.is_ok_and(|i| is_ciphertext(&i))))
}

/// The key id of an FLE1 payload (blob subtype 1 or 2, then the 16-byte key id).
fn csfle_key_id(p: &[u8]) -> Option<KeyId> {
    if p.len() >= 17 && matches!(p[0], 1 | 2) {
        KeyId::from_slice(&p[1..17]).ok()
    } else {
        None
    }
}

/// The keys a stored document references, read leniently: see [`references`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct References {
    /// Key ids named by fieldcrypt envelopes (0x8F), blind indexes (0x8E), MongoDB CSFLE
    /// (FLE1) values and stored Queryable Encryption values (their header's key id: for
    /// indexed values `S_KeyId`), sorted, without duplicates.
    pub keys: Vec<KeyId>,
    /// Paths (array positions left out) of values that claim to be one of those but whose key
    /// id cannot be read (truncated or otherwise malformed), and of parts of the document that
    /// are not well-formed BSON. Such a value may be under any key.
    pub unreadable: Vec<String>,
    /// Whether the document holds an indexed Queryable Encryption value: its inner key
    /// (`K_KeyId`) is known only once the outer key (listed in `keys`) is loaded, from
    /// [`Cryptor::qe_client_keys`](crate::Cryptor::qe_client_keys).
    pub qe_indexed: bool,
}

impl References {
    /// Whether every reference could be read.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// Every key id a stored document references, without stopping at the first malformed value
/// ([`Cryptor::referenced_keys`](crate::Cryptor::referenced_keys) fails on the whole document
/// instead). For reference checks that must not mistake "cannot tell" for "not referenced"
/// (`fieldcrypt keys destroy`), and for prefetching keys of documents that may hold a
/// malformed value. Other subtype-6 payloads (QE insert and find payloads, placeholders,
/// protocol version 1) are not read, as the core does not open them either.
#[must_use]
pub fn references(doc: &RawDocument) -> References {
    let mut r = References::default();
    let mut path = String::new();
    collect_references(doc, false, &mut path, &mut r, 0);
    r.keys.sort_unstable();
    r.keys.dedup();
    r
}

fn collect_references(
    doc: &RawDocument,
    is_array: bool,
    path: &mut String,
    out: &mut References,
    depth: u32,
) {
    if depth > MAX_DEPTH {
        out.unreadable.push(path.clone());
        return;
    }
    for e in rawbson::elements(doc) {
        let Ok(e) = e else {
            out.unreadable.push(path.clone());
            return;
        };
        let mark = if is_array {
            path.len()
        } else {
            push(path, e.key())
        };
        match (e.ty, e.binary()) {
            (ty::DOCUMENT | ty::ARRAY, _) => match e.document() {
                Ok(d) => collect_references(d, e.ty == ty::ARRAY, path, out, depth + 1),
                Err(_) => out.unreadable.push(path.clone()),
            },
            (_, Some((ENVELOPE_SUBTYPE, p))) => match Envelope::parse(p) {
                Ok(env) => out.keys.push(env.key_id),
                Err(_) => out.unreadable.push(path.clone()),
            },
            (_, Some((BLIND_INDEX_SUBTYPE, p))) => match blind_index::key_id(p) {
                Ok(id) => out.keys.push(id),
                Err(_) => out.unreadable.push(path.clone()),
            },
            (_, Some((CSFLE_SUBTYPE, p))) => match p.first() {
                Some(1 | 2) => match csfle_key_id(p) {
                    Some(id) => out.keys.push(id),
                    None => out.unreadable.push(path.clone()),
                },
                Some(&b) if QeValueKind::from_blob_subtype(b).is_some() => {
                    match qe::parse_payload(p) {
                        Ok(v) => {
                            out.keys.push(v.key_id);
                            out.qe_indexed |= v.kind.is_indexed();
                        }
                        Err(_) => out.unreadable.push(path.clone()),
                    }
                }
                Some(_) => {} // other QE payloads: not stored values
                None => out.unreadable.push(path.clone()),
            },
            _ => {}
        }
        path.truncate(mark);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use bson::{rawdoc, Binary, RawDocumentBuf};

    use super::*;
    use crate::keyring::InMemoryKeyring;
    use crate::schema::Field;
    use crate::transform::Cryptor;

    fn setup(schema: Schema) -> (Cryptor, Primaries) {
        let keys = InMemoryKeyring::new();
        keys.generate("pii");
        let keys: Arc<dyn Keyring> = Arc::new(keys);
        let primaries = Primaries::resolve(&schema, keys.as_ref()).unwrap();
        (Cryptor::with_shared(keys, Arc::new(schema)), primaries)
    }

    fn scan(c: &Cryptor, p: &Primaries, doc: &RawDocument) -> Scan {
        let ctx = Context::none();
        Inspector {
            schema: c.schema(),
            primaries: p,
            ctx: &ctx,
        }
        .scan(doc)
        .unwrap()
    }

    #[test]
    fn plaintext_inside_nested_arrays_is_found() {
        let schema = Schema::builder()
            .field("a.b", Field::randomized("pii"))
            .build()
            .unwrap();
        let (c, p) = setup(schema);
        let doc = rawdoc! { "_id": 1, "a": [[{ "b": "secret" }], [[{ "b": "deeper" }]], 5] };
        let s = scan(&c, &p, &doc);
        assert_eq!(s.plaintext, ["a.b", "a.b"]);
        assert!(!s.is_current());
        // Once the core has encrypted it (through the nested arrays), it is current.
        let sealed = c.encrypt_raw(&doc, &Context::none()).unwrap();
        let s = scan(&c, &p, &sealed);
        assert!(s.is_current(), "{s:?}");
        assert!(s.found.iter().all(|f| f.managed && f.path == "a.b"));
        assert_eq!(s.found.len(), 2);
    }

    #[test]
    fn literal_dotted_names_spelling_an_encrypted_path_are_plaintext() {
        let schema = Schema::builder()
            .field("profile.email", Field::randomized("pii"))
            .build()
            .unwrap();
        let (c, p) = setup(schema);
        let doc = rawdoc! { "_id": 1, "profile.email": "a@example.com", "list": [{ "x.y": 1 }] };
        let s = scan(&c, &p, &doc);
        assert_eq!(s.plaintext, ["profile.email"]);
        // Nested too, and through arrays; unrelated dotted names are left alone.
        let doc =
            rawdoc! { "_id": 1, "profile": [[{ "email.x": "a@example.com" }]], "other.name": 1 };
        let s = scan(&c, &p, &doc);
        assert_eq!(s.plaintext, ["profile.email.x"]);
    }

    #[test]
    fn per_element_arrays_holding_arrays_are_current_once_sealed() {
        let schema = Schema::builder()
            .field("tags.$[]", Field::randomized("pii"))
            .build()
            .unwrap();
        let (c, p) = setup(schema);
        let doc = rawdoc! { "_id": 1, "tags": [["a", "b"], "c"] };
        let sealed = c.encrypt_raw(&doc, &Context::none()).unwrap();
        assert!(scan(&c, &p, &sealed).is_current());
        // A per-element field sealed whole is drift.
        let whole = Schema::builder()
            .field("tags", Field::randomized("pii"))
            .build()
            .unwrap();
        let w = Cryptor::with_shared(c.keyring().clone(), Arc::new(whole));
        let sealed_whole = w.encrypt_raw(&doc, &Context::none()).unwrap();
        assert!(scan(&c, &p, &sealed_whole).mode);
    }

    #[test]
    fn references_survive_malformed_values() {
        let schema = Schema::builder()
            .field("ssn", Field::randomized("pii"))
            .build()
            .unwrap();
        let (c, _) = setup(schema);
        let sealed = c
            .encrypt_raw(&rawdoc! { "_id": 1, "ssn": "x" }, &Context::none())
            .unwrap();
        let good = references(&sealed);
        assert_eq!(good.keys.len(), 1);
        assert!(good.is_complete());
        let bin = |subtype: u8, bytes: Vec<u8>| Binary {
            subtype: bson::spec::BinarySubtype::from(subtype),
            bytes,
        };
        let mut bad = RawDocumentBuf::new();
        bad.append("_id", 2);
        bad.append("ssn", sealed.get("ssn").unwrap().unwrap().to_raw_bson());
        bad.append("broken", bin(ENVELOPE_SUBTYPE, vec![1, 2, 3]));
        bad.append("idx", bin(BLIND_INDEX_SUBTYPE, vec![9]));
        bad.append("fle1", bin(CSFLE_SUBTYPE, vec![1, 0, 0]));
        bad.append("qe", bin(CSFLE_SUBTYPE, vec![7; 40]));
        let r = references(&bad);
        assert_eq!(r.keys, good.keys);
        assert_eq!(r.unreadable, ["broken", "idx", "fle1"]);
        assert!(crate::transform::Cryptor::referenced_keys(&bad).is_err());
    }
}
