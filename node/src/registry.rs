//! The node's side of the `Registry` port: what a format sees of one repository.
//!
//! Reads go to the local applied state; blobs stream through the blob store in the
//! request's own task; writes go to the repository's actor, which proposes them through
//! Raft. Conflicts decided in apply come back as `RegistryError`s.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use granary_format::model::{
    BlobInfo, NewVersion, OriginType, PackageChange, PackageKey, PackageRecord, VersionOrigin,
    VersionRecord, VersionStatus,
};
use granary_format::{
    AssetBody, Body, Caller, Registry, RegistryError, RepositoryRef, UpstreamFormat,
};

use crate::cluster::blobs::StoreFailure;
use crate::node::Node;
use crate::raft::ProposeError;
use crate::state::command::{ApplyError, Command, CommandResult, PackageTarget};
use crate::store::StoreError;
use crate::store::blob::BlobError;
use crate::upstream::{Ask, Resolution};

/// One request's view of one repository in one format.
pub(crate) struct NodeRegistry {
    pub(crate) node: Arc<Node>,
    pub(crate) format: &'static str,
    pub(crate) repo: RepositoryRef,
    pub(crate) caller: Caller,
    /// How the format reads public registries (external connections), if it can.
    pub(crate) reader: Option<Arc<dyn UpstreamFormat>>,
    /// The chain's answer for the package this request asked about: one walk per
    /// request, and every read of the request sees the same one.
    pub(crate) resolved: tokio::sync::Mutex<Option<(PackageKey, Arc<Resolution>)>>,
    /// For a write, the ReadIndex round started when the request arrived: reads of the
    /// local state wait for it (see [`CatchUp`]).
    catch_up: Option<CatchUp>,
}

/// A ReadIndex round running beside a write request. The write is decided by the leader
/// in apply, against its latest state, so the request need not wait for the round before
/// it starts receiving and replicating the upload; only the format's own reads of the
/// local state (its early checks: does the version exist, which tags) wait, so that they
/// see every write acknowledged before the request arrived, as any read does.
pub(crate) type CatchUp = Shared<BoxFuture<'static, Result<(), String>>>;

/// Starts the ReadIndex round for a write request.
pub(crate) fn catch_up(node: &Arc<Node>) -> CatchUp {
    let cluster = node.cluster.clone();
    let round = tokio::spawn(async move { cluster.linearize().await.map_err(|e| e.to_string()) });
    async move { round.await.unwrap_or_else(|e| Err(e.to_string())) }
        .boxed()
        .shared()
}

fn internal(e: StoreError) -> RegistryError {
    RegistryError::Internal(e.to_string())
}

impl NodeRegistry {
    /// A view for one request.
    pub(crate) fn new(
        node: Arc<Node>,
        format: &'static str,
        repo: RepositoryRef,
        caller: Caller,
        reader: Option<Arc<dyn UpstreamFormat>>,
    ) -> Self {
        NodeRegistry {
            node,
            format,
            repo,
            caller,
            reader,
            resolved: tokio::sync::Mutex::new(None),
            catch_up: None,
        }
    }

    /// Makes this view's local reads wait for `round` first.
    pub(crate) fn after(mut self, round: Option<CatchUp>) -> Self {
        self.catch_up = round;
        self
    }

    async fn caught_up(&self) -> Result<(), RegistryError> {
        match &self.catch_up {
            Some(round) => round.clone().await.map_err(RegistryError::Unavailable),
            None => Ok(()),
        }
    }

    fn ask<'a>(&'a self, key: &'a PackageKey) -> Ask<'a> {
        Ask {
            domain: &self.repo.domain,
            repository: &self.repo.repository,
            format: self.format,
            reader: self.reader.as_ref(),
            key,
        }
    }

    async fn resolution(&self, key: &PackageKey) -> Result<Arc<Resolution>, RegistryError> {
        self.caught_up().await?;
        let mut slot = self.resolved.lock().await;
        if let Some((k, r)) = &*slot
            && k == key
        {
            return Ok(r.clone());
        }
        let r = Arc::new(
            self.node
                .upstreams
                .resolve(&self.node, &self.ask(key))
                .await?,
        );
        *slot = Some((key.clone(), r.clone()));
        Ok(r)
    }

    fn target(&self, package: &PackageKey) -> PackageTarget {
        PackageTarget {
            domain: self.repo.domain.clone(),
            repository: self.repo.repository.clone(),
            format: self.format.to_owned(),
            package: package.clone(),
        }
    }

    fn cache_key(&self, key: &PackageKey, variant: &str) -> String {
        format!(
            "{}\0{}\0{}\0{}\0{}\0{variant}",
            self.repo.domain,
            self.repo.repository,
            self.format,
            key.namespace.as_deref().unwrap_or(""),
            key.name
        )
    }

    async fn write(&self, cmd: Command) -> Result<(), RegistryError> {
        let result = self
            .node
            .actors
            .propose(self.format, &self.repo.domain, &self.repo.repository, cmd)
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        match result {
            Ok(CommandResult::Failed(e)) => Err(match e {
                ApplyError::VersionExists { version } => RegistryError::VersionExists { version },
                ApplyError::NotFound { .. } => RegistryError::NotFound(e.to_string()),
                ApplyError::Conflict { message, .. } => RegistryError::Conflict(message),
                ApplyError::Invalid(m) => RegistryError::Invalid(m),
            }),
            Ok(_) => Ok(()),
            Err(ProposeError::NoLeader) => Err(RegistryError::Unavailable(
                ProposeError::NoLeader.to_string(),
            )),
            Err(ProposeError::Fatal(m)) => Err(RegistryError::Internal(m)),
        }
    }
}

