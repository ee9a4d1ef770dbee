//! The manifest of a dist: its entries, its build hash, and the sanitizer for untrusted ones.
//!
//! Pure: no I/O here. Manifests arrive from other nodes over the network, so everything the
//! agent later turns into a path on disk must pass [`Manifest::validate`] first. The rules
//! are deliberately narrower than what a filesystem allows: plain relative names, regular
//! files, directories, and relative symlinks that stay inside the dist.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::signature::Signature;

/// Name of the file, at the dist root, that records the build hash. It is derived from the
/// manifest, so it is never part of one.
pub const VERSION_FILE: &str = "version.json";

/// Where every dist carries the `cluster` binary that nodes run.
pub const BINARY_PATH: &str = "bin/cluster";

/// Largest chunk a manifest may declare. Sync holds a chunk in memory, so an untrusted
/// manifest must not be able to ask for a huge one; this is fastcdc's own upper bound and
/// well above what [`super::scan()`] produces.
pub const MAX_CHUNK_BYTES: u64 = 16 * 1024 * 1024;

/// Linux's PATH_MAX and NAME_MAX: longer names cannot be materialized anyway.
const MAX_PATH_BYTES: usize = 4096;
const MAX_NAME_BYTES: usize = 255;

/// Linux gives up after 40 symlink hops (ELOOP); so do we when resolving targets.
const MAX_SYMLINK_HOPS: usize = 40;

/// Caps on what a dist may hold, so a bad or hostile manifest cannot fill a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of all regular file sizes, in bytes.
    pub max_total_bytes: u64,
    /// Number of entries (files, directories and symlinks).
    pub max_entries: usize,
}

impl Default for Limits {
    /// 8 GiB and 100 000 entries: far above a real release, far below a full disk.
    fn default() -> Self {
        Limits {
            max_total_bytes: 8 * 1024 * 1024 * 1024,
            max_entries: 100_000,
        }
    }
}

/// The content of a dist: every entry below the root except `version.json`, sorted by path,
/// and the release's signature when it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Sorted byte-wise by `path`, each path once; [`Manifest::validate`] checks both.
    pub entries: Vec<Entry>,
    /// Who signed the release, and the signature (`cluster dist stamp --sign`). Not part of
    /// the build hash, which it signs; it travels with the manifest (uploads, prepares,
    /// the replicated deployment) so every node can check it. [`super::signature::check`]
    /// judges it; [`Manifest::validate`] does not look at it.
    /// (Boxed: a manifest rides inside replicated commands, which stay small by value.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Box<Signature>>,
}

/// One file, directory or symlink of a dist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the dist root, `/`-separated, no `.`/`..`/empty components.
    pub path: String,
    /// What it is, with the attributes that count for the build hash.
    pub kind: EntryKind,
}

/// The kinds of entry a dist may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A directory.
    Dir {
        /// Permission bits (at most 0o777; no setuid/setgid/sticky).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Permission bits (at most 0o777; no setuid/setgid/sticky).
        mode: u32,
        /// Length in bytes; equals the sum of the chunk sizes.
        size: u64,
        /// SHA-256 of the whole content, 64 lowercase hex characters. The build hash uses
        /// this, never the chunks, so chunking parameters can change without changing it.
        sha256: String,
        /// Content-defined pieces in file order; sync fetches only those a node lacks.
        /// Offsets follow from the sizes (see [`chunk_offsets`]).
        chunks: Vec<Chunk>,
    },
    /// A symbolic link.
    Symlink {
        /// Relative target; must resolve inside the dist.
        target: String,
    },
}

/// A content-defined piece of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// SHA-256 of the piece, 64 lowercase hex characters.
    pub sha256: String,
    /// Length in bytes (at least 1).
    pub size: u64,
}

/// Pairs each chunk with its byte offset in the file.
pub fn chunk_offsets(chunks: &[Chunk]) -> impl Iterator<Item = (u64, &Chunk)> {
    chunks.iter().scan(0u64, |offset, chunk| {
        let start = *offset;
        *offset = offset.saturating_add(chunk.size);
        Some((start, chunk))
    })
}

/// What kind of entry a summary row describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SummaryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symlink.
    Symlink,
}

impl SummaryKind {
    /// The word used in version.json.
    pub fn as_str(self) -> &'static str {
        match self {
            SummaryKind::Dir => "dir",
            SummaryKind::File => "file",
            SummaryKind::Symlink => "symlink",
        }
    }

    fn from_word(word: &str) -> Option<SummaryKind> {
        match word {
            "dir" => Some(SummaryKind::Dir),
            "file" => Some(SummaryKind::File),
            "symlink" => Some(SummaryKind::Symlink),
            _ => None,
        }
    }
}

