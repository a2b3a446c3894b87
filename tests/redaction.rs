//! Nothing that holds a secret prints it: every such type is formatted with `{:?}` (and `{}`
//! where it has Display) and checked for the key bytes in raw, hex and base64 form, and for
//! plaintext values in errors.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bson::doc;
use fieldcrypt::{
    Context, Cryptor, Error, Field, InMemoryKeyring, Key, KeyId, KeyKind, KeyMaterial, KeyState,
    Keyring, LocalMasterKey, Schema,
};

/// Every printable encoding of `secret` that a leak could take.
fn encodings(secret: &[u8]) -> Vec<String> {
    let mut v = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        format!("{secret:?}"),
    ];
    if let Ok(s) = std::str::from_utf8(secret) {
        v.push(s.to_owned());
    }
    v
}

fn assert_clean(printed: &str, secret: &[u8], what: &str) {
    for enc in encodings(secret) {
        // Short fragments could match by chance; the encodings of 32+ bytes cannot.
        assert!(!printed.contains(&enc), "{what} leaks a secret: {printed}");
    }
}

#[test]
fn key_types_print_no_material() {
    let material = [0x5Au8; 32];
    let key = Key::from_material(
        KeyId::random(),
        "pii",
        KeyKind::Fieldcrypt,
        KeyState::Primary,
        KeyMaterial::from_slice(&material),
        0,
    )
    .unwrap();
    let ring = InMemoryKeyring::new();
    ring.insert(key.clone());
    let ring = Arc::new(ring);
    let printed = [
        format!("{key:?}"),
        format!("{:?}", KeyMaterial::from_slice(&material)),
        format!("{ring:?}"),
        format!("{:?}", ring.primary("pii").unwrap()),
        format!("{:?}", Cryptor::new(ring.clone(), Schema::empty())),
    ];
    for p in &printed {
        assert_clean(p, &material, "a key type");
    }
    assert!(printed[1].contains("REDACTED"));
}

#[test]
fn local_master_key_prints_nothing_secret() {
    let mk = LocalMasterKey::generate();
    let bytes = STANDARD.decode(mk.expose_base64().as_bytes()).unwrap();
    assert_eq!(bytes.len(), 96);
    assert_clean(&format!("{mk:?}"), &bytes, "LocalMasterKey");
}

#[test]
fn errors_carry_no_plaintext_or_key_bytes() {
    let ring = InMemoryKeyring::new();
    ring.generate("pii");
    let material = ring
        .primary("pii")
        .unwrap()
        .material()
        .unwrap()
        .expose_secret()
        .to_vec();
    let ring = Arc::new(ring);
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .field("email", Field::deterministic("pii"))
        .build()
        .unwrap();
    let c = Cryptor::new(ring.clone(), schema);
    let plaintext = "PLAINTEXT-SSN-123-45-6789";
    let enc = c
        .encrypt_document(
            &doc! { "ssn": plaintext, "email": plaintext },
            &Context::namespace("a.b"),
        )
        .unwrap();
    let mut errors: Vec<Error> = Vec::new();
    // Wrong namespace (auth failure), missing namespace, tampering, unknown key, query refusal.
    errors.push(
        c.decrypt_document(&enc, &Context::namespace("a.c"))
            .unwrap_err(),
    );
    errors.push(c.decrypt_document(&enc, &Context::none()).unwrap_err());
    let Some(bson::Bson::Binary(b)) = enc.get("ssn") else {
        panic!()
    };
    let mut tampered = b.clone();
    let last = tampered.bytes.len() - 1;
    tampered.bytes[last] ^= 1;
    errors.push(
        c.decrypt_document(&doc! { "ssn": tampered }, &Context::namespace("a.b"))
            .unwrap_err(),
    );
    errors.push(
        Cryptor::decrypt_only(InMemoryKeyring::new())
            .decrypt_document(&enc, &Context::namespace("a.b"))
            .unwrap_err(),
    );
    errors.push(
        c.query_ciphertexts("ssn", &plaintext.into(), &Context::none(), None)
            .unwrap_err(),
    );
    errors.push(
        InMemoryKeyring::from_keyset_json(&ring.to_keyset_json().replace("primary", "bogus"))
            .unwrap_err(),
    );
    for e in &errors {
        for printed in [format!("{e}"), format!("{e:?}")] {
            assert!(
                !printed.contains(plaintext),
                "error leaks plaintext: {printed}"
            );
            assert_clean(&printed, &material, "an error");
        }
    }
    // The decryption failure is one opaque error.
    assert!(matches!(errors[0], Error::Decrypt));
    assert!(matches!(errors[2], Error::Decrypt));
}

