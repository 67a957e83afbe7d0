//! The Raft state machine over the `state` column family.
//!
//! Each entry is applied in one WriteBatch that also records the last applied log id (and
//! membership), so a restart neither replays nor half-applies an entry. A batch entry
//! (`Command::Batch`, see `raft::batch`) is one WriteBatch per command, each recording how
//! far the entry has come, the last one the applied id: a restart goes on after the last
//! command written. Snapshots are a
//! consistent RocksDB snapshot of the state column family, framed as length-prefixed pairs
//! and streamed into a file (`{data_dir}/raft-snapshots/{id}.snap`): building one never
//! holds the state in memory, and openraft sends and receives it in chunks from and to
//! that file. The current snapshot's meta (and file name) is kept in `raft_meta`.
//!
//! Installing a received snapshot does not hold it in memory either:
//!
//! ```text
//!   begin   synced batch: marker {meta, file} + the state cleared      ─┐ a crash in here:
//!   fill    the file's pairs in batches of INSTALL_BATCH_BYTES, no WAL  │ the next start
//!           then the state column family flushed (the pairs durable)    │ installs the file
//!   finish  synced batch: applied id, membership, current snapshot,     │ again (the marker
//!           marker removed                                             ─┘ names it)
//! ```
//!
//! While the state is between two snapshots, [`StateMachine::installs`] says so, and
//! reads wait (see `Cluster::linearize`).

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
/// Present while a received snapshot is being installed: what to install again after a
/// crash (an [`Install`]).
const SNAPSHOT_INSTALLING: &[u8] = b"snapshot_installing";
/// How many bytes of pairs go into one write while a snapshot is installed.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// The largest key or value a snapshot file may hold: more says the file is damaged.
const MAX_FRAME_BYTES: usize = 1 << 30;
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

/// A snapshot install under way, as kept in `raft_meta` until it is complete: the same
/// shape as the current snapshot's record, which it becomes.
type Install = StoredSnapshot;

/// Says a snapshot install is under way while it lives.
struct Installing<'a>(&'a watch::Sender<bool>);

