//! Model types shared by the node and the formats: packages, versions, assets.
//!
//! The node stores these records in its replicated state machine (as JSON), so a field
//! added here must have a serde default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A package within one repository and format: `(namespace, name)`.
///
/// The namespace is the npm or Swift scope without `@`, the Maven groupId, or a generic
/// namespace; PyPI, NuGet, Ruby and Cargo have none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PackageKey {
    /// Scope, groupId or namespace; `None` when the format has none.
    pub namespace: Option<String>,
    /// The package name (normalized as the format requires).
    pub name: String,
}

impl PackageKey {
    /// A key with an optional namespace.
    pub fn new(namespace: Option<&str>, name: &str) -> Self {
        Self {
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        }
    }
}

/// The four digests of an asset, lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashes {
    /// MD5.
    pub md5: String,
    /// SHA-1.
    pub sha1: String,
    /// SHA-256; also the blob's address in the store.
    pub sha256: String,
    /// SHA-512.
    pub sha512: String,
}

/// A blob as stored: its size and digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    /// Size in bytes.
    pub size: u64,
    /// Digests of the content.
    pub hashes: Hashes,
}

/// A named file of a package version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetRecord {
    /// Asset name (e.g. `pkg-1.0.0.tgz`), 1–255 characters.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Digests; `hashes.sha256` addresses the blob.
    pub hashes: Hashes,
}

/// CodeArtifact's package version status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionStatus {
    /// Listed and downloadable.
    Published,
    /// Being uploaded; not listed, not downloadable.
    Unfinished,
    /// Not listed; assets downloadable.
    Unlisted,
    /// Not listed, not downloadable; can be restored.
    Archived,
    /// Assets deleted; final.
    Disposed,
}

impl VersionStatus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionStatus::Published => "Published",
            VersionStatus::Unfinished => "Unfinished",
            VersionStatus::Unlisted => "Unlisted",
            VersionStatus::Archived => "Archived",
            VersionStatus::Disposed => "Disposed",
        }
    }

    /// Whether client version lists (packuments, simple pages) show the version.
    pub fn is_listed(self) -> bool {
        matches!(self, VersionStatus::Published)
    }

    /// Whether the version's assets may be downloaded.
    pub fn is_downloadable(self) -> bool {
        matches!(self, VersionStatus::Published | VersionStatus::Unlisted)
    }
}

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OriginType {
    /// Published directly to this domain.
    #[default]
    Internal,
    /// Ingested from an external connection.
    External,
    /// Unknown.
    Unknown,
}

impl OriginType {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            OriginType::Internal => "INTERNAL",
            OriginType::External => "EXTERNAL",
            OriginType::Unknown => "UNKNOWN",
        }
    }
}

/// A version's origin: how it entered the domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VersionOrigin {
    /// Internal, external or unknown.
    pub origin_type: OriginType,
    /// The repository it entered through.
    #[serde(default)]
    pub repository: Option<String>,
    /// The external connection it came from, for external versions.
    #[serde(default)]
    pub external_connection: Option<String>,
}

/// Allow or block, for package origin restrictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Allow {
    /// Allowed.
    #[serde(rename = "ALLOW")]
    Allow,
    /// Blocked.
    #[serde(rename = "BLOCK")]
    Block,
}

impl Allow {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Allow::Allow => "ALLOW",
            Allow::Block => "BLOCK",
        }
    }
}

/// Package origin controls (dependency-substitution protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginRestrictions {
    /// May versions be published directly?
    pub publish: Allow,
    /// May versions come from upstreams and external connections?
    pub upstream: Allow,
}

impl OriginRestrictions {
    /// The defaults for a package whose first version was published directly.
    pub const PUBLISHED_FIRST: OriginRestrictions = OriginRestrictions {
        publish: Allow::Allow,
        upstream: Allow::Block,
    };

    /// The defaults for a package whose first version came from an upstream.
    pub const INGESTED_FIRST: OriginRestrictions = OriginRestrictions {
        publish: Allow::Block,
        upstream: Allow::Allow,
    };
}

/// A package in one repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageRecord {
    /// The package's key.
    pub key: PackageKey,
    /// When the package's first version arrived (Unix milliseconds).
    pub created_ms: i64,
    /// When the package or any of its versions last changed (Unix milliseconds).
    pub modified_ms: i64,
    /// Changes whenever the package or any of its versions changes (the Raft log index of
    /// the last change): rendered documents are cached under it.
    pub stamp: u64,
    /// Named pointers to versions (npm dist-tags).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Origin controls.
    pub origin: OriginRestrictions,
}

