//! CSFLE data keys and the key-vault documents that hold them.
//!
//! A key-vault document, as libmongocrypt reads it (`_mongocrypt_key_parse_owned` in
//! `src/mongocrypt-key.c`) and writes it:
//!
//! ```text
//! { _id: UUID (binary subtype 4), keyAltNames: [string, …] (optional, unique),
//!   keyMaterial: binary subtype 0 (the wrapped 96-byte key), creationDate: date,
//!   updateDate: date, status: int, masterKey: { provider: "local", … }, version: 0 (optional) }
//! ```
//!
//! libmongocrypt refuses any other field, and so does [`CsfleKeyDocument::from_document`]: what
//! fieldcrypt accepts, MongoDB's drivers accept too.

use core::fmt;
use std::collections::HashMap;
use std::path::Path;

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};

use super::aead::{CsfleKey, KEY_LEN};
use super::kms::{zeroed_key, LocalMasterKey};
use super::payload;
use super::CsfleAlgorithm;
use crate::error::{Error, Result};
use crate::key::id::KeyId;
use crate::qe::{self, QeKey, QeValueKind};

/// An unwrapped CSFLE data key: its id, its alternate names and its 96 bytes of material,
/// ready to encrypt and decrypt FLE1 values (BSON binary subtype 6) and Queryable Encryption
/// values (the same key-vault keys serve both, as in MongoDB).
///
/// Get one from a key document ([`CsfleKeyDocument::unwrap_with`]) or make a new one
/// ([`CsfleDataKey::generate`], then [`CsfleDataKey::to_key_document`] to store it).
pub struct CsfleDataKey {
    id: KeyId,
    alt_names: Vec<String>,
    material: SecretBox<[u8; KEY_LEN]>,
    key: CsfleKey,
    qe: QeKey,
}

