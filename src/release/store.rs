//! The release store of a node: verified releases on disk, and the links that say which runs.
//!
//! ```text
//! <data>/releases/<build-hash>/        complete, verified releases (the dist + its version.json)
//! <data>/manifests/<build-hash>.json   full manifest (with chunk lists) of each held release
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
//! Deliberately absent: any network code. [`Staging`] says which chunks are missing and
//! takes them as bytes; moving them between nodes is the caller's business.

use std::collections::{HashMap, HashSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{symlink, DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::fs::{
    create_new, io_error, open_dir, open_file, random_name, remove_file_durably, remove_tree,
    replace_symlink, sync_dir, write_atomically, IoError,
};

use super::manifest::{
    build_hash_of, chunk_offsets, is_sha256_hex, Chunk, EntryKind, Limits, Manifest, VERSION_FILE,
};
use super::scan::{scan, scan_summary};
use super::version::VersionInfo;
use super::DistError;

/// How many releases besides `current` a [`ReleaseStore::commit`] keeps by default: enough
/// to restore by hand after a commit, few enough that disks do not fill up.
pub const DEFAULT_KEEP_OLD: usize = 2;

const RELEASES: &str = "releases";
const MANIFESTS: &str = "manifests";
const STAGING: &str = "staging";
const CURRENT: &str = "current";
const PREVIOUS: &str = "previous";
const LOCK_FILE: &str = "releases.lock";

/// Copy buffer: large enough that syscalls stay rare on big binaries.
const COPY_BUFFER_BYTES: usize = 1024 * 1024;

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
    /// releases are immutable; entries are dropped when a release is deleted.
    manifests: Mutex<HashMap<String, Arc<Manifest>>>,
}

impl ReleaseStore {
    /// Opens (creating if needed) the release store in `data_dir`, and repairs what a crash
    /// may have left: everything in `staging/`, temporary links and manifests, manifests
    /// without a release, and release directories without a manifest are removed.
    ///
    /// Fails with [`DistError::StoreLocked`] while another `ReleaseStore` has it open.
    pub fn open(data_dir: &Path) -> Result<Self, DistError> {
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
                DistError::StoreLocked {
                    data_dir: data_dir.to_path_buf(),
                }
            } else {
                DistError::Io(IoError::new("lock", lock_path, error))
            });
        }
        for name in [RELEASES, MANIFESTS, STAGING] {
            let dir = data_dir.join(name);
            match DirBuilder::new().mode(0o755).create(&dir) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(DistError::Io(IoError::new("create", dir, source))),
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
    pub fn releases(&self) -> Result<Vec<String>, DistError> {
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
    pub fn current(&self) -> Result<Option<String>, DistError> {
        self.link_target(CURRENT)
    }

    /// The build hash `previous` points at, or `None` when no backup is pinned.
    pub fn previous(&self) -> Result<Option<String>, DistError> {
        self.link_target(PREVIOUS)
    }

    /// The full manifest (with chunk lists) of a held release.
    pub fn manifest(&self, hash: &str) -> Result<Manifest, DistError> {
        Ok(self.manifest_shared(hash)?.as_ref().clone())
    }

    /// True when the release `hash` is held complete. False for anything that is not a
    /// build hash, so it never looks outside `releases/`.
    pub fn has(&self, hash: &str) -> bool {
        is_sha256_hex(hash)
            && fs::symlink_metadata(self.release_dir(hash)).is_ok_and(|meta| meta.is_dir())
            && fs::symlink_metadata(self.manifest_path(hash)).is_ok_and(|meta| meta.is_file())
    }

    /// Chunks of `manifest` that no held release has, each once, in manifest order: what
    /// must cross the network. A file whose whole content a held release has needs none of
    /// its chunks, even if that release cut it differently.
    pub fn missing_chunks(&self, manifest: &Manifest) -> Result<Vec<Chunk>, DistError> {
        Ok(self.local_content()?.missing(manifest))
    }

    /// Starts materializing `manifest` in a fresh directory under `staging/`, after checking
    /// it with `limits` (an invalid manifest changes nothing on disk). Feed the chunks
    /// [`Staging::missing`] lists to [`Staging::put_chunk`], then call [`Staging::finish`].
    pub fn begin(&self, manifest: &Manifest, limits: &Limits) -> Result<Staging, DistError> {
        manifest.validate(limits)?;
        self.stage(manifest.clone(), *limits, None)
    }

    /// The bytes of one chunk, from any held release, checked against `sha256`: what a node
    /// serves to peers that are syncing a release it holds.
    pub fn read_chunk(&self, sha256: &str) -> Result<Vec<u8>, DistError> {
        let mut damaged = None;
        for hash in self.releases()? {
            let manifest = self.manifest_shared(&hash)?;
            for entry in &manifest.entries {
                let EntryKind::File { chunks, .. } = &entry.kind else {
                    continue;
                };
                for (offset, chunk) in chunk_offsets(chunks) {
                    if chunk.sha256 != sha256 {
                        continue;
                    }
                    let path = self.release_dir(&hash).join(&entry.path);
                    // A damaged copy is reported only if no other release has a good one.
                    match read_verified_chunk(&path, offset, chunk) {
                        Ok(bytes) => return Ok(bytes),
                        Err(error) => damaged = Some(error),
                    }
                }
            }
        }
        Err(damaged.unwrap_or_else(|| DistError::ChunkNotHeld {
            sha256: sha256.to_owned(),
            data_dir: self.data_dir().to_path_buf(),
        }))
    }

    /// Installs the dist at `dist_dir` as a release and returns its build hash: scan and
    /// validate it, stage it (hard-linking files that held releases already have, copying
    /// the rest from the dist), verify the staged tree, rename it into `releases/`.
    ///
    /// Idempotent: installing a held release changes nothing. `builtAt` and `gitCommit` are
    /// taken from the dist's version.json when it records this build hash. On error nothing
    /// visible changes (a bad dist is refused before anything is written).
    pub fn install_dir(&self, dist_dir: &Path, limits: &Limits) -> Result<String, DistError> {
        let manifest = scan(dist_dir, limits)?;
        let hash = manifest.build_hash();
        if self.has(&hash) {
            return Ok(hash);
        }
        let mut staging = self.stage(manifest, *limits, Some(dist_dir.to_path_buf()))?;
        if let Some((built_at, git_commit)) = recorded_origin(dist_dir, &hash) {
            // A stale or hand-edited version.json is only informational: ignore it.
            let _ = staging.set_origin(&built_at, &git_commit);
        }
        staging.finish()
    }

    /// Points `previous` at the release `current` points at, pinning it as the backup.
    /// A no-op when it already does; an error when there is no `current`.
    pub fn pin_previous(&self) -> Result<(), DistError> {
        let _changing = self.lock_changes();
        let current = self.current()?.ok_or_else(|| DistError::NoCurrent {
            path: self.path(CURRENT),
        })?;
        if self.previous()?.as_deref() == Some(current.as_str()) {
            return Ok(());
        }
        self.point(PREVIOUS, &current)
    }

    /// Points `current` at the held release `hash` (an atomic symlink swap).
    pub fn activate(&self, hash: &str) -> Result<(), DistError> {
        let _changing = self.lock_changes();
        self.require_release(hash)?;
        if self.current()?.as_deref() == Some(hash) {
            return Ok(());
        }
        self.point(CURRENT, hash)
    }

    /// Points `current` back at the release `previous` pins (an atomic symlink swap).
    /// `previous` stays pinned until [`ReleaseStore::commit`].
    pub fn restore(&self) -> Result<(), DistError> {
        let _changing = self.lock_changes();
        let previous = self.previous()?.ok_or_else(|| DistError::NoPrevious {
            path: self.path(PREVIOUS),
        })?;
        self.require_release(&previous)?;
        if self.current()?.as_deref() == Some(previous.as_str()) {
            return Ok(());
        }
        self.point(CURRENT, &previous)
    }

    /// Ends an update: unpins `previous`, then deletes releases other than `current`'s
    /// beyond the `keep_old` most recently installed (by the mtime of their directory).
    /// Returns the deleted build hashes. Never deletes `current`'s release.
    ///
    /// Each step is atomic and the whole is idempotent: after an error, commit again.
    pub fn commit(&self, keep_old: usize) -> Result<Vec<String>, DistError> {
        let _changing = self.lock_changes();
        remove_file_durably(&self.path(PREVIOUS))?;
        self.prune_unlocked(keep_old)
    }

    /// Deletes old releases beyond the newest `keep_old`, never the ones `current` or
    /// `previous` point at (a rollout may still need `previous` to revert). Returns the
    /// deleted hashes.
    pub fn prune(&self, keep_old: usize) -> Result<Vec<String>, DistError> {
        let _changing = self.lock_changes();
        self.prune_unlocked(keep_old)
    }

    fn prune_unlocked(&self, keep_old: usize) -> Result<Vec<String>, DistError> {
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

    fn path(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    fn release_dir(&self, hash: &str) -> PathBuf {
        self.path(RELEASES).join(hash)
    }

    fn manifest_path(&self, hash: &str) -> PathBuf {
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

    fn require_release(&self, hash: &str) -> Result<(), DistError> {
        if !is_sha256_hex(hash) {
            return Err(DistError::NotABuildHash {
                hash: hash.to_owned(),
            });
        }
        if !self.has(hash) {
            return Err(DistError::UnknownRelease {
                hash: hash.to_owned(),
                data_dir: self.data_dir().to_path_buf(),
            });
        }
        Ok(())
    }

    fn manifest_shared(&self, hash: &str) -> Result<Arc<Manifest>, DistError> {
        self.require_release(hash)?;
        if let Some(manifest) = self.cache().get(hash) {
            return Ok(Arc::clone(manifest));
        }
        let path = self.manifest_path(hash);
        let text = fs::read(&path).map_err(io_error("read", &path))?;
        let manifest: Manifest =
            serde_json::from_slice(&text).map_err(|error| DistError::BadManifestFile {
                path: path.clone(),
                hash: hash.to_owned(),
                reason: error.to_string(),
            })?;
        let manifest = Arc::new(manifest);
        self.cache().insert(hash.to_owned(), Arc::clone(&manifest));
        Ok(manifest)
    }

    /// Where every file content and chunk held locally can be read.
    fn local_content(&self) -> Result<LocalContent, DistError> {
        let mut local = LocalContent::default();
        for hash in self.releases()? {
            let manifest = self.manifest_shared(&hash)?;
            local.add(self.release_dir(&hash), manifest);
        }
        Ok(local)
    }

    fn stage(
        &self,
        manifest: Manifest,
        limits: Limits,
        dist_dir: Option<PathBuf>,
    ) -> Result<Staging, DistError> {
        let local = self.local_content()?;
        // A local dist supplies every byte itself: nothing is missing.
        let missing = if dist_dir.is_some() {
            Vec::new()
        } else {
            local.missing(&manifest)
        };
        let missing_at = missing
            .iter()
            .enumerate()
            .map(|(index, chunk)| (chunk.sha256.clone(), index))
            .collect();
        let mut wanted = HashMap::new();
        for entry in &manifest.entries {
            if let EntryKind::File { chunks, .. } = &entry.kind {
                for chunk in chunks {
                    wanted.insert(chunk.sha256.clone(), chunk.size);
                }
            }
        }
        let dir = self.path(STAGING).join(random_name("stage"));
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io_error("create", &dir))?;
        let chunks_dir = dir.join("chunks");
        let staging = Staging {
            store: self.clone(),
            hash: manifest.build_hash(),
            manifest,
            limits,
            dir,
            missing,
            missing_at,
            wanted,
            local,
            dist_dir,
            origin: None,
        };
        // The Staging exists now, so its Drop removes the directory if this fails.
        DirBuilder::new()
            .mode(0o700)
            .create(&chunks_dir)
            .map_err(io_error("create", &chunks_dir))?;
        Ok(staging)
    }

    /// Makes the verified tree at `tree` the release `hash`: manifest first, then the
    /// rename, so that a release directory never exists without its manifest.
    fn publish(&self, hash: &str, manifest: &Manifest, tree: &Path) -> Result<(), DistError> {
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
            return Err(DistError::Io(IoError::new(
                "rename the staged release to",
                release_dir,
                source,
            )));
        }
        sync_dir(&self.path(RELEASES))?;
        self.cache()
            .insert(hash.to_owned(), Arc::new(manifest.clone()));
        Ok(())
    }

    /// Deletes the release `hash`: rename it out of `releases/` (atomic), then remove its
    /// manifest and its files. A crash in between leaves only what `open` cleans up.
    fn retire(&self, hash: &str) -> Result<(), DistError> {
        self.discard(&self.release_dir(hash), RELEASES)?;
        remove_file_durably(&self.manifest_path(hash))?;
        self.cache().remove(hash);
        Ok(())
    }

    /// Moves `path` (an entry of `<data>/<parent>`) into staging/ and deletes it there, so
    /// that it disappears from `parent` atomically however large it is.
    fn discard(&self, path: &Path, parent: &str) -> Result<(), DistError> {
        let doomed = self.path(STAGING).join(random_name("discard"));
        fs::rename(path, &doomed).map_err(io_error("delete", path))?;
        sync_dir(&self.path(parent))?;
        Ok(remove_tree(&doomed).map_err(io_error("remove", &doomed))?)
    }

    /// Removes what a crash can leave behind; see [`ReleaseStore::open`].
    fn recover(&self) -> Result<(), DistError> {
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
    fn link_target(&self, name: &str) -> Result<Option<String>, DistError> {
        let path = self.path(name);
        let target = match fs::read_link(&path) {
            Ok(target) => target,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            // EINVAL: it exists but is not a symlink.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                return Err(DistError::BadLink {
                    path,
                    found: "not a symlink".to_owned(),
                })
            }
            Err(source) => {
                return Err(DistError::Io(IoError::new(
                    "read the symlink",
                    path,
                    source,
                )))
            }
        };
        let found = target.to_string_lossy().into_owned();
        match found.strip_prefix("releases/") {
            Some(hash) if is_sha256_hex(hash) => Ok(Some(hash.to_owned())),
            _ => Err(DistError::BadLink { path, found }),
        }
    }

    /// Points the link `name` at `releases/<hash>`: a new symlink under a temporary name,
    /// renamed over the old one (atomic), then the directory synced so it survives a crash.
    fn point(&self, name: &str, hash: &str) -> Result<(), DistError> {
        let target = Path::new(RELEASES).join(hash);
        Ok(replace_symlink(self.data_dir(), name, &target)?)
    }
}

