//! A PyKMIP server (`pykmip` from PyPI) for the `kmip` provider's tests, with a test PKI made
//! for each run.
//!
//! [`PyKmip::start`] installs [`PYKMIP_ENV`] once, then, in a fresh temporary directory:
//!
//! - writes a PKI with Python's `cryptography` (which PyKMIP depends on): a CA, a server
//!   certificate for `127.0.0.1` and `localhost`, two client certificates of that CA with
//!   different names (two identities: PyKMIP lets only an object's owner use it), and a second,
//!   untrusted CA with a client certificate of its own. All keys are ECDSA P-256: the TLS 1.2
//!   suites PyKMIP offers and rustls accepts have ECDHE-ECDSA with AES-GCM in common;
//! - writes PyKMIP's configuration: TLS 1.2 with client certificates required
//!   (`enable_tls_client_auth`), its SQLite database and an (empty) operation policy directory
//!   in the temporary directory;
//! - starts the server on a free port of 127.0.0.1 under the test kit's supervisor
//!   ([`Service`]), in the foreground, through a launcher that makes every process PyKMIP
//!   forks (its multiprocessing manager and policy monitor) die with it, and that exits at once
//!   on `SIGTERM` instead of PyKMIP's slow shutdown (which waits up to 10 s per open session).
//!   So nothing of it outlives the test process, however that ends; the temporary directory
//!   is removed then too.
//!
//! [`PyKmip::stop`] and [`PyKmip::restart`] take the server away and bring it back on the same
//! port with the same database, for outage tests.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::service::{free_port, temp_dir, Error, PythonEnv, Result, Service};

/// PyKMIP and what it needs, pinned to versions checked to work together on CPython 3.11
/// (PyKMIP 0.11.0 runs with SQLAlchemy 2 and cryptography 50, which only warn about the
/// legacy ciphers it registers).
pub const PYKMIP_ENV: PythonEnv = PythonEnv {
    name: "pykmip",
    requirements: &[
        "PyKMIP==0.11.0",
        "cryptography==50.0.2",
        "SQLAlchemy==2.1.9",
        "requests==2.34.2",
        "six==1.17.0",
    ],
};

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client script may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the test PKI into `sys.argv[1]`.
const PKI_PY: &str = r#"
import datetime, ipaddress, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out = Path(sys.argv[1])
now = datetime.datetime.now(datetime.timezone.utc)

def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

def pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())

def usage(ca):
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not ca, key_cert_sign=ca,
                         crl_sign=ca, encipher_only=False, decipher_only=False)

