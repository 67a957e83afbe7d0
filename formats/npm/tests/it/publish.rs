//! `npm publish`: the bodies libnpmpublish sends, and what must be refused.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use granary_format::Action;
use granary_format::Registry;
use granary_format::model::PackageKey;
use granary_format_npm::NpmFormat;
use serde_json::{Value, json};

use crate::support::{
    DEMO_1_0_0, DEMO_1_1_0, WIDGET, fixture, fixture_json, publish_fixture, put_json, registry,
    send, send_with, tarball_of,
};

#[tokio::test]
async fn unscoped_publish_stores_tarball_and_manifest() {
    let repo = registry();
    let doc = fixture_json(DEMO_1_0_0);
    let reply = send(
        &repo,
        "PUT",
        "granary-demo",
        &[("content-type", "application/json")],
        fixture(DEMO_1_0_0),
    )
    .await;
    assert_eq!(reply.status(), 201);
    assert_eq!(reply.action, Some(Action::Publish));
    assert_eq!(reply.json(), json!({"ok": true, "success": true}));

    let key = PackageKey::new(None, "granary-demo");
    let v = repo.version(&key, "1.0.0").await.unwrap().expect("stored");
    assert_eq!(v.assets.len(), 1);
    assert_eq!(v.assets[0].name, "granary-demo-1.0.0.tgz");
    let tarball = tarball_of(&doc);
    assert_eq!(v.assets[0].size, tarball.len() as u64);
    assert_eq!(
        repo.blob(&v.assets[0].hashes.sha256).as_deref(),
        Some(&tarball[..])
    );
    assert_eq!(
        v.assets[0].hashes.sha1,
        doc["versions"]["1.0.0"]["dist"]["shasum"]
    );

    // The stored manifest: the client's, our dist without a tarball URL, the publisher.
    let m = &v.metadata;
    assert_eq!(m["_id"], "granary-demo@1.0.0");
    assert_eq!(m["dependencies"], json!({"left-pad": "^1.3.0"}));
    assert_eq!(m["_npmUser"], json!({"name": "alice", "email": ""}));
    assert_eq!(
        m["dist"]["integrity"],
        doc["versions"]["1.0.0"]["dist"]["integrity"]
    );
    assert!(
        m["dist"].get("tarball").is_none(),
        "tarball URLs are rendered, not stored"
    );

    assert_eq!(v.summary.display_name.as_deref(), Some("granary-demo"));
    assert_eq!(
        v.summary.summary.as_deref(),
        Some("A tiny demo package for Granary tests")
    );
    assert_eq!(
        v.summary.home_page.as_deref(),
        Some("https://example.com/granary-demo")
    );
    assert_eq!(
        v.summary.source_code_repository.as_deref(),
        Some("git+https://example.com/granary-demo.git")
    );
    assert_eq!(v.summary.licenses, ["MIT"]);

    let record = repo.package(&key).await.unwrap().unwrap();
    assert_eq!(record.tags["latest"], "1.0.0");
}

#[tokio::test]
async fn scoped_publish_with_tag_also_gets_latest() {
    let repo = registry();
    publish_fixture(&repo, WIDGET).await;
    let key = PackageKey::new(Some("acme"), "widget");
    let record = repo.package(&key).await.unwrap().expect("package");
    assert_eq!(record.tags["beta"], "0.1.0-beta.1");
    assert_eq!(
        record.tags["latest"], "0.1.0-beta.1",
        "a new package gets latest"
    );
    let v = repo.version(&key, "0.1.0-beta.1").await.unwrap().unwrap();
    assert_eq!(v.assets[0].name, "widget-0.1.0-beta.1.tgz");
    assert_eq!(v.summary.display_name.as_deref(), Some("@acme/widget"));

    // A literal slash works as well as %2f.
    let mut doc = fixture_json(WIDGET);
    retarget(&mut doc, "0.2.0");
    assert_eq!(put_json(&repo, "@acme/widget", &doc).await.status(), 201);
}

