//! The rollout runtime: the I/O around the pure engine. It gathers the preflight snapshot,
//! starts deployments, and, on the leader, executes the engine's actions (proposals, agent
//! operations, health polls, leadership hand-off) and feeds their outcomes back as events.
//!
//! The replicated deployment is the source of truth: the runtime keeps nothing that a new
//! leader could not rebuild, so a leader change only drops an engine, never a rollout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::auto::{backoff_ms, decide, Decision, Settle, Watched};
use super::engine::{Action, AgentOp, Engine, Event, Health, Liveness, Now};
use super::plan::{plan, Plan, Start};
use super::preflight::{preflight, ActiveRollout, Member, Options, Report, Survey, TargetDist};
use crate::agent::{Agent, Fence, Mutation};
use crate::api::ApiError;
use crate::release::{Limits, Manifest};
use crate::node::NodeHandle;
use crate::raft;
use crate::rpc::{AgentClient, ControlClient};
use crate::state::deployment::short_hash;
use crate::state::{
    Command, Deployment, DeploymentState, Fleet, Response, Role, Starter, Strategy,
};

/// What `cluster update` asks for, besides the dist.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct UpdateOptions {
    pub strategy: Strategy,
    pub allow_downtime: bool,
    /// `None`: 2 x heartbeat.
    pub stale_ack_ms: Option<u64>,
    pub started_by: Starter,
    /// Label of the dist for messages (the operator's path).
    pub dist_label: String,
    /// Why the deployment begins, for history (`None`: the operator's dist).
    pub trigger: Option<String>,
    /// Members left out of the plan (nodes that already failed on this build).
    pub skip: Vec<u64>,
}

/// The answer to an update request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    pub report: Report,
    pub plan: Plan,
    /// Generation of the started deployment; 0 when nothing was started.
    pub generation: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Gathers what preflight judges, on the leader, with a fresh quorum round trip.
pub async fn gather_snapshot(
    node: &NodeHandle,
    agent: &Agent,
    manifest: &Manifest,
    dist_label: &str,
    dry_run: bool,
) -> Survey {
    let leadership = node
        .raft
        .ensure_linearizable(ReadPolicy::ReadIndex)
        .await
        .map_err(|e| e.to_string());
    let metrics = raft::metrics(&node.raft);
    let replication = raft::replication(&node.raft);
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let members: Vec<(u64, String, Role)> = membership
        .nodes()
        .map(|(id, n)| {
            let role = if voters.contains(id) {
                Role::Voter
            } else {
                Role::Learner
            };
            (*id, n.addr.clone(), role)
        })
        .collect();
    let probes = members.into_iter().map(|(id, addr, role)| {
        let repl = replication.get(&id).copied().unwrap_or_default();
        async move {
            let mut member = Member {
                id,
                addr: addr.clone(),
                role,
                last_ack_ms: repl.last_ack.map(|a| a.as_millis() as u64),
                matched_index: repl.matched_index,
                ..Member::default()
            };
            probe_member(node, &mut member, manifest).await;
            member
        }
    });
    let members = futures::future::join_all(probes).await;
    let hash = manifest.build_hash();
    let error = manifest
        .validate(&Limits::default())
        .err()
        .map(|e| e.to_string())
        .or_else(|| {
            // A dry run uploads nothing: the leader fetching the release is part of the plan.
            (!dry_run && !agent.store().has(&hash)).then(|| {
                format!(
                    "the leader (node {}) does not hold release {hash}: upload the dist to it first",
                    node.id
                )
            })
        });
    Survey {
        leader: node.id,
        term: metrics.current_term,
        leadership_confirmed: leadership.is_ok(),
        leadership_error: leadership.err(),
        members,
        last_log_index: metrics.last_log_index.unwrap_or(0),
        heartbeat_ms: node.timing.heartbeat.as_millis() as u64,
        active_rollout: node.sm.read(|s| {
            s.deployment.as_ref().map(|d| ActiveRollout {
                generation: d.generation,
                state: d.state,
                target_hash: d.target_hash.clone(),
            })
        }),
        dist: TargetDist {
            dir: dist_label.to_string(),
            build_hash: hash,
            files: manifest.file_count(),
            total_bytes: manifest.total_bytes(),
            error,
        },
    }
}

