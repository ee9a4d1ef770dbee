//! An error with its causes on one line: how an error reaches a person, a log line or a
//! wire message.
//!
//! Error types here keep their causes as [`source`](std::error::Error::source) and leave
//! them out of their own message, so a cause is printed once, by whoever prints the error.
//! [`Chain`] does that printing; `main` does the same for `anyhow` errors.

use std::error::Error;
use std::fmt;

/// Displays an error followed by each of its causes, separated by ": ". A cause whose text
/// the line already contains adds nothing and is left out.
pub struct Chain<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let text = error.to_string();
            if !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = error.source();
        }
        formatter.write_str(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot install release r1")]
        Install(#[source] Inner),
        #[error("{0}: already said")]
        Repeating(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read /data/x")]
    struct Inner(#[source] std::io::Error);

    fn inner() -> Inner {
        Inner(std::io::Error::other("disk on fire"))
    }

    #[test]
    fn every_cause_once_in_order() {
        assert_eq!(
            Chain(&Outer::Install(inner())).to_string(),
            "cannot install release r1: cannot read /data/x: disk on fire"
        );
        assert_eq!(
            Chain(&Outer::Repeating(inner())).to_string(),
            "cannot read /data/x: already said: disk on fire"
        );
        assert_eq!(Chain(&std::io::Error::other("alone")).to_string(), "alone");
    }
}
