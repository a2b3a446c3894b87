//! `watch`: a change stream whose events come back decrypted — `fullDocument`,
//! `fullDocumentBeforeChange` and the values of `updateDescription.updatedFields` — and whose
//! pipeline is refused where it would read encrypted values.
//!
//! ```text
//!  .await ──check the pipeline (only $match, on plain paths)──▶ driver: raw events
//!  each event ──prefetch its keys──▶ decrypt the documents, then each updated field
//!             (bound to documentKey._id and the owner)──▶ ChangeStreamEvent<T>
//! ```

use std::future::IntoFuture;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bson::{Bson, Document, RawDocumentBuf};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, Stream, StreamExt};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::options::{ChangeStreamOptions, FullDocumentType};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::mongo::collection::cursor::Decryptor;
use crate::mongo::collection::EncryptedCollection;
use crate::schema::Schema;
use crate::transform::Cryptor;

impl<T> EncryptedCollection<T> {
    /// Watches the collection's changes: a stream of [`ChangeStreamEvent<T>`] with
    /// `fullDocument`, `fullDocumentBeforeChange` and the values of
    /// `updateDescription.updatedFields` decrypted.
    ///
    /// A pipeline may hold `$match` stages on plain paths only (the operation type, `_id`s,
    /// plain fields of the documents): conditions on encrypted fields, and stages that reshape
    /// events, are refused before anything is sent. With an owner-scoped schema, decrypting an
    /// update's fields needs the owner: watch with
    /// [`full_document(UpdateLookup)`](Watch::full_document). Refused on a scoped handle
    /// (delete events carry only the `_id`, so another owner's changes could not be told
    /// apart).
    ///
    /// `await` returns `Result<EncryptedChangeStream<T>>`.
    pub fn watch(&self) -> Watch<'_, T> {
        Watch {
            coll: self,
            pipeline: Vec::new(),
            options: None,
        }
    }
}

/// Opens a change stream. Construct with [`EncryptedCollection::watch`].
#[must_use = "actions do nothing unless awaited"]
pub struct Watch<'a, T> {
    coll: &'a EncryptedCollection<T>,
    pipeline: Vec<Document>,
    options: Option<ChangeStreamOptions>,
}

impl<T> Watch<'_, T> {
    /// Filters the events (`$match` stages on plain paths).
    pub fn pipeline(mut self, pipeline: impl IntoIterator<Item = Document>) -> Self {
        self.pipeline = pipeline.into_iter().collect();
        self
    }

    /// Sets the driver's change stream options.
    pub fn with_options(mut self, options: impl Into<Option<ChangeStreamOptions>>) -> Self {
        self.options = options.into();
        self
    }

    /// Whether update events carry the whole document (`UpdateLookup`), decrypted.
    pub fn full_document(mut self, kind: FullDocumentType) -> Self {
        self.options
            .get_or_insert_with(ChangeStreamOptions::default)
            .full_document = Some(kind);
        self
    }

    /// Resumes after this event (see [`EncryptedChangeStream::resume_token`]).
    pub fn resume_after(mut self, token: impl Into<Option<ResumeToken>>) -> Self {
        self.options
            .get_or_insert_with(ChangeStreamOptions::default)
            .resume_after = token.into();
        self
    }
}

impl<'a, T> IntoFuture for Watch<'a, T>
where
    T: DeserializeOwned + Send + Sync + Unpin + 'static,
{
    type Output = Result<EncryptedChangeStream<T>>;
    type IntoFuture = mongodb::BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let coll = self.coll;
            if let (Some(_), Some(field)) = (&coll.owner, coll.schema.owner_field()) {
                return Err(Error::UnsupportedQuery {
                    operator: "watch".into(),
                    field: field.to_owned(),
                    reason: "delete events carry only the _id, so a scoped change stream could not leave out other owners' changes: watch an unscoped handle",
                });
            }
            coll.begin("watch").await?;
            check_pipeline(coll.cryptor.schema(), &self.pipeline)?;
            let stream = coll
                .coll
                .watch()
                .pipeline(self.pipeline)
                .with_options(self.options)
                .await?
                .with_type::<RawDocumentBuf>();
            Ok(EncryptedChangeStream {
                inner: stream,
                dec: coll.decryptor(),
                pending: None,
                last: None,
            })
        })
    }
}

/// The roots of a change event under which the documents' own paths lie.
const DOCUMENT_ROOTS: [&str; 2] = ["fullDocument", "fullDocumentBeforeChange"];

fn refuse(operator: &str, field: impl Into<String>, reason: &'static str) -> Error {
    Error::UnsupportedQuery {
        operator: operator.into(),
        field: field.into(),
        reason,
    }
}

