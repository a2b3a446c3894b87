//! Encrypting and decrypting whole documents: the hot path.
//!
//! Every operation runs on raw BSON: the input is walked element by element with
//! [`bson::RawDocument`], unchanged elements are copied as bytes, and the output document is
//! written byte by byte. The owned-document API converts at the edges and runs the same engine,
//! so both paths give identical bytes.
//!
//! Encryption needs the schema (which fields, how); decryption needs only the keyring: it finds
//! every envelope anywhere in a document and looks its key up by the id in its header.
//!
//! ```text
//!  encrypt: schema::walk (the one schema walk) ──▶ Sealer: copy, seal at a rule, refuse dotted
//!           names that spell encrypted paths, drop stale blind indexes ──▶ out
//!  decrypt: every element ──▶ envelope / CSFLE / QE value? ──▶ Keyring::key(id) ──▶ open ──▶ out
//! ```

use std::cell::Cell;
use std::sync::Arc;

use spin::mutex::{SpinMutex as TryMutex, SpinMutexGuard as TryMutexGuard};

use bson::{Bson, Document, RawDocument, RawDocumentBuf};
use rayon::prelude::*;
use thread_local::ThreadLocal;
use zeroize::Zeroizing;

use crate::blind_index::{self, BLIND_INDEX_SUBTYPE};
use crate::cache_line::OwnLine;
use crate::csfle;
use crate::envelope::{self, Binding, Envelope, SealParams, ENVELOPE_SUBTYPE};
use crate::error::{Error, Result};
use crate::key::{Key, KeyId};
use crate::keyring::Keyring;
use crate::qe::{self, QeValueKind, SAFE_CONTENT_FIELD};
use crate::rawbson::{self, ty, Element, RawValue};
use crate::schema::walk::{self, Visitor};
use crate::schema::{FieldRule, Node, Schema};
use crate::suite::Suite;

/// The BSON Binary subtype MongoDB uses for its own encrypted values (CSFLE / Queryable
/// Encryption).
pub const CSFLE_SUBTYPE: u8 = 6;

/// Batches at least this large are split across threads by the `*_many` methods.
pub const PARALLEL_THRESHOLD: usize = 64;

/// Where documents live; bound into every ciphertext's associated data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Context {
    /// `db.collection`. When set, ciphertexts are bound to it.
    pub namespace: Option<String>,
    /// The owner field, for decrypting owner-bound values without the schema (encryption takes
    /// it from the schema).
    pub owner_field: Option<String>,
    /// Whether decryption keeps a top-level `__safeContent__` field (the tags a MongoDB
    /// Queryable Encryption collection keeps for its indexed fields). Off by default: the
    /// decrypted document is the application's document, as a QE driver shows it minus the
    /// server's bookkeeping.
    pub keep_safe_content: bool,
}

impl Context {
    /// A context with no namespace: ciphertexts are bound to their field path only.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    /// A context for the collection `namespace` (`db.collection`).
    #[must_use]
    pub fn namespace(namespace: impl Into<String>) -> Self {
        Context {
            namespace: Some(namespace.into()),
            ..Context::default()
        }
    }

    /// Sets whether decryption keeps a top-level `__safeContent__` field
    /// ([`Context::keep_safe_content`]).
    #[must_use]
    pub fn with_safe_content(mut self, keep: bool) -> Self {
        self.keep_safe_content = keep;
        self
    }

    /// Sets the owner field used to find the owner value when decrypting.
    #[must_use]
    pub fn with_owner_field(mut self, field: impl Into<String>) -> Self {
        self.owner_field = Some(field.into());
        self
    }
}

/// Encrypts and decrypts documents with a keyring and a schema. Cheap to clone; share it.
#[derive(Clone)]
pub struct Cryptor {
    keyring: Arc<dyn Keyring>,
    schema: Arc<Schema>,
    /// Per thread, the keys the last walk used (see [`KeyCache`]); shared by clones, which
    /// have the same keyring. Each thread's cache is alone on its cache lines: the crate keeps
    /// them side by side, and two threads locking neighbours made two threads slower than one
    /// thread twice (docs/BENCHMARKS.md).
    keys: Arc<ThreadLocal<OwnLine<TryMutex<KeyCache>>>>,
}

/// The keys a cryptor's last walk on one thread looked up, kept for the next walk while the
/// keyring's [`Keyring::generation`] stays the same. A walk moves them out and back in: no
/// reference count, lock or map shared between threads is touched per document, which is
/// what kept two threads from reaching twice one thread's rate (docs/BENCHMARKS.md). When the
/// generation changes, the next walk on any thread drops every thread's stale keys; all of
/// them go when the last clone of the cryptor is dropped (docs/SECURITY.md, "Key material in
/// memory").
#[derive(Default)]
struct KeyCache {
    generation: u64,
    /// Primary keys by alias, with their usage leases.
    primaries: Vec<Primary>,
    last: Option<Arc<Key>>,
    /// Associated data of the explicit values sealed or opened on this thread (field paths,
    /// namespaces and bound values, stored in the clear beside the ciphertexts).
    ad: Vec<u8>,
}

impl KeyCache {
    fn clear(&mut self) {
        self.primaries.clear();
        self.last = None;
    }

    fn settle(&mut self) {
        self.primaries.iter_mut().for_each(Primary::settle);
    }
}

impl core::fmt::Debug for Cryptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Cryptor")
            .field("fields", &self.schema.rules().len())
            .finish_non_exhaustive()
    }
}

impl Cryptor {
    /// A cryptor that encrypts per `schema` and decrypts with `keyring`.
    pub fn new(keyring: impl Keyring + 'static, schema: Schema) -> Self {
        Self::with_shared(Arc::new(keyring), Arc::new(schema))
    }

    /// A cryptor sharing an existing keyring handle.
    pub fn with_shared(keyring: Arc<dyn Keyring>, schema: Arc<Schema>) -> Self {
        Cryptor {
            keyring,
            schema,
            keys: Arc::default(),
        }
    }

    /// A cryptor that only decrypts (its schema is empty).
    pub fn decrypt_only(keyring: impl Keyring + 'static) -> Self {
        Self::new(keyring, Schema::empty())
    }

    /// The schema.
    #[must_use]
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The keyring.
    #[must_use]
    pub fn keyring(&self) -> &Arc<dyn Keyring> {
        &self.keyring
    }

    /// Encrypts the schema's fields of a raw document, without deserializing it.
    ///
    /// Values that are already envelopes (or CSFLE values) are left as they are. A document
    /// with `_id`-bound fields and no `_id` gets a new ObjectId `_id`, first.
    ///
    /// # Errors
    /// Malformed BSON, unknown alias, key state or usage-limit errors.
    pub fn encrypt_raw(&self, doc: &RawDocument, ctx: &Context) -> Result<RawDocumentBuf> {
        let mut out = Vec::with_capacity(doc.as_bytes().len() + 64 * self.schema.rules().len());
        self.encrypt_raw_into(doc, ctx, &mut out)?;
        RawDocumentBuf::from_bytes(out).map_err(Error::from)
    }

