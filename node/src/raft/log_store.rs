//! The Raft log and vote in RocksDB (`raft_log`, `raft_meta`).
//!
//! Appends are written with a WAL sync before openraft is told they are flushed: an entry
//! acknowledged by this node survives a crash.

use std::fmt::Debug;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use super::{NodeId, TypeConfig, io_err};
use crate::store::{CF_RAFT_LOG, CF_RAFT_META, Store};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// The log store; cheap to clone (readers are clones).
#[derive(Clone)]
pub(crate) struct LogStore {
    store: Store,
}

impl LogStore {
    pub(crate) fn new(store: Store) -> Self {
        LogStore { store }
    }

    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
        match self.store.db().get_pinned_cf(cf, key).map_err(io_err)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(io_err),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        sync: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        self.store
            .db()
            .put_cf_opt(cf, key, bytes, &opts)
            .map_err(io_err)
    }

    fn last_entry(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut iter = self.store.db().iterator_cf(cf, IteratorMode::End);
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, v) = item.map_err(io_err)?;
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(io_err)?;
                Ok(Some(e.log_id))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut out = Vec::new();
        let from = start.to_be_bytes();
        for item in self
            .store
            .db()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| io_err(BadKey))?);
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(io_err)?);
        }
        Ok(out)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("malformed raft log key")]
struct BadKey;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta(PURGED)?;
        let last = self.last_entry()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.put_meta(COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        for e in entries {
            let bytes = serde_json::to_vec(&e).map_err(io_err)?;
            batch.put_cf(cf, e.log_id.index.to_be_bytes(), bytes);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let res = self.store.db().write_opt(batch, &opts);
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(cf, u64::MAX.to_be_bytes());
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.store.db().write_opt(batch, &opts).map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(PURGED, &log_id, true)?;
        let cf = self.store.cf(CF_RAFT_LOG);
        self.store
            .db()
            .delete_range_cf(cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes())
            .map_err(io_err)
    }
}
