//! openraft's network over our gRPC transport: every `RaftNetworkV2` RPC on the sending
//! side, and the matching handler on the receiving side.
//!
//! Requests and replies are openraft's own serde types as JSON. All five RPCs are real:
//! openraft's default `pre_vote` grants everything and its default `transfer_leader`
//! reports Unreachable, which would turn a planned hand-off into an election.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::raft::{TransferLeaderRequest, TransferLeaderResponse};
use openraft::{RPCTypes, RaftNetworkV2};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::typ::{Node, NodeId, Raft, Snapshot, SnapshotData, SnapshotMeta, TypeConfig, Vote};
use crate::rpc::{Channels, RaftPeer, RaftRpc, RaftRpcHandler, TransportError};

/// Creates a client per peer; all share the node's channel pool.
#[derive(Clone)]
pub struct Network {
    pub id: NodeId,
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        PeerNetwork {
            id: self.id,
            target,
            addr: node.addr.clone(),
            peer: RaftPeer::new(&self.channels, &node.addr),
        }
    }
}

/// The sending side towards one peer.
pub struct PeerNetwork {
    id: NodeId,
    target: NodeId,
    addr: String,
    /// Err when the address is malformed; reported as Unreachable on every call.
    peer: Result<RaftPeer, TransportError>,
}

/// Wire form of a snapshot's header; the bytes travel beside it, not inside the JSON.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote,
    meta: SnapshotMeta,
}

impl PeerNetwork {
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        rpc: RaftRpc,
        request: &Req,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let payload =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let peer = match &mut self.peer {
            Ok(peer) => peer,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {} at {}: {e}",
                    self.target, self.addr
                ))))
            }
        };
        let reply = peer
            .call(rpc, payload, data, timeout)
            .await
            .map_err(|e| match e {
                TransportError::Timeout(timeout) => RPCError::Timeout(Timeout {
                    action: rpc_type(rpc),
                    id: self.id,
                    target: self.target,
                    timeout,
                }),
                // A peer that answers with an error is as good as unreachable for Raft: back off.
                other => RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {} at {}: {other}",
                    self.target, self.addr
                ))),
            })?;
        serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }
}

fn rpc_type(rpc: RaftRpc) -> RPCTypes {
    match rpc {
        RaftRpc::AppendEntries => RPCTypes::AppendEntries,
        RaftRpc::Vote | RaftRpc::PreVote => RPCTypes::Vote,
        RaftRpc::InstallSnapshot => RPCTypes::InstallSnapshot,
        RaftRpc::TransferLeader => RPCTypes::TransferLeader,
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::AppendEntries, &rpc, Vec::new(), option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::Vote, &rpc, Vec::new(), option.hard_ttl())
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::PreVote, &rpc, Vec::new(), option.hard_ttl())
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let send = self.call(
            RaftRpc::InstallSnapshot,
            &header,
            snapshot.snapshot,
            option.hard_ttl(),
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result.map_err(|e| match e {
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::RemoteError(r) => StreamingError::Unreachable(Unreachable::from_string(r.to_string())),
            }),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(RaftRpc::TransferLeader, &req, Vec::new(), option.hard_ttl())
            .await
    }
}

/// The receiving side: decodes a request, hands it to the local Raft, encodes the reply.
pub struct RaftHandler {
    pub raft: Raft,
}

impl RaftRpcHandler for RaftHandler {
    fn handle(
        &self,
        rpc: RaftRpc,
        payload: Vec<u8>,
        data: Vec<u8>,
        sender: Option<NodeId>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let raft = self.raft.clone();
        async move {
            fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
                serde_json::from_slice(payload).map_err(|e| format!("undecodable request: {e}"))
            }
            fn encode<T: Serialize, E: std::fmt::Display>(
                result: Result<T, E>,
            ) -> Result<Vec<u8>, String> {
                let reply = result.map_err(|e| e.to_string())?;
                serde_json::to_vec(&reply).map_err(|e| e.to_string())
            }
            // Every Raft request carries the vote of the node that sends it: a candidate's
            // or a leader's. It must be the vote of the node the certificate names.
            let speaks_for = |vote: &Vote| match sender {
                Some(sender) if vote.leader_id().node_id != sender => Err(format!(
                    "refused: node {sender} sent a Raft request carrying node {}'s vote",
                    vote.leader_id().node_id
                )),
                _ => Ok(()),
            };
            match rpc {
                RaftRpc::AppendEntries => {
                    let request: AppendEntriesRequest<TypeConfig> = decode(&payload)?;
                    speaks_for(&request.vote)?;
                    encode(raft.append_entries(request).await)
                }
                RaftRpc::Vote => {
                    let request: VoteRequest<TypeConfig> = decode(&payload)?;
                    speaks_for(&request.vote)?;
                    encode(raft.vote(request).await)
                }
                RaftRpc::PreVote => {
                    let request: VoteRequest<TypeConfig> = decode(&payload)?;
                    speaks_for(&request.vote)?;
                    encode(raft.pre_vote(request).await)
                }
                RaftRpc::TransferLeader => {
                    let request: TransferLeaderRequest<TypeConfig> = decode(&payload)?;
                    speaks_for(request.from_leader())?;
                    encode(raft.handle_transfer_leader(request).await)
                }
                RaftRpc::InstallSnapshot => {
                    let header: SnapshotHeader = decode(&payload)?;
                    speaks_for(&header.vote)?;
                    let snapshot = Snapshot {
                        meta: header.meta,
                        snapshot: data,
                    };
                    encode(raft.install_full_snapshot(header.vote, snapshot).await)
                }
            }
        }
        .boxed()
    }
}
