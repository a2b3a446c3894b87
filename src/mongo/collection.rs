//! [`EncryptedCollection`]: a `mongodb::Collection` that encrypts what it writes, decrypts
//! what it reads, rewrites queries for encrypted fields and refuses the ones that cannot work.
//!
//! ```text
//!  T ──serde──▶ raw BSON ──owner bound, encrypted (rayon for batches)──▶ driver ──▶ server
//!  T ◀──serde── raw BSON ◀──decrypted per batch (keys prefetched)─────── driver ◀── server
//!  filter / write / pipeline ──QueryRewriter (pure)──▶ driver    (or a refusal, nothing sent)
//!  each operation: action/<family>.rs, through action/prepare.rs (rewrite, check, prefetch)
//! ```
//!
//! Documents travel as [`RawDocumentBuf`] on the wire side: serde types are serialized once to
//! raw BSON, encrypted byte by byte, and deserialized once after decryption. With
//! `T = RawDocumentBuf` (see [`EncryptedCollection::raw`]) there is no serde step at all.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use bson::{Bson, Document, RawDocumentBuf};
use mongodb::Collection;
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ArgumentError, Error, Result};
use crate::mongo::rewrite::QueryRewriter;
use crate::mongo::KeySource;
use crate::schema::{Encrypted, Schema};
use crate::transform::{Context, Cryptor, PARALLEL_THRESHOLD};

mod action;
mod cursor;
mod tenant;

pub use action::{
    ActionSession, Aggregate, BulkWrite, CountDocuments, CreateIndex, CreateIndexes, Delete,
    Distinct, EncryptedChangeStream, EstimatedDocumentCount, Find, FindOne, FindOneAndDelete,
    FindOneAndReplace, FindOneAndUpdate, InsertMany, InsertOne, NoSession, ReplaceOne, Update,
    Watch, WithSession, WriteModel,
};
pub use cursor::EncryptedCursor;
pub use tenant::{tenant_alias, tenant_aliases, tenant_schema};

/// A MongoDB collection whose schema-designated fields are encrypted client-side.
///
/// Shaped like [`mongodb::Collection`]: every method returns an action to `.await`, with
/// `.with_options(...)` and `.session(&mut session)` setters (sessions and transactions pass
/// through to the driver). Queries on encrypted fields are rewritten (deterministic and
/// blind-indexed equality) or refused before anything is sent; see [`QueryRewriter`] and
/// docs/QUERIES.md.
///
/// Cheap to clone. `T` is any serde type, or [`RawDocumentBuf`] / [`Document`] for raw use.
///
/// ```no_run
/// use std::sync::Arc;
/// use bson::doc;
/// use fieldcrypt::mongo::EncryptedCollection;
/// use fieldcrypt::{Field, InMemoryKeyring, Schema};
///
/// # async fn demo(db: mongodb::Database) -> fieldcrypt::Result<()> {
/// let keys = Arc::new(InMemoryKeyring::new());
/// keys.generate("pii");
/// let schema = Schema::builder()
///     .field("email", Field::deterministic("pii"))
///     .owner_field("tenant")
///     .build()?;
/// let users = EncryptedCollection::<bson::Document>::new(db.collection::<bson::Document>("users"), keys, schema);
/// let acme = users.scoped("acme")?; // every query gets {tenant: "acme"}
/// acme.insert_one(doc! { "email": "ada@example.com" }).await?;
/// let found = acme.find_one(doc! { "email": "ada@example.com" }).await?;
/// # Ok(()) }
/// ```
pub struct EncryptedCollection<T> {
    coll: Collection<RawDocumentBuf>,
    keys: Arc<dyn KeySource>,
    /// The schema as given (per-tenant schemas are derived from it).
    schema: Arc<Schema>,
    /// Encrypts with the effective schema (the tenant's, with per-tenant keys).
    cryptor: Cryptor,
    ctx: Context,
    owner: Option<Bson>,
    tenant_keys: bool,
    /// The aliases the effective schema uses, prefetched once per operation.
    aliases: Arc<[String]>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for EncryptedCollection<T> {
    fn clone(&self) -> Self {
        self.clone_with_type()
    }
}

impl<T> core::fmt::Debug for EncryptedCollection<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The owner value is an identifier, but it is still the caller's data: not printed.
        f.debug_struct("EncryptedCollection")
            .field("namespace", &self.ctx.namespace)
            .field("scoped", &self.owner.is_some())
            .field("tenant_keys", &self.tenant_keys)
            .field("fields", &self.schema.rules().len())
            .finish_non_exhaustive()
    }
}

