//! The Raft log and vote in RocksDB (`raft_log`, `raft_meta`).
//!
//! ```text
//!   RaftCore ── append(entries) ──▶ tail (in memory, readable at once)
//!                     │
//!                     └─ encoded ──▶ log-writer thread: one synced write per group,
//!                                    then each append's `LogFlushed` callback
//! ```
//!
//! An append returns as soon as its entries are in the in-memory tail, where readers
//! (replication to followers) find them; openraft is told they are flushed only after a
//! synced RocksDB write, so an entry acknowledged by this node survives a crash. The sync
//! happens on a thread of its own: it no longer stalls one of the runtime's workers, and
//! appends that arrive while one write is syncing share the next.
//!
//! The tail also keeps the last [`KEEP`] entries after they are written, so replication
//! reads recent entries without a RocksDB read and a decode each.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use super::{NodeId, TypeConfig, io_err};
use crate::store::{CF_RAFT_LOG, CF_RAFT_META, Store};

const VOTE: &[u8] = b"vote";
/// The key of the committed log id in `raft_meta`.
pub(crate) const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Written entries kept in memory for readers.
const KEEP: usize = 1024;
/// Appends taken into one synced write at most.
const MAX_GROUP: usize = 256;

/// The log store; cheap to clone (readers are clones).
#[derive(Clone)]
pub(crate) struct LogStore {
    store: Store,
    shared: Arc<Shared>,
}

/// How far this node's log appends have come: how many openraft started, and how many
/// of those are synced (their callbacks called). Raft's core waits for each append's
/// sync before it takes its next message, so a proposer that holds its next entry back
/// until the core is free again gathers what arrives meanwhile into it (`raft::batch`).
#[derive(Default)]
pub(crate) struct AppendProgress {
    started: AtomicU64,
    done: AtomicU64,
    changed: tokio::sync::Notify,
}

impl AppendProgress {
    /// Appends started so far.
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Waits until an append started after `seen` appends had, and every append started
    /// by then is synced; or until `limit` passes.
    pub(crate) async fn wait_synced_after(&self, seen: u64, limit: std::time::Duration) {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let started = self.started.load(Ordering::Acquire);
            if started > seen && self.done.load(Ordering::Acquire) >= started {
                return;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return;
            }
        }
    }

    fn finished(&self, n: u64) {
        self.done.fetch_add(n, Ordering::AcqRel);
        self.changed.notify_waiters();
    }
}

/// What every clone shares: the tail and the writer.
struct Shared {
    /// Entries in index order: every one not yet written, then up to [`KEEP`] written ones.
    tail: Mutex<VecDeque<Entry<TypeConfig>>>,
    /// Index of the last entry written and synced (0: none yet).
    written: Arc<AtomicU64>,
    writer: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    progress: Arc<AppendProgress>,
}

/// Work for the writer thread, done in the order sent.
enum Job {
    /// Encoded entries `(index, bytes)` and the callback to call once they are synced.
    Append(Vec<(u64, Vec<u8>)>, LogFlushed<TypeConfig>),
    /// The committed log id, encoded: written with the next appends (in their synced
    /// batch), or alone and unsynced when none are waiting. Raft's core hands it over and
    /// goes on; it only speeds up a restart, which may find an older one.
    Committed(Vec<u8>),
    /// Anything else that must be ordered after earlier appends (truncate, purge); after
    /// it, no entry above the given index counts as written.
    Write(
        WriteBatch,
        u64,
        tokio::sync::oneshot::Sender<Result<(), String>>,
    ),
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer holds the database open: let it finish its queue before the node's
        // files are reopened (a restart in the same process).
        drop(self.writer.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl LogStore {
    pub(crate) fn new(store: Store) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let written = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(AppendProgress::default());
        let thread = {
            let (store, written, progress) = (store.clone(), written.clone(), progress.clone());
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_loop(&store, &written, &progress, rx))
                .expect("starting the raft log writer")
        };
        LogStore {
            store,
            shared: Arc::new(Shared {
                tail: Mutex::new(VecDeque::new()),
                written,
                writer: Some(tx),
                thread: Some(thread),
                progress,
            }),
        }
    }

