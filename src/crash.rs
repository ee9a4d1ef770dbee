//! Crash points: with the `crash-points` feature, a node aborts (as `kill -9` would: no
//! unwinding, no flush) at the named durable step when `CLUSTER_CRASH_AT` names it, once:
//! it first creates the file `CLUSTER_CRASH_MARKER` names, and a process that finds that
//! file does not crash, so the node its supervisor starts again goes on. Without the
//! feature, `point` is nothing. Tests in `tests/crash/` crash at each point and check
//! that the node and the rollout recover.
//!
//! The same feature has one fault that is not a crash: `corrupt_served` damages the
//! chunks a node serves to its peers while the file `CLUSTER_CORRUPT_SERVED` names
//! exists (the chaos suite's "chunk corrupted in flight"; the receiver must notice). A
//! number in that file is how many more chunks to damage; an empty file, all of them.

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

/// Flips one byte of a chunk this node is about to serve, while the file that
/// `CLUSTER_CORRUPT_SERVED` names exists (see the module). Says whether it did.
#[cfg(feature = "crash-points")]
pub fn corrupt_served(data: &mut [u8]) -> bool {
    let Some(switch) = std::env::var_os("CLUSTER_CORRUPT_SERVED") else {
        return false;
    };
    let Ok(left) = std::fs::read_to_string(&switch) else {
        return false;
    };
    if let Ok(left) = left.trim().parse::<u64>() {
        if left == 0 {
            return false;
        }
        let _ = std::fs::write(&switch, (left - 1).to_string());
    }
    let Some(middle) = data.get_mut(data.len() / 2) else {
        return false;
    };
    *middle ^= 0x01;
    tracing::error!("fault point: serving a chunk with one byte flipped");
    true
}

/// Without the `crash-points` feature: nothing.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn corrupt_served(_data: &mut [u8]) -> bool {
    false
}
