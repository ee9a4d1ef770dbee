//! Staging: putting a release into the store. A release is assembled in a fresh directory
//! under `<data>/staging/` from a local dist, from content held releases already have, and
//! from chunks received from peers; it is verified by scanning the assembled tree, and only
//! then renamed into `releases/`, so a directory there is always complete.
//!
//! Every path written comes from a manifest that passed [`Manifest::validate`], and is
//! created fresh (`O_EXCL`, `O_NOFOLLOW`) inside the new staging directory, so writing never
//! follows a symlink. Work that is given up is renamed aside at once and deleted off the
//! async workers; what a crash leaves is discarded when the store next opens.

use std::collections::HashMap;
use std::fs::{self, DirBuilder};
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::local::{read_verified_chunk, LocalContent};
use super::manifest::ManifestError;
use super::manifest::{build_hash_of, Chunk, EntryKind, Limits, Manifest, VERSION_FILE};
use super::scan::{scan, scan_summary_knowing, verify_files, FileIdentity, Verified};
use super::store::StoreError;
use super::store::{ReleaseStore, STAGING};
use super::version::{recorded_version, VersionInfo, VersionSignature};
use super::DistError;
use crate::fs::{
    create_new, io_error, open_dir, open_file, random_name, remove_tree_in_background, IoError,
};

/// Copy buffer: large enough that syscalls stay rare on big binaries.
const COPY_BUFFER_BYTES: usize = 1024 * 1024;

/// A release being materialized in `staging/`. Dropping it without [`Staging::finish`]
/// discards the work: the directory is renamed to `staging/discard-*` at once (cheap, and
/// the name says it is garbage) and deleted on a blocking thread, so dropping a `Staging`
/// on an async error path never blocks a tokio worker on deleting a large tree.
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
    /// The held files this release will link, being hashed meanwhile.
    prehash: Option<Prehash>,
}

/// Hashing the held files a staging will link, on other threads, while its chunks arrive
/// and its tree is assembled: the final scan then reads none of them again. Every byte of
/// the release is still hashed during the staging; only when changes.
#[derive(Debug)]
struct Prehash {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Verified>>,
}

impl Prehash {
    fn start(files: Vec<(PathBuf, String)>) -> Prehash {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        // Without a thread, the final scan reads these files itself.
        let handle = std::thread::Builder::new()
            .name("verify-held".into())
            .spawn(move || verify_files(&files, &stopping))
            .ok();
        Prehash { stop, handle }
    }

