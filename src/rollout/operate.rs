//! Operators' commands on rollouts (pause, resume, promote, abort, automatic rollouts on/off),
//! each one replicated command, and the rollout view `cluster rollout` and `status` show.

use super::cluster::{Cluster, Notes};
use super::update::commit;
use crate::api::{ApiError, Operated, Operation, RolloutView};
use crate::clock::unix_ms;
use crate::state::{Command, Deployment, DeploymentState};

/// The active deployment and the history as this node has applied them, and, when it
/// leads, its notes.
pub fn view<C: Cluster>(cluster: &C, notes: &Notes) -> RolloutView {
    let mut view = cluster.read(|s| RolloutView {
        deployment: s.deployment.as_ref().map(Deployment::without_manifest),
        history: s.history.clone(),
        fleet: s.fleet.clone(),
        notes: None,
    });
    if cluster.raft_view().leading {
        let mut notes = notes.get();
        notes.leader = cluster.id();
        view.notes = Some(notes);
    }
    view
}

/// Carries out `operation` on the leader: one replicated command.
pub async fn operate<C: Cluster>(cluster: &C, operation: Operation) -> Result<Operated, ApiError> {
    let now = unix_ms();
    if let Operation::Undo { to, by } = &operation {
        return undo(cluster, to.as_deref(), by.as_deref()).await;
    }
    // The proposal gate refuses a command some member's protocol cannot apply; pause and
    // resume use commands every rollout-capable member knows, so a rollout can always
    // be paused.
    if let Operation::Auto { enabled } = operation {
        let command = Command::SetAutoRollout {
            enabled,
            at_ms: now,
        };
        commit(cluster, command).await?;
        let message = if enabled {
            "automatic rollouts are on: the leader rolls out new builds in its watched \
             directory and brings nodes on another build to the target"
        } else {
            "automatic rollouts are off: only `cluster update` starts a rollout"
        };
        return Ok(Operated {
            message: message.into(),
            generation: 0,
        });
    }
    let Some((generation, state, step, targets)) = cluster.read(|s| {
        s.deployment
            .as_ref()
            .map(|d| (d.generation, d.state, d.step, d.step_targets()))
    }) else {
        return Err(ApiError::precondition(
            "no rollout is active: nothing to pause, resume, promote or abort",
        ));
    };
    if operation == Operation::Promote {
        if step + 1 >= targets.len() {
            return Err(ApiError::precondition(format!(
                "rollout {generation} is on its last step ({} of {} nodes): nothing to promote",
                targets.last().copied().unwrap_or(0),
                targets.last().copied().unwrap_or(0)
            )));
        }
        let command = Command::PromoteStep {
            generation,
            from: step,
            at_ms: now,
        };
        commit(cluster, command).await?;
        return Ok(Operated {
            message: format!(
                "rollout {generation} promoted: step {}/{} begins ({} of {} nodes on the new \
                 release)",
                step + 2,
                targets.len(),
                targets[step + 1],
                targets.last().copied().unwrap_or(0)
            ),
            generation,
        });
    }
    let (command, message) = match operation {
        Operation::Pause => (
            Command::SetDeploymentState {
                generation,
                state: DeploymentState::Paused,
                reason: Some("paused by an operator".into()),
                at_ms: now,
            },
            format!(
                "rollout {generation} paused: no further node starts; a node in flight \
                 finishes its step (resume with `cluster rollout resume`)"
            ),
        ),
        Operation::Resume => (
            Command::SetDeploymentState {
                generation,
                state: DeploymentState::Running,
                reason: None,
                at_ms: now,
            },
            format!("rollout {generation} resumed"),
        ),
        Operation::Abort { revert } => {
            let reason = if revert {
                "aborted by an operator, reverting updated nodes"
            } else {
                "aborted by an operator"
            };
            (
                Command::AbortDeployment {
                    generation,
                    revert,
                    reason: reason.into(),
                    at_ms: now,
                },
                if revert {
                    format!(
                        "rollout {generation} aborted: every updated node is being restored \
                         to its previous build"
                    )
                } else {
                    format!(
                        "rollout {generation} aborted: nodes caught mid-update are restored; \
                         committed nodes stay on the new build"
                    )
                },
            )
        }
        Operation::Auto { .. } | Operation::Promote | Operation::Undo { .. } => {
            unreachable!("handled above")
        }
    };
    if operation == Operation::Resume && state != DeploymentState::Paused {
        return Err(ApiError::precondition(format!(
            "rollout {generation} is {state}, not paused: nothing to resume"
        )));
    }
    if operation == Operation::Pause && state == DeploymentState::Paused {
        return Ok(Operated {
            message: format!("rollout {generation} is already paused"),
            generation,
        });
    }
    commit(cluster, command).await?;
    Ok(Operated {
        message,
        generation,
    })
}