/// Refuses a change-stream pipeline that reads or reshapes encrypted values.
fn check_pipeline(schema: &Schema, pipeline: &[Document]) -> Result<()> {
    if schema.rules().is_empty() {
        return Ok(());
    }
    for stage in pipeline {
        for (op, arg) in stage {
            match (op.as_str(), arg) {
                ("$match", Bson::Document(filter)) => check_match(schema, filter)?,
                _ => {
                    return Err(refuse(
                        op,
                        all_paths(schema),
                        "a change stream of a collection with encrypted fields takes $match stages only: other stages would reshape events before they are decrypted",
                    ))
                }
            }
        }
    }
    Ok(())
}

fn all_paths(schema: &Schema) -> String {
    schema
        .rules()
        .iter()
        .map(|r| r.normalized.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A path with array indexes and positional segments left out.
fn normalize(path: &str) -> String {
    path.split('.')
        .filter(|s| !(s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('$')))
        .collect::<Vec<_>>()
        .join(".")
}

fn check_match(schema: &Schema, filter: &Document) -> Result<()> {
    for (key, v) in filter {
        match key.as_str() {
            "$and" | "$or" | "$nor" => {
                if let Bson::Array(clauses) = v {
                    for c in clauses {
                        if let Bson::Document(d) = c {
                            check_match(schema, d)?;
                        }
                    }
                }
                continue;
            }
            k if k.starts_with('$') => {
                return Err(refuse(
                    k,
                    all_paths(schema),
                    "the server would evaluate it against stored ciphertext",
                ))
            }
            _ => {}
        }
        let (root, rest) = key.split_once('.').unwrap_or((key.as_str(), ""));
        // `documentKey` holds `_id` and a sharded collection's shard key fields, as stored.
        let inner = if DOCUMENT_ROOTS.contains(&root) || root == "documentKey" {
            Some(rest.to_owned())
        } else if root == "updateDescription" {
            match rest.split_once('.') {
                Some(("updatedFields", field)) => Some(field.to_owned()),
                None if rest == "updatedFields" || rest.is_empty() => Some(String::new()),
                _ => None,
            }
        } else {
            None
        };
        if let Some(inner) = inner {
            let inner = normalize(&inner);
            let hit = if inner.is_empty() {
                schema.rules().first()
            } else {
                schema.overlapping(&inner).or_else(|| {
                    schema.rules().iter().find(|r| {
                        r.blind_index_path()
                            .is_some_and(|b| crate::schema::overlaps(&b, &inner))
                    })
                })
            };
            if let Some(r) = hit {
                return Err(refuse(
                    "$match",
                    r.normalized.clone(),
                    "change events hold the stored ciphertext: conditions on encrypted fields cannot be evaluated by the server",
                ));
            }
        }
    }
    Ok(())
}

/// A stream of change events with their documents and updated fields decrypted.
///
/// Each item is one event or its error (a value that does not authenticate, an event that
/// does not deserialize): one bad event does not end the stream. A driver error is yielded.
#[must_use = "a change stream does nothing unless polled"]
pub struct EncryptedChangeStream<T>
where
    T: DeserializeOwned,
{
    inner: ChangeStream<RawDocumentBuf>,
    dec: Decryptor,
    pending: Option<BoxFuture<'static, Result<ChangeStreamEvent<T>>>>,
    last: Option<ResumeToken>,
}

impl<T: DeserializeOwned> core::fmt::Debug for EncryptedChangeStream<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EncryptedChangeStream")
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> EncryptedChangeStream<T> {
    /// The token to resume after the last event this stream yielded (or the server's latest
    /// one, before the first).
    #[must_use]
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.last.clone().or_else(|| self.inner.resume_token())
    }
}

impl<T> Stream for EncryptedChangeStream<T>
where
    T: DeserializeOwned + Send + Unpin + 'static,
{
    type Item = Result<ChangeStreamEvent<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(fut) = this.pending.as_mut() {
                let out = futures_util::ready!(fut.as_mut().poll(cx));
                this.pending = None;
                if let Ok(ev) = &out {
                    this.last = Some(ev.id.clone());
                }
                return Poll::Ready(Some(out));
            }
            match futures_util::ready!(this.inner.poll_next_unpin(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(Error::from(e)))),
                Some(Ok(raw)) => {
                    let dec = this.dec.clone();
                    this.pending = Some(async move { dec.event::<T>(raw).await }.boxed());
                }
            }
        }
    }
}

