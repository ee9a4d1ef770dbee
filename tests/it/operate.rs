//! Operating rollouts with real supervised processes: automatic rollouts from a watched
//! directory (and not from a half-written one), `rollout auto off|on`, bringing a node
//! that was down or on another build to the target, pause/resume/abort across a leader
//! kill, and a soak failure that reverts the whole rollout.

use std::path::Path;
use std::time::Duration;

use crate::harness::{
    cli, data_dir_of, make_release, update_in_background, wait_for, Cluster, Start,
};

/// Pace of automatic rollouts in these tests (node flags). Acknowledgements may lag on a
/// loaded machine: these are not staleness tests.
const AUTO: [&str; 12] = [
    "--watch-settle-ms",
    "1000",
    "--auto-stabilize-ms",
    "500",
    "--auto-soak-ms",
    "0",
    "--auto-poll-interval-ms",
    "100",
    "--auto-health-deadline-ms",
    "20000",
    "--auto-stale-ack-ms",
    "2000",
];

/// `cluster status --json` from whichever node answers; `None` while none does.
fn status(cluster: &Cluster) -> Option<serde_json::Value> {
    cluster.addrs().iter().find_map(|addr| {
        let out = cli(&["status", "--json", "--node", addr]);
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        // Only a view with a leader tells the cluster's story.
        value["leader"].is_u64().then_some(value)
    })
}

fn history(cluster: &Cluster) -> Vec<serde_json::Value> {
    for addr in cluster.addrs() {
        let out = cli(&["rollout", "history", "--json", "--node", &addr]);
        if let Ok(serde_json::Value::Array(entries)) = serde_json::from_slice(&out.stdout) {
            return entries;
        }
    }
    panic!("no node answered rollout history")
}

/// Waits until `check` holds for a status view with a leader.
async fn wait_status(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, timeout, || {
        let found = status(cluster).filter(|s| check(s));
        async move { found }
    })
    .await
}

fn all_on(status: &serde_json::Value, hash: &str) -> bool {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["build_hash"] == hash && (n["state"] == "leader" || n["state"] == "follower"))
}

fn operate(cluster: &Cluster, args: &[&str]) -> String {
    let mut last = String::new();
    for addr in cluster.addrs() {
        let mut full = vec!["rollout"];
        full.extend(args);
        full.extend(["--node", &addr]);
        let out = cli(&full);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).to_string();
        }
        last = String::from_utf8_lossy(&out.stderr).to_string();
    }
    panic!("rollout {args:?} failed on every node: {last}")
}

