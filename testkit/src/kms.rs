//! Local KMS servers for the KMS providers' tests, started like [`crate::devserver`]'s
//! MongoDB server: installed from PyPI into their own virtual environments
//! ([`crate::service::PythonEnv`]) and stopped when the test process ends, also on panic.
//! Azure Key Vault and Google Cloud KMS have no local server; their tests use fakes:
//!
//! - [`fake_https`]: the small HTTPS/HTTP server (per-run CA) the cloud fakes run on;
//! - [`fake_azure`]: Azure Key Vault, the Microsoft identity platform and IMDS;
//! - [`fake_gcp`]: Google Cloud KMS, Google's OAuth 2.0 token endpoint and the GCE metadata server;
//! - [`cloud_interop`]: libmongocrypt (PyMongo's `ClientEncryption`) against those fakes.

pub mod cloud_interop;
pub mod fake_azure;
pub mod fake_gcp;
pub mod fake_https;
pub mod gate;
pub mod moto;
pub mod openbao;
pub mod pykmip;
