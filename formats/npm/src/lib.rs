//! granary-format-npm: the npm registry protocol, as npm CLI 11 speaks it.
//!
//! [`NpmFormat`] implements [`granary_format::Format`]: it routes requests under
//! `/npm/{domain}/{repository}/`, validates publishes, and renders packuments from the
//! records of a [`Registry`]. It depends only on `formats/core` (plus http, serde and
//! hashing crates): no storage, consensus or actors.
//!
//! ```text
//!   node ──route()──▶ router::Route ──action()──▶ node authorizes
//!                          │
//!                          └──handle()──┬─ packument.rs  GET packument / version / tarball / dist-tags
//!                                       ├─ publish.rs    PUT publish / deprecate / unpublish / tags
//!                                       │    └─ stream.rs  PUT bodies: skeleton + streamed tarball
//!                                       └─ lib.rs        whoami, ping, search, audit, login
//!   upstream() ──▶ upstream.rs: public packuments read into records (external connections)
//! ```
//!
//! Modules: `router` (paths → [`Route`]), `validate` (names, versions, tags), `model`
//! (wire types), `packument` (reads), `publish` (writes), `stream` (scanning publish
//! bodies, streaming their tarball into the blob store), `reply` (responses), `error`
//! (npm's `{"error": …}` bodies).

mod error;
mod model;
mod packument;
mod publish;
mod reply;
mod router;
mod stream;
mod upstream;
pub mod validate;

use http::{Response, StatusCode};
use time::OffsetDateTime;

use granary_format::{Action, Body, Format, FormatError, Registry, UpstreamFormat};

use crate::model::{OkBody, SearchResults, Whoami};
pub use crate::router::{ReadRequest, Route};

/// The default limit of a publish body (`PUT {name}`): the tarball travels base64-encoded
/// inside JSON, a third larger than the file. The node bounds bodies as well. The body is
/// streamed (the tarball straight into the blob store), so the limit bounds the upload,
/// not memory.
pub const DEFAULT_MAX_PUBLISH_BYTES: usize = 512 * 1024 * 1024;

/// What npm shows when someone tries `npm login`/`npm adduser`.
const LOGIN_UNSUPPORTED: &str = "npm login is not supported by this registry: get a token \
     with `aws codeartifact login --tool npm` (or `aws codeartifact get-authorization-token`) \
     and set it as `_authToken` in .npmrc";

/// The npm format.
#[derive(Debug, Clone)]
pub struct NpmFormat {
    max_publish_bytes: usize,
}

impl NpmFormat {
    /// An npm format whose publish bodies (JSON with the base64 tarball) may be up to
    /// `max_publish_bytes` long.
    pub fn new(max_publish_bytes: usize) -> Self {
        Self { max_publish_bytes }
    }
}

impl Default for NpmFormat {
    /// [`DEFAULT_MAX_PUBLISH_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PUBLISH_BYTES)
    }
}

impl Format for NpmFormat {
    const NAME: &'static str = "npm";

    type Route = Route;

    fn route(&self, req: &http::request::Parts, rest: &str) -> Result<Route, FormatError> {
        router::route(req, rest)
    }

    fn action(route: &Route) -> Action {
        route.action()
    }

    async fn handle(
        &self,
        route: Route,
        body: Body,
        repo: &dyn Registry,
    ) -> Result<Response<Body>, FormatError> {
        match route {
            Route::Packument {
                name,
                abbreviated,
                write,
                read,
            } => packument::packument(repo, &name, abbreviated, write, &read).await,
            Route::VersionManifest { name, spec, read } => {
                packument::version_manifest(repo, &name, &spec, &read).await
            }
            Route::Tarball { name, file, read } => {
                packument::tarball(repo, &name, &file, &read).await
            }
            Route::DistTags { name, read } => packument::dist_tags(repo, &name, &read).await,
            Route::PutPackage { name } => {
                publish::put_package(repo, &name, None, body, self.max_publish_bytes).await
            }
            Route::UpdatePackage { name, rev } => {
                publish::put_package(repo, &name, Some(&rev), body, self.max_publish_bytes).await
            }
            Route::UnpublishPackage { name, .. } => publish::unpublish_package(repo, &name).await,
            Route::DeleteTarball { name, file, .. } => {
                publish::delete_tarball(repo, &name, &file).await
            }
            Route::SetDistTag { name, tag } => publish::set_dist_tag(repo, &name, &tag, body).await,
            Route::RemoveDistTag { name, tag } => publish::remove_dist_tag(repo, &name, &tag).await,
            Route::Whoami { read } => reply::json(
                StatusCode::OK,
                &Whoami {
                    username: &repo.caller().username,
                },
                read.head,
            ),
            Route::Ping { read } => reply::json(StatusCode::OK, &serde_json::json!({}), read.head),
            Route::Search { read } => reply::json(
                StatusCode::OK,
                &SearchResults {
                    objects: Vec::new(),
                    total: 0,
                    time: packument::iso8601(now_ms()),
                },
                read.head,
            ),
            Route::Audit => reply::json(StatusCode::OK, &serde_json::json!({}), false),
            Route::Logout => reply::json(StatusCode::OK, &OkBody::ok(), false),
            // No challenge on purpose: npm then prints our message instead of its
            // canned "Incorrect or missing password" text.
            Route::Login => Ok(error::error_with_message(
                StatusCode::UNAUTHORIZED,
                LOGIN_UNSUPPORTED,
            )),
        }
    }

    fn error_response(&self, err: &FormatError) -> Response<Body> {
        error::render(err)
    }

    fn upstream(&self) -> Option<std::sync::Arc<dyn UpstreamFormat>> {
        Some(std::sync::Arc::new(upstream::NpmUpstream))
    }
}

fn now_ms() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000_000).unwrap_or(0)
}
