//! The `cluster` binary: parse, run, and map the outcome to an exit code. Nothing else.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cluster::cli::run() {
        Ok(code) => code,
        Err(error) => cluster::cli::fail(error),
    }
}
