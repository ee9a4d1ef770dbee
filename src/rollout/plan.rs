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

/// Orders the members of `snapshot` for an update to its dist's build hash, as
/// `strategy` says: only the members its selector matches (`--nodes`), grouped by its
/// `order_by` label, learners in batches of `max_parallel`.
pub fn plan(snapshot: &Survey, strategy: &Strategy) -> Plan {
    let target_hash = snapshot.dist.build_hash.clone();
    let mut nodes = BTreeMap::new();
    let mut already_current = Vec::new();
    let mut not_targeted = Vec::new();
    for member in &snapshot.members {
        if let Some(selector) = &strategy.selector {
            if !selector.matches(&member.labels) {
                not_targeted.push(member.id);
                continue;
            }
        }
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
                labels: member.labels.clone(),
            },
        );
    }
    already_current.sort_unstable();
    not_targeted.sort_unstable();
    let order = order(&nodes, snapshot.leader, strategy.order_by.as_deref());
    let grouped: Vec<(u64, Role, &str)> = order
        .iter()
        .map(|id| (*id, nodes[id].role, group_of(&nodes[id].labels, strategy)))
        .collect();
    Plan {
        leader: snapshot.leader,
        target_hash,
        waves: waves(&grouped, strategy.max_parallel),
        nodes,
        already_current,
        not_targeted,
    }
}

/// The value of the strategy's `order_by` label on a node ("" without one): nodes of
/// one group are updated before the next group's.
pub fn group_of<'a>(labels: &'a BTreeMap<String, String>, strategy: &Strategy) -> &'a str {
    strategy
        .order_by
        .as_ref()
        .and_then(|key| labels.get(key))
        .map_or("", String::as_str)
}

