//! The operator's own services, run by every node from the release `current` points at:
//! their definitions (`definition`, pure), the ingress sockets the node holds across its
//! own restarts (`sockets`), instances (`instance`), and here the supervisor that keeps
//! one healthy instance of the current release in front of each ingress.
//!
//! A cutover is blue/green behind the ingress: when the running instance is of another
//! release, a candidate of the current release starts on the same socket (both hold it),
//! must pass its check through its own check socket within its start grace, is recorded
//! as the active instance, and only then is the old one asked to stop and drain. A
//! candidate that fails is stopped and the old instance keeps serving; the node reports
//! the mismatch as a health problem, so a rollout restores the node, whose next start
//! cuts back to an instance of the previous release the same way. A node restart leaves
//! the instances running; the next process adopts them from their records.

pub mod definition;
pub mod instance;
pub mod sample;
pub mod sockets;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use definition::{DefinitionError, ServiceDef, SERVICE_FILE};
use instance::Instance;

use crate::api::{ServiceInstance, ServiceStatus};
use crate::state::deployment::short_hash;

/// Reads and validates the service definitions of the release in `release_dir` (none
/// when it has no `service.toml`).
pub fn definitions_of(release_dir: &Path) -> Result<Vec<ServiceDef>, DefinitionError> {
    let path = release_dir.join(SERVICE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(DefinitionError::Syntax(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    definition::parse(&text, |relative| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(release_dir.join(relative))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// How the node ends, which decides what becomes of its instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The node restarts (a rollout, a crash): instances keep serving, the next process
    /// adopts them.
    Restart,
    /// The node stops for good: every instance is stopped and drained.
    Final,
}

/// The services of one node: what runs, and what `cluster status` shows.
pub struct Services {
    data_dir: PathBuf,
    views: Arc<Mutex<BTreeMap<String, ServiceStatus>>>,
    /// Why no service could be set up at all (a bad `service.toml` in `current`).
    setup_problem: Mutex<Option<String>>,
    /// The supervision of the release `current` pointed at when it began: how to end
    /// it, and its tasks (one per service).
    running: Mutex<Option<Supervision>>,
}

struct Supervision {
    ending: watch::Sender<Option<Ending>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What one service's task works with.
struct Ctx {
    data_dir: PathBuf,
    release_dir: PathBuf,
    hash: String,
    def: ServiceDef,
    /// `None` for a service that binds its port itself (`socket_activation = false`).
    ingress: Option<Arc<TcpListener>>,
    views: Arc<Mutex<BTreeMap<String, ServiceStatus>>>,
}

impl Ctx {
    fn view(&self, change: impl FnOnce(&mut ServiceStatus)) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(view) = views.get_mut(&self.def.name) {
            change(view);
        }
    }
}

fn instance_view(instance: &Instance) -> ServiceInstance {
    ServiceInstance {
        release: instance.release.clone(),
        pid: instance.pid as u32,
        since_ms: instance.since_ms,
    }
}

impl Services {
    /// No services (a node without releases).
    pub fn none() -> Services {
        Services {
            data_dir: PathBuf::new(),
            views: Default::default(),
            setup_problem: Mutex::new(None),
            running: Mutex::new(None),
        }
    }

    /// Starts supervising the services of `<data_dir>/current`: adopts the instances a
    /// previous process of this node left running, and starts or cuts over the others.
    pub fn start(data_dir: &Path) -> Services {
        let services = Services {
            data_dir: data_dir.to_path_buf(),
            ..Services::none()
        };
        services.launch();
        services
    }

    /// Follows `current` after it changed with no restart of the node (a release that
    /// ships the running `bin/cluster`): the running instances are handed over as to a
    /// restarted node, which adopts them and cuts over to the new release.
    pub async fn reload(&self) {
        self.finish(Ending::Restart).await;
        self.launch();
    }

    fn launch(&self) {
        let data_dir = self.data_dir.as_path();
        self.views.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.setup_problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let (ending, _) = watch::channel(None);
        let mut tasks = Vec::new();
        let current = data_dir.join("current");
        let Ok(target) = std::fs::read_link(&current) else {
            return;
        };
        let hash = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let release_dir = data_dir.join("releases").join(&hash);
        let defs = match definitions_of(&release_dir) {
            Ok(defs) => defs,
            Err(e) => {
                *self.setup_problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                    "release {} defines no runnable service: {e}",
                    short_hash(&hash)
                ));
                return;
            }
        };
        let defined: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        // Services the current release no longer defines: stopped and forgotten.
        for name in instance::recorded(data_dir) {
            if defined.contains(&name.as_str()) {
                continue;
            }
            if let Some(old) = instance::read_record(data_dir, &name) {
                let data_dir = data_dir.to_path_buf();
                tracing::info!(service = %name, pid = old.pid, "the current release no longer defines this service: stopping it");
                tokio::spawn(async move {
                    old.signal(libc::SIGTERM);
                    for _ in 0..400 {
                        if !old.alive() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    old.signal(libc::SIGKILL);
                    instance::remove_record(&data_dir, &name);
                });
            }
        }
        for def in defs {
            let listen = crate::fs::reuse_recorded_port(
                &instance::run_dir(data_dir),
                &format!("{}.addr", def.name),
                def.listen,
            );
            let rollback = instance::read_rollback(data_dir, &def.name);
            // Unhealthy until an instance of this release passes a check: a rollout
            // waits for that.
            let mut view = ServiceStatus {
                name: def.name.clone(),
                listen: def.listen.to_string(),
                state: "starting".into(),
                problem: Some(format!(
                    "no instance of release {} has passed a check yet",
                    short_hash(&hash)
                )),
                last_rollback: rollback.as_ref().map(|r| r.reason.clone()),
                last_rollback_at_ms: rollback.map(|r| r.at_ms),
                ..ServiceStatus::default()
            };
            let held = if def.socket_activation {
                sockets::ingress(&def.name, listen)
                    .or_else(|_| sockets::ingress(&def.name, def.listen))
                    .map(Some)
            } else {
                Ok(None)
            };
            let ingress = match held {
                Ok(listener) => listener,
                Err(e) => {
                    view.state = "failed".into();
                    view.problem = Some(format!(
                        "cannot listen on {}: {e}: free the address, or change `listen` in {SERVICE_FILE}",
                        def.listen
                    ));
                    self.views
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(def.name.clone(), view);
                    continue;
                }
            };
            let bound = match &ingress {
                Some(listener) => listener.local_addr(),
                None => Ok(def.listen),
            };
            if let Ok(bound) = bound {
                view.listen = bound.to_string();
                let _ = std::fs::create_dir_all(instance::run_dir(data_dir));
                let _ = crate::fs::write_atomically(
                    &instance::run_dir(data_dir),
                    &format!("{}.addr", def.name),
                    bound.to_string().as_bytes(),
                );
            }
            self.views
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(def.name.clone(), view);
            let ctx = Ctx {
                data_dir: data_dir.to_path_buf(),
                release_dir: release_dir.clone(),
                hash: hash.clone(),
                def,
                ingress,
                views: self.views.clone(),
            };
            tasks.push(tokio::spawn(run_one(ctx, ending.subscribe())));
        }
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Supervision { ending, tasks });
    }

    /// Why the node's services make it unhealthy, if they do.
    pub fn problem(&self) -> Option<String> {
        if let Some(problem) = &*self.setup_problem.lock().unwrap_or_else(|e| e.into_inner()) {
            return Some(problem.clone());
        }
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let problems: Vec<String> = views
            .values()
            .filter_map(|v| {
                v.problem
                    .as_ref()
                    .map(|p| format!("service {}: {p}", v.name))
            })
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// Every service's state, for `cluster status`.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        let views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        views.values().cloned().collect()
    }

    /// Ends supervision: on a restart the instances keep serving; on a final stop each
    /// is stopped and drained first.
    pub async fn finish(&self, ending: Ending) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(running) = running else {
            return;
        };
        let _ = running.ending.send(Some(ending));
        for task in running.tasks {
            let _ = task.await;
        }
    }
}

/// The longest pause between attempts to start a service that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps one healthy instance of the current release in front of one service's ingress
/// until the node ends.
async fn run_one(ctx: Ctx, mut ending: watch::Receiver<Option<Ending>>) {
    let def = ctx.def.clone();
    let mut active: Option<Instance> = None;
    // When the running instance is of another release, when to try the current one again.
    let mut retry_at: Option<Instant> = None;
    let mut backoff = Duration::from_secs(1);
    if let Some(adopted) = instance::read_record(&ctx.data_dir, &def.name).filter(Instance::alive) {
        tracing::info!(service = %def.name, pid = adopted.pid, release = %short_hash(&adopted.release), "adopted the running instance");
        ctx.view(|v| v.active = Some(instance_view(&adopted)));
        if adopted.release == ctx.hash {
            ctx.view(|v| v.state = "ready".into());
        } else {
            retry_at = Some(Instant::now());
        }
        active = Some(adopted);
    }
    let mut streak = 0u32;
    loop {
        if ending.borrow().is_some() {
            break;
        }
        let stale = active.as_ref().is_some_and(|a| a.release != ctx.hash);
        match active.take() {
            Some(running) if !running.alive() => {
                tracing::warn!(service = %def.name, pid = running.pid, "the instance exited: starting another");
                ctx.view(|v| {
                    v.problem = Some(format!(
                        "the instance (pid {}) exited; starting another",
                        running.pid
                    ));
                    v.active = None;
                    v.failure_streak += 1;
                });
                instance::remove_record(&ctx.data_dir, &def.name);
            }
            Some(running) if stale && retry_at.is_some_and(|at| Instant::now() >= at) => {
                match cutover(&ctx, &running, &mut ending).await {
                    Ok(new) => {
                        active = Some(new);
                        retry_at = None;
                        backoff = Duration::from_secs(1);
                        streak = 0;
                    }
                    Err(why) => {
                        ctx.view(|v| {
                            v.problem = Some(format!(
                                "runs release {} instead of the current {}: its candidate {why}",
                                short_hash(&running.release),
                                short_hash(&ctx.hash)
                            ));
                        });
                        // One that binds its own port was stopped for its candidate.
                        if running.alive() {
                            active = Some(running);
                        } else {
                            instance::remove_record(&ctx.data_dir, &def.name);
                            ctx.view(|v| v.active = None);
                        }
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                continue;
            }
            Some(running) => {
                let failed = running.check(&def, &ctx.release_dir).await;
                match failed {
                    None => {
                        streak = 0;
                        if !stale {
                            ctx.view(|v| {
                                v.problem = None;
                                v.failure_streak = 0;
                                v.state = "ready".into();
                            });
                        }
                    }
                    Some(why) => {
                        streak += 1;
                        tracing::warn!(service = %def.name, streak, reason = %why, "check failed");
                        ctx.view(|v| v.failure_streak = streak);
                        if streak >= def.check.failure_threshold {
                            let problem = format!("failed {streak} checks in a row: {why}");
                            if streak == def.check.failure_threshold {
                                // The node is unhealthy from here: a rollout restores it,
                                // and its next start switches back to the previous
                                // release's instance. Recorded now, for that process.
                                let rollback = instance::Rollback {
                                    reason: format!(
                                        "release {} {problem}",
                                        short_hash(&running.release)
                                    ),
                                    at_ms: crate::clock::unix_ms(),
                                };
                                instance::write_rollback(&ctx.data_dir, &def.name, &rollback);
                                ctx.view(|v| {
                                    v.last_rollback = Some(rollback.reason.clone());
                                    v.last_rollback_at_ms = Some(rollback.at_ms);
                                });
                            }
                            ctx.view(|v| v.problem = Some(problem));
                        }
                    }
                }
                active = Some(running);
            }
            None => match bring_up(&ctx, &mut ending).await {
                Ok(new) => {
                    if let Err(e) = instance::write_record(&ctx.data_dir, &def.name, &new) {
                        tracing::warn!(service = %def.name, error = %e, "cannot record the instance: a restarted node will not adopt it");
                    }
                    ctx.view(|v| {
                        v.active = Some(instance_view(&new));
                        v.candidate = None;
                        v.state = "ready".into();
                        v.problem = None;
                    });
                    tracing::info!(service = %def.name, pid = new.pid, release = %short_hash(&new.release), "instance serving");
                    active = Some(new);
                    backoff = Duration::from_secs(1);
                    streak = 0;
                }
                Err(why) => {
                    ctx.view(|v| {
                        v.state = "failed".into();
                        v.candidate = None;
                        v.problem = Some(format!("no instance serves: one {why}"));
                        v.failure_streak += 1;
                    });
                    tracing::warn!(service = %def.name, reason = %why, "the service did not start; trying again in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = ending.changed() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        }
        tokio::select! {
            _ = tokio::time::sleep(def.check.interval) => {}
            _ = ending.changed() => {}
        }
    }
    let ending = *ending.borrow();
    if ending == Some(Ending::Final) {
        if let Some(running) = active {
            ctx.view(|v| v.state = "stopping".into());
            tracing::info!(service = %def.name, pid = running.pid, "stopping the instance");
            running.stop(&def).await;
            instance::remove_record(&ctx.data_dir, &def.name);
        }
    }
}

/// Starts a candidate of the current release on the ingress and waits for its first
/// passing check (within the start grace). A candidate that fails is stopped.
async fn bring_up(
    ctx: &Ctx,
    ending: &mut watch::Receiver<Option<Ending>>,
) -> Result<Instance, String> {
    let def = &ctx.def;
    let candidate = instance::start(
        def,
        &ctx.data_dir,
        &ctx.release_dir,
        &ctx.hash,
        ctx.ingress.as_deref(),
    )
    .map_err(|e| format!("cannot start {}: {e}", def.exec))?;
    tracing::info!(service = %def.name, pid = candidate.pid, release = %short_hash(&ctx.hash), "started a candidate");
    // Not healthy until the candidate passes: a rollout waits for it.
    ctx.view(|v| {
        v.candidate = Some(instance_view(&candidate));
        v.state = "starting".into();
        v.problem = Some(format!(
            "a new instance of release {} (pid {}) has not passed its check yet",
            short_hash(&ctx.hash),
            candidate.pid
        ));
    });
    let deadline = Instant::now() + def.start_grace;
    let mut last;
    loop {
        if !candidate.alive() {
            return Err(format!(
                "exited before passing its check (its output: {})",
                instance::run_dir(&ctx.data_dir)
                    .join(format!("{}.log", def.name))
                    .display()
            ));
        }
        match candidate.check(def, &ctx.release_dir).await {
            None => return Ok(candidate),
            Some(why) => last = why,
        }
        if Instant::now() >= deadline || ending.borrow().is_some() {
            candidate.stop(def).await;
            ctx.view(|v| v.candidate = None);
            return Err(format!(
                "did not pass its check within {}: {last}",
                humantime::format_duration(def.start_grace)
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(def.check.interval.min(Duration::from_millis(100))) => {}
            _ = ending.changed() => {}
        }
    }
}

/// Replaces `old` (another release's instance) with a healthy instance of the current
/// release: the candidate serves beside it, is recorded, then `old` drains.
async fn cutover(
    ctx: &Ctx,
    old: &Instance,
    ending: &mut watch::Receiver<Option<Ending>>,
) -> Result<Instance, String> {
    let def = &ctx.def;
    if ctx.ingress.is_none() {
        // It binds its port itself: the old instance must let go of it first, and the
        // port refuses connections until the new one listens.
        ctx.view(|v| v.state = "stopping".into());
        tracing::info!(service = %def.name, pid = old.pid, "not socket-activated: stopping the old instance before the new one starts");
        old.stop(def).await;
    }
    let new = match bring_up(ctx, ending).await {
        Ok(new) => new,
        Err(why) => {
            let at = crate::clock::unix_ms();
            tracing::warn!(service = %def.name, reason = %why, "the candidate failed: the running instance keeps serving, if any");
            let rollback = instance::Rollback {
                reason: format!("release {}: {why}", short_hash(&ctx.hash)),
                at_ms: at,
            };
            instance::write_rollback(&ctx.data_dir, &def.name, &rollback);
            ctx.view(|v| {
                v.state = "rolling_back".into();
                v.last_rollback = Some(rollback.reason.clone());
                v.last_rollback_at_ms = Some(at);
            });
            return Err(why);
        }
    };
    // Recorded before the old instance is asked to stop: a node that dies here adopts
    // the new one and the old one finishes draining by itself.
    if let Err(e) = instance::write_record(&ctx.data_dir, &def.name, &new) {
        tracing::warn!(service = %def.name, error = %e, "cannot record the instance: a restarted node will not adopt it");
    }
    ctx.view(|v| {
        v.active = Some(instance_view(&new));
        v.candidate = None;
        v.state = "switched".into();
        v.problem = None;
        v.failure_streak = 0;
    });
    tracing::info!(service = %def.name, new = new.pid, old = old.pid, release = %short_hash(&ctx.hash), "switched: the old instance drains");
    let stopped = old.stop(def).await;
    tracing::info!(service = %def.name, pid = old.pid, ?stopped, "the old instance is gone");
    ctx.view(|v| v.state = "ready".into());
    Ok(new)
}
