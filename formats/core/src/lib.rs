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

pub use body::Body;
pub use error::{FormatError, RegistryError};
pub use registry::{Caller, Registry, RepositoryRef};

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
}