fn aliases_of(schema: &Schema) -> Arc<[String]> {
    schema.aliases().into_iter().map(str::to_owned).collect()
}

impl<T> EncryptedCollection<T> {
    /// Wraps `collection`: fields of `schema` are encrypted with keys from `keys` (an
    /// `Arc<InMemoryKeyring>`, a key vault, any shared [`KeySource`]), bound to the
    /// collection's namespace (`db.collection`) and, when the schema has an owner field, to
    /// each document's owner.
    ///
    /// This handle is not scoped: it reads every owner's documents. Give request handlers a
    /// [`scoped`](EncryptedCollection::scoped) one.
    pub fn new<U: Send + Sync>(
        collection: Collection<U>,
        keys: impl KeySource + 'static,
        schema: impl Into<Arc<Schema>>,
    ) -> Self {
        let keys: Arc<dyn KeySource> = Arc::new(keys);
        let coll = collection.clone_with_type::<RawDocumentBuf>();
        let ns = coll.namespace();
        let schema = schema.into();
        let mut ctx = Context::namespace(format!("{}.{}", ns.db, ns.coll));
        if let Some(owner) = schema.owner_field() {
            ctx = ctx.with_owner_field(owner);
        }
        let keyring: Arc<dyn crate::keyring::Keyring> = keys.clone();
        EncryptedCollection {
            coll,
            cryptor: Cryptor::with_shared(keyring, schema.clone()),
            aliases: aliases_of(&schema),
            keys,
            schema,
            ctx,
            owner: None,
            tenant_keys: false,
            _type: PhantomData,
        }
    }

    /// Wraps `collection` with the schema of `T`'s own marks (`#[derive(Encrypted)]`), so the
    /// fields are described once, on the type: [`EncryptedCollection::new`] with
    /// [`Encrypted::try_schema`].
    ///
    /// # Errors
    /// As [`Encrypted::try_schema`].
    pub fn typed<U: Send + Sync>(
        collection: Collection<U>,
        keys: impl KeySource + 'static,
    ) -> Result<Self>
    where
        T: Encrypted,
    {
        Ok(Self::new(collection, keys, T::try_schema()?))
    }

    /// A handle scoped to one owner (the schema's owner field): every filter, update, delete,
    /// count and pipeline gets `{<owner field>: owner}` added, inserted documents get the owner
    /// (a document naming another owner is refused), and the owner is bound into ciphertexts,
    /// so another owner's documents are never returned and their values, copied over, do not
    /// decrypt.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the schema has no owner field; with per-tenant keys, an owner
    /// value that cannot name a tenant (see [`tenant_schema`]).
    pub fn scoped(&self, owner: impl Into<Bson>) -> Result<Self> {
        if self.schema.owner_field().is_none() {
            return Err(Error::from(ArgumentError::NoOwnerField));
        }
        let mut scoped = self.clone();
        scoped.owner = Some(owner.into());
        scoped.rederive()?;
        Ok(scoped)
    }

