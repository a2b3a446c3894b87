//! Queryable Encryption (FLE2 v2) interop against values and key documents made by
//! libmongocrypt itself, and libmongocrypt's own stored-form test vectors.
//!
//! Fixtures: `tests/fixtures/qe/`, written by `generate.py` there (PyMongo `ClientEncryption`,
//! `local` KMS provider; versions in `versions.json`); the vectors are in
//! `tests/fixtures/qe/libmongocrypt/` (Apache-2.0, origin in its README). Python runs only in
//! `libmongocrypt_decrypts_what_fieldcrypt_writes`, through the test kit's venv.
#![allow(clippy::unwrap_used)] // test helpers: a panic is a failed test

use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{Binary, Bson, Document};
use fieldcrypt::{
    Context, Cryptor, CsfleDataKey, CsfleKeySet, Error, InMemoryKeyring, Key, KeyId, KeyKind,
    KeyState, LocalMasterKey, QeValueKind, SAFE_CONTENT_FIELD,
};
use fieldcrypt_testkit::fixtures::{assert_every_bit_flip_fails, same, Interop};

const QE: Interop = Interop::QE;

fn keys() -> CsfleKeySet {
    QE.key_set("keys.jsonl")
}

fn vector_keys() -> CsfleKeySet {
    QE.key_set("vector-keys.jsonl")
}

fn binary(d: &Document, field: &str) -> Binary {
    match d.get(field) {
        Some(Bson::Binary(b)) => b.clone(),
        other => panic!("{field}: {other:?}"),
    }
}

struct Case {
    name: String,
    key_id: KeyId,
    value: Bson,
    ciphertext: Binary,
}

fn cases() -> Vec<Case> {
    QE.lines("values.jsonl")
        .into_iter()
        .map(|d| Case {
            name: d.get_str("name").unwrap().to_owned(),
            key_id: KeyId::from_slice(&binary(&d, "key_id").bytes).unwrap(),
            value: d.get("value").unwrap().clone(),
            ciphertext: binary(&d, "ciphertext"),
        })
        .collect()
}

fn case(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).unwrap()
}

struct Vector {
    name: String,
    kind: QeValueKind,
    keys: String,
    ciphertext: Binary,
    value: Bson,
}

fn vectors() -> Vec<Vector> {
    QE.lines("vectors.jsonl")
        .into_iter()
        .map(|d| Vector {
            name: d.get_str("name").unwrap().to_owned(),
            kind: QeValueKind::ALL
                .into_iter()
                .find(|k| k.short_name() == d.get_str("kind").unwrap())
                .unwrap(),
            keys: d.get_str("keys").unwrap().to_owned(),
            ciphertext: binary(&d, "ciphertext"),
            value: d.get("value").unwrap().clone(),
        })
        .collect()
}

fn vector(name: &str) -> Vector {
    vectors().into_iter().find(|v| v.name == name).unwrap()
}

fn key_set_of(v: &Vector) -> CsfleKeySet {
    if v.keys == "keys" {
        keys()
    } else {
        vector_keys()
    }
}

#[test]
fn fixture_inventory() {
    let cases = cases();
    assert!(cases.len() >= 35, "{}", cases.len());
    assert!(cases
        .iter()
        .all(|c| QeValueKind::of(&c.ciphertext.bytes) == Some(QeValueKind::Unindexed)));
    let vectors = vectors();
    for kind in QeValueKind::ALL {
        assert!(vectors.iter().any(|v| v.kind == kind), "{kind}");
    }
    assert_eq!(QE.lines("refused.jsonl").len(), 4);
}

#[test]
fn decrypts_every_libmongocrypt_unindexed_value() {
    let set = keys();
    for c in cases() {
        assert_eq!(c.ciphertext.subtype, BinarySubtype::Encrypted);
        let plain = set
            .decrypt_value(&c.ciphertext)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert!(same(&plain, &c.value), "{}: {plain:?}", c.name);
        let key = set.get(&c.key_id).unwrap();
        assert!(same(&key.decrypt_value(&c.ciphertext).unwrap(), &c.value));
    }
}

