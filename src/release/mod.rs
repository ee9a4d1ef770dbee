//! Release content ("dists"): what a dist may contain, its content hash, and version.json.
//!
//! A dist is a directory tree holding everything one release of `cluster` needs on a host,
//! at minimum the binary `bin/cluster`. Its identity is the *build hash*: SHA-256 over the
//! sorted list of entries (relative path, kind, permission bits, size, content SHA-256),
//! so it is the same on every machine whatever the mtimes or owners.
//!
//! - [`manifest`]: the pure core. The [`Manifest`] type, its build hash, and
//!   [`Manifest::validate`], the sanitizer for manifests that arrive over the network.
//! - [`scan`](mod@scan): the filesystem edge that walks a directory into a manifest, hashing
//!   and content-defined chunking files on every core.
//! - [`version`]: `version.json`, written by `cluster dist stamp` and checked by `verify`.
//! - [`store`]: a node's releases on disk (`<data>/releases/<hash>/`, the `current` and
//!   `previous` links, `manifests/`): open and repair, activate, restore, commit, prune.
//!   Crash-safe; releases are immutable.
//! - `staging`: putting a release in ([`Staging`], [`ReleaseStore::begin`],
//!   [`ReleaseStore::install_dir`]): assemble in `staging/`, verify, rename into place.
//! - `local`: the content held releases supply: what a manifest still misses, hard links
//!   of unchanged files, and [`ReleaseStore::read_chunk`] for peers.
//!
//! Architecture invariant: `manifest` does no I/O; every path the rest of the system writes
//! to disk from an untrusted manifest has passed [`Manifest::validate`] first.

mod local;
pub mod manifest;
pub mod scan;
mod staging;
pub mod store;
#[cfg(test)]
pub(crate) mod test_data;
pub mod version;

use std::path::PathBuf;