    /// Decrypts every fieldcrypt envelope, MongoDB CSFLE value and stored Queryable Encryption
    /// value in a raw document. A top-level `__safeContent__` is dropped unless the context
    /// keeps it ([`Context::keep_safe_content`]).
    ///
    /// # Errors
    /// [`Error::Decrypt`] (opaque) for a ciphertext that does not authenticate; unknown,
    /// disabled or destroyed keys; malformed BSON or envelopes.
    pub fn decrypt_raw(&self, doc: &RawDocument, ctx: &Context) -> Result<RawDocumentBuf> {
        let mut out = Vec::with_capacity(doc.as_bytes().len());
        self.decrypt_raw_into(doc, ctx, &mut out)?;
        RawDocumentBuf::from_bytes(out).map_err(Error::from)
    }

    /// Encrypts a raw document into `out` (cleared first), reusing its allocation.
    ///
    /// # Errors
    /// As [`Cryptor::encrypt_raw`].
    pub fn encrypt_raw_into(
        &self,
        doc: &RawDocument,
        ctx: &Context,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        let mut generated_id = [0u8; 12];
        let id = if self.schema.needs_id() {
            match rawbson::find(doc, "_id")? {
                Some(e) => Some(e.raw_value()),
                None => {
                    generated_id = bson::oid::ObjectId::new().bytes();
                    None
                }
            }
        } else {
            None
        };
        let needs_generated_id = self.schema.needs_id() && id.is_none();
        let mut w = Walker::new(self, ctx);
        w.id = id.or(needs_generated_id.then_some(RawValue {
            ty: ty::OBJECT_ID,
            bytes: &generated_id,
        }));
        if let Some(owner_field) = self.schema.owner_field() {
            w.owner = rawbson::find(doc, owner_field)?.map(|e| e.raw_value());
            w.owner_required = true;
        }
        let at = rawbson::begin_len(out);
        if needs_generated_id {
            rawbson::put_key(out, ty::OBJECT_ID, "_id");
            out.extend_from_slice(&generated_id);
        }
        w.encrypt_fields(doc, out)?;
        rawbson::end_doc(out, at)
    }

    /// Decrypts a raw document into `out` (cleared first), reusing its allocation.
    ///
    /// # Errors
    /// As [`Cryptor::decrypt_raw`].
    pub fn decrypt_raw_into(
        &self,
        doc: &RawDocument,
        ctx: &Context,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        let mut w = Walker::new(self, ctx);
        // `_id` and the owner are looked up only when an envelope is bound to them.
        w.unresolved = Some((
            doc,
            ctx.owner_field.as_deref().or(self.schema.owner_field()),
        ));
        w.decrypt_doc(doc, false, out)
    }

    /// Encrypts an owned document (through the raw engine).
    ///
    /// # Errors
    /// As [`Cryptor::encrypt_raw`].
    pub fn encrypt_document(&self, doc: &Document, ctx: &Context) -> Result<Document> {
        let raw = RawDocumentBuf::from_document(doc)?;
        self.encrypt_raw(&raw, ctx)?
            .to_document()
            .map_err(Error::from)
    }

    /// Decrypts an owned document (through the raw engine).
    ///
    /// # Errors
    /// As [`Cryptor::decrypt_raw`].
    pub fn decrypt_document(&self, doc: &Document, ctx: &Context) -> Result<Document> {
        let raw = RawDocumentBuf::from_document(doc)?;
        self.decrypt_raw(&raw, ctx)?
            .to_document()
            .map_err(Error::from)
    }

    /// Encrypts many documents, in parallel on all cores when there are at least
    /// [`PARALLEL_THRESHOLD`]. Results are in input order.
    #[must_use]
    pub fn encrypt_many<D: AsRef<RawDocument> + Sync>(
        &self,
        docs: &[D],
        ctx: &Context,
    ) -> Vec<Result<RawDocumentBuf>> {
        let out = self.map_many(docs, |d| self.encrypt_raw(d, ctx));
        // The keys' usage counters are exact after a batch (a keyset file records them).
        self.settle_usage();
        out
    }

    /// Gives back the random-nonce encryptions this cryptor's threads hold leased and have not
    /// made, so that every key's usage counter is exact (when no walk is running).
    ///
    /// Walks lease encryptions for many documents at once and keep the lease between
    /// documents (explicit values draw on it too), so that threads encrypting under one key do
    /// not update its counter for every document; a counter therefore runs ahead of the
    /// encryptions made by at most 64 documents' worth (and at most 4,096 encryptions, or one
    /// document's if more) per thread and key. Leases also go back when the keyring changes
    /// and when the cryptor is dropped, and [`Cryptor::encrypt_many`] settles at the end of
    /// every batch. Near a key's limit nothing is leased beyond the document being encrypted.
    pub fn settle_usage(&self) {
        for cache in self.keys.iter() {
            if let Some(mut c) = cache.try_lock() {
                c.settle();
            }
        }
    }

    /// Decrypts many documents, in parallel on all cores when there are at least
    /// [`PARALLEL_THRESHOLD`]. Results are in input order.
    #[must_use]
    pub fn decrypt_many<D: AsRef<RawDocument> + Sync>(
        &self,
        docs: &[D],
        ctx: &Context,
    ) -> Vec<Result<RawDocumentBuf>> {
        self.map_many(docs, |d| self.decrypt_raw(d, ctx))
    }

