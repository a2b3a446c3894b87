//! Small set-ups the integration tests share, so that each test says only what is its own.
//!
//! [`Interop`] opens the interop fixtures that libmongocrypt wrote (`tests/fixtures/csfle/`
//! and `tests/fixtures/qe/`, each made by the `generate.py` beside them) for the library's
//! tests and the CLI's alike.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bson::{Bson, Document};
use fieldcrypt::{
    CsfleKeyDocument, CsfleKeySet, Error, InMemoryKeyring, Key, KeyKind, KeyMaterial, KeyState,
    LocalMasterKey,
};
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;

use crate::devserver::{unique_db_name, DevServer};

/// Flips every bit of `ciphertext` (a MongoDB FLE1 or unindexed QE value, subtype 6: an
/// 18-byte header of form byte, key id and type, then what the AEAD authenticates) one at a
/// time, and checks that each flip fails decryption as those formats must: past the header
/// with the one opaque [`Error::Decrypt`]; in the header as another form, a type the format
/// never stores, a key `set` lacks, or authenticated data that no longer matches.
///
/// # Panics
/// On the first flip that decrypts, or fails otherwise: in a test, that is the failure.
pub fn assert_every_bit_flip_fails(set: &CsfleKeySet, name: &str, ciphertext: &bson::Binary) {
    for i in 0..ciphertext.bytes.len() {
        for bit in 0..8 {
            let mut t = ciphertext.clone();
            t.bytes[i] ^= 1 << bit;
            let r = set.decrypt_value(&t);
            match (i, &r) {
                (18.., Err(Error::Decrypt)) => {}
                (
                    ..=17,
                    Err(
                        Error::Decrypt
                        | Error::MalformedCiphertext(_)
                        | Error::UnsupportedType { .. }
                        | Error::UnknownKey(_),
                    ),
                ) => {}
                _ => panic!("{name} byte {i} bit {bit}: {r:?}"),
            }
        }
    }
}

/// An in-memory keyring with a fresh primary key for each alias.
#[must_use]
pub fn keyring_with(aliases: &[&str]) -> Arc<InMemoryKeyring> {
    let ring = Arc::new(InMemoryKeyring::new());
    for alias in aliases {
        ring.generate(alias);
    }
    ring
}

/// The document as the server stores it (read around fieldcrypt), of type `D`
/// (`Document`, `RawDocumentBuf`, …).
///
/// # Panics
/// If the read fails or no document matches: in a test, that is the failure.
pub async fn stored<D>(db: &mongodb::Database, collection: &str, filter: Document) -> D
where
    D: DeserializeOwned + Send + Sync,
{
    #[allow(clippy::expect_used)] // test helper: a failed read is a failed test
    db.collection::<D>(collection)
        .find_one(filter)
        .await
        .expect("reading the stored document")
        .expect("no stored document matches")
}

/// Every document of `coll` as the server stores it, in `_id` order.
///
/// # Panics
/// If the read fails: in a test, that is the failure.
pub async fn all_stored<D>(coll: &mongodb::Collection<D>) -> Vec<D>
where
    D: DeserializeOwned + Send + Sync,
{
    #[allow(clippy::expect_used)] // test helper: a failed read is a failed test
    let mut cursor = coll
        .find(bson::doc! {})
        .sort(bson::doc! { "_id": 1 })
        .await
        .expect("reading the stored documents");
    let mut all = Vec::new();
    #[allow(clippy::expect_used)] // as above
    while cursor
        .advance()
        .await
        .expect("reading the stored documents")
    {
        all.push(
            cursor
                .deserialize_current()
                .expect("reading a stored document"),
        );
    }
    all
}

/// The commands a client sent, name and body, in order: what [`recording_client`] records.
#[derive(Clone, Debug, Default)]
pub struct Sent(Arc<Mutex<Vec<(String, Document)>>>);

impl Sent {
    fn log(&self) -> std::sync::MutexGuard<'_, Vec<(String, Document)>> {
        // A panic elsewhere while recording leaves a usable log.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was sent so far.
    pub fn clear(&self) {
        self.log().clear();
    }

    /// Whether nothing was sent since the last [`Self::clear`].
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.log().is_empty()
    }

    /// The command names, in order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.log().iter().map(|(name, _)| name.clone()).collect()
    }

    /// The commands, name and body, in order.
    #[must_use]
    pub fn commands(&self) -> Vec<(String, Document)> {
        self.log().clone()
    }
}

