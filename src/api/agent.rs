//! The Agent service's domain types: what a node reports about its releases, what
//! materializing one cost, and the errors the service answers with.
//!
//! Plain data, free of prost and tonic: `agent` produces them, `rpc` carries them (and
//! gives every error variant its gRPC code in `rpc::status`), the CLI prints them.

use serde::{Deserialize, Serialize};

use crate::fs::IoError;
use crate::release::{SignatureError, StoreError, SyncError};

/// A change to a node's releases, issued by a rollout (see `Fence`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// `previous` -> what `current` points at: the backup, pinned until commit.
    PinPrevious,
    /// `current` -> releases/<hash>.
    Activate(String),
    /// `current` -> releases/<hash> (the node's build before the rollout), then a restart
    /// if the running build is not that one. Repeating it is harmless.
    Restore(String),
    /// Release <hash> is good on this node. `previous` stays pinned: a revert of the whole
    /// rollout may still need it.
    Commit(String),
    /// Exit gracefully so the supervisor starts the `current` release.
    Restart,
}

/// Who may mutate: the rollout generation, and the leader term and request sequence
/// that issued the request (requests of one leader are numbered in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Fence {
    pub generation: u64,
    pub term: u64,
    pub seq: u64,
}

/// The releases a node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesView {
    pub hashes: Vec<String>,
    pub current: Option<String>,
    pub previous: Option<String>,
    /// Free bytes on the node's data dir filesystem.
    pub free_bytes: u64,
    /// The node takes a prepare by build hash and fetches the manifest itself (false
    /// from nodes of an older build).
    #[serde(default)]
    pub fetches_manifests: bool,
}

/// What materializing a release cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareOutcome {
    pub hash: String,
    /// Chunk bytes that crossed the network.
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    /// Bytes of the release taken from content the node already held.
    pub reused_bytes: u64,
    pub elapsed_ms: u64,
    /// Bytes of manifest (whole, or a delta against a release held) the node fetched; 0
    /// when it was sent the manifest or held it.
    #[serde(default)]
    pub manifest_bytes: u64,
}

/// Why an agent refuses a fenced mutation: it is older than what the agent already obeys.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceRefusal {
    /// Issued by the leader of a term older than the one this node is in.
    #[error("issued in term {term} but this node is in term {node_term}: a newer leader exists")]
    StaleTerm {
        /// The term the request carries.
        term: u64,
        /// This node's current Raft term.
        node_term: u64,
    },
    /// For a rollout generation older than one this node already followed.
    #[error("rollout generation {generation} is older than generation {accepted} this node already follows")]
    StaleGeneration {
        /// The generation the request carries.
        generation: u64,
        /// The newest generation this node has accepted.
        accepted: u64,
    },
    /// Of the current generation, but older than a request this node already ran.
    #[error("request {term}/{seq} is older than request {accepted_term}/{accepted_seq} this node already ran")]
    StaleSequence {
        /// The term of the request.
        term: u64,
        /// Its sequence number within the term.
        seq: u64,
        /// The term of the newest request run.
        accepted_term: u64,
        /// Its sequence number.
        accepted_seq: u64,
    },
}

/// The persisted fence cannot be used: the agent refuses every mutation until it can.
/// (Starting with the default fence instead would let an older leader act; refusing to
/// start the node would make its supervisor and boot guard treat the release as broken.)
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot read {}: {source}: check that this user may read the data dir", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is corrupt ({source}): this node refuses rollout operations until it is fixed; \
         remove the file to obey the current leader again (older terms stay refused)",
        path.display()
    )]
    Corrupt {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the Agent service can answer with instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A mutation fenced out: a newer leader or rollout has already spoken to this node.
    #[error("refused {mutation}")]
    Refused {
        /// The mutation, as the agent names it (e.g. `Activate("ab12...")`).
        mutation: String,
        /// Why it is stale.
        #[source]
        refusal: FenceRefusal,
    },

    /// `commit` of a release other than the one the node runs.
    #[error("refused to commit release {hash}: this node runs {running}; a node commits only the release it runs, so restart it into {hash} first")]
    CommitNotRunning {
        /// The release the commit names.
        hash: String,
        /// The build hash of the running binary.
        running: String,
    },

    /// The fence this node recorded cannot be read, so it cannot tell what is stale.
    #[error("refused {mutation}")]
    FenceUnreadable {
        /// The mutation, as the agent names it.
        mutation: String,
        /// Why the record is unusable and how to fix it.
        #[source]
        source: FenceError,
    },

    /// The fence of an accepted mutation could not be persisted, so it was not applied.
    #[error("cannot record the rollout fence; the mutation was not applied")]
    FenceNotRecorded(#[source] IoError),

    /// The boot guard's record could not be written before `current` changed.
    #[error("cannot arm the boot guard; the mutation was not applied")]
    GuardNotRecorded(#[source] IoError),

    /// The boot guard could not be armed or disarmed around a change of `current`.
    #[error("cannot update the boot guard")]
    Guard(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// The release store failed (unknown release, chunk not held, damage, disk).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// Getting a release's content in failed (bad chunks, peers, verification).
    #[error(transparent)]
    Sync(#[from] SyncError),

    /// The release is not signed by a key this node trusts: not installed, not activated.
    #[error(transparent)]
    Signature(#[from] SignatureError),

    /// A manifest sent as a delta against a release this node holds does not rebuild to
    /// the build hash it was sent for.
    #[error("the manifest sent as a delta against release {base} does not rebuild to release {hash}: {problem}")]
    BadDelta {
        base: String,
        hash: String,
        problem: String,
    },

    /// A manifest in a request is not the JSON a scan produces.
    #[error("the manifest sent cannot be decoded: send a manifest as `cluster dist` scans it")]
    BadManifest(#[source] serde_json::Error),

    /// A mutation this node does not know (the caller runs a newer protocol).
    #[error("mutation {op} is unknown to this node: it runs an older build than the caller; finish upgrading it first")]
    UnknownMutation {
        /// The operation number received.
        op: i32,
    },

    /// An upload whose first part carries no manifest.
    #[error("an upload starts with a part carrying the manifest: send the manifest first")]
    UploadWithoutManifest,

    /// An upload part after the first that carries no chunk.
    #[error("upload part without a chunk: every part after the first carries one chunk")]
    UploadPartWithoutChunk,

    /// The client's upload stream failed before it ended.
    #[error("the upload stream broke before it ended: upload again")]
    UploadBroke(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// An upload that ended with chunks of the release still missing.
    #[error("upload ended with {missing} chunks of the release still missing: send every chunk the node reported missing")]
    UploadIncomplete {
        /// How many chunks were never sent.
        missing: usize,
    },

    /// A release whose `service.toml` is invalid: refused, and not kept.
    #[error("release {hash} is refused: {reason}: fix service.toml in the dist, stamp it and upload it again")]
    Services {
        hash: String,
        /// The field at fault and why.
        reason: String,
    },

    /// Release-store work on a blocking thread panicked or was cancelled.
    #[error("a release store task on this node failed: see the node's log")]
    TaskFailed(#[source] tokio::task::JoinError),
}
