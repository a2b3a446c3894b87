//! HashiCorp Vault / OpenBao **Transit**: data keys wrapped by a Transit key that never leaves
//! Vault (feature `vault`).
//!
//! ```text
//!  wrap    POST {addr}/v1/{mount}/encrypt/{keyName}  {plaintext: b64(dek), associated_data?: b64(ad)}
//!          ──▶ data.ciphertext "vault:v<N>:…"  ──▶ keyMaterial (its UTF-8 bytes)
//!  unwrap  POST {addr}/v1/{mount}/decrypt/{keyName}  {ciphertext, associated_data?} ──▶ data.plaintext
//!  rewrap  POST {addr}/v1/{mount}/rewrap/{keyName}   {ciphertext} ──▶ the newest key version
//! ```
//!
//! MongoDB's drivers have **no** Vault provider: `masterKey: {provider: "vault", …}` is
//! fieldcrypt's own, so key documents wrapped here are read by fieldcrypt only (move them to
//! `aws`, `azure`, `gcp`, `kmip` or `local` with a rewrap before handing them to a driver).
//!
//! # `masterKey`
//!
//! `{provider: "vault", keyName: String, mount?: String, endpoint?: String}`: the Transit key's
//! name, the path the Transit engine is mounted at (default `transit`; nested paths such as
//! `team/transit` work), and where that Vault is. `endpoint` records the Vault the key lives in;
//! the token is sent to the **configured** address only, never to one read from a key
//! document (anyone who can write the key vault could otherwise point a key at their own server
//! and collect the token), so a key whose `endpoint` is not the configured address is refused:
//! configure a named provider (`"vault:other"`) for a second Vault.
//!
//! # Credentials
//!
//! The `kmsProviders` entry `{endpoint? (or addr?), token?, namespace?}`; what it leaves out comes
//! from the environment, as the `vault` and `bao` CLIs read it: `VAULT_ADDR` / `BAO_ADDR`,
//! `VAULT_TOKEN` / `BAO_TOKEN` (else the CLI's token file `~/.vault-token`),
//! `VAULT_NAMESPACE` / `BAO_NAMESPACE`. The environment is read once, when the provider is
//! configured; a missing address or token is reported on first use, so a configuration that
//! lists Vault but does not use it still loads. The token is a [`SecretString`], sent only in
//! the `X-Vault-Token` header (marked sensitive) and printed nowhere.
//!
//! # Associated data and key types
//!
//! fieldcrypt's own keys are bound to their key document: that binding goes to Transit's
//! `associated_data`, which needs an AEAD key type (`aes256-gcm96`, the default, `aes128-gcm96`
//! or `chacha20-poly1305`). MongoDB CSFLE keys (empty associated data) also work under `rsa-*`
//! keys. Derived and convergent Transit keys (they need a per-request `context`) are not
//! supported.
//!
//! Transit's `rewrap` takes no `associated_data`, so only keys wrapped without associated data
//! (CSFLE keys) move to a new key version inside Vault; for fieldcrypt's keys
//! [`Kms::rewrap`] answers "cannot" and the caller unwraps and wraps again.
//!
//! # Creating keys by accident
//!
//! Transit's `encrypt` creates a missing key when the token may `create` on that path. Give
//! the token `update` only (`path "transit/encrypt/<key>" { capabilities = ["update"] }`, the
//! same for `decrypt` and `rewrap`), so a misspelt `keyName` is an error, not a new key.

use core::fmt;
use std::path::PathBuf;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bson::{Bson, Document};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::http::{endpoint_url, transient_status, HttpClient, HttpResponse};
use super::{kms_error, master_key_id, Kms, ProviderContext};
use crate::error::{Error, Result};
use crate::key::KeyMaterial;

/// The `masterKey.mount` of a key that names none: Transit's default mount path.
pub(crate) const DEFAULT_MOUNT: &str = "transit";

/// The header the token goes in.
const TOKEN_HEADER: &str = "X-Vault-Token";
/// The header a Vault Enterprise / OpenBao namespace goes in.
const NAMESPACE_HEADER: &str = "X-Vault-Namespace";

/// How much of Vault's error text an error quotes.
const MAX_VAULT_MESSAGE: usize = 300;

