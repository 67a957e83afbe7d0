//! Content-addressed blob storage: SHA-256 addressed, chunked, streamed in and out.
//!
//! ```text
//!  upload body ──▶ BlobStore::put ──(hash md5/sha1/sha256/sha512 while streaming)──▶
//!     chunks appended to segment files (a blob of one chunk: kept whole) ──▶ commit:
//!     segments synced, the record (and a whole blob) journaled and synced, then meta
//!     under sha256 ──▶ BlobInfo
//!  download ◀── BlobStore::open(sha256) ◀── meta ── chunks read one at a time
//! ```
//!
//! The SHA-256 is known only at the end of an upload, so chunks are written first, where
//! the backend puts them (a blob that fits in one chunk goes with its record instead,
//! see [`super::segments`]), and the meta record (`sha256 → where the chunks are, size,
//! hashes`) is written last, once the chunks are durable (see [`super::segments`]). If
//! the blob already existed, the new chunks are left unreferenced. Nothing holds a whole
//! artifact in memory: one chunk at a time, in and out.
//!
//! Which blobs are referenced is the state machine's to say; the collector
//! (`cluster::gc`) asks it, then has the store remove what stayed unreferenced for a
//! whole grace period ([`BlobStore::collect`]) and compact the segments left mostly
//! dead ([`BlobStore::compact`]). A blob a write has looked at or stored since it was
//! found unreferenced ([`BlobStore::has`], [`Written::commit`]) is not removed: the
//! write is about to refer to it.
//!
//! Blobs stored before segment files existed keep their chunks in the `blobs` column
//! family under a data id; they are read from there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use granary_format::Body;
use granary_format::hashing::MultiHasher;
use granary_format::model::BlobInfo;
#[cfg(test)]
use granary_format::model::Hashes;
use http_body::Body as _;
use http_body_util::BodyExt;
use rocksdb::{WriteBatch, WriteOptions};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::chunk_cache::{ChunkCache, ChunkKey};
use super::segments::{CommitRequest, Extent, Hold, JournalHead, MetaSink, Segments};
use super::{CF_BLOB_META, CF_BLOBS, Store, StoreError};

/// Size of one stored chunk.
pub(crate) const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks of an upload kept in the cache as they are written (the first 4 MiB).
const CACHED_CHUNKS_PER_UPLOAD: usize = 16;

/// What is recorded for a blob.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BlobMeta {
    /// Where its chunks are, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) extents: Vec<Extent>,
    /// The older layout: chunks in the `blobs` column family under this data id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data_id: Option<[u8; 16]>,
    /// Number of chunks of the older layout.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) chunks: u32,
    /// Size and digests.
    pub(crate) info: BlobInfo,
    /// CRC32C of the bytes, computed when they were first stored; peers check copies
    /// against it. Absent on blobs stored before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) crc32c: Option<u32>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl BlobMeta {
    /// Whether two records of a blob name the same stored bytes.
    pub(crate) fn same_place(&self, other: &BlobMeta) -> bool {
        self.extents == other.extents && self.data_id == other.data_id
    }

    fn parts(&self) -> usize {
        match self.data_id {
            Some(_) => self.chunks as usize,
            None => self.extents.len(),
        }
    }

    /// The cache key of part `i`: chunks of the older layout by data id and index,
    /// extents by segment and offset (behind eight zero bytes, where a random data id
    /// will not be).
    fn cache_key(&self, i: usize) -> ChunkKey {
        match &self.data_id {
            Some(id) => chunk_key(id, i as u32),
            None => extent_cache_key(&self.extents[i]),
        }
    }
}

fn extent_cache_key(e: &Extent) -> ChunkKey {
    let mut k = [0u8; 20];
    k[8..12].copy_from_slice(&e.segment.to_be_bytes());
    k[12..].copy_from_slice(&e.offset.to_be_bytes());
    k
}