/// The `iev-v2` vectors with their keys exactly as libmongocrypt publishes them (hex, in
/// clear), independently of key documents and master keys.
#[test]
fn known_answers_from_libmongocrypt_iev_v2_vectors() {
    let dir = QE.path("libmongocrypt");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("iev-v2-") {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let hex = |f: &str| hex::decode(v[f].as_str().unwrap()).unwrap();
        let key = |id: &str, material: &str| {
            let m: [u8; 96] = hex(material).try_into().unwrap();
            let id: KeyId = bson::Uuid::parse_str(v[id].as_str().unwrap())
                .unwrap()
                .into();
            CsfleDataKey::from_material(id, secrecy::SecretBox::new(Box::new(m)), vec![]).unwrap()
        };
        let mut set = CsfleKeySet::new();
        set.insert(key("S_KeyId", "S_Key")).unwrap();
        set.insert(key("K_KeyId", "K_Key")).unwrap();
        let ct = Binary {
            subtype: BinarySubtype::Encrypted,
            bytes: hex("payload"),
        };
        let t = u8::try_from(v["bson_value_type"].as_u64().unwrap()).unwrap();
        let mut doc = vec![0u8; 4];
        doc.push(t);
        doc.extend_from_slice(b"v\0");
        doc.extend_from_slice(&hex("bson_value"));
        doc.push(0);
        let len = u32::try_from(doc.len()).unwrap().to_le_bytes();
        doc[..4].copy_from_slice(&len);
        let expected = bson::Document::from_reader(&doc[..]).unwrap();
        let got = set.decrypt_value(&ct).unwrap();
        assert!(same(&got, expected.get("v").unwrap()), "{name}: {got:?}");
        // The metadata blocks are where the layout says: the last 96 × n bytes.
        let blocks = v["metadata"].as_array().unwrap();
        let tail: Vec<u8> = blocks
            .iter()
            .flat_map(|b| hex::decode(b.as_str().unwrap()).unwrap())
            .collect();
        assert!(ct.bytes.ends_with(&tail), "{name}");
        n += 1;
    }
    assert_eq!(n, 4);
}

#[test]
fn decrypts_libmongocrypt_vectors_with_wrapped_keys() {
    for v in vectors() {
        let got = key_set_of(&v)
            .decrypt_value(&v.ciphertext)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert!(same(&got, &v.value), "{}: {got:?}", v.name);
        // Through a keyring and the document transform, as `fieldcrypt decrypt` reads them.
        let cryptor = Cryptor::decrypt_only(QE.keyring(if v.keys == "keys" {
            "keys.jsonl"
        } else {
            "vector-keys.jsonl"
        }));
        let got = cryptor
            .decrypt_value("x", &v.ciphertext, &Context::none(), None, None)
            .unwrap();
        assert!(same(&got, &v.value), "{}", v.name);
        let doc = bson::doc! { "x": v.ciphertext.clone(), "a": [v.ciphertext.clone()] };
        let out = cryptor.decrypt_document(&doc, &Context::none()).unwrap();
        assert!(same(out.get("x").unwrap(), &v.value), "{}", v.name);
        assert!(same(&out.get_array("a").unwrap()[0], &v.value));
    }
}

