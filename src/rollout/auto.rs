//! Automatic rollouts: what a leader starts by itself. Pure: the runtime's `auto` loop
//! gathers the inputs (the replicated state, the membership, the watched directory) and
//! acts on the decision with the same preflight and pipeline as `cluster update`.
//!
//! Two triggers, in this order:
//! 1. **A new build** in the leader's `watch_dist` directory, once its content has stayed
//!    unchanged for the settle period (and matches its version.json, when it has one),
//!    whose build hash is not the cluster's target.
//! 2. **Catch-up:** a member registered on another build than the cluster's target (it
//!    was down during a rollout, was restored, or joined with an older dist) is brought
//!    to the target through the same per-node pipeline.
//!
//! Neither retries what already failed: a watched build whose automatic rollout did not
//! complete, or a node that failed on the target, is reported and left to an operator.

use serde::{Deserialize, Serialize};

use crate::state::deployment::short_hash;
use crate::state::{DeploymentState, Starter, State};

/// A build in the watched directory that is complete and settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub hash: String,
    /// The directory, for messages and history.
    pub dir: String,
}

/// What the leader should do about automatic rollouts now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// `cluster rollout auto off`.
    Off,
    /// A rollout is active: it finishes first.
    Busy,
    /// Nothing to do: every node runs the target and no new build is waiting.
    Idle,
    /// Start a rollout to `hash`, leaving out `skip`.
    Roll {
        hash: String,
        /// Why, for history: "new build in /srv/dist", "node 3 runs build ab12...".
        trigger: String,
        skip: Vec<u64>,
        /// The build comes from the watched directory (it must be installed on the
        /// leader first); otherwise it is the cluster's target, which the leader holds.
        from_watch: bool,
    },
    /// Something only an operator can resolve; nothing is started.
    Blocked { reason: String },
}

/// Decides for a leader whose membership is `members` and which runs `leader_build`.
pub fn decide(
    state: &State,
    members: &[u64],
    leader_build: &str,
    watched: Option<&Watched>,
) -> Decision {
    if state.fleet.auto_disabled {
        return Decision::Off;
    }
    if state.deployment.is_some() {
        return Decision::Busy;
    }
    let target = state.fleet.target.as_deref();
    let mut blocked = None;
    if let Some(watched) = watched {
        let current = target.unwrap_or(leader_build);
        // A build a limited rollout staged went where the operator wanted it.
        let staged = state.fleet.staged.as_deref() == Some(watched.hash.as_str());
        if watched.hash != current && !staged {
            let failed = state.history.iter().rev().find(|h| {
                h.target_hash == watched.hash
                    && h.started_by == Starter::Automatic
                    && h.outcome != DeploymentState::Completed
            });
            match failed {
                None => {
                    return Decision::Roll {
                        hash: watched.hash.clone(),
                        trigger: format!(
                            "new build {} in watched directory {}",
                            short_hash(&watched.hash),
                            watched.dir
                        ),
                        skip: Vec::new(),
                        from_watch: true,
                    }
                }
                Some(entry) => {
                    blocked = Some(format!(
                        "build {} in {} ended {} in rollout {} ({}): not retried by itself; \
                         put a new build there, or run `cluster update`",
                        short_hash(&watched.hash),
                        watched.dir,
                        entry.outcome,
                        entry.generation,
                        entry.reason.as_deref().unwrap_or("no reason recorded")
                    ))
                }
            }
        }
    }
    if let Some(target) = target {
        // Nodes on a build a limited rollout (`--nodes`) staged are the operator's choice:
        // a catch-up neither starts for them nor takes them back to the target.
        let on_staged: Vec<u64> = members
            .iter()
            .filter(|id| {
                state.nodes.get(id).is_some_and(|info| {
                    state.fleet.staged.as_deref() == Some(info.build_hash.as_str())
                })
            })
            .copied()
            .collect();
        let behind: Vec<(u64, &str)> = members
            .iter()
            .filter(|id| !on_staged.contains(id))
            .filter_map(|id| {
                let build = state.nodes.get(id)?.build_hash.as_str();
                (!build.is_empty() && build != target).then_some((*id, build))
            })
            .collect();
        let (failed, eligible): (Vec<_>, Vec<_>) = behind
            .iter()
            .partition(|(id, _)| state.failed_on(*id, target));
        if !eligible.is_empty() {
            let names: Vec<String> = eligible
                .iter()
                .map(|(id, build)| format!("node {id} runs build {}", short_hash(build)))
                .collect();
            return Decision::Roll {
                hash: target.to_string(),
                trigger: format!(
                    "catch-up: {}, not the cluster's target {}",
                    names.join(", "),
                    short_hash(target)
                ),
                skip: failed
                    .iter()
                    .map(|(id, _)| *id)
                    .chain(on_staged.iter().copied())
                    .collect(),
                from_watch: false,
            };
        }
        if blocked.is_none() && !failed.is_empty() {
            let names: Vec<String> = failed.iter().map(|(id, _)| id.to_string()).collect();
            blocked = Some(format!(
                "node {} failed on the target build {} and runs another build: not retried by \
                 itself; fix the node, then run `cluster update`",
                names.join(", "),
                short_hash(target)
            ));
        }
    }
    match blocked {
        Some(reason) => Decision::Blocked { reason },
        None => Decision::Idle,
    }
}

