//! The release store of a node: verified releases on disk, and the links that say which runs.
//!
//! ```text
//! <data>/releases/<build-hash>/        complete, verified releases (the dist + its version.json)
//! <data>/manifests/<build-hash>.json   full manifest (chunk lists, signature) of each held release
//! <data>/current  -> releases/<hash>   what runs
//! <data>/previous -> releases/<hash>   the backup, pinned until commit
//! <data>/staging/                      partial work; discarded by `ReleaseStore::open`
//! <data>/releases.lock                 held (flock) by the one process using the store
//! ```
//!
//! Manifests live outside the release directories so that a release's content still hashes
//! to its build hash. A release is built in `staging/`, verified by scanning it, and only
//! then renamed into `releases/`, so a directory there is always complete.
//!
//! Invariants (each operation keeps them at every instant, so a crash anywhere keeps them):
//! - **Releases are immutable.** Nothing writes into `releases/*` once a release is renamed
//!   in: unchanged files are hard-linked between releases, so writing into one release would
//!   change others. Releases are only ever added whole (rename in) or removed whole (rename
//!   out to `staging/`, then delete).
//! - A `releases/<hash>` directory never exists without `manifests/<hash>.json`: the
//!   manifest is written before the rename in, and removed after the rename out.
//! - `current` and `previous` point only at complete releases and change by atomic rename
//!   of a fresh symlink over the old one; a kill leaves either the old or the new target.
//! - Every path written comes from a manifest that passed [`Manifest::validate`], and is
//!   created fresh (`O_EXCL`, `O_NOFOLLOW`) inside a new staging directory, so writing never
//!   follows a symlink.
//!
//! This module is the store itself: opening (and repairing after a crash), the held
//! releases and their manifests, the links, and deleting old releases. Putting a release
//! in is `staging`'s; finding and serving content already held is `local`'s.
//!
//! Deliberately absent: any network code. [`Staging`](super::Staging) says which chunks are
//! missing and takes them as bytes; moving them between nodes is the caller's business.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::delta::ManifestAnswer;
use super::manifest::{build_hash_of, is_sha256_hex, Limits, Manifest};
use super::signature::Signature;
use super::DistError;
use crate::fs::{
    io_error, random_name, remove_file_durably, remove_tree, replace_symlink, sync_dir,
    write_atomically, IoError,
};

/// How many releases besides `current` a [`ReleaseStore::commit`] keeps by default: enough
/// to restore by hand after a commit, few enough that disks do not fill up.
pub const DEFAULT_KEEP_OLD: usize = 2;

/// How many of the releases an asker names [`ReleaseStore::manifest_for`] looks at: a node
/// keeps a few (current, previous, [`DEFAULT_KEEP_OLD`] more), and a longer list is
/// someone else's problem, not a reason to stat the disk for each.
const MAX_BASES_CONSIDERED: usize = 8;

pub(super) const RELEASES: &str = "releases";
pub(super) const MANIFESTS: &str = "manifests";
pub(super) const STAGING: &str = "staging";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const LOCK_FILE: &str = "releases.lock";

/// The releases of one node's data directory. Cheap to clone: clones share one lock and one
/// manifest cache. All I/O is blocking `std::fs`; call it from a blocking thread in async code.
#[derive(Debug, Clone)]
pub struct ReleaseStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The node's data directory, as given to `open`.
    data_dir: PathBuf,
    /// Open with an exclusive `flock` for as long as any clone lives: `open` discards
    /// `staging/`, which must not happen under another process's feet.
    _lock: File,
    /// Serializes the changes other callers can observe (publishing and deleting releases,
    /// swapping links), so that "check, then change" steps are not interleaved in-process.
    changes: Mutex<()>,
    /// Parsed manifests by build hash. Valid for as long as the release is held because
    /// releases are immutable (a manifest's signature changes only through
    /// `record_signature`, which updates the entry); entries are dropped when a release is
    /// deleted.
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
}

