//! The rollout runtime: the I/O around the pure engine. It gathers the preflight snapshot,
//! starts deployments, and, on the leader, executes the engine's actions (proposals, agent
//! operations, health polls, leadership hand-off) and feeds their outcomes back as events.
//!
//! The replicated deployment is the source of truth: the runtime keeps nothing that a new
//! leader could not rebuild, so a leader change only drops an engine, never a rollout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::ReadPolicy;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::engine::{Action, AgentOp, Engine, Event, Health, Now};
use super::plan::{plan, Plan, Start};
use super::preflight::{preflight, ActiveRollout, Member, Options, Report, Snapshot, TargetDist};
use crate::agent::{Agent, Fence, Mutation};
use crate::api::ApiError;
use crate::dist::{Limits, Manifest};
use crate::node::NodeHandle;
use crate::raft;
use crate::rpc::{AgentClient, ControlClient};
use crate::state::{Command, Deployment, Response, Role, Starter, Strategy};

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
) -> Snapshot {
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
    Snapshot {
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
    let plan = plan(&snapshot, options.strategy.max_parallel.max(1));
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
        let actions = engine.step(&deployment, next_event, now);
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
                    tokio::spawn(async move {
                        let health = poll_health(&node, target, &addr, since, timeout).await;
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
) -> Result<Health, String> {
    if target == node.id {
        return Ok(Health {
            serving: true,
            build_hash: node.info.build_hash.clone(),
            boot_id: node.info.boot_id.clone(),
            caught_up: true,
            last_ack_ms: Some(0),
            problem: node.health.problem(),
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
    })
}

/// The active deployment and the history, as `cluster rollout status|history` show them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutView {
    pub deployment: Option<Deployment>,
    pub history: Vec<crate::state::HistoryEntry>,
}
