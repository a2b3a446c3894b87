//! The `fieldcrypt` tool on MongoDB Queryable Encryption data, run as a process: offline
//! `decrypt` of a QE document made by libmongocrypt, and on the dev server `audit`, `export
//! --decrypt` and `migrate --from qe` over a QE collection (fixtures: `tests/fixtures/qe/`).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use bson::{doc, Bson, Document};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{all_stored, ext_json_lines, Interop};

// Not `tests/support.rs`: Cargo would build that as a test binary of its own.
#[path = "support/process.rs"]
mod support;
use support::run;

const QE: Interop = Interop::QE;

fn key_vault_args() -> Vec<String> {
    vec![
        "--key-vault-file".into(),
        QE.path("keys.jsonl").display().to_string(),
        "--master-key-file".into(),
        QE.path("master-key.txt").display().to_string(),
    ]
}

fn fixture_document() -> (String, Document) {
    let doc: serde_json::Value = serde_json::from_str(&QE.read("document.json")).unwrap();
    let expected = ext_json_lines(&doc["decrypted"].to_string()).pop().unwrap();
    (format!("{}\n", doc["encrypted"]), expected)
}

#[test]
fn decrypt_reads_a_libmongocrypt_qe_document() {
    let dir = tempfile::tempdir().unwrap();
    let (input, expected) = fixture_document();
    let kv = key_vault_args();
    let mut args: Vec<&str> = vec!["decrypt"];
    args.extend(kv.iter().map(String::as_str));
    let o = run(dir.path(), &args, Some(&input), &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut want = expected.clone();
    want.remove("__safeContent__");
    assert_eq!(ext_json_lines(&o.stdout), [want]);
    args.push("--keep-safe-content");
    let o = run(dir.path(), &args, Some(&input), &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout), [expected]);
    // Without the keys: one clear line naming the key, exit 1, no plaintext.
    let o = run(
        dir.path(),
        &[
            "decrypt",
            "--key-vault-file",
            QE.path("vector-keys.jsonl").to_str().unwrap(),
            "--master-key-file",
            QE.path("master-key.txt").to_str().unwrap(),
        ],
        Some(&input),
        &[],
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("line 1") && o.stderr.contains("key"),
        "{}",
        o.stderr
    );
    assert!(!o.stdout.contains("Alice") && !o.stderr.contains("Alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_and_migrate_a_qe_collection() {
    let uri = DevServer::shared().unwrap().uri().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("schema.toml"),
        "[fields.name]\nkey = \"pii\"\n\n[fields.ssn]\nkey = \"pii\"\n\n[fields.age]\nkey = \"pii\"\n\n[fields.\"address.street\"]\nkey = \"pii\"\n\n[fields.\"address.geo.lat\"]\nkey = \"pii\"\n\n[fields.profile]\nkey = \"pii\"\n",
    )
    .unwrap();
    let o = run(
        d,
        &["keys", "create", "pii", "--keyset", "keys.json"],
        None,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let db = unique_db_name("cli_qe");
    let ns = format!("{db}.people");
    let (input, mut expected) = fixture_document();
    // `tags` holds QE values both as array elements and inside an element's document, which
    // no one schema path covers: left out here (tests/qe_fixtures.rs decrypts it).
    expected.remove("tags");
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let coll = client.database(&db).collection::<Document>("people");
    let mut stored = ext_json_lines(&input).pop().unwrap();
    stored.remove("tags");
    let mut many = Vec::new();
    for i in 0..20 {
        let mut s = stored.clone();
        s.insert("_id", i);
        many.push(s);
    }
    coll.insert_many(many).await.unwrap();
    let env = [("MONGODB_URI", uri.as_str())];
    let mut keys: Vec<String> = vec!["--keyset".into(), "keys.json".into()];
    keys.extend(key_vault_args());
    let go = |args: &[&str]| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(keys.iter().map(String::as_str));
        run(d, &a, None, &env)
    };

    let audit = || {
        let o = go(&[
            "audit",
            "--schema",
            "schema.toml",
            "--namespace",
            &ns,
            "--json",
        ]);
        serde_json::from_str::<serde_json::Value>(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", o.stdout, o.stderr))
    };

    let rep = audit();
    let c = &rep["collections"][0];
    assert_eq!(c["qe_values"]["unindexed"], 4 * 20, "{rep}");
    assert_eq!(c["qe_values"]["equality"], 20);
    assert_eq!(c["qe_values"]["range"], 20);
    assert_eq!(c["safe_content_documents"], 20);
    assert_eq!(c["unreadable"], 0);
    let kinds: Vec<&str> = c["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    // `plain` and `address.zip` are plaintext outside the schema: no finding; QE values are
    // neither plaintext nor malformed.
    assert!(
        !kinds.contains(&"plaintext") && !kinds.contains(&"malformed"),
        "{kinds:?}"
    );
    let text = go(&["audit", "--schema", "schema.toml", "--namespace", &ns]);
    assert!(
        text.stdout.contains(
            "Queryable Encryption values in schema fields: equality 20, range 20, unindexed 80"
        ),
        "{}",
        text.stdout
    );

    // export --decrypt: libmongocrypt's plaintext, without `__safeContent__` unless kept.
    let o = go(&["export", "--namespace", &ns, "--decrypt"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let exported = ext_json_lines(&o.stdout);
    assert_eq!(exported.len(), 20);
    let mut want = expected.clone();
    want.remove("__safeContent__");
    for (i, e) in exported.iter().enumerate() {
        let mut w = want.clone();
        w.insert("_id", i32::try_from(i).unwrap());
        assert_eq!(e, &w);
    }
    let o = go(&[
        "export",
        "--namespace",
        &ns,
        "--decrypt",
        "--keep-safe-content",
        "--limit",
        "1",
    ]);
    assert!(ext_json_lines(&o.stdout)[0].contains_key("__safeContent__"));

    // migrate --from qe: everything re-encrypted with fieldcrypt, `__safeContent__` gone.
    let o = go(&[
        "migrate",
        "--from",
        "qe",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
    ]);
    assert_eq!(o.code, 0, "{}\n{}", o.stdout, o.stderr);
    assert!(
        o.stdout.contains("rewritten 20") || o.stdout.contains("rewrote 20"),
        "{}",
        o.stdout
    );
    let after = all_stored(&coll).await;
    for a in &after {
        assert!(!a.contains_key("__safeContent__"));
        for (k, v) in a {
            if let Bson::Binary(b) = v {
                assert_ne!(u8::from(b.subtype), 6, "{k} is still a MongoDB value");
            }
        }
    }
    let o = go(&["export", "--namespace", &ns, "--decrypt"]);
    assert_eq!(ext_json_lines(&o.stdout), exported);
    let rep = audit();
    assert_eq!(rep["collections"][0]["current"], 20, "{rep}");
    assert_eq!(rep["collections"][0]["qe_values"], serde_json::json!({}));
    client.database(&db).drop().await.unwrap();
}

/// W1 in QE-unindexed values: the document decrypts (the bench checks it first) and both
/// fieldcrypt and the bare CBC + HMAC-SHA-256 baseline are measured.
#[test]
fn bench_w1_measures_qe_unindexed_values() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(
        dir.path(),
        &[
            "bench",
            "w1",
            "--format",
            "qe-unindexed",
            "--documents",
            "1",
            "--trials",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
        None,
        &[],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let w1: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(w1["params"]["format"], "qe-unindexed");
    assert_eq!(w1["params"]["algorithm"], "AEAD_AES_256_CBC_HMAC_SHA_256");
    let rows = w1["results"].as_array().unwrap();
    for kind in ["fieldcrypt", "baseline"] {
        let row = rows.iter().find(|r| r["kind"] == kind).unwrap();
        assert!(
            row["documents_per_second"]["median"].as_f64().unwrap() > 0.0,
            "{row}"
        );
    }
    assert!(rows
        .iter()
        .any(|r| r["what"].as_str().unwrap_or("").contains("HMAC-SHA-256")));
    // --suite belongs to --format fieldcrypt.
    let o = run(
        dir.path(),
        &[
            "bench",
            "w1",
            "--format",
            "qe-unindexed",
            "--suite",
            "AES-256-GCM",
        ],
        None,
        &[],
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("--suite applies to --format fieldcrypt only"),
        "{}",
        o.stderr
    );
}

/// Indexed values whose inner key (`K_KeyId`) differs from the outer one (`S_KeyId`), read
/// with the key vault in MongoDB: the CLI fetches the inner keys in a second round, once the
/// outer ones have opened the server layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decrypt_fetches_inner_keys_from_a_key_vault() {
    let uri = DevServer::shared().unwrap().uri().to_owned();
    let db = unique_db_name("cli_qe_kv");
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let vault = client.database(&db).collection::<Document>("datakeys");
    let key_docs = QE.lines("vector-keys.jsonl");
    vault.insert_many(key_docs).await.unwrap();
    let mut input = String::new();
    let mut want = Vec::new();
    for v in QE.lines("vectors.jsonl") {
        if v.get_str("keys").unwrap() != "vector-keys" {
            continue;
        }
        let line = doc! { "v": v.get("ciphertext").unwrap().clone() };
        input.push_str(&Bson::Document(line).into_canonical_extjson().to_string());
        input.push('\n');
        want.push(doc! { "v": v.get("value").unwrap().clone() });
    }
    assert_eq!(want.len(), 4);
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("{db}.datakeys");
    let master = QE.path("master-key.txt");
    let o = run(
        dir.path(),
        &[
            "decrypt",
            "--key-vault-namespace",
            &ns,
            "--master-key-file",
            master.to_str().unwrap(),
        ],
        Some(&input),
        &[("MONGODB_URI", uri.as_str())],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(ext_json_lines(&o.stdout), want);
    client.database(&db).drop().await.unwrap();
}
