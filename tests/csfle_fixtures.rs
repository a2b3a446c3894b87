//! CSFLE (FLE1) interop against ciphertexts and key documents made by libmongocrypt itself.
//!
//! Fixtures: `tests/fixtures/csfle/`, written by `generate.py` there (PyMongo `ClientEncryption`,
//! `local` KMS provider, libmongocrypt version in `versions.json`). No Python runs here.
#![allow(clippy::unwrap_used)] // test helpers: a panic is a failed test

use bson::spec::BinarySubtype;
use bson::{Binary, Bson, Document};
use fieldcrypt::{
    CsfleAlgorithm, CsfleDataKey, CsfleKeyDocument, CsfleKeySet, Error, KeyId, LocalMasterKey,
};
use fieldcrypt_testkit::fixtures::{assert_every_bit_flip_fails, same, Interop};

const CSFLE: Interop = Interop::CSFLE;

fn keys() -> CsfleKeySet {
    CSFLE.key_set("keys.jsonl")
}

struct Case {
    name: String,
    algorithm: CsfleAlgorithm,
    key_id: KeyId,
    value: Bson,
    ciphertext: Binary,
}

fn cases() -> Vec<Case> {
    CSFLE
        .lines("values.jsonl")
        .into_iter()
        .map(|d| Case {
            name: d.get_str("name").unwrap().to_owned(),
            algorithm: d.get_str("algorithm").unwrap().parse().unwrap(),
            key_id: match d.get("key_id") {
                Some(Bson::Binary(b)) if b.subtype == BinarySubtype::Uuid => {
                    KeyId::from_slice(&b.bytes).unwrap()
                }
                _ => panic!("key_id"),
            },
            value: d.get("value").unwrap().clone(),
            ciphertext: match d.get("ciphertext") {
                Some(Bson::Binary(b)) => b.clone(),
                _ => panic!("ciphertext"),
            },
        })
        .collect()
}

fn case(name: &str, algorithm: CsfleAlgorithm) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name && c.algorithm == algorithm)
        .unwrap()
}

#[test]
fn fixture_inventory() {
    let cases = cases();
    let count = |a| cases.iter().filter(|c| c.algorithm == a).count();
    assert!(count(CsfleAlgorithm::Deterministic) >= 20);
    assert!(count(CsfleAlgorithm::Random) >= 30);
    let keys_used: std::collections::HashSet<_> = cases.iter().map(|c| c.key_id).collect();
    assert_eq!(keys_used.len(), 3);
}

#[test]
fn decrypts_every_libmongocrypt_ciphertext() {
    let set = keys();
    for c in cases() {
        assert_eq!(c.ciphertext.subtype, BinarySubtype::Encrypted);
        let plain = set
            .decrypt_value(&c.ciphertext)
            .unwrap_or_else(|e| panic!("{} {}: {e}", c.name, c.algorithm));
        assert!(
            same(&plain, &c.value),
            "{}: {plain:?} != {:?}",
            c.name,
            c.value
        );
        // The key named in the payload is the one the fixture says.
        let key = set.get(&c.key_id).unwrap();
        assert!(same(&key.decrypt_value(&c.ciphertext).unwrap(), &c.value));
    }
}

#[test]
fn relaxed_key_export_works_alike() {
    let relaxed = CSFLE.key_set("keys-relaxed.jsonl");
    for c in cases().iter().take(10) {
        assert!(same(
            &relaxed.decrypt_value(&c.ciphertext).unwrap(),
            &c.value
        ));
    }
}

#[test]
fn deterministic_encryption_is_byte_identical_to_libmongocrypt() {
    let set = keys();
    let mut n = 0;
    for c in cases()
        .into_iter()
        .filter(|c| c.algorithm == CsfleAlgorithm::Deterministic)
    {
        let ours = set
            .get(&c.key_id)
            .unwrap()
            .encrypt_value(CsfleAlgorithm::Deterministic, &c.value)
            .unwrap();
        assert_eq!(ours, c.ciphertext, "{}", c.name);
        n += 1;
    }
    assert!(n >= 20);
}

#[test]
fn random_encryption_round_trips_with_fresh_ivs() {
    let set = keys();
    for c in cases()
        .into_iter()
        .filter(|c| c.algorithm == CsfleAlgorithm::Random)
    {
        let key = set.get(&c.key_id).unwrap();
        let a = key.encrypt_value(CsfleAlgorithm::Random, &c.value).unwrap();
        let b = key.encrypt_value(CsfleAlgorithm::Random, &c.value).unwrap();
        assert_ne!(a, b, "{}", c.name);
        assert_eq!(a.bytes.len(), c.ciphertext.bytes.len(), "{}", c.name);
        assert_eq!(
            a.bytes[..18],
            c.ciphertext.bytes[..18],
            "{}: same header",
            c.name
        );
        assert!(
            same(&set.decrypt_value(&a).unwrap(), &c.value),
            "{}",
            c.name
        );
    }
}