/// The inner key of an indexed value is found once the outer key is in the keyring (what a
/// key-vault prefetch does in its second round), and only then.
#[test]
fn inner_keys_are_found_with_the_outer_key() {
    let v = vector("iev-v2-FLECrudTest-insertOneV2");
    let doc = bson::rawdoc! { "a": { "b": [v.ciphertext.clone()] } };
    let all = vector_keys();
    let s_id = KeyId::from_slice(&v.ciphertext.bytes[1..17]).unwrap();
    let k_id = all
        .iter()
        .map(CsfleDataKey::id)
        .find(|id| *id != s_id)
        .unwrap();
    assert_eq!(Cryptor::referenced_keys(&doc).unwrap(), [s_id]);
    let both = Cryptor::decrypt_only(QE.keyring("vector-keys.jsonl"));
    assert_eq!(both.qe_client_keys(&doc).unwrap(), [k_id]);
    // Without the outer key nothing can be said; unindexed values and keys equal to the outer
    // one are not listed.
    assert!(Cryptor::decrypt_only(InMemoryKeyring::new())
        .qe_client_keys(&doc)
        .unwrap()
        .is_empty());
    let same = vector("explicit-decrypt-FLE2IndexedEqualityEncryptedValueV2");
    let unindexed = case("string").ciphertext;
    let doc = bson::rawdoc! { "x": same.ciphertext, "y": unindexed };
    assert!(Cryptor::decrypt_only(QE.keyring("keys.jsonl"))
        .qe_client_keys(&doc)
        .unwrap()
        .is_empty());
}

#[test]
fn cryptor_reads_a_qe_document_like_libmongocrypt() {
    let (encrypted, expected) = QE.document();
    let (encrypted, expected) = (&encrypted, &expected);
    assert!(expected.contains_key(SAFE_CONTENT_FIELD));
    // The key set keeps everything libmongocrypt keeps.
    let decrypted = keys().decrypt_document(encrypted).unwrap();
    assert!(same(
        &Bson::Document(decrypted),
        &Bson::Document(expected.clone())
    ));
    // The transform, keys in one keyring (with fieldcrypt keys beside them): `__safeContent__`
    // only when asked.
    let ring = QE.keyring("keys.jsonl");
    ring.generate("pii");
    let cryptor = Cryptor::decrypt_only(ring);
    let kept = cryptor
        .decrypt_document(encrypted, &Context::none().with_safe_content(true))
        .unwrap();
    assert!(same(
        &Bson::Document(kept),
        &Bson::Document(expected.clone())
    ));
    let dropped = cryptor
        .decrypt_document(encrypted, &Context::none())
        .unwrap();
    let mut want = expected.clone();
    want.remove(SAFE_CONTENT_FIELD);
    assert!(same(&Bson::Document(dropped), &Bson::Document(want)));
    // Only the top-level field is QE's: a nested one is data.
    let nested = bson::doc! { "d": { SAFE_CONTENT_FIELD: [1] } };
    assert_eq!(
        cryptor.decrypt_document(&nested, &Context::none()).unwrap(),
        nested
    );
    // The raw path gives the same bytes as the owned one.
    let raw = bson::RawDocumentBuf::from_document(encrypted).unwrap();
    let out = cryptor.decrypt_raw(&raw, &Context::none()).unwrap();
    assert_eq!(
        out.to_document().unwrap(),
        cryptor
            .decrypt_document(encrypted, &Context::none())
            .unwrap()
    );
    // Prefetch sees every key the values name (for indexed ones, S_KeyId).
    let ids = Cryptor::referenced_keys(&raw).unwrap();
    assert_eq!(ids.len(), 3, "{ids:?}");
}

#[test]
fn unindexed_writes_look_like_libmongocrypt_and_round_trip() {
    let set = keys();
    for c in cases() {
        let key = set.get(&c.key_id).unwrap();
        let a = key.encrypt_qe_unindexed(&c.value).unwrap();
        let b = key.encrypt_qe_unindexed(&c.value).unwrap();
        assert_ne!(a, b, "{}: random IVs", c.name);
        assert_eq!(a.subtype, BinarySubtype::Encrypted);
        assert_eq!(a.bytes.len(), c.ciphertext.bytes.len(), "{}", c.name);
        assert_eq!(a.bytes[..18], c.ciphertext.bytes[..18], "{}", c.name);
        assert!(
            same(&set.decrypt_value(&a).unwrap(), &c.value),
            "{}",
            c.name
        );
    }
}

