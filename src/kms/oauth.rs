//! OAuth 2.0 bearer tokens for the Azure Key Vault and Google Cloud KMS providers, and the REST
//! glue both share.
//!
//! ```text
//!  credentials ──▶ TokenSource ──┬─ Static: accessToken, used as given
//!                                ├─ ClientCredentials (Azure): client_id + client_secret ──▶ token endpoint
//!                                ├─ JwtBearer (GCP): RS256 JWT signed with the service account key ──▶ token endpoint
//!                                └─ Metadata: Azure IMDS / GCE metadata server (empty credentials)
//!  Tokens: one cached token per resource, until shortly before `expires_in`;
//!          a KMS call answered 401 drops it and tries once more with a fresh one.
//! ```
//!
//! Tokens and client secrets are [`SecretString`]s and the service account key a ring
//! [`RsaKeyPair`]; none of them reaches an error, a log line or `Debug`. The token endpoints'
//! requests and answers are exactly libmongocrypt's (form fields, JWT claims, scopes), so the
//! same credentials work for both.

use core::fmt;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bson::{Bson, Document};
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use secrecy::{ExposeSecret as _, SecretString};
use zeroize::{Zeroize as _, Zeroizing};

use super::http::{origin, HttpClient, HttpResponse};
use super::kms_error;
use crate::error::{Error, Result};

/// How long a JWT assertion is valid: libmongocrypt's 5 minutes (Google allows at most an hour).
const JWT_LIFETIME_SECS: u64 = 5 * 60;

/// A cached token is used until this long before it expires (or half its lifetime, if that is
/// shorter), so that a token is never sent as it runs out.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// The most of a KMS's error message an error repeats.
const MAX_DETAIL: usize = 200;

/// Where a provider's access tokens come from.
pub(crate) enum TokenSource {
    /// `accessToken` from the configuration: used as given, never refreshed.
    Static(SecretString),
    /// Azure's client-credentials grant: `client_id` and `client_secret` to the identity
    /// platform's token endpoint, scope `<resource>/.default`.
    ClientCredentials {
        /// `https://<identity platform>/<tenant>/oauth2/v2.0/token`.
        url: reqwest::Url,
        /// The application (client) id: not a secret, but only sent to the token endpoint.
        client_id: String,
        /// The client secret.
        client_secret: SecretString,
    },
    /// Google's JWT-bearer grant for a service account: an RS256 JWT signed with its key.
    JwtBearer {
        /// `https://<endpoint>/token`.
        url: reqwest::Url,
        /// The JWT's `aud`: `https://<endpoint host>/token`, as libmongocrypt sends it.
        audience: String,
        /// The service account's email (the JWT's `iss`).
        email: String,
        /// Its private key (boxed: it is large, the other sources are small).
        key: Box<RsaKeyPair>,
    },
    /// A cloud's instance metadata service (credentials left empty in `kmsProviders`).
    Metadata(Metadata),
}

/// The instance metadata services, which give tokens of the VM's (or pod's) identity over plain
/// HTTP on a link-local address.
pub(crate) enum Metadata {
    /// Azure IMDS managed identity: `GET <url>?api-version=2018-02-01&resource=<resource>`,
    /// header `Metadata: true`.
    AzureImds(reqwest::Url),
    /// The GCE metadata server's default service account token, header
    /// `Metadata-Flavor: Google`.
    Gce(reqwest::Url),
}

impl TokenSource {
    /// What kind of credentials these are, for `Debug` and errors.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TokenSource::Static(_) => "access token",
            TokenSource::ClientCredentials { .. } => "client credentials",
            TokenSource::JwtBearer { .. } => "service account",
            TokenSource::Metadata(Metadata::AzureImds(_)) => "managed identity (IMDS)",
            TokenSource::Metadata(Metadata::Gce(_)) => "metadata server",
        }
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

struct Cached {
    token: SecretString,
    refresh_at: Instant,
}