impl ReleaseStore {
    /// Opens (creating if needed) the release store in `data_dir`, and repairs what a crash
    /// may have left: everything in `staging/`, temporary links and manifests, manifests
    /// without a release, and release directories without a manifest are removed.
    ///
    /// Fails with [`StoreError::Locked`] while another `ReleaseStore` has it open.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(data_dir).map_err(io_error("create", data_dir))?;
        let lock_path = data_dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o644)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        // SAFETY: flock takes a file descriptor we own and have open for the whole call.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = io::Error::last_os_error();
            return Err(if error.kind() == io::ErrorKind::WouldBlock {
                StoreError::Locked {
                    data_dir: data_dir.to_path_buf(),
                }
            } else {
                StoreError::Io(IoError::new("lock", lock_path, error))
            });
        }
        for name in [RELEASES, MANIFESTS, STAGING] {
            let dir = data_dir.join(name);
            match DirBuilder::new().mode(0o755).create(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(StoreError::Io(IoError::new("create", dir, source))),
            }
        }
        sync_dir(data_dir)?;
        let store = ReleaseStore {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                _lock: lock,
                changes: Mutex::new(()),
                manifests: Mutex::new(HashMap::new()),
            }),
        };
        store.recover()?;
        Ok(store)
    }

    /// The data directory this store lives in.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Build hashes of the complete releases held (a `releases/<hash>` directory with its
    /// manifest), sorted.
    pub fn releases(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.path(RELEASES);
        let mut hashes = Vec::new();
        for item in fs::read_dir(&dir).map_err(io_error("list", &dir))? {
            let entry = item.map_err(io_error("list", &dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if self.has(&name) {
                hashes.push(name);
            }
        }
        hashes.sort();
        Ok(hashes)
    }

    /// The build hash `current` points at, or `None` before the first activation.
    pub fn current(&self) -> Result<Option<String>, StoreError> {
        self.link_target(CURRENT)
    }

    /// The build hash `previous` points at, or `None` when no backup is pinned.
    pub fn previous(&self) -> Result<Option<String>, StoreError> {
        self.link_target(PREVIOUS)
    }

    /// The full manifest (with chunk lists) of a held release.
    pub fn manifest(&self, hash: &str) -> Result<Manifest, StoreError> {
        Ok(self.manifest_shared(hash)?.as_ref().clone())
    }

    /// Release `hash`'s manifest for a node that holds the releases `held` (likeliest base
    /// first): a delta against the first of them held here too, else the whole manifest.
    pub fn manifest_for(&self, hash: &str, held: &[String]) -> Result<ManifestAnswer, StoreError> {
        let target = self.manifest_shared(hash)?;
        for base in held.iter().take(MAX_BASES_CONSIDERED) {
            if base == hash || !self.has(base) {
                continue;
            }
            // A base that cannot be read now (removed meanwhile) is passed over.
            if let Ok(base_manifest) = self.manifest_shared(base) {
                return Ok(ManifestAnswer::Delta {
                    base: base.clone(),
                    delta: target.delta_from(&base_manifest),
                });
            }
        }
        Ok(ManifestAnswer::Whole(target.as_ref().clone()))
    }

    /// True when the release `hash` is held complete. False for anything that is not a
    /// build hash, so it never looks outside `releases/`.
    pub fn has(&self, hash: &str) -> bool {
        is_sha256_hex(hash)
            && fs::symlink_metadata(self.release_dir(hash)).is_ok_and(|meta| meta.is_dir())
            && fs::symlink_metadata(self.manifest_path(hash)).is_ok_and(|meta| meta.is_file())
    }

    /// Points `previous` at the release `current` points at, pinning it as the backup.
    /// A no-op when it already does; an error when there is no `current`.
    pub fn pin_previous(&self) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        let current = self.current()?.ok_or_else(|| StoreError::NoCurrent {
            path: self.path(CURRENT),
        })?;
        if self.previous()?.as_deref() == Some(current.as_str()) {
            return Ok(());
        }
        self.point(PREVIOUS, &current)
    }

    /// Points `current` at the held release `hash` (an atomic symlink swap).
    pub fn activate(&self, hash: &str) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        self.require_release(hash)?;
        if self.current()?.as_deref() == Some(hash) {
            return Ok(());
        }
        self.point(CURRENT, hash)
    }

    /// Points `current` back at the release `previous` pins (an atomic symlink swap).
    /// `previous` stays pinned until [`ReleaseStore::commit`].
    pub fn restore(&self) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        let previous = self.previous()?.ok_or_else(|| StoreError::NoPrevious {
            path: self.path(PREVIOUS),
        })?;
        self.require_release(&previous)?;
        if self.current()?.as_deref() == Some(previous.as_str()) {
            return Ok(());
        }
        self.point(CURRENT, &previous)
    }

    /// Checks the held release `hash` byte for byte against its manifest: every entry's
    /// kind, mode, size and content, as a scan sees them now. Releases are immutable, but
    /// a failing disk or a person can still change their bytes, and a release is checked
    /// before it is activated or reused. Reads the whole release.
    pub fn check(&self, hash: &str, limits: &Limits) -> Result<(), StoreError> {
        let manifest = self.manifest_shared(hash)?;
        let dir = self.release_dir(hash);
        let damaged = |path: &str, problem: String| StoreError::Damaged {
            hash: hash.to_owned(),
            path: dir.join(path),
            problem,
        };
        let found = super::scan::scan_summary(&dir, limits)
            .map_err(|e| damaged("", format!("cannot be scanned: {e}")))?;
        if build_hash_of(&found) == hash {
            return Ok(());
        }
        let (path, problem) = match super::version::first_difference(&manifest.summary(), &found) {
            Some(DistError::EntryMissing { path }) => (path, "is missing".to_string()),
            Some(DistError::EntryExtra { path }) => (path, "is not in its manifest".to_string()),
            Some(DistError::EntryChanged { path, change }) => {
                (path, format!("differs from its manifest ({change})"))
            }
            _ => (String::new(), "does not hash to its build hash".to_string()),
        };
        Err(damaged(&path, problem))
    }

    /// Removes the held release `hash` that [`ReleaseStore::check`] found damaged, so
    /// that it is fetched or installed again whole. Never the release `current` points
    /// at (what runs must stay bootable); a `previous` pinned to it is left dangling, and
    /// a restore then says there is nothing to restore rather than boot damaged bytes.
    pub fn quarantine(&self, hash: &str) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        self.require_release(hash)?;
        if self.current()?.as_deref() == Some(hash) {
            return Err(StoreError::DamagedCurrent {
                hash: hash.to_owned(),
            });
        }
        self.retire(hash)
    }

    /// Deletes old releases beyond the newest `keep_old`, never the ones `current` or
    /// `previous` point at (a rollout may still need `previous` to revert). Returns the
    /// deleted hashes.
    pub fn prune(&self, keep_old: usize) -> Result<Vec<String>, StoreError> {
        let _changing = self.lock_changes();
        self.prune_unlocked(keep_old)
    }

    fn prune_unlocked(&self, keep_old: usize) -> Result<Vec<String>, StoreError> {
        let current = self.current()?;
        let previous = self.previous()?;
        let mut others = Vec::new();
        for hash in self.releases()? {
            if current.as_deref() == Some(hash.as_str())
                || previous.as_deref() == Some(hash.as_str())
            {
                continue;
            }
            let dir = self.release_dir(&hash);
            let installed_at = fs::symlink_metadata(&dir)
                .and_then(|meta| meta.modified())
                .map_err(io_error("read metadata of", &dir))?;
            others.push((installed_at, hash));
        }
        // Newest first; the hash breaks ties so the choice does not depend on listing order.
        others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut deleted = Vec::new();
        for (_, hash) in others.into_iter().skip(keep_old) {
            self.retire(&hash)?;
            deleted.push(hash);
        }
        Ok(deleted)
    }

    // ---- internals ----

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    /// Where release `hash` is held (or would be).
    pub fn release_dir(&self, hash: &str) -> PathBuf {
        self.path(RELEASES).join(hash)
    }

    pub(super) fn manifest_path(&self, hash: &str) -> PathBuf {
        self.path(MANIFESTS).join(format!("{hash}.json"))
    }

    fn lock_changes(&self) -> MutexGuard<'_, ()> {
        // The guarded data is (): a panic elsewhere cannot have left it inconsistent.
        self.inner
            .changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<String, Arc<Manifest>>> {
        // A cache of immutable files: a panic elsewhere cannot have left it inconsistent.
        self.inner
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn require_release(&self, hash: &str) -> Result<(), StoreError> {
        if !is_sha256_hex(hash) {
            return Err(StoreError::NotABuildHash {
                hash: hash.to_owned(),
            });
        }
        if !self.has(hash) {
            return Err(StoreError::UnknownRelease {
                hash: hash.to_owned(),
                data_dir: self.data_dir().to_path_buf(),
            });
        }
        Ok(())
    }

    /// Whether releases `a` and `b` (both held) have the same entry at `path` (kind,
    /// mode, size and content hash), read from the cached manifests without copying them.
    pub fn same_entry(&self, a: &str, b: &str, path: &str) -> bool {
        let entry = |hash: &str| {
            let manifest = self.manifest_shared(hash).ok()?;
            manifest.get(path).map(|entry| entry.summary())
        };
        matches!((entry(a), entry(b)), (Some(x), Some(y)) if x == y)
    }

    pub(super) fn manifest_shared(&self, hash: &str) -> Result<Arc<Manifest>, StoreError> {
        self.require_release(hash)?;
        if let Some(manifest) = self.cache().get(hash) {
            return Ok(Arc::clone(manifest));
        }
        let path = self.manifest_path(hash);
        let text = fs::read(&path).map_err(io_error("read", &path))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|source| StoreError::BadManifestFile {
                path: path.clone(),
                hash: hash.to_owned(),
                source,
            })?;
        let manifest = Arc::new(manifest);
        self.cache().insert(hash.to_owned(), Arc::clone(&manifest));
        Ok(manifest)
    }

    /// Makes the verified tree at `tree` the release `hash`: manifest first, then the
    /// rename, so that a release directory never exists without its manifest.
    pub(super) fn publish(
        &self,
        hash: &str,
        manifest: &Manifest,
        tree: &Path,
    ) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        if self.has(hash) {
            return Ok(());
        }
        let release_dir = self.release_dir(hash);
        if fs::symlink_metadata(&release_dir).is_ok() {
            // Not a release (no manifest): only something outside this store puts one there.
            self.discard(&release_dir, RELEASES)?;
        }
        let text = serde_json::to_vec(manifest).expect("manifests always serialize");
        write_atomically(&self.path(MANIFESTS), &format!("{hash}.json"), &text)?;
        if let Err(source) = fs::rename(tree, &release_dir) {
            let _ = fs::remove_file(self.manifest_path(hash));
            return Err(StoreError::Io(IoError::new(
                "rename the staged release to",
                release_dir,
                source,
            )));
        }
        sync_dir(&self.path(RELEASES))?;
        crate::crash::point("release-published");
        self.cache()
            .insert(hash.to_owned(), Arc::new(manifest.clone()));
        Ok(())
    }

    /// Records `signature` as the signature of the held release `hash`, replacing the one
    /// its manifest had: a release that arrived unsigned (or signed by a retired key) and
    /// is installed again signed. Only `manifests/<hash>.json` changes (atomically): the
    /// release's content and version.json stay as they are, immutable.
    pub fn record_signature(&self, hash: &str, signature: &Signature) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        let held = self.manifest_shared(hash)?;
        if held.signature.as_deref() == Some(signature) {
            return Ok(());
        }
        let manifest = Manifest {
            signature: Some(Box::new(signature.clone())),
            ..held.as_ref().clone()
        };
        let text = serde_json::to_vec(&manifest).expect("manifests always serialize");
        write_atomically(&self.path(MANIFESTS), &format!("{hash}.json"), &text)?;
        self.cache().insert(hash.to_owned(), Arc::new(manifest));
        Ok(())
    }

    /// Deletes the release `hash`: rename it out of `releases/` (atomic), then remove its
    /// manifest and its files. A crash in between leaves only what `open` cleans up.
    fn retire(&self, hash: &str) -> Result<(), StoreError> {
        self.discard(&self.release_dir(hash), RELEASES)?;
        remove_file_durably(&self.manifest_path(hash))?;
        self.cache().remove(hash);
        Ok(())
    }

    /// Moves `path` (an entry of `<data>/<parent>`) into staging/ and deletes it there, so
    /// that it disappears from `parent` atomically however large it is.
    fn discard(&self, path: &Path, parent: &str) -> Result<(), StoreError> {
        let doomed = self.path(STAGING).join(random_name("discard"));
        fs::rename(path, &doomed).map_err(io_error("delete", path))?;
        sync_dir(&self.path(parent))?;
        Ok(remove_tree(&doomed).map_err(io_error("remove", &doomed))?)
    }

    /// Removes what a crash can leave behind; see [`ReleaseStore::open`].
    fn recover(&self) -> Result<(), StoreError> {
        let _changing = self.lock_changes();
        let staging = self.path(STAGING);
        for item in fs::read_dir(&staging).map_err(io_error("list", &staging))? {
            let path = item.map_err(io_error("list", &staging))?.path();
            remove_tree(&path).map_err(io_error("remove", &path))?;
        }

        let data_dir = self.data_dir().to_path_buf();
        let mut removed_link = false;
        for item in fs::read_dir(&data_dir).map_err(io_error("list", &data_dir))? {
            let entry = item.map_err(io_error("list", &data_dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_temporary_link = [CURRENT, PREVIOUS]
                .iter()
                .any(|link| name.starts_with(&format!("{link}.tmp-")));
            if is_temporary_link && entry.file_type().is_ok_and(|kind| kind.is_symlink()) {
                let path = entry.path();
                fs::remove_file(&path).map_err(io_error("remove", &path))?;
                removed_link = true;
            }
        }
        if removed_link {
            sync_dir(&data_dir)?;
        }

        // Release directories without a manifest are not releases; a link may still point
        // at one only if someone else made it, so such a directory is left alone.
        let linked = [
            self.current().ok().flatten(),
            self.previous().ok().flatten(),
        ];
        let releases = self.path(RELEASES);
        for item in fs::read_dir(&releases).map_err(io_error("list", &releases))? {
            let entry = item.map_err(io_error("list", &releases))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let has_manifest = is_sha256_hex(&name)
                && fs::symlink_metadata(self.manifest_path(&name)).is_ok_and(|m| m.is_file());
            if !has_manifest && !linked.iter().flatten().any(|hash| *hash == name) {
                self.discard(&entry.path(), RELEASES)?;
            }
        }

        // Temporary manifests from an interrupted write, and manifests whose release never
        // got renamed in.
        let manifests = self.path(MANIFESTS);
        let mut removed_manifest = false;
        for item in fs::read_dir(&manifests).map_err(io_error("list", &manifests))? {
            let entry = item.map_err(io_error("list", &manifests))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = name
                .strip_suffix(".json")
                .is_some_and(|hash| is_sha256_hex(hash) && self.has(hash));
            if !keep {
                let path = entry.path();
                remove_tree(&path).map_err(io_error("remove", &path))?;
                removed_manifest = true;
            }
        }
        if removed_manifest {
            sync_dir(&manifests)?;
        }
        Ok(())
    }

    /// The build hash the link `name` points at.
    fn link_target(&self, name: &str) -> Result<Option<String>, StoreError> {
        let path = self.path(name);
        let target = match fs::read_link(&path) {
            Ok(target) => target,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            // EINVAL: it exists but is not a symlink.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                return Err(StoreError::BadLink {
                    path,
                    found: "not a symlink".to_owned(),
                })
            }
            Err(source) => {
                return Err(StoreError::Io(IoError::new(
                    "read the symlink",
                    path,
                    source,
                )))
            }
        };
        let found = target.to_string_lossy().into_owned();
        match found.strip_prefix("releases/") {
            Some(hash) if is_sha256_hex(hash) => Ok(Some(hash.to_owned())),
            _ => Err(StoreError::BadLink { path, found }),
        }
    }

    /// Points the link `name` at `releases/<hash>`: a new symlink under a temporary name,
    /// renamed over the old one (atomic), then the directory synced so it survives a crash.
    fn point(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        let target = Path::new(RELEASES).join(hash);
        replace_symlink(self.data_dir(), name, &target)?;
        crate::crash::point("link-swapped");
        Ok(())
    }
}

