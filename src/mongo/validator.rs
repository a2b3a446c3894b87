//! A `$jsonSchema` validator generated from the encryption schema, so that the server itself
//! rejects a write that puts anything but a ciphertext into an encrypted field — e.g. a second
//! service, without fieldcrypt, writing plaintext by mistake.
//!
//! For each encrypted path the validator requires `bsonType: "binData"` (a per-element array
//! field: an array of binData); blind indexes must be binData too; an index-only field must
//! not be stored at all. Paths may run through arrays of documents, nested ones included
//! (`{a: [[{b: …}]]}` for the path `a.b`, which the engine encrypts as MongoDB's path
//! semantics read it), so each intermediate level constrains both an embedded document
//! (`properties`) and the elements of an array (`items`: that same level again, to
//! [`MAX_ARRAY_NESTING`] arrays deep; `$jsonSchema` has no recursive references, so an array
//! nested deeper on such a path is rejected rather than left unchecked). Fields stay optional.
//!
//! The check is on the BSON type: `$jsonSchema` cannot see a Binary's subtype, so a plaintext
//! that is itself binData would pass. It stops the common mistake, not a determined writer.

use bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::{ValidationAction, ValidationLevel};
use mongodb::Database;

use crate::error::Result;
use crate::schema::Schema;

/// How many arrays deep (`a: [[{b: …}]]` is two) the validator follows a path to an encrypted
/// field. A value nested in more arrays than this on such a path is rejected: the validator
/// cannot look further (each level repeats the sub-schema, so it grows with this number).
const MAX_ARRAY_NESTING: usize = 4;

/// MongoDB's error code for a command on a collection that does not exist.
const NAMESPACE_NOT_FOUND: i32 = 26;

#[derive(Default)]
struct Node {
    children: Vec<(String, Node)>,
    leaf: Option<Document>,
}

