//! End to end, per KMS provider, against its local server (Azure and GCP: the test kit's
//! fakes): keys created under the provider, documents inserted through `EncryptedCollection`,
//! the primary rotated and every document re-encrypted, every key re-wrapped to another
//! provider and back, everything read back — with the KMS taken away in the middle of the
//! rotation and of the rewrap (clear error, nothing lost, resume). See
//! `support/kms_scenario.rs`.

#![cfg(any(
    feature = "aws",
    feature = "vault",
    feature = "kmip",
    feature = "azure",
    feature = "gcp"
))]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

#[path = "support/kms_scenario.rs"]
#[allow(dead_code)]
mod kms_scenario;

use std::net::SocketAddr;
use std::sync::Arc;

use bson::{doc, Document};
use fieldcrypt::kms::KmsOptions;
use fieldcrypt::LocalMasterKey;
use fieldcrypt_testkit::kms::gate::Gate;
use kms_scenario::{end_to_end, quick_retry, Provider};

fn local_entry() -> (Document, String) {
    let key = LocalMasterKey::generate();
    let b64 = key.expose_base64().to_string();
    (doc! { "key": b64.as_str() }, b64)
}

fn gate_to(endpoint: &str) -> Arc<Gate> {
    let hostport = endpoint.rsplit("://").next().unwrap().trim_end_matches('/');
    let addr: SocketAddr = hostport.parse().unwrap();
    Arc::new(Gate::new(addr).unwrap())
}

#[cfg(feature = "aws")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_end_to_end_with_outages() {
    use fieldcrypt_testkit::kms::moto::{Moto, REGION};
    let moto = Moto::shared().unwrap();
    let gate = gate_to(moto.endpoint());
    let creds = moto.credentials();
    let arn = moto.create_key().unwrap();
    let (local, local_secret) = local_entry();
    let p = Provider {
        name: "aws",
        kms_providers: doc! {
            "aws": { "accessKeyId": &creds.access_key_id, "secretAccessKey": &creds.secret_access_key },
            "local": local,
        },
        options: KmsOptions {
            retry: quick_retry(),
            ..KmsOptions::default()
        },
        master_key: doc! {
            "provider": "aws", "region": REGION, "key": &arn,
            "endpoint": format!("http://127.0.0.1:{}", gate.port()),
        },
        gate,
        secrets: vec![creds.secret_access_key.clone(), local_secret],
    };
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

/// TLS options trusting a fake's per-run CA, for `names`.
#[cfg(any(feature = "azure", feature = "gcp"))]
fn trusting(ca: std::path::PathBuf, names: &[&str]) -> KmsOptions {
    let tls = fieldcrypt::kms::TlsOptions {
        ca_file: Some(ca),
        certificate_key_file: None,
    };
    KmsOptions {
        retry: quick_retry(),
        tls: names
            .iter()
            .map(|n| ((*n).to_owned(), tls.clone()))
            .collect(),
    }
}

/// Azure against the test kit's fake Key Vault: the vault behind the gate, the identity
/// platform reached directly (the token is cached; the outage is the vault's).
#[cfg(feature = "azure")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_end_to_end_with_outages() {
    use fieldcrypt_testkit::kms::fake_azure::FakeAzure;
    let fake = FakeAzure::start().unwrap();
    fake.add_key("kek1");
    let gate = gate_to(&fake.endpoint());
    let (local, local_secret) = local_entry();
    let p = Provider {
        name: "azure",
        kms_providers: doc! {
            "azure": {
                "tenantId": fake.tenant_id(),
                "clientId": fake.client_id(),
                "clientSecret": fake.client_secret(),
                "identityPlatformEndpoint": fake.endpoint(),
            },
            "local": local,
        },
        options: trusting(fake.ca().ca_file(), &["azure"]),
        master_key: doc! {
            "provider": "azure",
            "keyVaultEndpoint": format!("127.0.0.1:{}", gate.port()),
            "keyName": "kek1",
        },
        gate,
        secrets: vec![fake.client_secret(), local_secret],
    };
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

/// GCP against the test kit's fake Cloud KMS: the KMS behind the gate, the token endpoint
/// reached directly (the token is cached; the outage is the KMS's).
#[cfg(feature = "gcp")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_end_to_end_with_outages() {
    use fieldcrypt_testkit::kms::fake_gcp::FakeGcp;
    let fake = FakeGcp::start().unwrap();
    fake.add_key("fieldcrypt-test", "global", "ring1", "kek1");
    let gate = gate_to(&fake.endpoint());
    let (local, local_secret) = local_entry();
    let key_b64 = fake.private_key_base64();
    let p = Provider {
        name: "gcp",
        kms_providers: doc! {
            "gcp": {
                "email": fake.email(),
                "privateKey": fake.private_key_pem(),
                "endpoint": fake.endpoint(),
            },
            "local": local,
        },
        options: trusting(fake.ca().ca_file(), &["gcp"]),
        master_key: doc! {
            "provider": "gcp",
            "projectId": "fieldcrypt-test",
            "location": "global",
            "keyRing": "ring1",
            "keyName": "kek1",
            "endpoint": format!("127.0.0.1:{}", gate.port()),
        },
        gate,
        // Pieces of the service account key, as they would show if it leaked.
        secrets: vec![
            key_b64[40..80].to_owned(),
            key_b64[600..640].to_owned(),
            local_secret,
        ],
    };
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