    /// This thread's entry of the key cache, locked, holding keys of the keyring's generation
    /// `generation` only: when the keyring has changed since they were cached, they and every
    /// other thread's stale keys are dropped first. `None` when the keyring reports no
    /// generation, or when the entry is busy (another thread is dropping stale keys, or this
    /// is a call inside a walk).
    fn thread_keys(&self, generation: Option<u64>) -> Option<TryMutexGuard<'_, KeyCache>> {
        let generation = generation?;
        let mut cache = self.keys.get_or_default().try_lock()?;
        if cache.generation != generation {
            cache.clear();
            cache.generation = generation;
            for other in self.keys.iter() {
                if let Some(mut c) = other.try_lock() {
                    if c.generation != generation {
                        c.clear();
                    }
                }
            }
        }
        Some(cache)
    }

    fn map_many<D, F>(&self, docs: &[D], f: F) -> Vec<Result<RawDocumentBuf>>
    where
        D: AsRef<RawDocument> + Sync,
        F: Fn(&RawDocument) -> Result<RawDocumentBuf> + Sync,
    {
        if docs.len() >= PARALLEL_THRESHOLD {
            docs.par_iter().map(|d| f(d.as_ref())).collect()
        } else {
            docs.iter().map(|d| f(d.as_ref())).collect()
        }
    }

    /// Encrypts one value as it would be stored at `path` (a schema path), for explicit use
    /// and for query rewriting. `id` and `owner` are needed when the field binds them.
    ///
    /// The encryption is counted on the thread's usage lease, as a document walk's are (see
    /// [`Cryptor::settle_usage`]).
    ///
    /// # Errors
    /// [`Error::Schema`] when `path` is not an encrypted field; key errors.
    pub fn encrypt_value(
        &self,
        path: &str,
        value: &Bson,
        ctx: &Context,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<bson::Binary> {
        let rule = self.rule(path)?;
        let enc = rule.field.encrypt.as_ref().ok_or_else(|| {
            Error::schema(path, "field has a blind index only; nothing to encrypt")
        })?;
        if rule.field.bind_id && id.is_none() {
            return Err(Error::MissingContext(
                "this field is bound to _id; give the document's _id",
            ));
        }
        let id = if rule.field.bind_id { id } else { None };
        let sealer = ValueSealer::new(self, rule, value, ctx, id, owner)?;
        // The key, its usage lease and the associated-data buffer of this thread's cache: no
        // lock, count or reference count shared between threads is touched per value.
        let Some(mut cache) = self.thread_keys(self.keyring.generation()) else {
            let key = self.keyring.primary(&enc.key)?;
            let mut ad = scratch_ad();
            let sealed = sealer.seal(&key, enc.suite, &mut ad);
            return_scratch_ad(ad);
            return sealed;
        };
        let KeyCache { primaries, ad, .. } = &mut *cache;
        let i = primary_in(primaries, &*self.keyring, &enc.key)?;
        let p = &mut primaries[i];
        p.drop_lease_if_spent();
        if let Some(limit) = enc.suite.usage_limit() {
            p.reserve(|_| 1, limit)?;
        }
        let sealed = sealer.seal_counted(&p.key, enc.suite, ad);
        if !p.leased {
            // Near the limit: what is left is for any thread.
            p.settle();
        }
        sealed
    }

    /// The ciphertexts a deterministic field would hold for `value`, one per readable key of its
    /// alias (current primary first), so that an equality query also matches values written
    /// before a rotation. `owner` is needed in owner-scoped collections.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] when the field is not deterministic.
    pub fn query_ciphertexts(
        &self,
        path: &str,
        value: &Bson,
        ctx: &Context,
        owner: Option<&Bson>,
    ) -> Result<Vec<bson::Binary>> {
        let rule = self.rule(path)?;
        let enc = match &rule.field.encrypt {
            Some(e) if e.suite.is_deterministic() => e,
            _ => {
                return Err(Error::UnsupportedQuery {
                    operator: "equality".into(),
                    field: path.into(),
                    reason: "only deterministic or blind-indexed fields can be queried by value",
                })
            }
        };
        let sealer = ValueSealer::new(self, rule, value, ctx, None, owner)?;
        let mut ad = scratch_ad();
        let sealed = self
            .keyring
            .readable_keys(&enc.key)?
            .iter()
            // A deterministic encryption under a demoted key, for matching only: sealed with a
            // primary-state view of the same secret. Nothing is stored with it.
            .map(|key| {
                let key = key.with_state(crate::key::KeyState::Primary);
                sealer.seal(&key, enc.suite, &mut ad)
            })
            .collect();
        return_scratch_ad(ad);
        sealed
    }

    /// The blind-index values for `value` at `path`, one per readable key of the index alias
    /// (current primary first), for an equality query.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`] when the field has no blind index.
    pub fn blind_index_values(&self, path: &str, value: &Bson) -> Result<Vec<bson::Binary>> {
        let rule = self.rule(path)?;
        let bi = rule
            .field
            .blind_index
            .as_ref()
            .ok_or_else(|| Error::UnsupportedQuery {
                operator: "equality".into(),
                field: path.into(),
                reason: "the field has no blind index",
            })?;
        let v = rawbson::encode_value(value)?;
        let mut out = Vec::new();
        for key in self.keyring.readable_keys(&bi.key)? {
            let mut payload = Vec::with_capacity(49);
            blind_index::compute_into(
                &key,
                &rule.normalized,
                RawValue {
                    ty: v.0,
                    bytes: &v.1,
                },
                bi.len(),
                &mut payload,
            )?;
            out.push(binary(BLIND_INDEX_SUBTYPE, payload));
        }
        Ok(out)
    }

    /// Decrypts one value found at `path` (a schema path; `$[]` segments may be given or
    /// left out): a fieldcrypt envelope, a MongoDB CSFLE value or a stored Queryable Encryption
    /// value (any of the four forms), directly, without building a
    /// document. Any other binary is returned as it is, as a document walk would leave it.
    /// `id` and `owner` are the document's `_id` and owner, needed when the value is bound to
    /// them.
    ///
    /// # Errors
    /// As [`Cryptor::decrypt_raw`].
    pub fn decrypt_value(
        &self,
        path: &str,
        value: &bson::Binary,
        ctx: &Context,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<Bson> {
        let path = normalized(path);
        let bytes = value.bytes.as_slice();
        match u8::from(value.subtype) {
            ENVELOPE_SUBTYPE => {
                // Read where `parse` wrote it: moving the envelope out of the `Result` loaded
                // bytes just stored narrower with wider loads, which wait for those stores (a
                // stalled store-forward per value; see `Envelope`).
                let parsed = Envelope::parse(bytes);
                let env = match parsed {
                    Ok(ref env) => env,
                    Err(e) => return Err(e),
                };
                let flags = env.flags();
                check_minimum_bindings(self, ctx, path.as_bytes(), flags)?;
                // Encoded only when the envelope binds them. As in a document walk, the owner
                // counts only where there is an owner field.
                let bound = |flag: u8, v: Option<&Bson>| {
                    v.filter(|_| flags & flag != 0)
                        .map(rawbson::encode_value)
                        .transpose()
                };
                let owner_field = ctx.owner_field.as_deref().or(self.schema.owner_field());
                let owner = owner.filter(|_| owner_field.is_some());
                let id = bound(envelope::flags::ID, id)?;
                let owner = bound(envelope::flags::OWNER, owner)?;
                let binding = Binding {
                    path: path.as_bytes(),
                    namespace: ctx.namespace.as_deref(),
                    id: as_raw(&id),
                    owner: as_raw(&owner),
                };
                let mut plain = Zeroizing::new(Vec::with_capacity(env.ciphertext.len()));
                // The key and associated-data buffer of this thread's cache, as for encryption.
                let opened = if let Some(mut cache) = self.thread_keys(self.keyring.generation()) {
                    let KeyCache { last, ad, .. } = &mut *cache;
                    let key = cached_key(last, &*self.keyring, env.key_id)?;
                    env.open_into(key, &binding, ad, &mut plain)
                } else {
                    let key = self.keyring.key(&env.key_id)?;
                    let mut ad = scratch_ad();
                    let opened = env.open_into(&key, &binding, &mut ad, &mut plain);
                    return_scratch_ad(ad);
                    opened
                };
                rawbson::decode_value(opened?, &plain)
            }
            CSFLE_SUBTYPE if matches!(bytes.first(), Some(1 | 2)) => {
                let p = csfle::parse_payload(bytes)?;
                let key = self.keyring.key(&p.key_id)?;
                let cipher = csfle_cipher(&key)?;
                let mut plain = Zeroizing::new(Vec::new());
                csfle::decrypt_into(cipher, &p, &mut plain)?;
                rawbson::decode_value(p.bson_type, &plain)
            }
            CSFLE_SUBTYPE if QeValueKind::of(bytes).is_some() => {
                let p = qe::parse_payload(bytes)?;
                let mut plain = Zeroizing::new(Vec::new());
                open_qe(&*self.keyring, &mut None, &p, &mut plain)?;
                rawbson::decode_value(p.bson_type, &plain)
            }
            _ => Ok(Bson::Binary(value.clone())),
        }
    }

    /// In an owner-scoped schema every ciphertext is bound to an owner: refuse to make one
    /// without (it would decrypt for any owner).
    fn require_owner(&self, owner: Option<&Bson>) -> Result<()> {
        match (self.schema.owner_field(), owner) {
            (Some(_), None) => Err(Error::MissingContext(
                "the schema is owner-scoped: give the owner value",
            )),
            _ => Ok(()),
        }
    }

    fn rule(&self, path: &str) -> Result<&FieldRule> {
        self.schema
            .rule(&normalized(path))
            .ok_or_else(|| Error::schema(path, "not an encrypted field in the schema"))
    }

    /// The inner keys (`K_KeyId`) of the indexed Queryable Encryption values in a document that
    /// differ from their outer key (`S_KeyId`, which [`Cryptor::referenced_keys`] lists): each
    /// is read by removing the value's server layer with the outer key, so those must be in
    /// the keyring already. For a second key-vault prefetch; values whose outer key is missing
    /// or that are malformed are passed over (decryption reports them).
    ///
    /// # Errors
    /// Malformed BSON.
    pub fn qe_client_keys(&self, doc: &RawDocument) -> Result<Vec<KeyId>> {
        let mut ids = Vec::new();
        self.collect_qe_client_keys(doc, &mut ids, 0)?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    fn collect_qe_client_keys(
        &self,
        doc: &RawDocument,
        ids: &mut Vec<KeyId>,
        depth: u32,
    ) -> Result<()> {
        walk::check_depth(depth)?;
        for e in rawbson::elements(doc) {
            let e = e?;
            match (e.ty, e.binary()) {
                (ty::DOCUMENT | ty::ARRAY, _) => {
                    self.collect_qe_client_keys(e.document()?, ids, depth + 1)?;
                }
                (_, Some((CSFLE_SUBTYPE, p)))
                    if QeValueKind::of(p).is_some_and(QeValueKind::is_indexed) =>
                {
                    let inner = qe::parse_payload(p).ok().and_then(|v| {
                        let key = self.keyring.key(&v.key_id).ok()?;
                        let sv = qe::open_server_layer(qe_cipher(&key).ok()?, &v).ok()?;
                        (sv.key_id != v.key_id).then_some(sv.key_id)
                    });
                    ids.extend(inner);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Every key id referenced by envelopes, blind indexes, CSFLE values and Queryable
    /// Encryption values in a document (for audits and key-vault prefetching). For an indexed
    /// QE value that is its outer key (`S_KeyId`): its inner key is inside the layer the outer
    /// key removes, so a prefetch that must cover every key loads these first, then
    /// [`Cryptor::qe_client_keys`] (as the rotation engine and the CLI do).
    ///
    /// # Errors
    /// Malformed BSON.
    pub fn referenced_keys(doc: &RawDocument) -> Result<Vec<KeyId>> {
        let mut ids = Vec::new();
        collect_keys(doc, &mut ids, 0)?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }
}

fn collect_keys(doc: &RawDocument, ids: &mut Vec<KeyId>, depth: u32) -> Result<()> {
    walk::check_depth(depth)?;
    for e in rawbson::elements(doc) {
        let e = e?;
        match (e.ty, e.binary()) {
            (ty::DOCUMENT | ty::ARRAY, _) => collect_keys(e.document()?, ids, depth + 1)?,
            (_, Some((ENVELOPE_SUBTYPE, p))) => ids.push(Envelope::parse(p)?.key_id),
            (_, Some((BLIND_INDEX_SUBTYPE, p))) => ids.push(blind_index::key_id(p)?),
            // FLE1 values and QE values (for indexed ones `S_KeyId`, as libmongocrypt collects:
            // `K_KeyId` is inside the server layer, and usually the same key).
            (_, Some((CSFLE_SUBTYPE, p)))
                if p.len() >= 17 && (matches!(p[0], 1 | 2) || QeValueKind::of(p).is_some()) =>
            {
                ids.push(KeyId::from_slice(&p[1..17])?);
            }
            _ => {}
        }
    }
    Ok(())
}

fn binary(subtype: u8, bytes: Vec<u8>) -> bson::Binary {
    bson::Binary {
        subtype: bson::spec::BinarySubtype::from(subtype),
        bytes,
    }
}

/// One value sealed under one or more keys (explicit encryption and query rewriting); its
/// bindings are encoded once.
struct ValueSealer<'r> {
    rule: &'r FieldRule,
    namespace: Option<&'r str>,
    value: &'r Bson,
    id: Option<(u8, Zeroizing<Vec<u8>>)>,
    owner: Option<(u8, Zeroizing<Vec<u8>>)>,
}

impl<'r> ValueSealer<'r> {
    fn new(
        cryptor: &Cryptor,
        rule: &'r FieldRule,
        value: &'r Bson,
        ctx: &'r Context,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<Self> {
        cryptor.require_owner(owner)?;
        Ok(ValueSealer {
            rule,
            namespace: ctx.namespace.as_deref(),
            value,
            id: id.map(rawbson::encode_value).transpose()?,
            owner: owner.map(rawbson::encode_value).transpose()?,
        })
    }

    /// Seals under `key`, counting the encryption against the key's usage limit; `ad` is a
    /// buffer for the associated data.
    fn seal(&self, key: &Key, suite: Suite, ad: &mut Vec<u8>) -> Result<bson::Binary> {
        envelope::count_encryption(key, suite)?;
        self.seal_counted(key, suite, ad)
    }

    /// Seals under `key`, whose usage counter already counts this encryption.
    fn seal_counted(&self, key: &Key, suite: Suite, ad: &mut Vec<u8>) -> Result<bson::Binary> {
        let binding = Binding {
            path: self.rule.normalized.as_bytes(),
            namespace: self.namespace,
            id: as_raw(&self.id),
            owner: as_raw(&self.owner),
        };
        let params = SealParams {
            suite,
            pad_to: self.rule.field.pad_to,
        };
        let payload = envelope::seal_value(key, params, self.value, &binding, ad)?;
        Ok(binary(ENVELOPE_SUBTYPE, payload))
    }
}

/// The thread's associated-data buffer (see [`Scratch`]), or a new one when a walk holds it:
/// a single value then costs no allocation for its associated data.
fn scratch_ad() -> Vec<u8> {
    SCRATCH
        .try_with(|c| {
            let mut s = c.take()?;
            let ad = std::mem::take(&mut s.ad);
            c.set(Some(s));
            Some(ad)
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(envelope::AD_CAPACITY))
}

/// Gives an associated-data buffer from [`scratch_ad`] back to the thread (cleared).
fn return_scratch_ad(mut ad: Vec<u8>) {
    ad.clear();
    let _ = SCRATCH.try_with(|c| {
        let mut s = c.take().unwrap_or_default();
        if s.ad.capacity() < ad.capacity() {
            s.ad = ad;
        }
        c.set(Some(s));
    });
}

/// Per-call state of a document walk; scratch buffers are reused across fields.
struct Walker<'c> {
    cryptor: &'c Cryptor,
    ctx: &'c Context,
    id: Option<RawValue<'c>>,
    owner: Option<RawValue<'c>>,
    /// The schema is owner-scoped: every ciphertext must be bound to an owner.
    owner_required: bool,
    path: String,
    ad: Vec<u8>,
    /// The last key looked up, by id: documents mostly use one key.
    last_key: Option<Arc<Key>>,
    /// For decryption: the document and owner field whose `_id` and owner have not been looked
    /// up yet.
    unresolved: Option<(&'c RawDocument, Option<&'c str>)>,
    /// Current nesting depth.
    depth: u32,
    /// Primary keys by alias, looked up once per document (aliases are few).
    primaries: Vec<Primary>,
    /// The keyring's generation when the walk began, if it has one: the keys above may then
    /// come from, and go back to, the cryptor's [`KeyCache`].
    generation: Option<u64>,
}

/// A walk's buffers, kept per thread between walks so that a document costs no allocation
/// beyond its output. They hold field paths and associated data (both stored in the clear
/// beside the ciphertexts), never keys or plaintext: a walk's keys are dropped when it ends.
#[derive(Default)]
struct Scratch {
    path: String,
    ad: Vec<u8>,
    primaries: Vec<Primary>,
}

impl Scratch {
    /// A thread's first walk buffers, made at their working size at once rather than grown
    /// by the first documents. Grown from empty, they ended where two threads walking at once
    /// ran at 1.45× one thread's rate instead of 2× (W1 AES-256-GCM on this machine;
    /// docs/BENCHMARKS.md, "Thread scaling": the effect is measured, its mechanism not).
    fn presized() -> Self {
        Scratch {
            path: String::with_capacity(PATH_CAPACITY),
            ad: Vec::with_capacity(envelope::AD_CAPACITY),
            primaries: Vec::with_capacity(4),
        }
    }
}

/// A first capacity for a walk's path buffer: dotted paths of ordinary depth fit.
const PATH_CAPACITY: usize = 64;

/// A primary key a walk encrypts with, and how many random-nonce encryptions it holds
/// reserved on the key's usage counter and not made yet: a lease, taken for many documents
/// at once ([`usage_lease`]) and kept with the key in this thread's [`KeyCache`] between
/// walks, so that threads encrypting under one key do not update its (shared) counter per
/// document. The counter is never below the encryptions made; it runs ahead by what the leases
/// hold until they go back: when dropped (the cache cleared after a keyring change, the
/// cryptor dropped), or by [`Cryptor::settle_usage`], which `encrypt_many` calls. A copy of it
/// taken meanwhile (a key vault's saved floor) errs on the safe side.
struct Primary {
    key: Arc<Key>,
    reserved: u64,
    /// The reservation is a whole lease, kept between walks; near the key's limit it is one
    /// document's, given back when the walk ends (as much as is left is then for any thread).
    leased: bool,
}

impl Primary {
    /// Counts one random-nonce encryption against `limit`, leasing when the lease is used up:
    /// for `per_use(alias)` encryptions at a time (a document's under this key), or near the
    /// limit for those only, or as many as the limit still allows.
    fn reserve(&mut self, per_use: impl FnOnce(&str) -> u64, limit: u64) -> Result<()> {
        if self.reserved == 0 {
            let secret = envelope::encrypting_secret(&self.key)?;
            let per_use = per_use(self.key.alias());
            let lease = usage_lease(per_use);
            self.reserved = secret
                .reserve_lease(per_use, lease, limit)
                .map_err(|limit| Error::KeyUsageLimit {
                    key: self.key.id(),
                    limit,
                })?;
            self.leased = self.reserved >= lease;
        }
        self.reserved -= 1;
        Ok(())
    }

    /// Forgets the lease of a key the key vault has reported spent: it makes no more
    /// encryptions, leased or not.
    fn drop_lease_if_spent(&mut self) {
        if envelope::encrypting_secret(&self.key).is_ok_and(|s| s.is_exhausted()) {
            self.reserved = 0;
        }
    }

    /// Gives back what the lease holds.
    fn settle(&mut self) {
        if self.reserved > 0 {
            self.key.release_reserved(self.reserved);
            self.reserved = 0;
        }
    }
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Documents' worth of random-nonce encryptions a walk leases at once for a key, and the most
/// encryptions one lease holds (unless a single document needs more).
const LEASE_DOCUMENTS: u64 = 64;
const MAX_LEASE: u64 = 4096;

/// The lease for a document that makes `per_document` random-nonce encryptions under a key.
fn usage_lease(per_document: u64) -> u64 {
    (per_document * LEASE_DOCUMENTS)
        .min(MAX_LEASE)
        .max(per_document)
}

/// The index in `primaries` of `alias`'s primary key, looked up in `keyring` when not there.
fn primary_in(primaries: &mut Vec<Primary>, keyring: &dyn Keyring, alias: &str) -> Result<usize> {
    if let Some(i) = primaries.iter().position(|p| p.key.alias() == alias) {
        return Ok(i);
    }
    primaries.push(Primary {
        key: keyring.primary(alias)?,
        reserved: 0,
        leased: false,
    });
    Ok(primaries.len() - 1)
}

thread_local! {
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

impl<'c> Walker<'c> {
    fn new(cryptor: &'c Cryptor, ctx: &'c Context) -> Self {
        // A walk inside a walk on the same thread finds no scratch and allocates its own.
        let Scratch {
            mut path,
            mut ad,
            primaries,
        } = SCRATCH
            .try_with(Cell::take)
            .ok()
            .flatten()
            .unwrap_or_else(Scratch::presized);
        path.clear();
        ad.clear();
        let mut w = Walker {
            cryptor,
            ctx,
            id: None,
            owner: None,
            owner_required: false,
            unresolved: None,
            depth: 0,
            path,
            ad,
            last_key: None,
            primaries,
            generation: cryptor.keyring.generation(),
        };
        w.take_cached_keys();
        w
    }

    /// Takes the keys the last walk on this thread left, if the keyring has not changed since;
    /// otherwise drops every thread's stale keys.
    fn take_cached_keys(&mut self) {
        let Some(mut cache) = self.cryptor.thread_keys(self.generation) else {
            return;
        };
        std::mem::swap(&mut self.primaries, &mut cache.primaries);
        self.last_key = cache.last.take();
        // A key the key vault has since reported spent makes no more encryptions, leased or
        // not (a walk in flight finishes its document).
        self.primaries
            .iter_mut()
            .for_each(Primary::drop_lease_if_spent);
    }

    /// Gives the walk's keys and their leases back to the cryptor's cache for this thread, when
    /// the cache is free and the keyring is still at the walk's generation: keys of a walk that
    /// a keyring change overtook are dropped here (their leases given back) rather than kept.
    fn return_cached_keys(&mut self) {
        // Without a generation nothing was cached; a busy entry (another thread dropping
        // stale keys, or a walk inside a walk) is left alone.
        let Some(generation) = self.generation else {
            return;
        };
        let Some(mut cache) = self.cryptor.keys.get_or_default().try_lock() else {
            return;
        };
        if cache.generation == generation
            && self.cryptor.keyring.generation() == Some(generation)
            && cache.primaries.is_empty()
            && cache.last.is_none()
        {
            std::mem::swap(&mut self.primaries, &mut cache.primaries);
            cache.last = self.last_key.take();
        }
    }

    /// The index in `self.primaries` of `alias`'s primary key.
    fn primary(&mut self, alias: &str) -> Result<usize> {
        primary_in(&mut self.primaries, &*self.cryptor.keyring, alias)
    }

    /// Counts one random-nonce encryption with primary `i` against `limit` (see
    /// [`Primary::reserve`]), leasing for the schema's fields under the alias.
    fn reserve(&mut self, i: usize, limit: u64) -> Result<()> {
        let schema = &self.cryptor.schema;
        self.primaries[i].reserve(|alias| schema.random_nonce_fields(alias), limit)
    }

    /// The key `id`, through a one-entry cache (documents mostly use one key). A function of
    /// two fields rather than a method, so that the key can be borrowed beside the walk's
    /// other fields.
    fn key_by_id<'k>(
        last: &'k mut Option<Arc<Key>>,
        keyring: &dyn Keyring,
        id: KeyId,
    ) -> Result<&'k Key> {
        cached_key(last, keyring, id).map(|k| &**k)
    }

    // ---- encryption ----

    /// Writes the elements of `doc` (not its length/terminator), encrypting what the schema
    /// reaches per its rules: the schema walk, with [`Sealer`] saying what happens at a match.
    fn encrypt_fields(&mut self, doc: &'c RawDocument, out: &mut Vec<u8>) -> Result<()> {
        let schema: &'c Schema = &self.cryptor.schema;
        // The top document is level 1, as `enter` counts for decryption.
        walk::walk(&mut Sealer { w: self, out }, schema, doc, schema.tree(), 1)
    }

    /// Counts one level of nesting, refusing documents nested deeper than MongoDB allows.
    fn enter(&mut self) -> Result<()> {
        self.depth += 1;
        walk::check_depth(self.depth)
    }

    fn encrypt_field(&mut self, ri: usize, e: Element<'c>, out: &mut Vec<u8>) -> Result<()> {
        let rule = &self.cryptor.schema.rules()[ri];
        if is_encrypted(&e) {
            out.extend_from_slice(e.raw);
            return Ok(());
        }
        if let Some(enc) = &rule.field.encrypt {
            let key = self.primary(&enc.key)?;
            let params = SealParams {
                suite: enc.suite,
                pad_to: rule.field.pad_to,
            };
            if rule.each_element && e.ty == ty::ARRAY {
                rawbson::put_key(out, ty::ARRAY, e.name);
                let at = rawbson::begin_len(out);
                for item in rawbson::elements(e.document()?) {
                    let item = item?;
                    if is_encrypted(&item) {
                        out.extend_from_slice(item.raw);
                    } else {
                        rawbson::put_key(out, ty::BINARY, item.name);
                        self.seal(key, params, rule.field.bind_id, item.raw_value(), out)?;
                    }
                }
                rawbson::end_doc(out, at)?;
            } else {
                rawbson::put_key(out, ty::BINARY, e.name);
                self.seal(key, params, rule.field.bind_id, e.raw_value(), out)?;
            }
        }
        let name = self.cryptor.schema.blind_index_name_of(ri);
        if let (Some(bi), Some(name)) = (&rule.field.blind_index, name) {
            let key = self.primary(&bi.key)?;
            rawbson::put_key(out, ty::BINARY, name);
            let at = rawbson::begin_binary(out, BLIND_INDEX_SUBTYPE);
            let key = &self.primaries[key].key;
            blind_index::compute_into(key, &rule.normalized, e.raw_value(), bi.len(), out)?;
            rawbson::end_binary(out, at)?;
        }
        Ok(())
    }

    /// Encrypts `value` with primary `key` (an index in `self.primaries`).
    fn seal(
        &mut self,
        key: usize,
        params: SealParams,
        bind_id: bool,
        value: RawValue<'_>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if self.owner_required && self.owner.is_none() {
            return Err(Error::MissingContext(
                "the document has no value for the schema's owner field",
            ));
        }
        if let Some(limit) = params.suite.usage_limit() {
            self.reserve(key, limit)?;
        }
        let binding = Binding {
            path: self.path.as_bytes(),
            namespace: self.ctx.namespace.as_deref(),
            id: if bind_id { self.id } else { None },
            owner: self.owner,
        };
        let at = rawbson::begin_binary(out, ENVELOPE_SUBTYPE);
        let key = &self.primaries[key].key;
        envelope::seal_reserved_into(key, params, value, &binding, &mut self.ad, out)?;
        rawbson::end_binary(out, at)
    }

    // ---- decryption ----

    fn decrypt_doc(
        &mut self,
        doc: &'c RawDocument,
        is_array: bool,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.enter()?;
        let at = rawbson::begin_len(out);
        for e in rawbson::elements(doc) {
            let e = e?;
            match (e.ty, e.binary()) {
                // The QE server's tags: not part of the application's document.
                (ty::ARRAY, _)
                    if self.depth == 1
                        && !is_array
                        && e.name == SAFE_CONTENT_FIELD.as_bytes()
                        && !self.ctx.keep_safe_content => {}
                (ty::DOCUMENT | ty::ARRAY, _) => {
                    let mark = if is_array {
                        self.path.len()
                    } else {
                        walk::push(&mut self.path, e.key())
                    };
                    rawbson::put_key(out, e.ty, e.name);
                    self.decrypt_doc(e.document()?, e.ty == ty::ARRAY, out)?;
                    self.path.truncate(mark);
                }
                // A top-level field's path is its name: no copy into the path buffer.
                (_, Some((ENVELOPE_SUBTYPE, payload))) if !is_array && self.path.is_empty() => {
                    self.open(e.name, e.name, payload, out)?;
                }
                (_, Some((ENVELOPE_SUBTYPE, payload))) => {
                    let mark = if is_array {
                        self.path.len()
                    } else {
                        walk::push(&mut self.path, e.key())
                    };
                    let path = std::mem::take(&mut self.path);
                    let opened = self.open(e.name, path.as_bytes(), payload, out);
                    self.path = path;
                    opened?;
                    self.path.truncate(mark);
                }
                // FLE1 values (blob subtypes 1 and 2); Queryable Encryption payloads and
                // other subtype-6 values are MongoDB's own business and pass through.
                (_, Some((CSFLE_SUBTYPE, payload))) if matches!(payload.first(), Some(1 | 2)) => {
                    self.open_csfle(e.name, payload, out)?;
                }
                // Stored Queryable Encryption values (blob subtypes 14 to 17).
                (_, Some((CSFLE_SUBTYPE, payload))) if QeValueKind::of(payload).is_some() => {
                    self.open_qe(e.name, payload, out)?;
                }
                _ => out.extend_from_slice(e.raw),
            }
        }
        self.depth -= 1;
        rawbson::end_doc(out, at)
    }

    /// Opens the envelope `payload` of the element `name`, whose path is `path`.
    fn open(&mut self, name: &[u8], path: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        // Read in place, as in `Cryptor::decrypt_value`.
        let parsed = Envelope::parse(payload);
        let env = match parsed {
            Ok(ref env) => env,
            Err(e) => return Err(e),
        };
        let flags = env.flags();
        check_minimum_bindings(self.cryptor, self.ctx, path, flags)?;
        let key = Self::key_by_id(&mut self.last_key, &*self.cryptor.keyring, env.key_id)?;
        if flags & (envelope::flags::ID | envelope::flags::OWNER) != 0 {
            if let Some((doc, owner_field)) = self.unresolved.take() {
                self.id = rawbson::find(doc, "_id")?.map(|e| e.raw_value());
                if let Some(f) = owner_field {
                    self.owner = rawbson::find(doc, f)?.map(|e| e.raw_value());
                }
            }
        }
        let binding = Binding {
            path,
            namespace: self.ctx.namespace.as_deref(),
            id: self.id,
            owner: self.owner,
        };
        let type_at = out.len();
        rawbson::put_key(out, 0, name);
        match env.open_into(key, &binding, &mut self.ad, out) {
            Ok(t) => {
                out[type_at] = t;
                Ok(())
            }
            Err(err) => {
                out.truncate(type_at);
                Err(err)
            }
        }
    }
}

impl Drop for Walker<'_> {
    fn drop(&mut self) {
        for p in self.primaries.iter_mut().filter(|p| !p.leased) {
            p.settle();
        }
        self.return_cached_keys();
        // What the cache did not take back is dropped here, its leases given back.
        self.primaries.clear();
        self.last_key = None;
        let scratch = Scratch {
            path: std::mem::take(&mut self.path),
            ad: std::mem::take(&mut self.ad),
            primaries: std::mem::take(&mut self.primaries),
        };
        // Not during thread teardown, when the thread-local may already be gone.
        let _ = SCRATCH.try_with(|c| c.set(Some(scratch)));
    }
}

/// The encryption side of the schema walk: copies every element it is shown into `out`,
/// sealing those at a rule's path and dropping blind indexes that are recomputed.
struct Sealer<'w, 'c> {
    w: &'w mut Walker<'c>,
    out: &'w mut Vec<u8>,
}

impl<'c> Visitor<'c, 'c> for Sealer<'_, 'c> {
    /// Names of the blind-index fields of one document that are recomputed (their source field
    /// is present in clear): the stale copies are dropped.
    type Level = Vec<&'c str>;

    fn path(&mut self) -> &mut String {
        &mut self.w.path
    }

    fn blind_index(
        &mut self,
        level: &mut Self::Level,
        doc: &'c RawDocument,
        source: &str,
        _rule: usize,
        name: &'c str,
    ) -> Result<()> {
        if let Some(src) = rawbson::find(doc, source)? {
            if !is_encrypted(&src) {
                level.push(name);
            }
        }
        Ok(())
    }

    fn skip(&self, level: &Self::Level, e: &Element<'c>) -> bool {
        level.iter().any(|n| n.as_bytes() == e.name) // replaced by a freshly computed index
    }

    fn rule(&mut self, rule: usize, e: Element<'c>) -> Result<()> {
        self.w.encrypt_field(rule, e, self.out)
    }

    fn dotted(&mut self, node: &'c Node, dot: usize, e: Element<'c>) -> Result<()> {
        if node.child(&e.name[..dot]).is_some() {
            // Left alone, the value would be stored in clear although the path is encrypted.
            return Err(Error::schema(
                e.key(),
                "a dotted field name spells a path the schema encrypts; use nested documents",
            ));
        }
        self.other(e)
    }

    fn other(&mut self, e: Element<'c>) -> Result<()> {
        self.out.extend_from_slice(e.raw);
        Ok(())
    }

    fn open(&mut self, e: &Element<'c>) -> Result<usize> {
        rawbson::put_key(self.out, e.ty, e.name);
        Ok(rawbson::begin_len(self.out))
    }

    fn close(&mut self, at: usize) -> Result<()> {
        rawbson::end_doc(self.out, at)
    }
}

impl Walker<'_> {
    /// Decrypts a stored MongoDB Queryable Encryption value with 96-byte keys from the keyring.
    fn open_qe(&mut self, name: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let p = qe::parse_payload(payload)?;
        let type_at = out.len();
        rawbson::put_key(out, p.bson_type, name);
        let keyring = &*self.cryptor.keyring;
        let opened = if p.kind == QeValueKind::Unindexed {
            // One key: the walk's cached reference, as for FLE1 (the hot path of bulk reads).
            Self::key_by_id(&mut self.last_key, keyring, p.key_id)
                .and_then(|key| qe::open_unindexed(qe_cipher(key)?, &p, out))
        } else {
            open_qe(keyring, &mut self.last_key, &p, out)
        };
        opened.inspect_err(|_| out.truncate(type_at))
    }

    /// Decrypts a MongoDB CSFLE (FLE1) value with a 96-byte CSFLE key from the same keyring.
    fn open_csfle(&mut self, name: &[u8], payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let p = csfle::parse_payload(payload)?;
        let key = Self::key_by_id(&mut self.last_key, &*self.cryptor.keyring, p.key_id)?;
        let cipher = csfle_cipher(key)?;
        let type_at = out.len();
        rawbson::put_key(out, p.bson_type, name);
        csfle::decrypt_into(cipher, &p, out).inspect_err(|_| out.truncate(type_at))
    }
}

/// Decrypts a parsed stored QE value with keys from `keyring`, appending the value's bytes to
/// `out`. `last` caches the last key used, as the walk does for envelopes.
fn open_qe(
    keyring: &dyn Keyring,
    last: &mut Option<Arc<Key>>,
    p: &qe::QePayload<'_>,
    out: &mut Vec<u8>,
) -> Result<()> {
    // Owned keys: an indexed value may need a second (inner) key while the first is in use.
    let lookup = |id: KeyId| cached_key(last, keyring, id).cloned();
    qe::decrypt_into(p, lookup, |k| qe_cipher(k), out)
}

/// The key `id`: `last` when it is the last key used, else the keyring's (then kept in `last`).
fn cached_key<'k>(
    last: &'k mut Option<Arc<Key>>,
    keyring: &dyn Keyring,
    id: KeyId,
) -> Result<&'k Arc<Key>> {
    if last.as_ref().is_none_or(|k| k.id() != id) {
        *last = Some(keyring.key(&id)?);
    }
    last.as_ref().ok_or_else(|| Error::UnknownKey(id))
}

