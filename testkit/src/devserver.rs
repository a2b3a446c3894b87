//! A real MongoDB wire-protocol server for tests, examples and local trials.
//!
//! **Not for production.** This module starts (or finds) a throw-away MongoDB server so that the
//! integration tests and the examples (`cargo run --example quickstart`) work on a fresh clone
//! without any set-up. It is Unix-only (it launches servers through `sh`).
//!
//! [`DevServer::start`] picks, in this order:
//!
//! 1. the server named by the environment variable `MONGODB_URI`, if it is set and not empty
//!    (no process is started; [`DevServerKind::External`]);
//! 2. a `mongod` found on `PATH`, started on a fresh temporary `--dbpath` and a free port bound to
//!    127.0.0.1 ([`DevServerKind::Mongod`]);
//! 3. [SecantusDB](https://pypi.org/project/SecantusDB/), a single-node server written in Python
//!    that speaks the real wire protocol ([`DevServerKind::Secantus`]). It is installed once, with
//!    [`PYTHON_REQUIREMENTS`], into a virtual environment under a cache directory:
//!    `$FIELDCRYPT_DEVSERVER_DIR` if set, else `<target dir>/fieldcrypt-devserver`, where the
//!    target dir is `$CARGO_TARGET_DIR`, else the cargo target directory the running test,
//!    example or binary was built into (one for the whole workspace), else `./target`. The venv is created with `python3` (override with
//!    `$FIELDCRYPT_DEVSERVER_PYTHON`), needs CPython 3.11 and a reachable PyPI, and takes about
//!    half a minute the first time. The install is guarded by a file lock, so parallel test
//!    binaries wait for each other, and is only considered done once a marker file has been
//!    written last, so an interrupted install is redone.
//!
//! Servers started here stop when their [`DevServer`] is dropped **and** when the process that
//! started them exits or dies (even by `SIGKILL`, or with a [`DevServer::shared`] server, which is
//! never dropped): each server is launched by a small `sh` supervisor that watches a pipe held by
//! the [`DevServer`]; when the pipe closes, the supervisor terminates the server (`SIGTERM`, then
//! `SIGKILL` after 10 s) and removes its temporary data.
//!
//! # Example
//!
//! ```no_run
//! use fieldcrypt_testkit::devserver::{unique_db_name, DevServer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One server per test process; each test makes its own client and database.
//! let server = DevServer::shared()?;
//! let client = mongodb::Client::with_uri_str(server.uri()).await?;
//! let db = client.database(&unique_db_name("demo"));
//! db.collection::<bson::Document>("c").insert_one(bson::doc! { "x": 1 }).await?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Why no development server could be had.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// No server could be found, installed or started; the message says why and how to
    /// provide one (`MONGODB_URI`, `mongod` on `PATH`, or Python 3.11 with pip for SecantusDB).
    Unavailable(String),
    /// A file-system or process error.
    Io(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unavailable(m) => write!(f, "dev server: {m}"),
            Error::Io(e) => write!(f, "dev server: I/O error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unavailable(_) => None,
            Error::Io(e) => Some(e),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

/// The result of the dev server's functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The Python packages installed into the SecantusDB virtual environment, pinned to versions
/// checked to work together: the server itself, and pymongo + pymongocrypt (libmongocrypt) for
/// interoperability tests driven from Python.
pub const PYTHON_REQUIREMENTS: &[&str] = &[
    "SecantusDB==0.7.0b3",
    "pymongo==4.20.1",
    "pymongocrypt==1.21.2",
];

/// How long to wait for a started server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `python3 -m venv` may take.
const VENV_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `pip install` may take.
const PIP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long to wait for another process that holds the install lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(25 * 60);
/// How long a dropped server may take to stop before its supervisor is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How many lines of server output are kept for error messages and [`DevServer::log_tail`].
const LOG_TAIL_LINES: usize = 60;

const HOW_TO_PROVIDE: &str =
    "to give fieldcrypt's tests and examples a MongoDB server, do one of: \
     set MONGODB_URI (e.g. mongodb://127.0.0.1:27017/?directConnection=true); \
     put `mongod` on PATH; \
     or make `python3 -m venv` + pip able to install SecantusDB==0.7.0b3 from PyPI \
     (CPython 3.11; set FIELDCRYPT_DEVSERVER_PYTHON to choose the interpreter)";

/// The supervisor script. Arguments: the command line of the supervised process (a server, or
/// an install step). Its stdin is a pipe held by the owner; end-of-file on it (drop, exit, or
/// death of the owning process) terminates the process. The process writes both its stdout and
/// stderr to the script's stderr, and inherits the script's stdout as fd 4 (the install steps
/// pass the lock file there, so the install lock stays held until a killed step is really gone).
/// If the process exits by itself, the script exits too (closing its stderr), so a failed start
/// is noticed at once. `$FIELDCRYPT_DEVSERVER_CLEANUP`, if set, is removed at the end.
const SUPERVISOR: &str = r#"
exec 3<&0 0</dev/null 4>&1 1>&2
"$@" 3<&- &
pid=$!
{
  cat <&3
  kill $pid
  i=0
  while kill -0 $pid && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  kill -0 $pid && kill -9 $pid
} >/dev/null 2>&1 4>&- &
watcher=$!
exec 3<&- 4>&-
# dash reports a killed job ("Terminated") on stderr: once the owner is gone, nobody reads
# that pipe, and the write would kill the script (SIGPIPE) before the clean-up below.
wait $pid 2>/dev/null
status=$?
kill $watcher 2>/dev/null
if [ -n "${FIELDCRYPT_DEVSERVER_CLEANUP:-}" ]; then rm -rf "$FIELDCRYPT_DEVSERVER_CLEANUP"; fi
exit $status
"#;

/// Where a [`DevServer`]'s server comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DevServerKind {
    /// The server named by the `MONGODB_URI` environment variable; no process was started.
    External,
    /// A `mongod` from `PATH`, started on a temporary data directory.
    Mongod,
    /// A SecantusDB server (Python), started with in-memory storage.
    Secantus,
}

/// A MongoDB server for tests, examples and local trials; **not for production**.
///
/// See the [module documentation](self) for where the server comes from and how it is stopped.
#[derive(Debug)]
pub struct DevServer {
    kind: DevServerKind,
    uri: String,
    python: Option<PathBuf>,
    process: Option<Supervised>,
}

impl DevServer {
    /// Finds or starts a server: `MONGODB_URI`, else `mongod` on `PATH`, else SecantusDB
    /// (installed on first use). Blocks until the server accepts connections.
    ///
    /// Each call starts a new server (unless `MONGODB_URI` is set); test binaries with many tests
    /// should use [`DevServer::shared`] instead.
    ///
    /// Dropping the returned value stops the server and waits for it to be gone (about 2 s for
    /// SecantusDB, which shuts down gracefully and removes its temporary storage).
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if no server can be had (its message says how to provide one) or if
    /// the server does not become ready within a minute; [`Error::Io`] for file-system errors.
    pub fn start() -> Result<DevServer> {
        if let Some(uri) = env_nonempty("MONGODB_URI") {
            return Ok(DevServer {
                kind: DevServerKind::External,
                uri,
                python: installed_venv().map(|v| v.python),
                process: None,
            });
        }
        if let Some(mongod) = find_on_path("mongod") {
            return start_mongod(&mongod);
        }
        let venv = ensure_venv().map_err(|e| {
            Error::Unavailable(format!(
                "no MongoDB server: MONGODB_URI is not set, no `mongod` is on PATH, and SecantusDB \
                 could not be installed: {}\n{HOW_TO_PROVIDE}",
                message_of(&e)
            ))
        })?;
        start_secantus(&venv)
    }

    /// The server shared by the whole process, started by the first call with
    /// [`DevServer::start`] and never dropped (it stops when the process exits).
    ///
    /// Meant for test binaries whose `#[tokio::test]`s run in parallel threads: each test must
    /// still create its own `mongodb::Client` (a client is bound to the runtime that created it)
    /// and use its own database, see [`unique_db_name`].
    ///
    /// # Errors
    ///
    /// The error of the first [`DevServer::start`], as [`Error::Unavailable`], on every call.
    pub fn shared() -> Result<&'static DevServer> {
        static SHARED: OnceLock<Result<DevServer, String>> = OnceLock::new();
        match SHARED.get_or_init(|| DevServer::start().map_err(|e| message_of(&e))) {
            Ok(server) => Ok(server),
            Err(message) => Err(Error::Unavailable(message.clone())),
        }
    }

    /// Ensures the SecantusDB virtual environment (with pymongo and pymongocrypt) is installed,
    /// whatever server is used, and returns the path of its Python interpreter. For
    /// interoperability tests that drive libmongocrypt from Python.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if the environment cannot be installed.
    pub fn python_env() -> Result<PathBuf> {
        ensure_venv().map(|v| v.python)
    }

    /// A connection string for the `mongodb` crate: `MONGODB_URI` as given, or
    /// `mongodb://127.0.0.1:<port>/?directConnection=true` for a server started here.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Which source the server came from.
    pub fn kind(&self) -> DevServerKind {
        self.kind
    }

    /// The Python interpreter of the SecantusDB virtual environment (with pymongo and
    /// pymongocrypt), if that environment is installed; [`DevServer::python_env`] installs it.
    pub fn python(&self) -> Option<PathBuf> {
        self.python
            .clone()
            .or_else(|| installed_venv().map(|v| v.python))
    }

    /// The last lines the server printed (its log), oldest first; empty for
    /// [`DevServerKind::External`]. Useful when a test fails because of the server.
    pub fn log_tail(&self) -> Vec<String> {
        self.process
            .as_ref()
            .map(|p| p.log.snapshot())
            .unwrap_or_default()
    }
}

