//! ListPackages, DescribePackage, ListPackageVersions, DescribePackageVersion,
//! ListPackageVersionAssets, GetPackageVersionAsset, PutPackageOriginConfiguration.

use std::cmp::Ordering;

use granary_format::Body;
use granary_format::model::{
    Allow, OriginRestrictions, PackageKey, PackageRecord, VersionRecord, VersionStatus,
};
use http::Response;
use serde_json::{Value, json};

use super::error::{field, not_found};
use super::tokens::FORMATS;
use super::{ApiError, ApiRequest, epoch, int_param, ok_json, ok_page, paginate};
use crate::node::Node;
use crate::state::command::{Command, CommandResult, PackageTarget, ResourceKind};
use crate::state::model::{DomainRecord, RepositoryRecord};

/// Validates a package coordinate component (`[^#/\s]+`, 1–255 characters).
fn component<'a>(v: &'a str, what: &str) -> Result<&'a str, ApiError> {
    if v.is_empty()
        || v.chars().count() > 255
        || v.chars().any(|c| c == '#' || c == '/' || c.is_whitespace())
    {
        return Err(field(format!(
            "Value '{v}' at '{what}' failed to satisfy constraint: Member must satisfy regular expression pattern: [^#/\\s]+"
        )));
    }
    Ok(v)
}

fn format_param<'a>(req: &'a ApiRequest<'_>, required: bool) -> Result<Option<&'a str>, ApiError> {
    let f = if required {
        Some(req.required("format")?)
    } else {
        req.q("format")
    };
    if let Some(f) = f
        && !FORMATS.contains(&f)
    {
        return Err(field(format!(
            "Value '{f}' at 'format' failed to satisfy constraint: Member must satisfy enum value set: {FORMATS:?}"
        )));
    }
    Ok(f)
}

struct Target {
    domain: DomainRecord,
    repo: RepositoryRecord,
    format: String,
    key: PackageKey,
    package: PackageRecord,
}

fn display(key: &PackageKey) -> String {
    match &key.namespace {
        Some(ns) => format!("{ns}/{}", key.name),
        None => key.name.clone(),
    }
}

/// The repository, format and package a request names (`format`, `namespace`, `package`).
fn coordinates(
    req: &ApiRequest<'_>,
) -> Result<(DomainRecord, RepositoryRecord, String, PackageKey), ApiError> {
    let (domain, repo) = req.repository()?;
    let format = format_param(req, true)?.unwrap_or_default().to_owned();
    let namespace = req
        .q("namespace")
        .map(|n| component(n, "namespace"))
        .transpose()?;
    let name = component(req.required("package")?, "package")?;
    Ok((domain, repo, format, PackageKey::new(namespace, name)))
}

fn package_target(req: &ApiRequest<'_>) -> Result<Target, ApiError> {
    let (domain, repo, format, key) = coordinates(req)?;
    let package = req
        .node
        .state
        .package(&domain.name, &repo.name, &format, &key)?
        .ok_or_else(|| not_found(ResourceKind::Package, &display(&key)))?;
    Ok(Target {
        domain,
        repo,
        format,
        key,
        package,
    })
}

fn version_of(req: &ApiRequest<'_>, t: &Target) -> Result<std::sync::Arc<VersionRecord>, ApiError> {
    let v = component(req.required("version")?, "packageVersion")?;
    req.node
        .state
        .version(&t.domain.name, &t.repo.name, &t.format, &t.key, v)?
        .ok_or_else(|| {
            not_found(
                ResourceKind::PackageVersion,
                &format!("{}@{v}", display(&t.key)),
            )
        })
}

/// PutPackageOriginConfiguration: sets a package's origin controls; the package need
/// not have a version yet (protecting a name before its first publish).
pub(super) async fn put_origin_configuration(
    req: &ApiRequest<'_>,
) -> Result<Response<Body>, ApiError> {
    let (domain, repo, format, key) = coordinates(req)?;
    let body = req.json()?;
    let restrictions = body
        .get("restrictions")
        .and_then(Value::as_object)
        .ok_or_else(|| field("restrictions is required"))?;
    let allow = |k: &str| -> Result<Allow, ApiError> {
        match restrictions.get(k).and_then(Value::as_str) {
            Some("ALLOW") => Ok(Allow::Allow),
            Some("BLOCK") => Ok(Allow::Block),
            Some(other) => Err(field(format!(
                "Value '{other}' at 'restrictions.{k}' failed to satisfy constraint: Member must satisfy enum value set: [ALLOW, BLOCK]"
            ))),
            None => Err(field(format!("restrictions.{k} is required"))),
        }
    };
    let restrictions = OriginRestrictions {
        publish: allow("publish")?,
        upstream: allow("upstream")?,
    };
    let cmd = Command::PutPackageOrigin {
        target: PackageTarget {
            domain: domain.name.clone(),
            repository: repo.name.clone(),
            format,
            package: key,
        },
        restrictions,
        now_ms: Node::now_ms(),
    };
    match req.node.propose(cmd).await? {
        CommandResult::Failed(e) => Err(e.into()),
        _ => ok_json(json!({ "originConfiguration": {
            "restrictions": {
                "publish": restrictions.publish.as_str(),
                "upstream": restrictions.upstream.as_str(),
            }
        }})),
    }
}

