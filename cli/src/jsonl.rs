//! Documents as Extended JSON, one per line, as `mongoexport` writes and `mongoimport` reads
//! them. Input may be canonical or relaxed; output is canonical, so every BSON type (binary
//! subtypes included) survives the round trip.
//!
//! Nothing is lost on failure: an `--out` file is written under a temporary name beside it
//! and moved into place only by [`Writer::finish`], so a run that fails leaves the old file
//! (or none) as it was.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use bson::{Bson, Document, RawDocument, RawDocumentBuf};
use fieldcrypt::Error;

use crate::error::{CliError, Result};
use zeroize::Zeroize;

/// MongoDB's document size limit: larger documents can be neither stored nor read back.
pub(crate) const MAX_DOCUMENT: usize = 16 * 1024 * 1024;

/// The longest input line read (twice the document limit: Extended JSON is larger than the
/// BSON it spells, base64 by a third). Checked before parsing, which takes several times the
/// line's size in memory.
pub(crate) const MAX_LINE: usize = 2 * MAX_DOCUMENT;

/// The most JSON values (fields, array elements, scalars) one input line may hold. The line's
/// bytes are bounded by [`MAX_LINE`], but a line becomes a JSON tree, a BSON tree, a raw
/// document and, on output, those again, each costing per value far more than the value's
/// text (`[0,0,…]`: 2 bytes a value in, several hundred bytes in memory). Counted before
/// anything is built, so memory is bounded by this count and the line's length: a line of
/// `MAX_VALUES` small numbers peaks near 330 MB (debug build), where a 32 MiB line of them took
/// over 3 GB. Documents under MongoDB's 16 MiB rarely hold half a million values.
pub(crate) const MAX_VALUES: usize = 1 << 19;

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
    /// only (mode 0600), and appears only when the command succeeds; an existing file is
    /// refused unless --force, as are a symbolic link and the --in file itself.
    #[arg(long = "out", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace the --out file if it exists, when the command succeeds (its mode and group are
    /// kept).
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

impl IoArgs {
    /// The reader of `--in` and the writer of `--out` (refusing an `--out` that is the input);
    /// `plaintext` when what is written is decrypted.
    pub(crate) fn open(&self, plaintext: bool) -> Result<(Reader, Writer)> {
        let reader = Reader::open(self.input.input.as_deref())?;
        let writer = Writer::create(&self.output, plaintext, Some(&self.input))?;
        Ok((reader, writer))
    }
}

/// Reads documents, a batch at a time, remembering the line each came from.
pub(crate) struct Reader {
    lines: Box<dyn BufRead + Send>,
    line: usize,
    buf: Vec<u8>,
    batch_lines: Vec<usize>,
}

impl Reader {
    pub(crate) fn open(path: Option<&Path>) -> Result<Self> {
        let lines: Box<dyn BufRead + Send> = match path {
            Some(p) => Box::new(BufReader::with_capacity(
                1 << 20,
                File::open(p).map_err(|e| CliError::file(p, e))?,
            )),
            None => Box::new(BufReader::with_capacity(1 << 20, io::stdin())),
        };
        Ok(Reader {
            lines,
            line: 0,
            buf: Vec::with_capacity(1 << 16),
            batch_lines: Vec::new(),
        })
    }

    /// Up to `n` documents (fewer only at the end). Blank lines are skipped. Errors name the
    /// line, never its content.
    pub(crate) fn batch(&mut self, n: usize) -> Result<Vec<RawDocumentBuf>> {
        let mut out = Vec::with_capacity(n);
        self.batch_lines.clear();
        let read = self.fill(n, &mut out);
        // The line may hold plaintext: don't leave it in the buffer.
        self.buf.zeroize();
        read?;
        Ok(out)
    }

    fn fill(&mut self, n: usize, out: &mut Vec<RawDocumentBuf>) -> Result<()> {
        while out.len() < n {
            if !self.read_line()? {
                break;
            }
            let line = self.line;
            let text = std::str::from_utf8(&self.buf).map_err(|e| {
                CliError::input(line, format!("not UTF-8 (byte {})", e.valid_up_to() + 1))
            })?;
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            out.push(parse_line(text, line)?);
            self.batch_lines.push(line);
        }
        Ok(())
    }

