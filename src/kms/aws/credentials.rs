//! AWS credentials: the ones a `kmsProviders.aws` entry gives, or the standard AWS chain.
//!
//! An entry `{accessKeyId, secretAccessKey, sessionToken?}` is used as it is. An **empty**
//! entry means what it means to MongoDB's drivers and every AWS SDK: find credentials in the
//! environment, trying in order
//!
//! 1. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`);
//! 2. web identity: `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (+ `AWS_ROLE_SESSION_NAME`),
//!    exchanged at STS (`AssumeRoleWithWebIdentity`; EKS service accounts);
//! 3. the shared files `~/.aws/credentials` and `~/.aws/config` (`AWS_SHARED_CREDENTIALS_FILE`,
//!    `AWS_CONFIG_FILE`), profile `AWS_PROFILE` or `default`: static keys only;
//! 4. container credentials (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` on 169.254.170.2, or
//!    `AWS_CONTAINER_CREDENTIALS_FULL_URI` with `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`;
//!    ECS tasks, EKS Pod Identity);
//! 5. instance metadata, IMDSv2 (a session token by `PUT`, then the role's credentials;
//!    `AWS_EC2_METADATA_SERVICE_ENDPOINT`, off with `AWS_EC2_METADATA_DISABLED=true`).
//!
//! The environment is read when the provider is built; files, STS and the metadata services
//! are asked at the first KMS call, and temporary credentials are kept until five minutes
//! before they expire. Secrets are [`SecretString`]s from the moment they are read; `Debug`
//! shows at most the first four characters of the access key id (its kind: `AKIA`, `ASIA`).

use core::fmt;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bson::{Bson, Document};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::kms::http::HttpClient;
use crate::kms::kms_error;

/// Temporary credentials are fetched again when less than this is left of their lifetime.
const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// The ECS container credentials endpoint, for `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
const CONTAINER_HOST: &str = "http://169.254.170.2";
/// The instance metadata service.
const IMDS_ENDPOINT: &str = "http://169.254.169.254";
/// What the SDKs wait for a metadata service (it is local or absent).
const METADATA_TIMEOUT: Duration = Duration::from_secs(1);
/// Lifetime asked for an IMDSv2 session token (the SDKs' default, 6 hours).
const IMDS_TOKEN_TTL: &str = "21600";

/// One set of AWS credentials.
pub(crate) struct Credentials {
    access_key_id: String,
    secret_access_key: SecretString,
    session_token: Option<SecretString>,
    /// When temporary credentials stop working; `None` for long-term keys.
    expires: Option<SystemTime>,
}

impl Credentials {
    /// The access key id (not a secret: it names the key and shows in CloudTrail).
    pub(crate) fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// The secret access key.
    pub(crate) fn secret_access_key(&self) -> &SecretString {
        &self.secret_access_key
    }

    /// The session token of temporary credentials.
    pub(crate) fn session_token(&self) -> Option<&SecretString> {
        self.session_token.as_ref()
    }

    /// Long-term credentials (unit tests).
    #[cfg(test)]
    pub(crate) fn for_tests(id: &str, secret: &str) -> Self {
        Credentials {
            access_key_id: id.to_owned(),
            secret_access_key: SecretString::from(secret),
            session_token: None,
            expires: None,
        }
    }

    fn fresh(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|at| {
            at.duration_since(now)
                .is_ok_and(|left| left > REFRESH_BEFORE)
        })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &redacted_key_id(&self.access_key_id))
            .field("session_token", &self.session_token.is_some())
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// `AKIA…`: the key id's kind, not the key id.
fn redacted_key_id(id: &str) -> String {
    let prefix: String = id.chars().take(4).collect();
    format!("{prefix}…")
}

/// The environment variables the chain reads, captured once.
///
/// Holds secrets (`AWS_SECRET_ACCESS_KEY`, tokens): no `Debug`, and the values are wiped on drop.
#[derive(Default)]
pub(crate) struct Env {
    vars: BTreeMap<String, Zeroizing<String>>,
}

