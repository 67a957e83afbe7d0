use std::ops::Range;
use std::path::{Path, PathBuf};

use granary_cluster_tests::client::{NodeClient, Repo, Resp, fake_tgz, noise};
use granary_cluster_tests::cluster::{Cluster, Options, SETTLE_TIMEOUT};
use granary_cluster_tests::poll;
use granary_cluster_tests::seed::Seed;

/// Every place in the node's blob segment files where `needle` lies, as (file, offset).
fn find_in_segments(blobs: &Path, needle: &[u8]) -> Vec<(PathBuf, usize)> {
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

/// A package published through one node, then damaged on another's disk while that node
/// was down, and that node started again.
struct Damaged {
    cluster: Cluster,
    repo: Repo,
    victim: u64,
    client: NodeClient,
    tgz: Vec<u8>,
    version: &'static str,
    blobs: PathBuf,
    /// The bytes of the package searched for on disk; one bit in them was flipped.
    window: Range<usize>,
    /// Where they lay.
    damaged_at: (PathBuf, usize),
}

impl Damaged {
    /// Publishes a package of `size` bytes through the first of `nodes` nodes; once a
    /// node that did not receive it (the only one, alone) serves it, stops that node
    /// (SIGTERM), flips one bit of the package's bytes in its segment files (at `window`
    /// of the package), and starts it again.
    async fn new(
        nodes: usize,
        label: &str,
        version: &'static str,
        size: usize,
        window: Range<usize>,
    ) -> Self {
        Self::with_config(nodes, label, version, size, window, None).await
    }

    /// As [`Damaged::new`], the nodes started with `config_toml`.
    async fn with_config(
        nodes: usize,
        label: &str,
        version: &'static str,
        size: usize,
        window: Range<usize>,
        config_toml: Option<String>,
    ) -> Self {
        let seed = Seed::from_env();
        let mut rng = seed.rng(label);
        let mut cluster = Cluster::start_with(
            seed,
            Options {
                nodes,
                config_toml,
                ..Options::default()
            },
        )
        .await;
        let all = cluster.ids();
        let repo = cluster.setup(1, "damaged", "repo").await;
        let tgz = fake_tgz(&noise(size, rng.next_u64()));
        let published = cluster
            .client(all[0])
            .npm_publish(&repo, "rotten", version, &tgz)
            .await
            .expect("the publish is answered");
        assert_eq!(published.status, 201, "{}", published.text());
        let victim = match all.len() {
            1 => all[0],
            n => all[1 + rng.below(n as u64 - 1) as usize],
        };
        let client = cluster.client(victim);
        let serves = poll::until(
            "the package served by the node to be damaged",
            SETTLE_TIMEOUT,
            || async {
                match client.npm_tarball(&repo, "rotten", version).await {
                    Ok(r) if r.status == 200 => Ok(r),
                    Ok(r) => Err(format!("status {}", r.status)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
        assert!(serves.body == tgz, "node {victim} served other bytes");
        let status = cluster
            .terminate(victim)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.node(victim).output_tail(40)));
        assert!(status.success(), "node {victim} exited with {status}");

        let blobs = cluster.node(victim).spec().data_dir.join("blobs");
        let places = find_in_segments(&blobs, &tgz[window.clone()]);
        assert_eq!(
            places.len(),
            1,
            "the package's bytes on node {victim}: {places:?}"
        );
        let (segment, at) = places[0].clone();
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[at + 10] ^= 0x04;
        std::fs::write(&segment, bytes).unwrap();

        cluster.restart(victim).await;
        cluster.wait_caught_up(victim, SETTLE_TIMEOUT).await;
        Damaged {
            cluster,
            repo,
            victim,
            client,
            tgz,
            version,
            blobs,
            window,
            damaged_at: (segment, at),
        }
    }

    async fn download(&self) -> Result<Resp, String> {
        self.client
            .npm_tarball(&self.repo, "rotten", self.version)
            .await
            .map_err(|e| e.to_string())
    }

    /// Asserts a 200 carrying exactly the published package.
    fn assert_intact(&self, r: &Resp) {
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.body == self.tgz,
            "node {} served {} bytes that differ from the published {}",
            self.victim,
            r.body.len(),
            self.tgz.len()
        );
    }

    /// Asserts that the damaged node logged each of `said` (waiting for its output to
    /// reach the harness).
    async fn assert_logged(&self, said: &[&str]) {
        if let Err(why) = self
            .cluster
            .node(self.victim)
            .wait_for_output(said, SETTLE_TIMEOUT)
            .await
        {
            panic!("{why}");
        }
    }

    /// Asserts that a good copy is stored on the node again, beside the damaged bytes
    /// (which no longer match).
    fn assert_stored_again(&self) {
        if let Err(why) = self.stored_again() {
            panic!("{why}");
        }
    }

    /// Whether a good copy is stored on the node again; if not, what its segments hold.
    fn stored_again(&self) -> Result<(), String> {
        let after = find_in_segments(&self.blobs, &self.tgz[self.window.clone()]);
        match after.as_slice() {
            [one] if *one != self.damaged_at => Ok(()),
            [_] => Err("the damaged bytes read back intact".to_owned()),
            _ => Err(format!(
                "the package's bytes on node {}: {after:?}",
                self.victim
            )),
        }
    }
}

/// A bit flips in a package's bytes on one node's disk while that node is down. Started
/// again, the node still serves the package with exactly the published bytes: it finds
/// the damage when it reads them (the CRC32C recorded at upload), drops its copy and
/// fetches a good one from a peer, which it stores, so the next reads are its own again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_package_damaged_on_one_nodes_disk_is_served_intact_and_stored_again() {
    let d = Damaged::new(3, "damaged disk", "1.0.0", 60_000, 30_000..30_064).await;
    d.assert_intact(&d.download().await.expect("the tarball is answered"));
    d.assert_stored_again();
    d.assert_intact(&d.download().await.expect("the tarball is answered"));
    d.assert_logged(&["failed its CRC32C check"]).await;
}

/// The same for a package larger than one chunk (256 KiB), whose bytes stream from disk:
/// the node finds the damage only as it reads the last part, so the first download fails
/// (the last bytes are never sent, so no client takes the damaged package for a whole
/// one); the next is served intact from a good copy fetched from a peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_package_damaged_on_one_nodes_disk_is_never_served_damaged() {
    let d = Damaged::new(3, "damaged disk, large", "2.0.0", 600_000, 1000..1064).await;
    match d.download().await {
        Ok(r) if r.status == 200 => panic!(
            "node {} answered 200 with {} bytes ({}) from its damaged copy",
            d.victim,
            r.body.len(),
            if r.body == d.tgz { "intact" } else { "damaged" }
        ),
        Ok(r) => eprintln!("first download: status {}", r.status),
        Err(e) => eprintln!("first download: {e}"),
    }
    let served = poll::until("the package served intact", SETTLE_TIMEOUT, || async {
        match d.download().await? {
            r if r.status == 200 => Ok(r),
            r => Err(format!("status {}", r.status)),
        }
    })
    .await;
    d.assert_intact(&served);
    d.assert_stored_again();
}

