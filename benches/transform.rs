//! Criterion benchmarks of the hot paths (workload names as in docs/BENCHMARKS.md):
//!
//! - `W1` bulk decrypt: MongoDB's benchmark document (1500 encrypted strings), decrypted whole,
//!   in MongoDB's CSFLE deterministic format and in each fieldcrypt suite.
//! - `W2` bulk encrypt/decrypt of user-like documents, raw and owned paths.
//! - `W3` per-field overhead: fieldcrypt per field vs the bare AEAD call on the same bytes.
//!
//! Run with `cargo bench --bench transform`; CI only compiles and smoke-runs them
//! (`cargo bench --bench transform -- --test`).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use bson::{doc, Document, RawDocumentBuf};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fieldcrypt::{
    Context, Cryptor, CsfleAlgorithm, CsfleDataKey, Field, InMemoryKeyring, Key, KeyId, KeyKind,
    KeyMaterial, KeyState, Schema, Suite,
};
use secrecy::SecretBox;

const W1_FIELDS: usize = 1500;

fn w1_plain() -> Document {
    let mut d = Document::new();
    for i in 1..=W1_FIELDS {
        d.insert(format!("key{i:04}"), format!("value {i:04}"));
    }
    d
}

/// W1 in MongoDB's CSFLE deterministic format, with the same key in a fieldcrypt keyring.
fn w1_csfle() -> (Cryptor, RawDocumentBuf) {
    let mut material = [0u8; 96];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut material);
    let id = KeyId::random();
    let dk = CsfleDataKey::from_material(id, SecretBox::new(Box::new(material)), vec![]).unwrap();
    let ring = InMemoryKeyring::new();
    ring.insert(
        Key::from_material(
            id,
            "csfle",
            KeyKind::Csfle,
            KeyState::Active,
            KeyMaterial::from_slice(&material),
            0,
        )
        .unwrap(),
    );
    let mut enc = Document::new();
    for (k, v) in w1_plain() {
        let b = dk.encrypt_value(CsfleAlgorithm::Deterministic, &v).unwrap();
        enc.insert(k, b);
    }
    (
        Cryptor::decrypt_only(Arc::new(ring)),
        RawDocumentBuf::from_document(&enc).unwrap(),
    )
}

fn w1_fieldcrypt(suite: Suite) -> (Cryptor, RawDocumentBuf) {
    let ring = InMemoryKeyring::new();
    ring.generate("k");
    let mut b = Schema::builder();
    for i in 1..=W1_FIELDS {
        b = b.field(format!("key{i:04}"), Field::randomized("k").suite(suite));
    }
    let c = Cryptor::new(Arc::new(ring), b.build().unwrap());
    let plain = RawDocumentBuf::from_document(&w1_plain()).unwrap();
    let enc = c.encrypt_raw(&plain, &Context::none()).unwrap();
    (c, enc)
}

fn bench_w1(c: &mut Criterion) {
    let mut g = c.benchmark_group("W1_bulk_decrypt");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    let (cr, doc) = w1_csfle();
    g.bench_function("csfle_deterministic", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            cr.decrypt_raw_into(black_box(&doc), &Context::none(), &mut out)
                .unwrap()
        });
    });
    for suite in Suite::ALL {
        let (cr, doc) = w1_fieldcrypt(suite);
        g.bench_function(suite.name(), |b| {
            let mut out = Vec::new();
            b.iter(|| {
                cr.decrypt_raw_into(black_box(&doc), &Context::none(), &mut out)
                    .unwrap()
            });
        });
    }
    g.finish();
}

