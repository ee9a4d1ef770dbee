//! Operating the membership: `cluster member list` (the leader's view with liveness) and
//! `cluster member remove` (quorum arithmetic in `quorum.rs`, hand-off of a leaving
//! leader, the removal, forgetting the node's report, promoting a learner).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use super::handle::{Route, MAX_HOPS, TRANSFER_MAX_LAG};
use super::quorum::{self, Removal};
use super::NodeHandle;
use crate::api::{ApiError, ErrorKind, Member, MemberRemoved, MembersView};
use crate::raft;
use crate::rollout::MemberView;
use crate::rpc::ControlClient;
use crate::state::{Command, Role};

/// How long a membership change may take to commit before the removal reports failure.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

impl NodeHandle {
    /// Acknowledgement age up to which a member counts as alive: two election timeouts,
    /// the same window a leadership transfer accepts.
    pub(super) fn live_window(&self) -> Duration {
        self.timing.election_timeout * 2
    }

    /// Whether `member` acknowledged this node, as leader, within the live window.
    fn is_alive(&self, member: &MemberView) -> bool {
        member.id == self.id
            || member
                .last_ack_ms
                .is_some_and(|age| u128::from(age) <= self.live_window().as_millis())
    }

    /// The membership from the leader; this node's own view when no leader answers
    /// (then `alive` is unknown), so a cluster without a quorum can still be inspected.
    pub async fn member_list(&self, hops: u32) -> Result<MembersView, ApiError> {
        match self.route() {
            Route::Forward(addr) if hops < MAX_HOPS => {
                let forwarded = ControlClient::with_channels(&self.channels, &addr)?
                    .forwarded(hops + 1)
                    .timeout(Duration::from_secs(3))
                    .members()
                    .await;
                match forwarded {
                    Ok(view) => Ok(view),
                    Err(e) if e.kind == ErrorKind::PermissionDenied => Err(e),
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "leader did not answer members");
                        Ok(self.members_view())
                    }
                }
            }
            _ => Ok(self.members_view()),
        }
    }

    fn members_view(&self) -> MembersView {
        let metrics = raft::metrics(&self.raft);
        let leading = self.raft.is_leader();
        let members = self
            .members()
            .into_iter()
            .map(|member| Member {
                alive: leading.then(|| self.is_alive(&member)),
                id: member.id,
                addr: member.addr,
                role: role_name(member.role).into(),
                last_ack_ms: member.last_ack_ms,
                matched_index: member.matched_index,
            })
            .collect();
        MembersView {
            leader: metrics.current_leader,
            term: metrics.current_term,
            answered_by: self.id,
            live_window_ms: self.live_window().as_millis() as u64,
            max_voters: self.max_voters as u32,
            last_log_index: metrics.last_log_index,
            members,
        }
    }

    /// The membership as the removal arithmetic sees it. A leader elected moments ago has
    /// no acknowledgements yet: wait (at most one live window) until every member has
    /// answered once, so a live member is not taken for a dead one.
    async fn settled_members(&self) -> (quorum::Members, Vec<MemberView>) {
        let deadline = Instant::now() + self.live_window();
        loop {
            let views = self.members();
            let answered = views
                .iter()
                .all(|m| m.id == self.id || m.last_ack_ms.is_some());
            if answered || Instant::now() >= deadline {
                let mut members = quorum::Members {
                    leader: self.id,
                    ..quorum::Members::default()
                };
                for view in &views {
                    match view.role {
                        Role::Voter => members.voters.insert(view.id),
                        Role::Learner => members.learners.insert(view.id),
                    };
                    if self.is_alive(view) {
                        members.live.insert(view.id);
                    }
                }
                return (members, views);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes member `id` through the leader. See `quorum::check_removal` for what is
    /// refused; a leader removing itself hands leadership to a live voter first, and the
    /// new leader completes the removal.
    pub async fn remove_member(
        &self,
        id: u64,
        force: bool,
        hops: u32,
    ) -> Result<MemberRemoved, ApiError> {
        // A removal waits for acknowledgements, a hand-off, and up to two commits.
        let wait = self.leader_wait() + CHANGE_TIMEOUT * 3;
        self.on_leader_within(
            hops,
            "member removal",
            wait,
            || self.remove_here(id, force, hops),
            |mut client| async move { client.remove_member(id, force).await },
        )
        .await
    }

    async fn remove_here(
        &self,
        id: u64,
        force: bool,
        hops: u32,
    ) -> Result<Option<MemberRemoved>, ApiError> {
        if !self.raft.is_leader() {
            return Ok(None);
        }
        let (members, views) = self.settled_members().await;
        let removal = quorum::check_removal(&members, id, force).map_err(|refused| {
            let kind = match refused {
                quorum::Refused::NotAMember { .. } => ErrorKind::NotFound,
                _ => ErrorKind::FailedPrecondition,
            };
            ApiError::new(kind, refused.to_string())
        })?;
        // A rollout counts on the membership it planned with (its waves, its quorum).
        if let Some((generation, state)) = self
            .sm
            .read(|s| s.deployment.as_ref().map(|d| (d.generation, d.state)))
        {
            if !force {
                return Err(ApiError::precondition(format!(
                    "rollout generation {generation} is {state}: a membership change under a \
                     rollout changes the quorum it planned with; wait for it to end, or \
                     `cluster rollout abort`, then remove node {id} (--force removes it now)"
                )));
            }
        }
        let view = views
            .iter()
            .find(|m| m.id == id)
            .cloned()
            .ok_or_else(|| ApiError::internal(format!("node {id} vanished from the view")))?;
        let change = match removal {
            Removal::Leader { to } => {
                tracing::info!(id, to, "removing the leader: handing leadership over first");
                self.transfer_here(to).await?;
                // The new leader removes this node (it re-routes while its lease settles).
                let addr = views
                    .iter()
                    .find(|m| m.id == to)
                    .map(|m| m.addr.clone())
                    .ok_or_else(|| ApiError::internal(format!("node {to} vanished")))?;
                let mut removed = ControlClient::with_channels(&self.channels, &addr)?
                    .forwarded(hops + 1)
                    .timeout(self.leader_wait())
                    .remove_member(id, force)
                    .await?;
                removed.handed_off_to = Some(to);
                return Ok(Some(removed));
            }
            Removal::Voter => ChangeMembers::RemoveVoters(BTreeSet::from([id])),
            Removal::Learner => ChangeMembers::RemoveNodes(BTreeSet::from([id])),
        };
        match tokio::time::timeout(CHANGE_TIMEOUT, self.raft.change_membership(change, false)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.forward_to_leader().is_some() => return Ok(None),
            Ok(Err(e)) => {
                return Err(ApiError::unavailable(format!(
                    "removing node {id} failed: {e}"
                )))
            }
            Err(_) => {
                return Err(ApiError::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "removing node {id} did not commit within {} s: is a quorum of voters \
                         running? (`cluster member list` shows who acknowledges the leader)",
                        CHANGE_TIMEOUT.as_secs()
                    ),
                ))
            }
        }
        tracing::info!(id, addr = %view.addr, "removed from the membership");
        let (forgotten, note) = match self.write(Command::ForgetNode { id }, MAX_HOPS).await {
            Ok(_) => (true, None),
            Err(e) => {
                tracing::warn!(id, error = %e, "the removed node's report stays");
                (
                    false,
                    Some(format!("node {id} is removed, but its report stays: {e}")),
                )
            }
        };
        let promoted = self.promote_learners().await;
        Ok(Some(MemberRemoved {
            id,
            addr: view.addr,
            role: role_name(view.role).into(),
            leader: self.id,
            handed_off_to: None,
            forgotten,
            note,
            promoted,
        }))
    }

    /// Promotes live, caught-up learners (lowest id first) while there are fewer voters
    /// than this leader's `--max-voters`. Returns the promoted ids; a failure is logged
    /// and ends the promotions (the membership stays valid either way).
    pub(super) async fn promote_learners(&self) -> Vec<u64> {
        let mut promoted = Vec::new();
        loop {
            let views = self.members();
            let voters = views.iter().filter(|m| m.role == Role::Voter).count();
            if voters >= self.max_voters || !self.raft.is_leader() {
                return promoted;
            }
            let last = raft::metrics(&self.raft).last_log_index.unwrap_or(0);
            let candidate = views.iter().find(|m| {
                m.role == Role::Learner
                    && self.is_alive(m)
                    && last.saturating_sub(m.matched_index.unwrap_or(0)) <= TRANSFER_MAX_LAG
            });
            let Some(candidate) = candidate else {
                return promoted;
            };
            let add = ChangeMembers::AddVoterIds(BTreeSet::from([candidate.id]));
            match tokio::time::timeout(CHANGE_TIMEOUT, self.raft.change_membership(add, false))
                .await
            {
                Ok(Ok(_)) => {
                    tracing::info!(id = candidate.id, voters = voters + 1, "promoted a learner");
                    promoted.push(candidate.id);
                }
                Ok(Err(e)) => {
                    tracing::warn!(id = candidate.id, error = %e, "promoting a learner failed");
                    return promoted;
                }
                Err(_) => {
                    tracing::warn!(id = candidate.id, "promoting a learner did not commit");
                    return promoted;
                }
            }
        }
    }
}

pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Voter => "voter",
        Role::Learner => "learner",
    }
}
