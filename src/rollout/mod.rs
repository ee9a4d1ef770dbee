//! The rolling update's decisions: preflight, plan, and the engine that drives a rollout.
//!
//! Architecture invariant: `preflight`, `plan`, `engine` and `auto` do no I/O. They take plain
//! data (a snapshot the leader gathered, the replicated `Deployment`, an event, the time)
//! and return plain data (a report, a plan, actions). A runtime, outside these modules,
//! gathers snapshots, proposes commands to Raft, calls agents and feeds results back as
//! events. Everything here is tested with tables and proptest, without processes.
//!
//! - [`preflight`]: may a rollout start? Every check, with the node and figure that failed.
//! - [`plan`](mod@plan): learners in batches, voter followers one at a time, leader last.
//! - [`engine`]: the state machine that drives a deployment: events in, actions out.
//! - [`auto`]: what a leader starts by itself (a new watched build, a node to catch up).
//! - [`runtime`]: the I/O around them (the one module here that does I/O): gathers the
//!   snapshot, starts deployments, executes the engine's actions on the leader, and runs
//!   the automatic-rollout loop.

pub mod auto;
pub mod engine;
pub mod plan;
pub mod preflight;
pub mod runtime;

pub use engine::{Action, AgentOp, Engine, Event, Health, Now, OpKind, Summary};
pub use plan::{plan, Plan, PlannedNode, Start};
pub use preflight::{preflight, Check, Options, Report, Survey};

use crate::state::deployment::short_hash;

/// Why a rollout cannot be set up from what the caller supplied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    #[error(
        "every node already runs build {}: nothing to update",
        short_hash(target_hash)
    )]
    NothingToUpdate { target_hash: String },
    #[error(
        "the manifest is build {} but the plan targets {}: scan the dist again and re-plan",
        short_hash(manifest),
        short_hash(planned)
    )]
    ManifestMismatch { planned: String, manifest: String },
    #[error("invalid rollout strategy: {reason}")]
    InvalidStrategy { reason: String },
}

/// `bytes` for people: "512 B", "12.0 KiB", "48.0 MiB", "1.5 GiB".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_like_people_write_them() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (48 << 20, "48.0 MiB"),
            (3 << 29, "1.5 GiB"),
            (5 << 40, "5.0 TiB"),
            (u64::MAX, "16777216.0 TiB"),
        ];
        for (bytes, text) in cases {
            assert_eq!(format_bytes(bytes), text);
        }
    }
}
