use std::path::Path;

use granary_cluster_tests::client::{fake_tgz, noise};
use granary_cluster_tests::cluster::{Cluster, SETTLE_TIMEOUT};
use granary_cluster_tests::poll;
use granary_cluster_tests::seed::Seed;

/// Every place in the node's blob segment files where `needle` lies, as (file, offset).
fn find_in_segments(blobs: &Path, needle: &[u8]) -> Vec<(std::path::PathBuf, usize)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(blobs).expect("the node's blobs directory") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("a segment file");
        found.extend(
            bytes
                .windows(needle.len())
                .enumerate()
                .filter(|(_, w)| *w == needle)
                .map(|(at, _)| (path.clone(), at)),
        );
    }
    found
}

/// A bit flips in a package's bytes on one node's disk while that node is down. Started
/// again, the node still serves the package with exactly the published bytes: it finds
/// the damage when it reads them (the CRC32C recorded at upload), drops its copy and
/// fetches a good one from a peer, which it stores, so the next reads are its own again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_package_damaged_on_one_nodes_disk_is_served_intact_and_stored_again() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("damaged disk");
    let mut cluster = Cluster::start(seed, 3).await;
    let all = cluster.ids();
    let repo = cluster.setup(1, "damaged", "repo").await;
    let tgz = fake_tgz(&noise(60_000, rng.next_u64()));
    let published = cluster
        .client(all[0])
        .npm_publish(&repo, "rotten", "1.0.0", &tgz)
        .await
        .expect("the publish is answered");
    assert_eq!(published.status, 201, "{}", published.text());

    // The node whose disk is damaged: one that did not receive the publish.
    let victim = all[1 + rng.below(2) as usize];
    let client = cluster.client(victim);
    poll::until(
        "the package served by the node to be damaged",
        SETTLE_TIMEOUT,
        || async {
            match client.npm_tarball(&repo, "rotten", "1.0.0").await {
                Ok(r) if r.status == 200 && r.body == tgz => Ok(()),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let status = cluster
        .terminate(victim)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.node(victim).output_tail(40)));
    assert!(status.success(), "node {victim} exited with {status}");

    // One bit of the package's bytes, where the node stored them.
    let blobs = cluster.node(victim).spec().data_dir.join("blobs");
    let window = &tgz[tgz.len() / 2..tgz.len() / 2 + 64];
    let places = find_in_segments(&blobs, window);
    assert_eq!(
        places.len(),
        1,
        "the package's bytes on node {victim}: {places:?}"
    );
    let (segment, at) = &places[0];
    let mut bytes = std::fs::read(segment).unwrap();
    bytes[at + 10] ^= 0x04;
    std::fs::write(segment, bytes).unwrap();

    cluster.restart(victim).await;
    cluster.wait_caught_up(victim, SETTLE_TIMEOUT).await;
    let served = client
        .npm_tarball(&repo, "rotten", "1.0.0")
        .await
        .expect("the tarball is answered");
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(
        served.body == tgz,
        "node {victim} served {} bytes that differ from the published {}",
        served.body.len(),
        tgz.len()
    );
    // A good copy is stored on the node again, beside the damaged bytes (which no longer
    // match).
    let after = find_in_segments(&blobs, window);
    assert_eq!(
        after.len(),
        1,
        "the package's bytes on node {victim} after the read: {after:?}"
    );
    assert_ne!(after[0], places[0], "the damaged bytes read back intact");
    let again = client
        .npm_tarball(&repo, "rotten", "1.0.0")
        .await
        .expect("the tarball is answered");
    assert_eq!(again.status, 200);
    assert!(again.body == tgz);
    assert!(
        cluster
            .node(victim)
            .output_tail(200)
            .contains("failed its CRC32C check"),
        "node {victim} logged nothing about the damage:\n{}",
        cluster.node(victim).output_tail(40)
    );
}

/// The same for a package larger than one chunk (256 KiB), whose bytes stream from disk:
/// the node finds the damage only as it reads the last part, so the first download fails
/// (the last bytes are never sent, so no client takes the damaged package for a whole
/// one); the next is served intact from a good copy fetched from a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_package_damaged_on_one_nodes_disk_is_never_served_damaged() {
    let seed = Seed::from_env();
    let mut rng = seed.rng("damaged disk, large");
    let mut cluster = Cluster::start(seed, 3).await;
    let all = cluster.ids();
    let repo = cluster.setup(1, "damaged", "repo").await;
    let tgz = fake_tgz(&noise(600_000, rng.next_u64()));
    let published = cluster
        .client(all[0])
        .npm_publish(&repo, "rotten", "2.0.0", &tgz)
        .await
        .expect("the publish is answered");
    assert_eq!(published.status, 201, "{}", published.text());
    let victim = all[1 + rng.below(2) as usize];
    let client = cluster.client(victim);
    poll::until(
        "the package served by the node to be damaged",
        SETTLE_TIMEOUT,
        || async {
            match client.npm_tarball(&repo, "rotten", "2.0.0").await {
                Ok(r) if r.status == 200 && r.body == tgz => Ok(()),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    let status = cluster
        .terminate(victim)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.node(victim).output_tail(40)));
    assert!(status.success(), "node {victim} exited with {status}");
    // A bit in the first chunk.
    let blobs = cluster.node(victim).spec().data_dir.join("blobs");
    let window = &tgz[1000..1064];
    let places = find_in_segments(&blobs, window);
    assert_eq!(
        places.len(),
        1,
        "the package's bytes on node {victim}: {places:?}"
    );
    let (segment, at) = &places[0];
    let mut bytes = std::fs::read(segment).unwrap();
    bytes[at + 10] ^= 0x04;
    std::fs::write(segment, bytes).unwrap();

    cluster.restart(victim).await;
    cluster.wait_caught_up(victim, SETTLE_TIMEOUT).await;
    match client.npm_tarball(&repo, "rotten", "2.0.0").await {
        Ok(r) if r.status == 200 => panic!(
            "node {victim} answered 200 with {} bytes ({}) from its damaged copy",
            r.body.len(),
            if r.body == tgz { "intact" } else { "damaged" }
        ),
        Ok(r) => eprintln!("first download: status {}", r.status),
        Err(e) => eprintln!("first download: {e}"),
    }
    let served = poll::until("the package served intact", SETTLE_TIMEOUT, || async {
        match client.npm_tarball(&repo, "rotten", "2.0.0").await {
            Ok(r) if r.status == 200 => Ok(r),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert!(
        served.body == tgz,
        "node {victim} served {} bytes that differ from the published {}",
        served.body.len(),
        tgz.len()
    );
    let after = find_in_segments(&blobs, window);
    assert_eq!(
        after.len(),
        1,
        "the package's bytes on node {victim}: {after:?}"
    );
    assert_ne!(after[0], places[0], "the damaged bytes read back intact");
}
