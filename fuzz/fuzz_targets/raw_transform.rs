//! Arbitrary bytes as a BSON document through the raw encrypt and decrypt paths.
#![no_main]

use std::sync::{Arc, OnceLock};

use fieldcrypt::{BlindIndex, Context, Cryptor, Field, InMemoryKeyring, Schema};
use libfuzzer_sys::fuzz_target;

fn cryptor() -> &'static Cryptor {
    static C: OnceLock<Cryptor> = OnceLock::new();
    C.get_or_init(|| {
        let ring = InMemoryKeyring::new();
        ring.generate("k");
        ring.generate("i");
        let schema = Schema::builder()
            .field("a", Field::randomized("k").bind_id())
            .field("b.c", Field::deterministic("k"))
            .field("t.$[]", Field::randomized("k").pad_to(16))
            .field("x", Field::blind_index_only(BlindIndex::new("i")))
            .build()
            .unwrap();
        Cryptor::new(Arc::new(ring), schema)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(doc) = bson::RawDocument::from_bytes(data) {
        let c = cryptor();
        let ctx = Context::namespace("db.coll");
        let original = c.decrypt_raw(doc, &ctx);
        if let (Ok(enc), Ok(_)) = (c.encrypt_raw(doc, &ctx), &original) {
            // Encryption only adds valid envelopes: if the input decrypted, so must the output.
            c.decrypt_raw(&enc, &ctx).expect("round trip");
        }
    }
});
