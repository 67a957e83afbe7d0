//! The cache of rendered index documents (npm packuments, …), shared by every request.
//!
//! Entries are keyed by package and rendering, and stamped with the package record's
//! `stamp` (the log index of its last change): a reader presents the stamp it just read,
//! so a document rendered before a change is never served after it, with no invalidation
//! race. Reads never queue behind an actor's mailbox.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::RwLock;

use bytes::Bytes;

const SHARDS: usize = 16;
/// Entries per shard before the shard is emptied (a crude bound on memory).
const SHARD_CAPACITY: usize = 4096;

/// Sharded map from document key to `(stamp, bytes)`.
pub(crate) struct DocCache {
    shards: Vec<RwLock<HashMap<String, (u64, Bytes)>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl DocCache {
    pub(crate) fn new() -> Self {
        DocCache {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &str) -> &RwLock<HashMap<String, (u64, Bytes)>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The document, if cached for exactly this stamp.
    pub(crate) fn get(&self, key: &str, stamp: u64) -> Option<Bytes> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        match shard.get(key) {
            Some((s, doc)) if *s == stamp => Some(doc.clone()),
            _ => None,
        }
    }

    /// Caches a document for a stamp; an older stamp never replaces a newer one.
    pub(crate) fn put(&self, key: String, stamp: u64, doc: Bytes) {
        let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= SHARD_CAPACITY && !shard.contains_key(&key) {
            shard.clear();
        }
        match shard.get(&key) {
            Some((s, _)) if *s > stamp => {}
            _ => {
                shard.insert(key, (stamp, doc));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_stamps_miss_and_never_overwrite() {
        let c = DocCache::new();
        c.put("k".into(), 5, Bytes::from_static(b"five"));
        assert_eq!(c.get("k", 5).as_deref(), Some(&b"five"[..]));
        assert!(c.get("k", 6).is_none());
        c.put("k".into(), 4, Bytes::from_static(b"four"));
        assert_eq!(c.get("k", 5).as_deref(), Some(&b"five"[..]));
        c.put("k".into(), 6, Bytes::from_static(b"six"));
        assert!(c.get("k", 5).is_none());
    }
}
