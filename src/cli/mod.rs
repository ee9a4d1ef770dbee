//! Command-line interface. (Minimal for now: only the `dist` commands are wired in.)

pub mod dist;