/// Errors writing or reading a blob.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BlobError {
    /// The stream exceeded the limit.
    #[error("content exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The client's stream failed (disconnect, bad encoding).
    #[error("reading the upload failed: {0}")]
    Upload(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The storage a [`BlobStore`] runs on: segment files and RocksDB in the node, memory in
/// tests (where it can also fail on purpose).
pub(crate) trait BlobBackend: Send + Sync + 'static {
    /// Writes one chunk of an upload in progress; durable once a commit naming it returns.
    fn put_chunk(&self, data: &[u8]) -> Result<Extent, StoreError>;
    /// Makes the chunks `meta` names durable, or writes `whole` (a blob that fits in one
    /// chunk, not written with [`BlobBackend::put_chunk`]), then records the blob,
    /// durably. Resolves to the meta recorded, which places `whole`, or to `None` (and
    /// records nothing) if a blob with this digest exists already.
    ///
    /// With `replaces`, the blob is being moved out of a segment being compacted: its
    /// record is replaced only if it is still `replaces` (else `None`).
    fn commit(
        &self,
        sha256: [u8; 32],
        meta: BlobMeta,
        whole: Option<Bytes>,
        replaces: Option<BlobMeta>,
    ) -> BoxFuture<'static, Result<Option<BlobMeta>, StoreError>>;
    /// Gives up the chunks of an abandoned or duplicate upload, where the backend can.
    fn discard(&self, extents: &[Extent]);
    /// The record of a blob.
    fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError>;
    /// Part `i` of a blob.
    fn part(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError>;
    /// Part `i` of a blob, read for a one-off check: as [`BlobBackend::part`], leaving no
    /// copy in the page cache where the backend can.
    fn part_uncached(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError> {
        self.part(meta, i)
    }
    /// Drops the record of a blob whose bytes here failed their check, if it still names
    /// the same bytes as `bad` (a copy committed since stays). Returns whether it did.
    fn forget(&self, sha256: &[u8; 32], bad: &BlobMeta) -> Result<bool, StoreError>;
    /// Calls `f` with every blob's record, in key order.
    fn each_meta(&self, f: &mut dyn FnMut([u8; 32], BlobMeta)) -> Result<(), StoreError>;
    /// Removes, durably, the records of these blobs that still name the same bytes (and
    /// the chunks of the older layout's). Returns those removed.
    fn remove(
        &self,
        blobs: Vec<([u8; 32], BlobMeta)>,
    ) -> Result<Vec<([u8; 32], BlobMeta)>, StoreError>;
    /// Keeps the segments an upload about to write chunks will use from compaction.
    fn hold(&self) -> Option<Hold> {
        None
    }
    /// Segments that may be compacted, with their sizes (see [`Segments::compactable`]).
    fn compactable(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        Ok(Vec::new())
    }
    /// Makes every record written so far durable.
    fn sync_records(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Bytes of the files the blobs are kept in, where the backend has files.
    fn file_bytes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    /// Deletes a compacted segment (see [`Segments::retire`]).
    fn retire(&self, _segment: u32) -> Result<(), StoreError> {
        Ok(())
    }
    /// Closes the segments retired by the last pass (see [`Segments::release_retired`]);
    /// returns them.
    fn release_retired(&self) -> Vec<u32> {
        Vec::new()
    }
}

fn chunk_key(data_id: &[u8; 16], index: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(data_id);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Blobs in segment files, their records in the node's RocksDB.
pub(crate) struct RocksBlobBackend {
    store: Store,
    segments: Arc<Segments>,
    /// `None` only while dropping.
    committer: Option<std::sync::mpsc::Sender<CommitRequest>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The committer's view of `blob_meta`.
struct RocksMetaSink(Store);

/// Keys of `blob_meta` beside the blobs' (which are 32 bytes): the journal's head and
/// segments (see [`super::segments`]).
const JOURNAL_HEAD: &[u8] = b"journal.head";
const JOURNAL_SEGMENTS: &[u8] = b"journal.segments";

impl MetaSink for RocksMetaSink {
    fn exists(&self, key: &[u8; 32]) -> Result<bool, StoreError> {
        let cf = self.0.cf(CF_BLOB_META);
        Ok(self.0.db().get_pinned_cf(cf, key)?.is_some())
    }

    fn current(&self, key: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
        self.get(key)
    }

    fn record(
        &self,
        pairs: Vec<([u8; 32], Vec<u8>)>,
        head: JournalHead,
        sync: bool,
    ) -> Result<(), StoreError> {
        let cf = self.0.cf(CF_BLOB_META);
        let mut batch = WriteBatch::default();
        for (k, v) in pairs {
            batch.put_cf(cf, k, v);
        }
        let head = serde_json::to_vec(&head).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        batch.put_cf(cf, JOURNAL_HEAD, head);
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        Ok(self.0.db().write_opt(batch, &opts)?)
    }

    fn journal_head(&self) -> Result<Option<JournalHead>, StoreError> {
        self.get(JOURNAL_HEAD)
    }

    fn journal_segments(&self) -> Result<Vec<u32>, StoreError> {
        Ok(self.get(JOURNAL_SEGMENTS)?.unwrap_or_default())
    }

    fn set_journal_segments(&self, ids: &[u32]) -> Result<(), StoreError> {
        let cf = self.0.cf(CF_BLOB_META);
        let value = serde_json::to_vec(ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.0.db().put_cf_opt(cf, JOURNAL_SEGMENTS, value, &opts)?)
    }
}

impl RocksMetaSink {
    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        let cf = self.0.cf(CF_BLOB_META);
        match self.0.db().get_pinned_cf(cf, key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("blob journal: {e}"))),
        }
    }
}

impl RocksBlobBackend {
    /// Opens the segment files under `dir` and starts the committer.
    #[cfg(test)]
    pub(crate) fn open(store: Store, dir: &std::path::Path) -> Result<Self, StoreError> {
        Self::open_sized(store, dir, super::segments::SEGMENT_BYTES)
    }

    /// As [`RocksBlobBackend::open`], with segments closed at `segment_bytes`.
    pub(crate) fn open_sized(
        store: Store,
        dir: &std::path::Path,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let segments = Arc::new(Segments::open(dir, segment_bytes)?);
        let (tx, thread) =
            super::segments::spawn_committer(segments.clone(), RocksMetaSink(store.clone()))?;
        Ok(RocksBlobBackend {
            store,
            segments,
            committer: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for RocksBlobBackend {
    fn drop(&mut self) {
        // The committer holds the database open: let it finish before the node's files
        // are reopened (a restart in the same process).
        drop(self.committer.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl BlobBackend for RocksBlobBackend {
    fn put_chunk(&self, data: &[u8]) -> Result<Extent, StoreError> {
        self.segments.append(data)
    }

    fn commit(
        &self,
        sha256: [u8; 32],
        meta: BlobMeta,
        whole: Option<Bytes>,
        replaces: Option<BlobMeta>,
    ) -> BoxFuture<'static, Result<Option<BlobMeta>, StoreError>> {
        const STOPPED: &str = "the blob committer stopped";
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = CommitRequest {
            segments: meta.extents.iter().map(|e| e.segment).collect(),
            key: sha256,
            meta,
            whole,
            reply,
            replaces,
        };
        let sent = self
            .committer
            .as_ref()
            .ok_or_else(|| StoreError::Io(STOPPED.into()))
            .and_then(|c| c.send(request).map_err(|_| StoreError::Io(STOPPED.into())));
        Box::pin(async move {
            sent?;
            answer.await.map_err(|_| {
                StoreError::Io(
                    "the blob commit ended without an answer (see the node's log)".into(),
                )
            })?
        })
    }

    fn discard(&self, _extents: &[Extent]) {
        // Segments are append-only: the bytes stay, unreferenced.
    }

    fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
        let cf = self.store.cf(CF_BLOB_META);
        match self.store.db().get_pinned_cf(cf, sha256)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("blob meta: {e}"))),
        }
    }

    fn part(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError> {
        if let Some(id) = &meta.data_id {
            let cf = self.store.cf(CF_BLOBS);
            return Ok(self
                .store
                .db()
                .get_pinned_cf(cf, chunk_key(id, i as u32))?
                .map(|v| Bytes::copy_from_slice(&v)));
        }
        match meta.extents.get(i) {
            Some(e) => self.segments.read(e).map(Some),
            None => Ok(None),
        }
    }

    fn part_uncached(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError> {
        match (&meta.data_id, meta.extents.get(i)) {
            (None, Some(e)) => self.segments.read_uncached(e).map(Some),
            _ => self.part(meta, i),
        }
    }

    fn forget(&self, sha256: &[u8; 32], bad: &BlobMeta) -> Result<bool, StoreError> {
        // Only the committer writes records, and it writes one for this digest only once
        // none exists: after this delete, when the copy is fetched again. Between the read
        // and the delete below that cannot have happened unless a fetch ran start to end
        // in those microseconds; and if it did, the next read fetches once more.
        match self.meta(sha256)? {
            Some(m) if m.same_place(bad) => {
                let cf = self.store.cf(CF_BLOB_META);
                self.store.db().delete_cf(cf, sha256)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn each_meta(&self, f: &mut dyn FnMut([u8; 32], BlobMeta)) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_BLOB_META);
        for item in self
            .store
            .db()
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
        {
            let (k, v) = item?;
            // Beside the blobs' 32-byte keys: the journal's.
            let Ok(key) = <[u8; 32]>::try_from(&k[..]) else {
                continue;
            };
            let meta = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("blob meta: {e}")))?;
            f(key, meta);
        }
        Ok(())
    }

    fn remove(
        &self,
        blobs: Vec<([u8; 32], BlobMeta)>,
    ) -> Result<Vec<([u8; 32], BlobMeta)>, StoreError> {
        // Only the collector removes records, and the committer writes one only where
        // none is (or, moving a blob, where this same collector's pass left it): between
        // the read below and the write, a record can only have been dropped as damaged,
        // which the write then drops again, harmlessly.
        let (meta_cf, chunks_cf) = (self.store.cf(CF_BLOB_META), self.store.cf(CF_BLOBS));
        let mut batch = WriteBatch::default();
        let mut removed = Vec::new();
        for (key, meta) in blobs {
            if !self.meta(&key)?.is_some_and(|m| m.same_place(&meta)) {
                continue;
            }
            batch.delete_cf(meta_cf, key);
            if let Some(id) = &meta.data_id {
                for i in 0..meta.chunks {
                    batch.delete_cf(chunks_cf, chunk_key(id, i));
                }
            }
            removed.push((key, meta));
        }
        if !removed.is_empty() {
            let mut opts = WriteOptions::default();
            opts.set_sync(true);
            self.store.db().write_opt(batch, &opts)?;
        }
        Ok(removed)
    }

    fn hold(&self) -> Option<Hold> {
        Some(self.segments.hold())
    }

    fn file_bytes(&self) -> Result<u64, StoreError> {
        self.segments.file_bytes()
    }

    fn compactable(&self) -> Result<Vec<(u32, u64)>, StoreError> {
        // Recovery reads the journal from its head's segment on (every segment of it,
        // with no head recorded yet).
        let sink = RocksMetaSink(self.store.clone());
        let from = sink.journal_head()?.map_or(0, |h| h.segment);
        let journal = sink
            .journal_segments()?
            .into_iter()
            .filter(|id| *id >= from)
            .collect();
        self.segments.compactable(&journal)
    }

    fn sync_records(&self) -> Result<(), StoreError> {
        Ok(self.store.db().flush_wal(true)?)
    }

    fn retire(&self, segment: u32) -> Result<(), StoreError> {
        self.segments.retire(segment)
    }

    fn release_retired(&self) -> Vec<u32> {
        self.segments.release_retired()
    }
}

/// Blobs in memory, for tests: can be told to fail writes.
#[derive(Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct MemBlobBackend {
    chunks: Mutex<HashMap<u64, Bytes>>,
    next: std::sync::atomic::AtomicU64,
    metas: Mutex<HashMap<[u8; 32], BlobMeta>>,
    /// When set, every write fails with an I/O error.
    pub(crate) fail_writes: std::sync::atomic::AtomicBool,
}

impl MemBlobBackend {
    fn check(&self) -> Result<(), StoreError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Io("injected write failure".into()))
        } else {
            Ok(())
        }
    }
}

impl BlobBackend for MemBlobBackend {
    fn put_chunk(&self, data: &[u8]) -> Result<Extent, StoreError> {
        self.check()?;
        let offset = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        chunks.insert(offset, Bytes::copy_from_slice(data));
        Ok(Extent {
            segment: 0,
            offset,
            len: data.len() as u32,
        })
    }

    fn commit(
        &self,
        sha256: [u8; 32],
        mut meta: BlobMeta,
        whole: Option<Bytes>,
        replaces: Option<BlobMeta>,
    ) -> BoxFuture<'static, Result<Option<BlobMeta>, StoreError>> {
        let result = self.check().and_then(|()| {
            let current = self.meta(&sha256)?;
            let wanted = match &replaces {
                Some(old) => current.is_some_and(|m| m.same_place(old)),
                None => current.is_none(),
            };
            if !wanted {
                return Ok(None);
            }
            if let Some(whole) = whole.filter(|w| !w.is_empty()) {
                meta.extents = vec![self.put_chunk(&whole)?];
            }
            let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
            let before = metas.insert(sha256, meta.clone());
            Ok((before.is_none() || replaces.is_some()).then_some(meta))
        });
        Box::pin(async move { result })
    }

    fn discard(&self, extents: &[Extent]) {
        let mut map = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        for e in extents {
            map.remove(&e.offset);
        }
    }

    fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
        Ok(self
            .metas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned())
    }

    fn part(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError> {
        let Some(e) = meta.extents.get(i) else {
            return Ok(None);
        };
        Ok(self
            .chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&e.offset)
            .cloned())
    }

    fn forget(&self, sha256: &[u8; 32], bad: &BlobMeta) -> Result<bool, StoreError> {
        let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        match metas.get(sha256) {
            Some(m) if m.same_place(bad) => {
                metas.remove(sha256);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn each_meta(&self, f: &mut dyn FnMut([u8; 32], BlobMeta)) -> Result<(), StoreError> {
        let metas: std::collections::BTreeMap<_, _> = self
            .metas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .into_iter()
            .collect();
        for (k, m) in metas {
            f(k, m);
        }
        Ok(())
    }

    fn remove(
        &self,
        blobs: Vec<([u8; 32], BlobMeta)>,
    ) -> Result<Vec<([u8; 32], BlobMeta)>, StoreError> {
        self.check()?;
        let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = Vec::new();
        for (key, meta) in blobs {
            if metas.get(&key).is_some_and(|m| m.same_place(&meta)) {
                metas.remove(&key);
                for e in &meta.extents {
                    chunks.remove(&e.offset);
                }
                removed.push((key, meta));
            }
        }
        Ok(removed)
    }
}

/// What a write computes: every digest of a new upload; for a copy of a blob whose
/// digests are known, what checks it (its CRC32C when the sender recorded one, else its
/// SHA-256). Every write also computes the CRC32C it records.
enum Hashing {
    All(Box<MultiHasher>),
    Sha256(Sha256),
    Crc32c,
}

/// A write's running digests.
struct Hasher {
    hashing: Hashing,
    crc32c: u32,
    len: u64,
}

impl Hasher {
    fn new(hashing: Hashing) -> Self {
        Hasher {
            hashing,
            crc32c: 0,
            len: 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match &mut self.hashing {
            Hashing::All(h) => h.update(data),
            Hashing::Sha256(h) => h.update(data),
            Hashing::Crc32c => {}
        }
        self.crc32c = crc32c::crc32c_append(self.crc32c, data);
        self.len += data.len() as u64;
    }
}

/// What [`BlobStore::scrub`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scrubbed {
    /// Read back whole and matching; `bytes` long.
    Intact {
        /// The blob's size.
        bytes: u64,
    },
    /// Damaged or incomplete here: its record is dropped.
    Damaged,
    /// Not stored here.
    Absent,
}

/// How a copy of a blob is checked as it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicaCheck {
    /// Recompute the SHA-256 that names it: for bytes from outside the cluster, and from a
    /// member that recorded no CRC32C for them.
    Sha256,
    /// Compare with the CRC32C the first member computed when it hashed the upload. The
    /// copy comes from a member, authenticated, over TCP; what this catches is a bit
    /// changed on that member's disk or on the way, which the CRC finds as surely as the
    /// SHA-256 at a thirteenth of the cost (the cluster paid for a SHA-256 per copy).
    Crc32c(u32),
}

/// Streams blobs in and out of a [`BlobBackend`].
#[derive(Clone)]
pub(crate) struct BlobStore {
    backend: Arc<dyn BlobBackend>,
    cache: Arc<ChunkCache>,
    /// Decoded meta records of recently read blobs. A blob's record changes only when
    /// the collector removes or moves it, which updates this too.
    metas: MetaCache,
    /// Blobs found unreferenced, and when each was first found so (see
    /// [`BlobStore::collect`]).
    candidates: Candidates,
    /// Bumped when records are removed (by [`BlobStore::collect`], or dropped as
    /// damaged), after the records are gone and before `metas` is emptied of them: a
    /// record read before a removal is not kept in `metas` after it (see
    /// [`BlobStore::meta`]).
    removals: Arc<std::sync::atomic::AtomicU64>,
}

/// Blobs found unreferenced by the collector, each with when it was first found so.
type Candidates = Arc<Mutex<HashMap<[u8; 32], std::time::Instant>>>;

/// A write is about to refer to this blob (it looked for it, or stored it): it is no
/// longer a candidate for removal. Taken under the lock [`BlobStore::collect`] removes
/// blobs under, so a blob is either removed before this (and the write finds it missing)
/// or not at all in that pass.
fn touch(candidates: &Candidates, sha: &[u8; 32]) {
    let mut candidates = candidates.lock().unwrap_or_else(|p| p.into_inner());
    if !candidates.is_empty() {
        candidates.remove(sha);
    }
}

/// What one [`BlobStore::collect`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Collected {
    /// Records removed.
    pub(crate) removed: usize,
    /// Bytes of the blobs removed.
    pub(crate) removed_bytes: u64,
    /// Blobs unreferenced but not yet for a whole grace period (or touched since).
    pub(crate) candidates: usize,
    /// Blobs left on this node, and their bytes.
    pub(crate) stored: usize,
    pub(crate) stored_bytes: u64,
}

