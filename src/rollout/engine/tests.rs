//! Engine tests: scenarios and a property test against a model cluster.
//!
//! The model applies the engine's proposals with the real `State::apply`, gives every
//! agent operation its effect on a model node (which release is current, which one runs,
//! its boot count, the highest leader term it has seen), and elects new leaders when the
//! leader restarts, crashes or hands over.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::strategy::Strategy as _;

use super::*;
use crate::release::Manifest;
use crate::rollout::plan::{plan, Start};
use crate::rollout::preflight::tests::{healthy, OLD};
use crate::state::deployment::FailureBudget;
use crate::state::{Response, Starter, State, Strategy};

fn target() -> String {
    Manifest::default().build_hash()
}

fn strategy(max_parallel: usize, on_failure: OnFailure) -> Strategy {
    Strategy {
        max_parallel,
        on_failure,
        health_deadline_ms: 1_000,
        poll_interval_ms: 100,
        stabilize_ms: 300,
        stale_ack_ms: 200,
        allow_downtime: true,
        soak_ms: 0,
        soak_strikes: 3,
        analyses: Vec::new(),
        steps: Vec::new(),
        step_pause_ms: None,
        progress_deadline_ms: None,
        max_failures: None,
        selector: None,
        order_by: None,
    }
}

/// A deployment of `target()` over a healthy cluster led by the first voter.
fn deployment(voters: &[u64], learners: &[u64], strategy: Strategy) -> Deployment {
    let mut snapshot = healthy(voters, learners, voters[0]);
    snapshot.dist.build_hash = target();
    plan(&snapshot, &strategy)
        .deployment(Start {
            generation: 1,
            manifest: Manifest::default(),
            strategy,
            started_by: Starter::Operator,
            trigger: None,
            term: 1,
            now_ms: 0,
        })
        .unwrap()
}

/// One host as the model sees it.
#[derive(Debug)]
struct Host {
    voter: bool,
    /// Release `current` points at.
    current: String,
    /// Release the process runs.
    running: String,
    pinned: Option<String>,
    prepared: bool,
    guard_armed: bool,
    boot: u64,
    /// Highest request id executed: lower ones are refused.
    last_request: RequestId,
}

/// Work the runtime started and has not answered yet.
#[derive(Debug)]
enum Pending {
    Op {
        node: u64,
        id: RequestId,
        op: AgentOp,
    },
    Poll {
        node: u64,
        id: RequestId,
    },
    Transfer {
        to: u64,
    },
}

/// The model cluster and runtime.
struct Sim {
    state: State,
    hosts: BTreeMap<u64, Host>,
    leader: u64,
    term: u64,
    engine: Engine,
    /// The engine was just created: its first event is a `Tick`.
    fresh: bool,
    now: u64,
    pending: Vec<Pending>,
    /// Random decisions; 0 (the default once exhausted) is always the benign one.
    choices: Vec<u8>,
    next_choice: usize,
    /// Deterministic faults for scenario tests.
    unhealthy_on: BTreeSet<(u64, String)>,
    /// A node that turns unhealthy once every node committed (during the soak).
    sick_after_commit: Option<u64>,
    /// Nodes whose boot guard gives up on the target: once activated, they are back on
    /// the old release and report the restore.
    guard_gives_up: BTreeSet<u64>,
    /// An operator aborts (with revert or not) as soon as this node commits.
    abort_after: Option<(u64, bool)>,
    abort_due: bool,
    failing_ops: BTreeSet<(u64, OpKindKey)>,
    transfers_fail: bool,
    /// Every release ships the running bin/cluster: `Restart` switches in place.
    in_place: bool,
    /// An operator runs `cluster rollout promote` whenever a step holds for one.
    operator_promotes: bool,
    promotions: usize,
    // What happened, for assertions.
    started: Vec<u64>,
    restores: Vec<u64>,
    transfers: Vec<u64>,
    restarts_self: usize,
    max_learners_unsettled: usize,
    /// Each Prepare sent: the node and the peers it was told to fetch from.
    fetches: Vec<(u64, Vec<u64>)>,
    summary: Option<Summary>,
    trace: Vec<String>,
}

/// `OpKind` is not `Ord`; scenario faults name it by its display text.
type OpKindKey = String;

impl Sim {
    fn new(voters: &[u64], learners: &[u64], strategy: Strategy) -> Self {
        let mut state = State::default();
        let (response, _) = state.apply(&Command::BeginDeployment {
            deployment: deployment(voters, learners, strategy),
        });
        assert_eq!(response, Response::Ok);
        let hosts = voters
            .iter()
            .map(|id| (*id, true))
            .chain(learners.iter().map(|id| (*id, false)))
            .map(|(id, voter)| {
                let host = Host {
                    voter,
                    current: OLD.into(),
                    running: OLD.into(),
                    pinned: None,
                    prepared: false,
                    guard_armed: false,
                    boot: 0,
                    last_request: RequestId::default(),
                };
                (id, host)
            })
            .collect();
        Sim {
            state,
            hosts,
            leader: voters[0],
            term: 1,
            engine: Engine::new(voters[0], 1),
            fresh: true,
            now: 1,
            pending: Vec::new(),
            choices: Vec::new(),
            next_choice: 0,
            unhealthy_on: BTreeSet::new(),
            sick_after_commit: None,
            guard_gives_up: BTreeSet::new(),
            abort_after: None,
            abort_due: false,
            failing_ops: BTreeSet::new(),
            transfers_fail: false,
            in_place: false,
            operator_promotes: false,
            promotions: 0,
            started: Vec::new(),
            restores: Vec::new(),
            transfers: Vec::new(),
            restarts_self: 0,
            max_learners_unsettled: 0,
            fetches: Vec::new(),
            summary: None,
            trace: Vec::new(),
        }
    }

    fn choose(&mut self) -> u8 {
        let choice = self.choices.get(self.next_choice).copied().unwrap_or(0);
        self.next_choice += 1;
        choice
    }

    /// Runs until the deployment finishes; `Err` names the broken rule, with a trace.
    fn run(&mut self) -> Result<HistoryEntry, String> {
        self.run_inner().map_err(|error| {
            let start = self.trace.len().saturating_sub(60);
            format!(
                "{error}\n--- last steps:\n{}",
                self.trace[start..].join("\n")
            )
        })
    }

    fn run_inner(&mut self) -> Result<HistoryEntry, String> {
        let mut event = Event::Tick;
        for _ in 0..20_000 {
            let Some(deployment) = self.state.deployment.clone() else {
                return self.check_finished();
            };
            self.trace
                .push(format!("t={} leader={} {event:?}", self.now, self.leader));
            let now = Now {
                monotonic_ms: self.now,
                unix_ms: 1_700_000_000_000 + self.now,
            };
            self.engine.update_in_place(self.in_place);
            let actions = self.engine.step(&deployment, event, now);
            self.execute(actions)?;
            if self.state.deployment.is_none() {
                return self.check_finished();
            }
            event = self.next_event();
        }
        Err("the deployment did not finish within 20 000 events".into())
    }

