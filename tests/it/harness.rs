//! A multi-process test harness: real `cluster node run` processes on 127.0.0.1 with
//! OS-assigned ports and temp data dirs, waits on conditions with deadlines, and every
//! process killed when the harness is dropped (also when a test panics).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cluster::api::ClusterStatus;
use cluster::rpc::{AgentClient, Channels, ControlClient};
use cluster::tls::{Identity, Security};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_cluster");

/// Node ids the test CA issues certificates for.
pub const MAX_TEST_NODE: u64 = 12;

/// The test CA and its credentials, made once per test process under cargo's target
/// tmp dir (removed again by `cargo clean`): `ca/`, `n<id>/` for every node id up to
/// [`MAX_TEST_NODE`], `operator/`, `viewer/`, and `other-ca/` with `stranger/`, an
/// operator certificate of another CA.
pub fn tls_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        use cluster::tls::{init_ca, issue, DEFAULT_VALIDITY};
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = dir.join("ca");
        init_ca(&ca).expect("test CA");
        for id in 1..=MAX_TEST_NODE {
            issue(
                &dir.join(format!("n{id}")),
                &ca,
                &Identity::Node(id),
                DEFAULT_VALIDITY,
            )
            .expect("node certificate");
        }
        issue(
            &dir.join("operator"),
            &ca,
            &Identity::Operator("test".into()),
            DEFAULT_VALIDITY,
        )
        .expect("operator certificate");
        issue(
            &dir.join("viewer"),
            &ca,
            &Identity::Viewer("test".into()),
            DEFAULT_VALIDITY,
        )
        .expect("viewer certificate");
        init_ca(&dir.join("other-ca")).expect("other CA");
        issue(
            &dir.join("stranger"),
            &dir.join("other-ca"),
            &Identity::Operator("test".into()),
            DEFAULT_VALIDITY,
        )
        .expect("foreign certificate");
        dir
    })
}

/// The credentials directory `name` of the test CA (`operator`, `viewer`, `n3`, ...).
pub fn creds(name: &str) -> PathBuf {
    tls_dir().join(name)
}

/// Channels with the credentials `name` of the test CA.
pub fn channels_as(name: &str) -> Channels {
    Channels::new(&Security::load(&creds(name)).expect("test credentials"))
}

/// The operator's channels, shared by the clients of one thread. Not by the whole
/// process: a channel's connection task runs on the runtime that made it, and each test
/// has a runtime of its own, so a channel kept past its test fails every later request
/// with "Service was not ready" once the OS gives another test's node the same port.
/// A test's threads (its own and its runtime's workers) end with it.
pub fn operator_channels() -> Channels {
    thread_local! {
        static CHANNELS: Channels = channels_as("operator");
    }
    CHANNELS.with(Channels::clone)
}

/// A Control client for `addr` with the operator's credentials.
pub fn control(addr: &str) -> ControlClient {
    ControlClient::with_channels(&operator_channels(), addr).expect("client")
}

/// An Agent client for `addr` with the operator's credentials.
pub fn agent(addr: &str) -> AgentClient {
    AgentClient::with_channels(&operator_channels(), addr).expect("agent client")
}

/// Waits until `check` returns `Some`, polling every 20 ms; panics naming `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One node process and its files.
pub struct NodeProc {
    pub id: u64,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Known after the first start; reused on restart so the membership stays valid.
    pub addr: Option<String>,
    child: Option<Child>,
    /// How the last process ended, when the harness saw it end: "killed by the test",
    /// or the exit status it found (shown when a test fails).
    ended: Option<String>,
}

impl NodeProc {
    pub fn addr(&self) -> &str {
        self.addr.as_deref().expect("node has started once")
    }
}

pub enum Start<'a> {
    Bootstrap,
    Join(&'a str),
    /// Restart with the existing data dir and address.
    Restart,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, NodeProc>,
    /// Extra flags for every node (e.g. timing).
    pub flags: Vec<String>,
    /// Extra environment of one node's processes (its supervisor's too).
    pub node_env: BTreeMap<u64, Vec<(String, String)>>,
    /// Extra `node run` flags of one node (e.g. its labels).
    pub node_flags: BTreeMap<u64, Vec<String>>,
    /// Run nodes under `cluster supervise` from `<data>/current/bin/cluster`, with this
    /// dist installed as their first release.
    pub supervised: Option<PathBuf>,
    /// With `supervised`: run `<data>/current/bin/cluster` directly, with no supervisor
    /// (the node re-executes itself to restart).
    pub unsupervised: bool,
    /// A command that runs one node's command line (e.g. `ip netns exec NS`), and the
    /// address that node listens on (default 127.0.0.1).
    pub node_wrap: BTreeMap<u64, (Vec<String>, String)>,
}