/// A provider's tokens: the source and one cached token per resource.
pub(crate) struct Tokens {
    source: TokenSource,
    /// Held while a token is fetched, so that concurrent calls wait for one request.
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl Tokens {
    pub(crate) fn new(source: TokenSource) -> Self {
        Self {
            source,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn source(&self) -> &TokenSource {
        &self.source
    }

    /// A token for `resource` (Azure: `https://vault.azure.net`; GCP: the scope), from the cache
    /// or a new one.
    ///
    /// # Errors
    /// [`Error::Kms`] when the token endpoint or metadata service refuses or cannot be reached.
    pub(crate) async fn token(
        &self,
        http: &HttpClient,
        key_id: &str,
        resource: &str,
    ) -> Result<SecretString> {
        if let TokenSource::Static(token) = &self.source {
            return Ok(token.clone());
        }
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.get(resource) {
            if Instant::now() < cached.refresh_at {
                return Ok(cached.token.clone());
            }
        }
        let (token, lifetime) = self.fetch(http, key_id, resource).await?;
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        match lifetime.checked_sub(margin).filter(|d| !d.is_zero()) {
            Some(valid) => {
                cache.insert(
                    resource.to_owned(),
                    Cached {
                        token: token.clone(),
                        // A lifetime too far out for the clock is kept for a day.
                        refresh_at: Instant::now()
                            .checked_add(valid)
                            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
                    },
                );
            }
            None => {
                cache.remove(resource);
            }
        }
        Ok(token)
    }

    /// Sends a request that needs a bearer token for `resource`: `build` makes it with the
    /// token. A 401 answer to a token that came from the cache drops it and tries once more
    /// with a fresh one (it may have been revoked or expired early); a given `accessToken` is
    /// not retried.
    ///
    /// # Errors
    /// As [`Tokens::token`] and [`HttpClient::send`].
    pub(crate) async fn send(
        &self,
        http: &HttpClient,
        key_id: &str,
        resource: &str,
        build: &(dyn Fn(&reqwest::Client, &str) -> Result<reqwest::Request> + Sync),
    ) -> Result<HttpResponse> {
        let mut fresh_tried = false;
        loop {
            let token = self.token(http, key_id, resource).await?;
            let response = http
                .send(key_id, &|client| build(client, token.expose_secret()))
                .await?;
            if response.status != 401
                || fresh_tried
                || matches!(self.source, TokenSource::Static(_))
            {
                return Ok(response);
            }
            tracing::info!(provider = %http.provider(), key = key_id, "KMS: access token refused, fetching a new one");
            self.cache.lock().await.remove(resource);
            fresh_tried = true;
        }
    }

    async fn fetch(
        &self,
        http: &HttpClient,
        key_id: &str,
        resource: &str,
    ) -> Result<(SecretString, Duration)> {
        let (url, response) = match &self.source {
            // Tokens::token returns a given token itself; this is only for completeness.
            TokenSource::Static(token) => return Ok((token.clone(), Duration::ZERO)),
            TokenSource::ClientCredentials {
                url,
                client_id,
                client_secret,
            } => {
                let scope = format!("{resource}/.default");
                let response = http
                    .send(key_id, &|client| {
                        // The form holds the secret: wiped once sent.
                        let form = Zeroizing::new(
                            url::form_urlencoded::Serializer::new(String::new())
                                .append_pair("client_id", client_id)
                                .append_pair("scope", &scope)
                                .append_pair("client_secret", client_secret.expose_secret())
                                .append_pair("grant_type", "client_credentials")
                                .finish(),
                        );
                        form_request(client, url, &form, http, key_id)
                    })
                    .await?;
                (url, response)
            }
            TokenSource::JwtBearer {
                url,
                audience,
                email,
                key,
            } => {
                let response = http
                    .send(key_id, &|client| {
                        let assertion =
                            Zeroizing::new(sign_jwt(key, email, audience, resource, http, key_id)?);
                        let form = Zeroizing::new(
                            url::form_urlencoded::Serializer::new(String::new())
                                .append_pair(
                                    "grant_type",
                                    "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                )
                                .append_pair("assertion", &assertion)
                                .finish(),
                        );
                        form_request(client, url, &form, http, key_id)
                    })
                    .await?;
                (url, response)
            }
            TokenSource::Metadata(Metadata::AzureImds(url)) => {
                let mut full = url.clone();
                full.query_pairs_mut()
                    .append_pair("api-version", "2018-02-01")
                    .append_pair("resource", resource);
                let response = http
                    .send(key_id, &|client| {
                        client
                            .get(full.clone())
                            .header("Metadata", "true")
                            .header("Accept", "application/json")
                            .build()
                            .map_err(|_| request_error(http, key_id))
                    })
                    .await?;
                (url, response)
            }
            TokenSource::Metadata(Metadata::Gce(url)) => {
                let response = http
                    .send(key_id, &|client| {
                        client
                            .get(url.clone())
                            .header("Metadata-Flavor", "Google")
                            .header("Accept", "application/json")
                            .build()
                            .map_err(|_| request_error(http, key_id))
                    })
                    .await?;
                (url, response)
            }
        };
        let secrets: &[&str] = match &self.source {
            TokenSource::ClientCredentials { client_secret, .. } => {
                &[client_secret.expose_secret()]
            }
            _ => &[],
        };
        parse_token_response(
            http.provider(),
            key_id,
            url,
            self.source.kind(),
            &response,
            secrets,
        )
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A form-encoded POST to a token endpoint.
fn form_request(
    client: &reqwest::Client,
    url: &reqwest::Url,
    form: &str,
    http: &HttpClient,
    key_id: &str,
) -> Result<reqwest::Request> {
    client
        .post(url.clone())
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .body(form.to_owned())
        .build()
        .map_err(|_| request_error(http, key_id))
}

fn request_error(http: &HttpClient, key_id: &str) -> Error {
    kms_error(http.provider(), key_id, "cannot build the token request")
}

/// An RS256 JWT for Google's JWT-bearer grant, with libmongocrypt's claims: `iss` the
/// service account, `aud` the token endpoint, `scope`, `iat` now and `exp` 5 minutes later.
fn sign_jwt(
    key: &RsaKeyPair,
    email: &str,
    audience: &str,
    scope: &str,
    http: &HttpClient,
    key_id: &str,
) -> Result<String> {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = serde_json::json!({
        "iss": email,
        "aud": audience,
        "scope": scope,
        "iat": iat,
        "exp": iat + JWT_LIFETIME_SECS,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .map_err(|_| {
        kms_error(
            http.provider(),
            key_id,
            "cannot sign the service account's JWT",
        )
    })?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Reads `{"access_token": …, "expires_in": …}` (a number, or a string as Azure IMDS sends it).
fn parse_token_response(
    provider: &str,
    key_id: &str,
    url: &reqwest::Url,
    kind: &str,
    response: &HttpResponse,
    secrets: &[&str],
) -> Result<(SecretString, Duration)> {
    if !response.is_success() {
        return Err(kms_error(
            provider,
            key_id,
            format_args!(
                "{kind}: token request to {} refused: HTTP {}{}",
                origin(url),
                response.status,
                error_detail(&response.body, secrets)
            ),
        ));
    }
    let malformed = || {
        kms_error(
            provider,
            key_id,
            format_args!("{kind}: malformed token response from {}", origin(url)),
        )
    };
    // The body holds the token: parsed into a value that is dropped here, the token kept only
    // as a SecretString.
    let mut value: serde_json::Value =
        serde_json::from_slice(&response.body).map_err(|_| malformed())?;
    let token = match value.get_mut("access_token") {
        Some(serde_json::Value::String(t)) if !t.is_empty() => {
            SecretString::from(std::mem::take(t))
        }
        _ => return Err(malformed()),
    };
    let lifetime = match value.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .map_or(Duration::ZERO, Duration::from_secs);
    Ok((token, lifetime))
}

/// The base64 text of `field` in a KMS's JSON answer, decoded with `decode`. The body and the
/// text are wiped: they hold a data key when the KMS unwrapped one.
pub(crate) fn secret_field(
    body: &mut Vec<u8>,
    field: &str,
    decode: impl Fn(&str) -> Option<Vec<u8>>,
) -> Option<Zeroizing<Vec<u8>>> {
    let parsed = serde_json::from_slice::<serde_json::Value>(body);
    body.zeroize();
    let text = match parsed.ok()?.get_mut(field) {
        Some(serde_json::Value::String(s)) => Zeroizing::new(std::mem::take(s)),
        _ => return None,
    };
    decode(&text).map(Zeroizing::new)
}

/// ` (<code>: <message>)` from a KMS's or token endpoint's JSON error body — Azure's
/// `{"error": {"code", "message", "innererror": {"code"}}}`, Google's `{"error": {"code",
/// "status", "message"}}`, OAuth's `{"error", "error_description"}` — shortened, on one line,
/// with any of `secrets` cut out. Empty when the body says nothing useful.
pub(crate) fn error_detail(body: &[u8], secrets: &[&str]) -> String {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (codes, message) = match value.get("error") {
        Some(serde_json::Value::Object(e)) => {
            let mut codes: Vec<String> = [e.get("status"), e.get("code")]
                .into_iter()
                .filter_map(text)
                .collect();
            if let Some(inner) = e.get("innererror").and_then(|i| text(i.get("code"))) {
                codes.push(inner);
            }
            (codes, text(e.get("message")))
        }
        Some(serde_json::Value::String(code)) => {
            (vec![code.clone()], text(value.get("error_description")))
        }
        _ => return String::new(),
    };
    let mut out = String::new();
    for code in codes.iter().filter(|c| !c.is_empty()) {
        out.push(if out.is_empty() { ' ' } else { '/' });
        out.push_str(code);
    }
    if let Some(message) = message {
        out.push_str(": ");
        out.push_str(&message);
    }
    let mut out: String = out
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, "[REDACTED]");
    }
    if out.chars().count() > MAX_DETAIL {
        out = out.chars().take(MAX_DETAIL).collect::<String>() + "…";
    }
    if out.is_empty() {
        out
    } else {
        format!(" ({})", out.trim())
    }
}

// ---- what the two providers' configuration parsing shares ----

/// An endpoint as libmongocrypt parses `keyVaultEndpoint`, `identityPlatformEndpoint` and the
/// GCP `endpoint`s: `[https://]host[:port][/path]`, stored as `host[:port]`; the host must have
/// a dot, and its **domain** (the host without its first label) names the token's scope.
pub(crate) struct Endpoint {
    /// `host[:port]`, as stored in masterKey documents.
    pub host_and_port: String,
    /// The host alone.
    pub host: String,
    /// The host without its first label: `vault.azure.net` for `myvault.vault.azure.net`.
    pub domain: String,
}

impl Endpoint {
    /// Parses `value`, the `field` of `what` (e.g. `masterKey`, `kmsProviders.gcp`).
    ///
    /// # Errors
    /// [`Error::KeyFormat`] naming the field: a scheme other than `https`, no host, a host
    /// without a dot, a bad port.
    pub(crate) fn parse(what: &str, field: &str, value: &str) -> Result<Self> {
        // A value with userinfo (`user:password@host`) is never quoted.
        if value.contains('@') {
            return Err(Error::KeyFormat(format!(
                "{what}.{field}: an endpoint must not hold credentials"
            )));
        }
        let bad = |why: &str| Error::KeyFormat(format!("{what}.{field} {value:?}: {why}"));
        let rest = match value.split_once("://") {
            Some(("https", rest)) => rest,
            Some(_) => return Err(bad("the KMS is reached over https only")),
            None => value,
        };
        let host_and_port = rest.split(['/', '?']).next().unwrap_or_default().to_owned();
        let url = reqwest::Url::parse(&format!("https://{host_and_port}/"))
            .map_err(|_| bad("not a host[:port]"))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        if host.is_empty() || !url.username().is_empty() || url.password().is_some() {
            return Err(bad("not a host[:port]"));
        }
        let Some((_, domain)) = host.split_once('.') else {
            return Err(bad(
                "the host must be a domain name with a dot (or an IP address)",
            ));
        };
        let domain = domain.to_owned();
        Ok(Endpoint {
            host_and_port,
            host,
            domain,
        })
    }

    /// `https://host[:port]` + `path`.
    pub(crate) fn url(&self, path: &str) -> Result<reqwest::Url> {
        reqwest::Url::parse(&format!("https://{}{path}", self.host_and_port))
            .map_err(|_| Error::KeyFormat(format!("endpoint {:?}: not a URL", self.host_and_port)))
    }
}

/// The `{accessToken}` form of a `kmsProviders` entry, which Azure and GCP share: the token
/// alone (no other field), used as given and never refreshed. `None` when the entry has no
/// `accessToken`.
///
/// # Errors
/// [`Error::KeyFormat`] when `accessToken` is not a string, is empty, or comes with another
/// field.
pub(crate) fn static_token(credentials: &Document, what: &str) -> Result<Option<TokenSource>> {
    let Some(token) = optional_str(credentials, what, "accessToken")? else {
        return Ok(None);
    };
    only_fields(credentials, what, &["accessToken"])?;
    if token.is_empty() {
        return Err(Error::KeyFormat(format!("{what}.accessToken is empty")));
    }
    Ok(Some(TokenSource::Static(SecretString::from(
        token.to_owned(),
    ))))
}

/// Reads a configuration document's optional string field.
///
/// # Errors
/// [`Error::KeyFormat`] when it is there but not a string.
pub(crate) fn optional_str<'a>(
    doc: &'a Document,
    what: &str,
    field: &str,
) -> Result<Option<&'a str>> {
    match doc.get(field) {
        None => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s)),
        Some(_) => Err(Error::KeyFormat(format!("{what}.{field} must be a string"))),
    }
}

/// Reads a configuration document's required, non-empty string field.
///
/// # Errors
/// [`Error::KeyFormat`] when it is missing, empty or not a string.
pub(crate) fn required_str<'a>(doc: &'a Document, what: &str, field: &str) -> Result<&'a str> {
    match optional_str(doc, what, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Error::KeyFormat(format!(
            "{what} needs {field} (a non-empty string)"
        ))),
    }
}

