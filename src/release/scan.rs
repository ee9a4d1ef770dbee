//! Reads a dist directory on disk into a [`Manifest`]: the filesystem edge of `dist`.
//!
//! One pass over each file computes both its SHA-256 and its content-defined chunks
//! (FastCDC 2020). Files are hashed on every core, largest first, so one big binary does not
//! finish alone at the end. Everything [`Manifest::validate`] would reject is reported
//! before any content is read, so a bad dist fails fast. [`scan_summary`] is the same scan
//! for what the build hash covers only: no chunks, so every byte is hashed once, not twice.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use fastcdc::v2020::FastCDC;
use sha2::{Digest, Sha256};
use walkdir::WalkDir;

use super::manifest::{Chunk, Entry, EntryKind, EntrySummary, Limits, Manifest, VERSION_FILE};
use super::{DistError, ManifestError};
use crate::fs::IoError;

/// Smallest chunk FastCDC cuts (except a file's last one).
pub const CHUNK_MIN: u32 = 16 * 1024;
/// Typical chunk size. Small enough that a local edit re-sends little, large enough that a
/// release of a few hundred MiB stays at a few thousand chunks.
pub const CHUNK_AVG: u32 = 64 * 1024;
/// Largest chunk FastCDC cuts, even in data with no cut points (e.g. runs of zeros).
pub const CHUNK_MAX: u32 = 256 * 1024;

/// Per-thread read buffer. Large reads keep syscalls rare; it must hold several
/// [`CHUNK_MAX`] so a chunk is always cut from bytes already in memory.
const READ_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Builds the manifest of the dist at `dir` (following `dir` itself if it is a symlink,
/// as `<data>/current` is). `version.json` at the root is skipped.
///
/// Fails, naming the path and the fix, on: a missing or unreadable directory, devices,
/// FIFOs, sockets, setuid/setgid/sticky bits, symlinks that leave the dist, names that are
/// not UTF-8 or break the manifest path rules, no regular executable `bin/cluster`, and more
/// than `limits` allow. Reads only; never writes.
pub fn scan(dir: &Path, limits: &Limits) -> Result<Manifest, DistError> {
    check_root(dir)?;
    scan_contents(dir, limits, Digests::ContentAndChunks, None).map_err(|error| error.in_dist(dir))
}

/// The rows of the dist's manifest that the build hash covers ([`Manifest::summary`]), with
/// every check of [`scan`], but each file hashed once, without FastCDC chunks and their
/// hashes: what `dist stamp`, `dist hash` and `dist verify` need. Moving a release needs
/// the chunks, so it uses [`scan`].
pub fn scan_summary(dir: &Path, limits: &Limits) -> Result<Vec<EntrySummary>, DistError> {
    scan_summary_knowing(dir, limits, None)
}

/// [`scan_summary`], taking the content hash of a file whose identity `known` maps
/// (content read whole earlier in the same staging) instead of reading it again.
pub(super) fn scan_summary_knowing(
    dir: &Path,
    limits: &Limits,
    known: Option<&Verified>,
) -> Result<Vec<EntrySummary>, DistError> {
    check_root(dir)?;
    scan_contents(dir, limits, Digests::ContentOnly, known)
        .map(|manifest| manifest.summary())
        .map_err(|error| error.in_dist(dir))
}

/// What a scan computes for each file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Digests {
    /// The file's SHA-256 and its chunks with theirs: a complete, valid manifest.
    ContentAndChunks,
    /// The file's SHA-256 only. The manifest has no chunk lists, so it does not validate
    /// and never leaves this module: [`scan_summary`] turns it into rows at once.
    ContentOnly,
}

