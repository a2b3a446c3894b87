//! The key document: MongoDB's CSFLE layout, plus a `fieldcrypt` sub-document on the keys
//! fieldcrypt creates.
//!
//! ```text
//! { _id: UUID (binary subtype 4),
//!   keyAltNames: ["<alias>:v<version>"],          unique (partial unique index)
//!   keyMaterial: binary subtype 0,                 the wrapped data key; absent once destroyed
//!   creationDate: date, updateDate: date,
//!   status: int,                                   0 enabled, 1 disabled (or destroyed)
//!   masterKey: { provider: "local", … },           what the KEK provider wrote
//!   fieldcrypt: { format: 2 (int),                 the layout version of this document
//!                 alias: string, state: "primary" | "active" | "disabled" | "destroyed",
//!                 kind: "fieldcrypt", version: long, generation: long,
//!                 encryptions: long, suite: string (optional) } }
//! ```
//!
//! `keyMaterial` of such a document (format 2) is the 32-byte key wrapped with associated data
//! [`associated_data`]`(id, alias, kind)`, so it unwraps only in its own document. Format 1
//! (no `format` field: wrapped with empty associated data, its metadata unbound) is refused
//! with a clear error when it would be unwrapped.
//!
//! A document without `fieldcrypt` is a CSFLE data key as libmongocrypt writes it: alias from
//! its first keyAltName (else its id), active or disabled by `status`, destroyed when it has no
//! `keyMaterial`, wrapped with empty associated data. fieldcrypt keeps such documents in that
//! exact layout when it changes them; as in MongoDB, none of their metadata is authenticated.

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};

use crate::error::{Error, Result};
use crate::key::{KeyId, KeyKind, KeyState};

/// Field names.
pub(super) const ID: &str = "_id";
pub(super) const KEY_ALT_NAMES: &str = "keyAltNames";
pub(super) const KEY_MATERIAL: &str = "keyMaterial";
pub(super) const MASTER_KEY: &str = "masterKey";
pub(super) const STATUS: &str = "status";
pub(super) const CREATION_DATE: &str = "creationDate";
pub(super) const UPDATE_DATE: &str = "updateDate";
pub(super) const FIELDCRYPT: &str = "fieldcrypt";
pub(super) const ALIAS: &str = "fieldcrypt.alias";
pub(super) const STATE: &str = "fieldcrypt.state";
pub(super) const GENERATION: &str = "fieldcrypt.generation";
pub(super) const ENCRYPTIONS: &str = "fieldcrypt.encryptions";

/// The layout version of the managed key documents this version writes and reads
/// (`fieldcrypt.format`); a document without the field is format 1.
pub(super) const KEY_FORMAT: i32 = 2;

/// The first bytes of the associated data a managed key is wrapped with: names the purpose
/// and the format, so these bytes can never be mistaken for another protocol's.
pub(super) const WRAP_LABEL: &[u8] = b"fieldcrypt/dek-wrap/v2\0";

/// The kind byte of the associated data.
const KIND_FIELDCRYPT: u8 = 1;

/// `status` values, as MongoDB uses them.
pub(super) const STATUS_ENABLED: i32 = 0;
pub(super) const STATUS_DISABLED: i32 = 1;

/// A key's metadata as stored in the key vault, without any key material: what
/// [`KeyVault::list`](super::KeyVault::list) returns.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KeyInfo {
    /// `_id`.
    pub id: KeyId,
    /// The alias: `fieldcrypt.alias`, or for a CSFLE key document without fieldcrypt's fields,
    /// its first keyAltName (else its id).
    pub alias: String,
    /// 32-byte fieldcrypt key or 96-byte CSFLE key.
    pub kind: KeyKind,
    /// The effective state (of two documents both marked primary for one alias, only the newer
    /// claim counts; the other is reported active).
    pub state: KeyState,
    /// Whether the document carries fieldcrypt's `fieldcrypt` sub-document (false for CSFLE key
    /// documents made by MongoDB's drivers).
    pub managed: bool,
    /// The key's version within its alias (1, 2, …), for managed keys.
    pub version: Option<u64>,
    /// `keyAltNames`.
    pub key_alt_names: Vec<String>,
    /// `masterKey`: which KEK provider wrapped it, and its options.
    pub master_key: Document,
    /// Random-nonce encryptions reserved so far by every process (`fieldcrypt.encryptions`):
    /// never less than the encryptions made, up to the documented lease slack.
    pub encryptions: u64,
    /// `creationDate`.
    pub created: bson::DateTime,
    /// `updateDate`.
    pub updated: bson::DateTime,
}

