//! `cluster update` and `cluster rollout`: start a rolling update, follow it, inspect it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::output::print_json;
use super::Target;
use crate::agent::upload::{push, LocalDist};
use crate::api::ApiError;
use crate::dist::Limits;
use crate::rollout::preflight::Report;
use crate::rollout::runtime::{UpdateOptions, UpdateOutcome};
use crate::rpc::{AgentClient, Channels, ControlClient};
use crate::state::{Deployment, DeploymentState, HistoryEntry, OnFailure, Starter, Strategy};

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
    #[arg(long)]
    pub dist: PathBuf,
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
    #[arg(long, default_value_t = 60_000)]
    pub health_deadline_ms: u64,
    /// Pause between health polls of a node
    #[arg(long, default_value_t = 500)]
    pub poll_interval_ms: u64,
    /// How long a healthy node must stay healthy, on one boot, before it is committed
    #[arg(long, default_value_t = 10_000)]
    pub stabilize_ms: u64,
    /// Acknowledgement age above which a node counts as stale [default: 2 x heartbeat]
    #[arg(long)]
    pub stale_ack_ms: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Show the active rollout: generation, state, target, every node's phase
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON: the deployment record, or null when none is active
        #[arg(long)]
        json: bool,
    },
    /// Show finished rollouts, oldest first: outcome, reason, per-node results
    History {
        #[command(flatten)]
        target: Target,
        /// Print JSON: the list of history entries
        #[arg(long)]
        json: bool,
    },
}

fn short(hash: &str) -> &str {
    crate::state::deployment::short_hash(hash)
}

fn options_of(args: &UpdateArgs) -> UpdateOptions {
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
            ..Strategy::default()
        },
        allow_downtime: args.allow_downtime,
        stale_ack_ms: args.stale_ack_ms,
        started_by: Starter::Operator,
        dist_label: args.dist.display().to_string(),
    }
}

/// Runs `cluster update`: upload, preflight, plan, start, and follow to the end.
pub async fn update(args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let limits = Limits::default();
    let dir = args.dist.clone();
    let dist = match tokio::task::spawn_blocking(move || LocalDist::scan(&dir, &limits)).await? {
        Ok(dist) => Arc::new(dist),
        Err(e) => {
            eprintln!("preflight failed: {e}");
            return Ok(ExitCode::from(EXIT_PREFLIGHT));
        }
    };
    let options = options_of(&args);
    let mut client = args.target.client()?.timeout(Duration::from_secs(60));
    if !args.dry_run {
        let status = client.status(false).await?;
        let leader = status
            .leader
            .and_then(|id| status.nodes.iter().find(|n| n.id == id))
            .ok_or_else(|| ApiError::unavailable("no leader: is a majority of voters running?"))?;
        let mut agent = AgentClient::new(&leader.addr)?;
        let uploaded = push(&mut agent, &dist).await?;
        if !args.json {
            eprintln!(
                "uploaded {} to the leader (node {}): {} bytes sent, {} reused",
                short(&uploaded.hash),
                leader.id,
                uploaded.fetched_bytes,
                uploaded.reused_bytes
            );
        }
    }
    let outcome = client
        .update(&dist.manifest, &options, args.dry_run)
        .await?;
    if !args.json {
        print_report(&outcome.report);
        print_plan(&outcome);
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
            println!("dry run: preflight passed; nothing was changed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let finished = follow(&args.target.node, outcome.generation, !args.json).await?;
    if args.json {
        print_json(&serde_json::json!({
            "report": outcome.report,
            "plan": outcome.plan,
            "generation": outcome.generation,
            "outcome": finished,
        }))?;
    } else {
        print_summary(&finished);
    }
    Ok(if finished.outcome == DeploymentState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_FAILURE)
    })
}

fn print_report(report: &Report) {
    println!(
        "preflight: {} voters, quorum {}, can lose {}",
        report.voters, report.quorum, report.can_lose
    );
    for check in &report.checks {
        let mark = if check.passed { "ok  " } else { "FAIL" };
        println!("  {mark} {:<18} {}", check.name, check.detail);
    }
}