    fn wait(mut self) -> Verified {
        self.handle
            .take()
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Prehash {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
    pub fn set_origin(&mut self, built_at: &str, git_commit: &str) -> Result<(), SyncError> {
        check_origin(built_at, git_commit)?;
        self.origin = Some((built_at.to_owned(), git_commit.to_owned()));
        Ok(())
    }

    /// Takes one chunk of the manifest: checks its size and SHA-256, then keeps it in
    /// staging. A chunk the manifest does not list, or bytes that do not match, are refused
    /// and change nothing. A chunk already held is accepted and ignored.
    pub fn put_chunk(&mut self, sha256: &str, bytes: &[u8]) -> Result<(), SyncError> {
        let Some(&size) = self.wanted.get(sha256) else {
            return Err(SyncError::UnknownChunk {
                sha256: sha256.to_owned(),
                release: self.hash.clone(),
            });
        };
        let mismatch = |problem| SyncError::ChunkMismatch {
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
            return Err(SyncError::Io(IoError::new("write", path, source)));
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
    pub fn finish(mut self) -> Result<String, SyncError> {
        if self.store.has(&self.hash) {
            return Ok(self.hash.clone());
        }
        if !self.missing.is_empty() {
            return Err(SyncError::ChunksMissing {
                release: self.hash.clone(),
                count: self.missing.len(),
            });
        }
        let tree = self.dir.join("tree");
        let written = self.assemble(&tree)?;
        // Content hashes only: the chunks were checked as they arrived, and the build
        // hash covers every byte of every file. Files hashed whole during this staging
        // (written here, or held and linked) are not read again.
        let mut known = self.prehash.take().map(Prehash::wait).unwrap_or_default();
        known.extend(written);
        let actual = build_hash_of(&scan_summary_knowing(&tree, &self.limits, Some(&known))?);
        if actual != self.hash {
            return Err(SyncError::StagedMismatch {
                expected: self.hash.clone(),
                actual,
            });
        }
        self.store.publish(&self.hash, &self.manifest, &tree)?;
        Ok(self.hash.clone())
    }

    /// Builds the release's tree at `tree` (which must not exist); the files it wrote,
    /// hashed as they were.
    fn assemble(&self, tree: &Path) -> Result<Verified, SyncError> {
        let mut written = Verified::new();
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
                    written.extend(self.write_file(&spec, &path, &mut buffer)?);
                }
                EntryKind::Symlink { target } => {
                    symlink(target, &path).map_err(io_error("create the symlink", &path))?
                }
            }
        }

        let mut info = VersionInfo::describe(&self.manifest, SystemTime::now(), "unknown".into());
        // The signed version fields are the release's own: a release that arrived from a
        // peer still says when and from which commit it was built.
        let signed_origin = self.manifest.signature.as_ref().and_then(|record| {
            check_origin(&record.built_at, &record.git_commit)
                .ok()
                .map(|()| (record.built_at.clone(), record.git_commit.clone()))
        });
        if let Some((built_at, git_commit)) = self.origin.as_ref().or(signed_origin.as_ref()) {
            info.built_at = built_at.clone();
            info.git_commit = git_commit.clone();
        }
        // version.json carries the signature only where it holds the fields it signs.
        info.signature = self
            .manifest
            .signature
            .as_ref()
            .filter(|record| {
                record.built_at == info.built_at && record.git_commit == info.git_commit
            })
            .map(|record| VersionSignature {
                key_id: record.key_id.clone(),
                ed25519: record.ed25519.clone(),
            });
        let version_path = tree.join(VERSION_FILE);
        create_new(&version_path, 0o644)
            .and_then(|mut file| {
                file.write_all(info.to_file_text().as_bytes())?;
                file.sync_all()
            })
            .map_err(io_error("write", &version_path))?;

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
        Ok(written)
    }

    /// Creates the regular file `path` with the content and mode `spec` gives; its
    /// identity and content hash when it wrote the file (not when it linked one).
    fn write_file(
        &self,
        spec: &FileSpec,
        path: &Path,
        buffer: &mut [u8],
    ) -> Result<Option<(FileIdentity, String)>, SyncError> {
        let &FileSpec {
            relative,
            mode,
            size,
            sha256,
            chunks,
        } = spec;
        if self.local.hard_link(sha256, mode, size, path) {
            return Ok(None);
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
                        return Err(SyncError::Io(IoError::new("read", source, source_error)))
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
                .in_dist(dist)
                .into(),
                None => SyncError::FileMismatch {
                    path: relative.to_owned(),
                },
            });
        }
        file.set_permissions(fs::Permissions::from_mode(mode))
            .and_then(|()| file.sync_all())
            .map_err(io_error("sync", path))?;
        let metadata = file
            .metadata()
            .map_err(io_error("read metadata of", path))?;
        Ok(Some((FileIdentity::of(&metadata), sha256.to_owned())))
    }

    /// One chunk's bytes: received, or read (and checked) from a held release.
    fn chunk_bytes(&self, chunk: &Chunk) -> Result<Vec<u8>, SyncError> {
        let received = self.dir.join("chunks").join(&chunk.sha256);
        match fs::read(&received) {
            Ok(bytes) => return Ok(bytes),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(SyncError::Io(IoError::new("read", received, source))),
        }
        let (path, offset) =
            self.local
                .chunk(&chunk.sha256)
                .ok_or_else(|| SyncError::ChunksMissing {
                    release: self.hash.clone(),
                    count: 1,
                })?;
        Ok(read_verified_chunk(&path, offset, chunk)?)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Best effort: whatever is left is discarded by the next `open` anyway.
        let discarded = self.dir.with_file_name(random_name("discard"));
        let doomed = match fs::rename(&self.dir, &discarded) {
            Ok(()) => discarded,
            Err(_) => self.dir.clone(),
        };
        remove_tree_in_background(doomed);
    }
}

impl ReleaseStore {
    /// Starts materializing `manifest` in a fresh directory under `staging/`, after checking
    /// it with `limits` (an invalid manifest changes nothing on disk). Feed the chunks
    /// [`Staging::missing`] lists to [`Staging::put_chunk`], then call [`Staging::finish`].
    pub fn begin(&self, manifest: &Manifest, limits: &Limits) -> Result<Staging, SyncError> {
        manifest.validate(limits)?;
        self.stage(manifest.clone(), *limits, None)
    }

