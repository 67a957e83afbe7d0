//! Decoded records of the hottest reads (package versions, repositories, token-signing
//! keys, verified tokens), kept in
//! memory and invalidated by apply.
//!
//! Invalidation is by generation, never by removal, so a reader racing an apply can not
//! leave a stale entry behind: apply writes its batch and *then* bumps the generation of
//! what it touched; a reader takes the generation *before* reading RocksDB and files its
//! result under it. A reader that read before the write files it under the old
//! generation, which no later lookup accepts.
//!
//! Package generations live in a fixed table of counters indexed by a hash of the package
//! (collisions only cost a miss), so the table never grows; commands that are not about
//! one package (domains, repositories, keys, snapshots) bump a global epoch instead.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use granary_format::model::VersionRecord;

use super::command::Command;
use super::model::RepositoryRecord;
use crate::auth::TokenClaims;

const SLOTS: usize = 4096;
const SHARDS: usize = 16;
/// Versions per shard before the shard is emptied (a crude bound on memory).
const SHARD_CAPACITY: usize = 2048;

/// A generation stamp: the global epoch and the package's slot counter.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Generation(u64, u64);

type Shard = RwLock<HashMap<Vec<u8>, (Generation, Arc<VersionRecord>)>>;

/// A map whose entries hold only for the epoch they were filed under.
pub(crate) struct EpochMap<K, V> {
    map: RwLock<HashMap<K, (u64, V)>>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> EpochMap<K, V> {
    fn new(capacity: usize) -> Self {
        EpochMap {
            map: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// The value filed under `key` for exactly `epoch`.
    pub(crate) fn get<Q>(&self, key: &Q, epoch: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((e, v)) if *e == epoch => Some(v.clone()),
            _ => None,
        }
    }

    /// Files `value` under `epoch` (taken before the value was read).
    pub(crate) fn put(&self, key: K, epoch: u64, value: V) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.clear();
        }
        map.insert(key, (epoch, value));
    }
}

/// The shared read cache of one node's state.
pub(crate) struct ReadCache {
    epoch: AtomicU64,
    slots: Box<[AtomicU64]>,
    versions: Box<[Shard]>,
    /// Token-signing key id → secret bytes.
    pub(crate) token_keys: EpochMap<String, Arc<[u8]>>,
    /// (domain, repository) → whether it exists, as a state key.
    pub(crate) repositories: EpochMap<Vec<u8>, Option<Arc<RepositoryRecord>>>,
    /// Presented token → its verified claims (expiry still checked on every use).
    pub(crate) tokens: EpochMap<String, Arc<TokenClaims>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for ReadCache {
    fn default() -> Self {
        ReadCache {
            epoch: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            versions: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            token_keys: EpochMap::new(1024),
            repositories: EpochMap::new(16 * 1024),
            tokens: EpochMap::new(16 * 1024),
            hasher: Default::default(),
        }
    }
}

impl ReadCache {
    /// The slot of a package, from its state key (`keys::package`).
    fn slot(&self, package_prefix: &[u8]) -> &AtomicU64 {
        &self.slots[(self.hasher.hash_one(package_prefix) as usize) % SLOTS]
    }

    /// The generation a reader of this package must file its result under; take it
    /// before reading.
    pub(crate) fn generation(&self, package_prefix: &[u8]) -> Generation {
        // Epoch first: an apply bumps the slot, then (for global changes) the epoch; a
        // reader seeing either old value files under a generation no one will accept.
        let epoch = self.epoch.load(Ordering::Acquire);
        Generation(epoch, self.slot(package_prefix).load(Ordering::Acquire))
    }

    /// The version cached under `key` for exactly this generation.
    pub(crate) fn version(&self, key: &[u8], generation: Generation) -> Option<Arc<VersionRecord>> {
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        match shard.get(key) {
            Some((g, v)) if *g == generation => Some(v.clone()),
            _ => None,
        }
    }

    /// Files a version read under `generation`.
    pub(crate) fn put_version(&self, key: Vec<u8>, generation: Generation, v: Arc<VersionRecord>) {
        let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= SHARD_CAPACITY && !shard.contains_key(&key) {
            shard.clear();
        }
        shard.insert(key, (generation, v));
    }

    fn shard(&self, key: &[u8]) -> &Shard {
        &self.versions[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The current epoch: take it before reading what is filed under it.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Called by apply after `cmd`'s batch is written.
    pub(crate) fn applied(&self, cmd: &Command) {
        match cmd {
            Command::PublishVersion { target, .. }
            | Command::ChangePackage { target, .. }
            | Command::PutPackageOrigin { target, .. } => self.bump(target),
            Command::RetainVersion { targets, .. } => targets.iter().for_each(|t| self.bump(t)),
            Command::Batch(cmds) => cmds.iter().for_each(|c| self.applied(c)),
            _ => self.invalidate_all(),
        }
    }

    fn bump(&self, target: &crate::state::command::PackageTarget) {
        let prefix = super::keys::package(
            &target.domain,
            &target.repository,
            &target.format,
            &target.package,
        );
        self.slot(&prefix).fetch_add(1, Ordering::AcqRel);
    }

    /// Everything cached is stale (a snapshot was installed, or a command touched more
    /// than one package).
    pub(crate) fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::PackageTarget;
    use granary_format::model::{PackageChange, PackageKey};

    fn version(v: &str) -> Arc<VersionRecord> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "version": v, "revision": "r", "status": "Published", "published_ms": 0,
                "modified_ms": 0, "metadata": {}, "assets": []
            }))
            .unwrap(),
        )
    }

    fn change(pkg: &str) -> Command {
        Command::ChangePackage {
            target: PackageTarget {
                domain: "d".into(),
                repository: "r".into(),
                format: "npm".into(),
                package: PackageKey::new(None, pkg),
            },
            change: PackageChange::RemoveTag { tag: "x".into() },
            now_ms: 0,
        }
    }

    #[test]
    fn a_read_filed_before_an_apply_is_never_served_after_it() {
        let c = ReadCache::default();
        let prefix = crate::state::keys::package("d", "r", "npm", &PackageKey::new(None, "a"));
        let g = c.generation(&prefix);
        // The apply lands between the reader's generation and its put.
        c.applied(&change("a"));
        c.put_version(b"k".to_vec(), g, version("1.0.0"));
        assert!(c.version(b"k", c.generation(&prefix)).is_none());
        let g2 = c.generation(&prefix);
        c.put_version(b"k".to_vec(), g2, version("1.0.0"));
        assert!(c.version(b"k", c.generation(&prefix)).is_some());
        // Another package's change leaves it (unless the two share a slot).
        let other = crate::state::keys::package("d", "r", "npm", &PackageKey::new(None, "b"));
        if !std::ptr::eq(c.slot(&other), c.slot(&prefix)) {
            c.applied(&change("b"));
            assert!(c.version(b"k", c.generation(&prefix)).is_some());
        }
        // A global change drops it.
        c.invalidate_all();
        assert!(c.version(b"k", c.generation(&prefix)).is_none());
    }

    #[test]
    fn token_keys_follow_the_epoch() {
        let c = ReadCache::default();
        let e = c.epoch();
        c.token_keys.put("k1".into(), e, Arc::from(&b"secret"[..]));
        assert_eq!(
            c.token_keys.get("k1", c.epoch()).as_deref(),
            Some(&b"secret"[..])
        );
        c.invalidate_all();
        assert!(c.token_keys.get("k1", c.epoch()).is_none());
    }
}
