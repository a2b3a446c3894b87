//! Documents as Extended JSON, one per line, as `mongoexport` writes and `mongoimport` reads
//! them. Input may be canonical or relaxed; output is canonical, so every BSON type (binary
//! subtypes included) survives the round trip.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use bson::{Bson, Document, RawDocument, RawDocumentBuf};
use fieldcrypt::{Error, Result};

/// Where documents come from and go to.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct IoArgs {
    /// Read documents from this file instead of stdin.
    #[arg(long = "in", value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Write documents to this file instead of stdout.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
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
    pub(crate) fn create(path: Option<&Path>) -> Result<Self> {
        let out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(BufWriter::with_capacity(
                1 << 20,
                File::create(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())))?,
            )),
            None => Box::new(BufWriter::with_capacity(1 << 20, io::stdout())),
        };
        Ok(Writer { out })
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
