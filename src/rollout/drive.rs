//! Driving a deployment on the leader: executes the engine's actions (proposals, agent
//! operations, health polls, the leadership hand-off) and feeds their outcomes back to
//! it as events.
//!
//! The replicated deployment is the source of truth: nothing here survives a leader
//! change that a new leader could not rebuild from it, so a leader change only drops an
//! engine, never a rollout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::cluster::{Cluster, Issuer, Notes};
use super::engine::{without_manifest, Action, AgentOp, Engine, Event, Health, Liveness, Now};
use crate::api::{ApiError, NodeStatus};
use crate::clock::unix_ms;
use crate::release::Manifest;
use crate::state::deployment::short_hash;
use crate::state::{Deployment, GuardRestore, Response};

/// How often the loop looks for a deployment to drive while it has none (a read of the
/// local state): a new deployment starts within this.
const IDLE_INTERVAL: Duration = Duration::from_millis(20);

/// The longest the engine goes without a step while driving. Polls, deadlines and window
/// ends fall due between answers; a short tick meets them on time instead of up to a poll
/// interval late. A step is a read of the local state and a pure decision.
const MAX_TICK: Duration = Duration::from_millis(20);

/// Drives active deployments whenever this node leads, until `stop`.
pub async fn drive<C: Cluster>(cluster: Arc<C>, notes: Notes, mut stop: watch::Receiver<bool>) {
    // One engine per term: its request numbers must keep increasing within the term, or
    // agents would refuse its requests as older than ones they already ran. They count
    // from this process's incarnation, above any its previous processes sent.
    let mut engine: Option<Engine> = None;
    let mut engine_term = 0;
    // The engine's clock: it must never go backwards for one engine.
    let epoch = Instant::now();
    loop {
        let view = cluster.raft_view();
        if view.leading && cluster.read(|s| s.deployment.is_some()) {
            let term = view.term;
            if engine.is_none() || engine_term != term {
                engine =
                    Some(Engine::new(cluster.id(), term).for_incarnation(cluster.incarnation()));
                engine_term = term;
            }
            let current = engine.as_mut().expect("engine set above");
            // Whatever it was waiting for may have been lost while it was not driving.
            current.resync();
            tokio::select! {
                _ = drive_term(&cluster, &notes, term, current, epoch) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            notes.update(|n| {
                n.waiting = None;
                n.soak_left_ms = None;
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(IDLE_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Drives with `engine` while this node leads in `term`: returns when the deployment is
/// finished, this node stops leading, or a proposal could not be committed.
async fn drive_term<C: Cluster>(
    cluster: &Arc<C>,
    notes: &Notes,
    term: u64,
    engine: &mut Engine,
    epoch: Instant,
) {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    // Leader commit index when each node was last asked to restart: "caught up" means
    // having applied at least that much after coming back.
    let mut commit_at_restart: BTreeMap<u64, u64> = BTreeMap::new();
    // The deployment's manifest, read from the state once per generation: the engine
    // never needs it, and copying it every tick would copy megabytes for a large dist.
    let mut manifest: Option<(u64, Arc<Manifest>)> = None;
    // Whether this leader runs the target's bin/cluster, per generation.
    let mut in_place: Option<(u64, bool)> = None;
    let mut next_event = Event::Tick;
    loop {
        let view = cluster.raft_view();
        if !view.leading || view.term != term {
            return;
        }
        let Some(deployment) = cluster.read(|s| s.deployment.as_ref().map(without_manifest)) else {
            return;
        };
        let now = Now {
            monotonic_ms: epoch.elapsed().as_millis() as u64,
            unix_ms: unix_ms(),
        };
        engine.observe(liveness(cluster.as_ref()));
        if in_place.is_none_or(|(generation, _)| generation != deployment.generation) {
            let same = cluster.runs_binary_of(&deployment.target_hash).await;
            in_place = Some((deployment.generation, same));
        }
        engine.update_in_place(in_place.is_some_and(|(_, same)| same));
        let actions = engine.step(&deployment, next_event, now);
        notes.update(|n| {
            n.waiting = engine.waiting().map(String::from);
            n.soak_left_ms = engine.soak_left_ms(&deployment, now.monotonic_ms);
        });
        let mut refused = false;
        for action in actions {
            if refused {
                break;
            }
            match action {
                Action::Propose(command) => match cluster.propose(command).await {
                    Ok(Response::Rejected { reason }) => {
                        // The replicated record moved on (e.g. an operator command):
                        // skip the rest of this batch and decide again from it.
                        tracing::info!(%reason, "rollout proposal refused; re-reading the deployment");
                        engine.resync();
                        refused = true;
                    }
                    Ok(Response::Ok) => crate::crash::point("leader-proposed"),
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
                        commit_at_restart.insert(target, cluster.raft_view().commit_index);
                    }
                    let manifest = match &op {
                        AgentOp::Prepare { .. } => Some(manifest_of(cluster, &mut manifest)),
                        _ => None,
                    };
                    let events = events_tx.clone();
                    let cluster = cluster.clone();
                    let deployment = deployment.clone();
                    tokio::spawn(async move {
                        let issuer = Issuer {
                            generation,
                            term: id.term,
                            seq: id.seq,
                        };
                        let result = run_agent_op(
                            cluster.as_ref(),
                            &deployment,
                            manifest.flatten(),
                            target,
                            issuer,
                            op,
                        )
                        .await;
                        let _ = events.send(Event::StepDone {
                            node: target,
                            id,
                            result: result.map_err(|e| e.message),
                        });
                    });
                }
                Action::PollHealth { node: target, id } => {
                    let events = events_tx.clone();
                    let cluster = cluster.clone();
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
                            poll_health(cluster.as_ref(), target, &addr, since, timeout, undone)
                                .await;
                        let _ = events.send(Event::HealthObserved {
                            node: target,
                            id,
                            health,
                        });
                    });
                }
                Action::TransferLeadership { to } => {
                    let events = events_tx.clone();
                    let cluster = cluster.clone();
                    tokio::spawn(async move {
                        if let Err(e) = cluster.transfer_leader(to).await {
                            let _ = events.send(Event::TransferFailed {
                                to,
                                reason: e.message,
                            });
                        }
                    });
                }
                Action::RestartSelf { reason } => {
                    tracing::warn!(%reason, "restarting this node so another voter leads");
                    cluster.request_restart();
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
        let tick = Duration::from_millis(deployment.strategy.poll_interval_ms).min(MAX_TICK);
        next_event = tokio::select! {
            Some(event) = events_rx.recv() => event,
            _ = tokio::time::sleep(tick) => Event::Tick,
        };
    }
}

/// The active deployment's manifest, shared; read from the state once per generation.
/// `None` inside when no deployment is active any more.
fn manifest_of<C: Cluster>(
    cluster: &Arc<C>,
    cached: &mut Option<(u64, Arc<Manifest>)>,
) -> Option<Arc<Manifest>> {
    let generation = cluster.read(|s| s.deployment.as_ref().map(|d| d.generation))?;
    match cached {
        Some((held, manifest)) if *held == generation => Some(manifest.clone()),
        _ => {
            let manifest = cluster.read(|s| {
                s.deployment
                    .as_ref()
                    .map(|d| (d.generation, Arc::new(d.manifest.clone())))
            })?;
            *cached = Some(manifest.clone());
            Some(manifest.1)
        }
    }
}

/// Every member's role and acknowledgement age, as this leader sees them.
fn liveness<C: Cluster>(cluster: &C) -> BTreeMap<u64, Liveness> {
    let me = cluster.id();
    cluster
        .raft_view()
        .members
        .into_iter()
        .map(|m| {
            let last_ack_ms = if m.id == me { Some(0) } else { m.last_ack_ms };
            (
                m.id,
                Liveness {
                    role: m.role,
                    last_ack_ms,
                },
            )
        })
        .collect()
}

/// Executes one agent operation on `target`.
async fn run_agent_op<C: Cluster>(
    cluster: &C,
    deployment: &Deployment,
    manifest: Option<Arc<Manifest>>,
    target: u64,
    issuer: Issuer,
    op: AgentOp,
) -> Result<(), ApiError> {
    let addr = deployment
        .nodes
        .get(&target)
        .map(|s| s.addr.clone())
        .ok_or_else(|| ApiError::internal(format!("node {target} is not in the deployment")))?;
    let AgentOp::Prepare { sources, .. } = &op else {
        return cluster.mutate(target, &addr, issuer, op).await;
    };
    let manifest = manifest.ok_or_else(|| {
        ApiError::precondition(format!(
            "rollout {} is no longer active: nothing to prepare",
            deployment.generation
        ))
    })?;
    // Peers that hold the release: the engine's sources first, then the leader, which
    // always holds it (preflight checked).
    let mut peers: Vec<String> = sources
        .iter()
        .filter(|id| **id != target)
        .filter_map(|id| deployment.nodes.get(id).map(|s| s.addr.clone()))
        .collect();
    if target != cluster.id() {
        peers.push(cluster.addr());
    }
    cluster.prepare(target, &addr, manifest, peers).await
}

/// Asks `target` how it is and merges the leader's view (acknowledgement age).
async fn poll_health<C: Cluster>(
    cluster: &C,
    target: u64,
    addr: &str,
    commit_at_restart: u64,
    timeout: Duration,
    undone: (u64, String),
) -> Result<Health, String> {
    // The boot guard's restore of this deployment's release, if the node reports one.
    let guard_restored = |restore: &Option<GuardRestore>| {
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
    let me: NodeStatus = cluster
        .node_status(target, addr, timeout)
        .await
        .map_err(|e| e.message)?;
    if target == cluster.id() {
        return Ok(Health {
            serving: true,
            build_hash: me.build_hash,
            boot_id: me.boot_id,
            caught_up: true,
            last_ack_ms: Some(0),
            problem: me.health_problem,
            guard_restored: guard_restored(&me.last_auto_restore),
        });
    }
    let last_ack_ms = cluster
        .raft_view()
        .members
        .iter()
        .find(|m| m.id == target)
        .and_then(|m| m.last_ack_ms);
    let applied = me.applied_index.unwrap_or(0);
    Ok(Health {
        serving: me.state != "shutdown",
        build_hash: me.build_hash,
        boot_id: me.boot_id,
        caught_up: applied >= commit_at_restart && me.state != "candidate",
        last_ack_ms,
        problem: me.health_problem,
        guard_restored: guard_restored(&me.last_auto_restore),
    })
}

#[cfg(test)]
mod tests;
