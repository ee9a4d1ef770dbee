//! `cluster member list` and `cluster member remove`: the Raft membership an operator
//! can see and change.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use super::output::{leader_name, or_dash, print_json, table};
use super::Target;
use crate::api::{MemberRemoved, MembersView};

#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// Every member: id, address, role and, from the leader, acknowledgement age and liveness
    #[command(
        long_about = "List every member of the Raft membership: its id, address \
        and role (a voter counts toward quorum; a learner replicates but does not vote). \
        Asked of the leader, each member also shows how long ago it last acknowledged the \
        leader, the log index the leader knows it holds, and whether it is alive (acknowledged \
        within the live window, two election timeouts). Without a reachable leader the \
        asked node's own view is shown, and liveness is unknown ('?'). Read-only: a viewer \
        certificate is enough."
    )]
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON: {leader, term, answered_by, live_window_ms, max_voters,
        /// last_log_index, members[{id, addr, role, last_ack_ms, matched_index, alive}]}
        #[arg(long)]
        json: bool,
    },
    /// Take a member out of the Raft membership (a dead machine, a retired host)
    #[command(
        long_about = "Take member <ID> out of the Raft membership, on the leader, \
        and drop its report from `cluster status`.\n\n\
        Refused, with the arithmetic, when the cluster would be left without a quorum of \
        live voters (e.g. removing a live voter while another is dead), or when today's \
        voters have no live quorum to commit the change; --force overrides these liveness \
        checks. Also refused while a rollout is active (the rollout planned with this \
        membership; --force overrides). Never allowed: an unknown id, or the last voter.\n\n\
        Removing the leader hands leadership to another live voter first. Afterwards, if \
        the cluster has fewer voters than the leader's --max-voters, the leader promotes a \
        caught-up learner.\n\n\
        The removed node's certificate is refused by every member from then on: stop its \
        process. To bring the machine back, start it with a fresh --data-dir and --join.\n\n\
        Example, after node 3's machine died:\n  \
        cluster member list\n  \
        cluster member remove 3"
    )]
    Remove {
        /// Id of the member to remove (as `cluster member list` shows it)
        id: u64,
        #[command(flatten)]
        target: Target,
        /// Remove even if the live voters left would be fewer than a quorum, or a rollout
        /// is active (an unknown id or the last voter are still refused)
        #[arg(long)]
        force: bool,
        /// Print JSON: {id, addr, role, leader, handed_off_to, forgotten, note, promoted}
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: MemberCommand) -> anyhow::Result<ExitCode> {
    match command {
        MemberCommand::List { target, json } => {
            let view = target.client()?.members().await?;
            if json {
                print_json(&view)?;
            } else {
                outln!("{}", render_members(&view));
            }
        }
        MemberCommand::Remove {
            id,
            target,
            force,
            json,
        } => {
            // A leader that removes itself hands off first: allow for that.
            let removed = target
                .client()?
                .timeout(Duration::from_secs(60))
                .remove_member(id, force)
                .await?;
            if json {
                print_json(&removed)?;
            } else {
                outln!("{}", render_removed(&removed));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn render_members(view: &MembersView) -> String {
    let leader = leader_name(view.leader);
    let voters = view.members.iter().filter(|m| m.role == "voter").count();
    let mut out = format!(
        "leader: {leader}  term: {}  voters: {voters} (max {})  last log: {}  (view of node {})\n",
        view.term,
        view.max_voters,
        or_dash(view.last_log_index, ""),
        view.answered_by
    );
    let header = ["ID", "ADDR", "ROLE", "ALIVE", "LAST ACK", "MATCHED"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for member in &view.members {
        rows.push(vec![
            member.id.to_string(),
            member.addr.clone(),
            member.role.clone(),
            match member.alive {
                Some(true) => "yes".into(),
                Some(false) => "NO".into(),
                None => "?".into(),
            },
            or_dash(member.last_ack_ms, " ms"),
            or_dash(member.matched_index, ""),
        ]);
    }
    out.push_str(&table(&rows));
    if view.members.iter().any(|m| m.alive.is_none()) {
        out.push_str(&format!(
            "node {} does not lead: liveness is known only to the leader\n",
            view.answered_by
        ));
    } else {
        out.push_str(&format!(
            "alive: acknowledged the leader within {} ms\n",
            view.live_window_ms
        ));
    }
    out.trim_end().to_string()
}

fn render_removed(removed: &MemberRemoved) -> String {
    let mut out = String::new();
    if let Some(to) = removed.handed_off_to {
        out.push_str(&format!(
            "node {} led: handed leadership to node {to} first\n",
            removed.id
        ));
    }
    out.push_str(&format!(
        "removed {} {} ({}) from the membership (committed by leader node {})\n",
        removed.role, removed.id, removed.addr, removed.leader
    ));
    if let Some(note) = &removed.note {
        out.push_str(&format!("note: {note}\n"));
    }
    for id in &removed.promoted {
        out.push_str(&format!("promoted learner {id} to voter\n"));
    }
    out.push_str(&format!(
        "stop node {}'s process: every member refuses its certificate now",
        removed.id
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Member;

    #[test]
    fn the_member_table_shows_liveness_and_says_who_judged_it() {
        let member = |id, role: &str, alive, ack| Member {
            id,
            addr: format!("127.0.0.1:710{id}"),
            role: role.into(),
            last_ack_ms: ack,
            matched_index: Some(9),
            alive,
        };
        let mut view = MembersView {
            leader: Some(1),
            term: 4,
            answered_by: 1,
            live_window_ms: 600,
            max_voters: 3,
            last_log_index: Some(9),
            members: vec![
                member(1, "voter", Some(true), Some(0)),
                member(2, "voter", Some(false), Some(4200)),
                member(4, "learner", Some(true), Some(12)),
            ],
        };
        let text = render_members(&view);
        assert!(text.contains("voters: 2 (max 3)"), "{text}");
        let dead = text.lines().find(|l| l.starts_with("2 ")).unwrap();
        assert!(dead.contains("NO") && dead.contains("4200 ms"), "{text}");
        assert!(text.contains("within 600 ms"), "{text}");
        view.answered_by = 2;
        for m in &mut view.members {
            m.alive = None;
        }
        let text = render_members(&view);
        assert!(text.contains("node 2 does not lead"), "{text}");
    }
}