    /// Installs the dist at `dist_dir` as a release and returns its build hash: scan and
    /// validate it, stage it (hard-linking files that held releases already have, copying
    /// the rest from the dist), verify the staged tree, rename it into `releases/`.
    ///
    /// Idempotent: installing a held release changes nothing, except that a release held
    /// without a signature takes the one the dist's version.json now records. `builtAt`,
    /// `gitCommit` and the signature are taken from the dist's version.json when it records
    /// this build hash. On error nothing visible changes (a bad dist is refused before
    /// anything is written).
    pub fn install_dir(&self, dist_dir: &Path, limits: &Limits) -> Result<String, SyncError> {
        let mut manifest = scan(dist_dir, limits)?;
        let hash = manifest.build_hash();
        let recorded = recorded_version(dist_dir, &hash);
        manifest.signature = recorded
            .as_ref()
            .and_then(VersionInfo::signature_record)
            .map(Box::new);
        if self.has(&hash) {
            // A release installed unsigned takes the signature its dist now has.
            if let Some(signature) = &manifest.signature {
                if self.manifest_shared(&hash)?.signature.is_none() {
                    self.record_signature(&hash, signature)?;
                }
            }
            return Ok(hash);
        }
        let mut staging = self.stage(manifest, *limits, Some(dist_dir.to_path_buf()))?;
        if let Some(info) = recorded {
            // A stale or hand-edited version.json is only informational: ignore it.
            let _ = staging.set_origin(&info.built_at, &info.git_commit);
        }
        staging.finish()
    }

    fn stage(
        &self,
        manifest: Manifest,
        limits: Limits,
        dist_dir: Option<PathBuf>,
    ) -> Result<Staging, SyncError> {
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
        let mut linked: Vec<(PathBuf, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for entry in &manifest.entries {
            if let EntryKind::File {
                mode, size, sha256, ..
            } = &entry.kind
            {
                if let Some(source) = local.linkable(sha256, *mode, *size) {
                    if seen.insert(source.clone()) {
                        linked.push((source, sha256.clone()));
                    }
                }
            }
        }
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
            // Nothing to link: no thread.
            prehash: (!linked.is_empty()).then(|| Prehash::start(linked)),
        };
        // The Staging exists now, so its Drop removes the directory if this fails.
        DirBuilder::new()
            .mode(0o700)
            .create(&chunks_dir)
            .map_err(io_error("create", &chunks_dir))?;
        Ok(staging)
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

/// What `builtAt` and `gitCommit` values a release's version.json may hold.
fn check_origin(built_at: &str, git_commit: &str) -> Result<(), SyncError> {
    if humantime::parse_rfc3339(built_at).is_err() {
        return Err(SyncError::BadOrigin {
            field: "builtAt",
            value: built_at.to_owned(),
        });
    }
    if git_commit.is_empty()
        || git_commit.len() > 64
        || !git_commit.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(SyncError::BadOrigin {
            field: "gitCommit",
            value: git_commit.to_owned(),
        });
    }
    Ok(())
}

/// What can go wrong getting a release's content into the store (a sync from peers, an
/// upload, a local install): received bytes that are not what they claim, chunks nobody
/// sent, an assembled tree that does not hash to its manifest, a peer that cannot help.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The release store failed underneath (reading held releases, publishing).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The manifest to stage breaks a manifest rule; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ManifestError),

