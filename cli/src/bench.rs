//! `fieldcrypt bench`: the W1, W2 and W4 workloads of docs/BENCHMARKS.md on the user's own hardware.
//!
//! Every trial runs fieldcrypt and then its baseline — the bare AEAD calls on the same number of
//! values of the same sizes — for the same time, so each ratio compares two numbers measured
//! under the same machine load. Results are medians across trials, with the spread.
//!
//! The workload data comes from `fieldcrypt_testkit::workloads`, which the criterion benches use too.
//! The baselines call the AEAD crates fieldcrypt itself is built on (`aes-gcm`,
//! `chacha20poly1305`, `aes-siv`, `cbc` + `hmac`/`sha2` for CSFLE): there is no other way to
//! time the bare cipher.

mod rotation;

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use aes_gcm::aead::array::{Array, ArraySize};
use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, KeyInit};
use aes_siv::siv::Aes256Siv;
use bson::{Document, RawDocumentBuf};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use fieldcrypt::{Context, Cryptor, Error, Suite};
use fieldcrypt_testkit::workloads::{self, Format};
use serde_json::{json, Value};

use crate::error::CliError;

/// Run the benchmark workloads (W1, W2 of docs/BENCHMARKS.md) and print documents/s.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    workload: BenchWorkload,
}

#[derive(clap::Subcommand, Debug)]
enum BenchWorkload {
    /// W1 bulk decrypt: MongoDB's own CSFLE benchmark. One document of 1500 encrypted strings
    /// (`key0001: "value 0001"` …), decrypted whole, repeatedly.
    W1 {
        /// Ciphertext format: MongoDB's CSFLE (AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic, as
        /// MongoDB's benchmark), MongoDB Queryable Encryption unindexed values
        /// (AEAD_AES_256_CBC_HMAC_SHA_256) or a fieldcrypt suite.
        #[arg(long, value_enum, default_value_t = FormatArg::Fieldcrypt)]
        format: FormatArg,
        /// The fieldcrypt suite (with `--format fieldcrypt`): AES-256-GCM, ChaCha20-Poly1305,
        /// XChaCha20-Poly1305 or AES-256-SIV-deterministic. Default AES-256-GCM.
        #[arg(long)]
        suite: Option<Suite>,
        #[command(flatten)]
        run: RunOpts,
    },
    /// W2 bulk encrypt/decrypt: user-like documents (~250 bytes, three encrypted fields of ~32
    /// bytes, one nested), through the raw-BSON path and/or the owned-`Document` path.
    W2 {
        /// The fieldcrypt suite for the three fields.
        #[arg(long, default_value_t = Suite::Aes256Gcm)]
        suite: Suite,
        /// Distinct documents (each thread cycles through its own copy).
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
        docs: u32,
        /// Which API: `raw` (`encrypt_raw_into` / `decrypt_raw_into`), `owned`
        /// (`encrypt_document` / `decrypt_document`) or `all`.
        #[arg(long, value_enum, default_value_t = PathArg::Raw)]
        path: PathArg,
        #[command(flatten)]
        run: RunOpts,
    },
    /// W4 rotation: re-encrypting a collection on a server (a new primary key, then the rotation
    /// engine) against a plain copy of it and a plain in-place rewrite, with peak memory.
    W4(rotation::W4Args),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FormatArg {
    /// MongoDB CSFLE, deterministic.
    Csfle,
    /// MongoDB Queryable Encryption, unindexed values.
    QeUnindexed,
    /// fieldcrypt envelopes (`--suite`).
    Fieldcrypt,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PathArg {
    Raw,
    Owned,
    All,
}

/// How long and how often to measure.
#[derive(clap::Args, Debug)]
struct RunOpts {
    /// Threads; each runs its own loop on its own copy of the data. Reported as the total and
    /// per thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
    /// Seconds per trial (per case: fieldcrypt and its baseline each get this long).
    #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
    seconds: f64,
    /// Trials; the median is reported, with min and max.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
    trials: u16,
    /// Untimed warm-up before the trials, in seconds (per case).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_seconds)]
    warmup: f64,
    /// Instead of timing `--seconds`, process exactly this many documents per thread per trial
    /// (at least; W2 works in steps of up to 64): a fixed amount of work for profilers such as
    /// `valgrind --tool=callgrind`.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "seconds")]
    documents: Option<u64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the chosen workload and prints its results.
///
/// # Errors
/// Invalid options ([`CliError::Usage`]); any failure of the measured operations themselves.
pub(crate) fn run(args: &BenchArgs) -> Result<(), CliError> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this fieldcrypt was built without optimizations; its numbers mean nothing \
             (build with `cargo build --release`)"
        );
    }
    let report = match &args.workload {
        BenchWorkload::W1 { format, suite, run } => {
            let format = match (format, suite) {
                (FormatArg::Csfle | FormatArg::QeUnindexed, Some(_)) => {
                    return Err(CliError::Usage(
                        "--suite applies to --format fieldcrypt only".into(),
                    ))
                }
                (FormatArg::Csfle, None) => Format::Csfle,
                (FormatArg::QeUnindexed, None) => Format::QeUnindexed,
                (FormatArg::Fieldcrypt, s) => Format::Fieldcrypt(s.unwrap_or(Suite::Aes256Gcm)),
            };
            w1(format, run)?
        }
        BenchWorkload::W2 {
            suite,
            docs,
            path,
            run,
        } => w2(*suite, *docs, *path, run)?,
        BenchWorkload::W4(w4) => return rotation::run(w4),
    };
    let json = args.json();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.to_json())
                .map_err(|e| CliError::Usage(format!("cannot print JSON: {e}")))?
        );
    } else {
        report.print();
    }
    Ok(())
}

impl BenchArgs {
    fn json(&self) -> bool {
        match &self.workload {
            BenchWorkload::W1 { run, .. } | BenchWorkload::W2 { run, .. } => run.json,
            BenchWorkload::W4(w4) => w4.json,
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= 86_400.0 => Ok(x),
        _ => Err("expected a number of seconds, more than 0".into()),
    }
}

fn non_negative_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=86_400.0).contains(&x) => Ok(x),
        _ => Err("expected a number of seconds, 0 or more".into()),
    }
}

