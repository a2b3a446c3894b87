//! The `kmip` KMS provider against a real PyKMIP server that the test kit starts with a PKI of
//! its own (`fieldcrypt_testkit::kms::pykmip`), over mutual TLS: keys round-trip through the
//! key vault in both forms (non-delegated: a 96-byte SecretData fetched with Get and used as a
//! local master key; delegated: the server's Encrypt/Decrypt), both key kinds, the wrapping
//! checked independently with PyKMIP's own client, and every failure the provider reports:
//! tampering, unknown, foreign, pre-active and wrong-length keys, TLS refusals, an unreachable or
//! stopped server. No error or `Debug` output shows a secret.
#![cfg(feature = "kmip")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bson::{doc, Bson, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders, RetryPolicy, TlsOptions};
use fieldcrypt::mongo::{KekProvider, KeySource, KeyVault};
use fieldcrypt::{Error, KeyId, KeyMaterial, Keyring as _, LocalMasterKey};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::kms::pykmip::PyKmip;
use mongodb::{Client, Collection};
use secrecy::ExposeSecret as _;

fn server() -> &'static PyKmip {
    PyKmip::shared().unwrap()
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        timeout: Duration::from_secs(10),
    }
}

fn tls(ca: PathBuf, cert: Option<PathBuf>) -> TlsOptions {
    TlsOptions {
        ca_file: Some(ca),
        certificate_key_file: cert,
    }
}

/// `kmsProviders` with the given entries and TLS options by provider name.
fn providers_with(
    entries: Document,
    tls: Vec<(&str, TlsOptions)>,
) -> fieldcrypt::Result<Arc<KmsProviders>> {
    let options = KmsOptions {
        retry: fast_retry(),
        tls: tls
            .into_iter()
            .map(|(n, t)| (n.to_owned(), t))
            .collect::<BTreeMap<_, _>>(),
    };
    KmsProviders::from_document_with(&entries, &options).map(Arc::new)
}

/// `kmip` at the shared server, as its first client.
fn providers() -> Arc<KmsProviders> {
    let s = server();
    providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() } },
        vec![("kmip", tls(s.ca_file(), Some(s.client_cert_key_file())))],
    )
    .unwrap()
}

async fn setup(prefix: &str) -> (Client, String) {
    let client = Client::with_uri_str(DevServer::shared().unwrap().uri())
        .await
        .unwrap();
    (client, format!("{}.datakeys", unique_db_name(prefix)))
}

fn raw(client: &Client, ns: &str) -> Collection<Document> {
    let (db, coll) = ns.split_once('.').unwrap();
    client.database(db).collection(coll)
}

async fn stored(client: &Client, ns: &str, id: &KeyId) -> Document {
    raw(client, ns)
        .find_one(doc! { "_id": Bson::Binary(id.to_binary()) })
        .await
        .unwrap()
        .unwrap()
}

fn vault(
    client: &Client,
    ns: &str,
    kek: Arc<dyn KekProvider>,
    p: &Arc<KmsProviders>,
) -> Arc<KeyVault> {
    Arc::new(
        KeyVault::builder(client, kek)
            .namespace(ns)
            .kms_providers(p)
            .build()
            .unwrap(),
    )
}

/// A fresh vault that can only unwrap (through `p`), reading key `id`'s material.
async fn material_in_fresh_vault(
    client: &Client,
    ns: &str,
    p: &Arc<KmsProviders>,
    id: &KeyId,
) -> Vec<u8> {
    let v = vault(client, ns, p.unwrapper(), p);
    v.prefetch_ids(&[*id]).await.unwrap();
    v.key(id)
        .unwrap()
        .material()
        .unwrap()
        .expose_secret()
        .to_vec()
}

async fn material(v: &KeyVault, id: &KeyId) -> Vec<u8> {
    v.prefetch_ids(&[*id]).await.unwrap();
    v.key(id)
        .unwrap()
        .material()
        .unwrap()
        .expose_secret()
        .to_vec()
}

