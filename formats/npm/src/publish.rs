//! The write side: publish, document updates (deprecate, unpublish one version),
//! unpublish, tarball delete and dist-tag changes.
//!
//! ```text
//!   PUT {name} ─stream::scan─┬─ skeleton ─▶ _attachments? ──yes─▶ publish:
//!        │                   │     validate names, SemVer, one version and attachment,
//!        │                   │     not a duplicate (as this node has it), base64, length,
//!        │                   │     gzip magic
//!        │                   │       ─pass─▶ end the tarball's body ─▶ BlobInfo ─▶ shasum,
//!        │                   │               integrity, not a duplicate (caught up), tags
//!        │                   │               ─▶ publish(NewVersion) ─▶ 201
//!        │                   │       ─fail─▶ cut the tarball's body short ─▶ 4xx
//!        │                   └─ tarball ─▶ store_blob, while the body streams in
//!        └──────── no ─▶ document update: `deprecated` changes ─▶ ReplaceMetadata
//!   PUT {name}/-rev/{rev}   same, and versions missing from the body ─▶ DeleteVersion,
//!                           moved dist-tags ─▶ SetTag
//! ```
//!
//! A publish never holds its tarball in memory: `stream` decodes it into the blob store
//! while the rest of the document is scanned. The tarball's body ends only once every
//! check that does not need its digests has passed; a publish refused by those checks
//! cuts the body short and stores nothing. The checks against the repository's state read
//! this node's state as it is, without waiting for the request to catch up with the
//! cluster, and are decided again with linearizable reads once the tarball is stored.
//! The digests come from the store, so a publish refused for a `shasum` or `integrity`
//! mismatch leaves a stored blob that no metadata names, as does one refused only by
//! that second look (a version published through another node a moment before). The
//! stored manifest is the client's version object with our own `_id`, `_npmUser` and
//! `dist` (`shasum`, `integrity`); `dist.tarball` is added when serving.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::future;
use http::{Response, StatusCode};
use http_body::Body as _;
use serde_json::Value;

use granary_format::model::{
    AssetRecord, BlobInfo, Hashes, NewVersion, PackageChange, PackageKey, VersionRecord,
    VersionStatus, VersionSummary,
};
use granary_format::{Body, FormatError, Registry};

use crate::error::{cannot_publish_over, from_registry, internal, not_found};
use crate::model::{self, Attachment, Object, OkBody, PackageDocument};
use crate::packument::{listed_sorted, revision};
use crate::reply;
use crate::stream::{self, Scanned, Tarball, TarballSender};
use crate::validate::{self, PackageName};

/// The largest dist-tag body (a JSON string holding a version).
const TAG_BODY_LIMIT: usize = 64 * 1024;

/// The tag a publish gets when the body names none.
const LATEST: &str = "latest";

/// `PUT {name}` (`rev` is `None`) and `PUT {name}/-rev/{rev}`.
///
/// The body is scanned ([`stream::scan`]) and its tarball, if any, stored while it
/// arrives: the scan with the checks after it, and the store, run side by side.
pub(crate) async fn put_package(
    repo: &dyn Registry,
    name: &PackageName,
    rev: Option<&str>,
    body: Body,
    limit: usize,
) -> Result<Response<Body>, FormatError> {
    let (sender, receiver) = stream::tarball_channel();
    // The tarball is base64 inside the body: it decodes to at most 3 bytes in 4.
    let tarball_at_most = body.size_hint().upper().map(|len| len / 4 * 3 + 3);
    let (prepared, stored) = future::join(
        prepare(repo, name, body, limit, sender),
        stream::store_tarball(repo, receiver, tarball_at_most),
    )
    .await;
    // The document's errors come first: they are why a tarball's body was cut short.
    match prepared? {
        Prepared::Update(doc) => update_document(repo, name, &doc, rev.is_some()).await,
        Prepared::Publish(checked) => {
            let info = stored?.ok_or_else(|| internal("a checked tarball was not stored"))?;
            complete_publish(repo, name, checked, info).await
        }
    }
}