/// Exactly the fields of an entry that the build hash covers: no chunks.
///
/// Serialized as a JSON array `[path, kind, mode, size, content]`, with `mode` as an octal
/// string ("0755") and `content` being the SHA-256 for files, the target for symlinks and
/// empty for directories. Directories and symlinks have size 0; symlinks have mode 0 because
/// their permission bits mean nothing and differ between systems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySummary {
    /// Relative path.
    pub path: String,
    /// Entry kind.
    pub kind: SummaryKind,
    /// Permission bits (0 for symlinks).
    pub mode: u32,
    /// File size (0 for directories and symlinks).
    pub size: u64,
    /// File SHA-256, symlink target, or "" for a directory.
    pub content: String,
}

impl Serialize for EntrySummary {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.path,
            self.kind.as_str(),
            format!("{:04o}", self.mode),
            self.size,
            &self.content,
        )
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EntrySummary {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (path, kind, mode, size, content) =
            <(String, String, String, u64, String)>::deserialize(deserializer)?;
        let kind = SummaryKind::from_word(&kind).ok_or_else(|| {
            D::Error::custom(format!(
                "entry {path:?}: unknown kind {kind:?} (expected dir, file or symlink)"
            ))
        })?;
        let mode = u32::from_str_radix(&mode, 8).map_err(|_| {
            D::Error::custom(format!(
                "entry {path:?}: mode {mode:?} is not an octal number"
            ))
        })?;
        Ok(EntrySummary {
            path,
            kind,
            mode,
            size,
            content,
        })
    }
}

impl Entry {
    /// The fields of this entry that the build hash covers.
    pub fn summary(&self) -> EntrySummary {
        let (kind, mode, size, content) = match &self.kind {
            EntryKind::Dir { mode } => (SummaryKind::Dir, *mode, 0, String::new()),
            EntryKind::File {
                mode, size, sha256, ..
            } => (SummaryKind::File, *mode, *size, sha256.clone()),
            EntryKind::Symlink { target } => (SummaryKind::Symlink, 0, 0, target.clone()),
        };
        EntrySummary {
            path: self.path.clone(),
            kind,
            mode,
            size,
            content,
        }
    }
}

/// The build hash of a list of entry summaries, as lowercase hex.
///
/// Every field is framed (a kind byte, fixed-width big-endian integers, length-prefixed
/// strings) after a versioned domain tag and the entry count, so two different lists can
/// never produce the same byte stream. Rows are hashed in path order whatever order they
/// come in, so the hash depends only on the set of entries.
pub fn build_hash_of(rows: &[EntrySummary]) -> String {
    let mut ordered: Vec<&EntrySummary> = rows.iter().collect();
    ordered.sort_by(|a, b| a.path.cmp(&b.path));

    let mut hasher = Sha256::new();
    hasher.update(b"cluster dist build hash v1\0");
    hasher.update((ordered.len() as u64).to_be_bytes());
    for row in ordered {
        hash_str(&mut hasher, &row.path);
        hasher.update([match row.kind {
            SummaryKind::Dir => b'd',
            SummaryKind::File => b'f',
            SummaryKind::Symlink => b'l',
        }]);
        hasher.update(row.mode.to_be_bytes());
        hasher.update(row.size.to_be_bytes());
        hash_str(&mut hasher, &row.content);
    }
    hex::encode(hasher.finalize())
}

fn hash_str(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_be_bytes());
    hasher.update(text.as_bytes());
}

impl Manifest {
    /// A manifest of `entries` put in path order.
    pub fn from_unsorted(mut entries: Vec<Entry>) -> Manifest {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest {
            entries,
            signature: None,
        }
    }

