//! Automatic rollouts on the leader: watch a dist directory for a new settled build,
//! and bring members that run another build to the cluster's target. What to start is
//! decided by the pure [`super::auto`]; this loop gathers its inputs and starts it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::auto::{backoff_ms, decide, Decision, Settle, Watched};
use super::cluster::{Cluster, Notes};
use super::update::update;
use crate::api::{AutoStatus, UpdateOptions};
use crate::release::Limits;
use crate::state::deployment::short_hash;
use crate::state::{Starter, Strategy};

/// How a node's leader runs automatic rollouts (from `node run` settings).
#[derive(Clone, Debug)]
pub struct AutoConfig {
    /// The directory whose new builds the leader rolls out by itself.
    pub watch_dist: Option<PathBuf>,
    /// How long the watched directory must stay unchanged before its build counts.
    pub settle: Duration,
    /// The pace of automatic rollouts (and catch-ups).
    pub strategy: Strategy,
    /// Their acknowledgement limit (`None`: 2 x heartbeat), as `cluster update --stale-ack-ms`.
    pub stale_ack_ms: Option<u64>,
}

impl Default for AutoConfig {
    fn default() -> Self {
        Self {
            watch_dist: None,
            settle: Duration::from_secs(5),
            strategy: Strategy {
                soak_ms: DEFAULT_SOAK_MS,
                ..Strategy::default()
            },
            stale_ack_ms: None,
        }
    }
}

/// The soak `cluster update` and automatic rollouts use unless told otherwise.
pub const DEFAULT_SOAK_MS: u64 = 180_000;

/// How often the leader looks at its watched directory and the members' builds.
const AUTO_INTERVAL: Duration = Duration::from_millis(500);

