//! Client-side field-level encryption for MongoDB.
#![forbid(unsafe_code)]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

mod csfle;
#[cfg(feature = "mongodb")]
pub mod devserver;
mod error;
mod key;

pub use csfle::{CsfleAlgorithm, CsfleDataKey, CsfleKeyDocument, CsfleKeySet, LocalMasterKey};
pub use error::{Error, Result};
pub use key::KeyId;
