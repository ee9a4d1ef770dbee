//! Signed releases with real supervised processes: nodes that trust a release key roll out
//! a release signed with it, and refuse an unsigned one and one signed with another key
//! before anything changes on any node.

use std::path::{Path, PathBuf};

use crate::harness::{cli, make_release, wait_all_on, Cluster};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `cluster dist keygen <dir>`: the key id and the private and public key files.
fn keygen(dir: &Path) -> (String, PathBuf, PathBuf) {
    let out = cli(&["dist", "keygen", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "keygen: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        json["keyId"].as_str().unwrap().to_owned(),
        json["privateKey"].as_str().unwrap().into(),
        json["publicKey"].as_str().unwrap().into(),
    )
}

/// Re-stamps the dist at `dir` signed with `key`; returns its build hash.
fn sign(dir: &Path, key: &Path) -> String {
    let out = cli(&[
        "dist",
        "stamp",
        dir.to_str().unwrap(),
        "--sign",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stamp --sign: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `cluster update` with fast pacing (these are not timing tests).
fn update(node: &str, dist: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "update",
        "--dist",
        dist.to_str().unwrap(),
        "--node",
        node,
        "--stale-ack-ms",
        "2000",
        "--soak-ms",
        "0",
        "--poll-interval-ms",
        "100",
        "--health-deadline-ms",
        "20000",
        "--stabilize-ms",
        "1000",
    ];
    args.extend(extra);
    cli(&args)
}

/// What every node holds and runs: (held hashes, current, previous) per node.
fn releases_everywhere(cluster: &Cluster) -> Vec<serde_json::Value> {
    cluster
        .addrs()
        .iter()
        .map(|addr| {
            let out = cli(&["dist", "releases", "--json", "--node", addr]);
            assert!(out.status.success(), "releases: {}", text(&out));
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            serde_json::json!([json["hashes"], json["current"], json["previous"]])
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_trust_a_key_roll_out_only_releases_signed_with_it() {
    let work = tempfile::tempdir().unwrap();
    let (trusted_id, trusted_key, trusted_pub) = keygen(&work.path().join("trusted"));
    let (foreign_id, foreign_key, _) = keygen(&work.path().join("foreign"));
    assert_ne!(trusted_id, foreign_id);

    let v1 = work.path().join("v1");
    make_release(&v1, &[("share/motd", "one")]);
    let h1 = sign(&v1, &trusted_key);
    let unsigned = work.path().join("unsigned");
    make_release(&unsigned, &[("share/motd", "unsigned")]);
    let foreign = work.path().join("foreign-signed");
    make_release(&foreign, &[("share/motd", "foreign")]);
    sign(&foreign, &foreign_key);
    let v2 = work.path().join("v2");
    make_release(&v2, &[("share/motd", "two")]);
    let h2 = sign(&v2, &trusted_key);

    let cluster =
        Cluster::start_supervised_with(3, &v1, &["--release-key", trusted_pub.to_str().unwrap()])
            .await;
    wait_all_on(&cluster, &h1).await;
    let leader = cluster.leader_status().await.leader.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let before = releases_everywhere(&cluster);

    // Unsigned: the leader refuses the upload, so the update is refused as a preflight.
    let out = update(&cluster.addr(follower), &unsigned, &[]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains("is unsigned") && shown.contains(&trusted_id),
        "names the trusted key and says unsigned: {shown}"
    );
    assert!(shown.contains("nothing was changed"), "{shown}");

    // Signed by a key the nodes do not trust: refused naming that key, as a real update
    // and in the leader's preflight (a dry run uploads nothing).
    let out = update(&cluster.addr(follower), &foreign, &[]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.contains(&format!("signed by key {foreign_id}")) && shown.contains(&trusted_id),
        "{shown}"
    );
    let out = update(&cluster.addr(follower), &foreign, &["--dry-run"]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(
        shown.lines().any(|line| line.contains("FAIL")
            && line.contains("dist")
            && line.contains(&foreign_id)),
        "a failed dist check naming the key: {shown}"
    );

    // Straight to a node's agent: refused too.
    let out = cli(&[
        "dist",
        "push",
        unsigned.to_str().unwrap(),
        "--node",
        &cluster.addr(follower),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is unsigned"), "{}", text(&out));

    // Nothing changed anywhere: every node holds and runs what it did, no rollout began.
    assert_eq!(releases_everywhere(&cluster), before);
    let status = cluster.leader_status().await;
    assert!(
        status.nodes.iter().all(|n| n.build_hash == h1),
        "{status:?}"
    );
    let addr = cluster.addr(leader);
    let rollout = cli(&["rollout", "status", "--json", "--node", &addr]);
    assert_eq!(String::from_utf8_lossy(&rollout.stdout).trim(), "null");
    let history = cli(&["rollout", "history", "--json", "--node", &addr]);
    assert_eq!(String::from_utf8_lossy(&history.stdout).trim(), "[]");

    // Signed with the trusted key: rolled out to every node, signature and all.
    let out = update(&cluster.addr(follower), &v2, &["--json"]);
    assert!(out.status.success(), "signed update: {}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["outcome"]["outcome"], "completed", "{json}");
    wait_all_on(&cluster, &h2).await;
    for node in cluster.nodes.values() {
        let version = std::fs::read_to_string(node.data_dir.join("current/version.json")).unwrap();
        let version: serde_json::Value = serde_json::from_str(&version).unwrap();
        assert_eq!(version["buildHash"], h2.as_str());
        assert_eq!(
            version["signature"]["keyId"],
            trusted_id.as_str(),
            "node {}: {version}",
            node.id
        );
    }
}
