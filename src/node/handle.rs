//! What a node does for Control requests: leader routing and forwarding, writes, reads,
//! join, planned leadership hand-off, and the status view (member list and removal are
//! in `members.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers, ReadPolicy, ServerState};

use std::sync::Arc;

use crate::agent::Agent;
use crate::api::{
    ApiError, ClusterStatus, ErrorKind, JoinAccepted, JoinRequest, MemberRemoved, MembersView,
    NodeStatus, Operated, Operation, RolloutView, TransferDone, UpdateOptions, UpdateOutcome,
    WriteOutcome,
};
use crate::raft::{self, Raft, Timing};
use crate::raft_store::StateMachineStore;
use crate::release::Manifest;
use crate::rollout::{self, Notes};
use crate::rpc::{Channels, ControlClient, ControlHandler};
use crate::state::{Command, NodeInfo, State};

/// How many times a Control request may be forwarded before a node waits instead: bounds
/// ping-pong while leadership moves.
pub(super) const MAX_HOPS: u32 = 3;

/// A member lagging more entries than this is "not caught up" for a leadership transfer.
pub(super) const TRANSFER_MAX_LAG: u64 = 1_000;

/// What a member that does not lead answers a join with, after naming the leader: a
/// joining node tries the next address of its `--join` list when it sees this.
pub(super) const NOT_THE_LEADER: &str = "a join must reach the leader: give --join the leader's \
                                  address, or several members' addresses separated by commas";

/// How long a joining learner may take to catch up before the join fails.
const JOIN_CATCH_UP: Duration = Duration::from_secs(60);

/// How long the leader may go without a single answer from a joining learner: an address
/// nobody answers at fails the join this soon, not after the whole catch-up window.
const JOIN_FIRST_CONTACT: Duration = Duration::from_secs(10);

/// Everything Control requests need; shared by the gRPC server and the node's own tasks.
/// Its fields are the node module's own: the rest of the crate reaches a node through
/// the traits it implements (`rpc::ControlHandler`, `rollout::Cluster`).
pub struct NodeHandle {
    pub(super) id: u64,
    /// The address peers and clients use for this node.
    pub(super) addr: String,
    pub(super) raft: Raft,
    pub(super) sm: StateMachineStore,
    /// Shared with the Raft network: one connection per peer in the whole process.
    pub(super) channels: Channels,
    pub(super) timing: Timing,
    /// What this node reports about itself (see `Command::RegisterNode`); its build
    /// changes in place when a release ships the running `bin/cluster`.
    pub(super) info: std::sync::RwLock<NodeInfo>,
    /// The releases on this node's disk.
    pub(super) agent: Arc<Agent>,
    /// The latest result of this node's own health check.
    pub(super) health: super::HealthState,
    /// The operator's services this node runs (their problems are health problems).
    pub(super) services: Arc<crate::service::Services>,
    /// What this node, while it leads, knows about rollouts that is not replicated.
    pub(super) notes: Notes,
    /// While this node leads: joins beyond this many voters stay learners, and a removal
    /// promotes a learner back up to it (`--max-voters`).
    pub(super) max_voters: usize,
    /// This process's start count (see `Cluster::incarnation`).
    pub(super) incarnation: u64,
}

/// Where a request that needs the leader should go.
pub(super) enum Route {
    Local,
    Forward(String),
    NoLeader,
}

impl NodeHandle {
    /// What this node reports about itself now.
    pub(super) fn info(&self) -> NodeInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The release this node runs changed without a restart.
    pub(super) fn set_build(&self, build_hash: String) {
        self.info
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .build_hash = build_hash;
    }

    /// How long a request waits for a leader before giving up: several elections.
    pub(super) fn leader_wait(&self) -> Duration {
        (self.timing.election_timeout * 2 * 10).max(Duration::from_secs(5))
    }