    /// How far appends have come (see [`AppendProgress`]).
    pub(crate) fn progress(&self) -> Arc<AppendProgress> {
        self.shared.progress.clone()
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry<TypeConfig>>> {
        self.shared.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, job: Job) -> Result<(), StorageError<NodeId>> {
        self.shared
            .writer
            .as_ref()
            .and_then(|w| w.send(job).ok())
            .ok_or_else(|| io_err(std::io::Error::other("the raft log writer stopped")))
    }

    /// Writes `batch` after every append sent before it, and waits for it; `written_cap`
    /// is the last index that may still count as written afterwards.
    async fn write_ordered(
        &self,
        batch: WriteBatch,
        written_cap: u64,
    ) -> Result<(), StorageError<NodeId>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Write(batch, written_cap, tx))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_err(std::io::Error::other(e))),
            Err(_) => Err(io_err(std::io::Error::other("the raft log writer stopped"))),
        }
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

    /// Writes a value of `raft_meta`, synced (the vote, the purge point).
    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_META);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        self.store
            .db()
            .put_cf_opt(cf, key, bytes, &opts)
            .map_err(io_err)
    }

    fn last_entry(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        if let Some(e) = self.tail().back() {
            return Ok(Some(e.log_id));
        }
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

    /// Entries `[start, end)` from RocksDB.
    fn read_stored(
        &self,
        start: u64,
        end: u64,
        out: &mut Vec<Entry<TypeConfig>>,
    ) -> Result<(), StorageError<NodeId>> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let from = start.to_be_bytes();
        for item in self
            .store
            .db()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(io_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| io_err(BadKey))?);
            if idx >= end {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(io_err)?);
        }
        Ok(())
    }
}