/// What one [`BlobStore::compact`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Compacted {
    /// Segment files deleted.
    pub(crate) segments: usize,
    /// Their bytes.
    pub(crate) bytes: u64,
    /// Live blobs written again elsewhere first.
    pub(crate) moved: usize,
}

/// Decoded meta records by key, shared by a store and its uploads.
type MetaCache = Arc<std::sync::RwLock<std::collections::HashMap<[u8; 32], Arc<BlobMeta>>>>;

/// Keeps a decoded meta record; the map is emptied when full (a crude bound).
fn remember(metas: &MetaCache, sha: [u8; 32], meta: Arc<BlobMeta>) {
    remember_if(metas, sha, meta, || true);
}

/// As [`remember`], if `still` holds once the cache is locked.
fn remember_if(
    metas: &MetaCache,
    sha: [u8; 32],
    meta: Arc<BlobMeta>,
    still: impl FnOnce() -> bool,
) {
    let mut metas = metas.write().unwrap_or_else(|p| p.into_inner());
    if !still() {
        return;
    }
    if metas.len() >= META_CACHE_ENTRIES {
        metas.clear();
    }
    metas.insert(sha, meta);
}

/// Empties the record cache of blobs whose records were just removed from the backend,
/// moving the count of removals first (see [`BlobStore::meta`]): a read that found one
/// of these records either sees the count moved, or is emptied out here after it kept it.
fn forget_removed<'a>(
    metas: &MetaCache,
    removals: &std::sync::atomic::AtomicU64,
    keys: impl IntoIterator<Item = &'a [u8; 32]>,
) {
    removals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut metas = metas.write().unwrap_or_else(|p| p.into_inner());
    for key in keys {
        metas.remove(key);
    }
}

/// Drops this node's record of a blob whose bytes here failed their CRC32C check, so that
/// it counts as missing: the next read, and the background repair scan, fetch it from a
/// peer. The damaged bytes stay where they are, unreferenced.
fn drop_damaged(
    backend: &dyn BlobBackend,
    metas: &MetaCache,
    removals: &std::sync::atomic::AtomicU64,
    sha: &[u8; 32],
    bad: &BlobMeta,
) {
    let sha256 = &bad.info.hashes.sha256;
    let forgot = backend.forget(sha, bad);
    forget_removed(metas, removals, [sha]);
    match forgot {
        Ok(true) => tracing::error!(
            sha256,
            "a blob failed its CRC32C check on this node's disk; its record is dropped and \
             the blob will be fetched again from a peer"
        ),
        Ok(false) => {}
        Err(e) => tracing::error!(
            sha256,
            error = %e,
            "a blob failed its CRC32C check on this node's disk, and dropping its record failed"
        ),
    }
}

/// A blob whose bytes are written and checked but not yet durable: nothing refers to it
/// until [`Written::commit`] returns.
pub(crate) struct Written {
    info: BlobInfo,
    crc32c: u32,
    /// The whole blob, when it fits in one chunk: not written yet, the commit writes it.
    whole: Option<Bytes>,
    backend: Arc<dyn BlobBackend>,
    cache: Arc<ChunkCache>,
    metas: MetaCache,
    candidates: Candidates,
    sha: [u8; 32],
    meta: BlobMeta,
    /// Moving a blob out of a segment being compacted: the record it replaces.
    replaces: Option<BlobMeta>,
    /// Keeps the segments its chunks are in from compaction until it is committed.
    _hold: Option<Hold>,
    /// Whether its bytes go into the chunk cache (not for a blob moved by compaction).
    cached: bool,
}

impl Written {
    /// Its size and digests.
    pub(crate) fn info(&self) -> &BlobInfo {
        &self.info
    }

    /// The CRC32C of its bytes, by which copies of it are checked.
    pub(crate) fn crc32c(&self) -> u32 {
        self.crc32c
    }

    /// Its bytes, when it fits in one chunk (they are in memory anyway, for the cache).
    pub(crate) fn whole(&self) -> Option<Bytes> {
        self.whole.clone()
    }

    /// Makes the blob durable and records it; a blob stored already keeps its first copy.
    pub(crate) async fn commit(self) -> Result<BlobInfo, BlobError> {
        let extents = self.meta.extents.clone();
        if self.replaces.is_none() {
            touch(&self.candidates, &self.sha);
        }
        match self
            .backend
            .commit(self.sha, self.meta, self.whole.clone(), self.replaces)
            .await?
        {
            // A new package is read again at once (pushed to peers, often installed), and
            // every node asks whether it holds it once its metadata is applied.
            Some(meta) => {
                if let (true, Some(whole), Some(at)) =
                    (self.cached, self.whole, meta.extents.first())
                {
                    self.cache.insert(extent_cache_key(at), whole);
                }
                remember(&self.metas, self.sha, Arc::new(meta));
            }
            None => self.backend.discard(&extents),
        }
        Ok(self.info)
    }
}

/// `chunk`, or a copy of its own size when it is much shorter than the `allocated` bytes
/// of the buffer it was gathered in (see [`BlobStore::write_chunk`]).
fn own_size(chunk: Bytes, allocated: usize) -> Bytes {
    if chunk.len() < allocated / 2 {
        Bytes::copy_from_slice(&chunk)
    } else {
        chunk
    }
}

/// Meta records kept decoded before the map is emptied (a crude bound: ~300 B each).
const META_CACHE_ENTRIES: usize = 16 * 1024;

/// Parses a lowercase or uppercase hex SHA-256.
pub(crate) fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut out).ok()?;
    Some(out)
}

impl BlobStore {
    /// A store over `backend` keeping up to `cache_bytes` of recently read chunks in memory.
    pub(crate) fn new(backend: Arc<dyn BlobBackend>, cache_bytes: usize) -> Self {
        BlobStore {
            backend,
            cache: Arc::new(ChunkCache::new(cache_bytes)),
            metas: Default::default(),
            candidates: Default::default(),
            removals: Default::default(),
        }
    }

