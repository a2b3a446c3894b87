//! The AWS KMS provider against moto's server (a local AWS: KMS, STS, IAM), started by the test
//! kit, and against libmongocrypt itself (pymongocrypt, driven by `tests/fixtures/kms/aws_interop.py`).
//!
//! Two moto servers: the process's shared one (requests not authenticated) and one that checks
//! every request's SigV4 signature and IAM policies (`Moto::start_with_iam`), which is what
//! proves the signing and the credential sources: a request signed with anything but the
//! expected secret (and session token) is refused there.
//!
//! Credential-chain tests run this test binary again as a child process with exactly the
//! environment they test (no `AWS_*` variable of the parent's; `HOME` a temporary directory;
//! instance metadata off unless tested); the parent asserts the child's test passed. The
//! container and instance-metadata endpoints have no emulator: the parent serves them with a
//! small HTTP server in this file, handing out a real moto role session.
#![cfg(feature = "aws")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is a failed test

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders, RetryPolicy};
use fieldcrypt::mongo::KeyVault;
use fieldcrypt::{
    Context, Cryptor, CsfleAlgorithm, CsfleDataKey, Error, Field, InMemoryKeyring, Key, KeyKind,
    KeyMaterial, KeyState, Schema,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::same;
use fieldcrypt_testkit::kms::moto::{AccessKey, Moto, REGION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers

fn moto() -> &'static Moto {
    Moto::shared().unwrap()
}

/// The process's moto that authenticates every request.
fn iam_moto() -> &'static Moto {
    static IAM: OnceLock<Moto> = OnceLock::new();
    IAM.get_or_init(|| Moto::start_with_iam().unwrap())
}

/// A key of the shared server, made once per process.
fn shared_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| moto().create_key().unwrap())
}

fn entry(k: &AccessKey) -> Document {
    let mut d = doc! { "accessKeyId": &k.access_key_id, "secretAccessKey": &k.secret_access_key };
    if let Some(t) = &k.session_token {
        d.insert("sessionToken", t);
    }
    d
}

fn providers_for(m: &Moto) -> Arc<KmsProviders> {
    Arc::new(KmsProviders::from_document(&doc! { "aws": entry(&m.credentials()) }).unwrap())
}

fn master_key(m: &Moto, key: &str) -> Document {
    doc! { "provider": "aws", "region": REGION, "key": key, "endpoint": m.endpoint() }
}

fn fast() -> KmsOptions {
    KmsOptions {
        retry: RetryPolicy {
            attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(3),
        },
        ..KmsOptions::default()
    }
}

fn material(n: u8, len: usize) -> KeyMaterial {
    KeyMaterial::from_slice(&vec![n; len])
}

/// The error's Display and Debug, checked to hold none of `secrets`.
fn assert_clean(e: &Error, secrets: &[&str]) -> String {
    let shown = format!("{e} / {e:?}");
    for s in secrets {
        assert!(!s.is_empty() && !shown.contains(s), "{s} leaked in {shown}");
    }
    assert!(!shown.contains("Signature="), "{shown}");
    shown
}

