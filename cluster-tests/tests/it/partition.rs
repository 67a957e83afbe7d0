use std::time::Duration;

use granary_cluster_tests::client::{NodeClient, Repo, Resp, counter_sum, fake_tgz};
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::faults::Firewall;
use granary_cluster_tests::load::{Kind, Load};
use granary_cluster_tests::oracle::Oracle;
use granary_cluster_tests::poll::until;
use granary_cluster_tests::seed::Seed;
use serde_json::Value;

use crate::common::{final_checks, publish_acked, wait_acks};

/// What the isolated node answered to one request.
#[derive(Debug)]
enum Seen {
    /// 503 with Retry-After: refused, as it must.
    Refused,
    /// A document: fresh or stale, judged by the caller.
    Doc(Value),
    /// Anything else (a 404 for a package that exists is stale too).
    Other(String),
}

/// Three nodes, each in a cgroup of its own so that iptables can cut it off, with the
/// nodes' `RUST_LOG` if given.
async fn three_nodes_to_cut(seed: Seed, rust_log: Option<&str>) -> Cluster {
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            faults: true,
            rust_log: rust_log.map(str::to_owned),
            ..Options::default()
        },
    )
    .await;
    cluster.observe();
    cluster
}

/// The election gate's rounds of status asks with `result` (`short` or `reached`), from
/// a node's `/metrics` text.
fn probe_rounds(metrics: &str, result: &str) -> u64 {
    let series = format!("granary_raft_quorum_probes_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0)
}

/// Awaits `f`, printing how long the isolated node took to answer.
async fn timed<T: std::fmt::Debug>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let start = std::time::Instant::now();
    let out = f.await;
    let summary = format!("{out:?}");
    let summary: String = summary.chars().take(100).collect();
    eprintln!(
        "partition: isolated node: {what} → {summary} after {:?}",
        start.elapsed()
    );
    out
}

/// The API's "not now": ThrottlingException (429, as AWS sends it) or a 5xx
/// (InternalServerException, ServiceUnavailable): what SDKs retry.
fn api_refused(r: &Resp) -> bool {
    let kind = serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["__type"].as_str().map(str::to_owned))
        .unwrap_or_default();
    r.status >= 500 || (r.status == 429 && kind.ends_with("ThrottlingException"))
}

async fn packument(node: &NodeClient, repo: &Repo, name: &str) -> Seen {
    match node.npm_packument(repo, name).await {
        Ok(r) if r.is_retry_later() => Seen::Refused,
        Ok(r) if r.status == 200 => Seen::Doc(r.json()),
        Ok(r) => Seen::Other(r.describe()),
        Err(e) => Seen::Other(e.to_string()),
    }
}