/// Tells when a directory has stopped changing: its fingerprint must stay the same for
/// the whole settle period.
#[derive(Clone, Debug, Default)]
pub struct Settle {
    last: Option<(u64, u64)>,
}

impl Settle {
    /// Records `fingerprint` seen at `now_ms`; true once it has not changed for `settle_ms`.
    pub fn observe(&mut self, fingerprint: u64, now_ms: u64, settle_ms: u64) -> bool {
        match self.last {
            Some((seen, since)) if seen == fingerprint => now_ms.saturating_sub(since) >= settle_ms,
            _ => {
                self.last = Some((fingerprint, now_ms));
                settle_ms == 0
            }
        }
    }

    /// Time left until the current fingerprint counts as settled.
    pub fn left_ms(&self, now_ms: u64, settle_ms: u64) -> u64 {
        match self.last {
            Some((_, since)) => settle_ms.saturating_sub(now_ms.saturating_sub(since)),
            None => settle_ms,
        }
    }
}

/// Exponential backoff for retrying a failed preflight: 2 s doubling to 2 minutes.
pub fn backoff_ms(failures: u32) -> u64 {
    const FIRST_MS: u64 = 2_000;
    const MAX_MS: u64 = 120_000;
    FIRST_MS
        .saturating_mul(1u64 << failures.saturating_sub(1).min(16))
        .min(MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Deployment, HistoryEntry, NodeInfo, NodeStep, Phase};

    fn state(target: Option<&str>, builds: &[(u64, &str)]) -> State {
        let mut state = State::default();
        state.fleet.target = target.map(String::from);
        for (id, build) in builds {
            state.nodes.insert(
                *id,
                NodeInfo {
                    build_hash: build.to_string(),
                    ..NodeInfo::default()
                },
            );
        }
        state
    }

    fn watched(hash: &str) -> Watched {
        Watched {
            hash: hash.into(),
            dir: "/srv/dist".into(),
        }
    }

    fn history(
        target: &str,
        by: Starter,
        outcome: DeploymentState,
        failed: &[u64],
    ) -> HistoryEntry {
        let mut entry = HistoryEntry {
            generation: 1,
            target_hash: target.into(),
            started_by: by,
            outcome,
            ..HistoryEntry::default()
        };
        for id in failed {
            entry.nodes.insert(
                *id,
                NodeStep {
                    phase: Phase::Restored,
                    error: Some("health".into()),
                    ..NodeStep::default()
                },
            );
        }
        entry
    }

    #[test]
    fn a_new_watched_build_is_rolled_out() {
        let s = state(Some("aaa"), &[(1, "aaa"), (2, "aaa")]);
        let decision = decide(&s, &[1, 2], "aaa", Some(&watched("bbb")));
        match decision {
            Decision::Roll {
                hash,
                from_watch,
                skip,
                trigger,
            } => {
                assert_eq!(hash, "bbb");
                assert!(from_watch);
                assert!(skip.is_empty());
                assert!(trigger.contains("/srv/dist"), "{trigger}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_watched_build_is_compared_with_the_leader_build_before_any_target() {
        let s = state(None, &[(1, "aaa")]);
        assert_eq!(
            decide(&s, &[1], "aaa", Some(&watched("aaa"))),
            Decision::Idle
        );
        assert!(matches!(
            decide(&s, &[1], "aaa", Some(&watched("bbb"))),
            Decision::Roll { .. }
        ));
    }

    #[test]
    fn a_staged_build_is_left_alone_by_catch_up_and_by_the_watched_directory() {
        // Target aaa; a --nodes rollout staged bbb on nodes 1 and 2; node 3 fell back to
        // an older build.
        let mut s = state(
            Some("aaa"),
            &[(1, "bbb"), (2, "bbb"), (3, "old"), (4, "aaa")],
        );
        s.fleet.staged = Some("bbb".into());
        match decide(&s, &[1, 2, 3, 4], "bbb", None) {
            Decision::Roll { hash, skip, .. } => {
                assert_eq!(hash, "aaa");
                assert_eq!(skip, vec![1, 2], "the staged nodes stay on bbb");
            }
            other => panic!("{other:?}"),
        }
        s.nodes.get_mut(&3).unwrap().build_hash = "aaa".into();
        assert_eq!(decide(&s, &[1, 2, 3, 4], "bbb", None), Decision::Idle);
        assert_eq!(
            decide(&s, &[1, 2, 3, 4], "bbb", Some(&watched("bbb"))),
            Decision::Idle,
            "the watched build is the staged one"
        );
    }

    #[test]
    fn off_and_busy_start_nothing() {
        let mut s = state(Some("aaa"), &[(1, "old")]);
        s.deployment = Some(Deployment::default());
        assert_eq!(
            decide(&s, &[1], "aaa", Some(&watched("bbb"))),
            Decision::Busy
        );
        s.fleet.auto_disabled = true;
        assert_eq!(
            decide(&s, &[1], "aaa", Some(&watched("bbb"))),
            Decision::Off
        );
    }

    #[test]
    fn a_node_on_another_build_is_brought_to_the_target() {
        let s = state(Some("aaa"), &[(1, "aaa"), (2, "old"), (3, "aaa")]);
        match decide(&s, &[1, 2, 3], "aaa", None) {
            Decision::Roll {
                hash,
                from_watch,
                trigger,
                ..
            } => {
                assert_eq!(hash, "aaa");
                assert!(!from_watch);
                assert!(trigger.contains("node 2 runs build old"), "{trigger}");
            }
            other => panic!("{other:?}"),
        }
        // A node that is no longer a member is not chased.
        assert_eq!(decide(&s, &[1, 3], "aaa", None), Decision::Idle);
    }

    #[test]
    fn no_target_means_no_catch_up() {
        let s = state(None, &[(1, "aaa"), (2, "old")]);
        assert_eq!(decide(&s, &[1, 2], "aaa", None), Decision::Idle);
    }

    #[test]
    fn failures_are_not_retried_in_a_loop() {
        let mut s = state(Some("aaa"), &[(1, "aaa"), (2, "old")]);
        s.history.push(history(
            "aaa",
            Starter::Automatic,
            DeploymentState::Reverted,
            &[2],
        ));
        match decide(&s, &[1, 2], "aaa", None) {
            Decision::Blocked { reason } => assert!(reason.contains("node 2 failed"), "{reason}"),
            other => panic!("{other:?}"),
        }
        s.history.push(history(
            "bbb",
            Starter::Automatic,
            DeploymentState::Reverted,
            &[],
        ));
        match decide(&s, &[1, 2], "aaa", Some(&watched("bbb"))) {
            Decision::Blocked { reason } => {
                assert!(reason.contains("not retried"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // An operator's failed rollout of the same build does not block the watcher.
        let mut s = state(Some("aaa"), &[(1, "aaa")]);
        s.history.push(history(
            "bbb",
            Starter::Operator,
            DeploymentState::Reverted,
            &[],
        ));
        assert!(matches!(
            decide(&s, &[1], "aaa", Some(&watched("bbb"))),
            Decision::Roll { .. }
        ));
    }

    #[test]
    fn a_catch_up_leaves_out_nodes_that_failed_on_the_target() {
        let mut s = state(Some("aaa"), &[(1, "aaa"), (2, "old"), (3, "old")]);
        s.history.push(history(
            "aaa",
            Starter::Automatic,
            DeploymentState::Reverted,
            &[3],
        ));
        match decide(&s, &[1, 2, 3], "aaa", None) {
            Decision::Roll { skip, trigger, .. } => {
                assert_eq!(skip, vec![3]);
                assert!(trigger.contains("node 2"), "{trigger}");
                assert!(!trigger.contains("node 3"), "{trigger}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_directory_settles_only_after_a_quiet_period() {
        let mut settle = Settle::default();
        assert!(!settle.observe(1, 0, 1_000));
        assert!(!settle.observe(1, 999, 1_000));
        assert!(settle.observe(1, 1_000, 1_000));
        // A change starts the period again.
        assert!(!settle.observe(2, 1_500, 1_000));
        assert_eq!(settle.left_ms(1_700, 1_000), 800);
        assert!(settle.observe(2, 2_500, 1_000));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff_ms(1), 2_000);
        assert_eq!(backoff_ms(2), 4_000);
        assert_eq!(backoff_ms(3), 8_000);
        assert_eq!(backoff_ms(40), 120_000);
    }
}
