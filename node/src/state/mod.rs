//! The replicated state: what every node holds after applying the Raft log.
//!
//! `apply` (deterministic, one WriteBatch per entry) is the only writer; [`StateView`] is
//! the read side used by the API, the formats' registry and authentication. Neither calls
//! actors; after apply, the Raft state machine publishes a change notification.

pub(crate) mod apply;
pub(crate) mod cache;
pub mod command;
pub(crate) mod keys;
pub mod model;

use std::sync::Arc;

use granary_format::model::{PackageKey, PackageRecord, VersionRecord};
use serde::de::DeserializeOwned;

use crate::store::{CF_STATE, Store, StoreError};
use model::{DomainRecord, Principal, RepositoryRecord, TokenKey};

/// Read access to the applied state.
#[derive(Clone)]
pub struct StateView {
    store: Store,
    cache: Option<Arc<cache::ReadCache>>,
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// What scans over every version need of a [`VersionRecord`]: its assets' sizes and
/// addresses. The manifest is skipped, not decoded.
#[derive(serde::Deserialize)]
struct StoredAssets {
    assets: Vec<StoredAsset>,
}

#[derive(serde::Deserialize)]
struct StoredAsset {
    size: u64,
    hashes: StoredSha256,
}

#[derive(serde::Deserialize)]
struct StoredSha256 {
    sha256: String,
}

impl StateView {
    /// A view over the store's state column family.
    pub fn new(store: Store) -> Self {
        StateView { store, cache: None }
    }

    /// A view that keeps the hottest records decoded in `cache`, which the state machine
    /// invalidates as it applies.
    pub(crate) fn cached(store: Store, cache: Arc<cache::ReadCache>) -> Self {
        StateView {
            store,
            cache: Some(cache),
        }
    }