impl Cluster {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("cluster-it-")
                .tempdir()
                .expect("temp dir"),
            nodes: BTreeMap::new(),
            flags: Vec::new(),
            node_env: BTreeMap::new(),
            node_flags: BTreeMap::new(),
            supervised: None,
            unsupervised: false,
            node_wrap: BTreeMap::new(),
        }
    }

    /// Like `start`, but every node runs under `cluster supervise` on release `dist`.
    pub async fn start_supervised(n: u64, dist: &Path) -> Self {
        Self::start_supervised_with(n, dist, &[]).await
    }

    /// `start_supervised` with extra `node run` flags for every node (paths in them are
    /// relative to the node's data dir where the flag runs something there, e.g.
    /// `--health-command`).
    pub async fn start_supervised_with(n: u64, dist: &Path, flags: &[&str]) -> Self {
        let mut cluster = Self::new();
        cluster.supervised = Some(dist.to_path_buf());
        cluster.flags = flags.iter().map(|f| f.to_string()).collect();
        cluster.form(n).await;
        cluster
    }

    /// Like `start_supervised`, but each node runs `<data>/current/bin/cluster` itself,
    /// with no supervisor.
    pub async fn start_unsupervised_on(n: u64, dist: &Path) -> Self {
        let mut cluster = Self::new();
        cluster.supervised = Some(dist.to_path_buf());
        cluster.unsupervised = true;
        cluster.form(n).await;
        cluster
    }

    /// The process id of node `id` (its supervisor's, when supervised).
    pub fn pid(&mut self, id: u64) -> Option<u32> {
        let node = self.nodes.get_mut(&id)?;
        match node.child.as_mut()?.try_wait() {
            Ok(None) => node.child.as_ref().map(Child::id),
            Ok(Some(status)) => {
                // Reaped: its pid may now be anyone's, so the handle must go (a later
                // kill would signal whatever process got the number).
                node.child = None;
                node.ended = Some(format!("exited by itself: {status}"));
                None
            }
            Err(_) => None,
        }
    }

    /// The node process of supervised node `id` (its supervisor's child), if it runs one.
    pub fn node_pid(&mut self, id: u64) -> Option<u32> {
        let supervisor = self.pid(id)?;
        let children =
            std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                .ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Starts `n` nodes: node 1 bootstraps, the others join through it; waits for n voters.
    pub async fn start(n: u64) -> Self {
        let mut cluster = Self::new();
        cluster.form(n).await;
        cluster
    }

    /// Starts `n` nodes as configured: node 1 bootstraps, the others join through it.
    pub async fn form(&mut self, n: u64) {
        self.spawn(1, Start::Bootstrap).await;
        let first = self.addr(1);
        for id in 2..=n {
            self.spawn(id, Start::Join(&first)).await;
        }
        self.wait_voters(n as usize).await;
        for id in 1..=n {
            assert!(
                self.pid(id).is_some(),
                "node {id} ended while the cluster formed:\n{}",
                self.logs()
            );
        }
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[&id].addr().to_string()
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().filter_map(|n| n.addr.clone()).collect()
    }

    pub fn client(&self, id: u64) -> ControlClient {
        control(&self.addr(id))
    }

    /// The command line of node `id` for `start` (without spawning it).
    pub fn command(&mut self, id: u64, start: Start<'_>) -> Command {
        let data_dir = self.dir.path().join(format!("n{id}"));
        let log = self.dir.path().join(format!("n{id}.log"));
        let node = self.nodes.entry(id).or_insert_with(|| NodeProc {
            id,
            data_dir: data_dir.clone(),
            log: log.clone(),
            addr: None,
            child: None,
            ended: None,
        });
        let (wrap, host) = self
            .node_wrap
            .get(&id)
            .cloned()
            .unwrap_or_else(|| (Vec::new(), "127.0.0.1".into()));
        let listen = node.addr.clone().unwrap_or_else(|| format!("{host}:0"));
        let wrapped = |program: &Path| match wrap.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(program);
                command
            }
            None => Command::new(program),
        };
        let mut command = wrapped(Path::new(BIN));
        if let Some(dist) = &self.supervised {
            let binary = data_dir.join("current/bin/cluster");
            if !data_dir.join("current").exists() {
                let out = cli(&[
                    "dist",
                    "install",
                    dist.to_str().unwrap(),
                    "--data-dir",
                    data_dir.to_str().unwrap(),
                ]);
                assert!(
                    out.status.success(),
                    "install: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if self.unsupervised {
                command = wrapped(&binary);
            } else {
                command
                    .arg("supervise")
                    .arg("--data-dir")
                    .arg(&data_dir)
                    .arg("--");
            }
        }
        command
            .args(["node", "run", "--id", &id.to_string(), "--listen", &listen])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&self.flags)
            .args(self.node_flags.get(&id).cloned().unwrap_or_default())
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.node_env.get(&id).cloned().unwrap_or_default())
            .env_remove("CLUSTER_TLS")
            .stdin(Stdio::null());
        if !self.flags.iter().any(|f| f == "--insecure" || f == "--tls") {
            command.arg("--tls").arg(creds(&format!("n{id}")));
        }
        match start {
            Start::Bootstrap => {
                command.arg("--bootstrap");
            }
            Start::Join(via) => {
                command.args(["--join", via]);
            }
            Start::Restart => {}
        }
        command
    }

    /// Spawns node `id` and waits until it listens (its address file appears).
    pub async fn spawn(&mut self, id: u64, start: Start<'_>) {
        let mut command = self.command(id, start);
        let node = self.nodes.get_mut(&id).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        command.stdout(log.try_clone().unwrap()).stderr(log);
        // Its own process group, so killing the group stops a supervisor and its node
        // together; and killed with the test process even if that dies without unwinding.
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        // SAFETY: prctl in the child before exec; async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let addr_file = node.data_dir.join("node.addr");
        let _ = std::fs::remove_file(&addr_file);
        node.child = Some(command.spawn().expect("spawn cluster binary"));
        node.ended = None;
        let addr = wait_for(
            &format!("node {id} to listen"),
            Duration::from_secs(60),
            || {
                let addr_file = addr_file.clone();
                async move { std::fs::read_to_string(&addr_file).ok() }
            },
        )
        .await;
        node.addr = Some(addr);
    }

    /// SIGKILL to the node's process group (supervisor included): no shutdown, no flush.
    pub fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).unwrap();
        if let Some(mut child) = node.child.take() {
            kill_group(&mut child);
            node.ended = Some("killed by the test".into());
        }
    }

    /// Waits up to `timeout` for node `id`'s process to exit by itself; its exit status,
    /// or `None` while it still runs.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.nodes.get_mut(&id).unwrap();
        loop {
            let child = node.child.as_mut().expect("node is running");
            if let Some(status) = child.try_wait().expect("wait") {
                node.child = None;
                node.ended = Some(format!("exited by itself: {status}"));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the exit status once the node has shut down.
    pub fn terminate(&mut self, id: u64) -> ExitStatus {
        let node = self.nodes.get_mut(&id).unwrap();
        let mut child = node.child.take().expect("node is running");
        node.ended = Some("stopped by the test (SIGTERM)".into());
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("node {id} did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The leader's view, asked through any running node.
    pub async fn status(&self) -> Option<ClusterStatus> {
        for node in self.nodes.values() {
            let Some(addr) = &node.addr else { continue };
            let client = control(addr);
            if let Ok(status) = client.timeout(Duration::from_secs(2)).status(false).await {
                if status.leader.is_some() {
                    return Some(status);
                }
            }
        }
        None
    }

    /// The leader's view once a leader has committed something in its term.
    pub async fn leader_status(&self) -> ClusterStatus {
        wait_for(
            "a leader with a commit index",
            Duration::from_secs(30),
            || async {
                let status = self.status().await?;
                status.commit_index.is_some().then_some(status)
            },
        )
        .await
    }

    /// Waits until a leader reports `n` voters, each following it.
    pub async fn wait_voters(&self, n: usize) -> ClusterStatus {
        wait_for(
            &format!("{n} voters and a leader"),
            Duration::from_secs(30),
            || async {
                let status = self.status().await?;
                let voters = status.nodes.iter().filter(|n| n.role == "voter").count();
                let settled = status
                    .nodes
                    .iter()
                    .all(|n| n.state == "leader" || n.state == "follower");
                (voters == n && settled).then_some(status)
            },
        )
        .await
    }

    /// Waits until the leader has committed `n` more entries than it had when asked: the
    /// cluster is taking writes (e.g. from a `Writer`) under its current leader.
    pub async fn wait_more_commits(&self, n: u64) {
        let before = self.leader_status().await.commit_index.unwrap_or(0);
        wait_for(
            &format!("{n} more commits after index {before}"),
            Duration::from_secs(30),
            || async { (self.status().await?.commit_index? > before + n).then_some(()) },
        )
        .await
    }

    /// Waits for a leader other than `not`.
    pub async fn wait_leader_other_than(&self, not: u64) -> u64 {
        wait_for("a new leader", Duration::from_secs(30), || async {
            let leader = self.status().await?.leader?;
            (leader != not).then_some(leader)
        })
        .await
    }

    /// The last lines of every node's log, for failure messages.
    /// Each node's state (running, or how it ended) on one line, then the tail of every
    /// node's log.
    pub fn logs(&mut self) -> String {
        let states: Vec<String> = self
            .nodes
            .values_mut()
            .map(|node| {
                let state = match node.child.as_mut().map(Child::try_wait) {
                    Some(Ok(None)) => "running".to_string(),
                    Some(Ok(Some(status))) => {
                        node.child = None;
                        let ended = format!("exited by itself: {status}");
                        node.ended = Some(ended.clone());
                        ended
                    }
                    Some(Err(e)) => format!("unknown: {e}"),
                    None => node.ended.clone().unwrap_or_else(|| "never started".into()),
                };
                format!("node {}: {state}", node.id)
            })
            .collect();
        let mut out = format!("--- nodes: {} ---\n", states.join("; "));
        for node in self.nodes.values() {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!(
                "--- node {} ({}) ---\n",
                node.id,
                node.log.display()
            ));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                kill_group(&mut child);
            }
        }
    }
}

/// SIGKILL to the process group of `child`, which must not have been reaped yet: until
/// `wait` below reaps it, its pid (the group's id) cannot be given to another process.
/// Every `try_wait` that sees a node end drops its handle for this reason.
fn kill_group(child: &mut Child) {
    // SAFETY: killpg(2) on a process group we created, whose leader is not reaped.
    unsafe {
        libc::killpg(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid we spawned; no memory is shared.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// For a test that cannot run here (`why`: what is missing and how to get it): outside CI
/// it says so and the caller returns, skipping; under CI (`CI` set, and not `0` or
/// `false`, as CI services set it) it fails, because CI must run every test and `.ci/run`
/// installs what they need.
pub fn skip_outside_ci(why: &str) {
    let ci = std::env::var("CI").unwrap_or_default();
    if !matches!(ci.to_ascii_lowercase().as_str(), "" | "0" | "false") {
        panic!("{why}: under CI={ci} a test that cannot run fails instead of skipping");
    }
    println!("SKIPPED: {why}");
}

/// Longest any one `cli` run may take: past it the process is killed and the test fails,
/// instead of hanging on a command that should have ended (the longest, `update` with a
/// soak, takes about a minute).
pub const CLI_DEADLINE: Duration = Duration::from_secs(300);

/// Runs the `cluster` binary to completion, within [`CLI_DEADLINE`], as the test
/// operator (`CLUSTER_TLS`) unless `args` choose credentials themselves.
pub fn cli(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args);
    as_operator(&mut command, args);
    output_within(command, CLI_DEADLINE)
}

/// Sets `CLUSTER_TLS` to the test operator's credentials, unless `args` say --insecure
/// or --tls.
pub fn as_operator(command: &mut Command, args: &[&str]) {
    if args.iter().any(|a| *a == "--insecure" || *a == "--tls") {
        command.env_remove("CLUSTER_TLS");
    } else {
        command.env("CLUSTER_TLS", creds("operator"));
    }
}

/// Runs `command` (stdin empty, output captured) to completion; kills it and panics if it
/// has not ended within `deadline`.
pub fn output_within(mut command: Command, deadline: Duration) -> std::process::Output {
    let shown = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match finished.recv_timeout(deadline) {
        Ok(output) => output.unwrap_or_else(|e| panic!("waiting for {shown}: {e}")),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("{shown} was still running after {deadline:?}: killed");
        }
    }
}

/// What a sequential writer saw.
#[derive(Debug)]
pub struct WriterReport {
    /// Every (key, value) a node acknowledged as committed.
    pub acked: Vec<(String, String)>,
    /// Longest time between two consecutive acknowledgements.
    pub max_gap: Duration,
    pub failed_attempts: usize,
}

/// One client writing `prefix-N` keys in sequence until stopped. On an error it moves on to
/// the next address, as a client with a list of endpoints would.
pub struct Writer {
    stop: watch::Sender<bool>,
    task: JoinHandle<WriterReport>,
}

/// Request timeout of the writer's client, stated next to every gap figure.
pub const WRITER_TIMEOUT: Duration = Duration::from_secs(2);

impl Writer {
    pub fn start(addrs: Vec<String>, prefix: &str) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let prefix = prefix.to_string();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed_attempts = 0;
            let mut max_gap = Duration::ZERO;
            let mut last_ack = Instant::now();
            let mut target = 0;
            let mut n = 0u64;
            let clients: Vec<ControlClient> = addrs
                .iter()
                .map(|addr| control(addr).timeout(WRITER_TIMEOUT))
                .collect();
            while !*stopped.borrow_and_update() {
                let key = format!("{prefix}-{n}");
                let value = format!("v{n}");
                match clients[target % clients.len()]
                    .clone()
                    .kv_put(&key, &value)
                    .await
                {
                    Ok(_) => {
                        max_gap = max_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                        acked.push((key, value));
                        n += 1;
                    }
                    Err(_) => {
                        failed_attempts += 1;
                        target += 1;
                        // A refused connection fails at once: do not spin on a dead node.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            WriterReport {
                acked,
                max_gap,
                failed_attempts,
            }
        });
        Self { stop, task }
    }

    pub async fn stop(self) -> WriterReport {
        let _ = self.stop.send(true);
        self.task.await.expect("writer task")
    }
}

/// Checks that every acknowledged write is readable (linearizably) through `addr`.
pub async fn assert_all_readable(addr: &str, acked: &[(String, String)]) {
    let client = control(addr);
    for (key, value) in acked {
        let got = client.clone().kv_get(key).await.expect("read");
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "acknowledged write {key} lost"
        );
    }
}

