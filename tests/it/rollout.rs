//! Rolling updates with real supervised processes: a good release, a dry run, preflight
//! refusals, a release that cannot start, one that fails its health check, one that
//! crash-loops after starting, five nodes, a leader killed mid-rollout, and concurrent
//! requests.

use std::time::Duration;

use crate::harness::{
    assert_all_readable, cli, data_dir_of, make_crash_loop_release, make_release,
    make_script_release, update_in_background, wait_all_on, wait_for, Cluster, Start, Writer,
};

/// Fast pacing for tests: the waits a rollout imposes are its configuration, not its cost.
/// Acknowledgements may lag on a loaded machine: these are not staleness tests.
const FAST: [&str; 8] = [
    "--stale-ack-ms",
    "2000",
    "--soak-ms",
    "0",
    "--poll-interval-ms",
    "100",
    "--health-deadline-ms",
    "20000",
];

/// `cluster update` with [`FAST`] pacing and 1 s of stabilization per node.
fn update(node: &str, dist: &std::path::Path, extra: &[&str]) -> std::process::Output {
    update_stabilizing(node, dist, 1000, extra)
}

fn update_stabilizing(
    node: &str,
    dist: &std::path::Path,
    stabilize_ms: u64,
    extra: &[&str],
) -> std::process::Output {
    let stabilize = stabilize_ms.to_string();
    let mut args = vec!["update", "--dist", dist.to_str().unwrap(), "--node", node];
    args.extend(FAST);
    args.extend(["--stabilize-ms", &stabilize]);
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
    // Who started it is the operator the client's certificate names, on whichever node
    // the request reached first.
    let trigger = history[0]["trigger"].as_str().unwrap_or_default();
    assert!(
        trigger.starts_with("operator test ran `cluster update --dist"),
        "{history}"
    );
    let status = cli(&["status", "--json", "--node", &cluster.addr(3)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status["rollout"]["active"].is_null(),
        "no rollout active after it completed: {status}"
    );
    assert_eq!(status["rollout"]["state"], "idle", "{status}");
    assert_eq!(status["rollout"]["active_hash"], h2.as_str(), "{status}");
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
    // 5 s per node: the rollout that wins lasts well past any lag a loaded machine puts
    // between the two requests, so the other always meets it active.
    let first = std::thread::spawn(move || update_stabilizing(&a, &v2c, 5000, &[]));
    let second = std::thread::spawn(move || update_stabilizing(&b, &v3c, 5000, &[]));
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

/// The history entry of the only rollout, as `rollout history --json` on `addr` shows it.
fn only_history_entry(addr: &str) -> Option<serde_json::Value> {
    let out = cli(&["rollout", "history", "--json", "--node", addr]);
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let entries = history.as_array()?;
    assert!(entries.len() <= 1, "one rollout was started: {history}");
    entries.first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_its_health_command_is_restored_everywhere() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[]);
    let h2 = make_release(&v2, &[("share/unhealthy", "this release fails its check")]);
    // The check runs in the data dir: it looks at the release `current` points at.
    let cluster = Cluster::start_supervised_with(
        3,
        &v1,
        &["--health-command", "test ! -e current/share/unhealthy"],
    )
    .await;
    wait_all_on(&cluster, &h1).await;
    // Every node reports its check passing before the update (preflight requires it).
    for id in 1..=3 {
        let out = cli(&["status", "--local", "--json", "--node", &cluster.addr(id)]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let me = json["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap()
            .clone();
        assert!(me["health_problem"].is_null(), "node {id}: {me}");
    }

    let started = std::time::Instant::now();
    let out = update(&cluster.addr(1), &v2, &["--json"]);
    let wall = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the rollout fails: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("update --json");
    assert_eq!(json["outcome"]["outcome"], "reverted", "{json}");
    assert!(
        json["outcome"]
            .to_string()
            .contains("health command exited 1"),
        "the outcome names the failing check: {json}"
    );
    wait_all_on(&cluster, &h1).await;
    assert!(
        cluster
            .leader_status()
            .await
            .nodes
            .iter()
            .all(|n| n.build_hash != h2),
        "no node runs {h2}"
    );
    println!(
        "health-check failure: reverted in {} ms wall (health deadline 20000 ms)",
        wall.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crash_loops_after_starting_is_restored() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[]);
    // The real node, killed once it serves and its data dir holds `crash`, which is
    // written once the leader has seen it healthy on the new build: it starts, reports
    // healthy, then dies during stabilization, again on every start.
    make_crash_loop_release(&v2, "TERM", Some("crash"));
    let cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;

    let node = cluster.addr(1);
    let dist = v2.clone();
    let started = std::time::Instant::now();
    let update = std::thread::spawn(move || {
        cli(&[
            "update",
            "--dist",
            dist.to_str().unwrap(),
            "--node",
            &node,
            // Long: the crash, not the end of the window, must decide the node's fate.
            "--stabilize-ms",
            "60000",
            "--soak-ms",
            "0",
            "--stale-ack-ms",
            "2000",
            "--poll-interval-ms",
            "100",
            "--health-deadline-ms",
            "20000",
            "--json",
        ])
    });
    let stabilizing = wait_for(
        "a node healthy on the new build, in stabilize",
        Duration::from_secs(90),
        || async {
            let json = active_rollout(&cluster)?;
            json["nodes"]
                .as_object()?
                .iter()
                .find(|(_, step)| step["phase"] == "stabilize")
                .and_then(|(id, _)| id.parse::<u64>().ok())
        },
    )
    .await;
    std::fs::write(data_dir_of(&cluster, stabilizing).join("crash"), "").unwrap();
    let out = update.join().unwrap();
    let wall = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the rollout fails: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("update --json");
    assert_eq!(json["outcome"]["outcome"], "reverted", "{json}");
    let reason = json["outcome"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("node {stabilizing} ")),
        "the reason names the node that crashed: {json}"
    );
    wait_all_on(&cluster, &h1).await;
    println!(
        "crash loop after start: reverted in {} ms wall (node {stabilizing} killed in \
         stabilize, window 60000 ms)",
        wall.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_five_nodes_completes() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let cluster = Cluster::start_supervised(5, &v1).await;
    wait_all_on(&cluster, &h1).await;

    let started = std::time::Instant::now();
    let out = update(&cluster.addr(2), &v2, &["--json"]);
    let wall = started.elapsed();
    assert!(out.status.success(), "update failed: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("update --json");
    assert_eq!(json["outcome"]["outcome"], "completed", "{json}");
    wait_all_on(&cluster, &h2).await;
    let status = cluster.leader_status().await;
    assert_eq!(status.nodes.iter().filter(|n| n.role == "voter").count(), 5);
    println!(
        "5-node rollout: {} ms wall (stabilize 1000 ms per node: 5000 ms of configured waits)",
        wall.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_rollout_ends_completed_or_reverted() {
    kill_the_leader_mid_rollout(false).await;
}

/// After the hand-off: the old leader updates as a follower and the new leader (already
/// on the new build) is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_new_leader_while_the_old_one_updates_ends_completed_or_reverted() {
    kill_the_leader_mid_rollout(true).await;
}

/// The active deployment as any reachable node shows it.
fn active_rollout(cluster: &Cluster) -> Option<serde_json::Value> {
    cluster.addrs().iter().find_map(|addr| {
        let out = cli(&["rollout", "status", "--json", "--node", addr]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        json.is_object().then_some(json)
    })
}

/// Kills the leader once a node is past its restart (`after_handoff`: once the node that
/// led at the start is), brings it back, and checks the rollout ends on one build.
async fn kill_the_leader_mid_rollout(after_handoff: bool) {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let asked = (1..=3).find(|id| *id != leader).unwrap();

    let (addr, dist) = (cluster.addr(asked), v2.clone());
    // 5 s of stabilization: a window a loaded machine's polls do not miss.
    let update_thread = update_in_background(addr, dist, 5000, 20000);

    // In flight: some node (the first leader, after the hand-off) is past its restart.
    let first_leader = leader.to_string();
    let in_flight = wait_for(
        "a node in health or stabilize",
        Duration::from_secs(60),
        || async {
            let json = active_rollout(&cluster)?;
            let nodes = json["nodes"].as_object()?;
            nodes
                .iter()
                .filter(|(id, _)| !after_handoff || **id == first_leader)
                .find(|(_, step)| step["phase"] == "health" || step["phase"] == "stabilize")
                .map(|(id, step)| format!("node {id} in {}", step["phase"]))
        },
    )
    .await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let killed_at = std::time::Instant::now();
    cluster.kill(leader);
    println!("killed leader {leader} while {in_flight}");
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    cluster.wait_leader_other_than(leader).await;
    // The killed node comes back (its supervisor too): a 3-voter rollout needs it.
    cluster.spawn(leader, Start::Restart).await;

    let entry = wait_for(
        "the rollout to end after the leader was killed",
        Duration::from_secs(120),
        || async { only_history_entry(&cluster.addr(survivor)) },
    )
    .await;
    let ended_after = killed_at.elapsed();
    let outcome = entry["outcome"].as_str().unwrap().to_string();
    assert!(
        outcome == "completed" || outcome == "reverted",
        "the rollout ends completed or reverted: {entry}"
    );
    let status = cli(&[
        "rollout",
        "status",
        "--json",
        "--node",
        &cluster.addr(survivor),
    ]);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "null");
    let expected = if outcome == "completed" { &h2 } else { &h1 };
    wait_all_on(&cluster, expected).await;
    let out = update_thread.join().unwrap();
    println!(
        "leader killed mid-rollout: ended {outcome} {} ms after the kill; \
         the update command exited {:?}",
        ended_after.as_millis(),
        out.status.code()
    );
    match outcome.as_str() {
        "completed" => assert!(out.status.success(), "{}", text(&out)),
        _ => assert_eq!(out.status.code(), Some(1), "{}", text(&out)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_rollout_that_stays_down_ends_the_rollout() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    make_release(&v2, &[("share/motd", "two")]);
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let asked = (1..=3).find(|id| *id != leader).unwrap();

    let (addr, dist) = (cluster.addr(asked), v2.clone());
    let update_thread = update_in_background(addr, dist, 3000, 5000);
    wait_for("a node in stabilize", Duration::from_secs(60), || async {
        let out = cli(&[
            "rollout",
            "status",
            "--json",
            "--node",
            &cluster.addr(asked),
        ]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        json["nodes"]
            .as_object()?
            .values()
            .any(|step| step["phase"] == "stabilize")
            .then_some(())
    })
    .await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let killed_at = std::time::Instant::now();
    cluster.kill(leader);
    let survivor = (1..=3).find(|id| *id != leader).unwrap();
    let entry = wait_for(
        "the rollout to end with its leader gone for good",
        Duration::from_secs(120),
        || async { only_history_entry(&cluster.addr(survivor)) },
    )
    .await;
    let ended_after = killed_at.elapsed();
    let outcome = entry["outcome"].as_str().unwrap().to_string();
    let reason = entry["reason"].as_str().unwrap_or_default().to_string();
    // Restoring an updated voter while another is down would cost the quorum, so the
    // rollout may end `failed` with updated voters left on the new build; it must end,
    // and say which node it could not handle.
    assert!(
        outcome == "failed" || outcome == "reverted",
        "the rollout ends: {entry}"
    );
    if outcome == "failed" {
        assert!(
            reason.contains(&format!("node {leader} ")),
            "the reason names the dead node {leader}: {reason}"
        );
    }
    let status = cli(&[
        "rollout",
        "status",
        "--json",
        "--node",
        &cluster.addr(survivor),
    ]);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "null");
    // The two survivors keep a quorum and serve.
    wait_for(
        "the survivors to serve",
        Duration::from_secs(30),
        || async {
            let status = cluster.status().await?;
            let serving = status
                .nodes
                .iter()
                .filter(|n| n.id != leader && (n.state == "leader" || n.state == "follower"))
                .count();
            (serving == 2).then_some(())
        },
    )
    .await;
    let out = update_thread.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    println!(
        "leader {leader} killed for good mid-rollout: ended {outcome} {} ms after the kill \
         ({reason})",
        ended_after.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_while_a_node_fails_its_health_command() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    make_release(&v1, &[]);
    make_release(&v2, &[("share/new", "x")]);
    let cluster =
        Cluster::start_supervised_with(3, &v1, &["--health-command", "test ! -e sick"]).await;
    let sick = 2;
    std::fs::write(data_dir_of(&cluster, sick).join("sick"), "").unwrap();
    // The node reports its own failing check within a few periods.
    let shown = wait_for(
        "node 2 to report its failing check",
        Duration::from_secs(60),
        || async {
            let out = cli(&["status", "--local", "--node", &cluster.addr(sick)]);
            let shown = text(&out);
            shown
                .contains(&format!(
                    "node {sick} is unhealthy: the health command exited 1"
                ))
                .then_some(shown)
        },
    )
    .await;
    println!("{shown}");

    let out = update(&cluster.addr(1), &v2, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let shown = text(&out);
    assert!(
        shown.contains(&format!("node {sick}")) && shown.contains("unhealthy"),
        "preflight names the unhealthy node: {shown}"
    );
    let status = cli(&["rollout", "status", "--json", "--node", &cluster.addr(1)]);
    assert_eq!(String::from_utf8_lossy(&status.stdout).trim(), "null");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_update_is_followed_by_watch_whose_exit_status_says_how_it_ended() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2, bad) = (
        work.path().join("v1"),
        work.path().join("v2"),
        work.path().join("bad"),
    );
    let h1 = make_release(&v1, &[]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    make_script_release(&bad, "#!/bin/sh\nexit 1\n");
    let cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    let node = cluster.addr(1);

    // A dist that is not there is a usage error, before anything is asked of the cluster.
    let missing = work.path().join("nonexistent");
    let out = update(&node, &missing, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot read") && text(&out).contains("--help"),
        "{}",
        text(&out)
    );

    let out = update(&node, &v2, &["--detach"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("rollout 1 started"), "{}", text(&out));
    let out = cli(&[
        "rollout",
        "status",
        "--watch",
        "--timeout",
        "1ms",
        "--node",
        &node,
    ]);
    assert_eq!(out.status.code(), Some(124), "timed out: {}", text(&out));
    assert!(
        text(&out).contains("did not end within 1ms"),
        "{}",
        text(&out)
    );
    let out = cli(&["rollout", "status", "--watch", "--node", &node]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("completed"), "{}", text(&out));
    // Every phase of every node, however briefly it lasted, each on a line of its own.
    let said = text(&out);
    for id in 1..=3 {
        for phase in [
            "backup",
            "sync",
            "activate",
            "health",
            "stabilize",
            "committed",
        ] {
            let line = said.lines().any(|l| {
                l.contains(&format!("node {id} (")) && l.ends_with(&format!("): {phase}"))
            });
            assert!(line, "node {id} {phase} in: {said}");
        }
    }
    wait_all_on(&cluster, &h2).await;

    let out = update(&node, &bad, &["--detach"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = cli(&["rollout", "status", "--watch", "--json", "--node", &node]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed rollout: {}",
        text(&out)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["generation"], 2, "{json}");
    assert_eq!(json["outcome"], "reverted", "{json}");
    // Watching after the end reports the last rollout again.
    let out = cli(&["rollout", "status", "--watch", "--node", &node]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    wait_all_on(&cluster, &h2).await;

    // Ctrl-C on a following `cluster update` stops the client, not the rollout.
    let mut command = std::process::Command::new(crate::harness::BIN);
    let args = ["update", "--dist", v1.to_str().unwrap(), "--node", &node];
    command
        .args(args)
        .args(FAST)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    crate::harness::as_operator(&mut command, &args);
    let child = command.spawn().unwrap();
    wait_for("rollout 3 under way", Duration::from_secs(60), || async {
        let out = cli(&["rollout", "status", "--json", "--node", &node]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (json["generation"] == 3).then_some(())
    })
    .await;
    crate::harness::signal(child.id(), libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    // Whether the leader's answer had arrived or not, the client says what it left.
    let said = text(&out);
    assert!(
        said.contains("rollout 3 goes on") || said.contains("tells whether it began"),
        "{said}"
    );
    let out = cli(&["rollout", "status", "--watch", "--node", &node]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "it went on and completed: {}",
        text(&out)
    );
    wait_all_on(&cluster, &h1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_a_release_whose_binary_does_not_start_on_the_leader() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let h1 = make_release(&v1, &[]);
    let cluster = Cluster::start_supervised(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    // A binary for another machine, say: it cannot even print its version.
    let cases = [
        (
            "broken",
            "#!/bin/sh\nexit 126\n",
            "exited with exit status: 126",
        ),
        (
            "stranger",
            "#!/bin/sh\necho hello\n",
            "is bin/cluster a cluster binary",
        ),
        (
            "stale",
            "#!/bin/sh\necho 'cluster 0.1.0 (build 0123abcd, protocol 4)'\n",
            "says build 0123abcd",
        ),
    ];
    for (name, script, expected) in cases {
        let dist = work.path().join(name);
        std::fs::create_dir_all(dist.join("bin")).unwrap();
        std::fs::write(dist.join("bin/cluster"), script).unwrap();
        std::fs::set_permissions(
            dist.join("bin/cluster"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        crate::harness::stamp(&dist);
        let out = update(&cluster.addr(1), &dist, &[]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(
            text(&out).contains("does not start") && text(&out).contains(expected),
            "{name}: {}",
            text(&out)
        );
        let history = cli(&["rollout", "history", "--json", "--node", &cluster.addr(1)]);
        assert_eq!(
            String::from_utf8_lossy(&history.stdout).trim(),
            "[]",
            "{name}: nothing began"
        );
    }
    wait_all_on(&cluster, &h1).await;
}
