//! Owner scoping (IDOR protection) and per-tenant keys, against a real MongoDB wire-protocol
//! server: a scoped handle never returns, changes, counts or deletes another owner's
//! documents; a ciphertext copied from another owner's document does not decrypt; destroying
//! one tenant's keys makes exactly that tenant's data unreadable (crypto-shredding).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bson::{doc, Bson, Document};
use fieldcrypt::mongo::{tenant_aliases, EncryptedCollection};
use fieldcrypt::{
    ArgumentError, BlindIndex, Cryptor, Error, Field, InMemoryKeyring, Keyring, Schema,
};
use fieldcrypt_testkit::devserver::unique_db_name;
use fieldcrypt_testkit::fixtures::{keyring_with, recording_client, Sent};
use futures_util::{StreamExt, TryStreamExt};
use mongodb::Database;

fn schema() -> Schema {
    Schema::builder()
        .owner_field("tenant")
        .field("email", Field::deterministic("det"))
        .field(
            "name",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
        )
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap()
}

async fn db(prefix: &str) -> (Database, Sent) {
    let (client, sent) = recording_client().await;
    (client.database(&unique_db_name(prefix)), sent)
}

fn person(id: i32, tenant: Option<&str>, email: &str) -> Document {
    let mut d = doc! { "_id": id, "email": email, "name": format!("Person {id}"), "ssn": format!("ssn-{id}") };
    if let Some(t) = tenant {
        d.insert("tenant", t);
    }
    d
}