/// What a scanned and checked `PUT {name}` body asks for.
enum Prepared {
    /// A document without attachments.
    Update(PackageDocument),
    /// A new version, checked but for its digests.
    Publish(CheckedPublish),
}

/// A publish that passed every check but those of the tarball's digests.
struct CheckedPublish {
    key: PackageKey,
    version: String,
    manifest: Object,
    /// The tags the body asks for (`latest` is added once the package is read again).
    tags: Vec<String>,
    /// Decoded size of the tarball.
    size: u64,
}

/// Scans the body and checks it; then ends the tarball's body if this is a publish that
/// passed, and cuts it short otherwise, so that the store keeps nothing for a refused
/// publish (or for a document update, which has no tarball).
async fn prepare(
    repo: &dyn Registry,
    name: &PackageName,
    body: Body,
    limit: usize,
    mut tarball: TarballSender,
) -> Result<Prepared, FormatError> {
    let result = scan_and_check(repo, name, body, limit, &mut tarball).await;
    match &result {
        Ok(Prepared::Publish(_)) => tarball.finish().await,
        Ok(Prepared::Update(_)) | Err(_) => tarball.abort(),
    }
    result
}

/// The scan, then the checks that need no digest of the tarball.
async fn scan_and_check(
    repo: &dyn Registry,
    name: &PackageName,
    body: Body,
    limit: usize,
    tarball: &mut TarballSender,
) -> Result<Prepared, FormatError> {
    let scanned = stream::scan(body, limit, tarball).await?;
    let doc: PackageDocument = serde_json::from_slice(&scanned.skeleton)
        .map_err(|e| FormatError::BadRequest(format!("invalid package document: {e}")))?;
    let full = name.full();
    for (field, value) in [("_id", &doc.id), ("name", &doc.name)] {
        if let Some(value) = value
            && *value != full
        {
            return Err(FormatError::BadRequest(format!(
                "{field} {value:?} does not match the package name {full:?} in the URL"
            )));
        }
    }
    match &doc.attachments {
        Some(attachments) if !attachments.is_empty() => check_publish(repo, name, &doc, &scanned)
            .await
            .map(Prepared::Publish),
        _ => Ok(Prepared::Update(doc)),
    }
}

/// The checks of a new version that do not need its tarball's digests, in the order the
/// client sees their errors.
async fn check_publish(
    repo: &dyn Registry,
    name: &PackageName,
    doc: &PackageDocument,
    scanned: &Scanned,
) -> Result<CheckedPublish, FormatError> {
    let key = name.key();
    let full = name.full();
    let (version, manifest) = match doc.versions.as_ref().map(|v| v.iter().collect::<Vec<_>>()) {
        Some(v) if v.len() == 1 => v[0],
        _ => return Err(bad("a publish must contain exactly one version")),
    };
    let (file, attachment) = match doc
        .attachments
        .as_ref()
        .map(|a| a.iter().collect::<Vec<_>>())
    {
        // Two `data` strings under one file name reach us as one map entry.
        Some(a) if a.len() == 1 && scanned.data_strings <= 1 => a[0],
        _ => return Err(bad("a publish must contain exactly one attachment")),
    };
    validate::parse_version(version)?;
    if let Some(inner) = model::str_field(manifest, "name")
        && inner != full
    {
        return Err(bad(format!(
            "versions[{version:?}].name {inner:?} does not match the package name {full:?}"
        )));
    }
    if let Some(inner) = manifest.get("version")
        && inner.as_str() != Some(version.as_str())
    {
        return Err(bad(format!(
            "versions[{version:?}].version does not match its key"
        )));
    }
    if name.version_of_file(file) != Some(version.as_str()) {
        return Err(bad(format!(
            "attachment {file:?} is not the tarball of {full}@{version}"
        )));
    }

    // Against this node's state as it is now: waiting here for the request to catch up
    // with the cluster would hold the tarball back from the store until then (on a
    // follower, a round to the leader and the wait to apply what it had). The same checks
    // are decided with linearizable reads before the version is proposed
    // (`complete_publish`), and a refusal seen here is confirmed with them first: a
    // version deleted elsewhere a moment ago may be published again.
    if state_checks(repo, name, version, Reads::Now).await.is_err() {
        state_checks(repo, name, version, Reads::Linearizable).await?;
    }
    let tags = sent_tags(doc, version)?;
    // `data` was a string only if the scanner saw one; otherwise the skeleton's parse
    // already refused the document.
    let tarball = scanned.tarball.clone().unwrap_or_default();
    check_tarball(attachment, &tarball)?;
    Ok(CheckedPublish {
        key,
        version: version.clone(),
        manifest: manifest.clone(),
        tags,
        size: tarball.size,
    })
}