    fn execute(&mut self, actions: Vec<Action>) -> Result<(), String> {
        for action in actions {
            self.trace.push(format!("  -> {action:?}"));
            match action {
                Action::Propose(command) => self.propose(command)?,
                Action::Agent {
                    node,
                    id,
                    generation,
                    op,
                } => {
                    if generation != 1 || id.term != self.term {
                        return Err(format!("operation fenced wrongly: {generation}/{id:?}"));
                    }
                    let outstanding = self.pending.iter().any(|p| {
                        let Pending::Op { node: n, id: i, .. } = p else {
                            return false;
                        };
                        *n == node && i.term == id.term
                    });
                    if outstanding {
                        return Err(format!("a second operation sent to node {node} at once"));
                    }
                    self.pending.push(Pending::Op { node, id, op });
                }
                Action::PollHealth { node, id } => self.pending.push(Pending::Poll { node, id }),
                Action::TransferLeadership { to } => {
                    self.transfers.push(to);
                    self.pending.push(Pending::Transfer { to });
                }
                Action::RestartSelf { .. } => {
                    self.restarts_self += 1;
                    let leader = self.leader;
                    self.restart_process(leader);
                }
                Action::Finish(summary) => self.summary = Some(summary),
            }
        }
        Ok(())
    }

    fn propose(&mut self, command: Command) -> Result<(), String> {
        if let Command::SetNodePhase {
            node,
            phase: Phase::Backup,
            ..
        } = &command
        {
            let deployment = self.state.deployment.as_ref().unwrap();
            if *node == self.leader {
                let waiting: Vec<u64> = deployment
                    .nodes
                    .iter()
                    .filter(|(id, s)| {
                        // A learner restored within the failure budget is done too.
                        let tolerated = s.phase == Phase::Restored
                            && s.role == Role::Learner
                            && deployment.within_failure_budget();
                        **id != *node && s.phase != Phase::Committed && !tolerated
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if !waiting.is_empty() {
                    return Err(format!(
                        "leader {node} started its own update before {waiting:?} committed"
                    ));
                }
            }
            self.started.push(*node);
        }
        if let Command::SetNodePhase {
            node,
            phase: Phase::Restoring,
            ..
        } = &command
        {
            self.restores.push(*node);
        }
        let (response, _) = self.state.apply(&command);
        if response != Response::Ok {
            return Err(format!("State::apply refused {command}: {response:?}"));
        }
        if let (
            Some((after, _)),
            Command::SetNodePhase {
                node,
                phase: Phase::Committed,
                ..
            },
        ) = (self.abort_after, &command)
        {
            // The operator's command lands between two engine steps.
            self.abort_due |= after == *node;
        }
        if let Some(deployment) = &self.state.deployment {
            let unsettled_voters: Vec<u64> = deployment
                .nodes
                .iter()
                .filter(|(_, s)| s.role == Role::Voter && s.phase.is_unsettled())
                .map(|(id, _)| *id)
                .collect();
            if unsettled_voters.len() > 1 {
                return Err(format!("voters {unsettled_voters:?} unsettled at once"));
            }
            let learners = deployment
                .nodes
                .values()
                .filter(|s| s.role == Role::Learner && s.phase.is_unsettled())
                .count();
            self.max_learners_unsettled = self.max_learners_unsettled.max(learners);
        }
        Ok(())
    }

    fn next_event(&mut self) -> Event {
        if std::mem::take(&mut self.abort_due) {
            let revert = self.abort_after.unwrap().1;
            self.trace
                .push(format!("  operator aborts (revert: {revert})"));
            let (response, _) = self.state.apply(&Command::AbortDeployment {
                generation: 1,
                revert,
                reason: "aborted by an operator".into(),
                at_ms: 0,
            });
            assert_eq!(response, Response::Ok);
        }
        if std::mem::take(&mut self.fresh) {
            return Event::Tick;
        }
        let holds = self
            .engine
            .waiting()
            .is_some_and(|w| w.contains("holds until `cluster rollout promote`"));
        if self.operator_promotes && holds {
            let from = self.state.deployment.as_ref().map_or(0, |d| d.step);
            self.trace.push(format!("  operator promotes step {from}"));
            let (response, _) = self.state.apply(&Command::PromoteStep {
                generation: 1,
                from,
                at_ms: 0,
            });
            assert_eq!(response, Response::Ok);
            self.promotions += 1;
        }
        if self.pending.is_empty() {
            self.now += 100;
            return Event::Tick;
        }
        let choice = self.choose();
        if choice >= 252 {
            self.trace.push("  leader crashes".into());
            let leader = self.leader;
            self.restart_process(leader);
            return Event::Tick;
        }
        if choice >= 240 {
            self.now += 100;
            return Event::Tick;
        }
        let pending = self.pending.remove(choice as usize % self.pending.len());
        match pending {
            Pending::Op { node, id, op } => {
                let kind = op.kind();
                let boot = self.hosts[&node].boot;
                let result = self.run_op(node, id, &op);
                self.trace.push(format!("  node {node} {kind}: {result:?}"));
                if node == self.leader && self.hosts[&node].boot != boot {
                    // The leader restarted itself: its answer is lost with its leadership.
                    self.elect();
                    return Event::Tick;
                }
                Event::StepDone { node, id, result }
            }
            Pending::Poll { node, id } => {
                let health = self.observe(node);
                if self.fresh {
                    return Event::Tick;
                }
                Event::HealthObserved { node, id, health }
            }
            Pending::Transfer { to } => {
                let fails = self.transfers_fail || self.choose() >= 200;
                if fails {
                    Event::TransferFailed {
                        to,
                        reason: "the target did not catch up in time".into(),
                    }
                } else {
                    self.become_leader(to);
                    Event::Tick
                }
            }
        }
    }

    fn run_op(&mut self, node: u64, id: RequestId, op: &AgentOp) -> Result<(), String> {
        let kind = op.kind();
        if let AgentOp::Prepare { sources, .. } = op {
            self.fetches.push((node, sources.clone()));
        }
        let injected = self.failing_ops.contains(&(node, kind.to_string())) || self.choose() >= 235;
        let host = self.hosts.get_mut(&node).unwrap();
        if id < host.last_request {
            return Err(format!(
                "request {id:?} is older than {:?}",
                host.last_request
            ));
        }
        host.last_request = id;
        if injected {
            return Err("injected failure".into());
        }
        match op {
            AgentOp::PinPrevious { hash } => host.pinned = Some(hash.clone()),
            AgentOp::Prepare { .. } => host.prepared = true,
            AgentOp::Activate { hash } => {
                if !host.prepared {
                    return Err("release not prepared".into());
                }
                host.current = hash.clone();
                host.guard_armed = true;
            }
            AgentOp::Restart => {
                host.running = host.current.clone();
                // The same bin/cluster: the process goes on.
                if !self.in_place {
                    host.boot += 1;
                }
            }
            AgentOp::Restore { hash } => {
                if host.current != *hash && host.pinned.as_ref() != Some(hash) {
                    return Err(format!("previous is {:?}, not {hash}", host.pinned));
                }
                host.current = hash.clone();
                host.guard_armed = false;
                if host.running != *hash {
                    host.running = hash.clone();
                    host.boot += 1;
                }
            }
            AgentOp::Commit { .. } => host.guard_armed = false,
        }
        Ok(())
    }

    fn observe(&mut self, node: u64) -> Result<Health, String> {
        let choice = self.choose();
        if choice >= 250 {
            self.trace.push(format!("  node {node} crashes"));
            self.restart_process(node);
        }
        let mut guard_restored = None;
        if self.guard_gives_up.contains(&node) && self.hosts[&node].current == target() {
            let host = self.hosts.get_mut(&node).unwrap();
            host.current = OLD.into();
            host.running = OLD.into();
            host.guard_armed = false;
            host.boot += 1;
        }
        if self.guard_gives_up.contains(&node) && self.hosts[&node].boot > 0 {
            guard_restored = Some("its boot guard gave up on the target".to_string());
        }
        let host = &self.hosts[&node];
        if (220..235).contains(&choice) {
            return Err("connection refused".into());
        }
        let all_committed = self
            .state
            .deployment
            .as_ref()
            .is_some_and(|d| d.nodes.values().all(|s| s.phase == Phase::Committed));
        let sick = self.sick_after_commit == Some(node) && all_committed;
        let unhealthy = sick || self.unhealthy_on.contains(&(node, host.running.clone()));
        let problem = (unhealthy || (235..250).contains(&choice))
            .then(|| "health_command exited 1".to_string());
        Ok(Health {
            serving: true,
            build_hash: host.running.clone(),
            boot_id: format!("boot-{}", host.boot),
            caught_up: true,
            last_ack_ms: Some(if node == self.leader { 0 } else { 20 }),
            problem,
            guard_restored,
        })
    }

    /// The process restarts into `current`; a leader loses its leadership.
    fn restart_process(&mut self, node: u64) {
        let host = self.hosts.get_mut(&node).unwrap();
        host.running = host.current.clone();
        host.boot += 1;
        if node == self.leader {
            self.elect();
        }
    }

    fn elect(&mut self) {
        let voters: Vec<u64> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.voter)
            .map(|(id, _)| *id)
            .collect();
        let choice = self.choose() as usize;
        self.become_leader(voters[choice % voters.len()]);
    }

    fn become_leader(&mut self, node: u64) {
        self.term += 1;
        self.leader = node;
        self.engine = Engine::new(node, self.term);
        self.fresh = true;
        self.trace
            .push(format!("  node {node} leads term {}", self.term));
    }

    /// The finished deployment matches what the hosts run.
    fn learner_count(&self) -> usize {
        self.hosts.values().filter(|h| !h.voter).count()
    }

    fn check_finished(&self) -> Result<HistoryEntry, String> {
        let entry = self.state.history.last().cloned().ok_or("no history")?;
        for (id, step) in &entry.nodes {
            let host = &self.hosts[id];
            match (entry.outcome, step.phase) {
                (_, Phase::Committed) if host.running != target() || host.guard_armed => {
                    return Err(format!("committed node {id} runs {host:?}"))
                }
                (_, Phase::Restored | Phase::Pending)
                    if host.running != OLD || host.current != OLD =>
                {
                    return Err(format!("node {id} is {} but runs {host:?}", step.phase))
                }
                // A completed rollout may leave learners restored within its budget,
                // never a voter, and never more of them than the budget.
                (DeploymentState::Completed, Phase::Restored)
                    if step.role == Role::Learner
                        && entry
                            .nodes
                            .values()
                            .filter(|s| s.phase == Phase::Restored)
                            .count()
                            <= entry
                                .strategy
                                .max_failures
                                .map_or(0, |b| b.resolve(self.learner_count())) => {}
                (DeploymentState::Completed, phase) if phase != Phase::Committed => {
                    return Err(format!("completed with node {id} {phase}"))
                }
                (DeploymentState::Reverted, phase)
                    if !matches!(phase, Phase::Pending | Phase::Restored) =>
                {
                    return Err(format!("reverted with node {id} {phase}"))
                }
                _ => {}
            }
        }
        Ok(entry)
    }
}

fn phases(entry: &HistoryEntry) -> Vec<(u64, Phase)> {
    entry.nodes.iter().map(|(id, s)| (*id, s.phase)).collect()
}

#[test]
fn a_node_whose_boot_guard_gave_up_fails_and_is_not_activated_again() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    sim.guard_gives_up.insert(2);
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    let error = entry.nodes[&2].error.clone().unwrap();
    assert!(error.contains("boot guard gave up"), "{error}");
    let activations = sim
        .trace
        .iter()
        .filter(|line| line.contains("node: 2") && line.contains("Activate { hash"))
        .count();
    assert_eq!(activations, 1, "activated once: {:#?}", sim.trace);
}