/// Copies the tree at `from` into `to`, leaving out `skip` (a relative path).
fn copy_tree(from: &Path, to: &Path, skip: Option<&str>) {
    for entry in walkdir::WalkDir::new(from).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(from).unwrap();
        if Some(rel.to_str().unwrap()) == skip {
            continue;
        }
        let dest = to.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// Empties `dir` and fills it with the tree at `from` (an operator dropping a build in).
fn replace_tree(dir: &Path, from: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    copy_tree(from, dir, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_dropped_into_the_watched_directory_rolls_out_by_itself() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2, v3) = (
        work.path().join("v1"),
        work.path().join("v2"),
        work.path().join("v3"),
    );
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let h3 = make_release(&v3, &[("share/motd", "three")]);
    let watched = work.path().join("incoming");
    let mut flags = vec!["--watch-dist", watched.to_str().unwrap()];
    flags.extend(AUTO);
    let cluster = Cluster::start_supervised_with(3, &v1, &flags).await;
    wait_status(&cluster, "every node on v1", Duration::from_secs(60), |s| {
        all_on(s, &h1)
    })
    .await;

    // Half a build: version.json names v2, but a file is still missing. However long it
    // stays like that, nothing starts.
    std::fs::create_dir_all(&watched).unwrap();
    copy_tree(&v2, &watched, Some("share/motd"));
    let seen = wait_status(
        &cluster,
        "the leader to call the watched build incomplete",
        Duration::from_secs(30),
        |s| {
            s["rollout"]["auto"]["leader"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("not a complete build"))
        },
    )
    .await;
    assert!(seen["rollout"]["active"].is_null(), "{seen}");
    assert!(history(&cluster).is_empty(), "nothing started");

    // The rest of the build arrives: it rolls out with no command.
    copy_tree(&v2, &watched, None);
    let done = wait_status(
        &cluster,
        "every node on v2",
        Duration::from_secs(120),
        |s| all_on(s, &h2) && s["rollout"]["active"].is_null(),
    )
    .await;
    assert_eq!(done["rollout"]["active_hash"], h2.as_str(), "{done}");
    let entries = history(&cluster);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["outcome"], "completed");
    assert_eq!(entries[0]["started_by"], "automatic");
    assert!(
        entries[0]["trigger"]
            .as_str()
            .unwrap()
            .contains("watched directory"),
        "{}",
        entries[0]
    );

    // Switched off, a new build waits; switched on, it rolls out.
    let said = operate(&cluster, &["auto", "off"]);
    assert!(said.contains("off"), "{said}");
    replace_tree(&watched, &v3);
    let off = wait_status(
        &cluster,
        "automatic rollouts reported off",
        Duration::from_secs(30),
        |s| {
            s["rollout"]["auto"]["enabled"] == false
                && s["rollout"]["auto"]["leader"]["state"] == "off"
        },
    )
    .await;
    assert!(off["rollout"]["active"].is_null(), "{off}");
    assert_eq!(history(&cluster).len(), 1, "nothing started while off");
    operate(&cluster, &["auto", "on"]);
    wait_status(
        &cluster,
        "every node on v3",
        Duration::from_secs(120),
        |s| all_on(s, &h3) && s["rollout"]["active"].is_null(),
    )
    .await;
    assert_eq!(history(&cluster).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_were_down_or_on_another_build_are_brought_to_the_target() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let mut cluster = Cluster::start_supervised_with(3, &v1, &AUTO).await;
    wait_status(&cluster, "every node on v1", Duration::from_secs(60), |s| {
        all_on(s, &h1)
    })
    .await;
    let leader = status(&cluster).unwrap()["leader"].as_u64().unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();

    // A rollout with a long stabilization window; one follower goes down while the other
    // is being updated (10 s: it must still be stabilizing when the test has seen it and
    // stopped the other, or the rollout would already have moved on to that one).
    let addr = cluster.addr(leader);
    let update = update_in_background(addr, v2.clone(), 10_000, 30_000);
    let first = wait_status(
        &cluster,
        "a follower being updated",
        Duration::from_secs(60),
        |s| {
            s["rollout"]["active"]["phases"]
                .as_object()
                .is_some_and(|p| p.values().any(|v| v == "stabilize"))
        },
    )
    .await;
    let phases = first["rollout"]["active"]["phases"]
        .as_object()
        .unwrap()
        .clone();
    let updating: u64 = phases
        .iter()
        .find(|(_, v)| *v == "stabilize")
        .map(|(k, _)| k.parse().unwrap())
        .unwrap();
    let down = if updating == follower {
        other
    } else {
        follower
    };
    cluster.terminate(down);

    // The rollout does not start another voter while one is down: it waits, and says so.
    let waiting = wait_status(
        &cluster,
        "the rollout to wait for the down node",
        Duration::from_secs(60),
        |s| {
            s["rollout"]["active"]["waiting"]
                .as_str()
                .is_some_and(|w| w.contains(&format!("node {down}")))
        },
    )
    .await;
    assert_eq!(
        waiting["rollout"]["active"]["phases"][down.to_string()],
        "pending",
        "{waiting}"
    );

    // Back up, on its old build: the rollout goes on and brings it to the target.
    cluster.spawn(down, Start::Restart).await;
    let out = update.join().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(result["outcome"]["outcome"], "completed", "{result}");
    wait_status(&cluster, "every node on v2", Duration::from_secs(60), |s| {
        all_on(s, &h2)
    })
    .await;

    // A node put back on an older build (here: v1 reinstalled while it was stopped) is
    // brought to the cluster's target by the leader, with no command.
    let stale = follower;
    cluster.terminate(stale);
    let reinstall = cli(&[
        "dist",
        "install",
        v1.to_str().unwrap(),
        "--data-dir",
        data_dir_of(&cluster, stale).to_str().unwrap(),
    ]);
    assert!(reinstall.status.success());
    cluster.spawn(stale, Start::Restart).await;
    let entries = wait_for(
        "a second rollout, started by the leader, to finish",
        Duration::from_secs(120),
        || {
            let entries = history(&cluster);
            async move { (entries.len() == 2).then_some(entries) }
        },
    )
    .await;
    wait_status(
        &cluster,
        "the stale node back on v2",
        Duration::from_secs(60),
        |s| all_on(s, &h2) && s["rollout"]["active"].is_null(),
    )
    .await;
    let last = entries.last().unwrap();
    assert_eq!(last["started_by"], "automatic", "{entries:#?}");
    assert_eq!(last["outcome"], "completed", "{last}");
    assert!(
        last["trigger"].as_str().unwrap().contains("catch-up"),
        "{last}"
    );
    assert_eq!(
        last["order"].as_array().unwrap(),
        &vec![serde_json::json!(stale)],
        "only the stale node is updated: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_hold_across_a_leader_kill() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    make_release(&v2, &[("share/motd", "two")]);
    // Automatic rollouts off, so the abort below is not undone by a catch-up.
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    operate(&cluster, &["auto", "off"]);
    let leader = status(&cluster).unwrap()["leader"].as_u64().unwrap();
    let addr = cluster.addr(leader);
    // 10 s of stabilization: the pause must land while the first node still stabilizes,
    // however long a loaded machine takes to see it there and send the pause.
    let update = update_in_background(addr, v2, 10_000, 30_000);
    wait_status(
        &cluster,
        "a node in stabilize",
        Duration::from_secs(60),
        |s| {
            s["rollout"]["active"]["phases"]
                .as_object()
                .is_some_and(|p| p.values().any(|v| v == "stabilize"))
        },
    )
    .await;
    let said = operate(&cluster, &["pause"]);
    assert!(said.contains("paused"), "{said}");

    // The node in flight finishes its step; nothing else starts, even under a new leader.
    cluster.kill(leader);
    let paused = wait_status(
        &cluster,
        "a new leader, still paused, one node committed",
        Duration::from_secs(120),
        |s| {
            s["leader"].as_u64().is_some_and(|l| l != leader)
                && s["rollout"]["state"] == "paused"
                && s["rollout"]["active"]["phases"]
                    .as_object()
                    .is_some_and(|p| p.values().any(|v| v == "committed"))
        },
    )
    .await;
    // The node that finished its step while paused; every other node is still pending.
    let phases = paused["rollout"]["active"]["phases"]
        .as_object()
        .unwrap()
        .clone();
    let in_flight: Vec<String> = phases
        .iter()
        .filter(|(_, v)| *v != "pending")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        in_flight.len(),
        1,
        "only the node in flight moved: {paused}"
    );
    cluster.spawn(leader, Start::Restart).await;

    // Resumed, the next node starts; an abort with revert then restores every updated node.
    let resumed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    operate(&cluster, &["resume"]);
    wait_status(
        &cluster,
        "a second node under way",
        Duration::from_secs(60),
        |s| {
            s["rollout"]["state"] == "running"
                && s["rollout"]["active"]["phases"]
                    .as_object()
                    .is_some_and(|p| p.values().filter(|v| *v != "pending").count() >= 2)
        },
    )
    .await;
    let said = operate(&cluster, &["abort", "--revert"]);
    assert!(said.contains("aborted"), "{said}");
    let out = update.join().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    // `update` follows the rollout to its end (it may lose track during the leader kill).
    if !result.is_null() {
        assert_eq!(result["outcome"]["outcome"], "reverted", "{result}");
    }
    wait_status(
        &cluster,
        "every node back on v1",
        Duration::from_secs(90),
        |s| all_on(s, &h1) && s["rollout"]["active"].is_null(),
    )
    .await;
    let last = history(&cluster).pop().unwrap();
    assert_eq!(last["outcome"], "reverted", "{last}");
    assert_eq!(last["aborted"], true, "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("aborted by an operator"),
        "{last}"
    );
    // Nothing started while paused, under either leader: every other node's update began
    // after the resume (the leader's clock is this machine's).
    for (id, step) in last["nodes"].as_object().unwrap() {
        if in_flight.contains(id) {
            continue;
        }
        if let Some(started) = step["started_ms"].as_u64() {
            assert!(
                started >= resumed_at_ms,
                "node {id} started at {started}, before the resume at {resumed_at_ms}: {last}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failed_health_checks_during_the_soak_revert_the_rollout() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    // Each node's health check fails while a file named `sick` is in its data dir and it
    // runs release two.
    let mut cluster = Cluster::start_supervised_with(
        3,
        &v1,
        &[
            "--health-command",
            "test ! -e sick || grep -q one current/share/motd",
        ],
    )
    .await;
    operate(&cluster, &["auto", "off"]);
    let addr = cluster.addr(1);
    let v2_arg = v2.clone();
    let update = std::thread::spawn(move || {
        cli(&[
            "update",
            "--dist",
            v2_arg.to_str().unwrap(),
            "--node",
            &addr,
            "--stabilize-ms",
            "500",
            "--soak-ms",
            "60000",
            "--stale-ack-ms",
            "2000",
            "--poll-interval-ms",
            "100",
            "--health-deadline-ms",
            "30000",
            "--json",
        ])
    });
    let soaking = wait_status(
        &cluster,
        "the soak after the last commit",
        Duration::from_secs(90),
        |s| s["rollout"]["active"]["soaking"] == true,
    )
    .await;
    assert!(all_on(&soaking, &h2), "{soaking}");
    let sick = 2;
    std::fs::write(data_dir_of(&cluster, sick).join("sick"), "").unwrap();
    let out = update.join().unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(result["outcome"]["outcome"], "reverted", "{result}");
    let reason = result["outcome"]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("node {sick}")) && reason.contains("during the soak"),
        "{reason}"
    );
    std::fs::remove_file(data_dir_of(&cluster, sick).join("sick")).unwrap();
    let after = wait_status(
        &cluster,
        "every node back on v1",
        Duration::from_secs(90),
        |s| all_on(s, &h1),
    )
    .await;
    let rollback = &after["rollout"]["last_rollback"];
    assert!(
        rollback["reason"].as_str().unwrap().contains("soak"),
        "{after}"
    );
    assert_eq!(rollback["from_hash"], h2.as_str());
    // The human status says it too.
    let out = cli(&["status", "--node", &cluster.addr(3)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("last rollback: rollout 1"), "{text}");
    cluster.terminate(3);
}
