use granary_cluster_tests::client::Role;
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT, START_TIMEOUT};
use granary_cluster_tests::invariants::{blobs_resolve, no_lost_ack};
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::poll;
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, wait_acks};

/// Under publish load, a fourth node joins (`--join`) and is promoted to voter once it
/// has caught up; then `granary cluster remove-node` removes one of the first three. The
/// new node serves every package: every acknowledged tarball, from it, byte for byte.
/// Snapshots are taken every 50 entries and no log is kept behind them, so the new node
/// catches up by installing a snapshot, not by replaying the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_added_under_load_is_promoted_and_another_is_removed_with_the_cli() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("membership");
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            config_toml: Some(
                "[raft]\nsnapshot_after_entries = 50\nlogs_kept_after_snapshot = 0\n".into(),
            ),
            ..Options::default()
        },
    )
    .await;
    cluster.observe();
    let first = cluster.ids();
    let repo = cluster.setup(1, "members", "repo").await;
    let oracle = Oracle::new();
    let load = Load::publishers(
        cluster.clients(&first),
        &repo,
        &oracle,
        &seed.rng("publishers"),
        4,
    );
    wait_acks(&oracle, 150, &load, "load before the new node").await;

    // A fourth node joins through two members and becomes a voter by itself.
    let new = cluster.add_node(&[1, 2], false).await;
    let what = format!("node {new} promoted to voter");
    poll::until(&what, START_TIMEOUT, || {
        let cluster = &cluster;
        async move {
            let leader = cluster.wait_leader(&[1, 2, 3], SETTLE_TIMEOUT).await;
            let s = cluster.status(leader).await?;
            match s.member(new) {
                Some(m) if m.role == Role::Voter => Ok(()),
                Some(m) => Err(format!("node {new} is a {:?}", m.role)),
                None => Err(format!("node {new} is not a member yet: {:?}", s.members)),
            }
        }
    })
    .await;
    cluster.node_mut(new).wait_ready(SETTLE_TIMEOUT).await;
    let mut with_new = first.clone();
    with_new.push(new);
    load.set_targets(cluster.clients(&with_new));
    let before = oracle.len();
    wait_acks(&oracle, before + 30, &load, "load with four voters").await;

    // Remove one of the first three with the operator CLI, through another member.
    let removed = rng.choose(&first);
    let remaining: Vec<u64> = with_new.iter().copied().filter(|&i| i != removed).collect();
    load.set_targets(cluster.clients(&remaining));
    let via = rng.choose(&remaining[..2]);
    cluster.remove_node_with_cli(via, removed).await;
    cluster.wait_members(&remaining, &[], SETTLE_TIMEOUT).await;
    // The removed node learns it was removed and stops by itself.
    let stopped = poll::until(
        &format!("removed node {removed} stops"),
        SETTLE_TIMEOUT,
        || {
            let status = cluster.node_mut(removed).exit_status();
            async move { status.ok_or_else(|| "still running".to_owned()) }
        },
    )
    .await;
    assert!(
        stopped.success(),
        "the removed node exits cleanly: {stopped:?}"
    );
    cluster.forget(removed);
    let before = oracle.len();
    wait_acks(&oracle, before + 30, &load, "load after the removal").await;
    let tally = load.stop().await;
    eprintln!("membership: publish outcomes {tally}");
    // Publishes sent to the removed node before the load moved off it may fail in any
    // retryable way; none may be refused as a client error.
    tally.assert_only(
        "publishes during membership changes",
        &[
            Kind::Unavailable,
            Kind::Refused,
            Kind::Closed,
            Kind::Timeout,
            Kind::ServerError,
        ],
    );

    // The new node serves everything, itself.
    let newcomer = cluster.clients(&[new]);
    no_lost_ack::check(&newcomer, &repo, &oracle).await;
    blobs_resolve::check(&newcomer, &repo, &oracle).await;
    final_checks(&cluster, &remaining, &repo, &oracle).await;
}

/// Four nodes joining one node at once take turns on the leader: each becomes a voter,
/// and no node logs an error for it (openraft refuses, and logs as an error, a membership
/// change made while another is uncommitted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_joining_at_once_take_turns_without_errors() {
    let seed = Seed::from_env();
    let cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 5,
            ..Options::default()
        },
    )
    .await;
    let all = cluster.ids();
    cluster.wait_members(&all, &[], START_TIMEOUT).await;
    for id in all {
        let output = cluster.node(id).output_tail(usize::MAX);
        let errors: Vec<&str> = output.lines().filter(|l| l.contains("ERROR")).collect();
        assert!(
            errors.is_empty(),
            "node {id} logged errors:\n{}",
            errors.join("\n")
        );
    }
}
