//! `--metrics-listen`: the node's Prometheus endpoint. Gauges are read from the node's
//! Raft metrics and replicated state at scrape time; what is counted over time comes
//! from the process's [`crate::metrics::Recorder`].

use std::sync::Arc;
use std::time::Duration;

use super::handle::NodeHandle;
use crate::metrics::{Exposition, Kind};
use crate::raft::LeaderContact;
use crate::state::deployment::{DeploymentState, Phase};

const PHASES: [Phase; 10] = [
    Phase::Pending,
    Phase::Backup,
    Phase::Sync,
    Phase::Activate,
    Phase::Health,
    Phase::Stabilize,
    Phase::Committed,
    Phase::Restoring,
    Phase::Restored,
    Phase::Failed,
];

const STATES: [DeploymentState; 8] = [
    DeploymentState::Running,
    DeploymentState::Paused,
    DeploymentState::Halting,
    DeploymentState::Reverting,
    DeploymentState::Completed,
    DeploymentState::Failed,
    DeploymentState::Reverted,
    DeploymentState::Aborted,
];

const SERVICE_STATES: [&str; 6] = [
    "starting",
    "ready",
    "switched",
    "rolling_back",
    "failed",
    "stopping",
];

/// What a scrape reads besides the node.
pub struct Scrape {
    pub node: Arc<NodeHandle>,
    pub contact: Arc<LeaderContact>,
    pub lease: Duration,
}