impl<'a> Installing<'a> {
    fn start(tx: &'a watch::Sender<bool>) -> Self {
        tx.send_replace(true);
        Installing(tx)
    }
}

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.send_replace(false);
    }
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
    /// Whether a snapshot is being installed (the state is then incomplete).
    installing: Arc<watch::Sender<bool>>,
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
            installing: Arc::new(watch::channel(false).0),
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

    /// Follows whether a snapshot is being installed: while it is, the state is partly
    /// the old one's and partly the new one's, and must not be read.
    pub(crate) fn installs(&self) -> watch::Receiver<bool> {
        self.installing.subscribe()
    }

    /// Completes a snapshot install that a crash interrupted, before anything reads the
    /// state (call it before Raft starts), and removes files left by snapshots that were
    /// being built or received. Fails when the install's file is gone: the state is then
    /// incomplete, and the node must be rebuilt from the cluster.
    pub(crate) fn finish_interrupted_install(&self) -> Result<bool, StorageError<NodeId>> {
        let dir = self.snapshot_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let cf = self.store.cf(CF_RAFT_META);
        let Some(raw) = self
            .store
            .db()
            .get_pinned_cf(cf, SNAPSHOT_INSTALLING)
            .map_err(io_err)?
        else {
            return Ok(false);
        };
        let install: Install = serde_json::from_slice(&raw).map_err(io_err)?;
        let path = dir.join(&install.file);
        if !path.exists() {
            return Err(io_err(std::io::Error::other(format!(
                "a snapshot install was interrupted and its file {} is gone, so this node's \
                 state is incomplete: remove the node from the cluster, empty its data \
                 directory and add it again",
                path.display()
            ))));
        }
        tracing::warn!(
            snapshot = %install.meta.snapshot_id,
            "completing a snapshot install that was interrupted"
        );
        self.install_file(&install.meta, &install.file)?;
        self.applied_tx.send_replace(self.applied_index());
        Ok(true)
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
        let mut batch = WriteBatch::default();
        self.put_current_snapshot(&mut batch, meta, file)?;
        self.write_synced(batch)?;
        self.remove_other_snapshots(file);
        Ok(())
    }

    /// Writes `batch` and syncs RocksDB's log before returning.
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StorageError<NodeId>> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store.db().write_opt(batch, &opts).map_err(io_err)
    }

    /// Records `file` as the current snapshot in `batch`.
    fn put_current_snapshot(
        &self,
        batch: &mut WriteBatch,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        file: &str,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
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
        Ok(())
    }

    /// Removes every snapshot file but `file`.
    fn remove_other_snapshots(&self, file: &str) {
        if let Ok(entries) = std::fs::read_dir(self.snapshot_dir()) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.ends_with(".snap") && name != file {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
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

    /// Replaces the state with the pairs of `file` (in the snapshot directory) and makes
    /// it the current snapshot, in bounded memory and so that a crash part way leaves a
    /// marker from which [`Self::finish_interrupted_install`] starts again (see the
    /// module's doc).
    fn install_file(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        file: &str,
    ) -> Result<(), StorageError<NodeId>> {
        let _installing = Installing::start(&self.installing);
        self.begin_install(meta, file)?;
        self.fill_from(&self.snapshot_dir().join(file))?;
        self.finish_install(meta, file)
    }

    /// Records the install under way and clears the state, durably, in one batch.
    fn begin_install(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        file: &str,
    ) -> Result<(), StorageError<NodeId>> {
        let install = Install {
            meta: meta.clone(),
            file: file.to_owned(),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.store.cf(CF_RAFT_META),
            SNAPSHOT_INSTALLING,
            serde_json::to_vec(&install).map_err(io_err)?,
        );
        batch.delete_range_cf(
            self.store.cf(CF_STATE),
            [0u8].as_slice(),
            [0xffu8; 8].as_slice(),
        );
        self.write_synced(batch)
    }

    /// Writes the pairs of a snapshot file into the state, a few MiB at a time, then
    /// flushes the state column family so that they are durable: the writes skip the
    /// WAL, since a crash before the install's end starts it again anyway.
    fn fill_from(&self, path: &std::path::Path) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_STATE);
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        let mut input =
            BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io_err)?);
        let mut batch = WriteBatch::default();
        while let Some(k) = read_frame(&mut input, true).map_err(io_err)? {
            let v = read_frame(&mut input, false)
                .map_err(io_err)?
                .ok_or_else(|| io_err(Truncated))?;
            batch.put_cf(cf, k, v);
            if batch.size_in_bytes() >= INSTALL_BATCH_BYTES {
                let full = std::mem::take(&mut batch);
                self.store.db().write_opt(full, &opts).map_err(io_err)?;
            }
        }
        self.store.db().write_opt(batch, &opts).map_err(io_err)?;
        self.store.db().flush_cf(cf).map_err(io_err)
    }

    /// Ends an install durably in one batch: the applied id and membership, the file as
    /// the current snapshot, the marker gone; then removes earlier snapshots' files.
    fn finish_install(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        file: &str,
    ) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::default();
        if let Some(l) = &meta.last_log_id {
            self.write_bookkeeping(&mut batch, l, Some(&meta.last_membership))?;
        }
        self.put_current_snapshot(&mut batch, meta, file)?;
        batch.delete_cf(self.store.cf(CF_RAFT_META), SNAPSHOT_INSTALLING);
        self.write_synced(batch)?;
        self.remove_other_snapshots(file);
        Ok(())
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
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("snapshot frame of {len} bytes: the file is damaged"),
        ));
    }
    let mut buf = vec![0u8; len];
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

