//! moto's server mode: a local AWS (KMS, STS, IAM) for the AWS KMS provider's tests.
//!
//! `moto[server]` (pinned below) is installed from PyPI into its own virtual environment under
//! the dev server's cache directory, once per machine ([`PythonEnv`]). Each [`Moto`] is a
//! `moto_server` on a free loopback port, under a [`Service`] (killed with the test process),
//! reached through a [`Gate`]: [`Moto::stop`] closes it (new connections are refused, open
//! ones cut) and [`Moto::restart`] opens it again on the same port, with moto's state (its
//! keys) intact — what an outage test needs.
//!
//! Two kinds:
//! - [`Moto::shared`] / [`Moto::start`]: requests are not authenticated (any credentials do);
//! - [`Moto::start_with_iam`]: moto checks every request's SigV4 signature and IAM policies,
//!   with users and a role made at start ([`Moto::iam`]), so that wrong secrets, unknown keys
//!   and denied users are refused as AWS refuses them.
//!
//! moto 5.1 does not model a disabled key's refusals: `Encrypt` and `Decrypt` still work after
//! [`Moto::disable_key`] (AWS answers `DisabledException`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::gate::Gate;
use crate::service::{free_port, Error, PythonEnv, Result, Service};

/// The moto virtual environment: the server and boto3 (for the helpers), pinned.
pub const MOTO_ENV: PythonEnv = PythonEnv {
    name: "moto",
    requirements: &["moto[server]==5.1.22", "boto3==1.44.8", "botocore==1.44.8"],
};

/// The region the helpers create keys in.
pub const REGION: &str = "us-east-1";

/// moto's account id (every ARN it makes has it).
pub const ACCOUNT: &str = "123456789012";

/// An access key moto knows (an IAM user's, or a role session's with its token).
#[derive(Clone, Debug)]
pub struct AccessKey {
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
}

/// The principals [`Moto::start_with_iam`] creates.
#[derive(Clone, Debug)]
pub struct MotoIam {
    /// A user allowed `kms:*` and `sts:*`.
    pub allowed: AccessKey,
    /// A user with no policy: refused everything.
    pub denied: AccessKey,
    /// A role allowed `kms:*` that anyone may assume (also with a web identity).
    pub role_arn: String,
}

/// One moto server; see the module docs.
pub struct Moto {
    endpoint: String,
    backend: String,
    gate: Gate,
    python: PathBuf,
    iam: Option<MotoIam>,
    service: Mutex<Service>,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Users, policies and a role, in exactly `SETUP_ACTIONS` unauthenticated calls (moto
/// authenticates every call after the first `INITIAL_NO_AUTH_ACTION_COUNT`).
const IAM_SETUP: &str = r#"
import json, sys, boto3
ep = sys.argv[1]
iam = boto3.client("iam", endpoint_url=ep, region_name="us-east-1",
                   aws_access_key_id="AKIASETUP", aws_secret_access_key="setup")
allow = lambda actions: json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": actions, "Resource": "*"}]})
iam.create_user(UserName="fieldcrypt")
a = iam.create_access_key(UserName="fieldcrypt")["AccessKey"]
iam.put_user_policy(UserName="fieldcrypt", PolicyName="kms", PolicyDocument=allow(["kms:*", "sts:*"]))
iam.create_user(UserName="denied")
d = iam.create_access_key(UserName="denied")["AccessKey"]
trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    "Principal": {"AWS": "*", "Federated": "*"},
    "Action": ["sts:AssumeRole", "sts:AssumeRoleWithWebIdentity"]}]})
