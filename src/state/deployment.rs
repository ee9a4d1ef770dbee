//! The replicated record of a rolling update: the active deployment and finished history.
//!
//! Pure data plus the transition rules every member applies identically. The rollout
//! engine uses the same methods to project the effect of its own proposals, so what the
//! engine assumes and what `State::apply` accepts cannot drift apart.
//!
//! Timestamps (`*_ms`) are the proposing leader's wall clock, for display only: no
//! decision on any node compares them with another clock.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::analysis::{Analysis, Evaluation, EVALUATIONS_KEPT};
use crate::release::Manifest;

/// How many finished deployments `State::history` keeps; older ones are dropped.
pub const HISTORY_LIMIT: usize = 50;

/// Consecutive failed health checks during the soak that revert a deployment.
pub const DEFAULT_SOAK_STRIKES: u32 = 3;

/// How often a leader may try to hand leadership over before updating itself in place.
pub const MAX_HANDOFF_ATTEMPTS: u32 = 3;

/// One rolling update, from `BeginDeployment` until it reaches a terminal state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Deployment {
    /// Strictly increasing across deployments; every step command names it, so a step
    /// proposed for an older deployment can never change this one.
    pub generation: u64,
    /// Build hash every node runs when the deployment completes.
    pub target_hash: String,
    /// What the cluster ran before (the leader's build at start), for status and history.
    /// Each node's own revert target is [`NodeStep::from_hash`].
    pub previous_hash: String,
    /// The target release's content; nodes sync the chunks they lack from it.
    pub manifest: Manifest,
    /// Pace and failure policy, fixed at start so every leader follows the same one.
    pub strategy: Strategy,
    pub state: DeploymentState,
    /// Nodes in the planned order (learners, voter followers, the leader at start last).
    pub order: Vec<u64>,
    /// Progress of every node in `order`.
    pub nodes: BTreeMap<u64, NodeStep>,
    pub started_by: Starter,
    /// Term of the leader that began the deployment (for operators; agents fence on the
    /// term of whichever leader sends them a mutation).
    pub issued_by_term: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Why the deployment stopped being `Running` (first failure, operator request, ...).
    pub reason: Option<String>,
    /// Set when a leader with nothing left to update but itself tried to hand over
    /// leadership: survives the leader's restart so the next leader (or this one, once
    /// re-elected) knows how often it was tried.
    pub handoff: Option<Handoff>,
    /// Why it began, in words: the operator's dist, a new build in the watched directory,
    /// or a node found on another build than the cluster's target.
    pub trigger: Option<String>,
    /// An operator aborted it (`cluster rollout abort`): it ends `aborted`, or `reverted`
    /// when the abort asked for a revert.
    pub aborted: bool,
    /// Every evaluation of the strategy's analyses (metric gates), oldest first; the
    /// newest `EVALUATIONS_KEPT`.
    pub evaluations: Vec<Evaluation>,
    /// The canary step under way (an index into [`Deployment::step_targets`]).
    pub step: usize,
    /// When the deployment entered its state (wall clock of the leader that recorded it;
    /// shown as "paused for ...", never compared across machines for a decision).
    pub state_since_ms: u64,
    /// Members the strategy's selector (`--nodes`) left out of the rollout.
    pub untargeted: Vec<u64>,
}

/// How a deployment proceeds and when it gives up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default)]
pub struct Strategy {
    /// Learners updated at once. Voters always go one at a time so quorum holds.
    pub max_parallel: usize,
    pub on_failure: OnFailure,
    /// How long a restarted (or restored) node may take to report healthy.
    pub health_deadline_ms: u64,
    /// Pause between health polls of one node.
    pub poll_interval_ms: u64,
    /// How long a healthy node must stay healthy on one boot before it is committed.
    pub stabilize_ms: u64,
    /// A member whose last acknowledgement is older than this counts as unhealthy
    /// (resolved from the heartbeat, 2 x heartbeat by default, when the deployment starts).
    pub stale_ack_ms: u64,
    /// The operator accepted losing quorum while a voter restarts (clusters of 1 or 2
    /// voters); recorded so every leader knows the deployment was started with it.
    pub allow_downtime: bool,
    /// After the last node commits, how long every node's health is still watched before
    /// the deployment completes; 0 completes at once. A leader change restarts the window.
    pub soak_ms: u64,
    /// Consecutive failed health checks of any one node during the soak that revert the
    /// whole deployment (the "3 strikes after the switch" rule), and during a node's own
    /// stabilization window that fail it: one late acknowledgement on a loaded host is
    /// not a failure.
    pub soak_strikes: u32,
    /// Metric gates evaluated while the deployment runs (`--analysis`).
    pub analyses: Vec<Analysis>,
    /// Canary steps (`--steps 1,25%,100%`): how many nodes run the new release at the end
    /// of each; empty: one step of every node.
    pub steps: Vec<Step>,
    /// How long a step that reached its nodes holds before the next begins; `None`: until
    /// an operator runs `cluster rollout promote`.
    pub step_pause_ms: Option<u64>,
    /// A rollout with no node committed and no step promoted for this long stops (as
    /// `on_failure` says); `None`: no deadline.
    pub progress_deadline_ms: Option<u64>,
    /// Learner failures the rollout tolerates (`--max-failures`): each such learner is
    /// restored and the rollout goes on; one more stops it as `on_failure` says. Voters
    /// never use it. `None`: the first failure stops it.
    pub max_failures: Option<FailureBudget>,
    /// Only members whose labels match take part (`--nodes zone=a`); the others are
    /// listed as not targeted. `None`: every member.
    pub selector: Option<Selector>,
    /// A label whose value groups the nodes (`--order-by zone`): every node of one group
    /// is committed before the next group starts, the leader's group last.
    pub order_by: Option<String>,
}

