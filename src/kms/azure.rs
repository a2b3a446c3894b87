//! Azure Key Vault (`"azure"`): data keys wrapped with `wrapkey`/`unwrapkey` (RSA-OAEP-256)
//! under a Key Vault key, as libmongocrypt does.
//!
//! ```text
//!  masterKey {provider: "azure", keyVaultEndpoint, keyName, keyVersion?}
//!  POST https://<keyVaultEndpoint>/keys/<keyName>/<keyVersion>/wrapkey?api-version=7.1
//!       Authorization: Bearer <token for https://<vault domain>>
//!       {"alg": "RSA-OAEP-256", "value": base64url(plaintext)}  ──▶  {"kid", "value"}
//! ```
//!
//! Credentials (`kmsProviders.azure`), as MongoDB's drivers take them:
//! `{tenantId, clientId, clientSecret, identityPlatformEndpoint?}` (the client-credentials grant
//! at `https://<identityPlatformEndpoint | login.microsoftonline.com>/<tenantId>/oauth2/v2.0/token`,
//! scope `https://<vault domain>/.default`), `{accessToken}`, or **empty**: the VM's managed
//! identity from Azure IMDS (`http://169.254.169.254/metadata/identity/oauth2/token`; the host
//! can be moved with `AZURE_POD_IDENTITY_AUTHORITY_HOST`, as the Azure SDKs allow).
//!
//! RSA-OAEP has no associated data: a non-empty one (fieldcrypt's own keys) is bound by
//! wrapping `SHA-256(ad) ‖ dek` and comparing the digest in constant time on unwrap. An empty
//! one (MongoDB's CSFLE keys) wraps exactly the key, as libmongocrypt does.
//!
//! Tested against a fake that speaks the REST protocol (`fieldcrypt_testkit::kms::fake_azure`):
//! Azure has no local emulator.

use core::fmt;

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bson::{doc, Document};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use super::http::{HttpClient, HttpResponse};
use super::oauth::{
    error_detail, only_fields, optional_str, path_segment, required_str, secret_field,
    static_token, Endpoint, Metadata, TokenSource, Tokens,
};
use super::{kms_error, master_key_id, Kms, ProviderContext};
use crate::error::{Error, Result};
use crate::key::KeyMaterial;

/// The Key Vault API version libmongocrypt uses for `wrapkey`/`unwrapkey`.
const API_VERSION: &str = "7.1";

/// Where tokens come from when no `identityPlatformEndpoint` is given.
const DEFAULT_IDENTITY_PLATFORM: &str = "login.microsoftonline.com";

/// Azure IMDS's token path on its link-local address.
const IMDS_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// The Azure SDKs' variable that moves IMDS (AAD pod identity, tests): `http://host[:port]`.
const IMDS_HOST_ENV: &str = "AZURE_POD_IDENTITY_AUTHORITY_HOST";

/// The length of the SHA-256 digest of the associated data wrapped before the key.
const AD_DIGEST_LEN: usize = 32;

/// A configured Azure Key Vault provider.
pub(crate) struct AzureKms {
    name: String,
    http: HttpClient,
    tokens: Tokens,
}