/// A node alone, with no copy elsewhere to fetch: the damaged package is refused with a
/// server error (the node's log says why), not served damaged and not called missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_package_damaged_on_a_lone_nodes_disk_is_refused_not_served() {
    let d = Damaged::new(1, "damaged disk, alone", "3.0.0", 60_000, 30_000..30_064).await;
    let r = d.download().await.expect("the tarball is answered");
    assert_eq!(r.status, 500, "{}", r.text());
    d.assert_logged(&["failed its CRC32C check", "no other member holds them"])
        .await;
}

/// Nobody downloads the damaged package: the scrub (every second here) reads it back,
/// finds the damage, drops the copy, and the node fetches and stores a good one from a
/// peer on its own, before any request for it; a download then gets the exact bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scrub_finds_and_replaces_a_damaged_package_nobody_downloads() {
    let d = Damaged::with_config(
        3,
        "damaged disk, scrubbed",
        "4.0.0",
        60_000,
        30_000..30_064,
        Some("[scrub]\ninterval_secs = 1\ntranquility = 1\n".to_owned()),
    )
    .await;
    poll::until(
        "a good copy stored by the scrub",
        SETTLE_TIMEOUT,
        || async { d.stored_again() },
    )
    .await;
    d.assert_logged(&["failed its CRC32C check", "scrub: damaged blobs found"])
        .await;
    d.assert_intact(&d.download().await.expect("the tarball is answered"));
}
