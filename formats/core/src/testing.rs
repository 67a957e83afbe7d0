//! Test support for format crates: an in-memory [`crate::Registry`] ([`MemRegistry`]) and a
//! conformance suite every format runs ([`conformance`]).
//!
//! `MemRegistry` keeps one repository's packages, versions, blobs and cached documents in
//! `Mutex`ed maps and follows the port's contract the way the node does:
//!
//! ```text
//!   store_blob ─hash (MultiHasher)─▶ blobs[sha256]
//!   publish    ─▶ VersionExists if the version exists or existed, Invalid if a blob is
//!                 missing ─▶ version Published, tags set, stamp += 1
//!   change     ─▶ SetTag / RemoveTag / ReplaceMetadata / DeleteVersion (→ Disposed,
//!                 assets dropped, tags pointing at it removed), stamp += 1
//!   documents  ─▶ cached per (package, variant), valid only for the stamp they were made at
//! ```
//!
//! Stamps come from one repository-wide counter, like the Raft log index the node uses.
//! It is compiled into the library (not `cfg(test)`) so format crates' integration tests
//! can use it; it has no dependencies beyond this crate's own.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::body::{self, Body};
use crate::error::RegistryError;
use crate::hashing::MultiHasher;
use crate::model::{
    BlobInfo, NewVersion, OriginRestrictions, PackageChange, PackageKey, PackageRecord,
    VersionOrigin, VersionRecord, VersionStatus,
};
use crate::registry::{Caller, Registry, RepositoryRef};

/// An in-memory [`Registry`] for one repository: what format tests run against.
#[derive(Debug)]
pub struct MemRegistry {
    repository: RepositoryRef,
    caller: Caller,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    packages: BTreeMap<PackageKey, Package>,
    blobs: HashMap<String, Bytes>,
    documents: HashMap<(PackageKey, &'static str), (u64, Bytes)>,
    /// The last stamp handed out.
    stamp: u64,
    /// The last timestamp handed out, to keep times strictly increasing.
    last_ms: i64,
    document_hits: u64,
    publishes: u64,
}

#[derive(Debug)]
struct Package {
    record: PackageRecord,
    versions: BTreeMap<String, VersionRecord>,
}

impl State {
    /// The next stamp and time of a change.
    fn tick(&mut self) -> (u64, i64) {
        self.stamp += 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.last_ms = now.max(self.last_ms + 1);
        (self.stamp, self.last_ms)
    }
}

impl MemRegistry {
    /// An empty repository `test-domain/test-repo` whose format endpoint is `base_url`
    /// (with a trailing slash, e.g. `http://127.0.0.1/npm/test-domain/test-repo/`), called
    /// by `username`.
    pub fn new(base_url: impl Into<String>, username: impl Into<String>) -> Self {
        Self::with_repository("test-domain", "test-repo", base_url, username)
    }