/// The environment variables read for each part of the credentials, in order.
const ADDR_VARS: [&str; 2] = ["VAULT_ADDR", "BAO_ADDR"];
const TOKEN_VARS: [&str; 2] = ["VAULT_TOKEN", "BAO_TOKEN"];
const NAMESPACE_VARS: [&str; 2] = ["VAULT_NAMESPACE", "BAO_NAMESPACE"];
/// The token file of the `vault` and `bao` CLIs, in the home directory.
const TOKEN_FILE: &str = ".vault-token";

/// A Vault / OpenBao Transit provider (`"vault"` or a named `"vault:<name>"`).
pub(crate) struct VaultKms {
    /// The Vault address without a trailing `/`, e.g. `https://vault.example.com:8200`; `None`
    /// when neither the entry nor the environment gave one (an error on first use).
    addr: Option<String>,
    token: Option<SecretString>,
    namespace: Option<String>,
    http: HttpClient,
}

/// The Transit operation a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    Rewrap,
}

impl Op {
    fn path(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Rewrap => "rewrap",
        }
    }
}

/// A checked `masterKey` document.
#[derive(Debug, PartialEq, Eq)]
struct MasterKey<'a> {
    key_name: &'a str,
    mount: &'a str,
    endpoint: Option<&'a str>,
}

impl VaultKms {
    /// The provider named `ctx.name`, with the credentials of its `kmsProviders` entry and,
    /// for what the entry leaves out, the environment (see the module docs).
    ///
    /// # Errors
    /// [`Error::KeyFormat`] for an unknown or mistyped field in `credentials`, an address that
    /// is not `https://` (or `http://` to a loopback host), or a token or namespace that cannot
    /// be sent in a header (the message never quotes the token); errors of
    /// [`HttpClient::new`].
    pub(crate) fn new(ctx: &ProviderContext<'_>, credentials: &Document) -> Result<Self> {
        Self::with_env(
            ctx,
            credentials,
            &|var| std::env::var(var).ok(),
            home_token_file,
        )
    }

