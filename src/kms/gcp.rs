//! Google Cloud KMS (`"gcp"`): data keys wrapped with a CryptoKey's `encrypt`/`decrypt`, as
//! libmongocrypt does.
//!
//! ```text
//!  masterKey {provider: "gcp", projectId, location, keyRing, keyName, keyVersion?, endpoint?}
//!  POST https://<endpoint | cloudkms.googleapis.com>/v1/projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>[/cryptoKeyVersions/<v>]:encrypt
//!       Authorization: Bearer <token, scope https://www.<endpoint domain>/auth/cloudkms>
//!       {"plaintext": base64, "additionalAuthenticatedData"?: base64}  ──▶  {"name", "ciphertext"}
//!  POST …/cryptoKeys/<k>:decrypt  {"ciphertext", "additionalAuthenticatedData"?}  ──▶  {"plaintext"}
//! ```
//!
//! Decryption always goes to the CryptoKey, not a version: the ciphertext names its version.
//!
//! Credentials (`kmsProviders.gcp`), as MongoDB's drivers take them: `{email, privateKey,
//! endpoint?}` — a service account; its key as PKCS#8 PEM (the `private_key` of a JSON key
//! file), base64 of the DER, or binary; a JWT signed with it is exchanged at
//! `https://<endpoint | oauth2.googleapis.com>/token` — `{accessToken}`, or **empty**: the
//! instance's service account from the GCE metadata server
//! (`http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token`;
//! the host can be moved with `GCE_METADATA_HOST`, as Google's client libraries allow).
//!
//! Associated data goes to Cloud KMS's own `additionalAuthenticatedData`; none is sent when it
//! is empty (MongoDB's CSFLE keys), exactly as libmongocrypt sends it.
//!
//! Tested against a fake that speaks the REST protocol (`fieldcrypt_testkit::kms::fake_gcp`):
//! Google Cloud KMS has no local emulator.

use core::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bson::{doc, Document};
use secrecy::ExposeSecret as _;
use zeroize::Zeroizing;

use super::http::{HttpClient, HttpResponse};
use super::oauth::{
    error_detail, only_fields, optional_str, path_segment, required_str, rsa_private_key,
    secret_field, static_token, Endpoint, Metadata, TokenSource, Tokens,
};
use super::{kms_error, master_key_id, Kms, ProviderContext};
use crate::error::{Error, Result};
use crate::key::KeyMaterial;

/// Cloud KMS when the masterKey names no `endpoint`.
const DEFAULT_KMS: &str = "cloudkms.googleapis.com";

/// The token endpoint when the credentials name no `endpoint`.
const DEFAULT_OAUTH: &str = "oauth2.googleapis.com";

/// The GCE metadata server's host.
const METADATA_HOST: &str = "metadata.google.internal";

/// Google's client libraries' variable that moves the metadata server: `host[:port]`.
const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";

/// The metadata server's path for the default service account's token.
const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// A configured Google Cloud KMS provider.
pub(crate) struct GcpKms {
    name: String,
    http: HttpClient,
    tokens: Tokens,
}