    /// The entry at `path`, if any (binary search: the entries must be sorted).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|entry| entry.path.as_str().cmp(path))
            .ok()
            .map(|index| &self.entries[index])
    }

    /// Number of regular files.
    pub fn file_count(&self) -> u64 {
        self.entries
            .iter()
            .filter(|entry| matches!(entry.kind, EntryKind::File { .. }))
            .count() as u64
    }

    /// Sum of regular file sizes (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| match entry.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The build-hash fields of every entry, in manifest order.
    pub fn summary(&self) -> Vec<EntrySummary> {
        self.entries.iter().map(Entry::summary).collect()
    }

    /// SHA-256 (hex) over the sorted (path, kind, mode, size, content hash or link target)
    /// of every entry. Independent of chunk boundaries, mtimes, owners and the machine.
    pub fn build_hash(&self) -> String {
        build_hash_of(&self.summary())
    }

    /// Checks everything an untrusted manifest could get wrong; see the module doc.
    ///
    /// Reports the first problem found, checking paths and order for all entries before
    /// their contents, so the error is deterministic for a given manifest.
    pub fn validate(&self, limits: &Limits) -> Result<(), ManifestError> {
        if self.entries.len() > limits.max_entries {
            return Err(ManifestError::TooManyEntries {
                limit: limits.max_entries,
            });
        }

        let mut kinds: HashMap<&str, &EntryKind> = HashMap::with_capacity(self.entries.len());
        let mut previous: Option<&str> = None;
        for entry in &self.entries {
            let path = entry.path.as_str();
            check_path(path).map_err(|problem| ManifestError::BadPath {
                path: path.to_owned(),
                problem,
            })?;
            if path == VERSION_FILE {
                return Err(ManifestError::VersionFileInManifest);
            }
            if kinds.insert(path, &entry.kind).is_some() {
                return Err(ManifestError::DuplicatePath {
                    path: path.to_owned(),
                });
            }
            if let Some(previous) = previous {
                if previous > path {
                    return Err(ManifestError::Unsorted {
                        path: path.to_owned(),
                        previous: previous.to_owned(),
                    });
                }
            }
            previous = Some(path);
        }

        let mut total_bytes: u64 = 0;
        for entry in &self.entries {
            let path = entry.path.as_str();
            if let Some((parent, _)) = path.rsplit_once('/') {
                match kinds.get(parent) {
                    None => {
                        return Err(ManifestError::MissingParent {
                            path: path.to_owned(),
                            parent: parent.to_owned(),
                        })
                    }
                    Some(EntryKind::Dir { .. }) => {}
                    Some(_) => {
                        return Err(ManifestError::ParentNotDir {
                            path: path.to_owned(),
                            parent: parent.to_owned(),
                        })
                    }
                }
            }
            match &entry.kind {
                EntryKind::Dir { mode } => check_mode(path, *mode)?,
                EntryKind::File {
                    mode,
                    size,
                    sha256,
                    chunks,
                } => {
                    check_mode(path, *mode)?;
                    check_file_content(path, *size, sha256, chunks)?;
                    total_bytes = total_bytes.saturating_add(*size);
                    if total_bytes > limits.max_total_bytes {
                        return Err(ManifestError::TooLarge {
                            total: total_bytes,
                            limit: limits.max_total_bytes,
                        });
                    }
                }
                EntryKind::Symlink { target } => {
                    let bad = |problem| ManifestError::BadSymlink {
                        path: path.to_owned(),
                        target: target.clone(),
                        problem,
                    };
                    check_symlink_target(target).map_err(bad)?;
                    match resolve_inside(path, target, &kinds) {
                        Ok(()) => {}
                        Err(Unresolvable::Escapes) => {
                            return Err(ManifestError::SymlinkEscapes {
                                path: path.to_owned(),
                                target: target.clone(),
                            })
                        }
                        Err(Unresolvable::Loop) => return Err(bad("it is part of a symlink loop")),
                    }
                }
            }
        }

        match kinds.get(BINARY_PATH) {
            None => Err(ManifestError::MissingBinary),
            Some(EntryKind::File { mode, .. }) if mode & 0o100 == 0 => {
                Err(ManifestError::BinaryNotExecutable { mode: *mode })
            }
            Some(EntryKind::File { .. }) => Ok(()),
            Some(_) => Err(ManifestError::BinaryNotFile),
        }
    }
}

