//! The rollout engine: the replicated deployment, one event and the time in; actions out.
//!
//! Pure, in the style of openraft's `Engine`: [`Engine::step`] decides, a runtime acts.
//! The replicated [`Deployment`] is the source of truth; the engine only keeps what a
//! freshly elected leader may lose without harm (which operation or poll it is waiting
//! for, when it started waiting). Any persisted deployment therefore has a sensible next
//! action, and a new leader resumes (or reverts) from wherever the old one stopped.
//!
//! # Rules
//!
//! 1. **Persist, then act.** A node enters a phase by a generation-gated
//!    `SetNodePhase` proposal *before* the agent operation of that phase is sent, so the
//!    replicated phase is never behind what was done to the node. Agent operations are
//!    idempotent; a resumed phase repeats its operation.
//! 2. **Per node:** `Backup` (pin the running release) -> `Sync` (fetch and verify) ->
//!    `Activate` (ask the node which build it runs; if not the target, activate and
//!    restart it) -> `Health` (poll until serving the target build, caught up and acking,
//!    within the health deadline) -> `Stabilize` (healthy on every poll and on one boot
//!    for the window) -> agent `Commit` -> `Committed`. The commit is persisted only after
//!    the agent disarmed its boot guard, so a committed node never reverts by itself.
//! 3. **Order:** waves from [`super::plan::waves`] over the deployment's order with this
//!    leader moved last; a wave starts when the previous ones are committed. A voter
//!    starts only when no other node is unsettled, a learner only when no voter is and
//!    fewer than `max_parallel` learners are.
//! 4. **Leader last:** when only this leader is left, it polls an updated voter and, once
//!    one is healthy, persists a `RecordHandoff` intent and asks for a leadership
//!    transfer; the new leader updates the old one as a follower. If the transfer fails
//!    the engine asks the runtime to restart this node, on its current build, so another
//!    voter leads. With no updated voter, or after [`MAX_HANDOFF_ATTEMPTS`], the leader
//!    updates itself in place; its own restart ends its leadership.
//! 5. **Failure** (an operation error, a missed health deadline, an unhealthy poll or a
//!    new boot id while stabilizing) moves the node to `Restoring` and the deployment to
//!    `Reverting` (`on_failure = revert`) or `Halting` (`halt`). Nodes caught mid-update
//!    are restored once their operation answers; when reverting, committed nodes are then
//!    restored newest first, voters one at a time, this leader last. A restore repeats
//!    the agent's `Restore` until the node is healthy on its previous build, or the
//!    deadline marks it `Failed`; a failed voter stops further voter restores (the
//!    cluster cannot afford a second voter down).
//! 6. **Finish:** `Completed` when every node is committed; `Reverted` when every
//!    touched node is restored; otherwise `Failed`. The terminal proposal is followed by
//!    [`Action::Finish`] with the summary.
//!
//! # Contract with the runtime
//!
//! - Create one engine per leadership term; on [`Event::LeadershipLost`] (or when the
//!   deployment leaves the replicated state) drop it.
//! - Call [`Engine::step`] with the deployment as currently applied on this node, and
//!   execute the returned actions in order; a `Propose` must be committed before the
//!   next action runs. If a proposal is refused or fails, skip the rest of the batch,
//!   call [`Engine::resync`], and step again with the refreshed deployment.
//! - Answer every `Agent` and `PollHealth` action exactly once, echoing its
//!   [`RequestId`]; a transport error or timeout is an `Err` answer. Report a failed
//!   leadership transfer as [`Event::TransferFailed`]. `Tick` at least every
//!   `poll_interval_ms`; `now.monotonic_ms` never goes backwards within one engine.
//! - Agents execute a node's operations one at a time and refuse a mutation whose
//!   request id (term first, then sequence) is lower than the last one they executed, or
//!   whose generation is stale. Request ids grow across leaders, across
//!   [`Engine::resync`], and across restarts of a leader that leads again in the same
//!   term (give each process its own [`Engine::for_incarnation`]), so an operation
//!   delayed in the network can never undo a newer one.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::plan::{group_of, waves};
use crate::state::deployment::{short_hash, MAX_HANDOFF_ATTEMPTS};
use crate::state::{Command, Deployment, DeploymentState, HistoryEntry, OnFailure, Phase, Role};

/// How often a node that was told to restart is polled until it is healthy on the target
/// build (or `poll_interval_ms`, if shorter): its restart is overhead, not a wait anyone
/// asked for.
pub const RESTART_POLL_MS: u64 = 25;

/// The time of a step: one clock for decisions, one for display.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Now {
    /// This leader's monotonic clock: deadlines and windows are measured on it.
    pub monotonic_ms: u64,
    /// Wall clock (unix ms), only copied into proposals for operators to read.
    pub unix_ms: u64,
}

/// Something the runtime learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed: check deadlines, send due polls, resume what is pending.
    Tick,
    /// An agent answered the [`Action::Agent`] with this `id`.
    StepDone {
        node: u64,
        id: RequestId,
        /// `Err` carries the agent's (or transport's) message.
        result: Result<(), String>,
    },
    /// The answer to the [`Action::PollHealth`] with this `id`; `Err`: the node could
    /// not be asked.
    HealthObserved {
        node: u64,
        id: RequestId,
        health: Result<Health, String>,
    },
    /// A [`Action::TransferLeadership`] did not hand leadership over.
    TransferFailed { to: u64, reason: String },
    /// This node no longer leads: the engine goes quiet.
    LeadershipLost,
}

/// Names one request so its answer cannot be mistaken for another's: a previous leader's
/// operation may still answer after this leader sent the same kind of operation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestId {
    /// The term of the leader whose engine sent it.
    pub term: u64,
    /// Counts the engine's requests, from its incarnation's first (see
    /// [`Engine::for_incarnation`]).
    pub seq: u64,
}

/// What a node reported about itself, merged with the leader's view of it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Health {
    /// The process accepts requests.
    pub serving: bool,
    /// Build hash of the running binary.
    pub build_hash: String,
    /// Changes on every process start: a change while stabilizing means a crash.
    pub boot_id: String,
    /// A Raft member whose applied index reached the leader's commit index as of the
    /// node's restart.
    pub caught_up: bool,
    /// Age of the node's last acknowledgement on the leader's clock (`Some(0)` for the
    /// leader itself); `None`: never acknowledged.
    pub last_ack_ms: Option<u64>,
    /// Why the node's own health check (`health_command`) fails; `None` when it passes.
    pub problem: Option<String>,
    /// The node's boot guard gave up on this deployment's release and put the previous
    /// one back (it reports the restore at start): a failure, whatever it runs now.
    pub guard_restored: Option<String>,
}

/// A typed operation on one node's agent. Every one is idempotent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentOp {
    /// Pin the running release (`hash`) as `previous`, the restore target.
    PinPrevious { hash: String },
    /// Fetch the chunks of release `hash` the node lacks (from `sources` first: nodes that
    /// already hold it) and verify every byte against the deployment's manifest.
    Prepare { hash: String, sources: Vec<u64> },
    /// Point `current` at release `hash` and arm the boot guard; no restart.
    Activate { hash: String },
    /// Restart gracefully into `current`.
    Restart,
    /// Point `current` back at release `hash` (the pinned `previous`, or already
    /// `current` when the update never got that far), disarm the boot guard, and restart
    /// if the running build is not `hash`.
    Restore { hash: String },
    /// Disarm the boot guard: release `hash` is good. `previous` stays pinned, because a
    /// revert of the whole deployment may still need it.
    Commit { hash: String },
}