/// The QE cipher state of `key`, for decryption (a readable 96-byte CSFLE/QE data key).
fn qe_cipher(key: &Key) -> Result<&qe::QeKey> {
    key.for_decrypt()?.qe().ok_or_else(|| Error::KeyMisuse {
        id: key.id(),
        reason: "not a 96-byte MongoDB (CSFLE/Queryable Encryption) data key",
    })
}

/// The CSFLE cipher state of `key`, for decryption (a readable 96-byte CSFLE data key).
fn csfle_cipher(key: &Key) -> Result<&csfle::CsfleKey> {
    key.for_decrypt()?.csfle().ok_or_else(|| Error::KeyMisuse {
        id: key.id(),
        reason: "not a 96-byte CSFLE data key",
    })
}

/// An encoded value (type and bytes) as a [`RawValue`].
fn as_raw(v: &Option<(u8, Zeroizing<Vec<u8>>)>) -> Option<RawValue<'_>> {
    v.as_ref().map(|(ty, bytes)| RawValue { ty: *ty, bytes })
}

/// A schema path without its `$[]` segments: the path bound into the associated data.
fn normalized(path: &str) -> std::borrow::Cow<'_, str> {
    // Most paths have no `$[]` segment: one byte scan says so.
    if path.as_bytes().contains(&b'$') && path.split('.').any(|s| s == crate::schema::EACH) {
        let segments: Vec<&str> = path
            .split('.')
            .filter(|s| *s != crate::schema::EACH)
            .collect();
        std::borrow::Cow::Owned(segments.join("."))
    } else {
        std::borrow::Cow::Borrowed(path)
    }
}

