//! Upstream repositories and external connections against a stand-in for the public npm
//! registry (`granary_cluster_tests::standin`), which counts every request it gets.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use futures::future::join_all;
use granary_cluster_tests::client::{NodeClient, Repo, noise, npm_publish_body};
use granary_cluster_tests::cluster::{Cluster, Options};
use granary_cluster_tests::poll;
use granary_cluster_tests::seed::Seed;
use granary_cluster_tests::standin::{
    Mode, NpmVersion, StandIn, cluster_options, cluster_with, dependency_tree,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{npm, require, write};

/// [`cluster_with`], a failed upstream asked again at once.
async fn cluster_for(standin: &StandIn, nodes: usize, ttl: u64) -> Cluster {
    cluster_with(standin, nodes, ttl, 0).await
}

async fn api_ok(client: &NodeClient, method: &str, path: &str, body: Value) -> Value {
    let r = client
        .api(method, path, Some(&body))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(r.status, 200, "{method} {path}: {}", r.describe());
    r.json()
}

/// app → team → store, store with the external connection `public:npmjs`; tokens for
/// the domain. Returns the three repositories (app, team, store).
async fn chain(cluster: &Cluster, domain: &str) -> (Repo, Repo, Repo) {
    let store = cluster.setup(1, domain, "store").await;
    let c = cluster.client(1);
    api_ok(
        &c,
        "POST",
        &format!(
            "/v1/repository/external-connection?domain={domain}&repository=store&external-connection=public:npmjs"
        ),
        json!({}),
    )
    .await;
    api_ok(
        &c,
        "POST",
        &format!("/v1/repository?domain={domain}&repository=team"),
        json!({"upstreams": [{"repositoryName": "store"}]}),
    )
    .await;
    api_ok(
        &c,
        "POST",
        &format!("/v1/repository?domain={domain}&repository=app"),
        json!({"upstreams": [{"repositoryName": "team"}]}),
    )
    .await;
    let repo = |name: &str| Repo {
        domain: domain.to_owned(),
        name: name.to_owned(),
        token: store.token.clone(),
    };
    (repo("app"), repo("team"), store)
}

/// Names of a repository's packages (ListPackages).
async fn package_names(client: &NodeClient, repo: &Repo) -> BTreeSet<String> {
    client
        .list_packages(repo)
        .await
        .expect("list packages")
        .iter()
        .map(|p| p["package"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// 1,000 concurrent requests for one uncached 10 MiB tarball through one node: the
/// stand-in sees exactly one request for it, and every requester gets the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_misses_on_one_node_cost_one_upstream_request() {
    coalesced_misses(1).await;
}

/// The same through three nodes: misses meet on the URL's owner node, so the stand-in
/// still sees one request for the tarball (and one for the package document).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_misses_on_three_nodes_cost_one_upstream_request() {
    coalesced_misses(3).await;
}

async fn coalesced_misses(nodes: usize) {
    let mut standin = StandIn::start().await;
    let big =
        NpmVersion::new("big", "1.0.0").file("blob.bin", noise(10 << 20, 0x9E37_79B9_7F4A_7C15));
    standin.add(big.clone());
    let want = sha256_hex(&standin.tarball_bytes("big", "1.0.0"));
    // Debug logs of the upstream and blob paths: a failed request's message carries the
    // nodes' last lines.
    let cluster = Cluster::start_with(
        Seed::from_env(),
        Options {
            rust_log: Some(
                "warn,granary_node::upstream=debug,granary_node::cluster::blobs=debug".into(),
            ),
            ..cluster_options(&standin, nodes, 300, 0)
        },
    )
    .await;
    let (app, _team, _store) = chain(&cluster, "coalesce").await;
    let client = cluster.client(1);

    let packument = client.npm_packument(&app, "big").await.expect("packument");
    assert_eq!(packument.status, 200, "{}", packument.describe());
    let tarball_url = packument.json()["versions"]["1.0.0"]["dist"]["tarball"]
        .as_str()
        .expect("tarball url")
        .to_owned();
    let node1 = format!("{}{}", cluster.node(1).spec().url(), app.npm_path());
    assert!(
        tarball_url.starts_with(&node1),
        "the packument sends clients back to Granary: {tarball_url}"
    );
    let path = &tarball_url[cluster.node(1).spec().url().len()..];
    let urls: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| format!("{}{path}", cluster.node(*id).spec().url()))
        .collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    // The stand-in answers after a pause, as a public registry far away does: the fetch is
    // still in flight while the 1,000 requests arrive, however loaded this machine is.
    standin.set_mode(Mode::Delay(Duration::from_millis(500)));
    let gets = (0..1000).map(|i| {
        let http = http.clone();
        let url = urls[i % urls.len()].clone();
        let token = app.token.clone();
        async move {
            let r = http.get(&url).bearer_auth(token).send().await?;
            let status = r.status().as_u16();
            let id = r
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned();
            // Hashed as it arrives: a thousand 10 MiB bodies held at once would take 10 GiB.
            let mut hasher = Sha256::new();
            let mut text = Vec::new();
            let mut chunks = r.bytes_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                hasher.update(&chunk);
                if status != 200 && text.len() < 4096 {
                    text.extend_from_slice(&chunk);
                }
            }
            let what = if status == 200 {
                hex::encode(hasher.finalize())
            } else {
                format!("{url} request {id}: {}", String::from_utf8_lossy(&text))
            };
            Ok::<_, reqwest::Error>((status, what))
        }
    });
    let results = join_all(gets).await;
    let mut ok = 0;
    for r in &results {
        match r {
            Ok((200, sha)) if *sha == want => ok += 1,
            Ok((status, what)) => {
                let logs: Vec<String> = cluster
                    .ids()
                    .iter()
                    .map(|id| cluster.node(*id).output_tail(60))
                    .collect();
                panic!(
                    "a requester got HTTP {status}: {what}\nthe nodes' output:\n{}",
                    logs.join("\n")
                )
            }
            Err(e) => panic!("a requester failed: {e}"),
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(
        standin.requests_for(&big.tarball_path()),
        1,
        "one upstream request for 1,000 concurrent misses on {nodes} node(s)"
    );
    assert_eq!(
        standin.requests().packuments,
        1,
        "one upstream request for the document"
    );
    if nodes == 1 {
        let metrics = client
            .raw("GET", "/metrics", &[], vec![])
            .await
            .expect("metrics")
            .text();
        let line = |name: &str, labels: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{{labels}}} ")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let store = r#"format="npm",repository="coalesce/store""#;
        assert_eq!(
            line(
                "granary_upstream_requests_total",
                &format!(r#"{store},kind="artifact",outcome="ok""#)
            ),
            1,
            "{metrics}"
        );
        assert!(
            line(
                "granary_upstream_coalesced_total",
                &format!(r#"{store},kind="artifact""#)
            ) > 0,
            "requests joined the fetch in flight: {metrics}"
        );
    }
    standin.stop().await;
}

/// A fresh project that depends on `deps` (name → range), installed with npm.
async fn install(home: &Path, registry: &str, dir: &str, deps: Value) -> std::path::PathBuf {
    let app = home.join(dir);
    write(
        &app.join("package.json"),
        &json!({"name": dir, "version": "0.0.0", "private": true, "dependencies": deps})
            .to_string(),
    );
    let cache = home.join(format!("cache-{dir}"));
    npm(home, &app, &cache, &["install", "--registry", registry]).await;
    app
}

fn installed_version(app: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(app.join("node_modules").join(name).join("package.json"))
        .unwrap_or_else(|e| panic!("{name} is not installed: {e}"));
    serde_json::from_str::<Value>(&text).expect("package.json")["version"]
        .as_str()
        .expect("version")
        .to_owned()
}

/// The real npm client installs a tree with transitive dependencies through app → team →
/// store(public:npmjs); the versions are kept in app and store only; with the stand-in
/// gone and the node restarted (no cached public document), a fresh install still works.
/// An internal package published to team keeps resolving over a higher public version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn npm_installs_through_a_chain_and_keeps_what_it_served() {
    if !require("npm") {
        return;
    }
    let mut standin = StandIn::start().await;
    let tree = dependency_tree("tree", 7);
    for v in &tree {
        standin.add(v.clone());
    }
    let mut cluster = cluster_for(&standin, 1, 300).await;
    let (app, team, store) = chain(&cluster, "chain").await;
    let client = cluster.client(1);

    // Dependency substitution: acme-utils is internal (published to team first); the
    // public registry then offers a higher version of the same name.
    let internal = npm_tgz("acme-utils", "1.0.0", "internal");
    let r = client
        .npm_put(
            &team,
            "acme-utils",
            npm_publish_body("acme-utils", "1.0.0", &internal)
                .to_string()
                .into_bytes(),
        )
        .await
        .expect("publish");
    assert_eq!(r.status, 201, "{}", r.describe());
    standin
        .add(NpmVersion::new("acme-utils", "9.9.9").file("index.js", "module.exports='public';"));

    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    let base = cluster.node(1).spec().url();
    let registry = format!("{base}{}", app.npm_path());
    write(
        &home.join(".npmrc"),
        &format!(
            "{}:_authToken={}\n",
            registry.trim_start_matches("http:"),
            app.token
        ),
    );
    let project = install(
        home,
        &registry,
        "first",
        json!({"tree-0": "^1.0.0", "acme-utils": "*"}),
    )
    .await;
    for i in 0..7 {
        assert_eq!(installed_version(&project, &format!("tree-{i}")), "1.0.0");
    }
    assert_eq!(
        installed_version(&project, "acme-utils"),
        "1.0.0",
        "the internal package wins over a higher public one"
    );
    assert_eq!(
        standin.requests_for("/acme-utils/-/acme-utils-9.9.9.tgz"),
        0,
        "the public acme-utils was never fetched"
    );
    let packument = client.npm_packument(&app, "acme-utils").await.expect("get");
    let versions = packument.json()["versions"].clone();
    assert!(
        versions.get("9.9.9").is_none(),
        "public versions of an internal package are not offered: {versions}"
    );

    // Retention: in app (requested) and store (connection), not in team (intermediate).
    // A version is retained in the background once its file has been served, so the last
    // ones may land just after npm is done.
    let expected: BTreeSet<String> = (0..7).map(|i| format!("tree-{i}")).collect();
    for (repo, exact) in [(&app, false), (&store, true)] {
        poll::until(
            &format!("{} to keep the tree", repo.name),
            Duration::from_secs(10),
            || async {
                let kept = package_names(&client, repo).await;
                let ok = if exact {
                    kept == expected
                } else {
                    expected.is_subset(&kept)
                };
                if ok {
                    Ok(())
                } else {
                    Err(format!("keeps {kept:?}"))
                }
            },
        )
        .await;
    }
    assert_eq!(
        package_names(&client, &team).await,
        BTreeSet::from(["acme-utils".to_owned()]),
        "team keeps only its own package"
    );
    let described = api_ok(
        &client,
        "GET",
        "/v1/package?domain=chain&repository=store&format=npm&package=tree-3",
        json!({}),
    )
    .await;
    assert_eq!(
        described["package"]["originConfiguration"]["restrictions"],
        json!({"publish": "BLOCK", "upstream": "ALLOW"}),
        "ingested first: publishing is blocked"
    );

    // Publishing to team a version its upstream (store) offers is refused (CodeArtifact's
    // 409); app holds tree-6@1.0.0 itself, so there it is npm's duplicate (403).
    let r = client
        .npm_put(
            &team,
            "tree-6",
            npm_publish_body("tree-6", "1.0.0", &npm_tgz("tree-6", "1.0.0", "x"))
                .to_string()
                .into_bytes(),
        )
        .await
        .expect("publish");
    assert_eq!(
        r.status,
        409,
        "a version reachable upstream cannot be published: {}",
        r.describe()
    );

    // The public registry goes away, and the node forgets every public document.
    standin.stop().await;
    cluster.kill(1);
    cluster.restart(1).await;
    let again = install(
        home,
        &registry,
        "second",
        json!({"tree-0": "^1.0.0", "acme-utils": "*"}),
    )
    .await;
    for i in 0..7 {
        assert_eq!(installed_version(&again, &format!("tree-{i}")), "1.0.0");
    }
}

/// A gzip-framed pseudo tarball (the registry stores bytes; npm never unpacks it here).
fn npm_tgz(name: &str, version: &str, text: &str) -> Vec<u8> {
    NpmVersion::new(name, version)
        .file("index.js", format!("module.exports = '{text}';\n"))
        .tarball()
}

/// The public registry fails, then recovers: clients see a retryable error or the stale
/// document, never a 404 remembered from the failure; a corrupted tarball is refused and
/// not kept, and the next request fetches the real one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_failures_are_never_remembered_as_missing() {
    let mut standin = StandIn::start().await;
    standin.add(NpmVersion::new("flaky", "1.0.0"));
    let cluster = cluster_with(&standin, 1, 1, 1000).await;
    let (app, _team, store) = chain(&cluster, "flaky").await;
    let client = cluster.client(1);

    standin.set_mode(Mode::Fail(500));
    let r = client.npm_packument(&app, "flaky").await.expect("get");
    assert_eq!(
        r.status,
        503,
        "an upstream 500 is a retryable error: {}",
        r.describe()
    );
    assert!(r.is_retry_later(), "{:?}", r.headers);
    // For `unavailable_backoff_ms` the failed upstream is not asked again.
    let asked = standin.requests().packuments;
    let r = client.npm_packument(&app, "flaky").await.expect("get");
    assert_eq!(r.status, 503, "{}", r.describe());
    assert_eq!(
        standin.requests().packuments,
        asked,
        "a failed upstream is left alone"
    );
    standin.set_mode(Mode::Normal);
    let recovered = poll::until(
        "the recovered upstream is served",
        Duration::from_secs(5),
        || {
            let client = client.clone();
            let app = app.clone();
            async move {
                let r = client
                    .npm_packument(&app, "flaky")
                    .await
                    .map_err(|e| e.to_string())?;
                if r.status == 200 {
                    Ok(r)
                } else {
                    assert_eq!(r.status, 503, "never a 404: {}", r.describe());
                    Err(r.describe())
                }
            }
        },
    )
    .await;
    assert!(recovered.json()["versions"].get("1.0.0").is_some());
    // Let the backoff of the failures above pass before the next ones.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Stale while down: the TTL (1 s) passes, the upstream fails, the document stays.
    standin.set_mode(Mode::Fail(502));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        let r = client.npm_packument(&app, "flaky").await.expect("get");
        assert_eq!(r.status, 200, "served stale while down: {}", r.describe());
        assert!(r.json()["versions"].get("1.0.0").is_some());
    }
    let metrics = client
        .raw("GET", "/metrics", &[], vec![])
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.contains("granary_upstream_stale_served_total"),
        "{metrics}"
    );

    // A corrupted tarball is refused and nothing is retained.
    standin.set_mode(Mode::CorruptTarballs);
    let r = client.npm_tarball(&app, "flaky", "1.0.0").await;
    assert!(
        !matches!(&r, Ok(resp) if resp.status == 200 && sha256_hex(&resp.body) == sha256_hex(&standin.tarball_bytes("flaky", "1.0.0"))),
        "corrupted bytes are never served as a complete response"
    );
    let versions = client
        .api(
            "POST",
            "/v1/package/versions?domain=flaky&repository=store&format=npm&package=flaky",
            None,
        )
        .await
        .expect("list");
    assert_eq!(
        versions.status,
        404,
        "nothing retained: {}",
        versions.describe()
    );
    standin.set_mode(Mode::Normal);
    let r = client
        .npm_tarball(&app, "flaky", "1.0.0")
        .await
        .expect("get");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(r.body, standin.tarball_bytes("flaky", "1.0.0"));
    assert_eq!(standin.requests_for("/flaky/-/flaky-1.0.0.tgz"), 2);
    // A missing package is a 404, remembered only briefly.
    let r = client.npm_packument(&store, "nope").await.expect("get");
    assert_eq!(r.status, 404, "{}", r.describe());
    standin.stop().await;
}