impl AgentOp {
    pub fn kind(&self) -> OpKind {
        match self {
            AgentOp::PinPrevious { .. } => OpKind::PinPrevious,
            AgentOp::Prepare { .. } => OpKind::Prepare,
            AgentOp::Activate { .. } => OpKind::Activate,
            AgentOp::Restart => OpKind::Restart,
            AgentOp::Restore { .. } => OpKind::Restore,
            AgentOp::Commit { .. } => OpKind::Commit,
        }
    }
}

/// Which operation an answer belongs to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    PinPrevious,
    Prepare,
    Activate,
    Restart,
    Restore,
    Commit,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::PinPrevious => "pin-previous",
            OpKind::Prepare => "prepare",
            OpKind::Activate => "activate",
            OpKind::Restart => "restart",
            OpKind::Restore => "restore",
            OpKind::Commit => "commit",
        })
    }
}

/// What the runtime must do next.
// A few actions live for one step at a time: a command inline costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Replicate this command and wait until it is committed.
    Propose(Command),
    /// Send `op` to `node`'s agent, fenced by the deployment's generation and by `id`,
    /// whose `term` is this leader's (agents refuse a lower id or a stale generation).
    /// Answer with [`Event::StepDone`].
    Agent {
        node: u64,
        id: RequestId,
        generation: u64,
        op: AgentOp,
    },
    /// Ask `node` how it is; answer with [`Event::HealthObserved`].
    PollHealth { node: u64, id: RequestId },
    /// Hand leadership to `to`; on failure answer with [`Event::TransferFailed`].
    TransferLeadership { to: u64 },
    /// Restart this node's process on its current build (a failed hand-off: another
    /// voter should lead). The intent is already persisted.
    RestartSelf { reason: String },
    /// The deployment reached a terminal state (already proposed just before).
    Finish(Summary),
}

/// The outcome of a deployment, for the final report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub generation: u64,
    pub outcome: DeploymentState,
    pub target_hash: String,
    pub reason: Option<String>,
    /// Committed on the target build.
    pub updated: Vec<u64>,
    /// Back on their previous build (with why they left the happy path, if they did).
    pub restored: Vec<NodeOutcome>,
    /// Could not be restored, or stopped mid-way: need an operator.
    pub failed: Vec<NodeOutcome>,
    /// Never touched.
    pub untouched: Vec<u64>,
}

/// One node in a [`Summary`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOutcome {
    pub node: u64,
    pub addr: String,
    pub reason: Option<String>,
}

impl Summary {
    /// The summary of a finished deployment.
    pub fn of(entry: &HistoryEntry) -> Self {
        let mut summary = Summary {
            generation: entry.generation,
            outcome: entry.outcome,
            target_hash: entry.target_hash.clone(),
            reason: entry.reason.clone(),
            ..Summary::default()
        };
        for id in &entry.order {
            let Some(step) = entry.nodes.get(id) else {
                continue;
            };
            let outcome = NodeOutcome {
                node: *id,
                addr: step.addr.clone(),
                reason: step.error.clone(),
            };
            match step.phase {
                Phase::Committed => summary.updated.push(*id),
                Phase::Restored => summary.restored.push(outcome),
                Phase::Pending => summary.untouched.push(*id),
                _ => summary.failed.push(outcome),
            }
        }
        summary
    }
}

/// The decision-maker of one leader for one deployment.
#[derive(Debug)]
pub struct Engine {
    /// The node this engine runs on: the leader.
    me: u64,
    /// The leader's term: the first part of every request id.
    term: u64,
    /// Deployment the volatile state below belongs to.
    generation: Option<u64>,
    tracks: BTreeMap<u64, Track>,
    handoff: HandoffTrack,
    soak: SoakTrack,
    /// The leader's latest view of every member's acknowledgements (empty: unknown, no
    /// gating). See [`Engine::observe`].
    liveness: BTreeMap<u64, Liveness>,
    /// Why no node could be started on the last step, for status.
    waiting: Option<String>,
    /// The node the rollout waits to start, and since when (this leader's clock).
    waiting_since: Option<(u64, u64)>,
    /// Requests sent so far (see [`RequestId`]).
    requests: u64,
    /// Finished, restarting, or no longer leading: no more actions.
    done: bool,
    /// This leader runs the target's `bin/cluster` already: its own update switches in
    /// place without a restart, so it keeps leading and needs no hand-off.
    in_place: bool,
    /// The canary step this leader watches hold (its nodes all committed), and since
    /// when (this leader's clock: a new leader starts the pause again).
    step_hold: Option<(usize, u64)>,
    /// Progress last seen (nodes committed, step) and since when (this leader's clock),
    /// for `--progress-deadline`.
    progress: Option<((usize, usize), u64)>,
}

/// What this leader is waiting for on one node. Lost on a leader change, by design:
/// the next leader rebuilds it from the persisted phase.
#[derive(Debug, Default)]
struct Track {
    /// The phase the timers below belong to; a different persisted phase resets them.
    phase: Phase,
    /// Operation sent and not answered. Survives a phase change: a node is never sent a
    /// second operation while one is outstanding.
    op: Option<(RequestId, OpKind)>,
    /// Operation to send next, once `not_before_ms` has passed.
    next_op: Option<OpKind>,
    not_before_ms: u64,
    /// Poll sent and not answered, and the phase it was sent in (an answer for an older
    /// phase is discarded).
    poll: Option<(RequestId, Phase)>,
    next_poll_ms: u64,
    /// When this leader began the phase: deadlines and windows count from here.
    since_ms: u64,
    /// Boot id seen when the node passed health, to catch a restart while stabilizing.
    boot_id: Option<String>,
    /// Why the node is not yet good enough, for the failure message.
    last_problem: Option<String>,
    /// Failed checks in a row during the stabilization window.
    strikes: u32,
}

impl Track {
    fn reset(&mut self, phase: Phase, now_ms: u64, poll_interval_ms: u64, stabilize_ms: u64) {
        self.phase = phase;
        self.next_op = match phase {
            Phase::Backup => Some(OpKind::PinPrevious),
            Phase::Sync => Some(OpKind::Prepare),
            Phase::Restoring => Some(OpKind::Restore),
            _ => None,
        };
        self.not_before_ms = now_ms;
        // The node was just seen healthy when it enters the window: look again later.
        self.next_poll_ms = if phase == Phase::Stabilize {
            now_ms + poll_interval_ms.min(stabilize_ms)
        } else {
            now_ms
        };
        self.since_ms = now_ms;
        if phase != Phase::Stabilize {
            self.boot_id = None;
        }
        self.last_problem = None;
        self.strikes = 0;
    }
}

/// This leader handing leadership over before updating itself.
#[derive(Debug, Default)]
struct HandoffTrack {
    /// When it started looking for a healthy updated voter.
    since_ms: Option<u64>,
    /// Index into the candidates, advanced past an unhealthy one.
    candidate: usize,
    /// The candidate whose health poll is outstanding.
    polling: Option<u64>,
    /// Transfer requested; waiting for leadership to go (or a failure).
    sent: bool,
    last_problem: Option<String>,
}