/// Which state a check reads.
#[derive(Clone, Copy)]
enum Reads {
    /// This node's, as it is now ([`Registry::package_now`]).
    Now,
    /// Every change acknowledged before the request began ([`Registry::package`]).
    Linearizable,
}

/// The checks of a new version against the repository's state: a new package's name
/// rules, and no version over an existing (or deleted) one. Returns the package record.
async fn state_checks(
    repo: &dyn Registry,
    name: &PackageName,
    version: &str,
    reads: Reads,
) -> Result<Option<granary_format::model::PackageRecord>, FormatError> {
    let key = name.key();
    let (existing, stored) = match reads {
        Reads::Now => (
            repo.package_now(&key).await?,
            repo.version_now(&key, version).await?,
        ),
        Reads::Linearizable => (
            repo.package(&key).await?,
            repo.version(&key, version).await?,
        ),
    };
    if existing.is_none() {
        name.check_new()?;
    }
    if stored.is_some() {
        return Err(cannot_publish_over(version));
    }
    Ok(existing)
}

/// The rest of a publish, once its tarball is stored: digests, then the version.
async fn complete_publish(
    repo: &dyn Registry,
    name: &PackageName,
    checked: CheckedPublish,
    info: BlobInfo,
) -> Result<Response<Body>, FormatError> {
    let CheckedPublish {
        key,
        version,
        manifest,
        tags,
        size,
    } = checked;
    if info.size != size {
        return Err(internal(format!(
            "blob store returned {} bytes for a tarball of {size} bytes",
            info.size
        )));
    }
    // The digests are known only now that the tarball is stored (hashing it a second
    // time while it streams would double the CPU cost of every publish). A publish
    // refused here leaves that blob unreferenced: no metadata names it, so no client can
    // see or download it, and what is not referenced is the blob store's to collect.
    let hashes = info.hashes;
    check_digests(&manifest, &hashes)?;
    // Decided again now that the request has caught up (the round ran while the tarball
    // was stored): a publish that raced another through a second node is refused here,
    // and `latest` is added only if the package still has none.
    let existing = state_checks(repo, name, &version, Reads::Linearizable).await?;
    let tags = with_latest(tags, existing.as_ref().map(|p| &p.tags));

    let full = name.full();
    let summary = summary(&full, &manifest);
    let metadata = stored_manifest(&full, &version, &manifest, &hashes, repo);
    repo.publish(NewVersion {
        package: key,
        version: version.clone(),
        summary,
        metadata,
        assets: vec![AssetRecord {
            name: name.tarball_file(&version),
            size,
            hashes,
        }],
        tags,
    })
    .await
    .map_err(from_registry)?;
    reply::json(
        StatusCode::CREATED,
        &OkBody {
            success: Some(true),
            ..OkBody::ok()
        },
        false,
    )
}