/// Refuses fields other than `allowed` (as libmongocrypt does), so a typo is not ignored.
///
/// # Errors
/// [`Error::KeyFormat`] naming the first unknown field.
pub(crate) fn only_fields(doc: &Document, what: &str, allowed: &[&str]) -> Result<()> {
    match doc.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(extra) => Err(Error::KeyFormat(format!(
            "{what} takes no field {extra:?} (expected {})",
            allowed.join(", ")
        ))),
    }
}

/// Checks that a key identifier can go into a URL path as it is: RFC 3986 unreserved
/// characters only (libmongocrypt's rule for GCP; a superset of what both clouds allow), so
/// that no `/`, `?`, `#` or CR/LF rewrites the request.
///
/// # Errors
/// [`Error::KeyFormat`] naming the field (not the value, which may come from a key document).
pub(crate) fn path_segment<'a>(what: &str, field: &str, value: &'a str) -> Result<&'a str> {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        Ok(value)
    } else {
        Err(Error::KeyFormat(format!(
            "{what}.{field} may hold only letters, digits and - . _ ~"
        )))
    }
}

/// A GCP service account's private key as libmongocrypt and GCP's JSON key files give it:
/// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, the `private_key` of a JSON key file), base64
/// of the PKCS#8 DER (libmongocrypt's string form), or the DER as BSON binary; PKCS#1
/// (`BEGIN RSA PRIVATE KEY`) too.
///
/// # Errors
/// [`Error::KeyFormat`] naming the field, never the key.
pub(crate) fn rsa_private_key(what: &str, value: &Bson) -> Result<RsaKeyPair> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::PrivateKeyDer;

    let bad = || {
        Error::KeyFormat(format!(
            "{what}.privateKey must be the service account's RSA private key: PKCS#8 PEM, or \
             base64 of its DER (as libmongocrypt takes it)"
        ))
    };
    let der: Zeroizing<Vec<u8>> = match value {
        Bson::Binary(b) => Zeroizing::new(b.bytes.clone()),
        Bson::String(s) if s.contains("-----BEGIN") => {
            match PrivateKeyDer::from_pem_slice(s.as_bytes()).map_err(|_| bad())? {
                PrivateKeyDer::Pkcs8(k) => Zeroizing::new(k.secret_pkcs8_der().to_vec()),
                PrivateKeyDer::Pkcs1(k) => Zeroizing::new(k.secret_pkcs1_der().to_vec()),
                _ => return Err(bad()),
            }
        }
        Bson::String(s) => {
            let compact: Zeroizing<String> =
                Zeroizing::new(s.chars().filter(|c| !c.is_whitespace()).collect());
            Zeroizing::new(STANDARD.decode(compact.as_bytes()).map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    };
    RsaKeyPair::from_pkcs8(&der)
        .or_else(|_| RsaKeyPair::from_der(&der))
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_as_libmongocrypt_parses_them() {
        let e =
            Endpoint::parse("masterKey", "keyVaultEndpoint", "myvault.vault.azure.net").unwrap();
        assert_eq!(
            (e.host_and_port.as_str(), e.host.as_str(), e.domain.as_str()),
            (
                "myvault.vault.azure.net",
                "myvault.vault.azure.net",
                "vault.azure.net"
            )
        );
        let e = Endpoint::parse("m", "endpoint", "https://127.0.0.1:8443/some/path").unwrap();
        assert_eq!(
            (e.host_and_port.as_str(), e.host.as_str(), e.domain.as_str()),
            ("127.0.0.1:8443", "127.0.0.1", "0.0.1")
        );
        for bad in [
            "",
            "localhost",
            "http://a.b",
            "a.b:notaport",
            "https://",
            "user:pw@a.b",
        ] {
            let e = Endpoint::parse("m", "endpoint", bad)
                .err()
                .unwrap_or_else(|| panic!("{bad}"));
            assert!(e.to_string().contains("m.endpoint"), "{e}");
        }
        // Userinfo is never quoted back.
        for bad in ["user:hunter2@a.b", "https://user:hunter2@a.b/x"] {
            let e = Endpoint::parse("m", "endpoint", bad).err().unwrap();
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn error_details_are_short_and_redacted() {
        let azure = br#"{"error":{"code":"Forbidden","message":"Operation wrapKey is not allowed on a disabled key.","innererror":{"code":"KeyDisabled"}}}"#;
        assert_eq!(
            error_detail(azure, &[]),
            " (Forbidden/KeyDisabled: Operation wrapKey is not allowed on a disabled key.)"
        );
        let gcp =
            br#"{"error":{"code":404,"message":"CryptoKey x not found.","status":"NOT_FOUND"}}"#;
        assert_eq!(
            error_detail(gcp, &[]),
            " (NOT_FOUND/404: CryptoKey x not found.)"
        );
        let oauth =
            br#"{"error":"invalid_client","error_description":"bad secret s3cr3t\r\nTrace"}"#;
        assert_eq!(
            error_detail(oauth, &["s3cr3t"]),
            " (invalid_client: bad secret [REDACTED]  Trace)"
        );
        assert_eq!(error_detail(b"<html>", &[]), "");
        let long = format!(
            r#"{{"error":{{"code":"X","message":"{}"}}}}"#,
            "a".repeat(500)
        );
        assert!(error_detail(long.as_bytes(), &[]).chars().count() < MAX_DETAIL + 10);
    }

    #[test]
    fn path_segments_refuse_what_would_rewrite_the_request() {
        assert!(path_segment("m", "keyName", "my-key_1.v~2").is_ok());
        for bad in ["", "a/b", "a?b", "a#b", "a b", "a\r\nHost: x", "..%2f"] {
            assert!(path_segment("m", "keyName", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fail_private_keys_that_are_not_rsa_keys() {
        for bad in [
            Bson::String("not base64!".into()),
            Bson::String(STANDARD.encode(b"not DER")),
            Bson::String("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into()),
            Bson::Int32(1),
        ] {
            let e = rsa_private_key("kmsProviders.gcp", &bad).err().unwrap();
            assert!(e.to_string().contains("kmsProviders.gcp.privateKey"), "{e}");
        }
    }
}
