//! The `fieldcrypt` tool with master keys in a KMS (AWS KMS on moto, reached through a gate
//! the test can close): `--kms-providers`, `keys create --master-key-doc`, `keys list` with the
//! provider and master key, an import and a `reencrypt` that meet a KMS outage (clear error,
//! nothing written) and go on once it is back, and
//! `keys rewrap --to-master-key-doc`, with no credential in any output.

#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::net::SocketAddr;
use std::path::Path;

use bson::Document;
use fieldcrypt::LocalMasterKey;
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::ext_json_lines;
use fieldcrypt_testkit::kms::gate::Gate;
use fieldcrypt_testkit::kms::moto::{Moto, REGION};

// Not `tests/support.rs`: Cargo would build that as a test binary of its own.
#[path = "support/process.rs"]
mod support;
use support::{run, Out};

const SCHEMA: &str = r#"
[fields.ssn]
key = "pii"

[fields.email]
key = "pii"
deterministic = true
"#;

fn people(n: i64) -> String {
    (0..n)
        .map(|i| {
            format!(r#"{{"_id": {i}, "ssn": "{i:03}-45-6789", "email": "u{i}@example.com"}}"#)
                + "\n"
        })
        .collect()
}

fn ok(o: &Out) {
    assert_eq!(o.code, 0, "stdout: {}\nstderr: {}", o.stdout, o.stderr);
}

fn no_secret(o: &Out, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !o.stdout.contains(s) && !o.stderr.contains(s),
            "secret in output: {o:?}",
            o = (&o.stdout, &o.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_keys_import_reencrypt_through_an_outage_and_rewrap() {
    let moto = Moto::shared().unwrap();
    let addr: SocketAddr = moto
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let gate = Gate::new(addr).unwrap();
    let creds = moto.credentials();
    let arn = moto.create_key().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("schema.toml"), SCHEMA).unwrap();
    std::fs::write(d.join("people.jsonl"), people(60)).unwrap();
    // kmsProviders as a libmongocrypt user writes it, with a quick retry policy.
    std::fs::write(
        d.join("kms.json"),
        serde_json::json!({
            "kmsProviders": { "aws": { "accessKeyId": creds.access_key_id, "secretAccessKey": creds.secret_access_key } },
            "retry": { "attempts": 2, "initialBackoffMs": 20, "maxBackoffMs": 50, "timeoutMs": 3000 },
        })
        .to_string(),
    )
    .unwrap();
    let local = LocalMasterKey::generate();
    std::fs::write(d.join("master.key"), local.expose_base64().as_bytes()).unwrap();
    let master_key = serde_json::json!({
        "provider": "aws", "region": REGION, "key": arn,
        "endpoint": format!("http://127.0.0.1:{}", gate.port()),
    })
    .to_string();
    let uri = DevServer::shared().unwrap().uri().to_owned();
    let ns = format!("{}.people", unique_db_name("cli_kms"));
    let secrets = [creds.secret_access_key.as_str(), &local.expose_base64()[..]];
    let env = [("MONGODB_URI", uri.as_str())];
    let with = |args: &[&str]| -> Out {
        let mut a = args.to_vec();
        a.extend(["--kms-providers", "kms.json"]);
        let o = run(d, &a, None, &env);
        no_secret(&o, &secrets);
        o
    };

    // Keys under the AWS master key; listed with their provider and key ARN.
    ok(&with(&[
        "keys",
        "create",
        "pii",
        "--master-key-doc",
        &master_key,
    ]));
    let o = with(&["keys", "list", "--json"]);
    ok(&o);
    let list: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(list[0]["provider"], "aws", "{list}");
    assert_eq!(list[0]["master_key"], arn.as_str(), "{list}");
    let o = with(&["keys", "list"]);
    assert!(
        o.stdout.contains("aws") && o.stdout.contains(&arn),
        "{}",
        o.stdout
    );

    // Import while the KMS is away: a clear error naming provider and key, nothing inserted.
    let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let (db, coll) = ns.split_once('.').unwrap();
    let coll = client.database(db).collection::<Document>(coll);
    gate.close();
    let o = with(&[
        "import",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--in",
        "people.jsonl",
    ]);
    assert_ne!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("KMS aws") && o.stderr.contains(&arn),
        "{}",
        o.stderr
    );
    assert_eq!(coll.count_documents(bson::doc! {}).await.unwrap(), 0);
    gate.open().unwrap();
    // Import through the KMS-wrapped key.
    ok(&with(&[
        "import",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--in",
        "people.jsonl",
    ]));
    ok(&with(&[
        "keys",
        "rotate",
        "pii",
        "--master-key-doc",
        &master_key,
        "-q",
    ]));

    // The KMS goes away: reencrypt stops with a clear error and writes nothing.
    let snapshot = || async {
        use futures_util::TryStreamExt;
        let v: Vec<Document> = coll
            .find(bson::doc! {})
            .sort(bson::doc! { "_id": 1 })
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        v
    };
    let before = snapshot().await;
    gate.close();
    let o = with(&[
        "reencrypt",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--batch",
        "20",
    ]);
    assert_ne!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("KMS aws") && o.stderr.contains(&arn),
        "{}",
        o.stderr
    );
    assert_eq!(
        snapshot().await,
        before,
        "nothing written during the outage"
    );
    // It is back: resume.
    gate.open().unwrap();
    let o = with(&[
        "reencrypt",
        "--schema",
        "schema.toml",
        "--namespace",
        &ns,
        "--batch",
        "20",
        "--resume",
        "--json",
    ]);
    ok(&o);
    assert_ne!(snapshot().await, before);

    // Every key to the local master key: a line per key, then the list says local.
    let o = with(&[
        "keys",
        "rewrap",
        "--to-master-key-doc",
        r#"{"provider":"local"}"#,
        "--master-key-file",
        "master.key",
    ]);
    assert_ne!(o.code, 0, "local is not in kmsProviders: {}", o.stderr);
    let o = run(
        d,
        &[
            "keys",
            "rewrap",
            "--new-master-key-file",
            "master.key",
            "--kms-providers",
            "kms.json",
        ],
        None,
        &env,
    );
    ok(&o);
    no_secret(&o, &secrets);
    assert_eq!(
        o.stdout
            .lines()
            .filter(|l| l.contains("rewrapped") && l.contains("-> local"))
            .count(),
        2,
        "{}",
        o.stdout
    );
    // The local master key alone now reads the data.
    let o = run(
        d,
        &[
            "export",
            "--namespace",
            &ns,
            "--decrypt",
            "--schema",
            "schema.toml",
            "--master-key-file",
            "master.key",
        ],
        None,
        &env,
    );
    ok(&o);
    let mut got = ext_json_lines(&o.stdout);
    got.sort_by_key(|d| d.get_i32("_id").unwrap_or_default());
    assert_eq!(got, ext_json_lines(&people(60)));
    let _ = Path::new(".");
}
