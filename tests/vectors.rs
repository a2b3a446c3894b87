//! Known-answer tests for the envelope format (docs/FORMAT.md) and blind indexes.
//!
//! The vectors in `tests/vectors/` are written by `tests/vectors/generate.py`, an independent
//! Python implementation of docs/FORMAT.md (PyPI `cryptography`, PyNaCl, pymongo's `bson`),
//! with fixed root keys, key ids and nonces. No Python runs here: regenerate with the command
//! at the top of that script.
//!
//! Every case goes through the public API only: a key built from the vector's root key, then
//! `Cryptor::decrypt_value`; for the deterministic suite `Cryptor::encrypt_value` must also give
//! the exact same bytes; for the randomized suites the Rust envelope must have the same header
//! and length (the nonce differs) and decrypt back; `fail_` cases must be rejected.
#![allow(clippy::unwrap_used)] // test helpers: a panic is a failed test

use std::path::PathBuf;

use bson::spec::BinarySubtype;
use bson::{Binary, Bson, Document};
use fieldcrypt::{
    BlindIndex, Context, Cryptor, Field, InMemoryKeyring, Key, KeyId, KeyKind, KeyMaterial,
    KeyState, Schema, Suite, BLIND_INDEX_SUBTYPE, ENVELOPE_SUBTYPE, FORMAT_VERSION,
};
use serde_json::Value;

const ALIAS: &str = "vectors";
/// The owner field name used by owner-bound cases (the vectors store only its value).
const OWNER_FIELD: &str = "owner";

/// The `cases` of a vector file, after checking its `source` note.
fn load(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let source = file["source"].as_str().unwrap();
    assert!(
        source.contains("tests/vectors/generate.py"),
        "{name}: {source}"
    );
    let cases = file["cases"].as_array().unwrap().clone();
    assert!(!cases.is_empty(), "{name}: no cases");
    cases
}

fn str_field<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field]
        .as_str()
        .unwrap_or_else(|| panic!("{}: `{field}` missing", case["name"]))
}

fn hex_field(case: &Value, field: &str) -> Vec<u8> {
    hex::decode(str_field(case, field)).unwrap()
}

fn u8_field(case: &Value, field: &str) -> u8 {
    u8::try_from(case[field].as_u64().unwrap()).unwrap()
}

/// The value `v` of an ext-JSON document string `{"v": ...}`.
fn ext_json_value(text: &str) -> Bson {
    let json: Value = serde_json::from_str(text).unwrap();
    match Bson::try_from(json).unwrap() {
        Bson::Document(mut doc) => doc.remove("v").unwrap(),
        other => panic!("not a document: {other:?}"),
    }
}

/// A value given as `{"type": <element type>, "value_hex": <value bytes>}`.
fn typed_value(v: &Value) -> Bson {
    let ty = u8_field(v, "type");
    let bytes = hex_field(v, "value_hex");
    let mut body = vec![ty, b'v', 0];
    body.extend_from_slice(&bytes);
    body.push(0);
    let len = i32::try_from(body.len() + 4).unwrap();
    let mut raw = len.to_le_bytes().to_vec();
    raw.extend_from_slice(&body);
    let mut doc = Document::from_reader(&mut raw.as_slice()).unwrap();
    doc.remove("v").unwrap()
}

/// The exact BSON bytes of `{"v": value}`: compares values bit for bit (`-0.0`, NaN payloads,
/// int32 vs int64), which `Bson`'s `PartialEq` does not.
fn value_bytes(value: &Bson) -> Vec<u8> {
    let mut doc = Document::new();
    doc.insert("v", value.clone());
    bson::to_vec(&doc).unwrap()
}

fn suite_by_name(name: &str) -> Suite {
    // Names as in docs/FORMAT.md section 3.
    match name {
        "AES-256-GCM" => Suite::Aes256Gcm,
        "ChaCha20-Poly1305" => Suite::ChaCha20Poly1305,
        "XChaCha20-Poly1305" => Suite::XChaCha20Poly1305,
        "AES-256-SIV-deterministic" => Suite::Aes256SivDeterministic,
        other => panic!("unknown suite name {other}"),
    }
}