/// A ciphertext must be bound at least as tightly as its context requires: to the namespace
/// when the reader knows it, to the owner in owner-scoped collections, and to `_id` where the
/// schema binds the field (`path`, normalized). Otherwise a value written without those
/// bindings (or planted by someone with write access) could be moved here and decrypt.
fn check_minimum_bindings(cryptor: &Cryptor, ctx: &Context, path: &[u8], bound: u8) -> Result<()> {
    use envelope::flags;
    let missing = |what| {
        Err(Error::UnboundCiphertext {
            path: String::from_utf8_lossy(path).into_owned(),
            missing: what,
        })
    };
    if ctx.namespace.is_some() && bound & flags::NAMESPACE == 0 {
        return missing("namespace");
    }
    let owner_scoped = ctx.owner_field.is_some() || cryptor.schema.owner_field().is_some();
    if owner_scoped && bound & flags::OWNER == 0 {
        return missing("owner");
    }
    if cryptor.schema.needs_id()
        && bound & flags::ID == 0
        && core::str::from_utf8(path)
            .ok()
            .and_then(|p| cryptor.schema.rule_at(p))
            .is_some_and(|r| r.field.bind_id)
    {
        return missing("_id");
    }
    Ok(())
}

/// Whether an element already holds a ciphertext (ours or MongoDB's).
fn is_encrypted(e: &Element<'_>) -> bool {
    matches!(e.binary(), Some((ENVELOPE_SUBTYPE | CSFLE_SUBTYPE, _)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::InMemoryKeyring;
    use crate::schema::Field;
    use crate::suite::RANDOM_NONCE_LIMIT;

    /// A cryptor that encrypts `x` under `pii` (randomized), and its keyring.
    fn x_cryptor() -> (Arc<InMemoryKeyring>, Cryptor) {
        let keys = Arc::new(InMemoryKeyring::new());
        keys.generate("pii");
        let schema = Schema::builder()
            .field("x", Field::randomized("pii"))
            .build()
            .unwrap();
        (keys.clone(), Cryptor::with_shared(keys, Arc::new(schema)))
    }

    /// A thread's lease does not outlive the key vault's word that the key is spent: the next
    /// document is refused although the lease still holds encryptions.
    #[test]
    fn an_exhausted_key_refuses_the_next_document_whatever_the_lease_holds() {
        let (keys, c) = x_cryptor();
        let ctx = Context::none();
        c.encrypt_document(&bson::doc! { "x": 1 }, &ctx).unwrap();
        let key = keys.primary("pii").unwrap();
        assert_eq!(key.encryptions(), usage_lease(1), "a lease is held");
        envelope::encrypting_secret(&key)
            .unwrap()
            .exhaust(RANDOM_NONCE_LIMIT);
        let err = c
            .encrypt_document(&bson::doc! { "x": 2 }, &ctx)
            .unwrap_err();
        assert!(matches!(err, Error::KeyUsageLimit { .. }), "{err:?}");
        c.settle_usage();
        assert_eq!(key.encryptions(), RANDOM_NONCE_LIMIT);
    }

    /// The same for explicit values, which keep their lease in the thread's cache in place.
    #[test]
    fn an_exhausted_key_refuses_the_next_explicit_value_whatever_the_lease_holds() {
        let (keys, c) = x_cryptor();
        let ctx = Context::none();
        let v = Bson::Int32(1);
        c.encrypt_value("x", &v, &ctx, None, None).unwrap();
        let key = keys.primary("pii").unwrap();
        assert_eq!(key.encryptions(), usage_lease(1), "a lease is held");
        envelope::encrypting_secret(&key)
            .unwrap()
            .exhaust(RANDOM_NONCE_LIMIT);
        let err = c.encrypt_value("x", &v, &ctx, None, None).unwrap_err();
        assert!(matches!(err, Error::KeyUsageLimit { .. }), "{err:?}");
    }
}
