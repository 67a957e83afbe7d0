//! Paths and methods, the small endpoints, the replayed CLI transcript, and the core
//! conformance suite.

use bytes::Bytes;
use granary_format::Action;
use granary_format::testing::conformance;
use granary_format_npm::NpmFormat;
use serde_json::json;

use crate::support::{fixture, fixture_json, get, registry, send};

#[tokio::test]
async fn core_conformance_suite() {
    conformance::run(&NpmFormat::default())
        .await
        .unwrap_or_else(|f| panic!("{f}"));
}

/// Every request npm 11 sent in the captured session routes, with the expected action.
#[tokio::test]
async fn captured_cli_requests_route() {
    let transcript = fixture_json("npm-cli-11-requests.json");
    let repo = registry();
    for req in transcript["requests"].as_array().unwrap() {
        let method = req["method"].as_str().unwrap();
        let path = req["path"].as_str().unwrap();
        let mut headers = Vec::new();
        if let Some(accept) = req["accept"].as_str() {
            headers.push(("accept", accept));
        }
        let body = match (req["body"].as_str(), req["raw_body"].as_str()) {
            (Some(file), _) => Bytes::from(fixture(file)),
            (None, Some(raw)) => Bytes::from(raw.to_owned()),
            (None, None) => Bytes::new(),
        };
        let reply = send(&repo, method, path, &headers, body).await;
        let expected = match req["action"].as_str().unwrap() {
            "Read" => Action::Read,
            "Publish" => Action::Publish,
            _ => Action::Write,
        };
        assert_eq!(
            reply.action,
            Some(expected),
            "{method} {path} ({}): {} {:?}",
            req["command"],
            reply.status(),
            reply.body()
        );
    }
}

#[tokio::test]
async fn dot_dot_and_unsafe_paths_are_400() {
    let repo = registry();
    for path in [
        "..",
        "../etc/passwd",
        "granary-demo/../x",
        "%2e%2e/x",
        "granary-demo/-/%2E%2E",
        "granary-demo/-/..%2f..%2fx.tgz",
        "a%5c..%5cb",
        "a%00",
        "a%1b",
        "granary-demo//-/x.tgz",
    ] {
        let reply = get(&repo, path).await;
        assert_eq!(reply.status(), 400, "{path}");
        assert!(reply.json()["error"].is_string(), "{path}");
        assert_eq!(reply.action, None, "{path}: refused before routing");
    }
}

#[tokio::test]
async fn unknown_routes_404_wrong_methods_405() {
    let repo = registry();
    for path in [
        "",
        "-/nope",
        "-/v1/nope",
        "granary-demo/-/a/b/c.tgz",
        "a/b/c",
    ] {
        let reply = get(&repo, path).await;
        assert_eq!(reply.status(), 404, "{path:?}");
        assert_eq!(reply.json(), json!({"error": "Not found"}), "{path:?}");
    }
    for (method, path) in [
        ("POST", "granary-demo"),
        ("DELETE", "granary-demo"),
        ("PATCH", "granary-demo"),
        ("PUT", "granary-demo/-/granary-demo-1.0.0.tgz"),
        ("POST", "-/whoami"),
        ("GET", "-/npm/v1/security/advisories/bulk"),
    ] {
        let reply = send(&repo, method, path, &[], Bytes::new()).await;
        assert_eq!(reply.status(), 405, "{method} {path}");
        assert!(reply.json()["error"].is_string());
    }
}

#[tokio::test]
async fn small_endpoints() {
    let repo = registry();
    let whoami = get(&repo, "-/whoami").await;
    assert_eq!(whoami.status(), 200);
    assert_eq!(whoami.json(), json!({"username": "alice"}));
    assert_eq!(get(&repo, "-/ping").await.json(), json!({}));
    let ping = get(&repo, "-/ping?write=true").await;
    assert_eq!(ping.status(), 200);

    for path in [
        "-/npm/v1/security/advisories/bulk",
        "-/npm/v1/security/audits/quick",
    ] {
        let reply = send(&repo, "POST", path, &[], "{\"left-pad\":[\"1.3.0\"]}").await;
        assert_eq!(reply.status(), 200, "{path}");
        assert_eq!(reply.action, Some(Action::Read));
        assert_eq!(reply.json(), json!({}));
    }

    let search = get(&repo, "-/v1/search?text=demo&size=20&from=0").await;
    assert_eq!(search.status(), 200);
    let s = search.json();
    assert_eq!(s["objects"], json!([]));
    assert_eq!(s["total"], 0);
    assert!(s["time"].is_string());
}

#[tokio::test]
async fn login_is_refused_with_a_pointer_to_codeartifact() {
    let repo = registry();
    let couch = json!({"_id": "org.couchdb.user:alice", "name": "alice", "password": "x",
        "type": "user", "roles": [], "date": "2024-01-01T00:00:00.000Z"});
    let reply = send(
        &repo,
        "PUT",
        "-/user/org.couchdb.user:alice",
        &[("content-type", "application/json")],
        serde_json::to_vec(&couch).unwrap(),
    )
    .await;
    assert_eq!(reply.status(), 401);
    // No challenge: npm then shows our message rather than "Incorrect or missing password".
    assert_eq!(reply.header("www-authenticate"), "");
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("aws codeartifact login")
    );
    let web = send(&repo, "POST", "-/v1/login", &[], "{}").await;
    assert_eq!(web.status(), 401);
    let logout = send(&repo, "DELETE", "-/user/token/abc", &[], Bytes::new()).await;
    assert_eq!(logout.status(), 200);
}
