//! The replicated data model: what every member agrees on, and how commands change it.
//!
//! Architecture invariant: this module does no I/O. `State::apply` is a pure function
//! of the state and a command; the store persists the records it reports as touched.
//!
//! Compatibility: log entries carry `Command`s as JSON, and binaries of two releases
//! read each other's entries during a rollout. Fields are `#[serde(default)]`; a new
//! command kind is only proposed once every member reports a `protocol` that knows it
//! (see [`Command::required_protocol`]).
//!
//! - [`deployment`]: the rollout's replicated record (deployment, history) and its rules.

pub mod analysis;
pub mod deployment;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use deployment::{
    Deployment, DeploymentState, Handoff, HistoryEntry, NodeStep, OnFailure, Phase, Role, Starter,
    Strategy, DEFAULT_SOAK_STRIKES, HISTORY_LIMIT, MAX_HANDOFF_ATTEMPTS,
};

/// The protocol number this binary speaks: the set of command kinds it can apply.
///
/// - 1: `InitCluster`, `RegisterNode`, `KvPut`, `KvDelete`.
/// - 2: adds the rollout commands `BeginDeployment`, `SetNodePhase`,
///   `SetDeploymentState` and `RecordHandoff`. A binary speaking 1 cannot decode them,
///   so they are proposed only once every member reports 2 or more.
/// - 3: adds the operator's `SetAutoRollout` and `AbortDeployment`.
/// - 4: adds `ForgetNode`, which the leader proposes after removing a member.
/// - 5: adds `RecordEvaluation` (a metric gate's evaluation, in the deployment) and
///   `PromoteStep` (canary steps).
/// - 6: failure budgets and topology: a deployment's `max_failures`, `selector` and
///   `order_by`, and node labels. A binary speaking 5 would drop them and decide
///   differently (stop at a tolerated failure, move the cluster's target after a limited
///   rollout), so a rollout that uses them needs every member on 6.
pub const PROTOCOL: u32 = 6;

/// The protocol that introduced the rollout commands.
pub const ROLLOUT_PROTOCOL: u32 = 2;

/// The protocol that introduced automatic rollouts and operator aborts.
pub const OPERATE_PROTOCOL: u32 = 3;

/// The protocol that introduced forgetting a removed member's report.
pub const MEMBERS_PROTOCOL: u32 = 4;

/// The protocol that introduced metric gates and canary steps (`RecordEvaluation`,
/// `PromoteStep`).
pub const ANALYSIS_PROTOCOL: u32 = 5;

/// The protocol that introduced failure budgets, node labels, `--nodes` and `--order-by`.
pub const TOPOLOGY_PROTOCOL: u32 = 6;

impl Strategy {
    /// The protocol every member must speak for a rollout with this strategy.
    pub fn min_protocol(&self) -> u32 {
        if self.max_failures.is_some() || self.selector.is_some() || self.order_by.is_some() {
            TOPOLOGY_PROTOCOL
        } else if !self.analyses.is_empty() || !self.steps.is_empty() {
            ANALYSIS_PROTOCOL
        } else {
            ROLLOUT_PROTOCOL
        }
    }
}

/// Cluster-wide rollout settings and the build the cluster is meant to run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Fleet {
    /// `cluster rollout auto off`: no leader starts a rollout by itself (neither for a new
    /// build in its watched directory nor to bring a node to the target).
    pub auto_disabled: bool,
    /// When auto rollouts were last switched (unix ms, for operators).
    pub auto_changed_ms: u64,
    /// The build every node is meant to run: set when a deployment completes, cleared
    /// when one ends with nodes on different builds (then an operator decides). `None`:
    /// no rollout has set one, or the cluster runs mixed builds.
    pub target: Option<String>,
    /// The deployment that set (or cleared) `target`.
    pub target_generation: u64,
    /// A build a rollout limited by `--nodes` brought its nodes to, while other members
    /// still run another: `target` moves to it once every member runs it, and catch-up
    /// leaves the nodes on it alone meanwhile.
    pub staged: Option<String>,
    /// The most recent deployment that restored nodes to their previous build.
    pub last_rollback: Option<Rollback>,
}

/// A deployment that took nodes back to their previous build.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Rollback {
    pub generation: u64,
    /// The build the restored nodes had been updated to.
    pub from_hash: String,
    pub reason: String,
    pub at_ms: u64,
}

/// What a node reports about itself when it starts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct NodeInfo {
    /// Address other members and clients reach the node at.
    pub addr: String,
    /// Build hash of the running binary (from its release's version.json), or "dev".
    pub build_hash: String,
    /// Which command kinds the node's binary understands.
    pub protocol: u32,
    /// Random per process start: a changed boot id means the node restarted.
    pub boot_id: String,
    /// Wall-clock start time of the process (unix ms), for operators only: never
    /// compared across machines for decisions.
    pub started_at_ms: u64,
    /// How the node is supervised: "systemd", "supervise" or "none" (empty from a binary
    /// that did not report it).
    pub supervision: String,
    /// The last time the node's boot guard put the previous release back by itself, kept
    /// in the report until the node is next upgraded.
    pub last_auto_restore: Option<GuardRestore>,
    /// The node runs with `--insecure`: plaintext, nobody authenticated.
    pub insecure: bool,
    /// The operator's labels for the node (node.toml `labels`, `--label`): what
    /// `--nodes` selects and `--order-by` groups by.
    pub labels: BTreeMap<String, String>,
}

/// A release the boot guard gave up on, as the node reports it (written by the guard to
/// `<data>/boot-restored.json`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct GuardRestore {
    /// The release put back.
    pub from: String,
    /// The release that did not stay up.
    pub to: String,
    /// The rollout generation that activated `to`.
    pub generation: u64,
    pub reason: String,
    /// Wall-clock time of the restore (unix ms), for operators only.
    pub at_ms: u64,
}

