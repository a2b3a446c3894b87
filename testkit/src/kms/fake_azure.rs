//! A fake Azure Key Vault and Microsoft identity platform, for fieldcrypt's `azure` provider and
//! libmongocrypt against it. Azure has no local emulator; this speaks the documented REST
//! protocol and checks each request as the services do:
//!
//! - **identity platform** `POST /{tenant}/oauth2/v2.0/token`, form-encoded
//!   `grant_type=client_credentials`, `client_id`, `client_secret`, `scope`: a wrong secret is
//!   `401 invalid_client`, an unknown tenant `400 invalid_request`; the token it issues is valid
//!   for the scope's resource only, for [`FakeAzure::set_token_lifetime`] seconds;
//! - **managed identity (IMDS)**, plain HTTP, `GET /metadata/identity/oauth2/token?api-version=
//!   2018-02-01&resource=…` with `Metadata: true` (else 400), `expires_in` a string as IMDS sends it;
//! - **Key Vault** `POST /keys/{name}/{version?}/wrapkey|unwrapkey?api-version=7.x`, bearer token
//!   for this vault's resource (else 401), JSON `{"alg": "RSA-OAEP-256", "value": base64url}`:
//!   real RSA-OAEP with SHA-256 under a 2048-bit key per key version; unknown key 404
//!   `KeyNotFound`, disabled key or denied principal 403 `Forbidden`, a blob that does not
//!   decrypt 400 `BadParameter`.
//!
//! The resource a vault accepts is `https://` and its host without the first label, as
//! libmongocrypt derives the scope (`https://<domain>/.default`): for the fake on `127.0.0.1`
//! that is `https://0.0.1`.
//!
//! Routes for [`FakeHttps::inject`]: `"token"`, `"kms"` on [`FakeAzure::https`], `"imds"` on
//! [`FakeAzure::imds`].

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand::RngCore as _;
use rsa::sha2::Sha256;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde_json::json;

use super::fake_https::{FakeHttps, Handler, Request, Response, TestCa};

/// The API versions of Key Vault's keys operations that the fake accepts (as the service does).
pub const API_VERSIONS: &[&str] = &["7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6"];

/// The fake Key Vault's resource (token audience): `https://` + the vault host without its
/// first label, as libmongocrypt derives it from `keyVaultEndpoint` `127.0.0.1:<port>`.
pub const VAULT_RESOURCE: &str = "https://0.0.1";

struct KeyVersion {
    id: String,
    private: RsaPrivateKey,
}

struct Key {
    versions: Vec<KeyVersion>,
    enabled: bool,
    denied: bool,
}

struct Token {
    resource: String,
    expires: Instant,
}

struct State {
    tenant_id: String,
    client_id: String,
    client_secret: String,
    keys: HashMap<String, Key>,
    tokens: HashMap<String, Token>,
    token_lifetime: u64,
    host: String,
}

/// The fake identity platform + Key Vault (TLS) and IMDS (plain HTTP). Stops when dropped.
pub struct FakeAzure {
    ca: TestCa,
    https: FakeHttps,
    imds: FakeHttps,
    state: Arc<Mutex<State>>,
}

struct AzureHandler {
    state: Arc<Mutex<State>>,
}

struct ImdsHandler {
    state: Arc<Mutex<State>>,
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeAzure {
    /// Starts the fake with a fresh CA, a random tenant, client id and client secret, and no keys.
    ///
    /// # Errors
    /// Binding a port or making the certificates failed.
    pub fn start() -> io::Result<FakeAzure> {
        let ca = TestCa::new()?;
        let state = Arc::new(Mutex::new(State {
            tenant_id: format!("tenant-{}", random_token("")),
            client_id: format!("client-{}", random_token("")),
            client_secret: random_token("azure-secret-"),
            keys: HashMap::new(),
            tokens: HashMap::new(),
            token_lifetime: 3599,
            host: String::new(),
        }));
        let https = FakeHttps::start_tls(
            &ca,
            Arc::new(AzureHandler {
                state: state.clone(),
            }),
        )?;
        let imds = FakeHttps::start_plain(Arc::new(ImdsHandler {
            state: state.clone(),
        }))?;
        lock(&state).host = https.host_and_port();
        Ok(FakeAzure {
            ca,
            https,
            imds,
            state,
        })
    }

    /// The CA that signed the fake's certificate (`TlsOptions.ca_file`).
    #[must_use]
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The TLS server: identity platform and Key Vault (routes `"token"`, `"kms"`).
    #[must_use]
    pub fn https(&self) -> &FakeHttps {
        &self.https
    }

    /// The plain-HTTP IMDS server (route `"imds"`).
    #[must_use]
    pub fn imds(&self) -> &FakeHttps {
        &self.imds
    }

    /// `127.0.0.1:<port>`: the `keyVaultEndpoint` and the `identityPlatformEndpoint`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        self.https.host_and_port()
    }