/// Asks one member how it is: its own status view, its free disk and what it must fetch.
async fn probe_member(node: &NodeHandle, member: &mut Member, manifest: &Manifest) {
    let timeout = Duration::from_secs(2);
    let status = match ControlClient::with_channels(&node.channels, &member.addr) {
        Ok(client) => client.timeout(timeout).status(true).await,
        Err(e) => Err(e),
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            member.unreachable_reason = Some(e.message);
            return;
        }
    };
    member.reachable = true;
    if let Some(me) = status.nodes.iter().find(|n| n.id == member.id) {
        member.serving = me.state != "shutdown";
        member.build_hash = me.build_hash.clone();
        member.protocol = me.protocol;
        member.applied_index = me.applied_index;
        member.health_problem = me.health_problem.clone();
    }
    let agent = AgentClient::with_channels(&node.channels, &member.addr);
    if let Ok(mut agent) = agent {
        if let Ok(view) = agent.releases().await {
            member.free_bytes = view.free_bytes;
        }
        match agent.missing(manifest).await {
            Ok((_, bytes)) => member.needed_bytes = bytes,
            Err(e) => member.health_problem = Some(format!("cannot plan the sync: {e}")),
        }
    }
}

/// Runs preflight and, unless `dry_run` or preflight fails, starts the deployment.
pub async fn update(
    node: &NodeHandle,
    agent: &Agent,
    manifest: Manifest,
    options: UpdateOptions,
    dry_run: bool,
) -> Result<UpdateOutcome, ApiError> {
    let snapshot = gather_snapshot(node, agent, &manifest, &options.dist_label, dry_run).await;
    let preflight_options = Options {
        allow_downtime: options.allow_downtime,
        stale_ack_ms: options.stale_ack_ms,
        ..Options::default()
    };
    let report = preflight(&snapshot, &preflight_options);
    let mut planned = snapshot.clone();
    planned.members.retain(|m| !options.skip.contains(&m.id));
    let plan = plan(&planned, options.strategy.max_parallel.max(1));
    if dry_run || !report.proceed {
        return Ok(UpdateOutcome {
            report,
            plan,
            generation: 0,
        });
    }
    let mut strategy = options.strategy.clone();
    strategy.stale_ack_ms = preflight_options.stale_ack_limit_ms(snapshot.heartbeat_ms);
    strategy.allow_downtime = options.allow_downtime;
    let generation = node.sm.read(|s| s.last_generation) + 1;
    let deployment = plan
        .deployment(Start {
            generation,
            manifest,
            strategy,
            started_by: options.started_by,
            trigger: options.trigger.clone().or_else(|| {
                (!options.dist_label.is_empty()).then(|| {
                    format!(
                        "{} ran `cluster update --dist {}`",
                        options.started_by, options.dist_label
                    )
                })
            }),
            term: snapshot.term,
            now_ms: unix_ms(),
        })
        .map_err(|e| ApiError::precondition(e.to_string()))?;
    let outcome = node
        .write(Command::BeginDeployment { deployment }, 0)
        .await?;
    if let Response::Rejected { reason } = outcome.response {
        return Err(ApiError::precondition(reason));
    }
    Ok(UpdateOutcome {
        report,
        plan,
        generation,
    })
}

