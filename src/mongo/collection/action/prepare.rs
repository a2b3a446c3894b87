//! What every action does before the driver is called: check the handle, trace the operation
//! (never its values), prefetch the keys, and rewrite or refuse what it sends — the filter and
//! the options that name fields (sort, projection, index bounds, collation, array filters).

use bson::{Bson, Document, RawDocumentBuf};
use mongodb::options::{AggregateOptions, Collation, Hint, ReplaceOptions, UpdateModifications};
use serde::de::DeserializeOwned;

use crate::error::{CommandError, Error, Result};
use crate::mongo::collection::EncryptedCollection;
use crate::mongo::rewrite::QueryRewriter;
use crate::schema::FieldRule;

/// The parts of find-like options (`FindOptions`, `FindOneOptions`: same field names) that
/// [`EncryptedCollection::prepare_find`] checks or rewrites.
pub(super) struct FindChecks<'o> {
    pub(super) sort: Option<&'o Document>,
    pub(super) projection: &'o mut Option<Document>,
    pub(super) min: Option<&'o Document>,
    pub(super) max: Option<&'o Document>,
    pub(super) collation: Option<&'o Collation>,
    pub(super) hint: &'o mut Option<Hint>,
}

/// The parts of update-like options (`UpdateOptions`, `FindOneAndUpdateOptions`: same field
/// names) that [`EncryptedCollection::prepare_update`] checks or rewrites.
pub(super) struct UpdateChecks<'o> {
    pub(super) array_filters: &'o mut Option<Vec<Document>>,
    pub(super) sort: Option<&'o Document>,
    pub(super) collation: Option<&'o Collation>,
    /// `None` where the options have no hint (a bulk write's models).
    pub(super) hint: Option<&'o mut Option<Hint>>,
}

/// The parts of a filter-only operation's options (`CountOptions`, `DeleteOptions`) that
/// [`EncryptedCollection::prepare_filter`] checks or rewrites.
pub(super) struct FilterChecks<'o> {
    pub(super) collation: Option<&'o Collation>,
    pub(super) hint: &'o mut Option<Hint>,
}

/// Rewrites a hint given by index keys as [`QueryRewriter::index_keys`] rewrites an index's
/// keys (a blind-indexed field's key becomes its index's; randomized fields are refused), so
/// that it names an index `create_index` can have made. A hint by name is sent as it is.
fn rewrite_hint(q: &QueryRewriter<'_>, hint: &mut Option<Hint>) -> Result<()> {
    if let Some(Hint::Keys(keys)) = hint.as_mut() {
        *keys = q.index_keys(keys)?;
    }
    Ok(())
}

/// Refuses a collation where a condition compares ciphertext: ciphertext equality is binary,
/// while a collation (case- or accent-insensitive) would compare plaintexts differently.
pub(super) fn check_collation(
    collation: Option<&Collation>,
    touched: Option<&String>,
) -> Result<()> {
    match (collation, touched) {
        (Some(c), Some(field)) if c.locale != "simple" => Err(Error::UnsupportedQuery {
            operator: "collation".into(),
            field: field.clone(),
            reason:
                "ciphertext equality is binary; a collation would compare plaintexts differently",
        }),
        _ => Ok(()),
    }
}

/// Decrypts the document a `find_one`-like operation returned, if any.
pub(super) async fn decrypt_found<T, R>(
    coll: &EncryptedCollection<T>,
    raw: Option<RawDocumentBuf>,
) -> Result<Option<R>>
where
    R: DeserializeOwned + 'static,
{
    match raw {
        Some(raw) => Ok(Some(coll.decrypt_one(raw).await?)),
        None => Ok(None),
    }
}

impl<T> EncryptedCollection<T> {
    pub(super) fn trace(&self, operation: &'static str) {
        // Operation, namespace and scope only: never a filter, a document or an owner value.
        tracing::debug!(
            target: "fieldcrypt::collection",
            operation,
            namespace = self.namespace(),
            scoped = self.owner.is_some(),
        );
    }

    /// Checks the handle, traces the operation and prefetches the schema's keys.
    pub(super) async fn begin(&self, operation: &'static str) -> Result<()> {
        self.check_usable()?;
        self.trace(operation);
        self.prefetch_aliases().await
    }

    /// Begins `operation` and rewrites its filter and hint, refusing a collation that would
    /// compare an encrypted field the filter touches.
    pub(super) async fn prepare_filter(
        &self,
        operation: &'static str,
        filter: &Document,
        options: Option<FilterChecks<'_>>,
    ) -> Result<Document> {
        self.begin(operation).await?;
        let q = self.rewriter();
        let (filter, touched) = q.filter_touching(filter)?;
        if let Some(o) = options {
            rewrite_hint(&q, o.hint)?;
            check_collation(o.collation, touched.as_ref())?;
        }
        Ok(filter)
    }