/// One scrape of this node.
pub fn render(scrape: &Scrape) -> String {
    let node = &scrape.node;
    let metrics = crate::raft::metrics(&node.raft);
    let mut out = Exposition::default();
    let id = node.id.to_string();

    out.family(
        "cluster_build_info",
        Kind::Gauge,
        "Always 1: the node, the build it runs and the protocol it speaks.",
    );
    out.sample(
        "cluster_build_info",
        &[
            ("node", &id),
            ("build", &node.info().build_hash),
            ("protocol", &crate::state::PROTOCOL.to_string()),
        ],
        1.0,
    );
    let live = crate::raft::has_live_leader(&metrics, node.id, scrape.contact.age(), scrape.lease);
    out.single(
        "cluster_node_serving",
        Kind::Gauge,
        "1 while the node is a member that heard from a live leader (its gRPC health is SERVING).",
        f64::from(u8::from(live)),
    );

    // Raft.
    out.single(
        "cluster_raft_term",
        Kind::Gauge,
        "The Raft term this node is in.",
        metrics.current_term as f64,
    );
    let leads = metrics.state == openraft::ServerState::Leader;
    out.single(
        "cluster_raft_is_leader",
        Kind::Gauge,
        "1 on the leader.",
        f64::from(u8::from(leads)),
    );
    out.single(
        "cluster_raft_leader_id",
        Kind::Gauge,
        "The id of the leader this node knows (0: none).",
        metrics.current_leader.unwrap_or(0) as f64,
    );
    out.single(
        "cluster_raft_last_log_index",
        Kind::Gauge,
        "Index of the last entry in this node's log.",
        metrics.last_log_index.unwrap_or(0) as f64,
    );
    out.single(
        "cluster_raft_commit_index",
        Kind::Gauge,
        "Index of the last entry this node knows to be committed.",
        metrics.local_committed.map_or(0, |id| id.index) as f64,
    );
    out.single(
        "cluster_raft_applied_index",
        Kind::Gauge,
        "Index of the last entry applied to this node's state machine.",
        metrics.last_applied.map_or(0, |id| id.index) as f64,
    );
    let membership = metrics.membership_config.membership();
    out.single(
        "cluster_raft_voters",
        Kind::Gauge,
        "Voters in the membership.",
        membership.voter_ids().count() as f64,
    );
    out.single(
        "cluster_raft_learners",
        Kind::Gauge,
        "Learners in the membership.",
        membership.learner_ids().count() as f64,
    );
    if let Some(age) = scrape.contact.age() {
        out.single(
            "cluster_raft_leader_contact_age_seconds",
            Kind::Gauge,
            "Time since this node last accepted an AppendEntries (heartbeats included) from a leader.",
            age.as_secs_f64(),
        );
    }
    let replication = crate::raft::replication(&node.raft);
    out.family(
        "cluster_raft_peer_ack_age_seconds",
        Kind::Gauge,
        "On the leader: time since each member acknowledged a heartbeat or an append.",
    );
    for (peer, view) in &replication {
        if let Some(age) = view.last_ack {
            out.sample(
                "cluster_raft_peer_ack_age_seconds",
                &[("peer", &peer.to_string())],
                age.as_secs_f64(),
            );
        }
    }
    out.family(
        "cluster_raft_peer_matched_index",
        Kind::Gauge,
        "On the leader: the highest log index known to be stored on each member.",
    );
    for (peer, view) in &replication {
        if let Some(index) = view.matched_index {
            out.sample(
                "cluster_raft_peer_matched_index",
                &[("peer", &peer.to_string())],
                index as f64,
            );
        }
    }

    // Rollouts, from the replicated state: every node says the same.
    node.sm.read(|state| {
        let deployment = state.deployment.as_ref();
        out.single(
            "cluster_rollout_active",
            Kind::Gauge,
            "1 while a rollout is active.",
            f64::from(u8::from(deployment.is_some())),
        );
        out.single(
            "cluster_rollout_generation",
            Kind::Gauge,
            "The generation of the active rollout, else of the last one (0: none yet).",
            deployment
                .map(|d| d.generation)
                .or(state.history.last().map(|h| h.generation))
                .unwrap_or(0) as f64,
        );
        out.family(
            "cluster_rollout_state",
            Kind::Gauge,
            "1 for the active rollout's state (running, paused, halting, reverting).",
        );
        if let Some(d) = deployment {
            for s in STATES {
                out.sample(
                    "cluster_rollout_state",
                    &[("state", s.as_str())],
                    f64::from(u8::from(d.state == s)),
                );
            }
        }
        out.family(
            "cluster_rollout_node_phase",
            Kind::Gauge,
            "1 for each node's phase in the active rollout.",
        );
        if let Some(d) = deployment {
            for (member, step) in &d.nodes {
                let member = member.to_string();
                for phase in PHASES {
                    out.sample(
                        "cluster_rollout_node_phase",
                        &[("node", &member), ("phase", phase.as_str())],
                        f64::from(u8::from(step.phase == phase)),
                    );
                }
            }
        }
        out.family(
            "cluster_node_failure_streak",
            Kind::Gauge,
            "Rollouts in a row, newest first, in which the node failed or was restored.",
        );
        for member in membership.nodes().map(|(id, _)| *id) {
            out.sample(
                "cluster_node_failure_streak",
                &[("node", &member.to_string())],
                f64::from(state.failure_streak(member)),
            );
        }
        out.single(
            "cluster_rollout_auto_enabled",
            Kind::Gauge,
            "1 while leaders may start rollouts by themselves (`cluster rollout auto`).",
            f64::from(u8::from(!state.fleet.auto_disabled)),
        );
    });
    // What only the leader knows: how long the soak after the last commit has left.
    if let Some(left) = leads.then(|| node.notes.get().soak_left_ms).flatten() {
        out.single(
            "cluster_rollout_soak_remaining_seconds",
            Kind::Gauge,
            "On the leader, while a soak runs: its time left.",
            left as f64 / 1000.0,
        );
    }
    // The operator's services on this node.
    let services = node.services.statuses();
    if !services.is_empty() {
        out.family(
            "cluster_service_ready",
            Kind::Gauge,
            "1 while an instance of the current release serves the service and passes its checks.",
        );
        for service in &services {
            let ready = service.state == "ready" && service.problem.is_none();
            out.sample(
                "cluster_service_ready",
                &[("service", &service.name)],
                f64::from(u8::from(ready)),
            );
        }
        out.family(
            "cluster_service_state",
            Kind::Gauge,
            "1 for each service's state: starting, ready, switched, rolling_back, failed, stopping.",
        );
        for service in &services {
            for state in SERVICE_STATES {
                out.sample(
                    "cluster_service_state",
                    &[("service", &service.name), ("state", state)],
                    f64::from(u8::from(service.state == state)),
                );
            }
        }
        out.family(
            "cluster_service_failure_streak",
            Kind::Gauge,
            "Failed checks (or exits) in a row of the service's instance.",
        );
        for service in &services {
            out.sample(
                "cluster_service_failure_streak",
                &[("service", &service.name)],
                f64::from(service.failure_streak),
            );
        }
        out.family(
            "cluster_service_info",
            Kind::Gauge,
            "Always 1: the release the service's active instance runs, and its ingress.",
        );
        for service in &services {
            let release = service
                .active
                .as_ref()
                .map(|a| a.release.as_str())
                .unwrap_or("");
            out.sample(
                "cluster_service_info",
                &[
                    ("service", &service.name),
                    ("release", release),
                    ("listen", &service.listen),
                ],
                1.0,
            );
        }
    }
    crate::metrics::recorder().render(&mut out);
    out.finish()
}

/// The `GET /metrics` app; `super::http::serve` serves it.
pub fn app(scrape: Scrape) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    let scrape = Arc::new(scrape);
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let scrape = scrape.clone();
                async move {
                    (
                        [(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                        render(&scrape),
                    )
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { "cluster node: metrics at /metrics\n" }),
        )
}