    /// An empty repository with the given names.
    pub fn with_repository(
        domain: impl Into<String>,
        repository: impl Into<String>,
        base_url: impl Into<String>,
        username: impl Into<String>,
    ) -> Self {
        Self {
            repository: RepositoryRef {
                domain: domain.into(),
                repository: repository.into(),
                base_url: base_url.into(),
                created_ms: 1_700_000_000_000,
            },
            caller: Caller {
                username: username.into(),
            },
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic in another test thread must not hide this test's own result.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many blobs are stored (stored blobs are never removed).
    pub fn blob_count(&self) -> usize {
        self.state().blobs.len()
    }

    /// A stored blob's bytes.
    pub fn blob(&self, sha256: &str) -> Option<Bytes> {
        self.state().blobs.get(sha256).cloned()
    }

    /// How many versions were published.
    pub fn publish_count(&self) -> u64 {
        self.state().publishes
    }

    /// How many times [`Registry::cached_document`] returned a document.
    pub fn document_hits(&self) -> u64 {
        self.state().document_hits
    }

    /// The current stamp (the number of changes so far).
    pub fn stamp(&self) -> u64 {
        self.state().stamp
    }

    /// Sets a version's status, as CodeArtifact's `UpdatePackageVersionsStatus` does.
    pub fn set_status(
        &self,
        key: &PackageKey,
        version: &str,
        status: VersionStatus,
    ) -> Result<(), RegistryError> {
        let mut state = self.state();
        let (stamp, now) = state.tick();
        let package = state
            .packages
            .get_mut(key)
            .ok_or_else(|| not_found(key, None))?;
        let v = package
            .versions
            .get_mut(version)
            .ok_or_else(|| not_found(key, Some(version)))?;
        v.status = status;
        v.modified_ms = now;
        v.revision = revision(stamp);
        touch(&mut package.record, stamp, now);
        Ok(())
    }
}

fn revision(stamp: u64) -> String {
    format!("{stamp:016x}")
}

fn touch(record: &mut PackageRecord, stamp: u64, now: i64) {
    record.stamp = stamp;
    record.modified_ms = now;
}

fn not_found(key: &PackageKey, version: Option<&str>) -> RegistryError {
    let name = match &key.namespace {
        Some(ns) => format!("{ns}/{}", key.name),
        None => key.name.clone(),
    };
    match version {
        Some(v) => RegistryError::NotFound(format!("version {name} {v} not found")),
        None => RegistryError::NotFound(format!("package {name} not found")),
    }
}

/// A version that still counts as present (not deleted).
fn live<'a>(
    package: &'a mut Package,
    key: &PackageKey,
    version: &str,
) -> Result<&'a mut VersionRecord, RegistryError> {
    package
        .versions
        .get_mut(version)
        .filter(|v| v.status != VersionStatus::Disposed)
        .ok_or_else(|| not_found(key, Some(version)))
}

#[async_trait]
impl Registry for MemRegistry {
    fn repository(&self) -> &RepositoryRef {
        &self.repository
    }

    fn caller(&self) -> &Caller {
        &self.caller
    }

    async fn package(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError> {
        Ok(self.state().packages.get(key).map(|p| p.record.clone()))
    }

    async fn versions(&self, key: &PackageKey) -> Result<Vec<VersionRecord>, RegistryError> {
        Ok(self
            .state()
            .packages
            .get(key)
            .map(|p| p.versions.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        Ok(self
            .state()
            .packages
            .get(key)
            .and_then(|p| p.versions.get(version).cloned().map(Arc::new)))
    }

    async fn store_blob(&self, mut body: Body) -> Result<BlobInfo, RegistryError> {
        let mut hasher = MultiHasher::new();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if body::is_too_large(&*e) {
                    RegistryError::TooLarge { limit: 0 }
                } else {
                    RegistryError::Invalid(format!("could not read the blob: {e}"))
                }
            })?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                buf.extend_from_slice(&data);
            }
        }
        let info = BlobInfo {
            size: hasher.len(),
            hashes: hasher.finish(),
        };
        self.state()
            .blobs
            .insert(info.hashes.sha256.clone(), buf.freeze());
        Ok(info)
    }

    async fn open_blob(&self, sha256: &str) -> Result<Option<(u64, Body)>, RegistryError> {
        Ok(self
            .state()
            .blobs
            .get(sha256)
            .map(|b| (b.len() as u64, body::full(b.clone()))))
    }

    async fn publish(&self, new: NewVersion) -> Result<(), RegistryError> {
        let mut state = self.state();
        let exists = state
            .packages
            .get(&new.package)
            .is_some_and(|p| p.versions.contains_key(&new.version));
        if exists {
            return Err(RegistryError::VersionExists {
                version: new.version,
            });
        }
        if let Some(missing) = new
            .assets
            .iter()
            .find(|a| !state.blobs.contains_key(&a.hashes.sha256))
        {
            return Err(RegistryError::Invalid(format!(
                "asset {} names a blob that was not stored",
                missing.name
            )));
        }
        let (stamp, now) = state.tick();
        state.publishes += 1;
        let package = state
            .packages
            .entry(new.package.clone())
            .or_insert_with(|| Package {
                record: PackageRecord {
                    key: new.package.clone(),
                    created_ms: now,
                    modified_ms: now,
                    stamp,
                    tags: BTreeMap::new(),
                    origin: OriginRestrictions::PUBLISHED_FIRST,
                },
                versions: BTreeMap::new(),
            });
        for tag in new.tags {
            package.record.tags.insert(tag, new.version.clone());
        }
        package.versions.insert(
            new.version.clone(),
            VersionRecord {
                version: new.version,
                revision: revision(stamp),
                status: VersionStatus::Published,
                published_ms: now,
                modified_ms: now,
                origin: VersionOrigin::default(),
                summary: new.summary,
                metadata: new.metadata,
                assets: new.assets,
                remote: Vec::new(),
            },
        );
        touch(&mut package.record, stamp, now);
        Ok(())
    }

