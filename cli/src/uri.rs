//! A connection string as an argument: it may hold a password, so its `Debug` prints none of
//! it (the argument structs derive `Debug` for clap). A leaf module.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// A MongoDB connection string given as an option or environment variable.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ConnectionString(String);

impl ConnectionString {
    /// The connection string itself, to connect with. Never print it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for ConnectionString {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(ConnectionString(s.to_owned()))
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnectionString([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_no_part_of_the_uri() {
        let uri: ConnectionString = "mongodb://app:s3cret-pw@db.example:27017/?authSource=admin"
            .parse()
            .unwrap_or_else(|e: Infallible| match e {});
        let shown = format!("{uri:?}");
        assert!(
            !shown.contains("s3cret-pw") && !shown.contains("db.example"),
            "{shown}"
        );
        assert_eq!(
            uri.expose(),
            "mongodb://app:s3cret-pw@db.example:27017/?authSource=admin"
        );
    }
}
