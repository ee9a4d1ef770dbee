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
/// A snapshot travels in pieces of at most [`SNAPSHOT_PIECE_BYTES`], in order: `offset`
/// is where this piece starts, `done` marks the last one. A header without them (a
/// sender that sent whole snapshots) is one piece holding everything.
#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    vote: Vote,
    meta: SnapshotMeta,
    #[serde(default)]
    offset: u64,
    #[serde(default = "whole")]
    done: bool,
}

fn whole() -> bool {
    true
}

/// The largest piece of a snapshot in one message, well below the Raft message limit.
/// A snapshot that fits one piece travels exactly as whole snapshots always did, so a
/// node of an earlier release still installs it.
pub const SNAPSHOT_PIECE_BYTES: usize = 64 * 1024 * 1024;

/// `bytes` cut into pieces of at most `size`, each with its offset and whether it is the
/// last; an empty snapshot is one empty piece.
fn pieces(bytes: &[u8], size: usize) -> Vec<(u64, &[u8], bool)> {
    if bytes.is_empty() {
        return vec![(0, bytes, true)];
    }
    let count = bytes.len().div_ceil(size);
    bytes
        .chunks(size)
        .enumerate()
        .map(|(i, piece)| ((i * size) as u64, piece, i + 1 == count))
        .collect()
}

/// The largest snapshot a node reassembles (it holds it in memory): a sender that goes
/// on past it is refused, not given the node's memory.
#[cfg(not(test))]
const MAX_SNAPSHOT_BYTES: usize = 8 * 1024 * 1024 * 1024;
#[cfg(test)]
const MAX_SNAPSHOT_BYTES: usize = 4096;

/// A snapshot being received: the pieces so far, from one sender, of one snapshot.
struct Receiving {
    sender: Option<NodeId>,
    snapshot_id: String,
    bytes: Vec<u8>,
}

