//! EncryptedCollection against a real MongoDB wire-protocol server: typed and raw round trips,
//! query rewriting (deterministic, blind-indexed, `$in`, numeric types, rotation), updates,
//! streaming decryption, aggregation, sessions and transactions, refusals that send nothing,
//! and the `$jsonSchema` validator.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{doc, Bson, Document, RawDocumentBuf};
use fieldcrypt::mongo::{apply_validator, EncryptedCollection};
use fieldcrypt::{
    BlindIndex, Error, Field, InMemoryKeyring, Schema, BLIND_INDEX_SUBTYPE, ENVELOPE_SUBTYPE,
};
use fieldcrypt_testkit::devserver::unique_db_name;
use fieldcrypt_testkit::fixtures::{keyring_with, recording_client, stored, Sent};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    Collation, FindOneAndDeleteOptions, FindOneAndReplaceOptions, FindOneAndUpdateOptions,
    FindOptions, ReturnDocument,
};
use mongodb::Database;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    phone: String,
    city: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Patient {
    #[serde(rename = "_id")]
    id: i32,
    name: String,
    email: String,
    ssn: String,
    code: i64,
    age: i32,
    tags: Vec<String>,
    profile: Profile,
}

fn patient(id: i32) -> Patient {
    Patient {
        id,
        name: format!("Name {id}"),
        email: format!("user{id}@example.com"),
        ssn: format!("{id:03}-00-{id:04}"),
        code: 1000 + i64::from(id),
        age: 20 + id % 50,
        tags: if id % 2 == 0 {
            vec!["vip".into(), format!("t{id}")]
        } else {
            vec![format!("t{id}")]
        },
        profile: Profile {
            phone: format!("+1-555-{id:04}"),
            city: "Springfield".into(),
        },
    }
}

fn schema() -> Schema {
    Schema::builder()
        .field(
            "name",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
        )
        .field("email", Field::deterministic("det"))
        .field("ssn", Field::randomized("pii").bind_id())
        .field("code", Field::deterministic("det"))
        .field("tags.$[]", Field::deterministic("det"))
        .field("profile.phone", Field::deterministic("det"))
        .build()
        .unwrap()
}

fn keyring() -> Arc<InMemoryKeyring> {
    keyring_with(&["pii", "det", "idx"])
}

async fn setup(
    prefix: &str,
) -> (
    Database,
    Arc<InMemoryKeyring>,
    EncryptedCollection<Patient>,
    Sent,
) {
    let (client, sent) = recording_client().await;
    let db = client.database(&unique_db_name(prefix));
    let ring = keyring();
    let coll = EncryptedCollection::<Patient>::new(
        db.collection::<Document>("patients"),
        ring.clone(),
        schema(),
    );
    (db, ring, coll, sent)
}

fn subtype(v: Option<&Bson>) -> Option<u8> {
    match v {
        Some(Bson::Binary(b)) => Some(u8::from(b.subtype)),
        _ => None,
    }
}

async fn ids(cursor: fieldcrypt::mongo::EncryptedCursor<'_, Patient>) -> Vec<i32> {
    let mut v: Vec<i32> = cursor.map(|p| p.unwrap().id).collect().await;
    v.sort_unstable();
    v
}

