//! The gRPC server of a node: the Raft service (bytes in, bytes out) and the Control service.

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::agent::{AgentHandler, AgentService};
use super::auth::{self, caller_of, AuthLayer, Membership};
use super::pb::agent_server::AgentServer;
use super::pb::control_server::{Control, ControlServer};
use super::pb::raft_server::{Raft, RaftServer};
use super::pb::{self, RaftReply, RaftRequest};
use super::status::{refusal_status, to_status};
use super::transport::HANDSHAKE_TIMEOUT;
use super::{RaftRpc, MAX_MESSAGE_BYTES};
use crate::api::{
    self, ApiError, ClusterStatus, JoinAccepted, JoinRequest, MemberRemoved, MembersView, Operated,
    Operation, RolloutView, TransferDone, UpdateOptions, UpdateOutcome, WriteOutcome,
};
use crate::release::Manifest;
use crate::state::Command;
use crate::tls::Security;

/// Decodes, handles and encodes one Raft RPC; implemented by `raft::network`.
pub trait RaftRpcHandler: Send + Sync + 'static {
    /// Ok: the encoded reply. Err: why this node could not handle it.
    /// `sender`: the node the caller's certificate names (`None` on an insecure node);
    /// a request that claims another node's vote must be refused.
    fn handle(
        &self,
        rpc: RaftRpc,
        payload: Vec<u8>,
        data: Vec<u8>,
        sender: Option<u64>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// What a node does for Control requests; implemented by `node`. `hops` counts how often
/// the request was forwarded already, to bound forwarding while leadership moves.
pub trait ControlHandler: Send + Sync + 'static {
    /// Preflight, plan and (unless `dry_run`) start of a rolling update, on the leader.
    fn update(
        &self,
        manifest: Manifest,
        options: UpdateOptions,
        dry_run: bool,
        hops: u32,
    ) -> impl Future<Output = Result<UpdateOutcome, ApiError>> + Send;
    /// The active rollout, the history and, on the leader, its notes.
    fn rollout_view(&self) -> RolloutView;
    /// An operator's command on rollouts, on the leader.
    fn operate(
        &self,
        operation: Operation,
        hops: u32,
    ) -> impl Future<Output = Result<Operated, ApiError>> + Send;
    /// The cluster as the leader sees it (this node's view with `local_only`).
    fn status(
        &self,
        local_only: bool,
        hops: u32,
    ) -> impl Future<Output = Result<ClusterStatus, ApiError>> + Send;
    /// Commits `command` through the leader.
    fn write(
        &self,
        command: Command,
        hops: u32,
    ) -> impl Future<Output = Result<WriteOutcome, ApiError>> + Send;
    /// A linearizable read of one key.
    fn kv_get(
        &self,
        key: String,
        hops: u32,
    ) -> impl Future<Output = Result<Option<String>, ApiError>> + Send;
    /// Admits a node to the cluster.
    fn join(
        &self,
        request: JoinRequest,
        hops: u32,
    ) -> impl Future<Output = Result<JoinAccepted, ApiError>> + Send;
    /// Hands leadership to voter `to`.
    fn transfer_leader(
        &self,
        to: u64,
        hops: u32,
    ) -> impl Future<Output = Result<TransferDone, ApiError>> + Send;
    /// Every member with its role and, from the leader, its liveness.
    fn members(&self, hops: u32) -> impl Future<Output = Result<MembersView, ApiError>> + Send;
    /// Removes member `id`, on the leader (`force`: past the live-quorum arithmetic).
    fn remove_member(
        &self,
        id: u64,
        force: bool,
        hops: u32,
    ) -> impl Future<Output = Result<MemberRemoved, ApiError>> + Send;
}

/// The service names whose `grpc.health.v1` status follows the node's `serving` signal:
/// the whole server ("") and the Control service operators call.
pub const HEALTH_SERVICES: [&str; 2] = ["", "cluster.v1.Control"];

/// tonic-health's service, its statuses kept equal to `serving` (NOT_SERVING until the
/// node says otherwise, and once the signal's sender is gone).
async fn health_service(
    mut serving: tokio::sync::watch::Receiver<bool>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    let set = |reporter: tonic_health::server::HealthReporter, up: bool| async move {
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in HEALTH_SERVICES {
            reporter.set_service_status(name, status).await;
        }
    };
    let up = *serving.borrow_and_update();
    set(reporter.clone(), up).await;
    tokio::spawn(async move {
        while serving.changed().await.is_ok() {
            let up = *serving.borrow_and_update();
            set(reporter.clone(), up).await;
        }
        set(reporter, false).await;
    });
    service
}