/// Cut one node (chosen by the seed: the leader or a follower) off from its peers with
/// iptables. The majority elects or keeps a leader and acknowledges publishes; the
/// isolated node acknowledges none (503) and serves no stale metadata: a packument
/// changed on the majority side after the cut is 503 or the new document, never the old
/// one, and a package created after the cut is never a 404. After healing, the isolated
/// node converges, the refused publishes never appear, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_minority_refuses_writes_and_stale_reads_then_converges() {
    let Some(mut firewall) = Firewall::require() else {
        return;
    };
    let seed = Seed::from_env();
    let mut rng = seed.rng("partition");
    let mut cluster = three_nodes_to_cut(seed, None).await;
    let all = cluster.ids();
    let repo = cluster.setup(1, "partition", "repo").await;
    let oracle = Oracle::new();

    // Before the cut: `changed@1.0.0`, applied everywhere.
    let tgz = |rng: &mut granary_cluster_tests::seed::TestRng| fake_tgz(&rng.bytes(3000));
    publish_acked(
        &cluster.client(1),
        &repo,
        &oracle,
        "changed",
        "1.0.0",
        tgz(&mut rng),
    )
    .await;
    cluster.wait_converged(&all, SETTLE_TIMEOUT).await;

    let isolated = rng.choose(&all);
    let majority = cluster.ids_except(isolated);
    let leader_before = cluster.leader().await;
    eprintln!(
        "partition: isolating node {isolated} (leader before: node {leader_before}) from {majority:?}"
    );
    firewall.isolate(&cluster.net(isolated), &cluster.nets(&majority));
    eprintln!("partition: rules\n{}", firewall.rules());

    // The majority has a leader among its own and acknowledges writes.
    let leader = cluster.wait_leader(&majority, SETTLE_TIMEOUT).await;
    eprintln!("partition: majority leader is node {leader}");
    publish_acked(
        &cluster.client(majority[0]),
        &repo,
        &oracle,
        "changed",
        "1.1.0",
        tgz(&mut rng),
    )
    .await;
    publish_acked(
        &cluster.client(majority[1]),
        &repo,
        &oracle,
        "created",
        "1.0.0",
        tgz(&mut rng),
    )
    .await;
    let load = Load::publishers(
        cluster.clients(&majority),
        &repo,
        &oracle,
        &seed.rng("majority publishers"),
        3,
    );
    let before = oracle.len();
    wait_acks(
        &oracle,
        before + 20,
        &load,
        "the majority keeps accepting writes",
    )
    .await;
    let load_tally = load.stop().await;
    eprintln!("partition: majority publish outcomes {load_tally}");
    load_tally.assert_only("publishes on the majority side", Kind::RETRYABLE);

    // The isolated node knows it is cut off: a follower from its election gate's rounds
    // (no leader heard, no majority answering), a leader from its quorum's silence for
    // its followers' lease and an election timeout.
    let node = cluster.client(isolated);
    until(
        &format!("node {isolated} (leader before: node {leader_before}) knowing it is cut off"),
        SETTLE_TIMEOUT,
        || async {
            match counter_sum(&node.metrics().await?, "granary_raft_cut_off") {
                1 => Ok(()),
                n => Err(format!("granary_raft_cut_off {n}")),
            }
        },
    )
    .await;
    // A load balancer checking `/readyz` sends its clients to the other nodes.
    let readyz = node.raw("GET", "/readyz", &[], vec![]).await;
    assert!(
        matches!(&readyz, Ok(r) if r.status == 503 && r.text().starts_with("cut off:")),
        "/readyz on the isolated node: {:?}",
        readyz.map(|r| r.describe())
    );

    // The isolated node: every write refused, every read refused or fresh — asked at
    // the same time, since each may take the node's own timeout to answer.
    let writes = futures::future::join_all((0..2).map(|i| {
        let (node, repo) = (&node, &repo);
        let bytes = fake_tgz(&[i as u8; 64]);
        async move {
            let version = format!("1.0.{i}");
            let r = timed(
                &format!("publish isolated@{version}"),
                node.npm_publish(repo, "isolated", &version, &bytes),
            )
            .await;
            (version, r)
        }
    }));
    let list_path = format!(
        "/v1/packages?domain={}&repository={}",
        repo.domain, repo.name
    );
    let reads = async {
        futures::join!(
            timed("packument changed", packument(&node, &repo, "changed")),
            timed("packument created", packument(&node, &repo, "created")),
            timed("list-packages", node.api("POST", &list_path, None)),
        )
    };
    let asked = std::time::Instant::now();
    let (writes, (changed, created, listed)) = futures::join!(writes, reads);
    let answered = asked.elapsed();
    eprintln!("partition: the isolated node answered in {answered:?}");

    let mut problems = Vec::new();
    // Knowing it is cut off, it refuses at once instead of waiting out the write deadline
    // (5 s) for a leader that cannot commit.
    if answered > Duration::from_secs(2) {
        problems.push(format!(
            "the isolated node (leader before: node {leader_before}) took {answered:?} to \
             refuse (want at once: it knows it is cut off)"
        ));
    }
    for (version, r) in &writes {
        match r {
            Ok(r) if r.is_retry_later() => {}
            Ok(r) => problems.push(format!(
                "publish isolated@{version} on the isolated node: {} (want 503 with Retry-After)",
                r.describe()
            )),
            Err(e) => problems.push(format!(
                "publish isolated@{version} on the isolated node: {e} (want 503 with Retry-After)"
            )),
        }
    }
    match &changed {
        Seen::Refused => {}
        Seen::Doc(d) if d["versions"].get("1.1.0").is_some() => {}
        Seen::Doc(d) => problems.push(format!(
            "stale read: the isolated node served `changed` without 1.1.0, acknowledged by \
             the majority after the cut: versions {:?}",
            d["versions"]
                .as_object()
                .map(|m| m.keys().collect::<Vec<_>>())
        )),
        Seen::Other(o) => problems.push(format!("packument `changed` on the isolated node: {o}")),
    }
    match &created {
        Seen::Refused => {}
        Seen::Doc(d) if d["versions"].get("1.0.0").is_some() => {}
        other => problems.push(format!(
            "stale read: package `created` (acknowledged by the majority after the cut) on \
             the isolated node: {other:?} (want 503 or the new document)"
        )),
    }
    match &listed {
        Ok(r) if api_refused(r) => {}
        Ok(r)
            if r.status == 200
                && r.json()["packages"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|p| p["package"] == "created")) => {}
        Ok(r) => problems.push(format!(
            "stale read: list-packages on the isolated node: {} (want ThrottlingException, \
             a 5xx, or a list with `created`)",
            r.describe()
        )),
        Err(e) => problems.push(format!("list-packages on the isolated node: {e}")),
    }
    if !problems.is_empty() {
        panic!(
            "the isolated node {isolated} misbehaved:\n  {}\n(firewall rules:\n{}\nIf the node \
             reached its peers anyway, check that peer connections come from the node's own \
             IP or that the cgroup match is available.)",
            problems.join("\n  "),
            firewall.rules()
        );
    }

    // An isolated follower reaches no majority, so it holds its elections back instead
    // of raising its term: held back for longer than a lease and the longest election
    // timeout (status rounds every 100 ms with the default 400 ms minimum), it would
    // have campaigned by now otherwise. Back, it must not depose the majority's leader.
    let kept = if isolated == leader_before {
        None
    } else {
        until(
            &format!("node {isolated} holding its elections back"),
            SETTLE_TIMEOUT,
            || async {
                let text = node.metrics().await?;
                let held_back = counter_sum(&text, "granary_raft_elections_held_back");
                let rounds = probe_rounds(&text, "short");
                if held_back == 1 && rounds >= 17 {
                    Ok(())
                } else {
                    Err(format!("held back {held_back}, {rounds} short rounds"))
                }
            },
        )
        .await;
        let s = cluster.status(leader).await.expect("the majority's leader");
        Some((leader, s.term))
    };

    // The majority's leader counts the lost peer, and says so once in its log instead of
    // at each of its retries (openraft's own reports of those are left out).
    unreachable_peers(&cluster, leader, 1).await;

    firewall.heal();
    cluster.wait_converged(&all, SETTLE_TIMEOUT).await;
    final_checks(&cluster, &all, &repo, &oracle).await;
    unreachable_peers(&cluster, leader, 0).await;
    until(
        &format!("node {isolated} no longer cut off, and ready"),
        SETTLE_TIMEOUT,
        || async {
            match counter_sum(&node.metrics().await?, "granary_raft_cut_off") {
                0 if node.ready().await => Ok(()),
                0 => Err("/readyz is not 200".into()),
                n => Err(format!("granary_raft_cut_off {n}")),
            }
        },
    )
    .await;
    let isolated_log = cluster.node(isolated).output_tail(2000);
    assert!(
        isolated_log
            .lines()
            .any(|l| l.contains("WARN") && l.contains("cut off: requests")),
        "node {isolated} did not log being cut off:\n{isolated_log}"
    );
    let log = cluster.node(leader).output_tail(2000);
    let retries: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("openraft") && l.contains("Unreachable node:"))
        .collect();
    assert!(
        retries.is_empty(),
        "node {leader} logged openraft's retries of the isolated node ({}), the first: {}",
        retries.len(),
        retries[0]
    );
    let lost = format!("node={isolated}");
    assert!(
        log.lines()
            .any(|l| l.contains("cannot reach a peer") && l.contains(&lost)),
        "node {leader} did not log losing node {isolated}:\n{log}"
    );
    if let Some((leader, term)) = kept {
        let s = cluster
            .status(leader)
            .await
            .expect("the leader after healing");
        assert_eq!(
            (s.leader_id, s.term),
            (Some(leader), term),
            "the isolated follower, back, deposed the majority's leader"
        );
    }
    // What the isolated node refused never happened.
    for id in &all {
        match cluster.client(*id).npm_packument(&repo, "isolated").await {
            Ok(r) if r.status == 404 => {}
            Ok(r) => panic!(
                "node {id}: a publish the isolated node refused with 503 exists after \
                 healing: {}",
                r.describe()
            ),
            Err(e) => panic!("node {id}: packument `isolated`: {e}"),
        }
    }
}