async fn ids_of(cursor: fieldcrypt::mongo::EncryptedCursor<'_, Document>) -> Vec<i32> {
    let docs: Vec<Document> = cursor.try_collect().await.unwrap();
    let mut ids: Vec<i32> = docs.iter().map(|d| d.get_i32("_id").unwrap()).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_handle_never_reaches_another_owners_documents() {
    let (db, sent) = db("owner_scope").await;
    let ring = keyring_with(&["det", "pii", "idx"]);
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    );
    let acme = all.scoped("acme").unwrap();
    let globex = all.scoped("globex").unwrap();
    // The owner is added when missing; the same e-mail exists for both owners.
    acme.insert_many([person(1, None, "shared@x"), person(2, Some("acme"), "a@x")])
        .await
        .unwrap();
    globex
        .insert_many([person(3, None, "shared@x"), person(4, None, "g@x")])
        .await
        .unwrap();
    // A document naming another owner is refused by a scoped handle.
    let e = acme
        .insert_one(person(5, Some("globex"), "evil@x"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedQuery { ref field, .. } if field == "tenant"),
        "{e:?}"
    );

    sent.clear();
    assert_eq!(ids_of(acme.find(doc! {}).await.unwrap()).await, [1, 2]);
    assert_eq!(
        ids_of(acme.find(doc! { "email": "shared@x" }).await.unwrap()).await,
        [1]
    );
    assert_eq!(
        ids_of(globex.find(doc! { "email": "shared@x" }).await.unwrap()).await,
        [3]
    );
    assert_eq!(
        ids_of(acme.find(doc! { "name": "Person 3" }).await.unwrap()).await,
        Vec::<i32>::new()
    );
    // Naming the other owner in the filter does not widen the scope.
    assert_eq!(
        ids_of(acme.find(doc! { "tenant": "globex" }).await.unwrap()).await,
        Vec::<i32>::new()
    );
    assert_eq!(
        ids_of(
            acme.find(doc! { "$or": [ { "tenant": "globex" }, { "_id": 3 } ] })
                .await
                .unwrap()
        )
        .await,
        Vec::<i32>::new()
    );
    assert_eq!(acme.find_one(doc! { "_id": 3 }).await.unwrap(), None);
    assert_eq!(acme.count_documents(doc! {}).await.unwrap(), 2);
    assert_eq!(
        ids_of(acme.aggregate([doc! { "$match": {} }]).await.unwrap()).await,
        [1, 2]
    );
    let r = acme
        .update_many(doc! {}, doc! { "$set": { "plan": "gold" } })
        .await
        .unwrap();
    assert_eq!(r.matched_count, 2);
    let r = acme
        .update_one(doc! { "_id": 3 }, doc! { "$set": { "name": "hijacked" } })
        .await
        .unwrap();
    assert_eq!(r.matched_count, 0);
    assert_eq!(
        acme.find_one_and_update(doc! { "_id": 4 }, doc! { "$set": { "plan": "x" } })
            .await
            .unwrap(),
        None
    );
    let r = acme
        .replace_one(doc! { "_id": 4 }, person(4, None, "stolen@x"))
        .await
        .unwrap();
    assert_eq!(r.matched_count, 0);
    let r = acme
        .delete_many(doc! { "email": "shared@x" })
        .await
        .unwrap();
    assert_eq!(r.deleted_count, 1);
    let r = acme.delete_one(doc! { "_id": 4 }).await.unwrap();
    assert_eq!(r.deleted_count, 0);
    // Stages that read around the owner filter are refused.
    assert!(acme
        .aggregate([doc! { "$unionWith": "people" }])
        .await
        .is_err());
    assert!(acme
        .aggregate([doc! { "$lookup": { "from": "people", "localField": "x", "foreignField": "x", "as": "all" } }])
        .await
        .is_err());

    // Every read, update, delete, count and aggregate acme sent carried its owner filter.
    let cmds: Vec<(String, String)> = sent
        .commands()
        .into_iter()
        .map(|(name, body)| {
            (
                name,
                Bson::Document(body).into_relaxed_extjson().to_string(),
            )
        })
        .collect();
    let scoped: Vec<_> = cmds
        .iter()
        .filter(|(name, _)| {
            ["find", "aggregate", "update", "delete", "findAndModify"].contains(&name.as_str())
        })
        .collect();
    assert!(scoped.len() >= 12, "{cmds:?}");
    for (name, json) in &scoped {
        assert!(
            json.contains(r#""tenant":"acme""#) || json.contains(r#""tenant":"globex""#),
            "{name} without an owner filter: {json}"
        );
    }

    // globex's documents are untouched.
    let g: Vec<Document> = globex
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(g.len(), 2);
    assert!(g.iter().all(|d| !d.contains_key("plan")));
    assert_eq!(
        g.iter()
            .find(|d| d.get_i32("_id").unwrap() == 3)
            .unwrap()
            .get_str("name")
            .unwrap(),
        "Person 3"
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_a_ciphertext_copied_from_another_owner_does_not_decrypt() {
    let (db, _) = db("owner_copy").await;
    let ring = keyring_with(&["det", "pii", "idx"]);
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    );
    let acme = all.scoped("acme").unwrap();
    let globex = all.scoped("globex").unwrap();
    acme.insert_one(person(1, None, "same@x")).await.unwrap();
    globex.insert_one(person(2, None, "same@x")).await.unwrap();

    let plain = db.collection::<Document>("people");
    let a = plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    let g = plain.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    // Deterministic ciphertexts are bound to the owner: equal e-mails, different ciphertexts.
    assert_ne!(a.get("email"), g.get("email"));

    // An attacker with write access copies globex's ssn (and e-mail) into an acme document.
    for field in ["ssn", "email"] {
        plain
            .update_one(
                doc! { "_id": 1 },
                doc! { "$set": { field: g.get(field).unwrap().clone() } },
            )
            .await
            .unwrap();
        let e = acme.find_one(doc! { "_id": 1 }).await.unwrap_err();
        assert!(matches!(e, Error::Decrypt), "{field}: {e:?}");
        plain
            .update_one(
                doc! { "_id": 1 },
                doc! { "$set": { field: a.get(field).unwrap().clone() } },
            )
            .await
            .unwrap();
    }
    // ... or relabels globex's whole document as acme's.
    plain
        .update_one(doc! { "_id": 2 }, doc! { "$set": { "tenant": "acme" } })
        .await
        .unwrap();
    let items: Vec<_> = acme.find(doc! {}).await.unwrap().collect().await;
    assert_eq!(items.len(), 2);
    assert!(
        items
            .iter()
            .filter(|r| matches!(r, Err(Error::Decrypt)))
            .count()
            == 1
    );
    // The restored document decrypts again.
    let back = acme.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(back.get_str("email").unwrap(), "same@x");
    assert_eq!(back.get_str("ssn").unwrap(), "ssn-1");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unscoped_handles_bind_the_owner_from_the_filter() {
    let (db, _) = db("owner_unscoped").await;
    let ring = keyring_with(&["det", "pii", "idx"]);
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    );
    all.insert_many([
        person(1, Some("acme"), "x@x"),
        person(2, Some("globex"), "x@x"),
    ])
    .await
    .unwrap();
    assert!(matches!(
        all.insert_one(person(3, None, "nobody@x")).await,
        Err(Error::MissingContext(_))
    ));
    // Without an _id (and no _id-bound field) the driver assigns one, as usual.
    let r = all
        .insert_one(doc! { "tenant": "acme", "email": "noid@x" })
        .await
        .unwrap();
    assert!(matches!(r.inserted_id, Bson::ObjectId(_)));
    let got = all
        .find_one(doc! { "tenant": "acme", "email": "noid@x" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.get("_id"), Some(&r.inserted_id));
    // Deterministic equality needs to know whose ciphertext to look for.
    assert!(matches!(
        all.find(doc! { "email": "x@x" }).await,
        Err(Error::MissingContext(_))
    ));
    assert_eq!(
        ids_of(
            all.find(doc! { "tenant": "globex", "email": "x@x" })
                .await
                .unwrap()
        )
        .await,
        [2]
    );
    // Blind indexes are not owner-bound: an admin can search across owners.
    assert_eq!(
        ids_of(
            all.find(doc! { "name": { "$in": ["Person 1", "Person 2"] } })
                .await
                .unwrap()
        )
        .await,
        [1, 2]
    );
    // Distinct values of a deterministic field: per owner, never across owners.
    assert!(matches!(
        all.distinct("email", doc! {}).await,
        Err(Error::MissingContext(_))
    ));
    assert_eq!(
        all.distinct("email", doc! { "tenant": "globex" })
            .await
            .unwrap(),
        [Bson::from("x@x")]
    );
    let acme = all.scoped("acme").unwrap();
    let mut acme_emails = acme.distinct("email", doc! {}).await.unwrap();
    acme_emails.sort_by_key(ToString::to_string);
    assert_eq!(acme_emails, [Bson::from("noid@x"), Bson::from("x@x")]);
    // A scoped handle does not reach another owner's document by `_id` either.
    assert_eq!(acme.distinct("_id", doc! { "_id": 2 }).await.unwrap(), []);
    assert!(acme
        .find_one_and_replace(doc! { "_id": 2 }, person(2, Some("acme"), "taken@x"))
        .await
        .unwrap()
        .is_none());
    assert!(acme
        .find_one_and_delete(doc! { "_id": 2 })
        .await
        .unwrap()
        .is_none());
    let globex = all.scoped("globex").unwrap();
    assert_eq!(
        globex
            .find_one(doc! { "_id": 2 })
            .await
            .unwrap()
            .unwrap()
            .get_str("email")
            .unwrap(),
        "x@x"
    );
    let unowned = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring,
        Schema::builder()
            .field("ssn", Field::randomized("pii"))
            .build()
            .unwrap(),
    );
    assert!(matches!(
        unowned.scoped("acme"),
        Err(Error::InvalidArgument(ArgumentError::NoOwnerField))
    ));
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_keys_crypto_shred_one_tenant() {
    let (db, _) = db("owner_tenant_keys").await;
    let ring = Arc::new(InMemoryKeyring::new());
    let schema = schema();
    for tenant in ["acme", "globex"] {
        for alias in tenant_aliases(&schema, tenant).unwrap() {
            ring.generate(&alias);
        }
    }
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema,
    )
    .per_tenant_keys()
    .unwrap();
    let acme = all.scoped("acme").unwrap();
    let globex = all.scoped("globex").unwrap();
    acme.insert_many((1..=3).map(|i| person(i, None, &format!("a{i}@x"))))
        .await
        .unwrap();
    globex
        .insert_many((4..=6).map(|i| person(i, None, &format!("g{i}@x"))))
        .await
        .unwrap();
    // Without a tenant there are no keys to use.
    assert!(matches!(
        all.find(doc! {}).await,
        Err(Error::MissingContext(_))
    ));

    // Each tenant's ciphertexts are under that tenant's keys.
    let plain = db.collection::<bson::RawDocumentBuf>("people");
    let stored = plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    for id in Cryptor::referenced_keys(&stored).unwrap() {
        assert!(ring.key(&id).unwrap().alias().ends_with("/acme"));
    }
    assert_eq!(
        ids_of(acme.find(doc! { "email": "a2@x" }).await.unwrap()).await,
        [2]
    );
    assert_eq!(
        ids_of(acme.find(doc! { "name": "Person 3" }).await.unwrap()).await,
        [3]
    );

    // Crypto-shredding: destroy every key of acme.
    for key in ring.keys() {
        if key.alias().ends_with("/acme") {
            ring.destroy(&key.id()).unwrap();
        }
    }
    let items: Vec<_> = acme.find(doc! {}).await.unwrap().collect().await;
    assert_eq!(items.len(), 3);
    for item in &items {
        assert!(matches!(item, Err(Error::KeyDestroyed(_))), "{item:?}");
    }
    // Nothing readable by other means either: no key left can open the ciphertexts.
    let raw = plain.find_one(doc! { "_id": 2 }).await.unwrap().unwrap();
    let any = Cryptor::decrypt_only(ring.clone());
    assert!(any
        .decrypt_raw(
            &raw,
            &fieldcrypt::Context::namespace(acme.namespace()).with_owner_field("tenant")
        )
        .is_err());
    assert!(acme.insert_one(person(7, None, "new@x")).await.is_err());
    // globex is unaffected.
    let g: Vec<Document> = globex
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(g.len(), 3);
    assert_eq!(
        ids_of(globex.find(doc! { "email": "g5@x" }).await.unwrap()).await,
        [5]
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_update_pipelines_cannot_write_plaintext_or_move_a_document_to_another_owner() {
    let (db, sent) = db("owner_pipeline").await;
    let ring = keyring_with(&["det", "pii", "idx"]);
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    );
    let acme = all.scoped("acme").unwrap();
    acme.insert_one(person(1, None, "a@x")).await.unwrap();
    let plain = db.collection::<Document>("people");
    let before = plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    sent.clear();

    let pipelines: Vec<(Vec<Document>, &str)> = vec![
        (
            vec![
                doc! { "$replaceWith": { "$literal": { "_id": 1, "ssn": "123-45-6789", "tenant": "globex" } } },
            ],
            "$replaceWith",
        ),
        (
            vec![
                doc! { "$replaceWith": { "$arrayToObject": [[["ssn", "123-45-6789"], ["tenant", "acme"]]] } },
            ],
            "$replaceWith",
        ),
        (
            vec![
                doc! { "$replaceRoot": { "newRoot": { "$mergeObjects": [{ "tenant": "acme" }, { "ssn": "123-45-6789" }] } } },
            ],
            "$replaceRoot",
        ),
        (
            vec![doc! { "$set": { "x": { "$literal": { "ssn": "123-45-6789" } } } }],
            "$set",
        ),
        (vec![doc! { "$unset": "tenant" }], "$unset"),
        (vec![doc! { "$unset": ["plan", "tenant"] }], "$unset"),
        (vec![doc! { "$unset": "name_bidx" }], "$unset"),
        (vec![doc! { "$project": { "plan": 1 } }], "$project"),
    ];
    for (pipeline, op) in pipelines {
        for unscoped in [false, true] {
            let handle = if unscoped { &all } else { &acme };
            let e = handle
                .update_one(doc! { "_id": 1, "tenant": "acme" }, pipeline.clone())
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::UnsupportedQuery { ref operator, .. } if operator == op),
                "{pipeline:?}: {e:?}"
            );
        }
    }
    // The plaintext is not sent either when it hides behind a computed field name.
    let e = acme
        .find(doc! { "$expr": { "$eq": [{ "$getField": { "$literal": "ssn" } }, "123-45-6789"] } })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedQuery { ref field, .. } if field == "ssn"),
        "{e:?}"
    );
    assert!(
        sent.is_empty(),
        "refused operations sent {:?}",
        sent.commands()
    );
    assert_eq!(
        plain.find_one(doc! { "_id": 1 }).await.unwrap().unwrap(),
        before
    );
    // Pipelines over plain fields still work, and the document still decrypts.
    acme.update_one(
        doc! { "_id": 1 },
        vec![
            doc! { "$set": { "plan": { "$literal": "$gold" } } },
            doc! { "$unset": "old" },
        ],
    )
    .await
    .unwrap();
    let d = acme.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    assert_eq!(d.get_str("plan").unwrap(), "$gold");
    assert_eq!(d.get_str("ssn").unwrap(), "ssn-1");
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_keys_of_owners_of_different_types_are_separate() {
    let (db, _) = db("owner_tenant_types").await;
    let ring = Arc::new(InMemoryKeyring::new());
    let all = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    )
    .per_tenant_keys()
    .unwrap();
    let oid = bson::oid::ObjectId::new();
    // MongoDB tells these owners apart: a filter on one does not match the others.
    let owners = [
        Bson::String("123".into()),
        Bson::Int32(123),
        Bson::ObjectId(oid),
        Bson::String(oid.to_hex()),
        Bson::String("int:123".into()),
    ];
    let handles: Vec<_> = owners
        .iter()
        .map(|o| all.scoped(o.clone()).unwrap())
        .collect();
    let mut seen: Vec<String> = Vec::new();
    for h in &handles {
        for alias in h.key_aliases() {
            assert!(!seen.contains(alias), "{alias} shared between owners");
            ring.generate(alias);
        }
        seen.extend(h.key_aliases().iter().cloned());
    }
    // A string owner keeps the label it always had (its keys are `<alias>/<owner>`).
    assert!(handles[0].key_aliases().contains(&"pii/123".to_owned()));
    // Int32 and Int64 owners of one value are one owner to MongoDB's filters: one tenant.
    let long = all.scoped(Bson::Int64(123)).unwrap();
    assert_eq!(long.key_aliases(), handles[1].key_aliases());

    for (i, h) in (1..).zip(&handles) {
        h.insert_one(person(i, None, "same@x")).await.unwrap();
    }
    // Shredding the string owner "123" leaves the integer owner 123 (and the others) readable.
    for alias in handles[0].key_aliases() {
        for key in ring.keys() {
            if key.alias() == alias {
                ring.destroy(&key.id()).unwrap();
            }
        }
    }
    assert!(matches!(
        handles[0].find_one(doc! {}).await,
        Err(Error::KeyDestroyed(_))
    ));
    for h in &handles[1..] {
        let d = h
            .find_one(doc! { "email": "same@x" })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.get_str("email").unwrap(), "same@x");
    }
    db.drop().await.unwrap();
}