/// One member as the leader's replication metrics see it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    pub role: Role,
    /// Age of its last acknowledgement on the leader's clock; `None`: never acked.
    pub last_ack_ms: Option<u64>,
}

/// The soak after the last commit, as this leader sees it. Lost on a leader change, by
/// design: the next leader watches a whole window again (never less than configured).
#[derive(Debug, Default)]
struct SoakTrack {
    /// When this leader began watching.
    since_ms: Option<u64>,
    /// Consecutive failed health checks per node.
    strikes: BTreeMap<u64, u32>,
}

/// One step's working set: the deployment as it will be once this step's proposals are
/// applied, and the actions so far.
struct Cx {
    view: Deployment,
    out: Vec<Action>,
    now: Now,
}

/// Where an incarnation's request numbers start: `incarnation << INCARNATION_SHIFT`.
const INCARNATION_SHIFT: u32 = 32;

impl Engine {
    /// An engine for leader `me` in `term`.
    pub fn new(me: u64, term: u64) -> Self {
        Self {
            me,
            term,
            generation: None,
            tracks: BTreeMap::new(),
            handoff: HandoffTrack::default(),
            soak: SoakTrack::default(),
            liveness: BTreeMap::new(),
            waiting: None,
            waiting_since: None,
            requests: 0,
            done: false,
            in_place: false,
            step_hold: None,
            progress: None,
        }
    }

    /// Tells the engine whether this leader's own update needs no restart (the runtime
    /// compares the binaries; see `in_place`).
    pub fn update_in_place(&mut self, in_place: bool) {
        self.in_place = in_place;
    }

    /// The engine of this node's `incarnation`th process start. A leader restarted by its
    /// supervisor could lead again in the same term where openraft restores its vote
    /// (`raft::config` turns that off; the fence does not rely on it), and its new engine
    /// must not reuse the request numbers its previous process already sent:
    /// each incarnation counts from `incarnation << 32`, above every request of the ones
    /// before it (an incarnation sends far fewer than 2^32 requests).
    pub fn for_incarnation(mut self, incarnation: u64) -> Self {
        self.requests = incarnation << INCARNATION_SHIFT;
        self
    }

    /// Forgets what this engine was waiting for, as if it had just been elected, but
    /// keeps counting requests: answers to earlier requests are ignored from now on.
    /// For when the runtime could not carry out a step's actions (a refused proposal).
    pub fn resync(&mut self) {
        self.tracks.clear();
        self.handoff = HandoffTrack::default();
        // Strikes are kept: losing them would forgive a node that keeps failing.
        self.soak.since_ms = None;
        self.step_hold = None;
        self.progress = None;
        self.done = false;
    }

    /// Updates the leader's view of the members' acknowledgements (call before `step`):
    /// a node is started only while it and every other voter acknowledge freshly, so an
    /// update never takes down a voter while another one is already down.
    pub fn observe(&mut self, liveness: BTreeMap<u64, Liveness>) {
        self.liveness = liveness;
    }

    /// Time left in the soak this leader is watching, if it is watching one.
    pub fn soak_left_ms(&self, deployment: &Deployment, now_ms: u64) -> Option<u64> {
        let since = self.soak.since_ms?;
        let watched = now_ms.saturating_sub(since);
        Some(deployment.strategy.soak_ms.saturating_sub(watched))
    }

    /// Why the last step could not start the next node, if it could not.
    pub fn waiting(&self) -> Option<&str> {
        self.waiting.as_deref()
    }

    /// Decides what to do after `event`, given `deployment` as replicated.
    pub fn step(&mut self, deployment: &Deployment, event: Event, now: Now) -> Vec<Action> {
        if self.generation != Some(deployment.generation) {
            self.resync();
            self.generation = Some(deployment.generation);
        }
        if self.done {
            return Vec::new();
        }
        let mut cx = Cx {
            view: without_manifest(deployment),
            out: Vec::new(),
            now,
        };
        self.sync_tracks(&cx);
        match event {
            Event::Tick => {}
            Event::StepDone { node, id, result } => self.on_step_done(&mut cx, node, id, result),
            Event::HealthObserved { node, id, health } => self.on_health(&mut cx, node, id, health),
            Event::TransferFailed { to, reason } => self.on_transfer_failed(&mut cx, to, reason),
            Event::LeadershipLost => {
                self.done = true;
                return Vec::new();
            }
        }
        if !self.done {
            self.waiting = None;
            self.drive(&mut cx);
        }
        cx.out
    }

    fn sync_tracks(&mut self, cx: &Cx) {
        let now = cx.now.monotonic_ms;
        let interval = cx.view.strategy.poll_interval_ms;
        let window = cx.view.strategy.stabilize_ms;
        for (id, step) in &cx.view.nodes {
            let track = self.tracks.entry(*id).or_default();
            if track.phase != step.phase {
                track.reset(step.phase, now, interval, window);
            }
        }
    }

    // ---- events -------------------------------------------------------------------

    fn on_step_done(&mut self, cx: &mut Cx, node: u64, id: RequestId, result: Result<(), String>) {
        let now = cx.now.monotonic_ms;
        let interval = cx.view.strategy.poll_interval_ms;
        let phase = cx.view.phase(node);
        let Some(track) = self.tracks.get_mut(&node) else {
            return;
        };
        let kind = match track.op {
            Some((sent, kind)) if sent == id => kind,
            // Not the outstanding request: a previous leader's, or a duplicate.
            _ => return,
        };
        track.op = None;
        if !op_belongs(phase, kind) {
            return;
        }
        if phase == Phase::Restoring {
            match result {
                Ok(()) => {
                    // The node restarted (if it had to): its health deadline starts now.
                    track.since_ms = now;
                    track.next_poll_ms = now;
                }
                Err(error) => {
                    // Transient or not, repeating a restore is safe; the deadline decides.
                    track.next_op = Some(OpKind::Restore);
                    track.not_before_ms = now + interval;
                    track.last_problem = Some(format!("restore failed: {error}"));
                }
            }
            return;
        }
        if cx.view.state.is_stopping() {
            let error = result.err().map(|e| format!("{kind} failed: {e}"));
            self.set_phase(cx, node, Phase::Restoring, error);
            return;
        }
        match (kind, result) {
            (OpKind::PinPrevious, Ok(())) => self.set_phase(cx, node, Phase::Sync, None),
            (OpKind::Prepare, Ok(())) => {
                self.set_phase(cx, node, Phase::Activate, None);
                // It just answered and holds the release: activate at once. (A leader that
                // finds a node in Activate polls it first: it may already run the target.)
                if cx.view.phase(node) == Phase::Activate {
                    self.track(node).next_op = Some(OpKind::Activate);
                }
            }
            (OpKind::Activate, Ok(())) => track.next_op = Some(OpKind::Restart),
            (OpKind::Restart, result) => {
                // The process may exit before it answers: whether the restart happened
                // is for the health poll to tell, within the deadline.
                self.set_phase(cx, node, Phase::Health, None);
                if let Err(error) = result {
                    self.track(node).last_problem = Some(format!("restart answered: {error}"));
                }
            }
            (OpKind::Commit, Ok(())) => self.set_phase(cx, node, Phase::Committed, None),
            (kind, Err(error)) => self.fail(cx, node, format!("{kind} failed: {error}")),
            (OpKind::Restore, Ok(())) => {}
        }
    }

