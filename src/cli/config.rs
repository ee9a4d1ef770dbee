//! `node run` configuration: flags and an optional TOML file resolved into a validated
//! `NodeConfig` in one place (flags win over the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;

use crate::node::NodeConfig;
use crate::raft::Timing;
use crate::rollout::AutoConfig;
use crate::state::deployment::valid_label;

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// This node's id: a unique number, never reused for another machine
    #[arg(long)]
    pub id: Option<u64>,
    /// Address to listen on, e.g. 127.0.0.1:7101 (port 0: any free port the first time,
    /// written to <data-dir>/node.addr and reused on restart)
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes reach this one at, if not --listen (needed with 0.0.0.0)
    #[arg(long)]
    pub advertise: Option<String>,
    /// Directory for the Raft log and state (created if missing; one node per directory)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Start a new cluster with this node as its first voter (harmless on restart)
    #[arg(long, conflicts_with = "join")]
    pub bootstrap: bool,
    /// Join the cluster through its leader: one address, or several members' addresses
    /// separated by commas, tried in turn until the leader admits the node (harmless on
    /// restart)
    #[arg(long, value_name = "ADDR")]
    pub join: Option<String>,
    /// TOML file with any of the settings above; flags win
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Leader heartbeat period in milliseconds [default: 100]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "heartbeat")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout in milliseconds: a follower that hears nothing from its leader for
    /// this long (up to 1.2 x this, randomized) starts an election. At least 2 x the
    /// heartbeat [default: 300]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "election-timeout")]
    pub election_timeout_ms: Option<u64>,
    /// The node's own health check: run every second with `sh -c` in the data dir; exit 0
    /// means healthy, otherwise the tail of its stdout/stderr is the reason (a run past
    /// 5 s is killed and counts as unhealthy). A rolling update waits for it to pass.
    #[arg(long, value_name = "SHELL COMMAND")]
    pub health_command: Option<String>,
    /// While this node leads, roll out by itself every new build that appears in this
    /// directory (once it has stopped changing for --watch-settle-ms and matches its
    /// version.json, if it has one). Give every node the same directory path.
    #[arg(long, value_name = "DIR")]
    pub watch_dist: Option<PathBuf>,
    /// How long the watched directory must stay unchanged before its build counts
    /// [default: 5000]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "watch-settle")]
    pub watch_settle_ms: Option<u64>,
    /// Automatic rollouts: how long each node must stay healthy before it is committed
    /// [default: 10000]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "auto-stabilize")]
    pub auto_stabilize_ms: Option<u64>,
    /// Automatic rollouts: how long health is watched after the last commit before the
    /// rollout completes; 3 failed checks in a row on any node revert it [default: 180000]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "auto-soak")]
    pub auto_soak_ms: Option<u64>,
    /// Automatic rollouts: how long a restarted node may take to report healthy
    /// [default: 60000]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "auto-health-deadline")]
    pub auto_health_deadline_ms: Option<u64>,
    /// Automatic rollouts: pause between health polls of a node [default: 500]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "auto-poll-interval")]
    pub auto_poll_interval_ms: Option<u64>,
    /// Automatic rollouts: acknowledgement age above which a node counts as stale, in
    /// preflight and while nodes restart [default: 2 x --heartbeat-ms]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "auto-stale-ack")]
    pub auto_stale_ack_ms: Option<u64>,
    /// This node's credentials: ca.pem, cert.pem and key.pem from
    /// `cluster tls issue <dir> --ca <ca-dir> --node <id>`. Every connection is mutual TLS
    /// with the cluster CA, and every request is authorized by the caller's role.
    #[arg(long, value_name = "DIR")]
    pub tls: Option<PathBuf>,
    /// Run without TLS: plaintext, nobody authenticated, so anyone who can reach the
    /// port can run code on every node. Only for a throwaway cluster on a trusted network.
    #[arg(long, conflicts_with = "tls")]
    pub insecure: bool,
    /// Trust releases signed with this public key (a release.pub from `cluster dist
    /// keygen`); repeat for several keys. With any key given, the node installs and
    /// activates only releases signed by one of them (`cluster dist stamp --sign`) and
    /// refuses unsigned ones; with none, it accepts every release. In the TOML file:
    /// release_keys = ["/etc/cluster/release.pub"]; flags replace the file's list
    #[arg(long = "release-key", value_name = "FILE")]
    pub release_keys: Vec<PathBuf>,
    /// While this node leads: a node that joins beyond this many voters stays a learner
    /// (it replicates but does not vote; the join says so), and removing a voter promotes
    /// a caught-up learner back up to it. Give every node the same value [default: 5]
    #[arg(long, value_name = "N")]
    pub max_voters: Option<usize>,
    /// How the node writes its log on stderr: `text` lines, or `json`, one object per
    /// line with the node id and every field (generation, error, ...) as a key
    /// [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<crate::logs::LogFormat>,
    /// Serve Prometheus metrics over plain HTTP at http://<ADDR>/metrics (Raft, rollouts,
    /// releases). Off unless given; anyone who can reach it reads them, so keep it on
    /// loopback or a monitoring network, e.g. 127.0.0.1:9100
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve a read-only web page of the cluster at http://<ADDR>/ (members, leader,
    /// builds, acknowledgement ages, the active rollout's phases live, history). Off
    /// unless given; plain HTTP with no login, so keep it on loopback, e.g. 127.0.0.1:7180
    #[arg(long, value_name = "ADDR")]
    pub dashboard_listen: Option<SocketAddr>,
    /// POST a JSON document to this http:// URL on every rollout change (started, each
    /// node's phase, paused, reverting, completed, failed, ...) and every boot-guard
    /// restore, sent by the leader, retried with backoff, never holding up a rollout;
    /// repeat for several. In the TOML file: notify_urls = ["http://..."]; flags replace
    /// the file's list
    #[arg(long = "notify-url", value_name = "URL")]
    pub notify_urls: Vec<crate::notify::NotifyUrl>,
    /// A label for this node, e.g. zone=a; repeat for several. `cluster update --nodes
    /// zone=a` rolls out to matching nodes only, `--order-by zone` one zone after the
    /// other; `cluster status` shows them. In the TOML file: labels = { zone = "a",
    /// rack = "r1" }; a flag overrides the file's value of its key
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