fn kms_reason(e: &Error) -> &str {
    match e {
        Error::Kms { provider, reason } => {
            assert!(provider.starts_with("aws"), "{e}");
            reason
        }
        other => panic!("expected Error::Kms, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Wrapping and unwrapping

#[tokio::test]
async fn wraps_under_a_kms_key_and_stores_libmongocrypts_master_key() {
    let m = moto();
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let kek = kms.kek_for(&mk).unwrap();
    assert_eq!(kek.provider(), "aws");
    let (stored, wrapped) = kek.wrap_with_ad(&material(7, 32), b"ad").await.unwrap();
    // Field for field and in libmongocrypt's order.
    let keys: Vec<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(keys, ["provider", "region", "key", "endpoint"]);
    assert_eq!(stored, mk);
    // A KMS ciphertext blob, not the key.
    assert!(wrapped.len() > 32);
    assert!(!wrapped.windows(32).any(|w| w == [7u8; 32]));
    let back = kms
        .unwrapper()
        .unwrap_with_ad(&stored, &wrapped, b"ad")
        .await
        .unwrap();
    assert_eq!(back.expose_secret(), [7u8; 32]);
}

#[tokio::test]
async fn fieldcrypt_keys_are_bound_to_their_associated_data() {
    let m = moto();
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let kek = kms.kek_for(&mk).unwrap();
    let (stored, wrapped) = kek.wrap_with_ad(&material(1, 32), b"key A").await.unwrap();
    let un = kms.unwrapper();
    assert_eq!(
        un.unwrap_with_ad(&stored, &wrapped, b"key A")
            .await
            .unwrap()
            .expose_secret(),
        [1u8; 32]
    );
    for other in [&b"key B"[..], b""] {
        assert!(matches!(
            un.unwrap_with_ad(&stored, &wrapped, other).await,
            Err(Error::Decrypt)
        ));
    }
}

#[tokio::test]
async fn csfle_keys_are_wrapped_without_encryption_context() {
    let m = moto();
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let kek = kms.kek_for(&mk).unwrap();
    let (stored, wrapped) = kek.wrap_with_ad(&material(9, 96), &[]).await.unwrap();
    let un = kms.unwrapper();
    assert_eq!(
        un.unwrap(&stored, &wrapped).await.unwrap().expose_secret(),
        [9u8; 96]
    );
    // Bound to nothing: asking with an encryption context fails.
    assert!(matches!(
        un.unwrap_with_ad(&stored, &wrapped, b"x").await,
        Err(Error::Decrypt)
    ));
}

#[tokio::test]
async fn fail_tampered_or_truncated_key_material() {
    let m = moto();
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let (stored, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(3, 32), b"ad")
        .await
        .unwrap();
    let un = kms.unwrapper();
    let mut flipped = wrapped.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let short = &wrapped[..wrapped.len() / 2];
    for bad in [&flipped[..], short, &[]] {
        let r = un.unwrap_with_ad(&stored, bad, b"ad").await;
        assert!(matches!(r, Err(Error::Decrypt)), "{r:?}");
    }
}

#[tokio::test]
async fn fail_unknown_key_and_wrong_region_name_provider_and_key() {
    let m = moto();
    let kms = providers_for(m);
    let unknown =
        format!("arn:aws:kms:{REGION}:123456789012:key/00000000-0000-4000-8000-000000000000");
    let e = kms
        .kek_for(&master_key(m, &unknown))
        .unwrap()
        .wrap_with_ad(&material(1, 32), b"")
        .await
        .unwrap_err();
    let reason = kms_reason(&e);
    assert!(
        reason.contains(&unknown) && reason.contains("NotFoundException"),
        "{e}"
    );

    // A blob of us-east-1, asked of another region (the masterKey's region signs the call).
    let mk = master_key(m, shared_key());
    let (_, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(1, 32), b"")
        .await
        .unwrap();
    let mut elsewhere = mk.clone();
    elsewhere.insert("region", "eu-west-1");
    let e = kms
        .unwrapper()
        .unwrap(&elsewhere, &wrapped)
        .await
        .unwrap_err();
    let reason = kms_reason(&e);
    assert!(
        reason.contains(shared_key()) && reason.contains("AccessDeniedException"),
        "{e}"
    );
    assert!(reason.contains("eu-west-1"), "{e}");
}

#[tokio::test]
async fn aliases_wrap_and_unwrap_after_the_alias_moves() {
    let m = moto();
    let kms = providers_for(m);
    let first = m.create_key().unwrap();
    let alias = format!("alias/fieldcrypt-{}", unique_db_name("a"));
    m.create_alias(&alias, &first).unwrap();
    let mk = master_key(m, &alias);
    let (stored, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(5, 96), &[])
        .await
        .unwrap();
    assert_eq!(stored.get_str("key").unwrap(), alias);
    assert_eq!(
        kms.unwrapper()
            .unwrap(&stored, &wrapped)
            .await
            .unwrap()
            .expose_secret(),
        [5u8; 96]
    );
}

// ---------------------------------------------------------------------------------------------
// Signing, credentials and refusals (moto with IAM)

#[tokio::test]
async fn signatures_are_checked_and_refusals_name_provider_and_key() {
    let m = iam_moto();
    let iam = m.iam().unwrap();
    let arn = m.create_key().unwrap();
    let mk = master_key(m, &arn);
    // The allowed user: signed right.
    let ok = Arc::new(KmsProviders::from_document(&doc! { "aws": entry(&iam.allowed) }).unwrap());
    let (stored, wrapped) = ok
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(2, 32), b"ad")
        .await
        .unwrap();
    assert_eq!(
        ok.unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"ad")
            .await
            .unwrap()
            .expose_secret(),
        [2u8; 32]
    );

    let mut wrong_secret = iam.allowed.clone();
    wrong_secret.secret_access_key = "wrong-secret-0123456789".into();
    let unknown = AccessKey {
        access_key_id: "AKIAUNKNOWNKEY123456".into(),
        secret_access_key: "unknown-secret-0123456789".into(),
        session_token: None,
    };
    for (who, expect) in [
        (&wrong_secret, "SignatureDoesNotMatch"),
        (&unknown, "InvalidClientTokenId"),
        (&iam.denied, "AccessDenied"),
    ] {
        let kms = Arc::new(KmsProviders::from_document(&doc! { "aws": entry(who) }).unwrap());
        let e = kms
            .unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"ad")
            .await
            .unwrap_err();
        let shown = assert_clean(
            &e,
            &[&who.secret_access_key, &iam.allowed.secret_access_key],
        );
        let reason = kms_reason(&e);
        assert!(reason.contains(&arn) && reason.contains(expect), "{shown}");
        let e = kms
            .kek_for(&mk)
            .unwrap()
            .wrap_with_ad(&material(2, 32), b"ad")
            .await
            .unwrap_err();
        assert!(kms_reason(&e).contains(expect), "{e}");
    }
}