#[test]
fn refuses_exactly_what_libmongocrypt_refuses() {
    let key = keys();
    let key = key.get_by_alt_name("qe-key-1").unwrap();
    for r in QE.lines("refused.jsonl") {
        match key.encrypt_qe_unindexed(r.get("value").unwrap()) {
            Err(Error::UnsupportedType { .. }) => {}
            other => panic!("{}: {other:?}", r.get_str("name").unwrap()),
        }
    }
    assert!(matches!(
        key.encrypt_qe_unindexed(&Bson::Undefined),
        Err(Error::UnsupportedType { .. })
    ));
}

#[test]
fn libmongocrypt_decrypts_what_fieldcrypt_writes() {
    let master = QE.master_key();
    let key = CsfleDataKey::generate(vec!["qe-made-by-fieldcrypt".into()]).unwrap();
    let key_doc = key.to_key_document(&master);
    let mut out = key_doc.to_extended_json();
    out.push('\n');
    let mut n = 0;
    for c in cases() {
        let mut line = Document::new();
        line.insert("name", c.name.as_str());
        line.insert("value", c.value.clone());
        line.insert("ciphertext", key.encrypt_qe_unindexed(&c.value).unwrap());
        out.push_str(&Bson::Document(line).into_canonical_extjson().to_string());
        out.push('\n');
        n += 1;
    }
    let run = QE.verify_fieldcrypt_output(&out, "qe_interop");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "libmongocrypt rejected fieldcrypt's QE output:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "libmongocrypt decrypted all {n} fieldcrypt QE values, explicitly and automatically"
        )),
        "{stdout}"
    );
}

/// Every single-bit flip of an unindexed value fails: the whole value is authenticated.
#[test]
fn fail_every_single_bit_flip_unindexed() {
    let set = keys();
    for c in [case("string"), case("int64"), case("document")] {
        // A header flip may also turn it into another QE form, or into FLE1.
        assert_every_bit_flip_fails(&set, &c.name, &c.ciphertext);
    }
}

/// Indexed values authenticate only `K_KeyId` and the value (docs/QE.md): every flip there
/// fails; flips in the metadata blocks and the text tag counts, which decryption does not use,
/// change nothing; a flip of the type byte is refused or reads the same bytes as the new type;
/// no flip panics.
#[test]
fn fail_single_bit_flips_indexed_as_documented() {
    for v in vectors() {
        if !v.kind.is_indexed() || v.name.ends_with("TextLarge") {
            continue;
        }
        let set = key_set_of(&v);
        let bytes = &v.ciphertext.bytes;
        let counts = match v.kind {
            QeValueKind::Range => 1,
            QeValueKind::Text => 12,
            _ => 0,
        };
        let blocks = match v.kind {
            QeValueKind::Equality => 1,
            QeValueKind::Range => usize::from(bytes[18]),
            _ => usize::try_from(u32::from_le_bytes(bytes[18..22].try_into().unwrap())).unwrap(),
        };
        let metadata_at = bytes.len() - 96 * blocks;
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut t = v.ciphertext.clone();
                t.bytes[i] ^= 1 << bit;
                let r = set.decrypt_value(&t);
                let ok_same = matches!(&r, Ok(x) if same(x, &v.value));
                let fine = match i {
                    0 => r.is_err(),
                    1..=16 => matches!(r, Err(Error::UnknownKey(_))),
                    // The type byte is not authenticated: refused, or the same bytes read as
                    // the new type ("foo" is 8 bytes, as an int64 is).
                    17 => match &r {
                        Err(_) => true,
                        Ok(x) => x.element_type() as u8 == t.bytes[17],
                    },
                    // Range edge count and text edge count: the layout moves, decryption fails.
                    18 if v.kind == QeValueKind::Range => r.is_err(),
                    18..=21 if v.kind == QeValueKind::Text => r.is_err(),
                    // Text substring and suffix counts: not used to decrypt.
                    22..=29 if v.kind == QeValueKind::Text => r.is_err() || ok_same,
                    i if i >= metadata_at => ok_same,
                    _ => matches!(r, Err(Error::UnknownKey(_) | Error::Decrypt)),
                };
                assert!(
                    fine,
                    "{} byte {i} (counts {counts}) bit {bit}: {r:?}",
                    v.name
                );
            }
        }
    }
}