/// Drives active deployments whenever this node leads, until `stop`.
pub async fn drive(node: Arc<NodeHandle>, agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    // One engine per term: its request numbers must keep increasing within the term, or
    // agents would refuse its requests as older than ones they already ran.
    let mut engine: Option<Engine> = None;
    let mut engine_term = 0;
    // The engine's clock: it must never go backwards for one engine.
    let epoch = Instant::now();
    loop {
        let leading = node.raft.is_leader() && node.sm.read(|s| s.deployment.is_some());
        if leading {
            let term = raft::metrics(&node.raft).current_term;
            if engine.is_none() || engine_term != term {
                engine = Some(Engine::new(node.id, term));
                engine_term = term;
            }
            let current = engine.as_mut().expect("engine set above");
            // Whatever it was waiting for may have been lost while it was not driving.
            current.resync();
            tokio::select! {
                _ = drive_term(&node, &agent, term, current, epoch) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let mut notes = node.notes.lock().expect("notes lock");
            notes.waiting = None;
            notes.soak_left_ms = None;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Drives with `engine` while this node leads in `term`: returns when the deployment is
/// finished, this node stops leading, or a proposal could not be committed.
async fn drive_term(
    node: &Arc<NodeHandle>,
    agent: &Arc<Agent>,
    term: u64,
    engine: &mut Engine,
    epoch: Instant,
) {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    // Leader commit index when each node was last asked to restart: "caught up" means
    // having applied at least that much after coming back.
    let mut commit_at_restart: BTreeMap<u64, u64> = BTreeMap::new();
    let mut next_event = Event::Tick;
    loop {
        if !node.raft.is_leader() || raft::metrics(&node.raft).current_term != term {
            return;
        }
        let Some(deployment) = node.sm.read(|s| s.deployment.clone()) else {
            return;
        };
        let now = Now {
            monotonic_ms: epoch.elapsed().as_millis() as u64,
            unix_ms: unix_ms(),
        };
        engine.observe(liveness(node));
        let actions = engine.step(&deployment, next_event, now);
        {
            let mut notes = node.notes.lock().expect("notes lock");
            notes.waiting = engine.waiting().map(String::from);
            notes.soak_left_ms = engine.soak_left_ms(&deployment, now.monotonic_ms);
        }
        let mut refused = false;
        for action in actions {
            if refused {
                break;
            }
            match action {
                Action::Propose(command) => match node.write(command, 0).await {
                    Ok(outcome) => {
                        if let Response::Rejected { reason } = outcome.response {
                            // The replicated record moved on (e.g. an operator command):
                            // skip the rest of this batch and decide again from it.
                            tracing::info!(%reason, "rollout proposal refused; re-reading the deployment");
                            engine.resync();
                            refused = true;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rollout proposal failed; will retry while leading");
                        return;
                    }
                },
                Action::Agent {
                    node: target,
                    id,
                    generation,
                    op,
                } => {
                    if matches!(op, AgentOp::Restart | AgentOp::Restore { .. }) {
                        let commit = raft::metrics(&node.raft)
                            .cluster_committed
                            .map(|l| l.index)
                            .unwrap_or(0);
                        commit_at_restart.insert(target, commit);
                    }
                    let events = events_tx.clone();
                    let node = node.clone();
                    let agent = agent.clone();
                    let deployment = deployment.clone();
                    tokio::spawn(async move {
                        let fence = Fence {
                            generation,
                            term: id.term,
                            seq: id.seq,
                        };
                        let result =
                            run_agent_op(&node, &agent, &deployment, target, fence, op).await;
                        let _ = events.send(Event::StepDone {
                            node: target,
                            id,
                            result: result.map_err(|e| e.message),
                        });
                    });
                }
                Action::PollHealth { node: target, id } => {
                    let events = events_tx.clone();
                    let node = node.clone();
                    let addr = deployment
                        .nodes
                        .get(&target)
                        .map(|s| s.addr.clone())
                        .unwrap_or_default();
                    let since = commit_at_restart.get(&target).copied().unwrap_or(0);
                    let timeout =
                        Duration::from_millis(deployment.strategy.poll_interval_ms.max(500));
                    let undone = (deployment.generation, deployment.target_hash.clone());
                    tokio::spawn(async move {
                        let health =
                            poll_health(&node, target, &addr, since, timeout, undone).await;
                        let _ = events.send(Event::HealthObserved {
                            node: target,
                            id,
                            health,
                        });
                    });
                }
                Action::TransferLeadership { to } => {
                    let events = events_tx.clone();
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(e) = node.transfer_leader(to, 0).await {
                            let _ = events.send(Event::TransferFailed {
                                to,
                                reason: e.message,
                            });
                        }
                    });
                }
                Action::RestartSelf { reason } => {
                    tracing::warn!(%reason, "restarting this node so another voter leads");
                    agent.request_restart();
                    return;
                }
                Action::Finish(summary) => {
                    tracing::info!(
                        generation = summary.generation,
                        outcome = summary.outcome.as_str(),
                        updated = ?summary.updated,
                        "rollout finished"
                    );
                    return;
                }
            }
        }
        if refused {
            next_event = Event::Tick;
            continue;
        }
        let tick = Duration::from_millis(deployment.strategy.poll_interval_ms.clamp(20, 200));
        next_event = tokio::select! {
            Some(event) = events_rx.recv() => event,
            _ = tokio::time::sleep(tick) => Event::Tick,
        };
    }
}

/// Every member's role and acknowledgement age, as this leader sees them.
fn liveness(node: &NodeHandle) -> BTreeMap<u64, Liveness> {
    let metrics = raft::metrics(&node.raft);
    let replication = raft::replication(&node.raft);
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, _)| {
            let role = if voters.contains(id) {
                Role::Voter
            } else {
                Role::Learner
            };
            let last_ack_ms = if *id == node.id {
                Some(0)
            } else {
                replication
                    .get(id)
                    .and_then(|r| r.last_ack)
                    .map(|a| a.as_millis() as u64)
            };
            (*id, Liveness { role, last_ack_ms })
        })
        .collect()
}

/// Executes one agent operation on `target` (locally when it is this node).
async fn run_agent_op(
    node: &NodeHandle,
    agent: &Agent,
    deployment: &Deployment,
    target: u64,
    fence: Fence,
    op: AgentOp,
) -> Result<(), ApiError> {
    let addr = deployment
        .nodes
        .get(&target)
        .map(|s| s.addr.clone())
        .ok_or_else(|| ApiError::internal(format!("node {target} is not in the deployment")))?;
    let mutation = match op {
        AgentOp::Prepare { sources, .. } => {
            // Peers that hold the release: the engine's sources first, then the leader,
            // which always holds it (preflight checked).
            let mut peers: Vec<String> = sources
                .iter()
                .filter(|id| **id != target)
                .filter_map(|id| deployment.nodes.get(id).map(|s| s.addr.clone()))
                .collect();
            if target != node.id {
                peers.push(node.addr.clone());
            }
            if target == node.id {
                agent.prepare(deployment.manifest.clone(), peers).await?;
            } else {
                AgentClient::with_channels(&node.channels, &addr)?
                    .prepare(&deployment.manifest, peers)
                    .await?;
            }
            return Ok(());
        }
        AgentOp::PinPrevious { .. } => Mutation::PinPrevious,
        AgentOp::Activate { hash } => Mutation::Activate(hash),
        AgentOp::Restart => Mutation::Restart,
        AgentOp::Restore { hash } => Mutation::Restore(hash),
        AgentOp::Commit { hash } => Mutation::Commit(hash),
    };
    if target == node.id {
        agent.mutate(fence, mutation).await?;
    } else {
        AgentClient::with_channels(&node.channels, &addr)?
            .mutate(fence, mutation)
            .await?;
    }
    Ok(())
}

/// Asks `target` how it is and merges the leader's view (acknowledgement age).
async fn poll_health(
    node: &NodeHandle,
    target: u64,
    addr: &str,
    commit_at_restart: u64,
    timeout: Duration,
    undone: (u64, String),
) -> Result<Health, String> {
    // The boot guard's restore of this deployment's release, if the node reports one.
    let guard_restored = |restore: &Option<crate::state::GuardRestore>| {
        restore
            .as_ref()
            .filter(|r| r.generation == undone.0 && r.to == undone.1)
            .map(|r| {
                format!(
                    "its boot guard gave up on build {} and put {} back: {}",
                    short_hash(&r.to),
                    short_hash(&r.from),
                    r.reason
                )
            })
    };
    if target == node.id {
        return Ok(Health {
            serving: true,
            build_hash: node.info.build_hash.clone(),
            boot_id: node.info.boot_id.clone(),
            caught_up: true,
            last_ack_ms: Some(0),
            problem: node.health.problem(),
            guard_restored: guard_restored(&node.info.last_auto_restore),
        });
    }
    let status = ControlClient::with_channels(&node.channels, addr)
        .map_err(|e| e.message)?
        .timeout(timeout)
        .status(true)
        .await
        .map_err(|e| e.message)?;
    let me = status
        .nodes
        .iter()
        .find(|n| n.id == target)
        .ok_or_else(|| format!("node {target} at {addr} does not list itself as a member"))?;
    let last_ack_ms = raft::replication(&node.raft)
        .get(&target)
        .and_then(|r| r.last_ack)
        .map(|a| a.as_millis() as u64);
    let applied = me.applied_index.unwrap_or(0);
    Ok(Health {
        serving: me.state != "shutdown",
        build_hash: me.build_hash.clone(),
        boot_id: me.boot_id.clone(),
        caught_up: applied >= commit_at_restart && me.state != "candidate",
        last_ack_ms,
        problem: me.health_problem.clone(),
        guard_restored: guard_restored(&me.last_auto_restore),
    })
}

/// The active deployment and the history, as `cluster rollout status|history` show them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct RolloutView {
    pub deployment: Option<Deployment>,
    pub history: Vec<crate::state::HistoryEntry>,
    pub fleet: Fleet,
    /// Only when the answering node leads.
    pub notes: Option<LeaderNotes>,
}

