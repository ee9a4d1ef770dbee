//! Operating the membership with real processes: the member list and who may change it,
//! removing a dead voter (and refusing to remove a live one while it is dead), a failed
//! join that leaves no learner behind, and `--max-voters` with promotion after a removal.

use std::time::Duration;

use cluster::api::{ErrorKind, JoinRequest, MembersView};
use cluster::rpc::{AgentClient, ControlClient};
use cluster::state::{Command, NodeInfo};

use crate::harness::{
    channels_as, cli, creds, make_release, output_within, wait_for, Cluster, Start,
};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cluster member list --json` through `addr`, as the test operator.
fn member_list(addr: &str) -> MembersView {
    let out = cli(&["member", "list", "--json", "--node", addr]);
    assert!(out.status.success(), "member list: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("member list --json")
}

/// `cluster member remove <id> --json` through `addr`, which must succeed: what it printed.
fn remove_json(id: u64, addr: &str) -> serde_json::Value {
    let out = cli(&[
        "member",
        "remove",
        &id.to_string(),
        "--json",
        "--node",
        addr,
    ]);
    assert!(out.status.success(), "member remove {id}: {}", text(&out));
    serde_json::from_slice(&out.stdout).expect("member remove --json")
}

fn ids(view: &MembersView) -> Vec<u64> {
    view.members.iter().map(|m| m.id).collect()
}

fn role_of(view: &MembersView, id: u64) -> Option<&str> {
    view.members
        .iter()
        .find(|m| m.id == id)
        .map(|m| m.role.as_str())
}

/// Waits until the leader, asked through `addr`, judges every member in `alive` alive and
/// every member in `dead` not.
async fn wait_liveness(addr: &str, alive: &[u64], dead: &[u64]) -> MembersView {
    wait_for(
        &format!("alive {alive:?}, dead {dead:?}"),
        Duration::from_secs(30),
        || async {
            let view = member_list(addr);
            let judged = |id: &u64, expected: bool| {
                view.members
                    .iter()
                    .any(|m| m.id == *id && m.alive == Some(expected))
            };
            (alive.iter().all(|id| judged(id, true)) && dead.iter().all(|id| judged(id, false)))
                .then_some(view)
        },
    )
    .await
}

/// What a removed node's certificate gets: refused by the authorization layer, for
/// Control writes and Agent calls alike.
async fn assert_refused_as_non_member(removed: u64, addr: &str) {
    let channels = channels_as(&format!("n{removed}"));
    let report = Command::RegisterNode {
        id: removed,
        info: NodeInfo::default(),
    };
    let write = ControlClient::with_channels(&channels, addr)
        .unwrap()
        .write(&report)
        .await
        .expect_err("a removed node cannot report itself back");
    assert_eq!(write.kind, ErrorKind::PermissionDenied, "{write}");
    assert!(
        write.message.contains("is not a member"),
        "{}",
        write.message
    );
    let agent = AgentClient::with_channels(&channels, addr)
        .unwrap()
        .releases()
        .await
        .expect_err("a removed node's agent calls are refused");
    assert_eq!(agent.kind, ErrorKind::PermissionDenied, "{agent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_shows_every_member_and_viewers_cannot_remove() {
    let cluster = Cluster::start(3).await;
    let view = wait_liveness(&cluster.addr(2), &[1, 2, 3], &[]).await;
    assert_eq!(ids(&view), [1, 2, 3]);
    assert!(view.members.iter().all(|m| m.role == "voter"), "{view:?}");
    let leader = view.leader.expect("a leader");
    assert_eq!(
        view.answered_by, leader,
        "a follower forwards to the leader"
    );
    assert_eq!(view.max_voters, 5, "the default --max-voters");
    for member in &view.members {
        assert_eq!(member.addr, cluster.addr(member.id));
        assert!(member.last_ack_ms.is_some(), "{member:?}");
        assert!(member.matched_index.is_some(), "{member:?}");
    }
    let human = cli(&["member", "list", "--node", &cluster.addr(3)]);
    assert!(human.status.success(), "{}", text(&human));
    let shown = text(&human);
    assert!(
        shown.contains("ALIVE") && shown.contains("LAST ACK") && shown.contains("voter"),
        "{shown}"
    );

    // A viewer reads the list, and cannot remove anyone.
    let viewer = creds("viewer");
    let viewer = viewer.to_str().unwrap();
    let listed = cli(&[
        "member",
        "list",
        "--tls",
        viewer,
        "--node",
        &cluster.addr(1),
    ]);
    assert!(listed.status.success(), "{}", text(&listed));
    let refused = cli(&[
        "member",
        "remove",
        "3",
        "--tls",
        viewer,
        "--node",
        &cluster.addr(1),
    ]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("may not call"),
        "{}",
        text(&refused)
    );
    let denied = ControlClient::with_channels(&channels_as("viewer"), &cluster.addr(1))
        .unwrap()
        .remove_member(3, false)
        .await
        .expect_err("a viewer may not remove");
    assert_eq!(denied.kind, ErrorKind::PermissionDenied, "{denied}");

    // An unknown id is NOT_FOUND, and the membership is unchanged.
    let unknown = cluster
        .client(2)
        .remove_member(9, true)
        .await
        .expect_err("node 9 is no member");
    assert_eq!(unknown.kind, ErrorKind::NotFound, "{unknown}");
    assert!(
        unknown.message.contains("node 9 is not a member"),
        "{unknown}"
    );
    assert_eq!(ids(&member_list(&cluster.addr(1))), [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_removed_and_a_live_one_is_refused_with_the_arithmetic() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    make_release(&v1, &[]);
    make_release(&v2, &[("share/new", "x")]);
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let mut followers = (1..=3).filter(|id| *id != leader);
    let (dead, live) = (followers.next().unwrap(), followers.next().unwrap());
    let dead_addr = cluster.addr(dead);
    cluster.kill(dead);
    let asked = cluster.addr(live);
    wait_liveness(&asked, &[leader, live], &[dead]).await;

    let out = cli(&["member", "remove", &live.to_string(), "--node", &asked]);
    assert!(!out.status.success(), "{}", text(&out));
    let expected = format!(
        "removing node {live} leaves 2 voters of which 1 is live; a quorum of 2 needs 2 live voters"
    );
    assert!(text(&out).contains(&expected), "{}", text(&out));
    assert_eq!(ids(&member_list(&asked)).len(), 3, "nothing was removed");

    let removed = remove_json(dead, &asked);
    assert_eq!(removed["id"], dead);
    assert_eq!(removed["role"], "voter");
    assert_eq!(removed["addr"], dead_addr);
    assert_eq!(removed["forgotten"], true, "{removed}");

    let status = cluster.client(live).status(false).await.expect("status");
    let listed: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
    assert!(
        !listed.contains(&dead),
        "status still lists node {dead}: {listed:?}"
    );
    assert_eq!(listed.len(), 2);
    let put = cli(&["kv", "put", "after", "removal", "--node", &asked]);
    assert!(put.status.success(), "{}", text(&put));

    // Two voters cannot lose one: a dry run needs --allow-downtime, and names nobody dead.
    let out = cli(&[
        "update",
        "--dist",
        v2.to_str().unwrap(),
        "--dry-run",
        "--allow-downtime",
        "--stale-ack-ms",
        "2000",
        "--node",
        &asked,
    ]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        !shown.contains(&format!("node {dead}")) && !shown.contains(&dead_addr),
        "preflight still mentions the removed node: {shown}"
    );
    assert_refused_as_non_member(dead, &asked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reaches_the_leader_through_a_list_and_a_follower_names_it() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let (leader_addr, follower_addr) = (cluster.addr(leader), cluster.addr(follower));

    // A follower alone: the node stops at once, told where the leader is.
    let alone = output_within(
        cluster.command(5, Start::Join(&follower_addr)),
        Duration::from_secs(60),
    );
    let said = text(&alone);
    assert!(!alone.status.success(), "{said}");
    assert!(
        said.contains(&format!("does not lead; the leader is at {leader_addr}"))
            && said.contains("several members' addresses separated by commas"),
        "{said}"
    );
    assert_eq!(
        ids(&member_list(&leader_addr)),
        [1, 2, 3],
        "no member was added"
    );

    // The follower first, then the leader: the node joins.
    cluster
        .spawn(4, Start::Join(&format!("{follower_addr}, {leader_addr}")))
        .await;
    cluster.wait_voters(4).await;
    assert_eq!(ids(&member_list(&follower_addr)), [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_nobody_answers_for_leaves_no_learner_behind() {
    let cluster = Cluster::start(3).await;
    // An address nobody listens on: bound by the OS, then closed again.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // Through the leader: a follower answers a join with the leader's address.
    let leader = cluster.leader_status().await.leader.unwrap();
    let failed = ControlClient::with_channels(&channels_as("n4"), &cluster.addr(leader))
        .unwrap()
        .timeout(Duration::from_secs(90))
        .join(&JoinRequest {
            id: 4,
            addr: nobody.clone(),
            cluster_id: String::new(),
        })
        .await
        .expect_err("nobody answers at that address");
    assert_eq!(failed.kind, ErrorKind::DeadlineExceeded, "{failed}");
    assert!(
        failed.message.contains(&nobody) && failed.message.contains("never answered"),
        "{failed}"
    );
    assert!(
        failed.message.contains("the learner was removed again"),
        "{failed}"
    );
    let view = member_list(&cluster.addr(1));
    assert_eq!(ids(&view), [1, 2, 3], "no learner remains: {view:?}");
    let put = cli(&[
        "kv",
        "put",
        "after",
        "failed-join",
        "--node",
        &cluster.addr(2),
    ]);
    assert!(put.status.success(), "{}", text(&put));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_beyond_max_voters_stay_learners_until_a_voter_is_removed() {
    let mut cluster = Cluster::new();
    cluster.flags = vec!["--max-voters".into(), "3".into()];
    cluster.spawn(1, Start::Bootstrap).await;
    let first = cluster.addr(1);
    // One join at a time: which joiner stays a learner depends on the order they arrive.
    for id in 2..=4 {
        cluster.spawn(id, Start::Join(&first)).await;
        wait_for(
            &format!("node {id} to be a member"),
            Duration::from_secs(60),
            || async { ids(&member_list(&first)).contains(&id).then_some(()) },
        )
        .await;
    }
    let view = wait_for(
        "three voters and learner 4",
        Duration::from_secs(60),
        || async {
            let view = member_list(&first);
            (view.members.len() == 4 && role_of(&view, 4) == Some("learner")).then_some(view)
        },
    )
    .await;
    assert_eq!(view.max_voters, 3);
    let voters: Vec<u64> = view
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, [1, 2, 3], "{view:?}");
    let log4 = cluster.nodes[&4].log.clone();
    wait_for(
        "node 4 to say it joined as a learner",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&log4).unwrap_or_default();
            log.contains("joined the cluster as a learner")
                .then_some(())
        },
    )
    .await;

    let leader = view.leader.unwrap();
    let removed = (1..=3).find(|id| *id != leader).unwrap();
    wait_liveness(&first, &[1, 2, 3, 4], &[]).await;
    let result = remove_json(removed, &cluster.addr(leader));
    assert_eq!(result["promoted"], serde_json::json!([4]), "{result}");
    let remaining = (1..=4).find(|id| *id != removed && *id != leader).unwrap();
    let view = member_list(&cluster.addr(remaining));
    assert!(!ids(&view).contains(&removed), "{view:?}");
    assert_eq!(role_of(&view, 4), Some("voter"), "{view:?}");
    // Node `removed` still runs, and every member refuses it now.
    assert_refused_as_non_member(removed, &cluster.addr(leader)).await;

    // Removing the leader hands leadership to another live voter first.
    let voters: Vec<u64> = view
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.id)
        .collect();
    wait_liveness(&cluster.addr(remaining), &voters, &[]).await;
    let result = remove_json(leader, &cluster.addr(remaining));
    let successor = result["handed_off_to"].as_u64().expect("a hand-off");
    assert_ne!(successor, leader);
    assert_eq!(result["leader"].as_u64(), Some(successor), "{result}");
    let view = member_list(&cluster.addr(remaining));
    assert_eq!(view.leader, Some(successor));
    assert_eq!(ids(&view).len(), 2, "{view:?}");
    assert!(view.members.iter().all(|m| m.role == "voter"), "{view:?}");
    let put = cli(&["kv", "put", "two", "voters", "--node", &cluster.addr(4)]);
    assert!(put.status.success(), "{}", text(&put));
}
