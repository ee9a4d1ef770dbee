//! Releases between real nodes: upload, delta sync from a peer, and untrusted manifests.

use std::path::Path;
use std::sync::Arc;

use cluster::agent::upload::{push, LocalDist};
use cluster::api::ErrorKind;
use cluster::release::{EntryKind, Limits};

use crate::harness::{cli, Cluster};

/// Deterministic pseudo-random bytes (xorshift*, high bits: the low bits of plain xorshift
/// are too regular for content-defined chunking to find cut points).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A dist of a 4 MiB `bin/cluster` and 40 small files.
fn make_dist(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("share")).unwrap();
    let binary = dir.join("bin/cluster");
    std::fs::write(&binary, noise(4 << 20, 7)).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    for i in 0..40 {
        std::fs::write(dir.join(format!("share/file-{i}.txt")), noise(3000, i)).unwrap();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_syncs_between_nodes_moving_only_missing_chunks() {
    let cluster = Cluster::start(2).await;
    let work = cluster.dir.path().join("dists");
    let v1 = work.join("v1");
    make_dist(&v1);
    let v2 = work.join("v2");
    copy_tree(&v1, &v2);
    // v2: 1 KiB overwritten in the middle of the binary, and one small file rewritten.
    let mut binary = std::fs::read(v2.join("bin/cluster")).unwrap();
    let middle = binary.len() / 2;
    binary[middle..middle + 1024].copy_from_slice(&noise(1024, 99));
    std::fs::write(v2.join("bin/cluster"), binary).unwrap();
    std::fs::write(v2.join("share/file-3.txt"), noise(3000, 1234)).unwrap();

    let limits = Limits::default();
    let local_v1 = Arc::new(LocalDist::scan(&v1, &limits).unwrap());
    let local_v2 = Arc::new(LocalDist::scan(&v2, &limits).unwrap());
    let total_v2 = local_v2.manifest.total_bytes();
    let mut node1 = crate::harness::agent(&cluster.addr(1));
    let mut node2 = crate::harness::agent(&cluster.addr(2));

    let first = push(&mut node1, &local_v1).await.expect("upload v1");
    assert_eq!(first.hash, local_v1.manifest.build_hash());
    let again = push(&mut node1, &local_v1).await.expect("upload v1 again");
    assert_eq!(
        again.fetched_bytes, 0,
        "an upload of a held release sends nothing"
    );

    let synced_v1 = node2
        .prepare(&local_v1.manifest, vec![cluster.addr(1)])
        .await
        .expect("node 2 syncs v1 from node 1");
    assert_eq!(synced_v1.hash, first.hash);
    assert!(synced_v1.fetched_bytes > 0);

    let up_v2 = push(&mut node1, &local_v2).await.expect("upload v2");
    // What node 2 lacks of v2, asked with the manifest whole or as a delta against v1.
    let v2_hash = local_v2.manifest.build_hash();
    let delta = local_v2.manifest.delta_from(&local_v1.manifest);
    let whole_missing = node2.missing(&local_v2.manifest).await.unwrap();
    assert!(whole_missing.1 > 0);
    assert_eq!(
        node2
            .missing_by_delta(&v2_hash, &first.hash, &delta)
            .await
            .unwrap(),
        whole_missing
    );
    let err = node2
        .missing_by_delta(&first.hash, &first.hash, &delta)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    assert!(err.message.contains("does not rebuild"), "{err}");
    // By build hash alone: node 2 fetches the manifest itself, as a delta against v1.
    assert!(node2.releases().await.unwrap().fetches_manifests);
    let whole = serde_json::to_vec(&local_v2.manifest).unwrap().len() as u64;
    let synced_v2 = node2
        .prepare_release(&local_v2.manifest.build_hash(), vec![cluster.addr(1)])
        .await
        .expect("node 2 syncs v2 from node 1");
    assert!(
        synced_v2.manifest_bytes > 0 && synced_v2.manifest_bytes * 2 < whole,
        "the manifest came as a delta: {} of {whole} bytes",
        synced_v2.manifest_bytes
    );
    println!(
        "delta sync of a {} KiB release (1 KiB changed in a 4 MiB binary, one 3 KB file rewritten): \
         upload {} bytes, node-to-node {} bytes in {} chunks, {} ms",
        total_v2 / 1024,
        up_v2.fetched_bytes,
        synced_v2.fetched_bytes,
        synced_v2.fetched_chunks,
        synced_v2.elapsed_ms
    );
    assert_eq!(synced_v2.hash, local_v2.manifest.build_hash());
    assert!(
        synced_v2.fetched_bytes * 10 < total_v2,
        "only missing chunks cross the network: {} of {total_v2} bytes",
        synced_v2.fetched_bytes
    );
    assert_eq!(up_v2.fetched_bytes, synced_v2.fetched_bytes);

    let held = node2.releases().await.unwrap();
    assert!(held.hashes.contains(&first.hash) && held.hashes.contains(&synced_v2.hash));

    // A build hash no peer holds: refused after asking, and nothing changes.
    let tree_before = tree(&cluster.nodes[&2].data_dir);
    let err = node2
        .prepare_release(&"ab".repeat(32), vec![cluster.addr(1)])
        .await
        .unwrap_err();
    assert!(err.message.contains("no manifest could be had"), "{err}");
    assert_eq!(tree(&cluster.nodes[&2].data_dir), tree_before);
    assert_eq!(node2.releases().await.unwrap().hashes, held.hashes);
    // Something that is no build hash at all: refused at once, naming the format.
    let err = node2
        .prepare_release("../../etc", vec![cluster.addr(1)])
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    assert!(err.message.contains("is not a build hash"), "{err}");
    // The materialized release verifies on disk like any stamped dist.
    let on_disk = cluster.nodes[&2]
        .data_dir
        .join("releases")
        .join(&synced_v2.hash);
    let verify = cli(&["dist", "verify", on_disk.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_manifest_is_refused_and_changes_nothing() {
    let cluster = Cluster::start(1).await;
    let dist = cluster.dir.path().join("d");
    make_dist(&dist);
    let mut manifest = LocalDist::scan(&dist, &Limits::default()).unwrap().manifest;
    let mut node = crate::harness::agent(&cluster.addr(1));
    let before = node.releases().await.unwrap();
    let tree_before = tree(&cluster.nodes[&1].data_dir);

    // A path that climbs out of the release dir.
    let victim = manifest
        .entries
        .iter_mut()
        .find(|e| matches!(e.kind, EntryKind::File { .. }) && e.path.starts_with("share/"))
        .unwrap();
    victim.path = "share/../../escape.txt".into();
    let err = node.prepare(&manifest, vec![]).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument, "{err}");
    assert!(err.message.contains(".."), "{err}");

    let after = node.releases().await.unwrap();
    assert_eq!(
        (after.hashes, after.current, after.previous),
        (before.hashes, before.current, before.previous)
    );
    assert_eq!(
        tree(&cluster.nodes[&1].data_dir),
        tree_before,
        "nothing changed on disk"
    );
}

/// Every path under `<data>` except the Raft store (which changes on its own).
fn tree(data: &Path) -> Vec<String> {
    let mut paths: Vec<String> = walkdir::WalkDir::new(data)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.path().strip_prefix(data).unwrap().display().to_string())
        .filter(|p| !p.starts_with("raft"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn version_names_the_build_a_binary_runs_from() {
    let out = cli(&["--version"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && said.contains("(build dev, protocol "),
        "{said}"
    );

    let dir = tempfile::tempdir().unwrap();
    let hash = crate::harness::make_release(dir.path(), &[]);
    let out = std::process::Command::new(dir.path().join("bin/cluster"))
        .arg("--version")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && said.contains(&format!("(build {hash}, protocol ")),
        "{said}"
    );
}

/// The signature is outside the build hash, so peers can hold one release signed and
/// unsigned: a node that trusts a key passes over a peer whose copy lacks the signature
/// and takes the manifest from one that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_trusts_a_key_passes_over_a_peers_unsigned_copy() {
    let keys = tempfile::tempdir().unwrap();
    let out = cli(&["dist", "keygen", keys.path().to_str().unwrap(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (private, public) = (
        key["privateKey"].as_str().unwrap().to_owned(),
        key["publicKey"].as_str().unwrap().to_owned(),
    );
    let mut cluster = Cluster::new();
    cluster
        .node_flags
        .insert(3, vec!["--release-key".into(), public]);
    cluster.form(3).await;

    let dist = cluster.dir.path().join("dist");
    make_dist(&dist);
    let limits = Limits::default();
    let unsigned = LocalDist::scan(&dist, &limits).unwrap();
    let out = cli(&["dist", "stamp", dist.to_str().unwrap(), "--sign", &private]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signed = LocalDist::scan(&dist, &limits).unwrap();
    let hash = signed.manifest.build_hash();
    assert_eq!(unsigned.manifest.build_hash(), hash);
    assert!(unsigned.manifest.signature.is_none() && signed.manifest.signature.is_some());
    // Nodes 1 and 2 trust no key: node 1 keeps the release unsigned, node 2 signed.
    push(
        &mut crate::harness::agent(&cluster.addr(1)),
        &Arc::new(unsigned),
    )
    .await
    .unwrap();
    push(
        &mut crate::harness::agent(&cluster.addr(2)),
        &Arc::new(signed),
    )
    .await
    .unwrap();

    let mut node3 = crate::harness::agent(&cluster.addr(3));
    let err = node3
        .prepare_release(&hash, vec![cluster.addr(1)])
        .await
        .unwrap_err();
    assert!(err.message.contains("signed"), "{err}");
    assert!(node3.releases().await.unwrap().hashes.is_empty());
    let outcome = node3
        .prepare_release(&hash, vec![cluster.addr(1), cluster.addr(2)])
        .await
        .expect("node 3 takes node 2's signed manifest");
    assert_eq!(outcome.hash, hash);
}
