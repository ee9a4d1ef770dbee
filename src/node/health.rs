//! The node's own health check (`--health-command`): a shell command run every second in
//! the data dir. Exit 0 is healthy; otherwise the tail of its output is the reason. The
//! latest result is what `cluster status` reports for the node and what a rolling update
//! waits on.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How often the check runs (the pause between the end of one run and the next).
const PERIOD: Duration = Duration::from_secs(1);
/// A run taking longer is killed and counts as unhealthy.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How much of the command's output a reason keeps (its end).
const TAIL_CHARS: usize = 300;

/// The latest result of the health check, shared with the status view.
#[derive(Clone, Debug, Default)]
pub struct HealthState(Arc<Mutex<Option<String>>>);

impl HealthState {
    /// A state for a node with a health command: unhealthy until the first run passes.
    pub fn pending() -> Self {
        Self(Arc::new(Mutex::new(Some(
            "the health command has not completed yet".into(),
        ))))
    }

    /// Why the node is unhealthy; `None` when the last check passed (or none is set).
    pub fn problem(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, problem: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }
}

/// Runs `command` every second until `stop`, recording each result in `state`.
pub async fn run(
    command: String,
    dir: PathBuf,
    state: HealthState,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let problem = tokio::select! {
            problem = check_once(&command, &dir) => problem,
            _ = stop.wait_for(|s| *s) => return,
        };
        if problem != state.problem() {
            match &problem {
                Some(reason) => tracing::warn!(%reason, "health check fails"),
                None => tracing::info!("health check passes"),
            }
        }
        state.set(problem);
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One run of the check: `None` when it exits 0, else why not.
pub async fn check_once(command: &str, dir: &Path) -> Option<String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a timeout kills whatever the command started too.
        .process_group(0);
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return Some(format!("cannot run the health command: {e}")),
    };
    let pid = child.id();
    match tokio::time::timeout(TIMEOUT, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: killpg(2) on the process group we just created.
                unsafe {
                    libc::killpg(pid as i32, libc::SIGKILL);
                }
            }
            Some(format!(
                "the health command did not finish within {} s",
                TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => Some(format!("the health command failed to run: {e}")),
        Ok(Ok(output)) if output.status.success() => None,
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            let text = text.trim();
            let tail: String = {
                let chars: Vec<char> = text.chars().collect();
                chars[chars.len().saturating_sub(TAIL_CHARS)..]
                    .iter()
                    .collect()
            };
            let status = match output.status.code() {
                Some(code) => format!("exited {code}"),
                None => "was killed by a signal".to_string(),
            };
            Some(if tail.is_empty() {
                format!("the health command {status}")
            } else {
                format!("the health command {status}: {tail}")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_zero_is_healthy_and_otherwise_the_output_is_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check_once("true", dir.path()).await, None);
        std::fs::write(dir.path().join("flag"), "").unwrap();
        // Runs in the given directory.
        assert_eq!(check_once("test -e flag", dir.path()).await, None);
        let problem = check_once("echo out; echo 'disk full' >&2; exit 3", dir.path())
            .await
            .unwrap();
        assert_eq!(problem, "the health command exited 3: out\ndisk full");
    }
}