    fn on_health(&mut self, cx: &mut Cx, node: u64, id: RequestId, health: Result<Health, String>) {
        let now = cx.now.monotonic_ms;
        let strategy = cx.view.strategy.clone();
        let phase = cx.view.phase(node);
        let Some(track) = self.tracks.get_mut(&node) else {
            return;
        };
        let polled_in = match track.poll {
            Some((sent, phase)) if sent == id => phase,
            _ => return,
        };
        track.poll = None;
        track.next_poll_ms = now
            + match phase {
                // Waiting for a restarted node to come back is no check of its health:
                // look often (a node still down refuses the connection at once).
                Phase::Health => strategy.poll_interval_ms.min(RESTART_POLL_MS),
                _ => strategy.poll_interval_ms,
            };
        if polled_in != phase {
            return;
        }
        if let (Phase::Activate | Phase::Health | Phase::Stabilize, Ok(h)) = (phase, &health) {
            if let Some(why) = &h.guard_restored {
                // Activating it again would only start the next round of failed boots.
                return self.fail(cx, node, why.clone());
            }
        }
        let target = cx.view.target_hash.clone();
        match phase {
            Phase::Activate if track.op.is_none() && track.next_op.is_none() => match &health {
                Ok(h) if h.serving && h.build_hash == target => {
                    // Already runs the target: the restart happened before a leader change.
                    self.set_phase(cx, node, Phase::Health, None);
                }
                Ok(_) => track.next_op = Some(OpKind::Activate),
                Err(error) => track.last_problem = Some(format!("unreachable: {error}")),
            },
            Phase::Health => match judge(&health, &target, strategy.stale_ack_ms) {
                Ok(boot_id) => {
                    track.boot_id = Some(boot_id);
                    self.set_phase(cx, node, Phase::Stabilize, None);
                }
                Err(problem) => track.last_problem = Some(problem),
            },
            // One late acknowledgement on a loaded host is not a failure: like the soak,
            // the window fails a node on `soak_strikes` failed checks in a row (a restart
            // fails it at once).
            Phase::Stabilize => match judge(&health, &target, strategy.stale_ack_ms) {
                Err(problem) => {
                    track.strikes += 1;
                    let limit = strategy.soak_strikes.max(1);
                    if track.strikes >= limit {
                        let why = match limit {
                            1 => format!("unhealthy during the stabilization window: {problem}"),
                            _ => format!(
                                "unhealthy during the stabilization window: failed {limit} \
                                 consecutive checks: {problem}"
                            ),
                        };
                        self.fail(cx, node, why)
                    } else {
                        track.last_problem = Some(format!(
                            "{problem} ({} of {limit} failed checks in a row)",
                            track.strikes
                        ));
                    }
                }
                Ok(boot_id) => match track.boot_id.clone() {
                    Some(seen) if seen != boot_id => self.fail(
                        cx,
                        node,
                        format!(
                            "restarted during the stabilization window (boot {seen} -> \
                             {boot_id}): is it crash-looping?"
                        ),
                    ),
                    _ => {
                        track.boot_id = Some(boot_id);
                        track.strikes = 0;
                        track.last_problem = None;
                        let ends_ms = track.since_ms + strategy.stabilize_ms;
                        if now >= ends_ms {
                            track.next_op = Some(OpKind::Commit);
                        } else {
                            // The window ends on its timer, with one last check then, not
                            // at whichever poll comes after it.
                            track.next_poll_ms = track.next_poll_ms.min(ends_ms);
                        }
                    }
                },
            },
            Phase::Restoring if track.op.is_none() && track.next_op.is_none() => {
                let from = cx.view.nodes[&node].from_hash.clone();
                match judge(&health, &from, strategy.stale_ack_ms) {
                    Ok(_) => self.set_phase(cx, node, Phase::Restored, None),
                    Err(problem) => track.last_problem = Some(problem),
                }
            }
            Phase::Committed if self.handoff.polling == Some(node) => {
                self.handoff.polling = None;
                self.on_candidate_health(cx, node, &health);
            }
            Phase::Committed if self.soak.since_ms.is_some() => {
                self.on_soak_health(cx, node, &health);
            }
            _ => {}
        }
    }

    fn on_candidate_health(&mut self, cx: &mut Cx, node: u64, health: &Result<Health, String>) {
        if cx.view.state != DeploymentState::Running || cx.view.phase(self.me) != Phase::Pending {
            return;
        }
        match judge(health, &cx.view.target_hash, cx.view.strategy.stale_ack_ms) {
            Ok(_) => {
                let attempt = cx.view.handoff_attempts(self.me) + 1;
                let intent = Command::RecordHandoff {
                    generation: cx.view.generation,
                    from: self.me,
                    to: node,
                    attempt,
                    at_ms: cx.now.unix_ms,
                };
                self.project(cx, intent);
                cx.out.push(Action::TransferLeadership { to: node });
                self.handoff.sent = true;
            }
            Err(problem) => {
                self.handoff.last_problem = Some(format!("{}: {problem}", cx.view.describe(node)));
                self.handoff.candidate += 1;
            }
        }
    }

    /// One health check during the soak: a run of failures reverts the whole deployment,
    /// whatever the failure policy (the "3 strikes after the switch" rule).
    fn on_soak_health(&mut self, cx: &mut Cx, node: u64, health: &Result<Health, String>) {
        let (stale_ack_ms, limit) = (
            cx.view.strategy.stale_ack_ms,
            cx.view.strategy.soak_strikes.max(1),
        );
        let strikes = self.soak.strikes.entry(node).or_default();
        let problem = match judge(health, &cx.view.target_hash, stale_ack_ms) {
            Ok(_) => {
                *strikes = 0;
                return;
            }
            Err(problem) => problem,
        };
        *strikes += 1;
        if *strikes < limit || cx.view.state != DeploymentState::Running {
            return;
        }
        let why = format!(
            "failed {limit} consecutive health checks during the soak after the last commit: \
             {problem}"
        );
        let reason = format!("{} {why}; reverting every node", cx.view.describe(node));
        self.set_phase(cx, node, Phase::Restoring, Some(why));
        self.set_state(cx, DeploymentState::Reverting, Some(reason));
    }

    fn on_transfer_failed(&mut self, cx: &mut Cx, to: u64, reason: String) {
        if !self.handoff.sent {
            return;
        }
        let attempts = cx.view.handoff_attempts(self.me);
        cx.out.push(Action::RestartSelf {
            reason: format!(
                "could not hand leadership to node {to}: {reason}; restarting on the current \
                 build so an updated voter leads (hand-off attempt {attempts} of \
                 {MAX_HANDOFF_ATTEMPTS})"
            ),
        });
        self.done = true;
    }

    // ---- driving ------------------------------------------------------------------

    fn drive(&mut self, cx: &mut Cx) {
        match cx.view.state {
            DeploymentState::Running | DeploymentState::Paused => self.drive_forward(cx),
            DeploymentState::Halting | DeploymentState::Reverting => self.drive_stopping(cx),
            _ => self.done = true,
        }
    }

