//! The boot guard: a release that cannot even start is undone with no leader reachable.
//!
//! Activation arms `<data>/boot.json` {generation, from, to, tries_left}. Before every
//! start the supervisor (`cluster supervise`, or systemd's `ExecStartPre=cluster guard`)
//! calls [`before_start`]: while `current` is the pending release each start spends a try;
//! with none left (or with the pending release gone from disk) it points `current` back at
//! `from` by itself and records why in `<data>/boot-restored.json`, which the node reports
//! to the cluster until it is next upgraded. Commit and restore disarm it. A data dir with
//! no `boot.json` is never touched, and the guard never deletes a release.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fs::write_atomically;
use crate::release::{ReleaseStore, StoreError};
use crate::state::GuardRestore;

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

/// Why the guard could not do its work. Every message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot read {}: {source}: check that this user may read the data dir", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove {}: {source}: check that this user may write the data dir", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is corrupt ({source}): the node starts on whatever `current` points at; \
         remove the file once `cluster dist releases` shows the right release",
        path.display()
    )]
    CorruptPending {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is corrupt ({source}): remove it", path.display())]
    CorruptRestored {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the boot guard's {file}: {source}")]
    Encode {
        file: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Reading or changing the releases (links, records) failed.
    #[error(transparent)]
    Releases(#[from] StoreError),
    /// A guard record could not be written (the path and the OS error are in it).
    #[error(transparent)]
    Write(#[from] crate::fs::IoError),
    #[error(
        "release {to} cannot start and the release to restore ({from}): install a good \
         release with `cluster dist install <dist> --data-dir {}`",
        data_dir.display()
    )]
    NothingToRestore {
        to: String,
        /// Why there is no release to go back to.
        from: String,
        data_dir: PathBuf,
    },
    #[error(
        "{} points at {}, which holds no bin/cluster and no upgrade is pending: \
         install a release with `cluster dist install <dist> --data-dir {}` \
         (`cluster dist releases` lists what the node holds)",
        link.display(),
        target.display(),
        data_dir.display()
    )]
    CurrentMissing {
        link: PathBuf,
        target: PathBuf,
        data_dir: PathBuf,
    },
}

/// What the guard did before a start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardOutcome {
    /// No upgrade pending: nothing touched.
    Idle,
    /// One try spent on the pending release; `tries_left` remain after this start.
    Tried { to: String, tries_left: u32 },
    /// `current` points at `from` again, for `reason`.
    Restored {
        from: String,
        to: String,
        reason: String,
    },
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
        GuardOutcome::Restored { reason, .. } => reason.clone(),
        GuardOutcome::Cleared => {
            "the pending release is no longer current: dropped the stale record".into()
        }
    }
}

/// Records a pending upgrade (called when a release is activated). A new upgrade makes the
/// last automatic restore history: its record goes. A retry of the upgrade the guard undid
/// (same generation and release, e.g. by a leader resuming the rollout) keeps it.
pub fn arm(data_dir: &Path, pending: &PendingBoot) -> Result<(), GuardError> {
    let bytes = serde_json::to_vec_pretty(pending).map_err(|source| GuardError::Encode {
        file: PENDING,
        source,
    })?;
    write_atomically(data_dir, PENDING, &bytes)?;
    let retry = matches!(
        last_restore(data_dir),
        Ok(Some(r)) if r.generation == pending.generation && r.to == pending.to
    );
    if retry {
        return Ok(());
    }
    remove_if_present(&data_dir.join(RESTORED))
}

/// Clears the pending upgrade (called on commit and on restore).
pub fn disarm(data_dir: &Path) -> Result<(), GuardError> {
    remove_if_present(&data_dir.join(PENDING))
}

