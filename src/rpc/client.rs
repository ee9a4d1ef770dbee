//! The Control client: what the CLI, tests and forwarding nodes use to talk to a node.

use std::time::Duration;

use tonic::transport::Channel;

use super::pb::control_client::ControlClient as PbClient;
use super::pb::{self};
use super::server::HOPS;
use super::status::from_status;
use super::{Channels, MAX_MESSAGE_BYTES};
use crate::api::{
    ApiError, ClusterStatus, JoinAccepted, JoinRequest, MemberRemoved, MembersView, Operated,
    Operation, Plan, Report, RolloutView, TransferDone, UpdateOptions, UpdateOutcome, WriteOutcome,
};
use crate::release::Manifest;
use crate::state::{Command, Deployment, HistoryEntry};

/// A client for one node's Control service. Cheap to clone.
#[derive(Clone)]
pub struct ControlClient {
    addr: String,
    client: PbClient<Channel>,
    /// How often the request was forwarded already (set by forwarding nodes).
    hops: u32,
    timeout: Duration,
}

impl ControlClient {
    /// A client for `addr` (host:port) over `channels` (which carry the TLS credentials,
    /// shared with other users in this process). Connects on first use.
    pub fn with_channels(channels: &Channels, addr: &str) -> Result<Self, ApiError> {
        let channel = channels.for_client(addr)?;
        let client = PbClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            addr: addr.to_string(),
            client,
            hops: 0,
            timeout: Duration::from_secs(15),
        })
    }

    /// Marks requests as forwarded `hops` times (nodes use this to bound forwarding chains).
    pub fn forwarded(mut self, hops: u32) -> Self {
        self.hops = hops;
        self
    }

    /// The deadline of each request (default 15 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if self.hops > 0 {
            if let Ok(value) = self.hops.to_string().parse() {
                request.metadata_mut().insert(HOPS, value);
            }
        }
        request
    }

    fn error(&self, status: tonic::Status) -> ApiError {
        from_status(&self.addr, status)
    }

    /// The cluster as the leader sees it (or this node, with `local_only`).
    pub async fn status(&mut self, local_only: bool) -> Result<ClusterStatus, ApiError> {
        let request = self.request(pb::StatusRequest { local_only });
        let reply = self
            .client
            .status(request)
            .await
            .map_err(|s| self.error(s))?;
        Ok(reply.into_inner().into())
    }

    /// Proposes `command`; returns once it is committed and applied on the leader.
    pub async fn write(&mut self, command: &Command) -> Result<WriteOutcome, ApiError> {
        let bytes = serde_json::to_vec(command).map_err(|e| ApiError::internal(e.to_string()))?;
        let request = self.request(pb::WriteRequest { command: bytes });
        let reply = self
            .client
            .write(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let response = serde_json::from_slice(&reply.response)
            .map_err(|e| ApiError::internal(format!("undecodable response: {e}")))?;
        Ok(WriteOutcome {
            response,
            log_index: reply.log_index,
        })
    }

    pub async fn kv_put(&mut self, key: &str, value: &str) -> Result<WriteOutcome, ApiError> {
        self.write(&Command::KvPut {
            key: key.to_string(),
            value: value.to_string(),
        })
        .await
    }

    /// A linearizable read: reflects every write acknowledged before it was issued.
    pub async fn kv_get(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        let request = self.request(pb::KvGetRequest {
            key: key.to_string(),
        });
        let reply = self
            .client
            .kv_get(request)
            .await
            .map_err(|s| self.error(s))?;
        Ok(reply.into_inner().value)
    }

    pub async fn join(&mut self, join: &JoinRequest) -> Result<JoinAccepted, ApiError> {
        let request = self.request(pb::JoinRequest {
            id: join.id,
            addr: join.addr.clone(),
            cluster_id: join.cluster_id.clone(),
        });
        let reply = self
            .client
            .join(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(JoinAccepted {
            cluster_id: reply.cluster_id,
            leader: reply.leader,
            learner: reply.learner,
            voters: reply.voters,
        })
    }

    /// Every member with its role and, from the leader, its acknowledgement age and
    /// liveness.
    pub async fn members(&mut self) -> Result<MembersView, ApiError> {
        let request = self.request(pb::MembersRequest {});
        let reply = self
            .client
            .members(request)
            .await
            .map_err(|s| self.error(s))?;
        Ok(reply.into_inner().into())
    }

    /// Removes member `id` from the Raft membership; `force` overrides the live-quorum
    /// arithmetic and the active-rollout guard (never the last voter or an unknown id).
    pub async fn remove_member(&mut self, id: u64, force: bool) -> Result<MemberRemoved, ApiError> {
        let request = self.request(pb::RemoveMemberRequest { id, force });
        let reply = self
            .client
            .remove_member(request)
            .await
            .map_err(|s| self.error(s))?;
        Ok(reply.into_inner().into())
    }

    /// Hands leadership to voter `to`; returns once `to` leads.
    pub async fn transfer_leader(&mut self, to: u64) -> Result<TransferDone, ApiError> {
        let request = self.request(pb::TransferLeaderRequest { to });
        let reply = self
            .client
            .transfer_leader(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(TransferDone {
            leader: reply.leader,
            term: reply.term,
            elapsed_ms: reply.elapsed_ms,
        })
    }

    /// Preflight and plan (and, unless `dry_run`, start) a rolling update on the leader.
    pub async fn update(
        &mut self,
        manifest: &Manifest,
        options: &UpdateOptions,
        dry_run: bool,
    ) -> Result<UpdateOutcome, ApiError> {
        let encode = |e: serde_json::Error| ApiError::internal(e.to_string());
        let request = self.request(pb::UpdateRequest {
            manifest: serde_json::to_vec(manifest).map_err(encode)?,
            options: serde_json::to_vec(options).map_err(encode)?,
            dry_run,
        });
        let reply = self
            .client
            .update(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let decode = |e: serde_json::Error| ApiError::internal(format!("undecodable reply: {e}"));
        Ok(UpdateOutcome {
            report: serde_json::from_slice::<Report>(&reply.report).map_err(decode)?,
            plan: serde_json::from_slice::<Plan>(&reply.plan).map_err(decode)?,
            generation: reply.generation,
        })
    }

    /// The active deployment and the history, as the asked node has applied them.
    pub async fn rollout(&mut self) -> Result<RolloutView, ApiError> {
        let request = self.request(pb::RolloutRequest {});
        let reply = self
            .client
            .rollout(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        let decode = |e: serde_json::Error| ApiError::internal(format!("undecodable reply: {e}"));
        Ok(RolloutView {
            deployment: if reply.deployment.is_empty() {
                None
            } else {
                Some(serde_json::from_slice::<Deployment>(&reply.deployment).map_err(decode)?)
            },
            history: serde_json::from_slice::<Vec<HistoryEntry>>(&reply.history).map_err(decode)?,
            // Empty from a node that predates them.
            fleet: if reply.fleet.is_empty() {
                Default::default()
            } else {
                serde_json::from_slice(&reply.fleet).map_err(decode)?
            },
            notes: if reply.notes.is_empty() {
                None
            } else {
                Some(serde_json::from_slice(&reply.notes).map_err(decode)?)
            },
        })
    }

    /// Pause, resume or abort the active rollout, or switch automatic rollouts.
    pub async fn operate(&mut self, operation: Operation) -> Result<Operated, ApiError> {
        let operation = serde_json::to_vec(&operation)
            .map_err(|e| ApiError::internal(format!("cannot encode the operation: {e}")))?;
        let request = self.request(pb::OperateRequest { operation });
        let reply = self
            .client
            .operate(request)
            .await
            .map_err(|s| self.error(s))?
            .into_inner();
        Ok(Operated {
            message: reply.message,
            generation: reply.generation,
        })
    }
}