fn key_id_of(master_key: &Document) -> String {
    master_key.get_str("keyId").unwrap().to_owned()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// What PyKMIP's own client reads for the SecretData `uid` (hex).
fn secret_of(uid: &str) -> Vec<u8> {
    let out = server()
        .run_client(&format!("print(c.get({uid:?}).value.hex())"))
        .unwrap();
    hex::decode(out.trim()).unwrap()
}

fn assert_kms_error(e: &Error, provider: &str, key: &str, says: &str) {
    match e {
        Error::Kms {
            provider: p,
            reason,
        } => {
            assert_eq!(p, provider, "{e}");
            assert!(reason.contains(&format!("key {key}")), "{e}");
            assert!(reason.contains(says), "{e}");
        }
        other => panic!("expected a KMS error, got {other:?}"),
    }
}

#[tokio::test]
async fn fieldcrypt_keys_round_trip_through_the_key_vault() {
    let (client, ns) = setup("kmip_rt").await;
    let p = providers();
    let kek = p.kek_for(&doc! { "provider": "kmip" }).unwrap();
    let v = vault(&client, &ns, kek, &p);
    let a = v.create_key("pii").await.unwrap();
    let b = v.create_key("other").await.unwrap();
    let doc_a = stored(&client, &ns, &a).await;
    let mk_a = doc_a.get_document("masterKey").unwrap().clone();
    // libmongocrypt's layout: provider, then the keyId of the SecretData registered for it.
    assert_eq!(mk_a.keys().collect::<Vec<_>>(), ["provider", "keyId"]);
    assert_eq!(mk_a.get_str("provider").unwrap(), "kmip");
    // Without a keyId, each key gets its own secret.
    let mk_b = stored(&client, &ns, &b)
        .await
        .get_document("masterKey")
        .unwrap()
        .clone();
    assert_ne!(key_id_of(&mk_a), key_id_of(&mk_b));
    let dek = material(&v, &a).await;
    assert_eq!(dek.len(), 32);
    assert_eq!(material_in_fresh_vault(&client, &ns, &p, &a).await, dek);
    // A masterKey naming an existing secret wraps under it, registering nothing new.
    let same = p.kek_for(&mk_a).unwrap();
    let v2 = vault(&client, &ns, same, &p);
    let c = v2.create_key("third").await.unwrap();
    let mk_c = stored(&client, &ns, &c)
        .await
        .get_document("masterKey")
        .unwrap()
        .clone();
    assert_eq!(mk_c, mk_a);
    assert_eq!(
        material_in_fresh_vault(&client, &ns, &p, &c).await,
        material(&v2, &c).await
    );
}

#[tokio::test]
async fn csfle_keys_are_wrapped_as_libmongocrypt_does() {
    let (client, ns) = setup("kmip_csfle").await;
    let p = providers();
    let v = vault(
        &client,
        &ns,
        p.kek_for(&doc! { "provider": "kmip" }).unwrap(),
        &p,
    );
    let id = v
        .create_csfle_key(&["kmip-csfle".to_owned()])
        .await
        .unwrap();
    let doc = stored(&client, &ns, &id).await;
    let mk = doc.get_document("masterKey").unwrap();
    let wrapped = doc.get_binary_generic("keyMaterial").unwrap().clone();
    // IV, 96 bytes and a padding block, tag: the local provider's wrapping.
    assert_eq!(wrapped.len(), 160);
    // The secret as PyKMIP's own client reads it is a local master key that unwraps the key:
    // exactly what libmongocrypt does with it.
    let secret = secret_of(&key_id_of(mk));
    assert_eq!(secret.len(), 96);
    let by_secret = LocalMasterKey::from_bytes(&secret)
        .unwrap()
        .unwrap(&wrapped)
        .unwrap();
    let dek = material(&v, &id).await;
    assert_eq!(dek.len(), 96);
    assert_eq!(by_secret.expose_secret()[..], dek[..]);
    assert_eq!(material_in_fresh_vault(&client, &ns, &p, &id).await, dek);
}

#[tokio::test]
async fn delegated_keys_round_trip_and_the_server_decrypts_them() {
    let (client, ns) = setup("kmip_deleg").await;
    let p = providers();
    let v = vault(
        &client,
        &ns,
        p.kek_for(&doc! { "provider": "kmip", "delegated": true })
            .unwrap(),
        &p,
    );
    let csfle = v
        .create_csfle_key(&["kmip-delegated".to_owned()])
        .await
        .unwrap();
    let own = v.create_key("pii").await.unwrap();
    for (id, len) in [(csfle, 96), (own, 32)] {
        let doc = stored(&client, &ns, &id).await;
        let mk = doc.get_document("masterKey").unwrap();
        assert_eq!(
            mk.keys().collect::<Vec<_>>(),
            ["provider", "delegated", "keyId"]
        );
        assert!(mk.get_bool("delegated").unwrap());
        let dek = material(&v, &id).await;
        assert_eq!(dek.len(), len);
        assert_eq!(material_in_fresh_vault(&client, &ns, &p, &id).await, dek);
    }
    // A CSFLE key is libmongocrypt's IV ‖ AES-CBC ciphertext, which the server decrypts.
    let doc = stored(&client, &ns, &csfle).await;
    let wrapped = doc.get_binary_generic("keyMaterial").unwrap().clone();
    assert_eq!(wrapped.len(), 16 + 112);
    let uid = key_id_of(doc.get_document("masterKey").unwrap());
    let out = server()
        .run_client(&format!(
            "print(c.decrypt(bytes.fromhex({:?}), uid={uid:?}, cryptographic_parameters={{\
             'block_cipher_mode': enums.BlockCipherMode.CBC, \
             'padding_method': enums.PaddingMethod.PKCS5, \
             'cryptographic_algorithm': enums.CryptographicAlgorithm.AES}}, \
             iv_counter_nonce=bytes.fromhex({:?})).hex())",
            hex::encode(&wrapped[16..]),
            hex::encode(&wrapped[..16])
        ))
        .unwrap();
    assert_eq!(hex::decode(out.trim()).unwrap(), material(&v, &csfle).await);
    // A fieldcrypt key carries its associated-data tag after the ciphertext.
    let doc = stored(&client, &ns, &own).await;
    assert_eq!(
        doc.get_binary_generic("keyMaterial").unwrap().len(),
        16 + 48 + 32
    );
}

#[test]
fn fail_tampered_material_and_other_associated_data() {
    let p = providers();
    for mk in [
        doc! { "provider": "kmip" },
        doc! { "provider": "kmip", "delegated": true },
    ] {
        let kek = p.kek_for(&mk).unwrap();
        for (len, ad) in [(32, &b"key A"[..]), (96, &b""[..])] {
            let dek = KeyMaterial::generate(len);
            let (stored_mk, wrapped) = block_on(kek.wrap_with_ad(&dek, ad)).unwrap();
            let back = block_on(kek.unwrap_with_ad(&stored_mk, &wrapped, ad)).unwrap();
            assert_eq!(back.expose_secret(), dek.expose_secret());
            let delegated_csfle = stored_mk.contains_key("delegated") && ad.is_empty();
            // Every byte flipped: an error, never other key material. (The delegated CSFLE
            // form is libmongocrypt's unauthenticated AES-CBC: only its padding is checked, by
            // the server; flipping the penultimate block's last byte breaks it for sure.)
            let positions: Vec<usize> = if delegated_csfle {
                vec![wrapped.len() - 17]
            } else {
                (0..wrapped.len())
                    .step_by(7)
                    .chain([wrapped.len() - 1])
                    .collect()
            };
            for i in positions {
                let mut bad = wrapped.clone();
                bad[i] ^= 0x01;
                match block_on(kek.unwrap_with_ad(&stored_mk, &bad, ad)) {
                    Err(Error::Decrypt) => {}
                    other => panic!("{stored_mk} byte {i}: {other:?}"),
                }
            }
            // Truncated and empty material.
            for bad in [&wrapped[..wrapped.len() - 1], &wrapped[..16], &[][..]] {
                assert!(
                    matches!(
                        block_on(kek.unwrap_with_ad(&stored_mk, bad, ad)),
                        Err(Error::Decrypt | Error::MalformedCiphertext(_))
                    ),
                    "{stored_mk}: {} bytes",
                    bad.len()
                );
            }
            if !ad.is_empty() {
                for other in [&b"key B"[..], b"", b"key A\0"] {
                    match block_on(kek.unwrap_with_ad(&stored_mk, &wrapped, other)) {
                        Err(Error::Decrypt) => {}
                        // Delegated, empty associated data reads the material as a CSFLE
                        // key: libmongocrypt's unauthenticated AES-CBC, whose padding alone
                        // the server checks. About one time in 256 the padding of what is
                        // not a CSFLE key passes, and the result is other bytes: never the
                        // data key (which the tag binds to "key A").
                        Ok(k) if stored_mk.contains_key("delegated") && other.is_empty() => {
                            // Not assert_ne!: its message would print both keys' bytes.
                            assert!(k.expose_secret() != dek.expose_secret(), "{stored_mk}");
                        }
                        r => panic!("{stored_mk} under {other:?}: {r:?}"),
                    }
                }
            }
        }
    }
}

#[test]
fn fail_unknown_foreign_inactive_and_wrong_length_keys() {
    let s = server();
    let p = providers();
    let dek = KeyMaterial::generate(96);
    // Unknown id, both forms, both ways.
    for delegated in [false, true] {
        let mk = doc! { "provider": "kmip", "keyId": "no-such-key-4242", "delegated": delegated };
        let kek = p.kek_for(&mk).unwrap();
        let e = block_on(kek.wrap_with_ad(&dek, &[])).unwrap_err();
        assert_kms_error(&e, "kmip", "no-such-key-4242", "Item Not Found");
        let e = block_on(kek.unwrap_with_ad(&mk, &[0; 160], &[])).unwrap_err();
        assert_kms_error(&e, "kmip", "no-such-key-4242", "refused");
    }
    // A secret another client registered: that identity's, not ours.
    let second = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() } },
        vec![(
            "kmip",
            tls(s.ca_file(), Some(s.second_client_cert_key_file())),
        )],
    )
    .unwrap();
    let (theirs, wrapped) = block_on(
        second
            .kek_for(&doc! { "provider": "kmip" })
            .unwrap()
            .wrap_with_ad(&dek, &[]),
    )
    .unwrap();
    let e = block_on(p.unwrapper().unwrap_with_ad(&theirs, &wrapped, &[])).unwrap_err();
    assert_kms_error(&e, "kmip", &key_id_of(&theirs), "refused");
    // A secret of 32 bytes (not one libmongocrypt or fieldcrypt registers).
    let short = s
        .run_client(
            "uid = c.register(objects.SecretData(b'\\x07' * 32, enums.SecretDataType.SEED, masks=[]))\n\
             c.activate(uid)\nprint(uid)",
        )
        .unwrap();
    let short = short.trim();
    let e = block_on(
        p.kek_for(&doc! { "provider": "kmip", "keyId": short })
            .unwrap()
            .wrap_with_ad(&dek, &[]),
    )
    .unwrap_err();
    assert_kms_error(&e, "kmip", short, "the KMIP secret is 32 bytes");
    // An AES key left pre-active: the server refuses to encrypt with it.
    let inactive = s
        .run_client(
            "print(c.create(enums.CryptographicAlgorithm.AES, 256, cryptographic_usage_mask=\
             [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT]))",
        )
        .unwrap();
    let inactive = inactive.trim();
    let mk = doc! { "provider": "kmip", "delegated": true, "keyId": inactive };
    let e = block_on(p.kek_for(&mk).unwrap().wrap_with_ad(&dek, &[])).unwrap_err();
    assert_kms_error(&e, "kmip", inactive, "KMIP Encrypt refused");
    // The same key id without `delegated`: not a SecretData.
    let e = block_on(
        p.kek_for(&doc! { "provider": "kmip", "keyId": inactive })
            .unwrap()
            .wrap_with_ad(&dek, &[]),
    )
    .unwrap_err();
    assert_kms_error(&e, "kmip", inactive, "not a SecretData");
    // A destroyed secret.
    let (mk, wrapped) = block_on(
        p.kek_for(&doc! { "provider": "kmip" })
            .unwrap()
            .wrap_with_ad(&dek, &[]),
    )
    .unwrap();
    let uid = key_id_of(&mk);
    s.run_client(&format!(
        "c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, {uid:?})\nc.destroy({uid:?})"
    ))
    .unwrap();
    let e = block_on(p.unwrapper().unwrap_with_ad(&mk, &wrapped, &[])).unwrap_err();
    assert_kms_error(&e, "kmip", &uid, "refused");
}