    /// [`VaultKms::new`] reading variables with `env` and the token file at `token_file()`.
    fn with_env(
        ctx: &ProviderContext<'_>,
        credentials: &Document,
        env: &dyn Fn(&str) -> Option<String>,
        token_file: fn() -> Option<PathBuf>,
    ) -> Result<Self> {
        let name = ctx.name;
        let config = |what: String| Error::KeyFormat(format!("kmsProviders.{name}: {what}"));
        let mut addr = None;
        let mut token = None;
        let mut namespace = None;
        for (field, value) in credentials {
            let Bson::String(text) = value else {
                return Err(config(format!("{field} must be a string")));
            };
            match field.as_str() {
                "endpoint" | "addr" if addr.is_some() => {
                    return Err(config("give one of endpoint and addr, not both".to_owned()));
                }
                "endpoint" | "addr" => addr = Some(text.clone()),
                "token" => token = Some(SecretString::from(text.as_str())),
                "namespace" => namespace = Some(text.clone()),
                other => {
                    return Err(config(format!(
                        "unknown field {other:?} (expected endpoint or addr, token, namespace)"
                    )))
                }
            }
        }
        let from_env = |vars: &[&str]| {
            vars.iter()
                .find_map(|v| env(v).filter(|s| !s.trim().is_empty()))
        };
        let addr = match addr.or_else(|| from_env(&ADDR_VARS)) {
            Some(a) => Some(normalize_addr(name, &a)?),
            None => None,
        };
        let token = token
            .or_else(|| {
                let text = Zeroizing::new(from_env(&TOKEN_VARS)?);
                Some(SecretString::from(text.trim()))
            })
            .or_else(|| read_token_file(token_file()?));
        if let Some(t) = &token {
            check_token(t.expose_secret()).map_err(|what| config(what.to_owned()))?;
        }
        let namespace = namespace
            .or_else(|| from_env(&NAMESPACE_VARS))
            .map(|n| n.trim().trim_matches('/').to_owned())
            .filter(|n| !n.is_empty());
        if let Some(ns) = &namespace {
            if !ns.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(config(
                    "namespace must be printable ASCII without spaces".to_owned(),
                ));
            }
        }
        Ok(VaultKms {
            addr,
            token,
            namespace,
            http: HttpClient::new(ctx)?,
        })
    }

    /// Checks `master_key` and returns its parts.
    fn parse<'a>(&self, master_key: &'a Document) -> Result<MasterKey<'a>> {
        let bad = |what: String| Error::KeyFormat(format!("{} masterKey: {what}", self.name()));
        let mut key_name = None;
        let mut mount = None;
        let mut endpoint = None;
        for (field, value) in master_key {
            let Bson::String(text) = value else {
                return Err(bad(format!("{field} must be a string")));
            };
            match field.as_str() {
                "provider" if *text == self.name() => {}
                "provider" => {
                    return Err(bad(format!("provider is {text:?}, not {:?}", self.name())))
                }
                "keyName" => key_name = Some(text.as_str()),
                "mount" => mount = Some(text.as_str()),
                "endpoint" => endpoint = Some(text.as_str()),
                other => {
                    return Err(bad(format!(
                        "unknown field {other:?} (expected provider, keyName, mount, endpoint)"
                    )))
                }
            }
        }
        let key_name = key_name.ok_or_else(|| bad("keyName is required".to_owned()))?;
        if !is_key_name(key_name) {
            return Err(bad(format!(
                "keyName {key_name:?} is not a Transit key name (ASCII letters, digits, '_', \
                 '-' and '.', starting and ending with a letter, digit or '_')"
            )));
        }
        let mount = mount.unwrap_or(DEFAULT_MOUNT);
        if !is_mount(mount) {
            return Err(bad(format!(
                "mount {mount:?} is not a mount path (segments of ASCII letters, digits, '_', \
                 '-' and '.', separated by '/')"
            )));
        }
        if let Some(e) = endpoint {
            normalize_addr(self.name(), e).map_err(|_| {
                bad(format!(
                    "endpoint {e:?} is not an https:// URL (http:// only to a loopback host)"
                ))
            })?;
        }
        Ok(MasterKey {
            key_name,
            mount,
            endpoint,
        })
    }

    /// The URL of `op` on the key, after checking that the key lives at the configured
    /// address.
    fn url(&self, master_key: &Document, key: &MasterKey<'_>, op: Op) -> Result<String> {
        let addr = self.addr.as_deref().ok_or_else(|| {
            self.error(
                master_key,
                format!(
                    "no Vault address: give kmsProviders.{}.endpoint, or set VAULT_ADDR or BAO_ADDR",
                    self.name()
                ),
            )
        })?;
        if let Some(endpoint) = key.endpoint {
            if !same_addr(endpoint, addr) {
                return Err(self.error(
                    master_key,
                    format!(
                        "the key's endpoint {endpoint:?} is not the configured Vault address \
                         {addr:?}; the token is sent only to the configured address (configure \
                         a named provider such as \"vault:other\" for another Vault)"
                    ),
                ));
            }
        }
        Ok(format!(
            "{addr}/v1/{}/{}/{}",
            key.mount,
            op.path(),
            key.key_name
        ))
    }

    /// Sends `body` to `op` of the key; returns the body of a 2xx answer (wiped on drop), or
    /// the error any other answer means.
    async fn call(
        &self,
        master_key: &Document,
        key: &MasterKey<'_>,
        op: Op,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let url = self.url(master_key, key, op)?;
        let token = self.token.as_ref().ok_or_else(|| {
            self.error(
                master_key,
                format!(
                    "no Vault token: give kmsProviders.{}.token, or set VAULT_TOKEN or \
                     BAO_TOKEN (or log in with the CLI, which writes ~/{TOKEN_FILE})",
                    self.name()
                ),
            )
        })?;
        let key_id = master_key_id(master_key);
        let build = |client: &reqwest::Client| -> Result<reqwest::Request> {
            let mut token_value = reqwest::header::HeaderValue::from_str(token.expose_secret())
                .map_err(|_| self.error(master_key, "the token cannot be sent in a header"))?;
            token_value.set_sensitive(true);
            let mut request = client
                .post(url.as_str())
                .header(TOKEN_HEADER, token_value)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                // reqwest owns this copy of the body (with the data key in base64) and does not
                // wipe it; ours is wiped.
                .body(body.to_vec());
            if let Some(ns) = &self.namespace {
                request = request.header(NAMESPACE_HEADER, ns.as_str());
            }
            request
                .build()
                .map_err(|_| self.error(master_key, format!("cannot build a request to {url}")))
        };
        let response = match op {
            Op::Encrypt => self.http.send(&key_id, &build).await?,
            Op::Decrypt | Op::Rewrap => self.http.send_with(&key_id, &build, &retryable).await?,
        };
        let (success, status) = (response.is_success(), response.status);
        let body = response.body;
        if success {
            Ok(body)
        } else {
            Err(self.refusal(master_key, key, op, status, &body))
        }
    }

    /// The error for an answer that is not 2xx.
    fn refusal(
        &self,
        master_key: &Document,
        key: &MasterKey<'_>,
        op: Op,
        status: u16,
        body: &[u8],
    ) -> Error {
        let message = vault_message(body);
        let lower = message.to_ascii_lowercase();
        let path = format!("{}/{}/{}", key.mount, op.path(), key.key_name);
        let what = match status {
            // RSA keys answer a failed decryption with a 500.
            400 | 500 if op != Op::Encrypt && is_not_our_ciphertext(&lower) => {
                return Error::Decrypt
            }
            400 if lower.contains("encryption key not found") => format!(
                "Transit key {:?} not found in mount {:?} (Vault: {message})",
                key.key_name, key.mount
            ),
            400 if lower.contains("associated_data") || lower.contains("non-aead") => format!(
                "Vault refused the associated data: {message}; fieldcrypt's keys are bound to \
                 their key document and need an AEAD Transit key type (aes256-gcm96, \
                 aes128-gcm96 or chacha20-poly1305)"
            ),
            400 if lower.contains("context") && lower.contains("derivation") => {
                format!("{message}; derived and convergent Transit keys are not supported")
            }
            400 if lower.contains("disallowed by policy") => format!(
                "the key version this keyMaterial was wrapped with is no longer allowed to \
                 decrypt (the key's min_decryption_version; Vault: {message})"
            ),
            403 => format!(
                "permission denied for {path} (the token is invalid or expired, or its policies \
                 do not allow `update` on that path; Vault: {message})"
            ),
            404 => format!(
                "{path} not found (is a Transit engine mounted at {:?}{}? Vault: {message})",
                key.mount,
                match &self.namespace {
                    Some(ns) => format!(" in namespace {ns:?}"),
                    None => String::new(),
                }
            ),
            503 => {
                format!("Vault is unavailable or sealed (HTTP 503 after retries; Vault: {message})")
            }
            _ => format!("{path}: HTTP {status} (Vault: {message})"),
        };
        self.error(master_key, what)
    }

    fn error(&self, master_key: &Document, what: impl fmt::Display) -> Error {
        kms_error(self.name(), &master_key_id(master_key), what)
    }

    fn malformed(&self, master_key: &Document, op: Op) -> Error {
        self.error(
            master_key,
            format!("malformed answer from Transit {}", op.path()),
        )
    }
}

