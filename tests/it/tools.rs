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

/// `GET path` from `addr` over HTTP/1.0: the status code and the body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// `GET path` from a node's HTTPS side listener at `addr` with curl, presenting the
/// test CA's credentials `creds` (none for `None`): the status code and body, or curl's
/// error when the handshake is refused.
pub fn https_get(addr: &str, path: &str, creds: Option<&str>) -> Result<(u16, String), String> {
    let port = addr.rsplit_once(':').unwrap().1;
    let ca = crate::harness::creds("ca").join("ca.pem");
    let mut command = std::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&ca)
        .args(["--resolve", &format!("cluster-node:{port}:127.0.0.1")]);
    if let Some(name) = creds {
        let dir = crate::harness::creds(name);
        command
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"));
    }
    command.arg(format!("https://cluster-node:{port}{path}"));
    let out = crate::harness::output_within(command, Duration::from_secs(30));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Ok((code.parse().unwrap(), body.to_string()))
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server from Debian's package, killed with its test.
pub(crate) struct Prometheus {
    child: std::process::Child,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

/// Whether Debian's `prometheus` (server and promtool) is here; when not, the test skips
/// (fails under CI=true, where `.ci/run` installs it).
pub(crate) fn have_prometheus() -> bool {
    let tools = ["prometheus", "promtool"].iter().all(|tool| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !tools {
        crate::harness::skip_outside_ci(
            "Prometheus is not installed: apt-get install prometheus (server and promtool)",
        );
    }
    tools
}

impl Prometheus {
    /// Scrapes `targets` every 250 ms over HTTPS with the test viewer's certificate.
    async fn start(targets: &[String]) -> Prometheus {
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let ca = crate::harness::creds("ca").join("ca.pem");
        let viewer = crate::harness::creds("viewer");
        Self::start_with(&format!(
            "  - job_name: cluster\n    scheme: https\n    \
             tls_config:\n      ca_file: {}\n      cert_file: {}\n      \
             key_file: {}\n      server_name: cluster-node\n    \
             static_configs:\n      - targets: [{}]\n",
            ca.display(),
            viewer.join("cert.pem").display(),
            viewer.join("key.pem").display(),
            list.join(", ")
        ))
        .await
    }

    /// Scrapes `/metrics` of the plain HTTP `targets` (services) every 250 ms.
    pub(crate) async fn start_plain(targets: &[String]) -> Prometheus {
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        Self::start_with(&format!(
            "  - job_name: service\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ))
        .await
    }

    /// Runs with these scrape configs (YAML list items), every 250 ms.
    async fn start_with(scrape_configs: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n\
                 scrape_configs:\n{scrape_configs}"
            ),
        )
        .unwrap();
        // A free port, taken back at once: Prometheus cannot say which port 0 gave it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let server = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        crate::harness::wait_for("prometheus ready", Duration::from_secs(60), || async {
            matches!(http_get(&server.addr, "/-/ready"), Ok((200, _))).then_some(())
        })
        .await;
        server
    }

