//! No leakage, proven: through a full flow — inserts, bulk inserts, a raw insert, queries by
//! deterministic, blind-indexed and index-only fields, updates, aggregation, a session, key
//! rotation and more writes and reads — every command the driver sends and every reply it
//! receives is recorded (the driver's command monitoring), and no plaintext of any encrypted
//! field and no key material appears in any of them, in any encoding: raw bytes, hex (lower
//! and upper case), base64 (standard and URL-safe, padded or not, at any alignment inside a
//! longer base64 text). The plaintexts are then found in the decrypted results, so the test
//! can fail; and the detector itself is checked on planted leaks.
//!
//! fieldcrypt's own tracing output is recorded too, and holds no value either.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bson::{doc, Bson, Document, RawDocumentBuf};
use fieldcrypt::mongo::EncryptedCollection;
use fieldcrypt::{BlindIndex, Field, Schema, Suite};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{keyring_with, log_capture, stored};
use futures_util::TryStreamExt;
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::{ClientOptions, FindOneAndUpdateOptions, FindOptions, ReturnDocument};
use mongodb::Client;

// ---------------------------------------------------------------------------------------------
// The detector

/// The forms a secret could take in recorded traffic or logs.
fn encodings(secret: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("raw".to_owned(), secret.to_vec()),
        ("hex".to_owned(), hex::encode(secret).into_bytes()),
        ("HEX".to_owned(), hex::encode_upper(secret).into_bytes()),
    ];
    for (name, engine) in [
        ("base64", &STANDARD),
        ("base64 unpadded", &STANDARD_NO_PAD),
        ("base64url", &URL_SAFE),
        ("base64url unpadded", &URL_SAFE_NO_PAD),
    ] {
        out.push((name.to_owned(), engine.encode(secret).into_bytes()));
    }
    // Inside a longer base64 text a secret starts at one of three alignments: keep the
    // characters that depend on its bytes only.
    for (name, engine) in [
        ("base64", &STANDARD_NO_PAD),
        ("base64url", &URL_SAFE_NO_PAD),
    ] {
        for k in 0..3usize {
            let mut shifted = vec![0u8; k];
            shifted.extend_from_slice(secret);
            let enc = engine.encode(&shifted);
            let start = (k * 8).div_ceil(6);
            let end = (k + secret.len()) * 8 / 6;
            if end >= start + 8 {
                out.push((
                    format!("{name} at offset {k}"),
                    enc.as_bytes()[start..end].to_vec(),
                ));
            }
        }
    }
    out
}

const WINDOW: usize = 8;

/// A haystack indexed by its 8-byte windows, so thousands of needles are checked quickly.
struct Haystack {
    bytes: Vec<u8>,
    windows: HashSet<[u8; WINDOW]>,
}

impl Haystack {
    fn new(parts: &[Vec<u8>]) -> Self {
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(p);
            bytes.push(0xFF); // no needle spans two parts
        }
        let windows = bytes
            .windows(WINDOW)
            .map(|w| <[u8; WINDOW]>::try_from(w).unwrap())
            .collect();
        Haystack { bytes, windows }
    }

    fn contains(&self, needle: &[u8]) -> bool {
        assert!(
            needle.len() >= WINDOW,
            "needle too short to search reliably"
        );
        let first = <[u8; WINDOW]>::try_from(&needle[..WINDOW]).unwrap();
        self.windows.contains(&first) && self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// The encodings of `secret` found in the haystack.
    fn leaks(&self, secret: &[u8]) -> Vec<String> {
        encodings(secret)
            .into_iter()
            .filter(|(_, n)| self.contains(n))
            .map(|(name, _)| name)
            .collect()
    }
}