    fn meta(&self, sha: &[u8; 32]) -> Result<Option<Arc<BlobMeta>>, StoreError> {
        if let Some(m) = self
            .metas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha)
        {
            return Ok(Some(m.clone()));
        }
        let removals = self.removals.load(std::sync::atomic::Ordering::SeqCst);
        let Some(meta) = self.backend.meta(sha)? else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        // Kept only if the count of removals has not moved since before the read. A
        // removal moves it after its records are gone and before it empties the cache:
        // if this read found a record a removal is taking away, either the count moved
        // (not kept) or the removal empties the cache after this keeps it.
        remember_if(&self.metas, *sha, meta.clone(), || {
            self.removals.load(std::sync::atomic::Ordering::SeqCst) == removals
        });
        Ok(Some(meta))
    }

    /// Streams `body` into the store, hashing as it goes; at most `limit` bytes.
    #[cfg(test)]
    pub(crate) async fn put(&self, body: Body, limit: u64) -> Result<BlobInfo, BlobError> {
        self.write(body, limit, None, true).await?.commit().await
    }

    /// Streams a new upload into the store as [`BlobStore::put`] does, but returns once
    /// its bytes are written and hashed: [`Written::commit`] makes it durable, and the
    /// caller may copy the bytes elsewhere meanwhile.
    pub(crate) async fn write_new(&self, body: Body, limit: u64) -> Result<Written, BlobError> {
        self.write(body, limit, None, true).await
    }

    /// Stores a copy of a blob whose size and digests are known: its size and `check` are
    /// verified, the digests taken as given.
    pub(crate) async fn put_replica(
        &self,
        body: Body,
        limit: u64,
        expected: &BlobInfo,
        check: ReplicaCheck,
    ) -> Result<BlobInfo, BlobError> {
        self.write(body, limit, Some((expected, check)), true)
            .await?
            .commit()
            .await
    }

    /// Streams `body` in (see [`BlobStore::write_chunk`]); `cached`: its bytes go into
    /// the chunk cache as they are written, as a new package's are read again at once.
    async fn write(
        &self,
        mut body: Body,
        limit: u64,
        expected: Option<(&BlobInfo, ReplicaCheck)>,
        cached: bool,
    ) -> Result<Written, BlobError> {
        let mut hasher = Hasher::new(match expected {
            None => Hashing::All(Box::new(MultiHasher::new())),
            Some((_, ReplicaCheck::Sha256)) => Hashing::Sha256(Sha256::new()),
            Some((_, ReplicaCheck::Crc32c(_))) => Hashing::Crc32c,
        });
        // A replica's size is known, and so is an upload's when its body says how long it
        // is (or at most how long): a small one gets a buffer of about its own size, which
        // the cache can then keep as it is, without a copy and without holding a whole
        // chunk's allocation for it.
        let known = match expected {
            Some((e, _)) => Some(e.size),
            None => body.size_hint().upper(),
        };
        let capacity = known.map_or(CHUNK_SIZE, |size| {
            usize::try_from(size).map_or(CHUNK_SIZE, |size| size.clamp(1, CHUNK_SIZE))
        });
        let mut buf = BytesMut::with_capacity(capacity);
        let mut extents = Vec::new();
        let mut hold = None;
        // The chunk of a blob that fits in one, as the cache keeps it.
        let mut whole = None;
        let result: Result<(), BlobError> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    if granary_format::body::is_too_large(&*e) {
                        BlobError::TooLarge { limit }
                    } else {
                        BlobError::Upload(e.to_string())
                    }
                })?;
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                if hasher.len + data.len() as u64 > limit {
                    return Err(BlobError::TooLarge { limit });
                }
                hasher.update(&data);
                while !data.is_empty() {
                    let take = (CHUNK_SIZE - buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(take));
                    if buf.len() == CHUNK_SIZE {
                        if hold.is_none() {
                            hold = self.backend.hold();
                        }
                        let allocated = buf.capacity();
                        let chunk = buf.split().freeze();
                        let at = self.write_chunk(chunk, allocated, extents.len(), cached)?;
                        extents.push(at);
                        buf.reserve(CHUNK_SIZE);
                    }
                }
            }
            if !buf.is_empty() {
                let allocated = buf.capacity();
                let chunk = buf.split().freeze();
                if extents.is_empty() {
                    // It fits in one chunk: the commit writes it with its record.
                    whole = Some(own_size(chunk, allocated));
                } else {
                    let at = self.write_chunk(chunk, allocated, extents.len(), cached)?;
                    extents.push(at);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            self.backend.discard(&extents);
            return Err(e);
        }
        let (crc32c, len) = (hasher.crc32c, hasher.len);
        let info = match (hasher.hashing, expected) {
            (Hashing::All(h), _) => BlobInfo {
                size: len,
                hashes: h.finish(),
            },
            (hashing, Some((expected, check))) => {
                let mismatch = match (hashing, check) {
                    (Hashing::Sha256(h), _) => {
                        let sha256 = hex::encode(h.finalize());
                        (sha256 != expected.hashes.sha256).then(|| format!("SHA-256 {sha256}"))
                    }
                    (_, ReplicaCheck::Crc32c(want)) => {
                        (crc32c != want).then(|| format!("CRC32C {crc32c:08x}, not {want:08x}"))
                    }
                    (_, ReplicaCheck::Sha256) => unreachable!("a SHA-256 check hashes"),
                };
                let mismatch = mismatch.or_else(|| {
                    (len != expected.size).then(|| format!("{len} bytes, not {}", expected.size))
                });
                if let Some(what) = mismatch {
                    self.backend.discard(&extents);
                    return Err(BlobError::Upload(format!(
                        "replica of {} arrived with {what}",
                        expected.hashes.sha256
                    )));
                }
                expected.clone()
            }
            (_, None) => unreachable!("a new upload computes every digest"),
        };
        let sha = parse_sha256(&info.hashes.sha256)
            .ok_or_else(|| StoreError::Corrupt("hasher produced a bad digest".into()))?;
        let meta = BlobMeta {
            extents,
            data_id: None,
            chunks: 0,
            info: info.clone(),
            crc32c: Some(crc32c),
        };
        Ok(Written {
            info,
            crc32c,
            whole,
            backend: self.backend.clone(),
            cache: self.cache.clone(),
            metas: self.metas.clone(),
            candidates: self.candidates.clone(),
            sha,
            meta,
            replaces: None,
            _hold: hold,
            cached,
        })
    }

    /// Writes chunk `index` of an upload. The first few chunks of each upload are kept
    /// in the cache: a new package is read again at once, to push it to peers and often
    /// to serve the install that follows its publish; a large upload does not push
    /// every popular download out of the cache.
    ///
    /// An upload's last chunk may be much shorter than the `allocated` bytes of the buffer
    /// it was gathered in; then the cache gets a copy of its own size, so that it does not
    /// hold (and count as less than it is) the whole buffer, and the buffer's memory goes
    /// back to the allocator warm for the next upload.
    ///
    /// Returns where the chunk lies.
    fn write_chunk(
        &self,
        chunk: Bytes,
        allocated: usize,
        index: usize,
        cached: bool,
    ) -> Result<Extent, StoreError> {
        let at = self.backend.put_chunk(&chunk)?;
        if cached && index < CACHED_CHUNKS_PER_UPLOAD {
            self.cache
                .insert(extent_cache_key(&at), own_size(chunk, allocated));
        }
        Ok(at)
    }

    /// The CRC32C recorded for a blob stored here, if one was.
    #[cfg(test)]
    pub(crate) fn crc32c(&self, sha256: &str) -> Result<Option<u32>, StoreError> {
        match parse_sha256(sha256) {
            Some(sha) => Ok(self.meta(&sha)?.and_then(|m| m.crc32c)),
            None => Ok(None),
        }
    }

    /// Whether the blob is stored here.
    ///
    /// Asked before a write refers to a blob stored already (a publish of bytes stored
    /// before, a peer's push), so it also keeps the blob from the collector: see
    /// [`touch`].
    pub(crate) fn has(&self, sha256: &str) -> Result<bool, StoreError> {
        match parse_sha256(sha256) {
            Some(sha) => {
                touch(&self.candidates, &sha);
                Ok(self.meta(&sha)?.is_some())
            }
            None => Ok(false),
        }
    }

    /// Opens a blob for streaming: its digests and a body yielding one chunk at a time.
    pub(crate) fn open(&self, sha256: &str) -> Result<Option<(BlobInfo, Body)>, StoreError> {
        Ok(self.open_copy(sha256)?.map(|(info, _, body)| (info, body)))
    }

    /// Opens a blob to copy to a peer: as [`BlobStore::open`], with the CRC32C recorded
    /// for it (if one was), which the copy is checked by.
    ///
    /// Bytes read from disk are checked against that CRC32C too. A blob in one part
    /// (most packages) is read and checked before this returns: if its bytes here are
    /// damaged, its record is dropped and the answer is `None`, as for a blob this node
    /// lacks, so callers fetch it from a peer (which stores it here again). A larger blob
    /// is checked as it streams, and ends in an error instead of its last bytes if they do
    /// not match (its record dropped likewise, for the next read to fetch).
    pub(crate) fn open_copy(
        &self,
        sha256: &str,
    ) -> Result<Option<(BlobInfo, Option<u32>, Body)>, StoreError> {
        let Some(sha) = parse_sha256(sha256) else {
            return Ok(None);
        };
        let Some(meta) = self.meta(&sha)? else {
            return Ok(None);
        };
        let (info, crc32c) = (meta.info.clone(), meta.crc32c);
        if let (1, Some(want)) = (meta.parts(), crc32c) {
            let key = meta.cache_key(0);
            let chunk = match self.cache.get(&key) {
                // The cache holds bytes as they were uploaded or checked.
                Some(c) => c,
                None => {
                    let c = self.backend.part(&meta, 0)?.ok_or_else(|| {
                        StoreError::Corrupt(format!("blob {sha256} is missing chunk 0"))
                    })?;
                    if crc32c::crc32c(&c) != want {
                        drop_damaged(&*self.backend, &self.metas, &self.removals, &sha, &meta);
                        return Ok(None);
                    }
                    self.cache.insert(key, c.clone());
                    c
                }
            };
            return Ok(Some((info, crc32c, granary_format::body::full(chunk))));
        }
        Ok(Some((info, crc32c, self.parts_of(sha, meta, true))))
    }

    /// A body streaming the parts `meta` names, checked against its CRC32C as they go
    /// (see [`BlobStore::open_copy`]); with `cached`, through the chunk cache, else read
    /// from disk and left out of both caches (a one-off read).
    fn parts_of(&self, sha: [u8; 32], meta: Arc<BlobMeta>, cached: bool) -> Body {
        let backend = self.backend.clone();
        let cache = self.cache.clone();
        let metas = self.metas.clone();
        let removals = self.removals.clone();
        // Part index (past the end after an error), and the CRC32C of the parts so far.
        let stream = futures::stream::unfold((0usize, 0u32), move |(i, crc)| {
            let backend = backend.clone();
            let cache = cache.clone();
            let metas = metas.clone();
            let removals = removals.clone();
            let meta = meta.clone();
            async move {
                if i >= meta.parts() {
                    return None;
                }
                let sha256 = &meta.info.hashes.sha256;
                let key = meta.cache_key(i);
                let chunk = match cache.get(&key) {
                    Some(c) => Ok(Some(c)),
                    None if !cached => backend.part_uncached(&meta, i),
                    None => backend.part(&meta, i).inspect(|c| {
                        if let Some(c) = c {
                            cache.insert(key, c.clone());
                        }
                    }),
                };
                let chunk = match chunk {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        let e = format!("blob {sha256} is missing chunk {i}");
                        return Some((Err(e.into()), (usize::MAX, crc)));
                    }
                    Err(e) => {
                        let e = Box::new(e) as granary_format::body::BodyError;
                        return Some((Err(e), (usize::MAX, crc)));
                    }
                };
                let crc = crc32c::crc32c_append(crc, &chunk);
                // The last part goes out only once the whole blob checks out: a reader that
                // got every byte would take a damaged blob for a whole one.
                let last = i + 1 == meta.parts();
                if let (true, Some(want)) = (last, meta.crc32c)
                    && want != crc
                {
                    drop_damaged(&*backend, &metas, &removals, &sha, &meta);
                    let e = format!("blob {sha256} failed its CRC32C check on this node's disk");
                    return Some((Err(e.into()), (usize::MAX, crc)));
                }
                Some((Ok(http_body::Frame::data(chunk)), (i + 1, crc)))
            }
        });
        BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream.boxed()))
    }

    /// Removes the blobs no longer referenced: `referenced` is every blob the state
    /// refers to, read (linearizably) before this is called. A blob not in it becomes a
    /// candidate; one that is still a candidate after `grace` (not referenced again, not
    /// looked for or stored by a write meanwhile: see [`touch`]) is removed, durably.
    /// The grace covers a publish that found its bytes stored before the state was read
    /// and whose metadata commits after: it must be shorter than the grace. Blocking.
    pub(crate) fn collect(
        &self,
        referenced: &std::collections::HashSet<[u8; 32]>,
        grace: std::time::Duration,
    ) -> Result<Collected, StoreError> {
        let mut unreferenced = Vec::new();
        let (mut stored, mut stored_bytes) = (0usize, 0u64);
        self.backend.each_meta(&mut |key, meta| {
            stored += 1;
            stored_bytes += meta.info.size;
            if !referenced.contains(&key) {
                unreferenced.push((key, meta));
            }
        })?;
        let now = std::time::Instant::now();
        let mut candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        let found: std::collections::HashSet<[u8; 32]> =
            unreferenced.iter().map(|(k, _)| *k).collect();
        candidates.retain(|k, _| found.contains(k));
        let mut due = Vec::new();
        for (key, meta) in unreferenced {
            match candidates.get(&key) {
                None => {
                    candidates.insert(key, now);
                }
                Some(since) if now.duration_since(*since) >= grace => due.push((key, meta)),
                Some(_) => {}
            }
        }
        // Under the candidates' lock: a write touching one of these waits until it is
        // removed, and then finds it missing.
        let removed = self.backend.remove(due)?;
        if !removed.is_empty() {
            forget_removed(&self.metas, &self.removals, removed.iter().map(|(k, _)| k));
        }
        for (key, _) in &removed {
            candidates.remove(key);
        }
        let removed_bytes = removed.iter().map(|(_, m)| m.info.size).sum();
        Ok(Collected {
            removed: removed.len(),
            removed_bytes,
            candidates: candidates.len(),
            stored: stored - removed.len(),
            stored_bytes: stored_bytes - removed_bytes,
        })
    }

    /// Bytes of the files the blobs are kept in (segment files), dead space included.
    pub(crate) fn file_bytes(&self) -> Result<u64, StoreError> {
        self.backend.file_bytes()
    }

    /// The blobs found unreferenced and not yet removed, sorted.
    pub(crate) fn candidates(&self) -> Vec<[u8; 32]> {
        let candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<[u8; 32]> = candidates.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// Takes back candidates an earlier run of this node found unreferenced, as found
    /// now: a [`BlobStore::collect`] at least a grace from now removes those still
    /// unreferenced then. Only safe for blobs some pass found unreferenced, and if no
    /// pass runs sooner than a grace after this (writes under way before the restart
    /// touched them in memory only; they have a whole grace to commit).
    pub(crate) fn restore_candidates(&self, keys: impl IntoIterator<Item = [u8; 32]>) {
        let now = std::time::Instant::now();
        let mut candidates = self.candidates.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            candidates.entry(key).or_insert(now);
        }
    }

    /// Compacts the segments at most half of whose bytes are still named by a record:
    /// their live blobs are written again (as new uploads are, checked against their
    /// CRC32C), the new records made durable, and the files deleted. First closes the
    /// files the last compaction deleted, which readers may have used until now. After
    /// each move it pauses `tranquility` times as long as the move took.
    pub(crate) async fn compact(&self, tranquility: u32) -> Result<Compacted, StoreError> {
        let released = self.backend.release_retired();
        self.forget_places_in(&released);
        let sizes: HashMap<u32, u64> = self.backend.compactable()?.into_iter().collect();
        if sizes.is_empty() {
            return Ok(Compacted::default());
        }
        let mut live: HashMap<u32, u64> = HashMap::new();
        self.backend.each_meta(&mut |_, meta| {
            for e in &meta.extents {
                if sizes.contains_key(&e.segment) {
                    *live.entry(e.segment).or_default() += u64::from(e.len);
                }
            }
        })?;
        let chosen: HashMap<u32, u64> = sizes
            .into_iter()
            .filter(|(id, size)| live.get(id).copied().unwrap_or(0).saturating_mul(2) <= *size)
            .collect();
        if chosen.is_empty() {
            return Ok(Compacted::default());
        }
        let mut to_move = Vec::new();
        self.backend.each_meta(&mut |key, meta| {
            if meta.extents.iter().any(|e| chosen.contains_key(&e.segment)) {
                to_move.push((key, meta));
            }
        })?;
        let mut done = Compacted::default();
        for (key, meta) in to_move {
            let started = std::time::Instant::now();
            let moved = self.relocate(key, meta).await;
            tokio::time::sleep(started.elapsed() * tranquility).await;
            match moved {
                Ok(()) => done.moved += 1,
                // Damaged bytes drop their record (a peer's copy is fetched again); any
                // other failure keeps the segment, checked below.
                Err(e) => tracing::warn!(
                    sha256 = %hex::encode(key),
                    error = %e,
                    "compaction could not move a blob; its segment stays"
                ),
            }
        }
        self.backend.sync_records()?;
        // Only segments no record names any more are deleted.
        let mut named = std::collections::HashSet::new();
        self.backend.each_meta(&mut |_, meta| {
            named.extend(meta.extents.iter().map(|e| e.segment));
        })?;
        let mut retired: Vec<(u32, u64)> = chosen
            .into_iter()
            .filter(|(id, _)| !named.contains(id))
            .collect();
        retired.sort_unstable();
        for &(id, size) in &retired {
            self.backend.retire(id)?;
            done.segments += 1;
            done.bytes += size;
        }
        let ids: Vec<u32> = retired.iter().map(|(id, _)| *id).collect();
        self.forget_places_in(&ids);
        Ok(done)
    }

    /// Drops the decoded records naming a place in these segments: a read that decoded
    /// a blob's record just before its move may have kept it after the move's.
    fn forget_places_in(&self, segments: &[u32]) {
        if segments.is_empty() {
            return;
        }
        self.metas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, m| !m.extents.iter().any(|e| segments.contains(&e.segment)));
    }

    /// Writes a blob again outside the segments being compacted, replacing its record if
    /// that still names `meta`'s place.
    async fn relocate(&self, sha: [u8; 32], meta: BlobMeta) -> Result<(), BlobError> {
        let check = match meta.crc32c {
            Some(crc) => ReplicaCheck::Crc32c(crc),
            None => ReplicaCheck::Sha256,
        };
        let info = meta.info.clone();
        let body = self.parts_of(sha, Arc::new(meta.clone()), false);
        // A move is not a read: what the cache holds stays.
        let mut written = self
            .write(body, u64::MAX, Some((&info, check)), false)
            .await?;
        written.replaces = Some(meta);
        written.commit().await.map(|_| ())
    }

    /// Reads a blob back from disk (not from the cache) and checks it: against the CRC32C
    /// recorded at upload, or, for a record that has none, against the SHA-256 that names
    /// it. A damaged copy's record is dropped, as on a read, so the blob counts as missing
    /// here and is fetched again from a peer. Blocking: disk reads.
    pub(crate) fn scrub(&self, sha256: &str) -> Result<Scrubbed, StoreError> {
        let Some(sha) = parse_sha256(sha256) else {
            return Ok(Scrubbed::Absent);
        };
        let Some(meta) = self.meta(&sha)? else {
            return Ok(Scrubbed::Absent);
        };
        let mut crc = 0u32;
        let mut digest = meta.crc32c.is_none().then(Sha256::new);
        for i in 0..meta.parts() {
            let Some(part) = self.backend.part_uncached(&meta, i)? else {
                drop_damaged(&*self.backend, &self.metas, &self.removals, &sha, &meta);
                return Ok(Scrubbed::Damaged);
            };
            match &mut digest {
                Some(d) => d.update(&part),
                None => crc = crc32c::crc32c_append(crc, &part),
            }
        }
        let intact = match digest {
            Some(d) => <[u8; 32]>::from(d.finalize()) == sha,
            None => meta.crc32c == Some(crc),
        };
        if !intact {
            drop_damaged(&*self.backend, &self.metas, &self.removals, &sha, &meta);
            return Ok(Scrubbed::Damaged);
        }
        Ok(Scrubbed::Intact {
            bytes: meta.info.size,
        })
    }

    /// Reads a whole blob (tests and small documents only).
    #[cfg(test)]
    pub(crate) async fn read_all(&self, sha256: &str) -> Option<Bytes> {
        let (_, body) = self.open(sha256).ok()??;
        Some(body.collect().await.ok()?.to_bytes())
    }
}