/// The writer thread: takes every job waiting, writes consecutive appends in one synced
/// batch, then calls their callbacks in order.
fn write_loop(
    store: &Store,
    written: &AtomicU64,
    progress: &AppendProgress,
    rx: mpsc::Receiver<Job>,
) {
    let mut sync = WriteOptions::default();
    sync.set_sync(true);
    let unsynced = WriteOptions::default();
    while let Some(jobs) = crate::store::next_group(&rx, MAX_GROUP) {
        let cf = store.cf(CF_RAFT_LOG);
        let meta_cf = store.cf(CF_RAFT_META);
        let mut batch = WriteBatch::default();
        let mut callbacks = Vec::new();
        let mut last = None;
        let flush = |batch: &mut WriteBatch,
                     callbacks: &mut Vec<LogFlushed<TypeConfig>>,
                     last: &mut Option<u64>| {
            if batch.is_empty() {
                return;
            }
            // Only appends need the sync; a lone committed id does not.
            let opts = if callbacks.is_empty() {
                &unsynced
            } else {
                &sync
            };
            let result = store.db().write_opt(std::mem::take(batch), opts);
            if result.is_ok()
                && let Some(i) = last.take()
            {
                written.store(i, Ordering::Release);
            }
            let n = callbacks.len() as u64;
            for cb in callbacks.drain(..) {
                cb.log_io_completed(
                    result
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string())),
                );
            }
            if n > 0 {
                progress.finished(n);
            }
        };
        for job in jobs {
            match job {
                Job::Append(entries, cb) => {
                    for (index, bytes) in entries {
                        batch.put_cf(cf, index.to_be_bytes(), bytes);
                        last = Some(index);
                    }
                    callbacks.push(cb);
                }
                Job::Committed(bytes) => batch.put_cf(meta_cf, COMMITTED, bytes),
                Job::Write(other, cap, reply) => {
                    flush(&mut batch, &mut callbacks, &mut last);
                    let result = store.db().write_opt(other, &sync);
                    written.fetch_min(cap, Ordering::AcqRel);
                    let _ = reply.send(result.map_err(|e| e.to_string()));
                }
            }
        }
        flush(&mut batch, &mut callbacks, &mut last);
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        // The tail first: an entry leaves it only once written, so whatever lies below
        // its first index is in RocksDB.
        let (first, cached) = {
            let tail = self.tail();
            let first = tail.front().map_or(u64::MAX, |e| e.log_id.index);
            let lo = tail.partition_point(|e| e.log_id.index < start);
            let hi = tail.partition_point(|e| e.log_id.index < end);
            (first, tail.range(lo..hi).cloned().collect::<Vec<_>>())
        };
        let mut out = Vec::new();
        if start < first {
            self.read_stored(start, end.min(first), &mut out)?;
        }
        out.extend(cached);
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
        self.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not written here: a write to RocksDB from Raft's core task waits behind any
        // synced write group in progress (log appends, blob records), stalling the core.
        let bytes = serde_json::to_vec(&committed).map_err(io_err)?;
        self.send(Job::Committed(bytes))
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
        let entries: Vec<_> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.log_id.index, serde_json::to_vec(e).map_err(io_err)?));
        }
        {
            let mut tail = self.tail();
            // An append replaces whatever the tail holds from its first index on (openraft
            // truncates first; this keeps the tail ordered regardless).
            if let Some(first) = entries.first().map(|e| e.log_id.index) {
                while tail.back().is_some_and(|e| e.log_id.index >= first) {
                    tail.pop_back();
                }
            }
            tail.extend(entries);
            // Written entries beyond the last KEEP leave the tail.
            let written = self.shared.written.load(Ordering::Acquire);
            while tail.len() > KEEP && tail.front().is_some_and(|e| e.log_id.index <= written) {
                tail.pop_front();
            }
        }
        self.shared.progress.started.fetch_add(1, Ordering::AcqRel);
        self.send(Job::Append(encoded, callback))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.tail().retain(|e| e.log_id.index < log_id.index);
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(cf, u64::MAX.to_be_bytes());
        self.write_ordered(batch, log_id.index.saturating_sub(1))
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(PURGED, &log_id)?;
        self.tail().retain(|e| e.log_id.index > log_id.index);
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.write_ordered(batch, u64::MAX).await
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entries(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        indexes
            .map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(term, 1), i),
                payload: EntryPayload::Blank,
            })
            .collect()
    }

    async fn read(
        log: &mut LogStore,
        range: impl RangeBounds<u64> + Clone + Debug + OptionalSend,
    ) -> Vec<(u64, u64)> {
        log.try_get_log_entries(range)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn expect(
        term_of: impl Fn(u64) -> u64,
        indexes: std::ops::RangeInclusive<u64>,
    ) -> Vec<(u64, u64)> {
        indexes.map(|i| (term_of(i), i)).collect()
    }

    /// Reads stitch RocksDB (entries that left the tail) and the tail together, through
    /// truncation, overwrite and purge, and what was flushed is there after a reopen.
    #[tokio::test]
    async fn reads_span_the_tail_and_the_store_through_truncate_purge_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut log = LogStore::new(Store::open(dir.path()).unwrap());
            for start in (1..=3000).step_by(100) {
                log.blocking_append(entries(1, start..=start + 99))
                    .await
                    .unwrap();
            }
            // More than KEEP entries were written: the oldest are only in RocksDB.
            assert!(log.tail().len() <= KEEP + 100);
            assert!(log.tail().front().unwrap().log_id.index > 1);
            assert_eq!(read(&mut log, 1..=3000).await, expect(|_| 1, 1..=3000));
            assert_eq!(read(&mut log, 1500..2500).await, expect(|_| 1, 1500..=2499));
            assert_eq!(read(&mut log, 2990..).await, expect(|_| 1, 2990..=3000));
            assert_eq!(read(&mut log, 3001..).await, vec![]);

            // A new leader overwrites everything from 2500 on.
            log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 2500))
                .await
                .unwrap();
            assert_eq!(
                log.get_log_state()
                    .await
                    .unwrap()
                    .last_log_id
                    .map(|l| l.index),
                Some(2499)
            );
            log.blocking_append(entries(2, 2500..=2510)).await.unwrap();
            let term = |i: u64| if i >= 2500 { 2 } else { 1 };
            assert_eq!(read(&mut log, 2400..).await, expect(term, 2400..=2510));

            log.purge(LogId::new(CommittedLeaderId::new(1, 1), 100))
                .await
                .unwrap();
            assert_eq!(read(&mut log, 1..=200).await, expect(|_| 1, 101..=200));
        }
        // Every append above was flushed before it returned: all of it is on disk.
        let mut log = LogStore::new(Store::open(dir.path()).unwrap());
        let term = |i: u64| if i >= 2500 { 2 } else { 1 };
        assert_eq!(read(&mut log, 1..).await, expect(term, 101..=2510));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2510));
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(100));
    }

    /// The committed id is handed to the writer (Raft's core does not wait on RocksDB):
    /// it is read back once written, rides along with appends, and survives a reopen.
    #[tokio::test]
    async fn the_committed_id_is_written_by_the_writer_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let at = |i| Some(LogId::new(CommittedLeaderId::new(1, 1), i));
        {
            let mut log = LogStore::new(Store::open(dir.path()).unwrap());
            log.save_committed(at(5)).await.unwrap();
            // Alone, it is written unsynced by the writer, soon after.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while log.read_committed().await.unwrap() != at(5) {
                assert!(std::time::Instant::now() < deadline, "never written");
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            // With appends, it goes into their synced batch.
            log.save_committed(at(7)).await.unwrap();
            log.blocking_append(entries(1, 1..=10)).await.unwrap();
            assert_eq!(log.read_committed().await.unwrap(), at(7));
            log.save_committed(at(9)).await.unwrap();
        }
        // The writer finishes its queue before the store closes.
        let mut log = LogStore::new(Store::open(dir.path()).unwrap());
        assert_eq!(log.read_committed().await.unwrap(), at(9));
        assert_eq!(read(&mut log, 1..).await, expect(|_| 1, 1..=10));
    }
}
