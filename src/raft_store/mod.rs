//! Durable storage on sled: the Raft log, the vote, and the replicated state machine.
//!
//! Architecture invariant: this is the only module that sees sled.
//!
//! Durability: sled flushes every 500 ms on its own, so every write that openraft
//! treats as persisted (an appended entry, a vote) is followed by `flush_async`
//! before it is acknowledged: a vote before `save_vote` returns, an appended entry before
//! its `IOFlushed` callback fires (a task of its own flushes, so that `append` returns
//! once the entry is readable and replication need not wait for the leader's disk).
//! State-machine changes of one `apply` call are one
//! atomic sled batch; they need no flush of their own because the log they come
//! from is durable and is replayed from the persisted applied index after a crash.

mod log;
mod sm;

use std::path::{Path, PathBuf};

pub use log::LogStore;
pub use sm::StateMachineStore;

/// Errors opening the store. Every message names the data dir and a fix.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data dir {0} is locked by another process: is a cluster node already running on it? \
         Stop it, or give this node its own --data-dir"
    )]
    Locked(PathBuf),
    #[error("cannot open the Raft store in {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error(
        "not opening the Raft store in {path}: only {free} bytes are free on its filesystem \
         (at least {needed} are needed: opening a store on a full disk can damage it); free \
         space and start the node again"
    )]
    NoSpace {
        path: PathBuf,
        free: u64,
        needed: u64,
    },
    #[error("the Raft store in {path} holds unreadable data ({what}): {detail}")]
    Corrupt {
        path: PathBuf,
        what: String,
        detail: String,
    },
}

/// Free space a store needs before it is opened. sled writes as it opens (a snapshot of
/// its page table, the tail of its log); on a full disk that write fails half done and
/// leaves a store that no later open can read. Seen in the chaos suite: a node restarted
/// by its supervisor while its disk was still full never started again.
pub const MIN_FREE_TO_OPEN: u64 = 8 << 20;

/// Opens (creating if needed) the sled database under `<data_dir>/raft`; refuses, changing
/// nothing, while the filesystem has less than `MIN_FREE_TO_OPEN` free.
pub async fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = data_dir.join("raft");
    let probe = if path.exists() {
        path.as_path()
    } else {
        data_dir
    };
    if let Some(free) = crate::fs::free_bytes(probe) {
        if free < MIN_FREE_TO_OPEN {
            return Err(StoreError::NoSpace {
                path,
                free,
                needed: MIN_FREE_TO_OPEN,
            });
        }
    }
    let db = sled::Config::new()
        .path(&path)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|source| classify_open_error(&path, data_dir, source))?;
    let corrupt = |what: &str, detail: String| StoreError::Corrupt {
        path: path.clone(),
        what: what.to_string(),
        detail,
    };
    let log = LogStore::open(&db).map_err(|e| corrupt("log", e.to_string()))?;
    let sm = StateMachineStore::open(&db)
        .await
        .map_err(|e| corrupt("state machine", e.to_string()))?;
    Ok((log, sm))
}

fn classify_open_error(path: &Path, data_dir: &Path, source: sled::Error) -> StoreError {
    if let sled::Error::Io(io) = &source {
        // sled reports its exclusive file lock as WouldBlock / "could not acquire lock".
        if io.kind() == std::io::ErrorKind::WouldBlock
            || io.to_string().contains("could not acquire lock")
        {
            return StoreError::Locked(data_dir.to_path_buf());
        }
    }
    StoreError::Open {
        path: path.to_path_buf(),
        source,
    }
}

/// Converts any storage-layer error into the `io::Error` openraft's traits return.
fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::typ::TypeConfig;
    use openraft::testing::log::{StoreBuilder, Suite};

    struct TempBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempBuilder {
        async fn build(
            &self,
        ) -> Result<
            (tempfile::TempDir, LogStore, StateMachineStore),
            openraft::StorageError<TypeConfig>,
        > {
            let dir = tempfile::tempdir().expect("temp dir");
            let (log, sm) = open(dir.path()).await.expect("open store");
            Ok((dir, log, sm))
        }
    }

    /// openraft's conformance suite against the sled store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(TempBuilder).await.expect("storage suite");
    }

    #[tokio::test]
    async fn second_open_of_a_data_dir_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open(dir.path()).await.unwrap();
        let err = open(dir.path()).await.err().expect("second open must fail");
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
        assert!(err.to_string().contains("locked by another process"));
    }
}
