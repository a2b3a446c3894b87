//! The CLI's errors: the library's (wrapped as they are) and the CLI's own, each printed as
//! one line by `report::error`. None carries a value, a key or a connection string.

use std::fmt;
use std::path::PathBuf;

/// A failed command.
#[derive(Debug)]
pub(crate) enum CliError {
    /// From the library, the driver or the operating system.
    Lib(fieldcrypt::Error),
    /// A file that cannot be read, written or used; `reason` says why.
    File {
        /// The file, as given.
        path: PathBuf,
        /// Why (an I/O error, or what is wrong with it).
        reason: String,
    },
    /// A line of the input that cannot be used; `reason` never quotes it.
    Input {
        /// The input line, from 1.
        line: usize,
        /// Why.
        reason: String,
    },
    /// Refused to protect data or keys (a spent nonce budget, a destroyed key, a password on
    /// the command line, an output file that is the input…).
    Refused(String),
    /// Missing or conflicting options and settings, or any other failure the CLI describes
    /// itself.
    Usage(String),
}

/// The CLI's result type.
pub(crate) type Result<T, E = CliError> = std::result::Result<T, E>;

impl CliError {
    /// An error about `path`.
    pub(crate) fn file(path: &std::path::Path, reason: impl fmt::Display) -> Self {
        CliError::File {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }

    /// An error about input line `line`.
    pub(crate) fn input(line: usize, reason: impl Into<String>) -> Self {
        CliError::Input {
            line,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The library's refusals of arguments and schema files say what is wrong without
            // their "invalid configuration" label.
            CliError::Lib(fieldcrypt::Error::InvalidArgument(a)) => write!(f, "{a}"),
            CliError::Lib(fieldcrypt::Error::InvalidCommand(c)) => write!(f, "{c}"),
            CliError::Lib(fieldcrypt::Error::SchemaSyntax { format, message }) => {
                write!(f, "schema {format}: {message}")
            }
            CliError::Lib(e) => write!(f, "{e}"),
            CliError::File { path, reason } => write!(f, "{}: {reason}", path.display()),
            CliError::Input { line, reason } => write!(f, "line {line}: {reason}"),
            CliError::Refused(m) | CliError::Usage(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CliError {}

impl From<fieldcrypt::Error> for CliError {
    fn from(e: fieldcrypt::Error) -> Self {
        CliError::Lib(e)
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Lib(fieldcrypt::Error::Io(e))
    }
}

impl From<mongodb::error::Error> for CliError {
    fn from(e: mongodb::error::Error) -> Self {
        CliError::Lib(e.into())
    }
}

impl From<bson::raw::Error> for CliError {
    fn from(e: bson::raw::Error) -> Self {
        CliError::Lib(e.into())
    }
}