#[async_trait::async_trait]
impl Kms for VaultKms {
    fn name(&self) -> &str {
        self.http.provider()
    }

    /// A Vault masterKey names a Transit key, not its version: after a rotation, keys under
    /// the same masterKey still have to move to the newest version (Transit `rewrap` where it
    /// can, else unwrap and wrap), or retiring the old version (`min_decryption_version`) loses
    /// them.
    fn fixed_master_key(&self, _master_key: &Document) -> bool {
        false
    }

    fn master_key(&self, master_key: &Document) -> Result<Document> {
        let key = self.parse(master_key)?;
        let mut out = Document::new();
        out.insert("provider", self.name());
        out.insert("keyName", key.key_name);
        if let Some(Bson::String(mount)) = master_key.get("mount") {
            out.insert("mount", mount.as_str());
        }
        if let Some(endpoint) = key.endpoint {
            out.insert("endpoint", endpoint);
        }
        Ok(out)
    }

    async fn encrypt(
        &self,
        master_key: &Document,
        dek: &KeyMaterial,
        ad: &[u8],
    ) -> Result<(Document, Vec<u8>)> {
        let key = self.parse(master_key)?;
        let plaintext = Zeroizing::new(STANDARD.encode(dek.expose_secret()));
        let body = request_body("plaintext", &plaintext, ad);
        let answer = self.call(master_key, &key, Op::Encrypt, &body).await?;
        let ciphertext =
            ciphertext_of(&answer).ok_or_else(|| self.malformed(master_key, Op::Encrypt))?;
        Ok((master_key.clone(), ciphertext.into_bytes()))
    }

