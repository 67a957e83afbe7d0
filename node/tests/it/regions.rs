//! The shipped multi-region configuration, `configs/multi-region/node1.toml` … `node6.toml`
//! (two nodes in each of three regions, all voters, cross-region Raft timings), run in this
//! process with the round trips its comments name on every link between regions:
//!
//! ```text
//!        us-east-1 (1, 2) ──── 75 ms ──── eu-west-1 (3, 4)
//!                 ╲                          ╱
//!               200 ms                  280 ms
//!                   ╲                    ╱
//!                  ap-southeast-2 (5, 6; 6 reads locally)
//! ```
//!
//! Each node is the file as an operator would use it, with only what the README says to
//! replace (addresses, data directory, public URL) replaced; node 6 also gets
//! `read_consistency = "local"`, which the README offers far regions.

use std::time::{Duration, Instant};

use granary_node::Config;
use granary_node::config::ReadConsistency;
use granary_node::faults::Faults;
use rand::Rng;
use serde_json::Value;

use crate::harness::{Client, fake_tgz};
use crate::inproc::{
    InprocCluster, all_readable, get, metric, publish_until_acknowledged, publish_version, tarball,
    until,
};

/// The regions' members, by node id, as in the shipped files.
const REGIONS: [(&str, [u64; 2]); 3] = [
    ("us-east-1", [1, 2]),
    ("eu-west-1", [3, 4]),
    ("ap-southeast-2", [5, 6]),
];

/// Round trips between regions, as the files' comments give them.
const ROUND_TRIPS: [(&str, &str, u64); 3] = [
    ("us-east-1", "eu-west-1", 75),
    ("us-east-1", "ap-southeast-2", 200),
    ("eu-west-1", "ap-southeast-2", 280),
];

/// The node that reads locally.
const LOCAL_READER: u64 = 6;

fn region_of(id: u64) -> &'static str {
    REGIONS
        .iter()
        .find(|(_, ids)| ids.contains(&id))
        .map(|(r, _)| *r)
        .expect("a node of the six")
}

fn shipped(id: u64) -> Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../configs/multi-region/node{id}.toml"));
    let mut config = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(config.node_id, id, "{}", path.display());
    assert_eq!(config.region, region_of(id), "{}", path.display());
    if id == LOCAL_READER {
        config.read_consistency = ReadConsistency::Local;
    }
    config
}

/// Gives every link between two regions' members present so far its round trip (±10 %).
fn shape(cluster: &InprocCluster) {
    let members = |region: &str| -> Vec<&str> {
        cluster
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| region_of(*i as u64 + 1) == region)
            .map(|(_, m)| m.grpc.as_str())
            .collect()
    };
    for (a, b, ms) in ROUND_TRIPS {
        cluster.faults.latency(
            &members(a),
            &members(b),
            Duration::from_millis(ms * 9 / 10),
            Duration::from_millis(ms * 11 / 10),
        );
    }
}

/// Publishes `name@version` through `c` (see [`publish_version`]).
async fn publish(
    c: &Client,
    token: &str,
    name: &str,
    version: &str,
    tgz: &[u8],
) -> Result<(), String> {
    publish_version(c, token, "inproc", name, version, tgz).await
}

