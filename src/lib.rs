//! `cluster`: a Raft-replicated rolling-update orchestrator.
//!
//! - [`cli`]: command-line definitions and the commands behind them.
//! - [`dist`]: release content: manifest and build hash, directory scan, version.json.

pub mod cli;
pub mod dist;
