//! Progressive delivery. Metric gates (`cluster update --analysis`) against a real
//! Prometheus server (Debian's package) scraping the sample service on three nodes under
//! load: a release that fails 5% of its requests is stopped by the error-rate gate and
//! reverted, one that answers slowly by the p99 gate; a good release passes both gates to
//! completion; a canary step holds under its gates until promoted. And a rollout stuck
//! behind a node that never becomes healthy, stopped by its progress deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{cli, Cluster};
use crate::services::{get, service_release, three_serving, wait_services_on};
use crate::tools::{have_prometheus, Prometheus};

/// The error-rate gate as an operator writes it (over a short window: the test's
/// rollout is minutes long, not hours).
fn error_gate(prometheus: &str) -> String {
    format!(
        "name=errors,prometheus=http://{prometheus},max=0.001,interval=1s,failure-limit=2,\
         query=sum(rate(http_requests_total{{path=\"/\",status=~\"5..\"}}[5s])) \
         / sum(rate(http_requests_total{{path=\"/\"}}[5s]))"
    )
}

/// The p99 latency gate: the slowest instance's 99th percentile, in seconds.
fn p99_gate(prometheus: &str) -> String {
    format!(
        "name=p99,prometheus=http://{prometheus},max=0.5,interval=1s,failure-limit=2,\
         query=max(histogram_quantile(0.99, rate(http_request_duration_seconds_bucket[5s])))"
    )
}

/// Requests to `/` on every ingress until stopped; remembers when it first saw a 500,
/// and when a request first stayed unanswered past the p99 gate's 0.5 s.
struct Load {
    stop: Arc<AtomicBool>,
    first_error_ms: Arc<AtomicU64>,
    first_slow_ms: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<(u64, u64)>>,
}

