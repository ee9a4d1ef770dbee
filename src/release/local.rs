//! Local content: what the releases a node already holds can supply. Finding the files and
//! chunks of a manifest that held releases have (so only the rest crosses the network),
//! sharing an unchanged file's inode with a held release, and serving verified chunks to
//! peers that are syncing a release held here.
//!
//! Releases are immutable, so a held file may be hard-linked into a new release only when
//! its mode matches too: linking shares the inode, and with it the mode.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::manifest::{chunk_offsets, Chunk, EntryKind, Manifest};
use super::store::ReleaseStore;
use super::store::StoreError;
use crate::fs::{io_error, open_file};

impl ReleaseStore {
    /// Chunks of `manifest` that no held release has, each once, in manifest order: what
    /// must cross the network. A file whose whole content a held release has needs none of
    /// its chunks, even if that release cut it differently.
    pub fn missing_chunks(&self, manifest: &Manifest) -> Result<Vec<Chunk>, StoreError> {
        Ok(self.local_content()?.missing(manifest))
    }

    /// The bytes of one chunk, from any held release, checked against `sha256`: what a node
    /// serves to peers that are syncing a release it holds.
    pub fn read_chunk(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
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
        Err(damaged.unwrap_or_else(|| StoreError::ChunkNotHeld {
            sha256: sha256.to_owned(),
            data_dir: self.data_dir().to_path_buf(),
        }))
    }

    /// Where every file content and chunk held locally can be read.
    pub(super) fn local_content(&self) -> Result<LocalContent, StoreError> {
        let mut local = LocalContent::default();
        for hash in self.releases()? {
            let manifest = self.manifest_shared(&hash)?;
            local.add(self.release_dir(&hash), manifest);
        }
        Ok(local)
    }
}

/// Index of the content held by the store's releases.
#[derive(Debug, Default)]
pub(super) struct LocalContent {
    /// (release directory, manifest) of each held release.
    releases: Vec<(PathBuf, Arc<Manifest>)>,
    /// File content SHA-256 -> (release index, entry index) of every file with it.
    files: HashMap<String, Vec<(usize, usize)>>,
    /// Chunk SHA-256 -> (release index, entry index, offset) of one place holding it.
    chunks: HashMap<String, (usize, usize, u64)>,
}

impl LocalContent {
    pub(super) fn add(&mut self, dir: PathBuf, manifest: Arc<Manifest>) {
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

    pub(super) fn missing(&self, manifest: &Manifest) -> Vec<Chunk> {
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

    /// Hard-links a held file with this content and mode to `path`; false when there is
    /// none, or linking is refused (another owner under protected_hardlinks, too many
    /// links, another filesystem) and the caller must copy instead.
    pub(super) fn hard_link(&self, sha256: &str, mode: u32, size: u64, path: &Path) -> bool {
        self.linkable(sha256, mode, size)
            .is_some_and(|source| fs::hard_link(source, path).is_ok())
    }

    /// A held file with this content and mode, whose inode may be shared: on disk it must
    /// still be a regular file of that size and mode.
    pub(super) fn linkable(&self, sha256: &str, mode: u32, size: u64) -> Option<PathBuf> {
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
    pub(super) fn any_copy(&self, sha256: &str) -> Option<PathBuf> {
        let &(release, entry) = self.files.get(sha256)?.first()?;
        Some(self.path_of(release, entry))
    }

    /// A held file and offset holding this chunk.
    pub(super) fn chunk(&self, sha256: &str) -> Option<(PathBuf, u64)> {
        let &(release, entry, offset) = self.chunks.get(sha256)?;
        Some((self.path_of(release, entry), offset))
    }
}

/// Reads `chunk` at `offset` of the file at `path` and checks it against its SHA-256.
pub(super) fn read_verified_chunk(
    path: &Path,
    offset: u64,
    chunk: &Chunk,
) -> Result<Vec<u8>, StoreError> {
    let file = open_file(path).map_err(io_error("open", path))?;
    let size = usize::try_from(chunk.size).expect("chunk sizes are validated to fit in memory");
    let mut bytes = vec![0u8; size];
    file.read_exact_at(&mut bytes, offset)
        .map_err(io_error("read", path))?;
    if hex::encode(Sha256::digest(&bytes)) != chunk.sha256 {
        return Err(StoreError::ChunkCorrupt {
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
    use crate::release::test_data::{
        inode, limits, noise, open, sample_dist, small_dist, write_file,
    };
    use crate::release::{scan, verify};
    use std::os::unix::fs::PermissionsExt;

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
        assert!(matches!(error, StoreError::ChunkNotHeld { .. }), "{error}");

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
            matches!(&error, StoreError::ChunkCorrupt { path, .. } if *path == file),
            "{error}"
        );
    }
}