impl Node {
    fn insert(&mut self, path: &str, leaf: Document) {
        let mut node = self;
        for seg in path.split('.') {
            let pos = match node.children.iter().position(|(k, _)| k == seg) {
                Some(p) => p,
                None => {
                    node.children.push((seg.to_owned(), Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[pos].1;
        }
        node.leaf = Some(leaf);
    }

    fn properties(&self) -> Document {
        let mut props = Document::new();
        for (k, child) in &self.children {
            let spec = match &child.leaf {
                Some(leaf) => leaf.clone(),
                None => through_arrays(&child.properties()),
            };
            props.insert(k.clone(), spec);
        }
        props
    }
}

/// A level on the way to encrypted fields: as an embedded document its `properties` apply; as
/// an array, each element is that level again (`properties` and `items` only constrain values
/// of their own type), down to [`MAX_ARRAY_NESTING`] arrays, below which arrays are refused.
fn through_arrays(props: &Document) -> Document {
    let mut spec = doc! { "properties": props.clone(), "not": { "bsonType": "array" } };
    for _ in 0..MAX_ARRAY_NESTING {
        spec = doc! { "properties": props.clone(), "items": spec };
    }
    spec
}

/// The `$jsonSchema` body for `schema`'s encrypted fields.
///
/// ```
/// use fieldcrypt::{Field, Schema};
/// let schema = Schema::builder().field("profile.ssn", Field::randomized("pii")).build()?;
/// let body = fieldcrypt::mongo::json_schema(&schema);
/// let ssn = body.get_document("properties")?.get_document("profile")?
///     .get_document("properties")?.get_document("ssn")?;
/// assert_eq!(ssn.get_str("bsonType")?, "binData");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub fn json_schema(schema: &Schema) -> Document {
    let mut root = Node::default();
    for rule in schema.rules() {
        let leaf = if rule.field.encrypt.is_none() {
            // Index-only: the value itself must never be stored.
            doc! { "not": {} }
        } else if rule.each_element {
            doc! { "bsonType": ["array", "binData"], "items": { "bsonType": "binData" } }
        } else {
            doc! { "bsonType": "binData" }
        };
        root.insert(&rule.normalized, leaf);
        if let Some(index) = rule.blind_index_path() {
            root.insert(&index, doc! { "bsonType": "binData" });
        }
    }
    doc! { "bsonType": "object", "properties": root.properties() }
}

/// The collection validator for `schema`: `{ $jsonSchema: json_schema(schema) }`.
#[must_use]
pub fn validator(schema: &Schema) -> Document {
    doc! { "$jsonSchema": json_schema(schema) }
}

/// Installs [`validator`] on `database.collection` (`collMod`, or `create` when the collection
/// does not exist yet), with validation level `strict` and action `error`.
///
/// This replaces any validator the collection had: combine them yourself (e.g.
/// `{$and: [yours, validator(schema)]}` via `collMod`) if you need both.
///
/// # Errors
/// [`crate::Error::Mongo`].
pub async fn apply_validator(database: &Database, collection: &str, schema: &Schema) -> Result<()> {
    let v = validator(schema);
    let coll_mod = doc! {
        "collMod": collection,
        "validator": v.clone(),
        "validationLevel": "strict",
        "validationAction": "error",
    };
    match database.run_command(coll_mod).await {
        Ok(_) => Ok(()),
        Err(e) if is_namespace_not_found(&e) => {
            database
                .create_collection(collection)
                .validator(v)
                .validation_level(ValidationLevel::Strict)
                .validation_action(ValidationAction::Error)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn is_namespace_not_found(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == NAMESPACE_NOT_FOUND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{BlindIndex, Field};
    use bson::Bson;

    #[test]
    fn nested_arrays_indexes_and_index_only_fields() {
        let s = Schema::builder()
            .field("ssn", Field::randomized("k"))
            .field("tags.$[]", Field::randomized("k"))
            .field("addresses.street", Field::deterministic("k"))
            .field(
                "name",
                Field::randomized("k").with_blind_index(BlindIndex::new("i")),
            )
            .field(
                "token",
                Field::blind_index_only(BlindIndex::new("i").name("tok")),
            )
            .build()
            .unwrap();
        let v = validator(&s);
        let props = v
            .get_document("$jsonSchema")
            .unwrap()
            .get_document("properties")
            .unwrap();
        assert_eq!(
            props.get_document("ssn").unwrap(),
            &doc! { "bsonType": "binData" }
        );
        assert_eq!(
            props
                .get_document("tags")
                .unwrap()
                .get_document("items")
                .unwrap(),
            &doc! { "bsonType": "binData" }
        );
        let addr = props.get_document("addresses").unwrap();
        for via in ["properties", "items"] {
            let inner = match via {
                "items" => addr
                    .get_document("items")
                    .unwrap()
                    .get_document("properties")
                    .unwrap(),
                _ => addr.get_document("properties").unwrap(),
            };
            assert_eq!(
                inner.get_document("street").unwrap(),
                &doc! { "bsonType": "binData" }
            );
        }
        // Arrays of arrays: each element is the same level again, to MAX_ARRAY_NESTING deep.
        let mut level = addr;
        for _ in 0..MAX_ARRAY_NESTING {
            level = level.get_document("items").unwrap();
            assert_eq!(
                level
                    .get_document("properties")
                    .unwrap()
                    .get_document("street")
                    .unwrap(),
                &doc! { "bsonType": "binData" }
            );
        }
        assert!(!level.contains_key("items"));
        assert_eq!(
            level.get_document("not").unwrap(),
            &doc! { "bsonType": "array" }
        );
        assert!(props.contains_key("name_bidx"));
        assert_eq!(props.get_document("token").unwrap(), &doc! { "not": {} });
        assert_eq!(
            props.get("tok"),
            Some(&Bson::Document(doc! { "bsonType": "binData" }))
        );
    }
}
