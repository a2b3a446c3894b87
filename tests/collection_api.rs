//! The rest of the driver's collection surface, against a real MongoDB wire-protocol server:
//! a collection typed by `#[derive(Encrypted)]`, `bulk_write`, `watch` (change events
//! decrypted), `estimated_document_count`, `create_index` and the find options that pass
//! through (`hint`, `max_time`, `comment`). Each refusal is checked to send nothing.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Bson, Document};
use fieldcrypt::mongo::{EncryptedCollection, WriteModel};
use fieldcrypt::{Encrypted, Error, InMemoryKeyring, ENVELOPE_SUBTYPE};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{keyring_with, recording_client, stored, Sent};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::options::{
    AggregateOptions, CountOptions, DeleteOptions, FullDocumentType, Hint, IndexOptions,
    ReplaceOptions, UpdateOptions,
};
use mongodb::{Client, Database, IndexModel};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encrypted)]
struct Address {
    #[fieldcrypt(key = "det", deterministic)]
    street: String,
    city: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encrypted)]
#[serde(rename_all = "camelCase")]
struct Member {
    #[serde(rename = "_id")]
    id: i32,
    display_name: String,
    #[fieldcrypt(key = "pii", bind_id)]
    tax_id: String,
    #[fieldcrypt(key = "det", deterministic)]
    email: String,
    #[fieldcrypt(key = "pii", blind_index(key = "idx"))]
    phone: String,
    #[fieldcrypt(key = "det", deterministic, each)]
    tags: Vec<String>,
    home: Address,
}

fn member(id: i32) -> Member {
    Member {
        id,
        display_name: format!("Member {id}"),
        tax_id: format!("TAX-{id:04}"),
        email: format!("m{id}@example.com"),
        phone: format!("+1-555-{id:04}"),
        tags: vec![format!("t{id}"), "all".into()],
        home: Address {
            street: format!("{id} Main St"),
            city: "Springfield".into(),
        },
    }
}

async fn setup(
    prefix: &str,
) -> (
    Database,
    Arc<InMemoryKeyring>,
    EncryptedCollection<Member>,
    Sent,
) {
    let (client, sent) = recording_client().await;
    let db = client.database(&unique_db_name(prefix));
    let ring = keyring_with(&["pii", "det", "idx"]);
    let coll =
        EncryptedCollection::<Member>::typed(db.collection::<Document>("members"), ring.clone())
            .unwrap();
    (db, ring, coll, sent)
}

fn is_envelope(v: Option<&Bson>) -> bool {
    matches!(v, Some(Bson::Binary(b)) if u8::from(b.subtype) == ENVELOPE_SUBTYPE)
}