    /// Reads the next line into `buf` (newline included), refusing one over [`MAX_LINE`]
    /// before it is all in memory. `false` at the end of the input.
    fn read_line(&mut self) -> Result<bool> {
        self.buf.clear();
        loop {
            let avail = self.lines.fill_buf()?;
            if avail.is_empty() {
                if !self.buf.is_empty() {
                    self.line += 1;
                }
                return Ok(!self.buf.is_empty());
            }
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(p) => (p + 1, true),
                None => (avail.len(), false),
            };
            if self.buf.len() + take > MAX_LINE + 1 {
                return Err(CliError::Usage(format!(
                    "line {}: longer than {} MiB: refused (MongoDB's documents are at most {} MiB)",
                    self.line + 1,
                    MAX_LINE >> 20,
                    MAX_DOCUMENT >> 20
                )));
            }
            extend_wiping(&mut self.buf, &avail[..take]);
            self.lines.consume(take);
            if done {
                self.line += 1;
                return Ok(true);
            }
        }
    }

    /// The input line of document `i` of the last batch.
    pub(crate) fn line_of(&self, i: usize) -> usize {
        self.batch_lines.get(i).copied().unwrap_or(self.line)
    }

    /// The number of lines read so far.
    pub(crate) fn line(&self) -> usize {
        self.line
    }
}

/// Appends to a buffer that may hold plaintext, wiping the old allocation when it grows
/// (`Vec`'s own growth would leave a copy in freed memory).
fn extend_wiping(buf: &mut Vec<u8>, more: &[u8]) {
    if buf.len() + more.len() > buf.capacity() {
        let mut bigger = Vec::with_capacity((buf.len() + more.len()).next_power_of_two());
        bigger.extend_from_slice(buf);
        buf.zeroize();
        *buf = bigger;
    }
    buf.extend_from_slice(more);
}

/// One line of Extended JSON to a raw document.
pub(crate) fn parse_line(text: &str, line: usize) -> Result<RawDocumentBuf> {
    if count_values(text) > MAX_VALUES {
        return Err(CliError::input(
            line,
            format!(
                "more than {MAX_VALUES} values (fields and array elements): refused before parsing, to bound memory (documents of MongoDB's {} MiB rarely hold so many)",
                MAX_DOCUMENT >> 20
            ),
        ));
    }
    // serde_json and bson errors can quote the input: report the position only.
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| CliError::input(line, format!("not JSON (column {})", e.column())))?;
    let doc = match Bson::try_from(value) {
        Ok(Bson::Document(d)) => RawDocumentBuf::from_document(&d).map_err(|_| {
            CliError::input(
                line,
                format!(
                    "not a valid BSON document (or over MongoDB's {} MiB limit)",
                    MAX_DOCUMENT >> 20
                ),
            )
        })?,
        Ok(_) => return Err(CliError::input(line, "not a JSON object")),
        Err(_) => return Err(CliError::input(line, "not valid Extended JSON")),
    };
    check_size(&doc, line, "the document")?;
    Ok(doc)
}

/// The number of JSON values in `text`, counting no further than past [`MAX_VALUES`], without
/// building them (memory: the nesting depth). Malformed JSON counts what came before the
/// error; the full parse then reports it.
fn count_values(text: &str) -> usize {
    let mut n = 0;
    let mut de = serde_json::Deserializer::from_str(text);
    let _ = serde::de::DeserializeSeed::deserialize(Count(&mut n), &mut de);
    n
}

/// Counts values as serde sees them, failing past [`MAX_VALUES`].
struct Count<'a>(&'a mut usize);