def certificate(cn, key, issuer_cn, issuer_key, ca, eku=None, sans=()):
    b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(issuer_cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=7))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(usage(ca), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if not ca:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

def authority(prefix, cn):
    key = ec.generate_private_key(ec.SECP256R1())
    (out / f"{prefix}ca.pem").write_bytes(certificate(cn, key, cn, key, True))
    return cn, key

def leaf(file, cn, ca, eku, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(cn, key, ca[0], ca[1], False, eku, sans)
    (out / f"{file}-cert.pem").write_bytes(cert)
    (out / f"{file}-key.pem").write_bytes(pem_key(key))
    # tlsCertificateKeyFile: the certificate and its key in one PEM file.
    (out / f"{file}.pem").write_bytes(cert + pem_key(key))

ca = authority("", "fieldcrypt test KMIP CA")
leaf("server", "fieldcrypt test KMIP server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
     [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
leaf("client", "fieldcrypt test KMIP client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
leaf("client2", "fieldcrypt test KMIP client 2", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
other = authority("untrusted-", "fieldcrypt untrusted CA")
leaf("untrusted-client", "fieldcrypt test KMIP client", other, ExtendedKeyUsageOID.CLIENT_AUTH)
"#;

/// Runs PyKMIP's server in the foreground: `sys.argv[1]` = configuration, `[2]` = log file.
const SERVER_PY: &str = r#"
import ctypes, os, signal, sys, warnings
warnings.simplefilter("ignore")
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1

def die_with_parent():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

# This process dies with the supervisor, and every process PyKMIP forks dies with this one.
die_with_parent()
if os.getppid() == 1:
    sys.exit("the supervisor is gone")
os.register_at_fork(after_in_child=die_with_parent)

# Stop at once on SIGTERM; PyKMIP's own handlers would join every session thread first.
real_signal = signal.signal
def stop_now(signum, frame):
    os._exit(0)
real_signal(signal.SIGTERM, stop_now)
real_signal(signal.SIGINT, stop_now)
signal.signal = lambda s, h: None if s in (signal.SIGTERM, signal.SIGINT) else real_signal(s, h)

from kmip.services.server.server import KmipServer
server = KmipServer(config_path=sys.argv[1], log_path=sys.argv[2], live_policies=False)
server.start()
print("PyKMIP serving", flush=True)
server.serve()
"#;

/// A PyKMIP server for tests; see the [module documentation](self).
#[derive(Debug)]
pub struct PyKmip {
    dir: PathBuf,
    port: u16,
    endpoint: String,
    python: PathBuf,
    service: Mutex<Option<Service>>,
    /// Removes `dir` when the test process ends (a `sleep` under the supervisor, whose only
    /// job is the supervisor's clean-up); dropped after the server.
    _janitor: Service,
}

impl PyKmip {
    /// Installs PyKMIP if needed, writes a fresh PKI and configuration, and starts the server.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when PyKMIP cannot be installed or does not start (with its last
    /// output); [`Error::Io`].
    pub fn start() -> Result<PyKmip> {
        let venv = PYKMIP_ENV.ensure()?;
        let python = PythonEnv::bin(&venv, "python");
        let dir = temp_dir("fieldcrypt-pykmip")?;
        let mut sleep = Command::new("sleep");
        sleep.arg("86400");
        let janitor = Service::spawn_removing(&sleep, "PyKMIP's directory janitor", Some(&dir))?;
        run(
            Command::new(&python).args(["-c", PKI_PY]).arg(&dir),
            "writing the test PKI",
        )?;
        fs::create_dir_all(dir.join("policies"))?;
        let port = free_port()?;
        let p = |f: &str| dir.join(f).display().to_string();
        fs::write(
            dir.join("server.conf"),
            format!(
                "[server]\n\
                 hostname=127.0.0.1\n\
                 port={port}\n\
                 certificate_path={}\n\
                 key_path={}\n\
                 ca_path={}\n\
                 auth_suite=TLS1.2\n\
                 tls_cipher_suites=TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 \
                 TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\n\
                 enable_tls_client_auth=True\n\
                 policy_path={}\n\
                 database_path={}\n\
                 logging_level=INFO\n",
                p("server-cert.pem"),
                p("server-key.pem"),
                p("ca.pem"),
                p("policies"),
                p("pykmip.db"),
            ),
        )?;
        fs::write(dir.join("server.py"), SERVER_PY)?;
        let server = PyKmip {
            endpoint: format!("127.0.0.1:{port}"),
            dir,
            port,
            python,
            service: Mutex::new(None),
            _janitor: janitor,
        };
        server.restart()?;
        Ok(server)
    }

    /// The server shared by the whole test process, started by the first call and never
    /// dropped (it stops when the process exits).
    ///
    /// # Errors
    /// The first start's error, on every call.
    pub fn shared() -> Result<&'static PyKmip> {
        static SHARED: OnceLock<std::result::Result<PyKmip, String>> = OnceLock::new();
        match SHARED.get_or_init(|| PyKmip::start().map_err(|e| e.to_string())) {
            Ok(server) => Ok(server),
            Err(message) => Err(Error::Unavailable(message.clone())),
        }
    }

    /// `127.0.0.1:<port>`, for `kmsProviders.kmip.endpoint`.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The server's port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate that signed the server's and the clients' certificates
    /// (`tlsCAFile`).
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A client certificate and its key in one PEM file (`tlsCertificateKeyFile`).
    #[must_use]
    pub fn client_cert_key_file(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    /// Another client of the same CA with another name: the server accepts it, but as another
    /// identity, which may not use the first client's objects.
    #[must_use]
    pub fn second_client_cert_key_file(&self) -> PathBuf {
        self.dir.join("client2.pem")
    }

    /// A CA that did not sign the server's certificate.
    #[must_use]
    pub fn untrusted_ca_file(&self) -> PathBuf {
        self.dir.join("untrusted-ca.pem")
    }

    /// A client certificate of [`PyKmip::untrusted_ca_file`]'s CA, which the server refuses.
    #[must_use]
    pub fn untrusted_client_cert_key_file(&self) -> PathBuf {
        self.dir.join("untrusted-client.pem")
    }

    /// The Python of PyKMIP's environment (with PyKMIP's client library).
    #[must_use]
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Runs `code` (Python, at top level) with PyKMIP's client connected as
    /// [`PyKmip::client_cert_key_file`]'s identity: `c` is a `kmip.pie.client.ProxyKmipClient`,
    /// and `objects` and `enums` are imported. Returns what it printed.
    ///
    /// For tests that set up objects fieldcrypt itself never makes (a secret of the wrong
    /// length, a key left pre-active, a destroyed object).
    ///
    /// # Errors
    /// [`Error::Unavailable`] with the script's output when it fails.
    pub fn run_client(&self, code: &str) -> Result<String> {
        let script = format!(
            "import warnings\nwarnings.simplefilter('ignore')\n\
             from kmip.pie.client import ProxyKmipClient\n\
             from kmip.pie import objects\n\
             from kmip.core import enums\n\
             c = ProxyKmipClient(hostname='127.0.0.1', port={}, cert={:?}, key={:?}, ca={:?}, \
             config_file='/dev/null', kmip_version=enums.KMIPVersion.KMIP_1_2)\n\
             c.open()\n\
             try:\n{}\nfinally:\n    c.close()\n",
            self.port,
            self.dir.join("client-cert.pem").display().to_string(),
            self.dir.join("client-key.pem").display().to_string(),
            self.ca_file().display().to_string(),
            code.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>(),
        );
        run(
            Command::new(&self.python).args(["-c", &script]),
            "a PyKMIP client script",
        )
    }

    /// Stops the server (it refuses connections when this returns). Its database is kept.
    pub fn stop(&self) {
        let mut service = self.service();
        if let Some(mut s) = service.take() {
            s.stop();
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again, on the same port with the same database (stopping it first if
    /// it runs).
    ///
    /// # Errors
    /// [`Error::Unavailable`] when it does not come up.
    pub fn restart(&self) -> Result<()> {
        self.stop();
        let mut cmd = Command::new(&self.python);
        cmd.arg(self.dir.join("server.py"))
            .arg(self.dir.join("server.conf"))
            .arg(self.dir.join("server.log"))
            .current_dir(&self.dir);
        let mut service = Service::spawn(&cmd, "PyKMIP server")?;
        service
            .wait_for_port(self.port, START_TIMEOUT)
            .map_err(|e| Error::Unavailable(format!("{e}\n{}", self.log_tail().join("\n"))))?;
        *self.service() = Some(service);
        Ok(())
    }

    /// The last lines of PyKMIP's log and of its output, for failing tests.
    #[must_use]
    pub fn log_tail(&self) -> Vec<String> {
        let mut lines: Vec<String> = fs::read_to_string(self.dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(40)
            .map(str::to_owned)
            .collect();
        lines.reverse();
        if let Some(s) = self.service().as_ref() {
            lines.extend(s.log_tail());
        }
        lines
    }

    fn service(&self) -> MutexGuard<'_, Option<Service>> {
        // A panic while holding the lock leaves the option in a valid state.
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs a short Python step, bounded in time, and returns its standard output.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Unavailable(format!("{what}: cannot run Python: {e}")))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(CLIENT_TIMEOUT) {
        Ok(out) => out?,
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            return Err(Error::Unavailable(format!(
                "{what}: still running after {}s (killed)",
                CLIENT_TIMEOUT.as_secs()
            )));
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Unavailable(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