/// A client of the shared dev server that records every command it starts (the driver's
/// command monitoring), for tests that check what was sent, or that nothing was.
///
/// # Panics
/// If the dev server cannot be found or started: in a test, that is the failure.
pub async fn recording_client() -> (mongodb::Client, Sent) {
    #[allow(clippy::expect_used)] // test helper: no server is a failed test
    let server = DevServer::shared().expect("the dev server");
    #[allow(clippy::expect_used)] // as above
    let mut options = ClientOptions::parse(server.uri())
        .await
        .expect("the dev server's URI");
    let sent = Sent::default();
    let sink = sent.clone();
    options.command_event_handler = Some(EventHandler::callback(move |ev: CommandEvent| {
        if let CommandEvent::Started(s) = ev {
            sink.log().push((s.command_name, s.command));
        }
    }));
    #[allow(clippy::expect_used)] // as above
    let client = mongodb::Client::with_options(options).expect("a client of the dev server");
    (client, sent)
}

/// One Extended JSON value (relaxed or canonical).
///
/// # Panics
/// If `text` is no Extended JSON: in a test, that is the failure.
#[must_use]
pub fn ext_json(text: &str) -> Bson {
    #[allow(clippy::expect_used)] // test helper: bad fixture text is a failed test
    let json = serde_json::from_str::<serde_json::Value>(text).expect("not JSON");
    #[allow(clippy::expect_used)] // as above
    Bson::try_from(json).expect("not Extended JSON")
}

/// One document per non-blank line of Extended JSON (a `.jsonl` fixture, or a command's
/// output).
///
/// # Panics
/// If a line is no Extended JSON document: in a test, that is the failure.
#[must_use]
pub fn ext_json_lines(text: &str) -> Vec<Document> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match ext_json(l) {
            Bson::Document(d) => d,
            other => panic!("not a document: {other:?}"),
        })
        .collect()
}

/// Whether `a` and `b` are the same as canonical Extended JSON, which tells NaN, -0.0 and
/// every type apart exactly (`==` does not).
#[must_use]
pub fn same(a: &Bson, b: &Bson) -> bool {
    a.clone().into_canonical_extjson() == b.clone().into_canonical_extjson()
}