#[test]
fn fail_unreachable_server_after_bounded_retries() {
    let port = fieldcrypt_testkit::service::free_port().unwrap();
    let s = server();
    let p = providers_with(
        doc! { "kmip": { "endpoint": format!("127.0.0.1:{port}") } },
        vec![("kmip", tls(s.ca_file(), Some(s.client_cert_key_file())))],
    )
    .unwrap();
    let kek = p
        .kek_for(&doc! { "provider": "kmip", "keyId": "12" })
        .unwrap();
    let started = Instant::now();
    let e = block_on(kek.wrap_with_ad(&KeyMaterial::generate(32), b"ad")).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_kms_error(&e, "kmip", "12", "after 3 attempts");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn stopped_server_then_restarted_on_the_same_database() {
    let s = PyKmip::start().unwrap();
    let p = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() } },
        vec![("kmip", tls(s.ca_file(), Some(s.client_cert_key_file())))],
    )
    .unwrap();
    let kek = p.kek_for(&doc! { "provider": "kmip" }).unwrap();
    let dek = KeyMaterial::generate(96);
    let (mk, wrapped) = block_on(kek.wrap_with_ad(&dek, &[])).unwrap();
    s.stop();
    let e = block_on(p.unwrapper().unwrap_with_ad(&mk, &wrapped, &[])).unwrap_err();
    assert_kms_error(&e, "kmip", &key_id_of(&mk), "after 3 attempts");
    s.restart().unwrap();
    let back = block_on(p.unwrapper().unwrap_with_ad(&mk, &wrapped, &[])).unwrap();
    assert_eq!(back.expose_secret(), dek.expose_secret());
}