    /// The dist being installed is not a valid dist, or changed while it was copied.
    #[error(transparent)]
    Dist(#[from] DistError),

    /// An I/O operation on a path failed.
    #[error(transparent)]
    Io(#[from] crate::fs::IoError),

    /// `put_chunk` got a chunk that the manifest being staged does not list.
    #[error("chunk {sha256} is not part of release {release}: send only the chunks that Staging::missing lists")]
    UnknownChunk {
        /// The chunk's claimed SHA-256.
        sha256: String,
        /// The release being staged.
        release: String,
    },

    /// `put_chunk` got bytes that are not the chunk they claim to be.
    #[error("chunk {sha256} arrived corrupt ({problem}): fetch it again, from another node if it repeats")]
    ChunkMismatch {
        /// The chunk's claimed SHA-256.
        sha256: String,
        /// "1000 bytes, expected 1024" or "content hashes to ...".
        problem: String,
    },

    /// `Staging::finish` before every missing chunk was put.
    #[error("release {release} cannot be assembled: {count} chunks are still missing: put_chunk every chunk Staging::missing lists first")]
    ChunksMissing {
        /// The release being staged.
        release: String,
        /// How many chunks are missing.
        count: usize,
    },

    /// The assembled tree does not hash to the build hash of its manifest.
    #[error("the staged release hashes to {actual}, not {expected}: a source changed during the install or a local release is damaged; try again")]
    StagedMismatch {
        /// The build hash of the manifest.
        expected: String,
        /// The build hash of what was assembled.
        actual: String,
    },

    /// A file assembled in staging does not hash to the content hash its manifest gives.
    #[error("file {path:?} of the staged release does not match its content hash: the manifest's chunks disagree with it, or a held release is damaged; re-scan the dist, or remove the damaged release, and try again")]
    FileMismatch {
        /// The entry.
        path: String,
    },

    /// A `builtAt` or `gitCommit` value for a release's version.json that is malformed.
    #[error("{field} {value:?} is not valid: builtAt must be RFC 3339 and gitCommit letters and digits (at most 64), or \"unknown\"")]
    BadOrigin {
        /// "builtAt" or "gitCommit".
        field: &'static str,
        /// The value given.
        value: String,
    },

    /// A peer asked for chunks did not send them (unreachable, or it refused).
    #[error("peer {peer} did not send the chunks asked for: is it running and does it hold the release?")]
    PeerUnreachable {
        /// The peer's address.
        peer: String,
        /// Why, as the transport reported it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Chunks of the release that none of the peers asked could send intact, after
    /// every round of asking.
    #[error("release {release}: {count} chunks ({bytes} bytes) could not be fetched intact from any of the peers {peers:?} in {rounds} rounds (last: {last}): upload the dist to one of them, or repair the copy they hold")]
    NotHeldByPeers {
        /// The release being synced.
        release: String,
        /// How many chunks are still missing.
        count: usize,
        /// Their total size.
        bytes: u64,
        /// The peers that were asked.
        peers: Vec<String>,
        /// How many times each peer was asked.
        rounds: u32,
        /// What went wrong last ("none of them held the chunks" if nothing did).
        last: String,
    },

    /// A prepare by build hash: neither this node nor any peer asked could give the
    /// release's manifest (one that rebuilds to that build hash).
    #[error("release {release}: no manifest could be had from this node or any of the peers {peers:?} (last: {last}): check the build hash, and upload the dist to one of them")]
    ManifestNotFetched {
        /// The build hash asked for.
        release: String,
        /// The peers that were asked.
        peers: Vec<String>,
        /// What went wrong last.
        last: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::test_data::{
        limits, noise, open, sample_dist, small_dist, staging_is_empty, tree, write_file,
    };
    use crate::release::{hash, stamp, verify};
    use std::os::unix::fs::MetadataExt;

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
    fn a_signature_travels_into_the_store_and_version_json_on_every_path_in() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let release_info = |data: &tempfile::TempDir, hash: &str| -> VersionInfo {
            let path = data.path().join("releases").join(hash).join(VERSION_FILE);
            serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
        };
        let dist = small_dist("signed\n");
        let stamped = crate::release::stamp_signed(dist.path(), &limits(), Some(&key)).unwrap();

        // A local install keeps version.json as stamped, signature included.
        let first = tempfile::tempdir().unwrap();
        let store = open(&first);
        let hash = store.install_dir(dist.path(), &limits()).unwrap();
        assert_eq!(release_info(&first, &hash), stamped);
        let manifest = store.manifest(&hash).unwrap();
        assert_eq!(
            manifest.signature.as_deref(),
            stamped.signature_record().as_ref()
        );

        // A node that gets the manifest from a peer writes the signed version fields and
        // the signature into its version.json, not "now" and "unknown".
        let second = tempfile::tempdir().unwrap();
        let peer = open(&second);
        let mut staging = peer.begin(&manifest, &limits()).unwrap();
        for chunk in staging.missing().to_vec() {
            let bytes = store.read_chunk(&chunk.sha256).unwrap();
            staging.put_chunk(&chunk.sha256, &bytes).unwrap();
        }
        assert_eq!(staging.finish().unwrap(), hash);
        assert_eq!(
            release_info(&second, &hash).without_manifest(),
            stamped.without_manifest()
        );
        assert_eq!(peer.manifest(&hash).unwrap(), manifest);

        // Installed unsigned first, then again signed: the held release takes the
        // signature (its content and version.json stay as they were).
        let third = tempfile::tempdir().unwrap();
        let late = open(&third);
        let unsigned_dist = small_dist("signed\n");
        stamp(unsigned_dist.path(), &limits()).unwrap();
        assert_eq!(
            late.install_dir(unsigned_dist.path(), &limits()).unwrap(),
            hash
        );
        assert_eq!(late.manifest(&hash).unwrap().signature, None);
        let version_before = release_info(&third, &hash);
        late.install_dir(dist.path(), &limits()).unwrap();
        assert_eq!(
            late.manifest(&hash).unwrap().signature.as_deref(),
            stamped.signature_record().as_ref()
        );
        assert_eq!(release_info(&third, &hash), version_before);
        drop(late);
        assert_eq!(
            open(&third).manifest(&hash).unwrap().signature.as_deref(),
            stamped.signature_record().as_ref(),
            "recorded on disk, not only in the cache"
        );
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
    fn a_held_file_damaged_on_disk_is_found_although_it_is_hashed_while_chunks_arrive() {
        let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (store_a, store_b) = (open(&data_a), open(&data_b));
        let dist = sample_dist(&noise(1024 * 1024, 12));
        let v1 = store_a.install_dir(dist.path(), &limits()).unwrap();
        assert_eq!(store_b.install_dir(dist.path(), &limits()).unwrap(), v1);
        fs::write(dist.path().join("etc/config.toml"), "answer = 44\n").unwrap();
        let v2 = store_a.install_dir(dist.path(), &limits()).unwrap();

        // On node B, v1's copy of a file v2 links is damaged in place: same size, and its
        // mtime put back, so nothing in its metadata tells.
        let held = data_b
            .path()
            .join("releases")
            .join(&v1)
            .join("share/data.bin");
        let mtime = fs::metadata(&held).unwrap().modified().unwrap();
        let mut bytes = fs::read(&held).unwrap();
        bytes[1000] ^= 0xff;
        fs::set_permissions(&held, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&held, &bytes).unwrap();
        fs::File::options()
            .write(true)
            .open(&held)
            .unwrap()
            .set_modified(mtime)
            .unwrap();

        let manifest = store_a.manifest(&v2).unwrap();
        let mut staging = store_b.begin(&manifest, &limits()).unwrap();
        for chunk in staging.missing().to_vec() {
            staging
                .put_chunk(&chunk.sha256, &store_a.read_chunk(&chunk.sha256).unwrap())
                .unwrap();
        }
        let err = staging.finish().unwrap_err();
        assert!(matches!(err, SyncError::StagedMismatch { .. }), "{err}");
        assert!(!store_b.has(&v2));
        assert!(staging_is_empty(&store_b));
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
                matches!(error, SyncError::UnknownChunk { .. })
            } else {
                matches!(error, SyncError::ChunkMismatch { .. })
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
            matches!(error, SyncError::ChunksMissing { count, .. } if count == wanted.len() - 1),
            "{error}"
        );
        assert_eq!(store_b.releases().unwrap(), releases);
        assert!(staging_is_empty(&store_b));
    }

    #[test]
    fn a_dropped_staging_is_renamed_aside_and_deleted_off_the_async_workers() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let dist = small_dist("v1\n");
        let manifest = scan(dist.path(), &limits()).unwrap();
        let names = || -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(data.path().join(STAGING))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        // One blocking thread, kept busy: a deletion queued behind it cannot have run yet,
        // so whatever drop did, it did without deleting on this (the only async) thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut staging = store.begin(&manifest, &limits()).unwrap();
            let EntryKind::File { chunks, .. } = &manifest.get("bin/cluster").unwrap().kind else {
                panic!("bin/cluster is a file");
            };
            let binary = fs::read(dist.path().join("bin/cluster")).unwrap();
            staging.put_chunk(&chunks[0].sha256, &binary).unwrap();
            let (release, held) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::task::spawn_blocking(move || held.recv());

            drop(staging);
            let left = names();
            assert!(
                left.len() == 1 && left[0].starts_with("discard-"),
                "renamed aside at once: {left:?}"
            );
            let received = data.path().join(STAGING).join(&left[0]).join("chunks");
            assert_eq!(
                fs::read_dir(received).unwrap().count(),
                1,
                "not deleted inline"
            );

            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            // The pool runs queued work in order: once this has run, the deletion has.
            tokio::task::spawn_blocking(|| ()).await.unwrap();
            assert_eq!(names(), Vec::<String>::new());
        });
    }

    #[test]
    fn origin_values_are_checked() {
        let data = tempfile::tempdir().unwrap();
        let store = open(&data);
        let manifest = scan(small_dist("v1\n").path(), &limits()).unwrap();
        let mut staging = store.begin(&manifest, &limits()).unwrap();
        assert!(matches!(
            staging.set_origin("yesterday", "abc123"),
            Err(SyncError::BadOrigin {
                field: "builtAt",
                ..
            })
        ));
        assert!(matches!(
            staging.set_origin("2024-05-01T10:00:00Z", "abc/../123"),
            Err(SyncError::BadOrigin {
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
