//! The replicated state machine on sled: an in-memory `State` mirrored record by record.
//!
//! Reads are served from memory; every `apply` call writes the records it touched, the
//! applied log id and the membership in one atomic sled batch, so after a crash the
//! persisted state always matches the persisted applied index.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::{Stream, TryStreamExt};
use openraft::storage::{ApplyResponder, EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::io_err;
use crate::raft::typ::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::state::{Record, Response, State};

const APPLIED: &[u8] = b"applied";
const MEMBERSHIP: &[u8] = b"membership";
/// The current snapshot's metadata (JSON) and its bytes (raw), written in one batch.
const SNAPSHOT_META: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA: &[u8] = b"snapshot_data";
/// Where older releases kept the snapshot: a JSON `LegacySnapshot`, its bytes
/// as an array of numbers (about four times their size). Still read; removed by the next
/// snapshot saved.
const LEGACY_SNAPSHOT: &[u8] = b"snapshot";

/// What the state machine holds in memory; also the JSON layout of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct Applied {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    state: State,
}

/// A snapshot as older releases stored it (under `LEGACY_SNAPSHOT`).
#[derive(Serialize, Deserialize)]
struct LegacySnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

struct Inner {
    applied: Mutex<Applied>,
    /// Record key -> JSON value (see `record_key`).
    records: sled::Tree,
    /// applied log id, membership, current snapshot.
    meta: sled::Tree,
}

/// State-machine handle; cheap to clone, shared by Raft and the node's read paths.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

fn record_key(record: &Record) -> Vec<u8> {
    match record {
        Record::ClusterId => b"cluster_id".to_vec(),
        // Zero-padded so that sled's byte order is numeric order.
        Record::Node(id) => format!("node/{id:020}").into_bytes(),
        Record::Kv(key) => [b"kv/".as_slice(), key.as_bytes()].concat(),
        Record::Deployment => b"deployment".to_vec(),
        Record::DeploymentManifest => b"deployment_manifest".to_vec(),
        Record::History(generation) => format!("history/{generation:020}").into_bytes(),
        Record::LastGeneration => b"last_generation".to_vec(),
        Record::Fleet => b"fleet".to_vec(),
    }
}

fn parse_record_key(key: &[u8]) -> Option<Record> {
    match key {
        b"cluster_id" => return Some(Record::ClusterId),
        b"deployment" => return Some(Record::Deployment),
        b"deployment_manifest" => return Some(Record::DeploymentManifest),
        b"last_generation" => return Some(Record::LastGeneration),
        b"fleet" => return Some(Record::Fleet),
        _ => {}
    }
    if let Some(rest) = key.strip_prefix(b"history/") {
        return std::str::from_utf8(rest)
            .ok()?
            .parse()
            .ok()
            .map(Record::History);
    }
    if let Some(rest) = key.strip_prefix(b"node/") {
        return std::str::from_utf8(rest)
            .ok()?
            .parse()
            .ok()
            .map(Record::Node);
    }
    let rest = key.strip_prefix(b"kv/")?;
    Some(Record::Kv(String::from_utf8(rest.to_vec()).ok()?))
}

/// Adds the current value of each of `records` to `batch` (taken from `value_of`), or its
/// removal when the record no longer exists. A value that cannot be encoded is an error,
/// never a removal.
fn write_records(
    batch: &mut sled::Batch,
    state: &State,
    records: &[Record],
    value_of: impl Fn(&State, &Record) -> Result<Option<serde_json::Value>, serde_json::Error>,
) -> io::Result<()> {
    for record in records {
        match value_of(state, record) {
            Ok(Some(value)) => batch.insert(
                record_key(record),
                serde_json::to_vec(&value).map_err(io_err)?,
            ),
            Ok(None) => batch.remove(record_key(record)),
            Err(e) => {
                return Err(io_err(format!(
                    "cannot encode record {record:?} of the replicated state ({e}): \
                     nothing of this change was stored; report this as a bug"
                )))
            }
        }
    }
    Ok(())
}

