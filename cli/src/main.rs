//! The `fieldcrypt` command-line tool: keys, offline encryption and decryption of Extended
//! JSON, import and export, re-encryption and migration of live collections, audits, and
//! collection validators. See `docs/CLI.md`.
//!
//! One file per subcommand. Shared: `error.rs` (the CLI's errors), `common.rs` (schemas,
//! namespaces, per-document errors), `keysource.rs` (where keys come from), `jsonl.rs`
//! (Extended JSON lines) and `report.rs` (progress, summaries, exit codes). Subcommand files
//! import only from these.

mod audit;
mod bench;
mod cleanup;
mod common;
mod decrypt;
mod encrypt;
mod error;
mod export;
mod import;
mod jsonl;
mod keys;
mod keysource;
mod reencrypt;
mod report;
mod uri;
mod validator;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::report::Exit;

/// Client-side field-level encryption for MongoDB.
///
/// Exit codes: 0 success; 1 error; 2 invalid arguments; 3 audit findings; 4 some documents
/// could not be processed; 5 refused (a key still in use); 130 interrupted (resume with
/// --resume).
#[derive(Parser, Debug)]
#[command(name = "fieldcrypt", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log what fieldcrypt does (key loads, rotations) to stderr. Never logs values or keys.
    #[arg(long, short, global = true)]
    verbose: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage data keys: create, list, rotate, disable, enable, destroy, rewrap.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Encrypt Extended JSON documents (one per line) per a schema, offline.
    Encrypt(encrypt::EncryptArgs),
    /// Decrypt Extended JSON documents (one per line): fieldcrypt envelopes and MongoDB CSFLE
    /// values alike, offline.
    Decrypt(decrypt::DecryptArgs),
    /// Insert Extended JSON documents into a collection, encrypting per the schema.
    Import(import::ImportArgs),
    /// Write a collection's documents as Extended JSON lines (ciphertext, or --decrypt).
    Export(export::ExportArgs),
    /// Re-encrypt every value not under its alias's current primary key (key rotation).
    Reencrypt(reencrypt::ReencryptArgs),
    /// Encrypt plaintext fields, and re-encrypt MongoDB CSFLE fields, per the schema.
    Migrate(reencrypt::MigrateArgs),
    /// Check what is really stored: leaks, stale or unusable keys, nonce limits, tokens.
    Audit(audit::AuditArgs),
    /// Print the `$jsonSchema` validator for a schema, or apply it to a collection.
    Validator(validator::ValidatorArgs),
    /// Run the benchmark workloads (docs/BENCHMARKS.md) on this machine.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = keysource::refuse_password_in_args() {
        report::error(&e);
        return Exit::Error.code();
    }
    if cli.verbose {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_writer(std::io::stderr)
            .with_target(false)
            .init();
    }
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args).map(|()| Exit::Ok),
        other => run_async(other),
    };
    match result {
        Ok(exit) => exit.code(),
        // The reader of stdout went away (`| head`): not an error of ours.
        Err(error::CliError::Lib(fieldcrypt::Error::Io(e)))
            if e.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Exit::Ok.code()
        }
        Err(e) => {
            report::error(&e);
            Exit::Error.code()
        }
    }
}

fn run_async(command: Command) -> error::Result<Exit> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        report::handle_interrupts()?;
        let result = match command {
            Command::Keys(c) => keys::run(c).await,
            Command::Encrypt(a) => encrypt::run(a).await,
            Command::Decrypt(a) => decrypt::run(a).await,
            Command::Import(a) => import::run(a).await,
            Command::Export(a) => export::run(a).await,
            Command::Reencrypt(a) => reencrypt::run_reencrypt(a).await,
            Command::Migrate(a) => reencrypt::run_migrate(a).await,
            Command::Audit(a) => audit::run(a).await,
            Command::Validator(a) => validator::run(a).await,
            Command::Bench(_) => Ok(Exit::Ok), // handled before the runtime starts
        };
        keysource::shutdown_clients().await;
        result
    })
}
