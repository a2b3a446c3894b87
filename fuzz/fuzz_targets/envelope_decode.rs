//! Arbitrary bytes as an envelope payload: decryption must fail cleanly, never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use fieldcrypt::{Context, Cryptor, Field, InMemoryKeyring, Schema};
use libfuzzer_sys::fuzz_target;

fn cryptor() -> &'static Cryptor {
    static C: OnceLock<Cryptor> = OnceLock::new();
    C.get_or_init(|| {
        let ring = InMemoryKeyring::new();
        ring.generate("k");
        let schema = Schema::builder().field("v", Field::randomized("k")).build().unwrap();
        Cryptor::new(Arc::new(ring), schema)
    })
}

fuzz_target!(|data: &[u8]| {
    let bin = bson::Binary {
        subtype: bson::spec::BinarySubtype::UserDefined(fieldcrypt::ENVELOPE_SUBTYPE),
        bytes: data.to_vec(),
    };
    let _ = cryptor().decrypt_value("v", &bin, &Context::none(), None, None);
});