#[tokio::test]
async fn driver_errors_lose_the_details_that_quote_documents() {
    use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
    let server = DevServer::shared().unwrap();
    let client = mongodb::Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("redaction"));
    db.create_collection("c")
        .validator(doc! { "$jsonSchema": { "properties": { "ssn": { "bsonType": "binData" } } } })
        .await
        .unwrap();
    let plaintext = "PLAINTEXT-SSN-987-65-4321";
    let err = db
        .collection::<bson::Document>("c")
        .insert_one(doc! { "ssn": plaintext })
        .await
        .unwrap_err();
    // The driver's own rendering carries the server's errInfo, which quotes the value.
    assert!(
        format!("{err:?}").contains(plaintext),
        "the server sent no details: {err:?}"
    );
    let ours = Error::from(err);
    let shown = ours.to_string();
    assert!(shown.contains("121"), "{shown}");
    assert!(!shown.contains(plaintext), "{shown}");
    // Debug (what `unwrap` and `main` print) and the error chain are redacted too.
    let debug = format!("{ours:?}");
    assert!(
        debug.contains("121") && !debug.contains(plaintext),
        "{debug}"
    );
    assert!(std::error::Error::source(&ours).is_none());
    db.drop().await.unwrap();
}

#[tokio::test]
async fn duplicate_key_errors_do_not_quote_the_indexed_values() {
    use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
    let server = DevServer::shared().unwrap();
    let client = mongodb::Client::with_uri_str(server.uri()).await.unwrap();
    let db = client.database(&unique_db_name("redaction"));
    let coll = db.collection::<bson::Document>("c");
    let id = "alice-DUPKEY-4411@example.com";
    coll.insert_one(doc! { "_id": id }).await.unwrap();
    let single = coll.insert_one(doc! { "_id": id }).await.unwrap_err();
    let bulk = coll
        .insert_many([doc! { "_id": "bob@example.com" }, doc! { "_id": id }])
        .await
        .unwrap_err();
    for err in [single, bulk] {
        // The server's message ends with `dup key: { _id: "alice…" }`.
        assert!(format!("{err}").contains(id), "no value to redact: {err}");
        let ours = Error::from(err);
        let shown = ours.to_string();
        assert!(shown.contains("11000"), "{shown}");
        assert!(shown.contains("dup key: { [REDACTED] }"), "{shown}");
        assert!(!shown.contains(id), "{shown}");
        let debug = format!("{ours:?}");
        assert!(!debug.contains(id), "{debug}");
    }
    db.drop().await.unwrap();
}

#[test]
fn bulk_write_models_print_no_documents_or_filters() {
    use fieldcrypt::mongo::WriteModel;
    let secret = "123-45-6789-plaintext";
    let models = [
        WriteModel::insert_one(doc! { "ssn": secret }),
        WriteModel::replace_one(doc! { "ssn": secret }, doc! { "ssn": secret }),
        WriteModel::update_one(doc! { "ssn": secret }, doc! { "$set": { "ssn": secret } }),
        WriteModel::delete_one(doc! { "ssn": secret }),
        WriteModel::delete_many(doc! { "ssn": secret }),
    ];
    for m in &models {
        let printed = format!("{m:?}");
        assert!(!printed.contains(secret), "WriteModel leaks: {printed}");
        assert!(!printed.is_empty());
    }
}

/// Every KMS provider's credentials — AWS secret keys and session tokens, Vault tokens, Azure
/// client secrets and access tokens, GCP access tokens, local master keys — stay out of the
/// configuration's `Debug`, and out of the errors of configurations that are refused.
#[cfg(feature = "kms")]
#[test]
fn kms_provider_configurations_print_no_credentials() {
    use fieldcrypt::kms::KmsProviders;

    let local = LocalMasterKey::generate();
    let b64 = local.expose_base64();
    let secrets: Vec<String> = [
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYsecret",
        "FwoGZXIvYXdzEBYaDHsessiontokenAWSsecretvalue12",
        "hvs.CAESIvaultTOKENsecretvalue0123456789abcdef",
        "azureCLIENTsecret~value.0123456789abcdefghijkl",
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.azureaccess",
        "ya29.gcpACCESStokenSECRETvalue0123456789abcdefg",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain([b64.to_string()])
    .collect();
    #[allow(unused_mut)]
    let mut doc = doc! { "local": { "key": &secrets[6] } };
    #[cfg(feature = "aws")]
    doc.insert(
        "aws",
        doc! { "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": &secrets[0], "sessionToken": &secrets[1] },
    );
    #[cfg(feature = "vault")]
    doc.insert(
        "vault",
        doc! { "endpoint": "https://vault.example:8200", "token": &secrets[2] },
    );
    #[cfg(feature = "azure")]
    {
        doc.insert(
            "azure",
            doc! { "tenantId": "t", "clientId": "c", "clientSecret": &secrets[3] },
        );
        doc.insert("azure:token", doc! { "accessToken": &secrets[4] });
    }
    #[cfg(feature = "gcp")]
    doc.insert("gcp", doc! { "accessToken": &secrets[5] });
    let providers = KmsProviders::from_document(&doc).unwrap();
    let printed = format!("{providers:?}");
    for s in &secrets {
        assert_clean(&printed, s.as_bytes(), "KmsProviders");
    }
    // Refused configurations name the field, never its value.
    let mut bad = Vec::new();
    for (name, entry) in &doc {
        let mut broken = entry.as_document().unwrap().clone();
        broken.insert("unexpected", "x");
        bad.push(doc! { name: broken });
    }
    bad.push(doc! { "local": { "key": &secrets[0] } });
    for d in &bad {
        let e = KmsProviders::from_document(d).expect_err("an unknown field is refused");
        for s in &secrets {
            assert_clean(&format!("{e} {e:?}"), s.as_bytes(), "a configuration error");
        }
    }
}