/// The versions of `name`'s packument through `c`, or the status when it is not 200.
async fn versions(c: &Client, token: &str, name: &str) -> Result<Vec<String>, u16> {
    let r = get(c, token, &format!("/npm/inproc/repo/{name}")).await;
    if r.status != 200 {
        return Err(r.status);
    }
    let doc: Value = r.json();
    let mut v: Vec<String> = doc["versions"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    v.sort();
    Ok(v)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The term and leader `id` reports.
/// `GET path` on a node: its status and body, trimmed.
async fn probe(cluster: &InprocCluster, id: u64, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{}{path}", cluster.client(id).base))
        .await
        .expect("probe");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default().trim().to_owned())
}

async fn term_and_leader(cluster: &InprocCluster, id: u64) -> (u64, u64) {
    let s = cluster.status(id).await.expect("status");
    (
        s["term"].as_u64().expect("term"),
        s["leaderId"].as_u64().expect("a leader"),
    )
}

/// Six nodes from the shipped files, across three regions with the round trips the files
/// were tuned for:
/// - with every link up, the leader holds its term while publishes go through every
///   node, each acknowledged at the first attempt and read back at once through a node in
///   another region (linearizable reads across regions);
/// - a region (chosen by the seed: the leader's or another) is cut off from the rest:
///   the other four keep acknowledging publishes (when the leader's region is cut, the
///   first one, sent at once, waits out the election and is acknowledged at its first
///   attempt), the cut region's nodes learn they are cut off (the old leader too, from
///   its quorum's silence, and tells its follower), and refuse at once: its linearizable
///   node acknowledges none and serves no stale metadata, and the local reader serves
///   what it had applied (the trade-off the README describes) when it is the one cut off;
/// - the cut nodes hold their elections back, so their terms stay: once the links are
///   back, the majority's leader keeps its term and publishes through its side go on
///   unrefused;
/// - every node converges: every acknowledged publish reads back identical from all six,
///   and no refused one appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_nodes_in_three_regions_keep_their_leader_and_ride_out_a_lost_region() {
    let configs = (1..=6).map(shipped).collect();
    let mut cluster = InprocCluster::start_with(configs, Faults::new, shape).await;
    let all = cluster.ids();
    let token = cluster.client(1).setup("inproc", "repo").await;
    let regions: Vec<String> = cluster.status(1).await.expect("status")["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| format!("{}:{}", m["nodeId"], m["region"].as_str().unwrap_or("?")))
        .collect();
    eprintln!("regions: members {regions:?}");
    let leader = cluster.leader(&all).await;
    let (term, _) = term_and_leader(&cluster, leader).await;

    // Every link up: through each node in turn, for at least one minimum election timeout
    // of the shipped timings, so a term that does not hold would show.
    let steady_for = Duration::from_millis(shipped(1).raft.election_timeout_min_ms);
    let started = Instant::now();
    let mut acked: Vec<(String, Vec<u8>)> = Vec::new();
    let mut round = 0;
    while round == 0 || started.elapsed() < steady_for {
        for via in all.clone() {
            let name = format!("steady-{round}-{via}");
            let tgz = fake_tgz(cluster.rng.random(), 4096);
            let t = Instant::now();
            publish(&cluster.client(via), &token, &name, "1.0.0", &tgz)
                .await
                .unwrap_or_else(|e| panic!("{name} through node {via}: {e}"));
            let took = t.elapsed();
            // At once, through the node of the next region that reads linearizably.
            let reader = (via + 1) % 6 + 1;
            let reader = if reader == LOCAL_READER { 1 } else { reader };
            let (status, body) = tarball(&cluster.client(reader), &token, &name).await;
            assert_eq!(
                status,
                200,
                "{name} through node {reader} right after: {}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(body, tgz, "{name} through node {reader}");
            eprintln!(
                "regions: {name} acknowledged through node {via} ({}) in {took:?}, read through node {reader}",
                region_of(via)
            );
            acked.push((name, tgz));
        }
        round += 1;
    }
    assert_eq!(
        term_and_leader(&cluster, leader).await,
        (term, leader),
        "the leader held its term over {:?} of publishes across regions",
        started.elapsed()
    );

    // Cut one region off.
    let pick = cluster.rng.random_range(0..3);
    let cut_region = if cluster.rng.random_bool(0.5) {
        region_of(leader)
    } else {
        REGIONS[pick].0
    };
    let cut: Vec<u64> = all
        .iter()
        .copied()
        .filter(|i| region_of(*i) == cut_region)
        .collect();
    let rest: Vec<u64> = all.iter().copied().filter(|i| !cut.contains(i)).collect();
    eprintln!("regions: cutting {cut_region} {cut:?} off (leader was node {leader})");
    let grpcs =
        |ids: &[u64]| -> Vec<String> { ids.iter().map(|i| cluster.grpc(*i).to_owned()).collect() };
    let (cut_grpc, rest_grpc) = (grpcs(&cut), grpcs(&rest));
    cluster
        .faults
        .partition(&refs(&cut_grpc), &refs(&rest_grpc));
    let cut_at = Instant::now();

    // The rest keep acknowledging publishes, including a new version of a package every
    // node already served.
    let changed = acked[0].0.clone();
    let mut first_write = None;
    for i in 0..3 {
        let name = format!("during-{i}");
        let tgz = if i == 0 && cut.contains(&leader) {
            // Sent while the majority has no leader: it waits out the election (9–12 s
            // with these timings; a write may wait 15 s) and is acknowledged at its first
            // attempt, not refused.
            let tgz = fake_tgz(cluster.rng.random(), 4096);
            publish(&cluster.client(rest[0]), &token, &name, "1.0.0", &tgz)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{name}, sent through node {} as the leader's region was cut, \
                         refused after {:?}: {e}",
                        rest[0],
                        cut_at.elapsed()
                    )
                });
            tgz
        } else {
            publish_until_acknowledged(&mut cluster, &rest, &token, &name, Duration::from_secs(60))
                .await
        };
        first_write.get_or_insert_with(|| cut_at.elapsed());
        acked.push((name, tgz));
    }
    let c = cluster.client(rest[0]);
    until(
        &format!("{changed}@2.0.0 acknowledged"),
        Duration::from_secs(60),
        || {
            let (c, token, changed) = (c.clone(), token.clone(), changed.clone());
            async move {
                publish(&c, &token, &changed, "2.0.0", &fake_tgz(2, 4096))
                    .await
                    .ok()
            }
        },
    )
    .await;
    eprintln!(
        "regions: first write acknowledged {:?} after the cut; leader now node {}",
        first_write.expect("a write"),
        cluster.leader(&rest).await
    );

    // Every node of the cut region learns it is cut off: a follower from its rounds of
    // status asks, or, when the leader's region is cut, the old leader from the quorum's
    // silence (its followers' lease and an election timeout: 9 s) and its follower from
    // the old leader's AppendEntries.
    for id in &cut {
        until(
            &format!("node {id} knows it is cut off"),
            Duration::from_secs(30),
            || async { (metric(&cluster, *id, "granary_raft_cut_off").await == 1).then_some(()) },
        )
        .await;
    }
    eprintln!(
        "regions: the cut region knows it is cut off {:?} after the cut",
        cut_at.elapsed()
    );
    // A load balancer checking `/readyz` sends clients to the other regions instead;
    // `/healthz` (up, a member that knew a leader) stays 200.
    for id in &all {
        let (ready, why) = probe(&cluster, *id, "/readyz").await;
        let (healthy, _) = probe(&cluster, *id, "/healthz").await;
        if cut.contains(id) {
            assert!(
                ready == 503 && why.starts_with("cut off:"),
                "node {id}, cut off: /readyz {ready} {why}"
            );
            assert_eq!(healthy, 200, "node {id}, cut off: /healthz");
        } else {
            assert_eq!((ready, why.as_str()), (200, "ok"), "node {id}: /readyz");
        }
    }

    // The cut region: no write acknowledged, no stale metadata from a linearizable node;
    // the local reader serves what it had applied. Each refused at once, not after a
    // 15 s wait for a leader that cannot commit.
    let at_once = Duration::from_secs(2);
    let mut refused = Vec::new();
    for id in &cut {
        let c = cluster.client(*id);
        let name = format!("refused-{id}");
        let t = Instant::now();
        let r = publish(&c, &token, &name, "1.0.0", &fake_tgz(3, 4096)).await;
        let took = t.elapsed();
        assert!(r.is_err(), "node {id}, cut off, acknowledged {name}");
        eprintln!("regions: node {id} (cut off) refused a publish after {took:?}");
        assert!(
            took < at_once,
            "node {id}, cut off (leader was node {leader}), took {took:?} to refuse a publish"
        );
        refused.push(name);
        let t = Instant::now();
        let seen = versions(&c, &token, &changed).await;
        let (status, _) = tarball(&c, &token, "during-0").await;
        let took = t.elapsed();
        assert!(
            took < at_once,
            "node {id}, cut off (leader was node {leader}), took {took:?} to answer two reads"
        );
        if *id == LOCAL_READER {
            assert_eq!(
                seen,
                Ok(vec!["1.0.0".to_owned()]),
                "the local reader serves what it had applied"
            );
            assert_eq!(status, 404, "the local reader has not seen during-0");
        } else {
            assert_eq!(
                seen,
                Err(503),
                "node {id}, cut off, serves no stale packument"
            );
            assert_eq!(status, 503, "node {id}, cut off, serves no stale 404");
        }
    }

    // The cut lasts long enough that each cut node would have campaigned, raising its
    // term, had it not held its elections back: status rounds that reached no majority
    // for longer than its leader's lease and the longest election timeout. Unless the old leader is among
    // them: it goes on leading its region (committing nothing) and its follower hears it,
    // so neither campaigns, and the majority's election took that long already.
    let raft = shipped(1).raft;
    let every = raft.election_timeout_min_ms / 4;
    let rounds = (2 * raft.election_timeout_max_ms).div_ceil(every) + 1;
    let short = "granary_raft_quorum_probes_total{result=\"short\"}";
    let held_back = !cut.contains(&leader);
    for id in cut.iter().filter(|_| held_back) {
        until(
            &format!("node {id} held back for {rounds} rounds"),
            Duration::from_secs(60),
            || async {
                (metric(&cluster, *id, short).await >= rounds
                    && metric(&cluster, *id, "granary_raft_elections_held_back").await == 1)
                    .then_some(())
            },
        )
        .await;
    }
    eprintln!(
        "regions: cut for {:?}; elections held back there: {held_back}",
        cut_at.elapsed()
    );

    // The links come back (their latency stays). The majority's leader keeps its term:
    // publishes through its side go on, none refused, while the cut region catches up.
    let before_heal = term_and_leader(&cluster, rest[0]).await;
    cluster.faults.heal();
    let healed = Instant::now();
    for i in 0..8 {
        let via = rest[i % rest.len()];
        let name = format!("healing-{i}");
        let tgz = fake_tgz(cluster.rng.random(), 4096);
        let t = Instant::now();
        publish(&cluster.client(via), &token, &name, "1.0.0", &tgz)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name} through node {via}, {:?} after healing: {e}",
                    healed.elapsed()
                )
            });
        eprintln!(
            "regions: {name} acknowledged through node {via} in {:?}, {:?} after healing",
            t.elapsed(),
            healed.elapsed()
        );
        acked.push((name, tgz));
    }
    all_readable(&cluster, &all, &token, &acked).await;
    for id in &all {
        let c = cluster.client(*id);
        until(
            &format!("{changed}@2.0.0 on node {id}"),
            Duration::from_secs(60),
            || {
                let (c, token, changed) = (c.clone(), token.clone(), changed.clone());
                async move {
                    (versions(&c, &token, &changed).await
                        == Ok(vec!["1.0.0".into(), "2.0.0".into()]))
                    .then_some(())
                }
            },
        )
        .await;
        for name in &refused {
            assert_eq!(
                versions(&c, &token, name).await,
                Err(404),
                "{name}, refused, appears on node {id}"
            );
        }
    }
    let leader = cluster.leader(&all).await;
    eprintln!(
        "regions: converged {:?} after healing; node {leader} leads all six",
        healed.elapsed()
    );
    assert_eq!(
        term_and_leader(&cluster, leader).await,
        before_heal,
        "the cut region's return deposed no leader"
    );
    for id in &cut {
        assert_eq!(
            metric(&cluster, *id, "granary_raft_elections_held_back").await,
            0,
            "node {id} may hold elections again"
        );
    }
    for id in &all {
        until(
            &format!("node {id} no longer cut off, and ready"),
            Duration::from_secs(30),
            || async {
                (metric(&cluster, *id, "granary_raft_cut_off").await == 0
                    && probe(&cluster, *id, "/readyz").await.0 == 200)
                    .then_some(())
            },
        )
        .await;
    }
    cluster.stop().await;
}