pub use manifest::{
    build_hash_of, chunk_offsets, Chunk, Entry, EntryKind, EntrySummary, Limits, Manifest,
    SummaryKind, BINARY_PATH, VERSION_FILE,
};
pub use scan::{scan, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
pub use staging::Staging;
pub use store::{ReleaseStore, DEFAULT_KEEP_OLD};
pub use version::{hash, stamp, verify, VersionInfo};

/// Everything that can be wrong with a dist or a manifest.
///
/// Entry-level variants name the entry by its path relative to the dist root; errors found
/// while looking at a directory on disk are wrapped in [`DistError::InDist`], which names
/// the directory.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Context wrapper: `error` happened while reading the dist at `dir`.
    #[error("dist {}: {error}", dir.display())]
    InDist {
        /// The dist root as the caller gave it.
        dir: PathBuf,
        /// What went wrong there. Not exposed as `source` because the message above
        /// already contains it, and error reporters would print it twice.
        error: Box<DistError>,
    },

    /// The dist directory itself is absent.
    #[error("dist directory {} does not exist: pass the directory that contains bin/cluster", dir.display())]
    DirMissing {
        /// The path given.
        dir: PathBuf,
    },

    /// The dist path exists but is not a directory.
    #[error("{} is not a directory: a dist is a directory that contains bin/cluster", dir.display())]
    NotADirectory {
        /// The path given.
        dir: PathBuf,
    },

    /// An I/O operation on a path failed.
    #[error(transparent)]
    Io(#[from] crate::fs::IoError),

    /// A name on disk is not UTF-8; manifests carry paths as strings.
    #[error("{} is not a UTF-8 path: rename it; dist paths must be UTF-8", path.display())]
    NonUtf8Path {
        /// The offending path, relative to the dist root.
        path: PathBuf,
    },

    /// Something other than a regular file, directory or symlink.
    #[error("{path} is a {kind}: a dist may contain only regular files, directories and symlinks; remove it")]
    UnsupportedFileType {
        /// Entry path.
        path: String,
        /// "FIFO", "socket", "block device", "character device".
        kind: &'static str,
    },

    /// A file changed between listing and hashing.
    #[error("{path} changed while the dist was being scanned ({change}): stop writing to the dist and retry")]
    ChangedWhileReading {
        /// Entry path.
        path: String,
        /// What changed.
        change: String,
    },

    /// `version.json` in the dist root is not a regular file.
    #[error("{VERSION_FILE} is not a regular file: remove it; `cluster dist stamp` writes it")]
    VersionFileNotRegular,

    /// A path in a manifest breaks the rules for entry paths.
    #[error(
        "entry {path:?}: {problem}: entries must be relative paths of plain names inside the dist"
    )]
    BadPath {
        /// The path as given (debug-quoted in the message so control characters show).
        path: String,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// The same path appears twice.
    #[error("entry {path:?} appears more than once: each path may appear once")]
    DuplicatePath {
        /// The repeated path.
        path: String,
    },

    /// Entries are not in byte-wise path order.
    #[error("entry {path:?} comes after {previous:?}: entries must be sorted by path")]
    Unsorted {
        /// The out-of-order entry.
        path: String,
        /// The entry before it.
        previous: String,
    },

    /// An entry's parent directory is not listed.
    #[error(
        "entry {path:?} has no entry for its parent directory {parent:?}: list every directory"
    )]
    MissingParent {
        /// The entry.
        path: String,
        /// Its parent.
        parent: String,
    },

    /// An entry's parent is listed but is a file or symlink.
    #[error("entry {path:?} is inside {parent:?}, which is not a directory: only directories may contain entries")]
    ParentNotDir {
        /// The entry.
        path: String,
        /// Its parent.
        parent: String,
    },

    /// A symlink target that is malformed (absolute, empty, control characters...).
    #[error("symlink {path:?} -> {target:?}: {problem}: symlinks must be relative and stay inside the dist")]
    BadSymlink {
        /// The link's path.
        path: String,
        /// Its target.
        target: String,
        /// What is wrong with it.
        problem: &'static str,
    },

    /// A symlink that resolves outside the dist root.
    #[error("symlink {path:?} -> {target:?} points outside the dist: symlinks must stay inside the dist")]
    SymlinkEscapes {
        /// The link's path.
        path: String,
        /// Its target.
        target: String,
    },

    /// Permission bits beyond rwx for user/group/other.
    #[error("entry {path:?} has mode {mode:04o}: {problem}")]
    BadMode {
        /// The entry.
        path: String,
        /// The mode as given.
        mode: u32,
        /// What is wrong and how to fix it.
        problem: &'static str,
    },

    /// A file's chunks do not add up to the file.
    #[error("file {path:?}: chunks add up to {chunk_total} bytes but the file has {size}: the manifest is corrupt; re-scan the dist")]
    ChunkSizeMismatch {
        /// The file.
        path: String,
        /// Its declared size.
        size: u64,
        /// Sum of its chunk sizes (saturating).
        chunk_total: u64,
    },

    /// A chunk that is empty or larger than any chunker here produces.
    #[error("file {path:?}: chunk {index} has {size} bytes, outside 1..={max}: the manifest is corrupt; re-scan the dist")]
    BadChunkSize {
        /// The file.
        path: String,
        /// Position of the chunk in the file.
        index: usize,
        /// Its declared size.
        size: u64,
        /// The largest chunk accepted.
        max: u64,
    },

    /// A hash that is not 64 lowercase hex characters.
    #[error("file {path:?}: {what} {hash:?} is not 64 lowercase hex characters: the manifest is corrupt; re-scan the dist")]
    BadHash {
        /// The file.
        path: String,
        /// "content hash" or "chunk N hash".
        what: String,
        /// The value given.
        hash: String,
    },

    /// Total file bytes above the configured cap.
    #[error("the dist holds at least {total} bytes of files, over the limit of {limit}: shrink the dist or raise the size limit")]
    TooLarge {
        /// Bytes counted so far (at least this many).
        total: u64,
        /// The cap.
        limit: u64,
    },

    /// More entries than the configured cap.
    #[error("the dist has more than {limit} entries: shrink the dist or raise the entry limit")]
    TooManyEntries {
        /// The cap.
        limit: usize,
    },

    /// No `bin/cluster`.
    #[error("bin/cluster is missing: a dist must contain the cluster binary at bin/cluster")]
    MissingBinary,

    /// `bin/cluster` exists but is not a regular file.
    #[error("bin/cluster is not a regular file: a dist must contain the cluster binary itself at bin/cluster, not a link or directory")]
    BinaryNotFile,

    /// `bin/cluster` is not executable by its owner.
    #[error("bin/cluster has mode {mode:04o} and is not executable: chmod +x bin/cluster")]
    BinaryNotExecutable {
        /// Its mode.
        mode: u32,
    },

    /// A manifest lists `version.json` at the root, which is derived from the manifest.
    #[error("entry \"{VERSION_FILE}\" may not appear in a manifest: it is written from the manifest by `cluster dist stamp`")]
    VersionFileInManifest,

    /// `verify` on a dist without version.json.
    #[error("{VERSION_FILE} is missing: run `cluster dist stamp <dir>` first")]
    NotStamped,

    /// `version.json` exists but cannot be parsed.
    #[error("{VERSION_FILE} is not valid: {reason}: re-create it with `cluster dist stamp <dir>`")]
    BadVersionFile {
        /// The parse error.
        reason: String,
    },

    /// `verify`: an entry recorded in version.json is gone.
    #[error("{path} is listed in {VERSION_FILE} but missing from the dist: the dist changed after it was stamped; restore it or re-stamp")]
    EntryMissing {
        /// The entry.
        path: String,
    },

    /// `verify`: an entry on disk is not recorded in version.json.
    #[error("{path} is in the dist but not listed in {VERSION_FILE}: the dist changed after it was stamped; remove it or re-stamp")]
    EntryExtra {
        /// The entry.
        path: String,
    },

    /// `verify`: an entry differs from what version.json records.
    #[error("{path} changed since the dist was stamped ({change}): restore it or re-stamp")]
    EntryChanged {
        /// The entry.
        path: String,
        /// What differs, e.g. "size 10 -> 12".
        change: String,
    },

    /// `verify`: the build hash differs but no entry does (version.json was edited, or has
    /// no manifest list to compare with).
    #[error("{VERSION_FILE} records build hash {recorded} but the content hashes to {actual}: re-stamp the dist")]
    HashMismatch {
        /// buildHash in version.json.
        recorded: String,
        /// Hash of the content on disk.
        actual: String,
    },

    /// Another process (or another `ReleaseStore` in this one) has the release store open.
    #[error("the release store in {} is in use by another process (a running node?): stop it, or use another data directory", data_dir.display())]
    StoreLocked {
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
    #[error("manifest {} is not valid: {reason}: the release store is damaged; remove releases/{hash} and manifests/{hash}.json, then install the release again", path.display())]
    BadManifestFile {
        /// The file.
        path: PathBuf,
        /// The release it describes.
        hash: String,
        /// The parse error.
        reason: String,
    },

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
}

impl DistError {
    /// The error without [`DistError::InDist`] context wrappers, for matching on the cause.
    pub fn innermost(&self) -> &DistError {
        match self {
            DistError::InDist { error, .. } => error.innermost(),
            other => other,
        }
    }

    /// True when `verify` ran fine and found that the content does not match version.json
    /// (as opposed to being unable to check at all). The CLI maps this to exit status 1.
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self.innermost(),
            DistError::NotStamped
                | DistError::EntryMissing { .. }
                | DistError::EntryExtra { .. }
                | DistError::EntryChanged { .. }
                | DistError::HashMismatch { .. }
        )
    }

    /// Wraps `self` with the dist directory it concerns.
    pub(crate) fn in_dist(self, dir: &std::path::Path) -> DistError {
        DistError::InDist {
            dir: dir.to_path_buf(),
            error: Box::new(self),
        }
    }
}
