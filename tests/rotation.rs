//! The re-encryption engine against a real server: kill-and-resume at random points, an
//! application writing during the run, partitions, migrations, failures, the audit.
//!
//! Sized for SecantusDB (about 1,300 compare-and-set updates per second): a few thousand
//! documents in all.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // small test counts

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document, RawDocumentBuf};
use fieldcrypt::rotation::{
    Audit, AuditFinding, AuditOptions, Flow, Partition, Phase, Report, RotationOptions, Rotator,
    Stats, Target, TokenKind,
};
use fieldcrypt::{
    BlindIndex, Context, Cryptor, CsfleAlgorithm, CsfleDataKey, Field, InMemoryKeyring, Key,
    KeyKind, KeyMaterial, KeyState, Keyring, LocalMasterKey, Schema, Suite,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::all_stored;
use mongodb::{Client, Collection, Database};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

async fn database(prefix: &str) -> (Client, Database) {
    let server = DevServer::shared().unwrap();
    let client = Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name(prefix));
    (client, db)
}

fn keys() -> Arc<InMemoryKeyring> {
    let k = InMemoryKeyring::new();
    k.generate("pii");
    k.generate("idx");
    Arc::new(k)
}

fn schema() -> Schema {
    Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .field("profile.email", Field::deterministic("pii"))
        .field(
            "tags.$[]",
            Field::randomized("pii").suite(Suite::XChaCha20Poly1305),
        )
        .field(
            "phone",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
        )
        .build()
        .unwrap()
}

fn plain(i: i64) -> Document {
    doc! {
        "_id": i,
        "ssn": format!("{:03}-{:02}-{:04}", i % 1000, i % 100, i),
        "profile": { "email": format!("user{i}@example.com"), "name": format!("User {i}") },
        "tags": ["a", format!("t{}", i % 7)],
        "phone": format!("+1555{i:07}"),
        "n": 0i64,
    }
}

fn ctx(coll: &Collection<RawDocumentBuf>) -> Context {
    Context::namespace(coll.namespace().to_string())
}

async fn insert_encrypted(
    coll: &Collection<RawDocumentBuf>,
    cryptor: &Cryptor,
    docs: impl IntoIterator<Item = Document>,
) {
    let ctx = ctx(coll);
    let raw: Vec<RawDocumentBuf> = docs
        .into_iter()
        .map(|d| {
            cryptor
                .encrypt_raw(&RawDocumentBuf::from_document(&d).unwrap(), &ctx)
                .unwrap()
        })
        .collect();
    for chunk in raw.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
    }
}

/// Every document decrypts, references only the current primaries, and (when given) holds
/// exactly the expected plaintext.
fn check_current(
    docs: &[RawDocumentBuf],
    cryptor: &Cryptor,
    ctx: &Context,
    keys: &dyn Keyring,
    expected: Option<&dyn Fn(&Bson) -> Document>,
) {
    let primaries = [
        keys.primary("pii").unwrap().id(),
        keys.primary("idx").unwrap().id(),
    ];
    for d in docs {
        for k in Cryptor::referenced_keys(d).unwrap() {
            assert!(
                primaries.contains(&k),
                "stale key {k} in {:?}",
                d.get("_id")
            );
        }
        let got = cryptor.decrypt_raw(d, ctx).unwrap().to_document().unwrap();
        if let Some(expected) = expected {
            let mut got = got;
            got.remove("phone_bidx");
            let want = expected(got.get("_id").unwrap());
            assert_eq!(got, want);
        }
    }
}

fn sum(reports: &[Report]) -> Stats {
    let mut s = Stats::default();
    for r in reports {
        let t = r.stats();
        s.scanned += t.scanned;
        s.rewritten += t.rewritten;
        s.current += t.current;
        s.conflicts += t.conflicts;
        s.failed += t.failed;
        s.skipped += t.skipped;
    }
    s
}