impl Decryptor {
    /// Decrypts one change event.
    async fn event<R: DeserializeOwned>(
        &self,
        raw: RawDocumentBuf,
    ) -> Result<ChangeStreamEvent<R>> {
        let ids = Cryptor::referenced_keys(&raw)?;
        if !ids.is_empty() {
            self.keys.prefetch_ids(&ids).await?;
        }
        let mut event = raw.to_document()?;
        for root in DOCUMENT_ROOTS {
            // Decrypted from the event's own bytes, not re-encoded from the parsed copy.
            if let Ok(d) = raw.get_document(root) {
                let plain = self.cryptor.decrypt_raw(d, &self.ctx)?;
                event.insert(root, plain.to_document()?);
            }
        }
        let id = event
            .get_document("documentKey")
            .ok()
            .and_then(|k| k.get("_id"))
            .cloned();
        let owner = self.cryptor.schema().owner_field().and_then(|o| {
            DOCUMENT_ROOTS
                .iter()
                .chain(&["documentKey"])
                .find_map(|root| event.get_document(root).ok()?.get(o).cloned())
        });
        if let Ok(desc) = event.get_document_mut("updateDescription") {
            if let Ok(fields) = desc.get_document_mut("updatedFields") {
                self.updated_fields(fields, id.as_ref(), owner.as_ref())?;
            }
        }
        // serde's messages can quote values, which are plaintext here: not repeated.
        bson::from_document(event).map_err(|_| {
            Error::MalformedBson(format!(
                "cannot deserialize the decrypted change event into ChangeStreamEvent<{}>",
                std::any::type_name::<R>()
            ))
        })
    }

    /// Decrypts the values of `updatedFields` in place: each key is a dotted path (with array
    /// indexes) whose value is an encrypted field's ciphertext, one element's, or a document
    /// or array holding encrypted fields.
    fn updated_fields(
        &self,
        fields: &mut Document,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<()> {
        let schema = self.cryptor.schema();
        let keys: Vec<String> = fields.keys().cloned().collect();
        for key in keys {
            let path = normalize(&key);
            let Some(value) = fields.get(&key) else {
                continue;
            };
            let plain = if let Some(rule) = schema.rule(&path) {
                let needs = |v: &Bson| matches!(v, Bson::Binary(_));
                let any = match value {
                    Bson::Array(items) => items.iter().any(needs),
                    v => needs(v),
                };
                if !any {
                    continue;
                }
                self.require_owner(owner)?;
                let one = |v: &Bson| -> Result<Bson> {
                    match v {
                        Bson::Binary(b) => {
                            self.cryptor
                                .decrypt_value(&rule.normalized, b, &self.ctx, id, owner)
                        }
                        other => Ok(other.clone()),
                    }
                };
                match value {
                    Bson::Array(items) if rule.each_element => {
                        Bson::Array(items.iter().map(one).collect::<Result<_>>()?)
                    }
                    v => one(v)?,
                }
            } else if schema
                .rules()
                .iter()
                .any(|r| r.normalized.starts_with(&format!("{path}.")))
                && matches!(value, Bson::Document(_) | Bson::Array(_))
            {
                self.require_owner(owner)?;
                self.decrypt_inside(&path, value, id, owner)?
            } else {
                continue;
            };
            fields.insert(key, plain);
        }
        Ok(())
    }

    fn require_owner(&self, owner: Option<&Bson>) -> Result<()> {
        match (self.cryptor.schema().owner_field(), owner) {
            (Some(_), None) => Err(Error::MissingContext(
                "update events of an owner-scoped schema need the owner to decrypt their fields: watch with full_document(UpdateLookup)",
            )),
            _ => Ok(()),
        }
    }

    /// Decrypts a document or array written at `path` by placing it there in a document of
    /// its own (with the `_id` and owner it is bound to) and walking the schema over it.
    fn decrypt_inside(
        &self,
        path: &str,
        value: &Bson,
        id: Option<&Bson>,
        owner: Option<&Bson>,
    ) -> Result<Bson> {
        let segs: Vec<&str> = path.split('.').collect();
        let mut nested = value.clone();
        for seg in segs.iter().rev() {
            let mut d = Document::new();
            d.insert(*seg, nested);
            nested = Bson::Document(d);
        }
        let Bson::Document(mut doc) = nested else {
            return Ok(value.clone());
        };
        if let Some(id) = id {
            doc.insert("_id", id.clone());
        }
        if let (Some(field), Some(o)) = (self.cryptor.schema().owner_field(), owner) {
            doc.insert(field, o.clone());
        }
        let plain = self
            .cryptor
            .decrypt_raw(&RawDocumentBuf::from_document(&doc)?, &self.ctx)?
            .to_document()?;
        let mut at = Bson::Document(plain);
        for seg in segs {
            at = match at {
                Bson::Document(mut d) => d.remove(seg).unwrap_or(Bson::Null),
                _ => return Ok(value.clone()),
            };
        }
        Ok(at)
    }
}
