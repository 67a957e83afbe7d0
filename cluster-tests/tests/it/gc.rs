use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use granary_cluster_tests::client::{
    NodeClient, Repo, Resp, TransportError, counter_sum, fake_tgz, noise, npm_escape,
};
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::invariants::{blobs_resolve, packument, retrying};
use granary_cluster_tests::load::Kind;
use granary_cluster_tests::oracle::{Oracle, Publish};
use granary_cluster_tests::poll;
use granary_cluster_tests::seed::Seed;
use serde_json::Value;

use crate::common::{ACK_TIMEOUT, final_checks, publish_acked};

/// Every node collects once a second, in segment files of 1 MiB.
const CONFIG: &str = "[blob_gc]\ninterval_secs = 1\nsegment_mib = 1\n";
/// Versions published to the repository that stays, a third through each node.
const VERSIONS: usize = 30;
/// Every `KEEP_EVERY`-th of them is kept; the others are unpublished.
const KEEP_EVERY: usize = 4;
/// Versions published to the repository that is deleted (besides one whose bytes are a
/// kept version's).
const SCRATCH: usize = 6;
/// How long the collectors get to remove what is unreferenced and compact.
const GC_TIMEOUT: Duration = Duration::from_secs(60);

const COLLECTED: &str = "granary_blobs_collected_total";
const COMPACTED: &str = "granary_blob_segments_compacted_total";
const RECLAIMED: &str = "granary_blob_bytes_reclaimed_total";
const PASSES: &str = "granary_blob_gc_passes_total";
const PULLS: &str = "granary_peer_blob_pulls_total";

/// What a node's `/metrics` says about its blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    collected: u64,
    compacted: u64,
    reclaimed: u64,
    passes: u64,
    /// Blobs pulled from peers (every transport): a node that lost none of its own
    /// pulls none once it holds them all.
    pulls: u64,
}

async fn counters(node: &NodeClient) -> Result<Counters, String> {
    let r = node
        .raw("GET", "/metrics", &[], vec![])
        .await
        .map_err(|e| format!("node {}: /metrics: {e}", node.node_id))?;
    if r.status != 200 {
        return Err(format!("node {}: /metrics: {}", node.node_id, r.describe()));
    }
    let text = r.text();
    Ok(Counters {
        collected: counter_sum(&text, COLLECTED),
        compacted: counter_sum(&text, COMPACTED),
        reclaimed: counter_sum(&text, RECLAIMED),
        passes: counter_sum(&text, PASSES),
        pulls: counter_sum(&text, PULLS),
    })
}

/// Every node's counters, waiting out a node that does not answer yet.
async fn all_counters(clients: &[NodeClient]) -> BTreeMap<u64, Counters> {
    let mut out = BTreeMap::new();
    for c in clients {
        let what = format!("node {}'s /metrics", c.node_id);
        out.insert(
            c.node_id,
            poll::until(&what, SETTLE_TIMEOUT, || counters(c)).await,
        );
    }
    out
}