/// Group by group (the `order_by` label's values in order, the leader's group last and
/// nodes without the label before it), and within a group learners, then voter
/// followers, each by id; `leader` last of all.
fn order(nodes: &BTreeMap<u64, PlannedNode>, leader: u64, order_by: Option<&str>) -> Vec<u64> {
    let group = |id: &u64| {
        order_by
            .and_then(|key| nodes.get(id)?.labels.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let leader_group = nodes.contains_key(&leader).then(|| group(&leader));
    let mut order: Vec<u64> = nodes.keys().copied().filter(|id| *id != leader).collect();
    order.sort_by_key(|id| {
        let g = group(id);
        (
            leader_group.as_ref() == Some(&g),
            g,
            nodes[id].role == Role::Voter,
            *id,
        )
    });
    if nodes.contains_key(&leader) {
        order.push(leader);
    }
    order
}

/// Groups nodes in `order` into waves: runs of consecutive learners of one group, at
/// most `max_parallel` each; every voter alone. The engine uses the same grouping, so
/// what a dry run prints is what runs.
pub fn waves(order: &[(u64, Role, &str)], max_parallel: usize) -> Vec<Vec<u64>> {
    let max_parallel = max_parallel.max(1);
    let mut waves: Vec<Vec<u64>> = Vec::new();
    // The group of the learner batch still open, if one is.
    let mut open: Option<&str> = None;
    for (id, role, group) in order {
        match role {
            Role::Learner if open == Some(*group) && waves.last().unwrap().len() < max_parallel => {
                waves.last_mut().unwrap().push(*id);
            }
            Role::Learner => {
                waves.push(vec![*id]);
                open = Some(*group);
            }
            Role::Voter => {
                waves.push(vec![*id]);
                open = None;
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
        if let Some(key) = &start.strategy.order_by {
            if !crate::state::deployment::valid_label(key) {
                return Err(RolloutError::InvalidStrategy {
                    reason: format!(
                        "--order-by {key:?}: a label key is 1 to 63 letters, digits, '-', '_' \
                         or '.'"
                    ),
                });
            }
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
                let mut step =
                    NodeStep::pending(node.role, node.addr.clone(), node.from_hash.clone());
                step.labels = node.labels.clone();
                (*id, step)
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
            untargeted: self.not_targeted.clone(),
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

    /// A strategy that only sets `max_parallel`.
    fn by(max_parallel: usize) -> Strategy {
        Strategy {
            max_parallel,
            ..Strategy::default()
        }
    }

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
            let plan = plan(&snapshot, &by(case.max_parallel));
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

    fn zoned(zones: &[(u64, &str)]) -> Survey {
        let mut snapshot = healthy(&[1, 2, 3], &[4, 5, 6], 1);
        for (id, zone) in zones {
            let member = snapshot.members.iter_mut().find(|m| m.id == *id).unwrap();
            member.labels.insert("zone".into(), zone.to_string());
        }
        snapshot
    }

    #[test]
    fn order_by_finishes_one_group_before_the_next_with_the_leaders_group_last() {
        // Leader 1 in zone a; zone b holds learners 4 and 6 and voter 2.
        let snapshot = zoned(&[(1, "a"), (2, "b"), (3, "a"), (4, "b"), (5, "a"), (6, "b")]);
        let strategy = Strategy {
            max_parallel: 3,
            order_by: Some("zone".into()),
            ..Strategy::default()
        };
        let planned = plan(&snapshot, &strategy);
        assert_eq!(
            planned.waves,
            vec![vec![4, 6], vec![2], vec![5], vec![3], vec![1]],
            "zone b, then zone a with the leader last; learners batch only within a zone"
        );
        assert_eq!(planned.nodes[&4].labels["zone"], "b");
        // Without --order-by the learners batch across zones.
        assert_eq!(plan(&snapshot, &by(3)).waves[0], vec![4, 5, 6]);
    }

    #[test]
    fn a_selector_plans_only_matching_members_and_lists_the_rest() {
        let snapshot = zoned(&[(1, "a"), (2, "b"), (3, "a"), (4, "b")]);
        let strategy = Strategy {
            selector: Some(crate::state::deployment::Selector::parse("zone=b").unwrap()),
            ..Strategy::default()
        };
        let planned = plan(&snapshot, &strategy);
        assert_eq!(planned.waves, vec![vec![4], vec![2]]);
        assert_eq!(planned.not_targeted, vec![1, 3, 5, 6]);
        let manifest = Manifest::default();
        let mut snapshot = snapshot;
        snapshot.dist.build_hash = manifest.build_hash();
        let mut start = start(manifest);
        start.strategy = strategy.clone();
        let deployment = plan(&snapshot, &strategy).deployment(start).unwrap();
        assert_eq!(deployment.untargeted, vec![1, 3, 5, 6]);
        assert_eq!(deployment.nodes[&2].labels["zone"], "b");
    }

    #[test]
    fn selectors_and_label_keys_are_checked() {
        use crate::state::deployment::Selector;
        let selector = Selector::parse("zone=a,rack=r1").unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(selector.matches(&labels(&[("zone", "a"), ("rack", "r1"), ("x", "y")])));
        assert!(!selector.matches(&labels(&[("zone", "a")])));
        assert_eq!(selector.to_string(), "zone=a,rack=r1");
        for bad in ["zone", "zone=", "=a", "zone=a b", "zone=a,,"] {
            let error = Selector::parse(bad).unwrap_err();
            assert!(error.contains("is not key=value"), "{bad}: {error}");
        }
    }

    #[test]
    fn nodes_already_on_the_target_are_left_out() {
        let mut snapshot = healthy(&[1, 2, 3], &[4], 1);
        snapshot.members[1].build_hash = NEW.into();
        snapshot.members[3].build_hash = NEW.into();
        let plan = plan(&snapshot, &by(1));
        assert_eq!(plan.waves, vec![vec![3], vec![1]]);
        assert_eq!(plan.already_current, vec![2, 4]);
    }

    #[test]
    fn a_current_leader_needs_no_hand_off() {
        let mut snapshot = healthy(&[1, 2, 3], &[], 1);
        snapshot.members[0].build_hash = NEW.into();
        assert_eq!(plan(&snapshot, &by(1)).waves, vec![vec![2], vec![3]]);
    }

    #[test]
    fn bytes_per_node_come_from_each_node() {
        let mut snapshot = healthy(&[1, 2], &[], 1);
        snapshot.members[1].needed_bytes = 7;
        let plan = plan(&snapshot, &by(1));
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
        let plan = plan(&snapshot, &by(1));
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
        let nothing = plan(&snapshot, &by(1)).deployment(start(manifest.clone()));
        assert!(matches!(nothing, Err(RolloutError::NothingToUpdate { .. })));

        let other = plan(&healthy(&[1], &[], 1), &by(1)).deployment(start(manifest.clone()));
        let message = other.unwrap_err().to_string();
        assert!(message.contains("222222222222"), "{message}");

        let mut strategy = start(manifest);
        strategy.strategy.max_parallel = 0;
        let snapshot = healthy(&[1], &[], 1);
        let zero = plan(&snapshot, &by(1)).deployment(strategy);
        assert!(matches!(zero, Err(RolloutError::InvalidStrategy { .. })));
    }
}
