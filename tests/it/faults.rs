//! Faults a node meets on a real host, each pinned by a test of how the node survives it:
//! a full disk under the Raft log, a restart once the node it joined through has stopped
//! leading, a host whose CPUs are saturated.

use std::time::Duration;

use crate::harness::{
    cli, make_release, signal, skip_outside_ci, wait_for, Cluster, SmallDisk, Start,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_fills_up_exits_instead_of_answering_as_a_member() {
    let mut cluster = Cluster::new();
    cluster.spawn(1, Start::Bootstrap).await;
    let first = cluster.addr(1);
    cluster.spawn(2, Start::Join(&first)).await;
    // Node 3's data dir is a small filesystem of its own.
    let Some(disk) = SmallDisk::mount(&cluster.dir.path().join("n3"), "64m") else {
        skip_outside_ci("mounting a tmpfs needs root (mount -t tmpfs)");
        return;
    };
    cluster.spawn(3, Start::Join(&first)).await;
    cluster.wait_voters(3).await;

    disk.fill();
    // Writes reach node 3's log until its store cannot take them.
    let writer = {
        let mut client = cluster.client(1);
        tokio::spawn(async move {
            let value = "x".repeat(16 << 10);
            for i in 0u64.. {
                let _ = client.kv_put(&format!("fill-{i}"), &value).await;
            }
        })
    };
    let exited = cluster.wait_exit(3, Duration::from_secs(120)).await;
    writer.abort();
    let status =
        exited.unwrap_or_else(|| panic!("node 3 still runs with a full disk:\n{}", cluster.logs()));
    assert!(!status.success(), "node 3 exited non-zero: {status}");
    let log = std::fs::read_to_string(&cluster.nodes[&3].log).unwrap();
    assert!(log.contains("the Raft core stopped"), "{log}");

    // The other two keep a leader that takes writes.
    let put = cluster.client(1).kv_put("after", "full disk").await;
    assert!(put.is_ok(), "{put:?}");

    // Started again while the disk is still full (as a supervisor would), it refuses to
    // open its store, which a half-done write on open would damage for good.
    let refused =
        crate::harness::output_within(cluster.command(3, Start::Restart), Duration::from_secs(60));
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("not opening the Raft store") && said.contains("free space"),
        "{said}"
    );

    // With space again, the node starts and catches up from its log.
    disk.free();
    cluster.spawn(3, Start::Restart).await;
    cluster.wait_voters(3).await;
    // Unmounted first (the nodes may still hold it: lazily), then the cluster's dir goes.
    drop(disk);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_with_its_join_flag_rejoins_when_that_node_no_longer_leads() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    make_release(&v1, &[]);
    let mut cluster = Cluster::start_supervised(3, &v1).await;
    // Every node joined through node 1, and keeps `--join <node 1>` in its command line;
    // node 1 hands leadership to node 2.
    let out = cli(&["leader", "transfer", "2", "--node", &cluster.addr(1)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = cluster.leader_status().await;
    let boot = |status: &cluster::api::ClusterStatus| {
        let node = status.nodes.iter().find(|n| n.id == 3)?;
        (node.state == "follower").then(|| node.boot_id.clone())
    };
    let first_boot = boot(&before).expect("node 3 follows");

    // Node 3 crashes; its supervisor starts it again with the same flags.
    let pid = cluster.node_pid(3).expect("node 3's process");
    signal(pid, libc::SIGKILL);
    wait_for(
        "node 3 back as a follower after its restart",
        Duration::from_secs(60),
        || async {
            let status = cluster.status().await?;
            boot(&status).filter(|b| *b != first_boot)
        },
    )
    .await;
    let log = std::fs::read_to_string(&cluster.nodes[&3].log).unwrap();
    assert!(
        !log.contains("cannot join"),
        "a member does not join again: {log}"
    );
}
