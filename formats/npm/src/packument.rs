//! The read side: packuments (full and abbreviated), single version manifests, tarballs
//! and dist-tags, rendered from the registry's records.
//!
//! ```text
//!   package(key) ──stamp──▶ If-None-Match? ──▶ 304
//!        │
//!        ▼
//!   cached_document(key, variant, stamp) ──hit──▶ 200
//!        │ miss
//!        ▼
//!   versions(key) ─▶ render (listed versions only, dist.tarball from base_url)
//!                 ─▶ cache_document ─▶ 200
//! ```
//!
//! Stored manifests never hold `dist.tarball`: it is added here, from the repository's
//! current base URL, so a changed public URL is respected.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::format_description;

use granary_format::model::{PackageRecord, VersionRecord};
use granary_format::{Body, FormatError, Registry};

use crate::error::{internal, not_found};
use crate::model::{AbbreviatedPackument, Object, Packument};
use crate::reply::{self, JSON};
use crate::router::{ABBREVIATED_MEDIA_TYPE, ReadRequest};
use crate::validate::PackageName;

/// Cache variant of the full document.
const FULL: &str = "full";
/// Cache variant of the abbreviated document.
const ABBREVIATED: &str = "abbrev";
/// Cache variant of the `?write=true` document (local versions only).
const WRITE: &str = "write";

/// Top-level packument fields copied from the `latest` version, as npmjs does.
const LATEST_FIELDS: &[&str] = &[
    "description",
    "readme",
    "readmeFilename",
    "license",
    "repository",
    "homepage",
    "keywords",
    "author",
    "bugs",
    "maintainers",
    "contributors",
];

/// Per-version fields of the abbreviated document (npm registry docs, plus what npmjs
/// serves today).
const ABBREVIATED_FIELDS: &[&str] = &[
    "name",
    "version",
    "dist",
    "deprecated",
    "dependencies",
    "optionalDependencies",
    "devDependencies",
    "bundleDependencies",
    "bundledDependencies",
    "peerDependencies",
    "peerDependenciesMeta",
    "acceptDependencies",
    "bin",
    "directories",
    "engines",
    "os",
    "cpu",
    "libc",
    "funding",
    "license",
    "_hasShrinkwrap",
    "hasInstallScript",
];

/// Lifecycle scripts that make `hasInstallScript` true.
const INSTALL_SCRIPTS: &[&str] = &["preinstall", "install", "postinstall"];

/// `GET {name}`.
pub(crate) async fn packument(
    repo: &dyn Registry,
    name: &PackageName,
    abbreviated: bool,
    write: bool,
    read: &ReadRequest,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    // The document a client edits shows what it may edit: this repository's versions.
    let record = if write {
        repo.package(&key).await?
    } else {
        repo.resolve_package(&key).await?
    };
    let record = record.ok_or_else(not_found)?;
    let variant = match (abbreviated, write) {
        (true, _) => ABBREVIATED,
        (false, true) => WRITE,
        (false, false) => FULL,
    };
    let etag = document_etag(repo, variant, record.stamp);
    if reply::etag_matches(read.if_none_match.as_deref(), &etag) {
        return reply::not_modified(&etag);
    }
    let doc = match repo.cached_document(&key, variant, record.stamp) {
        Some(doc) => doc,
        None => {
            let versions = if write {
                repo.versions(&key).await?
            } else {
                repo.resolve_versions(&key).await?
            };
            let base_url = &repo.repository().base_url;
            let doc = if abbreviated {
                render_abbreviated(base_url, name, &record, &versions)?
            } else {
                render_full(base_url, name, &record, &versions)?
            };
            let doc = doc.ok_or_else(not_found)?;
            repo.cache_document(&key, variant, record.stamp, doc.clone());
            doc
        }
    };
    let content_type = if abbreviated {
        ABBREVIATED_MEDIA_TYPE
    } else {
        JSON
    };
    let mut resp = reply::bytes_reply(StatusCode::OK, content_type, doc, read.head);
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    reply::with_etag(resp, &etag)
}

/// `GET {name}/{version-or-tag}`: one manifest, as in the full document.
pub(crate) async fn version_manifest(
    repo: &dyn Registry,
    name: &PackageName,
    spec: &str,
    read: &ReadRequest,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    let record = repo.resolve_package(&key).await?.ok_or_else(not_found)?;
    let versions = repo.resolve_versions(&key).await?;
    let listed = listed_sorted(&versions);
    let tags = effective_tags(&record, &listed);
    let version = tags.get(spec).map(String::as_str).unwrap_or(spec);
    let found = listed
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(not_found)?;
    let manifest = render_manifest(&repo.repository().base_url, name, found, false);
    let etag = format!(
        "\"npm-v-{}-{}-{}\"",
        record.stamp,
        hex8(&found.version),
        scope(repo)
    );
    if reply::etag_matches(read.if_none_match.as_deref(), &etag) {
        return reply::not_modified(&etag);
    }
    let resp = reply::json(StatusCode::OK, &Value::Object(manifest), read.head)?;
    reply::with_etag(resp, &etag)
}

