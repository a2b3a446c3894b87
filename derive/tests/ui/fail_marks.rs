use fieldcrypt::Encrypted;
use serde::Serialize;

#[derive(Serialize, Encrypted)]
struct Marks {
    #[fieldcrypt(key = "pii", each)]
    not_a_sequence: String,
    #[fieldcrypt(deterministic)]
    no_key: String,
    #[fieldcrypt(blind_index(key = "tokens"))]
    index_without_key: String,
    #[fieldcrypt(key = "pii", blind_index(key = "tokens"), index_only)]
    index_only_with_key: String,
    #[fieldcrypt(key = "pii", secret)]
    unknown_mark: String,
}

#[derive(Serialize, Encrypted)]
struct Serde {
    #[serde(skip)]
    #[fieldcrypt(key = "pii")]
    skipped: String,
    #[serde(flatten)]
    #[fieldcrypt(key = "pii")]
    flattened: std::collections::HashMap<String, String>,
    #[serde(rename = "a.b")]
    #[fieldcrypt(key = "pii")]
    dotted: String,
}

#[derive(Serialize, Encrypted)]
struct Pair(#[fieldcrypt(key = "pii")] String, String);

#[derive(Serialize, Encrypted)]
struct Newtype(#[fieldcrypt(key = "pii")] String);

#[derive(Serialize, Encrypted)]
#[serde(tag = "kind")]
enum Variants {
    A {
        #[fieldcrypt(key = "pii")]
        x: String,
    },
    B {
        #[fieldcrypt(key = "pii", deterministic)]
        x: String,
    },
}

#[derive(Serialize, Encrypted)]
#[serde(tag = "kind")]
enum InternalNewtype {
    C(#[fieldcrypt(key = "pii")] String),
}

#[derive(Serialize, Encrypted)]
struct Generic<T> {
    inner: T,
}

#[derive(Serialize, Encrypted)]
#[fieldcrypt(owner = "tenant")]
enum OwnedEnum {
    A { tenant: String },
}

fn main() {}
