//! The boot guard: a release that cannot even start is undone with no leader reachable.
//!
//! Activation arms `<data>/boot.json` {generation, from, to, tries_left}. Before every
//! start the supervisor (`cluster supervise`, or systemd's `ExecStartPre=cluster guard`)
//! calls [`before_start`]: while `current` is the pending release each start spends a try;
//! with none left it points `current` back at `from` by itself and records why in
//! `<data>/boot-restored.json`. Commit and restore disarm it. A data dir with no
//! `boot.json` is never touched.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dist::store::write_atomically;
use crate::dist::ReleaseStore;

const PENDING: &str = "boot.json";
const RESTORED: &str = "boot-restored.json";

/// Starts a new release gets before the guard gives up on it.
pub const DEFAULT_TRIES: u32 = 3;

/// An upgrade that has not been committed yet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PendingBoot {
    pub generation: u64,
    /// The release to go back to.
    pub from: String,
    /// The release being tried.
    pub to: String,
    pub tries_left: u32,
}

/// What the guard did before a start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// No upgrade pending: nothing touched.
    Idle,
    /// One try spent on the pending release; `tries_left` remain after this start.
    Tried { to: String, tries_left: u32 },
    /// Out of tries: `current` points at `from` again.
    Restored { from: String, to: String },
    /// `current` no longer points at the pending release (restored or moved on by
    /// someone else): the stale record was dropped.
    Cleared,
}

/// Records a pending upgrade (called when a release is activated).
pub fn arm(data_dir: &Path, pending: &PendingBoot) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(pending).map_err(|e| e.to_string())?;
    write_atomically(data_dir, PENDING, &bytes).map_err(|e| e.to_string())
}

/// Clears the pending upgrade (called on commit and on restore).
pub fn disarm(data_dir: &Path) -> Result<(), String> {
    match std::fs::remove_file(data_dir.join(PENDING)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "removing {}: {e}",
            data_dir.join(PENDING).display()
        )),
    }
}

/// The last automatic restore, if the guard made one since the node last reported it.
pub fn take_restored(data_dir: &Path) -> Option<String> {
    let path = data_dir.join(RESTORED);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    Some(text)
}

/// Runs before every start of the node. Never deletes a release.
pub fn before_start(data_dir: &Path) -> Result<GuardOutcome, String> {
    let path = data_dir.join(PENDING);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GuardOutcome::Idle),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut pending: PendingBoot = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is corrupt ({e}): the node starts on whatever `current` points at; \
             remove the file once `cluster dist releases` shows the right release",
            path.display()
        )
    })?;
    let store = ReleaseStore::open(data_dir).map_err(|e| e.to_string())?;
    let current = store.current().map_err(|e| e.to_string())?;
    if current.as_deref() != Some(pending.to.as_str()) {
        disarm(data_dir)?;
        return Ok(GuardOutcome::Cleared);
    }
    if pending.tries_left > 0 {
        pending.tries_left -= 1;
        arm(data_dir, &pending)?;
        return Ok(GuardOutcome::Tried {
            to: pending.to,
            tries_left: pending.tries_left,
        });
    }
    if !store.has(&pending.from) {
        return Err(format!(
            "release {} failed to start and the release to restore ({}) is not on this node: \
             install a good release with `cluster dist install`",
            pending.to, pending.from
        ));
    }
    store.activate(&pending.from).map_err(|e| e.to_string())?;
    let why = format!(
        "release {} did not stay up for {DEFAULT_TRIES} starts (rollout generation {}); \
         the boot guard restored release {}",
        pending.to, pending.generation, pending.from
    );
    write_atomically(data_dir, RESTORED, why.as_bytes()).map_err(|e| e.to_string())?;
    disarm(data_dir)?;
    Ok(GuardOutcome::Restored {
        from: pending.from,
        to: pending.to,
    })
}
