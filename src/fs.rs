//! Crash-safe filesystem helpers for everything that writes under a data directory: atomic
//! file writes and symlink swaps, directory syncs, opening without following symlinks, and
//! removing trees (read-only directories included), off the async workers when asked.
//!
//! "Atomic" here means that a reader, or the next start after a crash, sees the old state
//! or the new one and never a mix: new content is written under a temporary name in the
//! same directory, synced, renamed over the old name, and the directory is synced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// An I/O operation on a path failed. The message names the operation, the path and what
/// to check; the OS error is the [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {}", path.display(), fix_for(source))]
pub struct IoError {
    /// What was being done, as a verb phrase ("read", "list", "rename a new symlink to").
    pub action: &'static str,
    /// The path the operation was on.
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl IoError {
    /// An error of `action` on `path`.
    pub fn new(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> IoError {
        IoError {
            action,
            path: path.into(),
            source,
        }
    }

    /// True when the filesystem (or the user's quota on it) is full: waiting or freeing
    /// space helps, unlike for other I/O errors.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        )
    }
}

/// What to do about `error`, for the message of an [`IoError`].
fn fix_for(error: &io::Error) -> &'static str {
    if matches!(
        error.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT)
    ) {
        return "free space on its filesystem";
    }
    match error.kind() {
        io::ErrorKind::NotFound => "check that it exists",
        io::ErrorKind::PermissionDenied => "check that this user may access it",
        _ => "check that it exists and that this user may access it",
    }
}

/// `map_err` adapter: turns an `io::Error` of `action` on `path` into an [`IoError`].
pub fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError {
        action,
        path,
        source,
    }
}

/// Replaces `dir/name` with `bytes` so that readers and crashes see the old or the new
/// content: temporary file in `dir`, fsync, rename, fsync of `dir`. The one atomic file
/// write of the crate. On error the temporary file is removed and `dir/name` is unchanged
/// (unless only the final directory sync failed, after the rename).
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IoError> {
    let target = dir.join(name);
    let temporary = dir.join(random_name(&format!(".{name}.tmp")));
    let written = create_new(&temporary, 0o644).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(IoError::new("write", temporary, source));
    }
    if let Err(source) = fs::rename(&temporary, &target) {
        let _ = fs::remove_file(&temporary);
        return Err(IoError::new("rename a temporary file to", target, source));
    }
    sync_dir(dir)
}

/// Points the symlink `dir/name` at `target`, atomically: a new symlink under the name
/// `<name>.tmp-<random>` (so that a crash leaves only names a caller can recognize and
/// remove), renamed over the old one, then `dir` synced so the swap survives a crash.
pub fn replace_symlink(dir: &Path, name: &str, target: &Path) -> Result<(), IoError> {
    let link = dir.join(name);
    let temporary = dir.join(random_name(&format!("{name}.tmp")));
    symlink(target, &temporary).map_err(io_error("create the symlink", &temporary))?;
    if let Err(source) = fs::rename(&temporary, &link) {
        let _ = fs::remove_file(&temporary);
        return Err(IoError::new("rename a new symlink to", link, source));
    }
    sync_dir(dir)
}

/// Makes the entries of a directory durable.
pub fn sync_dir(dir: &Path) -> Result<(), IoError> {
    File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error("sync", dir))
}

/// Removes the file or symlink at `path` and syncs its directory; `Ok(false)` when there
/// was nothing to remove.
pub fn remove_file_durably(path: &Path) -> Result<bool, IoError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(path.parent().unwrap_or(Path::new(".")))?;
            Ok(true)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(IoError::new("remove", path, source)),
    }
}

/// Creates a new regular file, failing if anything (a symlink included) is at `path`.
pub fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
}

/// Opens a regular file for reading; refuses a symlink and does not block on a FIFO.
pub fn open_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        Ok(file)
    } else {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, what))
    }
}

/// Opens a directory (not a symlink to one) to change its mode or sync it.
pub fn open_dir(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
}

