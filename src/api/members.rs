//! `cluster member list` and `cluster member remove`: the membership as the leader sees
//! it, and what a removal did. Field names are the `--json` schema.

use serde::{Deserialize, Serialize};

/// One member of the Raft membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// "voter" or "learner".
    pub role: String,
    /// Milliseconds since the member last acknowledged the leader (leader's monotonic
    /// clock); `None` when it never has, or when the answering node does not lead.
    pub last_ack_ms: Option<u64>,
    /// Highest log index the leader knows the member holds.
    pub matched_index: Option<u64>,
    /// Acknowledged the leader within `live_window_ms` (the leader itself always is);
    /// `None` when the answering node does not lead and so cannot tell.
    pub alive: Option<bool>,
}

/// The membership, from the leader unless no leader could be asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersView {
    pub leader: Option<u64>,
    pub term: u64,
    /// The node whose view this is: the leader, unless it could not be reached.
    pub answered_by: u64,
    /// Acknowledgement age up to which a member counts as alive (and as live for the
    /// quorum arithmetic of a removal).
    pub live_window_ms: u64,
    /// The answering node's `--max-voters`: joins beyond it stay learners.
    pub max_voters: u32,
    /// The answering node's last log index, to compare `matched_index` with.
    pub last_log_index: Option<u64>,
    pub members: Vec<Member>,
}

/// What `cluster member remove` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRemoved {
    pub id: u64,
    pub addr: String,
    /// The role it had: "voter" or "learner".
    pub role: String,
    /// The leader that committed the removal.
    pub leader: u64,
    /// The removed node led, and handed leadership to this voter first.
    pub handed_off_to: Option<u64>,
    /// Its report (`cluster status`) was dropped from the replicated state; `false` when
    /// some member's protocol predates that command (`note` says which).
    pub forgotten: bool,
    /// Anything the operator should know that did not stop the removal.
    pub note: Option<String>,
    /// Learners the leader promoted to voters afterwards, to stay at `--max-voters`.
    pub promoted: Vec<u64>,
}