#[test]
fn fail_the_detector_finds_planted_leaks_in_every_encoding() {
    let secret = b"PLAINTEXT-SSN-99999-Z";
    let key = [0xA7u8; 32];
    for (name, form) in encodings(secret).into_iter().chain(encodings(&key)) {
        // Planted inside a BSON command, between other bytes.
        let bytes = [&b"<<"[..], &form, &b">>"[..]].concat();
        let planted = bson::to_vec(&doc! {
            "insert": "c",
            "documents": [ { "x": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes } } ],
        })
        .unwrap();
        let hay = Haystack::new(&[b"noise".to_vec(), planted]);
        assert!(
            hay.contains(&form),
            "{name} form was not found where it was planted"
        );
    }
    // A value carried as a Binary shows up raw in BSON and in base64 in extended JSON, at an
    // unknown alignment.
    for prefix in 0..3usize {
        let mut bytes = vec![7u8; prefix];
        bytes.extend_from_slice(&key);
        let command =
            doc! { "x": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes } };
        let json = Bson::Document(command.clone())
            .into_relaxed_extjson()
            .to_string();
        let hay = Haystack::new(&[bson::to_vec(&command).unwrap(), json.into_bytes()]);
        let found = hay.leaks(&key);
        assert!(found.contains(&"raw".to_owned()));
        assert!(
            found.iter().any(|f| f.starts_with("base64")),
            "base64 at offset {prefix} missed: {found:?}"
        );
    }
    assert!(Haystack::new(&[b"nothing to see here".to_vec()])
        .leaks(secret)
        .is_empty());
}

// ---------------------------------------------------------------------------------------------
// Recording

#[derive(Default)]
struct Traffic {
    /// Each command and each reply, as BSON bytes and as relaxed extended JSON.
    parts: Vec<Vec<u8>>,
    command_names: Vec<String>,
}

fn record(traffic: &Mutex<Traffic>, doc: Document) {
    let json = Bson::Document(doc.clone())
        .into_relaxed_extjson()
        .to_string();
    let mut t = traffic.lock().unwrap();
    t.parts.push(bson::to_vec(&doc).unwrap());
    t.parts.push(json.into_bytes());
}

// ---------------------------------------------------------------------------------------------
// The flow

fn schema() -> Schema {
    Schema::builder()
        .owner_field("tenant")
        .field("ssn", Field::randomized("pii").bind_id().pad_to(16))
        .field("email", Field::deterministic("det"))
        .field(
            "name",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx")),
        )
        .field(
            "token",
            Field::blind_index_only(BlindIndex::new("idx").truncate(16)),
        )
        .field("tags.$[]", Field::deterministic("det"))
        .field(
            "notes.$[]",
            Field::randomized("pii").suite(Suite::XChaCha20Poly1305),
        )
        .field("profile.phone", Field::deterministic("det"))
        .field("salary", Field::randomized("pii"))
        .build()
        .unwrap()
}

/// The plaintexts the flow writes to encrypted fields.
#[derive(Default)]
struct Secrets {
    /// Values that come back when documents are read.
    readable: Vec<Bson>,
    /// Index-only values: stored nowhere, found by query only.
    tokens: Vec<String>,
}

const SALARY_BASE: i64 = 0x5EC2_E7AB_0000_0000;

fn person(i: i32, secrets: &mut Secrets) -> Document {
    let d = doc! {
        "_id": i,
        "ssn": format!("PLAINTEXT-SSN-{i:05}-X"),
        "email": format!("plaintext.email.{i:05}@leak.example"),
        "name": format!("PLAINTEXT NAME {i:05}"),
        "token": format!("PLAINTEXT-TOKEN-{i:05}"),
        "tags": [format!("PLAINTEXT-TAG-A-{i:05}"), format!("PLAINTEXT-TAG-B-{i:05}")],
        "notes": [format!("PLAINTEXT-NOTE-{i:05}")],
        "profile": { "phone": format!("+PLAINTEXT-PHONE-{i:05}"), "city": "Plainville" },
        "salary": SALARY_BASE + i64::from(i),
        "plan": "basic",
    };
    for k in ["ssn", "email", "name", "salary"] {
        secrets.readable.push(d.get(k).unwrap().clone());
    }
    for k in ["tags", "notes"] {
        secrets
            .readable
            .extend(d.get_array(k).unwrap().iter().cloned());
    }
    secrets.readable.push(
        d.get_document("profile")
            .unwrap()
            .get("phone")
            .unwrap()
            .clone(),
    );
    secrets.tokens.push(d.get_str("token").unwrap().to_owned());
    d
}

