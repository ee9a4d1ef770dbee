//! `cluster demo` and `cluster local up`: a real supervised cluster on loopback.
//!
//! Each node gets a data dir with a release installed from a dist built out of the running
//! binary, and runs under `cluster supervise`, exactly as a host without systemd would.
//! Releases are signed: a key pair is made for the cluster, every dist is stamped with
//! its private key, and every node trusts only its public key, as production nodes should.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use super::rollout::{update, FailureMode, UpdateArgs};
use super::Target;
use crate::release::keys::{self, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE};
use crate::release::{stamp_signed, Limits, ReleaseStore};
use crate::rpc::ControlClient;

#[derive(Args, Debug)]
pub struct LocalArgs {
    /// Number of nodes
    #[arg(short = 'n', long = "nodes", default_value_t = 3)]
    pub nodes: u64,
    /// Directory for the nodes' data dirs and logs [default: a new temp dir, removed on exit]
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Voters at most (each node's `--max-voters`): the nodes beyond join as learners, as
    /// in a large fleet [default: the nodes' own default, 5]
    #[arg(long, value_name = "N")]
    pub max_voters: Option<u64>,
}

/// Supervisor processes of a local cluster; stopped (SIGTERM, then wait) on drop.
struct LocalCluster {
    root: PathBuf,
    /// Remove `root` on drop (it was a temp dir we made).
    owned: bool,
    supervisors: Vec<Child>,
    addrs: Vec<String>,
    /// The operator's credentials, issued by the cluster's own CA.
    operator: super::tls::Auth,
}

impl LocalCluster {
    fn client(&self, addr: &str) -> anyhow::Result<ControlClient> {
        Ok(ControlClient::with_channels(
            &self.operator.channels()?,
            addr,
        )?)
    }
}

/// A CA for the local cluster under `root/tls`, a node certificate per node, and an
/// operator certificate: a local cluster is secure by default too.
fn make_credentials(root: &Path, nodes: u64) -> anyhow::Result<PathBuf> {
    use crate::tls::{init_ca, issue, Identity, DEFAULT_VALIDITY};
    let tls = root.join("tls");
    let ca = tls.join("ca");
    if !ca.join(crate::tls::CA_CERT).exists() {
        init_ca(&ca)?;
    }
    for id in 1..=nodes {
        let dir = tls.join(format!("n{id}"));
        if !dir.join(crate::tls::CERT).exists() {
            issue(&dir, &ca, &Identity::Node(id), DEFAULT_VALIDITY)?;
        }
    }
    let operator = tls.join("operator");
    if !operator.join(crate::tls::CERT).exists() {
        issue(
            &operator,
            &ca,
            &Identity::Operator("local".into()),
            DEFAULT_VALIDITY,
        )?;
    }
    Ok(tls)
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &self.supervisors {
            // SAFETY: kill(2) on our own children.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        for child in &mut self.supervisors {
            let _ = child.wait();
        }
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The cluster's release key pair in `dir`: the one already there, or a new one.
struct ReleaseKey {
    /// Signs the dists.
    private_key: PathBuf,
    /// What every node trusts (`--release-key`).
    public_key: PathBuf,
    key_id: String,
}

fn release_key(dir: &Path) -> anyhow::Result<ReleaseKey> {
    let (private_key, public_key) = (dir.join(PRIVATE_KEY_FILE), dir.join(PUBLIC_KEY_FILE));
    let key_id = if private_key.exists() && public_key.exists() {
        let key = keys::read_signing_key(&private_key)?;
        if key.verifying_key() != keys::read_public_key(&public_key)? {
            bail!(
                "{} and {} are not one key pair: remove both to make a new pair",
                private_key.display(),
                public_key.display()
            );
        }
        crate::release::signature::key_id(&key.verifying_key())
    } else {
        keys::keygen(dir)?.key_id
    };
    Ok(ReleaseKey {
        private_key,
        public_key,
        key_id,
    })
}

/// Builds a dist from the running binary in `dir`, plus `extra` files, signed with
/// `key`; returns its hash.
fn make_dist(dir: &Path, extra: &[(&str, &str)], key: &ReleaseKey) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().context("finding the running binary")?;
    std::fs::create_dir_all(dir.join("bin"))?;
    let binary = dir.join("bin/cluster");
    std::fs::copy(&exe, &binary)
        .with_context(|| format!("copying {} into the dist", exe.display()))?;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
    for (path, content) in extra {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, content)?;
    }
    let signer = keys::read_signing_key(&key.private_key)?;
    Ok(stamp_signed(dir, &Limits::default(), Some(&signer))?.build_hash)
}

fn wait_for_file(path: &Path, deadline: Instant) -> anyhow::Result<String> {
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return Ok(text);
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear in time", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a local cluster lives: `dir`, or a new temp dir (removed when the cluster stops).
fn cluster_root(dir: Option<PathBuf>) -> anyhow::Result<(PathBuf, bool)> {
    Ok(match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            (dir, false)
        }
        None => (
            tempfile::Builder::new()
                .prefix("cluster-local-")
                .tempdir()?
                .keep(),
            true,
        ),
    })
}

