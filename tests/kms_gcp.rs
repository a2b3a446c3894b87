//! The `gcp` KMS provider against the test kit's fake Google Cloud KMS, OAuth 2.0 token endpoint
//! and metadata server (`fieldcrypt_testkit::kms::fake_gcp`: HTTPS with a per-run CA, JWTs
//! verified with the service account's public key, AES-GCM "KMS" that checks the AAD) and a
//! real MongoDB wire-protocol server for the key vault. Cloud KMS has no local emulator; see the
//! fake's docs for what it checks.
#![cfg(feature = "gcp")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders, RetryPolicy, TlsOptions};
use fieldcrypt::mongo::{KeySource as _, KeyVault};
use fieldcrypt::{
    CsfleAlgorithm, CsfleDataKey, Error, KeyMaterial, Keyring as _, CSFLE_KEY_LEN,
    FIELDCRYPT_KEY_LEN,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::kms::cloud_interop;
use fieldcrypt_testkit::kms::fake_gcp::{key_resource, FakeGcp, KMS_SCOPE, TOKEN_AUDIENCE};
use secrecy::SecretBox;

const PROJECT: &str = "fieldcrypt-test";
const LOCATION: &str = "global";
const RING: &str = "ring1";

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        timeout: Duration::from_secs(5),
    }
}

fn options(fake: &FakeGcp, names: &[&str]) -> KmsOptions {
    let tls = TlsOptions {
        ca_file: Some(fake.ca().ca_file()),
        certificate_key_file: None,
    };
    KmsOptions {
        retry: fast_retry(),
        tls: names
            .iter()
            .map(|n| ((*n).to_owned(), tls.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Service-account credentials, the key as PKCS#8 PEM (a JSON key file's `private_key`).
fn credentials(fake: &FakeGcp) -> Document {
    doc! { "email": fake.email(), "privateKey": fake.private_key_pem(), "endpoint": fake.endpoint() }
}

fn providers(fake: &FakeGcp) -> Arc<KmsProviders> {
    Arc::new(
        KmsProviders::from_document_with(
            &doc! { "gcp": credentials(fake) },
            &options(fake, &["gcp"]),
        )
        .unwrap(),
    )
}

fn master_key(fake: &FakeGcp, key: &str) -> Document {
    doc! {
        "provider": "gcp",
        "projectId": PROJECT,
        "location": LOCATION,
        "keyRing": RING,
        "keyName": key,
        "endpoint": fake.endpoint(),
    }
}

fn resource(key: &str) -> String {
    key_resource(PROJECT, LOCATION, RING, key)
}

async fn new_client() -> mongodb::Client {
    let server = DevServer::shared().unwrap();
    mongodb::Client::with_uri_str(server.uri()).await.unwrap()
}

fn kms_reason(e: &Error) -> (&str, &str) {
    match e {
        Error::Kms { provider, reason } => (provider.as_str(), reason.as_str()),
        other => panic!("expected Error::Kms, got {other:?}"),
    }
}

fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!text.contains(s), "secret leaked into {text:?}");
    }
}

/// A few lines of the PEM key's base64 body: what would show if the key leaked.
fn key_fragments(fake: &FakeGcp) -> Vec<String> {
    let b64 = fake.private_key_base64();
    vec![b64[40..80].to_owned(), b64[400..440].to_owned()]
}

#[tokio::test]
async fn round_trip_through_the_key_vault_with_a_service_account() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let client = new_client().await;
    let ns = format!("{}.datakeys", unique_db_name("gcp_rt"));
    let kms = providers(&fake);
    let vault = Arc::new(
        KeyVault::with_kms_providers(&client, &kms, &master_key(&fake, "kek1"))
            .unwrap()
            .namespace(&ns)
            .build()
            .unwrap(),
    );
    let id = vault.create_key("pii").await.unwrap();
    let csfle = vault
        .create_csfle_key(&["csfle-key".to_owned()])
        .await
        .unwrap();
    vault.prefetch_ids(&[id, csfle]).await.unwrap();
    let written = vault.key(&id).unwrap().material().unwrap().clone();
    let written_csfle = vault.key(&csfle).unwrap().material().unwrap().clone();
    assert_eq!(written.len(), FIELDCRYPT_KEY_LEN);
    assert_eq!(written_csfle.len(), CSFLE_KEY_LEN);

    let (db, coll) = ns.split_once('.').unwrap();
    let raw = client.database(db).collection::<Document>(coll);
    for key in [id, csfle] {
        let stored = raw
            .find_one(doc! { "_id": key.to_binary() })
            .await
            .unwrap()
            .unwrap();
        // libmongocrypt's masterKey, field for field and in its order.
        let mk = stored.get_document("masterKey").unwrap();
        assert_eq!(mk, &master_key(&fake, "kek1"));
        assert_eq!(
            mk.keys().collect::<Vec<_>>(),
            [
                "provider",
                "projectId",
                "location",
                "keyRing",
                "keyName",
                "endpoint"
            ]
        );
    }

    let other = Arc::new(
        KeyVault::with_kms_providers(
            &new_client().await,
            &providers(&fake),
            &master_key(&fake, "kek1"),
        )
        .unwrap()
        .namespace(&ns)
        .build()
        .unwrap(),
    );
    other.prefetch_ids(&[id, csfle]).await.unwrap();
    assert_eq!(
        other.key(&id).unwrap().material().unwrap().expose_secret(),
        written.expose_secret()
    );
    assert_eq!(
        other
            .key(&csfle)
            .unwrap()
            .material()
            .unwrap()
            .expose_secret(),
        written_csfle.expose_secret()
    );

    // The token request: a JWT-bearer grant with libmongocrypt's claims.
    let tokens = fake.https().requests_of("token");
    assert_eq!(
        tokens.len(),
        2,
        "one token per configured provider, then cached"
    );
    let form: BTreeMap<String, String> = tokens[0].form().into_iter().collect();
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let parts: Vec<&str> = form["assertion"].split('.').collect();
    assert_eq!(parts.len(), 3);
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT"}));
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["iss"], fake.email());
    assert_eq!(claims["aud"], TOKEN_AUDIENCE);
    assert_eq!(claims["scope"], KMS_SCOPE);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );

    // The KMS calls: encrypt (twice), then decrypt, on the CryptoKey; AAD only for the
    // fieldcrypt key.
    let calls = fake.https().requests_of("kms");
    assert!(calls.len() >= 4);
    let key_path = format!("/v1/{}", resource("kek1"));
    for (i, call) in calls.iter().enumerate() {
        let method = if i < 2 { "encrypt" } else { "decrypt" };
        assert_eq!(call.path, format!("{key_path}:{method}"));
        assert!(call.bearer().is_some());
    }
    let bodies: Vec<serde_json::Value> = calls[..2]
        .iter()
        .map(|c| serde_json::from_slice(&c.body).unwrap())
        .collect();
    assert!(bodies[0].get("additionalAuthenticatedData").is_some());
    assert_eq!(
        bodies[1].as_object().unwrap().len(),
        1,
        "CSFLE: plaintext only"
    );
}