/// Checks that `dir` exists and is a directory, following a symlink.
pub(super) fn check_root(dir: &Path) -> Result<(), DistError> {
    match fs::metadata(dir) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Err(DistError::DirMissing {
            dir: dir.to_path_buf(),
        }),
        Err(source) => Err(DistError::Io(IoError::new(
            "read",
            dir.to_path_buf(),
            source,
        ))),
        Ok(metadata) if !metadata.is_dir() => Err(DistError::NotADirectory {
            dir: dir.to_path_buf(),
        }),
        Ok(_) => Ok(()),
    }
}

/// What listing found at a path, before any content is read.
enum Listed {
    Dir { mode: u32 },
    File { mode: u32, size: u64 },
    Symlink { target: String },
}

struct ListedEntry {
    path: String,
    full_path: PathBuf,
    listed: Listed,
}

/// The hashes of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileDigest {
    sha256: String,
    chunks: Vec<Chunk>,
    bytes_read: u64,
}

fn scan_contents(
    dir: &Path,
    limits: &Limits,
    digests: Digests,
    known: Option<&Verified>,
) -> Result<Manifest, DistError> {
    let listing = list(dir, limits)?;

    // Validate the shape (paths, modes, symlinks, bin/cluster) before reading gigabytes:
    // a skeleton with empty files passes exactly when the real manifest's shape does.
    let skeleton = Manifest::from_unsorted(
        listing
            .iter()
            .map(|entry| Entry {
                path: entry.path.clone(),
                kind: match &entry.listed {
                    Listed::Dir { mode } => EntryKind::Dir { mode: *mode },
                    Listed::File { mode, .. } => EntryKind::File {
                        mode: *mode,
                        size: 0,
                        sha256: hex::encode(Sha256::digest([])),
                        chunks: Vec::new(),
                    },
                    Listed::Symlink { target } => EntryKind::Symlink {
                        target: target.clone(),
                    },
                },
            })
            .collect(),
    );
    skeleton.validate(limits)?;

    let files: Vec<&ListedEntry> = listing
        .iter()
        .filter(|entry| matches!(entry.listed, Listed::File { .. }))
        .collect();
    let mode = digests;
    let mut digests = digest_files(&files, mode, known)?.into_iter();

    let entries = listing
        .iter()
        .map(|entry| Entry {
            path: entry.path.clone(),
            kind: match &entry.listed {
                Listed::Dir { mode } => EntryKind::Dir { mode: *mode },
                Listed::File { mode, size } => {
                    let digest = digests.next().expect("one digest per listed file");
                    EntryKind::File {
                        mode: *mode,
                        size: *size,
                        sha256: digest.sha256,
                        chunks: digest.chunks,
                    }
                }
                Listed::Symlink { target } => EntryKind::Symlink {
                    target: target.clone(),
                },
            },
        })
        .collect();
    let manifest = Manifest::from_unsorted(entries);
    // Cheap, and keeps "scan output always validates" true by construction (the skeleton
    // above already checked everything but the chunks a content-only scan lacks).
    if mode == Digests::ContentAndChunks {
        manifest.validate(limits)?;
    }
    Ok(manifest)
}

