//! `distinct`: a plain field's values as the server returns them, a deterministic field's
//! decrypted and counted once per plaintext; other encrypted fields refused.

use bson::{Bson, Document};
use mongodb::options::DistinctOptions;

use crate::error::Result;
use crate::mongo::collection::EncryptedCollection;

impl<T> EncryptedCollection<T> {
    /// The distinct values of `field` among the documents matching `filter`: a plain field's
    /// as the server returns them; a deterministic field's decrypted, each value once even if
    /// it was written under several keys of its alias. Randomized, `_id`-bound and blind-index
    /// fields are refused (they have no one ciphertext per value).
    ///
    /// `await` returns `Result<Vec<Bson>>`.
    pub fn distinct(&self, field: impl Into<String>, filter: Document) -> Distinct<'_, T> {
        Distinct::new(self, field.into(), filter)
    }
}

action! {
    /// Lists distinct values. Construct with [`EncryptedCollection::distinct`].
    Distinct {
        field: String,
        filter: Document,
    }
    options DistinctOptions => Vec<Bson>
}

impl<'a, T: 'a> Distinct<'a, T> {
    async fn run(self) -> Result<Vec<Bson>> {
        let coll = self.coll;
        let collation = self.options.as_ref().and_then(|o| o.collation.as_ref());
        let (filter, target) = coll
            .prepare_distinct(&self.field, &self.filter, collation)
            .await?;
        let action = coll
            .coll
            .distinct(&self.field, filter)
            .with_options(self.options);
        let values = run!(action, self.session)?;
        match target {
            None => Ok(values),
            Some((rule, owner)) => {
                coll.decrypt_distinct(&rule.normalized, values, owner.as_ref())
                    .await
            }
        }
    }
}