/// A directory of interop fixtures made by libmongocrypt: key documents wrapped under the
/// directory's `master-key.txt`, values and documents in Extended JSON.
#[derive(Clone, Copy, Debug)]
pub struct Interop(&'static str);

impl Interop {
    /// `tests/fixtures/csfle/`: CSFLE (FLE1) values and key documents.
    pub const CSFLE: Self = Self("csfle");
    /// `tests/fixtures/qe/`: Queryable Encryption values, key documents and vectors.
    pub const QE: Self = Self("qe");

    /// The directory.
    #[must_use]
    pub fn dir(self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(self.0)
    }

    /// The path of `file` in the directory.
    #[must_use]
    pub fn path(self, file: &str) -> PathBuf {
        self.dir().join(file)
    }

    /// The text of `file`.
    ///
    /// # Panics
    /// If it cannot be read: in a test, that is the failure.
    #[must_use]
    pub fn read(self, file: &str) -> String {
        let path = self.path(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The documents of the `.jsonl` file `file`, one a line.
    #[must_use]
    pub fn lines(self, file: &str) -> Vec<Document> {
        ext_json_lines(&self.read(file))
    }

    /// `document.json`: the `encrypted` document as libmongocrypt wrote it and the
    /// `decrypted` one its automatic decryption read back.
    ///
    /// # Panics
    /// If the file is not such a document: in a test, that is the failure.
    #[must_use]
    pub fn document(self) -> (Document, Document) {
        let Bson::Document(fx) = ext_json(&self.read("document.json")) else {
            panic!("document.json: not a document")
        };
        let part = |name: &str| {
            fx.get_document(name)
                .unwrap_or_else(|e| panic!("document.json: {name}: {e}"))
                .clone()
        };
        (part("encrypted"), part("decrypted"))
    }

    /// `master-key.txt`: the local master key the key documents are wrapped under.
    ///
    /// # Panics
    /// If it cannot be read: in a test, that is the failure.
    #[must_use]
    pub fn master_key(self) -> LocalMasterKey {
        #[allow(clippy::expect_used)] // test helper: a bad fixture is a failed test
        LocalMasterKey::from_file(self.path("master-key.txt")).expect("master-key.txt")
    }

    /// The key documents of `file` (`keys.jsonl`, …), still wrapped.
    ///
    /// # Panics
    /// If they cannot be read: in a test, that is the failure.
    #[must_use]
    pub fn key_documents(self, file: &str) -> Vec<CsfleKeyDocument> {
        CsfleKeyDocument::read_extended_json_file(self.path(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// The key documents of `file`, unwrapped into a key set.
    ///
    /// # Panics
    /// If they cannot be read or unwrapped: in a test, that is the failure.
    #[must_use]
    pub fn key_set(self, file: &str) -> CsfleKeySet {
        CsfleKeySet::load_extended_json_file(self.path(file), &self.master_key())
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    }

    /// The key documents of `file` as keyring keys (`KeyKind::Csfle`, active, aliased by
    /// their id), as the CLI and the key vault load them: what `Cryptor` reads CSFLE and QE
    /// values with.
    ///
    /// # Panics
    /// If they cannot be read or unwrapped: in a test, that is the failure.
    #[must_use]
    pub fn keyring(self, file: &str) -> InMemoryKeyring {
        let ring = InMemoryKeyring::new();
        let master = self.master_key();
        for doc in self.key_documents(file) {
            let material = master
                .unwrap(&doc.key_material)
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            let key = Key::from_material(
                doc.id,
                doc.id.to_string(),
                KeyKind::Csfle,
                KeyState::Active,
                KeyMaterial::from_slice(material.expose_secret()),
                0,
            )
            .unwrap_or_else(|e| panic!("{file}: {e}"));
            ring.insert(key);
        }
        ring
    }

    /// Runs the directory's `verify_fieldcrypt_output.py` (libmongocrypt itself, through the
    /// test kit's venv, against the shared dev server) on `jsonl`: the lines fieldcrypt wrote,
    /// a key document first. Its key vault is a fresh database named after `db_prefix`.
    ///
    /// # Panics
    /// If the venv, the server or the script cannot be started: in a test, that is the
    /// failure. The script's own verdict is the caller's to assert.
    #[must_use]
    pub fn verify_fieldcrypt_output(self, jsonl: &str, db_prefix: &str) -> std::process::Output {
        let path = std::env::temp_dir().join(format!(
            "fieldcrypt-{}-output-{}.jsonl",
            self.0,
            std::process::id()
        ));
        std::fs::write(&path, jsonl).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        #[allow(clippy::expect_used)] // test helper: no venv or server is a failed test
        let python = DevServer::python_env().expect("the test kit's Python venv");
        #[allow(clippy::expect_used)] // as above
        let server = DevServer::shared().expect("the dev server");
        let out = std::process::Command::new(python)
            .arg(self.path("verify_fieldcrypt_output.py"))
            .arg(&path)
            .env("MONGODB_URI", server.uri())
            .env("FIELDCRYPT_KEY_VAULT_DB", unique_db_name(db_prefix))
            .output();
        // Removed before the verdict: the script prints what it rejected.
        let _ = std::fs::remove_file(&path);
        #[allow(clippy::expect_used)] // as above
        out.expect("running verify_fieldcrypt_output.py")
    }
}

/// A tracing subscriber that keeps every event and span field fieldcrypt (or anything else)
/// emits.
struct LogCapture(Arc<Mutex<String>>);

struct Visit<'a>(&'a mut String);

impl tracing::field::Visit for Visit<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
}

impl tracing::Subscriber for LogCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.push_str(span.metadata().name());
        span.record(&mut Visit(&mut log));
        log.push('\n');
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut Visit(
            &mut self.0.lock().unwrap_or_else(PoisonError::into_inner),
        ));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.push_str(event.metadata().target());
        event.record(&mut Visit(&mut log));
        log.push('\n');
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Everything logged through `tracing` in this test process from the first call on: the
/// first call installs a capturing subscriber as the global default (so call it before the
/// code under test logs anything).
///
/// # Panics
/// If another global subscriber is already installed.
#[must_use]
pub fn log_capture() -> Arc<Mutex<String>> {
    static LOG: OnceLock<Arc<Mutex<String>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(String::new()));
        #[allow(clippy::expect_used)] // test helper: a second subscriber is a test bug
        tracing::subscriber::set_global_default(LogCapture(log.clone()))
            .expect("no other global tracing subscriber");
        log
    })
    .clone()
}