    fn drive_forward(&mut self, cx: &mut Cx) {
        // A leader that recorded a node's failure but died before stopping the deployment
        // (failures within `--max-failures` let it go on).
        if !cx.view.within_failure_budget() {
            let reason = self.over_budget(&cx.view);
            self.stop(cx, reason);
            return self.drive_stopping(cx);
        }
        // Tolerated learner failures are restored while the rollout goes on.
        for node in nodes_where(&cx.view, |p| p.is_updating() || p == Phase::Restoring) {
            self.advance(cx, node);
            if cx.view.state.is_stopping() {
                return self.drive_stopping(cx);
            }
        }
        if !cx.view.within_failure_budget() {
            // A tolerated learner's restore failed: it is no longer a tolerated failure.
            let reason = self.over_budget(&cx.view);
            self.stop(cx, reason);
            return self.drive_stopping(cx);
        }
        if cx.view.state != DeploymentState::Running {
            // A pause is not a lack of progress: the deadline starts again on resume.
            self.progress = None;
            return;
        }
        if let Some(reason) = self.out_of_time(cx) {
            self.stop(cx, reason);
            return self.drive_stopping(cx);
        }
        if cx.view.nodes.values().all(|s| is_done(s.phase)) {
            return self.soak(cx);
        }
        // Canary steps: no node starts beyond the step's quota; a step whose nodes all
        // committed holds for its pause (or an operator's promote), then the next begins.
        let targets = cx.view.step_targets();
        let step = cx.view.step.min(targets.len() - 1);
        let quota = targets[step];
        // A learner restored within the failure budget does not count toward a step: the
        // step brings another node in its place, and holds only once its quota committed.
        let mut started = cx.view.nodes.len()
            - count_in(&cx.view, Phase::Pending)
            - count_in(&cx.view, Phase::Restored);
        if started >= quota {
            let done = count_in(&cx.view, Phase::Committed);
            if done >= quota && step + 1 < targets.len() {
                self.hold_step(cx, step, quota, targets.len());
            }
            return;
        }
        let order = self.effective_order(&cx.view);
        let roles: Vec<(u64, Role, &str)> = order
            .iter()
            .map(|id| {
                let step = &cx.view.nodes[id];
                (*id, step.role, group_of(&step.labels, &cx.view.strategy))
            })
            .collect();
        let waves = waves(&roles, cx.view.strategy.max_parallel);
        let Some(wave) = waves
            .into_iter()
            .find(|wave| wave.iter().any(|id| !is_done(cx.view.phase(*id))))
        else {
            return;
        };
        if wave == [self.me] && cx.view.phase(self.me) == Phase::Pending {
            return self.leader_last(cx);
        }
        for node in wave {
            if cx.view.phase(node) != Phase::Pending || !self.may_start(&cx.view, node) {
                continue;
            }
            if started >= quota {
                break;
            }
            if self.live_enough(cx, node) {
                started += 1;
                self.set_phase(cx, node, Phase::Backup, None);
                self.advance(cx, node);
            } else if cx.view.state.is_stopping() {
                return self.drive_stopping(cx);
            }
        }
    }

    /// `--progress-deadline`: why the rollout must stop, when no node committed and no
    /// step was promoted for that long (counted on this leader's clock while the rollout
    /// runs; a pause, a step's hold and a new leader start it again).
    fn out_of_time(&mut self, cx: &Cx) -> Option<String> {
        let deadline = cx.view.strategy.progress_deadline_ms?;
        let mark = (nodes_where(&cx.view, is_done).len(), cx.view.step);
        let now = cx.now.monotonic_ms;
        match self.progress {
            Some((seen, since)) if seen == mark => {
                let stalled = now.saturating_sub(since);
                (stalled >= deadline).then(|| {
                    let behind = cx
                        .view
                        .nodes
                        .iter()
                        .filter(|(_, s)| s.phase.is_updating())
                        .map(|(id, s)| format!("{} ({})", cx.view.describe(*id), s.phase))
                        .collect::<Vec<_>>();
                    format!(
                        "no progress for {} (--progress-deadline): no node committed and no \
                         step promoted{}",
                        humantime::format_duration(std::time::Duration::from_millis(
                            stalled / 1000 * 1000
                        )),
                        if behind.is_empty() {
                            String::new()
                        } else {
                            format!("; stuck: {}", behind.join(", "))
                        }
                    )
                })
            }
            _ => {
                self.progress = Some((mark, now));
                None
            }
        }
    }

    /// Step `step` (of `steps`) has its `quota` of nodes committed: hold it for the
    /// strategy's step pause, then promote it; with no pause, wait for an operator's
    /// promote. Nodes already updated stay under the metric gates meanwhile.
    fn hold_step(&mut self, cx: &mut Cx, step: usize, quota: usize, steps: usize) {
        let now = cx.now.monotonic_ms;
        // Holding is not stalling: the progress deadline counts from the step's end.
        self.progress = None;
        let since = match self.step_hold {
            Some((held, since)) if held == step => since,
            _ => {
                self.step_hold = Some((step, now));
                now
            }
        };
        let of = cx.view.nodes.len();
        match cx.view.strategy.step_pause_ms {
            Some(pause) if now.saturating_sub(since) >= pause => {
                let command = Command::PromoteStep {
                    generation: cx.view.generation,
                    from: step,
                    at_ms: cx.now.unix_ms,
                };
                if self.project(cx, command) {
                    self.step_hold = None;
                }
            }
            Some(pause) => {
                self.waiting = Some(format!(
                    "step {}/{steps} ({quota} of {of} nodes) holds for {} more before the next \
                     (or `cluster rollout promote`)",
                    step + 1,
                    humantime::format_duration(std::time::Duration::from_millis(
                        pause.saturating_sub(now.saturating_sub(since)) / 1000 * 1000
                    ))
                ));
            }
            None => {
                self.waiting = Some(format!(
                    "step {}/{steps} ({quota} of {of} nodes) holds until `cluster rollout \
                     promote`",
                    step + 1
                ));
            }
        }
    }

    /// Every node committed: watch their health for the soak window, then complete.
    fn soak(&mut self, cx: &mut Cx) {
        let now = cx.now.monotonic_ms;
        let window = cx.view.strategy.soak_ms;
        let since = *self.soak.since_ms.get_or_insert(now);
        if now.saturating_sub(since) >= window {
            let restored = nodes_where(&cx.view, |p| p == Phase::Restored);
            let reason = (!restored.is_empty()).then(|| {
                let names: Vec<String> = restored
                    .iter()
                    .map(|id| {
                        let step = &cx.view.nodes[id];
                        format!(
                            "{} stayed on build {} ({})",
                            cx.view.describe(*id),
                            short_hash(&step.from_hash),
                            step.error.as_deref().unwrap_or("failed")
                        )
                    })
                    .collect();
                format!(
                    "completed with {} of {} tolerated learner failures (--max-failures {}): {}",
                    restored.len(),
                    cx.view.failure_budget(),
                    cx.view
                        .strategy
                        .max_failures
                        .map(|b| b.to_string())
                        .unwrap_or_default(),
                    names.join("; ")
                )
            });
            self.set_state(cx, DeploymentState::Completed, reason);
            return;
        }
        let interval = cx.view.strategy.poll_interval_ms;
        for node in nodes_where(&cx.view, |p| p == Phase::Committed) {
            let track = self.track(node);
            if track.poll.is_some() || now < track.next_poll_ms {
                continue;
            }
            let id = self.next_request();
            let track = self.track(node);
            track.poll = Some((id, Phase::Committed));
            track.next_poll_ms = now + interval;
            cx.out.push(Action::PollHealth { node, id });
        }
    }