impl StateMachine {
    /// Applies the commands of the batch entry at `index` in turn, each written before the
    /// next is decided (it may read what the one before wrote), with how far the entry has
    /// come; the last command's writes are left in `batch`, for the entry's bookkeeping to
    /// join. A restart in the middle goes on after the last command written: the state is
    /// then what applying the whole entry once gives, on every node. (Those commands'
    /// answers are lost with the restart; nobody waits for them on this node any more.)
    fn apply_batch(
        &self,
        batch: &mut WriteBatch,
        cmds: &[Command],
        index: u64,
    ) -> Result<Vec<CommandResult>, StorageError<NodeId>> {
        let from = match self.read_meta::<(u64, usize)>(keys::BATCH_PROGRESS)? {
            Some((at, next)) if at == index => next,
            _ => 0,
        };
        let cf = self.store.cf(CF_STATE);
        let mut each = Vec::with_capacity(cmds.len());
        for (i, cmd) in cmds.iter().enumerate() {
            if i < from {
                each.push(CommandResult::Done);
                continue;
            }
            let r = apply(&self.store, batch, cmd, index).map_err(io_err)?;
            each.push(r);
            if i + 1 == cmds.len() {
                break;
            }
            let progress = serde_json::to_vec(&(index, i + 1)).map_err(io_err)?;
            batch.put_cf(cf, keys::BATCH_PROGRESS, progress);
            self.store
                .db()
                .write_opt(std::mem::take(batch), &WriteOptions::default())
                .map_err(io_err)?;
            self.after_apply(cmd);
        }
        batch.delete_cf(cf, keys::BATCH_PROGRESS);
        Ok(each)
    }

    /// After `cmd`'s writes: the read cache learns of them, and the blobs a new version
    /// names are checked for (pulled when this node lacks them).
    fn after_apply(&self, cmd: &Command) {
        self.cache.applied(cmd);
        if let (
            Some(tx),
            Command::PublishVersion { version, .. } | Command::RetainVersion { version, .. },
        ) = (&self.blob_refs, cmd)
        {
            for a in &version.assets {
                let _ = tx.try_send(a.hashes.sha256.clone());
            }
        }
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
                EntryPayload::Normal(Command::Batch(cmds)) => {
                    let each = self.apply_batch(&mut batch, cmds, entry.log_id.index)?;
                    self.write_bookkeeping(&mut batch, &entry.log_id, None)?;
                    CommandResult::Batch(each)
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
            match &entry.payload {
                // The others were taken care of as they were written.
                EntryPayload::Normal(Command::Batch(cmds)) => {
                    if let Some(last) = cmds.last() {
                        self.after_apply(last);
                    }
                }
                EntryPayload::Normal(cmd) => self.after_apply(cmd),
                _ => {}
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
        // Under its final name first: the install's marker names the file it reads.
        let file = format!("{}.snap", meta.snapshot_id);
        tokio::fs::rename(&received, self.snapshot_dir().join(&file))
            .await
            .map_err(io_err)?;
        let this = self.clone();
        let m = meta.clone();
        tokio::task::spawn_blocking(move || this.install_file(&m, &file))
            .await
            .map_err(io_err)??;
        self.cache.invalidate_all();
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

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, Membership};

    use crate::state::command::ApplyError;

    use super::*;

    /// Every pair of the state column family.
    fn state_of(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
        store
            .db()
            .iterator_cf(store.cf(CF_STATE), IteratorMode::Start)
            .map(|item| {
                let (k, v) = item.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect()
    }

    /// A state machine whose state holds `pairs` values of 4 KiB (more than two install
    /// batches in all), applied up to index 500.
    fn source(dir: &std::path::Path, pairs: usize) -> StateMachine {
        let sm = StateMachine::new(Store::open(dir).unwrap(), Default::default());
        let cf = sm.store.cf(CF_STATE);
        let mut batch = WriteBatch::default();
        for i in 0..pairs {
            let value = vec![(i % 251) as u8; 4096];
            batch.put_cf(cf, format!("P\0pkg-{i:06}").as_bytes(), value);
        }
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 500);
        let membership = StoredMembership::new(
            Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
            Membership::new(vec![[1, 2, 3].into()], None),
        );
        sm.write_bookkeeping(&mut batch, &log_id, Some(&membership))
            .unwrap();
        sm.store.db().write(batch).unwrap();
        sm
    }

    /// A state machine with a state of its own, some of it not in `source`'s.
    fn target(dir: &std::path::Path) -> StateMachine {
        let sm = StateMachine::new(Store::open(dir).unwrap(), Default::default());
        let cf = sm.store.cf(CF_STATE);
        sm.store.db().put_cf(cf, b"P\0pkg-000001", b"old").unwrap();
        sm.store.db().put_cf(cf, b"P\0only-here", b"old").unwrap();
        let mut batch = WriteBatch::default();
        let log_id = LogId::new(CommittedLeaderId::new(1, 1), 20);
        sm.write_bookkeeping(&mut batch, &log_id, None).unwrap();
        sm.store.db().write(batch).unwrap();
        sm
    }

    fn marker(sm: &StateMachine) -> Option<Vec<u8>> {
        sm.store
            .db()
            .get_cf(sm.store.cf(CF_RAFT_META), SNAPSHOT_INSTALLING)
            .unwrap()
    }

    #[tokio::test]
    async fn a_received_snapshot_replaces_the_state_in_several_writes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let src = source(a.path(), 3000);
        let (meta, file) = src.write_snapshot_file().unwrap();
        let bytes = std::fs::read(src.snapshot_dir().join(&file)).unwrap();
        assert!(bytes.len() > 2 * INSTALL_BATCH_BYTES);

        let mut dst = target(b.path());
        let mut receiving = dst.begin_receiving_snapshot().await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut receiving, &bytes)
            .await
            .unwrap();
        let mut installs = dst.installs();
        dst.install_snapshot(&meta, receiving).await.unwrap();

        assert_eq!(state_of(&dst.store), state_of(&src.store));
        assert!(!state_of(&dst.store).contains_key(b"P\0only-here".as_slice()));
        let (applied, membership) = dst.applied_state().await.unwrap();
        assert_eq!(applied, meta.last_log_id);
        assert_eq!(membership, meta.last_membership);
        assert_eq!(*dst.subscribe().borrow(), 500);
        assert!(marker(&dst).is_none(), "the install's marker is removed");
        assert!(installs.has_changed().unwrap(), "the install was announced");
        assert!(!*installs.borrow_and_update(), "and its end");
        let current = dst.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, meta);
        let files: Vec<_> = std::fs::read_dir(dst.snapshot_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files, [file], "only the current snapshot's file is kept");
    }

