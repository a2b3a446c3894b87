//! Arbitrary bytes as a stored MongoDB Queryable Encryption value (subtype 6, blob subtypes 14
//! to 17), through the key set and the document transform. The key id in the header is set to
//! the one key there is, so that inputs reach the server layer and the AEAD, not only the
//! "unknown key" branch.
#![no_main]

use std::sync::OnceLock;

use bson::rawdoc;
use fieldcrypt::{
    Context, Cryptor, CsfleDataKey, CsfleKeySet, InMemoryKeyring, Key, KeyId, KeyKind,
    KeyMaterial, KeyState,
};
use libfuzzer_sys::fuzz_target;

const ID: [u8; 16] = [0x5a; 16];
const MATERIAL: [u8; 96] = [0x21; 96];

fn keys() -> &'static (CsfleKeySet, Cryptor) {
    static K: OnceLock<(CsfleKeySet, Cryptor)> = OnceLock::new();
    K.get_or_init(|| {
        let id = KeyId::from_bytes(ID);
        let mut set = CsfleKeySet::new();
        let material = secrecy::SecretBox::new(Box::new(MATERIAL));
        set.insert(CsfleDataKey::from_material(id, material, vec![]).unwrap())
            .unwrap();
        let ring = InMemoryKeyring::new();
        ring.insert(
            Key::from_material(
                id,
                "qe",
                KeyKind::Csfle,
                KeyState::Active,
                KeyMaterial::from_slice(&MATERIAL),
                0,
            )
            .unwrap(),
        );
        (set, Cryptor::decrypt_only(ring))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = vec![14 + sel % 4];
    bytes.extend_from_slice(&ID);
    bytes.extend_from_slice(rest);
    let bin = bson::Binary {
        subtype: bson::spec::BinarySubtype::Encrypted,
        bytes,
    };
    let (set, cryptor) = keys();
    let _ = set.decrypt_value(&bin);
    let _ = cryptor.decrypt_raw(&rawdoc! { "v": bin }, &Context::none());
});