    /// Only this leader is left: hand leadership to an updated voter, or update in place.
    fn leader_last(&mut self, cx: &mut Cx) {
        let me = self.me;
        let now = cx.now.monotonic_ms;
        let candidates: Vec<u64> = self
            .effective_order(&cx.view)
            .into_iter()
            .rev()
            .filter(|id| {
                *id != me
                    && cx.view.nodes[id].role == Role::Voter
                    && cx.view.phase(*id) == Phase::Committed
            })
            .collect();
        if candidates.is_empty()
            || cx.view.handoff_attempts(me) >= MAX_HANDOFF_ATTEMPTS
            || self.in_place
        {
            // No updated voter can lead meanwhile (or hand-offs keep failing): the restart
            // in this node's own pipeline ends its leadership instead. A leader that
            // switches in place (the same `bin/cluster`) keeps leading through it.
            if !self.may_start(&cx.view, me) {
                return;
            }
            if self.live_enough(cx, me) {
                self.set_phase(cx, me, Phase::Backup, None);
                self.advance(cx, me);
            } else if cx.view.state.is_stopping() {
                return self.drive_stopping(cx);
            }
            return;
        }
        if self.handoff.sent || self.handoff.polling.is_some() {
            return;
        }
        let since = *self.handoff.since_ms.get_or_insert(now);
        let deadline = cx.view.strategy.health_deadline_ms;
        if now.saturating_sub(since) > deadline {
            let reason = format!(
                "node {me} found no healthy updated voter to take over leadership within \
                 {deadline} ms: {}",
                self.handoff.last_problem.as_deref().unwrap_or("no answer")
            );
            self.stop(cx, reason);
            return self.drive_stopping(cx);
        }
        let candidate = candidates[self.handoff.candidate % candidates.len()];
        let track = self.track(candidate);
        if track.poll.is_none() && now >= track.next_poll_ms {
            let id = self.next_request();
            self.track(candidate).poll = Some((id, Phase::Committed));
            self.handoff.polling = Some(candidate);
            cx.out.push(Action::PollHealth {
                node: candidate,
                id,
            });
        }
    }

    fn drive_stopping(&mut self, cx: &mut Cx) {
        // Nodes caught mid-update are restored once their outstanding operation answers.
        for node in nodes_where(&cx.view, Phase::is_updating) {
            if self.track(node).op.is_none() {
                self.set_phase(cx, node, Phase::Restoring, None);
            }
        }
        for node in nodes_where(&cx.view, |p| p == Phase::Restoring) {
            self.advance(cx, node);
        }
        if cx.view.state == DeploymentState::Reverting {
            self.start_reverts(cx);
        }
        let busy = cx
            .view
            .nodes
            .values()
            .any(|s| s.phase.is_updating() || s.phase == Phase::Restoring);
        let reverting = cx.view.state == DeploymentState::Reverting;
        if busy || reverting && self.next_revert(&cx.view).is_some() {
            return;
        }
        self.finish_stopping(cx);
    }

    /// Starts restoring committed nodes, newest first, as far as the limits allow.
    fn start_reverts(&mut self, cx: &mut Cx) {
        while let Some(node) = self.next_revert(&cx.view) {
            if !self.may_restore(&cx.view, node) {
                return;
            }
            self.set_phase(cx, node, Phase::Restoring, None);
            self.advance(cx, node);
        }
    }

    /// The next committed node to restore, newest first and this leader last; `None`
    /// when none is left that may ever be restored (a failed voter blocks the voters).
    fn next_revert(&self, view: &Deployment) -> Option<u64> {
        let voter_failed = view
            .nodes
            .values()
            .any(|s| s.role == Role::Voter && s.phase == Phase::Failed);
        let restorable = |id: &u64| {
            let step = &view.nodes[id];
            step.phase == Phase::Committed && !(voter_failed && step.role == Role::Voter)
        };
        let mut order = self.effective_order(view);
        let me_last = order.last() == Some(&self.me);
        if me_last {
            order.pop();
        }
        if let Some(node) = order.iter().rev().find(|id| restorable(id)) {
            return Some(*node);
        }
        let others_settled = view
            .nodes
            .iter()
            .all(|(id, s)| *id == self.me || !s.phase.is_updating() && s.phase != Phase::Restoring);
        (me_last && restorable(&self.me) && others_settled).then_some(self.me)
    }

    fn finish_stopping(&mut self, cx: &mut Cx) {
        let view = &cx.view;
        let mut reason = view.reason.clone().unwrap_or_else(|| "stopped".into());
        let failed: Vec<String> = view
            .nodes
            .iter()
            .filter(|(_, s)| s.phase == Phase::Failed)
            .map(|(id, s)| {
                format!(
                    "{} could not be restored ({})",
                    view.describe(*id),
                    s.error.as_deref().unwrap_or("no reason recorded")
                )
            })
            .collect();
        let left: Vec<String> = view
            .nodes
            .iter()
            .filter(|(_, s)| s.phase == Phase::Committed)
            .map(|(id, _)| id.to_string())
            .collect();
        for failure in &failed {
            reason.push_str("; ");
            reason.push_str(failure);
        }
        if !left.is_empty() {
            reason.push_str(&format!(
                "; left on build {}: node {}",
                short_hash(&view.target_hash),
                left.join(", ")
            ));
        }
        let outcome =
            if view.state == DeploymentState::Reverting && failed.is_empty() && left.is_empty() {
                DeploymentState::Reverted
            } else if view.aborted && failed.is_empty() {
                // An operator stopped it: nodes left on the new build are what was asked.
                DeploymentState::Aborted
            } else {
                DeploymentState::Failed
            };
        self.set_state(cx, outcome, Some(reason));
    }

    /// Whether `node`'s fetch should wait for a seed: while no other node holds the
    /// verified release (only this leader does) and another node is on its way to holding
    /// it (fetching, activating, or coming back healthy), the rest of a wave waits for that
    /// one and then fetches from it, instead of each fetching from the leader. A seed that
    /// fails stops being one, and the next node fetches from the leader.
    fn waits_for_a_seed(&self, cx: &Cx, node: u64) -> bool {
        let others = || cx.view.nodes.keys().copied().filter(move |id| *id != node);
        let holders = others().any(|id| holds_target(cx.view.phase(id)));
        let seeding = others().any(|id| match cx.view.phase(id) {
            Phase::Activate | Phase::Health => true,
            Phase::Sync => self
                .tracks
                .get(&id)
                .is_some_and(|t| matches!(t.op, Some((_, OpKind::Prepare)))),
            _ => false,
        });
        !holders && seeding
    }