#[test]
fn fail_mutual_tls_refusals() {
    let s = server();
    let dek = KeyMaterial::generate(32);
    let mk = doc! { "provider": "kmip", "keyId": "1" };
    let attempt = |t: TlsOptions| {
        let p = providers_with(
            doc! { "kmip": { "endpoint": s.endpoint() } },
            vec![("kmip", t)],
        )
        .unwrap();
        let started = Instant::now();
        let e = block_on(p.kek_for(&mk).unwrap().wrap_with_ad(&dek, b"ad")).unwrap_err();
        // Refused at once: TLS failures are not retried.
        assert!(started.elapsed() < Duration::from_secs(5));
        e
    };
    // No client certificate: the server ends the handshake, and the error says what is missing.
    let e = attempt(tls(s.ca_file(), None));
    assert_kms_error(&e, "kmip", "1", "TLS with KMIP server");
    assert!(
        e.to_string()
            .contains("set tlsOptions.kmip.tlsCertificateKeyFile"),
        "{e}"
    );
    // A server certificate from a CA we do not trust.
    let e = attempt(tls(s.untrusted_ca_file(), Some(s.client_cert_key_file())));
    assert_kms_error(&e, "kmip", "1", "invalid peer certificate");
    // Without tlsCAFile the test CA is not among the Mozilla roots either.
    let e = attempt(TlsOptions {
        ca_file: None,
        certificate_key_file: Some(s.client_cert_key_file()),
    });
    assert_kms_error(&e, "kmip", "1", "invalid peer certificate");
    // A client certificate the server does not trust.
    let e = attempt(tls(s.ca_file(), Some(s.untrusted_client_cert_key_file())));
    assert_kms_error(&e, "kmip", "1", "TLS with KMIP server");
    // Unreadable TLS files fail at configuration, naming the file.
    let e = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() } },
        vec![("kmip", tls(PathBuf::from("/nonexistent/ca.pem"), None))],
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