/// Walks `dir` without following symlinks below it, enforcing the entry and size limits as
/// it goes so a huge tree is refused early.
fn list(dir: &Path, limits: &Limits) -> Result<Vec<ListedEntry>, DistError> {
    let mut listing = Vec::new();
    let mut total_bytes: u64 = 0;
    for item in WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = item.map_err(|error| {
            DistError::Io(IoError::new(
                "list",
                error.path().unwrap_or(dir).to_path_buf(),
                io::Error::from(error),
            ))
        })?;
        let full_path = entry.path().to_path_buf();
        let relative = full_path
            .strip_prefix(dir)
            .expect("walkdir yields paths below its root");
        let path = relative
            .to_str()
            .ok_or_else(|| DistError::NonUtf8Path {
                path: relative.to_path_buf(),
            })?
            .to_owned();
        let file_type = entry.file_type();

        if entry.depth() == 1 && path == VERSION_FILE {
            if file_type.is_file() {
                continue;
            }
            return Err(DistError::VersionFileNotRegular);
        }
        if listing.len() >= limits.max_entries {
            return Err(DistError::Invalid(ManifestError::TooManyEntries {
                limit: limits.max_entries,
            }));
        }

        let listed = if file_type.is_symlink() {
            let target = fs::read_link(&full_path).map_err(|source| {
                DistError::Io(IoError::new("read the symlink", full_path.clone(), source))
            })?;
            let target = target
                .to_str()
                .ok_or_else(|| DistError::NonUtf8Path {
                    path: relative.to_path_buf(),
                })?
                .to_owned();
            Listed::Symlink { target }
        } else if file_type.is_dir() || file_type.is_file() {
            let metadata = entry.metadata().map_err(|error| {
                DistError::Io(IoError::new(
                    "read metadata of",
                    full_path.clone(),
                    io::Error::from(error),
                ))
            })?;
            // Keep permission and setuid/setgid/sticky bits; validate rejects the latter.
            let mode = metadata.permissions().mode() & 0o7777;
            if file_type.is_dir() {
                Listed::Dir { mode }
            } else {
                let size = metadata.len();
                total_bytes = total_bytes.saturating_add(size);
                if total_bytes > limits.max_total_bytes {
                    return Err(DistError::Invalid(ManifestError::TooLarge {
                        total: total_bytes,
                        limit: limits.max_total_bytes,
                    }));
                }
                Listed::File { mode, size }
            }
        } else {
            let kind = if file_type.is_fifo() {
                "FIFO"
            } else if file_type.is_socket() {
                "socket"
            } else if file_type.is_block_device() {
                "block device"
            } else if file_type.is_char_device() {
                "character device"
            } else {
                "special file"
            };
            return Err(DistError::UnsupportedFileType { path, kind });
        };
        listing.push(ListedEntry {
            path,
            full_path,
            listed,
        });
    }
    listing.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(listing)
}

/// Hashes `files` on all cores and returns their digests in the same order.
///
/// Workers take the next file from a shared index over the files sorted largest first, so
/// the cores stay busy until the end. After a failure, workers stop taking new files; the
/// error reported is the one for the first failing path, so it does not depend on timing.
fn digest_files(
    files: &[&ListedEntry],
    mode: Digests,
    known: Option<&Verified>,
) -> Result<Vec<FileDigest>, DistError> {
    let size_of = |index: usize| match files[index].listed {
        Listed::File { size, .. } => size,
        _ => 0,
    };
    let failed = AtomicBool::new(false);
    let finished = on_every_core(files.len(), size_of, &failed, |index, buffer| {
        let entry = files[index];
        let result = digest_file(
            &entry.path,
            &entry.full_path,
            size_of(index),
            mode,
            known,
            buffer,
        );
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        result
    });

    let mut digests: Vec<Option<FileDigest>> = vec![None; files.len()];
    let mut first_error: Option<(usize, DistError)> = None;
    for (index, result) in finished {
        match result {
            Ok(digest) => digests[index] = Some(digest),
            Err(error) => {
                if first_error.as_ref().is_none_or(|(first, _)| index < *first) {
                    first_error = Some((index, error));
                }
            }
        }
    }
    if let Some((_, error)) = first_error {
        return Err(error);
    }
    Ok(digests
        .into_iter()
        .map(|digest| digest.expect("every file is digested when none failed"))
        .collect())
}