/// Descriptive fields the API shows for a version (DescribePackageVersion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VersionSummary {
    /// Display name (for npm, the full name with scope).
    #[serde(default)]
    pub display_name: Option<String>,
    /// One-line summary (npm `description`).
    #[serde(default)]
    pub summary: Option<String>,
    /// Home page URL.
    #[serde(default)]
    pub home_page: Option<String>,
    /// Source repository URL.
    #[serde(default)]
    pub source_code_repository: Option<String>,
    /// License names.
    #[serde(default)]
    pub licenses: Vec<String>,
}

/// A package version in one repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version string as published.
    pub version: String,
    /// Opaque; changes whenever the version's assets or metadata change.
    pub revision: String,
    /// Lifecycle status.
    pub status: VersionStatus,
    /// Published time (Unix milliseconds).
    pub published_ms: i64,
    /// Last change (Unix milliseconds).
    pub modified_ms: i64,
    /// How the version entered the domain.
    #[serde(default)]
    pub origin: VersionOrigin,
    /// What the API describes.
    #[serde(default)]
    pub summary: VersionSummary,
    /// The format's own manifest (npm: the version's package.json with `_id`, `dist`, …).
    pub metadata: serde_json::Value,
    /// The version's files.
    pub assets: Vec<AssetRecord>,
    /// Files offered by an external registry and not fetched yet: only versions seen
    /// through an external connection (never stored) have them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteAsset>,
}

/// A file a public registry offers, as its metadata describes it: where to fetch it and
/// the digests it must have (lowercase hex; those the registry does not publish are
/// `None`). Bytes that do not match are refused, never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAsset {
    /// Asset name (`pkg-1.0.0.tgz`).
    pub name: String,
    /// Absolute URL at the registry.
    pub url: String,
    /// Size in bytes, if published.
    #[serde(default)]
    pub size: Option<u64>,
    /// SHA-1 (npm `shasum`).
    #[serde(default)]
    pub sha1: Option<String>,
    /// SHA-256.
    #[serde(default)]
    pub sha256: Option<String>,
    /// SHA-512 (npm `integrity`).
    #[serde(default)]
    pub sha512: Option<String>,
}

impl RemoteAsset {
    /// Whether `hashes` and `size` agree with every digest the registry published. A
    /// remote asset with no digest at all never matches: unverifiable bytes are refused.
    pub fn matches(&self, size: u64, hashes: &Hashes) -> bool {
        let eq = |want: &Option<String>, got: &str| {
            want.as_deref().is_none_or(|w| w.eq_ignore_ascii_case(got))
        };
        let any = self.sha1.is_some() || self.sha256.is_some() || self.sha512.is_some();
        any && self.size.is_none_or(|s| s == size)
            && eq(&self.sha1, &hashes.sha1)
            && eq(&self.sha256, &hashes.sha256)
            && eq(&self.sha512, &hashes.sha512)
    }
}

/// A package as a public registry describes it, read by [`crate::UpstreamFormat`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamPackage {
    /// Tags (npm dist-tags).
    pub tags: BTreeMap<String, String>,
    /// When the package was created there (Unix milliseconds; 0 if unknown).
    pub created_ms: i64,
    /// When it last changed there (Unix milliseconds; 0 if unknown).
    pub modified_ms: i64,
    /// Its versions: status `Published`, origin `External`, files in `remote`.
    pub versions: Vec<VersionRecord>,
}

impl VersionRecord {
    /// The asset with this name.
    pub fn asset(&self, name: &str) -> Option<&AssetRecord> {
        self.assets.iter().find(|a| a.name == name)
    }
}

/// A new version to publish, as a format hands it to [`crate::Registry::publish`].
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// The package.
    pub package: PackageKey,
    /// The version string.
    pub version: String,
    /// What the API describes.
    pub summary: VersionSummary,
    /// The format's manifest.
    pub metadata: serde_json::Value,
    /// The files, whose blobs were stored with [`crate::Registry::store_blob`].
    pub assets: Vec<AssetRecord>,
    /// Tags to point at this version in the same change (npm `dist-tags`).
    pub tags: Vec<String>,
}

/// A change to an existing version or package, decided atomically by the node (which
/// replicates it as it is: hence serde).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PackageChange {
    /// Point `tag` at `version` (which must exist).
    SetTag {
        /// Tag name.
        tag: String,
        /// Version it points to.
        version: String,
    },
    /// Remove a tag.
    RemoveTag {
        /// Tag name.
        tag: String,
    },
    /// Replace a version's format metadata (npm deprecate), keeping its assets.
    ReplaceMetadata {
        /// The version.
        version: String,
        /// The new manifest.
        metadata: serde_json::Value,
    },
    /// Delete a version (npm unpublish). The version string stays unusable for npm.
    DeleteVersion {
        /// The version.
        version: String,
    },
}
