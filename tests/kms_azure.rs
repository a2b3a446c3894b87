//! The `azure` KMS provider against the test kit's fake Azure Key Vault and identity platform
//! (`fieldcrypt_testkit::kms::fake_azure`: HTTPS with a per-run CA, real RSA-OAEP-256, requests
//! checked as the services check them) and a real MongoDB wire-protocol server for the key vault.
//! Azure has no local emulator; see the fake's docs for what it checks.
#![cfg(feature = "azure")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders, RetryPolicy, TlsOptions};
use fieldcrypt::mongo::{KeySource as _, KeyVault};
use fieldcrypt::{
    CsfleAlgorithm, CsfleDataKey, Error, KeyMaterial, Keyring as _, CSFLE_KEY_LEN,
    FIELDCRYPT_KEY_LEN,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::kms::cloud_interop;
use fieldcrypt_testkit::kms::fake_azure::{FakeAzure, VAULT_RESOURCE};
use secrecy::SecretBox;
use sha2::{Digest as _, Sha256};

/// Few, quick retries: the failure tests stay fast.
fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        timeout: Duration::from_secs(5),
    }
}

fn options(fake: &FakeAzure, names: &[&str]) -> KmsOptions {
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

/// Client-credentials configuration for the fake.
fn credentials(fake: &FakeAzure) -> Document {
    doc! {
        "tenantId": fake.tenant_id(),
        "clientId": fake.client_id(),
        "clientSecret": fake.client_secret(),
        "identityPlatformEndpoint": fake.endpoint(),
    }
}

fn providers(fake: &FakeAzure) -> Arc<KmsProviders> {
    Arc::new(
        KmsProviders::from_document_with(
            &doc! { "azure": credentials(fake) },
            &options(fake, &["azure"]),
        )
        .unwrap(),
    )
}

fn master_key(fake: &FakeAzure, key: &str) -> Document {
    doc! { "provider": "azure", "keyVaultEndpoint": fake.endpoint(), "keyName": key }
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

/// Asserts that none of `secrets` appears in `text`.
fn assert_no_secret(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!text.contains(s), "secret leaked into {text:?}");
    }
}

#[tokio::test]
async fn round_trip_through_the_key_vault_with_client_credentials() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let client = new_client().await;
    let ns = format!("{}.datakeys", unique_db_name("azure_rt"));
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

    // The stored masterKey is libmongocrypt's, field for field and in its order.
    let (db, coll) = ns.split_once('.').unwrap();
    let raw = client.database(db).collection::<Document>(coll);
    for key in [id, csfle] {
        let stored = raw
            .find_one(doc! { "_id": key.to_binary() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.get_document("masterKey").unwrap(),
            &master_key(&fake, "kek1")
        );
    }

    // A fresh vault (another process: new client, new providers, empty caches) reads both.
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

    // The requests, as the services check them. Each provider object fetched one token.
    let tokens = fake.https().requests_of("token");
    assert_eq!(
        tokens.len(),
        2,
        "one token per configured provider, then cached"
    );
    let t = &tokens[0];
    assert_eq!(t.method, "POST");
    assert_eq!(t.path, format!("/{}/oauth2/v2.0/token", fake.tenant_id()));
    let form: BTreeMap<String, String> = t.form().into_iter().collect();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], fake.client_id());
    assert_eq!(form["client_secret"], fake.client_secret());
    assert_eq!(form["scope"], format!("{VAULT_RESOURCE}/.default"));
    let kms_calls = fake.https().requests_of("kms");
    assert!(kms_calls.len() >= 4, "two wrapkey, then unwrapkey");
    for (i, call) in kms_calls.iter().enumerate() {
        let op = if i < 2 { "wrapkey" } else { "unwrapkey" };
        // libmongocrypt's path: no version → an empty segment.
        assert_eq!(call.path, format!("/keys/kek1//{op}"));
        assert_eq!(call.query, "api-version=7.1");
        assert!(call.bearer().is_some());
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["alg"], "RSA-OAEP-256");
    }
}

