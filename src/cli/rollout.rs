//! `cluster update` and `cluster rollout`: start a rolling update, follow it, inspect it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::output::print_json;
use super::Target;
use crate::agent::upload::{push, LocalDist};
use crate::api::{
    ApiError, ClusterStatus, ErrorKind, LeaderNotes, Operation, Report, RolloutView, UpdateOptions,
    UpdateOutcome,
};
use crate::release::Limits;
use crate::rollout::DEFAULT_SOAK_MS;
use crate::rpc::ControlClient;
use crate::state::deployment::{failure_streak, short_hash};
use crate::state::{
    Deployment, DeploymentState, HistoryEntry, NodeStep, OnFailure, Starter, Strategy,
};

/// Exit status when preflight refuses the update.
pub const EXIT_PREFLIGHT: u8 = 2;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailureMode {
    /// Restore the failed node and bring every updated node back to its previous build
    Revert,
    /// Restore the failed node and stop; updated nodes stay on the new build
    Halt,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The dist to roll out (a directory with bin/cluster; see `cluster dist --help`)
    #[arg(long, value_parser = existing_dir)]
    pub dist: PathBuf,
    /// Start the rollout and return: print its generation (follow it with
    /// `cluster rollout status --watch`)
    #[arg(long, conflicts_with = "dry_run")]
    pub detach: bool,
    #[command(flatten)]
    pub target: Target,
    /// Check and plan only: print the preflight report and the plan, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON: {report, plan, generation, outcome}
    #[arg(long)]
    pub json: bool,
    /// Learners updated at once (voters always go one at a time)
    #[arg(long, default_value_t = 1)]
    pub max_parallel: usize,
    /// What a failed node does to the rest of the rollout
    #[arg(long, value_enum, default_value_t = FailureMode::Revert)]
    pub on_failure: FailureMode,
    /// Accept a cluster that cannot lose a voter (1 or 2 voters): it is unavailable while each restarts
    #[arg(long)]
    pub allow_downtime: bool,
    /// How long a restarted node may take to report healthy on the new build
    #[arg(long, default_value_t = 60_000, value_name = "DURATION", value_parser = super::millis, visible_alias = "health-deadline")]
    pub health_deadline_ms: u64,
    /// Pause between health polls of a node (a node coming back from its restart is
    /// polled every 25 ms, or this if shorter, until it is healthy)
    #[arg(long, default_value_t = 500, value_name = "DURATION", value_parser = super::millis, visible_alias = "poll-interval")]
    pub poll_interval_ms: u64,
    /// How long a healthy node must stay healthy, on one boot, before it is committed
    #[arg(long, default_value_t = 10_000, value_name = "DURATION", value_parser = super::millis, visible_alias = "stabilize")]
    pub stabilize_ms: u64,
    /// Acknowledgement age above which a node counts as stale [default: 2 x heartbeat]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, visible_alias = "stale-ack")]
    pub stale_ack_ms: Option<u64>,
    /// After the last node commits, how long every node's health is still watched: 3
    /// failed checks in a row on any node revert the whole rollout (0: no soak)
    #[arg(long, default_value_t = DEFAULT_SOAK_MS, value_name = "DURATION", value_parser = super::millis, visible_alias = "soak")]
    pub soak_ms: u64,
    /// A metric gate, evaluated by the leader while any node serves the new release:
    /// `name=N,prometheus=http://HOST:PORT,max=X|min=X[,interval=10s][,failure-limit=1]
    /// [,inconclusive=fail|pause],query=PROMQL` (query last; it may hold commas).
    /// failure-limit failed evaluations in a row stop the rollout like a failed node
    /// (see --on-failure); repeat for more gates
    #[arg(long, value_name = "SPEC", value_parser = crate::rollout::analysis::Analysis::parse)]
    pub analysis: Vec<crate::rollout::analysis::Analysis>,
    /// Canary steps: how many nodes (3) or what share of them (25%, rounded up) run the
    /// new release at the end of each step, e.g. 1,25%,100%. Each step holds once its
    /// nodes committed, for --step-pause or until `cluster rollout promote`; the metric
    /// gates keep watching. Voters still go one at a time, the leader last
    #[arg(long, value_name = "LIST", value_parser = parse_steps)]
    pub steps: Option<StepList>,
    /// How long each step holds before the next begins [default: until `cluster rollout
    /// promote`]
    #[arg(long, value_name = "DURATION", value_parser = super::millis, requires = "steps")]
    pub step_pause: Option<u64>,
    /// Stop the rollout (as --on-failure says) when no node commits and no step is
    /// promoted for this long, e.g. 15m; a pause or a step's hold does not count
    #[arg(long, value_name = "DURATION", value_parser = super::millis)]
    pub progress_deadline: Option<u64>,
    /// Learner failures to tolerate: a number (2) or a share of the rollout's learners
    /// (25%, rounded down). Each failed learner is restored to its build and the rollout
    /// goes on; one failure more stops it (see --on-failure). A voter's failure always
    /// stops it
    #[arg(long, value_name = "N|P%", value_parser = crate::state::deployment::FailureBudget::parse)]
    pub max_failures: Option<crate::state::deployment::FailureBudget>,
    /// Roll out only to members with these labels (node.toml `labels`), e.g. zone=a or
    /// zone=a,rack=r1 (all must match). The others are listed as not targeted, and the
    /// cluster's target build moves only once every member runs the release
    #[arg(long = "nodes", value_name = "KEY=VALUE,...", value_parser = crate::state::deployment::Selector::parse)]
    pub selector: Option<crate::state::deployment::Selector>,
    /// Group nodes by this label and finish one group before the next, e.g. zone: every
    /// node of one zone is committed before the next zone starts (the leader's zone last)
    #[arg(long, value_name = "LABEL")]
    pub order_by: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Show the active rollout: generation, state, target, every node's phase
    #[command(
        long_about = "Show the active rollout: generation, state, target, every \
        node's phase.\n\n\
        With --watch, follow the active rollout (or, when none is active, the last one) to \
        its end, printing each phase change, and exit like `kubectl rollout status`: 0 \
        completed, 1 failed, reverted or aborted, 124 when --timeout passes first (the \
        rollout goes on).\n\n\
        Example: cluster update --dist ./dist --detach && cluster rollout status --watch --timeout 15m"
    )]
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON: the active rollout as `cluster status --json` shows it under
        /// rollout.active (generation, state, builds, every node's phase), or null when
        /// none is active (with --watch: the history entry the rollout ended as)
        #[arg(long)]
        json: bool,
        /// Follow the rollout to its end; the exit status says how it ended
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (exit 124), e.g. 90s, 15m, 1h
        #[arg(long, value_parser = humantime::parse_duration, requires = "watch")]
        timeout: Option<Duration>,
    },
    /// Show finished rollouts, oldest first: who started them and why, outcome and
    /// reason, and every node's result and timings
    History {
        #[command(flatten)]
        target: Target,
        /// Print JSON: the list of history entries
        #[arg(long)]
        json: bool,
    },
    /// Pause the active rollout: no further node starts; a node in flight finishes its
    /// step. Replicated: holds across leader changes.
    Pause {
        #[command(flatten)]
        target: Target,
        /// Print JSON: {message, generation}
        #[arg(long)]
        json: bool,
    },
    /// Begin the next canary step now (`cluster update --steps`): a step that holds until
    /// promoted goes on, one that holds for a pause stops holding
    Promote {
        #[command(flatten)]
        target: Target,
        /// Print JSON: {message, generation}
        #[arg(long)]
        json: bool,
    },
    /// Roll back through the normal pipeline (preflight, the undone rollout's strategy):
    /// to the build the newest completed rollout replaced, or --to a rollout's
    /// generation (its build) or a build hash the nodes still hold
    #[command(
        long_about = "Roll back through the normal pipeline: a new rollout, checked by \
        preflight and following the strategy (steps, gates, pace) of the rollout it undoes, \
        of a build the leader still holds.\n\n\
        Without --to: the build the newest completed rollout replaced. --to N: the build \
        rollout N rolled out. --to HASH: that build (8 hex characters or more of its hash, \
        as `cluster rollout history` shows them). History records which rollout the undo \
        undid.\n\n\
        Examples:\n  cluster rollout undo\n  cluster rollout undo --to 4 --detach"
    )]
    Undo {
        #[command(flatten)]
        target: Target,
        /// A rollout's generation, or a build hash (prefix of 8+ hex characters)
        #[arg(long)]
        to: Option<String>,
        /// Start the undo and return (follow it with `cluster rollout status --watch`)
        #[arg(long)]
        detach: bool,
        /// Print JSON: {message, generation} (and, unless --detach, the outcome)
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused rollout
    Resume {
        #[command(flatten)]
        target: Target,
        /// Print JSON: {message, generation}
        #[arg(long)]
        json: bool,
    },
    /// Stop the active rollout: nodes caught mid-update are restored; nodes already
    /// updated stay on the new build unless --revert
    Abort {
        #[command(flatten)]
        target: Target,
        /// Also bring every updated node back to its previous build
        #[arg(long)]
        revert: bool,
        /// Print JSON: {message, generation}
        #[arg(long)]
        json: bool,
    },
    /// Switch automatic rollouts (new builds in the leader's --watch-dist, and bringing
    /// nodes on another build to the cluster's target) on or off, cluster-wide
    Auto {
        #[arg(value_enum)]
        switch: Switch,
        #[command(flatten)]
        target: Target,
        /// Print JSON: {message, generation}
        #[arg(long)]
        json: bool,
    },
}

