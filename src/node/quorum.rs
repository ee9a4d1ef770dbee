//! Whether removing a member leaves the cluster a quorum of live voters: the arithmetic
//! of `cluster member remove`, on sets of ids (pure: no Raft, no clock, no I/O).
//!
//! "Live" is decided by the caller (the leader: acknowledged within the stale window) and
//! passed in, so every rule here is table-tested.

use std::collections::BTreeSet;
use std::fmt;

use crate::rollout::preflight::quorum_size;

/// The membership a removal is judged against, as the leader sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub voters: BTreeSet<u64>,
    pub learners: BTreeSet<u64>,
    /// Members that acknowledged the leader recently, the leader included.
    pub live: BTreeSet<u64>,
    pub leader: u64,
}

/// What a permitted removal takes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    /// A learner: no quorum changes.
    Learner,
    /// A voter other than the leader.
    Voter,
    /// The leader itself: it first hands leadership to `to`, a live voter that stays.
    Leader { to: u64 },
}

/// Why a removal is refused. Every message names the arithmetic and the way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `id` is neither a voter nor a learner.
    NotAMember { id: u64, members: Vec<u64> },
    /// Removing the only voter would leave nobody to commit anything, ever.
    LastVoter { id: u64 },
    /// The change itself needs a quorum of today's voters to commit, and there is none.
    NoQuorumNow {
        voters: usize,
        live: Vec<u64>,
        quorum: usize,
    },
    /// Afterwards fewer voters would be live than the smaller cluster's quorum.
    LosesQuorum {
        id: u64,
        voters_left: usize,
        live_left: usize,
        quorum_left: usize,
        dead_left: Vec<u64>,
    },
    /// The leader cannot go: no other live voter could take over.
    NoSuccessor { id: u64 },
}

impl Refused {
    /// Whether `--force` may override this refusal: it overrides the liveness judgement
    /// (which an operator may know better), never the membership's shape.
    pub fn forcible(&self) -> bool {
        matches!(
            self,
            Refused::NoQuorumNow { .. } | Refused::LosesQuorum { .. }
        )
    }
}

fn are(n: usize) -> &'static str {
    if n == 1 {
        "is"
    } else {
        "are"
    }
}

fn list(ids: &[u64]) -> String {
    ids.iter()
        .map(|id| format!("node {id}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::NotAMember { id, members } => write!(
                f,
                "node {id} is not a member of this cluster (members: {}): check the id with `cluster member list`",
                list(members)
            ),
            Refused::LastVoter { id } => write!(
                f,
                "node {id} is the last voter: removing it would leave no one to commit anything; \
                 add another voter first"
            ),
            Refused::NoQuorumNow {
                voters,
                live,
                quorum,
            } => write!(
                f,
                "only {} of the {voters} voters {} live ({}), and the membership change itself \
                 must be committed by a quorum of {quorum}: start the stopped voters again first \
                 (--force tries anyway)",
                live.len(),
                are(live.len()),
                if live.is_empty() { "none".to_string() } else { list(live) }
            ),
            Refused::LosesQuorum {
                id,
                voters_left,
                live_left,
                quorum_left,
                dead_left,
            } => write!(
                f,
                "removing node {id} leaves {voters_left} voters of which {live_left} {} live; \
                 a quorum of {voters_left} needs {quorum_left} live voters ({} not acknowledging \
                 the leader): bring {} back, or remove a dead voter instead (--force removes \
                 node {id} anyway)",
                are(*live_left),
                list(dead_left),
                if dead_left.len() == 1 { "it" } else { "them" }
            ),
            Refused::NoSuccessor { id } => write!(
                f,
                "node {id} leads and no other live voter could take over: start another voter \
                 first"
            ),
        }
    }
}

