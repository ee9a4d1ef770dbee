//! `cluster supervise`: the restart loop for hosts without systemd (and for tests).
//!
//! It runs `<data>/current/bin/cluster <args>` and starts it again whenever it exits, so a
//! node that exits to switch releases comes back on the release `current` now points at.
//! SIGTERM/SIGINT are passed to the child; the supervisor exits once the child has.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// Environment variable set for the supervised node: it tells the node that exiting is
/// how it restarts (someone will start it again).
pub const SUPERVISED_ENV: &str = "CLUSTER_SUPERVISED";

/// Exit status a node uses when it exits to be restarted (on request, e.g. by a rollout).
/// The supervisor starts it again at once; systemd's unit counts it as a clean exit.
pub const EXIT_RESTART: i32 = 75;

/// How long a node may take to stop once it has decided to (its tasks, the Raft core,
/// the final flush of its store). A store that cannot flush (a failed disk) can block
/// forever; past this the process ends anyway, so that whoever restarts it can, well
/// inside systemd's `TimeoutStopSec=30s`.
pub const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// What a node does when its stop outlives [`STOP_DEADLINE`]: what it would have done at
/// the end of a clean one, minus the cleanup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stuck {
    /// Exit with this status (a supervisor, or nobody, takes it from there).
    Exit(i32),
    /// Re-execute `<data_dir>/current/bin/cluster` (an unsupervised restart).
    Reexec(PathBuf),
}

/// Starts the clock on a stop: unless the process has exited (or re-executed itself)
/// within `deadline`, `stuck` happens from a thread of its own, whatever the rest of the
/// process is blocked on. Nothing disarms it: a stop that finishes ends the process, and
/// the thread with it.
pub fn arm_stop_deadline(deadline: Duration, stuck: Stuck) {
    after(deadline, move || {
        tracing::error!(
            deadline_s = deadline.as_secs(),
            ?stuck,
            "the node did not stop within its deadline (a store that cannot flush?): \
                 ending the process anyway"
        );
        match stuck {
            Stuck::Exit(code) => std::process::exit(code),
            Stuck::Reexec(data_dir) => {
                let error = reexec(&data_dir);
                tracing::error!(%error, "re-executing failed");
                std::process::exit(1)
            }
        }
    });
}

/// Runs `action` on a thread of its own once `deadline` has passed, however blocked the
/// rest of the process is.
fn after(deadline: Duration, action: impl FnOnce() + Send + 'static) {
    let armed = std::thread::Builder::new()
        .name("stop-deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            action()
        });
    if let Err(e) = armed {
        tracing::warn!(error = %e, "no stop deadline: a thread could not be started");
    }
}

/// Replaces this process with `<data>/current/bin/cluster` and the same arguments, after
/// running the boot guard as a supervisor would. Returns only on failure, with why.
pub fn reexec(data_dir: &Path) -> String {
    use std::os::unix::process::CommandExt;
    match crate::agent::guard::before_start(data_dir) {
        Ok(crate::agent::guard::GuardOutcome::Idle) => {}
        Ok(outcome) => tracing::warn!("boot guard: {}", crate::agent::guard::describe(&outcome)),
        Err(e) => tracing::error!(error = %crate::error::Chain(&e), "boot guard"),
    }
    let binary = data_dir.join("current/bin/cluster");
    tracing::info!(binary = %binary.display(), "re-executing");
    let mut command = std::process::Command::new(&binary);
    command.args(std::env::args_os().skip(1));
    // The services' ingresses stay open across the exec.
    if let Some(fds) = crate::service::sockets::pass_on_exec() {
        command.env(crate::service::sockets::INHERITED_ENV, fds);
    }
    let error = command.exec();
    format!(
        "restart requested but {} cannot be executed ({error}): run the node under systemd or \
         `cluster supervise`, or install a release with `cluster dist install <dist> --data-dir {}`",
        binary.display(),
        data_dir.display()
    )
}

