//! Recently read blob chunks, kept as `Bytes` so that serving a popular artifact copies
//! nothing in user space: the response body shares the cached buffer.
//!
//! Chunks are immutable (content-addressed blobs, chunks under a data id that is never
//! rewritten), so the cache needs no invalidation. Eviction is first-in first-out per
//! shard, bounded by bytes.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Mutex;

use bytes::Bytes;

const SHARDS: usize = 16;

/// A chunk's key: its data id and index.
pub(crate) type ChunkKey = [u8; 20];

#[derive(Default)]
struct Shard {
    map: HashMap<ChunkKey, Bytes>,
    order: VecDeque<ChunkKey>,
    bytes: usize,
}

/// A byte-bounded, sharded cache of chunks.
pub(crate) struct ChunkCache {
    shards: Vec<Mutex<Shard>>,
    shard_capacity: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl ChunkCache {
    /// A cache of at most `capacity` bytes (0 disables it).
    pub(crate) fn new(capacity: usize) -> Self {
        ChunkCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity / SHARDS,
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &ChunkKey) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The chunk, if cached.
    pub(crate) fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        shard.map.get(key).cloned()
    }

    /// Caches a chunk, evicting the oldest entries past the bound.
    pub(crate) fn insert(&self, key: ChunkKey, chunk: Bytes) {
        if chunk.len() > self.shard_capacity {
            return;
        }
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        if shard.map.contains_key(&key) {
            return;
        }
        while shard.bytes + chunk.len() > self.shard_capacity {
            let Some(old) = shard.order.pop_front() else {
                break;
            };
            if let Some(b) = shard.map.remove(&old) {
                shard.bytes -= b.len();
            }
        }
        shard.bytes += chunk.len();
        shard.order.push_back(key);
        shard.map.insert(key, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> ChunkKey {
        let mut k = [0u8; 20];
        k[0] = i;
        k
    }

    #[test]
    fn bounded_by_bytes_and_evicts_oldest() {
        let cache = ChunkCache::new(SHARDS * 100);
        for i in 0..50 {
            cache.insert(key(i), Bytes::from(vec![i; 40]));
        }
        let total: usize = cache.shards.iter().map(|s| s.lock().unwrap().bytes).sum();
        assert!(total <= SHARDS * 100);
        // The newest entries are still there.
        assert_eq!(cache.get(&key(49)).unwrap()[0], 49);
        // Too large for a shard: not cached.
        cache.insert(key(200), Bytes::from(vec![0; 1000]));
        assert!(cache.get(&key(200)).is_none());
        // Disabled.
        let off = ChunkCache::new(0);
        off.insert(key(1), Bytes::from_static(b"x"));
        assert!(off.get(&key(1)).is_none());
    }
}
