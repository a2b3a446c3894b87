//! Keys: ids, secret material, states.

mod id;

pub use id::KeyId;