#[tokio::test]
async fn next_tag_does_not_move_latest() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let record = repo
        .package(&PackageKey::new(None, "granary-demo"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.tags["latest"], "1.0.0");
    assert_eq!(record.tags["next"], "1.1.0");
}

#[tokio::test]
async fn duplicate_is_403_with_npm_message() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    let blobs = repo.blob_count();
    let reply = send(&repo, "PUT", "granary-demo", &[], fixture(DEMO_1_0_0)).await;
    assert_eq!(reply.status(), 403);
    assert_eq!(
        reply.json(),
        json!({"error": "You cannot publish over the previously published versions: 1.0.0."})
    );
    assert_eq!(reply.header("content-type"), "application/json");
    assert_eq!(repo.blob_count(), blobs, "nothing stored for a duplicate");
}

/// Sends a modified fixture and expects 400 with nothing stored.
async fn expect_rejected(path: &str, doc: &Value, why: &str) {
    let repo = registry();
    let reply = put_json(&repo, path, doc).await;
    assert_eq!(reply.status(), 400, "{why}: {:?}", reply.body());
    assert!(reply.json()["error"].is_string(), "{why}: npm error shape");
    assert_eq!(repo.blob_count(), 0, "{why}: no blob stored");
    assert_eq!(repo.publish_count(), 0, "{why}: no version published");
}

/// Sends a modified fixture whose tarball is fine but whose digests do not match it, and
/// expects 400. The digests are known only once the tarball is stored (it streams into the
/// store), so the blob may exist; what matters is that no metadata names it.
async fn expect_rejected_unreferenced(path: &str, doc: &Value, why: &str) {
    let repo = registry();
    let reply = put_json(&repo, path, doc).await;
    assert_eq!(reply.status(), 400, "{why}: {:?}", reply.body());
    assert!(reply.json()["error"].is_string(), "{why}: npm error shape");
    assert!(repo.blob_count() <= 1, "{why}: at most the tarball stored");
    assert_eq!(repo.publish_count(), 0, "{why}: no version published");
    let key = PackageKey::new(None, "granary-demo");
    assert!(
        repo.package(&key).await.unwrap().is_none(),
        "{why}: no package"
    );
    assert!(
        repo.versions(&key).await.unwrap().is_empty(),
        "{why}: no version"
    );
}

#[tokio::test]
async fn bad_digests_and_lengths_are_400_and_store_nothing() {
    let base = fixture_json(DEMO_1_0_0);

    let mut doc = base.clone();
    doc["versions"]["1.0.0"]["dist"]["shasum"] = json!("0000000000000000000000000000000000000000");
    expect_rejected_unreferenced("granary-demo", &doc, "shasum").await;

    let mut doc = base.clone();
    doc["versions"]["1.0.0"]["dist"]["integrity"] =
        json!(format!("sha512-{}", BASE64.encode([0u8; 64])));
    expect_rejected_unreferenced("granary-demo", &doc, "integrity").await;

    let mut doc = base.clone();
    doc["_attachments"]["granary-demo-1.0.0.tgz"]["length"] = json!(1);
    expect_rejected("granary-demo", &doc, "length").await;

    let mut doc = base.clone();
    doc["_attachments"]["granary-demo-1.0.0.tgz"]["data"] = json!("%%% not base64 %%%");
    expect_rejected("granary-demo", &doc, "base64").await;

    // Valid digests of something that is not a gzip file.
    let mut doc = base.clone();
    let zip = b"PK\x03\x04 not a tarball";
    let hashes = granary_format::hashing::hash_bytes(zip);
    doc["_attachments"]["granary-demo-1.0.0.tgz"] =
        json!({"data": BASE64.encode(zip), "length": zip.len()});
    doc["versions"]["1.0.0"]["dist"] = json!({
        "shasum": hashes.sha1,
        "integrity": format!("sha512-{}", BASE64.encode(hex_bytes(&hashes.sha512))),
    });
    expect_rejected("granary-demo", &doc, "gzip").await;
}

