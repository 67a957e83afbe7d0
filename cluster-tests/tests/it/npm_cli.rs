use granary_cluster_tests::cluster::Cluster;
use granary_cluster_tests::seed::Seed;

use crate::common::{npm, require, write};

/// The real npm CLI publishes through node 1; right away, `npm install` through node 2
/// gets it: reads on any node see every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn npm_publish_to_one_node_then_install_from_another_at_once() {
    if !require("npm") {
        return;
    }
    let seed = Seed::from_env();
    let cluster = Cluster::start(seed, 3).await;
    let repo = cluster.setup(1, "npmcli", "repo").await;
    let home = tempfile::tempdir().expect("tempdir");
    let home = home.path();
    // What `aws codeartifact login --tool npm` writes, for both nodes' endpoints.
    let registry = |id: u64| format!("{}{}", cluster.node(id).spec().url(), repo.npm_path());
    let mut npmrc = String::new();
    for id in [1, 2] {
        let r = registry(id);
        let host_path = r.trim_start_matches("http:");
        npmrc.push_str(&format!("{host_path}:_authToken={}\n", repo.token));
        npmrc.push_str(&format!("{host_path}:always-auth=true\n"));
    }
    write(&home.join(".npmrc"), &npmrc);

    let source = "module.exports = () => 'hello from a granary cluster';\n";
    let lib = home.join("src/hello");
    write(
        &lib.join("package.json"),
        r#"{"name":"cluster-hello","version":"1.0.0","description":"cluster test","main":"index.js","license":"MIT"}"#,
    );
    write(&lib.join("index.js"), source);
    npm(
        home,
        &lib,
        &home.join("npm-cache"),
        &["publish", "--registry", &registry(1)],
    )
    .await;

    let app = home.join("app");
    write(
        &app.join("package.json"),
        r#"{"name":"app","version":"0.0.0","private":true}"#,
    );
    npm(
        home,
        &app,
        &home.join("npm-cache"),
        &["install", "cluster-hello@1.0.0", "--registry", &registry(2)],
    )
    .await;
    let installed = std::fs::read_to_string(app.join("node_modules/cluster-hello/index.js"))
        .expect("npm installed cluster-hello");
    assert_eq!(installed, source);
    let lock = std::fs::read_to_string(app.join("package-lock.json")).expect("package-lock");
    assert!(
        lock.contains(&cluster.node(2).spec().http.to_string())
            || lock.contains(&cluster.node(1).spec().http.to_string()),
        "the tarball came from neither node: {lock}"
    );
}
