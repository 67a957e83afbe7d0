//! Content-addressed blob storage: SHA-256 addressed, chunked, streamed in and out.
//!
//! ```text
//!  upload body ──▶ BlobStore::put ──(hash md5/sha1/sha256/sha512 while streaming)──▶
//!     chunks under a fresh data id ──▶ commit: meta under sha256 (synced) ──▶ BlobInfo
//!  download ◀── BlobStore::open(sha256) ◀── meta ── chunks read one at a time
//! ```
//!
//! The SHA-256 is known only at the end of an upload, so chunks are written under a random
//! data id and the meta record (`sha256 → data id, size, hashes`) is written last, with a
//! WAL sync that also makes every chunk before it durable. If the blob already existed,
//! the new chunks are discarded. Nothing holds a whole artifact in memory: one chunk at a
//! time, in and out. Reference counting and garbage collection of unreferenced blobs
//! belong to the state machine, not here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use granary_format::Body;
use granary_format::hashing::MultiHasher;
use granary_format::model::BlobInfo;
#[cfg(test)]
use granary_format::model::Hashes;
use http_body_util::BodyExt;
use rocksdb::WriteOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::chunk_cache::ChunkCache;
use super::{CF_BLOB_META, CF_BLOBS, Store, StoreError};

/// Size of one stored chunk.
pub(crate) const CHUNK_SIZE: usize = 256 * 1024;

/// What is recorded for a blob.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct BlobMeta {
    /// Where its chunks live.
    pub(crate) data_id: [u8; 16],
    /// Number of chunks.
    pub(crate) chunks: u32,
    /// Size and digests.
    pub(crate) info: BlobInfo,
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

/// The storage a [`BlobStore`] runs on: RocksDB in the node, memory in tests (where it can
/// also fail on purpose).
pub(crate) trait BlobBackend: Send + Sync + 'static {
    /// Writes one chunk of an upload in progress.
    fn put_chunk(&self, data_id: &[u8; 16], index: u32, data: &[u8]) -> Result<(), StoreError>;
    /// Records a finished blob, durably. Returns false (and records nothing) if a blob with
    /// this digest exists already.
    fn commit(&self, sha256: &[u8; 32], meta: &BlobMeta) -> Result<bool, StoreError>;
    /// Drops the chunks of an abandoned or duplicate upload.
    fn discard(&self, data_id: &[u8; 16], chunks: u32) -> Result<(), StoreError>;
    /// The record of a blob.
    fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError>;
    /// One chunk.
    fn chunk(&self, data_id: &[u8; 16], index: u32) -> Result<Option<Bytes>, StoreError>;
}

fn chunk_key(data_id: &[u8; 16], index: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(data_id);
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Blobs in the node's RocksDB.
pub(crate) struct RocksBlobBackend {
    store: Store,
    /// Serializes commits so two uploads of the same bytes cannot both record meta.
    commit_lock: Mutex<()>,
}

impl RocksBlobBackend {
    pub(crate) fn new(store: Store) -> Self {
        RocksBlobBackend {
            store,
            commit_lock: Mutex::new(()),
        }
    }
}

impl BlobBackend for RocksBlobBackend {
    fn put_chunk(&self, data_id: &[u8; 16], index: u32, data: &[u8]) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_BLOBS);
        Ok(self
            .store
            .db()
            .put_cf(cf, chunk_key(data_id, index), data)?)
    }

    fn commit(&self, sha256: &[u8; 32], meta: &BlobMeta) -> Result<bool, StoreError> {
        let cf = self.store.cf(CF_BLOB_META);
        let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.store.db().get_pinned_cf(cf, sha256)?.is_some() {
            return Ok(false);
        }
        let value = serde_json::to_vec(meta).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut opts = WriteOptions::default();
        // One WAL sync makes the chunks written before it durable too.
        opts.set_sync(true);
        self.store.db().put_cf_opt(cf, sha256, value, &opts)?;
        Ok(true)
    }

    fn discard(&self, data_id: &[u8; 16], chunks: u32) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_BLOBS);
        let from = chunk_key(data_id, 0);
        let to = chunk_key(data_id, chunks);
        Ok(self.store.db().delete_range_cf(cf, from, to)?)
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

    fn chunk(&self, data_id: &[u8; 16], index: u32) -> Result<Option<Bytes>, StoreError> {
        let cf = self.store.cf(CF_BLOBS);
        Ok(self
            .store
            .db()
            .get_pinned_cf(cf, chunk_key(data_id, index))?
            .map(|v| Bytes::copy_from_slice(&v)))
    }
}

