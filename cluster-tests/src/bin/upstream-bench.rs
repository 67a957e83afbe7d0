//! Upstream benchmarks (not tests): run by `scripts/bench-upstream.sh`, reported in
//! `docs/BENCHMARKS.md` ("Upstream: cold installs and coalesced misses").
//!
//! ```text
//! upstream-bench install [TRIALS] [N]     npm install of a tree of N packages (its own
//!                                         packages in each trial), per trial:
//!                                         reference   straight from the stand-in
//!                                         cold        through app → team → store(public:npmjs)
//!                                                     of a new domain (nothing cached)
//!                                         warm        the same domain again (kept, cached)
//! upstream-bench coalesce [NODES] [REQUESTS] [MIB]
//!                                         REQUESTS concurrent GETs of one uncached MIB MiB
//!                                         tarball, round-robin over NODES nodes: how many
//!                                         reach the public registry, latency, failures
//! ```
//!
//! The public registry is the cluster-tests' stand-in (`granary_cluster_tests::standin`),
//! running in this process and counting every request; the nodes' `public:npmjs` points
//! at it. The cluster is the harness's (`GRANARY_BIN`, or the `granary` next to this
//! executable). Each run prints one JSON line of results last, on stdout; progress goes
//! to stderr (with `GRANARY_TEST_ECHO=1`, the nodes' logs too).

use std::path::Path;
use std::time::{Duration, Instant};

use granary_cluster_tests::bench::{arg, percentile};
use granary_cluster_tests::client::{NodeClient, Repo, noise};
use granary_cluster_tests::cluster::{Cluster, SETTLE_TIMEOUT};
use granary_cluster_tests::standin::{Counts, NpmVersion, StandIn, cluster_with, dependency_tree};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// How long one tarball GET of the coalesce run may take before it counts as failed.
const GET_TIMEOUT: Duration = Duration::from_secs(300);

fn ms(d: Duration) -> f64 {
    ms_of(d.as_secs_f64() * 1e3)
}

/// Milliseconds rounded to a tenth, for the JSON.
fn ms_of(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// Median and every sample, in milliseconds.
fn summary(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({ "median_ms": percentile(&sorted, 0.5), "all_ms": samples })
}

fn counts_json(c: Counts) -> Value {
    json!({ "packuments": c.packuments, "tarballs": c.tarballs, "other": c.other })
}

/// A cluster of `nodes` whose `public:npmjs` is the stand-in (every node the same config).
async fn cluster_for(standin: &StandIn, nodes: usize) -> Cluster {
    cluster_with(standin, nodes, 300, 5000).await
}

async fn api_ok(client: &NodeClient, path: &str, body: Value) {
    let r = client
        .api("POST", path, Some(&body))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    assert_eq!(r.status, 200, "POST {path}: {}", r.describe());
}

/// Creates `domain` with the repository `store` associated with `public:npmjs`, through
/// node 1; returns it with a token for the domain.
async fn store_with_connection(cluster: &Cluster, domain: &str) -> Repo {
    let store = cluster.setup(1, domain, "store").await;
    api_ok(
        &cluster.client(1),
        &format!(
            "/v1/repository/external-connection?domain={domain}&repository=store&external-connection=public:npmjs"
        ),
        json!({}),
    )
    .await;
    store
}

/// The chain app → team → store(public:npmjs) in a new `domain`; returns app.
async fn chain(cluster: &Cluster, domain: &str) -> Repo {
    let store = store_with_connection(cluster, domain).await;
    let client = cluster.client(1);
    for (repo, upstream) in [("team", "store"), ("app", "team")] {
        api_ok(
            &client,
            &format!("/v1/repository?domain={domain}&repository={repo}"),
            json!({"upstreams": [{"repositoryName": upstream}]}),
        )
        .await;
    }
    Repo {
        name: "app".to_owned(),
        ..store
    }
}

// ---- install ----

/// Runs `npm install` of a fresh project in `dir/project` depending on `{prefix}-0` (the
/// root of [`dependency_tree`]), with a fresh cache in `dir/cache` and HOME = `home`;
/// checks that all `n` packages were installed and returns how long npm ran.
async fn npm_install(home: &Path, dir: &Path, registry: &str, prefix: &str, n: usize) -> Duration {
    let project = dir.join("project");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&project).expect("mkdir project");
    let manifest = json!({
        "name": "upstream-bench-project",
        "version": "0.0.0",
        "private": true,
        "dependencies": { format!("{prefix}-0"): "^1.0.0" },
    });
    std::fs::write(project.join("package.json"), manifest.to_string()).expect("package.json");
    let started = Instant::now();
    let out = tokio::process::Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-online",
            "--registry",
            registry,
        ])
        .current_dir(&project)
        .env("HOME", home)
        .env("npm_config_userconfig", home.join(".npmrc"))
        .env("npm_config_cache", &cache)
        .env("npm_config_update_notifier", "false")
        .env_remove("npm_config_registry")
        .env_remove("NPM_CONFIG_REGISTRY")
        .output()
        .await
        .expect("run npm");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "npm install --registry {registry} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..n {
        let installed = project.join(format!("node_modules/{prefix}-{i}/package.json"));
        assert!(
            installed.is_file(),
            "npm said it installed from {registry}, but {} is missing",
            installed.display()
        );
    }
    took
}

