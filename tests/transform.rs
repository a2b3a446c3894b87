//! The core document transform: round trips, bindings, tampering, rotation, key states.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{doc, rawdoc, Binary, Bson, Document, RawDocumentBuf};
use fieldcrypt::{
    BlindIndex, Context, Cryptor, Error, Field, InMemoryKeyring, Key, KeyId, KeyKind, KeyMaterial,
    KeyState, Keyring, Schema, Suite, ENVELOPE_SUBTYPE,
};

fn every_type() -> Document {
    doc! {
        "string": "hello wörld",
        "empty": "",
        "int32": -7i32,
        "int64": 1i64 << 40,
        "double": 3.25f64,
        "decimal": bson::Decimal128::from_bytes([7u8; 16]),
        "bool": true,
        "date": bson::DateTime::from_millis(1_700_000_000_123),
        "oid": bson::oid::ObjectId::parse_str("65f000000000000000000001").unwrap(),
        "bin_generic": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
        "bin_user": Binary { subtype: BinarySubtype::UserDefined(0x90), bytes: vec![9; 40] },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![4; 16] },
        "regex": bson::Regex { pattern: "^a.*b$".into(), options: "im".into() },
        "timestamp": bson::Timestamp { time: 17, increment: 4 },
        "null": Bson::Null,
        "doc": { "nested": { "deep": [1, 2, { "x": "y" }] } },
        "array": [1, "two", 3.0, { "four": 4 }, [5]],
        "code": Bson::JavaScriptCode("function() { return 1; }".into()),
        "code_scope": Bson::JavaScriptCodeWithScope(bson::JavaScriptCodeWithScope { code: "x".into(), scope: doc! { "x": 1 } }),
        "symbol": Bson::Symbol("sym".into()),
        "minkey": Bson::MinKey,
        "maxkey": Bson::MaxKey,
        "undefined": Bson::Undefined,
    }
}

fn schema_for_all(doc: &Document, suite: Suite) -> Schema {
    let mut b = Schema::builder();
    for k in doc.keys() {
        b = b.field(k.clone(), Field::randomized("pii").suite(suite));
    }
    b.build().unwrap()
}

fn ring() -> Arc<InMemoryKeyring> {
    let r = InMemoryKeyring::new();
    r.generate("pii");
    r.generate("det");
    r.generate("idx");
    Arc::new(r)
}

/// A cryptor that encrypts `ssn` under `pii` (randomized), and its keyring.
fn ssn_cryptor() -> (Arc<InMemoryKeyring>, Cryptor) {
    let keys = ring();
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    (keys.clone(), Cryptor::new(keys, schema))
}

fn is_envelope(v: &Bson) -> bool {
    matches!(v, Bson::Binary(b) if b.subtype == BinarySubtype::UserDefined(ENVELOPE_SUBTYPE))
}

#[test]
fn every_bson_type_round_trips_in_every_suite() {
    let plain = every_type();
    for suite in Suite::ALL {
        let c = Cryptor::new(ring(), schema_for_all(&plain, suite));
        let ctx = Context::namespace("app.users");
        let enc = c.encrypt_document(&plain, &ctx).unwrap();
        for (k, v) in &enc {
            assert!(is_envelope(v), "{suite}: {k} not encrypted");
        }
        let dec = c.decrypt_document(&enc, &ctx).unwrap();
        assert_eq!(dec, plain, "{suite}");
        // Raw and owned paths agree byte for byte.
        let raw_enc = RawDocumentBuf::from_document(&enc).unwrap();
        let raw_dec = c.decrypt_raw(&raw_enc, &ctx).unwrap();
        assert_eq!(
            raw_dec.as_bytes(),
            RawDocumentBuf::from_document(&plain).unwrap().as_bytes()
        );
    }
}

