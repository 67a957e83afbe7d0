//! Reads: packuments as `npm install`/`npm view` fetch them, tarballs, caching headers.

use bytes::Bytes;
use granary_format::model::{PackageKey, VersionStatus};
use serde_json::json;

use crate::support::{
    BASE, DEMO_1_0_0, DEMO_1_1_0, INSTALL_ACCEPT, WIDGET, get, publish_fixture, registry, send,
    tarball_of,
};

fn is_npm_time(s: &serde_json::Value) -> bool {
    // 2024-01-02T03:04:05.678Z
    let s = s.as_str().unwrap_or_default();
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && s[..4].chars().all(|c| c.is_ascii_digit())
}

#[tokio::test]
async fn full_packument() {
    let repo = registry();
    let doc = publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let reply = get(&repo, "granary-demo").await;
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.action, Some(granary_format::Action::Read));
    assert_eq!(reply.header("content-type"), "application/json");
    assert!(!reply.header("etag").is_empty());
    let p = reply.json();
    assert_eq!(p["_id"], "granary-demo");
    assert_eq!(p["name"], "granary-demo");
    assert!(p["_rev"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(p["description"], "A tiny demo package for Granary tests");
    assert_eq!(p["dist-tags"], json!({"latest": "1.0.0", "next": "1.1.0"}));
    assert_eq!(p["readme"], "# granary-demo\n\nA tiny demo package.\n");
    assert_eq!(p["license"], "MIT");
    assert_eq!(
        p["repository"],
        json!({"type": "git", "url": "git+https://example.com/granary-demo.git"})
    );
    for field in ["created", "modified", "1.0.0", "1.1.0"] {
        assert!(
            is_npm_time(&p["time"][field]),
            "time.{field}: {}",
            p["time"][field]
        );
    }
    let v = &p["versions"]["1.0.0"];
    assert_eq!(v["_id"], "granary-demo@1.0.0");
    assert_eq!(v["version"], "1.0.0");
    assert_eq!(v["bin"], json!({"granary-demo": "index.js"}));
    assert_eq!(
        v["dist"]["tarball"],
        format!("{BASE}granary-demo/-/granary-demo-1.0.0.tgz")
    );
    let sent = &doc["versions"]["1.0.0"]["dist"];
    assert_eq!(v["dist"]["shasum"], sent["shasum"]);
    assert_eq!(v["dist"]["integrity"], sent["integrity"]);
}

#[tokio::test]
async fn abbreviated_packument() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    let reply = send(
        &repo,
        "GET",
        "granary-demo",
        &[("accept", INSTALL_ACCEPT)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status(), 200);
    assert_eq!(
        reply.header("content-type"),
        "application/vnd.npm.install-v1+json"
    );
    let p = reply.json();
    let mut keys: Vec<_> = p.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["dist-tags", "modified", "name", "versions"]);
    assert!(is_npm_time(&p["modified"]));
    assert_eq!(p["dist-tags"]["latest"], "1.0.0");
    let v = &p["versions"]["1.0.0"];
    assert_eq!(v["name"], "granary-demo");
    assert_eq!(v["dependencies"], json!({"left-pad": "^1.3.0"}));
    assert_eq!(v["engines"], json!({"node": ">=18"}));
    assert_eq!(
        v["dist"]["tarball"],
        format!("{BASE}granary-demo/-/granary-demo-1.0.0.tgz")
    );
    assert!(v.get("readme").is_none() && v.get("description").is_none());

    // ?write=true always gets the full document.
    let reply = send(
        &repo,
        "GET",
        "granary-demo?write=true",
        &[("accept", INSTALL_ACCEPT)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.header("content-type"), "application/json");
    assert!(reply.json()["_rev"].is_string());
}

#[tokio::test]
async fn scoped_packument_and_tarballs() {
    let repo = registry();
    let doc = publish_fixture(&repo, WIDGET).await;
    let tarball = tarball_of(&doc);
    for path in ["@acme%2fwidget", "@acme%2Fwidget", "@acme/widget"] {
        let p = get(&repo, path).await;
        assert_eq!(p.status(), 200, "{path}");
        let p = p.json();
        assert_eq!(p["name"], "@acme/widget");
        assert_eq!(
            p["dist-tags"],
            json!({"beta": "0.1.0-beta.1", "latest": "0.1.0-beta.1"})
        );
        let v = &p["versions"]["0.1.0-beta.1"];
        assert_eq!(v["_id"], "@acme/widget@0.1.0-beta.1");
        assert_eq!(
            v["peerDependenciesMeta"],
            json!({"react": {"optional": true}})
        );
        assert_eq!(
            v["dist"]["tarball"],
            format!("{BASE}@acme/widget/-/widget-0.1.0-beta.1.tgz")
        );
    }
    for path in [
        "@acme/widget/-/widget-0.1.0-beta.1.tgz",
        "@acme%2fwidget/-/widget-0.1.0-beta.1.tgz",
        "@acme/widget/-/@acme/widget-0.1.0-beta.1.tgz",
    ] {
        let reply = get(&repo, path).await;
        assert_eq!(reply.status(), 200, "{path}");
        assert_eq!(reply.header("content-type"), "application/octet-stream");
        assert_eq!(reply.header("content-length"), tarball.len().to_string());
        assert_eq!(&reply.body()[..], &tarball[..], "{path}: bytes equal");
    }
}

#[tokio::test]
async fn tarball_bytes_equal_and_404s() {
    let repo = registry();
    let doc = publish_fixture(&repo, DEMO_1_0_0).await;
    let reply = get(&repo, "granary-demo/-/granary-demo-1.0.0.tgz").await;
    assert_eq!(reply.status(), 200);
    assert_eq!(&reply.body()[..], &tarball_of(&doc)[..]);
    let sha256 = granary_format::hashing::hash_bytes(&tarball_of(&doc)).sha256;
    assert_eq!(reply.header("etag"), format!("\"{sha256}\""));

    for path in [
        "granary-demo/-/granary-demo-9.9.9.tgz",
        "granary-demo/-/other-1.0.0.tgz",
        "granary-demo/-/granary-demo-1.0.0.zip",
        "absent/-/absent-1.0.0.tgz",
    ] {
        let reply = get(&repo, path).await;
        assert_eq!(reply.status(), 404, "{path}");
        assert_eq!(reply.json(), json!({"error": "Not found"}));
    }
}

#[tokio::test]
async fn status_gates_listing_and_downloads() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let key = PackageKey::new(None, "granary-demo");

    repo.set_status(&key, "1.1.0", VersionStatus::Unlisted)
        .unwrap();
    let p = get(&repo, "granary-demo").await.json();
    assert!(
        p["versions"].get("1.1.0").is_none(),
        "unlisted is not listed"
    );
    assert!(p["time"].get("1.1.0").is_none());
    assert!(p["dist-tags"].get("next").is_none());
    let t = get(&repo, "granary-demo/-/granary-demo-1.1.0.tgz").await;
    assert_eq!(t.status(), 200, "unlisted stays downloadable");

    repo.set_status(&key, "1.1.0", VersionStatus::Archived)
        .unwrap();
    let t = get(&repo, "granary-demo/-/granary-demo-1.1.0.tgz").await;
    assert_eq!(t.status(), 404, "archived is not downloadable");

    repo.set_status(&key, "1.0.0", VersionStatus::Archived)
        .unwrap();
    assert_eq!(
        get(&repo, "granary-demo").await.status(),
        404,
        "nothing listed"
    );
}