/// `--nodes`: labels a member must carry to take part in a rollout, `key=value` pairs
/// separated by commas, all of which must match.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Selector(pub Vec<(String, String)>);

impl Selector {
    /// `zone=a` or `zone=a,rack=r1`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let pairs = text
            .split(',')
            .map(|part| {
                let part = part.trim();
                match part.split_once('=') {
                    Some((key, value)) if valid_label(key) && valid_label(value) => {
                        Ok((key.to_string(), value.to_string()))
                    }
                    _ => Err(format!(
                        "--nodes {text:?}: {part:?} is not key=value (letters, digits, '-', \
                         '_', '.'; e.g. zone=a or zone=a,rack=r1)"
                    )),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self(pairs))
    }

    /// Whether a member with `labels` takes part.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&pairs.join(","))
    }
}

/// A label key or value: 1 to 63 letters, digits, '-', '_' or '.'.
pub fn valid_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `labels` as `zone=a, rack=r1` (empty when there are none).
pub fn describe_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--max-failures`: a number of learners, or a share of the rollout's learners
/// (rounded down: 50% of 3 learners tolerates 1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureBudget {
    Nodes(u32),
    Percent(u32),
}

impl FailureBudget {
    /// `2` or `25%`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(share) => match share.parse::<u32>() {
                Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                _ => Err(format!(
                    "--max-failures {text:?}: a share is 0% to 100% of the learners"
                )),
            },
            None => text.parse::<u32>().map(Self::Nodes).map_err(|_| {
                format!(
                    "--max-failures {text:?}: a number of learners (2) or a share of them (25%)"
                )
            }),
        }
    }

    /// How many failed learners this budget tolerates among `learners`.
    pub fn resolve(self, learners: usize) -> usize {
        match self {
            Self::Nodes(n) => (n as usize).min(learners),
            Self::Percent(p) => learners * p as usize / 100,
        }
    }
}

impl fmt::Display for FailureBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nodes(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// One canary step: a number of nodes, or a share of them (rounded up).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Nodes(u32),
    Percent(u32),
}

impl Step {
    /// `3` or `25%`.
    pub fn parse_list(text: &str) -> Result<Vec<Step>, String> {
        let steps = text
            .split(',')
            .map(|part| {
                let part = part.trim();
                let step = match part.strip_suffix('%') {
                    Some(share) => match share.parse::<u32>() {
                        Ok(p) if (1..=100).contains(&p) => Step::Percent(p),
                        _ => return Err(format!("step {part:?}: a share is 1% to 100%")),
                    },
                    None => match part.parse::<u32>() {
                        Ok(n) if n >= 1 => Step::Nodes(n),
                        _ => {
                            return Err(format!(
                                "step {part:?}: a number of nodes (at least 1) or a share (25%)"
                            ))
                        }
                    },
                };
                Ok(step)
            })
            .collect::<Result<Vec<_>, String>>()?;
        if steps.is_empty() {
            return Err("--steps needs at least one step".into());
        }
        Ok(steps)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Nodes(n) => write!(f, "{n}"),
            Step::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How many of `nodes` run the new release at the end of each step: each step at least
/// one more than the one before, the last one every node (a list that stops short gets
/// a final step of every node).
pub fn step_targets(steps: &[Step], nodes: usize) -> Vec<usize> {
    let mut targets: Vec<usize> = Vec::new();
    for step in steps {
        let wanted = match *step {
            Step::Nodes(n) => n as usize,
            Step::Percent(p) => (nodes * p as usize).div_ceil(100),
        };
        let floor = targets.last().map_or(1, |last| last + 1);
        let target = wanted.max(floor).min(nodes);
        if targets.last() != Some(&target) {
            targets.push(target);
        }
    }
    if targets.last() != Some(&nodes) {
        targets.push(nodes);
    }
    targets
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            max_parallel: 1,
            on_failure: OnFailure::Revert,
            health_deadline_ms: 60_000,
            poll_interval_ms: 500,
            stabilize_ms: 10_000,
            // 2 x the default 100 ms heartbeat.
            stale_ack_ms: 200,
            allow_downtime: false,
            // Records written before the soak existed decode as "no soak".
            soak_ms: 0,
            soak_strikes: DEFAULT_SOAK_STRIKES,
            analyses: Vec::new(),
            steps: Vec::new(),
            step_pause_ms: None,
            progress_deadline_ms: None,
            max_failures: None,
            selector: None,
            order_by: None,
        }
    }
}

/// What a failed node does to the rest of the deployment (the failed node itself is
/// always restored).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Restore every node already updated, newest first.
    #[default]
    Revert,
    /// Leave committed nodes on the new build; only nodes caught mid-update are restored.
    Halt,
}

/// Lifecycle of a deployment. The last four are terminal: reaching one moves the
/// deployment into `State::history`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// Nodes are being updated.
    #[default]
    Running,
    /// No node is started; nodes already under way finish (or fail) their update.
    Paused,
    /// A node failed under `OnFailure::Halt`: nodes caught mid-update are restored, then
    /// the deployment ends `Failed`. Distinct from `Running` so status never claims a
    /// stopping rollout is progressing, and so a new leader knows not to start nodes.
    Halting,
    /// A node failed under `OnFailure::Revert` (or an operator asked to revert): every
    /// updated node is restored, newest first.
    Reverting,
    Completed,
    /// Ended with nodes left on the new build or a node that could not be restored.
    Failed,
    /// Every node that was touched runs its previous build again.
    Reverted,
    /// Stopped by an operator without a revert.
    Aborted,
}

impl DeploymentState {
    /// True once nothing more happens to the deployment.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Reverted | Self::Aborted
        )
    }

    /// Whether `self -> next` is a legal move. Terminal states go nowhere.
    pub fn can_move_to(self, next: DeploymentState) -> bool {
        use DeploymentState::*;
        match self {
            Running => matches!(
                next,
                Paused | Halting | Reverting | Completed | Failed | Aborted
            ),
            Paused => matches!(next, Running | Halting | Reverting | Failed | Aborted),
            Halting => matches!(next, Reverting | Failed | Aborted),
            Reverting => matches!(next, Reverted | Failed | Aborted),
            Completed | Failed | Reverted | Aborted => false,
        }
    }

    /// Restoring nodes rather than updating them.
    pub fn is_stopping(self) -> bool {
        matches!(self, Self::Halting | Self::Reverting)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Halting => "halting",
            Self::Reverting => "reverting",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Reverted => "reverted",
            Self::Aborted => "aborted",
        }
    }
}

impl fmt::Display for DeploymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who began a deployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Starter {
    /// `cluster update`.
    #[default]
    Operator,
    /// The leader noticed a new build in its watched dist directory.
    Automatic,
}

impl fmt::Display for Starter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Operator => "operator",
            Self::Automatic => "automatic",
        })
    }
}

/// A member's vote status when the deployment was planned.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Counts for quorum: updated one at a time.
    #[default]
    Voter,
    /// Receives the log but does not vote: may be updated in parallel.
    Learner,
}

/// Where one node is in its update.
///
/// Verification of the synced content is part of `Sync` (the agent only reports success
/// once every byte matches the manifest and the release's build hash is the target), so
/// a separate `Verify` phase would add a replicated write without adding a decision.
/// Activation and restart share `Activate` for the same reason: the engine decides what
/// to do next by asking the node which build it runs, not by which of the two happened.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not touched: runs `from_hash` and nothing was pinned or activated.
    #[default]
    Pending,
    /// Pinning the running release as `previous`, the restore target.
    Backup,
    /// Fetching the missing content and verifying it against the build hash.
    Sync,
    /// Pointing `current` at the target and restarting into it.
    Activate,
    /// Waiting, up to the health deadline, for the node to serve on the target build.
    Health,
    /// Watching the node stay healthy, on one boot, for the stabilization window.
    Stabilize,
    /// Runs the target; the node's boot guard is cleared.
    Committed,
    /// Swapping back to `from_hash`, restarting, and waiting for health on it.
    Restoring,
    /// Runs `from_hash` again and is healthy.
    Restored,
    /// Could not be restored: needs an operator.
    Failed,
}

impl Phase {
    /// Between `Pending` and `Committed`: the node is being changed by the update.
    pub fn is_updating(self) -> bool {
        matches!(
            self,
            Self::Backup | Self::Sync | Self::Activate | Self::Health | Self::Stabilize
        )
    }

    /// The node may be down or on an unverified build right now: a voter in such a phase
    /// is one the cluster must be able to lose.
    pub fn is_unsettled(self) -> bool {
        self.is_updating() || matches!(self, Self::Restoring | Self::Failed)
    }

    /// Whether `self -> next` is a legal move. Only forward moves are legal, so a
    /// duplicated or late proposal can never move a node back.
    pub fn can_move_to(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Pending, Backup)
                | (Backup, Sync)
                | (Sync, Activate)
                | (Activate, Health)
                | (Health, Stabilize)
                | (Stabilize, Committed)
                | (Restoring, Restored | Failed)
                | (
                    Backup | Sync | Activate | Health | Stabilize | Committed,
                    Restoring
                )
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Backup => "backup",
            Self::Sync => "sync",
            Self::Activate => "activate",
            Self::Health => "health",
            Self::Stabilize => "stabilize",
            Self::Committed => "committed",
            Self::Restoring => "restoring",
            Self::Restored => "restored",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node's progress through the deployment.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct NodeStep {
    /// Captured at plan time: decides how many may be updated at once.
    pub role: Role,
    /// Captured at plan time, so messages name the node the way `status` does.
    pub addr: String,
    /// The build the node ran when the deployment was planned: its restore target.
    pub from_hash: String,
    pub phase: Phase,
    /// How many times the node's update was started (entered `Backup`).
    pub attempt: u32,
    /// Why the node left the happy path; kept through the restore that follows.
    pub error: Option<String>,
    /// When the node's update started (entered `Backup`).
    pub started_ms: Option<u64>,
    /// When the node reached `Committed`, `Restored` or `Failed`.
    pub finished_ms: Option<u64>,
    /// When the node entered its current phase (`None`: pending since the plan).
    pub phase_since_ms: Option<u64>,
    /// Every phase the node entered, with when, oldest first (at most [`TRAIL_LIMIT`]):
    /// what a follower prints, so that no phase is skipped between two polls.
    pub trail: Vec<(Phase, u64)>,
    /// The node's labels at plan time (node.toml `labels`): `--order-by` groups by them.
    pub labels: BTreeMap<String, String>,
}

/// Phases a node's trail keeps (a few attempts' worth).
pub const TRAIL_LIMIT: usize = 32;

impl NodeStep {
    /// A node of the plan, not yet touched.
    pub fn pending(role: Role, addr: impl Into<String>, from_hash: impl Into<String>) -> Self {
        Self {
            role,
            addr: addr.into(),
            from_hash: from_hash.into(),
            ..Self::default()
        }
    }
}

/// A leader's persisted intent to hand leadership to an updated voter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Handoff {
    /// The leader that wants to be updated.
    pub from: u64,
    /// The updated voter it tried to hand over to.
    pub to: u64,
    /// Attempts so far; at [`MAX_HANDOFF_ATTEMPTS`] the leader updates itself in place.
    pub attempts: u32,
    pub at_ms: u64,
}

/// A finished deployment as `rollout history` shows it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct HistoryEntry {
    pub generation: u64,
    pub target_hash: String,
    pub previous_hash: String,
    pub strategy: Strategy,
    /// One of the terminal states.
    pub outcome: DeploymentState,
    pub reason: Option<String>,
    pub started_by: Starter,
    pub issued_by_term: u64,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub order: Vec<u64>,
    /// Per-node outcome and timings.
    pub nodes: BTreeMap<u64, NodeStep>,
    /// Why it began (see [`Deployment::trigger`]).
    pub trigger: Option<String>,
    /// An operator aborted it.
    pub aborted: bool,
    /// Its analyses' evaluations (see [`Deployment::evaluations`]).
    #[serde(default)]
    pub evaluations: Vec<Evaluation>,
    /// Members its selector left out (see [`Deployment::untargeted`]).
    #[serde(default)]
    pub untargeted: Vec<u64>,
}

impl HistoryEntry {
    /// The history record of `deployment` (the manifest is dropped: the hash names it).
    pub fn of(deployment: &Deployment) -> Self {
        Self {
            generation: deployment.generation,
            target_hash: deployment.target_hash.clone(),
            previous_hash: deployment.previous_hash.clone(),
            strategy: deployment.strategy.clone(),
            outcome: deployment.state,
            reason: deployment.reason.clone(),
            started_by: deployment.started_by,
            issued_by_term: deployment.issued_by_term,
            started_ms: deployment.started_ms,
            finished_ms: deployment.finished_ms,
            order: deployment.order.clone(),
            nodes: deployment.nodes.clone(),
            trigger: deployment.trigger.clone(),
            aborted: deployment.aborted,
            evaluations: deployment.evaluations.clone(),
            untargeted: deployment.untargeted.clone(),
        }
    }

    /// Whether `node` failed in this deployment: could not be restored, or was restored
    /// after failing itself (not merely reverted because another node failed).
    pub fn node_failed(&self, node: u64) -> bool {
        self.nodes.get(&node).is_some_and(|s| {
            s.phase == Phase::Failed || s.phase == Phase::Restored && s.error.is_some()
        })
    }

    /// Nodes this deployment left on its target build while others were not: the
    /// cluster runs mixed builds afterwards.
    pub fn left_mixed(&self) -> bool {
        let committed = self
            .nodes
            .values()
            .filter(|s| s.phase == Phase::Committed)
            .count();
        committed > 0 && committed < self.nodes.len()
    }
}

impl Deployment {
    /// This deployment without its manifest, which the target hash names: what views and
    /// clients get (a manifest can be megabytes, and a follower asks every 200 ms).
    pub fn without_manifest(&self) -> Deployment {
        Deployment {
            generation: self.generation,
            target_hash: self.target_hash.clone(),
            previous_hash: self.previous_hash.clone(),
            manifest: Manifest::default(),
            strategy: self.strategy.clone(),
            state: self.state,
            order: self.order.clone(),
            nodes: self.nodes.clone(),
            started_by: self.started_by,
            issued_by_term: self.issued_by_term,
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            reason: self.reason.clone(),
            handoff: self.handoff.clone(),
            trigger: self.trigger.clone(),
            aborted: self.aborted,
            evaluations: self.evaluations.clone(),
            step: self.step,
            state_since_ms: self.state_since_ms,
            untargeted: self.untargeted.clone(),
        }
    }

    /// How many nodes run the new release at the end of each step.
    pub fn step_targets(&self) -> Vec<usize> {
        step_targets(&self.strategy.steps, self.nodes.len())
    }

    /// How many failed learners `--max-failures` tolerates in this deployment.
    pub fn failure_budget(&self) -> usize {
        let learners = self
            .nodes
            .values()
            .filter(|s| s.role == Role::Learner)
            .count();
        self.strategy
            .max_failures
            .map_or(0, |budget| budget.resolve(learners))
    }

    /// Nodes that failed (restoring, restored or not restorable), by id. While the
    /// deployment runs, only a node's own failure puts it there.
    pub fn failed_nodes(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, s)| matches!(s.phase, Phase::Restoring | Phase::Restored | Phase::Failed))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Nodes that failed on their own (not those a revert brought back), by id: what a
    /// failure budget has used, for status.
    pub fn own_failures(&self) -> Vec<u64> {
        self.failed_nodes()
            .into_iter()
            .filter(|id| self.nodes[id].error.is_some())
            .collect()
    }

    /// Whether the rollout may go on despite its failures: every failed node is a
    /// learner being (or already) restored, and they are no more than the failure
    /// budget. True with no failure.
    pub fn within_failure_budget(&self) -> bool {
        let failed = self.failed_nodes();
        failed.len() <= self.failure_budget()
            && failed.iter().all(|id| {
                let step = &self.nodes[id];
                step.role == Role::Learner && step.phase != Phase::Failed
            })
    }

    /// Begins the step after `from` (an operator's `promote`, or a step's pause over).
    /// Promoting a step already left changes nothing.
    pub fn promote(&mut self, from: usize) -> Result<bool, String> {
        if self.step != from {
            return Ok(false);
        }
        if from + 1 >= self.step_targets().len() {
            return Err(format!(
                "rollout generation {} is on its last step: nothing to promote",
                self.generation
            ));
        }
        self.step = from + 1;
        Ok(true)
    }

    /// Checks that a deployment proposed by `BeginDeployment` is well-formed and fresh.
    pub fn validate_new(&self) -> Result<(), String> {
        if self.target_hash.is_empty() {
            return Err("the deployment names no target build hash".into());
        }
        if self.order.is_empty() {
            return Err(format!(
                "the deployment to {} updates no node: every node already runs it",
                short_hash(&self.target_hash)
            ));
        }
        if self.state != DeploymentState::Running {
            return Err(format!(
                "a deployment must start running, not {}",
                self.state
            ));
        }
        if self.strategy.max_parallel == 0 {
            return Err("max_parallel must be at least 1".into());
        }
        if self.order.len() != self.nodes.len()
            || self.order.iter().any(|id| !self.nodes.contains_key(id))
        {
            return Err("the deployment's order and its nodes name different members".into());
        }
        if let Some((id, step)) = self.nodes.iter().find(|(_, s)| s.phase != Phase::Pending) {
            return Err(format!(
                "node {id} starts in phase {}, not pending",
                step.phase
            ));
        }
        Ok(())
    }

    /// The node's step, or a message naming the node and the generation.
    fn step_mut(&mut self, node: u64) -> Result<&mut NodeStep, String> {
        let generation = self.generation;
        self.nodes
            .get_mut(&node)
            .ok_or_else(|| format!("node {node} is not part of rollout generation {generation}"))
    }

    /// Moves `node` to `phase`. `Ok(false)`: it already was there (a duplicate), nothing
    /// changed. `Err`: the move is illegal and nothing changed.
    pub fn set_node_phase(
        &mut self,
        node: u64,
        phase: Phase,
        error: Option<&str>,
        at_ms: u64,
    ) -> Result<bool, String> {
        let state = self.state;
        let generation = self.generation;
        let step = self.step_mut(node)?;
        if step.phase == phase {
            return Ok(false);
        }
        if !step.phase.can_move_to(phase) {
            return Err(format!(
                "node {node} ({}) cannot move from {} to {} in rollout generation {generation}",
                step.addr, step.phase, phase
            ));
        }
        // Stale leaders' proposals must not push a node forward once the deployment is
        // stopping, nor start a node while it is paused.
        let allowed = match phase {
            Phase::Backup => state == DeploymentState::Running,
            Phase::Restoring | Phase::Restored | Phase::Failed => true,
            _ => !state.is_stopping(),
        };
        if !allowed {
            return Err(format!(
                "node {node} ({}) cannot move to {phase} while rollout generation \
                 {generation} is {state}",
                step.addr
            ));
        }
        step.phase = phase;
        step.phase_since_ms = Some(at_ms);
        step.trail.push((phase, at_ms));
        if step.trail.len() > TRAIL_LIMIT {
            step.trail.remove(0);
        }
        if let Some(error) = error {
            step.error = Some(error.to_string());
        }
        match phase {
            Phase::Backup => {
                step.attempt += 1;
                step.started_ms = Some(at_ms);
            }
            Phase::Committed | Phase::Restored | Phase::Failed => step.finished_ms = Some(at_ms),
            _ => {}
        }
        Ok(true)
    }

    /// Moves the deployment to `state`. Terminal states are refused unless the nodes
    /// bear them out, so history never claims more than happened.
    pub fn set_state(
        &mut self,
        state: DeploymentState,
        reason: Option<&str>,
        at_ms: u64,
    ) -> Result<bool, String> {
        if self.state == state {
            return Ok(false);
        }
        if !self.state.can_move_to(state) {
            return Err(format!(
                "rollout generation {} cannot move from {} to {state}",
                self.generation, self.state
            ));
        }
        let not_in = |allowed: &[Phase]| {
            self.nodes
                .iter()
                .find(|(_, step)| !allowed.contains(&step.phase))
                .map(|(id, step)| (*id, step.phase))
        };
        let blocker = match state {
            // Learners restored within the failure budget are part of a completion.
            DeploymentState::Completed if self.within_failure_budget() => {
                not_in(&[Phase::Committed, Phase::Restored])
            }
            DeploymentState::Completed => not_in(&[Phase::Committed]),
            DeploymentState::Reverted => not_in(&[Phase::Pending, Phase::Restored]),
            _ => None,
        };
        if let Some((id, phase)) = blocker {
            return Err(format!(
                "rollout generation {} cannot be {state}: node {id} is {phase}",
                self.generation
            ));
        }
        // A reason says why a rollout is not running: resuming it clears the pause's.
        if state == DeploymentState::Running {
            self.reason = None;
        }
        self.state = state;
        self.state_since_ms = at_ms;
        if let Some(reason) = reason {
            self.reason = Some(reason.to_string());
        }
        if state.is_terminal() {
            self.finished_ms = Some(at_ms);
        }
        Ok(true)
    }

    /// An operator's abort: stop starting nodes; restore the nodes caught mid-update and,
    /// with `revert`, every updated node too. Repeating it changes nothing.
    pub fn abort(&mut self, revert: bool, reason: &str, at_ms: u64) -> Result<bool, String> {
        let generation = self.generation;
        let next = match (self.state, revert) {
            (DeploymentState::Reverting, _) | (DeploymentState::Halting, false) => {
                let changed = !self.aborted;
                self.aborted = true;
                return Ok(changed);
            }
            (state, _) if state.is_terminal() => {
                return Err(format!(
                    "rollout generation {generation} already ended ({state})"
                ))
            }
            (_, true) => DeploymentState::Reverting,
            (_, false) => DeploymentState::Halting,
        };
        self.set_state(next, Some(reason), at_ms)?;
        self.aborted = true;
        Ok(true)
    }

    /// When every node committed and the soak (if any) is under way: the latest commit.
    pub fn soak_started_ms(&self) -> Option<u64> {
        let all_committed =
            !self.nodes.is_empty() && self.nodes.values().all(|s| s.phase == Phase::Committed);
        (all_committed && self.strategy.soak_ms > 0)
            .then(|| self.nodes.values().filter_map(|s| s.finished_ms).max())
            .flatten()
    }

    /// Records attempt `attempt` of `from` handing leadership to `to`. Older attempts are
    /// duplicates and change nothing.
    /// Records an evaluation of one of the strategy's analyses (the newest
    /// `EVALUATIONS_KEPT` are kept). Refused for an analysis the strategy does not have.
    pub fn record_evaluation(&mut self, evaluation: &Evaluation) -> Result<bool, String> {
        if !self
            .strategy
            .analyses
            .iter()
            .any(|a| a.name == evaluation.name)
        {
            return Err(format!(
                "rollout generation {} has no analysis named {:?}",
                self.generation, evaluation.name
            ));
        }
        self.evaluations.push(evaluation.clone());
        if self.evaluations.len() > EVALUATIONS_KEPT {
            let drop = self.evaluations.len() - EVALUATIONS_KEPT;
            self.evaluations.drain(..drop);
        }
        Ok(true)
    }

    pub fn record_handoff(
        &mut self,
        from: u64,
        to: u64,
        attempt: u32,
        at_ms: u64,
    ) -> Result<bool, String> {
        let generation = self.generation;
        let from_phase = self.step_mut(from)?.phase;
        let to_phase = self.step_mut(to)?.phase;
        if from_phase != Phase::Pending || to_phase != Phase::Committed {
            return Err(format!(
                "rollout generation {generation}: node {from} ({from_phase}) cannot hand \
                 leadership to node {to} ({to_phase}); the leader must be pending and the \
                 new leader committed"
            ));
        }
        if self.handoff.as_ref().is_some_and(|h| h.attempts >= attempt) {
            return Ok(false);
        }
        self.handoff = Some(Handoff {
            from,
            to,
            attempts: attempt,
            at_ms,
        });
        Ok(true)
    }

    /// Hand-off attempts `leader` has made so far.
    pub fn handoff_attempts(&self, leader: u64) -> u32 {
        match &self.handoff {
            Some(handoff) if handoff.from == leader => handoff.attempts,
            _ => 0,
        }
    }

    /// The node's phase (`Pending` for a node outside the deployment).
    pub fn phase(&self, node: u64) -> Phase {
        self.nodes.get(&node).map(|s| s.phase).unwrap_or_default()
    }

    /// How `node` is named in messages: `node 3 (127.0.0.1:7103)`.
    pub fn describe(&self, node: u64) -> String {
        match self.nodes.get(&node) {
            Some(step) if !step.addr.is_empty() => format!("node {node} ({})", step.addr),
            _ => format!("node {node}"),
        }
    }
}

/// How many finished deployments in a row, newest first, `node` failed in (`history`
/// oldest first, as `State::history`).
pub fn failure_streak(history: &[HistoryEntry], node: u64) -> u32 {
    history
        .iter()
        .rev()
        .filter(|h| h.nodes.contains_key(&node))
        .take_while(|h| h.node_failed(node))
        .count() as u32
}

/// The first 12 characters of a build hash (its hex digits): enough to tell builds apart
/// in messages and tables. A shorter string is returned whole; any string is cut on a
/// character boundary, so a malformed "hash" never panics.
pub fn short_hash(hash: &str) -> &str {
    match hash.char_indices().nth(12) {
        Some((end, _)) => &hash[..end],
        None => hash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hash_keeps_twelve_characters_of_any_string() {
        let cases = [
            ("a full hash", "0123456789abcdef0123", "0123456789ab"),
            ("exactly twelve", "0123456789ab", "0123456789ab"),
            ("short", "dev", "dev"),
            ("empty", "", ""),
            // Two bytes each: twelve characters are 24 bytes.
            ("non-ASCII", "ééééééééééééé", "éééééééééééé"),
            // Byte 12 falls inside 'é'.
            ("mixed", "0123456789aé€x", "0123456789aé"),
        ];
        for (name, hash, short) in cases {
            assert_eq!(short_hash(hash), short, "{name}");
        }
    }

    #[test]
    fn phase_moves_are_forward_only() {
        use Phase::*;
        let all = [
            Pending, Backup, Sync, Activate, Health, Stabilize, Committed, Restoring, Restored,
            Failed,
        ];
        let legal: Vec<(Phase, Phase)> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_move_to(*b))
            .collect();
        assert_eq!(
            legal,
            vec![
                (Pending, Backup),
                (Backup, Sync),
                (Backup, Restoring),
                (Sync, Activate),
                (Sync, Restoring),
                (Activate, Health),
                (Activate, Restoring),
                (Health, Stabilize),
                (Health, Restoring),
                (Stabilize, Committed),
                (Stabilize, Restoring),
                (Committed, Restoring),
                (Restoring, Restored),
                (Restoring, Failed),
            ]
        );
    }

    #[test]
    fn terminal_states_go_nowhere() {
        use DeploymentState::*;
        for from in [Completed, Failed, Reverted, Aborted] {
            for to in [
                Running, Paused, Halting, Reverting, Completed, Failed, Reverted, Aborted,
            ] {
                assert!(!from.can_move_to(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn a_node_keeps_a_trail_of_its_phases_and_resuming_clears_the_pause_reason() {
        let mut d = Deployment {
            generation: 1,
            ..Deployment::default()
        };
        d.nodes
            .insert(2, NodeStep::pending(Role::Voter, "n2", "old"));
        d.order = vec![2];
        for (phase, at) in [
            (Phase::Backup, 10),
            (Phase::Sync, 20),
            (Phase::Activate, 30),
        ] {
            assert!(d.set_node_phase(2, phase, None, at).unwrap());
        }
        assert!(!d.set_node_phase(2, Phase::Activate, None, 40).unwrap());
        assert_eq!(
            d.nodes[&2].trail,
            [
                (Phase::Backup, 10),
                (Phase::Sync, 20),
                (Phase::Activate, 30)
            ]
        );
        d.set_state(DeploymentState::Paused, Some("paused by alice"), 50)
            .unwrap();
        assert_eq!(d.reason.as_deref(), Some("paused by alice"));
        d.set_state(DeploymentState::Running, None, 60).unwrap();
        assert_eq!(d.reason, None, "a resumed rollout is not paused by anyone");
    }

    #[test]
    fn a_deployment_without_its_manifest_keeps_everything_else() {
        let mut d = Deployment {
            generation: 3,
            target_hash: "new".into(),
            previous_hash: "old".into(),
            reason: Some("why".into()),
            trigger: Some("because".into()),
            aborted: true,
            finished_ms: Some(9),
            ..Deployment::default()
        };
        d.manifest.entries.push(crate::release::Entry {
            path: "bin".into(),
            kind: crate::release::EntryKind::Dir { mode: 0o755 },
        });
        d.nodes
            .insert(2, NodeStep::pending(Role::Voter, "n2", "old"));
        d.order = vec![2];
        let light = d.without_manifest();
        assert!(light.manifest.entries.is_empty());
        assert_eq!(
            Deployment {
                manifest: d.manifest.clone(),
                ..light
            },
            d
        );
    }

    #[test]
    fn old_deployment_json_without_new_fields_decodes() {
        let json = r#"{"generation":2,"target_hash":"ab","nodes":{"1":{"phase":"sync"}}}"#;
        let deployment: Deployment = serde_json::from_str(json).unwrap();
        assert_eq!(deployment.generation, 2);
        assert_eq!(deployment.state, DeploymentState::Running);
        assert_eq!(deployment.strategy, Strategy::default());
        assert_eq!(deployment.nodes[&1].phase, Phase::Sync);
        assert_eq!(deployment.nodes[&1].role, Role::Voter);
    }
}