impl Count<'_> {
    fn bump<E: serde::de::Error>(&mut self) -> std::result::Result<(), E> {
        *self.0 += 1;
        if *self.0 > MAX_VALUES {
            return Err(E::custom("too many values"));
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E: serde::de::Error>(mut self, _: bool) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_i64<E: serde::de::Error>(mut self, _: i64) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_u64<E: serde::de::Error>(mut self, _: u64) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_f64<E: serde::de::Error>(mut self, _: f64) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_str<E: serde::de::Error>(mut self, _: &str) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_unit<E: serde::de::Error>(mut self) -> std::result::Result<(), E> {
        self.bump()
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        mut self,
        mut seq: A,
    ) -> std::result::Result<(), A::Error> {
        self.bump()?;
        while seq.next_element_seed(Count(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        mut self,
        mut map: A,
    ) -> std::result::Result<(), A::Error> {
        self.bump()?;
        while map.next_key::<serde::de::IgnoredAny>()?.is_some() {
            map.next_value_seed(Count(&mut *self.0))?;
        }
        Ok(())
    }
}

/// Refuses a document over MongoDB's 16 MiB limit (`what` it is, from input `line`).
pub(crate) fn check_size(doc: &RawDocument, line: usize, what: &str) -> Result<()> {
    let n = doc.as_bytes().len();
    if n > MAX_DOCUMENT {
        return Err(CliError::input(
            line,
            format!(
                "{what} is {n} bytes, over MongoDB's {} MiB document limit: refused",
                MAX_DOCUMENT >> 20
            ),
        ));
    }
    Ok(())
}

/// Wipes the documents left in decryption results, once one failed: they hold plaintext.
pub(crate) fn wipe_results<E>(rest: impl Iterator<Item = std::result::Result<RawDocumentBuf, E>>) {
    wipe(rest.filter_map(std::result::Result::ok).collect());
}

/// Wipes documents that may hold plaintext instead of only freeing them.
pub(crate) fn wipe(docs: Vec<RawDocumentBuf>) {
    for d in docs {
        d.into_bytes().zeroize();
    }
}

/// Writes documents as canonical Extended JSON lines.
pub(crate) struct Writer {
    out: Box<dyn Write + Send>,
    /// The `--out` file being written under a temporary name, moved into place by `finish`.
    pending: Option<Pending>,
}

impl Writer {
    /// Writes to `out.output`, or stdout. The file is written under a temporary name in the
    /// same directory, created exclusively with mode 0600 (owner only: the output may be
    /// plaintext), and takes the place of `out.output` only in [`Writer::finish`]: a command
    /// that fails leaves what was there. An existing file is an error unless `out.force`, and
    /// is then replaced keeping its mode (never loosened) and group; a symbolic link is
    /// refused, and so is the file documents are read from (`input`; `None`: no input).
    /// `plaintext` says the output holds decrypted values: replacing a file that others can
    /// read is then warned about.
    pub(crate) fn create(out: &OutArgs, plaintext: bool, input: Option<&InArgs>) -> Result<Self> {
        let (w, pending): (Box<dyn Write + Send>, _) = match &out.output {
            Some(p) => {
                let (file, pending) = open_output(p, out.force, plaintext, input)?;
                (Box::new(BufWriter::with_capacity(1 << 20, file)), pending)
            }
            None => (
                Box::new(BufWriter::with_capacity(1 << 20, io::stdout())),
                None,
            ),
        };
        Ok(Writer { out: w, pending })
    }

    pub(crate) fn write(&mut self, doc: &RawDocument) -> Result<()> {
        let d = Document::try_from(doc).map_err(|e| Error::MalformedBson(e.to_string()))?;
        let mut line =
            zeroize::Zeroizing::new(Bson::Document(d).into_canonical_extjson().to_string());
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Drops what was written: an `--out` file's temporary file is removed, and the file it
    /// was to replace (or its absence) is left as it was.
    pub(crate) fn discard(self) {
        drop(self);
    }

    /// Flushes, and moves an `--out` file into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        drop(std::mem::replace(&mut self.out, Box::new(io::sink())));
        if let Some(p) = self.pending.take() {
            p.commit()?;
        }
        Ok(())
    }
}

/// An output file written under a temporary name; removed on drop unless committed.
struct Pending {
    tmp: PathBuf,
    target: PathBuf,
    /// The target existed (`--force`): rename over it. Otherwise link, which fails if a file
    /// appeared there meanwhile.
    replace: bool,
    sync: File,
    committed: bool,
}

impl Pending {
    /// A pending output file, removed if Ctrl-C ends the process.
    fn new(tmp: PathBuf, target: &Path, replace: bool, sync: File) -> Pending {
        crate::cleanup::register(&tmp);
        Pending {
            tmp,
            target: target.to_owned(),
            replace,
            sync,
            committed: false,
        }
    }

    fn commit(mut self) -> Result<()> {
        let named = |e: io::Error| CliError::file(&self.target, e);
        self.sync.sync_all().map_err(named)?;
        if self.replace {
            std::fs::rename(&self.tmp, &self.target).map_err(named)?;
        } else {
            match std::fs::hard_link(&self.tmp, &self.target) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(exists(&self.target));
                }
                // A file system without hard links: a rename would replace a file created
                // there meanwhile, so copy into a new file instead (not atomic for readers,
                // but never over someone else's file).
                Err(_) => {
                    copy_to_new(&self.tmp, &self.target)?;
                    let _ = std::fs::remove_file(&self.tmp);
                }
            }
        }
        self.committed = true;
        // Make the new name durable; not every platform can open a directory.
        let dir = match self.target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Copies `tmp` into `target`, which must not exist (created exclusively, with `tmp`'s mode);
/// a failed copy removes what it created.
fn copy_to_new(tmp: &Path, target: &Path) -> Result<()> {
    let named = |e: io::Error| CliError::file(target, e);
    let mut from = File::open(tmp).map_err(named)?;
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = from.metadata().map_err(named)?.permissions().mode();
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode & 0o600);
    }
    let mut to = match opts.open(target) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(exists(target)),
        Err(e) => return Err(named(e)),
    };
    let copied = io::copy(&mut from, &mut to).and_then(|_| to.sync_all());
    #[cfg(unix)]
    let copied = copied.and_then(|()| {
        let m = from.metadata()?;
        to.set_permissions(m.permissions())
    });
    if let Err(e) = copied {
        drop(to);
        let _ = std::fs::remove_file(target);
        return Err(named(e));
    }
    Ok(())
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
        crate::cleanup::unregister(&self.tmp);
    }
}

