//! The end-to-end scenario every KMS provider goes through (tests/kms_e2e.rs), against its
//! real local server (or, for Azure and GCP, the test kit's fakes), reached through a
//! [`Gate`] so that the test can take the KMS away mid-run:
//!
//! 1. keys created under the provider's master key; documents inserted through
//!    `EncryptedCollection` (randomized and deterministic fields, two aliases);
//! 2. the primary rotated and every document re-encrypted by the rotation engine, with the KMS
//!    taken away after the first batch: the run stops with a clear error naming the provider,
//!    nothing of the failed batch is written, and `resume` finishes once the KMS is back;
//! 3. every key re-wrapped to another provider (`to`), with the KMS taken away half-way: the
//!    rewrap stops at a key, every key stays readable, and running it again resumes;
//! 4. a fresh process reads everything back, with one KMS call per data key, not per document.

use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document};
use fieldcrypt::kms::{KmsOptions, KmsProviders, RetryPolicy};
use fieldcrypt::mongo::{EncryptedCollection, KekProvider, KeySource, KeyVault, RewrapOutcome};
use fieldcrypt::rotation::{Flow, Phase, RotationOptions, Rotator, Target};
use fieldcrypt::{Error, Field, KeyMaterial, Schema};
use fieldcrypt_testkit::devserver::unique_db_name;
use fieldcrypt_testkit::fixtures::{log_capture, recording_client, Sent};
use fieldcrypt_testkit::kms::gate::Gate;
use futures_util::TryStreamExt;
use mongodb::{Client, Database};

/// A retry policy that gives up quickly, so that an outage is noticed in a second.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(50),
        timeout: Duration::from_secs(3),
    }
}

/// A provider under test: its `kmsProviders` (the provider's entry, pointed at the gate, and a
/// `local` one to re-wrap to and from), options, and two master keys of the provider.
pub struct Provider<'a> {
    /// The provider's name in `kmsProviders` ("aws", "vault", …).
    pub name: &'a str,
    /// `kmsProviders`, with a `local` entry.
    pub kms_providers: Document,
    /// TLS options and a [`quick_retry`] policy.
    pub options: KmsOptions,
    /// The master key keys are created under.
    pub master_key: Document,
    /// What the provider's server is reached through.
    pub gate: Arc<Gate>,
    /// Secrets the provider's configuration holds: none may appear in errors or reports.
    pub secrets: Vec<String>,
}

const DOCS: i64 = 120;
const BATCH: usize = 40;

fn schema(alias: &str) -> Schema {
    Schema::builder()
        .field("ssn", Field::randomized(alias))
        .field("email", Field::deterministic("idx"))
        .build()
        .unwrap()
}

fn person(i: i64) -> Document {
    doc! { "_id": i, "ssn": format!("{i:03}-45-6789"), "email": format!("u{i}@example.com"), "n": i }
}

/// A client that records every command it sends, and a fresh database.
async fn database(prefix: &str) -> (Client, Database, Sent) {
    let (client, sent) = recording_client().await;
    let db = client.database(&unique_db_name(prefix));
    (client, db, sent)
}

fn assert_no_secret(p: &Provider<'_>, text: &str) {
    for s in &p.secrets {
        assert!(!text.contains(s.as_str()), "a secret leaked into: {text}");
    }
}