#[tokio::test]
async fn associated_data_is_cloud_kms_aad_and_csfle_keys_have_none() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();

    let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    // Exactly the KMS's ciphertext of the 96 bytes, with no AAD (libmongocrypt's request).
    assert_eq!(
        fake.decrypt_locally(&resource("kek1"), &wrapped, &[])
            .unwrap(),
        dek.expose_secret()
    );
    let back = kek.unwrap(&mk, &wrapped).await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());

    let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"key A").await.unwrap();
    assert!(fake
        .decrypt_locally(&resource("kek1"), &wrapped, &[])
        .is_none());
    assert_eq!(
        fake.decrypt_locally(&resource("kek1"), &wrapped, b"key A")
            .unwrap(),
        dek.expose_secret()
    );

    let e = kek
        .unwrap_with_ad(&mk, &wrapped, b"key B")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");
    let mut tampered = wrapped.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let e = kek
        .unwrap_with_ad(&mk, &tampered, b"key A")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");
    // Another CryptoKey's ciphertext.
    fake.add_key(PROJECT, LOCATION, RING, "kek2");
    let e = kek
        .unwrap_with_ad(&master_key(&fake, "kek2"), &wrapped, b"key A")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");
}

#[tokio::test]
async fn a_pinned_key_version_encrypts_and_decrypt_goes_to_the_crypto_key() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    fake.add_key(PROJECT, LOCATION, RING, "kek1"); // version 2 is primary
    let mut mk = master_key(&fake, "kek1");
    mk.insert("keyVersion", "1");
    let kek = providers(&fake).kek_for(&mk).unwrap();
    let (stored, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    // Stored in libmongocrypt's order: keyVersion before endpoint.
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        [
            "provider",
            "projectId",
            "location",
            "keyRing",
            "keyName",
            "keyVersion",
            "endpoint"
        ]
    );
    kek.unwrap_with_ad(&stored, &wrapped, b"ad").await.unwrap();
    let calls = fake.https().requests_of("kms");
    assert_eq!(
        calls[0].path,
        format!("/v1/{}/cryptoKeyVersions/1:encrypt", resource("kek1"))
    );
    assert_eq!(calls[1].path, format!("/v1/{}:decrypt", resource("kek1")));

    // Version 1 disabled: FAILED_PRECONDITION is the KMS refusing, not a bad ciphertext.
    fake.set_version_enabled(&resource("kek1"), 1, false);
    let e = kek
        .unwrap_with_ad(&stored, &wrapped, b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(reason.contains("FAILED_PRECONDITION"), "{reason}");
    assert!(
        reason.contains(&format!("{}/cryptoKeyVersions/1", resource("kek1"))),
        "{reason}"
    );
}