/// `--steps`: one value that is a list (clap would take a `Vec` for many values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepList(pub Vec<crate::state::deployment::Step>);

fn parse_steps(text: &str) -> Result<StepList, String> {
    crate::state::deployment::Step::parse_list(text).map(StepList)
}

pub fn options_of(args: &UpdateArgs) -> UpdateOptions {
    UpdateOptions {
        strategy: Strategy {
            max_parallel: args.max_parallel.max(1),
            on_failure: match args.on_failure {
                FailureMode::Revert => OnFailure::Revert,
                FailureMode::Halt => OnFailure::Halt,
            },
            health_deadline_ms: args.health_deadline_ms,
            poll_interval_ms: args.poll_interval_ms.max(10),
            stabilize_ms: args.stabilize_ms,
            soak_ms: args.soak_ms,
            analyses: args.analysis.clone(),
            steps: args.steps.clone().map(|s| s.0).unwrap_or_default(),
            step_pause_ms: args.step_pause,
            progress_deadline_ms: args.progress_deadline,
            max_failures: args.max_failures,
            selector: args.selector.clone(),
            order_by: args.order_by.clone(),
            ..Strategy::default()
        },
        allow_downtime: args.allow_downtime,
        stale_ack_ms: args.stale_ack_ms,
        started_by: Starter::Operator,
        dist_label: args.dist.display().to_string(),
        trigger: None,
        skip: Vec::new(),
        operator: None,
    }
}