role = iam.create_role(RoleName="fieldcrypt-role", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
iam.put_role_policy(RoleName="fieldcrypt-role", PolicyName="kms", PolicyDocument=allow(["kms:*"]))
print(json.dumps({"allowed": [a["AccessKeyId"], a["SecretAccessKey"]],
                  "denied": [d["AccessKeyId"], d["SecretAccessKey"]], "role": role}))
"#;
const SETUP_ACTIONS: &str = "7";

/// What every helper script starts with: `kms` and `sts` clients for argv's endpoint and key.
const HELPER_PRELUDE: &str = r#"
import json, sys, boto3
ep, region, ak, sk = sys.argv[1:5]
args = sys.argv[5:]
kms = boto3.client("kms", endpoint_url=ep, region_name=region, aws_access_key_id=ak, aws_secret_access_key=sk)
sts = boto3.client("sts", endpoint_url=ep, region_name=region, aws_access_key_id=ak, aws_secret_access_key=sk)
"#;

impl Moto {
    /// A moto server of this process's own (for tests that stop it).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when moto cannot be installed or does not start.
    pub fn start() -> Result<Moto> {
        Self::launch(false)
    }

    /// A moto server that authenticates and authorizes every request (see the module docs).
    ///
    /// # Errors
    /// As [`Moto::start`].
    pub fn start_with_iam() -> Result<Moto> {
        Self::launch(true)
    }

    /// The server shared by the whole test process (unauthenticated), started by the first
    /// call. Never stop it.
    ///
    /// # Errors
    /// The first start's error, on every call.
    pub fn shared() -> Result<&'static Moto> {
        static SHARED: OnceLock<std::result::Result<Moto, String>> = OnceLock::new();
        match SHARED.get_or_init(|| Moto::start().map_err(|e| e.to_string())) {
            Ok(m) => Ok(m),
            Err(e) => Err(Error::Unavailable(e.clone())),
        }
    }

    fn launch(with_iam: bool) -> Result<Moto> {
        let venv = MOTO_ENV.ensure()?;
        let python = PythonEnv::bin(&venv, "python");
        let port = free_port()?;
        let mut cmd = Command::new(PythonEnv::bin(&venv, "moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if with_iam {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_ACTIONS);
        }
        let mut service = Service::spawn(&cmd, "moto_server")?;
        service.wait_for_port(port, Duration::from_secs(60))?;
        let backend = format!("http://127.0.0.1:{port}");
        let iam = if with_iam {
            let out = run_python(&python, IAM_SETUP, &[&backend])?;
            let v: serde_json::Value = serde_json::from_str(out.trim())
                .map_err(|e| Error::Unavailable(format!("moto IAM setup printed {out:?}: {e}")))?;
            let key = |name: &str| AccessKey {
                access_key_id: v[name][0].as_str().unwrap_or_default().to_owned(),
                secret_access_key: v[name][1].as_str().unwrap_or_default().to_owned(),
                session_token: None,
            };
            Some(MotoIam {
                allowed: key("allowed"),
                denied: key("denied"),
                role_arn: v["role"].as_str().unwrap_or_default().to_owned(),
            })
        } else {
            None
        };
        let gate = Gate::new(SocketAddr::from(([127, 0, 0, 1], port)))?;
        Ok(Moto {
            endpoint: format!("http://127.0.0.1:{}", gate.port()),
            backend,
            gate,
            python,
            iam,
            service: Mutex::new(service),
        })
    }

    /// `http://127.0.0.1:<port>`: KMS, STS and IAM (through the gate).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The gate's port (the same across [`Moto::stop`] and [`Moto::restart`]).
    pub fn port(&self) -> u16 {
        self.gate.port()
    }

    /// The users and role of a [`Moto::start_with_iam`] server.
    pub fn iam(&self) -> Option<&MotoIam> {
        self.iam.as_ref()
    }

    /// The virtual environment's Python (with boto3).
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Credentials the helpers use: the allowed user's, or any for an unauthenticated server.
    pub fn credentials(&self) -> AccessKey {
        match &self.iam {
            Some(iam) => iam.allowed.clone(),
            None => AccessKey {
                access_key_id: "AKIAMOTOTESTING".to_owned(),
                secret_access_key: "moto-testing-secret".to_owned(),
                session_token: None,
            },
        }
    }

    fn helper(&self, code: &str, args: &[&str]) -> Result<String> {
        let creds = self.credentials();
        let mut all = vec![
            self.backend.as_str(),
            REGION,
            creds.access_key_id.as_str(),
            creds.secret_access_key.as_str(),
        ];
        all.extend_from_slice(args);
        run_python(&self.python, &format!("{HELPER_PRELUDE}\n{code}"), &all)
    }

    /// Creates a symmetric KMS key in [`REGION`]; returns its ARN.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when moto refuses or the helper fails.
    pub fn create_key(&self) -> Result<String> {
        self.helper(r#"print(kms.create_key()["KeyMetadata"]["Arn"])"#, &[])
            .map(|s| s.trim().to_owned())
    }

    /// Points alias `alias` (`alias/…`) at the key `arn`.
    ///
    /// # Errors
    /// As [`Moto::create_key`].
    pub fn create_alias(&self, alias: &str, arn: &str) -> Result<()> {
        self.helper(
            "kms.create_alias(AliasName=args[0], TargetKeyId=args[1].split('/')[-1])",
            &[alias, arn],
        )
        .map(drop)
    }

    /// Disables the key `arn` (moto records it; see the module docs for what it does not do).
    ///
    /// # Errors
    /// As [`Moto::create_key`].
    pub fn disable_key(&self, arn: &str) -> Result<()> {
        self.helper("kms.disable_key(KeyId=args[0].split('/')[-1])", &[arn])
            .map(drop)
    }

    /// Temporary credentials of a session of the IAM role ([`Moto::start_with_iam`] only).
    ///
    /// # Errors
    /// As [`Moto::create_key`]; [`Error::Unavailable`] on a server without IAM.
    pub fn assume_role(&self) -> Result<AccessKey> {
        let role = &self
            .iam
            .as_ref()
            .ok_or_else(|| Error::Unavailable("moto: assume_role needs start_with_iam".into()))?
            .role_arn;
        let out = self.helper(
            r#"c = sts.assume_role(RoleArn=args[0], RoleSessionName="fieldcrypt-test")["Credentials"]
print(json.dumps([c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]]))"#,
            &[role],
        )?;
        let v: Vec<String> = serde_json::from_str(out.trim())
            .map_err(|e| Error::Unavailable(format!("moto assume_role printed {out:?}: {e}")))?;
        match <[String; 3]>::try_from(v) {
            Ok([id, secret, token]) => Ok(AccessKey {
                access_key_id: id,
                secret_access_key: secret,
                session_token: Some(token),
            }),
            Err(v) => Err(Error::Unavailable(format!(
                "moto assume_role printed {v:?}"
            ))),
        }
    }

    /// Takes the server away: the gate's port refuses connections, open ones are cut.
    pub fn stop(&self) {
        self.gate.close();
    }

    /// Brings it back on the same port, with the same keys.
    ///
    /// # Errors
    /// As [`Gate::open`].
    pub fn restart(&self) -> Result<()> {
        self.gate.open()
    }

    /// The server's last log lines.
    pub fn log_tail(&self) -> Vec<String> {
        self.service
            .lock()
            .map(|s| s.log_tail())
            .unwrap_or_default()
    }
}

fn run_python(python: &Path, code: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(python)
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .map_err(Error::Io)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(Error::Unavailable(format!(
            "moto helper failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