impl KeyInfo {
    /// `masterKey.provider`, e.g. `"local"`.
    #[must_use]
    pub fn provider(&self) -> &str {
        self.master_key.get_str("provider").unwrap_or("")
    }
}

/// fieldcrypt's own fields of a managed key.
#[derive(Clone, Copy)]
pub(super) struct Managed {
    /// `fieldcrypt.format` (1 when absent).
    pub(super) format: i64,
    pub(super) version: u64,
    pub(super) generation: i64,
    pub(super) encryptions: u64,
}

/// A parsed key document. Holds the *wrapped* key only; deliberately not `Debug`.
pub(super) struct StoredKey {
    pub(super) id: KeyId,
    pub(super) alias: String,
    pub(super) kind: KeyKind,
    /// As stored; see [`elect`] for the effective state.
    pub(super) state: KeyState,
    pub(super) managed: Option<Managed>,
    pub(super) key_alt_names: Vec<String>,
    pub(super) key_material: Option<Vec<u8>>,
    pub(super) master_key: Document,
    pub(super) created: bson::DateTime,
    pub(super) updated: bson::DateTime,
}

impl StoredKey {
    /// Parses a key document. Lenient about what fieldcrypt does not need (unknown fields,
    /// missing dates); strict about what it does. Errors name the key and the field, never a
    /// value.
    pub(super) fn parse(doc: &Document) -> Result<Self> {
        let id = match doc.get(ID) {
            Some(Bson::Binary(b)) if b.subtype == BinarySubtype::Uuid && b.bytes.len() == 16 => {
                KeyId::from_slice(&b.bytes)?
            }
            _ => {
                return Err(Error::KeyFormat(
                    "key document: '_id' is not a UUID (binary subtype 4)".into(),
                ))
            }
        };
        let bad = |what: &str| Error::KeyFormat(format!("key document {id}: {what}"));
        let key_alt_names = match doc.get(KEY_ALT_NAMES) {
            None => Vec::new(),
            Some(Bson::Array(names)) => names
                .iter()
                .map(|n| match n {
                    Bson::String(s) => Ok(s.clone()),
                    _ => Err(bad("'keyAltNames' holds a non-string")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("'keyAltNames' is not an array")),
        };
        let key_material = match doc.get(KEY_MATERIAL) {
            None => None,
            Some(Bson::Binary(b)) if b.subtype == BinarySubtype::Generic => Some(b.bytes.clone()),
            Some(_) => return Err(bad("'keyMaterial' is not a binary of subtype 0")),
        };
        let master_key = match doc.get(MASTER_KEY) {
            Some(Bson::Document(m)) if matches!(m.get("provider"), Some(Bson::String(_))) => {
                m.clone()
            }
            _ => return Err(bad("'masterKey' is missing or has no provider")),
        };
        let status = doc.get(STATUS).and_then(int).unwrap_or(0);
        let date = |field: &str| match doc.get(field) {
            Some(Bson::DateTime(d)) => *d,
            _ => bson::DateTime::from_millis(0),
        };
        let created = date(CREATION_DATE);
        let updated = date(UPDATE_DATE);

        let (alias, kind, state, managed) = match doc.get(FIELDCRYPT) {
            None => {
                // A CSFLE data key as MongoDB's drivers write it.
                let alias = key_alt_names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| id.to_string());
                let state = match (&key_material, status) {
                    (None, _) => KeyState::Destroyed,
                    (Some(_), 0) => KeyState::Active,
                    (Some(_), _) => KeyState::Disabled,
                };
                (alias, KeyKind::Csfle, state, None)
            }
            Some(Bson::Document(f)) => {
                let alias = match f.get("alias") {
                    Some(Bson::String(a)) if !a.is_empty() => a.clone(),
                    _ => return Err(bad("'fieldcrypt.alias' is missing or not a string")),
                };
                let state: KeyState = match f.get("state") {
                    Some(Bson::String(s)) => {
                        s.parse().map_err(|_| bad("unknown 'fieldcrypt.state'"))?
                    }
                    _ => return Err(bad("'fieldcrypt.state' is missing or not a string")),
                };
                let kind = match f.get("kind") {
                    None => KeyKind::Fieldcrypt,
                    Some(Bson::String(k)) if k == "fieldcrypt" => KeyKind::Fieldcrypt,
                    Some(Bson::String(k)) if k == "csfle" => KeyKind::Csfle,
                    Some(_) => return Err(bad("unknown 'fieldcrypt.kind'")),
                };
                let count = |name: &str| -> Result<u64> {
                    match f.get(name).map(int) {
                        None => Ok(0),
                        Some(Some(n)) => u64::try_from(n)
                            .map_err(|_| bad(&format!("'fieldcrypt.{name}' is negative"))),
                        Some(None) => Err(bad(&format!("'fieldcrypt.{name}' is not an integer"))),
                    }
                };
                let format = match f.get("format") {
                    None => 1,
                    Some(v) => {
                        int(v).ok_or_else(|| bad("'fieldcrypt.format' is not an integer"))?
                    }
                };
                let managed = Managed {
                    format,
                    version: count("version")?,
                    generation: f.get("generation").and_then(int).unwrap_or(0),
                    encryptions: count("encryptions")?,
                };
                // The material is the truth: without it, nothing can be decrypted.
                let state = if key_material.is_none() {
                    KeyState::Destroyed
                } else {
                    state
                };
                (alias, kind, state, Some(managed))
            }
            Some(_) => return Err(bad("'fieldcrypt' is not a document")),
        };
        // Destroyed wins over a stale copy of the material (there is none if fieldcrypt wrote
        // it, since destroy removes both in one update).
        let key_material = key_material.filter(|_| state != KeyState::Destroyed);
        Ok(StoredKey {
            id,
            alias,
            kind,
            state,
            managed,
            key_alt_names,
            key_material,
            master_key,
            created,
            updated,
        })
    }

    pub(super) fn info(&self, state: KeyState) -> KeyInfo {
        KeyInfo {
            id: self.id,
            alias: self.alias.clone(),
            kind: self.kind,
            state,
            managed: self.managed.is_some(),
            version: self.managed.map(|m| m.version),
            key_alt_names: self.key_alt_names.clone(),
            master_key: self.master_key.clone(),
            encryptions: self.managed.map_or(0, |m| m.encryptions),
            created: self.created,
            updated: self.updated,
        }
    }

    /// The associated data this key's `keyMaterial` is wrapped with: empty for a CSFLE key
    /// document (MongoDB's format), [`associated_data`] for a managed key.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for a managed document in a format this version does not read
    /// (format 1, whose material is not bound to the document, or a newer one), or of kind
    /// `csfle` (fieldcrypt never writes those: it keeps CSFLE keys in MongoDB's layout).
    pub(super) fn wrap_ad(&self) -> Result<Vec<u8>> {
        let Some(m) = self.managed else {
            return Ok(Vec::new());
        };
        let id = self.id;
        if m.format < i64::from(KEY_FORMAT) {
            return Err(Error::KeyFormat(format!(
                "key document {id} is in key-document format {} (written by an older fieldcrypt, \
                 its keyMaterial not bound to the document); this version reads format \
                 {KEY_FORMAT} only: destroy the key and rotate its alias",
                m.format
            )));
        }
        if m.format > i64::from(KEY_FORMAT) {
            return Err(Error::KeyFormat(format!(
                "key document {id} is in key-document format {}, newer than this version's \
                 ({KEY_FORMAT}): upgrade fieldcrypt",
                m.format
            )));
        }
        if self.kind != KeyKind::Fieldcrypt {
            return Err(Error::KeyFormat(format!(
                "key document {id}: fieldcrypt.kind is not \"fieldcrypt\" (CSFLE keys are kept \
                 without a 'fieldcrypt' field, in MongoDB's layout)"
            )));
        }
        Ok(associated_data(&id, &self.alias, self.kind))
    }

    pub(super) fn generation(&self) -> i64 {
        self.managed.map_or(0, |m| m.generation)
    }

    pub(super) fn encryptions(&self) -> u64 {
        self.managed.map_or(0, |m| m.encryptions)
    }
}

/// The keyAltName of version `version` of `alias`: unique across the vault, so it doubles as
/// the lock that gives two concurrent creators different versions.
pub(super) fn alt_name(alias: &str, version: u64) -> String {
    format!("{alias}:v{version}")
}

/// The associated data that binds a managed key's wrapped material to its identity:
///
/// ```text
/// WRAP_LABEL ("fieldcrypt/dek-wrap/v2\0", 23 bytes) ‖ key id (16 bytes)
///   ‖ alias length (u32, big-endian) ‖ alias (UTF-8) ‖ kind (1 byte: 1 = fieldcrypt)
/// ```
///
/// Empty for [`KeyKind::Csfle`]: MongoDB's CSFLE keys are wrapped with no associated data,
/// as libmongocrypt does.
pub(super) fn associated_data(id: &KeyId, alias: &str, kind: KeyKind) -> Vec<u8> {
    if kind != KeyKind::Fieldcrypt {
        return Vec::new();
    }
    let mut ad = Vec::with_capacity(WRAP_LABEL.len() + 16 + 4 + alias.len() + 1);
    ad.extend_from_slice(WRAP_LABEL);
    ad.extend_from_slice(id.as_bytes());
    // An alias longer than 4 GiB cannot be in a 16 MiB document; saturate rather than wrap.
    let len = u32::try_from(alias.len()).unwrap_or(u32::MAX);
    ad.extend_from_slice(&len.to_be_bytes());
    ad.extend_from_slice(alias.as_bytes());
    ad.push(KIND_FIELDCRYPT);
    ad
}

/// `status` for a state: MongoDB knows only enabled (0) and disabled (1).
pub(super) fn status_of(state: KeyState) -> i32 {
    match state {
        KeyState::Primary | KeyState::Active => STATUS_ENABLED,
        KeyState::Disabled | KeyState::Destroyed => STATUS_DISABLED,
    }
}

/// A new managed key document.
pub(super) struct NewKey<'a> {
    pub(super) id: KeyId,
    pub(super) alias: &'a str,
    pub(super) kind: KeyKind,
    pub(super) version: u64,
    pub(super) generation: i64,
    pub(super) master_key: &'a Document,
    pub(super) wrapped: &'a [u8],
}