#[tokio::test]
async fn session_tokens_are_signed_and_checked() {
    let m = iam_moto();
    let arn = m.create_key().unwrap();
    let mk = master_key(m, &arn);
    let session = m.assume_role().unwrap();
    let kms = Arc::new(KmsProviders::from_document(&doc! { "aws": entry(&session) }).unwrap());
    let (stored, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(4, 96), &[])
        .await
        .unwrap();
    assert_eq!(
        kms.unwrapper()
            .unwrap(&stored, &wrapped)
            .await
            .unwrap()
            .expose_secret(),
        [4u8; 96]
    );
    let token = session.session_token.clone().unwrap();
    let mut forged = session.clone();
    forged.session_token = Some(format!("{token}x"));
    let bad = Arc::new(KmsProviders::from_document(&doc! { "aws": entry(&forged) }).unwrap());
    let e = bad.unwrapper().unwrap(&stored, &wrapped).await.unwrap_err();
    kms_reason(&e);
    assert_clean(&e, &[&token, &session.secret_access_key]);
}

#[test]
fn debug_shows_no_credentials() {
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET";
    let token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN";
    let kms = Arc::new(KmsProviders::from_document(&doc! {
        "aws": { "accessKeyId": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": secret, "sessionToken": token },
        "aws:chain": {},
    }).unwrap());
    // The providers' own Debug (AwsKms, its credentials) is checked by the unit tests in
    // src/kms/aws.rs; here what the public types print.
    kms.kek_for(&doc! { "provider": "aws", "region": "us-east-1", "key": "alias/x" })
        .unwrap();
    let shown = format!("{kms:?}");
    assert!(shown.contains("aws:chain"), "{shown}");
    for s in [secret, token, "IOSFODNN7EXAMPLE"] {
        assert!(!shown.contains(s), "{shown}");
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn fail_malformed_master_keys() {
    let kms = Arc::new(
        KmsProviders::from_document(
            &doc! { "aws": { "accessKeyId": "AKIAX", "secretAccessKey": "s" } },
        )
        .unwrap(),
    );
    let cases = [
        (doc! { "provider": "aws", "key": "k" }, "region"),
        (doc! { "provider": "aws", "region": "us-east-1" }, "key"),
        (
            doc! { "provider": "aws", "region": "us-east-1", "key": "k", "colour": "red" },
            "colour",
        ),
        (
            doc! { "provider": "aws", "region": 1, "key": "k" },
            "region",
        ),
        (
            doc! { "provider": "aws", "region": "us-east-1", "key": "" },
            "key",
        ),
        (
            doc! { "provider": "aws", "region": "us east", "key": "k" },
            "region",
        ),
        // Plain HTTP only to loopback; no other schemes.
        (
            doc! { "provider": "aws", "region": "us-east-1", "key": "k", "endpoint": "http://kms.example.com" },
            "http",
        ),
        (
            doc! { "provider": "aws", "region": "us-east-1", "key": "k", "endpoint": "ftp://127.0.0.1" },
            "endpoint",
        ),
    ];
    for (mk, names) in cases {
        let e = kms.kek_for(&mk).map(drop).unwrap_err();
        assert!(e.to_string().contains(names), "{mk}: {e}");
    }
    // libmongocrypt's host[:port] form and full URLs are accepted and kept as given.
    for endpoint in [
        "kms.eu-west-1.amazonaws.com",
        "kms.example.com:8443",
        "https://kms.example.com/",
        "http://127.0.0.1:1",
    ] {
        kms.kek_for(
            &doc! { "provider": "aws", "region": "eu-west-1", "key": "k", "endpoint": endpoint },
        )
        .unwrap();
    }
}

#[test]
fn fail_malformed_credentials_entries() {
    for (entry, what) in [
        (doc! { "accessKeyId": "AKIAX" }, "secretAccessKey"),
        (doc! { "secretAccessKey": "s3cr3t-value" }, "accessKeyId"),
        (
            doc! { "accessKeyId": "AKIAX", "secretAccessKey": 5 },
            "secretAccessKey",
        ),
        (
            doc! { "accessKeyId": "AKIAX", "secretAccessKey": "s3cr3t-value", "region": "x" },
            "region",
        ),
    ] {
        let e = KmsProviders::from_document(&doc! { "aws": entry.clone() }).unwrap_err();
        let shown = assert_clean(&e, &["s3cr3t-value"]);
        assert!(shown.contains(what), "{entry}: {shown}");
    }
}

#[tokio::test]
async fn named_providers_write_and_read_their_own_name() {
    let m = moto();
    let c = m.credentials();
    let kms = Arc::new(
        KmsProviders::from_document(&doc! { "aws:prod": entry(&c), "aws": entry(&c) }).unwrap(),
    );
    let mut mk = master_key(m, shared_key());
    mk.insert("provider", "aws:prod");
    let kek = kms.kek_for(&mk).unwrap();
    assert_eq!(kek.provider(), "aws:prod");
    let (stored, wrapped) = kek.wrap_with_ad(&material(6, 32), b"ad").await.unwrap();
    assert_eq!(stored.get_str("provider").unwrap(), "aws:prod");
    assert_eq!(
        kms.unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"ad")
            .await
            .unwrap()
            .expose_secret(),
        [6u8; 32]
    );
    // A provider that is not configured.
    mk.insert("provider", "aws:other");
    assert!(kms.kek_for(&mk).is_err());
    assert!(kms
        .unwrapper()
        .unwrap_with_ad(&mk, &wrapped, b"ad")
        .await
        .is_err());
}

// ---------------------------------------------------------------------------------------------
// Outages

#[tokio::test]
async fn unreachable_kms_is_retried_a_bounded_number_of_times_then_reported() {
    let m = Moto::start().unwrap();
    let arn = m.create_key().unwrap();
    let kms = Arc::new(
        KmsProviders::from_document_with(&doc! { "aws": entry(&m.credentials()) }, &fast())
            .unwrap(),
    );
    let mk = master_key(&m, &arn);
    let (stored, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(8, 32), b"ad")
        .await
        .unwrap();
    m.stop();
    let started = Instant::now();
    let e = kms
        .unwrapper()
        .unwrap_with_ad(&stored, &wrapped, b"ad")
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(kms_reason(&e).contains(&arn), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Back on the same port, with the same keys.
    m.restart().unwrap();
    assert_eq!(
        kms.unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"ad")
            .await
            .unwrap()
            .expose_secret(),
        [8u8; 32]
    );
}

/// A proxy in front of moto that answers the first `throttle` requests as KMS does under load
/// (HTTP 400, `ThrottlingException`) and passes the others through; counts requests.
async fn throttling_proxy(backend: &str, throttle: usize) -> (String, Arc<Mutex<usize>>) {
    let backend = backend.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(Mutex::new(0usize));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let n = {
                let mut c = seen.lock().unwrap();
                *c += 1;
                *c
            };
            let backend = backend.clone();
            tokio::spawn(async move {
                let Some(request) = read_request(&mut sock).await else {
                    return;
                };
                if n <= throttle {
                    let body = r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#;
                    let reply = format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                    return;
                }
                let mut up = tokio::net::TcpStream::connect(&backend).await.unwrap();
                up.write_all(&request).await.unwrap();
                let mut response = Vec::new();
                let _ = up.read_to_end(&mut response).await;
                let _ = sock.write_all(&response).await;
            });
        }
    });
    (url, count)
}

