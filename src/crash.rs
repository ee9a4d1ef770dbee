//! Crash points: with the `crash-points` feature, a node aborts (as `kill -9` would: no
//! unwinding, no flush) at the named durable step when `CLUSTER_CRASH_AT` names it, once:
//! it first creates the file `CLUSTER_CRASH_MARKER` names, and a process that finds that
//! file does not crash, so the node its supervisor starts again goes on. Without the
//! feature, `point` is nothing. Tests in `tests/crash/` crash at each point and check
//! that the node and the rollout recover.

/// Every crash point, in the order a rollout passes them on a node.
pub const POINTS: &[&str] = &[
    // The leader, right after one of its rollout proposals committed.
    "leader-proposed",
    // The agent, after pinning `previous`.
    "agent-pinned",
    // The release store, after a staged release was renamed into `releases/`.
    "release-published",
    // The agent, after arming the boot guard and before activating.
    "guard-armed",
    // The release store, after swapping `current` or `previous`.
    "link-swapped",
    // The agent, after disarming the guard on commit and before pruning.
    "commit-disarmed",
];

/// Aborts the process here if the test environment asks for this point (see the module).
#[cfg(feature = "crash-points")]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown crash point {name}");
    if std::env::var("CLUSTER_CRASH_AT").ok().as_deref() != Some(name) {
        return;
    }
    let Some(marker) = std::env::var_os("CLUSTER_CRASH_MARKER") else {
        return;
    };
    // Exactly once: the marker is created (durably) before the crash.
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
        .and_then(|file| file.sync_all());
    if created.is_ok() {
        tracing::error!(point = name, "crash point: aborting");
        std::process::abort();
    }
}

/// Without the `crash-points` feature: nothing.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn point(_name: &str) {}
