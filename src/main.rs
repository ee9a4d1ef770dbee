//! The `cluster` binary: parse, run, and map the outcome to an exit code. Nothing else.

use std::process::ExitCode;

fn main() -> ExitCode {
    match cluster::cli::run() {
        Ok(code) => code,
        // Whoever read our output stopped reading (`| head`): no message, and the status
        // a shell reports for a process ended by SIGPIPE.
        Err(error) if cluster::cli::is_broken_pipe(&error) => ExitCode::from(141),
        Err(error) => {
            // Our error messages already name their cause; print a cause only when it adds words.
            let mut message = error.to_string();
            for cause in error.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message = format!("{message}: {cause}");
                }
            }
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