fn print_plan(outcome: &UpdateOutcome) {
    let plan = &outcome.plan;
    println!(
        "plan: roll out {} (leader {} last)",
        short(&plan.target_hash),
        plan.leader
    );
    for (index, wave) in plan.waves.iter().enumerate() {
        let nodes: Vec<String> = wave
            .iter()
            .map(|id| match plan.nodes.get(id) {
                Some(n) => format!(
                    "node {id} ({}, {}, fetch {} bytes)",
                    n.addr,
                    format!("{:?}", n.role).to_lowercase(),
                    n.fetch_bytes
                ),
                None => format!("node {id}"),
            })
            .collect();
        println!("  {}. {}", index + 1, nodes.join(", "));
    }
    if !plan.already_current.is_empty() {
        println!("  already on the target: {:?}", plan.already_current);
    }
}

/// Polls the rollout of `generation` until it finishes, printing every phase change.
/// Any member can answer; when the one asked is restarting, the others in the rollout's
/// own record are asked instead.
async fn follow(node: &str, generation: u64, print: bool) -> anyhow::Result<HistoryEntry> {
    /// Consecutive unanswered polls (200 ms apart) before giving up: about 2 minutes.
    const MAX_FAILURES: u32 = 600;
    let channels = Channels::default();
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
                tokio::time::sleep(Duration::from_millis(200)).await;
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
                    print_progress(&deployment, &mut seen, &mut last_state);
                }
            }
            _ => {
                if let Some(entry) = view.history.iter().find(|h| h.generation == generation) {
                    return Ok(entry.clone());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_progress(
    deployment: &Deployment,
    seen: &mut std::collections::BTreeMap<u64, String>,
    last_state: &mut String,
) {
    let state = deployment.state.as_str().to_string();
    if *last_state != state {
        println!(
            "rollout {}: {state}{}",
            deployment.generation,
            deployment
                .reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
        *last_state = state;
    }
    for id in &deployment.order {
        let Some(step) = deployment.nodes.get(id) else {
            continue;
        };
        let phase = step.phase.as_str().to_string();
        if seen.get(id) != Some(&phase) {
            let error = step
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!("  node {id} ({}): {phase}{error}", step.addr);
            seen.insert(*id, phase);
        }
    }
}

/// The active rollout: header line, then every node's phase.
pub fn print_active(d: &Deployment) {
    println!(
        "rollout {} {}: {} -> {} (started by {}, term {})",
        d.generation,
        d.state.as_str(),
        short(&d.previous_hash),
        short(&d.target_hash),
        d.started_by,
        d.issued_by_term
    );
    let mut seen = Default::default();
    let mut state = d.state.as_str().to_string();
    print_progress(d, &mut seen, &mut state);
}

/// The `rollout` key of `cluster status --json`: generation, state, hashes, phases.
pub fn summary_json(d: &Deployment) -> serde_json::Value {
    let phases: serde_json::Map<String, serde_json::Value> = d
        .order
        .iter()
        .filter_map(|id| {
            let step = d.nodes.get(id)?;
            Some((id.to_string(), serde_json::json!(step.phase.as_str())))
        })
        .collect();
    serde_json::json!({
        "generation": d.generation,
        "state": d.state.as_str(),
        "target_hash": d.target_hash,
        "previous_hash": d.previous_hash,
        "phases": phases,
    })
}

fn print_summary(entry: &HistoryEntry) {
    println!(
        "rollout {} {}: target {}{}",
        entry.generation,
        entry.outcome.as_str(),
        short(&entry.target_hash),
        entry
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    for id in &entry.order {
        if let Some(step) = entry.nodes.get(id) {
            let error = step
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!(
                "  node {id} ({}): {}{error}",
                step.addr,
                step.phase.as_str()
            );
        }
    }
}

/// Runs `cluster rollout ...`.
pub async fn rollout(command: RolloutCommand) -> anyhow::Result<ExitCode> {
    match command {
        RolloutCommand::Status { target, json } => {
            let view = target.client()?.rollout().await?;
            if json {
                print_json(&view.deployment)?;
            } else {
                match &view.deployment {
                    None => println!("no rollout is active"),
                    Some(d) => print_active(d),
                }
            }
        }
        RolloutCommand::History { target, json } => {
            let view = target.client()?.rollout().await?;
            if json {
                print_json(&view.history)?;
            } else if view.history.is_empty() {
                println!("no finished rollouts");
            } else {
                for entry in &view.history {
                    print_summary(entry);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