/// What only the leader knows, for status: why its rollout waits, how long the soak has
/// left, and what its automatic rollouts are doing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct LeaderNotes {
    /// The node that wrote these notes (the leader).
    pub leader: u64,
    /// Why the active rollout cannot start its next node.
    pub waiting: Option<String>,
    /// Time left in the soak after the last commit, while one runs.
    pub soak_left_ms: Option<u64>,
    pub auto: AutoStatus,
}

/// The leader's automatic rollouts: the watched directory and the latest decision.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct AutoStatus {
    /// The leader's `watch_dist`, if configured.
    pub watch_dist: Option<String>,
    /// `idle`, `off`, `settling`, `waiting` (a failed preflight, retried with backoff),
    /// `started` or `blocked` (a problem only an operator can fix).
    pub state: String,
    pub detail: Option<String>,
    /// Time until the next attempt, while `waiting`.
    pub retry_in_ms: Option<u64>,
}

/// An operator's command on rollouts (`cluster rollout pause|resume|abort|auto`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// Start no further node; the node in flight finishes its step.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop: restore nodes caught mid-update and, with `revert`, every updated node.
    Abort { revert: bool },
    /// Switch automatic rollouts on or off, cluster-wide.
    Auto { enabled: bool },
}

/// What an operation did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Operated {
    pub message: String,
    /// The deployment it applied to; 0 for auto on/off.
    pub generation: u64,
}

