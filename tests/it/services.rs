//! The operator's own service, rolled out blue/green on every node behind an ingress the
//! node holds, under a real HTTP load generator (Debian's `wrk`), directly and through a
//! real load balancer (Debian's `haproxy`): no refused connection, no failed request.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{cli, data_dir_of, Cluster};

/// A release of the sample service: `bin/cluster` (which is also the service, as
/// `cluster sample-service`) and a `service.toml` running it with `args`.
pub(crate) fn service_release(
    dir: &Path,
    version: &str,
    args: &[&str],
    start_grace: &str,
) -> String {
    crate::harness::make_release(
        dir,
        &[("service.toml", &service_toml(version, args, start_grace))],
    )
}

fn service_toml(version: &str, args: &[&str], start_grace: &str) -> String {
    let mut argv = vec![
        "\"sample-service\"".to_string(),
        "\"--version-text\"".into(),
        format!("\"{version}\""),
    ];
    argv.extend(args.iter().map(|a| format!("\"{a}\"")));
    format!(
        "[[service]]\nname = \"web\"\nexec = \"bin/cluster\"\nargs = [{}]\n\
         listen = \"127.0.0.1:0\"\nstart_grace = \"{start_grace}\"\ndrain_timeout = \"10s\"\n\
         [service.check]\nhttp = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
         failure_threshold = 3\n",
        argv.join(", ")
    )
}

/// Like [`service_release`], with a `bin/cluster` of its own (naming `build`) when
/// `build` is given, so two releases differ in `bin/cluster` and a node must restart to
/// switch between them; without, the binary under test itself (switched in place).
fn service_release_with_binary(dir: &Path, build: Option<&str>, version: &str) -> String {
    let toml = service_toml(version, &[], "20s");
    match build {
        Some(build) => {
            crate::harness::make_release(dir, &[("service.toml", &toml), ("share/build", build)])
        }
        None => crate::harness::make_release_same_binary(dir, &[("service.toml", &toml)]),
    }
}

/// The count the sample service keeps in its state directory, read through `addr`.
fn requests_counted(addr: &str) -> u64 {
    get(addr, "/requests").unwrap().1.parse().unwrap()
}

/// The leader and the term, as node 1 sees them.
fn leader_and_term(cluster: &Cluster) -> (u64, u64) {
    let out = cli(&["status", "--json", "--node", &cluster.addr(1)]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        json["leader"].as_u64().unwrap(),
        json["term"].as_u64().unwrap(),
    )
}

/// When node `id`'s process started, as it reports itself.
fn started_at(cluster: &Cluster, id: u64) -> u64 {
    let out = cli(&["status", "--local", "--json", "--node", &cluster.addr(id)]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let me = json["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap();
    me["started_at_ms"].as_u64().unwrap()
}

/// The ingress node `id` holds for the sample service.
fn ingress(cluster: &Cluster, id: u64) -> String {
    let file = data_dir_of(cluster, id).join("service-run/web.addr");
    std::fs::read_to_string(file).unwrap().trim().to_string()
}

/// Node `id`'s own view of its service, from `cluster status --local --json`.
fn service_view(cluster: &Cluster, id: u64) -> Option<serde_json::Value> {
    let out = cli(&["status", "--local", "--json", "--node", &cluster.addr(id)]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let me = json["nodes"].as_array()?.iter().find(|n| n["id"] == id)?;
    me["services"].as_array()?.first().cloned()
}

/// Three supervised nodes on release `v1` (build `h1`), each with its sample service
/// ready; the cluster and each node's ingress, in node order.
pub(crate) async fn three_serving(v1: &Path, h1: &str) -> (Cluster, Vec<String>) {
    let cluster = Cluster::start_supervised_with(3, v1, &[]).await;
    crate::harness::wait_all_on(&cluster, h1).await;
    wait_services_on(&cluster, &[1, 2, 3], h1).await;
    let ingresses = (1..=3).map(|id| ingress(&cluster, id)).collect();
    (cluster, ingresses)
}

/// Waits until every node's service is ready on release `hash`.
pub(crate) async fn wait_services_on(cluster: &Cluster, ids: &[u64], hash: &str) {
    for &id in ids {
        crate::harness::wait_for(
            &format!("node {id}'s service ready on {}", &hash[..12]),
            Duration::from_secs(60),
            || async move {
                let view = service_view(cluster, id)?;
                (view["state"] == "ready" && view["active"]["release"] == hash).then_some(())
            },
        )
        .await;
    }
}

/// `GET path` over HTTP/1.1 (a fresh connection): status and body.
pub(crate) fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.trim().to_string()))
}