/// The tags a publish's body asks for: its `dist-tags` that point at this version
/// (libnpmpublish sends `{<--tag or latest>: version}`).
fn sent_tags(doc: &PackageDocument, version: &str) -> Result<Vec<String>, FormatError> {
    let mut tags = Vec::new();
    for (tag, target) in doc.dist_tags.iter().flatten() {
        if target == version {
            validate::check_tag(tag)?;
            tags.push(tag.clone());
        }
    }
    Ok(tags)
}

/// The tags of a publish: those it asked for, plus `latest` when it asked for none or
/// while the package has none, so the packument always has one.
fn with_latest(mut tags: Vec<String>, existing: Option<&BTreeMap<String, String>>) -> Vec<String> {
    let has_latest = existing.is_some_and(|t| t.contains_key(LATEST));
    if (tags.is_empty() || !has_latest) && !tags.iter().any(|t| t == LATEST) {
        tags.push(LATEST.to_owned());
    }
    tags
}

/// The tarball as the scanner decoded it: valid base64, of the declared length, gzip.
fn check_tarball(attachment: &Attachment, tarball: &Tarball) -> Result<(), FormatError> {
    if let Some(e) = &tarball.invalid_base64 {
        return Err(bad(format!("attachment data is not valid base64: {e}")));
    }
    if let Some(length) = attachment.length
        && length != tarball.size
    {
        return Err(bad(format!(
            "attachment length {length} does not match the decoded tarball ({} bytes)",
            tarball.size
        )));
    }
    if !tarball.gzip {
        return Err(bad("attachment is not a gzip-compressed tarball"));
    }
    Ok(())
}

/// `dist.shasum` (SHA-1 hex) and every SHA-1/256/512 entry of `dist.integrity` (SRI) must
/// match the tarball.
fn check_digests(manifest: &Object, hashes: &Hashes) -> Result<(), FormatError> {
    let Some(Value::Object(dist)) = manifest.get("dist") else {
        return Ok(());
    };
    if let Some(shasum) = model::str_field(dist, "shasum")
        && !shasum.eq_ignore_ascii_case(&hashes.sha1)
    {
        return Err(bad(format!(
            "shasum mismatch: dist.shasum is {shasum}, the tarball's SHA-1 is {}",
            hashes.sha1
        )));
    }
    if let Some(integrity) = model::str_field(dist, "integrity") {
        for entry in integrity.split_whitespace() {
            let Some((algorithm, digest)) = entry.split_once('-') else {
                return Err(bad(format!("malformed dist.integrity entry {entry:?}")));
            };
            let expected = match algorithm {
                "sha512" => &hashes.sha512,
                "sha256" => &hashes.sha256,
                "sha1" => &hashes.sha1,
                _ => continue,
            };
            // SRI allows `?options` after the digest.
            let digest = digest.split('?').next().unwrap_or_default();
            let matches = BASE64
                .decode(digest)
                .is_ok_and(|raw| hex::encode(raw) == *expected);
            if !matches {
                return Err(bad(format!(
                    "integrity mismatch: dist.integrity {algorithm} does not match the tarball"
                )));
            }
        }
    }
    Ok(())
}

/// The manifest we store: the client's, with our `_id`, `_npmUser` and `dist`.
fn stored_manifest(
    full: &str,
    version: &str,
    manifest: &Object,
    hashes: &Hashes,
    repo: &dyn Registry,
) -> Value {
    let mut m = manifest.clone();
    m.insert("_id".into(), Value::String(format!("{full}@{version}")));
    m.insert("name".into(), Value::String(full.to_owned()));
    m.insert("version".into(), Value::String(version.to_owned()));
    if model::deprecation(&m).is_none() {
        m.remove("deprecated");
    }
    let mut user = Object::new();
    user.insert("name".into(), Value::String(repo.caller().username.clone()));
    // `npm view` prints `name <email>` and shows a missing email as "undefined".
    user.insert("email".into(), Value::String(String::new()));
    m.insert("_npmUser".into(), Value::Object(user));
    let mut dist = match m.remove("dist") {
        Some(Value::Object(d)) => d,
        _ => Object::new(),
    };
    dist.remove("tarball");
    dist.insert("shasum".into(), Value::String(hashes.sha1.clone()));
    dist.insert(
        "integrity".into(),
        Value::String(format!(
            "sha512-{}",
            BASE64.encode(hex::decode(&hashes.sha512).unwrap_or_default())
        )),
    );
    m.insert("dist".into(), Value::Object(dist));
    Value::Object(m)
}