/// Carries out `operation` on the leader: one replicated command.
pub async fn operate(node: &NodeHandle, operation: Operation) -> Result<Operated, ApiError> {
    let now = unix_ms();
    // Pause and resume use rollout commands every member knows; the rest are newer.
    if !matches!(operation, Operation::Pause | Operation::Resume) {
        let min = node.sm.read(|s| s.min_protocol()).unwrap_or(0);
        if min < crate::state::OPERATE_PROTOCOL {
            return Err(ApiError::precondition(format!(
                "a member speaks protocol {min}, which cannot apply this command: update every \
                 member to protocol {} first (a rollout can still be paused)",
                crate::state::OPERATE_PROTOCOL
            )));
        }
    }
    if let Operation::Auto { enabled } = operation {
        let command = Command::SetAutoRollout {
            enabled,
            at_ms: now,
        };
        commit(node, command).await?;
        let message = if enabled {
            "automatic rollouts are on: the leader rolls out new builds in its watched \
             directory and brings nodes on another build to the target"
        } else {
            "automatic rollouts are off: only `cluster update` starts a rollout"
        };
        return Ok(Operated {
            message: message.into(),
            generation: 0,
        });
    }
    let Some((generation, state)) = node
        .sm
        .read(|s| s.deployment.as_ref().map(|d| (d.generation, d.state)))
    else {
        return Err(ApiError::precondition(
            "no rollout is active: nothing to pause, resume or abort",
        ));
    };
    let (command, message) = match operation {
        Operation::Pause => (
            Command::SetDeploymentState {
                generation,
                state: DeploymentState::Paused,
                reason: Some("paused by an operator".into()),
                at_ms: now,
            },
            format!(
                "rollout {generation} paused: no further node starts; a node in flight \
                 finishes its step (resume with `cluster rollout resume`)"
            ),
        ),
        Operation::Resume => (
            Command::SetDeploymentState {
                generation,
                state: DeploymentState::Running,
                reason: None,
                at_ms: now,
            },
            format!("rollout {generation} resumed"),
        ),
        Operation::Abort { revert } => {
            let reason = if revert {
                "aborted by an operator, reverting updated nodes"
            } else {
                "aborted by an operator"
            };
            (
                Command::AbortDeployment {
                    generation,
                    revert,
                    reason: reason.into(),
                    at_ms: now,
                },
                if revert {
                    format!(
                        "rollout {generation} aborted: every updated node is being restored \
                         to its previous build"
                    )
                } else {
                    format!(
                        "rollout {generation} aborted: nodes caught mid-update are restored; \
                         committed nodes stay on the new build"
                    )
                },
            )
        }
        Operation::Auto { .. } => unreachable!("handled above"),
    };
    if operation == Operation::Resume && state != DeploymentState::Paused {
        return Err(ApiError::precondition(format!(
            "rollout {generation} is {state}, not paused: nothing to resume"
        )));
    }
    if operation == Operation::Pause && state == DeploymentState::Paused {
        return Ok(Operated {
            message: format!("rollout {generation} is already paused"),
            generation,
        });
    }
    commit(node, command).await?;
    Ok(Operated {
        message,
        generation,
    })
}

