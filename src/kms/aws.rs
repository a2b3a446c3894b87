//! AWS KMS: data keys wrapped with `Encrypt` and unwrapped with `Decrypt` under a KMS key.
//!
//! Requests are KMS's JSON protocol (`POST /`, `X-Amz-Target: TrentService.Encrypt`,
//! `application/x-amz-json-1.1`), signed with Signature Version 4 by AWS's own signer
//! (`aws-sigv4`) and sent by the shared [`HttpClient`] (rustls, bounded retries). The SDK
//! (`aws-sdk-kms` + `aws-config`) would double the crates this feature builds and bring a
//! second TLS stack; two calls do not need it.
//!
//! # The `masterKey` document
//!
//! `{provider: "aws", region, key, endpoint?}`, as libmongocrypt writes it: `key` is a key
//! ARN, key id or alias (`alias/name`, or its ARN); `region` is also the signing region;
//! `endpoint` is `host[:port]` (HTTPS, as in libmongocrypt) or a full URL. Without it the
//! endpoint is `AWS_ENDPOINT_URL_KMS`, else `AWS_ENDPOINT_URL`, else
//! `https://kms.<region>.amazonaws.com`.
//!
//! # What is sent
//!
//! `Encrypt {KeyId, Plaintext}` and `Decrypt {CiphertextBlob, KeyId}`, plus
//! `EncryptionContext: {"associatedData": hex(ad)}` when the associated data is not empty.
//! With empty associated data (MongoDB CSFLE keys) this is exactly what libmongocrypt sends, so
//! drivers read keys wrapped here and the other way round. `Decrypt` names the key (KMS then
//! refuses a blob of another key) unless it is an alias: an alias can be moved to a newer key,
//! and blobs of the key it named before must still unwrap, as they do with libmongocrypt,
//! which never names it.

mod credentials;

use core::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bson::{doc, Bson, Document};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use self::credentials::{one_line, xml_text, CredentialSource, Credentials, Env};
use crate::error::{Error, Result};
use crate::key::KeyMaterial;
use crate::kms::http::{endpoint_url, transient_status, HttpClient, HttpResponse};
use crate::kms::{kms_error, Kms, ProviderContext};

/// The JSON protocol's content type.
const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// The encryption-context key that carries the associated data (Tink's AWS AEAD uses the same).
const AD_CONTEXT_KEY: &str = "associatedData";

/// One configured AWS KMS provider (`aws` or `aws:<name>`).
pub(crate) struct AwsKms {
    /// Also the provider's name (`aws`, `aws:prod`).
    http: HttpClient,
    credentials: CredentialSource,
    /// `AWS_ENDPOINT_URL_KMS`, else `AWS_ENDPOINT_URL`, when the provider was built.
    env_endpoint: Option<String>,
}

impl fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKms")
            .field("name", &self.name())
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// A checked `masterKey` document.
struct MasterKey<'a> {
    region: &'a str,
    key: &'a str,
    endpoint: Option<&'a str>,
}

