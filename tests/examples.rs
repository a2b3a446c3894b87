//! The examples run end to end (cargo builds them before the tests run) against the test server.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::PathBuf;
use std::process::Command;

use fieldcrypt_testkit::devserver::DevServer;

/// `target/<profile>/examples/<name>`, next to this test's `deps/` directory.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    dir.join(name)
}

fn run(name: &str, envs: &[(&str, &str)]) -> String {
    let server = DevServer::shared().unwrap();
    let mut cmd = Command::new(example(name));
    cmd.env("MONGODB_URI", server.uri());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn quickstart_queries_and_shows_ciphertext() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.b64");
    let key = key.to_str().unwrap();
    let out = run("quickstart", &[("FIELDCRYPT_MASTER_KEY_FILE", key)]);
    assert!(out.contains("(generated; keep it safe)"), "{out}");
    assert!(
        out.contains("find_one({email: \"grace@example.com\"}) -> Some(\"Grace Hopper\")"),
        "{out}"
    );
    assert!(out.contains("-> Some(\"Alan Turing\")"), "{out}");
    assert!(
        out.contains("refused: unsupported operation $regex"),
        "{out}"
    );
    let stored = out.split("stored by the server:").nth(1).unwrap();
    let stored = stored.split("read by the application:").next().unwrap();
    assert!(
        !stored.contains("123-45-6789") && !stored.contains("Ada"),
        "{stored}"
    );
    assert!(stored.contains("ssn: Binary(subtype 0x8f"), "{stored}");
    // A second run reuses the master key file.
    let again = run("quickstart", &[("FIELDCRYPT_MASTER_KEY_FILE", key)]);
    assert!(again.contains("(existing)"), "{again}");
}

#[test]
fn token_store_keeps_tokens_out_of_the_database() {
    let out = run("token_store", &[]);
    assert!(
        out.contains("alice looks up bob's session token -> None"),
        "{out}"
    );
    assert!(
        out.contains("alice looks up sess_alice_after_rotation -> Some(\"tablet\")"),
        "{out}"
    );
    assert!(
        out.contains("no token appears in clear in any stored document"),
        "{out}"
    );
}
