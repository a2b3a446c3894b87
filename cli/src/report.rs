//! Exit codes, error lines, progress (a bar on a terminal, JSON lines with `--json`), and
//! Ctrl-C.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// How the process ends. The numbers are documented in `docs/CLI.md`; scripts rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: done, nothing to report.
    Ok,
    /// 1: an error (message on stderr).
    Error,
    /// 3: the audit found something.
    Findings,
    /// 4: the run finished but some documents could not be processed.
    Failed,
    /// 5: refused: a key is still referenced (use --force to override).
    Refused,
    /// 130: interrupted by Ctrl-C; progress is saved (resume with --resume).
    Interrupted,
}

impl Exit {
    pub(crate) fn code(self) -> ExitCode {
        ExitCode::from(match self {
            Exit::Ok => 0,
            Exit::Error => 1,
            Exit::Findings => 3,
            Exit::Failed => 4,
            Exit::Refused => 5,
            Exit::Interrupted => 130,
        })
    }
}

/// Prints an error as one line on stderr. fieldcrypt's errors carry no values or key bytes
/// (the library's driver errors drop what a server quotes of documents, duplicate keys
/// included); driver errors are flattened to one line.
pub(crate) fn error(e: &crate::error::CliError) {
    // Display drops the "invalid configuration" label of the library's messages.
    let text = e.to_string().replace(['\n', '\r'], " ");
    eprintln!("fieldcrypt: error: {text}");
}

/// A warning line on stderr.
pub(crate) fn warn(text: &str) {
    eprintln!("fieldcrypt: warning: {text}");
}

/// The flag of a command that stops cleanly on Ctrl-C ([`interrupt_flag`]), if it has one.
static GRACEFUL: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

/// Set by Ctrl-C; long loops check it between batches and stop cleanly.
pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    *GRACEFUL.lock().unwrap_or_else(PoisonError::into_inner) = Some(flag.clone());
    flag
}

/// Handles Ctrl-C for the whole run, from before the command starts: the first sets the
/// command's [`interrupt_flag`], if it has one, so that it stops after the current batch;
/// otherwise, and at the second, the process ends with exit code 130 after removing its
/// temporary output files (which may hold plaintext). `SIGTERM` removes them too, and ends
/// the process at once with 143 (128 + 15, as the signal would).
///
/// # Errors
/// When the signal handler cannot be installed.
pub(crate) fn handle_interrupts() -> std::io::Result<()> {
    #[cfg(unix)]
    let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            if term.recv().await.is_some() {
                crate::cleanup::remove_all_and_exit(143);
            }
        });
    }
    tokio::spawn(async move {
        loop {
            #[cfg(unix)]
            let got = signal.recv().await.is_some();
            #[cfg(not(unix))]
            let got = tokio::signal::ctrl_c().await.is_ok();
            if !got {
                return;
            }
            let flag = GRACEFUL
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match flag {
                Some(f) if !f.swap(true, Ordering::SeqCst) => {
                    eprintln!(
                        "\nfieldcrypt: stopping after the current batch (Ctrl-C again to abort)"
                    );
                }
                _ => crate::cleanup::remove_all_and_exit(130),
            }
        }
    });
    Ok(())
}

/// Output options shared by the long-running commands.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct OutputOpts {
    /// Machine-readable output: progress as JSON lines on stderr, the summary as one JSON
    /// document on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Progress for one long task: a bar on a terminal, JSON lines with `--json`, a line every few
/// seconds otherwise.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    json: bool,
    quiet: bool,
    started: Instant,
    last_line: Instant,
    label: String,
}

impl Progress {
    pub(crate) fn new(out: &OutputOpts, label: &str, total: Option<u64>) -> Self {
        let bar = (!out.json && !out.quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            let template = if total.is_some() {
                "{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}"
            } else {
                "{prefix} {spinner} {pos} {msg} {per_sec} {elapsed}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_prefix(label.to_owned());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            json: out.json,
            quiet: out.quiet,
            started: Instant::now(),
            last_line: Instant::now(),
            label: label.to_owned(),
        }
    }

    /// Updates the display: `done` items so far, a short message, and the JSON fields.
    pub(crate) fn update(
        &mut self,
        done: u64,
        total: Option<u64>,
        msg: &str,
        fields: serde_json::Value,
    ) {
        if self.quiet {
            return;
        }
        if let Some(bar) = &self.bar {
            if let Some(t) = total {
                bar.set_length(t.max(done));
            }
            bar.set_position(done);
            bar.set_message(msg.to_owned());
        } else if self.json {
            let mut v = json!({ "event": "progress", "task": self.label, "done": done, "elapsed_seconds": round(self.started.elapsed().as_secs_f64()) });
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
                obj.extend(extra);
            }
            eprintln!("{v}");
        } else if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("{}: {done} {msg}", self.label);
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Rounds to 3 decimals for JSON output.
pub(crate) fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