    async fn change(&self, key: &PackageKey, change: PackageChange) -> Result<(), RegistryError> {
        let mut state = self.state();
        if !state.packages.contains_key(key) {
            return Err(not_found(key, None));
        }
        let (stamp, now) = state.tick();
        let package = state
            .packages
            .get_mut(key)
            .ok_or_else(|| not_found(key, None))?;
        match change {
            PackageChange::SetTag { tag, version } => {
                live(package, key, &version)?;
                package.record.tags.insert(tag, version);
            }
            PackageChange::RemoveTag { tag } => {
                if package.record.tags.remove(&tag).is_none() {
                    return Err(RegistryError::NotFound(format!("tag {tag} not found")));
                }
            }
            PackageChange::ReplaceMetadata { version, metadata } => {
                let v = live(package, key, &version)?;
                v.metadata = metadata;
                v.modified_ms = now;
                v.revision = revision(stamp);
            }
            PackageChange::DeleteVersion { version } => {
                let v = live(package, key, &version)?;
                v.status = VersionStatus::Disposed;
                v.assets.clear();
                v.modified_ms = now;
                v.revision = revision(stamp);
                package.record.tags.retain(|_, target| *target != version);
            }
        }
        touch(&mut package.record, stamp, now);
        Ok(())
    }

    fn cached_document(
        &self,
        key: &PackageKey,
        variant: &'static str,
        stamp: u64,
    ) -> Option<Bytes> {
        let mut state = self.state();
        let doc = state
            .documents
            .get(&(key.clone(), variant))
            .filter(|(s, _)| *s == stamp)
            .map(|(_, doc)| doc.clone());
        if doc.is_some() {
            state.document_hits += 1;
        }
        doc
    }

    fn cache_document(&self, key: &PackageKey, variant: &'static str, stamp: u64, doc: Bytes) {
        self.state()
            .documents
            .insert((key.clone(), variant), (stamp, doc));
    }
}

/// Checks every format must pass, and a helper that drives one request through a format
/// the way the node does.
pub mod conformance {
    use bytes::Bytes;
    use http::{Request, Response, StatusCode, header};
    use http_body_util::BodyExt;

    use super::MemRegistry;
    use crate::{Action, Format, FormatError, Registry, body};

    /// The outcome of one request.
    #[derive(Debug)]
    pub struct Reply {
        /// The action the route needed, if the request routed.
        pub action: Option<Action>,
        /// The response, body collected.
        pub response: Response<Bytes>,
    }

    impl Reply {
        /// The status.
        pub fn status(&self) -> StatusCode {
            self.response.status()
        }

        /// A header as a string (`""` when absent or not visible ASCII).
        pub fn header(&self, name: impl header::AsHeaderName) -> &str {
            self.response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        }

        /// The body.
        pub fn body(&self) -> &Bytes {
            self.response.body()
        }

        /// The body as JSON (`Null` when it is not JSON).
        pub fn json(&self) -> serde_json::Value {
            serde_json::from_slice(self.response.body()).unwrap_or(serde_json::Value::Null)
        }
    }

