//! granary-format: the contract between the Granary node and each package format.
//!
//! A format crate (`formats/<name>`) implements [`Format`]: it turns an HTTP request under
//! `/{format}/{domain}/{repository}/…` into a typed route, and handles the route against a
//! [`Registry`], the node's one port (metadata, blobs, cached documents). Formats own the
//! protocol: path parsing, validating uploads, rendering index documents. They never see
//! Raft, RocksDB, actors or gRPC; those belong to the node.
//!
//! ```text
//!   node (HTTP front, auth) ──route()──▶ Format::Route ──handle()──▶ Response
//!                                                   │
//!                                                   ▼
//!                                        &dyn Registry (node's port)
//! ```
//!
//! This crate depends on no other crate of Granary.

pub mod body;
mod error;
pub mod hashing;
pub mod model;
mod registry;
pub mod testing;

use std::fmt;
use std::future::Future;

use http::Response;

use crate::model::{PackageKey, UpstreamPackage};

pub use body::Body;
pub use error::{FormatError, RegistryError};
pub use registry::{AssetBody, Caller, Registry, RepositoryRef};

/// What a route asks of the caller's permissions; the node authorizes it before
/// [`Format::handle`] runs, with CodeArtifact's action names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `codeartifact:ReadFromRepository`: every package-manager read.
    Read,
    /// `codeartifact:PublishPackageVersion`: publishing new versions or assets.
    Publish,
    /// Changing existing versions or tags (dist-tags, deprecate, unpublish):
    /// `codeartifact:PutPackageMetadata`-class writes.
    Write,
}

/// One package format's protocol (npm, PyPI, Maven, …).
pub trait Format: Send + Sync + 'static {
    /// The format's name: URL prefix, metric label and config key (`"npm"`).
    const NAME: &'static str;

    /// One variant per endpoint the format serves.
    type Route: fmt::Debug + Send;

    /// Parses a request. `rest` is the raw (still percent-encoded) path after
    /// `/{format}/{domain}/{repository}/`, without a leading slash.
    fn route(&self, req: &http::request::Parts, rest: &str) -> Result<Self::Route, FormatError>;

    /// The permission a route needs.
    fn action(route: &Self::Route) -> Action;

    /// Serves a route. The body is already bounded by the node's configured size limit.
    fn handle(
        &self,
        route: Self::Route,
        body: Body,
        repo: &dyn Registry,
    ) -> impl Future<Output = Result<Response<Body>, FormatError>> + Send;

    /// Renders an error in the format's own error shape (npm: `{"error": "…"}`).
    fn error_response(&self, err: &FormatError) -> Response<Body>;

    /// How the format reads public registries, if it can have external connections.
    fn upstream(&self) -> Option<std::sync::Arc<dyn UpstreamFormat>> {
        None
    }
}

/// How a format reads a public registry's package metadata (external connections).
///
/// The node fetches the document, caches it, and hands the parsed versions to the
/// format's own renderer alongside local ones: rewriting a public document so that
/// clients come back to Granary is rendering it, since stored manifests never carry
/// absolute URLs and the renderer writes the repository's own.
pub trait UpstreamFormat: Send + Sync {
    /// Whether the named external connection (`public:npmjs`) serves this format.
    fn serves(&self, connection: &str) -> bool;

    /// The package's metadata document, relative to the connection's base URL (which
    /// ends with `/`).
    fn metadata_path(&self, key: &PackageKey) -> String;

    /// Reads a metadata document fetched from `url`.
    fn parse_metadata(
        &self,
        key: &PackageKey,
        url: &str,
        body: &[u8],
    ) -> Result<UpstreamPackage, FormatError>;
}