async fn install(trials: u64, n: usize) {
    let npm_version = tokio::process::Command::new("npm")
        .arg("--version")
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .expect("npm is needed for the install benchmark");
    // Every trial installs packages of its own, so its cold run finds no public document
    // cached by an earlier trial (the node caches them per connection, across domains).
    let mut standin = StandIn::start().await;
    let prefix = |t: u64| format!("t{t}-pkg");
    for v in (0..trials).flat_map(|t| dependency_tree(&prefix(t), n)) {
        standin.add(v);
    }
    for v in dependency_tree("warm-up", n) {
        standin.add(v);
    }
    let cluster = cluster_for(&standin, 1).await;
    let base = cluster.node(1).spec().url();
    let tmp = tempfile::Builder::new()
        .prefix("upstream-bench-")
        .tempdir()
        .expect("tempdir");
    let home = tmp.path();
    std::fs::write(home.join(".npmrc"), "").expect(".npmrc");

    // npm's own files come from disk the first time: one untimed install first.
    eprintln!("warm-up: npm {npm_version}, one install from the stand-in");
    npm_install(home, &home.join("warm-up"), &standin.url(), "warm-up", n).await;

    let (mut reference, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cold_upstream, mut warm_upstream) = (Vec::new(), Vec::new());
    for t in 0..trials {
        let trial = home.join(format!("trial-{t}"));
        let pkg = prefix(t);
        standin.reset_counts();
        let took = npm_install(home, &trial.join("reference"), &standin.url(), &pkg, n).await;
        reference.push(ms(took));

        // A new domain: no version kept, no public document cached.
        let domain = format!("install-{t}");
        let app = chain(&cluster, &domain).await;
        let registry = format!("{base}{}", app.npm_path());
        std::fs::write(
            home.join(".npmrc"),
            format!(
                "{}:_authToken={}\n",
                registry.trim_start_matches("http:"),
                app.token
            ),
        )
        .expect(".npmrc");
        standin.reset_counts();
        let took = npm_install(home, &trial.join("cold"), &registry, &pkg, n).await;
        cold.push(ms(took));
        cold_upstream.push(standin.requests());

        standin.reset_counts();
        let took = npm_install(home, &trial.join("warm"), &registry, &pkg, n).await;
        warm.push(ms(took));
        warm_upstream.push(standin.requests());
        eprintln!(
            "trial {t}: reference {:.0} ms, cold {:.0} ms ({:?} upstream), warm {:.0} ms ({:?} upstream)",
            reference[t as usize],
            cold[t as usize],
            cold_upstream[t as usize],
            warm[t as usize],
            warm_upstream[t as usize],
        );
        std::fs::remove_dir_all(&trial).expect("remove the trial's files");
    }
    let metrics = upstream_metrics(&cluster.client(1)).await;
    eprintln!("node 1 upstream metrics:\n{}", metrics.join("\n"));
    let (reference_s, cold_s, warm_s) = (summary(&reference), summary(&cold), summary(&warm));
    let median = |s: &Value| s["median_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{}",
        json!({
            "bench": "upstream-install",
            "nodes": 1,
            "packages": n,
            "trials": trials,
            "npm": npm_version,
            "reference": reference_s,
            "cold": cold_s,
            "warm": warm_s,
            "cold_over_reference": median(&cold_s) / median(&reference_s),
            "warm_over_reference": median(&warm_s) / median(&reference_s),
            "cold_upstream": cold_upstream.into_iter().map(counts_json).collect::<Vec<_>>(),
            "warm_upstream": warm_upstream.into_iter().map(counts_json).collect::<Vec<_>>(),
        })
    );
    standin.stop().await;
}