    /// Uses per-owner (tenant) data keys: a handle scoped to owner `X` encrypts every field
    /// under the alias `<alias>/<label of X>` instead of `<alias>` ([`tenant_schema`]), so
    /// destroying a tenant's keys makes exactly that tenant's data unreadable
    /// (crypto-shredding). Decryption needs no change: envelopes name their key.
    ///
    /// The label carries the owner's type where it could be mistaken for another owner's: a
    /// string without `:` is itself (`"acme"` → `pii/acme`), a string with `:` is `s:<string>`,
    /// an integer (Int32 or Int64, one owner to MongoDB's filters) `int:<n>`, an ObjectId
    /// `oid:<hex>`. So the string `"123"`, the integer `123` and an ObjectId and its hex string
    /// never share keys. [`key_aliases`](EncryptedCollection::key_aliases) lists a scoped
    /// handle's aliases (to create or destroy its keys).
    ///
    /// An unscoped handle with per-tenant keys refuses every operation, since it would not know
    /// which tenant's keys to use.
    ///
    /// # Errors
    /// As [`EncryptedCollection::scoped`], when the handle is already scoped.
    pub fn per_tenant_keys(mut self) -> Result<Self> {
        self.tenant_keys = true;
        self.rederive()?;
        Ok(self)
    }

    fn rederive(&mut self) -> Result<()> {
        let schema = match (&self.owner, self.tenant_keys) {
            (Some(owner), true) => Arc::new(tenant_schema(&self.schema, &tenant::label(owner)?)?),
            _ => self.schema.clone(),
        };
        self.aliases = aliases_of(&schema);
        let keyring: Arc<dyn crate::keyring::Keyring> = self.keys.clone();
        self.cryptor = Cryptor::with_shared(keyring, schema);
        Ok(())
    }

    /// The same collection, scope and keys, with documents of type `U`.
    #[must_use]
    pub fn clone_with_type<U>(&self) -> EncryptedCollection<U> {
        EncryptedCollection {
            coll: self.coll.clone(),
            keys: self.keys.clone(),
            schema: self.schema.clone(),
            cryptor: self.cryptor.clone(),
            ctx: self.ctx.clone(),
            owner: self.owner.clone(),
            tenant_keys: self.tenant_keys,
            aliases: self.aliases.clone(),
            _type: PhantomData,
        }
    }

    /// The same collection over raw documents: no serde step on either side.
    #[must_use]
    pub fn raw(&self) -> EncryptedCollection<RawDocumentBuf> {
        self.clone_with_type()
    }

    /// `db.collection`, which ciphertexts are bound to.
    #[must_use]
    pub fn namespace(&self) -> &str {
        self.ctx.namespace.as_deref().unwrap_or_default()
    }

    /// The owner this handle is scoped to.
    #[must_use]
    pub fn owner(&self) -> Option<&Bson> {
        self.owner.as_ref()
    }

    /// The key aliases this handle encrypts with: the schema's, or with
    /// [per-tenant keys](EncryptedCollection::per_tenant_keys) the scoped tenant's
    /// (`<alias>/<tenant label>`), e.g. to create a tenant's keys or to destroy them. (An
    /// unscoped handle with per-tenant keys lists the schema's, and uses none.)
    #[must_use]
    pub fn key_aliases(&self) -> &[String] {
        &self.aliases
    }

    /// The schema as given to [`EncryptedCollection::new`].
    #[must_use]
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The cryptor this handle encrypts with (its schema is the tenant's with per-tenant keys).
    #[must_use]
    pub fn cryptor(&self) -> &Cryptor {
        &self.cryptor
    }

    /// The context ciphertexts are bound to.
    #[must_use]
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The query rewriter this handle applies (scoped like the handle), for inspecting what
    /// would be sent.
    #[must_use]
    pub fn rewriter(&self) -> QueryRewriter<'_> {
        QueryRewriter::new(&self.cryptor, &self.ctx).scope(self.owner.as_ref())
    }

    /// Installs the schema's `$jsonSchema` validator on this collection (creating it if
    /// needed), so the server rejects a write that puts a non-ciphertext value into an
    /// encrypted field. See [`crate::mongo::apply_validator`].
    ///
    /// # Errors
    /// [`Error::Mongo`].
    pub async fn apply_validator(&self) -> Result<()> {
        let ns = self.coll.namespace();
        let db = self.coll.client().database(&ns.db);
        crate::mongo::validator::apply_validator(&db, &ns.coll, &self.schema).await
    }

