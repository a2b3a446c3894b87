//! Migrating a Queryable Encryption collection to fieldcrypt in place, against a real server:
//! the audit classifies QE values, the rotation engine (`migrate_qe`) re-encrypts them with
//! fieldcrypt suites, resumably, with compare-and-set writes, and removes `__safeContent__`.
//!
//! The QE values are libmongocrypt's (`tests/fixtures/qe/`): unindexed values encrypted by
//! fieldcrypt under the fixture keys (libmongocrypt reads those, `tests/qe_fixtures.rs`), and
//! libmongocrypt's stored equality and range vectors.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::Arc;

use bson::{doc, Binary, Bson, Document, RawDocumentBuf};
use fieldcrypt::mongo::KeySource;
use fieldcrypt::rotation::{Audit, AuditFinding, Flow, RotationOptions, Rotator, Target};
use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Keyring, Schema, SAFE_CONTENT_FIELD};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{all_stored, Interop};
use mongodb::{Client, Collection};

const N: i64 = 120;

const QE: Interop = Interop::QE;

/// A keyring with a fieldcrypt key for the new schema and the QE fixture keys (as `Csfle`
/// keys: the same 96-byte key-vault keys).
fn keys() -> Arc<InMemoryKeyring> {
    let ring = QE.keyring("keys.jsonl");
    ring.generate("pii");
    Arc::new(ring)
}

/// libmongocrypt's stored vector `name` (`vectors.jsonl`).
fn vector(name: &str) -> Binary {
    let v = QE
        .lines("vectors.jsonl")
        .into_iter()
        .find(|v| v.get_str("name") == Ok(name))
        .unwrap_or_else(|| panic!("no vector {name}"));
    match v.get("ciphertext") {
        Some(Bson::Binary(b)) => b.clone(),
        other => panic!("{name}: {other:?}"),
    }
}

/// A `__safeContent__` tag: 32 bytes of `b`.
fn tag(b: u8) -> Bson {
    Bson::Binary(Binary {
        subtype: bson::spec::BinarySubtype::Generic,
        bytes: vec![b; 32],
    })
}

fn schema() -> Schema {
    Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .field("email", Field::deterministic("pii"))
        .field("age", Field::randomized("pii"))
        .build()
        .unwrap()
}

fn expected(i: i64) -> Document {
    doc! { "_id": i, "ssn": format!("ssn-{i}"), "email": "foo", "age": 123, "name": format!("n{i}") }
}