    fn get<T: DeserializeOwned>(&self, what: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
        let cf = self.store.cf(CF_STATE);
        match self.store.db().get_pinned_cf(cf, key)? {
            Some(v) => decode(what, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every (key, value) under a prefix, in key order, decoded.
    fn scan<T: DeserializeOwned>(
        &self,
        what: &str,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        self.each(what, prefix, |k, v| out.push((k.to_vec(), v)))?;
        Ok(out)
    }

    /// Calls `f` with every (key, value) under a prefix, in key order, decoded one at a
    /// time, from one RocksDB snapshot.
    fn each<T: DeserializeOwned>(
        &self,
        what: &str,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], T),
    ) -> Result<(), StoreError> {
        let cf = self.store.cf(CF_STATE);
        let iter = self.store.db().iterator_cf(
            cf,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            f(&k, decode(what, &v)?);
        }
        Ok(())
    }

    /// Whether any key starts with `prefix`.
    fn any(&self, prefix: &[u8]) -> Result<bool, StoreError> {
        let cf = self.store.cf(CF_STATE);
        let mut iter = self.store.db().iterator_cf(
            cf,
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        match iter.next() {
            Some(item) => Ok(item?.0.starts_with(prefix)),
            None => Ok(false),
        }
    }

    /// A domain.
    pub fn domain(&self, name: &str) -> Result<Option<DomainRecord>, StoreError> {
        self.get("domain", &keys::domain(name))
    }

    /// Every domain, by name.
    pub fn domains(&self) -> Result<Vec<DomainRecord>, StoreError> {
        Ok(self
            .scan("domain", &[keys::DOMAIN])?
            .into_iter()
            .map(|(_, d)| d)
            .collect())
    }

    /// A repository.
    pub fn repository(
        &self,
        domain: &str,
        name: &str,
    ) -> Result<Option<RepositoryRecord>, StoreError> {
        self.get("repository", &keys::repository(domain, name))
    }

    /// A repository, shared from the cache when warm (the package endpoints' hot path).
    pub(crate) fn repository_cached(
        &self,
        domain: &str,
        name: &str,
    ) -> Result<Option<Arc<RepositoryRecord>>, StoreError> {
        let key = keys::repository(domain, name);
        let Some(cache) = &self.cache else {
            return Ok(self
                .get::<RepositoryRecord>("repository", &key)?
                .map(Arc::new));
        };
        let epoch = cache.epoch();
        if let Some(found) = cache.repositories.get(&key, epoch) {
            return Ok(found);
        }
        let found = self
            .get::<RepositoryRecord>("repository", &key)?
            .map(Arc::new);
        cache.repositories.put(key, epoch, found.clone());
        Ok(found)
    }

    /// The read cache, if this view has one.
    pub(crate) fn cache(&self) -> Option<&cache::ReadCache> {
        self.cache.as_deref()
    }

    /// Every repository of a domain (or of all domains), by domain then name.
    pub fn repositories(&self, domain: Option<&str>) -> Result<Vec<RepositoryRecord>, StoreError> {
        let prefix = match domain {
            Some(d) => keys::key(keys::REPOSITORY, &[d]),
            None => vec![keys::REPOSITORY],
        };
        Ok(self
            .scan("repository", &prefix)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// Whether a domain has any repository.
    pub fn has_repositories(&self, domain: &str) -> Result<bool, StoreError> {
        self.any(&keys::key(keys::REPOSITORY, &[domain]))
    }

    /// A package in a repository and format.
    pub fn package(
        &self,
        domain: &str,
        repo: &str,
        format: &str,
        pkg: &PackageKey,
    ) -> Result<Option<PackageRecord>, StoreError> {
        self.get("package", &keys::package(domain, repo, format, pkg))
    }

    /// Packages of a repository, optionally of one format, by format, namespace, name.
    pub fn packages(
        &self,
        domain: &str,
        repo: &str,
        format: Option<&str>,
    ) -> Result<Vec<(String, PackageRecord)>, StoreError> {
        let prefix = match format {
            Some(f) => keys::key(keys::PACKAGE, &[domain, repo, f]),
            None => keys::key(keys::PACKAGE, &[domain, repo]),
        };
        Ok(self
            .scan::<PackageRecord>("package", &prefix)?
            .into_iter()
            .map(|(k, p)| {
                let format = keys::parts(&k)
                    .get(2)
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                (format, p)
            })
            .collect())
    }

    /// Every version of a package.
    pub fn versions(
        &self,
        domain: &str,
        repo: &str,
        format: &str,
        pkg: &PackageKey,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        let prefix = keys::key(
            keys::VERSION,
            &[
                domain,
                repo,
                format,
                pkg.namespace.as_deref().unwrap_or(""),
                &pkg.name,
            ],
        );
        Ok(self
            .scan("version", &prefix)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// One version.
    pub fn version(
        &self,
        domain: &str,
        repo: &str,
        format: &str,
        pkg: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, StoreError> {
        let key = keys::version(domain, repo, format, pkg, version);
        let Some(cache) = &self.cache else {
            return Ok(self.get::<VersionRecord>("version", &key)?.map(Arc::new));
        };
        let generation = cache.generation(&keys::package(domain, repo, format, pkg));
        if let Some(v) = cache.version(&key, generation) {
            return Ok(Some(v));
        }
        let found = self.get::<VersionRecord>("version", &key)?.map(Arc::new);
        if let Some(v) = &found {
            cache.put_version(key, generation, v.clone());
        }
        Ok(found)
    }

    /// The SHA-256 of every asset any version refers to, sorted, without repeats: what
    /// anti-entropy fetches, the scrub checks and the blob collector keeps.
    pub fn referenced_blobs(&self) -> Result<Vec<String>, StoreError> {
        // One version decoded at a time: the state may hold far more versions than fit
        // in memory at once, decoded.
        let mut out = Vec::new();
        self.each("version", &[keys::VERSION], |_, v: StoredAssets| {
            out.extend(v.assets.into_iter().map(|a| a.hashes.sha256));
        })?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The bytes of the assets stored for a domain's package versions, each blob
    /// counted once however many versions and repositories share it (CodeArtifact keeps
    /// an asset once per domain): DescribeDomain's `assetSizeBytes`. Files an external
    /// connection offers and no one has fetched yet are not stored and not counted.
    pub fn domain_asset_bytes(&self, domain: &str) -> Result<u64, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        let prefix = keys::key(keys::VERSION, &[domain]);
        self.each("version", &prefix, |_, v: StoredAssets| {
            for a in v.assets {
                if seen.insert(a.hashes.sha256) {
                    total = total.saturating_add(a.size);
                }
            }
        })?;
        Ok(total)
    }

    /// The principal holding an access key.
    pub fn principal(&self, access_key_id: &str) -> Result<Option<Principal>, StoreError> {
        self.get("principal", &keys::access_key(access_key_id))
    }

    /// Whether any principal exists.
    pub fn has_principals(&self) -> Result<bool, StoreError> {
        self.any(&[keys::ACCESS_KEY])
    }

    /// A token-signing key.
    pub fn token_key(&self, kid: &str) -> Result<Option<TokenKey>, StoreError> {
        self.get("token key", &keys::token_key(kid))
    }

    /// The secret bytes of a token-signing key (hex-decoded), from the cache when warm.
    pub(crate) fn token_secret(&self, kid: &str) -> Result<Option<Arc<[u8]>>, StoreError> {
        let epoch = self.cache.as_ref().map(|c| c.epoch());
        if let (Some(cache), Some(epoch)) = (&self.cache, epoch)
            && let Some(k) = cache.token_keys.get(kid, epoch)
        {
            return Ok(Some(k));
        }
        let Some(key) = self.token_key(kid)? else {
            return Ok(None);
        };
        let secret: Arc<[u8]> = hex::decode(&key.key_hex)
            .map_err(|e| StoreError::Corrupt(format!("token key {kid}: {e}")))?
            .into();
        if let (Some(cache), Some(epoch)) = (&self.cache, epoch) {
            cache.token_keys.put(kid.to_owned(), epoch, secret.clone());
        }
        Ok(Some(secret))
    }

    /// Every token-signing key, by id.
    pub fn token_keys(&self) -> Result<Vec<TokenKey>, StoreError> {
        Ok(self
            .scan("token key", &[keys::TOKEN_KEY])?
            .into_iter()
            .map(|(_, k)| k)
            .collect())
    }
}