// ---- measuring ----

/// One unit of work per call; returns how many documents it processed.
type Step<'a> = Box<dyn FnMut() -> Result<u64, CliError> + 'a>;

/// Something to time: fieldcrypt or a baseline. `make(t)` builds thread `t`'s loop body over
/// that thread's own copy of the data.
struct Case<'a> {
    name: &'static str,
    baseline: bool,
    describe: String,
    make: Box<dyn Fn(usize) -> Step<'a> + Sync + 'a>,
}

/// One trial of one case: documents/s of each thread.
struct Trial {
    per_thread: Vec<f64>,
}

impl Trial {
    fn total(&self) -> f64 {
        self.per_thread.iter().sum()
    }
}

/// How long one measurement runs.
#[derive(Clone, Copy)]
enum Until {
    Elapsed(Duration),
    /// At least this many documents per thread (for profilers: a fixed amount of work).
    Documents(u64),
}

/// Runs `case` on `threads` threads until `until`; all threads start together.
fn measure(case: &Case<'_>, threads: usize, until: Until) -> Result<Trial, CliError> {
    let barrier = Barrier::new(threads);
    let results: Vec<Result<f64, CliError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut step = (case.make)(t);
                    // One untimed step: first-touch allocations, lazily built cipher states.
                    let first = step();
                    barrier.wait();
                    first?;
                    let start = Instant::now();
                    let mut docs = 0u64;
                    loop {
                        docs += step()?;
                        let elapsed = start.elapsed();
                        let done = match until {
                            Until::Elapsed(d) => elapsed >= d,
                            Until::Documents(n) => docs >= n,
                        };
                        if done {
                            #[allow(clippy::cast_precision_loss)] // counts stay far below 2^52
                            return Ok(docs as f64 / elapsed.as_secs_f64());
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CliError::Usage("a benchmark thread panicked".into())))
            })
            .collect()
    });
    Ok(Trial {
        per_thread: results.into_iter().collect::<Result<_, _>>()?,
    })
}