#[tokio::test]
async fn csfle_keys_are_wrapped_exactly_as_libmongocrypt_and_fieldcrypt_keys_bind_their_ad() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();

    // Empty associated data: the vault's RSA-OAEP-256 of exactly the 96 bytes.
    let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    assert_eq!(mk, master_key(&fake, "kek1"));
    assert_eq!(wrapped.len(), 256, "RSA-2048 ciphertext");
    assert_eq!(
        fake.unwrap_locally("kek1", &wrapped).unwrap(),
        dek.expose_secret()
    );
    // And one the vault wrapped itself (as libmongocrypt would have it wrap) unwraps.
    let theirs = fake.wrap_locally("kek1", dek.expose_secret()).unwrap();
    let back = kek.unwrap(&mk, &theirs).await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());

    // Non-empty associated data: SHA-256(ad) ‖ dek, checked on unwrap.
    let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
    let ad = b"fieldcrypt key identity";
    let (mk, wrapped) = kek.wrap_with_ad(&dek, ad).await.unwrap();
    let inside = fake.unwrap_locally("kek1", &wrapped).unwrap();
    assert_eq!(&inside[..32], Sha256::digest(ad).as_slice());
    assert_eq!(&inside[32..], dek.expose_secret());
    let back = kek.unwrap_with_ad(&mk, &wrapped, ad).await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
}

#[tokio::test]
async fn fail_wrong_associated_data_and_tampered_key_material() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"key A").await.unwrap();

    let e = kek
        .unwrap_with_ad(&mk, &wrapped, b"key B")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");
    // A fieldcrypt key's material read as a CSFLE key (no ad) is not the key either.
    let as_csfle = kek.unwrap_with_ad(&mk, &wrapped, &[]).await.unwrap();
    assert_ne!(as_csfle.expose_secret(), dek.expose_secret());

    let mut tampered = wrapped.clone();
    tampered[100] ^= 1;
    let e = kek
        .unwrap_with_ad(&mk, &tampered, b"key A")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");

    // Too short to hold the digest.
    let short = fake.wrap_locally("kek1", b"short").unwrap();
    let e = kek.unwrap_with_ad(&mk, &short, b"key A").await.unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");

    // Under another key of the vault.
    fake.add_key("kek2");
    let e = kek
        .unwrap_with_ad(&master_key(&fake, "kek2"), &wrapped, b"key A")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt), "{e:?}");
}

#[tokio::test]
async fn a_pinned_key_version_is_used_and_stored() {
    let fake = FakeAzure::start().unwrap();
    let v1 = fake.add_key("kek1");
    let _v2 = fake.add_key("kek1");
    let mut mk = master_key(&fake, "kek1");
    mk.insert("keyVersion", &v1);
    let kek = providers(&fake).kek_for(&mk).unwrap();
    let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
    let (stored, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    assert_eq!(stored, mk);
    let back = kek.unwrap(&stored, &wrapped).await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
    for call in fake.https().requests_of("kms") {
        assert!(
            call.path.starts_with(&format!("/keys/kek1/{v1}/")),
            "{}",
            call.path
        );
    }
}

#[tokio::test]
async fn an_access_token_is_used_as_given() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let token = fake.issue_token();
    let kms = KmsProviders::from_document_with(
        &doc! { "azure": { "accessToken": &token } },
        &options(&fake, &["azure"]),
    )
    .unwrap();
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    let back = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
    assert!(fake.https().requests_of("token").is_empty());
    for call in fake.https().requests_of("kms") {
        assert_eq!(call.bearer(), Some(token.as_str()));
    }

    // Revoked: a given token is not refreshed; the error names provider and key, not the token.
    fake.revoke_tokens();
    let e = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(
        reason.contains(&format!("{}/keys/kek1", fake.endpoint())),
        "{reason}"
    );
    assert!(reason.contains("401"), "{reason}");
    assert_no_secret(&format!("{e} {e:?} {kms:?}"), &[&token]);
}

