//! gRPC: generated code, the channel pool, the servers and the Control client.
//!
//! Architecture invariant: this is the only module that sees prost or tonic types.
//! Errors become gRPC statuses (and back) in exactly one place, `status`.

mod agent;
pub mod auth;
mod client;
mod server;
mod status;
mod transport;

pub use agent::{AgentClient, AgentHandler, UploadChunks};
pub use auth::{Caller, Membership};
pub use client::ControlClient;
pub use server::{serve, ControlHandler, RaftRpcHandler};
pub use transport::{Channels, RaftPeer, RaftRpc, TransportError};

/// Generated protobuf and tonic code for proto/cluster.proto.
#[allow(clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("cluster.v1");
}

/// The largest gRPC message accepted or sent: whole snapshots travel in one message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