impl Env {
    /// The process environment's `AWS_*` variables and `HOME`.
    pub(crate) fn process() -> Self {
        Env {
            vars: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| k.starts_with("AWS_") || k == "HOME" || k == "USERPROFILE")
                .map(|(k, v)| (k, Zeroizing::new(v)))
                .collect(),
        }
    }

    /// An environment with exactly these variables (tests).
    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Env {
            vars: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Zeroizing::new((*v).to_owned())))
                .collect(),
        }
    }

    /// A variable's value; unset and empty are the same, as for the SDKs.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn home(&self) -> Option<PathBuf> {
        self.get("HOME")
            .or_else(|| self.get("USERPROFILE"))
            .map(PathBuf::from)
    }

    /// A path from a variable, else `~/.aws/<name>`; `~/` expanded as the SDKs do.
    fn aws_file(&self, var: &str, name: &str) -> Option<PathBuf> {
        match self.get(var) {
            Some(p) => match (p.strip_prefix("~/"), self.home()) {
                (Some(rest), Some(home)) => Some(home.join(rest)),
                _ => Some(PathBuf::from(p)),
            },
            None => self.home().map(|h| h.join(".aws").join(name)),
        }
    }
}

/// Where a provider's credentials come from.
pub(crate) enum CredentialSource {
    /// Given in the `kmsProviders` entry.
    Static(Arc<Credentials>),
    /// The standard chain (an empty entry).
    Chain(Box<Chain>),
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::Static(c) => f.debug_tuple("Static").field(c).finish(),
            CredentialSource::Chain(_) => f.write_str("DefaultChain"),
        }
    }
}

impl CredentialSource {
    /// Reads a `kmsProviders` entry: `{accessKeyId, secretAccessKey, sessionToken?}`, or empty
    /// for the chain (which then reads `env`; `sts` makes the client that reaches STS for web
    /// identity and HTTPS container endpoints).
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for unknown fields, fields that are not non-empty strings, or a key
    /// id without its secret (or the other way round).
    pub(crate) fn from_entry(
        provider: &str,
        entry: &Document,
        env: Env,
        sts: impl FnOnce() -> Result<HttpClient>,
    ) -> Result<Self> {
        if entry.is_empty() {
            return Ok(CredentialSource::Chain(Box::new(Chain::new(
                provider,
                env,
                sts()?,
            )?)));
        }
        let bad = |what: String| Error::KeyFormat(format!("kmsProviders.{provider}: {what}"));
        let mut id = None;
        let mut secret = None;
        let mut token = None;
        for (k, v) in entry {
            let slot = match k.as_str() {
                "accessKeyId" => &mut id,
                "secretAccessKey" => &mut secret,
                "sessionToken" => &mut token,
                other => {
                    return Err(bad(format!(
                    "unknown field {other:?} (expected accessKeyId, secretAccessKey, sessionToken)"
                )))
                }
            };
            match v {
                Bson::String(s) if !s.is_empty() => *slot = Some(s.as_str()),
                // Never print the value: it may be the secret.
                _ => return Err(bad(format!("{k} must be a non-empty string"))),
            }
        }
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(CredentialSource::Static(Arc::new(Credentials {
                access_key_id: id.to_owned(),
                secret_access_key: SecretString::from(secret),
                session_token: token.map(SecretString::from),
                expires: None,
            }))),
            (None, _) => Err(bad(
                "accessKeyId is missing (give accessKeyId and secretAccessKey, or an empty \
                 entry for the AWS credential chain)"
                    .to_owned(),
            )),
            (Some(_), None) => Err(bad("secretAccessKey is missing".to_owned())),
        }
    }

    /// Credentials for a request about `key_id` (named in errors).
    ///
    /// # Errors
    /// [`Error::Kms`] when the chain finds none, or a source it found fails.
    pub(crate) async fn get(&self, provider: &str, key_id: &str) -> Result<Arc<Credentials>> {
        match self {
            CredentialSource::Static(c) => Ok(Arc::clone(c)),
            CredentialSource::Chain(chain) => chain.get(provider, key_id).await,
        }
    }
}

/// The standard AWS credential chain, with a cache for what it found.
pub(crate) struct Chain {
    env: Env,
    /// STS, for web identity (TLS options and retries of the provider).
    sts: HttpClient,
    /// The container and instance metadata services: plain HTTP on link-local or loopback
    /// addresses, never through a proxy, short timeouts.
    metadata: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Arc<Credentials>>>,
}

