use std::time::Instant;

use granary_cluster_tests::balancer::Balancer;
use granary_cluster_tests::client::{Repo, counter_sum};
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::faults::Firewall;
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::poll::until;
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, wait_acks};

/// How long a stopping node serves on with `/readyz` at 503 in these scenarios, as in the
/// shipped cluster configs: well above haproxy's two failed checks 100 ms apart, and
/// above the two heartbeats a stopping leader still sends, the followers' lease
/// (`election_timeout_max`, 800 ms) and a look of the election gate, after which its
/// successor takes over (~1.2 s), with room for a busy machine.
const DRAIN_MS: u64 = 2000;

/// Three nodes started with `options`, haproxy in front of them once it has each in
/// rotation, and a repository in `domain` (`None` without haproxy, outside CI).
async fn start_balanced(
    seed: Seed,
    options: Options,
    domain: &str,
) -> Option<(Cluster, Balancer, Repo)> {
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            ..options
        },
    )
    .await;
    cluster.observe();
    let fronts: Vec<(u64, String)> = cluster
        .ids()
        .iter()
        .map(|id| {
            let base = cluster.client(*id).base;
            (*id, base.trim_start_matches("http://").to_owned())
        })
        .collect();
    let balancer = Balancer::require(&fronts)?;
    all_in_rotation(&balancer, "every node in rotation").await;
    let repo = cluster.setup(1, domain, "repo").await;
    Some((cluster, balancer, repo))
}

/// Waits until haproxy has every node in rotation.
async fn all_in_rotation(balancer: &Balancer, what: &str) {
    until(what, SETTLE_TIMEOUT, || async {
        let states = balancer.states().await?;
        if !states.is_empty() && states.iter().all(|(_, s)| s == "UP") {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;
}

/// Publishers and readers through the balancer; returns once `acks` more publishes were
/// acknowledged, with the outcomes of both.
async fn through(
    balancer: &Balancer,
    phase: &str,
    repo: &Repo,
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
    let options = Options {
        faults: true,
        ..Options::default()
    };
    let Some((mut cluster, balancer, repo)) = start_balanced(seed, options, "balanced").await
    else {
        return;
    };
    let all = cluster.ids();
    let oracle = Oracle::new();

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
    all_in_rotation(
        &balancer,
        &format!("node {isolated} back in the balancer's rotation"),
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

/// Three nodes behind haproxy, restarted one after another (the leader among them, in an
/// order the seed picks) with SIGTERM while clients publish and install through the
/// balancer without pause. Each stopping node drains (`shutdown_drain_ms`): its `/readyz`
/// answers 503 while it still serves, haproxy takes it out, the requests it holds are
/// answered, and only then does it stop taking connections. The leader, draining, hands
/// over: its successor leads before it has stopped. Restarted on its data, a node comes
/// back into rotation; a follower's restart leaves the leader and its term as they were.
/// Clients meet no error at all, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_behind_the_balancer_shows_clients_no_errors() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("rolling restart behind the balancer");
    let options = Options {
        config_toml: Some(format!("shutdown_drain_ms = {DRAIN_MS}\n")),
        ..Options::default()
    };
    let Some((mut cluster, balancer, repo)) = start_balanced(seed, options, "drained").await else {
        return;
    };
    let all = cluster.ids();
    let oracle = Oracle::new();
    let targets = vec![balancer.client()];
    let publishers = Load::publishers(targets.clone(), &repo, &oracle, &seed.rng("publishers"), 3);
    let installers = Load::readers(targets, &repo, &oracle, &seed.rng("installers"), 2);
    wait_acks(&oracle, 20, &publishers, "load through the balancer").await;

    let mut order = all.clone();
    rng.shuffle(&mut order);
    eprintln!("load balancer: restarting {order:?}");
    for id in order {
        let leader = cluster.leader().await;
        let term = cluster
            .status(leader)
            .await
            .expect("the leader's status")
            .term;
        let stopping = Instant::now();
        cluster.stop_cleanly(id).await;
        let stopped_in = stopping.elapsed();
        let rest = cluster.ids_except(id);
        if id == leader {
            // The leader named a successor as it began to drain, which took over once the
            // followers' lease had run out: there is a new leader already, before the
            // followers could have timed out on the old one.
            let s = cluster.status(rest[0]).await.expect("a survivor's status");
            assert!(
                s.leader_id.is_some_and(|l| l != id),
                "node {id} led and has stopped, but node {} still knows no other leader: {:?}",
                rest[0],
                s.leader_id
            );
        }
        assert!(
            !balancer.in_rotation(id).await.expect("haproxy's states"),
            "node {id} stopped while haproxy still had it in rotation"
        );
        eprintln!(
            "load balancer: node {id} (leader: node {leader}) drained and stopped in \
             {stopped_in:?}; outcomes so far: publishes {}, installs {}",
            publishers.tally(),
            installers.tally()
        );
        cluster.wait_leader(&rest, SETTLE_TIMEOUT).await;
        wait_acks(
            &oracle,
            oracle.len() + 20,
            &publishers,
            "writes while a node is down",
        )
        .await;
        cluster.restart(id).await;
        cluster.wait_caught_up(id, SETTLE_TIMEOUT).await;
        all_in_rotation(&balancer, &format!("node {id} back in rotation")).await;
        if id != leader {
            // A follower restarted hears nobody until the leader's replication reaches it
            // again; it must not campaign meanwhile (the others hear the leader, see the
            // election gate), which would depose the leader with its raised term.
            let s = cluster.status(leader).await.expect("the leader's status");
            assert_eq!(
                (s.leader_id, s.term),
                (Some(leader), term),
                "node {id}, a follower, restarted and the leader changed"
            );
        }
    }
    wait_acks(
        &oracle,
        oracle.len() + 20,
        &publishers,
        "writes after the last restart",
    )
    .await;
    let published = publishers.stop().await;
    let read = installers.stop().await;
    eprintln!("load balancer: rolling restart: publishes {published}, installs {read}");
    published.assert_only(
        "publishes through the balancer during a rolling restart",
        &[],
    );
    read.assert_only(
        "installs through the balancer during a rolling restart",
        &[],
    );
    final_checks(&cluster, &all, &repo, &oracle).await;
}