fn have(tool: &str, version_flag: &str) -> bool {
    Command::new(tool)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// `wrk` against one URL until stopped; what it counted.
struct Load {
    child: Option<Child>,
    out: tempfile::NamedTempFile,
    url: String,
}

/// What a `wrk` run reports.
#[derive(Debug, Default)]
struct LoadReport {
    requests: u64,
    /// connect + read + write + timeout errors.
    socket_errors: u64,
    non_2xx: u64,
    max_latency: String,
}

impl Load {
    fn start(url: &str) -> Load {
        let out = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("wrk")
            .args(["-t1", "-c4", "-d600s", "--timeout", "10s", url])
            .stdout(out.reopen().unwrap())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("wrk starts");
        Load {
            child: Some(child),
            out,
            url: url.to_string(),
        }
    }

    /// Stops wrk (SIGINT: it prints its summary) and reads what it counted.
    fn stop(mut self) -> LoadReport {
        let mut child = self.child.take().unwrap();
        crate::harness::signal(child.id(), libc::SIGINT);
        let _ = child.wait();
        let text = std::fs::read_to_string(self.out.path()).unwrap();
        let mut report = LoadReport::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(n) = line
                .split(" requests in")
                .next()
                .filter(|_| line.contains(" requests in"))
            {
                report.requests = n.trim().parse().unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                report.socket_errors = rest
                    .split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum();
            } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
                report.non_2xx = rest.trim().parse().unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Latency") {
                report.max_latency = rest.split_whitespace().nth(2).unwrap_or("").to_string();
            }
        }
        assert!(
            report.requests > 0,
            "wrk against {} counted nothing: {text}",
            self.url
        );
        report
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stops every load (one per node, in node order, then any through a load balancer),
/// prints what each counted, and fails on any refused, broken or non-2xx request.
fn stop_and_check(loads: Vec<Load>) -> Vec<LoadReport> {
    let reports: Vec<LoadReport> = loads.into_iter().map(Load::stop).collect();
    for (i, report) in reports.iter().enumerate() {
        let target = match i {
            0..=2 => format!("node {}", i + 1),
            _ => "haproxy".to_string(),
        };
        println!(
            "{target}: {} requests, {} socket errors, {} non-2xx, max latency {}",
            report.requests, report.socket_errors, report.non_2xx, report.max_latency
        );
        assert_eq!(report.socket_errors, 0, "{target}: {report:?}");
        assert_eq!(report.non_2xx, 0, "{target}: {report:?}");
    }
    reports
}

/// A real load balancer (Debian's haproxy) in front of `backends`, killed with its test.
struct Haproxy {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    async fn start(backends: &[String]) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        // A free port, taken back at once: haproxy cannot say which port 0 gave it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let servers: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server n{} {b}\n", i + 1))
            .collect();
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n  maxconn 512\ndefaults\n  mode http\n  timeout connect 5s\n  \
                 timeout client 60s\n  timeout server 60s\n  retries 3\n\
                 frontend in\n  bind {addr}\n  default_backend nodes\n\
                 backend nodes\n  balance roundrobin\n{}",
                servers.concat()
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts");
        let proxy = Haproxy {
            child,
            addr,
            _dir: dir,
        };
        crate::harness::wait_for("haproxy serving", Duration::from_secs(30), || async {
            matches!(get(&proxy.addr, "/version"), Ok((200, _))).then_some(())
        })
        .await;
        proxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Skips (outside CI) unless wrk and haproxy are installed.
fn tools_missing() -> bool {
    if have("wrk", "--version") && have("haproxy", "-v") {
        return false;
    }
    crate::harness::skip_outside_ci("wrk or haproxy is not installed: apt-get install wrk haproxy");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_rolls_out_blue_green_under_load_with_no_failed_request() {
    if tools_missing() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, v2, v3) = (
        work.path().join("v1"),
        work.path().join("v2"),
        work.path().join("v3"),
    );
    // v1 -> v2 changes only the service; v2 -> v3 changes bin/cluster too.
    let h1 = service_release_with_binary(&v1, None, "v1");
    let h2 = service_release_with_binary(&v2, None, "v2");
    let h3 = service_release_with_binary(&v3, Some("three"), "v3");
    let (cluster, ingresses) = three_serving(&v1, &h1).await;
    for addr in &ingresses {
        assert_eq!(get(addr, "/version").unwrap(), (200, "v1".to_string()));
    }
    let counted_before: u64 = get(&ingresses[1], "/requests").unwrap().1.parse().unwrap();

    let proxy = Haproxy::start(&ingresses).await;
    let mut loads: Vec<Load> = ingresses
        .iter()
        .map(|addr| Load::start(&format!("http://{addr}/version")))
        .collect();
    loads.push(Load::start(&format!("http://{}/version", proxy.addr)));
    // Slow requests, one after another, on node 2's ingress: some are in flight when
    // node 2 switches instances, and must complete.
    let slow_addr = ingresses[1].clone();
    let stop_slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop_slow.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let started = Instant::now();
                let answer = get(&slow_addr, "/slow?ms=700");
                answers.push((answer, started.elapsed()));
            }
            answers
        })
    };

    // (a) Only the service changed: no node restarts, each cuts over in place, and the
    // leader keeps leading (no hand-off, no election: the term stays).
    let started: Vec<u64> = (1..=3).map(|id| started_at(&cluster, id)).collect();
    let leadership = leader_and_term(&cluster);
    let took = Instant::now();
    let out = crate::harness::update_in_background(cluster.addr(1), v2, 1000, 30_000)
        .join()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_services_on(&cluster, &[1, 2, 3], &h2).await;
    println!("(a) service only: rollout took {:?}", took.elapsed());
    assert_eq!(
        leader_and_term(&cluster),
        leadership,
        "the same leader in the same term"
    );
    for id in 1..=3 {
        assert_eq!(
            started_at(&cluster, id),
            started[id as usize - 1],
            "node {id} was not restarted for a release with its running bin/cluster"
        );
    }
    // (b) bin/cluster changed too: every node restarts, its service serving throughout.
    let took = Instant::now();
    let out = crate::harness::update_in_background(cluster.addr(1), v3, 1000, 30_000)
        .join()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_services_on(&cluster, &[1, 2, 3], &h3).await;
    println!(
        "(b) service and bin/cluster: rollout took {:?}",
        took.elapsed()
    );
    for id in 1..=3 {
        assert_ne!(
            started_at(&cluster, id),
            started[id as usize - 1],
            "node {id} restarted"
        );
    }
    stop_slow.store(true, std::sync::atomic::Ordering::SeqCst);
    let slow = slow.join().unwrap();
    let reports = stop_and_check(loads);
    let slowest = slow.iter().map(|(_, took)| *took).max().unwrap_or_default();
    println!("slow requests: {} (longest {slowest:?})", slow.len());
    let mut served_by = Vec::new();
    for (answer, _) in &slow {
        match answer {
            Ok((200, body)) => served_by.push(body.rsplit('(').next().unwrap_or("").to_string()),
            other => panic!("a slow request failed: {other:?}"),
        }
    }
    served_by.dedup();
    assert_eq!(
        served_by,
        ["v1)", "v2)", "v3)"],
        "slow requests were served by v1, v2, v3 in turn"
    );
    for addr in &ingresses {
        assert_eq!(get(addr, "/version").unwrap(), (200, "v3".to_string()));
    }
    // The state directory kept the count across the cutovers: it only grew.
    let counted_after: u64 = get(&ingresses[1], "/requests").unwrap().1.parse().unwrap();
    assert!(
        counted_after > counted_before + reports[1].requests / 2,
        "requests counted in the state directory: {counted_before} -> {counted_after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_fails_its_check_never_takes_over_and_the_rollout_reverts() {
    if tools_missing() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, bad) = (work.path().join("v1"), work.path().join("bad"));
    let h1 = service_release(&v1, "v1", &[], "20s");
    service_release(&bad, "bad", &["--fail-health"], "3s");
    let (cluster, ingresses) = three_serving(&v1, &h1).await;
    let counted: Vec<u64> = ingresses.iter().map(|a| requests_counted(a)).collect();
    let loads: Vec<Load> = ingresses
        .iter()
        .map(|addr| Load::start(&format!("http://{addr}/version")))
        .collect();

    let out = crate::harness::update_in_background(cluster.addr(1), bad, 1000, 10_000)
        .join()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_services_on(&cluster, &[1, 2, 3], &h1).await;
    let reports = stop_and_check(loads);
    for (i, addr) in ingresses.iter().enumerate() {
        assert_eq!(get(addr, "/version").unwrap(), (200, "v1".to_string()));
        // The state directory kept its count across the revert.
        let after = requests_counted(addr);
        assert!(
            after >= counted[i] + reports[i].requests / 2,
            "node {}: requests counted {} -> {after}",
            i + 1,
            counted[i]
        );
    }
    // The node that tried the candidate says why it was not switched to.
    let tried = (1..=3)
        .filter_map(|id| service_view(&cluster, id))
        .filter_map(|view| view["last_rollback"].as_str().map(String::from))
        .collect::<Vec<_>>();
    assert!(
        tried
            .iter()
            .any(|reason| reason.contains("did not pass its check") && reason.contains("503")),
        "{tried:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_failing_after_the_switch_is_switched_back_without_a_refused_connection() {
    if tools_missing() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, flaky) = (work.path().join("v1"), work.path().join("flaky"));
    let h1 = service_release(&v1, "v1", &[], "20s");
    let h_flaky = service_release(&flaky, "flaky", &["--healthy-for", "3s"], "20s");
    let (cluster, ingresses) = three_serving(&v1, &h1).await;
    let loads: Vec<Load> = ingresses
        .iter()
        .map(|addr| Load::start(&format!("http://{addr}/version")))
        .collect();

    // Stabilization outlasts the release's healthy spell: the first node updated fails
    // its checks after the switch, and is switched back.
    let update = crate::harness::update_in_background(cluster.addr(1), flaky, 10_000, 30_000);
    let (node, switched) = crate::harness::wait_for(
        "a node serving the flaky release",
        Duration::from_secs(60),
        || async {
            (1..=3).find_map(|id| {
                let view = service_view(&cluster, id)?;
                (view["active"]["release"] == h_flaky).then_some((id, Instant::now()))
            })
        },
    )
    .await;
    let back = crate::harness::wait_for("switched back to v1", Duration::from_secs(90), || async {
        let (code, body) = get(&ingresses[node as usize - 1], "/version").ok()?;
        (code == 200 && body == "v1" && service_view(&cluster, node)?["active"]["release"] == h1)
            .then(Instant::now)
    })
    .await;
    let out = update.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let view = service_view(&cluster, node).unwrap();
    let reason = view["last_rollback"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("failed 3 checks in a row"), "{view}");
    let third_failure = view["last_rollback_at_ms"].as_u64().unwrap();
    stop_and_check(loads);
    let now_ms = cluster::clock::unix_ms();
    let back_ms = now_ms - back.elapsed().as_millis() as u64;
    println!(
        "node {node}: switched to the flaky release, then {} ms from its third failed check \
         to v1 serving again ({} s after the switch was seen)",
        back_ms.saturating_sub(third_failure),
        (back - switched).as_secs_f64()
    );
    for addr in &ingresses {
        assert_eq!(get(addr, "/version").unwrap(), (200, "v1".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_service_definition_is_refused_by_stamp_and_by_the_node_with_the_field_named() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let h1 = service_release(&v1, "v1", &[], "20s");
    let bad = work.path().join("bad");
    std::fs::create_dir_all(bad.join("bin")).unwrap();
    std::fs::copy(crate::harness::BIN, bad.join("bin/cluster")).unwrap();
    let toml = std::fs::read_to_string(v1.join("service.toml"))
        .unwrap()
        .replace("listen = \"127.0.0.1:0\"", "listen = \"everywhere:80\"");
    std::fs::write(bad.join("service.toml"), toml).unwrap();

    // Stamp refuses it, naming the field, and writes no version.json.
    let out = cli(&["dist", "stamp", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("service web: `listen`"), "{stderr}");
    assert!(!bad.join("version.json").exists());

    // A node refuses to take it (the upload of `cluster update`), and keeps nothing of it.
    let cluster =
        Cluster::start_supervised_with(1, &v1, &["--metrics-listen", "127.0.0.1:0"]).await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1], &h1).await;
    // Its metrics show the service.
    let metrics_addr =
        std::fs::read_to_string(data_dir_of(&cluster, 1).join("metrics.addr")).unwrap();
    let (_, metrics) =
        crate::tools::https_get(metrics_addr.trim(), "/metrics", Some("viewer")).unwrap();
    for line in [
        "cluster_service_ready{service=\"web\"} 1",
        "cluster_service_state{service=\"web\",state=\"ready\"} 1",
        "cluster_service_failure_streak{service=\"web\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    assert!(metrics.contains(&format!("release=\"{h1}\"")), "{metrics}");
    let out = cli(&[
        "update",
        "--dist",
        bad.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
        "--allow-downtime",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("`listen`"), "{stderr}");
    let releases: Vec<String> = std::fs::read_dir(data_dir_of(&cluster, 1).join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        releases,
        vec![h1.clone()],
        "only the running release is held"
    );
    assert_eq!(
        get(&ingress(&cluster, 1), "/version").unwrap(),
        (200, "v1".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_binds_its_own_port_is_replaced_stop_then_start_and_preflight_says_so() {
    let work = tempfile::tempdir().unwrap();
    // A port free now (the service binds it itself, so it must be fixed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let toml = |version: &str| {
        format!(
            "[[service]]\nname = \"legacy\"\nexec = \"bin/cluster\"\n\
             args = [\"sample-service\", \"--version-text\", \"{version}\", \"--listen\", \"{listen}\"]\n\
             listen = \"{listen}\"\nsocket_activation = false\ndrain_timeout = \"5s\"\n\
             [service.check]\nhttp = \"/healthz\"\ninterval = \"200ms\"\n"
        )
    };
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = crate::harness::make_release_same_binary(&v1, &[("service.toml", &toml("v1"))]);
    let h2 = crate::harness::make_release_same_binary(&v2, &[("service.toml", &toml("v2"))]);
    let cluster = Cluster::start_supervised_with(1, &v1, &[]).await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1], &h1).await;
    assert_eq!(get(&listen, "/version").unwrap(), (200, "v1".to_string()));

    // The leader holds the release (pushed to it), so a dry run reads its services.
    let pushed = cli(&[
        "dist",
        "push",
        v2.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
    ]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let dry = cli(&[
        "update",
        "--dist",
        v2.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
        "--allow-downtime",
        "--dry-run",
    ]);
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        said.contains("legacy (binds") && said.contains("not socket-activated"),
        "{said}"
    );
    let out = cli(&[
        "update",
        "--dist",
        v2.to_str().unwrap(),
        "--node",
        &cluster.addr(1),
        "--allow-downtime",
        "--stabilize-ms",
        "500",
        "--soak-ms",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_services_on(&cluster, &[1], &h2).await;
    assert_eq!(get(&listen, "/version").unwrap(), (200, "v2".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_instance_is_started_again_behind_the_open_ingress() {
    let work = tempfile::tempdir().unwrap();
    let v1 = work.path().join("v1");
    let h1 = service_release(&v1, "v1", &[], "20s");
    let cluster = Cluster::start_supervised_with(1, &v1, &[]).await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    wait_services_on(&cluster, &[1], &h1).await;
    let addr = ingress(&cluster, 1);
    let before = service_view(&cluster, 1).unwrap();
    let pid = before["active"]["pid"].as_u64().unwrap() as u32;
    crate::harness::signal(pid, libc::SIGKILL);
    crate::harness::wait_for("the instance dead", Duration::from_secs(10), || async {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.chars().next());
        matches!(state, None | Some('Z') | Some('X')).then_some(())
    })
    .await;
    // Meanwhile the ingress stays open: a connection waits in its queue for the next
    // instance instead of being refused.
    let answered = get(&addr, "/version").unwrap();
    assert_eq!(answered, (200, "v1".to_string()));
    let after = crate::harness::wait_for("another instance", Duration::from_secs(30), || async {
        let view = service_view(&cluster, 1)?;
        let new_pid = view["active"]["pid"].as_u64()? as u32;
        (new_pid != pid && view["state"] == "ready").then_some(view)
    })
    .await;
    assert_eq!(after["active"]["release"], h1.as_str());
    let log = std::fs::read_to_string(&cluster.nodes[&1].log).unwrap();
    assert!(
        log.contains("the instance exited: starting another"),
        "{log}"
    );
}
