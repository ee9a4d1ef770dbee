//! One running instance of a service: how it is started (the ingress and its own check
//! socket by descriptor, the systemd socket-activation convention), recorded so that a
//! restarted node adopts it, checked, and stopped (stop signal, drain, SIGKILL).
//!
//! Instances are not the node's children in any way that matters: nothing kills them
//! when the node exits, and a node identifies one by pid and start time (so a reused
//! pid is never taken for it), not by a handle.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::definition::{CheckKind, ServiceDef};

/// A running instance as the node records it in `<data>/service-run/<name>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub pid: i32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat`): with the
    /// pid, what identifies it.
    pub start_ticks: u64,
    /// The release it runs from (build hash).
    pub release: String,
    /// Its own check socket (loopback; only this instance answers there).
    pub check_addr: SocketAddr,
    /// When it started (unix ms).
    pub since_ms: u64,
    /// The kernel's boot id when it started: after a reboot a record names nothing, even
    /// if another process now has its pid and start time.
    #[serde(default)]
    pub boot_id: String,
}

/// This boot of the host (`/proc/sys/kernel/random/boot_id`), read once.
fn boot_id() -> String {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|id| id.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

/// Where a node keeps its instances' records and logs.
pub fn run_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("service-run")
}

/// A service's state directory, kept across releases.
pub fn state_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("services").join(name)
}

/// Starts an instance of `def` from `release_dir` (release `hash`) on `ingress`, or,
/// for a service that binds its port itself, with no socket.
pub fn start(
    def: &ServiceDef,
    data_dir: &Path,
    release_dir: &Path,
    hash: &str,
    ingress: Option<&TcpListener>,
) -> std::io::Result<Instance> {
    use std::os::unix::process::CommandExt;
    // Its own check socket, when it takes sockets; otherwise it is checked where it
    // listens (only one instance runs at a time).
    let check = match ingress {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0")?),
        None => None,
    };
    let check_addr = match &check {
        Some(check) => check.local_addr()?,
        None => reachable(def.listen),
    };
    let state = state_dir(data_dir, &def.name);
    std::fs::create_dir_all(&state)?;
    let run = run_dir(data_dir);
    std::fs::create_dir_all(&run)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.join(format!("{}.log", def.name)))?;
    // Numbered above 100, so that moving them to 3 and 4 in the child overwrites neither.
    let high = |fd: i32| -> std::io::Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we hold; the new one is ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created.
        Ok(unsafe { OwnedFd::from_raw_fd(dup) })
    };
    let fds = match (ingress, &check) {
        (Some(ingress), Some(check)) => vec![high(ingress.as_raw_fd())?, high(check.as_raw_fd())?],
        _ => Vec::new(),
    };
    let raw: Vec<i32> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut command = std::process::Command::new("/bin/sh");
    // The shell records its own pid, which the service keeps when the shell execs it:
    // socket activation's LISTEN_PID, which only the child can know.
    command
        .arg("-c")
        .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
        .arg(release_dir.join(&def.exec))
        .args(&def.args)
        .current_dir(release_dir)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove(super::sockets::INHERITED_ENV)
        .env_remove(crate::supervise::SUPERVISED_ENV)
        .envs(&def.env)
        .env("STATE_DIRECTORY", &state)
        .env("CLUSTER_SERVICE", &def.name)
        .env("CLUSTER_RELEASE", hash)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if !raw.is_empty() {
        command
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", format!("{}:check", def.name));
        // SAFETY: only dup2 between fork and exec.
        unsafe {
            command.pre_exec(move || super::sockets::move_to_listen_fds(&raw));
        }
    }
    let child = command.spawn()?;
    let pid = child.id() as i32;
    // The child is never waited for through this handle: `alive` reaps it.
    drop(child);
    let start_ticks = start_ticks(pid).unwrap_or(0);
    Ok(Instance {
        pid,
        start_ticks,
        release: hash.to_string(),
        check_addr,
        since_ms: crate::clock::unix_ms(),
        boot_id: boot_id(),
    })
}