/// A change to the replicated state. Applied in log order on every member.
// Externally tagged on purpose: an internally tagged enum buffers its content, and
// serde cannot then read JSON's string map keys back as the u64 ids of nested maps.
// `BeginDeployment` is much larger than the rest; commands live briefly (one log entry
// each), so boxing it would only move the allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster once, when it is first bootstrapped; later proposals are no-ops.
    InitCluster {
        cluster_id: String,
    },
    /// A node's self-report at start; replaces its previous report.
    RegisterNode {
        id: u64,
        info: NodeInfo,
    },
    KvPut {
        key: String,
        value: String,
    },
    KvDelete {
        key: String,
    },
    /// Starts a rolling update: a compare-and-set on "no deployment active" and on
    /// `deployment.generation == last_generation + 1` (protocol 2).
    BeginDeployment {
        deployment: Deployment,
    },
    /// Moves one node of the active deployment to `phase`; ignored (rejected) for any
    /// other generation, and a duplicate changes nothing (protocol 2).
    SetNodePhase {
        generation: u64,
        node: u64,
        phase: Phase,
        /// Why the node left the happy path; `None` keeps the reason already recorded.
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        at_ms: u64,
    },
    /// Moves the active deployment to `state`; a terminal state moves it to history
    /// (protocol 2).
    SetDeploymentState {
        generation: u64,
        state: DeploymentState,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        at_ms: u64,
    },
    /// Persists a leader's intent to hand leadership to an updated voter, before it
    /// tries, so a restart or a failed transfer does not lose count (protocol 2).
    RecordHandoff {
        generation: u64,
        from: u64,
        to: u64,
        attempt: u32,
        #[serde(default)]
        at_ms: u64,
    },
    /// `cluster rollout auto on|off` (protocol 3).
    SetAutoRollout {
        enabled: bool,
        #[serde(default)]
        at_ms: u64,
    },
    /// `cluster rollout abort [--revert]`: stops the active deployment (protocol 3).
    AbortDeployment {
        generation: u64,
        revert: bool,
        reason: String,
        #[serde(default)]
        at_ms: u64,
    },
    /// Drops the report of a node that is no longer a member, so `status` and preflight
    /// stop showing it (protocol 4). Proposed only by the leader, after `cluster member
    /// remove` took the node out of the Raft membership.
    ForgetNode {
        id: u64,
    },
    /// One evaluation of a metric gate of the active deployment (protocol 5). Proposed by
    /// the leader; what it decides (stop, pause) is a separate `SetDeploymentState`.
    RecordEvaluation {
        generation: u64,
        evaluation: Box<analysis::Evaluation>,
    },
    /// Begins the canary step after `from` (protocol 5): `cluster rollout promote`, or the
    /// leader once a step's pause is over. A compare-and-set on the step, so two promotes
    /// of one step move it once.
    PromoteStep {
        generation: u64,
        from: usize,
        #[serde(default)]
        at_ms: u64,
    },
}

/// The longest kv key a client may write, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// The largest kv value a client may write, in bytes. Every value travels in Raft log
/// entries and snapshots, which are sized for small records, not files.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

impl Command {
    /// Why a client's command is too large to propose, if it is: a kv key over
    /// [`MAX_KEY_BYTES`] or a value over [`MAX_VALUE_BYTES`].
    pub fn oversize(&self) -> Option<String> {
        let (key, value) = match self {
            Command::KvPut { key, value } => (key, Some(value)),
            Command::KvDelete { key } => (key, None),
            _ => return None,
        };
        if key.len() > MAX_KEY_BYTES {
            return Some(format!(
                "kv key of {} bytes is over the limit of {MAX_KEY_BYTES} bytes",
                key.len()
            ));
        }
        match value {
            Some(value) if value.len() > MAX_VALUE_BYTES => Some(format!(
                "kv value of {} bytes for key {key:?} is over the limit of {MAX_VALUE_BYTES} \
                 bytes: keep files in releases, not in the kv store",
                value.len()
            )),
            _ => None,
        }
    }

    /// The lowest protocol a member must speak to apply this command.
    pub fn required_protocol(&self) -> u32 {
        match self {
            Command::InitCluster { .. }
            | Command::RegisterNode { .. }
            | Command::KvPut { .. }
            | Command::KvDelete { .. } => 1,
            Command::BeginDeployment { .. }
            | Command::SetNodePhase { .. }
            | Command::SetDeploymentState { .. }
            | Command::RecordHandoff { .. } => ROLLOUT_PROTOCOL,
            Command::SetAutoRollout { .. } | Command::AbortDeployment { .. } => OPERATE_PROTOCOL,
            Command::ForgetNode { .. } => MEMBERS_PROTOCOL,
            Command::RecordEvaluation { .. } | Command::PromoteStep { .. } => ANALYSIS_PROTOCOL,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::InitCluster { cluster_id } => write!(f, "init-cluster {cluster_id}"),
            Command::RegisterNode { id, info } => {
                write!(f, "register-node {id} {} {}", info.addr, info.build_hash)
            }
            Command::KvPut { key, .. } => write!(f, "kv-put {key}"),
            Command::KvDelete { key } => write!(f, "kv-delete {key}"),
            Command::BeginDeployment { deployment } => write!(
                f,
                "begin-deployment {} -> {}",
                deployment.generation,
                deployment::short_hash(&deployment.target_hash)
            ),
            Command::SetNodePhase {
                generation,
                node,
                phase,
                ..
            } => write!(f, "set-node-phase {generation} node {node} {phase}"),
            Command::SetDeploymentState {
                generation, state, ..
            } => write!(f, "set-deployment-state {generation} {state}"),
            Command::RecordHandoff {
                generation,
                from,
                to,
                attempt,
                ..
            } => write!(f, "record-handoff {generation} {from} -> {to} #{attempt}"),
            Command::SetAutoRollout { enabled, .. } => {
                write!(
                    f,
                    "set-auto-rollout {}",
                    if *enabled { "on" } else { "off" }
                )
            }
            Command::AbortDeployment {
                generation, revert, ..
            } => write!(
                f,
                "abort-deployment {generation}{}",
                if *revert { " --revert" } else { "" }
            ),
            Command::ForgetNode { id } => write!(f, "forget-node {id}"),
            Command::PromoteStep {
                generation, from, ..
            } => write!(f, "promote-step {generation} {from}"),
            Command::RecordEvaluation {
                generation,
                evaluation,
            } => write!(
                f,
                "record-evaluation {generation} {} {}",
                evaluation.name, evaluation.verdict
            ),
        }
    }
}

/// The result of applying one command.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    #[default]
    Ok,
    /// The command was valid Raft-wise but the state refused it (e.g. a stale generation).
    Rejected { reason: String },
}

/// A unit of persistence: the store writes exactly the records `apply` reports as touched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Record {
    ClusterId,
    Node(u64),
    Kv(String),
    /// The active deployment without its manifest: rewritten on every step.
    Deployment,
    /// The active deployment's manifest: written once per deployment, because it can be
    /// megabytes and steps would otherwise rewrite it each time.
    DeploymentManifest,
    /// One finished deployment, by generation.
    History(u64),
    LastGeneration,
    /// Auto-rollout switch, the committed target, the last rollback.
    Fleet,
}

/// The whole replicated state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct State {
    /// Random id chosen at bootstrap: a node of another cluster cannot join this one.
    pub cluster_id: String,
    pub nodes: BTreeMap<u64, NodeInfo>,
    pub kv: BTreeMap<String, String>,
    /// The rollout under way, if any: at most one at a time (the lifecycle lock).
    pub deployment: Option<Deployment>,
    /// Finished deployments, oldest first, at most [`HISTORY_LIMIT`].
    pub history: Vec<HistoryEntry>,
    /// Generation of the newest deployment ever begun; the next must be one more.
    pub last_generation: u64,
    pub fleet: Fleet,
}

