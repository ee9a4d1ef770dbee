//! The services' requests, replies and errors as domain types: the one wire and `--json` schema.
//!
//! The node implements these, `rpc` carries them over gRPC, the CLI prints them. Keeping
//! them free of prost types lets `--json` output be a documented, stable schema.

use serde::{Deserialize, Serialize};

pub mod agent;
pub mod members;
pub mod rollout;

pub use agent::{PrepareOutcome, ReleasesView};
pub use members::{Member, MemberRemoved, MembersView};

pub use rollout::{
    AutoStatus, Check, LeaderNotes, Operated, Operation, Plan, PlannedNode, Report, RolloutView,
    UpdateOptions, UpdateOutcome,
};

/// What went wrong, in terms a caller can act on. `rpc` maps these to gRPC codes and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Cannot reach the node, no leader yet, or the node is shutting down: retry later.
    Unavailable,
    /// The request itself is wrong: fix it before retrying.
    InvalidArgument,
    NotFound,
    /// The cluster is not in a state that allows the request (e.g. target not a voter).
    FailedPrecondition,
    /// The caller proved who it is and may not do this, or the node will not run what was
    /// asked (a release not signed by a key it trusts). Retrying cannot help.
    PermissionDenied,
    AlreadyExists,
    DeadlineExceeded,
    /// The caller did not prove who it is: no certificate, or one from another CA.
    Unauthenticated,
    Internal,
}

/// An error a Control call returns. `message` names the thing and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

/// One member as `cluster status` shows it. Field names are the `--json` schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    pub addr: String,
    /// "voter" or "learner".
    pub role: String,
    /// "leader", "follower", "candidate", "learner", "shutdown" or "unreachable".
    pub state: String,
    /// Build hash of the binary the node runs ("dev" outside a release); "" until it reports.
    pub build_hash: String,
    /// Milliseconds since the node last acknowledged the leader (leader's monotonic clock).
    pub last_ack_ms: Option<u64>,
    /// Highest log index the leader knows the node holds.
    pub matched_index: Option<u64>,
    /// Highest log index the node has applied, as it reports itself.
    pub applied_index: Option<u64>,
    pub protocol: u32,
    pub boot_id: String,
    pub started_at_ms: u64,
    /// Why the node's own health check (`--health-command`) fails, as the node itself
    /// reports; `None` when it passes, when none is set, or for another node's view.
    #[serde(default)]
    pub health_problem: Option<String>,
    /// How the node is supervised: "systemd", "supervise" or "none" ("" if unreported).
    #[serde(default)]
    pub supervision: String,
    /// The last time its boot guard put the previous release back with no leader
    /// involved, until the node is next upgraded.
    #[serde(default)]
    pub last_auto_restore: Option<crate::state::GuardRestore>,
    /// The node runs with `--insecure` (plaintext, nobody authenticated).
    #[serde(default)]
    pub insecure: bool,
    /// The operator's services the node runs, as it reports itself (empty for another
    /// node's view, or a node without services).
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// The operator's labels for the node (node.toml `labels`), as it reported them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One of the operator's services on one node. Field names are the `--json` schema.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    /// The ingress the node holds for it.
    pub listen: String,
    /// "starting", "ready", "switched" (a new instance serves, the old one drains),
    /// "rolling_back" (a candidate failed, the running instance keeps serving),
    /// "failed" (none serves) or "stopping".
    pub state: String,
    /// The instance in front of the ingress.
    pub active: Option<ServiceInstance>,
    /// A new instance being checked before it takes over.
    pub candidate: Option<ServiceInstance>,
    /// Failed checks (or exits) in a row.
    pub failure_streak: u32,
    /// Why the service makes the node unhealthy, if it does.
    pub problem: Option<String>,
    /// Why the last candidate was not switched to, and when (unix ms).
    pub last_rollback: Option<String>,
    pub last_rollback_at_ms: Option<u64>,
}

/// One running instance of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// The release it runs (build hash).
    pub release: String,
    pub pid: u32,
    /// When it started (unix ms).
    pub since_ms: u64,
}

/// The cluster as one member sees it (the leader's view unless the leader is unreachable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<u64>,
    pub term: u64,
    pub nodes: Vec<NodeStatus>,
    /// The node whose view this is.
    pub answered_by: u64,
    pub cluster_id: String,
    pub commit_index: Option<u64>,
    pub last_log_index: Option<u64>,
}

/// A committed write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub response: crate::state::Response,
    pub log_index: u64,
}

/// A node asking to become a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub id: u64,
    pub addr: String,
    /// The cluster the joining node already belongs to, "" when it is new.
    pub cluster_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinAccepted {
    pub cluster_id: String,
    pub leader: u64,
    /// Admitted as a learner only: the cluster already has the leader's `--max-voters`
    /// voters (`false` from a leader that predates the setting: a voter).
    pub learner: bool,
    /// Voters after the join.
    pub voters: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferDone {
    pub leader: u64,
    pub term: u64,
    pub elapsed_ms: u64,
}