    pub(super) fn route(&self) -> Route {
        let metrics = raft::metrics(&self.raft);
        match metrics.current_leader {
            Some(leader) if leader == self.id => {
                if metrics.state == ServerState::Leader {
                    Route::Local
                } else {
                    Route::NoLeader
                }
            }
            Some(leader) => match metrics.membership_config.membership().get_node(&leader) {
                Some(node) => Route::Forward(node.addr.clone()),
                None => Route::NoLeader,
            },
            None => Route::NoLeader,
        }
    }

    /// Runs `local` on the leader: here if this node leads, else forwarded with `remote`.
    /// `local` returns `Ok(None)` when leadership moved under it; the request is re-routed.
    pub(super) async fn on_leader<T, L, LF, R, RF>(
        &self,
        hops: u32,
        what: &str,
        local: L,
        remote: R,
    ) -> Result<T, ApiError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Result<Option<T>, ApiError>>,
        R: Fn(ControlClient) -> RF,
        RF: Future<Output = Result<T, ApiError>>,
    {
        self.on_leader_within(hops, what, self.leader_wait(), local, remote)
            .await
    }

    /// `on_leader` for a request that may take longer than a leader takes to appear: a
    /// forwarded request may run for up to `wait` (a join's catch-up, a removal's commit)
    /// before the forwarding node gives up on it.
    pub(super) async fn on_leader_within<T, L, LF, R, RF>(
        &self,
        hops: u32,
        what: &str,
        wait: Duration,
        local: L,
        remote: R,
    ) -> Result<T, ApiError>
    where
        L: Fn() -> LF,
        LF: Future<Output = Result<Option<T>, ApiError>>,
        R: Fn(ControlClient) -> RF,
        RF: Future<Output = Result<T, ApiError>>,
    {
        let deadline = Instant::now() + wait;
        // Short and flat: a leadership hand-off settles in tens of ms, and each retry is
        // one cheap round trip.
        let mut backoff = Duration::from_millis(2);
        loop {
            match self.route() {
                Route::Local => {
                    if let Some(done) = local().await? {
                        return Ok(done);
                    }
                }
                Route::Forward(addr) if hops < MAX_HOPS => {
                    let client = ControlClient::with_channels(&self.channels, &addr)?
                        .forwarded(hops + 1)
                        .timeout(deadline.saturating_duration_since(Instant::now()));
                    match remote(client).await {
                        Err(e) if e.kind == ErrorKind::Unavailable => {
                            tracing::debug!(%addr, error = %e, "leader unavailable, re-routing {what}")
                        }
                        other => return other,
                    }
                }
                Route::Forward(_) | Route::NoLeader => {}
            }
            if Instant::now() >= deadline {
                return Err(ApiError::unavailable(format!(
                    "{what}: no leader answered within {:.1} s (asked node {} at {}): \
                     is a majority of voters running and reachable?",
                    wait.as_secs_f64(),
                    self.id,
                    self.addr
                )));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }

    fn members_ids(&self) -> Vec<u64> {
        raft::metrics(&self.raft)
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// Commits `command` through the leader and returns once it is applied there.
    pub async fn write(&self, command: Command, hops: u32) -> Result<WriteOutcome, ApiError> {
        self.on_leader(
            hops,
            "write",
            || self.write_here(command.clone()),
            |mut client| {
                let command = command.clone();
                async move { client.write(&command).await }
            },
        )
        .await
    }

    /// Commits `command` if this node leads, and returns once it is applied here; `None`
    /// when it does not lead (nothing was proposed).
    pub(super) async fn write_here(
        &self,
        command: Command,
    ) -> Result<Option<WriteOutcome>, ApiError> {
        self.sm.read(|s| admit(s, &self.members_ids(), &command))?;
        match self.raft.client_write(command).await {
            Ok(reply) => Ok(Some(WriteOutcome {
                response: reply.data,
                log_index: reply.log_id.index,
            })),
            Err(e) if e.forward_to_leader().is_some() => Ok(None),
            Err(e) => Err(ApiError::unavailable(format!(
                "node {}: write failed: {e}",
                self.id
            ))),
        }
    }

    /// A linearizable read of one key (the leader confirms its leadership with a quorum).
    pub async fn kv_get(&self, key: &str, hops: u32) -> Result<Option<String>, ApiError> {
        self.on_leader(
            hops,
            "read",
            || async {
                match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                    Ok(_) => Ok(Some(self.sm.read(|s| s.kv.get(key).cloned()))),
                    Err(e) if e.forward_to_leader().is_some() => Ok(None),
                    Err(e) => Err(ApiError::unavailable(format!(
                        "node {}: read failed: {e}",
                        self.id
                    ))),
                }
            },
            |mut client| async move { client.kv_get(key).await },
        )
        .await
    }

    /// Adds a node: as a learner, then, once it holds the leader's log, as a voter.
    pub async fn join(&self, request: JoinRequest, hops: u32) -> Result<JoinAccepted, ApiError> {
        if request.addr.is_empty() {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!("node {} asked to join without an address", request.id),
            ));
        }
        // The leader may spend the whole catch-up window, and then a membership change,
        // on one join.
        let wait = self.leader_wait() + JOIN_CATCH_UP + Duration::from_secs(20);
        self.on_leader_within(
            hops,
            "join",
            wait,
            || self.join_here(&request),
            // Not forwarded: the leader admits a node only on its own certificate, which a
            // forwarding member does not hold. The joining node asks the leader itself.
            |leader| {
                let refused = ApiError::precondition(format!(
                    "node {} at {} does not lead; the leader is at {}: {NOT_THE_LEADER}",
                    self.id,
                    self.addr,
                    leader.addr()
                ));
                async move { Err(refused) }
            },
        )
        .await
    }

