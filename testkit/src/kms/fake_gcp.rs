//! A fake Google Cloud KMS, Google OAuth 2.0 token endpoint and GCE metadata server, for
//! fieldcrypt's `gcp` provider and libmongocrypt against it. Google has no local emulator for
//! Cloud KMS; this speaks the documented REST protocol and checks each request as the services
//! do:
//!
//! - **token endpoint** `POST /token`, form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
//!   `assertion=<JWT>`: the JWT's header must be `{"alg":"RS256","typ":"JWT"}`, its RS256
//!   signature must verify with the service account's **public** key, `iss` must be the
//!   account's email, `aud` the endpoint's token URL, `iat`/`exp` current and at most an hour
//!   apart, `scope` present; anything else is `400 invalid_grant`;
//! - **GCE metadata server**, plain HTTP, `GET /computeMetadata/v1/instance/service-accounts/
//!   default/token` with `Metadata-Flavor: Google` (else 403);
//! - **Cloud KMS** `POST /v1/projects/{p}/locations/{l}/keyRings/{r}/cryptoKeys/{k}[/cryptoKeyVersions/{v}]:encrypt`
//!   and `…/cryptoKeys/{k}:decrypt` with a bearer token whose scopes allow Cloud KMS (else 401):
//!   AES-256-GCM under the key version, bound to the key's resource name and the request's
//!   `additionalAuthenticatedData`; unknown key 404 `NOT_FOUND`, denied 403 `PERMISSION_DENIED`,
//!   disabled version 400 `FAILED_PRECONDITION`, a ciphertext that does not decrypt (wrong
//!   key, wrong AAD, tampered) 400 `INVALID_ARGUMENT`.
//!
//! libmongocrypt derives the JWT's `aud` from the token endpoint's host (`https://<host>/token`,
//! without the port) and the `scope` from the KMS endpoint's domain
//! (`https://www.<domain>/auth/cloudkms`): for the fake on `127.0.0.1` these are
//! [`TOKEN_AUDIENCE`] and [`KMS_SCOPE`].
//!
//! Routes for [`FakeHttps::inject`]: `"token"`, `"kms"` on [`FakeGcp::https`], `"metadata"` on
//! [`FakeGcp::metadata`].

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand::RngCore as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
use rsa::signature::Verifier as _;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde_json::json;

use super::fake_https::{FakeHttps, Handler, Request, Response, TestCa};

/// The JWT `aud` the fake's token endpoint wants: `https://<host>/token` for host `127.0.0.1`.
pub const TOKEN_AUDIENCE: &str = "https://127.0.0.1/token";

/// The scope libmongocrypt asks for when the masterKey's `endpoint` is `127.0.0.1:<port>`.
pub const KMS_SCOPE: &str = "https://www.0.0.1/auth/cloudkms";

/// The broad scope a GCE instance's default service account usually has; Cloud KMS accepts it.
pub const CLOUD_PLATFORM_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// The scope Cloud KMS itself is asked for by default.
pub const CLOUDKMS_SCOPE: &str = "https://www.googleapis.com/auth/cloudkms";

struct Version {
    key: [u8; 32],
    enabled: bool,
}

struct CryptoKey {
    versions: Vec<Version>,
    primary: usize,
    denied: bool,
}

struct Token {
    scopes: Vec<String>,
    expires: Instant,
}

struct State {
    email: String,
    public: RsaPublicKey,
    keys: HashMap<String, CryptoKey>,
    tokens: HashMap<String, Token>,
    token_lifetime: u64,
}

/// The fake token endpoint + Cloud KMS (TLS) and metadata server (plain HTTP). Stops when
/// dropped.
pub struct FakeGcp {
    ca: TestCa,
    https: FakeHttps,
    metadata: FakeHttps,
    private: RsaPrivateKey,
    state: Arc<Mutex<State>>,
}

struct GcpHandler {
    state: Arc<Mutex<State>>,
}