impl StateMachineStore {
    pub(super) async fn open(db: &sled::Db) -> Result<Self, io::Error> {
        let records = db.open_tree("sm").map_err(io_err)?;
        let meta = db.open_tree("sm_meta").map_err(io_err)?;
        let applied = Self::load(&records, &meta)?;
        Ok(Self {
            inner: Arc::new(Inner {
                applied: Mutex::new(applied),
                records,
                meta,
            }),
        })
    }

    /// The state as persisted: every record, the applied log id and the membership.
    fn load(records: &sled::Tree, meta: &sled::Tree) -> io::Result<Applied> {
        let mut applied = Applied::default();
        for item in records.iter() {
            let (key, value) = item.map_err(io_err)?;
            let record = parse_record_key(&key).ok_or_else(|| {
                io_err(format!(
                    "unknown record key {:?}",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            let value = serde_json::from_slice(&value).map_err(io_err)?;
            applied.state.load_record(record, value).map_err(io_err)?;
        }
        if let Some(bytes) = meta.get(APPLIED).map_err(io_err)? {
            applied.last_applied = serde_json::from_slice(&bytes).map_err(io_err)?;
        }
        if let Some(bytes) = meta.get(MEMBERSHIP).map_err(io_err)? {
            applied.last_membership = serde_json::from_slice(&bytes).map_err(io_err)?;
        }
        Ok(applied)
    }

    fn lock(&self) -> MutexGuard<'_, Applied> {
        // A panic while holding the lock would already have taken the node down.
        self.inner.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last membership this node applied: committed, unlike the effective one in
    /// openraft's metrics, which may be an entry a new leader will truncate.
    pub fn applied_membership(&self) -> StoredMembership {
        self.lock().last_membership.clone()
    }

    /// Reads part of the state without copying all of it.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock().state)
    }

    /// Flushes everything sled holds in memory (used at graceful shutdown).
    pub async fn flush(&self) {
        if let Err(e) = self.inner.records.flush_async().await {
            tracing::warn!(error = %e, "flushing the store at shutdown");
        }
    }

    /// Replaces the whole state (snapshot install) in one atomic batch.
    fn replace(&self, next: Applied) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for item in self.inner.records.iter() {
            let (key, _) = item.map_err(io_err)?;
            batch.remove(key);
        }
        write_records(
            &mut batch,
            &next.state,
            &next.state.records(),
            State::record_value,
        )?;
        let meta = self.meta_batch(&next)?;
        self.write_atomically(&batch, &meta, "installing a snapshot")?;
        *self.lock() = next;
        Ok(())
    }

    /// Applies `records` and `meta` to their trees in one sled transaction.
    fn write_atomically(
        &self,
        records: &sled::Batch,
        meta: &sled::Batch,
        doing: &str,
    ) -> io::Result<()> {
        (&self.inner.records, &self.inner.meta)
            .transaction(|(records_tree, meta_tree)| {
                records_tree.apply_batch(records)?;
                meta_tree.apply_batch(meta)?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| io_err(format!("{doing}: {e:?}")))
    }

    fn meta_batch(&self, applied: &Applied) -> io::Result<sled::Batch> {
        let mut batch = sled::Batch::default();
        batch.insert(
            APPLIED,
            serde_json::to_vec(&applied.last_applied).map_err(io_err)?,
        );
        batch.insert(
            MEMBERSHIP,
            serde_json::to_vec(&applied.last_membership).map_err(io_err)?,
        );
        Ok(batch)
    }

    /// Applies `pending` in memory and persists the records they touched (their values
    /// from `value_of`), the applied log id and the membership in one atomic batch. On
    /// `Err` nothing was persisted and the in-memory state is reloaded from disk, so it is
    /// as it was before the call.
    fn apply_entries(
        &self,
        pending: Vec<EntryResponder<TypeConfig>>,
        value_of: impl Fn(&State, &Record) -> Result<Option<serde_json::Value>, serde_json::Error>,
    ) -> io::Result<Vec<(Option<ApplyResponder<TypeConfig>>, Response)>> {
        let mut replies = Vec::with_capacity(pending.len());
        let mut applied = self.lock();
        let persisted = (|| {
            let mut touched = Vec::new();
            for (entry, responder) in pending {
                applied.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    EntryPayload::Normal(command) => {
                        let before = crate::metrics::Before::of(&applied.state, &command);
                        let noted = crate::notify::Before::of(&applied.state, &command);
                        let (response, records) = applied.state.apply(&command);
                        crate::notify::applied(
                            &noted,
                            &command,
                            entry.log_id.index,
                            &applied.state,
                            &records,
                        );
                        crate::metrics::recorder().applied(
                            before,
                            &command,
                            &applied.state,
                            &records,
                        );
                        touched.extend(records);
                        response
                    }
                    EntryPayload::Membership(membership) => {
                        applied.last_membership =
                            StoredMembership::new(Some(entry.log_id), membership);
                        Response::Ok
                    }
                };
                replies.push((responder, response));
            }
            touched.sort();
            touched.dedup();
            let mut batch = sled::Batch::default();
            write_records(&mut batch, &applied.state, &touched, &value_of)?;
            let meta = self.meta_batch(&applied)?;
            self.write_atomically(&batch, &meta, "applying entries")
        })();
        if let Err(error) = persisted {
            // Memory went ahead of the disk: put back what the disk holds.
            match Self::load(&self.inner.records, &self.inner.meta) {
                Ok(on_disk) => *applied = on_disk,
                Err(e) => {
                    tracing::error!(error = %e, "reloading the state machine after a failed apply")
                }
            }
            return Err(error);
        }
        Ok(replies)
    }

    fn snapshot_of(applied: &Applied) -> io::Result<Snapshot> {
        let data = serde_json::to_vec(applied).map_err(io_err)?;
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
            },
            snapshot: data,
        })
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        batch.insert(
            SNAPSHOT_META,
            serde_json::to_vec(&snapshot.meta).map_err(io_err)?,
        );
        batch.insert(SNAPSHOT_DATA, snapshot.snapshot.as_slice());
        batch.remove(LEGACY_SNAPSHOT);
        self.inner.meta.apply_batch(batch).map_err(io_err)?;
        // Logs up to the snapshot may be purged next: the snapshot must be durable first.
        self.inner.meta.flush_async().await.map_err(io_err)?;
        self.inner.records.flush_async().await.map_err(io_err)?;
        Ok(())
    }
}

