//! `cluster`: a Raft-replicated rolling-update orchestrator.
//!
//! - [`dist`]: release content: manifest and build hash, directory scan, version.json.

pub mod dist;