/// A release being materialized in `staging/`. Dropping it without [`Staging::finish`]
/// discards the work.
#[derive(Debug)]
pub struct Staging {
    /// The store it will be published to; keeps the store's lock held meanwhile.
    store: ReleaseStore,
    /// What is being built; validated.
    manifest: Manifest,
    /// Its build hash.
    hash: String,
    /// The limits it was validated with, for the final scan.
    limits: Limits,
    /// `staging/<random>/`: `chunks/` holds received chunks, `tree/` the release being built.
    dir: PathBuf,
    /// Chunks still to receive. Order is not meaningful: removal swaps in the last one.
    missing: Vec<Chunk>,
    /// Position of each missing chunk in `missing`, so `put_chunk` is O(1).
    missing_at: HashMap<String, usize>,
    /// Every chunk of the manifest, with its size: what `put_chunk` accepts.
    wanted: HashMap<String, u64>,
    /// Held releases' content, to link or copy from instead of receiving.
    local: LocalContent,
    /// The dist being installed, when installing from a local directory.
    dist_dir: Option<PathBuf>,
    /// `builtAt` and `gitCommit` for version.json, when known.
    origin: Option<(String, String)>,
}

impl Staging {
    /// The build hash of the release being staged.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Chunks still needed from peers, each once.
    pub fn missing(&self) -> &[Chunk] {
        &self.missing
    }