/// Starts `nodes` supervised nodes in `root` on release `dist`, trusting only releases
/// signed with `key`, and waits for a leader and n voters.
async fn start(
    nodes: u64,
    (root, owned): (PathBuf, bool),
    dist: &Path,
    key: &ReleaseKey,
    max_voters: Option<u64>,
) -> anyhow::Result<LocalCluster> {
    let tls = make_credentials(&root, nodes)?;
    let mut cluster = LocalCluster {
        root: root.clone(),
        owned,
        supervisors: Vec::new(),
        addrs: Vec::new(),
        operator: super::tls::Auth {
            tls: Some(tls.join("operator")),
            insecure: false,
        },
    };
    let exe = std::env::current_exe()?;
    for id in 1..=nodes {
        let data = root.join(format!("n{id}"));
        let store = ReleaseStore::open(&data)?;
        let hash = store.install_dir(dist, &Limits::default())?;
        store.activate(&hash)?;
        drop(store);
        let _ = std::fs::remove_file(data.join("node.addr"));
        let log = std::fs::File::create(root.join(format!("n{id}.log")))?;
        let mut args: Vec<String> = vec![
            "supervise".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--".into(),
            "node".into(),
            "run".into(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--tls".into(),
            tls.join(format!("n{id}")).display().to_string(),
            "--release-key".into(),
            key.public_key.display().to_string(),
        ];
        if let Some(max) = max_voters {
            args.extend(["--max-voters".into(), max.to_string()]);
        }
        match cluster.addrs.first() {
            None => args.push("--bootstrap".into()),
            Some(first) => args.extend(["--join".into(), first.clone()]),
        }
        let child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a supervisor")?;
        cluster.supervisors.push(child);
        let addr = wait_for_file(
            &data.join("node.addr"),
            Instant::now() + Duration::from_secs(30),
        )?;
        outln!("node {id}: {addr} (data {})", data.display());
        cluster.addrs.push(addr);
    }
    let client = cluster.client(&cluster.addrs[0])?;
    let max = max_voters.unwrap_or(crate::node::DEFAULT_MAX_VOTERS as u64);
    let want_voters = max.min(nodes);
    let limit = Duration::from_secs(60 + nodes);
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(status) = client
            .clone()
            .timeout(Duration::from_secs(2))
            .status(false)
            .await
        {
            let voters = status.nodes.iter().filter(|n| n.role == "voter").count() as u64;
            let members = status.nodes.len() as u64;
            let reported = status.nodes.iter().all(|n| !n.build_hash.is_empty());
            if status.leader.is_some() && voters == want_voters && members == nodes && reported {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not form within {} s; logs are in {}",
                limit.as_secs(),
                root.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(cluster)
}

async fn print_status(cluster: &LocalCluster, addr: &str) -> anyhow::Result<()> {
    let status = cluster.client(addr)?.status(false).await?;
    outln!("{}", super::output::render_status(&status));
    Ok(())
}

/// The sample service's definition in a demo release: `cluster sample-service` (this
/// binary) answering `version` at `/version`, on an ingress each node picks.
fn sample_service(version: &str) -> String {
    format!(
        "# The sample service: this release's own binary, serving HTTP on the ingress the\n\
         # node holds for it (port 0: each node picks a port, kept across restarts).\n\
         [[service]]\nname = \"web\"\nexec = \"bin/cluster\"\n\
         args = [\"sample-service\", \"--version-text\", \"{version}\"]\n\
         listen = \"127.0.0.1:0\"\nstart_grace = \"20s\"\ndrain_timeout = \"10s\"\n\
         [service.check]\nhttp = \"/healthz\"\ninterval = \"200ms\"\n"
    )
}

/// Waits until every node's sample service is ready on `hash`; each node's ingress.
async fn service_ingresses(cluster: &LocalCluster, hash: &str) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut ready = Vec::new();
        for addr in &cluster.addrs {
            let Ok(status) = cluster
                .client(addr)?
                .timeout(Duration::from_secs(2))
                .status(true)
                .await
            else {
                break;
            };
            let service = status
                .nodes
                .iter()
                .find(|n| &n.addr == addr)
                .and_then(|n| n.services.first().cloned());
            match service {
                Some(s)
                    if s.state == "ready"
                        && s.active.as_ref().is_some_and(|a| a.release == hash) =>
                {
                    ready.push(s.listen)
                }
                _ => break,
            }
        }
        if ready.len() == cluster.addrs.len() {
            return Ok(ready);
        }
        if Instant::now() > deadline {
            bail!(
                "the sample service was not ready on every node within 60 s; logs are in {}",
                cluster.root.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `cluster demo`: three supervised nodes, two releases, a rolling update, clean up.
pub async fn demo() -> anyhow::Result<ExitCode> {
    let work = tempfile::Builder::new().prefix("cluster-demo-").tempdir()?;
    outln!("== cluster dist keygen: the key pair that signs releases");
    let key = release_key(&work.path().join("keys"))?;
    outln!(
        "key {} (nodes trust {})",
        key.key_id,
        key.public_key.display()
    );
    outln!("== building two releases from this binary, signed with it; each runs the sample service (service.toml)");
    let v1 = work.path().join("dist-v1");
    let v2 = work.path().join("dist-v2");
    let (s1, s2) = (sample_service("v1"), sample_service("v2"));
    let h1 = make_dist(
        &v1,
        &[("share/motd", "release one\n"), ("service.toml", &s1)],
        &key,
    )?;
    let h2 = make_dist(
        &v2,
        &[("share/motd", "release two\n"), ("service.toml", &s2)],
        &key,
    )?;
    outln!("v1 {h1}\nv2 {h2}");
    outln!(
        "== starting 3 supervised nodes on v1, accepting only releases signed by key {}",
        key.key_id
    );
    let root = cluster_root(Some(work.path().join("nodes")))?;
    let cluster = start(3, root, &v1, &key, None).await?;
    let first = cluster.addrs[0].clone();
    let ingresses = service_ingresses(&cluster, &h1).await?;
    print_status(&cluster, &first).await?;
    outln!(
        "== load: 4 keep-alive connections to each node's service ingress ({}), GET /version back to back",
        ingresses.join(", ")
    );
    let load = super::load::Load::start(&ingresses, 4);
    outln!("== cluster update --dist {}", v2.display());
    let code = update(UpdateArgs {
        dist: v2,
        target: Target {
            node: first.clone(),
            auth: cluster.operator.clone(),
        },
        dry_run: false,
        detach: false,
        json: false,
        max_parallel: 1,
        on_failure: FailureMode::Revert,
        allow_downtime: false,
        health_deadline_ms: 30_000,
        poll_interval_ms: 200,
        stabilize_ms: 2_000,
        stale_ack_ms: None,
        soak_ms: 2_000,
        analysis: Vec::new(),
        steps: None,
        step_pause: None,
        progress_deadline: None,
        max_failures: None,
        selector: None,
        order_by: None,
    })
    .await?;
    // Every node serving v2, under load the whole time.
    let on_v2 = service_ingresses(&cluster, &h2).await;
    let tally = load.stop().await;
    outln!(
        "== load during the rollout: {} requests served, {} failed ({} connection errors, {} bad answers), slowest {} ms; answered by {}",
        tally.served,
        tally.failed(),
        tally.connection_errors,
        tally.bad_answers,
        tally.slowest.as_millis(),
        tally
            .versions
            .iter()
            .map(|(version, count)| format!("{version} ({count})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for example in &tally.examples {
        outln!("   failed: {example}");
    }
    outln!("== final status");
    // Any node: the one asked first may have just restarted.
    for addr in &cluster.addrs {
        if print_status(&cluster, addr).await.is_ok() {
            break;
        }
    }
    drop(cluster);
    on_v2?;
    if tally.failed() > 0 {
        bail!(
            "{} requests failed during the rollout: the cutover must lose none",
            tally.failed()
        );
    }
    Ok(code)
}

/// `cluster local up`: start supervised nodes and keep them until Ctrl-C.
pub async fn local_up(args: LocalArgs) -> anyhow::Result<ExitCode> {
    if args.nodes == 0 {
        bail!("-n must be at least 1");
    }
    if args.max_voters == Some(0) {
        bail!("--max-voters must be at least 1");
    }
    // Installed before any node starts: SIGTERM, like Ctrl-C, stops every node (it used to
    // end this process alone and leave the supervisors and their nodes running).
    let stop = super::shutdown_signal()?;
    let dists = tempfile::Builder::new().prefix("cluster-dist-").tempdir()?;
    let root = cluster_root(args.dir)?;
    // Kept with the nodes: a cluster started again in the same --dir trusts the same key.
    let key = release_key(&root.0.join("keys"))?;
    let dist = dists.path().join("dist");
    let hash = make_dist(&dist, &[], &key)?;
    outln!("release {hash}, signed by key {}", key.key_id);
    let cluster = start(args.nodes, root, &dist, &key, args.max_voters).await?;
    print_status(&cluster, &cluster.addrs[0]).await?;
    let operator = cluster.operator.tls.clone().unwrap_or_default();
    outln!(
        "\nThe nodes accept only releases signed by key {id}; sign a dist before rolling it out:\n  \
         cluster dist stamp <dir> --sign {private}\n\
         export CLUSTER_NODE={addr} CLUSTER_TLS={operator}   # then: cluster status, cluster update --dist <dir>\n\
         Ctrl-C stops every node.",
        id = key.key_id,
        private = key.private_key.display(),
        addr = cluster.addrs[0],
        operator = operator.display()
    );
    stop.await;
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}