    /// Begins `operation` and rewrites a find's filter, checking its options (sort, index
    /// bounds, collation) and rewriting its projection in place.
    pub(super) async fn prepare_find(
        &self,
        operation: &'static str,
        filter: &Document,
        options: Option<FindChecks<'_>>,
    ) -> Result<Document> {
        self.begin(operation).await?;
        let q = self.rewriter();
        let (filter, touched) = q.filter_touching(filter)?;
        if let Some(o) = options {
            if let Some(s) = o.sort {
                q.sort(s)?;
            }
            if let Some(p) = o.projection {
                *p = q.projection(p)?;
            }
            for (bounds, name) in [(o.min, "min"), (o.max, "max")] {
                if let Some(b) = bounds {
                    q.bounds(b, name)?;
                }
            }
            rewrite_hint(&q, o.hint)?;
            check_collation(o.collation, touched.as_ref())?;
        }
        Ok(filter)
    }

    /// Begins `operation` and rewrites an update's filter and modifications, rewriting its
    /// array filters in place and checking its sort and collation.
    pub(super) async fn prepare_update(
        &self,
        operation: &'static str,
        filter: &Document,
        update: UpdateModifications,
        options: Option<UpdateChecks<'_>>,
    ) -> Result<(Document, UpdateModifications)> {
        self.begin(operation).await?;
        rewrite_update(&self.rewriter(), filter, update, options)
    }

    /// Begins a `replace_one`: binds and encrypts the replacement (taking `_id` from the
    /// filter where `_id`-bound fields need it), rewrites the filter and checks the sort and
    /// collation.
    pub(super) async fn prepare_replace(
        &self,
        filter: &Document,
        replacement: Result<RawDocumentBuf>,
        options: Option<&mut ReplaceOptions>,
    ) -> Result<(Document, RawDocumentBuf)> {
        self.begin("replace_one").await?;
        let q = self.rewriter();
        let replacement = q.replacement(&replacement?, filter)?;
        let (filter, touched) = q.filter_touching(filter)?;
        if let Some(o) = options {
            if let Some(s) = &o.sort {
                q.sort(s)?;
            }
            rewrite_hint(&q, &mut o.hint)?;
            check_collation(o.collation.as_ref(), touched.as_ref())?;
        }
        Ok((filter, replacement))
    }

    /// Begins a `distinct` on `field`: rewrites the filter and tells how the values are to be
    /// decrypted ([`QueryRewriter::distinct_field`]), refusing a collation where the server
    /// would compare ciphertext.
    ///
    /// [`QueryRewriter::distinct_field`]: crate::mongo::QueryRewriter::distinct_field
    pub(super) async fn prepare_distinct(
        &self,
        field: &str,
        filter: &Document,
        collation: Option<&Collation>,
    ) -> Result<(Document, Option<(&FieldRule, Option<Bson>)>)> {
        self.begin("distinct").await?;
        let q = self.rewriter();
        let target = q.distinct_field(field, filter)?;
        let (filter, touched) = q.filter_touching(filter)?;
        // Distinct compares the field's values: ciphertext, for an encrypted field.
        let compared = target
            .as_ref()
            .map(|(r, _)| r.normalized.clone())
            .or(touched);
        check_collation(collation, compared.as_ref())?;
        Ok((filter, target))
    }

    /// Begins an aggregation and rewrites its pipeline, refusing a collation that would
    /// compare an encrypted field a `$match` touches.
    pub(super) async fn prepare_aggregate(
        &self,
        pipeline: &[Document],
        options: Option<&mut AggregateOptions>,
    ) -> Result<Vec<Document>> {
        self.begin("aggregate").await?;
        let q = self.rewriter();
        let (pipeline, touched) = q.pipeline(pipeline)?;
        if let Some(o) = options {
            rewrite_hint(&q, &mut o.hint)?;
            check_collation(o.collation.as_ref(), touched.as_ref())?;
        }
        Ok(pipeline)
    }
}

/// Rewrites an update's filter and modifications, rewriting its array filters in place and
/// checking its sort and collation (the keys must be prefetched).
pub(super) fn rewrite_update(
    q: &QueryRewriter<'_>,
    filter: &Document,
    update: UpdateModifications,
    options: Option<UpdateChecks<'_>>,
) -> Result<(Document, UpdateModifications)> {
    let (array_filters, sort, collation, hint) = match options {
        Some(o) => (Some(o.array_filters), o.sort, o.collation, o.hint),
        None => (None, None, None, None),
    };
    if let Some(h) = hint {
        rewrite_hint(q, h)?;
    }
    let (new_filter, touched) = q.filter_touching(filter)?;
    let update = match update {
        UpdateModifications::Document(d) => {
            if let Some(af) = array_filters {
                *af = af
                    .take()
                    .map(|af| q.array_filters(&af, &d, filter))
                    .transpose()?;
            }
            UpdateModifications::Document(q.update(&d, filter)?)
        }
        UpdateModifications::Pipeline(p) => {
            q.update_pipeline(&p)?;
            UpdateModifications::Pipeline(p)
        }
        _ => return Err(Error::from(CommandError::UpdateKind)),
    };
    if let Some(s) = sort {
        q.sort(s)?;
    }
    check_collation(collation, touched.as_ref())?;
    Ok((new_filter, update))
}