    /// Records `builtAt` and `gitCommit` for the release's version.json, as the dist's own
    /// version.json has them (otherwise: the time of `finish`, and "unknown").
    pub fn set_origin(&mut self, built_at: &str, git_commit: &str) -> Result<(), DistError> {
        if humantime::parse_rfc3339(built_at).is_err() {
            return Err(DistError::BadOrigin {
                field: "builtAt",
                value: built_at.to_owned(),
            });
        }
        if git_commit.is_empty()
            || git_commit.len() > 64
            || !git_commit.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(DistError::BadOrigin {
                field: "gitCommit",
                value: git_commit.to_owned(),
            });
        }
        self.origin = Some((built_at.to_owned(), git_commit.to_owned()));
        Ok(())
    }

    /// Takes one chunk of the manifest: checks its size and SHA-256, then keeps it in
    /// staging. A chunk the manifest does not list, or bytes that do not match, are refused
    /// and change nothing. A chunk already held is accepted and ignored.
    pub fn put_chunk(&mut self, sha256: &str, bytes: &[u8]) -> Result<(), DistError> {
        let Some(&size) = self.wanted.get(sha256) else {
            return Err(DistError::UnknownChunk {
                sha256: sha256.to_owned(),
                release: self.hash.clone(),
            });
        };
        let mismatch = |problem| DistError::ChunkMismatch {
            sha256: sha256.to_owned(),
            problem,
        };
        if bytes.len() as u64 != size {
            return Err(mismatch(format!("{} bytes, expected {size}", bytes.len())));
        }
        let actual = hex::encode(Sha256::digest(bytes));
        if actual != sha256 {
            return Err(mismatch(format!("its content hashes to {actual}")));
        }
        let Some(&index) = self.missing_at.get(sha256) else {
            return Ok(());
        };
        // `sha256` is a key of `wanted`, so it passed validation: 64 hex characters.
        let path = self.dir.join("chunks").join(sha256);
        let written = create_new(&path, 0o600).and_then(|mut file| file.write_all(bytes));
        if let Err(source) = written {
            let _ = fs::remove_file(&path);
            return Err(DistError::Io(IoError::new("write", path, source)));
        }
        self.missing_at.remove(sha256);
        self.missing.swap_remove(index);
        if let Some(moved) = self.missing.get(index) {
            self.missing_at.insert(moved.sha256.clone(), index);
        }
        Ok(())
    }

    /// Assembles the release, verifies it and renames it into `releases/`; returns its
    /// build hash. Idempotent when the release is already held.
    ///
    /// Files whose content and mode a held release already has are hard-linked from it;
    /// other files are copied from the dist being installed, or assembled from chunks of
    /// held releases and received chunks, each checked against its hash. Directories,
    /// symlinks and modes follow the manifest, version.json is written, everything is
    /// synced, and the whole tree must scan to the manifest's build hash before it is
    /// published. On error the staged work is discarded and the store is unchanged.
    pub fn finish(self) -> Result<String, DistError> {
        if self.store.has(&self.hash) {
            return Ok(self.hash.clone());
        }
        if !self.missing.is_empty() {
            return Err(DistError::ChunksMissing {
                release: self.hash.clone(),
                count: self.missing.len(),
            });
        }
        let tree = self.dir.join("tree");
        self.assemble(&tree)?;
        // Content hashes only: the chunks were checked as they arrived, and the build
        // hash covers every byte of every file.
        let actual = build_hash_of(&scan_summary(&tree, &self.limits)?);
        if actual != self.hash {
            return Err(DistError::StagedMismatch {
                expected: self.hash.clone(),
                actual,
            });
        }
        self.store.publish(&self.hash, &self.manifest, &tree)?;
        Ok(self.hash.clone())
    }

    /// Builds the release's tree at `tree` (which must not exist).
    fn assemble(&self, tree: &Path) -> Result<(), DistError> {
        // Directories stay owner-writable while they fill; their modes are set last.
        DirBuilder::new()
            .mode(0o700)
            .create(tree)
            .map_err(io_error("create", tree))?;
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        for entry in &self.manifest.entries {
            let path = tree.join(&entry.path);
            match &entry.kind {
                EntryKind::Dir { .. } => DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(io_error("create", &path))?,
                EntryKind::File {
                    mode,
                    size,
                    sha256,
                    chunks,
                } => {
                    let spec = FileSpec {
                        relative: &entry.path,
                        mode: *mode,
                        size: *size,
                        sha256,
                        chunks,
                    };
                    self.write_file(&spec, &path, &mut buffer)?
                }
                EntryKind::Symlink { target } => {
                    symlink(target, &path).map_err(io_error("create the symlink", &path))?
                }
            }
        }

        let mut info = VersionInfo::describe(&self.manifest, SystemTime::now(), "unknown".into());
        if let Some((built_at, git_commit)) = &self.origin {
            info.built_at = built_at.clone();
            info.git_commit = git_commit.clone();
        }
        let version_path = tree.join(VERSION_FILE);
        let written = create_new(&version_path, 0o644).and_then(|mut file| {
            file.write_all(info.to_file_text().as_bytes())?;
            file.sync_all()
        });
        written.map_err(io_error("write", &version_path))?;

        // Children sort after their parent, so in reverse every directory comes after its
        // contents: a directory made read-only here has nothing left to receive.
        for entry in self.manifest.entries.iter().rev() {
            if let EntryKind::Dir { mode } = entry.kind {
                let path = tree.join(&entry.path);
                let dir = open_dir(&path).map_err(io_error("open", &path))?;
                dir.set_permissions(fs::Permissions::from_mode(mode))
                    .and_then(|()| dir.sync_all())
                    .map_err(io_error("set the mode of", &path))?;
            }
        }
        // The mtime of a release directory says when it was installed (commit keeps the
        // newest); set it explicitly, as filling the directory moved it around.
        let root = open_dir(tree).map_err(io_error("open", tree))?;
        root.set_permissions(fs::Permissions::from_mode(0o755))
            .and_then(|()| root.set_modified(SystemTime::now()))
            .and_then(|()| root.sync_all())
            .map_err(io_error("set the mode and mtime of", tree))?;
        Ok(())
    }

    /// Creates the regular file `path` with the content and mode `spec` gives.
    fn write_file(&self, spec: &FileSpec, path: &Path, buffer: &mut [u8]) -> Result<(), DistError> {
        let &FileSpec {
            relative,
            mode,
            size,
            sha256,
            chunks,
        } = spec;
        if let Some(source) = self.local.linkable(sha256, mode, size) {
            // Falls back to copying when linking is refused (another owner under
            // protected_hardlinks, too many links, another filesystem).
            if fs::hard_link(&source, path).is_ok() {
                return Ok(());
            }
        }
        let mut file = create_new(path, 0o600).map_err(io_error("create", path))?;
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let whole_source = match &self.dist_dir {
            Some(dist) => Some(dist.join(relative)),
            None => self.local.any_copy(sha256),
        };
        if let Some(source) = whole_source {
            let mut reader = open_file(&source).map_err(io_error("open", &source))?;
            loop {
                let count = match reader.read(buffer) {
                    Ok(0) => break,
                    Ok(count) => count,
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source_error) => {
                        return Err(DistError::Io(IoError::new("read", source, source_error)))
                    }
                };
                hasher.update(&buffer[..count]);
                file.write_all(&buffer[..count])
                    .map_err(io_error("write", path))?;
                written += count as u64;
            }
        } else {
            for chunk in chunks {
                let bytes = self.chunk_bytes(chunk)?;
                hasher.update(&bytes);
                file.write_all(&bytes).map_err(io_error("write", path))?;
                written += bytes.len() as u64;
            }
        }
        if written != size || hex::encode(hasher.finalize()) != sha256 {
            return Err(match &self.dist_dir {
                Some(dist) => DistError::ChangedWhileReading {
                    path: relative.to_owned(),
                    change: "its content no longer matches the scan".to_owned(),
                }
                .in_dist(dist),
                None => DistError::FileMismatch {
                    path: relative.to_owned(),
                },
            });
        }
        file.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|()| file.sync_all())
            .map_err(io_error("sync", path))?;
        Ok(())
    }

    /// One chunk's bytes: received, or read (and checked) from a held release.
    fn chunk_bytes(&self, chunk: &Chunk) -> Result<Vec<u8>, DistError> {
        let received = self.dir.join("chunks").join(&chunk.sha256);
        match fs::read(&received) {
            Ok(bytes) => return Ok(bytes),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DistError::Io(IoError::new("read", received, source))),
        }
        let (path, offset) =
            self.local
                .chunk(&chunk.sha256)
                .ok_or_else(|| DistError::ChunksMissing {
                    release: self.hash.clone(),
                    count: 1,
                })?;
        read_verified_chunk(&path, offset, chunk)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: whatever is left is discarded by the next `open` anyway.
        let _ = remove_tree(&self.dir);
    }
}

