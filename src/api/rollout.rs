//! The rollout part of the Control schema: what `cluster update` and `cluster rollout`
//! send and receive (the `--json` output of those commands is these types).
//!
//! Plain data: `rollout` computes them, `rpc` carries them, the CLI prints them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::{Deployment, Fleet, HistoryEntry, Role, Starter, Strategy};

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
    /// The operator whose certificate made the request, for history. Set by the node
    /// that received it from the certificate, never taken from a person's request.
    pub operator: Option<String>,
}

/// The answer to an update request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    pub report: Report,
    pub plan: Plan,
    /// Generation of the started deployment; 0 when nothing was started.
    pub generation: u64,
}

/// The verdict: every check, and whether the rollout may proceed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub checks: Vec<Check>,
    pub voters: usize,
    /// Voters that must agree for the cluster to make progress.
    pub quorum: usize,
    /// Voters the cluster can lose and stay available.
    pub can_lose: usize,
    /// Every check passed.
    pub proceed: bool,
}

impl Report {
    /// The checks that failed, in report order.
    pub fn failed(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|check| !check.passed)
    }
}

/// One line of the report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Stable identifier (part of the `--json` schema): `leadership`, `quorum`,
    /// `reachable`, `serving`, `healthy`, `acks`, `caught_up`, `no_active_rollout`,
    /// `dist`, `disk`, `protocol`, `release`, with `--nodes` `targets`, with `--order-by` `order_by`.
    pub name: String,
    pub passed: bool,
    /// Why it passed, or every node that failed it with the figure and a fix.
    pub detail: String,
}

/// The order of a rolling update, as `--dry-run` prints it and the deployment records it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub leader: u64,
    pub target_hash: String,
    /// Nodes updated together; each wave starts when the previous one is committed.
    pub waves: Vec<Vec<u64>>,
    /// Every node of the waves.
    pub nodes: BTreeMap<u64, PlannedNode>,
    /// Members that already run the target: nothing to do on them.
    pub already_current: Vec<u64>,
    /// Members the rollout's selector (`--nodes`) leaves out.
    #[serde(default)]
    pub not_targeted: Vec<u64>,
}

/// One node of the plan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PlannedNode {
    pub role: Role,
    pub addr: String,
    /// What it runs now: its restore target.
    pub from_hash: String,
    /// Bytes it must fetch (chunks no local release holds).
    pub fetch_bytes: u64,
    /// Its labels (node.toml `labels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The active deployment and the history, as `cluster rollout status|history` show them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct RolloutView {
    pub deployment: Option<Deployment>,
    pub history: Vec<HistoryEntry>,
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
    /// `idle`, `off`, `busy` (a rollout is active), `settling`, `waiting` (a failed
    /// preflight, retried with backoff), `started` or `blocked` (a problem only an
    /// operator can fix).
    pub state: String,
    pub detail: Option<String>,
    /// Time until the next attempt, while `waiting`.
    pub retry_in_ms: Option<u64>,
}

/// An operator's command on rollouts (`cluster rollout pause|resume|abort|auto`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
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
    /// Begin the next canary step now, whatever the current one still holds for.
    Promote,
    /// Roll back through the normal pipeline: to the build the newest completed rollout
    /// replaced, or to what generation `N` rolled out, or to a build named by (a prefix
    /// of) its hash.
    Undo {
        to: Option<String>,
        /// The operator asking, for history: set by the node that received the request
        /// from the operator's certificate (`auth::vouch_for_operation`), never taken
        /// from a person's request.
        #[serde(default)]
        by: Option<String>,
    },
}

/// What an operation did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Operated {
    pub message: String,
    /// The deployment it applied to; 0 for auto on/off.
    pub generation: u64,
}

