//! Bad input and bad situations: a clear message, a non-zero exit, no panic, nothing changed.

use std::time::Duration;

use crate::harness::{cli, wait_for, Cluster, Start};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clean_failure(out: &std::process::Output, expected: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "exit 1 for {expected:?}: {err}");
    assert!(err.contains(expected), "expected {expected:?} in: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_named() {
    // A socket bound but never listening holds the port for the whole test (no other
    // process can take it, as one could a freed port), and connections to it are refused.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = reserved.local_addr().unwrap().to_string();
    let out = cli(&["status", "--node", &addr]);
    assert_clean_failure(&out, &format!("cannot reach node {addr}"));
    let out = cli(&["kv", "put", "k", "v", "--node", &addr]);
    assert_clean_failure(&out, "is it running?");
    drop(reserved);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_and_a_locked_data_dir_are_refused() {
    let cluster = Cluster::start(1).await;
    let busy_port = cluster.addr(1);
    let other_dir = cluster.dir.path().join("other");
    let out = cli(&[
        "node",
        "run",
        "--insecure",
        "--id",
        "9",
        "--listen",
        &busy_port,
        "--data-dir",
        other_dir.to_str().unwrap(),
        "--bootstrap",
    ]);
    assert_clean_failure(&out, &format!("cannot listen on {busy_port}"));

    let locked = cluster.nodes[&1].data_dir.to_str().unwrap().to_string();
    let out = cli(&[
        "node",
        "run",
        "--insecure",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &locked,
    ]);
    assert_clean_failure(&out, "locked by another process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_cannot_be_written_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a dir").unwrap();
    let out = cli(&[
        "node",
        "run",
        "--insecure",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        file.join("sub").to_str().unwrap(),
        "--bootstrap",
    ]);
    assert_clean_failure(&out, "is not usable");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"not a dir",
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_config_is_refused_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    for (text, expected) in [
        (
            "id = 1\nlisten = \"127.0.0.1:0\"\ndata_dir = 3\n",
            "malformed",
        ),
        ("id = 1\nlisen = \"127.0.0.1:0\"\n", "unknown field `lisen`"),
        ("id = 1\n", "--listen is required"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = cli(&["node", "run", "--config", config.to_str().unwrap()]);
        assert_clean_failure(&out, expected);
    }
    let out = cli(&["node", "run", "--config", "/nonexistent/node.toml"]);
    assert_clean_failure(&out, "cannot read config file /nonexistent/node.toml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_of_another_cluster_cannot_join() {
    let mut a = Cluster::start(1).await;
    // A second, separate cluster whose only node then tries to join the first.
    let mut b = Cluster::new();
    b.spawn(1, Start::Bootstrap).await;
    wait_for("cluster b to be named", Duration::from_secs(30), || async {
        let status = b.status().await?;
        (!status.cluster_id.is_empty()).then_some(())
    })
    .await;
    let b_dir = b.nodes[&1].data_dir.clone();
    assert!(b.terminate(1).success());
    let out = cli(&[
        "node",
        "run",
        "--tls",
        crate::harness::creds("n2").to_str().unwrap(),
        "--id",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        b_dir.to_str().unwrap(),
        "--join",
        &a.addr(1),
    ]);
    assert_clean_failure(&out, "already belongs to cluster");
    let status = a.status().await.unwrap();
    assert_eq!(status.nodes.len(), 1, "cluster a is unchanged: {status:?}");
    a.kill(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_help_explains() {
    let out = cli(&["node", "run", "--bootstrap", "--join", "x:1"]);
    assert_eq!(out.status.code(), Some(2));
    let help = cli(&["node", "run", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--bootstrap") && text.contains("TOML"),
        "{text}"
    );
    let help = cli(&["leader", "transfer", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("not caught up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_ends_a_command_quietly() {
    // `cluster status --json | head -0`: the pipe is closed before anything is written.
    let cluster = Cluster::start(1).await;
    let addr = cluster.addr(1);
    for args in [
        vec!["status", "--json", "--node", &addr],
        vec!["rollout", "history", "--node", &addr],
        vec!["member", "list", "--node", &addr],
    ] {
        let mut command = std::process::Command::new(crate::harness::BIN);
        command
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        crate::harness::as_operator(&mut command, &args);
        let mut child = command.spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} says nothing: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_results_and_errors_are_json_on_stdout() {
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = reserved.local_addr().unwrap().to_string();
    let json_of = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                stderr(out)
            )
        })
    };
    let out = cli(&["status", "--json", "--node", &dead]);
    assert_eq!(out.status.code(), Some(1));
    let error = json_of(&out);
    assert_eq!(error["error"]["kind"], "unavailable", "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains(&dead),
        "{error}"
    );

    let cluster = Cluster::start(1).await;
    let node = cluster.addr(1);
    let out = cli(&["kv", "put", "k", "v", "--json", "--node", &node]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(json_of(&out)["log_index"].as_u64().unwrap() > 0);
    let out = cli(&["kv", "get", "k", "--json", "--node", &node]);
    assert_eq!(json_of(&out)["value"], "v");
    let out = cli(&["kv", "get", "nothing", "--json", "--node", &node]);
    assert_eq!(out.status.code(), Some(1));
    assert!(json_of(&out)["value"].is_null());
    let out = cli(&["rollout", "auto", "off", "--json", "--node", &node]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(json_of(&out)["message"].is_string());
    let out = cli(&["rollout", "pause", "--json", "--node", &node]);
    assert_eq!(out.status.code(), Some(1), "nothing to pause");
    let error = json_of(&out);
    assert!(
        error["error"]["kind"].is_string() && error["error"]["message"].is_string(),
        "{error}"
    );
    drop(reserved);
}