/// Blobs in memory, for tests: can be told to fail writes.
#[derive(Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct MemBlobBackend {
    chunks: Mutex<HashMap<[u8; 20], Bytes>>,
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
    fn put_chunk(&self, data_id: &[u8; 16], index: u32, data: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        chunks.insert(chunk_key(data_id, index), Bytes::copy_from_slice(data));
        Ok(())
    }

    fn commit(&self, sha256: &[u8; 32], meta: &BlobMeta) -> Result<bool, StoreError> {
        self.check()?;
        let mut metas = self.metas.lock().unwrap_or_else(|p| p.into_inner());
        if metas.contains_key(sha256) {
            return Ok(false);
        }
        metas.insert(*sha256, meta.clone());
        Ok(true)
    }

    fn discard(&self, data_id: &[u8; 16], chunks: u32) -> Result<(), StoreError> {
        let mut map = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..chunks {
            map.remove(&chunk_key(data_id, i));
        }
        Ok(())
    }

    fn meta(&self, sha256: &[u8; 32]) -> Result<Option<BlobMeta>, StoreError> {
        Ok(self
            .metas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned())
    }

    fn chunk(&self, data_id: &[u8; 16], index: u32) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&chunk_key(data_id, index))
            .cloned())
    }
}

/// What a write computes: every digest, or only the SHA-256 (and length) of a replica.
enum Hashing {
    All(Box<MultiHasher>),
    Sha256(Sha256, u64),
}

impl Hashing {
    fn len(&self) -> u64 {
        match self {
            Hashing::All(h) => h.len(),
            Hashing::Sha256(_, len) => *len,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hashing::All(h) => h.update(data),
            Hashing::Sha256(h, len) => {
                h.update(data);
                *len += data.len() as u64;
            }
        }
    }
}