/// One HTTP/1.1 request (headers and `content-length` body), with `connection: close` added
/// (an unsigned header) so that the backend ends its response by closing.
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + 4 + len {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut out = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect::<Vec<_>>()
        .join("\r\n")
        .into_bytes();
    out.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    out.extend_from_slice(&buf[head_end + 4..head_end + 4 + len]);
    Some(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_then_reported() {
    let m = moto();
    let kms = Arc::new(
        KmsProviders::from_document_with(&doc! { "aws": entry(&m.credentials()) }, &fast())
            .unwrap(),
    );
    // Two throttled answers, then moto: the third attempt (of three) succeeds.
    let (url, count) = throttling_proxy(m.endpoint(), 2).await;
    let mut mk = master_key(m, shared_key());
    mk.insert("endpoint", url.as_str());
    let (stored, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(1, 32), b"t")
        .await
        .unwrap();
    assert_eq!(*count.lock().unwrap(), 3);
    assert_eq!(stored.get_str("endpoint").unwrap(), url);
    // Throttled for longer than the policy's attempts: one clear error, after exactly three.
    let (url, count) = throttling_proxy(m.endpoint(), usize::MAX).await;
    mk.insert("endpoint", url.as_str());
    let e = kms
        .unwrapper()
        .unwrap_with_ad(&mk, &wrapped, b"t")
        .await
        .unwrap_err();
    assert!(
        kms_reason(&e).contains("ThrottlingException: Rate exceeded"),
        "{e}"
    );
    assert_eq!(*count.lock().unwrap(), 3);
}

// ---------------------------------------------------------------------------------------------
// Key vault

#[tokio::test]
async fn key_vault_round_trip_through_a_fresh_vault() {
    let m = moto();
    let server = DevServer::shared().unwrap();
    let client = mongodb::Client::with_uri_str(server.uri()).await.unwrap();
    let ns = format!("{}.datakeys", unique_db_name("kms_aws"));
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let vault = Arc::new(
        KeyVault::builder(&client, kms.kek_for(&mk).unwrap())
            .namespace(ns.as_str())
            .build()
            .unwrap(),
    );
    let id = vault.create_key("pii").await.unwrap();
    let (db, coll) = ns.split_once('.').unwrap();
    let stored = client
        .database(db)
        .collection::<Document>(coll)
        .find_one(doc! { "_id": id.to_binary() })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.get_document("masterKey").unwrap(), &mk);

    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    use fieldcrypt::mongo::KeySource as _;
    vault.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let sealed = Cryptor::new(vault.clone(), schema)
        .encrypt_document(&doc! { "_id": 1, "ssn": "123-45-6789" }, &Context::none())
        .unwrap();

    // Another process: only the kmsProviders configuration, no KEK of its own.
    let fresh = Arc::new(
        KeyVault::builder(&client, providers_for(m).unwrapper())
            .namespace(ns.as_str())
            .build()
            .unwrap(),
    );
    fresh.prefetch_ids(&[id]).await.unwrap();
    let open = Cryptor::decrypt_only(fresh.clone())
        .decrypt_document(&sealed, &Context::none())
        .unwrap();
    assert_eq!(open.get_str("ssn").unwrap(), "123-45-6789");
}

// ---------------------------------------------------------------------------------------------
// libmongocrypt interop

fn interop_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kms/aws_interop.py")
}