    /// Sends a node's next operation or poll, or fails it at its deadline.
    fn advance(&mut self, cx: &mut Cx, node: u64) {
        let now = cx.now.monotonic_ms;
        let phase = cx.view.phase(node);
        let deadline = cx.view.strategy.health_deadline_ms;
        let track = self.track(node);
        if track.op.is_some() {
            return;
        }
        if let Some(kind) = track.next_op {
            if now >= track.not_before_ms {
                if kind == OpKind::Prepare && self.waits_for_a_seed(cx, node) {
                    return;
                }
                self.track(node).next_op = None;
                let id = self.next_request();
                self.track(node).op = Some((id, kind));
                cx.out.push(Action::Agent {
                    node,
                    id,
                    generation: cx.view.generation,
                    op: agent_op(&cx.view, node, kind),
                });
                return;
            }
        }
        if now.saturating_sub(track.since_ms) > deadline {
            let last = track
                .last_problem
                .clone()
                .unwrap_or_else(|| "no answer".into());
            match phase {
                Phase::Activate => {
                    return self.fail(
                        cx,
                        node,
                        format!("did not answer within {deadline} ms: {last}"),
                    )
                }
                Phase::Health => {
                    let why = format!(
                        "not healthy on build {} within {deadline} ms: {last}",
                        short_hash(&cx.view.target_hash)
                    );
                    return self.fail(cx, node, why);
                }
                Phase::Restoring => {
                    let step = &cx.view.nodes[&node];
                    let why = format!(
                        "not healthy on build {} within {deadline} ms of its restore: {last}",
                        short_hash(&step.from_hash)
                    );
                    let error = match &step.error {
                        Some(first) => format!("{first}; then {why}"),
                        None => why,
                    };
                    return self.set_phase(cx, node, Phase::Failed, Some(error));
                }
                _ => {}
            }
        }
        let polls = matches!(
            phase,
            Phase::Activate | Phase::Health | Phase::Stabilize | Phase::Restoring
        );
        if polls && track.next_op.is_none() && track.poll.is_none() && now >= track.next_poll_ms {
            let id = self.next_request();
            self.track(node).poll = Some((id, phase));
            cx.out.push(Action::PollHealth { node, id });
        }
    }

    // ---- helpers ------------------------------------------------------------------

    /// A failed node is restored and the deployment stops, unless the node is a learner
    /// within the failure budget (`--max-failures`): then the rollout goes on without it.
    fn fail(&mut self, cx: &mut Cx, node: u64, why: String) {
        let reason = format!(
            "{} failed in {}: {why}",
            cx.view.describe(node),
            cx.view.phase(node)
        );
        self.set_phase(cx, node, Phase::Restoring, Some(why));
        let going = matches!(
            cx.view.state,
            DeploymentState::Running | DeploymentState::Paused
        );
        if going && cx.view.within_failure_budget() {
            return;
        }
        let reason = match cx.view.strategy.max_failures {
            Some(budget) if cx.view.nodes[&node].role == Role::Learner => format!(
                "{reason}; {} learners failed, more than --max-failures {budget} tolerates ({})",
                cx.view.failed_nodes().len(),
                cx.view.failure_budget()
            ),
            _ => reason,
        };
        self.stop(cx, reason);
    }

    /// Why failures recorded in a running deployment stop it: the first failed node that
    /// the budget does not cover, and the count when a budget was set.
    fn over_budget(&self, view: &Deployment) -> String {
        let failed = view.failed_nodes();
        let first = failed
            .iter()
            .find(|id| view.nodes[*id].role == Role::Voter || view.phase(**id) == Phase::Failed)
            .or(failed.last())
            .copied()
            .unwrap_or(self.me);
        let mut reason = format!(
            "{} failed: {}",
            view.describe(first),
            view.nodes
                .get(&first)
                .and_then(|s| s.error.as_deref())
                .unwrap_or("no reason recorded")
        );
        if let Some(budget) = view.strategy.max_failures {
            reason.push_str(&format!(
                "; {} failed, --max-failures {budget} tolerates {} learners",
                failed.len(),
                view.failure_budget()
            ));
        }
        reason
    }

    /// Stops a running or paused deployment as its failure policy says.
    fn stop(&mut self, cx: &mut Cx, reason: String) {
        if matches!(
            cx.view.state,
            DeploymentState::Running | DeploymentState::Paused
        ) {
            let next = match cx.view.strategy.on_failure {
                OnFailure::Revert => DeploymentState::Reverting,
                OnFailure::Halt => DeploymentState::Halting,
            };
            self.set_state(cx, next, Some(reason));
        }
    }

    fn set_phase(&mut self, cx: &mut Cx, node: u64, phase: Phase, error: Option<String>) {
        let command = Command::SetNodePhase {
            generation: cx.view.generation,
            node,
            phase,
            error,
            at_ms: cx.now.unix_ms,
        };
        if self.project(cx, command) {
            let strategy = &cx.view.strategy;
            let (now, interval) = (cx.now.monotonic_ms, strategy.poll_interval_ms);
            let window = strategy.stabilize_ms;
            self.track(node).reset(phase, now, interval, window);
        }
    }

    fn set_state(&mut self, cx: &mut Cx, state: DeploymentState, reason: Option<String>) {
        let command = Command::SetDeploymentState {
            generation: cx.view.generation,
            state,
            reason,
            at_ms: cx.now.unix_ms,
        };
        if self.project(cx, command) && state.is_terminal() {
            cx.out
                .push(Action::Finish(Summary::of(&HistoryEntry::of(&cx.view))));
            self.done = true;
        }
    }

    /// Applies `command` to the step's view with the same rules `State::apply` uses, and
    /// proposes it if it changes anything.
    fn project(&mut self, cx: &mut Cx, command: Command) -> bool {
        let view = &mut cx.view;
        let applied = match &command {
            Command::SetNodePhase {
                node,
                phase,
                error,
                at_ms,
                ..
            } => view.set_node_phase(*node, *phase, error.as_deref(), *at_ms),
            Command::SetDeploymentState {
                state,
                reason,
                at_ms,
                ..
            } => view.set_state(*state, reason.as_deref(), *at_ms),
            Command::RecordHandoff {
                from,
                to,
                attempt,
                at_ms,
                ..
            } => view.record_handoff(*from, *to, *attempt, *at_ms),
            Command::PromoteStep { from, .. } => view.promote(*from),
            _ => Err(format!("the engine does not propose {command}")),
        };
        debug_assert!(
            applied.is_ok(),
            "the engine proposed what State::apply refuses: {command}: {applied:?}"
        );
        if applied == Ok(true) {
            cx.out.push(Action::Propose(command));
            return true;
        }
        false
    }

    fn next_request(&mut self) -> RequestId {
        self.requests += 1;
        RequestId {
            term: self.term,
            seq: self.requests,
        }
    }

    fn track(&mut self, node: u64) -> &mut Track {
        self.tracks.entry(node).or_default()
    }

    /// The deployment's order with this leader moved last.
    fn effective_order(&self, view: &Deployment) -> Vec<u64> {
        let mut order: Vec<u64> = view
            .order
            .iter()
            .copied()
            .filter(|id| *id != self.me)
            .collect();
        if view.nodes.contains_key(&self.me) {
            order.push(self.me);
        }
        order
    }

    /// A voter starts alone; a learner only beside fewer than `max_parallel` learners.
    fn may_start(&self, view: &Deployment, node: u64) -> bool {
        let others = view.nodes.iter().filter(|(id, _)| **id != node);
        match view.nodes[&node].role {
            Role::Voter => others.clone().all(|(_, s)| !s.phase.is_unsettled()),
            Role::Learner => {
                let busy_voter = others
                    .clone()
                    .any(|(_, s)| s.role == Role::Voter && s.phase.is_unsettled());
                let busy_learners = others
                    .filter(|(_, s)| s.role == Role::Learner && in_progress(s.phase))
                    .count();
                !busy_voter && busy_learners < view.strategy.max_parallel.max(1)
            }
        }
    }