/// Serves the Raft, Control and Agent services, and the standard gRPC health service
/// (`grpc.health.v1`, SERVING while `serving` says so), on `listener` until `shutdown`
/// completes.
/// With `Security::Tls` every connection must present a certificate of the cluster CA and
/// every request passes the role table (`auth`); `membership` answers who is a member.
#[allow(clippy::too_many_arguments)]
pub async fn serve<C: ControlHandler, A: AgentHandler>(
    listener: TcpListener,
    security: Security,
    membership: Arc<dyn Membership>,
    raft: Arc<dyn RaftRpcHandler>,
    node: Arc<C>,
    agent: Arc<A>,
    serving: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let health = health_service(serving).await;
    let checked = security.credentials().is_some().then(|| membership.clone());
    let raft = RaftServer::new(RaftService { handler: raft })
        .max_decoding_message_size(super::RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(super::RAFT_MESSAGE_BYTES);
    let control = ControlServer::new(ControlService { node })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let agent = AgentServer::new(AgentService {
        agent,
        membership: checked.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Nagle's algorithm against delayed ACKs costs ~40 ms per small reply: disable it on
    // every accepted connection (the builder's tcp_nodelay only covers listeners it binds).
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(10)));
    let mut builder = tonic::transport::Server::builder();
    if let Some(credentials) = security.credentials() {
        builder = builder.tls_config(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    &credentials.cert_pem,
                    &credentials.key_pem,
                ))
                .client_ca_root(Certificate::from_pem(&credentials.ca_pem))
                .timeout(HANDSHAKE_TIMEOUT),
        )?;
    }
    builder
        .layer(AuthLayer {
            membership: checked,
            in_flight: Default::default(),
        })
        .add_service(raft)
        .add_service(control)
        .add_service(agent)
        .add_service(health)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

struct RaftService {
    handler: Arc<dyn RaftRpcHandler>,
}

impl RaftService {
    async fn dispatch(
        &self,
        rpc: RaftRpc,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let sender = caller_of(&request)?.node_id();
        let RaftRequest { payload, data } = request.into_inner();
        let reply = match self.handler.handle(rpc, payload, data, sender).await {
            Ok(payload) => RaftReply {
                payload,
                error: String::new(),
            },
            Err(error) => RaftReply {
                payload: Vec::new(),
                error,
            },
        };
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(RaftRpc::AppendEntries, request).await
    }
    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(RaftRpc::Vote, request).await
    }
    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(RaftRpc::PreVote, request).await
    }
    async fn install_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(RaftRpc::InstallSnapshot, request).await
    }
    async fn transfer_leader(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        self.dispatch(RaftRpc::TransferLeader, request).await
    }
}

/// Metadata key counting how often a Control request was forwarded, to bound forwarding.
pub const HOPS: &str = "x-cluster-hops";