#[tokio::test]
async fn no_secret_in_errors_or_debug() {
    let s = server();
    let p = providers();
    let kek = p.kek_for(&doc! { "provider": "kmip" }).unwrap();
    let dek = KeyMaterial::generate(96);
    let (mk, wrapped) = kek.wrap_with_ad(&dek, &[]).await.unwrap();
    let secret = secret_of(&key_id_of(&mk));
    let client_pem = std::fs::read_to_string(s.client_cert_key_file()).unwrap();
    let key_pem = client_pem
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    let mut bad = wrapped.clone();
    bad[40] ^= 1;
    let no_cert = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() } },
        vec![("kmip", tls(s.ca_file(), None))],
    )
    .unwrap();
    let errors = [
        kek.unwrap_with_ad(&mk, &bad, &[]).await.unwrap_err(),
        kek.unwrap_with_ad(&mk, &wrapped, b"other")
            .await
            .unwrap_err(),
        p.kek_for(&doc! { "provider": "kmip", "keyId": "nope" })
            .unwrap()
            .wrap_with_ad(&dek, &[])
            .await
            .unwrap_err(),
        no_cert
            .kek_for(&mk)
            .unwrap()
            .wrap_with_ad(&dek, &[])
            .await
            .unwrap_err(),
    ];
    let mut texts: Vec<String> = errors
        .iter()
        .flat_map(|e| [format!("{e}"), format!("{e:?}")])
        .collect();
    // The providers and a vault using them (the provider's own Debug is checked in its unit
    // tests: name, endpoint and whether a client certificate is set).
    texts.push(format!("{p:?}"));
    let (client, ns) = setup("kmip_leak").await;
    let v = vault(&client, &ns, kek.clone(), &p);
    v.create_key("pii").await.unwrap();
    texts.push(format!("{v:?}"));
    let forbidden = [
        hex::encode(&secret),
        hex::encode(dek.expose_secret()),
        format!("{:?}", &secret[..8]),
        format!("{:?}", &dek.expose_secret()[..8]),
        key_pem,
    ];
    for t in &texts {
        for f in &forbidden {
            assert!(!t.contains(f.as_str()), "{t} shows a secret");
        }
    }
}