#[test]
fn a_soak_that_passes_completes_after_its_window() {
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.soak_ms = 2_000;
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy);
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    let last_commit = entry
        .nodes
        .values()
        .filter_map(|s| s.finished_ms)
        .max()
        .unwrap();
    let completed = entry.finished_ms.unwrap();
    assert!(
        completed >= last_commit + 2_000,
        "completed {} ms after the last commit",
        completed - last_commit
    );
}

#[test]
fn three_failed_checks_during_the_soak_revert_every_node() {
    // Even under `halt`: the soak's rule is a revert of the whole rollout.
    let mut strategy = strategy(1, OnFailure::Halt);
    strategy.soak_ms = 60_000;
    let mut sim = Sim::new(&[1, 2, 3], &[4], strategy);
    sim.sick_after_commit = Some(4);
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    assert!(entry.nodes.values().all(|s| s.phase == Phase::Restored));
    let reason = entry.reason.unwrap();
    assert!(
        reason.contains("node 4") && reason.contains("3 consecutive health checks during the soak"),
        "{reason}"
    );
    assert!(entry.nodes[&4].error.is_some(), "the sick node keeps why");
    assert_eq!(sim.restores[0], 4, "the sick node is restored first");
}

#[test]
fn an_abort_restores_nothing_committed_and_ends_aborted() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    sim.abort_after = Some((2, false));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Aborted);
    assert!(entry.aborted);
    assert_eq!(entry.nodes[&1].phase, Phase::Pending);
    assert_eq!(entry.nodes[&2].phase, Phase::Committed, "committed stays");
    // Node 3 was started in the same step as node 2's commit: caught mid-update, it is
    // restored.
    assert_eq!(entry.nodes[&3].phase, Phase::Restored);
    let reason = entry.reason.unwrap();
    assert!(reason.contains("aborted by an operator"), "{reason}");
    assert!(reason.contains("left on build"), "{reason}");
}

#[test]
fn an_abort_with_revert_restores_the_updated_nodes() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Halt));
    sim.abort_after = Some((3, true));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    assert_eq!(
        phases(&entry),
        vec![
            (1, Phase::Pending),
            (2, Phase::Restored),
            (3, Phase::Restored)
        ]
    );
    assert_eq!(sim.restores, vec![3, 2]);
}