fn run_interop(args: &[&str], m: &Moto) -> String {
    let python = DevServer::python_env().unwrap();
    let c = m.credentials();
    let out = std::process::Command::new(python)
        .arg(interop_script())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &c.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &c.secret_access_key)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "aws_interop.py {args:?}: {text}");
    text
}

fn ejson_lines(path: &Path) -> Vec<Document> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match Bson::try_from(v).unwrap() {
                Bson::Document(d) => d,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

/// libmongocrypt makes a data key under moto's KMS (masterKey without endpoint, as on AWS) and
/// encrypts values; fieldcrypt, given an empty `aws` entry and the SDKs' `AWS_ENDPOINT_URL_KMS`,
/// unwraps the key and decrypts every value.
#[tokio::test]
async fn libmongocrypt_key_and_values_are_read_by_fieldcrypt() {
    if let Some(file) = child_var("FIELDCRYPT_TEST_FILE") {
        let lines = ejson_lines(Path::new(&file));
        let (key_doc, cases) = lines.split_first().unwrap();
        assert!(!key_doc
            .get_document("masterKey")
            .unwrap()
            .contains_key("endpoint"));
        let kms = Arc::new(KmsProviders::from_document(&doc! { "aws": {} }).unwrap());
        let keys = KeyVault::keys_from_documents(std::slice::from_ref(key_doc), &*kms.unwrapper())
            .await
            .unwrap();
        assert_eq!(keys[0].kind(), KeyKind::Csfle);
        let ring = InMemoryKeyring::new();
        for k in keys {
            ring.insert(k);
        }
        let cryptor = Cryptor::decrypt_only(ring);
        let mut n = 0;
        for c in cases {
            let Some(Bson::Binary(ct)) = c.get("ciphertext") else {
                panic!("{c}")
            };
            let plain = cryptor
                .decrypt_value("v", ct, &Context::none(), None, None)
                .unwrap();
            assert!(
                same(&plain, c.get("value").unwrap()),
                "{}",
                c.get_str("name").unwrap()
            );
            n += 1;
        }
        assert!(n >= 40, "{n}");
        return;
    }
    let m = moto();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("from-libmongocrypt.jsonl");
    run_interop(
        &[
            "create",
            m.endpoint(),
            REGION,
            shared_key(),
            file.to_str().unwrap(),
        ],
        m,
    );
    let c = m.credentials();
    let out = run_child(
        "libmongocrypt_key_and_values_are_read_by_fieldcrypt",
        &[
            ("AWS_ACCESS_KEY_ID", c.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", c.secret_access_key.clone()),
            ("AWS_ENDPOINT_URL_KMS", m.endpoint().to_owned()),
            ("FIELDCRYPT_TEST_FILE", file.display().to_string()),
        ],
    )
    .await;
    assert_child_passed(&out);
}

/// fieldcrypt makes a CSFLE data key under moto's KMS (96 bytes, no associated data) and
/// encrypts values with it; libmongocrypt unwraps the key through moto and decrypts them all,
/// and re-encrypts the deterministic ones to the same bytes.
#[tokio::test]
async fn fieldcrypt_key_and_values_are_read_by_libmongocrypt() {
    let m = moto();
    let kms = providers_for(m);
    let mk = master_key(m, shared_key());
    let key = Key::generate("made-by-fieldcrypt", KeyKind::Csfle, KeyState::Primary);
    let (stored_mk, wrapped) = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(key.material().unwrap(), &[])
        .await
        .unwrap();
    let now = bson::DateTime::now();
    let key_doc = doc! {
        "_id": key.id().to_binary(),
        "keyAltNames": ["made-by-fieldcrypt"],
        "keyMaterial": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: wrapped },
        "creationDate": now,
        "updateDate": now,
        "status": 0,
        "masterKey": stored_mk,
    };
    let bytes: [u8; 96] = key.material().unwrap().expose_secret().try_into().unwrap();
    let data_key =
        CsfleDataKey::from_material(key.id(), secrecy::SecretBox::new(Box::new(bytes)), vec![])
            .unwrap();
    let values = [
        ("string", Bson::String("hello".into())),
        ("int32", Bson::Int32(42)),
        ("int64", Bson::Int64(1 << 40)),
        ("document", Bson::Document(doc! { "a": 1, "b": ["x"] })),
        (
            "binary",
            Bson::Binary(bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: vec![0, 1, 2],
            }),
        ),
        ("double", Bson::Double(1.5)),
        ("bool", Bson::Boolean(true)),
    ];
    let mut lines = vec![Bson::Document(key_doc).into_canonical_extjson().to_string()];
    for (name, value) in &values {
        for algorithm in [CsfleAlgorithm::Deterministic, CsfleAlgorithm::Random] {
            let Ok(ct) = data_key.encrypt_value(algorithm, value) else {
                continue; // deterministic refuses some types, as libmongocrypt does
            };
            let case = doc! { "name": format!("{name} {algorithm}"), "value": value.clone(), "ciphertext": ct };
            lines.push(Bson::Document(case).into_canonical_extjson().to_string());
        }
    }
    assert!(lines.len() > values.len() + 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("from-fieldcrypt.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let said = run_interop(&["verify", m.endpoint(), file.to_str().unwrap()], m);
    assert!(
        said.contains(&format!("decrypted all {}", lines.len() - 1)),
        "{said}"
    );
}

// ---------------------------------------------------------------------------------------------
// The credential chain (an empty `aws` entry), each source in a child process

const CHILD: &str = "FIELDCRYPT_AWS_TEST_CHILD";

/// A variable the parent set for the child; `None` in the parent.
fn child_var(name: &str) -> Option<String> {
    std::env::var_os(CHILD)?;
    Some(std::env::var(name).unwrap_or_default())
}

/// Runs this binary's test `name` alone, with no `AWS_*` variable but `env`, `HOME` in a
/// temporary directory, and instance metadata off unless `env` sets it.
async fn run_child(name: &str, env: &[(&str, String)]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("HOME", home.path()).env(CHILD, "1");
    if !env.iter().any(|(k, _)| k.starts_with("AWS_EC2_METADATA")) {
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

fn assert_child_passed(out: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The child's side of every chain test: an empty `aws` entry, a round trip under
/// `FIELDCRYPT_TEST_KEY` (masterKey without endpoint: `AWS_ENDPOINT_URL_KMS` names moto), or,
/// with `FIELDCRYPT_TEST_EXPECT`, an `Error::Kms` saying that, without the secret.
async fn child_round_trip() {
    let key = child_var("FIELDCRYPT_TEST_KEY").unwrap();
    let kms = Arc::new(KmsProviders::from_document(&doc! { "aws": {} }).unwrap());
    let mk = doc! { "provider": "aws", "region": REGION, "key": key.as_str() };
    let wrapped = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&material(0x5a, 32), b"chain")
        .await;
    let expect = child_var("FIELDCRYPT_TEST_EXPECT").unwrap();
    if expect.is_empty() {
        let (stored, wrapped) = wrapped.unwrap();
        let back = kms
            .unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"chain")
            .await
            .unwrap();
        assert_eq!(back.expose_secret(), [0x5a; 32]);
        // Cached: a second call needs no new credentials (the servers count).
        kms.unwrapper()
            .unwrap_with_ad(&stored, &wrapped, b"chain")
            .await
            .unwrap();
    } else {
        let e = wrapped.unwrap_err();
        let secret = child_var("FIELDCRYPT_TEST_SECRET").unwrap();
        let shown = assert_clean(&e, &[secret.as_str()]);
        assert!(kms_reason(&e).contains(&expect), "{shown}");
    }
}

fn kms_env(m: &Moto, key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL_KMS", m.endpoint().to_owned()),
        ("FIELDCRYPT_TEST_KEY", key.to_owned()),
    ]
}

#[tokio::test]
async fn chain_environment_variables() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    let m = iam_moto();
    let iam = m.iam().unwrap();
    let arn = m.create_key().unwrap();
    let name = "chain_environment_variables";
    let mut env = kms_env(m, &arn);
    env.push(("AWS_ACCESS_KEY_ID", iam.allowed.access_key_id.clone()));
    env.push((
        "AWS_SECRET_ACCESS_KEY",
        iam.allowed.secret_access_key.clone(),
    ));
    assert_child_passed(&run_child(name, &env).await);
    // Another secret: moto refuses the signature (so the variables are what signed).
    let mut env = kms_env(m, &arn);
    env.push(("AWS_ACCESS_KEY_ID", iam.allowed.access_key_id.clone()));
    env.push((
        "AWS_SECRET_ACCESS_KEY",
        "not-the-secret-0123456789".to_owned(),
    ));
    env.push(("FIELDCRYPT_TEST_EXPECT", "SignatureDoesNotMatch".to_owned()));
    env.push((
        "FIELDCRYPT_TEST_SECRET",
        "not-the-secret-0123456789".to_owned(),
    ));
    assert_child_passed(&run_child(name, &env).await);
    // Nothing at all: a clear error listing what was tried.
    let mut env = kms_env(m, &arn);
    env.push((
        "FIELDCRYPT_TEST_EXPECT",
        "AWS credentials: none found".to_owned(),
    ));
    env.push((
        "FIELDCRYPT_TEST_SECRET",
        iam.allowed.secret_access_key.clone(),
    ));
    assert_child_passed(&run_child(name, &env).await);
}

#[tokio::test]
async fn chain_shared_files_and_profiles() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    let m = iam_moto();
    let iam = m.iam().unwrap();
    let arn = m.create_key().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    let config = dir.path().join("config");
    // `default` is the denied user (credentials file); profile `dev` the allowed one (config
    // file, `[profile dev]`).
    std::fs::write(
        &credentials,
        format!(
            "# test\n[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            iam.denied.access_key_id, iam.denied.secret_access_key
        ),
    )
    .unwrap();
    std::fs::write(
        &config,
        format!(
            "[default]\nregion = us-east-1\n\n[profile dev]\nregion = us-east-1\naws_access_key_id = {}\naws_secret_access_key = {}\n[profile sso]\nsso_session = corp\n",
            iam.allowed.access_key_id, iam.allowed.secret_access_key
        ),
    )
    .unwrap();
    let name = "chain_shared_files_and_profiles";
    let files = |profile: Option<&str>, expect: &str| {
        let mut env = kms_env(m, &arn);
        env.push((
            "AWS_SHARED_CREDENTIALS_FILE",
            credentials.display().to_string(),
        ));
        env.push(("AWS_CONFIG_FILE", config.display().to_string()));
        if let Some(p) = profile {
            env.push(("AWS_PROFILE", p.to_owned()));
        }
        if !expect.is_empty() {
            env.push(("FIELDCRYPT_TEST_EXPECT", expect.to_owned()));
            env.push((
                "FIELDCRYPT_TEST_SECRET",
                iam.denied.secret_access_key.clone(),
            ));
        }
        env
    };
    assert_child_passed(&run_child(name, &files(Some("dev"), "")).await);
    assert_child_passed(&run_child(name, &files(None, "AccessDenied")).await);
    assert_child_passed(&run_child(name, &files(Some("nope"), "profile \"nope\"")).await);
    assert_child_passed(&run_child(name, &files(Some("sso"), "sso_session")).await);
    // `~/.aws/credentials` when no variable names the files.
    let mut env = kms_env(m, &arn);
    env.push(("FIELDCRYPT_TEST_EXPECT", "AccessDenied".to_owned()));
    env.push((
        "FIELDCRYPT_TEST_SECRET",
        iam.denied.secret_access_key.clone(),
    ));
    assert_child_passed(&run_child_with_home_files(name, &env, &credentials).await);
}

