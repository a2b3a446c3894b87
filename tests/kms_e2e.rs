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