/// A keyring holding the case's root key as the primary key of [`ALIAS`].
fn keyring(case: &Value) -> InMemoryKeyring {
    let id: KeyId = str_field(case, "key_id").parse().unwrap();
    let material = KeyMaterial::from_slice(&hex_field(case, "root_key_hex"));
    let key = Key::from_material(
        id,
        ALIAS,
        KeyKind::Fieldcrypt,
        KeyState::Primary,
        material,
        0,
    )
    .unwrap();
    let ring = InMemoryKeyring::new();
    ring.insert(key);
    ring
}

/// The reader's inputs of a case: context, `_id`, owner.
struct Binding {
    ctx: Context,
    id: Option<Bson>,
    owner: Option<Bson>,
}

impl Binding {
    fn of(case: &Value) -> Self {
        let mut ctx = match case["namespace"].as_str() {
            Some(ns) => Context::namespace(ns),
            None => Context::none(),
        };
        let owner = case.get("owner").map(typed_value);
        if owner.is_some() {
            ctx = ctx.with_owner_field(OWNER_FIELD);
        }
        Binding {
            ctx,
            id: case.get("id").map(typed_value),
            owner,
        }
    }
}

fn envelope(case: &Value) -> Binary {
    Binary {
        subtype: BinarySubtype::UserDefined(ENVELOPE_SUBTYPE),
        bytes: hex_field(case, "envelope_hex"),
    }
}

fn is_fail(case: &Value) -> bool {
    case["expect"].as_str() == Some("error")
}

/// The schema a writer of this case would have.
fn writer_schema(case: &Value, field: Field) -> Schema {
    let mut field = field;
    if let Some(pad) = case["pad_to"].as_u64() {
        field = field.pad_to(u32::try_from(pad).unwrap());
    }
    let mut builder = Schema::builder().field(str_field(case, "path"), field);
    if case.get("owner").is_some() {
        builder = builder.owner_field(OWNER_FIELD);
    }
    builder.build().unwrap()
}

fn report(kind: &str, checked: usize, failures: &[String]) {
    assert!(checked > 0, "{kind}: no cases checked");
    assert!(
        failures.is_empty(),
        "{kind}: {} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn constants_match_the_spec() {
    assert_eq!(ENVELOPE_SUBTYPE, 0x8F);
    assert_eq!(BLIND_INDEX_SUBTYPE, 0x8E);
    assert_eq!(FORMAT_VERSION, 1);
    for (name, id, nonce, tag) in [
        ("AES-256-GCM", 1, 12, 16),
        ("ChaCha20-Poly1305", 2, 12, 16),
        ("XChaCha20-Poly1305", 3, 24, 16),
        ("AES-256-SIV-deterministic", 4, 16, 0),
    ] {
        let suite = suite_by_name(name);
        assert_eq!(suite.id(), id, "{name}");
        assert_eq!(suite.nonce_len(), nonce, "{name}");
        assert_eq!(suite.tag_len(), tag, "{name}");
    }
}

#[test]
fn envelopes_decrypt_to_the_expected_values() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in load("envelope.json").iter().filter(|c| !is_fail(c)) {
        checked += 1;
        let name = str_field(case, "name");
        let expected = ext_json_value(str_field(case, "value"));
        let env = envelope(case);
        if expected.element_type() as u8 != u8_field(case, "value_type")
            || env.bytes[3] != u8_field(case, "value_type")
            || env.bytes[1] != suite_by_name(str_field(case, "suite")).id()
        {
            failures.push(format!("{name}: inconsistent vector (type or suite)"));
            continue;
        }
        let b = Binding::of(case);
        let cryptor = Cryptor::decrypt_only(keyring(case));
        match cryptor.decrypt_value(
            str_field(case, "path"),
            &env,
            &b.ctx,
            b.id.as_ref(),
            b.owner.as_ref(),
        ) {
            Ok(got) if value_bytes(&got) == value_bytes(&expected) => {}
            Ok(got) => failures.push(format!("{name}: decrypted {got:?}, expected {expected:?}")),
            Err(e) => failures.push(format!("{name}: decryption failed: {e}")),
        }
    }
    report("decrypt", checked, &failures);
}