#[test]
fn nested_paths_and_arrays() {
    let schema = Schema::builder()
        .field("profile.email", Field::randomized("pii"))
        .field("addresses.street", Field::randomized("pii"))
        .field("tags.$[]", Field::randomized("pii"))
        .field("whole", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let plain = doc! {
        "_id": 1,
        "profile": { "email": "a@b.c", "name": "clear" },
        "addresses": [ { "street": "Main St", "zip": "1" }, { "street": "2nd", "zip": "2" }, "not a doc" ],
        "tags": ["t1", "t2", 3],
        "whole": ["x", "y"],
    };
    let ctx = Context::none();
    let enc = c.encrypt_document(&plain, &ctx).unwrap();
    let p = enc.get_document("profile").unwrap();
    assert!(is_envelope(p.get("email").unwrap()));
    assert_eq!(p.get_str("name").unwrap(), "clear");
    let addrs = enc.get_array("addresses").unwrap();
    for a in &addrs[..2] {
        let a = a.as_document().unwrap();
        assert!(is_envelope(a.get("street").unwrap()));
        assert!(!is_envelope(a.get("zip").unwrap()));
    }
    assert_eq!(addrs[2], Bson::String("not a doc".into()));
    let tags = enc.get_array("tags").unwrap();
    assert_eq!(tags.len(), 3);
    assert!(tags.iter().all(is_envelope));
    assert!(is_envelope(enc.get("whole").unwrap()));
    assert_eq!(c.decrypt_document(&enc, &ctx).unwrap(), plain);
    // Encrypting again leaves existing ciphertexts as they are.
    assert_eq!(c.encrypt_document(&enc, &ctx).unwrap(), enc);
}

#[test]
fn decryption_needs_only_the_keyring() {
    let keys = ring();
    let schema = Schema::builder()
        .field(
            "a.b",
            Field::randomized("pii").suite(Suite::XChaCha20Poly1305),
        )
        .build()
        .unwrap();
    let enc = Cryptor::new(keys.clone(), schema)
        .encrypt_document(&doc! { "a": { "b": 42 } }, &Context::none())
        .unwrap();
    let reader = Cryptor::decrypt_only(keys);
    assert_eq!(
        reader.decrypt_document(&enc, &Context::none()).unwrap(),
        doc! { "a": { "b": 42 } }
    );
}

#[test]
fn fail_moved_ciphertexts_do_not_decrypt() {
    let keys = ring();
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii").bind_id())
        .field("note", Field::randomized("pii"))
        .field("other", Field::randomized("pii"))
        .owner_field("owner")
        .build()
        .unwrap();
    let c = Cryptor::new(keys, schema);
    let ns = Context::namespace("app.users");
    let d1 = c
        .encrypt_document(
            &doc! { "_id": 1, "owner": "alice", "ssn": "123", "note": "n1" },
            &ns,
        )
        .unwrap();
    let d2 = c
        .encrypt_document(
            &doc! { "_id": 2, "owner": "alice", "ssn": "456", "note": "n2" },
            &ns,
        )
        .unwrap();
    assert!(c.decrypt_document(&d1, &ns).is_ok());

    // Another field.
    let mut moved = d1.clone();
    moved.insert("other", d1.get("note").unwrap().clone());
    assert!(matches!(
        c.decrypt_document(&moved, &ns),
        Err(Error::Decrypt)
    ));
    // Another collection.
    assert!(matches!(
        c.decrypt_document(&d1, &Context::namespace("app.admins")),
        Err(Error::Decrypt)
    ));
    // No namespace given for a namespace-bound value.
    assert!(matches!(
        c.decrypt_document(&d1, &Context::none()),
        Err(Error::MissingContext(_))
    ));
    // Another document (_id-bound field)...
    let mut moved = d2.clone();
    moved.insert("ssn", d1.get("ssn").unwrap().clone());
    assert!(matches!(
        c.decrypt_document(&moved, &ns),
        Err(Error::Decrypt)
    ));
    // ...while a field that is not _id-bound may move between documents of the same owner.
    let mut moved = d2.clone();
    moved.insert("note", d1.get("note").unwrap().clone());
    assert!(c.decrypt_document(&moved, &ns).is_ok());
    // Another owner.
    let mut stolen = d1.clone();
    stolen.insert("owner", "mallory");
    assert!(matches!(
        c.decrypt_document(&stolen, &ns),
        Err(Error::Decrypt)
    ));
}

#[test]
fn missing_id_is_generated_for_bound_fields() {
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii").bind_id())
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let enc = c
        .encrypt_document(&doc! { "ssn": "1" }, &Context::none())
        .unwrap();
    assert_eq!(enc.keys().next().map(String::as_str), Some("_id"));
    assert!(enc.get_object_id("_id").is_ok());
    let dec = c.decrypt_document(&enc, &Context::none()).unwrap();
    assert_eq!(dec.get_str("ssn").unwrap(), "1");
}

#[test]
fn fail_every_bit_flip_and_truncation_is_rejected() {
    for suite in Suite::ALL {
        let schema = Schema::builder()
            .field("v", Field::randomized("pii").suite(suite).pad_to(16))
            .build()
            .unwrap();
        let c = Cryptor::new(ring(), schema);
        let enc = c
            .encrypt_document(&doc! { "v": "secret value" }, &Context::none())
            .unwrap();
        let Bson::Binary(bin) = enc.get("v").unwrap() else {
            panic!()
        };
        for i in 0..bin.bytes.len() * 8 {
            let mut b = bin.bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let d = doc! { "v": Binary { subtype: bin.subtype, bytes: b } };
            let r = c.decrypt_document(&d, &Context::none());
            assert!(r.is_err(), "{suite}: flip of bit {i} accepted");
        }
        for len in 0..bin.bytes.len() {
            let d = doc! { "v": Binary { subtype: bin.subtype, bytes: bin.bytes[..len].to_vec() } };
            assert!(
                c.decrypt_document(&d, &Context::none()).is_err(),
                "{suite}: truncation to {len} accepted"
            );
        }
    }
}

#[test]
fn rotation_keeps_old_data_readable_and_new_writes_use_the_new_key() {
    let (keys, c) = ssn_cryptor();
    let ctx = Context::none();
    let old_key = keys.primary("pii").unwrap().id();
    let before = c.encrypt_document(&doc! { "ssn": "old" }, &ctx).unwrap();
    let new_key = keys.rotate("pii");
    assert_ne!(old_key, new_key);
    let after = c.encrypt_document(&doc! { "ssn": "new" }, &ctx).unwrap();
    let id_of = |d: &Document| {
        Cryptor::referenced_keys(&RawDocumentBuf::from_document(d).unwrap()).unwrap()
    };
    assert_eq!(id_of(&before), vec![old_key]);
    assert_eq!(id_of(&after), vec![new_key]);
    assert_eq!(
        c.decrypt_document(&before, &ctx)
            .unwrap()
            .get_str("ssn")
            .unwrap(),
        "old"
    );
    assert_eq!(
        c.decrypt_document(&after, &ctx)
            .unwrap()
            .get_str("ssn")
            .unwrap(),
        "new"
    );
    // Disabled: refused, and says which key; enabled again: readable.
    keys.set_state(&old_key, KeyState::Disabled).unwrap();
    match c.decrypt_document(&before, &ctx) {
        Err(Error::KeyDisabled(id)) => assert_eq!(id, old_key),
        other => panic!("{other:?}"),
    }
    keys.set_state(&old_key, KeyState::Active).unwrap();
    assert!(c.decrypt_document(&before, &ctx).is_ok());
    keys.destroy(&old_key).unwrap();
    assert!(matches!(
        c.decrypt_document(&before, &ctx),
        Err(Error::KeyDestroyed(_))
    ));
}

#[test]
fn fail_unknown_key_names_the_id() {
    let schema = Schema::builder()
        .field("x", Field::randomized("pii"))
        .build()
        .unwrap();
    let enc = Cryptor::new(ring(), schema)
        .encrypt_document(&doc! { "x": 1 }, &Context::none())
        .unwrap();
    let other = Cryptor::decrypt_only(ring());
    let err = other.decrypt_document(&enc, &Context::none()).unwrap_err();
    let Error::UnknownKey(id) = &err else {
        panic!("{err:?}")
    };
    assert!(err.to_string().contains(&id.to_string()));
}

/// A key whose usage counter starts at `used`, as primary of `pii`.
fn worn_key(used: u64) -> (Arc<InMemoryKeyring>, KeyId) {
    let keys = InMemoryKeyring::new();
    let id = KeyId::random();
    keys.insert(
        Key::from_material(
            id,
            "pii",
            KeyKind::Fieldcrypt,
            KeyState::Primary,
            KeyMaterial::generate(32),
            used,
        )
        .unwrap(),
    );
    (Arc::new(keys), id)
}

#[test]
fn usage_counts_are_exact_once_leases_are_settled_and_never_below_what_was_made() {
    // Three random-nonce fields and a deterministic one under `pii`: a walk leases 64
    // documents' worth (192 encryptions) and keeps the rest for the thread's next documents.
    let schema = Schema::builder()
        .field("x", Field::randomized("pii"))
        .field("y", Field::randomized("pii"))
        .field("z.$[]", Field::randomized("pii"))
        .field("d", Field::deterministic("pii"))
        .build()
        .unwrap();
    let (keys, id) = worn_key(0);
    let c = Cryptor::new(keys.clone(), schema.clone());
    let ctx = Context::none();
    let used = || keys.key(&id).unwrap().encryptions();

    c.encrypt_document(&doc! { "x": 1 }, &ctx).unwrap();
    assert_eq!(used(), 192, "one lease, held by this thread");
    c.settle_usage();
    assert_eq!(used(), 1);
    c.encrypt_document(&doc! { "d": 1 }, &ctx).unwrap();
    c.settle_usage();
    assert_eq!(used(), 1, "deterministic values use no nonce");
    // More values than fields (array elements), and documents beyond one lease: the counter
    // never falls below what was made.
    let mut made = 1;
    for i in 0..100 {
        c.encrypt_document(&doc! { "x": 1, "y": 2, "z": [1, 2, 3, 4, 5] }, &ctx)
            .unwrap();
        made += 7;
        assert!(
            (made..made + 192).contains(&used()),
            "{i}: {} / {made}",
            used()
        );
    }
    c.settle_usage();
    assert_eq!(used(), made);
    // Many documents on all cores: exact after the batch (`encrypt_many` settles).
    let docs: Vec<RawDocumentBuf> = (0..500)
        .map(|i| RawDocumentBuf::from_document(&doc! { "x": i, "d": i, "n": i }).unwrap())
        .collect();
    assert!(c.encrypt_many(&docs, &ctx).iter().all(Result::is_ok));
    assert_eq!(used(), made + 500);
    // Dropping the cryptor gives its threads' leases back too.
    c.encrypt_document(&doc! { "x": 1 }, &ctx).unwrap();
    assert!(used() > made + 501);
    drop(c);
    assert_eq!(used(), made + 501);

    // Near the limit a document gets what is left, one value at a time, and no more.
    let (keys, id) = worn_key(fieldcrypt::RANDOM_NONCE_LIMIT - 2);
    let c = Cryptor::new(keys.clone(), schema);
    let used = || keys.key(&id).unwrap().encryptions();
    c.encrypt_document(&doc! { "x": 1 }, &ctx).unwrap();
    assert_eq!(used(), fieldcrypt::RANDOM_NONCE_LIMIT - 1);
    let err = c
        .encrypt_document(&doc! { "x": 1, "y": 2 }, &ctx)
        .unwrap_err();
    assert!(matches!(err, Error::KeyUsageLimit { .. }), "{err:?}");
    assert_eq!(used(), fieldcrypt::RANDOM_NONCE_LIMIT);
    assert!(c.encrypt_document(&doc! { "d": 1 }, &ctx).is_ok());
    assert_eq!(used(), fieldcrypt::RANDOM_NONCE_LIMIT);
}

#[test]
fn explicit_values_count_usage_through_the_threads_lease_and_follow_rotation() {
    let schema = Schema::builder()
        .field("x", Field::randomized("pii"))
        .build()
        .unwrap();
    let (keys, id) = worn_key(0);
    let c = Cryptor::new(keys.clone(), schema.clone());
    let ctx = Context::none();
    let used = || keys.key(&id).unwrap().encryptions();
    let value = Bson::String("secret".into());

    // A value leases 64 encryptions for this thread; values and documents share the lease.
    c.encrypt_value("x", &value, &ctx, None, None).unwrap();
    assert_eq!(used(), 64);
    for _ in 0..99 {
        c.encrypt_value("x", &value, &ctx, None, None).unwrap();
    }
    c.encrypt_document(&doc! { "x": 1 }, &ctx).unwrap();
    assert!((101..101 + 64).contains(&used()), "{}", used());
    c.settle_usage();
    assert_eq!(used(), 101);

    // A rotation is seen by the next value: sealed under the new primary, readable by both.
    let new = keys.rotate("pii");
    let sealed = c.encrypt_value("x", &value, &ctx, None, None).unwrap();
    assert_eq!(&sealed.bytes[4..20], new.as_bytes());
    assert_eq!(
        c.decrypt_value("x", &sealed, &ctx, None, None).unwrap(),
        value
    );
    c.settle_usage();
    assert_eq!(used(), 101, "the old key makes no more");

    // Near the limit a value gets one encryption and no lease, and then none.
    let (keys, id) = worn_key(fieldcrypt::RANDOM_NONCE_LIMIT - 2);
    let c = Cryptor::new(keys.clone(), schema);
    let used = || keys.key(&id).unwrap().encryptions();
    c.encrypt_value("x", &value, &ctx, None, None).unwrap();
    assert_eq!(used(), fieldcrypt::RANDOM_NONCE_LIMIT - 1);
    c.encrypt_value("x", &value, &ctx, None, None).unwrap();
    let err = c.encrypt_value("x", &value, &ctx, None, None).unwrap_err();
    assert!(matches!(err, Error::KeyUsageLimit { .. }), "{err:?}");
    assert_eq!(used(), fieldcrypt::RANDOM_NONCE_LIMIT);
}

/// Explicit values use the per-thread key cache too: its handles follow keyring changes, on
/// every thread, as a walk's do, and a destroyed key decrypts no more.
#[test]
fn keys_cached_for_explicit_values_follow_keyring_changes_on_every_thread() {
    let (keys, c) = ssn_cryptor();
    let ctx = Context::namespace("app.users");
    let v = Bson::String("x".into());
    let old_key = keys.primary("pii").unwrap().id();
    let held = keys.key(&old_key).unwrap();
    let sealed = std::thread::scope(|s| {
        s.spawn(|| {
            let sealed = c.encrypt_value("ssn", &v, &ctx, None, None).unwrap();
            assert_eq!(
                c.decrypt_value("ssn", &sealed, &ctx, None, None).unwrap(),
                v
            );
            sealed
        })
        .join()
        .unwrap()
    });
    // The keyring's handle, ours, and the two the finished thread's cache keeps (its primary
    // and its last key looked up by id).
    assert_eq!(Arc::strong_count(&held), 4);
    keys.rotate("pii"); // the keyring now holds an `active` copy
    assert_eq!(Arc::strong_count(&held), 3);
    // A value on this thread drops the other thread's stale handles.
    let new = c.encrypt_value("ssn", &v, &ctx, None, None).unwrap();
    assert_ne!(new.bytes[4..20], sealed.bytes[4..20]);
    assert_eq!(Arc::strong_count(&held), 1, "only our own handle is left");
    assert_eq!(
        c.decrypt_value("ssn", &sealed, &ctx, None, None).unwrap(),
        v
    );
    let active = keys.key(&old_key).unwrap();
    assert_eq!(
        Arc::strong_count(&active),
        3,
        "the keyring's, ours and this thread's"
    );
    keys.destroy(&old_key).unwrap();
    let err = c
        .decrypt_value("ssn", &sealed, &ctx, None, None)
        .unwrap_err();
    assert!(!matches!(err, Error::Decrypt), "{err:?}");
    assert_eq!(
        Arc::strong_count(&active),
        1,
        "the cache let go of the destroyed key"
    );
    assert_eq!(c.decrypt_value("ssn", &new, &ctx, None, None).unwrap(), v);
}

#[test]
fn fail_usage_limit_asks_for_rotation() {
    let (keys, id) = worn_key(fieldcrypt::RANDOM_NONCE_LIMIT - 1);
    let schema = Schema::builder()
        .field("x", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(keys.clone(), schema);
    assert!(c
        .encrypt_document(&doc! { "x": 1 }, &Context::none())
        .is_ok());
    let err = c
        .encrypt_document(&doc! { "x": 2 }, &Context::none())
        .unwrap_err();
    assert!(matches!(err, Error::KeyUsageLimit { .. }));
    assert!(err.to_string().contains("rotate"));
    assert_eq!(
        keys.key(&id).unwrap().encryptions(),
        fieldcrypt::RANDOM_NONCE_LIMIT
    );
    // XChaCha20 has no such limit; after rotation AES-GCM works again.
    keys.rotate("pii");
    assert!(c
        .encrypt_document(&doc! { "x": 3 }, &Context::none())
        .is_ok());
}

#[test]
fn deterministic_fields_support_equality_and_leak_only_equality() {
    let keys = ring();
    let schema = Schema::builder()
        .field("email", Field::deterministic("det"))
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(keys.clone(), schema);
    let ctx = Context::namespace("app.users");
    let a = c
        .encrypt_document(&doc! { "email": "x@y.z", "ssn": "1" }, &ctx)
        .unwrap();
    let b = c
        .encrypt_document(&doc! { "email": "x@y.z", "ssn": "1" }, &ctx)
        .unwrap();
    assert_eq!(a.get("email"), b.get("email"));
    assert_ne!(a.get("ssn"), b.get("ssn"));
    let q = c
        .query_ciphertexts("email", &Bson::from("x@y.z"), &ctx, None)
        .unwrap();
    assert_eq!(Some(&Bson::Binary(q[0].clone())), a.get("email"));
    // After rotation, the query matches both old and new ciphertexts.
    keys.rotate("det");
    let q2 = c
        .query_ciphertexts("email", &Bson::from("x@y.z"), &ctx, None)
        .unwrap();
    assert_eq!(q2.len(), 2);
    assert!(q2
        .iter()
        .any(|x| Some(&Bson::Binary(x.clone())) == a.get("email")));
    assert!(matches!(
        c.query_ciphertexts("ssn", &Bson::from("1"), &ctx, None),
        Err(Error::UnsupportedQuery { .. })
    ));
}

#[test]
fn blind_index_only_and_with_encryption() {
    let keys = ring();
    let schema = Schema::builder()
        .field(
            "token",
            Field::blind_index_only(BlindIndex::new("idx").truncate(16)),
        )
        .field(
            "api_key",
            Field::randomized("pii").with_blind_index(BlindIndex::new("idx").name("api_key_hash")),
        )
        .build()
        .unwrap();
    let c = Cryptor::new(keys, schema);
    let ctx = Context::none();
    let enc = c
        .encrypt_document(&doc! { "token": "tok-123", "api_key": "ak-9" }, &ctx)
        .unwrap();
    assert!(
        enc.get("token").is_none(),
        "index-only field must not be stored"
    );
    let Bson::Binary(idx) = enc.get("token_bidx").unwrap() else {
        panic!()
    };
    assert_eq!(idx.bytes.len(), 1 + 16 + 16);
    assert!(enc.get("api_key_hash").is_some());
    assert!(is_envelope(enc.get("api_key").unwrap()));
    assert_eq!(
        c.blind_index_values("token", &Bson::from("tok-123"))
            .unwrap()[0],
        *idx
    );
    assert_ne!(
        c.blind_index_values("token", &Bson::from("tok-124"))
            .unwrap()[0],
        *idx
    );
    // Re-encrypting a decrypted document recomputes the index instead of duplicating it.
    let dec = c.decrypt_document(&enc, &ctx).unwrap();
    let again = c.encrypt_document(&dec, &ctx).unwrap();
    assert_eq!(again.keys().filter(|k| *k == "api_key_hash").count(), 1);
}

#[test]
fn padding_hides_length_within_a_bucket() {
    let schema = Schema::builder()
        .field("v", Field::randomized("pii").pad_to(32))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let len = |s: &str| {
        let d = c
            .encrypt_document(&doc! { "v": s }, &Context::none())
            .unwrap();
        let Bson::Binary(b) = d.get("v").unwrap() else {
            panic!()
        };
        b.bytes.len()
    };
    assert_eq!(len(""), len("a much longer value, 21"));
    assert_ne!(len(""), len(&"x".repeat(40)));
}

#[test]
fn fail_malformed_bson_is_an_error_not_a_panic() {
    let schema = Schema::builder()
        .field("a", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let good = rawdoc! { "a": "x", "b": { "c": 1 } };
    let bytes = good.as_bytes();
    for cut in 5..bytes.len() {
        let mut b = bytes[..cut].to_vec();
        let n = i32::try_from(b.len()).unwrap();
        b[..4].copy_from_slice(&n.to_le_bytes());
        b.push(0);
        if let Ok(d) = bson::RawDocument::from_bytes(&b) {
            let _ = c.encrypt_raw(d, &Context::none());
            let _ = c.decrypt_raw(d, &Context::none());
        }
    }
    for i in 4..bytes.len() {
        for v in [0u8, 0x7f, 0xff, 0x05, 0x03] {
            let mut b = bytes.to_vec();
            b[i] = v;
            if let Ok(d) = bson::RawDocument::from_bytes(&b) {
                let _ = c.encrypt_raw(d, &Context::none());
                let _ = c.decrypt_raw(d, &Context::none());
            }
        }
    }
}

#[test]
fn fail_dotted_names_that_spell_an_encrypted_path() {
    let schema = Schema::builder()
        .field("profile.email", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let err = c
        .encrypt_document(&doc! { "profile.email": "a@b.c" }, &Context::none())
        .unwrap_err();
    assert!(
        matches!(err, Error::Schema { ref path, .. } if path == "profile.email"),
        "{err:?}"
    );
    // Unrelated dotted names are left alone.
    assert!(c
        .encrypt_document(&doc! { "other.x": 1 }, &Context::none())
        .is_ok());
}

#[test]
fn many_matches_one_by_one() {
    let schema = Schema::builder()
        .field("n", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let docs: Vec<RawDocumentBuf> = (0..200).map(|i| rawdoc! { "_id": i, "n": i }).collect();
    let enc: Vec<RawDocumentBuf> = c
        .encrypt_many(&docs, &Context::none())
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let dec: Vec<RawDocumentBuf> = c
        .decrypt_many(&enc, &Context::none())
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(dec, docs);
}

#[test]
fn explicit_value_api_round_trips() {
    let schema = Schema::builder()
        .field("p.ssn", Field::randomized("pii").bind_id())
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let ctx = Context::namespace("db.c");
    let id = Bson::Int32(5);
    let ct = c
        .encrypt_value("p.ssn", &Bson::from("123-45"), &ctx, Some(&id), None)
        .unwrap();
    let v = c
        .decrypt_value("p.ssn", &ct, &ctx, Some(&id), None)
        .unwrap();
    assert_eq!(v, Bson::from("123-45"));
    assert!(c
        .decrypt_value("p.ssn", &ct, &ctx, Some(&Bson::Int32(6)), None)
        .is_err());
    assert!(c
        .encrypt_value("p.ssn", &Bson::from("x"), &ctx, None, None)
        .is_err());
}

/// Checks that `ct`, `v` encrypted alone at `v`, decrypts alone and inside a document, and
/// gives the ciphertext the document path makes for `v`.
fn alone_and_in_a_document(c: &Cryptor, ctx: &Context, v: &Bson, ct: &Binary) -> Binary {
    assert_eq!(&c.decrypt_value("v", ct, ctx, None, None).unwrap(), v);
    let in_doc = c
        .decrypt_document(&doc! { "v": Bson::Binary(ct.clone()) }, ctx)
        .unwrap();
    assert_eq!(in_doc.get("v"), Some(v));
    let enc = c.encrypt_document(&doc! { "v": v.clone() }, ctx).unwrap();
    match enc.get("v") {
        Some(Bson::Binary(from_doc)) => from_doc.clone(),
        _ => panic!("{enc:?}"),
    }
}

/// An explicit value is encoded straight into its envelope, which is sized before the
/// plaintext goes in: the ciphertext is one allocation of exactly its length (a vector that
/// grew while it held the plaintext would have left a copy in the allocation it gave up). The
/// same bytes decrypt, for every suite, padding and type, and match what a document holds.
#[test]
fn explicit_values_are_sealed_in_one_allocation_for_every_suite_padding_and_type() {
    let ctx = Context::namespace("db.c");
    let doc = every_type();
    let extra = [Bson::String("x".repeat(300)), Bson::String(String::new())];
    let values: Vec<&Bson> = doc.values().chain(&extra).collect();
    for suite in Suite::ALL {
        for pad in [None, Some(1), Some(16), Some(256)] {
            let field = Field::randomized("pii").suite(suite);
            let field = match pad {
                Some(p) => field.pad_to(p),
                None => field,
            };
            let c = Cryptor::new(ring(), Schema::builder().field("v", field).build().unwrap());
            for &v in &values {
                let ct = c.encrypt_value("v", v, &ctx, None, None).unwrap();
                assert_eq!(
                    ct.bytes.capacity(),
                    ct.bytes.len(),
                    "{suite:?} {pad:?} {v:?}"
                );
                let from_doc = alone_and_in_a_document(&c, &ctx, v, &ct);
                // The envelope's length is the document path's for the same value.
                assert_eq!(
                    from_doc.bytes.len(),
                    ct.bytes.len(),
                    "{suite:?} {pad:?} {v:?}"
                );
            }
        }
    }
}

#[test]
fn explicit_values_agree_with_documents_for_every_type_and_check_bindings() {
    let schema = Schema::builder()
        .field("v", Field::randomized("pii"))
        .field("tags.$[]", Field::deterministic("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let ctx = Context::namespace("db.c");
    let values = [
        Bson::from("text ✓"),
        Bson::Int32(-7),
        Bson::Int64(1 << 40),
        Bson::Double(2.5),
        Bson::Boolean(true),
        Bson::Null,
        Bson::DateTime(bson::DateTime::from_millis(1_700_000_000_000)),
        Bson::ObjectId(bson::oid::ObjectId::new()),
        Bson::Document(doc! { "nested": [1, "two"] }),
        // Keys that serde would read as extended JSON stay a plain document.
        Bson::Document(doc! { "$date": "not a date", "$numberLong": "5" }),
        Bson::Document(doc! { "$oid": 1 }),
        Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: vec![1, 2, 3],
        }),
        Bson::Decimal128(bson::Decimal128::from_bytes([3; 16])),
        Bson::RegularExpression(bson::Regex {
            pattern: "^a.*z$".into(),
            options: "i".into(),
        }),
        Bson::Timestamp(bson::Timestamp {
            time: 7,
            increment: 9,
        }),
        Bson::JavaScriptCode("function () {}".into()),
        Bson::Symbol("sym".into()),
        Bson::MinKey,
        Bson::MaxKey,
        Bson::Undefined,
    ];
    for v in &values {
        // A value encrypted alone decrypts alone and inside its document, and back.
        let ct = c.encrypt_value("v", v, &ctx, None, None).unwrap();
        let from_doc = alone_and_in_a_document(&c, &ctx, v, &ct);
        assert_eq!(
            &c.decrypt_value("v", &from_doc, &ctx, None, None).unwrap(),
            v
        );
        // Deterministic per-element values: the same ciphertext either way; `$[]` optional.
        let one = c.encrypt_value("tags.$[]", v, &ctx, None, None).unwrap();
        let enc = c
            .encrypt_document(&doc! { "tags": [v.clone()] }, &ctx)
            .unwrap();
        assert_eq!(enc.get_array("tags").unwrap()[0], Bson::Binary(one.clone()));
        assert_eq!(
            &c.decrypt_value("tags.$[]", &one, &ctx, None, None).unwrap(),
            v
        );
        assert_eq!(&c.decrypt_value("tags", &one, &ctx, None, None).unwrap(), v);
        // Bound to its path and namespace: elsewhere it does not authenticate.
        assert!(matches!(
            c.decrypt_value("tags", &ct_of(&c, v), &ctx, None, None),
            Err(Error::Decrypt)
        ));
        let other = Context::namespace("db.other");
        assert!(matches!(
            c.decrypt_value("v", &ct_of(&c, v), &other, None, None),
            Err(Error::Decrypt)
        ));
    }
    // `_id` and owner bindings: the right ones open it, others do not, none is refused.
    let owned = Schema::builder()
        .owner_field("tenant")
        .field("v", Field::randomized("pii").bind_id())
        .build()
        .unwrap();
    let keys = ring();
    let o = Cryptor::new(keys.clone(), owned);
    let (id, acme) = (Bson::Int32(1), Bson::from("acme"));
    let ct = o
        .encrypt_value("v", &Bson::from("x"), &ctx, Some(&id), Some(&acme))
        .unwrap();
    assert_eq!(
        o.decrypt_value("v", &ct, &ctx, Some(&id), Some(&acme))
            .unwrap(),
        Bson::from("x")
    );
    assert!(matches!(
        o.decrypt_value("v", &ct, &ctx, Some(&Bson::Int32(2)), Some(&acme)),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        o.decrypt_value("v", &ct, &ctx, Some(&id), Some(&Bson::from("globex"))),
        Err(Error::Decrypt)
    ));
    assert!(matches!(
        o.decrypt_value("v", &ct, &ctx, None, Some(&acme)),
        Err(Error::MissingContext(_))
    ));
    // Without an owner field (in the schema or the context) the owner given is not used, as
    // in a document walk: the owner-bound value cannot be opened.
    let no_owner_field = Cryptor::new(
        keys,
        Schema::builder()
            .field("v", Field::randomized("pii").bind_id())
            .build()
            .unwrap(),
    );
    assert!(matches!(
        no_owner_field.decrypt_value("v", &ct, &ctx, Some(&id), Some(&acme)),
        Err(Error::MissingContext(_))
    ));
    // A value written without a namespace is refused where the namespace is known.
    let loose = c
        .encrypt_value("v", &Bson::from("x"), &Context::none(), None, None)
        .unwrap();
    assert!(matches!(
        c.decrypt_value("v", &loose, &ctx, None, None),
        Err(Error::UnboundCiphertext {
            missing: "namespace",
            ..
        })
    ));
    // A binary that is not a ciphertext is returned as it is.
    let plain = Binary {
        subtype: BinarySubtype::Generic,
        bytes: b"not encrypted".to_vec(),
    };
    assert_eq!(
        c.decrypt_value("v", &plain, &ctx, None, None).unwrap(),
        Bson::Binary(plain.clone())
    );
    // A truncated envelope is an error, not a panic.
    let mut cut = c
        .encrypt_value("v", &Bson::from("x"), &ctx, None, None)
        .unwrap();
    cut.bytes.truncate(10);
    assert!(c.decrypt_value("v", &cut, &ctx, None, None).is_err());
}

/// `v` encrypted as the field `v` (for checks that another path does not open it).
fn ct_of(c: &Cryptor, v: &Bson) -> Binary {
    c.encrypt_value("v", v, &Context::namespace("db.c"), None, None)
        .unwrap()
}

#[test]
fn paths_go_through_nested_arrays() {
    let schema = Schema::builder()
        .field("a.b", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let plain = doc! { "a": [[{ "b": "deep secret" }, [{ "b": "deeper" }]], { "b": "shallow" }] };
    let enc = c.encrypt_document(&plain, &Context::none()).unwrap();
    let raw = RawDocumentBuf::from_document(&enc).unwrap();
    for secret in ["deep secret", "deeper", "shallow"] {
        assert!(
            !raw.as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "{secret} stored in clear"
        );
    }
    assert_eq!(c.decrypt_document(&enc, &Context::none()).unwrap(), plain);
}

#[test]
fn fail_values_bound_more_loosely_than_their_context() {
    let keys = ring();
    let loose = Cryptor::new(
        keys.clone(),
        Schema::builder()
            .field("ssn", Field::randomized("pii"))
            .build()
            .unwrap(),
    );
    // Written without a namespace (e.g. an offline encrypt without --namespace)...
    let unbound = loose
        .encrypt_document(&doc! { "_id": 1, "ssn": "1" }, &Context::none())
        .unwrap();
    // ...is refused when read under one: it could have been moved from anywhere.
    let err = loose
        .decrypt_document(&unbound, &Context::namespace("db.c"))
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnboundCiphertext { missing: "namespace", path } if path == "ssn"),
        "{err:?}"
    );
    // In an owner-scoped collection, a value without an owner binding is refused.
    let scoped = Cryptor::new(
        keys.clone(),
        Schema::builder()
            .field("ssn", Field::randomized("pii"))
            .owner_field("owner")
            .build()
            .unwrap(),
    );
    let ns_only = loose
        .encrypt_document(&doc! { "_id": 1, "ssn": "1" }, &Context::namespace("db.c"))
        .unwrap();
    let mut planted = ns_only.clone();
    planted.insert("owner", "alice");
    assert!(matches!(
        scoped.decrypt_document(&planted, &Context::namespace("db.c")),
        Err(Error::UnboundCiphertext {
            missing: "owner",
            ..
        })
    ));
    // Where the schema binds a field to _id, an unbound value is refused.
    let bound = Cryptor::new(
        keys,
        Schema::builder()
            .field("ssn", Field::randomized("pii").bind_id())
            .build()
            .unwrap(),
    );
    assert!(matches!(
        bound.decrypt_document(&ns_only, &Context::namespace("db.c")),
        Err(Error::UnboundCiphertext { missing: "_id", .. })
    ));
}

#[test]
fn fail_unencodable_values_are_errors_without_the_value() {
    let schema = Schema::builder()
        .field("r", Field::deterministic("det"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring(), schema);
    let bad = Bson::RegularExpression(bson::Regex {
        pattern: "SECRET\0PATTERN".into(),
        options: String::new(),
    });
    let err = c
        .query_ciphertexts("r", &bad, &Context::none(), None)
        .unwrap_err();
    assert!(!err.to_string().contains("SECRET"), "{err}");
    // The same value anywhere in a document: the error names no part of it.
    let err = c
        .encrypt_document(&doc! { "other": bad.clone() }, &Context::none())
        .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("SECRET"), "{err:?}");
}

#[test]
fn fail_documents_nested_too_deep() {
    let c = Cryptor::decrypt_only(ring());
    let mut d = doc! { "x": 1 };
    for _ in 0..200 {
        d = doc! { "n": d };
    }
    let raw = RawDocumentBuf::from_document(&d).unwrap();
    assert!(matches!(
        c.decrypt_raw(&raw, &Context::none()),
        Err(Error::MalformedBson(_))
    ));
    let mut ok = doc! { "x": 1 };
    for _ in 0..90 {
        ok = doc! { "n": ok };
    }
    assert!(c
        .decrypt_raw(
            &RawDocumentBuf::from_document(&ok).unwrap(),
            &Context::none()
        )
        .is_ok());
}

/// A cryptor keeps, per thread, the keys its last walk used (no shared lock or counter per
/// document). A keyring change on one thread is seen by the next document on every thread,
/// and the next walk anywhere drops every thread's stale handles.
#[test]
fn keys_cached_per_thread_follow_keyring_changes_and_go_at_the_next_walk() {
    let (keys, c) = ssn_cryptor();
    let ctx = Context::none();
    let id_of = |d: &Document| {
        Cryptor::referenced_keys(&RawDocumentBuf::from_document(d).unwrap()).unwrap()
    };
    let old_key = keys.primary("pii").unwrap().id();
    let held = keys.key(&old_key).unwrap();
    let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
    let (to_main, from_worker) = std::sync::mpsc::channel::<Document>();
    std::thread::scope(|s| {
        let (c, ctx, to_main) = (&c, &ctx, to_main);
        s.spawn(move || {
            for _ in 0..2 {
                from_main.recv().unwrap();
                let d = c.encrypt_document(&doc! { "ssn": "x" }, ctx).unwrap();
                to_main.send(d).unwrap();
            }
        });
        to_worker.send(()).unwrap();
        let first = from_worker.recv().unwrap();
        assert_eq!(id_of(&first), vec![old_key]);
        // The keyring's handle, ours, and the one the worker's walk left in its cache.
        assert_eq!(Arc::strong_count(&held), 3);
        let new_key = keys.rotate("pii"); // the keyring now holds an `active` copy
        assert_eq!(Arc::strong_count(&held), 2, "ours and the worker's");
        // A walk on this thread drops the worker's stale handle, though the worker is idle.
        assert_eq!(
            c.decrypt_document(&first, ctx)
                .unwrap()
                .get_str("ssn")
                .unwrap(),
            "x"
        );
        assert_eq!(Arc::strong_count(&held), 1, "only our own handle is left");
        to_worker.send(()).unwrap();
        let second = from_worker.recv().unwrap();
        assert_eq!(id_of(&second), vec![new_key], "the worker saw the rotation");
        keys.destroy(&old_key).unwrap();
        assert!(matches!(
            c.decrypt_document(&first, ctx),
            Err(Error::KeyDestroyed(_))
        ));
        assert_eq!(
            c.decrypt_document(&second, ctx)
                .unwrap()
                .get_str("ssn")
                .unwrap(),
            "x"
        );
    });
}

/// A keyring that rotates its alias while a walk looks the primary up: the walk's keys are
/// then of a generation the keyring has left, and must not be kept for the next walk.
struct RotatesDuringLookup {
    inner: Arc<InMemoryKeyring>,
    rotated: std::sync::atomic::AtomicBool,
}

impl Keyring for RotatesDuringLookup {
    fn key(&self, id: &KeyId) -> fieldcrypt::Result<Arc<Key>> {
        self.inner.key(id)
    }
    fn primary(&self, alias: &str) -> fieldcrypt::Result<Arc<Key>> {
        let key = self.inner.primary(alias)?;
        if !self.rotated.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.inner.rotate(alias);
        }
        Ok(key)
    }
    fn readable_keys(&self, alias: &str) -> fieldcrypt::Result<Vec<Arc<Key>>> {
        self.inner.readable_keys(alias)
    }
    fn generation(&self) -> Option<u64> {
        self.inner.generation()
    }
}

#[test]
fn keys_of_a_walk_overtaken_by_a_keyring_change_are_not_kept() {
    let keys = ring();
    let held = keys.primary("pii").unwrap();
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(
        RotatesDuringLookup {
            inner: keys.clone(),
            rotated: false.into(),
        },
        schema,
    );
    let d = c
        .encrypt_document(&doc! { "ssn": "x" }, &Context::none())
        .unwrap();
    assert_eq!(
        Cryptor::referenced_keys(&RawDocumentBuf::from_document(&d).unwrap()).unwrap(),
        vec![held.id()]
    );
    // The keyring holds an `active` copy now; the walk's handle was not cached.
    assert_eq!(Arc::strong_count(&held), 1);
}