/// Removes a file, a symlink, or a directory tree without following symlinks, first
/// making directories owner-writable (a release may hold read-only ones). What is already
/// gone counts as removed, so two removals of one tree (one in the background, one at the
/// next start) do not fail each other.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let gone = |error: io::Error| {
        if error.kind() == io::ErrorKind::NotFound {
            Ok(())
        } else {
            Err(error)
        }
    };
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) => return gone(error),
    };
    if !metadata.is_dir() {
        return fs::remove_file(path).or_else(gone);
    }
    if metadata.mode() & 0o700 != 0o700 {
        match open_dir(path) {
            Ok(dir) => dir.set_permissions(fs::Permissions::from_mode(0o700))?,
            Err(error) => return gone(error),
        }
    }
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) => return gone(error),
    };
    for item in entries {
        match item {
            Ok(entry) => remove_tree(&entry.path())?,
            Err(error) => gone(error)?,
        }
    }
    fs::remove_dir(path).or_else(gone)
}

/// Removes the tree at `path` without blocking an async worker: on tokio's blocking pool
/// when called from inside a runtime, at once otherwise (a caller outside a runtime is
/// blocking anyway). Best effort: errors are logged, and whatever is left is the caller's
/// to clean up later (the release store removes all of `staging/` when it opens).
pub fn remove_tree_in_background(path: PathBuf) {
    let remove = move || {
        if let Err(error) = remove_tree(&path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove a discarded directory");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(remove);
        }
        Err(_) => remove(),
    }
}

/// `prefix-<16 random hex digits>`: unique enough that fresh names never collide.
pub fn random_name(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Port 0 means "any free port" the first time; on a restart the same port again, as
/// recorded in `<data-dir>/<file>` on the same IP (`node.addr`: a node's address is part
/// of the membership; `metrics.addr`: a scraper's target stays valid; a service's
/// ingress). An unreadable record is no record.
pub fn reuse_recorded_port(
    data_dir: &Path,
    file: &str,
    listen: std::net::SocketAddr,
) -> std::net::SocketAddr {
    if listen.port() != 0 {
        return listen;
    }
    let recorded = std::fs::read_to_string(data_dir.join(file))
        .ok()
        .and_then(|text| text.trim().parse::<std::net::SocketAddr>().ok());
    match recorded {
        Some(addr) if addr.ip() == listen.ip() => addr,
        _ => listen,
    }
}

/// Free bytes available to this process on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomically_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "state.json", b"one").unwrap();
        write_atomically(dir.path(), "state.json", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn failed_write_atomically_leaves_the_directory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        write_atomically(dir.path(), "state.json", b"one").unwrap();
        // A directory in the way: the rename over it fails after the temporary was written.
        fs::create_dir(dir.path().join("blocked")).unwrap();
        fs::write(dir.path().join("blocked/inside"), b"x").unwrap();
        let error = write_atomically(dir.path(), "blocked", b"two").unwrap_err();
        assert_eq!(error.path, dir.path().join("blocked"), "{error}");
        assert_eq!(names(dir.path()), ["blocked", "state.json"]);
        assert_eq!(fs::read(dir.path().join("state.json")).unwrap(), b"one");
    }

    #[test]
    fn replace_symlink_swaps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        replace_symlink(dir.path(), "current", Path::new("releases/a")).unwrap();
        replace_symlink(dir.path(), "current", Path::new("releases/b")).unwrap();
        assert_eq!(
            fs::read_link(dir.path().join("current")).unwrap(),
            Path::new("releases/b")
        );
        assert_eq!(names(dir.path()), ["current"]);
    }

    #[test]
    fn remove_tree_handles_read_only_directories_and_absent_paths() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("locked")).unwrap();
        fs::write(tree.join("locked/file"), b"x").unwrap();
        symlink("/etc", tree.join("link")).unwrap();
        fs::set_permissions(tree.join("locked"), fs::Permissions::from_mode(0o500)).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
        assert!(Path::new("/etc").exists(), "symlinks are not followed");
    }

    #[test]
    fn io_errors_name_the_path_and_the_fix() {
        let missing = Path::new("/nonexistent/x");
        let error = fs::read(missing)
            .map_err(io_error("read", missing))
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot read /nonexistent/x: check that it exists"
        );
        assert!(std::error::Error::source(&error).is_some());
        let full = IoError::new(
            "write",
            "/data/x",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert!(full.is_out_of_space());
        assert!(full.to_string().contains("free space"), "{full}");
    }
}