async fn all(coll: &Collection<RawDocumentBuf>) -> Vec<Document> {
    all_stored(coll)
        .await
        .iter()
        .map(|d| d.to_document().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_a_qe_collection_resumably_and_drops_safe_content() {
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("qe_migrate"));
    let coll = db.collection::<RawDocumentBuf>("people");
    let keys = keys();
    let set = QE.key_set("keys.jsonl");
    let qe_key = set.get_by_alt_name("qe-key-1").unwrap();
    let equality = vector("explicit-decrypt-FLE2IndexedEqualityEncryptedValueV2");
    let range = vector("explicit-decrypt-FLE2IndexedRangeEncryptedValueV2");
    let tags = Bson::Array(vec![tag(7)]);
    let mut docs = Vec::new();
    for i in 0..N {
        let mut d = doc! {
            "_id": i,
            "ssn": qe_key.encrypt_qe_unindexed(&Bson::String(format!("ssn-{i}"))).unwrap(),
            "email": equality.clone(),
            "age": range.clone(),
            "name": format!("n{i}"),
        };
        if i % 4 != 0 {
            d.insert(SAFE_CONTENT_FIELD, tags.clone());
        }
        docs.push(RawDocumentBuf::from_document(&d).unwrap());
    }
    // A QE value in a field the new schema does not name: that document fails alone.
    let stray = doc! {
        "_id": 1000i64, "ssn": qe_key.encrypt_qe_unindexed(&Bson::Int32(1)).unwrap(),
        "extra": qe_key.encrypt_qe_unindexed(&Bson::Int32(2)).unwrap(),
        SAFE_CONTENT_FIELD: tags.clone(),
    };
    docs.push(RawDocumentBuf::from_document(&stray).unwrap());
    coll.insert_many(docs).await.unwrap();
    let target = Target::new(&coll, schema());

    // The audit counts and classifies QE values, and calls none of them plaintext or malformed.
    let rep = Audit::new(keys.clone()).run(&target, |_| {}).await.unwrap();
    let n = u64::try_from(N).unwrap();
    assert_eq!(rep.documents, n + 1);
    assert_eq!(rep.qe_values.get("unindexed"), Some(&(n + 1)));
    assert_eq!(rep.qe_values.get("equality"), Some(&n));
    assert_eq!(rep.qe_values.get("range"), Some(&n));
    assert_eq!(rep.csfle_values, 0);
    assert_eq!(rep.safe_content_documents, n - n / 4 + 1);
    assert_eq!(rep.unreadable, 0);
    assert_eq!(rep.current, 0);
    for f in &rep.findings {
        match f {
            AuditFinding::Unmanaged {
                path, documents, ..
            } => {
                assert_eq!((path.as_str(), *documents), ("extra", 1));
            }
            AuditFinding::Plaintext { .. } | AuditFinding::Malformed { .. } => panic!("{f:?}"),
            _ => {}
        }
    }
    let qe_keys: u64 = rep.keys.iter().map(|k| k.qe).sum();
    assert_eq!(qe_keys, 3 * n + 2);

    let rotator = |o: RotationOptions| {
        Rotator::new(keys.clone())
            .checkpoint_collection(db.collection("checkpoints"))
            .options(o.batch_size(25))
    };
    // Re-encryption alone leaves QE documents (and their `__safeContent__`) to a migration.
    let before = all(&coll).await;
    let r = rotator(RotationOptions::default().job("reencrypt"))
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(r.stats().skipped, n + 1);
    assert_eq!(all(&coll).await, before);

    // The migration, stopped twice as a killed process would be, then resumed.
    let mut rewritten = 0;
    let mut failed = 0;
    let mut stops = 0;
    loop {
        let mut events = 0;
        let r = rotator(
            RotationOptions::default()
                .job("migrate-qe")
                .migrate_qe(true)
                .resume(true),
        )
        .run(std::slice::from_ref(&target), |_| {
            events += 1;
            if stops < 2 && events >= 3 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .await
        .unwrap();
        rewritten += r.stats().rewritten;
        failed += r.stats().failed;
        if !r.stopped {
            break;
        }
        stops += 1;
    }
    assert_eq!(stops, 2);
    assert_eq!((rewritten, failed), (n, 1));

    let cryptor = Cryptor::new(keys.clone(), schema());
    let ctx = Context::namespace(coll.namespace().to_string());
    let stored = all(&coll).await;
    for d in &stored {
        let id = d.get_i64("_id").unwrap();
        let raw = RawDocumentBuf::from_document(d).unwrap();
        if id == 1000 {
            // Left exactly as it was.
            assert_eq!(d, &stray);
            continue;
        }
        assert!(!d.contains_key(SAFE_CONTENT_FIELD), "{id}");
        // Only fieldcrypt's key is referenced: no QE value is left.
        let referenced = Cryptor::referenced_keys(&raw).unwrap();
        assert_eq!(referenced, [keys.primary("pii").unwrap().id()], "{id}");
        let plain = cryptor.decrypt_document(d, &ctx).unwrap();
        assert_eq!(plain, expected(id), "{id}");
    }
    // A fresh run finds every migrated document current.
    let r = Rotator::new(keys.clone())
        .options(RotationOptions::default().migrate_qe(true))
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!((r.stats().current, r.stats().failed), (n, 1));
    let rep = Audit::new(keys.clone()).run(&target, |_| {}).await.unwrap();
    // The stray document: its managed value, and both values under their key.
    assert_eq!(rep.qe_values.values().sum::<u64>(), 1);
    assert_eq!(rep.keys.iter().map(|k| k.qe).sum::<u64>(), 2);
    assert_eq!(rep.safe_content_documents, 1);
    db.drop().await.unwrap();
}

/// With the keys in a MongoDB key vault, indexed values whose inner key differs from the outer
/// one (libmongocrypt's `iev-v2` vectors) migrate: the engine fetches the inner keys in a
/// second round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_fetches_inner_keys_from_the_key_vault() {
    use fieldcrypt::mongo::{KeyVault, LocalKek};
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("qe_migrate_kv"));
    let ns = format!("{}.datakeys", db.name());
    let key_docs = QE.lines("vector-keys.jsonl");
    db.collection::<Document>("datakeys")
        .insert_many(key_docs)
        .await
        .unwrap();
    let kek = Arc::new(LocalKek::new(QE.master_key()));
    let vault = Arc::new(
        KeyVault::builder(&client, kek)
            .namespace(ns.as_str())
            .build()
            .unwrap(),
    );
    vault.create_key("pii").await.unwrap();
    let coll = db.collection::<RawDocumentBuf>("people");
    let equality = vector("iev-v2-FLECrudTest-insertOneV2");
    let range = vector("iev-v2-FLECrudTest-insertOneRangeV2");
    let docs: Vec<RawDocumentBuf> = (0..10i64)
        .map(|i| {
            RawDocumentBuf::from_document(&doc! {
                "_id": i, "email": equality.clone(), "age": range.clone(),
                SAFE_CONTENT_FIELD: [tag(1)],
            })
            .unwrap()
        })
        .collect();
    coll.insert_many(docs).await.unwrap();
    let target = Target::new(&coll, schema());
    let r = Rotator::new(vault.clone())
        .options(RotationOptions::default().migrate_qe(true))
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(
        (r.stats().rewritten, r.stats().failed),
        (10, 0),
        "{:?}",
        r.targets[0].failures
    );
    vault.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let cryptor = Cryptor::new(vault.clone(), schema());
    let ctx = Context::namespace(coll.namespace().to_string());
    for d in all(&coll).await {
        let raw = RawDocumentBuf::from_document(&d).unwrap();
        vault
            .prefetch_ids(&Cryptor::referenced_keys(&raw).unwrap())
            .await
            .unwrap();
        let plain = cryptor.decrypt_document(&d, &ctx).unwrap();
        assert_eq!(plain.get_str("email").unwrap(), "secret");
        assert_eq!(plain.get_i32("age").unwrap(), 5);
        assert!(!plain.contains_key(SAFE_CONTENT_FIELD));
    }
    db.drop().await.unwrap();
}

/// A QE application keeps writing while the migration runs: after each batch is read, some of
/// its documents get a new QE value and a new `__safeContent__` tag, or only a new tag.
/// Compare-and-set writes (which pin `__safeContent__` too) see each change, re-read the
/// document and migrate what is there then: no write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_qe_writes_are_not_lost() {
    use fieldcrypt::rotation::Phase;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("qe_migrate_cas"));
    let coll = db.collection::<RawDocumentBuf>("people");
    let keys = keys();
    let set = QE.key_set("keys.jsonl");
    let qe_key = set.get_by_alt_name("qe-key-2").unwrap();
    let equality = vector("explicit-decrypt-FLE2IndexedEqualityEncryptedValueV2");
    let range = vector("explicit-decrypt-FLE2IndexedRangeEncryptedValueV2");
    let n = 60i64;
    let docs: Vec<RawDocumentBuf> = (0..n)
        .map(|i| {
            RawDocumentBuf::from_document(&doc! {
                "_id": i,
                "ssn": qe_key.encrypt_qe_unindexed(&Bson::String(format!("ssn-{i}"))).unwrap(),
                "email": equality.clone(), "age": range.clone(), "name": format!("n{i}"),
                SAFE_CONTENT_FIELD: [tag(1)],
            })
            .unwrap()
        })
        .collect();
    coll.insert_many(docs).await.unwrap();
    let app = db.collection::<Document>("people");
    let handle = tokio::runtime::Handle::current();
    let reads = AtomicUsize::new(0);
    let forced = AtomicUsize::new(0);
    let batch = 20i64;
    let target = Target::new(&coll, schema());
    let r = Rotator::new(keys.clone())
        .options(RotationOptions::default().migrate_qe(true).batch_size(20))
        .run(std::slice::from_ref(&target), |p| {
            if p.phase == Phase::BatchRead {
                let start = i64::try_from(reads.fetch_add(1, Ordering::Relaxed)).unwrap() * batch;
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        for i in (start..(start + batch).min(n)).step_by(5) {
                            // Every tenth a new value and tag; the others a new tag only, which
                            // the `$unset` of `__safeContent__` must not remove unseen.
                            let update = if i % 10 == 0 {
                                let ssn = qe_key
                                    .encrypt_qe_unindexed(&Bson::String(format!("new-{i}")))
                                    .unwrap();
                                doc! { "$set": { "ssn": ssn }, "$push": { SAFE_CONTENT_FIELD: tag(2) } }
                            } else {
                                doc! { "$push": { SAFE_CONTENT_FIELD: tag(3) } }
                            };
                            app.update_one(doc! { "_id": i }, update).await.unwrap();
                            forced.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                });
            }
            Flow::Continue
        })
        .await
        .unwrap();
    let s = r.stats();
    assert_eq!(s.failed, 0, "{:?}", r.targets[0].failures);
    assert_eq!(s.rewritten, u64::try_from(n).unwrap());
    let forced = u64::try_from(forced.load(Ordering::Relaxed)).unwrap();
    assert!(
        forced >= 12 && s.conflicts >= forced,
        "{s:?}, forced {forced}"
    );
    let cryptor = Cryptor::new(keys.clone(), schema());
    let ctx = Context::namespace(coll.namespace().to_string());
    for d in all(&coll).await {
        let i = d.get_i64("_id").unwrap();
        assert!(!d.contains_key(SAFE_CONTENT_FIELD), "{i}");
        let plain = cryptor.decrypt_document(&d, &ctx).unwrap();
        let want = if i % 10 == 0 {
            format!("new-{i}")
        } else {
            format!("ssn-{i}")
        };
        assert_eq!(plain.get_str("ssn").unwrap(), want, "{i}");
    }
    db.drop().await.unwrap();
}
