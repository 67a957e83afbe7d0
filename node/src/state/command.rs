//! Raft commands: every metadata mutation, and what applying it returned.
//!
//! Commands carry everything apply needs (timestamps included) so that apply is
//! deterministic on every node. Conflicts are decided in apply and returned as
//! [`CommandResult::Failed`], never as storage errors.

use granary_format::model::{OriginRestrictions, PackageChange, PackageKey, VersionRecord};
use serde::{Deserialize, Serialize};

use super::model::{DomainRecord, Principal, RepositoryRecord, TokenKey};

/// A metadata mutation, proposed through Raft and applied on every node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Adds a token-signing key.
    PutTokenKey(TokenKey),
    /// Adds or replaces a principal and its access key.
    PutPrincipal(Principal),
    /// Creates a domain.
    CreateDomain(DomainRecord),
    /// Deletes a domain that has no repositories.
    DeleteDomain {
        /// Domain name.
        name: String,
    },
    /// Creates a repository.
    CreateRepository(RepositoryRecord),
    /// Changes a repository's description or upstream list.
    UpdateRepository {
        /// Domain name.
        domain: String,
        /// Repository name.
        name: String,
        /// New description, if given.
        description: Option<String>,
        /// New upstream list (replaces the old one), if given.
        upstreams: Option<Vec<String>>,
    },
    /// Deletes a repository and its packages.
    DeleteRepository {
        /// Domain name.
        domain: String,
        /// Repository name.
        name: String,
    },
    /// Publishes a new package version.
    PublishVersion {
        /// Where.
        target: PackageTarget,
        /// The version; `revision` is assigned by apply.
        version: Box<VersionRecord>,
        /// Tags to point at it.
        tags: Vec<String>,
    },
    /// Gives a repository its external connection (at most one).
    AssociateExternalConnection {
        /// Domain name.
        domain: String,
        /// Repository name.
        repository: String,
        /// Connection name (`public:npmjs`).
        connection: String,
    },
    /// Removes a repository's external connection.
    DisassociateExternalConnection {
        /// Domain name.
        domain: String,
        /// Repository name.
        repository: String,
        /// Connection name.
        connection: String,
    },
    /// Sets a package's origin controls, creating the package (without versions) if it
    /// has none yet, so a name can be protected before its first version.
    PutPackageOrigin {
        /// Where.
        target: PackageTarget,
        /// The controls.
        restrictions: OriginRestrictions,
        /// When (Unix milliseconds).
        now_ms: i64,
    },
    /// Keeps a version served through the upstream chain in the repositories that must
    /// retain it (the requested one; for external versions also the connection's).
    /// Per target, a version already there or a package whose origin controls block
    /// upstream versions is left alone: retention never fails a download.
    RetainVersion {
        /// The repositories (same format and package, one domain).
        targets: Vec<PackageTarget>,
        /// The version with its stored assets; `revision` is assigned by apply.
        version: Box<VersionRecord>,
    },
    /// Changes an existing package.
    ChangePackage {
        /// Where.
        target: PackageTarget,
        /// What.
        change: PackageChange,
        /// When (Unix milliseconds).
        now_ms: i64,
    },
    /// Several commands proposed together, applied in order as if each were an entry of
    /// its own (see `raft::batch`). Never nested.
    Batch(Vec<Command>),
}

/// A package in a repository and format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackageTarget {
    /// Domain name.
    pub domain: String,
    /// Repository name.
    pub repository: String,
    /// Format name (`npm`).
    pub format: String,
    /// The package.
    pub package: PackageKey,
}

/// The kinds of resource the API names in its errors (`resourceType`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ResourceKind {
    /// A domain.
    Domain,
    /// A repository.
    Repository,
    /// A package.
    Package,
    /// A package version.
    PackageVersion,
    /// An asset.
    Asset,
}

impl ResourceKind {
    /// The API's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Domain => "domain",
            ResourceKind::Repository => "repository",
            ResourceKind::Package => "package",
            ResourceKind::PackageVersion => "package-version",
            ResourceKind::Asset => "asset",
        }
    }
}

/// Why apply refused a command. Nothing was changed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A resource the command names does not exist.
    #[error("{} {id} not found", kind.as_str())]
    NotFound {
        /// What kind.
        kind: ResourceKind,
        /// Which.
        id: String,
    },
    /// The command conflicts with the current state.
    #[error("{message}")]
    Conflict {
        /// What kind.
        kind: ResourceKind,
        /// Which.
        id: String,
        /// Why.
        message: String,
    },
    /// The version exists already.
    #[error("version {version} already exists")]
    VersionExists {
        /// The version.
        version: String,
    },
    /// The command is invalid for the current state.
    #[error("{0}")]
    Invalid(String),
}

/// What applying a command returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CommandResult {
    /// Applied; nothing to return.
    Done,
    /// Applied; the domain as it is now (or was, when deleted).
    Domain(DomainRecord),
    /// Applied; the repository as it is now (or was, when deleted).
    Repository(RepositoryRecord),
    /// Refused; nothing changed.
    Failed(ApplyError),
    /// The results of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResult>),
}