/// What CodeArtifact's API shows for the version.
pub(crate) fn summary(full: &str, manifest: &Object) -> VersionSummary {
    VersionSummary {
        display_name: Some(full.to_owned()),
        summary: model::str_field(manifest, "description").map(str::to_owned),
        home_page: model::str_field(manifest, "homepage").map(str::to_owned),
        source_code_repository: model::repository_url(manifest),
        licenses: model::licenses(manifest),
    }
}

/// A document without attachments: `deprecated` changes always; with a `-rev` (the
/// unpublish flow) also deletions of versions missing from the body and moved tags.
/// Fields other than `deprecated`, `versions` and `dist-tags` are ignored (stars, users).
async fn update_document(
    repo: &dyn Registry,
    name: &PackageName,
    doc: &PackageDocument,
    with_rev: bool,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    let record = repo.package(&key).await?.ok_or_else(not_found)?;
    let versions = repo.versions(&key).await?;
    let listed = listed_sorted(&versions);

    let mut metadata_changes = Vec::new();
    let mut deletions: Vec<&str> = Vec::new();
    if let Some(body_versions) = &doc.versions {
        for v in &listed {
            match body_versions.get(&v.version) {
                Some(sent) => {
                    if let Some(metadata) = deprecation_change(v, sent) {
                        metadata_changes.push(PackageChange::ReplaceMetadata {
                            version: v.version.clone(),
                            metadata,
                        });
                    }
                }
                None if with_rev => deletions.push(&v.version),
                None => {}
            }
        }
    }

    let mut tag_changes = Vec::new();
    if with_rev {
        let sent_tags = doc.dist_tags.clone().unwrap_or_default();
        let remains = |v: &str| listed.iter().any(|l| l.version == v) && !deletions.contains(&v);
        for (tag, target) in &sent_tags {
            if record.tags.get(tag) != Some(target) && remains(target) {
                validate::check_tag(tag)?;
                tag_changes.push(PackageChange::SetTag {
                    tag: tag.clone(),
                    version: target.clone(),
                });
            }
        }
        for (tag, target) in &record.tags {
            let moved = sent_tags.get(tag).is_some_and(|t| remains(t));
            if deletions.contains(&target.as_str()) && !moved {
                tag_changes.push(PackageChange::RemoveTag { tag: tag.clone() });
            }
        }
    }

    let deletions = deletions
        .into_iter()
        .map(|v| PackageChange::DeleteVersion {
            version: v.to_owned(),
        })
        .collect::<Vec<_>>();
    for change in tag_changes
        .into_iter()
        .chain(metadata_changes)
        .chain(deletions)
    {
        repo.change(&key, change).await.map_err(from_registry)?;
    }
    ok_with_rev(repo, name, &key, StatusCode::OK).await
}

/// The new manifest when the body's `deprecated` differs from the stored one.
fn deprecation_change(stored: &VersionRecord, sent: &Object) -> Option<Value> {
    let Value::Object(current) = &stored.metadata else {
        return None;
    };
    let wanted = model::deprecation(sent);
    if model::deprecation(current) == wanted {
        return None;
    }
    let mut updated = current.clone();
    match wanted {
        Some(message) => {
            updated.insert("deprecated".into(), Value::String(message.to_owned()));
        }
        None => {
            updated.remove("deprecated");
        }
    }
    Some(Value::Object(updated))
}

