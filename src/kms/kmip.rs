//! The `kmip` KMS provider: a KMIP 1.x server over mutual TLS, exactly as libmongocrypt uses
//! it, so MongoDB's drivers and fieldcrypt read each other's keys.
//!
//! ```text
//!  masterKey {provider: "kmip", keyId?, endpoint?}          masterKey {…, delegated: true}
//!  ─────────────────────────────────────────────            ───────────────────────────────
//!  no keyId: Register SecretData (96 random bytes),         no keyId: Create AES-256 key,
//!            Activate it; keyId = its identifier                      Activate it
//!  Get keyId ──▶ 96-byte secret ──▶ wrap locally,           Encrypt keyId (AES-CBC, random IV
//!  AEAD_AES_256_CBC_HMAC_SHA_512, as `local` does           by the server) ──▶ keyMaterial =
//!  ──▶ keyMaterial                                          IV ‖ ciphertext
//! ```
//!
//! **Non-delegated** (the default): the KMIP server keeps a 96-byte secret (a SecretData
//! object) that is used here as a local master key; fieldcrypt fetches it with Get for every
//! wrap and unwrap (the key vault's cache keeps the unwrapped data keys, not the secret) and
//! never keeps it beyond the call.
//!
//! **Delegated** (`delegated: true`): the data key is encrypted by the server (KMIP Encrypt and
//! Decrypt with an AES-256 key) and never leaves it in clear. KMIP's AES-CBC binds nothing, so
//! for fieldcrypt's own keys (non-empty associated data) a tag `HMAC-SHA-256(data key,
//! label ‖ associated data)` follows the ciphertext and is checked in constant time on unwrap
//! (as the key vault's documentation asks of a KMS without a binding); MongoDB's CSFLE keys
//! (empty associated data) are stored exactly as libmongocrypt stores them, `IV ‖ ciphertext`.
//!
//! Requests are byte for byte libmongocrypt's ([`message`]); the TTLV codec ([`ttlv`]) is
//! fieldcrypt's own, strict on every length. NLnet Labs' `kmip-protocol` crate was considered:
//! it cannot Register or Get SecretData objects and depends on rustls 0.19.

mod message;
mod transport;
mod ttlv;

use core::fmt;
use std::sync::Arc;

use bson::{doc, Bson, Document};
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::Sha256;
use zeroize::Zeroizing;

use self::message::{Operation, Request, Response, ResponseError, IV_LEN, SECRET_DATA_LEN};
use self::transport::Endpoint;
use self::ttlv::TtlvError;
use super::{kms_error, Kms, ProviderContext, RetryPolicy};
use crate::csfle::CsfleKey;
use crate::error::{Error, Result};
use crate::key::KeyMaterial;

/// What errors name before a key has an id.
const NEW_SECRET: &str = "(a new KMIP secret)";
const NEW_AES_KEY: &str = "(a new KMIP AES key)";

/// The longest `keyId` accepted (KMIP's identifiers are short; this bounds the requests).
const MAX_KEY_ID_LEN: usize = 1024;

/// The label of the delegated form's associated-data tag.
const AD_TAG_LABEL: &[u8] = b"fieldcrypt kmip delegated associated data v1\0";
/// The length of that tag (HMAC-SHA-256).
const AD_TAG_LEN: usize = 32;

/// One configured KMIP provider (`"kmip"` or `"kmip:<label>"`).
pub(crate) struct KmipKms {
    name: String,
    /// `kmsProviders.<name>.endpoint`; a masterKey's `endpoint` takes precedence.
    endpoint: Option<Endpoint>,
    tls: Arc<rustls::ClientConfig>,
    has_client_cert: bool,
    retry: RetryPolicy,
}

/// A checked masterKey document.
struct MasterKey {
    key_id: Option<String>,
    /// As written, and parsed.
    endpoint: Option<(String, Endpoint)>,
    delegated: bool,
}

