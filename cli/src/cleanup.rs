//! Temporary files to remove when Ctrl-C ends the process: an `--out` file is written under
//! a temporary name (`jsonl`), and may hold plaintext, but `std::process::exit` runs no
//! destructors. A leaf module, so that both the writer and the signal handler can use it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The temporary files of this process not moved into place yet.
static TEMP_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn files() -> MutexGuard<'static, Vec<PathBuf>> {
    TEMP_FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers a temporary file, to be removed if the process is interrupted.
pub(crate) fn register(path: &Path) {
    files().push(path.to_owned());
}

/// Forgets a temporary file (moved into place, or removed).
pub(crate) fn unregister(path: &Path) {
    files().retain(|p| p != path);
}

/// Holds off [`remove_all_and_exit`] while the guard lives: for writes whose temporary file
/// this module does not know (the library's keyset save writes every key to one, then renames
/// it), so that an interrupt cannot end the process half-way and leave that copy behind.
pub(crate) fn hold() -> MutexGuard<'static, Vec<PathBuf>> {
    files()
}

/// Removes every registered temporary file and ends the process with `code`. The list stays
/// locked until the process is gone, so no file is registered (or committed) in between.
pub(crate) fn remove_all_and_exit(code: i32) -> ! {
    let files = files();
    for p in files.iter() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code)
}
