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

/// One line for logs and `cluster guard`.
pub fn describe(outcome: &GuardOutcome) -> String {
    match outcome {
        GuardOutcome::Idle => "no upgrade pending: nothing to do".into(),
        GuardOutcome::Tried { to, tries_left } => {
            format!("starting pending release {to} ({tries_left} tries left after this start)")
        }
        GuardOutcome::Restored { from, to } => {
            format!("release {to} used up its tries: current points at {from} again")
        }
        GuardOutcome::Cleared => {
            "the pending release is no longer current: dropped the stale record".into()
        }
    }
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;
    use crate::dist::Limits;

    /// Installs a one-file release whose binary prints `tag`; returns its hash.
    fn install(data: &Path, work: &Path, tag: &str) -> String {
        let dist = work.join(tag);
        std::fs::create_dir_all(dist.join("bin")).unwrap();
        let binary = dist.join("bin/cluster");
        std::fs::write(&binary, format!("#!/bin/sh\necho {tag}\n")).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let store = ReleaseStore::open(data).unwrap();
        store.install_dir(&dist, &Limits::default()).unwrap()
    }

    fn current(data: &Path) -> Option<String> {
        ReleaseStore::open(data).unwrap().current().unwrap()
    }

    /// Every path and link target under `data`, to show that nothing changed.
    fn tree(data: &Path) -> Vec<String> {
        let mut paths: Vec<String> = walkdir::WalkDir::new(data)
            .into_iter()
            .filter_map(|e| e.ok())
            .map(|e| {
                let link = std::fs::read_link(e.path())
                    .map(|t| format!(" -> {}", t.display()))
                    .unwrap_or_default();
                format!("{}{link}", e.path().display())
            })
            .collect();
        paths.sort();
        paths
    }

    /// A data dir on release `old`, with `new` activated and the guard armed.
    fn armed(tries: u32) -> (tempfile::TempDir, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let old = install(&data, dir.path(), "old");
        let new = install(&data, dir.path(), "new");
        let store = ReleaseStore::open(&data).unwrap();
        store.activate(&old).unwrap();
        store.pin_previous().unwrap();
        store.activate(&new).unwrap();
        drop(store);
        let pending = PendingBoot {
            generation: 4,
            from: old.clone(),
            to: new.clone(),
            tries_left: tries,
        };
        arm(&data, &pending).unwrap();
        (dir, old, new)
    }

    #[test]
    fn a_data_dir_without_a_pending_upgrade_is_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let hash = install(&data, dir.path(), "only");
        ReleaseStore::open(&data).unwrap().activate(&hash).unwrap();
        let before = tree(&data);
        assert_eq!(before_start(&data).unwrap(), GuardOutcome::Idle);
        assert_eq!(tree(&data), before);
    }

    #[test]
    fn each_start_spends_a_try_and_the_last_one_restores_the_previous_release() {
        let (dir, old, new) = armed(2);
        let data = dir.path().join("data");
        for left in [1, 0] {
            assert_eq!(
                before_start(&data).unwrap(),
                GuardOutcome::Tried {
                    to: new.clone(),
                    tries_left: left
                }
            );
            assert_eq!(current(&data).as_deref(), Some(new.as_str()));
        }
        assert_eq!(
            before_start(&data).unwrap(),
            GuardOutcome::Restored {
                from: old.clone(),
                to: new.clone()
            }
        );
        assert_eq!(current(&data).as_deref(), Some(old.as_str()));
        let why = take_restored(&data).expect("the restore is recorded");
        assert!(why.contains(&new) && why.contains("generation 4"), "{why}");
        // Both releases are still there: the guard never deletes one.
        let held = ReleaseStore::open(&data).unwrap().releases().unwrap();
        assert!(held.contains(&old) && held.contains(&new));
        assert_eq!(before_start(&data).unwrap(), GuardOutcome::Idle);
    }

    #[test]
    fn a_corrupt_record_is_an_error_that_changes_nothing() {
        let (dir, _, _) = armed(3);
        let data = dir.path().join("data");
        std::fs::write(data.join(PENDING), b"{not json").unwrap();
        let before = tree(&data);
        let err = before_start(&data).unwrap_err();
        assert!(
            err.contains("corrupt") && err.contains("boot.json"),
            "{err}"
        );
        assert_eq!(tree(&data), before);
    }

    #[test]
    fn a_missing_release_to_restore_is_an_error_that_changes_nothing() {
        let (dir, _, new) = armed(0);
        let data = dir.path().join("data");
        let mut pending: PendingBoot =
            serde_json::from_slice(&std::fs::read(data.join(PENDING)).unwrap()).unwrap();
        pending.from = "f".repeat(64);
        arm(&data, &pending).unwrap();
        let before = tree(&data);
        let err = before_start(&data).unwrap_err();
        assert!(err.contains("is not on this node"), "{err}");
        assert_eq!(tree(&data), before);
        assert_eq!(current(&data).as_deref(), Some(new.as_str()));
    }

    #[test]
    fn a_record_for_a_release_no_longer_current_is_dropped() {
        let (dir, old, _) = armed(3);
        let data = dir.path().join("data");
        ReleaseStore::open(&data).unwrap().activate(&old).unwrap();
        assert_eq!(before_start(&data).unwrap(), GuardOutcome::Cleared);
        assert!(!data.join(PENDING).exists());
        assert_eq!(current(&data).as_deref(), Some(old.as_str()));
    }
}