// ---- coalesce ----

/// The `granary_upstream_*` sample lines of a node's `/metrics`.
async fn upstream_metrics(client: &NodeClient) -> Vec<String> {
    match client.raw("GET", "/metrics", &[], vec![]).await {
        Ok(r) if r.status == 200 => r
            .text()
            .lines()
            .filter(|l| l.starts_with("granary_upstream"))
            .map(str::to_owned)
            .collect(),
        Ok(r) => vec![format!("/metrics: {}", r.describe())],
        Err(e) => vec![format!("/metrics: {e}")],
    }
}

/// What one tarball GET got.
struct Got {
    /// Body bytes.
    len: u64,
    /// SHA-256 of the body, hex.
    sha256: String,
    /// From sending the request to the response's headers.
    ttfb: Duration,
}

/// One GET of the tarball on its own connection, the body hashed as it streams in; `Ok`
/// for a 200.
async fn get_tarball(http: &reqwest::Client, url: &str, token: &str) -> Result<Got, String> {
    let started = Instant::now();
    let mut r = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let ttfb = started.elapsed();
    let status = r.status().as_u16();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = r
        .chunk()
        .await
        .map_err(|e| format!("body after {len} bytes: {e}"))?
    {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    if status != 200 {
        return Err(format!("HTTP {status} ({len} bytes)"));
    }
    Ok(Got {
        len,
        sha256: hex::encode(hasher.finalize()),
        ttfb,
    })
}

async fn coalesce(nodes: usize, requests: usize, mib: usize) {
    let mut standin = StandIn::start().await;
    let big =
        NpmVersion::new("big", "1.0.0").file("blob.bin", noise(mib << 20, 0x9E37_79B9_7F4A_7C15));
    standin.add(big.clone());
    let tarball = standin.tarball_bytes("big", "1.0.0");
    let want = hex::encode(Sha256::digest(&tarball));
    let cluster = cluster_for(&standin, nodes).await;
    let store = store_with_connection(&cluster, "coalesce").await;
    let ids = cluster.ids();
    cluster.wait_converged(&ids, SETTLE_TIMEOUT).await;

    let packument = cluster
        .client(1)
        .npm_packument(&store, "big")
        .await
        .expect("packument");
    assert_eq!(packument.status, 200, "packument: {}", packument.describe());
    let url = packument.json()["versions"]["1.0.0"]["dist"]["tarball"]
        .as_str()
        .expect("the packument has a tarball URL")
        .to_owned();
    let base1 = cluster.node(1).spec().url();
    let path = url
        .strip_prefix(&base1)
        .unwrap_or_else(|| panic!("the tarball URL {url} is not under node 1's {base1}"))
        .to_owned();
    let urls: Vec<String> = ids
        .iter()
        .map(|&id| format!("{}{path}", cluster.node(id).spec().url()))
        .collect();
    let before = standin.requests();

    eprintln!(
        "{requests} concurrent GETs of a {} byte tarball over {nodes} node(s)",
        tarball.len()
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(GET_TIMEOUT)
        .build()
        .expect("http client");
    let started = Instant::now();
    let tasks: Vec<_> = (0..requests)
        .map(|i| {
            let node = ids[i % ids.len()];
            let (http, url, token) = (
                http.clone(),
                urls[i % urls.len()].clone(),
                store.token.clone(),
            );
            tokio::spawn(async move {
                let t = Instant::now();
                let outcome = get_tarball(&http, &url, &token).await;
                (node, t.elapsed(), outcome)
            })
        })
        .collect();
    let (mut latencies, mut ttfbs, mut ok, mut failed, mut bytes) =
        (Vec::new(), Vec::new(), 0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut slowest: Vec<(f64, Value)> = Vec::new();
    for task in tasks {
        let (node, took, outcome) = task.await.expect("GET task");
        let took = took.as_secs_f64() * 1e3;
        latencies.push(took);
        let ttfb = outcome.as_ref().ok().map(|g| ms(g.ttfb));
        slowest.push((
            took,
            json!({"node": node, "ms": ms_of(took), "ttfb_ms": ttfb}),
        ));
        let why = match outcome {
            Ok(got) if got.sha256 == want => {
                ok += 1;
                bytes += got.len;
                ttfbs.push(got.ttfb.as_secs_f64() * 1e3);
                continue;
            }
            Ok(got) => format!("{} bytes with sha256 {}", got.len, got.sha256),
            Err(why) => why,
        };
        failed += 1;
        let why = format!("node {node}: {why}");
        if errors.len() < 10 && !errors.contains(&why) {
            errors.push(why);
        }
    }
    let wall = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    ttfbs.sort_by(f64::total_cmp);
    slowest.sort_by(|a, b| b.0.total_cmp(&a.0));
    slowest.truncate(10);
    let after = standin.requests();
    let mut metrics = serde_json::Map::new();
    for &id in &ids {
        let lines = upstream_metrics(&cluster.client(id)).await;
        eprintln!("node {id} upstream metrics:\n{}", lines.join("\n"));
        metrics.insert(id.to_string(), json!(lines));
    }
    println!(
        "{}",
        json!({
            "bench": "upstream-coalesce",
            "nodes": nodes,
            "requests": requests,
            "mib": mib,
            "tarball_bytes": tarball.len(),
            "wall_ms": ms(wall),
            "ok": ok,
            "failed": failed,
            "errors": errors,
            "bytes_served": bytes,
            "served_mib_per_s": bytes as f64 / (1 << 20) as f64 / wall.as_secs_f64(),
            "upstream_tarball_requests": standin.requests_for(&big.tarball_path()),
            "upstream_packuments_before_gets": before.packuments,
            "upstream_during_gets": counts_json(Counts {
                packuments: after.packuments - before.packuments,
                tarballs: after.tarballs - before.tarballs,
                other: after.other - before.other,
            }),
            "p50_ms": percentile(&latencies, 0.5),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": latencies.last(),
            "ttfb_p50_ms": percentile(&ttfbs, 0.5),
            "ttfb_p99_ms": percentile(&ttfbs, 0.99),
            "ttfb_max_ms": ttfbs.last(),
            "slowest": slowest.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            "metrics": metrics,
        })
    );
    standin.stop().await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("install") => install(arg(2, 5), arg(3, 50) as usize).await,
        Some("coalesce") => {
            coalesce(
                arg(2, 1) as usize,
                arg(3, 1000) as usize,
                arg(4, 10) as usize,
            )
            .await
        }
        _ => {
            eprintln!(
                "usage: upstream-bench install [TRIALS] [N] | coalesce [NODES] [REQUESTS] [MIB]"
            );
            std::process::exit(2);
        }
    }
}