fn origin_config(p: &PackageRecord) -> Value {
    json!({ "restrictions": { "publish": p.origin.publish.as_str(), "upstream": p.origin.upstream.as_str() } })
}

fn with_namespace(mut v: Value, key: &PackageKey) -> Value {
    if let Some(ns) = &key.namespace {
        v["namespace"] = json!(ns);
    }
    v
}

fn version_origin(v: &VersionRecord, repo: &str) -> Value {
    let mut entry = json!({});
    match &v.origin.external_connection {
        Some(c) => entry["externalConnectionName"] = json!(c),
        None => entry["repositoryName"] = json!(v.origin.repository.as_deref().unwrap_or(repo)),
    }
    json!({ "domainEntryPoint": entry, "originType": v.origin.origin_type.as_str() })
}

/// Version order: SemVer when both parse, otherwise by string.
fn compare_versions(a: &str, b: &str) -> Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

pub(super) fn list_packages(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let format = format_param(req, false)?;
    let namespace = req
        .q("namespace")
        .map(|n| component(n, "namespace"))
        .transpose()?;
    let prefix = req
        .q("package-prefix")
        .map(|p| component(p, "packagePrefix"))
        .transpose()?;
    let publish = req.q("publish");
    let upstream = req.q("upstream");
    for (name, v) in [("publish", publish), ("upstream", upstream)] {
        if let Some(v) = v
            && v != "ALLOW"
            && v != "BLOCK"
        {
            return Err(field(format!("{name} must be ALLOW or BLOCK")));
        }
    }
    let packages: Vec<(String, PackageRecord)> = req
        .node
        .state
        .packages(&d.name, &r.name, format)?
        .into_iter()
        .filter(|(_, p)| namespace.is_none_or(|n| p.key.namespace.as_deref() == Some(n)))
        .filter(|(_, p)| prefix.is_none_or(|pre| p.key.name.starts_with(pre)))
        .filter(|(_, p)| publish.is_none_or(|v| p.origin.publish.as_str() == v))
        .filter(|(_, p)| upstream.is_none_or(|v| p.origin.upstream.as_str() == v))
        .collect();
    let (page, next) = paginate(
        packages,
        int_param(req, "max-results")?,
        req.q("next-token"),
        1000,
    )?;
    let list: Vec<Value> = page
        .iter()
        .map(|(f, p)| {
            with_namespace(
                json!({ "format": f, "package": p.key.name, "originConfiguration": origin_config(p) }),
                &p.key,
            )
        })
        .collect();
    let out = json!({ "packages": list });
    ok_page(out, next)
}

pub(super) fn describe_package(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let t = package_target(req)?;
    let v = with_namespace(
        json!({ "format": t.format, "name": t.key.name, "originConfiguration": origin_config(&t.package) }),
        &t.key,
    );
    ok_json(json!({ "package": v }))
}

fn parse_status(s: &str) -> Result<Option<VersionStatus>, ApiError> {
    Ok(Some(match s {
        "Published" => VersionStatus::Published,
        "Unfinished" => VersionStatus::Unfinished,
        "Unlisted" => VersionStatus::Unlisted,
        "Archived" => VersionStatus::Archived,
        "Disposed" => VersionStatus::Disposed,
        // Deleted versions have no record left to list.
        "Deleted" => return Ok(None),
        other => return Err(field(format!("'{other}' is not a package version status"))),
    }))
}