/// `GET {name}/-/{file}`: from this repository, or through its upstream chain (which
/// may fetch it from a public registry and keep the version here).
pub(crate) async fn tarball(
    repo: &dyn Registry,
    name: &PackageName,
    file: &str,
    read: &ReadRequest,
) -> Result<Response<Body>, FormatError> {
    let version = name.version_of_file(file).ok_or_else(not_found)?;
    let key = name.key();
    let record = repo
        .resolve_version(&key, version)
        .await?
        .filter(|v| v.status.is_downloadable())
        .ok_or_else(not_found)?;
    let canonical = name.tarball_file(version);
    let (asset, etag, known_size) = if let Some(a) = record
        .asset(&canonical)
        .or_else(|| record.assets.iter().find(|a| a.name.ends_with(".tgz")))
    {
        (a.name.clone(), a.hashes.sha256.clone(), Some(a.size))
    } else {
        let r = record
            .remote
            .iter()
            .find(|r| r.name == canonical)
            .or_else(|| record.remote.iter().find(|r| r.name.ends_with(".tgz")))
            .ok_or_else(not_found)?;
        let digest = r
            .sha512
            .as_ref()
            .or(r.sha1.as_ref())
            .cloned()
            .unwrap_or_default();
        (r.name.clone(), digest, r.size)
    };
    let etag = format!("\"{etag}\"");
    if reply::etag_matches(read.if_none_match.as_deref(), &etag) {
        return reply::not_modified(&etag);
    }
    let (size, body) = match (read.head, known_size) {
        (true, Some(size)) => (Some(size), granary_format::body::empty()),
        _ => {
            let fetched = repo
                .fetch_asset(&key, version, &asset)
                .await?
                .ok_or_else(not_found)?;
            if read.head {
                (fetched.size, granary_format::body::empty())
            } else {
                (fetched.size, fetched.body)
            }
        }
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(size) = size {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    reply::with_etag(resp, &etag)
}

/// `GET -/package/{name}/dist-tags`.
pub(crate) async fn dist_tags(
    repo: &dyn Registry,
    name: &PackageName,
    read: &ReadRequest,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    let record = repo.resolve_package(&key).await?.ok_or_else(not_found)?;
    let versions = repo.resolve_versions(&key).await?;
    let tags = effective_tags(&record, &listed_sorted(&versions));
    reply::json(StatusCode::OK, &tags, read.head)
}

/// The `_rev` of a package: CouchDB-shaped (`N-hash`), derived from the stamp.
pub(crate) fn revision(name: &PackageName, record: &PackageRecord) -> String {
    let mut h = Sha256::new();
    h.update(name.full().as_bytes());
    h.update([0]);
    h.update(record.stamp.to_be_bytes());
    format!("{}-{}", record.stamp, &hex::encode(h.finalize())[..32])
}

/// Listed versions, lowest first by SemVer (unparsable versions last, by string).
pub(crate) fn listed_sorted(versions: &[VersionRecord]) -> Vec<&VersionRecord> {
    let mut listed: Vec<&VersionRecord> =
        versions.iter().filter(|v| v.status.is_listed()).collect();
    listed.sort_by(|a, b| compare_versions(&a.version, &b.version));
    listed
}

fn compare_versions(a: &str, b: &str) -> Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

/// The tags to show: stored tags pointing at listed versions, and always a `latest`
/// once a version is listed (the highest release, else the highest prerelease).
pub(crate) fn effective_tags(
    record: &PackageRecord,
    listed: &[&VersionRecord],
) -> BTreeMap<String, String> {
    let mut tags: BTreeMap<String, String> = record
        .tags
        .iter()
        .filter(|(_, v)| listed.iter().any(|l| &l.version == *v))
        .map(|(t, v)| (t.clone(), v.clone()))
        .collect();
    if !tags.contains_key("latest") {
        let release = listed
            .iter()
            .rev()
            .find(|v| semver::Version::parse(&v.version).is_ok_and(|s| s.pre.is_empty()));
        if let Some(latest) = release.or(listed.last()) {
            tags.insert("latest".to_owned(), latest.version.clone());
        }
    }
    tags
}

/// The absolute tarball URL of a version (under the repository's base URL, so npm sends
/// its credentials along).
pub(crate) fn tarball_url(base_url: &str, name: &PackageName, version: &str) -> String {
    format!("{base_url}{name}/-/{}", name.tarball_file(version))
}

/// A version's manifest as served: the stored one with `name`, `version`, `_id` and a
/// complete `dist` (the tarball URL always, digests from the asset when missing).
fn render_manifest(
    base_url: &str,
    name: &PackageName,
    v: &VersionRecord,
    strip_readme: bool,
) -> Object {
    let mut m = match &v.metadata {
        Value::Object(m) => m.clone(),
        _ => Object::new(),
    };
    if strip_readme {
        m.remove("readme");
        m.remove("readmeFilename");
    }
    let full = name.full();
    m.insert("_id".into(), Value::String(format!("{full}@{}", v.version)));
    m.insert("name".into(), Value::String(full));
    m.insert("version".into(), Value::String(v.version.clone()));
    let mut dist = match m.remove("dist") {
        Some(Value::Object(d)) => d,
        _ => Object::new(),
    };
    let asset = v
        .asset(&name.tarball_file(&v.version))
        .or_else(|| v.assets.iter().find(|a| a.name.ends_with(".tgz")));
    if let Some(asset) = asset {
        dist.entry("shasum")
            .or_insert_with(|| Value::String(asset.hashes.sha1.clone()));
        if !dist.contains_key("integrity")
            && let Ok(raw) = hex::decode(&asset.hashes.sha512)
        {
            dist.insert(
                "integrity".into(),
                Value::String(format!("sha512-{}", BASE64.encode(raw))),
            );
        }
    }
    dist.insert(
        "tarball".into(),
        Value::String(tarball_url(base_url, name, &v.version)),
    );
    m.insert("dist".into(), Value::Object(dist));
    m
}

/// The full document, or `None` when no version is listed.
fn render_full(
    base_url: &str,
    name: &PackageName,
    record: &PackageRecord,
    versions: &[VersionRecord],
) -> Result<Option<Bytes>, FormatError> {
    let listed = listed_sorted(versions);
    if listed.is_empty() {
        return Ok(None);
    }
    let dist_tags = effective_tags(record, &listed);
    let mut time = BTreeMap::new();
    time.insert("created".to_owned(), iso8601(record.created_ms));
    time.insert("modified".to_owned(), iso8601(record.modified_ms));
    let mut rendered = BTreeMap::new();
    for v in &listed {
        time.insert(v.version.clone(), iso8601(v.published_ms));
        rendered.insert(
            v.version.clone(),
            Value::Object(render_manifest(base_url, name, v, true)),
        );
    }
    let latest = dist_tags
        .get("latest")
        .and_then(|l| listed.iter().find(|v| &v.version == l));
    let mut latest_fields = Object::new();
    if let Some(Value::Object(m)) = latest.map(|v| &v.metadata) {
        for field in LATEST_FIELDS {
            if let Some(value) = m.get(*field) {
                latest_fields.insert((*field).to_owned(), value.clone());
            }
        }
    }
    let doc = Packument {
        id: name.full(),
        rev: revision(name, record),
        name: name.full(),
        dist_tags,
        versions: rendered,
        time,
        latest_fields,
    };
    serde_json::to_vec(&doc)
        .map(|b| Some(Bytes::from(b)))
        .map_err(internal)
}

/// The abbreviated ("corgi") document, or `None` when no version is listed.
fn render_abbreviated(
    base_url: &str,
    name: &PackageName,
    record: &PackageRecord,
    versions: &[VersionRecord],
) -> Result<Option<Bytes>, FormatError> {
    let listed = listed_sorted(versions);
    if listed.is_empty() {
        return Ok(None);
    }
    let mut rendered = BTreeMap::new();
    for v in &listed {
        let full = render_manifest(base_url, name, v, true);
        let mut short = Object::new();
        for field in ABBREVIATED_FIELDS {
            if let Some(value) = full.get(*field) {
                short.insert((*field).to_owned(), value.clone());
            }
        }
        if has_install_script(&full) {
            short.insert("hasInstallScript".into(), Value::Bool(true));
        }
        rendered.insert(v.version.clone(), Value::Object(short));
    }
    let doc = AbbreviatedPackument {
        name: name.full(),
        modified: iso8601(record.modified_ms),
        dist_tags: effective_tags(record, &listed),
        versions: rendered,
    };
    serde_json::to_vec(&doc)
        .map(|b| Some(Bytes::from(b)))
        .map_err(internal)
}

fn has_install_script(m: &Object) -> bool {
    match m.get("scripts") {
        Some(Value::Object(scripts)) => INSTALL_SCRIPTS.iter().any(|s| scripts.contains_key(*s)),
        _ => false,
    }
}

/// The packument's ETag: stamp, variant and the repository's scope (see [`scope`]).
fn document_etag(repo: &dyn Registry, variant: &str, stamp: u64) -> String {
    format!("\"npm-{variant}-{stamp}-{}\"", scope(repo))
}

/// Eight hex digits naming what a stamp counts within: the base URL (documents embed
/// absolute URLs) and the repository's creation. Stamps start over in a repository
/// created again (in a new cluster, say, at the same URL): without its creation time in
/// the ETag, a client's cached document of the old one would be confirmed as current.
fn scope(repo: &dyn Registry) -> String {
    let r = repo.repository();
    hex8(&format!("{} {}", r.base_url, r.created_ms))
}

/// Eight hex digits of SHA-256: a short, stable fingerprint for ETags.
fn hex8(s: &str) -> String {
    hex::encode(&Sha256::digest(s.as_bytes())[..4])
}

/// Unix milliseconds as ISO-8601 with milliseconds and `Z`, as npm's `time` fields.
pub(crate) fn iso8601(ms: i64) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use granary_format::model::{
        AssetRecord, Hashes, OriginRestrictions, PackageKey, VersionStatus,
    };
    use serde_json::json;

    use super::*;

    fn version(v: &str, status: VersionStatus) -> VersionRecord {
        VersionRecord {
            version: v.to_owned(),
            revision: "r".into(),
            status,
            published_ms: 1_700_000_000_123,
            modified_ms: 1_700_000_000_123,
            origin: Default::default(),
            summary: Default::default(),
            metadata: json!({"name": "x", "version": v, "readme": "hi",
                "scripts": {"postinstall": "node x"}}),
            assets: vec![AssetRecord {
                name: format!("x-{v}.tgz"),
                size: 3,
                hashes: Hashes {
                    md5: "00".into(),
                    sha1: "a9993e364706816aba3e25717850c26c9cd0d89d".into(),
                    sha256: "ab".into(),
                    sha512: "ddaf".into(),
                },
            }],
            remote: Vec::new(),
        }
    }

    fn record(tags: &[(&str, &str)]) -> PackageRecord {
        PackageRecord {
            key: PackageKey::new(None, "x"),
            created_ms: 0,
            modified_ms: 1_700_000_000_000,
            stamp: 7,
            tags: tags
                .iter()
                .map(|(t, v)| ((*t).to_owned(), (*v).to_owned()))
                .collect(),
            origin: OriginRestrictions::PUBLISHED_FIRST,
        }
    }

    #[test]
    fn time_format() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn latest_falls_back_to_highest_release() {
        let vs = [
            version("1.10.0", VersionStatus::Published),
            version("1.2.0", VersionStatus::Published),
            version("2.0.0-rc.1", VersionStatus::Published),
            version("3.0.0", VersionStatus::Unlisted),
        ];
        let listed = listed_sorted(&vs);
        let order: Vec<_> = listed.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(order, ["1.2.0", "1.10.0", "2.0.0-rc.1"]);
        let tags = effective_tags(
            &record(&[("next", "3.0.0"), ("beta", "2.0.0-rc.1")]),
            &listed,
        );
        assert_eq!(tags["latest"], "1.10.0");
        assert_eq!(tags["beta"], "2.0.0-rc.1");
        assert!(
            !tags.contains_key("next"),
            "tags of unlisted versions are hidden"
        );
        let pre = [version("1.0.0-a", VersionStatus::Published)];
        assert_eq!(
            effective_tags(&record(&[]), &listed_sorted(&pre))["latest"],
            "1.0.0-a"
        );
    }

    #[test]
    fn documents() {
        let name = PackageName::parse("x").unwrap();
        let vs = [version("1.0.0", VersionStatus::Published)];
        let full = render_full("http://h/npm/d/r/", &name, &record(&[]), &vs)
            .unwrap()
            .unwrap();
        let full: Value = serde_json::from_slice(&full).unwrap();
        assert_eq!(full["readme"], "hi");
        assert!(full["versions"]["1.0.0"].get("readme").is_none());
        assert_eq!(
            full["versions"]["1.0.0"]["dist"]["tarball"],
            "http://h/npm/d/r/x/-/x-1.0.0.tgz"
        );
        assert!(
            full["versions"]["1.0.0"]["dist"]["integrity"]
                .as_str()
                .unwrap()
                .starts_with("sha512-")
        );
        assert_eq!(full["time"]["1.0.0"], "2023-11-14T22:13:20.123Z");
        let abbr = render_abbreviated("http://h/npm/d/r/", &name, &record(&[]), &vs)
            .unwrap()
            .unwrap();
        let abbr: Value = serde_json::from_slice(&abbr).unwrap();
        assert_eq!(abbr["versions"]["1.0.0"]["hasInstallScript"], true);
        assert!(abbr["versions"]["1.0.0"].get("scripts").is_none());
        assert_eq!(abbr["modified"], "2023-11-14T22:13:20.000Z");
        let none = [version("1.0.0", VersionStatus::Archived)];
        assert!(
            render_full("http://h/", &name, &record(&[]), &none)
                .unwrap()
                .is_none()
        );
    }
}