/// CodeArtifact's search order and limits, seen through package documents: the
/// repository, then its upstreams in list order, depth-first; the nearest copy of a
/// version wins, tags from further upstream win; at most 25 repositories are searched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resolution_is_depth_first_and_bounded() {
    let cluster = Cluster::start(Seed::from_env(), 1).await;
    let top = cluster.setup(1, "order", "top").await;
    let c = cluster.client(1);
    let repo = |name: &str| Repo {
        domain: "order".to_owned(),
        name: name.to_owned(),
        token: top.token.clone(),
    };
    // top → [ra, rb]; ra → [rc, rd]; rd → [re]. Search order: top, ra, rc, rd, re, rb.
    for (name, upstreams) in [
        ("re", vec![]),
        ("rc", vec![]),
        ("rd", vec!["re"]),
        ("ra", vec!["rc", "rd"]),
        ("rb", vec![]),
    ] {
        let ups: Vec<Value> = upstreams
            .iter()
            .map(|u| json!({"repositoryName": u}))
            .collect();
        api_ok(
            &c,
            "POST",
            &format!("/v1/repository?domain=order&repository={name}"),
            json!({"upstreams": ups}),
        )
        .await;
    }
    api_ok(
        &c,
        "PUT",
        "/v1/repository?domain=order&repository=top",
        json!({"upstreams": [{"repositoryName": "ra"}, {"repositoryName": "rb"}]}),
    )
    .await;
    let publish = |repo: Repo, version: &'static str, text: &'static str| {
        let c = c.clone();
        async move {
            let body = npm_publish_body("pkg", version, &npm_tgz("pkg", version, text));
            let r = c
                .npm_put(&repo, "pkg", body.to_string().into_bytes())
                .await
                .expect("publish");
            assert_eq!(r.status, 201, "{}", r.describe());
        }
    };
    // 1.0.0 in re and in rb: re comes first (depth-first through ra). 2.0.0 only in rb,
    // searched last, so its `latest` wins the tag.
    publish(repo("re"), "1.0.0", "from re").await;
    publish(repo("rb"), "1.0.0", "from rb").await;
    publish(repo("rb"), "2.0.0", "from rb").await;
    publish(repo("rc"), "0.5.0", "from rc").await;
    let doc = c.npm_packument(&top, "pkg").await.expect("get").json();
    let versions: BTreeSet<&str> = doc["versions"]
        .as_object()
        .expect("versions")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(versions, BTreeSet::from(["0.5.0", "1.0.0", "2.0.0"]));
    assert_eq!(doc["dist-tags"]["latest"], "2.0.0");
    let tgz = c.npm_tarball(&top, "pkg", "1.0.0").await.expect("get");
    assert_eq!(tgz.status, 200, "{}", tgz.describe());
    assert_eq!(
        tgz.body,
        npm_tgz("pkg", "1.0.0", "from re"),
        "re is found before rb"
    );

    // A straight line of 27 repositories: l0 → l1 → … → l26, the package only in l26.
    for i in (0..27).rev() {
        let body = if i == 26 {
            json!({})
        } else {
            json!({"upstreams": [{"repositoryName": format!("l{}", i + 1)}]})
        };
        api_ok(
            &c,
            "POST",
            &format!("/v1/repository?domain=order&repository=l{i}"),
            body,
        )
        .await;
    }
    publish(repo("l26"), "1.0.0", "deep").await;
    // From l2, l26 is the 25th repository searched; from l1 it would be the 26th.
    let found = c.npm_packument(&repo("l2"), "pkg").await.expect("get");
    assert_eq!(found.status, 200, "{}", found.describe());
    let beyond = c.npm_packument(&repo("l1"), "pkg").await.expect("get");
    assert_eq!(beyond.status, 404, "{}", beyond.describe());
}