    async fn decrypt(
        &self,
        master_key: &Document,
        wrapped: &[u8],
        ad: &[u8],
    ) -> Result<KeyMaterial> {
        let key = self.parse(master_key)?;
        // Not Transit's text: tampered or not wrapped here.
        let ciphertext = transit_ciphertext(wrapped).ok_or(Error::Decrypt)?;
        let body = request_body("ciphertext", ciphertext, ad);
        let answer = self.call(master_key, &key, Op::Decrypt, &body).await?;
        let parsed: Answer<Plaintext> =
            serde_json::from_slice(&answer).map_err(|_| self.malformed(master_key, Op::Decrypt))?;
        let plain = Zeroizing::new(
            STANDARD
                .decode(parsed.data.plaintext.as_bytes())
                .map_err(|_| self.malformed(master_key, Op::Decrypt))?,
        );
        Ok(KeyMaterial::from_slice(&plain))
    }

    /// Transit `rewrap` to the key's newest version, when `from` and `to` are the same Transit
    /// key of this provider and the key was wrapped without associated data (Transit's
    /// `rewrap` takes none); otherwise `Ok(None)`.
    async fn rewrap(
        &self,
        from: &Document,
        wrapped: &[u8],
        to: &Document,
        ad: &[u8],
    ) -> Result<Option<(Document, Vec<u8>)>> {
        if !ad.is_empty() {
            return Ok(None);
        }
        let (Ok(old), Ok(new)) = (self.parse(from), self.parse(to)) else {
            return Ok(None);
        };
        let here = |k: &MasterKey<'_>| {
            k.endpoint
                .is_none_or(|e| self.addr.as_deref().is_some_and(|a| same_addr(e, a)))
        };
        if old.key_name != new.key_name || old.mount != new.mount || !here(&old) || !here(&new) {
            return Ok(None);
        }
        let ciphertext = transit_ciphertext(wrapped).ok_or(Error::Decrypt)?;
        let body = request_body("ciphertext", ciphertext, &[]);
        let answer = self.call(from, &old, Op::Rewrap, &body).await?;
        let moved = ciphertext_of(&answer).ok_or_else(|| self.malformed(from, Op::Rewrap))?;
        if key_version(&moved) == key_version(ciphertext) {
            // Already at the newest version (Transit encrypted it again all the same): keep
            // what is stored, so a repeated rewrap changes nothing.
            return Ok(Some((to.clone(), wrapped.to_vec())));
        }
        Ok(Some((to.clone(), moved.into_bytes())))
    }
}

impl fmt::Debug for VaultKms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultKms")
            .field("name", &self.name())
            .field("addr", &self.addr)
            .field("namespace", &self.namespace)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// `{"data": {...}}`, the part of Vault's answers fieldcrypt reads.
#[derive(Deserialize)]
struct Answer<T> {
    data: T,
}

#[derive(Deserialize)]
struct Ciphertext {
    ciphertext: String,
}

#[derive(Deserialize)]
struct Plaintext {
    /// The data key in base64.
    plaintext: Zeroizing<String>,
}

/// `{"errors": [...]}`, Vault's error answers.
#[derive(Deserialize)]
struct Errors {
    errors: Vec<String>,
}

/// The JSON request body `{field: value, associated_data?: b64(ad)}`, wiped on drop (it can
/// hold a data key). `value` is base64 or checked Transit ciphertext text: nothing in it needs
/// escaping in JSON.
fn request_body(field: &str, value: &str, ad: &[u8]) -> Zeroizing<Vec<u8>> {
    debug_assert!(value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b':')));
    let mut body = Zeroizing::new(Vec::with_capacity(value.len() + ad.len() * 4 / 3 + 48));
    body.extend_from_slice(b"{\"");
    body.extend_from_slice(field.as_bytes());
    body.extend_from_slice(b"\":\"");
    body.extend_from_slice(value.as_bytes());
    body.push(b'"');
    if !ad.is_empty() {
        body.extend_from_slice(b",\"associated_data\":\"");
        body.extend_from_slice(STANDARD.encode(ad).as_bytes());
        body.push(b'"');
    }
    body.push(b'}');
    body
}