fn s(secrets: &mut Secrets, v: impl Into<Bson>) -> Bson {
    let v = v.into();
    secrets.readable.push(v.clone());
    v
}

async fn read_all(coll: &EncryptedCollection<Document>, seen: &mut Vec<Document>) {
    let docs: Vec<Document> = coll
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    seen.extend(docs);
}

async fn ids(coll: &EncryptedCollection<Document>, filter: Document) -> Vec<i32> {
    let docs: Vec<Document> = coll
        .find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut ids: Vec<i32> = docs.iter().map(|d| d.get_i32("_id").unwrap()).collect();
    ids.sort_unstable();
    ids
}

fn email(i: i32) -> String {
    format!("plaintext.email.{i:05}@leak.example")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one flow, read top to bottom
async fn no_plaintext_or_key_material_in_any_command_reply_or_log() {
    let log = log_capture();
    let server = DevServer::shared().unwrap();
    let mut options = ClientOptions::parse(server.uri()).await.unwrap();
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let sink = traffic.clone();
    options.command_event_handler =
        Some(EventHandler::callback(move |ev: CommandEvent| match ev {
            CommandEvent::Started(s) => {
                sink.lock()
                    .unwrap()
                    .command_names
                    .push(s.command_name.clone());
                record(&sink, s.command);
            }
            CommandEvent::Succeeded(s) => record(&sink, s.reply),
            _ => {}
        }));
    let client = Client::with_options(options).unwrap();
    let db = client.database(&unique_db_name("no_leak"));

    let ring = keyring_with(&["pii", "det", "idx"]);
    let acme = EncryptedCollection::<Document>::new(
        db.collection::<Document>("people"),
        ring.clone(),
        schema(),
    )
    .scoped("acme")
    .unwrap();
    acme.apply_validator().await.unwrap();
    let mut secrets = Secrets::default();
    let mut seen = Vec::new();

    // Inserts: one, a bulk batch large enough to be encrypted in parallel, a raw one, and one
    // in a session.
    acme.insert_one(person(0, &mut secrets)).await.unwrap();
    let bulk: Vec<Document> = (1..=70).map(|i| person(i, &mut secrets)).collect();
    acme.insert_many(bulk).await.unwrap();
    let raw = RawDocumentBuf::from_document(&person(71, &mut secrets)).unwrap();
    acme.raw().insert_one(raw).await.unwrap();
    let mut session = client.start_session().await.unwrap();
    acme.insert_one(person(72, &mut secrets))
        .session(&mut session)
        .await
        .unwrap();
    read_all(&acme, &mut seen).await;

    // Queries by deterministic, blind-indexed and index-only fields.
    assert_eq!(ids(&acme, doc! { "email": email(5) }).await, [5]);
    assert_eq!(
        ids(&acme, doc! { "email": { "$in": [email(6), email(7)] } }).await,
        [6, 7]
    );
    assert_eq!(
        ids(&acme, doc! { "name": "PLAINTEXT NAME 00008" }).await,
        [8]
    );
    assert_eq!(
        ids(&acme, doc! { "token": "PLAINTEXT-TOKEN-00009" }).await,
        [9]
    );
    assert_eq!(
        ids(&acme, doc! { "tags": "PLAINTEXT-TAG-B-00010" }).await,
        [10]
    );
    assert_eq!(
        ids(
            &acme,
            doc! { "profile.phone": { "$ne": "+PLAINTEXT-PHONE-00011" }, "_id": { "$lt": 13 } }
        )
        .await,
        (0..13).filter(|i| *i != 11).collect::<Vec<_>>()
    );
    let one = acme
        .find_one(doc! { "profile.phone": "+PLAINTEXT-PHONE-00012" })
        .await
        .unwrap()
        .unwrap();
    seen.push(one);
    assert_eq!(
        acme.count_documents(
            doc! { "name": { "$in": ["PLAINTEXT NAME 00001", "PLAINTEXT NAME 00002"] } }
        )
        .await
        .unwrap(),
        2
    );
    let projected: Vec<Document> = acme
        .find(doc! { "email": email(13) })
        .with_options(
            FindOptions::builder()
                .projection(doc! { "ssn": 1, "salary": 1 })
                .build(),
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        projected[0].get_str("ssn").unwrap(),
        "PLAINTEXT-SSN-00013-X"
    );
    seen.extend(projected);
    let agg: Vec<Document> = acme
        .aggregate([
            doc! { "$match": { "email": { "$in": [email(14), email(15)] }, "token": { "$ne": "PLAINTEXT-TOKEN-00015" } } },
            doc! { "$project": { "name": 1, "notes": 1 } },
        ])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(agg.len(), 1);
    seen.extend(agg);

    // Updates.
    let upd = doc! {
        "$set": {
            "ssn": s(&mut secrets, "PLAINTEXT-SSN-UPDATED-00003"),
            "email": s(&mut secrets, "plaintext.updated.00003@leak.example"),
            "name": s(&mut secrets, "PLAINTEXT NAME UPDATED 00003"),
            "token": "PLAINTEXT-TOKEN-UPDATED-00003",
            "profile.phone": s(&mut secrets, "+PLAINTEXT-PHONE-UPDATED-00003"),
            "salary": s(&mut secrets, SALARY_BASE + 100_003),
        },
        "$push": { "notes": { "$each": [s(&mut secrets, "PLAINTEXT-NOTE-PUSHED-00003")] } },
        "$addToSet": { "tags": s(&mut secrets, "PLAINTEXT-TAG-ADDED-00003") },
    };
    secrets.tokens.push("PLAINTEXT-TOKEN-UPDATED-00003".into());
    acme.update_one(doc! { "_id": 3 }, upd).await.unwrap();
    assert_eq!(
        ids(&acme, doc! { "token": "PLAINTEXT-TOKEN-UPDATED-00003" }).await,
        [3]
    );
    let note = s(&mut secrets, "PLAINTEXT-NOTE-FOR-EVERYONE");
    acme.update_many(doc! {}, doc! { "$push": { "notes": note } })
        .await
        .unwrap();
    let after = acme
        .find_one_and_update(
            doc! { "email": email(4) },
            doc! { "$set": { "email": s(&mut secrets, "plaintext.fam.00004@leak.example") } },
        )
        .with_options(
            FindOneAndUpdateOptions::builder()
                .return_document(ReturnDocument::After)
                .build(),
        )
        .await
        .unwrap()
        .unwrap();
    seen.push(after);
    let mut replacement = person(9017, &mut secrets);
    replacement.insert("_id", 17);
    acme.replace_one(doc! { "_id": 17 }, replacement)
        .await
        .unwrap();
    let mut replacement = person(9018, &mut secrets);
    replacement.insert("_id", 18);
    let before = acme
        .find_one_and_replace(doc! { "email": email(18) }, replacement)
        .await
        .unwrap()
        .unwrap();
    seen.push(before);
    let gone = acme
        .find_one_and_delete(doc! { "name": "PLAINTEXT NAME 00019" })
        .await
        .unwrap()
        .unwrap();
    seen.push(gone);
    let emails = acme
        .distinct("email", doc! { "email": { "$in": [email(24), email(25)] } })
        .await
        .unwrap();
    assert_eq!(emails.len(), 2);
    assert!(emails.contains(&Bson::from(email(24))));
    read_all(&acme, &mut seen).await;

    // Rotation, then more writes and reads: old and new ciphertexts both match.
    for alias in ["pii", "det", "idx"] {
        ring.rotate(alias);
    }
    let more: Vec<Document> = (100..=105).map(|i| person(i, &mut secrets)).collect();
    acme.insert_many(more).await.unwrap();
    acme.update_one(
        doc! { "_id": 20 },
        doc! { "$set": { "ssn": s(&mut secrets, "PLAINTEXT-SSN-ROTATED-00020") } },
    )
    .await
    .unwrap();
    assert_eq!(ids(&acme, doc! { "email": email(21) }).await, [21]);
    assert_eq!(ids(&acme, doc! { "email": email(101) }).await, [101]);
    assert_eq!(
        ids(
            &acme,
            doc! { "name": { "$in": ["PLAINTEXT NAME 00022", "PLAINTEXT NAME 00102"] } }
        )
        .await,
        [22, 102]
    );
    assert_eq!(
        ids(&acme, doc! { "token": "PLAINTEXT-TOKEN-00103" }).await,
        [103]
    );
    acme.delete_one(doc! { "email": email(23) }).await.unwrap();
    read_all(&acme, &mut seen).await;

    // A refused query: the error names operator and field, never the value.
    let e = acme
        .find(doc! { "ssn": "PLAINTEXT-SSN-00001-X" })
        .await
        .unwrap_err()
        .to_string();
    assert!(!e.contains("PLAINTEXT"), "{e}");

    // What was sent and received.
    let traffic = std::mem::take(&mut *traffic.lock().unwrap());
    for name in [
        "insert",
        "find",
        "update",
        "aggregate",
        "findAndModify",
        "delete",
        "collMod",
    ] {
        assert!(
            traffic.command_names.iter().any(|n| n == name),
            "no {name} command was recorded: {:?}",
            traffic.command_names
        );
    }
    let hay = Haystack::new(&traffic.parts);
    // The recording holds the documents: a stored ciphertext is in it.
    let stored = stored::<Document>(&db, "people", doc! { "_id": 50 }).await;
    let Some(Bson::Binary(ct)) = stored.get("ssn") else {
        panic!("ssn is not stored encrypted: {stored:?}")
    };
    assert!(
        hay.contains(&ct.bytes),
        "inserted documents were not recorded"
    );

    let mut checked = 0;
    for v in &secrets.readable {
        let forms: Vec<Vec<u8>> = match v {
            Bson::String(s) => vec![s.as_bytes().to_vec()],
            Bson::Int64(n) => vec![n.to_le_bytes().to_vec(), n.to_string().into_bytes()],
            other => panic!("unexpected secret {other:?}"),
        };
        for form in forms {
            let leaks = hay.leaks(&form);
            assert!(leaks.is_empty(), "{v} leaked as {leaks:?}");
            checked += 1;
        }
    }
    for t in &secrets.tokens {
        let leaks = hay.leaks(t.as_bytes());
        assert!(leaks.is_empty(), "token {t} leaked as {leaks:?}");
    }
    let keys = ring.keys();
    assert_eq!(keys.len(), 6);
    for key in &keys {
        let material = key.material().unwrap().expose_secret();
        let leaks = hay.leaks(material);
        assert!(leaks.is_empty(), "key {} leaked as {leaks:?}", key.id());
    }

    // ... and the plaintexts are really what came back decrypted (so the test could fail).
    let results: String = seen
        .iter()
        .map(|d| Bson::Document(d.clone()).into_relaxed_extjson().to_string())
        .collect();
    for v in &secrets.readable {
        let text = match v {
            Bson::String(s) => s.clone(),
            Bson::Int64(n) => n.to_string(),
            _ => unreachable!(),
        };
        assert!(results.contains(&text), "{text} never came back decrypted");
    }
    assert!(checked > 700, "only {checked} plaintext forms checked");

    // fieldcrypt's log: operations recorded, no values.
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains("insert_many") && log.contains("fieldcrypt::collection"),
        "{log}"
    );
    let log_hay = Haystack::new(&[log.into_bytes()]);
    for v in &secrets.readable {
        if let Bson::String(s) = v {
            assert!(log_hay.leaks(s.as_bytes()).is_empty(), "{s} in the log");
        }
    }
    for t in &secrets.tokens {
        assert!(log_hay.leaks(t.as_bytes()).is_empty(), "{t} in the log");
    }
    for key in &keys {
        assert!(log_hay
            .leaks(key.material().unwrap().expose_secret())
            .is_empty());
    }
    db.drop().await.unwrap();
}
