//! Command-line interface: clap definitions, resolution of flags and config files into
//! validated configuration, and the commands. The only module that prints to stdout.

/// `println!` for the CLI: a closed stdout returns from the calling function with the
/// error (see [`output::line`]).
macro_rules! outln {
    () => {
        $crate::cli::output::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))?
    };
}

mod config;
mod demo;
mod dist;
mod load;
mod mcp;
mod member;
mod output;
mod rollout;
mod tls;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::rpc::ControlClient;

pub use output::is_broken_pipe;

/// A duration flag's value in milliseconds: a plain number is milliseconds (as the
/// `-ms` names say), anything else a humantime duration: `500ms`, `10s`, `3m`, `1h30m`.
pub fn millis(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let duration = humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}): give milliseconds, or e.g. 500ms, 10s, 3m")
    })?;
    u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

/// Exit status for "the operation ran and said no" (missing key, failed check).
pub const EXIT_FAILURE: u8 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "cluster",
    version,
    about = "A Raft-replicated rolling-update orchestrator",
    long_about = "A Raft-replicated rolling-update orchestrator.\n\n\
        Every host runs `cluster node run`; the nodes elect a leader with Raft and keep \
        a replicated record of the cluster. Other commands talk to any node (--node or \
        CLUSTER_NODE, default 127.0.0.1:7100); a node forwards what needs the leader.\n\n\
        Start a cluster:\n  \
        cluster node run --id 1 --listen 127.0.0.1:7101 --data-dir /tmp/n1 --bootstrap\n  \
        cluster node run --id 2 --listen 127.0.0.1:7102 --data-dir /tmp/n2 --join 127.0.0.1:7101\n  \
        cluster status --node 127.0.0.1:7101\n  \
        cluster member list --node 127.0.0.1:7101   (member remove <ID>: a dead machine)\n\n\
        Roll out a release (a directory with bin/cluster):\n  \
        cluster dist stamp ./dist   (--sign keys/release.key for nodes run with --release-key)\n  \
        cluster update --dist ./dist --dry-run\n  \
        cluster update --dist ./dist\n\n\
        Try it all on one machine: cluster demo"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run this machine's node (what systemd starts on every host)
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show the leader, the term, and every member's role, state, build and replication
    Status(StatusArgs),
    /// Operate Raft leadership
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// List the Raft members with their liveness, or remove one (a dead or retired machine)
    #[command(subcommand)]
    Member(member::MemberCommand),
    /// Read and write the replicated key/value map
    #[command(subcommand)]
    Kv(KvCommand),
    /// Roll a new release across the cluster, one node at a time, leader last
    #[command(
        long_about = "Roll a dist across the cluster without losing quorum.\n\n\
        The dist's missing content is uploaded to the leader. The leader runs preflight \
        (leadership confirmed by a quorum, how many voters can be lost, every node \
        reachable, serving and acknowledging, caught up, no rollout active, the dist valid \
        and, on a leader started with --release-key, signed by a key it trusts (see \
        `cluster dist --help`), disk room), then updates nodes one at a time (learners --max-parallel at a time), \
        itself last: back up, sync, verify, activate, restart, health poll, stabilize, \
        commit. A failure restores the node and, with --on-failure revert, every updated \
        node. Progress is printed until the rollout ends; it is replicated, so a new leader \
        finishes it if this one dies.\n\n\
        Exit status: 0 completed (or a dry run that would proceed), 2 preflight refused, \
        1 the rollout failed or was reverted."
    )]
    Update(rollout::UpdateArgs),
    /// Inspect and operate rollouts: status, history, pause/resume/abort, automatic rollouts on/off
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Start a real 3-node cluster on loopback, roll out a new release, show it, clean up
    Demo,
    /// Local clusters on loopback for trying things out
    #[command(subcommand)]
    Local(LocalCommand),
    /// Run the boot guard once: what systemd's ExecStartPre does before every start
    #[command(
        long_about = "Run the boot guard once, before a node starts (systemd runs it \
        as ExecStartPre; cluster supervise runs it itself). While a release activated by a \
        rollout is not yet committed, each start spends one of its tries; when none is left \
        the guard points `current` back at the previous release and records why (the node \
        reports it to the cluster: `cluster status`), so a release that cannot start is \
        undone with no leader reachable; a pending release missing from disk is undone at \
        once. A data dir with no pending upgrade is never touched, and no release is ever \
        deleted. Exit 1 with a reason if the record is unreadable, the release to restore \
        is missing, or `current` points at a release that is not there; nothing is \
        changed then."
    )]
    Guard {
        /// The node's data dir (holds `current` and boot.json)
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
    /// The sample service the demo and the tests roll out (takes its sockets by LISTEN_FDS)
    #[command(hide = true)]
    SampleService {
        /// What /version answers
        #[arg(long, default_value = "v1")]
        version_text: String,
        /// /healthz answers 503 from the start
        #[arg(long)]
        fail_health: bool,
        /// /healthz answers 200 for this long, then 503 (e.g. 3s)
        #[arg(long, value_parser = humantime::parse_duration)]
        healthy_for: Option<Duration>,
        /// With no sockets passed, bind this address (not socket-activated)
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// This share of requests to / answers 500 (0.05: every 20th)
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Every request to / takes this much longer (e.g. 700ms)
        #[arg(long, value_parser = humantime::parse_duration)]
        latency: Option<Duration>,
    },
    /// Run a node and start it again whenever it exits (for hosts without systemd)
    #[command(
        long_about = "Run `<data-dir>/current/bin/cluster <ARGS>` and start it again \
        whenever it exits, so a node that exits to switch releases comes back on the release \
        `current` now points at. SIGTERM/SIGINT are passed to the node; the supervisor exits \
        once it has. systemd plays this role in production.\n\n\
        Example: cluster supervise --data-dir /tmp/n1 -- node run --id 1 --listen 127.0.0.1:7101 --data-dir /tmp/n1 --bootstrap"
    )]
    Supervise {
        /// The node's data dir (holds `current`)
        #[arg(long)]
        data_dir: std::path::PathBuf,
        /// Arguments for the node binary, after `--`
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    #[command(subcommand, about = dist::ABOUT, long_about = dist::LONG_ABOUT)]
    Dist(DistAll),
    /// Make the cluster CA and certificates for nodes, operators and viewers (mutual TLS)
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Serve the Model Context Protocol on stdio: status, dry runs, updates and rollout operations as tools
    #[command(
        long_about = "Serve the Model Context Protocol (MCP) on stdin/stdout, for an \
        assistant or automation host. Tools (each with a JSON schema): cluster_status, \
        initiate_rolling_update (dist, dryRun, maxParallel, onFailure, stabilizeMs, \
        healthDeadlineMs, soakMs), rollout_status, rollout_history, rollout_pause, \
        rollout_resume, rollout_promote, rollout_abort. They act with this command's credentials (--tls or \
        CLUSTER_TLS): a viewer certificate reads, an operator's also acts.\n\n\
        In an MCP client's configuration:\n  \
        {\"command\": \"cluster\", \"args\": [\"mcp\", \"--node\", \"10.0.0.1:7100\", \"--tls\", \"/etc/cluster/operator\"]}"
    )]
    Mcp {
        #[command(flatten)]
        target: Target,
    },
    /// Serve the dashboard on this machine's loopback, read with your credentials
    #[command(
        long_about = "Serve the read-only dashboard (members, leader, builds, \
        acknowledgement ages, the active rollout's phases, history) on this machine's \
        loopback, reading the cluster through --node with your credentials (--tls or \
        CLUSTER_TLS; a viewer certificate is enough). Open the address it prints in a \
        browser; Ctrl-C stops it.\n\n\
        A node can serve the same page itself (node run --dashboard-listen), over HTTPS \
        for clients with a viewer or operator certificate.\n\n\
        Example:  cluster dashboard --node 10.0.0.1:7100 --listen 127.0.0.1:7180"
    )]
    Dashboard {
        #[command(flatten)]
        target: Target,
        /// Where to serve the page: a loopback address (port 0 picks one)
        #[arg(long, default_value = "127.0.0.1:7180")]
        listen: std::net::SocketAddr,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(long_about = "Print a completion script for SHELL on stdout.\n\n\
        bash:  cluster completions bash > /etc/bash_completion.d/cluster\n\
        zsh:   cluster completions zsh > \"${fpath[1]}/_cluster\"\n\
        fish:  cluster completions fish > ~/.config/fish/completions/cluster.fish")]
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one per command with --out-dir
    #[command(
        long_about = "Print the manual page of cluster on stdout, in roff. With \
        --out-dir, write one page per command there, git-style: cluster.1, \
        cluster-update.1, cluster-rollout-status.1, ...\n\n\
        Read it:     cluster man | man -l -\n\
        Install all: cluster man --out-dir /usr/local/share/man/man1 && mandb"
    )]
    Man {
        /// Write cluster.1 and a page for every subcommand in this directory
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum LocalCommand {
    /// Start supervised nodes on loopback (releases built from this binary) until Ctrl-C
    Up(demo::LocalArgs),
}

#[derive(Subcommand, Debug)]
enum DistAll {
    #[command(flatten)]
    Local(dist::DistCommand),
    /// Upload a dist to a node, sending only the chunks it holds in no release
    #[command(
        long_about = "Upload a dist to a node. The node reports which content chunks \
        it holds in none of its releases; only those cross the network. The dist becomes a \
        release the node holds (and serves to other nodes); nothing is activated. A node \
        started with --release-key refuses a dist not signed by a key it trusts \
        (`cluster dist stamp --sign`), before anything is sent."
    )]
    Push {
        /// The dist directory (contains bin/cluster)
        dir: std::path::PathBuf,
        #[command(flatten)]
        target: Target,
        /// Print JSON: {hash, fetched_bytes, fetched_chunks, reused_bytes, elapsed_ms,
        /// manifest_bytes}
        #[arg(long)]
        json: bool,
    },
    /// Have a node fetch a release from a peer, moving only the chunks it lacks
    #[command(
        long_about = "Have the node at --node materialize release <HASH>, which the peer \
        at --from holds. The node reads the manifest from the peer, as its difference from a \
        release the node holds when it holds one, and checks that it rebuilds to <HASH>; it \
        then fetches from the peer only the content chunks it holds in none of its releases, verifies every byte, \
        and keeps the result as a release (and serves it to other nodes). Nothing is \
        activated. A release the node already holds is not fetched again. The release's \
        signature comes with its manifest: a node started with --release-key refuses one \
        not signed by a key it trusts.\n\n\
        Example (after `cluster dist push ./dist --node 127.0.0.1:7101`):\n  \
        cluster dist fetch <HASH> --from 127.0.0.1:7101 --node 127.0.0.1:7102"
    )]
    Fetch {
        /// Build hash of the release (as `cluster dist releases --node <PEER_ADDR>` lists it)
        hash: String,
        /// Address (host:port) of the node that holds the release
        #[arg(long, value_name = "PEER_ADDR")]
        from: String,
        /// Address (host:port) of the node that fetches the release and keeps it
        #[arg(long, env = "CLUSTER_NODE", default_value = "127.0.0.1:7100")]
        node: String,
        #[command(flatten)]
        auth: tls::Auth,
        /// Print JSON: {hash, fetched_bytes, fetched_chunks, reused_bytes, elapsed_ms}
        #[arg(long)]
        json: bool,
    },
    /// List the releases a node holds, and which one is current
    Releases {
        #[command(flatten)]
        target: Target,
        /// Print JSON: {hashes, current, previous, free_bytes}
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Run a node in the foreground until SIGTERM or SIGINT (then shut down gracefully)
    #[command(
        long_about = "Run a node in the foreground until SIGTERM or SIGINT.\n\n\
        Every other flag can also be set in a TOML file given with --config, under its name \
        with _ for - (id, listen, data_dir, heartbeat_ms, metrics_listen, log_format, ...; \
        the repeatable flags as lists: release_keys = [...], notify_urls = [...]); flags \
        win, and unknown keys are errors.\n\n\
        The first node of a new cluster starts with --bootstrap; every other node starts \
        with --join <address of any member>. Restarting a node with the same --data-dir \
        rejoins with its state; --bootstrap and --join are then harmless."
    )]
    // Boxed: the node's flags outweigh every other command's.
    Run(Box<config::RunArgs>),
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Address (host:port) of any member of the cluster
    #[arg(long, env = "CLUSTER_NODE", default_value = "127.0.0.1:7100")]
    pub node: String,
    #[command(flatten)]
    pub auth: tls::Auth,
}