/// Voters 1, 2, 3, ... with these acknowledgement ages.
fn voters(ages: &[Option<u64>]) -> BTreeMap<u64, Liveness> {
    (1..)
        .zip(ages)
        .map(|(id, age)| {
            let live = Liveness {
                role: Role::Voter,
                last_ack_ms: *age,
            };
            (id, live)
        })
        .collect()
}

#[test]
fn no_node_starts_while_another_voter_is_down() {
    let deployment = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    let mut engine = Engine::new(1, 1);
    let now = Now::default();
    engine.observe(voters(&[Some(0), Some(20), Some(5_000)]));
    let actions = engine.step(&deployment, Event::Tick, now);
    assert!(actions.is_empty(), "{actions:?}");
    let waiting = engine.waiting().unwrap();
    assert!(
        waiting.contains("node 2") && waiting.contains("node 3 last acked 5000 ms ago"),
        "{waiting}"
    );
    // Node 3 is back: node 2 starts.
    engine.observe(voters(&[Some(0), Some(20), Some(30)]));
    let actions = engine.step(&deployment, Event::Tick, now);
    assert!(
        matches!(
            actions.first(),
            Some(Action::Propose(Command::SetNodePhase {
                node: 2,
                phase: Phase::Backup,
                ..
            }))
        ),
        "{actions:?}"
    );
    assert_eq!(engine.waiting(), None);
}

#[test]
fn a_voter_down_past_the_deadline_halts_without_touching_another_node() {
    let deployment = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    let mut engine = Engine::new(1, 1);
    engine.observe(voters(&[Some(0), Some(20), None]));
    let at = |ms| Now {
        monotonic_ms: ms,
        unix_ms: ms,
    };
    assert!(engine.step(&deployment, Event::Tick, at(0)).is_empty());
    assert!(engine.step(&deployment, Event::Tick, at(1_000)).is_empty());
    let actions = engine.step(&deployment, Event::Tick, at(1_001));
    let halting = actions.iter().find_map(|a| match a {
        Action::Propose(Command::SetDeploymentState {
            state: DeploymentState::Halting,
            reason,
            ..
        }) => reason.clone(),
        _ => None,
    });
    let reason = halting.unwrap_or_else(|| panic!("{actions:?}"));
    assert!(reason.contains("node 3 has not acked"), "{reason}");
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Propose(Command::SetNodePhase { .. }))),
        "no node is touched: {actions:?}"
    );
    // It ends in the same step: nothing was mid-update.
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Propose(Command::SetDeploymentState {
                state: DeploymentState::Failed,
                ..
            })
        )),
        "{actions:?}"
    );
}

#[test]
fn three_voters_update_with_the_leader_last_through_a_hand_off() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.started, vec![2, 3, 1]);
    assert_eq!(
        sim.transfers,
        vec![3],
        "hands over to the newest updated voter"
    );
    let summary = sim.summary.unwrap();
    assert_eq!(summary.updated, vec![2, 3, 1]);
    assert!(summary.restored.is_empty() && summary.failed.is_empty());
}

#[test]
fn learners_go_first_in_batches_of_max_parallel() {
    let mut sim = Sim::new(&[1, 2, 3], &[4, 5, 6], strategy(2, OnFailure::Revert));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.started, vec![4, 5, 6, 2, 3, 1]);
    assert_eq!(sim.max_learners_unsettled, 2);
}

