use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use granary_cluster_tests::client::{NodeClient, Repo};
use granary_cluster_tests::cluster::Cluster;
use granary_cluster_tests::faults::in_ci;
use granary_cluster_tests::invariants::{
    blobs_resolve, no_lost_ack, replicas_converge, single_leader,
};
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::{Oracle, Publish};
use granary_cluster_tests::poll;

/// How long a scenario waits for a number of acknowledgements.
pub(crate) const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// True when `tool` is on the PATH; under `CI=true` a missing tool fails the test.
pub(crate) fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !in_ci(),
            "{tool} is required for this test under CI=true (run scripts/install-test-deps.sh)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Waits until the oracle holds at least `n` acknowledgements.
pub(crate) async fn wait_acks(oracle: &Oracle, n: usize, load: &Load, why: &str) {
    let what = format!("{n} acknowledged publishes ({why})");
    poll::until(&what, ACK_TIMEOUT, || async move {
        let have = oracle.len();
        if have >= n {
            Ok(())
        } else {
            Err(format!("{have} so far; outcomes {}", load.tally()))
        }
    })
    .await;
}

/// Publishes `package@version` through `node` until a 201, retrying what the contract
/// calls retryable; records it in the oracle. An "exists" answer after an ambiguous
/// attempt counts if the node lists the version with our bytes.
pub(crate) async fn publish_acked(
    node: &NodeClient,
    repo: &Repo,
    oracle: &Oracle,
    package: &str,
    version: &str,
    bytes: Vec<u8>,
) {
    let p = Publish::new(package, version, bytes, node.node_id);
    let what = format!("{} acknowledged by node {}", p.id(), node.node_id);
    let mut ambiguous = false;
    poll::until(&what, ACK_TIMEOUT, || {
        let p = p.clone();
        let was_ambiguous = ambiguous;
        ambiguous = true;
        async move {
            match node.npm_publish(repo, package, version, &p.bytes).await {
                Ok(r) if r.status == 201 => Ok(()),
                Ok(r) if was_ambiguous && (r.status == 403 || r.status == 409) => {
                    let doc = node
                        .npm_packument(repo, package)
                        .await
                        .map_err(|e| e.to_string())?;
                    let listed = serde_json::from_slice::<serde_json::Value>(&doc.body)
                        .ok()
                        .and_then(|d| {
                            d["versions"][version]["dist"]["integrity"]
                                .as_str()
                                .map(str::to_owned)
                        });
                    if listed.as_deref() == Some(p.integrity.as_str()) {
                        Ok(())
                    } else {
                        panic!("{}: {} and not ours in the packument", p.id(), r.describe())
                    }
                }
                Ok(r) if matches!(Kind::of_response(&r), Kind::Unavailable | Kind::ServerError) => {
                    Err(r.describe())
                }
                Ok(r) => panic!("publish {}: {}", p.id(), r.describe()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    oracle.acked(p);
}

/// The invariants every scenario ends with, on nodes `ids` (all healed and running).
pub(crate) async fn final_checks(cluster: &Cluster, ids: &[u64], repo: &Repo, oracle: &Oracle) {
    replicas_converge::check(cluster, ids, repo).await;
    let clients = cluster.clients(ids);
    no_lost_ack::check(&clients, repo, oracle).await;
    blobs_resolve::check(&clients, repo, oracle).await;
    single_leader::check(&cluster.snapshots());
}

/// Runs npm with `home` as HOME and `cache` as its cache.
pub(crate) async fn npm(home: &Path, cwd: &Path, cache: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new("npm")
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("npm_config_userconfig", home.join(".npmrc"))
        .env("npm_config_cache", cache)
        .env("npm_config_update_notifier", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .env_remove("npm_config_registry")
        .env_remove("NPM_CONFIG_REGISTRY")
        .output()
        .await
        .expect("run npm");
    assert!(
        out.status.success(),
        "npm {args:?} in {} failed:\nstdout: {}\nstderr: {}",
        cwd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}