impl CsfleDataKey {
    /// A new data key: random id (UUID v4) and 96 bytes from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when `alt_names` holds a name twice.
    pub fn generate(alt_names: Vec<String>) -> Result<Self> {
        let mut material = zeroed_key();
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, material.expose_secret_mut());
        Self::from_material(KeyId::random(), material, alt_names)
    }

    /// A data key from its parts.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when `alt_names` holds a name twice.
    pub fn from_material(
        id: KeyId,
        material: SecretBox<[u8; KEY_LEN]>,
        alt_names: Vec<String>,
    ) -> Result<Self> {
        check_unique_alt_names(id, &alt_names)?;
        let key = CsfleKey::new(material.expose_secret());
        let qe = QeKey::new(material.expose_secret());
        Ok(CsfleDataKey {
            id,
            alt_names,
            material,
            key,
            qe,
        })
    }

    /// The key's id (the key document's `_id`).
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The key's alternate names (`keyAltNames`).
    #[must_use]
    pub fn alt_names(&self) -> &[String] {
        &self.alt_names
    }

    /// A key-vault document for this key, its material wrapped under `master` (`local` KMS
    /// provider), dated now, status 0 — what libmongocrypt's `createDataKey` writes.
    #[must_use]
    pub fn to_key_document(&self, master: &LocalMasterKey) -> CsfleKeyDocument {
        let now = bson::DateTime::now();
        CsfleKeyDocument {
            id: self.id,
            key_alt_names: self.alt_names.clone(),
            key_material: master.wrap(&self.material),
            master_key: doc! { "provider": "local" },
            status: 0,
            creation_date: now,
            update_date: now,
        }
    }

    /// Encrypts one BSON value as libmongocrypt's explicit encryption does, returning the
    /// subtype-6 binary. Deterministic output is byte-identical to libmongocrypt's.
    ///
    /// # Errors
    /// [`Error::UnsupportedType`] when `algorithm` refuses the value's type: null, undefined,
    /// minKey, maxKey and encrypted binaries always; double, decimal128, document, array, bool
    /// and JavaScript-with-scope for deterministic encryption.
    pub fn encrypt_value(&self, algorithm: CsfleAlgorithm, value: &Bson) -> Result<Binary> {
        let (bson_type, bytes) = payload::value_to_bytes(value)?;
        let mut out = Vec::new();
        payload::encrypt(&self.key, algorithm, self.id, bson_type, &bytes, &mut out)?;
        Ok(Binary {
            subtype: BinarySubtype::Encrypted,
            bytes: out,
        })
    }

    /// Encrypts one BSON value as a Queryable Encryption unindexed value
    /// (FLE2UnindexedEncryptedValueV2, blob subtype 16), as libmongocrypt's explicit encryption
    /// with `Algorithm.UNINDEXED` does: what a QE application stores in a field its
    /// `encryptedFields` lists without `queries`. Random IV: two encryptions differ.
    ///
    /// # Errors
    /// [`Error::UnsupportedType`] for null, undefined, minKey, maxKey and binData subtype 6,
    /// which libmongocrypt refuses too.
    pub fn encrypt_qe_unindexed(&self, value: &Bson) -> Result<Binary> {
        let (bson_type, bytes) = payload::value_to_bytes(value)?;
        let mut out = Vec::new();
        qe::encrypt_unindexed(&self.qe, self.id, bson_type, &bytes, &mut out)?;
        Ok(Binary {
            subtype: BinarySubtype::Encrypted,
            bytes: out,
        })
    }

    /// Decrypts one FLE1 ciphertext or stored Queryable Encryption value (a subtype-6 binary)
    /// made with this key (for an indexed QE value: both its keys are this one).
    ///
    /// # Errors
    /// [`Error::UnknownKey`] when the ciphertext names another key, [`Error::Decrypt`] when it
    /// does not authenticate, [`Error::MalformedCiphertext`] when it is neither format.
    pub fn decrypt_value(&self, ciphertext: &Binary) -> Result<Bson> {
        if let Some(p) = parse_qe_binary(ciphertext)? {
            return decrypt_qe(&p, |id| {
                (id == self.id).then_some(self).ok_or(Error::UnknownKey(id))
            });
        }
        let payload = parse_binary(ciphertext)?;
        if payload.key_id != self.id {
            return Err(Error::UnknownKey(payload.key_id));
        }
        decrypt_payload(&self.key, &payload)
    }

    /// The prepared cipher, for the document transform's hot path.
    #[allow(dead_code)] // for the document transform (src/transform.rs)
    pub(crate) fn cipher(&self) -> &CsfleKey {
        &self.key
    }
}

impl fmt::Debug for CsfleDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsfleDataKey")
            .field("id", &self.id)
            .field("alt_names", &self.alt_names)
            .finish_non_exhaustive()
    }
}

/// A key-vault document (collection `keyvault.datakeys` or wherever the application keeps it)
/// with its key material still wrapped.
///
/// Read one from a [`Document`] or from Extended JSON (what `mongoexport` writes), unwrap it
/// with [`CsfleKeyDocument::unwrap_with`], and write new ones with
/// [`CsfleDataKey::to_key_document`] and [`CsfleKeyDocument::to_document`].
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct CsfleKeyDocument {
    /// `_id`: the key id.
    pub id: KeyId,
    /// `keyAltNames`: alternate names, unique (empty when absent).
    pub key_alt_names: Vec<String>,
    /// `keyMaterial`: the data key wrapped by the KMS provider.
    pub key_material: Vec<u8>,
    /// `masterKey`: the KMS provider (`provider`) and its options.
    pub master_key: Document,
    /// `status`: MongoDB writes 0; libmongocrypt does not interpret it.
    pub status: i32,
    /// `creationDate`.
    pub creation_date: bson::DateTime,
    /// `updateDate`.
    pub update_date: bson::DateTime,
}

