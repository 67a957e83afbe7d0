use serde_json::json;

use crate::harness::{Resp, Server, fake_tgz, npm_publish_body};

fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok()),
        Some(code),
        "{}",
        r.text()
    );
    let body = r.json();
    assert_eq!(body["__type"], code);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread")]
async fn domain_and_repository_lifecycle() {
    let server = Server::start();
    let c = server.client();
    let r = c
        .api(
            "POST",
            "/v1/domain?domain=lifecycle",
            Some(json!({"tags": [{"key": "team", "value": "a"}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let d = r.json()["domain"].clone();
    assert_eq!(d["name"], "lifecycle");
    assert_eq!(d["owner"], "000000000000");
    assert_eq!(
        d["arn"],
        "arn:aws:codeartifact:us-east-1:000000000000:domain/lifecycle"
    );
    assert!(d["createdTime"].as_f64().unwrap() > 1.7e9);

    assert_error(
        &c.api("POST", "/v1/domain?domain=lifecycle", None).await,
        409,
        "ConflictException",
    );
    let r = c.api("GET", "/v1/domain?domain=nope", None).await;
    assert_error(&r, 404, "ResourceNotFoundException");
    assert_eq!(r.json()["resourceType"], "domain");

    for repo in ["base", "mid", "top"] {
        let r = c
            .api(
                "POST",
                &format!("/v1/repository?domain=lifecycle&repository={repo}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Upstreams: stored in order, unknown ones refused, cycles refused.
    let r = c
        .api(
            "PUT",
            "/v1/repository?domain=lifecycle&repository=top",
            Some(json!({"upstreams": [{"repositoryName": "mid"}, {"repositoryName": "base"}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["repository"]["upstreams"],
        json!([{"repositoryName": "mid"}, {"repositoryName": "base"}])
    );
    let r = c
        .api(
            "PUT",
            "/v1/repository?domain=lifecycle&repository=mid",
            Some(json!({"upstreams": [{"repositoryName": "top"}]})),
        )
        .await;
    assert_error(&r, 400, "ValidationException");
    let r = c
        .api(
            "PUT",
            "/v1/repository?domain=lifecycle&repository=mid",
            Some(json!({"upstreams": [{"repositoryName": "ghost"}]})),
        )
        .await;
    assert_error(&r, 404, "ResourceNotFoundException");
    let r = c
        .api(
            "GET",
            "/v1/repository?domain=lifecycle&repository=mid",
            None,
        )
        .await;
    assert_eq!(
        r.json()["repository"]["upstreams"],
        json!([]),
        "refused updates changed nothing"
    );

    // Listing with paging.
    let r = c
        .api(
            "POST",
            "/v1/domain/repositories?domain=lifecycle&max-results=2",
            None,
        )
        .await;
    let page = r.json();
    assert_eq!(page["repositories"].as_array().unwrap().len(), 2);
    let next = page["nextToken"].as_str().unwrap().to_owned();
    let r = c
        .api(
            "POST",
            &format!("/v1/domain/repositories?domain=lifecycle&max-results=2&next-token={next}"),
            None,
        )
        .await;
    assert_eq!(r.json()["repositories"].as_array().unwrap().len(), 1);
    let r = c
        .api("POST", "/v1/repositories?repository-prefix=mi", None)
        .await;
    assert_eq!(r.json()["repositories"][0]["name"], "mid");

    // Endpoint and token.
    let r = c
        .api(
            "GET",
            "/v1/repository/endpoint?domain=lifecycle&repository=top&format=npm",
            None,
        )
        .await;
    assert_eq!(
        r.json()["repositoryEndpoint"],
        format!("{}/npm/lifecycle/top/", server.url())
    );
    let r = c
        .api(
            "POST",
            "/v1/authorization-token?domain=lifecycle&duration=900",
            None,
        )
        .await;
    let tok = r.json();
    let exp = tok["expiration"].as_f64().unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!((exp - now - 900.0).abs() < 30.0, "{tok}");
    assert_error(
        &c.api(
            "POST",
            "/v1/authorization-token?domain=lifecycle&duration=100",
            None,
        )
        .await,
        400,
        "ValidationException",
    );

    // Deletion order: a domain with repositories and an upstream in use are refused.
    assert_error(
        &c.api("DELETE", "/v1/domain?domain=lifecycle", None).await,
        409,
        "ConflictException",
    );
    assert_error(
        &c.api(
            "DELETE",
            "/v1/repository?domain=lifecycle&repository=mid",
            None,
        )
        .await,
        409,
        "ConflictException",
    );
    for repo in ["top", "mid", "base"] {
        let r = c
            .api(
                "DELETE",
                &format!("/v1/repository?domain=lifecycle&repository={repo}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = c.api("DELETE", "/v1/domain?domain=lifecycle", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["domain"]["status"], "Deleted");
    let r = c.api("POST", "/v1/domains", Some(json!({}))).await;
    assert_eq!(r.json()["domains"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn package_operations_show_published_versions() {
    let server = Server::start();
    let c = server.client();
    let token = c.setup("pk", "repo").await;
    for (name, version) in [
        ("@team/lib", "1.0.0"),
        ("@team/lib", "1.1.0"),
        ("plain", "0.1.0"),
    ] {
        let tgz = fake_tgz(version.len() as u64 + name.len() as u64, 3000);
        let body = npm_publish_body(
            name,
            version,
            &tgz,
            json!({"license": "MIT", "homepage": "https://example.com/lib"}),
        );
        let r = c.npm_put(&token, "pk", "repo", name, &body).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = c
        .api(
            "POST",
            "/v1/packages?domain=pk&repository=repo&format=npm",
            None,
        )
        .await;
    let pkgs = r.json()["packages"].clone();
    assert_eq!(pkgs.as_array().unwrap().len(), 2, "{pkgs}");
    assert!(
        pkgs.as_array()
            .unwrap()
            .iter()
            .any(|p| p["namespace"] == "team" && p["package"] == "lib")
    );
    assert_eq!(
        pkgs[0]["originConfiguration"]["restrictions"]["publish"],
        "ALLOW"
    );
    assert_eq!(
        pkgs[0]["originConfiguration"]["restrictions"]["upstream"],
        "BLOCK"
    );

    let r = c
        .api(
            "GET",
            "/v1/package?domain=pk&repository=repo&format=npm&namespace=team&package=lib",
            None,
        )
        .await;
    assert_eq!(r.json()["package"]["name"], "lib", "{}", r.text());

    let r = c
        .api(
            "POST",
            "/v1/package/versions?domain=pk&repository=repo&format=npm&namespace=team&package=lib",
            None,
        )
        .await;
    let v = r.json();
    assert_eq!(v["versions"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["defaultDisplayVersion"], "1.1.0");
    assert_eq!(v["versions"][0]["version"], "1.0.0");

    let r = c
        .api("GET", "/v1/package/version?domain=pk&repository=repo&format=npm&namespace=team&package=lib&version=1.1.0", None)
        .await;
    let pv = r.json()["packageVersion"].clone();
    assert_eq!(pv["displayName"], "@team/lib", "{pv}");
    assert_eq!(pv["homePage"], "https://example.com/lib");
    assert_eq!(pv["licenses"], json!([{"name": "MIT"}]));

    let r = c
        .api("POST", "/v1/package/version/assets?domain=pk&repository=repo&format=npm&namespace=team&package=lib&version=1.1.0", None)
        .await;
    let assets = r.json();
    let asset = &assets["assets"][0];
    assert_eq!(asset["name"], "lib-1.1.0.tgz", "{assets}");
    let tgz = fake_tgz("1.1.0".len() as u64 + "@team/lib".len() as u64, 3000);
    assert_eq!(asset["size"], 3000);
    assert_eq!(
        asset["hashes"]["SHA-256"],
        granary_format::hashing::hash_bytes(&tgz).sha256
    );

    let r = c
        .api(
            "GET",
            "/v1/package/version/asset?domain=pk&repository=repo&format=npm&namespace=team&package=lib&version=1.1.0&asset=lib-1.1.0.tgz",
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, tgz);
    assert_eq!(r.headers["x-packageversion"], "1.1.0");

    let r = c
        .api(
            "GET",
            "/v1/package/version?domain=pk&repository=repo&format=npm&package=plain&version=9.9.9",
            None,
        )
        .await;
    assert_error(&r, 404, "ResourceNotFoundException");
    assert_eq!(r.json()["resourceType"], "package-version");
    let r = c
        .api(
            "GET",
            "/v1/package?domain=pk&repository=repo&format=pip&package=plain",
            None,
        )
        .await;
    assert_error(&r, 400, "ValidationException");
}

/// DescribeDomain's `assetSizeBytes` is the size of the domain's stored assets, each
/// counted once however many versions and repositories share it; other domains' assets
/// do not count, and a deleted repository's go with it.
#[tokio::test(flavor = "multi_thread")]
async fn describe_domain_reports_the_bytes_of_its_assets() {
    let server = Server::start();
    let c = server.client();
    let size = |r: Resp| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["domain"]["assetSizeBytes"]
            .as_u64()
            .expect("a number")
    };
    let token = c.setup("sized", "one").await;
    assert_eq!(size(c.api("GET", "/v1/domain?domain=sized", None).await), 0);
    let r = c
        .api("POST", "/v1/repository?domain=sized&repository=two", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let other = c.setup("elsewhere", "repo").await;

    let (a, b, shared) = (fake_tgz(1, 5000), fake_tgz(2, 7000), fake_tgz(3, 11_000));
    let publish = [
        ("sized", "one", "a", "1.0.0", &a),
        ("sized", "one", "b", "1.0.0", &b),
        // The same bytes as two versions and in two repositories: one asset.
        ("sized", "one", "s", "1.0.0", &shared),
        ("sized", "one", "s2", "1.0.0", &shared),
        ("sized", "two", "s", "1.0.0", &shared),
        ("elsewhere", "repo", "x", "1.0.0", &a),
    ];
    for (domain, repo, name, version, tgz) in publish {
        let token = if domain == "sized" { &token } else { &other };
        let body = npm_publish_body(name, version, tgz, json!({}));
        let r = c.npm_put(token, domain, repo, name, &body).await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let all = (a.len() + b.len() + shared.len()) as u64;
    assert_eq!(
        size(c.api("GET", "/v1/domain?domain=sized", None).await),
        all
    );
    let other_size = size(c.api("GET", "/v1/domain?domain=elsewhere", None).await);
    assert_eq!(other_size, a.len() as u64);

    let r = c
        .api("DELETE", "/v1/repository?domain=sized&repository=one", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        size(c.api("GET", "/v1/domain?domain=sized", None).await),
        shared.len() as u64
    );
}