impl Receiving {
    /// Adds a piece; the first piece (offset 0) starts a new snapshot. A piece that does
    /// not continue the snapshot in progress is refused, and the sender starts again.
    fn add(
        slot: &mut Option<Receiving>,
        sender: Option<NodeId>,
        header: &SnapshotHeader,
        piece: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, String> {
        // A snapshot is named by the last log entry it covers.
        let snapshot_id = match &header.meta.last_log_id {
            Some(id) => id.to_string(),
            None => "of an empty log".to_string(),
        };
        if header.offset == 0 {
            *slot = Some(Receiving {
                sender,
                snapshot_id: snapshot_id.clone(),
                bytes: Vec::new(),
            });
        }
        let receiving = match slot {
            Some(r) if r.sender == sender && r.snapshot_id == snapshot_id => r,
            _ => {
                return Err(format!(
                    "snapshot {snapshot_id}: piece at offset {} without its start: send it again from offset 0",
                    header.offset
                ))
            }
        };
        if receiving.bytes.len() as u64 != header.offset {
            let held = receiving.bytes.len();
            *slot = None;
            return Err(format!(
                "snapshot {snapshot_id}: piece at offset {} but {held} bytes were received: send it again from offset 0",
                header.offset
            ));
        }
        if receiving.bytes.len() + piece.len() > MAX_SNAPSHOT_BYTES {
            *slot = None;
            return Err(format!(
                "snapshot {snapshot_id}: over {MAX_SNAPSHOT_BYTES} bytes, more than this node \
                 accepts in one snapshot"
            ));
        }
        receiving.bytes.extend_from_slice(&piece);
        if !header.done {
            return Ok(None);
        }
        Ok(slot.take().map(|r| r.bytes))
    }
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
        let send = async {
            let bytes = snapshot.snapshot;
            for (offset, piece, done) in pieces(&bytes, SNAPSHOT_PIECE_BYTES) {
                let header = SnapshotHeader {
                    vote,
                    meta: snapshot.meta.clone(),
                    offset,
                    done,
                };
                let reply: Option<SnapshotResponse<TypeConfig>> = self
                    .call(
                        RaftRpc::InstallSnapshot,
                        &header,
                        piece.to_vec(),
                        option.hard_ttl(),
                    )
                    .await?;
                if let Some(reply) = reply {
                    return Ok(reply);
                }
            }
            Err(RPCError::Network(NetworkError::from_string(
                "the peer did not answer the last piece of the snapshot".to_string(),
            )))
        };
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
    raft: Raft,
    /// The snapshot whose pieces are arriving, if one is.
    receiving: std::sync::Arc<std::sync::Mutex<Option<Receiving>>>,
    /// Updated on every AppendEntries this node accepts from a leader.
    contact: std::sync::Arc<super::LeaderContact>,
}

impl RaftHandler {
    pub fn new(raft: Raft, contact: std::sync::Arc<super::LeaderContact>) -> RaftHandler {
        RaftHandler {
            raft,
            receiving: Default::default(),
            contact,
        }
    }
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
        let receiving = self.receiving.clone();
        let contact = self.contact.clone();
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
                    let reply = raft.append_entries(request).await;
                    if matches!(&reply, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_)))
                    {
                        contact.record();
                    }
                    encode(reply)
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
                    let whole = {
                        let mut slot = receiving.lock().unwrap_or_else(|p| p.into_inner());
                        Receiving::add(&mut slot, sender, &header, data)?
                    };
                    let Some(bytes) = whole else {
                        // Not the last piece: nothing to answer yet.
                        return encode(Ok::<_, String>(None::<()>));
                    };
                    let snapshot = Snapshot {
                        meta: header.meta,
                        snapshot: bytes,
                    };
                    encode(
                        raft.install_full_snapshot(header.vote, snapshot)
                            .await
                            .map(Some),
                    )
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, done: bool, last_index: Option<u64>) -> SnapshotHeader {
        let meta = SnapshotMeta {
            last_log_id: last_index.map(|index| {
                super::super::typ::LogId::new(
                    openraft::vote::leader_id_adv::LeaderId {
                        term: 1,
                        node_id: 1,
                    },
                    index,
                )
            }),
            ..Default::default()
        };
        SnapshotHeader {
            vote: Vote::new(1, 1),
            meta,
            offset,
            done,
        }
    }

    #[test]
    fn a_snapshot_is_cut_into_pieces_that_reassemble() {
        let bytes: Vec<u8> = (0..=255).cycle().take(1000).collect();
        for size in [1, 7, 999, 1000, 4096] {
            let cut = pieces(&bytes, size);
            assert_eq!(cut.len(), 1000_usize.div_ceil(size));
            assert!(cut.iter().all(|(_, p, _)| p.len() <= size));
            let mut slot = None;
            let mut whole = None;
            for (offset, piece, done) in &cut {
                assert!(whole.is_none(), "nothing after the last piece");
                whole = Receiving::add(
                    &mut slot,
                    Some(1),
                    &header(*offset, *done, Some(3)),
                    piece.to_vec(),
                )
                .unwrap();
            }
            assert_eq!(whole.as_deref(), Some(&bytes[..]), "size {size}");
        }
        assert_eq!(pieces(&[], 8), vec![(0, &[][..], true)]);
    }

    #[test]
    fn a_snapshot_is_reassembled_from_its_pieces_in_order() {
        let mut slot = None;
        let piece = |slot: &mut Option<Receiving>, sender, offset, done, bytes: &[u8]| {
            Receiving::add(slot, sender, &header(offset, done, Some(9)), bytes.to_vec())
        };
        assert_eq!(piece(&mut slot, Some(1), 0, false, b"ab"), Ok(None));
        assert_eq!(piece(&mut slot, Some(1), 2, false, b"cd"), Ok(None));
        assert_eq!(
            piece(&mut slot, Some(1), 4, true, b"e"),
            Ok(Some(b"abcde".to_vec()))
        );
        assert!(slot.is_none(), "a finished snapshot is not kept");

        // A whole snapshot in one piece, as senders of earlier releases send it.
        let old: SnapshotHeader = serde_json::from_value(serde_json::json!({
            "vote": Vote::new(1, 1),
            "meta": SnapshotMeta::default(),
        }))
        .unwrap();
        assert_eq!(
            Receiving::add(&mut slot, Some(1), &old, b"all".to_vec()),
            Ok(Some(b"all".to_vec()))
        );

        // A gap, a piece without its start and another sender's piece are refused.
        assert_eq!(piece(&mut slot, Some(1), 0, false, b"ab"), Ok(None));
        let gap = piece(&mut slot, Some(1), 3, false, b"d").unwrap_err();
        assert!(gap.contains("send it again from offset 0"), "{gap}");
        assert!(
            piece(&mut slot, Some(1), 2, true, b"c").is_err(),
            "reset after a gap"
        );
        assert_eq!(piece(&mut slot, Some(1), 0, false, b"ab"), Ok(None));
        assert!(
            piece(&mut slot, Some(2), 2, true, b"c").is_err(),
            "another sender"
        );
        let other = Receiving::add(
            &mut slot,
            Some(1),
            &header(2, true, Some(10)),
            b"c".to_vec(),
        );
        assert!(other.is_err(), "another snapshot");

        // A sender that never stops is cut off at the limit.
        let big = vec![0; MAX_SNAPSHOT_BYTES / 2];
        assert_eq!(piece(&mut slot, Some(1), 0, false, &big), Ok(None));
        let at = big.len() as u64;
        assert_eq!(piece(&mut slot, Some(1), at, false, &big), Ok(None));
        let over = piece(&mut slot, Some(1), 2 * at, false, b"x").unwrap_err();
        assert!(over.contains("more than this node accepts"), "{over}");
        assert!(slot.is_none(), "what was held is let go");
    }
}