/// What a regular file of the manifest must be.
struct FileSpec<'a> {
    /// Entry path, for errors and for finding it in the dist being installed.
    relative: &'a str,
    mode: u32,
    size: u64,
    sha256: &'a str,
    chunks: &'a [Chunk],
}

/// Index of the content held by the store's releases.
#[derive(Debug, Default)]
struct LocalContent {
    /// (release directory, manifest) of each held release.
    releases: Vec<(PathBuf, Arc<Manifest>)>,
    /// File content SHA-256 -> (release index, entry index) of every file with it.
    files: HashMap<String, Vec<(usize, usize)>>,
    /// Chunk SHA-256 -> (release index, entry index, offset) of one place holding it.
    chunks: HashMap<String, (usize, usize, u64)>,
}

impl LocalContent {
    fn add(&mut self, dir: PathBuf, manifest: Arc<Manifest>) {
        let release = self.releases.len();
        for (index, entry) in manifest.entries.iter().enumerate() {
            if let EntryKind::File { sha256, chunks, .. } = &entry.kind {
                self.files
                    .entry(sha256.clone())
                    .or_default()
                    .push((release, index));
                for (offset, chunk) in chunk_offsets(chunks) {
                    self.chunks
                        .entry(chunk.sha256.clone())
                        .or_insert((release, index, offset));
                }
            }
        }
        self.releases.push((dir, manifest));
    }

