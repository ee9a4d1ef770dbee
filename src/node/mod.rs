//! The composition root of a node: open the store, start Raft, serve gRPC, join or
//! bootstrap, report itself to the cluster, and shut down gracefully.
//!
//! `run` takes its shutdown signal as an argument (the CLI passes SIGTERM/SIGINT), so the
//! same code runs under systemd, under `cluster supervise`, and inside tests.

mod cluster;
pub mod dashboard;
mod handle;
mod health;
mod http;
mod members;
mod metrics;
mod quorum;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::InitializeError;
use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

pub use handle::NodeHandle;
use handle::NOT_THE_LEADER;
pub use health::HealthState;

use crate::agent::Agent;
use crate::api::{ApiError, ErrorKind, JoinRequest};
use crate::raft::network::{Network, RaftHandler};
use crate::raft::{Raft, Timing, TypeConfig};
use crate::raft_store::{self, StoreError};
use crate::rpc::{Channels, ControlClient};
use crate::state::{Command, NodeInfo, PROTOCOL};
use crate::supervise::{Stuck, Supervision};
use crate::tls::{Identity, Security};
use openraft::async_runtime::WatchReceiver;

/// A node's validated configuration (see `cli` for where it comes from).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's Raft id: unique in the cluster, never reused for another machine.
    pub id: u64,
    /// Where to listen; port 0 picks a free port (written to `<data-dir>/node.addr`).
    pub listen: SocketAddr,
    /// The address peers should use, when it differs from `listen` (e.g. listening on 0.0.0.0).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// Initialize a new cluster with this node as its first voter (harmless on restart).
    pub bootstrap: bool,
    /// Address of any member to ask for admission.
    pub join: Option<String>,
    pub timing: Timing,
    /// The node's own health check (`sh -c` in the data dir; exit 0 = healthy).
    pub health_command: Option<String>,
    /// Automatic rollouts while this node leads.
    pub auto: crate::rollout::AutoConfig,
    /// Who restarts the node when it exits (detected once, at start).
    pub supervision: Supervision,
    /// Mutual TLS with this node's credentials, or plaintext (`--insecure`).
    pub security: Security,
    /// The keys a release must be signed with for this node to install, offer or activate
    /// it (`release_keys`, `--release-key`); empty: any release, signed or not.
    pub release_keys: crate::release::TrustedKeys,
    /// While this node leads, joins beyond this many voters stay learners, and removing a
    /// voter promotes a caught-up learner back up to it (`--max-voters`, default 5).
    pub max_voters: usize,
    /// How the process writes its log (`--log-format`); installed by the CLI before the
    /// node starts.
    pub log_format: crate::logs::LogFormat,
    /// Where to serve Prometheus metrics over HTTP (`--metrics-listen`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the read-only dashboard over HTTP (`--dashboard-listen`).
    pub dashboard_listen: Option<SocketAddr>,
    /// Where the leader POSTs rollout notifications (`--notify-url`).
    pub notify_urls: Vec<crate::notify::NotifyUrl>,
    /// The operator's labels for this node (`labels` in node.toml, `--label`).
    pub labels: BTreeMap<String, String>,
}