    /// The tenant id.
    #[must_use]
    pub fn tenant_id(&self) -> String {
        lock(&self.state).tenant_id.clone()
    }

    /// The client (application) id.
    #[must_use]
    pub fn client_id(&self) -> String {
        lock(&self.state).client_id.clone()
    }

    /// The client secret (random per run, so tests can look for it in errors and logs).
    #[must_use]
    pub fn client_secret(&self) -> String {
        lock(&self.state).client_secret.clone()
    }

    /// Creates key `name`, or a new current version of it; returns the version id.
    pub fn add_key(&self, name: &str) -> String {
        // 2048 bits, as Key Vault's default RSA key.
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
            .unwrap_or_else(|e| panic!("RSA key generation: {e}"));
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let id = hex_lower(&id);
        let mut state = lock(&self.state);
        let key = state.keys.entry(name.to_owned()).or_insert(Key {
            versions: Vec::new(),
            enabled: true,
            denied: false,
        });
        key.versions.push(KeyVersion {
            id: id.clone(),
            private,
        });
        id
    }

    /// Enables or disables key `name` (a disabled key refuses wrap and unwrap with 403).
    pub fn set_enabled(&self, name: &str, enabled: bool) {
        if let Some(key) = lock(&self.state).keys.get_mut(name) {
            key.enabled = enabled;
        }
    }

    /// Takes away (or gives back) the client's `wrapKey`/`unwrapKey` permission on key `name`.
    pub fn set_denied(&self, name: &str, denied: bool) {
        if let Some(key) = lock(&self.state).keys.get_mut(name) {
            key.denied = denied;
        }
    }

    /// Decrypts `wrapped` with key `name` (any version) as the vault would, for tests that check
    /// what the client sent. `None` if it does not decrypt.
    #[must_use]
    pub fn unwrap_locally(&self, name: &str, wrapped: &[u8]) -> Option<Vec<u8>> {
        let state = lock(&self.state);
        let key = state.keys.get(name)?;
        key.versions
            .iter()
            .find_map(|v| v.private.decrypt(Oaep::new::<Sha256>(), wrapped).ok())
    }

    /// Encrypts `plain` under the current version of key `name`, as wrapkey does (for tests that
    /// need a blob the client did not make).
    #[must_use]
    pub fn wrap_locally(&self, name: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let state = lock(&self.state);
        let key = state.keys.get(name)?.versions.last()?;
        RsaPublicKey::from(&key.private)
            .encrypt(&mut rand::rngs::OsRng, Oaep::new::<Sha256>(), plain)
            .ok()
    }

    /// Issues a token for this vault's resource directly (the `accessToken` credential form).
    #[must_use]
    pub fn issue_token(&self) -> String {
        let mut state = lock(&self.state);
        let lifetime = state.token_lifetime;
        issue(&mut state, VAULT_RESOURCE.to_owned(), lifetime)
    }

    /// How long the tokens issued from now on live (`expires_in`, seconds; default 3599).
    pub fn set_token_lifetime(&self, seconds: u64) {
        lock(&self.state).token_lifetime = seconds;
    }

    /// Revokes every token issued so far (the vault answers 401 to them).
    pub fn revoke_tokens(&self) {
        lock(&self.state).tokens.clear();
    }
}

impl core::fmt::Debug for FakeAzure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeAzure")
            .field("https", &self.https)
            .field("imds", &self.imds)
            .finish_non_exhaustive()
    }
}