/// A database name unique across processes and calls: `prefix`, the process id, a per-process
/// counter and a random suffix, e.g. `orders_4242_7_1a2b3c4d`.
///
/// Characters MongoDB forbids in database names (`/\. "$*<>:|?`) are replaced by `_`, and the
/// prefix is shortened so that the name stays under MongoDB's 64-byte limit.
pub fn unique_db_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!(
        "_{}_{}_{:08x}",
        std::process::id(),
        n,
        rand::random::<u32>()
    );
    let mut name: String = prefix
        .chars()
        .map(|c| match c {
            '/' | '\\' | '.' | ' ' | '"' | '$' | '*' | '<' | '>' | ':' | '|' | '?' | '\0' => '_',
            c => c,
        })
        .collect();
    let max_prefix = 63usize.saturating_sub(suffix.len());
    while name.len() > max_prefix {
        name.pop();
    }
    name.push_str(&suffix);
    name
}

// ---------------------------------------------------------------------------------------------
// Starting servers

fn start_mongod(mongod: &Path) -> Result<DevServer> {
    let tmp = fresh_temp_dir("fieldcrypt-mongod")?;
    let dbpath = tmp.join("db");
    fs::create_dir_all(&dbpath)?;
    let port = free_port()?;
    let mut cmd = supervisor();
    cmd.arg(mongod)
        .arg("--dbpath")
        .arg(&dbpath)
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind_ip", "127.0.0.1"])
        .env("FIELDCRYPT_DEVSERVER_CLEANUP", &tmp);
    let mut process = Supervised::spawn(cmd, None).inspect_err(|_| {
        let _ = fs::remove_dir_all(&tmp);
    })?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            break;
        }
        if process.exited() {
            return Err(process.failure(&format!("`{}` exited at start", mongod.display())));
        }
        if Instant::now() >= deadline {
            return Err(process.failure(&format!(
                "`{}` did not accept connections on port {port} within {}s",
                mongod.display(),
                START_TIMEOUT.as_secs()
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(DevServer {
        kind: DevServerKind::Mongod,
        uri: local_uri(port),
        python: installed_venv().map(|v| v.python),
        process: Some(process),
    })
}

fn start_secantus(venv: &Venv) -> Result<DevServer> {
    let mut cmd = supervisor();
    cmd.arg(&venv.secantusd)
        // An explicit (empty) config file turns off the auto-discovery of ./secantusd.toml and
        // ~/.secantus/secantusd.toml, which could change the server's behaviour.
        .arg("--config")
        .arg(&venv.config)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--storage-path",
            ":memory:",
        ])
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME");
    let (tx, rx) = mpsc::channel();
    let process = Supervised::spawn(cmd, Some(tx))?;
    let port = match rx.recv_timeout(START_TIMEOUT) {
        Ok(port) => port,
        Err(RecvTimeoutError::Disconnected) => {
            return Err(process.failure("SecantusDB exited before it was listening"));
        }
        Err(RecvTimeoutError::Timeout) => {
            return Err(process.failure(&format!(
                "SecantusDB did not report `listening on 127.0.0.1:<port>` within {}s",
                START_TIMEOUT.as_secs()
            )));
        }
    };
    Ok(DevServer {
        kind: DevServerKind::Secantus,
        uri: local_uri(port),
        python: Some(venv.python.clone()),
        process: Some(process),
    })
}

fn local_uri(port: u16) -> String {
    format!("mongodb://127.0.0.1:{port}/?directConnection=true")
}

pub(crate) fn supervisor() -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(SUPERVISOR).arg("fieldcrypt-devserver");
    cmd
}