/// Rules for entry paths. Returns what is wrong, phrased to follow "entry <path>: ".
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return Err("is longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    check_characters(path)?;
    for name in path.split('/') {
        match name {
            "" => return Err("has an empty component (a doubled or trailing /)"),
            "." => return Err("has a `.` component"),
            ".." => return Err("has a `..` component"),
            name if name.len() > MAX_NAME_BYTES => {
                return Err("has a component longer than 255 bytes")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Rules shared by paths and symlink targets: characters that are legal on Linux but make
/// names ambiguous in logs, shells or on other systems.
fn check_characters(text: &str) -> Result<(), &'static str> {
    if text.contains('\0') {
        return Err("contains a NUL byte");
    }
    if text.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if text.contains('\\') {
        return Err("contains a backslash");
    }
    Ok(())
}

/// Syntax of a symlink target; where it points is checked by [`resolve_inside`].
fn check_symlink_target(target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("the target is empty");
    }
    if target.len() > MAX_PATH_BYTES {
        return Err("the target is longer than 4096 bytes");
    }
    if target.starts_with('/') {
        return Err("the target is absolute");
    }
    check_characters(target)?;
    if target.split('/').any(str::is_empty) {
        return Err("the target has an empty component (a doubled or trailing /)");
    }
    Ok(())
}

fn check_mode(path: &str, mode: u32) -> Result<(), ManifestError> {
    let problem = if mode & !0o7777 != 0 {
        "bits beyond 0o7777 are set: a mode holds only permission bits"
    } else if mode & 0o6000 != 0 {
        "it is setuid or setgid, which a dist may not carry: chmod u-s,g-s"
    } else if mode & 0o1000 != 0 {
        "it has the sticky bit, which a dist may not carry: chmod -t"
    } else {
        return Ok(());
    };
    Err(ManifestError::BadMode {
        path: path.to_owned(),
        mode,
        problem,
    })
}

fn check_file_content(
    path: &str,
    size: u64,
    sha256: &str,
    chunks: &[Chunk],
) -> Result<(), ManifestError> {
    if !is_sha256_hex(sha256) {
        return Err(ManifestError::BadHash {
            path: path.to_owned(),
            what: "content hash".to_owned(),
            hash: sha256.to_owned(),
        });
    }
    let mut chunk_total: u64 = 0;
    for (index, chunk) in chunks.iter().enumerate() {
        if chunk.size == 0 || chunk.size > MAX_CHUNK_BYTES {
            return Err(ManifestError::BadChunkSize {
                path: path.to_owned(),
                index,
                size: chunk.size,
                max: MAX_CHUNK_BYTES,
            });
        }
        if !is_sha256_hex(&chunk.sha256) {
            return Err(ManifestError::BadHash {
                path: path.to_owned(),
                what: format!("chunk {index} hash"),
                hash: chunk.sha256.clone(),
            });
        }
        chunk_total = chunk_total.saturating_add(chunk.size);
    }
    if chunk_total != size {
        return Err(ManifestError::ChunkSizeMismatch {
            path: path.to_owned(),
            size,
            chunk_total,
        });
    }
    Ok(())
}

/// A SHA-256 digest as written everywhere in manifests: 64 lowercase hex characters.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

enum Unresolvable {
    Escapes,
    Loop,
}

/// Resolves `target` from the directory holding `link` the way the kernel would, following
/// symlinks the manifest itself defines, and fails if it ever climbs above the root.
///
/// A purely lexical check is not enough: with `s -> .` at the root, `t -> s/..` is lexically
/// the root but really its parent. Components the manifest does not list are treated as
/// plain directories, which is the lexical rule (and stricter than the kernel, which would
/// stop there).
fn resolve_inside(
    link: &str,
    target: &str,
    kinds: &HashMap<&str, &EntryKind>,
) -> Result<(), Unresolvable> {
    let mut position: Vec<&str> = link.split('/').collect();
    position.pop();
    // Components still to walk, last one on top.
    let mut pending: Vec<&str> = target.split('/').rev().collect();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        match name {
            "" | "." => {}
            ".." => {
                if position.pop().is_none() {
                    return Err(Unresolvable::Escapes);
                }
            }
            name => {
                position.push(name);
                if let Some(EntryKind::Symlink { target: next }) =
                    kinds.get(position.join("/").as_str())
                {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Unresolvable::Loop);
                    }
                    if next.starts_with('/') {
                        return Err(Unresolvable::Escapes);
                    }
                    position.pop();
                    pending.extend(next.split('/').rev());
                }
            }
        }
    }
    Ok(())
}