    #[test]
    fn an_install_cut_short_by_a_crash_is_completed_at_the_next_start() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let src = source(a.path(), 1500);
        let (meta, file) = src.write_snapshot_file().unwrap();
        {
            let dst = target(b.path());
            std::fs::create_dir_all(dst.snapshot_dir()).unwrap();
            std::fs::copy(
                src.snapshot_dir().join(&file),
                dst.snapshot_dir().join(&file),
            )
            .unwrap();
            std::fs::write(dst.snapshot_dir().join("receiving-1.tmp"), b"left").unwrap();
            // The crash: after the install began and wrote some pairs, before its end.
            dst.begin_install(&meta, &file).unwrap();
            let cf = dst.store.cf(CF_STATE);
            dst.store
                .db()
                .put_cf(cf, b"P\0pkg-000000", b"partial")
                .unwrap();
            assert!(marker(&dst).is_some());
        }

        let dst = StateMachine::new(Store::open(b.path()).unwrap(), Default::default());
        assert!(dst.finish_interrupted_install().unwrap());
        assert_eq!(state_of(&dst.store), state_of(&src.store));
        assert_eq!(dst.last_applied().unwrap(), meta.last_log_id);
        assert_eq!(*dst.subscribe().borrow(), 500);
        assert!(marker(&dst).is_none());
        assert!(!dst.snapshot_dir().join("receiving-1.tmp").exists());
        // Nothing left to complete.
        assert!(!dst.finish_interrupted_install().unwrap());
    }

    #[test]
    fn an_interrupted_install_whose_file_is_gone_stops_the_node() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let src = source(a.path(), 10);
        let (meta, file) = src.write_snapshot_file().unwrap();
        {
            let dst = target(b.path());
            std::fs::create_dir_all(dst.snapshot_dir()).unwrap();
            dst.begin_install(&meta, &file).unwrap();
        }
        let dst = StateMachine::new(Store::open(b.path()).unwrap(), Default::default());
        let err = dst.finish_interrupted_install().unwrap_err().to_string();
        assert!(err.contains("is gone"), "{err}");
        assert!(
            marker(&dst).is_some(),
            "the marker stays until it is dealt with"
        );
    }

    /// A command creating domain `name`.
    pub(crate) fn domain(name: &str) -> Command {
        Command::CreateDomain(crate::state::model::DomainRecord {
            name: name.into(),
            owner: "111122223333".into(),
            created_ms: 0,
            encryption_key: String::new(),
            tags: Vec::new(),
        })
    }

    /// A command creating repository `name` in `domain`.
    pub(crate) fn repository(domain: &str, name: &str) -> Command {
        Command::CreateRepository(crate::state::model::RepositoryRecord {
            domain: domain.into(),
            name: name.into(),
            administrator: "111122223333".into(),
            description: None,
            upstreams: Vec::new(),
            external_connections: Vec::new(),
            created_ms: 0,
            tags: Vec::new(),
        })
    }

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    /// A batch entry's commands are applied in turn, each seeing what the ones before it
    /// wrote, each with its own result (a refusal changes nothing of the others); the
    /// state is what the same commands as entries of their own give.
    #[tokio::test]
    async fn a_batch_entry_applies_its_commands_in_turn() {
        let (one, apart) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cmds = vec![domain("a"), repository("a", "r"), domain("a"), domain("b")];
        let mut sm = StateMachine::new(Store::open(one.path()).unwrap(), Default::default());
        let results = sm
            .apply([entry(1, Command::Batch(cmds.clone()))])
            .await
            .unwrap();
        let [CommandResult::Batch(each)] = &results[..] else {
            panic!("one batch result: {results:?}")
        };
        assert!(
            matches!(
                &each[..],
                [
                    CommandResult::Domain(_),
                    CommandResult::Repository(_),
                    CommandResult::Failed(ApplyError::Conflict { .. }),
                    CommandResult::Domain(_),
                ]
            ),
            "{each:?}"
        );
        assert_eq!(sm.applied_index(), 1);

        let mut separate =
            StateMachine::new(Store::open(apart.path()).unwrap(), Default::default());
        for (i, cmd) in cmds.into_iter().enumerate() {
            separate.apply([entry(1, cmd)]).await.unwrap();
            assert_eq!(separate.applied_index(), 1, "entry {i}");
        }
        assert_eq!(state_of(&sm.store), state_of(&separate.store));
    }

    /// A node that stops in the middle of a batch entry (its first command written, the
    /// rest not) goes on from there when it applies the entry again: the first command is
    /// not decided a second time (it would be refused now, as its domain exists), and the
    /// state ends as if the entry had been applied once.
    #[tokio::test]
    async fn a_batch_cut_short_by_a_restart_goes_on_after_its_last_written_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cmds = vec![domain("b"), repository("b", "r")];
        // What applying entry 7 had written when the node stopped.
        let mut batch = WriteBatch::default();
        apply(&store, &mut batch, &cmds[0], 7).unwrap();
        batch.put_cf(
            store.cf(CF_STATE),
            keys::BATCH_PROGRESS,
            serde_json::to_vec(&(7u64, 1usize)).unwrap(),
        );
        store.db().write(batch).unwrap();

        let mut sm = StateMachine::new(store.clone(), Default::default());
        let results = sm.apply([entry(7, Command::Batch(cmds))]).await.unwrap();
        let [CommandResult::Batch(each)] = &results[..] else {
            panic!("one batch result: {results:?}")
        };
        assert!(
            matches!(
                &each[..],
                [CommandResult::Done, CommandResult::Repository(_)]
            ),
            "{each:?}"
        );
        assert_eq!(sm.applied_index(), 7);
        let state = crate::state::StateView::new(store.clone());
        assert!(state.domain("b").unwrap().is_some());
        assert!(state.repository("b", "r").unwrap().is_some());
        assert!(
            sm.read_meta::<(u64, usize)>(keys::BATCH_PROGRESS)
                .unwrap()
                .is_none(),
            "the progress is gone once the entry is applied"
        );
    }
}