/// Replicates `command` and turns a refusal into an error.
async fn commit(node: &NodeHandle, command: Command) -> Result<(), ApiError> {
    let outcome = node.write(command, 0).await?;
    match outcome.response {
        Response::Rejected { reason } => Err(ApiError::precondition(reason)),
        Response::Ok => Ok(()),
    }
}

/// How a node's leader runs automatic rollouts (from `node run` settings).
#[derive(Clone, Debug)]
pub struct AutoConfig {
    /// The directory whose new builds the leader rolls out by itself.
    pub watch_dist: Option<PathBuf>,
    /// How long the watched directory must stay unchanged before its build counts.
    pub settle: Duration,
    /// The pace of automatic rollouts (and catch-ups).
    pub strategy: Strategy,
    /// Their acknowledgement limit (`None`: 2 x heartbeat), as `cluster update --stale-ack-ms`.
    pub stale_ack_ms: Option<u64>,
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            watch_dist: None,
            settle: Duration::from_secs(5),
            strategy: Strategy {
                soak_ms: DEFAULT_SOAK_MS,
                ..Strategy::default()
            },
            stale_ack_ms: None,
        }
    }
}

/// The soak `cluster update` and automatic rollouts use unless told otherwise.
pub const DEFAULT_SOAK_MS: u64 = 180_000;

/// How often the leader looks at its watched directory and the members' builds.
const AUTO_INTERVAL: Duration = Duration::from_millis(500);