#[test]
fn deterministic_envelopes_are_reproduced_exactly() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in load("envelope.json")
        .iter()
        .filter(|c| !is_fail(c))
        .filter(|c| suite_by_name(str_field(c, "suite")).is_deterministic())
    {
        checked += 1;
        let name = str_field(case, "name");
        let value = ext_json_value(str_field(case, "value"));
        let b = Binding::of(case);
        let cryptor = Cryptor::new(
            keyring(case),
            writer_schema(case, Field::deterministic(ALIAS)),
        );
        match cryptor.encrypt_value(
            str_field(case, "path"),
            &value,
            &b.ctx,
            b.id.as_ref(),
            b.owner.as_ref(),
        ) {
            Ok(got) => {
                let want = envelope(case);
                if got.subtype != want.subtype {
                    failures.push(format!("{name}: subtype {:?}", got.subtype));
                } else if got.bytes != want.bytes {
                    failures.push(format!(
                        "{name}: envelope differs\n   rust   {}\n   python {}",
                        hex::encode(&got.bytes),
                        hex::encode(&want.bytes)
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: encryption failed: {e}")),
        }
    }
    report("deterministic encrypt", checked, &failures);
}

#[test]
fn randomized_envelopes_have_the_same_header_and_length() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in load("envelope.json")
        .iter()
        .filter(|c| !is_fail(c))
        .filter(|c| !suite_by_name(str_field(c, "suite")).is_deterministic())
    {
        checked += 1;
        let name = str_field(case, "name");
        let value = ext_json_value(str_field(case, "value"));
        let b = Binding::of(case);
        let mut field = Field::randomized(ALIAS).suite(suite_by_name(str_field(case, "suite")));
        if case.get("id").is_some() {
            field = field.bind_id();
        }
        let cryptor = Cryptor::new(keyring(case), writer_schema(case, field));
        let path = str_field(case, "path");
        let got = match cryptor.encrypt_value(path, &value, &b.ctx, b.id.as_ref(), b.owner.as_ref())
        {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{name}: encryption failed: {e}"));
                continue;
            }
        };
        let want = envelope(case);
        if got.subtype != want.subtype
            || got.bytes.len() != want.bytes.len()
            || got.bytes[..20] != want.bytes[..20]
        {
            failures.push(format!(
                "{name}: header/length differ\n   rust   {} ({} bytes)\n   python {} ({} bytes)",
                hex::encode(&got.bytes[..got.bytes.len().min(20)]),
                got.bytes.len(),
                hex::encode(&want.bytes[..20]),
                want.bytes.len()
            ));
            continue;
        }
        match cryptor.decrypt_value(path, &got, &b.ctx, b.id.as_ref(), b.owner.as_ref()) {
            Ok(back) if value_bytes(&back) == value_bytes(&value) => {}
            Ok(back) => failures.push(format!("{name}: round trip gave {back:?}")),
            Err(e) => failures.push(format!("{name}: round trip failed: {e}")),
        }
    }
    report("randomized encrypt", checked, &failures);
}

#[test]
fn fail_cases_are_rejected() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in load("envelope.json").iter().filter(|c| is_fail(c)) {
        checked += 1;
        let name = str_field(case, "name");
        assert!(name.starts_with("fail_"), "{name}");
        let b = Binding::of(case);
        let cryptor = Cryptor::decrypt_only(keyring(case));
        if let Ok(v) = cryptor.decrypt_value(
            str_field(case, "path"),
            &envelope(case),
            &b.ctx,
            b.id.as_ref(),
            b.owner.as_ref(),
        ) {
            failures.push(format!(
                "{name} ({}): accepted, gave {v:?}",
                str_field(case, "description")
            ));
        }
    }
    report("fail", checked, &failures);
}