fn remove_if_present(path: &Path) -> Result<(), GuardError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(GuardError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The last automatic restore, kept until the node is next upgraded (so a node reports it
/// on every start until then, and a crash before the report commits loses nothing).
/// `Err` names an unreadable record; the node starts anyway.
pub fn last_restore(data_dir: &Path) -> Result<Option<GuardRestore>, GuardError> {
    let path = data_dir.join(RESTORED);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(GuardError::Read { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| GuardError::CorruptRestored { path, source })
}

/// Runs before every start of the node. Never deletes a release; an `Err` changes nothing.
pub fn before_start(data_dir: &Path) -> Result<GuardOutcome, GuardError> {
    let path = data_dir.join(PENDING);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check_current(data_dir)?;
            return Ok(GuardOutcome::Idle);
        }
        Err(source) => return Err(GuardError::Read { path, source }),
    };
    let mut pending: PendingBoot = serde_json::from_str(&text)
        .map_err(|source| GuardError::CorruptPending { path, source })?;
    let store = ReleaseStore::open(data_dir)?;
    let current = store.current()?;
    if current.as_deref() != Some(pending.to.as_str()) {
        disarm(data_dir)?;
        return Ok(GuardOutcome::Cleared);
    }
    let reason = if !store.has(&pending.to) {
        // Tries cannot help a release that is not there.
        format!(
            "release {} is missing from {} (rollout generation {}): the boot guard restored \
             release {}",
            pending.to,
            data_dir.join("releases").display(),
            pending.generation,
            pending.from
        )
    } else if pending.tries_left > 0 {
        pending.tries_left -= 1;
        arm(data_dir, &pending)?;
        return Ok(GuardOutcome::Tried {
            to: pending.to,
            tries_left: pending.tries_left,
        });
    } else {
        format!(
            "release {} did not stay up for {DEFAULT_TRIES} starts (rollout generation {}): \
             the boot guard restored release {}",
            crate::state::deployment::short_hash(&pending.to),
            pending.generation,
            crate::state::deployment::short_hash(&pending.from)
        )
    };
    if !store.has(&pending.from) {
        let from = if pending.from.is_empty() {
            "none was recorded".to_string()
        } else {
            format!("{} is not on this node", pending.from)
        };
        return Err(GuardError::NothingToRestore {
            to: pending.to,
            from,
            data_dir: data_dir.to_path_buf(),
        });
    }
    let record = GuardRestore {
        from: pending.from.clone(),
        to: pending.to.clone(),
        generation: pending.generation,
        reason: reason.clone(),
        at_ms: crate::clock::unix_ms(),
    };
    let bytes = serde_json::to_vec_pretty(&record).map_err(|source| GuardError::Encode {
        file: RESTORED,
        source,
    })?;
    // The record first: a crash between the two leaves a restore that is recorded and
    // still pending, which the next start completes.
    write_atomically(data_dir, RESTORED, &bytes)?;
    store.activate(&pending.from)?;
    disarm(data_dir)?;
    Ok(GuardOutcome::Restored {
        from: pending.from,
        to: pending.to,
        reason,
    })
}

/// With no upgrade pending the guard changes nothing, but a `current` that points at a
/// release missing from disk is named here rather than as a failed exec.
fn check_current(data_dir: &Path) -> Result<(), GuardError> {
    let link = data_dir.join("current");
    let Ok(target) = std::fs::read_link(&link) else {
        return Ok(());
    };
    if data_dir.join(&target).join("bin/cluster").exists() {
        return Ok(());
    }
    Err(GuardError::CurrentMissing {
        link,
        target,
        data_dir: data_dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::agent::testing::{install, tree};

    fn current(data: &Path) -> Option<String> {
        ReleaseStore::open(data).unwrap().current().unwrap()
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
        let GuardOutcome::Restored { from, to, reason } = before_start(&data).unwrap() else {
            panic!("the last start restores")
        };
        assert_eq!((from.as_str(), to.as_str()), (old.as_str(), new.as_str()));
        assert!(reason.contains("did not stay up for 3 starts"), "{reason}");
        assert_eq!(current(&data).as_deref(), Some(old.as_str()));
        let record = last_restore(&data)
            .unwrap()
            .expect("the restore is recorded");
        assert_eq!(
            (record.from, record.to, record.generation),
            (old.clone(), new.clone(), 4)
        );
        assert!(
            record.reason.contains(&new[..12]) && record.at_ms > 0,
            "{}",
            record.reason
        );
        // Kept for the node to report on every start, until the next upgrade.
        assert!(last_restore(&data).unwrap().is_some());
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
        // Typed, with the JSON error kept as its cause.
        assert!(matches!(err, GuardError::CorruptPending { .. }), "{err:?}");
        let cause = std::error::Error::source(&err).expect("the parse error is the source");
        assert!(cause.is::<serde_json::Error>(), "{cause:?}");
        let err = err.to_string();
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
        let err = before_start(&data).unwrap_err().to_string();
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

    #[test]
    fn a_corrupt_or_foreign_record_of_any_shape_changes_nothing() {
        for bad in ["", "null", "[]", r#"{"generation":1}"#, r#"{"from":7}"#] {
            let (dir, _, new) = armed(0);
            let data = dir.path().join("data");
            std::fs::write(data.join(PENDING), bad).unwrap();
            let before = tree(&data);
            let err = before_start(&data).unwrap_err().to_string();
            assert!(err.contains("corrupt"), "{bad:?}: {err}");
            assert_eq!(tree(&data), before, "{bad:?}");
            assert_eq!(current(&data).as_deref(), Some(new.as_str()));
        }
    }

    #[test]
    fn a_missing_previous_link_does_not_stop_the_restore() {
        // The record names the release to go back to; the `previous` link is not needed.
        let (dir, old, _) = armed(0);
        let data = dir.path().join("data");
        std::fs::remove_file(data.join("previous")).unwrap();
        assert!(matches!(
            before_start(&data).unwrap(),
            GuardOutcome::Restored { .. }
        ));
        assert_eq!(current(&data).as_deref(), Some(old.as_str()));
    }

    #[test]
    fn a_pending_release_deleted_from_disk_is_restored_at_once() {
        let (dir, old, new) = armed(3);
        let data = dir.path().join("data");
        std::fs::remove_dir_all(data.join("releases").join(&new)).unwrap();
        let GuardOutcome::Restored { reason, .. } = before_start(&data).unwrap() else {
            panic!("no try is spent on a release that is not there")
        };
        assert!(reason.contains("is missing"), "{reason}");
        assert_eq!(current(&data).as_deref(), Some(old.as_str()));
        assert!(ReleaseStore::open(&data).unwrap().has(&old));
    }

    #[test]
    fn a_current_link_to_a_deleted_release_with_nothing_pending_is_an_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let old = install(&data, dir.path(), "old");
        let gone = install(&data, dir.path(), "gone");
        let store = ReleaseStore::open(&data).unwrap();
        store.activate(&old).unwrap();
        store.pin_previous().unwrap();
        store.activate(&gone).unwrap();
        drop(store);
        std::fs::remove_dir_all(data.join("releases").join(&gone)).unwrap();
        let before = tree(&data);
        let err = before_start(&data).unwrap_err().to_string();
        assert!(
            err.contains("holds no bin/cluster") && err.contains("cluster dist install"),
            "{err}"
        );
        assert_eq!(tree(&data), before);
        assert!(ReleaseStore::open(&data).unwrap().has(&old));
    }

    #[test]
    fn a_new_upgrade_retires_the_last_restore_record_and_a_retry_keeps_it() {
        let (dir, old, new) = armed(0);
        let data = dir.path().join("data");
        before_start(&data).unwrap();
        assert!(last_restore(&data).unwrap().is_some());
        let mut pending = PendingBoot {
            generation: 4,
            from: old,
            to: new,
            tries_left: 3,
        };
        // The same rollout trying the same release again (a new leader resuming it).
        arm(&data, &pending).unwrap();
        assert!(last_restore(&data).unwrap().is_some());
        pending.generation = 5;
        arm(&data, &pending).unwrap();
        assert_eq!(last_restore(&data).unwrap(), None);
    }

    #[test]
    fn a_corrupt_restore_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RESTORED), b"restored").unwrap();
        let err = last_restore(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