#[test]
fn master_key_validation_errors() {
    let p = providers();
    for (bad, says) in [
        (
            doc! { "provider": "kmip", "keyId": 1 },
            "keyId must be a string",
        ),
        (
            doc! { "provider": "kmip", "delegated": 1 },
            "delegated must be a boolean",
        ),
        (
            doc! { "provider": "kmip", "endpoint": "https://h:1" },
            "no scheme",
        ),
        (
            doc! { "provider": "kmip", "region": "x" },
            "unknown field \"region\"",
        ),
    ] {
        let e = p.kek_for(&bad).err().unwrap();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains(says)),
            "{bad}: {e}"
        );
    }
    for (entry, says) in [
        (doc! { "kmip": { "endpoint": 5696 } }, "must be a string"),
        (
            doc! { "kmip": { "endpoint": "h", "key": "x" } },
            "no field \"key\"",
        ),
        (doc! { "kmip": { "endpoint": "h:99999" } }, "port"),
    ] {
        let e = providers_with(entry.clone(), vec![]).err().unwrap();
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains(says)),
            "{entry}: {e}"
        );
    }
}

#[test]
fn named_providers_and_an_endpoint_in_the_master_key() {
    let s = server();
    let tls_options = || {
        vec![
            ("kmip", tls(s.ca_file(), Some(s.client_cert_key_file()))),
            (
                "kmip:other",
                tls(s.ca_file(), Some(s.second_client_cert_key_file())),
            ),
        ]
    };
    // "kmip:other" connects as the second client. Its entry is empty: new keys need the
    // endpoint in their masterKey (KMIP has no credentials in the entry and no standard
    // environment).
    let p = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() }, "kmip:other": {} },
        tls_options(),
    )
    .unwrap();
    let dek = KeyMaterial::generate(32);
    let e = block_on(
        p.kek_for(&doc! { "provider": "kmip:other" })
            .unwrap()
            .wrap_with_ad(&dek, b"ad"),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("set kmsProviders.kmip:other.endpoint or masterKey.endpoint"),
        "{e}"
    );
    let other = p
        .kek_for(&doc! { "provider": "kmip:other", "endpoint": s.endpoint() })
        .unwrap();
    assert_eq!(other.provider(), "kmip:other");
    let (mk, wrapped) = block_on(other.wrap_with_ad(&dek, b"ad")).unwrap();
    assert_eq!(
        mk.keys().collect::<Vec<_>>(),
        ["provider", "endpoint", "keyId"]
    );
    assert_eq!(mk.get_str("provider").unwrap(), "kmip:other");
    // A stored masterKey is written by whoever can write the key vault: its endpoint is only
    // followed when it is the configured server, so this one does not unwrap here...
    let e = block_on(p.unwrapper().unwrap_with_ad(&mk, &wrapped, b"ad")).unwrap_err();
    assert_kms_error(
        &e,
        "kmip:other",
        &key_id_of(&mk),
        "set kmsProviders.kmip:other.endpoint",
    );
    // ...and does once kmsProviders names the same server.
    let p = providers_with(
        doc! { "kmip": { "endpoint": s.endpoint() }, "kmip:other": { "endpoint": s.endpoint() } },
        tls_options(),
    )
    .unwrap();
    let (mk2, wrapped2) = block_on(
        p.kek_for(&doc! { "provider": "kmip" })
            .unwrap()
            .wrap_with_ad(&dek, b"ad"),
    )
    .unwrap();
    let unwrapper = p.unwrapper();
    for (m, w) in [(&mk, &wrapped), (&mk2, &wrapped2)] {
        let back = block_on(unwrapper.unwrap_with_ad(m, w, b"ad")).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
    }
    // A key document pointing elsewhere is refused before any connection.
    let mut redirected = mk2.clone();
    redirected.insert("endpoint", "127.0.0.1:1");
    let e = block_on(unwrapper.unwrap_with_ad(&redirected, &wrapped2, b"ad")).unwrap_err();
    assert_kms_error(
        &e,
        "kmip",
        &key_id_of(&mk2),
        "is not kmsProviders.kmip.endpoint",
    );
    // The second identity's secret is not readable as the first: the masterKey's provider
    // name picks the identity.
    let mut as_first = mk.clone();
    as_first.remove("endpoint");
    as_first.insert("provider", "kmip");
    let e = block_on(unwrapper.unwrap_with_ad(&as_first, &wrapped, b"ad")).unwrap_err();
    assert_kms_error(&e, "kmip", &key_id_of(&mk), "refused");
}