impl CsfleKeyDocument {
    /// Parses a key-vault document with libmongocrypt's rules.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] naming the field that is missing, of the wrong type, or not
    /// expected (values are never quoted).
    pub fn from_document(doc: &Document) -> Result<Self> {
        let bad = |m: &str| Error::KeyFormat(format!("key document: {m}"));
        let mut id = None;
        let mut key_alt_names = Vec::new();
        let mut key_material = None;
        let mut master_key = None;
        let mut status = None;
        let mut creation_date = None;
        let mut update_date = None;
        for (field, value) in doc {
            match (field.as_str(), value) {
                ("_id", Bson::Binary(b)) if b.subtype == BinarySubtype::Uuid => {
                    id = Some(
                        KeyId::from_slice(&b.bytes)
                            .map_err(|_| bad("'_id' is not a 16-byte UUID"))?,
                    );
                }
                ("_id", _) => return Err(bad("'_id' is not a UUID (binary subtype 4)")),
                ("keyAltNames", Bson::Array(names)) => {
                    key_alt_names = names
                        .iter()
                        .map(|n| match n {
                            Bson::String(s) => Ok(s.clone()),
                            _ => Err(bad("'keyAltNames' holds a non-string")),
                        })
                        .collect::<Result<_>>()?;
                }
                ("keyAltNames", _) => return Err(bad("'keyAltNames' is not an array")),
                ("keyMaterial", Bson::Binary(b)) if b.subtype == BinarySubtype::Generic => {
                    key_material = Some(b.bytes.clone());
                }
                ("keyMaterial", _) => {
                    return Err(bad("'keyMaterial' is not a binary of subtype 0"))
                }
                ("masterKey", Bson::Document(m)) => {
                    if !matches!(m.get("provider"), Some(Bson::String(_))) {
                        return Err(bad("'masterKey.provider' is missing or not a string"));
                    }
                    master_key = Some(m.clone());
                }
                ("masterKey", _) => return Err(bad("'masterKey' is not a document")),
                ("status", s) => {
                    status = Some(int32(s).ok_or_else(|| bad("'status' is not a 32-bit integer"))?);
                }
                ("creationDate", Bson::DateTime(d)) => creation_date = Some(*d),
                ("creationDate", _) => return Err(bad("'creationDate' is not a date")),
                ("updateDate", Bson::DateTime(d)) => update_date = Some(*d),
                ("updateDate", _) => return Err(bad("'updateDate' is not a date")),
                ("version", v) => {
                    if int32(v) != Some(0) {
                        return Err(bad("'version' is not 0, the only version there is"));
                    }
                }
                (other, _) => {
                    return Err(Error::KeyFormat(format!(
                        "key document: unexpected field {other:?}"
                    )))
                }
            }
        }
        let id = id.ok_or_else(|| bad("no '_id'"))?;
        check_unique_alt_names(id, &key_alt_names)?;
        Ok(CsfleKeyDocument {
            id,
            key_alt_names,
            key_material: key_material.ok_or_else(|| bad("no 'keyMaterial'"))?,
            master_key: master_key.ok_or_else(|| bad("no 'masterKey'"))?,
            status: status.ok_or_else(|| bad("no 'status'"))?,
            creation_date: creation_date.ok_or_else(|| bad("no 'creationDate'"))?,
            update_date: update_date.ok_or_else(|| bad("no 'updateDate'"))?,
        })
    }

    /// The document as stored in the key vault (field order as libmongocrypt writes it;
    /// `keyAltNames` only when there are some).
    #[must_use]
    pub fn to_document(&self) -> Document {
        let mut doc = doc! { "_id": self.id.to_binary() };
        if !self.key_alt_names.is_empty() {
            doc.insert("keyAltNames", self.key_alt_names.clone());
        }
        doc.insert(
            "keyMaterial",
            Binary {
                subtype: BinarySubtype::Generic,
                bytes: self.key_material.clone(),
            },
        );
        doc.insert("creationDate", self.creation_date);
        doc.insert("updateDate", self.update_date);
        doc.insert("status", self.status);
        doc.insert("masterKey", self.master_key.clone());
        doc
    }

    /// The document as one line of canonical Extended JSON, as `mongoexport
    /// --jsonFormat=canonical` writes it (and `mongoimport` reads it).
    #[must_use]
    pub fn to_extended_json(&self) -> String {
        Bson::Document(self.to_document())
            .into_canonical_extjson()
            .to_string()
    }

