//! `#[derive(Encrypted)]` for fieldcrypt: the encryption schema of a serde type, marked next
//! to its fields. Use it through `fieldcrypt` (feature `derive`, on by default):
//!
//! ```ignore
//! use fieldcrypt::Encrypted;
//!
//! #[derive(Serialize, Deserialize, Encrypted)]
//! #[fieldcrypt(owner = "tenant_id")]
//! struct User {
//!     #[serde(rename = "_id")]
//!     id: ObjectId,
//!     tenant_id: String,
//!     #[fieldcrypt(key = "pii", bind_id)]
//!     ssn: String,
//!     #[fieldcrypt(key = "lookup", deterministic)]
//!     email: String,
//!     #[fieldcrypt(blind_index(key = "tokens"), index_only)]
//!     api_token: Option<String>,
//!     #[fieldcrypt(key = "pii", each)]
//!     tags: Vec<String>,        // tags.$[]
//!     profile: Profile,         // Profile's own marks, under profile.
//! }
//! let schema = User::schema();
//! ```
//!
//! Paths are the serialized names serde writes (`rename`, `rename_all`, `flatten`, enum
//! tagging); every schema rule is checked here and is a compile error on the field. The marks,
//! what serde options are refused and why: docs/SCHEMA.md in the fieldcrypt repository.

mod attr;
mod case;
mod expand;
mod rules;

use proc_macro::TokenStream;

/// Implements `fieldcrypt::Encrypted` from `#[fieldcrypt(...)]` marks on the fields.
///
/// Field marks: `key = "<alias>"`, `deterministic`, `algorithm = "<suite>"`, `bind_id`,
/// `pad_to = <bytes>`, `each` (each element of a sequence: `<field>.$[]`),
/// `blind_index(key = "<alias>", name = "<field>", truncate = <bytes>)`, `index_only` (only
/// the blind index is stored). On the type: `owner = "<field>"`.
#[proc_macro_derive(Encrypted, attributes(fieldcrypt))]
pub fn derive_encrypted(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::expand(&input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