/// Runs the scenario; `to` is a masterKey of another configured provider (e.g. `local`).
pub async fn end_to_end(p: &Provider<'_>, to: &Document) {
    let log = log_capture();
    let providers =
        Arc::new(KmsProviders::from_document_with(&p.kms_providers, &p.options).unwrap());
    assert_no_secret(p, &format!("{providers:?}"));
    let (client, db, sent) = database(&format!("kms_e2e_{}", p.name.replace(':', "_"))).await;
    let ns = format!("{}.datakeys", db.name());
    let vault = |mk: &Document| {
        Arc::new(
            KeyVault::with_kms_providers(&client, &providers, mk)
                .unwrap()
                .namespace(&ns)
                .build()
                .unwrap(),
        )
    };

    // 1. Keys under the provider's master key; half the documents under `legacy`, half under
    //    `pii`, through EncryptedCollection.
    let v = vault(&p.master_key);
    v.ensure_alias("legacy").await.unwrap();
    v.ensure_alias("pii").await.unwrap();
    v.ensure_alias("idx").await.unwrap();
    let raw = db.collection::<Document>("people");
    let legacy = EncryptedCollection::<Document>::new(raw.clone(), v.clone(), schema("legacy"));
    let pii = EncryptedCollection::<Document>::new(raw.clone(), v.clone(), schema("pii"));
    let all: Vec<Document> = (0..DOCS).map(person).collect();
    // `_id` order: the first batch of the rotation is under `pii`, the later ones under
    // `legacy` (whose key the rotating process has not loaded yet).
    pii.insert_many(&all[..BATCH]).await.unwrap();
    legacy.insert_many(&all[BATCH..]).await.unwrap();
    for info in v.list().await.unwrap() {
        assert_eq!(info.provider(), p.name, "{info:?}");
        assert_eq!(info.master_key.get_str("provider").unwrap(), p.name);
    }
    let stored_before: Vec<Document> = raw
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();

    // 2. Rotate `pii`, and re-encrypt everything to it in a process of its own, with the KMS
    //    taken away after the first batch.
    v.rotate("pii").await.unwrap();
    let rotating = vault(&p.master_key);
    let target = Target::new(&raw, schema("pii"));
    let rotator = Rotator::new(rotating.clone())
        .options(RotationOptions::default().batch_size(BATCH).job("kms-e2e"));
    let mut checkpoints = 0;
    let e = rotator
        .run(std::slice::from_ref(&target), |progress| {
            if progress.phase == Phase::Checkpointed {
                checkpoints += 1;
                p.gate.close();
            }
            Flow::Continue
        })
        .await
        .expect_err("the KMS outage stops the run");
    assert_eq!(checkpoints, 1);
    let text = e.to_string();
    assert!(
        matches!(&e, Error::Kms { provider, .. } if provider == p.name),
        "{e:?}"
    );
    assert_no_secret(p, &text);
    assert_no_secret(p, &format!("{e:?}"));
    // Nothing of the failed batch (or after it) was written.
    let stored: Vec<Document> = raw
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_ne!(
        stored[..BATCH],
        stored_before[..BATCH],
        "the first batch was re-encrypted"
    );
    assert_eq!(
        stored[BATCH..],
        stored_before[BATCH..],
        "nothing after it changed"
    );
    // The KMS is back: resume.
    p.gate.open().unwrap();
    let report = Rotator::new(rotating.clone())
        .options(
            RotationOptions::default()
                .batch_size(BATCH)
                .job("kms-e2e")
                .resume(true),
        )
        .run(std::slice::from_ref(&target), |_| Flow::Continue)
        .await
        .unwrap();
    assert!(report.complete(), "{report:?}");
    assert_eq!(
        report.stats().rewritten,
        (DOCS as u64) - BATCH as u64,
        "{report:?}"
    );

    // 3. Re-wrap every key to `to`, the KMS taken away after the first key is unwrapped: the
    //    rewrap stops at the next key, every key stays readable, and the same rewrap resumes.
    let keys = v.list().await.unwrap().len();
    let to_kek = providers.kek_for(to).unwrap();
    let rewrapping = Arc::new(
        KeyVault::builder(
            &client,
            Arc::new(CloseAfter::new(
                providers.kek_for(&p.master_key).unwrap(),
                p.gate.clone(),
                1,
            )),
        )
        .namespace(&ns)
        .build()
        .unwrap(),
    );
    let report = rewrapping.rewrap(to_kek.clone()).await.unwrap();
    let failed = report.failed.as_ref().expect("the outage stops the rewrap");
    assert!(
        matches!(&failed.error, Error::Kms { provider, .. } if provider == p.name),
        "{failed:?}"
    );
    assert_no_secret(p, &format!("{report:?}"));
    assert_eq!(report.keys.len(), 1, "{report:?}");
    // Every key is still readable: the moved one under `to`, the others under the provider.
    p.gate.open().unwrap();
    let both = vault(&p.master_key);
    let reader = EncryptedCollection::<Document>::new(raw.clone(), both.clone(), schema("pii"));
    let read: Vec<Document> = reader
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read, all);
    let report = rewrapping.rewrap(to_kek.clone()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    assert_eq!(report.keys.len(), keys, "{report:?}");
    let to_provider = to.get_str("provider").unwrap();
    for k in &report.keys {
        assert!(k.to.starts_with(to_provider), "{k:?}");
        assert!(
            matches!(
                k.outcome,
                RewrapOutcome::Rewrapped | RewrapOutcome::AlreadyThere
            ),
            "{k:?}"
        );
    }
    for info in v.list().await.unwrap() {
        assert_eq!(info.provider(), to_provider, "{info:?}");
    }

    // 4. A process that knows only `to` reads everything back: one KMS call per data key,
    //    not per document.
    let fresh = Arc::new(
        KeyVault::builder(&client, to_kek.clone())
            .namespace(&ns)
            .build()
            .unwrap(),
    );
    let reader = EncryptedCollection::<Document>::new(raw.clone(), fresh.clone(), schema("pii"));
    let read: Vec<Document> = reader
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read, all);
    // The keys the read needs — `pii`'s two (the alias is loaded whole, for queries) and
    // `idx` — each unwrapped once: 3 KMS calls for 120 documents.
    let stats = fresh.cache_stats();
    assert_eq!((stats.kms_calls, stats.loads), (3, 3), "{stats:?}");

    // 5. And back under the provider, read by a process configured like the first one, with
    //    a query on the deterministic field.
    let back = vault(to)
        .rewrap(providers.kek_for(&p.master_key).unwrap())
        .await
        .unwrap();
    assert!(back.failed.is_none() && back.keys.len() == keys, "{back:?}");
    let again = vault(&p.master_key);
    let one = EncryptedCollection::<Document>::new(raw.clone(), again.clone(), schema("pii"))
        .find_one(doc! { "email": "u7@example.com" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one, all[7]);
    again
        .prefetch_aliases(&["pii".to_owned(), "legacy".to_owned()])
        .await
        .unwrap();
    for info in again.list().await.unwrap() {
        assert_eq!(info.provider(), p.name, "{info:?}");
    }
    // Nothing logged holds a credential (the outages above logged their retries).
    let logged = log.lock().unwrap().clone();
    assert!(logged.contains("retrying"), "the capture works: {logged}");
    assert_no_secret(p, &logged);
    // Nothing sent to MongoDB holds a credential of the provider (in raw, hex or base64 form).
    let commands = sent.commands();
    assert!(commands.len() > 50, "{} commands recorded", commands.len());
    for (name, command) in &commands {
        let text = format!("{command:?}");
        let bytes = bson::to_vec(command).unwrap();
        for secret in &p.secrets {
            for form in [
                secret.as_bytes().to_vec(),
                hex::encode(secret).into_bytes(),
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret)
                    .into_bytes(),
            ] {
                assert!(
                    !bytes.windows(form.len()).any(|w| w == form.as_slice())
                        && !text
                            .as_bytes()
                            .windows(form.len())
                            .any(|w| w == form.as_slice()),
                    "a credential went to the server in a {name} command"
                );
            }
        }
    }
}

/// A KEK that closes `gate` after `n` unwraps: the KMS goes away in the middle of a rewrap.
struct CloseAfter {
    inner: Arc<dyn KekProvider>,
    gate: Arc<Gate>,
    left: std::sync::atomic::AtomicI64,
}

impl CloseAfter {
    fn new(inner: Arc<dyn KekProvider>, gate: Arc<Gate>, n: i64) -> Self {
        Self {
            inner,
            gate,
            left: std::sync::atomic::AtomicI64::new(n),
        }
    }
}

#[async_trait::async_trait]
impl KekProvider for CloseAfter {
    fn provider(&self) -> &str {
        self.inner.provider()
    }

    fn can_unwrap(&self, master_key: &Document) -> bool {
        self.inner.can_unwrap(master_key)
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        self.inner.wrap_with_ad(dek, ad).await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        let r = self.inner.unwrap_with_ad(master_key, wrapped, ad).await;
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.gate.close();
        }
        r
    }
}