/// Streams blobs in and out of a [`BlobBackend`].
#[derive(Clone)]
pub(crate) struct BlobStore {
    backend: Arc<dyn BlobBackend>,
    cache: Arc<ChunkCache>,
    /// Decoded meta records of recently read blobs. A blob's meta never changes once
    /// written (the digest names the content), so entries need no invalidation.
    metas: Arc<std::sync::RwLock<std::collections::HashMap<[u8; 32], Arc<BlobMeta>>>>,
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
        let Some(meta) = self.backend.meta(sha)? else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let mut metas = self.metas.write().unwrap_or_else(|p| p.into_inner());
        if metas.len() >= META_CACHE_ENTRIES {
            metas.clear();
        }
        metas.insert(*sha, meta.clone());
        Ok(Some(meta))
    }

    /// Streams `body` into the store, hashing as it goes; at most `limit` bytes.
    pub(crate) async fn put(&self, body: Body, limit: u64) -> Result<BlobInfo, BlobError> {
        self.put_with(body, limit, None).await
    }

    /// Stores a copy of a blob whose size and digests another member computed: only its
    /// SHA-256 (its name) and size are checked, the other digests are taken as given.
    pub(crate) async fn put_replica(
        &self,
        body: Body,
        limit: u64,
        expected: &BlobInfo,
    ) -> Result<BlobInfo, BlobError> {
        self.put_with(body, limit, Some(expected)).await
    }

    async fn put_with(
        &self,
        mut body: Body,
        limit: u64,
        expected: Option<&BlobInfo>,
    ) -> Result<BlobInfo, BlobError> {
        let data_id: [u8; 16] = rand::random();
        let mut hasher = match expected {
            None => Hashing::All(Box::new(MultiHasher::new())),
            Some(_) => Hashing::Sha256(Sha256::new(), 0),
        };
        let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
        let mut index: u32 = 0;
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
                if hasher.len() + data.len() as u64 > limit {
                    return Err(BlobError::TooLarge { limit });
                }
                hasher.update(&data);
                while !data.is_empty() {
                    let take = (CHUNK_SIZE - buf.len()).min(data.len());
                    buf.extend_from_slice(&data.split_to(take));
                    if buf.len() == CHUNK_SIZE {
                        self.backend.put_chunk(&data_id, index, &buf)?;
                        index += 1;
                        buf.clear();
                    }
                }
            }
            if !buf.is_empty() {
                self.backend.put_chunk(&data_id, index, &buf)?;
                index += 1;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Best effort: an orphan chunk left by a failed discard is only wasted space.
            let _ = self.backend.discard(&data_id, index + 1);
            return Err(e);
        }
        let info = match (hasher, expected) {
            (Hashing::All(h), _) => BlobInfo {
                size: h.len(),
                hashes: h.finish(),
            },
            (Hashing::Sha256(h, len), Some(expected)) => {
                let sha256 = hex::encode(h.finalize());
                if sha256 != expected.hashes.sha256 || len != expected.size {
                    let _ = self.backend.discard(&data_id, index);
                    return Err(BlobError::Upload(format!(
                        "replica of {} arrived as {sha256} ({len} bytes)",
                        expected.hashes.sha256
                    )));
                }
                expected.clone()
            }
            (Hashing::Sha256(..), None) => unreachable!("set only with an expected digest"),
        };
        let sha = parse_sha256(&info.hashes.sha256)
            .ok_or_else(|| StoreError::Corrupt("hasher produced a bad digest".into()))?;
        let meta = BlobMeta {
            data_id,
            chunks: index,
            info: info.clone(),
        };
        if !self.backend.commit(&sha, &meta)? {
            self.backend.discard(&data_id, index)?;
        }
        Ok(info)
    }

    /// Whether the blob is stored here.
    pub(crate) fn has(&self, sha256: &str) -> Result<bool, StoreError> {
        match parse_sha256(sha256) {
            Some(sha) => Ok(self.meta(&sha)?.is_some()),
            None => Ok(false),
        }
    }

    /// Opens a blob for streaming: its digests and a body yielding one chunk at a time.
    pub(crate) fn open(&self, sha256: &str) -> Result<Option<(BlobInfo, Body)>, StoreError> {
        let Some(sha) = parse_sha256(sha256) else {
            return Ok(None);
        };
        let Some(meta) = self.meta(&sha)? else {
            return Ok(None);
        };
        let info = meta.info.clone();
        let backend = self.backend.clone();
        let cache = self.cache.clone();
        let stream = futures::stream::unfold(0u32, move |i| {
            let backend = backend.clone();
            let cache = cache.clone();
            let meta = meta.clone();
            async move {
                if i >= meta.chunks {
                    return None;
                }
                let key = chunk_key(&meta.data_id, i);
                let chunk = match cache.get(&key) {
                    Some(c) => Ok(Some(c)),
                    None => backend.chunk(&meta.data_id, i).inspect(|c| {
                        if let Some(c) = c {
                            cache.insert(key, c.clone());
                        }
                    }),
                };
                let item = match chunk {
                    Ok(Some(c)) => Ok(http_body::Frame::data(c)),
                    Ok(None) => {
                        Err(format!("blob {} is missing chunk {i}", meta.info.hashes.sha256).into())
                    }
                    Err(e) => Err(Box::new(e) as granary_format::body::BodyError),
                };
                Some((item, i + 1))
            }
        });
        let body = http_body_util::StreamBody::new(stream.boxed());
        Ok(Some((info, BodyExt::boxed_unsync(body))))
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
            store.put_replica(body::full(wrong), u64::MAX, &info).await,
            Err(BlobError::Upload(_))
        ));
        assert!(!store.has(&info.hashes.sha256).unwrap());
        assert!(backend.metas.lock().unwrap().is_empty());
        // A wrong size with the right bytes is refused too.
        let mut short = info.clone();
        short.size -= 1;
        assert!(
            store
                .put_replica(body::full(data.clone()), u64::MAX, &short)
                .await
                .is_err()
        );
        // The right bytes: stored under the sender's digests, readable.
        let stored = store
            .put_replica(body::full(data.clone()), u64::MAX, &info)
            .await
            .unwrap();
        assert_eq!(stored, info);
        assert_eq!(
            &store.read_all(&info.hashes.sha256).await.unwrap()[..],
            &data[..]
        );
    }

    #[tokio::test]
    async fn rocks_roundtrip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        roundtrip(BlobStore::new(
            Arc::new(RocksBlobBackend::new(store)),
            1 << 20,
        ))
        .await;
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

    #[tokio::test]
    async fn unknown_and_malformed_digests_are_absent() {
        let store = BlobStore::new(Arc::new(MemBlobBackend::default()), 1 << 20);
        assert!(store.open(&"0".repeat(64)).unwrap().is_none());
        assert!(store.open("zz").unwrap().is_none());
    }
}