struct MetadataHandler {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The resource name of a CryptoKey.
#[must_use]
pub fn key_resource(project: &str, location: &str, ring: &str, key: &str) -> String {
    format!("projects/{project}/locations/{location}/keyRings/{ring}/cryptoKeys/{key}")
}

impl FakeGcp {
    /// Starts the fake with a fresh CA, a service account with a fresh 2048-bit RSA key, and
    /// no keys.
    ///
    /// # Errors
    /// Binding a port or making the certificates failed.
    pub fn start() -> io::Result<FakeGcp> {
        let ca = TestCa::new()?;
        let private = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let state = Arc::new(Mutex::new(State {
            email: "fieldcrypt-test@fieldcrypt-test.iam.gserviceaccount.com".to_owned(),
            public: RsaPublicKey::from(&private),
            keys: HashMap::new(),
            tokens: HashMap::new(),
            token_lifetime: 3599,
        }));
        let https = FakeHttps::start_tls(
            &ca,
            Arc::new(GcpHandler {
                state: state.clone(),
            }),
        )?;
        let metadata = FakeHttps::start_plain(Arc::new(MetadataHandler {
            state: state.clone(),
        }))?;
        Ok(FakeGcp {
            ca,
            https,
            metadata,
            private,
            state,
        })
    }

    /// The CA that signed the fake's certificate (`TlsOptions.ca_file`).
    #[must_use]
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The TLS server: token endpoint and Cloud KMS (routes `"token"`, `"kms"`).
    #[must_use]
    pub fn https(&self) -> &FakeHttps {
        &self.https
    }

    /// The plain-HTTP metadata server (route `"metadata"`).
    #[must_use]
    pub fn metadata(&self) -> &FakeHttps {
        &self.metadata
    }

    /// `127.0.0.1:<port>`: the credentials' `endpoint` (token) and the masterKey's `endpoint` (KMS).
    #[must_use]
    pub fn endpoint(&self) -> String {
        self.https.host_and_port()
    }

    /// The service account's email.
    #[must_use]
    pub fn email(&self) -> String {
        lock(&self.state).email.clone()
    }

    /// The service account's private key as PKCS#8 PEM, as in the `private_key` of the JSON key
    /// file GCP gives.
    #[must_use]
    pub fn private_key_pem(&self) -> String {
        self.private
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .unwrap_or_else(|e| panic!("PKCS#8 encoding: {e}"))
    }

    /// The private key as PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`), as older tools write it.
    #[must_use]
    pub fn private_key_pkcs1_pem(&self) -> String {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        self.private
            .to_pkcs1_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .unwrap_or_else(|e| panic!("PKCS#1 encoding: {e}"))
    }

    /// The private key as PKCS#8 DER.
    #[must_use]
    pub fn private_key_der(&self) -> Vec<u8> {
        self.private
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            .unwrap_or_else(|e| panic!("PKCS#8 encoding: {e}"))
    }

    /// The private key as base64 of its PKCS#8 DER: libmongocrypt's `privateKey` string form.
    #[must_use]
    pub fn private_key_base64(&self) -> String {
        STANDARD.encode(self.private_key_der())
    }

    /// Creates the CryptoKey (if new) with one more enabled version, which becomes primary;
    /// returns the version number (1-based, as GCP numbers them).
    pub fn add_key(&self, project: &str, location: &str, ring: &str, key: &str) -> u32 {
        let mut material = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut material);
        let mut state = lock(&self.state);
        let crypto_key = state
            .keys
            .entry(key_resource(project, location, ring, key))
            .or_insert(CryptoKey {
                versions: Vec::new(),
                primary: 0,
                denied: false,
            });
        crypto_key.versions.push(Version {
            key: material,
            enabled: true,
        });
        crypto_key.primary = crypto_key.versions.len() - 1;
        u32::try_from(crypto_key.versions.len()).unwrap_or(u32::MAX)
    }

    /// Enables or disables one version of a CryptoKey.
    pub fn set_version_enabled(&self, resource: &str, version: u32, enabled: bool) {
        let mut state = lock(&self.state);
        if let Some(v) = state.keys.get_mut(resource).and_then(|k| {
            k.versions
                .get_mut(usize::try_from(version).unwrap_or(0).wrapping_sub(1))
        }) {
            v.enabled = enabled;
        }
    }

    /// Takes away (or gives back) the caller's encrypt/decrypt permission on a CryptoKey.
    pub fn set_denied(&self, resource: &str, denied: bool) {
        if let Some(k) = lock(&self.state).keys.get_mut(resource) {
            k.denied = denied;
        }
    }

    /// Issues a token with the Cloud KMS scope directly (the `accessToken` credential form).
    #[must_use]
    pub fn issue_token(&self) -> String {
        let mut state = lock(&self.state);
        let lifetime = state.token_lifetime;
        issue(&mut state, vec![CLOUDKMS_SCOPE.to_owned()], lifetime)
    }

