//! Shared helpers: a registry with a fixed base URL, fixtures, and request builders.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use granary_format::testing::MemRegistry;
use granary_format::testing::conformance::{self, Reply};
use granary_format_npm::NpmFormat;
use http::Request;
use serde_json::Value;

/// The repository's npm endpoint (what `RepositoryRef::base_url` holds).
pub(crate) const BASE: &str = "http://127.0.0.1:4873/npm/test-domain/test-repo/";

/// What the CLI sends as `Accept` for packuments during install.
pub(crate) const INSTALL_ACCEPT: &str =
    "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*";

pub(crate) const DEMO_1_0_0: &str = "publish-granary-demo-1.0.0.json";
pub(crate) const DEMO_1_1_0: &str = "publish-granary-demo-1.1.0-next.json";
pub(crate) const WIDGET: &str = "publish-acme-widget-0.1.0-beta.1.json";

pub(crate) fn registry() -> MemRegistry {
    MemRegistry::new(BASE, "alice")
}

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub(crate) fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).expect("fixture is JSON")
}

/// The tarball inside a publish body.
pub(crate) fn tarball_of(doc: &Value) -> Vec<u8> {
    let attachments = doc["_attachments"].as_object().expect("attachments");
    let (_, attachment) = attachments.iter().next().expect("one attachment");
    BASE64
        .decode(attachment["data"].as_str().expect("data"))
        .expect("base64")
}

/// Sends one request (`rest` may carry a query string).
pub(crate) async fn send(
    repo: &MemRegistry,
    method: &str,
    rest: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    send_with(&NpmFormat::default(), repo, method, rest, headers, body).await
}

pub(crate) async fn send_with(
    format: &NpmFormat,
    repo: &MemRegistry,
    method: &str,
    rest: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("/npm/test-domain/test-repo/{rest}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder.body(body.into()).expect("request");
    conformance::call(format, repo, req).await
}

pub(crate) async fn get(repo: &MemRegistry, rest: &str) -> Reply {
    send(repo, "GET", rest, &[], Bytes::new()).await
}

pub(crate) async fn put_json(repo: &MemRegistry, rest: &str, doc: &Value) -> Reply {
    let body = serde_json::to_vec(doc).expect("json");
    send(
        repo,
        "PUT",
        rest,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// Publishes a fixture to the path the CLI uses and checks it succeeded.
pub(crate) async fn publish_fixture(repo: &MemRegistry, name: &str) -> Value {
    let doc = fixture_json(name);
    let path = doc["name"].as_str().expect("name").replace('/', "%2f");
    let reply = send(
        repo,
        "PUT",
        &path,
        &[("content-type", "application/json")],
        fixture(name),
    )
    .await;
    assert_eq!(reply.status(), 201, "{name}: {:?}", reply.body());
    doc
}

/// The full document, as `npm` reads it before deprecate/unpublish.
pub(crate) async fn write_doc(repo: &MemRegistry, path: &str) -> Value {
    let reply = get(repo, &format!("{path}?write=true")).await;
    assert_eq!(reply.status(), 200, "{:?}", reply.body());
    reply.json()
}