pub fn data_dir_of(cluster: &Cluster, id: u64) -> &Path {
    &cluster.nodes[&id].data_dir
}

/// A dist that runs the binary under test, plus `extra` files; stamped. Returns its
/// build hash. Its `bin/cluster` is a script of its own (naming the dist) that runs the
/// binary as `bin/cluster.real`: like two real builds, two such releases differ in
/// `bin/cluster`, so a node restarts to switch between them.
pub fn make_release(dir: &Path, extra: &[(&str, &str)]) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(BIN, dir.join("bin/cluster.real")).unwrap();
    let script = dir.join("bin/cluster");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# build {}\nexec \"$(dirname \"$0\")/cluster.real\" \"$@\"\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    write_extra(dir, extra);
    stamp(dir)
}

/// A dist whose `bin/cluster` is the binary under test itself, plus `extra` files:
/// every such release ships the same `bin/cluster`, so a node switches between them in
/// place, without a restart.
pub fn make_release_same_binary(dir: &Path, extra: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(BIN, dir.join("bin/cluster")).unwrap();
    write_extra(dir, extra);
    stamp(dir)
}

/// Shell lines that answer `--version` the way a cluster binary does, with the build
/// hash from the release's own version.json.
pub fn version_answer() -> String {
    format!(
        "if [ \"$1\" = --version ]; then\n  \
         h=$(sed -n 's/.*\"buildHash\": *\"\\([0-9a-f]*\\)\".*/\\1/p' \"$(dirname \"$0\")/../version.json\")\n  \
         echo \"cluster 0.1.0 (build $h, protocol {})\"\n  exit 0\nfi\n",
        cluster::state::PROTOCOL
    )
}