    /// The KMS provider that wrapped the key (`masterKey.provider`), e.g. `"local"`, `"aws"`.
    #[must_use]
    pub fn provider(&self) -> &str {
        self.master_key.get_str("provider").unwrap_or("")
    }

    /// Unwraps the key material with the `local` KMS master key.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when the key is wrapped by another KMS provider, or when its
    /// material does not authenticate under `master` (wrong master key, corrupted document).
    pub fn unwrap_with(&self, master: &LocalMasterKey) -> Result<CsfleDataKey> {
        let provider = self.provider();
        // Named local providers ("local:<name>") use the same scheme with their own key.
        if provider != "local" && !provider.starts_with("local:") {
            return Err(Error::KeyFormat(format!(
                "key {} is wrapped by KMS provider {provider:?}; only \"local\" is supported",
                self.id
            )));
        }
        let material = master.unwrap(&self.key_material).map_err(|e| match e {
            Error::Decrypt | Error::MalformedCiphertext(_) => Error::KeyFormat(format!(
                "keyMaterial of key {} does not authenticate under this local master key \
                 (wrong master key or corrupted key document)",
                self.id
            )),
            other => other,
        })?;
        CsfleDataKey::from_material(self.id, material, self.key_alt_names.clone())
    }

    /// Parses key documents from Extended JSON, canonical or relaxed: one document per line
    /// (what `mongoexport` writes; blank lines are skipped) or a single JSON array of documents
    /// (`mongoexport --jsonArray`).
    ///
    /// # Errors
    /// [`Error::KeyFormat`] naming the line (or array index) and the problem.
    pub fn parse_extended_json(text: &str) -> Result<Vec<Self>> {
        let trimmed = text.trim_start();
        if trimmed.starts_with('[') {
            let values: Vec<serde_json::Value> = serde_json::from_str(trimmed).map_err(|e| {
                Error::KeyFormat(format!(
                    "key file: not a JSON array (line {}, column {})",
                    e.line(),
                    e.column()
                ))
            })?;
            return values
                .into_iter()
                .enumerate()
                .map(|(i, v)| Self::from_json_value(v).map_err(|e| located(e, "element", i)))
                .collect();
        }
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                let value = serde_json::from_str(line).map_err(|e| {
                    Error::KeyFormat(format!(
                        "key file line {}: not JSON (column {})",
                        i + 1,
                        e.column()
                    ))
                })?;
                Self::from_json_value(value).map_err(|e| located(e, "line", i + 1))
            })
            .collect()
    }

    /// Reads key documents from an Extended JSON file; see [`Self::parse_extended_json`].
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, otherwise as
    /// [`Self::parse_extended_json`].
    pub fn read_extended_json_file(path: impl AsRef<Path>) -> Result<Vec<Self>> {
        Self::parse_extended_json(&std::fs::read_to_string(path)?)
    }

    fn from_json_value(value: serde_json::Value) -> Result<Self> {
        // bson's Extended JSON errors may quote the offending value; don't pass them on.
        match Bson::try_from(value) {
            Ok(Bson::Document(doc)) => Self::from_document(&doc),
            Ok(_) => Err(Error::KeyFormat("not a JSON object".into())),
            Err(_) => Err(Error::KeyFormat("not valid Extended JSON".into())),
        }
    }
}

impl fmt::Debug for CsfleKeyDocument {
    /// Everything but the wrapped key material, of which only the length is shown: it is
    /// encrypted, but key bytes of any kind stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsfleKeyDocument")
            .field("id", &self.id)
            .field("key_alt_names", &self.key_alt_names)
            .field(
                "key_material",
                &format_args!("[{} bytes]", self.key_material.len()),
            )
            .field("master_key", &self.master_key)
            .field("status", &self.status)
            .field("creation_date", &self.creation_date)
            .field("update_date", &self.update_date)
            .finish()
    }
}

/// A set of unwrapped CSFLE data keys, found by id or alternate name: what is needed to decrypt
/// FLE1 values and documents.
#[derive(Default)]
pub struct CsfleKeySet {
    keys: HashMap<KeyId, CsfleDataKey>,
    by_alt_name: HashMap<String, KeyId>,
}