/// Where to reach a service that listens on `listen` from this host: its own address, or
/// loopback for a wildcard one.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// The start time of `pid` and whether it is a zombie, from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 of the whole line is the 20th after the name and state.
    let ticks = fields.get(19)?.parse().ok()?;
    Some((state, ticks))
}

fn start_ticks(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, ticks)| ticks)
}

impl Instance {
    /// Whether the process still runs (a zombie does not; one that is this process's
    /// child is reaped here).
    pub fn alive(&self) -> bool {
        if self.boot_id != boot_id() || self.boot_id.is_empty() {
            return false;
        }
        match stat(self.pid) {
            Some((state, ticks)) if ticks == self.start_ticks => {
                if state == 'Z' || state == 'X' {
                    reap(self.pid);
                    false
                } else {
                    true
                }
            }
            _ => false,
        }
    }

    /// Sends `signal` to the instance, if it is still the process recorded.
    pub fn signal(&self, signal: i32) {
        if self.alive() {
            // SAFETY: kill(2) on the pid we started, checked by start time just above.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// Asks the instance to stop with `def.stop_signal`, gives it the drain timeout and
    /// the kill timeout, then kills it. Returns how it ended.
    pub async fn stop(&self, def: &ServiceDef) -> Stopped {
        if !self.alive() {
            return Stopped::AlreadyGone;
        }
        self.signal(def.stop_signal);
        if self
            .exited_within(def.drain_timeout + def.kill_timeout)
            .await
        {
            return Stopped::Drained;
        }
        self.signal(libc::SIGKILL);
        self.exited_within(Duration::from_secs(10)).await;
        Stopped::Killed
    }

    async fn exited_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        !self.alive()
    }

    /// One check of this instance: `None` when it passes, else why not.
    pub async fn check(&self, def: &ServiceDef, release_dir: &Path) -> Option<String> {
        let timeout = def.check.timeout;
        let result = tokio::time::timeout(timeout, self.check_once(def, release_dir)).await;
        match result {
            Err(_) => Some(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
            Ok(outcome) => outcome,
        }
    }

    async fn check_once(&self, def: &ServiceDef, release_dir: &Path) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        match &def.check.kind {
            CheckKind::Tcp => match tokio::net::TcpStream::connect(self.check_addr).await {
                Ok(_) => None,
                Err(e) => Some(format!("tcp connect to {}: {e}", self.check_addr)),
            },
            CheckKind::Http {
                path,
                expect_status,
            } => {
                let mut stream = match tokio::net::TcpStream::connect(self.check_addr).await {
                    Ok(stream) => stream,
                    Err(e) => return Some(format!("GET {path}: connect {}: {e}", self.check_addr)),
                };
                let request = format!(
                    "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: cluster-check\r\n\r\n",
                    self.check_addr
                );
                if let Err(e) = stream.write_all(request.as_bytes()).await {
                    return Some(format!("GET {path}: {e}"));
                }
                let mut head = Vec::new();
                let mut buffer = [0u8; 512];
                // The status line is all a check needs.
                while !head.contains(&b'\n') && head.len() < 4096 {
                    match stream.read(&mut buffer).await {
                        Ok(0) => break,
                        Ok(n) => head.extend_from_slice(&buffer[..n]),
                        Err(e) => return Some(format!("GET {path}: {e}")),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let status: Option<u16> =
                    line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                match status {
                    Some(code) if code == *expect_status => None,
                    Some(code) => Some(format!("GET {path} answered {code}, not {expect_status}")),
                    None => Some(format!("GET {path}: not an HTTP answer")),
                }
            }
            CheckKind::Grpc { service } => {
                crate::rpc::grpc_health(self.check_addr, service, def.check.timeout)
                    .await
                    .err()
            }
            CheckKind::Command(argv) => {
                let program = if argv[0].starts_with('/') {
                    PathBuf::from(&argv[0])
                } else {
                    release_dir.join(&argv[0])
                };
                let out = tokio::process::Command::new(&program)
                    .args(&argv[1..])
                    .current_dir(release_dir)
                    .env("CHECK_ADDR", self.check_addr.to_string())
                    .env_remove("LISTEN_FDS")
                    .env_remove("LISTEN_FDNAMES")
                    .env_remove("NOTIFY_SOCKET")
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await;
                match out {
                    Err(e) => Some(format!("{}: {e}", program.display())),
                    Ok(out) if out.status.success() => None,
                    Ok(out) => {
                        let text = String::from_utf8_lossy(&out.stderr);
                        let last = text.lines().last().unwrap_or("").trim();
                        Some(format!(
                            "{} {}{}",
                            argv[0],
                            out.status,
                            if last.is_empty() {
                                String::new()
                            } else {
                                format!(": {last}")
                            }
                        ))
                    }
                }
            }
        }
    }
}

/// How an instance ended when asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    AlreadyGone,
    /// It exited within its drain and kill timeouts.
    Drained,
    /// It was killed.
    Killed,
}

/// Reaps `pid` if it is this process's child (after a re-exec the node's instances
/// still are); otherwise nothing happens.
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on one pid; ECHILD when it is not ours.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Reads the record of service `name`, if any.
pub fn read_record(data_dir: &Path, name: &str) -> Option<Instance> {
    let text = std::fs::read_to_string(run_dir(data_dir).join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records `instance` as the active one of service `name` (atomically, durably).
pub fn write_record(
    data_dir: &Path,
    name: &str,
    instance: &Instance,
) -> Result<(), crate::fs::IoError> {
    let dir = run_dir(data_dir);
    let _ = std::fs::create_dir_all(&dir);
    let json = serde_json::to_vec_pretty(instance).unwrap_or_default();
    crate::fs::write_atomically(&dir, &format!("{name}.json"), &json)
}

/// The last candidate of service `name` that was not switched to: why, and when (unix
/// ms). Kept in `<data>/service-run/<name>.rollback.json` across node restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub reason: String,
    pub at_ms: u64,
}

pub fn read_rollback(data_dir: &Path, name: &str) -> Option<Rollback> {
    let text =
        std::fs::read_to_string(run_dir(data_dir).join(format!("{name}.rollback.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write_rollback(data_dir: &Path, name: &str, rollback: &Rollback) {
    let dir = run_dir(data_dir);
    let json = serde_json::to_vec_pretty(rollback).unwrap_or_default();
    if let Err(e) = crate::fs::write_atomically(&dir, &format!("{name}.rollback.json"), &json) {
        tracing::warn!(service = name, error = %e, "cannot record the rollback");
    }
}

/// Forgets service `name`'s record.
pub fn remove_record(data_dir: &Path, name: &str) {
    let _ = crate::fs::remove_file_durably(&run_dir(data_dir).join(format!("{name}.json")));
}

/// The names of every service with a record (running, or running before a restart).
pub fn recorded(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(run_dir(data_dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(String::from)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_or_boot_is_not() {
        let pid = std::process::id() as i32;
        let ticks = start_ticks(pid).expect("our own stat");
        let me = Instance {
            pid,
            start_ticks: ticks,
            release: "r".into(),
            check_addr: "127.0.0.1:1".parse().unwrap(),
            since_ms: 0,
            boot_id: boot_id(),
        };
        assert!(me.alive());
        let another_boot = Instance {
            boot_id: "0".into(),
            ..me.clone()
        };
        assert!(
            !another_boot.alive(),
            "a record from another boot names nothing"
        );
        let reused = Instance {
            start_ticks: ticks + 1,
            ..me
        };
        assert!(!reused.alive(), "a reused pid is another process");
    }
}