impl Load {
    fn start(ingresses: &[String]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let first_error_ms = Arc::new(AtomicU64::new(0));
        let first_slow_ms = Arc::new(AtomicU64::new(0));
        let threads = ingresses
            .iter()
            .map(|addr| {
                let (addr, stop, first) = (addr.clone(), stop.clone(), first_error_ms.clone());
                let first_slow = first_slow_ms.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0, 0);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = cluster::clock::unix_ms();
                        let answer = get(&addr, "/");
                        if cluster::clock::unix_ms() - sent > 500 {
                            let _ = first_slow.compare_exchange(
                                0,
                                sent + 500,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            );
                        }
                        match answer {
                            Ok((200, _)) => ok += 1,
                            Ok((500, _)) => {
                                failed += 1;
                                let now = cluster::clock::unix_ms();
                                let _ = first.compare_exchange(
                                    0,
                                    now,
                                    Ordering::SeqCst,
                                    Ordering::SeqCst,
                                );
                            }
                            other => {
                                if failed < 3 {
                                    eprintln!("load on {addr}: {other:?}");
                                }
                                failed += 1;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load {
            stop,
            first_error_ms,
            first_slow_ms,
            threads,
        }
    }

    /// Requests answered 200, and the others.
    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }
}

/// `cluster update` of `dist` through `addr` with no soak and a tolerant staleness limit,
/// plus `extra` flags; the history entry the rollout ended as.
pub(crate) fn update_with(addr: &str, dist: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "update",
        "--dist",
        dist.to_str().unwrap(),
        "--node",
        addr,
        "--soak",
        "0",
        "--stale-ack",
        "2s",
        "--json",
    ];
    args.extend(extra);
    let out = cli(&args);
    let history = cli(&["rollout", "history", "--json", "--node", addr]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let last = history.as_array().unwrap().last().cloned().unwrap();
    println!(
        "update exit {:?}; rollout {} {}: {}",
        out.status.code(),
        last["generation"],
        last["outcome"],
        last["reason"]
    );
    last
}

/// `update_with` through node 1 in three canary steps of one node each, each holding
/// 3 s, with an 8 s stabilization window and these gates.
fn update_gated(cluster: &Cluster, dist: &std::path::Path, gates: &[String]) -> serde_json::Value {
    let mut extra = vec![
        "--stabilize",
        "8s",
        "--steps",
        "1,2,100%",
        "--step-pause",
        "3s",
    ];
    for gate in gates {
        extra.extend(["--analysis", gate.as_str()]);
    }
    update_with(&cluster.addr(1), dist, &extra)
}

/// The node ids of a history entry's list `key` (`order`, `untargeted`).
pub(crate) fn ids(entry: &serde_json::Value, key: &str) -> Vec<u64> {
    entry[key]
        .as_array()
        .unwrap_or_else(|| panic!("no list {key}: {entry:#}"))
        .iter()
        .map(|id| id.as_u64().unwrap())
        .collect()
}

/// Asserts that a reverted rollout stopped in its first step: the nodes after the first
/// in its order were never started.
fn assert_stopped_in_the_first_step(entry: &serde_json::Value) {
    let order = ids(entry, "order");
    for id in &order[1..] {
        assert_eq!(
            entry["nodes"][id.to_string()]["phase"],
            "pending",
            "node {id} is of a later step: {entry:#}"
        );
    }
}

/// When node `id` entered `phase`, from the entry's trail.
pub(crate) fn entered(entry: &serde_json::Value, id: u64, phase: &str) -> u64 {
    entry["nodes"][id.to_string()]["trail"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t[0] == phase)
        .and_then(|t| t[1].as_u64())
        .unwrap_or_else(|| panic!("node {id} never entered {phase}: {entry:#}"))
}

/// When the first node began restoring (the revert's start), from the history.
fn revert_started_ms(entry: &serde_json::Value) -> u64 {
    entry["nodes"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|step| step["trail"].as_array().cloned().unwrap_or_default())
        .filter(|t| t[0] == "restoring")
        .filter_map(|t| t[1].as_u64())
        .min()
        .expect("a node was restored")
}

async fn gated_cluster() -> Option<(tempfile::TempDir, Cluster, Vec<String>, Prometheus, String)> {
    if !have_prometheus() {
        return None;
    }
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let h1 = service_release(&v1, "v1", &[], "20s");
    let (cluster, ingresses) = three_serving(&v1, &h1).await;
    let prometheus = Prometheus::start_plain(&ingresses).await;
    crate::harness::wait_for(
        "Prometheus scraping the services",
        Duration::from_secs(60),
        || async {
            let up = prometheus.query("sum(up{job=\"service\"})");
            (up.first().map(|(_, v)| *v) == Some(3.0)).then_some(())
        },
    )
    .await;
    Some((work, cluster, ingresses, prometheus, h1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_rate_gate_reverts_a_failing_release_and_a_good_one_completes() {
    let Some((work, cluster, ingresses, prometheus, h1)) = gated_cluster().await else {
        return;
    };
    let gates = [error_gate(&prometheus.addr), p99_gate(&prometheus.addr)];
    let load = Load::start(&ingresses);
    let bad = work.path().join("bad");
    service_release(&bad, "v2-errors", &["--error-rate", "0.05"], "20s");
    let entry = update_gated(&cluster, &bad, &gates);
    let first_error = load.first_error_ms.load(Ordering::SeqCst);
    assert_eq!(entry["outcome"], "reverted", "{entry:#}");
    assert_stopped_in_the_first_step(&entry);
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("analysis errors failed") && reason.contains("must be <= 0.001"),
        "the reason names the gate, its query's value and the threshold: {reason}"
    );
    let failed: Vec<f64> = entry["evaluations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "errors" && e["verdict"] == "fail")
        .filter_map(|e| e["value"].as_f64())
        .collect();
    assert!(
        failed.len() >= 2 && failed.iter().all(|v| *v > 0.001),
        "failed evaluations with their values recorded: {failed:?}"
    );
    assert!(first_error > 0, "the load saw the bad release's errors");
    let revert = revert_started_ms(&entry);
    println!(
        "error-rate gate: first 500 at {first_error}, revert began at {revert}: {} ms later \
         ({} failed evaluations; values {failed:?})",
        revert.saturating_sub(first_error),
        failed.len()
    );
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1, 2, 3], &h1).await;

    // A good release passes both gates, every evaluation recorded. It starts once the
    // bad release's errors have left the gate's window, as an operator would.
    crate::harness::wait_for(
        "the errors out of the window",
        Duration::from_secs(60),
        || async {
            let ratio = prometheus.query(
                "sum(rate(http_requests_total{path=\"/\",status=~\"5..\"}[5s])) \
             / sum(rate(http_requests_total{path=\"/\"}[5s]))",
            );
            (ratio.first().map(|(_, v)| *v) == Some(0.0)).then_some(())
        },
    )
    .await;
    let good = work.path().join("good");
    let h3 = service_release(&good, "v3", &[], "20s");
    let entry = update_gated(&cluster, &good, &gates);
    let (ok, failed) = load.stop();
    assert_eq!(entry["outcome"], "completed", "{entry:#}");
    // Through every step: each node began only after the one before it committed and its
    // step held for its pause.
    let order = ids(&entry, "order");
    for pair in order.windows(2) {
        let held_from = entered(&entry, pair[0], "committed");
        let began = entered(&entry, pair[1], "backup");
        assert!(
            began >= held_from + 3_000,
            "node {} began {} ms after node {} committed: {entry:#}",
            pair[1],
            began.saturating_sub(held_from),
            pair[0]
        );
    }
    let evaluations = entry["evaluations"].as_array().unwrap();
    for name in ["errors", "p99"] {
        let mine: Vec<_> = evaluations.iter().filter(|e| e["name"] == name).collect();
        assert!(!mine.is_empty(), "gate {name} was evaluated");
        assert!(
            mine.iter().all(|e| e["verdict"] == "pass"),
            "every evaluation of {name} passed: {mine:?}"
        );
    }
    wait_services_on(&cluster, &[1, 2, 3], &h3).await;
    println!("load: {ok} requests answered 200, {failed} not (the bad release's 500s)");
    let status = cli(&["rollout", "history", "--node", &cluster.addr(1)]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("gate errors:") && text.contains("gate p99:"),
        "history shows the gates:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_p99_gate_reverts_a_slow_release() {
    let Some((work, cluster, ingresses, prometheus, h1)) = gated_cluster().await else {
        return;
    };
    let gates = [error_gate(&prometheus.addr), p99_gate(&prometheus.addr)];
    let load = Load::start(&ingresses);
    let slow = work.path().join("slow");
    service_release(&slow, "v2-slow", &["--latency", "700ms"], "20s");
    let began = Instant::now();
    let entry = update_gated(&cluster, &slow, &gates);
    let first_slow = load.first_slow_ms.load(Ordering::SeqCst);
    load.stop();
    assert_eq!(entry["outcome"], "reverted", "{entry:#}");
    assert_stopped_in_the_first_step(&entry);
    let reason = entry["reason"].as_str().unwrap();
    assert!(
        reason.contains("analysis p99 failed") && reason.contains("must be <= 0.5"),
        "{reason}"
    );
    assert!(first_slow > 0, "the load saw the slow release's answers");
    let revert = revert_started_ms(&entry);
    println!(
        "p99 gate: a request first unanswered for 0.5 s at {first_slow}, revert began at \
         {revert}: {} ms later (rollout {} ms in all): {reason}",
        revert.saturating_sub(first_slow),
        began.elapsed().as_millis()
    );
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1, 2, 3], &h1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_step_holds_under_its_gates_until_promoted() {
    let Some((work, cluster, ingresses, prometheus, _h1)) = gated_cluster().await else {
        return;
    };
    let load = Load::start(&ingresses);
    let next = work.path().join("v2");
    let h2 = service_release(&next, "v2", &[], "20s");
    let addr = cluster.addr(1);
    let (errors, p99) = (error_gate(&prometheus.addr), p99_gate(&prometheus.addr));
    let out = cli(&[
        "update",
        "--dist",
        next.to_str().unwrap(),
        "--node",
        &addr,
        "--stabilize",
        "3s",
        "--soak",
        "0",
        "--stale-ack",
        "2s",
        "--steps",
        "1,100%",
        "--analysis",
        &errors,
        "--analysis",
        &p99,
        "--detach",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first step: one node updated and committed, the others left alone, held (the
    // leader's note and the replicated phases are read apart: wait for both).
    let held = crate::harness::wait_for("the first step to hold", Duration::from_secs(120), || {
        let addr = addr.clone();
        async move {
            let out = cli(&["rollout", "status", "--node", &addr]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let status = cli(&["rollout", "status", "--json", "--node", &addr]);
            let active: serde_json::Value = serde_json::from_slice(&status.stdout).ok()?;
            let phases: Vec<String> = active["nodes"]
                .as_object()?
                .values()
                .filter_map(|s| s["phase"].as_str().map(String::from))
                .collect();
            let committed = phases.iter().filter(|p| *p == "committed").count();
            let pending = phases.iter().filter(|p| *p == "pending").count();
            (text.contains("holds until `cluster rollout promote`")
                && committed == 1
                && pending == 2)
                .then_some(text)
        }
    })
    .await;
    assert!(held.contains("canary step 1/2: 1 of 3 nodes"), "{held}");
    // The gates keep watching the canary while it holds.
    let watched = crate::harness::wait_for(
        "gates evaluated while held",
        Duration::from_secs(60),
        || {
            let addr = addr.clone();
            async move {
                let out = cli(&["rollout", "status", "--json", "--node", &addr]);
                let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                let n = json["evaluations"].as_array()?.len();
                (n >= 4).then_some(n)
            }
        },
    )
    .await;
    // Still held after those evaluations: no other node starts while nobody promotes.
    let status = cli(&["rollout", "status", "--json", "--node", &addr]);
    let active: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let pending = active["nodes"]
        .as_object()
        .unwrap()
        .values()
        .filter(|s| s["phase"] == "pending")
        .count();
    assert_eq!(pending, 2, "still held: {active:#}");
    let promoted = cli(&["rollout", "promote", "--node", &addr]);
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let said = String::from_utf8_lossy(&promoted.stdout);
    assert!(said.contains("step 2/2 begins (3 of 3 nodes"), "{said}");
    let watch = cli(&[
        "rollout",
        "status",
        "--watch",
        "--timeout",
        "3m",
        "--node",
        &addr,
    ]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stdout)
    );
    let again = cli(&["rollout", "promote", "--node", &addr]);
    assert!(!again.status.success(), "nothing left to promote");
    let (ok, failed) = load.stop();
    wait_services_on(&cluster, &[1, 2, 3], &h2).await;
    println!(
        "canary: {watched} evaluations while the first step held; load {ok} ok, {failed} failed"
    );
    assert_eq!(failed, 0, "no request failed during the canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stuck_past_its_progress_deadline_is_reverted_with_the_reason() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let h1 = service_release(&v1, "v1", &[], "20s");
    let (cluster, _ingresses) = three_serving(&v1, &h1).await;
    // A release whose service never passes its check: without the deadline, the node
    // would have its full 10 minutes to become healthy.
    let stuck = work.path().join("stuck");
    service_release(&stuck, "v2-sick", &["--fail-health"], "10m");
    let began = Instant::now();
    let addr = cluster.addr(1);
    let out = cli(&[
        "update",
        "--dist",
        stuck.to_str().unwrap(),
        "--node",
        &addr,
        "--health-deadline",
        "10m",
        "--progress-deadline",
        "15s",
        "--stale-ack",
        "2s",
        "--json",
    ]);
    let took = began.elapsed();
    assert!(!out.status.success(), "the rollout did not complete");
    let history = cli(&["rollout", "history", "--json", "--node", &addr]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(last["outcome"], "reverted", "{last:#}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("no progress for") && reason.contains("(--progress-deadline)"),
        "{reason}"
    );
    assert!(
        took < Duration::from_secs(120),
        "stopped by the 15 s deadline, not the 10 min health deadline: {took:?}"
    );
    println!("progress deadline: reverted after {took:?}: {reason}");
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1, 2, 3], &h1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_rolls_back_through_the_pipeline_to_the_previous_or_a_chosen_build() {
    let work = tempfile::tempdir().unwrap();
    let dist = |name: &str| work.path().join(name);
    let h1 = crate::harness::make_release(&dist("v1"), &[("share/motd", "one")]);
    let h2 = crate::harness::make_release(&dist("v2"), &[("share/motd", "two")]);
    let h3 = crate::harness::make_release(&dist("v3"), &[("share/motd", "three")]);
    let cluster = Cluster::start_supervised(3, &dist("v1")).await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    let addr = cluster.addr(1);
    for next in ["v2", "v3"] {
        let entry = update_with(&addr, &dist(next), &["--stabilize", "1s"]);
        assert_eq!(entry["outcome"], "completed", "{entry:#}");
    }

    // Undo the newest rollout (2: v2 -> v3): a rollout of v2, with its own generation.
    let out = cli(&["rollout", "undo", "--json", "--node", &addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let undone: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(undone["generation"], 3);
    assert_eq!(undone["outcome"]["outcome"], "completed", "{undone:#}");
    assert_eq!(undone["outcome"]["target_hash"], h2.as_str());
    let trigger = undone["outcome"]["trigger"].as_str().unwrap();
    assert!(trigger.contains("undoes rollout 2"), "{trigger}");
    crate::harness::wait_all_on(&cluster, &h2).await;

    // Back to what rollout 2 rolled out, through the same pipeline.
    let out = cli(&["rollout", "undo", "--to", "2", "--node", &addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("returns to the build of rollout 2"), "{said}");
    crate::harness::wait_all_on(&cluster, &h3).await;

    // Refusals change nothing: a generation that is not there, the build already running.
    for (to, says) in [("99", "no rollout 99"), (&h3[..12], "already runs")] {
        let out = cli(&["rollout", "undo", "--to", to, "--node", &addr]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "--to {to}: {err}");
    }
    let history = cli(&["rollout", "history", "--json", "--node", &addr]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(
        history.as_array().unwrap().len(),
        4,
        "no rollout started by a refusal"
    );
}
