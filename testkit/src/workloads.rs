//! The benchmark workloads, shared by the criterion benches (`benches/`) and the CLI's
//! `fieldcrypt bench`, so both measure exactly the same thing (docs/BENCHMARKS.md).
//!
//! - **W1 bulk decrypt**: MongoDB's own benchmark (specifications:
//!   `client-side-encryption/tests/benchmarks.md`): one document of 1500 fields `key0001`…
//!   holding encrypted strings `"value 0001"`…, decrypted whole.
//! - **W2 bulk encrypt/decrypt**: user-like documents (~250 bytes, three encrypted fields of
//!   ~32 bytes, one nested).
//! - **W3 per-field overhead**: one field of 16 B to 4 KiB, against the bare AEAD.

use std::sync::Arc;

use bson::{doc, Document, RawDocumentBuf};
use secrecy::SecretBox;

use fieldcrypt::{
    Context, Cryptor, CsfleAlgorithm, CsfleDataKey, Field, InMemoryKeyring, Key, KeyId, KeyKind,
    KeyMaterial, KeyState, Result, Schema, Suite,
};

/// Number of fields in the W1 document.
pub const W1_FIELDS: usize = 1500;

/// The W1 document in clear: `key0001: "value 0001"` … `key1500: "value 1500"`.
#[must_use]
pub fn w1_plain() -> Document {
    let mut d = Document::new();
    for i in 1..=W1_FIELDS {
        d.insert(format!("key{i:04}"), format!("value {i:04}"));
    }
    d
}

/// Which ciphertext format a workload uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// MongoDB CSFLE, `AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic` (as MongoDB's benchmark).
    Csfle,
    /// MongoDB Queryable Encryption unindexed values (FLE2UnindexedEncryptedValueV2,
    /// `AEAD_AES_256_CBC_HMAC_SHA_256`, random IVs), as `Algorithm.UNINDEXED` writes them.
    QeUnindexed,
    /// A fieldcrypt suite.
    Fieldcrypt(Suite),
}

/// The W1 document encrypted in `format`, and a cryptor that decrypts it.
///
/// # Errors
/// Only on internal failures (key generation, encryption).
pub fn w1_encrypted(format: Format) -> Result<(Cryptor, RawDocumentBuf)> {
    match format {
        Format::Csfle | Format::QeUnindexed => {
            let mut material = Box::new([0u8; 96]);
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), material.as_mut());
            let id = KeyId::random();
            let ring = InMemoryKeyring::new();
            ring.insert(Key::from_material(
                id,
                "csfle",
                KeyKind::Csfle,
                KeyState::Active,
                KeyMaterial::from_slice(material.as_ref()),
                0,
            )?);
            let dk = CsfleDataKey::from_material(id, SecretBox::new(material), vec![])?;
            let mut enc = Document::new();
            for (k, v) in w1_plain() {
                let value = if format == Format::Csfle {
                    dk.encrypt_value(CsfleAlgorithm::Deterministic, &v)?
                } else {
                    dk.encrypt_qe_unindexed(&v)?
                };
                enc.insert(k, value);
            }
            Ok((
                Cryptor::decrypt_only(Arc::new(ring)),
                RawDocumentBuf::from_document(&enc)?,
            ))
        }
        Format::Fieldcrypt(suite) => {
            let ring = InMemoryKeyring::new();
            ring.generate("k");
            let mut b = Schema::builder();
            for i in 1..=W1_FIELDS {
                b = b.field(format!("key{i:04}"), Field::randomized("k").suite(suite));
            }
            let c = Cryptor::new(Arc::new(ring), b.build()?);
            let enc = c.encrypt_raw(
                &RawDocumentBuf::from_document(&w1_plain())?,
                &Context::none(),
            )?;
            Ok((c, enc))
        }
    }
}

/// W2's user document number `i` (~250 bytes).
#[must_use]
pub fn w2_user(i: u32) -> Document {
    doc! {
        "_id": i64::from(i),
        "username": format!("user{i:08}"),
        "created": bson::DateTime::from_millis(1_700_000_000_000 + i64::from(i)),
        "plan": "pro",
        "logins": i64::from(i),
        "email": format!("user{i:08}@example-mail.com......"),
        "ssn": format!("{:03}-{:02}-{:04}-padding-to-32-bytes", i % 1000, i % 100, i % 10000),
        "profile": { "country": "NL", "phone": format!("+31 6 {i:08} ext. 000000000"), "lang": "nl" },
    }
}

/// W2's schema: three encrypted fields (one nested) with `suite`, key alias `pii`.
///
/// # Errors
/// Never in practice (the schema is valid).
pub fn w2_schema(suite: Suite) -> Result<Schema> {
    Schema::builder()
        .field("email", Field::randomized("pii").suite(suite))
        .field("ssn", Field::randomized("pii").suite(suite))
        .field("profile.phone", Field::randomized("pii").suite(suite))
        .build()
}

/// A cryptor for W2 with a fresh key, and `n` plain user documents as raw BSON.
///
/// # Errors
/// Never in practice.
pub fn w2_setup(suite: Suite, n: u32) -> Result<(Cryptor, Vec<RawDocumentBuf>)> {
    let ring = InMemoryKeyring::new();
    ring.generate("pii");
    let c = Cryptor::new(Arc::new(ring), w2_schema(suite)?);
    let docs = (0..n)
        .map(|i| RawDocumentBuf::from_document(&w2_user(i)).map_err(Into::into))
        .collect::<Result<_>>()?;
    Ok((c, docs))
}

/// The context W2 runs in.
#[must_use]
pub fn w2_context() -> Context {
    Context::namespace("app.users")
}
