//! The operator's own tools around the CLI: shell completion, manual pages.

use std::time::Duration;

use crate::harness::{cli, BIN};

#[test]
fn bash_completes_subcommands_and_flags() {
    let script = cli(&["completions", "bash"]);
    assert!(script.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    // What bash does on `cluster rollout st<TAB>` and `cluster update --dr<TAB>`.
    let complete = |words: &[&str]| {
        let line = words.join(" ");
        let program = format!(
            "source {}; COMP_WORDS=({line}); COMP_CWORD={}; COMP_LINE='{line}'; \
             COMP_POINT={}; _cluster cluster {} {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path.display(),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(complete(&["cluster", "rollout", "st"]).trim(), "status");
    assert!(complete(&["cluster", "update", "--dr"]).contains("--dry-run"));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = cli(&["completions", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}");
    }
    let out = cli(&["completions", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn the_manual_has_a_page_for_every_command_that_man_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "cluster.1",
        "cluster-update.1",
        "cluster-rollout-status.1",
        "cluster-node-run.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page}");
    }
    // man(1) itself renders the page, with the text `--help` shows.
    let Ok(rendered) = std::process::Command::new("man")
        .arg("-l")
        .arg(dir.path().join("cluster-update.1"))
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
    else {
        return crate::harness::skip_outside_ci("man(1) is not installed: apt-get install man-db");
    };
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    assert!(
        text.contains("--dry-run") && text.contains("without losing quorum"),
        "{text}"
    );
    // And the top page on stdout is the same as cluster.1.
    let top = std::process::Command::new(BIN).arg("man").output().unwrap();
    assert_eq!(
        top.stdout,
        std::fs::read(dir.path().join("cluster.1")).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_node_and_the_rollout_generation_on_every_line() {
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = crate::harness::make_release(&v1, &[]);
    crate::harness::make_release(&v2, &[("share/motd", "two")]);
    let cluster =
        crate::harness::Cluster::start_supervised_with(3, &v1, &["--log-format", "json"]).await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    let out = crate::harness::update_in_background(cluster.addr(1), v2, 500, 30_000)
        .join()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut finished = Vec::new();
    for node in cluster.nodes.values() {
        let log = std::fs::read_to_string(&node.log).unwrap();
        // The supervisor writes text; everything the node writes is JSON.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("cluster::supervise"))
            .collect();
        assert!(lines.len() > 5, "node {}: {log}", node.id);
        for line in lines {
            let json: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("node {}: not JSON ({e}): {line}", node.id));
            assert_eq!(json["node"], node.id, "{line}");
            assert!(
                json["level"].is_string() && json["target"].is_string(),
                "{line}"
            );
            if json["message"] == "rollout finished" {
                assert_eq!(json["generation"], 1, "{line}");
                assert_eq!(json["outcome"], "completed", "{line}");
                finished.push(node.id);
            }
        }
    }
    assert_eq!(
        finished.len(),
        1,
        "one leader finished the rollout: {finished:?}"
    );
}

/// `tests/clients/grpc_health_check.py`: what the PyPI health client hears from `addr`.
fn grpc_health(addr: &str, creds: &str, service: &str) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/grpc_health_check.py"
    );
    let out = std::process::Command::new("python3")
        .args([script, addr, creds, service])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_grpc_health_service_serves_only_a_member_with_a_leader() {
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import grpc_health.v1.health_pb2"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        return crate::harness::skip_outside_ci(
            "the PyPI gRPC health client is missing: pip install grpcio-health-checking",
        );
    }
    let viewer = crate::harness::creds("viewer");
    let viewer = viewer.to_str().unwrap();
    // A sole voter is its own quorum.
    let single = crate::harness::Cluster::start(1).await;
    let addr = single.addr(1);
    crate::harness::wait_for("a sole voter SERVING", Duration::from_secs(30), || async {
        (grpc_health(&addr, viewer, "") == "SERVING").then_some(())
    })
    .await;
    drop(single);

    let mut cluster = crate::harness::Cluster::start(3).await;
    for id in 1..=3 {
        let addr = cluster.addr(id);
        crate::harness::wait_for("SERVING", Duration::from_secs(30), || async {
            (grpc_health(&addr, viewer, "") == "SERVING").then_some(())
        })
        .await;
        assert_eq!(grpc_health(&addr, viewer, "cluster.v1.Control"), "SERVING");
        assert_eq!(
            grpc_health(&addr, viewer, "no.such.Service"),
            "ERROR NOT_FOUND"
        );
    }
    // Nobody without a certificate of the cluster CA is answered at all.
    let addr = cluster.addr(3);
    assert_eq!(grpc_health(&addr, "-", ""), "ERROR UNAVAILABLE");
    let stranger = crate::harness::creds("stranger");
    assert_eq!(
        grpc_health(&addr, stranger.to_str().unwrap(), ""),
        "ERROR UNAVAILABLE"
    );

    // Node 3 alone has no leader: not serving, until the others are back.
    cluster.kill(1);
    cluster.kill(2);
    crate::harness::wait_for("NOT_SERVING", Duration::from_secs(30), || async {
        (grpc_health(&addr, viewer, "") == "NOT_SERVING").then_some(())
    })
    .await;
    assert_eq!(
        grpc_health(&addr, viewer, "cluster.v1.Control"),
        "NOT_SERVING"
    );
    cluster.spawn(1, crate::harness::Start::Restart).await;
    cluster.spawn(2, crate::harness::Start::Restart).await;
    crate::harness::wait_for("SERVING again", Duration::from_secs(60), || async {
        (grpc_health(&addr, viewer, "") == "SERVING").then_some(())
    })
    .await;
}