/// The TOML form of `RunArgs`. Unknown keys are errors: a typo must not be ignored.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    bootstrap: Option<bool>,
    join: Option<String>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    health_command: Option<String>,
    watch_dist: Option<PathBuf>,
    watch_settle_ms: Option<u64>,
    auto_stabilize_ms: Option<u64>,
    auto_soak_ms: Option<u64>,
    auto_health_deadline_ms: Option<u64>,
    auto_poll_interval_ms: Option<u64>,
    auto_stale_ack_ms: Option<u64>,
    tls: Option<PathBuf>,
    insecure: Option<bool>,
    release_keys: Option<Vec<PathBuf>>,
    max_voters: Option<usize>,
    log_format: Option<crate::logs::LogFormat>,
    metrics_listen: Option<SocketAddr>,
    dashboard_listen: Option<SocketAddr>,
    notify_urls: Option<Vec<String>>,
    labels: Option<std::collections::BTreeMap<String, String>>,
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "config file {} is malformed: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })
}

/// Merges flags over the config file and validates the result.
pub fn resolve(args: RunArgs) -> anyhow::Result<NodeConfig> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => FileConfig::default(),
    };
    let config_path = args.config.clone();
    let missing = |flag: &str, key: &str| match &config_path {
        Some(path) => anyhow::anyhow!("--{flag} is required (or `{key}` in {})", path.display()),
        None => anyhow::anyhow!("--{flag} is required"),
    };
    let id = args.id.or(file.id).ok_or_else(|| missing("id", "id"))?;
    let listen = args
        .listen
        .or(file.listen)
        .ok_or_else(|| missing("listen", "listen"))?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .ok_or_else(|| missing("data-dir", "data_dir"))?;
    let join = args.join.or(file.join);
    // A flag --join overrides a file's bootstrap = true, and vice versa.
    let bootstrap = args.bootstrap || (file.bootstrap.unwrap_or(false) && join.is_none());
    if bootstrap && join.is_some() {
        bail!(
            "--bootstrap and --join exclude each other: bootstrap the first node, join the others"
        );
    }
    let defaults = Timing::default();
    let heartbeat_ms = args
        .heartbeat_ms
        .or(file.heartbeat_ms)
        .unwrap_or(defaults.heartbeat.as_millis() as u64);
    let election_ms = args
        .election_timeout_ms
        .or(file.election_timeout_ms)
        .unwrap_or(defaults.election_timeout.as_millis() as u64);
    if heartbeat_ms == 0 {
        bail!("--heartbeat-ms must be at least 1");
    }
    let least = Timing::least_election_timeout(Duration::from_millis(heartbeat_ms));
    if Duration::from_millis(election_ms) < least {
        bail!(
            "--election-timeout-ms ({election_ms}) must be at least 2 x --heartbeat-ms \
             ({heartbeat_ms}), {} here: a follower must be able to miss a heartbeat \
             before it starts an election",
            least.as_millis()
        );
    }
    if let Some(advertise) = &args.advertise.as_ref().or(file.advertise.as_ref()) {
        if advertise.parse::<SocketAddr>().is_err() && !advertise.contains(':') {
            bail!("--advertise {advertise:?} must be host:port");
        }
    }
    let health_command = args.health_command.or(file.health_command);
    if health_command
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        bail!("--health-command is empty: give a shell command, or leave it out");
    }
    let mut auto = AutoConfig {
        watch_dist: args.watch_dist.or(file.watch_dist),
        ..AutoConfig::default()
    };
    if let Some(dir) = &auto.watch_dist {
        if dir.as_os_str().is_empty() {
            bail!("--watch-dist is empty: give a directory, or leave it out");
        }
        if dir.exists() && !dir.is_dir() {
            bail!(
                "--watch-dist {} is not a directory: give the directory new dists appear in",
                dir.display()
            );
        }
    }
    if let Some(ms) = args.watch_settle_ms.or(file.watch_settle_ms) {
        auto.settle = Duration::from_millis(ms);
    }
    let strategy = &mut auto.strategy;
    if let Some(ms) = args.auto_stabilize_ms.or(file.auto_stabilize_ms) {
        strategy.stabilize_ms = ms;
    }
    if let Some(ms) = args.auto_soak_ms.or(file.auto_soak_ms) {
        strategy.soak_ms = ms;
    }
    if let Some(ms) = args
        .auto_health_deadline_ms
        .or(file.auto_health_deadline_ms)
    {
        if ms == 0 {
            bail!("--auto-health-deadline-ms must be at least 1");
        }
        strategy.health_deadline_ms = ms;
    }
    if let Some(ms) = args.auto_poll_interval_ms.or(file.auto_poll_interval_ms) {
        strategy.poll_interval_ms = ms.max(10);
    }
    if let Some(ms) = args.auto_stale_ack_ms.or(file.auto_stale_ack_ms) {
        if ms == 0 {
            bail!("--auto-stale-ack-ms must be at least 1");
        }
        auto.stale_ack_ms = Some(ms);
    }
    let tls = args.tls.or(file.tls);
    let insecure = args.insecure || (file.insecure.unwrap_or(false) && tls.is_none());
    let security = match (tls, insecure) {
        (Some(_), true) => bail!("`tls` and `insecure` exclude each other: choose one"),
        (Some(dir), false) => crate::tls::Security::load(&dir)
            .with_context(|| format!("node credentials in {}", dir.display()))?,
        (None, true) => crate::tls::Security::Insecure,
        (None, false) => bail!(
            "a node needs --tls <dir> (ca.pem, cert.pem, key.pem from `cluster tls issue \
             <dir> --ca <ca-dir> --node {id}`; or `tls` in the config file), or --insecure \
             to run without authentication"
        ),
    };
    // A list is not merged: flags given replace the file's keys entirely.
    let key_files = if args.release_keys.is_empty() {
        file.release_keys.unwrap_or_default()
    } else {
        args.release_keys
    };
    let release_keys = crate::release::keys::read_trusted_keys(&key_files)
        .context("a release key given with --release-key or release_keys cannot be used")?;
    let max_voters = args
        .max_voters
        .or(file.max_voters)
        .unwrap_or(crate::node::DEFAULT_MAX_VOTERS);
    if max_voters == 0 {
        bail!("--max-voters must be at least 1: a cluster needs a voter to commit anything");
    }
    let notify_urls = match (args.notify_urls, file.notify_urls) {
        (flags, _) if !flags.is_empty() => flags,
        (_, Some(list)) => list
            .iter()
            .map(|url| url.parse())
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow::anyhow!("notify_urls in the config file: {e}"))?,
        _ => Vec::new(),
    };
    let mut labels = file.labels.unwrap_or_default();
    for flag in &args.labels {
        match flag.split_once('=') {
            Some((key, value)) => {
                labels.insert(key.trim().to_string(), value.trim().to_string());
            }
            None => bail!("--label {flag:?} must be key=value, e.g. --label zone=a"),
        }
    }
    if let Some((key, value)) = labels
        .iter()
        .find(|(k, v)| !valid_label(k) || !valid_label(v))
    {
        bail!(
            "label {key}={value:?}: keys and values are 1 to 63 letters, digits, '-', '_' or \
             '.' (e.g. zone = \"eu-1a\")"
        );
    }
    Ok(NodeConfig {
        labels,
        log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        dashboard_listen: args.dashboard_listen.or(file.dashboard_listen),
        notify_urls,
        max_voters,
        security,
        release_keys,
        auto,
        id,
        listen,
        advertise: args.advertise.or(file.advertise),
        data_dir,
        bootstrap,
        join,
        timing: Timing {
            heartbeat: Duration::from_millis(heartbeat_ms),
            election_timeout: Duration::from_millis(election_ms),
        },
        health_command,
        supervision: crate::supervise::Supervision::of_this_process(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::LogFormat;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn max_voters_comes_from_the_flag_or_the_file_and_is_at_least_one() {
        let (_dir, path) =
            file("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nmax_voters = 3\n");
        let args = |max_voters| RunArgs {
            config: Some(path.clone()),
            insecure: true,
            max_voters,
            ..RunArgs::default()
        };
        assert_eq!(resolve(args(None)).unwrap().max_voters, 3);
        assert_eq!(resolve(args(Some(7))).unwrap().max_voters, 7);
        let none = resolve(RunArgs {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("/tmp/a".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(none.max_voters, crate::node::DEFAULT_MAX_VOTERS);
        let zero = resolve(args(Some(0))).unwrap_err().to_string();
        assert!(zero.contains("--max-voters must be at least 1"), "{zero}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let (_dir, path) = file(
            "id = 1\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"/tmp/a\"\nheartbeat_ms = 50\nelection_timeout_ms = 500\n",
        );
        let config = resolve(RunArgs {
            id: Some(2),
            config: Some(path),
            election_timeout_ms: Some(400),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(config.id, 2);
        assert_eq!(config.listen.to_string(), "127.0.0.1:7101");
        assert_eq!(config.timing.heartbeat, Duration::from_millis(50));
        assert_eq!(config.timing.election_timeout, Duration::from_millis(400));
    }

    #[test]
    fn every_config_file_key_is_a_flag_that_node_run_help_lists() {
        // serde names every key it accepts when it refuses an unknown one.
        let refused = toml::from_str::<FileConfig>("no_such_key = 1").unwrap_err();
        let keys: Vec<String> = refused
            .to_string()
            .split("expected one of")
            .nth(1)
            .expect("serde lists the keys")
            .split(',')
            .map(|k| {
                k.trim()
                    .trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .to_string()
            })
            .filter(|k| !k.is_empty())
            .collect();
        assert!(keys.len() >= 20, "{keys:?}");
        #[derive(clap::Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        let help = <Run as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for key in &keys {
            let flag = match key.as_str() {
                "release_keys" => "--release-key".to_string(),
                "notify_urls" => "--notify-url".to_string(),
                "labels" => "--label".to_string(),
                other => format!("--{}", other.replace('_', "-")),
            };
            assert!(
                help.contains(&flag),
                "config key {key} has no flag {flag} in --help"
            );
        }
    }

    #[test]
    fn the_log_format_comes_from_the_flag_or_the_file_and_a_typo_is_refused() {
        let base = "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\n";
        let (_dir, path) = file(&format!("{base}log_format = \"json\"\n"));
        let args = |path: &PathBuf| RunArgs {
            config: Some(path.clone()),
            insecure: true,
            ..RunArgs::default()
        };
        assert_eq!(resolve(args(&path)).unwrap().log_format, LogFormat::Json);
        let flagged = RunArgs {
            log_format: Some(LogFormat::Text),
            ..args(&path)
        };
        assert_eq!(resolve(flagged).unwrap().log_format, LogFormat::Text);
        let (_dir, plain) = file(base);
        assert_eq!(resolve(args(&plain)).unwrap().log_format, LogFormat::Text);
        let (_dir, typo) = file(&format!("{base}log_format = \"xml\"\n"));
        let err = resolve(args(&typo)).unwrap_err().to_string();
        assert!(err.contains("log_format") && err.contains("xml"), "{err}");
    }

    #[test]
    fn labels_come_from_the_file_and_flags_override_their_keys() {
        let base = "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\n";
        let (_dir, path) = file(&format!(
            "{base}labels = {{ zone = \"a\", rack = \"r1\" }}\n"
        ));
        let args = |labels: &[&str]| RunArgs {
            config: Some(path.clone()),
            insecure: true,
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..RunArgs::default()
        };
        let labels = resolve(args(&[])).unwrap().labels;
        assert_eq!(
            crate::state::deployment::describe_labels(&labels),
            "rack=r1, zone=a"
        );
        let labels = resolve(args(&["zone=b", "tier=web"])).unwrap().labels;
        assert_eq!(
            crate::state::deployment::describe_labels(&labels),
            "rack=r1, tier=web, zone=b"
        );
        let err = resolve(args(&["zone"])).unwrap_err().to_string();
        assert!(err.contains("--label \"zone\" must be key=value"), "{err}");
        let err = resolve(args(&["zone=a b"])).unwrap_err().to_string();
        assert!(
            err.contains("label zone=\"a b\": keys and values are"),
            "{err}"
        );
    }

    #[test]
    fn the_health_command_comes_from_the_flag_or_the_file() {
        let (_dir, path) = file(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nhealth_command = \"test -e ok\"\n",
        );
        let from_file = resolve(RunArgs {
            config: Some(path.clone()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(from_file.health_command.as_deref(), Some("test -e ok"));
        let from_flag = resolve(RunArgs {
            config: Some(path),
            health_command: Some("true".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(from_flag.health_command.as_deref(), Some("true"));
        let none = resolve(RunArgs {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(none.health_command, None);
        let empty = resolve(RunArgs {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            health_command: Some("  ".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(empty.contains("--health-command is empty"), "{empty}");
    }

    #[test]
    fn the_automatic_rollouts_stale_ack_limit_comes_from_the_flag_or_the_file() {
        let (_dir, path) = file(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nauto_stale_ack_ms = 1500\n",
        );
        let from_file = resolve(RunArgs {
            config: Some(path.clone()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(from_file.auto.stale_ack_ms, Some(1500));
        let from_flag = resolve(RunArgs {
            config: Some(path.clone()),
            auto_stale_ack_ms: Some(2000),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(from_flag.auto.stale_ack_ms, Some(2000));
        let zero = resolve(RunArgs {
            config: Some(path),
            auto_stale_ack_ms: Some(0),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            zero.contains("--auto-stale-ack-ms must be at least 1"),
            "{zero}"
        );
        let unset = resolve(RunArgs {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(
            unset.auto.stale_ack_ms, None,
            "2 x heartbeat, decided in preflight"
        );
    }

    #[test]
    fn release_keys_come_from_the_flags_or_the_file_and_bad_ones_are_named() {
        use crate::release::keys::keygen;
        let keys = tempfile::tempdir().unwrap();
        let first = keygen(&keys.path().join("a")).unwrap();
        let second = keygen(&keys.path().join("b")).unwrap();
        let (_dir, path) = file(&format!(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nrelease_keys = [{:?}]\n",
            first.public_key.display().to_string()
        ));
        let from_file = resolve(RunArgs {
            config: Some(path.clone()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(from_file.release_keys.ids(), [first.key_id.as_str()]);

        // Flags replace the file's list.
        let from_flags = resolve(RunArgs {
            config: Some(path.clone()),
            release_keys: vec![second.public_key.clone(), first.public_key.clone()],
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert_eq!(
            from_flags.release_keys.ids(),
            [second.key_id.clone(), first.key_id.clone()]
        );

        let none = resolve(RunArgs {
            id: Some(1),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            data_dir: Some("/tmp/x".into()),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert!(none.release_keys.is_empty(), "no keys: accept any release");

        let garbage = keys.path().join("garbage.pub");
        std::fs::write(&garbage, "not a key").unwrap();
        let missing = keys.path().join("missing.pub");
        for (bad, expected) in [
            (&garbage, "is not an Ed25519 public key"),
            (&missing, "check that it exists"),
            (&first.private_key, "it is a private key"),
        ] {
            let err = resolve(RunArgs {
                config: Some(path.clone()),
                release_keys: vec![first.public_key.clone(), bad.clone()],
                insecure: true,
                ..RunArgs::default()
            })
            .unwrap_err();
            let message = format!("{err:#}");
            assert!(
                message.contains(&bad.display().to_string()) && message.contains(expected),
                "{}: {message}",
                bad.display()
            );
        }
    }

    #[test]
    fn the_release_key_flag_repeats() {
        use clap::Parser;
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        let run = Run::try_parse_from([
            "run",
            "--release-key",
            "/etc/cluster/a.pub",
            "--release-key",
            "/etc/cluster/b.pub",
        ])
        .unwrap();
        assert_eq!(
            run.args.release_keys,
            [
                PathBuf::from("/etc/cluster/a.pub"),
                "/etc/cluster/b.pub".into()
            ]
        );
    }

    #[test]
    fn a_join_flag_overrides_a_bootstrap_file() {
        let (_dir, path) =
            file("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/a\"\nbootstrap = true\n");
        let config = resolve(RunArgs {
            join: Some("127.0.0.1:2".into()),
            config: Some(path),
            insecure: true,
            ..RunArgs::default()
        })
        .unwrap();
        assert!(!config.bootstrap);
        assert_eq!(config.join.as_deref(), Some("127.0.0.1:2"));
    }

    #[test]
    fn bad_input_is_named() {
        let cases: Vec<(&str, RunArgs, &str)> = vec![
            ("no id", RunArgs::default(), "--id is required"),
            (
                "no credentials",
                RunArgs {
                    id: Some(1),
                    listen: Some("127.0.0.1:1".parse().unwrap()),
                    data_dir: Some("/tmp/x".into()),
                    ..RunArgs::default()
                },
                "a node needs --tls <dir>",
            ),
            (
                "missing credentials",
                RunArgs {
                    id: Some(1),
                    listen: Some("127.0.0.1:1".parse().unwrap()),
                    data_dir: Some("/tmp/x".into()),
                    tls: Some("/nonexistent/creds".into()),
                    ..RunArgs::default()
                },
                "node credentials in /nonexistent/creds",
            ),
            (
                "timeouts",
                RunArgs {
                    id: Some(1),
                    listen: Some("127.0.0.1:1".parse().unwrap()),
                    data_dir: Some("/tmp/x".into()),
                    heartbeat_ms: Some(100),
                    election_timeout_ms: Some(150),
                    insecure: true,
                    ..RunArgs::default()
                },
                "must be at least 2 x --heartbeat-ms (100), 200 here",
            ),
        ];
        for (name, args, expected) in cases {
            let err = resolve(args).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn malformed_and_unknown_keys_are_errors() {
        for (text, expected) in [
            ("id = \"one\"", "malformed"),
            ("idd = 1", "unknown field"),
            ("listen = \"nope\"", "malformed"),
        ] {
            let (_dir, path) = file(text);
            let err = resolve(RunArgs {
                config: Some(path),
                insecure: true,
                ..RunArgs::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