/// A write's answer: `Ok` for a 2xx, `Err` (retry) for what the contract calls
/// retryable or a transport failure; anything else fails the test.
fn answer(what: &str, sent: Result<Resp, TransportError>) -> Result<Resp, String> {
    match sent {
        Ok(r) if (200..300).contains(&r.status) => Ok(r),
        Ok(r) if matches!(Kind::of_response(&r), Kind::Unavailable) => {
            Err(format!("{what}: {}", r.describe()))
        }
        Ok(r) => panic!("{what}: {}", r.describe()),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The document npm edits and sends back (`GET <name>?write=true`).
async fn write_doc(node: &NodeClient, repo: &Repo, package: &str) -> Result<Value, String> {
    let path = format!("{}{}?write=true", repo.npm_path(), npm_escape(package));
    let auth = [("authorization", format!("Bearer {}", repo.token))];
    let r = answer(
        &format!("GET {path} from node {}", node.node_id),
        node.raw("GET", &path, &auth, vec![]).await,
    )?;
    Ok(r.json())
}

fn rev_of(doc: &Value) -> Result<String, String> {
    doc["_rev"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no _rev in the document for writing: {doc}"))
}

/// `npm unpublish package@version` through `node`, as the npm client sends it: the
/// document for writing, sent back without the version (`latest` moved to the highest
/// version left) to `-rev/<rev>`, then the tarball's delete. A retry after an answer
/// that never came finds the version gone already and finishes with the delete.
async fn unpublish(node: &NodeClient, repo: &Repo, package: &str, version: &str) {
    let what = format!(
        "unpublish {package}@{version} through node {}",
        node.node_id
    );
    poll::until(&what, ACK_TIMEOUT, || async {
        let base = format!("{}{}", repo.npm_path(), npm_escape(package));
        let auth = ("authorization", format!("Bearer {}", repo.token));
        let mut doc = write_doc(node, repo, package).await?;
        if doc["versions"].get(version).is_some() {
            let rev = rev_of(&doc)?;
            let versions = doc["versions"]
                .as_object_mut()
                .ok_or("the document's versions are not an object")?;
            versions.remove(version);
            let highest = versions
                .keys()
                .filter_map(|v| semver::Version::parse(v).ok())
                .max()
                .ok_or("unpublishing the last version")?;
            if doc["dist-tags"]["latest"] == version {
                doc["dist-tags"]["latest"] = Value::String(highest.to_string());
            }
            let path = format!("{base}/-rev/{rev}");
            answer(
                &format!("PUT {path}"),
                node.raw(
                    "PUT",
                    &path,
                    &[auth.clone(), ("content-type", "application/json".into())],
                    doc.to_string().into_bytes(),
                )
                .await,
            )?;
            doc = write_doc(node, repo, package).await?;
        }
        let path = format!("{base}/-/{package}-{version}.tgz/-rev/{}", rev_of(&doc)?);
        answer(
            &format!("DELETE {path}"),
            node.raw("DELETE", &path, &[auth], vec![]).await,
        )?;
        Ok(())
    })
    .await;
}

/// `DeleteRepository` through `node`; a 404 after an answer that never came counts.
async fn delete_repository(node: &NodeClient, repo: &Repo) {
    let path = format!(
        "/v1/repository?domain={}&repository={}",
        repo.domain, repo.name
    );
    let what = format!("DELETE {path} through node {}", node.node_id);
    let mut ambiguous = false;
    poll::until(&what, ACK_TIMEOUT, || {
        let was_ambiguous = ambiguous;
        ambiguous = true;
        let path = &path;
        async move {
            match node.api("DELETE", path, None).await {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) if was_ambiguous && r.status == 404 => Ok(()),
                Ok(r) if matches!(Kind::of_response(&r), Kind::Unavailable) => Err(r.describe()),
                Ok(r) => panic!("DELETE {path}: {}", r.describe()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
}

/// Every publish of `gone` is a 404 from each of `nodes`.
async fn assert_gone(nodes: &[NodeClient], repo: &Repo, gone: &[Publish]) {
    let mut problems = Vec::new();
    for node in nodes {
        for p in gone {
            let what = format!("node {}: tarball {} in {}", node.node_id, p.id(), repo.name);
            match retrying(&what, || node.npm_tarball(repo, &p.package, &p.version)).await {
                Ok(r) if r.status == 404 => {}
                Ok(r) => problems.push(format!("{what}: {}, not a 404", r.describe())),
                Err(e) => problems.push(e),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "removed versions still served:\n  {}",
        problems.join("\n  ")
    );
}

/// Each node's packument of every package in `kept` lists exactly the kept versions.
async fn assert_listed_exactly(nodes: &[NodeClient], repo: &Repo, kept: &Oracle) {
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in kept.acknowledged() {
        want.entry(p.package).or_default().insert(p.version);
    }
    for node in nodes {
        for (package, versions) in &want {
            let doc = packument(node, repo, package)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("node {}: {package} is a 404", node.node_id));
            let listed: BTreeSet<String> = doc["versions"]
                .as_object()
                .map(|v| v.keys().cloned().collect())
                .unwrap_or_default();
            assert_eq!(
                &listed, versions,
                "node {}: versions of {package} listed",
                node.node_id
            );
        }
    }
}

/// Npm versions are unpublished and a repository is deleted, with every node collecting
/// its blobs once a second in 1 MiB segments. Every node removes exactly the blobs
/// nothing refers to any more (one per unpublished version and per version of the
/// deleted repository, not one the repository shared with a kept version) and compacts
/// segment files, so its `blobs/*.seg` take less space than before; every kept version
/// stays readable from every node, byte for byte, from the node's own disk (no node
/// pulls a blob from a peer afterwards), also after a SIGKILL and restart; the removed
/// ones are 404 everywhere; and a new version made of the bytes of a removed one is
/// stored again and served by every node, through further passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreferenced_blobs_are_collected_on_every_node_and_nothing_referenced_is_lost() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("blob gc");
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            config_toml: Some(CONFIG.into()),
            rust_log: Some("warn,granary_node::cluster::gc=info".into()),
            ..Options::default()
        },
    )
    .await;
    cluster.observe();
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    let repo = cluster.setup(1, "gc", "repo").await;
    let scratch = cluster.setup(2, "gc", "scratch").await;

    // 30 versions of 100–300 KiB through every node: several 1 MiB segments each.
    let published = Oracle::new();
    let (mut kept_list, mut removed) = (Vec::new(), Vec::new());
    for i in 0..VERSIONS {
        let node = &clients[i % clients.len()];
        let size = rng.range(100 << 10, 300 << 10) as usize;
        let p = Publish::new(
            &format!("gc-{}", i % 3),
            &format!("1.0.{i}"),
            fake_tgz(&noise(size, rng.next_u64())),
            node.node_id,
        );
        publish_acked(
            node,
            &repo,
            &published,
            &p.package,
            &p.version,
            p.bytes.to_vec(),
        )
        .await;
        if i % KEEP_EVERY == 0 {
            kept_list.push(p);
        } else {
            removed.push(p);
        }
    }
    // The repository to delete: versions of their own, and one with a kept version's
    // bytes (one blob, still referenced after the deletion).
    let scratch_oracle = Oracle::new();
    let mut scratch_only = Vec::new();
    for j in 0..SCRATCH {
        let node = &clients[(j + 1) % clients.len()];
        let size = rng.range(100 << 10, 300 << 10) as usize;
        let p = Publish::new(
            &format!("tmp-{}", j % 2),
            &format!("1.0.{j}"),
            fake_tgz(&noise(size, rng.next_u64())),
            node.node_id,
        );
        publish_acked(
            node,
            &scratch,
            &scratch_oracle,
            &p.package,
            &p.version,
            p.bytes.to_vec(),
        )
        .await;
        scratch_only.push(p);
    }
    let shared = rng.choose(&kept_list);
    let shared_node = &clients[rng.below(clients.len() as u64) as usize];
    publish_acked(
        shared_node,
        &scratch,
        &scratch_oracle,
        "tmp-shared",
        "1.0.0",
        shared.bytes.to_vec(),
    )
    .await;
    let shared_in_scratch = Publish::new("tmp-shared", "1.0.0", shared.bytes.to_vec(), 0);

    // Every node holds every blob (one it lacked is fetched and stored as it is read).
    blobs_resolve::check(&clients, &repo, &published).await;
    blobs_resolve::check(&clients, &scratch, &scratch_oracle).await;
    // A few passes with everything referenced: nothing collected.
    let before_passes = all_counters(&clients).await;
    poll::until(
        "two more collector passes on every node",
        GC_TIMEOUT,
        || async {
            for c in &clients {
                let now = counters(c).await?;
                if now.passes < before_passes[&c.node_id].passes + 2 {
                    return Err(format!("node {}: {now:?}", c.node_id));
                }
            }
            Ok(())
        },
    )
    .await;
    let before = all_counters(&clients).await;
    let mut before_bytes = BTreeMap::new();
    for &id in &ids {
        let c = before[&id];
        assert_eq!(
            c.collected, 0,
            "node {id} collected blobs while every blob was referenced: {c:?}"
        );
        before_bytes.insert(id, cluster.blob_file_bytes(id));
        eprintln!(
            "node {id} before: {} bytes of segments, {c:?}",
            before_bytes[&id]
        );
    }

    // Unpublish all but every fourth, through any node; delete the scratch repository.
    for p in &removed {
        let node = &clients[rng.below(clients.len() as u64) as usize];
        unpublish(node, &repo, &p.package, &p.version).await;
    }
    delete_repository(&clients[rng.below(clients.len() as u64) as usize], &scratch).await;
    let gone: BTreeSet<&str> = removed
        .iter()
        .chain(&scratch_only)
        .map(|p| p.integrity.as_str())
        .collect();
    let unreferenced = gone.len() as u64;
    assert_eq!(
        unreferenced as usize,
        removed.len() + SCRATCH,
        "distinct noise"
    );

    let what = format!("every node to collect the {unreferenced} unreferenced blobs and compact");
    poll::until(&what, GC_TIMEOUT, || async {
        let mut lagging = Vec::new();
        for c in &clients {
            let now = counters(c).await?;
            if now.collected < unreferenced || now.compacted < 1 {
                lagging.push(format!("node {}: {now:?}", c.node_id));
            }
        }
        if lagging.is_empty() {
            Ok(())
        } else {
            Err(lagging.join("; "))
        }
    })
    .await;
    let after = all_counters(&clients).await;
    for &id in &ids {
        let (b, a) = (before[&id], after[&id]);
        assert_eq!(
            a.collected, unreferenced,
            "node {id} collected other than the {unreferenced} unreferenced blobs: {a:?}"
        );
        let bytes = cluster.blob_file_bytes(id);
        eprintln!("node {id} after: {bytes} bytes of segments, {a:?}");
        assert!(
            bytes < before_bytes[&id],
            "node {id}: segments hold {bytes} bytes, {} before the collection ({a:?})",
            before_bytes[&id]
        );
        assert!(a.reclaimed > 0, "node {id}: nothing reclaimed: {a:?}");
        assert_eq!(
            (a.pulls, b.pulls),
            (b.pulls, b.pulls),
            "node {id} pulled blobs from peers during the collection: it lost some of its own"
        );
    }

    // What is kept reads back everywhere, with its bytes; what is removed is gone.
    let kept = Oracle::new();
    for p in &kept_list {
        kept.acked(p.clone());
    }
    final_checks(&cluster, &ids, &repo, &kept).await;
    assert_listed_exactly(&clients, &repo, &kept).await;
    assert_gone(&clients, &repo, &removed).await;
    let mut scratch_all = scratch_only.clone();
    scratch_all.push(shared_in_scratch);
    assert_gone(&clients, &scratch, &scratch_all).await;
    for (id, c) in all_counters(&clients).await {
        assert_eq!(
            c.pulls, before[&id].pulls,
            "node {id} pulled blobs from peers to serve the kept versions: it lost some of its \
             own ({c:?})"
        );
    }

    // SIGKILL one node and start it again on its data: it serves the kept versions from
    // its own disk, and nothing removed comes back.
    let victim = rng.choose(&ids);
    cluster.kill(victim);
    cluster.restart(victim).await;
    cluster.wait_caught_up(victim, SETTLE_TIMEOUT).await;
    let restarted = [cluster.client(victim)];
    blobs_resolve::check(&restarted, &repo, &kept).await;
    assert_gone(&restarted, &repo, &removed).await;
    assert_gone(&restarted, &scratch, &scratch_all).await;
    let c = poll::until("the restarted node's /metrics", SETTLE_TIMEOUT, || {
        counters(&restarted[0])
    })
    .await;
    assert_eq!(
        c.pulls, 0,
        "node {victim}, restarted, pulled blobs from peers: it lost some of its own ({c:?})"
    );

    // A new version with the bytes of a removed one: stored again, served everywhere,
    // and kept through further passes.
    let reborn = rng.choose(&removed);
    let via = &clients[rng.below(clients.len() as u64) as usize];
    publish_acked(
        via,
        &repo,
        &kept,
        &reborn.package,
        "2.0.0",
        reborn.bytes.to_vec(),
    )
    .await;
    let passes = all_counters(&clients).await;
    poll::until(
        "three more collector passes on every node",
        GC_TIMEOUT,
        || async {
            for c in &clients {
                let now = counters(c).await?;
                if now.passes < passes[&c.node_id].passes + 3 {
                    return Err(format!("node {}: {now:?}", c.node_id));
                }
            }
            Ok(())
        },
    )
    .await;
    final_checks(&cluster, &ids, &repo, &kept).await;
    for (id, c) in all_counters(&clients).await {
        let want = if id == victim { 0 } else { unreferenced };
        assert_eq!(
            c.collected, want,
            "node {id} collected a blob that is referenced again ({c:?})"
        );
    }

    // What the collectors logged.
    for &id in &ids {
        let out = cluster.node(id).output_tail(usize::MAX);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("blob collector") || l.contains("compaction"))
            .collect();
        eprintln!(
            "node {id}: {} collector lines:\n{}",
            lines.len(),
            lines.join("\n")
        );
        assert!(
            !out.contains("compaction could not move a blob"),
            "node {id} failed to move a live blob:\n{out}"
        );
    }
}