    /// How long the tokens issued from now on live (`expires_in`, seconds; default 3599).
    pub fn set_token_lifetime(&self, seconds: u64) {
        lock(&self.state).token_lifetime = seconds;
    }

    /// Revokes every token issued so far.
    pub fn revoke_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// Decrypts a ciphertext of CryptoKey `resource` as `:decrypt` would (for tests that check
    /// what the client sent). `None` if it does not decrypt.
    #[must_use]
    pub fn decrypt_locally(
        &self,
        resource: &str,
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Option<Vec<u8>> {
        let state = lock(&self.state);
        decrypt(state.keys.get(resource)?, resource, ciphertext, aad).ok()
    }
}

impl core::fmt::Debug for FakeGcp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FakeGcp")
            .field("https", &self.https)
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}

fn issue(state: &mut State, scopes: Vec<String>, lifetime: u64) -> String {
    let token = random_token("ya29.fake-");
    state.tokens.insert(
        token.clone(),
        Token {
            scopes,
            expires: Instant::now() + Duration::from_secs(lifetime),
        },
    );
    token
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    Response::json(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn api_error(code: u16, status: &str, message: &str) -> Response {
    Response::json(
        code,
        &json!({"error": {"code": code, "message": message, "status": status}}),
    )
}

/// Ciphertext layout of the fake: version number (4 bytes, big-endian) ‖ nonce (12) ‖ AES-256-GCM
/// ciphertext and tag, with AAD = resource name ‖ 0 ‖ the request's AAD.
fn encrypt(key: &CryptoKey, index: usize, resource: &str, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let version = &key.versions[index];
    let mut nonce = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut nonce);
    let sealing = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &version.key).unwrap_or_else(|_| unreachable!()),
    );
    let mut full_aad = resource.as_bytes().to_vec();
    full_aad.push(0);
    full_aad.extend_from_slice(aad);
    let mut in_out = plain.to_vec();
    sealing
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&full_aad[..]),
            &mut in_out,
        )
        .unwrap_or_else(|_| unreachable!());
    let mut out = u32::try_from(index + 1)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&in_out);
    out
}

/// `Err(true)`: the version is disabled; `Err(false)`: does not decrypt.
fn decrypt(
    key: &CryptoKey,
    resource: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, bool> {
    if ciphertext.len() < 4 + 12 + 16 {
        return Err(false);
    }
    let (version, rest) = ciphertext.split_at(4);
    let (nonce, sealed) = rest.split_at(12);
    let number = u32::from_be_bytes(version.try_into().map_err(|_| false)?);
    let index = usize::try_from(number)
        .map_err(|_| false)?
        .checked_sub(1)
        .ok_or(false)?;
    let version = key.versions.get(index).ok_or(false)?;
    let opening = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &version.key).map_err(|_| false)?);
    let mut full_aad = resource.as_bytes().to_vec();
    full_aad.push(0);
    full_aad.extend_from_slice(aad);
    let mut in_out = sealed.to_vec();
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| false)?;
    let plain = opening
        .open_in_place(nonce, Aad::from(&full_aad[..]), &mut in_out)
        .map_err(|_| false)?
        .to_vec();
    if !version.enabled {
        return Err(true);
    }
    Ok(plain)
}

/// `…/cryptoKeys/{k}:encrypt` → (CryptoKey resource, version number if given, method).
fn parse_kms_path(path: &str) -> Option<(String, Option<String>, &str)> {
    let rest = path.strip_prefix("/v1/")?;
    let (resource, method) = rest.rsplit_once(':')?;
    let parts: Vec<&str> = resource.split('/').collect();
    let (key, version) = match parts.as_slice() {
        ["projects", _, "locations", _, "keyRings", _, "cryptoKeys", _] => (parts.join("/"), None),
        ["projects", _, "locations", _, "keyRings", _, "cryptoKeys", _, "cryptoKeyVersions", v] => {
            (parts[..8].join("/"), Some((*v).to_owned()))
        }
        _ => return None,
    };
    if parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    matches!(method, "encrypt" | "decrypt").then_some((key, version, method))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Handler for GcpHandler {
    fn route(&self, request: &Request) -> Option<&'static str> {
        if request.path == "/token" {
            Some("token")
        } else if parse_kms_path(&request.path).is_some() {
            Some("kms")
        } else {
            None
        }
    }

    fn handle(&self, request: &Request) -> Response {
        if request.path == "/token" {
            self.token(request)
        } else {
            self.kms(request)
        }
    }
}