/// Waits until `granary_raft_peers_unreachable` on node `id` is `want`.
async fn unreachable_peers(cluster: &Cluster, id: u64, want: u64) {
    let node = cluster.client(id);
    let gauge = "granary_raft_peers_unreachable";
    until(
        &format!("node {id}: {gauge} {want}"),
        SETTLE_TIMEOUT,
        || async {
            match counter_sum(&node.metrics().await?, gauge) {
                n if n == want => Ok(()),
                n => Err(format!("{gauge} {n}")),
            }
        },
    )
    .await;
}

/// Cut the link between the leader and one follower alone (iptables; the follower is
/// chosen by the seed), the other follower reaching both: what a restarted follower meets
/// until the leader's replication, backing off since it went down, reaches it again. The
/// cut-off follower hears no leader and reaches a majority, but that majority would refuse
/// its vote (the other follower hears the leader), so it holds its elections back instead
/// of raising its term, for longer than its own timer would have waited. Meanwhile the
/// leader and the other follower acknowledge publishes. Once the link is back, the leader
/// and its term are unchanged, and every node converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_cut_off_from_the_leader_alone_does_not_depose_it() {
    let Some(mut firewall) = Firewall::require() else {
        return;
    };
    let seed = Seed::from_env();
    let mut rng = seed.rng("one link");
    // Info from the gate, for its line saying why it holds elections back.
    let mut cluster =
        three_nodes_to_cut(seed, Some("warn,granary_node::cluster::election_gate=info")).await;
    let all = cluster.ids();
    let repo = cluster.setup(1, "onelink", "repo").await;
    let oracle = Oracle::new();
    let leader = cluster.leader().await;
    let term = cluster
        .status(leader)
        .await
        .expect("the leader's status")
        .term;
    let followers = cluster.ids_except(leader);
    let cut = rng.choose(&followers);
    let other = cluster
        .ids_except(cut)
        .into_iter()
        .find(|id| *id != leader)
        .expect("a third node");
    eprintln!(
        "one link: cutting node {cut} off from the leader, node {leader} (term {term}); node \
         {other} reaches both"
    );
    let node = cluster.client(cut);
    let rounds_before = probe_rounds(&node.metrics().await.expect("metrics"), "reached");
    let cut_at = std::time::Instant::now();
    firewall.isolate(&cluster.net(cut), &cluster.nets(&[leader]));

    let load = Load::publishers(
        cluster.clients(&[leader, other]),
        &repo,
        &oracle,
        &seed.rng("publishers"),
        2,
    );
    let before = oracle.len();
    wait_acks(
        &oracle,
        before + 20,
        &load,
        "the leader and the other follower keep accepting writes",
    )
    .await;
    // With the default timings (400/800 ms) the follower's timer fires 1.2–1.6 s after
    // its last contact; its gate looks every 100 ms (and waits up to 400 ms for the
    // leader's answer, which never comes).
    until(
        &format!("node {cut} holding its elections back past its election timer"),
        SETTLE_TIMEOUT,
        || async {
            let text = node.metrics().await?;
            let held_back = counter_sum(&text, "granary_raft_elections_held_back");
            let rounds = probe_rounds(&text, "reached") - rounds_before;
            let waited = cut_at.elapsed();
            if held_back == 1 && rounds >= 6 && waited > Duration::from_millis(2500) {
                Ok(())
            } else {
                Err(format!(
                    "held back {held_back}, {rounds} rounds reaching a majority, {waited:?} \
                     since the cut"
                ))
            }
        },
    )
    .await;
    let load_tally = load.stop().await;
    eprintln!("one link: publish outcomes {load_tally}");
    load_tally.assert_only("publishes through the leader and the other follower", &[]);
    let s = cluster
        .status(cut)
        .await
        .expect("the cut-off follower's status");
    assert_eq!(
        s.term, term,
        "node {cut}, cut off from the leader alone, raised its term campaigning"
    );
    let log = cluster.node(cut).output_tail(2000);
    assert!(
        log.lines()
            .any(|l| l.contains("the other voters hear a leader")),
        "node {cut} did not log why it holds its elections back:\n{log}"
    );

    firewall.heal();
    cluster.wait_converged(&all, SETTLE_TIMEOUT).await;
    let s = cluster
        .status(leader)
        .await
        .expect("the leader after healing");
    assert_eq!(
        (s.leader_id, s.term),
        (Some(leader), term),
        "node {cut}, back, deposed the leader"
    );
    final_checks(&cluster, &all, &repo, &oracle).await;
}
