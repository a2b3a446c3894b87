//! Servers for the KMS provider tests.
//!
//! - [`fake_https`]: the small HTTPS/HTTP server (per-run CA) the cloud fakes run on;
//! - [`fake_azure`]: Azure Key Vault, the Microsoft identity platform and IMDS;
//! - [`fake_gcp`]: Google Cloud KMS, Google's OAuth 2.0 token endpoint and the GCE metadata server.

pub mod fake_azure;
pub mod fake_gcp;
pub mod fake_https;