/// The leader's automatic rollouts, until `stop`: every [`AUTO_INTERVAL`], while this
/// node leads, decide (see [`super::auto`]) and start what the decision says.
pub async fn run<C: Cluster>(
    cluster: Arc<C>,
    notes: Notes,
    config: AutoConfig,
    mut stop: watch::Receiver<bool>,
) {
    let epoch = Instant::now();
    let settle_ms = config.settle.as_millis() as u64;
    let mut settle = Settle::default();
    // The watched directory's fingerprint and what hashing it gave, so a settled
    // directory is hashed once, not every interval.
    let mut hashed: Option<(u64, Result<String, String>)> = None;
    let mut failures = 0u32;
    let mut retry_at_ms = 0u64;
    let mut logged = String::new();
    let label = config.watch_dist.as_ref().map(|d| d.display().to_string());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(AUTO_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !cluster.raft_view().leading {
            failures = 0;
            continue;
        }
        let now = epoch.elapsed().as_millis() as u64;
        let mut status = AutoStatus {
            watch_dist: label.clone(),
            ..AutoStatus::default()
        };
        let mut note = None;
        let watched = match &config.watch_dist {
            None => None,
            Some(dir) => {
                let dir = dir.clone();
                let fingerprint = tokio::task::spawn_blocking({
                    let dir = dir.clone();
                    move || fingerprint(&dir)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                match fingerprint {
                    Err(e) => {
                        note = Some(format!("cannot read the watched directory: {e}"));
                        None
                    }
                    Ok(None) => None,
                    Ok(Some(print)) if !settle.observe(print, now, settle_ms) => {
                        note = Some(format!(
                            "{} changed recently: waiting {} ms for it to settle",
                            dir.display(),
                            settle.left_ms(now, settle_ms)
                        ));
                        None
                    }
                    Ok(Some(print)) => {
                        if hashed.as_ref().map(|(p, _)| *p) != Some(print) {
                            let result = tokio::task::spawn_blocking({
                                let dir = dir.clone();
                                move || build_hash_of_complete(&dir)
                            })
                            .await
                            .unwrap_or_else(|e| Err(e.to_string()));
                            hashed = Some((print, result));
                        }
                        match hashed.as_ref().map(|(_, r)| r) {
                            Some(Ok(hash)) => Some(Watched {
                                hash: hash.clone(),
                                dir: dir.display().to_string(),
                            }),
                            Some(Err(e)) => {
                                note = Some(format!(
                                    "the watched directory is not a complete build: {e}"
                                ));
                                None
                            }
                            None => None,
                        }
                    }
                }
            }
        };
        let members: Vec<u64> = cluster.raft_view().members.iter().map(|m| m.id).collect();
        let build_hash = cluster.build_hash();
        let decision = cluster.read(|s| decide(s, &members, &build_hash, watched.as_ref()));
        match decision {
            Decision::Off => {
                status.state = "off".into();
                status.detail =
                    Some("switched off cluster-wide (`cluster rollout auto on`)".into());
            }
            Decision::Busy => {
                failures = 0;
                status.state = "busy".into();
                status.detail = Some("waits for the active rollout to end".into());
            }
            Decision::Idle => {
                status.state = if note.is_some() { "settling" } else { "idle" }.into();
                status.detail = note.clone();
            }
            Decision::Blocked { reason } => {
                status.state = "blocked".into();
                status.detail = Some(reason);
            }
            Decision::Roll { .. } if now < retry_at_ms => {
                status.state = "waiting".into();
                status.detail = notes.get().auto.detail.clone();
                status.retry_in_ms = Some(retry_at_ms - now);
            }
            Decision::Roll {
                hash,
                trigger,
                skip,
                from_watch,
            } => {
                let dist_label = if from_watch {
                    label.clone().unwrap_or_default()
                } else {
                    format!("the cluster's target {}", short_hash(&hash))
                };
                let source = from_watch.then(|| config.watch_dist.clone()).flatten();
                let started = start_automatic(
                    cluster.as_ref(),
                    source,
                    &hash,
                    UpdateOptions {
                        strategy: config.strategy.clone(),
                        stale_ack_ms: config.stale_ack_ms,
                        started_by: Starter::Automatic,
                        dist_label,
                        trigger: Some(trigger.clone()),
                        skip,
                        ..UpdateOptions::default()
                    },
                )
                .await;
                match started {
                    Ok(generation) => {
                        failures = 0;
                        retry_at_ms = 0;
                        status.state = "started".into();
                        status.detail = Some(format!("rollout {generation}: {trigger}"));
                        tracing::info!(generation, %trigger, "started an automatic rollout");
                    }
                    Err(why) => {
                        failures += 1;
                        let wait = backoff_ms(failures);
                        retry_at_ms = now + wait;
                        status.state = "waiting".into();
                        status.detail = Some(format!("{trigger}: {why}"));
                        status.retry_in_ms = Some(wait);
                    }
                }
            }
        }
        // Log each distinct situation once, not every interval.
        let key = format!("{} {:?}", status.state, status.detail);
        if key != logged && status.state != "idle" && status.state != "busy" {
            match status.state.as_str() {
                "waiting" | "blocked" => tracing::warn!(
                    state = %status.state,
                    detail = status.detail.as_deref().unwrap_or(""),
                    retry_in_ms = status.retry_in_ms,
                    "automatic rollout"
                ),
                _ => tracing::info!(
                    state = %status.state,
                    detail = status.detail.as_deref().unwrap_or(""),
                    "automatic rollout"
                ),
            }
        }
        logged = key;
        notes.update(|n| n.auto = status);
    }
}

/// Installs the watched build on this leader (when it comes from `source`), then runs
/// the same preflight and start as `cluster update`. Returns the new generation.
async fn start_automatic<C: Cluster>(
    cluster: &C,
    source: Option<PathBuf>,
    hash: &str,
    options: UpdateOptions,
) -> Result<u64, String> {
    if let Some(dir) = source {
        let installed = cluster
            .install_dist(dir)
            .await
            .map_err(|e| format!("cannot install the watched build on the leader: {e}"))?;
        if installed != hash {
            return Err(format!(
                "the watched directory changed while it was installed ({} -> {}): trying again",
                short_hash(hash),
                short_hash(&installed)
            ));
        }
    }
    let manifest = cluster.release_manifest(hash).await.map_err(|e| {
        format!(
            "the leader (node {}) does not hold release {}: {e}",
            cluster.id(),
            short_hash(hash)
        )
    })?;
    let outcome = update(cluster, manifest, options, false)
        .await
        .map_err(|e| e.message)?;
    if !outcome.report.proceed {
        let failed: Vec<String> = outcome
            .report
            .failed()
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        return Err(format!("preflight failed: {}", failed.join("; ")));
    }
    Ok(outcome.generation)
}

/// A cheap fingerprint of a directory tree (paths, kinds, sizes, modes, mtimes) to tell
/// whether it is still changing; `None` when it does not exist or is empty.
fn fingerprint(dir: &Path) -> Result<Option<u64>, String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;
    if !dir.exists() {
        return Ok(None);
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut entries = 0u64;
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name().min_depth(1) {
        let entry = entry.map_err(|e| e.to_string())?;
        let meta = entry.path().symlink_metadata().map_err(|e| e.to_string())?;
        entry.path().hash(&mut hasher);
        (meta.mode(), meta.len(), meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
        entries += 1;
    }
    Ok((entries > 0).then(|| hasher.finish()))
}

/// The build hash of the dist at `dir`, when it is complete: a dist with a version.json
/// must match it (a build still being copied in does not).
fn build_hash_of_complete(dir: &Path) -> Result<String, String> {
    let limits = Limits::default();
    if dir.join(crate::release::manifest::VERSION_FILE).exists() {
        crate::release::verify(dir, &limits)
            .map(|info| info.build_hash)
            .map_err(|e| crate::error::Chain(&e).to_string())
    } else {
        crate::release::hash(dir, &limits).map_err(|e| crate::error::Chain(&e).to_string())
    }
}