fn issue(state: &mut State, resource: String, lifetime: u64) -> String {
    let token = random_token("azure-token-");
    state.tokens.insert(
        token.clone(),
        Token {
            resource,
            expires: Instant::now() + Duration::from_secs(lifetime),
        },
    );
    token
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn aad_error(status: u16, error: &str, description: &str) -> Response {
    Response::json(
        status,
        &json!({"error": error, "error_description": description, "error_codes": [0]}),
    )
}

fn vault_error(status: u16, code: &str, message: &str) -> Response {
    Response::json(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn vault_error_inner(status: u16, code: &str, message: &str, inner: &str) -> Response {
    Response::json(
        status,
        &json!({"error": {"code": code, "message": message, "innererror": {"code": inner}}}),
    )
}

/// The `wrapkey`/`unwrapkey` path: key name, version (may be empty, as libmongocrypt sends
/// `/keys/{name}//wrapkey`) and operation.
fn parse_key_path(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/keys/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (name, version, op) = match parts.as_slice() {
        [name, op] => (*name, "", *op),
        [name, version, op] => (*name, *version, *op),
        _ => return None,
    };
    (matches!(op, "wrapkey" | "unwrapkey") && !name.is_empty()).then_some((name, version, op))
}

impl Handler for AzureHandler {
    fn route(&self, request: &Request) -> Option<&'static str> {
        if request.path.ends_with("/oauth2/v2.0/token") {
            Some("token")
        } else if parse_key_path(&request.path).is_some() {
            Some("kms")
        } else {
            None
        }
    }

    fn handle(&self, request: &Request) -> Response {
        if request.path.ends_with("/oauth2/v2.0/token") {
            self.token(request)
        } else {
            self.key_operation(request)
        }
    }
}

impl AzureHandler {
    fn token(&self, request: &Request) -> Response {
        let mut state = lock(&self.state);
        let tenant = request
            .path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix("/oauth2/v2.0/token"))
            .unwrap_or_default();
        if request.method != "POST" {
            return aad_error(405, "invalid_request", "AADSTS900561: POST required.");
        }
        if tenant != state.tenant_id {
            return aad_error(
                400,
                "invalid_request",
                "AADSTS90002: Tenant not found. Check to make sure you have the correct tenant ID.",
            );
        }
        let content_type = request.header("content-type").unwrap_or_default();
        if !content_type.starts_with("application/x-www-form-urlencoded") {
            return aad_error(
                400,
                "invalid_request",
                "AADSTS900144: The request body must contain the following parameter: 'grant_type'.",
            );
        }
        let form: HashMap<String, String> = request.form().into_iter().collect();
        let field = |name: &str| form.get(name).map(String::as_str);
        if field("grant_type") != Some("client_credentials") {
            return aad_error(
                400,
                "unsupported_grant_type",
                "AADSTS70003: The app requested an unsupported grant type.",
            );
        }
        if field("client_id") != Some(state.client_id.as_str()) {
            return aad_error(
                400,
                "unauthorized_client",
                "AADSTS700016: Application was not found in the directory.",
            );
        }
        if field("client_secret") != Some(state.client_secret.as_str()) {
            return aad_error(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
            );
        }
        let Some(resource) = field("scope").and_then(|s| s.strip_suffix("/.default")) else {
            return aad_error(
                400,
                "invalid_scope",
                "AADSTS1002012: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
            );
        };
        let resource = resource.to_owned();
        let lifetime = state.token_lifetime;
        let token = issue(&mut state, resource, lifetime);
        Response::json(
            200,
            &json!({
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": token,
            }),
        )
    }

    fn key_operation(&self, request: &Request) -> Response {
        let Some((name, version, op)) = parse_key_path(&request.path) else {
            return vault_error(404, "NotFound", "Not found");
        };
        if request.method != "POST" {
            return vault_error(405, "MethodNotAllowed", "POST required");
        }
        match request.query_param("api-version") {
            None => {
                return vault_error(
                    400,
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                )
            }
            Some(v) if !API_VERSIONS.contains(&v.as_str()) => {
                return vault_error(
                    400,
                    "InvalidApiVersionParameter",
                    "The provided API version is not supported.",
                )
            }
            Some(_) => {}
        }
        let state = lock(&self.state);
        // Authentication first, as the service does: nothing about keys leaks to a caller
        // without a valid token.
        let authorized = request
            .bearer()
            .and_then(|t| state.tokens.get(t))
            .is_some_and(|t| {
                t.resource.trim_end_matches('/') == VAULT_RESOURCE && t.expires > Instant::now()
            });
        if !authorized {
            return vault_error(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
            );
        }
        if !request
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
        {
            return vault_error(415, "UnsupportedMediaType", "application/json required");
        }
        let body: serde_json::Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(_) => return vault_error(400, "BadParameter", "The request body is not JSON."),
        };
        if body.get("alg").and_then(|a| a.as_str()) != Some("RSA-OAEP-256") {
            return vault_error(
                400,
                "BadParameter",
                "Invalid algorithm: expected RSA-OAEP-256 for this test vault.",
            );
        }
        let Some(value) = body.get("value").and_then(|v| v.as_str()).and_then(|v| {
            URL_SAFE_NO_PAD
                .decode(v)
                .ok()
                .or_else(|| URL_SAFE.decode(v).ok())
        }) else {
            return vault_error(
                400,
                "BadParameter",
                "Property value must be base64url encoded.",
            );
        };
        let Some(key) = state.keys.get(name) else {
            return vault_error(
                404,
                "KeyNotFound",
                &format!("A key with (name/id) {name} was not found in this key vault."),
            );
        };
        let key_version = if version.is_empty() {
            key.versions.last()
        } else {
            key.versions.iter().find(|v| v.id == version)
        };
        let Some(key_version) = key_version else {
            return vault_error(
                404,
                "KeyNotFound",
                &format!("A key with (name/id) {name}/{version} was not found in this key vault."),
            );
        };
        if key.denied {
            let permission = if op == "wrapkey" {
                "wrapKey"
            } else {
                "unwrapKey"
            };
            return vault_error_inner(
                403,
                "Forbidden",
                &format!(
                    "The user, group or application does not have keys {permission} permission on key vault."
                ),
                "ForbiddenByPolicy",
            );
        }
        if !key.enabled {
            return vault_error_inner(
                403,
                "Forbidden",
                &format!("Operation {op} is not allowed on a disabled key."),
                "KeyDisabled",
            );
        }
        let kid = format!("https://{}/keys/{name}/{}", state.host, key_version.id);
        let result = if op == "wrapkey" {
            RsaPublicKey::from(&key_version.private)
                .encrypt(&mut rand::rngs::OsRng, Oaep::new::<Sha256>(), &value)
                .map_err(|_| "The value is too long for RSA-OAEP-256 under this key.")
        } else {
            key_version
                .private
                .decrypt(Oaep::new::<Sha256>(), &value)
                .map_err(|_| "The parameter is incorrect.")
        };
        match result {
            Ok(out) => Response::json(
                200,
                &json!({"kid": kid, "value": URL_SAFE_NO_PAD.encode(out)}),
            ),
            Err(message) => vault_error(400, "BadParameter", message),
        }
    }
}

impl Handler for ImdsHandler {
    fn route(&self, request: &Request) -> Option<&'static str> {
        (request.path == "/metadata/identity/oauth2/token").then_some("imds")
    }

    fn handle(&self, request: &Request) -> Response {
        if request.method != "GET" {
            return aad_error(405, "invalid_request", "GET required");
        }
        if request.header("metadata") != Some("true") {
            return aad_error(
                400,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        if request.query_param("api-version").as_deref() != Some("2018-02-01") {
            return aad_error(400, "invalid_request", "Invalid api-version");
        }
        let Some(resource) = request.query_param("resource") else {
            return aad_error(
                400,
                "invalid_request",
                "Required query variable 'resource' is missing",
            );
        };
        let mut state = lock(&self.state);
        let lifetime = state.token_lifetime;
        let token = issue(&mut state, resource.clone(), lifetime);
        Response::json(
            200,
            &json!({
                "access_token": token,
                "client_id": state.client_id,
                "expires_in": lifetime.to_string(),
                "expires_on": "0",
                "ext_expires_in": lifetime.to_string(),
                "not_before": "0",
                "resource": resource,
                "token_type": "Bearer",
            }),
        )
    }
}
