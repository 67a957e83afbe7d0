//! The node's side of the `Registry` port: what a format sees of one repository.
//!
//! Reads go to the local applied state; blobs stream through the blob store in the
//! request's own task; writes go to the repository's actor, which proposes them through
//! Raft. Conflicts decided in apply come back as `RegistryError`s.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use granary_format::model::{
    BlobInfo, NewVersion, OriginType, PackageChange, PackageKey, PackageRecord, VersionOrigin,
    VersionRecord, VersionStatus,
};
use granary_format::{Body, Caller, Registry, RegistryError, RepositoryRef};

use crate::node::Node;
use crate::raft::ProposeError;
use crate::state::command::{ApplyError, Command, CommandResult, PackageTarget};
use crate::store::StoreError;
use crate::store::blob::BlobError;

/// One request's view of one repository in one format.
pub(crate) struct NodeRegistry {
    pub(crate) node: Arc<Node>,
    pub(crate) format: &'static str,
    pub(crate) repo: RepositoryRef,
    pub(crate) caller: Caller,
}

fn internal(e: StoreError) -> RegistryError {
    RegistryError::Internal(e.to_string())
}

impl NodeRegistry {
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
        self.node
            .state
            .package(&self.repo.domain, &self.repo.repository, self.format, key)
            .map_err(internal)
    }

    async fn versions(&self, key: &PackageKey) -> Result<Vec<VersionRecord>, RegistryError> {
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
        let info = self
            .node
            .blobs
            .put(body, self.node.config.max_body_bytes)
            .await
            .map_err(|e| match e {
                BlobError::TooLarge { limit } => RegistryError::TooLarge { limit },
                BlobError::Upload(m) => RegistryError::Invalid(m),
                BlobError::Store(s) => internal(s),
            })?;
        // The metadata that will refer to these bytes is proposed only once a majority of
        // voters hold them.
        self.node
            .replicator
            .replicate(&info.hashes.sha256)
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok(info)
    }

    async fn open_blob(&self, sha256: &str) -> Result<Option<(u64, Body)>, RegistryError> {
        if let Some((info, body)) = self.node.blobs.open(sha256).map_err(internal)? {
            return Ok(Some((info.size, body)));
        }
        // Referenced but not here yet (this node is catching up): fetch it from a peer.
        if !self.node.replicator.fetch(sha256).await {
            return Ok(None);
        }
        Ok(self
            .node
            .blobs
            .open(sha256)
            .map_err(internal)?
            .map(|(info, body)| (info.size, body)))
    }

    async fn publish(&self, v: NewVersion) -> Result<(), RegistryError> {
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
