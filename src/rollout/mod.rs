//! The rolling update: its pure core (preflight, plan, engine, automatic decisions) and
//! the runtime that carries it out on the leader.
//!
//! Architecture invariant: `preflight`, `plan`, `engine`, `analysis` and `auto` do no I/O. They take
//! plain data (a survey the leader gathered, the replicated `Deployment`, an event, the
//! time) and return plain data (a report, a plan, actions), and are tested with tables and
//! proptest, without processes. The runtime modules (`update`, `drive`, `operate`,
//! `watch`) do the I/O, and reach the cluster only through the [`Cluster`] trait, which
//! `node` implements: they never see Raft, gRPC or the node itself.
//!
//! - [`preflight`]: may a rollout start? Every check, with the node and figure that failed.
//! - [`plan`](mod@plan): learners in batches, voter followers one at a time, leader last.
//! - [`engine`]: the state machine that drives a deployment: events in, actions out.
//! - [`analysis`]: metric gates: the spec, Prometheus's answer, verdicts, decisions.
//! - [`analyze`](mod@analyze): evaluate the active deployment's metric gates on the leader.
//! - [`auto`]: what a leader starts by itself (a new watched build, a node to catch up).
//! - [`cluster`]: the seam: what the runtime may ask of the node it runs on.
//! - [`update`](mod@update): survey, preflight, plan and begin a deployment.
//! - [`drive`](mod@drive): execute the engine's actions on the leader, feed back events.
//! - [`operate`](mod@operate): operators' commands and the rollout view.
//! - [`watch`]: the automatic-rollout loop (watched directory, catch-ups).

pub mod analysis;
pub mod analyze;
pub mod auto;
pub mod cluster;
pub mod drive;
pub mod engine;
pub mod operate;
pub mod plan;
pub mod preflight;
pub mod update;
pub mod watch;

pub use cluster::{Cluster, DiskNeeds, Issuer, MemberView, Notes, RaftView};
pub use engine::{Action, AgentOp, Engine, Event, Health, Now, OpKind, Summary};
pub use plan::{plan, Start};
pub use preflight::{preflight, Options, Survey};
pub use watch::{AutoConfig, DEFAULT_SOAK_MS};

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
