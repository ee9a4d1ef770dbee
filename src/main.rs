//! The `cluster` binary.
fn main() {}