/// `DELETE {name}/-rev/{rev}`: every version that is not already gone.
pub(crate) async fn unpublish_package(
    repo: &dyn Registry,
    name: &PackageName,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    repo.package(&key).await?.ok_or_else(not_found)?;
    for v in repo.versions(&key).await? {
        if v.status != VersionStatus::Disposed {
            repo.change(
                &key,
                PackageChange::DeleteVersion {
                    version: v.version.clone(),
                },
            )
            .await
            .map_err(from_registry)?;
        }
    }
    reply::json(StatusCode::OK, &OkBody::ok(), false)
}

/// `DELETE {name}/-/{file}/-rev/{rev}`: the last step of `npm unpublish pkg@v`, after the
/// document update already deleted the version; deletes it if it is still there.
pub(crate) async fn delete_tarball(
    repo: &dyn Registry,
    name: &PackageName,
    file: &str,
) -> Result<Response<Body>, FormatError> {
    let key = name.key();
    let version = name.version_of_file(file).ok_or_else(not_found)?;
    repo.package(&key).await?.ok_or_else(not_found)?;
    if let Some(v) = repo.version(&key, version).await?
        && v.status != VersionStatus::Disposed
    {
        repo.change(
            &key,
            PackageChange::DeleteVersion {
                version: v.version.clone(),
            },
        )
        .await
        .map_err(from_registry)?;
    }
    reply::json(StatusCode::OK, &OkBody::ok(), false)
}

/// `PUT -/package/{name}/dist-tags/{tag}` with body `"1.0.1"`.
pub(crate) async fn set_dist_tag(
    repo: &dyn Registry,
    name: &PackageName,
    tag: &str,
    body: Body,
) -> Result<Response<Body>, FormatError> {
    validate::check_tag(tag)?;
    let bytes = granary_format::body::read_to_bytes(body, TAG_BODY_LIMIT).await?;
    let version = match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::String(v)) => v,
        Ok(_) => return Err(bad("the body must be a JSON string holding a version")),
        // Tolerate a bare version, as some clients send.
        Err(_) => std::str::from_utf8(&bytes)
            .map_err(|_| bad("the body must be a JSON string holding a version"))?
            .trim()
            .to_owned(),
    };
    let key = name.key();
    repo.package(&key).await?.ok_or_else(not_found)?;
    let listed = repo
        .version(&key, &version)
        .await?
        .is_some_and(|v| v.status.is_listed());
    if !listed {
        return Err(FormatError::NotFound(format!(
            "version not found: {name}@{version}"
        )));
    }
    repo.change(
        &key,
        PackageChange::SetTag {
            tag: tag.to_owned(),
            version,
        },
    )
    .await
    .map_err(from_registry)?;
    ok_with_rev(repo, name, &key, StatusCode::CREATED).await
}

/// `DELETE -/package/{name}/dist-tags/{tag}`.
pub(crate) async fn remove_dist_tag(
    repo: &dyn Registry,
    name: &PackageName,
    tag: &str,
) -> Result<Response<Body>, FormatError> {
    if tag == LATEST {
        return Err(bad("the latest tag cannot be removed"));
    }
    let key = name.key();
    let record = repo.package(&key).await?.ok_or_else(not_found)?;
    if !record.tags.contains_key(tag) {
        return Err(FormatError::NotFound(format!(
            "{tag} is not a dist-tag on {name}"
        )));
    }
    repo.change(
        &key,
        PackageChange::RemoveTag {
            tag: tag.to_owned(),
        },
    )
    .await
    .map_err(from_registry)?;
    ok_with_rev(repo, name, &key, StatusCode::OK).await
}

/// `{"ok": true, "id": name, "rev": <new rev>}`.
async fn ok_with_rev(
    repo: &dyn Registry,
    name: &PackageName,
    key: &PackageKey,
    status: StatusCode,
) -> Result<Response<Body>, FormatError> {
    let rev = repo
        .package(key)
        .await?
        .map(|record| revision(name, &record));
    reply::json(
        status,
        &OkBody {
            id: Some(name.full()),
            rev,
            ..OkBody::ok()
        },
        false,
    )
}