impl AwsKms {
    /// A provider from its `kmsProviders` entry: `{accessKeyId, secretAccessKey,
    /// sessionToken?}`, or empty for the AWS credential chain (see [`credentials`]).
    ///
    /// # Errors
    /// [`Error::Kms`] for a malformed entry or an HTTP client that cannot be built.
    pub(crate) fn new(ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Self> {
        Self::with_env(ctx, credentials, Env::process())
    }

    /// As [`AwsKms::new`], reading `env` instead of the process environment.
    pub(crate) fn with_env(
        ctx: &ProviderContext<'_>,
        credentials: &Document,
        env: Env,
    ) -> Result<Self> {
        let env_endpoint = env
            .get("AWS_ENDPOINT_URL_KMS")
            .or_else(|| env.get("AWS_ENDPOINT_URL"))
            .map(str::to_owned);
        let credentials =
            CredentialSource::from_entry(ctx.name, credentials, env, || HttpClient::new(ctx))?;
        Ok(AwsKms {
            http: HttpClient::new(ctx)?,
            credentials,
            env_endpoint,
        })
    }

    fn config_error(&self, what: impl fmt::Display) -> Error {
        Error::KeyFormat(format!("KMS {}: masterKey: {what}", self.name()))
    }

    /// Checks a `masterKey` document's fields (see the module docs).
    fn parse<'a>(&self, master_key: &'a Document) -> Result<MasterKey<'a>> {
        let mut region = None;
        let mut key = None;
        let mut endpoint = None;
        for (k, v) in master_key {
            let text = match v {
                Bson::String(s) if !s.is_empty() => s.as_str(),
                _ => return Err(self.config_error(format!("{k} must be a non-empty string"))),
            };
            match k.as_str() {
                "provider" if text == self.name() => {}
                "provider" => {
                    return Err(self.config_error(format!(
                        "provider {text:?} is not this provider ({:?})",
                        self.name()
                    )))
                }
                "region" => region = Some(text),
                "key" => key = Some(text),
                "endpoint" => endpoint = Some(text),
                other => {
                    return Err(self.config_error(format!(
                        "unknown field {other:?} (expected provider, region, key, endpoint)"
                    )))
                }
            }
        }
        let region = region.ok_or_else(|| self.config_error("region is missing"))?;
        let key =
            key.ok_or_else(|| self.config_error("key is missing (a KMS key ARN, id or alias)"))?;
        if !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(self.config_error(format!("region {region:?} is not an AWS region name")));
        }
        let mk = MasterKey {
            region,
            key,
            endpoint,
        };
        if mk.endpoint.is_some() {
            self.url(&mk)?;
        }
        Ok(mk)
    }

    /// The URL requests for this master key go to.
    fn url(&self, mk: &MasterKey<'_>) -> Result<reqwest::Url> {
        match (mk.endpoint, &self.env_endpoint) {
            (Some(e), _) => endpoint_url(self.name(), e),
            (None, Some(e)) => endpoint_url(self.name(), e),
            (None, None) => endpoint_url(self.name(), &format!("kms.{}.amazonaws.com", mk.region)),
        }
    }

    /// Signs and sends one KMS call; returns the 200 response's body.
    async fn call(
        &self,
        mk: &MasterKey<'_>,
        target: &str,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let url = self.url(mk)?;
        let creds = self.credentials.get(self.name(), mk.key).await?;
        let response = self
            .http
            .send_with(
                mk.key,
                &|client: &reqwest::Client| {
                    self.signed(client, &url, mk.region, target, body, &creds)
                        .map_err(|what| kms_error(self.name(), mk.key, what))
                },
                &retryable,
            )
            .await?;
        let ok = response.is_success();
        let HttpResponse { status, body } = response;
        if ok {
            return Ok(body);
        }
        Err(self.refusal(mk, status, &body, &creds))
    }

    /// A request signed for this instant (called again for each attempt).
    fn signed(
        &self,
        client: &reqwest::Client,
        url: &reqwest::Url,
        region: &str,
        target: &str,
        body: &[u8],
        creds: &Credentials,
    ) -> core::result::Result<reqwest::Request, String> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let identity = aws_credential_types::Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key().expose_secret(),
            creds.session_token().map(|t| t.expose_secret().to_owned()),
            None,
            "fieldcrypt",
        )
        .into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("kms")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("cannot sign the request: {e}"))?
            .into();
        let headers = [("content-type", CONTENT_TYPE), ("x-amz-target", target)];
        let signable = SignableRequest::new(
            "POST",
            url.as_str(),
            headers.iter().copied(),
            SignableBody::Bytes(body),
        )
        .map_err(|e| format!("cannot sign the request: {e}"))?;
        // The signing error never holds the secret; the instructions do, and are applied only.
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| format!("cannot sign the request: {e}"))?
            .into_parts();
        let mut req = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .header("x-amz-target", target);
        for (name, value) in instructions.headers() {
            req = req.header(name, value);
        }
        // reqwest owns this copy of the body (with the plaintext key for Encrypt) and does not
        // wipe it; ours is wiped by the caller.
        req.body(body.to_vec())
            .build()
            .map_err(|e| format!("cannot build the request: {e}"))
    }

    /// The error for a non-200 answer: KMS's `__type` and message (JSON), or the `Code` and
    /// `Message` of the XML error an AWS front end answers with.
    fn refusal(&self, mk: &MasterKey<'_>, status: u16, body: &[u8], creds: &Credentials) -> Error {
        #[derive(Deserialize)]
        struct AwsError {
            #[serde(rename = "message", alias = "Message")]
            message: Option<String>,
        }
        let (kind, message) = match error_type(body) {
            Some(kind) => (
                kind,
                serde_json::from_slice::<AwsError>(body)
                    .ok()
                    .and_then(|e| e.message)
                    .unwrap_or_default(),
            ),
            None => {
                let text = String::from_utf8_lossy(body);
                match xml_text(&text, "Code") {
                    Some(code) => (code, xml_text(&text, "Message").unwrap_or_default()),
                    None => {
                        return kms_error(
                            self.name(),
                            mk.key,
                            format!("HTTP {status} without a KMS error in the body"),
                        )
                    }
                }
            }
        };
        if matches!(
            kind.as_str(),
            "InvalidCiphertextException" | "IncorrectKeyException"
        ) {
            return Error::Decrypt;
        }
        let mut message = one_line(&message);
        // Some refusals quote the request; never let a credential through.
        for secret in [Some(creds.secret_access_key()), creds.session_token()]
            .into_iter()
            .flatten()
        {
            if !secret.expose_secret().is_empty() {
                message = message.replace(secret.expose_secret(), "[REDACTED]");
            }
        }
        if let Some(at) = message.find("Signature=") {
            message.truncate(at);
            message.push_str("[REDACTED]");
        }
        let hint = match kind.as_str() {
            "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch" => {
                " (check the credentials, and that the region is the key's)"
            }
            _ => "",
        };
        let sep = if message.is_empty() { "" } else { ": " };
        kms_error(
            self.name(),
            mk.key,
            format!(
                "{kind}{sep}{message}{hint} (HTTP {status}, region {})",
                mk.region
            ),
        )
    }
}