#[tokio::test]
async fn every_private_key_form_works() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let forms = [
        bson::Bson::String(fake.private_key_pem()),
        bson::Bson::String(fake.private_key_base64()),
        bson::Bson::String(fake.private_key_pkcs1_pem()),
        bson::Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: fake.private_key_der(),
        }),
    ];
    for form in forms {
        let creds = doc! { "email": fake.email(), "privateKey": form, "endpoint": fake.endpoint() };
        let kms =
            KmsProviders::from_document_with(&doc! { "gcp": creds }, &options(&fake, &["gcp"]))
                .unwrap();
        let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
        let dek = KeyMaterial::generate(32);
        let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
        let back = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
    }
    assert_eq!(fake.https().requests_of("token").len(), 4);
}

#[tokio::test]
async fn an_access_token_is_used_as_given() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let token = fake.issue_token();
    let kms = KmsProviders::from_document_with(
        &doc! { "gcp": { "accessToken": &token } },
        &options(&fake, &["gcp"]),
    )
    .unwrap();
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let dek = KeyMaterial::generate(32);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert!(fake.https().requests_of("token").is_empty());
    for call in fake.https().requests_of("kms") {
        assert_eq!(call.bearer(), Some(token.as_str()));
    }
    fake.revoke_tokens();
    let e = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(
        reason.contains("401") && reason.contains("UNAUTHENTICATED"),
        "{reason}"
    );
    assert!(reason.contains(&resource("kek1")), "{reason}");
    assert_no_secret(&format!("{e} {e:?} {kms:?}"), &[&token]);
}

/// An empty `gcp` entry takes the instance's token from the metadata server, here the fake's,
/// moved with `GCE_METADATA_HOST` — set in a child process running this same test, so no other
/// test of this process sees it (and none reaches a real metadata server).
#[tokio::test]
async fn an_empty_entry_uses_the_metadata_server() {
    const CHILD: &str = "FIELDCRYPT_TEST_GCE_METADATA_CHILD";
    if let Ok(spec) = std::env::var(CHILD) {
        let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
        let tls = TlsOptions {
            ca_file: Some(spec["ca"].as_str().unwrap().into()),
            certificate_key_file: None,
        };
        let options = KmsOptions {
            retry: fast_retry(),
            tls: [("gcp".to_owned(), tls)].into_iter().collect(),
        };
        let kms = KmsProviders::from_document_with(&doc! { "gcp": {} }, &options).unwrap();
        let mk = doc! {
            "provider": "gcp", "projectId": PROJECT, "location": LOCATION, "keyRing": RING,
            "keyName": "kek1", "endpoint": spec["endpoint"].as_str().unwrap(),
        };
        let kek = kms.kek_for(&mk).unwrap();
        let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
        let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
        let back = kek.unwrap(&mk, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        return;
    }
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let spec = serde_json::json!({ "ca": fake.ca().ca_file(), "endpoint": fake.endpoint() });
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "an_empty_entry_uses_the_metadata_server",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD, spec.to_string())
        .env("GCE_METADATA_HOST", fake.metadata().host_and_port())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = fake.metadata().requests_of("metadata");
    assert_eq!(md.len(), 1, "one token, cached for both calls");
    assert_eq!(md[0].method, "GET");
    assert_eq!(md[0].header("metadata-flavor"), Some("Google"));
    assert_eq!(fake.https().requests_of("kms").len(), 2);
    assert!(fake.https().requests_of("token").is_empty());
}

