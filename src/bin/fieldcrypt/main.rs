//! The `fieldcrypt` command-line tool.
fn main() {}