use sled::Transactional;

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        // sled has no point-in-time view: copy the state under the lock, serialize outside it.
        let copy = self.lock().clone();
        let snapshot = Self::snapshot_of(&copy)?;
        self.save_snapshot(&snapshot).await?;
        Ok(snapshot)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let applied = self.lock();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut pending = Vec::new();
        while let Some(item) = entries.try_next().await? {
            pending.push(item);
        }
        if pending.is_empty() {
            return Ok(());
        }
        for (responder, response) in self.apply_entries(pending, State::record_value)? {
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let next: Applied = serde_json::from_slice(&snapshot).map_err(io_err)?;
        if next.last_applied != meta.last_log_id {
            return Err(io_err(format!(
                "snapshot data is at {:?} but its metadata says {:?}",
                next.last_applied, meta.last_log_id
            )));
        }
        self.replace(next)?;
        self.save_snapshot(&Snapshot {
            meta: meta.clone(),
            snapshot,
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let meta_tree = &self.inner.meta;
        if let Some(meta) = meta_tree.get(SNAPSHOT_META).map_err(io_err)? {
            let data = meta_tree
                .get(SNAPSHOT_DATA)
                .map_err(io_err)?
                .ok_or_else(|| io_err("the snapshot's metadata is stored but not its data"))?;
            return Ok(Some(Snapshot {
                meta: serde_json::from_slice(&meta).map_err(io_err)?,
                snapshot: data.to_vec(),
            }));
        }
        let Some(bytes) = meta_tree.get(LEGACY_SNAPSHOT).map_err(io_err)? else {
            return Ok(None);
        };
        let stored: LegacySnapshot = serde_json::from_slice(&bytes).map_err(io_err)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: stored.data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;

    use super::*;
    use crate::raft::typ::Entry;
    use crate::state::Command;

    fn put(index: u64, key: &str, value: &str) -> EntryResponder<TypeConfig> {
        let log_id = openraft::testing::log_id::<TypeConfig>(1, 1, index);
        let command = Command::KvPut {
            key: key.into(),
            value: value.into(),
        };
        (Entry::new_normal(log_id, command), None)
    }

    /// The value of `key` as sled holds it.
    fn on_disk(sm: &StateMachineStore, key: &str) -> Option<String> {
        let bytes = sm
            .inner
            .records
            .get(record_key(&Record::Kv(key.into())))
            .unwrap()?;
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_record_that_fails_to_encode_is_an_error_never_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = super::super::open(dir.path()).await.unwrap();
        sm.apply_entries(vec![put(1, "k", "v1")], State::record_value)
            .unwrap();
        let before = sm.read(State::clone);
        let poisoned = |state: &State, record: &Record| match record {
            Record::Kv(key) if key == "k" => Err(serde::ser::Error::custom("cannot encode")),
            _ => state.record_value(record),
        };
        let Err(err) = sm.apply_entries(vec![put(2, "k", "v2")], poisoned) else {
            panic!("an apply whose record cannot be encoded must fail");
        };
        assert!(err.to_string().contains("Kv(\"k\")"), "{err}");
        // Nothing persisted, nothing deleted, and memory is what it was.
        assert_eq!(on_disk(&sm, "k").as_deref(), Some("v1"));
        assert_eq!(sm.read(State::clone), before);
        assert_eq!(sm.lock().last_applied.map(|id| id.index), Some(1));
    }

    #[test]
    fn record_keys_round_trip() {
        for record in [
            Record::ClusterId,
            Record::Node(7),
            Record::Kv("a/b c".into()),
            Record::Kv(String::new()),
            Record::Deployment,
            Record::DeploymentManifest,
            Record::History(12),
            Record::LastGeneration,
            Record::Fleet,
        ] {
            assert_eq!(parse_record_key(&record_key(&record)), Some(record));
        }
        assert_eq!(parse_record_key(b"bogus"), None);
        assert_eq!(parse_record_key(b"history/x"), None);
    }

    #[tokio::test]
    async fn a_snapshot_is_stored_as_raw_bytes_and_the_old_json_form_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, mut sm) = super::super::open(dir.path()).await.unwrap();
        sm.apply_entries(vec![put(1, "k", "v")], State::record_value)
            .unwrap();
        let legacy_meta = SnapshotMeta {
            last_log_id: Some(openraft::testing::log_id::<TypeConfig>(1, 1, 1)),
            ..SnapshotMeta::default()
        };
        let legacy = LegacySnapshot {
            meta: legacy_meta.clone(),
            data: b"{\"old\":1}".to_vec(),
        };
        let meta_tree = sm.inner.meta.clone();
        meta_tree
            .insert(LEGACY_SNAPSHOT, serde_json::to_vec(&legacy).unwrap())
            .unwrap();
        let read = sm.get_current_snapshot().await.unwrap().expect("old form");
        assert_eq!((read.meta, read.snapshot), (legacy_meta, legacy.data));

        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let stored = meta_tree.get(SNAPSHOT_DATA).unwrap().expect("raw bytes");
        assert_eq!(stored.as_ref(), built.snapshot.as_slice());
        assert_eq!(meta_tree.get(LEGACY_SNAPSHOT).unwrap(), None);
        let read = sm.get_current_snapshot().await.unwrap().expect("new form");
        assert_eq!((read.meta, read.snapshot), (built.meta, built.snapshot));
    }
}
