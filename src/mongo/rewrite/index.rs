//! Index keys (for `create_index`, and the key form of a `hint`): allowed on values the server
//! can compare for equality — deterministic ciphertexts and blind indexes — and refused on
//! randomized ciphertexts, which never compare equal, so that an index on them serves no query.

use bson::{Bson, Document};

use super::{is_inside, refuse, Kind, QueryRewriter};
use crate::error::Result;

impl QueryRewriter<'_> {
    /// The keys of an index (or of a hint) rewritten: a field with a blind index is indexed by
    /// its index (where equality queries on it are sent), a deterministic field by its
    /// ciphertext, any other field as it is.
    ///
    /// # Errors
    /// [`Error::UnsupportedQuery`](crate::Error::UnsupportedQuery) for a key on a randomized
    /// field without a blind index, inside an encrypted value, on a document holding one, a
    /// text or geospatial key on an encrypted field, or a wildcard key that covers one.
    pub fn index_keys(&self, keys: &Document) -> Result<Document> {
        let mut out = Document::new();
        for (path, kind) in keys {
            if path == "$**" || path.ends_with(".$**") {
                let prefix = path.trim_end_matches("$**").trim_end_matches('.');
                let covered = self.schema().rules().iter().find(|r| {
                    prefix.is_empty()
                        || r.normalized == prefix
                        || is_inside(&r.normalized, prefix)
                        || is_inside(prefix, &r.normalized)
                });
                if let Some(r) = covered {
                    return Err(refuse(
                        "wildcard index",
                        r.normalized.clone(),
                        "a wildcard index would cover encrypted fields: index deterministic and blind-indexed fields by name",
                    ));
                }
                out.insert(path.clone(), kind.clone());
                continue;
            }
            let special = matches!(kind, Bson::String(s) if s != "hashed");
            let resolved = self.classify(path);
            match resolved.kind {
                Kind::Plain => {
                    out.insert(path.clone(), kind.clone());
                }
                Kind::Field(r) | Kind::Index(r) if special => {
                    return Err(refuse(
                        format!("{kind} index"),
                        r.normalized.clone(),
                        "text and geospatial indexes read the plaintext, which the server never sees",
                    ))
                }
                Kind::Field(r) => match Self::index_target(path, r) {
                    Some(target) => {
                        out.insert(target, kind.clone());
                    }
                    None if r.field.is_deterministic() => {
                        out.insert(path.clone(), kind.clone());
                    }
                    None => {
                        return Err(refuse(
                            "index",
                            r.normalized.clone(),
                            "randomized ciphertexts differ for equal values, so an index on them serves no query: use deterministic encryption or a blind index",
                        ))
                    }
                },
                Kind::Index(_) => {
                    out.insert(path.clone(), kind.clone());
                }
                Kind::Parent(r) => {
                    return Err(refuse(
                        "index",
                        r.normalized.clone(),
                        "the indexed value holds an encrypted field: index the encrypted field itself",
                    ))
                }
                Kind::Inside(r) => {
                    return Err(refuse(
                        "index",
                        r.normalized.clone(),
                        "the path lies inside an encrypted value, which the server cannot see into",
                    ))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use bson::doc;

    use super::super::fixture::{fixture, refused};
    use super::super::QueryRewriter;

    #[test]
    fn index_keys_follow_equality_queries_and_refuse_randomized_fields() {
        let f = fixture(false);
        let q = QueryRewriter::new(&f.cryptor, &f.ctx);
        // A field with a blind index is indexed by its index; a deterministic one as it is.
        let keys = q
            .index_keys(&doc! { "plain": 1, "email": -1, "name": 1, "token": "hashed", "tags": 1 })
            .unwrap();
        assert_eq!(
            keys,
            doc! { "plain": 1, "email": -1, "name_bidx": 1, "token_bidx": "hashed", "tags": 1 }
        );
        for (bad, field) in [
            (doc! { "ssn": 1 }, "ssn"),
            (doc! { "notes": 1 }, "notes"),
            (doc! { "email": "text" }, "email"),
            (doc! { "$**": 1 }, "ssn"),
            (doc! { "profile.$**": 1 }, "profile.phone"),
            (doc! { "profile": 1 }, "profile.phone"),
            (doc! { "email.x": 1 }, "email"),
        ] {
            assert_eq!(refused(q.index_keys(&bad)).1, field, "{bad}");
        }
        assert!(q.index_keys(&doc! { "other.$**": 1 }).is_ok());
    }
}