#[tokio::test]
async fn shape_and_name_mismatches_are_400() {
    let base = fixture_json(DEMO_1_0_0);

    expect_rejected("other-name", &base, "URL name differs from body").await;

    let mut doc = base.clone();
    doc["versions"]["1.0.0"]["name"] = json!("other-name");
    expect_rejected("granary-demo", &doc, "version name differs").await;

    let mut doc = base.clone();
    doc["versions"]["1.0.0"]["version"] = json!("1.0.1");
    expect_rejected("granary-demo", &doc, "version field differs from key").await;

    let mut doc = base.clone();
    let v = doc["versions"]["1.0.0"].clone();
    doc["versions"]["1.0.1"] = v;
    expect_rejected("granary-demo", &doc, "two versions").await;

    let mut doc = base.clone();
    let a = doc["_attachments"]["granary-demo-1.0.0.tgz"].clone();
    doc["_attachments"]["granary-demo-1.0.1.tgz"] = a;
    expect_rejected("granary-demo", &doc, "two attachments").await;

    let mut doc = base.clone();
    let a = doc["_attachments"]["granary-demo-1.0.0.tgz"].take();
    doc["_attachments"] = json!({"granary-demo-9.9.9.tgz": a});
    expect_rejected("granary-demo", &doc, "attachment of another version").await;

    expect_rejected("granary-demo", &json!("not an object"), "not a document").await;
}

#[tokio::test]
async fn bad_versions_are_400() {
    for bad in ["1.0", "v1.0.0", "01.0.0", "latest", "1.0.0.0"] {
        let mut doc = fixture_json(DEMO_1_0_0);
        retarget(&mut doc, bad);
        expect_rejected("granary-demo", &doc, bad).await;
    }
}

#[tokio::test]
async fn bad_names_are_400() {
    // Capital letters: valid for existing packages, refused for new ones.
    let mut doc = fixture_json(DEMO_1_0_0);
    rename(&mut doc, "Granary-Demo");
    expect_rejected("Granary-Demo", &doc, "capitals").await;

    for name in ["fs", "ok!", "@Acme/widget"] {
        let mut doc = fixture_json(DEMO_1_0_0);
        rename(&mut doc, name);
        expect_rejected(&name.replace('/', "%2f"), &doc, name).await;
    }
    for path in [".hidden", "_private", "node_modules", "a%20b", "%40acme%2f"] {
        let repo = registry();
        let reply = put_json(&repo, path, &fixture_json(DEMO_1_0_0)).await;
        assert_eq!(reply.status(), 400, "{path}");
    }
    let long = "a".repeat(215);
    let repo = registry();
    let reply = put_json(&repo, &long, &fixture_json(DEMO_1_0_0)).await;
    assert_eq!(reply.status(), 400);
}

#[tokio::test]
async fn body_limit_is_413() {
    let repo = registry();
    let reply = send_with(
        &NpmFormat::new(100),
        &repo,
        "PUT",
        "granary-demo",
        &[],
        fixture(DEMO_1_0_0),
    )
    .await;
    assert_eq!(reply.status(), 413);
    assert_eq!(repo.publish_count(), 0);
}

/// Rewrites a publish body to another version (same tarball and digests).
fn retarget(doc: &mut Value, version: &str) {
    let name = doc["name"].as_str().unwrap().to_owned();
    let unscoped = name.rsplit('/').next().unwrap().to_owned();
    let mut v = doc["versions"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    v["version"] = json!(version);
    v["_id"] = json!(format!("{name}@{version}"));
    doc["versions"] = json!({ version: v });
    let a = doc["_attachments"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    doc["_attachments"] = json!({ format!("{unscoped}-{version}.tgz"): a });
    doc["dist-tags"] = json!({"latest": version});
}

/// Rewrites a publish body to another package name.
fn rename(doc: &mut Value, name: &str) {
    doc["_id"] = json!(name);
    doc["name"] = json!(name);
    doc["versions"]["1.0.0"]["name"] = json!(name);
    let a = doc["_attachments"]["granary-demo-1.0.0.tgz"].take();
    let unscoped = name.rsplit('/').next().unwrap();
    doc["_attachments"] = json!({ format!("{unscoped}-1.0.0.tgz"): a });
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}