/// What is wrong with a manifest: the rules [`Manifest::validate`] enforces on every
/// manifest, local or untrusted, and that scanning a dist checks before reading content.
///
/// Pure: every variant names an entry by its path relative to the dist root, and none
/// carries an I/O error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks that an error is the expected one.
    type Expect = fn(&ManifestError) -> bool;

    fn hex_of(byte: u8) -> String {
        hex::encode([byte; 32])
    }

    fn dir(path: &str) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::Dir { mode: 0o755 },
        }
    }

    fn file(path: &str, mode: u32, chunk_sizes: &[u64]) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::File {
                mode,
                size: chunk_sizes.iter().sum(),
                sha256: hex_of(path.len() as u8),
                chunks: chunk_sizes
                    .iter()
                    .enumerate()
                    .map(|(index, &size)| Chunk {
                        sha256: hex_of(index as u8),
                        size,
                    })
                    .collect(),
            },
        }
    }

    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::Symlink {
                target: target.to_owned(),
            },
        }
    }

    /// The smallest valid dist.
    fn minimal() -> Vec<Entry> {
        vec![dir("bin"), file("bin/cluster", 0o755, &[10, 20])]
    }

    fn with(extra: Vec<Entry>) -> Manifest {
        let mut entries = minimal();
        entries.extend(extra);
        Manifest::from_unsorted(entries)
    }

    fn check(manifest: &Manifest) -> Result<(), ManifestError> {
        manifest.validate(&Limits::default())
    }

    #[test]
    fn minimal_dist_is_valid() {
        check(&with(vec![])).unwrap();
    }

    #[test]
    fn accepts_files_dirs_and_inside_symlinks() {
        let manifest = with(vec![
            dir("lib"),
            dir("lib/deep"),
            file("lib/deep/libx.so.1", 0o644, &[5]),
            link("lib/deep/libx.so", "libx.so.1"),
            link("lib/deep/up", "../../bin/cluster"),
            link("lib/root", ".."),
            link("here", "./bin/../lib"),
            file("empty", 0o600, &[]),
            file("naïve name", 0o644, &[1]),
        ]);
        check(&manifest).unwrap();
    }

    /// Rejection table: (why, manifest, the innermost error it must give).
    #[test]
    fn rejects_bad_manifests() {
        let cases: Vec<(&str, Manifest, Expect)> = vec![
            ("empty path", with(vec![file("", 0o644, &[1])]), |e| {
                matches!(
                    e,
                    ManifestError::BadPath {
                        problem: "is empty",
                        ..
                    }
                )
            }),
            ("absolute", with(vec![file("/etc", 0o644, &[1])]), |e| {
                matches!(
                    e,
                    ManifestError::BadPath {
                        problem: "is absolute",
                        ..
                    }
                )
            }),
            (
                "dotdot",
                with(vec![file("bin/../x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("`..`")),
            ),
            (
                "dot",
                with(vec![file("bin/./x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("`.`")),
            ),
            (
                "double slash",
                with(vec![file("bin//x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("empty")),
            ),
            (
                "trailing slash",
                with(vec![dir("lib/")]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("empty")),
            ),
            (
                "nul",
                with(vec![file("a\0b", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("NUL")),
            ),
            (
                "newline",
                with(vec![file("a\nb", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("control")),
            ),
            (
                "c1 control",
                with(vec![file("a\u{85}b", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("control")),
            ),
            (
                "backslash",
                with(vec![file("a\\b", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("backslash")),
            ),
            (
                "long name",
                with(vec![file(&"n".repeat(256), 0o644, &[1])]),
                |e| matches!(e, ManifestError::BadPath { problem, .. } if problem.contains("255")),
            ),
            (
                "duplicate",
                Manifest {
                    entries: vec![dir("bin"), dir("bin"), file("bin/cluster", 0o755, &[1])],
                    signature: None,
                },
                |e| matches!(e, ManifestError::DuplicatePath { path } if path == "bin"),
            ),
            (
                "unsorted",
                Manifest {
                    signature: None,
                    entries: vec![file("bin/cluster", 0o755, &[1]), dir("bin")],
                },
                |e| matches!(e, ManifestError::Unsorted { path, .. } if path == "bin"),
            ),
            (
                "no parent",
                with(vec![file("lib/x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::MissingParent { parent, .. } if parent == "lib"),
            ),
            (
                "parent is a file",
                with(vec![file("lib", 0o644, &[1]), file("lib/x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::ParentNotDir { parent, .. } if parent == "lib"),
            ),
            (
                "parent is a symlink",
                with(vec![link("lib", "bin"), file("lib/x", 0o644, &[1])]),
                |e| matches!(e, ManifestError::ParentNotDir { parent, .. } if parent == "lib"),
            ),
            (
                "absolute symlink",
                with(vec![link("l", "/etc/passwd")]),
                |e| matches!(e, ManifestError::BadSymlink { problem, .. } if problem.contains("absolute")),
            ),
            ("escaping symlink", with(vec![link("l", "../x")]), |e| {
                matches!(e, ManifestError::SymlinkEscapes { .. })
            }),
            (
                "deep escaping symlink",
                with(vec![link("bin/l", "../nope/../../x")]),
                |e| matches!(e, ManifestError::SymlinkEscapes { .. }),
            ),
            (
                "escape through another symlink",
                with(vec![link("s", "."), link("t", "s/..")]),
                |e| matches!(e, ManifestError::SymlinkEscapes { path, .. } if path == "t"),
            ),
            (
                "symlink loop",
                with(vec![link("a", "b"), link("b", "a")]),
                |e| matches!(e, ManifestError::BadSymlink { problem, .. } if problem.contains("loop")),
            ),
            ("empty target", with(vec![link("l", "")]), |e| {
                matches!(e, ManifestError::BadSymlink { .. })
            }),
            ("nul in target", with(vec![link("l", "a\0")]), |e| {
                matches!(e, ManifestError::BadSymlink { .. })
            }),
            ("setuid", with(vec![file("s", 0o4755, &[1])]), |e| {
                matches!(e, ManifestError::BadMode { mode: 0o4755, .. })
            }),
            (
                "setgid dir",
                with(vec![Entry {
                    path: "d".into(),
                    kind: EntryKind::Dir { mode: 0o2755 },
                }]),
                |e| matches!(e, ManifestError::BadMode { .. }),
            ),
            (
                "sticky",
                with(vec![Entry {
                    path: "d".into(),
                    kind: EntryKind::Dir { mode: 0o1777 },
                }]),
                |e| matches!(e, ManifestError::BadMode { .. }),
            ),
            (
                "file type bits",
                with(vec![file("f", 0o100644, &[1])]),
                |e| matches!(e, ManifestError::BadMode { .. }),
            ),
            (
                "size mismatch",
                {
                    let mut manifest = with(vec![file("f", 0o644, &[3, 4])]);
                    if let EntryKind::File { size, .. } = &mut manifest.entries[2].kind {
                        *size = 8;
                    }
                    manifest
                },
                |e| {
                    matches!(
                        e,
                        ManifestError::ChunkSizeMismatch {
                            size: 8,
                            chunk_total: 7,
                            ..
                        }
                    )
                },
            ),
            ("empty chunk", with(vec![file("f", 0o644, &[3, 0])]), |e| {
                matches!(e, ManifestError::BadChunkSize { index: 1, .. })
            }),
            (
                "huge chunk",
                with(vec![file("f", 0o644, &[MAX_CHUNK_BYTES + 1])]),
                |e| matches!(e, ManifestError::BadChunkSize { .. }),
            ),
            (
                "uppercase hash",
                {
                    let mut manifest = with(vec![file("f", 0o644, &[3])]);
                    if let EntryKind::File { sha256, .. } = &mut manifest.entries[2].kind {
                        *sha256 = "AB".repeat(32);
                    }
                    manifest
                },
                |e| matches!(e, ManifestError::BadHash { .. }),
            ),
            (
                "short chunk hash",
                {
                    let mut manifest = with(vec![file("f", 0o644, &[3])]);
                    if let EntryKind::File { chunks, .. } = &mut manifest.entries[2].kind {
                        chunks[0].sha256 = "ab".into();
                    }
                    manifest
                },
                |e| matches!(e, ManifestError::BadHash { what, .. } if what == "chunk 0 hash"),
            ),
            (
                "version.json",
                with(vec![file("version.json", 0o644, &[1])]),
                |e| matches!(e, ManifestError::VersionFileInManifest),
            ),
            (
                "no binary",
                Manifest::from_unsorted(vec![dir("bin")]),
                |e| matches!(e, ManifestError::MissingBinary),
            ),
            (
                "binary is a symlink",
                Manifest::from_unsorted(vec![
                    dir("bin"),
                    file("bin/real", 0o755, &[1]),
                    link("bin/cluster", "real"),
                ]),
                |e| matches!(e, ManifestError::BinaryNotFile),
            ),
            (
                "binary not executable",
                Manifest::from_unsorted(vec![dir("bin"), file("bin/cluster", 0o644, &[1])]),
                |e| matches!(e, ManifestError::BinaryNotExecutable { mode: 0o644 }),
            ),
        ];
        for (why, manifest, expected) in cases {
            match check(&manifest) {
                Ok(()) => panic!("{why}: accepted {manifest:?}"),
                Err(error) => assert!(expected(&error), "{why}: wrong error: {error}"),
            }
        }
    }

    #[test]
    fn enforces_limits() {
        let manifest = with(vec![file(
            "big",
            0o644,
            &[MAX_CHUNK_BYTES, MAX_CHUNK_BYTES],
        )]);
        let tight = Limits {
            max_total_bytes: MAX_CHUNK_BYTES,
            ..Limits::default()
        };
        assert!(matches!(
            manifest.validate(&tight),
            Err(ManifestError::TooLarge { limit, .. }) if limit == MAX_CHUNK_BYTES
        ));
        let few = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        assert!(matches!(
            manifest.validate(&few),
            Err(ManifestError::TooManyEntries { limit: 2 })
        ));
    }

    #[test]
    fn errors_name_the_entry_and_the_fix() {
        let error = check(&with(vec![link("bin/l", "../../etc")])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "symlink \"bin/l\" -> \"../../etc\" points outside the dist: \
             symlinks must stay inside the dist"
        );
    }

    #[test]
    fn chunk_offsets_follow_sizes() {
        let chunks = [3, 4, 5].map(|size| Chunk {
            sha256: hex_of(0),
            size,
        });
        let offsets: Vec<u64> = chunk_offsets(&chunks).map(|(offset, _)| offset).collect();
        assert_eq!(offsets, [0, 3, 7]);
    }

    #[test]
    fn summary_round_trips_through_json() {
        let rows = with(vec![link("l", "bin")]).summary();
        let text = serde_json::to_string(&rows).unwrap();
        assert!(text.contains(r#"["bin","dir","0755",0,""]"#), "{text}");
        let back: Vec<EntrySummary> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn build_hash_frames_fields() {
        // Without framing, ("ab", "c") and ("a", "bc") would hash the same bytes.
        let one = build_hash_of(&[row("ab", SummaryKind::Symlink, "c")]);
        let two = build_hash_of(&[row("a", SummaryKind::Symlink, "bc")]);
        assert_ne!(one, two);
        assert_eq!(one.len(), 64);
    }

    fn row(path: &str, kind: SummaryKind, content: &str) -> EntrySummary {
        EntrySummary {
            path: path.into(),
            kind,
            mode: 0,
            size: 0,
            content: content.into(),
        }
    }

    // ---- property tests ----

    /// Names that are always valid components: never `.` or `..`; some non-ASCII.
    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_é-][a-zA-Z0-9_.é-]{0,6}"
    }

    #[derive(Debug, Clone)]
    enum Spec {
        Dir,
        File { mode: u32, chunk_sizes: Vec<u64> },
        Link { to: usize },
    }

    fn spec() -> impl Strategy<Value = Spec> {
        prop_oneof![
            Just(Spec::Dir),
            (
                prop::sample::select(vec![0o644u32, 0o755, 0o600, 0o400, 0o777, 0]),
                prop::collection::vec(1u64..5000, 0..4)
            )
                .prop_map(|(mode, chunk_sizes)| Spec::File { mode, chunk_sizes }),
            any::<usize>().prop_map(|to| Spec::Link { to }),
        ]
    }

    /// Grows a random tree: each node goes under an existing directory; symlinks point at an
    /// earlier entry through a relative path that climbs from the link's directory.
    fn valid_manifest() -> impl Strategy<Value = Manifest> {
        prop::collection::vec((any::<usize>(), name(), spec()), 0..40).prop_map(|nodes| {
            let mut entries = minimal();
            let mut dirs: Vec<String> = vec![String::new(), "bin".into()];
            for (parent_pick, name, spec) in nodes {
                let parent = dirs[parent_pick % dirs.len()].clone();
                let path = if parent.is_empty() {
                    name
                } else {
                    format!("{parent}/{name}")
                };
                if path == VERSION_FILE || entries.iter().any(|entry| entry.path == path) {
                    continue;
                }
                let entry = match spec {
                    Spec::Dir => {
                        dirs.push(path.clone());
                        dir(&path)
                    }
                    Spec::File { mode, chunk_sizes } => file(&path, mode, &chunk_sizes),
                    Spec::Link { to } => {
                        let pointee = &entries[to % entries.len()].path;
                        let climb = "../".repeat(path.matches('/').count());
                        link(&path, &format!("{climb}{pointee}"))
                    }
                };
                entries.push(entry);
            }
            Manifest::from_unsorted(entries)
        })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        DotDot,
        Absolute,
        ControlChar(char),
        Duplicate,
        EscapingSymlink(usize),
        SpecialBit(u32),
        SizeMismatch,
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            Just(Mutation::DotDot),
            Just(Mutation::Absolute),
            prop::sample::select(vec!['\0', '\n', '\t', '\x1b', '\x7f', '\u{9b}'])
                .prop_map(Mutation::ControlChar),
            Just(Mutation::Duplicate),
            (0usize..4).prop_map(Mutation::EscapingSymlink),
            prop::sample::select(vec![0o4000u32, 0o2000, 0o1000, 0o10000])
                .prop_map(Mutation::SpecialBit),
            Just(Mutation::SizeMismatch),
        ]
    }

    fn apply(manifest: &mut Manifest, mutation: &Mutation, pick: usize) {
        let index = pick % manifest.entries.len();
        let entries = &mut manifest.entries;
        match mutation {
            Mutation::DotDot => {
                let mut parts: Vec<&str> = entries[index].path.split('/').collect();
                parts.insert(pick % (parts.len() + 1), "..");
                entries[index].path = parts.join("/");
            }
            Mutation::Absolute => entries[index].path.insert(0, '/'),
            Mutation::ControlChar(c) => {
                let path = &mut entries[index].path;
                let at = path
                    .char_indices()
                    .map(|(at, _)| at)
                    .nth(pick % path.chars().count())
                    .unwrap_or(0);
                path.insert(at, *c);
            }
            Mutation::Duplicate => {
                let copy = entries[index].clone();
                entries.insert(index, copy);
            }
            Mutation::EscapingSymlink(extra_depth) => {
                // Put the link under a random directory and climb one level too many.
                let dirs: Vec<&str> = entries
                    .iter()
                    .filter(|entry| matches!(entry.kind, EntryKind::Dir { .. }))
                    .map(|entry| entry.path.as_str())
                    .collect();
                let parent = dirs[pick % dirs.len()].to_owned();
                let depth = parent.matches('/').count() + 1 + extra_depth;
                let escape = link(
                    &format!("{parent}/\u{10FFFF}escape"),
                    &format!("{}etc/passwd", "../".repeat(depth + 1)),
                );
                entries.push(escape);
                entries.sort_by(|a, b| a.path.cmp(&b.path));
            }
            Mutation::SpecialBit(bit) => {
                let targets: Vec<usize> = (0..entries.len())
                    .filter(|&i| !matches!(entries[i].kind, EntryKind::Symlink { .. }))
                    .collect();
                match &mut entries[targets[pick % targets.len()]].kind {
                    EntryKind::Dir { mode } | EntryKind::File { mode, .. } => *mode |= bit,
                    EntryKind::Symlink { .. } => unreachable!("filtered out"),
                }
            }
            Mutation::SizeMismatch => {
                let files: Vec<usize> = (0..entries.len())
                    .filter(|&i| matches!(entries[i].kind, EntryKind::File { .. }))
                    .collect();
                if let EntryKind::File { size, chunks, .. } =
                    &mut entries[files[pick % files.len()]].kind
                {
                    if pick.is_multiple_of(2) || chunks.is_empty() {
                        *size += 1;
                    } else {
                        let victim = pick % chunks.len();
                        chunks[victim].size += 1;
                    }
                }
            }
        }
    }

    /// Every way to change one build-hash field of the entry at `pick`.
    fn one_field_changes(manifest: &Manifest, pick: usize) -> Vec<(&'static str, Manifest)> {
        let index = pick % manifest.entries.len();
        let mut changes = Vec::new();
        let mut changed = |what, edit: &dyn Fn(&mut Entry)| {
            let mut copy = manifest.clone();
            edit(&mut copy.entries[index]);
            changes.push((what, copy));
        };
        changed("path", &|entry| entry.path.push('~'));
        match &manifest.entries[index].kind {
            EntryKind::Dir { .. } => {
                changed("mode", &|entry| {
                    if let EntryKind::Dir { mode } = &mut entry.kind {
                        *mode ^= 0o001;
                    }
                });
                changed("kind", &|entry| {
                    entry.kind = EntryKind::File {
                        mode: 0o755,
                        size: 0,
                        sha256: String::new(),
                        chunks: vec![],
                    }
                });
            }
            EntryKind::File { .. } => {
                changed("mode", &|entry| {
                    if let EntryKind::File { mode, .. } = &mut entry.kind {
                        *mode ^= 0o001;
                    }
                });
                changed("size", &|entry| {
                    if let EntryKind::File { size, .. } = &mut entry.kind {
                        *size += 1;
                    }
                });
                changed("content hash", &|entry| {
                    if let EntryKind::File { sha256, .. } = &mut entry.kind {
                        let flipped = if sha256.starts_with('0') { "1" } else { "0" };
                        sha256.replace_range(0..1, flipped);
                    }
                });
                changed("kind", &|entry| {
                    if let EntryKind::File { mode, .. } = entry.kind {
                        entry.kind = EntryKind::Dir { mode };
                    }
                });
            }
            EntryKind::Symlink { .. } => {
                changed("target", &|entry| {
                    if let EntryKind::Symlink { target } = &mut entry.kind {
                        target.push_str("/x");
                    }
                });
                changed("kind", &|entry| entry.kind = EntryKind::Dir { mode: 0 });
            }
        }
        changes
    }

    proptest! {
        #[test]
        fn generated_manifests_validate(manifest in valid_manifest()) {
            prop_assert!(check(&manifest).is_ok(), "{:?}", check(&manifest));
        }

        #[test]
        fn any_bad_mutation_is_rejected(
            manifest in valid_manifest(),
            mutation in mutation(),
            pick in any::<usize>(),
        ) {
            let mut bad = manifest.clone();
            apply(&mut bad, &mutation, pick);
            let error = check(&bad);
            // Only the mutated entry is wrong, so it must be the one reported, for its reason.
            let expected = matches!(
                (&mutation, &error),
                (Mutation::DotDot | Mutation::Absolute | Mutation::ControlChar(_), Err(ManifestError::BadPath { .. }))
                    | (Mutation::Duplicate, Err(ManifestError::DuplicatePath { .. }))
                    | (Mutation::EscapingSymlink(_), Err(ManifestError::SymlinkEscapes { .. }))
                    | (Mutation::SpecialBit(_), Err(ManifestError::BadMode { .. }))
                    | (Mutation::SizeMismatch, Err(ManifestError::ChunkSizeMismatch { .. }))
            );
            prop_assert!(expected, "{:?} gave {:?} for {:?}", mutation, error, bad);
        }

        #[test]
        fn build_hash_is_deterministic_and_ignores_chunking(manifest in valid_manifest()) {
            let hash = manifest.build_hash();
            prop_assert_eq!(&hash, &manifest.clone().build_hash());
            // The same files cut into one chunk each hash the same.
            let mut rechunked = manifest.clone();
            for entry in &mut rechunked.entries {
                if let EntryKind::File { size, chunks, .. } = &mut entry.kind {
                    *chunks = if *size == 0 {
                        vec![]
                    } else {
                        vec![Chunk { sha256: hex_of(0xee), size: *size }]
                    };
                }
            }
            prop_assert_eq!(&hash, &rechunked.build_hash());
            // Entry order does not matter either.
            let mut reversed = manifest.clone();
            reversed.entries.reverse();
            prop_assert_eq!(&hash, &reversed.build_hash());
        }

        #[test]
        fn build_hash_changes_with_any_field(manifest in valid_manifest(), pick in any::<usize>()) {
            let hash = manifest.build_hash();
            for (what, changed) in one_field_changes(&manifest, pick) {
                prop_assert_ne!(&hash, &changed.build_hash(), "changing the {} kept the hash", what);
            }
        }
    }
}
