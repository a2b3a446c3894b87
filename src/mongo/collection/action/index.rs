//! `create_index` and `create_indexes`: keys rewritten like equality queries (a blind-indexed
//! field is indexed by its index), and refused on randomized fields, whose ciphertexts never
//! compare equal, before anything is sent.

use mongodb::options::CreateIndexOptions;
use mongodb::results::{CreateIndexResult, CreateIndexesResult};
use mongodb::IndexModel;

use super::prepare::check_collation;
use crate::error::{Error, Result};
use crate::mongo::collection::EncryptedCollection;
use crate::mongo::rewrite::QueryRewriter;

impl<T> EncryptedCollection<T> {
    /// Creates an index. Keys on deterministic fields index their ciphertexts, keys on
    /// blind-indexed fields (index-only or not) index the blind index, which is where
    /// equality queries on them go; keys on randomized fields, inside encrypted values, text
    /// or geospatial keys on encrypted fields, and wildcards covering them are refused. A
    /// partial filter or collation that touches an encrypted field is refused too.
    ///
    /// `await` returns `Result<CreateIndexResult>`.
    pub fn create_index(&self, index: IndexModel) -> CreateIndex<'_, T> {
        CreateIndex::new(self, vec![index], false)
    }

    /// Creates several indexes in one command, each checked as [`create_index`] does.
    ///
    /// `await` returns `Result<CreateIndexesResult>`.
    ///
    /// [`create_index`]: EncryptedCollection::create_index
    pub fn create_indexes(
        &self,
        indexes: impl IntoIterator<Item = IndexModel>,
    ) -> CreateIndexes<'_, T> {
        CreateIndexes {
            inner: CreateIndex::new(self, indexes.into_iter().collect(), true),
        }
    }

    /// Rewrites one index model, or refuses it.
    fn index_model(&self, mut model: IndexModel) -> Result<IndexModel> {
        // Indexes are the collection's, not one owner's: no owner condition is added.
        let q = QueryRewriter::new(&self.cryptor, &self.ctx);
        model.keys = q.index_keys(&model.keys)?;
        if let Some(o) = model.options.as_ref() {
            if let Some(pfe) = &o.partial_filter_expression {
                if let (_, Some(field)) = q.filter_touching(pfe)? {
                    return Err(Error::UnsupportedQuery {
                        operator: "partialFilterExpression".into(),
                        field,
                        reason: "a partial filter compares the stored values once, at write time, where a query compares each readable key's ciphertext: filter on plain fields",
                    });
                }
            }
            let touched = self
                .schema
                .rules()
                .iter()
                .find(|r| {
                    model.keys.keys().any(|k| {
                        k == &r.normalized || r.blind_index_path().as_deref() == Some(k.as_str())
                    })
                })
                .map(|r| r.normalized.clone());
            check_collation(o.collation.as_ref(), touched.as_ref())?;
        }
        Ok(model)
    }
}

action! {
    /// Creates one index. Construct with [`EncryptedCollection::create_index`].
    CreateIndex {
        models: Vec<IndexModel>,
        many: bool,
    }
    options CreateIndexOptions => CreateIndexResult
}

/// Creates several indexes. Construct with [`EncryptedCollection::create_indexes`].
#[must_use = "actions do nothing unless awaited"]
pub struct CreateIndexes<'a, T> {
    inner: CreateIndex<'a, T>,
}

impl<'a, T> CreateIndexes<'a, T> {
    /// Sets the driver options of this operation.
    pub fn with_options(mut self, options: impl Into<Option<CreateIndexOptions>>) -> Self {
        self.inner = self.inner.with_options(options);
        self
    }

    /// Runs the operation in `session`.
    pub fn session(mut self, session: &'a mut mongodb::ClientSession) -> Self {
        self.inner = self.inner.session(session);
        self
    }
}

impl<'a, T: 'a> std::future::IntoFuture for CreateIndexes<'a, T> {
    type Output = Result<CreateIndexesResult>;
    type IntoFuture = mongodb::BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.inner.run_many())
    }
}

impl<'a, T: 'a> CreateIndex<'a, T> {
    async fn prepare(&self) -> Result<Vec<IndexModel>> {
        let operation = if self.many {
            "create_indexes"
        } else {
            "create_index"
        };
        self.coll.begin(operation).await?;
        self.models
            .iter()
            .cloned()
            .map(|m| self.coll.index_model(m))
            .collect()
    }

    async fn run(self) -> Result<CreateIndexResult> {
        let mut models = self.prepare().await?;
        let Some(model) = models.pop() else {
            return Err(Error::MalformedBson("no index to create".into()));
        };
        let action = self
            .coll
            .coll
            .create_index(model)
            .with_options(self.options);
        Ok(run!(action, self.session)?)
    }

    async fn run_many(self) -> Result<CreateIndexesResult> {
        let models = self.prepare().await?;
        let action = self
            .coll
            .coll
            .create_indexes(models)
            .with_options(self.options);
        Ok(run!(action, self.session)?)
    }
}
