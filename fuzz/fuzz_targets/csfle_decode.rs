//! Arbitrary bytes as a MongoDB CSFLE (subtype 6) payload.
#![no_main]

use std::sync::OnceLock;

use fieldcrypt::{CsfleDataKey, CsfleKeySet};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static CsfleKeySet {
    static K: OnceLock<CsfleKeySet> = OnceLock::new();
    K.get_or_init(|| {
        let mut set = CsfleKeySet::new();
        set.insert(CsfleDataKey::generate(vec!["k".into()]).unwrap()).unwrap();
        set
    })
}

fuzz_target!(|data: &[u8]| {
    let bin = bson::Binary {
        subtype: bson::spec::BinarySubtype::Encrypted,
        bytes: data.to_vec(),
    };
    let _ = keys().decrypt_value(&bin);
});
