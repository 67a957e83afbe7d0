use granary_cluster_tests::cluster::{Cluster, SETTLE_TIMEOUT};
use granary_cluster_tests::invariants::{blobs_resolve, no_lost_ack};
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, wait_acks};

/// SIGKILL the leader in the middle of a burst of publishes sent to every node: every
/// publish a client saw acknowledged is readable, with its bytes, from both survivors;
/// the survivors elect a new leader and keep acknowledging; the old leader restarts on
/// its data and converges with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_during_publish_burst_loses_no_acknowledged_publish() {
    let seed = Seed::from_env();
    let mut cluster = Cluster::start(seed, 3).await;
    cluster.observe();
    let all = cluster.ids();
    let repo = cluster.setup(1, "failover", "repo").await;
    let oracle = Oracle::new();
    let load = Load::publishers(
        cluster.clients(&all),
        &repo,
        &oracle,
        &seed.rng("publishers"),
        6,
    );
    wait_acks(&oracle, 100, &load, "the burst is under way").await;

    let old = cluster.leader().await;
    cluster.kill(old);
    let survivors = cluster.ids_except(old);
    let new = cluster.wait_leader(&survivors, SETTLE_TIMEOUT).await;
    assert_ne!(new, old, "a SIGKILLed node is still named leader");
    let after_kill = oracle.len();
    wait_acks(
        &oracle,
        after_kill + 60,
        &load,
        "publishes continue after failover",
    )
    .await;
    let tally = load.stop().await;
    eprintln!("publish outcomes: {tally}");
    // Requests in flight to the dead leader end however the transport ends them; what
    // must never happen is a refused fresh version (4xx).
    tally.assert_only(
        "publishes during failover",
        &[
            Kind::Unavailable,
            Kind::Refused,
            Kind::Closed,
            Kind::Timeout,
            Kind::ServerError,
        ],
    );

    let survivors_clients = cluster.clients(&survivors);
    no_lost_ack::check(&survivors_clients, &repo, &oracle).await;
    blobs_resolve::check(&survivors_clients, &repo, &oracle).await;

    cluster.restart(old).await;
    final_checks(&cluster, &all, &repo, &oracle).await;
}