impl Chain {
    fn new(provider: &str, env: Env, sts: HttpClient) -> Result<Self> {
        let metadata = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(METADATA_TIMEOUT)
            .timeout(METADATA_TIMEOUT * 2)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Kms {
                provider: provider.to_owned(),
                reason: format!("cannot build the metadata HTTP client: {e}"),
            })?;
        Ok(Chain {
            env,
            sts,
            metadata,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    async fn get(&self, provider: &str, key_id: &str) -> Result<Arc<Credentials>> {
        // One caller resolves; the others wait for its result instead of asking too.
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref().filter(|c| c.fresh(SystemTime::now())) {
            return Ok(Arc::clone(c));
        }
        let found = Arc::new(self.resolve(provider, key_id).await?);
        *cache = Some(Arc::clone(&found));
        Ok(found)
    }

    async fn resolve(&self, provider: &str, key_id: &str) -> Result<Credentials> {
        let fail = |what: String| kms_error(provider, key_id, format!("AWS credentials: {what}"));
        if let Some(c) = self.environment().map_err(fail)? {
            return Ok(c);
        }
        if let Some(c) = self.web_identity(provider, key_id).await? {
            return Ok(c);
        }
        if let Some(c) = self.shared_files().map_err(fail)? {
            return Ok(c);
        }
        if let Some(c) = self.container(provider, key_id).await? {
            return Ok(c);
        }
        match self.instance_metadata().await {
            Ok(Some(c)) => Ok(c),
            Ok(None) => Err(fail(NONE_FOUND.to_owned())),
            Err(e) => Err(fail(format!("{NONE_FOUND}; instance metadata: {e}"))),
        }
    }

    fn environment(&self) -> core::result::Result<Option<Credentials>, String> {
        match (
            self.env.get("AWS_ACCESS_KEY_ID"),
            self.env.get("AWS_SECRET_ACCESS_KEY"),
        ) {
            (None, None) => Ok(None),
            (Some(id), Some(secret)) => Ok(Some(Credentials {
                access_key_id: id.to_owned(),
                secret_access_key: SecretString::from(secret),
                session_token: self.env.get("AWS_SESSION_TOKEN").map(SecretString::from),
                expires: None,
            })),
            (Some(_), None) => Err("AWS_ACCESS_KEY_ID is set, AWS_SECRET_ACCESS_KEY is not".into()),
            (None, Some(_)) => Err("AWS_SECRET_ACCESS_KEY is set, AWS_ACCESS_KEY_ID is not".into()),
        }
    }

    async fn web_identity(&self, provider: &str, key_id: &str) -> Result<Option<Credentials>> {
        let (Some(token_file), Some(role)) = (
            self.env.get("AWS_WEB_IDENTITY_TOKEN_FILE"),
            self.env.get("AWS_ROLE_ARN"),
        ) else {
            return Ok(None);
        };
        let fail = |what: String| {
            kms_error(
                provider,
                key_id,
                format!("AWS credentials: web identity (role {role}): {what}"),
            )
        };
        let token = std::fs::read_to_string(token_file)
            .map(Zeroizing::new)
            .map_err(|e| fail(format!("cannot read AWS_WEB_IDENTITY_TOKEN_FILE: {e}")))?;
        let token = SecretString::from(token.trim());
        let session = match self.env.get("AWS_ROLE_SESSION_NAME") {
            Some(s) => s.to_owned(),
            None => format!(
                "fieldcrypt-{}",
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ),
        };
        // The shared rule: https, or plain http to loopback only (the token and the
        // credentials STS answers with must not cross a network in clear).
        let url = crate::kms::http::endpoint_url(provider, &self.sts_endpoint())?;
        let response = self
            .sts
            .send(key_id, &|client: &reqwest::Client| {
                client
                    .post(url.clone())
                    .header(reqwest::header::ACCEPT, "application/xml")
                    .form(&[
                        ("Action", "AssumeRoleWithWebIdentity"),
                        ("Version", "2011-06-15"),
                        ("RoleArn", role),
                        ("RoleSessionName", session.as_str()),
                        ("WebIdentityToken", token.expose_secret()),
                    ])
                    .build()
                    .map_err(|e| fail(format!("cannot build the STS request: {e}")))
            })
            .await?;
        let status = response.status;
        let raw = response.body;
        let body = Zeroizing::new(String::from_utf8_lossy(&raw).into_owned());
        drop(raw);
        if status != 200 {
            return Err(fail(
                match (xml_text(&body, "Code"), xml_text(&body, "Message")) {
                    (Some(code), Some(message)) => {
                        format!("STS: {code}: {}", one_line(&message))
                    }
                    _ => format!("STS answered HTTP {status}"),
                },
            ));
        }
        let field = |name: &str| {
            xml_text(&body, name).ok_or_else(|| fail(format!("STS response without {name}")))
        };
        let access_key_id = field("AccessKeyId")?;
        let secret = Zeroizing::new(field("SecretAccessKey")?);
        let session_token = Zeroizing::new(field("SessionToken")?);
        let expires = parse_time(&field("Expiration")?)
            .ok_or_else(|| fail("STS response with an unreadable Expiration".to_owned()))?;
        Ok(Some(Credentials {
            access_key_id,
            secret_access_key: SecretString::from(secret.as_str()),
            session_token: Some(SecretString::from(session_token.as_str())),
            expires: Some(expires),
        }))
    }

    /// `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL`, else the regional endpoint
    /// (`AWS_REGION`, `AWS_DEFAULT_REGION`) or the global one.
    fn sts_endpoint(&self) -> String {
        if let Some(url) = self
            .env
            .get("AWS_ENDPOINT_URL_STS")
            .or_else(|| self.env.get("AWS_ENDPOINT_URL"))
        {
            return url.to_owned();
        }
        match self
            .env
            .get("AWS_REGION")
            .or_else(|| self.env.get("AWS_DEFAULT_REGION"))
        {
            // A region name only: nothing that could move the host.
            Some(region)
                if !region.is_empty()
                    && region
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                format!("https://sts.{region}.amazonaws.com/")
            }
            Some(_) => "https://sts.amazonaws.com/".to_owned(),
            None => "https://sts.amazonaws.com/".to_owned(),
        }
    }

    fn shared_files(&self) -> core::result::Result<Option<Credentials>, String> {
        let explicit = self.env.get("AWS_PROFILE");
        let name = explicit.unwrap_or("default");
        let credentials_file = self
            .env
            .aws_file("AWS_SHARED_CREDENTIALS_FILE", "credentials");
        let config_file = self.env.aws_file("AWS_CONFIG_FILE", "config");
        let mut profile: Option<BTreeMap<String, Zeroizing<String>>> = None;
        // The config file first: the credentials file's values win.
        for (path, in_config) in [(&config_file, true), (&credentials_file, false)] {
            let Some(path) = path else { continue };
            let Some(text) = read_optional(path)? else {
                continue;
            };
            if let Some(props) = ini_section(&text, name, in_config) {
                profile.get_or_insert_with(BTreeMap::new).extend(props);
            }
        }
        let files = [&config_file, &credentials_file]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let Some(profile) = profile else {
            return match explicit {
                Some(_) => Err(format!("profile {name:?} (AWS_PROFILE) is not in {files}")),
                None => Ok(None),
            };
        };
        let get = |k: &str| profile.get(k).map(|v| v.as_str()).filter(|v| !v.is_empty());
        match (get("aws_access_key_id"), get("aws_secret_access_key")) {
            (Some(id), Some(secret)) => Ok(Some(Credentials {
                access_key_id: id.to_owned(),
                secret_access_key: SecretString::from(secret),
                session_token: get("aws_session_token").map(SecretString::from),
                expires: None,
            })),
            (Some(_), None) | (None, Some(_)) => Err(format!(
                "profile {name:?} in {files} needs both aws_access_key_id and aws_secret_access_key"
            )),
            (None, None) => {
                let unsupported = [
                    "role_arn",
                    "credential_process",
                    "sso_session",
                    "sso_start_url",
                    "web_identity_token_file",
                ]
                .into_iter()
                .find(|k| profile.contains_key(*k));
                match (unsupported, explicit) {
                    (Some(k), _) => Err(format!(
                        "profile {name:?} uses {k}, which fieldcrypt does not support (static keys only; \
                         use environment variables or web identity instead)"
                    )),
                    (None, Some(_)) => Err(format!("profile {name:?} in {files} has no credentials")),
                    (None, None) => Ok(None),
                }
            }
        }
    }

    async fn container(&self, provider: &str, key_id: &str) -> Result<Option<Credentials>> {
        let Some(url) = container_url(&self.env) else {
            return Ok(None);
        };
        let fail = |what: String| {
            kms_error(
                provider,
                key_id,
                format!("AWS credentials: container endpoint: {what}"),
            )
        };
        let token = match (
            self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            self.env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        ) {
            // Read at every fetch: the agent rotates the file.
            (Some(file), _) => Some(SecretString::from(
                std::fs::read_to_string(file)
                    .map(Zeroizing::new)
                    .map_err(|e| {
                        fail(format!(
                            "cannot read AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: {e}"
                        ))
                    })?
                    .trim(),
            )),
            (None, Some(t)) => Some(SecretString::from(t)),
            (None, None) => None,
        };
        let parsed = reqwest::Url::parse(&url).map_err(|_| fail("not a URL".to_owned()))?;
        if !container_url_allowed(&parsed) {
            return Err(fail(
                "must be https, or http to a loopback address or the ECS/EKS agent".to_owned(),
            ));
        }
        let body = if parsed.scheme() == "https" {
            let response = self
                .sts
                .send(key_id, &|client: &reqwest::Client| {
                    let mut req = client.get(parsed.clone());
                    if let Some(t) = &token {
                        req = req.header(reqwest::header::AUTHORIZATION, t.expose_secret());
                    }
                    req.build()
                        .map_err(|e| fail(format!("cannot build the request: {e}")))
                })
                .await?;
            if response.status != 200 {
                return Err(fail(format!("HTTP {}", response.status)));
            }
            response.body
        } else {
            let mut req = self.metadata.get(parsed.clone());
            if let Some(t) = &token {
                req = req.header(reqwest::header::AUTHORIZATION, t.expose_secret());
            }
            fetch(req).await.map_err(fail)?
        };
        parse_json_credentials(&body).map(Some).map_err(fail)
    }

    async fn instance_metadata(&self) -> core::result::Result<Option<Credentials>, String> {
        if self
            .env
            .get("AWS_EC2_METADATA_DISABLED")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Ok(None);
        }
        let base = self
            .env
            .get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or(IMDS_ENDPOINT)
            .trim_end_matches('/');
        let token = fetch(
            self.metadata
                .put(format!("{base}/latest/api/token"))
                .header("x-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL),
        )
        .await
        .map_err(|e| format!("session token: {e}"))?;
        let token = SecretString::from(String::from_utf8_lossy(&token).trim());
        let roles_url = format!("{base}/latest/meta-data/iam/security-credentials/");
        let with_token = |url: &str| {
            self.metadata
                .get(url)
                .header("x-aws-ec2-metadata-token", token.expose_secret())
        };
        let roles = fetch(with_token(&roles_url))
            .await
            .map_err(|e| format!("role name: {e}"))?;
        let roles = String::from_utf8_lossy(&roles).into_owned();
        let role = roles
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or("the instance has no IAM role")?;
        if role.contains('/') || role.contains("..") {
            return Err("unexpected role name".to_owned());
        }
        let body = fetch(with_token(&format!("{roles_url}{role}")))
            .await
            .map_err(|e| format!("role {role}: {e}"))?;
        parse_json_credentials(&body).map(Some)
    }
}

const NONE_FOUND: &str = "none found (tried AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web \
     identity, the shared credentials and config files, the container endpoint and instance \
     metadata)";

/// The container credentials URL: `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` on the ECS agent,
/// else `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
fn container_url(env: &Env) -> Option<String> {
    match (
        env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
        env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    ) {
        (Some(relative), _) => Some(format!("{CONTAINER_HOST}{relative}")),
        (None, Some(full)) => Some(full.to_owned()),
        (None, None) => None,
    }
}

/// The SDKs' rule for container credential URLs: https anywhere, plain http only to a
/// loopback address or the ECS and EKS agents' link-local addresses.
fn container_url_allowed(url: &reqwest::Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            match host.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => {
                    ip.is_loopback()
                        || ip == Ipv4Addr::new(169, 254, 170, 2)
                        || ip == Ipv4Addr::new(169, 254, 170, 23)
                }
                Ok(IpAddr::V6(ip)) => {
                    ip.is_loopback() || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)
                }
                Err(_) => host == "localhost",
            }
        }
        _ => false,
    }
}