    async fn join_here(&self, request: &JoinRequest) -> Result<Option<JoinAccepted>, ApiError> {
        let cluster_id = self.sm.read(|s| s.cluster_id.clone());
        if !request.cluster_id.is_empty() && request.cluster_id != cluster_id {
            return Err(ApiError::precondition(format!(
                "node {} ({}) already belongs to cluster {}, and this is cluster {}: \
                 a node joins one cluster for life; start it with a fresh --data-dir to join this one",
                request.id, request.addr, request.cluster_id, cluster_id
            )));
        }
        let accepted = |learner: bool, voters: usize| JoinAccepted {
            cluster_id: cluster_id.clone(),
            leader: self.id,
            learner,
            voters: voters as u32,
        };
        let metrics = raft::metrics(&self.raft);
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if let Some((other, _)) = membership
            .nodes()
            .find(|(id, node)| **id != request.id && node.addr == request.addr)
        {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "address {} already belongs to member {other}: give node {} its own address",
                    request.addr, request.id
                ),
            ));
        }
        match membership.get_node(&request.id) {
            Some(node) if node.addr != request.addr => {
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "node id {} is already a member at {}: choose another --id for {}",
                        request.id, node.addr, request.addr
                    ),
                ))
            }
            Some(_) if voters.contains(&request.id) => {
                return Ok(Some(accepted(false, voters.len())))
            }
            Some(_) | None => {}
        }
        // From here until the join settles, a cancelled request removes the learner too.
        let pending = PendingLearner {
            raft: Some(self.raft.clone()),
            id: request.id,
        };
        if membership.get_node(&request.id).is_none() {
            let node = BasicNode {
                addr: request.addr.clone(),
            };
            match self.raft.add_learner(request.id, node, true).await {
                Ok(_) => {}
                Err(e) if e.forward_to_leader().is_some() => {
                    pending.keep();
                    return Ok(None);
                }
                Err(e) => {
                    pending.keep();
                    let error = ApiError::unavailable(format!(
                        "adding node {} as a learner failed: {e}",
                        request.id
                    ));
                    return Err(self.drop_failed_learner(request.id, error).await);
                }
            }
        }
        if let Err(error) = self.wait_caught_up(request).await {
            pending.keep();
            return Err(self.drop_failed_learner(request.id, error).await);
        }
        pending.keep();
        let voters = raft::metrics(&self.raft)
            .membership_config
            .membership()
            .voter_ids()
            .count();
        if voters >= self.max_voters {
            tracing::info!(
                id = request.id,
                voters,
                max_voters = self.max_voters,
                "admitted as a learner: the cluster has --max-voters voters"
            );
            return Ok(Some(accepted(true, voters)));
        }
        let add = ChangeMembers::AddVoterIds(BTreeSet::from([request.id]));
        match self.raft.change_membership(add, false).await {
            Ok(_) => Ok(Some(accepted(false, voters + 1))),
            // The learner stays: the join is retried on the new leader, which promotes it.
            Err(e) if e.forward_to_leader().is_some() => Ok(None),
            Err(e) => {
                let error = ApiError::unavailable(format!(
                    "promoting node {} to voter failed: {e}",
                    request.id
                ));
                Err(self.drop_failed_learner(request.id, error).await)
            }
        }
    }

    /// Takes a learner whose join failed out of the membership again, so no member is
    /// left behind that nobody runs (every later preflight would wait for it). Returns
    /// the join's error, with what became of the learner.
    async fn drop_failed_learner(&self, id: u64, error: ApiError) -> ApiError {
        match remove_learner(&self.raft, id).await {
            Ok(false) => error,
            Ok(true) => ApiError::new(
                error.kind,
                format!("{} (the learner was removed again)", error.message),
            ),
            Err(why) => ApiError::new(
                error.kind,
                format!(
                    "{}; removing the learner again failed too ({why}): remove it with \
                     `cluster member remove {id}`",
                    error.message
                ),
            ),
        }
    }

    /// Waits until the learner holds everything the leader had when the wait began.
    async fn wait_caught_up(&self, request: &JoinRequest) -> Result<(), ApiError> {
        let target = raft::metrics(&self.raft).last_log_index.unwrap_or(0);
        let started = Instant::now();
        let deadline = started + JOIN_CATCH_UP;
        loop {
            let replication = raft::replication(&self.raft)
                .get(&request.id)
                .copied()
                .unwrap_or_default();
            let matched = replication.matched_index;
            if matched.is_some_and(|m| m >= target) {
                return Ok(());
            }
            let never_answered = matched.is_none() && replication.last_ack.is_none();
            if never_answered && started.elapsed() >= JOIN_FIRST_CONTACT {
                return Err(ApiError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "node {} at {} never answered the leader (node {}) within {} s: is \
                         that address right, is the node listening there, and can the leader \
                         reach it?",
                        request.id,
                        request.addr,
                        self.id,
                        JOIN_FIRST_CONTACT.as_secs()
                    ),
                ));
            }
            if Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "node {} at {} did not catch up within {} s (holds index {:?} of {target}): \
                         can the leader reach that address?",
                        request.id,
                        request.addr,
                        JOIN_CATCH_UP.as_secs(),
                        matched
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Hands leadership to voter `to` and returns once it leads.
    pub async fn transfer_leader(&self, to: u64, hops: u32) -> Result<TransferDone, ApiError> {
        self.on_leader(
            hops,
            "leader transfer",
            || self.transfer_here(to),
            |mut client| async move { client.transfer_leader(to).await },
        )
        .await
    }

    pub(super) async fn transfer_here(&self, to: u64) -> Result<Option<TransferDone>, ApiError> {
        let started = Instant::now();
        let metrics = raft::metrics(&self.raft);
        if to == self.id {
            return Ok(Some(TransferDone {
                leader: to,
                term: metrics.current_term,
                elapsed_ms: 0,
            }));
        }
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let Some(node) = membership.get_node(&to) else {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("node {to} is not a member of this cluster (voters: {voters:?})"),
            ));
        };
        if !voters.contains(&to) {
            return Err(ApiError::precondition(format!(
                "node {to} ({}) is a learner, not a voter: only voters can lead (voters: {voters:?})",
                node.addr
            )));
        }
        let replication = raft::replication(&self.raft)
            .get(&to)
            .copied()
            .unwrap_or_default();
        let stale_after = self.timing.election_timeout * 2;
        match replication.last_ack {
            Some(age) if age <= stale_after => {}
            age => {
                return Err(ApiError::unavailable(format!(
                    "node {to} ({}) is unreachable: last acknowledged the leader {} (limit {} ms): is it running?",
                    node.addr,
                    age.map(|a| format!("{} ms ago", a.as_millis()))
                        .unwrap_or_else(|| "never".into()),
                    stale_after.as_millis()
                )))
            }
        }
        let last = metrics.last_log_index.unwrap_or(0);
        let lag = last.saturating_sub(replication.matched_index.unwrap_or(0));
        if lag > TRANSFER_MAX_LAG {
            return Err(ApiError::precondition(format!(
                "node {to} ({}) is not caught up: {lag} entries behind the leader (limit {TRANSFER_MAX_LAG}); retry when it has caught up",
                node.addr
            )));
        }
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| ApiError::unavailable(format!("node {}: {e}", self.id)))?;
        let timeout = self.timing.election_timeout * 2 * 3 + Duration::from_secs(1);
        let moved = self
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| m.current_leader == Some(to),
                format!("leadership moves to {to}"),
            )
            .await;
        match moved {
            Ok(metrics) => Ok(Some(TransferDone {
                leader: to,
                term: metrics.current_term,
                elapsed_ms: started.elapsed().as_millis() as u64,
            })),
            Err(_) => {
                let now = raft::metrics(&self.raft).current_leader;
                Err(ApiError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "leadership did not move to node {to} within {} ms (current leader: {}); \
                         the cluster stays available, retry or pick another voter",
                        timeout.as_millis(),
                        now.map(|l| l.to_string()).unwrap_or_else(|| "none".into())
                    ),
                ))
            }
        }
    }

    /// Preflight, plan and (unless a dry run) start of a rolling update, on the leader.
    pub async fn update(
        &self,
        manifest: Manifest,
        options: UpdateOptions,
        dry_run: bool,
        hops: u32,
    ) -> Result<UpdateOutcome, ApiError> {
        self.on_leader(
            hops,
            "update",
            || async {
                if !self.raft.is_leader() {
                    return Ok(None);
                }
                match rollout::update::update(self, manifest.clone(), options.clone(), dry_run)
                    .await
                {
                    // Leadership moved before the deployment was proposed: nothing
                    // began, and the new leader runs the update from the start.
                    Err(e) if !self.raft.is_leader() && e.kind == ErrorKind::Unavailable => {
                        tracing::info!(error = %e, "leadership moved during an update; handing it to the new leader");
                        Ok(None)
                    }
                    result => result.map(Some),
                }
            },
            |mut client| {
                let manifest = manifest.clone();
                let options = options.clone();
                async move { client.update(&manifest, &options, dry_run).await }
            },
        )
        .await
    }

    /// The active deployment and the history as this node has applied them, and, when
    /// it leads, its notes.
    pub fn rollout_view(&self) -> RolloutView {
        rollout::operate::view(self, &self.notes)
    }

    /// Pause, resume, promote, undo, abort or switch automatic rollouts, on the leader.
    pub async fn operate(&self, operation: Operation, hops: u32) -> Result<Operated, ApiError> {
        let forwarded = operation.clone();
        self.on_leader(
            hops,
            "rollout operation",
            || {
                let operation = operation.clone();
                async move {
                    if !self.raft.is_leader() {
                        return Ok(None);
                    }
                    rollout::operate::operate(self, operation).await.map(Some)
                }
            },
            |mut client| {
                let operation = forwarded.clone();
                async move { client.operate(operation).await }
            },
        )
        .await
    }

    /// The cluster as the leader sees it; this node's view with `local_only` or when the
    /// leader cannot be asked.
    pub async fn status(&self, local_only: bool, hops: u32) -> Result<ClusterStatus, ApiError> {
        if local_only {
            return Ok(self.local_status());
        }
        match self.route() {
            Route::Local => Ok(self.leader_status().await),
            Route::Forward(addr) if hops < MAX_HOPS => {
                let forwarded = ControlClient::with_channels(&self.channels, &addr)?
                    .forwarded(hops + 1)
                    .timeout(Duration::from_secs(3))
                    .status(false)
                    .await;
                match forwarded {
                    Ok(status) => Ok(status),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "leader did not answer status");
                        Ok(self.local_status())
                    }
                }
            }
            _ => Ok(self.local_status()),
        }
    }

    /// The leader's view, with each member's own state and applied index asked for.
    async fn leader_status(&self) -> ClusterStatus {
        let mut status = self.local_status();
        let asks = status.nodes.iter().filter(|n| n.id != self.id).map(|n| {
            let addr = n.addr.clone();
            let id = n.id;
            let channels = self.channels.clone();
            async move {
                let reply = match ControlClient::with_channels(&channels, &addr) {
                    Ok(client) => {
                        client
                            .timeout(Duration::from_millis(500))
                            .status(true)
                            .await
                    }
                    Err(e) => Err(e),
                };
                (id, reply)
            }
        });
        let replies: BTreeMap<u64, _> = futures::future::join_all(asks).await.into_iter().collect();
        for node in status.nodes.iter_mut().filter(|n| n.id != self.id) {
            match replies.get(&node.id) {
                Some(Ok(theirs)) => {
                    if let Some(me) = theirs.nodes.iter().find(|m| m.id == node.id) {
                        node.state = me.state.clone();
                        node.applied_index = me.applied_index;
                        node.health_problem = me.health_problem.clone();
                        node.services = me.services.clone();
                    }
                }
                _ => node.state = "unreachable".into(),
            }
        }
        status
    }

    /// This node's own view, from its Raft metrics and applied state.
    pub(super) fn local_status(&self) -> ClusterStatus {
        let metrics = raft::metrics(&self.raft);
        // Only the node reports and the cluster id: cloning the whole state would copy the
        // active deployment's manifest on every status call (health polls make many).
        let (reports, cluster_id) = self.sm.read(|s| (s.nodes.clone(), s.cluster_id.clone()));
        let nodes = self
            .members()
            .into_iter()
            .map(|member| {
                let id = member.id;
                // This node's own report is live; the replicated one lags a restart.
                let info = if id == self.id {
                    self.info()
                } else {
                    reports.get(&id).cloned().unwrap_or_default()
                };
                let raft_state = if id == self.id {
                    server_state_name(metrics.state)
                } else if Some(id) == metrics.current_leader {
                    "leader"
                } else {
                    "unknown"
                };
                NodeStatus {
                    id,
                    addr: member.addr,
                    role: super::members::role_name(member.role).into(),
                    state: raft_state.into(),
                    build_hash: info.build_hash,
                    last_ack_ms: member.last_ack_ms,
                    matched_index: member.matched_index,
                    applied_index: if id == self.id {
                        metrics.last_applied.as_ref().map(|l| l.index)
                    } else {
                        None
                    },
                    protocol: info.protocol,
                    boot_id: info.boot_id,
                    started_at_ms: info.started_at_ms,
                    supervision: info.supervision,
                    last_auto_restore: info.last_auto_restore,
                    insecure: info.insecure,
                    labels: info.labels,
                    // Only a node's own check is known here: others report theirs.
                    health_problem: if id == self.id {
                        self.health.problem().or_else(|| self.services.problem())
                    } else {
                        None
                    },
                    services: if id == self.id {
                        self.services.statuses()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        ClusterStatus {
            leader: metrics.current_leader,
            term: metrics.current_term,
            nodes,
            answered_by: self.id,
            cluster_id,
            commit_index: metrics.cluster_committed.as_ref().map(|l| l.index),
            last_log_index: metrics.last_log_index,
        }
    }
}

/// A joining learner that is taken out again unless the join settles it ([`keep`]):
/// dropped armed, because the join's request was cancelled (the joining node gave up or
/// stopped), it removes the learner in the background.
///
/// [`keep`]: PendingLearner::keep
struct PendingLearner {
    raft: Option<Raft>,
    id: u64,
}

impl PendingLearner {
    /// The join settled (or its own error path removes the learner): nothing to undo.
    fn keep(mut self) {
        self.raft = None;
    }
}

impl Drop for PendingLearner {
    fn drop(&mut self) {
        let Some(raft) = self.raft.take() else {
            return;
        };
        let id = self.id;
        tokio::spawn(async move {
            match remove_learner(&raft, id).await {
                Ok(true) => tracing::info!(id, "removed the learner of a cancelled join"),
                Ok(false) => {}
                Err(why) => tracing::warn!(
                    id,
                    "removing the learner of a cancelled join failed ({why}): remove it with \
                     `cluster member remove {id}`"
                ),
            }
        });
    }
}

/// Removes node `id` if it is a learner. Ok(false): it is not one (a voter, or gone).
async fn remove_learner(raft: &Raft, id: u64) -> Result<bool, String> {
    let metrics = raft::metrics(raft);
    let membership = metrics.membership_config.membership();
    let is_learner = membership.get_node(&id).is_some() && !membership.voter_ids().any(|v| v == id);
    if !is_learner {
        return Ok(false);
    }
    let remove = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
    match tokio::time::timeout(
        Duration::from_secs(10),
        raft.change_membership(remove, false),
    )
    .await
    {
        Ok(Ok(_)) => {
            tracing::info!(id, "removed the learner of a failed join");
            Ok(true)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the change did not commit within 10 s".into()),
    }
}

/// The one gate every proposal passes before it reaches Raft: a command some member's
/// protocol cannot apply is refused, because that member would fail to apply the entry
/// (log entries are the compatibility contract between the binaries of one rollout).
/// `members` are the current members' ids; a member that has not reported yet counts
/// only once it has.
pub(super) fn admit(state: &State, members: &[u64], command: &Command) -> Result<(), ApiError> {
    if let Command::RegisterNode { id, .. } = command {
        // A removed node must not come back into `status` by reporting itself.
        if !members.contains(id) {
            return Err(ApiError::precondition(format!(
                "node {id} is not a member of this cluster (was it removed?): it cannot \
                 report itself; start it with a fresh --data-dir and --join to add it again"
            )));
        }
    }
    let required = command.required_protocol();
    let behind = members
        .iter()
        .filter_map(|id| state.nodes.get(id).map(|info| (*id, info.protocol)))
        .filter(|(_, protocol)| *protocol < required)
        .min_by_key(|(_, protocol)| *protocol);
    match behind {
        None => Ok(()),
        Some((id, protocol)) => Err(ApiError::precondition(format!(
            "refused to propose `{command}`: it needs protocol {required}, and node {id} speaks \
             protocol {protocol}: update every member to a build that speaks protocol \
             {required} first (a rollout can still be paused and resumed)"
        ))),
    }
}

fn server_state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl ControlHandler for NodeHandle {
    async fn update(
        &self,
        manifest: Manifest,
        options: UpdateOptions,
        dry_run: bool,
        hops: u32,
    ) -> Result<UpdateOutcome, ApiError> {
        NodeHandle::update(self, manifest, options, dry_run, hops).await
    }

    fn rollout_view(&self) -> RolloutView {
        NodeHandle::rollout_view(self)
    }

    async fn operate(&self, operation: Operation, hops: u32) -> Result<Operated, ApiError> {
        NodeHandle::operate(self, operation, hops).await
    }

    async fn status(&self, local_only: bool, hops: u32) -> Result<ClusterStatus, ApiError> {
        NodeHandle::status(self, local_only, hops).await
    }

    async fn write(&self, command: Command, hops: u32) -> Result<WriteOutcome, ApiError> {
        NodeHandle::write(self, command, hops).await
    }

    async fn kv_get(&self, key: String, hops: u32) -> Result<Option<String>, ApiError> {
        NodeHandle::kv_get(self, &key, hops).await
    }

    async fn join(&self, request: JoinRequest, hops: u32) -> Result<JoinAccepted, ApiError> {
        NodeHandle::join(self, request, hops).await
    }

    async fn transfer_leader(&self, to: u64, hops: u32) -> Result<TransferDone, ApiError> {
        NodeHandle::transfer_leader(self, to, hops).await
    }

    async fn members(&self, hops: u32) -> Result<MembersView, ApiError> {
        NodeHandle::member_list(self, hops).await
    }

    async fn remove_member(
        &self,
        id: u64,
        force: bool,
        hops: u32,
    ) -> Result<MemberRemoved, ApiError> {
        NodeHandle::remove_member(self, id, force, hops).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MEMBERS_PROTOCOL, OPERATE_PROTOCOL, PROTOCOL, ROLLOUT_PROTOCOL};

    fn state(protocols: &[(u64, u32)]) -> State {
        let mut state = State::default();
        for (id, protocol) in protocols {
            state.apply(&Command::RegisterNode {
                id: *id,
                info: NodeInfo {
                    protocol: *protocol,
                    ..NodeInfo::default()
                },
            });
        }
        state
    }

    #[test]
    fn the_proposal_gate_refuses_what_a_member_cannot_apply() {
        let auto_off = Command::SetAutoRollout {
            enabled: false,
            at_ms: 0,
        };
        let kv = Command::KvPut {
            key: "k".into(),
            value: "v".into(),
        };
        let mixed = state(&[(1, PROTOCOL), (2, ROLLOUT_PROTOCOL), (3, PROTOCOL)]);
        let refused = admit(&mixed, &[1, 2, 3], &auto_off).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::FailedPrecondition);
        assert!(refused.message.contains("node 2"), "{}", refused.message);
        assert!(
            refused
                .message
                .contains(&format!("protocol {OPERATE_PROTOCOL}")),
            "{}",
            refused.message
        );
        // Every member knows a kv write.
        admit(&mixed, &[1, 2, 3], &kv).unwrap();
        // A node that is no longer a member does not hold the cluster back.
        admit(&mixed, &[1, 3], &auto_off).unwrap();
        // Nor does a member that has not reported yet.
        admit(&state(&[(1, PROTOCOL)]), &[1, 4], &auto_off).unwrap();
        // A node reports itself only while it is a member: a removed one stays out.
        let report = |id| Command::RegisterNode {
            id,
            info: NodeInfo::default(),
        };
        admit(&mixed, &[1, 2, 3], &report(3)).unwrap();
        let refused = admit(&mixed, &[1, 2], &report(3)).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::FailedPrecondition);
        assert!(
            refused.message.contains("node 3 is not a member"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn forgetting_a_node_waits_for_every_member_to_speak_protocol_four() {
        let forget = Command::ForgetNode { id: 3 };
        let mixed = state(&[(1, MEMBERS_PROTOCOL), (2, OPERATE_PROTOCOL)]);
        let refused = admit(&mixed, &[1, 2], &forget).unwrap_err();
        assert_eq!(refused.kind, ErrorKind::FailedPrecondition);
        assert!(
            refused.message.contains("node 2 speaks protocol 3")
                && refused
                    .message
                    .contains(&format!("protocol {MEMBERS_PROTOCOL}")),
            "{}",
            refused.message
        );
        let current = state(&[(1, MEMBERS_PROTOCOL), (2, MEMBERS_PROTOCOL)]);
        admit(&current, &[1, 2], &forget).unwrap();
    }
}