impl NewKey<'_> {
    pub(super) fn to_document(&self) -> Document {
        let now = bson::DateTime::now();
        doc! {
            ID: self.id.to_binary(),
            KEY_ALT_NAMES: [alt_name(self.alias, self.version)],
            KEY_MATERIAL: Binary { subtype: BinarySubtype::Generic, bytes: self.wrapped.to_vec() },
            CREATION_DATE: now,
            UPDATE_DATE: now,
            STATUS: STATUS_ENABLED,
            MASTER_KEY: self.master_key.clone(),
            FIELDCRYPT: {
                "format": KEY_FORMAT,
                "alias": self.alias,
                "state": KeyState::Primary.as_str(),
                "kind": match self.kind { KeyKind::Fieldcrypt => "fieldcrypt", KeyKind::Csfle => "csfle" },
                "version": i64::try_from(self.version).unwrap_or(i64::MAX),
                "generation": self.generation,
                "encryptions": 0i64,
            },
        }
    }
}

/// The filter for every key document of these aliases: managed keys by `fieldcrypt.alias`,
/// CSFLE key documents by keyAltName or id (the caller keeps those whose *first* keyAltName
/// is the alias, see [`StoredKey::alias`]).
pub(super) fn alias_filter(aliases: &[String]) -> Document {
    let ids: Vec<Bson> = aliases
        .iter()
        .filter_map(|a| a.parse::<KeyId>().ok())
        .map(|id| Bson::Binary(id.to_binary()))
        .collect();
    let mut any = vec![
        Bson::Document(doc! { ALIAS: { "$in": aliases } }),
        Bson::Document(
            doc! { FIELDCRYPT: { "$exists": false }, KEY_ALT_NAMES: { "$in": aliases } },
        ),
    ];
    if !ids.is_empty() {
        any.push(Bson::Document(
            doc! { FIELDCRYPT: { "$exists": false }, ID: { "$in": ids } },
        ));
    }
    doc! { "$or": any }
}

