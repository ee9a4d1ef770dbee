//! Starting a rolling update on the leader: survey the cluster, judge it (preflight),
//! plan it, and begin the replicated deployment.

use std::time::Duration;

use super::cluster::Cluster;
use super::plan::{plan, Start};
use super::preflight::{preflight, ActiveRollout, Member, Options, Survey, TargetDist};
use crate::api::{ApiError, UpdateOptions, UpdateOutcome};
use crate::clock::unix_ms;
use crate::release::{signature, Limits, Manifest};
use crate::state::{Command, Response};

/// How long a member may take to answer the survey's probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Gathers what preflight judges, on the leader, with a fresh quorum round trip.
pub async fn survey<C: Cluster>(
    cluster: &C,
    manifest: &Manifest,
    dist_label: &str,
    dry_run: bool,
) -> Survey {
    let leadership = cluster.confirm_leadership().await;
    let view = cluster.raft_view();
    let probes = view.members.iter().map(|m| async move {
        let mut member = Member {
            id: m.id,
            addr: m.addr.clone(),
            role: m.role,
            last_ack_ms: m.last_ack_ms,
            matched_index: m.matched_index,
            labels: cluster.read(|s| {
                s.nodes
                    .get(&m.id)
                    .map(|info| info.labels.clone())
                    .unwrap_or_default()
            }),
            ..Member::default()
        };
        probe_member(cluster, &mut member, manifest).await;
        member
    });
    let members = futures::future::join_all(probes).await;
    let hash = manifest.build_hash();
    // A release this leader would refuse to install is offered to no node: the refusal is
    // a failed check of the dist, before anything is planned or started.
    let admitted = manifest
        .validate(&Limits::default())
        .map_err(|e| e.to_string())
        .and_then(|()| {
            signature::check(&cluster.release_keys(), manifest).map_err(|e| e.to_string())
        });
    let mut services = Vec::new();
    let error = match admitted {
        Err(e) => Some(e),
        // A dry run uploads nothing: the leader fetching the release is part of the plan.
        Ok(()) if !dry_run && !cluster.holds_release(&hash).await => Some(format!(
            "the leader (node {}) does not hold release {hash}: upload the dist to it first",
            cluster.id()
        )),
        // The candidate starts here, on the leader, before any node is touched.
        Ok(()) if !dry_run => match cluster.version_of(&hash).await {
            Ok(said) => match super::preflight::judge_version(&said, &hash, crate::state::PROTOCOL)
            {
                Err(why) => Some(format!("the release does not start: {why}")),
                // Its services must be runnable too, or no node could cut over to them.
                Ok(()) => match cluster.services_of(&hash).await {
                    Ok(list) => {
                        services = list;
                        None
                    }
                    Err(why) => Some(format!("the release's services cannot run: {why}")),
                },
            },
            Err(why) => Some(format!("the release does not start on the leader: {why}")),
        },
        // A dry run reads the services of a release the leader already holds.
        Ok(()) if cluster.holds_release(&hash).await => match cluster.services_of(&hash).await {
            Ok(list) => {
                services = list;
                None
            }
            Err(why) => Some(format!("the release's services cannot run: {why}")),
        },
        Ok(()) => None,
    };
    Survey {
        leader: cluster.id(),
        term: view.term,
        leadership_confirmed: leadership.is_ok(),
        leadership_error: leadership.err(),
        members,
        last_log_index: view.last_log_index,
        heartbeat_ms: cluster.heartbeat_ms(),
        active_rollout: cluster.read(|s| {
            s.deployment.as_ref().map(|d| ActiveRollout {
                generation: d.generation,
                state: d.state,
                target_hash: d.target_hash.clone(),
            })
        }),
        dist: TargetDist {
            dir: dist_label.to_string(),
            build_hash: hash,
            files: manifest.file_count(),
            total_bytes: manifest.total_bytes(),
            error,
            signed_by: manifest.signature.as_ref().map(|s| s.key_id.clone()),
            services,
        },
    }
}

/// Asks one member how it is: its own status row, its free disk and what it must fetch.
async fn probe_member<C: Cluster>(cluster: &C, member: &mut Member, manifest: &Manifest) {
    let me = match cluster
        .node_status(member.id, &member.addr, PROBE_TIMEOUT)
        .await
    {
        Ok(me) => me,
        Err(e) => {
            member.unreachable_reason = Some(e.message);
            return;
        }
    };
    member.reachable = true;
    member.serving = me.state != "shutdown";
    member.build_hash = me.build_hash;
    member.protocol = me.protocol;
    member.applied_index = me.applied_index;
    member.health_problem = me.health_problem;
    match cluster.disk_needs(member.id, &member.addr, manifest).await {
        Ok(needs) => {
            member.free_bytes = needs.free_bytes;
            member.needed_bytes = needs.needed_bytes;
        }
        Err(e) => member.health_problem = Some(format!("cannot plan the sync: {e}")),
    }
}

/// Runs preflight and, unless `dry_run` or preflight fails, starts the deployment.
pub async fn update<C: Cluster>(
    cluster: &C,
    manifest: Manifest,
    options: UpdateOptions,
    dry_run: bool,
) -> Result<UpdateOutcome, ApiError> {
    let survey = survey(cluster, &manifest, &options.dist_label, dry_run).await;
    let preflight_options = Options {
        allow_downtime: options.allow_downtime,
        stale_ack_ms: options.stale_ack_ms,
        min_protocol: options.strategy.min_protocol(),
        selector: options.strategy.selector.clone(),
        order_by: options.strategy.order_by.clone(),
        ..Options::default()
    };
    let report = preflight(&survey, &preflight_options);
    let mut planned = survey.clone();
    planned.members.retain(|m| !options.skip.contains(&m.id));
    let plan = plan(&planned, &options.strategy);
    if dry_run || !report.proceed {
        return Ok(UpdateOutcome {
            report,
            plan,
            generation: 0,
        });
    }
    let mut strategy = options.strategy.clone();
    strategy.stale_ack_ms = preflight_options.stale_ack_limit_ms(survey.heartbeat_ms);
    strategy.allow_downtime = options.allow_downtime;
    let generation = cluster.read(|s| s.last_generation) + 1;
    let deployment = plan
        .deployment(Start {
            generation,
            manifest,
            strategy,
            started_by: options.started_by,
            trigger: options.trigger.clone().or_else(|| {
                (!options.dist_label.is_empty()).then(|| {
                    let who = match &options.operator {
                        Some(name) => format!("{} {name}", options.started_by),
                        None => options.started_by.to_string(),
                    };
                    format!("{who} ran `cluster update --dist {}`", options.dist_label)
                })
            }),
            term: survey.term,
            now_ms: unix_ms(),
        })
        .map_err(|e| ApiError::precondition(e.to_string()))?;
    commit(cluster, Command::BeginDeployment { deployment }).await?;
    Ok(UpdateOutcome {
        report,
        plan,
        generation,
    })
}

/// Replicates `command` and turns a refusal into an error.
pub(super) async fn commit<C: Cluster>(cluster: &C, command: Command) -> Result<(), ApiError> {
    match cluster.propose(command).await? {
        Response::Rejected { reason } => Err(ApiError::precondition(reason)),
        Response::Ok => Ok(()),
    }
}