pub(super) fn list_versions(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let t = package_target(req)?;
    let status = req.q("status").map(parse_status).transpose()?;
    let origin = req.q("originType");
    if let Some(o) = origin
        && !["INTERNAL", "EXTERNAL", "UNKNOWN"].contains(&o)
    {
        return Err(field("originType must be INTERNAL, EXTERNAL or UNKNOWN"));
    }
    let mut versions: Vec<VersionRecord> = req
        .node
        .state
        .versions(&t.domain.name, &t.repo.name, &t.format, &t.key)?
        .into_iter()
        .filter(|v| match status {
            None => true,
            Some(None) => false,
            Some(Some(s)) => v.status == s,
        })
        .filter(|v| origin.is_none_or(|o| v.origin.origin_type.as_str() == o))
        .collect();
    match req.q("sortBy") {
        None => versions.sort_by(|a, b| compare_versions(&a.version, &b.version)),
        Some("PUBLISHED_TIME") => versions.sort_by_key(|v| std::cmp::Reverse(v.published_ms)),
        Some(other) => {
            return Err(field(format!(
                "'{other}' is not a sort type; use PUBLISHED_TIME"
            )));
        }
    }
    let default_display = t.package.tags.get("latest").cloned().or_else(|| {
        versions
            .iter()
            .filter(|v| v.status == VersionStatus::Published)
            .max_by(|a, b| compare_versions(&a.version, &b.version))
            .map(|v| v.version.clone())
    });
    let (page, next) = paginate(
        versions,
        int_param(req, "max-results")?,
        req.q("next-token"),
        1000,
    )?;
    let list: Vec<Value> = page
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "revision": v.revision,
                "status": v.status.as_str(),
                "origin": version_origin(v, &t.repo.name),
            })
        })
        .collect();
    let mut out = with_namespace(
        json!({ "format": t.format, "package": t.key.name, "versions": list }),
        &t.key,
    );
    if let Some(d) = default_display {
        out["defaultDisplayVersion"] = json!(d);
    }
    ok_page(out, next)
}

pub(super) fn describe_version(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let t = package_target(req)?;
    let v = version_of(req, &t)?;
    let s = &v.summary;
    let mut out = with_namespace(
        json!({
            "format": t.format,
            "packageName": t.key.name,
            "displayName": s.display_name.clone().unwrap_or_else(|| t.key.name.clone()),
            "version": v.version,
            "publishedTime": epoch(v.published_ms),
            "licenses": s.licenses.iter().map(|l| json!({ "name": l })).collect::<Vec<_>>(),
            "revision": v.revision,
            "status": v.status.as_str(),
            "origin": version_origin(&v, &t.repo.name),
        }),
        &t.key,
    );
    for (k, val) in [
        ("summary", &s.summary),
        ("homePage", &s.home_page),
        ("sourceCodeRepository", &s.source_code_repository),
    ] {
        if let Some(val) = val {
            out[k] = json!(val);
        }
    }
    ok_json(json!({ "packageVersion": out }))
}

pub(super) fn list_assets(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let t = package_target(req)?;
    let v = version_of(req, &t)?;
    let assets: Vec<Value> = v
        .assets
        .iter()
        .map(|a| {
            json!({
                "name": a.name,
                "size": a.size,
                "hashes": {
                    "MD5": a.hashes.md5,
                    "SHA-1": a.hashes.sha1,
                    "SHA-256": a.hashes.sha256,
                    "SHA-512": a.hashes.sha512,
                },
            })
        })
        .collect();
    let (page, next) = paginate(
        assets,
        int_param(req, "max-results")?,
        req.q("next-token"),
        1000,
    )?;
    let out = with_namespace(
        json!({
            "format": t.format,
            "package": t.key.name,
            "version": v.version,
            "versionRevision": v.revision,
            "assets": page,
        }),
        &t.key,
    );
    ok_page(out, next)
}

pub(super) fn get_asset(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let t = package_target(req)?;
    let v = version_of(req, &t)?;
    let asset_name = req.required("asset")?;
    if asset_name.is_empty()
        || asset_name.chars().count() > 255
        || asset_name.chars().any(char::is_control)
    {
        return Err(field("asset must be 1-255 printable characters"));
    }
    if let Some(rev) = req.q("revision")
        && rev != v.revision
    {
        return Err(not_found(
            ResourceKind::PackageVersion,
            &format!("{}@{} revision {rev}", display(&t.key), v.version),
        ));
    }
    let asset = v
        .asset(asset_name)
        .filter(|_| v.status.is_downloadable())
        .ok_or_else(|| not_found(ResourceKind::Asset, asset_name))?;
    let (info, body) = req.node.blobs.open(&asset.hashes.sha256)?.ok_or_else(|| {
        ApiError::Internal(format!(
            "blob {} of asset {asset_name} is missing",
            asset.hashes.sha256
        ))
    })?;
    Response::builder()
        .status(200)
        .header("content-type", "application/octet-stream")
        .header("content-length", info.size)
        .header("x-assetname", asset_name)
        .header("x-packageversion", &v.version)
        .header("x-packageversionrevision", &v.revision)
        .body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}