impl KmipKms {
    /// The provider configured by `kmsProviders.<name>` = `{endpoint: "host[:port]"}`, with
    /// mutual TLS from `tlsOptions.<name>` (`tlsCAFile`, `tlsCertificateKeyFile`). An empty
    /// entry is accepted: KMIP has no credentials in the entry (the client certificate is the
    /// credential) and no standard environment, so every masterKey must then name its
    /// `endpoint`.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for a malformed entry or endpoint; the TLS files' errors (see
    /// [`super::tls::client_config`]).
    pub(crate) fn new(ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Self> {
        let name = ctx.name;
        let mut endpoint = None;
        for (k, v) in credentials {
            match (k.as_str(), v) {
                ("endpoint", Bson::String(s)) => {
                    endpoint =
                        Some(Endpoint::parse(s).map_err(|why| {
                            Error::KeyFormat(format!("kmsProviders.{name}: {why}"))
                        })?);
                }
                ("endpoint", _) => {
                    return Err(Error::KeyFormat(format!(
                        "kmsProviders.{name}.endpoint must be a string \"host:port\""
                    )))
                }
                (other, _) => {
                    return Err(Error::KeyFormat(format!(
                        "kmsProviders.{name} takes no field {other:?} (only endpoint; the \
                         client certificate goes in tlsOptions.{name}.tlsCertificateKeyFile)"
                    )))
                }
            }
        }
        Ok(KmipKms {
            name: name.to_owned(),
            endpoint,
            tls: super::tls::client_config(ctx.tls)?,
            has_client_cert: ctx.tls.certificate_key_file.is_some(),
            retry: ctx.retry.clone(),
        })
    }

    fn bad_master_key(&self, what: impl fmt::Display) -> Error {
        Error::KeyFormat(format!(
            "masterKey for KMS provider {:?}: {what}",
            self.name
        ))
    }

    fn parse(&self, master_key: &Document) -> Result<MasterKey> {
        let mut mk = MasterKey {
            key_id: None,
            endpoint: None,
            delegated: false,
        };
        let mut provider = false;
        for (k, v) in master_key {
            match (k.as_str(), v) {
                ("provider", Bson::String(p)) if *p == self.name => provider = true,
                ("provider", _) => {
                    return Err(
                        self.bad_master_key(format_args!("provider must be {:?}", self.name))
                    )
                }
                ("keyId", Bson::String(id)) => {
                    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
                        return Err(self.bad_master_key(format_args!(
                            "keyId must be 1 to {MAX_KEY_ID_LEN} bytes"
                        )));
                    }
                    mk.key_id = Some(id.clone());
                }
                ("keyId", _) => return Err(self.bad_master_key("keyId must be a string")),
                ("endpoint", Bson::String(s)) => {
                    let e = Endpoint::parse(s).map_err(|why| self.bad_master_key(why))?;
                    mk.endpoint = Some((s.clone(), e));
                }
                ("endpoint", _) => {
                    return Err(self.bad_master_key("endpoint must be a string \"host:port\""))
                }
                ("delegated", Bson::Boolean(d)) => mk.delegated = *d,
                ("delegated", _) => return Err(self.bad_master_key("delegated must be a boolean")),
                (other, _) => {
                    return Err(self.bad_master_key(format_args!(
                        "unknown field {other:?} (a KMIP masterKey has provider, keyId, \
                         endpoint, delegated)"
                    )))
                }
            }
        }
        if !provider {
            return Err(self.bad_master_key("no provider"));
        }
        Ok(mk)
    }

    /// The stored form, in libmongocrypt's order (`_mongocrypt_kek_append`): provider,
    /// endpoint, delegated (only when true), keyId.
    fn document(&self, mk: &MasterKey, key_id: Option<&str>) -> Document {
        let mut out = doc! { "provider": self.name.as_str() };
        if let Some((raw, _)) = &mk.endpoint {
            out.insert("endpoint", raw.as_str());
        }
        if mk.delegated {
            out.insert("delegated", true);
        }
        if let Some(id) = key_id.or(mk.key_id.as_deref()) {
            out.insert("keyId", id);
        }
        out
    }

    /// The server to unwrap a stored key at: the configured one. A stored masterKey is written
    /// by whoever can write the key vault; following its `endpoint` to another server would
    /// let that server choose the secret (or, delegated, the plaintext) and so the data key.
    /// So its `endpoint`, if any, must name the configured server (libmongocrypt follows it).
    fn unwrap_endpoint(&self, mk: &MasterKey, key_id: &str) -> Result<&Endpoint> {
        let refuse = |what: fmt::Arguments<'_>| Err(kms_error(&self.name, key_id, what));
        match (&self.endpoint, &mk.endpoint) {
            (Some(configured), None) => Ok(configured),
            (Some(configured), Some((_, stored))) if configured.same_server(stored) => {
                Ok(configured)
            }
            (Some(configured), Some((raw, _))) => refuse(format_args!(
                "the key's masterKey.endpoint {raw:?} is not kmsProviders.{}.endpoint \
                 ({configured}): refused, so that a key document cannot send this client's \
                 requests to another server",
                self.name
            )),
            (None, _) => refuse(format_args!(
                "no KMIP endpoint to unwrap at: set kmsProviders.{}.endpoint (a stored \
                 masterKey's endpoint is used only when it names that server)",
                self.name
            )),
        }
    }