#[tokio::test]
async fn fail_denied_unknown_and_disabled_keys_with_kms_errors_naming_provider_and_key() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let kms = providers(&fake);
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let dek = KeyMaterial::generate(32);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    let fragments = key_fragments(&fake);
    let secrets: Vec<&str> = fragments.iter().map(String::as_str).collect();

    fake.set_denied(&resource("kek1"), true);
    for e in [
        kek.wrap_with_ad(&dek, b"ad").await.unwrap_err(),
        kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err(),
    ] {
        let (provider, reason) = kms_reason(&e);
        assert_eq!(provider, "gcp");
        assert!(reason.contains(&resource("kek1")), "{reason}");
        assert!(
            reason.contains("403") && reason.contains("PERMISSION_DENIED"),
            "{reason}"
        );
        assert_no_secret(&format!("{e} {e:?}"), &secrets);
    }
    fake.set_denied(&resource("kek1"), false);

    fake.set_version_enabled(&resource("kek1"), 1, false);
    let e = kek.wrap_with_ad(&dek, b"ad").await.unwrap_err();
    let (_, reason) = kms_reason(&e);
    assert!(
        reason.contains("400") && reason.contains("FAILED_PRECONDITION"),
        "{reason}"
    );
    fake.set_version_enabled(&resource("kek1"), 1, true);

    let e = kms
        .kek_for(&master_key(&fake, "nope"))
        .unwrap()
        .wrap_with_ad(&dek, b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(
        reason.contains(&resource("nope")) && reason.contains("404"),
        "{reason}"
    );

    assert_eq!(
        fake.https().requests_of("kms").len(),
        1 + 2 + 1 + 1,
        "no retry of 4xx"
    );
}

#[tokio::test]
async fn fail_a_service_account_key_the_token_endpoint_does_not_accept() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    // Another account's key: the signature does not verify with this account's public key.
    let other = FakeGcp::start().unwrap();
    let creds = doc! { "email": fake.email(), "privateKey": other.private_key_pem(), "endpoint": fake.endpoint() };
    let kms = KmsProviders::from_document_with(&doc! { "gcp": creds }, &options(&fake, &["gcp"]))
        .unwrap();
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(
        reason.contains("invalid_grant") && reason.contains("Signature"),
        "{reason}"
    );
    assert!(reason.contains(&resource("kek1")), "{reason}");
    let fragments = key_fragments(&other);
    let secrets: Vec<&str> = fragments.iter().map(String::as_str).collect();
    assert_no_secret(&format!("{e} {e:?} {kms:?}"), &secrets);
    assert!(fake.https().requests_of("kms").is_empty());

    // An unknown account.
    let creds = doc! { "email": "nobody@example.iam.gserviceaccount.com", "privateKey": fake.private_key_pem(), "endpoint": fake.endpoint() };
    let kms = KmsProviders::from_document_with(&doc! { "gcp": creds }, &options(&fake, &["gcp"]))
        .unwrap();
    let e = kms
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    assert!(kms_reason(&e).1.contains("invalid_grant"), "{e}");
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let dek = KeyMaterial::generate(CSFLE_KEY_LEN);

    fake.https().inject("token", 500, 1);
    fake.https().inject("kms", 429, 2);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 2);
    assert_eq!(fake.https().requests_of("kms").len(), 3);

    fake.https().clear_requests();
    fake.https().inject_always("kms", 503);
    let e = kek.unwrap(&mk, &wrapped).await.unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(
        reason.contains("503") && reason.contains(&resource("kek1")),
        "{reason}"
    );
    assert_eq!(fake.https().requests_of("kms").len(), 3);

    fake.https().heal();
    assert_eq!(
        kek.unwrap(&mk, &wrapped).await.unwrap().expose_secret(),
        dek.expose_secret()
    );
}