/// The default of `--max-voters`: five voters lose two and keep a quorum; more make every
/// commit wait for more acknowledgements.
pub const DEFAULT_MAX_VOTERS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir {path} is not usable: {source}: create it, or give the node a writable --data-dir")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}: is another node running there? pick another --listen port")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve the {what} on {addr}: {source}: pick another --{flag} address")]
    SideListen {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {0} needs --advertise <host:port>: the address other nodes can reach this one at")]
    NeedAdvertise(SocketAddr),
    #[error(transparent)]
    SideTls(#[from] http::SideTlsError),
    /// Recording the node's address (`node.addr`) in the data dir failed.
    #[error("data dir {path} is not usable: {source}: give the node a writable --data-dir")]
    RecordAddress {
        path: PathBuf,
        #[source]
        source: crate::fs::IoError,
    },
    /// The Raft core stopped on its own (a storage error such as a full disk, or a bug):
    /// the node exits rather than answer with what its core last knew.
    #[error("the Raft core stopped: {0}: the node exits; freeing the disk (or whatever the error names) and starting it again recovers it from its log")]
    RaftStopped(String),
    /// The count of this node's process starts (`incarnation`) cannot be read or
    /// recorded.
    #[error("{path}: {problem}: the node counts its starts there; if it is damaged, write into it a number above any count it held (for example 100000): a lower count would let this node's requests be refused as old")]
    Incarnation { path: PathBuf, problem: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("releases: {0}")]
    Releases(#[source] crate::release::StoreError),
    #[error("invalid Raft timing: {0}")]
    Timing(#[source] openraft::ConfigError),
    #[error("raft: {0}")]
    Raft(#[source] openraft::error::Fatal<TypeConfig>),
    #[error("raft: bootstrap failed: {0}")]
    Bootstrap(#[source] openraft::error::RaftError<TypeConfig, InitializeError<TypeConfig>>),
    #[error("cannot join the cluster through {via}: {source}")]
    Join {
        via: String,
        #[source]
        source: ApiError,
    },
    #[error("the certificate in {dir} is for {found}, and this is node {id}: give the node the credentials `cluster tls issue --node {id}` made")]
    WrongCertificate {
        dir: PathBuf,
        found: crate::tls::Identity,
        id: u64,
    },
    #[error("the gRPC server stopped: {0}")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why a node that ran stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` completed.
    Shutdown,
    /// A rollout asked the node to restart into the release `current` now points at.
    Restart,
}

/// Runs a node until `shutdown` completes or a restart is requested, then stops it
/// gracefully. Restarting is the caller's job (see [`Supervision`]).
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Stopped, NodeError> {
    match config.security.credentials() {
        Some(credentials) if credentials.identity != Identity::Node(config.id) => {
            return Err(NodeError::WrongCertificate {
                dir: credentials.dir.clone(),
                found: credentials.identity.clone(),
                id: config.id,
            })
        }
        Some(_) => {}
        None => tracing::warn!(
            id = config.id,
            "--insecure: plaintext, no authentication: anyone who can reach this node's \
             port can run code on every node of the cluster"
        ),
    }
    // Descriptors a supervisor kept for this node (its services' ingresses), before
    // anything else opens a file.
    crate::service::sockets::receive_at_start();
    prepare_data_dir(&config.data_dir)?;
    // The store first: "locked by another node" says more than the port that node holds.
    let (log_store, sm) = raft_store::open(&config.data_dir).await?;
    let incarnation = next_incarnation(&config.data_dir)?;
    let listen = crate::fs::reuse_recorded_port(&config.data_dir, "node.addr", config.listen);
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| NodeError::Listen {
        addr: listen,
        source,
    })?;

    // Bound now, so that an address in use stops the start with its reason.
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(addr) => Some(bind_http(&config.data_dir, SideListener::Metrics, addr).await?),
    };
    let dashboard_listener = match config.dashboard_listen {
        None => None,
        Some(addr) => Some(bind_http(&config.data_dir, SideListener::Dashboard, addr).await?),
    };
    let side_tls = match config.security.credentials() {
        Some(credentials) => http::SideTls::mutual(credentials)?,
        None => http::SideTls::plain(),
    };

    let channels = Channels::new(&config.security);
    let addr = match &config.advertise {
        Some(advertise) => advertise.clone(),
        None if bound.ip().is_unspecified() => return Err(NodeError::NeedAdvertise(bound)),
        None => bound.to_string(),
    };
    crate::fs::write_atomically(&config.data_dir, "node.addr", addr.as_bytes()).map_err(
        |source| NodeError::RecordAddress {
            path: config.data_dir.clone(),
            source,
        },
    )?;

    let network = Network {
        id: config.id,
        channels: channels.clone(),
    };
    let raft_config = crate::raft::config(config.timing).map_err(NodeError::Timing)?;
    let raft = Raft::new(config.id, raft_config, network, log_store, sm.clone())
        .await
        .map_err(NodeError::Raft)?;
    // Nothing reads the metrics (membership, above all) before they show the store's state.
    crate::raft::restored(&raft)
        .await
        .map_err(NodeError::RaftStopped)?;

    let restart = Arc::new(Notify::new());
    let term_raft = raft.clone();
    let agent = Arc::new(
        Agent::open(
            &config.data_dir,
            channels.clone(),
            Arc::new(move || crate::raft::metrics(&term_raft).current_term),
            restart.clone(),
            running_build_hash(),
            config.release_keys.clone(),
        )
        .map_err(NodeError::Releases)?,
    );
    if config.release_keys.is_empty() {
        tracing::info!("no release keys configured: releases are accepted signed or not");
    } else {
        tracing::info!(keys = ?config.release_keys.ids(), "accepting only releases signed by these keys");
    }
    let supervision = config.supervision;
    // Reported on every start until the next upgrade; an unreadable record must not keep
    // the node down.
    let last_auto_restore =
        crate::agent::guard::last_restore(&config.data_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "boot guard record");
            None
        });
    if let Some(restore) = &last_auto_restore {
        tracing::warn!(
            failed = %restore.to,
            restored = %restore.from,
            generation = restore.generation,
            "this node restored itself: {}",
            restore.reason
        );
    }
    let health = match &config.health_command {
        Some(_) => HealthState::pending(),
        None => HealthState::default(),
    };
    // The operator's services of `current`: adopted if a previous process of this node
    // left them running, started (or cut over) otherwise.
    let services = Arc::new(crate::service::Services::start(&config.data_dir));
    let notes = crate::rollout::Notes::default();
    let node = Arc::new(NodeHandle {
        id: config.id,
        addr: addr.clone(),
        raft: raft.clone(),
        sm: sm.clone(),
        channels,
        timing: config.timing,
        info: std::sync::RwLock::new(NodeInfo {
            addr: addr.clone(),
            build_hash: running_build_hash(),
            protocol: PROTOCOL,
            boot_id: random_hex(8),
            started_at_ms: crate::clock::unix_ms(),
            supervision: supervision.name().to_string(),
            last_auto_restore,
            insecure: config.security.credentials().is_none(),
            labels: config.labels.clone(),
        }),
        agent: agent.clone(),
        health: health.clone(),
        services: services.clone(),
        notes: notes.clone(),
        max_voters: config.max_voters,
        incarnation,
    });
    tracing::info!(
        id = config.id,
        %addr,
        build = %node.info().build_hash,
        supervision = %supervision.name(),
        "node starting"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let health_check = config.health_command.clone().map(|command| {
        tokio::spawn(health::run(
            command,
            config.data_dir.clone(),
            health,
            stop_rx.clone(),
        ))
    });
    // Not serving until this node is a member that knows its leader.
    let (serving_tx, serving_rx) = watch::channel(false);
    let contact = Arc::new(crate::raft::LeaderContact::default());
    let published = tokio::spawn(publish_health(
        raft.clone(),
        config.id,
        contact.clone(),
        config.timing.election_timeout * 2,
        serving_tx,
        stop_rx.clone(),
    ));
    let scheme = side_tls.scheme();
    let metrics_server = metrics_listener.map(|(listener, bound)| {
        tracing::info!(addr = %bound, "serving Prometheus metrics at {scheme}://{bound}/metrics");
        let scrape = metrics::Scrape {
            node: node.clone(),
            contact: contact.clone(),
            lease: config.timing.election_timeout * 2,
        };
        let app = metrics::app(scrape);
        tokio::spawn(http::serve(
            listener,
            side_tls.clone(),
            app,
            "metrics",
            stop_rx.clone(),
        ))
    });
    let dashboard_server = dashboard_listener.map(|(listener, bound)| {
        tracing::info!(addr = %bound, "serving the dashboard at {scheme}://{bound}/");
        let app = dashboard::node_app(node.clone());
        tokio::spawn(http::serve(
            listener,
            side_tls.clone(),
            app,
            "dashboard",
            stop_rx.clone(),
        ))
    });
    let notifier = (!config.notify_urls.is_empty()).then(|| {
        let raft = raft.clone();
        let leads = move || crate::raft::metrics(&raft).state == openraft::ServerState::Leader;
        tokio::spawn(crate::notify::run(
            config.notify_urls.clone(),
            config.id,
            leads,
            stop_rx.clone(),
        ))
    });
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(crate::rpc::serve(
        listener,
        config.security.clone(),
        Arc::new(RaftMembership { raft: raft.clone() }),
        Arc::new(RaftHandler::new(raft.clone(), contact.clone())),
        node.clone(),
        agent.clone(),
        serving_rx,
        async move {
            let _ = server_stop.wait_for(|stop| *stop).await;
        },
    ));

    let started = async {
        if config.bootstrap && !raft.is_initialized().await.unwrap_or(true) {
            let members = BTreeMap::from([(config.id, BasicNode { addr: addr.clone() })]);
            raft.initialize(members)
                .await
                .map_err(NodeError::Bootstrap)?;
            tracing::info!(id = config.id, "bootstrapped a new cluster");
        }
        if let Some(via) = &config.join {
            join_cluster(&node, via).await?;
        }
        Ok::<_, NodeError>(())
    };
    tokio::pin!(shutdown);
    // A stop during bootstrap or join is a graceful stop too.
    let (outcome, stopping) = tokio::select! {
        result = started => (result, false),
        _ = &mut shutdown => (Ok(()), true),
    };
    let reporter = tokio::spawn(report_self(node.clone(), stop_rx.clone()));
    let follower = tokio::spawn(follow_build(
        node.clone(),
        agent.running_build(),
        stop_rx.clone(),
    ));
    let rollouts = tokio::spawn(crate::rollout::drive::drive(
        node.clone(),
        notes.clone(),
        stop_rx.clone(),
    ));
    let gates = tokio::spawn(crate::rollout::analyze::analyze(
        node.clone(),
        stop_rx.clone(),
    ));
    let automatic = tokio::spawn(crate::rollout::watch::run(
        node.clone(),
        notes.clone(),
        config.auto.clone(),
        stop_rx.clone(),
    ));

    let outcome = match outcome {
        Err(e) => Err(e),
        Ok(()) if stopping => Ok(Stopped::Shutdown),
        Ok(()) => {
            tokio::pin!(server);
            tokio::select! {
                _ = &mut shutdown => Ok(Stopped::Shutdown),
                _ = restart.notified() => {
                    match supervision {
                        Supervision::Unsupervised => tracing::info!(id = config.id, "restarting: re-executing the current release after a graceful shutdown"),
                        _ => tracing::info!(id = config.id, supervision = %supervision.name(), "restarting: exiting for the supervisor to start the current release"),
                    }
                    Ok(Stopped::Restart)
                }
                why = crate::raft::core_stopped(&raft) => {
                    tracing::error!(id = config.id, error = %why, "the Raft core stopped: exiting so that a supervisor starts the node again");
                    Err(NodeError::RaftStopped(why))
                }
                result = &mut server => Err(NodeError::Serve(match result {
                    Ok(Ok(())) => "exited".into(),
                    Ok(Err(e)) => e.into(),
                    Err(e) => e.into(),
                })),
            }
        }
    };

    tracing::info!(id = config.id, "node shutting down");
    // Instances outlive a restart (the next process adopts them); a final stop drains
    // them first, within their own drain and kill timeouts.
    services
        .finish(match outcome {
            Ok(Stopped::Shutdown) => crate::service::Ending::Final,
            _ => crate::service::Ending::Restart,
        })
        .await;
    crate::supervise::arm_stop_deadline(
        crate::supervise::STOP_DEADLINE,
        match (&outcome, supervision) {
            (Ok(Stopped::Shutdown), _) => Stuck::Exit(0),
            (Ok(Stopped::Restart), Supervision::Unsupervised) => {
                Stuck::Reexec(config.data_dir.clone())
            }
            (Ok(Stopped::Restart), _) => Stuck::Exit(crate::supervise::EXIT_RESTART),
            (Err(_), _) => Stuck::Exit(1),
        },
    );
    let _ = stop_tx.send(true);
    let _ = reporter.await;
    let _ = follower.await;
    let _ = published.await;
    for task in [metrics_server, dashboard_server, notifier]
        .into_iter()
        .flatten()
    {
        let _ = task.await;
    }
    let _ = rollouts.await;
    let _ = gates.await;
    let _ = automatic.await;
    if let Some(task) = health_check {
        let _ = task.await;
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    drop(node);
    sm.flush().await;
    outcome
}

/// Keeps the node's serving signal (its gRPC health) current: true while this node is a
/// member of a cluster whose leader it has heard from within `lease` (two election
/// timeouts, the liveness `member list` uses) and its Raft core runs; false otherwise,
/// and from the moment it starts shutting down (so a load balancer stops sending before
/// the port closes).
async fn publish_health(
    raft: Raft,
    id: u64,
    contact: Arc<crate::raft::LeaderContact>,
    lease: Duration,
    serving: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    // A lease runs out with no metrics change: look again at least this often.
    let mut tick = tokio::time::interval(lease / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let up = {
            let m = metrics.borrow_and_update();
            crate::raft::has_live_leader(&m, id, contact.age(), lease)
        };
        serving.send_if_modified(|was| std::mem::replace(was, up) != up);
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    serving.send_replace(false);
}

/// Who is a member, and who leads which term, as this node's Raft sees it: what the
/// authorization layer asks.
struct RaftMembership {
    raft: Raft,
}

impl crate::rpc::Membership for RaftMembership {
    fn admits(&self, id: u64) -> bool {
        let metrics = crate::raft::metrics(&self.raft);
        let membership = metrics.membership_config.membership();
        let mut nodes = membership.nodes().peekable();
        // A node with no membership yet is joining: its first leader is not known.
        nodes.peek().is_none() || membership.get_node(&id).is_some()
    }

    fn leader_of(&self, term: u64) -> Option<u64> {
        let metrics = crate::raft::metrics(&self.raft);
        (metrics.current_term == term)
            .then_some(metrics.current_leader)
            .flatten()
    }

    fn has_addr(&self, addr: &str) -> bool {
        let metrics = crate::raft::metrics(&self.raft);
        let membership = metrics.membership_config.membership();
        let found = membership.nodes().any(|(_, node)| node.addr == addr);
        found
    }
}

/// The HTTP listeners beside the node port.
#[derive(Clone, Copy)]
enum SideListener {
    Metrics,
    Dashboard,
}

/// Binds `addr` for `side`, reusing the port recorded in the data dir when `addr` asks
/// for port 0, and records the bound address there (`metrics.addr`, `dashboard.addr`).
async fn bind_http(
    data_dir: &Path,
    side: SideListener,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), NodeError> {
    let (what, flag, file) = match side {
        SideListener::Metrics => ("Prometheus metrics", "metrics-listen", "metrics.addr"),
        SideListener::Dashboard => ("dashboard", "dashboard-listen", "dashboard.addr"),
    };
    let addr = crate::fs::reuse_recorded_port(data_dir, file, addr);
    let refused = |source| NodeError::SideListen {
        what,
        flag,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(refused)?;
    let bound = listener.local_addr().map_err(refused)?;
    crate::fs::write_atomically(data_dir, file, bound.to_string().as_bytes()).map_err(
        |source| NodeError::RecordAddress {
            path: data_dir.to_path_buf(),
            source,
        },
    )?;
    Ok((listener, bound))
}

/// Where a node counts its process starts, in the data dir.
const INCARNATION_FILE: &str = "incarnation";

/// Counts this process start in `dir` (durably, before the node sends any request) and
/// returns the count: 1 on a node's first start.
fn next_incarnation(dir: &Path) -> Result<u64, NodeError> {
    let path = dir.join(INCARNATION_FILE);
    let fail = |problem: String| NodeError::Incarnation {
        path: path.clone(),
        problem,
    };
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| fail(format!("holds {:?}, not a count", text.trim())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(fail(e.to_string())),
    };
    let next = previous
        .checked_add(1)
        .filter(|n| *n < 1 << 32)
        .ok_or_else(|| fail(format!("holds {previous}, too many starts")))?;
    crate::fs::write_atomically(dir, INCARNATION_FILE, format!("{next}\n").as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(next)
}

/// Creates the data dir and proves it writable before anything else touches it.
fn prepare_data_dir(dir: &Path) -> Result<(), NodeError> {
    let fail = |source| NodeError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// Asks the member at `via` to admit this node, unless it already is a member.
async fn join_cluster(node: &NodeHandle, via: &str) -> Result<(), NodeError> {
    // This node, at this address, a voter in the membership it has applied: committed, so
    // no later leader can take it back (an entry merely received could be truncated). A
    // learner is not done: its join promotes it.
    let is_voter = || {
        let applied = node.sm.applied_membership();
        let membership = applied.membership();
        membership.voter_ids().any(|id| id == node.id)
            && membership
                .get_node(&node.id)
                .is_some_and(|member| member.addr == node.addr)
    };
    if crate::raft::metrics(&node.raft)
        .membership_config
        .membership()
        .get_node(&node.id)
        .is_some()
    {
        tracing::info!(id = node.id, "already a member; rejoining with local state");
        return Ok(());
    }
    let request = JoinRequest {
        id: node.id,
        addr: node.addr.clone(),
        cluster_id: node.sm.read(|s| s.cluster_id.clone()),
    };
    let fail = |source: ApiError| NodeError::Join {
        via: via.to_string(),
        source,
    };
    let addrs: Vec<&str> = via
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let clients = addrs
        .iter()
        .map(|addr| ControlClient::with_channels(&node.channels, addr))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    if clients.is_empty() {
        return Err(fail(ApiError::new(
            ErrorKind::InvalidArgument,
            "--join names no address",
        )));
    }
    // Members may be starting up, and only the leader admits a node: go round the list,
    // retrying "unavailable" and "not the leader" for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    loop {
        let client = &clients[round % clients.len()];
        round += 1;
        let answer = client
            .clone()
            .timeout(Duration::from_secs(90))
            .join(&request)
            .await;
        if let Err(e) = &answer {
            // The leader may have admitted this node and then failed to answer (it died,
            // or the connection broke): the membership this node now holds says so.
            if is_voter() {
                tracing::info!(
                    id = node.id,
                    error = %e,
                    "joined the cluster as a voter: the leader admitted this node, though its answer was lost"
                );
                return Ok(());
            }
        }
        let retry = match &answer {
            Err(e) if e.kind == ErrorKind::Unavailable => true,
            Err(e) if e.message.contains(NOT_THE_LEADER) => clients.len() > 1,
            _ => false,
        };
        if retry && Instant::now() < deadline {
            tracing::warn!(error = %answer.unwrap_err(), "join: trying again");
            if round % clients.len() == 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            continue;
        }
        match answer {
            Ok(accepted) if accepted.learner => {
                tracing::info!(
                    id = node.id,
                    cluster = %accepted.cluster_id,
                    leader = accepted.leader,
                    voters = accepted.voters,
                    "joined the cluster as a learner: it already has the leader's --max-voters \
                     voters; the leader promotes this node when a voter is removed"
                );
                return Ok(());
            }
            Ok(accepted) => {
                tracing::info!(
                    id = node.id,
                    cluster = %accepted.cluster_id,
                    leader = accepted.leader,
                    "joined the cluster as a voter"
                );
                return Ok(());
            }
            Err(e) => return Err(fail(e)),
        }
    }
}

/// Names the cluster if nobody has yet, and reports this node's `NodeInfo` once per start.
async fn report_self(node: Arc<NodeHandle>, mut stop: watch::Receiver<bool>) {
    let work = async {
        loop {
            if node.sm.read(|s| s.cluster_id.is_empty()) {
                // Every member may propose a name; the first one applied wins for good.
                let name = Command::InitCluster {
                    cluster_id: random_hex(8),
                };
                if let Err(e) = node.write(name, 0).await {
                    tracing::debug!(error = %e, "naming the cluster: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let report = Command::RegisterNode {
                id: node.id,
                info: node.info(),
            };
            match node.write(report, 0).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "reporting to the cluster: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    };
    tokio::select! {
        _ = work => tracing::info!(id = node.id, "reported to the cluster"),
        _ = stop.wait_for(|stop| *stop) => {}
    }
}

/// Follows the release this node runs when it changes without a restart (a release that
/// ships the running `bin/cluster`): its services cut over first, then the node reports
/// the new build, so a rollout's health poll sees it only with its services checked.
async fn follow_build(
    node: Arc<NodeHandle>,
    mut running: watch::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = running.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let hash = running.borrow_and_update().clone();
        node.services.reload().await;
        node.set_build(hash.clone());
        tracing::info!(id = node.id, build = %hash, "running release in place: same bin/cluster, no restart");
        report_self(node.clone(), stop.clone()).await;
    }
}

/// The build hash of the running binary: `buildHash` from the version.json of the release
/// it runs from (`<release>/bin/cluster` next to `<release>/version.json`), else "dev".
pub fn running_build_hash() -> String {
    let from_release = || -> Option<String> {
        let exe = std::env::current_exe().ok()?;
        let release = exe.parent()?.parent()?;
        let text = std::fs::read_to_string(release.join("version.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(json.get("buildHash")?.as_str()?.to_string())
    };
    from_release().unwrap_or_else(|| "dev".to_string())
}

fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_counts_one_more_and_a_damaged_count_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_incarnation(dir.path()).unwrap(), 1);
        assert_eq!(next_incarnation(dir.path()).unwrap(), 2);
        let path = dir.path().join(INCARNATION_FILE);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n");
        std::fs::write(&path, "garbage").unwrap();
        let err = next_incarnation(dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"garbage\", not a count"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
        std::fs::write(&path, "100000").unwrap();
        assert_eq!(next_incarnation(dir.path()).unwrap(), 100_001);
    }

    #[test]
    fn node_errors_keep_their_cause() {
        // Every timing the CLI accepts makes a valid configuration; an invalid one made by
        // hand shows the error keeps openraft's cause.
        let invalid = openraft::Config {
            election_timeout_min: 5,
            election_timeout_max: 1,
            ..Default::default()
        };
        let timing = invalid.validate().map_err(NodeError::Timing).unwrap_err();
        let cause = std::error::Error::source(&timing).expect("the config error");
        assert!(cause.is::<openraft::ConfigError>(), "{cause:?}");

        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let releases = crate::release::ReleaseStore::open(&not_a_dir)
            .map_err(NodeError::Releases)
            .expect_err("a file is no data dir");
        let cause = std::error::Error::source(&releases).expect("the release store error");
        assert!(cause.is::<crate::release::StoreError>(), "{cause:?}");
    }
}