    /// The server to wrap a new key at: the masterKey's (the caller's configuration), else the
    /// provider's.
    fn endpoint<'m>(&'m self, mk: &'m MasterKey, key_id: &str) -> Result<&'m Endpoint> {
        mk.endpoint
            .as_ref()
            .map(|(_, e)| e)
            .or(self.endpoint.as_ref())
            .ok_or_else(|| {
                kms_error(
                    &self.name,
                    key_id,
                    format_args!(
                        "no KMIP endpoint: set kmsProviders.{}.endpoint or masterKey.endpoint",
                        self.name
                    ),
                )
            })
    }

    /// Sends a request and returns the response's bytes.
    async fn call(
        &self,
        endpoint: &Endpoint,
        key_id: &str,
        request: std::result::Result<Request, TtlvError>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let request = request.map_err(|e| kms_error(&self.name, key_id, e))?;
        transport::send(endpoint, &self.tls, &self.retry, &request)
            .await
            .map_err(|e| {
                if e.tls && !self.has_client_cert {
                    kms_error(
                        &self.name,
                        key_id,
                        format_args!(
                            "{e} (KMIP servers require a client certificate: set \
                             tlsOptions.{}.tlsCertificateKeyFile)",
                            self.name
                        ),
                    )
                } else {
                    kms_error(&self.name, key_id, e)
                }
            })
    }

    /// A response's error as [`Error::Kms`].
    fn refused(&self, key_id: &str, op: Operation, e: &ResponseError) -> Error {
        match e {
            ResponseError::Failed {
                reason: Some(message::REASON_ITEM_NOT_FOUND),
                ..
            } => kms_error(
                &self.name,
                key_id,
                format_args!(
                    "KMIP {op} refused: {e} (no such object, or not one this client \
                     certificate may use)"
                ),
            ),
            ResponseError::Failed { .. } => {
                kms_error(&self.name, key_id, format_args!("KMIP {op} refused: {e}"))
            }
            ResponseError::Malformed(_) | ResponseError::WrongObject(_) => {
                kms_error(&self.name, key_id, format_args!("KMIP {op}: {e}"))
            }
        }
    }

    /// Sends a request that returns a Unique Identifier (Register, Create, Activate).
    async fn call_for_id(
        &self,
        endpoint: &Endpoint,
        key_id: &str,
        request: std::result::Result<Request, TtlvError>,
        op: Operation,
    ) -> Result<String> {
        let bytes = self.call(endpoint, key_id, request).await?;
        Response::parse(&bytes, op)
            .and_then(|r| r.unique_identifier().map(str::to_owned))
            .map_err(|e| self.refused(key_id, op, &e))
    }

