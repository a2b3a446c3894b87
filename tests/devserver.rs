//! The development server: it starts, the `mongodb` crate talks to it, BSON binaries round-trip
//! exactly, `$jsonSchema` validators work, and servers stop when dropped or when the process
//! that started them exits.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document, RawDocumentBuf};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer, DevServerKind};
use fieldcrypt_testkit::fixtures::stored;
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::Client;

/// MongoDB's error code for a document that fails its collection's validator.
const DOCUMENT_VALIDATION_FAILURE: i32 = 121;

async fn client() -> Client {
    let server = DevServer::shared().unwrap();
    Client::with_uri_str(server.uri()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_subtypes_round_trip() {
    let client = client().await;
    let db = client.database(&unique_db_name("devserver_bin"));
    let coll = db.collection::<Document>("c");

    let user: Vec<u8> = (0..=255u8).collect();
    let encrypted: Vec<u8> = [&[0x02u8][..], &[0xA5; 16], &[0x00, 0xFF, 0x10]].concat();
    coll.insert_one(doc! {
        "_id": 1,
        "u": Binary { subtype: BinarySubtype::UserDefined(0x8F), bytes: user.clone() },
        "e": Binary { subtype: BinarySubtype::Encrypted, bytes: encrypted.clone() },
        "empty": Binary { subtype: BinarySubtype::UserDefined(0x8F), bytes: vec![] },
    })
    .await
    .unwrap();

    let got = coll.find_one(doc! { "_id": 1 }).await.unwrap().unwrap();
    match got.get("u") {
        Some(Bson::Binary(b)) => {
            assert_eq!(u8::from(b.subtype), 0x8F);
            assert_eq!(b.bytes, user);
        }
        other => panic!("u came back as {other:?}"),
    }
    match got.get("e") {
        Some(Bson::Binary(b)) => {
            assert_eq!(b.subtype, BinarySubtype::Encrypted);
            assert_eq!(u8::from(b.subtype), 6);
            assert_eq!(b.bytes, encrypted);
        }
        other => panic!("e came back as {other:?}"),
    }
    match got.get("empty") {
        Some(Bson::Binary(b)) => {
            assert_eq!(u8::from(b.subtype), 0x8F);
            assert!(b.bytes.is_empty());
        }
        other => panic!("empty came back as {other:?}"),
    }

    // The same, byte for byte, through the raw API.
    let raw = stored::<RawDocumentBuf>(&db, "c", doc! { "_id": 1 }).await;
    let u = raw.get_binary("u").unwrap();
    assert_eq!(u8::from(u.subtype), 0x8F);
    assert_eq!(u.bytes, &user[..]);
    let e = raw.get_binary("e").unwrap();
    assert_eq!(u8::from(e.subtype), 6);
    assert_eq!(e.bytes, &encrypted[..]);

    db.drop().await.unwrap();
}

fn is_validation_failure(e: &mongodb::error::Error) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DOCUMENT_VALIDATION_FAILURE
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_validator_requires_bin_data() {
    let client = client().await;
    let db = client.database(&unique_db_name("devserver_schema"));
    db.create_collection("v")
        .validator(doc! {
            "$jsonSchema": {
                "bsonType": "object",
                "required": ["ssn"],
                "properties": { "ssn": { "bsonType": "binData" } },
            }
        })
        .await
        .unwrap();
    let coll = db.collection::<Document>("v");

    let ok = Binary {
        subtype: BinarySubtype::Encrypted,
        bytes: vec![1, 2, 3],
    };
    coll.insert_one(doc! { "_id": 1, "ssn": ok }).await.unwrap();

    let err = coll
        .insert_one(doc! { "_id": 2, "ssn": "123-45-6789" })
        .await
        .expect_err("a string where the validator requires binData must be rejected");
    assert!(is_validation_failure(&err), "unexpected error: {err}");

    let err = coll
        .insert_one(doc! { "_id": 3 })
        .await
        .expect_err("a document without the required field must be rejected");
    assert!(is_validation_failure(&err), "unexpected error: {err}");

    let err = coll
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "ssn": "123-45-6789" } })
        .await
        .expect_err("an update that writes a string there must be rejected");
    assert!(is_validation_failure(&err), "unexpected error: {err}");

    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_tests_share_one_server() {
    // Several tests run at once against the shared server, each with its own database.
    assert!(std::ptr::eq(
        DevServer::shared().unwrap(),
        DevServer::shared().unwrap()
    ));
    let client = client().await;
    let name = unique_db_name("devserver_par");
    let coll = client.database(&name).collection::<Document>("c");
    coll.insert_one(doc! { "x": 1 }).await.unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
    client.database(&name).drop().await.unwrap();
}

#[test]
fn python_env_has_pymongocrypt() {
    let python = DevServer::python_env().unwrap();
    let out = Command::new(&python)
        .args([
            "-c",
            "import pymongo, pymongocrypt; from pymongo.encryption import ClientEncryption; \
             print(pymongocrypt.libmongocrypt_version())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(DevServer::shared().unwrap().python(), Some(python));
}

fn port_of(uri: &str) -> u16 {
    let rest = uri.strip_prefix("mongodb://127.0.0.1:").unwrap();
    rest[..rest.find('/').unwrap()].parse().unwrap()
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

fn wait_until_closed(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !accepts(port) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn dropped_server_stops() {
    let server = DevServer::start().unwrap();
    if server.kind() == DevServerKind::External {
        return; // Nothing was started, so nothing is to be stopped.
    }
    let port = port_of(server.uri());
    assert!(accepts(port));
    drop(server);
    assert!(!accepts(port), "port {port} still open after drop");
}

const CHILD_ENV: &str = "FIELDCRYPT_DEVSERVER_TEST_CHILD";

/// Run as a child process by `server_stops_when_its_process_panics`: starts the shared server,
/// prints its port and panics, so the process exits without dropping anything.
#[test]
#[ignore = "not a test on its own: run as a child process by server_stops_when_its_process_panics"]
fn child_starts_shared_server_then_panics() {
    assert!(
        std::env::var_os(CHILD_ENV).is_some(),
        "run only as a child of server_stops_when_its_process_panics"
    );
    let server = DevServer::shared().unwrap();
    println!("KIND={:?}", server.kind());
    println!("URI={}", server.uri());
    panic!("on purpose: the process ends with the shared server still running");
}

#[test]
fn server_stops_when_its_process_panics() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_starts_shared_server_then_panics",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stdout.contains("KIND="),
        "child did not start a server and panic:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.contains("KIND=External") {
        return; // Nothing was started, so nothing is to be stopped.
    }
    let uri = stdout.lines().find_map(|l| l.strip_prefix("URI=")).unwrap();
    let port = port_of(uri);
    assert!(
        wait_until_closed(port, Duration::from_secs(15)),
        "server on port {port} still running after its process exited"
    );
}
