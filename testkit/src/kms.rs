//! Local KMS servers for the KMS providers' tests, started like [`crate::devserver`]'s
//! MongoDB server: installed from PyPI into their own virtual environments
//! ([`crate::service::PythonEnv`]) and stopped when the test process ends, also on panic.
//! Azure Key Vault and Google Cloud KMS have no local server; their tests use fakes.

pub mod gate;
pub mod moto;
pub mod openbao;
