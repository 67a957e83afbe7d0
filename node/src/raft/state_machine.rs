//! The Raft state machine over the `state` column family.
//!
//! Each entry is applied in one WriteBatch that also records the last applied log id (and
//! membership), so a restart neither replays nor half-applies an entry. Snapshots are a
//! consistent RocksDB snapshot of the state column family, framed as length-prefixed pairs
//! and streamed into a file (`{data_dir}/raft-snapshots/{id}.snap`): building one never
//! holds the state in memory, and openraft sends and receives it in chunks from and to
//! that file. The current snapshot's meta (and file name) is kept in `raft_meta`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StoredMembership,
};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions};
use tokio::sync::watch;

use super::{NodeId, NodeInfo, TypeConfig, io_err};
use crate::state::apply::apply;
use crate::state::cache::ReadCache;
use crate::state::command::Command;
use crate::state::command::CommandResult;
use crate::state::keys;
use crate::store::{CF_RAFT_META, CF_STATE, Store};

const SNAPSHOT_META: &[u8] = b"snapshot_meta";
/// Where earlier versions kept the snapshot bytes themselves; removed when a snapshot is
/// saved.
const SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// The current snapshot, as kept in `raft_meta`.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    /// File name in the snapshot directory.
    file: String,
}

/// The state machine; clones share the store and the notification channel.
#[derive(Clone)]
pub(crate) struct StateMachine {
    store: Store,
    applied_tx: watch::Sender<u64>,
    cache: Arc<ReadCache>,
    /// Told the digests new versions refer to, so the node pulls those it lacks.
    blob_refs: Option<tokio::sync::mpsc::Sender<String>>,
    /// The file a snapshot being received is written to.
    receiving: Arc<Mutex<Option<PathBuf>>>,
}

impl StateMachine {
    /// A state machine over `store`, publishing its applied index (see [`Self::subscribe`])
    /// and invalidating `cache` as it applies.
    pub(crate) fn new(store: Store, cache: Arc<ReadCache>) -> Self {
        let sm = StateMachine {
            store,
            applied_tx: watch::channel(0).0,
            cache,
            blob_refs: None,
            receiving: Arc::default(),
        };
        sm.applied_tx.send_replace(sm.applied_index());
        sm
    }

    /// Reports the asset digests of applied versions on `tx` (best effort: when the
    /// queue is full, the periodic anti-entropy scan finds them instead).
    pub(crate) fn with_blob_refs(mut self, tx: tokio::sync::mpsc::Sender<String>) -> Self {
        self.blob_refs = Some(tx);
        self
    }

    /// Follows the applied index, updated as soon as entries are applied (before openraft
    /// learns of them).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self
            .store
            .db()
            .get_pinned_cf(self.store.cf(CF_STATE), key)
            .map_err(io_err)?
        {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io_err),
        }
    }

    fn last_applied(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.read_meta(keys::APPLIED)
    }

    fn applied_index(&self) -> u64 {
        self.last_applied().ok().flatten().map_or(0, |l| l.index)
    }

    fn write_bookkeeping(
        &self,
        batch: &mut WriteBatch,
        log_id: &LogId<NodeId>,
        membership: Option<&StoredMembership<NodeId, NodeInfo>>,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_STATE);
        batch.put_cf(
            cf,
            keys::APPLIED,
            serde_json::to_vec(log_id).map_err(io_err)?,
        );
        if let Some(m) = membership {
            batch.put_cf(cf, keys::MEMBERSHIP, serde_json::to_vec(m).map_err(io_err)?);
        }
        Ok(())
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.store.db().path().join("raft-snapshots")
    }

    /// Makes `file` (in the snapshot directory) the current snapshot and removes the
    /// files of earlier ones.
    fn save_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        file: &str,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
        let mut batch = WriteBatch::default();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            file: file.to_owned(),
        };
        batch.put_cf(
            cf,
            SNAPSHOT_META,
            serde_json::to_vec(&stored).map_err(io_err)?,
        );
        batch.delete_cf(cf, SNAPSHOT_DATA);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store.db().write_opt(batch, &opts).map_err(io_err)?;
        if let Ok(entries) = std::fs::read_dir(self.snapshot_dir()) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".snap") && name != file {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Writes the state, as of one RocksDB snapshot, into a new snapshot file: its meta
    /// (last applied, membership) comes from the same RocksDB snapshot, so they agree.
    fn write_snapshot_file(
        &self,
    ) -> Result<(SnapshotMeta<NodeId, NodeInfo>, String), StorageError<NodeId>> {
        let db = self.store.db();
        let cf = self.store.cf(CF_STATE);
        let snap = db.snapshot();
        let read = |key: &[u8]| -> Result<Option<Vec<u8>>, StorageError<NodeId>> {
            snap.get_cf(cf, key).map_err(io_err)
        };
        let last_applied: Option<LogId<NodeId>> = match read(keys::APPLIED)? {
            Some(v) => serde_json::from_slice(&v).map_err(io_err)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, NodeInfo> = match read(keys::MEMBERSHIP)? {
            Some(v) => serde_json::from_slice(&v).map_err(io_err)?,
            None => StoredMembership::default(),
        };
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, rand::random::<u32>()),
            None => format!("empty-{}", rand::random::<u32>()),
        };
        let dir = self.snapshot_dir();
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let file = format!("{snapshot_id}.snap");
        let tmp = dir.join(format!("{snapshot_id}.tmp"));
        let mut out =
            BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io_err)?);
        for item in snap.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            out.write_all(&(k.len() as u32).to_be_bytes())
                .map_err(io_err)?;
            out.write_all(&k).map_err(io_err)?;
            out.write_all(&(v.len() as u32).to_be_bytes())
                .map_err(io_err)?;
            out.write_all(&v).map_err(io_err)?;
        }
        let f = out.into_inner().map_err(|e| io_err(e.into_error()))?;
        f.sync_all().map_err(io_err)?;
        std::fs::rename(&tmp, dir.join(&file)).map_err(io_err)?;
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        Ok((meta, file))
    }

    /// Replaces the state with a received snapshot file's pairs, in one batch.
    fn install_file(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        path: &std::path::Path,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_STATE);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 8].as_slice());
        let mut input =
            BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io_err)?);
        while let Some(k) = read_frame(&mut input, true).map_err(io_err)? {
            let v = read_frame(&mut input, false)
                .map_err(io_err)?
                .ok_or_else(|| io_err(Truncated))?;
            batch.put_cf(cf, k, v);
        }
        if let Some(l) = &meta.last_log_id {
            self.write_bookkeeping(&mut batch, l, Some(&meta.last_membership))?;
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store.db().write_opt(batch, &opts).map_err(io_err)
    }
}