/// Who starts the node again when it exits, which decides how it restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervision {
    /// A systemd service (`INVOCATION_ID` set and started by PID 1): exit, systemd
    /// runs the guard and starts `current`.
    Systemd,
    /// `cluster supervise` (it sets `CLUSTER_SUPERVISED`): exit, likewise.
    Supervise,
    /// Nobody: the node runs the guard and re-executes `current` itself.
    Unsupervised,
}

impl Supervision {
    /// Decides from the environment (`var`) and the parent process id. `INVOCATION_ID`
    /// alone is not enough: processes a user's systemd manager starts (a terminal, say)
    /// pass it on to everything they run, and a node that wrongly believes a supervisor
    /// restarts it would just stop. Re-executing is right under any supervisor.
    pub fn detect(var: impl Fn(&str) -> Option<String>, parent_pid: u32) -> Self {
        let set = |name: &str| var(name).is_some_and(|v| !v.is_empty());
        if set(SUPERVISED_ENV) {
            Supervision::Supervise
        } else if set("INVOCATION_ID") && parent_pid == 1 {
            Supervision::Systemd
        } else {
            Supervision::Unsupervised
        }
    }

    /// The running process's supervision.
    pub fn of_this_process() -> Self {
        Self::detect(
            |name| std::env::var(name).ok(),
            std::os::unix::process::parent_id(),
        )
    }

    /// "systemd", "supervise" or "none": the form in logs and `cluster status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Supervision::Systemd => "systemd",
            Supervision::Supervise => "supervise",
            Supervision::Unsupervised => "none",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error(
        "{} does not exist: install a release first (cluster dist install <dist> --data-dir {})",
        .0.display(), .1.display()
    )]
    NoRelease(PathBuf, PathBuf),
    #[error("cannot start {}: {source}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the node under supervision until SIGTERM/SIGINT; returns the last exit status.