/// Convenience for digests in tests.
#[cfg(test)]
pub(crate) fn hashes_of(data: &[u8]) -> Hashes {
    granary_format::hashing::hash_bytes(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_format::body;
    use std::sync::atomic::Ordering;

    fn stream_of(pieces: Vec<Bytes>) -> Body {
        let s = futures::stream::iter(
            pieces
                .into_iter()
                .map(|b| Ok::<_, granary_format::body::BodyError>(http_body::Frame::data(b))),
        );
        BodyExt::boxed_unsync(http_body_util::StreamBody::new(s))
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_chunk_is_copied_only_when_much_shorter_than_its_allocation() {
        let gathered = |capacity: usize, len: usize| {
            let mut buf = BytesMut::with_capacity(capacity);
            buf.extend_from_slice(&sample(len));
            let allocated = buf.capacity();
            (buf.split().freeze(), allocated)
        };
        // Gathered in a buffer sized by the body's length: kept as it is.
        let (chunk, allocated) = gathered(100_003, 100_000);
        let at = chunk.as_ptr();
        let kept = own_size(chunk, allocated);
        assert_eq!(kept.as_ptr(), at);
        // Gathered in a whole chunk's buffer: copied, so the cache does not hold the rest.
        let (chunk, allocated) = gathered(CHUNK_SIZE, 100_000);
        let at = chunk.as_ptr();
        let copied = own_size(chunk, allocated);
        assert_ne!(copied.as_ptr(), at);
        assert_eq!(copied, kept);
        // A full chunk is never copied.
        let (chunk, allocated) = gathered(CHUNK_SIZE, CHUNK_SIZE);
        let at = chunk.as_ptr();
        assert_eq!(own_size(chunk, allocated).as_ptr(), at);
    }

    async fn roundtrip(store: BlobStore) {
        let data = sample(CHUNK_SIZE * 2 + 12345);
        let pieces: Vec<Bytes> = data.chunks(10_000).map(Bytes::copy_from_slice).collect();
        let info = store.put(stream_of(pieces), u64::MAX).await.unwrap();
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(info.hashes, hashes_of(&data));
        let back = store.read_all(&info.hashes.sha256).await.unwrap();
        assert_eq!(&back[..], &data[..]);
        // Same bytes again: deduplicated, still readable.
        let again = store.put(body::full(data.clone()), u64::MAX).await.unwrap();
        assert_eq!(again, info);
        assert_eq!(
            &store.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );
        // Empty blob.
        let empty = store.put(body::empty(), 10).await.unwrap();
        assert_eq!(empty.size, 0);
        assert_eq!(store.read_all(&empty.hashes.sha256).await.unwrap().len(), 0);
    }

    #[tokio::test]
    async fn replicas_are_checked_by_sha256_and_size_and_keep_the_senders_digests() {
        let backend = Arc::new(MemBlobBackend::default());
        let store = BlobStore::new(backend.clone(), 1 << 20);
        let data = sample(CHUNK_SIZE + 99);
        let info = BlobInfo {
            size: data.len() as u64,
            hashes: hashes_of(&data),
        };
        // Bytes that are not what the sender named: refused, nothing recorded.
        let mut wrong = data.clone();
        wrong[7] ^= 1;
        assert!(matches!(
            store
                .put_replica(body::full(wrong), u64::MAX, &info, ReplicaCheck::Sha256)
                .await,
            Err(BlobError::Upload(_))
        ));
        assert!(!store.has(&info.hashes.sha256).unwrap());
        assert!(backend.metas.lock().unwrap().is_empty());
        // A wrong size with the right bytes is refused too.
        let mut short = info.clone();
        short.size -= 1;
        assert!(
            store
                .put_replica(
                    body::full(data.clone()),
                    u64::MAX,
                    &short,
                    ReplicaCheck::Sha256
                )
                .await
                .is_err()
        );
        // The right bytes: stored under the sender's digests, readable.
        let stored = store
            .put_replica(
                body::full(data.clone()),
                u64::MAX,
                &info,
                ReplicaCheck::Sha256,
            )
            .await
            .unwrap();
        assert_eq!(stored, info);
        assert_eq!(
            &store.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );
    }

    #[tokio::test]
    async fn every_write_records_a_crc32c_and_copies_checked_by_it_must_match_it() {
        let backend = Arc::new(MemBlobBackend::default());
        let store = BlobStore::new(backend.clone(), 1 << 20);
        let data = sample(CHUNK_SIZE * 2 + 4321);
        // A new upload records the CRC32C of all its bytes, across chunks.
        let info = store.put(body::full(data.clone()), u64::MAX).await.unwrap();
        let crc = crc32c::crc32c(&data);
        assert_eq!(store.crc32c(&info.hashes.sha256).unwrap(), Some(crc));

        // The copy on another member is checked by that CRC, not by its SHA-256.
        let other = Arc::new(MemBlobBackend::default());
        let copy = BlobStore::new(other.clone(), 1 << 20);
        let mut flipped = data.clone();
        flipped[CHUNK_SIZE + 17] ^= 0x10;
        let err = copy
            .put_replica(
                body::full(flipped),
                u64::MAX,
                &info,
                ReplicaCheck::Crc32c(crc),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("CRC32C"), "{err}");
        assert!(!copy.has(&info.hashes.sha256).unwrap());
        assert!(other.metas.lock().unwrap().is_empty());
        // The right bytes with a wrong size are refused too.
        let mut short = info.clone();
        short.size += 1;
        assert!(
            copy.put_replica(
                body::full(data.clone()),
                u64::MAX,
                &short,
                ReplicaCheck::Crc32c(crc)
            )
            .await
            .is_err()
        );
        // The right bytes are stored, with the sender's digests and the same CRC.
        let stored = copy
            .put_replica(
                body::full(data.clone()),
                u64::MAX,
                &info,
                ReplicaCheck::Crc32c(crc),
            )
            .await
            .unwrap();
        assert_eq!(stored, info);
        assert_eq!(copy.crc32c(&info.hashes.sha256).unwrap(), Some(crc));
        assert_eq!(
            &copy.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );

        // A copy checked by SHA-256 (no CRC from the sender) records its CRC as well.
        let third = BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20);
        third
            .put_replica(body::full(data), u64::MAX, &info, ReplicaCheck::Sha256)
            .await
            .unwrap();
        assert_eq!(third.crc32c(&info.hashes.sha256).unwrap(), Some(crc));
    }

    #[tokio::test]
    async fn a_bit_rotted_on_the_senders_disk_is_caught_by_the_crc_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(CHUNK_SIZE + 999);
        let (info, crc) = {
            let store = Store::open(dir.path()).unwrap();
            let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
            let blobs = BlobStore::new(Arc::new(backend), 1 << 20);
            let info = blobs.put(body::full(data.clone()), u64::MAX).await.unwrap();
            let crc = blobs.crc32c(&info.hashes.sha256).unwrap().unwrap();
            (info, crc)
        };
        // One bit of the chunks' segment changes on disk while the node is down (the
        // other segment is the journal, holding the blob's record).
        let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(segments.len(), 2, "{segments:?}");
        segments.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
        let mut bytes = std::fs::read(&segments[1]).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&segments[1], bytes).unwrap();

        // Reopened (nothing cached), the node streams the blob (in two parts) with the CRC
        // recorded at upload; the sender finds the mismatch as its stream ends and fails
        // it, and the receiving member would refuse the bytes anyway.
        let store = Store::open(dir.path()).unwrap();
        let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
        let sender = BlobStore::new(Arc::new(backend), 1 << 20);
        let (sent_info, body) = sender.open(&info.hashes.sha256).unwrap().unwrap();
        assert_eq!(sent_info, info);
        assert_eq!(sender.crc32c(&info.hashes.sha256).unwrap(), Some(crc));
        let receiver = BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20);
        let err = receiver
            .put_replica(body, u64::MAX, &info, ReplicaCheck::Crc32c(crc))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("CRC32C"), "{err}");
        assert!(!receiver.has(&info.hashes.sha256).unwrap());
        // The sender dropped its record: the blob counts as missing there, to be fetched.
        assert!(!sender.has(&info.hashes.sha256).unwrap());
    }

    /// Damages a stored chunk on disk: flips `mask` in its byte at `offset`, in the
    /// segment files under `data_dir/blobs`.
    fn flip_bit(data_dir: &std::path::Path, at: &Extent, offset: usize, mask: u8) {
        let path = data_dir
            .join("blobs")
            .join(format!("{:010}.seg", at.segment));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at.offset as usize + offset] ^= mask;
        std::fs::write(&path, bytes).unwrap();
    }

    /// Bit rot in a small blob (one part, its bytes in the journal) is found when it is
    /// read: the node answers as if it lacked the blob, so the caller fetches it from a
    /// peer, and that copy is stored and read from then on, across a restart too.
    #[tokio::test]
    async fn a_damaged_small_blob_is_dropped_on_read_and_stored_again_from_a_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let data = Bytes::from(sample(5000));
        let open = || {
            let store = Store::open(dir.path()).unwrap();
            let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
            BlobStore::new(Arc::new(backend), 1 << 20)
        };
        let (info, crc, at) = {
            let blobs = open();
            let info = blobs.put(body::full(data.clone()), u64::MAX).await.unwrap();
            let crc = blobs.crc32c(&info.hashes.sha256).unwrap().unwrap();
            let sha = parse_sha256(&info.hashes.sha256).unwrap();
            let meta = blobs.meta(&sha).unwrap().unwrap();
            assert_eq!(meta.extents.len(), 1);
            (info, crc, meta.extents[0])
        };
        flip_bit(dir.path(), &at, 100, 0x10);

        let blobs = open();
        assert!(blobs.has(&info.hashes.sha256).unwrap());
        assert!(blobs.open(&info.hashes.sha256).unwrap().is_none());
        assert!(!blobs.has(&info.hashes.sha256).unwrap());
        // What a fetch from a peer does with the good copy.
        blobs
            .put_replica(
                body::full(data.clone()),
                u64::MAX,
                &info,
                ReplicaCheck::Crc32c(crc),
            )
            .await
            .unwrap();
        assert_eq!(blobs.read_all(&info.hashes.sha256).await.unwrap(), data);
        drop(blobs);
        let blobs = open();
        assert_eq!(blobs.read_all(&info.hashes.sha256).await.unwrap(), data);
    }

    /// The scrub reads bytes from disk even when the cache holds them, finds a damaged
    /// copy by its CRC32C (in one part or several) and drops its record; a record without
    /// a CRC32C is checked by the SHA-256 that names it.
    #[tokio::test]
    async fn the_scrub_checks_the_disk_not_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
        let blobs = BlobStore::new(Arc::new(backend), 8 << 20);
        let small = blobs
            .put(body::full(Bytes::from(sample(5000))), u64::MAX)
            .await
            .unwrap();
        let large = blobs
            .put(
                body::full(Bytes::from(sample(CHUNK_SIZE * 2 + 7))),
                u64::MAX,
            )
            .await
            .unwrap();
        for info in [&small, &large] {
            let sha256 = &info.hashes.sha256;
            assert_eq!(
                blobs.scrub(sha256).unwrap(),
                Scrubbed::Intact { bytes: info.size }
            );
            // Read once, so the cache holds every part.
            assert!(blobs.read_all(sha256).await.is_some());
            let meta = blobs.meta(&parse_sha256(sha256).unwrap()).unwrap().unwrap();
            let at = meta.extents[meta.extents.len() - 1];
            flip_bit(dir.path(), &at, 3, 0x01);
            assert_eq!(blobs.scrub(sha256).unwrap(), Scrubbed::Damaged);
            assert!(!blobs.has(sha256).unwrap(), "the damaged record is dropped");
            assert_eq!(blobs.scrub(sha256).unwrap(), Scrubbed::Absent);
        }

        // Records from before CRC32Cs were recorded: checked by their SHA-256.
        let backend = Arc::new(MemBlobBackend::default());
        let blobs = BlobStore::new(backend.clone(), 0);
        let good = Bytes::from(sample(700));
        let bad = Bytes::from(sample(701));
        for (bytes, named) in [(&good, &good), (&bad, &good.slice(1..))] {
            let meta = BlobMeta {
                extents: Vec::new(),
                data_id: None,
                chunks: 0,
                info: BlobInfo {
                    size: bytes.len() as u64,
                    hashes: hashes_of(named),
                },
                crc32c: None,
            };
            let sha = parse_sha256(&meta.info.hashes.sha256).unwrap();
            backend
                .commit(sha, meta, Some(bytes.clone()), None)
                .await
                .unwrap();
        }
        let good_sha = hashes_of(&good).sha256;
        assert_eq!(
            blobs.scrub(&good_sha).unwrap(),
            Scrubbed::Intact { bytes: 700 }
        );
        let bad_sha = hashes_of(&good.slice(1..)).sha256;
        assert_eq!(blobs.scrub(&bad_sha).unwrap(), Scrubbed::Damaged);
        assert!(!blobs.has(&bad_sha).unwrap());
    }

    /// Dropping a damaged copy's record leaves alone a copy committed after it was read.
    #[tokio::test]
    async fn dropping_a_damaged_record_spares_a_newer_copy() {
        let backend = MemBlobBackend::default();
        let data = Bytes::from(sample(300));
        let meta = BlobMeta {
            extents: Vec::new(),
            data_id: None,
            chunks: 0,
            info: BlobInfo {
                size: 300,
                hashes: hashes_of(&data),
            },
            crc32c: Some(crc32c::crc32c(&data)),
        };
        let sha = parse_sha256(&meta.info.hashes.sha256).unwrap();
        let stored = backend
            .commit(sha, meta, Some(data), None)
            .await
            .unwrap()
            .unwrap();
        // The record a reader found damaged named other bytes than the one stored now.
        let mut read_before = stored.clone();
        read_before.extents[0].offset += 1;
        assert!(!backend.forget(&sha, &read_before).unwrap());
        assert!(backend.meta(&sha).unwrap().is_some());
        assert!(backend.forget(&sha, &stored).unwrap());
        assert!(backend.meta(&sha).unwrap().is_none());
    }

    /// A blob's record reaches RocksDB unsynced, after the journal's sync: if a crash of
    /// the machine loses that write, reopening records it again from the journal.
    #[tokio::test]
    async fn blobs_whose_records_a_crash_lost_are_readable_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let small = sample(1000);
        let large = sample(CHUNK_SIZE * 2 + 5);
        let infos = {
            let store = Store::open(dir.path()).unwrap();
            let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
            let blobs = BlobStore::new(Arc::new(backend), 1 << 20);
            let mut infos = Vec::new();
            for data in [&small, &large] {
                infos.push(blobs.put(body::full(data.clone()), u64::MAX).await.unwrap());
            }
            infos
        };
        // What a crash would leave: the journal's segments recorded (a synced write), the
        // records and the head not.
        {
            let store = Store::open(dir.path()).unwrap();
            let cf = store.cf(CF_BLOB_META);
            for info in &infos {
                let sha = parse_sha256(&info.hashes.sha256).unwrap();
                store.db().delete_cf(cf, sha).unwrap();
            }
            store.db().delete_cf(cf, JOURNAL_HEAD).unwrap();
            assert!(store.db().get_cf(cf, JOURNAL_SEGMENTS).unwrap().is_some());
        }
        let store = Store::open(dir.path()).unwrap();
        let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
        let blobs = BlobStore::new(Arc::new(backend), 0);
        for (info, data) in infos.iter().zip([&small, &large]) {
            let (got, _) = blobs.open(&info.hashes.sha256).unwrap().unwrap();
            assert_eq!(&got, info);
            assert_eq!(
                &blobs.read_all(&info.hashes.sha256).await.unwrap()[..],
                &data[..]
            );
        }
    }

    #[tokio::test]
    async fn rocks_roundtrip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
        roundtrip(BlobStore::new(Arc::new(backend), 1 << 20)).await;
    }

    #[tokio::test]
    async fn blobs_of_the_older_layout_stay_readable_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample(CHUNK_SIZE + 777);
        let info = BlobInfo {
            size: data.len() as u64,
            hashes: hashes_of(&data),
        };
        let sha = parse_sha256(&info.hashes.sha256).unwrap();
        let new_data = sample(3 * CHUNK_SIZE + 5);
        {
            // A blob written as earlier versions wrote them: chunks in `blobs` under a
            // data id, a meta naming them.
            let store = Store::open(dir.path()).unwrap();
            let id = [7u8; 16];
            let cf = store.cf(CF_BLOBS);
            for (i, c) in data.chunks(CHUNK_SIZE).enumerate() {
                store.db().put_cf(cf, chunk_key(&id, i as u32), c).unwrap();
            }
            let old = serde_json::json!({"data_id": id, "chunks": 2, "info": info});
            let cf = store.cf(CF_BLOB_META);
            store
                .db()
                .put_cf(cf, sha, serde_json::to_vec(&old).unwrap())
                .unwrap();
            let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
            let blobs = BlobStore::new(Arc::new(backend), 0);
            assert_eq!(
                &blobs.read_all(&info.hashes.sha256).await.unwrap()[..],
                &data[..]
            );
            blobs
                .put(body::full(new_data.clone()), u64::MAX)
                .await
                .unwrap();
        }
        // Reopened (the committer thread is gone with the old backend): both readable.
        let store = Store::open(dir.path()).unwrap();
        let backend = RocksBlobBackend::open(store, &dir.path().join("blobs")).unwrap();
        let blobs = BlobStore::new(Arc::new(backend), 0);
        assert_eq!(
            &blobs.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );
        let new_sha = hashes_of(&new_data).sha256;
        assert_eq!(&blobs.read_all(&new_sha).await.unwrap()[..], &new_data[..]);
    }

    #[tokio::test]
    async fn mem_roundtrip_and_dedup() {
        roundtrip(BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20)).await;
    }

    #[tokio::test]
    async fn over_limit_is_refused_and_leaves_nothing() {
        let backend = Arc::new(MemBlobBackend::default());
        let store = BlobStore::new(backend.clone(), 1 << 20);
        let data = sample(CHUNK_SIZE + 10);
        let err = store.put(body::full(data.clone()), 1000).await.unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 1000 }));
        assert!(backend.metas.lock().unwrap().is_empty());
        assert!(backend.chunks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn write_failure_is_reported() {
        let backend = Arc::new(MemBlobBackend::default());
        backend.fail_writes.store(true, Ordering::SeqCst);
        let store = BlobStore::new(backend.clone(), 1 << 20);
        let err = store
            .put(body::full(sample(100)), u64::MAX)
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Store(StoreError::Io(_))));
        assert!(
            store
                .open(&hashes_of(&sample(100)).sha256)
                .unwrap()
                .is_none()
        );
    }

    fn key_of(info: &BlobInfo) -> [u8; 32] {
        parse_sha256(&info.hashes.sha256).unwrap()
    }

    /// A backend whose removals and record reads can be held part way, to run a read
    /// and a removal in a chosen interleaving.
    struct Gated {
        inner: MemBlobBackend,
        /// Held before a removal or a forget changes anything.
        hold_removal: std::sync::atomic::AtomicBool,
        /// Held after a record read, before it is returned.
        hold_read: std::sync::atomic::AtomicBool,
        /// Entered by the held call, then left when the test says so: one pair for
        /// each kind of call.
        removal: (std::sync::Barrier, std::sync::Barrier),
        read: (std::sync::Barrier, std::sync::Barrier),
    }

    impl Gated {
        fn new() -> Self {
            Gated {
                inner: MemBlobBackend::default(),
                hold_removal: Default::default(),
                hold_read: Default::default(),
                removal: (std::sync::Barrier::new(2), std::sync::Barrier::new(2)),
                read: (std::sync::Barrier::new(2), std::sync::Barrier::new(2)),
            }
        }

        fn pause(
            armed: &std::sync::atomic::AtomicBool,
            (at, go): &(std::sync::Barrier, std::sync::Barrier),
        ) {
            if armed.swap(false, Ordering::SeqCst) {
                at.wait();
                go.wait();
            }
        }
    }

    impl BlobBackend for Gated {
        fn put_chunk(&self, data: &[u8]) -> Result<Extent, StoreError> {
            self.inner.put_chunk(data)
        }
        fn commit(
            &self,
            sha256: [u8; 32],
            meta: BlobMeta,
            whole: Option<Bytes>,
            replaces: Option<BlobMeta>,
        ) -> BoxFuture<'static, Result<Option<BlobMeta>, StoreError>> {
            self.inner.commit(sha256, meta, whole, replaces)
        }
        fn discard(&self, extents: &[Extent]) {
            self.inner.discard(extents)
        }
        fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
            let read = self.inner.meta(sha256);
            Gated::pause(&self.hold_read, &self.read);
            read
        }
        fn part(&self, meta: &BlobMeta, i: usize) -> Result<Option<Bytes>, StoreError> {
            self.inner.part(meta, i)
        }
        fn forget(&self, sha256: &[u8; 32], bad: &BlobMeta) -> Result<bool, StoreError> {
            Gated::pause(&self.hold_removal, &self.removal);
            self.inner.forget(sha256, bad)
        }
        fn each_meta(&self, f: &mut dyn FnMut([u8; 32], BlobMeta)) -> Result<(), StoreError> {
            self.inner.each_meta(f)
        }
        fn remove(
            &self,
            blobs: Vec<([u8; 32], BlobMeta)>,
        ) -> Result<Vec<([u8; 32], BlobMeta)>, StoreError> {
            Gated::pause(&self.hold_removal, &self.removal);
            self.inner.remove(blobs)
        }
    }

    /// A record read just before the collector (or a failed check) removes it is not
    /// kept in the record cache after the removal, whichever comes first of the read's
    /// start and the removal's: otherwise the node would go on saying it holds the blob
    /// (to a peer asking before a push, which then counts this copy towards a majority).
    #[test]
    fn a_record_read_across_a_removal_is_not_remembered() {
        for damaged in [false, true] {
            let backend = Arc::new(Gated::new());
            let store = BlobStore::new(backend.clone(), 1 << 20);
            let rt = tokio::runtime::Runtime::new().unwrap();
            let info = rt
                .block_on(store.put(body::full(vec![7u8; 3000]), u64::MAX))
                .unwrap();
            let sha = info.hashes.sha256.clone();
            let key = parse_sha256(&sha).unwrap();
            let none = std::collections::HashSet::new();
            let grace = std::time::Duration::ZERO;
            assert_eq!(store.collect(&none, grace).unwrap().candidates, 1);
            store.metas.write().unwrap().clear();

            // The removal starts and is held before it changes anything.
            backend.hold_removal.store(true, Ordering::SeqCst);
            let remover = {
                let store = store.clone();
                let meta = backend.inner.meta(&key).unwrap().unwrap();
                std::thread::spawn(move || {
                    if damaged {
                        drop_damaged(&*store.backend, &store.metas, &store.removals, &key, &meta);
                    } else {
                        assert_eq!(store.collect(&none, grace).unwrap().removed, 1);
                    }
                })
            };
            backend.removal.0.wait();
            // A read starts now and reads the record before the removal.
            backend.hold_read.store(true, Ordering::SeqCst);
            let reader = {
                let store = store.clone();
                std::thread::spawn(move || store.meta(&key).unwrap().is_some())
            };
            backend.read.0.wait();
            // The removal goes through; then the read ends.
            backend.removal.1.wait();
            remover.join().unwrap();
            backend.read.1.wait();
            assert!(reader.join().unwrap(), "the read found the record");
            assert!(
                !store.has(&sha).unwrap(),
                "damaged: {damaged}: the removed record was remembered"
            );
        }
    }

    /// A blob is removed once two passes a grace apart found it unreferenced; one that
    /// is referenced again, or that a write looked for or stored in between, stays.
    #[tokio::test]
    async fn only_blobs_unreferenced_for_a_whole_grace_are_removed() {
        let store = BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20);
        let mut infos = Vec::new();
        for i in 0..5u8 {
            let data = vec![i; 1000 + usize::from(i)];
            infos.push(store.put(body::full(data), u64::MAX).await.unwrap());
        }
        let [kept, looked_for, referenced_again, restored, dead] =
            infos.clone().try_into().unwrap();
        let mut referenced = std::collections::HashSet::from([key_of(&kept)]);
        let grace = std::time::Duration::ZERO;

        let first = store.collect(&referenced, grace).unwrap();
        assert_eq!((first.removed, first.candidates), (0, 4), "{first:?}");
        let all: u64 = infos.iter().map(|i| i.size).sum();
        assert_eq!((first.stored, first.stored_bytes), (5, all));
        // Between the passes: a write asks for one (as a push does), another is
        // referenced again, a third is uploaded again.
        assert!(store.has(&looked_for.hashes.sha256).unwrap());
        referenced.insert(key_of(&referenced_again));
        store
            .put(body::full(vec![3u8; 1003]), u64::MAX)
            .await
            .unwrap();
        let second = store.collect(&referenced, grace).unwrap();
        assert_eq!(second.removed, 1, "{second:?}");
        assert_eq!(second.removed_bytes, dead.size);
        assert_eq!((second.stored, second.stored_bytes), (4, all - dead.size));
        assert!(!store.has(&dead.hashes.sha256).unwrap());
        for info in [&kept, &looked_for, &referenced_again, &restored] {
            assert_eq!(
                store.read_all(&info.hashes.sha256).await.unwrap().len() as u64,
                info.size
            );
        }
        // The two touched ones are candidates again, removed a grace later.
        assert_eq!(second.candidates, 2);
        let third = store.collect(&referenced, grace).unwrap();
        assert_eq!((third.removed, third.candidates), (2, 0), "{third:?}");

        // Within a long grace nothing goes.
        referenced.clear();
        let long = std::time::Duration::from_secs(3600);
        store.collect(&referenced, long).unwrap();
        assert_eq!(store.collect(&referenced, long).unwrap().removed, 0);
        // Bytes removed and uploaded again are stored again.
        let dead_bytes = vec![4u8; 1004];
        let again = store
            .put(body::full(dead_bytes.clone()), u64::MAX)
            .await
            .unwrap();
        assert_eq!(again, dead);
        assert_eq!(
            &store.read_all(&dead.hashes.sha256).await.unwrap()[..],
            &dead_bytes[..]
        );
    }

    /// Candidates taken back after a restart are removed by the first pass a grace
    /// later, if still unreferenced; one referenced meanwhile is kept. Without them, the
    /// first pass after a restart only finds candidates.
    #[tokio::test]
    async fn candidates_taken_back_after_a_restart_are_removed_a_grace_later() {
        let backend = Arc::new(MemBlobBackend::default());
        let store = BlobStore::new(backend.clone(), 1 << 20);
        let mut infos = Vec::new();
        for i in 0..3u8 {
            infos.push(
                store
                    .put(body::full(vec![i; 2000]), u64::MAX)
                    .await
                    .unwrap(),
            );
        }
        let grace = std::time::Duration::from_millis(300);
        let none = std::collections::HashSet::new();
        assert_eq!(store.collect(&none, grace).unwrap().candidates, 3);
        let kept = store.candidates();
        assert_eq!(kept.len(), 3);
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "sorted");

        // The restart: the same bytes, a new store, its candidates taken back.
        let restarted = BlobStore::new(backend.clone(), 1 << 20);
        restarted.restore_candidates(kept.iter().copied());
        assert_eq!(restarted.candidates(), kept);
        // One is referenced again by the time of the first pass.
        let referenced = std::collections::HashSet::from([key_of(&infos[0])]);
        // Not before a grace from the restart.
        let early = restarted.collect(&referenced, grace).unwrap();
        assert_eq!((early.removed, early.candidates), (0, 2), "{early:?}");
        tokio::time::sleep(grace).await;
        let first = restarted.collect(&referenced, grace).unwrap();
        assert_eq!((first.removed, first.candidates), (2, 0), "{first:?}");
        assert!(restarted.has(&infos[0].hashes.sha256).unwrap());
        for info in &infos[1..] {
            assert!(!restarted.has(&info.hashes.sha256).unwrap());
        }

        // A fresh store without them only finds candidates at its first pass.
        let fresh = BlobStore::new(backend, 1 << 20);
        let again = fresh.collect(&none, std::time::Duration::ZERO).unwrap();
        assert_eq!((again.removed, again.candidates), (0, 1), "{again:?}");
    }

    /// Total size of the segment files under `dir`.
    fn segment_bytes(dir: &std::path::Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    /// Removing most blobs and compacting gives the space back, a segment at a time:
    /// live blobs (in chunks and whole) are moved out first and read back identical,
    /// also after a restart, and removed ones stay removed.
    #[tokio::test]
    async fn compaction_gives_space_back_and_keeps_every_live_blob() {
        let dir = tempfile::tempdir().unwrap();
        let blobs_dir = dir.path().join("blobs");
        let open = || {
            let store = Store::open(dir.path()).unwrap();
            let backend = RocksBlobBackend::open_sized(store, &blobs_dir, 1 << 20).unwrap();
            BlobStore::new(Arc::new(backend), 1 << 20)
        };
        let store = open();
        // Chunked blobs (two chunks each) and whole ones (kept in the journal), enough
        // of both to fill several 1 MiB segments.
        let mut all = Vec::new();
        for i in 0..24u64 {
            let len = if i % 2 == 0 {
                CHUNK_SIZE + 40_000
            } else {
                90_000
            };
            let data = crate::store::noise(len, i);
            let info = store.put(body::full(data.clone()), u64::MAX).await.unwrap();
            all.push((info, data));
        }
        let before = segment_bytes(&blobs_dir);
        // One in four stays.
        let live: Vec<_> = all.iter().step_by(4).cloned().collect();
        let referenced: std::collections::HashSet<_> =
            live.iter().map(|(i, _)| key_of(i)).collect();
        let grace = std::time::Duration::ZERO;
        store.collect(&referenced, grace).unwrap();
        let collected = store.collect(&referenced, grace).unwrap();
        assert_eq!(collected.removed, 18);
        // New writes after the removal move the appended segment and the journal's head
        // on, so that the segments holding the dead are below both.
        let mut later = Vec::new();
        for i in 100..108u64 {
            let len = if i % 2 == 0 {
                CHUNK_SIZE + 40_000
            } else {
                90_000
            };
            let data = crate::store::noise(len, i);
            later.push((
                store.put(body::full(data.clone()), u64::MAX).await.unwrap(),
                data,
            ));
        }
        let places: Vec<_> = live
            .iter()
            .map(|(i, _)| store.backend.meta(&key_of(i)).unwrap().unwrap())
            .collect();
        let compacted = store.compact(0).await.unwrap();
        assert!(compacted.segments >= 2, "{compacted:?}");
        assert!(compacted.moved >= 1, "{compacted:?}");
        // A read that decoded a moved blob's record just before the move, and kept it
        // after the move's: it must not outlive the deleted file.
        for ((info, _), old) in live.iter().zip(places) {
            let now = store.backend.meta(&key_of(info)).unwrap().unwrap();
            if !now.same_place(&old) {
                remember(&store.metas, key_of(info), Arc::new(old));
            }
        }
        // The deleted files' space is back once the next pass releases them.
        store.compact(0).await.unwrap();
        let after = segment_bytes(&blobs_dir);
        // Three segments of the first five went (4.7 MB before, 2.8 MB of it deleted,
        // 1.6 MB written since).
        assert!(compacted.bytes >= 2 << 20, "{compacted:?}");
        assert!(
            after < before,
            "{before} bytes before, {after} after, {compacted:?}"
        );
        let check = |store: BlobStore| {
            let (live, later, all) = (live.clone(), later.clone(), all.clone());
            async move {
                for (info, data) in live.iter().chain(&later) {
                    let back = store.read_all(&info.hashes.sha256).await.unwrap();
                    assert!(back[..] == data[..], "blob {} differs", info.hashes.sha256);
                }
                for (info, _) in all.iter().filter(|b| !live.contains(b)) {
                    assert!(!store.has(&info.hashes.sha256).unwrap());
                }
            }
        };
        check(store.clone()).await;
        drop(store);
        check(open()).await;
    }

    /// A blob stored before segment files existed (its chunks in the `blobs` column
    /// family) is read as before, and removed with its chunks.
    #[tokio::test]
    async fn a_blob_of_the_older_layout_is_removed_with_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let data = crate::store::noise(CHUNK_SIZE + 10, 1);
        let info = BlobInfo {
            size: data.len() as u64,
            hashes: hashes_of(&data),
        };
        let id = [7u8; 16];
        let meta = BlobMeta {
            extents: Vec::new(),
            data_id: Some(id),
            chunks: 2,
            info: info.clone(),
            crc32c: None,
        };
        let (meta_cf, chunks_cf) = (db.cf(CF_BLOB_META), db.cf(CF_BLOBS));
        for (i, part) in data.chunks(CHUNK_SIZE).enumerate() {
            db.db()
                .put_cf(chunks_cf, chunk_key(&id, i as u32), part)
                .unwrap();
        }
        db.db()
            .put_cf(meta_cf, key_of(&info), serde_json::to_vec(&meta).unwrap())
            .unwrap();
        let backend = RocksBlobBackend::open(db.clone(), &dir.path().join("blobs")).unwrap();
        let store = BlobStore::new(Arc::new(backend), 1 << 20);
        assert_eq!(
            &store.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );
        let none = std::collections::HashSet::new();
        store.collect(&none, std::time::Duration::ZERO).unwrap();
        let collected = store.collect(&none, std::time::Duration::ZERO).unwrap();
        assert_eq!((collected.removed, collected.removed_bytes), (1, info.size));
        assert!(!store.has(&info.hashes.sha256).unwrap());
        for i in 0..2 {
            let chunk = db.db().get_cf(chunks_cf, chunk_key(&id, i)).unwrap();
            assert!(chunk.is_none(), "chunk {i} is gone");
        }
    }

    /// Most packages fit in one chunk and go whole to the journal: with no chunk segment
    /// ever appended to, the journal's full segments below its head are compacted.
    #[tokio::test]
    async fn segments_of_whole_blobs_alone_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let backend =
            RocksBlobBackend::open_sized(store, &dir.path().join("blobs"), 1 << 20).unwrap();
        // A cache large enough to hold what it is given.
        let store = BlobStore::new(Arc::new(backend), 64 << 20);
        let mut all = Vec::new();
        for i in 0..40u64 {
            let data = crate::store::noise(100_000, i);
            all.push((
                store.put(body::full(data.clone()), u64::MAX).await.unwrap(),
                data,
            ));
        }
        let referenced = all.iter().step_by(3).map(|(i, _)| key_of(i)).collect();
        store
            .collect(&referenced, std::time::Duration::ZERO)
            .unwrap();
        assert_eq!(
            store
                .collect(&referenced, std::time::Duration::ZERO)
                .unwrap()
                .removed,
            26
        );
        let places: Vec<_> = all
            .iter()
            .step_by(3)
            .map(|(i, _)| store.backend.meta(&key_of(i)).unwrap().unwrap())
            .collect();
        let compacted = store.compact(0).await.unwrap();
        assert!(compacted.segments >= 2, "{compacted:?}");
        // Moves leave the chunk cache alone: it keeps what is read.
        let mut moved = 0;
        for ((info, _), old) in all.iter().step_by(3).zip(places) {
            let meta = store.backend.meta(&key_of(info)).unwrap().unwrap();
            if !meta.same_place(&old) {
                moved += 1;
                assert!(store.cache.get(&meta.cache_key(0)).is_none());
            }
        }
        assert_eq!(moved, compacted.moved);
        for (info, data) in all.iter().step_by(3) {
            let back = store.read_all(&info.hashes.sha256).await.unwrap();
            assert!(back[..] == data[..]);
        }
    }

    #[tokio::test]
    async fn unknown_and_malformed_digests_are_absent() {
        let store = BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20);
        assert!(store.open(&"0".repeat(64)).unwrap().is_none());
        assert!(store.open("zz").unwrap().is_none());
    }
}