/// Elects the effective primary of each alias among `keys` (several documents may be marked
/// primary for a moment while a rotation runs, or for longer if a rotating process died): the
/// highest `fieldcrypt.generation`, ties broken by id, wins; the others are active. Sets
/// `state` in place and returns, for each alias that had more than one, the winner's generation
/// (the demotion that repairs the vault).
pub(super) fn elect(keys: &mut [StoredKey]) -> Vec<(String, i64)> {
    use std::collections::HashMap;
    let mut winners: HashMap<&str, (i64, KeyId, usize)> = HashMap::new();
    for k in keys.iter().filter(|k| k.state == KeyState::Primary) {
        let e = winners
            .entry(k.alias.as_str())
            .or_insert((k.generation(), k.id, 0));
        if (k.generation(), k.id) > (e.0, e.1) {
            (e.0, e.1) = (k.generation(), k.id);
        }
        e.2 += 1;
    }
    let winners: HashMap<String, (i64, KeyId, usize)> = winners
        .into_iter()
        .map(|(a, w)| (a.to_owned(), w))
        .collect();
    for k in keys.iter_mut() {
        if k.state == KeyState::Primary && winners.get(&k.alias).is_some_and(|w| w.1 != k.id) {
            k.state = KeyState::Active;
        }
    }
    winners
        .into_iter()
        .filter(|(_, w)| w.2 > 1)
        .map(|(a, w)| (a, w.0))
        .collect()
}

