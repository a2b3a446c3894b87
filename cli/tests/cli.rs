//! The `fieldcrypt` command-line tool, run as a process.
//!
//! Snapshot cases compare exit code, stdout and stderr with `tests/cmd/<case>.out` after
//! replacing what varies between runs (key ids, dates, ciphertexts, timings) with placeholders.
//! Run with `SNAPSHOTS=overwrite` to rewrite the files, then review the diff.
//!
//! The online cases use the dev server (`MONGODB_URI`, `mongod` on PATH, or SecantusDB): a real
//! `kill -9` of `reencrypt` at random points followed by `--resume`, and the rotation script
//! `examples/rotate-keys.sh` end to end.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // small test counts

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bson::{doc, Bson, Document, RawDocumentBuf};
use fieldcrypt::{Context, Cryptor, InMemoryKeyring, Keyring, Schema};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{all_stored, ext_json_lines, Interop};
use rand::{Rng, SeedableRng};

// Not `tests/support.rs`: Cargo would build that as a test binary of its own.
#[path = "support/process.rs"]
mod support;
use support::{run, Out, BIN};

/// Replaces what differs between runs with placeholders.
fn normalize(text: &str, dir: &Path) -> String {
    let text = text.replace(dir.to_str().unwrap(), "[DIR]");
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if let Some(n) = uuid_at(b, i) {
            out.push_str("[UUID]");
            i += n;
        } else if let Some(n) = date_at(b, i) {
            out.push_str("[DATE]");
            i += n;
        } else if b[i..].starts_with(b"\"base64\":\"") {
            let end = text[i + 10..].find('"').map_or(b.len(), |e| i + 10 + e);
            out.push_str("\"base64\":\"[B64]");
            i = end;
        } else {
            let c = text[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    // Timings: "in 0.3 s", "seconds": 0.123.
    let mut lines = Vec::new();
    for line in out.lines() {
        let mut l = line.to_owned();
        if let Some(p) = l.find(" in ") {
            if l.ends_with(" s") {
                l = format!("{} in [T] s", &l[..p]);
            }
        }
        lines.push(l);
    }
    let mut s = lines.join("\n");
    if out.ends_with('\n') {
        s.push('\n');
    }
    s
}

fn uuid_at(b: &[u8], i: usize) -> Option<usize> {
    let groups = [8, 4, 4, 4, 12];
    let mut j = i;
    for (g, len) in groups.iter().enumerate() {
        for _ in 0..*len {
            if !b.get(j)?.is_ascii_hexdigit() || b.get(j)?.is_ascii_uppercase() {
                return None;
            }
            j += 1;
        }
        if g < 4 {
            if *b.get(j)? != b'-' {
                return None;
            }
            j += 1;
        }
    }
    Some(j - i)
}

fn date_at(b: &[u8], i: usize) -> Option<usize> {
    // 2026-11-29T08:34:21.873Z
    let pat = b"dddd-dd-ddTdd:dd:dd";
    for (k, p) in pat.iter().enumerate() {
        let c = *b.get(i + k)?;
        let ok = if *p == b'd' {
            c.is_ascii_digit()
        } else {
            c == *p
        };
        if !ok {
            return None;
        }
    }
    let mut j = i + pat.len();
    if b.get(j) == Some(&b'.') {
        j += 1;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
    }
    if b.get(j) == Some(&b'Z') {
        j += 1;
    }
    Some(j - i)
}

/// Compares with (or, with `SNAPSHOTS=overwrite`, writes) `tests/cmd/<name>.out`.
fn snapshot(name: &str, out: &Out, dir: &Path) {
    snapshot_with(name, out, dir, &[]);
}

/// As [`snapshot`], replacing each `(text, placeholder)` first (e.g. a unique database name).
fn snapshot_with(name: &str, out: &Out, dir: &Path, subs: &[(&str, &str)]) {
    let sub = |t: &str| {
        let mut t = t.to_owned();
        for (from, to) in subs {
            t = t.replace(from, to);
        }
        normalize(&t, dir)
    };
    let actual = format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.code,
        sub(&out.stdout),
        sub(&out.stderr)
    );
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cmd")
        .join(format!("{name}.out"));
    if std::env::var("SNAPSHOTS").as_deref() == Ok("overwrite") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run with SNAPSHOTS=overwrite",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "snapshot {name} differs (SNAPSHOTS=overwrite to update)"
    );
}

const SCHEMA: &str = r#"
[fields.ssn]
key = "pii"

[fields."profile.email"]
key = "pii"
deterministic = true

[fields.phone]
key = "pii"
blind_index = { key = "idx" }
"#;

const PEOPLE: &str = r#"{"_id": 1, "ssn": "123-45-6789", "profile": {"email": "ada@example.com", "name": "Ada"}, "phone": "+1 555 0100", "n": {"$numberLong": "5"}}

{"_id": {"$oid": "65f000000000000000000001"}, "ssn": {"$numberInt": "42"}, "when": {"$date": "2026-01-01T00:00:00Z"}, "bin": {"$binary": {"base64": "AAEC", "subType": "80"}}}
"#;

/// A temp dir with a schema and a keyset holding `pii` and `idx`.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("schema.toml"), SCHEMA).unwrap();
    // `keys create` starts the keyset file when there is none.
    for alias in ["pii", "idx"] {
        let o = run(
            dir.path(),
            &["keys", "create", alias, "--keyset", "keys.json"],
            None,
            &[],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    dir
}

#[test]
fn help_lists_commands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    snapshot("help", &run(dir.path(), &["--help"], None, &[]), dir.path());
    snapshot(
        "reencrypt_help",
        &run(dir.path(), &["reencrypt", "--help"], None, &[]),
        dir.path(),
    );
}