/// A server process under the `sh` supervisor.
#[derive(Debug)]
pub(crate) struct Supervised {
    child: Child,
    /// Held open while the server should run; closing it stops the server.
    stdin: Option<ChildStdin>,
    pub(crate) log: Arc<LogTail>,
}

impl Supervised {
    /// Spawns `cmd` with a piped stdin and stderr, and a thread that drains stderr for the
    /// server's whole life, keeping its last lines. If `port_tx` is given, the port of the first
    /// `listening on <host>:<port>` line is sent on it.
    pub(crate) fn spawn(
        mut cmd: Command,
        port_tx: Option<mpsc::Sender<u16>>,
    ) -> Result<Supervised> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            Error::Unavailable(format!(
                "could not run `sh` to supervise the server: {e}\n{HOW_TO_PROVIDE}"
            ))
        })?;
        let stdin = child.stdin.take();
        let log = Arc::new(LogTail::default());
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            let spawned = thread::Builder::new()
                .name("fieldcrypt-devserver-log".into())
                .spawn(move || drain(stderr, &sink, port_tx));
            if let Err(e) = spawned {
                let mut s = Supervised { child, stdin, log };
                s.stop();
                return Err(Error::Io(e));
            }
        }
        Ok(Supervised { child, stdin, log })
    }

    pub(crate) fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the server and builds an error with what it printed.
    fn failure(mut self, what: &str) -> Error {
        self.stop();
        // Let the log thread take in the last lines.
        thread::sleep(Duration::from_millis(100));
        let tail = self.log.snapshot();
        Error::Unavailable(format!(
            "{what}; its last output:\n{}\n{HOW_TO_PROVIDE}",
            if tail.is_empty() {
                "(nothing)".to_owned()
            } else {
                tail.join("\n")
            }
        ))
    }

    pub(crate) fn stop(&mut self) {
        // Closing the pipe makes the supervisor terminate the server and clean up.
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Default)]
pub(crate) struct LogTail(Mutex<VecDeque<String>>);

