//! Crash points (feature `crash-points`, `src/crash.rs`): for every durable step of the
//! agent and the rollout, a rolling update in which one node aborts at that step, once,
//! as `kill -9` would; its supervisor starts it again. The node and the rollout must
//! recover: the rollout ends (completed or reverted, never stuck), every node runs the
//! release its `current` points at, that release verifies, every node is on one build,
//! and no acknowledged write is lost.
//!
//! `cargo test --features crash-points --test crash -- --nocapture` (in `.ci/run`).

#[path = "../it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::time::Duration;

use harness::{assert_all_readable, cli, make_release, wait_for, Cluster, Writer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_crashes_at_any_durable_step_recovers_and_so_does_the_rollout() {
    for point in cluster::crash::POINTS {
        // The leader's own step crashes the leader (node 1 bootstraps and leads); the
        // agent's and the store's crash the first follower to update.
        let node = if *point == "leader-proposed" { 1 } else { 2 };
        crash_at(point, node).await;
    }
}

async fn crash_at(point: &str, node: u64) {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let marker = work.path().join(format!("crashed-at-{point}"));
    let mut cluster = Cluster::new();
    cluster.supervised = Some(v1.clone());
    cluster.node_env.insert(
        node,
        vec![
            ("CLUSTER_CRASH_AT".into(), point.into()),
            ("CLUSTER_CRASH_MARKER".into(), marker.display().to_string()),
        ],
    );
    cluster.form(3).await;
    harness::wait_all_on(&cluster, &h1).await;
    let writer = Writer::start(cluster.addrs(), &format!("crash-{point}"));

    let update = harness::update_in_background(cluster.addr(3), v2.clone(), 1000, 20_000);
    let out = tokio::task::spawn_blocking(move || update.join().unwrap())
        .await
        .unwrap();
    assert!(
        marker.exists(),
        "node {node} crashed at {point}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let outcome = json["outcome"]["outcome"]
        .as_str()
        .unwrap_or("none")
        .to_string();
    // The update client may have been talking to the node that crashed: the history says
    // how the rollout ended.
    let ended = wait_for(
        &format!("the rollout to end after a crash at {point}"),
        Duration::from_secs(180),
        || async {
            let out = cli(&["rollout", "history", "--json", "--node", &cluster.addr(3)]);
            let history: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let last = history.as_array()?.last()?.clone();
            let active = cli(&["rollout", "status", "--json", "--node", &cluster.addr(3)]);
            (String::from_utf8_lossy(&active.stdout).trim() == "null").then_some(last)
        },
    )
    .await;
    let ended_as = ended["outcome"].as_str().unwrap().to_string();
    assert!(
        ended_as == "completed" || ended_as == "reverted",
        "crash at {point}: the rollout ends completed or reverted: {ended}"
    );
    let build = if ended_as == "completed" { &h2 } else { &h1 };
    harness::wait_all_on(&cluster, build).await;
    for id in 1..=3 {
        let current = harness::data_dir_of(&cluster, id).join("current");
        let target = std::fs::read_link(&current).unwrap();
        assert!(
            target.ends_with(build),
            "crash at {point}: node {id}'s current is {}",
            target.display()
        );
        let verify = cli(&["dist", "verify", current.to_str().unwrap()]);
        assert!(
            verify.status.success(),
            "crash at {point}: node {id}'s current verifies: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }
    let report = writer.stop().await;
    assert_all_readable(&cluster.addr(3), &report.acked).await;
    println!(
        "crash at {point} on node {node}: rollout {ended_as} (the client saw {outcome}), \
         {} writes acknowledged, none lost",
        report.acked.len()
    );
}

/// A chunk damaged on its way from the only peer that holds it (the fault point flips a
/// byte of the first chunk node 1 serves) is refused by the receiver, which asks again
/// and gets it intact: the sync succeeds, and what it wrote verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_damaged_in_flight_is_refused_and_fetched_again() {
    use cluster::agent::upload::{push, LocalDist};
    use cluster::release::Limits;

    let work = tempfile::tempdir().unwrap();
    let dist = work.path().join("v1");
    let hash = make_release(&dist, &[("share/motd", "fetched twice")]);
    let switch = work.path().join("corrupt-served");
    std::fs::write(&switch, "1").unwrap();
    let mut cluster = Cluster::new();
    cluster.node_env.insert(
        1,
        vec![(
            "CLUSTER_CORRUPT_SERVED".into(),
            switch.display().to_string(),
        )],
    );
    cluster.form(2).await;
    let local = std::sync::Arc::new(LocalDist::scan(&dist, &Limits::default()).unwrap());
    push(&mut harness::agent(&cluster.addr(1)), &local)
        .await
        .expect("upload to node 1");
    let synced = harness::agent(&cluster.addr(2))
        .prepare(&local.manifest, vec![cluster.addr(1)])
        .await
        .expect("node 2 syncs from node 1 although one chunk arrived damaged");
    assert_eq!(synced.hash, hash);
    assert_eq!(
        std::fs::read_to_string(&switch).unwrap(),
        "0",
        "node 1 damaged the one chunk it was asked to"
    );
    let held = harness::data_dir_of(&cluster, 2)
        .join("releases")
        .join(&hash);
    let out = cli(&["dist", "verify", held.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "the synced release verifies: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(&cluster.nodes[&2].log).unwrap();
    assert!(
        log.contains("a peer's chunk stream broke"),
        "node 2 saw the damaged chunk:\n{log}"
    );
}