fn refusal(e: Error) -> (String, String) {
    match e {
        Error::UnsupportedQuery {
            operator, field, ..
        } => (operator, field),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_and_raw_round_trips_and_rewritten_queries() {
    let (db, _ring, coll, _) = setup("coll_roundtrip").await;
    coll.insert_one(patient(1)).await.unwrap();
    coll.insert_many([patient(2), patient(3), patient(4)])
        .await
        .unwrap();

    // Stored: ciphertext envelopes and a blind index; plain fields in clear.
    let stored = stored::<Document>(&db, "patients", doc! { "_id": 2 }).await;
    for f in ["name", "email", "ssn", "code"] {
        assert_eq!(subtype(stored.get(f)), Some(ENVELOPE_SUBTYPE), "{f}");
    }
    assert_eq!(subtype(stored.get("name_bidx")), Some(BLIND_INDEX_SUBTYPE));
    let tags = stored.get_array("tags").unwrap();
    assert!(tags
        .iter()
        .all(|t| subtype(Some(t)) == Some(ENVELOPE_SUBTYPE)));
    let profile = stored.get_document("profile").unwrap();
    assert_eq!(subtype(profile.get("phone")), Some(ENVELOPE_SUBTYPE));
    assert_eq!(profile.get_str("city").unwrap(), "Springfield");
    assert_eq!(stored.get_i32("age").unwrap(), 22);

    // Typed reads decrypt.
    assert_eq!(
        coll.find_one(doc! { "_id": 3 }).await.unwrap(),
        Some(patient(3))
    );
    // Deterministic equality, $in, nested paths, per-element arrays.
    let found = coll
        .find(doc! { "email": "user2@example.com" })
        .await
        .unwrap();
    assert_eq!(ids(found).await, [2]);
    let found = coll
        .find(doc! { "email": { "$in": ["user1@example.com", "user4@example.com"] } })
        .await
        .unwrap();
    assert_eq!(ids(found).await, [1, 4]);
    let found = coll
        .find(doc! { "profile.phone": "+1-555-0003" })
        .await
        .unwrap();
    assert_eq!(ids(found).await, [3]);
    let found = coll.find(doc! { "tags": "vip" }).await.unwrap();
    assert_eq!(ids(found).await, [2, 4]);
    let found = coll.find(doc! { "tags": { "$ne": "vip" } }).await.unwrap();
    assert_eq!(ids(found).await, [1, 3]);
    // Blind-indexed equality (randomized field).
    let found = coll.find(doc! { "name": "Name 4" }).await.unwrap();
    assert_eq!(ids(found).await, [4]);
    // A stored i64 is found by an i32 (MongoDB's numeric equality).
    let found = coll.find(doc! { "code": 1001 }).await.unwrap();
    assert_eq!(ids(found).await, [1]);
    // Plain fields work as usual, combined with encrypted ones.
    let found = coll
        .find(doc! { "age": { "$gte": 23 }, "tags": "vip" })
        .await
        .unwrap();
    assert_eq!(ids(found).await, [4]);
    assert_eq!(
        coll.count_documents(doc! { "email": { "$ne": "user1@example.com" } })
            .await
            .unwrap(),
        3
    );
    // Sorted and projected (sort on a plain field; projection of encrypted fields).
    let options = FindOptions::builder()
        .sort(doc! { "_id": -1 })
        .projection(doc! { "email": 1 })
        .build();
    let docs: Vec<Document> = coll
        .clone_with_type::<Document>()
        .find(doc! {})
        .with_options(options)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(docs[0], doc! { "_id": 4, "email": "user4@example.com" });

    // The raw handle: no serde, same rewriting and decryption.
    let raw = coll.raw();
    let got: RawDocumentBuf = raw
        .find_one(doc! { "email": "user1@example.com" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.get_str("ssn").unwrap(), "001-00-0001");
    let mut fresh = RawDocumentBuf::new();
    fresh.append("_id", 10);
    fresh.append("email", "raw@example.com");
    fresh.append("ssn", "999-99-9999");
    raw.insert_one(fresh).await.unwrap();
    // No _id and an _id-bound field: fieldcrypt assigns the _id it binds to.
    let r = coll
        .clone_with_type::<Document>()
        .insert_one(doc! { "email": "noid@example.com", "ssn": "000-00-0000" })
        .await
        .unwrap();
    let got = coll
        .clone_with_type::<Document>()
        .find_one(doc! { "email": "noid@example.com" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.get("_id"), Some(&r.inserted_id));
    assert_eq!(got.get_str("ssn").unwrap(), "000-00-0000");
    let got = coll
        .clone_with_type::<Document>()
        .find_one(doc! { "email": "raw@example.com" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.get_str("ssn").unwrap(), "999-99-9999");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_insert_is_one_round_trip_and_the_stream_reports_bad_documents_in_place() {
    let (db, _ring, coll, sent) = setup("coll_stream").await;
    let docs: Vec<Patient> = (0..300).map(patient).collect();
    sent.clear();
    coll.insert_many(&docs).await.unwrap();
    let inserts = sent.names().iter().filter(|c| *c == "insert").count();
    assert_eq!(inserts, 1, "300 small documents fit one insert command");

    // Move one document's _id-bound ciphertext into another: it must not decrypt there.
    let plain = db.collection::<Document>("patients");
    let donor = plain.find_one(doc! { "_id": 7 }).await.unwrap().unwrap();
    plain
        .update_one(
            doc! { "_id": 150 },
            doc! { "$set": { "ssn": donor.get("ssn").unwrap().clone() } },
        )
        .await
        .unwrap();

    let mut cursor = coll
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .batch_size(64)
        .await
        .unwrap();
    let mut n = 0;
    while let Some(item) = cursor.next().await {
        if n == 150 {
            assert!(matches!(item, Err(Error::Decrypt)), "{item:?}");
        } else {
            assert_eq!(item.unwrap(), docs[n]);
        }
        n += 1;
    }
    assert_eq!(n, 300);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_encrypt_what_they_write() {
    let (db, _ring, coll, _) = setup("coll_update").await;
    coll.insert_many((1..=4).map(patient)).await.unwrap();

    let r = coll
        .update_one(
            doc! { "_id": 1 },
            doc! {
                "$set": { "email": "new1@example.com", "name": "New Name", "ssn": "111-11-1111", "profile.phone": "+1-000" },
                "$push": { "tags": "pushed" },
                "$inc": { "age": 1 },
            },
        )
        .await
        .unwrap();
    assert_eq!(r.modified_count, 1);
    let p = coll
        .find_one(doc! { "email": "new1@example.com" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            p.name.as_str(),
            p.ssn.as_str(),
            p.profile.phone.as_str(),
            p.age
        ),
        ("New Name", "111-11-1111", "+1-000", 22)
    );
    assert_eq!(p.tags, ["t1", "pushed"]);
    let found = coll.find(doc! { "name": "New Name" }).await.unwrap();
    assert_eq!(ids(found).await, [1]);
    let found = coll.find(doc! { "name": "Name 1" }).await.unwrap();
    assert!(
        ids(found).await.is_empty(),
        "the old blind index was replaced"
    );

    let r = coll
        .update_many(doc! {}, doc! { "$addToSet": { "tags": "vip" } })
        .await
        .unwrap();
    assert_eq!(r.modified_count, 2, "documents 2 and 4 already had it");
    assert_eq!(
        coll.count_documents(doc! { "tags": "vip" }).await.unwrap(),
        4
    );

    coll.update_one(doc! { "_id": 2 }, doc! { "$unset": { "name": "" } })
        .await
        .unwrap();
    let stored = stored::<Document>(&db, "patients", doc! { "_id": 2 }).await;
    assert!(!stored.contains_key("name") && !stored.contains_key("name_bidx"));

    let after = coll
        .find_one_and_update(
            doc! { "email": "user3@example.com" },
            doc! { "$set": { "profile.phone": "+1-333" } },
        )
        .with_options(
            FindOneAndUpdateOptions::builder()
                .return_document(ReturnDocument::After)
                .build(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.profile.phone, "+1-333");

    let mut replacement = patient(4);
    replacement.email = "replaced@example.com".into();
    replacement.ssn = "444-44-4444".into();
    let r = coll
        .replace_one(doc! { "_id": 4 }, &replacement)
        .await
        .unwrap();
    assert_eq!(r.modified_count, 1);
    assert_eq!(
        coll.find_one(doc! { "email": "replaced@example.com" })
            .await
            .unwrap(),
        Some(replacement)
    );

    // An _id-bound field cannot be written by a filter that does not fix the _id.
    let e = coll
        .update_many(
            doc! { "age": { "$gt": 0 } },
            doc! { "$set": { "ssn": "x" } },
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(e), ("$set".into(), "ssn".into()));

    let r = coll
        .delete_one(doc! { "email": "user3@example.com" })
        .await
        .unwrap();
    assert_eq!(r.deleted_count, 1);
    let r = coll.delete_many(doc! { "tags": "vip" }).await.unwrap();
    assert_eq!(
        r.deleted_count, 3,
        "every remaining document got the tag above"
    );
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 0);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_one_and_replace_and_delete_encrypt_what_they_write_and_decrypt_what_they_return() {
    let (db, _ring, coll, sent) = setup("coll_foa").await;
    coll.insert_many((1..=4).map(patient)).await.unwrap();
    let raw = db.collection::<Document>("patients");

    // Replaced through a deterministic field; the document as it was comes back decrypted.
    let mut replacement = patient(2);
    replacement.email = "new2@example.com".into();
    replacement.ssn = "222-22-2222".into();
    let before = coll
        .find_one_and_replace(doc! { "email": "user2@example.com" }, &replacement)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before, patient(2));
    let stored = raw.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    for f in ["ssn", "email", "name"] {
        assert_eq!(subtype(stored.get(f)), Some(ENVELOPE_SUBTYPE), "{f}");
    }
    let text = format!("{stored:?}");
    assert!(
        !text.contains("222-22-2222") && !text.contains("new2@"),
        "{text}"
    );
    // The new document, asked for, comes back decrypted; and the stored one is found by value.
    replacement.age = 99;
    let after = coll
        .find_one_and_replace(doc! { "_id": 2 }, &replacement)
        .with_options(
            FindOneAndReplaceOptions::builder()
                .return_document(ReturnDocument::After)
                .build(),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, replacement);
    assert_eq!(
        coll.find_one(doc! { "email": "new2@example.com" })
            .await
            .unwrap(),
        Some(replacement)
    );

    // Deleted through a blind-indexed field; the deleted document comes back decrypted.
    let gone = coll
        .find_one_and_delete(doc! { "name": "Name 3" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gone, patient(3));
    assert!(coll
        .find_one_and_delete(doc! { "name": "Name 3" })
        .await
        .unwrap()
        .is_none());
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 3);

    // Refused before anything is sent: a sort on an encrypted field, a range on one.
    sent.clear();
    let e = coll
        .find_one_and_delete(doc! {})
        .with_options(
            FindOneAndDeleteOptions::builder()
                .sort(doc! { "ssn": 1 })
                .build(),
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(e).1, "ssn");
    let e = coll
        .find_one_and_replace(doc! { "code": { "$gt": 5 } }, patient(1))
        .await
        .unwrap_err();
    assert_eq!(refusal(e).1, "code");
    assert!(sent.is_empty(), "{:?}", sent.names());
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 3);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_decrypts_deterministic_fields_once_per_value_across_keys() {
    let (db, ring, coll, sent) = setup("coll_distinct").await;
    coll.insert_many((1..=6).map(patient)).await.unwrap();
    let sorted = |mut v: Vec<Bson>| {
        v.sort_by_key(ToString::to_string);
        v
    };
    let strings = |v: &[&str]| sorted(v.iter().map(|s| Bson::from(*s)).collect());

    // A plain field: the server's answer.
    let ages = coll.distinct("age", doc! {}).await.unwrap();
    assert_eq!(sorted(ages), sorted((21..=26).map(Bson::Int32).collect()));
    // Deterministic fields, top-level, nested and per-element, decrypted.
    let emails = coll
        .distinct("email", doc! { "age": { "$lt": 23 } })
        .await
        .unwrap();
    assert_eq!(
        sorted(emails),
        strings(&["user1@example.com", "user2@example.com"])
    );
    let phones = coll.distinct("profile.phone", doc! {}).await.unwrap();
    assert_eq!(phones.len(), 6);
    assert!(phones.contains(&Bson::from("+1-555-0004")));
    let tags = coll.distinct("tags", doc! {}).await.unwrap();
    assert_eq!(
        sorted(tags),
        strings(&["t1", "t2", "t3", "t4", "t5", "t6", "vip"])
    );
    // A filter on an encrypted field is rewritten as for find.
    let one = coll
        .distinct("email", doc! { "email": "user4@example.com" })
        .await
        .unwrap();
    assert_eq!(one, vec![Bson::from("user4@example.com")]);

    // After a rotation the same plaintext has two ciphertexts in the collection: one value.
    ring.rotate("det");
    let mut again = patient(7);
    again.email = "user1@example.com".into();
    coll.insert_one(&again).await.unwrap();
    let raw = db.collection::<Document>("patients");
    assert_eq!(raw.distinct("email", doc! {}).await.unwrap().len(), 7);
    assert_eq!(coll.distinct("email", doc! {}).await.unwrap().len(), 6);

    // Fields without one ciphertext per value are refused before anything is sent.
    sent.clear();
    for (field, refused) in [
        ("ssn", "ssn"),
        ("name", "name"),
        ("name_bidx", "name"),
        ("profile", "profile.phone"),
    ] {
        let e = coll.distinct(field, doc! {}).await.unwrap_err();
        assert_eq!(
            refusal(e),
            ("distinct".to_string(), refused.to_string()),
            "{field}"
        );
    }
    let e = coll
        .distinct("email", doc! {})
        .with_options(
            mongodb::options::DistinctOptions::builder()
                .collation(
                    Collation::builder()
                        .locale("en")
                        .strength(mongodb::options::CollationStrength::Primary)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap_err();
    assert_eq!(refusal(e).0, "collation");
    assert!(sent.is_empty(), "{:?}", sent.names());
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_merges_values_as_the_server_would_and_passes_legacy_plaintext() {
    let (client, _sent) = recording_client().await;
    let db = client.database(&unique_db_name("coll_distinct_merge"));
    let schema = Schema::builder()
        .field("n", Field::deterministic("det"))
        .field("list", Field::deterministic("det"))
        .build()
        .unwrap();
    let coll =
        EncryptedCollection::<Document>::new(db.collection::<Document>("c"), keyring(), schema);
    coll.insert_many([
        doc! { "_id": 1, "n": 1_i32, "list": [1, 2] },
        doc! { "_id": 2, "n": 1_i64, "list": [2, 3] },
        doc! { "_id": 3, "n": 1.0, "list": ["x"] },
        doc! { "_id": 4, "n": 2.5 },
    ])
    .await
    .unwrap();
    // Written before the fields were encrypted: plaintext, straight into the collection.
    db.collection::<Document>("c")
        .insert_one(doc! { "_id": 5, "n": 7, "list": [3, "y"] })
        .await
        .unwrap();
    let sorted = |mut v: Vec<Bson>| {
        v.sort_by_key(ToString::to_string);
        v
    };
    // One 1 whatever its numeric type (the first one met), as the server merges numbers.
    let n = sorted(coll.distinct("n", doc! {}).await.unwrap());
    assert_eq!(n.len(), 3, "{n:?}");
    assert!(
        n.contains(&Bson::Double(2.5)) && n.contains(&Bson::Int32(7)),
        "{n:?}"
    );
    // A deterministic array is encrypted whole; its distinct values are its elements, merged
    // with the elements of plaintext arrays the server split.
    let list = sorted(coll.distinct("list", doc! {}).await.unwrap());
    assert_eq!(
        list,
        sorted(vec![
            Bson::Int32(1),
            Bson::Int32(2),
            Bson::Int32(3),
            Bson::from("x"),
            Bson::from("y")
        ])
    );
    // Positional paths name nothing the server could list.
    let e = coll.distinct("list.$[]", doc! {}).await.unwrap_err();
    assert_eq!(refusal(e).0, "distinct");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_refused_operations_send_nothing() {
    let (db, _ring, coll, sent) = setup("coll_refuse").await;
    coll.insert_one(patient(1)).await.unwrap();
    let docs = coll.clone_with_type::<Document>();
    sent.clear();

    let mut refusals = Vec::new();
    refusals.push(refusal(
        coll.find(doc! { "age": 1, "email": { "$gt": "a" } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find(doc! { "name": { "$regex": "^N" } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find(doc! { "ssn": "001-00-0001" }).await.unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find(doc! { "profile": { "phone": "x", "city": "y" } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find(doc! {})
            .sort(doc! { "email": 1 })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find_one(doc! { "$where": "true" }).await.unwrap_err(),
    ));
    refusals.push(refusal(
        coll.count_documents(doc! { "code": { "$lt": 5 } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.update_one(doc! { "_id": 1 }, doc! { "$inc": { "code": 1 } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.update_one(doc! { "_id": 1 }, doc! { "$rename": { "email": "mail" } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.delete_many(doc! { "tags": { "$all": ["a"] } })
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        docs.aggregate([doc! { "$group": { "_id": "$email" } }])
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        docs.aggregate([doc! { "$sort": { "name": 1 } }])
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        docs.aggregate([doc! { "$match": { "$expr": { "$eq": ["$ssn", "x"] } } }])
            .await
            .unwrap_err(),
    ));
    refusals.push(refusal(
        coll.find(doc! { "email": "user1@example.com" })
            .with_options(
                FindOptions::builder()
                    .collation(
                        Collation::builder()
                            .locale("en")
                            .strength(mongodb::options::CollationStrength::Secondary)
                            .build(),
                    )
                    .build(),
            )
            .await
            .unwrap_err(),
    ));
    let expected = [
        ("$gt", "email"),
        ("$regex", "name"),
        ("equality", "ssn"),
        ("equality", "profile.phone"),
        ("sort", "email"),
        ("$where", "name, email, ssn, code, tags, profile.phone"),
        ("$lt", "code"),
        ("$inc", "code"),
        ("$rename", "email"),
        ("$all", "tags"),
        ("$group", "email"),
        ("sort", "name"),
        ("$expr", "ssn"),
        ("collation", "email"),
    ];
    let got: Vec<(&str, &str)> = refusals
        .iter()
        .map(|(o, f)| (o.as_str(), f.as_str()))
        .collect();
    assert_eq!(got, expected);
    assert!(
        sent.is_empty(),
        "refused operations sent {:?}",
        sent.names()
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_rewrites_match_stages_and_decrypts_results() {
    let (db, _ring, coll, _) = setup("coll_agg").await;
    coll.insert_many((1..=6).map(patient)).await.unwrap();
    let got: Vec<Patient> = coll
        .aggregate([doc! { "$match": { "email": "user5@example.com" } }])
        .with_type::<Patient>()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(got, [patient(5)]);
    let got: Vec<Document> = coll
        .aggregate([
            doc! { "$match": { "tags": "vip", "name": { "$ne": "Name 2" } } },
            doc! { "$project": { "name": 1, "ssn": 1 } },
            doc! { "$sort": { "_id": 1 } },
        ])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            doc! { "_id": 4, "name": "Name 4", "ssn": "004-00-0004" },
            doc! { "_id": 6, "name": "Name 6", "ssn": "006-00-0006" },
        ]
    );
    // Grouping by a plain field is fine.
    let got: Vec<Document> = coll
        .aggregate([
            doc! { "$match": { "profile.phone": { "$in": ["+1-555-0001", "+1-555-0002", "+1-555-0003"] } } },
            doc! { "$group": { "_id": "$profile.city", "n": { "$sum": 1 } } },
        ])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(got, [doc! { "_id": "Springfield", "n": 3 }]);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_transactions_pass_through() {
    let (db, _ring, coll, _) = setup("coll_txn").await;
    // The collection must exist before a transaction writes to it (MongoDB < 4.4 rule, kept
    // by some servers).
    db.create_collection("patients").await.unwrap();
    let client = db.client().clone();

    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    coll.insert_one(patient(1))
        .session(&mut session)
        .await
        .unwrap();
    coll.insert_many([patient(2), patient(3)])
        .session(&mut session)
        .await
        .unwrap();
    // Inside the transaction the documents are visible, through the session's cursor.
    let inside: Vec<Patient> = coll
        .find(doc! { "tags": "vip" })
        .session(&mut session)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(inside, [patient(2)]);
    let n = coll
        .count_documents(doc! {})
        .session(&mut session)
        .await
        .unwrap();
    assert_eq!(n, 3);
    session.abort_transaction().await.unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 0, "aborted");

    session.start_transaction().await.unwrap();
    coll.insert_one(patient(4))
        .session(&mut session)
        .await
        .unwrap();
    coll.update_one(
        doc! { "_id": 4 },
        doc! { "$set": { "email": "tx@example.com" } },
    )
    .session(&mut session)
    .await
    .unwrap();
    let agg: Vec<Document> = coll
        .aggregate([doc! { "$match": { "email": "tx@example.com" } }])
        .session(&mut session)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(agg.len(), 1);
    session.commit_transaction().await.unwrap();
    assert_eq!(
        coll.find_one(doc! { "email": "tx@example.com" })
            .await
            .unwrap()
            .map(|p| p.id),
        Some(4)
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_match_values_written_before_a_rotation() {
    let (db, ring, coll, _) = setup("coll_rotation").await;
    coll.insert_one(patient(1)).await.unwrap();
    for alias in ["pii", "det", "idx"] {
        ring.rotate(alias);
    }
    coll.insert_one(patient(2)).await.unwrap();
    for (filter, id) in [
        (doc! { "email": "user1@example.com" }, 1),
        (doc! { "email": "user2@example.com" }, 2),
        (doc! { "name": "Name 1" }, 1),
        (doc! { "name": "Name 2" }, 2),
        (doc! { "tags": "t1" }, 1),
    ] {
        let found = coll.find(filter.clone()).await.unwrap();
        assert_eq!(ids(found).await, [id], "{filter}");
    }
    assert_eq!(
        coll.find_one(doc! { "_id": 1 }).await.unwrap(),
        Some(patient(1))
    );
    db.drop().await.unwrap();
}

fn is_validation_failure(e: &mongodb::error::Error) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 121
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_plaintext_written_past_fieldcrypt() {
    let (db, _ring, coll, _) = setup("coll_validator").await;
    coll.apply_validator().await.unwrap(); // creates the collection
    coll.insert_one(patient(1)).await.unwrap();
    coll.apply_validator().await.unwrap(); // collMod on an existing collection

    // A second service writing with the plain driver.
    let plain = db.collection::<Document>("patients");
    for bad in [
        doc! { "_id": 10, "email": "plain@example.com" },
        doc! { "_id": 11, "tags": ["plain"] },
        doc! { "_id": 12, "profile": { "phone": "+1" } },
        doc! { "_id": 13, "name": "x", "name_bidx": "not an index" },
    ] {
        let e = plain.insert_one(bad.clone()).await.unwrap_err();
        assert!(is_validation_failure(&e), "{bad}: {e}");
    }
    let e = plain
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "ssn": "123-45-6789" } })
        .await
        .unwrap_err();
    assert!(is_validation_failure(&e), "{e}");
    // Documents without encrypted fields, and fieldcrypt's own writes, pass.
    plain
        .insert_one(doc! { "_id": 20, "age": 3 })
        .await
        .unwrap();
    coll.insert_many([patient(2), patient(3)]).await.unwrap();
    coll.update_one(
        doc! { "_id": 2 },
        doc! { "$set": { "ssn": "222" }, "$push": { "tags": "x" } },
    )
    .await
    .unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 4);
    let stored = plain.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    assert!(
        matches!(stored.get("ssn"), Some(Bson::Binary(b)) if b.subtype == BinarySubtype::from(ENVELOPE_SUBTYPE))
    );
    // The same with the standalone helper on a new collection.
    apply_validator(&db, "other", &schema()).await.unwrap();
    let e = db
        .collection::<Document>("other")
        .insert_one(doc! { "email": "x" })
        .await
        .unwrap_err();
    assert!(is_validation_failure(&e), "{e}");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_pipelines_and_expressions_cannot_carry_plaintext_past_the_checks() {
    let (db, _ring, coll, sent) = setup("coll_pipeline_bypass").await;
    coll.insert_one(patient(1)).await.unwrap();
    let docs = coll.clone_with_type::<Document>();
    let plain = db.collection::<Document>("patients");
    let before = plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    sent.clear();

    let mut refusals = Vec::new();
    for pipeline in [
        vec![doc! { "$replaceWith": { "$literal": { "_id": 1, "ssn": "123-45-6789" } } }],
        vec![doc! { "$replaceWith": { "$arrayToObject": [[["_id", 1], ["ssn", "123-45-6789"]]] } }],
        vec![
            doc! { "$replaceWith": { "$mergeObjects": [{ "$literal": { "_id": 1 } }, { "ssn": "123-45-6789" }] } },
        ],
        vec![doc! { "$set": { "x": { "$literal": { "email": "plain@example.com" } } } }],
        vec![
            doc! { "$set": { "x": { "$setField": { "field": { "$concat": ["ss", "n"] }, "input": {}, "value": "1" } } } },
        ],
        vec![doc! { "$unset": "name" }],
        vec![doc! { "$unset": ["age", "name_bidx"] }],
    ] {
        refusals.push(refusal(
            docs.update_one(doc! { "_id": 1 }, pipeline)
                .await
                .unwrap_err(),
        ));
    }
    refusals.push(refusal(
        docs.find(
            doc! { "$expr": { "$eq": [{ "$getField": { "$literal": "ssn" } }, "123-45-6789"] } },
        )
        .await
        .unwrap_err(),
    ));
    refusals.push(refusal(
        docs.count_documents(
            doc! { "$expr": { "$eq": [{ "$getField": { "field": { "$toLower": "SSN" } } }, "123-45-6789"] } },
        )
        .await
        .unwrap_err(),
    ));
    refusals.push(refusal(
        docs.aggregate([doc! { "$match": { "$expr": { "$in": ["123-45-6789", { "$map": { "input": { "$objectToArray": { "$arrayToObject": [[["k", "$age"]]] } }, "in": "$$this.v" } }] } } }])
            .await
            .unwrap_err(),
    ));
    let all = "name, email, ssn, code, tags, profile.phone";
    let expected = [
        ("$replaceWith", all),
        ("$replaceWith", all),
        ("$replaceWith", all),
        ("$set", "email"),
        ("$setField", all),
        ("$unset", "name"),
        ("$unset", "name"),
        ("$expr", "ssn"),
        ("$getField", all),
        ("$arrayToObject", all),
    ];
    let got: Vec<(&str, &str)> = refusals
        .iter()
        .map(|(o, f)| (o.as_str(), f.as_str()))
        .collect();
    assert_eq!(got, expected);
    assert!(
        sent.is_empty(),
        "refused operations sent {:?}",
        sent.names()
    );
    assert_eq!(
        plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap(),
        before
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejects_plaintext_in_arrays_of_arrays() {
    let (client, _) = recording_client().await;
    let db = client.database(&unique_db_name("coll_validator_nested"));
    let schema = Schema::builder()
        .field("a.b", Field::deterministic("det"))
        .build()
        .unwrap();
    apply_validator(&db, "nested", &schema).await.unwrap();
    let plain = db.collection::<Document>("nested");
    for bad in [
        doc! { "a": [[{ "b": "plain" }]] },
        doc! { "a": [[[{ "b": "plain" }]]] },
        doc! { "a": [{ "c": 1 }, [{ "c": 2 }, [{ "b": "plain" }]]] },
        doc! { "a": [[[[{ "b": "plain" }]]]] },
        // Deeper than the validator follows: refused whatever it holds.
        doc! { "a": [[[[[{ "c": 1 }]]]]] },
    ] {
        let e = plain.insert_one(bad.clone()).await.unwrap_err();
        assert!(is_validation_failure(&e), "{bad}: {e}");
    }
    for fine in [
        doc! { "a": [[{ "c": 1 }], [1, 2]] },
        doc! { "a": [[[[{ "c": 1 }]]]] },
        doc! { "x": [[{ "b": "not on the path" }]] },
    ] {
        plain.insert_one(fine).await.unwrap();
    }
    // fieldcrypt's own writes through nested arrays pass the validator.
    let coll = EncryptedCollection::<Document>::new(plain.clone(), keyring(), schema);
    coll.insert_one(doc! { "_id": 1, "a": [[{ "b": "x" }], { "b": "y" }] })
        .await
        .unwrap();
    let stored = plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    let inner = stored.get_array("a").unwrap()[0].as_array().unwrap()[0]
        .as_document()
        .unwrap();
    assert_eq!(subtype(inner.get("b")), Some(ENVELOPE_SUBTYPE));
    let back = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(
        back.get_array("a").unwrap()[0].as_array().unwrap()[0]
            .as_document()
            .unwrap()
            .get_str("b")
            .unwrap(),
        "x"
    );
    db.drop().await.unwrap();
}