impl CsfleKeySet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Unwraps every key document with the `local` master key.
    ///
    /// # Errors
    /// As [`CsfleKeyDocument::unwrap_with`] and [`Self::insert`].
    pub fn from_key_documents<'a>(
        docs: impl IntoIterator<Item = &'a CsfleKeyDocument>,
        master: &LocalMasterKey,
    ) -> Result<Self> {
        let mut set = Self::new();
        for doc in docs {
            set.insert(doc.unwrap_with(master)?)?;
        }
        Ok(set)
    }

    /// Reads and unwraps a key-vault export (Extended JSON lines or array).
    ///
    /// # Errors
    /// As [`CsfleKeyDocument::read_extended_json_file`] and [`Self::from_key_documents`].
    pub fn load_extended_json_file(
        path: impl AsRef<Path>,
        master: &LocalMasterKey,
    ) -> Result<Self> {
        Self::from_key_documents(&CsfleKeyDocument::read_extended_json_file(path)?, master)
    }

    /// Adds a key.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] when its id or one of its alternate names is already in the set
    /// (libmongocrypt refuses such key vaults too).
    pub fn insert(&mut self, key: CsfleDataKey) -> Result<()> {
        if self.keys.contains_key(&key.id) {
            return Err(Error::KeyFormat(format!(
                "duplicate CSFLE key id {}",
                key.id
            )));
        }
        if let Some(name) = key
            .alt_names
            .iter()
            .find(|n| self.by_alt_name.contains_key(*n))
        {
            return Err(Error::KeyFormat(format!(
                "CSFLE key alt name {name:?} is used by two keys"
            )));
        }
        for name in &key.alt_names {
            self.by_alt_name.insert(name.clone(), key.id);
        }
        self.keys.insert(key.id, key);
        Ok(())
    }

    /// The key with this id.
    #[must_use]
    pub fn get(&self, id: &KeyId) -> Option<&CsfleDataKey> {
        self.keys.get(id)
    }

    /// The key with this alternate name.
    #[must_use]
    pub fn get_by_alt_name(&self, name: &str) -> Option<&CsfleDataKey> {
        self.by_alt_name.get(name).and_then(|id| self.keys.get(id))
    }

    /// The number of keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &CsfleDataKey> {
        self.keys.values()
    }

    /// Decrypts one FLE1 ciphertext or stored Queryable Encryption value with the keys it names
    /// (an indexed QE value names two: `S_KeyId` outside, `K_KeyId` inside).
    ///
    /// # Errors
    /// [`Error::UnknownKey`] when the set lacks a key, otherwise as
    /// [`CsfleDataKey::decrypt_value`].
    pub fn decrypt_value(&self, ciphertext: &Binary) -> Result<Bson> {
        if let Some(p) = parse_qe_binary(ciphertext)? {
            return decrypt_qe(&p, |id| self.keys.get(&id).ok_or(Error::UnknownKey(id)));
        }
        let payload = parse_binary(ciphertext)?;
        let key = self
            .keys
            .get(&payload.key_id)
            .ok_or(Error::UnknownKey(payload.key_id))?;
        decrypt_payload(&key.key, &payload)
    }

    /// Returns `doc` with every FLE1 ciphertext and stored Queryable Encryption value, at any
    /// depth (in sub-documents and arrays), replaced by its plaintext — what libmongocrypt's
    /// automatic decryption does. Other binaries, including other subtype-6 payloads (QE insert
    /// and find payloads), and `__safeContent__` are left as they are.
    ///
    /// # Errors
    /// The first error of [`Self::decrypt_value`]; nothing is returned partially decrypted.
    pub fn decrypt_document(&self, doc: &Document) -> Result<Document> {
        doc.iter()
            .map(|(k, v)| Ok((k.clone(), self.decrypt_bson(v)?)))
            .collect()
    }

    /// The prepared cipher of a key, for the document transform's hot path.
    #[allow(dead_code)] // for the document transform (src/transform.rs)
    pub(crate) fn cipher(&self, id: &KeyId) -> Option<&CsfleKey> {
        self.keys.get(id).map(CsfleDataKey::cipher)
    }

    fn decrypt_bson(&self, value: &Bson) -> Result<Bson> {
        Ok(match value {
            Bson::Binary(b) if is_fle1_ciphertext(b) || is_qe_value(b) => self.decrypt_value(b)?,
            Bson::Document(d) => Bson::Document(self.decrypt_document(d)?),
            Bson::Array(a) => Bson::Array(
                a.iter()
                    .map(|v| self.decrypt_bson(v))
                    .collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }
}

impl fmt::Debug for CsfleKeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CsfleKeySet")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn is_fle1_ciphertext(b: &Binary) -> bool {
    b.subtype == BinarySubtype::Encrypted && matches!(b.bytes.first(), Some(1 | 2))
}

fn is_qe_value(b: &Binary) -> bool {
    b.subtype == BinarySubtype::Encrypted && QeValueKind::of(&b.bytes).is_some()
}

/// The parsed QE value, if `ciphertext` is one (subtype 6, blob subtype 14 to 17).
fn parse_qe_binary(ciphertext: &Binary) -> Result<Option<qe::QePayload<'_>>> {
    if is_qe_value(ciphertext) {
        qe::parse_payload(&ciphertext.bytes).map(Some)
    } else {
        Ok(None)
    }
}

