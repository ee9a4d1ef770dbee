//! The Raft foundation with real processes: forming, replication, failover, planned
//! hand-off, catch-up after restart, and tolerance of dead voters.

use std::time::Duration;

use crate::harness::{
    assert_all_readable, cli, data_dir_of, wait_for, Cluster, Start, Writer, WRITER_TIMEOUT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_with_one_leader() {
    let cluster = Cluster::start(3).await;
    let out = cli(&["status", "--json", "--node", &cluster.addr(2)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let leader = json["leader"].as_u64().expect("a leader");
    assert!(json["term"].as_u64().unwrap() >= 1);
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        for key in [
            "id",
            "addr",
            "role",
            "state",
            "build_hash",
            "last_ack_ms",
            "matched_index",
        ] {
            assert!(node.get(key).is_some(), "status --json lacks nodes[].{key}");
        }
        assert_eq!(node["role"], "voter");
    }
    let leaders: Vec<_> = nodes.iter().filter(|n| n["state"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "exactly one leader: {json}");
    assert_eq!(leaders[0]["id"].as_u64(), Some(leader));
    // Every node reported itself with its build ("dev" outside a release).
    wait_for(
        "every node to report its build",
        Duration::from_secs(30),
        || async {
            let status = cluster.status().await?;
            status
                .nodes
                .iter()
                .all(|n| n.build_hash == "dev")
                .then_some(())
        },
    )
    .await;

    let human = cli(&["status", "--node", &cluster.addr(3)]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("LAST ACK") && text.contains("leader"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_replicate_to_every_node() {
    let cluster = Cluster::start(3).await;
    // Written through a follower or the leader alike: whichever node 3 is.
    let put = cli(&["kv", "put", "colour", "teal", "--node", &cluster.addr(3)]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let index = cluster
        .client(1)
        .kv_put("shape", "round")
        .await
        .expect("put")
        .log_index;
    for id in 1..=3 {
        let get = cli(&["kv", "get", "colour", "--node", &cluster.addr(id)]);
        assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "teal");
        // Replicated, not just readable through the leader: each node applied the write.
        wait_for(
            &format!("node {id} to apply {index}"),
            Duration::from_secs(30),
            || async {
                let local = cluster.client(id).status(true).await.ok()?;
                let me = local.nodes.iter().find(|n| n.id == id)?;
                (me.applied_index? >= index).then_some(())
            },
        )
        .await;
    }
    let missing = cli(&["kv", "get", "nothing-here", "--node", &cluster.addr(2)]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_another_and_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start(3).await;
    let old = cluster.leader_status().await.leader.unwrap();
    let survivors: Vec<String> = (1..=3)
        .filter(|id| *id != old)
        .map(|id| cluster.addr(id))
        .collect();
    let writer = Writer::start(survivors.clone(), "kill");
    cluster.wait_more_commits(20).await;
    cluster.kill(old);
    let new = cluster.wait_leader_other_than(old).await;
    // Keep writing under the new leader for a moment, then check everything.
    cluster.wait_more_commits(20).await;
    let report = writer.stop().await;
    println!(
        "leader kill -9: longest gap between acknowledged writes {} ms \
         (client timeout {} ms, {} writes, {} failed attempts); new leader {new}",
        report.max_gap.as_millis(),
        WRITER_TIMEOUT.as_millis(),
        report.acked.len(),
        report.failed_attempts
    );
    assert!(!report.acked.is_empty());
    assert_all_readable(&survivors[0], &report.acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_transfer_moves_leadership_under_writes_without_loss() {
    let cluster = Cluster::start(3).await;
    let old = cluster.leader_status().await.leader.unwrap();
    let to = if old == 3 { 2 } else { 3 };
    let writer = Writer::start(cluster.addrs(), "transfer");
    cluster.wait_more_commits(20).await;
    let out = cli(&[
        "leader",
        "transfer",
        &to.to_string(),
        "--node",
        &cluster.addr(1),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["leader"].as_u64(), Some(to));
    assert_eq!(cluster.leader_status().await.leader, Some(to));
    cluster.wait_more_commits(20).await;
    let report = writer.stop().await;
    println!(
        "leader transfer {old} -> {to}: hand-off {} ms, longest gap between acknowledged writes {} ms \
         (client timeout {} ms, {} writes, {} failed attempts)",
        done["elapsed_ms"],
        report.max_gap.as_millis(),
        WRITER_TIMEOUT.as_millis(),
        report.acked.len(),
        report.failed_attempts
    );
    assert_all_readable(&cluster.addr(to), &report.acked).await;

    // Refusals name the reason.
    let learner_or_missing = cli(&["leader", "transfer", "42", "--node", &cluster.addr(1)]);
    assert!(!learner_or_missing.status.success());
    assert!(String::from_utf8_lossy(&learner_or_missing.stderr).contains("not a member"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_and_catches_up() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let victim = if leader == 3 { 2 } else { 3 };
    let status = cluster.terminate(victim);
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status:?}"
    );
    let mut last = 0;
    for i in 0..50 {
        last = cluster
            .client(leader)
            .kv_put(&format!("while-down-{i}"), "x")
            .await
            .expect("write with one voter down")
            .log_index;
    }
    cluster.spawn(victim, Start::Restart).await;
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(60),
        || async {
            let local = cluster.client(victim).status(true).await.ok()?;
            let me = local.nodes.iter().find(|n| n.id == victim)?;
            (me.applied_index? >= last && me.state == "follower").then_some(())
        },
    )
    .await;
    assert!(data_dir_of(&cluster, victim).join("raft").exists());
}

/// A leader killed and started again at once must win a new election before it leads:
/// its store does not flush the commit index or the state machine before answering, so a
/// leader that resumed its old term could answer a read from a state machine missing
/// writes it had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_at_once_leads_only_after_a_new_election() {
    let mut cluster = Cluster::start(3).await;
    let before = cluster.leader_status().await;
    let leader = before.leader.unwrap();
    let written = cluster
        .client(leader)
        .kv_put("last-before-the-crash", "1")
        .await
        .expect("write");
    cluster.kill(leader);
    cluster.spawn(leader, Start::Restart).await;
    let after = wait_for(
        "a leader after the restart",
        Duration::from_secs(60),
        || async {
            let status = cluster.client(leader).status(false).await.ok()?;
            (status.leader.is_some() && status.commit_index >= Some(written.log_index))
                .then_some(status)
        },
    )
    .await;
    assert!(
        after.term > before.term,
        "node {leader} was restarted as leader of term {} without an election: {after:?}",
        before.term
    );
    let value = cluster
        .client(leader)
        .kv_get("last-before-the-crash")
        .await
        .expect("read");
    assert_eq!(value.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_tolerate_two_dead_voters() {
    let mut cluster = Cluster::start(5).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    // Kill the leader and one follower: 3 of 5 remain, still a majority.
    let follower = (1..=5).find(|id| *id != leader).unwrap();
    cluster.kill(leader);
    cluster.kill(follower);
    let alive: Vec<u64> = (1..=5)
        .filter(|id| *id != leader && *id != follower)
        .collect();
    cluster.wait_leader_other_than(leader).await;
    let client = cluster.client(alive[0]);
    client
        .clone()
        .kv_put("still", "writable")
        .await
        .expect("write with 2 of 5 dead");
    let read = cluster.client(alive[2]).kv_get("still").await.unwrap();
    assert_eq!(read.as_deref(), Some("writable"));
    let status = cluster.leader_status().await;
    let unreachable = status
        .nodes
        .iter()
        .filter(|n| n.state == "unreachable")
        .count();
    assert_eq!(unreachable, 2, "status shows the dead voters: {status:?}");
}
