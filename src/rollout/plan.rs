//! The plan: which nodes are updated in which order, and what each must fetch.
//!
//! Pure. Learners go first, in batches of `max_parallel`: they do not vote, so the first
//! nodes to run a new build can fail without costing quorum, and several of them at once
//! give a release the widest early exposure at no availability risk. Voter followers
//! follow one at a time (quorum never loses more than one voter to the rollout), and the
//! leader goes last, after handing leadership to an updated voter.

use std::collections::BTreeMap;

use super::preflight::Survey;
use super::RolloutError;
pub use crate::api::rollout::{Plan, PlannedNode};
use crate::release::Manifest;
use crate::state::{Deployment, DeploymentState, NodeStep, Role, Starter, Strategy};

/// What a deployment needs beyond the plan: who starts it and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// `State::last_generation + 1`.
    pub generation: u64,
    /// The target dist's manifest; its build hash must be the plan's target.
    pub manifest: Manifest,
    pub strategy: Strategy,
    pub started_by: Starter,
    /// Why it begins, in words (see `Deployment::trigger`).
    pub trigger: Option<String>,
    /// The current leader's term.
    pub term: u64,
    /// Leader wall clock, for display.
    pub now_ms: u64,
}

/// Orders the members of `snapshot` for an update to its dist's build hash.
pub fn plan(snapshot: &Survey, max_parallel: usize) -> Plan {
    let target_hash = snapshot.dist.build_hash.clone();
    let mut nodes = BTreeMap::new();
    let mut already_current = Vec::new();
    for member in &snapshot.members {
        if member.reachable && member.build_hash == target_hash {
            already_current.push(member.id);
            continue;
        }
        nodes.insert(
            member.id,
            PlannedNode {
                role: member.role,
                addr: member.addr.clone(),
                from_hash: member.build_hash.clone(),
                fetch_bytes: member.needed_bytes,
            },
        );
    }
    already_current.sort_unstable();
    let order = order(&nodes, snapshot.leader);
    let roles: Vec<(u64, Role)> = order.iter().map(|id| (*id, nodes[id].role)).collect();
    Plan {
        leader: snapshot.leader,
        target_hash,
        waves: waves(&roles, max_parallel),
        nodes,
        already_current,
    }
}

/// Learners, then voter followers, each by id, then `leader`.
fn order(nodes: &BTreeMap<u64, PlannedNode>, leader: u64) -> Vec<u64> {
    let of_role = |role: Role| {
        nodes
            .iter()
            .filter(move |(id, node)| node.role == role && **id != leader)
            .map(|(id, _)| *id)
    };
    let mut order: Vec<u64> = of_role(Role::Learner).chain(of_role(Role::Voter)).collect();
    if nodes.contains_key(&leader) {
        order.push(leader);
    }
    order
}

/// Groups nodes in `order` into waves: runs of consecutive learners, at most
/// `max_parallel` each; every voter alone. The engine uses the same grouping, so what a
/// dry run prints is what runs.
pub fn waves(order: &[(u64, Role)], max_parallel: usize) -> Vec<Vec<u64>> {
    let max_parallel = max_parallel.max(1);
    let mut waves: Vec<Vec<u64>> = Vec::new();
    let mut learners_open = false;
    for (id, role) in order {
        match role {
            Role::Learner if learners_open && waves.last().unwrap().len() < max_parallel => {
                waves.last_mut().unwrap().push(*id);
            }
            Role::Learner => {
                waves.push(vec![*id]);
                learners_open = true;
            }
            Role::Voter => {
                waves.push(vec![*id]);
                learners_open = false;
            }
        }
    }
    waves
}

impl Plan {
    /// Every planned node in the order it is updated.
    pub fn order(&self) -> Vec<u64> {
        self.waves.concat()
    }

    /// Bytes the whole cluster fetches.
    pub fn fetch_bytes(&self) -> u64 {
        self.nodes.values().map(|n| n.fetch_bytes).sum()
    }

    /// The deployment that carries out this plan; `BeginDeployment` replicates it.
    pub fn deployment(&self, start: Start) -> Result<Deployment, RolloutError> {
        if self.nodes.is_empty() {
            return Err(RolloutError::NothingToUpdate {
                target_hash: self.target_hash.clone(),
            });
        }
        if start.strategy.max_parallel == 0 {
            return Err(RolloutError::InvalidStrategy {
                reason: "--max-parallel must be at least 1".into(),
            });
        }
        if start.strategy.progress_deadline_ms == Some(0) {
            return Err(RolloutError::InvalidStrategy {
                reason: "--progress-deadline must be longer than 0 (e.g. 15m)".into(),
            });
        }
        let mut names = std::collections::BTreeSet::new();
        for analysis in &start.strategy.analyses {
            analysis
                .check()
                .map_err(|reason| RolloutError::InvalidStrategy { reason })?;
            if !names.insert(analysis.name.as_str()) {
                return Err(RolloutError::InvalidStrategy {
                    reason: format!("two analyses are named {}: name each once", analysis.name),
                });
            }
        }
        let manifest_hash = start.manifest.build_hash();
        if manifest_hash != self.target_hash {
            return Err(RolloutError::ManifestMismatch {
                planned: self.target_hash.clone(),
                manifest: manifest_hash,
            });
        }
        let nodes = self
            .nodes
            .iter()
            .map(|(id, node)| {
                (
                    *id,
                    NodeStep::pending(node.role, node.addr.clone(), node.from_hash.clone()),
                )
            })
            .collect();
        Ok(Deployment {
            generation: start.generation,
            target_hash: self.target_hash.clone(),
            previous_hash: self.previous_hash(),
            manifest: start.manifest,
            strategy: start.strategy,
            state: DeploymentState::Running,
            order: self.order(),
            nodes,
            started_by: start.started_by,
            issued_by_term: start.term,
            started_ms: start.now_ms,
            finished_ms: None,
            reason: None,
            handoff: None,
            trigger: start.trigger,
            aborted: false,
            evaluations: Vec::new(),
            step: 0,
            state_since_ms: start.now_ms,
        })
    }