fn decrypt_qe<'k>(
    p: &qe::QePayload<'_>,
    key: impl FnMut(KeyId) -> Result<&'k CsfleDataKey>,
) -> Result<Bson> {
    let mut plain = zeroize::Zeroizing::new(Vec::new());
    qe::decrypt_into(p, key, |k| Ok(&k.qe), &mut plain)?;
    payload::value_from_bytes(p.bson_type, &plain)
}

fn parse_binary(ciphertext: &Binary) -> Result<payload::CsflePayload<'_>> {
    if ciphertext.subtype != BinarySubtype::Encrypted {
        return Err(Error::MalformedCiphertext(
            "CSFLE ciphertext is not binary subtype 6",
        ));
    }
    payload::parse_payload(&ciphertext.bytes)
}

fn decrypt_payload(key: &CsfleKey, payload: &payload::CsflePayload<'_>) -> Result<Bson> {
    let mut plain = zeroize::Zeroizing::new(Vec::with_capacity(payload.sealed.len()));
    payload::decrypt_into(key, payload, &mut plain)?;
    payload::value_from_bytes(payload.bson_type, &plain)
}

fn check_unique_alt_names(id: KeyId, names: &[String]) -> Result<()> {
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(Error::KeyFormat(format!(
                "key {id}: duplicate keyAltName {name:?}"
            )));
        }
    }
    Ok(())
}

fn int32(v: &Bson) -> Option<i32> {
    match *v {
        Bson::Int32(i) => Some(i),
        Bson::Int64(i) => i32::try_from(i).ok(),
        _ => None,
    }
}