#[test]
fn keys_create_starts_a_keyset_file_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Only `create` makes a missing file; `rotate` and `list` say it is missing.
    for args in [
        &["keys", "rotate", "pii", "--keyset", "new.json"][..],
        &["keys", "list", "--keyset", "new.json"][..],
    ] {
        let o = run(d, args, None, &[]);
        assert_eq!(o.code, 1, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("new.json"), "{}", o.stderr);
        assert!(!d.join("new.json").exists());
    }
    let o = run(
        d,
        &["keys", "create", "pii", "--keyset", "new.json"],
        None,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ring = InMemoryKeyring::load(d.join("new.json")).unwrap();
    assert_eq!(
        ring.primary("pii").unwrap().id().to_string(),
        o.stdout.trim()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("new.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[test]
fn keys_on_a_keyset_file() {
    let dir = workdir();
    let d = dir.path();
    snapshot(
        "keys_create_existing",
        &run(
            d,
            &["keys", "create", "pii", "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_rotate",
        &run(
            d,
            &["keys", "rotate", "pii", "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_rotate_unknown",
        &run(
            d,
            &["keys", "rotate", "nope", "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_list",
        &run(d, &["keys", "list", "--keyset", "keys.json"], None, &[]),
        d,
    );
    let active = run(
        d,
        &[
            "keys",
            "list",
            "--keyset",
            "keys.json",
            "--alias",
            "pii",
            "--state",
            "active",
            "--ids",
        ],
        None,
        &[],
    );
    assert_eq!(active.code, 0);
    let old = active.stdout.trim().to_owned();
    assert_eq!(old.len(), 36, "{}", active.stdout);
    // Without a server, references cannot be checked: refused unless --force.
    snapshot(
        "keys_disable_unchecked",
        &run(
            d,
            &["keys", "disable", &old, "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_disable_forced",
        &run(
            d,
            &["keys", "disable", &old, "--keyset", "keys.json", "--force"],
            None,
            &[],
        ),
        d,
    );
    let primary = run(
        d,
        &[
            "keys",
            "list",
            "--keyset",
            "keys.json",
            "--alias",
            "pii",
            "--state",
            "primary",
            "--ids",
        ],
        None,
        &[],
    );
    snapshot(
        "keys_disable_primary",
        &run(
            d,
            &[
                "keys",
                "disable",
                primary.stdout.trim(),
                "--keyset",
                "keys.json",
            ],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_enable",
        &run(
            d,
            &["keys", "enable", &old, "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_list_json",
        &run(
            d,
            &["keys", "list", "--keyset", "keys.json", "--json"],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "keys_bad_id",
        &run(
            d,
            &["keys", "enable", "not-a-uuid", "--keyset", "keys.json"],
            None,
            &[],
        ),
        d,
    );
    snapshot("keys_no_source", &run(d, &["keys", "list"], None, &[]), d);
    snapshot(
        "keys_rewrap_keyset",
        &run(
            d,
            &[
                "keys",
                "rewrap",
                "--new-master-key-file",
                "x",
                "--keyset",
                "keys.json",
            ],
            None,
            &[],
        ),
        d,
    );
}

#[test]
fn offline_encrypt_decrypt_round_trip() {
    let dir = workdir();
    let d = dir.path();
    let enc = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--namespace",
            "app.people",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(enc.code, 0, "{}", enc.stderr);
    snapshot("encrypt", &enc, d);
    assert!(!enc.stdout.contains("123-45-6789") && !enc.stdout.contains("ada@example.com"));
    let sealed = ext_json_lines(&enc.stdout);
    assert_eq!(sealed.len(), 2);
    assert!(sealed[0].contains_key("phone_bidx"));

    let dec = run(
        d,
        &[
            "decrypt",
            "--keyset",
            "keys.json",
            "--namespace",
            "app.people",
        ],
        Some(&enc.stdout),
        &[],
    );
    snapshot("decrypt", &dec, d);
    let mut back = ext_json_lines(&dec.stdout);
    back[0].remove("phone_bidx");
    assert_eq!(back, ext_json_lines(PEOPLE));

    // The same through files; deterministic fields give the same ciphertext twice.
    std::fs::write(d.join("in.jsonl"), PEOPLE).unwrap();
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--namespace",
            "app.people",
            "--in",
            "in.jsonl",
            "--out",
            "enc.jsonl",
        ],
        None,
        &[],
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    let again = ext_json_lines(&std::fs::read_to_string(d.join("enc.jsonl")).unwrap());
    assert_eq!(
        again[0].get_document("profile").unwrap().get("email"),
        sealed[0].get_document("profile").unwrap().get("email")
    );
    assert_ne!(again[0].get("ssn"), sealed[0].get("ssn"));

    // Ciphertexts are bound to their namespace.
    snapshot(
        "decrypt_wrong_namespace",
        &run(
            d,
            &[
                "decrypt",
                "--keyset",
                "keys.json",
                "--namespace",
                "app.other",
            ],
            Some(&enc.stdout),
            &[],
        ),
        d,
    );
    snapshot(
        "decrypt_no_namespace",
        &run(
            d,
            &["decrypt", "--keyset", "keys.json"],
            Some(&enc.stdout),
            &[],
        ),
        d,
    );
    // Encrypted without a namespace: decrypting with one is refused (a namespace-less value
    // could have been moved from anywhere), with what to do; without one it decrypts.
    let loose = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(loose.code, 0, "{}", loose.stderr);
    snapshot(
        "decrypt_unbound_namespace",
        &run(
            d,
            &[
                "decrypt",
                "--keyset",
                "keys.json",
                "--namespace",
                "app.people",
            ],
            Some(&loose.stdout),
            &[],
        ),
        d,
    );
    let o = run(
        d,
        &["decrypt", "--keyset", "keys.json"],
        Some(&loose.stdout),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut back = ext_json_lines(&o.stdout);
    back[0].remove("phone_bidx");
    assert_eq!(back, ext_json_lines(PEOPLE));
    // The keyset's usage counter was written back.
    let ring = InMemoryKeyring::load(d.join("keys.json")).unwrap();
    assert!(ring.primary("pii").unwrap().encryptions() >= 4);
}

#[test]
fn decrypts_mongodb_csfle_documents_with_a_key_vault_file() {
    let csfle = Interop::CSFLE;
    let doc: serde_json::Value = serde_json::from_str(&csfle.read("document.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = format!("{}\n", doc["encrypted"]);
    let o = run(
        dir.path(),
        &[
            "decrypt",
            "--key-vault-file",
            csfle.path("keys.jsonl").to_str().unwrap(),
            "--master-key-file",
            csfle.path("master-key.txt").to_str().unwrap(),
        ],
        Some(&input),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        ext_json_lines(&o.stdout),
        ext_json_lines(&format!("{}\n", doc["decrypted"]))
    );
    // Wrong master key: one clear line, no key bytes.
    let mk = dir.path().join("other.key");
    std::fs::write(
        &mk,
        fieldcrypt::LocalMasterKey::generate()
            .expose_base64()
            .as_bytes(),
    )
    .unwrap();
    let o = run(
        dir.path(),
        &[
            "decrypt",
            "--key-vault-file",
            csfle.path("keys.jsonl").to_str().unwrap(),
            "--master-key-file",
            mk.to_str().unwrap(),
        ],
        Some(&input),
        &[],
    );
    snapshot("decrypt_csfle_wrong_master_key", &o, &csfle.dir());
}

#[test]
fn errors_are_one_line_and_quote_no_values() {
    let dir = workdir();
    let d = dir.path();
    let bad =
        "{\"_id\": 1, \"ssn\": \"123-45-6789\"}\n{\"_id\": 2, \"ssn\": \"987-65-4321\" oops}\n";
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
        ],
        Some(bad),
        &[],
    );
    snapshot("encrypt_bad_json", &o, d);
    assert!(!o.stderr.contains("987-65-4321"));
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
        ],
        Some("{\"x\": {\"$numberInt\": \"secret-not-a-number\"}}\n"),
        &[],
    );
    snapshot("encrypt_bad_extjson", &o, d);
    assert!(!o.stderr.contains("secret-not-a-number"));
    std::fs::write(d.join("bad.toml"), "[fields.\"_id\"]\nkey = \"pii\"\n").unwrap();
    snapshot(
        "encrypt_bad_schema",
        &run(
            d,
            &["encrypt", "--schema", "bad.toml", "--keyset", "keys.json"],
            Some(""),
            &[],
        ),
        d,
    );
    std::fs::write(d.join("unknown.toml"), "[fields.x]\nkey = \"nope\"\n").unwrap();
    snapshot(
        "encrypt_unknown_alias",
        &run(
            d,
            &[
                "encrypt",
                "--schema",
                "unknown.toml",
                "--keyset",
                "keys.json",
            ],
            Some(""),
            &[],
        ),
        d,
    );
    snapshot(
        "encrypt_missing_schema",
        &run(d, &["encrypt", "--keyset", "keys.json"], Some(""), &[]),
        d,
    );
    snapshot(
        "encrypt_missing_keyset",
        &run(
            d,
            &[
                "encrypt",
                "--schema",
                "schema.toml",
                "--keyset",
                "nope.json",
            ],
            Some(""),
            &[],
        ),
        d,
    );
    snapshot(
        "reencrypt_no_server",
        &run(
            d,
            &[
                "reencrypt",
                "--schema",
                "schema.toml",
                "--namespace",
                "a.b",
                "--keyset",
                "keys.json",
            ],
            None,
            &[],
        ),
        d,
    );
    snapshot(
        "reencrypt_bad_partition",
        &run(
            d,
            &[
                "reencrypt",
                "--schema",
                "schema.toml",
                "--namespace",
                "a.b",
                "--partition",
                "2/2",
            ],
            None,
            &[],
        ),
        d,
    );
}

#[test]
fn validator_prints_the_json_schema() {
    let dir = workdir();
    snapshot(
        "validator",
        &run(
            dir.path(),
            &["validator", "--schema", "schema.toml"],
            None,
            &[],
        ),
        dir.path(),
    );
}

// ---- online ----

fn server_uri() -> String {
    DevServer::shared().unwrap().uri().to_owned()
}

fn generate(path: &Path, n: i64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..n {
        writeln!(
            f,
            r#"{{"_id": {i}, "ssn": "{:03}-{:02}-{:04}", "profile": {{"email": "user{i}@example.com"}}, "phone": "+1555{i:07}", "n": {i}}}"#,
            i % 1000,
            i % 100,
            i
        )
        .unwrap();
    }
}

async fn stored(uri: &str, ns: &str) -> Vec<RawDocumentBuf> {
    let (db, coll) = ns.split_once('.').unwrap();
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    all_stored(&client.database(db).collection::<RawDocumentBuf>(coll)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_killed_at_random_points_resumes_to_an_exact_result() {
    const N: i64 = 1500;
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let ns = format!("{}.people", unique_db_name("cli_kill"));
    generate(&d.join("people.jsonl"), N);
    let env = [("MONGODB_URI", uri.as_str())];
    let o = run(
        &d,
        &[
            "import",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--in",
            "people.jsonl",
            "--keyset",
            "keys.json",
        ],
        None,
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.starts_with(&format!("imported {N} document(s)")),
        "{}",
        o.stdout
    );
    for alias in ["pii", "idx"] {
        assert_eq!(
            run(
                &d,
                &["keys", "rotate", alias, "--keyset", "keys.json", "-q"],
                None,
                &[]
            )
            .code,
            0
        );
    }

    let seed: u64 = rand::thread_rng().gen();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    let mut first = true;
    loop {
        let mut args = vec![
            "reencrypt",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--keyset",
            "keys.json",
            "--batch",
            "40",
            "--json",
        ];
        if !first {
            args.push("--resume");
        }
        first = false;
        let mut child = Command::new(BIN)
            .current_dir(&d)
            .args(&args)
            .env("MONGODB_URI", &uri)
            .env_remove("FIELDCRYPT_KEYSET")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill -9 after a random number of progress lines (while it writes, between a write and
        // its checkpoint, anywhere), unless it has finished by then.
        let kill_after = if kills < 4 {
            rng.gen_range(1..12)
        } else {
            usize::MAX
        };
        let stderr = child.stderr.take().unwrap();
        let mut seen = 0;
        let mut killed = false;
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("\"progress\"") {
                seen += 1;
            }
            if seen >= kill_after {
                // A random extra delay lands the kill inside the next batch's work.
                std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(0..60)));
                child.kill().unwrap();
                killed = true;
                break;
            }
        }
        let out = child.wait_with_output().unwrap();
        if killed && !out.status.success() {
            kills += 1;
            continue;
        }
        assert!(out.status.success(), "exit {:?}", out.status);
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["complete"], true);
        assert_eq!(summary["stats"]["failed"], 0);
        break;
    }
    assert!(kills >= 3, "only {kills} kills");

    // Every document is there once, decrypts, and is under the new keys.
    let docs = stored(&uri, &ns).await;
    assert_eq!(docs.len(), N as usize);
    let ring = InMemoryKeyring::load(d.join("keys.json")).unwrap();
    let current = [
        ring.primary("pii").unwrap().id(),
        ring.primary("idx").unwrap().id(),
    ];
    let cryptor = Cryptor::new(ring, Schema::from_toml_str(SCHEMA).unwrap());
    let ctx = Context::namespace(ns.clone());
    for (i, raw) in docs.iter().enumerate() {
        for k in Cryptor::referenced_keys(raw).unwrap() {
            assert!(current.contains(&k), "document {i} still under {k}");
        }
        let plain = cryptor
            .decrypt_raw(raw, &ctx)
            .unwrap()
            .to_document()
            .unwrap();
        assert_eq!(i64::from(plain.get_i32("_id").unwrap()), i as i64);
        assert_eq!(plain.get_str("phone").unwrap(), format!("+1555{i:07}"));
    }
    // Running again changes nothing.
    let o = run(
        &d,
        &[
            "reencrypt",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--keyset",
            "keys.json",
        ],
        None,
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains(&format!("scanned {N}, rewrote 0, already current {N}")),
        "{}",
        o.stdout
    );
    assert_eq!(stored(&uri, &ns).await, docs);
}

// Kubernetes Indexed Jobs: the partition from JOB_COMPLETION_INDEX and a total.

/// Environment variables of one run.
type Env<'a> = &'a [(&'a str, &'a str)];

#[test]
fn partition_from_the_job_index_is_checked_before_anything_runs() {
    let dir = workdir();
    let d = dir.path();
    let base = [
        "--schema",
        "schema.toml",
        "--namespace",
        "a.b",
        "--keyset",
        "keys.json",
    ];
    let go = |cmd: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![cmd];
        args.extend_from_slice(&base);
        args.extend_from_slice(extra);
        run(d, &args, None, env)
    };
    // (command, flags, environment, what stderr must say)
    let cases: &[(&str, &[&str], Env<'_>, &str)] = &[
        (
            "reencrypt",
            &[],
            &[("FIELDCRYPT_PARTITIONS", "4")],
            "JOB_COMPLETION_INDEX, which is not set",
        ),
        (
            "reencrypt",
            &["--partitions", "4"],
            &[],
            "JOB_COMPLETION_INDEX, which is not set",
        ),
        (
            "reencrypt",
            &[],
            &[("JOB_COMPLETION_INDEX", "4"), ("FIELDCRYPT_PARTITIONS", "4")],
            "JOB_COMPLETION_INDEX=4 is not below the number of partitions, 4",
        ),
        (
            "migrate",
            &["--partitions", "3"],
            &[("JOB_COMPLETION_INDEX", "7")],
            "JOB_COMPLETION_INDEX=7 is not below the number of partitions, 3",
        ),
        (
            "reencrypt",
            &[],
            &[("JOB_COMPLETION_INDEX", "1")],
            "JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but the number of partitions is not",
        ),
        (
            "reencrypt",
            &["--partitions", "2"],
            &[("JOB_COMPLETION_INDEX", "one")],
            "JOB_COMPLETION_INDEX=\"one\" is not a partition index",
        ),
        (
            "reencrypt",
            &["--partition", "1/4"],
            &[("JOB_COMPLETION_INDEX", "2")],
            "--partition 1/4 conflicts with JOB_COMPLETION_INDEX=\"2\"",
        ),
        (
            "reencrypt",
            &["--partition", "1/4"],
            &[("FIELDCRYPT_PARTITIONS", "3")],
            "--partition 1/4 conflicts with --partitions / FIELDCRYPT_PARTITIONS = 3",
        ),
        (
            "migrate",
            &["--partition", "1/4", "--partitions", "2"],
            &[],
            "--partition 1/4 conflicts with --partitions / FIELDCRYPT_PARTITIONS = 2",
        ),
        (
            "reencrypt",
            &["--partition", "all"],
            &[("JOB_COMPLETION_INDEX", "3")],
            "--partition all conflicts with JOB_COMPLETION_INDEX=\"3\"",
        ),
        (
            "reencrypt",
            &["--partitions", "2", "--id-from", "{\"$oid\":\"65f000000000000000000001\"}"],
            &[("JOB_COMPLETION_INDEX", "0")],
            "--id-from / --id-to (a range) select documents in two ways: give one",
        ),
        (
            "reencrypt",
            &["--partitions", "0"],
            &[("JOB_COMPLETION_INDEX", "0")],
            "invalid value '0' for '--partitions <N>'",
        ),
    ];
    for (cmd, flags, env, want) in cases {
        let o = go(cmd, flags, env);
        // Exit 2 for what the argument parser refuses, 1 for the CLI's own checks.
        let code = if want.starts_with("invalid value") {
            2
        } else {
            1
        };
        assert_eq!(o.code, code, "{cmd} {flags:?} {env:?}: {}", o.stderr);
        assert!(
            o.stderr.contains(want),
            "{cmd} {flags:?} {env:?}: {}",
            o.stderr
        );
        assert_eq!(o.stdout, "", "{cmd} {flags:?} {env:?}");
    }
    // Consistent settings get past the partition check, to the missing server; so does a
    // range in an Indexed Job (the index is not used), and an empty index (as if unset).
    let fine: &[(&[&str], Env<'_>)] = &[
        (
            &["--partition", "1/4"],
            &[
                ("JOB_COMPLETION_INDEX", "1"),
                ("FIELDCRYPT_PARTITIONS", "4"),
            ],
        ),
        (&["--partitions", "4"], &[("JOB_COMPLETION_INDEX", "3")]),
        (
            &[],
            &[
                ("JOB_COMPLETION_INDEX", "0"),
                ("FIELDCRYPT_PARTITIONS", "1"),
            ],
        ),
        (
            &["--id-to", "{\"$oid\":\"65f000000000000000000001\"}"],
            &[("JOB_COMPLETION_INDEX", "5")],
        ),
        (&[], &[("JOB_COMPLETION_INDEX", "")]),
    ];
    for (flags, env) in fine {
        let o = go("reencrypt", flags, env);
        assert_eq!(o.code, 1, "{flags:?} {env:?}: {}", o.stderr);
        assert!(
            o.stderr
                .contains("no server: give --uri or set MONGODB_URI"),
            "{flags:?} {env:?}: {}",
            o.stderr
        );
    }
}

/// `examples/k8s/reencrypt-indexed-job.yaml`: an Indexed Job whose completions, parallelism and
/// FIELDCRYPT_PARTITIONS agree, whose secrets come from a Secret through the environment, and
/// whose arguments the CLI accepts in every pod (up to the missing server).
#[test]
fn the_indexed_job_example_is_consistent_and_keeps_secrets_off_the_command_line() {
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/k8s/reencrypt-indexed-job.yaml"),
    )
    .unwrap();
    let lines: Vec<&str> = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    let value = |key: &str| -> String {
        lines
            .iter()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key}"))
            .trim()
            .trim_matches('"')
            .to_owned()
    };
    assert_eq!(value("kind:"), "Job");
    assert_eq!(value("completionMode:"), "Indexed");
    let n: u32 = value("completions:").parse().unwrap();
    assert_eq!(value("parallelism:"), n.to_string());
    // The value line after `- name: FIELDCRYPT_PARTITIONS`.
    let at = lines
        .iter()
        .position(|l| l.trim() == "- name: FIELDCRYPT_PARTITIONS")
        .unwrap();
    assert_eq!(
        lines[at + 1].trim().strip_prefix("value:").unwrap().trim(),
        format!("\"{n}\"")
    );
    // Secrets: from secretKeyRef, in the environment.
    for var in ["MONGODB_URI", "FIELDCRYPT_MASTER_KEY"] {
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("- name: {var}"))
            .unwrap_or_else(|| panic!("no {var}"));
        assert!(lines[at + 1..at + 4]
            .iter()
            .any(|l| l.trim() == "secretKeyRef:"));
    }
    // The container's arguments: the list after `args:`.
    let at = lines.iter().position(|l| l.trim() == "args:").unwrap();
    let args: Vec<String> = lines[at + 1..]
        .iter()
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim().trim_start_matches("- ").to_owned())
        .collect();
    assert_eq!(args[0], "reencrypt");
    assert!(args.iter().any(|a| a == "--resume"));
    for a in &args {
        assert!(
            !a.contains("mongodb") && !a.contains("master-key") && !a.contains("--partition"),
            "{a}"
        );
    }
    // Every pod's arguments pass the CLI's checks (the schema path is the pod's: use ours).
    let dir = workdir();
    let mut args: Vec<&str> = args
        .iter()
        .map(|a| {
            if a.starts_with("--schema=") {
                "--schema=schema.toml"
            } else {
                a.as_str()
            }
        })
        .collect();
    args.extend(["--keyset", "keys.json"]);
    let n_text = n.to_string();
    for i in [0, n - 1] {
        let i = i.to_string();
        let o = run(
            dir.path(),
            &args,
            None,
            &[
                ("JOB_COMPLETION_INDEX", i.as_str()),
                ("FIELDCRYPT_PARTITIONS", n_text.as_str()),
            ],
        );
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(o.stderr.contains("no server"), "{}", o.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexed_job_pods_split_a_rotation_between_them_exactly() {
    const N: i64 = 600;
    const PODS: usize = 3;
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let ns = format!("{}.people", unique_db_name("cli_indexed_job"));
    generate(&d.join("people.jsonl"), N);
    let env = [("MONGODB_URI", uri.as_str())];
    let o = run(
        &d,
        &[
            "import",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--in",
            "people.jsonl",
            "--keyset",
            "keys.json",
        ],
        None,
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for alias in ["pii", "idx"] {
        let o = run(
            &d,
            &["keys", "rotate", alias, "--keyset", "keys.json", "-q"],
            None,
            &[],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    // The pods of one Indexed Job, at the same time: the total from FIELDCRYPT_PARTITIONS
    // (the manifest's way) for two of them and from --partitions for the third.
    let pods: Vec<_> = (0..PODS)
        .map(|i| {
            let mut cmd = Command::new(BIN);
            cmd.current_dir(&d)
                .args([
                    "reencrypt",
                    "--schema",
                    "schema.toml",
                    "--namespace",
                    &ns,
                    "--keyset",
                    "keys.json",
                    "--batch",
                    "50",
                    "--json",
                ])
                .env("MONGODB_URI", &uri)
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env_remove("FIELDCRYPT_KEYSET")
                .env_remove("FIELDCRYPT_PARTITIONS")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if i == 2 {
                cmd.args(["--partitions", &PODS.to_string()]);
            } else {
                cmd.env("FIELDCRYPT_PARTITIONS", PODS.to_string());
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let mut rewritten = 0;
    for (i, pod) in pods.into_iter().enumerate() {
        let out = pod.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "pod {i}: {stderr}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["complete"], true, "pod {i}");
        let t = &summary["targets"][0];
        assert_eq!(t["partition"], format!("{i}/{PODS}"), "pod {i}");
        let n = t["stats"]["rewritten"].as_i64().unwrap();
        // A hash split: each pod gets about a third (600 documents: far from 0 or all).
        assert!(n > N / 6 && n < N / 2, "pod {i} rewrote {n}");
        assert_eq!(t["stats"]["failed"], 0, "pod {i}");
        rewritten += n;
    }
    assert_eq!(rewritten, N, "every document exactly once");

    // Every document is under the new keys and decrypts.
    let docs = stored(&uri, &ns).await;
    assert_eq!(docs.len(), N as usize);
    let ring = InMemoryKeyring::load(d.join("keys.json")).unwrap();
    let current = [
        ring.primary("pii").unwrap().id(),
        ring.primary("idx").unwrap().id(),
    ];
    let cryptor = Cryptor::new(ring, Schema::from_toml_str(SCHEMA).unwrap());
    let ctx = Context::namespace(ns.clone());
    for (i, raw) in docs.iter().enumerate() {
        for k in Cryptor::referenced_keys(raw).unwrap() {
            assert!(current.contains(&k), "document {i} still under {k}");
        }
        let plain = cryptor.decrypt_raw(raw, &ctx).unwrap();
        assert_eq!(plain.get_str("phone").unwrap(), format!("+1555{i:07}"));
    }
    // A pod restarted by the Job (same index) resumes from its own checkpoint: nothing to do.
    let o = run(
        &d,
        &[
            "reencrypt",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--keyset",
            "keys.json",
            "--resume",
        ],
        None,
        &[
            ("MONGODB_URI", uri.as_str()),
            ("JOB_COMPLETION_INDEX", "1"),
            ("FIELDCRYPT_PARTITIONS", "3"),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("[1/3]: scanned 0, rewrote 0")
            && o.stdout.contains("already complete: nothing to do"),
        "{}",
        o.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_commands_import_audit_disable_export() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let db = unique_db_name("cli_online");
    let ns = format!("{db}.people");
    let snap = |name: &str, o: &Out| snapshot_with(name, o, &d, &[(db.as_str(), "[DB]")]);
    generate(&d.join("people.jsonl"), 200);
    let env = [("MONGODB_URI", uri.as_str())];
    let k = ["--keyset", "keys.json"];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(k.iter())
            .map(|s| (*s).to_owned())
            .collect()
    };
    let go = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&d, &a, None, &env)
    };
    let o = go(with(&[
        "import",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--in",
        "people.jsonl",
    ]));
    assert_eq!(o.code, 0, "{}", o.stderr);

    let o = go(with(&[
        "audit",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
    ]));
    snap("audit_clean", &o);

    // Plant plaintext and a token, rotate, and audit again (JSON, exit 3).
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client.database(&db).collection::<Document>("people");
    coll.insert_one(doc! { "_id": 1000, "ssn": "000-00-0000", "note": "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" }).await.unwrap();
    let old = go(with(&[
        "keys", "list", "--alias", "pii", "--state", "primary", "--ids",
    ]))
    .stdout
    .trim()
    .to_owned();
    assert_eq!(go(with(&["keys", "rotate", "pii", "-q"])).code, 0);
    let o = go(with(&[
        "audit",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--json",
    ]));
    assert_eq!(o.code, 3, "{}", o.stderr);
    let rep: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let kinds: Vec<&str> = rep["collections"][0]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"plaintext") && kinds.contains(&"stale-key") && kinds.contains(&"token"),
        "{kinds:?}"
    );
    assert!(!o.stdout.contains("ghp_wWPw") && !o.stdout.contains("000-00-0000"));
    snap(
        "audit_findings",
        &go(with(&[
            "audit",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
        ])),
    );

    // The old key is still in use: disable refuses and says how many documents.
    snap(
        "keys_disable_refused",
        &go(with(&["keys", "disable", &old, "--namespace", &ns])),
    );
    snap(
        "audit_key",
        &go(with(&[
            "audit",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--key",
            &old,
        ])),
    );
    // Re-encrypt (the planted plaintext document is left to `migrate`), then it is allowed.
    let o = go(with(&[
        "reencrypt",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
    ]));
    snap("reencrypt", &o);
    let o = go(with(&[
        "migrate",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--dry-run",
    ]));
    snap("migrate_dry_run", &o);
    let o = go(with(&[
        "migrate",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
    ]));
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    snap(
        "keys_disable_after",
        &go(with(&["keys", "disable", &old, "--namespace", &ns])),
    );

    // Export: ciphertext as stored, or decrypted with a warning.
    let o = go(with(&["export", "--namespace", &ns, "--limit", "2"]));
    assert_eq!(o.code, 0);
    assert!(!o.stdout.contains("user0@example.com"));
    let o = go(with(&[
        "export",
        "--namespace",
        &ns,
        "--limit",
        "2",
        "--decrypt",
    ]));
    snap("export_decrypt", &o);
    // Validator on the live collection.
    let o = go(vec![
        "validator".into(),
        "--schema".into(),
        "schema.toml".into(),
        "--apply".into(),
        "--namespace".into(),
        format!("{db}.validated"),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    client.database(&db).drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_script_runs_end_to_end() {
    let uri = server_uri();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    std::fs::write(d.join("schema.toml"), SCHEMA).unwrap();
    let db = unique_db_name("cli_script");
    let kv = format!("{db}.datakeys");
    let master = fieldcrypt::LocalMasterKey::generate();
    let master = master.expose_base64();
    let env = [
        ("MONGODB_URI", uri.as_str()),
        ("FIELDCRYPT_MASTER_KEY", master.as_str()),
    ];
    let kvopt = ["--key-vault-namespace", kv.as_str()];
    for alias in ["pii", "idx"] {
        let o = run(
            &d,
            &["keys", "create", alias, kvopt[0], kvopt[1]],
            None,
            &env,
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    generate(&d.join("a.jsonl"), 300);
    generate(&d.join("b.jsonl"), 200);
    for (coll, file) in [("a", "a.jsonl"), ("b", "b.jsonl")] {
        let ns = format!("{db}.{coll}");
        let o = run(
            &d,
            &[
                "import",
                "--schema",
                "schema.toml",
                "--namespace",
                &ns,
                "--in",
                file,
                kvopt[0],
                kvopt[1],
            ],
            None,
            &env,
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
    let old = run(
        &d,
        &[
            "keys", "list", "--alias", "pii", "--ids", kvopt[0], kvopt[1],
        ],
        None,
        &env,
    )
    .stdout
    .trim()
    .to_owned();

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/rotate-keys.sh");
    let script_run = |resume: bool| {
        let mut cmd = Command::new("sh");
        cmd.current_dir(&d)
            .arg(&script)
            .args(["pii", "schema.toml", &format!("{db}.a"), &format!("{db}.b")])
            .env("MONGODB_URI", &uri)
            .env("FIELDCRYPT_MASTER_KEY", master.as_str())
            .env("FIELDCRYPT_KEY_VAULT_NS", &kv)
            .env("FIELDCRYPT_WAIT", "0")
            .env("FIELDCRYPT", BIN)
            .env_remove("FIELDCRYPT_KEYSET");
        if resume {
            cmd.env("RESUME", "1");
        }
        cmd.output().unwrap()
    };
    let out = script_run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(&format!("disabled {old}")), "{stderr}");

    // The old key is disabled, everything is under the new primary and reads back.
    let list = run(
        &d,
        &[
            "keys", "list", "--alias", "pii", "--json", kvopt[0], kvopt[1],
        ],
        None,
        &env,
    );
    let keys: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let state = |id: &str| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state(&old), "disabled");
    for coll in ["a", "b"] {
        let o = run(
            &d,
            &[
                "export",
                "--namespace",
                &format!("{db}.{coll}"),
                "--decrypt",
                kvopt[0],
                kvopt[1],
            ],
            None,
            &env,
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_eq!(
            ext_json_lines(&o.stdout).len(),
            if coll == "a" { 300 } else { 200 }
        );
    }
    // Run again after completion, as after an interruption: nothing to do, success.
    let out = script_run(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An export of the key vault (fieldcrypt's key documents, material bound to each
    // document) decrypts offline as --key-vault-file.
    let o = run(
        &d,
        &["export", "--namespace", &kv, "--out", "datakeys.jsonl"],
        None,
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let ns = format!("{db}.a");
    let sealed = run(
        &d,
        &["export", "--namespace", &ns, "--limit", "3"],
        None,
        &env,
    );
    assert_eq!(sealed.code, 0, "{}", sealed.stderr);
    let o = run(
        &d,
        &[
            "decrypt",
            "--key-vault-file",
            "datakeys.jsonl",
            "--namespace",
            &ns,
        ],
        Some(&sealed.stdout),
        &[("FIELDCRYPT_MASTER_KEY", master.as_str())],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let docs = ext_json_lines(&o.stdout);
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0].get_str("ssn").unwrap(), "000-00-0000");

    // `keys rewrap`: every data key moves under a new master key; no data document changes.
    let new_master = fieldcrypt::LocalMasterKey::generate();
    let new_master = new_master.expose_base64();
    std::fs::write(d.join("new.key"), new_master.as_bytes()).unwrap();
    let o = run(
        &d,
        &[
            "keys",
            "rewrap",
            "--new-master-key-file",
            "new.key",
            kvopt[0],
            kvopt[1],
        ],
        None,
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let export_with = |master: &str| {
        run(
            &d,
            &[
                "export",
                "--namespace",
                &ns,
                "--decrypt",
                "--limit",
                "3",
                kvopt[0],
                kvopt[1],
            ],
            None,
            &[
                ("MONGODB_URI", uri.as_str()),
                ("FIELDCRYPT_MASTER_KEY", master),
            ],
        )
    };
    let o = export_with(new_master.as_str());
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        ext_json_lines(&o.stdout)[0].get_str("ssn").unwrap(),
        "000-00-0000"
    );
    let o = export_with(master.as_str());
    assert_ne!(o.code, 0, "the old master key still unwraps after rewrap");
    assert!(!o.stdout.contains("000-00-0000"));
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    client.database(&db).drop().await.unwrap();
}

#[test]
fn output_files_are_owner_only_and_not_overwritten_without_force() {
    use std::os::unix::fs::PermissionsExt;
    let dir = workdir();
    let d = dir.path();
    let mode = |f: &str| std::fs::metadata(d.join(f)).unwrap().permissions().mode() & 0o777;
    let enc = |extra: &[&str]| {
        let mut args = vec![
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--out",
            "sealed.jsonl",
        ];
        args.extend_from_slice(extra);
        run(d, &args, Some(PEOPLE), &[])
    };
    let o = enc(&[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(mode("sealed.jsonl"), 0o600);
    let sealed = std::fs::read_to_string(d.join("sealed.jsonl")).unwrap();

    // Decrypted output: a new file is 0600, whatever the umask.
    let dec = |extra: &[&str]| {
        let mut args = vec![
            "decrypt",
            "--keyset",
            "keys.json",
            "--in",
            "sealed.jsonl",
            "--out",
            "plain.jsonl",
        ];
        args.extend_from_slice(extra);
        run(d, &args, None, &[])
    };
    let o = dec(&[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(mode("plain.jsonl"), 0o600);
    assert_eq!(
        ext_json_lines(&std::fs::read_to_string(d.join("plain.jsonl")).unwrap()).len(),
        2
    );

    // An existing file is not overwritten (nor followed, if it is a symlink)…
    std::fs::write(d.join("plain.jsonl"), "keep me\n").unwrap();
    let o = dec(&[]);
    assert_eq!(o.code, 1);
    assert!(
        o.stderr
            .contains("the file exists; give --force to overwrite it"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(d.join("plain.jsonl")).unwrap(),
        "keep me\n"
    );
    std::os::unix::fs::symlink(d.join("elsewhere"), d.join("link.jsonl")).unwrap();
    let o = run(
        d,
        &[
            "decrypt",
            "--keyset",
            "keys.json",
            "--in",
            "sealed.jsonl",
            "--out",
            "link.jsonl",
        ],
        None,
        &[],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(!d.join("elsewhere").exists());
    // …unless --force: then it is replaced and keeps its (here: looser) mode, with a warning.
    std::fs::set_permissions(
        d.join("plain.jsonl"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let o = dec(&["--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(mode("plain.jsonl"), 0o640);
    assert!(o.stderr.contains("chmod 600"), "{}", o.stderr);
    assert_eq!(
        ext_json_lines(&std::fs::read_to_string(d.join("plain.jsonl")).unwrap()).len(),
        2
    );
    // Ciphertext output overwrites without the warning, keeping the file's mode too.
    std::fs::set_permissions(
        d.join("sealed.jsonl"),
        std::fs::Permissions::from_mode(0o620),
    )
    .unwrap();
    let o = enc(&["--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(mode("sealed.jsonl"), 0o620);
    assert!(!o.stderr.contains("warning"), "{}", o.stderr);
    assert_ne!(
        std::fs::read_to_string(d.join("sealed.jsonl")).unwrap(),
        sealed
    );
    // --force needs --out.
    let o = run(
        d,
        &["decrypt", "--keyset", "keys.json", "--force"],
        Some(""),
        &[],
    );
    assert_eq!(o.code, 2, "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_documents_keep_the_job_open_and_unreadable_ones_block_destroy() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let db = unique_db_name("cli_unknown");
    let ns = format!("{db}.people");
    let snap = |name: &str, o: &Out| snapshot_with(name, o, &d, &[(db.as_str(), "[DB]")]);
    generate(&d.join("people.jsonl"), 3);
    let env = [("MONGODB_URI", uri.as_str())];
    let go = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--keyset", "keys.json"]);
        run(&d, &a, None, &env)
    };
    let o = go(&[
        "import",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--in",
        "people.jsonl",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let old = go(&["keys", "list", "--alias", "pii", "--ids"])
        .stdout
        .trim()
        .to_owned();
    assert_eq!(go(&["keys", "rotate", "pii", "-q"]).code, 0);

    // A malformed value next to readable references does not hide them.
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client.database(&db).collection::<Document>("people");
    let junk = Bson::Binary(bson::Binary {
        subtype: bson::spec::BinarySubtype::UserDefined(0x8F),
        bytes: vec![1, 2, 3],
    });
    coll.update_one(doc! { "_id": 0 }, doc! { "$set": { "junk": junk.clone() } })
        .await
        .unwrap();
    let o = go(&["keys", "destroy", &old, "--namespace", &ns]);
    assert_eq!(o.code, 5, "{}", o.stderr);
    assert!(
        o.stderr.contains("3 document(s) still reference it"),
        "{}",
        o.stderr
    );
    // Re-encryption moves the readable documents; the malformed one fails and keeps the key.
    let o = go(&["reencrypt", "--schema", "schema.toml", "--namespace", &ns]);
    assert_eq!(o.code, 4, "{}{}", o.stdout, o.stderr);
    // The job is not complete while a document fails: --resume retries it (exit 4 again, not
    // "already complete" and 0).
    let resume = [
        "reencrypt",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--resume",
    ];
    let o = go(&resume);
    assert_eq!(o.code, 4, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("scanned 1,") && o.stdout.contains("not complete: 1 document(s)"),
        "{}",
        o.stdout
    );
    assert!(!o.stdout.contains("already complete"), "{}", o.stdout);
    let o = go(&[&resume[..], &["--json"]].concat());
    assert_eq!(o.code, 4);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (
            v["complete"].as_bool(),
            v["targets"][0]["unresolved"].as_u64()
        ),
        (Some(false), Some(1))
    );
    // A document whose only ciphertext cannot be read may be under any key: destroying is
    // refused, with the count, unless --force.
    coll.replace_one(doc! { "_id": 0 }, doc! { "_id": 0, "ssn": junk })
        .await
        .unwrap();
    snap(
        "keys_destroy_unknown",
        &go(&["keys", "destroy", &old, "--namespace", &ns]),
    );
    let o = go(&["keys", "destroy", &old, "--namespace", &ns, "--json"]);
    assert_eq!(o.code, 5);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (v["documents"].as_u64(), v["unknown"].as_u64()),
        (Some(0), Some(1))
    );
    // `audit --key`, the check before disabling, says the same.
    let o = go(&[
        "audit",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--key",
        &old,
    ]);
    assert_eq!(o.code, 3, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("1 document(s) may reference key"),
        "{}",
        o.stdout
    );
    let o = go(&["keys", "destroy", &old, "--namespace", &ns, "--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Once the document is repaired (here: removed), the job completes, and stays complete.
    coll.delete_one(doc! { "_id": 0 }).await.unwrap();
    let o = go(&resume);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let o = go(&resume);
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("already complete"), "{}", o.stdout);
    client.database(&db).drop().await.unwrap();
}

/// The random-nonce encryptions counted in a keyset file for the keys of one alias.
fn counted(dir: &Path, alias: &str) -> (u64, usize) {
    let ring = InMemoryKeyring::load(dir.join("keys.json")).unwrap();
    let keys: Vec<_> = ring
        .keys()
        .into_iter()
        .filter(|k| k.alias() == alias)
        .collect();
    (keys.iter().map(|k| k.encryptions()).sum(), keys.len())
}

#[test]
fn keyset_counters_add_up_across_concurrent_runs_and_errors() {
    let dir = workdir();
    let d = dir.path();
    generate(&d.join("people.jsonl"), 1500);
    let encrypt = |input: &str| {
        Command::new(BIN)
            .current_dir(d)
            .args([
                "encrypt",
                "--schema",
                "schema.toml",
                "--keyset",
                "keys.json",
                "--in",
                input,
            ])
            .env_remove("FIELDCRYPT_KEYSET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // One run alone: how many encryptions it counts.
    let (c0, _) = counted(d, "pii");
    let o = encrypt("people.jsonl").wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (c1, _) = counted(d, "pii");
    let per_run = c1 - c0;
    assert!(per_run >= 3000, "{per_run}");

    // Two runs and four rotations at once: every run's count is added (not the larger of
    // two), and every rotated key is kept.
    let runs: Vec<_> = (0..2).map(|_| encrypt("people.jsonl")).collect();
    let rotations: Vec<_> = (0..4)
        .map(|_| {
            Command::new(BIN)
                .current_dir(d)
                .args(["keys", "rotate", "pii", "--keyset", "keys.json", "-q"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in runs.into_iter().chain(rotations) {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (c2, n) = counted(d, "pii");
    assert_eq!(n, 5, "a concurrent rotation was lost");
    assert_eq!(c2, c1 + 2 * per_run, "a concurrent run's count was lost");
    assert!(d.join("keys.json.lock").exists());

    // A run that fails part-way still counts the encryptions it made: a document that cannot
    // be encrypted (a dotted name spelling an encrypted path) after the others of its batch.
    let mut text = std::fs::read_to_string(d.join("people.jsonl")).unwrap();
    text.push_str("{\"_id\": -1, \"profile.email\": \"x@example.com\"}\n");
    std::fs::write(d.join("bad.jsonl"), text).unwrap();
    let o = encrypt("bad.jsonl").wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let (c3, _) = counted(d, "pii");
    assert_eq!(
        c3,
        c2 + per_run,
        "encryptions of a failed run were not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_bindings_are_consistent_across_commands() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let db = unique_db_name("cli_bind");
    let bound = format!("{db}.bound");
    let loose = format!("{db}.loose");
    let snap = |name: &str, o: &Out| snapshot_with(name, o, &d, &[(db.as_str(), "[DB]")]);
    generate(&d.join("people.jsonl"), 5);
    let env = [("MONGODB_URI", uri.as_str())];
    let go = |args: &[&str], stdin: Option<&str>| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--keyset", "keys.json"]);
        run(&d, &a, stdin, &env)
    };
    // `import` binds to the collection: its export decrypts with that namespace only.
    let o = go(
        &[
            "import",
            "--schema",
            "schema.toml",
            "--namespace",
            &bound,
            "--in",
            "people.jsonl",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let sealed = go(&["export", "--namespace", &bound], None);
    assert_eq!(sealed.code, 0, "{}", sealed.stderr);
    let o = go(&["decrypt", "--namespace", &bound], Some(&sealed.stdout));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout).len(), 5);
    let o = go(&["decrypt"], Some(&sealed.stdout));
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("bound to a namespace"), "{}", o.stderr);

    // Values encrypted offline without a namespace and loaded as they are (mongoimport):
    // `export --decrypt` refuses them unless told they are not namespace-bound.
    let offline = go(
        &["encrypt", "--schema", "schema.toml", "--in", "people.jsonl"],
        None,
    );
    assert_eq!(offline.code, 0, "{}", offline.stderr);
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client
        .database(&db)
        .collection::<Document>(loose.split_once('.').unwrap().1);
    coll.insert_many(ext_json_lines(&offline.stdout))
        .await
        .unwrap();
    snap(
        "export_decrypt_unbound",
        &go(&["export", "--namespace", &loose, "--decrypt", "-q"], None),
    );
    let o = go(
        &[
            "export",
            "--namespace",
            &loose,
            "--decrypt",
            "--no-namespace-binding",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout).len(), 5);
    // Re-encryption reads them the same way: under the collection's namespace they fail (and
    // are listed), with --no-namespace-binding they are rotated.
    assert_eq!(go(&["keys", "rotate", "pii", "-q"], None).code, 0);
    let o = go(
        &[
            "reencrypt",
            "--schema",
            "schema.toml",
            "--namespace",
            &loose,
        ],
        None,
    );
    assert_eq!(o.code, 4, "{}{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("not bound to the namespace"),
        "{}",
        o.stdout
    );
    let o = go(
        &[
            "reencrypt",
            "--schema",
            "schema.toml",
            "--namespace",
            &loose,
            "--no-namespace-binding",
            "--job",
            "loose",
        ],
        None,
    );
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("rewrote 5"), "{}", o.stdout);
    client.database(&db).drop().await.unwrap();
}

// ---- bench ----

fn json_of(out: &Out) -> serde_json::Value {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

fn positive(v: &serde_json::Value) -> bool {
    v.as_f64().is_some_and(|x| x > 0.0 && x.is_finite())
}

#[test]
fn bench_w1_w2_measure_fieldcrypt_against_the_bare_aead() {
    let dir = workdir();
    // An odd number of trials: the median is one trial, so the ratio of median times is the
    // ratio of median rates (with two, the medians are means and differ).
    let fixed = [
        "--documents",
        "3",
        "--trials",
        "3",
        "--warmup",
        "0",
        "--json",
    ];
    let w1 = json_of(&run(
        dir.path(),
        &[&["bench", "w1", "--format", "csfle"][..], &fixed].concat(),
        None,
        &[],
    ));
    assert_eq!(w1["workload"], "W1");
    assert_eq!(w1["values_per_document"], 1500);
    let rows = w1["results"].as_array().unwrap();
    for kind in ["fieldcrypt", "baseline"] {
        let row = rows.iter().find(|r| r["kind"] == kind).unwrap();
        assert!(positive(&row["documents_per_second"]["median"]), "{row}");
        assert_eq!(row["trials"].as_array().unwrap().len(), 3);
    }
    let ratios = w1["ratios"].as_object().unwrap();
    assert!(
        !ratios.is_empty() && ratios.values().all(positive),
        "{ratios:?}"
    );
    // The ratio is fieldcrypt's time per document over the bare calls': their rates inverted.
    let rate = |kind: &str| {
        rows.iter().find(|r| r["kind"] == kind).unwrap()["documents_per_second"]["median"]
            .as_f64()
            .unwrap()
    };
    let ratio = ratios["decrypt_raw_over_bare_aead"].as_f64().unwrap();
    // The printed rates are rounded to 0.1 document/s, which in a debug build on a busy
    // machine (a few documents/s) is more than a percent: bound the ratio by that rounding.
    let (b, f) = (rate("baseline"), rate("fieldcrypt"));
    let (lo, hi) = ((b - 0.05) / (f + 0.05), (b + 0.05) / (f - 0.05));
    assert!(
        ratio >= lo * 0.999 && ratio <= hi * 1.001,
        "{ratio} vs {b}/{f}"
    );

    // What the numbers were measured on, with each figure: the CPU and the features the AEAD
    // crates pick their code by (on x86-64 Linux, where /proc/cpuinfo has them).
    let m = &w1["machine"];
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        assert!(
            m["cpu_vendor"].is_string() && m["cpu_family"].is_string(),
            "{m}"
        );
        let flags = m["cpu_flags"].as_array().unwrap();
        assert!(
            flags.iter().any(|f| f == "aes") == (m["aes_backend"] != "software"),
            "{m}"
        );
        assert!(
            ["VAES-512", "VAES-256", "AES-NI", "software"]
                .contains(&m["aes_backend"].as_str().unwrap()),
            "{m}"
        );
    }

    // MongoDB's benchmark thread counts go up to 64: each thread has its own loop and rate.
    let w1 = json_of(&run(
        dir.path(),
        &[
            &["bench", "w1", "--format", "qe-unindexed", "--threads", "8"][..],
            &[
                "--documents",
                "1",
                "--trials",
                "1",
                "--warmup",
                "0",
                "--json",
            ],
        ]
        .concat(),
        None,
        &[],
    ));
    assert_eq!(w1["threads"], 8);
    for row in w1["results"].as_array().unwrap() {
        let per = row["median_trial_per_thread"].as_array().unwrap();
        assert_eq!(per.len(), 8, "{row}");
        assert!(per.iter().all(positive), "{row}");
    }

    // Every suite, fieldcrypt and its bare baseline (each seals and opens the document's
    // values; a failed open is an error, not a number).
    for suite in [
        "AES-256-GCM",
        "ChaCha20-Poly1305",
        "XChaCha20-Poly1305",
        "AES-256-SIV-deterministic",
    ] {
        let w1 = json_of(&run(
            dir.path(),
            &[
                &["bench", "w1", "--suite", suite, "--documents", "1"][..],
                &["--trials", "1", "--warmup", "0", "--json"],
            ]
            .concat(),
            None,
            &[],
        ));
        assert_eq!(w1["params"]["suite"], suite);
        let rows = w1["results"].as_array().unwrap();
        for kind in ["fieldcrypt", "baseline"] {
            let row = rows.iter().find(|r| r["kind"] == kind).unwrap();
            assert!(positive(&row["documents_per_second"]["median"]), "{row}");
        }
    }

    let w2 = json_of(&run(
        dir.path(),
        &[
            &["bench", "w2", "--docs", "50", "--path", "all"][..],
            &fixed,
        ]
        .concat(),
        None,
        &[],
    ));
    let names: Vec<&str> = w2["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for want in [
        "encrypt_raw",
        "decrypt_raw",
        "encrypt_owned",
        "decrypt_owned",
    ] {
        assert!(names.iter().any(|n| n.contains(want)), "{names:?}");
    }
    // The seal baseline draws a random nonce per value, as fieldcrypt must.
    let seal = w2["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "bare_aead_seal")
        .unwrap();
    assert!(
        seal["what"].as_str().unwrap().contains("random nonces"),
        "{seal}"
    );

    // Contradictory options are refused with a message, not measured.
    let bad = run(
        dir.path(),
        &["bench", "w1", "--format", "csfle", "--suite", "AES-256-GCM"],
        None,
        &[],
    );
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("--suite"), "{}", bad.stderr);
}

#[test]
fn bench_w4_rotates_a_collection_and_reports_copy_ratios_and_peak_memory() {
    let dir = workdir();
    let uri = server_uri();
    let out = json_of(&run(
        dir.path(),
        &[
            "bench",
            "w4",
            "--uri",
            &uri,
            "--documents",
            "40,120",
            "--batch-size",
            "25",
            "--trials",
            "1",
            "--partitions",
            "2,3",
            "--json",
        ],
        None,
        &[],
    ));
    assert_eq!(out["workload"], "W4");
    assert_eq!(out["params"]["partitions"], serde_json::json!([2, 3]));
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (r, n) in results.iter().zip([40, 120]) {
        assert_eq!(r["documents"], n);
        for pass in ["copy", "rewrite", "rotate"] {
            let p = &r["passes"][pass];
            assert!(positive(&p["seconds"]["median"]), "{pass}: {p}");
            assert!(
                positive(&p["documents_per_second"]["median"]),
                "{pass}: {p}"
            );
            // Linux: the peak resident set is measured for every pass.
            let peak = p["peak_rss_kib"].as_u64().unwrap();
            assert!(peak > 0, "{pass}: {p}");
            assert!(
                p["peak_growth_kib"].as_u64().unwrap() <= peak,
                "{pass}: {p}"
            );
        }
        // One trial: each ratio is that trial's rotate time over the baseline's (rounded to ms).
        let secs = |pass: &str| r["passes"][pass]["seconds"]["median"].as_f64().unwrap();
        for (ratio, baseline) in [
            ("rotate_over_copy", "copy"),
            ("rotate_over_rewrite", "rewrite"),
        ] {
            let got = r["ratios"][ratio]["median"].as_f64().unwrap();
            let want = secs("rotate") / secs(baseline);
            assert!(positive(&r["ratios"][ratio]["median"]), "{ratio}");
            assert!((got / want - 1.0).abs() < 0.15, "{ratio}: {got} vs {want}");
        }
        // N partitioned workers: their documents add up to the collection, each one's share
        // is its own (a hash split), and the speed-up is that trial's rotate time over theirs.
        let split = r["partitioned"].as_array().unwrap();
        assert_eq!(split.len(), 2);
        for (p, workers) in split.iter().zip([2u64, 3]) {
            assert_eq!(p["workers"], workers);
            let docs: Vec<u64> = p["median_trial_documents_per_partition"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(docs.len() as u64, workers, "{p}");
            assert_eq!(docs.iter().sum::<u64>(), n, "{p}");
            assert!(docs.iter().all(|&k| k > 0 && k < n), "{p}");
            let secs = p["median_trial_partition_seconds"].as_array().unwrap();
            assert_eq!(secs.len() as u64, workers);
            let wall = p["seconds"]["median"].as_f64().unwrap();
            assert!(
                wall > 0.0 && secs.iter().all(|s| s.as_f64().unwrap() <= wall + 1e-3),
                "{p}"
            );
            let speedup = p["speedup_over_one_worker"]["median"].as_f64().unwrap();
            let want = r["passes"]["rotate"]["seconds"]["median"].as_f64().unwrap() / wall;
            assert!((speedup / want - 1.0).abs() < 0.15, "{speedup} vs {want}");
        }
    }
    // The scratch database is gone.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names = rt.block_on(async {
        let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
        let names = client.list_database_names().await.unwrap();
        client.shutdown().immediate(true).await;
        names
    });
    assert!(
        !names.iter().any(|n| n.starts_with("fieldcrypt_bench_w4")),
        "{names:?}"
    );
}

// Issue #12: the CLI's data safety.

fn decrypt_to(d: &Path, input: &str, out: &str, extra: &[&str]) -> Out {
    let mut args = vec![
        "decrypt",
        "--keyset",
        "keys.json",
        "--in",
        input,
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    run(d, &args, None, &[])
}

/// Names in `d` that start with a dot: temporary files left behind.
fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn out_file_is_replaced_only_on_success_and_never_is_the_input_or_a_symlink() {
    let dir = workdir();
    let d = dir.path();
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--out",
            "sealed.jsonl",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let sealed = std::fs::read_to_string(d.join("sealed.jsonl")).unwrap();

    // (1) A run that fails on line 2 leaves the old file as it was…
    std::fs::write(d.join("old.jsonl"), "keep me\n").unwrap();
    std::fs::write(
        d.join("bad.jsonl"),
        format!("{}\n{{not json\n", sealed.lines().next().unwrap()),
    )
    .unwrap();
    let o = decrypt_to(d, "bad.jsonl", "old.jsonl", &["--force"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("line 2"), "{}", o.stderr);
    assert_eq!(
        std::fs::read_to_string(d.join("old.jsonl")).unwrap(),
        "keep me\n"
    );
    // …and a new file does not appear at all (7: no partial plaintext).
    let o = decrypt_to(d, "bad.jsonl", "new.jsonl", &[]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(!d.join("new.jsonl").exists());

    // (1) --out the same file as --in (or as stdin) is refused; the ciphertexts stay.
    let o = decrypt_to(d, "sealed.jsonl", "sealed.jsonl", &["--force"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("the same file as the input"),
        "{}",
        o.stderr
    );
    std::fs::hard_link(d.join("sealed.jsonl"), d.join("alias.jsonl")).unwrap();
    let o = decrypt_to(d, "sealed.jsonl", "alias.jsonl", &["--force"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    let stdin_is_file = Command::new(BIN)
        .current_dir(d)
        .args([
            "decrypt",
            "--keyset",
            "keys.json",
            "--out",
            "sealed.jsonl",
            "--force",
        ])
        .env_remove("FIELDCRYPT_KEYSET")
        .stdin(std::fs::File::open(d.join("sealed.jsonl")).unwrap())
        .output()
        .unwrap();
    assert_eq!(stdin_is_file.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(d.join("sealed.jsonl")).unwrap(),
        sealed
    );

    // (4) --force does not write through a symlink.
    std::fs::write(d.join("target.jsonl"), "keep me\n").unwrap();
    std::os::unix::fs::symlink(d.join("target.jsonl"), d.join("link.jsonl")).unwrap();
    let o = decrypt_to(d, "sealed.jsonl", "link.jsonl", &["--force"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("symbolic link"), "{}", o.stderr);
    assert_eq!(
        std::fs::read_to_string(d.join("target.jsonl")).unwrap(),
        "keep me\n"
    );

    // A successful --force replaces the file; no temporary file is left anywhere.
    let o = decrypt_to(d, "sealed.jsonl", "old.jsonl", &["--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        ext_json_lines(&std::fs::read_to_string(d.join("old.jsonl")).unwrap()).len(),
        2
    );
    assert_eq!(leftovers(d), Vec::<String>::new());
}

#[test]
fn documents_over_mongodbs_16_mib_limit_are_refused_naming_the_line() {
    let dir = workdir();
    let d = dir.path();
    // Just under 16 MiB of BSON in, over it once `ssn` is encrypted.
    let limit = 16 * 1024 * 1024;
    let big = "x".repeat(limit - 24 - 16);
    let input = format!("{{\"_id\": 0}}\n\n{{\"_id\": 1, \"ssn\": \"{big}\"}}\n");
    let raw = RawDocumentBuf::from_document(&doc! { "_id": 1, "ssn": big.as_str() }).unwrap();
    assert!(raw.as_bytes().len() <= limit);
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--out",
            "big.jsonl",
        ],
        Some(&input),
        &[],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("line 3") && o.stderr.contains("16 MiB"),
        "{}",
        o.stderr
    );
    assert!(!d.join("big.jsonl").exists());
    // A line far over the limit is refused before it is parsed.
    let huge = format!("{{\"_id\": 1, \"n\": \"{}\"}}\n", "y".repeat(40 << 20));
    // From a file: the command stops reading at the limit.
    std::fs::write(d.join("huge.jsonl"), huge).unwrap();
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--in",
            "huge.jsonl",
        ],
        None,
        &[],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("line 1: longer than 32 MiB"),
        "{}",
        o.stderr
    );
}

/// Writes `n` into the `encryptions` field of every key of `keys.json`.
fn set_count(d: &Path, n: u64) {
    let path = d.join("keys.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys = v["keys"].as_array_mut().unwrap();
    for k in keys {
        k["encryptions"] = n.into();
    }
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn concurrent_runs_never_pass_a_keyset_keys_nonce_budget() {
    let dir = workdir();
    let d = dir.path();
    generate(&d.join("people.jsonl"), 1500);
    let encrypt = || {
        Command::new(BIN)
            .current_dir(d)
            .args([
                "encrypt",
                "--schema",
                "schema.toml",
                "--keyset",
                "keys.json",
                "--in",
                "people.jsonl",
            ])
            .env_remove("FIELDCRYPT_KEYSET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (c0, _) = counted(d, "pii");
    assert!(encrypt().wait_with_output().unwrap().status.success());
    let per_run = counted(d, "pii").0 - c0;
    // Budget for one and a half runs; three run at once.
    let limit = fieldcrypt::RANDOM_NONCE_LIMIT;
    let start = limit - per_run * 3 / 2;
    set_count(d, start);
    let runs: Vec<_> = (0..3).map(|_| encrypt()).collect();
    let outs: Vec<_> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count() as u64;
    assert!(
        ok <= 1,
        "{ok} runs made more encryptions than the budget holds"
    );
    for o in outs.iter().filter(|o| !o.status.success()) {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("random-nonce budget is spent"), "{e}");
    }
    // What was written fits the budget; the file counts it (and the refused runs' unwritten
    // encryptions too: the count only errs high).
    assert!(ok * per_run <= limit - start);
    let (c, _) = counted(d, "pii");
    assert!(c >= start + ok * per_run, "{c}");
}

#[test]
fn read_only_key_sources_refuse_random_nonces_unless_allowed() {
    let dir = workdir();
    let d = dir.path();
    let keyset = std::fs::read(d.join("keys.json")).unwrap();
    let b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(keyset)
    };
    let env = [("FIELDCRYPT_KEYSET", b64.as_str())];
    let o = run(
        d,
        &["encrypt", "--schema", "schema.toml"],
        Some(PEOPLE),
        &env,
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("--allow-unrecorded-nonces"),
        "{}",
        o.stderr
    );
    assert_eq!(o.stdout, "");
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--allow-unrecorded-nonces",
        ],
        Some(PEOPLE),
        &env,
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout).len(), 2);
}

#[test]
fn keyset_files_keep_their_mode_and_loose_ones_are_warned_about() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = workdir();
    let d = dir.path();
    let path = d.join("keys.json");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let gid = std::fs::metadata(&path).unwrap().gid();
    let o = run(
        d,
        &["keys", "rotate", "pii", "--keyset", "keys.json"],
        None,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("readable by its group"), "{}", o.stderr);
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o640);
    assert_eq!(m.gid(), gid);
    // A data command's counter write-back keeps it too.
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("readable by its group"), "{}", o.stderr);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );
}

#[test]
fn encrypt_fails_when_its_key_is_destroyed_while_it_runs() {
    let dir = workdir();
    let d = dir.path();
    let old = InMemoryKeyring::load(d.join("keys.json"))
        .unwrap()
        .primary("pii")
        .unwrap()
        .id();
    let mut child = Command::new(BIN)
        .current_dir(d)
        .args([
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--out",
            "sealed.jsonl",
        ])
        .env_remove("FIELDCRYPT_KEYSET")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(PEOPLE.as_bytes()).unwrap();
    // The run has loaded its keys; the key is retired and destroyed meanwhile.
    std::thread::sleep(std::time::Duration::from_millis(500));
    for args in [
        vec!["keys", "rotate", "pii", "--keyset", "keys.json"],
        vec![
            "keys",
            "destroy",
            &old.to_string(),
            "--keyset",
            "keys.json",
            "--force",
        ],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let o = run(d, &args, None, &[]);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
    }
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("destroyed while this command ran"), "{e}");
    assert!(!d.join("sealed.jsonl").exists());
}

#[test]
fn errors_name_the_input_line_and_every_command_takes_quiet() {
    let dir = workdir();
    let d = dir.path();
    let enc = |input: &[u8]| {
        let mut c = Command::new(BIN)
            .current_dir(d)
            .args([
                "encrypt",
                "--schema",
                "schema.toml",
                "--keyset",
                "keys.json",
                "-q",
            ])
            .env_remove("FIELDCRYPT_KEYSET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input).unwrap();
        let o = c.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // Invalid UTF-8 on line 3.
    let (code, e) = enc(b"{\"_id\": 1}\n{\"_id\": 2}\n{\"_id\": \"\xff\"}\n");
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("line 3: not UTF-8"), "{e}");
    // Blank lines count: the failing document is on line 4 (the second document).
    let (code, e) = enc(b"{\"_id\": 1}\n\n\n{\"_id\": 2, \"profile.email\": \"x@example.com\"}\n");
    assert_eq!(code, Some(1), "{e}");
    assert!(e.contains("line 4:"), "{e}");
    assert!(!e.contains("x@example.com"), "{e}");
    // A missing master key file is named.
    let o = run(
        d,
        &[
            "decrypt",
            "--key-vault-file",
            "keys.json",
            "--master-key-file",
            "no-such.key",
        ],
        Some(""),
        &[],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("no-such.key"), "{}", o.stderr);
    // (10) -q/--quiet on encrypt and decrypt.
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--quiet",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run(
        d,
        &["decrypt", "--keyset", "keys.json", "-q"],
        Some(&o.stdout),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_redacts_duplicate_keys_and_says_how_to_resume() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let ns = format!("{}.people", unique_db_name("cli_import_resume"));
    let env = [("MONGODB_URI", uri.as_str())];
    let import = |input: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--namespace",
            &ns,
            "--batch",
            "2",
        ];
        args.extend_from_slice(extra);
        run(&d, &args, Some(input), &env)
    };
    let o = import("{\"_id\": \"alice@example.com\"}\n", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Three documents in, then Alice again: the fourth fails.
    let input = "{\"_id\": \"a1\"}\n{\"_id\": \"a2\"}\n\n{\"_id\": \"a3\"}\n{\"_id\": \"alice@example.com\"}\n{\"_id\": \"a5\"}\n";
    let o = import(input, &[]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        !o.stderr.contains("alice"),
        "a value in the error: {}",
        o.stderr
    );
    assert!(o.stderr.contains("resume with --skip 3"), "{}", o.stderr);
    // Resuming past the duplicate inserts the rest, and nothing twice.
    let o = import(input, &["--skip", "4"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(stored(&uri, &ns).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uri_with_a_password_comes_from_a_file_or_the_environment_only() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let ns = format!("{}.people", unique_db_name("cli_uri_file"));
    // Refused on the command line, whatever the command; the password is not echoed.
    for args in [
        vec![
            "export",
            "--namespace",
            "a.b",
            "--uri",
            "mongodb://u:s3cret@127.0.0.1:1/",
        ],
        vec![
            "export",
            "--namespace",
            "a.b",
            "--uri=mongodb://u:s3cret@127.0.0.1:1/",
        ],
        vec![
            "keys",
            "list",
            "--key-vault-uri",
            "mongodb://u:s3cret@127.0.0.1:1/",
        ],
    ] {
        let o = run(&d, &args, None, &[]);
        assert_eq!(o.code, 1, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("--uri-file"), "{}", o.stderr);
        assert!(!o.stderr.contains("s3cret"), "{}", o.stderr);
    }
    // From a file it is used.
    std::fs::write(d.join("uri.txt"), format!("{uri}\n")).unwrap();
    let o = run(
        &d,
        &[
            "import",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--namespace",
            &ns,
            "--uri-file",
            "uri.txt",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(stored(&uri, &ns).await.len(), 2);
    // The key vault's too, from a file or its environment variable; the message names them.
    let o = run(
        &d,
        &[
            "keys",
            "list",
            "--key-vault-uri",
            "mongodb://u:s3cret@127.0.0.1:1/",
        ],
        None,
        &[],
    );
    assert!(
        o.stderr.contains("--key-vault-uri-file") && o.stderr.contains("FIELDCRYPT_KEY_VAULT_URI"),
        "{}",
        o.stderr
    );
    let master = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 96]);
    let vault_ns = format!("{}.datakeys", unique_db_name("cli_vault_uri"));
    let create = |how: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["keys", "create", "pii", "--key-vault-namespace", &vault_ns];
        args.extend_from_slice(how);
        let mut env = env.to_vec();
        env.push(("FIELDCRYPT_MASTER_KEY", &master));
        run(&d, &args, None, &env)
    };
    let o = create(&["--key-vault-uri-file", "uri.txt"], &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = run(
        &d,
        &["keys", "list", "--key-vault-namespace", &vault_ns, "--json"],
        None,
        &[("FIELDCRYPT_KEY_VAULT_URI", &uri)],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("pii"), "{}", o.stdout);
    // Nothing given: no key vault.
    let o = create(&[], &[]);
    assert_eq!(o.code, 1, "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_reports_a_document_too_deep_to_walk_and_goes_on() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let db = unique_db_name("cli_audit_deep");
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client.database(&db).collection::<Document>("people");
    let mut deep = doc! { "leaf": 1 };
    for _ in 0..130 {
        deep = doc! { "n": deep };
    }
    coll.insert_many([
        doc! { "_id": 1, "deep": deep },
        doc! { "_id": 2, "ssn": "000-00-0000" },
    ])
    .await
    .unwrap();
    let o = run(
        &d,
        &[
            "audit",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--namespace",
            &format!("{db}.people"),
        ],
        None,
        &[("MONGODB_URI", uri.as_str())],
    );
    assert_eq!(o.code, 3, "{}{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("2 document(s)"), "{}", o.stdout);
    assert!(o.stdout.contains("nested too deep"), "{}", o.stdout);
    assert!(
        o.stdout.contains("plaintext in encrypted field \"ssn\""),
        "{}",
        o.stdout
    );
}

/// Runs `encrypt` under `schema` on stdin, one batch (1,000 documents) and then one more
/// document; between the two, once the first batch's output is out, rotates `pii` and
/// destroys the key the run encrypts under. Returns the exit code and stderr.
fn destroy_between_batches(d: &Path, schema: &str, field: &str) -> (Option<i32>, String) {
    let old = InMemoryKeyring::load(d.join("keys.json"))
        .unwrap()
        .primary("pii")
        .unwrap()
        .id();
    let mut child = Command::new(BIN)
        .current_dir(d)
        .args(["encrypt", "--schema", schema, "--keyset", "keys.json"])
        .env_remove("FIELDCRYPT_KEYSET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Output past the writer's 1 MiB buffer: the first line out means the first batch was
    // checked and is being written.
    let value = "v".repeat(2000);
    let doc = |i: usize| format!("{{\"_id\": {i}, \"{field}\": \"{value}\"}}\n");
    let first: String = (0..1000).map(doc).collect();
    let feeder = std::thread::spawn(move || {
        stdin.write_all(first.as_bytes()).unwrap();
        stdin
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut seen = false;
        for line in BufReader::new(stdout).lines() {
            if line.is_err() {
                break;
            }
            if !seen {
                seen = true;
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the first batch was written");
    for args in [
        vec!["keys", "rotate", "pii", "--keyset", "keys.json"],
        vec![
            "keys",
            "destroy",
            &old.to_string(),
            "--keyset",
            "keys.json",
            "--force",
        ],
    ] {
        let args: Vec<&str> = args.iter().map(|s| &**s).collect();
        let o = run(d, &args, None, &[]);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
    }
    let mut stdin = feeder.join().unwrap();
    stdin.write_all(doc(1000).as_bytes()).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    drain.join().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_key_destroyed_between_batches_fails_the_run_random_or_deterministic() {
    for (schema, field) in [("det.toml", "email"), ("schema.toml", "ssn")] {
        let dir = workdir();
        let d = dir.path();
        std::fs::write(
            d.join("det.toml"),
            "[fields.email]\nkey = \"pii\"\ndeterministic = true\n",
        )
        .unwrap();
        let (code, e) = destroy_between_batches(d, schema, field);
        assert_eq!(code, Some(1), "{schema}: {e}");
        assert!(
            e.contains("destroyed while this command ran"),
            "{schema}: {e}"
        );
    }
}

#[test]
fn a_line_of_many_small_values_is_refused_before_it_takes_gigabytes() {
    let dir = workdir();
    let d = dir.path();
    // Just under the 32 MiB line limit, 16 million values: as parsed trees and BSON this
    // took over 3 GB before the 16 MiB check.
    let n = (32 << 20) / 2 - 16;
    let mut line = String::with_capacity(2 * n + 16);
    line.push_str("{\"_id\": 0}\n{\"a\":[");
    for _ in 0..n {
        line.push_str("0,");
    }
    line.push_str("0]}\n");
    std::fs::write(d.join("many.jsonl"), line).unwrap();
    // Under a 2 GB address-space limit: the old path could not allocate its way to the check.
    let o = Command::new("sh")
        .current_dir(d)
        .arg("-c")
        .arg(format!(
            "ulimit -v 2097152 && exec '{BIN}' encrypt --schema schema.toml --keyset keys.json --in many.jsonl --out many.out"
        ))
        .env_remove("FIELDCRYPT_KEYSET")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("line 2: ") && e.contains("values") && e.contains("16 MiB"),
        "{e}"
    );
    assert!(!d.join("many.out").exists());
}

#[test]
fn run_as_root_replaced_files_keep_their_owner_group_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = workdir();
    let d = dir.path();
    if std::fs::metadata(d).unwrap().uid() != 0 {
        return; // only root can give a file to another user
    }
    let give = |name: &str| {
        let p = d.join(name);
        std::os::unix::fs::chown(&p, Some(12345), Some(54321)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    };
    let owned = |name: &str| {
        let m = std::fs::metadata(d.join(name)).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o777)
    };
    give("keys.json");
    let o = run(
        d,
        &["keys", "rotate", "pii", "--keyset", "keys.json"],
        None,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(owned("keys.json"), (12345, 54321, 0o640));
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--out",
            "sealed.jsonl",
        ],
        Some(PEOPLE),
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    std::fs::write(d.join("plain.jsonl"), "old\n").unwrap();
    give("plain.jsonl");
    let o = decrypt_to(d, "sealed.jsonl", "plain.jsonl", &["--force"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(owned("plain.jsonl"), (12345, 54321, 0o640));
}

/// Sends SIGINT (Ctrl-C) to a child process.
fn interrupt(child: &std::process::Child) {
    signal(child, "-INT");
}

/// Sends a signal (`-INT`, `-TERM`) to a child process.
fn signal(child: &std::process::Child, which: &str) {
    let ok = Command::new("kill")
        .args([which, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits until `d` holds a temporary output file.
fn wait_for_temp_file(d: &Path) {
    for _ in 0..3000 {
        if !leftovers(d).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("no temporary file appeared");
}

#[test]
fn ctrl_c_and_sigterm_remove_the_temporary_output_file() {
    for (command, which, code) in [
        ("encrypt", "-INT", 130),
        ("decrypt", "-INT", 130),
        ("decrypt", "-TERM", 143),
    ] {
        let dir = workdir();
        let d = dir.path();
        let mut args = vec!["--keyset", "keys.json", "--out", "out.jsonl"];
        if command == "encrypt" {
            args.extend(["--schema", "schema.toml"]);
        }
        let mut child = Command::new(BIN)
            .current_dir(d)
            .arg(command)
            .args(&args)
            .env_remove("FIELDCRYPT_KEYSET")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The input stays open: the command waits for more, its output under a temporary name.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"{\"_id\": 1}\n").unwrap();
        wait_for_temp_file(d);
        signal(&child, which);
        let o = child.wait_with_output().unwrap();
        drop(stdin);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{command}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(leftovers(d), Vec::<String>::new(), "{command}");
        assert!(!d.join("out.jsonl").exists(), "{command}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_export_never_replaces_the_out_file() {
    let uri = server_uri();
    let dir = workdir();
    let d = dir.path().to_owned();
    let ns = format!("{}.many", unique_db_name("cli_export_interrupt"));
    let (db, coll) = ns.split_once('.').unwrap();
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let pad = "p".repeat(1000);
    let docs: Vec<Document> = (0..50_000)
        .map(|i| doc! { "_id": i, "pad": pad.as_str() })
        .collect();
    client
        .database(db)
        .collection::<Document>(coll)
        .insert_many(docs)
        .await
        .unwrap();
    std::fs::write(d.join("old.jsonl"), "the old export\n").unwrap();
    let child = Command::new(BIN)
        .current_dir(&d)
        .args([
            "export",
            "--namespace",
            &ns,
            "--out",
            "old.jsonl",
            "--force",
        ])
        .env("MONGODB_URI", &uri)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_temp_file(&d);
    interrupt(&child);
    let o = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    let kept = std::fs::read_to_string(d.join("old.jsonl")).unwrap();
    assert!(
        kept == "the old export\n",
        "replaced by {} bytes: {e}",
        kept.len()
    );
    assert_eq!(o.status.code(), Some(130), "{e}");
    assert!(e.contains("partial export was discarded"), "{e}");
    assert_eq!(leftovers(&d), Vec::<String>::new());
}

#[test]
fn out_same_as_in_is_named_as_such_even_without_force() {
    let dir = workdir();
    let d = dir.path();
    std::fs::write(d.join("people.jsonl"), PEOPLE).unwrap();
    let o = run(
        d,
        &[
            "encrypt",
            "--schema",
            "schema.toml",
            "--keyset",
            "keys.json",
            "--in",
            "people.jsonl",
            "--out",
            "people.jsonl",
        ],
        None,
        &[],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    // Not "give --force", which would not help.
    assert!(
        o.stderr.contains("the same file as the input"),
        "{}",
        o.stderr
    );
    assert_eq!(
        std::fs::read_to_string(d.join("people.jsonl")).unwrap(),
        PEOPLE
    );
}