/// A dist whose `bin/cluster` is a shell script (e.g. one that exits at once).
/// The script answers `--version` as a cluster binary does (preflight starts it so on the
/// leader), and does what `script` says otherwise.
pub fn make_script_release(dir: &Path, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    let binary = dir.join("bin/cluster");
    let (shebang, body) = script.split_once('\n').unwrap_or((script, ""));
    let script = format!("{shebang}\n{}{body}", version_answer());
    std::fs::write(&binary, script).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    stamp(dir)
}

/// A dist whose `bin/cluster` runs the binary under test and kills it with `signal` once
/// it serves (answers `status --local`) on this start, and, with `marker`, once that file
/// exists in its data dir too: a release that starts, serves, and dies, again on every
/// start. The wait is a bounded poll, not a fixed delay, so a slow machine neither kills
/// the node before it serves nor lets it outlive the window a test gives it.
pub fn make_crash_loop_release(dir: &Path, signal: &str, marker: Option<&str>) -> String {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy(BIN, dir.join("bin/cluster.real")).unwrap();
    let marker_check = match marker {
        Some(name) => format!("[ -e \"$data/{name}\" ] && "),
        None => String::new(),
    };
    make_script_release(
        dir,
        &format!(
            r#"#!/bin/sh
d=$(dirname "$0")
data='' tls='' prev=''
for arg in "$@"; do
  [ "$prev" != --data-dir ] || data=$arg
  [ "$prev" != --tls ] || tls=$arg
  prev=$arg
done
(
  polls=0
  while kill -0 $$ 2>/dev/null && [ $polls -lt 1800 ]; do
    if {marker_check}"$d/cluster.real" status --local --tls "$tls" --node "$(cat "$data/node.addr")" >/dev/null 2>&1; then
      kill -{signal} $$
      exit 0
    fi
    sleep 0.1
    polls=$((polls + 1))
  done
) &
exec "$d/cluster.real" "$@"
"#
        ),
    )
}