#[tokio::test]
async fn unknown_package_is_404() {
    let repo = registry();
    for path in ["absent", "@acme%2fabsent", "absent?write=true"] {
        let reply = get(&repo, path).await;
        assert_eq!(reply.status(), 404);
        assert_eq!(reply.json(), json!({"error": "Not found"}));
        assert_eq!(reply.header("content-type"), "application/json");
    }
}

#[tokio::test]
async fn etags_304_and_document_cache() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    let first = get(&repo, "granary-demo").await;
    let etag = first.header("etag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    let hits = repo.document_hits();
    let second = get(&repo, "granary-demo").await;
    assert_eq!(second.body(), first.body());
    assert_eq!(
        repo.document_hits(),
        hits + 1,
        "second read comes from the cache"
    );

    let cond = send(
        &repo,
        "GET",
        "granary-demo",
        &[("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(cond.status(), 304);
    assert_eq!(cond.header("etag"), etag);
    assert!(cond.body().is_empty());

    // The abbreviated document has its own tag.
    let abbr = send(
        &repo,
        "GET",
        "granary-demo",
        &[("accept", INSTALL_ACCEPT)],
        Bytes::new(),
    )
    .await;
    assert_ne!(abbr.header("etag"), etag);
    let cond = send(
        &repo,
        "GET",
        "granary-demo",
        &[("accept", INSTALL_ACCEPT), ("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(cond.status(), 200);

    // A change makes a new tag and a fresh document.
    publish_fixture(&repo, DEMO_1_1_0).await;
    let cond = send(
        &repo,
        "GET",
        "granary-demo",
        &[("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(cond.status(), 200);
    assert_ne!(cond.header("etag"), etag);
    assert!(cond.json()["versions"].get("1.1.0").is_some());

    let tarball = get(&repo, "granary-demo/-/granary-demo-1.0.0.tgz").await;
    let tag = tarball.header("etag").to_owned();
    let cond = send(
        &repo,
        "GET",
        "granary-demo/-/granary-demo-1.0.0.tgz",
        &[("if-none-match", &format!("W/{tag}"))],
        Bytes::new(),
    )
    .await;
    assert_eq!(cond.status(), 304);
}

#[tokio::test]
async fn head_has_get_headers_and_no_body() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    for path in [
        "granary-demo",
        "granary-demo/-/granary-demo-1.0.0.tgz",
        "granary-demo/1.0.0",
        "-/package/granary-demo/dist-tags",
        "-/whoami",
        "-/ping",
    ] {
        let g = get(&repo, path).await;
        let h = send(&repo, "HEAD", path, &[], Bytes::new()).await;
        assert_eq!(h.status(), g.status(), "{path}");
        assert_eq!(h.header("content-type"), g.header("content-type"), "{path}");
        assert_eq!(h.header("etag"), g.header("etag"), "{path}");
        assert_eq!(
            h.header("content-length"),
            g.body().len().to_string(),
            "{path}"
        );
        assert!(h.body().is_empty(), "{path}");
    }
    assert_eq!(
        send(&repo, "HEAD", "absent", &[], Bytes::new())
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn version_manifest_by_version_or_tag() {
    let repo = registry();
    publish_fixture(&repo, DEMO_1_0_0).await;
    publish_fixture(&repo, DEMO_1_1_0).await;
    let v = get(&repo, "granary-demo/1.0.0").await;
    assert_eq!(v.status(), 200);
    assert_eq!(v.json()["_id"], "granary-demo@1.0.0");
    assert_eq!(
        get(&repo, "granary-demo/next").await.json()["version"],
        "1.1.0"
    );
    assert_eq!(
        get(&repo, "granary-demo/latest").await.json()["version"],
        "1.0.0"
    );
    assert_eq!(get(&repo, "granary-demo/2.0.0").await.status(), 404);
}
