//! The boot guard under `cluster supervise` with no leader anywhere: a release that exits
//! at once, and one that crash-loops after starting, are undone by the node's own guard;
//! the cluster then shows the automatic restore. And a node with no supervisor restarts
//! into a new release by re-executing itself.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{
    cli, data_dir_of, make_crash_loop_release, make_release, make_script_release, wait_all_on,
    wait_for, Cluster, Start, BIN,
};

/// A `cluster update` running in the background, killed when dropped.
struct Background(Child);

impl Background {
    fn update(node: &str, dist: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let mut command = Command::new(BIN);
        crate::harness::as_operator(&mut command, &[]);
        let child = command
            .args(["update", "--dist", dist.to_str().unwrap(), "--node", node])
            // Long waits: the leader must not act on the node again before it is killed,
            // and a crash-looping release must not pass stabilization between crashes.
            .args(["--health-deadline-ms", "120000", "--stabilize-ms", "30000"])
            // Not a staleness test: a loaded machine must not refuse it.
            .args(["--stale-ack-ms", "2000"])
            .args(["--soak-ms", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cluster update");
        Self(child)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process ids of `pid`'s children.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn current_of(data_dir: &Path) -> Option<String> {
    let target = std::fs::read_link(data_dir.join("current")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Rolls `bad` out on a supervised 3-node cluster on `good`; the moment the first node
/// has armed its guard for `bad`, kills the leader and the third node, so the updated
/// node is alone: no leader can exist while its guard works. Then checks it is back on
/// `good` by itself, brings the others back, and checks the cluster shows the restore.
async fn restored_with_no_leader(good: &Path, bad: &Path, bad_hash: &str, work: &Path) {
    let good_hash = crate::harness::make_release(good, &[]);
    let hook = crate::harness::Webhook::start(0).await;
    let mut cluster = Cluster::start_supervised_with(3, good, &["--notify-url", &hook.url]).await;
    wait_all_on(&cluster, &good_hash).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let _update = Background::update(&cluster.addr(leader), bad, &work.join("update.log"));

    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let updated = wait_for(
        "a follower to activate the bad release",
        Duration::from_secs(60),
        || {
            let armed = others.iter().copied().find(|id| {
                let data = data_dir_of(&cluster, *id);
                data.join("boot.json").exists() && current_of(data).as_deref() == Some(bad_hash)
            });
            async move { armed }
        },
    )
    .await;
    let bystander = others.into_iter().find(|id| *id != updated).unwrap();
    cluster.kill(leader);
    cluster.kill(bystander);
    let started = std::time::Instant::now();
    // The leader may have died before it told the node to restart: the node then crashes
    // (its host reboots, say) with the new release active. Its supervisor starts it again.
    let supervisor = cluster
        .pid(updated)
        .expect("the updated node's supervisor runs");
    for child in children_of(supervisor) {
        crate::harness::signal(child, libc::SIGKILL);
    }

    // Alone, node `updated` can elect no leader: whatever happens now is its guard's doing.
    let data = data_dir_of(&cluster, updated).to_path_buf();
    wait_for(
        "the boot guard to restore the good release",
        Duration::from_secs(90),
        || {
            let restored = data.join("boot-restored.json").exists()
                && current_of(&data).as_deref() == Some(good_hash.as_str())
                && !data.join("boot.json").exists();
            async move { restored.then_some(()) }
        },
    )
    .await;
    let took = started.elapsed();
    wait_for(
        "the restored node to serve on the good release",
        Duration::from_secs(30),
        || async {
            let out = cli(&[
                "status",
                "--local",
                "--json",
                "--node",
                &cluster.addr(updated),
            ]);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let me = json["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == updated)?
                .clone();
            (me["build_hash"] == good_hash.as_str()).then_some(())
        },
    )
    .await;
    assert_eq!(
        (cluster.pid(leader), cluster.pid(bystander)),
        (None, None),
        "the other nodes stayed down"
    );
    println!(
        "boot guard: node {updated} back on the good release {} ms after the leader died",
        took.as_millis()
    );

    cluster.spawn(leader, Start::Restart).await;
    cluster.spawn(bystander, Start::Restart).await;
    cluster.wait_voters(3).await;
    let status = wait_for(
        "the cluster to show the automatic restore",
        Duration::from_secs(30),
        || async {
            let out = cli(&["status", "--json", "--node", &cluster.addr(updated)]);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let node = json["nodes"]
                .as_array()?
                .iter()
                .find(|n| n["id"] == updated)?
                .clone();
            (node["build_hash"] == good_hash.as_str()
                && node["role"] == "voter"
                && (node["state"] == "leader" || node["state"] == "follower")
                && node["last_auto_restore"].is_object())
            .then_some(node)
        },
    )
    .await;
    let restore = &status["last_auto_restore"];
    assert_eq!(restore["from"], good_hash.as_str(), "{status}");
    assert_eq!(restore["to"], bad_hash, "{status}");
    assert!(
        restore["reason"]
            .as_str()
            .unwrap()
            .contains("did not stay up for 3 starts"),
        "{status}"
    );
    assert_eq!(status["supervision"], "supervise", "{status}");
    // Whoever leads once the node reports its restore tells the webhook.
    let told = wait_for(
        "the auto_restore notification",
        Duration::from_secs(30),
        || async {
            hook.events()
                .into_iter()
                .find(|e| e["event"] == "auto_restore" && e["node"] == updated)
        },
    )
    .await;
    assert_eq!(told["target_hash"], bad_hash, "{told}");
    assert_eq!(told["previous_hash"], good_hash.as_str(), "{told}");
    let human = cli(&["status", "--node", &cluster.addr(updated)]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains(&format!(
            "node {updated} restored itself from {} to {}",
            &bad_hash[..12],
            &good_hash[..12]
        )),
        "{human}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_exits_at_once_is_undone_by_the_guard_with_no_leader() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad");
    let bad_hash = make_script_release(
        &bad,
        "#!/bin/sh\necho 'this release cannot start' >&2\nexit 1\n",
    );
    restored_with_no_leader(&work.path().join("good"), &bad, &bad_hash, work.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_crash_loops_after_starting_is_undone_by_the_guard_with_no_leader() {
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("bad");
    // The real node, killed once it serves on each start: it serves, then dies, again
    // and again.
    let bad_hash = make_crash_loop_release(&bad, "KILL", None);
    restored_with_no_leader(&work.path().join("good"), &bad, &bad_hash, work.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_no_supervisor_re_executes_itself_into_the_new_release() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let mut cluster = Cluster::start_unsupervised_on(3, &v1).await;
    wait_all_on(&cluster, &h1).await;
    let pids: Vec<Option<u32>> = (1..=3).map(|id| cluster.pid(id)).collect();
    let out = cli(&[
        "update",
        "--dist",
        v2.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
        "--stabilize-ms",
        "1000",
        "--soak-ms",
        "0",
        "--poll-interval-ms",
        "100",
        // Not a staleness test: a loaded machine must not fail it.
        "--stale-ack-ms",
        "2000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "update: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_all_on(&cluster, &h2).await;
    // Same processes: each node replaced its own image, nobody started a new one.
    let after: Vec<Option<u32>> = (1..=3).map(|id| cluster.pid(id)).collect();
    assert_eq!(after, pids, "every node kept its process id");
    let status = cli(&["status", "--json", "--node", &cluster.addr(2)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["supervision"], "none", "{node}");
    }
    let log = std::fs::read_to_string(&cluster.nodes[&1].log).unwrap();
    assert!(log.contains("re-executing"), "{log}");
}