fn bad(message: impl Into<String>) -> FormatError {
    FormatError::BadRequest(message.into())
}

#[cfg(test)]
mod tests {
    use granary_format::hashing::hash_bytes;
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> Object {
        match v {
            Value::Object(m) => m,
            _ => Object::new(),
        }
    }

    fn doc(tags: Value) -> PackageDocument {
        serde_json::from_value(json!({"dist-tags": tags})).unwrap()
    }

    fn publish_tags(
        doc: &PackageDocument,
        version: &str,
        existing: Option<&BTreeMap<String, String>>,
    ) -> Result<Vec<String>, FormatError> {
        Ok(with_latest(sent_tags(doc, version)?, existing))
    }

    #[test]
    fn tags_of_a_publish() {
        let existing: BTreeMap<String, String> = [("latest".into(), "1.0.0".into())].into();
        assert_eq!(
            publish_tags(&doc(json!({"latest": "1.1.0"})), "1.1.0", Some(&existing)).unwrap(),
            ["latest"]
        );
        assert_eq!(
            publish_tags(&doc(json!({"next": "1.1.0"})), "1.1.0", Some(&existing)).unwrap(),
            ["next"]
        );
        assert_eq!(
            publish_tags(&doc(json!({"beta": "0.1.0"})), "0.1.0", None).unwrap(),
            ["beta", "latest"]
        );
        assert_eq!(
            publish_tags(&doc(json!({})), "0.1.0", Some(&existing)).unwrap(),
            ["latest"]
        );
        assert!(publish_tags(&doc(json!({"1.x": "0.1.0"})), "0.1.0", None).is_err());
    }

    #[test]
    fn digests() {
        let hashes = hash_bytes(b"abc");
        let sha512 = BASE64.encode(hex::decode(&hashes.sha512).unwrap());
        let sha1 = BASE64.encode(hex::decode(&hashes.sha1).unwrap());
        let ok = object(json!({"dist": {
            "shasum": hashes.sha1.to_uppercase(),
            "integrity": format!("sha512-{sha512} sha1-{sha1} sha384-ignored")
        }}));
        assert!(check_digests(&ok, &hashes).is_ok());
        let bad_sha1 = object(json!({"dist": {"shasum": "00"}}));
        assert!(check_digests(&bad_sha1, &hashes).is_err());
        let bad_sri = object(json!({"dist": {"integrity": "sha512-AAAA"}}));
        assert!(check_digests(&bad_sri, &hashes).is_err());
        let garbage = object(json!({"dist": {"integrity": "nonsense"}}));
        assert!(check_digests(&garbage, &hashes).is_err());
    }

    #[test]
    fn tarball_checks() {
        let attachment = |length| Attachment {
            data: String::new(),
            length,
        };
        let gz = Tarball {
            size: 4,
            invalid_base64: None,
            gzip: true,
        };
        assert!(check_tarball(&attachment(Some(4)), &gz).is_ok());
        assert!(check_tarball(&attachment(None), &gz).is_ok());
        let wrong_len = check_tarball(&attachment(Some(5)), &gz).unwrap_err();
        assert_eq!(
            wrong_len.to_string(),
            "attachment length 5 does not match the decoded tarball (4 bytes)"
        );
        let not_gzip = Tarball {
            gzip: false,
            ..gz.clone()
        };
        assert_eq!(
            check_tarball(&attachment(None), &not_gzip)
                .unwrap_err()
                .to_string(),
            "attachment is not a gzip-compressed tarball"
        );
        // Base64 errors come first, then the length, then the gzip magic.
        let not_b64 = Tarball {
            invalid_base64: Some("Invalid symbol 33, offset 0.".into()),
            ..not_gzip
        };
        assert_eq!(
            check_tarball(&attachment(Some(5)), &not_b64)
                .unwrap_err()
                .to_string(),
            "attachment data is not valid base64: Invalid symbol 33, offset 0."
        );
    }
}