    fn missing(&self, manifest: &Manifest) -> Vec<Chunk> {
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for entry in &manifest.entries {
            let EntryKind::File { sha256, chunks, .. } = &entry.kind else {
                continue;
            };
            if self.files.contains_key(sha256) {
                continue;
            }
            for chunk in chunks {
                if !self.chunks.contains_key(&chunk.sha256) && seen.insert(&chunk.sha256) {
                    missing.push(chunk.clone());
                }
            }
        }
        missing
    }

    fn path_of(&self, release: usize, entry: usize) -> PathBuf {
        let (dir, manifest) = &self.releases[release];
        dir.join(&manifest.entries[entry].path)
    }

    /// A held file with this content and mode, whose inode may be shared: on disk it must
    /// still be a regular file of that size and mode.
    fn linkable(&self, sha256: &str, mode: u32, size: u64) -> Option<PathBuf> {
        self.files
            .get(sha256)?
            .iter()
            .find_map(|&(release, entry)| {
                let EntryKind::File {
                    mode: held_mode, ..
                } = self.releases[release].1.entries[entry].kind
                else {
                    return None;
                };
                let path = self.path_of(release, entry);
                let on_disk = fs::symlink_metadata(&path).ok()?;
                (held_mode == mode
                    && on_disk.is_file()
                    && on_disk.mode() & 0o7777 == mode
                    && on_disk.len() == size)
                    .then_some(path)
            })
    }

    /// Any held file with this content.
    fn any_copy(&self, sha256: &str) -> Option<PathBuf> {
        let &(release, entry) = self.files.get(sha256)?.first()?;
        Some(self.path_of(release, entry))
    }

    /// A held file and offset holding this chunk.
    fn chunk(&self, sha256: &str) -> Option<(PathBuf, u64)> {
        let &(release, entry, offset) = self.chunks.get(sha256)?;
        Some((self.path_of(release, entry), offset))
    }
}

/// `builtAt` and `gitCommit` from the version.json of the dist at `dir`, if it records `hash`.
fn recorded_origin(dir: &Path, hash: &str) -> Option<(String, String)> {
    let path = dir.join(VERSION_FILE);
    if !fs::symlink_metadata(&path).ok()?.is_file() {
        return None;
    }
    let info: VersionInfo = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
    (info.build_hash == hash).then_some((info.built_at, info.git_commit))
}

