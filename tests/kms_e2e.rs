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
