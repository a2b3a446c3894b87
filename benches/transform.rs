//! Criterion benchmarks of the hot paths (workload names as in docs/BENCHMARKS.md):
//!
//! - `W1` bulk decrypt: MongoDB's benchmark document (1500 encrypted strings), decrypted whole,
//!   in MongoDB's CSFLE deterministic format and in each fieldcrypt suite.
//! - `W2` bulk encrypt/decrypt of user-like documents, raw and owned paths.
//! - `W3` per-field overhead: fieldcrypt per field vs the bare AEAD call on the same bytes.
//! - `single_value_32B`: the explicit per-value API on one 32-byte string.
//!
//! Run with `cargo bench --bench transform`; CI only compiles and smoke-runs them
//! (`cargo bench --bench transform -- --test`).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]
// Benchmark setup: a failure is a broken benchmark, reported by the panic.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use bson::{doc, Document, RawDocumentBuf};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Schema, Suite};
use fieldcrypt_testkit::workloads::{self, Format};

/// The bare AES-256-GCM the per-field and single-value baselines call: the library fieldcrypt's
/// build uses for that suite (RustCrypto `aes-gcm`, or aws-lc-rs with feature `aead-aws-lc`),
/// with a fresh random nonce per seal, as fieldcrypt must.
struct BareGcm {
    #[cfg(not(feature = "aead-aws-lc"))]
    key: aes_gcm::Aes256Gcm,
    #[cfg(feature = "aead-aws-lc")]
    key: aws_lc_rs::aead::LessSafeKey,
}

impl BareGcm {
    fn new() -> Self {
        let k = [7u8; 32];
        #[cfg(not(feature = "aead-aws-lc"))]
        let key = aes_gcm::KeyInit::new(&k.into());
        #[cfg(feature = "aead-aws-lc")]
        let key = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &k).unwrap(),
        );
        BareGcm { key }
    }

    /// Seals `buf` in place under a random nonce; returns the nonce and tag.
    fn seal(&self, ad: &[u8], buf: &mut [u8]) -> ([u8; 12], [u8; 16]) {
        let mut nonce = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        #[cfg(not(feature = "aead-aws-lc"))]
        let tag: [u8; 16] = aes_gcm::aead::AeadInOut::encrypt_inout_detached(
            &self.key,
            &nonce.into(),
            ad,
            buf.into(),
        )
        .unwrap()
        .into();
        #[cfg(feature = "aead-aws-lc")]
        let tag: [u8; 16] = self
            .key
            .seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(ad),
                buf,
            )
            .unwrap()
            .as_ref()
            .try_into()
            .unwrap();
        (nonce, tag)
    }

    fn open(&self, nonce: [u8; 12], ad: &[u8], buf: &mut [u8], tag: &[u8; 16]) {
        #[cfg(not(feature = "aead-aws-lc"))]
        aes_gcm::aead::AeadInOut::decrypt_inout_detached(
            &self.key,
            &nonce.into(),
            ad,
            buf.into(),
            tag.into(),
        )
        .unwrap();
        #[cfg(feature = "aead-aws-lc")]
        self.key
            .open_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(ad),
                tag,
                buf,
            )
            .unwrap();
    }
}