fn seed() -> u64 {
    std::env::var("FIELDCRYPT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_points_then_resumed_rewrites_every_document_exactly_once() {
    const N: i64 = 2000;
    let (_client, db) = database("rot_kill").await;
    let coll = db.collection::<RawDocumentBuf>("people");
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    insert_encrypted(&coll, &cryptor, (0..N).map(plain)).await;

    let old_pii = keys.primary("pii").unwrap().id();
    keys.rotate("pii");
    keys.rotate("idx");

    let seed = seed();
    eprintln!("seed {seed} (set FIELDCRYPT_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let target = Target::new(&coll, schema());
    let rotator = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(RotationOptions::default().batch_size(97).resume(true));

    let mut reports = Vec::new();
    let mut stops = 0;
    loop {
        // Stop after a random number of progress events: before a batch's writes, after them
        // but before its checkpoint, or after the checkpoint.
        let stop_after = rng.gen_range(1..12usize);
        let mut events = 0;
        let mut phases = Vec::new();
        let report = rotator
            .run(std::slice::from_ref(&target), |p| {
                events += 1;
                phases.push(p.phase);
                if events >= stop_after && p.phase != Phase::Finished {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            })
            .await
            .unwrap();
        let stopped = report.stopped;
        reports.push(report);
        if stopped {
            stops += 1;
            assert!(stops < 200, "no progress");
            continue;
        }
        break;
    }
    assert!(stops >= 5, "only {stops} stops");
    let total = sum(&reports);
    assert_eq!(total.rewritten, N as u64, "{total:?}");
    assert_eq!(total.failed, 0);
    assert_eq!(total.conflicts, 0);
    assert!(reports.last().unwrap().complete());
    assert!(reports[1..].iter().any(|r| r.targets[0].resumed));

    let docs = all_stored(&coll).await;
    assert_eq!(docs.len(), N as usize);
    let c = ctx(&coll);
    check_current(
        &docs,
        &cryptor,
        &c,
        keys.as_ref(),
        Some(&|id| plain(id.as_i64().unwrap())),
    );
    assert!(keys.key(&old_pii).unwrap().state() == KeyState::Active);

    // Resuming a finished job does nothing; a fresh run finds every document current.
    let again = rotator
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(again.stats().scanned, 0);
    assert!(again.complete());
    let fresh = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(RotationOptions::default().batch_size(500));
    let r = fresh
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(r.stats().scanned, N as u64);
    assert_eq!(r.stats().current, N as u64);
    assert_eq!(r.stats().rewritten, 0);
    assert_eq!(
        all_stored(&coll).await,
        docs,
        "a second run changed documents"
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_writes_during_reencryption_are_never_lost() {
    const N: i64 = 600;
    let (_client, db) = database("rot_writer").await;
    let coll = db.collection::<RawDocumentBuf>("people");
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    insert_encrypted(&coll, &cryptor, (0..N).map(plain)).await;
    // The application's cryptor still has the old keys for part of the run: it writes values
    // under the old primary, as an application that has not reloaded its keyring does.
    let app_keys = Arc::new(InMemoryKeyring::from_keyset_json(&keys.to_keyset_json()).unwrap());
    let app = Cryptor::new(app_keys.clone(), schema());
    keys.rotate("pii");
    keys.rotate("idx");
    let c = ctx(&coll);

    // The expected final state of every document the writer touched. The lock is held across
    // each write, so that the expectation follows the order of the writes.
    let expected: Arc<tokio::sync::Mutex<HashMap<i64, Document>>> =
        Arc::new(tokio::sync::Mutex::new(HashMap::new()));
    let write = {
        let coll = coll.clone();
        let app = app.clone();
        let c = c.clone();
        let expected = expected.clone();
        move |i: i64, change_secret: bool, round: u64| {
            let coll = coll.clone();
            let app = app.clone();
            let c = c.clone();
            let expected = expected.clone();
            async move {
                let mut expected = expected.lock().await;
                // Counter always; sometimes a new encrypted value.
                coll.update_one(doc! { "_id": i }, doc! { "$inc": { "n": 1 } })
                    .await
                    .unwrap();
                let mut want = expected.get(&i).cloned().unwrap_or_else(|| plain(i));
                want.insert("n", want.get_i64("n").unwrap() + 1);
                if change_secret {
                    let ssn = format!("new-{i}-{round}");
                    let v = app
                        .encrypt_value("ssn", &Bson::String(ssn.clone()), &c, None, None)
                        .unwrap();
                    coll.update_one(doc! { "_id": i }, doc! { "$set": { "ssn": v } })
                        .await
                        .unwrap();
                    want.insert("ssn", ssn);
                }
                expected.insert(i, want);
            }
        }
    };

    // Deterministic conflicts: when a batch has been read, change some of its documents
    // before the engine writes them.
    let batch = 40i64;
    let reads = AtomicUsize::new(0);
    let forced = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    // And a background writer for the whole run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let background = {
        let write = write.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let mut round = 1000;
            while !stop.load(Ordering::Relaxed) {
                let i = rng.gen_range(0..N);
                round += 1;
                write(i, rng.gen_bool(0.5), round).await;
            }
        })
    };
    let rotator = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(RotationOptions::default().batch_size(batch as usize));
    let report = rotator
        .run(&[Target::new(&coll, schema())], |p| {
            if p.phase == Phase::BatchRead {
                let k = reads.fetch_add(1, Ordering::Relaxed) as i64;
                let start = k * batch;
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        for i in (start..(start + batch).min(N)).step_by(7) {
                            write(i, true, k as u64).await;
                            forced.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                });
            }
            Flow::Continue
        })
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    let s = report.stats();
    eprintln!("{s:?}");
    assert_eq!(s.failed, 0, "{:?}", report.targets[0].failures);
    assert!(
        s.conflicts >= forced.load(Ordering::Relaxed) as u64,
        "{s:?}, forced {}",
        forced.load(Ordering::Relaxed)
    );
    assert_eq!(s.scanned, N as u64);

    // Values the background writer put under the old key after the engine passed them are
    // the application's doing; a second pass (what the rotation procedure does once every
    // application has the new keys) brings them up.
    let second = rotator
        .run(&[Target::new(&coll, schema())], |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(second.stats().failed, 0);

    let expected = expected.lock().await.clone();
    let docs = all_stored(&coll).await;
    assert_eq!(docs.len(), N as usize);
    check_current(
        &docs,
        &cryptor,
        &c,
        keys.as_ref(),
        Some(&|id| {
            let i = id.as_i64().unwrap();
            expected.get(&i).cloned().unwrap_or_else(|| plain(i))
        }),
    );
    let _ = app_keys;
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_partitions_cover_every_document_exactly_once() {
    let (_client, db) = database("rot_parts").await;
    let coll = db.collection::<RawDocumentBuf>("mixed");
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    // Mixed `_id` types: the walk must cross MongoDB's type brackets.
    let mut docs = Vec::new();
    for i in 0..500i64 {
        docs.push(plain(i));
        let mut s = plain(i);
        s.insert("_id", format!("s{i:04}"));
        docs.push(s);
        let mut o = plain(i);
        o.insert("_id", bson::oid::ObjectId::new());
        docs.push(o);
    }
    insert_encrypted(&coll, &cryptor, docs.clone()).await;
    keys.rotate("pii");
    keys.rotate("idx");

    let run = |p: Partition| {
        let keys = keys.clone();
        let target = Target::new(&coll, schema());
        let cp = db.collection("checkpoints");
        async move {
            Rotator::new(keys)
                .checkpoint_collection(cp)
                .options(RotationOptions::default().batch_size(64).partition(p))
                .run(&[target], |_| Flow::Continue)
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(
        run(Partition::hash(0, 2).unwrap()),
        run(Partition::hash(1, 2).unwrap())
    );
    let (a, b) = (a.stats(), b.stats());
    eprintln!("{a:?}\n{b:?}");
    assert!(a.rewritten > 300 && b.rewritten > 300);
    assert_eq!(a.rewritten + b.rewritten, 1500);
    assert_eq!(a.scanned + b.scanned, 1500);
    assert_eq!(a.conflicts + b.conflicts, 0);
    let stored = all_stored(&coll).await;
    assert_eq!(stored.len(), 1500);
    check_current(&stored, &cryptor, &ctx(&coll), keys.as_ref(), None);

    // `_id` ranges partition too (here: the integer `_id`s in two ranges).
    keys.rotate("pii");
    let range = |from: i64, to: i64| Partition::Range {
        from: Some(Bson::Int64(from)),
        to: Some(Bson::Int64(to)),
    };
    let (a, b) = tokio::join!(run(range(0, 250)), run(range(250, 500)));
    assert_eq!(a.stats().rewritten, 250);
    assert_eq!(b.stats().rewritten, 250);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_plaintext_and_csfle_fields() {
    let (_client, db) = database("rot_migrate").await;
    let coll = db.collection::<RawDocumentBuf>("legacy");
    let keys = keys();
    // A CSFLE data key, as a MongoDB driver made it, added to the keyring.
    let master = LocalMasterKey::generate();
    let dek = CsfleDataKey::generate(vec!["legacy".into()]).unwrap();
    let kd = dek.to_key_document(&master);
    let material = master.unwrap(&kd.key_material).unwrap();
    keys.insert(
        Key::from_material(
            dek.id(),
            "legacy",
            KeyKind::Csfle,
            KeyState::Active,
            KeyMaterial::from_slice(secrecy::ExposeSecret::expose_secret(&material)),
            0,
        )
        .unwrap(),
    );
    let mut docs = Vec::new();
    for i in 0..300i64 {
        let p = plain(i);
        let mut d = p.clone();
        if i % 3 == 0 {
            // CSFLE-encrypted by "the old application".
            let ssn = dek
                .encrypt_value(CsfleAlgorithm::Random, p.get("ssn").unwrap())
                .unwrap();
            d.insert("ssn", ssn);
        }
        docs.push(RawDocumentBuf::from_document(&d).unwrap());
    }
    coll.insert_many(docs).await.unwrap();
    let target = Target::new(&coll, schema());
    let rotator = |o: RotationOptions| {
        Rotator::new(keys.clone())
            .checkpoint_collection(db.collection("checkpoints"))
            .options(o)
    };

    // Re-encryption alone leaves plaintext and CSFLE documents to a migration.
    let r = rotator(RotationOptions::default())
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(r.stats().skipped, 300);
    assert_eq!(r.stats().rewritten, 0);
    // A dry run counts and writes nothing.
    let before = all_stored(&coll).await;
    let r = rotator(
        RotationOptions::default()
            .job("migrate")
            .migrate_plaintext(true)
            .migrate_csfle(true)
            .dry_run(true),
    )
    .run(std::slice::from_ref(&target), |_| Flow::Continue)
    .await
    .unwrap();
    assert_eq!(r.stats().rewritten, 300);
    assert_eq!(all_stored(&coll).await, before);

    let r = rotator(
        RotationOptions::default()
            .job("migrate")
            .migrate_plaintext(true)
            .migrate_csfle(true),
    )
    .run(std::slice::from_ref(&target), |_| Flow::Continue)
    .await
    .unwrap();
    assert_eq!(r.stats().rewritten, 300, "{:?}", r.targets[0].failures);
    let stored = all_stored(&coll).await;
    let cryptor = Cryptor::new(keys.clone(), schema());
    check_current(
        &stored,
        &cryptor,
        &ctx(&coll),
        keys.as_ref(),
        Some(&|id| plain(id.as_i64().unwrap())),
    );
    for d in &stored {
        // No CSFLE value is left.
        assert!(!Cryptor::referenced_keys(d).unwrap().contains(&dek.id()));
    }
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_that_cannot_be_reencrypted_fail_alone() {
    let (_client, db) = database("rot_fail").await;
    let coll = db.collection::<RawDocumentBuf>("c");
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    insert_encrypted(&coll, &cryptor, (0..50).map(plain)).await;
    // 1: under a key nobody has; 2: tampered; 3: a ciphertext in a field the schema lost.
    let stranger = Arc::new(InMemoryKeyring::new());
    stranger.generate("pii");
    stranger.generate("idx");
    let foreign = Cryptor::new(stranger, schema())
        .encrypt_raw(
            &RawDocumentBuf::from_document(&plain(1)).unwrap(),
            &ctx(&coll),
        )
        .unwrap();
    coll.replace_one(doc! { "_id": 1 }, foreign).await.unwrap();
    let two = coll
        .find_one(doc! { "_id": 2 })
        .await
        .unwrap()
        .unwrap()
        .to_document()
        .unwrap();
    let mut ssn = match two.get("ssn") {
        Some(Bson::Binary(b)) => b.bytes.clone(),
        other => panic!("ssn is {other:?}"),
    };
    let last = ssn.len() - 1;
    ssn[last] ^= 1;
    coll.update_one(
        doc! { "_id": 2 },
        doc! { "$set": { "ssn": Binary { subtype: BinarySubtype::UserDefined(0x8F), bytes: ssn } } },
    )
    .await
    .unwrap();
    let three = coll
        .find_one(doc! { "_id": 3 })
        .await
        .unwrap()
        .unwrap()
        .to_document()
        .unwrap();
    coll.update_one(
        doc! { "_id": 3 },
        doc! { "$set": { "old_field": three.get("ssn").unwrap().clone() } },
    )
    .await
    .unwrap();
    keys.rotate("pii");

    let r = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .run(&[Target::new(&coll, schema())], |_| Flow::Continue)
        .await
        .unwrap();
    let t = &r.targets[0];
    assert_eq!(t.stats.failed, 3, "{:?}", t.failures);
    assert_eq!(t.stats.rewritten, 47);
    let ids: Vec<&Bson> = t.failures.iter().map(|f| &f.id).collect();
    assert_eq!(ids, [&Bson::Int64(1), &Bson::Int64(2), &Bson::Int64(3)]);
    assert!(
        t.failures[0].reason.contains("unknown key"),
        "{}",
        t.failures[0].reason
    );
    assert!(
        t.failures[1].reason.contains("did not authenticate"),
        "{}",
        t.failures[1].reason
    );
    assert!(
        t.failures[2].reason.contains("old_field"),
        "{}",
        t.failures[2].reason
    );
    // Failures keep the job open: not complete, and a resumed run retries exactly the failed
    // documents (it does not report "already complete").
    assert!(!r.complete());
    assert!(!t.complete);
    assert_eq!(t.unresolved, 3);
    let resumed = || async {
        Rotator::new(keys.clone())
            .checkpoint_collection(db.collection("checkpoints"))
            .options(RotationOptions::default().resume(true).batch_size(2))
            .run(&[Target::new(&coll, schema())], |_| Flow::Continue)
            .await
    };
    let r = resumed().await.unwrap();
    let t = &r.targets[0];
    assert!(t.resumed && !t.complete && !r.complete());
    assert_eq!(t.stats.scanned, 3, "{:?}", t.stats);
    assert_eq!(t.stats.failed, 3);
    assert_eq!(t.unresolved, 3);
    // Fix two of them (3 loses its stray ciphertext, 1 is deleted): still not complete.
    coll.update_one(doc! { "_id": 3 }, doc! { "$unset": { "old_field": "" } })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();
    let r = resumed().await.unwrap();
    let t = &r.targets[0];
    assert_eq!(
        (t.stats.scanned, t.stats.rewritten, t.stats.failed),
        (2, 1, 1),
        "{:?}",
        t.failures
    );
    assert_eq!(t.failures[0].id, Bson::Int64(2));
    assert!(!r.complete());
    // The last one is replaced by a readable document: the job completes, and stays so.
    let fresh = cryptor
        .encrypt_raw(
            &RawDocumentBuf::from_document(&plain(2)).unwrap(),
            &ctx(&coll),
        )
        .unwrap();
    coll.replace_one(doc! { "_id": 2 }, fresh).await.unwrap();
    let r = resumed().await.unwrap();
    let t = &r.targets[0];
    assert_eq!(
        (t.stats.scanned, t.stats.failed),
        (1, 0),
        "{:?}",
        t.failures
    );
    assert!(t.complete && r.complete());
    assert_eq!(t.unresolved, 0);
    let r = resumed().await.unwrap();
    assert_eq!(r.stats().scanned, 0);
    assert!(r.complete());
    check_current(
        &all_stored(&coll).await,
        &cryptor,
        &ctx(&coll),
        keys.as_ref(),
        None,
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_plaintext_stale_keys_and_tokens_and_nothing_in_a_clean_collection() {
    let (_client, db) = database("rot_audit").await;
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    let clean = db.collection::<RawDocumentBuf>("clean");
    insert_encrypted(
        &clean,
        &cryptor,
        (0..200).map(|i| {
            let mut d = plain(i);
            d.insert(
                "notes",
                "Called about the invoice; will call back tomorrow.",
            );
            d.insert(
                "created",
                bson::DateTime::from_millis(1_700_000_000_000 + i),
            );
            d.insert("ref", bson::oid::ObjectId::new().to_hex());
            d
        }),
    )
    .await;
    let audit = Audit::new(keys.clone());
    let rep = audit
        .run(&Target::new(&clean, schema()), |_| {})
        .await
        .unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.findings);
    assert_eq!(rep.documents, 200);
    assert_eq!(rep.current, 200);
    assert!(rep.suites.contains_key("AES-256-GCM"));
    assert!(rep.suites.contains_key("AES-256-SIV-deterministic"));
    assert!(rep.suites.contains_key("XChaCha20-Poly1305"));
    assert_eq!(rep.keys.len(), 2);

    let dirty = db.collection::<RawDocumentBuf>("dirty");
    insert_encrypted(&dirty, &cryptor, (0..100).map(plain)).await;
    let old = keys.primary("pii").unwrap().id();
    keys.rotate("pii");
    insert_encrypted(&dirty, &cryptor, (100..150).map(plain)).await;
    // Plaintext planted in an encrypted field, tokens in clear fields.
    dirty
        .insert_one(RawDocumentBuf::from_document(&plain(1000)).unwrap())
        .await
        .unwrap();
    dirty
        .update_one(doc! { "_id": 120 }, doc! { "$set": { "session": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c" } })
        .await
        .unwrap();
    dirty
        .update_one(
            doc! { "_id": 121 },
            doc! { "$set": { "profile.note": "aws key AKIAIOSFODNN7EXAMPLE pasted here" } },
        )
        .await
        .unwrap();
    dirty
        .update_one(
            doc! { "_id": 122 },
            doc! { "$set": { "cfg": { "token": "q8Zr4TfW2mXv9LpK3sNd7YhB6cJ1gRa5" } } },
        )
        .await
        .unwrap();
    let rep = audit
        .run(&Target::new(&dirty, schema()), |_| {})
        .await
        .unwrap();
    let f = &rep.findings;
    eprintln!("{}", serde_json::to_string_pretty(&rep).unwrap());
    assert!(f
        .iter()
        .any(|x| matches!(x, AuditFinding::Plaintext { path, documents: 1, .. } if path == "ssn")));
    assert!(f
        .iter()
        .any(|x| matches!(x, AuditFinding::Plaintext { path, .. } if path == "profile.email")));
    assert!(f.iter().any(
        |x| matches!(x, AuditFinding::StaleKey { key, values, .. } if *key == old && *values > 0)
    ));
    assert!(f.iter().any(|x| matches!(x, AuditFinding::Token { path, token: TokenKind::Jwt, .. } if path == "session")));
    assert!(f.iter().any(|x| matches!(x, AuditFinding::Token { path, token: TokenKind::AwsAccessKey, .. } if path == "profile.note")));
    assert!(f.iter().any(|x| matches!(x, AuditFinding::Token { path, token: TokenKind::HighEntropy, .. } if path == "cfg.token")));
    // Nothing in the report quotes a value.
    let text = serde_json::to_string(&rep).unwrap();
    for secret in [
        "AKIAIOSFODNN7EXAMPLE",
        "eyJhbGci",
        "q8Zr4TfW",
        "user1000@example.com",
        "000-00-1000",
    ] {
        assert!(!text.contains(secret), "report quotes {secret}");
    }
    // Disabled keys are reported as unusable; stale ones can be allowed.
    keys.set_state(&old, KeyState::Disabled).unwrap();
    let rep = Audit::new(keys.clone())
        .options(AuditOptions::default().allow_stale(true).tokens(false))
        .run(&Target::new(&dirty, schema()), |_| {})
        .await
        .unwrap();
    assert!(rep.findings.iter().any(|x| matches!(x, AuditFinding::UnusableKey { key, state, .. } if *key == old && state == "disabled")));
    assert!(!rep
        .findings
        .iter()
        .any(|x| matches!(x, AuditFinding::Token { .. })));
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_a_primary_changing_mid_run() {
    let (_client, db) = database("rot_rate").await;
    let coll = db.collection::<RawDocumentBuf>("c");
    let keys = keys();
    let cryptor = Cryptor::new(keys.clone(), schema());
    insert_encrypted(&coll, &cryptor, (0..120).map(plain)).await;
    keys.rotate("pii");
    let target = Target::new(&coll, schema());
    let started = std::time::Instant::now();
    let r = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(
            RotationOptions::default()
                .batch_size(20)
                .rate_limit(Some(200.0)),
        )
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(r.stats().rewritten, 120);
    // Five sleeps bring the run to 100 documents / 200 per second at least.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );

    // Another rotation lands while the job runs: it starts over so that every document ends
    // under the newest primary.
    keys.rotate("pii");
    let mut checkpoints = 0;
    let r = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(RotationOptions::default().batch_size(30))
        .run(std::slice::from_ref(&target), |p| {
            if p.phase == Phase::Checkpointed {
                checkpoints += 1;
                if checkpoints == 2 {
                    keys.rotate("pii");
                }
            }
            Flow::Continue
        })
        .await
        .unwrap();
    assert!(r.targets[0].restarted);
    assert_eq!(r.stats().failed, 0);
    check_current(
        &all_stored(&coll).await,
        &cryptor,
        &ctx(&coll),
        keys.as_ref(),
        Some(&|id| plain(id.as_i64().unwrap())),
    );
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_key_vault_as_key_source() {
    use fieldcrypt::mongo::{KeySource, KeyVault, LocalKek};
    let (client, db) = database("rot_vault").await;
    let vault = Arc::new(
        KeyVault::builder(&client, Arc::new(LocalKek::generate()))
            .namespace(format!("{}.datakeys", db.name()))
            .build()
            .unwrap(),
    );
    vault.create_key("pii").await.unwrap();
    vault.create_key("idx").await.unwrap();
    vault
        .prefetch_aliases(&["pii".to_owned(), "idx".to_owned()])
        .await
        .unwrap();
    let coll = db.collection::<RawDocumentBuf>("people");
    let cryptor = Cryptor::new(vault.clone(), schema());
    insert_encrypted(&coll, &cryptor, (0..300).map(plain)).await;
    let old = vault.primary("pii").unwrap().id();
    let new = vault.rotate("pii").await.unwrap();
    // A fresh vault handle, as another process would have: nothing cached.
    let other = Arc::new(
        KeyVault::builder(&client, Arc::new(LocalKek::generate()))
            .namespace(format!("{}.datakeys", db.name()))
            .build()
            .unwrap(),
    );
    // (It cannot unwrap with another KEK: the run fails cleanly, naming the key.)
    let err = Rotator::new(other)
        .checkpoint_collection(db.collection("checkpoints"))
        .run(&[Target::new(&coll, schema())], |_| Flow::Continue)
        .await
        .unwrap_err();
    assert!(matches!(err, fieldcrypt::Error::KeyFormat(_)), "{err}");
    let r = Rotator::new(vault.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(RotationOptions::default().batch_size(100))
        .run(&[Target::new(&coll, schema())], |_| Flow::Continue)
        .await
        .unwrap();
    assert_eq!(r.stats().rewritten, 300, "{:?}", r.targets[0].failures);
    for d in all_stored(&coll).await {
        let ids = Cryptor::referenced_keys(&d).unwrap();
        assert!(ids.contains(&new) && !ids.contains(&old));
    }
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_inside_nested_arrays_is_audited_and_migrated() {
    let (_client, db) = database("rot_nested").await;
    let coll = db.collection::<RawDocumentBuf>("c");
    let keys = keys();
    let schema = || {
        Schema::builder()
            .field("a.b", Field::randomized("pii"))
            .field("profile.email", Field::randomized("pii"))
            .build()
            .unwrap()
    };
    let plain = |i: i64| {
        doc! {
            "_id": i,
            "a": [[{ "b": format!("secret-{i}") }], [[{ "b": format!("deep-{i}"), "c": 1 }]], { "b": i }, 7],
            "profile": { "email": format!("u{i}@example.com") },
        }
    };
    let docs: Vec<RawDocumentBuf> = (0..20)
        .map(|i| RawDocumentBuf::from_document(&plain(i)).unwrap())
        .collect();
    coll.insert_many(docs).await.unwrap();
    // A literal dotted name spelling an encrypted path is stored in clear, too.
    let mut dotted = RawDocumentBuf::new();
    dotted.append("_id", 100i64);
    dotted.append("profile.email", "dotted@example.com");
    coll.insert_one(dotted).await.unwrap();

    let target = Target::new(&coll, schema());
    let audit = Audit::new(keys.clone());
    let rep = audit.run(&target, |_| {}).await.unwrap();
    assert!(
        rep.findings.iter().any(
            |f| matches!(f, AuditFinding::Plaintext { path, documents: 20, .. } if path == "a.b")
        ),
        "{:#?}",
        rep.findings
    );
    assert!(rep.findings.iter().any(
        |f| matches!(f, AuditFinding::Plaintext { path, documents: 21, .. } if path == "profile.email")
    ));

    let r = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(
            RotationOptions::default()
                .job("migrate")
                .migrate_plaintext(true),
        )
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    let t = &r.targets[0];
    assert_eq!(t.stats.rewritten, 20, "{:?}", t.failures);
    // The dotted name cannot be fixed by re-encryption: it fails alone, with the reason.
    assert_eq!(t.stats.failed, 1);
    assert_eq!(t.failures[0].id, Bson::Int64(100));
    assert!(
        t.failures[0].reason.contains("dotted"),
        "{}",
        t.failures[0].reason
    );
    coll.delete_one(doc! { "_id": 100 }).await.unwrap();

    let stored = all_stored(&coll).await;
    let cryptor = Cryptor::new(keys.clone(), schema());
    for d in &stored {
        let text = format!("{:?}", d.to_document().unwrap());
        assert!(
            !text.contains("secret-") && !text.contains("deep-"),
            "{text}"
        );
        let back = cryptor
            .decrypt_raw(d, &ctx(&coll))
            .unwrap()
            .to_document()
            .unwrap();
        assert_eq!(back, plain(back.get_i64("_id").unwrap()));
    }
    let rep = audit.run(&target, |_| {}).await.unwrap();
    assert!(rep.is_clean(), "{:#?}", rep.findings);
    assert_eq!(rep.current, 20);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_is_exact_about_types_arrays_and_collation() {
    use mongodb::options::{Collation, CollationStrength};
    let (_client, db) = database("rot_exact").await;
    // A case-insensitive default collation: `$eq` alone would take "ABC-3" for "abc-3".
    db.create_collection("c")
        .collation(
            Collation::builder()
                .locale("en")
                .strength(CollationStrength::Secondary)
                .build(),
        )
        .await
        .unwrap();
    let coll = db.collection::<RawDocumentBuf>("c");
    let docs = [
        doc! { "_id": 0, "ssn": "abc-0" },
        doc! { "_id": 1, "tags": ["a", "b"] },
        doc! { "_id": 2, "ssn": 42 },
        doc! { "_id": 3, "ssn": "abc-3" },
        doc! { "_id": 4, "ssn": [["abc-4"], "b"] },
    ];
    for d in &docs {
        coll.insert_one(RawDocumentBuf::from_document(d).unwrap())
            .await
            .unwrap();
    }
    let honours_collation = coll
        .count_documents(doc! { "_id": 3, "ssn": "ABC-3" })
        .await
        .unwrap()
        == 1;
    if !honours_collation {
        eprintln!("this server ignores collection default collations: the collation case is not exercised");
    }
    // Between the engine's read and its write, the application changes each document to a
    // value that the old value's `$eq` still matches: an array containing it, an array
    // containing the old array, the same number as a double, the same string in upper case,
    // an array containing an old array that holds an array.
    let app: [(i32, Bson); 5] = [
        (0, bson::bson!(["abc-0", "x"])),
        (1, bson::bson!([["a", "b"], "c"])),
        (2, Bson::Double(42.0)),
        (3, Bson::String("ABC-3".into())),
        (4, bson::bson!([[["abc-4"], "b"], "c"])),
    ];
    let keys = keys();
    let handle = tokio::runtime::Handle::current();
    let mut done = false;
    let r = Rotator::new(keys.clone())
        .checkpoint_collection(db.collection("checkpoints"))
        .options(
            RotationOptions::default()
                .job("migrate")
                .migrate_plaintext(true),
        )
        .run(&[Target::new(&coll, schema())], |p| {
            if p.phase == Phase::BatchRead && !done {
                done = true;
                let coll = db.collection::<Document>("c");
                let app = app.clone();
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        for (id, v) in app {
                            let field = if id == 1 { "tags" } else { "ssn" };
                            coll.update_one(doc! { "_id": id }, doc! { "$set": { field: v } })
                                .await
                                .unwrap();
                        }
                    });
                });
            }
            Flow::Continue
        })
        .await;
    let r = r.unwrap();
    let s = r.stats();
    assert_eq!(s.failed, 0, "{:?}", r.targets[0].failures);
    assert!(s.conflicts >= 4, "{s:?}");
    // Every application write survived, and is encrypted now.
    let cryptor = Cryptor::new(keys.clone(), schema());
    let stored = all_stored(&coll).await;
    assert_eq!(stored.len(), 5);
    for raw in &stored {
        let id = raw.get_i32("_id").unwrap();
        let (_, want) = app.iter().find(|(i, _)| *i == id).unwrap();
        let text = format!("{:?}", raw.to_document().unwrap());
        assert!(!text.contains("abc-") && !text.contains("ABC-"), "{text}");
        let back = cryptor
            .decrypt_raw(raw, &ctx(&coll))
            .unwrap()
            .to_document()
            .unwrap();
        let field = if id == 1 { "tags" } else { "ssn" };
        assert_eq!(back.get(field), Some(want), "document {id}");
    }
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_are_loosened_but_never_added_in_place() {
    let (_client, db) = database("rot_bind").await;
    let coll = db.collection::<RawDocumentBuf>("c");
    let keys = keys();
    let loose = || {
        Schema::builder()
            .field("ssn", Field::randomized("pii"))
            .build()
            .unwrap()
    };
    let tight = || {
        Schema::builder()
            .field("ssn", Field::randomized("pii").bind_id())
            .build()
            .unwrap()
    };
    let docs = || (0..10i64).map(|i| doc! { "_id": i, "ssn": format!("s{i}") });
    insert_encrypted(&coll, &Cryptor::new(keys.clone(), loose()), docs()).await;
    let run = |schema: Schema, job: &'static str| {
        let keys = keys.clone();
        let target = Target::new(&coll, schema);
        let cp = db.collection("checkpoints");
        async move {
            Rotator::new(keys)
                .checkpoint_collection(cp)
                .options(RotationOptions::default().job(job))
                .run(&[target], |_| Flow::Continue)
                .await
                .unwrap()
        }
    };
    // Adding `bind_id`: the values lack the binding the schema now requires; decrypting them
    // under it is refused (they could have been moved here), so each document fails, listed.
    let r = run(tight(), "tighten").await;
    let t = &r.targets[0];
    assert_eq!((t.stats.failed, t.stats.rewritten), (10, 0));
    assert!(
        t.failures[0].reason.contains("_id"),
        "{}",
        t.failures[0].reason
    );
    assert!(!r.complete());
    // Through a trusted path (decrypt with the old schema, encrypt with the new one), then
    // removing `bind_id` again: bound values are rewritten without the binding.
    let old = Cryptor::new(keys.clone(), loose());
    let new = Cryptor::new(keys.clone(), tight());
    for d in all_stored(&coll).await {
        let plain = old.decrypt_raw(&d, &ctx(&coll)).unwrap();
        let sealed = new.encrypt_raw(&plain, &ctx(&coll)).unwrap();
        coll.replace_one(doc! { "_id": d.get_i64("_id").unwrap() }, sealed)
            .await
            .unwrap();
    }
    let r = run(loose(), "loosen").await;
    assert_eq!(r.stats().rewritten, 10, "{:?}", r.targets[0].failures);
    for d in all_stored(&coll).await {
        let back = old
            .decrypt_raw(&d, &ctx(&coll))
            .unwrap()
            .to_document()
            .unwrap();
        assert_eq!(
            back.get_str("ssn").unwrap(),
            format!("s{}", back.get_i64("_id").unwrap())
        );
    }
    db.drop().await.unwrap();
}
