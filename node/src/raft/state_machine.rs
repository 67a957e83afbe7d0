//! The Raft state machine over the `state` column family.
//!
//! Each entry is applied in one WriteBatch that also records the last applied log id (and
//! membership), so a restart neither replays nor half-applies an entry. Snapshots are a
//! consistent RocksDB snapshot of the state column family, framed as length-prefixed pairs.

use std::io::Cursor;
use std::sync::Arc;

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
const SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// The state machine; clones share the store and the notification channel.
#[derive(Clone)]
pub(crate) struct StateMachine {
    store: Store,
    applied_tx: watch::Sender<u64>,
    cache: Arc<ReadCache>,
    /// Told the digests new versions refer to, so the node pulls those it lacks.
    blob_refs: Option<tokio::sync::mpsc::Sender<String>>,
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

    /// Follows the applied index.
    #[allow(dead_code)]
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

    /// Keeps a snapshot as the current one (meta as JSON, data raw), in one batch.
    fn save_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        data: &[u8],
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, SNAPSHOT_META, serde_json::to_vec(meta).map_err(io_err)?);
        batch.put_cf(cf, SNAPSHOT_DATA, data);
        self.store.db().write(batch).map_err(io_err)
    }

    fn encode_state(&self) -> Result<Vec<u8>, StorageError<NodeId>> {
        let snap = self.store.db().snapshot();
        let mut out = Vec::new();
        for item in snap.iterator_cf(self.store.cf(CF_STATE), IteratorMode::Start) {
            let (k, v) = item.map_err(io_err)?;
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(&k);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(&v);
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot data is truncated")]
struct Truncated;

/// One key-value pair of a snapshot.
type Pair<'a> = (&'a [u8], &'a [u8]);

fn decode_pairs(mut data: &[u8]) -> Result<Vec<Pair<'_>>, Truncated> {
    let mut out = Vec::new();
    let take = |d: &mut &[u8]| -> Result<usize, Truncated> {
        let (len, rest) = d.split_at_checked(4).ok_or(Truncated)?;
        *d = rest;
        Ok(u32::from_be_bytes(len.try_into().map_err(|_| Truncated)?) as usize)
    };
    while !data.is_empty() {
        let kl = take(&mut data)?;
        let (k, rest) = data.split_at_checked(kl).ok_or(Truncated)?;
        data = rest;
        let vl = take(&mut data)?;
        let (v, rest) = data.split_at_checked(vl).ok_or(Truncated)?;
        data = rest;
        out.push((k, v));
    }
    Ok(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Applied state and data come from one RocksDB snapshot, so they agree.
        let data = self.encode_state()?;
        let pairs = decode_pairs(&data).map_err(io_err)?;
        let mut last_applied: Option<LogId<NodeId>> = None;
        let mut membership = StoredMembership::default();
        for (k, v) in &pairs {
            if *k == keys::APPLIED {
                last_applied = serde_json::from_slice(v).map_err(io_err)?;
            } else if *k == keys::MEMBERSHIP {
                membership = serde_json::from_slice(v).map_err(io_err)?;
            }
        }
        let snapshot_id = match &last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, rand::random::<u32>()),
            None => format!("empty-{}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_snapshot(&meta, &data)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let pairs = decode_pairs(&data).map_err(io_err)?;
        let cf = self.store.cf(CF_STATE);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, [0u8].as_slice(), [0xffu8; 8].as_slice());
        for (k, v) in pairs {
            batch.put_cf(cf, k, v);
        }
        if let Some(l) = &meta.last_log_id {
            self.write_bookkeeping(&mut batch, l, Some(&meta.last_membership))?;
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store.db().write_opt(batch, &opts).map_err(io_err)?;
        self.cache.invalidate_all();
        self.save_snapshot(meta, &data)?;
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
        let (Some(meta), Some(data)) = (
            db.get_pinned_cf(cf, SNAPSHOT_META).map_err(io_err)?,
            db.get_cf(cf, SNAPSHOT_DATA).map_err(io_err)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: serde_json::from_slice(&meta).map_err(io_err)?,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