    /// The path after `/{format}/{domain}/{repository}/` of a request to `repo`, as the
    /// node passes it to [`Format::route`]; other paths lose only their leading slash.
    pub fn rest_of<'a, F: Format>(repo: &dyn Registry, path: &'a str) -> &'a str {
        let r = repo.repository();
        let prefix = format!("/{}/{}/{}/", F::NAME, r.domain, r.repository);
        match path.strip_prefix(prefix.as_str()) {
            Some(rest) => rest,
            None => path.trim_start_matches('/'),
        }
    }

    /// Drives a request through `format` as the node does after authentication: route,
    /// action, handle, and the format's error rendering for failures; collects the body.
    pub async fn call<F: Format>(format: &F, repo: &dyn Registry, req: Request<Bytes>) -> Reply {
        let (parts, bytes) = req.into_parts();
        let rest = rest_of::<F>(repo, parts.uri.path()).to_owned();
        let (action, result) = match format.route(&parts, &rest) {
            Ok(route) => {
                let action = F::action(&route);
                (
                    Some(action),
                    format.handle(route, body::full(bytes), repo).await,
                )
            }
            Err(err) => (None, Err(err)),
        };
        let response = result.unwrap_or_else(|err| format.error_response(&err));
        let (parts, body) = response.into_parts();
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => Bytes::from(format!("<body error: {err}>")),
        };
        Reply {
            action,
            response: Response::from_parts(parts, bytes),
        }
    }

    /// One failed conformance check.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("conformance check failed: {check}: {detail}")]
    pub struct Failure {
        /// What was checked.
        pub check: String,
        /// What happened instead.
        pub detail: String,
    }

    fn fail(check: &str, detail: impl Into<String>) -> Failure {
        Failure {
            check: check.to_owned(),
            detail: detail.into(),
        }
    }

    /// Format-independent checks, against an empty [`MemRegistry`]:
    ///
    /// - paths with `..` (plain or percent-encoded), `\`, control characters or empty
    ///   segments are refused with 400;
    /// - a path naming nothing is a 404;
    /// - error bodies never show internal details; 401 carries `WWW-Authenticate`;
    ///   every error status comes from [`FormatError::status`].
    pub async fn run<F: Format>(format: &F) -> Result<(), Failure> {
        let repo = MemRegistry::new(
            "http://granary.test/conformance/d/r/".to_owned(),
            "conformance",
        );
        let prefix = format!("/{}/test-domain/test-repo/", F::NAME);
        for bad in [
            "../secret",
            "a/../../b",
            "%2e%2e/b",
            "a/%2E%2E/b",
            "a%5cb",
            "a%5Cb",
            "a%00b",
            "a%0d%0ab",
            "a//b",
        ] {
            let req = Request::get(format!("{prefix}{bad}"))
                .body(Bytes::new())
                .map_err(|e| fail("build request", e.to_string()))?;
            let reply = call(format, &repo, req).await;
            if reply.status() != StatusCode::BAD_REQUEST {
                return Err(fail(
                    "unsafe paths are 400",
                    format!("GET {bad} answered {}", reply.status()),
                ));
            }
        }
        let unknown = format!("{prefix}granary-conformance-absent/zz/yy/xx/ww");
        let req = Request::get(&unknown)
            .body(Bytes::new())
            .map_err(|e| fail("build request", e.to_string()))?;
        let reply = call(format, &repo, req).await;
        if reply.status() != StatusCode::NOT_FOUND {
            return Err(fail(
                "absent paths are 404",
                format!("GET {unknown} answered {}", reply.status()),
            ));
        }
        let secret = "granary-conformance-secret-detail";
        let resp = format.error_response(&FormatError::Internal(secret.to_owned()));
        if resp.status() != StatusCode::INTERNAL_SERVER_ERROR {
            return Err(fail("internal errors are 500", resp.status().to_string()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        if String::from_utf8_lossy(&body).contains(secret) {
            return Err(fail(
                "internal details stay private",
                "the detail was shown",
            ));
        }
        let resp = format.error_response(&FormatError::Unauthorized);
        if resp.status() != StatusCode::UNAUTHORIZED
            || !resp.headers().contains_key(header::WWW_AUTHENTICATE)
        {
            return Err(fail(
                "401 carries WWW-Authenticate",
                format!("{} {:?}", resp.status(), resp.headers()),
            ));
        }
        for err in [
            FormatError::NotFound("x".into()),
            FormatError::BadRequest("x".into()),
            FormatError::Forbidden("x".into()),
            FormatError::Conflict("x".into()),
            FormatError::PayloadTooLarge { limit: 1 },
            FormatError::MethodNotAllowed,
            FormatError::Unavailable("x".into()),
        ] {
            let resp = format.error_response(&err);
            if resp.status() != err.status() {
                return Err(fail(
                    "error statuses come from FormatError::status",
                    format!("{err:?} answered {}", resp.status()),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::hashing::hash_bytes;
    use crate::model::{AssetRecord, VersionSummary};

    fn new_version(key: &PackageKey, v: &str, data: &'static [u8]) -> NewVersion {
        let hashes = hash_bytes(data);
        NewVersion {
            package: key.clone(),
            version: v.to_owned(),
            summary: VersionSummary::default(),
            metadata: json!({"version": v}),
            assets: vec![AssetRecord {
                name: format!("p-{v}.tgz"),
                size: data.len() as u64,
                hashes,
            }],
            tags: vec!["latest".into()],
        }
    }

    #[tokio::test]
    async fn publish_change_and_cache() {
        let repo = MemRegistry::new("http://x/npm/d/r/", "alice");
        let key = PackageKey::new(None, "p");
        let info = repo.store_blob(body::full(&b"abc"[..])).await.unwrap();
        assert_eq!(info.size, 3);
        assert_eq!(info.hashes, hash_bytes(b"abc"));
        repo.publish(new_version(&key, "1.0.0", b"abc"))
            .await
            .unwrap();
        let record = repo.package(&key).await.unwrap().unwrap();
        assert_eq!(record.tags["latest"], "1.0.0");
        let first_stamp = record.stamp;

        let dup = repo.publish(new_version(&key, "1.0.0", b"abc")).await;
        assert!(matches!(dup, Err(RegistryError::VersionExists { .. })));
        let missing_blob = repo.publish(new_version(&key, "2.0.0", b"zzz")).await;
        assert!(matches!(missing_blob, Err(RegistryError::Invalid(_))));

        repo.cache_document(&key, "full", first_stamp, Bytes::from_static(b"doc"));
        assert!(repo.cached_document(&key, "full", first_stamp).is_some());
        assert_eq!(repo.document_hits(), 1);

        repo.change(
            &key,
            PackageChange::SetTag {
                tag: "next".into(),
                version: "1.0.0".into(),
            },
        )
        .await
        .unwrap();
        let record = repo.package(&key).await.unwrap().unwrap();
        assert!(record.stamp > first_stamp);
        assert!(repo.cached_document(&key, "full", record.stamp).is_none());

        repo.change(
            &key,
            PackageChange::DeleteVersion {
                version: "1.0.0".into(),
            },
        )
        .await
        .unwrap();
        let v = repo.version(&key, "1.0.0").await.unwrap().unwrap();
        assert_eq!(v.status, VersionStatus::Disposed);
        assert!(repo.package(&key).await.unwrap().unwrap().tags.is_empty());
        let again = repo.publish(new_version(&key, "1.0.0", b"abc")).await;
        assert!(matches!(again, Err(RegistryError::VersionExists { .. })));
        let gone = repo
            .change(
                &key,
                PackageChange::SetTag {
                    tag: "x".into(),
                    version: "1.0.0".into(),
                },
            )
            .await;
        assert!(matches!(gone, Err(RegistryError::NotFound(_))));
    }

    #[tokio::test]
    async fn blobs_stream_back() {
        let repo = MemRegistry::new("http://x/", "alice");
        let info = repo.store_blob(body::full(&b"hello"[..])).await.unwrap();
        let (size, body) = repo.open_blob(&info.hashes.sha256).await.unwrap().unwrap();
        assert_eq!(size, 5);
        let bytes = body::read_to_bytes(body, 100).await.unwrap();
        assert_eq!(&bytes[..], b"hello");
        assert!(repo.open_blob("00").await.unwrap().is_none());
        assert_eq!(repo.blob_count(), 1);
    }
}
