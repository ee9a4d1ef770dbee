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
        Operation::Auto { .. } | Operation::Promote => unreachable!("handled above"),
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