#[test]
fn a_failed_node_is_restored_and_updated_nodes_revert_newest_first() {
    let mut sim = Sim::new(&[1, 2, 3], &[4], strategy(1, OnFailure::Revert));
    sim.unhealthy_on.insert((3, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    assert_eq!(sim.started, vec![4, 2, 3]);
    assert_eq!(sim.restores, vec![3, 2, 4]);
    assert_eq!(
        phases(&entry),
        vec![
            (1, Phase::Pending),
            (2, Phase::Restored),
            (3, Phase::Restored),
            (4, Phase::Restored)
        ]
    );
    let reason = entry.reason.unwrap();
    assert!(
        reason.starts_with("node 3 (127.0.0.1:7103) failed in health: not healthy on build"),
        "{reason}"
    );
    assert!(
        reason.contains("health check: health_command exited 1"),
        "{reason}"
    );
    let summary = sim.summary.unwrap();
    assert_eq!(summary.untouched, vec![1]);
    let restored: Vec<u64> = summary.restored.iter().map(|n| n.node).collect();
    assert_eq!(restored, vec![4, 2, 3]);
    assert!(
        summary.restored[2].reason.is_some(),
        "the failed node keeps its reason"
    );
}

#[test]
fn a_learner_failure_within_the_budget_is_restored_and_the_rollout_completes() {
    let mut strategy = strategy(2, OnFailure::Revert);
    strategy.max_failures = Some(FailureBudget::Nodes(1));
    let mut sim = Sim::new(&[1, 2, 3], &[4, 5, 6], strategy);
    sim.unhealthy_on.insert((5, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.restores, vec![5], "only the failed learner is restored");
    assert_eq!(
        phases(&entry),
        vec![
            (1, Phase::Committed),
            (2, Phase::Committed),
            (3, Phase::Committed),
            (4, Phase::Committed),
            (5, Phase::Restored),
            (6, Phase::Committed)
        ]
    );
    let reason = entry.reason.clone().unwrap();
    assert!(
        reason.starts_with(
            "completed with 1 of 1 tolerated learner failures (--max-failures 1): node 5"
        ),
        "{reason}"
    );
    // The voters began only after the failed learner was back on its build.
    assert!(entered(&entry, 2, Phase::Backup) >= entered(&entry, 5, Phase::Restored));
}

#[test]
fn learner_failures_beyond_the_budget_revert_every_node() {
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.max_failures = Some(FailureBudget::Nodes(1));
    let mut sim = Sim::new(&[1, 2, 3], &[4, 5, 6], strategy);
    sim.unhealthy_on.insert((4, target()));
    sim.unhealthy_on.insert((6, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    assert_eq!(sim.started, vec![4, 5, 6], "no voter was touched");
    assert_eq!(sim.restores, vec![4, 6, 5]);
    let reason = entry.reason.unwrap();
    assert!(
        reason.contains("2 learners failed, more than --max-failures 1 tolerates (1)"),
        "{reason}"
    );
}

#[test]
fn a_voter_failure_never_uses_the_budget() {
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.max_failures = Some(FailureBudget::Percent(100));
    let mut sim = Sim::new(&[1, 2, 3], &[4], strategy);
    sim.unhealthy_on.insert((2, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    assert_eq!(sim.restores, vec![2, 4]);
}

#[test]
fn a_failure_budget_counts_learners_rounded_down() {
    assert_eq!(FailureBudget::parse("50%").unwrap().resolve(3), 1);
    assert_eq!(FailureBudget::parse("2").unwrap().resolve(5), 2);
    assert_eq!(FailureBudget::parse("2").unwrap().resolve(1), 1);
    assert_eq!(FailureBudget::parse("10%").unwrap().resolve(5), 0);
    assert!(FailureBudget::parse("101%").is_err());
    assert!(FailureBudget::parse("-1").is_err());
    assert!(FailureBudget::parse("two")
        .unwrap_err()
        .contains("a number of learners"));
}

#[test]
fn halt_restores_only_the_failed_node() {
    let mut sim = Sim::new(&[1, 2, 3], &[4], strategy(1, OnFailure::Halt));
    sim.failing_ops.insert((3, "prepare".into()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Failed);
    assert_eq!(
        phases(&entry),
        vec![
            (1, Phase::Pending),
            (2, Phase::Committed),
            (3, Phase::Restored),
            (4, Phase::Committed)
        ]
    );
    let reason = entry.reason.unwrap();
    assert!(
        reason.contains("node 3 (127.0.0.1:7103) failed in sync: prepare failed: injected failure"),
        "{reason}"
    );
    assert!(reason.ends_with("node 2, 4"), "{reason}");
}

#[test]
fn a_node_that_cannot_be_restored_fails_and_stops_voter_restores() {
    let mut sim = Sim::new(&[1, 2, 3], &[4], strategy(1, OnFailure::Revert));
    sim.unhealthy_on.insert((3, target()));
    sim.unhealthy_on.insert((3, OLD.into()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Failed);
    assert_eq!(
        phases(&entry),
        vec![
            (1, Phase::Pending),
            (2, Phase::Committed),
            (3, Phase::Failed),
            (4, Phase::Restored)
        ]
    );
    let reason = entry.reason.unwrap();
    assert!(
        reason.contains("node 3 (127.0.0.1:7103) could not be restored"),
        "{reason}"
    );
    assert!(reason.contains("within 1000 ms of its restore"), "{reason}");
    assert!(reason.ends_with("node 2"), "{reason}");
}

#[test]
fn a_release_with_the_running_binary_updates_the_leader_with_no_hand_off() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    sim.in_place = true;
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.started, vec![2, 3, 1]);
    assert!(sim.transfers.is_empty(), "{:?}", sim.transfers);
    assert_eq!((sim.leader, sim.term), (1, 1), "node 1 led throughout");
    assert!(sim.hosts.values().all(|h| h.boot == 0), "nobody restarted");
}

#[test]
fn a_single_voter_updates_itself_in_place() {
    let mut sim = Sim::new(&[1], &[2], strategy(1, OnFailure::Revert));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.started, vec![2, 1]);
    assert!(sim.transfers.is_empty());
}

#[test]
fn failed_hand_offs_restart_the_leader_until_it_updates_in_place() {
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    sim.transfers_fail = true;
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    // The model re-elects node 1 each time: it tries MAX_HANDOFF_ATTEMPTS times.
    assert_eq!(sim.restarts_self, MAX_HANDOFF_ATTEMPTS as usize);
    assert_eq!(sim.started, vec![2, 3, 1]);
}

/// A deployment over voters 1-3 in which node 2 has passed its health check and
/// stabilizes; the engine of node 1, leading term 2; and a clock.
fn node_2_stabilizing(strategy: Strategy) -> (Deployment, Engine, impl Fn(u64) -> Now) {
    let mut view = deployment(&[1, 2, 3], &[], strategy);
    for phase in [
        Phase::Backup,
        Phase::Sync,
        Phase::Activate,
        Phase::Health,
        Phase::Stabilize,
    ] {
        view.set_node_phase(2, phase, None, 0).unwrap();
    }
    let at = |ms| Now {
        monotonic_ms: ms,
        unix_ms: ms,
    };
    (view, Engine::new(1, 2), at)
}

#[test]
fn a_new_boot_while_stabilizing_fails_the_node() {
    let (view, mut engine, at) = node_2_stabilizing(strategy(1, OnFailure::Revert));
    let first = engine.step(&view, Event::Tick, at(10));
    assert!(first.is_empty(), "waits a poll interval: {first:?}");
    let poll = |node, seq| Action::PollHealth {
        node,
        id: RequestId { term: 2, seq },
    };
    assert_eq!(engine.step(&view, Event::Tick, at(110)), vec![poll(2, 1)]);
    let health = |boot: &str| Health {
        serving: true,
        build_hash: target(),
        boot_id: boot.into(),
        caught_up: true,
        last_ack_ms: Some(5),
        problem: None,
        guard_restored: None,
    };
    let seen = Event::HealthObserved {
        node: 2,
        id: RequestId { term: 2, seq: 1 },
        health: Ok(health("a")),
    };
    assert!(engine.step(&view, seen, at(120)).is_empty());
    assert_eq!(engine.step(&view, Event::Tick, at(220)), vec![poll(2, 2)]);
    let rebooted = Event::HealthObserved {
        node: 2,
        id: RequestId { term: 2, seq: 2 },
        health: Ok(health("b")),
    };
    let actions = engine.step(&view, rebooted, at(230));
    let Action::Propose(Command::SetNodePhase { phase, error, .. }) = &actions[0] else {
        panic!("{actions:?}")
    };
    assert_eq!(*phase, Phase::Restoring);
    assert!(
        error.as_deref().unwrap().contains("boot a -> b"),
        "{error:?}"
    );
    assert!(matches!(
        &actions[1],
        Action::Propose(Command::SetDeploymentState {
            state: DeploymentState::Reverting,
            ..
        })
    ));
}

#[test]
fn one_learner_of_a_wave_fetches_from_the_leader_and_the_rest_from_holders_in_turn() {
    // One voter (the leader) and a wave of 6 learners: only the first fetch finds no
    // holder; every later one is told to fetch from nodes that hold the release, each
    // list starting at another holder once there are several.
    let mut sim = Sim::new(&[1], &[2, 3, 4, 5, 6, 7], strategy(6, OnFailure::Revert));
    let entry = sim.run().expect("the rollout ends");
    assert_eq!(entry.outcome, DeploymentState::Completed, "{:?}", sim.trace);
    let from_leader_only: Vec<u64> = sim
        .fetches
        .iter()
        .filter(|(_, sources)| sources.is_empty())
        .map(|(node, _)| *node)
        .collect();
    assert_eq!(from_leader_only.len(), 1, "{:?}", sim.fetches);
    let firsts: BTreeSet<u64> = sim
        .fetches
        .iter()
        .filter_map(|(_, sources)| sources.first().copied())
        .collect();
    assert!(firsts.len() > 1, "the load is spread: {:?}", sim.fetches);
}

#[test]
fn the_stabilization_window_ends_on_its_timer_not_at_the_next_poll() {
    // A 300 ms window polled every 200 ms: the last check is at 300 ms, not 400.
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.poll_interval_ms = 200;
    strategy.stabilize_ms = 300;
    let (view, mut engine, at) = node_2_stabilizing(strategy);
    assert!(engine.step(&view, Event::Tick, at(0)).is_empty());
    let healthy = |seq| Event::HealthObserved {
        node: 2,
        id: RequestId { term: 2, seq },
        health: Ok(Health {
            serving: true,
            build_hash: target(),
            boot_id: "a".into(),
            caught_up: true,
            last_ack_ms: Some(5),
            problem: None,
            guard_restored: None,
        }),
    };
    let poll = |seq| Action::PollHealth {
        node: 2,
        id: RequestId { term: 2, seq },
    };
    assert_eq!(engine.step(&view, Event::Tick, at(200)), vec![poll(1)]);
    assert!(engine.step(&view, healthy(1), at(205)).is_empty());
    assert!(engine.step(&view, Event::Tick, at(299)).is_empty());
    assert_eq!(engine.step(&view, Event::Tick, at(300)), vec![poll(2)]);
    let actions = engine.step(&view, healthy(2), at(302));
    assert!(
        matches!(
            actions[..],
            [Action::Agent {
                node: 2,
                op: AgentOp::Commit { .. },
                ..
            }]
        ),
        "healthy at the window's end: commit at once: {actions:?}"
    );
}

#[test]
fn one_late_acknowledgement_while_stabilizing_is_forgiven_three_in_a_row_fail_the_node() {
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.stabilize_ms = 60_000;
    let (view, mut engine, at) = node_2_stabilizing(strategy);
    assert!(engine.step(&view, Event::Tick, at(0)).is_empty());
    let health = |ack_ms| Health {
        serving: true,
        build_hash: target(),
        boot_id: "a".into(),
        caught_up: true,
        last_ack_ms: Some(ack_ms),
        problem: None,
        guard_restored: None,
    };
    // A poll each round, answered with these acknowledgement ages (limit 200 ms).
    let mut failed = None;
    for (round, ack_ms) in [5, 556, 5, 556, 556, 5, 556, 556, 556]
        .into_iter()
        .enumerate()
    {
        let now = 200 * (round as u64 + 1);
        let actions = engine.step(&view, Event::Tick, at(now));
        let [Action::PollHealth { node: 2, id }] = actions[..] else {
            panic!("round {round}: {actions:?}")
        };
        let answer = Event::HealthObserved {
            node: 2,
            id,
            health: Ok(health(ack_ms)),
        };
        let actions = engine.step(&view, answer, at(now + 1));
        if !actions.is_empty() {
            failed = Some((round, actions));
            break;
        }
    }
    let (round, actions) = failed.expect("three late acknowledgements in a row fail the node");
    assert_eq!(round, 8, "only the third in a row fails it: {actions:?}");
    let Action::Propose(Command::SetNodePhase { phase, error, .. }) = &actions[0] else {
        panic!("{actions:?}")
    };
    assert_eq!(*phase, Phase::Restoring);
    let error = error.as_deref().unwrap();
    assert!(
        error.contains("failed 3 consecutive checks") && error.contains("556 ms ago"),
        "{error}"
    );
}

#[test]
fn answers_the_engine_did_not_ask_for_change_nothing() {
    let mut view = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    view.set_node_phase(2, Phase::Backup, None, 0).unwrap();
    let mut engine = Engine::new(1, 2);
    let now = Now::default();
    let resumed = engine.step(&view, Event::Tick, now);
    assert!(matches!(
        &resumed[..],
        [Action::Agent {
            node: 2,
            op: AgentOp::PinPrevious { .. },
            ..
        }]
    ));
    let sent = RequestId { term: 2, seq: 1 };
    let previous_leaders = RequestId { term: 1, seq: 1 };
    let strays = [
        Event::StepDone {
            node: 2,
            id: previous_leaders,
            result: Ok(()),
        },
        Event::StepDone {
            node: 3,
            id: sent,
            result: Err("boom".into()),
        },
        Event::HealthObserved {
            node: 2,
            id: sent,
            health: Err("no".into()),
        },
        Event::TransferFailed {
            to: 3,
            reason: "no".into(),
        },
    ];
    for stray in strays {
        assert_eq!(engine.step(&view, stray.clone(), now), vec![], "{stray:?}");
    }
    // The answer it did ask for moves the node on.
    let answer = Event::StepDone {
        node: 2,
        id: sent,
        result: Ok(()),
    };
    let actions = engine.step(&view, answer, now);
    assert!(matches!(
        &actions[..],
        [
            Action::Propose(Command::SetNodePhase {
                node: 2,
                phase: Phase::Sync,
                ..
            }),
            Action::Agent {
                node: 2,
                op: AgentOp::Prepare { .. },
                ..
            }
        ]
    ));
}

#[test]
fn a_resync_ignores_earlier_requests_and_keeps_counting() {
    let mut view = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    view.set_node_phase(2, Phase::Backup, None, 0).unwrap();
    view.set_node_phase(2, Phase::Sync, None, 0).unwrap();
    let mut engine = Engine::new(1, 4);
    let first = engine.step(&view, Event::Tick, Now::default());
    assert!(matches!(
        &first[..],
        [Action::Agent {
            id: RequestId { term: 4, seq: 1 },
            ..
        }]
    ));
    engine.resync();
    let again = engine.step(&view, Event::Tick, Now::default());
    assert!(matches!(
        &again[..],
        [Action::Agent {
            id: RequestId { term: 4, seq: 2 },
            ..
        }]
    ));
    let late = Event::StepDone {
        node: 2,
        id: RequestId { term: 4, seq: 1 },
        result: Err("late".into()),
    };
    assert!(engine.step(&view, late, Now::default()).is_empty());
}

#[test]
fn a_fresh_leader_resumes_any_persisted_deployment() {
    use DeploymentState as S;
    use Phase as P;
    struct Case {
        name: &'static str,
        /// Phases of nodes 1 (this leader), 2, 3 (voters) and 4 (learner).
        phases: [Phase; 4],
        state: DeploymentState,
        handoff_attempts: u32,
        expect: fn(&[Action]) -> bool,
    }
    fn agent(actions: &[Action], index: usize, node: u64, kind: OpKind) -> bool {
        let Some(Action::Agent { node: n, op, .. }) = actions.get(index) else {
            return false;
        };
        *n == node && op.kind() == kind
    }
    fn propose_phase(actions: &[Action], index: usize, node: u64, phase: Phase) -> bool {
        let Some(Action::Propose(Command::SetNodePhase {
            node: n, phase: p, ..
        })) = actions.get(index)
        else {
            return false;
        };
        *n == node && *p == phase
    }
    fn propose_state(actions: &[Action], index: usize, state: DeploymentState) -> bool {
        let Some(Action::Propose(Command::SetDeploymentState { state: s, .. })) =
            actions.get(index)
        else {
            return false;
        };
        *s == state
    }
    let cases = vec![
        Case {
            name: "nothing started: the learner goes first",
            phases: [P::Pending, P::Pending, P::Pending, P::Pending],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| {
                a.len() == 2
                    && propose_phase(a, 0, 4, P::Backup)
                    && agent(a, 1, 4, OpKind::PinPrevious)
            },
        },
        Case {
            name: "backup is repeated",
            phases: [P::Pending, P::Backup, P::Pending, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| a.len() == 1 && agent(a, 0, 2, OpKind::PinPrevious),
        },
        Case {
            name: "sync is repeated",
            phases: [P::Pending, P::Sync, P::Pending, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| {
                let [Action::Agent { node: 2, op, .. }] = a else {
                    return false;
                };
                *op == AgentOp::Prepare {
                    hash: target(),
                    sources: vec![4],
                }
            },
        },
        Case {
            name: "activate asks the node what it runs first",
            phases: [P::Pending, P::Committed, P::Activate, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| matches!(a, [Action::PollHealth { node: 3, .. }]),
        },
        Case {
            name: "health is polled again",
            phases: [P::Pending, P::Health, P::Pending, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| matches!(a, [Action::PollHealth { node: 2, .. }]),
        },
        Case {
            name: "the stabilization window starts again",
            phases: [P::Pending, P::Stabilize, P::Pending, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| a.is_empty(),
        },
        Case {
            name: "a restore is repeated",
            phases: [P::Pending, P::Committed, P::Restoring, P::Committed],
            state: S::Reverting,
            handoff_attempts: 0,
            expect: |a| a.len() == 1 && agent(a, 0, 3, OpKind::Restore),
        },
        Case {
            name: "a recorded failure whose stop was lost stops the deployment",
            phases: [P::Pending, P::Committed, P::Restoring, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| propose_state(a, 0, S::Reverting) && agent(a, 1, 3, OpKind::Restore),
        },
        Case {
            name: "a node caught mid-update is restored when stopping",
            phases: [P::Pending, P::Health, P::Pending, P::Committed],
            state: S::Halting,
            handoff_attempts: 0,
            expect: |a| propose_phase(a, 0, 2, P::Restoring) && agent(a, 1, 2, OpKind::Restore),
        },
        Case {
            name: "reverting restores the newest committed node",
            phases: [P::Pending, P::Committed, P::Restored, P::Committed],
            state: S::Reverting,
            handoff_attempts: 0,
            expect: |a| propose_phase(a, 0, 2, P::Restoring) && agent(a, 1, 2, OpKind::Restore),
        },
        Case {
            name: "halting with nothing to restore ends failed",
            phases: [P::Pending, P::Committed, P::Restored, P::Committed],
            state: S::Halting,
            handoff_attempts: 0,
            expect: |a| propose_state(a, 0, S::Failed) && matches!(a[1], Action::Finish(_)),
        },
        Case {
            name: "reverting with every node restored ends reverted",
            phases: [P::Pending, P::Restored, P::Restored, P::Pending],
            state: S::Reverting,
            handoff_attempts: 0,
            expect: |a| propose_state(a, 0, S::Reverted) && matches!(a[1], Action::Finish(_)),
        },
        Case {
            name: "only the leader left: poll an updated voter to hand over to",
            phases: [P::Pending, P::Committed, P::Committed, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| matches!(a, [Action::PollHealth { node: 3, .. }]),
        },
        Case {
            name: "hand-offs exhausted: the leader updates itself",
            phases: [P::Pending, P::Committed, P::Committed, P::Committed],
            state: S::Running,
            handoff_attempts: MAX_HANDOFF_ATTEMPTS,
            expect: |a| propose_phase(a, 0, 1, P::Backup) && agent(a, 1, 1, OpKind::PinPrevious),
        },
        Case {
            name: "every node committed: completed",
            phases: [P::Committed, P::Committed, P::Committed, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| propose_state(a, 0, S::Completed) && matches!(a[1], Action::Finish(_)),
        },
        Case {
            name: "paused: nothing starts",
            phases: [P::Pending, P::Pending, P::Pending, P::Committed],
            state: S::Paused,
            handoff_attempts: 0,
            expect: |a| a.is_empty(),
        },
        Case {
            name: "a leader elected mid-update finishes that node before any other",
            phases: [P::Sync, P::Pending, P::Pending, P::Committed],
            state: S::Running,
            handoff_attempts: 0,
            expect: |a| a.len() == 1 && agent(a, 0, 1, OpKind::Prepare),
        },
    ];
    for case in cases {
        let mut view = deployment(&[1, 2, 3], &[4], strategy(1, OnFailure::Revert));
        for (id, phase) in [1, 2, 3, 4].into_iter().zip(case.phases) {
            view.nodes.get_mut(&id).unwrap().phase = phase;
        }
        view.state = case.state;
        if case.handoff_attempts > 0 {
            view.handoff = Some(crate::state::Handoff {
                from: 1,
                to: 3,
                attempts: case.handoff_attempts,
                at_ms: 0,
            });
        }
        let actions = Engine::new(1, 5).step(&view, Event::Tick, Now::default());
        assert!((case.expect)(&actions), "{}: {actions:#?}", case.name);
    }
}

#[test]
fn a_lost_leadership_silences_the_engine() {
    let view = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    let mut engine = Engine::new(1, 2);
    assert!(engine
        .step(&view, Event::LeadershipLost, Now::default())
        .is_empty());
    assert!(engine.step(&view, Event::Tick, Now::default()).is_empty());
}

/// Random decisions, mostly benign (0) with a per-case density of arbitrary ones, so
/// runs both fail early and get deep (hand-offs, leader self-updates, late crashes).
fn choices() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    (1u32..=8).prop_flat_map(|faults| {
        proptest::collection::vec(prop_oneof![8 => Just(0u8), faults => any::<u8>()], 0..1500)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random answers, failures, crashes and leader changes never break the rules, and
    /// every run ends with the hosts running what the deployment says.
    #[test]
    fn the_engine_keeps_its_rules_against_the_model(
        voters in 1usize..=5,
        learners in 0usize..=3,
        max_parallel in 1usize..=3,
        revert in any::<bool>(),
        max_failures in proptest::option::of(0u32..=2),
        choices in choices(),
    ) {
        let voter_ids: Vec<u64> = (1..=voters as u64).collect();
        let learner_ids: Vec<u64> = (11..11 + learners as u64).collect();
        let on_failure = if revert { OnFailure::Revert } else { OnFailure::Halt };
        let mut strategy = strategy(max_parallel, on_failure);
        strategy.max_failures = max_failures.map(FailureBudget::Nodes);
        let mut sim = Sim::new(&voter_ids, &learner_ids, strategy);
        sim.choices = choices;
        let result = sim.run();
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        prop_assert!(sim.max_learners_unsettled <= max_parallel);
    }
}

/// When node `id` entered `phase`, from its trail.
fn entered(entry: &HistoryEntry, id: u64, phase: Phase) -> u64 {
    entry.nodes[&id]
        .trail
        .iter()
        .find(|(p, _)| *p == phase)
        .map(|(_, at)| *at)
        .unwrap_or_else(|| panic!("node {id} never entered {phase}"))
}

#[test]
fn canary_steps_hold_for_their_pause_and_never_start_past_their_quota() {
    // 1 node, then 50% (3 of 5), then every node; 5 s between steps.
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.steps = crate::state::deployment::Step::parse_list("1,50%,100%").unwrap();
    strategy.step_pause_ms = Some(5_000);
    let mut sim = Sim::new(&[1, 2, 3, 4, 5], &[], strategy);
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    let order = &entry.order;
    let commit = |i: usize| entered(&entry, order[i], Phase::Committed);
    let start = |i: usize| entered(&entry, order[i], Phase::Backup);
    // Step 1: the first node alone; step 2 begins 5 s after it committed.
    assert!(
        start(1) >= commit(0) + 5_000,
        "{} vs {}",
        start(1),
        commit(0)
    );
    // Step 2 brings nodes 2 and 3 (3 of 5); step 3 begins 5 s after the third committed.
    assert!(start(2) < start(3));
    assert!(
        start(3) >= commit(2) + 5_000,
        "{} vs {}",
        start(3),
        commit(2)
    );
    assert_eq!(sim.state.history.last().unwrap().generation, 1);
}

#[test]
fn a_tolerated_failure_in_a_step_is_replaced_by_another_node_before_the_step_holds() {
    // 2 learners of 4 in the first step; learner 4 fails and is restored within the budget,
    // so learner 6 runs in its place and the step holds only once two learners committed.
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.max_failures = Some(FailureBudget::Nodes(1));
    strategy.steps = crate::state::deployment::Step::parse_list("2,100%").unwrap();
    strategy.step_pause_ms = Some(5_000);
    let mut sim = Sim::new(&[1, 2, 3], &[4, 5, 6, 7], strategy);
    sim.unhealthy_on.insert((4, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(&sim.started[..3], &[4, 5, 6], "{:?}", sim.started);
    let second_commit =
        entered(&entry, 5, Phase::Committed).max(entered(&entry, 6, Phase::Committed));
    for later in [7, 2, 3] {
        assert!(
            entered(&entry, later, Phase::Backup) >= second_commit + 5_000,
            "node {later} began before the first step's two nodes committed and held"
        );
    }
    assert_eq!(phases(&entry)[3], (4, Phase::Restored));
}

#[test]
fn a_step_with_no_pause_waits_for_the_operators_promote() {
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.steps = crate::state::deployment::Step::parse_list("1,100%").unwrap();
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy.clone());
    let stuck = sim.run().unwrap_err();
    assert!(stuck.contains("did not finish"), "{stuck}");
    assert_eq!(sim.started.len(), 1, "only the first step's node started");
    assert!(
        sim.engine
            .waiting()
            .unwrap()
            .contains("step 1/2 (1 of 3 nodes) holds until"),
        "{:?}",
        sim.engine.waiting()
    );
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy);
    sim.operator_promotes = true;
    let entry = sim
        .run()
        .map_err(|e| {
            format!(
                "{} promotions; waiting {:?}; {e:.600}",
                sim.promotions,
                sim.engine.waiting()
            )
        })
        .unwrap();
    assert_eq!(entry.outcome, DeploymentState::Completed);
    assert_eq!(sim.promotions, 1);
}

#[test]
fn step_targets_round_up_and_always_move_forward() {
    use crate::state::deployment::{step_targets, Step};
    let steps = |text: &str| Step::parse_list(text).unwrap();
    assert_eq!(step_targets(&steps("10%,50%,100%"), 10), vec![1, 5, 10]);
    assert_eq!(step_targets(&steps("10%,50%,100%"), 3), vec![1, 2, 3]);
    assert_eq!(step_targets(&steps("1,25%,100%"), 3), vec![1, 2, 3]);
    assert_eq!(
        step_targets(&steps("1"), 4),
        vec![1, 4],
        "a last step of every node"
    );
    assert_eq!(
        step_targets(&steps("5,2"), 8),
        vec![5, 6, 8],
        "each at least one more"
    );
    assert_eq!(step_targets(&[], 3), vec![3]);
    assert_eq!(step_targets(&steps("50%"), 1), vec![1]);
    for bad in ["0", "0%", "101%", "", "x", "1,,2"] {
        assert!(Step::parse_list(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_rollout_stuck_past_its_progress_deadline_stops_and_says_where() {
    // Node 3 never becomes healthy on the target; its own health deadline is far off.
    let mut strategy = strategy(1, OnFailure::Revert);
    strategy.health_deadline_ms = 600_000;
    strategy.progress_deadline_ms = Some(20_000);
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy.clone());
    sim.unhealthy_on.insert((3, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Reverted);
    let reason = entry.reason.clone().unwrap();
    assert!(
        reason.contains("no progress for 20s (--progress-deadline)") && reason.contains("node 3"),
        "{reason}"
    );
    // Under halt, the stuck node is restored and committed nodes stay.
    strategy.on_failure = OnFailure::Halt;
    let mut sim = Sim::new(&[1, 2, 3], &[], strategy);
    sim.unhealthy_on.insert((3, target()));
    let entry = sim.run().unwrap();
    assert_eq!(entry.outcome, DeploymentState::Failed);
    // A step that holds for its promote is not stuck.
    let mut canary = self::strategy(1, OnFailure::Revert);
    canary.progress_deadline_ms = Some(1_000);
    canary.steps = crate::state::deployment::Step::parse_list("1,100%").unwrap();
    let mut sim = Sim::new(&[1, 2, 3], &[], canary);
    let held = sim.run().unwrap_err();
    assert!(held.contains("did not finish"), "held, not stopped: {held}");
}

#[test]
fn a_node_that_just_prepared_is_activated_at_once_without_a_poll_first() {
    let mut view = deployment(&[1, 2, 3], &[], strategy(1, OnFailure::Revert));
    for phase in [Phase::Backup, Phase::Sync] {
        view.set_node_phase(2, phase, None, 0).unwrap();
    }
    let at = |ms| Now {
        monotonic_ms: ms,
        unix_ms: ms,
    };
    let mut engine = Engine::new(1, 2);
    let actions = engine.step(&view, Event::Tick, at(0));
    let [Action::Agent {
        node: 2,
        id,
        op: AgentOp::Prepare { .. },
        ..
    }] = actions[..]
    else {
        panic!("prepares node 2 first: {actions:?}");
    };
    let done = Event::StepDone {
        node: 2,
        id,
        result: Ok(()),
    };
    let actions = engine.step(&view, done, at(5));
    assert!(
        matches!(
            actions[..],
            [
                Action::Propose(Command::SetNodePhase {
                    node: 2,
                    phase: Phase::Activate,
                    ..
                }),
                Action::Agent {
                    node: 2,
                    op: AgentOp::Activate { .. },
                    ..
                }
            ]
        ),
        "{actions:?}"
    );

    // A leader that finds a node in Activate asks it first: it may run the target already.
    view.set_node_phase(2, Phase::Activate, None, 5).unwrap();
    let mut successor = Engine::new(1, 3);
    let actions = successor.step(&view, Event::Tick, at(10));
    assert!(
        matches!(actions[..], [Action::PollHealth { node: 2, .. }]),
        "{actions:?}"
    );
}
