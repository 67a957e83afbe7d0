//! Reading a public npm registry's packument (external connection `public:npmjs`).
//!
//! ```text
//!   GET {connection}{@scope%2fname}  ──▶  parse_packument
//!        dist-tags ─▶ tags            versions[v] ─▶ VersionRecord (origin External)
//!        time[v]   ─▶ published_ms       metadata: the manifest without dist.tarball
//!                                        remote:   [{name: pkg-v.tgz, url: dist.tarball,
//!                                                    sha1: shasum, sha512: integrity}]
//! ```
//!
//! The stored manifest never keeps the registry's tarball URL: the renderer writes the
//! repository's own (`{base}{name}/-/{file}`), so clients come back to Granary for the
//! bytes, while `shasum`, `integrity` and `signatures` pass through unchanged.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use granary_format::model::{
    PackageKey, RemoteAsset, UpstreamPackage, VersionRecord, VersionStatus,
};
use granary_format::{FormatError, UpstreamFormat};

use crate::model::Object;
use crate::validate::PackageName;

/// The external connections that speak npm.
const CONNECTIONS: &[&str] = &["public:npmjs"];

/// The npm format's reader of public registries.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NpmUpstream;

impl UpstreamFormat for NpmUpstream {
    fn serves(&self, connection: &str) -> bool {
        CONNECTIONS.contains(&connection)
    }

    fn metadata_path(&self, key: &PackageKey) -> String {
        match &key.namespace {
            Some(scope) => format!("@{scope}%2f{}", key.name),
            None => key.name.clone(),
        }
    }

    fn parse_metadata(
        &self,
        key: &PackageKey,
        url: &str,
        body: &[u8],
    ) -> Result<UpstreamPackage, FormatError> {
        parse_packument(key, url, body)
    }
}

fn bad(url: &str, why: impl std::fmt::Display) -> FormatError {
    FormatError::Unavailable(format!(
        "upstream document {url} is not a usable packument: {why}"
    ))
}

/// Reads a full packument into Granary's records. Versions whose tarball cannot be
/// verified (no `shasum` or `integrity`) or located are left out, not guessed.
pub(crate) fn parse_packument(
    key: &PackageKey,
    url: &str,
    body: &[u8],
) -> Result<UpstreamPackage, FormatError> {
    let name = PackageName::parse(&match &key.namespace {
        Some(scope) => format!("@{scope}/{}", key.name),
        None => key.name.clone(),
    })
    .map_err(|e| bad(url, e))?;
    let full = name.full();
    let doc: Object = serde_json::from_slice(body).map_err(|e| bad(url, e))?;
    if let Some(Value::String(n)) = doc.get("name")
        && n != &full
    {
        return Err(bad(url, format!("it describes {n}, not {full}")));
    }
    let times = match doc.get("time") {
        Some(Value::Object(t)) => t.clone(),
        _ => Object::new(),
    };
    let time_of = |k: &str| times.get(k).and_then(Value::as_str).and_then(parse_time);
    let created_ms = time_of("created").unwrap_or(0);
    let modified_ms = time_of("modified").unwrap_or(created_ms);
    let tags = match doc.get("dist-tags") {
        Some(Value::Object(t)) => t
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect(),
        _ => Default::default(),
    };
    let mut versions = Vec::new();
    if let Some(Value::Object(vs)) = doc.get("versions") {
        for (version, manifest) in vs {
            let Value::Object(manifest) = manifest else {
                continue;
            };
            if crate::validate::parse_version(version).is_err() {
                continue;
            }
            let published_ms = time_of(version).unwrap_or(modified_ms);
            if let Some(v) = version_record(&name, version, manifest, published_ms) {
                versions.push(v);
            }
        }
    }
    Ok(UpstreamPackage {
        tags,
        created_ms,
        modified_ms,
        versions,
    })
}

fn version_record(
    name: &PackageName,
    version: &str,
    manifest: &Object,
    published_ms: i64,
) -> Option<VersionRecord> {
    let mut m = manifest.clone();
    let Some(Value::Object(mut dist)) = m.remove("dist") else {
        return None;
    };
    let tarball = dist.remove("tarball")?.as_str()?.to_owned();
    if !(tarball.starts_with("http://") || tarball.starts_with("https://")) {
        return None;
    }
    let sha1 = dist
        .get("shasum")
        .and_then(Value::as_str)
        .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase);
    let sha512 = dist
        .get("integrity")
        .and_then(Value::as_str)
        .and_then(sha512_of_integrity);
    if sha1.is_none() && sha512.is_none() {
        return None;
    }
    m.insert("dist".into(), Value::Object(dist));
    let full = name.full();
    m.insert("name".into(), Value::String(full.clone()));
    m.insert("version".into(), Value::String(version.to_owned()));
    m.insert("_id".into(), Value::String(format!("{full}@{version}")));
    let summary = crate::publish::summary(&full, &m);
    Some(VersionRecord {
        version: version.to_owned(),
        revision: String::new(),
        status: VersionStatus::Published,
        published_ms,
        modified_ms: published_ms,
        origin: Default::default(),
        summary,
        metadata: Value::Object(m),
        assets: Vec::new(),
        remote: vec![RemoteAsset {
            name: name.tarball_file(version),
            url: tarball,
            size: None,
            sha1,
            sha256: None,
            sha512,
        }],
    })
}

