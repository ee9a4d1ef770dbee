//! The one seam between the rollout runtime and the rest of a node: what a runtime may
//! ask of the cluster it drives (propose, read the replicated state and the leader's
//! metrics, hand leadership over, reach a node's agent).
//!
//! `node` implements [`Cluster`] over Raft, the state machine and gRPC; the runtime's
//! unit tests implement it over an in-memory state. Nothing in `rollout` sees a
//! `NodeHandle`, a Raft handle or an RPC client.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{ApiError, LeaderNotes, NodeStatus};
use crate::release::{Manifest, TrustedKeys};
use crate::rollout::engine::AgentOp;
use crate::state::{Command, Response, Role, State};

/// One member as the leader's Raft metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberView {
    pub id: u64,
    pub addr: String,
    pub role: Role,
    /// Age of its last acknowledgement on the leader's monotonic clock; `None`: never,
    /// or this node does not lead.
    pub last_ack_ms: Option<u64>,
    /// Highest log index the leader knows it holds.
    pub matched_index: Option<u64>,
}

/// This node's Raft view at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftView {
    pub term: u64,
    /// This node leads in `term`.
    pub leading: bool,
    pub last_log_index: u64,
    /// Highest index a quorum holds, as this node knows it.
    pub commit_index: u64,
    /// Every voter and learner, this node included.
    pub members: Vec<MemberView>,
}

/// Who issued an agent operation: the rollout generation and the request's id. An agent
/// refuses anything older than what it already ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Issuer {
    pub generation: u64,
    pub term: u64,
    pub seq: u64,
}

/// What the rollout runtime needs from the node it runs on.
///
/// `target` arguments are member ids; the implementation decides whether that is this
/// node (call its own agent) or another one (over the network, at `addr`).
pub trait Cluster: Send + Sync + 'static {
    /// This node's id.
    fn id(&self) -> u64;
    /// The address peers reach this node at.
    fn addr(&self) -> String;
    /// The build this node runs.
    fn build_hash(&self) -> String;
    /// How many times this node's process has started, counting this one; persisted,
    /// so it grows across restarts (see [`super::engine::Engine::for_incarnation`]).
    fn incarnation(&self) -> u64;
    /// The configured heartbeat period, in ms.
    fn heartbeat_ms(&self) -> u64;
    /// The keys a release must be signed with for this node to roll it out (empty: any).
    fn release_keys(&self) -> Arc<TrustedKeys>;
    /// Term, leadership, log indexes and members, from this node's metrics.
    fn raft_view(&self) -> RaftView;
    /// Reads the replicated state as this node has applied it.
    fn read<R>(&self, read: impl FnOnce(&State) -> R) -> R;

    /// Confirms this node still leads with a quorum round trip.
    fn confirm_leadership(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Replicates `command` through the leader; returns once it is applied here.
    fn propose(&self, command: Command) -> impl Future<Output = Result<Response, ApiError>> + Send;
    /// Hands leadership to voter `to`; returns once it leads.
    fn transfer_leader(&self, to: u64) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// Member `target`'s own status row, as it reports itself (asked within `timeout`).
    fn node_status(
        &self,
        target: u64,
        addr: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<NodeStatus, ApiError>> + Send;
    /// Free bytes on `target`'s data dir, and the bytes it must fetch for `manifest`.
    fn disk_needs(
        &self,
        target: u64,
        addr: &str,
        manifest: &Manifest,
    ) -> impl Future<Output = Result<DiskNeeds, ApiError>> + Send;
    /// Has `target` materialize `manifest`'s release, fetching what it lacks from `peers`.
    fn prepare(
        &self,
        target: u64,
        addr: &str,
        manifest: Arc<Manifest>,
        peers: Vec<String>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Carries out one fenced release operation on `target` (never `Prepare`).
    fn mutate(
        &self,
        target: u64,
        addr: &str,
        issuer: Issuer,
        op: AgentOp,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;

    /// This node holds release `hash`, complete.
    fn holds_release(&self, hash: &str) -> impl Future<Output = bool> + Send;
    /// Starts the held release `hash`'s binary with `--version` (time-limited) and
    /// returns the line it printed, or why it did not start.
    fn version_of(&self, hash: &str) -> impl Future<Output = Result<String, String>> + Send;
    /// Whether release `hash` (held here) ships the `bin/cluster` this node runs: then
    /// switching to it needs no restart (and, for the leader, no hand-off).
    fn runs_binary_of(&self, hash: &str) -> impl Future<Output = bool> + Send;
    /// The services release `hash` (held here) defines, each named, with a note when
    /// its cutover cannot be zero-downtime; or why its `service.toml` cannot run.
    fn services_of(&self, hash: &str) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// The manifest of release `hash` on this node.
    fn release_manifest(&self, hash: &str)
        -> impl Future<Output = Result<Manifest, String>> + Send;
    /// Installs the dist at `dir` as a release on this node; its build hash.
    fn install_dist(&self, dir: PathBuf) -> impl Future<Output = Result<String, String>> + Send;
    /// Restarts this node gracefully (so that another voter leads).
    fn request_restart(&self);
}

/// Disk figures of one member for a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskNeeds {
    pub free_bytes: u64,
    /// Chunk bytes no release on the node holds.
    pub needed_bytes: u64,
}

/// What only the leader knows about rollouts, shared between the loops that write it
/// and the status view that reads it.
#[derive(Clone, Default)]
pub struct Notes(Arc<Mutex<LeaderNotes>>);

impl Notes {
    /// A copy of the notes, for status.
    pub fn get(&self) -> LeaderNotes {
        self.0.lock().expect("notes lock").clone()
    }

    /// Changes the notes in place.
    pub fn update<R>(&self, change: impl FnOnce(&mut LeaderNotes) -> R) -> R {
        change(&mut self.0.lock().expect("notes lock"))
    }
}