/// The type byte of an indexed value is not authenticated: a relabelling to a type the form
/// may hold and whose encoding fits the bytes decrypts as that type (docs/QE.md says so);
/// every other relabelling fails.
#[test]
fn indexed_type_byte_is_checked_but_not_authenticated() {
    let v = vector("explicit-decrypt-FLE2IndexedRangeEncryptedValueV2");
    assert!(same(&v.value, &Bson::Int32(123)));
    let set = key_set_of(&v);
    for t in 0..=255u8 {
        let mut b = v.ciphertext.clone();
        b.bytes[17] = t;
        let r = set.decrypt_value(&b);
        if t == 0x10 {
            assert!(same(&r.unwrap(), &Bson::Int32(123)));
        } else {
            assert!(r.is_err(), "type {t:#x}: {r:?}");
        }
    }
}

#[test]
fn fail_every_truncation_and_extension() {
    let mut victims: Vec<(CsfleKeySet, Binary)> = vec![
        (keys(), case("string").ciphertext),
        (keys(), case("document").ciphertext),
    ];
    for v in vectors() {
        if !v.name.ends_with("TextLarge") {
            victims.push((key_set_of(&v), v.ciphertext));
        }
    }
    for (set, ct) in victims {
        for len in 0..ct.bytes.len() {
            let mut t = ct.clone();
            t.bytes.truncate(len);
            let r = set.decrypt_value(&t);
            assert!(
                matches!(
                    r,
                    Err(Error::MalformedCiphertext(_) | Error::Decrypt | Error::UnknownKey(_))
                ),
                "len {len}: {r:?}"
            );
        }
        for extra in [1usize, 15, 16, 96] {
            let mut t = ct.clone();
            t.bytes.resize(t.bytes.len() + extra, 0);
            assert!(set.decrypt_value(&t).is_err(), "+{extra}");
        }
    }
}

fn generate_material() -> secrecy::SecretBox<[u8; 96]> {
    let master = LocalMasterKey::generate();
    let doc = CsfleDataKey::generate(vec![])
        .unwrap()
        .to_key_document(&master);
    master.unwrap(&doc.key_material).unwrap()
}