fn int(v: &Bson) -> Option<i64> {
    match *v {
        Bson::Int32(i) => Some(i64::from(i)),
        Bson::Int64(i) => Some(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed(alias: &str, version: u64, generation: i64) -> Document {
        NewKey {
            id: KeyId::random(),
            alias,
            kind: KeyKind::Fieldcrypt,
            version,
            generation,
            master_key: &doc! { "provider": "local" },
            wrapped: &[7; 96],
        }
        .to_document()
    }

    #[test]
    fn managed_document_round_trip() {
        let d = managed("pii", 3, 5);
        let k = StoredKey::parse(&d).unwrap();
        assert_eq!(k.alias, "pii");
        assert_eq!(k.state, KeyState::Primary);
        assert_eq!(k.kind, KeyKind::Fieldcrypt);
        assert_eq!(k.key_alt_names, ["pii:v3"]);
        assert_eq!(k.generation(), 5);
        assert_eq!(k.key_material.as_deref(), Some(&[7u8; 96][..]));
    }

    #[test]
    fn associated_data_layout() {
        let id = KeyId::from_bytes([0xab; 16]);
        let ad = associated_data(&id, "pii/acme", KeyKind::Fieldcrypt);
        let mut want = b"fieldcrypt/dek-wrap/v2\0".to_vec();
        want.extend_from_slice(&[0xab; 16]);
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(b"pii/acme");
        want.push(1);
        assert_eq!(ad, want);
        assert_eq!(WRAP_LABEL.len(), 23);
        // Every part counts; CSFLE keys have none.
        assert_ne!(
            ad,
            associated_data(&KeyId::random(), "pii/acme", KeyKind::Fieldcrypt)
        );
        assert_ne!(ad, associated_data(&id, "pii/acm", KeyKind::Fieldcrypt));
        assert!(associated_data(&id, "pii/acme", KeyKind::Csfle).is_empty());
    }

    #[test]
    fn format_2_binds_and_older_or_newer_formats_are_refused() {
        let d = managed("pii", 1, 1);
        assert_eq!(
            d.get_document(FIELDCRYPT).unwrap().get("format"),
            Some(&Bson::Int32(2))
        );
        let k = StoredKey::parse(&d).unwrap();
        assert_eq!(
            k.wrap_ad().unwrap(),
            associated_data(&k.id, "pii", KeyKind::Fieldcrypt)
        );
        let with_format = |f: Option<Bson>| {
            let mut d = d.clone();
            let sub = d.get_document_mut(FIELDCRYPT).unwrap();
            match f {
                Some(v) => sub.insert("format", v),
                None => sub.remove("format"),
            };
            StoredKey::parse(&d)
        };
        // Format 1 (no field) parses, so it can be listed and destroyed, but never unwrapped.
        let v1 = with_format(None).unwrap();
        let e = v1.wrap_ad().unwrap_err();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains("format 1")),
            "{e}"
        );
        let e = with_format(Some(Bson::Int64(3)))
            .unwrap()
            .wrap_ad()
            .unwrap_err();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains("newer")),
            "{e}"
        );
        assert!(with_format(Some(Bson::String("2".into()))).is_err());
        // A managed document claiming to be a CSFLE key is not something fieldcrypt writes.
        let mut csfle = d.clone();
        csfle
            .get_document_mut(FIELDCRYPT)
            .unwrap()
            .insert("kind", "csfle");
        assert!(StoredKey::parse(&csfle).unwrap().wrap_ad().is_err());
        // CSFLE key documents (no fieldcrypt field) use empty associated data.
        let mut plain = d.clone();
        plain.remove(FIELDCRYPT);
        assert!(StoredKey::parse(&plain)
            .unwrap()
            .wrap_ad()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn csfle_document_alias_and_state() {
        let mut d = managed("x", 1, 1);
        d.remove(FIELDCRYPT);
        let k = StoredKey::parse(&d).unwrap();
        assert_eq!(
            (k.alias.as_str(), k.kind, k.state),
            ("x:v1", KeyKind::Csfle, KeyState::Active)
        );
        d.insert(STATUS, 1);
        assert_eq!(StoredKey::parse(&d).unwrap().state, KeyState::Disabled);
        d.remove(KEY_ALT_NAMES);
        d.remove(KEY_MATERIAL);
        let k = StoredKey::parse(&d).unwrap();
        assert_eq!(k.state, KeyState::Destroyed);
        assert_eq!(k.alias, k.id.to_string());
    }

    #[test]
    fn election_prefers_the_newest_claim() {
        let mut keys: Vec<StoredKey> = [managed("a", 1, 1), managed("a", 2, 3), managed("b", 1, 1)]
            .iter()
            .map(|d| StoredKey::parse(d).unwrap())
            .collect();
        let repairs = elect(&mut keys);
        assert_eq!(repairs, vec![("a".to_owned(), 3)]);
        let states: Vec<_> = keys.iter().map(|k| k.state).collect();
        assert_eq!(
            states,
            [KeyState::Active, KeyState::Primary, KeyState::Primary]
        );
    }

    #[test]
    fn fail_malformed_documents() {
        let good = managed("a", 1, 1);
        let with = |f: &dyn Fn(&mut Document)| {
            let mut d = good.clone();
            f(&mut d);
            StoredKey::parse(&d)
        };
        assert!(with(&|d| {
            d.insert(ID, "x");
        })
        .is_err());
        assert!(with(&|d| {
            d.remove(MASTER_KEY);
        })
        .is_err());
        assert!(with(&|d| {
            d.insert(KEY_MATERIAL, "x");
        })
        .is_err());
        assert!(with(&|d| {
            d.insert(FIELDCRYPT, doc! { "state": "primary" });
        })
        .is_err());
        assert!(with(&|d| {
            d.insert(FIELDCRYPT, doc! { "alias": "a", "state": "nope" });
        })
        .is_err());
        assert!(with(&|d| {
            d.insert(
                FIELDCRYPT,
                doc! { "alias": "a", "state": "active", "encryptions": -1 },
            );
        })
        .is_err());
    }
}