/// Runs `work` on items `0..count`, largest first, on every core, each worker with its own
/// read buffer, until done or `stop` is set; returns (index, result) in no order.
fn on_every_core<T: Send>(
    count: usize,
    size_of: impl Fn(usize) -> u64,
    stop: &AtomicBool,
    work: impl Fn(usize, &mut [u8]) -> T + Sync,
) -> Vec<(usize, T)> {
    let mut largest_first: Vec<usize> = (0..count).collect();
    largest_first.sort_by_cached_key(|&index| Reverse(size_of(index)));
    let workers = std::thread::available_parallelism()
        .map_or(1, |cores| cores.get())
        .min(count)
        .max(1);
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut done = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some(&index) = largest_first.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            done.push((index, work(index, &mut buffer)));
        }
        done
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
        handles
            .into_iter()
            .flat_map(|handle| match handle.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Which content a regular file holds, as far as its metadata tells: writing to a file
/// changes its mtime (or size); linking it elsewhere keeps all four. Good for as long as
/// one staging takes, not as a record kept on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileIdentity {
    pub(super) fn of(metadata: &fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
        }
    }
}

/// Content hashes of files read whole in this staging, by identity: a scan takes these
/// instead of reading the file again.
pub(super) type Verified = HashMap<FileIdentity, String>;

/// Hashes each file of `files` (path, expected SHA-256) on every core, until done or
/// `stop` is set; the identities of those that hash as expected and did not change while
/// read. A file that does not is left out, so a later scan reads it and finds the damage.
pub(super) fn verify_files(files: &[(PathBuf, String)], stop: &AtomicBool) -> Verified {
    let size_of = |index: usize| fs::symlink_metadata(&files[index].0).map_or(0, |m| m.len());
    on_every_core(files.len(), size_of, stop, |index, buffer| {
        let (path, expected) = &files[index];
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        let before = file.metadata().ok().filter(fs::Metadata::is_file)?;
        let digest = digest_content(&file, buffer).ok()?;
        let after = file.metadata().ok()?;
        let identity = FileIdentity::of(&before);
        (identity == FileIdentity::of(&after)
            && digest.bytes_read == before.len()
            && &digest.sha256 == expected)
            .then_some((identity, digest.sha256))
    })
    .into_iter()
    .filter_map(|(_, verified)| verified)
    .collect()
}