#[test]
fn fail_wrong_key() {
    // Unindexed: same id, other material.
    let c = case("string");
    let impostor = CsfleDataKey::from_material(c.key_id, generate_material(), vec![]).unwrap();
    assert!(matches!(
        impostor.decrypt_value(&c.ciphertext),
        Err(Error::Decrypt)
    ));
    // Another key of the set than the value names.
    let set = keys();
    let other = set.iter().find(|k| k.id() != c.key_id).unwrap();
    assert!(
        matches!(other.decrypt_value(&c.ciphertext), Err(Error::UnknownKey(id)) if id == c.key_id)
    );
    // Indexed: a wrong S_Key gives a K_KeyId nobody has; a wrong K_Key fails to authenticate.
    let v = vector("iev-v2-FLECrudTest-insertOneV2");
    let good = vector_keys();
    let s_id = KeyId::from_slice(&v.ciphertext.bytes[1..17]).unwrap();
    let k_id = good
        .iter()
        .map(CsfleDataKey::id)
        .find(|id| *id != s_id)
        .unwrap();
    let mut wrong_s = CsfleKeySet::new();
    wrong_s
        .insert(CsfleDataKey::from_material(s_id, generate_material(), vec![]).unwrap())
        .unwrap();
    let docs = QE.key_documents("vector-keys.jsonl");
    let k_doc = docs.iter().find(|d| d.id == k_id).unwrap();
    wrong_s
        .insert(k_doc.unwrap_with(&QE.master_key()).unwrap())
        .unwrap();
    assert!(matches!(
        wrong_s.decrypt_value(&v.ciphertext),
        Err(Error::UnknownKey(id)) if id != k_id
    ));
    let mut wrong_k = CsfleKeySet::new();
    let s_doc = docs.iter().find(|d| d.id == s_id).unwrap();
    wrong_k
        .insert(s_doc.unwrap_with(&QE.master_key()).unwrap())
        .unwrap();
    // Without K_Key: the error names it (so a key vault can be asked for it).
    assert!(matches!(
        wrong_k.decrypt_value(&v.ciphertext),
        Err(Error::UnknownKey(id)) if id == k_id
    ));
    wrong_k
        .insert(CsfleDataKey::from_material(k_id, generate_material(), vec![]).unwrap())
        .unwrap();
    assert!(matches!(
        wrong_k.decrypt_value(&v.ciphertext),
        Err(Error::Decrypt)
    ));
    // A fieldcrypt key under the id: a key-misuse error, not a panic.
    let ring = InMemoryKeyring::new();
    ring.insert(Key::generate("x", KeyKind::Fieldcrypt, KeyState::Primary));
    let fc_id = ring.keys()[0].id();
    let mut b = c.ciphertext.clone();
    b.bytes[1..17].copy_from_slice(fc_id.as_bytes());
    let r = Cryptor::decrypt_only(ring).decrypt_value("x", &b, &Context::none(), None, None);
    assert!(matches!(r, Err(Error::KeyMisuse { .. })), "{r:?}");
}

#[test]
fn fail_wrong_subtype() {
    let set = keys();
    let c = case("string");
    let mut generic = c.ciphertext.clone();
    generic.subtype = BinarySubtype::Generic;
    assert!(matches!(
        set.decrypt_value(&generic),
        Err(Error::MalformedCiphertext(_))
    ));
    // Relabelled as another blob subtype: parsed as that form (or FLE1) and refused.
    for blob in [1u8, 2, 3, 6, 11, 12, 14, 15, 17, 18] {
        let mut b = c.ciphertext.clone();
        b.bytes[0] = blob;
        let r = set.decrypt_value(&b);
        assert!(r.is_err(), "{blob}: {r:?}");
    }
    // Insert and find payloads (11, 12) are no stored values: the document walk leaves them.
    let cryptor = Cryptor::decrypt_only(QE.keyring("keys.jsonl"));
    let mut payload = c.ciphertext.clone();
    payload.bytes[0] = 11;
    let doc = bson::doc! { "p": payload.clone() };
    assert_eq!(
        cryptor.decrypt_document(&doc, &Context::none()).unwrap(),
        doc
    );
}

#[test]
fn errors_and_debug_carry_no_secrets() {
    let set = keys();
    let b64 = QE.master_key().expose_base64();
    let dbg = format!("{set:?} {:?}", set.iter().collect::<Vec<_>>());
    assert!(!dbg.contains(&b64[..16]), "{dbg}");
    let c = case("string");
    let mut t = c.ciphertext.clone();
    t.bytes[40] ^= 1;
    let msg = set.decrypt_value(&t).unwrap_err().to_string();
    assert!(!msg.contains("hello"), "{msg}");
    let v = vector("iev-v2-FLECrudTest-insertOneV2");
    let mut t = v.ciphertext.clone();
    let last = t.bytes.len() - 97;
    t.bytes[last] ^= 1;
    let msg = format!("{:?}", vector_keys().decrypt_value(&t).unwrap_err());
    assert!(!msg.contains("secret"), "{msg}");
    let ring = Arc::new(QE.keyring("keys.jsonl"));
    assert!(!format!("{ring:?}").contains(&b64[..16]));
}