/// Reads one length-prefixed frame; `None` at a clean end (allowed only where `at_start`).
fn read_frame(input: &mut impl Read, at_start: bool) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && at_start => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut buf)?;
    Ok(Some(buf))
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot data is truncated")]
struct Truncated;

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let this = self.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || this.write_snapshot_file())
            .await
            .map_err(io_err)??;
        self.save_snapshot(&meta, &file)?;
        let data = tokio::fs::File::open(self.snapshot_dir().join(&file))
            .await
            .map_err(io_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>>
    {
        let applied = self.last_applied()?;
        let membership = self.read_meta(keys::MEMBERSHIP)?.unwrap_or_default();
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut last = None;
        for entry in entries {
            let mut batch = WriteBatch::default();
            let result = match &entry.payload {
                EntryPayload::Blank => {
                    self.write_bookkeeping(&mut batch, &entry.log_id, None)?;
                    CommandResult::Done
                }
                EntryPayload::Normal(cmd) => {
                    let r =
                        apply(&self.store, &mut batch, cmd, entry.log_id.index).map_err(io_err)?;
                    self.write_bookkeeping(&mut batch, &entry.log_id, None)?;
                    r
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    self.write_bookkeeping(&mut batch, &entry.log_id, Some(&stored))?;
                    CommandResult::Done
                }
            };
            // The log is durable; the state is rebuilt from it after a crash, so no sync.
            self.store
                .db()
                .write_opt(batch, &WriteOptions::default())
                .map_err(io_err)?;
            if let EntryPayload::Normal(cmd) = &entry.payload {
                self.cache.applied(cmd);
                if let (
                    Some(tx),
                    Command::PublishVersion { version, .. }
                    | Command::RetainVersion { version, .. },
                ) = (&self.blob_refs, cmd)
                {
                    for a in &version.assets {
                        let _ = tx.try_send(a.hashes.sha256.clone());
                    }
                }
            }
            last = Some(entry.log_id.index);
            results.push(result);
        }
        if let Some(index) = last {
            self.applied_tx.send_replace(index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let dir = self.snapshot_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(io_err)?;
        let path = dir.join(format!("receiving-{}.tmp", rand::random::<u64>()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(io_err)?;
        let previous = self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(path);
        if let Some(p) = previous {
            let _ = tokio::fs::remove_file(p).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        use tokio::io::AsyncWriteExt as _;
        let mut snapshot = snapshot;
        snapshot.flush().await.map_err(io_err)?;
        snapshot.sync_all().await.map_err(io_err)?;
        drop(snapshot);
        let received = self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| io_err(std::io::Error::other("no snapshot is being received")))?;
        let this = self.clone();
        let m = meta.clone();
        let path = received.clone();
        tokio::task::spawn_blocking(move || this.install_file(&m, &path))
            .await
            .map_err(io_err)??;
        self.cache.invalidate_all();
        let file = format!("{}.snap", meta.snapshot_id);
        tokio::fs::rename(&received, self.snapshot_dir().join(&file))
            .await
            .map_err(io_err)?;
        self.save_snapshot(meta, &file)?;
        if let Some(l) = &meta.last_log_id {
            self.applied_tx.send_replace(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let db = self.store.db();
        let cf = self.store.cf(CF_RAFT_META);
        let Some(raw) = db.get_pinned_cf(cf, SNAPSHOT_META).map_err(io_err)? else {
            return Ok(None);
        };
        // A meta in an older layout (bytes kept in RocksDB) is not used: openraft builds
        // a new snapshot when it needs one.
        let Ok(stored) = serde_json::from_slice::<StoredSnapshot>(&raw) else {
            return Ok(None);
        };
        match tokio::fs::File::open(self.snapshot_dir().join(&stored.file)).await {
            Ok(data) => Ok(Some(Snapshot {
                meta: stored.meta,
                snapshot: Box::new(data),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(e)),
        }
    }
}
