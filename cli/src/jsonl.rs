//! Documents as Extended JSON, one per line, as `mongoexport` writes and `mongoimport` reads
//! them. Input may be canonical or relaxed; output is canonical, so every BSON type (binary
//! subtypes included) survives the round trip.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use bson::{Bson, Document, RawDocument, RawDocumentBuf};
use fieldcrypt::{Error, Result};

/// Where documents come from.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct InArgs {
    /// Read documents from this file instead of stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
}

/// Where documents go.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct OutArgs {
    /// Write documents to this file instead of stdout. It is created readable by its owner
    /// only (mode 0600); an existing file is refused unless --force.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Overwrite the --out file if it exists (its permissions are kept).
    #[arg(long, requires = "output")]
    pub force: bool,
}

/// Where documents come from and go to.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct IoArgs {
    #[command(flatten)]
    pub input: InArgs,
    #[command(flatten)]
    pub output: OutArgs,
}

/// Reads documents, a batch at a time.
pub(crate) struct Reader {
    lines: Box<dyn BufRead + Send>,
    line: usize,
    buf: String,
}

impl Reader {
    pub(crate) fn open(path: Option<&Path>) -> Result<Self> {
        let lines: Box<dyn BufRead + Send> = match path {
            Some(p) => Box::new(BufReader::with_capacity(
                1 << 20,
                File::open(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
            )),
            None => Box::new(BufReader::with_capacity(1 << 20, io::stdin())),
        };
        Ok(Reader {
            lines,
            line: 0,
            buf: String::new(),
        })
    }

    /// Up to `n` documents (fewer only at the end). Blank lines are skipped. Errors name the
    /// line, never its content.
    pub(crate) fn batch(&mut self, n: usize) -> Result<Vec<RawDocumentBuf>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            self.buf.clear();
            if self.lines.read_line(&mut self.buf)? == 0 {
                break;
            }
            self.line += 1;
            let text = self.buf.trim();
            if text.is_empty() {
                continue;
            }
            out.push(parse_line(text, self.line)?);
        }
        // The line may hold plaintext: don't leave it in the buffer.
        zeroize::Zeroize::zeroize(&mut self.buf);
        Ok(out)
    }

    /// The number of lines read so far.
    pub(crate) fn line(&self) -> usize {
        self.line
    }
}

/// One line of Extended JSON to a raw document.
pub(crate) fn parse_line(text: &str, line: usize) -> Result<RawDocumentBuf> {
    // serde_json and bson errors can quote the input: report the position only.
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Config(format!("line {line}: not JSON (column {})", e.column())))?;
    match Bson::try_from(value) {
        Ok(Bson::Document(d)) => RawDocumentBuf::from_document(&d)
            .map_err(|_| Error::Config(format!("line {line}: not a valid BSON document"))),
        Ok(_) => Err(Error::Config(format!("line {line}: not a JSON object"))),
        Err(_) => Err(Error::Config(format!(
            "line {line}: not valid Extended JSON"
        ))),
    }
}

/// Writes documents as canonical Extended JSON lines.
pub(crate) struct Writer {
    out: Box<dyn Write + Send>,
}

impl Writer {
    /// Writes to `out.output`, or stdout. A new file is created with mode 0600 (owner only: the
    /// output may be plaintext), atomically (`O_EXCL`, so no symlink or file planted there is
    /// followed); an existing file is an error unless `out.force`, and then it is truncated and
    /// keeps its permissions (never loosened). `plaintext` says the output holds decrypted
    /// values: overwriting a file that others can read is then warned about.
    pub(crate) fn create(out: &OutArgs, plaintext: bool) -> Result<Self> {
        let w: Box<dyn Write + Send> = match &out.output {
            Some(p) => Box::new(BufWriter::with_capacity(
                1 << 20,
                open_output(p, out.force, plaintext)?,
            )),
            None => Box::new(BufWriter::with_capacity(1 << 20, io::stdout())),
        };
        Ok(Writer { out: w })
    }

    pub(crate) fn write(&mut self, doc: &RawDocument) -> Result<()> {
        let d = Document::try_from(doc).map_err(|e| Error::MalformedBson(e.to_string()))?;
        let mut line =
            zeroize::Zeroizing::new(Bson::Document(d).into_canonical_extjson().to_string());
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// Opens an output file: see [`Writer::create`].
pub(crate) fn open_output(path: &Path, force: bool, plaintext: bool) -> Result<File> {
    let named = |e: io::Error| Error::Config(format!("{}: {e}", path.display()));
    let mut new = OpenOptions::new();
    new.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut new, 0o600);
    match new.open(path) {
        Ok(f) => return Ok(f),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(named(e)),
    }
    if !force {
        return Err(Error::Config(format!(
            "{}: the file exists; give --force to overwrite it",
            path.display()
        )));
    }
    // An existing file: truncated, its mode left as it is (`mode` applies to new files only).
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(named)?;
    #[cfg(unix)]
    {
        let mode = std::os::unix::fs::MetadataExt::mode(&f.metadata().map_err(named)?);
        if plaintext && mode & 0o077 != 0 {
            crate::report::warn(&format!(
                "{} is readable by others (mode {:o}) and now holds plaintext: restrict it (chmod 600)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = plaintext;
    Ok(f)
}
