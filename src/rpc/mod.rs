//! gRPC: generated code, the channel pool, the servers and the Control client.
//!
//! Architecture invariant: this is the only module that sees prost or tonic types.
//! Errors become gRPC statuses (and back) in exactly one place, `status`.

mod agent;
pub mod auth;
mod client;
mod probe;
mod server;
mod status;
mod transport;

pub use agent::{AgentClient, AgentHandler, UploadChunks};
pub use auth::{Caller, Membership};
pub use client::ControlClient;
pub use probe::grpc_health;
pub use server::{serve, ControlHandler, RaftRpcHandler};
pub use transport::{Channels, RaftPeer, RaftRpc, TransportError};

/// Generated protobuf and tonic code for proto/cluster.proto.
#[allow(clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("cluster.v1");
}

/// The largest Raft message accepted or sent: an AppendEntries of
/// [`crate::raft::MAX_PAYLOAD_ENTRIES`] entries at the kv value limit with a deployment's
/// manifest, or one piece of a snapshot
/// ([`crate::raft::network::SNAPSHOT_PIECE_BYTES`]). Only members may send one.
pub const RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The largest Control or Agent message accepted or sent: room for the manifest of a
/// release at the default limits (100,000 entries and 8 GiB, which in 64 KiB chunks
/// encodes to about 35 MiB). Release content travels in chunks of at most 16 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
