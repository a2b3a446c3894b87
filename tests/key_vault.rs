//! The key vault against a real MongoDB wire-protocol server (`fieldcrypt_testkit::devserver`): key
//! documents in MongoDB's layout, rotation and state changes across processes, concurrency,
//! re-wrapping under a new KEK, the cache, usage leases, crypto-shredding, redaction; and what
//! someone who can write the key-vault collection (but has no KEK) can and cannot do.
//!
//! Each test uses its own database. "Another process" is a second `KeyVault` (with its own
//! client) on the same collection: vaults share nothing in memory.
#![cfg(feature = "mongodb")]
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use bson::spec::BinarySubtype;
use bson::{doc, Binary, Bson, Document};
use fieldcrypt::mongo::{tenant_alias, KekProvider, KeySource, KeyVault, LocalKek, RewrapOutcome};
use fieldcrypt::{
    ArgumentError, Context, Cryptor, CsfleKeyDocument, Error, Field, KeyId, KeyKind, KeyMaterial,
    KeyState, KeyVaultError, Keyring, LocalMasterKey, Schema, Suite, RANDOM_NONCE_LIMIT,
};
use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
use fieldcrypt_testkit::fixtures::Interop;
use futures_util::TryStreamExt;
use mongodb::{Client, Collection};
use secrecy::ExposeSecret as _;

async fn client() -> Client {
    let server = DevServer::shared().unwrap();
    Client::with_uri_str(server.uri()).await.unwrap()
}

/// A fresh database's key vault collection, its namespace and a client.
async fn setup(prefix: &str) -> (Client, String) {
    let client = client().await;
    let ns = format!("{}.datakeys", unique_db_name(prefix));
    (client, ns)
}

fn raw(client: &Client, ns: &str) -> Collection<Document> {
    let (db, coll) = ns.split_once('.').unwrap();
    client.database(db).collection(coll)
}

fn vault(client: &Client, ns: &str, kek: &Arc<LocalKek>) -> KeyVault {
    KeyVault::builder(client, kek.clone())
        .namespace(ns)
        .build()
        .unwrap()
}

fn vault_ttl(client: &Client, ns: &str, kek: &Arc<LocalKek>, ttl: Duration) -> KeyVault {
    KeyVault::builder(client, kek.clone())
        .namespace(ns)
        .cache_ttl(ttl)
        .build()
        .unwrap()
}

fn ssn_cryptor(vault: &Arc<KeyVault>, alias: &str) -> Cryptor {
    let schema = Schema::builder()
        .field("ssn", Field::randomized(alias))
        .build()
        .unwrap();
    Cryptor::new(vault.clone(), schema)
}

async fn encrypt(vault: &Arc<KeyVault>, alias: &str, ssn: &str) -> Document {
    vault.prefetch_aliases(&[alias.to_owned()]).await.unwrap();
    ssn_cryptor(vault, alias)
        .encrypt_document(&doc! { "_id": 1, "ssn": ssn }, &Context::none())
        .unwrap()
}

async fn decrypt(vault: &Arc<KeyVault>, sealed: &Document) -> fieldcrypt::Result<Document> {
    let raw = bson::RawDocumentBuf::from_document(sealed).unwrap();
    vault
        .prefetch_ids(&Cryptor::referenced_keys(&raw).unwrap())
        .await?;
    Cryptor::decrypt_only(vault.clone()).decrypt_document(sealed, &Context::none())
}

