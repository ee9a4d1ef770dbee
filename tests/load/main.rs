//! A host whose CPUs are saturated (stress-ng): rollouts still complete at the default
//! staleness limit. A test binary of its own, so that its CPU hog never runs beside other
//! tests (cargo runs test binaries one after another).

#[path = "../it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::process::Command;

use harness::{cli, make_release, skip_outside_ci, Cluster};

/// `stress-ng` hogging every CPU for as long as it lives; killed on drop.
struct CpuHog(std::process::Child);

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_complete_with_every_cpu_saturated_at_the_default_staleness_limit() {
    if Command::new("stress-ng").arg("--version").output().is_err() {
        skip_outside_ci("stress-ng is not installed (apt-get install stress-ng)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    make_release(&v1, &[("share/motd", "one")]);
    let h2 = make_release(&v2, &[("share/motd", "two")]);
    let cluster = Cluster::start_supervised(3, &v1).await;
    cluster.wait_voters(3).await;
    // Twice as many busy workers as CPUs, for longer than the rollout takes.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hog = CpuHog(
        Command::new("stress-ng")
            .args([
                "--cpu",
                &(2 * cpus).to_string(),
                "--timeout",
                "600s",
                "--quiet",
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("stress-ng"),
    );
    // The default acknowledgement limit (2 x heartbeat): late acknowledgements happen
    // under this load, and only three failed checks in a row fail a node.
    let out = cli(&[
        "update",
        "--dist",
        v2.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
        "--stabilize-ms",
        "3000",
        "--soak-ms",
        "3000",
        "--health-deadline-ms",
        "60000",
        "--json",
    ]);
    drop(hog);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success() && json["outcome"]["outcome"] == "completed",
        "the rollout completes under load: {json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    harness::wait_all_on(&cluster, &h2).await;
}