#[tokio::test]
async fn fail_an_unreachable_kms_after_bounded_retries() {
    let fake = FakeGcp::start().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut mk = master_key(&fake, "kek1");
    mk.insert("endpoint", format!("127.0.0.1:{port}"));
    // A token the fake gave, so only the KMS is unreachable.
    let kms = KmsProviders::from_document_with(
        &doc! { "gcp": { "accessToken": fake.issue_token() } },
        &options(&fake, &["gcp"]),
    )
    .unwrap();
    let started = Instant::now();
    let e = kms
        .kek_for(&mk)
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "gcp");
    assert!(reason.contains(&resource("kek1")), "{reason}");
    assert!(
        reason.contains("cannot connect") && reason.contains("3 attempts"),
        "{reason}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn tokens_are_cached_until_shortly_before_they_expire_and_renewed_when_refused() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    fake.set_token_lifetime(2);
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let (mk, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 2);

    fake.set_token_lifetime(3600);
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    let before = fake.https().requests_of("token").len();
    fake.revoke_tokens();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), before + 1);
}

#[tokio::test]
async fn named_providers_have_their_own_credentials() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let kms = Arc::new(
        KmsProviders::from_document_with(
            &doc! { "gcp": credentials(&fake), "gcp:other": { "accessToken": fake.issue_token() } },
            &options(&fake, &["gcp", "gcp:other"]),
        )
        .unwrap(),
    );
    let mut mk = master_key(&fake, "kek1");
    mk.insert("provider", "gcp:other");
    let kek = kms.kek_for(&mk).unwrap();
    assert_eq!(kek.provider(), "gcp:other");
    let dek = KeyMaterial::generate(32);
    let (stored, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    assert_eq!(stored.get_str("provider").unwrap(), "gcp:other");
    let back = kms
        .unwrapper()
        .unwrap_with_ad(&stored, &wrapped, b"ad")
        .await
        .unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
    assert!(fake.https().requests_of("token").is_empty());
}

#[test]
fn fail_malformed_master_keys_and_credentials() {
    let fake = FakeGcp::start().unwrap();
    let kms = providers(&fake);
    let base = master_key(&fake, "k");
    let with = |f: &str, v: bson::Bson| {
        let mut d = base.clone();
        d.insert(f, v);
        d
    };
    let without = |f: &str| {
        let mut d = base.clone();
        d.remove(f);
        d
    };
    for (mk, field) in [
        (without("projectId"), "projectId"),
        (without("location"), "location"),
        (without("keyRing"), "keyRing"),
        (without("keyName"), "keyName"),
        (with("keyRing", "a/b".into()), "keyRing"),
        (with("projectId", "p?x".into()), "projectId"),
        (with("keyVersion", bson::Bson::Int32(1)), "keyVersion"),
        (with("endpoint", "nodot".into()), "endpoint"),
        (
            with("endpoint", "http://kms.example.com".into()),
            "endpoint",
        ),
        (with("region", "x".into()), "region"),
    ] {
        let e = kms
            .kek_for(&mk)
            .err()
            .unwrap_or_else(|| panic!("accepted {mk}"));
        assert!(matches!(e, Error::KeyFormat(_)), "{e:?}");
        assert!(e.to_string().contains(field), "{mk}: {e}");
    }
    // Without endpoint: Cloud KMS itself (not called here).
    kms.kek_for(&without("endpoint")).unwrap();

    let opts = options(&fake, &["gcp"]);
    let pem = fake.private_key_pem();
    for (creds, field) in [
        (doc! { "privateKey": &pem }, "email"),
        (doc! { "email": "a@b.c" }, "privateKey"),
        (
            doc! { "email": "a@b.c", "privateKey": "bm90IGEga2V5" },
            "privateKey",
        ),
        (
            doc! { "email": "a@b.c", "privateKey": &pem, "extra": 1 },
            "extra",
        ),
        (
            doc! { "email": "a@b.c", "privateKey": &pem, "endpoint": "nodot" },
            "endpoint",
        ),
        (doc! { "accessToken": "t", "email": "a@b.c" }, "email"),
    ] {
        let e = KmsProviders::from_document_with(&doc! { "gcp": creds.clone() }, &opts)
            .err()
            .unwrap_or_else(|| panic!("accepted {creds}"));
        assert!(e.to_string().contains(field), "{e}");
        let fragments = key_fragments(&fake);
        let secrets: Vec<&str> = fragments.iter().map(String::as_str).collect();
        assert_no_secret(&format!("{e} {e:?}"), &secrets);
    }
}

