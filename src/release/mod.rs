//! Release content ("dists"): what a dist may contain, its content hash, and version.json.
//!
//! A dist is a directory tree holding everything one release of `cluster` needs on a host,
//! at minimum the binary `bin/cluster`. Its identity is the *build hash*: SHA-256 over the
//! sorted list of entries (relative path, kind, permission bits, size, content SHA-256),
//! so it is the same on every machine whatever the mtimes or owners.
//!
//! - [`manifest`]: the pure core. The [`Manifest`] type, its build hash, and
//!   [`Manifest::validate`], the sanitizer for manifests that arrive over the network.
//! - [`delta`]: a manifest sent as its difference from a release the receiver holds
//!   ([`ManifestDelta`]); pure, and trusted only through the build hash it rebuilds.
//! - [`scan`](mod@scan): the filesystem edge that walks a directory into a manifest, hashing
//!   and content-defined chunking files on every core.
//! - [`version`]: `version.json`, written by `cluster dist stamp` and checked by `verify`.
//! - [`signature`]: the pure core of signed releases: what a signature covers, signing, and
//!   [`signature::check`], the one check nodes run before they install, offer or activate
//!   a release. [`keys`]: the key files (`cluster dist keygen`, `--sign`, `--release-key`).
//! - [`store`]: a node's releases on disk (`<data>/releases/<hash>/`, the `current` and
//!   `previous` links, `manifests/`): open and repair, activate, restore, commit, prune.
//!   Crash-safe; releases are immutable.
//! - `staging`: putting a release in ([`Staging`], [`ReleaseStore::begin`],
//!   [`ReleaseStore::install_dir`]): assemble in `staging/`, verify, rename into place.
//! - `local`: the content held releases supply: what a manifest still misses, hard links
//!   of unchanged files, and [`ReleaseStore::read_chunk`] for peers.
//!
//! Errors, one enum per concern, each keeping its causes as `source`:
//! [`ManifestError`] (pure: what `validate` refuses), [`DistError`] (a dist directory on
//! disk: scan, stamp, verify), [`StoreError`] (the release store), [`SyncError`] (getting
//! a release's content in: received chunks, peers, the assembled tree),
//! [`SignatureError`] (pure: a release not signed by a trusted key), [`KeyError`] (a key
//! file). `rpc::status` gives each variant a service answers with its gRPC code.
//!
//! Architecture invariants: `manifest` and `signature` do no I/O; every path the rest of
//! the system writes to disk from an untrusted manifest has passed [`Manifest::validate`]
//! first; a node that trusts release keys runs no release that [`signature::check`]
//! refuses.

pub mod delta;
pub mod keys;
mod local;
pub mod manifest;
pub mod scan;
pub mod signature;
mod staging;
pub mod store;
#[cfg(test)]
pub(crate) mod test_data;
pub mod version;

use std::path::PathBuf;

pub use delta::{DeltaError, ManifestAnswer, ManifestDelta};
pub use keys::KeyError;
pub use manifest::{
    build_hash_of, chunk_offsets, Chunk, Entry, EntryKind, EntrySummary, Limits, Manifest,
    ManifestError, SummaryKind, BINARY_PATH, VERSION_FILE,
};
pub use scan::{scan, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN};
pub use signature::{SignatureError, TrustedKeys};
pub use staging::{Staging, SyncError};
pub use store::{ReleaseStore, StoreError, DEFAULT_KEEP_OLD};
pub use version::{hash, scan_signed, stamp, stamp_from, stamp_signed, verify, VersionInfo};

/// What is wrong with a dist directory on disk, as scanning, stamping, hashing and
/// verifying find it (`cluster dist`, and installing a dist into a release store).
///
/// Entry-level variants name the entry by its path relative to the dist root; errors found
/// while looking at a directory are wrapped in [`DistError::InDist`], which names it.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Context: `error` happened while reading the dist at `dir`.
    #[error("dist {}", dir.display())]
    InDist {
        /// The dist root as the caller gave it.
        dir: PathBuf,
        /// What went wrong there.
        #[source]
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

    /// The dist breaks a manifest rule (a path, a mode, a symlink, bin/cluster, a limit).
    #[error(transparent)]
    Invalid(#[from] ManifestError),

    /// `verify` on a dist without version.json.
    #[error("{VERSION_FILE} is missing: run `cluster dist stamp <dir>` first")]
    NotStamped,

    /// `version.json` exists but cannot be parsed.
    #[error("{VERSION_FILE} is not valid: re-create it with `cluster dist stamp <dir>`")]
    BadVersionFile {
        /// The parse error.
        #[source]
        source: serde_json::Error,
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
