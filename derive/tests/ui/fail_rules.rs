use fieldcrypt::Encrypted;
use serde::Serialize;

#[derive(Serialize, Encrypted)]
struct DeterministicBound {
    #[fieldcrypt(key = "pii", deterministic, bind_id)]
    email: String,
}

#[derive(Serialize, Encrypted)]
struct IndexedElements {
    #[fieldcrypt(key = "pii", each, blind_index(key = "tokens"))]
    tags: Vec<String>,
}

#[derive(Serialize, Encrypted)]
struct Overlap {
    #[fieldcrypt(key = "pii")]
    a: String,
    #[serde(rename = "a")]
    #[fieldcrypt(key = "pii", deterministic)]
    b: String,
}

#[derive(Serialize, Encrypted)]
struct EncryptedId {
    #[serde(rename = "_id")]
    #[fieldcrypt(key = "pii")]
    id: String,
}

#[derive(Serialize, Encrypted)]
struct BadNumbers {
    #[fieldcrypt(key = "pii", pad_to = 0)]
    a: String,
    #[fieldcrypt(blind_index(key = "tokens", truncate = 4), index_only)]
    b: String,
    #[fieldcrypt(key = "pii", blind_index(key = "pii"))]
    c: String,
    #[fieldcrypt(key = "pii", algorithm = "ROT13")]
    d: String,
}

#[derive(Serialize, Encrypted)]
struct IndexOverwrites {
    #[fieldcrypt(blind_index(key = "tokens"), index_only)]
    token: String,
    token_bidx: String,
}

#[derive(Serialize, Encrypted)]
#[fieldcrypt(owner = "tenant")]
struct OwnerEncrypted {
    #[fieldcrypt(key = "pii")]
    tenant: String,
}

#[derive(Serialize, Encrypted)]
#[fieldcrypt(owner = "tenant_id")]
struct OwnerMissing {
    #[serde(rename = "tenant")]
    tenant_id: String,
}

fn main() {}