/// What an undo rolls out, and which rollout it undoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoTarget {
    pub build: String,
    /// The history entry whose strategy the undo follows (and, without `--to`, undoes).
    pub entry: crate::state::HistoryEntry,
    pub why: String,
}

/// Resolves `to` against the history (pure): nothing, the newest completed rollout's
/// previous build; a number, the build that generation rolled out; otherwise a build
/// hash or a prefix of one (8 characters at least) that some rollout rolled out or
/// replaced.
pub fn undo_target(
    history: &[crate::state::HistoryEntry],
    running: Option<&str>,
    to: Option<&str>,
) -> Result<UndoTarget, String> {
    use crate::state::deployment::short_hash;
    let completed = |e: &&crate::state::HistoryEntry| e.outcome == DeploymentState::Completed;
    let target = match to {
        None => {
            let entry = history.iter().rev().find(completed).ok_or(
                "no rollout has completed yet: nothing to undo (give --to a build to roll out)",
            )?;
            UndoTarget {
                build: entry.previous_hash.clone(),
                entry: entry.clone(),
                why: format!(
                    "undoes rollout {} ({} -> {})",
                    entry.generation,
                    short_hash(&entry.previous_hash),
                    short_hash(&entry.target_hash)
                ),
            }
        }
        Some(text) if text.parse::<u64>().is_ok() => {
            let generation: u64 = text.parse().unwrap_or_default();
            let entry = history
                .iter()
                .find(|e| e.generation == generation)
                .ok_or_else(|| format!("no rollout {generation} in the history"))?;
            if entry.outcome != DeploymentState::Completed {
                return Err(format!(
                    "rollout {generation} ended {}: its build never ran everywhere; give \
                     --to a completed rollout or a build",
                    entry.outcome
                ));
            }
            UndoTarget {
                build: entry.target_hash.clone(),
                entry: entry.clone(),
                why: format!(
                    "returns to the build of rollout {generation} ({})",
                    short_hash(&entry.target_hash)
                ),
            }
        }
        Some(prefix) => {
            if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(format!(
                    "--to {prefix:?}: a rollout's generation, or a build hash (8 hex \
                     characters at least)"
                ));
            }
            let mut builds: Vec<(&str, &crate::state::HistoryEntry)> = history
                .iter()
                .flat_map(|e| [(e.target_hash.as_str(), e), (e.previous_hash.as_str(), e)])
                .filter(|(hash, _)| hash.starts_with(prefix))
                .collect();
            builds.sort_by_key(|(hash, _)| *hash);
            builds.dedup_by_key(|(hash, _)| *hash);
            match builds.as_slice() {
                [] => {
                    return Err(format!(
                        "no rollout ran or replaced a build {prefix}: `cluster rollout history` \
                         lists them"
                    ))
                }
                [(hash, entry)] => UndoTarget {
                    build: hash.to_string(),
                    entry: (*entry).clone(),
                    why: format!("returns to build {}", short_hash(hash)),
                },
                _ => {
                    return Err(format!(
                        "--to {prefix} names several builds: give more of it"
                    ))
                }
            }
        }
    };
    if running == Some(target.build.as_str()) {
        return Err(format!(
            "the cluster already runs build {}: nothing to undo",
            short_hash(&target.build)
        ));
    }
    Ok(target)
}