/// Warms every case up, then runs `trials` rounds of all cases back to back, so that each
/// round measures fieldcrypt and its baselines under the same load.
fn run_cases(cases: &[Case<'_>], opts: &RunOpts) -> Result<Vec<Vec<Trial>>, CliError> {
    if opts.warmup > 0.0 {
        for case in cases {
            measure(case, opts.threads.into(), Until::Elapsed(secs(opts.warmup)))?;
        }
    }
    let until = match opts.documents {
        Some(n) => Until::Documents(n),
        None => Until::Elapsed(secs(opts.seconds)),
    };
    let mut out: Vec<Vec<Trial>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..opts.trials {
        for (case, trials) in cases.iter().zip(&mut out) {
            trials.push(measure(case, opts.threads.into(), until)?);
        }
    }
    Ok(out)
}

#[derive(Clone, Copy)]
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stats {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

impl Stats {
    fn to_json(self) -> Value {
        json!({ "median": round(self.median), "min": round(self.min), "max": round(self.max) })
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

// ---- reporting ----

struct Row {
    name: &'static str,
    baseline: bool,
    describe: String,
    total: Stats,
    per_thread: Stats,
    trials: Vec<f64>,
    /// Threads' documents/s in the median trial.
    median_trial_threads: Vec<f64>,
}

/// `numerator` is reported as "its time ÷ `denominator`'s time".
struct Ratio {
    name: &'static str,
    numerator: &'static str,
    denominator: &'static str,
}

struct Report {
    workload: &'static str,
    title: String,
    params: Value,
    values_per_document: usize,
    threads: usize,
    rows: Vec<Row>,
    ratios: Vec<Ratio>,
}

fn rows(cases: &[Case<'_>], trials: Vec<Vec<Trial>>) -> Vec<Row> {
    cases
        .iter()
        .zip(trials)
        .map(|(case, trials)| {
            let totals: Vec<f64> = trials.iter().map(Trial::total).collect();
            let per_thread: Vec<f64> = trials.iter().flat_map(|t| t.per_thread.clone()).collect();
            let mut order: Vec<usize> = (0..trials.len()).collect();
            order.sort_by(|&a, &b| totals[a].total_cmp(&totals[b]));
            let median_trial = &trials[order[order.len() / 2]];
            Row {
                name: case.name,
                baseline: case.baseline,
                describe: case.describe.clone(),
                total: stats(totals.clone()),
                per_thread: stats(per_thread),
                trials: totals,
                median_trial_threads: median_trial.per_thread.clone(),
            }
        })
        .collect()
}

impl Report {
    fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// Time per document of `numerator` ÷ that of `denominator` (medians).
    fn ratio(&self, r: &Ratio) -> Option<f64> {
        Some(self.row(r.denominator)?.total.median / self.row(r.numerator)?.total.median)
    }

    fn to_json(&self) -> Value {
        #[allow(clippy::cast_precision_loss)] // small counts
        let values = self.values_per_document as f64;
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "kind": if r.baseline { "baseline" } else { "fieldcrypt" },
                    "what": r.describe,
                    "documents_per_second": r.total.to_json(),
                    "per_thread_documents_per_second": r.per_thread.to_json(),
                    "median_trial_per_thread": r.median_trial_threads.iter().map(|&x| round(x)).collect::<Vec<_>>(),
                    "trials": r.trials.iter().map(|&x| round(x)).collect::<Vec<_>>(),
                    "ns_per_value_per_thread": round(1e9 / (r.per_thread.median * values)),
                })
            })
            .collect();
        let ratios: serde_json::Map<String, Value> = self
            .ratios
            .iter()
            .filter_map(|r| Some((r.name.to_string(), json!(round_to(self.ratio(r)?, 3)))))
            .collect();
        json!({
            "workload": self.workload,
            "params": self.params,
            "threads": self.threads,
            "values_per_document": self.values_per_document,
            "results": rows,
            "ratios": ratios,
            "machine": machine(),
            "fieldcrypt_version": env!("CARGO_PKG_VERSION"),
            "optimized_build": !cfg!(debug_assertions),
            "aead_backend": aead_backends(),
        })
    }

    fn print(&self) {
        println!("{}", self.title);
        println!("{}", aead_backend_line());
        println!(
            "{} thread(s); documents/s: median of trials (min–max); per thread: median over threads and trials\n",
            self.threads
        );
        println!(
            "{:<22} {:>12} {:>12} {:>12} {:>12} {:>11}   what",
            "case", "docs/s", "min", "max", "per thread", "ns/value"
        );
        #[allow(clippy::cast_precision_loss)] // small counts
        let values = self.values_per_document as f64;
        for r in &self.rows {
            println!(
                "{:<22} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>11.1}   {}",
                r.name,
                r.total.median,
                r.total.min,
                r.total.max,
                r.per_thread.median,
                1e9 / (r.per_thread.median * values),
                r.describe
            );
        }
        if !self.ratios.is_empty() {
            println!();
        }
        for r in &self.ratios {
            if let Some(x) = self.ratio(r) {
                println!(
                    "{:<40} {x:>6.2}×  (time per document, {} ÷ {})",
                    r.name, r.numerator, r.denominator
                );
            }
        }
    }
}

fn round_to(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// What the numbers were measured on; the load average says how busy the machine was.
fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.parse::<f64>().ok());
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|m| m.trim().to_owned())
    });
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_owned())
    };
    // The CPU features the AEAD crates choose their code paths by.
    let flags: Vec<&str> = field("flags")
        .map(|f| {
            const RELEVANT: [&str; 8] = [
                "aes",
                "pclmulqdq",
                "avx2",
                "avx512f",
                "vaes",
                "vpclmulqdq",
                "sha_ni",
                "bmi2",
            ];
            RELEVANT
                .into_iter()
                .filter(|r| f.split_whitespace().any(|x| x == *r))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "available_parallelism": cpus,
        "cpu_model": model,
        "cpu_vendor": field("vendor_id"),
        "cpu_family": field("cpu family"),
        "cpu_model_number": field("model"),
        "cpu_flags": flags,
        "aes_backend": aes_backend(),
        "aes_crate": AES_CRATE_VERSION,
        "load_average_1m_at_end": load,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// The `aes` crate this workspace builds with: its `Cargo.lock` holds it at 0.9.2, whose x86
/// backend is AES-NI (0.9.3 and 0.9.4 pick VAES-512 where AVX-512 is present, which is slower for
/// field-sized values: docs/BENCHMARKS.md, "The `aes` crate's VAES/AVX-512 backends"). Checked
/// against the lock file by a test.
const AES_CRATE_VERSION: &str = "0.9.2";

/// The backend `aes` 0.9.2 picks at run time on this CPU: AES-NI, else its software code.
fn aes_backend() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("aes") {
            "AES-NI"
        } else {
            "software"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "not x86_64"
    }
}

#[cfg(test)]
mod aes_pin {
    /// What the bench reports as the `aes` crate is what the workspace's lock file builds.
    #[test]
    fn the_reported_aes_version_is_the_locked_one() {
        let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
            .expect("the workspace's Cargo.lock");
        let locked: Vec<&str> = lock
            .split("[[package]]")
            .filter(|p| p.contains("\nname = \"aes\"\n"))
            .filter_map(|p| p.split("version = \"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(locked, [super::AES_CRATE_VERSION]);
    }
}

// ---- W1 ----

fn w1(format: Format, opts: &RunOpts) -> Result<Report, CliError> {
    let (cryptor, doc) = workloads::w1_encrypted(format)?;
    check_w1(&cryptor, &doc)?;
    let n = workloads::W1_FIELDS;
    // The same plaintext and associated-data sizes as the envelopes in the document:
    // a BSON string "value 0001" is 15 bytes; fieldcrypt's AD is its 20-byte header ‖ u32 ‖
    // path, CSFLE's the 18-byte payload header.
    let plain: Vec<Vec<u8>> = (1..=n)
        .map(|i| bson_string_bytes(&format!("value {i:04}")))
        .collect();
    let ads: Vec<Vec<u8>> = (1..=n)
        .map(|i| match format {
            // Both MongoDB formats authenticate their 18-byte payload header.
            Format::Csfle | Format::QeUnindexed => vec![1u8; 18],
            Format::Fieldcrypt(_) => fieldcrypt_ad(&format!("key{i:04}"), None),
        })
        .collect();
    let bare = Bare::new(format);
    let sealed: Vec<Sealed> = plain
        .iter()
        .zip(&ads)
        .enumerate()
        .map(|(i, (p, ad))| bare.seal(i as u64, ad, p))
        .collect::<Result<_, _>>()?;

    let ctx = Context::none();
    let (doc, sealed, ads, bare, cryptor, ctx) = (&doc, &sealed, &ads, &bare, &cryptor, &ctx);
    let cases = vec![
        Case {
            name: "decrypt_raw",
            baseline: false,
            describe: "fieldcrypt: Cryptor::decrypt_raw_into, whole document".into(),
            make: Box::new(move |_| {
                let doc = doc.clone();
                let mut out = Vec::with_capacity(doc.as_bytes().len());
                Box::new(move || {
                    cryptor.decrypt_raw_into(&doc, ctx, &mut out)?;
                    black_box(&out);
                    Ok(1)
                })
            }),
        },
        Case {
            name: "bare_aead_open",
            baseline: true,
            describe: format!("baseline: {} open × {n}, same sizes", bare.name()),
            make: Box::new(move |_| {
                let sealed = sealed.clone();
                let ads = ads.clone();
                let mut buf = Vec::with_capacity(64);
                Box::new(move || {
                    for (s, ad) in sealed.iter().zip(&ads) {
                        bare.open(s, ad, &mut buf)?;
                        black_box(&buf);
                    }
                    Ok(1)
                })
            }),
        },
    ];
    let trials = run_cases(&cases, opts)?;
    let (name, algorithm) = match format {
        Format::Csfle => ("csfle", "AEAD_AES_256_CBC_HMAC_SHA_512-Deterministic"),
        Format::QeUnindexed => ("qe-unindexed", "AEAD_AES_256_CBC_HMAC_SHA_256"),
        Format::Fieldcrypt(s) => ("fieldcrypt", s.name()),
    };
    Ok(Report {
        workload: "W1",
        title: format!(
            "W1 bulk decrypt (MongoDB's benchmark: one document, {n} encrypted strings), format {name}, {algorithm}"
        ),
        params: json!({
            "format": name,
            "suite": match format { Format::Csfle | Format::QeUnindexed => None, Format::Fieldcrypt(s) => Some(s.name()) },
            "algorithm": algorithm,
            "seconds": opts.seconds,
            "trials": opts.trials,
            "warmup_seconds": opts.warmup,
            "documents": opts.documents,
        }),
        values_per_document: n,
        threads: opts.threads.into(),
        rows: rows(&cases, trials),
        ratios: vec![Ratio {
            name: "decrypt_raw_over_bare_aead",
            numerator: "decrypt_raw",
            denominator: "bare_aead_open",
        }],
    })
}

/// Decrypts the W1 document once and checks it reads back as MongoDB's benchmark says.
fn check_w1(cryptor: &Cryptor, doc: &RawDocumentBuf) -> Result<(), CliError> {
    let plain = cryptor.decrypt_raw(doc, &Context::none())?;
    let bad =
        || CliError::Usage("W1 self-check failed: the document did not decrypt as expected".into());
    let mut count = 0;
    for (i, e) in plain.iter().enumerate() {
        let (k, v) = e.map_err(|_| bad())?;
        let i = i + 1;
        if k != format!("key{i:04}") || v.as_str() != Some(format!("value {i:04}").as_str()) {
            return Err(bad());
        }
        count += 1;
    }
    if count == workloads::W1_FIELDS {
        Ok(())
    } else {
        Err(bad())
    }
}

// ---- W2 ----

/// Per-thread copies of the W2 data.
struct W2Data {
    raw: Vec<RawDocumentBuf>,
    enc: Vec<RawDocumentBuf>,
    owned: Vec<Document>,
    enc_owned: Vec<Document>,
    /// Per document, the three values to encrypt (plaintext bytes, associated data) as the
    /// transform sees them.
    values: Vec<[(Vec<u8>, Vec<u8>); 3]>,
    /// The same values sealed with the bare AEAD.
    sealed: Vec<[Sealed; 3]>,
}

const W2_FIELDS: [&str; 3] = ["email", "ssn", "profile.phone"];

fn w2(suite: Suite, n: u32, path: PathArg, opts: &RunOpts) -> Result<Report, CliError> {
    let (cryptor, raw) = workloads::w2_setup(suite, n)?;
    let ctx = workloads::w2_context();
    let enc: Vec<RawDocumentBuf> = raw
        .iter()
        .map(|d| cryptor.encrypt_raw(d, &ctx))
        .collect::<Result<_, _>>()?;
    // Self-check: one document round-trips.
    if cryptor.decrypt_raw(&enc[0], &ctx)?.as_bytes() != raw[0].as_bytes() {
        return Err(CliError::Usage(
            "W2 self-check failed: no round trip".into(),
        ));
    }
    let owned_needed = path != PathArg::Raw;
    let to_docs = |v: &[RawDocumentBuf]| -> Result<Vec<Document>, CliError> {
        if !owned_needed {
            return Ok(Vec::new());
        }
        v.iter()
            .map(|d| {
                d.to_document()
                    .map_err(|e| CliError::Lib(Error::MalformedBson(e.to_string())))
            })
            .collect()
    };
    let (owned, enc_owned) = (to_docs(&raw)?, to_docs(&enc)?);
    let bare = Bare::new(Format::Fieldcrypt(suite));
    let ns = ctx.namespace.as_deref();
    let mut values = Vec::with_capacity(raw.len());
    let mut sealed = Vec::with_capacity(raw.len());
    let mut counter = 0u64;
    for d in &raw {
        let profile = d
            .get_document("profile")
            .map_err(|e| CliError::Lib(Error::MalformedBson(e.to_string())))?;
        let get = |doc: &bson::RawDocument, k: &str| -> Result<Vec<u8>, CliError> {
            doc.get_str(k)
                .map(bson_string_bytes)
                .map_err(|e| CliError::Lib(Error::MalformedBson(e.to_string())))
        };
        let pts = [get(d, "email")?, get(d, "ssn")?, get(profile, "phone")?];
        let v: [(Vec<u8>, Vec<u8>); 3] =
            std::array::from_fn(|i| (pts[i].clone(), fieldcrypt_ad(W2_FIELDS[i], ns)));
        let mut s = Vec::with_capacity(3);
        for (p, ad) in &v {
            counter += 1;
            s.push(bare.seal(counter, ad, p)?);
        }
        sealed
            .push(<[Sealed; 3]>::try_from(s).map_err(|_| CliError::Usage("three values".into()))?);
        values.push(v);
    }
    // Each thread gets its own copy, made before the clock starts.
    let data: Vec<W2Data> = (0..opts.threads)
        .map(|_| W2Data {
            raw: raw.clone(),
            enc: enc.clone(),
            owned: owned.clone(),
            enc_owned: enc_owned.clone(),
            values: values.clone(),
            sealed: sealed.clone(),
        })
        .collect();
    drop((owned, enc_owned, values, sealed));

    let (data, cryptor, ctx, bare) = (&data, &cryptor, &ctx, &bare);
    // Each step processes up to CHUNK documents, cycling through the thread's copy.
    const CHUNK: usize = 64;
    fn cycle(len: usize, at: &mut usize) -> std::ops::Range<usize> {
        let start = *at;
        let end = (start + CHUNK).min(len);
        *at = if end == len { 0 } else { end };
        start..end
    }
    let mut cases = Vec::new();
    if path != PathArg::Owned {
        cases.push(Case {
            name: "encrypt_raw",
            baseline: false,
            describe: "fieldcrypt: Cryptor::encrypt_raw_into".into(),
            make: Box::new(move |t| {
                let d = &data[t];
                let (mut at, mut out) = (0, Vec::with_capacity(512));
                Box::new(move || {
                    let r = cycle(d.raw.len(), &mut at);
                    let k = r.len() as u64;
                    for doc in &d.raw[r] {
                        cryptor.encrypt_raw_into(doc, ctx, &mut out)?;
                        black_box(&out);
                    }
                    Ok(k)
                })
            }),
        });
        cases.push(Case {
            name: "decrypt_raw",
            baseline: false,
            describe: "fieldcrypt: Cryptor::decrypt_raw_into".into(),
            make: Box::new(move |t| {
                let d = &data[t];
                let (mut at, mut out) = (0, Vec::with_capacity(512));
                Box::new(move || {
                    let r = cycle(d.enc.len(), &mut at);
                    let k = r.len() as u64;
                    for doc in &d.enc[r] {
                        cryptor.decrypt_raw_into(doc, ctx, &mut out)?;
                        black_box(&out);
                    }
                    Ok(k)
                })
            }),
        });
    }
    if path != PathArg::Raw {
        cases.push(Case {
            name: "encrypt_owned",
            baseline: false,
            describe: "fieldcrypt: Cryptor::encrypt_document".into(),
            make: Box::new(move |t| {
                let d = &data[t];
                let mut at = 0;
                Box::new(move || {
                    let r = cycle(d.owned.len(), &mut at);
                    let k = r.len() as u64;
                    for doc in &d.owned[r] {
                        black_box(cryptor.encrypt_document(doc, ctx)?);
                    }
                    Ok(k)
                })
            }),
        });
        cases.push(Case {
            name: "decrypt_owned",
            baseline: false,
            describe: "fieldcrypt: Cryptor::decrypt_document".into(),
            make: Box::new(move |t| {
                let d = &data[t];
                let mut at = 0;
                Box::new(move || {
                    let r = cycle(d.enc_owned.len(), &mut at);
                    let k = r.len() as u64;
                    for doc in &d.enc_owned[r] {
                        black_box(cryptor.decrypt_document(doc, ctx)?);
                    }
                    Ok(k)
                })
            }),
        });
    }
    cases.push(Case {
        name: "bare_aead_seal",
        baseline: true,
        describe: format!(
            "baseline: {} seal × 3 per document, same sizes, random nonces (thread_rng)",
            bare.name()
        ),
        make: Box::new(move |t| {
            let d = &data[t];
            let mut at = 0;
            let mut buf = Vec::with_capacity(64);
            Box::new(move || {
                let r = cycle(d.values.len(), &mut at);
                let k = r.len() as u64;
                for vals in &d.values[r] {
                    for (p, ad) in vals {
                        bare.seal_random_into(ad, p, &mut buf)?;
                        black_box(&buf);
                    }
                }
                Ok(k)
            })
        }),
    });
    cases.push(Case {
        name: "bare_aead_open",
        baseline: true,
        describe: format!(
            "baseline: {} open × 3 per document, same sizes",
            bare.name()
        ),
        make: Box::new(move |t| {
            let d = &data[t];
            let mut at = 0;
            let mut buf = Vec::with_capacity(64);
            Box::new(move || {
                let r = cycle(d.sealed.len(), &mut at);
                let k = r.len() as u64;
                for (vals, sealed) in d.values[r.clone()].iter().zip(&d.sealed[r]) {
                    for ((_, ad), s) in vals.iter().zip(sealed) {
                        bare.open(s, ad, &mut buf)?;
                        black_box(&buf);
                    }
                }
                Ok(k)
            })
        }),
    });
    let trials = run_cases(&cases, opts)?;
    let mut ratios = Vec::new();
    if path != PathArg::Owned {
        ratios.push(Ratio {
            name: "encrypt_raw_over_bare_aead",
            numerator: "encrypt_raw",
            denominator: "bare_aead_seal",
        });
        ratios.push(Ratio {
            name: "decrypt_raw_over_bare_aead",
            numerator: "decrypt_raw",
            denominator: "bare_aead_open",
        });
    }
    if path == PathArg::All {
        ratios.push(Ratio {
            name: "encrypt_owned_over_raw",
            numerator: "encrypt_owned",
            denominator: "encrypt_raw",
        });
        ratios.push(Ratio {
            name: "decrypt_owned_over_raw",
            numerator: "decrypt_owned",
            denominator: "decrypt_raw",
        });
    }
    Ok(Report {
        workload: "W2",
        title: format!(
            "W2 bulk encrypt/decrypt: {n} user documents (~250 B, 3 encrypted fields, one nested), {}",
            suite.name()
        ),
        params: json!({
            "suite": suite.name(),
            "documents": n,
            "path": format!("{path:?}").to_lowercase(),
            "seconds": opts.seconds,
            "trials": opts.trials,
            "warmup_seconds": opts.warmup,
            "documents": opts.documents,
        }),
        values_per_document: 3,
        threads: opts.threads.into(),
        rows: rows(&cases, trials),
        ratios,
    })
}

// ---- the bare AEADs ----

/// A BSON string value's own bytes: length (with the NUL) ‖ UTF-8 ‖ NUL.
fn bson_string_bytes(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 5);
    let len = u32::try_from(s.len() + 1).unwrap_or(u32::MAX);
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

/// Associated data of the same length as fieldcrypt's: header (20) ‖ u32 ‖ path [‖ u32 ‖ ns].
fn fieldcrypt_ad(path: &str, namespace: Option<&str>) -> Vec<u8> {
    let mut ad = vec![0xA5; 20];
    for part in std::iter::once(path).chain(namespace) {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        ad.extend_from_slice(&len.to_le_bytes());
        ad.extend_from_slice(part.as_bytes());
    }
    ad
}

/// One value sealed by a bare AEAD.
#[derive(Clone)]
struct Sealed {
    nonce: Vec<u8>,
    /// Ciphertext ‖ tag (CSFLE: IV ‖ C ‖ T).
    body: Vec<u8>,
}

type HmacSha512 = hmac::Hmac<sha2::Sha512>;

/// Appends `pt` sealed with an `aead` 0.6 cipher to `out`: ciphertext, then the tag.
fn seal_detached<A: AeadInOut>(
    c: &A,
    nonce: &[u8],
    ad: &[u8],
    pt: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CliError> {
    let start = out.len();
    out.extend_from_slice(pt);
    let tag = c
        .encrypt_inout_detached(sized(nonce)?, ad, (&mut out[start..]).into())
        .map_err(|_| CliError::Usage("bare AEAD failed to seal".into()))?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Opens `s` (ciphertext, then the 16-byte tag) with an `aead` 0.6 cipher into `buf`.
fn open_detached<A: AeadInOut>(
    c: &A,
    s: &Sealed,
    ad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), CliError> {
    let (ct, tag) = s
        .body
        .split_at_checked(s.body.len().wrapping_sub(16))
        .ok_or(CliError::Lib(Error::Decrypt))?;
    buf.extend_from_slice(ct);
    c.decrypt_inout_detached(sized(&s.nonce)?, ad, buf.as_mut_slice().into(), sized(tag)?)
        .map_err(|_| CliError::Lib(Error::Decrypt))
}

/// A bare AEAD with a nonce, sealing into ciphertext ‖ tag and opening from it.
trait BareAead {
    fn seal_bare(
        &self,
        nonce: &[u8],
        ad: &[u8],
        pt: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CliError>;
    fn open_bare(&self, s: &Sealed, ad: &[u8], buf: &mut Vec<u8>) -> Result<(), CliError>;
}

macro_rules! rustcrypto_bare {
    ($($t:ty),*) => {$(
        impl BareAead for $t {
            #[inline]
            fn seal_bare(
                &self,
                nonce: &[u8],
                ad: &[u8],
                pt: &[u8],
                out: &mut Vec<u8>,
            ) -> Result<(), CliError> {
                seal_detached(self, nonce, ad, pt, out)
            }

            #[inline]
            fn open_bare(&self, s: &Sealed, ad: &[u8], buf: &mut Vec<u8>) -> Result<(), CliError> {
                open_detached(self, s, ad, buf)
            }
        }
    )*};
}
rustcrypto_bare!(Aes256Gcm, ChaCha20Poly1305, XChaCha20Poly1305);

/// The bare AES-256-GCM and ChaCha20-Poly1305: the library fieldcrypt's own suites use in this
/// build (`Suite::backend`), RustCrypto's or, with feature `aead-aws-lc`, aws-lc-rs's.
#[cfg(not(feature = "aead-aws-lc"))]
type BareGcm = Aes256Gcm;
#[cfg(not(feature = "aead-aws-lc"))]
type BareChaCha = ChaCha20Poly1305;
#[cfg(feature = "aead-aws-lc")]
type BareGcm = aws_lc_rs::aead::LessSafeKey;
#[cfg(feature = "aead-aws-lc")]
type BareChaCha = aws_lc_rs::aead::LessSafeKey;

#[cfg(not(feature = "aead-aws-lc"))]
fn bare_gcm(k: &[u8]) -> BareGcm {
    Aes256Gcm::new_from_slice(k).unwrap_or_else(|_| unreachable!("a 32-byte key"))
}
#[cfg(not(feature = "aead-aws-lc"))]
fn bare_chacha(k: &[u8]) -> BareChaCha {
    ChaCha20Poly1305::new_from_slice(k).unwrap_or_else(|_| unreachable!("a 32-byte key"))
}
#[cfg(feature = "aead-aws-lc")]
fn bare_gcm(k: &[u8]) -> BareGcm {
    aws_lc_key(&aws_lc_rs::aead::AES_256_GCM, k)
}
#[cfg(feature = "aead-aws-lc")]
fn bare_chacha(k: &[u8]) -> BareChaCha {
    aws_lc_key(&aws_lc_rs::aead::CHACHA20_POLY1305, k)
}
#[cfg(feature = "aead-aws-lc")]
fn aws_lc_key(alg: &'static aws_lc_rs::aead::Algorithm, k: &[u8]) -> aws_lc_rs::aead::LessSafeKey {
    let key =
        aws_lc_rs::aead::UnboundKey::new(alg, k).unwrap_or_else(|_| unreachable!("a 32-byte key"));
    aws_lc_rs::aead::LessSafeKey::new(key)
}

/// aws-lc-rs as fieldcrypt calls it (`src/suite/aws_lc.rs`): the caller's nonce, in place,
/// the tag apart.
#[cfg(feature = "aead-aws-lc")]
impl BareAead for aws_lc_rs::aead::LessSafeKey {
    #[inline]
    fn seal_bare(
        &self,
        nonce: &[u8],
        ad: &[u8],
        pt: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CliError> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let fail = || CliError::Usage("bare AEAD failed to seal".into());
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let start = out.len();
        out.extend_from_slice(pt);
        let tag = self
            .seal_in_place_separate_tag(nonce, Aad::from(ad), &mut out[start..])
            .map_err(|_| fail())?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    #[inline]
    fn open_bare(&self, s: &Sealed, ad: &[u8], buf: &mut Vec<u8>) -> Result<(), CliError> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let (ct, tag) = s
            .body
            .split_at_checked(s.body.len().wrapping_sub(16))
            .ok_or(CliError::Lib(Error::Decrypt))?;
        let nonce = Nonce::try_assume_unique_for_key(&s.nonce)
            .map_err(|_| CliError::Lib(Error::Decrypt))?;
        buf.extend_from_slice(ct);
        self.open_in_place_separate_tag(nonce, Aad::from(ad), tag, buf.as_mut_slice())
            .map(|_| ())
            .map_err(|_| CliError::Lib(Error::Decrypt))
    }
}

/// Which library serves each fieldcrypt suite in this build, for the JSON report; the bare
/// baselines use the same one for every suite (CSFLE and QE are always RustCrypto's).
fn aead_backends() -> Value {
    let suites: serde_json::Map<String, Value> = Suite::ALL
        .into_iter()
        .map(|s| (s.name().to_owned(), json!(s.backend())))
        .collect();
    json!({ "suites": suites, "csfle_qe": "RustCrypto", "baselines": "same as fieldcrypt" })
}

/// The printed header's line naming the AEAD libraries (fieldcrypt and its baselines alike).
fn aead_backend_line() -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for s in Suite::ALL {
        match groups.iter_mut().find(|(b, _)| *b == s.backend()) {
            Some((_, names)) => names.push(s.name()),
            None => groups.push((s.backend(), vec![s.name()])),
        }
    }
    let groups: Vec<String> = groups
        .into_iter()
        .map(|(b, names)| format!("{b} for {}", names.join(", ")))
        .collect();
    format!(
        "AEAD backend (fieldcrypt and baseline): {}; CSFLE and QE: RustCrypto",
        groups.join("; ")
    )
}

/// `b` as the fixed-size array a cipher takes (nonces, IVs and tags here have their suite's
/// length by construction).
fn sized<N: ArraySize>(b: &[u8]) -> Result<&Array<u8, N>, CliError> {
    b.try_into()
        .map_err(|_| CliError::Usage("bare AEAD input of the wrong length".into()))
}

/// The cipher alone, keyed once, with no envelope, BSON or key lookup around it.
enum Bare {
    Gcm(Box<BareGcm>),
    ChaCha(Box<BareChaCha>),
    XChaCha(Box<XChaCha20Poly1305>),
    /// aes-siv's `Siv` needs `&mut self`, so one is built per call (as fieldcrypt does).
    Siv([u8; 64]),
    /// AEAD_AES_256_CBC_HMAC_SHA_512 as FLE1: keyed HMAC state and AES key schedule built once.
    Csfle(Box<(HmacSha512, aes::Aes256)>),
    /// AEAD_AES_256_CBC_HMAC_SHA_256 as QE's unindexed values (full tag, no AD length).
    Qe(Box<(HmacSha256, aes::Aes256)>),
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

const BENCH_KEY: [u8; 64] = [0x42; 64];

impl Bare {
    fn new(format: Format) -> Self {
        let k32 = (&BENCH_KEY[..32])
            .try_into()
            .unwrap_or_else(|_| unreachable!("32 of 64 bytes"));
        match format {
            Format::Csfle => {
                use aes::cipher::KeyInit as _;
                let mac = <HmacSha512 as hmac::KeyInit>::new_from_slice(&BENCH_KEY[..32])
                    .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
                Bare::Csfle(Box::new((mac, aes::Aes256::new(k32))))
            }
            Format::QeUnindexed => {
                use aes::cipher::KeyInit as _;
                let mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(&BENCH_KEY[32..])
                    .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
                Bare::Qe(Box::new((mac, aes::Aes256::new(k32))))
            }
            Format::Fieldcrypt(Suite::ChaCha20Poly1305) => {
                Bare::ChaCha(Box::new(bare_chacha(&BENCH_KEY[..32])))
            }
            Format::Fieldcrypt(Suite::XChaCha20Poly1305) => {
                Bare::XChaCha(Box::new(XChaCha20Poly1305::new(k32)))
            }
            Format::Fieldcrypt(Suite::Aes256SivDeterministic) => Bare::Siv(BENCH_KEY),
            // AES-256-GCM, and any suite added later.
            Format::Fieldcrypt(_) => Bare::Gcm(Box::new(bare_gcm(&BENCH_KEY[..32]))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            #[cfg(not(feature = "aead-aws-lc"))]
            Bare::Gcm(_) => "AES-256-GCM",
            #[cfg(not(feature = "aead-aws-lc"))]
            Bare::ChaCha(_) => "ChaCha20-Poly1305",
            #[cfg(feature = "aead-aws-lc")]
            Bare::Gcm(_) => "AES-256-GCM (aws-lc-rs)",
            #[cfg(feature = "aead-aws-lc")]
            Bare::ChaCha(_) => "ChaCha20-Poly1305 (aws-lc-rs)",
            Bare::XChaCha(_) => "XChaCha20-Poly1305",
            Bare::Siv(_) => "AES-256-SIV",
            Bare::Csfle(_) => "AES-256-CBC+HMAC-SHA-512",
            Bare::Qe(_) => "AES-256-CBC+HMAC-SHA-256",
        }
    }

    /// A nonce (or CBC IV) from a counter, and its length: for the values sealed before the
    /// clock starts, and the CBC IVs (fieldcrypt never encrypts CSFLE or QE values in W1/W2).
    fn nonce(&self, n: u64) -> ([u8; 24], usize) {
        let len = match self {
            Bare::Gcm(_) | Bare::ChaCha(_) => 12,
            Bare::XChaCha(_) => 24,
            Bare::Siv(_) => 0,
            Bare::Csfle(_) | Bare::Qe(_) => 16,
        };
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&n.to_le_bytes());
        (v, len)
    }

    fn seal(&self, n: u64, ad: &[u8], pt: &[u8]) -> Result<Sealed, CliError> {
        let mut body = Vec::new();
        self.seal_into(n, ad, pt, &mut body)?;
        let (nonce, len) = self.nonce(n);
        Ok(Sealed {
            nonce: nonce[..len].to_vec(),
            body,
        })
    }

    /// Seals `pt` into `out` (cleared first) under the counter nonce `n`.
    fn seal_into(&self, n: u64, ad: &[u8], pt: &[u8], out: &mut Vec<u8>) -> Result<(), CliError> {
        let (nonce_buf, _) = self.nonce(n);
        self.seal_with(&nonce_buf, ad, pt, out)
    }

    /// Seals `pt` into `out` (cleared first) under a random nonce drawn as fieldcrypt draws
    /// its own (`rand::thread_rng`, per value): part of the work every random-nonce suite
    /// must do, so the W2 seal baseline does it too.
    fn seal_random_into(&self, ad: &[u8], pt: &[u8], out: &mut Vec<u8>) -> Result<(), CliError> {
        use rand::RngCore as _;
        let mut nonce = [0u8; 24];
        let (_, len) = self.nonce(0);
        rand::thread_rng().fill_bytes(&mut nonce[..len]);
        self.seal_with(&nonce, ad, pt, out)
    }

    fn seal_with(
        &self,
        nonce_buf: &[u8; 24],
        ad: &[u8],
        pt: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CliError> {
        let fail = |_| CliError::Usage("bare AEAD failed to seal".into());
        out.clear();
        match self {
            Bare::Gcm(c) => c.seal_bare(&nonce_buf[..12], ad, pt, out)?,
            Bare::ChaCha(c) => c.seal_bare(&nonce_buf[..12], ad, pt, out)?,
            Bare::XChaCha(c) => c.seal_bare(&nonce_buf[..], ad, pt, out)?,
            Bare::Siv(k) => {
                out.extend_from_slice(&[0; 16]);
                out.extend_from_slice(pt);
                let siv = Aes256Siv::new(k.into())
                    .encrypt_inout_detached([ad], (&mut out[16..]).into())
                    .map_err(fail)?;
                out[..16].copy_from_slice(&siv);
            }
            Bare::Csfle(c) => {
                use hmac::Mac;
                let (mac, aes) = &**c;
                cbc_seal(aes, &nonce_buf[..16], pt, out)?;
                let mut m = mac.clone();
                m.update(ad);
                m.update(&out[..]);
                m.update(&(ad.len() as u64 * 8).to_be_bytes());
                let tag = m.finalize().into_bytes();
                out.extend_from_slice(&tag[..32]);
            }
            Bare::Qe(c) => {
                use hmac::Mac;
                let (mac, aes) = &**c;
                cbc_seal(aes, &nonce_buf[..16], pt, out)?;
                let mut m = mac.clone();
                m.update(ad);
                m.update(&out[..]);
                out.extend_from_slice(&m.finalize().into_bytes());
            }
        }
        Ok(())
    }

    /// Authenticates and decrypts `s` into `buf` (cleared first).
    fn open(&self, s: &Sealed, ad: &[u8], buf: &mut Vec<u8>) -> Result<(), CliError> {
        buf.clear();
        let decrypt = |_| CliError::Lib(Error::Decrypt);
        match self {
            Bare::Gcm(c) => c.open_bare(s, ad, buf),
            Bare::ChaCha(c) => c.open_bare(s, ad, buf),
            Bare::XChaCha(c) => c.open_bare(s, ad, buf),
            Bare::Siv(k) => {
                let (siv, ct) = s
                    .body
                    .split_at_checked(16)
                    .ok_or(CliError::Lib(Error::Decrypt))?;
                buf.extend_from_slice(ct);
                Aes256Siv::new(k.into())
                    .decrypt_inout_detached([ad], buf.as_mut_slice().into(), sized(siv)?)
                    .map_err(decrypt)
            }
            Bare::Csfle(c) => {
                use hmac::Mac;
                let (mac, aes) = &**c;
                let (signed, tag) = s
                    .body
                    .split_at_checked(s.body.len().wrapping_sub(32))
                    .ok_or(CliError::Lib(Error::Decrypt))?;
                let mut m = mac.clone();
                m.update(ad);
                m.update(signed);
                m.update(&(ad.len() as u64 * 8).to_be_bytes());
                // Constant-time comparison of the truncated tag.
                m.verify_truncated_left(tag).map_err(|_| Error::Decrypt)?;
                cbc_open(aes, signed, buf)
            }
            Bare::Qe(c) => {
                use hmac::Mac;
                let (mac, aes) = &**c;
                let (signed, tag) = s
                    .body
                    .split_at_checked(s.body.len().wrapping_sub(32))
                    .ok_or(CliError::Lib(Error::Decrypt))?;
                let mut m = mac.clone();
                m.update(ad);
                m.update(signed);
                m.verify_slice(tag).map_err(|_| Error::Decrypt)?;
                cbc_open(aes, signed, buf)
            }
        }
    }
}

/// `IV || AES-256-CBC(PKCS#7(pt))` into `out`: the cipher half of the two CBC + HMAC baselines.
fn cbc_seal(aes: &aes::Aes256, iv: &[u8], pt: &[u8], out: &mut Vec<u8>) -> Result<(), CliError> {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::{BlockModeEncrypt, InnerIvInit};
    out.extend_from_slice(iv);
    out.extend_from_slice(pt);
    let padded = (pt.len() / 16 + 1) * 16;
    out.resize(16 + padded, 0);
    cbc::Encryptor::<&aes::Aes256>::inner_iv_init(aes, sized(iv)?)
        .encrypt_padded::<Pkcs7>(&mut out[16..], pt.len())
        .map_err(|_| CliError::Usage("CBC padding".into()))?;
    Ok(())
}

/// Decrypts the authenticated `IV || C` of a CBC + HMAC baseline into `buf`.
fn cbc_open(aes: &aes::Aes256, signed: &[u8], buf: &mut Vec<u8>) -> Result<(), CliError> {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::{BlockModeDecrypt, InnerIvInit};
    let (iv, ct) = signed
        .split_at_checked(16)
        .ok_or(CliError::Lib(Error::Decrypt))?;
    buf.extend_from_slice(ct);
    let len = cbc::Decryptor::<&aes::Aes256>::inner_iv_init(aes, sized(iv)?)
        .decrypt_padded::<Pkcs7>(buf)
        .map_err(|_| Error::Decrypt)?
        .len();
    buf.truncate(len);
    Ok(())
}