    /// Registers a fresh 96-byte secret and activates it; returns its identifier.
    async fn register_secret(&self, endpoint: &Endpoint) -> Result<String> {
        let mut secret = Zeroizing::new([0u8; SECRET_DATA_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut secret[..]);
        let id = self
            .call_for_id(
                endpoint,
                NEW_SECRET,
                message::register_secret_data(&secret),
                Operation::Register,
            )
            .await?;
        self.activate(endpoint, &id).await?;
        Ok(id)
    }

    async fn activate(&self, endpoint: &Endpoint, id: &str) -> Result<()> {
        self.call_for_id(endpoint, id, message::activate(id), Operation::Activate)
            .await
            .map(drop)
    }

    /// Gets the 96-byte secret `id`, as the cipher that wraps with it.
    async fn secret(&self, endpoint: &Endpoint, id: &str) -> Result<CsfleKey> {
        let bytes = self.call(endpoint, id, message::get(id)).await?;
        let response = Response::parse(&bytes, Operation::Get)
            .map_err(|e| self.refused(id, Operation::Get, &e))?;
        let material = response
            .secret_data()
            .map_err(|e| self.refused(id, Operation::Get, &e))?;
        let secret: &[u8; SECRET_DATA_LEN] = material.try_into().map_err(|_| {
            kms_error(
                &self.name,
                id,
                format_args!(
                    "the KMIP secret is {} bytes; a KMIP master key is a {SECRET_DATA_LEN}-byte \
                     SecretData (as libmongocrypt registers)",
                    material.len()
                ),
            )
        })?;
        Ok(CsfleKey::new(secret))
        // `bytes` (the response holding the secret) is wiped here.
    }

    /// Creates an AES-256 key for Encrypt/Decrypt and activates it; returns its identifier.
    async fn create_aes_key(&self, endpoint: &Endpoint) -> Result<String> {
        let id = self
            .call_for_id(
                endpoint,
                NEW_AES_KEY,
                message::create_aes_256(),
                Operation::Create,
            )
            .await?;
        self.activate(endpoint, &id).await?;
        Ok(id)
    }
}

/// Reads `bytes` as the response to each operation fieldcrypt sends, and every field it reads:
/// what `fuzz/fuzz_targets/kmip_response.rs` runs on arbitrary bytes. Not an API.
#[doc(hidden)]
pub fn fuzz_response(bytes: &[u8]) {
    if let Some(header) = bytes.first_chunk::<{ ttlv::HEADER_LEN }>() {
        let _ = ttlv::message_len(header);
    }
    for op in [
        Operation::Create,
        Operation::Register,
        Operation::Get,
        Operation::Activate,
        Operation::Encrypt,
        Operation::Decrypt,
    ] {
        if let Ok(r) = Response::parse(bytes, op) {
            let _ = (r.unique_identifier(), r.secret_data(), r.data(), r.iv());
        }
    }
}

/// The delegated form's binding of a data key to its associated data.
fn ad_tag(dek: &[u8], ad: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(dek)
        .expect("HMAC takes keys of any length"); // allowed: infallible for HMAC
    mac.update(AD_TAG_LABEL);
    mac.update(ad);
    mac
}

impl fmt::Debug for KmipKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipKms")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint.as_ref().map(ToString::to_string))
            .field("client_certificate", &self.has_client_cert)
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl Kms for KmipKms {
    fn name(&self) -> &str {
        &self.name
    }

    /// Without `keyId`, every wrap registers a new secret.
    fn fixed_master_key(&self, master_key: &Document) -> bool {
        master_key.contains_key("keyId")
    }

    fn master_key(&self, master_key: &Document) -> Result<Document> {
        let mk = self.parse(master_key)?;
        Ok(self.document(&mk, None))
    }

    async fn encrypt(
        &self,
        master_key: &Document,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        let mk = self.parse(master_key)?;
        let new_id = if mk.delegated {
            NEW_AES_KEY
        } else {
            NEW_SECRET
        };
        let endpoint = self.endpoint(&mk, mk.key_id.as_deref().unwrap_or(new_id))?;
        let plain = dek.expose_secret();
        if !mk.delegated {
            let id = match &mk.key_id {
                Some(id) => id.clone(),
                None => self.register_secret(endpoint).await?,
            };
            let key = self.secret(endpoint, &id).await?;
            let mut wrapped = Vec::with_capacity(plain.len() + 64);
            key.seal(&CsfleKey::random_iv(), ad, plain, &mut wrapped);
            return Ok((self.document(&mk, Some(&id)), wrapped));
        }
        let id = match &mk.key_id {
            Some(id) => id.clone(),
            None => self.create_aes_key(endpoint).await?,
        };
        let bytes = self
            .call(endpoint, &id, message::encrypt(&id, plain))
            .await?;
        let refused = |e: ResponseError| self.refused(&id, Operation::Encrypt, &e);
        let response = Response::parse(&bytes, Operation::Encrypt).map_err(refused)?;
        let ciphertext = response.data().map_err(refused)?;
        let iv = response.iv().map_err(refused)?;
        if iv.len() != IV_LEN {
            return Err(kms_error(
                &self.name,
                &id,
                format_args!(
                    "KMIP Encrypt returned an IV of {} bytes, not {IV_LEN}",
                    iv.len()
                ),
            ));
        }
        if ciphertext.is_empty() || ciphertext.len() % IV_LEN != 0 {
            return Err(kms_error(
                &self.name,
                &id,
                format_args!(
                    "KMIP Encrypt returned {} bytes of AES-CBC ciphertext, not whole blocks",
                    ciphertext.len()
                ),
            ));
        }
        let mut wrapped = Vec::with_capacity(IV_LEN + ciphertext.len() + AD_TAG_LEN);
        wrapped.extend_from_slice(iv);
        wrapped.extend_from_slice(ciphertext);
        if !ad.is_empty() {
            wrapped.extend_from_slice(&ad_tag(plain, ad).finalize().into_bytes());
        }
        Ok((self.document(&mk, Some(&id)), wrapped))
    }

    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial> {
        let mk = self.parse(master_key)?;
        let Some(id) = mk.key_id.as_deref() else {
            return Err(
                self.bad_master_key("no keyId (a key document's KMIP masterKey always has one)")
            );
        };
        let endpoint = self.unwrap_endpoint(&mk, id)?;
        if !mk.delegated {
            let key = self.secret(endpoint, id).await?;
            let mut plain = Zeroizing::new(Vec::with_capacity(wrapped.len()));
            key.open(ad, wrapped, &mut plain)?;
            return Ok(KeyMaterial::from_slice(&plain));
        }
        let (body, tag) = if ad.is_empty() {
            (wrapped, None)
        } else {
            let at = wrapped
                .len()
                .checked_sub(AD_TAG_LEN)
                .ok_or(Error::Decrypt)?;
            let (b, t) = wrapped.split_at(at);
            (b, Some(t))
        };
        // IV, then at least one CBC block, in whole blocks.
        if body.len() < 2 * IV_LEN || body.len() % IV_LEN != 0 {
            return Err(Error::Decrypt);
        }
        let (iv, ciphertext) = body.split_at(IV_LEN);
        let bytes = self
            .call(endpoint, id, message::decrypt(id, ciphertext, iv))
            .await?;
        let plain =
            Response::parse(&bytes, Operation::Decrypt)
                .and_then(|r| r.data())
                .map_err(|e| match e {
                    // Bad padding: not a ciphertext of this key. The specification's reason is
                    // Cryptographic Failure; PyKMIP reports it as General Failure.
                    ResponseError::Failed {
                        reason:
                            Some(
                                message::REASON_CRYPTOGRAPHIC_FAILURE
                                | message::REASON_GENERAL_FAILURE,
                            ),
                        ..
                    } => Error::Decrypt,
                    e => self.refused(id, Operation::Decrypt, &e),
                })?;
        if let Some(tag) = tag {
            ad_tag(plain, ad)
                .verify_slice(tag)
                .map_err(|_| Error::Decrypt)?;
        }
        Ok(KeyMaterial::from_slice(plain))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::kms::TlsOptions;

    fn kms(credentials: Document) -> Result<KmipKms> {
        let tls = TlsOptions::default();
        let retry = RetryPolicy {
            attempts: 2,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            timeout: Duration::from_secs(2),
        };
        KmipKms::new(
            &ProviderContext {
                name: "kmip",
                tls: &tls,
                retry: &retry,
            },
            &credentials,
        )
    }

    #[test]
    fn master_keys_in_libmongocrypts_order() {
        let k = kms(doc! { "endpoint": "127.0.0.1:5696" }).unwrap();
        assert_eq!(
            k.master_key(
                &doc! { "keyId": "7", "delegated": true, "endpoint": "h:1", "provider": "kmip" }
            )
            .unwrap(),
            doc! { "provider": "kmip", "endpoint": "h:1", "delegated": true, "keyId": "7" }
        );
        assert_eq!(
            k.master_key(&doc! { "provider": "kmip", "delegated": false })
                .unwrap(),
            doc! { "provider": "kmip" }
        );
        for (bad, says) in [
            (
                doc! { "provider": "kmip", "keyId": 7 },
                "keyId must be a string",
            ),
            (
                doc! { "provider": "kmip", "keyId": "" },
                "keyId must be 1 to",
            ),
            (
                doc! { "provider": "kmip", "delegated": "yes" },
                "delegated must be a boolean",
            ),
            (
                doc! { "provider": "kmip", "endpoint": 5696 },
                "endpoint must be a string",
            ),
            (
                doc! { "provider": "kmip", "endpoint": "https://h" },
                "no scheme",
            ),
            (
                doc! { "provider": "kmip", "key": "x" },
                "unknown field \"key\"",
            ),
            (
                doc! { "provider": "kmip:other" },
                "provider must be \"kmip\"",
            ),
            (doc! { "keyId": "1" }, "no provider"),
        ] {
            let e = k.master_key(&bad).unwrap_err();
            assert!(
                matches!(&e, Error::KeyFormat(m) if m.contains(says) && m.contains("\"kmip\"")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn provider_entries() {
        assert!(kms(doc! {}).unwrap().endpoint.is_none());
        assert_eq!(
            kms(doc! { "endpoint": "kms.example.com" })
                .unwrap()
                .endpoint
                .unwrap()
                .to_string(),
            "kms.example.com:5696"
        );
        for (bad, says) in [
            (doc! { "endpoint": 1 }, "must be a string"),
            (doc! { "endpoint": "h:0" }, "port"),
            (
                doc! { "endpoint": "h", "tlsCAFile": "x" },
                "no field \"tlsCAFile\"",
            ),
        ] {
            let e = kms(bad.clone()).unwrap_err();
            assert!(
                matches!(&e, Error::KeyFormat(m) if m.contains(says)),
                "{bad}: {e}"
            );
        }
        let debug = format!("{:?}", kms(doc! { "endpoint": "h:1" }).unwrap());
        assert_eq!(
            debug,
            "KmipKms { name: \"kmip\", endpoint: Some(\"h:1\"), client_certificate: false, .. }"
        );
    }

    #[test]
    fn fail_without_an_endpoint() {
        let k = kms(doc! {}).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dek = KeyMaterial::generate(96);
        let e = rt
            .block_on(k.encrypt(&doc! { "provider": "kmip" }, &dek, &[]))
            .unwrap_err();
        assert!(
            matches!(&e, Error::Kms { provider, reason } if provider == "kmip"
                && reason.contains(NEW_SECRET) && reason.contains("no KMIP endpoint")),
            "{e}"
        );
        let e = rt
            .block_on(k.decrypt(&doc! { "provider": "kmip", "keyId": "12" }, &[0; 160], &[]))
            .unwrap_err();
        assert!(e.to_string().contains("key 12: no KMIP endpoint"), "{e}");
        // A stored masterKey's endpoint does not replace a missing configured one.
        let e = rt
            .block_on(k.decrypt(
                &doc! { "provider": "kmip", "keyId": "12", "endpoint": "127.0.0.1:1" },
                &[0; 160],
                &[],
            ))
            .unwrap_err();
        assert!(
            e.to_string().contains("set kmsProviders.kmip.endpoint"),
            "{e}"
        );
        let e = rt
            .block_on(k.decrypt(&doc! { "provider": "kmip" }, &[0; 160], &[]))
            .unwrap_err();
        assert!(e.to_string().contains("no keyId"), "{e}");
    }

    #[test]
    fn fuzz_entry_point_takes_any_bytes() {
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5696);
        for name in [
            "success_get_response",
            "success_register_response",
            "error_get_response_notfound",
        ] {
            let v = message::tests::vector(name);
            for n in 0..=v.len() {
                fuzz_response(&v[..n]);
            }
            for _ in 0..2000 {
                let mut b = v.clone();
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
                fuzz_response(&b);
            }
        }
    }

    #[test]
    fn fail_a_stored_endpoint_that_is_not_the_configured_server() {
        let k = kms(doc! { "endpoint": "kms.example.com" }).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for other in ["evil.example.com", "kms.example.com:5697", "127.0.0.1"] {
            let mk = doc! { "provider": "kmip", "keyId": "9", "endpoint": other };
            let e = rt.block_on(k.decrypt(&mk, &[0; 160], &[])).unwrap_err();
            assert!(
                matches!(&e, Error::Kms { reason, .. } if reason.contains("key 9: the key's \
                    masterKey.endpoint") && reason.contains("kms.example.com:5696")),
                "{other}: {e}"
            );
        }
        let k = kms(doc! { "endpoint": "KMS.example.com:5696" }).unwrap();
        let mk = k
            .parse(&doc! { "provider": "kmip", "endpoint": "kms.EXAMPLE.com" })
            .unwrap();
        assert_eq!(
            k.unwrap_endpoint(&mk, "9").unwrap().to_string(),
            "KMS.example.com:5696"
        );
    }

    #[test]
    fn delegated_tag_binds_key_and_associated_data() {
        let t = |k: &[u8], ad: &[u8]| ad_tag(k, ad).finalize().into_bytes().to_vec();
        assert_eq!(t(b"k", b"ad").len(), AD_TAG_LEN);
        assert_ne!(t(b"k", b"ad"), t(b"k", b"ad2"));
        assert_ne!(t(b"k", b"ad"), t(b"k2", b"ad"));
        assert!(ad_tag(b"k", b"ad").verify_slice(&t(b"k", b"ad")).is_ok());
        assert!(ad_tag(b"k", b"ad").verify_slice(&t(b"k", b"ae")).is_err());
    }
}