impl AzureKms {
    /// Reads `kmsProviders.<name>` (see the module docs); nothing is sent until a key is
    /// wrapped or unwrapped.
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for a missing, mistyped or unknown field, a bad
    /// `identityPlatformEndpoint` or `AZURE_POD_IDENTITY_AUTHORITY_HOST`; errors of
    /// [`HttpClient::new`].
    pub(crate) fn new(ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Self> {
        let what = format!("kmsProviders.{}", ctx.name);
        let source = if credentials.is_empty() {
            TokenSource::Metadata(Metadata::AzureImds(imds_url(&what)?))
        } else if let Some(token) = static_token(credentials, &what)? {
            token
        } else {
            only_fields(
                credentials,
                &what,
                &[
                    "tenantId",
                    "clientId",
                    "clientSecret",
                    "identityPlatformEndpoint",
                ],
            )?;
            let tenant = path_segment(
                &what,
                "tenantId",
                required_str(credentials, &what, "tenantId")?,
            )?;
            let client_id = required_str(credentials, &what, "clientId")?.to_owned();
            let client_secret =
                SecretString::from(required_str(credentials, &what, "clientSecret")?.to_owned());
            let platform = Endpoint::parse(
                &what,
                "identityPlatformEndpoint",
                optional_str(credentials, &what, "identityPlatformEndpoint")?
                    .unwrap_or(DEFAULT_IDENTITY_PLATFORM),
            )?;
            TokenSource::ClientCredentials {
                url: platform.url(&format!("/{tenant}/oauth2/v2.0/token"))?,
                client_id,
                client_secret,
            }
        };
        Ok(Self {
            name: ctx.name.to_owned(),
            http: HttpClient::new(ctx)?,
            tokens: Tokens::new(source),
        })
    }

    /// `wrapkey` or `unwrapkey` of `value` under the key `master_key` names.
    async fn key_operation(
        &self,
        master_key: &Document,
        operation: &str,
        value: &[u8],
    ) -> Result<HttpResponse> {
        let key_id = master_key_id(master_key);
        let key = KeyRef::parse(master_key)?;
        // libmongocrypt's path: an empty version segment (`/keys/<name>//wrapkey`) names the
        // key's current version.
        let url = key.endpoint.url(&format!(
            "/keys/{}/{}/{operation}?api-version={API_VERSION}",
            key.name, key.version
        ))?;
        // The body holds the plaintext key for wrapkey: wiped once sent.
        let b64 = Zeroizing::new(URL_SAFE_NO_PAD.encode(value));
        let body = Zeroizing::new(format!(
            r#"{{"alg":"RSA-OAEP-256","value":"{}"}}"#,
            b64.as_str()
        ));
        // The token's audience is the vault's domain, as libmongocrypt derives the scope.
        let resource = format!("https://{}", key.endpoint.domain);
        self.tokens
            .send(&self.http, &key_id, &resource, &|client, token| {
                client
                    .post(url.clone())
                    .bearer_auth(token)
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json")
                    .body(body.as_str().to_owned())
                    .build()
                    .map_err(|_| kms_error(&self.name, &key_id, "cannot build the request"))
            })
            .await
    }

    /// The error for a refused request: status and the vault's error code and message.
    fn refused(&self, key_id: &str, operation: &str, response: &HttpResponse) -> Error {
        let hint = match response.status {
            401 => ": the access token was refused",
            403 => ": access denied or key disabled",
            404 => ": no such key (or key version) in this vault",
            _ => "",
        };
        kms_error(
            &self.name,
            key_id,
            format_args!(
                "{operation} refused: HTTP {}{hint}{}",
                response.status,
                error_detail(&response.body, &self.secrets())
            ),
        )
    }

    /// What must never be echoed in an error, if a server did echo it.
    fn secrets(&self) -> Vec<&str> {
        match self.tokens.source() {
            TokenSource::Static(t) => vec![t.expose_secret()],
            TokenSource::ClientCredentials { client_secret, .. } => {
                vec![client_secret.expose_secret()]
            }
            _ => Vec::new(),
        }
    }

    /// The `value` of a successful answer, base64url-decoded (the answer is wiped).
    fn value(
        &self,
        key_id: &str,
        operation: &str,
        response: &mut HttpResponse,
    ) -> Result<Zeroizing<Vec<u8>>> {
        secret_field(&mut response.body, "value", |v| {
            URL_SAFE_NO_PAD
                .decode(v)
                .or_else(|_| URL_SAFE.decode(v))
                .ok()
        })
        .ok_or_else(|| {
            kms_error(
                &self.name,
                key_id,
                format_args!("malformed {operation} response"),
            )
        })
    }
}

/// A checked masterKey's parts.
struct KeyRef<'a> {
    endpoint: Endpoint,
    name: &'a str,
    version: &'a str,
}

impl<'a> KeyRef<'a> {
    fn parse(master_key: &'a Document) -> Result<Self> {
        let what = "masterKey";
        let endpoint = Endpoint::parse(
            what,
            "keyVaultEndpoint",
            required_str(master_key, what, "keyVaultEndpoint")?,
        )?;
        let name = path_segment(what, "keyName", required_str(master_key, what, "keyName")?)?;
        // An empty keyVersion is the current version, as libmongocrypt accepts it.
        let version = match optional_str(master_key, what, "keyVersion")? {
            Some("") | None => "",
            Some(v) => path_segment(what, "keyVersion", v)?,
        };
        Ok(KeyRef {
            endpoint,
            name,
            version,
        })
    }
}

