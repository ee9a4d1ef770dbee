//! The Raft log and vote on sled: entries keyed by big-endian index, metadata in its own tree.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, OnceLock};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use tokio::sync::mpsc;

use super::io_err;
use crate::raft::typ::{Entry, LogId, TypeConfig, Vote};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Log storage handle; cheap to clone (sled trees are reference counted).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    /// index (u64 big-endian) -> JSON entry.
    logs: sled::Tree,
    /// vote, committed log id, last purged log id.
    meta: sled::Tree,
    /// Appends waiting for their flush, in order (see [`Flusher`]); started by the first.
    flusher: Arc<OnceLock<Flusher>>,
}

/// Flushes appended entries off openraft's path. openraft replicates an entry once
/// `append` returns and counts it toward a quorum (on the leader) or answers the leader
/// (on a follower) only once its callback fires; so `append` returns as soon as the entries
/// are readable, and this task fires the callbacks after the flush that makes them durable.
/// The leader's own flush then runs while followers receive and flush the entry, not
/// before. One task, in order: every callback waiting when a flush starts is completed by
/// it (a flush makes everything written before it durable), oldest first.
struct Flusher {
    queue: mpsc::UnboundedSender<IOFlushed<TypeConfig>>,
}

impl Flusher {
    fn start(db: sled::Db) -> Flusher {
        let (queue, mut waiting) = mpsc::unbounded_channel::<IOFlushed<TypeConfig>>();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while let Ok(next) = waiting.try_recv() {
                    batch.push(next);
                }
                let flushed = db.flush_async().await;
                for callback in batch {
                    callback.io_completed(match &flushed {
                        Ok(_) => Ok(()),
                        Err(e) => Err(io::Error::other(format!("flushing the Raft log: {e}"))),
                    });
                }
            }
        });
        Flusher { queue }
    }
}

impl LogStore {
    pub(super) fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            logs: db.open_tree("logs")?,
            meta: db.open_tree("log_meta")?,
            flusher: Arc::new(OnceLock::new()),
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.meta.get(key).map_err(io_err)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(io_err),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        self.meta.insert(key, bytes).map_err(io_err)?;
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        self.db.flush_async().await.map_err(io_err)?;
        Ok(())
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    serde_json::from_slice(bytes).map_err(io_err)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Bound::Included(key(*i)),
            Bound::Excluded(i) => Bound::Excluded(key(*i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        for item in self.logs.range((Bound::Included(key(start)), end)) {
            let (_, value) = item.map_err(io_err)?;
            entries.push(decode_entry(&value)?);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let last_log_id = match self.logs.last().map_err(io_err)? {
            Some((_, value)) => Some(decode_entry(&value)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.put_meta(VOTE, vote)?;
        // A vote must survive a crash before it is acted on, or a node could vote twice in a term.
        self.flush().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not flushed: losing it only means re-applying from an earlier point after a crash.
        match committed {
            Some(log_id) => self.put_meta(COMMITTED, &log_id),
            None => self.meta.remove(COMMITTED).map(|_| ()).map_err(io_err),
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.get_meta(COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(io_err)?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.logs.apply_batch(batch).map_err(io_err)?;
        // Readable now, which is all replication needs. Acknowledge only what is on disk:
        // the callback fires after the flush (see `Flusher`).
        let flusher = self.flusher.get_or_init(|| Flusher::start(self.db.clone()));
        if let Err(unsent) = flusher.queue.send(callback) {
            // The flusher is gone (the runtime is shutting down): flush here.
            let flushed = self.flush().await;
            let result = match &flushed {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            unsent.0.io_completed(result);
            return flushed;
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index + 1).unwrap_or(0);
        let mut batch = sled::Batch::default();
        for item in self.logs.range(key(from)..) {
            let (k, _) = item.map_err(io_err)?;
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(io_err)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.flush().await?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(io_err)?;
            batch.remove(k);
        }
        self.logs.apply_batch(batch).map_err(io_err)?;
        Ok(())
    }
}