fn refusal(e: Error) -> (String, String) {
    match e {
        Error::UnsupportedQuery {
            operator, field, ..
        } => (operator, field),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn next<T>(s: &mut fieldcrypt::mongo::EncryptedChangeStream<T>) -> ChangeStreamEvent<T>
where
    T: serde::de::DeserializeOwned + Send + Unpin + 'static,
{
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a change event within 10 s")
        .expect("the stream is open")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derived_type_is_its_own_schema() {
    let (db, _ring, coll, _) = setup("api_typed").await;
    assert_eq!(coll.schema().rules().len(), Member::schema().rules().len());
    coll.insert_one(member(1)).await.unwrap();
    let raw: Document = stored(&db, "members", doc! { "_id": 1 }).await;
    // Stored under the serialized (camelCase) names, encrypted where marked.
    assert!(is_envelope(raw.get("taxId")), "{raw}");
    assert!(is_envelope(raw.get("email")));
    assert!(!raw.contains_key("tax_id"));
    assert!(matches!(raw.get("phone_bidx"), Some(Bson::Binary(_))));
    assert!(is_envelope(raw.get_document("home").unwrap().get("street")));
    assert_eq!(raw.get_str("displayName").unwrap(), "Member 1");
    let tags = raw.get_array("tags").unwrap();
    assert!(tags.iter().all(|t| is_envelope(Some(t))));
    // Queries by the derived schema's deterministic and blind-indexed fields.
    for filter in [
        doc! { "email": "m1@example.com" },
        doc! { "phone": "+1-555-0001" },
        doc! { "home.street": "1 Main St" },
        doc! { "tags": "all" },
    ] {
        assert_eq!(
            coll.find_one(filter.clone()).await.unwrap(),
            Some(member(1)),
            "{filter}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_write_encrypts_every_model_in_one_command() {
    let (db, _ring, coll, sent) = setup("api_bulk").await;
    coll.insert_many((10..13).map(member)).await.unwrap();
    sent.clear();
    let mut replaced = member(11);
    replaced.tax_id = "TAX-NEW".into();
    let result = coll
        .bulk_write([
            WriteModel::insert_one(member(1)),
            WriteModel::insert_one(member(2)),
            // An _id-bound field written by an update with an _id equality.
            WriteModel::update_one(
                doc! { "_id": 1 },
                doc! { "$set": { "taxId": "TAX-CHANGED" } },
            ),
            // Filters on deterministic and blind-indexed fields are rewritten.
            WriteModel::update_many(
                doc! { "email": { "$in": ["m2@example.com", "m10@example.com"] } },
                doc! { "$set": { "displayName": "renamed" } },
            ),
            WriteModel::replace_one(doc! { "_id": 11 }, replaced.clone()),
            WriteModel::delete_one(doc! { "phone": "+1-555-0012" }),
            WriteModel::update_one(
                doc! { "_id": 3 },
                doc! { "$set": { "email": "new@example.com" } },
            )
            .upsert(true),
        ])
        .await
        .unwrap();
    assert_eq!(sent.names().iter().filter(|n| *n == "bulkWrite").count(), 1);
    assert_eq!(result.inserted_count, 2);
    assert_eq!(result.matched_count, 4);
    assert_eq!(result.deleted_count, 1);
    assert_eq!(result.upserted_count, 1);

    let one = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(one.tax_id, "TAX-CHANGED");
    let raw: Document = stored(&db, "members", doc! { "_id": 1 }).await;
    assert!(is_envelope(raw.get("taxId")));
    let two: Document = stored(&db, "members", doc! { "_id": 2 }).await;
    assert_eq!(two.get_str("displayName").unwrap(), "renamed");
    assert!(is_envelope(two.get("email")));
    assert_eq!(
        coll.find_one(doc! { "_id": 11 }).await.unwrap(),
        Some(replaced)
    );
    assert!(coll.find_one(doc! { "_id": 12 }).await.unwrap().is_none());
    let upserted: Document = stored(&db, "members", doc! { "_id": 3 }).await;
    assert!(is_envelope(upserted.get("email")), "{upserted}");
    let raw_upserted = coll
        .raw()
        .find_one(doc! { "email": "new@example.com" })
        .await
        .unwrap();
    assert!(raw_upserted.is_some());

    // One model that cannot work on ciphertext: nothing is sent, not even the inserts before it.
    sent.clear();
    let e = coll
        .bulk_write([
            WriteModel::insert_one(member(20)),
            WriteModel::delete_many(doc! { "email": { "$gt": "a" } }),
        ])
        .await
        .unwrap_err();
    assert_eq!(refusal(e), ("$gt".into(), "email".into()));
    let e = coll
        .bulk_write([WriteModel::update_many(
            doc! { "displayName": "renamed" },
            doc! { "$set": { "taxId": "X" } },
        )])
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::MissingContext(_) | Error::UnsupportedQuery { .. }),
        "{e:?}"
    );
    assert!(sent.names().is_empty(), "{:?}", sent.names());
    assert!(coll.find_one(doc! { "_id": 20 }).await.unwrap().is_none());
    // A server-side failure comes back as the driver's error, redacted, with nothing leaked.
    let dup = coll
        .bulk_write([WriteModel::insert_one(member(1))])
        .ordered(false)
        .await
        .unwrap_err();
    assert!(matches!(dup, Error::Mongo(_)), "{dup:?}");
    assert!(!format!("{dup:?} {dup}").contains("TAX-"), "{dup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_decrypts_documents_and_updated_fields() {
    let (db, _ring, coll, sent) = setup("api_watch").await;
    coll.insert_one(member(0)).await.unwrap(); // creates the collection
    let mut stream = coll
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .pipeline([
            doc! { "$match": { "operationType": { "$in": ["insert", "update", "delete"] } } },
        ])
        .await
        .unwrap();
    coll.insert_one(member(1)).await.unwrap();
    let insert = next(&mut stream).await;
    assert_eq!(insert.operation_type, OperationType::Insert);
    assert_eq!(insert.full_document, Some(member(1)));

    // Read before the next write: the full document is looked up when the event is read.
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "taxId": "TAX-UPDATED", "home": { "street": "2 Side St", "city": "Shelbyville" } } },
    )
    .await
    .unwrap();
    let update = next(&mut stream).await;
    assert_eq!(update.operation_type, OperationType::Update);
    let full = update.full_document.unwrap();
    assert_eq!(full.tax_id, "TAX-UPDATED");
    assert_eq!(full.home.street, "2 Side St");
    let fields = update.update_description.unwrap().updated_fields;
    assert_eq!(fields.get_str("taxId").unwrap(), "TAX-UPDATED", "{fields}");
    assert_eq!(
        fields
            .get_document("home")
            .unwrap()
            .get_str("street")
            .unwrap(),
        "2 Side St"
    );

    coll.update_one(doc! { "_id": 1 }, doc! { "$push": { "tags": "pushed" } })
        .await
        .unwrap();
    let push = next(&mut stream).await;
    let fields = push.update_description.unwrap().updated_fields;
    // `tags.2` (one element) or the whole array, depending on the server: decrypted either way.
    let pushed: Vec<&Bson> = fields.iter().map(|(_, v)| v).collect();
    assert!(
        pushed.iter().any(|v| match v {
            Bson::String(s) => s == "pushed",
            Bson::Array(a) => a.contains(&Bson::String("pushed".into())),
            _ => false,
        }),
        "{fields}"
    );
    assert!(!format!("{fields}").contains("Binary"), "{fields}");

    coll.delete_one(doc! { "_id": 1 }).await.unwrap();

    let delete = next(&mut stream).await;
    assert_eq!(delete.operation_type, OperationType::Delete);
    assert_eq!(delete.document_key.unwrap().get_i32("_id").unwrap(), 1);
    assert!(stream.resume_token().is_some());

    // A stream resumed after the insert sees the update next, decrypted.
    let mut resumed = coll
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .resume_after(insert.id.clone())
        .await
        .unwrap();
    assert_eq!(
        next(&mut resumed).await.operation_type,
        OperationType::Update
    );

    // Pipelines that read encrypted values, or reshape events, are refused before sending.
    sent.clear();
    for (pipeline, expected) in [
        (
            vec![doc! { "$match": { "fullDocument.email": "m1@example.com" } }],
            ("$match", "email"),
        ),
        (
            vec![doc! { "$match": { "updateDescription.updatedFields.home.street": "x" } }],
            ("$match", "home.street"),
        ),
        (
            vec![
                doc! { "$match": { "$or": [{ "fullDocument.phone_bidx": { "$exists": true } }] } },
            ],
            ("$match", "phone"),
        ),
        (
            vec![doc! { "$match": { "documentKey.email": "m1@example.com" } }],
            ("$match", "email"),
        ),
        (
            vec![doc! { "$project": { "fullDocument.taxId": 1 } }],
            ("$project", "taxId"),
        ),
    ] {
        let (op, field) = refusal(coll.watch().pipeline(pipeline).await.unwrap_err());
        assert_eq!(op, expected.0);
        assert!(field.contains(expected.1), "{field}");
    }
    assert!(sent.names().is_empty(), "{:?}", sent.names());
    drop(db);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Encrypted)]