impl GcpHandler {
    fn token(&self, request: &Request) -> Response {
        if request.method != "POST" {
            return oauth_error(405, "invalid_request", "POST required");
        }
        if !request
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/x-www-form-urlencoded")
        {
            return oauth_error(400, "invalid_request", "Invalid Content-Type");
        }
        let form: HashMap<String, String> = request.form().into_iter().collect();
        if form.get("grant_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        {
            return oauth_error(400, "unsupported_grant_type", "Invalid grant_type: ");
        }
        let Some(assertion) = form.get("assertion") else {
            return oauth_error(
                400,
                "invalid_request",
                "Missing required parameter: assertion",
            );
        };
        let mut state = lock(&self.state);
        let scopes = match verify_jwt(&state, assertion) {
            Ok(scopes) => scopes,
            Err(why) => return oauth_error(400, "invalid_grant", why),
        };
        let lifetime = state.token_lifetime;
        let token = issue(&mut state, scopes, lifetime);
        Response::json(
            200,
            &json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
        )
    }

    fn kms(&self, request: &Request) -> Response {
        let Some((resource, version, method)) = parse_kms_path(&request.path) else {
            return api_error(404, "NOT_FOUND", "Not found");
        };
        if request.method != "POST" {
            return api_error(405, "METHOD_NOT_ALLOWED", "POST required");
        }
        let state = lock(&self.state);
        let authorized = request
            .bearer()
            .and_then(|t| state.tokens.get(t))
            .is_some_and(|t| {
                t.expires > Instant::now()
                    && t.scopes
                        .iter()
                        .any(|s| s == KMS_SCOPE || s == CLOUDKMS_SCOPE || s == CLOUD_PLATFORM_SCOPE)
            });
        if !authorized {
            return api_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
            );
        }
        let body: serde_json::Value = match serde_json::from_slice(&request.body) {
            Ok(v) => v,
            Err(_) => return api_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
        };
        let field = |name: &str| -> Result<Option<Vec<u8>>, Response> {
            match body.get(name) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => STANDARD.decode(s).map(Some).map_err(|_| {
                    api_error(
                        400,
                        "INVALID_ARGUMENT",
                        &format!("Invalid value at '{name}' (TYPE_BYTES), Base64 decoding failed"),
                    )
                }),
                Some(_) => Err(api_error(
                    400,
                    "INVALID_ARGUMENT",
                    &format!("Invalid value at '{name}' (TYPE_BYTES)"),
                )),
            }
        };
        let aad = match field("additionalAuthenticatedData") {
            Ok(a) => a.unwrap_or_default(),
            Err(r) => return r,
        };
        let Some(key) = state.keys.get(&resource) else {
            return api_error(
                404,
                "NOT_FOUND",
                &format!("CryptoKey {resource} not found."),
            );
        };
        if key.denied {
            let permission = if method == "encrypt" {
                "cloudkms.cryptoKeyVersions.useToEncrypt"
            } else {
                "cloudkms.cryptoKeyVersions.useToDecrypt"
            };
            return api_error(
                403,
                "PERMISSION_DENIED",
                &format!("Permission '{permission}' denied on resource '{resource}' (or it may not exist)."),
            );
        }
        if method == "decrypt" {
            if version.is_some() {
                return api_error(404, "NOT_FOUND", "Method not found.");
            }
            let ciphertext = match field("ciphertext") {
                Ok(Some(c)) => c,
                Ok(None) => return api_error(400, "INVALID_ARGUMENT", "ciphertext is required."),
                Err(r) => return r,
            };
            return match decrypt(key, &resource, &ciphertext, &aad) {
                Ok(plain) => Response::json(
                    200,
                    &json!({"plaintext": STANDARD.encode(plain), "usedPrimary": true}),
                ),
                Err(true) => api_error(
                    400,
                    "FAILED_PRECONDITION",
                    &format!("{resource}/cryptoKeyVersions/? is not enabled, current state is: DISABLED."),
                ),
                Err(false) => api_error(
                    400,
                    "INVALID_ARGUMENT",
                    "Decryption failed: the ciphertext is invalid.",
                ),
            };
        }
        let plain = match field("plaintext") {
            Ok(Some(p)) => p,
            Ok(None) => return api_error(400, "INVALID_ARGUMENT", "plaintext is required."),
            Err(r) => return r,
        };
        let index = match &version {
            None => key.primary,
            Some(v) => match v.parse::<usize>().ok().and_then(|n| n.checked_sub(1)) {
                Some(i) if i < key.versions.len() => i,
                _ => {
                    return api_error(
                        404,
                        "NOT_FOUND",
                        &format!("CryptoKeyVersion {resource}/cryptoKeyVersions/{v} not found."),
                    )
                }
            },
        };
        if !key.versions[index].enabled {
            return api_error(
                400,
                "FAILED_PRECONDITION",
                &format!(
                    "{resource}/cryptoKeyVersions/{} is not enabled, current state is: DISABLED.",
                    index + 1
                ),
            );
        }
        let ciphertext = encrypt(key, index, &resource, &plain, &aad);
        Response::json(
            200,
            &json!({
                "name": format!("{resource}/cryptoKeyVersions/{}", index + 1),
                "ciphertext": STANDARD.encode(ciphertext),
            }),
        )
    }
}