/// KMS's throttling comes as HTTP 400 `ThrottlingException` (and `LimitExceededException`),
/// besides the statuses every provider retries.
fn retryable(r: &HttpResponse) -> bool {
    transient_status(r)
        || (r.status == 400
            && matches!(
                error_type(&r.body).as_deref(),
                Some("ThrottlingException" | "LimitExceededException")
            ))
}

/// The `__type` of a KMS error body, without its namespace
/// (`com.amazonaws.kms#NotFoundException` → `NotFoundException`).
fn error_type(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Type {
        #[serde(rename = "__type")]
        kind: String,
    }
    let t: Type = serde_json::from_slice(body).ok()?;
    t.kind.rsplit('#').next().map(str::to_owned)
}

/// `KeyId` for `Decrypt`: not for aliases (see the module docs).
fn decrypt_key_id(key: &str) -> Option<&str> {
    let alias = key.starts_with("alias/") || key.contains(":alias/");
    (!alias).then_some(key)
}

/// The encryption context for `ad` (none when empty, as libmongocrypt).
fn context(ad: &[u8]) -> Option<[(&'static str, String); 1]> {
    (!ad.is_empty()).then(|| [(AD_CONTEXT_KEY, hex_lower(ad))])
}

fn hex_lower(bytes: &[u8]) -> String {
    use core::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Serializes a request body into a buffer that is wiped on drop, sized so that it does not
/// grow (a growing `Vec` would leave copies of the plaintext behind).
fn json_body(value: &impl Serialize, size_hint: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(size_hint + 256));
    // Writing strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out
}

#[derive(Serialize)]
struct EncryptRequest<'a> {
    #[serde(rename = "KeyId")]
    key_id: &'a str,
    #[serde(rename = "Plaintext")]
    plaintext: &'a str,
    #[serde(rename = "EncryptionContext", skip_serializing_if = "Option::is_none")]
    context: Option<std::collections::BTreeMap<&'static str, String>>,
}

#[derive(Serialize)]
struct DecryptRequest<'a> {
    #[serde(rename = "CiphertextBlob")]
    blob: &'a str,
    #[serde(rename = "KeyId", skip_serializing_if = "Option::is_none")]
    key_id: Option<&'a str>,
    #[serde(rename = "EncryptionContext", skip_serializing_if = "Option::is_none")]
    context: Option<std::collections::BTreeMap<&'static str, String>>,
}

#[async_trait::async_trait]
impl Kms for AwsKms {
    fn name(&self) -> &str {
        self.http.provider()
    }

    fn master_key(&self, master_key: &Document) -> Result<Document> {
        let mk = self.parse(master_key)?;
        let mut out = doc! { "provider": self.name(), "region": mk.region, "key": mk.key };
        if let Some(e) = mk.endpoint {
            out.insert("endpoint", e);
        }
        Ok(out)
    }