/// As [`run_child`], with `credentials` copied to the child's `~/.aws/credentials`.
async fn run_child_with_home_files(
    name: &str,
    env: &[(&str, String)],
    credentials: &Path,
) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::copy(credentials, home.path().join(".aws/credentials")).unwrap();
    let mut env = env.to_vec();
    env.push(("HOME", home.path().display().to_string()));
    run_child(name, &env).await
}

#[tokio::test]
async fn chain_web_identity_through_sts() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    // moto's IAM mode cannot take STS's unsigned AssumeRoleWithWebIdentity: the shared server
    // (no authentication) answers it, with a session the KMS calls then sign with.
    let m = moto();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(
        &token,
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJl\n",
    )
    .unwrap();
    let name = "chain_web_identity_through_sts";
    let with = |role: &str, token: &Path, expect: &str| {
        let mut env = kms_env(m, shared_key());
        env.push(("AWS_ENDPOINT_URL_STS", m.endpoint().to_owned()));
        env.push(("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()));
        env.push(("AWS_ROLE_ARN", role.to_owned()));
        env.push(("AWS_ROLE_SESSION_NAME", "fieldcrypt-test".to_owned()));
        if !expect.is_empty() {
            env.push(("FIELDCRYPT_TEST_EXPECT", expect.to_owned()));
            env.push(("FIELDCRYPT_TEST_SECRET", "eyJhbGciOiJSUzI1NiJ9".to_owned()));
        }
        env
    };
    let role = "arn:aws:iam::123456789012:role/fieldcrypt-web";
    assert_child_passed(&run_child(name, &with(role, &token, "")).await);
    assert_child_passed(
        &run_child(
            name,
            &with(
                role,
                &dir.path().join("missing"),
                "AWS_WEB_IDENTITY_TOKEN_FILE",
            ),
        )
        .await,
    );
}

/// A tiny HTTP/1.1 server for the metadata endpoints (no emulator exists for them): answers
/// each request with `respond(method, path, headers)`, records what it was asked.
struct MetadataServer {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

type Respond = dyn Fn(&str, &str, &[(String, String)]) -> (u16, String) + Send + Sync;

async fn metadata_server(respond: Arc<Respond>) -> MetadataServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let respond = respond.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let mut lines = text.split("\r\n");
                let mut first = lines.next().unwrap_or_default().split(' ');
                let (method, path) = (
                    first.next().unwrap_or_default(),
                    first.next().unwrap_or_default(),
                );
                let headers: Vec<(String, String)> = lines
                    .take_while(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                log.lock().unwrap().push(format!("{method} {path}"));
                let (status, body) = respond(method, path, &headers);
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    MetadataServer { url, seen }
}

fn credentials_json(s: &AccessKey, expires_in: Duration) -> String {
    let at = bson::DateTime::from_system_time(std::time::SystemTime::now() + expires_in);
    serde_json::json!({
        "Code": "Success",
        "AccessKeyId": s.access_key_id,
        "SecretAccessKey": s.secret_access_key,
        "Token": s.session_token,
        "Expiration": at.try_to_rfc3339_string().unwrap(),
    })
    .to_string()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_container_credentials() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    let m = iam_moto();
    let arn = m.create_key().unwrap();
    let session = m.assume_role().unwrap();
    let body = credentials_json(&session, Duration::from_secs(3600));
    let server = metadata_server(Arc::new(
        move |method: &str, path: &str, h: &[(String, String)]| match (
            method,
            path,
            header(h, "authorization"),
        ) {
            ("GET", "/creds", Some("Bearer pod-token")) => (200, body.clone()),
            _ => (401, "{}".to_owned()),
        },
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "Bearer pod-token\n").unwrap();
    let name = "chain_container_credentials";
    let mut env = kms_env(m, &arn);
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", server.url),
    ));
    env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        token_file.display().to_string(),
    ));
    assert_child_passed(&run_child(name, &env).await);
    // Credentials fetched once for the child's three KMS calls.
    assert_eq!(server.seen.lock().unwrap().as_slice(), ["GET /creds"]);
    // The token in a variable; a wrong one is refused by the endpoint.
    let mut env = kms_env(m, &arn);
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", server.url),
    ));
    env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "Bearer wrong".to_owned(),
    ));
    env.push((
        "FIELDCRYPT_TEST_EXPECT",
        "container endpoint: HTTP 401".to_owned(),
    ));
    env.push(("FIELDCRYPT_TEST_SECRET", session.secret_access_key.clone()));
    assert_child_passed(&run_child(name, &env).await);
    // Plain HTTP to anything but loopback or the ECS/EKS agents is refused before any request.
    let mut env = kms_env(m, &arn);
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "http://example.com/creds".to_owned(),
    ));
    env.push(("FIELDCRYPT_TEST_EXPECT", "must be https".to_owned()));
    env.push(("FIELDCRYPT_TEST_SECRET", session.secret_access_key.clone()));
    assert_child_passed(&run_child(name, &env).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_instance_metadata_imdsv2() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    let m = iam_moto();
    let arn = m.create_key().unwrap();
    let session = m.assume_role().unwrap();
    let body = credentials_json(&session, Duration::from_secs(3600));
    let server = metadata_server(Arc::new(
        move |method: &str, path: &str, h: &[(String, String)]| {
            let token = header(h, "x-aws-ec2-metadata-token");
            match (method, path) {
                ("PUT", "/latest/api/token")
                    if header(h, "x-aws-ec2-metadata-token-ttl-seconds").is_some() =>
                {
                    (200, "imds-session-token".to_owned())
                }
                (_, _) if token != Some("imds-session-token") => (401, String::new()),
                ("GET", "/latest/meta-data/iam/security-credentials/") => {
                    (200, "fieldcrypt-role\n".to_owned())
                }
                ("GET", "/latest/meta-data/iam/security-credentials/fieldcrypt-role") => {
                    (200, body.clone())
                }
                _ => (404, String::new()),
            }
        },
    ))
    .await;
    let name = "chain_instance_metadata_imdsv2";
    let mut env = kms_env(m, &arn);
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url.clone()));
    assert_child_passed(&run_child(name, &env).await);
    assert_eq!(
        server.seen.lock().unwrap().as_slice(),
        [
            "PUT /latest/api/token",
            "GET /latest/meta-data/iam/security-credentials/",
            "GET /latest/meta-data/iam/security-credentials/fieldcrypt-role",
        ]
    );
    // Turned off: no request, and the chain has nothing left.
    let mut env = kms_env(m, &arn);
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT", server.url.clone()));
    env.push(("AWS_EC2_METADATA_DISABLED", "true".to_owned()));
    env.push(("FIELDCRYPT_TEST_EXPECT", "none found".to_owned()));
    env.push(("FIELDCRYPT_TEST_SECRET", session.secret_access_key.clone()));
    assert_child_passed(&run_child(name, &env).await);
    assert_eq!(server.seen.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_refreshes_credentials_shortly_before_they_expire() {
    if child_var(CHILD).is_some() {
        return child_round_trip().await;
    }
    let m = iam_moto();
    let arn = m.create_key().unwrap();
    let session = m.assume_role().unwrap();
    // Two minutes left: inside the refresh window, so every call fetches again.
    let body = credentials_json(&session, Duration::from_secs(120));
    let server = metadata_server(Arc::new(move |_: &str, _: &str, _: &[(String, String)]| {
        (200, body.clone())
    }))
    .await;
    let mut env = kms_env(m, &arn);
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        format!("{}/creds", server.url),
    ));
    assert_child_passed(
        &run_child(
            "chain_refreshes_credentials_shortly_before_they_expire",
            &env,
        )
        .await,
    );
    assert_eq!(server.seen.lock().unwrap().len(), 3);
}
