//! Local storage of one node: a single RocksDB with one column family per concern.
//!
//! ```text
//!   raft_log   index (u64 BE)            → openraft Entry (JSON)
//!   raft_meta  "vote" | "committed" | "purged" | "snapshot"
//!   state      the replicated state machine (see `state::keys`)
//!   blobs      data id (16 B) ‖ chunk# (u32 BE) → chunk bytes      (older blobs only)
//!   blob_meta  sha256 (32 B)                → BlobMeta (JSON): where its chunks are
//!              "journal.head" | "journal.segments"  the blob journal's (see `segments`)
//! ```
//!
//! Blob bytes live beside the database, in append-only segment files under `blobs/`
//! (see [`segments`]).
//!
//! This module owns opening the database and checking its column families; the Raft log,
//! the state machine and the blob store each own their column families' contents.

pub(crate) mod blob;
mod chunk_cache;
pub(crate) mod segments;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, DB, Options};

pub(crate) const CF_RAFT_LOG: &str = "raft_log";
pub(crate) const CF_RAFT_META: &str = "raft_meta";
pub(crate) const CF_STATE: &str = "state";
pub(crate) const CF_BLOBS: &str = "blobs";
pub(crate) const CF_BLOB_META: &str = "blob_meta";

const ALL_CFS: [&str; 5] = [CF_RAFT_LOG, CF_RAFT_META, CF_STATE, CF_BLOBS, CF_BLOB_META];

/// Write-ahead log kept before RocksDB flushes the column families that hold its oldest
/// file, so that the file can go.
///
/// The small families (`raft_meta`, written with every commit; `state`; `blob_meta`)
/// seldom fill a memtable, and every WAL file stays until each family with data in it
/// has flushed. With RocksDB's default cap (four times all the memtables: ~2 GiB with
/// these families) a node that has been up for a while carries that much WAL, on disk
/// and replayed at every start: after two minutes of publishes a node held 377 MiB of
/// WAL and took 2.2 s to open with a cold page cache, where one without WAL took 0.2 s
/// (docs/BENCHMARKS.md). With this cap a start replays at most about a second's worth.
const MAX_TOTAL_WAL_BYTES: u64 = 128 << 20;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB reported an error (disk full, I/O error, corruption detected by RocksDB).
    #[error("storage: {0}")]
    Io(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError::Io(e.into_string())
    }
}

/// The node's RocksDB, shared by the Raft log, the state machine and the blob store.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl Store {
    /// Opens (or creates) the database under `dir`, with every column family.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, MAX_TOTAL_WAL_BYTES)
    }

    /// [`Store::open`] with another cap on the write-ahead log (tests use a small one).
    fn open_with(dir: &Path, max_total_wal_bytes: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        opts.set_max_total_wal_size(max_total_wal_bytes);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            if [CF_STATE, CF_BLOB_META].contains(name) {
                // Most point reads on the write path are misses: is this blob stored yet
                // (on the receiving node, on each replica, in the committer), does this
                // version exist (in apply). Bloom filters answer those without walking
                // the memtable's skip list (~2 % of a node's CPU under a publish load)
                // or reading an SST's index and data blocks.
                cf.set_memtable_prefix_bloom_ratio(0.05);
                cf.set_memtable_whole_key_filtering(true);
                let mut table = BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                table.set_whole_key_filtering(true);
                cf.set_block_based_table_factory(&table);
            }
            if *name == CF_BLOBS {
                // Chunks are large and written once: keep them out of the LSM tree so
                // compaction does not rewrite them.
                cf.set_enable_blob_files(true);
                cf.set_min_blob_size(4096);
                cf.set_enable_blob_gc(true);
                // Chunks sit in the memtable until it flushes to a blob file: small
                // memtables keep a large upload from raising memory by more than this.
                cf.set_write_buffer_size(8 << 20);
                cf.set_max_write_buffer_number(2);
            }
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?;
        for name in ALL_CFS {
            if db.cf_handle(name).is_none() {
                return Err(StoreError::Corrupt(format!("column family {name} missing")));
            }
        }
        Ok(Store { db: Arc::new(db) })
    }

    /// The database.
    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// A column family handle; every family is checked at open.
    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| unreachable!("column family {name} is checked at open"))
    }
}

/// For a group-commit thread: waits for one job, then takes every job already waiting, up
/// to `max` in all. `None` once every sender is gone.
pub(crate) fn next_group<T>(rx: &std::sync::mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let first = rx.recv().ok()?;
    let mut group = vec![first];
    while group.len() < max {
        match rx.try_recv() {
            Ok(j) => group.push(j),
            Err(_) => break,
        }
    }
    Some(group)
}

/// Incompressible bytes, different for each `seed` (for tests).
#[cfg(test)]
pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rocksdb::{WriteBatch, WriteOptions};

    use super::*;
    use crate::raft::log_store::COMMITTED;

    /// The write-ahead log files in the database directory, by name, with their lengths.
    fn wal_files(dir: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("db"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| {
                let len = e.metadata().unwrap().len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn the_write_ahead_log_cap_is_in_force() {
        // RocksDB writes the options it runs with to a file of its own.
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        let options = std::fs::read_dir(dir.path().join("db"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .expect("RocksDB writes an options file");
        let text = std::fs::read_to_string(options).unwrap();
        let cap = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("max_total_wal_size="))
            .expect("max_total_wal_size in the options file");
        assert_eq!(cap, MAX_TOTAL_WAL_BYTES.to_string());
    }

    #[test]
    fn a_small_family_does_not_keep_the_write_ahead_log_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 1 << 20;
        let store = Store::open_with(dir.path(), cap).unwrap();
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        // What every commit does: a few bytes in raft_meta, in the first WAL file.
        store
            .db()
            .put_cf_opt(store.cf(CF_RAFT_META), COMMITTED, b"1", &sync)
            .unwrap();
        let first = wal_files(dir.path());
        assert_eq!(first.len(), 1, "{first:?}");
        // Then the log grows far past the cap, with a flush of raft_log now and then (as
        // its memtable fills); raft_meta is never written again.
        for i in 0..32u64 {
            let mut batch = WriteBatch::default();
            batch.put_cf(store.cf(CF_RAFT_LOG), i.to_be_bytes(), noise(128 << 10, i));
            store.db().write_opt(batch, &sync).unwrap();
            if i % 8 == 7 {
                store.db().flush_cf(store.cf(CF_RAFT_LOG)).unwrap();
            }
        }
        let files = wal_files(dir.path());
        assert!(
            !files.iter().any(|(name, _)| *name == first[0].0),
            "the first WAL file outlived the cap: {files:?}"
        );
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        assert!(total <= 2 * cap, "{total} bytes of WAL: {files:?}");
        // Nothing written was lost with it.
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let meta = store.db().get_cf(store.cf(CF_RAFT_META), COMMITTED);
        assert_eq!(meta.unwrap().as_deref(), Some(&b"1"[..]));
        for i in 0..32u64 {
            let entry = store.db().get_cf(store.cf(CF_RAFT_LOG), i.to_be_bytes());
            assert_eq!(
                entry.unwrap().map(|v| v.len()),
                Some(128 << 10),
                "entry {i}"
            );
        }
    }
}