/// A CSFLE data key made from a key vault's unwrapped material.
fn csfle_key(vault: &KeyVault, id: fieldcrypt::KeyId) -> CsfleDataKey {
    let material: [u8; CSFLE_KEY_LEN] = vault
        .key(&id)
        .unwrap()
        .material()
        .unwrap()
        .expose_secret()
        .try_into()
        .unwrap();
    CsfleDataKey::from_material(id, SecretBox::new(Box::new(material)), Vec::new()).unwrap()
}

/// libmongocrypt (PyMongo's ClientEncryption, its requests sent to the fake) unwraps a CSFLE
/// key fieldcrypt wrapped under Cloud KMS and decrypts fieldcrypt's ciphertext; fieldcrypt
/// unwraps a key libmongocrypt created under Cloud KMS and decrypts libmongocrypt's ciphertext.
/// libmongocrypt gets the service account key as base64 of its DER, its string form.
#[tokio::test]
async fn libmongocrypt_and_fieldcrypt_read_each_others_gcp_keys() {
    let fake = FakeGcp::start().unwrap();
    fake.add_key(PROJECT, LOCATION, RING, "kek1");
    let client = new_client().await;
    let ns = format!("{}.datakeys", unique_db_name("gcp_interop"));
    let vault =
        KeyVault::with_kms_providers(&client, &providers(&fake), &master_key(&fake, "kek1"))
            .unwrap()
            .namespace(&ns)
            .build()
            .unwrap();
    let ours = vault
        .create_csfle_key(&["made-by-fieldcrypt".to_owned()])
        .await
        .unwrap();
    vault.prefetch_ids(&[ours]).await.unwrap();
    let ciphertext = csfle_key(&vault, ours)
        .encrypt_value(
            CsfleAlgorithm::Random,
            &Bson::String("made by fieldcrypt".into()),
        )
        .unwrap();
    let mut their_master_key = master_key(&fake, "kek1");
    their_master_key.remove("provider");
    fake.https().clear_requests();

    let answer = cloud_interop::answer(&cloud_interop::run(&doc! {
        "provider": "gcp",
        "kms_providers": { "gcp": {
            "email": fake.email(),
            "privateKey": fake.private_key_base64(),
            "endpoint": fake.endpoint(),
        } },
        "master_key": their_master_key,
        "ca": fake.ca().ca_file().to_str().unwrap(),
        "key_vault": &ns,
        "fieldcrypt_ciphertext": ciphertext,
    }));
    assert_eq!(answer.get_str("decrypted").unwrap(), "made by fieldcrypt");
    // libmongocrypt's requests passed the fake's checks (JWT audience and scope as the fake
    // expects them): one token; decrypt (fieldcrypt's key), encrypt (its new key), decrypt.
    assert_eq!(fake.https().requests_of("token").len(), 1);
    let key_path = format!("/v1/{}", resource("kek1"));
    assert_eq!(
        fake.https()
            .requests_of("kms")
            .iter()
            .map(|c| c.path.clone())
            .collect::<Vec<_>>(),
        [
            format!("{key_path}:decrypt"),
            format!("{key_path}:encrypt"),
            format!("{key_path}:decrypt")
        ]
    );

    let theirs = match answer.get("key_id") {
        Some(Bson::Binary(b)) => fieldcrypt::KeyId::from_slice(&b.bytes).unwrap(),
        other => panic!("key_id: {other:?}"),
    };
    let their_ciphertext = match answer.get("ciphertext") {
        Some(Bson::Binary(b)) => b.clone(),
        other => panic!("ciphertext: {other:?}"),
    };
    let reader = KeyVault::with_kms_providers(
        &new_client().await,
        &providers(&fake),
        &master_key(&fake, "kek1"),
    )
    .unwrap()
    .namespace(&ns)
    .build()
    .unwrap();
    reader.prefetch_ids(&[theirs]).await.unwrap();
    assert_eq!(
        csfle_key(&reader, theirs)
            .decrypt_value(&their_ciphertext)
            .unwrap(),
        Bson::String("made by libmongocrypt".into())
    );
}