fn bench_w1(c: &mut Criterion) {
    let mut g = c.benchmark_group("W1_bulk_decrypt");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    let (cr, doc) = workloads::w1_encrypted(Format::Csfle).unwrap();
    g.bench_function("csfle_deterministic", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            cr.decrypt_raw_into(black_box(&doc), &Context::none(), &mut out)
                .unwrap()
        });
    });
    let (cr, doc) = workloads::w1_encrypted(Format::QeUnindexed).unwrap();
    g.bench_function("qe_unindexed", |b| {
        let mut out = Vec::new();
        b.iter(|| {
            cr.decrypt_raw_into(black_box(&doc), &Context::none(), &mut out)
                .unwrap()
        });
    });
    for suite in Suite::ALL {
        let (cr, doc) = workloads::w1_encrypted(Format::Fieldcrypt(suite)).unwrap();
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

fn bench_w2(c: &mut Criterion) {
    let (cr, raw) = workloads::w2_setup(Suite::Aes256Gcm, 1000).unwrap();
    let ctx = workloads::w2_context();
    let plain: Vec<Document> = raw.iter().map(|d| d.to_document().unwrap()).collect();
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

/// Fields per document in W3's multi-field case: per-document costs spread over this many.
const W3_FIELDS: usize = 16;

fn bench_w3(c: &mut Criterion) {
    let ring = Arc::new(InMemoryKeyring::new());
    ring.generate("k");
    let one = Cryptor::with_shared(
        ring.clone(),
        Arc::new(
            Schema::builder()
                .field("v", Field::randomized("k"))
                .build()
                .unwrap(),
        ),
    );
    let names: Vec<String> = (0..W3_FIELDS).map(|i| format!("v{i:02}")).collect();
    let many = Cryptor::with_shared(
        ring,
        Arc::new(
            names
                .iter()
                .fold(Schema::builder(), |b, n| b.field(n, Field::randomized("k")))
                .build()
                .unwrap(),
        ),
    );
    let bare = BareGcm::new();
    let ctx = Context::none();
    let mut g = c.benchmark_group("W3_per_field");
    for size in [16usize, 32, 64, 256, 1024, 4096] {
        let value = "x".repeat(size);
        // The bare calls get associated data of the length fieldcrypt's has for field `v`
        // (20-byte header, u32 length, path).
        let ad = [0u8; 25];
        let plain = RawDocumentBuf::from_document(&doc! { "v": value.clone() }).unwrap();
        let enc = one.encrypt_raw(&plain, &ctx).unwrap();
        let mut wide = Document::new();
        for n in &names {
            wide.insert(n.clone(), value.clone());
        }
        let plain_many = RawDocumentBuf::from_document(&wide).unwrap();
        let enc_many = many.encrypt_raw(&plain_many, &ctx).unwrap();
        let mut sealed = value.as_bytes().to_vec();
        let (nonce, tag) = bare.seal(&ad, &mut sealed);

        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("bare_aes256gcm_seal", size),
            &size,
            |b, _| {
                let mut buf = value.as_bytes().to_vec();
                b.iter(|| {
                    buf.copy_from_slice(value.as_bytes());
                    black_box(bare.seal(&ad, &mut buf))
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("bare_aes256gcm_open", size),
            &size,
            |b, _| {
                let mut buf = sealed.clone();
                b.iter(|| {
                    buf.copy_from_slice(&sealed);
                    bare.open(nonce, &ad, &mut buf, &tag);
                    black_box(&buf);
                });
            },
        );
        // A whole one-field document per call: per-document costs included.
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_encrypt_1_field_doc", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    one.encrypt_raw_into(black_box(&plain), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_decrypt_1_field_doc", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    one.decrypt_raw_into(black_box(&enc), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
        // A document of 16 such fields per call, reported per field.
        g.throughput(Throughput::Elements(W3_FIELDS as u64));
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_encrypt_16_field_doc", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    many.encrypt_raw_into(black_box(&plain_many), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("fieldcrypt_decrypt_16_field_doc", size),
            &size,
            |b, _| {
                let mut out = Vec::new();
                b.iter(|| {
                    many.decrypt_raw_into(black_box(&enc_many), &ctx, &mut out)
                        .unwrap()
                });
            },
        );
    }
    g.finish();
}

/// One 32-byte value through the explicit API (`encrypt_value` / `decrypt_value`): the "single
/// values" target of docs/BENCHMARKS.md, beside the bare AEAD on the same bytes.
fn bench_single_values(c: &mut Criterion) {
    let ring = Arc::new(InMemoryKeyring::new());
    ring.generate("k");
    let cr = Cryptor::with_shared(
        ring,
        Arc::new(
            Schema::builder()
                .field("v", Field::randomized("k"))
                .build()
                .unwrap(),
        ),
    );
    let ctx = Context::namespace("app.users");
    let value = bson::Bson::String("x".repeat(32));
    let sealed = cr.encrypt_value("v", &value, &ctx, None, None).unwrap();
    let bare = BareGcm::new();
    let ad = [0u8; 38]; // header, path and namespace, as fieldcrypt's
    let plain = [b'x'; 37]; // the BSON string's bytes
    let mut g = c.benchmark_group("single_value_32B");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encrypt_value", |b| {
        b.iter(|| {
            cr.encrypt_value("v", black_box(&value), &ctx, None, None)
                .unwrap()
        });
    });
    g.bench_function("decrypt_value", |b| {
        b.iter(|| {
            cr.decrypt_value("v", black_box(&sealed), &ctx, None, None)
                .unwrap()
        });
    });
    g.bench_function("bare_aes256gcm_seal", |b| {
        let mut buf = plain.to_vec();
        b.iter(|| {
            buf.copy_from_slice(&plain);
            black_box(bare.seal(&ad, &mut buf))
        });
    });
    g.bench_function("bare_aes256gcm_open", |b| {
        let mut buf = plain.to_vec();
        let (nonce, tag) = bare.seal(&ad, &mut buf);
        let sealed = buf.clone();
        b.iter(|| {
            buf.copy_from_slice(&sealed);
            bare.open(nonce, &ad, &mut buf, &tag);
            black_box(&buf);
        });
    });
    g.finish();
}

criterion_group!(benches, bench_w1, bench_w2, bench_w3, bench_single_values);
criterion_main!(benches);