impl State {
    /// Applies `command`, returning its response and the records it changed.
    pub fn apply(&mut self, command: &Command) -> (Response, Vec<Record>) {
        match command {
            Command::InitCluster { cluster_id } => {
                if !self.cluster_id.is_empty() {
                    return (Response::Ok, vec![]);
                }
                self.cluster_id = cluster_id.clone();
                (Response::Ok, vec![Record::ClusterId])
            }
            Command::RegisterNode { id, info } => {
                self.nodes.insert(*id, info.clone());
                (Response::Ok, vec![Record::Node(*id)])
            }
            Command::KvPut { key, value } => {
                self.kv.insert(key.clone(), value.clone());
                (Response::Ok, vec![Record::Kv(key.clone())])
            }
            Command::KvDelete { key } => {
                if self.kv.remove(key).is_none() {
                    return (Response::Ok, vec![]);
                }
                (Response::Ok, vec![Record::Kv(key.clone())])
            }
            Command::BeginDeployment { deployment } => self.begin_deployment(deployment),
            Command::SetNodePhase {
                generation,
                node,
                phase,
                error,
                at_ms,
            } => self.on_active(*generation, |d| {
                d.set_node_phase(*node, *phase, error.as_deref(), *at_ms)
            }),
            Command::SetDeploymentState {
                generation,
                state,
                reason,
                at_ms,
            } => self.on_active(*generation, |d| {
                d.set_state(*state, reason.as_deref(), *at_ms)
            }),
            Command::RecordHandoff {
                generation,
                from,
                to,
                attempt,
                at_ms,
            } => self.on_active(*generation, |d| {
                d.record_handoff(*from, *to, *attempt, *at_ms)
            }),
            Command::SetAutoRollout { enabled, at_ms } => {
                if self.fleet.auto_disabled != *enabled {
                    return (Response::Ok, vec![]);
                }
                self.fleet.auto_disabled = !enabled;
                self.fleet.auto_changed_ms = *at_ms;
                (Response::Ok, vec![Record::Fleet])
            }
            Command::AbortDeployment {
                generation,
                revert,
                reason,
                at_ms,
            } => self.on_active(*generation, |d| d.abort(*revert, reason, *at_ms)),
            Command::RecordEvaluation {
                generation,
                evaluation,
            } => self.on_active(*generation, |d| d.record_evaluation(evaluation)),
            Command::PromoteStep {
                generation, from, ..
            } => self.on_active(*generation, |d| d.promote(*from)),
            Command::ForgetNode { id } => {
                if self.nodes.remove(id).is_none() {
                    return (Response::Ok, vec![]);
                }
                (Response::Ok, vec![Record::Node(*id)])
            }
        }
    }

    /// The history entries of the deployments that `records` (what one command changed)
    /// say just finished.
    pub fn concluded<'a>(
        &'a self,
        records: &'a [Record],
    ) -> impl Iterator<Item = &'a HistoryEntry> {
        records.iter().filter_map(|record| match record {
            Record::History(generation) => self
                .history
                .iter()
                .rev()
                .find(|e| e.generation == *generation),
            _ => None,
        })
    }

    /// What a finished deployment means for the cluster's target and rollback record.
    fn conclude(&mut self, entry: &HistoryEntry) {
        let committed = |s: &NodeStep| s.phase == Phase::Committed;
        // A limited rollout (`--nodes`) moves the target only once the members it left
        // out run the build too (a later rollout to them); until then the build is staged.
        let others_on_it = self
            .nodes
            .iter()
            .filter(|(id, _)| !entry.nodes.contains_key(id))
            .all(|(_, info)| info.build_hash == entry.target_hash);
        let limited = entry.strategy.selector.is_some() && !others_on_it;
        // Completed: every node committed, or the learners that did not were restored
        // within the rollout's failure budget (catch-up then reports them as blocked).
        let landed =
            entry.outcome == DeploymentState::Completed || entry.nodes.values().all(committed);
        if landed && limited {
            self.fleet.staged = Some(entry.target_hash.clone());
        } else if landed {
            self.fleet.target = Some(entry.target_hash.clone());
            self.fleet.target_generation = entry.generation;
            self.fleet.staged = None;
        } else if entry.nodes.values().any(committed) {
            self.fleet.target = None;
            self.fleet.target_generation = entry.generation;
        }
        if entry.nodes.values().any(|s| s.phase == Phase::Restored) {
            self.fleet.last_rollback = Some(Rollback {
                generation: entry.generation,
                from_hash: entry.target_hash.clone(),
                reason: entry
                    .reason
                    .clone()
                    .unwrap_or_else(|| "no reason recorded".into()),
                at_ms: entry.finished_ms.unwrap_or(entry.started_ms),
            });
        }
    }

    /// Whether `node` failed on `hash` the last time a deployment to `hash` included it:
    /// the leader does not bring it to that build again by itself.
    pub fn failed_on(&self, node: u64, hash: &str) -> bool {
        self.history
            .iter()
            .rev()
            .find(|h| h.target_hash == hash && h.nodes.contains_key(&node))
            .is_some_and(|h| h.node_failed(node))
    }

    /// How many deployments in a row, newest first, `node` failed in.
    pub fn failure_streak(&self, node: u64) -> u32 {
        deployment::failure_streak(&self.history, node)
    }

    fn begin_deployment(&mut self, deployment: &Deployment) -> (Response, Vec<Record>) {
        if let Some(active) = &self.deployment {
            return rejected(format!(
                "rollout generation {} to {} is already {} (started by {}): wait for it to \
                 finish, or abort it with `cluster rollout abort`",
                active.generation,
                deployment::short_hash(&active.target_hash),
                active.state,
                active.started_by,
            ));
        }
        let next = self.last_generation + 1;
        if deployment.generation != next {
            return rejected(format!(
                "rollout generation {} is not the next one (expected {next}): another \
                 rollout began meanwhile; re-read the state and plan again",
                deployment.generation
            ));
        }
        if let Err(reason) = deployment.validate_new() {
            return rejected(reason);
        }
        self.deployment = Some(deployment.clone());
        self.last_generation = next;
        (
            Response::Ok,
            vec![
                Record::Deployment,
                Record::DeploymentManifest,
                Record::LastGeneration,
            ],
        )
    }

    /// Runs `change` on the active deployment if `generation` names it, then moves a
    /// deployment that reached a terminal state into history. `change` leaves the
    /// deployment untouched when it returns `Err`.
    fn on_active(
        &mut self,
        generation: u64,
        change: impl FnOnce(&mut Deployment) -> Result<bool, String>,
    ) -> (Response, Vec<Record>) {
        let deployment = match &mut self.deployment {
            Some(active) if active.generation == generation => active,
            Some(active) => {
                return rejected(format!(
                    "stale rollout generation {generation}: generation {} is active",
                    active.generation
                ))
            }
            None => {
                let finished = self.history.iter().find(|h| h.generation == generation);
                return rejected(match finished {
                    Some(entry) => format!(
                        "rollout generation {generation} already finished ({})",
                        entry.outcome
                    ),
                    None => format!("no rollout is active (generation {generation} asked)"),
                });
            }
        };
        match change(deployment) {
            Err(reason) => rejected(reason),
            Ok(false) => (Response::Ok, vec![]),
            Ok(true) if deployment.state.is_terminal() => {
                let entry = HistoryEntry::of(deployment);
                self.deployment = None;
                self.conclude(&entry);
                let mut touched = vec![
                    Record::Deployment,
                    Record::DeploymentManifest,
                    Record::History(entry.generation),
                    Record::Fleet,
                ];
                self.history.push(entry);
                while self.history.len() > HISTORY_LIMIT {
                    let dropped = self.history.remove(0);
                    touched.push(Record::History(dropped.generation));
                }
                (Response::Ok, touched)
            }
            Ok(true) => (Response::Ok, vec![Record::Deployment]),
        }
    }

    /// The JSON value of `record`, or `None` when it no longer exists. A value that cannot
    /// be encoded is an error: the store must never take it for a record that is gone.
    pub fn record_value(
        &self,
        record: &Record,
    ) -> Result<Option<serde_json::Value>, serde_json::Error> {
        fn some(value: impl Serialize) -> Result<Option<serde_json::Value>, serde_json::Error> {
            serde_json::to_value(value).map(Some)
        }
        match record {
            Record::ClusterId => some(&self.cluster_id),
            Record::Node(id) => self.nodes.get(id).map_or(Ok(None), some),
            Record::Kv(key) => self.kv.get(key).map_or(Ok(None), some),
            Record::Deployment => {
                let Some(deployment) = &self.deployment else {
                    return Ok(None);
                };
                let mut value = serde_json::to_value(deployment)?;
                if let Some(fields) = value.as_object_mut() {
                    fields.remove("manifest");
                }
                Ok(Some(value))
            }
            Record::DeploymentManifest => self
                .deployment
                .as_ref()
                .map_or(Ok(None), |d| some(&d.manifest)),
            Record::History(generation) => self
                .history
                .iter()
                .find(|h| h.generation == *generation)
                .map_or(Ok(None), some),
            Record::LastGeneration => some(self.last_generation),
            Record::Fleet => some(&self.fleet),
        }
    }

    /// Every record of the state, for writing a whole snapshot.
    pub fn records(&self) -> Vec<Record> {
        let mut all = vec![Record::ClusterId];
        all.extend(self.nodes.keys().map(|id| Record::Node(*id)));
        all.extend(self.kv.keys().map(|k| Record::Kv(k.clone())));
        if self.deployment.is_some() {
            all.extend([Record::Deployment, Record::DeploymentManifest]);
        }
        all.extend(self.history.iter().map(|h| Record::History(h.generation)));
        all.push(Record::LastGeneration);
        all.push(Record::Fleet);
        all
    }

    /// Restores one record read back from storage.
    pub fn load_record(
        &mut self,
        record: Record,
        value: serde_json::Value,
    ) -> Result<(), serde_json::Error> {
        match record {
            Record::ClusterId => self.cluster_id = serde_json::from_value(value)?,
            Record::Node(id) => {
                self.nodes.insert(id, serde_json::from_value(value)?);
            }
            Record::Kv(key) => {
                self.kv.insert(key, serde_json::from_value(value)?);
            }
            // The two halves of the deployment may load in either order.
            Record::Deployment => {
                let mut deployment: Deployment = serde_json::from_value(value)?;
                if let Some(loaded) = self.deployment.take() {
                    deployment.manifest = loaded.manifest;
                }
                self.deployment = Some(deployment);
            }
            Record::DeploymentManifest => {
                self.deployment
                    .get_or_insert_with(Deployment::default)
                    .manifest = serde_json::from_value(value)?;
            }
            Record::History(_) => {
                let entry: HistoryEntry = serde_json::from_value(value)?;
                let at = self
                    .history
                    .partition_point(|h| h.generation < entry.generation);
                if self.history.get(at).map(|h| h.generation) == Some(entry.generation) {
                    self.history[at] = entry;
                } else {
                    self.history.insert(at, entry);
                }
            }
            Record::LastGeneration => self.last_generation = serde_json::from_value(value)?,
            Record::Fleet => self.fleet = serde_json::from_value(value)?,
        }
        Ok(())
    }

    /// The lowest protocol any registered member speaks: gate new command kinds on it.
    pub fn min_protocol(&self) -> Option<u32> {
        self.nodes.values().map(|n| n.protocol).min()
    }
}

