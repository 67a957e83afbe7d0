//! Serde wire types of the npm registry API: what the CLI sends (publish and document
//! updates) and what we answer (packuments, small JSON replies). Owns no behaviour beyond
//! reading fields leniently out of manifests, which are kept as JSON maps because they
//! are stored and served back nearly verbatim.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object, as version manifests are kept.
pub(crate) type Object = Map<String, Value>;

/// The body of `PUT {name}` and `PUT {name}/-rev/{rev}`.
///
/// libnpmpublish sends `_id`, `name`, `description`, `dist-tags`, `versions` (one),
/// `access` and `_attachments` (one); `npm deprecate` sends the whole `?write=true`
/// document back without `_attachments`; `npm unpublish pkg@v` sends it without the
/// version.
#[derive(Debug, Deserialize)]
pub(crate) struct PackageDocument {
    /// Must equal the URL's name when present.
    #[serde(rename = "_id", default)]
    pub(crate) id: Option<String>,
    /// Must equal the URL's name when present.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// Tag → version.
    #[serde(rename = "dist-tags", default)]
    pub(crate) dist_tags: Option<BTreeMap<String, String>>,
    /// Version → manifest; absent in `npm star`/`npm owner` style updates.
    #[serde(default)]
    pub(crate) versions: Option<BTreeMap<String, Object>>,
    /// File name → tarball.
    #[serde(rename = "_attachments", default)]
    pub(crate) attachments: Option<BTreeMap<String, Attachment>>,
}

/// One `_attachments` entry, as the skeleton of `stream` holds it.
#[derive(Debug, Deserialize)]
pub(crate) struct Attachment {
    /// Base64 of the tarball (standard alphabet, padded) in the body; always `""` here,
    /// since the scanner streams the content to the blob store. Kept so that a missing
    /// or non-string `data` still fails the parse.
    #[expect(
        dead_code,
        reason = "the content is streamed; only its presence is checked"
    )]
    pub(crate) data: String,
    /// The decoded length in bytes.
    #[serde(default)]
    pub(crate) length: Option<u64>,
}

/// The full packument (`GET {name}`, `?write=true`).
#[derive(Debug, Serialize)]
pub(crate) struct Packument {
    #[serde(rename = "_id")]
    pub(crate) id: String,
    #[serde(rename = "_rev")]
    pub(crate) rev: String,
    pub(crate) name: String,
    #[serde(rename = "dist-tags")]
    pub(crate) dist_tags: BTreeMap<String, String>,
    pub(crate) versions: BTreeMap<String, Value>,
    pub(crate) time: BTreeMap<String, String>,
    /// Top-level fields copied from the `latest` version (description, readme, license, …).
    #[serde(flatten)]
    pub(crate) latest_fields: Object,
}

/// The abbreviated packument (`Accept: application/vnd.npm.install-v1+json`).
#[derive(Debug, Serialize)]
pub(crate) struct AbbreviatedPackument {
    pub(crate) name: String,
    pub(crate) modified: String,
    #[serde(rename = "dist-tags")]
    pub(crate) dist_tags: BTreeMap<String, String>,
    pub(crate) versions: BTreeMap<String, Value>,
}

/// `{"error": "…"}`: npm prints `error` after the status line.
#[derive(Debug, Serialize)]
pub(crate) struct ErrorBody<'a> {
    pub(crate) error: &'a str,
}

/// `{"ok": true, …}` replies of writes.
#[derive(Debug, Serialize)]
pub(crate) struct OkBody {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rev: Option<String>,
}

impl OkBody {
    /// `{"ok": true}`.
    pub(crate) fn ok() -> Self {
        Self {
            ok: true,
            success: None,
            id: None,
            rev: None,
        }
    }
}

/// `GET -/whoami`.
#[derive(Debug, Serialize)]
pub(crate) struct Whoami<'a> {
    pub(crate) username: &'a str,
}

/// `GET -/v1/search`.
#[derive(Debug, Serialize)]
pub(crate) struct SearchResults {
    pub(crate) objects: Vec<Value>,
    pub(crate) total: u64,
    pub(crate) time: String,
}

/// A string field of a manifest, if it is a string.
pub(crate) fn str_field<'a>(m: &'a Object, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Value::as_str)
}

/// The non-empty `deprecated` message of a manifest (`""` means not deprecated).
pub(crate) fn deprecation(m: &Object) -> Option<&str> {
    str_field(m, "deprecated").filter(|s| !s.is_empty())
}

/// `repository` as a URL: a string, or `{"type": "git", "url": "…"}`.
pub(crate) fn repository_url(m: &Object) -> Option<String> {
    match m.get("repository")? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => str_field(o, "url").map(str::to_owned),
        _ => None,
    }
}

/// License names: `license` as a string or `{"type": …}`, or legacy `licenses: [{type}]`.
pub(crate) fn licenses(m: &Object) -> Vec<String> {
    fn name(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => str_field(o, "type").map(str::to_owned),
            _ => None,
        }
    }
    if let Some(l) = m.get("license").and_then(name) {
        return vec![l];
    }
    match m.get("licenses") {
        Some(Value::Array(items)) => items.iter().filter_map(name).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Object {
        match v {
            Value::Object(m) => m,
            _ => Object::new(),
        }
    }

    #[test]
    fn lenient_fields() {
        let m = obj(json!({
            "repository": {"type": "git", "url": "git+https://x/y.git"},
            "license": {"type": "MIT"},
            "deprecated": ""
        }));
        assert_eq!(repository_url(&m).as_deref(), Some("git+https://x/y.git"));
        assert_eq!(licenses(&m), vec!["MIT"]);
        assert_eq!(deprecation(&m), None);
        let m = obj(json!({
            "repository": "github:a/b",
            "licenses": [{"type": "MIT"}, {"type": "Apache-2.0"}],
            "deprecated": "use v2"
        }));
        assert_eq!(repository_url(&m).as_deref(), Some("github:a/b"));
        assert_eq!(licenses(&m), vec!["MIT", "Apache-2.0"]);
        assert_eq!(deprecation(&m), Some("use v2"));
        assert!(licenses(&obj(json!({"license": 3}))).is_empty());
    }

    #[test]
    fn publish_body_shape() {
        let doc: PackageDocument = serde_json::from_value(json!({
            "_id": "a", "name": "a", "access": null,
            "dist-tags": {"latest": "1.0.0"},
            "versions": {"1.0.0": {"name": "a"}},
            "_attachments": {"a-1.0.0.tgz": {"content_type": "application/octet-stream", "data": "AA==", "length": 1}}
        }))
        .unwrap();
        assert_eq!(doc.attachments.unwrap()["a-1.0.0.tgz"].length, Some(1));
        assert_eq!(doc.versions.unwrap().len(), 1);
    }
}