pub async fn run(data_dir: &Path, args: Vec<String>) -> Result<ExitStatus, SuperviseError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|source| SuperviseError::Spawn {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| SuperviseError::Spawn {
        path: data_dir.to_path_buf(),
        source,
    })?;
    // The node's descriptor store, as systemd keeps one (`FDSTORE=1` on `NOTIFY_SOCKET`):
    // its services' ingresses stay open across its restarts.
    let store = std::sync::Arc::new(crate::service::sockets::FdStore::default());
    let notify =
        crate::service::sockets::NotifySocket::bind().map_err(|source| SuperviseError::Spawn {
            path: data_dir.to_path_buf(),
            source,
        })?;
    let notify_address = notify.address.clone();
    // Only the node this supervisor runs may store descriptors: any local process can
    // reach an abstract socket.
    let node_pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    {
        let store = store.clone();
        let node_pid = node_pid.clone();
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || loop {
                match notify.receive() {
                    Ok((text, fds, sender)) => {
                        let node = node_pid.load(std::sync::atomic::Ordering::SeqCst);
                        if node != 0 && sender == Some(node) {
                            store.apply(&text, fds);
                        } else {
                            tracing::warn!(?sender, node, "ignored a notify message from a process other than the node");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the notify socket failed: descriptors are no longer kept");
                        return;
                    }
                }
            })
            .map_err(|source| SuperviseError::Spawn {
                path: data_dir.to_path_buf(),
                source,
            })?;
    }
    // Quick successive crashes back off up to 2 s; a run that lasted 10 s resets the delay.
    let mut delay = Duration::from_millis(100);
    loop {
        // The guard reads, writes and fsyncs files: off the async threads.
        let guarded = data_dir.to_path_buf();
        let (guard, installed) = tokio::task::spawn_blocking(move || {
            let outcome = crate::agent::guard::before_start(&guarded);
            (outcome, guarded.join("current/bin/cluster").exists())
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        match guard {
            Ok(crate::agent::guard::GuardOutcome::Idle) => {}
            Ok(outcome) => {
                tracing::warn!("boot guard: {}", crate::agent::guard::describe(&outcome))
            }
            Err(e) => tracing::error!(error = %crate::error::Chain(&e), "boot guard"),
        }
        let binary = data_dir.join("current/bin/cluster");
        if !installed {
            return Err(SuperviseError::NoRelease(binary, data_dir.to_path_buf()));
        }
        let started = Instant::now();
        let mut command = Command::new(&binary);
        command
            .args(&args)
            .env(SUPERVISED_ENV, "1")
            .env("NOTIFY_SOCKET", &notify_address)
            .env_remove("LISTEN_PID")
            .kill_on_drop(true);
        // What the store keeps goes to the node by socket activation (fds 3, 4, ...).
        let kept = store.duplicates();
        let raw: Vec<i32> = kept
            .iter()
            .map(|(_, fd)| std::os::fd::AsRawFd::as_raw_fd(fd))
            .collect();
        if kept.is_empty() {
            command
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES");
        } else {
            let names: Vec<&str> = kept.iter().map(|(name, _)| name.as_str()).collect();
            command
                .env("LISTEN_FDS", kept.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        // A node outliving its supervisor would be started a second time by the next
        // supervisor on the same data dir: stop it gracefully when the supervisor dies.
        // SAFETY: prctl and dup2 in the child before exec; async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                crate::service::sockets::move_to_listen_fds(&raw)
            });
        }
        let mut child = command.spawn().map_err(|source| SuperviseError::Spawn {
            path: binary.clone(),
            source,
        })?;
        drop(kept);
        node_pid.store(child.id().unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
        tracing::info!(pid = child.id(), binary = %binary.display(), "started node");
        let stop = tokio::select! {
            status = child.wait() => {
                let status = status.map_err(|source| SuperviseError::Spawn { path: binary.clone(), source })?;
                tracing::info!(%status, "node exited; starting it again");
                if status.code() == Some(EXIT_RESTART) {
                    // A requested restart, not a crash: no back-off.
                    delay = Duration::ZERO;
                }
                None
            }
            _ = term.recv() => Some(libc::SIGTERM),
            _ = int.recv() => Some(libc::SIGINT),
        };
        if let Some(signal) = stop {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on our own child's pid.
                unsafe {
                    libc::kill(pid as i32, signal);
                }
            }
            let status = child.wait().await.map_err(|source| SuperviseError::Spawn {
                path: binary.clone(),
                source,
            })?;
            return Ok(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            delay = Duration::from_millis(100);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_deadline_acts_even_while_every_other_thread_is_blocked() {
        let (tx, rx) = std::sync::mpsc::channel();
        let armed = Instant::now();
        after(Duration::from_millis(100), move || {
            tx.send(Instant::now()).unwrap()
        });
        // This thread blocks (as a hung flush would) and the deadline still fires.
        let fired = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the deadline fired");
        assert!(fired - armed >= Duration::from_millis(100));
    }

    #[test]
    fn supervision_is_detected_from_the_environment_and_the_parent() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        type Vars = &'static [(&'static str, &'static str)];
        let table: [(Vars, u32, Supervision); 6] = [
            (&[], 1, Supervision::Unsupervised),
            (&[("INVOCATION_ID", "ab12")], 1, Supervision::Systemd),
            // Inherited from a user manager's service (e.g. a terminal): not our supervisor.
            (
                &[("INVOCATION_ID", "ab12")],
                4242,
                Supervision::Unsupervised,
            ),
            (&[("INVOCATION_ID", "")], 1, Supervision::Unsupervised),
            (&[(SUPERVISED_ENV, "1")], 4242, Supervision::Supervise),
            // `cluster supervise` run as a systemd service: supervise is the one that restarts.
            (
                &[(SUPERVISED_ENV, "1"), ("INVOCATION_ID", "ab12")],
                4242,
                Supervision::Supervise,
            ),
        ];
        for (vars, parent, expected) in table {
            assert_eq!(
                Supervision::detect(env(vars), parent),
                expected,
                "{vars:?} parent {parent}"
            );
        }
    }
}