/// Managed identity: an empty `azure` entry takes tokens from IMDS, here the fake's, moved with
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST`. The variable is set in a child process running this
/// same test, so no other test of this process sees it (and none reaches the real IMDS).
#[tokio::test]
async fn an_empty_entry_uses_the_managed_identity_from_imds() {
    const CHILD: &str = "FIELDCRYPT_TEST_AZURE_IMDS_CHILD";
    if let Ok(spec) = std::env::var(CHILD) {
        let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
        let tls = TlsOptions {
            ca_file: Some(spec["ca"].as_str().unwrap().into()),
            certificate_key_file: None,
        };
        let options = KmsOptions {
            retry: fast_retry(),
            tls: [("azure".to_owned(), tls)].into_iter().collect(),
        };
        let kms = KmsProviders::from_document_with(&doc! { "azure": {} }, &options).unwrap();
        let mk = doc! {
            "provider": "azure",
            "keyVaultEndpoint": spec["endpoint"].as_str().unwrap(),
            "keyName": "kek1",
        };
        let kek = kms.kek_for(&mk).unwrap();
        let dek = KeyMaterial::generate(CSFLE_KEY_LEN);
        let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
        let back = kek.unwrap(&mk, &wrapped).await.unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        return;
    }
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let spec = serde_json::json!({
        "ca": fake.ca().ca_file(),
        "endpoint": fake.endpoint(),
    });
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "an_empty_entry_uses_the_managed_identity_from_imds",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD, spec.to_string())
        .env("AZURE_POD_IDENTITY_AUTHORITY_HOST", fake.imds().base_url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imds = fake.imds().requests_of("imds");
    assert_eq!(imds.len(), 1, "one token, cached for both calls");
    assert_eq!(imds[0].method, "GET");
    assert_eq!(imds[0].header("metadata"), Some("true"));
    assert_eq!(
        imds[0].query_param("api-version").as_deref(),
        Some("2018-02-01")
    );
    assert_eq!(
        imds[0].query_param("resource").as_deref(),
        Some(VAULT_RESOURCE)
    );
    assert_eq!(fake.https().requests_of("kms").len(), 2);
    assert!(fake.https().requests_of("token").is_empty());
}

#[tokio::test]
async fn fail_disabled_denied_and_unknown_keys_with_kms_errors_naming_provider_and_key() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let kms = providers(&fake);
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let dek = KeyMaterial::generate(FIELDCRYPT_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    let key_id = format!("{}/keys/kek1", fake.endpoint());
    let secrets = [fake.client_secret()];
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();

    fake.set_enabled("kek1", false);
    for e in [
        kek.wrap_with_ad(&dek, b"ad").await.unwrap_err(),
        kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err(),
    ] {
        let (provider, reason) = kms_reason(&e);
        assert_eq!(provider, "azure");
        assert!(
            reason.contains(&key_id) && reason.contains("403"),
            "{reason}"
        );
        assert!(reason.contains("KeyDisabled"), "{reason}");
        assert_no_secret(&format!("{e} {e:?}"), &secrets);
    }
    fake.set_enabled("kek1", true);

    fake.set_denied("kek1", true);
    let e = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err();
    let (_, reason) = kms_reason(&e);
    assert!(
        reason.contains("403") && reason.contains("ForbiddenByPolicy"),
        "{reason}"
    );
    fake.set_denied("kek1", false);

    let e = providers(&fake)
        .kek_for(&master_key(&fake, "nope"))
        .unwrap()
        .wrap_with_ad(&dek, b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(
        reason.contains(&format!("{}/keys/nope", fake.endpoint())) && reason.contains("404"),
        "{reason}"
    );

    // Permanent failures are not retried.
    let calls = fake.https().requests_of("kms").len();
    assert_eq!(calls, 1 + 2 + 1 + 1, "no retry of 403/404");
}

#[tokio::test]
async fn fail_wrong_client_credentials_without_printing_them() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let wrong_secret = "not-the-secret-3f9a1c";
    let mut creds = credentials(&fake);
    creds.insert("clientSecret", wrong_secret);
    let kms =
        KmsProviders::from_document_with(&doc! { "azure": creds }, &options(&fake, &["azure"]))
            .unwrap();
    let kek = kms.kek_for(&master_key(&fake, "kek1")).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(
        reason.contains("401") && reason.contains("invalid_client"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("{}/keys/kek1", fake.endpoint())),
        "{reason}"
    );
    assert_no_secret(
        &format!("{e} {e:?} {kms:?}"),
        &[wrong_secret, &fake.client_secret()],
    );
    assert_eq!(
        fake.https().requests_of("token").len(),
        1,
        "a refused secret is not retried"
    );
    assert!(fake.https().requests_of("kms").is_empty());

    // An unknown tenant.
    let mut creds = credentials(&fake);
    creds.insert("tenantId", "other-tenant");
    let kms =
        KmsProviders::from_document_with(&doc! { "azure": creds }, &options(&fake, &["azure"]))
            .unwrap();
    let e = kms
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (_, reason) = kms_reason(&e);
    assert!(
        reason.contains("400") && reason.contains("invalid_request"),
        "{reason}"
    );
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let dek = KeyMaterial::generate(CSFLE_KEY_LEN);

    // 429 twice, then the vault answers: the third attempt succeeds.
    fake.https().inject("kms", 429, 2);
    fake.https().inject("token", 503, 1);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 2);
    assert_eq!(fake.https().requests_of("kms").len(), 3);

    // 500 on every attempt: the policy's 3 attempts, then an error naming provider and key.
    fake.https().clear_requests();
    fake.https().inject_always("kms", 500);
    let e = kek.unwrap(&mk, &wrapped).await.unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(
        reason.contains("500") && reason.contains("kek1"),
        "{reason}"
    );
    assert_eq!(fake.https().requests_of("kms").len(), 3);

    // Healed: works again.
    fake.https().heal();
    let back = kek.unwrap(&mk, &wrapped).await.unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
}

#[tokio::test]
async fn fail_an_unreachable_vault_after_bounded_retries() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    // A port nothing listens on: bind one and let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mk = doc! { "provider": "azure", "keyVaultEndpoint": format!("127.0.0.1:{port}"), "keyName": "kek1" };
    let kek = providers(&fake).kek_for(&mk).unwrap();
    let started = Instant::now();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(
        reason.contains(&format!("127.0.0.1:{port}/keys/kek1")),
        "{reason}"
    );
    assert!(
        reason.contains("cannot connect") && reason.contains("3 attempts"),
        "{reason}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // A server that accepts and closes the connection (down behind a load balancer).
    fake.https().refuse_all(true);
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    let (provider, reason) = kms_reason(&e);
    assert_eq!(provider, "azure");
    assert!(reason.contains("3 attempts"), "{reason}");
}

#[tokio::test]
async fn tokens_are_cached_until_shortly_before_they_expire_and_renewed_when_refused() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    fake.set_token_lifetime(2);
    let kek = providers(&fake)
        .kek_for(&master_key(&fake, "kek1"))
        .unwrap();
    let dek = KeyMaterial::generate(32);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 1);
    // A 2 s token is used for its first second only.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), 2);

    // Revoked early: the 401 drops the cached token and one fresh one is fetched.
    fake.set_token_lifetime(3600);
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    let before = fake.https().requests_of("token").len();
    fake.revoke_tokens();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();
    assert_eq!(fake.https().requests_of("token").len(), before + 1);
}

#[tokio::test]
async fn named_providers_have_their_own_credentials() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let token = fake.issue_token();
    let kms = Arc::new(
        KmsProviders::from_document_with(
            &doc! { "azure": credentials(&fake), "azure:other": { "accessToken": &token } },
            &options(&fake, &["azure", "azure:other"]),
        )
        .unwrap(),
    );
    let mut mk = master_key(&fake, "kek1");
    mk.insert("provider", "azure:other");
    let kek = kms.kek_for(&mk).unwrap();
    assert_eq!(kek.provider(), "azure:other");
    let dek = KeyMaterial::generate(32);
    let (stored, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    assert_eq!(stored.get_str("provider").unwrap(), "azure:other");
    let back = kms
        .unwrapper()
        .unwrap_with_ad(&stored, &wrapped, b"ad")
        .await
        .unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
    assert!(
        fake.https().requests_of("token").is_empty(),
        "azure:other used its token"
    );
}

#[tokio::test]
async fn fail_malformed_master_keys_and_credentials() {
    let fake = FakeAzure::start().unwrap();
    let kms = providers(&fake);
    let ep = fake.endpoint();
    for (mk, field) in [
        (
            doc! { "provider": "azure", "keyName": "k" },
            "keyVaultEndpoint",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": &ep },
            "keyName",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": &ep, "keyName": 1 },
            "keyName",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": &ep, "keyName": "a/b" },
            "keyName",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": &ep, "keyName": "k", "keyVersion": "1?x" },
            "keyVersion",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": "localhost", "keyName": "k" },
            "keyVaultEndpoint",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": "http://v.vault.azure.net", "keyName": "k" },
            "keyVaultEndpoint",
        ),
        (
            doc! { "provider": "azure", "keyVaultEndpoint": &ep, "keyName": "k", "region": "x" },
            "region",
        ),
    ] {
        let e = kms
            .kek_for(&mk)
            .err()
            .unwrap_or_else(|| panic!("accepted {mk}"));
        assert!(matches!(e, Error::KeyFormat(_)), "{e:?}");
        assert!(e.to_string().contains(field), "{mk}: {e}");
    }
    // An endpoint with scheme and path is stored as libmongocrypt stores it: host[:port].
    let kek = kms
        .kek_for(&doc! { "provider": "azure", "keyVaultEndpoint": format!("https://{ep}/"), "keyName": "k" })
        .unwrap();
    fake.add_key("k");
    let (stored, _) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    assert_eq!(stored.get_str("keyVaultEndpoint").unwrap(), ep);

    let opts = options(&fake, &["azure"]);
    let secret = "s3cret-value-91c2";
    for (creds, field) in [
        (doc! { "tenantId": "t", "clientId": "c" }, "clientSecret"),
        (doc! { "tenantId": "t", "clientSecret": secret }, "clientId"),
        (doc! { "clientId": "c", "clientSecret": secret }, "tenantId"),
        (
            doc! { "tenantId": "t/..", "clientId": "c", "clientSecret": secret },
            "tenantId",
        ),
        (
            doc! { "tenantId": "t", "clientId": "c", "clientSecret": secret, "extra": 1 },
            "extra",
        ),
        (doc! { "accessToken": secret, "tenantId": "t" }, "tenantId"),
        (doc! { "accessToken": 5 }, "accessToken"),
        (
            doc! { "tenantId": "t", "clientId": "c", "clientSecret": secret, "identityPlatformEndpoint": "nodot" },
            "identityPlatformEndpoint",
        ),
    ] {
        let e = KmsProviders::from_document_with(&doc! { "azure": creds.clone() }, &opts)
            .err()
            .unwrap_or_else(|| panic!("accepted {creds}"));
        assert!(e.to_string().contains(field), "{creds}: {e}");
        assert_no_secret(&format!("{e} {e:?}"), &[secret]);
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
/// key fieldcrypt wrapped under Azure and decrypts fieldcrypt's ciphertext; fieldcrypt unwraps
/// a key libmongocrypt created under Azure and decrypts libmongocrypt's ciphertext.
#[tokio::test]
async fn libmongocrypt_and_fieldcrypt_read_each_others_azure_keys() {
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let client = new_client().await;
    let ns = format!("{}.datakeys", unique_db_name("azure_interop"));
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
        "provider": "azure",
        "kms_providers": { "azure": credentials(&fake) },
        "master_key": their_master_key,
        "ca": fake.ca().ca_file().to_str().unwrap(),
        "key_vault": &ns,
        "fieldcrypt_ciphertext": ciphertext,
    }));
    assert_eq!(answer.get_str("decrypted").unwrap(), "made by fieldcrypt");
    // libmongocrypt's requests passed the fake's checks: one token; unwrapkey (fieldcrypt's
    // key), wrapkey (its new key), unwrapkey (its new key, to encrypt).
    assert_eq!(fake.https().requests_of("token").len(), 1);
    let calls = fake.https().requests_of("kms");
    assert_eq!(
        calls.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        [
            "/keys/kek1//unwrapkey",
            "/keys/kek1//wrapkey",
            "/keys/kek1//unwrapkey"
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