/// GETs or PUTs a metadata URL once more on a transport error (the SDKs retry too).
async fn fetch(req: reqwest::RequestBuilder) -> core::result::Result<Zeroizing<Vec<u8>>, String> {
    let mut last = String::new();
    for _ in 0..2 {
        let Some(attempt) = req.try_clone() else {
            return Err("request cannot be repeated".to_owned());
        };
        match attempt.send().await {
            Ok(r) if r.status().is_success() => {
                return r
                    .bytes()
                    .await
                    .map(|b| Zeroizing::new(b.to_vec()))
                    .map_err(|e| format!("reading the response: {}", transport(&e)));
            }
            Ok(r) if r.status().is_server_error() => last = format!("HTTP {}", r.status().as_u16()),
            Ok(r) => return Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) => last = transport(&e),
        }
    }
    Err(last)
}

/// A transport failure in a few words.
fn transport(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "transport error".to_owned()
    }
}

/// The container and instance metadata services' JSON:
/// `{AccessKeyId, SecretAccessKey, Token, Expiration}`.
fn parse_json_credentials(body: &[u8]) -> core::result::Result<Credentials, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Json {
        code: Option<String>,
        access_key_id: String,
        secret_access_key: Zeroizing<String>,
        token: Option<Zeroizing<String>>,
        expiration: Option<String>,
    }
    let json: Json = serde_json::from_slice(body)
        .map_err(|_| "the response is not the expected credentials JSON".to_owned())?;
    if let Some(code) = json.code.filter(|c| c != "Success") {
        return Err(format!("answered Code {code:?}"));
    }
    let expires = match json.expiration {
        Some(t) => Some(parse_time(&t).ok_or("unreadable Expiration")?),
        None => None,
    };
    Ok(Credentials {
        access_key_id: json.access_key_id,
        secret_access_key: SecretString::from(json.secret_access_key.as_str()),
        session_token: json.token.map(|t| SecretString::from(t.as_str())),
        expires,
    })
}