    /// The result vector of PromQL `query`, as `(labels, value)`.
    pub(crate) fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", url_encode(query));
        let (code, body) = http_get(&self.addr, &path).unwrap();
        assert_eq!(code, 200, "{query}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_node_and_sees_a_rollouts_phases() {
    if !have_prometheus() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = crate::harness::make_release(&v1, &[]);
    crate::harness::make_release(&v2, &[("share/motd", "two")]);
    let cluster = crate::harness::Cluster::start_supervised_with(
        3,
        &v1,
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    let targets: Vec<String> = (1..=3)
        .map(|id| {
            let file = crate::harness::data_dir_of(&cluster, id).join("metrics.addr");
            std::fs::read_to_string(file).unwrap().trim().to_string()
        })
        .collect();

    // Each endpoint passes promtool's checks of the exposition format. It is HTTPS for
    // clients with a certificate of the cluster's CA only.
    for target in &targets {
        let refused = https_get(target, "/metrics", None);
        assert!(refused.is_err(), "no certificate: {refused:?}");
        let refused = https_get(target, "/metrics", Some("stranger"));
        assert!(refused.is_err(), "another CA's certificate: {refused:?}");
        let (code, text) = https_get(target, "/metrics", Some("viewer")).unwrap();
        assert_eq!(code, 200);
        assert!(text.contains("cluster_raft_term "), "{text}");
        let mut check = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut check.stdin.take().unwrap(), text.as_bytes()).unwrap();
        let checked = check.wait_with_output().unwrap();
        assert!(
            checked.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
    }

    let prometheus = Prometheus::start(&targets).await;
    crate::harness::wait_for("every target up", Duration::from_secs(60), || async {
        let up = prometheus.query("sum(up)");
        (up.first().map(|(_, v)| *v) == Some(3.0)).then_some(())
    })
    .await;
    let out = crate::harness::update_in_background(cluster.addr(1), v2, 1500, 30_000)
        .join()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every node was seen stabilizing, each phase was timed, the rollout counted.
    let seen = crate::harness::wait_for("the phases in Prometheus", Duration::from_secs(30), || async {
        let stabilizing = prometheus.query(
            "max by (node) (max_over_time(cluster_rollout_node_phase{phase=\"stabilize\"}[10m]))",
        );
        let completed =
            prometheus.query("max(cluster_rollouts_finished_total{outcome=\"completed\"})");
        let timed = prometheus.query(
            "max by (phase) (cluster_rollout_phase_duration_seconds_count{phase=~\"sync|stabilize\"})",
        );
        let done = stabilizing.len() == 3
            && stabilizing.iter().all(|(_, v)| *v == 1.0)
            && completed.first().is_some_and(|(_, v)| *v >= 1.0)
            && timed.len() == 2;
        done.then_some((stabilizing, timed))
    })
    .await;
    println!("stabilizing seen: {:?}\nphases timed: {:?}", seen.0, seen.1);
    let streaks = prometheus.query("max by (node) (cluster_node_failure_streak)");
    assert_eq!(streaks.len(), 3, "{streaks:?}");
    assert!(
        streaks.iter().all(|(_, v)| *v == 0.0),
        "nobody failed: {streaks:?}"
    );
}

/// Headless Chromium (Debian's package) run once on `url` with `extra` flags; its stdout.
fn chromium(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Time for the page's first fetch of /api/state to land in the DOM.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url);
    let out = crate::harness::output_within(command, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_rollout_in_progress_in_a_real_browser() {
    let has_chromium = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_chromium {
        return crate::harness::skip_outside_ci(
            "Chromium is not installed: apt-get install chromium",
        );
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = crate::harness::make_release(&v1, &[]);
    let h2 = crate::harness::make_release(&v2, &[("share/motd", "two")]);
    let cluster = crate::harness::Cluster::start_supervised_with(
        3,
        &v1,
        &["--dashboard-listen", "127.0.0.1:0"],
    )
    .await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    let update = crate::harness::update_in_background(cluster.addr(1), v2, 8000, 30_000);

    // A node stabilizing; the page is read from one that is not restarting meanwhile.
    let (stabilizing, watcher) =
        crate::harness::wait_for("a node stabilizing", Duration::from_secs(60), || async {
            let out = cli(&["rollout", "status", "--json", "--node", &cluster.addr(1)]);
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let nodes = json["nodes"].as_object()?;
            let phase = |id: u64| nodes.get(&id.to_string())?["phase"].as_str();
            let stabilizing = (1..=3).find(|id| phase(*id) == Some("stabilize"))?;
            let watcher = (1..=3).find(|id| phase(*id) == Some("pending"))?;
            Some((stabilizing, watcher))
        })
        .await;
    // The node serves the page over HTTPS to holders of a certificate of its CA only.
    let file = crate::harness::data_dir_of(&cluster, watcher).join("dashboard.addr");
    let served = std::fs::read_to_string(file).unwrap().trim().to_string();
    for creds in [None, Some("stranger")] {
        let refused = https_get(&served, "/api/state", creds);
        assert!(refused.is_err(), "{creds:?}: {refused:?}");
    }
    let (code, state) = https_get(&served, "/api/state", Some("viewer")).unwrap();
    assert_eq!(code, 200, "{state}");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        state["status"]["nodes"].as_array().map(Vec::len),
        Some(3),
        "{state}"
    );
    let (code, page) = https_get(&served, "/", Some("viewer")).unwrap();
    assert_eq!(code, 200);
    assert!(page.contains("<html"), "{page}");

    // The browser reads it through `cluster dashboard`, on loopback with a viewer's
    // credentials.
    let mut proxy = std::process::Command::new(BIN);
    proxy
        .args(["dashboard", "--listen", "127.0.0.1:0", "--node"])
        .arg(cluster.addr(watcher))
        .env("CLUSTER_TLS", crate::harness::creds("viewer"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut proxy = KillOnDrop(proxy.spawn().expect("cluster dashboard starts"));
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.0.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    let url = first
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap_or_else(|| panic!("an address: {first:?}"))
        .to_string();

    let dom = chromium(&url, &["--dump-dom"]);
    assert!(dom.contains("stabilize"), "the page shows the phase: {dom}");
    assert!(dom.contains(&format!("node {stabilizing}")), "{dom}");
    for id in 1..=3 {
        assert!(
            dom.contains(&cluster.addr(id)),
            "member {id} is listed: {dom}"
        );
    }
    assert!(
        dom.contains(&h1[..12]) && dom.contains(&h2[..12]),
        "builds: {dom}"
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,800",
            "--hide-scrollbars",
        ],
    );
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot of the page: {} bytes", size);
    println!(
        "dashboard mid-rollout (node {stabilizing} stabilizing): {}",
        shot.display()
    );

    drop(proxy);

    let out = update.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed (and reaped) when its test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cluster_dashboard_refuses_to_serve_beyond_loopback() {
    let out = cli(&[
        "dashboard",
        "--listen",
        "0.0.0.0:0",
        "--node",
        "127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_hears_every_step_of_a_rollout_despite_failures_and_a_dead_url() {
    let work = tempfile::tempdir().unwrap();
    // The receiver refuses its first two deliveries: they must be retried.
    let hook = crate::harness::Webhook::start(2).await;
    // A URL nobody listens on: its failures must not hold anything up.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let url = hook.url.clone();
    let v1 = work.path().join("v1");
    let v2 = work.path().join("v2");
    let h1 = crate::harness::make_release(&v1, &[]);
    let h2 = crate::harness::make_release(&v2, &[("share/motd", "two")]);
    let cluster = crate::harness::Cluster::start_supervised_with(
        3,
        &v1,
        &["--notify-url", &dead_url, "--notify-url", &url],
    )
    .await;
    crate::harness::wait_all_on(&cluster, &h1).await;
    let out = crate::harness::update_in_background(cluster.addr(1), v2, 500, 30_000)
        .join()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let received =
        crate::harness::wait_for("the completed event", Duration::from_secs(60), || async {
            let events = hook.events();
            events
                .iter()
                .any(|e| e["event"] == "completed")
                .then_some(events)
        })
        .await;
    // At least once: a receiver drops repeats (a retried POST whose reply was lost) by id.
    let mut ids = std::collections::BTreeSet::new();
    let received: Vec<&serde_json::Value> = received
        .iter()
        .filter(|e| ids.insert(e["id"].as_str().unwrap().to_string()))
        .collect();
    for event in &received {
        assert_eq!(event["generation"], 1, "{event}");
        assert_eq!(event["target_hash"], h2.as_str(), "{event}");
    }
    let kinds: Vec<String> = received
        .iter()
        .map(|e| match e["node"].as_u64() {
            Some(node) => format!("node {node} {}", e["phase"].as_str().unwrap_or("")),
            None => e["event"].as_str().unwrap().to_string(),
        })
        .collect();
    println!("{} events: {kinds:?}", received.len());
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("started"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("completed"),
        "{kinds:?}"
    );
    for node in 1..=3 {
        for phase in ["backup", "sync", "health", "stabilize", "committed"] {
            let step = format!("node {node} {phase}");
            assert!(kinds.contains(&step), "{step} in {kinds:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_lists_the_tools_dry_runs_and_runs_an_update() {
    let has_client = std::process::Command::new("python3")
        .args(["-c", "import mcp.client.stdio"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        return crate::harness::skip_outside_ci("the PyPI MCP client is missing: pip install mcp");
    }
    let work = tempfile::tempdir().unwrap();
    let (v1, v2) = (work.path().join("v1"), work.path().join("v2"));
    let h1 = crate::harness::make_release(&v1, &[]);
    let h2 = crate::harness::make_release(&v2, &[("share/motd", "two")]);
    let cluster = crate::harness::Cluster::start_supervised(3, &v1).await;
    crate::harness::wait_all_on(&cluster, &h1).await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/mcp_session.py");
    let mut command = std::process::Command::new("python3");
    command
        .args([script, BIN, &cluster.addr(2), v2.to_str().unwrap()])
        .env("CLUSTER_TLS", crate::harness::creds("operator"));
    let out = crate::harness::output_within(command, Duration::from_secs(240));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(session["server"], "cluster");
    let tools = session["tools"].as_object().unwrap();
    for tool in [
        "cluster_status",
        "initiate_rolling_update",
        "rollout_status",
        "rollout_history",
        "rollout_pause",
        "rollout_resume",
        "rollout_promote",
        "rollout_abort",
    ] {
        assert_eq!(tools[tool]["type"], "object", "{tool} has a JSON schema");
    }
    assert_eq!(tools["initiate_rolling_update"]["required"][0], "dist");
    assert_eq!(
        session["status"]["value"]["nodes"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let bad = &session["bad_dist"];
    assert_eq!(bad["is_error"], true, "{bad}");
    assert!(
        bad["value"]["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent"),
        "{bad}"
    );
    let dry = &session["dry_run"];
    assert_eq!(
        (dry["is_error"].clone(), dry["value"]["proceed"].clone()),
        (false.into(), true.into()),
        "{dry}"
    );
    assert!(
        dry["value"]["generation"].is_null(),
        "a dry run starts nothing: {dry}"
    );
    // The progressive-delivery arguments are `cluster update`'s flags, checked the same way.
    let canary = &session["canary_dry_run"];
    assert_eq!(canary["value"]["proceed"], true, "{canary}");
    let bad = &session["bad_budget"];
    assert_eq!(bad["is_error"], true, "{bad}");
    let error = bad["value"]["error"].as_str().unwrap();
    assert!(
        error.contains("--max-failures") && error.contains("lots"),
        "{error}"
    );
    let update = &session["update"];
    assert_eq!(update["value"]["generation"], 1, "{update}");
    println!("phases seen: {}", session["phases_seen"]);
    let history = session["history"]["value"]["rollouts"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["outcome"], "completed");
    assert_eq!(history[0]["target_hash"], h2.as_str());
    assert!(
        history[0]["started_by"]
            .as_str()
            .unwrap()
            .contains("operator"),
        "{history:?}"
    );
    crate::harness::wait_all_on(&cluster, &h2).await;
}