/// Hashes one regular file, checking that it is still the file that was listed.
fn digest_file(
    path: &str,
    full_path: &Path,
    expected_size: u64,
    mode: Digests,
    known: Option<&Verified>,
    buffer: &mut [u8],
) -> Result<FileDigest, DistError> {
    let io_error =
        |action| move |source| DistError::Io(IoError::new(action, full_path.to_path_buf(), source));
    // O_NOFOLLOW and O_NONBLOCK: if the file was swapped for a symlink or a FIFO since it
    // was listed, fail (or notice below) instead of following it or blocking forever.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(full_path)
        .map_err(io_error("open"))?;
    let metadata = file.metadata().map_err(io_error("read metadata of"))?;
    if !metadata.is_file() {
        return Err(DistError::ChangedWhileReading {
            path: path.to_owned(),
            change: "it is no longer a regular file".to_owned(),
        });
    }
    if mode == Digests::ContentOnly && metadata.len() == expected_size {
        if let Some(sha256) = known.and_then(|known| known.get(&FileIdentity::of(&metadata))) {
            return Ok(FileDigest {
                sha256: sha256.clone(),
                chunks: Vec::new(),
                bytes_read: expected_size,
            });
        }
    }
    // Reading one byte past the listed size is enough to tell that the file grew.
    let reader = (&file).take(expected_size.saturating_add(1));
    let digest = match mode {
        Digests::ContentAndChunks => digest_reader(reader, buffer),
        Digests::ContentOnly => digest_content(reader, buffer),
    }
    .map_err(io_error("read"))?;
    if digest.bytes_read != expected_size {
        return Err(DistError::ChangedWhileReading {
            path: path.to_owned(),
            change: format!(
                "it had {expected_size} bytes when listed, then {}{} when read",
                digest.bytes_read,
                if digest.bytes_read > expected_size {
                    " or more"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(digest)
}

/// The SHA-256 of everything `reader` yields, with no chunks.
fn digest_content<R: Read>(mut reader: R, buffer: &mut [u8]) -> io::Result<FileDigest> {
    let mut hasher = Sha256::new();
    let mut bytes_read: u64 = 0;
    loop {
        match reader.read(buffer) {
            Ok(0) => break,
            Ok(count) => {
                hasher.update(&buffer[..count]);
                bytes_read += count as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(FileDigest {
        sha256: hex::encode(hasher.finalize()),
        chunks: Vec::new(),
        bytes_read,
    })
}

/// One pass over `reader`: the SHA-256 of everything and the FastCDC chunks with theirs.
///
/// Chunks are cut only when at least [`CHUNK_MAX`] bytes (or the end of input) are in the
/// buffer. FastCDC never looks further than that from a chunk's start, so the cut points
/// are exactly those of chunking the whole input at once, whatever the buffer size.
fn digest_reader<R: Read>(mut reader: R, buffer: &mut [u8]) -> io::Result<FileDigest> {
    assert!(
        buffer.len() >= 2 * CHUNK_MAX as usize,
        "the read buffer must hold at least two maximal chunks"
    );
    let mut file_hasher = Sha256::new();
    // Set when the first chunk is the whole file, which then needs hashing only once.
    let mut single_chunk_digest: Option<String> = None;
    let mut chunks = Vec::new();
    let mut filled = 0;
    let mut bytes_read: u64 = 0;
    let mut at_end = false;
    while !at_end || filled > 0 {
        while !at_end && filled < buffer.len() {
            match reader.read(&mut buffer[filled..]) {
                Ok(0) => at_end = true,
                Ok(count) => {
                    filled += count;
                    bytes_read += count as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let mut start = 0;
        if filled > 0 {
            let chunker = FastCDC::new(&buffer[..filled], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
            while start < filled && (at_end || filled - start >= CHUNK_MAX as usize) {
                let (_, end) = chunker.cut(start, filled - start);
                let piece = &buffer[start..end];
                let sha256 = hex::encode(Sha256::digest(piece));
                if chunks.is_empty() && at_end && end == filled {
                    single_chunk_digest = Some(sha256.clone());
                } else {
                    file_hasher.update(piece);
                }
                chunks.push(Chunk {
                    sha256,
                    size: piece.len() as u64,
                });
                start = end;
            }
        }
        buffer.copy_within(start..filled, 0);
        filled -= start;
    }
    let sha256 = single_chunk_digest.unwrap_or_else(|| hex::encode(file_hasher.finalize()));
    Ok(FileDigest {
        sha256,
        chunks,
        bytes_read,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::manifest::build_hash_of;
    use std::collections::HashSet;
    use std::fs::File;
    use std::os::unix::fs::symlink;

    /// Checks that an error is the expected one.
    type Expect = fn(&DistError) -> bool;

    use crate::release::test_data::noise;

    fn digest(data: &[u8]) -> FileDigest {
        let mut buffer = vec![0; READ_BUFFER_BYTES];
        digest_reader(data, &mut buffer).unwrap()
    }

    fn write_file(path: &Path, content: &[u8], mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A valid dist: bin/cluster plus a few files.
    fn sample_dist() -> tempfile::TempDir {
        let dist = tempfile::tempdir().unwrap();
        let root = dist.path();
        write_file(&root.join("bin/cluster"), b"#!/bin/sh\nexit 0\n", 0o755);
        write_file(&root.join("lib/data.bin"), &noise(300_000, 7), 0o644);
        write_file(&root.join("lib/empty"), b"", 0o600);
        symlink("data.bin", root.join("lib/data.link")).unwrap();
        fs::set_permissions(root.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(root.join("lib"), fs::Permissions::from_mode(0o755)).unwrap();
        dist
    }

    fn scan_default(dir: &Path) -> Result<Manifest, DistError> {
        scan(dir, &Limits::default())
    }

    #[test]
    fn digest_matches_sha256_and_whole_input_chunking() {
        let data = noise(3 * 1024 * 1024 + 12_345, 1);
        // A buffer barely larger than the minimum forces many refills mid-chunk.
        let mut small_buffer = vec![0; 2 * CHUNK_MAX as usize + 1];
        let streamed = digest_reader(&data[..], &mut small_buffer).unwrap();
        assert_eq!(streamed, digest(&data));
        assert_eq!(streamed.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(streamed.bytes_read, data.len() as u64);

        let whole: Vec<u64> = FastCDC::new(&data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
            .map(|chunk| chunk.length as u64)
            .collect();
        let sizes: Vec<u64> = streamed.chunks.iter().map(|chunk| chunk.size).collect();
        assert_eq!(sizes, whole);
        for (offset, chunk) in super::super::manifest::chunk_offsets(&streamed.chunks) {
            let piece = &data[offset as usize..(offset + chunk.size) as usize];
            assert_eq!(chunk.sha256, hex::encode(Sha256::digest(piece)));
        }
    }

    #[test]
    fn small_and_empty_inputs() {
        let empty = digest(b"");
        assert_eq!(empty.sha256, hex::encode(Sha256::digest(b"")));
        assert!(empty.chunks.is_empty());

        let small = digest(b"hello");
        assert_eq!(small.sha256, hex::encode(Sha256::digest(b"hello")));
        assert_eq!(small.chunks.len(), 1);
        assert_eq!(small.chunks[0].sha256, small.sha256);
    }

    #[test]
    fn chunk_sizes_stay_in_bounds() {
        for data in [noise(2_000_000, 3), vec![0u8; 2_000_000]] {
            let digest = digest(&data);
            let (last, rest) = digest.chunks.split_last().unwrap();
            assert!(last.size <= CHUNK_MAX as u64);
            for chunk in rest {
                assert!((CHUNK_MIN as u64..=CHUNK_MAX as u64).contains(&chunk.size));
            }
        }
    }

    /// The point of content-defined chunking: a small edit re-sends little.
    #[test]
    fn one_kib_edit_in_20_mib_changes_at_most_two_chunks() {
        let original = noise(20 * 1024 * 1024, 42);
        let before: HashSet<String> = digest(&original)
            .chunks
            .into_iter()
            .map(|chunk| chunk.sha256)
            .collect();
        let middle = original.len() / 2;
        let replacement = noise(1024, 99);

        let mut overwritten = original.clone();
        overwritten[middle..middle + 1024].copy_from_slice(&replacement);
        let mut inserted = original.clone();
        inserted.splice(middle..middle, replacement.iter().copied());

        for (edit, data) in [("overwrite", overwritten), ("insert", inserted)] {
            let new_chunks = digest(&data)
                .chunks
                .into_iter()
                .filter(|chunk| !before.contains(&chunk.sha256))
                .count();
            assert!(
                (1..=2).contains(&new_chunks),
                "{edit}: {new_chunks} new chunks"
            );
        }
    }

    #[test]
    fn scans_a_dist() {
        let dist = sample_dist();
        fs::write(dist.path().join(VERSION_FILE), "{}").unwrap();
        let manifest = scan_default(dist.path()).unwrap();
        let paths: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/cluster",
                "lib",
                "lib/data.bin",
                "lib/data.link",
                "lib/empty"
            ]
        );
        assert_eq!(
            manifest.get("lib/data.link").unwrap().kind,
            EntryKind::Symlink {
                target: "data.bin".into()
            }
        );
        match &manifest.get("lib/data.bin").unwrap().kind {
            EntryKind::File {
                mode, size, sha256, ..
            } => {
                assert_eq!((*mode, *size), (0o644, 300_000));
                assert_eq!(*sha256, hex::encode(Sha256::digest(noise(300_000, 7))));
            }
            other => panic!("not a file: {other:?}"),
        }
    }

    #[test]
    fn summary_scan_hashes_like_the_full_scan_and_checks_the_same() {
        let dist = sample_dist();
        // Large enough for many chunks, so the two digest paths really differ.
        write_file(
            &dist.path().join("lib/big.bin"),
            &noise(3_000_000, 11),
            0o644,
        );
        let full = scan_default(dist.path()).unwrap();
        let rows = scan_summary(dist.path(), &Limits::default()).unwrap();
        assert_eq!(rows, full.summary());
        assert_eq!(build_hash_of(&rows), full.build_hash());

        fs::remove_file(dist.path().join("bin/cluster")).unwrap();
        assert_eq!(
            scan_summary(dist.path(), &Limits::default())
                .unwrap_err()
                .to_string(),
            scan_default(dist.path()).unwrap_err().to_string()
        );
    }

    #[test]
    fn build_hash_ignores_mtime_and_location_but_not_mode() {
        let one = sample_dist();
        let two = sample_dist();
        let file = two.path().join("lib/empty");
        File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        let hash_one = scan_default(one.path()).unwrap().build_hash();
        assert_eq!(hash_one, scan_default(two.path()).unwrap().build_hash());
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        assert_ne!(hash_one, scan_default(two.path()).unwrap().build_hash());
    }

    #[test]
    fn follows_a_symlinked_root() {
        let dist = sample_dist();
        let holder = tempfile::tempdir().unwrap();
        let current = holder.path().join("current");
        symlink(dist.path(), &current).unwrap();
        assert_eq!(
            scan_default(&current).unwrap(),
            scan_default(dist.path()).unwrap()
        );
    }

    #[test]
    fn hashes_many_files_in_parallel_in_path_order() {
        let dist = sample_dist();
        for index in 0..200 {
            let content = noise(index * 997, index as u64);
            write_file(
                &dist.path().join(format!("many/f{index:03}")),
                &content,
                0o644,
            );
        }
        let manifest = scan_default(dist.path()).unwrap();
        for index in 0..200 {
            match &manifest.get(&format!("many/f{index:03}")).unwrap().kind {
                EntryKind::File { sha256, .. } => assert_eq!(
                    *sha256,
                    hex::encode(Sha256::digest(noise(index * 997, index as u64)))
                ),
                other => panic!("not a file: {other:?}"),
            }
        }
    }

    /// (why, how to break a sample dist, a check on the innermost error).
    #[test]
    fn rejects_bad_dists() {
        type Breaker = fn(&Path);
        let cases: Vec<(&str, Breaker, Expect)> = vec![
            (
                "no binary",
                |root| fs::remove_file(root.join("bin/cluster")).unwrap(),
                |e| matches!(e, DistError::Invalid(ManifestError::MissingBinary)),
            ),
            (
                "binary is a directory",
                |root| {
                    fs::remove_file(root.join("bin/cluster")).unwrap();
                    fs::create_dir(root.join("bin/cluster")).unwrap();
                },
                |e| matches!(e, DistError::Invalid(ManifestError::BinaryNotFile)),
            ),
            (
                "fifo",
                |root| {
                    let path = std::ffi::CString::new(
                        root.join("lib/pipe").into_os_string().into_encoded_bytes(),
                    )
                    .unwrap();
                    // SAFETY: `path` is a valid NUL-terminated string for the call.
                    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
                },
                |e| matches!(e, DistError::UnsupportedFileType { path, kind: "FIFO" } if path == "lib/pipe"),
            ),
            (
                "socket",
                |root| {
                    std::os::unix::net::UnixListener::bind(root.join("lib/sock")).unwrap();
                },
                |e| matches!(e, DistError::UnsupportedFileType { kind: "socket", .. }),
            ),
            (
                "setuid",
                |root| {
                    let path = root.join("lib/data.bin");
                    fs::set_permissions(path, fs::Permissions::from_mode(0o4755)).unwrap();
                },
                |e| matches!(e, DistError::Invalid(ManifestError::BadMode { path, .. }) if path == "lib/data.bin"),
            ),
            (
                "setgid dir",
                |root| {
                    fs::set_permissions(root.join("lib"), fs::Permissions::from_mode(0o2755))
                        .unwrap();
                },
                |e| matches!(e, DistError::Invalid(ManifestError::BadMode { path, .. }) if path == "lib"),
            ),
            (
                "escaping symlink",
                |root| symlink("../../etc/passwd", root.join("lib/out")).unwrap(),
                |e| matches!(e, DistError::Invalid(ManifestError::SymlinkEscapes { path, .. }) if path == "lib/out"),
            ),
            (
                "absolute symlink",
                |root| symlink("/etc/passwd", root.join("lib/out")).unwrap(),
                |e| matches!(e, DistError::Invalid(ManifestError::BadSymlink { .. })),
            ),
            (
                "control character in a name",
                |root| write_file(&root.join("lib/a\tb"), b"x", 0o644),
                |e| matches!(e, DistError::Invalid(ManifestError::BadPath { .. })),
            ),
            (
                "non-UTF-8 name",
                |root| {
                    use std::os::unix::ffi::OsStrExt;
                    let name = std::ffi::OsStr::from_bytes(b"bad\xff");
                    write_file(&root.join("lib").join(name), b"x", 0o644);
                },
                |e| matches!(e, DistError::NonUtf8Path { .. }),
            ),
            (
                "version.json is a directory",
                |root| fs::create_dir(root.join(VERSION_FILE)).unwrap(),
                |e| matches!(e, DistError::VersionFileNotRegular),
            ),
        ];
        for (why, break_it, expected) in cases {
            let dist = sample_dist();
            break_it(dist.path());
            match scan_default(dist.path()) {
                Ok(_) => panic!("{why}: accepted"),
                Err(error) => {
                    assert!(expected(error.innermost()), "{why}: wrong error: {error}");
                    let message = crate::error::Chain(&error).to_string();
                    let dir = dist.path().display().to_string();
                    assert!(message.starts_with(&format!("dist {dir}: ")), "{message}");
                }
            }
        }
    }

    #[test]
    fn enforces_limits_while_listing() {
        let dist = sample_dist();
        let small = Limits {
            max_total_bytes: 1000,
            ..Limits::default()
        };
        assert!(matches!(
            scan(dist.path(), &small).unwrap_err().innermost(),
            DistError::Invalid(ManifestError::TooLarge { limit: 1000, .. })
        ));
        let few = Limits {
            max_entries: 3,
            ..Limits::default()
        };
        assert!(matches!(
            scan(dist.path(), &few).unwrap_err().innermost(),
            DistError::Invalid(ManifestError::TooManyEntries { limit: 3 })
        ));
    }

    #[test]
    fn missing_or_wrong_dir_is_named() {
        let holder = tempfile::tempdir().unwrap();
        let missing = holder.path().join("nope");
        let error = scan_default(&missing).unwrap_err();
        assert!(matches!(error, DistError::DirMissing { .. }));
        assert_eq!(
            error.to_string(),
            format!(
                "dist directory {} does not exist: pass the directory that contains bin/cluster",
                missing.display()
            )
        );
        let plain = holder.path().join("file");
        fs::write(&plain, "x").unwrap();
        assert!(matches!(
            scan_default(&plain).unwrap_err(),
            DistError::NotADirectory { .. }
        ));
    }

    #[test]
    fn unreadable_content_is_named() {
        // Root reads anything, so permission bits cannot make a file unreadable there.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("skipped unreadable_content_is_named: running as root, which reads any file");
            return;
        }
        let dist = sample_dist();
        let secret = dist.path().join("lib/data.bin");
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
        let error = scan_default(dist.path()).unwrap_err();
        assert!(
            matches!(error.innermost(), DistError::Io(IoError { path, .. }) if *path == secret),
            "{error}"
        );
    }
}