#[test]
fn refuses_exactly_what_libmongocrypt_refuses() {
    let set = keys();
    let key = set.get_by_alt_name("fixture-key-1").unwrap();
    let refused = CSFLE.lines("refused.jsonl");
    assert!(refused.len() >= 15);
    for r in &refused {
        let algorithm: CsfleAlgorithm = r.get_str("algorithm").unwrap().parse().unwrap();
        let value = r.get("value").unwrap();
        match key.encrypt_value(algorithm, value) {
            Err(Error::UnsupportedType { algorithm: a, .. }) => assert_eq!(a, algorithm.name()),
            other => panic!("{} {algorithm}: {other:?}", r.get_str("name").unwrap()),
        }
    }
    for c in cases() {
        assert!(
            key.encrypt_value(c.algorithm, &c.value).is_ok(),
            "{}",
            c.name
        );
    }
}

#[test]
fn decrypts_whole_document_like_libmongocrypt() {
    let (encrypted, expected) = CSFLE.document();
    let (encrypted, expected) = (&encrypted, &expected);
    let decrypted = keys().decrypt_document(encrypted).unwrap();
    assert!(
        same(
            &Bson::Document(decrypted.clone()),
            &Bson::Document(expected.clone())
        ),
        "{decrypted:?}\n{expected:?}"
    );
    // A key missing from the set: the whole document fails, naming the key.
    let mut partial = CsfleKeySet::new();
    let full = keys();
    let first = full.get_by_alt_name("fixture-key-1").unwrap();
    let docs = CSFLE.key_documents("keys.jsonl");
    let doc = docs.iter().find(|d| d.id == first.id()).unwrap();
    partial
        .insert(doc.unwrap_with(&CSFLE.master_key()).unwrap())
        .unwrap();
    assert!(matches!(
        partial.decrypt_document(encrypted),
        Err(Error::UnknownKey(_))
    ));
}

#[test]
fn libmongocrypt_decrypts_what_fieldcrypt_writes() {
    // Keys made by fieldcrypt, wrapped under the fixture master key, and values encrypted with
    // them: `tests/fixtures/csfle/verify_fieldcrypt_output.py` feeds this file to libmongocrypt.
    let master = CSFLE.master_key();
    let key = CsfleDataKey::generate(vec!["made-by-fieldcrypt".into()]).unwrap();
    let key_doc = key.to_key_document(&master);
    let reread = CsfleKeyDocument::from_document(&key_doc.to_document()).unwrap();
    let key2 = reread.unwrap_with(&master).unwrap();
    let mut out = String::new();
    out.push_str(&key_doc.to_extended_json());
    out.push('\n');
    for c in cases() {
        let ct = key2.encrypt_value(c.algorithm, &c.value).unwrap();
        let mut line = Document::new();
        line.insert("name", c.name.as_str());
        line.insert("value", c.value.clone());
        line.insert("ciphertext", ct);
        out.push_str(&Bson::Document(line).into_canonical_extjson().to_string());
        out.push('\n');
    }
    // libmongocrypt itself (through pymongocrypt) decrypts every value, and re-encrypting the
    // deterministic ones gives the same bytes.
    let out = CSFLE.verify_fieldcrypt_output(&out, "csfle_interop");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "libmongocrypt rejected fieldcrypt's output:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("libmongocrypt decrypted all"), "{stdout}");
    let det = cases()
        .iter()
        .filter(|c| c.algorithm == CsfleAlgorithm::Deterministic)
        .count();
    assert!(
        stdout.contains(&format!(
            "{det} deterministic ones re-encrypt byte-identically"
        )),
        "{stdout}"
    );
}

/// Payloads to torture: short deterministic, long random, random document.
fn victims() -> Vec<Case> {
    vec![
        case("string", CsfleAlgorithm::Deterministic),
        case("int64", CsfleAlgorithm::Random),
        case("document", CsfleAlgorithm::Random),
    ]
}

#[test]
fn fail_every_single_bit_flip() {
    let set = keys();
    for c in victims() {
        // In the header, another algorithm or type is still authenticated data (Decrypt).
        assert_every_bit_flip_fails(&set, &c.name, &c.ciphertext);
    }
}

#[test]
fn fail_every_truncation_and_extension() {
    let set = keys();
    for c in victims() {
        for len in 0..c.ciphertext.bytes.len() {
            let mut t = c.ciphertext.clone();
            t.bytes.truncate(len);
            let r = set.decrypt_value(&t);
            assert!(
                matches!(r, Err(Error::MalformedCiphertext(_) | Error::Decrypt)),
                "{} len {len}: {r:?}",
                c.name
            );
        }
        for extra in [1usize, 15, 16, 32] {
            let mut t = c.ciphertext.clone();
            t.bytes.resize(t.bytes.len() + extra, 0);
            assert!(set.decrypt_value(&t).is_err(), "{} +{extra}", c.name);
        }
    }
}