/// The `rollout` key of `cluster status --json`: the active deployment (generation,
/// state, candidate and previous builds, per-node phase, why it waits), the cluster's
/// target, the automatic-rollout switch, per-node failure streaks and the last rollback.
/// One schema for the CLI, the dashboard and MCP (never the manifest).
pub fn status_json(view: &RolloutView, members: &[u64]) -> serde_json::Value {
    let active = view.deployment.as_ref().map(|d| {
        let nodes: serde_json::Map<String, serde_json::Value> = d
            .order
            .iter()
            .filter_map(|id| {
                let step = d.nodes.get(id)?;
                Some((
                    id.to_string(),
                    serde_json::json!({
                        "phase": step.phase.as_str(),
                        "error": step.error,
                        "started_ms": step.started_ms,
                        "finished_ms": step.finished_ms,
                    }),
                ))
            })
            .collect();
        let phases: serde_json::Map<String, serde_json::Value> = d
            .order
            .iter()
            .filter_map(|id| {
                Some((
                    id.to_string(),
                    serde_json::json!(d.nodes.get(id)?.phase.as_str()),
                ))
            })
            .collect();
        serde_json::json!({
            "generation": d.generation,
            "state": d.state.as_str(),
            "started_by": d.started_by.to_string(),
            "trigger": d.trigger,
            "reason": d.reason,
            "candidate_hash": d.target_hash,
            "target_hash": d.target_hash,
            "previous_hash": d.previous_hash,
            "phases": phases,
            "nodes": nodes,
            "soaking": d.soak_started_ms().is_some(),
            "step": (!d.strategy.steps.is_empty()).then(|| {
                let targets = d.step_targets();
                serde_json::json!({
                    "index": d.step,
                    "of": targets.len(),
                    "targets": targets,
                    "pause_ms": d.strategy.step_pause_ms,
                })
            }),
            "analyses": d.strategy.analyses,
            "selector": d.strategy.selector.as_ref().map(|s| s.to_string()),
            "untargeted": d.untargeted,
            "order_by": d.strategy.order_by,
            "failure_budget": d.strategy.max_failures.map(|budget| serde_json::json!({
                "max_failures": budget.to_string(),
                "tolerates": d.failure_budget(),
                "failed": d.own_failures(),
            })),
            "state_since_ms": d.state_since_ms,
            "evaluations": d.evaluations,
            "waiting": view.notes.as_ref().and_then(|n| n.waiting.clone()),
            "soak_left_ms": view.notes.as_ref().and_then(|n| n.soak_left_ms),
        })
    });
    let streaks: serde_json::Map<String, serde_json::Value> = members
        .iter()
        .map(|id| {
            (
                id.to_string(),
                serde_json::json!(crate::state::deployment::failure_streak(&view.history, *id)),
            )
        })
        .collect();
    let fleet = &view.fleet;
    serde_json::json!({
        "active": active,
        "generation": view.deployment.as_ref().map(|d| d.generation)
            .or_else(|| view.history.last().map(|h| h.generation)),
        "state": view.deployment.as_ref().map(|d| d.state.as_str())
            .unwrap_or("idle"),
        "active_hash": fleet.target,
        "staged_hash": fleet.staged,
        "candidate_hash": view.deployment.as_ref().map(|d| d.target_hash.clone()),
        "previous_hash": view.deployment.as_ref().map(|d| d.previous_hash.clone())
            .or_else(|| view.history.last().map(|h| h.previous_hash.clone())),
        "auto": {
            "enabled": !fleet.auto_disabled,
            "leader": view.notes.as_ref().map(|n| &n.auto),
        },
        "failure_streaks": streaks,
        "last_rollback": fleet.last_rollback,
    })
}

/// The newest `limit` finished rollouts, oldest first, without manifests or per-node
/// detail: what the dashboard and MCP list.
pub fn history_json(history: &[HistoryEntry], limit: usize) -> Vec<serde_json::Value> {
    let skip = history.len().saturating_sub(limit);
    history[skip..]
        .iter()
        .map(|h| {
            serde_json::json!({
                "generation": h.generation,
                "outcome": h.outcome.as_str(),
                "target_hash": h.target_hash,
                "previous_hash": h.previous_hash,
                "started_by": h.started_by.to_string(),
                "trigger": h.trigger,
                "started_ms": h.started_ms,
                "finished_ms": h.finished_ms,
                "reason": h.reason,
                "nodes": h.order.iter().filter_map(|id| {
                    Some((id.to_string(), serde_json::json!(h.nodes.get(id)?.phase.as_str())))
                }).collect::<serde_json::Map<String, serde_json::Value>>(),
            })
        })
        .collect()
}
