//! Property tests: arbitrary BSON documents round-trip through the owned and raw paths, and
//! both paths give identical bytes.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::Arc;

use bson::spec::BinarySubtype;
use bson::{Binary, Bson, Document, RawDocumentBuf};
use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Schema, Suite};
use proptest::prelude::*;

fn leaf() -> impl Strategy<Value = Bson> {
    prop_oneof![
        any::<String>().prop_map(Bson::String),
        any::<i32>().prop_map(Bson::Int32),
        any::<i64>().prop_map(Bson::Int64),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(Bson::Double),
        any::<bool>().prop_map(Bson::Boolean),
        Just(Bson::Null),
        any::<i64>().prop_map(|m| Bson::DateTime(bson::DateTime::from_millis(m))),
        any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(bson::oid::ObjectId::from_bytes(b))),
        any::<[u8; 16]>().prop_map(|b| Bson::Decimal128(bson::Decimal128::from_bytes(b))),
        (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(st, bytes)| {
            // Subtype 2 (old binary) has its own inner length; 4 (UUID) must be 16 bytes.
            let subtype = match st {
                2 | 4 | 6 | 0x8E | 0x8F => BinarySubtype::Generic,
                s => BinarySubtype::from(s),
            };
            Bson::Binary(Binary { subtype, bytes })
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(time, increment)| Bson::Timestamp(bson::Timestamp { time, increment })),
        // bson sorts regex options when it serializes; generate them sorted.
        ("[a-z.*^$]{0,8}", "[imsux]{0,3}").prop_map(|(p, o)| {
            let mut o: Vec<char> = o.chars().collect();
            o.sort_unstable();
            o.dedup();
            Bson::RegularExpression(bson::Regex {
                pattern: p,
                options: o.into_iter().collect(),
            })
        }),
        Just(Bson::MinKey),
        Just(Bson::MaxKey),
    ]
}

fn value() -> impl Strategy<Value = Bson> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Bson::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..5)
                .prop_map(|m| Bson::Document(m.into_iter().collect())),
        ]
    })
}

fn document() -> impl Strategy<Value = Document> {
    proptest::collection::btree_map("[a-z]{1,6}", value(), 0..8)
        .prop_map(|m| m.into_iter().collect())
}

fn cryptor(suite: Suite) -> Cryptor {
    let ring = InMemoryKeyring::new();
    ring.generate("k");
    // Encrypt a few fixed names wherever they occur at the top level or one level down.
    let mut b = Schema::builder();
    for f in ["a", "b", "c", "d"] {
        b = b.field(f, Field::randomized("k").suite(suite));
    }
    for f in ["e.a", "e.b"] {
        b = b.field(f, Field::randomized("k").suite(suite));
    }
    Cryptor::new(Arc::new(ring), b.build().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn owned_and_raw_round_trip(doc in document(), suite_ix in 0usize..4) {
        let c = cryptor(Suite::ALL[suite_ix]);
        let ctx = Context::namespace("db.coll");
        let raw = RawDocumentBuf::from_document(&doc).unwrap();

        let enc_owned = c.encrypt_document(&doc, &ctx).unwrap();
        let enc_raw = c.encrypt_raw(&raw, &ctx).unwrap();

        let dec_owned = c.decrypt_document(&enc_owned, &ctx).unwrap();
        let dec_raw = c.decrypt_raw(&enc_raw, &ctx).unwrap();
        prop_assert_eq!(&dec_owned, &doc);
        prop_assert_eq!(dec_raw.as_bytes(), raw.as_bytes());
        // Cross: raw-encrypted decrypted by the owned path and vice versa.
        prop_assert_eq!(&c.decrypt_document(&enc_raw.to_document().unwrap(), &ctx).unwrap(), &doc);
        let enc_owned_raw = RawDocumentBuf::from_document(&enc_owned).unwrap();
        let cross = c.decrypt_raw(&enc_owned_raw, &ctx).unwrap();
        prop_assert_eq!(cross.as_bytes(), raw.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let c = cryptor(Suite::Aes256Gcm);
        if let Ok(d) = bson::RawDocument::from_bytes(&bytes) {
            let _ = c.encrypt_raw(d, &Context::none());
            let _ = c.decrypt_raw(d, &Context::none());
        }
    }
}