/// An RFC 3339 time (`2026-12-03T15:00:00Z`).
fn parse_time(text: &str) -> Option<SystemTime> {
    let millis = bson::DateTime::parse_rfc3339_str(text.trim())
        .ok()?
        .timestamp_millis();
    let millis = u64::try_from(millis).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

/// The text of the first `<name>…</name>` element (STS and AWS front ends answer in XML; its
/// values are plain text, a CDATA section, or text with the five predefined entities).
pub(crate) fn xml_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    let raw = xml[start..start + len].trim();
    if let Some(cdata) = raw
        .strip_prefix("<![CDATA[")
        .and_then(|r| r.strip_suffix("]]>"))
    {
        return Some(cdata.to_owned());
    }
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// A message's first line, at most 200 characters (servers can append request details).
pub(crate) fn one_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default().trim();
    match line.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

fn read_optional(path: &Path) -> core::result::Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The `key = value` pairs of profile `name` in an AWS shared file: `[name]` in the
/// credentials file; `[profile name]` (or `[default]`) in the config file. Comments (`#`, `;`)
/// and nested sub-sections (indented lines) are skipped. `None` when the profile is not there.
fn ini_section(
    text: &str,
    name: &str,
    config_file: bool,
) -> Option<Vec<(String, Zeroizing<String>)>> {
    let wanted = |section: &str| {
        let section = section.trim();
        if config_file {
            match section.strip_prefix("profile") {
                Some(rest) if rest.starts_with([' ', '\t']) => rest.trim() == name,
                _ => section == "default" && name == "default",
            }
        } else {
            section == name
        }
    };
    let mut found = None;
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = wanted(section);
            if inside {
                found.get_or_insert_with(Vec::new);
            }
            continue;
        }
        if !inside {
            continue;
        }
        if let (Some(props), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
            let v = v.trim();
            // An inline comment needs whitespace before it (values may hold `#`).
            let v = v
                .find(" #")
                .or_else(|| v.find(" ;"))
                .map_or(v, |at| v[..at].trim_end());
            props.push((k.trim().to_ascii_lowercase(), Zeroizing::new(v.to_owned())));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_profiles_in_both_files() {
        let creds = "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s1\n\n[dev]\n# c\naws_access_key_id=AKIDDEV\naws_secret_access_key = s2 ; note\n";
        let config = "[default]\nregion = us-east-1\n[profile dev]\nregion = eu-west-1\ns3 =\n  max_concurrent_requests = 10\n[profiled]\naws_access_key_id = WRONG\n";
        let get = |t, n, c| {
            ini_section(t, n, c).map(|v| {
                v.into_iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            get(creds, "dev", false).unwrap(),
            ["aws_access_key_id=AKIDDEV", "aws_secret_access_key=s2"]
        );
        assert_eq!(
            get(config, "dev", true).unwrap(),
            ["region=eu-west-1", "s3="]
        );
        assert_eq!(get(config, "default", true).unwrap(), ["region=us-east-1"]);
        // `[profiled]` is not `[profile d]`, and config sections need the `profile` prefix.
        assert_eq!(get(config, "d", true), None);
        assert_eq!(get(config, "profiled", true), None);
        assert_eq!(get(creds, "nope", false), None);
    }

    #[test]
    fn xml_and_times() {
        let xml =
            "<R><Credentials><AccessKeyId>ASIA1</AccessKeyId><SessionToken>a&amp;b</SessionToken>\
                   <Expiration>2030-01-02T03:04:05.123Z</Expiration></Credentials></R>";
        assert_eq!(xml_text(xml, "AccessKeyId").unwrap(), "ASIA1");
        assert_eq!(xml_text(xml, "SessionToken").unwrap(), "a&b");
        assert_eq!(xml_text(xml, "Nope"), None);
        let t = parse_time(&xml_text(xml, "Expiration").unwrap()).unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
            1_893_553_445_123
        );
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn container_url_relative_wins() {
        let both = Env::from_pairs(&[
            (
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/abc",
            ),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/x"),
        ]);
        assert_eq!(
            container_url(&both).unwrap(),
            "http://169.254.170.2/v2/credentials/abc"
        );
        let full =
            Env::from_pairs(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/x")]);
        assert_eq!(container_url(&full).unwrap(), "http://127.0.0.1:1/x");
        assert_eq!(
            container_url(&Env::from_pairs(&[(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                ""
            )])),
            None
        );
    }

    #[test]
    fn container_urls() {
        let ok = |u: &str| container_url_allowed(&reqwest::Url::parse(u).unwrap());
        assert!(ok("https://example.com/creds"));
        assert!(ok("http://127.0.0.1:8080/creds"));
        assert!(ok("http://169.254.170.2/v2/credentials/x"));
        assert!(ok("http://169.254.170.23/v1/credentials"));
        assert!(ok("http://[fd00:ec2::23]/v1/credentials"));
        assert!(ok("http://localhost/x"));
        assert!(!ok("http://example.com/creds"));
        assert!(!ok("http://10.0.0.1/creds"));
        assert!(!ok("file:///etc/passwd"));
    }

    #[test]
    fn debug_shows_no_secret() {
        let c = Credentials {
            access_key_id: "AKIAEXAMPLEKEYID1234".into(),
            secret_access_key: SecretString::from("wJalrXUtnFEMIsecret"),
            session_token: Some(SecretString::from("FwoGZXIvYXdzEtoken")),
            expires: None,
        };
        let dbg = format!("{c:?}");
        assert!(dbg.contains("AKIA…"), "{dbg}");
        for secret in ["EXAMPLEKEYID", "wJalr", "FwoGZ"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }

    #[test]
    fn freshness() {
        let now = SystemTime::now();
        let with = |expires| Credentials {
            access_key_id: "A".into(),
            secret_access_key: SecretString::from("s"),
            session_token: None,
            expires,
        };
        assert!(with(None).fresh(now));
        assert!(with(Some(now + Duration::from_secs(3600))).fresh(now));
        assert!(!with(Some(now + Duration::from_secs(60))).fresh(now));
        assert!(!with(Some(now - Duration::from_secs(60))).fresh(now));
    }
}