/// The leader's automatic rollouts, until `stop`: every [`AUTO_INTERVAL`], while this
/// node leads, decide (see [`super::auto`]) and start what the decision says.
pub async fn auto(
    node: Arc<NodeHandle>,
    agent: Arc<Agent>,
    config: AutoConfig,
    mut stop: watch::Receiver<bool>,
) {
    let epoch = Instant::now();
    let settle_ms = config.settle.as_millis() as u64;
    let mut settle = Settle::default();
    // The watched directory's fingerprint and what hashing it gave, so a settled
    // directory is hashed once, not every interval.
    let mut hashed: Option<(u64, Result<String, String>)> = None;
    let mut failures = 0u32;
    let mut retry_at_ms = 0u64;
    let mut logged = String::new();
    let label = config.watch_dist.as_ref().map(|d| d.display().to_string());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(AUTO_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !node.raft.is_leader() {
            failures = 0;
            continue;
        }
        let now = epoch.elapsed().as_millis() as u64;
        let mut status = AutoStatus {
            watch_dist: label.clone(),
            ..AutoStatus::default()
        };
        let mut note = None;
        let watched = match &config.watch_dist {
            None => None,
            Some(dir) => {
                let dir = dir.clone();
                let fingerprint = tokio::task::spawn_blocking({
                    let dir = dir.clone();
                    move || fingerprint(&dir)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match fingerprint {
                    Err(e) => {
                        note = Some(format!("cannot read the watched directory: {e}"));
                        None
                    }
                    Ok(None) => None,
                    Ok(Some(print)) if !settle.observe(print, now, settle_ms) => {
                        note = Some(format!(
                            "{} changed recently: waiting {} ms for it to settle",
                            dir.display(),
                            settle.left_ms(now, settle_ms)
                        ));
                        None
                    }
                    Ok(Some(print)) => {
                        if hashed.as_ref().map(|(p, _)| *p) != Some(print) {
                            let result = tokio::task::spawn_blocking({
                                let dir = dir.clone();
                                move || build_hash_of_complete(&dir)
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                            hashed = Some((print, result));
                        }
                        match hashed.as_ref().map(|(_, r)| r) {
                            Some(Ok(hash)) => Some(Watched {
                                hash: hash.clone(),
                                dir: dir.display().to_string(),
                            }),
                            Some(Err(e)) => {
                                note = Some(format!(
                                    "the watched directory is not a complete build: {e}"
                                ));
                                None
                            }
                            None => None,
                        }
                    }
                }
            }
        };
        let members: Vec<u64> = raft::metrics(&node.raft)
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        let decision = node
            .sm
            .read(|s| decide(s, &members, &node.info.build_hash, watched.as_ref()));
        match decision {
            Decision::Off => {
                status.state = "off".into();
                status.detail =
                    Some("switched off cluster-wide (`cluster rollout auto on`)".into());
            }
            Decision::Busy => {
                failures = 0;
                status.state = "idle".into();
                status.detail = Some("a rollout is active".into());
            }
            Decision::Idle => {
                status.state = if note.is_some() { "settling" } else { "idle" }.into();
                status.detail = note.clone();
            }
            Decision::Blocked { reason } => {
                status.state = "blocked".into();
                status.detail = Some(reason);
            }
            Decision::Roll { .. } if now < retry_at_ms => {
                status.state = "waiting".into();
                status.detail = node.notes.lock().expect("notes lock").auto.detail.clone();
                status.retry_in_ms = Some(retry_at_ms - now);
            }
            Decision::Roll {
                hash,
                trigger,
                skip,
                from_watch,
            } => {
                let dist_label = if from_watch {
                    label.clone().unwrap_or_default()
                } else {
                    format!("the cluster's target {}", short_hash(&hash))
                };
                let source = from_watch.then(|| config.watch_dist.clone()).flatten();
                let started = start_automatic(
                    &node,
                    &agent,
                    source,
                    &hash,
                    UpdateOptions {
                        strategy: config.strategy.clone(),
                        stale_ack_ms: config.stale_ack_ms,
                        started_by: Starter::Automatic,
                        dist_label,
                        trigger: Some(trigger.clone()),
                        skip,
                        ..UpdateOptions::default()
                    },
                )
                .await;
                match started {
                    Ok(generation) => {
                        failures = 0;
                        retry_at_ms = 0;
                        status.state = "started".into();
                        status.detail = Some(format!("rollout {generation}: {trigger}"));
                        tracing::info!(generation, %trigger, "started an automatic rollout");
                    }
                    Err(why) => {
                        failures += 1;
                        let wait = backoff_ms(failures);
                        retry_at_ms = now + wait;
                        status.state = "waiting".into();
                        status.detail = Some(format!("{trigger}: {why}"));
                        status.retry_in_ms = Some(wait);
                    }
                }
            }
        }
        // Log each distinct situation once, not every interval.
        let key = format!("{} {:?}", status.state, status.detail);
        if key != logged && status.state != "idle" {
            match status.state.as_str() {
                "waiting" | "blocked" => tracing::warn!(
                    state = %status.state,
                    detail = status.detail.as_deref().unwrap_or(""),
                    retry_in_ms = status.retry_in_ms,
                    "automatic rollout"
                ),
                _ => tracing::info!(
                    state = %status.state,
                    detail = status.detail.as_deref().unwrap_or(""),
                    "automatic rollout"
                ),
            }
        }
        logged = key;
        node.notes.lock().expect("notes lock").auto = status;
    }
}

/// Installs the watched build on this leader (when it comes from `source`), then runs
/// the same preflight and start as `cluster update`. Returns the new generation.
async fn start_automatic(
    node: &NodeHandle,
    agent: &Arc<Agent>,
    source: Option<PathBuf>,
    hash: &str,
    options: UpdateOptions,
) -> Result<u64, String> {
    if let Some(dir) = source {
        let agent = agent.clone();
        let installed = tokio::task::spawn_blocking(move || {
            agent.store().install_dir(&dir, &Limits::default())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot install the watched build on the leader: {e}"))?;
        if installed != hash {
            return Err(format!(
                "the watched directory changed while it was installed ({} -> {}): trying again",
                short_hash(hash),
                short_hash(&installed)
            ));
        }
    }
    let manifest = agent.store().manifest(hash).map_err(|e| {
        format!(
            "the leader (node {}) does not hold release {}: {e}",
            node.id,
            short_hash(hash)
        )
    })?;
    let outcome = update(node, agent, manifest, options, false)
        .await
        .map_err(|e| e.message)?;
    if !outcome.report.proceed {
        let failed: Vec<String> = outcome
            .report
            .failed()
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(format!("preflight failed: {}", failed.join("; ")));
    }
    Ok(outcome.generation)
}

/// A cheap fingerprint of a directory tree (paths, kinds, sizes, modes, mtimes) to tell
/// whether it is still changing; `None` when it does not exist or is empty.
fn fingerprint(dir: &Path) -> Result<Option<u64>, String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    if !dir.exists() {
        return Ok(None);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut entries = 0u64;
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name().min_depth(1) {
        let entry = entry.map_err(|e| e.to_string())?;
        let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
        entry.path().hash(&mut hasher);
        (meta.mode(), meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
        entries += 1;
    }
    Ok((entries > 0).then(|| hasher.finish()))
}

/// The build hash of the dist at `dir`, when it is complete: a dist with a version.json
/// must match it (a build still being copied in does not).
fn build_hash_of_complete(dir: &Path) -> Result<String, String> {
    let limits = Limits::default();
    if dir.join(crate::release::manifest::VERSION_FILE).exists() {
        crate::release::verify(dir, &limits)
            .map(|info| info.build_hash)
            .map_err(|e| e.to_string())
    } else {
        crate::release::hash(dir, &limits).map_err(|e| e.to_string())
    }
}