impl GcpKms {
    /// Reads `kmsProviders.<name>` (see the module docs); nothing is sent until a key is
    /// wrapped or unwrapped.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for a missing, mistyped or unknown field, a `privateKey` that is not
    /// an RSA private key, a bad `endpoint` or `GCE_METADATA_HOST`; errors of
    /// [`HttpClient::new`].
    pub(crate) fn new(ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Self> {
        let what = format!("kmsProviders.{}", ctx.name);
        let source = if credentials.is_empty() {
            TokenSource::Metadata(Metadata::Gce(metadata_url(&what)?))
        } else if let Some(token) = static_token(credentials, &what)? {
            token
        } else {
            only_fields(credentials, &what, &["email", "privateKey", "endpoint"])?;
            let email = required_str(credentials, &what, "email")?.to_owned();
            let key = rsa_private_key(
                &what,
                credentials.get("privateKey").ok_or_else(|| {
                    Error::KeyFormat(format!("{what} needs privateKey (or accessToken)"))
                })?,
            )?;
            let endpoint = Endpoint::parse(
                &what,
                "endpoint",
                optional_str(credentials, &what, "endpoint")?.unwrap_or(DEFAULT_OAUTH),
            )?;
            TokenSource::JwtBearer {
                url: endpoint.url("/token")?,
                // libmongocrypt's audience: the host without the port.
                audience: format!("https://{}/token", endpoint.host),
                email,
                key: Box::new(key),
            }
        };
        Ok(Self {
            name: ctx.name.to_owned(),
            http: HttpClient::new(ctx)?,
            tokens: Tokens::new(source),
        })
    }

    /// `encrypt` or `decrypt` with `body` at the key `master_key` names.
    async fn call(&self, master_key: &Document, method: &str, body: &str) -> Result<HttpResponse> {
        let key_id = master_key_id(master_key);
        let key = KeyRef::parse(master_key)?;
        let mut path = format!(
            "/v1/projects/{}/locations/{}/keyRings/{}/cryptoKeys/{}",
            key.project, key.location, key.ring, key.name
        );
        if method == "encrypt" {
            if let Some(version) = key.version.filter(|v| !v.is_empty()) {
                path.push_str("/cryptoKeyVersions/");
                path.push_str(version);
            }
        }
        path.push(':');
        path.push_str(method);
        let url = key.endpoint.url(&path)?;
        // libmongocrypt's scope: Cloud KMS on the endpoint's domain.
        let scope = format!("https://www.{}/auth/cloudkms", key.endpoint.domain);
        self.tokens
            .send(&self.http, &key_id, &scope, &|client, token| {
                client
                    .post(url.clone())
                    .bearer_auth(token)
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json")
                    .body(body.to_owned())
                    .build()
                    .map_err(|_| kms_error(&self.name, &key_id, "cannot build the request"))
            })
            .await
    }

    fn refused(&self, key_id: &str, method: &str, response: &HttpResponse) -> Error {
        let hint = match response.status {
            401 => ": the access token was refused",
            403 => ": permission denied",
            404 => ": no such key (or key version)",
            _ => "",
        };
        kms_error(
            &self.name,
            key_id,
            format_args!(
                "{method} refused: HTTP {}{hint}{}",
                response.status,
                error_detail(&response.body, &self.secrets())
            ),
        )
    }

    fn secrets(&self) -> Vec<&str> {
        match self.tokens.source() {
            TokenSource::Static(t) => vec![t.expose_secret()],
            _ => Vec::new(),
        }
    }

    /// The base64 field `field` of a successful answer, decoded (the answer is wiped).
    fn field(
        &self,
        key_id: &str,
        method: &str,
        response: &mut HttpResponse,
        field: &str,
    ) -> Result<Zeroizing<Vec<u8>>> {
        secret_field(&mut response.body, field, |v| STANDARD.decode(v).ok()).ok_or_else(|| {
            kms_error(
                &self.name,
                key_id,
                format_args!("malformed {method} response"),
            )
        })
    }
}

/// A masterKey's parts.
struct KeyRef<'a> {
    project: &'a str,
    location: &'a str,
    ring: &'a str,
    name: &'a str,
    version: Option<&'a str>,
    endpoint: Endpoint,
}

impl<'a> KeyRef<'a> {
    fn parse(master_key: &'a Document) -> Result<Self> {
        let what = "masterKey";
        let segment =
            |field: &str| path_segment(what, field, required_str(master_key, what, field)?);
        // An empty keyVersion is the primary version, as libmongocrypt accepts it.
        let version = match optional_str(master_key, what, "keyVersion")? {
            None => None,
            Some("") => Some(""),
            Some(v) => Some(path_segment(what, "keyVersion", v)?),
        };
        Ok(KeyRef {
            project: segment("projectId")?,
            location: segment("location")?,
            ring: segment("keyRing")?,
            name: segment("keyName")?,
            version,
            endpoint: Endpoint::parse(
                what,
                "endpoint",
                optional_str(master_key, what, "endpoint")?.unwrap_or(DEFAULT_KMS),
            )?,
        })
    }
}

/// A request body: `field` and, when `ad` is not empty, `additionalAuthenticatedData` (both
/// base64, which needs no JSON escaping). Built in one allocation, wiped on drop: it holds the
/// plaintext key of an encrypt.
fn body(field: &str, value: &[u8], ad: &[u8]) -> Zeroizing<String> {
    use core::fmt::Write as _;
    let value = Zeroizing::new(STANDARD.encode(value));
    let ad = STANDARD.encode(ad);
    let mut out = Zeroizing::new(String::with_capacity(
        field.len() + value.len() + ad.len() + 64,
    ));
    let _ = write!(out, r#"{{"{field}":"{}""#, value.as_str());
    if !ad.is_empty() {
        let _ = write!(out, r#","additionalAuthenticatedData":"{ad}""#);
    }
    out.push('}');
    out
}

#[async_trait::async_trait]
impl Kms for GcpKms {
    fn name(&self) -> &str {
        &self.name
    }

    fn master_key(&self, master_key: &Document) -> Result<Document> {
        match master_key.get_str("provider") {
            Ok(p) if p == self.name => {}
            _ => {
                return Err(Error::KeyFormat(format!(
                    "masterKey is not for KMS provider {:?}",
                    self.name
                )))
            }
        }
        only_fields(
            master_key,
            "masterKey",
            &[
                "provider",
                "projectId",
                "location",
                "keyRing",
                "keyName",
                "keyVersion",
                "endpoint",
            ],
        )?;
        let key = KeyRef::parse(master_key)?;
        let mut out = doc! {
            "provider": self.name.as_str(),
            "projectId": key.project,
            "location": key.location,
            "keyRing": key.ring,
            "keyName": key.name,
        };
        if let Some(version) = key.version {
            out.insert("keyVersion", version);
        }
        if master_key.contains_key("endpoint") {
            out.insert("endpoint", key.endpoint.host_and_port.as_str());
        }
        Ok(out)
    }

    async fn encrypt(
        &self,
        master_key: &Document,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        let key_id = master_key_id(master_key);
        let body = body("plaintext", dek.expose_secret(), ad);
        let mut response = self.call(master_key, "encrypt", &body).await?;
        drop(body);
        if !response.is_success() {
            return Err(self.refused(&key_id, "encrypt", &response));
        }
        let ciphertext = self.field(&key_id, "encrypt", &mut response, "ciphertext")?;
        Ok((master_key.clone(), ciphertext.to_vec()))
    }

    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial> {
        let key_id = master_key_id(master_key);
        let mut response = self
            .call(master_key, "decrypt", &body("ciphertext", wrapped, ad))
            .await?;
        if response.status == 400 && is_invalid_ciphertext(&response.body) {
            return Err(Error::Decrypt);
        }
        if !response.is_success() {
            return Err(self.refused(&key_id, "decrypt", &response));
        }
        let plain = self.field(&key_id, "decrypt", &mut response, "plaintext")?;
        Ok(KeyMaterial::from_slice(&plain))
    }
}

/// Whether a 400 answer says the ciphertext does not decrypt (`INVALID_ARGUMENT`: wrong key,
/// wrong associated data, tampered), rather than e.g. a disabled key version
/// (`FAILED_PRECONDITION`), which is the KMS refusing.
fn is_invalid_ciphertext(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("status"))
                .and_then(|s| s.as_str())
                .map(|s| s == "INVALID_ARGUMENT")
        })
        // No JSON status: a plain 400 to a decrypt is the ciphertext.
        .unwrap_or(true)
}