    /// Refuses operations on an unscoped handle with per-tenant keys.
    fn check_usable(&self) -> Result<()> {
        if self.tenant_keys && self.owner.is_none() {
            return Err(Error::MissingContext(
                "this handle uses per-tenant keys: scope it to a tenant with scoped(owner) first",
            ));
        }
        Ok(())
    }

    /// Makes the readable keys of the schema's aliases available for synchronous use.
    async fn prefetch_aliases(&self) -> Result<()> {
        if self.aliases.is_empty() {
            return Ok(());
        }
        self.keys.prefetch_aliases(&self.aliases).await
    }

    /// Decrypts one fetched document (its keys prefetched first) into `R`.
    async fn decrypt_one<R: DeserializeOwned + 'static>(&self, raw: RawDocumentBuf) -> Result<R> {
        let ids = Cryptor::referenced_keys(&raw)?;
        if !ids.is_empty() {
            self.keys.prefetch_ids(&ids).await?;
        }
        let plain = self.cryptor.decrypt_raw(&raw, &self.ctx)?;
        from_raw(plain)
    }

    /// Decrypts the distinct ciphertexts of the deterministic field `path` and drops repeats
    /// as the server would have in clear: a value written under several keys of its alias
    /// (before and after a rotation) is one value, numbers equal across types are one value,
    /// and an array encrypted whole counts by its elements. Values that are not ciphertext
    /// (written before the field was encrypted) pass through, as a find would return them.
    async fn decrypt_distinct(
        &self,
        path: &str,
        values: Vec<Bson>,
        owner: Option<&Bson>,
    ) -> Result<Vec<Bson>> {
        let all = RawDocumentBuf::from_document(&bson::doc! { "v": values.clone() })?;
        let ids = Cryptor::referenced_keys(&all)?;
        if !ids.is_empty() {
            self.keys.prefetch_ids(&ids).await?;
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(values.len());
        let mut keep = |v: Bson| -> Result<()> {
            if seen.insert(DistinctKey::of(&v)?) {
                out.push(v);
            }
            Ok(())
        };
        for v in values {
            let plain = match &v {
                Bson::Binary(b) => self
                    .cryptor
                    .decrypt_value(path, b, &self.ctx, None, owner)?,
                _ => v,
            };
            match plain {
                Bson::Array(items) => items.into_iter().try_for_each(&mut keep)?,
                plain => keep(plain)?,
            }
        }
        Ok(out)
    }

    /// Binds documents to the owner and encrypts them; large batches in parallel, off the
    /// async threads.
    async fn encrypt_all(&self, docs: Vec<RawDocumentBuf>) -> Result<Vec<RawDocumentBuf>> {
        if docs.len() < PARALLEL_THRESHOLD {
            let q = self.rewriter();
            return docs.iter().map(|d| q.insert_document(d)).collect();
        }
        let (cryptor, ctx, owner) = (self.cryptor.clone(), self.ctx.clone(), self.owner.clone());
        tokio::task::spawn_blocking(move || {
            let q = QueryRewriter::new(&cryptor, &ctx).scope(owner.as_ref());
            docs.par_iter().map(|d| q.insert_document(d)).collect()
        })
        .await
        .map_err(|_| Error::TaskFailed("an encryption"))?
    }

    fn decryptor(&self) -> cursor::Decryptor {
        cursor::Decryptor {
            cryptor: self.cryptor.clone(),
            ctx: self.ctx.clone(),
            keys: self.keys.clone(),
        }
    }
}

/// A plaintext value as `distinct` compares it: numbers by value whatever their type, anything
/// else by its BSON bytes (wiped on drop: they are plaintext).
#[derive(PartialEq, Eq)]
struct DistinctKey(u8, zeroize::Zeroizing<Vec<u8>>);

impl std::hash::Hash for DistinctKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.as_slice().hash(h);
    }
}