fn write_extra(dir: &Path, extra: &[(&str, &str)]) {
    for (path, content) in extra {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}

pub fn stamp(dir: &Path) -> String {
    let out = cli(&["dist", "stamp", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "stamp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until every node reports `hash` as its running build.
pub async fn wait_all_on(cluster: &Cluster, hash: &str) {
    wait_for(
        &format!("every node on {hash}"),
        Duration::from_secs(60),
        || async {
            let status = cluster.leader_status().await;
            status
                .nodes
                .iter()
                .all(|n| {
                    n.build_hash == hash
                        && ["leader", "follower", "learner"].contains(&n.state.as_str())
                })
                .then_some(())
        },
    )
    .await
}

/// Runs `cluster update --json` on another thread, so a test can act on the cluster while
/// the rollout is in flight. A test that must act while a node stabilizes gives it a
/// window long enough for a loaded machine to notice and act.
pub fn update_in_background(
    addr: String,
    dist: std::path::PathBuf,
    stabilize_ms: u64,
    health_deadline_ms: u64,
) -> std::thread::JoinHandle<std::process::Output> {
    std::thread::spawn(move || {
        let deadline = health_deadline_ms.to_string();
        let stabilize = stabilize_ms.to_string();
        cli(&[
            "update",
            "--dist",
            dist.to_str().unwrap(),
            "--node",
            &addr,
            "--stabilize-ms",
            &stabilize,
            "--soak-ms",
            "0",
            // Not a staleness test: a loaded machine's slow acknowledgements must not fail it.
            "--stale-ack-ms",
            "2000",
            "--poll-interval-ms",
            "100",
            "--health-deadline-ms",
            &deadline,
            "--json",
        ])
    })
}

/// A webhook receiver (`tests/clients/webhook_receiver.py`: Python's http.server) that
/// records every body POSTed to it; killed with its test.
pub struct Webhook {
    child: Child,
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    events: PathBuf,
    _dir: tempfile::TempDir,
}

impl Webhook {
    /// A receiver that answers its first `fail_first` POSTs 503 (so they are retried).
    pub async fn start(fail_first: u32) -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let (addr_file, events) = (dir.path().join("hook.addr"), dir.path().join("events"));
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/webhook_receiver.py"
        );
        let child = Command::new("python3")
            .arg(script)
            .arg(&addr_file)
            .arg(&events)
            .arg(fail_first.to_string())
            .spawn()
            .expect("python3 runs the webhook receiver");
        let addr = wait_for("the webhook receiver", Duration::from_secs(30), || async {
            std::fs::read_to_string(&addr_file).ok()
        })
        .await;
        Webhook {
            child,
            url: format!("http://{addr}/hook"),
            events,
            _dir: dir,
        }
    }

    /// Every event received so far, in order.
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON event"))
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs of `size` mounted on `dir` for as long as it lives; unmounted on drop.
pub struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| SmallDisk {
            dir: dir.to_path_buf(),
        })
    }

    /// Frees what [`SmallDisk::fill`] took.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.dir.join("filler"));
    }

    /// Fills the filesystem up to its last byte.
    pub fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.dir.join("filler")).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        while file.write_all(&block).is_ok() {}
        let byte = [0u8; 1];
        while file.write_all(&byte).is_ok() {}
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
