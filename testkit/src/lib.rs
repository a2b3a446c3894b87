//! fieldcrypt's test kit: what the tests, the examples, the criterion benches and the CLI's
//! `bench` share, kept out of the `fieldcrypt` library so that it ships none of it.
//!
//! - [`devserver`]: finds or starts a real MongoDB wire-protocol server (`MONGODB_URI`, a
//!   `mongod` on `PATH`, or SecantusDB installed with pip) for tests and local trials. **Not for
//!   production.**
//! - [`fixtures`]: small set-ups the integration tests share (keyrings, stored documents, the
//!   libmongocrypt interop fixtures).
//! - [`service`] and [`kms`]: the local KMS servers (moto, OpenBao, PyKMIP) for the KMS
//!   providers' tests, installed and supervised as the dev server is.
//! - [`workloads`]: the benchmark workloads W1 and W2 of `docs/BENCHMARKS.md`, so that the
//!   criterion benches and `fieldcrypt bench` measure the same thing.
#![forbid(unsafe_code)]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]

pub mod devserver;
pub mod fixtures;
pub mod kms;
pub mod service;
pub mod workloads;