#[cfg(feature = "aws")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_key_a_to_key_b_then_a_second_run_makes_no_kms_call() {
    use fieldcrypt::kms::KmsProviders;
    use fieldcrypt::mongo::{KeyVault, RewrapOutcome};
    use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
    use fieldcrypt_testkit::kms::moto::{Moto, REGION};

    let moto = Moto::shared().unwrap();
    let creds = moto.credentials();
    let (a, b) = (moto.create_key().unwrap(), moto.create_key().unwrap());
    let providers = Arc::new(
        KmsProviders::from_document(&doc! {
            "aws": { "accessKeyId": &creds.access_key_id, "secretAccessKey": &creds.secret_access_key },
        })
        .unwrap(),
    );
    let mk = |key: &str| doc! { "provider": "aws", "region": REGION, "key": key, "endpoint": moto.endpoint() };
    let client = mongodb::Client::with_uri_str(DevServer::shared().unwrap().uri())
        .await
        .unwrap();
    let ns = format!("{}.datakeys", unique_db_name("kms_a_to_b"));
    let vault = KeyVault::with_kms_providers(&client, &providers, &mk(&a))
        .unwrap()
        .namespace(&ns)
        .build()
        .unwrap();
    vault.create_key("x").await.unwrap();
    vault.create_key("y").await.unwrap();
    vault.create_csfle_key(&["z".to_owned()]).await.unwrap();

    let to_b = providers.kek_for(&mk(&b)).unwrap();
    let report = vault.rewrap(to_b.clone()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    assert_eq!(report.rewrapped(), 3, "{report:?}");
    for k in &report.keys {
        assert_eq!(
            (k.from.as_str(), k.to.as_str()),
            (format!("aws {a}").as_str(), format!("aws {b}").as_str())
        );
    }
    // A second run finds every key under B already: no KMS call at all.
    let calls = vault.cache_stats().kms_calls;
    let report = vault.rewrap(to_b).await.unwrap();
    assert!(report
        .keys
        .iter()
        .all(|k| k.outcome == RewrapOutcome::AlreadyThere));
    assert_eq!(vault.cache_stats().kms_calls, calls);
    // Every key unwraps in a vault that writes under B.
    let fresh = KeyVault::with_kms_providers(&client, &providers, &mk(&b))
        .unwrap()
        .namespace(&ns)
        .build()
        .unwrap();
    for info in fresh.list().await.unwrap() {
        assert_eq!(info.master_key.get_str("key").unwrap(), b);
    }
    use fieldcrypt::mongo::KeySource as _;
    fresh
        .prefetch_aliases(&["x".to_owned(), "y".to_owned(), "z".to_owned()])
        .await
        .unwrap();
    assert_eq!(fresh.cache_stats().loads, 3);
}

#[cfg(feature = "vault")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_end_to_end_with_outages() {
    use fieldcrypt_testkit::kms::openbao::{OpenBao, TRANSIT};
    let bao = OpenBao::shared().unwrap();
    let gate = gate_to(bao.addr());
    let key = format!("e2e-{:08x}", rand::random::<u32>());
    bao.create_key(TRANSIT, &key, "aes256-gcm96").unwrap();
    let (local, local_secret) = local_entry();
    let p = Provider {
        name: "vault",
        kms_providers: doc! {
            // The token goes to the configured address only: the gate's.
            "vault": { "endpoint": format!("http://127.0.0.1:{}", gate.port()), "token": bao.root_token() },
            "local": local,
        },
        options: KmsOptions {
            retry: quick_retry(),
            ..KmsOptions::default()
        },
        master_key: doc! { "provider": "vault", "keyName": &key },
        gate,
        secrets: vec![bao.root_token().to_owned(), local_secret],
    };
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