fn rejected(reason: String) -> (Response, Vec<Record>) {
    (Response::Rejected { reason }, vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(addr: &str) -> NodeInfo {
        NodeInfo {
            addr: addr.into(),
            build_hash: "dev".into(),
            protocol: PROTOCOL,
            boot_id: "b".into(),
            started_at_ms: 1,
            ..NodeInfo::default()
        }
    }

    #[test]
    fn apply_table() {
        struct Case {
            name: &'static str,
            before: State,
            command: Command,
            touched: Vec<Record>,
            check: fn(&State) -> bool,
        }
        let named = State {
            cluster_id: "first".into(),
            ..State::default()
        };
        let cases = vec![
            Case {
                name: "init names an unnamed cluster",
                before: State::default(),
                command: Command::InitCluster {
                    cluster_id: "c1".into(),
                },
                touched: vec![Record::ClusterId],
                check: |s| s.cluster_id == "c1",
            },
            Case {
                name: "init never renames a cluster",
                before: named.clone(),
                command: Command::InitCluster {
                    cluster_id: "second".into(),
                },
                touched: vec![],
                check: |s| s.cluster_id == "first",
            },
            Case {
                name: "register replaces a report",
                before: State::default(),
                command: Command::RegisterNode {
                    id: 2,
                    info: info("127.0.0.1:2"),
                },
                touched: vec![Record::Node(2)],
                check: |s| s.nodes[&2].addr == "127.0.0.1:2",
            },
            Case {
                name: "put stores",
                before: State::default(),
                command: Command::KvPut {
                    key: "k".into(),
                    value: "v".into(),
                },
                touched: vec![Record::Kv("k".into())],
                check: |s| s.kv["k"] == "v",
            },
            Case {
                name: "delete of a missing key touches nothing",
                before: State::default(),
                command: Command::KvDelete { key: "k".into() },
                touched: vec![],
                check: |s| s.kv.is_empty(),
            },
        ];
        for case in cases {
            let mut state = case.before.clone();
            let (response, touched) = state.apply(&case.command);
            assert_eq!(response, Response::Ok, "{}", case.name);
            assert_eq!(touched, case.touched, "{}", case.name);
            assert!((case.check)(&state), "{}", case.name);
        }
    }

    fn deployment(generation: u64, phases: &[(u64, Phase)]) -> Deployment {
        let mut deployment = Deployment {
            generation,
            target_hash: "ab".repeat(32),
            previous_hash: "cd".repeat(32),
            ..Deployment::default()
        };
        for (id, phase) in phases {
            deployment.order.push(*id);
            let mut step = NodeStep::pending(Role::Voter, format!("127.0.0.1:710{id}"), "cd");
            step.phase = *phase;
            deployment.nodes.insert(*id, step);
        }
        deployment
    }

    #[test]
    fn evaluations_of_a_metric_gate_are_recorded_kept_bounded_and_go_to_history() {
        use crate::rollout::analysis::{Analysis, EVALUATIONS_KEPT};
        let gate =
            Analysis::parse("name=errors,prometheus=http://p:9090,max=0.001,query=up").unwrap();
        let mut d = deployment(4, &[(1, Phase::Stabilize), (2, Phase::Pending)]);
        d.strategy.analyses = vec![gate.clone()];
        let mut state = active(d);
        let record = |generation, evaluation| Command::RecordEvaluation {
            generation,
            evaluation: Box::new(evaluation),
        };
        assert_eq!(
            state.apply(&record(4, gate.judge(Ok(0.05), 10))).0,
            Response::Ok
        );
        let stale = state.apply(&record(3, gate.judge(Ok(0.0), 11))).0;
        assert!(matches!(stale, Response::Rejected { .. }), "{stale:?}");
        let mut other = gate.clone();
        other.name = "p99".into();
        let unknown = state.apply(&record(4, other.judge(Ok(0.0), 12))).0;
        assert!(matches!(unknown, Response::Rejected { .. }), "{unknown:?}");
        for at in 0..EVALUATIONS_KEPT as u64 + 5 {
            state.apply(&record(4, gate.judge(Ok(0.0), 100 + at)));
        }
        let kept = &state.deployment.as_ref().unwrap().evaluations;
        assert_eq!(kept.len(), EVALUATIONS_KEPT);
        assert_eq!(
            kept.last().unwrap().at_ms,
            100 + EVALUATIONS_KEPT as u64 + 4
        );
        assert_eq!(
            record(4, gate.judge(Ok(0.0), 1)).required_protocol(),
            ANALYSIS_PROTOCOL
        );
        let _ = state.apply(&Command::SetDeploymentState {
            generation: 4,
            state: DeploymentState::Reverting,
            reason: Some("analysis errors failed".into()),
            at_ms: 20,
        });
        for phase in [Phase::Restoring, Phase::Restored] {
            assert_eq!(state.apply(&set_phase(4, 1, phase)).0, Response::Ok);
        }
        let ended = state.apply(&Command::SetDeploymentState {
            generation: 4,
            state: DeploymentState::Reverted,
            reason: None,
            at_ms: 21,
        });
        assert_eq!(ended.0, Response::Ok);
        let entry = state.history.last().expect("in history");
        assert_eq!(entry.evaluations.len(), EVALUATIONS_KEPT);
    }

    fn active(deployment: Deployment) -> State {
        State {
            last_generation: deployment.generation,
            deployment: Some(deployment),
            ..State::default()
        }
    }

    fn set_phase(generation: u64, node: u64, phase: Phase) -> Command {
        Command::SetNodePhase {
            generation,
            node,
            phase,
            error: None,
            at_ms: 5,
        }
    }

    fn set_state(generation: u64, state: DeploymentState) -> Command {
        Command::SetDeploymentState {
            generation,
            state,
            reason: Some("because".into()),
            at_ms: 9,
        }
    }

    /// What applying a rollout command must do.
    enum Expect {
        /// Accepted, touching exactly these records.
        Ok(Vec<Record>),
        /// Refused with a reason containing this text; the state must not change.
        Rejected(&'static str),
    }

    #[test]
    fn rollout_commands_table() {
        use DeploymentState as S;
        use Phase as P;
        struct Case {
            name: &'static str,
            before: State,
            command: Command,
            expect: Expect,
            check: fn(&State) -> bool,
        }
        let fresh = deployment(1, &[(1, P::Pending), (2, P::Pending)]);
        let running = active(deployment(4, &[(1, P::Committed), (2, P::Sync)]));
        let all_committed = active(deployment(4, &[(1, P::Committed), (2, P::Committed)]));
        let mut reverting = deployment(4, &[(1, P::Committed), (2, P::Health)]);
        reverting.state = S::Reverting;
        let reverting = active(reverting);
        let mut paused = deployment(4, &[(1, P::Pending)]);
        paused.state = S::Paused;
        let paused = active(paused);
        let finished = {
            let mut state = all_committed.clone();
            state.apply(&set_state(4, S::Completed));
            state
        };
        let full_history = {
            let mut state = all_committed.clone();
            state.history = (1..=HISTORY_LIMIT as u64)
                .map(|generation| HistoryEntry {
                    generation,
                    ..HistoryEntry::default()
                })
                .collect();
            state.deployment.as_mut().unwrap().generation = 60;
            state.last_generation = 60;
            state
        };
        let handoff_ready = active(deployment(4, &[(1, P::Committed), (2, P::Pending)]));

        let cases = vec![
            Case {
                name: "begin takes the lock and the next generation",
                before: State::default(),
                command: Command::BeginDeployment {
                    deployment: fresh.clone(),
                },
                expect: Expect::Ok(vec![
                    Record::Deployment,
                    Record::DeploymentManifest,
                    Record::LastGeneration,
                ]),
                check: |s| s.last_generation == 1 && s.deployment.is_some(),
            },
            Case {
                name: "begin while a rollout is active names the active generation",
                before: running.clone(),
                command: Command::BeginDeployment {
                    deployment: deployment(5, &[(1, P::Pending)]),
                },
                expect: Expect::Rejected("rollout generation 4 to abababababab is already running"),
                check: |s| s.last_generation == 4,
            },
            Case {
                name: "begin must use the next generation",
                before: finished.clone(),
                command: Command::BeginDeployment {
                    deployment: deployment(4, &[(1, P::Pending)]),
                },
                expect: Expect::Rejected("generation 4 is not the next one (expected 5)"),
                check: |s| s.deployment.is_none(),
            },
            Case {
                name: "begin refuses a deployment with nothing to do",
                before: State::default(),
                command: Command::BeginDeployment {
                    deployment: deployment(1, &[]),
                },
                expect: Expect::Rejected("updates no node"),
                check: |s| s.last_generation == 0,
            },
            Case {
                name: "begin refuses nodes that already started",
                before: State::default(),
                command: Command::BeginDeployment {
                    deployment: deployment(1, &[(1, P::Sync)]),
                },
                expect: Expect::Rejected("node 1 starts in phase sync"),
                check: |s| s.deployment.is_none(),
            },
            Case {
                name: "a node moves forward",
                before: running.clone(),
                command: set_phase(4, 2, P::Activate),
                expect: Expect::Ok(vec![Record::Deployment]),
                check: |s| s.deployment.as_ref().unwrap().phase(2) == Phase::Activate,
            },
            Case {
                name: "starting a node counts the attempt and the start time",
                before: active(deployment(4, &[(1, P::Pending)])),
                command: set_phase(4, 1, P::Backup),
                expect: Expect::Ok(vec![Record::Deployment]),
                check: |s| {
                    let step = &s.deployment.as_ref().unwrap().nodes[&1];
                    step.attempt == 1 && step.started_ms == Some(5)
                },
            },
            Case {
                name: "a duplicate phase changes nothing",
                before: running.clone(),
                command: set_phase(4, 2, P::Sync),
                expect: Expect::Ok(vec![]),
                check: |s| s.deployment.as_ref().unwrap().phase(2) == Phase::Sync,
            },
            Case {
                name: "a phase for a stale generation is refused",
                before: running.clone(),
                command: set_phase(3, 2, P::Activate),
                expect: Expect::Rejected("stale rollout generation 3: generation 4 is active"),
                check: |s| s.deployment.as_ref().unwrap().phase(2) == Phase::Sync,
            },
            Case {
                name: "a phase for a finished rollout is refused",
                before: finished.clone(),
                command: set_phase(4, 2, P::Restoring),
                expect: Expect::Rejected("rollout generation 4 already finished (completed)"),
                check: |s| s.deployment.is_none(),
            },
            Case {
                name: "a node never moves back",
                before: running.clone(),
                command: set_phase(4, 2, P::Backup),
                expect: Expect::Rejected("node 2 (127.0.0.1:7102) cannot move from sync to backup"),
                check: |s| s.deployment.as_ref().unwrap().phase(2) == Phase::Sync,
            },
            Case {
                name: "a node outside the rollout is refused",
                before: running.clone(),
                command: set_phase(4, 9, P::Backup),
                expect: Expect::Rejected("node 9 is not part of rollout generation 4"),
                check: |s| !s.deployment.as_ref().unwrap().nodes.contains_key(&9),
            },
            Case {
                name: "no node starts while paused",
                before: paused.clone(),
                command: set_phase(4, 1, P::Backup),
                expect: Expect::Rejected(
                    "cannot move to backup while rollout generation 4 is paused",
                ),
                check: |s| s.deployment.as_ref().unwrap().phase(1) == Phase::Pending,
            },
            Case {
                name: "no node moves forward while reverting",
                before: reverting.clone(),
                command: set_phase(4, 2, P::Stabilize),
                expect: Expect::Rejected(
                    "cannot move to stabilize while rollout generation 4 is reverting",
                ),
                check: |s| s.deployment.as_ref().unwrap().phase(2) == Phase::Health,
            },
            Case {
                name: "a committed node is restored while reverting, keeping its reason",
                before: reverting.clone(),
                command: Command::SetNodePhase {
                    generation: 4,
                    node: 1,
                    phase: P::Restoring,
                    error: Some("revert".into()),
                    at_ms: 7,
                },
                expect: Expect::Ok(vec![Record::Deployment]),
                check: |s| {
                    let step = &s.deployment.as_ref().unwrap().nodes[&1];
                    step.phase == Phase::Restoring && step.error.as_deref() == Some("revert")
                },
            },
            Case {
                name: "pausing keeps the rollout active",
                before: running.clone(),
                command: set_state(4, S::Paused),
                expect: Expect::Ok(vec![Record::Deployment]),
                check: |s| {
                    let d = s.deployment.as_ref().unwrap();
                    d.state == S::Paused && d.reason.as_deref() == Some("because")
                },
            },
            Case {
                name: "the same state twice changes nothing",
                before: reverting.clone(),
                command: set_state(4, S::Reverting),
                expect: Expect::Ok(vec![]),
                check: |s| s.deployment.is_some(),
            },
            Case {
                name: "a state for a stale generation is refused",
                before: running.clone(),
                command: set_state(2, S::Failed),
                expect: Expect::Rejected("stale rollout generation 2"),
                check: |s| s.deployment.as_ref().unwrap().state == S::Running,
            },
            Case {
                name: "completed is refused while a node is not committed",
                before: running.clone(),
                command: set_state(4, S::Completed),
                expect: Expect::Rejected("cannot be completed: node 2 is sync"),
                check: |s| s.deployment.is_some() && s.history.is_empty(),
            },
            Case {
                name: "reverted is refused while a node is not restored",
                before: reverting.clone(),
                command: set_state(4, S::Reverted),
                expect: Expect::Rejected("cannot be reverted: node 1 is committed"),
                check: |s| s.deployment.is_some(),
            },
            Case {
                name: "an illegal state move is refused",
                before: reverting.clone(),
                command: set_state(4, S::Running),
                expect: Expect::Rejected("cannot move from reverting to running"),
                check: |s| s.deployment.as_ref().unwrap().state == S::Reverting,
            },
            Case {
                name: "completing moves the rollout to history and frees the lock",
                before: all_committed.clone(),
                command: set_state(4, S::Completed),
                expect: Expect::Ok(vec![
                    Record::Deployment,
                    Record::DeploymentManifest,
                    Record::History(4),
                    Record::Fleet,
                ]),
                check: |s| {
                    s.fleet.target.is_some()
                        && s.fleet.target_generation == 4
                        && s.deployment.is_none()
                        && s.last_generation == 4
                        && s.history.len() == 1
                        && s.history[0].outcome == S::Completed
                        && s.history[0].finished_ms == Some(9)
                        && s.history[0].reason.as_deref() == Some("because")
                },
            },
            Case {
                name: "history keeps the newest entries only",
                before: full_history,
                command: set_state(60, S::Completed),
                expect: Expect::Ok(vec![
                    Record::Deployment,
                    Record::DeploymentManifest,
                    Record::History(60),
                    Record::Fleet,
                    Record::History(1),
                ]),
                check: |s| {
                    s.history.len() == HISTORY_LIMIT
                        && s.history[0].generation == 2
                        && s.history.last().unwrap().generation == 60
                },
            },
            Case {
                name: "a hand-off intent is recorded",
                before: handoff_ready.clone(),
                command: Command::RecordHandoff {
                    generation: 4,
                    from: 2,
                    to: 1,
                    attempt: 1,
                    at_ms: 3,
                },
                expect: Expect::Ok(vec![Record::Deployment]),
                check: |s| s.deployment.as_ref().unwrap().handoff_attempts(2) == 1,
            },
            Case {
                name: "a repeated hand-off attempt changes nothing",
                before: {
                    let mut state = handoff_ready.clone();
                    state.apply(&Command::RecordHandoff {
                        generation: 4,
                        from: 2,
                        to: 1,
                        attempt: 2,
                        at_ms: 3,
                    });
                    state
                },
                command: Command::RecordHandoff {
                    generation: 4,
                    from: 2,
                    to: 1,
                    attempt: 1,
                    at_ms: 3,
                },
                expect: Expect::Ok(vec![]),
                check: |s| s.deployment.as_ref().unwrap().handoff_attempts(2) == 2,
            },
            Case {
                name: "a hand-off to a node that is not updated is refused",
                before: running.clone(),
                command: Command::RecordHandoff {
                    generation: 4,
                    from: 1,
                    to: 2,
                    attempt: 1,
                    at_ms: 3,
                },
                expect: Expect::Rejected("cannot hand leadership to node 2 (sync)"),
                check: |s| s.deployment.as_ref().unwrap().handoff.is_none(),
            },
            Case {
                name: "a hand-off for a stale generation is refused",
                before: handoff_ready.clone(),
                command: Command::RecordHandoff {
                    generation: 3,
                    from: 2,
                    to: 1,
                    attempt: 1,
                    at_ms: 3,
                },
                expect: Expect::Rejected("stale rollout generation 3"),
                check: |s| s.deployment.as_ref().unwrap().handoff.is_none(),
            },
        ];
        for case in cases {
            let mut state = case.before.clone();
            let (response, touched) = state.apply(&case.command);
            match case.expect {
                Expect::Ok(records) => {
                    assert_eq!(response, Response::Ok, "{}", case.name);
                    assert_eq!(touched, records, "{}", case.name);
                }
                Expect::Rejected(text) => {
                    let Response::Rejected { reason } = response else {
                        panic!("{}: accepted", case.name)
                    };
                    assert!(reason.contains(text), "{}: {reason}", case.name);
                    assert!(touched.is_empty(), "{}", case.name);
                    assert_eq!(
                        state, case.before,
                        "{}: a refusal changed the state",
                        case.name
                    );
                }
            }
            assert!((case.check)(&state), "{}", case.name);
        }
    }

    #[test]
    fn rollout_commands_need_protocol_two() {
        let begin = Command::BeginDeployment {
            deployment: Deployment::default(),
        };
        assert_eq!(begin.required_protocol(), ROLLOUT_PROTOCOL);
        assert_eq!(set_phase(1, 1, Phase::Sync).required_protocol(), 2);
        assert_eq!(Command::KvDelete { key: "k".into() }.required_protocol(), 1);
        const { assert!(PROTOCOL >= ROLLOUT_PROTOCOL) };
    }

    #[test]
    fn kv_keys_and_values_over_their_limits_are_named() {
        let put = |key: usize, value: usize| Command::KvPut {
            key: "k".repeat(key),
            value: "v".repeat(value),
        };
        assert_eq!(put(MAX_KEY_BYTES, MAX_VALUE_BYTES).oversize(), None);
        let key = put(MAX_KEY_BYTES + 1, 1).oversize().unwrap();
        assert!(key.contains("kv key of 1025 bytes"), "{key}");
        let value = put(1, MAX_VALUE_BYTES + 1).oversize().unwrap();
        assert!(value.contains("kv value of 1048577 bytes"), "{value}");
        let delete = Command::KvDelete {
            key: "k".repeat(MAX_KEY_BYTES + 1),
        };
        assert!(delete.oversize().is_some());
        let forget = Command::ForgetNode { id: 1 };
        assert_eq!(forget.oversize(), None, "only client kv commands are sized");
    }

    #[test]
    fn forgetting_a_node_drops_its_report_and_needs_protocol_four() {
        let mut state = State::default();
        state.apply(&Command::RegisterNode {
            id: 3,
            info: info("h:3"),
        });
        state.apply(&Command::RegisterNode {
            id: 4,
            info: info("h:4"),
        });
        let forget = Command::ForgetNode { id: 3 };
        assert_eq!(forget.required_protocol(), MEMBERS_PROTOCOL);
        const { assert!(PROTOCOL >= MEMBERS_PROTOCOL && MEMBERS_PROTOCOL > OPERATE_PROTOCOL) };
        assert_eq!(state.apply(&forget), (Response::Ok, vec![Record::Node(3)]));
        assert_eq!(state.nodes.keys().collect::<Vec<_>>(), [&4]);
        // The store deletes a record whose value is gone.
        assert_eq!(state.record_value(&Record::Node(3)).unwrap(), None);
        assert_eq!(
            state.apply(&forget),
            (Response::Ok, vec![]),
            "forgetting twice changes nothing"
        );
        let json = serde_json::to_string(&forget).unwrap();
        assert_eq!(json, r#"{"forget_node":{"id":3}}"#);
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), forget);
    }

    #[test]
    fn deployment_records_split_the_manifest_and_round_trip() {
        let mut state = State::default();
        let mut begun = deployment(1, &[(1, Phase::Pending), (2, Phase::Pending)]);
        begun.manifest = crate::release::Manifest::from_unsorted(vec![crate::release::Entry {
            path: "bin".into(),
            kind: crate::release::EntryKind::Dir { mode: 0o755 },
        }]);
        let (response, _) = state.apply(&Command::BeginDeployment { deployment: begun });
        assert_eq!(response, Response::Ok);
        state.apply(&set_phase(1, 1, Phase::Backup));
        let without_manifest = state.record_value(&Record::Deployment).unwrap().unwrap();
        assert!(without_manifest.get("manifest").is_none());
        // One finished deployment in history next to the active one.
        state.history.push(HistoryEntry {
            generation: 0,
            outcome: DeploymentState::Reverted,
            ..HistoryEntry::default()
        });
        // Storage returns records in key order; load them both ways round.
        for reversed in [false, true] {
            let mut records = state.records();
            if reversed {
                records.reverse();
            }
            let mut restored = State::default();
            for record in records {
                let value = state.record_value(&record).unwrap().unwrap();
                restored.load_record(record, value).unwrap();
            }
            assert_eq!(restored, state, "reversed: {reversed}");
        }
    }

    #[test]
    fn records_round_trip() {
        let mut state = State::default();
        state.apply(&Command::InitCluster {
            cluster_id: "c".into(),
        });
        state.apply(&Command::RegisterNode {
            id: 1,
            info: info("a"),
        });
        state.apply(&Command::KvPut {
            key: "x".into(),
            value: "y".into(),
        });
        let mut restored = State::default();
        for record in state.records() {
            let value = state.record_value(&record).unwrap().unwrap();
            restored.load_record(record, value).unwrap();
        }
        assert_eq!(restored, state);
    }

    #[test]
    fn old_entries_without_new_fields_still_decode() {
        // A NodeInfo written by a binary that knew fewer fields.
        let json = r#"{"register_node":{"id":3,"info":{"addr":"h:1"}}}"#;
        let command: Command = serde_json::from_str(json).unwrap();
        let Command::RegisterNode { id, info } = command else {
            panic!("wrong kind")
        };
        assert_eq!((id, info.addr.as_str(), info.protocol), (3, "h:1", 0));
    }

    #[test]
    fn a_deployment_with_per_node_steps_round_trips_as_a_log_entry() {
        let mut deployment = Deployment {
            generation: 1,
            target_hash: "t".into(),
            ..Deployment::default()
        };
        deployment
            .nodes
            .insert(7, deployment::NodeStep::pending(Role::Voter, "h:7", "f"));
        let command = Command::BeginDeployment { deployment };
        let json = serde_json::to_string(&command).unwrap();
        let back: Command = serde_json::from_str(&json).expect("decodes as it was written");
        assert_eq!(back, command);
    }

    #[test]
    fn auto_rollouts_switch_and_aborts_stop_the_active_rollout() {
        let mut state = State::default();
        let off = Command::SetAutoRollout {
            enabled: false,
            at_ms: 5,
        };
        assert_eq!(state.apply(&off), (Response::Ok, vec![Record::Fleet]));
        assert!(state.fleet.auto_disabled);
        assert_eq!(state.fleet.auto_changed_ms, 5);
        assert_eq!(
            state.apply(&off),
            (Response::Ok, vec![]),
            "a repeat changes nothing"
        );
        let on = Command::SetAutoRollout {
            enabled: true,
            at_ms: 6,
        };
        assert_eq!(state.apply(&on), (Response::Ok, vec![Record::Fleet]));
        assert!(!state.fleet.auto_disabled);

        let abort = |revert| Command::AbortDeployment {
            generation: 1,
            revert,
            reason: "aborted by an operator".into(),
            at_ms: 7,
        };
        let (response, _) = state.apply(&abort(false));
        assert!(
            matches!(response, Response::Rejected { .. }),
            "no rollout is active"
        );

        let deployment = deployment(1, &[(1, Phase::Pending), (2, Phase::Pending)]);
        let (response, _) = state.apply(&Command::BeginDeployment { deployment });
        assert_eq!(response, Response::Ok);
        assert_eq!(state.apply(&abort(false)).0, Response::Ok);
        let active = state.deployment.as_ref().unwrap();
        assert_eq!(active.state, DeploymentState::Halting);
        assert!(active.aborted);
        assert_eq!(active.reason.as_deref(), Some("aborted by an operator"));
        // A later abort may still ask for the revert.
        assert_eq!(state.apply(&abort(true)).0, Response::Ok);
        assert_eq!(
            state.deployment.as_ref().unwrap().state,
            DeploymentState::Reverting
        );
        assert_eq!(state.apply(&abort(true)), (Response::Ok, vec![]));
    }

    #[test]
    fn a_rollout_limited_by_nodes_stages_its_build_until_every_member_runs_it() {
        let mut state = State::default();
        state.fleet.target = Some("old".into());
        for id in [1, 2, 3] {
            state.apply(&Command::RegisterNode {
                id,
                info: NodeInfo {
                    build_hash: "old".into(),
                    ..info(&format!("127.0.0.1:710{id}"))
                },
            });
        }
        let complete = |state: &mut State, generation: u64, nodes: &[u64]| {
            let steps: Vec<(u64, Phase)> = nodes.iter().map(|id| (*id, Phase::Pending)).collect();
            let mut deployment = deployment(generation, &steps);
            deployment.strategy.selector =
                Some(crate::state::deployment::Selector::parse("zone=a").unwrap());
            let (response, _) = state.apply(&Command::BeginDeployment { deployment });
            assert_eq!(response, Response::Ok);
            for id in nodes {
                for phase in [
                    Phase::Backup,
                    Phase::Sync,
                    Phase::Activate,
                    Phase::Health,
                    Phase::Stabilize,
                    Phase::Committed,
                ] {
                    let command = Command::SetNodePhase {
                        generation,
                        node: *id,
                        phase,
                        error: None,
                        at_ms: 1,
                    };
                    assert_eq!(state.apply(&command).0, Response::Ok, "{phase}");
                }
                // The node restarted on the new build and reported it.
                state.apply(&Command::RegisterNode {
                    id: *id,
                    info: NodeInfo {
                        build_hash: "ab".repeat(32),
                        ..info(&format!("127.0.0.1:710{id}"))
                    },
                });
            }
            let command = Command::SetDeploymentState {
                generation,
                state: DeploymentState::Completed,
                reason: None,
                at_ms: 2,
            };
            assert_eq!(state.apply(&command).0, Response::Ok);
        };
        complete(&mut state, 1, &[1, 2]);
        assert_eq!(
            state.fleet.target.as_deref(),
            Some("old"),
            "node 3 still runs it"
        );
        assert_eq!(state.fleet.staged, Some("ab".repeat(32)));
        complete(&mut state, 2, &[3]);
        assert_eq!(
            state.fleet.target,
            Some("ab".repeat(32)),
            "every member runs it"
        );
        assert_eq!(state.fleet.staged, None);
    }

    #[test]
    fn a_rollout_completed_within_its_failure_budget_sets_the_target() {
        let mut state = State::default();
        state.fleet.target = Some("old".into());
        let mut deployment = deployment(1, &[(1, Phase::Pending), (4, Phase::Pending)]);
        deployment.nodes.get_mut(&4).unwrap().role = Role::Learner;
        deployment.strategy.max_failures = Some(crate::state::deployment::FailureBudget::Nodes(1));
        state.apply(&Command::BeginDeployment { deployment });
        let mut set = |node: u64, phases: &[Phase]| {
            for phase in phases {
                let command = Command::SetNodePhase {
                    generation: 1,
                    node,
                    phase: *phase,
                    error: None,
                    at_ms: 1,
                };
                assert_eq!(state.apply(&command).0, Response::Ok, "{phase}");
            }
        };
        set(
            4,
            &[
                Phase::Backup,
                Phase::Sync,
                Phase::Activate,
                Phase::Health,
                Phase::Restoring,
                Phase::Restored,
            ],
        );
        set(
            1,
            &[
                Phase::Backup,
                Phase::Sync,
                Phase::Activate,
                Phase::Health,
                Phase::Stabilize,
                Phase::Committed,
            ],
        );
        let command = Command::SetDeploymentState {
            generation: 1,
            state: DeploymentState::Completed,
            reason: Some("completed with 1 of 1 tolerated learner failures".into()),
            at_ms: 2,
        };
        assert_eq!(state.apply(&command).0, Response::Ok);
        assert_eq!(
            state.fleet.target,
            Some("ab".repeat(32)),
            "the restored learner is behind the target, not the target gone"
        );
    }

    #[test]
    fn a_rollout_that_ends_on_mixed_builds_clears_the_target() {
        let mut state = State::default();
        state.fleet.target = Some("old".into());
        let deployment = deployment(1, &[(1, Phase::Pending), (2, Phase::Pending)]);
        state.apply(&Command::BeginDeployment { deployment });
        for phase in [
            Phase::Backup,
            Phase::Sync,
            Phase::Activate,
            Phase::Health,
            Phase::Stabilize,
            Phase::Committed,
        ] {
            let (response, _) = state.apply(&Command::SetNodePhase {
                generation: 1,
                node: 1,
                phase,
                error: None,
                at_ms: 1,
            });
            assert_eq!(response, Response::Ok, "{phase}");
        }
        let (response, _) = state.apply(&Command::AbortDeployment {
            generation: 1,
            revert: false,
            reason: "aborted by an operator".into(),
            at_ms: 2,
        });
        assert_eq!(response, Response::Ok);
        let (response, _) = state.apply(&Command::SetDeploymentState {
            generation: 1,
            state: DeploymentState::Aborted,
            reason: None,
            at_ms: 3,
        });
        assert_eq!(response, Response::Ok);
        assert_eq!(state.fleet.target, None, "node 1 runs new, node 2 old");
        assert!(state.history[0].left_mixed());
        assert_eq!(state.failure_streak(1), 0);
    }

    #[test]
    fn fleet_records_round_trip_and_old_snapshots_decode() {
        let mut state = State::default();
        state.fleet.target = Some("abc".into());
        state.fleet.auto_disabled = true;
        let value = state.record_value(&Record::Fleet).unwrap().unwrap();
        let mut loaded = State::default();
        loaded.load_record(Record::Fleet, value).unwrap();
        assert_eq!(loaded.fleet, state.fleet);
        let old: State = serde_json::from_str(r#"{"cluster_id":"c","last_generation":3}"#).unwrap();
        assert_eq!(old.fleet, Fleet::default());
    }
}
