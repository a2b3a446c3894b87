//! libmongocrypt against the cloud fakes: runs `tests/fixtures/kms/cloud_interop.py` (PyMongo's
//! `ClientEncryption`, which has libmongocrypt build every KMS request and sends it over TLS to
//! the fake) in the test kit's Python environment, against the shared dev server.

use std::path::PathBuf;
use std::process::Output;

use crate::devserver::DevServer;

/// Runs the script with `spec` (see the script's docstring for its fields) and returns its
/// output; its last stdout line is its Extended JSON answer.
///
/// # Panics
/// If the venv, the server or the script cannot be started: in a test, that is the failure.
/// The script's own verdict is the caller's to assert.
#[must_use]
pub fn run(spec: &bson::Document) -> Output {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kms/cloud_interop.py");
    #[allow(clippy::expect_used)] // test helper: no venv or server is a failed test
    let python = DevServer::python_env().expect("the test kit's Python venv");
    #[allow(clippy::expect_used)] // as above
    let server = DevServer::shared().expect("the dev server");
    let spec = bson::Bson::Document(spec.clone())
        .into_canonical_extjson()
        .to_string();
    #[allow(clippy::expect_used)] // as above
    std::process::Command::new(python)
        .arg(script)
        .env("MONGODB_URI", server.uri())
        .env("FIELDCRYPT_CLOUD_INTEROP", spec)
        .output()
        .expect("running cloud_interop.py")
}

/// The script's answer: its last stdout line, parsed from Extended JSON.
///
/// # Panics
/// If the script failed or printed no document (with its output in the message).
#[must_use]
pub fn answer(out: &Output) -> bson::Document {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cloud_interop.py failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("cloud_interop.py printed no JSON ({e}):\n{stdout}\n{stderr}"));
    match bson::Bson::try_from(value) {
        Ok(bson::Bson::Document(d)) => d,
        other => panic!("cloud_interop.py printed no document: {other:?}"),
    }
}