/// `cluster rollout undo`: a new rollout, through preflight and the undone rollout's
/// strategy, of a build the leader still holds.
async fn undo<C: Cluster>(
    cluster: &C,
    to: Option<&str>,
    by: Option<&str>,
) -> Result<Operated, ApiError> {
    use crate::state::deployment::short_hash;
    // A build a limited rollout staged is what its nodes run, and what an undo leaves.
    let (history, running, active) = cluster.read(|s| {
        (
            s.history.clone(),
            s.fleet.staged.clone().or_else(|| s.fleet.target.clone()),
            s.deployment.as_ref().map(|d| d.generation),
        )
    });
    if let Some(generation) = active {
        return Err(ApiError::precondition(format!(
            "rollout {generation} is active: abort it (`cluster rollout abort --revert`) or \
             let it end before undoing"
        )));
    }
    let target = undo_target(&history, running.as_deref(), to).map_err(ApiError::precondition)?;
    let manifest = cluster.release_manifest(&target.build).await.map_err(|e| {
        ApiError::precondition(format!(
            "the leader no longer holds build {} ({e}): roll it out with `cluster update \
             --dist`",
            short_hash(&target.build)
        ))
    })?;
    let options = crate::api::UpdateOptions {
        strategy: target.entry.strategy.clone(),
        allow_downtime: target.entry.strategy.allow_downtime,
        stale_ack_ms: Some(target.entry.strategy.stale_ack_ms),
        started_by: crate::state::Starter::Operator,
        dist_label: String::new(),
        trigger: Some(format!(
            "{} ran `cluster rollout undo`: it {}",
            by.map_or("an operator".to_string(), |name| format!("operator {name}")),
            target.why
        )),
        skip: Vec::new(),
        operator: by.map(String::from),
    };
    let outcome = super::update::update(cluster, manifest, options, false).await?;
    if outcome.generation == 0 {
        let failed: Vec<String> = outcome
            .report
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(ApiError::precondition(format!(
            "preflight refused the undo: {}",
            failed.join("; ")
        )));
    }
    Ok(Operated {
        message: format!(
            "rollout {} started: it {}, back to build {}",
            outcome.generation,
            target.why,
            short_hash(&target.build)
        ),
        generation: outcome.generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HistoryEntry;

    fn entry(generation: u64, from: &str, to: &str, outcome: DeploymentState) -> HistoryEntry {
        HistoryEntry {
            generation,
            previous_hash: from.repeat(64 / from.len()),
            target_hash: to.repeat(64 / to.len()),
            outcome,
            ..HistoryEntry::of(&Deployment::default())
        }
    }

    #[test]
    fn an_undo_finds_its_build_in_the_history() {
        use DeploymentState::*;
        let history = vec![
            entry(1, "a", "b", Completed),
            entry(2, "b", "c", Reverted),
            entry(3, "b", "d", Completed),
        ];
        let running = Some("d".repeat(64));
        let running = running.as_deref();
        let undo = undo_target(&history, running, None).unwrap();
        assert_eq!(undo.build, "b".repeat(64));
        assert!(undo.why.contains("undoes rollout 3"), "{}", undo.why);
        assert_eq!(
            undo_target(&history, running, Some("1")).unwrap().build,
            "b".repeat(64)
        );
        assert_eq!(
            undo_target(&history, running, Some("aaaaaaaa"))
                .unwrap()
                .build,
            "a".repeat(64)
        );
        let cases = [
            (Some("2"), "ended reverted"),
            (Some("9"), "no rollout 9"),
            (Some("3"), "already runs"),
            (Some("abc"), "8 hex characters"),
            (Some("eeeeeeee"), "no rollout ran or replaced"),
        ];
        for (to, said) in cases {
            let err = undo_target(&history, running, to).unwrap_err();
            assert!(err.contains(said), "{to:?}: {err}");
        }
        assert!(undo_target(&[], running, None)
            .unwrap_err()
            .contains("nothing to undo"));
    }
}