/// A ciphertext in Transit's text form from an answer.
fn ciphertext_of(answer: &[u8]) -> Option<String> {
    let parsed: Answer<Ciphertext> = serde_json::from_slice(answer).ok()?;
    transit_ciphertext(parsed.data.ciphertext.as_bytes())?;
    Some(parsed.data.ciphertext)
}

/// `wrapped` as Transit ciphertext text (`vault:v<N>:<base64>`), if it is that.
fn transit_ciphertext(wrapped: &[u8]) -> Option<&str> {
    let text = core::str::from_utf8(wrapped).ok()?;
    let rest = text.strip_prefix("vault:v")?;
    let (version, body) = rest.split_once(':')?;
    let ok = !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    ok.then_some(text)
}

/// Whether an answer to a decrypt or rewrap is worth trying again: [`transient_status`],
/// except an RSA key's failed decryption, which Vault answers with a 500 although trying again
/// cannot help.
fn retryable(response: &HttpResponse) -> bool {
    transient_status(response)
        && !(response.status == 500
            && is_not_our_ciphertext(&vault_message(&response.body).to_ascii_lowercase()))
}

/// The key version of checked Transit ciphertext text: `3` of `vault:v3:…`.
fn key_version(ciphertext: &str) -> Option<&str> {
    ciphertext
        .strip_prefix("vault:v")?
        .split_once(':')
        .map(|(v, _)| v)
}

/// Whether Vault's message says the ciphertext is not one of this key's (tampered, another
/// key's, another associated data): OpenBao 2.7 says `cipher: message authentication failed`
/// or `invalid ciphertext…` (`: no prefix`, ` length`, `: could not decode base64`,
/// `: version is too new`) with a 400, and for RSA keys `failed to RSA decrypt the ciphertext:
/// crypto/rsa: decryption error` with a 500.
fn is_not_our_ciphertext(lower: &str) -> bool {
    lower.contains("message authentication failed")
        || lower.contains("invalid ciphertext")
        || lower.contains("decryption error")
}

/// Vault's error text from an error answer: its `errors` joined, Go's multi-error wrapping
/// (`1 error occurred:\n\t* permission denied\n\n`) removed, control characters dropped,
/// shortened. Vault's messages name paths and reasons, never the request's values.
fn vault_message(body: &[u8]) -> String {
    let Ok(parsed) = serde_json::from_slice::<Errors>(body) else {
        return "no error message".to_owned();
    };
    let mut parts = Vec::new();
    for e in &parsed.errors {
        for line in e.lines() {
            let line = line.trim().trim_start_matches("* ").trim();
            if line.is_empty() || (line.ends_with("occurred:") && line.contains("error")) {
                continue;
            }
            parts.push(line.to_owned());
        }
    }
    let mut text: String = parts
        .join("; ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if text.is_empty() {
        return "no error message".to_owned();
    }
    if let Some((cut, _)) = text.char_indices().nth(MAX_VAULT_MESSAGE) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A Vault address as URLs are built from it: [`endpoint_url`]'s rules (`https://`, or
/// `http://` to a loopback host; `https://` added to a bare `host[:port]`), without a trailing
/// `/`.
///
/// # Errors
/// [`Error::KeyFormat`] for what [`endpoint_url`] refuses, and for a query or fragment.
fn normalize_addr(provider: &str, addr: &str) -> Result<String> {
    let url = endpoint_url(provider, addr.trim())?;
    if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(Error::KeyFormat(format!(
            "KMS {provider}: a Vault address is scheme://host[:port][/path], without query or \
             fragment"
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// Whether two addresses name the same Vault (scheme, host, port and path; default ports and
/// letter case aside).
fn same_addr(a: &str, b: &str) -> bool {
    let parse = |x: &str| {
        normalize_addr("vault", x)
            .ok()
            .and_then(|n| reqwest::Url::parse(&n).ok())
    };
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) => {
            a.scheme() == b.scheme()
                && a.host_str() == b.host_str()
                && a.port_or_known_default() == b.port_or_known_default()
                && a.path().trim_end_matches('/') == b.path().trim_end_matches('/')
        }
        _ => false,
    }
}

/// Transit's key name rule (its route `\w(([\w-.]+)?\w)?`), ASCII only.
fn is_key_name(name: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            word(first) && word(last) && bytes.iter().all(|&b| word(b) || b == b'-' || b == b'.')
        }
        _ => false,
    }
}

/// A mount path: `/`-separated segments of key-name characters, no `.` or `..` segment.
fn is_mount(mount: &str) -> bool {
    !mount.is_empty()
        && mount.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        })
}

