//! Test helpers shared by the agent's unit tests: releases on disk and a view of a data dir.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::release::{Limits, ReleaseStore};

/// Installs a one-file release whose binary prints `tag`; returns its hash.
pub fn install(data: &Path, work: &Path, tag: &str) -> String {
    let dist = work.join(tag);
    std::fs::create_dir_all(dist.join("bin")).unwrap();
    let binary = dist.join("bin/cluster");
    std::fs::write(&binary, format!("#!/bin/sh\necho {tag}\n")).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = ReleaseStore::open(data).unwrap();
    store.install_dir(&dist, &Limits::default()).unwrap()
}

/// Every path under `data` with its link target and the bytes of small files, to show
/// that nothing changed.
pub fn tree(data: &Path) -> Vec<String> {
    let mut paths: Vec<String> = walkdir::WalkDir::new(data)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| {
            let link = std::fs::read_link(e.path())
                .map(|t| format!(" -> {}", t.display()))
                .unwrap_or_default();
            let content = match e.metadata() {
                Ok(meta) if meta.is_file() && meta.len() <= 4096 => {
                    format!(
                        " = {:?}",
                        String::from_utf8_lossy(&std::fs::read(e.path()).unwrap())
                    )
                }
                _ => String::new(),
            };
            format!("{}{link}{content}", e.path().display())
        })
        .collect();
    paths.sort();
    paths
}