impl DistinctKey {
    fn of(v: &Bson) -> Result<Self> {
        let int = |i: i64| DistinctKey(0x12, zeroize::Zeroizing::new(i.to_le_bytes().to_vec()));
        Ok(match v {
            Bson::Int32(i) => int(i64::from(*i)),
            Bson::Int64(i) => int(*i),
            // Integral doubles in i64 range compare as those integers; the rest by their bits,
            // with one zero and one NaN.
            #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
            Bson::Double(d)
                if d.fract() == 0.0 && *d >= i64::MIN as f64 && *d < i64::MAX as f64 =>
            {
                int(*d as i64)
            }
            Bson::Double(d) => {
                let bits = if d.is_nan() {
                    f64::NAN.to_bits()
                } else {
                    d.to_bits()
                };
                DistinctKey(0x01, zeroize::Zeroizing::new(bits.to_le_bytes().to_vec()))
            }
            other => {
                let (t, bytes) = crate::rawbson::encode_value(other)?;
                DistinctKey(t, bytes)
            }
        })
    }
}

/// Serializes `T` to raw BSON; raw and owned documents are converted without serde.
fn to_raw<T: Serialize + 'static>(value: &T) -> Result<RawDocumentBuf> {
    let any: &dyn Any = value;
    if let Some(raw) = any.downcast_ref::<RawDocumentBuf>() {
        return Ok(raw.clone());
    }
    if let Some(doc) = any.downcast_ref::<Document>() {
        return RawDocumentBuf::from_document(doc).map_err(Error::from);
    }
    // serde's messages can quote values (e.g. an out-of-range integer): not repeated.
    bson::to_raw_document_buf(value).map_err(|_| {
        Error::MalformedBson(format!(
            "cannot serialize a {} as a BSON document",
            std::any::type_name::<T>()
        ))
    })
}

/// Deserializes a decrypted raw document into `R`; raw and owned documents without serde.
fn from_raw<R: DeserializeOwned + 'static>(raw: RawDocumentBuf) -> Result<R> {
    let mut slot = Some(raw);
    let any: &mut dyn Any = &mut slot;
    if let Some(same) = any.downcast_mut::<Option<R>>() {
        if let Some(r) = same.take() {
            return Ok(r);
        }
    }
    let Some(raw) = slot else {
        return Err(Error::MalformedBson("document vanished".into()));
    };
    let mut doc_slot: Option<Document> = None;
    let any: &mut dyn Any = &mut doc_slot;
    if any.is::<Option<R>>() {
        doc_slot = Some(raw.to_document()?);
        let any: &mut dyn Any = &mut doc_slot;
        if let Some(Some(r)) = any.downcast_mut::<Option<R>>().map(Option::take) {
            return Ok(r);
        }
        return Err(Error::MalformedBson("document vanished".into()));
    }
    // serde's messages quote the unexpected value, which is decrypted plaintext here: the
    // message names the target type only.
    bson::from_slice(raw.as_bytes()).map_err(|_| {
        Error::MalformedBson(format!(
            "cannot deserialize the decrypted document into {}",
            std::any::type_name::<R>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct User {
        name: String,
        age: i32,
    }

    #[test]
    fn raw_and_owned_documents_skip_serde_and_typed_values_use_it() {
        let d = doc! { "name": "n", "age": 3 };
        let raw = to_raw(&d).unwrap();
        assert_eq!(from_raw::<Document>(raw.clone()).unwrap(), d);
        assert_eq!(from_raw::<RawDocumentBuf>(raw.clone()).unwrap(), raw);
        let u: User = from_raw(raw).unwrap();
        assert_eq!(to_raw(&u).unwrap().to_document().unwrap(), d);
    }

    #[test]
    fn fail_deserialization_errors_do_not_quote_values() {
        let raw = to_raw(&doc! { "name": "SECRET-PLAINTEXT", "age": "SECRET-AGE" }).unwrap();
        let e = from_raw::<User>(raw).unwrap_err().to_string();
        assert!(!e.contains("SECRET"), "{e}");
    }
}
