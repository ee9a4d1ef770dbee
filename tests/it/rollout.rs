//! Rolling updates with real supervised processes: a good release, a dry run, preflight
//! refusals, a release that cannot start, and concurrent requests.

use std::time::Duration;

use crate::harness::{
    assert_all_readable, cli, make_release, make_script_release, wait_for, Cluster, Writer,
};

/// Fast pacing for tests: the waits a rollout imposes are its configuration, not its cost.
const FAST: [&str; 6] = [
    "--stabilize-ms",
    "1000",
    "--poll-interval-ms",
    "100",
    "--health-deadline-ms",
    "20000",
];

fn update(node: &str, dist: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["update", "--dist", dist.to_str().unwrap(), "--node", node];
    args.extend(FAST);
    args.extend(extra);
    cli(&args)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until every node reports `hash` as its running build.
async fn wait_all_on(cluster: &Cluster, hash: &str) {
    wait_for(
        &format!("every node on {hash}"),
        Duration::from_secs(60),
        || async {
            let status = cluster.leader_status().await;
            status
                .nodes
                .iter()
                .all(|n| n.build_hash == hash && (n.state == "leader" || n.state == "follower"))
                .then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_three_nodes_commits_every_node_leader_last() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    let leader_before = cluster.leader_status().await.leader.unwrap();

    let writer = Writer::start(cluster.addrs(), "during-rollout");
    let started = std::time::Instant::now();
    let out = update(&cluster.addr(1), &v2, &["--json"]);
    let wall = started.elapsed();
    assert!(out.status.success(), "update failed: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("update --json");
    assert_eq!(json["outcome"]["outcome"], "completed", "{json}");
    wait_all_on(&cluster, &h2).await;
    let report = writer.stop().await;

    // Leader last: the node that led at the start finished after every other node.
    let nodes = json["outcome"]["nodes"].as_object().unwrap();
    let finished = |id: u64| nodes[&id.to_string()]["finished_ms"].as_u64().unwrap();
    for id in (1..=3).filter(|id| *id != leader_before) {
        assert!(
            finished(id) <= finished(leader_before),
            "node {leader_before} (leader) updated last: {json}"
        );
    }
    println!(
        "3-node rollout: {} ms wall (stabilize 1000 ms per node: 3000 ms of configured waits); \
         {} writes during it, longest gap {} ms, {} failed attempts",
        wall.as_millis(),
        report.acked.len(),
        report.max_gap.as_millis(),
        report.failed_attempts
    );
    assert_all_readable(&cluster.addrs()[0], &report.acked).await;
    let history = cli(&["rollout", "history", "--json", "--node", &cluster.addr(2)]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 1);
    let status = cli(&["status", "--json", "--node", &cluster.addr(3)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status["rollout"].is_null(),
        "no rollout active after it completed: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_the_plan_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    make_release(&v1, &[]);
    let h2 = make_release(&v2, &[("share/new", "x")]);
    let cluster = Cluster::start_supervised(3, &v1).await;
    let releases_before = cli(&["dist", "releases", "--json", "--node", &cluster.addr(1)]);

    let out = update(&cluster.addr(2), &v2, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains("plan") && shown.contains("leader"),
        "{shown}"
    );
    assert!(shown.contains("nothing was changed"), "{shown}");

    let releases_after = cli(&["dist", "releases", "--json", "--node", &cluster.addr(1)]);
    // free_bytes moves with whatever else uses the disk; what is held must not.
    let held = |out: &std::process::Output| {
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            json["hashes"].clone(),
            json["current"].clone(),
            json["previous"].clone(),
        )
    };
    assert_eq!(
        held(&releases_before),
        held(&releases_after),
        "no release was uploaded"
    );
    assert!(!String::from_utf8_lossy(&releases_after.stdout).contains(&h2));
    let history = cli(&["rollout", "history", "--json", "--node", &cluster.addr(1)]);
    assert_eq!(String::from_utf8_lossy(&history.stdout).trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_fails_naming_the_node_that_is_down() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    make_release(&v1, &[]);
    make_release(&v2, &[("share/new", "x")]);
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let down = (1..=3).find(|id| *id != leader).unwrap();
    let down_addr = cluster.addr(down);
    cluster.kill(down);
    let alive = (1..=3).find(|id| *id != down).unwrap();

    let out = update(&cluster.addr(alive), &v2, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains(&format!("node {down}")) && shown.contains(&down_addr),
        "preflight names node {down} ({down_addr}): {shown}"
    );
    // A real request is refused the same way and starts nothing.
    let out = update(&cluster.addr(alive), &v2, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let status = cli(&[
        "rollout",
        "status",
        "--json",
        "--node",
        &cluster.addr(alive),
    ]);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "null");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_exits_at_once_is_restored_everywhere() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let bad = work.path().join("bad");
    let h1 = make_release(&v1, &[]);
    make_script_release(
        &bad,
        "#!/bin/sh\necho 'this release cannot start' >&2\nexit 1\n",
    );
    let cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;

    let out = update(&cluster.addr(1), &bad, &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the rollout fails: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("update --json");
    assert_eq!(json["outcome"]["outcome"], "reverted", "{json}");
    wait_all_on(&cluster, &h1).await;
    let status = cluster.leader_status().await;
    assert_eq!(status.nodes.iter().filter(|n| n.role == "voter").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_update_gets_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let v3 = work.path().join("v3");
    make_release(&v1, &[]);
    make_release(&v2, &[("share/a", "2")]);
    make_release(&v3, &[("share/a", "3")]);
    let cluster = Cluster::start_supervised(3, &v1).await;
    let (a, b) = (cluster.addr(1), cluster.addr(2));
    let (v2c, v3c) = (v2.clone(), v3.clone());
    let first = std::thread::spawn(move || update(&a, &v2c, &[]));
    let second = std::thread::spawn(move || update(&b, &v3c, &[]));
    let outs = [first.join().unwrap(), second.join().unwrap()];
    let succeeded = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(
        succeeded,
        1,
        "exactly one runs: {} | {}",
        text(&outs[0]),
        text(&outs[1])
    );
    let refused = outs.iter().find(|o| !o.status.success()).unwrap();
    let shown = text(refused);
    assert!(
        shown.contains("active") || shown.contains("rollout"),
        "clear error: {shown}"
    );
}
