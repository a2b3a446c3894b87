//! The `fieldcrypt` tool run as a process, for the CLI's test binaries (`cli.rs`, `qe.rs`).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_fieldcrypt");

/// A finished run: exit code (-1 if killed by a signal) and the output as text.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the tool in `dir` with a clean environment for fieldcrypt's variables.
pub fn run(dir: &Path, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .args(args)
        .env_remove("MONGODB_URI")
        .env_remove("FIELDCRYPT_MASTER_KEY")
        .env_remove("FIELDCRYPT_KEYSET")
        .env_remove("FIELDCRYPT_KMS_PROVIDERS")
        .env_remove("FIELDCRYPT_MASTER_KEY_DOC")
        .env_remove("FIELDCRYPT_PARTITIONS")
        .env_remove("JOB_COMPLETION_INDEX")
        .env("NO_COLOR", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}