/// Judges removing member `id` from `members`. With `force`, a removal the liveness
/// figures refuse is allowed (see [`Refused::forcible`]).
pub fn check_removal(members: &Members, id: u64, force: bool) -> Result<Removal, Refused> {
    let voters = &members.voters;
    let live_voters: Vec<u64> = voters.intersection(&members.live).copied().collect();
    let refuse = |refused: Refused| -> Result<(), Refused> {
        if force && refused.forcible() {
            Ok(())
        } else {
            Err(refused)
        }
    };
    let is_learner = members.learners.contains(&id) && !voters.contains(&id);
    if !is_learner && !voters.contains(&id) {
        return Err(Refused::NotAMember {
            id,
            members: voters.union(&members.learners).copied().collect(),
        });
    }
    if voters.len() == 1 && voters.contains(&id) {
        return Err(Refused::LastVoter { id });
    }
    let quorum = quorum_size(voters.len());
    if live_voters.len() < quorum {
        refuse(Refused::NoQuorumNow {
            voters: voters.len(),
            live: live_voters.clone(),
            quorum,
        })?;
    }
    if is_learner {
        return Ok(Removal::Learner);
    }
    let left: Vec<u64> = voters.iter().copied().filter(|v| *v != id).collect();
    let live_left = left.iter().filter(|v| members.live.contains(v)).count();
    let quorum_left = quorum_size(left.len());
    if live_left < quorum_left {
        refuse(Refused::LosesQuorum {
            id,
            voters_left: left.len(),
            live_left,
            quorum_left,
            dead_left: left
                .iter()
                .copied()
                .filter(|v| !members.live.contains(v))
                .collect(),
        })?;
    }
    if id != members.leader {
        return Ok(Removal::Voter);
    }
    left.iter()
        .copied()
        .find(|v| members.live.contains(v))
        .map(|to| Removal::Leader { to })
        .ok_or(Refused::NoSuccessor { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(voters: &[u64], learners: &[u64], live: &[u64], leader: u64) -> Members {
        Members {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            live: live.iter().copied().collect(),
            leader,
        }
    }

    #[test]
    fn removal_table() {
        use Removal::*;
        struct Case {
            name: &'static str,
            members: Members,
            id: u64,
            force: bool,
            expect: Result<Removal, &'static str>,
        }
        let three_one_dead = members(&[1, 2, 3], &[], &[1, 2], 1);
        let cases = [
            Case {
                name: "a dead voter of three",
                members: three_one_dead.clone(),
                id: 3,
                force: false,
                expect: Ok(Voter),
            },
            Case {
                name: "a live voter while another is dead",
                members: three_one_dead.clone(),
                id: 2,
                force: false,
                expect: Err(
                    "removing node 2 leaves 2 voters of which 1 is live; a quorum of 2 needs 2 live voters (node 3 not acknowledging",
                ),
            },
            Case {
                name: "the same, forced",
                members: three_one_dead.clone(),
                id: 2,
                force: true,
                expect: Ok(Voter),
            },
            Case {
                name: "the leader of a healthy three hands off to the lowest live voter",
                members: members(&[1, 2, 3], &[], &[1, 2, 3], 1),
                id: 1,
                force: false,
                expect: Ok(Leader { to: 2 }),
            },
            Case {
                name: "the leader hands off past a dead voter",
                members: members(&[1, 2, 3, 4, 5], &[], &[1, 3, 4, 5], 1),
                id: 1,
                force: false,
                expect: Ok(Leader { to: 3 }),
            },
            Case {
                name: "the leader while a voter is dead",
                members: three_one_dead.clone(),
                id: 1,
                force: false,
                expect: Err("removing node 1 leaves 2 voters of which 1 is live"),
            },
            Case {
                name: "the leader with no live successor, even forced",
                members: members(&[1, 2], &[], &[1], 1),
                id: 1,
                force: true,
                expect: Err("node 1 leads and no other live voter could take over"),
            },
            Case {
                name: "the last voter",
                members: members(&[1], &[2], &[1, 2], 1),
                id: 1,
                force: true,
                expect: Err("node 1 is the last voter"),
            },
            Case {
                name: "an unknown id",
                members: members(&[1, 2, 3], &[4], &[1, 2, 3, 4], 1),
                id: 9,
                force: true,
                expect: Err("node 9 is not a member of this cluster (members: node 1, node 2, node 3, node 4)"),
            },
            Case {
                name: "a learner, live or dead, changes no quorum",
                members: members(&[1, 2, 3], &[4], &[1, 2, 3], 1),
                id: 4,
                force: false,
                expect: Ok(Learner),
            },
            Case {
                name: "no quorum today: the change could not commit",
                members: members(&[1, 2, 3, 4], &[], &[1, 2], 1),
                id: 4,
                force: false,
                expect: Err(
                    "only 2 of the 4 voters are live (node 1, node 2), and the membership change itself must be committed by a quorum of 3",
                ),
            },
            Case {
                name: "no quorum today, forced",
                members: members(&[1, 2, 3, 4], &[], &[1, 2], 1),
                id: 4,
                force: true,
                expect: Ok(Voter),
            },
            Case {
                name: "no quorum today also holds a learner's removal",
                members: members(&[1, 2, 3], &[4], &[1], 1),
                id: 4,
                force: false,
                expect: Err("only 1 of the 3 voters is live (node 1)"),
            },
            Case {
                name: "a dead voter of two leaves one live voter: a quorum of one",
                members: members(&[1, 2], &[], &[1], 1),
                id: 2,
                force: false,
                expect: Err("only 1 of the 2 voters is live"),
            },
            Case {
                name: "five with two dead: removing a dead one keeps three of four live",
                members: members(&[1, 2, 3, 4, 5], &[], &[1, 2, 3], 1),
                id: 5,
                force: false,
                expect: Ok(Voter),
            },
            Case {
                name: "five with two dead: removing a live one leaves two of four",
                members: members(&[1, 2, 3, 4, 5], &[], &[1, 2, 3], 1),
                id: 3,
                force: false,
                expect: Err(
                    "removing node 3 leaves 4 voters of which 2 are live; a quorum of 4 needs 3 live voters (node 4, node 5 not acknowledging the leader): bring them back",
                ),
            },
        ];
        for case in cases {
            let got = check_removal(&case.members, case.id, case.force);
            match (&got, &case.expect) {
                (Ok(got), Ok(expected)) => assert_eq!(got, expected, "{}", case.name),
                (Err(refused), Err(expected)) => {
                    let message = refused.to_string();
                    assert!(
                        message.contains(expected),
                        "{}: {message:?} lacks {expected:?}",
                        case.name
                    );
                }
                _ => panic!("{}: got {got:?}, expected {:?}", case.name, case.expect),
            }
        }
    }

    #[test]
    fn only_liveness_refusals_yield_to_force() {
        let unknown = check_removal(&members(&[1, 2, 3], &[], &[1, 2, 3], 1), 7, true);
        assert!(matches!(unknown, Err(Refused::NotAMember { id: 7, .. })));
        let refused = check_removal(&members(&[1, 2, 3], &[], &[1, 2], 1), 2, false).unwrap_err();
        assert!(refused.forcible(), "{refused}");
        assert!(!Refused::LastVoter { id: 1 }.forcible());
        assert!(!Refused::NoSuccessor { id: 1 }.forcible());
    }
}