/// Runs `tests/fixtures/kmip/interop.py` (libmongocrypt through pymongocrypt) against the
/// shared server as its first client.
fn libmongocrypt(mode: &str, input: &serde_json::Value) -> serde_json::Value {
    use std::io::Write as _;
    let s = server();
    let python = DevServer::python_env().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kmip/interop.py"
    );
    let mut child = std::process::Command::new(python)
        .arg(script)
        .arg(s.endpoint())
        .arg(s.ca_file())
        .arg(s.client_cert_key_file())
        .arg(mode)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "interop.py {mode}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_tail().join("\n")
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn extjson_to_bson(v: &serde_json::Value) -> Bson {
    Bson::try_from(v.clone()).unwrap()
}

#[tokio::test]
async fn libmongocrypt_and_fieldcrypt_read_each_others_keys() {
    use fieldcrypt::{Context, Cryptor, CsfleAlgorithm, CsfleDataKey};
    let p = providers();
    let master_keys = [
        doc! { "provider": "kmip" },
        doc! { "provider": "kmip", "delegated": true },
    ];
    // libmongocrypt creates keys under the server (Register/Activate/Get, or Create/Activate/
    // Encrypt) and encrypts with them; fieldcrypt's vault unwraps them and decrypts.
    let input = serde_json::Value::Array(
        master_keys
            .iter()
            .map(|m| Bson::Document(m.clone()).into_canonical_extjson())
            .collect(),
    );
    let out = libmongocrypt("create", &input);
    let (client, ns) = setup("kmip_interop").await;
    let mut ids = Vec::new();
    for (k, mk) in out["keys"].as_array().unwrap().iter().zip(&master_keys) {
        let Bson::Document(key) = extjson_to_bson(k) else {
            panic!("not a key document")
        };
        // libmongocrypt's masterKey is the one fieldcrypt writes: same fields, same order.
        let stored_mk = key.get_document("masterKey").unwrap();
        let mut ours = mk.clone();
        ours.insert("keyId", key_id_of(stored_mk));
        assert_eq!(stored_mk, &ours);
        assert_eq!(
            stored_mk.keys().collect::<Vec<_>>(),
            ours.keys().collect::<Vec<_>>()
        );
        match key.get("_id") {
            Some(Bson::Binary(b)) => ids.push(KeyId::from(b.to_uuid().unwrap())),
            other => panic!("_id {other:?}"),
        }
        raw(&client, &ns).insert_one(key).await.unwrap();
    }
    let v = vault(&client, &ns, p.unwrapper(), &p);
    v.prefetch_ids(&ids).await.unwrap();
    let reader = Cryptor::decrypt_only(v.clone());
    let values = out["values"].as_array().unwrap();
    assert_eq!(values.len(), 2);
    for value in values {
        let encrypted = extjson_to_bson(&value["encrypted"]);
        let plain = value["plain"].as_str().unwrap();
        let back = reader
            .decrypt_document(&doc! { "v": encrypted }, &Context::none())
            .unwrap();
        assert_eq!(back.get_str("v").unwrap(), plain);
    }

    // fieldcrypt creates keys under the server and encrypts with them; libmongocrypt unwraps
    // them (Get, or Decrypt) and decrypts.
    let mut keys = Vec::new();
    let mut encrypted = Vec::new();
    let mut plains = Vec::new();
    for (i, mk) in master_keys.iter().enumerate() {
        let w = vault(&client, &ns, p.kek_for(mk).unwrap(), &p);
        let id = w
            .create_csfle_key(&[format!("fieldcrypt-kmip-{i}")])
            .await
            .unwrap();
        let doc = stored(&client, &ns, &id).await;
        keys.push(Bson::Document(doc).into_canonical_extjson());
        let m: [u8; 96] = material(&w, &id).await.try_into().unwrap();
        let key =
            CsfleDataKey::from_material(id, secrecy::SecretBox::new(Box::new(m)), vec![]).unwrap();
        let plain = format!("fieldcrypt wrote this under {mk}");
        let ct = key
            .encrypt_value(CsfleAlgorithm::Deterministic, &Bson::String(plain.clone()))
            .unwrap();
        encrypted.push(Bson::Binary(ct).into_canonical_extjson());
        plains.push(plain);
    }
    let out = libmongocrypt(
        "decrypt",
        &serde_json::json!({ "keys": keys, "values": encrypted }),
    );
    let back: Vec<&str> = out["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(back, plains);
}
