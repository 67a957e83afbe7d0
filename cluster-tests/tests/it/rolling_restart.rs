use granary_cluster_tests::cluster::{Cluster, SETTLE_TIMEOUT};
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, wait_acks};

/// Restart every node in turn (SIGTERM, wait for a clean exit, start again on the same
/// data) while publishers and installers keep going through all three. No acknowledged
/// publish is lost, installs never see a stale or missing version, and clients see only
/// retryable errors: 503 with Retry-After, or a refused or closed connection to the node
/// that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_restart_under_load_loses_nothing_and_errors_are_retryable() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("rolling restart");
    let mut cluster = Cluster::start(seed, 3).await;
    cluster.observe();
    let all = cluster.ids();
    let repo = cluster.setup(1, "rolling", "repo").await;
    let oracle = Oracle::new();
    let publishers = Load::publishers(
        cluster.clients(&all),
        &repo,
        &oracle,
        &seed.rng("publishers"),
        4,
    );
    let installers = Load::readers(
        cluster.clients(&all),
        &repo,
        &oracle,
        &seed.rng("installers"),
        2,
    );
    wait_acks(&oracle, 20, &publishers, "load is under way").await;

    let mut order = all.clone();
    rng.shuffle(&mut order);
    eprintln!("rolling restart: order {order:?}");
    for id in order {
        cluster.stop_cleanly(id).await;
        let rest = cluster.ids_except(id);
        cluster.wait_leader(&rest, SETTLE_TIMEOUT).await;
        let before = oracle.len();
        wait_acks(
            &oracle,
            before + 25,
            &publishers,
            "writes while a node is down",
        )
        .await;
        cluster.restart(id).await;
        cluster.wait_caught_up(id, SETTLE_TIMEOUT).await;
    }
    let before = oracle.len();
    wait_acks(
        &oracle,
        before + 20,
        &publishers,
        "writes after the last restart",
    )
    .await;

    let mut tally = publishers.stop().await;
    let reads = installers.stop().await;
    eprintln!("rolling restart: publishes {tally}, installs {reads}");
    assert!(reads.count(Kind::Ok) > 0, "no install succeeded: {reads}");
    tally.merge(&reads);
    tally.assert_only(
        "client requests during the rolling restart",
        Kind::RETRYABLE,
    );
    final_checks(&cluster, &all, &repo, &oracle).await;
}