async fn all_docs(coll: &Collection<Document>, filter: Document) -> Vec<Document> {
    coll.find(filter)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

async fn doc_of(coll: &Collection<Document>, id: KeyId) -> Document {
    coll.find_one(doc! { "_id": id.to_binary() })
        .await
        .unwrap()
        .unwrap()
}

const CSFLE: Interop = Interop::CSFLE;

fn fixture_keys() -> Vec<CsfleKeyDocument> {
    CSFLE.key_documents("keys.jsonl")
}

fn fixture_kek() -> LocalKek {
    LocalKek::from_file(CSFLE.path("master-key.txt")).unwrap()
}

/// The associated data a stored key document's `keyMaterial` is wrapped with: the key's
/// identity for fieldcrypt's documents, nothing for MongoDB's CSFLE documents.
fn ad_of(d: &Document) -> Vec<u8> {
    let Ok(f) = d.get_document("fieldcrypt") else {
        return Vec::new();
    };
    let id = match d.get("_id") {
        Some(Bson::Binary(b)) => KeyId::from_slice(&b.bytes).unwrap(),
        other => panic!("_id: {other:?}"),
    };
    KeyVault::associated_data(&id, f.get_str("alias").unwrap(), KeyKind::Fieldcrypt)
}

/// Unwraps a stored key document's material with `kek`, as the vault does.
async fn unwrap_doc(kek: &LocalKek, d: &Document) -> fieldcrypt::Result<KeyMaterial> {
    kek.unwrap_with_ad(
        d.get_document("masterKey").unwrap(),
        d.get_binary_generic("keyMaterial").unwrap(),
        &ad_of(d),
    )
    .await
}

fn stored_count(d: &Document) -> i64 {
    d.get_document("fieldcrypt")
        .unwrap()
        .get_i64("encryptions")
        .unwrap()
}

/// A KEK around a `LocalKek` that records the associated data it is given and can be slow
/// to unwrap (a remote KMS).
struct RecordingKek {
    inner: Arc<LocalKek>,
    unwrap_delay: Duration,
    wrapped_with: Mutex<Vec<Vec<u8>>>,
}

impl RecordingKek {
    fn new(inner: &Arc<LocalKek>, unwrap_delay: Duration) -> Self {
        RecordingKek {
            inner: inner.clone(),
            unwrap_delay,
            wrapped_with: Mutex::new(Vec::new()),
        }
    }
}

#[async_trait::async_trait]
impl KekProvider for RecordingKek {
    fn provider(&self) -> &str {
        self.inner.provider()
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        self.wrapped_with.lock().unwrap().push(ad.to_vec());
        self.inner.wrap_with_ad(dek, ad).await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        tokio::time::sleep(self.unwrap_delay).await;
        self.inner.unwrap_with_ad(master_key, wrapped, ad).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rotate_promote_disable_destroy() {
    let (client, ns) = setup("kv_lifecycle").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let pii = ["pii".to_owned()];

    let k1 = v.create_key("pii").await.unwrap();
    let sealed1 = encrypt(&v, "pii", "111").await;
    assert_eq!(v.primary("pii").unwrap().id(), k1);

    let k2 = v.rotate("pii").await.unwrap();
    v.prefetch_aliases(&pii).await.unwrap();
    assert_eq!(v.primary("pii").unwrap().id(), k2);
    assert_eq!(v.key(&k1).unwrap().state(), KeyState::Active);
    let readable: Vec<_> = v
        .readable_keys("pii")
        .unwrap()
        .iter()
        .map(|k| k.id())
        .collect();
    assert_eq!(readable, vec![k2, k1]);
    let sealed2 = encrypt(&v, "pii", "222").await;
    assert_eq!(
        decrypt(&v, &sealed1).await.unwrap().get_str("ssn").unwrap(),
        "111"
    );
    assert_eq!(
        decrypt(&v, &sealed2).await.unwrap().get_str("ssn").unwrap(),
        "222"
    );

    // Disable the old key: its data is refused, then readable again once enabled.
    v.set_state(&k1, KeyState::Disabled).await.unwrap();
    assert!(matches!(decrypt(&v, &sealed1).await, Err(Error::KeyDisabled(id)) if id == k1));
    v.set_state(&k1, KeyState::Active).await.unwrap();
    assert!(decrypt(&v, &sealed1).await.is_ok());

    // Promote the old key back: the current primary is demoted.
    v.set_state(&k1, KeyState::Primary).await.unwrap();
    v.prefetch_aliases(&pii).await.unwrap();
    assert_eq!(v.primary("pii").unwrap().id(), k1);
    assert_eq!(v.key(&k2).unwrap().state(), KeyState::Active);

    // Disable the primary: the alias has none.
    v.set_state(&k1, KeyState::Disabled).await.unwrap();
    v.prefetch_aliases(&pii).await.unwrap();
    assert!(matches!(v.primary("pii"), Err(Error::NoPrimaryKey(_))));
    v.set_state(&k1, KeyState::Primary).await.unwrap();

    // Destroy: irreversible, idempotent, and data under the key is gone.
    v.destroy(&k2).await.unwrap();
    assert!(matches!(decrypt(&v, &sealed2).await, Err(Error::KeyDestroyed(id)) if id == k2));
    assert!(matches!(
        v.set_state(&k2, KeyState::Active).await,
        Err(Error::KeyDestroyed(_))
    ));
    assert!(matches!(
        v.set_state(&k2, KeyState::Primary).await,
        Err(Error::KeyDestroyed(_))
    ));
    v.destroy(&k2).await.unwrap();
    assert!(decrypt(&v, &sealed1).await.is_ok());

    let unknown = KeyId::random();
    assert!(
        matches!(v.set_state(&unknown, KeyState::Active).await, Err(Error::UnknownKey(id)) if id == unknown)
    );
    assert!(matches!(
        v.create_key("").await,
        Err(Error::InvalidArgument(ArgumentError::KeyAlias(_)))
    ));

    let list = v.list().await.unwrap();
    let states: Vec<_> = list.iter().map(|k| (k.id, k.state, k.version)).collect();
    assert_eq!(
        states,
        vec![
            (k1, KeyState::Primary, Some(1)),
            (k2, KeyState::Destroyed, Some(2))
        ]
    );
    assert!(list
        .iter()
        .all(|k| k.alias == "pii" && k.managed && k.provider() == "local"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_documents_have_mongodb_layout() {
    let (client, ns) = setup("kv_layout").await;
    let kek = Arc::new(LocalKek::generate());
    let v = vault(&client, &ns, &kek);
    let coll = raw(&client, &ns);
    let id = v.create_key("pii").await.unwrap();

    let d = doc_of(&coll, id).await;
    match d.get("_id") {
        Some(Bson::Binary(b)) => {
            assert_eq!(b.subtype, BinarySubtype::Uuid);
            assert_eq!(b.bytes, id.as_bytes());
        }
        other => panic!("_id: {other:?}"),
    }
    match d.get("keyMaterial") {
        // 32 bytes wrapped: IV (16) + 48 (with padding) + tag (32).
        Some(Bson::Binary(b)) => {
            assert_eq!(b.subtype, BinarySubtype::Generic);
            assert_eq!(b.bytes.len(), 96);
        }
        other => panic!("keyMaterial: {other:?}"),
    }
    assert_eq!(
        d.get_document("masterKey").unwrap(),
        &doc! { "provider": "local" }
    );
    assert_eq!(
        d.get_array("keyAltNames").unwrap(),
        &vec![Bson::from("pii:v1")]
    );
    assert_eq!(d.get("status"), Some(&Bson::Int32(0)));
    assert!(matches!(d.get("creationDate"), Some(Bson::DateTime(_))));
    assert!(matches!(d.get("updateDate"), Some(Bson::DateTime(_))));
    let f = d.get_document("fieldcrypt").unwrap();
    assert_eq!(f.get("format"), Some(&Bson::Int32(2)));
    assert_eq!(f.get_str("alias").unwrap(), "pii");
    assert_eq!(f.get_str("state").unwrap(), "primary");
    assert_eq!(f.get_str("kind").unwrap(), "fieldcrypt");
    assert_eq!(f.get("version"), Some(&Bson::Int64(1)));
    assert_eq!(f.get("generation"), Some(&Bson::Int64(1)));
    assert_eq!(f.get("encryptions"), Some(&Bson::Int64(0)));

    // Without fieldcrypt's sub-document it is exactly a key document as libmongocrypt parses
    // it (CsfleKeyDocument applies libmongocrypt's rules, which refuse unknown fields).
    let mut plain = d.clone();
    plain.remove("fieldcrypt");
    let parsed = CsfleKeyDocument::from_document(&plain).unwrap();
    assert_eq!(parsed.id, id);
    assert_eq!(parsed.provider(), "local");
    // The wrapped key is the KEK's AEAD over the 32 key bytes, with the key's identity as
    // associated data: not MongoDB's unbound format (libmongocrypt cannot use a 32-byte key).
    let unwrapped = kek
        .unwrap_with_ad(
            &parsed.master_key,
            &parsed.key_material,
            &KeyVault::associated_data(&id, "pii", KeyKind::Fieldcrypt),
        )
        .await
        .unwrap();
    assert_eq!(unwrapped.len(), 32);
    assert!(kek
        .unwrap_with_ad(&parsed.master_key, &parsed.key_material, &[])
        .await
        .is_err());
    assert!(matches!(
        kek.unwrap(&parsed.master_key, &parsed.key_material).await,
        Err(Error::KeyFormat(_))
    ));

    // Disabled: status 1. Destroyed: status 1 and no keyMaterial at all.
    v.set_state(&id, KeyState::Disabled).await.unwrap();
    let d = doc_of(&coll, id).await;
    assert_eq!(d.get("status"), Some(&Bson::Int32(1)));
    assert_eq!(
        d.get_document("fieldcrypt")
            .unwrap()
            .get_str("state")
            .unwrap(),
        "disabled"
    );
    v.destroy(&id).await.unwrap();
    let d = doc_of(&coll, id).await;
    assert!(!d.contains_key("keyMaterial"), "{d:?}");
    assert_eq!(d.get("status"), Some(&Bson::Int32(1)));
    assert_eq!(
        d.get_document("fieldcrypt")
            .unwrap()
            .get_str("state")
            .unwrap(),
        "destroyed"
    );

    // The indexes MongoDB asks for.
    let indexes: Vec<_> = coll
        .list_indexes()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let alt = indexes
        .iter()
        .find(|i| i.keys == doc! { "keyAltNames": 1 })
        .expect("keyAltNames index");
    let opts = alt.options.as_ref().unwrap();
    assert_eq!(opts.unique, Some(true));
    assert_eq!(
        opts.partial_filter_expression,
        Some(doc! { "keyAltNames": { "$exists": true } })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_duplicate_key_alt_names() {
    let (client, ns) = setup("kv_altnames").await;
    let kek = Arc::new(LocalKek::generate());
    let v = vault(&client, &ns, &kek);
    let coll = raw(&client, &ns);
    v.ensure_indexes().await.unwrap();
    v.ensure_indexes().await.unwrap();
    let id = v.create_key("pii").await.unwrap();

    let other = |alt: Option<&str>| {
        let mut d = doc! {
            "_id": KeyId::random().to_binary(),
            "keyMaterial": Binary { subtype: BinarySubtype::Generic, bytes: vec![0; 160] },
            "creationDate": bson::DateTime::now(), "updateDate": bson::DateTime::now(),
            "status": 0, "masterKey": { "provider": "local" },
        };
        if let Some(a) = alt {
            d.insert("keyAltNames", vec![a]);
        }
        d
    };
    let e = coll.insert_one(other(Some("pii:v1"))).await.unwrap_err();
    assert!(
        e.to_string().contains("11000") || e.to_string().contains("duplicate"),
        "{e}"
    );
    coll.insert_one(other(Some("fresh"))).await.unwrap();
    assert!(coll.insert_one(other(Some("fresh"))).await.is_err());
    // Documents without keyAltNames are not constrained (partial index).
    coll.insert_one(other(None)).await.unwrap();
    coll.insert_one(other(None)).await.unwrap();
    // A CSFLE key named like a fieldcrypt key version only pushes rotation to the next version.
    coll.insert_one(other(Some("pii:v2"))).await.unwrap();
    let k = v.rotate("pii").await.unwrap();
    let d = doc_of(&coll, k).await;
    assert_eq!(
        d.get_array("keyAltNames").unwrap(),
        &vec![Bson::from("pii:v3")]
    );
    assert_ne!(k, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_rotators_end_with_one_primary() {
    let (client_a, ns) = setup("kv_race").await;
    let client_b = client().await;
    let kek = Arc::new(LocalKek::generate());
    let a = Arc::new(vault(&client_a, &ns, &kek));
    let b = Arc::new(vault(&client_b, &ns, &kek));
    let coll = raw(&client_a, &ns);

    // First keys of a tenant alias, created concurrently: one key, the same for everyone.
    let (ea, eb) = tokio::join!(a.ensure_alias("t/1"), b.ensure_alias("t/1"));
    assert_eq!(ea.unwrap(), eb.unwrap());
    assert_eq!(
        all_docs(&coll, doc! { "fieldcrypt.alias": "t/1" })
            .await
            .len(),
        1
    );

    const ROUNDS: usize = 6;
    let spawn = |v: Arc<KeyVault>| {
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..ROUNDS {
                ids.push(v.rotate("pii").await.unwrap());
            }
            ids
        })
    };
    let (ra, rb) = tokio::join!(spawn(a.clone()), spawn(b.clone()));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());

    let docs = all_docs(&coll, doc! { "fieldcrypt.alias": "pii" }).await;
    assert_eq!(docs.len(), 2 * ROUNDS);
    let primaries: Vec<_> = docs
        .iter()
        .filter(|d| {
            d.get_document("fieldcrypt")
                .unwrap()
                .get_str("state")
                .unwrap()
                == "primary"
        })
        .collect();
    assert_eq!(primaries.len(), 1, "{docs:#?}");
    let mut versions: Vec<i64> = docs
        .iter()
        .map(|d| {
            d.get_document("fieldcrypt")
                .unwrap()
                .get_i64("version")
                .unwrap()
        })
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=2 * ROUNDS as i64).collect::<Vec<_>>());

    // Both vaults agree on the primary, and it is the last rotation of one of them.
    a.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    b.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let p = a.primary("pii").unwrap().id();
    assert_eq!(b.primary("pii").unwrap().id(), p);
    assert!(p == *ra.last().unwrap() || p == *rb.last().unwrap());

    // Promotions racing with rotations converge too.
    let old = ra[0];
    let (x, y) = tokio::join!(a.set_state(&old, KeyState::Primary), b.rotate("pii"));
    x.unwrap();
    y.unwrap();
    let n = all_docs(
        &coll,
        doc! { "fieldcrypt.alias": "pii", "fieldcrypt.state": "primary" },
    )
    .await
    .len();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elects_and_repairs_two_stored_primaries() {
    // A rotator that died between inserting its key and demoting the old one leaves two
    // primaries: readers agree on the newer claim and demote the older one.
    let (client, ns) = setup("kv_repair").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    let k1 = v.create_key("pii").await.unwrap();
    let k2 = v.rotate("pii").await.unwrap();
    coll.update_one(
        doc! { "_id": k1.to_binary() },
        doc! { "$set": { "fieldcrypt.state": "primary" } },
    )
    .await
    .unwrap();
    let v2 = Arc::new(vault(&client, &ns, &kek));
    v2.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(v2.primary("pii").unwrap().id(), k2);
    assert_eq!(v2.key(&k1).unwrap().state(), KeyState::Active);
    let d = doc_of(&coll, k1).await;
    assert_eq!(
        d.get_document("fieldcrypt")
            .unwrap()
            .get_str("state")
            .unwrap(),
        "active"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_moves_every_key_to_the_new_kek() {
    let (client, ns) = setup("kv_rewrap").await;
    let old_kek = Arc::new(LocalKek::generate());
    let new_kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &old_kek));
    let coll = raw(&client, &ns);

    let pii = v.create_key("pii").await.unwrap();
    v.rotate("pii").await.unwrap();
    let gone = v.create_key("gone").await.unwrap();
    v.destroy(&gone).await.unwrap();
    let csfle = fixture_keys();
    for k in &csfle {
        v.import_csfle_key(k, &fixture_kek()).await.unwrap();
    }
    let sealed = encrypt(&v, "pii", "123-45-6789").await;
    // A data document next to the key vault: rewrap must not touch it.
    let people = client
        .database(ns.split_once('.').unwrap().0)
        .collection::<Document>("people");
    people.insert_one(sealed.clone()).await.unwrap();
    let before = all_docs(&coll, doc! {}).await;

    let report = v.rewrap(new_kek.clone()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    assert_eq!(
        report.rewrapped(),
        2 + csfle.len(),
        "every key with material, not the destroyed one"
    );
    assert!(report
        .keys
        .iter()
        .all(|k| k.outcome == RewrapOutcome::Rewrapped && k.from == "local" && k.to == "local"));
    assert_eq!(all_docs(&people, doc! {}).await, vec![sealed.clone()]);

    let after = all_docs(&coll, doc! {}).await;
    assert_eq!(after.len(), before.len());
    for d in &after {
        let Ok(wrapped) = d.get_binary_generic("keyMaterial") else {
            continue; // destroyed
        };
        let mk = d.get_document("masterKey").unwrap();
        assert!(matches!(
            old_kek.unwrap_with_ad(mk, wrapped, &ad_of(d)).await,
            Err(Error::Decrypt)
        ));
        // Still bound to the same key identity (or MongoDB's unbound format for CSFLE keys).
        let material = unwrap_doc(&new_kek, d).await.unwrap();
        // The data key itself did not change.
        let was = before
            .iter()
            .find(|b| b.get("_id") == d.get("_id"))
            .unwrap();
        let old_material = unwrap_doc(&old_kek, was).await.unwrap();
        assert_eq!(material.expose_secret(), old_material.expose_secret());
    }
    // CSFLE documents keep libmongocrypt's exact layout and unwrap with the new master key.
    for k in &csfle {
        let d = doc_of(&coll, k.id).await;
        let parsed = CsfleKeyDocument::from_document(&d).unwrap();
        assert_eq!(parsed.key_alt_names, k.key_alt_names);
        assert_eq!(parsed.creation_date, k.creation_date);
        parsed.unwrap_with(new_kek.master_key()).unwrap();
    }

    // A process that knows only the new master key reads data written before the rewrap.
    let fresh = Arc::new(vault(&client, &ns, &new_kek));
    assert_eq!(
        decrypt(&fresh, &sealed)
            .await
            .unwrap()
            .get_str("ssn")
            .unwrap(),
        "123-45-6789"
    );
    // One that knows only the old one cannot.
    let stale = Arc::new(vault(&client, &ns, &old_kek));
    assert!(
        matches!(decrypt(&stale, &sealed).await, Err(Error::KeyFormat(m)) if m.contains(&pii.to_string()) || m.contains("unwrap"))
    );
    // The rewrapping vault now wraps new keys with the new KEK and still reads everything.
    let k = v.create_key("after").await.unwrap();
    unwrap_doc(&new_kek, &doc_of(&coll, k).await).await.unwrap();
    v.clear_cache();
    assert!(decrypt(&v, &sealed).await.is_ok());
    // Running it again is harmless.
    // (Two local master keys write the same masterKey document, so every key is re-wrapped.)
    assert_eq!(
        v.rewrap(new_kek.clone()).await.unwrap().rewrapped(),
        3 + csfle.len()
    );
    assert!(decrypt(&fresh, &sealed).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_reach_other_processes_within_the_ttl() {
    let (client_a, ns) = setup("kv_ttl").await;
    let client_b = client().await;
    let kek = Arc::new(LocalKek::generate());
    let ttl = Duration::from_millis(1500);
    let a = Arc::new(vault_ttl(&client_a, &ns, &kek, ttl));
    let b = Arc::new(vault_ttl(&client_b, &ns, &kek, ttl));

    let id = a.create_key("pii").await.unwrap();
    let sealed = encrypt(&a, "pii", "x").await;
    assert!(decrypt(&b, &sealed).await.is_ok());

    a.set_state(&id, KeyState::Disabled).await.unwrap();
    // A sees its own change at once.
    assert!(matches!(
        decrypt(&a, &sealed).await,
        Err(Error::KeyDisabled(_))
    ));
    // B's cached copy may serve until it is reloaded...
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    // ...which happens within the TTL: without a prefetch the expired key is gone,
    assert!(matches!(b.key(&id), Err(Error::UnknownKey(_))));
    // and the next prefetch sees the new state.
    assert!(matches!(
        decrypt(&b, &sealed).await,
        Err(Error::KeyDisabled(_))
    ));

    a.set_state(&id, KeyState::Active).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert!(decrypt(&b, &sealed).await.is_ok());

    // Rotation by A reaches B's primary within the TTL as well.
    b.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let k2 = a.rotate("pii").await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    b.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(b.primary("pii").unwrap().id(), k2);

    // The background sweep drops expired keys even when nothing asks.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(b.cache_stats().entries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_counters_capacity_and_clear() {
    let (client, ns) = setup("kv_cache").await;
    let kek = Arc::new(LocalKek::generate());
    let maker = vault(&client, &ns, &kek);
    let k = maker.create_key("pii").await.unwrap();
    let k2 = maker.create_key("other").await.unwrap();
    let k3 = maker.create_key("third").await.unwrap();

    let v = vault(&client, &ns, &kek);
    let s = v.cache_stats();
    assert_eq!((s.hits, s.misses, s.loads, s.entries), (0, 0, 0, 0));
    v.prefetch_ids(&[k]).await.unwrap();
    let s = v.cache_stats();
    assert_eq!((s.hits, s.misses, s.loads, s.entries), (0, 1, 1, 1));
    v.prefetch_ids(&[k, k]).await.unwrap();
    assert_eq!(v.cache_stats().hits, 1);
    // Successful lookups are the hot path and are not counted; failed ones are misses.
    v.key(&k).unwrap();
    assert_eq!(v.cache_stats().misses, 1);
    assert!(matches!(v.key(&KeyId::random()), Err(Error::UnknownKey(_))));
    assert!(matches!(v.primary("nope"), Err(Error::UnknownAlias(_))));
    assert_eq!(v.cache_stats().misses, 3);
    v.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(v.cache_stats().misses, 4);
    v.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(v.cache_stats().hits, 2);
    // An id that is not in the vault is fetched, not found, and stays unknown.
    v.prefetch_ids(&[KeyId::random()]).await.unwrap();
    assert_eq!(v.cache_stats().entries, 1);

    v.clear_cache();
    let s = v.cache_stats();
    assert_eq!(s.entries, 0);
    assert!(s.evictions >= 1);
    assert!(matches!(v.key(&k), Err(Error::UnknownKey(_))));

    // Capacity: the oldest loads go first.
    let small = KeyVault::builder(&client, kek.clone())
        .namespace(ns.as_str())
        .cache_capacity(2)
        .build()
        .unwrap();
    small.prefetch_ids(&[k]).await.unwrap();
    small.prefetch_ids(&[k2]).await.unwrap();
    small.prefetch_ids(&[k3]).await.unwrap();
    let s = small.cache_stats();
    assert_eq!((s.entries, s.evictions), (2, 1));
    assert!(small.key(&k).is_err());
    assert!(small.key(&k3).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_leases_are_reserved_in_the_vault() {
    let (client, ns) = setup("kv_lease").await;
    let kek = Arc::new(LocalKek::generate());
    let coll = raw(&client, &ns);
    let a = Arc::new(
        KeyVault::builder(&client, kek.clone())
            .namespace(ns.as_str())
            .usage_lease(8192)
            .build()
            .unwrap(),
    );
    let id = a.create_key("pii").await.unwrap();
    let stored = |d: Document| {
        d.get_document("fieldcrypt")
            .unwrap()
            .get_i64("encryptions")
            .unwrap()
    };

    // Nothing is reserved until a process prepares to encrypt.
    assert_eq!(stored(doc_of(&coll, id).await), 0);
    a.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(stored(doc_of(&coll, id).await), 4096);
    let cryptor = ssn_cryptor(&a, "pii");
    for i in 0..3000 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    // The walks' own leases (Cryptor::settle_usage) go back: the count is exact.
    cryptor.settle_usage();
    assert_eq!(a.key(&id).unwrap().encryptions(), 3000);
    // More than half the lease used: the next prefetch reserves a larger one.
    a.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(stored(doc_of(&coll, id).await), 4096 + 8192);
    a.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(stored(doc_of(&coll, id).await), 4096 + 8192);

    // Another process reserves its own block, and starts counting after what is reserved.
    let b = Arc::new(vault(&client, &ns, &kek));
    b.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(stored(doc_of(&coll, id).await), 4096 + 8192 + 4096);
    assert!(b.key(&id).unwrap().encryptions() >= 4096 + 8192);
    let info = a.list().await.unwrap();
    assert_eq!(info[0].encryptions, 4096 + 8192 + 4096);

    // Suites without a nonce limit do not count.
    let x = Cryptor::new(
        a.clone(),
        Schema::builder()
            .field(
                "ssn",
                Field::randomized("pii").suite(Suite::XChaCha20Poly1305),
            )
            .build()
            .unwrap(),
    );
    x.encrypt_document(&doc! { "ssn": 1 }, &Context::none())
        .unwrap();
    assert_eq!(a.key(&id).unwrap().encryptions(), 3000);

    // Near the limit: the last encryptions are shared out, then the key refuses.
    let worn = a.create_key("worn").await.unwrap();
    let limit = i64::try_from(RANDOM_NONCE_LIMIT).unwrap();
    coll.update_one(
        doc! { "_id": worn.to_binary() },
        doc! { "$set": { "fieldcrypt.encryptions": limit - 10 } },
    )
    .await
    .unwrap();
    let c = Arc::new(vault(&client, &ns, &kek));
    c.prefetch_aliases(&["worn".to_owned()]).await.unwrap();
    assert_eq!(stored(doc_of(&coll, worn).await), limit);
    let cryptor = ssn_cryptor(&c, "worn");
    for i in 0..10 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    let e = cryptor
        .encrypt_document(&doc! { "ssn": 11 }, &Context::none())
        .unwrap_err();
    assert!(
        matches!(e, Error::KeyUsageLimit { key, .. } if key == worn),
        "{e}"
    );
    // A process that arrives after the budget is gone cannot encrypt at all.
    let d = Arc::new(vault(&client, &ns, &kek));
    d.prefetch_aliases(&["worn".to_owned()]).await.unwrap();
    assert!(matches!(
        ssn_cryptor(&d, "worn").encrypt_document(&doc! { "ssn": 1 }, &Context::none()),
        Err(Error::KeyUsageLimit { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_tenant_key_shreds_only_that_tenant() {
    let (client, ns) = setup("kv_shred").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    let acme = tenant_alias("pii", "acme");
    let globex = tenant_alias("pii", "globex");
    assert_eq!(acme, "pii/acme");

    let acme_key = v.ensure_alias(&acme).await.unwrap();
    assert_eq!(v.ensure_alias(&acme).await.unwrap(), acme_key);
    v.ensure_alias(&globex).await.unwrap();
    let acme_old = encrypt(&v, &acme, "acme-1").await;
    // The tenant's key was rotated once: shredding must take every version.
    v.rotate(&acme).await.unwrap();
    let acme_new = encrypt(&v, &acme, "acme-2").await;
    let globex_doc = encrypt(&v, &globex, "globex-1").await;

    assert_eq!(v.destroy_alias(&acme).await.unwrap(), 2);
    for d in all_docs(&coll, doc! { "fieldcrypt.alias": &acme }).await {
        assert!(
            !d.contains_key("keyMaterial"),
            "a wrapped copy remains: {d:?}"
        );
    }
    for sealed in [&acme_old, &acme_new] {
        assert!(matches!(
            decrypt(&v, sealed).await,
            Err(Error::KeyDestroyed(_))
        ));
    }
    assert_eq!(
        decrypt(&v, &globex_doc)
            .await
            .unwrap()
            .get_str("ssn")
            .unwrap(),
        "globex-1"
    );
    // Another process, and this one after clearing its cache, agree.
    let other = Arc::new(vault(&client, &ns, &kek));
    assert!(matches!(
        decrypt(&other, &acme_old).await,
        Err(Error::KeyDestroyed(_))
    ));
    assert!(decrypt(&other, &globex_doc).await.is_ok());
    // A shredded tenant does not silently get a new key.
    assert!(matches!(
        v.ensure_alias(&acme).await,
        Err(Error::NoPrimaryKey(_))
    ));
    v.prefetch_aliases(std::slice::from_ref(&acme))
        .await
        .unwrap();
    assert!(matches!(
        ssn_cryptor(&v, &acme).encrypt_document(&doc! { "ssn": "x" }, &Context::none()),
        Err(Error::NoPrimaryKey(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csfle_key_documents_from_libmongocrypt_load() {
    let (client, ns) = setup("kv_csfle").await;
    let coll = raw(&client, &ns);
    // The fixture documents, verbatim, as a MongoDB driver left them in its key vault.
    let docs = fixture_keys();
    for k in &docs {
        coll.insert_one(k.to_document()).await.unwrap();
    }
    let kek = Arc::new(fixture_kek());
    let v = Arc::new(vault(&client, &ns, &kek));
    let ids: Vec<KeyId> = docs.iter().map(|k| k.id).collect();
    v.prefetch_ids(&ids).await.unwrap();
    let master = CSFLE.master_key();
    for k in &docs {
        let key = v.key(&k.id).unwrap();
        assert_eq!(key.kind(), KeyKind::Csfle);
        assert_eq!(key.state(), KeyState::Active);
        let alias = k
            .key_alt_names
            .first()
            .cloned()
            .unwrap_or_else(|| k.id.to_string());
        assert_eq!(key.alias(), alias);
        let expected = master.unwrap(&k.key_material).unwrap();
        assert_eq!(
            key.material().unwrap().expose_secret(),
            &expected.expose_secret()[..]
        );
    }

    // Values libmongocrypt encrypted decrypt through the vault.
    let case = CSFLE.lines("values.jsonl").swap_remove(0);
    let sealed = doc! { "v": case.get("ciphertext").unwrap().clone() };
    let plain = decrypt(&v, &sealed).await.unwrap();
    assert_eq!(plain.get("v"), case.get("value"));

    // By alias: readable, never primary.
    let named = docs.iter().find(|k| !k.key_alt_names.is_empty()).unwrap();
    let alias = named.key_alt_names[0].clone();
    v.prefetch_aliases(std::slice::from_ref(&alias))
        .await
        .unwrap();
    assert_eq!(v.readable_keys(&alias).unwrap()[0].id(), named.id);
    assert!(matches!(v.primary(&alias), Err(Error::NoPrimaryKey(_))));
    assert!(matches!(
        v.set_state(&named.id, KeyState::Primary).await,
        Err(Error::KeyMisuse { .. })
    ));

    // State changes keep libmongocrypt's exact layout (status only).
    v.set_state(&named.id, KeyState::Disabled).await.unwrap();
    let d = doc_of(&coll, named.id).await;
    assert_eq!(d.get("status"), Some(&Bson::Int32(1)));
    assert!(!d.contains_key("fieldcrypt"));
    CsfleKeyDocument::from_document(&d).unwrap();
    v.prefetch_ids(&[named.id]).await.unwrap();
    assert_eq!(v.key(&named.id).unwrap().state(), KeyState::Disabled);

    // Import from another master key: re-wrapped under the vault's, same id and names.
    let foreign = LocalKek::generate();
    let key = fieldcrypt::CsfleDataKey::generate(vec!["imported".into()]).unwrap();
    let foreign_doc = key.to_key_document(foreign.master_key());
    let v2 = vault(&client, &ns, &kek);
    assert_eq!(
        v2.import_csfle_key(&foreign_doc, &foreign).await.unwrap(),
        key.id()
    );
    let stored = CsfleKeyDocument::from_document(&doc_of(&coll, key.id()).await).unwrap();
    assert_eq!(stored.key_alt_names, ["imported"]);
    stored.unwrap_with(kek.master_key()).unwrap();
    assert!(matches!(
        v2.import_csfle_key(&foreign_doc, &foreign).await,
        Err(Error::KeyVault(KeyVaultError::AlreadyPresent(_)))
    ));
    assert!(matches!(
        v2.import_csfle_key(&foreign_doc, &LocalKek::generate())
            .await,
        Err(Error::KeyFormat(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_unwrap_without_the_right_kek() {
    let (client, ns) = setup("kv_wrongkek").await;
    let kek = Arc::new(LocalKek::generate());
    let v = vault(&client, &ns, &kek);
    let id = v.create_key("pii").await.unwrap();
    let wrong = vault(&client, &ns, &Arc::new(LocalKek::generate()));
    let e = wrong.prefetch_ids(&[id]).await.unwrap_err();
    assert!(
        matches!(&e, Error::KeyFormat(m) if m.contains(&id.to_string())),
        "{e}"
    );
    let named = Arc::new(LocalKek::named("eu", LocalMasterKey::generate()).unwrap());
    let other_provider = vault(&client, &ns, &named);
    let e = other_provider.prefetch_ids(&[id]).await.unwrap_err();
    assert!(e.to_string().contains("no KEK"), "{e}");
    // With the right KEK as an extra unwrapping key, it loads.
    let both = KeyVault::builder(&client, named.clone())
        .namespace(ns.as_str())
        .unwrap_also_with(kek.clone())
        .build()
        .unwrap();
    both.prefetch_ids(&[id]).await.unwrap();
    assert!(both.key(&id).is_ok());
    assert!(matches!(
        KeyVault::builder(&client, kek.clone())
            .namespace("nodot")
            .build(),
        Err(Error::InvalidArgument(ArgumentError::KeyVaultNamespace(_)))
    ));
}

#[test]
fn local_kek_from_env_and_file() {
    let master = LocalMasterKey::generate();
    let b64 = master.expose_base64();
    std::env::set_var("FIELDCRYPT_TEST_KV_MASTER", b64.as_str());
    let kek = LocalKek::from_env_var("FIELDCRYPT_TEST_KV_MASTER").unwrap();
    assert_eq!(kek.master_key().expose_base64(), b64);
    assert_eq!(kek.provider(), "local");
    assert!(matches!(
        LocalKek::from_env_var("FIELDCRYPT_TEST_KV_UNSET"),
        Err(Error::InvalidArgument(ArgumentError::MissingEnvVar(_)))
    ));
    std::env::set_var("FIELDCRYPT_TEST_KV_BAD", "c2VjcmV0");
    let e = LocalKek::from_env_var("FIELDCRYPT_TEST_KV_BAD").unwrap_err();
    assert!(
        matches!(&e, Error::KeyFormat(_)) && !e.to_string().contains("c2VjcmV0"),
        "{e}"
    );
    assert_eq!(fieldcrypt::mongo::MASTER_KEY_ENV, "FIELDCRYPT_MASTER_KEY");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    std::fs::write(&path, b64.as_bytes()).unwrap();
    assert_eq!(
        LocalKek::from_file(&path)
            .unwrap()
            .master_key()
            .expose_base64(),
        b64
    );
}

/// Every encoding a leak of `secret` could take.
fn encodings(secret: &[u8]) -> Vec<String> {
    vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        format!("{secret:?}"),
        // A prefix of the byte list, in case a Debug prints part of an array.
        format!("{:?}", &secret[..8])
            .trim_end_matches(']')
            .to_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_nothing_prints_key_bytes() {
    let (client, ns) = setup("kv_redact").await;
    let master_bytes: Vec<u8> = (0..96u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let kek = Arc::new(LocalKek::new(
        LocalMasterKey::from_bytes(&master_bytes).unwrap(),
    ));
    let v = Arc::new(vault(&client, &ns, &kek));
    let id = v.create_key("pii").await.unwrap();
    v.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    let key = v.key(&id).unwrap();
    let dek = key.material().unwrap().expose_secret().to_vec();
    let wrong = vault(&client, &ns, &Arc::new(LocalKek::generate()));
    let errors = [
        wrong.prefetch_ids(&[id]).await.unwrap_err(),
        kek.unwrap(&doc! { "provider": "local" }, &[1; 96])
            .await
            .unwrap_err(),
        LocalKek::from_env_var("FIELDCRYPT_TEST_KV_NOPE").unwrap_err(),
    ];
    let builder = KeyVault::builder(&client, kek.clone()).namespace(ns.as_str());
    let mut printed = vec![
        format!("{kek:?}"),
        format!("{kek:#?}"),
        format!("{kek}"),
        format!("{v:?}"),
        format!("{v:#?}"),
        format!("{v}"),
        format!("{key:?}"),
        format!("{:?}", v.cache_stats()),
        format!("{:?}", v.list().await.unwrap()),
        format!("{builder:?}"),
    ];
    printed.extend(
        errors
            .iter()
            .flat_map(|e| [format!("{e}"), format!("{e:?}")]),
    );
    for p in &printed {
        for secret in [&master_bytes[..], &dek[..]] {
            for enc in encodings(secret) {
                assert!(!p.contains(&enc), "leak of {enc:?} in: {p}");
            }
        }
    }
    assert!(printed[0].contains("local") && printed[3].contains(&ns));
}

/// libmongocrypt (PyMongo's `ClientEncryption`, from the dev server's Python environment) on a
/// vault fieldcrypt has written and re-wrapped: it decrypts with the CSFLE keys, and it refuses
/// fieldcrypt-managed documents (their `fieldcrypt` field), so its `rewrapManyDataKey` needs a
/// filter that leaves them out — as docs/KEY_VAULT.md says.
const LIBMONGOCRYPT_SCRIPT: &str = r#"
import base64, os, sys
import pymongo
from bson import json_util
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from pymongo.encryption import ClientEncryption
master = base64.b64decode(os.environ["KV_MASTER"])
client = pymongo.MongoClient(os.environ["KV_URI"], uuidRepresentation="standard")
ce = ClientEncryption({"local": {"key": master}}, os.environ["KV_NS"], client,
                      CodecOptions(uuid_representation=UuidRepresentation.STANDARD))
case = json_util.loads(os.environ["KV_CASE"])
assert ce.decrypt(case["ciphertext"]) == case["value"], "decrypt"
print("keys", len(list(ce.get_keys())))
r = ce.rewrap_many_data_key({"fieldcrypt": {"$exists": False}}, provider="local")
print("rewrapped", r.bulk_write_result.modified_count)
try:
    ce.rewrap_many_data_key({}, provider="local")
    print("unfiltered ok")
except Exception as e:
    print("unfiltered refused:", e)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libmongocrypt_reads_the_vault() {
    // No Python environment is a failure, never a skip: the test would prove nothing.
    let python = DevServer::python_env().expect("a Python environment with pymongocrypt");
    let (client, ns) = setup("kv_lmc").await;
    let old_kek = Arc::new(LocalKek::generate());
    let new_kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &old_kek));
    let csfle = fixture_keys();
    for k in &csfle {
        v.import_csfle_key(k, &fixture_kek()).await.unwrap();
    }
    v.create_key("pii").await.unwrap();
    v.rewrap(new_kek.clone()).await.unwrap();

    let case = CSFLE
        .read("values.jsonl")
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let out = tokio::process::Command::new(python)
        .arg("-c")
        .arg(LIBMONGOCRYPT_SCRIPT)
        .env("KV_URI", DevServer::shared().unwrap().uri())
        .env("KV_NS", &ns)
        .env("KV_MASTER", new_kek.master_key().expose_base64().as_str())
        .env("KV_CASE", case)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("keys {}", csfle.len() + 1)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("rewrapped {}", csfle.len())),
        "{stdout}"
    );
    assert!(
        stdout.contains("unfiltered refused: unrecognized field 'fieldcrypt'"),
        "{stdout}"
    );

    // And fieldcrypt reads what libmongocrypt re-wrapped.
    let fresh = Arc::new(vault(&client, &ns, &new_kek));
    let ids: Vec<KeyId> = csfle.iter().map(|k| k.id).collect();
    fresh.prefetch_ids(&ids).await.unwrap();
    for id in &ids {
        assert_eq!(fresh.key(id).unwrap().kind(), KeyKind::Csfle);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_rewrap_half_way_keeps_every_key_readable() {
    let (client, ns) = setup("kv_rewrap_fail").await;
    let kek = Arc::new(LocalKek::generate());
    let new_kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    v.create_key("a").await.unwrap();
    v.create_key("b").await.unwrap();
    let sealed = encrypt(&v, "a", "x").await;
    // A key no KEK of the vault unwraps, last in _id order.
    let mut foreign = fixture_keys()[0].to_document();
    foreign.insert(
        "_id",
        Binary {
            subtype: BinarySubtype::Uuid,
            bytes: vec![0xff; 16],
        },
    );
    foreign.remove("keyAltNames");
    coll.insert_one(foreign).await.unwrap();

    let report = v.rewrap(new_kek.clone()).await.unwrap();
    let failed = report.failed.expect("the foreign key stops the run");
    assert_eq!(
        failed.id.to_string(),
        "ffffffff-ffff-ffff-ffff-ffffffffffff"
    );
    assert!(
        matches!(&failed.error, Error::KeyFormat(m) if m.contains("ffffffff")),
        "{}",
        failed.error
    );
    assert_eq!(report.keys.len(), 2);
    // The two keys before it moved; this vault still reads them (and so its data).
    let moved = all_docs(&coll, doc! { "fieldcrypt": { "$exists": true } }).await;
    assert_eq!(moved.len(), 2);
    for d in &moved {
        unwrap_doc(&new_kek, d).await.unwrap();
    }
    v.clear_cache();
    assert!(decrypt(&v, &sealed).await.is_ok());
    assert_eq!(v.kek_provider(), "local");
}

// ---- a key-vault writer without the KEK (review finding M5) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_key_material_copied_to_another_key() {
    let (client, ns) = setup("kv_copy").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    let acme = tenant_alias("pii", "acme");
    let globex = tenant_alias("pii", "globex");
    let acme_key = v.ensure_alias(&acme).await.unwrap();
    let globex_key = v.ensure_alias(&globex).await.unwrap();
    let acme_doc = encrypt(&v, &acme, "acme-1").await;
    let globex_doc = encrypt(&v, &globex, "globex-1").await;
    let acme_saved = doc_of(&coll, acme_key).await;
    let globex_saved = doc_of(&coll, globex_key).await;
    let material_of = |d: &Document| d.get("keyMaterial").unwrap().clone();
    // Each check reads the vault afresh, as another process (or this one after its TTL) would.
    let fresh = || Arc::new(vault(&client, &ns, &kek));
    let refused = |e: Error, id: KeyId| {
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains(&id.to_string()) && m.contains("another key")),
            "{e}"
        );
    };

    // 1. globex's wrapped key copied into acme's document: acme's key no longer unwraps (a
    //    denial of service, not a key swap), and globex is unaffected.
    coll.update_one(
        doc! { "_id": acme_key.to_binary() },
        doc! { "$set": { "keyMaterial": material_of(&globex_saved) } },
    )
    .await
    .unwrap();
    refused(decrypt(&fresh(), &acme_doc).await.unwrap_err(), acme_key);
    refused(
        fresh()
            .prefetch_aliases(std::slice::from_ref(&acme))
            .await
            .unwrap_err(),
        acme_key,
    );
    assert!(decrypt(&fresh(), &globex_doc).await.is_ok());
    coll.replace_one(doc! { "_id": acme_key.to_binary() }, acme_saved.clone())
        .await
        .unwrap();
    assert!(decrypt(&fresh(), &acme_doc).await.is_ok());

    // 2. A key moved to another tenant by rewriting its alias: it does not unwrap there.
    coll.update_one(
        doc! { "_id": globex_key.to_binary() },
        doc! { "$set": { "fieldcrypt.alias": &acme, "fieldcrypt.generation": 1000 } },
    )
    .await
    .unwrap();
    refused(
        fresh()
            .prefetch_aliases(std::slice::from_ref(&acme))
            .await
            .unwrap_err(),
        globex_key,
    );
    coll.replace_one(doc! { "_id": globex_key.to_binary() }, globex_saved.clone())
        .await
        .unwrap();

    // 3. Crypto-shredding: globex is destroyed; a copy of its wrapped key planted in a new
    //    document (new id, any alias, made primary) does not unwrap, so acme cannot be made to
    //    encrypt under globex's key, and globex's data stays unreadable.
    assert_eq!(v.destroy_alias(&globex).await.unwrap(), 1);
    let mut planted = globex_saved.clone();
    let planted_id = KeyId::random();
    planted.insert("_id", planted_id.to_binary());
    planted.insert("keyAltNames", vec![format!("{acme}:v99")]);
    let f = planted.get_document_mut("fieldcrypt").unwrap();
    f.insert("alias", acme.as_str());
    f.insert("generation", 99i64);
    f.insert("version", 99i64);
    coll.insert_one(planted).await.unwrap();
    refused(
        fresh()
            .prefetch_aliases(std::slice::from_ref(&acme))
            .await
            .unwrap_err(),
        planted_id,
    );
    assert!(matches!(
        decrypt(&fresh(), &globex_doc).await,
        Err(Error::KeyDestroyed(_))
    ));
    coll.delete_one(doc! { "_id": planted_id.to_binary() })
        .await
        .unwrap();

    // 4. A managed document turned into a MongoDB-style one (fieldcrypt field removed, read
    //    with no associated data) does not unwrap either.
    let mut csfle_like = acme_saved.clone();
    csfle_like.remove("fieldcrypt");
    csfle_like.insert("_id", KeyId::random().to_binary());
    csfle_like.insert("keyAltNames", vec!["stolen"]);
    coll.insert_one(csfle_like).await.unwrap();
    assert!(matches!(
        fresh().prefetch_aliases(&["stolen".to_owned()]).await,
        Err(Error::KeyFormat(_))
    ));
    assert!(decrypt(&fresh(), &acme_doc).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_providers_get_the_key_identity_as_associated_data() {
    let (client, ns) = setup("kv_ad").await;
    let local = Arc::new(LocalKek::generate());
    let kek = Arc::new(RecordingKek::new(&local, Duration::ZERO));
    let v = Arc::new(
        KeyVault::builder(&client, kek.clone())
            .namespace(ns.as_str())
            .build()
            .unwrap(),
    );
    let coll = raw(&client, &ns);
    let id = v.create_key("pii/acme").await.unwrap();
    let ad = KeyVault::associated_data(&id, "pii/acme", KeyKind::Fieldcrypt);
    assert!(ad.starts_with(b"fieldcrypt/dek-wrap/v2\0"));
    assert_eq!(*kek.wrapped_with.lock().unwrap(), vec![ad.clone()]);
    // MongoDB's CSFLE keys: no associated data, as libmongocrypt wraps them.
    let csfle = &fixture_keys()[0];
    v.import_csfle_key(csfle, &fixture_kek()).await.unwrap();
    assert_eq!(kek.wrapped_with.lock().unwrap()[1], Vec::<u8>::new());
    assert!(KeyVault::associated_data(&csfle.id, "x", KeyKind::Csfle).is_empty());
    // Re-wrapping keeps each key's binding.
    let new_local = Arc::new(LocalKek::generate());
    assert_eq!(v.rewrap(new_local.clone()).await.unwrap().rewrapped(), 2);
    for d in all_docs(&coll, doc! {}).await {
        unwrap_doc(&new_local, &d).await.unwrap();
    }

    // Key documents read another way (a mongoexport) unwrap with the same rules.
    let docs = all_docs(&coll, doc! {}).await;
    let keys = KeyVault::keys_from_documents(&docs, &*new_local)
        .await
        .unwrap();
    let k = keys.iter().find(|k| k.id() == id).unwrap();
    assert_eq!(
        (k.alias(), k.kind(), k.state()),
        ("pii/acme", KeyKind::Fieldcrypt, KeyState::Primary)
    );
    assert!(keys
        .iter()
        .any(|k| k.id() == csfle.id && k.kind() == KeyKind::Csfle));
    let mut moved = docs.clone();
    for d in &mut moved {
        if d.contains_key("fieldcrypt") {
            d.get_document_mut("fieldcrypt")
                .unwrap()
                .insert("alias", "pii/globex");
        }
    }
    let e = KeyVault::keys_from_documents(&moved, &*new_local)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::KeyFormat(m) if m.contains(&id.to_string())),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_format_1_key_documents_with_a_clear_error() {
    // fieldcrypt's first key-document format wrapped with empty associated data and had no
    // `fieldcrypt.format`. Such a document is listed and can be destroyed, never unwrapped.
    let (client, ns) = setup("kv_v1").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    let id = KeyId::random();
    let (mk, wrapped) = kek
        .wrap_with_ad(&KeyMaterial::generate(32), &[])
        .await
        .unwrap();
    let now = bson::DateTime::now();
    let v1 = doc! {
        "_id": id.to_binary(), "keyAltNames": ["old:v1"],
        "keyMaterial": Binary { subtype: BinarySubtype::Generic, bytes: wrapped },
        "creationDate": now, "updateDate": now, "status": 0, "masterKey": mk,
        "fieldcrypt": { "alias": "old", "state": "primary", "kind": "fieldcrypt",
                        "version": 1i64, "generation": 1i64, "encryptions": 0i64 },
    };
    coll.insert_one(v1.clone()).await.unwrap();
    for e in [
        v.prefetch_ids(&[id]).await.unwrap_err(),
        v.prefetch_aliases(&["old".to_owned()]).await.unwrap_err(),
        KeyVault::keys_from_documents(&[v1], &*kek)
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(&e, Error::KeyFormat(m) if m.contains(&id.to_string()) && m.contains("format 1")),
            "{e}"
        );
    }
    let list = v.list().await.unwrap();
    assert_eq!((list[0].id, list[0].state), (id, KeyState::Primary));
    v.destroy(&id).await.unwrap();
    v.prefetch_ids(&[id]).await.unwrap();
    assert!(matches!(v.key(&id).unwrap().state(), KeyState::Destroyed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroyed_keys_stay_destroyed_in_this_process() {
    let (client, ns) = setup("kv_revive").await;
    let kek = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &kek));
    let coll = raw(&client, &ns);
    let id = v.create_key("pii").await.unwrap();
    let keep = v.create_key("keep").await.unwrap();
    let sealed = encrypt(&v, "pii", "x").await;
    let saved = doc_of(&coll, id).await;
    v.destroy(&id).await.unwrap();
    assert!(matches!(
        decrypt(&v, &sealed).await,
        Err(Error::KeyDestroyed(_))
    ));

    // A key-vault writer (or a restored backup) puts the old document back, material and all:
    // the wrapped key is its own, so it would unwrap. This process refuses it anyway.
    coll.replace_one(doc! { "_id": id.to_binary() }, saved)
        .await
        .unwrap();
    v.clear_cache();
    assert!(matches!(
        decrypt(&v, &sealed).await,
        Err(Error::KeyDestroyed(k)) if k == id
    ));
    v.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert!(matches!(v.primary("pii"), Err(Error::NoPrimaryKey(_))));
    assert!(matches!(
        v.set_state(&id, KeyState::Active).await,
        Err(Error::KeyDestroyed(_))
    ));
    // Not carried over to a new KEK either; destroying it again works.
    assert_eq!(
        v.rewrap(Arc::new(LocalKek::generate()))
            .await
            .unwrap()
            .rewrapped(),
        1
    );
    v.destroy(&id).await.unwrap();
    assert!(!doc_of(&coll, id).await.contains_key("keyMaterial"));
    v.prefetch_ids(&[keep]).await.unwrap();
    assert_eq!(v.key(&keep).unwrap().state(), KeyState::Primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_never_go_down_on_the_word_of_the_vault() {
    let (client, ns) = setup("kv_reset").await;
    let kek = Arc::new(LocalKek::generate());
    let coll = raw(&client, &ns);
    let a = Arc::new(
        KeyVault::builder(&client, kek.clone())
            .namespace(ns.as_str())
            .usage_lease(8192)
            .build()
            .unwrap(),
    );
    let id = a.create_key("pii").await.unwrap();
    let pii = ["pii".to_owned()];
    a.prefetch_aliases(&pii).await.unwrap();
    let cryptor = ssn_cryptor(&a, "pii");
    for i in 0..3000 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    a.prefetch_aliases(&pii).await.unwrap();
    assert_eq!(stored_count(&doc_of(&coll, id).await), 4096 + 8192);
    let reset = || async {
        coll.update_one(
            doc! { "_id": id.to_binary() },
            doc! { "$set": { "fieldcrypt.encryptions": 0i64 } },
        )
        .await
        .unwrap();
    };

    // Reset while the key is out of this process's cache: the reload neither restarts the
    // in-memory counter from 0 nor leaves the stored count lowered.
    reset().await;
    a.clear_cache();
    a.prefetch_aliases(&pii).await.unwrap();
    assert!(a.key(&id).unwrap().encryptions() >= 4096 + 8192);
    let stored = stored_count(&doc_of(&coll, id).await);
    assert!(stored >= 4096 + 8192 + 4096, "{stored}");

    // Reset while it is cached: the next renewal notices and raises the count back.
    reset().await;
    let before = a.key(&id).unwrap().encryptions();
    for i in 0..2100 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    a.prefetch_aliases(&pii).await.unwrap();
    let stored = u64::try_from(stored_count(&doc_of(&coll, id).await)).unwrap();
    assert!(stored >= before + 4096 + 8192, "{stored} {before}");
    assert!(stored >= a.key(&id).unwrap().encryptions());
}

// ---- review finding L4 ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readable_keys_never_answers_with_a_partial_list() {
    let (client, ns) = setup("kv_partial").await;
    let kek = Arc::new(LocalKek::generate());
    let coll = raw(&client, &ns);
    let maker = vault(&client, &ns, &kek);
    let k1 = maker.create_key("pii").await.unwrap();
    let k2 = maker.rotate("pii").await.unwrap();
    let pii = ["pii".to_owned()];
    let complete = |r: fieldcrypt::Result<Vec<Arc<fieldcrypt::Key>>>| match r {
        Ok(keys) => {
            let ids: Vec<KeyId> = keys.iter().map(|k| k.id()).collect();
            assert_eq!(ids, vec![k2, k1], "a partial list");
            true
        }
        Err(Error::UnknownAlias(_) | Error::UnknownKey(_)) => false,
        Err(e) => panic!("{e}"),
    };

    // A slow KEK (a remote KMS): the keys of one alias are loaded 400 ms apart, so the first
    // expires 400 ms before a list stamped at the end of the load would.
    let ttl = Duration::from_millis(1200);
    let slow = Arc::new(RecordingKek::new(&kek, Duration::from_millis(400)));
    let v = KeyVault::builder(&client, slow)
        .namespace(ns.as_str())
        .cache_ttl(ttl)
        .build()
        .unwrap();
    v.prefetch_aliases(&pii).await.unwrap();
    assert!(complete(v.readable_keys("pii")));
    let until = Instant::now() + ttl + Duration::from_millis(300);
    let mut refused = false;
    while Instant::now() < until {
        refused |= !complete(v.readable_keys("pii"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the list outlived its keys");

    // A key reloaded on its own and found gone leaves a hole in its alias's list: refused.
    let v = vault_ttl(&client, &ns, &kek, Duration::from_secs(4));
    v.prefetch_aliases(&pii).await.unwrap();
    coll.delete_one(doc! { "_id": k1.to_binary() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    v.prefetch_ids(&[k1]).await.unwrap();
    assert!(matches!(v.readable_keys("pii"), Err(Error::UnknownKey(k)) if k == k1));
    // The next prefetch of the alias reloads it, without the deleted key.
    v.prefetch_aliases(&pii).await.unwrap();
    let ids: Vec<KeyId> = v
        .readable_keys("pii")
        .unwrap()
        .iter()
        .map(|k| k.id())
        .collect();
    assert_eq!(ids, vec![k2]);
}

// ---- review finding L7 ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_leases_renew_as_soon_as_half_is_used() {
    let (client, ns) = setup("kv_renew").await;
    let kek = Arc::new(LocalKek::generate());
    let coll = raw(&client, &ns);
    let a = Arc::new(
        KeyVault::builder(&client, kek.clone())
            .namespace(ns.as_str())
            .usage_lease(1 << 16)
            .build()
            .unwrap(),
    );
    let id = a.create_key("pii").await.unwrap();
    a.prefetch_aliases(&["pii".to_owned()]).await.unwrap();
    assert_eq!(stored_count(&doc_of(&coll, id).await), 4096);
    let stored_reaches = |at_least: i64| {
        let coll = coll.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let n = stored_count(&doc_of(&coll, id).await);
                if n >= at_least || Instant::now() > deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Past half of the lease, with no prefetch: the next lease is reserved in the background.
    let cryptor = ssn_cryptor(&a, "pii");
    for i in 0..2100 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    assert_eq!(stored_reaches(4096 + 8192).await, 4096 + 8192);

    // One long batch past everything reserved at its start: the renewals keep up with it.
    for i in 0..14_000 {
        cryptor
            .encrypt_document(&doc! { "ssn": i }, &Context::none())
            .unwrap();
    }
    cryptor.settle_usage();
    let used = i64::try_from(a.key(&id).unwrap().encryptions()).unwrap();
    assert_eq!(used, 16_100);
    let stored = stored_reaches(used).await;
    assert!(stored >= used, "{stored} < {used}");
}

/// A KEK that stands for a KMS: it writes one masterKey document (so a rewrap can tell which
/// keys it already holds) and goes down after `up_for` wraps, as a KMS outage would.
#[derive(Debug)]
struct OutageKek {
    inner: LocalKek,
    master_key: Document,
    up_for: std::sync::atomic::AtomicI64,
}

impl OutageKek {
    fn new(up_for: i64) -> Self {
        let inner = LocalKek::named("kms", LocalMasterKey::generate()).unwrap();
        Self {
            inner,
            master_key: doc! { "provider": "local:kms" },
            up_for: std::sync::atomic::AtomicI64::new(up_for),
        }
    }

    fn heal(&self) {
        self.up_for
            .store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl KekProvider for OutageKek {
    fn provider(&self) -> &str {
        self.inner.provider()
    }

    fn wraps_under(&self) -> Option<&Document> {
        Some(&self.master_key)
    }

    async fn wrap_with_ad(
        &self,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> fieldcrypt::Result<(Document, Vec<u8>)> {
        if self
            .up_for
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            <= 0
        {
            return Err(Error::Kms {
                provider: "local:kms".into(),
                reason: "key local:kms: cannot connect (4 attempts)".into(),
            });
        }
        self.inner.wrap_with_ad(dek, ad).await
    }

    async fn unwrap_with_ad(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> fieldcrypt::Result<KeyMaterial> {
        self.inner.unwrap_with_ad(master_key, wrapped, ad).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_stops_cleanly_at_a_kms_outage_and_resumes() {
    let (client, ns) = setup("kv_rewrap_resume").await;
    let old = Arc::new(LocalKek::generate());
    let v = Arc::new(vault(&client, &ns, &old));
    let mut sealed = Vec::new();
    for alias in ["a", "b", "c", "d"] {
        v.create_key(alias).await.unwrap();
        sealed.push(encrypt(&v, alias, alias).await);
    }
    let csfle = v.create_csfle_key(&["mongo".to_owned()]).await.unwrap();
    let calls_before = v.cache_stats().kms_calls;

    // The KMS goes down after two wraps.
    let kms = Arc::new(OutageKek::new(2));
    let report = v.rewrap(kms.clone()).await.unwrap();
    let failed = report.failed.as_ref().expect("the outage stops the run");
    assert!(
        matches!(&failed.error, Error::Kms { provider, .. } if provider == "local:kms"),
        "{failed:?}"
    );
    assert_eq!(report.rewrapped(), 2, "{report:?}");
    assert_eq!(report.keys.len(), 2);
    // Nothing is lost: a process with both KEKs reads every key; the vault still wraps new keys
    // with the old KEK (the move is not complete).
    let both = Arc::new(
        KeyVault::builder(&client, old.clone())
            .namespace(&ns)
            .unwrap_also_with(kms.clone())
            .build()
            .unwrap(),
    );
    for s in &sealed {
        decrypt(&both, s).await.unwrap();
    }
    assert_eq!(v.kek_provider(), "local");

    // The KMS is back: the same rewrap resumes, without touching the keys already moved.
    kms.heal();
    let report = v.rewrap(kms.clone()).await.unwrap();
    assert!(report.failed.is_none(), "{report:?}");
    let already = report
        .keys
        .iter()
        .filter(|k| k.outcome == RewrapOutcome::AlreadyThere)
        .count();
    assert_eq!((already, report.rewrapped()), (2, 3), "{report:?}");
    assert!(report.keys.iter().all(|k| k.to == "local:kms"));
    assert!(report.keys.iter().any(|k| k.id == csfle));
    assert_eq!(v.kek_provider(), "local:kms");
    // Every key unwraps with the new KEK alone.
    let fresh = Arc::new(
        KeyVault::builder(&client, kms.clone())
            .namespace(&ns)
            .build()
            .unwrap(),
    );
    for s in &sealed {
        decrypt(&fresh, s).await.unwrap();
    }
    // KEK calls were counted: per key re-wrapped, one unwrap and one wrap (plus the failed
    // wrap); none for the keys already there.
    let calls = v.cache_stats().kms_calls - calls_before;
    assert_eq!(calls, 2 * 2 + 2 + 2 * 3, "{calls}");
}