/// A user-like document (~250 bytes) with three encrypted fields of ~32 bytes, one nested.
fn w2_user(i: u32) -> Document {
    doc! {
        "_id": bson::oid::ObjectId::new(),
        "username": format!("user{i:08}"),
        "created": bson::DateTime::from_millis(1_700_000_000_000 + i64::from(i)),
        "plan": "pro",
        "logins": i,
        "email": format!("user{i:08}@example-mail.com......"),
        "ssn": format!("{:03}-{:02}-{:04}-padding-to-32-bytes", i % 1000, i % 100, i % 10000),
        "profile": { "country": "NL", "phone": format!("+31 6 {i:08} ext. 000000000"), "lang": "nl" },
    }
}

fn w2_schema() -> Schema {
    Schema::builder()
        .field("email", Field::randomized("pii"))
        .field("ssn", Field::randomized("pii"))
        .field("profile.phone", Field::randomized("pii"))
        .build()
        .unwrap()
}

fn bench_w2(c: &mut Criterion) {
    let ring = InMemoryKeyring::new();
    ring.generate("pii");
    let cr = Cryptor::new(Arc::new(ring), w2_schema());
    let ctx = Context::namespace("app.users");
    let plain: Vec<Document> = (0..1000).map(w2_user).collect();
    let raw: Vec<RawDocumentBuf> = plain
        .iter()
        .map(|d| RawDocumentBuf::from_document(d).unwrap())
        .collect();
    let enc: Vec<RawDocumentBuf> = raw
        .iter()
        .map(|d| cr.encrypt_raw(d, &ctx).unwrap())
        .collect();
    let enc_owned: Vec<Document> = enc.iter().map(|d| d.to_document().unwrap()).collect();

    let mut g = c.benchmark_group("W2_user_documents");
    g.throughput(Throughput::Elements(plain.len() as u64));
    g.bench_function("encrypt_raw", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            for d in &raw {
                cr.encrypt_raw_into(d, &ctx, &mut out).unwrap();
            }
        });
    });
    g.bench_function("decrypt_raw", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            for d in &enc {
                cr.decrypt_raw_into(d, &ctx, &mut out).unwrap();
            }
        });
    });
    g.bench_function("encrypt_owned", |b| {
        b.iter(|| {
            for d in &plain {
                black_box(cr.encrypt_document(d, &ctx).unwrap());
            }
        });
    });
    g.bench_function("decrypt_owned", |b| {
        b.iter(|| {
            for d in &enc_owned {
                black_box(cr.decrypt_document(d, &ctx).unwrap());
            }
        });
    });
    g.bench_function("encrypt_many_parallel", |b| {
        b.iter(|| black_box(cr.encrypt_many(&raw, &ctx)));
    });
    g.bench_function("decrypt_many_parallel", |b| {
        b.iter(|| black_box(cr.decrypt_many(&enc, &ctx)));
    });
    g.finish();
}

fn bench_w3(c: &mut Criterion) {
    let ring = InMemoryKeyring::new();
    ring.generate("k");
    let cr = Cryptor::new(
        Arc::new(ring),
        Schema::builder()
            .field("v", Field::randomized("k"))
            .build()
            .unwrap(),
    );
    let bare = Aes256Gcm::new(&[7u8; 32].into());
    let ctx = Context::none();
    let mut g = c.benchmark_group("W3_per_field");
    for size in [16usize, 64, 256, 1024, 4096] {
        let value = "x".repeat(size);
        let plain = RawDocumentBuf::from_document(&doc! { "v": value.clone() }).unwrap();
        let enc = cr.encrypt_raw(&plain, &ctx).unwrap();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::new("bare_aes256gcm_seal", size),
            &size,
            |b, _| {
                let mut buf = value.as_bytes().to_vec();
                b.iter(|| {
                    buf.copy_from_slice(value.as_bytes());
                    black_box(
                        bare.encrypt_in_place_detached(&[1u8; 12].into(), b"path", &mut buf)
                            .unwrap(),
                    )
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_encrypt", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    cr.encrypt_raw_into(black_box(&plain), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_decrypt", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    cr.decrypt_raw_into(black_box(&enc), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_w1, bench_w2, bench_w3);
criterion_main!(benches);