#[test]
fn blind_indexes_match() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in load("blind_index.json") {
        checked += 1;
        let name = str_field(&case, "name");
        let path = str_field(&case, "path");
        let value = ext_json_value(str_field(&case, "value"));
        assert_eq!(
            expected_type(&value),
            u8_field(&case, "value_type"),
            "{name}"
        );
        let truncate = usize::from(u8_field(&case, "truncate"));
        let index = BlindIndex::new(ALIAS).truncate(truncate);
        let ring = keyring(&case);
        let field = match case["field_pad_to"].as_u64() {
            // The field is also encrypted, padded, under another alias: the index ignores that.
            Some(pad) => {
                ring.insert(
                    Key::from_material(
                        KeyId::from_bytes([0xEE; 16]),
                        "value-key",
                        KeyKind::Fieldcrypt,
                        KeyState::Primary,
                        KeyMaterial::from_slice(&[0xEE; 32]),
                        0,
                    )
                    .unwrap(),
                );
                Field::randomized("value-key")
                    .pad_to(u32::try_from(pad).unwrap())
                    .with_blind_index(index)
            }
            None => Field::blind_index_only(index),
        };
        let schema = Schema::builder().field(path, field).build().unwrap();
        let cryptor = Cryptor::new(ring, schema);
        let want = hex_field(&case, "payload_hex");
        match cryptor.blind_index_values(path, &value) {
            Ok(got) if got.len() == 1 => {
                let got = &got[0];
                if got.subtype != BinarySubtype::UserDefined(BLIND_INDEX_SUBTYPE) {
                    failures.push(format!("{name}: subtype {:?}", got.subtype));
                } else if got.bytes != want {
                    failures.push(format!(
                        "{name}: payload differs\n   rust   {}\n   python {}",
                        hex::encode(&got.bytes),
                        hex::encode(&want)
                    ));
                }
            }
            Ok(got) => failures.push(format!("{name}: {} values for one key", got.len())),
            Err(e) => failures.push(format!("{name}: failed: {e}")),
        }
    }
    report("blind index", checked, &failures);
}

fn expected_type(value: &Bson) -> u8 {
    value.element_type() as u8
}

/// The vectors cover what they claim to: every suite, every BSON type, every binding flag alone
/// and together, both padding buckets, and a fail case per suite.
#[test]
fn vectors_cover_the_format() {
    let cases = load("envelope.json");
    let ok: Vec<&Value> = cases.iter().filter(|c| !is_fail(c)).collect();
    for suite in Suite::ALL {
        let of_suite: Vec<&&Value> = ok
            .iter()
            .filter(|c| suite_by_name(str_field(c, "suite")) == suite)
            .collect();
        let types: std::collections::BTreeSet<u8> =
            of_suite.iter().map(|c| u8_field(c, "value_type")).collect();
        // Every type section 2 allows: 0x01..=0x13, MaxKey, MinKey.
        for ty in (0x01u8..=0x13).chain([0x7F, 0xFF]) {
            assert!(types.contains(&ty), "{suite:?} lacks type {ty:#04x}");
        }
        let flags: std::collections::BTreeSet<u8> = of_suite
            .iter()
            .map(|c| hex_field(c, "envelope_hex")[2])
            .collect();
        let wanted: &[u8] = if suite.is_deterministic() {
            &[0x00, 0x01, 0x04, 0x08, 0x0D]
        } else {
            &[0x00, 0x01, 0x02, 0x04, 0x08, 0x0F]
        };
        for f in wanted {
            assert!(flags.contains(f), "{suite:?} lacks flags {f:#04x}");
        }
        for bucket in [16, 32] {
            assert!(
                of_suite
                    .iter()
                    .any(|c| c["pad_to"].as_u64() == Some(bucket)),
                "{suite:?} lacks padding bucket {bucket}"
            );
        }
        assert!(
            cases
                .iter()
                .any(|c| is_fail(c) && suite_by_name(str_field(c, "suite")) == suite),
            "{suite:?} has no fail case"
        );
    }
}
