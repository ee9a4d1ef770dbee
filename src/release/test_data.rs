//! Test data and helpers shared by the release unit tests: dists, stores, tree listings.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use super::{Limits, ReleaseStore};

/// Deterministic incompressible bytes (xorshift), so chunking sees realistic data.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub(crate) fn write_file(path: &Path, content: &[u8], mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A dist with every kind of entry: `binary` at bin/cluster, a small config, a larger
/// data file, an empty file, a symlink and an empty directory with an unusual mode.
pub(crate) fn sample_dist(binary: &[u8]) -> tempfile::TempDir {
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

pub(crate) fn small_dist(config: &str) -> tempfile::TempDir {
    let dist = sample_dist(b"#!/bin/sh\nexit 0\n");
    fs::write(dist.path().join("etc/config.toml"), config).unwrap();
    dist
}

pub(crate) fn limits() -> Limits {
    Limits::default()
}

pub(crate) fn open(data: &tempfile::TempDir) -> ReleaseStore {
    ReleaseStore::open(data.path()).unwrap()
}

/// Every path under `dir` (not following symlinks) with its kind and, for symlinks,
/// target: what "the data dir did not change" is checked against.
pub(crate) fn tree(dir: &Path) -> Vec<String> {
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

pub(crate) fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().ino()
}

pub(crate) fn staging_is_empty(store: &ReleaseStore) -> bool {
    fs::read_dir(store.data_dir().join("staging"))
        .unwrap()
        .next()
        .is_none()
}