impl fmt::Debug for GcpKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpKms")
            .field("name", &self.name)
            .field("credentials", &self.tokens.source().kind())
            .finish_non_exhaustive()
    }
}

/// The metadata server's token URL: on [`METADATA_HOST`], or `GCE_METADATA_HOST`.
fn metadata_url(what: &str) -> Result<reqwest::Url> {
    let host = match std::env::var(METADATA_HOST_ENV) {
        Ok(h) if !h.trim().is_empty() => h.trim().to_owned(),
        _ => METADATA_HOST.to_owned(),
    };
    reqwest::Url::parse(&format!("http://{host}{METADATA_TOKEN_PATH}"))
        .ok()
        .filter(|u| u.host_str().is_some() && u.path() == METADATA_TOKEN_PATH)
        .ok_or_else(|| {
            Error::KeyFormat(format!(
                "{what} is empty (metadata server), and {METADATA_HOST_ENV} is not a host[:port]"
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kms::{KmsKek, RetryPolicy, TlsOptions};

    fn provider(credentials: &Document) -> GcpKms {
        let (tls, retry) = (TlsOptions::default(), RetryPolicy::default());
        let ctx = ProviderContext {
            name: "gcp",
            tls: &tls,
            retry: &retry,
        };
        GcpKms::new(&ctx, credentials).unwrap()
    }

    #[test]
    fn debug_names_the_credentials_kind_never_the_credentials() {
        let token = "ya29.access-token-77ab31";
        let kms = Arc::new(provider(&doc! { "accessToken": token }));
        let kek = KmsKek {
            kms: kms.clone(),
            master_key: doc! {
                "provider": "gcp", "projectId": "p", "location": "global", "keyRing": "r", "keyName": "k",
            },
        };
        let printed = format!("{kms:?} {kek:?}");
        assert!(printed.contains("access token"), "{printed}");
        assert!(
            printed.contains("projects/p/locations/global/keyRings/r/cryptoKeys/k"),
            "{printed}"
        );
        assert!(!printed.contains(token), "{printed}");
    }

    #[test]
    fn master_keys_are_stored_as_libmongocrypt_stores_them() {
        let kms = provider(&doc! { "accessToken": "t" });
        let stored = kms
            .master_key(&doc! {
                "endpoint": "https://cloudkms.googleapis.com/",
                "keyVersion": "3",
                "keyName": "k",
                "keyRing": "r",
                "location": "global",
                "projectId": "p",
                "provider": "gcp",
            })
            .unwrap();
        assert_eq!(
            stored.keys().collect::<Vec<_>>(),
            [
                "provider",
                "projectId",
                "location",
                "keyRing",
                "keyName",
                "keyVersion",
                "endpoint"
            ]
        );
        assert_eq!(
            stored.get_str("endpoint").unwrap(),
            "cloudkms.googleapis.com"
        );
        // libmongocrypt accepts an empty keyVersion (the primary) and stores it as given.
        let mk = doc! {
            "provider": "gcp", "projectId": "p", "location": "l", "keyRing": "r",
            "keyName": "k", "keyVersion": "",
        };
        assert_eq!(kms.master_key(&mk).unwrap(), mk);
    }

    #[test]
    fn only_an_invalid_argument_400_is_a_bad_ciphertext() {
        assert!(is_invalid_ciphertext(
            br#"{"error":{"code":400,"message":"Decryption failed: the ciphertext is invalid.","status":"INVALID_ARGUMENT"}}"#
        ));
        assert!(!is_invalid_ciphertext(
            br#"{"error":{"code":400,"message":"... is not enabled","status":"FAILED_PRECONDITION"}}"#
        ));
    }
}