fn hops<T>(request: &Request<T>) -> u32 {
    request
        .metadata()
        .get(HOPS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct ControlService<C> {
    node: Arc<C>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Status> {
    serde_json::to_vec(value).map_err(|e| to_status(api::ApiError::internal(e.to_string())))
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| {
        to_status(api::ApiError::new(
            api::ErrorKind::InvalidArgument,
            format!("undecodable {what}: {e}"),
        ))
    })
}

#[tonic::async_trait]
impl<C: ControlHandler> Control for ControlService<C> {
    async fn update(
        &self,
        request: Request<pb::UpdateRequest>,
    ) -> Result<Response<pb::UpdateReply>, Status> {
        let hops = hops(&request);
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let manifest = from_json(&request.manifest, "manifest")?;
        let options =
            auth::vouch_for_options(&caller, from_json(&request.options, "update options")?);
        let outcome = self
            .node
            .update(manifest, options, request.dry_run, hops)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UpdateReply {
            report: to_json(&outcome.report)?,
            plan: to_json(&outcome.plan)?,
            generation: outcome.generation,
        }))
    }

    async fn rollout(
        &self,
        _: Request<pb::RolloutRequest>,
    ) -> Result<Response<pb::RolloutReply>, Status> {
        let view = self.node.rollout_view();
        Ok(Response::new(pb::RolloutReply {
            deployment: match &view.deployment {
                Some(deployment) => to_json(deployment)?,
                None => Vec::new(),
            },
            history: to_json(&view.history)?,
            fleet: to_json(&view.fleet)?,
            notes: match &view.notes {
                Some(notes) => to_json(notes)?,
                None => Vec::new(),
            },
        }))
    }

    async fn operate(
        &self,
        request: Request<pb::OperateRequest>,
    ) -> Result<Response<pb::OperateReply>, Status> {
        let hops = hops(&request);
        let caller = caller_of(&request)?;
        let operation = auth::vouch_for_operation(
            &caller,
            from_json(&request.into_inner().operation, "rollout operation")?,
        );
        let done = self
            .node
            .operate(operation, hops)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::OperateReply {
            message: done.message,
            generation: done.generation,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let hops = hops(&request);
        let local_only = request.into_inner().local_only;
        let status = self
            .node
            .status(local_only, hops)
            .await
            .map_err(to_status)?;
        Ok(Response::new(status.into()))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let hops = hops(&request);
        let caller = caller_of(&request)?;
        let command = serde_json::from_slice(&request.into_inner().command).map_err(|e| {
            to_status(api::ApiError::new(
                api::ErrorKind::InvalidArgument,
                format!("undecodable command: {e}"),
            ))
        })?;
        auth::check_write(&caller, &command).map_err(|r| refusal_status(&r))?;
        if let Some(why) = command.oversize() {
            return Err(to_status(api::ApiError::new(
                api::ErrorKind::InvalidArgument,
                why,
            )));
        }
        let outcome = self.node.write(command, hops).await.map_err(to_status)?;
        let response = serde_json::to_vec(&outcome.response)
            .map_err(|e| to_status(api::ApiError::internal(e.to_string())))?;
        Ok(Response::new(pb::WriteReply {
            response,
            log_index: outcome.log_index,
        }))
    }

    async fn kv_get(
        &self,
        request: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetReply>, Status> {
        let hops = hops(&request);
        let key = request.into_inner().key;
        let value = self.node.kv_get(key, hops).await.map_err(to_status)?;
        Ok(Response::new(pb::KvGetReply { value }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let hops = hops(&request);
        let caller = caller_of(&request)?;
        let pb::JoinRequest {
            id,
            addr,
            cluster_id,
        } = request.into_inner();
        auth::check_speaks_for(&caller, id).map_err(|r| refusal_status(&r))?;
        let accepted = self
            .node
            .join(
                api::JoinRequest {
                    id,
                    addr,
                    cluster_id,
                },
                hops,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::JoinReply {
            cluster_id: accepted.cluster_id,
            leader: accepted.leader,
            learner: accepted.learner,
            voters: accepted.voters,
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderReply>, Status> {
        let hops = hops(&request);
        let to = request.into_inner().to;
        let done = self
            .node
            .transfer_leader(to, hops)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::TransferLeaderReply {
            leader: done.leader,
            term: done.term,
            elapsed_ms: done.elapsed_ms,
        }))
    }

    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        let hops = hops(&request);
        let view = self.node.members(hops).await.map_err(to_status)?;
        Ok(Response::new(view.into()))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberReply>, Status> {
        let hops = hops(&request);
        let pb::RemoveMemberRequest { id, force } = request.into_inner();
        let removed = self
            .node
            .remove_member(id, force, hops)
            .await
            .map_err(to_status)?;
        Ok(Response::new(removed.into()))
    }
}

impl From<api::MembersView> for pb::MembersReply {
    fn from(view: api::MembersView) -> Self {
        pb::MembersReply {
            leader: view.leader,
            term: view.term,
            answered_by: view.answered_by,
            live_window_ms: view.live_window_ms,
            max_voters: view.max_voters,
            last_log_index: view.last_log_index,
            members: view
                .members
                .into_iter()
                .map(|m| pb::Member {
                    id: m.id,
                    addr: m.addr,
                    role: m.role,
                    last_ack_ms: m.last_ack_ms,
                    matched_index: m.matched_index,
                    alive: m.alive,
                })
                .collect(),
        }
    }
}

impl From<pb::MembersReply> for api::MembersView {
    fn from(reply: pb::MembersReply) -> Self {
        api::MembersView {
            leader: reply.leader,
            term: reply.term,
            answered_by: reply.answered_by,
            live_window_ms: reply.live_window_ms,
            max_voters: reply.max_voters,
            last_log_index: reply.last_log_index,
            members: reply
                .members
                .into_iter()
                .map(|m| api::Member {
                    id: m.id,
                    addr: m.addr,
                    role: m.role,
                    last_ack_ms: m.last_ack_ms,
                    matched_index: m.matched_index,
                    alive: m.alive,
                })
                .collect(),
        }
    }
}

impl From<api::MemberRemoved> for pb::RemoveMemberReply {
    fn from(removed: api::MemberRemoved) -> Self {
        pb::RemoveMemberReply {
            id: removed.id,
            addr: removed.addr,
            role: removed.role,
            leader: removed.leader,
            handed_off_to: removed.handed_off_to,
            forgotten: removed.forgotten,
            note: removed.note,
            promoted: removed.promoted,
        }
    }
}

impl From<pb::RemoveMemberReply> for api::MemberRemoved {
    fn from(reply: pb::RemoveMemberReply) -> Self {
        api::MemberRemoved {
            id: reply.id,
            addr: reply.addr,
            role: reply.role,
            leader: reply.leader,
            handed_off_to: reply.handed_off_to,
            forgotten: reply.forgotten,
            note: reply.note,
            promoted: reply.promoted,
        }
    }
}

impl From<api::ClusterStatus> for pb::StatusReply {
    fn from(status: api::ClusterStatus) -> Self {
        pb::StatusReply {
            leader: status.leader,
            term: status.term,
            answered_by: status.answered_by,
            cluster_id: status.cluster_id,
            commit_index: status.commit_index,
            last_log_index: status.last_log_index,
            nodes: status
                .nodes
                .into_iter()
                .map(|n| pb::NodeStatus {
                    id: n.id,
                    addr: n.addr,
                    role: n.role,
                    state: n.state,
                    build_hash: n.build_hash,
                    last_ack_ms: n.last_ack_ms,
                    matched_index: n.matched_index,
                    protocol: n.protocol,
                    boot_id: n.boot_id,
                    started_at_ms: n.started_at_ms,
                    applied_index: n.applied_index,
                    health_problem: n.health_problem,
                    supervision: n.supervision,
                    last_auto_restore: n.last_auto_restore.map(|r| pb::AutoRestore {
                        from: r.from,
                        to: r.to,
                        generation: r.generation,
                        reason: r.reason,
                        at_ms: r.at_ms,
                    }),
                    insecure: n.insecure,
                    services: n.services.into_iter().map(service_to_pb).collect(),
                    labels: n.labels.into_iter().collect(),
                })
                .collect(),
        }
    }
}

fn instance_to_pb(i: api::ServiceInstance) -> pb::ServiceInstance {
    pb::ServiceInstance {
        release: i.release,
        pid: i.pid,
        since_ms: i.since_ms,
    }
}

fn instance_from_pb(i: pb::ServiceInstance) -> api::ServiceInstance {
    api::ServiceInstance {
        release: i.release,
        pid: i.pid,
        since_ms: i.since_ms,
    }
}

fn service_to_pb(s: api::ServiceStatus) -> pb::ServiceStatus {
    pb::ServiceStatus {
        name: s.name,
        listen: s.listen,
        state: s.state,
        active: s.active.map(instance_to_pb),
        candidate: s.candidate.map(instance_to_pb),
        failure_streak: s.failure_streak,
        problem: s.problem,
        last_rollback: s.last_rollback,
        last_rollback_at_ms: s.last_rollback_at_ms,
    }
}

fn service_from_pb(s: pb::ServiceStatus) -> api::ServiceStatus {
    api::ServiceStatus {
        name: s.name,
        listen: s.listen,
        state: s.state,
        active: s.active.map(instance_from_pb),
        candidate: s.candidate.map(instance_from_pb),
        failure_streak: s.failure_streak,
        problem: s.problem,
        last_rollback: s.last_rollback,
        last_rollback_at_ms: s.last_rollback_at_ms,
    }
}

impl From<pb::StatusReply> for api::ClusterStatus {
    fn from(reply: pb::StatusReply) -> Self {
        api::ClusterStatus {
            leader: reply.leader,
            term: reply.term,
            answered_by: reply.answered_by,
            cluster_id: reply.cluster_id,
            commit_index: reply.commit_index,
            last_log_index: reply.last_log_index,
            nodes: reply
                .nodes
                .into_iter()
                .map(|n| api::NodeStatus {
                    id: n.id,
                    addr: n.addr,
                    role: n.role,
                    state: n.state,
                    build_hash: n.build_hash,
                    last_ack_ms: n.last_ack_ms,
                    matched_index: n.matched_index,
                    applied_index: n.applied_index,
                    protocol: n.protocol,
                    boot_id: n.boot_id,
                    started_at_ms: n.started_at_ms,
                    health_problem: n.health_problem,
                    supervision: n.supervision,
                    last_auto_restore: n.last_auto_restore.map(|r| crate::state::GuardRestore {
                        from: r.from,
                        to: r.to,
                        generation: r.generation,
                        reason: r.reason,
                        at_ms: r.at_ms,
                    }),
                    insecure: n.insecure,
                    services: n.services.into_iter().map(service_from_pb).collect(),
                    labels: n.labels.into_iter().collect(),
                })
                .collect(),
        }
    }
}