/// Checks that a token can go in a header; the message never quotes it.
fn check_token(token: &str) -> core::result::Result<(), &'static str> {
    if token.is_empty() {
        Err("the token is empty")
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Err("the token holds characters other than printable ASCII")
    } else {
        Ok(())
    }
}

/// `~/.vault-token`, where the CLIs keep the token of the last `login`.
fn home_token_file() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(TOKEN_FILE))
}

/// The token in `path`, if the file exists and holds one.
fn read_token_file(path: PathBuf) -> Option<SecretString> {
    let text = Zeroizing::new(std::fs::read_to_string(path).ok()?);
    let token = text.trim();
    (!token.is_empty()).then(|| SecretString::from(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_and_mounts() {
        for ok in ["k", "k1", "fieldcrypt-kek", "a.b_c", "_x_"] {
            assert!(is_key_name(ok), "{ok}");
        }
        for bad in ["", "-k", "k-", ".k", "k.", "a/b", "a b", "ké", "a\0b"] {
            assert!(!is_key_name(bad), "{bad:?}");
        }
        for ok in ["transit", "team/transit", "t-2.x"] {
            assert!(is_mount(ok), "{ok}");
        }
        for bad in [
            "", "/transit", "transit/", "a//b", "..", "a/../b", "a b", "a?b",
        ] {
            assert!(!is_mount(bad), "{bad:?}");
        }
    }

    #[test]
    fn addresses() {
        let n = |a: &str| normalize_addr("vault", a);
        assert_eq!(
            n("https://vault.example.com:8200/").unwrap(),
            "https://vault.example.com:8200"
        );
        assert_eq!(n("vault.example.com").unwrap(), "https://vault.example.com");
        assert_eq!(n("http://127.0.0.1:8200").unwrap(), "http://127.0.0.1:8200");
        assert_eq!(
            n("https://proxy.example/vault/").unwrap(),
            "https://proxy.example/vault"
        );
        for bad in [
            "ftp://x",
            "http://vault.example.com",
            "https://x/?a=b",
            "https://x/#f",
            "not a url",
        ] {
            assert!(n(bad).is_err(), "{bad}");
        }
        let e = n("https://user:pass@x").unwrap_err().to_string();
        assert!(!e.contains("pass"), "{e}");
        assert!(same_addr(
            "https://Vault.example.com:443",
            "vault.example.com/"
        ));
        assert!(!same_addr(
            "https://vault.example.com:8200",
            "https://vault.example.com"
        ));
        assert!(!same_addr(
            "http://127.0.0.1:8200",
            "https://127.0.0.1:8200"
        ));
        assert!(!same_addr(
            "https://evil.example",
            "https://vault.example.com"
        ));
    }

    #[test]
    fn transit_ciphertexts() {
        assert!(transit_ciphertext(b"vault:v1:AAAA+/==").is_some());
        assert!(transit_ciphertext(b"vault:v12:abc").is_some());
        for bad in [
            &b"vault:v:abc"[..],
            b"vault:vx:abc",
            b"vault:v1:",
            b"vault:v1:a\"b",
            b"vault:v1:a b",
            b"v1:abc",
            b"\xff\xfe",
            b"",
        ] {
            assert!(transit_ciphertext(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn vault_messages() {
        assert_eq!(
            vault_message(br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#),
            "permission denied"
        );
        assert_eq!(
            vault_message(br#"{"errors":["cipher: message authentication failed"]}"#),
            "cipher: message authentication failed"
        );
        assert_eq!(vault_message(b"<html>"), "no error message");
        assert_eq!(vault_message(br#"{"errors":[]}"#), "no error message");
        let long = format!(r#"{{"errors":["{}"]}}"#, "x".repeat(1000));
        assert!(vault_message(long.as_bytes()).chars().count() <= MAX_VAULT_MESSAGE + 1);
        assert!(is_not_our_ciphertext("invalid ciphertext: no prefix"));
        assert!(is_not_our_ciphertext("invalid ciphertext length"));
        assert!(!is_not_our_ciphertext("encryption key not found"));
    }

    #[test]
    fn credentials_from_the_entry_then_the_environment() {
        let tls = super::super::TlsOptions::default();
        let retry = super::super::RetryPolicy::default();
        let ctx = ProviderContext {
            name: "vault",
            tls: &tls,
            retry: &retry,
        };
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |v: &str| {
                vars.iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| (*x).to_owned())
            }
        };
        let no_file = || None;
        // VAULT_* before BAO_*; the entry before both.
        let both = env(&[
            ("VAULT_ADDR", "https://vault.example:8200"),
            ("BAO_ADDR", "https://bao.example:8200"),
            ("BAO_TOKEN", "s.bao-token"),
            ("VAULT_NAMESPACE", "/team/"),
        ]);
        let kms = VaultKms::with_env(&ctx, &bson::doc! {}, &both, no_file).unwrap();
        assert_eq!(kms.addr.as_deref(), Some("https://vault.example:8200"));
        assert_eq!(kms.token.as_ref().unwrap().expose_secret(), "s.bao-token");
        assert_eq!(kms.namespace.as_deref(), Some("team"));
        let entry = bson::doc! { "addr": "https://entry.example", "token": "s.entry-token" };
        let kms = VaultKms::with_env(&ctx, &entry, &both, no_file).unwrap();
        assert_eq!(kms.addr.as_deref(), Some("https://entry.example"));
        assert_eq!(kms.token.as_ref().unwrap().expose_secret(), "s.entry-token");
        // Debug names the address, never the token.
        let debug = format!("{kms:?}");
        assert!(
            debug.contains("entry.example") && debug.contains("[REDACTED]"),
            "{debug}"
        );
        assert!(!debug.contains("s.entry-token"), "{debug}");
        // Empty variables count as unset.
        let empty = env(&[("VAULT_TOKEN", " "), ("BAO_TOKEN", "s.b\n")]);
        let kms = VaultKms::with_env(&ctx, &bson::doc! {}, &empty, no_file).unwrap();
        assert_eq!(kms.token.as_ref().unwrap().expose_secret(), "s.b");
        assert!(kms.addr.is_none());
        // A token given in the entry is taken as it is: one that cannot go in a header is
        // refused without being quoted.
        let bad = bson::doc! { "token": "s.bad token" };
        let e = VaultKms::with_env(&ctx, &bad, &empty, no_file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("printable ASCII") && !e.contains("s.bad"), "{e}");
    }

    #[test]
    fn rsa_decryption_failures_are_not_retried() {
        let answer = |status, body: &str| HttpResponse {
            status,
            body: body.as_bytes().to_vec().into(),
        };
        let rsa = r#"{"errors":["1 error occurred:\n\t* failed to RSA decrypt the ciphertext: crypto/rsa: decryption error\n\n"]}"#;
        assert!(!retryable(&answer(500, rsa)));
        assert!(retryable(&answer(500, r#"{"errors":["internal error"]}"#)));
        assert!(retryable(&answer(503, r#"{"errors":["Vault is sealed"]}"#)));
        assert!(!retryable(&answer(
            400,
            r#"{"errors":["invalid ciphertext: no prefix"]}"#
        )));
    }

    #[test]
    fn key_versions() {
        assert_eq!(key_version("vault:v3:AAAA"), Some("3"));
        assert_eq!(key_version("vault:v12:AAAA"), Some("12"));
        assert_eq!(key_version("AAAA"), None);
    }

    #[test]
    fn request_bodies() {
        let body = request_body("plaintext", "AAAA", b"");
        assert_eq!(&body[..], br#"{"plaintext":"AAAA"}"#);
        let body = request_body("ciphertext", "vault:v1:x", b"ad");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ciphertext": "vault:v1:x", "associated_data": "YWQ="})
        );
    }
}