#[async_trait]
impl Registry for NodeRegistry {
    fn repository(&self) -> &RepositoryRef {
        &self.repo
    }

    fn caller(&self) -> &Caller {
        &self.caller
    }

    async fn package(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError> {
        self.caught_up().await?;
        self.package_now(key).await
    }

    async fn package_now(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError> {
        self.node
            .state
            .package(&self.repo.domain, &self.repo.repository, self.format, key)
            .map_err(internal)
    }

    async fn versions(&self, key: &PackageKey) -> Result<Vec<VersionRecord>, RegistryError> {
        self.caught_up().await?;
        self.node
            .state
            .versions(&self.repo.domain, &self.repo.repository, self.format, key)
            .map_err(internal)
    }

    async fn version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        self.caught_up().await?;
        self.version_now(key, version).await
    }

    async fn version_now(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        self.node
            .state
            .version(
                &self.repo.domain,
                &self.repo.repository,
                self.format,
                key,
                version,
            )
            .map_err(internal)
    }

    async fn store_blob(&self, body: Body) -> Result<BlobInfo, RegistryError> {
        let blob_error = |e| match e {
            BlobError::TooLarge { limit } => RegistryError::TooLarge { limit },
            BlobError::Upload(m) => RegistryError::Invalid(m),
            BlobError::Store(s) => internal(s),
        };
        let written = self
            .node
            .blobs
            .write_new(body, self.node.config.max_body_bytes)
            .await
            .map_err(blob_error)?;
        // The metadata that will refer to these bytes is proposed only once a majority of
        // voters hold them.
        self.node
            .replicator
            .commit_and_replicate(written)
            .await
            .map_err(|e| match e {
                StoreFailure::Local(e) => blob_error(e),
                StoreFailure::Replicate(e) => RegistryError::Unavailable(e.to_string()),
            })
    }

    async fn open_blob(&self, sha256: &str) -> Result<Option<(u64, Body)>, RegistryError> {
        crate::upstream::open_blob(&self.node, sha256).await
    }

    async fn resolve_package(
        &self,
        key: &PackageKey,
    ) -> Result<Option<PackageRecord>, RegistryError> {
        Ok(self.resolution(key).await?.package.clone())
    }

    async fn resolve_versions(
        &self,
        key: &PackageKey,
    ) -> Result<Vec<VersionRecord>, RegistryError> {
        let res = self.resolution(key).await?;
        self.node
            .upstreams
            .versions(&self.node, &self.ask(key), &res)
    }

    async fn resolve_version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        let res = self.resolution(key).await?;
        self.node
            .upstreams
            .version(&self.node, &self.ask(key), &res, version)
    }

    async fn fetch_asset(
        &self,
        key: &PackageKey,
        version: &str,
        asset: &str,
    ) -> Result<Option<AssetBody>, RegistryError> {
        let res = self.resolution(key).await?;
        self.node
            .upstreams
            .fetch_asset(&self.node, &self.ask(key), &res, version, asset)
            .await
    }

    async fn publish(&self, v: NewVersion) -> Result<(), RegistryError> {
        // CodeArtifact refuses to publish a version its upstreams already offer, unless
        // the package blocks upstream versions here.
        self.caught_up().await?;
        if let Some(source) = self
            .node
            .upstreams
            .reachable_upstream(&self.node, &self.ask(&v.package), &v.version)
            .await?
        {
            return Err(RegistryError::Conflict(format!(
                "version {} is available from upstream {source}; it cannot be published here",
                v.version
            )));
        }
        let now = Node::now_ms();
        let target = self.target(&v.package);
        let record = VersionRecord {
            version: v.version,
            revision: String::new(),
            status: VersionStatus::Published,
            published_ms: now,
            modified_ms: now,
            origin: VersionOrigin {
                origin_type: OriginType::Internal,
                repository: Some(self.repo.repository.clone()),
                external_connection: None,
            },
            summary: v.summary,
            metadata: v.metadata,
            assets: v.assets,
            remote: Vec::new(),
        };
        self.write(Command::PublishVersion {
            target,
            version: Box::new(record),
            tags: v.tags,
        })
        .await
    }

    async fn change(&self, key: &PackageKey, change: PackageChange) -> Result<(), RegistryError> {
        self.write(Command::ChangePackage {
            target: self.target(key),
            change,
            now_ms: Node::now_ms(),
        })
        .await
    }

    fn cached_document(
        &self,
        key: &PackageKey,
        variant: &'static str,
        stamp: u64,
    ) -> Option<Bytes> {
        self.node.docs.get(&self.cache_key(key, variant), stamp)
    }

    fn cache_document(&self, key: &PackageKey, variant: &'static str, stamp: u64, doc: Bytes) {
        self.node.docs.put(self.cache_key(key, variant), stamp, doc);
    }
}