/// Reads `chunk` at `offset` of the file at `path` and checks it against its SHA-256.
fn read_verified_chunk(path: &Path, offset: u64, chunk: &Chunk) -> Result<Vec<u8>, DistError> {
    let file = open_file(path).map_err(io_error("open", path))?;
    let size = usize::try_from(chunk.size).expect("chunk sizes are validated to fit in memory");
    let mut bytes = vec![0u8; size];
    file.read_exact_at(&mut bytes, offset)
        .map_err(io_error("read", path))?;
    if hex::encode(Sha256::digest(&bytes)) != chunk.sha256 {
        return Err(DistError::ChunkCorrupt {
            sha256: chunk.sha256.clone(),
            path: path.to_path_buf(),
            offset,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::{hash, stamp, verify};
    use std::time::{Duration, UNIX_EPOCH};

    use crate::release::test_data::noise;

    fn write_file(path: &Path, content: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A dist with every kind of entry: `binary` at bin/cluster, a small config, a larger
    /// data file, an empty file, a symlink and an empty directory with an unusual mode.
    fn sample_dist(binary: &[u8]) -> tempfile::TempDir {
        let dist = tempfile::tempdir().unwrap();
        let root = dist.path();
        write_file(&root.join("bin/cluster"), binary, 0o755);
        write_file(&root.join("etc/config.toml"), b"answer = 42\n", 0o644);
        write_file(&root.join("share/data.bin"), &noise(200_000, 5), 0o644);
        write_file(&root.join("share/empty"), b"", 0o600);
        symlink("data.bin", root.join("share/link")).unwrap();
        fs::create_dir(root.join("var")).unwrap();
        for (dir, mode) in [
            ("bin", 0o755),
            ("etc", 0o755),
            ("share", 0o755),
            ("var", 0o750),
        ] {
            fs::set_permissions(root.join(dir), fs::Permissions::from_mode(mode)).unwrap();
        }
        dist
    }

    fn small_dist(config: &str) -> tempfile::TempDir {
        let dist = sample_dist(b"#!/bin/sh\nexit 0\n");
        fs::write(dist.path().join("etc/config.toml"), config).unwrap();
        dist
    }

    fn limits() -> Limits {
        Limits::default()
    }

    fn open(data: &tempfile::TempDir) -> ReleaseStore {
        ReleaseStore::open(data.path()).unwrap()
    }

    /// Every path under `dir` (not following symlinks) with its kind and, for symlinks,
    /// target: what "the data dir did not change" is checked against.
    fn tree(dir: &Path) -> Vec<String> {
        walkdir::WalkDir::new(dir)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name()
            .into_iter()
            .map(|entry| {
                let entry = entry.unwrap();
                let path = entry
                    .path()
                    .strip_prefix(dir)
                    .unwrap()
                    .display()
                    .to_string();
                let kind = entry.file_type();
                if kind.is_symlink() {
                    format!(
                        "{path} -> {}",
                        fs::read_link(entry.path()).unwrap().display()
                    )
                } else if kind.is_dir() {
                    format!("{path}/")
                } else {
                    format!("{path} ({} bytes)", entry.metadata().unwrap().len())
                }
            })
            .collect()
    }

    fn inode(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().ino()
    }

    fn staging_is_empty(store: &ReleaseStore) -> bool {
        fs::read_dir(store.path(STAGING)).unwrap().next().is_none()
    }

    #[test]
    fn install_dir_materializes_a_verified_release() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        assert_eq!(store.releases().unwrap(), Vec::<String>::new());
        let dist = sample_dist(&noise(300_000, 1));

        let installed = store.install_dir(dist.path(), &limits()).unwrap();
        assert_eq!(installed, hash(dist.path(), &limits()).unwrap());
        assert_eq!(store.releases().unwrap(), std::slice::from_ref(&installed));
        assert!(store.has(&installed));
        assert_eq!(
            store.manifest(&installed).unwrap(),
            scan(dist.path(), &limits()).unwrap(),
            "the stored manifest keeps the chunk lists"
        );
        let release = data.path().join("releases").join(&installed);
        let verified = verify(&release, &limits()).unwrap();
        assert_eq!(verified.build_hash, installed);
        assert_eq!(
            fs::read(release.join("share/data.bin")).unwrap(),
            noise(200_000, 5)
        );
        assert_eq!(
            fs::read_link(release.join("share/link")).unwrap(),
            Path::new("data.bin")
        );
        let mode = |path: &str| fs::symlink_metadata(release.join(path)).unwrap().mode() & 0o7777;
        assert_eq!(
            (mode("var"), mode("share/empty"), mode("bin/cluster")),
            (0o750, 0o600, 0o755)
        );
        assert!(data
            .path()
            .join("manifests")
            .join(format!("{installed}.json"))
            .is_file());
        assert_eq!(store.current().unwrap(), None, "install does not activate");
        assert!(staging_is_empty(&store));

        // Idempotent: a second install finds the release and writes nothing.
        let before = tree(data.path());
        assert_eq!(
            store.install_dir(dist.path(), &limits()).unwrap(),
            installed
        );
        assert_eq!(tree(data.path()), before);
    }

    #[test]
    fn install_keeps_the_origin_recorded_by_stamp() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let read_info = |hash: &str| -> VersionInfo {
            let path = data.path().join("releases").join(hash).join(VERSION_FILE);
            serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
        };

        let stamped_dist = small_dist("stamped\n");
        let stamped = stamp(stamped_dist.path(), &limits()).unwrap();
        let installed = store.install_dir(stamped_dist.path(), &limits()).unwrap();
        assert_eq!(read_info(&installed), stamped);

        // A version.json for other content is not this release's origin.
        let edited_dist = small_dist("stamped\n");
        stamp(edited_dist.path(), &limits()).unwrap();
        fs::write(edited_dist.path().join("etc/config.toml"), "edited\n").unwrap();
        let installed = store.install_dir(edited_dist.path(), &limits()).unwrap();
        let info = read_info(&installed);
        assert_eq!(info.build_hash, installed);
        assert_eq!(info.git_commit, "unknown");
    }

    #[test]
    fn unchanged_files_are_hard_linked_from_held_releases() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let dist = sample_dist(&noise(300_000, 1));
        let v1 = store.install_dir(dist.path(), &limits()).unwrap();
        fs::write(dist.path().join("etc/config.toml"), "answer = 43\n").unwrap();
        let v2 = store.install_dir(dist.path(), &limits()).unwrap();
        assert_ne!(v1, v2);

        let in_release =
            |hash: &str, path: &str| data.path().join("releases").join(hash).join(path);
        for shared in ["bin/cluster", "share/data.bin", "share/empty"] {
            assert_eq!(
                inode(&in_release(&v1, shared)),
                inode(&in_release(&v2, shared)),
                "{shared} is one inode in both releases"
            );
        }
        assert_ne!(
            inode(&in_release(&v1, "etc/config.toml")),
            inode(&in_release(&v2, "etc/config.toml"))
        );

        // Same content, new mode: sharing the inode would change the old release's mode,
        // so the file is copied. Synced from a peer, its content still comes from disk.
        fs::set_permissions(
            dist.path().join("bin/cluster"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let v3_manifest = scan(dist.path(), &limits()).unwrap();
        assert!(store.missing_chunks(&v3_manifest).unwrap().is_empty());
        let staging = store.begin(&v3_manifest, &limits()).unwrap();
        assert!(staging.missing().is_empty());
        let v3 = staging.finish().unwrap();
        let binary = in_release(&v3, "bin/cluster");
        assert_ne!(inode(&binary), inode(&in_release(&v2, "bin/cluster")));
        assert_eq!(
            fs::symlink_metadata(&binary).unwrap().mode() & 0o7777,
            0o700
        );
        assert_eq!(fs::read(&binary).unwrap(), noise(300_000, 1));
        assert_eq!(
            fs::symlink_metadata(in_release(&v2, "bin/cluster"))
                .unwrap()
                .mode()
                & 0o7777,
            0o755,
            "the held release is untouched"
        );
        verify(&in_release(&v3, ""), &limits()).unwrap();
    }

    #[test]
    fn delta_sync_moves_only_missing_chunks() {
        let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store_a, store_b) = (open(&data_a), open(&data_b));
        let dist = sample_dist(&noise(4 * 1024 * 1024, 11));
        let v1 = store_a.install_dir(dist.path(), &limits()).unwrap();
        assert_eq!(store_b.install_dir(dist.path(), &limits()).unwrap(), v1);

        let binary_path = dist.path().join("bin/cluster");
        let mut binary = fs::read(&binary_path).unwrap();
        let middle = binary.len() / 2;
        binary[middle..middle + 1024].copy_from_slice(&noise(1024, 99));
        fs::write(&binary_path, &binary).unwrap();
        fs::write(dist.path().join("etc/config.toml"), "answer = 43\n").unwrap();
        let v2 = store_a.install_dir(dist.path(), &limits()).unwrap();
        assert_ne!(v1, v2);

        let manifest = store_a.manifest(&v2).unwrap();
        let mut staging = store_b.begin(&manifest, &limits()).unwrap();
        assert_eq!(staging.hash(), v2);
        assert_eq!(
            staging.missing(),
            store_b.missing_chunks(&manifest).unwrap().as_slice()
        );
        let mut fed = 0;
        for chunk in staging.missing().to_vec() {
            let bytes = store_a.read_chunk(&chunk.sha256).unwrap();
            fed += bytes.len() as u64;
            staging.put_chunk(&chunk.sha256, &bytes).unwrap();
        }
        assert!(staging.missing().is_empty());
        let total = manifest.total_bytes();
        assert!(
            fed > 0 && fed * 10 < total,
            "fed {fed} bytes of a {total}-byte release"
        );
        assert_eq!(staging.finish().unwrap(), v2);
        assert!(store_b.has(&v2));
        assert_eq!(store_b.manifest(&v2).unwrap(), manifest);
        let synced = data_b.path().join("releases").join(&v2);
        assert_eq!(verify(&synced, &limits()).unwrap().build_hash, v2);
        assert_eq!(fs::read(synced.join("bin/cluster")).unwrap(), binary);
        assert!(staging_is_empty(&store_b));
    }

    #[test]
    fn missing_chunks_are_deduplicated_and_skip_whole_files_held() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let dist = small_dist("v1\n");
        let v1 = store.install_dir(dist.path(), &limits()).unwrap();
        assert!(store
            .missing_chunks(&store.manifest(&v1).unwrap())
            .unwrap()
            .is_empty());

        // Two new files with the same content: their chunks are needed once.
        let twin = noise(100_000, 77);
        write_file(&dist.path().join("share/twin-a"), &twin, 0o644);
        write_file(&dist.path().join("share/twin-b"), &twin, 0o644);
        let manifest = scan(dist.path(), &limits()).unwrap();
        let missing = store.missing_chunks(&manifest).unwrap();
        let EntryKind::File { chunks, .. } = &manifest.get("share/twin-a").unwrap().kind else {
            panic!("twin-a is a file");
        };
        assert_eq!(missing, *chunks);
        assert!(missing.len() > 1, "{missing:?}");
    }

    #[test]
    fn put_chunk_checks_every_byte_and_refuses_without_a_trace() {
        let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store_a, store_b) = (open(&data_a), open(&data_b));
        let dist = sample_dist(&noise(300_000, 1));
        store_b.install_dir(dist.path(), &limits()).unwrap();
        write_file(&dist.path().join("share/new"), &noise(150_000, 3), 0o644);
        let v2 = store_a.install_dir(dist.path(), &limits()).unwrap();
        let manifest = store_a.manifest(&v2).unwrap();

        let mut staging = store_b.begin(&manifest, &limits()).unwrap();
        let wanted = staging.missing().to_vec();
        assert!(wanted.len() >= 2, "{wanted:?}");
        let first = &wanted[0];
        let good = store_a.read_chunk(&first.sha256).unwrap();
        let mut flipped = good.clone();
        flipped[0] ^= 1;

        let unknown = "e".repeat(64);
        let before = tree(data_b.path());
        let refusals: Vec<(&str, &str, &[u8])> = vec![
            ("flipped byte", &first.sha256, &flipped),
            ("short", &first.sha256, &good[1..]),
            ("unknown chunk", &unknown, &good),
        ];
        for (why, sha256, bytes) in refusals {
            let error = staging.put_chunk(sha256, bytes).unwrap_err();
            let expected = if why == "unknown chunk" {
                matches!(error, DistError::UnknownChunk { .. })
            } else {
                matches!(error, DistError::ChunkMismatch { .. })
            };
            assert!(expected, "{why}: {error}");
            assert_eq!(tree(data_b.path()), before, "{why}");
            assert_eq!(staging.missing(), wanted.as_slice(), "{why}");
        }

        staging.put_chunk(&first.sha256, &good).unwrap();
        assert_eq!(staging.missing().len(), wanted.len() - 1);
        // Again: already received, accepted, nothing more to do.
        staging.put_chunk(&first.sha256, &good).unwrap();
        assert_eq!(staging.missing().len(), wanted.len() - 1);

        // Finishing early fails and leaves the store as it was (staging is discarded).
        let releases = store_b.releases().unwrap();
        let error = staging.finish().unwrap_err();
        assert!(
            matches!(error, DistError::ChunksMissing { count, .. } if count == wanted.len() - 1),
            "{error}"
        );
        assert_eq!(store_b.releases().unwrap(), releases);
        assert!(staging_is_empty(&store_b));
    }

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
            store.commit(DEFAULT_KEEP_OLD).unwrap(),
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

        let mut deleted = store.commit(2).unwrap();
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

        let mut deleted = store.commit(0).unwrap();
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
        assert!(matches!(error, DistError::NoCurrent { .. }), "{error}");
        assert_eq!(tree(fresh.path()), fresh_before);

        let v1 = store
            .install_dir(small_dist("v1\n").path(), &limits())
            .unwrap();
        store.activate(&v1).unwrap();
        let before = tree(data.path());
        let unchanged = |why: &str| assert_eq!(tree(data.path()), before, "{why}");

        let unknown = "0".repeat(64);
        let error = store.activate(&unknown).unwrap_err();
        assert!(matches!(error, DistError::UnknownRelease { .. }), "{error}");
        assert!(
            error.to_string().contains("cluster dist install"),
            "{error}"
        );
        unchanged("activate of an unknown hash");

        let error = store.activate("../../etc").unwrap_err();
        assert!(matches!(error, DistError::NotABuildHash { .. }), "{error}");
        unchanged("activate of a path");
        assert!(!store.has("../releases"));
        assert!(matches!(
            store.manifest(&unknown).unwrap_err(),
            DistError::UnknownRelease { .. }
        ));

        let error = store.restore().unwrap_err();
        assert!(matches!(error, DistError::NoPrevious { .. }), "{error}");
        assert!(error.to_string().contains("pin"), "{error}");
        unchanged("restore without previous");

        let mut invalid = store.manifest(&v1).unwrap();
        invalid.entries[0].path = "../escape".into();
        let error = store.begin(&invalid, &limits()).unwrap_err();
        assert!(matches!(error, DistError::BadPath { .. }), "{error}");
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
        assert!(matches!(error, DistError::TooManyEntries { .. }), "{error}");
        unchanged("begin over the limits");

        type Breaker = fn(&Path);
        type Expect = fn(&DistError) -> bool;
        let bad_dists: Vec<(&str, Breaker, Expect)> = vec![
            (
                "missing bin/cluster",
                |root| fs::remove_file(root.join("bin/cluster")).unwrap(),
                |e| matches!(e, DistError::MissingBinary),
            ),
            (
                "setuid file",
                |root| {
                    let path = root.join("share/data.bin");
                    fs::set_permissions(path, fs::Permissions::from_mode(0o4755)).unwrap();
                },
                |e| matches!(e, DistError::BadMode { .. }),
            ),
            (
                "escaping symlink",
                |root| symlink("../../etc/passwd", root.join("share/out")).unwrap(),
                |e| matches!(e, DistError::SymlinkEscapes { .. }),
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
            assert!(expected(error.innermost()), "{why}: wrong error: {error}");
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
    fn read_chunk_serves_only_verified_bytes() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let dist = sample_dist(&noise(300_000, 1));
        let v1 = store.install_dir(dist.path(), &limits()).unwrap();
        let manifest = store.manifest(&v1).unwrap();
        let EntryKind::File { chunks, .. } = &manifest.get("share/data.bin").unwrap().kind else {
            panic!("data.bin is a file");
        };
        let last = chunks.last().unwrap();
        let bytes = store.read_chunk(&last.sha256).unwrap();
        assert_eq!(bytes.len() as u64, last.size);
        assert!(noise(200_000, 5).ends_with(&bytes));

        let error = store.read_chunk(&"c".repeat(64)).unwrap_err();
        assert!(matches!(error, DistError::ChunkNotHeld { .. }), "{error}");

        // Damage on disk (only a test writes into a release) is caught, not served.
        let file = data
            .path()
            .join("releases")
            .join(&v1)
            .join("share/data.bin");
        let mut content = fs::read(&file).unwrap();
        *content.last_mut().unwrap() ^= 1;
        fs::write(&file, content).unwrap();
        let error = store.read_chunk(&last.sha256).unwrap_err();
        assert!(
            matches!(&error, DistError::ChunkCorrupt { path, .. } if *path == file),
            "{error}"
        );
    }

    #[test]
    fn one_store_per_data_dir_at_a_time() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let error = ReleaseStore::open(data.path()).unwrap_err();
        assert!(matches!(error, DistError::StoreLocked { .. }), "{error}");
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
        assert_eq!(store.commit(0).unwrap(), [v1]);
        assert_eq!(store.releases().unwrap(), [v2]);
    }

    #[test]
    fn origin_values_are_checked() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let manifest = scan(small_dist("v1\n").path(), &limits()).unwrap();
        let mut staging = store.begin(&manifest, &limits()).unwrap();
        assert!(matches!(
            staging.set_origin("yesterday", "abc123"),
            Err(DistError::BadOrigin {
                field: "builtAt",
                ..
            })
        ));
        assert!(matches!(
            staging.set_origin("2024-05-01T10:00:00Z", "abc/../123"),
            Err(DistError::BadOrigin {
                field: "gitCommit",
                ..
            })
        ));
        staging
            .set_origin("2024-05-01T10:00:00Z", "abc123")
            .unwrap();
        assert!(!staging.missing().is_empty(), "nothing is held yet");
    }
}