    async fn encrypt(
        &self,
        master_key: &Document,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        let mk = self.parse(master_key)?;
        let plaintext = Zeroizing::new(B64.encode(dek.expose_secret()));
        let body = json_body(
            &EncryptRequest {
                key_id: mk.key,
                plaintext: &plaintext,
                context: context(ad).map(|c| c.into_iter().collect()),
            },
            plaintext.len() + mk.key.len() + 2 * ad.len(),
        );
        drop(plaintext);
        let response = self.call(&mk, "TrentService.Encrypt", &body).await?;
        #[derive(Deserialize)]
        struct EncryptResponse {
            #[serde(rename = "CiphertextBlob")]
            blob: String,
        }
        let blob = serde_json::from_slice::<EncryptResponse>(&response)
            .ok()
            .and_then(|r| B64.decode(r.blob).ok())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                kms_error(
                    self.name(),
                    mk.key,
                    "Encrypt answered without a CiphertextBlob",
                )
            })?;
        Ok((self.master_key(master_key)?, blob))
    }

    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial> {
        let mk = self.parse(master_key)?;
        if wrapped.is_empty() {
            return Err(Error::Decrypt);
        }
        let blob = B64.encode(wrapped);
        let body = json_body(
            &DecryptRequest {
                blob: &blob,
                key_id: decrypt_key_id(mk.key),
                context: context(ad).map(|c| c.into_iter().collect()),
            },
            blob.len() + mk.key.len() + 2 * ad.len(),
        );
        let response = self.call(&mk, "TrentService.Decrypt", &body).await?;
        #[derive(Deserialize)]
        struct DecryptResponse {
            #[serde(rename = "Plaintext")]
            plaintext: Zeroizing<String>,
        }
        let plaintext = serde_json::from_slice::<DecryptResponse>(&response)
            .ok()
            .and_then(|r| B64.decode(r.plaintext.as_bytes()).ok().map(Zeroizing::new))
            .ok_or_else(|| {
                kms_error(self.name(), mk.key, "Decrypt answered without a Plaintext")
            })?;
        Ok(KeyMaterial::from_slice(&plaintext))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::{RetryPolicy, TlsOptions};

    fn kms(entry: Document, env: &[(&str, &str)]) -> AwsKms {
        let ctx = ProviderContext {
            name: "aws",
            tls: &TlsOptions::default(),
            retry: &RetryPolicy::default(),
        };
        AwsKms::with_env(&ctx, &entry, Env::from_pairs(env)).unwrap()
    }

    #[test]
    fn debug_prints_no_credentials() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let token = "FwoGZXIvYXdzEXAMPLETOKEN";
        let k = kms(
            doc! { "accessKeyId": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": secret, "sessionToken": token },
            &[],
        );
        let chain = kms(
            doc! {},
            &[
                ("AWS_SECRET_ACCESS_KEY", secret),
                ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
            ],
        );
        let shown = format!("{k:?} {chain:?}");
        assert!(
            shown.contains("AKIA…") && shown.contains("DefaultChain"),
            "{shown}"
        );
        for s in [secret, token, "IOSFODNN7EXAMPLE"] {
            assert!(!shown.contains(s), "{shown}");
        }
    }

    #[test]
    fn endpoints_from_master_key_then_environment_then_region() {
        let mk = |endpoint: Option<&str>| {
            let mut d = doc! { "provider": "aws", "region": "eu-west-3", "key": "k" };
            if let Some(e) = endpoint {
                d.insert("endpoint", e);
            }
            d
        };
        let url = |k: &AwsKms, d: &Document| k.url(&k.parse(d).unwrap()).unwrap().to_string();
        let none = kms(doc! {}, &[]);
        assert_eq!(
            url(&none, &mk(None)),
            "https://kms.eu-west-3.amazonaws.com/"
        );
        assert_eq!(
            url(&none, &mk(Some("kms.example.com:8443"))),
            "https://kms.example.com:8443/"
        );
        assert_eq!(
            url(&none, &mk(Some("http://127.0.0.1:4566"))),
            "http://127.0.0.1:4566/"
        );
        let any = kms(doc! {}, &[("AWS_ENDPOINT_URL", "https://any.example.com")]);
        assert_eq!(url(&any, &mk(None)), "https://any.example.com/");
        let both = kms(
            doc! {},
            &[
                ("AWS_ENDPOINT_URL", "https://any.example.com"),
                ("AWS_ENDPOINT_URL_KMS", "https://kms.example.com"),
            ],
        );
        assert_eq!(url(&both, &mk(None)), "https://kms.example.com/");
        // The masterKey's endpoint wins over the environment.
        assert_eq!(
            url(&both, &mk(Some("kms.other.com"))),
            "https://kms.other.com/"
        );
    }

    #[test]
    fn refusals_are_classified() {
        let k = kms(
            doc! { "accessKeyId": "AKIAX", "secretAccessKey": "the-secret" },
            &[],
        );
        let d = doc! { "provider": "aws", "region": "us-east-1", "key": "arn:k" };
        let mk = k.parse(&d).unwrap();
        let creds = Credentials::for_tests("AKIAX", "the-secret");
        let refuse = |status, body: &str| k.refusal(&mk, status, body.as_bytes(), &creds);
        for t in [
            "InvalidCiphertextException",
            "com.amazonaws.kms#IncorrectKeyException",
        ] {
            let body = format!(r#"{{"__type":"{t}"}}"#);
            assert!(matches!(refuse(400, &body), Error::Decrypt), "{t}");
        }
        for (body, says) in [
            (r#"{"__type":"DisabledException","message":"arn:k is disabled."}"#, "DisabledException: arn:k is disabled."),
            (r#"{"__type":"KMSInvalidStateException","Message":"pending deletion"}"#, "KMSInvalidStateException: pending deletion"),
            (r#"{"__type":"AccessDeniedException","Message":"User: x is not authorized"}"#, "AccessDeniedException"),
            (r#"{"__type":"UnrecognizedClientException","message":"The security token included in the request is invalid."}"#, "check the credentials"),
            ("<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message><![CDATA[no match\nCanonical: the-secret]]></Message></Error></ErrorResponse>", "SignatureDoesNotMatch: no match"),
            (r#"{"__type":"InvalidSignatureException","message":"Credential=AKIAX/..., Signature=abcdef"}"#, "[REDACTED]"),
            ("<html>bad gateway</html>", "HTTP 502 without a KMS error"),
        ] {
            let e = refuse(if body.starts_with('<') && body.contains("html") { 502 } else { 400 }, body);
            let shown = format!("{e} {e:?}");
            assert!(matches!(e, Error::Kms { .. }) && shown.contains(says) && shown.contains("key arn:k"), "{shown}");
            assert!(!shown.contains("the-secret") && !shown.contains("abcdef"), "{shown}");
        }
        let throttled = HttpResponse {
            status: 400,
            body: br#"{"__type":"ThrottlingException"}"#.to_vec().into(),
        };
        let denied = HttpResponse {
            status: 400,
            body: br#"{"__type":"AccessDeniedException"}"#.to_vec().into(),
        };
        assert!(retryable(&throttled) && !retryable(&denied));
        assert!(retryable(&HttpResponse {
            status: 503,
            body: Vec::new().into()
        }));
    }

    #[test]
    fn bodies_are_libmongocrypts_for_empty_ad() {
        let e = json_body(
            &EncryptRequest {
                key_id: "arn:k",
                plaintext: "AAE=",
                context: context(&[]).map(|c| c.into_iter().collect()),
            },
            0,
        );
        assert_eq!(
            std::str::from_utf8(&e).unwrap(),
            r#"{"KeyId":"arn:k","Plaintext":"AAE="}"#
        );
        let d = json_body(
            &DecryptRequest {
                blob: "AQI=",
                key_id: decrypt_key_id("alias/x"),
                context: context(&[0xab, 1]).map(|c| c.into_iter().collect()),
            },
            0,
        );
        assert_eq!(
            std::str::from_utf8(&d).unwrap(),
            r#"{"CiphertextBlob":"AQI=","EncryptionContext":{"associatedData":"ab01"}}"#
        );
        assert_eq!(decrypt_key_id("arn:aws:kms:us-east-1:1:alias/x"), None);
        assert_eq!(
            decrypt_key_id("arn:aws:kms:us-east-1:1:key/k"),
            Some("arn:aws:kms:us-east-1:1:key/k")
        );
    }
}