impl LogTail {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == LOG_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect()
    }
}

fn drain(stderr: impl std::io::Read, log: &LogTail, mut port_tx: Option<mpsc::Sender<u16>>) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        if let Some(port) = port_tx.as_ref().and_then(|_| listening_port(&line)) {
            if let Some(tx) = port_tx.take() {
                let _ = tx.send(port);
            }
        }
        log.push(line);
    }
}

/// The port in a line like `... secantus listening on 127.0.0.1:45413`.
fn listening_port(line: &str) -> Option<u16> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    addr.rsplit_once(':')?.1.parse().ok()
}

pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

pub(crate) fn fresh_temp_dir(prefix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The SecantusDB virtual environment

#[derive(Debug, Clone)]
struct Venv {
    python: PathBuf,
    secantusd: PathBuf,
    config: PathBuf,
}

pub(crate) fn cache_dir() -> PathBuf {
    if let Some(dir) = env_nonempty("FIELDCRYPT_DEVSERVER_DIR") {
        return PathBuf::from(dir);
    }
    target_dir().join("fieldcrypt-devserver")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR`, else the directory holding the running test,
/// example or binary (cargo marks it with a `CACHEDIR.TAG`, and one workspace shares it), else
/// `./target`.
fn target_dir() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    if let Some(dir) = env_nonempty("CARGO_TARGET_DIR") {
        return cwd.join(dir);
    }
    let exe = std::env::current_exe().ok();
    let tagged = exe.as_deref().and_then(|exe| {
        exe.ancestors()
            .skip(1)
            .take(4)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
    });
    match tagged {
        Some(dir) => dir.to_path_buf(),
        None => cwd.join("target"),
    }
}

fn venv_paths(venv: &Path) -> Venv {
    let bin = venv.join(if cfg!(windows) { "Scripts" } else { "bin" });
    let exe = std::env::consts::EXE_SUFFIX;
    Venv {
        python: bin.join(format!("python{exe}")),
        secantusd: bin.join(format!("secantusd-py{exe}")),
        config: venv.join("fieldcrypt-secantusd.toml"),
    }
}

fn marker_contents() -> String {
    let mut s = PYTHON_REQUIREMENTS.join("\n");
    s.push('\n');
    s
}

/// The venv, if a complete install with the current requirements is there.
fn installed_venv() -> Option<Venv> {
    let venv = cache_dir().join("venv");
    let marker = fs::read_to_string(venv.join(".fieldcrypt-installed")).ok()?;
    (marker == marker_contents()).then(|| venv_paths(&venv))
}

fn ensure_venv() -> Result<Venv> {
    if let Some(v) = installed_venv() {
        return Ok(v);
    }
    let dir = cache_dir();
    fs::create_dir_all(&dir).map_err(|e| {
        Error::Unavailable(format!(
            "cannot create the cache directory {}: {e}",
            dir.display()
        ))
    })?;
    let lock_path = dir.join("install.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    lock_exclusive(&lock, &lock_path)?;
    // Another process may have finished the install while we waited.
    if let Some(v) = installed_venv() {
        return Ok(v);
    }
    install(&dir, &lock)
    // The lock is released when `lock` is closed.
}

pub(crate) fn lock_exclusive(lock: &File, path: &Path) -> Result<()> {
    let deadline = Instant::now() + LOCK_TIMEOUT;
    let mut told = false;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Unavailable(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )))
            }
        }
        if !told {
            eprintln!(
                "fieldcrypt devserver: waiting for another process to finish installing SecantusDB \
                 (lock {})",
                path.display()
            );
            told = true;
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "timed out after {}s waiting for the install lock {}",
                LOCK_TIMEOUT.as_secs(),
                path.display()
            )));
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn install(dir: &Path, lock: &File) -> Result<Venv> {
    let venv = dir.join("venv");
    let log = dir.join("install.log");
    let paths = venv_paths(&venv);
    let base_python =
        env_nonempty("FIELDCRYPT_DEVSERVER_PYTHON").unwrap_or_else(|| "python3".to_owned());
    eprintln!(
        "fieldcrypt devserver: installing {} into {} (one time, about 30 s; log: {})",
        PYTHON_REQUIREMENTS.join(" "),
        venv.display(),
        log.display()
    );
    let started = Instant::now();
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    File::create(&log)?;
    let what = format!("`{base_python} -m venv`");
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
        &what,
    )?;
    let mut args: Vec<&OsStr> = vec![paths.python.as_os_str()];
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
    args.extend(PYTHON_REQUIREMENTS.iter().map(OsStr::new));
    run_logged(&args, lock, &log, PIP_TIMEOUT, "`pip install`")?;
    if !paths.secantusd.is_file() {
        return Err(Error::Unavailable(format!(
            "pip install succeeded but {} is missing",
            paths.secantusd.display()
        )));
    }
    fs::write(
        &paths.config,
        "# Empty on purpose: turns off config auto-discovery.\n",
    )?;
    // The marker is written last, atomically: without it the install is redone.
    let marker = venv.join(".fieldcrypt-installed");
    let tmp = venv.join(".fieldcrypt-installed.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(marker_contents().as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &marker)?;
    eprintln!(
        "fieldcrypt devserver: installed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(paths)
}

/// Runs `args` under the supervisor (so it dies with this process), with its output appended to
/// `log` and the install `lock` inherited, killing it after `timeout`.
pub(crate) fn run_logged(
    args: &[&OsStr],
    lock: &File,
    log: &Path,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    let out = OpenOptions::new().append(true).open(log)?;
    let mut cmd = supervisor();
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(lock.try_clone()?)
        .stderr(out)
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env_remove("PIP_USER");
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Unavailable(format!("could not run {what} under `sh`: {e}")))?;
    let mut stdin = child.stdin.take();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            drop(stdin.take());
            let _ = child.wait();
            return Err(Error::Unavailable(format!(
                "{what} timed out after {}s; last lines of {}:\n{}",
                timeout.as_secs(),
                log.display(),
                file_tail(log, 20)
            )));
        }
        thread::sleep(Duration::from_millis(100));
    };
    drop(stdin);
    if status.success() {
        Ok(())
    } else {
        Err(Error::Unavailable(format!(
            "{what} failed ({status}); last lines of {}:\n{}",
            log.display(),
            file_tail(log, 20)
        )))
    }
}

fn file_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Environment

pub(crate) fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let exe = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(&exe))
        .find(|p| is_executable(p))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

fn message_of(e: &Error) -> String {
    match e {
        Error::Unavailable(m) => m.clone(),
        // Without Display's "dev server: " prefix: the message is wrapped in Unavailable again.
        Error::Io(e) => format!("I/O error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_line() {
        assert_eq!(
            listening_port("2026-11-29 07:57:56,347 INFO secantus.server: secantus listening on 127.0.0.1:45413"),
            Some(45413)
        );
        assert_eq!(
            listening_port("listening on 127.0.0.1:80 (ready)"),
            Some(80)
        );
        assert_eq!(listening_port("INFO secantus.cli: loaded config"), None);
    }

    #[test]
    fn db_names_are_unique_and_valid() {
        let a = unique_db_name("a.b/c d$");
        let b = unique_db_name("a.b/c d$");
        assert_ne!(a, b);
        assert!(a.starts_with("a_b_c_d__"), "{a}");
        let long = unique_db_name(&"x".repeat(200));
        assert!(long.len() <= 63, "{long}");
    }
}