#[test]
fn fail_wrong_key() {
    let c = case("string", CsfleAlgorithm::Deterministic);
    // Same id, other material: authentication fails.
    let impostor = CsfleDataKey::from_material(c.key_id, generate_material(), vec![]).unwrap();
    assert!(matches!(
        impostor.decrypt_value(&c.ciphertext),
        Err(Error::Decrypt)
    ));
    // A key of the set that the payload does not name.
    let set = keys();
    let other = set.iter().find(|k| k.id() != c.key_id).unwrap();
    match other.decrypt_value(&c.ciphertext) {
        Err(Error::UnknownKey(id)) => assert_eq!(id, c.key_id),
        r => panic!("{r:?}"),
    }
    // The key file under the wrong master key: a clear key-format error.
    let e =
        CsfleKeySet::load_extended_json_file(CSFLE.path("keys.jsonl"), &LocalMasterKey::generate())
            .unwrap_err();
    assert!(matches!(e, Error::KeyFormat(_)), "{e}");
}

fn generate_material() -> secrecy::SecretBox<[u8; 96]> {
    // A fresh key's material is not exposed; take another fresh key's through its document.
    let master = LocalMasterKey::generate();
    let doc = CsfleDataKey::generate(vec![])
        .unwrap()
        .to_key_document(&master);
    master.unwrap(&doc.key_material).unwrap()
}

#[test]
fn fail_unknown_key_id() {
    let c = case("string", CsfleAlgorithm::Deterministic);
    let set = CsfleKeySet::new();
    let e = set.decrypt_value(&c.ciphertext).unwrap_err();
    assert!(matches!(e, Error::UnknownKey(id) if id == c.key_id));
    assert!(e.to_string().contains(&c.key_id.to_string()));
}

#[test]
fn fail_wrong_or_unsupported_type() {
    let set = keys();
    let c = case("string", CsfleAlgorithm::Deterministic);
    let with_type = |t: u8| {
        let mut b = c.ciphertext.clone();
        b.bytes[17] = t;
        set.decrypt_value(&b)
    };
    // A valid type: the type byte is authenticated, so this is tampering.
    assert!(matches!(with_type(0x10), Err(Error::Decrypt)));
    assert!(matches!(with_type(0x01), Err(Error::Decrypt)));
    // Types FLE1 never encrypts, and bytes that are no BSON type.
    for t in [0x06, 0x0A, 0x7F, 0xFF] {
        assert!(
            matches!(with_type(t), Err(Error::UnsupportedType { .. })),
            "{t:#x}"
        );
    }
    for t in [0x00, 0x14, 0x80] {
        assert!(
            matches!(with_type(t), Err(Error::MalformedCiphertext(_))),
            "{t:#x}"
        );
    }
    // Not subtype 6, or not FLE1 inside subtype 6 (intent-to-encrypt marking, QE payloads).
    let mut generic = c.ciphertext.clone();
    generic.subtype = BinarySubtype::Generic;
    assert!(matches!(
        set.decrypt_value(&generic),
        Err(Error::MalformedCiphertext(_))
    ));
    for blob in [0u8, 3, 6] {
        let mut b = c.ciphertext.clone();
        b.bytes[0] = blob;
        assert!(
            matches!(set.decrypt_value(&b), Err(Error::MalformedCiphertext(_))),
            "{blob}"
        );
    }
    // Relabelled as a Queryable Encryption unindexed value: read as one, and it does not
    // authenticate (tests/qe_fixtures.rs covers QE).
    let mut b = c.ciphertext.clone();
    b.bytes[0] = 16;
    assert!(matches!(set.decrypt_value(&b), Err(Error::Decrypt)));
    // Deterministic encryption of a type it refuses.
    let key = set.get(&c.key_id).unwrap();
    for v in [
        Bson::Double(1.0),
        Bson::Boolean(true),
        Bson::Null,
        Bson::MinKey,
    ] {
        assert!(matches!(
            key.encrypt_value(CsfleAlgorithm::Deterministic, &v),
            Err(Error::UnsupportedType { .. })
        ));
    }
}

#[test]
fn errors_and_debug_carry_no_secrets() {
    let set = keys();
    let master = CSFLE.master_key();
    let b64 = master.expose_base64();
    let dbg = format!("{master:?} {set:?} {:?}", set.iter().collect::<Vec<_>>());
    assert!(!dbg.contains(&b64[..16]), "{dbg}");
    let c = case("string", CsfleAlgorithm::Deterministic);
    let mut t = c.ciphertext.clone();
    t.bytes[40] ^= 1;
    let msg = set.decrypt_value(&t).unwrap_err().to_string();
    assert!(!msg.contains("hello"), "{msg}");
}
