//! Failure budgets and topology: `--max-failures` with learners (a broken learner is
//! restored and the rollout completes; a second failure beyond the budget reverts
//! everything), `--order-by zone` (every node of one zone committed before the next zone
//! starts, from the recorded phase times), `--nodes zone=b` (only matching nodes; the
//! cluster's target moves once every node runs the build), and a canary step's hold
//! across a leader kill.

use std::time::Duration;

use crate::harness::{
    cli, data_dir_of, make_crash_loop_release, make_release, wait_all_on, wait_for, Cluster, Start,
};
use crate::progressive::{entered, ids, update_with};

/// Starts `n` supervised nodes on `dist`, joining one at a time (so with `--max-voters
/// 3`, nodes 4 and up are the learners), and waits until every one is a member.
async fn form_one_by_one(cluster: &mut Cluster, n: u64) {
    cluster.spawn(1, Start::Bootstrap).await;
    let first = cluster.addr(1);
    for id in 2..=n {
        cluster.spawn(id, Start::Join(&first)).await;
        wait_for(
            &format!("node {id} to be a member"),
            Duration::from_secs(60),
            || async {
                let status = cluster.status().await?;
                status.nodes.iter().any(|m| m.id == id).then_some(())
            },
        )
        .await;
    }
}

/// Each node's phase in a history entry.
fn phase(entry: &serde_json::Value, id: u64) -> String {
    entry["nodes"][id.to_string()]["phase"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_budget_restores_a_broken_learner_and_a_second_failure_reverts() {
    let work = tempfile::tempdir().unwrap();
    let dist = |name: &str| work.path().join(name);
    let h1 = make_release(&dist("v1"), &[]);
    // Releases that start, serve, and are killed again on every start on a node whose
    // data dir holds `broken-v2` (`broken-v3`): a node running v2 is unharmed by the
    // marker that breaks v3 there.
    let h2 = make_crash_loop_release(&dist("v2"), "KILL", Some("broken-v2"));
    std::fs::create_dir_all(dist("v3").join("share")).unwrap();
    std::fs::write(dist("v3").join("share/v3"), "three").unwrap();
    let h3 = make_crash_loop_release(&dist("v3"), "KILL", Some("broken-v3"));
    let mut cluster = Cluster::new();
    cluster.supervised = Some(dist("v1"));
    cluster.flags = vec!["--max-voters".into(), "3".into()];
    form_one_by_one(&mut cluster, 5).await;
    wait_all_on(&cluster, &h1).await;
    let status = cluster.leader_status().await;
    let learners: Vec<u64> = status
        .nodes
        .iter()
        .filter(|n| n.role == "learner")
        .map(|n| n.id)
        .collect();
    assert_eq!(learners, [4, 5], "{status:?}");
    let addr = cluster.addr(1);
    let pace = [
        "--stabilize",
        "2s",
        "--health-deadline",
        "40s",
        "--max-failures",
        "1",
    ];

    // One broken learner of two, updated together: it is restored, the rest goes on.
    std::fs::write(data_dir_of(&cluster, 4).join("broken-v2"), "").unwrap();
    let mut args = pace.to_vec();
    args.extend(["--max-parallel", "2"]);
    let entry = update_with(&addr, &dist("v2"), &args);
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    assert_eq!(phase(&entry, 4), "restored", "{entry:#}");
    for id in [1, 2, 3, 5] {
        assert_eq!(phase(&entry, id), "committed", "node {id}: {entry:#}");
    }
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("completed with 1 of 1 tolerated learner failures")
            && reason.contains("node 4"),
        "{reason}"
    );
    // The voters began only once the broken learner was back on its build.
    let restored = entered(&entry, 4, "restored");
    for id in [1, 2, 3] {
        assert!(
            entered(&entry, id, "backup") >= restored,
            "node {id}: {entry:#}"
        );
    }
    let status = cluster.leader_status().await;
    for node in &status.nodes {
        let expected = if node.id == 4 { &h1 } else { &h2 };
        assert_eq!(&node.build_hash, expected, "node {}", node.id);
    }
    println!("failure budget: {reason}");

    // Two broken learners against a budget of one: the second failure reverts both, and
    // no voter is touched.
    for id in [4, 5] {
        std::fs::write(data_dir_of(&cluster, id).join("broken-v3"), "").unwrap();
    }
    let entry = update_with(&addr, &dist("v3"), &pace);
    assert_eq!(entry["target_hash"], h3.as_str());
    assert_eq!(entry["outcome"], "reverted", "{entry:#}");
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 learners failed, more than --max-failures 1 tolerates (1)"),
        "{reason}"
    );
    for id in [1, 2, 3] {
        assert_eq!(phase(&entry, id), "pending", "node {id}: {entry:#}");
    }
    for id in [4, 5] {
        assert_eq!(phase(&entry, id), "restored", "node {id}: {entry:#}");
    }
    wait_for(
        "every node back on its build",
        Duration::from_secs(60),
        || async {
            let status = cluster.leader_status().await;
            status
                .nodes
                .iter()
                .all(|n| n.build_hash == if n.id == 4 { h1.as_str() } else { h2.as_str() })
                .then_some(())
        },
    )
    .await;
    println!("over budget: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_by_zone_finishes_a_zone_first_and_nodes_limits_a_rollout() {
    let work = tempfile::tempdir().unwrap();
    let dist = |name: &str| work.path().join(name);
    let h1 = make_release(&dist("v1"), &[("share/motd", "one")]);
    let h2 = make_release(&dist("v2"), &[("share/motd", "two")]);
    let h3 = make_release(&dist("v3"), &[("share/motd", "three")]);
    let mut cluster = Cluster::new();
    cluster.supervised = Some(dist("v1"));
    for (id, zone) in [(1, "a"), (2, "b"), (3, "a"), (4, "b")] {
        cluster.node_flags.insert(
            id,
            vec![
                "--label".into(),
                format!("zone={zone}"),
                "--label".into(),
                "rack=r1".into(),
            ],
        );
    }
    cluster.form(4).await;
    wait_all_on(&cluster, &h1).await;
    let addr = cluster.addr(1);
    let leader = cluster.leader_status().await.leader.unwrap();
    let leader_zone = if leader % 2 == 1 { "a" } else { "b" };
    let (first, second): (Vec<u64>, Vec<u64>) = if leader_zone == "a" {
        (vec![2, 4], vec![1, 3])
    } else {
        (vec![1, 3], vec![2, 4])
    };

    let status = cli(&["status", "--node", &addr]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("LABELS") && text.contains("rack=r1, zone=b"),
        "{text}"
    );
    let dry = cli(&[
        "update",
        "--dist",
        dist("v2").to_str().unwrap(),
        "--node",
        &addr,
        "--order-by",
        "zone",
        "--dry-run",
    ]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains(&format!(
            "zone={}",
            if leader_zone == "a" { "b" } else { "a" }
        )),
        "{plan}"
    );

    // --order-by zone: the leader's zone last, every node of the other committed first.
    let entry = update_with(
        &addr,
        &dist("v2"),
        &["--stabilize", "1s", "--order-by", "zone"],
    );
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    let first_done = first
        .iter()
        .map(|id| entered(&entry, *id, "committed"))
        .max()
        .unwrap();
    let second_began = second
        .iter()
        .map(|id| entered(&entry, *id, "backup"))
        .min()
        .unwrap();
    assert!(
        first_done <= second_began,
        "zone of {first:?} committed at {first_done}, zone of {second:?} began at {second_began}"
    );
    wait_all_on(&cluster, &h2).await;

    // --nodes: only the first zone; the others are listed, and the cluster's target stays.
    let selector = if leader_zone == "a" {
        "zone=b"
    } else {
        "zone=a"
    };
    let entry = update_with(
        &addr,
        &dist("v3"),
        &["--stabilize", "1s", "--nodes", selector],
    );
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    assert_eq!(ids(&entry, "untargeted"), second, "{entry:#}");
    let status = cli(&["status", "--node", &addr]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("target: build {}", &h2[..12]))
            && text.contains(&format!("staged: build {}", &h3[..12])),
        "{text}"
    );
    let builds = cluster.leader_status().await;
    for node in &builds.nodes {
        let expected = if first.contains(&node.id) { &h3 } else { &h2 };
        assert_eq!(&node.build_hash, expected, "node {}", node.id);
    }

    // The rest: once every node runs it, it is the target.
    let other = if selector == "zone=b" {
        "zone=a"
    } else {
        "zone=b"
    };
    let entry = update_with(&addr, &dist("v3"), &["--stabilize", "1s", "--nodes", other]);
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    wait_all_on(&cluster, &h3).await;
    let status = cli(&["status", "--node", &addr]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("target: build {}", &h3[..12])) && !text.contains("staged:"),
        "{text}"
    );
    let history = cli(&["rollout", "history", "--json", "--node", &addr]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(
        history.as_array().unwrap().len(),
        3,
        "no catch-up of the staged nodes: {history:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_hold_survives_a_leader_kill() {
    let work = tempfile::tempdir().unwrap();
    let dist = |name: &str| work.path().join(name);
    let h1 = make_release(&dist("v1"), &[("share/motd", "one")]);
    let h2 = make_release(&dist("v2"), &[("share/motd", "two")]);
    let mut cluster = Cluster::start_supervised(3, &dist("v1")).await;
    wait_all_on(&cluster, &h1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let addr = cluster.addr(leader);
    let out = cli(&[
        "update",
        "--dist",
        dist("v2").to_str().unwrap(),
        "--node",
        &addr,
        "--stabilize",
        "1s",
        "--soak",
        "0",
        "--stale-ack",
        "2s",
        "--steps",
        "1,100%",
        "--step-pause",
        "10m",
        "--detach",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let canary = |json: &serde_json::Value| -> Option<u64> {
        let nodes = json["nodes"].as_object()?;
        let committed: Vec<u64> = nodes
            .iter()
            .filter(|(_, s)| s["phase"] == "committed")
            .filter_map(|(id, _)| id.parse().ok())
            .collect();
        let pending = nodes.values().filter(|s| s["phase"] == "pending").count();
        (committed.len() == 1 && pending == 2 && json["step"]["index"] == 0).then(|| committed[0])
    };
    let first = wait_for("the first step to hold", Duration::from_secs(120), || {
        let addr = addr.clone();
        async move {
            let out = cli(&["rollout", "status", "--json", "--node", &addr]);
            canary(&serde_json::from_slice(&out.stdout).ok()?)
        }
    })
    .await;
    // The leader dies while the step holds, and stays down until another node leads (a
    // supervisor that restarts it at once may see it lead again in the same term).
    cluster.kill(leader);
    let next = cluster.wait_leader_other_than(leader).await;
    // The new leader holds the same step (its pause starts again), and starts no node.
    let status = wait_for(
        "the new leader to hold the step",
        Duration::from_secs(30),
        || {
            let addr = cluster.addr(next);
            async move {
                let out = cli(&["rollout", "status", "--node", &addr]);
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let json = cli(&["rollout", "status", "--json", "--node", &addr]);
                let json: serde_json::Value = serde_json::from_slice(&json.stdout).ok()?;
                let held = canary(&json) == Some(first) && text.contains("holds for");
                if !held {
                    println!("not yet held on node {next}: {text}");
                }
                held.then_some(text)
            }
        },
    )
    .await;
    assert!(status.contains("canary step 1/2"), "{status}");
    cluster.spawn(leader, Start::Restart).await;
    // An operator promotes it on the new leader; the next step begins only then.
    let promoted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let promoted = cli(&["rollout", "promote", "--node", &cluster.addr(next)]);
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let watch = cli(&[
        "rollout",
        "status",
        "--watch",
        "--timeout",
        "3m",
        "--node",
        &cluster.addr(next),
    ]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stdout)
    );
    wait_all_on(&cluster, &h2).await;
    let history = cli(&[
        "rollout",
        "history",
        "--json",
        "--node",
        &cluster.addr(next),
    ]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let entry = history.as_array().unwrap().last().unwrap();
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    // No node of the second step began before the promote.
    for id in [1, 2, 3].into_iter().filter(|id| *id != first) {
        let began = entered(entry, id, "backup");
        assert!(
            began >= promoted_at,
            "node {id} began {} ms before the promote",
            promoted_at - began
        );
    }
    println!(
        "step hold across a leader kill: leader {leader} killed, node {next} held until promoted"
    );
}
