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
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
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
