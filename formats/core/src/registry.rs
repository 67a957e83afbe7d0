//! The node's one port, as seen by a format.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::body::Body;
use crate::error::RegistryError;
use crate::model::{BlobInfo, NewVersion, PackageChange, PackageKey, PackageRecord, VersionRecord};

/// An asset's bytes on their way to a client.
pub struct AssetBody {
    /// Size in bytes, when known before the bytes arrive (an upstream that streams
    /// without a length leaves it unknown).
    pub size: Option<u64>,
    /// The bytes.
    pub body: Body,
}

/// The repository a request addresses.
#[derive(Debug, Clone)]
pub struct RepositoryRef {
    /// Domain name.
    pub domain: String,
    /// Repository name.
    pub repository: String,
    /// The format's endpoint for this repository, with a trailing slash:
    /// `{public_url}/{format}/{domain}/{repository}/`. Absolute URLs in documents start here.
    pub base_url: String,
    /// When the repository was created (Unix milliseconds). Stamps count changes within
    /// one repository's life only: a repository created again, or another cluster's at
    /// the same URL, starts them over, so validators (ETags) must name this too.
    pub created_ms: i64,
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// A display name for the principal (npm `whoami`).
    pub username: String,
}

/// Metadata, blobs and document cache of one repository and format, as the node offers them.
///
/// Reads see every change acknowledged before the request began. Writes are decided
/// atomically (conflicts such as an existing version come back as [`RegistryError`]).
#[async_trait]
pub trait Registry: Send + Sync {
    /// The repository this request addresses.
    fn repository(&self) -> &RepositoryRef;

    /// The authenticated caller.
    fn caller(&self) -> &Caller;

    /// The package record, if the package has any version (or tag) here.
    async fn package(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError>;

    /// Every version of a package, in no particular order.
    async fn versions(&self, key: &PackageKey) -> Result<Vec<VersionRecord>, RegistryError>;

    /// One version.
    async fn version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError>;

    /// The package record as this node holds it at this moment, without waiting for the
    /// request to catch up with the cluster: it may lack a change acknowledged elsewhere
    /// in the last moments. Only for early checks that are decided again with
    /// [`Registry::package`] before anything is written.
    async fn package_now(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError> {
        self.package(key).await
    }

    /// One version as this node holds it at this moment; see [`Registry::package_now`].
    async fn version_now(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        self.version(key, version).await
    }

    /// Streams a body into the blob store (hashing as it goes) and returns what was stored.
    /// The blob is durable when this returns, but referenced only once a publish names it.
    async fn store_blob(&self, body: Body) -> Result<BlobInfo, RegistryError>;

    /// Opens a blob for streaming by SHA-256: its size and a body.
    async fn open_blob(&self, sha256: &str) -> Result<Option<(u64, Body)>, RegistryError>;

    /// Publishes a new version; fails with [`RegistryError::VersionExists`] if the version
    /// exists or existed.
    async fn publish(&self, version: NewVersion) -> Result<(), RegistryError>;

    /// Applies a change to an existing package.
    async fn change(&self, key: &PackageKey, change: PackageChange) -> Result<(), RegistryError>;

    /// The package as the repository's upstream chain offers it (the repository, its
    /// upstreams depth-first, their external connections), CodeArtifact's rules applied:
    /// tags merged with upstreams winning, `stamp` changing whenever any part changes.
    /// Client metadata documents are rendered from this; writes use [`Registry::package`].
    async fn resolve_package(
        &self,
        key: &PackageKey,
    ) -> Result<Option<PackageRecord>, RegistryError> {
        self.package(key).await
    }

    /// Every version the chain offers, the nearest repository's record winning.
    /// Versions seen only at an external registry have their files in `remote`.
    async fn resolve_versions(
        &self,
        key: &PackageKey,
    ) -> Result<Vec<VersionRecord>, RegistryError> {
        self.versions(key).await
    }

    /// One version as the chain offers it.
    async fn resolve_version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        self.version(key, version).await
    }

    /// Opens one file of a version the chain offers, fetching it from upstream if
    /// needed (and then keeping the version in this repository, as CodeArtifact does).
    async fn fetch_asset(
        &self,
        key: &PackageKey,
        version: &str,
        asset: &str,
    ) -> Result<Option<AssetBody>, RegistryError> {
        let Some(record) = self.version(key, version).await? else {
            return Ok(None);
        };
        let Some(a) = record.asset(asset) else {
            return Ok(None);
        };
        Ok(self
            .open_blob(&a.hashes.sha256)
            .await?
            .map(|(size, body)| AssetBody {
                size: Some(size),
                body,
            }))
    }

    /// A cached rendered document of a package (`variant` names the rendering), valid only
    /// for the package record whose `stamp` is given.
    fn cached_document(&self, key: &PackageKey, variant: &'static str, stamp: u64)
    -> Option<Bytes>;

    /// Caches a rendered document for the package record with this `stamp`.
    fn cache_document(&self, key: &PackageKey, variant: &'static str, stamp: u64, doc: Bytes);
}