/// Runs `cluster update`: upload, preflight, plan, start, and follow to the end.
pub async fn update(args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let limits = Limits::default();
    let dir = args.dist.clone();
    let dist = match tokio::task::spawn_blocking(move || LocalDist::scan(&dir, &limits)).await? {
        Ok(dist) => Arc::new(dist),
        Err(e) => {
            eprintln!("preflight failed: {}", crate::error::Chain(&e));
            return Ok(ExitCode::from(EXIT_PREFLIGHT));
        }
    };
    let options = options_of(&args);
    let mut client = args.target.client()?.timeout(Duration::from_secs(60));
    // Ctrl-C is handled from here on, so that what it interrupts is said exactly: before
    // the leader is asked, nothing began; after, the rollout goes on without us.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let node = args.target.node.clone();
    if !args.dry_run {
        let uploading = upload_to_leader(&args.target, &dist);
        let uploaded = tokio::select! {
            uploaded = uploading => uploaded?,
            _ = interrupt.recv() => {
                eprintln!("\ninterrupted during the upload: no rollout was started");
                return Ok(ExitCode::from(EXIT_INTERRUPTED));
            }
        };
        let (leader, uploaded) = match uploaded {
            Ok(uploaded) => uploaded,
            Err(refused) => {
                eprintln!("preflight failed: {refused}");
                eprintln!("preflight failed: nothing was changed");
                return Ok(ExitCode::from(EXIT_PREFLIGHT));
            }
        };
        if !args.json {
            eprintln!(
                "uploaded {} to the leader (node {leader}): {} bytes sent, {} reused",
                short_hash(&uploaded.hash),
                uploaded.fetched_bytes,
                uploaded.reused_bytes
            );
        }
    }
    let outcome = tokio::select! {
        outcome = client.update(&dist.manifest, &options, args.dry_run) => outcome?,
        _ = interrupt.recv() => {
            eprintln!(
                "\ninterrupted while the leader was asked to start the rollout: `cluster \
                 rollout status --node {node}` tells whether it began"
            );
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    if !args.json {
        print_report(&outcome.report)?;
        print_plan(&outcome)?;
    }
    if !outcome.report.proceed {
        if args.json {
            print_json(&outcome)?;
        }
        eprintln!("preflight failed: nothing was changed");
        return Ok(ExitCode::from(EXIT_PREFLIGHT));
    }
    if args.dry_run {
        if args.json {
            print_json(&outcome)?;
        } else {
            outln!("dry run: preflight passed; nothing was changed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.detach {
        if args.json {
            print_json(&serde_json::json!({
                "report": outcome.report,
                "plan": outcome.plan,
                "generation": outcome.generation,
            }))?;
        } else {
            outln!(
                "rollout {} started; follow it with `cluster rollout status --watch --node {}`",
                outcome.generation,
                args.target.node
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let finished = tokio::select! {
        finished = follow(&args.target, outcome.generation, !args.json) => finished?,
        _ = interrupt.recv() => {
            // The rollout is the leader's: this client stopping changes nothing.
            eprintln!(
                "\nstopped following; rollout {} goes on. Follow it with `cluster rollout \
                 status --watch --node {node}`, pause it with `cluster rollout pause --node \
                 {node}`, or stop it with `cluster rollout abort --revert --node {node}`",
                outcome.generation,
            );
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    let json = args.json.then(|| {
        serde_json::json!({
            "report": outcome.report,
            "plan": outcome.plan,
            "generation": outcome.generation,
        })
    });
    report_finished(finished, json)
}

/// Uploads `dist` to the leader: its id and what moved, or (inner `Err`) why the leader
/// refused the release, which is a preflight refusal: no node will run it.
pub async fn upload_to_leader(
    target: &Target,
    dist: &Arc<LocalDist>,
) -> anyhow::Result<Result<(u64, crate::api::agent::PrepareOutcome), String>> {
    let status = target.client()?.status(false).await?;
    let leader = status
        .leader
        .and_then(|id| status.nodes.iter().find(|n| n.id == id))
        .ok_or_else(|| ApiError::unavailable("no leader: is a majority of voters running?"))?;
    let mut agent = target.agent_at(&leader.addr)?;
    match push(&mut agent, dist).await {
        Ok(uploaded) => Ok(Ok((leader.id, uploaded))),
        Err(e) if e.kind == ErrorKind::PermissionDenied => Ok(Err(format!(
            "the leader (node {}) refused the release: {}",
            leader.id, e.message
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit status of `rollout status --watch` whose --timeout passed (as timeout(1) exits).
pub const EXIT_TIMED_OUT: u8 = 124;

/// `--dist` must name a directory: anything else is a usage error (exit 2).
fn existing_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(_) => Err(format!(
            "{text} is not a directory: give the dist directory (it holds bin/cluster)"
        )),
        Err(e) => Err(format!("cannot read {text}: {e}")),
    }
}

/// `rollout status --watch`: follows the active rollout, else reports the last one.
async fn watch(target: &Target, json: bool, timeout: Option<Duration>) -> anyhow::Result<ExitCode> {
    let view = leader_view(target, None).await?;
    let generation = match (&view.deployment, view.history.last()) {
        (Some(d), _) => d.generation,
        (None, Some(last)) => last.generation,
        (None, None) => {
            outln!("no rollout has run yet");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let followed = follow(target, generation, !json);
    let finished = match timeout {
        None => followed.await?,
        Some(limit) => match tokio::time::timeout(limit, followed).await {
            Ok(finished) => finished?,
            Err(_) => {
                eprintln!(
                    "rollout {generation} did not end within {}: it goes on",
                    humantime::format_duration(limit)
                );
                return Ok(ExitCode::from(EXIT_TIMED_OUT));
            }
        },
    };
    if json {
        print_json(&finished)?;
    } else {
        print_summary(&finished)?;
    }
    Ok(exit_of(&finished))
}

fn print_report(report: &Report) -> std::io::Result<()> {
    outln!(
        "preflight: {} voters, quorum {}, can lose {}",
        report.voters,
        report.quorum,
        report.can_lose
    );
    for check in &report.checks {
        let mark = if check.passed { "ok  " } else { "FAIL" };
        outln!("  {mark} {:<18} {}", check.name, check.detail);
    }
    Ok(())
}

fn print_plan(outcome: &UpdateOutcome) -> std::io::Result<()> {
    let plan = &outcome.plan;
    let leader = if plan.not_targeted.contains(&plan.leader) {
        format!("leader {} not targeted", plan.leader)
    } else {
        format!("leader {} last", plan.leader)
    };
    outln!(
        "plan: roll out {} ({leader})",
        short_hash(&plan.target_hash)
    );
    for (index, wave) in plan.waves.iter().enumerate() {
        let nodes: Vec<String> = wave
            .iter()
            .map(|id| match plan.nodes.get(id) {
                Some(n) => format!(
                    "node {id} ({}, {}, fetch {} bytes{})",
                    n.addr,
                    format!("{:?}", n.role).to_lowercase(),
                    n.fetch_bytes,
                    match crate::state::deployment::describe_labels(&n.labels) {
                        labels if labels.is_empty() => labels,
                        labels => format!(", {labels}"),
                    }
                ),
                None => format!("node {id}"),
            })
            .collect();
        outln!("  {}. {}", index + 1, nodes.join(", "));
    }
    let list = |ids: &[u64]| {
        ids.iter()
            .map(|id| format!("node {id}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !plan.already_current.is_empty() {
        outln!("  already on the target: {}", list(&plan.already_current));
    }
    if !plan.not_targeted.is_empty() {
        outln!("  not targeted (--nodes): {}", list(&plan.not_targeted));
    }
    Ok(())
}

/// Polls the rollout of `generation` until it finishes, printing every phase change.
/// Any member can answer; when the one asked is restarting, the others in the rollout's
/// own record are asked instead.
async fn follow(target: &Target, generation: u64, print: bool) -> anyhow::Result<HistoryEntry> {
    /// How often the rollout is read: the command ends within this of the rollout's end.
    /// (The rollout view carries no manifest: a small read.)
    const EVERY: Duration = Duration::from_millis(50);
    /// Unanswered polls in a row before giving up: about 2 minutes.
    const MAX_FAILURES: u32 = 2400;
    let node = &target.node;
    let channels = target.auth.channels()?;
    let mut seen: std::collections::BTreeMap<u64, String> = Default::default();
    let mut last_state = String::new();
    let mut addrs = vec![node.to_string()];
    let mut next = 0;
    let mut failures = 0;
    loop {
        let addr = addrs[next % addrs.len()].clone();
        let answer = ControlClient::with_channels(&channels, &addr)?
            .timeout(Duration::from_secs(3))
            .rollout()
            .await;
        let view = match answer {
            Ok(view) => {
                failures = 0;
                view
            }
            Err(e) => {
                failures += 1;
                if failures > MAX_FAILURES {
                    anyhow::bail!("lost track of rollout {generation}: {e}");
                }
                next += 1;
                tokio::time::sleep(EVERY).await;
                continue;
            }
        };
        match view.deployment {
            Some(deployment) if deployment.generation == generation => {
                addrs = std::iter::once(node.to_string())
                    .chain(deployment.nodes.values().map(|step| step.addr.clone()))
                    .collect();
                next = addrs.iter().position(|a| *a == addr).unwrap_or(0);
                if print {
                    print_progress(&deployment, &mut seen, &mut last_state)?;
                }
            }
            _ => {
                if let Some(entry) = view.history.iter().find(|h| h.generation == generation) {
                    // The phases entered since the last poll, the last commit among them.
                    if print {
                        print_trails(&entry.order, &entry.nodes, &mut seen)?;
                    }
                    return Ok(entry.clone());
                }
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

fn print_progress(
    deployment: &Deployment,
    seen: &mut std::collections::BTreeMap<u64, String>,
    last_state: &mut String,
) -> std::io::Result<()> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let now = now.get(11..19).unwrap_or(&now).to_string();
    let state = deployment.state.as_str().to_string();
    if *last_state != state {
        outln!(
            "{now}  rollout {}: {state}{}",
            deployment.generation,
            deployment
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        *last_state = state;
    }
    print_trails(&deployment.order, &deployment.nodes, seen)?;
    if deployment.soak_started_ms().is_some() && !seen.contains_key(&u64::MAX) {
        outln!(
            "{now}  every node committed: soaking for {} ({} failed health checks in a row \
             on any node revert the rollout)",
            ms(deployment.strategy.soak_ms),
            deployment.strategy.soak_strikes
        );
        seen.insert(u64::MAX, "soak".into());
    }
    Ok(())
}

/// Every phase each node entered that `seen` has not printed yet (see [`NodeStep::trail`]).
fn print_trails(
    order: &[u64],
    nodes: &std::collections::BTreeMap<u64, NodeStep>,
    seen: &mut std::collections::BTreeMap<u64, String>,
) -> std::io::Result<()> {
    let count = order.len();
    for (position, id) in order.iter().enumerate() {
        let Some(step) = nodes.get(id) else {
            continue;
        };
        // Every phase entered since the last poll, from the node's replicated trail,
        // each with the time it was entered.
        let printed: usize = seen.get(id).and_then(|n| n.parse().ok()).unwrap_or(0);
        let new = step.trail.len().saturating_sub(printed);
        for (n, (phase, at_ms)) in step.trail.iter().enumerate().skip(printed) {
            let last = n + 1 == step.trail.len();
            let error = match (&step.error, last) {
                (Some(e), true) if !phase.is_updating() => format!(": {e}"),
                _ => String::new(),
            };
            let at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(*at_ms),
            )
            .to_string();
            outln!(
                "{}  node {id} ({}/{count}, {}): {}{error}",
                at.get(11..19).unwrap_or(&at),
                position + 1,
                step.addr,
                phase.as_str()
            );
        }
        if new > 0 {
            seen.insert(*id, step.trail.len().to_string());
        }
    }
    Ok(())
}

/// The active rollout: header line, then every node's phase.
pub fn print_active(d: &Deployment, notes: Option<&LeaderNotes>) -> std::io::Result<()> {
    outln!(
        "rollout {} {}: {} -> {} (started by {}, term {})",
        d.generation,
        d.state.as_str(),
        short_hash(&d.previous_hash),
        short_hash(&d.target_hash),
        d.started_by,
        d.issued_by_term
    );
    if let Some(trigger) = &d.trigger {
        outln!("  why: {trigger}");
    }
    if let Some(reason) = &d.reason {
        outln!("  reason: {reason}");
    }
    if d.state == DeploymentState::Paused && d.state_since_ms > 0 {
        outln!(
            "  paused for {} (since {}): `cluster rollout resume` goes on",
            ms(crate::clock::unix_ms().saturating_sub(d.state_since_ms) / 1000 * 1000),
            clock(d.state_since_ms)
        );
    }
    if !d.strategy.steps.is_empty() {
        let targets = d.step_targets();
        let step = d.step.min(targets.len() - 1);
        outln!(
            "  canary step {}/{}: {} of {} nodes on the new release at its end ({}; steps {}{})",
            step + 1,
            targets.len(),
            targets[step],
            d.nodes.len(),
            targets
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(" -> "),
            d.strategy
                .steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(","),
            match d.strategy.step_pause_ms {
                Some(pause) => format!(", each holding {}", ms(pause)),
                None => ", each holding until `cluster rollout promote`".into(),
            }
        );
    }
    if let Some(selector) = &d.strategy.selector {
        outln!(
            "  only nodes with {selector} (--nodes); not targeted: {}",
            if d.untargeted.is_empty() {
                "none".to_string()
            } else {
                d.untargeted
                    .iter()
                    .map(|id| format!("node {id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    if let Some(key) = &d.strategy.order_by {
        outln!("  one {key} after another (--order-by {key}), the leader's last");
    }
    if let Some(budget) = d.strategy.max_failures {
        outln!(
            "  failure budget: {} of {} learner failures used (--max-failures {budget})",
            d.own_failures().len(),
            d.failure_budget()
        );
    }
    print_steps(&d.order, &d.nodes, d.reason.as_deref())?;
    print_gates(&d.strategy.analyses, &d.evaluations)?;
    if let Some(notes) = notes {
        if let Some(waiting) = &notes.waiting {
            outln!("  {waiting}");
        }
        if let Some(left) = notes.soak_left_ms {
            outln!(
                "  soaking: every node committed; {} of health watching left",
                ms(left)
            );
        }
    }
    Ok(())
}

/// Every node's phase and timing, in rollout order; a node's error is shown unless it is `said` (the
/// rollout's own reason, already printed).
fn print_steps(
    order: &[u64],
    nodes: &std::collections::BTreeMap<u64, NodeStep>,
    said: Option<&str>,
) -> std::io::Result<()> {
    for id in order {
        let Some(step) = nodes.get(id) else {
            continue;
        };
        let error = match step.error.as_deref() {
            Some(e) if said.is_some_and(|said| said.contains(e)) => ": the reason above".into(),
            Some(e) => format!(": {e}"),
            None => String::new(),
        };
        outln!(
            "  node {id} ({}): {}{}{error}",
            step.addr,
            step.phase.as_str(),
            timing(step.started_ms, step.finished_ms)
        );
    }
    Ok(())
}

/// "12.3 s" or "2m05s".
fn ms(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// " (took 3.2 s)" for a finished node step, "" otherwise.
fn timing(started: Option<u64>, finished: Option<u64>) -> String {
    match (started, finished) {
        (Some(start), Some(end)) => format!(" (took {})", ms(end.saturating_sub(start))),
        _ => String::new(),
    }
}

/// The rollout part of `cluster status`: what runs, what is under way, what failed.
pub fn print_status(view: &RolloutView, members: &[u64]) -> std::io::Result<()> {
    let fleet = &view.fleet;
    outln!();
    let target = match &fleet.target {
        Some(hash) => format!("build {}", short_hash(hash)),
        None if view.history.iter().any(|h| h.left_mixed()) => {
            "none: the last rollout left nodes on different builds (run `cluster update`)".into()
        }
        None => "none yet (set by the first completed rollout)".into(),
    };
    outln!("target: {target}");
    if let Some(staged) = &fleet.staged {
        outln!(
            "staged: build {} on the nodes a rollout with --nodes reached; it becomes the \
             target once every node runs it",
            short_hash(staged)
        );
    }
    let auto = if fleet.auto_disabled { "off" } else { "on" };
    match view.notes.as_ref().map(|n| &n.auto) {
        // The leader's loop has not looked again since the rollout ended.
        Some(status) if status.state == "busy" && view.deployment.is_none() => {
            outln!("automatic rollouts: {auto} [idle]")
        }
        Some(status) if !status.state.is_empty() => {
            let watch = status
                .watch_dist
                .as_ref()
                .map(|d| format!(", watching {d}"))
                .unwrap_or_default();
            let detail = status
                .detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            let retry = status
                .retry_in_ms
                .map(|ms| format!(" (next try in {})", self::ms(ms)))
                .unwrap_or_default();
            outln!(
                "automatic rollouts: {auto}{watch} [{}{detail}{retry}]",
                status.state
            );
        }
        _ => outln!("automatic rollouts: {auto}"),
    }
    if let Some(rollback) = &fleet.last_rollback {
        outln!(
            "last rollback: rollout {} away from {} at {}: {}",
            rollback.generation,
            short_hash(&rollback.from_hash),
            clock(rollback.at_ms),
            rollback.reason
        );
    }
    for id in members {
        let streak = failure_streak(&view.history, *id);
        if streak > 0 {
            outln!("node {id} failed in the last {streak} rollout(s) that included it");
        }
    }
    match &view.deployment {
        Some(d) => {
            outln!();
            print_active(d, view.notes.as_ref())?;
        }
        None => outln!("no rollout is active"),
    }
    Ok(())
}

/// A unix-ms time as UTC "2026-11-22 20:41:07".
pub(crate) fn clock(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

fn print_summary(entry: &HistoryEntry) -> std::io::Result<()> {
    // Only a completed rollout moved the cluster to its target.
    let (from, to) = (
        short_hash(&entry.previous_hash),
        short_hash(&entry.target_hash),
    );
    let builds = match entry.outcome {
        DeploymentState::Completed => format!("{from} -> {to}"),
        _ => format!("tried {to} on a cluster running {from}"),
    };
    outln!(
        "rollout {} {}: {builds}, started by {} at {}{}{}",
        entry.generation,
        entry.outcome.as_str(),
        entry.started_by,
        clock(entry.started_ms),
        entry
            .finished_ms
            .map(|end| format!(", took {}", ms(end.saturating_sub(entry.started_ms))))
            .unwrap_or_default(),
        entry
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    if let Some(trigger) = &entry.trigger {
        outln!("  why: {trigger}");
    }
    if let (Some(selector), false) = (&entry.strategy.selector, entry.untargeted.is_empty()) {
        let others: Vec<String> = entry
            .untargeted
            .iter()
            .map(|id| format!("node {id}"))
            .collect();
        outln!(
            "  only nodes with {selector} (--nodes); not targeted, left on their builds: {}",
            others.join(", ")
        );
    }
    print_steps(&entry.order, &entry.nodes, entry.reason.as_deref())?;
    print_gates(&entry.strategy.analyses, &entry.evaluations)?;
    Ok(())
}

/// Each metric gate: its query and threshold, how many evaluations it had, and the
/// newest (value, verdict, time). `--json` has every evaluation.
fn print_gates(
    analyses: &[crate::rollout::analysis::Analysis],
    evaluations: &[crate::rollout::analysis::Evaluation],
) -> std::io::Result<()> {
    for analysis in analyses {
        let mine: Vec<_> = evaluations
            .iter()
            .filter(|e| e.name == analysis.name)
            .collect();
        let newest = match mine.last() {
            None => "not evaluated yet".to_string(),
            Some(e) => format!(
                "{} evaluations, newest {} at {}: {}",
                mine.len(),
                match (e.value, &e.detail) {
                    (Some(v), _) => format!("{v}"),
                    (None, Some(why)) => format!("no value ({why})"),
                    (None, None) => "no value".into(),
                },
                clock(e.at_ms),
                e.verdict
            ),
        };
        outln!(
            "  gate {}: `{}` must be {} ({newest})",
            analysis.name,
            analysis.query,
            analysis.threshold()
        );
    }
    Ok(())
}

/// Runs `cluster rollout ...`.
pub async fn rollout(command: RolloutCommand) -> anyhow::Result<ExitCode> {
    let (target, operation, json) = match command {
        RolloutCommand::Status {
            target,
            json,
            watch: true,
            timeout,
        } => return watch(&target, json, timeout).await,
        RolloutCommand::Status { target, json, .. } => {
            let view = leader_view(&target, None).await?;
            if json {
                // One schema: `rollout.active` of `cluster status --json`, no manifest.
                let summary = crate::api::rollout::status_json(&view, &[]);
                print_json(&summary["active"])?;
            } else {
                match &view.deployment {
                    None => outln!("no rollout is active"),
                    Some(d) => print_active(d, view.notes.as_ref())?,
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::History { target, json } => {
            let view = target.client()?.rollout().await?;
            if json {
                print_json(&view.history)?;
            } else if view.history.is_empty() {
                outln!("no finished rollouts");
            } else {
                for entry in &view.history {
                    print_summary(entry)?;
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Pause { target, json } => (target, Operation::Pause, json),
        RolloutCommand::Resume { target, json } => (target, Operation::Resume, json),
        RolloutCommand::Promote { target, json } => (target, Operation::Promote, json),
        RolloutCommand::Undo {
            target,
            to,
            detach,
            json,
        } => return undo(&target, to, detach, json).await,
        RolloutCommand::Abort {
            target,
            revert,
            json,
        } => (target, Operation::Abort { revert }, json),
        RolloutCommand::Auto {
            switch,
            target,
            json,
        } => (
            target,
            Operation::Auto {
                enabled: switch == Switch::On,
            },
            json,
        ),
    };
    let done = target
        .client()?
        .timeout(Duration::from_secs(30))
        .operate(operation)
        .await?;
    if json {
        print_json(&done)?;
    } else {
        outln!("{}", done.message);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints how a followed rollout ended (with `json`: those fields and `outcome`, else its
/// summary) and returns its exit status.
fn report_finished(
    finished: HistoryEntry,
    json: Option<serde_json::Value>,
) -> anyhow::Result<ExitCode> {
    match json {
        Some(mut fields) => {
            fields["outcome"] = serde_json::to_value(&finished)?;
            print_json(&fields)?;
        }
        None => print_summary(&finished)?,
    }
    Ok(exit_of(&finished))
}

/// How a followed rollout ended, as an exit status: 0 completed, 1 otherwise.
fn exit_of(finished: &HistoryEntry) -> ExitCode {
    if finished.outcome == DeploymentState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    }
}

/// `cluster rollout undo`: starts the undo on the leader, then follows it like `update`.
async fn undo(
    target: &Target,
    to: Option<String>,
    detach: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // The leader runs preflight (it probes every member) before answering.
    let done = target
        .client()?
        .timeout(Duration::from_secs(90))
        .operate(Operation::Undo { to, by: None })
        .await?;
    if detach {
        if json {
            print_json(&done)?;
        } else {
            outln!("{}", done.message);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        outln!("{}", done.message);
    }
    let finished = follow(target, done.generation, !json).await?;
    let json =
        json.then(|| serde_json::json!({"message": done.message, "generation": done.generation}));
    report_finished(finished, json)
}

/// The rollout view from the leader (with its notes) when it answers, else from the
/// asked node. `status`: the cluster's status if the caller already has it (saves asking
/// for it again to find the leader).
pub async fn leader_view(
    target: &Target,
    status: Option<&ClusterStatus>,
) -> anyhow::Result<RolloutView> {
    let mut client = target.client()?;
    let view = client.rollout().await?;
    if view.notes.is_some() {
        return Ok(view);
    }
    let asked;
    let status = match status {
        Some(status) => status,
        None => {
            asked = client.status(false).await?;
            &asked
        }
    };
    let leader = status
        .leader
        .and_then(|id| status.nodes.iter().find(|n| n.id == id));
    if let Some(leader) = leader {
        if let Ok(theirs) = ControlClient::with_channels(&target.auth.channels()?, &leader.addr) {
            if let Ok(view) = theirs.timeout(Duration::from_secs(3)).rollout().await {
                return Ok(view);
            }
        }
    }
    Ok(view)
}