    /// The leader's build, or else the build most planned nodes run: what "the cluster
    /// ran before" means in status and history.
    fn previous_hash(&self) -> String {
        if let Some(leader) = self.nodes.get(&self.leader) {
            return leader.from_hash.clone();
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for node in self.nodes.values() {
            *counts.entry(node.from_hash.as_str()).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
            .map(|(hash, _)| hash.to_string())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::preflight::tests::{healthy, NEW, OLD};

    #[test]
    fn plan_table() {
        struct Case {
            name: &'static str,
            voters: &'static [u64],
            learners: &'static [u64],
            leader: u64,
            max_parallel: usize,
            waves: Vec<Vec<u64>>,
        }
        let cases = vec![
            Case {
                name: "single node",
                voters: &[1],
                learners: &[],
                leader: 1,
                max_parallel: 1,
                waves: vec![vec![1]],
            },
            Case {
                name: "voters one at a time, leader last",
                voters: &[1, 2, 3],
                learners: &[],
                leader: 2,
                max_parallel: 4,
                waves: vec![vec![1], vec![3], vec![2]],
            },
            Case {
                name: "learners first in batches",
                voters: &[1, 2, 3],
                learners: &[4, 5, 6, 7, 8],
                leader: 1,
                max_parallel: 2,
                waves: vec![vec![4, 5], vec![6, 7], vec![8], vec![2], vec![3], vec![1]],
            },
            Case {
                name: "max_parallel 0 counts as 1",
                voters: &[1],
                learners: &[2, 3],
                leader: 1,
                max_parallel: 0,
                waves: vec![vec![2], vec![3], vec![1]],
            },
            Case {
                name: "all learners in one batch",
                voters: &[9, 1],
                learners: &[3, 2],
                leader: 9,
                max_parallel: 8,
                waves: vec![vec![2, 3], vec![1], vec![9]],
            },
        ];
        for case in cases {
            let snapshot = healthy(case.voters, case.learners, case.leader);
            let plan = plan(&snapshot, case.max_parallel);
            assert_eq!(plan.waves, case.waves, "{}", case.name);
            assert_eq!(plan.leader, case.leader, "{}", case.name);
            assert_eq!(plan.target_hash, NEW, "{}", case.name);
            assert_eq!(
                plan.fetch_bytes(),
                (48 << 20) * (case.voters.len() + case.learners.len()) as u64,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn nodes_already_on_the_target_are_left_out() {
        let mut snapshot = healthy(&[1, 2, 3], &[4], 1);
        snapshot.members[1].build_hash = NEW.into();
        snapshot.members[3].build_hash = NEW.into();
        let plan = plan(&snapshot, 1);
        assert_eq!(plan.waves, vec![vec![3], vec![1]]);
        assert_eq!(plan.already_current, vec![2, 4]);
    }

    #[test]
    fn a_current_leader_needs_no_hand_off() {
        let mut snapshot = healthy(&[1, 2, 3], &[], 1);
        snapshot.members[0].build_hash = NEW.into();
        assert_eq!(plan(&snapshot, 1).waves, vec![vec![2], vec![3]]);
    }

    #[test]
    fn bytes_per_node_come_from_each_node() {
        let mut snapshot = healthy(&[1, 2], &[], 1);
        snapshot.members[1].needed_bytes = 7;
        let plan = plan(&snapshot, 1);
        assert_eq!(plan.nodes[&2].fetch_bytes, 7);
        assert_eq!(plan.nodes[&2].from_hash, OLD);
        assert_eq!(plan.nodes[&2].addr, "127.0.0.1:7102");
    }

    fn start(manifest: Manifest) -> Start {
        Start {
            generation: 3,
            manifest,
            strategy: Strategy::default(),
            started_by: Starter::Operator,
            trigger: None,
            term: 7,
            now_ms: 1000,
        }
    }

    #[test]
    fn the_deployment_follows_the_plan() {
        let manifest = Manifest::default();
        let mut snapshot = healthy(&[1, 2, 3], &[4], 2);
        snapshot.dist.build_hash = manifest.build_hash();
        let plan = plan(&snapshot, 1);
        let deployment = plan.deployment(start(manifest)).unwrap();
        assert_eq!(deployment.order, vec![4, 1, 3, 2]);
        assert_eq!(deployment.previous_hash, OLD);
        assert_eq!(deployment.nodes[&4].role, Role::Learner);
        assert_eq!(deployment.issued_by_term, 7);
        deployment.validate_new().unwrap();
    }

    #[test]
    fn a_deployment_needs_work_and_the_planned_manifest() {
        let manifest = Manifest::default();
        let mut snapshot = healthy(&[1], &[], 1);
        snapshot.dist.build_hash = manifest.build_hash();
        snapshot.members[0].build_hash = manifest.build_hash();
        let nothing = plan(&snapshot, 1).deployment(start(manifest.clone()));
        assert!(matches!(nothing, Err(RolloutError::NothingToUpdate { .. })));

        let other = plan(&healthy(&[1], &[], 1), 1).deployment(start(manifest.clone()));
        let message = other.unwrap_err().to_string();
        assert!(message.contains("222222222222"), "{message}");

        let mut strategy = start(manifest);
        strategy.strategy.max_parallel = 0;
        let snapshot = healthy(&[1], &[], 1);
        let zero = plan(&snapshot, 1).deployment(strategy);
        assert!(matches!(zero, Err(RolloutError::InvalidStrategy { .. })));
    }
}