    /// `node` acknowledges, and so does every other voter: starting it cannot leave the
    /// cluster short of quorum. Otherwise the rollout waits (and says why), up to the
    /// health deadline: then a down `node` is started anyway (its first operation fails
    /// and the failure policy applies), while a down *other* voter halts the rollout
    /// without touching another node, since restoring or updating a live voter would
    /// cost the quorum.
    fn live_enough(&mut self, cx: &mut Cx, node: u64) -> bool {
        let limit = cx.view.strategy.stale_ack_ms;
        let deadline = cx.view.strategy.health_deadline_ms;
        let now = cx.now.monotonic_ms;
        let down: Vec<(u64, Option<u64>)> = self
            .liveness
            .iter()
            .filter(|(id, live)| {
                **id != self.me
                    && (**id == node || live.role == Role::Voter)
                    && live.last_ack_ms.is_none_or(|age| age > limit)
            })
            .map(|(id, live)| (*id, live.last_ack_ms))
            .collect();
        if down.is_empty() {
            self.waiting_since = None;
            return true;
        }
        let since = match self.waiting_since {
            Some((waited_for, since)) if waited_for == node => since,
            _ => {
                self.waiting_since = Some((node, now));
                now
            }
        };
        let names: Vec<String> = down
            .iter()
            .map(|(id, age)| match age {
                Some(age) => format!("node {id} last acked {age} ms ago"),
                None => format!("node {id} has not acked"),
            })
            .collect();
        let waited = now.saturating_sub(since);
        if waited <= deadline {
            self.waiting = Some(format!(
                "waiting to update {}: {} (a node is only updated while it and every other \
                 voter are up; {} ms of {deadline} ms waited)",
                cx.view.describe(node),
                names.join(", "),
                waited
            ));
            return false;
        }
        self.waiting_since = None;
        if down.iter().all(|(id, _)| *id == node) {
            // Only the node itself is down: its update fails and the policy applies.
            return true;
        }
        let reason = format!(
            "{} stayed down for more than {deadline} ms: stopped before updating {} (with a \
             voter down, restarting another would cost the quorum)",
            names.join(", "),
            cx.view.describe(node)
        );
        if matches!(
            cx.view.state,
            DeploymentState::Running | DeploymentState::Paused
        ) {
            self.set_state(cx, DeploymentState::Halting, Some(reason));
        }
        false
    }

    /// A voter is restored only while no other voter is unsettled (a failed one counts:
    /// it may be down for good); learners up to `max_parallel` at once (a failed one
    /// does not count: nothing more happens to it).
    fn may_restore(&self, view: &Deployment, node: u64) -> bool {
        let others = view.nodes.iter().filter(|(id, _)| **id != node);
        match view.nodes[&node].role {
            Role::Voter => others
                .filter(|(_, s)| s.role == Role::Voter)
                .all(|(_, s)| !s.phase.is_unsettled()),
            Role::Learner => {
                others
                    .filter(|(_, s)| s.role == Role::Learner && in_progress(s.phase))
                    .count()
                    < view.strategy.max_parallel.max(1)
            }
        }
    }
}

/// Being updated or restored right now: what `max_parallel` limits.
fn in_progress(phase: Phase) -> bool {
    phase.is_updating() || phase == Phase::Restoring
}

/// Whether an answer to `kind` moves a node in `phase`.
fn op_belongs(phase: Phase, kind: OpKind) -> bool {
    matches!(
        (phase, kind),
        (Phase::Backup, OpKind::PinPrevious)
            | (Phase::Sync, OpKind::Prepare)
            | (Phase::Activate, OpKind::Activate | OpKind::Restart)
            | (Phase::Stabilize, OpKind::Commit)
            | (Phase::Restoring, OpKind::Restore)
    )
}

/// The operation `kind` for `node` in `view`.
fn agent_op(view: &Deployment, node: u64, kind: OpKind) -> AgentOp {
    let target = view.target_hash.clone();
    let from = view.nodes[&node].from_hash.clone();
    match kind {
        OpKind::PinPrevious => AgentOp::PinPrevious { hash: from },
        OpKind::Prepare => AgentOp::Prepare {
            hash: target,
            // Nodes that run the verified release and serve: fetching from them spreads the
            // load, each node starting at another one of them.
            sources: {
                let mut holders: Vec<u64> = view
                    .order
                    .iter()
                    .copied()
                    .filter(|id| *id != node && holds_target(view.phase(*id)))
                    .collect();
                if !holders.is_empty() {
                    let start = node as usize % holders.len();
                    holders.rotate_left(start);
                }
                holders
            },
        },
        OpKind::Activate => AgentOp::Activate { hash: target },
        OpKind::Restart => AgentOp::Restart,
        OpKind::Restore => AgentOp::Restore { hash: from },
        OpKind::Commit => AgentOp::Commit { hash: target },
    }
}

/// A node in `phase` holds the target release, verified, and is up to serve it.
fn holds_target(phase: Phase) -> bool {
    matches!(phase, Phase::Stabilize | Phase::Committed)
}

/// Healthy on build `expected`: serving it, caught up and acking. Returns the boot id.
fn judge(
    health: &Result<Health, String>,
    expected: &str,
    stale_ack_ms: u64,
) -> Result<String, String> {
    let health = health
        .as_ref()
        .map_err(|error| format!("unreachable: {error}"))?;
    if !health.serving {
        return Err("not serving requests".into());
    }
    if health.build_hash != expected {
        return Err(format!(
            "runs build {}, expected {}",
            short_hash(&health.build_hash),
            short_hash(expected)
        ));
    }
    if !health.caught_up {
        return Err("not caught up with the leader's log".into());
    }
    match health.last_ack_ms {
        None => return Err("has not acknowledged the leader".into()),
        Some(last_ack_age) if last_ack_age > stale_ack_ms => {
            return Err(format!(
                "last acked {last_ack_age} ms ago (limit {stale_ack_ms} ms)"
            ))
        }
        Some(_) => {}
    }
    if let Some(problem) = &health.problem {
        return Err(format!("health check: {problem}"));
    }
    Ok(health.boot_id.clone())
}

/// How many of the deployment's nodes are in `phase`.
fn count_in(view: &Deployment, phase: Phase) -> usize {
    view.nodes.values().filter(|s| s.phase == phase).count()
}

/// Nothing more happens to the node in a running deployment: committed, or restored
/// after a failure the budget tolerates.
fn is_done(phase: Phase) -> bool {
    matches!(phase, Phase::Committed | Phase::Restored)
}

/// Nodes whose phase satisfies `wanted`, by id.
fn nodes_where(view: &Deployment, wanted: impl Fn(Phase) -> bool) -> Vec<u64> {
    view.nodes
        .iter()
        .filter(|(_, step)| wanted(step.phase))
        .map(|(id, _)| *id)
        .collect()
}

/// A copy without the manifest: the engine never reads it, and it can be megabytes.
pub(super) fn without_manifest(deployment: &Deployment) -> Deployment {
    deployment.without_manifest()
}

#[cfg(test)]
mod tests;