/// The SHA-512 of an SRI `integrity` string (`sha512-<base64>`, possibly one of several
/// space-separated hashes), as lowercase hex.
fn sha512_of_integrity(integrity: &str) -> Option<String> {
    integrity.split_whitespace().find_map(|part| {
        let b64 = part.strip_prefix("sha512-")?;
        let b64 = b64.split('?').next()?;
        let raw = BASE64.decode(b64).ok()?;
        (raw.len() == 64).then(|| hex::encode(raw))
    })
}

fn parse_time(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc() -> Vec<u8> {
        let sha512 = BASE64.encode([7u8; 64]);
        serde_json::to_vec(&json!({
            "_id": "@acme/util", "name": "@acme/util",
            "dist-tags": {"latest": "1.1.0", "next": "2.0.0-rc.1"},
            "time": {"created": "2024-01-02T03:04:05.678Z", "modified": "2024-02-01T00:00:00.000Z",
                     "1.1.0": "2024-01-05T00:00:00.000Z"},
            "versions": {
                "1.1.0": {"name": "@acme/util", "version": "1.1.0", "description": "helpers",
                    "dependencies": {"left-pad": "^1.0.0"},
                    "dist": {"tarball": "https://registry.example/@acme/util/-/util-1.1.0.tgz",
                             "shasum": "A9993E364706816ABA3E25717850C26C9CD0D89D",
                             "integrity": format!("sha512-{sha512}"),
                             "signatures": [{"keyid": "k", "sig": "s"}]}},
                "2.0.0-rc.1": {"name": "@acme/util", "version": "2.0.0-rc.1",
                    "dist": {"tarball": "https://registry.example/@acme/util/-/util-2.0.0-rc.1.tgz",
                             "shasum": "a9993e364706816aba3e25717850c26c9cd0d89d"}},
                "3.0.0": {"name": "@acme/util", "version": "3.0.0",
                    "dist": {"tarball": "https://registry.example/x.tgz"}},
                "not-a-version": {"dist": {}}
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_packument_becomes_remote_versions_without_the_registry_url() {
        let key = PackageKey::new(Some("acme"), "util");
        let p = parse_packument(&key, "https://registry.example/@acme%2futil", &doc()).unwrap();
        assert_eq!(p.tags["latest"], "1.1.0");
        assert_eq!(p.tags["next"], "2.0.0-rc.1");
        assert_eq!(p.created_ms, 1_704_164_645_678);
        // 3.0.0 has no digest: unverifiable, left out; the invalid version too.
        let mut names: Vec<_> = p.versions.iter().map(|v| v.version.as_str()).collect();
        names.sort();
        assert_eq!(names, ["1.1.0", "2.0.0-rc.1"]);
        let v = p.versions.iter().find(|v| v.version == "1.1.0").unwrap();
        assert_eq!(v.published_ms, 1_704_412_800_000);
        assert!(v.assets.is_empty());
        let r = &v.remote[0];
        assert_eq!(r.name, "util-1.1.0.tgz");
        assert_eq!(
            r.url,
            "https://registry.example/@acme/util/-/util-1.1.0.tgz"
        );
        assert_eq!(
            r.sha1.as_deref(),
            Some("a9993e364706816aba3e25717850c26c9cd0d89d")
        );
        assert_eq!(r.sha512.as_deref(), Some(hex::encode([7u8; 64]).as_str()));
        let dist = &v.metadata["dist"];
        assert!(
            dist.get("tarball").is_none(),
            "the registry's URL is not kept"
        );
        assert!(dist.get("signatures").is_some() && dist.get("integrity").is_some());
        assert_eq!(v.summary.summary.as_deref(), Some("helpers"));
    }

    #[test]
    fn another_package_or_garbage_is_refused() {
        let key = PackageKey::new(None, "other");
        assert!(parse_packument(&key, "u", &doc()).is_err());
        assert!(parse_packument(&key, "u", b"<html>").is_err());
        assert_eq!(
            NpmUpstream.metadata_path(&PackageKey::new(Some("a"), "b")),
            "@a%2fb"
        );
        assert!(NpmUpstream.serves("public:npmjs") && !NpmUpstream.serves("public:pypi"));
    }
}
