use granary_cluster_tests::client::{fake_tgz, noise};
use granary_cluster_tests::cluster::{Cluster, Options};
use granary_cluster_tests::oracle::{Oracle, Publish};
use granary_cluster_tests::seed::Seed;

use crate::common::{final_checks, publish_acked};

/// How many publishes the burst sends at once, a third through each node.
const BURST: u64 = 300;

/// A burst of publishes far beyond what the nodes take at once (two writes each, a
/// 50 ms wait for a turn): every publish is answered 201 or 503 with `Retry-After`,
/// nothing else; a publish turned away left nothing behind on any node; retried as a
/// client retries, each of them goes through; and every acknowledged publish is
/// readable from every node, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_beyond_the_write_limit_is_turned_away_retryably_and_loses_nothing() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("burst");
    let mut cluster = Cluster::start_with(
        seed,
        Options {
            nodes: 3,
            config_toml: Some("max_concurrent_writes = 2\nwrite_queue_ms = 50\n".into()),
            ..Options::default()
        },
    )
    .await;
    cluster.observe();
    let ids = cluster.ids();
    let clients = cluster.clients(&ids);
    let repo = cluster.setup(1, "burst", "repo").await;
    let oracle = Oracle::new();

    let mut sent = Vec::new();
    for i in 0..BURST {
        let node = clients[(i % 3) as usize].clone();
        let repo = repo.clone();
        let size = rng.range(1_000, 40_000) as usize;
        let p = Publish::new(
            &format!("burst-{}", i % 10),
            &format!("1.0.{i}"),
            fake_tgz(&noise(size, rng.next_u64())),
            node.node_id,
        );
        sent.push(tokio::spawn(async move {
            let answer = node
                .npm_publish(&repo, &p.package, &p.version, &p.bytes)
                .await;
            (p, answer)
        }));
    }
    let mut turned_away = Vec::new();
    for s in sent {
        let (p, answer) = s.await.expect("publish task");
        match answer {
            Ok(r) if r.status == 201 => oracle.acked(p),
            Ok(r) if r.is_retry_later() => {
                assert!(r.text().contains("writes at once"), "{}", r.describe());
                turned_away.push(p);
            }
            Ok(r) => panic!("publish {}: {}", p.id(), r.describe()),
            Err(e) => panic!("publish {}: {e}", p.id()),
        }
    }
    eprintln!(
        "burst of {BURST}: {} acknowledged, {} turned away",
        oracle.len(),
        turned_away.len()
    );
    assert!(!turned_away.is_empty(), "the burst never reached the limit");
    assert!(!oracle.is_empty(), "nothing of the burst went through");

    // Nothing of a turned-away publish is on any node.
    for p in &turned_away {
        for c in &clients {
            let doc = c.npm_packument(&repo, &p.package).await.expect("packument");
            if doc.status == 200 {
                let listed = &doc.json()["versions"][&p.version];
                assert!(
                    listed.is_null(),
                    "{} was turned away yet node {} lists it",
                    p.id(),
                    c.node_id
                );
            } else {
                assert_eq!(doc.status, 404, "{}", doc.describe());
            }
        }
    }

    // Retried as a client retries, each goes through.
    for p in turned_away {
        publish_acked(
            &cluster.client(p.via),
            &repo,
            &oracle,
            &p.package,
            &p.version,
            p.bytes.to_vec(),
        )
        .await;
    }
    assert_eq!(oracle.len(), BURST as usize);
    final_checks(&cluster, &ids, &repo, &oracle).await;
}
