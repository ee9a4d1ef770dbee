//! openraft type declarations: our command and response types, u64 ids, `BasicNode` addresses.

use crate::state::{Command, Response};

openraft::declare_raft_types!(
    /// The Raft type configuration of a `cluster` node.
    pub TypeConfig:
        D = Command,
        R = Response,
);

/// A running Raft node over our sled-backed state machine.
pub type Raft = openraft::Raft<TypeConfig, crate::raft_store::StateMachineStore>;

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshot bytes: the JSON of the whole replicated state (small by design).
pub type SnapshotData = Vec<u8>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