#[fieldcrypt(owner = "tenant")]
struct Note {
    #[serde(rename = "_id")]
    id: i32,
    tenant: String,
    #[fieldcrypt(key = "pii")]
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_scoped_collections_watch_and_count_with_what_they_can_bind() {
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("api_owner"));
    let notes = EncryptedCollection::<Note>::typed(
        db.collection::<Document>("notes"),
        keyring_with(&["pii"]),
    )
    .unwrap();
    let acme = notes.scoped("acme").unwrap();
    acme.insert_one(Note {
        id: 1,
        tenant: "acme".into(),
        body: "first".into(),
    })
    .await
    .unwrap();
    // Without the full document an update's values cannot be bound to their owner.
    let mut bare = notes.watch().await.unwrap();
    let mut looked_up = notes
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .unwrap();
    acme.update_one(doc! { "_id": 1 }, doc! { "$set": { "body": "second" } })
        .await
        .unwrap();
    let wait = Duration::from_secs(10);
    let e = tokio::time::timeout(wait, bare.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::MissingContext(_)), "{e:?}");
    let ev = tokio::time::timeout(wait, looked_up.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let fields = ev.update_description.unwrap().updated_fields;
    assert_eq!(fields.get_str("body").unwrap(), "second");

    // Scoped handles refuse what would reach every owner's documents.
    assert_eq!(refusal(acme.watch().await.unwrap_err()).0, "watch");
    assert_eq!(
        refusal(acme.estimated_document_count().await.unwrap_err()).0,
        "estimated_document_count"
    );
    assert_eq!(notes.estimated_document_count().await.unwrap(), 1);
    assert_eq!(acme.count_documents(doc! {}).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_index_allows_comparable_fields_and_refuses_randomized_ones() {
    let (_db, _ring, coll, sent) = setup("api_index").await;
    coll.insert_many((1..=5).map(member)).await.unwrap();
    assert_eq!(coll.estimated_document_count().await.unwrap(), 5);

    let created = coll
        .create_index(
            IndexModel::builder()
                .keys(doc! { "email": 1 })
                .options(IndexOptions::builder().unique(true).build())
                .build(),
        )
        .await
        .unwrap();
    assert_eq!(created.index_name, "email_1");
    let many = coll
        .create_indexes([
            IndexModel::builder().keys(doc! { "phone": 1 }).build(),
            IndexModel::builder()
                .keys(doc! { "home.street": 1, "displayName": -1 })
                .build(),
        ])
        .await
        .unwrap();
    // The blind-indexed field is indexed by its index, where its equality queries go.
    assert_eq!(
        many.index_names,
        ["phone_bidx_1", "home.street_1_displayName_-1"]
    );
    // The unique index on deterministic ciphertexts refuses a second equal plaintext (under one
    // key version and one binding: see docs/QUERIES.md).
    let mut dup = member(6);
    dup.email = member(1).email;
    let e = coll.insert_one(dup).await.unwrap_err();
    assert!(matches!(e, Error::Mongo(_)), "{e:?}");

    sent.clear();
    for (keys, field) in [
        (doc! { "taxId": 1 }, "taxId"),
        (doc! { "email": "text" }, "email"),
        (doc! { "home": 1 }, "home.street"),
        (doc! { "$**": 1 }, "taxId"),
    ] {
        let model = IndexModel::builder().keys(keys.clone()).build();
        assert_eq!(
            refusal(coll.create_index(model).await.unwrap_err()).1,
            field,
            "{keys}"
        );
    }
    let partial = IndexModel::builder()
        .keys(doc! { "displayName": 1 })
        .options(
            IndexOptions::builder()
                .partial_filter_expression(doc! { "email": "m1@example.com" })
                .build(),
        )
        .build();
    assert_eq!(
        refusal(coll.create_index(partial).await.unwrap_err()).0,
        "partialFilterExpression"
    );
    assert!(sent.names().is_empty(), "{:?}", sent.names());
    let listed: Vec<String> = coll_index_names(&coll).await;
    assert!(!listed.iter().any(|n| n.contains("taxId")), "{listed:?}");
}

async fn coll_index_names(coll: &EncryptedCollection<Member>) -> Vec<String> {
    let ns = coll.namespace().to_owned();
    let (db, name) = ns.split_once('.').unwrap();
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    client
        .database(db)
        .collection::<Document>(name)
        .list_index_names()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_options_pass_through_and_hints_follow_the_indexes() {
    let (_db, _ring, coll, sent) = setup("api_find_opts").await;
    coll.insert_many((1..=3).map(member)).await.unwrap();
    coll.create_index(IndexModel::builder().keys(doc! { "phone": 1 }).build())
        .await
        .unwrap();
    sent.clear();
    let found: Vec<Member> = coll
        .find(doc! { "phone": "+1-555-0002" })
        .hint(Hint::Keys(doc! { "phone": 1 }))
        .max_time(Duration::from_secs(5))
        .comment("members-by-phone")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(found, [member(2)]);
    let find = sent
        .commands()
        .into_iter()
        .find(|(n, _)| n == "find")
        .map(|(_, c)| c)
        .unwrap();
    assert_eq!(
        find.get_document("hint").unwrap(),
        &doc! { "phone_bidx": 1 }
    );
    assert_eq!(
        find.get_i64("maxTimeMS")
            .or_else(|_| find.get_i32("maxTimeMS").map(i64::from))
            .unwrap(),
        5000
    );
    assert_eq!(find.get_str("comment").unwrap(), "members-by-phone");
    // A hint by name passes as it is; a hint on a randomized field is refused unsent.
    let by_name: Vec<Member> = coll
        .find(doc! {})
        .hint(Hint::Name("phone_bidx_1".into()))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(by_name.len(), 3);
    sent.clear();
    let e = coll
        .find(doc! {})
        .hint(Hint::Keys(doc! { "taxId": 1 }))
        .await
        .unwrap_err();
    assert_eq!(refusal(e), ("index".into(), "taxId".into()));
    assert!(sent.names().is_empty());

    // Every operation that takes a hint rewrites it the same way.
    let phone = || Some(Hint::Keys(doc! { "phone": 1 }));
    sent.clear();
    let n = coll
        .count_documents(doc! { "phone": "+1-555-0001" })
        .with_options(CountOptions::builder().hint(phone()).build())
        .await
        .unwrap();
    assert_eq!(n, 1);
    coll.update_one(
        doc! { "phone": "+1-555-0001" },
        doc! { "$set": { "displayName": "One" } },
    )
    .with_options(UpdateOptions::builder().hint(phone()).build())
    .await
    .unwrap();
    coll.replace_one(doc! { "phone": "+1-555-0003" }, member(3))
        .with_options(ReplaceOptions::builder().hint(phone()).build())
        .await
        .unwrap();
    let _cursor = coll
        .aggregate([doc! { "$match": {} }])
        .with_options(AggregateOptions::builder().hint(phone()).build())
        .await
        .unwrap();
    coll.delete_one(doc! { "phone": "+1-555-0002" })
        .with_options(DeleteOptions::builder().hint(phone()).build())
        .await
        .unwrap();
    let hints: Vec<(String, Bson)> = sent
        .commands()
        .into_iter()
        .filter(|(n, _)| n != "find" && n != "getMore")
        .map(|(n, c)| {
            let hint = match n.as_str() {
                "update" | "delete" => c
                    .get_array(if n == "update" { "updates" } else { "deletes" })
                    .unwrap()[0]
                    .as_document()
                    .unwrap()
                    .get("hint")
                    .cloned(),
                _ => c.get("hint").cloned(),
            };
            (n, hint.unwrap_or(Bson::Null))
        })
        .collect();
    let expected = Bson::Document(doc! { "phone_bidx": 1 });
    assert_eq!(
        hints,
        [
            ("aggregate".to_owned(), expected.clone()),
            ("update".to_owned(), expected.clone()),
            ("update".to_owned(), expected.clone()),
            ("aggregate".to_owned(), expected.clone()),
            ("delete".to_owned(), expected),
        ]
    );
}