/// What can go wrong in a node's release store: a release or chunk it does not hold, a
/// link or manifest damaged on disk, the store in use by another process, or the disk.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation on a path failed.
    #[error(transparent)]
    Io(#[from] crate::fs::IoError),

    /// Another process (or another `ReleaseStore` in this one) has the release store open.
    #[error("the release store in {} is in use by another process (a running node?): stop it, or use another data directory", data_dir.display())]
    Locked {
        /// The node's data directory.
        data_dir: PathBuf,
    },

    /// A build hash given to the store is not one: it would not name a directory under
    /// releases/, and could name one outside it.
    #[error("{hash:?} is not a build hash: a build hash is 64 lowercase hex characters, as printed by `cluster dist hash`")]
    NotABuildHash {
        /// The value given.
        hash: String,
    },

    /// A build hash that names no complete release in the store.
    #[error("release {hash} is not installed in {}: install it first (`cluster dist install <dist> --data-dir <data>`)", data_dir.display())]
    UnknownRelease {
        /// The build hash asked for.
        hash: String,
        /// The node's data directory.
        data_dir: PathBuf,
    },

    /// `<data>/current` is absent where one is needed.
    #[error("{} does not exist: no release is active; activate one first (`cluster dist install <dist> --data-dir <data>`)", path.display())]
    NoCurrent {
        /// The path of the `current` link.
        path: PathBuf,
    },

    /// `<data>/previous` is absent, so there is nothing to restore.
    #[error("{} does not exist: there is no backup to restore; pin one (pin_previous) before activating a new release", path.display())]
    NoPrevious {
        /// The path of the `previous` link.
        path: PathBuf,
    },

    /// `current` or `previous` is not a symlink to `releases/<build hash>`.
    #[error("{} is not a link to releases/<build hash> (found {found:?}): remove it and activate a release", path.display())]
    BadLink {
        /// The link's path.
        path: PathBuf,
        /// What is there: the link's target, or a description of the non-link.
        found: String,
    },

    /// A manifest file under `<data>/manifests/` cannot be parsed.
    #[error("manifest {} is not valid: the release store is damaged; remove releases/{hash} and manifests/{hash}.json, then install the release again", path.display())]
    BadManifestFile {
        /// The file.
        path: PathBuf,
        /// The release it describes.
        hash: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A held release whose bytes on disk no longer match its manifest.
    #[error("release {hash} is damaged on disk: {} {problem}; it is removed, and syncing or installing it again repairs it", path.display())]
    Damaged {
        /// The release.
        hash: String,
        /// The first entry found damaged (the release's directory when none is named).
        path: PathBuf,
        /// How it differs.
        problem: String,
    },

    /// A damaged release is the one `current` points at: it cannot be removed while it
    /// is what the node boots.
    #[error("release {hash} is damaged on disk and is the node's current release: activate another release (or install this one again under a new build), then remove it")]
    DamagedCurrent {
        /// The release.
        hash: String,
    },

    /// `read_chunk` for a chunk in no release held here.
    #[error("chunk {sha256} is in no release held in {}: ask a node that holds the release", data_dir.display())]
    ChunkNotHeld {
        /// The chunk asked for.
        sha256: String,
        /// The node's data directory.
        data_dir: PathBuf,
    },

    /// Local content that should hold a chunk does not hash to it.
    #[error("{} does not hold chunk {sha256} at byte {offset} as its manifest says: the release is damaged on disk; remove it and install it again", path.display())]
    ChunkCorrupt {
        /// The chunk.
        sha256: String,
        /// The file that should hold it.
        path: PathBuf,
        /// Where in the file.
        offset: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The release kept after an update, with nothing pinned any more: unpin `previous`,
    /// then prune.
    fn unpin_and_prune(store: &ReleaseStore, keep_old: usize) -> Result<Vec<String>, StoreError> {
        remove_file_durably(&store.path(PREVIOUS))?;
        store.prune(keep_old)
    }
    use crate::release::test_data::{limits, open, small_dist, staging_is_empty, tree, write_file};
    use crate::release::{verify, DistError, Limits, ManifestError, SyncError};
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn activate_pin_restore_commit() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let v1 = store
            .install_dir(small_dist("v1\n").path(), &limits())
            .unwrap();
        store.activate(&v1).unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some(v1.as_str()));
        assert_eq!(
            fs::read_link(data.path().join("current")).unwrap(),
            Path::new("releases").join(&v1),
            "links are relative, so the data dir can move"
        );
        verify(&data.path().join("current"), &limits()).unwrap();

        // An update: pin the backup, install and activate the new release.
        store.pin_previous().unwrap();
        store.pin_previous().unwrap();
        assert_eq!(store.previous().unwrap().as_deref(), Some(v1.as_str()));
        let v2 = store
            .install_dir(small_dist("v2\n").path(), &limits())
            .unwrap();
        store.activate(&v2).unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some(v2.as_str()));
        assert_eq!(
            fs::read(data.path().join("current/etc/config.toml")).unwrap(),
            b"v2\n"
        );

        // It failed: back to the backup, which stays pinned.
        store.restore().unwrap();
        assert_eq!(store.current().unwrap().as_deref(), Some(v1.as_str()));
        assert_eq!(store.previous().unwrap().as_deref(), Some(v1.as_str()));

        // Try again and keep it.
        store.activate(&v2).unwrap();
        assert_eq!(
            unpin_and_prune(&store, DEFAULT_KEEP_OLD).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(store.previous().unwrap(), None);
        assert_eq!(store.current().unwrap().as_deref(), Some(v2.as_str()));
        assert_eq!(store.releases().unwrap().len(), 2);
        let leftovers: Vec<String> = tree(data.path())
            .into_iter()
            .filter(|path| path.contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn commit_keeps_the_newest_and_never_current() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let hashes: Vec<String> = (0..5)
            .map(|version| {
                let hash = store
                    .install_dir(small_dist(&format!("v{version}\n")).path(), &limits())
                    .unwrap();
                // Install times an hour apart, oldest first, whatever the clock resolution.
                File::open(data.path().join("releases").join(&hash))
                    .unwrap()
                    .set_modified(UNIX_EPOCH + Duration::from_secs(3600 * (version + 1)))
                    .unwrap();
                hash
            })
            .collect();
        // The oldest runs; the next is pinned, but commit unpins it first.
        store.activate(&hashes[1]).unwrap();
        store.pin_previous().unwrap();
        store.activate(&hashes[0]).unwrap();

        let mut deleted = unpin_and_prune(&store, 2).unwrap();
        deleted.sort();
        let mut expected = vec![hashes[1].clone(), hashes[2].clone()];
        expected.sort();
        assert_eq!(deleted, expected);
        let mut kept = vec![hashes[0].clone(), hashes[3].clone(), hashes[4].clone()];
        kept.sort();
        assert_eq!(store.releases().unwrap(), kept);
        for hash in &deleted {
            assert!(!data.path().join("releases").join(hash).exists());
            assert!(!data
                .path()
                .join("manifests")
                .join(format!("{hash}.json"))
                .exists());
        }
        assert!(staging_is_empty(&store));

        let mut deleted = unpin_and_prune(&store, 0).unwrap();
        deleted.sort();
        let mut expected = vec![hashes[3].clone(), hashes[4].clone()];
        expected.sort();
        assert_eq!(deleted, expected);
        assert_eq!(store.releases().unwrap(), [hashes[0].clone()]);
        verify(&data.path().join("current"), &limits()).unwrap();
    }

    #[test]
    fn failed_operations_leave_the_data_dir_unchanged() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let fresh = tempfile::tempdir().unwrap();
        let fresh_store = open(&fresh);
        let fresh_before = tree(fresh.path());
        let error = fresh_store.pin_previous().unwrap_err();
        assert!(matches!(error, StoreError::NoCurrent { .. }), "{error}");
        assert_eq!(tree(fresh.path()), fresh_before);

        let v1 = store
            .install_dir(small_dist("v1\n").path(), &limits())
            .unwrap();
        store.activate(&v1).unwrap();
        let before = tree(data.path());
        let unchanged = |why: &str| assert_eq!(tree(data.path()), before, "{why}");

        let unknown = "0".repeat(64);
        let error = store.activate(&unknown).unwrap_err();
        assert!(
            matches!(error, StoreError::UnknownRelease { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("cluster dist install"),
            "{error}"
        );
        unchanged("activate of an unknown hash");

        let error = store.activate("../../etc").unwrap_err();
        assert!(matches!(error, StoreError::NotABuildHash { .. }), "{error}");
        unchanged("activate of a path");
        assert!(!store.has("../releases"));
        assert!(matches!(
            store.manifest(&unknown).unwrap_err(),
            StoreError::UnknownRelease { .. }
        ));

        let error = store.restore().unwrap_err();
        assert!(matches!(error, StoreError::NoPrevious { .. }), "{error}");
        assert!(error.to_string().contains("pin"), "{error}");
        unchanged("restore without previous");

        let mut invalid = store.manifest(&v1).unwrap();
        invalid.entries[0].path = "../escape".into();
        let error = store.begin(&invalid, &limits()).unwrap_err();
        assert!(
            matches!(error, SyncError::Invalid(ManifestError::BadPath { .. })),
            "{error}"
        );
        unchanged("begin with an invalid manifest");
        let error = store
            .begin(
                &store.manifest(&v1).unwrap(),
                &Limits {
                    max_entries: 2,
                    ..limits()
                },
            )
            .unwrap_err();
        assert!(
            matches!(
                error,
                SyncError::Invalid(ManifestError::TooManyEntries { .. })
            ),
            "{error}"
        );
        unchanged("begin over the limits");

        type Breaker = fn(&Path);
        type Expect = fn(&DistError) -> bool;
        let bad_dists: Vec<(&str, Breaker, Expect)> = vec![
            (
                "missing bin/cluster",
                |root| fs::remove_file(root.join("bin/cluster")).unwrap(),
                |e| matches!(e, DistError::Invalid(ManifestError::MissingBinary)),
            ),
            (
                "setuid file",
                |root| {
                    let path = root.join("share/data.bin");
                    fs::set_permissions(path, fs::Permissions::from_mode(0o4755)).unwrap();
                },
                |e| matches!(e, DistError::Invalid(ManifestError::BadMode { .. })),
            ),
            (
                "escaping symlink",
                |root| symlink("../../etc/passwd", root.join("share/out")).unwrap(),
                |e| matches!(e, DistError::Invalid(ManifestError::SymlinkEscapes { .. })),
            ),
            (
                "missing dir",
                |root| fs::remove_dir_all(root).unwrap(),
                |e| matches!(e, DistError::DirMissing { .. }),
            ),
        ];
        for (why, break_it, expected) in bad_dists {
            let dist = small_dist("bad\n");
            break_it(dist.path());
            let error = store.install_dir(dist.path(), &limits()).unwrap_err();
            let SyncError::Dist(dist_error) = &error else {
                panic!("{why}: not a dist error: {error}");
            };
            assert!(
                expected(dist_error.innermost()),
                "{why}: wrong error: {error}"
            );
            unchanged(why);
        }
    }

    #[test]
    fn crash_leftovers_are_discarded_at_open() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let v1 = store
            .install_dir(small_dist("v1\n").path(), &limits())
            .unwrap();
        store.activate(&v1).unwrap();
        let v2 = store
            .install_dir(small_dist("v2\n").path(), &limits())
            .unwrap();
        let clean = tree(data.path());
        drop(store);

        let root = data.path();
        // Killed while assembling: a partial file and a read-only directory in staging.
        let partial = root.join("staging/stage-0000000000000001/tree");
        write_file(&partial.join("bin/cluster"), b"#!/bin/sh\nex", 0o600);
        fs::create_dir(partial.join("locked")).unwrap();
        write_file(&partial.join("locked/file"), b"x", 0o644);
        fs::set_permissions(partial.join("locked"), fs::Permissions::from_mode(0o500)).unwrap();
        // Killed between creating a new link and renaming it over `current`.
        symlink(
            format!("releases/{v2}"),
            root.join("current.tmp-0000000000000002"),
        )
        .unwrap();
        // Killed while writing a manifest, and after writing one but before the rename in.
        let orphan = "a".repeat(64);
        fs::write(root.join(format!("manifests/.{orphan}.json.tmp-3")), "{").unwrap();
        fs::write(root.join(format!("manifests/{orphan}.json")), "{}").unwrap();
        // A directory under releases/ without a manifest is not a release.
        write_file(
            &root.join(format!("releases/{}/bin/cluster", "b".repeat(64))),
            b"",
            0o755,
        );

        let store = open(&data);
        assert_eq!(tree(root), clean);
        assert_eq!(store.current().unwrap().as_deref(), Some(v1.as_str()));
        verify(&root.join("current"), &limits()).unwrap();

        // Killed while committing: v2 renamed out of releases/, its manifest still there.
        drop(store);
        fs::rename(
            root.join("releases").join(&v2),
            root.join("staging/discard-0000000000000004"),
        )
        .unwrap();
        let store = open(&data);
        assert_eq!(store.releases().unwrap(), std::slice::from_ref(&v1));
        assert!(!root.join(format!("manifests/{v2}.json")).exists());
        assert!(staging_is_empty(&store));
        verify(&root.join("current"), &limits()).unwrap();

        // Killed after the swap but before the directory sync: either link is complete.
        drop(store);
        let v2 = {
            let store = open(&data);
            store
                .install_dir(small_dist("v2\n").path(), &limits())
                .unwrap()
        };
        symlink(format!("releases/{v2}"), root.join("current.tmp-5")).unwrap();
        fs::rename(root.join("current.tmp-5"), root.join("current")).unwrap();
        let store = open(&data);
        assert_eq!(store.current().unwrap().as_deref(), Some(v2.as_str()));
        verify(&root.join("current"), &limits()).unwrap();
    }

    #[test]
    fn one_store_per_data_dir_at_a_time() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let error = ReleaseStore::open(data.path()).unwrap_err();
        assert!(matches!(error, StoreError::Locked { .. }), "{error}");
        let clone = store.clone();
        drop(store);
        assert!(ReleaseStore::open(data.path()).is_err(), "a clone holds it");
        drop(clone);
        open(&data);
    }

    #[test]
    fn read_only_directories_install_and_delete() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let dist = small_dist("v1\n");
        fs::set_permissions(dist.path().join("share"), fs::Permissions::from_mode(0o555)).unwrap();
        let v1 = store.install_dir(dist.path(), &limits()).unwrap();
        fs::set_permissions(dist.path().join("share"), fs::Permissions::from_mode(0o755)).unwrap();
        let share = data.path().join("releases").join(&v1).join("share");
        assert_eq!(fs::symlink_metadata(&share).unwrap().mode() & 0o7777, 0o555);

        let v2 = store
            .install_dir(small_dist("v2\n").path(), &limits())
            .unwrap();
        store.activate(&v2).unwrap();
        assert_eq!(unpin_and_prune(&store, 0).unwrap(), [v1]);
        assert_eq!(store.releases().unwrap(), [v2]);
    }
}