/// The KMIP provider at the test kit's PyKMIP server, over mutual TLS through the gate (the
/// server's certificate names 127.0.0.1, which the gate listens on).
#[cfg(feature = "kmip")]
fn kmip_provider(master_key: Document) -> Provider<'static> {
    use fieldcrypt::kms::TlsOptions;
    use fieldcrypt_testkit::kms::pykmip::PyKmip;
    let server = PyKmip::shared().unwrap();
    let gate = gate_to(server.endpoint());
    let (local, local_secret) = local_entry();
    // A line of the client's private key: it must not appear anywhere.
    let pem = std::fs::read_to_string(server.client_cert_key_file()).unwrap();
    let key_line = pem
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .and_then(|k| k.lines().nth(1))
        .unwrap()
        .to_owned();
    Provider {
        name: "kmip",
        kms_providers: doc! {
            "kmip": { "endpoint": format!("127.0.0.1:{}", gate.port()) },
            "local": local,
        },
        options: KmsOptions {
            retry: quick_retry(),
            tls: [(
                "kmip".to_owned(),
                TlsOptions {
                    ca_file: Some(server.ca_file()),
                    certificate_key_file: Some(server.client_cert_key_file()),
                },
            )]
            .into(),
        },
        master_key,
        gate,
        secrets: vec![local_secret, key_line],
    }
}

#[cfg(feature = "kmip")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_end_to_end_with_outages() {
    let p = kmip_provider(doc! { "provider": "kmip" });
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

#[cfg(feature = "kmip")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmip_delegated_end_to_end_with_outages() {
    let p = kmip_provider(doc! { "provider": "kmip", "delegated": true });
    end_to_end(&p, &doc! { "provider": "local" }).await;
}

/// From one KMS to another: keys made under AWS KMS (moto) move to Vault Transit (OpenBao),
/// and a process configured with Vault alone reads the data.
#[cfg(all(feature = "aws", feature = "vault"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_to_vault_then_vault_alone_reads_everything() {
    use fieldcrypt::kms::KmsProviders;
    use fieldcrypt::mongo::{EncryptedCollection, KeyVault, RewrapOutcome};
    use fieldcrypt::{Field, Schema};
    use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
    use fieldcrypt_testkit::kms::moto::{Moto, REGION};
    use fieldcrypt_testkit::kms::openbao::{OpenBao, TRANSIT};
    use futures_util::TryStreamExt;

    let moto = Moto::shared().unwrap();
    let creds = moto.credentials();
    let arn = moto.create_key().unwrap();
    let bao = OpenBao::shared().unwrap();
    let transit_key = format!("from-aws-{:08x}", rand::random::<u32>());
    bao.create_key(TRANSIT, &transit_key, "aes256-gcm96")
        .unwrap();
    let vault_entry = doc! { "endpoint": bao.addr(), "token": bao.root_token() };
    let both = Arc::new(
        KmsProviders::from_document(&doc! {
            "aws": { "accessKeyId": &creds.access_key_id, "secretAccessKey": &creds.secret_access_key },
            "vault": vault_entry.clone(),
        })
        .unwrap(),
    );
    let aws_key =
        doc! { "provider": "aws", "region": REGION, "key": &arn, "endpoint": moto.endpoint() };
    let vault_key = doc! { "provider": "vault", "keyName": &transit_key };
    let client = mongodb::Client::with_uri_str(DevServer::shared().unwrap().uri())
        .await
        .unwrap();
    let db = client.database(&unique_db_name("kms_aws_to_vault"));
    let ns = format!("{}.datakeys", db.name());
    let schema = Schema::builder()
        .field("ssn", Field::randomized("pii"))
        .build()
        .unwrap();
    let docs: Vec<Document> = (0..30)
        .map(|i| doc! { "_id": i, "ssn": format!("{i:03}-00-0000") })
        .collect();

    let v = Arc::new(
        KeyVault::with_kms_providers(&client, &both, &aws_key)
            .unwrap()
            .namespace(&ns)
            .build()
            .unwrap(),
    );
    v.ensure_alias("pii").await.unwrap();
    v.rotate("pii").await.unwrap();
    let people = db.collection::<Document>("people");
    EncryptedCollection::<Document>::new(people.clone(), v.clone(), schema.clone())
        .insert_many(&docs)
        .await
        .unwrap();
    let report = v.rewrap(both.kek_for(&vault_key).unwrap()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    assert_eq!(report.rewrapped(), 2);
    for k in &report.keys {
        assert_eq!(k.outcome, RewrapOutcome::Rewrapped);
        assert_eq!(
            (k.from.as_str(), k.to.as_str()),
            (
                format!("aws {arn}").as_str(),
                format!("vault transit/{transit_key}").as_str()
            )
        );
    }
    // Vault alone now: no AWS configured at all.
    let vault_only = Arc::new(KmsProviders::from_document(&doc! { "vault": vault_entry }).unwrap());
    let fresh = Arc::new(
        KeyVault::with_kms_providers(&client, &vault_only, &vault_key)
            .unwrap()
            .namespace(&ns)
            .build()
            .unwrap(),
    );
    let read: Vec<Document> = EncryptedCollection::<Document>::new(people, fresh, schema)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read, docs);
}
