//! Measures how fast `release::scan` hashes and chunks a dist, in MiB/s.
//!
//! ```text
//! cargo run --release --example hash_bench            # builds a 1 GiB dist in a temp dir
//! cargo run --release --example hash_bench -- DIR     # scans an existing dist instead
//! ```
//!
//! The generated dist mixes one large binary, medium files and thousands of small ones,
//! like a real release. It has just been written, so it sits in the page cache: the numbers
//! measure hashing and chunking, not the disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cluster::release::{scan, EntryKind, Limits};

const MIB: u64 = 1024 * 1024;

/// (directory, how many files, bytes each): 1 GiB in all.
const LAYOUT: &[(&str, u64, u64)] = &[
    ("bin", 1, 64 * MIB),
    ("lib/huge", 1, 192 * MIB),
    ("lib/large", 4, 64 * MIB),
    ("share/medium", 32, 8 * MIB),
    ("share/small", 256, 512 * 1024),
    ("share/tiny", 8192, 16 * 1024),
];

fn main() -> anyhow::Result<()> {
    let holder;
    let dir: PathBuf = match std::env::args_os().nth(1) {
        Some(dir) => dir.into(),
        None => {
            holder = tempfile::tempdir()?;
            let started = Instant::now();
            build(holder.path())?;
            println!(
                "built a 1 GiB dist in {} in {:.1} s",
                holder.path().display(),
                started.elapsed().as_secs_f64()
            );
            holder.path().to_path_buf()
        }
    };

    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    for run in 1..=3 {
        let started = Instant::now();
        let manifest = scan(&dir, &Limits::default())?;
        let seconds = started.elapsed().as_secs_f64();
        let mebibytes = manifest.total_bytes() as f64 / MIB as f64;
        let chunks: usize = manifest
            .entries
            .iter()
            .map(|entry| match &entry.kind {
                EntryKind::File { chunks, .. } => chunks.len(),
                _ => 0,
            })
            .sum();
        println!(
            "run {run}: {} files, {mebibytes:.0} MiB, {chunks} chunks in {seconds:.2} s: \
             {:.0} MiB/s on {cores} cores",
            manifest.file_count(),
            mebibytes / seconds
        );
    }
    Ok(())
}

/// Writes the [`LAYOUT`] below `root`, with `bin/cluster` as the first file of `bin`.
fn build(root: &Path) -> anyhow::Result<()> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for &(dir, count, size) in LAYOUT {
        fs::create_dir_all(root.join(dir))?;
        for index in 0..count {
            let name = if dir == "bin" {
                "cluster".to_owned()
            } else {
                format!("f{index:05}")
            };
            let path = root.join(dir).join(name);
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            write_noise(&path, size, seed)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
    }
    Ok(())
}

/// `size` bytes of xorshift output: incompressible, so chunking finds realistic cut points.
fn write_noise(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut state = seed | 1;
    let mut file = std::io::BufWriter::with_capacity(MIB as usize, fs::File::create(path)?);
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let take = left.min(block.len() as u64) as usize;
        file.write_all(&block[..take])?;
        left -= take as u64;
    }
    file.flush()?;
    Ok(())
}