impl Target {
    fn client(&self) -> anyhow::Result<ControlClient> {
        Ok(ControlClient::with_channels(
            &self.auth.channels()?,
            &self.node,
        )?)
    }

    fn agent(&self) -> anyhow::Result<crate::rpc::AgentClient> {
        self.agent_at(&self.node)
    }

    /// An agent client for `addr` with this target's credentials.
    fn agent_at(&self, addr: &str) -> anyhow::Result<crate::rpc::AgentClient> {
        Ok(crate::rpc::AgentClient::with_channels(
            &self.auth.channels()?,
            addr,
        )?)
    }
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print JSON: {leader, term, nodes[{id, addr, role, state, build_hash, last_ack_ms,
    /// matched_index, ...}], ...}
    #[arg(long)]
    json: bool,
    /// Show the asked node's own view instead of the leader's
    #[arg(long)]
    local: bool,
}

#[derive(Subcommand, Debug)]
enum LeaderCommand {
    /// Hand leadership to an up-to-date voter; returns once it leads
    #[command(
        long_about = "Hand leadership to an up-to-date voter (a planned hand-off, \
        not an election): the leader stops taking writes, lets <ID> catch up, and tells it \
        to campaign at once. Returns once <ID> leads, or fails with the reason: not a \
        voter, not caught up, or unreachable. Writes in flight are retried by the nodes."
    )]
    Transfer {
        /// Id of the voter that should lead
        id: u64,
        #[command(flatten)]
        target: Target,
        /// Print JSON: {leader, term, elapsed_ms}
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KvCommand {
    /// Store a value; returns once a majority has committed it
    Put {
        key: String,
        value: String,
        #[command(flatten)]
        target: Target,
        /// Print JSON: {key, log_index}
        #[arg(long)]
        json: bool,
    },
    /// Print a value (a linearizable read); exit 1 if the key does not exist
    Get {
        key: String,
        #[command(flatten)]
        target: Target,
        /// Print JSON: {key, value} (value null, and exit 1, if the key does not exist)
        #[arg(long)]
        json: bool,
    },
}

/// How a command that failed ends: the message on stderr (or, with `--json`, as
/// `{"error": {"kind", "message"}}` on stdout, for scripts) and exit 1. A reader that
/// stopped reading (`| head`) gets no message, and the status a shell reports for a
/// process ended by SIGPIPE.
pub fn fail(error: anyhow::Error) -> ExitCode {
    if is_broken_pipe(&error) {
        return ExitCode::from(141);
    }
    // Our error messages already name their cause; print a cause only when it adds words.
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message = format!("{message}: {cause}");
        }
    }
    let json = std::env::args()
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if json {
        let kind = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<crate::api::ApiError>())
            .map(|e| serde_json::to_value(e.kind).unwrap_or_default())
            .unwrap_or_else(|| "error".into());
        let body = serde_json::json!({"error": {"kind": kind, "message": message}});
        if output::line(format_args!("{body}")).is_ok() {
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// Parses arguments and runs the command; `main` maps the result to an exit code.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = parse();
    let is_node = matches!(
        cli.command,
        Command::Node(_) | Command::Supervise { .. } | Command::Local(_)
    );
    if let Command::Completions { shell } = cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command, "cluster", &mut out);
        std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::SampleService {
        version_text,
        fail_health,
        healthy_for,
        listen,
        error_rate,
        latency,
    } = cli.command
    {
        if !(0.0..=1.0).contains(&error_rate) {
            anyhow::bail!("--error-rate {error_rate} is not a share between 0 and 1");
        }
        crate::service::sample::run(crate::service::sample::SampleOptions {
            version: version_text,
            fail_health,
            healthy_for,
            listen,
            error_rate,
            latency,
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Man { out_dir } = &cli.command {
        manual(out_dir.as_deref())?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Tls(command) = cli.command {
        init_tracing("warn");
        return tls::run(command);
    }
    if let Command::Dist(DistAll::Local(command)) = cli.command {
        // Local file work: no async runtime needed.
        init_tracing("warn");
        let code = dist::run(command)?;
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE)));
    }
    if let Command::Node(NodeCommand::Run(args)) = cli.command {
        return run_node(*args);
    }
    init_tracing(if is_node { "info" } else { "warn" });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(dispatch(cli.command))
}

/// The arguments, with `--version` saying which build this binary is: the build hash of
/// the release it runs from ("dev" outside one) and the protocol it speaks.
fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let version = version_line(&crate::node::running_build_hash());
    let matches = Cli::command().version(version).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `cluster man`: the top page on stdout, or with `out_dir` one page per command there
/// (cluster.1, cluster-rollout-status.1, ...), all rendered by clap_mangen from the same
/// definitions as `--help`.
fn manual(out_dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    // As clap_mangen::generate_to does: no page for `help`, which is not a command.
    let command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    let Some(dir) = out_dir else {
        let mut out = Vec::new();
        clap_mangen::Man::new(command).render(&mut out)?;
        std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(command, dir)
        .with_context(|| format!("writing manual pages in {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".1"))
        .count();
    outln!("{pages} manual pages in {}", dir.display());
    Ok(())
}

fn version_line(build: &str) -> String {
    format!(
        "{} (build {build}, protocol {})",
        env!("CARGO_PKG_VERSION"),
        crate::state::PROTOCOL
    )
}

fn init_tracing(default_level: &str) {
    crate::logs::init(crate::logs::LogFormat::Text, default_level, None);
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Node(_) => unreachable!("run_node runs nodes"),
        Command::Status(args) => {
            let mut client = args.target.client()?;
            let status = client.status(args.local).await?;
            // The rollouts: what an operator most needs to see next to the members.
            let view = if args.local {
                client.rollout().await.ok()
            } else {
                rollout::leader_view(&args.target, Some(&status)).await.ok()
            };
            let members: Vec<u64> = status.nodes.iter().map(|n| n.id).collect();
            if args.json {
                let mut json = serde_json::to_value(&status)?;
                json["rollout"] = match &view {
                    Some(view) => crate::api::rollout::status_json(view, &members),
                    None => serde_json::Value::Null,
                };
                output::print_json(&json)?;
            } else {
                output::print_status(&status)?;
                if let Some(view) = &view {
                    rollout::print_status(view, &members)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Leader(LeaderCommand::Transfer { id, target, json }) => {
            let done = target
                .client()?
                .timeout(Duration::from_secs(30))
                .transfer_leader(id)
                .await?;
            if json {
                output::print_json(&done)?;
            } else {
                outln!(
                    "node {} leads (term {}), hand-off took {} ms",
                    done.leader,
                    done.term,
                    done.elapsed_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Member(command) => member::run(command).await,
        Command::Kv(KvCommand::Put {
            key,
            value,
            target,
            json,
        }) => {
            let written = target.client()?.kv_put(&key, &value).await?;
            if json {
                output::print_json(
                    &serde_json::json!({"key": key, "log_index": written.log_index}),
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Update(args) => rollout::update(args).await,
        Command::Rollout(command) => rollout::rollout(command).await,
        Command::Demo => demo::demo().await,
        Command::Local(LocalCommand::Up(args)) => demo::local_up(args).await,
        Command::Mcp { target } => {
            mcp::serve(target).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dashboard { target, listen } => {
            dashboard(target, listen).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Guard { data_dir } => match crate::agent::guard::before_start(&data_dir) {
            Ok(outcome) => {
                outln!("{}", crate::agent::guard::describe(&outcome));
                Ok(ExitCode::SUCCESS)
            }
            Err(reason) => {
                eprintln!("error: boot guard: {}", crate::error::Chain(&reason));
                Ok(ExitCode::from(EXIT_FAILURE))
            }
        },
        Command::Supervise { data_dir, args } => {
            let status = crate::supervise::run(&data_dir, args).await?;
            Ok(ExitCode::from(
                status.code().unwrap_or(0).clamp(0, 255) as u8
            ))
        }
        Command::Dist(DistAll::Local(_))
        | Command::Tls(_)
        | Command::Completions { .. }
        | Command::SampleService { .. }
        | Command::Man { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Dist(DistAll::Push { dir, target, json }) => {
            let limits = crate::release::Limits::default();
            let dist = std::sync::Arc::new(
                tokio::task::spawn_blocking(move || {
                    crate::agent::upload::LocalDist::scan(&dir, &limits)
                })
                .await??,
            );
            let mut client = target.agent()?;
            let outcome = crate::agent::upload::push(&mut client, &dist).await?;
            if json {
                output::print_json(&outcome)?;
            } else {
                outln!(
                    "{}: release {} held by {} (sent {} bytes in {} chunks, reused {} bytes, {} ms)",
                    dist.dir.display(),
                    outcome.hash,
                    target.node,
                    outcome.fetched_bytes,
                    outcome.fetched_chunks,
                    outcome.reused_bytes,
                    outcome.elapsed_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dist(DistAll::Fetch {
            hash,
            from,
            node,
            auth,
            json,
        }) => {
            let channels = auth.channels()?;
            let agent = |addr: &str| crate::rpc::AgentClient::with_channels(&channels, addr);
            let mut target = agent(&node)?;
            let outcome = if target.releases().await?.fetches_manifests {
                // The node fetches the manifest from --from itself, as a delta against a
                // release it holds, and checks that it rebuilds to `hash`.
                target.prepare_release(&hash, vec![from.clone()]).await?
            } else {
                let manifest = agent(&from)?.manifest(&hash).await?;
                if manifest.build_hash() != hash {
                    anyhow::bail!(
                        "{from} answered with the manifest of release {}, not {hash}: \
                         check the hash and that --from is a node of this cluster",
                        manifest.build_hash()
                    );
                }
                target.prepare(&manifest, vec![from.clone()]).await?
            };
            if json {
                output::print_json(&outcome)?;
            } else {
                outln!(
                    "release {} held by {node} (fetched {} bytes in {} chunks and {} bytes of manifest from {from}, reused {} bytes, {} ms)",
                    outcome.hash,
                    outcome.fetched_bytes,
                    outcome.fetched_chunks,
                    outcome.manifest_bytes,
                    outcome.reused_bytes,
                    outcome.elapsed_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dist(DistAll::Releases { target, json }) => {
            let view = target.agent()?.releases().await?;
            if json {
                output::print_json(&view)?;
            } else {
                for hash in &view.hashes {
                    let mark = match (&view.current, &view.previous) {
                        (Some(c), _) if c == hash => "  (current)",
                        (_, Some(p)) if p == hash => "  (previous)",
                        _ => "",
                    };
                    outln!("{hash}{mark}");
                }
                if view.hashes.is_empty() {
                    outln!("no releases on {}", target.node);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kv(KvCommand::Get { key, target, json }) => {
            let value = target.client()?.kv_get(&key).await?;
            match (&value, json) {
                (_, true) => output::print_json(&serde_json::json!({"key": key, "value": value}))?,
                (Some(value), false) => outln!("{value}"),
                (None, false) => eprintln!("key {key:?} not found"),
            }
            Ok(match value {
                Some(_) => ExitCode::SUCCESS,
                None => ExitCode::from(EXIT_FAILURE),
            })
        }
    }
}

/// `node run`: runs the node, and restarts it the way its supervision calls for: exit
/// for a supervisor (systemd, `cluster supervise`), or re-execute `current` when there is
/// none, once the runtime (and with it every file and lock the node held) is gone.
fn run_node(args: config::RunArgs) -> anyhow::Result<ExitCode> {
    use crate::supervise::{Supervision, EXIT_RESTART};
    let config = config::resolve(args)?;
    crate::logs::init(config.log_format, "info", Some(config.id));
    let (data_dir, supervision) = (config.data_dir.clone(), config.supervision);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stopped = runtime
        .block_on(async { anyhow::Ok(crate::node::run(config, shutdown_signal()?).await?) })?;
    runtime.shutdown_timeout(Duration::from_secs(5));
    match (stopped, supervision) {
        (crate::node::Stopped::Shutdown, _) => Ok(ExitCode::SUCCESS),
        (crate::node::Stopped::Restart, Supervision::Unsupervised) => {
            Err(anyhow::anyhow!(crate::supervise::reexec(&data_dir)))
        }
        (crate::node::Stopped::Restart, _) => Ok(ExitCode::from(EXIT_RESTART as u8)),
    }
}

/// A future that completes on SIGTERM or SIGINT. The handlers are installed now, before
/// the node starts, so a signal during startup is a graceful stop, not a kill.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// `cluster dashboard`: the page on `listen` (loopback only: it reads with this
/// command's credentials, which must not serve whoever reaches the address), its data
/// read from the cluster through the Control API on every refresh.
async fn dashboard(target: Target, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {listen} is not a loopback address: the page reads the cluster with \
             your credentials, so serve it on 127.0.0.1 or [::1] (reach it from elsewhere \
             with `ssh -L`), or let a node serve it over HTTPS (node run --dashboard-listen)"
        );
    }
    let client = target.client()?;
    // Asked once before serving: a wrong address or certificate is said at once.
    client
        .clone()
        .status(false)
        .await
        .with_context(|| format!("cannot read the cluster through {}", target.node))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: pick another --listen address"))?;
    let bound = listener.local_addr()?;
    outln!(
        "serving the dashboard of {} at http://{bound}/ (Ctrl-C stops it)",
        target.node
    );
    let app = crate::node::dashboard::app(move || {
        let mut client = client.clone();
        async move {
            let status = client.status(false).await.map_err(|e| e.to_string())?;
            let view = client.rollout().await.map_err(|e| e.to_string())?;
            Ok(crate::node::dashboard::page_state(&status, &view))
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_milliseconds_or_humantime_under_either_name() {
        let update = |flags: &[&str]| {
            let mut argv = vec!["cluster", "update", "--dist", "."];
            argv.extend(flags);
            match Cli::try_parse_from(argv).map(|cli| cli.command) {
                Ok(Command::Update(args)) => Ok((args.stabilize_ms, args.soak_ms)),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(update(&["--stabilize-ms", "1500"]).unwrap().0, 1500);
        assert_eq!(update(&["--stabilize", "2s"]).unwrap().0, 2000);
        assert_eq!(update(&["--soak", "3m"]).unwrap().1, 180_000);
        assert_eq!(update(&["--soak-ms", "250ms"]).unwrap().1, 250);
        let err = update(&["--stabilize", "3 parsecs"]).unwrap_err();
        assert!(
            err.contains("is not a duration") && err.contains("10s"),
            "{err}"
        );
        let node = Cli::try_parse_from(["cluster", "node", "run", "--heartbeat", "50ms"]).unwrap();
        let Command::Node(NodeCommand::Run(args)) = node.command else {
            panic!("node run")
        };
        assert_eq!(args.heartbeat_ms, Some(50));
    }
}