fn located(e: Error, what: &str, at: usize) -> Error {
    match e {
        Error::KeyFormat(m) => Error::KeyFormat(format!("key file {what} {at}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &str = include_str!("../../tests/fixtures/csfle/master-key.txt");
    const KEYS: &str = include_str!("../../tests/fixtures/csfle/keys.jsonl");
    const KEYS_RELAXED: &str = include_str!("../../tests/fixtures/csfle/keys-relaxed.jsonl");
    const VALUES: &str = include_str!("../../tests/fixtures/csfle/values.jsonl");

    fn fixture_set() -> CsfleKeySet {
        let master = LocalMasterKey::from_base64(MASTER).unwrap();
        let docs = CsfleKeyDocument::parse_extended_json(KEYS).unwrap();
        CsfleKeySet::from_key_documents(&docs, &master).unwrap()
    }

    #[test]
    fn fixture_keys_parse_canonical_and_relaxed_alike() {
        let canonical = CsfleKeyDocument::parse_extended_json(KEYS).unwrap();
        let relaxed = CsfleKeyDocument::parse_extended_json(KEYS_RELAXED).unwrap();
        assert_eq!(canonical.len(), 3);
        assert_eq!(canonical, relaxed);
        assert!(canonical
            .iter()
            .all(|k| k.provider() == "local" && k.key_material.len() == 160));
        // Our document round-trips through Extended JSON to the same thing.
        for k in &canonical {
            let again = CsfleKeyDocument::parse_extended_json(&k.to_extended_json()).unwrap();
            assert_eq!(&again[0], k);
        }
    }

    #[test]
    fn fixture_alt_names() {
        let set = fixture_set();
        assert_eq!(set.len(), 3);
        let k1 = set.get_by_alt_name("fixture-key-1").unwrap();
        let k2 = set.get_by_alt_name("fixture-key-2-alias").unwrap();
        assert_eq!(set.get_by_alt_name("fixture-key-2").unwrap().id(), k2.id());
        assert_ne!(k1.id(), k2.id());
        assert!(set.iter().any(|k| k.alt_names().is_empty()));
    }

    /// The hot-path API the document transform uses, against libmongocrypt's ciphertexts.
    #[test]
    fn fixture_values_through_crate_api() {
        let set = fixture_set();
        let mut out = Vec::new();
        let mut n = 0;
        for line in VALUES.lines() {
            let case: Document =
                match Bson::try_from(serde_json::from_str::<serde_json::Value>(line).unwrap())
                    .unwrap()
                {
                    Bson::Document(d) => d,
                    _ => unreachable!(),
                };
            let Some(Bson::Binary(ct)) = case.get("ciphertext") else {
                panic!("no ciphertext")
            };
            let payload = payload::parse_payload(&ct.bytes).unwrap();
            let key = set.cipher(&payload.key_id).unwrap();
            out.clear();
            payload::decrypt_into(key, &payload, &mut out).unwrap();
            let (t, expected) = payload::value_to_bytes(case.get("value").unwrap()).unwrap();
            assert_eq!(t, payload.bson_type);
            assert_eq!(&out[..], &expected[..], "{}", case.get_str("name").unwrap());
            if payload.algorithm == CsfleAlgorithm::Deterministic {
                let mut again = Vec::new();
                payload::encrypt(key, payload.algorithm, payload.key_id, t, &out, &mut again)
                    .unwrap();
                assert_eq!(again, ct.bytes);
            }
            n += 1;
        }
        assert!(n > 50);
    }

    #[test]
    fn new_key_document_round_trip() {
        let master = LocalMasterKey::generate();
        let key = CsfleDataKey::generate(vec!["a".into(), "b".into()]).unwrap();
        let doc = key.to_key_document(&master);
        let parsed = CsfleKeyDocument::from_document(&doc.to_document()).unwrap();
        assert_eq!(parsed, doc);
        let back = parsed.unwrap_with(&master).unwrap();
        assert_eq!(back.id(), key.id());
        assert_eq!(back.alt_names(), ["a", "b"]);
        assert_eq!(back.material.expose_secret(), key.material.expose_secret());
        let ct = key
            .encrypt_value(CsfleAlgorithm::Random, &Bson::Int32(5))
            .unwrap();
        assert_eq!(back.decrypt_value(&ct).unwrap(), Bson::Int32(5));
    }

    #[test]
    fn fail_key_documents() {
        let master = LocalMasterKey::generate();
        let good = CsfleDataKey::generate(vec![])
            .unwrap()
            .to_key_document(&master)
            .to_document();
        let with = |f: &dyn Fn(&mut Document)| {
            let mut d = good.clone();
            f(&mut d);
            CsfleKeyDocument::from_document(&d)
        };
        assert!(with(&|_| {}).is_ok());
        for field in [
            "_id",
            "keyMaterial",
            "masterKey",
            "status",
            "creationDate",
            "updateDate",
        ] {
            let e = with(&|d| {
                d.remove(field);
            })
            .unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        let cases: Vec<(&str, Bson)> = vec![
            ("_id", Bson::String("x".into())),
            (
                "_id",
                Bson::Binary(Binary {
                    subtype: BinarySubtype::Uuid,
                    bytes: vec![1; 15],
                }),
            ),
            (
                "keyMaterial",
                Bson::Binary(Binary {
                    subtype: BinarySubtype::Uuid,
                    bytes: vec![1; 16],
                }),
            ),
            ("keyAltNames", Bson::String("x".into())),
            ("keyAltNames", Bson::Array(vec![Bson::Int32(1)])),
            ("keyAltNames", Bson::Array(vec!["x".into(), "x".into()])),
            ("masterKey", Bson::Document(doc! {"region": "x"})),
            ("creationDate", Bson::Int64(1)),
            ("status", Bson::String("0".into())),
            ("version", Bson::Int32(1)),
            ("surprise", Bson::Int32(1)),
        ];
        for (field, value) in cases {
            let r = with(&|d| {
                d.insert(field, value.clone());
            });
            assert!(matches!(r, Err(Error::KeyFormat(_))), "{field}: {r:?}");
        }
        assert!(with(&|d| {
            d.insert("version", 0);
        })
        .is_ok());
        // Another provider, or the wrong master key: clear errors naming the key.
        let mut aws = CsfleKeyDocument::from_document(&good).unwrap();
        aws.master_key = doc! {"provider": "aws", "region": "r", "key": "k"};
        assert!(aws
            .unwrap_with(&master)
            .unwrap_err()
            .to_string()
            .contains("aws"));
        let doc = CsfleKeyDocument::from_document(&good).unwrap();
        let e = doc.unwrap_with(&LocalMasterKey::generate()).unwrap_err();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains(&doc.id.to_string())),
            "{e}"
        );
    }

    #[test]
    fn fail_extended_json_files() {
        assert!(CsfleKeyDocument::parse_extended_json("")
            .unwrap()
            .is_empty());
        let e = CsfleKeyDocument::parse_extended_json("\n{not json}\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = CsfleKeyDocument::parse_extended_json("[1]").unwrap_err();
        assert!(e.to_string().contains("element 0"), "{e}");
        let bad_b64 = r#"{"_id": {"$binary": {"base64": "SECRETSECRET!!", "subType": "04"}}}"#;
        let e = CsfleKeyDocument::parse_extended_json(bad_b64).unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let array = format!("[{}]", KEYS.lines().collect::<Vec<_>>().join(","));
        assert_eq!(
            CsfleKeyDocument::parse_extended_json(&array).unwrap().len(),
            3
        );
    }

    #[test]
    fn fail_duplicate_keys_in_set() {
        let master = LocalMasterKey::from_base64(MASTER).unwrap();
        let docs = CsfleKeyDocument::parse_extended_json(KEYS).unwrap();
        let mut set = CsfleKeySet::from_key_documents(&docs, &master).unwrap();
        assert!(matches!(
            set.insert(docs[0].unwrap_with(&master).unwrap()),
            Err(Error::KeyFormat(_))
        ));
        let clash = CsfleDataKey::generate(vec!["fixture-key-1".into()]).unwrap();
        assert!(matches!(set.insert(clash), Err(Error::KeyFormat(_))));
        assert_eq!(set.len(), 3);
        assert!(CsfleDataKey::generate(vec!["x".into(), "x".into()]).is_err());
    }

    #[test]
    fn debug_prints_no_material() {
        let key = CsfleDataKey::from_material(
            KeyId::from_bytes([1; 16]),
            super::super::kms::secret_from_slice(&[0xcd; KEY_LEN]).unwrap(),
            vec!["n".into()],
        )
        .unwrap();
        let s = format!("{key:?} {key:#?}");
        assert!(
            !s.contains("205") && !s.to_lowercase().contains("cd"),
            "{s}"
        );
        let master = LocalMasterKey::generate();
        let doc = key.to_key_document(&master);
        let s = format!("{doc:?}");
        let bytes_prefix = format!("{:?}", &doc.key_material[..4]);
        assert!(s.contains("[160 bytes]"), "{s}");
        assert!(!s.contains(bytes_prefix.trim_end_matches(']')), "{s}");
        let mut set = CsfleKeySet::new();
        set.insert(key).unwrap();
        let s = format!("{set:?}");
        assert!(!s.contains("205"), "{s}");
    }
}