/// base64url with or without padding: libmongocrypt pads its JWT's parts, and Google accepts it.
fn b64url(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).ok()
}

/// Checks a JWT-bearer assertion as Google's token endpoint does; returns its scopes.
fn verify_jwt(state: &State, assertion: &str) -> Result<Vec<String>, &'static str> {
    let mut parts = assertion.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(
            "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe.",
        );
    };
    let header: serde_json::Value = b64url(header)
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or("Invalid JWT header.")?;
    if header.get("alg").and_then(|a| a.as_str()) != Some("RS256") {
        return Err("Invalid JWT header: alg must be RS256.");
    }
    if header.get("typ").is_some_and(|t| t.as_str() != Some("JWT")) {
        return Err("Invalid JWT header: typ.");
    }
    let signature = b64url(signature).ok_or("Invalid JWT Signature.")?;
    let signed =
        &assertion[..assertion.len() - assertion.rsplit('.').next().map_or(0, str::len) - 1];
    let verifying = rsa::pkcs1v15::VerifyingKey::<rsa::sha2::Sha256>::new(state.public.clone());
    let signature =
        rsa::pkcs1v15::Signature::try_from(&signature[..]).map_err(|_| "Invalid JWT Signature.")?;
    verifying
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.")?;
    let claims: serde_json::Value = b64url(claims)
        .and_then(|c| serde_json::from_slice(&c).ok())
        .ok_or("Invalid JWT claims.")?;
    if claims.get("iss").and_then(|v| v.as_str()) != Some(state.email.as_str()) {
        return Err("Invalid JWT: iss is not a known service account.");
    }
    if claims.get("aud").and_then(|v| v.as_str()) != Some(TOKEN_AUDIENCE) {
        return Err("Invalid JWT: Failed audience check.");
    }
    let (Some(iat), Some(exp)) = (
        claims.get("iat").and_then(serde_json::Value::as_i64),
        claims.get("exp").and_then(serde_json::Value::as_i64),
    ) else {
        return Err("Invalid JWT: iat and exp are required.");
    };
    let now = now_secs();
    if iat > now + 60 || exp <= now || exp <= iat || exp - iat > 3600 {
        return Err("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.");
    }
    let scopes: Vec<String> = claims
        .get("scope")
        .and_then(|v| v.as_str())
        .map(|s| {
            s.split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if scopes.is_empty() {
        return Err("Invalid JWT: scope is required.");
    }
    Ok(scopes)
}

impl Handler for MetadataHandler {
    fn route(&self, request: &Request) -> Option<&'static str> {
        (request.path == "/computeMetadata/v1/instance/service-accounts/default/token")
            .then_some("metadata")
    }

    fn handle(&self, request: &Request) -> Response {
        if request.method != "GET" {
            return oauth_error(405, "invalid_request", "GET required");
        }
        // The real server refuses requests without the header, and proxied ones.
        if request.header("metadata-flavor") != Some("Google")
            || request.header("x-forwarded-for").is_some()
        {
            return Response {
                status: 403,
                content_type: "text/html",
                body: b"Missing Metadata-Flavor:Google header.".to_vec(),
            };
        }
        let mut state = lock(&self.state);
        let lifetime = state.token_lifetime;
        let token = issue(&mut state, vec![CLOUD_PLATFORM_SCOPE.to_owned()], lifetime);
        Response::json(
            200,
            &json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
        )
    }
}
