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
            .kill_on_drop(true);
        // A node outliving its supervisor would be started a second time by the next
        // supervisor on the same data dir: stop it gracefully when the supervisor dies.
        // SAFETY: prctl in the child before exec; async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| SuperviseError::Spawn {
            path: binary.clone(),
            source,
        })?;
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