#[async_trait::async_trait]
impl Kms for AzureKms {
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
            &["provider", "keyVaultEndpoint", "keyName", "keyVersion"],
        )?;
        let key = KeyRef::parse(master_key)?;
        let mut out = doc! {
            "provider": self.name.as_str(),
            "keyVaultEndpoint": key.endpoint.host_and_port.as_str(),
            "keyName": key.name,
        };
        if master_key.contains_key("keyVersion") {
            out.insert("keyVersion", key.version);
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
        // RSA-OAEP has no associated data: bind it by wrapping its digest with the key.
        let mut plain = Zeroizing::new(Vec::with_capacity(AD_DIGEST_LEN + dek.len()));
        if !ad.is_empty() {
            plain.extend_from_slice(&Sha256::digest(ad));
        }
        plain.extend_from_slice(dek.expose_secret());
        let mut response = self.key_operation(master_key, "wrapkey", &plain).await?;
        drop(plain);
        if !response.is_success() {
            return Err(self.refused(&key_id, "wrapkey", &response));
        }
        let wrapped = self.value(&key_id, "wrapkey", &mut response)?;
        Ok((master_key.clone(), wrapped.to_vec()))
    }

    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial> {
        let key_id = master_key_id(master_key);
        let mut response = self.key_operation(master_key, "unwrapkey", wrapped).await?;
        match response.status {
            // BadParameter: the blob does not decrypt under this key.
            400 => return Err(Error::Decrypt),
            s if !(200..300).contains(&s) => {
                return Err(self.refused(&key_id, "unwrapkey", &response))
            }
            _ => {}
        }
        let plain = self.value(&key_id, "unwrapkey", &mut response)?;
        if ad.is_empty() {
            return Ok(KeyMaterial::from_slice(&plain));
        }
        if plain.len() < AD_DIGEST_LEN {
            return Err(Error::Decrypt);
        }
        let (digest, dek) = plain.split_at(AD_DIGEST_LEN);
        if bool::from(digest.ct_eq(&Sha256::digest(ad))) {
            Ok(KeyMaterial::from_slice(dek))
        } else {
            Err(Error::Decrypt)
        }
    }
}

impl fmt::Debug for AzureKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureKms")
            .field("name", &self.name)
            .field("credentials", &self.tokens.source().kind())
            .finish_non_exhaustive()
    }
}

/// IMDS's token URL: [`IMDS_URL`], or `AZURE_POD_IDENTITY_AUTHORITY_HOST` + its path.
fn imds_url(what: &str) -> Result<reqwest::Url> {
    let text = match std::env::var(IMDS_HOST_ENV) {
        Ok(host) if !host.trim().is_empty() => format!(
            "{}/metadata/identity/oauth2/token",
            host.trim().trim_end_matches('/')
        ),
        _ => IMDS_URL.to_owned(),
    };
    let url = reqwest::Url::parse(&text).map_err(|_| {
        Error::KeyFormat(format!(
            "{what} is empty (managed identity), and {IMDS_HOST_ENV} is not an http(s) URL"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::KeyFormat(format!(
            "{what} is empty (managed identity), and {IMDS_HOST_ENV} is not an http(s) URL"
        )));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::kms::{KmsKek, RetryPolicy, TlsOptions};

    fn provider(credentials: &Document) -> AzureKms {
        let (tls, retry) = (TlsOptions::default(), RetryPolicy::default());
        let ctx = ProviderContext {
            name: "azure",
            tls: &tls,
            retry: &retry,
        };
        AzureKms::new(&ctx, credentials).unwrap()
    }

    #[test]
    fn debug_names_the_credentials_kind_never_the_credentials() {
        let secret = "client-secret-5f0e9d";
        let token = "access-token-77ab31";
        let master_key =
            doc! { "provider": "azure", "keyVaultEndpoint": "v.vault.azure.net", "keyName": "k" };
        for (credentials, kind) in [
            (
                doc! { "tenantId": "t", "clientId": "c", "clientSecret": secret },
                "client credentials",
            ),
            (doc! { "accessToken": token }, "access token"),
        ] {
            let kms = Arc::new(provider(&credentials));
            let kek = KmsKek {
                kms: kms.clone(),
                master_key: master_key.clone(),
            };
            let printed = format!("{kms:?} {kek:?}");
            assert!(printed.contains(kind), "{printed}");
            assert!(printed.contains("v.vault.azure.net/keys/k"), "{printed}");
            assert!(
                !printed.contains(secret) && !printed.contains(token),
                "{printed}"
            );
        }
    }

    #[test]
    fn master_keys_are_stored_as_libmongocrypt_stores_them() {
        let kms = provider(&doc! { "accessToken": "t" });
        let stored = kms
            .master_key(&doc! {
                "keyVersion": "0123abcd",
                "keyName": "k",
                "keyVaultEndpoint": "https://v.vault.azure.net:443/",
                "provider": "azure",
            })
            .unwrap();
        assert_eq!(
            stored,
            doc! {
                "provider": "azure",
                "keyVaultEndpoint": "v.vault.azure.net:443",
                "keyName": "k",
                "keyVersion": "0123abcd",
            }
        );
        assert_eq!(
            stored.keys().collect::<Vec<_>>(),
            ["provider", "keyVaultEndpoint", "keyName", "keyVersion"]
        );
        // libmongocrypt accepts an empty keyVersion (the current one) and stores it as given.
        let mk = doc! {
            "provider": "azure", "keyVaultEndpoint": "v.vault.azure.net", "keyName": "k", "keyVersion": "",
        };
        assert_eq!(kms.master_key(&mk).unwrap(), mk);
        let e = kms
            .master_key(&doc! { "provider": "azure:other", "keyVaultEndpoint": "v.vault.azure.net", "keyName": "k" })
            .unwrap_err();
        assert!(e.to_string().contains("azure"), "{e}");
    }
}