fn exists(path: &Path) -> CliError {
    CliError::file(path, "the file exists; give --force to overwrite it")
}

/// Opens an output file: see [`Writer::create`]. A device or pipe (`/dev/null`, a FIFO)
/// given with `--force` is written directly: there is nothing to replace.
fn open_output(
    path: &Path,
    force: bool,
    plaintext: bool,
    input: Option<&InArgs>,
) -> Result<(File, Option<Pending>)> {
    let named = |e: io::Error| CliError::file(path, e);
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(named(e)),
    };
    let Some(meta) = existing else {
        let (file, tmp) = create_temp(path, 0o600).map_err(named)?;
        let sync = file.try_clone().map_err(named)?;
        return Ok((file, Some(Pending::new(tmp, path, false, sync))));
    };
    if meta.file_type().is_symlink() {
        return Err(CliError::file(path, "a symbolic link; fieldcrypt does not write through one (give the path of the file itself)"));
    }
    // Before the --force advice, which would not help.
    if let Some(input) = input {
        if same_file(&meta, input) {
            return Err(CliError::file(
                path,
                "the same file as the input; write to another file (and rename it afterwards)",
            ));
        }
    }
    if !force {
        return Err(exists(path));
    }
    if !meta.is_file() {
        let f = OpenOptions::new().write(true).open(path).map_err(named)?;
        return Ok((f, None));
    }
    #[cfg(unix)]
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    #[cfg(not(unix))]
    let mode = 0o600;
    if plaintext && mode & 0o077 != 0 {
        crate::report::warn(&format!(
            "{} is readable by others (mode {:o}) and now holds plaintext: restrict it (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    let (file, tmp) = create_temp(path, mode).map_err(named)?;
    let sync = file.try_clone().map_err(named)?;
    let pending = Pending::new(tmp, path, true, sync);
    #[cfg(unix)]
    keep_owner_group_mode(&file, path, &meta, mode).map_err(named)?;
    #[cfg(not(unix))]
    let _ = plaintext;
    Ok((file, Some(pending)))
}

/// Gives `file`, the replacement of `path`, the mode and group of the file it replaces
/// (`before`; a `0640 owner:service` file stays readable by the service) and, run as root,
/// its owner. Owner and group first: `mode` must not apply to the caller's group; if they
/// cannot be kept, the file is left readable by its owner only, with a warning.
#[cfg(unix)]
pub(crate) fn keep_owner_group_mode(
    file: &File,
    path: &Path,
    before: &std::fs::Metadata,
    mode: u32,
) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mine = file.metadata()?;
    let uid = (mine.uid() == 0 && before.uid() != 0).then_some(before.uid());
    let mut mode = mode;
    if (uid.is_some() || mine.gid() != before.gid())
        && std::os::unix::fs::fchown(file, uid, Some(before.gid())).is_err()
    {
        mode &= !0o077;
        crate::report::warn(&format!(
            "{}: could not keep the file's group ({}): it is now readable by its owner only",
            path.display(),
            before.gid()
        ));
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Creates `.<name>.<unique>.tmp` beside `path`, exclusively (nothing planted there is
/// followed), with `mode` (owner-only to start with when the mode is looser).
fn create_temp(path: &Path, mode: u32) -> io::Result<(File, PathBuf)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("output");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for attempt in 0..100u32 {
        let tmp = path.with_file_name(format!(
            ".{name}.{}.{nanos:x}{attempt}.tmp",
            std::process::id()
        ));
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode & 0o600);
        #[cfg(not(unix))]
        let _ = mode;
        match opts.open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name")))
}

/// Whether the existing output file is the input (`--in`, or what stdin reads).
fn same_file(out: &std::fs::Metadata, input: &InArgs) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let meta = match &input.input {
            Some(p) => std::fs::metadata(p),
            None => std::fs::metadata("/dev/stdin"),
        };
        meta.is_ok_and(|m| m.dev() == out.dev() && m.ino() == out.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (out, input);
        false
    }
}
