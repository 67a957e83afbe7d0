use std::time::Instant;

use granary_cluster_tests::balancer::Balancer;
use granary_cluster_tests::client::counter_sum;
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::faults::Firewall;
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::poll::until;
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, wait_acks};

/// Publishers and readers through the balancer; returns once `acks` more publishes were
/// acknowledged, with the outcomes of both.
async fn through(
    balancer: &Balancer,
    phase: &str,
    repo: &granary_cluster_tests::client::Repo,
    oracle: &Oracle,
    seed: &Seed,
    acks: usize,
) -> (
    granary_cluster_tests::load::Tally,
    granary_cluster_tests::load::Tally,
) {
    let targets = vec![balancer.client()];
    let publishers = Load::publishers_of(
        phase,
        targets.clone(),
        repo,
        oracle,
        &seed.rng(&format!("{phase} publishers")),
        3,
    );
    let readers = Load::readers(
        targets,
        repo,
        oracle,
        &seed.rng(&format!("{phase} readers")),
        2,
    );
    wait_acks(oracle, oracle.len() + acks, &publishers, phase).await;
    let (published, read) = (publishers.stop().await, readers.stop().await);
    eprintln!("load balancer: {phase}: publishes {published}, reads {read}");
    (published, read)
}

/// Three nodes behind haproxy, which checks each node's `/readyz` as an operator's load
/// balancer would. One node (chosen by the seed: the leader or a follower) is cut off
/// from its peers with iptables: it finds itself cut off (a follower from its rounds of
/// status asks, a leader from its quorum's silence), its `/readyz` turns 503, and haproxy
/// takes it out of rotation. From then on every publish and every install through the
/// balancer succeeds: clients never meet the cut-off node's refusals. Healed, the node
/// comes back into rotation, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_leaves_the_balancers_rotation_and_clients_see_no_errors() {
    let Some(mut firewall) = Firewall::require() else {
        return;
    };
    let seed = Seed::from_env();
    let mut rng = seed.rng("load balancer");
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            faults: true,
            ..Options::default()
        },
    )
    .await;
    cluster.observe();
    let all = cluster.ids();
    let fronts: Vec<(u64, String)> = all
        .iter()
        .map(|id| {
            let base = cluster.client(*id).base;
            (*id, base.trim_start_matches("http://").to_owned())
        })
        .collect();
    let Some(balancer) = Balancer::require(&fronts) else {
        return;
    };
    let repo = cluster.setup(1, "balanced", "repo").await;
    let oracle = Oracle::new();
    until("every node in rotation", SETTLE_TIMEOUT, || async {
        let states = balancer.states().await?;
        if states.len() == all.len() && states.iter().all(|(_, s)| s == "UP") {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;

    // Every node in rotation: nothing but successes.
    let (published, read) = through(&balancer, "before", &repo, &oracle, &seed, 30).await;
    published.assert_only("publishes through the balancer, every node up", &[]);
    read.assert_only("installs through the balancer, every node up", &[]);

    // Cut one node off.
    let isolated = rng.choose(&all);
    let majority = cluster.ids_except(isolated);
    let leader_before = cluster.leader().await;
    eprintln!("load balancer: isolating node {isolated} (leader before: node {leader_before})");
    firewall.isolate(&cluster.net(isolated), &cluster.nets(&majority));
    let cut_at = Instant::now();
    let node = cluster.client(isolated);
    until(
        &format!("node {isolated} out of the balancer's rotation"),
        SETTLE_TIMEOUT,
        || async {
            if balancer.in_rotation(isolated).await? {
                Err(format!("still in; {:?}", balancer.states().await?))
            } else {
                Ok(())
            }
        },
    )
    .await;
    eprintln!(
        "load balancer: node {isolated} out of rotation {:?} after the cut",
        cut_at.elapsed()
    );
    let metrics = node.metrics().await.expect("the isolated node's metrics");
    assert_eq!(
        counter_sum(&metrics, "granary_raft_cut_off"),
        1,
        "node {isolated} out of rotation, but not for being cut off"
    );
    cluster.wait_leader(&majority, SETTLE_TIMEOUT).await;

    // Out of rotation: every request through the balancer goes to the majority, and
    // every one succeeds (a request that arrives while the majority elects a leader
    // waits for it).
    let (published, read) = through(&balancer, "cut", &repo, &oracle, &seed, 40).await;
    published.assert_only("publishes through the balancer, one node cut off", &[]);
    read.assert_only("installs through the balancer, one node cut off", &[]);

    // Healed: back in rotation; while it rejoins, what a client meets is retryable.
    firewall.heal();
    let healed = Instant::now();
    until(
        &format!("node {isolated} back in the balancer's rotation"),
        SETTLE_TIMEOUT,
        || async {
            match balancer.states().await? {
                s if s.iter().all(|(_, s)| s == "UP") => Ok(()),
                s => Err(format!("{s:?}")),
            }
        },
    )
    .await;
    eprintln!(
        "load balancer: node {isolated} back in rotation {:?} after healing",
        healed.elapsed()
    );
    let (published, read) = through(&balancer, "healed", &repo, &oracle, &seed, 30).await;
    published.assert_only("publishes through the balancer, healed", Kind::RETRYABLE);
    read.assert_only("installs through the balancer, healed", Kind::RETRYABLE);

    cluster.wait_converged(&all, SETTLE_TIMEOUT).await;
    final_checks(&cluster, &all, &repo, &oracle).await;
}
